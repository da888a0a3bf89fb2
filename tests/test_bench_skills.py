"""`chibichat bench skills`: arms x seeds of midtrain + SFT + eval skills, tabulated with standard errors."""

import argparse
import json
import math

import pytest

from chibichat.bench import skills as B
from chibichat.cli import build_parser, main
from chibichat.common import ChibiError

from test_stages_chat import make_base


@pytest.mark.parametrize("spec, why", [
    ("Words", "the name 'Words' must be lower-case letters, digits and '-'"),
    ("a;--mix x=1", "write NAME, NAME;MID_FLAGS;SFT_FLAGS or NAME;MID_FLAGS;SFT_FLAGS;RL_FLAGS"),
    ("a;b;c;d;e", "write NAME, NAME;MID_FLAGS;SFT_FLAGS or NAME;MID_FLAGS;SFT_FLAGS;RL_FLAGS"),
    ("a;;;arithmetic", "the rl part must be flags such as '--mix spelling=2', got 'arithmetic'"),
    ("a;;;--num-steps 40", "--num-steps is set by the bench for every run (use --from-tag, --mid-steps, "
                           "--sft-steps, --rl-steps,"),
    (";--mix x=1;", "the name '' must be"),
    ("a;;spelling=2", "the sft part must be flags such as '--mix spelling=2', got 'spelling=2'"),
    ("a;--mix 'x=1;", "the midtrain flags \"--mix 'x=1\" do not parse"),
    ("a;--seed 3;", "--seed is set by the bench for every run"),
    ("a;;--num-steps=9", "--num-steps is set by the bench for every run"),
    # argparse takes an unambiguous prefix as the flag: an abbreviation is the flag it abbreviates
    ("x;--see 1;", "--see (an abbreviation of --seed) is set by the bench for every run"),
    ("a;;--num-step 5", "--num-step (an abbreviation of --num-steps) is set by the bench for every run"),
    ("a;;;--dev=cpu", "--dev (an abbreviation of --device) is set by the bench for every run"),
])
def test_bad_arms_are_refused_with_the_fix(spec, why):
    with pytest.raises(ChibiError) as e:
        B.parse_arm(spec)
    assert str(e.value).startswith(f"--arm {spec!r}: ") and why in str(e.value)


def test_no_stage_flag_the_arms_may_set_is_taken_for_an_abbreviation():
    """owned_flag refuses any prefix of an owned flag: no midtrain/sft/rl flag outside OWNED_FLAGS is one."""
    from chibichat.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for stage in ("midtrain", "sft", "rl"):
        flags = {o for a in sub.choices[stage]._actions for o in a.option_strings if o.startswith("--")}
        assert "--mix" in flags or stage == "rl"
        assert [f for f in flags if B.owned_flag(f) and f not in B.OWNED_FLAGS] == [], stage
    assert B.owned_flag("--from") == "--from" and B.owned_flag("--from-t") == "--from-tag"
    assert B.owned_flag("--mix") is None and B.owned_flag("spelling=2") is None and B.owned_flag("--") is None


def test_arms_parse_with_defaults_and_distinct_names():
    assert B.parse_arm("words") == B.Arm("words", (), ())
    assert B.parse_arm("w2;; --mix spelling=2 ") == B.Arm("w2", (), ("--mix", "spelling=2"))
    assert B.parse_arm("w3;--mix identity=1,arithmetic=2 --lr-frac 0.5;") == \
        B.Arm("w3", ("--mix", "identity=1,arithmetic=2", "--lr-frac", "0.5"), ())
    assert B.parse_arm("r;;;--task arithmetic-multi") == B.Arm("r", (), (), ("--task", "arithmetic-multi"))
    assert B.parse_arms(None) == [B.Arm("default")]
    with pytest.raises(ChibiError, match=r"--arm names must differ, got \['a', 'a'\]"):
        B.parse_arms(["a", "a;--mix x=1;"])


@pytest.mark.parametrize("text, why", [("0,x", "--seeds must be a comma list of integers, e.g. 0,1,2,3; got '0,x'"),
                                       ("1,1", "--seeds must list distinct seeds >= 0, got '1,1'"),
                                       ("-1", "--seeds must list distinct seeds >= 0, got '-1'"),
                                       ("", "--seeds must list distinct seeds >= 0, got ''")])
def test_bad_seeds_are_refused(text, why):
    with pytest.raises(ChibiError) as e:
        B.parse_seeds(text)
    assert str(e.value) == why
    assert B.parse_seeds(" 3, 0,1 ") == [3, 0, 1]  # the given order: arms run seed by seed as listed


