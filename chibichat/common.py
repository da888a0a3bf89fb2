"""Things every layer needs: the user-facing error type, the artifact home, atomic writes, and the
runtime (device, compute dtype, distributed rank) that is passed around as a value.

Nothing here runs at import time; torch is imported inside the functions that need it so that
`chibichat --help` stays fast and import never touches a GPU.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


class ChibiError(Exception):
    """An error caused by the user's input or environment.

    The message must name the thing that is wrong and say how to fix it. The CLI prints it
    without a traceback and exits with status 2.
    """


# ----------------------------------------------------------------------------------------------
# The artifact home

DEFAULT_HOME = Path("~/.cache/chibichat")


@dataclass(frozen=True)
class Home:
    """Where every artifact lives. Layout (documented in the README):

    tokenizer/                     the trained tokenizer (tokenizer.json + tokenizer.tiktoken)
    tokenizer.bak-<hash12>/        a tokenizer that checkpoints use, replaced by `tokenizer train --overwrite`
    data/<corpus>/                 downloaded corpus shards
    checkpoints/<stage>/<tag>/     step_XXXXXX/ directories, one per saved step
    eval/<stage>/<tag>/            per-item results and summaries of evaluations
    report/                        report.md and its plots
    """

    root: Path

    @staticmethod
    def resolve(arg: str | os.PathLike | None = None) -> "Home":
        # An empty --home (e.g. `--home "$DIR"` with DIR unset) is refused, not taken for "not given".
        if arg is not None and not str(arg).strip():
            raise ChibiError("--home is empty; pass a directory, or leave --home out for $CHIBICHAT_HOME "
                             "(default ~/.cache/chibichat)")
        raw = arg or os.environ.get("CHIBICHAT_HOME") or DEFAULT_HOME
        return Home(Path(raw).expanduser().resolve())

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def checkpoints_dir(self, stage: str, tag: str) -> Path:
        return self.root / "checkpoints" / stage / tag

    def eval_dir(self, stage: str, tag: str) -> Path:
        return self.root / "eval" / stage / tag

    @property
    def report_dir(self) -> Path:
        return self.root / "report"


def add_home_arg(parser) -> None:
    """Every subcommand takes --home the same way."""
    parser.add_argument(
        "--home",
        default=None,
        help="artifact home (default: $CHIBICHAT_HOME or ~/.cache/chibichat)",
    )


def check_home(home: Home, need_bytes: int = 0, what: str = "this stage") -> None:
    """Refuse, before any work is done, a home the stage could not write its artifacts to: a path
    that is a file or lies under one, a directory that is not writable (read-only file system,
    /proc, no permission), or one whose disk has less free space than `need_bytes` (the caller's
    estimate of what it writes).

    Nothing is left behind: a missing home is not created here (the stage creates it when it first
    writes); writability is probed by creating and removing a temp file in the home or, when it
    does not exist yet, in its nearest existing parent (where mkdir would have to write). The probe
    is an actual write, so it holds for root too, who passes every permission-bit check.
    """
    root = home.root
    if root.exists() and not root.is_dir():
        raise ChibiError(f"--home {root} is a file, not a directory; pass a directory (it is created when missing)")
    probe = _nearest_existing(root)
    if not probe.is_dir():
        raise ChibiError(f"--home {root} cannot be created: {probe} is a file, not a directory; pass another --home")
    try:
        _probe_write(probe)
    except OSError as e:
        where = "" if probe == root else f" (it does not exist and {probe} cannot be written to)"
        raise ChibiError(f"--home {root} is not writable{where}: {e.strerror} (errno {e.errno}); pass a directory "
                         f"you can write to (--home or $CHIBICHAT_HOME)") from None
    if need_bytes > 0:
        free = shutil.disk_usage(probe).free
        if free < need_bytes:
            raise ChibiError(f"--home {root} has {free / 1e6:,.1f} MB free, but {what} writes about "
                             f"{need_bytes / 1e6:,.1f} MB; free some space on that disk or pass another --home")


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest existing parent: where creating `path` would have to write."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_write(directory: Path) -> None:
    """Create and remove a temp file in `directory`; OSError where it cannot be written. An actual write, so it
    holds for root too, who passes every permission-bit check."""
    fd, tmp = tempfile.mkstemp(prefix=".chibichat-write-test-", dir=directory)
    os.close(fd)
    os.unlink(tmp)


def check_output(path: str | os.PathLike, flag: str, folder: bool = False) -> None:
    """Refuse, before any work is done, an output path (the value of `flag`) that the end of the run could not
    write its results to: a directory where a file goes (folder=False) or a file where a folder goes, a path
    under a file, or a folder that is not writable (probed as check_home does). Nothing is created."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ChibiError(f"{flag} {path} is a {'file' if folder else 'directory'}; pass "
                         f"{'a directory (it is created when missing)' if folder else 'the path of a file'}")
    probe = _nearest_existing(path if folder else path.parent)
    if not probe.is_dir():
        raise ChibiError(f"{flag} {path} cannot be written: {probe} is a file, not a directory; pass another {flag}")
    try:
        _probe_write(probe)
    except OSError as e:
        raise ChibiError(f"{flag} {path} cannot be written: {probe} is not writable: {e.strerror} (errno "
                         f"{e.errno}); pass another {flag}") from None


