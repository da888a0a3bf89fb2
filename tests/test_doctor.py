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


@pytest.mark.gpu
@cuda
def test_doctor_gpu_checks_pass(tmp_path):
    out = tmp_path / "doctor.json"
    rc = main(["doctor", "--gpu", "--json", str(out), "--mfu-depths", "12", "--mfu-steps", "2"])
    rep = json.loads(out.read_text())
    assert rc == 0, rep["checks"]
    assert all(c.get("ok") for c in rep["checks"].values())
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
