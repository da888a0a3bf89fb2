"""Run untrusted Python (model-written code, HumanEval completions) in a confined subprocess.

What is guaranteed, and by whom. On Linux >= 5.13 with Landlock enabled (ABI >= 1) and seccomp (x86_64
or aarch64), the limits below are enforced by the KERNEL on the child process, installed by a trusted
bootstrap before the first line of user code and irrevocable afterwards (no_new_privs is set; neither a
Landlock domain nor a seccomp filter can be removed by the process that carries it):

- files (Landlock): the only writable place is the private temp dir (the cwd, also HOME and TMPDIR),
  plus /dev/null. Readable: that dir, the interpreter's own files (sys.prefix, sys.base_prefix and their
  exec_ counterparts: stdlib, lib-dynload, the venv's site-packages), the system library dirs (/lib,
  /lib64, /usr/lib, /usr/lib64: shared objects that extension modules load), /etc/ld.so.cache, the
  time-zone files and /dev/{null,zero,random,urandom}. Everything else -- /etc/shadow, ~/.ssh, /proc (so
  /proc/self/mem and /proc/<ppid>/environ), other users' files, the project tree -- fails with EACCES.
  No file may be executed (no execute right anywhere; seccomp below refuses execve first). Creating
  device nodes or sockets, even in the temp dir, fails with EACCES. Rights a kernel's Landlock ABI lacks
  are dropped, with what that costs: ABI 1 (5.13) refuses renaming/linking across directories outright,
  ABI < 3 does not cover truncate(2) (seccomp below then refuses the path form), ABI < 5 does not cover
  device ioctls, ABI >= 4 also refuses TCP bind/connect, ABI >= 6 also refuses signals to processes
  outside the sandbox (seccomp below refuses them on every ABI) and connecting to abstract unix sockets
  outside it.
- processes and network (seccomp, default allow with a deny list; foreign syscall ABIs kill):
  fork/vfork/clone without CLONE_THREAD, execve/execveat, socket() of EVERY family (AF_UNIX included;
  socketpair() stays allowed: it connects nothing outside), io_uring (it would issue socket/open
  operations past this filter), ptrace, process_vm_readv/writev, pidfd_getfd, unshare/setns, bpf,
  perf_event_open, open_by_handle_at, chmod/chown/utime/file_setattr (every form), the keyrings
  (add_key/request_key/keyctl: the user's keys are secrets no file rule covers, and a key added outlives
  the run), SysV IPC (shm*/sem*/msg*: its objects outlive the run, and other processes' are reachable by
  id), userfaultfd (a page-fault handler in user space: a kernel-exploit primitive, refused by Docker's
  default profile too) and, below Landlock ABI 3, truncate by path answer EPERM; setting or removing xattrs answers
  EOPNOTSUPP. Threads work (clone3 answers ENOSYS so libc falls back to clone, whose flags the filter
  can read). So shutil.copy, which copies the mode, fails even inside the temp dir; shutil.copyfile
  works.
- signals (seccomp, whatever the Landlock ABI): kill/tkill/tgkill only to the process's own pid (for
  tgkill: any of its own threads); pidfd_open, pidfd_send_signal, rt_sigqueueinfo/rt_tgsigqueueinfo and
  making another process an fd's SIGIO/SIGURG owner (fcntl F_SETOWN/F_SETOWN_EX, ioctl
  FIOSETOWN/SIOCSPGRP) answer EPERM. So no other process (the caller above all) can be signalled.
- other processes' limits and scheduling (seccomp): prlimit64 and sched_setaffinity/setscheduler/
  setparam/setattr only for pid 0 or the process's own pid; setpriority and ioprio_set answer EPERM.
- capabilities: the bootstrap drops every capability (relevant when run as root: no CAP_SYS_BOOT,
  CAP_MKNOD, CAP_DAC_OVERRIDE, ...); as root, `unshare --net` also puts the child in an empty network
  namespace where the kernel allows it.
- resources (rlimits, any POSIX): CPU seconds, address space (memory), file size (which also caps
  stdout/stderr: they are files, not pipes), open files, no core dumps; a wall-clock timeout kills the
  whole process group. The child gets a fresh `python -I` (no site-customisation from the user's env) in
  a new session with a scrubbed environment (PATH, LANG, LC_ALL, HOME and TMPDIR only).
- what the caller reads back: the bootstrap says it handed over to the code on a pipe that it closes
  first, so the code's own exit status and stderr never pass for a setup failure (a ChibiError, which
  ends the stage running the code) nor for unshare's failure (which would run the code again, outside
  the network namespace).

A second, in-process layer: a `sys.addaudithook` hook refuses writes, removals, renames and links
outside the temp dir, sockets, ctypes, subprocess/exec/system, os.kill of other processes, fd owners
(fcntl F_SETOWN, ioctl FIOSETOWN) and setrlimit (os.pidfd_open and signal.pidfd_send_signal raise no
audit event: only seccomp refuses them).
Its state lives in its default arguments (immutable tuples), not in globals that user code could rebind
through `import __main__` (which names the user's own module); replacing its defaults or code object is
itself refused. It is NOT a security boundary -- it runs in the same interpreter as the code it watches
(realpath's helpers, for one, are plain module globals) -- it turns most mistakes into a readable
PermissionError naming the sandbox. The guarantee above comes from the kernel layer alone;
tests/test_sandbox.py proves every refusal with the hook switched off.

Comparison with HumanEval's own `execution.py`: its `reliability_guard` sets memory rlimits and then
replaces destructive functions (os.system, os.fork, os.remove, shutil.rmtree, subprocess.Popen, ...)
with None in the very interpreter that runs the completion, and its docstring warns that it is NOT a
security sandbox. Code reaches the same operations another way (the `posix` module behind `os`,
`importlib.reload(os)`, plain `open` for writing anywhere), and nothing confines reads or the network.
Ours does not depend on what the code does in its own interpreter, on kernels that offer Landlock and
seccomp.

Elsewhere (no Landlock: Linux < 5.13, Landlock not in the LSM list, or not Linux; no seccomp: another
architecture or OS), only the audit hook and rlimits (plus RLIMIT_NPROC against fork bombs when not
root; as root without seccomp the bootstrap refuses to run at all) remain: `run_python` then refuses
with a ChibiError naming what is missing, unless the caller accepted the weaker sandbox
(`allow_weak=True`, or CHIBICHAT_ALLOW_WEAK_SANDBOX=1 in the environment, which the stages'
--allow-weak-sandbox flag sets). `sandbox_support()` reports what this kernel offers;
CHIBICHAT_SANDBOX_SIMULATE=no-landlock,no-seccomp makes it report a layer as missing (and the child then
runs without it), and landlock-abi=N makes it use at most Landlock ABI N, to test those paths on a
kernel that has everything.

The threat model is our own small model's code and benchmark completions; kernel exploits are out of
scope, and so is reading the metadata (stat, directory existence) of files, which Landlock does not
restrict.
"""