def checkpoint_bytes(num_params: int, saves: int, keep_last: int) -> int:
    """An upper estimate of the disk a training run's checkpoints take at their peak: fp32 weights
    plus optimizer state (at most two fp32 moments per parameter) per step directory, for the steps
    kept at once (keep_last, plus the new one written before the oldest is deleted; 0 keeps all)."""
    per = 4 * num_params * 3 + (1 << 16)  # + the JSON files
    kept = saves if keep_last <= 0 else min(saves, keep_last + 1)
    return per * max(1, kept)


# ----------------------------------------------------------------------------------------------
# Atomic writes: nothing written is ever left half-written.


# OS errors that only a write can raise, and only because of where it writes (full disk, quota,
# read-only file system): the CLI turns them into a ChibiError wherever they come from. The atomic
# writers turn every OS error into one, since everything they do is a write.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def write_error(path: str | os.PathLike | None, e: OSError) -> ChibiError:
    """A failed write as a ChibiError naming the path, the OS's reason and what to do about it."""
    reason = e.strerror or str(e)
    fix = {
        errno.ENOSPC: "free some space on that disk or pass another --home",
        errno.EDQUOT: "free some of your disk quota or pass another --home",
        errno.EROFS: "that file system is read-only; pass a writable --home",
        errno.EACCES: "you may not write there; fix its permissions or pass another --home",
        errno.EPERM: "you may not write there; fix its permissions or pass another --home",
    }.get(e.errno, "check the path (and --home)")
    where = f" {path}" if path is not None else ""
    return ChibiError(f"cannot write{where}: {reason} (errno {e.errno}); {fix}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file whole or not at all (temp file `.<name>.<pid>-*.tmp` + fsync + rename), with the mode a
    plain open() would give it. An OS error (full disk, read-only, no permission) is a ChibiError naming the
    path; the previous content of `path`, if any, is left untouched. A temp file that a killed write of
    `path` left is dropped first (drop_leftovers)."""
    path = Path(path)
    tmp = None
    try:
        drop_leftovers(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        # mkstemp creates 0600; give the file the mode a plain open() would have (0666 & ~umask).
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_renamed(path)  # the rename itself survives a power loss
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory `path` durable (a file created, renamed or removed in it): without
    this, a power loss after a rename can leave the old name or none. Skipped on Windows, where a
    directory cannot be opened with os.open, and on file systems that refuse fsync on a directory."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_renamed(path: Path) -> None:
    """fsync_dir(path.parent) after `path` was renamed into place. A failure there cannot undo the rename:
    `path` is in place and complete, and only its surviving a power loss is unconfirmed, so it is a
    warning on stderr, not an error that would report the write as failed."""
    try:
        fsync_dir(path.parent)
    except OSError as e:
        eprint(f"warning: {path} was written, but the fsync of its folder failed ({e.strerror or e} (errno "
               f"{e.errno})), so it may not survive a power loss; check that disk")


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a directory so that no crash leaves part of it under its name: it is first renamed to a
    hidden `.old-<name>-<pid>` sibling (readers ignore those; the training loop removes leftover
    `.old-step_*` and `.old-.aside-step_*`, the next atomic_directory of that name its own: drop_leftovers),
    then removed. An OS error is a ChibiError naming what is left and where."""
    path = Path(path)
    trash = path.parent / f".old-{path.name}-{os.getpid()}"
    try:
        os.replace(path, trash)
    except OSError as e:
        raise ChibiError(f"cannot remove {path}: {e.strerror or e} (errno {e.errno}); it is unchanged. Fix the "
                         f"permissions of {path.parent} or delete {path} by hand") from None
    try:
        fsync_dir(path.parent)
    except OSError as e:
        # Deleting it now could let a power loss bring it back under its name with part of it gone.
        raise ChibiError(f"cannot remove {path}: it was renamed to {trash}, but the fsync of {path.parent} then "
                         f"failed: {e.strerror or e} (errno {e.errno}), so it was not deleted. No reader takes "
                         f"{trash} for it: rename it back to {path} to keep it, or delete it by hand; check that "
                         "disk") from None
    try:
        shutil.rmtree(trash)
    except OSError as e:
        raise ChibiError(f"cannot finish removing {path}: {e.strerror or e} (errno {e.errno}). It is gone under "
                         f"its name; what is left of it is in {trash}, which no reader takes for it: delete that "
                         f"by hand") from None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode a plain open() gives a new file (0666 & ~umask): for files written by a library that
    creates them 0600 but are meant to be shared like any other tool's output."""
    return 0o666 & ~_current_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (made if missing) for the block: processes locking the same
    path take turns. `remove`: the holder deletes the file before letting go, so none is left; a process that
    then gets the lock on the deleted file sees that `path` no longer names it and locks the file now there
    (else two processes could hold locks on two files of one name). Not POSIX (no fcntl): no cross-process
    lock, the block runs as is."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
        except BaseException:
            f.close()
            raise
        f.close()  # its holder deleted it before letting go: lock the one under that name now
    try:
        yield
    finally:
        if remove:  # while still held: no other process can have locked this file
            with contextlib.suppress(OSError):  # one that cannot be deleted is left, and still works
                path.unlink()
        f.close()  # lets go of the lock


# While atomic_directory swaps a new directory in, the old one is `.aside-<name>-<pid>`. Only a whole old
# directory ever carries that name (a finished swap renames it to `.old-*` before deleting it), so
# recover_aside may put it back under its name.
ASIDE_PREFIX = ".aside-"


def _asides(final: Path) -> list[Path]:
    prefix = f"{ASIDE_PREFIX}{final.name}-"
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit())