def test_table_means_standard_errors_and_verdicts_by_hand():
    arms = [B.Arm("base"), B.Arm("new", ("--mix", "x=1")), B.Arm("same", (), ("--lr-frac", "0.5"))]
    rows = [{"arm": "base", "skills": s, "per_skill": {"spelling": s / 2}, "simple_bpb": b, "on_topic": o}
            for s, b, o in ((0.5, 2.5, 0.25), (0.7, 2.7, 0.5))] + \
           [{"arm": "new", "skills": s, "per_skill": {"spelling": 1.0}, "simple_bpb": b, "on_topic": 0.0}
            for s, b in ((0.9, 2.4), (0.95, None))] + \
           [{"arm": "same", "skills": s, "per_skill": {}} for s in (0.55, 0.65)]
    t = B.arm_table(arms, rows)
    base, new, same = t
    # base: mean 0.6, sample s.d. 0.1414, se 0.1; new: mean 0.925, s.d. 0.03536, se 0.025
    assert base["mean"] == pytest.approx(0.6) and base["se"] == pytest.approx(0.1)
    assert (base["min"], base["max"], base["n"]) == (0.5, 0.7, 2)
    assert base["per_skill"] == {"spelling": pytest.approx(0.3)} and base["diff"] == 0 and base["diff_se"] is None
    assert new["diff"] == pytest.approx(0.325) and new["diff_se"] == pytest.approx(math.sqrt(0.1 ** 2 + 0.025 ** 2))
    assert B.verdict(new) == "beyond 2 s.e."  # 0.325 / 0.103 = 3.2
    assert same["diff"] == pytest.approx(0.0) and B.verdict(same) == "within 2 s.e. (noise)"
    assert B.verdict({"diff": 0.1, "diff_se": None}) == "no s.e. (one seed)"
    md = B.table_md(t, "t", "en", "d4")
    # the prose measures: a mean over the arm's runs, or none where a run lacks the figure (an older evaluation)
    assert (base["simple_bpb"], base["on_topic"]) == (pytest.approx(2.6), pytest.approx(0.375))
    assert (new["simple_bpb"], new["on_topic"]) == (None, 0.0) and same["simple_bpb"] is None
    assert "| spelling | simple-text bpb | open on topic |" in md
    assert "| base | 2 | 0.600 +- 0.100 | 0.500-0.700 | - | baseline | 0.30 | 2.600 | 0.38 |" in md
    assert "| new | 2 | 0.925 +- 0.025 | 0.900-0.950 | +0.325 +- 0.103 | beyond 2 s.e. | 1.00 | - | 0.00 |" in md
    assert "- new: midtrain --mix x=1; sft (defaults)" in md and "- same: midtrain (defaults), the runs of arm base; sft --lr-frac 0.5" in md


def _args(home, *extra):
    from chibichat.stages.bench import preset_chat_flags, preset_compiled_stages

    p = argparse.ArgumentParser()
    p.add_argument("--home")
    B.add_args(p)
    # as the CLI hands them down (stages/bench.py)
    p.set_defaults(chat_stage_flags=preset_chat_flags, compiled_stages=preset_compiled_stages,
                   parse_command=build_parser().parse_args)
    return p.parse_args(["--home", str(home), *extra])


def test_refuses_a_missing_base_checkpoint_and_bad_steps(tmp_path):
    with pytest.raises(ChibiError, match=r"no base checkpoint 'd9' in .*pretrain one first"):
        B.run(_args(tmp_path, "--from-tag", "d9"))
    with pytest.raises(ChibiError, match="--sft-steps must be >= 1, got 0"):
        B.run(_args(tmp_path, "--from-tag", "d9", "--sft-steps", "0"))
    with pytest.raises(ChibiError, match="--name 'A B' must be lower-case"):
        B.run(_args(tmp_path, "--from-tag", "d9", "--name", "A B"))


def test_an_out_under_a_file_is_refused_before_any_run(tmp_path):
    """It used to end the bench, after every run, with a traceback from mkdir."""
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ChibiError) as e:  # before the missing base checkpoint is even looked for
        B.run(_args(tmp_path, "--from-tag", "d9", "--out", str(f / "report")))
    assert str(e.value) == f"--out {f / 'report'} cannot be written: {f} is a file, not a directory; pass another --out"


