"""`chibichat bench skills`: chat-data A/B tests, several seeds per arm, judged on the held-out skills.

A change to the midtraining or SFT mixture moves `eval skills` by a few points, and so does the seed: any
change to the chat data reshuffles items and batches the way a new seed does. On the quickstart's d4
the default mixture scored 0.57-0.66 over four seeds (docs/benchmarks.md, "the seed spread"), so one
run per arm, or two, cannot tell a +0.03 change from luck. This runs, for every arm and every seed,

    chibichat midtrain --from base --from-tag BASE --tag NAME-ARM-sSEED --num-steps M --seed SEED [--mix MID]
    chibichat sft      --from mid  --from-tag NAME-ARM-sSEED --num-steps S --seed SEED [--mix SFT]
    chibichat eval skills --from sft --tag NAME-ARM-sSEED --lang LANG --max-new-tokens T

and with --rl-steps R > 0 also, from that SFT model,

    chibichat rl --from sft --from-tag NAME-ARM-sSEED --tag NAME-ARM-sSEED --num-steps R --seed SEED [RL_FLAGS]
    chibichat eval skills --from rl --tag NAME-ARM-sSEED ...

(RL's --task defaults to the cpu preset's for LANG, so an arm without RL flags is the quickstart's RL), and
the arms are judged after RL, with the score after SFT beside it: RL on CPU moves the held-out skills by a
few points either way, so its settings need the same seeds-and-standard-errors treatment as the data's.

each in its own process (the same commands a user runs), from one base checkpoint of the home, and
tabulates per arm the mean skills score over seeds with its standard error (sample s.d. / sqrt(n)), the
range, the per-skill means, and each arm's difference from the first arm with the standard error of the
difference (sqrt(se_a^2 + se_b^2); the seeds of two arms are not treated as paired: their data orders differ,
and even arms that share their midtraining (below) differ in SFT, so this is the conservative figure).

With --preset cpu (or cpu-hour) every arm starts from that preset's midtraining and SFT flags as its speedrun
passes them for --lang (its averaged runs, --soup 4; for Japanese its Japanese mixtures where it has them), and
its step counts are the defaults of --mid-steps and --sft-steps: the default arm is then the quickstart's chat
stages, and an arm's flags come after the preset's (the last of a repeated flag counts). Its chat stages are
compiled where the preset compiles them (--compile: eager's numbers within rounding, faster steps; eager, with the
speedrun's note, on a CPU without a C++ compiler). Without it the arms start from the stages' defaults: single,
eager runs and, in Japanese, the English tasks beside the Japanese ones.

An arm is `NAME` (the stages' defaults, or --preset's), `NAME;MID_FLAGS;SFT_FLAGS` or `NAME;MID_FLAGS;SFT_FLAGS;RL_FLAGS`:
more flags of midtrain, of sft and of rl, as on their command lines (an empty part: that stage's defaults), e.g.
`--arm "words;;--mix spelling=2,identity=1"`, `--arm "sft-lr;;--lr-frac 0.25"` or, with --rl-steps,
`--arm "rl-two;;;--task arithmetic-multi"`. The flags the bench sets itself (source, tag, steps, seed, evaluation
cadence, device) are refused in an arm. A code change is compared by running the bench
from each version of the code, each installed in its own environment (a clone set up with
scripts/setup.sh: the stages run as `python -m chibichat` of the running interpreter), with its own
--name on the same home and base.

Arms with the same midtraining flags share their midtraining: per seed it runs once, under the tag of the first
such arm, and the other arms' SFT starts from it (an arm that changes only SFT costs only SFT and evaluation).
Likewise arms with the same midtraining and SFT flags share their SFT run (an arm that changes only RL costs
only RL and evaluation).

Writes DIR/bench-skills-NAME.json (one row per run, and the per-arm table) and .md, DIR = --out or
home/report. A run whose eval summary exists is read, not run again (a stage whose summary exists is
not re-trained): an interrupted bench resumes, and a finished one is re-tabulated for free. A finished
stage is reused only when it ran with the flags this bench sets, --preset's included (its checkpoint's recorded flags,
bench/reuse.py; an evaluation's --max-new-tokens and --max-per-skill): a bench rerun with other
--mid-steps, --sft-steps, --rl-steps, --seeds, --preset or --max-new-tokens under the same --name is refused,
naming the flag, instead of tabulating the old runs as the new settings. (An arm's own flags are not compared:
the arm's name stands for them, so give a changed arm a new name.)
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from chibichat.common import (ChibiError, Home, atomic_write_json, atomic_write_text, check_at_least, check_output,
                              parse_int_list)

HELP = "A/B test chat-data mixtures over several seeds: midtrain + SFT + held-out skills per arm and seed"

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class Arm:
    name: str
    mid_flags: tuple[str, ...] = ()  # added to midtrain's command line; () = its defaults
    sft_flags: tuple[str, ...] = ()
    rl_flags: tuple[str, ...] = ()  # only with --rl-steps > 0


# Set by the bench for every run; an arm that set them would not be the same experiment on another seed.
OWNED_FLAGS = ("--home", "--from", "--from-tag", "--from-step", "--tag", "--num-steps", "--eval-every", "--seed",
               "--device", "--dtype", "--resume", "--overwrite")


# The presets whose chat stages --preset starts the arms from: the CPU ones (a GPU preset's chat stages run at
# sizes and batches a CPU bench does not).
BENCH_PRESETS = ("cpu", "cpu-hour")

# The bench flag that sets a stage flag, for the message of a refused reuse.
BENCH_FLAG_OF = {("mid", "--num-steps"): "--mid-steps", ("mid", "--eval-every"): "--mid-steps",
                 ("sft", "--num-steps"): "--sft-steps", ("sft", "--eval-every"): "--sft-steps",
                 ("rl", "--num-steps"): "--rl-steps", ("rl", "--task"): "--lang", ("mid", "--from-tag"): "--from-tag",
                 ("mid", "--seed"): "--seeds", ("sft", "--seed"): "--seeds", ("rl", "--seed"): "--seeds"}


def owned_flag(arg: str) -> str | None:
    """The bench-owned flag that the arm argument `arg` sets: the flag itself ("--seed", "--seed=3") or an
    abbreviation of one ("--see"), which the stages' argparse accepts as that flag; else None."""
    name = arg.split("=", 1)[0]
    if name in OWNED_FLAGS:
        return name
    if not name.startswith("--") or len(name) < 3:
        return None
    return next((f for f in OWNED_FLAGS if f.startswith(name)), None)