def recover_aside(final: str | os.PathLike) -> None:
    """Finish what a crash between atomic_directory's two renames left: `final` missing and the old
    directory under its aside name, which is renamed back. With `final` present, an aside is the leftover
    of a finished swap and is deleted. Writers (atomic_directory) and readers of a replaced directory call
    this first. An OS error while renaming back is a ChibiError naming both paths.

    Several processes may call it at once (every rank of a torchrun loads the tokenizer): where there is
    an aside, they take turns on an exclusive lock (`.<name>.lock` beside `final`, made only then, so a
    read-only folder without asides is never written to, and deleted after) and each looks again under
    it, so the second finds the folder the first put back. Where no lock can be had (no fcntl, or no lock file can be made
    there), a rename that another process has already done counts as done."""
    final = Path(final)
    if not _asides(final):
        return
    with contextlib.ExitStack() as held:
        with contextlib.suppress(OSError):  # no lock file can be made there: on without one
            held.enter_context(file_lock(final.parent / f".{final.name}.lock", remove=True))
        _recover_aside(final)


def _recover_aside(final: Path) -> None:
    asides = _asides(final)
    if not asides:  # another process recovered it first
        return
    if final.exists():
        for aside in asides:
            with contextlib.suppress(ChibiError):  # junk like `.old-*`, or another process's: the next call tries again
                remove_dir(aside)
        return
    if len(asides) > 1:
        raise ChibiError(f"{final} is missing and {len(asides)} earlier versions of it were left by interrupted "
                         f"replacements: {', '.join(str(a) for a in asides)}; rename the one to keep to {final} "
                         "and delete the others")
    try:
        os.replace(asides[0], final)
        fsync_dir(final.parent)
    except OSError as e:
        if not asides[0].exists() and final.exists():  # renamed back by a process that holds no lock
            return
        raise ChibiError(f"{final} is missing (a replacement of it was interrupted) and its previous version "
                         f"{asides[0]} could not be renamed back: {e.strerror or e} (errno {e.errno}); rename "
                         f"{asides[0]} to {final} by hand") from None