from __future__ import annotations

import math
import os
import platform
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
ALLOW_WEAK_ENV = "CHIBICHAT_ALLOW_WEAK_SANDBOX"  # "1" = the user accepted a sandbox without the kernel layer
SIMULATE_ENV = "CHIBICHAT_SANDBOX_SIMULATE"  # comma list of no-landlock, no-seccomp, landlock-abi=N (tests)
LAYERS = ("landlock", "seccomp", "netns", "audit")  # what run_python(layers=...) may switch
_SECCOMP_ARCHES = ("x86_64", "aarch64")  # the machines the bootstrap's filter knows syscall numbers for
_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on x86_64 and aarch64


@dataclass(frozen=True)
class SandboxSupport:
    """What this kernel offers the sandbox (see the module docstring for what each layer enforces)."""

    landlock_abi: int  # 0 = no Landlock
    seccomp: bool

    @property
    def strong(self) -> bool:
        return self.landlock_abi >= 1 and self.seccomp

    def missing(self) -> list[str]:
        out = []
        if self.landlock_abi < 1:
            out.append("Landlock (Linux >= 5.13 with landlock in the kernel's lsm= list): files are not confined")
        if not self.seccomp:
            out.append(f"seccomp (Linux on {'/'.join(_SECCOMP_ARCHES)}): fork/exec/sockets are not refused")
        return out

    def describe(self) -> str:
        if self.strong:
            return f"kernel-enforced sandbox: Landlock ABI {self.landlock_abi} + seccomp"
        return "WEAK sandbox, missing " + "; ".join(self.missing())