def add_args(p) -> None:
    p.add_argument("--from-tag", required=True, help="tag of the base checkpoint every run starts from")
    p.add_argument("--arm", action="append", default=None, metavar="NAME[;MID_FLAGS;SFT_FLAGS[;RL_FLAGS]]",
                   help="an arm: a name, then optionally more midtrain, sft and rl flags (e.g. 'w;;--mix spelling=2'); "
                        "repeat for each arm; the first is the baseline (default: one arm 'default')")
    p.add_argument("--seeds", default="0,1,2,3", help="comma list of seeds, each run for every arm "
                   "(default: 0,1,2,3)")
    p.add_argument("--preset", choices=BENCH_PRESETS, default=None,
                   help="start every arm from this preset's midtraining and SFT flags for --lang (its averaged runs, "
                        "its Japanese mixtures) and step counts (default: the stages' defaults)")
    p.add_argument("--mid-steps", type=int, default=None,
                   help="midtraining steps (default: the preset's; without --preset the cpu preset's, 250)")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="SFT steps (default: the preset's; without --preset the cpu preset's, 300)")
    p.add_argument("--rl-steps", type=int, default=0,
                   help="RL steps after SFT, the arms then judged after RL (default: 0, no RL; the cpu preset's: 15)")
    p.add_argument("--lang", choices=("en", "ja"), default="en", help="held-out prompt set (default: en)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per reply in eval skills (default: eval skills' own, min(128, half the context))")
    p.add_argument("--max-per-skill", type=int, default=None,
                   help="first N prompts per skill (smoke runs; default: all)")
    p.add_argument("--name", default="ab", help="names the runs' tags (NAME-ARM-sSEED) and the report (default: ab)")
    p.add_argument("--device", default="auto", help="passed to the stages")
    p.add_argument("--dtype", default="auto", help="passed to the stages")
    p.add_argument("--out", default=None, help="folder for bench-skills-NAME.{json,md} (default: home/report)")


