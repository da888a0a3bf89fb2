"""`chibichat bench train`: flag validation, the figures of one run, the table, the CLI wiring."""

import argparse
import json

import pytest

from chibichat.bench import train as bt
from chibichat.common import ChibiError

TINY = ["--depth", "2", "--width", "32", "--heads", "2", "--seq-len", "16", "--vocab", "64", "--batch", "2",
        "--total-batch", "64", "--steps", "2", "--warmup", "1", "--threads", "1"]


def parse(argv):
    p = argparse.ArgumentParser()
    bt.add_args(p)
    return p.parse_args(argv)


def test_cartesian_configs_and_grad_accum():
    cfgs = bt.configs_from_args(parse(TINY + ["--layers", "dense,SA", "--dtype", "float32,bfloat16",
                                               "--compile", "off,on"]))
    assert len(cfgs) == 8
    assert {(c.layers, c.dtype, c.compile) for c in cfgs} == {
        (lay, dt, comp) for lay in ("dense", "SA") for dt in ("float32", "bfloat16") for comp in (False, True)}
    assert all(c.grad_accum == 2 for c in cfgs)  # 64 tokens / (2 rows x 16)


@pytest.mark.parametrize("extra, match", [
    (["--total-batch", "48"], "multiple of"),
    (["--dtype", "float64"], "unknown values"),
    (["--compile", "maybe"], "unknown values"),
    (["--recompute", "none,all"], "unknown values"),
    (["--trim-heap", "yes"], "unknown values"),
    (["--layers", "ASA"], "layer layout"),
    (["--layers", ","], "empty"),
    # an empty entry was skipped: "--dtype float32," silently measured one dtype
    (["--dtype", "float32,"], r"^--dtype has an empty entry in 'float32,': remove the extra comma$"),
    (["--layers", "dense,,SA"], r"^--layers has an empty entry in 'dense,,SA': remove the extra comma$"),
    (["--steps", "0"], "--steps"),
    (["--window", "abc"], "expected 0, N or N:PATTERN"),
    (["--fp8", "on"], "--fp8 on needs --dtype bfloat16"),  # the default --dtype list includes float32
    (["--dtype", "bfloat16", "--fp8", "yes"], "unknown values"),
    # a repeated value ran and tabulated the same configuration twice; --kv-heads 0 silently meant --heads
    (["--dtype", "float32,bfloat16,float32"], r"^--dtype lists float32 more than once; list each value once$"),
    (["--layers", "dense,SA,dense,SA"], r"^--layers lists SA, dense more than once; list each value once$"),
    (["--lora", "8,08"], r"^--lora lists 8 more than once; list each value once$"),
    (["--kv-heads", "0"], r"^--kv-heads must be >= 1, got 0 \(leave it out for --heads\)$"),
])
def test_bad_flags_raise(extra, match):
    with pytest.raises(ChibiError, match=match):
        bt.configs_from_args(parse(TINY + extra))


