"""`chibichat bench sweep`: each depth pretrained for the same minutes, tabulated and plotted."""

import json

import pytest

from chibichat.bench import sweep
from chibichat.cli import main
from chibichat.common import ChibiError

SMALL = ["--minutes", "0.08", "--seq-len", "32", "--device-batch", "4", "--total-batch", "128",
         "--eval-tokens", "512", "--device", "cpu", "--dtype", "float32"]


@pytest.mark.parametrize("text, why", [("2,x", "comma list of integers"), ("0,2", "distinct depths >= 1"),
                                       ("2,2", "distinct depths >= 1"), ("", "distinct depths >= 1")])
def test_bad_depths_are_refused_with_the_fix(text, why):
    with pytest.raises(ChibiError, match=why):
        sweep.parse_depths(text)


def test_sweep_runs_each_depth_for_the_budget_then_resumes_without_training(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    assert main(["tokenizer", "train", "--home", str(home), "--vocab-size", "512", "--max-chars", "200000"]) == 0
    assert main(["bench", "sweep", "--home", str(home), "--depths", "2,1", *SMALL]) == 0
    out = capsys.readouterr().out
    report = home / "report"
    data = json.loads((report / "sweep-0.08m.json").read_text())
    assert data["minutes"] == 0.08 and [r["depth"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        summary = json.loads((home / "checkpoints" / "base" / f"sweep-0.08m-d{row['depth']}" / "summary.json").read_text())
        # every row is the run's own summary, and the budget (not the 10^6-step cap) chose its length
        assert row["steps"] == summary["steps"] == summary["minutes_fit"]["num_steps"] < 1000000
        assert row["tokens"] == 128 * row["steps"] and row["val_bpb"] == summary["final_val_bpb"]
        assert summary["minutes_fit"]["minutes"] == 0.08 and summary["depth"] == row["depth"]
        assert row["tokens_per_param"] == pytest.approx(row["tokens"] / summary["scaling_params"])
    assert data["rows"][0]["scaling_params"] < data["rows"][1]["scaling_params"]
    md = (report / "sweep-0.08m.md").read_text()
    assert md.count("(best)") == 1 and "| 1 |" in md and "| 2 |" in md
    assert (report / "sweep-0.08m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.count("$ chibichat pretrain") == 2

    # Re-running reads both summaries and trains nothing.
    def no_training(*a, **k):
        raise AssertionError("a finished depth was trained again")

    monkeypatch.setattr(sweep.subprocess, "run", no_training)
    assert main(["bench", "sweep", "--home", str(home), "--depths", "1,2", *SMALL, "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.count("done already") == 2
    assert json.loads((tmp_path / "o" / "sweep-0.08m.json").read_text())["rows"] == data["rows"]
    # Other settings under the same tags (the minutes and the depth) are refused, naming the flag; where a
    # run ran (--device, --dtype) is no setting of the experiment.
    for flag, value, had in (("--seq-len", "64", "32"), ("--corpus", "embedded-ja", "embedded-en"),
                             ("--eval-tokens", "1024", "512"), ("--layers", "AS", "dense")):
        with pytest.raises(ChibiError, match=rf"^d1: .*sweep-0.08m-d1 was pretrained with {flag} {had}, this sweep asks {value}: "):
            sweep.run(_args(tmp_path, depths="1,2", home=home, extra=[flag, value]))
    assert sweep.run(_args(tmp_path, depths="1,2", home=home, extra=["--dtype", "auto"])) == 0


def test_a_failed_depth_names_itself_and_how_to_resume(tmp_path, monkeypatch):
    class Failed:
        returncode = 3

    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ChibiError, match=r"pretraining depth 1 failed \(exit code 3\).*Re-run the sweep to resume"):
        sweep.run(_args(tmp_path, depths="1"))


def test_an_out_that_is_a_file_is_refused_before_any_depth_trains(tmp_path, monkeypatch):
    """It used to end the sweep, after every depth had trained, with a FileExistsError traceback."""
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: pytest.fail("a depth trained"))
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ChibiError) as e:
        sweep.run(_args(tmp_path, depths="1", extra=["--out", str(f)]))
    assert str(e.value) == f"--out {f} is a file; pass a directory (it is created when missing)"


def _args(tmp_path, depths, home=None, extra=()):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--home")
    sweep.add_args(p)
    return p.parse_args(["--home", str(home or tmp_path), "--depths", depths, *SMALL, *extra])


def test_flag_mismatch_compares_each_pair_as_the_recorded_type(monkeypatch):
    from chibichat.bench.reuse import flag_mismatch
    from chibichat.train import checkpoint

    recorded = {"minutes": 0.08, "seq_len": 32, "corpus": "embedded-en", "from_stage": "mid", "eval_tokens": None,
                "device": "cuda", "no_samples": True}
    monkeypatch.setattr(checkpoint, "resolve_checkpoint", lambda home, stage, tag, step=None: None)
    monkeypatch.setattr(checkpoint, "read_meta", lambda where: {"flags": recorded})
    ok = ["pretrain", "--minutes", "0.080", "--seq-len", "32", "--corpus", "embedded-en", "--from", "mid",
          "--device", "cpu", "--home", "/elsewhere"]
    assert flag_mismatch(None, "base", "t", ok) is None  # 0.080 == 0.08; where it ran does not matter
    assert flag_mismatch(None, "base", "t", ok + ["--seq-len", "64"]) == ("--seq-len", 32, "64")
    assert flag_mismatch(None, "base", "t", ["x", "--seq-len", "3x"]) == ("--seq-len", 32, "3x")
    assert flag_mismatch(None, "base", "t", ["x", "--eval-tokens", "512"]) == ("--eval-tokens", None, "512")
    assert flag_mismatch(None, "base", "t", ["x", "--no-samples", "1"]) == ("--no-samples", True, "1")
    # --compile (a switch, no value) says how a stage ran, as --device does: never compared, wherever it stands
    assert flag_mismatch(None, "base", "t", ok[:3] + ["--compile"] + ok[3:]) is None
    assert flag_mismatch(None, "base", "t", ["x", "--compile", "--seq-len", "64"]) == ("--seq-len", 32, "64")
    assert flag_mismatch(None, "base", "t", ["x", "--depth", "2"]) == ("--depth", "(not recorded)", "2")
    with pytest.raises(ValueError, match="--flag value pairs"):
        flag_mismatch(None, "base", "t", ["x", "--no-samples"])  # any other switch is not a pair
