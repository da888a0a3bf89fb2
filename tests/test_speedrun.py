"""End to end: `chibichat speedrun --preset micro` into a temp home, killed mid-pretrain, re-run to the end,
then run a third time (everything skipped)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from chibichat.stages.speedrun import PRESETS, plan
from chibichat.common import ChibiError, Home


def _speedrun(home, *extra, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "chibichat", "speedrun", "--preset", "micro", "--home", str(home), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True, **kw,
    )


def test_plan_covers_every_stage_in_order(tmp_path):
    steps = plan(Home(tmp_path), PRESETS["cpu"], "en", "dense", "cpu")
    assert [s.name for s in steps] == ["tokenizer", "tokenizer-eval", "pretrain", "eval-base", "midtrain", "eval-mid",
                                      "skills-mid", "sft", "eval-sft", "skills-sft", "rl", "eval-rl", "skills-rl"]
    # each training stage starts from the previous stage's checkpoint of the same tag
    argv = {s.name: s.argv for s in steps}
    assert argv["midtrain"][argv["midtrain"].index("--from") + 1] == "base"
    assert argv["sft"][argv["sft"].index("--from") + 1] == "mid"
    assert argv["rl"][argv["rl"].index("--from") + 1] == "sft"
    ja = plan(Home(tmp_path), PRESETS["cpu"], "ja", "iberis", "cpu")
    assert "embedded-ja" in ja[0].argv and ["--split", "ja"] == ja[0].argv[4:6]
    assert "--layers" in ja[2].argv and "iberis" in ja[2].argv
    assert ja[2].marker.parent.name == "d4-iberis"
    # midtraining and SFT each average four runs (--soup 4): their folders are the step's outputs too (--force
    # midtrain / sft removes them), and the step runs on one process
    for name, stage in (("midtrain", "mid"), ("sft", "sft")):
        st = next(s for s in steps if s.name == name)
        assert st.argv[st.argv.index("--soup") + 1] == "4" and not st.distributed
        assert [d.name for d in st.outputs] == ["d4", "d4-soup0", "d4-soup1", "d4-soup2", "d4-soup3"]
        assert all(d.parent == Home(tmp_path).checkpoints_dir(stage, "d4").parent for d in st.outputs)
    # offline RL trains on one- and two-step problems in turn (on two-step ones alone it unlearns one-step ones)
    for p, want in ((steps, "arithmetic,arithmetic-multi"), (ja, "arithmetic-ja,arithmetic-multi-ja")):
        rl = next(s.argv for s in p if s.name == "rl")
        assert rl[rl.index("--task") + 1] == want
    # ... and so does `chibichat rl` run by hand without --task
    from chibichat.cli import build_parser
    assert build_parser().parse_args(["rl"]).task == "arithmetic,arithmetic-multi"
    # the Japanese chat stages train on the Japanese tasks alone (the stages' own default adds the English ones)
    from chibichat.stages.midtrain import MID_MIX_JA
    from chibichat.stages.sft import SFT_MIX_JA
    for name, want in (("midtrain", MID_MIX_JA), ("sft", SFT_MIX_JA)):
        ja_argv = next(s.argv for s in ja if s.name == name)
        assert ja_argv[ja_argv.index("--mix") + 1] == want and "-ja=" in want and "mmlu-dev" not in want
        assert "--mix" not in argv[name]
    # ... at lower learning rates (midtraining half the base's, SFT a quarter of its default), English at the
    # stages' defaults; each parses to that rate
    for name, frac in (("midtrain", 0.5), ("sft", 0.25)):
        ja_argv = next(s.argv for s in ja if s.name == name)
        assert ja_argv.count("--lr-frac") == 1 and build_parser().parse_args(ja_argv).lr_frac == frac
        assert "--lr-frac" not in argv[name]
    assert [s.title for s in ja if s.name == "midtrain"] == ["midtrain: chat format, tools"]  # no MC data
    # ... but not cpu-hour's: at d5 and its steps the English tasks beside the Japanese ones scored higher
    hour_ja = plan(Home(tmp_path), PRESETS["cpu-hour"], "ja", "dense", "cpu")
    assert [("--mix" in s.argv or "--lr-frac" in s.argv) for s in hour_ja if s.name in ("midtrain", "sft")] == \
        [False, False]
    assert [s.title for s in steps if s.name == "midtrain"] == ["midtrain: chat format, tools, multiple choice"]


def test_the_cpu_preset_trains_a_smaller_model_where_its_stages_compute_in_fp32(tmp_path, monkeypatch, capsys):
    """Where the stages compute in fp32 on the CPU (no native bf16 kernels, or --dtype float32) a step is several
    times slower, and the cpu preset plans d3 instead of d4: its pretraining depth, its tag and every later
    stage's. A GPU run, an asked-for bf16 and the other presets keep their depth; the plan's --depth and its tag
    come from one place."""
    import chibichat.stages.speedrun as speedrun
    from chibichat.cli import main
    from chibichat.stages.speedrun import for_machine

    cpu = PRESETS["cpu"]
    for fast, dtype, device, depth in ((True, "auto", "cpu", 4), (False, "auto", "cpu", 3), (True, "float32", "cpu", 3),
                                       (False, "bfloat16", "cpu", 4), (False, "auto", "cuda", 4),
                                       (False, "float32", "cuda", 4)):
        monkeypatch.setattr(speedrun, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert for_machine(cpu, device, dtype).depth == depth, (fast, dtype, device)
        err = capsys.readouterr().err
        assert ("(--dtype float32)" in err) == (depth == 3 and dtype == "float32")
        assert ("trains d3 with a 2,048-token vocabulary instead of d4" in err) == (depth == 3)
        assert for_machine(cpu, device, dtype).tokenizer == (cpu.tokenizer_fp32 if depth == 3 else cpu.tokenizer)
        assert for_machine(cpu, device, dtype, "ja").tokenizer == cpu.tokenizer  # Japanese: tokenizer_ja, as before
        capsys.readouterr()
    for name in ("micro", "cpu-hour", "d20"):
        assert for_machine(PRESETS[name], "cpu", "float32") is PRESETS[name]
    for name, preset in PRESETS.items():
        if not preset.gpu:
            pre = next(s.argv for s in plan(Home(tmp_path), preset, "en", "dense", "cpu") if s.name == "pretrain")
            assert pre.count("--depth") == 1 and pre[pre.index("--depth") + 1] == str(preset.depth), name
            assert pre[pre.index("--tag") + 1] == preset.tag_prefix + f"d{preset.depth}", name

    monkeypatch.setattr(speedrun, "cpu_has_fast_bf16", lambda: False)
    for lang, dtype, depth, vocab in (("en", (), "3", "2048"), ("en", ("--dtype", "bfloat16"), "4", "4096"),
                                      ("ja", (), "3", "1024"), ("ja", ("--dtype", "bfloat16"), "4", "1024")):
        assert main(["speedrun", "--preset", "cpu", "--lang", lang, "--home", str(tmp_path / f"h-{lang}"), *dtype,
                     "--dry-run"]) == 0
        out, err = capsys.readouterr()
        lines = [line.split() for line in out.splitlines() if line.strip().startswith("$ chibichat ")]
        what = ("d3 with a 2,048-token vocabulary instead of d4 with a 4,096-token vocabulary" if lang == "en" else
                "d3 instead of d4")
        note = (f"note: preset cpu trains {what} here: its stages compute in fp32 (this CPU has no native bf16 "
                "kernels), several times slower per step, and the smaller model learns more in the same minutes")
        assert (note in err) == (depth == "3"), err
        pre = next(a for a in lines if a[2] == "pretrain")
        assert pre[pre.index("--depth") + 1] == depth and pre[pre.index("--tag") + 1] == "d" + depth
        assert {a[a.index("--from-tag") + 1] for a in lines if "--from-tag" in a} == {"d" + depth}
        tok = next(a for a in lines if a[2:4] == ["tokenizer", "train"])
        assert tok[tok.index("--vocab-size") + 1] == vocab, (lang, dtype)


def test_precision_and_memory_flags_reach_the_stages_that_take_them(tmp_path):
    from chibichat.cli import build_parser
    from chibichat.stages.speedrun import compile_stages, training_flags

    parser = build_parser()
    args = parser.parse_args(["speedrun", "--dtype", "float32", "--compile", "--fp8", "--recompute", "block",
                              "--trim-heap"])
    assert training_flags(args) == ["--fp8", "--recompute", "block", "--trim-heap"]
    steps = plan(Home(tmp_path), PRESETS["cpu"], "en", "dense", "cpu", args.dtype, training_flags(args),
                 compile_stages(True, PRESETS["cpu"], "cuda"))
    for step in steps:
        # every step's command line is one its stage's own parser accepts, with the values given
        parsed = parser.parse_args(step.argv)
        training = step.name in ("pretrain", "midtrain", "sft", "rl")
        if step.name.startswith("tokenizer"):
            assert "--dtype" not in step.argv
            continue
        assert parsed.dtype == "float32", step.name
        assert getattr(parsed, "fp8", False) is training and getattr(parsed, "trim_heap", False) is training
        assert getattr(parsed, "recompute", "none") == ("block" if training else "none"), step.name
        assert getattr(parsed, "compile", False) is (step.name in ("pretrain", "midtrain", "sft")), step.name
    # defaults add nothing
    default = parser.parse_args(["speedrun"])
    assert training_flags(default) == []
    plain = plan(Home(tmp_path), PRESETS["cpu"], "en", "dense", "cpu")
    assert all("--dtype" not in s.argv and "--fp8" not in s.argv for s in plain)


def test_force_redoes_the_named_step_and_every_step_that_reads_its_output(tmp_path, capsys):
    from chibichat.cli import main
    from chibichat.stages.speedrun import PRESETS, forced_steps, plan

    steps = plan(Home(tmp_path), PRESETS["cpu"], "en", "dense", "cpu")
    assert forced_steps(steps, ["rl"]) == ["rl", "eval-rl", "skills-rl"]
    assert forced_steps(steps, ["eval-sft"]) == ["eval-sft", "skills-sft"]  # skills-sft's files are in eval-sft's folder
    assert forced_steps(steps, ["skills-mid"]) == ["skills-mid"]
    assert forced_steps(steps, ["midtrain"]) == ["midtrain", "eval-mid", "skills-mid", "sft", "eval-sft", "skills-sft",
                                                 "rl", "eval-rl", "skills-rl"]
    assert forced_steps(steps, ["tokenizer"]) == [s.name for s in steps]
    assert forced_steps(steps, []) == []
    # every step's needs name earlier steps of the plan (one pass in order closes the set)
    for preset in ("cpu", "d20"):
        seen = set()
        for step in plan(Home(tmp_path), PRESETS[preset], "en", "dense", "cpu"):
            assert set(step.needs) <= seen, (preset, step.name, step.needs)
            seen.add(step.name)
    # a dry run says what --force would redo, and deletes nothing
    marker = Home(tmp_path).checkpoints_dir("rl", "d2") / "summary.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    assert main(["speedrun", "--preset", "micro", "--home", str(tmp_path), "--force", "rl", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rl: would be redone (named by --force): its outputs deleted first" in out
    assert marker.exists()


def test_unknown_force_stage_is_a_clear_error(tmp_path, capsys):
    from chibichat.cli import main

    assert main(["speedrun", "--preset", "micro", "--home", str(tmp_path), "--force", "nope", "--dry-run"]) == 2
    assert "not a speedrun stage" in capsys.readouterr().err


@pytest.mark.slow
def test_micro_speedrun_killed_resumed_and_skipped(tmp_path):
    home = tmp_path / "home"
    base = home / "checkpoints" / "base" / "d2"

    # 1) start, and SIGKILL the whole process group once pretraining has saved its first checkpoint
    p = _speedrun(home)
    deadline = time.time() + 600
    while time.time() < deadline and not (base / "step_000012").exists():
        if p.poll() is not None:
            pytest.fail("speedrun ended before the first pretraining checkpoint:\n" + p.stdout.read())
        time.sleep(0.2)
    assert (base / "step_000012").exists(), "no checkpoint within the time limit"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (base / "summary.json").exists()
    tok_mtime = (home / "tokenizer" / "tokenizer.json").stat().st_mtime

    # 2) re-run: finished stages skipped, pretraining resumed, everything else run
    p = _speedrun(home)
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out
    assert "tokenizer: done already" in out
    assert "pretrain: interrupted earlier, resuming" in out
    assert (home / "tokenizer" / "tokenizer.json").stat().st_mtime == tok_mtime  # not redone
    for stage in ["base", "mid", "sft", "rl"]:
        d = home / "checkpoints" / stage / "d2"
        assert (d / "summary.json").exists(), stage
        assert any(x.name.startswith("step_") for x in d.iterdir()), stage
        assert (d / "metrics.jsonl").read_text().strip(), stage
        assert json.loads((home / "eval" / stage / "d2" / "summary.json").read_text()), stage
        if stage != "base":  # the held-out skills prompts ran after every chat stage (2 per skill in micro)
            assert json.loads((home / "eval" / stage / "d2" / "summary.json").read_text())["skills_n"] == 14, stage
    # RL moved the weights (its rewards varied): the RL checkpoint is not SFT's
    from safetensors.torch import load_file

    from chibichat.train.checkpoint import list_steps, step_dir

    def weights(stage):
        d = home / "checkpoints" / stage / "d2"
        return load_file(step_dir(d, list_steps(d)[-1]) / "model.safetensors")

    rl_summary = json.loads((home / "checkpoints" / "rl" / "d2" / "summary.json").read_text())
    assert rl_summary["skipped_steps"] < rl_summary["steps"] == 4, rl_summary  # some step had a reward signal
    sft_w, rl_w = weights("sft"), weights("rl")
    assert any(not (sft_w[k] == rl_w[k]).all() for k in sft_w), "RL left the SFT weights unchanged"
    # resumed pretraining logged each step once
    steps = [json.loads(l)["step"] for l in (base / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == sorted(set(steps))
    report = (home / "report" / "report.md").read_text()
    for section in ["## Summary", "## Evaluations by stage", "## Held-out skills", "## Tokenizer",
                    "## BASE: pretraining (d2)", "### BASE evaluation", "## MID: midtraining (d2)", "### MID evaluation",
                    "## SFT: supervised fine-tuning (d2)", "### SFT evaluation", "## RL: reinforcement learning (d2)",
                    "### RL evaluation", "## Timings", "## Appendix: every recorded value"]:
        assert section in report, section
    assert "not run" not in report
    assert (home / "report" / "loss.png").exists()
    assert "chibichat chat" in out

    # 3) a third run redoes nothing
    p = _speedrun(home)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert out.count("done already") == 13, out

    # 4) --force rl redoes RL and the two evaluations of the RL model, nothing else: the evaluations on disk
    # are of the new RL checkpoint, written after it
    rl_dir, rl_eval = home / "checkpoints" / "rl" / "d2", home / "eval" / "rl" / "d2"
    before = (rl_dir / "summary.json").stat().st_mtime_ns
    p = _speedrun(home, "--force", "rl")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert out.count("done already") == 10, out
    assert all(f"{name}: done already" not in out for name in ("] rl", "eval-rl", "skills-rl")), out
    new = (rl_dir / "summary.json").stat().st_mtime_ns
    assert new > before
    assert (rl_eval / "summary.json").stat().st_mtime_ns > new and (rl_eval / "skills.jsonl").stat().st_mtime_ns > new


def test_online_presets_download_their_corpus_first(tmp_path):
    steps = plan(Home(tmp_path), PRESETS["d20"], "en", "dense", "cuda")
    assert steps[0].name == "download"
    assert steps[0].argv[:4] == ["data", "download", "fineweb-edu", "-n"]
    assert steps[1].argv[:2] == ["data", "tasks"]  # the online chat task sets next
    assert steps[2].argv[:4] == ["tokenizer", "train", "--corpus", "fineweb-edu"]
    ja = plan(Home(tmp_path), PRESETS["d12"], "ja", "dense", "cuda")
    assert ja[0].argv[2] == "abeja-ja"
    from chibichat.data.corpora import get_corpus

    for p in (steps, ja):
        get_corpus(p[0].argv[2])  # a real registry name


def test_minutes_budget_is_split_over_the_training_stages(tmp_path):
    steps = {s.name: s.argv for s in plan(Home(tmp_path), PRESETS["cpu"], "en", "dense", "cpu", minutes=12)}

    def flag(argv, name):
        assert argv.count(name) == 1, argv
        return argv[argv.index(name) + 1]

    # the cpu preset's shares pretrain 0.34, midtrain 0.27, sft 0.35, rl 0.04
    assert [flag(steps[n], "--minutes") for n in ("pretrain", "midtrain", "sft", "rl")] == ["4.08", "3.24", "4.2", "0.48"]
    # the preset's step counts become caps 4x higher, so a faster machine spends its minutes learning
    assert [flag(steps[n], "--num-steps") for n in ("pretrain", "midtrain", "sft", "rl")] == ["4000", "1000", "1200", "60"]
    # a preset without shares splits by the steps' weights: pretrain 0.5, midtrain/sft/rl 0.1 each
    micro = {s.name: s.argv for s in plan(Home(tmp_path), PRESETS["micro"], "en", "dense", "cpu", minutes=12)}
    assert [flag(micro[n], "--minutes") for n in ("pretrain", "midtrain", "sft", "rl")] == ["7.5", "1.5", "1.5", "1.5"]
    assert "--minutes" not in steps["eval-base"] and "--minutes" not in steps["skills-sft"]
    assert "--minutes" not in plan(Home(tmp_path), PRESETS["micro"], "en", "dense", "cpu")[2].argv
    with pytest.raises(ChibiError, match="--minutes must be a positive number, got 0"):
        plan(Home(tmp_path), PRESETS["cpu"], "en", "dense", "cpu", minutes=0)


def test_cpu_preset_caps_its_training_loops_at_its_minutes_without_raising_the_step_counts(tmp_path):
    """The default quickstart fits a slow CPU: each training loop gets its share of max_minutes as a cap,
    and the step counts stay the preset's (a fast CPU runs exactly the preset); --no-budget drops the cap."""
    def flags(argv):
        return {f: argv[argv.index(f) + 1] for f in ("--minutes", "--num-steps") if f in argv}

    steps = {s.name: s.argv for s in plan(Home(tmp_path), PRESETS["cpu"], "en", "dense", "cpu")}
    assert PRESETS["cpu"].max_minutes == 13
    # the preset's shares pretrain 0.34, midtrain 0.27, sft 0.35, rl 0.04 of 13 min (--soup 4 shares a stage's
    # minutes over its four runs)
    assert [flags(steps[n]) for n in ("pretrain", "midtrain", "sft", "rl")] == [
        {"--minutes": "4.42", "--num-steps": "1000"}, {"--minutes": "3.51", "--num-steps": "250"},
        {"--minutes": "4.55", "--num-steps": "300"}, {"--minutes": "0.52", "--num-steps": "15"}]
    free = {s.name: s.argv for s in plan(Home(tmp_path), PRESETS["cpu"], "en", "dense", "cpu", budget=False)}
    assert [flags(free[n]) for n in ("pretrain", "rl")] == [{"--num-steps": "1000"}, {"--num-steps": "15"}]
    # --minutes splits by the same shares (and lets each stage run up to 4x its steps)
    fast = {s.name: s.argv for s in plan(Home(tmp_path), PRESETS["cpu"], "en", "dense", "cpu", minutes=25)}
    assert [flags(fast[n]) for n in ("pretrain", "sft")] == [{"--minutes": "8.5", "--num-steps": "4000"},
                                                            {"--minutes": "8.75", "--num-steps": "1200"}]
    # a preset's shares name exactly the training stages
    from chibichat.stages.speedrun import TRAINING_STEPS

    assert all(sorted(p.minute_shares) == sorted(TRAINING_STEPS) for p in PRESETS.values() if p.minute_shares)


