"""`chibichat speedrun`: one command, start to finish.

tokenizer -> pretrain -> base eval -> midtrain -> chat + skills evals -> SFT -> chat + skills evals -> RL ->
chat + skills evals -> report, then it tells the user how to talk to the model. `--minutes M` splits a
wall-clock budget over the four training stages (budget_flags).

Each step runs as its own `python -m chibichat <stage> ...` process (under torchrun when several GPUs are
visible), so a crash or Ctrl-C in one stage cannot corrupt the orchestrator's view, and every step is exactly
what a user could type by hand (they are printed before they run).

Resumability comes from the artifacts, not from a separate state file: a step is done when its completion
marker exists (each stage writes its summary.json atomically and last). A training step that was interrupted
has checkpoints but no summary, so it is re-run with --resume. `--force STAGE` deletes that step's outputs and
redoes it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chibichat.common import (DTYPE_CHOICES, ChibiError, Home, add_fp8_arg, add_home_arg, add_memory_args,
                              atomic_write_json, read_json)


@dataclass(frozen=True)
class Preset:
    """Everything that differs between hardware classes. Flags are passed verbatim to the stages."""

    name: str
    description: str
    expected_minutes: float
    depth: int
    tokenizer: list[str]
    pretrain: list[str]
    eval_base: list[str]
    midtrain: list[str]
    sft: list[str]
    rl: list[str]
    eval_chat: list[str]
    gpu: bool = False
    eval_skills: tuple = ()  # flags of `eval skills`, run after every chat stage's eval
    online: bool = False
    shards: int = 0  # online presets: training shards to download first (the val shard always comes too)


def _gpu_preset(name: str, description: str, minutes: float, depth: int, vocab: int, shards: int) -> Preset:
    return Preset(
        name=name, description="GPU: " + description, expected_minutes=minutes, depth=depth, shards=shards,
        tokenizer=["--vocab-size", str(vocab), "--max-chars", "2000000000"],
        pretrain=["--depth", str(depth), "--seq-len", "2048"],
        eval_base=[], midtrain=[], sft=[], rl=[], eval_chat=[], gpu=True, online=True,
    )


# Presets. CPU presets use only the data the package ships; GPU presets use the real online corpora.
PRESETS: dict[str, Preset] = {
    "micro": Preset(
        name="micro",
        description="smoke run for tests/CI: every stage at toy size, ~2 minutes on 2 CPU cores",
        expected_minutes=2,
        depth=2,
        tokenizer=["--vocab-size", "1024", "--max-chars", "300000"],
        pretrain=["--depth", "2", "--seq-len", "128", "--device-batch", "8", "--total-batch", "1024",
                  "--num-steps", "24", "--eval-every", "12", "--eval-tokens", "4096", "--save-every", "12",
                  "--sample-every", "0"],
        eval_base=["--eval-tokens", "4096", "--core-items", "12", "--sample-tokens", "8"],
        midtrain=["--num-steps", "6", "--device-batch-size", "8", "--eval-every", "3", "--val-batches", "1", "--no-samples"],
        sft=["--num-steps", "6", "--device-batch-size", "8", "--eval-every", "3", "--val-batches", "1", "--no-samples"],
        rl=["--num-steps", "2", "--prompts-per-step", "2", "--num-samples", "4", "--max-new-tokens", "24",
            "--train-items", "64", "--passk-items", "4", "--no-samples"],
        eval_chat=["--max-items", "4", "--max-new-tokens", "24"],
        eval_skills=("--max-new-tokens", "24", "--max-per-skill", "2"),
    ),
    "cpu": Preset(
        name="cpu",
        description="the offline default: embedded data, ~11 minutes on 2 CPU cores",
        expected_minutes=11,
        depth=4,
        tokenizer=["--vocab-size", "4096", "--max-chars", "2000000"],
        # ~0.65-0.72 s per 4,096-token step on 2 cores in bf16: 550 steps ~ 6.5 minutes, the bulk of the
        # budget (measured: 700 pretraining + 300 mid + 200 SFT steps ran over 15 minutes in total).
        pretrain=["--depth", "4", "--seq-len", "256", "--device-batch", "16", "--total-batch", "4096",
                  "--num-steps", "550", "--eval-every", "275", "--eval-tokens", "32768", "--save-every", "275"],
        eval_base=["--eval-tokens", "32768", "--core-items", "40"],
        # Chat format, calculator calls and identity come from midtraining + SFT on the shipped/generated mix.
        midtrain=["--num-steps", "250", "--eval-every", "125"],
        sft=["--num-steps", "150", "--eval-every", "75"],
        # RL is the most expensive step per update on CPU (sampling). On arithmetic-multi, which SFT leaves
        # ~58% solved, 30 steps raised the training reward by fifths 0.53 -> 0.55 -> 0.60 -> 0.67 -> 0.58 and
        # held-out pass@1 0.58 -> 0.67 (one run, measured on a loaded machine).
        rl=["--num-steps", "30"],
        eval_chat=["--max-items", "40", "--max-new-tokens", "64"],
        eval_skills=("--max-new-tokens", "64"),
    ),
    # GPU presets: real online data; stage flags beyond the depth dial keep each stage's defaults.
    "d12": _gpu_preset("d12", "d12 on FineWeb-edu (32K vocab), ~1 h on 8xH100 (~$25), ~8 h on 1 GPU", 60, 12, 32768, 120),
    "d20": _gpu_preset("d20", "the $100 nanochat-class run, d20 on FineWeb-edu (65K vocab), ~4 h on 8xH100", 240, 20, 65536, 240),
    "d26": _gpu_preset("d26", "d26 (GPT-2-class CORE), ~12 h on 8xH100 (~$300)", 720, 26, 65536, 450),
}


@dataclass
class Step:
    name: str  # what --force names
    title: str
    argv: list[str]  # arguments after `chibichat`
    marker: Path  # exists <=> step done
    outputs: list[Path]  # deleted by --force
    resumable_dir: Path | None = None  # checkpoints here + no marker => pass --resume
    distributed: bool = False  # run under torchrun when several GPUs are visible
    weight: float = 1.0  # share of the expected time, for the ETA
    speedrun_marks_done: bool = False  # the step writes no marker of its own; speedrun writes `marker`


def register(sub) -> None:
    p = sub.add_parser(
        "speedrun",
        help="run the whole pipeline: tokenizer -> pretrain -> mid -> SFT -> RL with evals and a report",
        description=(
            "Run every stage in order into one home directory, then write the report card. "
            "Re-running skips finished stages and resumes an interrupted one from its last checkpoint. "
            "Presets: " + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
        ),
    )
    add_home_arg(p)
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS], help="hardware preset (auto: cpu without a GPU, d20 with GPUs)")
    p.add_argument("--lang", default="en", choices=["en", "ja"], help="language of corpus, tokenizer split, chat data and evals")
    p.add_argument("--layers", default="dense", help="layer layout: dense | iberis | explicit pattern like ASSA")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo STAGE even if finished (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and what would be skipped, run nothing")
    p.add_argument("--device", default="auto", help="passed to every stage")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="compute dtype, passed to every stage (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the pretraining forward (pretrain --compile)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of the four training loops together, split in proportion to their "
                        "share of the run; each fits its step count to its minutes (tokenizer, evals and "
                        "start-up come on top)")
    # precision and memory flags of the training stages, passed to pretrain, midtrain, sft and rl
    add_fp8_arg(p)
    add_memory_args(p)
    p.set_defaults(func=run)


def training_flags(args) -> list[str]:
    """The speedrun's --fp8 / --recompute / --trim-heap as flags for every training stage (none when default)."""
    out = ["--fp8"] if args.fp8 else []
    if args.recompute != "none":
        out += ["--recompute", args.recompute]
    return out + (["--trim-heap"] if args.trim_heap else [])