def recover_asides(directory: str | os.PathLike) -> None:
    """recover_aside for every directory in `directory` that an interrupted replacement left aside."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    names = {p.name[len(ASIDE_PREFIX):].rsplit("-", 1)[0] for p in directory.iterdir()
             if p.name.startswith(ASIDE_PREFIX) and p.name.rsplit("-", 1)[-1].isdigit()}
    for name in sorted(names):
        recover_aside(directory / name)


def _pid_alive(pid: int) -> bool:
    """Whether `pid` may be a running process; True where that cannot be told (on Windows, os.kill(pid, 0)
    would send it a signal)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: it runs as another user
        return True
    return True


def drop_leftovers(final: str | os.PathLike) -> None:
    """Delete what failed deletes and killed writes of earlier versions of `final` left beside it:
    `.old-<name>-<pid>` (remove_dir), `.old-.aside-<name>-<pid>-<pid>` (remove_dir of an atomic_directory
    aside), `.tmp-<name>-<pid>-*` (atomic_directory) and `.<name>.<pid>-*.tmp` (atomic_write_bytes). Readers
    ignore them, but they may hold gigabytes. Only those exact names, and only where each pid in the name is
    no running process, or for an `.old-*` this one: another process named there may be deleting that folder
    or still writing that temp right now, and so may this one its own temp (another thread)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    name = re.escape(final.name)
    old = re.compile(rf"\.old-(?:{name}-(\d+)|{re.escape(ASIDE_PREFIX)}{name}-(\d+)-(\d+))", re.ASCII)
    # tempfile's random part is [a-z0-9_]+: with no `-` or `.` in it (nor in the pid), the name these
    # match is exactly `final`'s, never a longer one that starts with it ("d4-1" for "d4").
    tmp = re.compile(rf"\.tmp-{name}-(\d+)-[a-z0-9_]+|\.{name}\.(\d+)-[a-z0-9_]+\.tmp", re.ASCII)
    for p in final.parent.iterdir():
        if m := old.fullmatch(p.name):
            drop = all(int(pid) == os.getpid() or not _pid_alive(int(pid)) for pid in m.groups() if pid)
        elif m := tmp.fullmatch(p.name):
            pid = int(m.group(1) or m.group(2))
            drop = not _pid_alive(pid)  # so never this process's own, which may be writing it (a thread)
        else:
            continue
        if drop:  # a failure leaves it for the next call
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to `final` (replacing an old one).

    A crash inside the block leaves only a `.tmp-<name>-<pid>-*` directory that readers ignore (the next
    atomic_directory of that name drops it once that pid has ended: drop_leftovers), never a
    half-written `final`; an old `final` stays as it was until the rename. Replacing takes two renames
    (old to `.aside-<name>-<pid>`, new to `final`): a failure of the second puts the old one back, and a
    crash between them leaves the old one aside, which recover_aside (called first here and by readers)
    renames back. What failed deletes and killed writes of earlier versions left is dropped first. The
    directory gets the mode a plain mkdir would (umask honoured). An OS error while creating, filling or
    renaming it (full disk, read-only file system) is a ChibiError naming `final`.
    """
    final = Path(final)
    try:
        recover_aside(final)
        drop_leftovers(final)  # first: the disk space they hold may be needed for the new version
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
        # mkdtemp creates 0700; give the directory the mode a plain mkdir would have (0777 & ~umask).
        tmp.chmod(0o777 & ~_current_umask())
    except OSError as e:
        raise write_error(final, e) from None
    aside = None
    try:
        yield tmp
        fsync_dir(tmp)  # its entries are durable before the rename makes it visible
        if final.exists():
            aside = final.parent / f"{ASIDE_PREFIX}{final.name}-{os.getpid()}"
            os.replace(final, aside)
            try:
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):  # if this fails too, recover_aside puts it back later
                    os.replace(aside, final)
                raise
        else:
            os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(final, e) from None
        raise
    # The new directory is in place and complete: nothing after this reports the write as failed.
    fsync_renamed(final)
    if aside is not None:
        with contextlib.suppress(ChibiError):  # recover_aside drops a leftover
            remove_dir(aside)