def parse_seeds(text: str) -> list[int]:
    return parse_int_list(text, "--seeds", "seeds", 0, "0,1,2,3")


def parse_arm(spec: str) -> Arm:
    parts = spec.split(";")
    if len(parts) not in (1, 3, 4):
        raise ChibiError(f"--arm {spec!r}: write NAME, NAME;MID_FLAGS;SFT_FLAGS or NAME;MID_FLAGS;SFT_FLAGS;RL_FLAGS "
                         "(an empty part keeps the stage's defaults), e.g. 'words;;--mix spelling=2,letter-count=2'")
    name = parts[0].strip()
    if not NAME_RE.match(name):
        raise ChibiError(f"--arm {spec!r}: the name {name!r} must be lower-case letters, digits and '-' "
                         "(it becomes part of a checkpoint tag)")
    flags = []
    for stage, part in zip(("midtrain", "sft", "rl"), parts[1:]):
        try:
            argv = tuple(shlex.split(part))
        except ValueError as e:
            raise ChibiError(f"--arm {spec!r}: the {stage} flags {part!r} do not parse ({e}); quote as in a shell") from None
        if argv and not argv[0].startswith("--"):
            raise ChibiError(f"--arm {spec!r}: the {stage} part must be flags such as '--mix spelling=2', got "
                             f"{argv[0]!r}")
        owned = [(a.split("=", 1)[0], owned_flag(a)) for a in argv if owned_flag(a)]
        if owned:
            given, flag = owned[0]
            what = flag if given == flag else f"{given} (an abbreviation of {flag})"
            raise ChibiError(f"--arm {spec!r}: {what} is set by the bench for every run "
                             "(use --from-tag, --mid-steps, --sft-steps, --rl-steps, --seeds, --device, --dtype)")
        flags.append(argv)
    return Arm(name, *flags)


def parse_arms(specs: list[str] | None) -> list[Arm]:
    arms = [parse_arm(s) for s in specs] if specs else [Arm("default")]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ChibiError(f"--arm names must differ, got {names}")
    return arms


def run_tag(name: str, arm: Arm, seed: int) -> str:
    return f"{name}-{arm.name}-s{seed}"


def mid_owners(arms: list[Arm]) -> dict[str, Arm]:
    """arm name -> the first arm with the same midtraining flags, whose midtraining it shares."""
    first: dict[tuple[str, ...], Arm] = {}
    return {arm.name: first.setdefault(arm.mid_flags, arm) for arm in arms}


def sft_owners(arms: list[Arm]) -> dict[str, Arm]:
    """arm name -> the first arm with the same midtraining and SFT flags, whose SFT run it shares."""
    first: dict[tuple, Arm] = {}
    return {arm.name: first.setdefault((arm.mid_flags, arm.sft_flags), arm) for arm in arms}


def preset_start(args) -> tuple[tuple[str, ...], tuple[str, ...], int, int]:
    """(midtrain flags, sft flags, midtraining steps, SFT steps) every arm starts from: --preset's chat-stage
    flags for --lang less the ones the bench sets (its --num-steps are the default step counts), or none (the
    stages' defaults) with the cpu preset's step counts; --mid-steps and --sft-steps override the counts.
    The presets live a layer above the benches (stages/speedrun.py): the CLI hands their flags down as
    args.chat_stage_flags(preset name, lang) -> (midtrain flags, sft flags) (stages/bench.py)."""
    out = []
    for flags in args.chat_stage_flags(args.preset or "cpu", args.lang):
        if len(flags) % 2 or not all(f.startswith("--") for f in flags[::2]):
            raise ValueError(f"preset_start reads --flag value pairs, the preset has {flags}")
        pairs = list(zip(flags[::2], flags[1::2]))
        kept = tuple(x for f, v in pairs if not owned_flag(f) for x in (f, v)) if args.preset else ()
        out.append((kept, int(dict(pairs)["--num-steps"])))
    (mid, mid_steps), (sft, sft_steps) = out
    return mid, sft, args.mid_steps or mid_steps, args.sft_steps or sft_steps