def test_stage_commands_carry_the_arm_mixtures_and_the_seed(tmp_path):
    from chibichat.common import Home

    args = _args(tmp_path, "--from-tag", "d4", "--name", "ab", "--mid-steps", "7", "--sft-steps", "9",
                 "--max-per-skill", "2", "--device", "cpu")
    (tm, mid, m), (ts, sft, s), (te, ev, e) = B.stage_argvs(args, Home.resolve(tmp_path), B.Arm("w", ("--mix", "a=1"), ()), 3)
    assert (mid, sft, ev) == ("mid", "sft", "eval") and tm == ts == te == "ab-w-s3"
    assert m[:1] == ["midtrain"] and m[m.index("--from-tag") + 1] == "d4" and m[m.index("--tag") + 1] == "ab-w-s3"
    assert m[m.index("--num-steps") + 1] == "7" == m[m.index("--eval-every") + 1] and m[m.index("--seed") + 1] == "3"
    assert m[m.index("--mix") + 1] == "a=1" and "--mix" not in s  # an empty mixture: the stage's default
    assert s[s.index("--from") + 1] == "mid" and s[s.index("--from-tag") + 1] == "ab-w-s3"
    assert s[s.index("--num-steps") + 1] == "9" and s[s.index("--seed") + 1] == "3"
    assert e[:2] == ["eval", "skills"] and e[e.index("--from") + 1] == "sft" and e[e.index("--tag") + 1] == "ab-w-s3"
    assert e[e.index("--max-per-skill") + 1] == "2" and e[e.index("--lang") + 1] == "en"
    for argv in (m, s, e):  # every stage's own parser accepts its command
        from chibichat.cli import build_parser

        build_parser().parse_args(argv)


def test_rl_arms_run_rl_from_the_sft_model_and_are_judged_after_it(tmp_path):
    from chibichat.cli import build_parser
    from chibichat.common import Home
    from chibichat.stages.speedrun import PRESETS

    arms = B.parse_arms(["default", "lr;;--lr-frac 0.25", "rl2;;;--task arithmetic-multi --lr-frac 0.3"])
    assert {k: v.name for k, v in B.sft_owners(arms).items()} == {"default": "default", "lr": "lr", "rl2": "default"}
    with pytest.raises(ChibiError, match=r"^--arm 'rl2' has RL flags but --rl-steps is 0: give --rl-steps N"):
        B.run(_args(tmp_path, "--from-tag", "d4", "--arm", "rl2;;;--task arithmetic-multi"))
    with pytest.raises(ChibiError, match="--rl-steps must be >= 0, got -1"):
        B.run(_args(tmp_path, "--from-tag", "d4", "--rl-steps", "-1"))
    for lang, task in (("en", PRESETS["cpu"].rl_task[0]), ("ja", PRESETS["cpu"].rl_task[1])):
        args = _args(tmp_path, "--from-tag", "d4", "--name", "ab", "--rl-steps", "6", "--lang", lang)
        assert B.judged_stage(args) == "rl"
        runs = B.stage_argvs(args, Home.resolve(tmp_path), arms[2], 1, arms[0], arms[0])
        assert [(t, st) for t, st, _ in runs] == [("ab-default-s1", "mid"), ("ab-default-s1", "sft"),
                                                  ("ab-default-s1", "eval"), ("ab-rl2-s1", "rl"), ("ab-rl2-s1", "eval")]
        (_, _, m), (_, _, s), (_, _, e1), (_, _, r), (_, _, e2) = runs
        # RL starts from the SFT model it shares with arm default; the arm's --task replaces the preset's
        assert r[:1] == ["rl"] and r[r.index("--from") + 1] == "sft" and r[r.index("--from-tag") + 1] == "ab-default-s1"
        assert r[r.index("--tag") + 1] == "ab-rl2-s1" and r[r.index("--num-steps") + 1] == "6"
        assert r[r.index("--seed") + 1] == "1" and r.count("--task") == 1 and r[r.index("--task") + 1] == "arithmetic-multi"
        assert r[r.index("--lr-frac") + 1] == "0.3"
        assert (e1[e1.index("--from") + 1], e1[e1.index("--tag") + 1]) == ("sft", "ab-default-s1")
        assert (e2[e2.index("--from") + 1], e2[e2.index("--tag") + 1]) == ("rl", "ab-rl2-s1")
        # an arm without RL flags runs the quickstart's RL task for the language
        r0 = B.stage_argvs(args, Home.resolve(tmp_path), arms[0], 1)[3][2]
        assert r0[r0.index("--task") + 1] == task
        for argv in (m, s, e1, r, e2, r0):
            build_parser().parse_args(argv)
    no_rl = B.stage_argvs(_args(tmp_path, "--from-tag", "d4"), Home.resolve(tmp_path), arms[0], 0)
    assert [st for _, st, _ in no_rl] == ["mid", "sft", "eval"]
    rows = [{"arm": a.name, "skills": x, "per_skill": {}, "sft_skills": y}
            for a, x, y in ((arms[0], 0.6, 0.5), (arms[1], 0.7, 0.4), (arms[2], 0.65, 0.5))]
    md = B.table_md(B.arm_table(arms, rows), "ab", "en", "d4", rl_steps=6)
    assert "held-out skills (en) after RL (6 steps)" in md and "| verdict | after SFT |" in md
    assert "| default | 1 | 0.600 | 0.600-0.600 | - | baseline | 0.500 |" in md
    assert "- rl2: midtrain (defaults), the runs of arm default; sft (defaults), the runs of arm default; " \
           "rl --task arithmetic-multi --lr-frac 0.3" in md
    assert "- lr: midtrain (defaults), the runs of arm default; sft --lr-frac 0.25; rl (defaults)" in md