def test_an_unwritable_json_is_refused_before_any_configuration_runs(tmp_path, monkeypatch, capsys):
    from chibichat.cli import main

    monkeypatch.setattr(bt, "run_isolated", lambda cfg, device: pytest.fail("ran before --json was checked"))
    assert main(["bench", "train", *TINY, "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"chibichat bench: error: --json {tmp_path} is a directory; pass the "
                                               "path of a file")


def test_fp8_axis_runs_fp8_matmuls():
    cfgs = bt.configs_from_args(parse(TINY + ["--dtype", "bfloat16", "--fp8", "off,on"]))
    assert [c.fp8 for c in cfgs] == [False, True] and "/fp8/" in bt._name(cfgs[1])
    r = bt.run_config(cfgs[1], calib_n=128)
    assert r["config"]["fp8"] is True and r["final_loss"] < r["first_loss"]
    assert "fp8" in bt.format_table([r]).splitlines()[0]


def test_recompute_is_an_axis_of_the_product_and_a_table_column():
    cfgs = bt.configs_from_args(parse(TINY + ["--layers", "dense,SA", "--recompute", "none,block"]))
    assert [(c.layers, c.recompute) for c in cfgs if c.dtype == "float32"] == [
        ("dense", "none"), ("dense", "block"), ("SA", "none"), ("SA", "block")]
    assert bt.configs_from_args(parse(TINY))[0].recompute == "none"
    fake = dict(config=bt.asdict(cfgs[1]), step_ms=10.0, cpu_ms=9.0, tokens_per_s=6400.0, flops_per_s=2e9,
                peak_flops_per_s=1e11, mfu=0.02, peak_mem_mb=300.0, warmup_s=1.5, first_loss=4.1, final_loss=3.2,
                trainable_params=1000, optim_mb=0.5)
    head, row = bt.format_table([fake]).splitlines()
    assert head.split()[4:6] == ["recompute", "trim"] and row.split()[4:6] == ["block", "off"]
    trims = bt.configs_from_args(parse(TINY + ["--trim-heap", "off,on"]))
    assert [(c.dtype, c.trim_heap) for c in trims] == [
        ("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)]


def test_lora_axis_trains_only_adapters_with_less_optimizer_state():
    cfgs = bt.configs_from_args(parse(TINY + ["--dtype", "float32", "--lora", "off,4"]))
    assert [c.lora for c in cfgs] == [0, 4] and bt._name(cfgs[1]).endswith("/lora=4")
    full, lora = (bt.run_config(c, calib_n=128) for c in cfgs)
    # rank 4 on q,k,v,o (32x32 each) and MLP fc/proj (32x128) in 2 layers: 2 x (4x64 + 2x160) x 4
    assert lora["trainable_params"] == 2 * (4 * 64 + 2 * 160) * 4 and full["trainable_params"] == full["params"]
    assert lora["optim_mb"] == pytest.approx(2 * 4 * lora["trainable_params"] / 2**20)  # Adam: two fp32 moments
    assert lora["optim_mb"] < full["optim_mb"] / 3 and lora["final_loss"] < lora["first_loss"]
    head, row = bt.format_table([lora]).splitlines()
    assert head.split()[6:9] == ["lora", "trainable", "optim"] and row.split()[6:8] == ["4", "4,608"]
    with pytest.raises(ChibiError, match="--lora 'x8': give off or a rank >= 1"):
        bt.configs_from_args(parse(TINY + ["--lora", "x8"]))


def test_markov_batches_are_deterministic_and_follow_the_chain():
    a = bt.markov_batches(2, 3, 10, 50, seed=7)
    b = bt.markov_batches(2, 3, 10, 50, seed=7)
    assert all((x1 == x2).all() and (y1 == y2).all() for (x1, y1), (x2, y2) in zip(a, b))
    x, y = a[0]
    assert x.shape == y.shape == (3, 10)
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are inputs shifted by one
    # every transition is one of the 4 successors of its token
    pairs = {}
    for xx, yy in a:
        for s, t in zip(xx.flatten().tolist(), yy.flatten().tolist()):
            pairs.setdefault(s, set()).add(t)
    assert max(len(v) for v in pairs.values()) <= 4


def test_run_config_figures_are_consistent():
    cfg = bt.configs_from_args(parse(TINY + ["--layers", "SA", "--dtype", "float32"]))[0]
    r = bt.run_config(cfg, calib_n=128)
    assert r["tokens_per_s"] == pytest.approx(64 / (r["step_ms"] / 1000))
    assert r["flops_per_s"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"])
    assert r["mfu"] == pytest.approx(r["flops_per_s"] / r["peak_flops_per_s"])
    assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
    assert r["peak_mem_mb"] >= r["baseline_rss_mb"] > 0
    assert r["final_loss"] < r["first_loss"]  # three optimizer steps on a 64-token chain do learn


def test_table_lists_every_config():
    cfg = bt.configs_from_args(parse(TINY))[0]
    fake = dict(config=bt.asdict(cfg), step_ms=10.0, cpu_ms=9.0, tokens_per_s=6400.0, flops_per_s=2e9, peak_flops_per_s=1e11,
                mfu=0.02, peak_mem_mb=300.0, warmup_s=1.5, first_loss=4.1, final_loss=3.2, trainable_params=1000,
                optim_mb=0.5)
    table = bt.format_table([fake, {**fake, "config": {**fake["config"], "dtype": "bfloat16"}}])
    lines = table.splitlines()
    assert len(lines) == 3 and "tok/s" in lines[0] and "MFU" in lines[0]
    assert "6,400" in lines[1] and "2.0%" in lines[1] and "bfloat16" in lines[2]


@pytest.mark.slow
def test_cli_runs_isolated_configs_and_writes_json(tmp_path, capsys):
    from chibichat.cli import main

    out = tmp_path / "r.json"
    rc = main(["bench", "train", *TINY, "--layers", "iberis", "--dtype", "float32", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "MFU" in printed and "iberis" in printed
    results = json.loads(out.read_text())
    assert len(results) == 1 and results[0]["config"]["layers"] == "iberis" and results[0]["tokens_per_s"] > 0


def test_recompute_and_trim_learn_exactly_the_same():
    cfgs = bt.configs_from_args(parse(TINY + ["--layers", "SA", "--dtype", "bfloat16", "--recompute", "none,block",
                                              "--trim-heap", "off,on"]))
    runs = [bt.run_config(c, calib_n=64) for c in cfgs]
    assert len({(r["first_loss"], r["final_loss"]) for r in runs}) == 1  # recompute and trim change no number


def test_the_footnote_says_what_peak_mb_is_on_each_device():
    """On CUDA the peak MB column is torch's allocated GPU memory, not the process's RSS the CPU rows show."""
    from chibichat.bench.train import footnote

    cpu = footnote({"device": "cpu", "threads": 2, "baseline_rss_mb": 312.4})
    assert "peak MB = max RSS of the process incl. the torch runtime (baseline before building the model: 312 MB)." \
        in cpu and "GPU memory" not in cpu
    gpu = footnote({"device": "cuda:0", "threads": 1, "baseline_rss_mb": 900.0})
    assert "peak MB = the most GPU memory torch allocated over the training steps." in gpu and "RSS" not in gpu