def _simulated(env) -> tuple[int | None, bool]:
    """(Landlock ABI cap or None, hide seccomp) from CHIBICHAT_SANDBOX_SIMULATE."""
    raw = env.get(SIMULATE_ENV, "")
    cap, no_seccomp = None, False
    for item in (s.strip() for s in raw.split(",") if s.strip()):
        if item == "no-landlock":
            cap = 0
        elif item == "no-seccomp":
            no_seccomp = True
        elif item.startswith("landlock-abi=") and item.partition("=")[2].isdigit() and int(item.partition("=")[2]) >= 1:
            cap = int(item.partition("=")[2])
        else:
            raise ChibiError(f"{SIMULATE_ENV}={raw!r}: unknown item {item!r}; use a comma list of no-landlock, "
                             "no-seccomp, landlock-abi=N (N >= 1: use at most that Landlock ABI)")
    return cap, no_seccomp


def sandbox_support(env=None) -> SandboxSupport:
    """Probe the running kernel (Landlock ABI version, seccomp filter support) without confining anything.

    `env` (default os.environ) may simulate missing layers, or an older Landlock ABI, through
    CHIBICHAT_SANDBOX_SIMULATE; the sandbox then runs with what is reported.
    """
    cap, no_seccomp = _simulated(os.environ if env is None else env)
    abi, seccomp = 0, False
    if sys.platform == "linux":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) answers the ABI version.
        v = libc.syscall(ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
        abi = max(0, int(v))
        # PR_GET_SECCOMP answers 0 (not in seccomp mode) or 2 (already filtered: filters stack); -1/EINVAL
        # = a kernel without seccomp.
        seccomp = platform.machine() in _SECCOMP_ARCHES and libc.prctl(21, 0, 0, 0, 0) in (0, 2)
    if cap is not None:
        abi = min(abi, cap)
    if no_seccomp:
        seccomp = False
    return SandboxSupport(landlock_abi=abi, seccomp=seccomp)


def weak_allowed(env=None) -> bool:
    return (os.environ if env is None else env).get(ALLOW_WEAK_ENV, "") == "1"


@dataclass
class SandboxResult:
    ok: bool  # exited with status 0 within the time limit
    returncode: int  # negative = killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    error: str | None  # why it is not ok, in words; None when ok


# The bootstrap runs first inside the sandboxed interpreter: it is trusted code. argv: code_path work_dir
# memory_bytes cpu_seconds fsize_bytes nofile nproc setup_failed_status use_landlock use_seccomp use_hook
# ready_fd
_BOOTSTRAP = r'''
import os, sys, resource
code_path, work = sys.argv[1], os.path.realpath(sys.argv[2])
mem, cpu, fsize, nofile, nproc, setup_failed, use_landlock, use_seccomp, use_hook, ready = (
    int(a) for a in sys.argv[3:13])
with open(code_path, encoding="utf-8") as f:
    source = f.read()
sys.argv = ["main.py"]

def fail(msg):
    sys.stderr.write("sandbox setup failed: " + msg + "\n")
    sys.stderr.flush()
    os._exit(setup_failed)

for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                 (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (val, val))

def confine(work, use_landlock, use_seccomp, fail):
    """no_new_privs, then Landlock, drop capabilities, then seccomp. Any failure ends the process.
    Returns whether the seccomp filter is in place (False: not Linux, or not asked for)."""
    if sys.platform != "linux":
        return False
    import ctypes, platform, stat, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    L = ctypes.c_long

    def check(rc, what):
        if rc < 0:
            e = ctypes.get_errno()
            fail(f"{what}: {os.strerror(e)} (errno {e})")
        return rc

    check(libc.prctl(38, L(1), L(0), L(0), L(0)), "prctl(PR_SET_NO_NEW_PRIVS)")
    machine = platform.machine()
    abi = 0
    if use_landlock:
        # use_landlock is the highest ABI to use (the kernel's, or lower to test older kernels' rules)
        abi = min(use_landlock, check(libc.syscall(L(444), None, L(0), L(1)), "Landlock ABI query"))
        # Filesystem access rights, in the order of the kernel's bit numbers; later ABIs add bits.
        EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
        MAKE_CHAR, MAKE_SOCK, MAKE_BLOCK = 1 << 6, 1 << 9, 1 << 11
        REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
        handled = (1 << 13) - 1  # ABI 1: bits 0..12
        handled |= (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0) | (IOCTL_DEV if abi >= 5 else 0)
        file_only = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
        handled_net = 3 if abi >= 4 else 0  # TCP bind + connect, no port allowed
        scoped = 3 if abi >= 6 else 0  # abstract unix sockets + signals outside the domain
        size = 8 if abi < 4 else 16 if abi < 6 else 24  # struct landlock_ruleset_attr as this ABI knows it
        attr = ctypes.create_string_buffer(struct.pack("=QQQ", handled, handled_net, scoped)[:size], size)
        ruleset = check(libc.syscall(L(444), attr, L(size), L(0)), "landlock_create_ruleset")
        read = READ_FILE | READ_DIR
        rules = [(work, handled & ~(EXECUTE | MAKE_CHAR | MAKE_BLOCK | MAKE_SOCK | IOCTL_DEV), True),
                 ("/dev/null", READ_FILE | WRITE_FILE | TRUNCATE, True)]
        rules += [(p, READ_FILE, True) for p in ("/dev/zero", "/dev/random", "/dev/urandom")]
        rules += [(p, read, True) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}]
        rules += [(p, read, False) for p in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/share/zoneinfo",
                                             "/etc/ld.so.cache", "/etc/localtime")]
        for path, rights, required in rules:
            if os.path.realpath(path) == "/":
                fail(f"refusing to allow all of / (from {path!r})")
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                if required:
                    fail(f"{path} does not exist")
                continue
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                rights &= file_only
            rule = ctypes.create_string_buffer(struct.pack("=Qi", rights & handled, fd), 12)
            check(libc.syscall(L(445), L(ruleset), L(1), rule, L(0)), f"landlock_add_rule({path})")
            os.close(fd)
        check(libc.syscall(L(446), L(ruleset), L(0)), "landlock_restrict_self")
        os.close(ruleset)
    # No capabilities left (matters as root): capset(v3 header for this process, all sets empty).
    hdr = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0), 8)
    check(libc.capset(hdr, ctypes.create_string_buffer(24)), "capset (dropping capabilities)")
    if not use_seccomp:
        return False
    EPERM, ENOSYS, EOPNOTSUPP = 1, 38, 95
    common = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "pidfd_getfd": 438,
              "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466, "file_setattr": 469,
              "pidfd_open": 434, "pidfd_send_signal": 424}
    # Syscalls the filter decides on an argument (below), not on the number alone.
    by_arg_names = ("clone", "kill", "tkill", "tgkill", "fcntl", "ioctl", "prlimit64", "sched_setaffinity",
                    "sched_setscheduler", "sched_setparam", "sched_setattr")
    table = {
        "x86_64": (0xC000003E, dict(common, kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129,
                   rt_tgsigqueueinfo=297, fcntl=72, ioctl=16, setpriority=141, ioprio_set=251, prlimit64=302,
                   sched_setaffinity=203, sched_setscheduler=144, sched_setparam=142, sched_setattr=314,
                   clone=56, clone3=435, fork=57, vfork=58, execve=59, execveat=322,
                   socket=41, ptrace=101, process_vm_readv=310, process_vm_writev=311, unshare=272, setns=308,
                   bpf=321, perf_event_open=298, open_by_handle_at=304, chmod=90, fchmod=91, fchmodat=268,
                   chown=92, fchown=93, lchown=94, fchownat=260, utime=132, utimes=235, futimesat=261,
                   utimensat=280, truncate=76, setxattr=188, lsetxattr=189, fsetxattr=190, removexattr=197,
                   lremovexattr=198, fremovexattr=199, add_key=248, request_key=249, keyctl=250, shmget=29,
                   shmat=30, shmctl=31, shmdt=67, semget=64, semop=65, semctl=66, semtimedop=220, msgget=68,
                   msgsnd=69, msgrcv=70, msgctl=71, userfaultfd=323)),
        "aarch64": (0xC00000B7, dict(common, kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138,
                    rt_tgsigqueueinfo=240, fcntl=25, ioctl=29, setpriority=140, ioprio_set=30, prlimit64=261,
                    sched_setaffinity=122, sched_setscheduler=119, sched_setparam=118, sched_setattr=274,
                    clone=220, clone3=435, execve=221, execveat=281, socket=198,
                    ptrace=117, process_vm_readv=270, process_vm_writev=271, unshare=97, setns=268, bpf=280,
                    perf_event_open=241, open_by_handle_at=265, fchmod=52, fchmodat=53, fchown=55,
                    fchownat=54, utimensat=88, truncate=45, setxattr=5, lsetxattr=6, fsetxattr=7,
                    removexattr=14, lremovexattr=15, fremovexattr=16, add_key=217, request_key=218, keyctl=219,
                    msgget=186, msgctl=187, msgrcv=188, msgsnd=189, semget=190, semctl=191, semtimedop=192,
                    semop=193, shmget=194, shmctl=195, shmat=196, shmdt=197, userfaultfd=282)),
    }
    if sys.platform != "linux" or machine not in table:
        return False
    arch, nrs = table[machine]
    deny = [(nr, ENOSYS if name == "clone3" else EOPNOTSUPP if "xattr" in name else EPERM)
            for name, nr in nrs.items() if name not in by_arg_names and not (name == "truncate" and abi >= 3)]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    KILL, ALLOW, ERRNO, CLONE_THREAD = 0x80000000, 0x7FFF0000, 0x00050000, 0x00010000
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if machine == "x86_64":  # x32 ABI numbers alias the real ones: refuse them outright
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]
    for nr, errno in deny:
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, ERRNO | errno)]
    # Signals reach only this process: kill/tkill/tgkill with its own pid first (tgkill: its thread group;
    # kill(0)/kill(-1)/another pid are refused), and no fd may name another process as its SIGIO owner
    # (F_SETOWN 8, F_SETOWN_EX 15, FIOSETOWN 0x8901, SIOCSPGRP 0x8902). The kernel reads these arguments
    # as 32-bit ints: the low half of each 64-bit slot (little-endian) is what it acts on.
    me = os.getpid()
    by_arg = [(nrs[n], 0, (me,), ALLOW, ERRNO | EPERM) for n in ("kill", "tkill", "tgkill")]
    # Nor may it change another process's limits or scheduling (pid 0 or its own pid only: a lowered
    # RLIMIT or priority of the caller is a denial of service); setpriority and ioprio_set, which can also
    # name a process group or a user, are refused outright (nothing in a calculation needs them).
    by_arg += [(nrs[n], 0, (0, me), ALLOW, ERRNO | EPERM)
               for n in ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr")]
    by_arg += [(nrs["fcntl"], 1, (8, 15), ERRNO | EPERM, ALLOW),
               (nrs["ioctl"], 1, (0x8901, 0x8902), ERRNO | EPERM, ALLOW)]
    for nr, arg, values, hit, miss in by_arg:  # hit: the argument is one of values; miss: it is not
        m = len(values)
        prog += [(JEQ, 0, m + 3, nr), (LD, 0, 0, 16 + 8 * arg)]  # seccomp_data.args[arg]
        prog += [(JEQ, m - j, 0, v) for j, v in enumerate(values)]
        prog += [(RET, 0, 0, miss), (RET, 0, 0, hit)]
    # clone: only with CLONE_THREAD (a thread), read from the low half of the first argument
    prog += [(JEQ, 0, 3, nrs["clone"]), (LD, 0, 0, 16), (JSET, 1, 0, CLONE_THREAD),
             (RET, 0, 0, ERRNO | EPERM), (RET, 0, 0, ALLOW)]
    buf = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog), 8 * len(prog))
    fprog = ctypes.create_string_buffer(struct.pack("@HP", len(prog), ctypes.addressof(buf)),
                                        struct.calcsize("@HP"))  # struct sock_fprog
    check(libc.prctl(22, L(2), fprog, L(0), L(0)), "prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)")
    return True

# use_seccomp: 1 = install the filter, 2 = wanted but the kernel lacks it, 0 = left out by the caller (tests)
if not confine(work, use_landlock, use_seccomp == 1, fail):
    if os.getuid() == 0 and use_seccomp == 2:
        fail("cannot forbid process creation as root without seccomp (RLIMIT_NPROC does not bind root); "
             "run as a non-root user")
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
    del sys.modules[name]

def make_hook(work, my_pid):
    """The audit hook, with all its state in default arguments (tuples and strings: immutable)."""
    own_code = tuple(c for c in sys._getframe().f_code.co_consts if type(c) is type(make_hook.__code__))
    def inside(path, _work=work, _sep=os.sep, _devnull=os.devnull, _realpath=os.path.realpath,
               _fsdecode=os.fsdecode, _isinstance=isinstance, _int=int):
        if _isinstance(path, _int):
            return True  # an fd: it was opened through a checked path
        p = _realpath(_fsdecode(path))
        return p == _work or p.startswith(_work + _sep) or p == _devnull

    def hook(event, args, _inside=inside, _pid=my_pid,
             _wflags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
             _path_events=(("os.remove", (0,)), ("os.rmdir", (0,)), ("os.mkdir", (0,)), ("os.chmod", (0,)),
                           ("os.chown", (0,)), ("os.utime", (0,)), ("os.truncate", (0,)), ("os.rename", (0, 1)),
                           ("os.link", (0, 1)), ("os.symlink", (1,)), ("os.setxattr", (0,)),
                           ("os.removexattr", (0,)), ("os.chflags", (0,)), ("os.lchflags", (0,)),
                           ("shutil.rmtree", (0,)), ("os.mkfifo", (0,)), ("os.mknod", (0,))),
             _blocked=("socket.", "ctypes.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                       "os.forkpty", "subprocess.", "resource.setrlimit", "resource.prlimit", "os.killpg", "pty.",
                       "os.chroot", "os.setuid", "os.setgid", "os.setre", "os.setgroups", "sys.settrace",
                       "sys.setprofile", "threading.settrace", "threading.setprofile"),
             _func_slots=("__code__", "__defaults__", "__kwdefaults__"),
             _owner_cmds=(8, 15, 0x8901, 0x8902),  # F_SETOWN, F_SETOWN_EX, FIOSETOWN, SIOCSPGRP
             _own_code=own_code, _getattr=getattr, _PermissionError=PermissionError, _bool=bool, _any=any,
             _len=len):
        if event == "open":
            path, mode, flags = args
            writing = _bool((flags or 0) & _wflags) or (mode is not None and _any(c in mode for c in "wax+"))
            if writing and not _inside(path):
                raise _PermissionError(f"sandbox: writing outside the sandbox directory is not allowed: {path!r}")
            return
        for name, idx in _path_events:
            if event == name:
                for i in idx:
                    if i < _len(args) and args[i] is not None and not _inside(args[i]):
                        raise _PermissionError(f"sandbox: {event} outside the sandbox directory is not allowed: "
                                               f"{args[i]!r}")
                return
        if event == "os.kill":
            if args[0] != _pid:
                raise _PermissionError("sandbox: signalling other processes is not allowed")
        elif event in ("fcntl.fcntl", "fcntl.ioctl") and _len(args) > 1 and args[1] in _owner_cmds:
            raise _PermissionError("sandbox: setting an fd's signal owner is not allowed")
        elif event == "import" and (args[0] == "ctypes" or args[0].startswith(("ctypes.", "_ctypes"))):
            raise _PermissionError("sandbox: ctypes is not allowed")
        elif (event == "object.__setattr__" and _len(args) > 1 and args[1] in _func_slots
              and _any(_getattr(args[0], "__code__", None) is c for c in _own_code)):
            raise _PermissionError(f"sandbox: replacing the audit hook's {args[1]} is not allowed")
        elif event == "socket.__new__" and _len(args) > 1 and args[1] == 1:
            return  # AF_UNIX: socketpair() builds these; socket(AF_UNIX) itself is refused by seccomp
        elif event.startswith(_blocked):
            raise _PermissionError(f"sandbox: {event} is not allowed")

    return hook

if use_hook:
    sys.addaudithook(make_hook(work, os.getpid()))
import types
main = types.ModuleType("__main__")  # `import __main__` in user code names the user's module, not this one
main.__dict__["__builtins__"] = __builtins__
sys.modules["__main__"] = main
code = compile(source, "main.py", "exec")
# Confined, and the code is next: say so on the pipe, then close it, so that the code never holds it. Its
# exit status and stderr are the code's to choose from here on; only this byte tells the caller that
# the setup (and `unshare`) got this far.
os.write(ready, b"1")
os.close(ready)
del source, confine, make_hook, fail, resource, types, ready
exec(code, main.__dict__)
'''


def _describe_failure(rc: int, timed_out: bool, timeout_s: float, stderr: str) -> str | None:
    if timed_out:
        return f"timed out after {timeout_s:g} s (wall clock)"
    if rc == 0:
        return None
    if rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file/output size limit", "SIGKILL": "killed",
               "SIGSEGV": "crashed (possibly out of memory)", "SIGSYS": "forbidden system call ABI"}.get(
                   sig, "killed by a signal")
        return f"{why} ({sig})"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return f"exit status {rc}" + (f": {last}" if last else "")