def pick_preset(name: str) -> Preset:
    if name != "auto":
        return PRESETS[name]
    import torch

    return PRESETS["d20"] if torch.cuda.is_available() else PRESETS["cpu"]


def plan(home: Home, preset: Preset, lang: str, layers: str, device: str, dtype: str = "auto",
         train: list[str] = (), pretrain: list[str] = (), minutes: float | None = None) -> list[Step]:
    """The steps of a speedrun. `train`: extra flags for every training stage (training_flags);
    `pretrain`: extra flags for pretraining only (--compile); `minutes`: budget_flags."""
    tag = f"d{preset.depth}" + ("" if layers == "dense" else f"-{layers}")
    corpus = {("en", False): "embedded-en", ("ja", False): "embedded-ja",
              ("en", True): "fineweb-edu", ("ja", True): "abeja-ja"}[(lang, preset.online)]
    # Offline RL trains on the two-step problems: SFT nearly saturates the one-step ones (no room to learn).
    rl_task = "arithmetic-multi" if lang == "en" else "arithmetic-multi-ja"
    if preset.online and lang == "en":
        rl_task = "gsm8k-train"
    split = ["--split", "ja"] if lang == "ja" else []
    # Chat evals: the ChatCORE set in English; offline Japanese has only the generated JA tasks (JGLUE
    # needs its dev files: `chibichat eval jglue --jglue-dir DIR` when online).
    chat_tasks = [] if lang == "en" else ["--tasks", "spelling-ja,arithmetic-ja,letter-count-ja"]
    common = ["--home", str(home.root)]
    dev = ["--device", device] + (["--dtype", dtype] if dtype != "auto" else [])
    train, pretrain = list(train), list(pretrain)
    ck = home.checkpoints_dir
    ev = home.eval_dir
    steps = []
    if preset.online:
        steps.append(Step(
            "download", f"download {preset.shards} shards of {corpus}",
            ["data", "download", corpus, "-n", str(preset.shards), *common],
            home.data_dir / corpus / f".speedrun-{preset.shards}-shards.done", [], weight=0.05,
            speedrun_marks_done=True))
    steps += [
        Step("tokenizer", "train the tokenizer",
             ["tokenizer", "train", "--corpus", corpus, *split, *common, *preset.tokenizer],
             home.tokenizer_dir / "tokenizer.json", [home.tokenizer_dir], weight=0.02),
        Step("tokenizer-eval", "evaluate the tokenizer",
             ["tokenizer", "eval", "--corpus", corpus, *common],
             home.tokenizer_dir / "eval.json", [home.tokenizer_dir / "eval.json"], weight=0.01),
        Step("pretrain", "pretrain the base model",
             ["pretrain", "--corpus", corpus, "--layers", layers, "--tag", tag, *common, *dev, *train, *pretrain, *preset.pretrain],
             ck("base", tag) / "summary.json", [ck("base", tag)], resumable_dir=ck("base", tag), distributed=True, weight=0.5),
        Step("eval-base", "evaluate the base model (bpb, CORE)",
             ["eval", "base", "--from", "base", "--tag", tag, *common, *dev, *preset.eval_base],
             ev("base", tag) / "summary.json", [ev("base", tag)], distributed=True, weight=0.04),
        Step("midtrain", "midtrain: chat format, tools, multiple choice",
             ["midtrain", "--from", "base", "--from-tag", tag, "--tag", tag, *common, *dev, *train, *preset.midtrain],
             ck("mid", tag) / "summary.json", [ck("mid", tag)], resumable_dir=ck("mid", tag), distributed=True, weight=0.1),
        Step("eval-mid", "evaluate the midtrained model",
             ["eval", "chat", "--from", "mid", "--tag", tag, *chat_tasks, *common, *dev, *preset.eval_chat],
             ev("mid", tag) / "summary.json", [ev("mid", tag)], distributed=True, weight=0.04),
        skills_step(home, "mid", tag, lang, common + dev, preset),
        Step("sft", "supervised fine-tuning",
             ["sft", "--from", "mid", "--from-tag", tag, "--tag", tag, *common, *dev, *train, *preset.sft],
             ck("sft", tag) / "summary.json", [ck("sft", tag)], resumable_dir=ck("sft", tag), distributed=True, weight=0.1),
        Step("eval-sft", "evaluate the SFT model",
             ["eval", "chat", "--from", "sft", "--tag", tag, *chat_tasks, *common, *dev, *preset.eval_chat],
             ev("sft", tag) / "summary.json", [ev("sft", tag)], distributed=True, weight=0.04),
        skills_step(home, "sft", tag, lang, common + dev, preset),
        Step("rl", "reinforcement learning on verifiable rewards",
             ["rl", "--from", "sft", "--from-tag", tag, "--tag", tag, "--task", rl_task, *common, *dev, *train, *preset.rl],
             ck("rl", tag) / "summary.json", [ck("rl", tag)], resumable_dir=ck("rl", tag), distributed=True, weight=0.1),
        Step("eval-rl", "evaluate the RL model",
             ["eval", "chat", "--from", "rl", "--tag", tag, *chat_tasks, *common, *dev, *preset.eval_chat],
             ev("rl", tag) / "summary.json", [ev("rl", tag)], distributed=True, weight=0.04),
        skills_step(home, "rl", tag, lang, common + dev, preset),
    ]
    if minutes is not None:
        budget_flags(steps, minutes)
    return steps