def test_arms_with_the_same_midtraining_flags_share_their_midtraining(tmp_path):
    from chibichat.common import Home

    arms = B.parse_arms(["default", "lr;;--lr-frac 0.25", "mix;--mix a=1;", "mix-lr;--mix a=1;--lr-frac 2"])
    owners = B.mid_owners(arms)
    assert {k: v.name for k, v in owners.items()} == {"default": "default", "lr": "default", "mix": "mix",
                                                      "mix-lr": "mix"}
    args = _args(tmp_path, "--from-tag", "d4", "--name", "ab")
    (tm, _, m), (ts, _, s), (te, _, e) = B.stage_argvs(args, Home.resolve(tmp_path), arms[3], 2, owners["mix-lr"])
    assert (tm, ts, te) == ("ab-mix-s2", "ab-mix-lr-s2", "ab-mix-lr-s2")
    assert m[m.index("--tag") + 1] == "ab-mix-s2" and m[m.index("--mix") + 1] == "a=1"
    assert s[s.index("--from-tag") + 1] == "ab-mix-s2" and s[s.index("--tag") + 1] == "ab-mix-lr-s2"
    assert e[e.index("--tag") + 1] == "ab-mix-lr-s2"
    rows = [{"arm": a.name, "skills": 0.5, "per_skill": {}} for a in arms]
    md = B.table_md(B.arm_table(arms, rows), "ab", "en", "d4")
    assert "- lr: midtrain (defaults), the runs of arm default; sft --lr-frac 0.25" in md
    assert "- mix-lr: midtrain --mix a=1, the runs of arm mix; sft --lr-frac 2" in md
    assert "- mix: midtrain --mix a=1; sft (defaults)" in md