def _launch(argv, env, root: Path, work: Path, timeout_s: float):
    """Run argv (the bootstrap's arguments but its ready_fd, which this appends) with files for
    stdin/stdout/stderr; returns (returncode, stdout, stderr, timed_out, started). started: the bootstrap
    confined the process and handed over to the code (the byte it writes on a pipe the code never holds)."""
    ready_r, ready_w = os.pipe()
    try:
        with (open(root / "stdin", "rb") as fin, open(root / "stdout", "wb") as fout,
              open(root / "stderr", "wb") as ferr):
            try:
                proc = subprocess.Popen(argv + [str(ready_w)], cwd=work, env=env, stdin=fin, stdout=fout,
                                        stderr=ferr, start_new_session=True, close_fds=True,
                                        pass_fds=(ready_w,))  # fmt: skip
            finally:
                os.close(ready_w)
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
        os.set_blocking(ready_r, False)  # the process is gone: never wait for a writer that should not exist
        try:
            started = os.read(ready_r, 1) == b"1"
        except BlockingIOError:
            started = False
    finally:
        os.close(ready_r)
    stdout = (root / "stdout").read_bytes().decode("utf-8", errors="replace")
    stderr = (root / "stderr").read_bytes().decode("utf-8", errors="replace")
    return proc.returncode, stdout, stderr, timed_out, started


