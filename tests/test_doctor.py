"""`chibichat doctor --gpu`: the CPU-testable parts (peak table, MFU arithmetic, shapes, JSON, refusals) on
CPU; the GPU checks themselves run under the `gpu` marker and skip without CUDA."""

import json

import pytest
import torch

from chibichat.cli import main
from chibichat.common import ChibiError
from chibichat.stages import doctor

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_peak_table_matches_the_longest_name():
    assert doctor.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert doctor.peak_bf16("NVIDIA GH200 480GB") == 989e12
    assert doctor.peak_bf16("NVIDIA GeForce RTX 4090") == 165e12
    assert doctor.peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert doctor.peak_bf16("Some Future GPU") is None


def test_mfu_is_model_flops_over_peak():
    # nanochat's d20: 3.49e9 FLOPs/token; 140K tok/s on one H100 -> 49.4%
    assert doctor.mfu(3.491758e9, 140_000, 989e12) == pytest.approx(3.491758e9 * 140_000 / 989e12)
    assert doctor.mfu(1e9, 100_000, 1e15) == pytest.approx(0.1)
    with pytest.raises(ChibiError, match="positive peak"):
        doctor.mfu(1e9, 1.0, 0)


def test_mfu_shapes_are_the_depth_dial_at_seq_2048():
    assert doctor.mfu_shape(12) == {"width": 768, "heads": 12, "kv_heads": 12, "seq_len": 2048}
    assert doctor.mfu_shape(20) == {"width": 1280, "heads": 10, "kv_heads": 10, "seq_len": 2048}


def test_report_json_is_written_atomically(tmp_path):
    path = doctor.write_report(tmp_path / "out" / "doctor.json", {"checks": {"bf16": {"ok": True}}, "mfu": []})
    assert json.loads(path.read_text()) == {"checks": {"bf16": {"ok": True}}, "mfu": []}
    assert [p.name for p in path.parent.iterdir()] == ["doctor.json"]  # no temp file left


def test_doctor_refusals(tmp_path, capsys):
    assert main(["doctor", "--json", str(tmp_path / "d.json")]) == 2
    assert "pass --gpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["doctor", "--gpu", "--json", str(tmp_path / "d.json")]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "d.json").exists()


def test_mfu_depths_are_parsed_before_any_check(tmp_path, capsys):
    """A typo in --mfu-depths is refused at once, naming the flag: it used to crash with a ValueError after every
    GPU check had run, before doctor.json was written (so this holds on a machine with CUDA too)."""
    assert doctor.parse_depths("12, 20") == [12, 20] and doctor.parse_depths("") == []
    for bad, part in (("d12", "d12"), ("12,x", "x"), ("0", "0")):
        assert main(["doctor", "--gpu", "--mfu-depths", bad, "--json", str(tmp_path / "d.json")]) == 2
        assert capsys.readouterr().err.strip() == (f"chibichat doctor: error: --mfu-depths {bad!r}: {part!r} is not a "
                                                   "depth; give comma-separated positive integers like 12,20 (or '' "
                                                   "for none)")
    assert main(["doctor", "--gpu", "--mfu-steps", "0", "--json", str(tmp_path / "d.json")]) == 2
    assert "--mfu-steps must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d.json").exists()


