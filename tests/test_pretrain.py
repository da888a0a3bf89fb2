"""The depth dial, `chibichat pretrain` end to end on the embedded corpus, and `chibichat eval base`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chibichat.cli import build_parser, main
from chibichat.common import ChibiError
from chibichat.train.scaling import Overrides, derive_plan, derive_shape, reference_params


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than two, and far faster when the 2 cores are shared
    (OpenMP workers spin-wait for a core). Restored after each test."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A model small enough to train for tens of steps in seconds on a busy 2-core CPU.
TINY = ["--depth", "2", "--width", "64", "--heads", "2", "--seq-len", "64", "--device-batch", "4",
        "--total-batch", "256", "--eval-tokens", "1024", "--sample-tokens", "4", "--device", "cpu",
        "--dtype", "float32", "--log-every", "10"]


# -- the depth dial ---------------------------------------------------------------------------

def test_depth_dial_shapes():
    d4 = derive_shape(4, Overrides())
    assert (d4.width, d4.heads, d4.kv_heads, d4.seq_len) == (256, 4, 4, 1024)
    d20 = derive_shape(20, Overrides())
    assert (d20.width, d20.heads, d20.kv_heads, d20.seq_len) == (1280, 10, 10, 2048)
    d12 = derive_shape(12, Overrides())
    assert (d12.width, d12.heads) == (768, 12)
    o = derive_shape(4, Overrides(width=320, heads=5, kv_heads=1, seq_len=256))
    assert (o.width, o.heads, o.kv_heads, o.seq_len) == (320, 5, 1, 256)
    with pytest.raises(ChibiError, match="not divisible"):
        derive_shape(4, Overrides(width=300, heads=7))
    with pytest.raises(ChibiError, match="kv-heads"):
        derive_shape(4, Overrides(kv_heads=3))
    with pytest.raises(ChibiError, match="depth"):
        derive_shape(0, Overrides())


def test_depth_dial_lrs_batch_and_horizon():
    p = derive_plan(derive_shape(4, Overrides()), Overrides(), vocab_size=8192, scaling_params=5_000_000,
                    device_type="cpu", world_size=1)
    s = (256 / 768) ** -0.5
    assert p.matrix_lr == 0.02 and p.embedding_lr == pytest.approx(0.2 * s)
    assert p.unembedding_lr == pytest.approx(0.004 * s) and p.other_lr == pytest.approx(0.02 * s)
    assert p.horizon_tokens == 100_000_000
    assert p.total_batch == 2 ** 14 and p.device_batch == 16 and p.grad_accum == 1  # CPU cap
    assert p.num_steps == round(100_000_000 / 2 ** 14)
    # GPU d12 with the reference vocab is the anchor: exactly 2^19 tokens per step.
    q = derive_plan(derive_shape(12, Overrides()), Overrides(), vocab_size=65536,
                    scaling_params=reference_params(65536), device_type="cuda", world_size=8)
    assert q.total_batch == 2 ** 19 and q.grad_accum == 2 ** 19 // (32 * 2048 * 8)
    # Overrides win, and a total batch that is not whole micro-batches is refused.
    r = derive_plan(derive_shape(4, Overrides()), Overrides(matrix_lr=0.01, num_steps=7, total_batch=2 ** 15),
                    vocab_size=8192, scaling_params=5_000_000, device_type="cpu", world_size=1)
    assert (r.matrix_lr, r.num_steps, r.grad_accum) == (0.01, 7, 2)
    assert "set by --matrix-lr" in r.describe() and "64 * depth" in r.describe()
    with pytest.raises(ChibiError, match="not a multiple"):
        derive_plan(derive_shape(4, Overrides()), Overrides(total_batch=1000), vocab_size=8192,
                    scaling_params=5_000_000, device_type="cpu", world_size=1)


def test_help_documents_every_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    pre = sub.choices["pretrain"]
    for action in pre._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.strip(), f"pretrain {action.option_strings} has no help"
    for flag in ("--depth", "--layers", "--resume", "--total-batch", "--matrix-lr", "--ratio", "--num-steps",
                 "--warmup-steps", "--warmdown-frac", "--save-every", "--keep-last", "--eval-tokens", "--wandb",
                 "--compile", "--kv-heads", "--device-batch"):
        assert flag in pre.format_help(), flag


# -- end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_home(tmp_path_factory):
    """A home with a small tokenizer trained on the embedded English corpus."""
    home = tmp_path_factory.mktemp("home")
    assert main(["tokenizer", "train", "--home", str(home), "--vocab-size", "512", "--max-chars", "200000"]) == 0
    return home


def _records(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("layers", ["dense", "iberis"])
def test_pretrain_val_bpb_falls_and_eval_base_agrees(tok_home, layers, capsys):
    tag = f"t-{layers}"
    args = ["pretrain", "--home", str(tok_home), *TINY, "--layers", layers, "--num-steps", "40",
            "--eval-every", "20", "--sample-every", "0", "--save-every", "20", "--tag", tag, "--overwrite"]
    if layers == "iberis":  # the memory settings change no number, so every check below holds for them too
        args += ["--recompute", "block", "--trim-heap"]
    assert main(args) == 0
    run_dir = tok_home / "checkpoints" / "base" / tag
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [r for r in _records(run_dir / "metrics.jsonl") if "val_bpb" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"] - 0.3, evals
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 256
    assert summary["final_val_bpb"] == evals[-1]["val_bpb"] and summary["min_val_bpb"] <= summary["final_val_bpb"]
    assert summary["layers"] == ("AA" if layers == "dense" else "SA")
    out = capsys.readouterr().out
    assert "depth dial: --depth 2" in out and "sample:" in out

    # The saved checkpoint, re-scored by `eval base` with the same val settings, gives the same bpb.
    assert main(["eval", "base", "--home", str(tok_home), "--tag", tag, "--device", "cpu", "--dtype", "float32",
                 "--sample-tokens", "4", "--no-core"]) == 0  # CORE has its own tests
    ev = json.loads((tok_home / "eval" / "base" / tag / "summary.json").read_text())
    assert ev["val_bpb"] == pytest.approx(summary["final_val_bpb"], rel=1e-6)
    assert ev["base_eval"]["step"] == 40 and ev["base_eval"]["val_tokens"] == 1024
    samples = json.loads((tok_home / "eval" / "base" / tag / "samples.json").read_text())
    assert len(samples) == 7 and samples[0]["text"].startswith("The capital of France is")


def test_missing_tokenizer_and_bad_flags(tmp_path, tok_home, capsys):
    assert main(["pretrain", "--home", str(tmp_path), *TINY, "--num-steps", "1"]) == 2
    assert "chibichat tokenizer train" in capsys.readouterr().err
    assert main(["pretrain", "--home", str(tok_home), *TINY, "--num-steps", "1", "--layers", "AXA"]) == 2
    assert "layer layout" in capsys.readouterr().err
    assert main(["pretrain", "--home", str(tok_home), *TINY, "--num-steps", "1", "--total-batch", "300"]) == 2
    assert "not a multiple" in capsys.readouterr().err
    assert main(["pretrain", "--home", str(tok_home), *TINY, "--num-steps", "1", "--eval-tokens", "100"]) == 2
    assert "less than one val micro-batch" in capsys.readouterr().err
    assert main(["eval", "base", "--home", str(tmp_path / "nothing"), "--device", "cpu"]) == 2


def test_eval_refuses_a_checkpoint_of_another_tokenizer(tok_home, tmp_path, capsys):
    import shutil

    home = tmp_path / "h"
    shutil.copytree(tok_home / "tokenizer", home / "tokenizer")
    assert main(["pretrain", "--home", str(home), *TINY, "--num-steps", "2", "--eval-every", "0"]) == 0
    assert main(["tokenizer", "train", "--home", str(home), "--vocab-size", "400", "--max-chars", "100000",
                 "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["eval", "base", "--home", str(home), "--device", "cpu"]) == 2
    assert "trained with tokenizer" in capsys.readouterr().err
    # Resuming that run with the new tokenizer is refused too.
    assert main(["pretrain", "--home", str(home), *TINY, "--num-steps", "4", "--resume"]) == 2


def test_window_schedule():
    from chibichat.train.scaling import window_schedule

    assert window_schedule("0", "AAAA", 64) == [0, 0, 0, 0]
    assert window_schedule(None, "AAAA", 64) == [0, 0, 0, 0]
    assert window_schedule("16", "AAAA", 64) == [16, 16, 16, 0]  # the last layer stays global
    assert window_schedule("16:SL", "AAAAA", 64) == [16, 0, 16, 0, 0]
    assert window_schedule("8:ssl", "ASSAAA", 64) == [8, 0, 0, 8, 0, 0]  # tiled over attention layers only
    for spec, match in [("64", r"\[1, seq_len=64\)"), ("-3", "seq_len"), ("x", "expected 0, N or N:PATTERN"),
                        ("8:SXL", "only use S"), ("8:L", "windows no layer")]:
        with pytest.raises(ChibiError, match=match):
            window_schedule(spec, "AAAA", 64)
    with pytest.raises(ChibiError, match="windows no layer"):
        window_schedule("8", "SSSA", 64)  # only the (always full) last layer has attention


def test_window_is_honoured_by_attention():
    """A windowed layer's output at position t depends on inputs t-w+1 .. t only."""
    import torch

    from chibichat.model.gpt import GPTConfig, Projector, rope_table
    from chibichat.model.gpt import Attention

    cfg = GPTConfig(vocab_size=16, seq_len=32, n_layer=1, n_embd=32, n_head=2, n_kv_head=2)
    torch.manual_seed(0)
    att = Attention(cfg, window=5)
    att.reset_parameters()
    torch.nn.init.normal_(att.w_o, std=0.2)  # w_o starts at zero: give the output something to show
    cos, sin = rope_table(32, cfg.head_dim, cfg.rope_base)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    u = torch.randn(1, 32, 32)
    u2 = u.clone()
    u2[0, 10] += 1.0  # change one input position
    lin = Projector(att.fused_weights(), torch.float32, False)
    y, y2 = att(u, cos, sin, lin), att(u2, cos, sin, lin)
    changed = (y - y2).abs().amax(dim=-1)[0] > 1e-6
    assert changed.nonzero().flatten().tolist() == [10, 11, 12, 13, 14]


