"""Run untrusted Python (model-written code, HumanEval completions) in a confined subprocess.

Layers, each of which stops its threat on its own where the platform allows it:

- a fresh `python -I` interpreter (no site, no user env) in a new session, cwd = a private temp dir,
  a scrubbed environment, stdin/stdout/stderr as files (no pipe to deadlock on);
- rlimits set by the trusted bootstrap before any user code runs: CPU seconds, address space
  (memory), file size (also caps stdout/stderr, which are files), open files, no core dumps;
- processes: RLIMIT_NPROC does not apply to uid 0 (the kernel exempts the root user), and this
  tool often runs as root in containers. So on Linux the bootstrap installs a seccomp filter that
  makes fork/vfork/clone-without-CLONE_THREAD fail with EPERM (threads still work; clone3 answers
  ENOSYS so libc falls back to clone). Elsewhere RLIMIT_NPROC is used; root without seccomp is refused;
- network: as root the interpreter runs under `unshare --net` (an empty network namespace) where the
  kernel allows it (not in a container without CAP_SYS_ADMIN), and the audit hook refuses socket
  creation everywhere;
- files: a `sys.addaudithook` hook refuses opening for write, creating, renaming, linking or removing
  any path that does not resolve inside the temp dir, and refuses ctypes, resource.setrlimit,
  os.kill of other processes, and os.system/exec/spawn. ctypes is imported by the bootstrap for
  seccomp and then removed, so user code cannot call libc around the hook.
- a wall-clock timeout kills the whole process group.

Not covered: reading files readable by the parent's user. The threat model is our own small
model's code and benchmark completions, not a determined attacker with kernel exploits.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chibichat.common import ChibiError

FSIZE_BYTES = 8 * 1024 * 1024  # largest file (and stdout/stderr) the code may write
NOFILE = 256
NPROC_NON_ROOT = 64  # used only where seccomp is unavailable (counts all processes of the user)
_SETUP_FAILED = 125  # bootstrap exit status when it could not confine the process


@dataclass
class SandboxResult:
    ok: bool  # exited with status 0 within the time limit
    returncode: int  # negative = killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    error: str | None  # why it is not ok, in words; None when ok


# The bootstrap runs first inside the sandboxed interpreter: it is trusted code. argv:
# code_path work_dir memory_bytes cpu_seconds fsize_bytes nofile nproc setup_failed_status
_BOOTSTRAP = r'''
import os, sys, resource
code_path, work = sys.argv[1], sys.argv[2]
mem, cpu, fsize, nofile, nproc, setup_failed = (int(a) for a in sys.argv[3:9])
with open(code_path, encoding="utf-8") as f:
    source = f.read()
sys.argv = ["main.py"]

def fail(msg):
    sys.stderr.write("sandbox setup failed: " + msg + "\n")
    os._exit(setup_failed)

for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                 (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (val, val))

def forbid_processes():
    """seccomp: fork/vfork/clone (unless creating a thread) -> EPERM; clone3 -> ENOSYS."""
    import ctypes, platform
    table = {"x86_64": (0xC000003E, 56, (57, 58)), "aarch64": (0xC00000B7, 220, ())}
    machine = platform.machine()
    if sys.platform != "linux" or machine not in table:
        return False
    arch, clone_nr, fork_nrs = table[machine]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    KILL, ALLOW, ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
    EPERM, ENOSYS, CLONE_THREAD = 1, 38, 0x00010000
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if machine == "x86_64":  # x32 ABI numbers alias the real ones: refuse them outright
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]
    prog += [(JEQ, 0, 1, 435), (RET, 0, 0, ERRNO | ENOSYS)]
    for nr in fork_nrs:
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, ERRNO | EPERM)]
    prog += [(JEQ, 0, 3, clone_nr), (LD, 0, 0, 16), (JSET, 1, 0, CLONE_THREAD),
             (RET, 0, 0, ERRNO | EPERM), (RET, 0, 0, ALLOW)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    arr = (Filter * len(prog))(*[Filter(*i) for i in prog])
    fprog = Prog(len(prog), arr)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    if libc.prctl(22, 2, ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p), 0, 0) != 0:  # SECCOMP_MODE_FILTER
        return False
    return True

if not forbid_processes():
    if os.getuid() == 0:
        fail("cannot forbid process creation as root on this platform (no seccomp); run as a non-root user")
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
    del sys.modules[name]

work = os.path.realpath(work)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
               "os.utime": (0,), "os.truncate": (0,), "os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (1,),
               "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,), "os.lchflags": (0,),
               "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}
# os.fork is deliberately not refused here: the OS layer (seccomp / RLIMIT_NPROC) stops it, and the
# fork-bomb test exercises exactly that layer.
BLOCKED = ("socket.", "ctypes.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.", "resource.setrlimit", "resource.prlimit", "os.killpg", "pty.",
           "os.chroot", "os.setuid", "os.setgid", "os.setre", "os.setgroups")
MY_PID = os.getpid()

def inside(path):
    if isinstance(path, int):
        return True  # an fd: it was opened through a checked path
    p = os.path.realpath(os.fsdecode(path))
    return p == work or p.startswith(work + os.sep)

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = bool((flags or 0) & WRITE_FLAGS) or (mode is not None and any(c in mode for c in "wax+"))
        if writing and not inside(path):
            raise PermissionError(f"sandbox: writing outside the sandbox directory is not allowed: {path!r}")
    elif event in PATH_EVENTS:
        for i in PATH_EVENTS[event]:
            if i < len(args) and args[i] is not None and not inside(args[i]):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory is not allowed: {args[i]!r}")
    elif event == "os.kill":
        if args[0] != MY_PID:
            raise PermissionError("sandbox: signalling other processes is not allowed")
    elif event == "import" and (args[0] == "ctypes" or args[0].startswith(("ctypes.", "_ctypes"))):
        raise PermissionError("sandbox: ctypes is not allowed")
    elif event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")

sys.addaudithook(hook)
del hook, forbid_processes, fail, resource
code = compile(source, "main.py", "exec")
del source
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


def _describe_failure(rc: int, timed_out: bool, timeout_s: float, stderr: str) -> str | None:
    if timed_out:
        return f"timed out after {timeout_s:g} s (wall clock)"
    if rc == 0:
        return None
    if rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file/output size limit", "SIGKILL": "killed",
               "SIGSEGV": "crashed (possibly out of memory)"}.get(sig, "killed by a signal")
        return f"{why} ({sig})"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return f"exit status {rc}" + (f": {last}" if last else "")


def _launch(argv, env, root: Path, work: Path, timeout_s: float):
    """Run argv with files for stdin/stdout/stderr; returns (returncode, stdout, stderr, timed_out)."""
    with open(root / "stdin", "rb") as fin, open(root / "stdout", "wb") as fout, open(root / "stderr", "wb") as ferr:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdin=fin, stdout=fout, stderr=ferr,
                                start_new_session=True, close_fds=True)  # fmt: skip
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Kill the whole group: on timeout, and in case something survived a normal exit.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    stdout = (root / "stdout").read_bytes().decode("utf-8", errors="replace")
    stderr = (root / "stderr").read_bytes().decode("utf-8", errors="replace")
    return proc.returncode, stdout, stderr, timed_out


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512, stdin: str = "") -> SandboxResult:
    """Run `code` as a script in a confined fresh interpreter and report what happened.

    `timeout_s` bounds wall time (and, rounded up, CPU time); `memory_mb` bounds the address space.
    """
    if not isinstance(code, str):
        raise ChibiError("sandbox code must be a str")
    if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s <= 3600):
        raise ChibiError(f"sandbox timeout_s must be in (0, 3600] seconds, got {timeout_s!r}")
    if not (isinstance(memory_mb, int) and 64 <= memory_mb <= 1 << 20):
        raise ChibiError(f"sandbox memory_mb must be an int >= 64 (the interpreter needs it), got {memory_mb!r}")

    root = Path(tempfile.mkdtemp(prefix="chibichat-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        code_path = root / "main.py"
        code_path.write_text(code, encoding="utf-8")
        (root / "stdin").write_text(stdin, encoding="utf-8")
        argv = [
            sys.executable, "-I", "-c", _BOOTSTRAP, str(code_path), str(work),
            str(memory_mb * 1024 * 1024), str(math.ceil(timeout_s) + 1), str(FSIZE_BYTES),
            str(NOFILE), str(NPROC_NON_ROOT), str(_SETUP_FAILED),
        ]  # fmt: skip
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        unshare = shutil.which("unshare")
        rc = None
        if os.geteuid() == 0 and sys.platform == "linux" and unshare:
            rc, stdout, stderr, timed_out = _launch([unshare, "--net", "--"] + argv, env, root, work, timeout_s)
            # A container without CAP_SYS_ADMIN cannot make namespaces; the code never ran then, and
            # runs again without one (the audit hook still refuses sockets).
            if rc == 1 and stderr.startswith("unshare: unshare failed"):
                rc = None
        if rc is None:
            rc, stdout, stderr, timed_out = _launch(argv, env, root, work, timeout_s)
        if rc == _SETUP_FAILED and stderr.startswith("sandbox setup failed:"):
            raise ChibiError(stderr.strip())
        error = _describe_failure(rc, timed_out, timeout_s, stderr)
        return SandboxResult(ok=error is None, returncode=rc, stdout=stdout, stderr=stderr, timed_out=timed_out, error=error)
    finally:
        shutil.rmtree(root, ignore_errors=True)