def test_a_repeated_depth_and_an_unwritable_json_are_refused_before_any_check(tmp_path, capsys):
    """A depth listed twice was measured twice and its rows counted as one ("1 ok"); a --json the report cannot be
    written to failed only after every check and measurement (so this holds on a machine with CUDA too)."""
    assert main(["doctor", "--gpu", "--mfu-depths", "12,20,12", "--json", str(tmp_path / "d.json")]) == 2
    assert capsys.readouterr().err.strip() == ("chibichat doctor: error: --mfu-depths '12,20,12': depth 12 is given "
                                               "twice; list each depth once")
    assert main(["doctor", "--gpu", "--mfu-depths", "\u00b2", "--json", str(tmp_path / "d.json")]) == 2  # isdigit, no int
    assert "'\u00b2' is not a depth" in capsys.readouterr().err
    f = tmp_path / "f"
    f.write_text("x")
    assert main(["doctor", "--gpu", "--json", str(f / "d.json")]) == 2
    assert capsys.readouterr().err.strip() == (f"chibichat doctor: error: --json {f / 'd.json'} cannot be written: {f} "
                                               "is a file, not a directory; pass another --json")
    assert main(["doctor", "--gpu", "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"chibichat doctor: error: --json {tmp_path} is a directory; pass the "
                                               "path of a file")


def test_a_failed_mfu_run_fails_the_doctor_and_skipped_checks_are_counted_apart(monkeypatch):
    """The closing line counts every check and MFU row as ok, skipped or failed; an MFU measurement that failed
    (run_isolated raising ChibiError) makes the exit status 1, and a check that does not apply here (nccl on one
    GPU) is skipped, not ok."""
    import argparse

    from chibichat.bench import train as bench_train

    def failing(cfg, device):
        raise ChibiError("the d12 step ran out of memory")

    monkeypatch.setattr(bench_train, "run_isolated", failing)
    args = argparse.Namespace(mfu_batch=8, mfu_steps=2, no_compile=True)
    row = doctor._mfu_row(12, args, False, 989e12)
    assert row == {"depth": 12, "seq_len": 2048, "batch": 8, "compile": False, "fp8": False, "ok": False,
                   "error": "the d12 step ran out of memory"}
    nccl = doctor._check(lambda: doctor.check_nccl(1))
    assert "ok" not in nccl and nccl["skipped"] == "one visible GPU: nothing to all-reduce across"
    checks = {"bf16": {"ok": True}, "compile": {"ok": True}, "sdpa": {"ok": True},
              "fp8": {"skipped": "SM 8.0 < 8.9 has no fp8 tensor cores"}, "nccl": nccl}
    assert doctor.outcome(checks, [row]) == ("3 ok, 2 skipped (fp8, nccl), 1 failed (mfu d12)", 1)
    assert doctor.outcome(checks, [{**row, "ok": True}]) == ("4 ok, 2 skipped (fp8, nccl)", 0)
    assert doctor.outcome({**checks, "sdpa": {"ok": False, "error": "x"}}, [{**row, "fp8": True}])[1] == 1


@pytest.mark.gpu
@cuda
def test_doctor_gpu_checks_pass(tmp_path):
    out = tmp_path / "doctor.json"
    rc = main(["doctor", "--gpu", "--json", str(out), "--mfu-depths", "12", "--mfu-steps", "2"])
    rep = json.loads(out.read_text())
    assert rc == 0, rep["checks"]
    assert all(c.get("ok") or "skipped" in c for c in rep["checks"].values())  # (nccl on one GPU is skipped)
    row = rep["mfu"][0]
    assert row["ok"] and row["depth"] == 12 and row["tokens_per_s"] > 0
    if rep["peak_bf16_tflops"]:
        assert 0 < row["mfu"] < 1


@pytest.mark.gpu
@cuda
def test_device_batch_probe_on_cuda():
    from chibichat.model.gpt import GPT, GPTConfig, RunConfig
    from chibichat.train.batchprobe import auto_device_batch

    with torch.device("cuda"):
        m = GPT(GPTConfig(vocab_size=4096, seq_len=512, n_layer=2, n_embd=128, n_head=2, n_kv_head=2,
                          layers="dense", windows=[0, 0]), RunConfig(compute_dtype=torch.bfloat16))
    rows, how = auto_device_batch(m, 2 ** 16, 512, 1, torch.device("cuda"))
    assert rows == 128 and "fit" in how  # a 0.5M-param model fits all 128 rows on any CUDA card
    assert all(p.grad is None for p in m.parameters())  # the probe leaves no gradients behind
