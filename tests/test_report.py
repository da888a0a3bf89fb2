import difflib
import json
import shutil
from pathlib import Path

import pytest

from chibichat.cli import main
from chibichat.common import ChibiError, Home
from chibichat.stages.report import build_report


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _sft_home(tmp_path, eval_summary) -> Home:
    """A home with one finished SFT run (tag d2, 3 steps) whose evaluation summary is `eval_summary`."""
    h = Home(tmp_path / "home")
    _write(h.checkpoints_dir("sft", "d2") / "summary.json", {"steps": 3})
    _write(h.eval_dir("sft", "d2") / "summary.json", eval_summary)
    return h


FIXTURE = Path(__file__).parent / "fixtures" / "report-home"
GOLDEN = Path(__file__).parent / "fixtures" / "report-home.md"


def _fixture_report(tmp_path) -> tuple[Home, str]:
    """The report of the fixture run (a small speedrun's artifacts, shaped as the stages write them),
    built in a copy so the fixture stays untouched; the text after the environment header."""
    home = Home(tmp_path / "home")
    shutil.copytree(FIXTURE, home.root)
    text = build_report(home).read_text(encoding="utf-8")
    return home, text[text.index("## Summary"):]


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory):
    return _fixture_report(tmp_path_factory.mktemp("report"))


def test_report_card_of_the_fixture_run_is_the_golden_file(fixture_report):
    """The exact rendered card. After an intended change of the layout, regenerate the golden file with
    PYTHONPATH=. python -c "import tests.test_report as t, pathlib, tempfile;
    t.GOLDEN.write_text(t._fixture_report(pathlib.Path(tempfile.mkdtemp()))[1])" and review its diff."""
    _, text = fixture_report
    expected = GOLDEN.read_text(encoding="utf-8")
    if text != expected:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), text.splitlines(), "golden", "rendered", lineterm=""))
        pytest.fail("the report differs from tests/fixtures/report-home.md:\n" + diff[:6000])


