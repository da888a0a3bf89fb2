"""`chibichat sft`: supervised fine-tuning on conversations, loss on the assistant's tokens only.

Runs from a named checkpoint (`--from mid` by default; `--from base` skips midtraining) and refuses
one trained with another tokenizer. Conversations from a task mixture are rendered with
max_len = seq_len + 1 (the model's context decides every length), packed (best-fit, never cropped)
or padded one per row; an over-length conversation follows `--overflow` (shorten: drop whole early
turns; drop: leave it out) and the per-task ok/shortened/dropped counts go into summary.json.

The loss is the mean over the supervised tokens of the whole optimizer step, across
gradient-accumulation micro-batches and ranks (the shared loop divides each micro-batch's loss SUM
by the step's token total), never a mean of micro-batch means.

`--soup K` trains K such runs from the same source with consecutive seeds and saves the average of their
weights under the tag (`run_soup`; midtraining takes it too): the quickstart's midtraining and SFT.

midtrain runs the same conversation stage (`run_conversation_stage`) with streamed rows and the loss on
every token; what every fine-tuning stage shares (flags, source checkpoint, learning rates, summary)
is chibichat/train/finetune.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from chibichat.common import ChibiError, add_home_arg, add_runtime_args, check_at_least
from chibichat.train.finetune import (add_loop_args, add_optim_args, add_source_args, check_room, load_source,
                                      loop_config, make_optimizer, source_lrs, stage_meta, summary_head, write_summary)

SAMPLE_PROMPTS = ["Hello!", "What is 12+7?"]
SFT_MIX_EN = ("chitchat=0.1,chatterbot=0.5,identity=1,arithmetic=1,arithmetic-multi=0.5,spelling=1,"
              "letter-count=1,mmlu-dev=0.5,describe=0.5,zero-division=0.5")  # word tasks twice the rest: see midtrain.MID_MIX_EN
SFT_MIX_JA = ("chatterbot-ja=0.5,identity-ja=0.5,arithmetic-ja=1,arithmetic-multi-ja=0.5,spelling-ja=1,"
              "letter-count-ja=1,describe-ja=0.5,zero-division-ja=0.5")


# ----------------------------------------------------------------------------------------------
# Mixture with a held-out split


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """"name=epochs,name=epochs" -> [(name, epochs)]. Epochs may be fractional (0.5 = half the task).
    An unknown task or an evaluation-only one (by its registry flag) is refused here, before anything
    is loaded. A name may be a local file, `file:/path/data.jsonl=3` (chibichat/tasks/local.py): epochs
    follow the last '='."""
    from chibichat.tasks.leakage import refuse_eval_only

    out = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        name, sep, val = part.rpartition("=") if "=" in part else (part, "", "")
        try:
            epochs = float(val) if sep else 1.0
        except ValueError:
            raise ChibiError(f"--mix entry {part!r}: epochs {val!r} is not a number (write name=epochs)") from None
        if not 0 < epochs < float("inf"):
            raise ChibiError(f"--mix entry {part!r}: epochs must be a finite number > 0")
        refuse_eval_only([name.strip()], "--mix")
        out.append((name.strip(), epochs))
    if not out:
        raise ChibiError(f"--mix {spec!r} names no task; write e.g. chitchat=1,arithmetic=0.5")
    return out


def default_mix(tok, en: str, ja: str) -> str:
    """English tasks, plus the Japanese ones when the tokenizer was trained for Japanese."""
    return en + "," + ja if str(getattr(tok, "split", "gpt4")).startswith("ja") else en


IDENTITY_TASKS = ("identity", "identity-ja")


def split_task(name: str, val_items: int, seed: int, home=None, persona: dict | None = None):
    """(train view, val view, held-out items left out) of a task. Generated tasks have disjoint train/test
    splits by construction; a shipped or downloaded task or a file gives its last items (up to 5%) to
    validation, and of a file's, those equal to one of its training items are left out and counted (a repeated
    row would put training data in the held-out loss). `persona` (--identity) goes to the identity tasks."""
    from chibichat.tasks.base import GeneratedTask, TaskView
    from chibichat.tasks.leakage import refuse_eval_only_task
    from chibichat.tasks.local import FileTask, held_out_copies
    from chibichat.tasks.registry import get_task, home_option

    extra = {"persona": persona} if persona and name in IDENTITY_TASKS else {}
    task = get_task(name, **home_option(name, home), **extra)
    refuse_eval_only_task(task, "--mix")
    if task.kind == "core":
        raise ChibiError(f"--mix names {name!r}, a base-model evaluation task; it has no conversations")
    if isinstance(task, GeneratedTask):
        return task, get_task(name, split="test", size=val_items, seed=seed, **extra), 0
    n_val = max(1, min(val_items, len(task) // 20))
    if len(task) - n_val < 1:
        raise ChibiError(f"task {name!r} has only {len(task)} items: too few to hold out validation data")
    train, val = task.slice(0, len(task) - n_val), task.slice(len(task) - n_val, None)
    # Only a user's file is compared: hashing every item of a large downloaded set would cost every run.
    copies = set(held_out_copies(train, val)) if isinstance(task, FileTask) else set()
    if len(copies) == n_val:
        raise ChibiError(f"each of the {n_val} held-out items of {name!r} (its last {n_val} rows) repeats one of "
                         "its training rows, so the held-out loss would be measured on training data; remove the "
                         f"repeated rows (`chibichat data check {task.path}` lists them)")
    if copies:
        val = TaskView(task, [val.indices[i] for i in range(n_val) if i not in copies])
    return train, val, len(copies)


OVERLAP_FIX = "Remove that task from --mix, or pass --drop-eval-overlap to train on the rest of it."


def build_mixtures(mix: list[tuple[str, float]], val_items: int, seed: int, home=None, persona: dict | None = None,
                   drop_overlap: bool = False):
    """(train Mixture, val Mixture, {task: {evaluation set: items dropped}}, {file task: held-out items left out
    as copies of its training items} (split_task)). The training items are checked
    disjoint, by content, from every evaluation set the chat evaluations report against
    (chibichat/tasks/leakage.py): an overlap is an error, or with `drop_overlap` (--drop-eval-overlap: a
    large web-scraped set such as SmolTalk may hold a few test questions) the shared items are left out
    and counted. With `persona` (--identity), the mix must name an identity task."""
    from chibichat.tasks.base import Mixture
    from chibichat.tasks.base import GeneratedTask
    from chibichat.tasks.leakage import check_disjoint, drop_overlaps, reported_eval_sets

    if persona and not any(name in IDENTITY_TASKS for name, _ in mix):
        raise ChibiError("--identity replaces the persona of the identity tasks, but --mix names none; add "
                         "identity=1 (and identity-ja=1 for Japanese) to --mix")
    trains, vals, epochs, copies = [], [], [], {}
    for name, e in mix:
        tr, va, n_copies = split_task(name, val_items, seed, home, persona)
        trains.append(tr)
        vals.append(va)
        epochs.append(e)
        if n_copies:
            copies[name] = n_copies
    generated = [t.name for t in trains if isinstance(t, GeneratedTask)]
    evals = reported_eval_sets(home, generated)
    dropped: dict[str, dict[str, int]] = {}
    if drop_overlap:  # the whole task is checked: which of its items the mixture uses depends on its length
        trains, dropped = drop_overlaps(trains, evals)
    train_mix = Mixture(trains, epochs=epochs, seed=seed)
    # The items the mixture uses: occurrence j of a task is its item j mod len.
    used = [t.slice(0, min(c, len(t))) for t, c in zip(trains, train_mix.counts)]
    check_disjoint(used, evals, fix=OVERLAP_FIX)
    return train_mix, Mixture(vals, epochs=[1.0] * len(vals), seed=seed + 1), dropped, copies


def stage_mixtures(args, tok, home, mix_en: str, mix_ja: str):
    """build_mixtures for a conversation stage's flags: --mix (or the default for the tokenizer's languages),
    --val-items, --seed, --identity, --drop-eval-overlap."""
    mix = parse_mix(args.mix or default_mix(tok, mix_en, mix_ja))
    persona = None
    if args.identity is not None:
        from chibichat.tasks.identity import parse_persona

        persona = parse_persona(args.identity)
    return build_mixtures(mix, args.val_items, args.seed, home, persona, drop_overlap=args.drop_eval_overlap)


def token_loss_sum(model, batch):
    """The loop's loss_fn: SUM of per-token losses over the targets (-1 = not trained on) and their
    count; the loop divides by the step's total, so the loss is a mean per supervised token."""
    x, y = batch
    return model(x, y, reduction="sum"), int((y >= 0).sum())