def judged_stage(args) -> str:
    """The stage whose checkpoint the arms are judged on: rl with --rl-steps, else sft."""
    return "rl" if args.rl_steps else "sft"


def rl_task_flags(args, arm: Arm) -> list[str]:
    """--task of the cpu preset for --lang unless the arm's RL flags name one: an arm without RL flags runs
    the quickstart's RL."""
    if any(a.split("=", 1)[0] == "--task" for a in arm.rl_flags):
        return []
    from chibichat.tasks.registry import CPU_RL_TASKS

    return ["--task", CPU_RL_TASKS[0 if args.lang == "en" else 1]]


def compiled_stages(args) -> tuple[str, ...]:
    """The chat stages the arms compile: --preset's (as its speedrun does on --device), none without a preset
    (the stages' default). The presets live a layer above: the CLI hands args.compiled_stages(preset, device) down."""
    return args.compiled_stages(args.preset, args.device) if args.preset else ()


def stage_argvs(args, home: Home, arm: Arm, seed: int, mid_arm: Arm | None = None,
                sft_arm: Arm | None = None, compiled: tuple[str, ...] = ()) -> list[tuple[str, str, list[str]]]:
    """[(tag, stage, argv)] of one run: midtrain (under the tag of `mid_arm`, the arm whose midtraining this one
    shares; default itself), sft (under the tag of `sft_arm`, likewise), eval skills of the SFT model; with
    --rl-steps then rl from that SFT model and eval skills of the RL model. Each stage evaluates once, at its end.
    `compiled` (compiled_stages) names the stages ("midtrain", "sft") run with --compile."""
    tag, h = run_tag(args.name, arm, seed), ["--home", str(home.root)]
    mid_tag = run_tag(args.name, mid_arm or arm, seed)
    sft_tag = run_tag(args.name, sft_arm or arm, seed)
    rt = ["--device", args.device, "--dtype", args.dtype]
    mid_start, sft_start, mid_steps, sft_steps = preset_start(args)
    mid = ["midtrain", *h, "--from", "base", "--from-tag", args.from_tag, "--tag", mid_tag,
           "--num-steps", str(mid_steps), "--eval-every", str(mid_steps), "--seed", str(seed), *rt,
           *(["--compile"] if "midtrain" in compiled else []), *mid_start]
    sft = ["sft", *h, "--from", "mid", "--from-tag", mid_tag, "--tag", sft_tag,
           "--num-steps", str(sft_steps), "--eval-every", str(sft_steps), "--seed", str(seed), *rt,
           *(["--compile"] if "sft" in compiled else []), *sft_start]
    mid += arm.mid_flags
    sft += arm.sft_flags
    ev = ["eval", "skills", *h, "--lang", args.lang, *rt]
    if args.max_new_tokens is not None:  # run() has resolved it (resolve_reply_budget); else eval skills' own
        ev += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.max_per_skill is not None:
        ev += ["--max-per-skill", str(args.max_per_skill)]
    out = [(mid_tag, "mid", mid), (sft_tag, "sft", sft), (sft_tag, "eval", [*ev, "--from", "sft", "--tag", sft_tag])]
    if args.rl_steps:
        rl = ["rl", *h, "--from", "sft", "--from-tag", sft_tag, "--tag", tag, "--num-steps", str(args.rl_steps),
              "--seed", str(seed), *rt, *rl_task_flags(args, arm), *arm.rl_flags]
        out += [(tag, "rl", rl), (tag, "eval", [*ev, "--from", "rl", "--tag", tag])]
    return out