TRAINING_STEPS = ("pretrain", "midtrain", "sft", "rl")
BUDGET_HEADROOM = 4  # with --minutes, a stage may take up to this many times its preset's --num-steps


def budget_flags(steps: list[Step], minutes: float) -> None:
    """Give each training step its share of `minutes` (by step weight) as --minutes, and raise its
    --num-steps cap BUDGET_HEADROOM-fold so a machine faster than the one the preset was sized on
    spends its minutes learning instead of stopping at the preset's count."""
    if not (minutes > 0 and minutes < float("inf")):
        raise ChibiError(f"--minutes must be a positive number, got {minutes}")
    training = [s for s in steps if s.name in TRAINING_STEPS]
    total = sum(s.weight for s in training)
    for s in training:
        s.argv += ["--minutes", f"{minutes * s.weight / total:.4g}"]
        if "--num-steps" in s.argv:
            i = len(s.argv) - s.argv[::-1].index("--num-steps")  # the value after the last --num-steps
            s.argv[i] = str(BUDGET_HEADROOM * int(s.argv[i]))


def skills_step(home: Home, stage: str, tag: str, lang: str, flags: list[str], preset: Preset) -> Step:
    """`eval skills` of one chat stage; done when its per-item file (written last) exists."""
    from chibichat.eval.skills import summary_prefix

    out = home.eval_dir(stage, tag) / summary_prefix(lang)
    return Step(f"skills-{stage}", f"held-out skills prompts on the {stage} model",
                ["eval", "skills", "--from", stage, "--tag", tag, "--lang", lang, *flags, *preset.eval_skills],
                out.with_suffix(".jsonl"), [out.with_suffix(".jsonl"), out.with_suffix(".csv")], weight=0.02)