def val_loss_fn(val_source, tok, args, rt, train_all_tokens: bool, mode: str):
    """eval_fn for the loop: mean loss per target token over the first --val-batches batches of the
    held-out mixture. The batches are packed as by one reader whatever the world size; under torchrun
    rank r scores batches r, r+W, ... and the per-batch sums are added in batch order
    (eval.bpb.strided_sums), so W ranks report what one process does."""
    import dataclasses

    import torch

    from chibichat.data.loader import ConversationLoader
    from chibichat.eval.bpb import strided_sums

    one_reader = dataclasses.replace(rt, rank=0, local_rank=0, world_size=1)

    def fn(model, step):
        loader = ConversationLoader(val_source, tok, args.device_batch_size, model.config.seq_len, one_reader,
                                    mode=mode, overflow=args.overflow, epochs=1, train_all_tokens=train_all_tokens)
        mine = []
        with torch.no_grad():
            for k, (x, y) in enumerate(loader):
                if k >= args.val_batches:
                    break
                if k % rt.world_size != rt.rank:
                    continue
                x, y = x.to(rt.device), y.to(rt.device)
                mine.append([float(model(x, y, reduction="sum").double()), float((y >= 0).sum())])
        loss_sum, count = strided_sums(rt, mine, 2)
        if count == 0:
            raise ChibiError("the validation mixture produced no target tokens; check --mix")
        return {"val_loss": loss_sum / count}

    return fn