@pytest.mark.slow
def test_bench_runs_every_arm_and_seed_then_resumes_without_training(tmp_path, monkeypatch, capsys):
    home, _ = make_base(tmp_path / "home")
    argv = ["bench", "skills", "--home", str(home.root), "--from-tag", "d2", "--seeds", "0",
            "--arm", "default", "--arm", "small;--mix chitchat=0.05,arithmetic=0.1;--mix arithmetic=0.1 --lr-frac 0.25",
            "--arm", "lr;;--lr-frac 0.25", "--mid-steps", "2", "--sft-steps", "2", "--max-new-tokens", "8", "--max-per-skill", "1",
            "--name", "t", "--device", "cpu", "--dtype", "float32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # arm lr changes only SFT: it shares the default arm's midtraining, trained once
    assert out.count("$ chibichat midtrain") == 2 and out.count("$ chibichat sft") == out.count("$ chibichat eval") == 3
    assert "t-lr-s0: mid done already (shared with arm default), not re-trained" in out
    data = json.loads((home.report_dir / "bench-skills-t.json").read_text())
    assert [(r["arm"], r["seed"], r["tag"], r["mid_tag"]) for r in data["rows"]] == [
        ("default", 0, "t-default-s0", "t-default-s0"), ("small", 0, "t-small-s0", "t-small-s0"),
        ("lr", 0, "t-lr-s0", "t-default-s0")]
    for row in data["rows"]:
        ev = json.loads((home.eval_dir("sft", row["tag"]) / "summary.json").read_text())
        assert row["skills"] == ev["skills"] and row["per_skill"]["spelling"] == ev["skills_spelling"]
        assert (row["simple_bpb"], row["on_topic"]) == (ev["skills_simple_bpb"], ev["skills_open_on_topic"])
        assert ev["skills_n"] == 7  # one prompt per skill
        mid = json.loads((home.checkpoints_dir("mid", row["mid_tag"]) / "summary.json").read_text())
        sft = json.loads((home.checkpoints_dir("sft", row["tag"]) / "summary.json").read_text())
        assert mid["steps"] == sft["steps"] == 2 and sft["source"].endswith(f"mid/{row['mid_tag']}/step_000002")
    # the arm's mixtures reached its stages; the default arm trained on the defaults
    assert set(json.loads((home.checkpoints_dir("mid", "t-small-s0") / "summary.json").read_text())["mixture"]) \
        == {"chitchat", "arithmetic"}
    assert set(json.loads((home.checkpoints_dir("sft", "t-small-s0") / "summary.json").read_text())["mixture"]) \
        == {"arithmetic"}
    assert len(json.loads((home.checkpoints_dir("sft", "t-default-s0") / "summary.json").read_text())["mixture"]) > 3
    assert data["arms"][1]["sft_flags"] == "--mix arithmetic=0.1 --lr-frac 0.25"
    from chibichat.train.checkpoint import read_meta, resolve_checkpoint

    assert read_meta(resolve_checkpoint(home, "sft", "t-small-s0"))["flags"]["lr_frac"] == 0.25
    assert read_meta(resolve_checkpoint(home, "sft", "t-lr-s0"))["flags"]["lr_frac"] == 0.25
    assert read_meta(resolve_checkpoint(home, "sft", "t-default-s0"))["flags"]["lr_frac"] == 0.5
    md = (home.report_dir / "bench-skills-t.md").read_text()
    assert "| default | 1 |" in md and "| small | 1 |" in md and "no s.e. (one seed)" in md
    d0 = data["rows"][0]
    assert f"| {d0['simple_bpb']:.3f} | {d0['on_topic']:.2f} |\n" in md.split("| default | 1 |")[1]

    # Resume: a run whose eval exists is read; a run with trained stages but no eval only evaluates.
    (home.eval_dir("sft", "t-small-s0") / "summary.json").unlink()
    calls = []
    real = B.subprocess.run

    def record(cmd, *a, **k):
        calls.append(cmd[3:5])
        return real(cmd, *a, **k)

    monkeypatch.setattr(B.subprocess, "run", record)
    assert main(argv) == 0
    assert calls == [["eval", "skills"]]
    out = capsys.readouterr().out
    assert "t-default-s0: done already" in out and "t-small-s0: mid done already, not re-trained" in out
    assert json.loads((home.report_dir / "bench-skills-t.json").read_text())["rows"] == data["rows"]

    # RL added to the finished bench: the same tags, so midtraining, SFT and its evaluation are read and
    # only RL and its evaluation run; arm rl2 (RL flags only) shares arm default's SFT model.
    calls.clear()
    small = "--prompts-per-step 1 --grad-accum 1 --num-samples 2 --max-new-tokens 8 --passk-items 2 --passk-k 2"
    rl_argv = argv[:argv.index("--arm")] + ["--arm", f"default;;;{small}", "--arm", f"rl2;;;--task spelling {small}",
                                            "--rl-steps", "1", *argv[argv.index("--mid-steps"):]]
    assert main(rl_argv) == 0
    assert calls == [["rl", "--home"], ["eval", "skills"]] * 2
    out = capsys.readouterr().out
    assert "t-rl2-s0: sft done already (shared with arm default), not re-trained" in out
    assert "t-rl2-s0: eval of sft done already (shared with arm default), not re-run" in out
    rl_data = json.loads((home.report_dir / "bench-skills-t.json").read_text())
    assert (rl_data["rl_steps"], rl_data["judged_after"]) == (1, "rl")
    for row in rl_data["rows"]:
        ev = json.loads((home.eval_dir("rl", row["tag"]) / "summary.json").read_text())
        assert row["skills"] == ev["skills"] and row["sft_tag"] == "t-default-s0"
        assert row["sft_skills"] == data["rows"][0]["skills"]  # the SFT model's score, read from its evaluation
        rl = json.loads((home.checkpoints_dir("rl", row["tag"]) / "summary.json").read_text())
        assert rl["source"].endswith("sft/t-default-s0/step_000002")
    from chibichat.stages.speedrun import PRESETS

    assert read_meta(resolve_checkpoint(home, "rl", "t-default-s0"))["flags"]["task"] == PRESETS["cpu"].rl_task[0]
    assert read_meta(resolve_checkpoint(home, "rl", "t-rl2-s0"))["flags"]["task"] == "spelling"
    assert "after RL (1 step)" in (home.report_dir / "bench-skills-t.md").read_text()


def test_finished_stages_are_reused_only_with_the_settings_they_ran_with(tmp_path, monkeypatch):
    """A rerun under the same --name with other steps or eval settings is refused, naming the flag,
    instead of tabulating the old runs under the new settings; where a stage ran (--device) may differ."""
    from chibichat.cli import build_parser
    from chibichat.train import checkpoint

    home, _ = make_base(tmp_path / "home")
    flags = {}  # (stage, tag) -> the flags its checkpoint records (as the stage parsed its command)
    monkeypatch.setattr(checkpoint, "resolve_checkpoint", lambda h, stage, tag, step=None: (stage, tag))
    monkeypatch.setattr(checkpoint, "read_meta", lambda where: {"model_config": {"seq_len": 256}} if where[0] == "base"
                        else {"flags": flags[where]})
    monkeypatch.setattr(B.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a[0]}"))

    def finish(*extra):  # the run ab-default-s0 finished with these bench flags, on another device
        args = _args(home.root, "--from-tag", "d2", "--seeds", "0", "--device", "cuda", *extra)
        B.resolve_reply_budget(args, home)
        for tag, stage, argv in B.stage_argvs(args, home, B.Arm("default"), 0):
            if stage == "eval":
                (home.eval_dir("sft", tag)).mkdir(parents=True, exist_ok=True)
                (home.eval_dir("sft", tag) / "summary.json").write_text(json.dumps(
                    {"skills": 0.5, "skills_eval": {"max_new_tokens": args.max_new_tokens, "max_per_skill": None}}))
            else:
                home.checkpoints_dir(stage, tag).mkdir(parents=True, exist_ok=True)
                (home.checkpoints_dir(stage, tag) / "summary.json").write_text("{}")
                flags[(stage, tag)] = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "func"}

    finish("--mid-steps", "250")
    assert B.run(_args(home.root, "--from-tag", "d2", "--seeds", "0", "--mid-steps", "250", "--device", "cpu")) == 0
    with pytest.raises(ChibiError, match=r"^ab-default-s0: its finished mid run was trained with --num-steps 250, this "
                                         r"bench asks 7 \(set by --mid-steps\): .* another --name, or delete "):
        B.run(_args(home.root, "--from-tag", "d2", "--seeds", "0", "--mid-steps", "7"))
    with pytest.raises(ChibiError, match=r"^ab-default-s0: its finished sft run was trained with --num-steps 300, this "
                                         r"bench asks 5 \(set by --sft-steps\)"):
        B.run(_args(home.root, "--from-tag", "d2", "--seeds", "0", "--mid-steps", "250", "--sft-steps", "5"))
    # The default budget is resolved from the base model's context (256 -> 128), as eval skills resolves it.
    with pytest.raises(ChibiError, match=r"^ab-default-s0: its sft model was evaluated with --max-new-tokens 128, this "
                                         r"bench asks 32: rerun with --max-new-tokens 128, give the bench another --name"):
        B.run(_args(home.root, "--from-tag", "d2", "--seeds", "0", "--mid-steps", "250", "--max-new-tokens", "32"))