def check_reusable(home: Home, stage: str, stage_tag: str, argv: list[str], arm_flags: tuple[str, ...]) -> None:
    """A finished training stage is reused only when its checkpoint recorded the flags the bench sets in
    `argv` (the command it would run; `arm_flags` end it), bench/reuse.py; else a ChibiError naming the flag."""
    from chibichat.bench.reuse import flag_mismatch

    differ = flag_mismatch(home, stage, stage_tag, argv[:len(argv) - len(arm_flags)])
    if differ is not None:
        flag, had, want = differ
        via = BENCH_FLAG_OF.get((stage, flag), flag if flag in OWNED_FLAGS else "--preset")  # the rest: the preset's
        raise ChibiError(f"{stage_tag}: its finished {stage} run was trained with {flag} {had}, this bench asks "
                         f"{want} (set by {via}): its runs are not these settings' runs. Give the bench another "
                         f"--name, or delete {home.checkpoints_dir(stage, stage_tag)} (and its evaluations) to "
                         "train it again")


def check_eval_reusable(args, home: Home, stage: str, stage_tag: str, key: str) -> None:
    """A finished `eval skills` is reused only when it ran with this bench's --max-new-tokens and --max-per-skill."""
    path = home.eval_dir(stage, stage_tag) / "summary.json"
    record = json.loads(path.read_text()).get(f"{key}_eval", {})
    for flag, want in (("--max-new-tokens", args.max_new_tokens), ("--max-per-skill", args.max_per_skill)):
        had = record.get(flag[2:].replace("-", "_"))
        if had != want:
            raise ChibiError(f"{stage_tag}: its {stage} model was evaluated with {flag} {had}, this bench asks {want}: "
                             f"rerun with {flag} {had}, give the bench another --name, or delete {path} to evaluate "
                             "it again")


def skill_keys(lang: str) -> tuple[str, list[tuple[str, str]]]:
    """(summary key of the mean, [(skill, summary key)]) of eval skills for `lang`."""
    from chibichat.eval.skills import summary_prefix
    from chibichat.tasks.skills import SKILLS

    prefix = summary_prefix(lang)
    return prefix, [(s, f"{prefix}_{s.replace('-', '_')}") for s in SKILLS]


def row_of(arm: Arm, seed: int, tag: str, summary: dict, lang: str) -> dict:
    key, per_skill = skill_keys(lang)
    if key not in summary:
        raise ChibiError(f"the eval summary of {tag} has no {key!r}: it was not evaluated with --lang {lang}")
    return {"arm": arm.name, "seed": seed, "tag": tag, "skills": summary[key],
            "per_skill": {s: summary[k] for s, k in per_skill if k in summary},
            "simple_bpb": summary.get(f"{key}_simple_bpb"), "on_topic": summary.get(f"{key}_open_on_topic")}


def mean_se(xs: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample s.d. / sqrt(n)); None for one value."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def arm_table(arms: list[Arm], rows: list[dict]) -> list[dict]:
    """Per arm: n, mean, se, min, max, per-skill means; and the difference from the first arm with its se."""
    out = []
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm.name]
        scores = [r["skills"] for r in rs]
        m, se = mean_se(scores)
        skills = sorted({s for r in rs for s in r["per_skill"]})
        out.append({"arm": arm.name, "mid_flags": shlex.join(arm.mid_flags), "sft_flags": shlex.join(arm.sft_flags),
                    "rl_flags": shlex.join(arm.rl_flags), "mid_of_arm": mid_owners(arms)[arm.name].name,
                    "sft_of_arm": sft_owners(arms)[arm.name].name, "n": len(rs), "mean": m,
                    "se": se, "min": min(scores), "max": max(scores),
                    "per_skill": {s: sum(r["per_skill"][s] for r in rs if s in r["per_skill"]) /
                                  sum(s in r["per_skill"] for r in rs) for s in skills}})
        # The prose measures beside the skills (eval skills: simple-text bpb, open prompts on topic): an arm can
        # raise the skills and cost prose. A mean only where every run has the figure (older evaluations lack it).
        for k in ("simple_bpb", "on_topic"):
            out[-1][k] = (sum(r[k] for r in rs) / len(rs)) if rs and all(r.get(k) is not None for r in rs) else None
        if rs and all("sft_skills" in r for r in rs):  # judged after RL: the same runs' score after SFT
            out[-1]["sft_mean"] = sum(r["sft_skills"] for r in rs) / len(rs)
    base = out[0]
    for a in out:
        a["diff"] = a["mean"] - base["mean"]
        a["diff_se"] = (math.sqrt(a["se"] ** 2 + base["se"] ** 2)
                        if a is not base and a["se"] is not None and base["se"] is not None else None)
    return out