def test_cpu_hour_shares_the_tokenizer_but_never_the_checkpoints_of_cpu(tmp_path):
    """`cpu-hour` after `cpu` in one home: the tokenizer step is the same (done already, reused), every
    checkpoint and evaluation folder is its own, and its 55 training minutes split by its shares; it trains
    a wider model (d5) and averages four midtraining and four SFT runs, as the quickstart averages its own."""
    home = Home(tmp_path)
    quick = plan(home, PRESETS["cpu"], "en", "dense", "cpu")
    hour = plan(home, PRESETS["cpu-hour"], "en", "dense", "cpu")
    assert quick[0].argv == hour[0].argv and quick[0].marker == hour[0].marker  # the tokenizer
    quick_dirs = {m for s in quick[2:] for m in [s.marker.parent]}
    hour_dirs = {m for s in hour[2:] for m in [s.marker.parent]}
    assert not quick_dirs & hour_dirs
    assert {d.name for d in hour_dirs} == {"hour-d5"} and {d.name for d in quick_dirs} == {"d4"}
    pre = next(s.argv for s in hour if s.name == "pretrain")
    assert pre[pre.index("--depth") + 1] == "5" and pre[pre.index("--tag") + 1] == "hour-d5"
    minutes = {s.name: float(s.argv[s.argv.index("--minutes") + 1]) for s in hour if "--minutes" in s.argv}
    assert sum(minutes.values()) == pytest.approx(55, abs=0.01) and minutes["pretrain"] == pytest.approx(33.0)
    sft = next(s.argv for s in hour if s.name == "sft")  # two passes over the SFT mixture, not four
    assert sft[sft.index("--num-steps") + 1] == "600" and minutes["sft"] == pytest.approx(11.55)
    for name in ("midtrain", "sft"):  # four runs averaged, one process, the members' folders are outputs too
        st = next(s for s in hour if s.name == name)
        assert st.argv[st.argv.index("--soup") + 1] == "4" and not st.distributed
        assert [d.name for d in st.outputs] == ["hour-d5"] + [f"hour-d5-soup{i}" for i in range(4)]
    # both CPU presets pretrain with copy rows (the micro smoke run does not need them)
    for p in (quick, hour):
        pre = next(s.argv for s in p if s.name == "pretrain")
        assert pre[pre.index("--repeat-rows") + 1] == "4"
    iberis = plan(home, PRESETS["cpu-hour"], "ja", "iberis", "cpu")
    assert iberis[2].marker.parent.name == "hour-d5-iberis"
    # Japanese: both presets train the same 1,024-token tokenizer (English keeps 4,096)
    quick_ja = plan(home, PRESETS["cpu"], "ja", "dense", "cpu")
    hour_ja = plan(home, PRESETS["cpu-hour"], "ja", "dense", "cpu")
    assert quick_ja[0].argv == hour_ja[0].argv == iberis[0].argv
    vocab = {lang: p[0].argv[p[0].argv.index("--vocab-size") + 1] for lang, p in (("en", quick), ("ja", quick_ja))}
    assert vocab == {"en": "4096", "ja": "1024"} and ["--split", "ja"] == quick_ja[0].argv[4:6]


