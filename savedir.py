"""
Directories saved as one unit: a checkpoint (train.py) or a token data set (data/prepare.py).

The directory `d` holds the current unit's files and manifest.json (every file's size and SHA-256, and
a few facts such as the step), written last. Other files in `d` (metrics.jsonl, run.lock) are not
part of the unit. A save:
    1. writes the complete new unit into d/.next/ (start_next; every rank of a run writes its shards);
    2. writes d/.next/manifest.json, every file fsynced first (write_manifest): the commit point;
    3. moves each entry of .next/ into d (commit: a file by os.replace, a directory by first moving the
       old one into .next/), d/manifest.json last, then deletes .next/.
Killed before 2 ends: d is the previous unit, untouched; settle() removes .next/.
Killed in 3: .next/manifest.json says what the new unit is; settle() finishes the moves.
So at every kill point d holds the old unit, the new one, or the new one half moved with .next/manifest.json
naming it, and settle() (run first by every writer, and by readers when no writer holds the lock) leaves
exactly one unit. verify() checks the files against the manifest: one line naming the first that differs.
"""
import errno
import fcntl
import hashlib
import json
import os
import shutil

NEXT = ".next"
MANIFEST = "manifest.json"
LOCK = "run.lock"


def start_next(d):
    """A fresh, empty d/.next/ for the new unit (anything left there by a failed save is removed)."""
    os.makedirs(d, exist_ok=True)
    nxt = os.path.join(d, NEXT)
    shutil.rmtree(nxt, ignore_errors=True)
    os.makedirs(nxt)
    return nxt


def _files(d):
    """Relative paths of every file under d, sorted."""
    found = []
    for dirpath, _, names in os.walk(d):
        found += [os.path.relpath(os.path.join(dirpath, n), d) for n in names]
    return sorted(found)


def _sha256(path, sync=False):
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
    return digest


def write_manifest(nxt, **facts):
    """Step 2: d/.next/manifest.json listing every file's size and SHA-256, plus `facts` (e.g. step=N)."""
    files = {rel: {"size": os.path.getsize(os.path.join(nxt, rel)), "sha256": _sha256(os.path.join(nxt, rel), sync=True)}
             for rel in _files(nxt)}
    tmp = os.path.join(nxt, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({**facts, "files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(nxt, MANIFEST))


def commit(d):
    """Step 3: move the committed d/.next/ into d. Repeatable: a move done before a kill is skipped."""
    nxt = os.path.join(d, NEXT)
    manifest = json.load(open(os.path.join(nxt, MANIFEST)))
    names = {rel.split(os.sep)[0] for rel in manifest["files"]}  # top-level entries of the new unit
    for name in sorted(names):
        src, dst = os.path.join(nxt, name), os.path.join(d, name)
        if not os.path.exists(src):  # moved before an interruption
            continue
        if os.path.isdir(src) and os.path.exists(dst):  # os.replace cannot replace a directory
            os.replace(dst, os.path.join(nxt, name + ".old"))
        os.replace(src, dst)
    for name in old_entries(d) - names:  # the old unit's files the new one lacks (e.g. a prompt template)
        path = os.path.join(d, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.replace(os.path.join(nxt, MANIFEST), os.path.join(d, MANIFEST))
    shutil.rmtree(nxt)


def old_entries(d):
    """Top-level entries of the unit d/manifest.json lists (none if it has no readable manifest)."""
    try:
        return {rel.split(os.sep)[0] for rel in read_manifest(d)["files"]}
    except ValueError:
        return set()


def settle(d):
    """Finish a save interrupted after its commit point, or discard one interrupted before it."""
    nxt = os.path.join(d, NEXT)
    if os.path.isfile(os.path.join(nxt, MANIFEST)):
        commit(d)
    elif os.path.isdir(nxt):
        shutil.rmtree(nxt)


def settle_if_idle(d):
    """settle(d) for a reader, unless a training run holds d's lock (it settles d itself)."""
    if not os.path.isdir(os.path.join(d, NEXT)):
        return
    lock_path = os.path.join(d, LOCK)
    try:
        f = open(lock_path, "a")
    except OSError:
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        try:
            settle(d)
        except OSError:
            pass  # read-only: verify() names the file that differs
        fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(d):
    path = os.path.join(d, MANIFEST)
    try:
        manifest = json.load(open(path))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError
        return manifest
    except (OSError, ValueError):
        raise ValueError(f"{path} is missing or damaged: {d} is not a complete saved directory") from None


def verify(d, only=None, required=True):
    """Check d's files against d/manifest.json (sizes and SHA-256); return the manifest, or None when d has
    none and not `required`. `only(rel_path)` picks the files to check. ValueError names the first bad file."""
    settle_if_idle(d)
    if not required and not os.path.exists(os.path.join(d, MANIFEST)):
        return None
    manifest = read_manifest(d)
    for rel, want in manifest["files"].items():
        if only and not only(rel):
            continue
        path = os.path.join(d, rel)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: {d} does not match its manifest")
        if os.path.getsize(path) != want.get("size") or _sha256(path) != want.get("sha256"):
            raise ValueError(f"{path} differs from the size and checksum in {MANIFEST}: the file was changed or damaged")
    return manifest


def lock(d):
    """Keep other runs (training, data/prepare.py) off d for as long as the returned file stays open (an flock: the kernel
    releases it when the process dies). ValueError names the process that holds it."""
    os.makedirs(d, exist_ok=True)
    f = open(os.path.join(d, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"{d} is in use by another run (pid {pid}); wait for it or choose another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