def test_a_failed_stage_names_itself_and_how_to_resume(tmp_path, monkeypatch):
    home, _ = make_base(tmp_path / "home")

    class Failed:
        returncode = 3

    monkeypatch.setattr(B.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ChibiError, match=r"mid of ab-default-s0 failed \(exit code 3\).*Re-run the bench to resume"):
        B.run(_args(home.root, "--from-tag", "d2", "--seeds", "0"))


def test_an_arm_whose_stage_command_does_not_parse_is_refused_before_any_run(tmp_path, monkeypatch):
    """A misspelt flag or a bad value in any arm's part is found before the first stage of the first arm runs."""
    home, _ = make_base(tmp_path / "home")
    monkeypatch.setattr(B.subprocess, "run", lambda *a, **k: pytest.fail("a stage ran"))
    cases = [("ok;--mix spelling=2;", "late;;--mixx spelling=2",
              "--arm 'late': its sft command does not parse, so no run is started: unrecognized arguments: --mixx "
              "spelling=2 (the command: chibichat sft --home "),
             ("lr;;--lr-frac half",
              "--arm 'lr': its sft command does not parse, so no run is started: argument --lr-frac: invalid float "
              "value: 'half'"),
             ("rl;;;--prompts-per-step x", "--arm 'rl': its rl command does not parse, so no run is started: "
              "argument --prompts-per-step: invalid int value: 'x'")]
    for *specs, why in cases:
        argv = ["--from-tag", "d2", "--seeds", "0"] + [a for spec in specs for a in ("--arm", spec)]
        if any(spec.count(";") == 3 for spec in specs):
            argv += ["--rl-steps", "2"]
        with pytest.raises(ChibiError) as e:
            B.run(_args(home.root, *argv))
        assert str(e.value).startswith(why), str(e.value)


def test_every_bench_list_flag_shares_one_parser_and_its_messages():
    from chibichat.bench import serve, sweep

    assert sweep.parse_depths("4,2") == [2, 4] and serve._levels("1,8") == [1, 8]
    with pytest.raises(ChibiError, match=r"^--clients must list distinct client counts >= 1, got '0,8'$"):
        serve._levels("0,8")
    with pytest.raises(ChibiError, match=r"^--clients must be a comma list of integers, e.g. 1,8,32; got '1;8'$"):
        serve._levels("1;8")