def test_report_card_structure(fixture_report):
    home, text = fixture_report
    lines = text.splitlines()
    assert [l for l in lines if l.startswith("## ") or l.startswith("### ")] == [
        "## Summary", "## Evaluations by stage (d4)", "## Held-out skills (d4)", "## Tokenizer",
        "## BASE: pretraining (d4)", "### BASE evaluation", "## MID: midtraining (d4)", "### MID evaluation",
        "## SFT: supervised fine-tuning (d4)", "### SFT evaluation", "## RL: reinforcement learning (d4)",
        "### RL evaluation", "## Timings", "## Appendix: every recorded value"]
    # the summary: one row per stage with its headline and its time from the speedrun's timing
    assert "| BASE (d4) | val bpb 1.5668 · CORE-lite 0.0213 | 3m43s |" in lines
    assert "| RL (d4) | pass@1 0.0500 → 0.1000 · ChatCORE (partial) 0.1056 · skills EN 0.4000 | 1m26s |" in lines
    assert "| **total** |  | **7m56s** |" in lines
    # the base table holds the figures that matter, the plots that show them right below it
    base = text[text.index("## BASE: pretraining"):text.index("### BASE evaluation")]
    assert "| MFU (median over steps) | 25.0% |" in base and "| throughput | 10,326 tok/s |" in base
    assert "![base_loss.png](base_loss.png) ![val_bpb.png](val_bpb.png)" in base
    rl = text[text.index("## RL: reinforcement"):text.index("### RL evaluation")]
    assert "| mean reward by fifths of the run | 0.150 → 0.200 → 0.250 → 0.300 → 0.350 |" in rl
    assert "| pass@8 | 0.2500 | 0.3500 |" in rl and "![reward.png](reward.png)" in rl
    assert "| chitchat | 396 | 380 | 12 | 4 |" in text  # mixture rows with the over-length counts
    for png in ["loss.png", "lr.png", "val_bpb.png", "base_loss.png", "mid_loss.png", "sft_loss.png", "reward.png"]:
        assert (home.report_dir / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in text, png
    # DPO did not run: no column, no section (never "not run")
    assert "DPO" not in text


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_appendix_keeps_every_recorded_value_reachable(fixture_report):
    from chibichat.stages.report import APPENDIX_SHOWN_ELSEWHERE

    _, text = fixture_report
    appendix = text[text.index("## Appendix"):]
    files = [p for p in FIXTURE.rglob("*.json")]
    assert len(files) == 11
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        block = appendix[appendix.index(f"<summary>{path.relative_to(FIXTURE).as_posix()}</summary>"):]
        block = block[:block.index("</details>")]
        for key, _ in _leaves(data):
            hidden = [part for part in key.split(".") if part in APPENDIX_SHOWN_ELSEWHERE]
            if hidden:  # named as shown elsewhere, with where
                assert f"{hidden[0]}: {APPENDIX_SHOWN_ELSEWHERE[hidden[0]]}" in block, (path, key)
            else:
                assert f"- {key}: " in block, (path, key)


def test_base_evaluation_lists_jglue_scores(tmp_path):
    from chibichat.stages.report import StageArtifacts, base_eval_section

    st = StageArtifacts("base", "d2", {"steps": 3}, [], {"val_bpb": 1.25, "jnli": 0.5, "jsquad_f1": 0.125})
    assert base_eval_section(st).splitlines()[5:] == ["| val bpb | 1.2500 |", "| JNLI (few-shot) | 0.5000 |",
                                                      "| JSQuAD F1 (few-shot) | 0.1250 |"]


def test_report_reads_eval_jglue_and_eval_chat_jglue_scores_apart(tmp_path):
    # one SFT checkpoint scored by `eval jglue` (few-shot: jsquad_em, jsquad_n) and `eval chat --tasks jsquad`
    h = _sft_home(tmp_path,
                  {"jsquad_em": 0.125, "jsquad_f1": 0.25, "jsquad_n": 8, "jsquad_chat": 0.5, "jsquad_chat_centered": 0.5,
                   "jsquad_chat_n": 4, "jsquad_chat_skipped_too_long": 0, "chat_eval": {"tasks": [{"task": "jsquad"}]}})
    lines = build_report(h).read_text().splitlines()
    sft = {l.split("|")[1].strip(): l.split("|")[4].strip() for l in lines if l.startswith("| JSQuAD") or
           l.startswith("| jsquad_chat")}  # the SFT column of the evaluations table
    assert sft == {"JSQuAD EM": "0.1250", "JSQuAD F1": "0.2500", "jsquad_chat": "0.5000"}
    assert "| jsquad | 0.5000 | 0.5000 | 4 | 0 |" in lines  # the SFT evaluation section: eval chat's own


def test_report_marks_missing_stages_not_run(tmp_path):
    h = Home(tmp_path / "home")
    (h.root / "checkpoints").mkdir(parents=True)
    text = build_report(h).read_text()
    assert text.count("not run") >= 8
    assert "## Evaluations by stage\n\nNo stage has been evaluated yet.\n" in text  # no table of dashes


def test_report_missing_home_is_clear_error(tmp_path, capsys):
    with pytest.raises(ChibiError, match="does not exist"):
        build_report(Home(tmp_path / "nope"))
    assert main(["report", "--home", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_table_shows_extra_tasks_and_partial_chatcore(tmp_path):
    h = _sft_home(tmp_path,
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
    assert _estimated_cost({"gpus": "none"}, h, None) == \
        "$0.00 on your own CPU (pass --hourly-usd with a rented machine's price per hour)"
    assert _estimated_cost({"gpus": "none"}, h, 0.1) == "$0.10 (1 device(s) x $0.10/h x 1.00 h)"
    with pytest.raises(ChibiError, match="--hourly-usd must be a price >= 0, got -1"):
        _estimated_cost({"gpus": "none"}, h, -1.0)


def test_report_shows_dpo_reward_accuracy_and_margin(tmp_path):
    home = Home(tmp_path / "home")
    shutil.copytree(FIXTURE, home.root)
    d = home.checkpoints_dir("dpo", "d4")
    rows = [{"step": s, "reward_accuracy": a, "reward_margin": m, "dpo_loss": 0.6}
            for s, a, m in [(0, 0.0, 0.0), (10, 0.7, 0.4), (20, 0.9, 1.1)]]
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _write(d / "summary.json", {"stage": "dpo", "data": "file:prefs.jsonl", "beta": 0.1, "steps": 20,
                                "train_time_s": 12.0, "wall_time_s": 15.0, "train_pairs": 90, "val_pairs": 10,
                                "pairs_left_out_too_long": {"train": 2, "val": 0},
                                "reward_accuracy_before": 0.0, "reward_accuracy_after": 0.9,
                                "reward_margin_before": 0.0, "reward_margin_after": 1.1,
                                "val_dpo_loss_before": 0.6931, "val_dpo_loss_after": 0.41, "evals": rows})
    text = build_report(home).read_text()
    assert "| Metric | BASE | MID | SFT | RL | DPO |" in text
    assert "| DPO (d4) | reward accuracy 0.0000 → 0.9000 | 0m15s |" in text
    section = text[text.index("## DPO: preference tuning (d4)"):text.index("### DPO evaluation")]
    assert section.splitlines()[2:] == [
        "| | |", "|---|---|", "| data | file:prefs.jsonl |", "| beta | 0.1000 |",
        "| pairs | 90 train, 10 held out (2 + 0 left out as too long) |", "| steps | 20 |",
        "| training time | 0m12s (stage wall time 0m15s) |", "| held-out reward accuracy | 0.0000 → 0.9000 |",
        "| held-out reward margin | 0.0000 → 1.1000 |", "| held-out DPO loss | 0.6931 → 0.4100 |", "",
        "![reward_accuracy.png](reward_accuracy.png) ![reward_margin.png](reward_margin.png)", ""]
    assert "- (not repeated here: evals: plotted in reward_accuracy.png and reward_margin.png)" in text
    for png in ["reward_accuracy.png", "reward_margin.png"]:
        assert (home.report_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_report_shows_one_tag_alone_and_refuses_an_unknown_one(tmp_path, capsys):
    """Two runs in one home: the report of a tag never fills a stage it lacks from the other run (that stage is
    "not run"), the default is the newest base tag, and a --tag no stage ran under is refused with the known
    tags listed."""
    import os

    h = Home(tmp_path / "home")
    for tag, bpb in (("d4", 1.5), ("hour-d5", 1.25)):
        _write(h.checkpoints_dir("base", tag) / "summary.json", {"final_val_bpb": bpb, "steps": 10})
    _write(h.checkpoints_dir("mid", "hour-d5") / "summary.json", {"val_loss": 2.0, "steps": 3})
    os.utime(h.checkpoints_dir("base", "d4"), (1, 1))  # d4 is the older run
    text = build_report(h, "d4").read_text()
    assert "| BASE (d4) | val bpb 1.5000 | - |" in text and "| MID (d4) | not run | - |" in text
    assert "## MID: midtraining (d4)\n\nnot run\n" in text and "## Evaluations by stage (d4)" in text
    assert "hour-d5" not in text and "2.0000" not in text
    assert "## BASE: pretraining (hour-d5)" in build_report(h).read_text()  # the newest base tag
    with pytest.raises(ChibiError) as e:
        build_report(h, "d5")
    assert str(e.value) == f"--tag 'd5': no stage in {h.root} has run under that tag; known tags: d4, hour-d5"
    assert main(["report", "--home", str(h.root), "--tag", "d5"]) == 2
    assert "known tags: d4, hour-d5" in capsys.readouterr().err


def test_report_times_a_stage_by_its_own_tags_speedrun_timing(tmp_path):
    """timing.json keeps each tag's steps apart: the report of a tag another speedrun timed (and this one did
    not) shows the stage's own wall time, not the other run's seconds."""
    h = Home(tmp_path / "home")
    _write(h.checkpoints_dir("base", "d4") / "summary.json", {"steps": 10, "wall_time_s": 90.0})
    _write(h.checkpoints_dir("base", "hour-d5") / "summary.json", {"steps": 10, "wall_time_s": 1500.0})
    _write(h.report_dir / "timing.json", {"runs": {"hour-d5": {"stages": {"pretrain": 1400.0, "eval-base": 30.0},
                                                               "wall_s": 1430.0}}})
    text = build_report(h, "d4").read_text()
    assert "| BASE (d4) | val bpb - | 1m30s |" in text
    assert "no speedrun timing recorded for d4 (report/timing.json)" in text and "23m" not in text
    assert "| BASE (hour-d5) | val bpb - | 23m50s |" in build_report(h, "hour-d5").read_text()
    # a file from before timings were kept per tag is attributed to no run, and the report says so
    _write(h.report_dir / "timing.json", {"stages": {"pretrain": 1400.0}, "wall_s": 1400.0})
    text = build_report(h, "d4").read_text()
    assert "| BASE (d4) | val bpb - | 1m30s |" in text
    assert "report/timing.json also holds timings recorded before they were kept per tag" in text


def test_report_refuses_summaries_and_metrics_of_the_wrong_shape_by_name(tmp_path):
    """A summary.json that is JSON but not an object, undecodable bytes, or a metrics row that is not an object
    is a ChibiError naming the file, not a traceback; a last metrics line cut mid-character (a killed write) is
    left out like any partial last line."""
    h = Home(tmp_path / "home")
    d = h.checkpoints_dir("base", "d2")
    _write(d / "summary.json", [1, 2])
    with pytest.raises(ChibiError) as e:
        build_report(h)
    assert str(e.value) == f"{d / 'summary.json'} is corrupt (a JSON list, not an object); re-run the stage that writes it"
    (d / "summary.json").write_bytes(b'{"steps": "\xff"}')
    with pytest.raises(ChibiError, match=r"summary.json is corrupt \('utf-8' codec can't decode byte 0xff"):
        build_report(h)
    (d / "summary.json").unlink()
    (d / "metrics.jsonl").write_text('{"step": 0, "loss": 7.0}\n3\n')
    with pytest.raises(ChibiError) as e:
        build_report(h)
    assert str(e.value) == f"{d / 'metrics.jsonl'} line 2 is not a JSON object; delete the file or re-run the stage"
    (d / "metrics.jsonl").write_bytes('{"step": 0, "loss": 7.0}\n{"step": 1, "sample": "あ'.encode()[:-1])
    assert "## BASE: pretraining (d2)" in build_report(h).read_text()
    _write(h.report_dir / "timing.json", {"runs": []})
    with pytest.raises(ChibiError) as e:
        build_report(h)
    assert str(e.value) == (f"{h.report_dir / 'timing.json'} is corrupt (its \"runs\" is not an object); delete it "
                            "(the report then shows the stages' own times)")


def test_an_unfinished_stage_with_metrics_only_heads_its_row_as_unfinished():
    """Pretraining stopped before its summary: its row says so, like the other stages', not "val bpb -" beside
    the val bpb its metrics logged."""
    from chibichat.stages.report import StageArtifacts, headline

    metrics = [{"step": 0, "val_bpb": 3.64}]
    for stage in ("base", "mid", "rl"):
        assert headline(StageArtifacts(stage, "d2", None, metrics, None)) == "ran (no summary: unfinished?)", stage
    assert headline(StageArtifacts("base", "d2", {"steps": 3}, metrics, None)) == "val bpb -"  # finished, no bpb