def _weak_refusal(what: str, support: SandboxSupport) -> ChibiError:
    return ChibiError(
        f"{what} runs model-written code, but this kernel cannot confine it: missing "
        + "; ".join(support.missing())
        + ". Only an in-process audit hook (which code can get around) and rlimits would hold. Pass "
        f"--allow-weak-sandbox (or set {ALLOW_WEAK_ENV}=1) to accept that, or run on Linux >= 5.13 with "
        "Landlock and seccomp."
    )


def check_sandbox(allow_weak: bool, what: str) -> SandboxSupport:
    """Preflight for a stage about to run code (`what`, e.g. "chat --tools python"), before any model loads.

    Refuses a weak sandbox unless accepted; an acceptance is recorded in the environment
    (CHIBICHAT_ALLOW_WEAK_SANDBOX=1) so that every later run_python of this process, and of the workers
    it starts, honours it. Prints one warning line when the sandbox is weak.
    """
    support = sandbox_support()
    if support.strong:
        return support
    if not (allow_weak or weak_allowed()):
        raise _weak_refusal(what, support)
    os.environ[ALLOW_WEAK_ENV] = "1"
    print(f"warning: {what}: {support.describe()}; running anyway as asked", file=sys.stderr)
    return support


def add_allow_weak_arg(p) -> None:
    """--allow-weak-sandbox, for the stages that may run model-written code."""
    p.add_argument("--allow-weak-sandbox", action="store_true",
                   help="run model-written code even where the kernel offers no Landlock/seccomp (then only an "
                        "in-process audit hook and rlimits confine it; default: refuse)")  # fmt: skip


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512, stdin: str = "", *,
               allow_weak: bool | None = None, layers=None) -> SandboxResult:  # fmt: skip
    """Run `code` as a script in a confined fresh interpreter and report what happened.

    `timeout_s` bounds wall time (and, rounded up, CPU time); `memory_mb` bounds the address space.
    Raises ChibiError when the kernel lacks Landlock or seccomp and the weaker sandbox was not accepted
    (`allow_weak`, default: CHIBICHAT_ALLOW_WEAK_SANDBOX=1 in the environment). `layers` (tests only)
    names the layers to use, a subset of LAYERS; None = all. The rlimits and the timeout always apply.
    """
    if not isinstance(code, str):
        raise ChibiError("sandbox code must be a str")
    if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s <= 3600):
        raise ChibiError(f"sandbox timeout_s must be in (0, 3600] seconds, got {timeout_s!r}")
    if not (isinstance(memory_mb, int) and 64 <= memory_mb <= 1 << 20):
        raise ChibiError(f"sandbox memory_mb must be an int >= 64 (the interpreter needs it), got {memory_mb!r}")
    wanted = set(LAYERS if layers is None else layers)
    if not wanted <= set(LAYERS):
        raise ChibiError(f"sandbox layers must be a subset of {LAYERS}, got {sorted(wanted)}")
    support = sandbox_support()
    use_landlock = "landlock" in wanted and support.landlock_abi >= 1
    use_seccomp = "seccomp" in wanted and support.seccomp
    lacking = SandboxSupport(landlock_abi=support.landlock_abi if "landlock" in wanted else 1,
                             seccomp=support.seccomp or "seccomp" not in wanted)
    if not lacking.strong and not (weak_allowed() if allow_weak is None else allow_weak):
        raise _weak_refusal("the python sandbox", lacking)

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
            str(support.landlock_abi if use_landlock else 0),
            str(1 if use_seccomp else 2 if "seccomp" in wanted else 0),
            str(int("audit" in wanted)),
        ]  # fmt: skip
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        unshare = shutil.which("unshare")
        rc = None
        if "netns" in wanted and os.geteuid() == 0 and sys.platform == "linux" and unshare:
            rc, stdout, stderr, timed_out, started = _launch([unshare, "--net", "--"] + argv, env, root, work,
                                                             timeout_s)  # fmt: skip
            # A container without CAP_SYS_ADMIN cannot make namespaces; the code never ran then, and
            # runs again without one (seccomp and Landlock still refuse sockets). Code that did run may
            # print the same words: it does not run a second time, outside the namespace.
            if not started and rc == 1 and stderr.startswith("unshare: unshare failed"):
                rc = None
        if rc is None:
            rc, stdout, stderr, timed_out, started = _launch(argv, env, root, work, timeout_s)
        # Only the bootstrap, before it hands over, fails this way; the same words from the code are its
        # result (a ChibiError here ends the whole stage that runs it, an eval or a chat).
        if not started and rc == _SETUP_FAILED and stderr.startswith("sandbox setup failed:"):
            raise ChibiError(stderr.strip())
        error = _describe_failure(rc, timed_out, timeout_s, stderr)
        return SandboxResult(ok=error is None, returncode=rc, stdout=stdout, stderr=stderr, timed_out=timed_out,
                             error=error)
    finally:
        shutil.rmtree(root, ignore_errors=True)