def verdict(a: dict) -> str:
    """Of an arm against the first: is the difference beyond two standard errors of the difference?"""
    if a["diff_se"] is None:
        return "no s.e. (one seed)"
    if a["diff_se"] == 0:
        return "no spread (identical seeds?)" if a["diff"] == 0 else "beyond 2 s.e."
    return "beyond 2 s.e." if abs(a["diff"]) >= 2 * a["diff_se"] else "within 2 s.e. (noise)"


def table_md(table: list[dict], name: str, lang: str, base_tag: str, rl_steps: int = 0,
             start: tuple[str, str, str] | None = None) -> str:
    """The report; `start`: (preset, its midtrain flags, its sft flags) every arm starts from, or None."""
    skills = sorted({s for a in table for s in a["per_skill"]})
    after = f"RL ({rl_steps} step{'' if rl_steps == 1 else 's'})" if rl_steps else "SFT"
    sft_col = rl_steps > 0 and all("sft_mean" in a for a in table)
    lines = [f"`chibichat bench skills --name {name}`: held-out skills ({lang}) after {after}, from base `{base_tag}`; "
             "mean over seeds +- its standard error." + (
                 f" Every arm starts from preset {start[0]}'s chat stages: midtrain {start[1] or '(defaults)'}, "
                 f"sft {start[2] or '(defaults)'}." if start else ""), "",
             "| arm | seeds | skills | range | diff vs first | verdict | " + ("after SFT | " if sft_col else "") +
             " | ".join(skills) + " | simple-text bpb | open on topic |",
             "|---|---|---|---|---|---|" + "---|" * (len(skills) + sft_col + 2)]
    for i, a in enumerate(table):
        se = f" +- {a['se']:.3f}" if a["se"] is not None else ""
        diff = "-" if i == 0 else f"{a['diff']:+.3f}" + (f" +- {a['diff_se']:.3f}" if a["diff_se"] is not None else "")
        lines.append(f"| {a['arm']} | {a['n']} | {a['mean']:.3f}{se} | {a['min']:.3f}-{a['max']:.3f} | {diff} | "
                     f"{'baseline' if i == 0 else verdict(a)} | " + (f"{a['sft_mean']:.3f} | " if sft_col else "") +
                     " | ".join(f"{a['per_skill'].get(s, float('nan')):.2f}" for s in skills) + " | " +
                     ("-" if a.get("simple_bpb") is None else f"{a['simple_bpb']:.3f}") + " | " +
                     ("-" if a.get("on_topic") is None else f"{a['on_topic']:.2f}") + " |")
    lines.append("")
    dflt = "(the preset's)" if start else "(defaults)"
    for a in table:
        shared = f", the runs of arm {a['mid_of_arm']}" if a.get("mid_of_arm", a["arm"]) != a["arm"] else ""
        line = f"- {a['arm']}: midtrain {a['mid_flags'] or dflt}{shared}; sft {a['sft_flags'] or dflt}"
        if rl_steps:
            shared = f", the runs of arm {a['sft_of_arm']}" if a.get("sft_of_arm", a["arm"]) != a["arm"] else ""
            line += f"{shared}; rl {a.get('rl_flags') or '(defaults)'}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def resolve_reply_budget(args, home: Home) -> None:
    """Set args.max_new_tokens to the evaluations' reply budget: eval skills' own rule applied to the base
    model's context (the chat stages keep it), so a finished evaluation is compared with a number, not with
    a default."""
    from chibichat.render import CHECKED_REPLY_CAP, reply_budget
    from chibichat.train.checkpoint import read_meta, resolve_checkpoint

    seq_len = read_meta(resolve_checkpoint(home, "base", args.from_tag))["model_config"]["seq_len"]
    args.max_new_tokens = reply_budget(seq_len, args.max_new_tokens, cap=CHECKED_REPLY_CAP, what="--max-new-tokens")


