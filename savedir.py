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

A unit's manifest records its kind (KINDS), and a directory holds units of one kind: before any work a writer
checks its target (check_target: not a file, not one of the run's inputs, no unit of another kind, no file
that no unit owns), so a save only ever replaces and removes the files of the unit before it.
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
METRICS = "metrics.jsonl"  # a run's log beside its unit (metrics.jsonl, metrics.jsonl.next), not part of it

# the kinds of unit, by writer
CHECKPOINT = "checkpoint"                  # train.py
TOKEN_DATA = "token data set"              # data/prepare.py
INSTRUCT_DATA = "instruction data set"     # data/instruct.py
STUDENT = "student"                        # distill.py
CONTROLLERS = "model with controllers"     # dynamic.py
CONVERTED = "converted checkpoint"         # checkpoints_convert.py --from_hf, --from_gguf
EXPORT = "transformers export"             # checkpoints_convert.py --to_hf


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto `path`: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def sha256(path, sync=False):
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
    return digest


def write_manifest(nxt, **facts):
    """Step 2: d/.next/manifest.json listing every file's size and SHA-256, plus `facts` (e.g. step=N)."""
    files = {rel: {"size": os.path.getsize(os.path.join(nxt, rel)),
                   "sha256": sha256(os.path.join(nxt, rel), sync=True)} for rel in _files(nxt)}
    tmp = os.path.join(nxt, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({**facts, "files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(nxt, MANIFEST))


def save(d, kind, write, **facts):
    """Steps 1-3 for one process: write(nxt) fills d/.next/, its manifest (kind and `facts`) commits it, and
    commit() moves it into d. An exception before the commit point removes .next/ and leaves d as it was."""
    nxt = start_next(d)
    try:
        write(nxt)
        write_manifest(nxt, kind=kind, **facts)
    except Exception:
        shutil.rmtree(nxt, ignore_errors=True)
        raise
    commit(d)


def kind_of(manifest):
    """The kind of unit a manifest describes: its "kind", or for manifests written before kinds were
    recorded, the kind its files say."""
    files = manifest["files"]
    if "kind" in manifest:
        return manifest["kind"]
    if "train_state/step.json" in files:
        return CHECKPOINT
    if "meta.json" in files:
        return TOKEN_DATA
    if "train.jsonl" in files:
        return INSTRUCT_DATA
    return "unit of unknown kind"


def check_target(d, kind, inputs=()):
    """Before any work: ValueError (one line) unless a unit of `kind` may be saved in d, that is unless d is
    a directory or absent, is none of the run's `inputs` ((name, path) pairs), and holds no unit of another
    kind (committed or half moved) and, without a unit, no file but a run's lock and metrics."""
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"{d} is a file, not a directory: the {kind} needs a directory")
    for name, path in inputs:
        if path and os.path.realpath(path) == os.path.realpath(d):
            raise ValueError(f"{d} is this run's {name}: saving the {kind} there would replace it; "
                             "choose another directory")
    if not os.path.isdir(d):
        return
    units = [u for u in (d, os.path.join(d, NEXT)) if os.path.isfile(os.path.join(u, MANIFEST))]
    for unit in units:
        held = kind_of(read_manifest(unit))
        if held != kind:
            raise ValueError(f"{d} holds a {held}; saving a {kind} there would replace it: choose another "
                             "directory")
    strangers = sorted(n for n in os.listdir(d) if n not in (LOCK, NEXT) and not n.startswith(METRICS))
    if not units and strangers:
        raise ValueError(f"{d} holds files that no saved unit owns ({', '.join(strangers[:3])}"
                         f"{', ...' if len(strangers) > 3 else ''}): save the {kind} in a new or empty directory")


def save_once(d, kind, write, inputs=(), **facts):
    """A whole save by a program that writes one unit and exits (the converter): claim d, save, let go.
    A failed save leaves d as it was; a directory the call made for it is removed again."""
    made = not os.path.exists(d)
    f = claim(d, kind, inputs)
    try:
        save(d, kind, write, **facts)
    except BaseException:
        if made:
            shutil.rmtree(d, ignore_errors=True)
        raise
    finally:
        f.close()


def claim(d, kind, inputs=()):
    """check_target, then lock d (held while the returned file stays open) and settle an interrupted save."""
    check_target(d, kind, inputs)
    f = lock(d)
    settle(d)
    return f


def commit(d):
    """Step 3: move the committed d/.next/ into d. Repeatable: a move done before a kill is skipped. Only a
    unit of the same kind is replaced (ValueError before any move otherwise)."""
    nxt = os.path.join(d, NEXT)
    manifest = json.load(open(os.path.join(nxt, MANIFEST)))
    if os.path.isfile(os.path.join(d, MANIFEST)) and kind_of(read_manifest(d)) != kind_of(manifest):
        raise ValueError(f"{d} holds a {kind_of(read_manifest(d))}: a {kind_of(manifest)} may not replace it")
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
        except ValueError:
            pass  # .next/ holds a unit of another kind, which may not replace d's: d stays as it is
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
        if os.path.getsize(path) != want.get("size") or sha256(path) != want.get("sha256"):
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
