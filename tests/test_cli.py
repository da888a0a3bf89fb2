import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from chibichat.cli import build_parser, main
from chibichat.common import ChibiError, Home, atomic_directory, atomic_write_json, check_output, read_json


def test_help_lists_registered_stages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: chibichat")


def test_every_registered_subcommand_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert capsys.readouterr().out.strip(), f"{name} --help printed nothing"


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "chibichat", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "chibichat" in r.stdout


PROBE = """
import os, sys
import chibichat.stages.{mod} as stage
stage.run = lambda args: print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
from chibichat.cli import main
{pre}main({argv!r})
"""


@pytest.mark.parametrize("mod, argv, pre, policy", [
    ("chat", ["chat", "-p", "hi"], "", "PASSIVE"),
    ("serve", ["serve"], "", "PASSIVE"),
    ("chat", ["chat"], "os.environ['OMP_WAIT_POLICY'] = 'ACTIVE'\n", "ACTIVE"),  # the user's setting is kept
    ("chat", ["chat"], "import torch\n", "None"),  # too late to matter: the environment is left alone
    ("pretrain", ["pretrain", "--corpus", "embedded-en"], "", "None"),  # training spins (faster alone)
])
def test_decoding_commands_let_openmp_threads_sleep(mod, argv, pre, policy):
    """chat and serve set OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP (common.passive_thread_waits):
    decoding beside other work on the cores no longer crawls while the two processes' threads spin."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", PROBE.format(mod=mod, pre=pre, argv=argv)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [policy, "True" if pre == "import torch\n" else "False"]


def test_home_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIBICHAT_HOME", str(tmp_path / "h"))
    h = Home.resolve(None)
    assert h.root == (tmp_path / "h").resolve()
    assert h.checkpoints_dir("base", "d4") == h.root / "checkpoints" / "base" / "d4"
    assert Home.resolve(str(tmp_path / "x")).root == (tmp_path / "x").resolve()


def test_an_empty_home_is_refused_not_taken_for_the_default(monkeypatch):
    """`--home "$DIR"` with DIR unset used to write into ~/.cache/chibichat (or $CHIBICHAT_HOME) silently."""
    monkeypatch.delenv("CHIBICHAT_HOME", raising=False)
    for empty in ("", "  "):
        with pytest.raises(ChibiError) as e:
            Home.resolve(empty)
        assert str(e.value) == ("--home is empty; pass a directory, or leave --home out for $CHIBICHAT_HOME (default "
                                "~/.cache/chibichat)")


def test_check_output_refuses_what_the_end_of_a_run_could_not_write(tmp_path):
    """Bench and doctor outputs are written after minutes of work: a path they cannot write is refused first."""
    f = tmp_path / "f"
    f.write_text("x")
    check_output(tmp_path / "new" / "r.json", "--json")  # missing folders are created when it is written
    check_output(tmp_path / "out", "--out", folder=True)
    for path, flag, folder, message in (
            (tmp_path, "--json", False, f"--json {tmp_path} is a directory; pass the path of a file"),
            (f, "--out", True, f"--out {f} is a file; pass a directory (it is created when missing)"),
            (f / "r.json", "--json", False,
             f"--json {f / 'r.json'} cannot be written: {f} is a file, not a directory; pass another --json"),
            (f / "a" / "b", "--out", True,
             f"--out {f / 'a' / 'b'} cannot be written: {f} is a file, not a directory; pass another --out")):
        with pytest.raises(ChibiError) as e:
            check_output(path, flag, folder)
        assert str(e.value) == message
    with pytest.raises(ChibiError, match=r"^--json /proc/r.json cannot be written: /proc is not writable: .* pass "
                                         r"another --json$"):
        check_output("/proc/r.json", "--json")  # /proc refuses new files even to root
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # nothing created


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as d:
            (d / "a").write_text("half")
            raise RuntimeError("crash")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(final) as d:
        (d / "a").write_text("whole")
    assert (final / "a").read_text() == "whole"


def test_atomic_writes_fsync_the_directory_of_each_rename(tmp_path, fsynced, monkeypatch):
    import errno
    import os

    from chibichat.common import fsync_dir

    atomic_write_json(tmp_path / "a" / "f.json", {"x": 1})
    assert fsynced(tmp_path / "a")
    with atomic_directory(tmp_path / "d") as d:
        (d / "x").write_text("1")
    assert fsynced(tmp_path / "d") and fsynced(tmp_path)  # the new dir before its rename, its parent after
    fsynced.seen.clear()
    with atomic_directory(tmp_path / "d") as d:  # replacing an existing one
        (d / "x").write_text("2")
    assert fsynced(tmp_path / "d") and fsynced(tmp_path) and (tmp_path / "d" / "x").read_text() == "2"

    def refuse(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", refuse(errno.EINVAL))  # a file system without directory fsync
    fsync_dir(tmp_path)
    monkeypatch.setattr(os, "fsync", refuse(errno.EIO))  # a real I/O error is not hidden
    with pytest.raises(OSError, match="Input/output error"):
        fsync_dir(tmp_path)


def test_a_failed_fsync_after_the_rename_into_place_is_a_warning(tmp_path, fail_dir_fsync, capsys):
    """Once the file or folder has its name it is written whole: a failed fsync of its folder after that only
    leaves its surviving a power loss unconfirmed, which is warned about, not reported as a failed write."""
    import os

    fail_dir_fsync(tmp_path)  # EIO for tmp_path only (the folder the renames happen in)
    atomic_write_json(tmp_path / "f.json", {"x": 1})
    with atomic_directory(tmp_path / "d") as d:
        (d / "x").write_text("1")
    warn = ("warning: {} was written, but the fsync of its folder failed (Input/output error (errno 5)), so it may "
            "not survive a power loss; check that disk\n")
    assert capsys.readouterr().err == warn.format(tmp_path / "f.json") + warn.format(tmp_path / "d")
    assert read_json(tmp_path / "f.json", "f") == {"x": 1} and (tmp_path / "d" / "x").read_text() == "1"


def _replace_failing_from(call: int, fail):
    """os.replace that runs `fail()` from its `call`-th call on (1-based) instead of renaming."""
    import os

    real, n = os.replace, [0]

    def replace(src, dst):
        n[0] += 1
        if n[0] >= call:
            fail()
        return real(src, dst)

    return replace


def test_atomic_directory_failing_second_rename_puts_the_old_one_back(tmp_path, monkeypatch):
    import errno
    import os

    final = tmp_path / "d"
    with atomic_directory(final) as d:
        (d / "x").write_text("old")

    def once():  # only the second call (the new directory's rename) fails
        if not once.done:
            once.done = True
            raise OSError(errno.EIO, os.strerror(errno.EIO))
    once.done = False
    monkeypatch.setattr(os, "replace", _replace_failing_from(2, once))
    with pytest.raises(ChibiError) as e:
        with atomic_directory(final) as d:
            (d / "x").write_text("new")
    assert str(e.value) == f"cannot write {final}: Input/output error (errno 5); check the path (and --home)"
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and (final / "x").read_text() == "old"


def test_atomic_directory_crash_between_its_renames_leaves_the_old_one_to_recover(tmp_path):
    """SIGKILL after the old directory was moved aside, before the new one took its name: `final` is
    missing, the old one is whole under `.aside-<name>-<pid>`; a reader (recover_aside) and the next
    atomic_directory of that name rename it back."""
    import os
    import signal

    from chibichat.common import recover_aside

    final = tmp_path / "d"
    with atomic_directory(final) as d:
        (d / "x").write_text("old")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            os.replace = _replace_failing_from(2, lambda: os.kill(os.getpid(), signal.SIGKILL))
            with atomic_directory(final) as d:
                (d / "x").write_text("new")
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == f".aside-d-{pid}" and names[1].startswith(".tmp-d-")
    assert (tmp_path / names[0] / "x").read_text() == "old"
    recover_aside(final)  # what a reader does first
    assert (final / "x").read_text() == "old" and not (tmp_path / names[0]).exists()

    os.replace(final, tmp_path / names[0])  # the same state again, now recovered by the next write
    with atomic_directory(final) as d:
        assert (final / "x").read_text() == "old"  # renamed back before anything else
        (d / "x").write_text("newer")
    assert (final / "x").read_text() == "newer" and not (tmp_path / names[0]).exists()
    # an aside next to a present `final` is a finished swap's leftover: deleted, never restored
    (tmp_path / names[0]).mkdir()
    recover_aside(final)
    assert (final / "x").read_text() == "newer" and not (tmp_path / names[0]).exists()


def _recover_slowly(final, barrier, results):
    """In a child process: recover_aside(final) with every rename 0.3 s slow, started with the other child."""
    import os
    import time

    from chibichat.common import recover_aside

    real = os.replace
    os.replace = lambda src, dst: (time.sleep(0.3), real(src, dst))[1]
    barrier.wait()
    try:
        recover_aside(final)
        results.put("ok")
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")


def test_two_processes_recovering_one_aside_at_once_both_succeed(tmp_path):
    """Every rank of a torchrun loads the tokenizer, so recover_aside runs in several processes at once: each
    saw the aside and a missing folder, the second's rename then found nothing to rename (a ChibiError). They
    take turns on a lock, and the second finds the folder back."""
    import multiprocessing

    final = tmp_path / "tokenizer"
    aside = tmp_path / ".aside-tokenizer-4321"
    aside.mkdir()
    (aside / "x").write_text("whole")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_recover_slowly, args=(final, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
    assert got == ["ok", "ok"] and [p.exitcode for p in procs] == [0, 0]
    assert (final / "x").read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]  # the lock file too is gone


def test_recover_aside_without_a_lock_takes_a_rename_done_by_another_process_as_done(tmp_path, monkeypatch):
    import os

    from chibichat import common

    final, aside = tmp_path / "d", tmp_path / ".aside-d-4321"
    aside.mkdir()
    (aside / "x").write_text("whole")

    def no_lock(path, remove=False):  # a folder where no lock file can be made
        raise PermissionError(13, "Permission denied", str(path))

    real = os.replace

    def replace_done_by_another(src, dst):  # the other process renamed it just before this one
        real(src, dst)
        raise FileNotFoundError(2, "No such file or directory", str(src))

    monkeypatch.setattr(common, "file_lock", no_lock)
    monkeypatch.setattr(os, "replace", replace_done_by_another)
    common.recover_aside(final)
    assert (final / "x").read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    monkeypatch.undo()
    common.recover_aside(final)  # nothing to recover: no lock file is made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_directory_drops_what_failed_deletes_of_its_earlier_versions_left(tmp_path, monkeypatch, refuse_old_deletes):
    """A tag folder replaced (e.g. import-hf --overwrite) whose old version could not be deleted stays as
    `.old-.aside-<tag>-<pid>-<pid>`; the next replacement of that name drops it, and any `.old-<tag>-<pid>`
    or `.old-.aside-<tag>-*` whose pids are this process or ended ones, never another name's leftover nor
    one a running process may still be deleting."""
    import os

    stage = tmp_path / "sft"
    tag = stage / "d4"
    with atomic_directory(tag) as d:
        (d / "x").write_text("v1")
    refuse_old_deletes()
    with atomic_directory(tag) as d:
        (d / "x").write_text("v2")
    monkeypatch.undo()
    pid = os.getpid()
    left = stage / f".old-.aside-d4-{pid}-{pid}"
    assert sorted(p.name for p in stage.iterdir()) == sorted(["d4", left.name]) and (left / "x").read_text() == "v1"

    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    ended, running = child.pid, os.getppid()
    dropped = [f".old-d4-{ended}", f".old-.aside-d4-{ended}-{pid}", f".old-d4-{pid}"]
    kept = [f".old-d4-{running}", f".old-.aside-d4-{pid}-{running}", f".old-.aside-d4-{running}-{ended}",
            f".old-d4-{ended}-{ended}", f".old-d4x-{ended}", f".old-.aside-d4x-{ended}-{ended}", f".tmp-d4-{ended}",
            "d4x"]
    for name in dropped + kept:
        (stage / name / "sub").mkdir(parents=True)
    with atomic_directory(tag) as d:
        (d / "x").write_text("v3")
    assert sorted(p.name for p in stage.iterdir()) == sorted(["d4", *kept]) and (tag / "x").read_text() == "v3"


def test_the_next_write_of_a_name_drops_the_temps_a_killed_write_of_it_left(tmp_path):
    """A process killed (SIGKILL) inside atomic_directory and inside atomic_write_bytes leaves
    `.tmp-<name>-<pid>-*` and `.<name>.<pid>-*.tmp`; the next write of that name drops them once that pid has
    ended, never those of a running process (nor this one's), of another name that starts with it, nor one
    without a pid."""
    import os
    import textwrap

    stage = tmp_path / "sft"
    killed = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from chibichat.common import atomic_directory, atomic_write_bytes
        stage = Path({str(stage)!r})
        with atomic_directory(stage / "d4") as d:
            (d / "x").write_text("half")
            os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
            atomic_write_bytes(stage / "m.json", b"half")
    """)
    child = subprocess.Popen([sys.executable, "-c", killed], stderr=subprocess.PIPE, text=True)
    assert child.wait() == -9, child.stderr.read()
    child.stderr.close()
    ended = sorted(p.name for p in stage.iterdir())
    assert len(ended) == 2 and ended[0].startswith(f".m.json.{child.pid}-") and ended[0].endswith(".tmp")
    assert ended[1].startswith(f".tmp-d4-{child.pid}-") and (stage / ended[1] / "x").read_text() == "half"

    running = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live, me, dead = running.pid, os.getpid(), child.pid
        kept = [f".tmp-d4-{live}-abc_12xy", f".tmp-d4-{me}-abc_12xy", f".tmp-d4-1-{dead}-abc_12xy",
                f".tmp-d4-x-{dead}-abc_12xy", f".tmp-d4x-{dead}-abc_12xy", ".tmp-d4-abc_12xy", f".tmp-d4-{dead}-a.b",
                f".m.json.{live}-abc_12xy.tmp", f".m.json.{me}-abc_12xy.tmp", f".m.json.1.{dead}-abc_12xy.tmp",
                f".m.jsonx.{dead}-abc_12xy.tmp", ".m.json.abc_12xy.tmp"]
        for name in kept:
            (stage / name).mkdir() if name.startswith(".tmp-") else (stage / name).write_text("x")
        with atomic_directory(stage / "d4") as d:
            (d / "x").write_text("whole")
        assert sorted(p.name for p in stage.iterdir()) == sorted([ended[0], "d4", *kept])
        atomic_write_json(stage / "m.json", {"x": 1})
        assert sorted(p.name for p in stage.iterdir()) == sorted(["d4", "m.json", *kept])
    finally:
        running.stdin.close()
        running.wait()

