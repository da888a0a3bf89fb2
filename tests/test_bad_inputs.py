"""The bad-input suite: what a user can get wrong, and what chibichat answers.

Every case drives the real CLI (`chibichat.cli.main`, the function `python -m chibichat` runs; a few
through the subprocess itself) or the real server app, and asserts three things:
  - a clear error: exit status 2 (a ChibiError; the server: the OpenAI-shaped status and code) with a
    message that names the input and the fix (exact substrings), and no traceback;
  - nothing on disk changed or half-written: the home (and the corpus folder) hold the same files
    with the same bytes before and after;
  - where a failure happens mid-run (a full disk during a save, a kill during a save), the previous
    checkpoint stays loadable and the message says so.
The README's "Reliability" section lists these cases one line each.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chibichat.cli import main

# A model small enough that a 2-step pretraining run takes about a second on one busy core. The byte-level
# tokenizer makes the longest English sample prompt 47 tokens, so seq_len 64 fits it.
TINY = ["--depth", "1", "--width", "32", "--heads", "1", "--seq-len", "64", "--device-batch", "2",
        "--total-batch", "128", "--eval-tokens", "128", "--sample-tokens", "2", "--device", "cpu",
        "--dtype", "float32", "--log-every", "10", "--peak-tflops", "1"]
TEXT = "\n\n".join(f"The cat number {i} sat on the mat and looked at the dog." for i in range(400))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def byte_tokenizer(split="gpt4", extra=()):
    from chibichat.tokenizer import Tokenizer

    return Tokenizer([bytes([i]) for i in range(256)] + list(extra), split=split)


def text_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(TEXT, encoding="utf-8")
    (folder / "b.txt").write_text(TEXT[:20000], encoding="utf-8")
    return folder


def save_sft(home: Path, tok, seq_len=64):
    """A random-weight sft checkpoint (what the server and the chat stages load)."""
    import torch

    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=seq_len, n_layer=1, n_embd=32, n_head=2, n_kv_head=2,
                    layers="A")
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"vocab_size": tok.vocab_size, "hash": tok.hash}}
    return save_checkpoint(home / "checkpoints" / "sft" / "d1", 1, GPT(cfg), None, meta)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A home with a byte tokenizer, a 2-step base run (tag t, step 2), an sft checkpoint; and a text corpus."""
    root = tmp_path_factory.mktemp("bad")
    corpus = text_corpus(root / "corpus")
    home = root / "home"
    tok = byte_tokenizer()
    tok.save(home / "tokenizer")
    assert main(["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--num-steps", "2",
                 "--tag", "t"]) == 0
    save_sft(home, tok)
    return home, corpus


def snapshot(*roots: Path) -> dict:
    """Every file and directory under the roots: relative path -> sha256 (None for a directory)."""
    out = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = "absent"
            continue
        for p in sorted(root.rglob("*")):
            out[str(p)] = None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(capsys, argv) -> tuple[int, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.err


def assert_refused(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.count("error:") == 1, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


# ----------------------------------------------------------------------------------------------
# Corpora: `tokenizer train` on a broken local: folder into a home that does not exist yet.
# The home must still not exist afterwards, the corpus folder must be untouched.


def _parquet(path: Path, texts, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: pa.array(texts, pa.string())}), path, row_group_size=16)


def c_corrupt_parquet(d):
    (d / "a.parquet").write_bytes(b"PAR1" + b"\x17" * 300)
    _parquet(d / "b.parquet", ["some text"] * 40)  # the last file is val; train (the first) is read first
    return "a.parquet", ["is not a readable parquet file", "re-export it as parquet", "move it out of the folder"]