def check_same_preset(args, report: Path) -> None:
    """A bench under a --name whose report says its runs started from another --preset (or none) is refused:
    the reuse check compares the flags this bench passes, so it sees a preset's flags a run lacks, not the
    ones it has that this bench no longer passes."""
    if not report.exists():
        return
    had = json.loads(report.read_text()).get("preset")
    if had != args.preset:
        said = lambda p: f"--preset {p}" if p else "no --preset"
        raise ChibiError(f"bench {args.name!r}: its runs started from {said(had)} ({report}), this bench asks "
                         f"{said(args.preset)}: give the bench another --name, or pass {said(had)}")


def check_arm_commands(args, home: Home, arms: list[Arm], seed: int, compiled: tuple[str, ...]) -> None:
    """Every stage command of every arm parses as `chibichat` would parse it, before the first run starts: a
    misspelt flag or a bad value in an arm's part was found only when that stage started, minutes or hours
    into the bench. (What only a stage itself can check, such as an unknown task in --mix, is still found
    there.)"""
    import contextlib
    import io

    # the CLI's own parser, handed down by cli.main (this layer sits below it)
    parse = getattr(args, "parse_command", None)
    if parse is None:
        raise ChibiError("bench skills needs the CLI's parser to check its arms' commands: run it as `chibichat bench "
                         "skills`")
    owners, sft_of = mid_owners(arms), sft_owners(arms)
    for arm in arms:
        for _, stage, argv in stage_argvs(args, home, arm, seed, owners[arm.name], sft_of[arm.name], compiled):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    parse(argv)
            except SystemExit:
                said = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "it does not parse"
                raise ChibiError(f"--arm {arm.name!r}: its {argv[0]} command does not parse, so no run is started: "
                                 f"{said.split(': error: ', 1)[-1]} (the command: chibichat {shlex.join(argv)})") from None