def test_remove_dir_renames_out_of_sight_first(tmp_path, monkeypatch):
    import os
    import shutil

    from chibichat.common import remove_dir

    (tmp_path / "d" / "sub").mkdir(parents=True)
    remove_dir(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "d").mkdir()
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        remove_dir(tmp_path / "d")
    assert [p.name for p in tmp_path.iterdir()] == [f".old-d-{os.getpid()}"]
    with pytest.raises(ChibiError, match=f"cannot remove {tmp_path / 'gone'}: No such file or directory"):
        remove_dir(tmp_path / "gone")


def test_remove_dir_whose_rename_is_not_fsynced_says_where_the_folder_is(tmp_path, fail_dir_fsync):
    """The folder was renamed aside but the fsync of its parent failed: it is not deleted (a power loss could
    bring it back under its name, part gone), and the error says where it now is and how to restore or remove it."""
    import os

    from chibichat.common import remove_dir

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("1")
    fail_dir_fsync(tmp_path)  # EIO for tmp_path only (the folder the rename happens in)
    with pytest.raises(ChibiError) as e:
        remove_dir(tmp_path / "d")
    trash = tmp_path / f".old-d-{os.getpid()}"
    assert str(e.value) == (
        f"cannot remove {tmp_path / 'd'}: it was renamed to {trash}, but the fsync of {tmp_path} then failed: "
        f"Input/output error (errno 5), so it was not deleted. No reader takes {trash} for it: rename it back to "
        f"{tmp_path / 'd'} to keep it, or delete it by hand; check that disk")
    assert [p.name for p in tmp_path.iterdir()] == [trash.name] and (trash / "x").read_text() == "1"