def c_truncated_parquet(d):
    _parquet(d / "a.parquet", ["some text"] * 40)
    data = (d / "a.parquet").read_bytes()
    (d / "a.parquet").write_bytes(data[: len(data) // 2])
    _parquet(d / "b.parquet", ["more text"] * 40)
    return "a.parquet", ["is not a readable parquet file", "re-export it as parquet"]


def c_empty_file_parquet(d):
    (d / "a.parquet").write_bytes(b"")
    _parquet(d / "b.parquet", ["more text"] * 40)
    return "a.parquet", ["is empty; remove it or put documents in it"]


def c_no_rows_parquet(d):
    _parquet(d / "a.parquet", [])
    _parquet(d / "b.parquet", ["more text"] * 40)
    return "a.parquet", ["holds no documents; remove the empty file"]


def c_no_text_column(d):
    _parquet(d / "a.parquet", ["x"] * 4, column="body")
    _parquet(d / "b.parquet", ["more text"] * 40)
    return "a.parquet", ["has no text column", "rename the column"]


def c_empty_corpus(d):
    return "", ["needs at least two", "found 0"]


def c_blank_text(d):
    (d / "a.txt").write_text("\n\n   \n", encoding="utf-8")
    (d / "b.txt").write_text("val text", encoding="utf-8")
    return "a.txt", ["holds no documents; remove the empty file or put text in it"]


def c_non_utf8(d):
    (d / "a.txt").write_bytes("café au lait\n".encode("latin-1"))
    (d / "b.txt").write_text("val text", encoding="utf-8")
    return "a.txt", ["is not valid UTF-8", "bad byte 0xe9 at byte offset 3", "iconv -f <encoding> -t utf-8"]


def c_bad_jsonl(d):
    (d / "a.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n', encoding="utf-8")
    (d / "b.jsonl").write_text('{"text": "val"}\n', encoding="utf-8")
    return "a.jsonl:2", ["is not valid JSON", "fix or remove that line"]


def c_jsonl_without_text(d):
    (d / "a.jsonl").write_text('{"body": "no text field"}\n', encoding="utf-8")
    (d / "b.jsonl").write_text('{"text": "val"}\n', encoding="utf-8")
    return "a.jsonl:1", ['needs a string field "text"']


CORPUS_CASES = [c_corrupt_parquet, c_truncated_parquet, c_empty_file_parquet, c_no_rows_parquet, c_no_text_column,
                c_empty_corpus, c_blank_text, c_non_utf8, c_bad_jsonl, c_jsonl_without_text]


@pytest.mark.parametrize("case", CORPUS_CASES, ids=lambda c: c.__name__[2:])
def test_bad_corpus(case, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    name, needles = case(corpus)
    home = tmp_path / "home"
    before = snapshot(home, corpus)
    rc, err = run_cli(capsys, ["tokenizer", "train", "--home", str(home), "--corpus", f"local:{corpus}",
                               "--vocab-size", "300", "--max-chars", "5000"])
    assert_refused(rc, err, str(corpus / name), *needles)
    assert "data download" not in err  # a local folder cannot be re-downloaded
    assert snapshot(home, corpus) == before


def test_missing_corpus_folder(tmp_path, capsys):
    rc, err = run_cli(capsys, ["tokenizer", "train", "--home", str(tmp_path / "h"), "--corpus",
                               f"local:{tmp_path / 'nope'}"])
    assert_refused(rc, err, f"local corpus folder {tmp_path / 'nope'} does not exist")
    assert list(tmp_path.iterdir()) == []


def test_a_10mb_single_document_is_capped_and_counted(tmp_path, capsys):
    """Not an error: one huge document is cut to --doc-cap for tokenizer training, and the cut is reported."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sentence = TEXT.replace("\n\n", " ")
    (corpus / "a.txt").write_text(sentence * (10_000_000 // len(sentence) + 1), encoding="utf-8")  # one 10 MB paragraph
    (corpus / "b.txt").write_text("val text", encoding="utf-8")
    rc = main(["tokenizer", "train", "--home", str(tmp_path / "h"), "--corpus", f"local:{corpus}",
               "--vocab-size", "300", "--max-chars", "50000", "--doc-cap", "20000"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "1 of 1 documents were longer than --doc-cap 20,000 chars; only their first 20,000 chars were used" in out
    assert json.loads((tmp_path / "h" / "tokenizer" / "tokenizer.json").read_text())["training"]["docs_capped"] == 1


# ----------------------------------------------------------------------------------------------
# The home and the checkpoints in it: each case runs against the shared world (or a copy it breaks)
# and must leave every file as it was.


def h_home_is_a_file(world, tmp):
    f = tmp / "file"
    f.write_text("not a dir")
    return ["pretrain", "--home", str(f), *TINY], [f"--home {f} is a file, not a directory"]


def h_home_under_a_file(world, tmp):
    f = tmp / "file"
    f.write_text("not a dir")
    return ["tokenizer", "train", "--home", str(f / "h")], [f"--home {f / 'h'} cannot be created: {f} is a file"]


def h_home_under_proc(world, tmp):
    # /proc refuses new files even to root: a read-only place every Linux has (a chmod would not stop root).
    return ["sft", "--home", "/proc/chibichat-home", "--device", "cpu"], [
        "--home /proc/chibichat-home is not writable", "/proc cannot be written to", "pass a directory you can write to"]


def h_home_under_sys(world, tmp):
    # sysfs refuses new files to everyone (EACCES, or EROFS where it is mounted read-only).
    return ["tokenizer", "train", "--home", "/sys/chibichat-home"], [
        "--home /sys/chibichat-home is not writable (it does not exist and /sys cannot be written to)",
        "pass a directory you can write to"]


def h_tokenizer_in_use(world, tmp):
    home, _ = world
    return ["tokenizer", "train", "--home", str(home), "--vocab-size", "300"], [
        f"{home / 'tokenizer'} (tokenizer {byte_tokenizer().hash[:12]}) is the tokenizer 2 checkpoint(s) were trained "
        "with (base/t/step_000002, sft/d1/step_000001)", "Pass --overwrite to replace it",
        f"kept as {home / ('tokenizer.bak-' + byte_tokenizer().hash[:12])}/"]


def _copy(world, tmp):
    home = tmp / "home"
    shutil.copytree(world[0], home)
    return home


def h_tokenizer_of_another_run(world, tmp):
    home = _copy(world, tmp)
    shutil.rmtree(home / "tokenizer")
    other = byte_tokenizer(extra=[b"th", b"he"])
    other.save(home / "tokenizer")
    return ["sft", "--home", str(home), "--from", "base", "--device", "cpu"], [
        f"checkpoint {home / 'checkpoints/base/t/step_000002'} was trained with tokenizer "
        f"{byte_tokenizer().hash[:12]} (vocab 265), but the loaded tokenizer is {other.hash[:12]} (vocab 267)",
        "restore home/tokenizer/"]


def h_checkpoint_of_another_vocab(world, tmp):
    home = _copy(world, tmp)
    other = byte_tokenizer(extra=[b"th"])
    save_sft(home, other)  # step 1 of sft/d1 replaced by one trained with a 266-token vocabulary
    return ["chat", "--home", str(home), "--device", "cpu", "--prompt", "hi"], [
        "was trained with tokenizer", "(vocab 266)", "(vocab 265)", "use the tokenizer it was trained with"]


def h_resume_with_another_depth(world, tmp):
    home, corpus = world
    argv = ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--num-steps", "4", "--tag", "t",
            "--resume"]
    argv[argv.index("--depth") + 1] = "2"
    return argv, [f"--resume: {home / 'checkpoints/base/t/step_000002'} holds a model with different ['layers', "
                  "'n_layer', 'windows']", "use the flags it was trained with"]


def h_step_without_meta(world, tmp):
    home = _copy(world, tmp)
    (home / "checkpoints/base/t/step_000002/meta.json").unlink()
    return ["eval", "base", "--home", str(home), "--tag", "t", "--device", "cpu"], [
        "holds step_000002 but no complete checkpoint", "without meta.json is an incomplete save",
        f"Delete {home / 'checkpoints/base/t'}"]


def h_corrupt_meta(world, tmp):
    home = _copy(world, tmp)
    (home / "checkpoints/base/t/step_000002/meta.json").write_text('{"format": "chibi')
    return ["eval", "base", "--home", str(home), "--tag", "t", "--device", "cpu"], [
        f"checkpoint metadata is corrupt ({home / 'checkpoints/base/t/step_000002/meta.json'})", "Delete it"]


def h_half_written_weights(world, tmp):
    home = _copy(world, tmp)
    w = home / "checkpoints/base/t/step_000002/model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return ["eval", "base", "--home", str(home), "--tag", "t", "--device", "cpu"], [
        f"the checkpoint weights file is corrupt ({w})", "and use an earlier step"]


def h_no_checkpoint(world, tmp):
    home = _copy(world, tmp)
    return ["rl", "--home", str(home), "--from", "mid", "--device", "cpu"], [
        f"no mid checkpoint under {home / 'checkpoints/mid'}", "create one with `chibichat midtrain`"]


def h_seq_len_too_short_for_samples(world, tmp):
    home, corpus = world
    argv = ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--num-steps", "2", "--tag", "s"]
    argv[argv.index("--seq-len") + 1] = "32"
    return argv, ["--seq-len 32 is too short for the greedy sample prompts",
                  "'If yesterday was Friday, then tomorrow will be' is 47 tokens", "pass --seq-len 48 or more"]


def h_seq_len_3(world, tmp):
    home, corpus = world
    argv = ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--num-steps", "2", "--tag", "s"]
    argv[argv.index("--seq-len") + 1] = "3"
    return argv, ["--total-batch 128 is not a multiple of device_batch 2 x seq_len 3", "pick a multiple"]


def h_resume_and_overwrite(world, tmp):
    home, corpus = world
    return ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--tag", "t", "--resume",
            "--overwrite"], ["--resume continues a run and --overwrite replaces it: pass one of them"]


def h_existing_run(world, tmp):
    home, corpus = world
    return ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--num-steps", "2", "--tag", "t"], [
        f"{home / 'checkpoints/base/t'} already holds checkpoints (steps [2])", "pass --resume",
        "--overwrite to replace it, or choose another --tag"]


def h_eval_tokens_too_few(world, tmp):
    home, corpus = world
    argv = ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--tag", "s"]
    argv[argv.index("--eval-tokens") + 1] = "100"
    return argv, ["--eval-tokens 100 is less than one val micro-batch", "raise it or lower --device-batch"]


def h_bad_layers(world, tmp):
    home, corpus = world
    return ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--layers", "AXA"], [
        "layer layout"]


def h_negative_save_every(world, tmp):
    home, corpus = world
    return ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--save-every", "-1"], [
        "--save-every must be >= 0, got -1"]


def h_sft_stream(world, tmp):
    home, _ = world
    return ["sft", "--home", str(home), "--mode", "stream", "--device", "cpu"], [
        "--mode stream is midtraining's; use pack or pad"]


def h_sft_bad_mix(world, tmp):
    home, _ = world
    return ["sft", "--home", str(home), "--from", "base", "--mix", "chitchat=lots", "--device", "cpu"], [
        "--mix entry 'chitchat=lots': epochs 'lots' is not a number (write name=epochs)"]


def h_sft_negative_embed_noise(world, tmp):
    home, _ = world
    return ["sft", "--home", str(home), "--from", "base", "--embed-noise", "-0.1", "--device", "cpu"], [
        "--embed-noise -0.1: give a noise RMS >= 0 (0 = off)"]


def h_sft_warmdown_too_long(world, tmp):
    home, _ = world
    return ["sft", "--home", str(home), "--from", "base", "--mix", "chitchat=0.01", "--warmdown-frac", "1.5",
            "--device", "cpu"], ["--warmdown-frac must be in [0, 1], got 1.5"]


def h_sft_samples_do_not_fit(world, tmp):
    """A source model whose context cannot hold the sample prompts: refused before step 0, not after the last."""
    import torch

    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.train.checkpoint import save_checkpoint

    home = _copy(world, tmp)
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=12, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, layers="A")
    save_checkpoint(home / "checkpoints/base/short", 1, GPT(cfg), None,
                    {"model_config": cfg.to_dict(), "tokenizer": {"vocab_size": tok.vocab_size, "hash": tok.hash}})
    return ["sft", "--home", str(home), "--from", "base", "--from-tag", "short", "--mix", "arithmetic=0.01",
            "--device", "cpu", "--dtype", "float32", "--num-steps", "2",
            *[f"--{g}-lr=0.01" for g in ("matrix", "embedding", "head", "other")]], [
        "the sample prompt 'Hello!' does not fit this model's context of 12 tokens",
        "pass --no-samples, or start from a model with a longer context"]


def h_rl_one_sample(world, tmp):
    home, _ = world
    return ["rl", "--home", str(home), "--num-samples", "1", "--device", "cpu"], [
        "--num-samples must be >= 2: the advantage compares samples of the same prompt"]


def h_tokenizer_eval_contradiction(world, tmp):
    home, _ = world
    return ["tokenizer", "eval", "--home", str(home), "--corpus", "embedded-en", "--no-corpus"], [
        "--corpus and --no-corpus contradict each other"]


def h_unknown_corpus(world, tmp):
    home, _ = world
    return ["pretrain", "--home", str(home), "--corpus", "wikipedia", *TINY], [
        "unknown corpus 'wikipedia'; choose one of: embedded-en", "or local:/path/to/folder"]


def h_pretrain_on_non_utf8(world, tmp):
    home, _ = world
    bad = tmp / "corpus"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"caf\xe9\n")
    (bad / "b.txt").write_text(TEXT[:5000], encoding="utf-8")
    return ["pretrain", "--home", str(home), "--corpus", f"local:{bad}", *TINY, "--tag", "s"], [
        f"{bad / 'a.txt'} is not valid UTF-8 (bad byte 0xe9 at byte offset 3)", "convert it to UTF-8"]


def h_float16_on_cpu(world, tmp):
    home, corpus = world
    argv = ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY]
    argv[argv.index("--dtype") + 1] = "float16"
    return argv, ["--dtype float16 is not supported on CPU; use bfloat16 or float32"]


HOME_CASES = [h_home_is_a_file, h_home_under_a_file, h_home_under_proc, h_home_under_sys, h_tokenizer_in_use,
              h_tokenizer_of_another_run, h_checkpoint_of_another_vocab, h_resume_with_another_depth,
              h_step_without_meta, h_corrupt_meta, h_half_written_weights, h_no_checkpoint,
              h_seq_len_too_short_for_samples, h_seq_len_3, h_resume_and_overwrite, h_existing_run,
              h_eval_tokens_too_few, h_bad_layers, h_negative_save_every, h_sft_stream, h_sft_bad_mix,
              h_sft_negative_embed_noise, h_sft_warmdown_too_long, h_sft_samples_do_not_fit, h_rl_one_sample, h_tokenizer_eval_contradiction, h_unknown_corpus,
              h_pretrain_on_non_utf8, h_float16_on_cpu]


@pytest.mark.parametrize("case", HOME_CASES, ids=lambda c: c.__name__[2:])
def test_bad_home_checkpoint_or_flags(case, world, tmp_path, capsys):
    argv, needles = case(world, tmp_path)
    roots = (world[0], world[1], tmp_path)
    before = snapshot(*roots)
    rc, err = run_cli(capsys, argv)
    assert_refused(rc, err, *needles)
    assert snapshot(*roots) == before


def test_home_is_a_file_through_the_real_command(tmp_path):
    """The same refusal from `python -m chibichat`: status 2, one line, no traceback."""
    f = tmp_path / "file"
    f.write_text("x")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "chibichat", "tokenizer", "train", "--home", str(f)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr == (f"chibichat tokenizer: error: --home {f} is a file, not a directory; pass a directory "
                        "(it is created when missing)\n")
    assert f.read_text() == "x"


def test_full_home_disk_is_refused_before_step_0(world, tmp_path, capsys, monkeypatch):
    """Free space below what the run's checkpoints take: refused up front, nothing written."""
    import collections

    home, corpus = world
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    before = snapshot(home, corpus)
    rc, err = run_cli(capsys, ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--tag", "new"])
    assert_refused(rc, err, f"--home {home} has 0.0 MB free, but this pretraining run writes about",
                   "free some space on that disk or pass another --home")
    assert snapshot(home, corpus) == before


def test_any_write_error_ends_in_one_line_naming_the_path(monkeypatch, capsys):
    """A write outside the atomic writers that hits a read-only file system: the CLI's message names the
    path and the fix; an OS error that is not about where a write goes keeps its traceback (a bug)."""
    import errno

    import chibichat.stages.tokenizer as stage

    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/home/tokenizer/eval.json")

    monkeypatch.setattr(stage, "run_train", read_only)
    rc, err = run_cli(capsys, ["tokenizer", "train"])
    assert_refused(rc, err, "chibichat tokenizer: error: cannot write /mnt/ro/home/tokenizer/eval.json: Read-only "
                   "file system (errno 30); that file system is read-only; pass a writable --home")

    def bug(args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(stage, "run_train", bug)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["tokenizer", "train"])


# ----------------------------------------------------------------------------------------------
# Failures in the middle of a save.


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(world, tmp_path, capsys, monkeypatch):
    """ENOSPC while the step-2 checkpoint is written (its fsync): exit 2 naming the step dir and the
    intact step-1 checkpoint, no partial directory left, and step 1 loads."""
    import errno

    from chibichat.common import Home
    from chibichat.train.checkpoint import list_steps, load_model

    home = _copy(world, tmp_path)
    _, corpus = world
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        if "step_000002" in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc, err = run_cli(capsys, ["pretrain", "--home", str(home), "--corpus", f"local:{corpus}", *TINY, "--tag", "f",
                               "--num-steps", "2", "--save-every", "1"])
    tag = home / "checkpoints/base/f"
    assert_refused(rc, err, "saving step 2 failed, nothing of it was kept", f"cannot write {tag / 'step_000002'}",
                   "No space left on device (errno 28); free some space on that disk or pass another --home",
                   f"The checkpoints saved before are intact: {tag / 'step_000001'}; --resume continues from "
                   f"{tag / 'step_000001'}")
    assert calls
    assert list_steps(tag) == [1] and sorted(p.name for p in tag.iterdir() if p.name.startswith(".")) == []
    assert not (tag / "summary.json").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)
    model, meta = load_model(Home.resolve(home), "base", "f")
    assert meta["step"] == 1 and model.config.n_layer == 1


def _save_then_die_mid_save(tag: Path) -> None:
    """Child process: save step 1, then start saving step 2 and get SIGKILLed after its files are written
    (meta.json included) but before the rename makes the step visible."""
    import torch

    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=265, seq_len=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, layers="A")
    model = GPT(cfg)
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"vocab_size": 265, "hash": "h"}}
    save_checkpoint(tag, 1, model, None, meta)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    save_checkpoint(tag, 2, model, None, meta)


def test_sigkill_during_a_save_leaves_the_previous_step_loadable(tmp_path):
    import torch

    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.train.checkpoint import list_steps, load_weights, read_meta

    tag = tmp_path / "tag"
    # A forked child (torch is already imported here: no second interpreter start-up), killed by SIGKILL.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            _save_then_die_mid_save(tag)
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    leftovers = [p.name for p in tag.iterdir() if p.name.startswith(".tmp-step_000002-")]
    assert len(leftovers) == 1 and (tag / leftovers[0] / "meta.json").is_file()  # half-done, never visible
    assert list_steps(tag) == [1]
    meta = read_meta(tag / "step_000001")
    torch.manual_seed(0)
    expected = GPT(GPTConfig.from_dict(meta["model_config"]))
    loaded = GPT(GPTConfig.from_dict(meta["model_config"]))
    with torch.no_grad():
        for p in loaded.parameters():
            p.zero_()
    load_weights(tag / "step_000001", loaded)
    for a, b in zip(expected.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Replacing the tokenizer on purpose; file modes.


def test_tokenizer_train_after_a_crash_mid_replacement_still_protects_the_old_one(world, tmp_path, capsys):
    """A crash between the two renames of a tokenizer save leaves home/tokenizer/ missing and the old one
    aside: `tokenizer train` renames it back first, so it still refuses to replace a tokenizer in use."""
    home = _copy(world, tmp_path)
    os.replace(home / "tokenizer", home / ".aside-tokenizer-123")
    rc, err = run_cli(capsys, ["tokenizer", "train", "--home", str(home), "--vocab-size", "300"])
    assert_refused(rc, err, f"{home / 'tokenizer'} (tokenizer {byte_tokenizer().hash[:12]}) is the tokenizer 2 "
                   "checkpoint(s) were trained with", "Pass --overwrite to replace it")
    assert (home / "tokenizer" / "tokenizer.json").is_file() and not (home / ".aside-tokenizer-123").exists()


def test_tokenizer_overwrite_keeps_the_old_one(world, tmp_path, capsys):
    from chibichat.tokenizer import Tokenizer

    home = _copy(world, tmp_path)
    old = Tokenizer.load(home / "tokenizer")
    assert main(["tokenizer", "train", "--home", str(home), "--corpus", f"local:{world[1]}", "--vocab-size", "300",
                 "--max-chars", "5000", "--overwrite"]) == 0
    backup = home / f"tokenizer.bak-{old.hash[:12]}"
    assert f"the replaced tokenizer {old.hash[:12]} (its checkpoints need it) is kept in {backup}" in \
        capsys.readouterr().out
    assert Tokenizer.load(backup).hash == old.hash and Tokenizer.load(home / "tokenizer").hash != old.hash
    # The checkpoints' refusal names the backup, and moving it back makes them load again.
    rc, err = run_cli(capsys, ["eval", "base", "--home", str(home), "--tag", "t", "--device", "cpu"])
    assert_refused(rc, err, f"was kept as home/tokenizer.bak-{old.hash[:12]}/")
    shutil.rmtree(home / "tokenizer")
    os.replace(backup, home / "tokenizer")
    from chibichat.common import Home
    from chibichat.train.checkpoint import load_model

    load_model(Home.resolve(home), "base", "t", tokenizer=Tokenizer.load(home / "tokenizer"))


def test_artifacts_honour_the_umask(tmp_path):
    """Checkpoint, tokenizer and HF export directories (built in mkdtemp, 0700) and their files get the modes
    a plain mkdir/open would: 0755/0644 under umask 022, 0750/0640 under 027."""
    from chibichat.common import Home
    from chibichat.export.hf import export_folder
    from chibichat.train.checkpoint import load_model

    for umask, dmode, fmode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        old = os.umask(umask)
        try:
            root = tmp_path / f"u{umask:o}"
            tok = byte_tokenizer()
            tok.save(Home.resolve(root).tokenizer_dir)
            step = save_sft(root, tok)
            model, _ = load_model(Home.resolve(root), "sft")
            hf = export_folder(model, tok, root / "hf", "card\n")
        finally:
            os.umask(old)
        for d in (root / "tokenizer", step, hf):
            assert d.stat().st_mode & 0o777 == dmode, d
            for f in d.iterdir():
                assert f.stat().st_mode & 0o777 == fmode, f


# ----------------------------------------------------------------------------------------------
# The server: malformed and oversized requests, bad conversations, a crowd beyond --max-queue.


@pytest.fixture(scope="module")
def app(world):
    from types import SimpleNamespace

    from chibichat.serve.app import create_app
    from chibichat.serve.protocol import Limits
    from chibichat.stages.serve import build_pool

    args = SimpleNamespace(home=str(world[0]), device="cpu", dtype="float32", source="sft", tag=None, step=None,
                           workers=1, max_queue=64, max_batch=8)
    pool, model_id, _ = build_pool(args)
    yield create_app(pool, model_id, Limits(max_messages=8, max_message_chars=2000, default_max_tokens=8)), model_id
    pool.shutdown()


def _msg(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


SERVER_CASES = [
    ("malformed JSON", b'{"model": "M", "messages": [', 400, "invalid_json", "request body is not valid JSON"),
    ("not an object", b'["hi"]', 400, "invalid_json", "request body must be a JSON object"),
    ("oversized message", {"messages": _msg(("user", "x" * 500_000))}, 400, "message_too_long",
     "messages[0] has 500000 characters, more than 2000"),
    ("oversized body", {"messages": _msg(("user", "x" * 2_000_000))}, 413, "request_too_large",
     "the request body is larger than this server's limit of 1048576 bytes"),
    ("too many messages", {"messages": _msg(*[("user", "a"), ("assistant", "b")] * 5)}, 400, "too_many_messages",
     "too many messages: 10 > 8"),
    ("unknown role", {"messages": _msg(("robot", "hi"))}, 400, "invalid_role",
     "messages[0].role 'robot' is not supported: roles are system (or developer), user and assistant"),
    ("two user turns in a row", {"messages": _msg(("user", "hi"), ("user", "again"))}, 400, "invalid_messages",
     "message 1 has role 'user' but 'assistant' was expected"),
    ("temperature out of range", {"messages": _msg(("user", "hi")), "temperature": 9}, 400, "out_of_range",
     "temperature"),
    ("max_tokens past the context", {"messages": _msg(("user", "hi")), "max_tokens": 64}, 400,
     "context_length_exceeded", "max_tokens 64 must be less than the model's context of 64 tokens"),
    ("unknown model", {"model": "gpt-4", "messages": _msg(("user", "hi"))}, 404, "model_not_found",
     "model 'gpt-4' does not exist"),
]


@pytest.mark.parametrize("name,body,status,code,needle", SERVER_CASES, ids=[c[0] for c in SERVER_CASES])
def test_bad_api_request(app, world, name, body, status, code, needle):
    from fastapi.testclient import TestClient

    application, model_id = app
    if isinstance(body, dict):
        body = json.dumps({"model": model_id, **body}).encode()
    before = snapshot(world[0])
    with TestClient(application, raise_server_exceptions=False) as client:
        r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and needle in err["message"], err
        assert "Traceback" not in r.text
        assert client.get("/health").json()["status"] == "ok"
    assert snapshot(world[0]) == before


def test_64_clients_beyond_max_queue_get_503_and_the_server_keeps_serving(world):
    """One replica of 8 batch rows with slowed decode steps, --max-queue 2, 64 concurrent clients: 10 are
    served (8 rows decoding + 2 waiting), the other 54 get 503 server_busy at once; afterwards the server
    answers normally and every row is free again."""
    import asyncio
    import threading
    import time
    from types import SimpleNamespace

    import httpx
    from test_serve import slow_engine

    from chibichat.serve.app import create_app
    from chibichat.serve.pool import WorkerPool
    from chibichat.serve.protocol import Limits
    from chibichat.stages.serve import build_pool

    args = SimpleNamespace(home=str(world[0]), device="cpu", dtype="float32", source="sft", tag=None, step=None,
                           workers=1, max_queue=2, max_batch=8)
    loaded, model_id, _ = build_pool(args)
    # The decode loop is held at a gate until the whole crowd has been answered or queued (3 s, far more
    # than 64 submissions take), so which requests get rows does not depend on the machine's speed.
    gate = threading.Event()
    engine = slow_engine(loaded.engines[0], 0.0, endless=True)
    decoder = engine.decoder()
    inner_forward = decoder.forward

    def gated_forward(*a, **k):
        gate.wait(30)
        return inner_forward(*a, **k)

    decoder.forward = gated_forward
    pool = WorkerPool([engine], max_queue=2, max_rows=8)
    threading.Timer(3.0, gate.set).start()
    application = create_app(pool, model_id, Limits(default_max_tokens=4))
    body = {"model": model_id, "messages": _msg(("user", "hi")), "max_tokens": 4, "temperature": 0}

    async def crowd():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            rs = await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(64)])
            after = await c.post("/v1/chat/completions", json=body)
            deadline = time.time() + 30  # rows are freed by the decode loop once their replies have ended
            while (health := await c.get("/health")).json()["available_rows"] != 8 and time.time() < deadline:
                await asyncio.sleep(0.05)
        return rs, after, health

    try:
        rs, after, health = asyncio.run(crowd())
    finally:
        pool.shutdown()
        loaded.shutdown()
    codes = sorted(r.status_code for r in rs)
    assert codes == [200] * 10 + [503] * 54, (codes.count(200), [r.json() for r in rs if r.status_code == 200][:1])
    busy = [r.json()["error"] for r in rs if r.status_code == 503]
    assert all(e["code"] == "server_busy" for e in busy), busy[:2]
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["role"] == "assistant"
    assert health.json()["available_rows"] == 8


@pytest.mark.parametrize("stage,flag", [("rl", "--eval-every"), ("rl", "--no-samples"), ("dpo", "--no-samples")])
def test_a_flag_a_stage_would_ignore_is_not_accepted(stage, flag, capsys):
    """rl logs its reward every step and neither rl nor dpo writes sample replies: the flags do not exist there."""
    from chibichat.cli import main

    extra = [flag] + (["3"] if flag == "--eval-every" else [])
    with pytest.raises(SystemExit) as e:
        main([stage, *(["--data", "prefs-language"] if stage == "dpo" else []), *extra])
    assert e.value.code == 2 and f"unrecognized arguments: {' '.join(extra)}" in capsys.readouterr().err
