import json

import pytest

from chibichat.cli import main
from chibichat.common import ChibiError, Home
from chibichat.stages.report import build_report


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fake_home(root):
    h = Home(root)
    _write(h.tokenizer_dir / "tokenizer.json", {"vocab_size": 8192, "train_chars": 2000000, "chars_per_s": 1.5e6, "pattern": "x"})
    for stage, bpb in [("base", 1.9), ("mid", 1.7), ("sft", 1.6), ("rl", 1.6)]:
        d = h.checkpoints_dir(stage, "d4")
        d.mkdir(parents=True)
        rows = [{"step": i, "loss": 5.0 - i * 0.1, "lr": 1.0, "tok_per_s": 1000.0, "elapsed_s": i} for i in range(10)]
        if stage == "rl":
            for r in rows:
                r["reward"] = 0.1 * r["step"]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{partial")
        summary = {"steps": 10, "final_val_bpb": bpb}
        if stage == "sft":
            summary["render_counts"] = {"identity": {"ok": 90, "shortened": 7, "dropped": 3}}
        _write(d / "summary.json", summary)
        ev = {"val_bpb": bpb} if stage == "base" else {"arc_easy": 0.3, "gsm8k": 0.05, "chatcore": 0.1}
        if stage == "base":
            ev.update(core=0.12, core_label="CORE-lite")
        _write(h.eval_dir(stage, "d4") / "summary.json", ev)
    return h


def test_report_has_every_section_table_and_plots(tmp_path):
    h = _fake_home(tmp_path / "home")
    path = build_report(h, wall_s=754.0)
    text = path.read_text()
    for title in ["Tokenizer training", "Base training", "Base evaluation", "Midtraining", "SFT", "RL",
                  "Chat evaluation (SFT)", "Data counts", "Summary", "estimated cost", "12m34s"]:
        assert title in text, title
    # summary table: CORE-lite label and the base bpb in the BASE column
    row = next(l for l in text.splitlines() if l.startswith("| CORE-lite"))
    assert row.split("|")[2].strip() == "0.1200"
    bpb = next(l for l in text.splitlines() if l.startswith("| val bpb"))
    assert bpb.split("|")[2].strip() == "1.9000"
    assert "| identity | 90 | 7 | 3 |" in text
    # DPO is not a pipeline stage: without a DPO run it has no column and no section (never "not run")
    assert "| Metric | BASE | MID | SFT | RL |" in text and "DPO" not in text
    for png in ["loss.png", "lr.png", "reward.png"]:
        assert (h.report_dir / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in text


def test_report_marks_missing_stages_not_run(tmp_path):
    h = Home(tmp_path / "home")
    (h.root / "checkpoints").mkdir(parents=True)
    text = build_report(h).read_text()
    assert text.count("not run") >= 8


def test_report_missing_home_is_clear_error(tmp_path, capsys):
    with pytest.raises(ChibiError, match="does not exist"):
        build_report(Home(tmp_path / "nope"))
    assert main(["report", "--home", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_table_shows_extra_tasks_and_partial_chatcore(tmp_path):
    h = Home(tmp_path / "home")
    d = h.checkpoints_dir("sft", "d2")
    d.mkdir(parents=True)
    _write(d / "summary.json", {"steps": 3})
    _write(h.eval_dir("sft", "d2") / "summary.json",
           {"spelling_ja": 0.25, "spelling_ja_n": 4, "arithmetic_ja": 0.5, "arithmetic_ja_n": 4, "chatcore_partial": 0.375})
    text = build_report(h).read_text()
    row = next(l for l in text.splitlines() if l.startswith("| arithmetic_ja"))
    assert row.split("|")[4].strip() == "0.5000"  # the SFT column
    assert any(l.startswith("| ChatCORE (partial") and "0.3750" in l for l in text.splitlines())


def test_cost_line_never_invents_a_price():
    from chibichat.common import ChibiError
    from chibichat.stages.report import _estimated_cost

    h = 3600.0
    assert _estimated_cost({"gpus": "8 x NVIDIA H100 80GB HBM3"}, h, None) == "$24.00 (8 device(s) x $3.00/h x 1.00 h)"
    assert _estimated_cost({"gpus": "1 x NVIDIA A100-SXM4-80GB"}, h, None) == "$1.79 (1 device(s) x $1.79/h x 1.00 h)"
    # L40S is not L4, and an unknown GPU gets no made-up rate: it says so and names the flag
    assert _estimated_cost({"gpus": "2 x NVIDIA L40S"}, h, None) == (
        "unknown (no price on file for NVIDIA L40S; pass --hourly-usd with its price per device-hour, known: H100, "
        "H200, A100, V100, L4, A10)")
    assert _estimated_cost({"gpus": "2 x NVIDIA L40S"}, h, 1.5) == "$3.00 (2 device(s) x $1.50/h x 1.00 h)"
    assert _estimated_cost({"gpus": "none"}, h, None) == "$0.00 (1 device(s) x $0.00/h x 1.00 h)"
    with pytest.raises(ChibiError, match="--hourly-usd must be a price >= 0, got -1"):
        _estimated_cost({"gpus": "none"}, h, -1.0)


def test_report_shows_dpo_reward_accuracy_and_margin(tmp_path):
    h = _fake_home(tmp_path / "home")
    d = h.checkpoints_dir("dpo", "d4")
    rows = [{"step": s, "reward_accuracy": a, "reward_margin": m, "dpo_loss": 0.6}
            for s, a, m in [(0, 0.0, 0.0), (10, 0.7, 0.4), (20, 0.9, 1.1)]]
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _write(d / "summary.json", {"steps": 20, "reward_accuracy_before": 0.0, "reward_accuracy_after": 0.9})
    text = build_report(h).read_text()
    assert "| Metric | BASE | MID | SFT | RL | DPO |" in text and "## DPO (d4)" in text
    assert "reward_accuracy_after" in text and "0.9000" in text
    for png in ["reward_accuracy.png", "reward_margin.png"]:
        assert (h.report_dir / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in text