def sample_fn(tok, rt, prompts: list[str], seq_len: int):
    """sample_fn for the loop: greedy replies to a few fixed questions, to watch the chat format form.
    Replies get up to half the context (at most 48 tokens); the prompt gets the rest. The prompts are
    rendered here, before training, so a context too short for them is refused before step 0."""
    from chibichat.render import render_for_completion, reply_budget

    max_tokens = reply_budget(seq_len, cap=48)
    budget = seq_len - max_tokens
    ids = []
    for q in prompts:
        try:
            ids.append(render_for_completion(tok, {"messages": [{"role": "user", "content": q}]}, budget))
        except ChibiError as e:
            raise ChibiError(f"the sample prompt {q!r} does not fit this model's context of {seq_len} tokens "
                             f"({e}); pass --no-samples, or start from a model with a longer context") from None

    def fn(model, step):
        from chibichat.engine import Engine

        eng = Engine(model, tok, rt)
        outs = eng.generate(ids, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        return [f"{q} -> {o[0].text}" for q, o in zip(prompts, outs)]

    return fn


def gather_render_counts(loader, rt) -> dict:
    """Per-task ok/shortened/dropped counts summed over ranks."""
    from chibichat.common import gather_objects

    counts: dict = {}
    for part in gather_objects(rt, loader.render_stats.as_dict()):
        for task, c in part.items():
            acc = counts.setdefault(task, {"ok": 0, "shortened": 0, "dropped": 0})
            for k, v in c.items():
                acc[k] += v
    return counts


# ----------------------------------------------------------------------------------------------
# The conversation stages (midtrain and sft share this)


def add_conversation_args(p, *, default_from: str, steps: int, batch: int, lr_frac: float, mode: str,
                          mix_en: str, mix_ja: str) -> None:
    add_home_arg(p)
    add_runtime_args(p)
    add_source_args(p, default_from)
    p.add_argument("--mix", default=None,
                   help=f"task mixture name=epochs,... (default: {mix_en}; a Japanese tokenizer adds {mix_ja}); "
                        "your own data as file:PATH=epochs (check it with `chibichat data check`); online tasks "
                        "once `chibichat data tasks` has downloaded them")
    p.add_argument("--identity", default=None, metavar="name=...,creator=...|FILE.json",
                   help="your assistant's persona: the identity tasks (EN and JA) answer with this name and "
                        "creator instead of the shipped chibichat persona")
    p.add_argument("--mode", default=mode, choices=("pack", "pad", "stream"),
                   help=f"how conversations fill rows (default: {mode})")
    p.add_argument("--overflow", default="shorten", choices=("shorten", "drop"),
                   help="an over-length conversation loses whole early turns (shorten) or is left out (drop)")
    p.add_argument("--drop-eval-overlap", action="store_true",
                   help="leave out (and count) training items whose prompt is an evaluation item's, instead of "
                        "refusing the mixture")
    p.add_argument("--embed-noise", type=float, default=0.0, metavar="RMS",
                   help="uniform noise of this RMS on the normed token embeddings while training (NEFTune's idea; "
                        "default: 0, off)")
    p.add_argument("--soup", type=int, default=1, metavar="K",
                   help="train K runs from the same source with seeds SEED..SEED+K-1 (tags TAG-soup0..) and save "
                        "the average of their weights as TAG; --minutes is the K runs' together, start-ups included, and "
                        "where K runs would not all reach --num-steps in it fewer are trained (default: 1, one run)")
    p.add_argument("--val-items", type=int, default=50, help="held-out items per task (default: 50)")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches per evaluation (default: 8)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (every mode's rows are seq_len long: one shape)")
    add_optim_args(p, lr_frac)
    add_loop_args(p, steps, batch)


def run_conversation_stage(args, *, stage: str, train_all_tokens: bool, mix_en: str, mix_ja: str) -> int:
    import torch

    from chibichat.common import Home, check_cpu_compile, check_home, init_runtime, print0, shutdown_runtime
    from chibichat.data.loader import ConversationLoader
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.loop import train

    check_at_least(args, 1, "device_batch_size", "val_items", "val_batches")
    if not 0.0 <= args.embed_noise < float("inf"):
        raise ChibiError(f"--embed-noise {args.embed_noise}: give a noise RMS >= 0 (0 = off)")
    if args.mix:  # the default mixture depends on the tokenizer; a given one is checked before anything loads
        parse_mix(args.mix)
    home = Home.resolve(args.home)
    check_home(home)
    rt = init_runtime(args.device, args.dtype)
    try:
        if args.compile:
            check_cpu_compile(rt.device)
        tok = Tokenizer.load(home.tokenizer_dir)
        torch.manual_seed(args.seed)
        model, src_meta, tag = load_source(args, home, tok, rt, embed_noise=args.embed_noise)
        seq_len = model.config.seq_len
        train_mix, val_mix, dropped, copies = stage_mixtures(args, tok, home, mix_en, mix_ja)
        if train_all_tokens:
            from chibichat.tasks.local import refuse_weights

            refuse_weights(train_mix.tasks, stage)
        for name, per in dropped.items():
            print0(rt, f"{stage}: left out {sum(per.values())} item(s) of {name!r} that share a prompt with "
                       + ", ".join(f"{ev} ({n})" for ev, n in per.items()))
        for name, n in copies.items():
            print0(rt, f"{stage}: left out {n} held-out item(s) of {name!r} that repeat one of its training items "
                       "(the held-out loss is measured on the rest; counted in summary.json)")
        loader = ConversationLoader(train_mix, tok, args.device_batch_size, seq_len, rt, mode=args.mode,
                                    overflow=args.overflow, epochs=None, train_all_tokens=train_all_tokens)
        lrs = source_lrs(src_meta, args, model)
        optimizer = make_optimizer(model, lrs)
        tag_dir = home.checkpoints_dir(stage, tag)
        cfg = loop_config(args, model, tag_dir)
        meta = stage_meta(model, tok, args, src_meta, stage, {"mixture": train_mix.summary(), "lrs": lrs})
        print0(rt, f"{stage}: from {src_meta['checkpoint_dir']} -> {tag_dir} | seq_len {seq_len} | "
                   f"mixture {train_mix.summary()} | mode {args.mode} | lrs {lrs}")

        t0 = time.time()
        samples = None if args.no_samples else sample_fn(tok, rt, SAMPLE_PROMPTS, seq_len)
        check_room(home, model, args, cfg, stage)
        # Compiled for the training forward only: validation and samples run the plain module. Every batch
        # is (rows, seq_len) whatever the mode, so one graph serves the run (dynamic=False).
        res = train(model, optimizer, loader, token_loss_sum, rt, cfg, meta=meta,
                    train_model=torch.compile(model, dynamic=False) if args.compile else None,
                    eval_fn=val_loss_fn(val_mix, tok, args, rt, train_all_tokens, args.mode),
                    sample_fn=samples)
        counts = gather_render_counts(loader, rt)
        summary = {
            **summary_head(stage, tag, src_meta, res, t0),
            "final_loss": res.final_loss, "val_loss": res.final_eval.get("val_loss"),
            "mode": args.mode, "overflow": args.overflow,
            "loss_on": "all tokens" if train_all_tokens else "assistant tokens (mask 1)",
            "mixture": train_mix.summary(),
            "dropped_eval_overlap": dropped,  # {task: {evaluation set: items left out}} (--drop-eval-overlap)
            "held_out_copies_left_out": copies,  # {file task: held-out items equal to one of its training items}
            "render_counts": counts,  # ok/shortened/dropped per task, over the conversations this run rendered
            "over_length": {"shortened": sum(c["shortened"] for c in counts.values()),
                            "dropped": sum(c["dropped"] for c in counts.values())},
            "loader": {k: v for k, v in loader.stats.items() if isinstance(v, (int, float, type(None)))},
        }
        write_summary(tag_dir, rt, summary)
        print0(rt, f"{stage}: done | loss {res.final_loss} | val_loss {summary['val_loss']} | "
                   f"{loader.render_stats.summary()}")
        return 0
    finally:
        shutdown_runtime(rt)


def register(sub):
    p = sub.add_parser(
        "sft", help="supervised fine-tuning on conversations (assistant-token loss)",
        description=__doc__.split("\n\n")[0] + " Conversations packed or padded; over-length conversations "
                    "counted per task in summary.json.")
    add_conversation_args(p, default_from="mid", steps=60, batch=8, lr_frac=0.5, mode="pack", mix_en=SFT_MIX_EN,
                          mix_ja=SFT_MIX_JA)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.mode == "stream":
        raise ChibiError("sft trains conversation by conversation: --mode stream is midtraining's; use pack or pad")
    return run_stage_or_soup(args, command="sft", stage="sft", train_all_tokens=False, mix_en=SFT_MIX_EN,
                             mix_ja=SFT_MIX_JA)


def run_stage_or_soup(args, *, command: str, stage: str, train_all_tokens: bool, mix_en: str, mix_ja: str) -> int:
    """One run of a conversation stage, or with --soup K > 1 the average of K (run_soup)."""
    if args.soup < 1:
        raise ChibiError(f"--soup {args.soup}: give the number of runs to average, 1 or more (1 = no averaging)")
    kind = {"stage": stage, "train_all_tokens": train_all_tokens, "mix_en": mix_en, "mix_ja": mix_ja}
    if args.soup > 1:
        return run_soup(args, command=command, **kind)
    return run_conversation_stage(args, **kind)


# Flags a finished member run must share with this invocation to be reused instead of trained again.
# (Its seed, --seed + i, is compared too: the soup records the seeds it averaged.)
SOUP_SAME_FLAGS = ("from_stage", "from_tag", "from_step", "mix", "identity", "mode", "overflow", "lr_frac",
                   "matrix_lr", "embedding_lr", "head_lr", "other_lr", "warmdown_frac", "num_steps",
                   "device_batch_size", "grad_accum", "embed_noise", "val_items", "dtype", "fp8")


def soup_members(tag: str, seed: int, k: int) -> list[tuple[str, int]]:
    """(tag, seed) of the K runs `--soup K` averages."""
    return [(f"{tag}-soup{i}", seed + i) for i in range(k)]


MIN_SECOND_RUN = 0.75  # fewer_full_runs: a second run where none of full length fits needs this much of the first's time
MIN_MEMBER_S = 5.0  # a member's budget never goes below this: its loop then runs its fewest steps and says so


def member_minutes(stage_minutes: float, spent_s: float, left: int, startup_s: float) -> float:
    """--minutes for the next of `left` members still to train, so the K runs together keep the stage's
    budget, start-ups included (a member's --minutes covers its training loop only): what is left of the
    budget shared equally, less the start-up the members so far took beyond their loops."""
    share = (stage_minutes * 60 - spent_s) / left - startup_s
    return max(share, MIN_MEMBER_S) / 60


def first_step_extra_s(run_dir: Path, fit: dict) -> float:
    """Seconds a finished run's first step took beyond its mean timed step (`fit`: its --minutes fit): with
    --compile, the compile. The later runs of a soup reuse the process's compiled graph and do not pay it
    again (tests/test_stages_chat.py). 0 where the run timed no steps."""
    if "sec_per_step" not in fit:
        return 0.0
    for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("step") == 1 and "dt_s" in rec:
            return max(0.0, rec["dt_s"] - fit["sec_per_step"])
    return 0.0


def fewer_full_runs(stage_minutes: float, spent_s: float, first_s: float, startup_s: float, first_minutes: float,
                    fit: dict, others: int, once_s: float = 0.0) -> int:
    """How many of the `others` runs still to train after the first one: those that fit the rest of the
    budget at full length (at most all). Where not one does, one more only if the rest gives it at least
    MIN_SECOND_RUN of the time the first run took (so two runs cut short alike are averaged), else none: a
    run much shorter than the first averages worse than the first alone (a midtraining soup of 170 and ~70
    steps: val loss 2.37 against its first run's 2.19; docs/benchmarks.md, session 44). A full run costs what
    the first one took (`first_s`) where it reached its step count, else its start-up plus its seconds per
    step over the full count (`fit`: its --minutes fit, with `first_minutes` its budget); less, either way,
    what the first run paid once for all (`once_s`: the compile, first_step_extra_s)."""
    if not fit or fit.get("capped") or fit.get("num_steps", 0) >= fit.get("cap", 0):
        full_s = first_s - once_s
    else:
        full_s = startup_s + fit["cap"] * (first_minutes * 60 - once_s) / fit["num_steps"]
    left_s = stage_minutes * 60 - spent_s
    full = min(others, int(left_s // max(full_s, 1e-9)))
    if full == 0 and others:
        return int(left_s >= MIN_SECOND_RUN * (first_s - once_s))
    return full


def run_soup(args, *, command: str, stage: str, train_all_tokens: bool, mix_en: str, mix_ja: str) -> int:
    """`sft --soup K` / `midtrain --soup K`: K runs of the stage from one source, differing only in their
    seed (data order, validation items, sampling), each a complete run under its own tag; then the mean of
    their weights, saved as the tag's checkpoint with its own validation loss (a uniform "model soup",
    Wortsman et al. 2022, arXiv:2203.05482). Runs fine-tuned from one checkpoint stay in one basin, so their
    average is a model and generalises better than a typical member (docs/benchmarks.md, "averaging SFT
    runs", "averaging midtraining runs"); runs from different sources do not average well (SFT runs of
    different midtrainings), so the source is shared by construction.
    A member whose summary.json exists is reused (after checking it was trained with the same flags), an
    interrupted one is resumed, and --overwrite retrains all of them."""
    import copy
    import os

    from chibichat.common import (Home, at_destination, atomic_directory, check_home, init_runtime, print0, read_json,
                                  shutdown_runtime)
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import (average_weights, list_steps, load_model, read_meta, resolve_checkpoint,
                                            save_checkpoint, step_dir)

    if args.lora:
        raise ChibiError("--soup averages full weights and --lora trains adapters; drop one of them")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ChibiError("--soup runs its members one after another on one process; run it without torchrun")
    if args.save_every:
        raise ChibiError("--soup keeps each member's final checkpoint only; drop --save-every")
    home = Home.resolve(args.home)
    check_home(home)
    tag = args.tag or resolve_checkpoint(home, args.from_stage, args.from_tag, args.from_step).parent.name
    tag_dir = home.checkpoints_dir(stage, tag)
    if (tag_dir / "summary.json").exists() and not args.overwrite:
        raise ChibiError(f"{tag_dir} already holds a finished run; pass --overwrite to replace it (and its members) "
                         "or choose another --tag")
    if tag_dir.exists() and list_steps(tag_dir) and not (args.resume or args.overwrite):
        raise ChibiError(f"{tag_dir} holds an unfinished average; pass --resume to finish it or --overwrite to "
                         "start again")
    t0 = time.time()
    members = soup_members(tag, args.seed, args.soup)
    todo = []
    for mtag, mseed in members:
        mdir = home.checkpoints_dir(stage, mtag)
        if not args.overwrite and (mdir / "summary.json").exists():
            done = read_meta(resolve_checkpoint(home, stage, mtag)).get("flags", {})
            for key, want in [(k, getattr(args, k)) for k in SOUP_SAME_FLAGS] + [("seed", mseed)]:
                if done.get(key) != want:
                    raise ChibiError(f"{mdir} was trained with {key}={done.get(key)!r}, this run asks "
                                     f"{want!r}; pass --overwrite to train the members again")
            print(f"{command} --soup: {mtag} (seed {mseed}) is done already, not trained again", flush=True)
        else:
            todo.append((mtag, mseed))
    startup = 0.0  # seconds a member ran beyond its loop's budget (data, model, evaluations, saves): the most seen
    # With a budget and no member run yet, the first run may take half of it, and where the K runs would not
    # all fit at full length, fewer runs of full length are trained (fewer_full_runs): two full runs averaged
    # scored above four of half the steps (docs/benchmarks.md, session 27). A fast machine trains all K.
    adaptive = args.minutes is not None and len(todo) == len(members) > 2
    i = 0
    while i < len(todo):
        mtag, mseed = todo[i]
        margs = copy.copy(args)
        margs.tag, margs.seed, margs.soup, margs.resume = mtag, mseed, 1, False
        if args.minutes is not None:
            margs.minutes = (args.minutes / 2 if adaptive and i == 0
                             else member_minutes(args.minutes, time.time() - t0, len(todo) - i, startup))
        mdir = home.checkpoints_dir(stage, mtag)
        margs.resume = bool(mdir.exists() and list_steps(mdir) and not args.overwrite)
        print(f"{command} --soup: run {mtag} (seed {mseed}){' resumed' if margs.resume else ''}"
              + (f", --minutes {margs.minutes:.3g}" if args.minutes is not None else ""), flush=True)
        m0 = time.time()
        run_conversation_stage(margs, stage=stage, train_all_tokens=train_all_tokens, mix_en=mix_en, mix_ja=mix_ja)
        if args.minutes is not None:
            startup = max(startup, time.time() - m0 - margs.minutes * 60)
        if adaptive and i == 0:
            fit = read_json(mdir / "summary.json", "summary").get("minutes_fit") or {}
            more = fewer_full_runs(args.minutes, time.time() - t0, time.time() - m0, startup, margs.minutes, fit,
                                   len(todo) - 1, first_step_extra_s(mdir, fit) if args.compile else 0.0)
            if more < len(todo) - 1:
                took = (f"{command} --soup: {mtag} took {time.time() - m0:.0f} s for {fit.get('num_steps')} of "
                        f"{fit.get('cap')} steps; ")
                print(took + (f"{more} more run(s) about as long as this one or longer fit the rest of --minutes "
                              f"{args.minutes:g}, not {len(todo) - 1} shortened ones: averaging {1 + more} runs"
                              if more else f"no other run of full length, nor one {MIN_SECOND_RUN:.0%} as long as "
                              f"this one, fits the rest of --minutes {args.minutes:g}: the stage keeps this run "
                              "alone (a much shorter run would pull the average down)"), flush=True)
                members = [m for m in members if m not in todo[1 + more:]]
                todo = todo[:1 + more]
        i += 1

    rt = init_runtime(args.device, args.dtype)
    try:
        tok = Tokenizer.load(home.tokenizer_dir)
        sdirs = [resolve_checkpoint(home, stage, mtag) for mtag, _ in members]
        model, meta0 = load_model(home, stage, members[0][0], rt=rt, tokenizer=tok)
        if len(sdirs) > 1:  # one run (fewer_full_runs: none more fitted) is the checkpoint as it is
            model.load_state_dict({k: v.to(rt.device) for k, v in average_weights(sdirs).items()})
        _, val_mix, _, _ = stage_mixtures(args, tok, home, mix_en, mix_ja)
        step = int(meta0["step"])
        val_loss = val_loss_fn(val_mix, tok, args, rt, train_all_tokens, args.mode)(model, step)["val_loss"]
        sums = [read_json(home.checkpoints_dir(stage, mtag) / "summary.json", "summary") for mtag, _ in members]
        flags = {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, (str, int, float, bool, type(None)))}
        soup = {"members": [m for m, _ in members], "seeds": [s for _, s in members],
                "member_val_loss": [m.get("val_loss") for m in sums], "member_final_loss": [m.get("final_loss") for m in sums]}
        keep = {k: v for k, v in meta0.items() if k not in ("format", "step", "world_size", "checkpoint_dir", "loop",
                                                             "loader", "rng")}
        sdir = step_dir(tag_dir, step)
        summary = {**{k: v for k, v in sums[0].items() if k not in ("tag", "wall_time_s", "checkpoint")},
                   "tag": tag, "steps": sum(m.get("steps") or 0 for m in sums), "tokens": sum(m.get("tokens") or 0 for m in sums),
                   "train_time_s": sum(m.get("train_time_s") or 0.0 for m in sums), "wall_time_s": time.time() - t0,
                   "checkpoint": str(sdir), "final_loss": sum(soup["member_final_loss"]) / len(sums),
                   "val_loss": val_loss, "soup": soup}
        # The average and its summary are written beside the tag's directory and replace it (an unfinished
        # average, or --overwrite's finished one) only once complete: a failed save leaves the old one as it was.
        tmp = None
        try:
            with atomic_directory(tag_dir) as tmp:
                save_checkpoint(tmp, step, model, None, {**keep, "flags": flags, "soup": soup}, rt=rt,
                                report_kept=False)
                write_summary(tmp, rt, summary)
        except ChibiError as e:
            cause = at_destination(e, tmp, tag_dir)
            left = [str(step_dir(tag_dir, s)) for s in list_steps(tag_dir)]
            if not left:
                kept = "it holds no earlier average; the runs are kept: run the command again to average them"
            elif (tag_dir / "summary.json").exists():
                kept = (f"its earlier, finished average {', '.join(left)} is intact; only the command again with "
                        "--overwrite replaces it (and trains the runs again)")
            else:
                kept = (f"its earlier, unfinished average {', '.join(left)} is intact; the runs are kept: run the "
                        "command again with --resume to average them")
            raise ChibiError(f"{command} --soup: the average of the {len(members)} runs was not saved to {tag_dir}: "
                             f"{kept}. The cause: {cause}") from None
        print0(rt, f"{command} --soup: " + (f"averaged {len(members)} runs" if len(members) > 1 else
                                              f"kept its one run {members[0][0]}")
                   + f" -> {sdir} | val_loss {val_loss:.4f} (members "
                   + ", ".join(f"{v:.4f}" for v in soup["member_val_loss"] if v is not None) + " on their own seeds' "
                   "validation items)")
        return 0
    finally:
        shutdown_runtime(rt)