def at_destination(e: BaseException, tmp: Path | None, final: Path) -> str:
    """The message of an error raised while writing into atomic_directory(final)'s temporary directory `tmp`
    (None: the block was not entered), with `tmp` named as `final`: a failed write has removed `tmp`, so the
    message names the files where they were going, under the folder the user knows."""
    return str(e) if tmp is None else str(e).replace(str(tmp), str(final))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (package pins and manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a clear ChibiError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChibiError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChibiError(f"{what} is corrupt ({path}): {e}. Delete it and re-create it.") from None


# ----------------------------------------------------------------------------------------------
# Runtime: device, compute dtype and distributed state, passed around as a value.


@dataclass(frozen=True)
class Runtime:
    device: Any  # torch.device
    compute_dtype: Any  # torch.dtype used for matmuls (master weights stay fp32)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device_type(self) -> str:
        return self.device.type


def gather_objects(rt: Runtime, obj) -> list:
    """Every rank's `obj`, in rank order (torch.distributed.all_gather_object); [obj] on one process."""
    if not rt.distributed:
        return [obj]
    import torch.distributed as dist

    parts: list = [None] * rt.world_size
    dist.all_gather_object(parts, obj)
    return parts


def rank_gather(rt: Runtime):
    """The `gather` argument of the rank-strided evaluations (`evaluate_core/chat/jglue`): gather_objects
    over `rt` under torchrun, None on one process."""
    return (lambda obj: gather_objects(rt, obj)) if rt.distributed else None


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


# Stages that write checkpoints, in pipeline order: what `--from` may name.
CHECKPOINT_STAGES = ("base", "mid", "sft", "rl", "dpo")


def check_at_least(args, minimum: int, *names: str) -> None:
    """ChibiError naming the first flag among `names` (argparse dests) below `minimum`; None (not given) passes."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ChibiError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def parse_str_list(text: str, flag: str) -> list[str]:
    """The entries of a comma list, spaces around each stripped ("a, b" -> ["a", "b"]; blank -> [], for the
    caller to refuse or accept); an empty entry ("a,,b", "a,") is a typo to point out, not a value to skip:
    a ChibiError naming `flag`, the value and the fix."""
    if not text.strip():
        return []
    items = [x.strip() for x in text.split(",")]
    if "" in items:
        raise ChibiError(f"{flag} has an empty entry in {text!r}: remove the extra comma")
    return items


def parse_int_list(text: str, flag: str, what: str, minimum: int, example: str) -> list[int]:
    """A comma list of distinct integers >= minimum ("2,4,6" -> [2, 4, 6], in the given order); a ChibiError
    naming `flag` and the fix otherwise."""
    entries = parse_str_list(text, flag)
    try:
        values = [int(x) for x in entries]
    except ValueError:
        raise ChibiError(f"{flag} must be a comma list of integers, e.g. {example}; got {text!r}") from None
    if not values or min(values) < minimum or len(set(values)) != len(values):
        raise ChibiError(f"{flag} must list distinct {what} >= {minimum}, got {text!r}")
    return values


def add_model_args(p, default: str = "sft") -> None:
    """--from/--tag/--step: which checkpoint to load (chat, serve, eval, bench serve)."""
    p.add_argument("--from", dest="source", default=default, choices=CHECKPOINT_STAGES,
                   help=f"checkpoint stage (default: {default})")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the most recently written one)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")


def add_runtime_args(parser) -> None:
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | mps | auto (default: auto)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="compute dtype; master weights stay fp32 (auto: bf16 on CUDA SM>=80 and on CPUs with native bf16, else fp32)",
    )


def add_fp8_arg(parser) -> None:
    """--fp8 for the training stages (pretrain, midtrain, sft, rl); checked by model.fp8.check_fp8_runtime and the model (RunConfig.fp8)."""
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="train the block matmuls in fp8 (dynamic per-tensor scales, fp32 master weights; not embedding or "
        "head). Needs --dtype bfloat16 and an SM 8.9+ GPU (CPU only for testing); eval and sampling stay bf16",
    )


def add_memory_args(parser) -> None:
    """--recompute and --trim-heap for the training stages (pretrain, midtrain, sft, rl): less peak memory
    for more compute, the same numbers (RunConfig.recompute, train.loop.release_free_heap)."""
    parser.add_argument(
        "--recompute", choices=("none", "mlp", "block"), default="none",
        help="activation recomputation in backward: none, each MLP's hidden (mlp) or everything inside a "
        "block (block); same gradients, less memory, more compute",
    )
    parser.add_argument(
        "--trim-heap", action="store_true",
        help="return freed heap memory to the OS after every optimizer step (glibc malloc_trim; less peak "
        "memory for some CPU time; a no-op without glibc)",
    )


def default_compute_dtype(device) -> Any:
    """The fastest safe compute dtype for a device.

    CUDA SM >= 80: bf16. CPU: bf16 where oneDNN has native bf16 kernels (AVX-512 BF16 / AMX: there bf16
    matrices multiply several times faster than fp32 and the loss curve matches fp32 within noise), else
    fp32: without them bf16 matmuls take a scalar fallback that is far slower than fp32 (figures of an
    AVX2-only CPU in docs/benchmarks.md). Others: fp32.
    """
    import torch

    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matmul kernels in oneDNN (what torch itself checks)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpp_compiler_name() -> tuple[str, str]:
    """(the C++ compiler torch.compile's CPU backend, inductor, builds its kernels with: $CXX, else the
    platform's default; that default: g++, clang++ on macOS, cl on Windows)."""
    default = {"darwin": "clang++", "win32": "cl"}.get(sys.platform, "g++")
    return os.environ.get("CXX") or default, default


def cpp_compiler() -> str | None:
    """The path of cpp_compiler_name() on PATH (as inductor looks it up), or None: without one a compiled CPU
    run fails at its first step, so the stages check first and say so."""
    return shutil.which(cpp_compiler_name()[0])


def check_cpu_compile(device) -> None:
    """Refuse --compile on a CPU device where no C++ compiler is found (cpp_compiler), naming the fix."""
    if str(device).startswith("cpu") and cpp_compiler() is None:
        name, default = cpp_compiler_name()
        raise ChibiError(f"--compile on the CPU needs a C++ compiler (torch.compile builds its CPU kernels with "
                         f"$CXX, else {default}), and {name!r} is not on PATH: install one (e.g. `apt install g++`) "
                         "or set CXX, or drop --compile (the same training, eager)")


def init_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Resolve device/dtype and, under torchrun, join the process group (NCCL on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ChibiError(f"--device {device!r} is not a device torch knows; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ChibiError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        if world_size > 1:
            if dev.index is not None and dev.index != local_rank:
                raise ChibiError(f"--device {device} names one GPU, but under torchrun every process uses the GPU "
                                 f"of its LOCAL_RANK (this one: cuda:{local_rank}); pass --device cuda and choose "
                                 "the GPUs with CUDA_VISIBLE_DEVICES")
            dev = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if (dev.index or 0) >= count:  # else set_device fails with CUDA's bare "invalid device ordinal"
            if world_size > 1:
                raise ChibiError(f"this torchrun process (LOCAL_RANK {local_rank}) uses cuda:{local_rank}, but torch "
                                 f"sees {count} GPU(s) on this node; start at most {count} processes per node "
                                 "(--nproc_per_node) or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
            raise ChibiError(f"--device {device} names a GPU torch does not see (it sees {count}, cuda:0 to "
                             f"cuda:{count - 1}); pick one of those or check CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)

    if dtype == "auto":
        compute = default_compute_dtype(dev)
    else:
        compute = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        if dev.type == "cpu" and compute == torch.float16:
            raise ChibiError("--dtype float16 is not supported on CPU; use bfloat16 or float32")
    return Runtime(device=dev, compute_dtype=compute, rank=rank, local_rank=local_rank, world_size=world_size)


def shutdown_runtime(rt: Runtime) -> None:
    import torch.distributed as dist

    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def print0(rt: Runtime | None, *args, **kwargs) -> None:
    """Print only on rank 0 (or always when no runtime is given)."""
    if rt is None or rt.is_master:
        print(*args, **kwargs, flush=True)


def passive_thread_waits() -> bool:
    """Have OpenMP's threads sleep, not spin, between parallel regions (OMP_WAIT_POLICY=PASSIVE) in a command
    that only decodes (chat, serve), unless the user set the policy. With other work on the cores (training
    in another terminal), spinning threads of the two processes wait on each other at every small decoding
    op: a d4 decoding step in the main thread took ~290 ms instead of ~3-5 ms on 2 busy cores, and no
    slower alone; training is slower passive (~25% alone), so only decoding commands ask for it. OpenMP
    reads the setting once, when torch loads it: where torch is imported already nothing is changed (and
    the environment, which child processes inherit, is left alone). Returns whether it was set."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