def test_read_json_errors_name_the_file(tmp_path):
    p = tmp_path / "meta.json"
    with pytest.raises(ChibiError, match="not found"):
        read_json(p, "checkpoint metadata")
    p.write_text("{not json")
    with pytest.raises(ChibiError, match="corrupt.*meta.json"):
        read_json(p, "checkpoint metadata")
    atomic_write_json(p, {"a": 1})
    assert read_json(p, "x") == {"a": 1}


def test_atomic_write_gives_normal_file_mode(tmp_path):
    import os

    p = tmp_path / "f.txt"
    atomic_write_json(p, {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_torchrun_refuses_a_device_index_other_than_its_local_rank(monkeypatch):
    """Under torchrun each process takes the GPU of its LOCAL_RANK; --device cuda:N naming another one is
    refused rather than silently replaced."""
    fake_gpus(monkeypatch, None)
    as_torchrun_rank_1(monkeypatch)
    assert init_refusal("cuda:0") == ("--device cuda:0 names one GPU, but under torchrun every process uses the GPU "
                                      "of its LOCAL_RANK (this one: cuda:1); pass --device cuda and choose the GPUs "
                                      "with CUDA_VISIBLE_DEVICES")


def fake_gpus(monkeypatch, count: int | None) -> None:
    """torch sees CUDA (and `count` GPUs, where given); choosing a GPU fails the test: the refusals come first."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if count is not None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("must refuse before choosing a GPU"))


def init_refusal(device: str) -> str:
    """The ChibiError message of init_runtime(device, "float32")."""
    from chibichat import common

    with pytest.raises(ChibiError) as e:
        common.init_runtime(device, "float32")
    return str(e.value)


def as_torchrun_rank_1(monkeypatch) -> None:
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)


def test_a_gpu_index_beyond_the_visible_gpus_is_refused_by_name(monkeypatch):
    """A LOCAL_RANK (torchrun with more processes than GPUs) or --device cuda:N past the GPUs torch sees is a
    clear error, not CUDA's bare "invalid device ordinal" from set_device."""
    fake_gpus(monkeypatch, 1)
    assert init_refusal("cuda:1") == ("--device cuda:1 names a GPU torch does not see (it sees 1, cuda:0 to cuda:0); "
                                      "pick one of those or check CUDA_VISIBLE_DEVICES")
    as_torchrun_rank_1(monkeypatch)
    assert init_refusal("cuda") == ("this torchrun process (LOCAL_RANK 1) uses cuda:1, but torch sees 1 GPU(s) on "
                                    "this node; start at most 1 processes per node (--nproc_per_node) or make more "
                                    "GPUs visible (CUDA_VISIBLE_DEVICES)")


def test_auto_dtype_on_cpu_is_bf16_only_with_native_bf16_kernels(monkeypatch):
    """Without native bf16 kernels (an AVX2-only CPU) bf16 matmuls are ~50x slower than fp32: auto is fp32."""
    import torch

    from chibichat import common

    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: True)
    assert common.default_compute_dtype(cpu) == torch.bfloat16
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: False)
    assert common.default_compute_dtype(cpu) == torch.float32
    assert common.init_runtime("cpu", "auto").compute_dtype == torch.float32
    assert common.init_runtime("cpu", "bfloat16").compute_dtype == torch.bfloat16  # asked for: kept


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(text: str) -> list[list[str]]:
    """The argv after `chibichat` of every command line in the README's bash blocks: lines that start with
    `chibichat` or run `-m chibichat` (torchrun), joined over backslash continuations, comments dropped; a word
    `a|b|c` stands for each of its alternatives."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if "-m" in argv and argv[argv.index("-m") + 1:][:1] == ["chibichat"]:
                argv = argv[argv.index("-m") + 1:]
            if argv[:1] != ["chibichat"]:
                continue
            out += [list(words) for words in itertools.product(*(w.split("|") for w in argv[1:]))]
    return out


def test_every_command_line_in_the_readme_parses(capsys):
    """A flag renamed or a choice dropped in the code breaks the README's copy-paste commands: every one parses,
    and every task its --mix/--task/--tasks names is registered (or a `file:` that is in the repository)."""
    from chibichat.tasks.registry import specs

    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 35  # the pipeline, the LoRA walkthrough, the GPU walkthrough, torchrun
    assert ["pretrain", "--corpus", "fineweb-edu", "--depth", "26", "--compile"] in commands  # continued, -m
    assert ["bench", "serve"] in commands  # `bench tokenizer|train|infer|serve`
    known = set(specs())
    for argv in commands:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: chibichat {shlex.join(argv)}\n{capsys.readouterr().err}")
        for flag in ("mix", "task", "tasks"):
            for entry in (getattr(args, flag, None) or "").split(","):
                name = entry.rsplit("=", 1)[0] if flag == "mix" else entry
                if name.startswith("file:"):
                    assert (README.parent / name[5:]).is_file(), (argv, name)
                elif name:
                    assert name in known, (argv, name)
    with pytest.raises(SystemExit):  # the check bites: a flag the parser lacks
        build_parser().parse_args(readme_commands("```bash\nchibichat sft --from sft --no-such-flag\n```")[0])


def test_every_repository_path_the_readme_names_exists():
    text = README.read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w/.])((?:scripts|examples|docs|dev|tests|\.ci)/[\w./-]*\w)", text))
    assert {"scripts/setup.sh", "examples/support.jsonl", "docs/benchmarks.md", "tests/test_bad_inputs.py"} <= named
    assert sorted(p for p in named if not (README.parent / p).exists()) == []


def test_int_lists_refuse_empty_entries_repeats_and_small_values():
    from chibichat.common import parse_int_list

    assert parse_int_list("4, 2,6", "--depths", "depths", 1, "2,3,4") == [4, 2, 6]
    for bad, why in (("2,,4", "has an empty entry in '2,,4': remove the extra comma"),
                     ("2,4,", "has an empty entry in '2,4,': remove the extra comma"),
                     ("2,x", "must be a comma list of integers, e.g. 2,3,4; got '2,x'"),
                     ("2,2", "must list distinct depths >= 1, got '2,2'"),
                     ("0,2", "must list distinct depths >= 1, got '0,2'")):
        with pytest.raises(ChibiError) as e:
            parse_int_list(bad, "--depths", "depths", 1, "2,3,4")
        assert str(e.value) == f"--depths {why}"


def test_str_lists_refuse_empty_entries_the_way_int_lists_do():
    from chibichat.common import parse_str_list

    assert parse_str_list("float32, bfloat16", "--dtypes") == ["float32", "bfloat16"]
    assert parse_str_list(" ", "--dtypes") == []  # blank: the caller says whether no values is allowed
    for bad in ("float32,", "a,,b", ",a"):
        with pytest.raises(ChibiError) as e:
            parse_str_list(bad, "--dtypes")
        assert str(e.value) == f"--dtypes has an empty entry in {bad!r}: remove the extra comma"