@pytest.mark.parametrize("preset, lang", [("cpu", "en"), ("cpu", "ja"), ("cpu-hour", "ja")])
def test_a_preset_start_is_the_speedruns_chat_stages(tmp_path, preset, lang):
    """--preset: every arm's midtrain and sft carry the flags the preset's speedrun passes for the language
    (its averaged runs; for the cpu preset in Japanese its Japanese mixtures), at its step counts, with the
    arm's own flags after them; without it the stages' defaults at the cpu preset's step counts."""
    from chibichat.cli import build_parser
    from chibichat.common import Home
    from chibichat.stages.midtrain import MID_MIX_JA
    from chibichat.stages.sft import SFT_MIX_JA
    from chibichat.stages.speedrun import PRESETS, plan

    args = _args(tmp_path, "--from-tag", "d4", "--preset", preset, "--lang", lang)
    arm = B.parse_arm("lr;--lr-frac 0.5;--lr-frac 0.25")
    (_, _, m), (_, _, s), _ = B.stage_argvs(args, Home.resolve(tmp_path), arm, 0)
    steps = {"cpu": ("250", "300"), "cpu-hour": ("400", "600")}[preset]
    for argv, n, mix in ((m, steps[0], MID_MIX_JA), (s, steps[1], SFT_MIX_JA)):
        assert argv.count("--num-steps") == argv.count("--eval-every") == argv.count("--soup") == 1
        assert argv[argv.index("--num-steps") + 1] == n == argv[argv.index("--eval-every") + 1]
        assert argv[argv.index("--soup") + 1] == "4" and argv[-2] == "--lr-frac"
        ja_alone = (preset, lang) == ("cpu", "ja")
        assert (argv[argv.index("--mix") + 1] if ja_alone else "--mix" not in argv) == (mix if ja_alone else True)
        parsed = build_parser().parse_args(argv)
        assert parsed.soup == 4 and parsed.lr_frac == (0.5 if argv is m else 0.25)
    # the hand-off: each flag the bench takes from the preset is the speedrun's for that stage
    steps_by_name = {st.name: st.argv for st in plan(Home.resolve(tmp_path), PRESETS[preset], lang, "dense", "cpu",
                                                      budget=False)}
    mid_start, sft_start, _, _ = B.preset_start(args)
    for start, stage in ((mid_start, "midtrain"), (sft_start, "sft")):
        run = steps_by_name[stage]
        assert start and all(run[run.index(f) + 1] == v for f, v in zip(start[::2], start[1::2]))
    # compiled as the preset's speedrun compiles them on this machine (eager there without a C++ compiler)
    from chibichat.stages.speedrun import compile_stages

    assert B.compiled_stages(args) == compile_stages(None, PRESETS[preset], "cpu")  # the speedrun's own choice
    (_, _, m), (_, _, s), _ = B.stage_argvs(args, Home.resolve(tmp_path), arm, 0, compiled=("midtrain", "sft"))
    assert m.count("--compile") == s.count("--compile") == 1 and m[-2:] == ["--lr-frac", "0.5"]
    assert build_parser().parse_args(m).compile and build_parser().parse_args(s).compile
    (_, _, m), (_, _, s), _ = B.stage_argvs(args, Home.resolve(tmp_path), arm, 0, compiled=("sft",))
    assert "--compile" not in m and "--compile" in s
    # no preset: the stages' defaults at the cpu preset's steps, eager; --mid-steps / --sft-steps override either
    plain = _args(tmp_path, "--from-tag", "d4", "--lang", lang, "--sft-steps", "9")
    assert B.compiled_stages(plain) == ()
    assert B.preset_start(plain) == ((), (), 250, 9)
    (_, _, m), (_, _, s), _ = B.stage_argvs(plain, Home.resolve(tmp_path), B.Arm("default"), 0)
    assert "--soup" not in m + s and "--mix" not in m + s and s[s.index("--num-steps") + 1] == "9"
    with pytest.raises(SystemExit):
        _args(tmp_path, "--from-tag", "d4", "--preset", "d20")  # the GPU presets' chat stages are not CPU-sized