def test_a_finished_tokenizer_of_another_size_or_split_is_refused_not_reused(tmp_path):
    """A home's tokenizer step, once done, is skipped: the speedrun checks that it is the tokenizer its plan
    trains (a JA cpu run in an EN cpu home would otherwise pretrain on the 4,096-token gpt4-split one)."""
    from chibichat.stages.speedrun import check_done_tokenizer

    home = Home(tmp_path)
    ja = plan(home, PRESETS["cpu"], "ja", "dense", "cpu")[0]
    en = plan(home, PRESETS["cpu"], "en", "dense", "cpu")[0]
    check_done_tokenizer(home, ja)  # nothing trained yet: nothing to check
    ja.marker.parent.mkdir(parents=True)

    def trained(vocab, split, corpus):
        ja.marker.write_text(json.dumps({"vocab_size": vocab, "split": split, "training": {"corpus": corpus}}))

    trained(4096, "gpt4", "embedded-en")
    check_done_tokenizer(home, en)  # the EN plan's own tokenizer: reused
    with pytest.raises(ChibiError) as e:
        check_done_tokenizer(home, ja)
    assert str(e.value) == (f"{home.tokenizer_dir} holds a 4096-token tokenizer (split gpt4, corpus embedded-en), but "
                            "this plan trains 1024 tokens (split ja, corpus embedded-ja): use another --home for this "
                            "preset and language, or pass --force tokenizer to train it anew (the home's checkpoints "
                            "then no longer load)")
    trained(1024, "gpt4", "embedded-ja")  # right size, wrong split
    with pytest.raises(ChibiError, match="split gpt4.*split ja"):
        check_done_tokenizer(home, ja)
    trained(1024, "ja", "embedded-en")  # right size and split, another corpus
    with pytest.raises(ChibiError, match="corpus embedded-en.*corpus embedded-ja"):
        check_done_tokenizer(home, ja)
    ja.marker.write_text(json.dumps({"vocab_size": 1024, "split": "ja"}))  # a tokenizer that records no corpus
    with pytest.raises(ChibiError, match="corpus not recorded"):
        check_done_tokenizer(home, ja)
    trained(1024, "ja", "embedded-ja")
    check_done_tokenizer(home, ja)
    with pytest.raises(ChibiError, match="1024-token tokenizer"):
        check_done_tokenizer(home, en)
    # the speedrun itself refuses before running anything; --force tokenizer is the way past it
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # (--dtype bfloat16: the plan of any CPU; where the stages compute in fp32 it would train 2,048 tokens)
    r = subprocess.run([sys.executable, "-m", "chibichat", "speedrun", "--preset", "cpu", "--home", str(tmp_path),
                        "--dtype", "bfloat16", "--dry-run"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "holds a 1024-token tokenizer (split ja, corpus embedded-ja), but this plan trains 4096" \
        in r.stderr


def test_a_japanese_tokenizer_of_the_english_size_is_refused_for_an_english_plan(tmp_path):
    """micro and the GPU presets train one vocabulary size for both languages and the English plan passes no
    --split: its tokenizer is `--split auto` on an English corpus (gpt4), so a home's Japanese one is refused."""
    from chibichat.stages.speedrun import check_done_tokenizer

    home = Home(tmp_path)
    for preset in ("micro", "d20"):
        ja = plan(home, PRESETS[preset], "ja", "dense", "cpu")
        en = plan(home, PRESETS[preset], "en", "dense", "cpu")
        tok_ja, tok_en = (next(s for s in p if s.name == "tokenizer") for p in (ja, en))
        vocab = tok_ja.argv[tok_ja.argv.index("--vocab-size") + 1]
        assert vocab == tok_en.argv[tok_en.argv.index("--vocab-size") + 1] and "--split" not in tok_en.argv
        corpus = tok_ja.argv[tok_ja.argv.index("--corpus") + 1]
        tok_ja.marker.parent.mkdir(parents=True, exist_ok=True)
        tok_ja.marker.write_text(json.dumps({"vocab_size": int(vocab), "split": "ja", "training": {"corpus": corpus}}))
        check_done_tokenizer(home, tok_ja)
        with pytest.raises(ChibiError, match=f"split ja, corpus {corpus}\\), but this plan trains {vocab} tokens "
                                             r"\(split gpt4, corpus (embedded-en|fineweb-edu)\)"):
            check_done_tokenizer(home, tok_en)


def _fake_stages(monkeypatch, fail=()):
    """speedrun's steps replaced by a stand-in that writes each step's marker (the tokenizer's as the micro EN
    tokenizer) and returns 1 for the steps named in `fail`; the argv of each call is collected."""
    from chibichat.stages import speedrun

    calls = []

    def run_step(step, argv, nproc, env):
        calls.append((step.name, argv))
        if step.name in fail:
            return 1
        step.marker.parent.mkdir(parents=True, exist_ok=True)
        meta = {"vocab_size": 1024, "split": "gpt4", "training": {"corpus": "embedded-en"}}
        step.marker.write_text(json.dumps(meta if step.name == "tokenizer" else {"steps": 1}))
        return 0

    monkeypatch.setattr(speedrun, "run_step", run_step)
    monkeypatch.setattr(speedrun, "check_sandbox", lambda allow, what: None)  # (the sandbox has its own tests)
    return calls


def test_each_training_stage_takes_its_share_of_what_the_stages_before_it_left():
    """carried_minutes: the cpu preset's 13 minutes (780 s) by its shares; pretraining overran its planned
    265.2 s by 34.8 s and midtraining used 150 of what it was given, so SFT gets 0.35/0.39 of the 330 s left;
    a step finished by hand (no time) counts as its planned share; a huge overrun leaves each later stage half
    its planned share."""
    from chibichat.stages.speedrun import carried_minutes

    w = PRESETS["cpu"].minute_shares
    assert carried_minutes(w, "pretrain", 13, {}) == pytest.approx(780 * 0.34 / 60)
    assert carried_minutes(w, "midtrain", 13, {"pretrain": 300}) == pytest.approx(480 * 0.27 / 0.66 / 60)
    assert carried_minutes(w, "sft", 13, {"pretrain": 300, "midtrain": 150}) == pytest.approx(330 * 0.35 / 0.39 / 60)
    assert carried_minutes(w, "rl", 13, {"pretrain": 300, "midtrain": 150, "sft": 290}) == pytest.approx(40 / 60)
    assert carried_minutes(w, "sft", 13, {"midtrain": 100}) == pytest.approx((780 - 265.2 - 100) * 0.35 / 0.39 / 60)
    assert carried_minutes(w, "midtrain", 13, {"pretrain": 900}) == pytest.approx(0.5 * 780 * 0.27 / 60)


def test_a_speedrun_carries_unused_minutes_forward_and_resumes_with_the_minutes_it_started(tmp_path, monkeypatch):
    """A run with --minutes: each training step runs with its share of what the steps before it left (a fake
    clock: pretraining 50 s, midtraining 20 s, everything else 1 s), the record keeps the planned flags (so the
    same command is not refused as changed), and a step that failed is rerun with the minutes it started
    with (the loop refuses another --minutes on --resume)."""
    from types import SimpleNamespace

    from chibichat.cli import main
    from chibichat.stages import speedrun

    home = tmp_path / "h"
    calls = _fake_stages(monkeypatch)
    now = [1000.0]
    monkeypatch.setattr(speedrun, "time", SimpleNamespace(time=lambda: now[0]))
    run_step = speedrun.run_step
    fail_sft = [True]

    def timed(step, argv, nproc, env):
        now[0] += {"pretrain": 50, "midtrain": 20}.get(step.name, 1)
        if step.name == "sft" and fail_sft:
            calls.append((step.name, argv))
            return 1
        return run_step(step, argv, nproc, env)

    monkeypatch.setattr(speedrun, "run_step", timed)
    cmd = ["speedrun", "--preset", "micro", "--home", str(home), "--minutes", "3"]
    assert main(cmd) == 2  # stage sft failed

    def minutes(name):
        return [float(a[a.index("--minutes") + 1]) for n, a in calls if n == name]

    w = {s.name: s.weight for s in plan(Home(home), PRESETS["micro"], "en", "dense", "cpu")
                  if s.name in ("pretrain", "midtrain", "sft", "rl")}
    total = sum(w.values())
    assert minutes("pretrain") == [pytest.approx(3 * w["pretrain"] / total, rel=1e-3)]
    assert minutes("midtrain") == [pytest.approx((180 - 50) * w["midtrain"] / (total - w["pretrain"]) / 60, rel=1e-3)]
    sft = (180 - 70) * w["sft"] / (w["sft"] + w["rl"]) / 60
    assert minutes("sft") == [pytest.approx(sft, rel=1e-3)]
    records = json.loads((home / "report" / "speedrun-steps.json").read_text())["steps"]
    planned = next(s.argv for s in plan(Home(home), PRESETS["micro"], "en", "dense", "cpu", minutes=3)
                   if s.name == "midtrain")
    recorded = records["checkpoints/mid/d2/summary.json"]["flags"]
    assert recorded[recorded.index("--minutes") + 1] == planned[planned.index("--minutes") + 1] != \
        f"{minutes('midtrain')[0]:.4g}"
    fail_sft.clear()
    assert main(cmd) == 0  # the same command: finished steps skipped (their flags match), SFT rerun
    assert minutes("sft") == [pytest.approx(sft, rel=1e-3)] * 2
    assert len(minutes("pretrain")) == len(minutes("midtrain")) == 1  # done: not rerun
    assert minutes("rl") == [pytest.approx((180 - 71) / 60, rel=1e-3)]  # all that is left: the last stage
    # the seconds each was given are recorded beside its time, and the report shows both
    timing = json.loads((home / "report" / "timing.json").read_text())["runs"]["d2"]
    assert timing["budget_s"] == pytest.approx({"pretrain": 180 * w["pretrain"] / total, "midtrain": 60 * minutes(
        "midtrain")[0], "sft": 60 * sft, "rl": 109}, abs=0.06)
    assert timing["stages"]["midtrain"] == 20 and timing["stages"]["sft"] == 1
    text = (home / "report" / "report.md").read_text()
    assert "| speedrun step | time | share | budget |" in text and "| midtrain | 0m20s | 24.7% | 0m43s |\n" in text
    # --force sft forgets the times and budgets of SFT and the steps after it before anything runs
    fail_sft.append(True)
    assert main(cmd + ["--force", "sft"]) == 2
    timing = json.loads((home / "report" / "timing.json").read_text())["runs"]["d2"]
    assert sorted(timing["budget_s"]) == ["midtrain", "pretrain"] and "rl" not in timing["stages"]


def test_a_resumed_step_counts_the_seconds_of_its_interrupted_attempt(tmp_path, monkeypatch):
    """A step stopped part way (an error or Ctrl-C) records the seconds it ran ("partial_s"); the attempt that
    resumes it from its checkpoint adds them to its time, so the stages after it get what the whole step left
    (counting only the resumed part gave them the interrupted minutes on top of their share). A step started
    anew (no checkpoint to resume) discards them."""
    from types import SimpleNamespace

    from chibichat.cli import main
    from chibichat.stages import speedrun

    home = tmp_path / "h"
    calls = _fake_stages(monkeypatch)
    now = [1000.0]
    monkeypatch.setattr(speedrun, "time", SimpleNamespace(time=lambda: now[0]))
    run_step = speedrun.run_step
    stop = {"pretrain": KeyboardInterrupt, "midtrain": 1}

    def timed(step, argv, nproc, env):
        how = stop.pop(step.name, None)
        if step.name == "pretrain":
            now[0] += 30 if how else 20
            (home / "checkpoints" / "base" / "d2" / "step_000012").mkdir(parents=True, exist_ok=True)
        else:
            now[0] += 7 if how else 1
        if how is KeyboardInterrupt:
            raise KeyboardInterrupt
        if how:
            calls.append((step.name, argv))
            return how
        return run_step(step, argv, nproc, env)

    monkeypatch.setattr(speedrun, "run_step", timed)
    cmd = ["speedrun", "--preset", "micro", "--home", str(home), "--minutes", "3"]

    def timing():
        return json.loads((home / "report" / "timing.json").read_text())["runs"]["d2"]

    assert main(cmd) == 130  # Ctrl-C in pretraining
    assert timing()["partial_s"] == {"pretrain": 30} and "pretrain" not in timing()["stages"]
    assert main(cmd) == 2  # pretraining resumed (30 + 20 s); midtraining, started anew, fails after 7 s
    assert [a[-1] for n, a in calls if n == "pretrain"] == ["--resume"]  # (the stopped attempt is not collected)
    assert timing()["stages"]["pretrain"] == 50 and timing()["partial_s"] == {"midtrain": 7}
    assert main(cmd) == 0  # midtraining had no checkpoint: run anew, its failed attempt's 7 s discarded
    assert timing()["stages"]["midtrain"] == 1 and "partial_s" not in timing()
    w = {s.name: s.weight for s in plan(Home(home), PRESETS["micro"], "en", "dense", "cpu")
         if s.name in ("pretrain", "midtrain", "sft", "rl")}
    minutes = [float(a[a.index("--minutes") + 1]) for n, a in calls if n == "midtrain"]
    assert minutes[-1] == pytest.approx((180 - 50) * w["midtrain"] / (sum(w.values()) - w["pretrain"]) / 60,
                                        rel=1e-3)


def test_a_finished_step_run_with_other_flags_is_refused_not_skipped(tmp_path, monkeypatch, capsys):
    """Each finished step's flags are recorded with its marker: a later speedrun that gives it other flags
    (--dtype) is refused, naming the steps, the changed flags and the --force that redoes them; flags that give
    the same result (--device auto against the device it resolves to, --recompute, --compile) are not differences."""
    from chibichat.cli import main

    home = tmp_path / "h"
    calls = _fake_stages(monkeypatch)
    base = ["speedrun", "--preset", "micro", "--home", str(home)]
    assert main(base + ["--dtype", "float32"]) == 0
    assert len(calls) == 13
    records = json.loads((home / "report" / "speedrun-steps.json").read_text())["steps"]
    pre = records["checkpoints/base/d2/summary.json"]["flags"]
    assert pre[:5] == ["pretrain", "--corpus", "embedded-en", "--layers", "dense"] and "--home" not in pre
    assert pre[pre.index("--device") + 1] == "cpu" and pre[pre.index("--dtype") + 1] == "float32"
    capsys.readouterr()
    assert main(base + ["--dtype", "bfloat16", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "skipping" not in captured.out
    assert f"finished steps in {home} ran with other flags than this command gives them:\n" \
           "  pretrain: --dtype float32 -> bfloat16\n  eval-base: --dtype float32 -> bfloat16\n" in captured.err
    assert "  skills-rl: --dtype float32 -> bfloat16\nre-run with the flags they ran with, or pass --force pretrain " \
           "to redo them (with every step that reads their output)" in captured.err
    assert "tokenizer:" not in captured.err  # its flags did not change
    # a later change: only the steps it reaches, and the fewest --force that redo them
    assert main(base + ["--dtype", "float32", "--minutes", "3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "  pretrain: --num-steps 24 -> 96, --minutes not given -> 1.875\n" in err
    assert "  rl: --num-steps 4 -> 16, --minutes not given -> 0.375\n" in err
    assert "eval-base" not in err and err.rstrip().endswith("--force pretrain to redo them (with every step that "
                                                            "reads their output)")
    # the same run again: every step done, its flags checked
    monkeypatch.setenv("CXX", sys.executable)  # a C++ compiler found, so --compile is planned
    assert main(base + ["--dtype", "float32", "--device", "cpu", "--recompute", "block", "--compile",
                        "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("done already") == 13 and "not checked" not in out
    # a marker rewritten since (a stage run by hand) is reused with a note, its flags unknown
    (home / "checkpoints" / "rl" / "d2" / "summary.json").write_text("{}")
    assert main(base + ["--dtype", "float32", "--dry-run"]) == 0
    assert "rl: done already (checkpoints/rl/d2/summary.json) (not finished by a speedrun of this home's record: " \
           "its flags are not checked), skipping" in capsys.readouterr().out


def test_a_gpu_speedrun_on_another_process_count_names_the_one_it_ran_with(tmp_path, monkeypatch, capsys):
    """A GPU preset's chat stages get --grad-accum from the process count, a flag the speedrun does not take: a
    re-run on another count is refused naming --nproc-per-node with the count the finished steps ran on (and a
    changed --minutes names the time budget), not just "the flags they ran with"."""
    from chibichat.cli import main

    home = tmp_path / "h"
    _fake_stages(monkeypatch)
    base = ["speedrun", "--preset", "d12", "--home", str(home), "--no-compile"]
    assert main(base + ["--nproc-per-node", "8"]) == 0
    tok = home / "tokenizer" / "tokenizer.json"  # as d12's tokenizer (the stand-in writes micro's)
    tok.write_text(json.dumps({"vocab_size": 32768, "split": "gpt4", "training": {"corpus": "fineweb-edu"}}))
    capsys.readouterr()
    assert main(base + ["--nproc-per-node", "2", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        f"chibichat speedrun: error: finished steps in {home} ran with other flags than this command gives them:\n"
        "  midtrain: --grad-accum 1 -> 4\n  sft: --grad-accum 1 -> 4\n  rl: --grad-accum 1 -> 4\n"
        "re-run with the flags they ran with (the speedrun sets --grad-accum from the number of processes: they ran "
        "on 8, so pass --nproc-per-node 8), or pass --force midtrain to redo them (with every step that reads their "
        "output)\n")
    assert main(base + ["--nproc-per-node", "8", "--minutes", "600", "--dry-run"]) == 2
    assert ("(the speedrun sets the training steps' --minutes and --num-steps from its time budget: pass the "
            "--minutes (or --no-budget) they ran with), or pass --force pretrain" in capsys.readouterr().err)


def test_a_resumed_step_that_fails_names_the_force_that_restarts_it(tmp_path, monkeypatch, capsys):
    """An interrupted training step is resumed; where the stage refuses to resume (another --dtype, --fp8 or
    process count: the loop's checks), re-running the same command cannot help, so the error names --force."""
    from chibichat.cli import main

    home = tmp_path / "h"
    calls = _fake_stages(monkeypatch, fail=("pretrain",))
    (home / "checkpoints" / "base" / "d2" / "step_000012").mkdir(parents=True)
    assert main(["speedrun", "--preset", "micro", "--home", str(home)]) == 2
    assert calls[-1][0] == "pretrain" and calls[-1][1][-1] == "--resume"
    assert capsys.readouterr().err == (
        "chibichat speedrun: error: stage pretrain failed resuming its interrupted run (exit 1); fix the error above "
        "and re-run the same speedrun command (finished stages are skipped and pretrain resumes where it can), or "
        "pass --force pretrain to start it anew (with every step that reads its output)\n")


def test_flag_changes_names_each_changed_flag():
    from chibichat.stages.speedrun import flag_changes, step_flags

    assert flag_changes(["sft", "--dtype", "float32", "--fp8", "--minutes", "2"],
                        ["sft", "--dtype", "bfloat16", "--num-steps", "4", "--minutes", "2"]) == [
        "--dtype float32 -> bfloat16", "--num-steps not given -> 4", "--fp8 set -> not given"]
    assert step_flags(["rl", "--home", "/h", "--device", "auto", "--recompute", "mlp", "--trim-heap", "--resume",
                       "--num-steps", "-1"], "cpu") == ["rl", "--device", "cpu", "--num-steps", "-1"]


def test_a_forced_step_that_fails_leaves_no_old_output_after_it(tmp_path, monkeypatch, capsys):
    """--force midtrain deletes midtraining's outputs and those of every step reading them before anything runs:
    when midtraining then fails, the next run (without --force) redoes them instead of skipping the old
    evaluations, SFT and RL as done."""
    from chibichat.cli import main

    home = tmp_path / "h"
    _fake_stages(monkeypatch)
    base = ["speedrun", "--preset", "micro", "--home", str(home)]
    assert main(base) == 0
    h = Home(home)
    calls = _fake_stages(monkeypatch, fail=("midtrain",))
    assert main(base + ["--force", "midtrain"]) == 2
    assert "stage midtrain failed (exit 1)" in capsys.readouterr().err
    assert [name for name, _ in calls] == ["midtrain"]
    for stage in ("mid", "sft", "rl"):
        assert not h.checkpoints_dir(stage, "d2").exists() and not h.eval_dir(stage, "d2").exists(), stage
    assert (h.checkpoints_dir("base", "d2") / "summary.json").exists()
    records = json.loads((home / "report" / "speedrun-steps.json").read_text())["steps"]
    assert sorted(records) == ["checkpoints/base/d2/summary.json", "eval/base/d2/summary.json",
                               "tokenizer/eval.json", "tokenizer/tokenizer.json"]
    assert sorted(json.loads((home / "report" / "timing.json").read_text())["runs"]["d2"]["stages"]) == [
        "eval-base", "pretrain", "tokenizer", "tokenizer-eval"]
    calls = _fake_stages(monkeypatch)
    assert main(base) == 0
    assert [name for name, _ in calls] == ["midtrain", "eval-mid", "skills-mid", "sft", "eval-sft", "skills-sft", "rl",
                                           "eval-rl", "skills-rl"]


def test_the_speedrun_reports_its_own_tag_and_times_it_apart(tmp_path, monkeypatch, capsys):
    """The report a speedrun ends with is its plan's tag, whatever tag of the home is newest, and its timings are
    kept under that tag."""
    from chibichat.cli import main

    home = tmp_path / "h"
    _fake_stages(monkeypatch)
    other = Home(home).checkpoints_dir("base", "hour-d5")
    other.mkdir(parents=True)
    (other / "summary.json").write_text(json.dumps({"final_val_bpb": 1.25}))
    assert main(["speedrun", "--preset", "micro", "--home", str(home)]) == 0
    os.utime(other, (time.time() + 60, time.time() + 60))  # the other run is the newest base tag
    assert main(["speedrun", "--preset", "micro", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    report = (home / "report" / "report.md").read_text()
    assert "## BASE: pretraining (d2)" in report and "hour-d5" not in report and "1.2500" not in report
    assert "## Summary\n\n| Stage | Headline | Time |" in out and "| BASE (d2) |" in out
    timing = json.loads((home / "report" / "timing.json").read_text())
    assert list(timing["runs"]) == ["d2"] and len(timing["runs"]["d2"]["stages"]) == 13


def test_bad_layers_device_and_process_counts_are_refused_before_any_step(tmp_path, monkeypatch, capsys):
    from chibichat.cli import main
    from chibichat.stages import speedrun

    base = ["speedrun", "--home", str(tmp_path / "h"), "--dry-run"]
    assert main(base + ["--preset", "cpu", "--layers", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "--layers 'bogus' (preset cpu, depth 4): layer layout 'bogus' is not valid for 4 layers" in err
    assert main(base + ["--preset", "d20", "--scale", "toy", "--layers", "ASSA"]) == 2  # toy pretrains depth 2
    assert "--layers 'ASSA' (preset d20, depth 20)" in capsys.readouterr().err
    assert main(base + ["--preset", "micro", "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a device torch knows" in capsys.readouterr().err
    assert main(base + ["--preset", "d12", "--scale", "toy", "--nproc-per-node", "3"]) == 2
    assert "3 GPUs do not divide 8 (the count is --nproc-per-node 3): use 1, 2, 4 or 8" in capsys.readouterr().err
    assert main(base + ["--preset", "micro", "--minutes", "5", "--no-budget"]) == 2
    assert "--minutes 5 sets a time budget and --no-budget asks for none: pass one of them" in capsys.readouterr().err
    # more processes than GPUs: a run refuses, a dry run (a plan read for a bigger machine) says a run would
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ChibiError, match=r"--nproc-per-node 4 starts one process per GPU, but torch sees 2 GPU\(s\)"):
        speedrun.check_processes(4, 4, "cuda", dry_run=False)
    speedrun.check_processes(4, 4, "cuda", dry_run=True)
    assert "note: a run on this machine would refuse: --nproc-per-node 4" in capsys.readouterr().out
    speedrun.check_processes(4, 4, "cpu", dry_run=False)  # gloo ranks on CPU: any count
    speedrun.check_processes(2, 2, "cuda", dry_run=False)


def test_a_dry_run_refuses_a_weak_sandbox_as_the_run_would(tmp_path, monkeypatch, capsys):
    from chibichat.cli import main
    from chibichat.sandbox import ALLOW_WEAK_ENV, SIMULATE_ENV

    monkeypatch.setenv(SIMULATE_ENV, "no-landlock")
    monkeypatch.setenv(ALLOW_WEAK_ENV, "0")
    assert main(["speedrun", "--preset", "micro", "--home", str(tmp_path / "h"), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "speedrun (eval chat runs HumanEval completions) runs model-written code" in captured.err
    assert "$ chibichat" not in captured.out


def test_the_quickstart_ends_by_naming_the_longer_preset_with_the_same_language_layers_and_home(tmp_path):
    """After `cpu`, the closing lines give the cpu-hour command that continues in the same home (same
    tokenizer: same --lang), with the same --layers; no other preset suggests it, and the command is one the
    speedrun's parser accepts and plans with this home's tokenizer step."""
    import shlex

    from chibichat.cli import build_parser
    from chibichat.stages.speedrun import closing_lines

    lines = closing_lines(PRESETS["cpu"], "ja", "iberis", " --home /h")
    assert lines[0] == "Talk to your model:" and lines[1].startswith("  chibichat chat --home /h ")
    assert lines[-1] == "  chibichat speedrun --preset cpu-hour --lang ja --layers iberis --home /h"
    assert "~60 minutes" in lines[-2]
    assert closing_lines(PRESETS["cpu"], "en", "dense", "")[-1] == "  chibichat speedrun --preset cpu-hour"
    for name in ("cpu-hour", "micro", "d20"):
        assert not any("cpu-hour" in line for line in closing_lines(PRESETS[name], "en", "dense", ""))
    args = build_parser().parse_args(shlex.split(lines[-1].strip())[1:])  # without the leading "chibichat"
    assert (args.preset, args.lang, args.layers, args.home) == ("cpu-hour", "ja", "iberis", "/h")
    home = Home(tmp_path)
    assert plan(home, PRESETS["cpu-hour"], "ja", "iberis", "cpu")[0].argv == plan(home, PRESETS["cpu"], "ja", "iberis", "cpu")[0].argv
    # where the quickstart trained another tokenizer (English on a CPU computing in fp32: 2,048 tokens), the same
    # home would refuse cpu-hour's 4,096 (check_done_tokenizer), so the closing lines name a home of its own
    fp32 = replace(PRESETS["cpu"], depth=PRESETS["cpu"].depth_fp32, tokenizer=PRESETS["cpu"].tokenizer_fp32)
    lines = closing_lines(fp32, "en", "dense", " --home /h", "/h")
    assert lines[-2] == ("A stronger model in ~60 minutes more on 2 cores (a wider model, more steps), in a home of its "
                         "own: it trains a 4,096-token tokenizer, this run trained 2,048 (chat and serve then take "
                         "--home /h-hour):")
    assert lines[-1] == "  chibichat speedrun --preset cpu-hour --home /h-hour"
    assert closing_lines(fp32, "ja", "dense", " --home /h", "/h")[-1] == "  chibichat speedrun --preset cpu-hour --lang ja --home /h"
    assert plan(home, fp32, "en", "dense", "cpu")[0].argv != plan(home, PRESETS["cpu-hour"], "en", "dense", "cpu")[0].argv


def test_cpu_presets_compile_their_training_stages_where_a_cpp_compiler_is_found(tmp_path, monkeypatch, capsys):
    """The CPU presets' pretraining, midtraining and SFT are compiled unless --no-compile (their minutes repay
    the compiles); micro's (the smoke run) are not. Without a C++ compiler the preset's choice falls back to eager
    with a note, and an asked-for --compile is refused before any step runs."""
    from chibichat.cli import main
    from chibichat.common import cpp_compiler_name
    from chibichat.stages.speedrun import compile_stages

    def compiled(out):
        return [line.split()[2] for line in out.splitlines()
                if line.strip().startswith("$ chibichat ") and "--compile" in line.split()]

    all3 = ("pretrain", "midtrain", "sft")
    home = str(tmp_path / "h")
    monkeypatch.setenv("CXX", sys.executable)
    assert [compile_stages(c, PRESETS[p], "cpu") for p in ("cpu-hour", "cpu", "micro") for c in (None, True, False)] \
        == [all3, all3, (), all3, all3, (), (), all3, ()]
    for preset in ("cpu-hour", "cpu"):
        assert main(["speedrun", "--preset", preset, "--home", home + preset, "--dry-run"]) == 0
        out, err = capsys.readouterr()
        assert compiled(out) == ["pretrain", "midtrain", "sft"] and "note:" not in err
        assert main(["speedrun", "--preset", preset, "--home", home + preset, "--no-compile", "--dry-run"]) == 0
        assert "--compile" not in capsys.readouterr().out
    assert main(["speedrun", "--preset", "micro", "--home", home, "--dry-run"]) == 0
    assert "--compile" not in capsys.readouterr().out
    assert main(["speedrun", "--preset", "micro", "--home", home, "--compile", "--dry-run"]) == 0
    assert compiled(capsys.readouterr().out) == ["pretrain", "midtrain", "sft"]

    monkeypatch.setenv("CXX", "no-such-cxx-29")
    assert main(["speedrun", "--preset", "cpu-hour", "--home", home, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "--compile" not in out
    default = cpp_compiler_name()[1]  # g++ (clang++ on macOS)
    assert ("note: preset cpu-hour compiles pretrain, midtrain, sft (torch.compile, ~1.3-1.5x faster steps), but "
            f"'no-such-cxx-29', the C++ compiler torch.compile needs on the CPU ($CXX, else {default}), is not on PATH: "
            f"they would run eager. Install {default} (or set CXX) for the compiled steps, or pass --no-compile to "
            "plan them eager without this note") in err
    assert main(["speedrun", "--preset", "cpu-hour", "--home", home, "--no-compile", "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main(["speedrun", "--preset", "micro", "--home", home, "--compile", "--dry-run"]) == 2
    assert "--compile on the CPU needs a C++ compiler" in capsys.readouterr().err
    assert compile_stages(None, PRESETS["cpu-hour"], "cuda") == all3  # triton, not this check


def test_eval_skills_rewriting_the_eval_summary_keeps_that_steps_flags_checked(tmp_path, monkeypatch, capsys):
    """eval skills merges its figures into eval chat's summary.json, the eval-<stage> step's marker: the record
    of that step is hashed again after the skills step, so the next run still checks its flags (a marker that
    no longer matches its record would be reused unchecked)."""
    from chibichat.cli import main
    from chibichat.stages import speedrun

    home = tmp_path / "h"
    _fake_stages(monkeypatch)
    fake = speedrun.run_step

    def merging(step, argv, nproc, env):
        rc = fake(step, argv, nproc, env)
        if step.name.startswith("skills-"):  # as eval skills does (eval/metrics.py merge_summary)
            summary = step.marker.parent / "summary.json"
            summary.write_text(json.dumps({**json.loads(summary.read_text()), "skills": 0.5}))
        return rc

    monkeypatch.setattr(speedrun, "run_step", merging)
    base = ["speedrun", "--preset", "micro", "--home", str(home)]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("done already") == 13 and "not checked" not in out
    assert "[6/13] eval-mid: done already (eval/mid/d2/summary.json), skipping" in out
    # a marker rewritten by hand since is still reused unchecked, not re-hashed by a later skills step
    (home / "eval" / "sft" / "d2" / "summary.json").write_text("{}")
    assert main(base + ["--force", "skills-sft"]) == 0
    capsys.readouterr()
    assert main(base + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "eval-sft: done already (eval/sft/d2/summary.json) (not finished by a speedrun of this home's record" in out
    assert out.count("not checked") == 1


def test_a_force_stopped_while_deleting_leaves_no_marker_of_a_forced_step(tmp_path, monkeypatch):
    """--force removes every forced step's marker before any of their outputs: a deletion stopped part way (here
    at the first folder) leaves no marker beside outputs it no longer describes, so the next run without --force
    redoes the forced steps instead of skipping them as done."""
    from chibichat.cli import main
    from chibichat.stages import speedrun

    home = tmp_path / "h"
    _fake_stages(monkeypatch)
    base = ["speedrun", "--preset", "micro", "--home", str(home)]
    assert main(base) == 0

    def stopped(path, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(speedrun.shutil, "rmtree", stopped)
    assert main(base + ["--force", "sft"]) == 130
    h = Home(home)
    for stage in ("sft", "rl"):
        assert not (h.checkpoints_dir(stage, "d2") / "summary.json").exists(), stage
        assert not (h.eval_dir(stage, "d2") / "summary.json").exists() and not (h.eval_dir(stage, "d2") /
                                                                                 "skills.jsonl").exists(), stage
    monkeypatch.undo()
    calls = _fake_stages(monkeypatch)
    assert main(base) == 0
    assert [name for name, _ in calls] == ["sft", "eval-sft", "skills-sft", "rl", "eval-rl", "skills-rl"]


def test_a_step_record_or_timing_file_of_the_wrong_shape_is_a_clear_error(tmp_path, capsys):
    from chibichat.cli import main

    home = tmp_path / "h"
    (home / "report").mkdir(parents=True)
    (home / "report" / "speedrun-steps.json").write_text("[]")
    assert main(["speedrun", "--preset", "micro", "--home", str(home), "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        f"chibichat speedrun: error: speedrun step record {home}/report/speedrun-steps.json has no \"steps\" object; "
        "delete it (finished steps are then reused without checking their flags)\n")
    (home / "report" / "speedrun-steps.json").unlink()
    (home / "report" / "timing.json").write_text('{"runs": []}')
    assert main(["speedrun", "--preset", "micro", "--home", str(home), "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        f"chibichat speedrun: error: speedrun timing {home}/report/timing.json has no \"runs\" object; delete it (the "
        "report then shows the stages' own times, and a time budget counts the finished training steps as having "
        "spent their planned share)\n")


@pytest.mark.parametrize("how", ["fork", "subprocess"])
def test_a_terminated_speedrun_stops_its_running_step_with_it(tmp_path, how):
    """`kill PID` (SIGTERM) of the speedrun while a step runs stops the step too and exits 143: the step, forked or
    a subprocess (torchrun on CUDA), must not run on, orphaned, beside the run that the user starts next."""
    pid_file = tmp_path / "step.pid"
    script = f"""
import os, sys, time
from chibichat.stages import speedrun
def step():
    open({str(pid_file)!r} + ".tmp", "w").write(str(os.getpid()))
    os.replace({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
    time.sleep(60)
if {how!r} == "fork":
    speedrun.fork_start(dict(os.environ), step)
else:  # the path taken where a step cannot be forked (CUDA, not Linux)
    sys.platform = "not-linux"
    code = "import os, time; open(" + repr({str(pid_file)!r} + ".tmp") + ", 'w').write(str(os.getpid())); " \\
           "os.replace(" + repr({str(pid_file)!r} + ".tmp") + ", " + repr({str(pid_file)!r}) + "); time.sleep(60)"
    speedrun._launcher = lambda step, nproc: [sys.executable, "-c", code]
    speedrun.run_step(None, [], 1, dict(os.environ))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        deadline = time.time() + 30
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        step_pid = int(pid_file.read_text())
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(timeout=30) == 143
        with pytest.raises(ProcessLookupError):  # stopped and reaped before the speedrun exited
            os.kill(step_pid, 0)
    finally:  # (what the old code left running)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.parametrize("how,deaf", [("fork", False), ("subprocess", False), ("fork", True)])
def test_ctrl_c_during_a_step_says_interrupted_once_on_its_own_line(tmp_path, how, deaf):
    """Ctrl-C signals the speedrun and its step alike: the step says "interrupted" (cli.main) and the speedrun exits
    130 without saying it again (both said it, at times on one line). A step that does not stop by itself is
    terminated after STOP_GRACE_S, and then the speedrun says it."""
    pid_file, step_py = tmp_path / "step.pid", tmp_path / "step.py"
    step_py.write_text(f"""
import os, signal, sys, time
from chibichat import cli
from chibichat.stages import report
def hang(args):  # the step's stage
    if {deaf!r}:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    open({str(pid_file)!r} + ".tmp", "w").write(str(os.getpid()))
    os.replace({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
    time.sleep(60)
report.run = hang
if __name__ == "__main__":  # the step as a process of its own (subprocess)
    sys.exit(cli.main(["report"]))
""")
    # Ctrl-C's default handling, also where the tests run with SIGINT ignored (a shell's background job ignores it,
    # and exec passes that on): a process started with SIGINT ignored never raises KeyboardInterrupt.
    script = f"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from types import SimpleNamespace
sys.path.insert(0, {str(tmp_path)!r})
import step
from chibichat import cli
from chibichat.stages import doctor, speedrun
speedrun.STOP_GRACE_S = 0.5
def orchestrate(args):  # the speedrun running its step, as run_step does on Linux without CUDA, or elsewhere
    if {how!r} == "fork":
        return speedrun.fork_start(dict(os.environ), lambda: speedrun._chibichat_main(["report"]))
    sys.platform = "not-linux"
    speedrun._launcher = lambda step, nproc: [sys.executable, {str(step_py)!r}]
    return speedrun.run_step(SimpleNamespace(distributed=False), ["report"], 1, dict(os.environ))
doctor.run = orchestrate
sys.exit(cli.main(["doctor"]))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        deadline = time.time() + 30
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        step_pid = int(pid_file.read_text())
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, _ = p.communicate(timeout=30)
        assert (p.returncode, out) == (130, "interrupted\n")
        with pytest.raises(ProcessLookupError):  # stopped and reaped before the speedrun exited
            os.kill(step_pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def test_the_eta_of_a_resumed_speedrun_counts_only_the_steps_it_ran(tmp_path, monkeypatch, capsys):
    """The ETA is this run's seconds per unit of weight of the steps it ran times the weight still to run: the
    steps it skipped as done took none of its time (counting them made a resumed run's ETA a fraction of it).
    micro's weights: eval-base 0.04 took 10 s (a fake clock), and 0.48 of weight is left from midtraining on."""
    from types import SimpleNamespace

    from chibichat.cli import main
    from chibichat.stages import speedrun

    home = tmp_path / "h"
    base = ["speedrun", "--preset", "micro", "--home", str(home)]
    _fake_stages(monkeypatch, fail=("eval-base",))
    assert main(base) == 2
    _fake_stages(monkeypatch)
    fake, now = speedrun.run_step, [1000.0]

    def timed(step, argv, nproc, env):
        now[0] += 10
        return fake(step, argv, nproc, env)

    monkeypatch.setattr(speedrun, "run_step", timed)
    monkeypatch.setattr(speedrun, "time", SimpleNamespace(time=lambda: now[0]))
    capsys.readouterr()
    assert main(base) == 0
    assert "[5/13] midtrain: midtrain: chat format, tools, multiple choice, ETA ~2.0 min\n" in capsys.readouterr().out


def test_quickstart_runs_the_speedrun_in_the_callers_directory(tmp_path):
    """scripts/quickstart.sh sets up the repository's .venv but starts the speedrun where it was called, so a
    relative --home is the caller's (it was the repository root's). The set-up and chibichat are stand-ins."""
    import shutil

    repo, cwd = tmp_path / "repo", tmp_path / "work"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    cwd.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "scripts" / "quickstart.sh", repo / "scripts")
    (repo / "scripts" / "setup.sh").write_text("true\n")
    chibichat = repo / ".venv" / "bin" / "chibichat"
    chibichat.write_text('#!/bin/sh\necho "chibichat in $(pwd): $*"\n')
    chibichat.chmod(0o755)
    r = subprocess.run(["bash", str(repo / "scripts" / "quickstart.sh"), "--home", "h"], cwd=cwd, capture_output=True,
                       text=True, env={k: v for k, v in os.environ.items() if k != "CHIBICHAT_PRESET"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"chibichat in {os.path.realpath(cwd)}: speedrun --preset cpu --home h\n"


def test_readme_states_the_cpu_presets_sizes_and_budgets():
    """The README's preset table quotes these values; a change of a preset must change it (and this test)."""
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())
    cpu, hour = PRESETS["cpu"], PRESETS["cpu-hour"]

    def flag(flags, name):
        return flags[flags.index(name) + 1]

    def pct(p, stage):
        return f"{p.minute_shares[stage]:.0%}"

    def millions(p):  # the preset's model at its English vocabulary, built on the meta device
        import torch

        from chibichat.model.gpt import GPT, GPTConfig, layer_pattern
        from chibichat.train.scaling import Overrides, derive_shape

        shape = derive_shape(p.depth, Overrides(seq_len=int(flag(p.pretrain, "--seq-len"))))
        with torch.device("meta"):
            model = GPT(GPTConfig(int(flag(p.tokenizer, "--vocab-size")), shape.seq_len, p.depth, shape.width,
                                  shape.heads, shape.kv_heads, layer_pattern("dense", p.depth), [0] * p.depth))
        return round(model.num_params() / 1e6)

    for phrase in (
            f"d{cpu.depth} ({millions(cpu)}M params), vocab {flag(cpu.tokenizer, '--vocab-size')} (`--lang ja`: "
            f"{flag(cpu.tokenizer_ja, '--vocab-size')})",
            f"capped at {cpu.max_minutes:g} min together, start-ups included (pretraining {pct(cpu, 'pretrain')}, "
            f"midtraining {pct(cpu, 'midtrain')} and SFT {pct(cpu, 'sft')} for their four averaged runs each, RL "
            f"{pct(cpu, 'rl')};",
            f"of its {flag(cpu.pretrain, '--num-steps')} steps",
            f"the preset trains d{cpu.depth_fp32} ({millions(replace(cpu, depth=cpu.depth_fp32, tokenizer=cpu.tokenizer_fp32))}M "
            f"params) with a {int(flag(cpu.tokenizer_fp32, '--vocab-size')):,}-token English vocabulary instead",
            f"d{hour.depth} ({millions(hour)}M params)", f"up to {int(flag(hour.pretrain, '--num-steps')):,} steps",
            f"its own checkpoints (`{hour.tag_prefix}d{hour.depth}`)",
            f"vocab {flag(hour.tokenizer, '--vocab-size')} (`--lang ja`: {flag(hour.tokenizer_ja, '--vocab-size')})",
            f"training stages capped at {hour.max_minutes:g} min, start-ups included: pretraining "
            f"{pct(hour, 'pretrain')}, midtraining {pct(hour, 'midtrain')}, SFT {pct(hour, 'sft')} (these three "
            f"compiled where a C++ compiler is found), RL {pct(hour, 'rl')})"):
        assert phrase in readme, phrase
    assert hour.compiled == cpu.compiled == ("pretrain", "midtrain", "sft")  # as the README says
    assert flag(cpu.midtrain, "--soup") == flag(cpu.sft, "--soup") == flag(hour.sft, "--soup") == "4"