def run(args) -> int:
    check_at_least(args, 1, "mid_steps", "sft_steps", "max_new_tokens", "max_per_skill")
    check_at_least(args, 0, "rl_steps")
    if not NAME_RE.match(args.name):
        raise ChibiError(f"--name {args.name!r} must be lower-case letters, digits and '-' (it becomes part of "
                         "checkpoint tags)")
    arms, seeds = parse_arms(args.arm), parse_seeds(args.seeds)
    with_rl = [a.name for a in arms if a.rl_flags]
    if with_rl and not args.rl_steps:
        raise ChibiError(f"--arm {with_rl[0]!r} has RL flags but --rl-steps is 0: give --rl-steps N (the cpu "
                         "preset's is 15) or drop the RL part of the arm")
    if args.out:
        check_output(args.out, "--out", folder=True)  # written after every run
    home = Home.resolve(args.home)
    from chibichat.train.checkpoint import list_steps

    if not list_steps(home.checkpoints_dir("base", args.from_tag)):
        raise ChibiError(f"no base checkpoint {args.from_tag!r} in {home.root}: pretrain one first "
                         f"(chibichat pretrain --tag {args.from_tag} ...) or name an existing tag with --from-tag")
    resolve_reply_budget(args, home)
    out = Path(args.out) if args.out else home.report_dir
    stem = f"bench-skills-{args.name}"
    check_same_preset(args, out / f"{stem}.json")
    mid_start, sft_start, mid_steps, sft_steps = preset_start(args)
    compiled = compiled_stages(args)
    check_arm_commands(args, home, arms, seeds[0], compiled)
    rows, owners, sft_of = [], mid_owners(arms), sft_owners(arms)
    key, _ = skill_keys(args.lang)

    def evaluated(stage: str, tag: str) -> bool:
        path = home.eval_dir(stage, tag) / "summary.json"
        return path.exists() and key in json.loads(path.read_text())

    for arm in arms:
        for seed in seeds:
            tag, sft_tag = run_tag(args.name, arm, seed), run_tag(args.name, sft_of[arm.name], seed)
            summary_path = home.eval_dir(judged_stage(args), tag) / "summary.json"
            done = evaluated(judged_stage(args), tag)
            if done:
                print(f"{tag}: done already ({summary_path}), reading it", flush=True)
            # Every stage of the run: a finished one is checked against this bench's settings and reused;
            # of a done run (read, not run) nothing runs, whatever records are left to check.
            for stage_tag, stage, argv in stage_argvs(args, home, arm, seed, owners[arm.name], sft_of[arm.name],
                                                     compiled):
                owner = owners[arm.name].name if stage == "mid" else sft_of[arm.name].name
                shared = f" (shared with arm {owner})" if stage_tag != tag else ""
                if stage != "eval" and (home.checkpoints_dir(stage, stage_tag) / "summary.json").exists():
                    check_reusable(home, stage, stage_tag, argv, {"mid": arm.mid_flags, "sft": arm.sft_flags,
                                                                   "rl": arm.rl_flags}[stage])
                    if not done:
                        print(f"{tag}: {stage} done already{shared}, not re-trained", flush=True)
                    continue
                evaluated_stage = argv[argv.index("--from") + 1] if stage == "eval" else None
                if evaluated_stage and evaluated(evaluated_stage, stage_tag):
                    check_eval_reusable(args, home, evaluated_stage, stage_tag, key)
                    if not done:
                        print(f"{tag}: eval of {evaluated_stage} done already{shared}, not re-run", flush=True)
                    continue
                if done:
                    continue
                print(f"{tag}: $ chibichat {' '.join(argv)}", flush=True)
                rc = subprocess.run([sys.executable, "-m", "chibichat", *argv]).returncode
                if rc != 0:
                    raise ChibiError(f"{stage} of {stage_tag} failed (exit code {rc}); its output is above. Re-run the "
                                     "bench to resume: finished runs and stages are read, not run again (a stage "
                                     f"stopped after saving a checkpoint: delete checkpoints/{stage}/{stage_tag} first)")
            row = row_of(arm, seed, tag, json.loads(summary_path.read_text()), args.lang)
            row["mid_tag"] = run_tag(args.name, owners[arm.name], seed)
            if args.rl_steps:
                sft_summary = json.loads((home.eval_dir("sft", sft_tag) / "summary.json").read_text())
                row["sft_tag"], row["sft_skills"] = sft_tag, sft_summary[key]
            print(f"{tag}: skills {row['skills']:.3f}" +
                  (f" after RL ({row['sft_skills']:.3f} after SFT)" if args.rl_steps else ""), flush=True)
            rows.append(row)
    table = arm_table(arms, rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", {"name": args.name, "base_tag": args.from_tag, "lang": args.lang,
                                             "seeds": seeds, "preset": args.preset, "preset_mid_flags": shlex.join(mid_start),
                                             "preset_sft_flags": shlex.join(sft_start), "mid_steps": mid_steps,
                                             "sft_steps": sft_steps, "rl_steps": args.rl_steps,
                                             "judged_after": judged_stage(args), "max_new_tokens": args.max_new_tokens,
                                             "rows": rows, "arms": table})
    md = table_md(table, args.name, args.lang, args.from_tag, args.rl_steps,
                  start=(args.preset, shlex.join(mid_start), shlex.join(sft_start)) if args.preset else None)
    atomic_write_text(out / f"{stem}.md", md)
    print(md + f"wrote {out / stem}.json and .md", flush=True)
    return 0