def _has_checkpoint(d: Path | None) -> bool:
    return bool(d and d.is_dir() and any(p.name.startswith("step_") for p in d.iterdir()))


def _launcher(step: Step) -> list[str]:
    """`python -m chibichat` or, with several GPUs and a distributed step, torchrun over all of them."""
    if step.distributed:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "chibichat"]
    return [sys.executable, "-m", "chibichat"]


def run(args) -> int:
    home = Home.resolve(args.home)
    preset = pick_preset(args.preset)
    steps = plan(home, preset, args.lang, args.layers, args.device, args.dtype, training_flags(args),
                 ["--compile"] if args.compile else [], args.minutes)
    names = {s.name for s in steps}
    for f in args.force:
        if f not in names:
            raise ChibiError(f"--force {f!r} is not a speedrun stage; choose from: {', '.join(s.name for s in steps)}")

    print(f"chibichat speedrun: preset {preset.name} ({preset.description}); lang {args.lang}; layers {args.layers}")
    print(f"home: {home.root}")
    timing_path = home.report_dir / "timing.json"
    timing = read_json(timing_path, "speedrun timing") if timing_path.exists() else {"stages": {}}
    total_weight = sum(s.weight for s in steps)
    t_start = time.time()
    done_weight = 0.0
    for i, step in enumerate(steps, 1):
        prefix = f"[{i}/{len(steps)}] {step.name}"
        if step.name in args.force and not args.dry_run:
            for out in step.outputs:
                if out.is_dir():
                    shutil.rmtree(out)
                elif out.exists():
                    out.unlink()
            timing["stages"].pop(step.name, None)
        if step.marker.exists():
            print(f"{prefix}: done already ({step.marker.relative_to(home.root)}), skipping")
            done_weight += step.weight
            continue
        argv = list(step.argv)
        if _has_checkpoint(step.resumable_dir):
            argv.append("--resume")
            print(f"{prefix}: interrupted earlier, resuming from its last checkpoint")
        cmd = _launcher(step) + argv
        elapsed = time.time() - t_start
        eta = ""
        if done_weight > 0 and elapsed > 5:
            eta = f", ETA ~{(elapsed / done_weight) * (total_weight - done_weight) / 60:.1f} min"
        print(f"{prefix}: {step.title}{eta}\n  $ chibichat {shlex.join(argv)}", flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            raise ChibiError(
                f"stage {step.name} failed (exit {rc}); fix the error above and re-run the same speedrun "
                f"command: finished stages are skipped and {step.name} resumes where it can"
            )
        if step.speedrun_marks_done:
            atomic_write_json(step.marker, {"done": True, "argv": argv})
        if not step.marker.exists():
            raise ChibiError(f"stage {step.name} exited 0 but did not write {step.marker}; this is a bug in that stage")
        timing["stages"][step.name] = round(time.time() - t0, 1)
        timing["wall_s"] = round(sum(timing["stages"].values()), 1)
        atomic_write_json(timing_path, timing)
        done_weight += step.weight

    if args.dry_run:
        return 0
    from chibichat.stages.report import build_report

    path = build_report(home, wall_s=timing.get("wall_s"))
    print(f"\nreport: {path}")
    summary = path.read_text(encoding="utf-8").split("## Summary", 1)[-1].split("\n## ", 1)[0]
    print("## Summary" + summary)
    home_flag = "" if args.home is None else f" --home {shlex.quote(str(home.root))}"
    print("Talk to your model:")
    print(f"  chibichat chat{home_flag}                 # streaming REPL (or -p 'question' for one shot)")
    print(f"  chibichat serve{home_flag}                # web page + OpenAI-compatible API on http://127.0.0.1:8000")
    return 0