def test_pretrain_with_window_trains_and_saves_it(tok_home):
    tag = "t-window"
    assert main(["pretrain", "--home", str(tok_home), *TINY, "--depth", "3", "--window", "16", "--num-steps", "12",
                 "--eval-every", "0", "--sample-every", "0", "--tag", tag, "--overwrite"]) == 0
    run_dir = tok_home / "checkpoints" / "base" / tag
    meta = json.loads((run_dir / "step_000012" / "meta.json").read_text())
    assert meta["model_config"]["windows"] == [16, 16, 0] and meta["flags"]["window"] == "16"
    losses = [r["loss"] for r in _records(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
    # A resume with another window is refused: the saved model config names the difference.
    assert main(["pretrain", "--home", str(tok_home), *TINY, "--depth", "3", "--window", "8", "--num-steps", "14",
                 "--tag", tag, "--resume"]) == 2


def test_pretrain_copy_rows_reach_the_loader_summary_and_resume(tok_home, capsys):
    tag = "t-copy"
    args = ["pretrain", "--home", str(tok_home), *TINY, "--num-steps", "6", "--save-every", "3", "--eval-every", "0",
            "--sample-every", "0", "--tag", tag, "--overwrite", "--repeat-rows", "2"]
    assert main(args) == 0
    run_dir = tok_home / "checkpoints" / "base" / tag
    assert json.loads((run_dir / "summary.json").read_text())["repeat_rows"] == 2
    meta = json.loads((run_dir / "step_000006" / "meta.json").read_text())
    assert [st["fingerprint"]["repeat_every"] for st in meta["loader"]] == [2]
    capsys.readouterr()
    # a resume with other copy rows would not continue the same data stream: refused, naming the setting
    resume = [a for a in args if a != "--overwrite"]
    resume[resume.index("--repeat-rows") + 1] = "3"
    resume[resume.index("--num-steps") + 1] = "8"
    assert main(resume + ["--resume"]) == 2
    assert "repeat_every" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_sigkill_and_resume_is_exact(tok_home, tmp_path):
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "chibichat", "pretrain", "--home", str(tok_home), *TINY, "--layers", "iberis",
            "--num-steps", "12", "--save-every", "4", "--eval-every", "0", "--keep-last", "0", "--overwrite"]
    full = subprocess.Popen(base + ["--tag", "kfull"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    victim = subprocess.Popen(base + ["--tag", "kvictim"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    run_dir = tok_home / "checkpoints" / "base" / "kvictim"
    deadline = time.time() + 300
    while not (run_dir / "step_000004" / "meta.json").exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    steps_left = sorted(p.name for p in run_dir.glob("step_*"))
    assert "step_000012" not in steps_left, "the run finished before it was killed: make it longer"
    resume = [a for a in base if a != "--overwrite"] + ["--tag", "kvictim", "--resume"]
    r = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out
    a = load_file(tok_home / "checkpoints" / "base" / "kfull" / "step_000012" / "model.safetensors")
    b = load_file(run_dir / "step_000012" / "model.safetensors")
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    la = [r["loss"] for r in _records(tok_home / "checkpoints/base/kfull/metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in _records(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(lb) == 12 and la == pytest.approx(lb, abs=1e-6)


def test_bpb_counts_only_byte_bearing_targets():
    import math

    import torch

    from chibichat.common import Runtime
    from chibichat.eval.bpb import evaluate_bpb

    class Fixed(torch.nn.Module):  # per-token loss = target id / 10, 0 where ignored (like GPT)
        def forward(self, x, y, reduction):
            assert reduction == "none"
            return torch.where(y >= 0, y.float() / 10, 0.0)

    token_bytes = torch.tensor([1, 2, 3, 0], dtype=torch.int32)  # id 3 is a special: 0 bytes
    y = torch.tensor([[0, 1, 2, 3, -1], [2, 2, 3, 1, 0]])
    rt = Runtime(device=torch.device("cpu"), compute_dtype=torch.float32)
    r = evaluate_bpb(Fixed(), [(torch.zeros_like(y), y)], token_bytes, rt)
    nats = (0 + .1 + .2) + (.2 + .2 + .1 + 0)          # targets with bytes > 0
    nbytes = (1 + 2 + 3) + (3 + 3 + 2 + 1)
    assert r["val_bpb"] == pytest.approx(nats / (math.log(2) * nbytes))
    assert r["val_loss"] == pytest.approx((nats + .3 + .3) / 9)  # every valid target, specials included
    assert (r["val_tokens"], r["val_bytes"]) == (9, nbytes)
    with pytest.raises(ChibiError, match="no target bytes"):
        evaluate_bpb(Fixed(), [], token_bytes, rt)


def test_val_slice_of_a_few_long_documents_is_packed_from_one_pass(tmp_path):
    """--long-docs crop on a val split of 3 documents of ~3,000 tokens, fewer than the val loader's
    buffer (16): its first read goes past the split's end, yet a slice of 3 rows of 128 holds one
    document each (cropped) and is served; a 4th row would repeat one, so 4 rows are refused."""
    import os

    import torch

    from chibichat.common import Runtime
    from chibichat.data.corpora import get_corpus
    from chibichat.eval.base import val_batches

    class ByteTok:
        bos_id = 256

        def encode_batch(self, texts, num_threads=4):
            return [list(t.encode("utf-8")) for t in texts]

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "a.txt").write_text("\n\n".join(f"{split} doc {i} " + "y" * 3000 for i in range(3)) + "\n")
    corpus = get_corpus(f"local:{tmp_path}")
    rt = Runtime(device=torch.device("cpu"), compute_dtype=torch.float32)
    batches = val_batches(corpus, None, ByteTok(), rt, 1, 128, 3, split_long_docs=False)
    assert [x[0].tolist() for x, _ in batches] == [[256, *f"val doc {i} ".encode(), *b"y" * 117] for i in range(3)]
    with pytest.raises(ChibiError) as e:
        val_batches(corpus, None, ByteTok(), rt, 1, 128, 4, split_long_docs=False)
    assert str(e.value) == (f"the val split of local:{os.path.realpath(tmp_path)} ran out after about 384 tokens, "
                            "short of the 512 asked for; lower --eval-tokens (or use a corpus with a larger val split)")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_pretrain_on_cuda_bf16(tok_home):
    args = [a for a in TINY if a not in ("cpu", "float32", "--device", "--dtype")]
    assert main(["pretrain", "--home", str(tok_home), *args, "--device", "cuda", "--dtype", "bfloat16",
                 "--num-steps", "10", "--eval-every", "0", "--tag", "gpu", "--overwrite"]) == 0
    summary = json.loads((tok_home / "checkpoints" / "base" / "gpu" / "summary.json").read_text())
    assert summary["compute_dtype"] == "bfloat16" and summary["device"].startswith("cuda")
    assert summary["final_val_bpb"] < 10


def test_device_batch_auto_picks_rows_and_a_resume_keeps_them(tok_home, capsys):
    from chibichat.train.checkpoint import list_steps, read_meta, step_dir

    auto = [a if a != "4" or TINY[i - 1] != "--device-batch" else "auto" for i, a in enumerate(TINY)]
    args = ["pretrain", "--home", str(tok_home), *auto, "--total-batch", "512", "--tag", "autob", "--eval-every", "0",
            "--save-every", "1", "--sample-every", "0"]
    assert main(args + ["--num-steps", "1"]) == 0
    out = capsys.readouterr().out
    # CPU: no probe; the largest power of two dividing 512 / 64 = 8 rows with <= 2^14 tokens per micro-batch
    assert "--device-batch auto: 8 rows per device (cpu: no memory probe" in out
    tdir = tok_home / "checkpoints" / "base" / "autob"
    assert read_meta(step_dir(tdir, list_steps(tdir)[-1]))["plan"]["device_batch"] == 8
    assert main(args + ["--num-steps", "2", "--resume"]) == 0
    assert "--device-batch auto: 8 rows per device (kept from the checkpoint being resumed)" in capsys.readouterr().out


def test_resume_compares_the_resolved_dtype(tok_home, capsys):
    """--dtype auto resolves per machine: resuming with auto on the same machine is the same run; another dtype
    is refused before any step, naming the one auto resolved to."""
    import torch

    from chibichat.common import default_compute_dtype

    auto = str(default_compute_dtype(torch.device("cpu"))).replace("torch.", "")
    other = "float32" if auto == "bfloat16" else "bfloat16"
    i = TINY.index("--dtype")
    args = ["pretrain", "--home", str(tok_home), *TINY[:i], *TINY[i + 2:], "--tag", "dt", "--eval-every", "0",
            "--save-every", "1", "--sample-every", "0", "--eval-tokens", "256"]
    assert main(args + ["--dtype", "auto", "--num-steps", "1", "--overwrite"]) == 0
    assert main(args + ["--dtype", "auto", "--num-steps", "2", "--resume"]) == 0
    capsys.readouterr()
    assert main(args + ["--dtype", other, "--num-steps", "3", "--resume"]) == 2
    sdir = tok_home / "checkpoints" / "base" / "dt" / "step_000002"
    assert capsys.readouterr().err == (
        f"chibichat pretrain: error: --resume: {sdir} was trained with --dtype {auto} (this run: {other}); a resumed "
        f"run continues in the precision it was trained in, so pass --dtype {auto}, or start a new --tag\n")


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused_before_training(tok_home, monkeypatch, capsys):
    """torch.compile builds CPU kernels with a C++ compiler; without one the run would die in its first step
    with inductor's traceback. pretrain --compile refuses up front, naming the compiler looked for and the fixes."""
    from chibichat import common

    monkeypatch.setenv("CXX", "no-such-cxx-29")
    assert common.cpp_compiler() is None
    assert main(["pretrain", "--home", str(tok_home), "--tag", "nocxx", "--num-steps", "2", "--compile", *TINY]) == 2
    err = capsys.readouterr().err
    default = common.cpp_compiler_name()[1]  # g++ (clang++ on macOS)
    assert ("--compile on the CPU needs a C++ compiler (torch.compile builds its CPU kernels with $CXX, else "
            f"{default}), and 'no-such-cxx-29' is not on PATH: install one (e.g. `apt install g++`) or set CXX, "
            "or drop --compile (the same training, eager)") in err
    assert not (tok_home / "checkpoints" / "base" / "nocxx").exists()
    monkeypatch.setenv("CXX", sys.executable)  # any executable on the path counts as found
    assert common.cpp_compiler() == sys.executable
    common.check_cpu_compile("cuda")  # a GPU compiles with triton: not this check's business