def test_a_preset_bench_refuses_runs_of_another_start(tmp_path, monkeypatch):
    """Reuse: a finished run without the preset's flags is refused naming --preset; a report of the name
    that started from another preset (or none) is refused before any run; the report names the start."""
    from chibichat.common import Home
    from chibichat.train import checkpoint

    home = Home.resolve(tmp_path)
    monkeypatch.setattr(checkpoint, "read_meta", lambda where: {"flags": {"num_steps": 250, "eval_every": 250,
                        "from_stage": "base", "from_tag": "d4", "tag": "ab-default-s0", "seed": 0, "soup": 1}})
    monkeypatch.setattr(checkpoint, "resolve_checkpoint", lambda h, stage, tag, step=None: (stage, tag))
    args = _args(tmp_path, "--from-tag", "d4", "--preset", "cpu")
    _, _, m = B.stage_argvs(args, home, B.Arm("default"), 0)[0]
    with pytest.raises(ChibiError, match=r"^ab-default-s0: its finished mid run was trained with --soup 1, this bench "
                                         r"asks 4 \(set by --preset\)"):
        B.check_reusable(home, "mid", "ab-default-s0", m, ())
    report = tmp_path / "bench-skills-ab.json"
    report.write_text(json.dumps({"preset": None}))
    with pytest.raises(ChibiError) as e:
        B.check_same_preset(args, report)
    assert str(e.value) == (f"bench 'ab': its runs started from no --preset ({report}), this bench asks --preset cpu: "
                            "give the bench another --name, or pass no --preset")
    report.write_text(json.dumps({"preset": "cpu"}))
    B.check_same_preset(args, report)
    with pytest.raises(ChibiError, match=r"started from --preset cpu .* asks no --preset: .* or pass --preset cpu$"):
        B.check_same_preset(_args(tmp_path, "--from-tag", "d4"), report)
    t = B.arm_table([B.Arm("default"), B.Arm("lr", ("--lr-frac", "0.5"))],
                    [{"arm": a, "skills": 0.5, "per_skill": {}} for a in ("default", "lr")])
    md = B.table_md(t, "ab", "en", "d4", start=("cpu", "--soup 4", "--soup 4"))
    assert "Every arm starts from preset cpu's chat stages: midtrain --soup 4, sft --soup 4." in md
    assert "- lr: midtrain --lr-frac 0.5; sft (the preset's)" in md


def test_a_preset_bench_runs_the_presets_stages_and_records_its_start(tmp_path, monkeypatch, capsys):
    """run() with --preset: the stages get the preset's flags at its steps, the report records the start and
    says it, and a rerun of the name without the preset is refused before anything runs."""
    home, _ = make_base(tmp_path / "home")
    calls = []

    class Done:
        returncode = 0

    def fake(cmd, *a, **k):  # a stage "runs": it leaves the summary the bench reads
        argv = cmd[3:]
        calls.append(argv)
        tag = argv[argv.index("--tag") + 1]
        if argv[0] == "eval":
            d = home.eval_dir(argv[argv.index("--from") + 1], tag)
            body = {"skills": 0.5, "skills_eval": {"max_new_tokens": 128, "max_per_skill": None}}
        else:
            d = home.checkpoints_dir({"midtrain": "mid", "sft": "sft"}[argv[0]], tag)
            body = {}
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(json.dumps(body))
        return Done()

    monkeypatch.setattr(B.subprocess, "run", fake)
    argv = ["bench", "skills", "--home", str(home.root), "--from-tag", "d2", "--seeds", "0", "--preset", "cpu",
            "--arm", "default", "--arm", "lr;--lr-frac 0.5;--lr-frac 0.25", "--name", "p"]
    assert main(argv) == 0
    mids = [c for c in calls if c[0] == "midtrain"]
    assert len(mids) == 2 and all(c[c.index("--soup") + 1] == "4" and c[c.index("--num-steps") + 1] == "250"
                                  for c in mids)
    # the chat stages compiled as the preset's speedrun compiles them here (eager without a C++ compiler)
    from chibichat.stages.speedrun import PRESETS, compile_stages

    compiled = compile_stages(None, PRESETS["cpu"], "cpu")
    assert all(("--compile" in c) == (c[0] in compiled) for c in calls if c[0] in ("midtrain", "sft"))
    data = json.loads((home.report_dir / "bench-skills-p.json").read_text())
    assert (data["preset"], data["preset_mid_flags"], data["preset_sft_flags"]) == ("cpu", "--soup 4",
                                                                                  "--soup 4")
    assert (data["mid_steps"], data["sft_steps"]) == (250, 300)
    assert "Every arm starts from preset cpu's chat stages" in (home.report_dir / "bench-skills-p.md").read_text()
    calls.clear()
    capsys.readouterr()
    assert main([a for a in argv if a not in ("--preset", "cpu")]) != 0
    assert "chibichat bench: error: bench 'p': its runs started from --preset cpu (" in capsys.readouterr().err
    assert calls == []
