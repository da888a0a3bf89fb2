"""`chibichat sft`: supervised fine-tuning on conversations, loss on the assistant's tokens only.

Runs from a named checkpoint (`--from mid` by default; `--from base` skips midtraining) and refuses
one trained with another tokenizer. Conversations from a task mixture are rendered with
max_len = seq_len + 1 (the model's context decides every length), packed (best-fit, never cropped)
or padded one per row; an over-length conversation follows `--overflow` (shorten: drop whole early
turns; drop: leave it out) and the per-task ok/shortened/dropped counts go into summary.json.

The loss is the mean over the supervised tokens of the whole optimizer step, across
gradient-accumulation micro-batches and ranks (the shared loop divides each micro-batch's loss SUM
by the step's token total), never a mean of micro-batch means.

This module also holds what the three chat stages (midtrain, sft, rl) share: loading the source
checkpoint, inheriting its learning rates, building the mixture with its held-out split, the
validation loss and the summary file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from chibichat.common import ChibiError, add_fp8_arg, add_home_arg, add_memory_args, add_runtime_args

SOURCE_STAGES = ("base", "mid", "sft", "rl", "dpo")
LR_GROUPS = ("matrix", "embedding", "head", "other")

SAMPLE_PROMPTS = ["Hello!", "What is 12+7?"]
LORA_LR = 2e-3
LORA_FLAGS = ("lora_alpha", "lora_dropout", "lora_targets", "lora_lr")
SFT_MIX_EN = ("chitchat=0.1,chatterbot=0.5,identity=0.5,arithmetic=1,arithmetic-multi=0.5,spelling=0.5,"
              "letter-count=0.5,mmlu-dev=0.5")
SFT_MIX_JA = ("chatterbot-ja=0.5,identity-ja=0.5,arithmetic-ja=1,arithmetic-multi-ja=0.5,spelling-ja=0.5,"
              "letter-count-ja=0.5")


# ----------------------------------------------------------------------------------------------
# Flags shared by the chat stages


def add_source_args(p, default_from: str) -> None:
    p.add_argument("--from", dest="from_stage", default=default_from, choices=SOURCE_STAGES,
                   help=f"stage whose checkpoint to start from (default: {default_from})")
    p.add_argument("--from-tag", default=None, help="tag of the source checkpoint (default: the newest)")
    p.add_argument("--from-step", type=int, default=None, help="step of the source checkpoint (default: the last)")
    p.add_argument("--tag", default=None, help="tag of this stage's checkpoints (default: the source's tag)")


def add_optim_args(p, lr_frac: float) -> None:
    p.add_argument("--lr-frac", type=float, default=lr_frac,
                   help=f"multiplier on the source run's learning rates (default: {lr_frac})")
    for g in LR_GROUPS:
        p.add_argument(f"--{g}-lr", type=float, default=None,
                       help=f"{g} group learning rate before --lr-frac (default: the source checkpoint's)")
    p.add_argument("--warmdown-frac", type=float, default=0.5, help="fraction of steps of linear LR decay to 0")


def add_loop_args(p, steps: int, batch: int | None) -> None:
    p.add_argument("--num-steps", type=int, default=steps, help=f"optimizer steps (default: {steps})")
    if batch is not None:  # RL sizes its micro-batches in prompts x samples instead
        p.add_argument("--device-batch-size", type=int, default=batch, help=f"rows per micro-batch (default: {batch})")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation runs (0: start and end)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: end only)")
    p.add_argument("--resume", action="store_true", help="continue the run saved under --tag")
    p.add_argument("--overwrite", action="store_true", help="replace existing checkpoints under --tag")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixture order and initialisation")
    p.add_argument("--no-samples", action="store_true", help="skip the greedy sample replies at the end")
    from chibichat.train.schedule import add_budget_args

    add_budget_args(p)
    add_fp8_arg(p)
    add_memory_args(p)
    add_lora_args(p)


def add_lora_args(p) -> None:
    """LoRA flags (chibichat/model/lora.py), shared by every fine-tuning stage."""
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train rank-RANK LoRA adapters on a frozen base instead of every weight; checkpoints "
                        "then hold the adapters alone (default: 0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="adapter scale numerator: updates are (alpha/rank) B@A (default: alpha = rank)")
    p.add_argument("--lora-dropout", type=float, default=None,
                   help="probability of dropping a whole rank component per forward in training (default: 0)")
    p.add_argument("--lora-targets", default=None,
                   help="weights that get adapters: attn (q/k/v/o), mlp (fc/proj), slc2 (x/b/alpha/A/o); "
                        "default: attn,mlp,slc2")
    p.add_argument("--lora-lr", type=float, default=None,
                   help=f"AdamW learning rate of the adapters (default: {LORA_LR})")


def lora_config(args):
    """The LoRAConfig of --lora*, or None without --lora."""
    from chibichat.model.lora import LoRAConfig, parse_targets

    if not getattr(args, "lora", 0):
        given = [f"--{f.replace('_', '-')}" for f in LORA_FLAGS if getattr(args, f, None) is not None]
        if given:
            raise ChibiError(f"{', '.join(given)} only apply with --lora RANK; add --lora or drop them")
        return None
    if args.lora < 0:
        raise ChibiError(f"--lora must be a rank >= 1 (or 0 for full fine-tuning), got {args.lora}")
    if args.fp8:
        raise ChibiError("--lora with --fp8 is not supported (the adapted weight is rebuilt each forward); drop one")
    return LoRAConfig(rank=args.lora, alpha=args.lora_alpha if args.lora_alpha is not None else float(args.lora),
                      dropout=args.lora_dropout or 0.0, targets=parse_targets(args.lora_targets or "attn,mlp,slc2"))


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
        if not epochs > 0:
            raise ChibiError(f"--mix entry {part!r}: epochs must be > 0")
        refuse_eval_only([name.strip()], "--mix")
        out.append((name.strip(), epochs))
    if not out:
        raise ChibiError(f"--mix {spec!r} names no task; write e.g. chitchat=1,arithmetic=0.5")
    return out


def default_mix(tok, en: str, ja: str) -> str:
    """English tasks, plus the Japanese ones when the tokenizer was trained for Japanese."""
    return en + "," + ja if str(getattr(tok, "split", "gpt4")).startswith("ja") else en


# ----------------------------------------------------------------------------------------------
# Source checkpoint and learning rates


def load_source(args, home, tok, rt):
    """(model, meta, tag) from `--from`, refusing a checkpoint trained with another tokenizer; with --fp8
    the block matmuls of training switch to fp8, and --recompute sets activation recomputation (each stage
    chooses both, like --dtype; neither is read from the source). With --lora the model gets frozen base
    weights and trainable adapters (a source that is itself an adapter checkpoint arrives merged)."""
    from chibichat.model.fp8 import check_fp8_runtime
    from chibichat.model.gpt import RunConfig
    from chibichat.train.checkpoint import load_model

    if args.fp8:
        check_fp8_runtime(rt.device, rt.compute_dtype)
    run = RunConfig(compute_dtype=rt.compute_dtype, recompute=args.recompute, fp8=args.fp8)
    model, meta = load_model(home, args.from_stage, args.from_tag, args.from_step, rt=rt, tokenizer=tok, run=run)
    lcfg = lora_config(args)
    if lcfg is not None:  # the base is frozen; only the adapters train (and are saved)
        from chibichat.model.lora import apply_lora

        apply_lora(model, lcfg)
    tag = args.tag or Path(meta["checkpoint_dir"]).parent.name
    return model, meta, tag


def source_lrs(meta: dict, args, model) -> dict[str, float]:
    """Learning rate per group: the flag if given, else the source run's initial LR (read from its
    saved optimizer groups, which is what it really trained with), times --lr-frac. A group with no
    parameters in this model (e.g. "other" in a dense model) needs none and gets 0."""
    if not args.lr_frac > 0:
        raise ChibiError(f"--lr-frac must be > 0, got {args.lr_frac}")
    saved = {}
    path = Path(meta["checkpoint_dir"]) / "optim_rank0.json"
    if path.exists():
        try:
            for g in json.loads(path.read_text(encoding="utf-8"))["param_groups"]:
                saved[g.get("name")] = float(g["initial_lr"])
        except (ValueError, KeyError, TypeError) as e:
            raise ChibiError(f"{path} is corrupt ({e}); pass every --<group>-lr explicitly") from None
    if lora_config(args) is not None:  # only the adapters train
        return {"lora": LORA_LR if args.lora_lr is None else args.lora_lr}
    lrs = {}
    present = model.param_groups()
    for g in LR_GROUPS:
        if not present.get(g):
            lrs[g] = 0.0
            continue
        flag = getattr(args, f"{g}_lr")
        base = flag if flag is not None else saved.get(g)
        if base is None:
            raise ChibiError(f"the source checkpoint has no saved learning rate for group {g!r}; pass --{g}-lr")
        lrs[g] = base * args.lr_frac
    return lrs


def make_optimizer(model, lrs: dict):
    import torch

    from chibichat.train.optim import build_optimizer

    if "lora" in lrs:
        from chibichat.model.lora import lora_parameters
        from chibichat.train.optim import build_lora_optimizer

        return build_lora_optimizer(lora_parameters(model), lrs["lora"])

    return build_optimizer(model.param_groups(), matrix_lr=lrs["matrix"], embedding_lr=lrs["embedding"],
                           unembedding_lr=lrs["head"], other_lr=lrs["other"],
                           ns_dtype=torch.bfloat16 if model.compute_dtype == torch.bfloat16 else torch.float32)


def stage_meta(model, tok, args, source_meta: dict, stage: str, extra: dict | None = None) -> dict:
    flags = {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, (str, int, float, bool, type(None)))}
    lcfg = lora_config(args)
    if lcfg is not None:  # the checkpoint holds adapters on top of the source (train/checkpoint.py)
        from chibichat.train.checkpoint import relative_to_checkpoints

        base = relative_to_checkpoints(source_meta["checkpoint_dir"])
        extra = {**(extra or {}), "lora": {**lcfg.to_dict(), "base": base}}
    return {"stage": stage, "model_config": model.config.to_dict(),
            "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size}, "flags": flags,
            "source": {"checkpoint": source_meta["checkpoint_dir"], "step": source_meta.get("step")},
            **(extra or {})}


# ----------------------------------------------------------------------------------------------
# Mixture with a held-out split


def task_options(name: str, home) -> dict:
    """Online tasks (smoltalk, mmlu-aux, gsm8k-train, ...) read their download cache from the home."""
    from chibichat.tasks.registry import needs_home, specs

    if name not in specs():
        return {}  # get_task reports the unknown name with the valid ones
    return {"home": home} if needs_home(name) else {}


IDENTITY_TASKS = ("identity", "identity-ja")


def split_task(name: str, val_items: int, seed: int, home=None, persona: dict | None = None):
    """(train view, val view) of a task. Generated tasks have disjoint train/test splits by
    construction; a shipped or downloaded task gives its last items (up to 5%) to validation.
    `persona` (--identity) goes to the identity tasks."""
    from chibichat.tasks.registry import get_task
    from chibichat.tasks.generated import GeneratedTask
    from chibichat.tasks.leakage import refuse_eval_only_task

    extra = {"persona": persona} if persona and name in IDENTITY_TASKS else {}
    task = get_task(name, **task_options(name, home), **extra)
    refuse_eval_only_task(task, "--mix")
    if task.kind == "core":
        raise ChibiError(f"--mix names {name!r}, a base-model evaluation task; it has no conversations")
    if isinstance(task, GeneratedTask):
        return task, get_task(name, split="test", size=val_items, seed=seed, **extra)
    n_val = max(1, min(val_items, len(task) // 20))
    if len(task) - n_val < 1:
        raise ChibiError(f"task {name!r} has only {len(task)} items: too few to hold out validation data")
    return task.slice(0, len(task) - n_val), task.slice(len(task) - n_val, None)


def build_mixtures(mix: list[tuple[str, float]], val_items: int, seed: int, home=None, persona: dict | None = None):
    """(train Mixture, val Mixture). The training items are checked disjoint, by content, from every
    evaluation set the chat evaluations report against (chibichat/tasks/leakage.py). With `persona`
    (--identity), the mix must name an identity task."""
    from chibichat.tasks.base import Mixture
    from chibichat.tasks.generated import GeneratedTask
    from chibichat.tasks.leakage import check_disjoint, reported_eval_sets

    if persona and not any(name in IDENTITY_TASKS for name, _ in mix):
        raise ChibiError("--identity replaces the persona of the identity tasks, but --mix names none; add "
                         "identity=1 (and identity-ja=1 for Japanese) to --mix")
    trains, vals, epochs = [], [], []
    for name, e in mix:
        tr, va = split_task(name, val_items, seed, home, persona)
        trains.append(tr)
        vals.append(va)
        epochs.append(e)
    train_mix = Mixture(trains, epochs=epochs, seed=seed)
    # The items the mixture uses: occurrence j of a task is its item j mod len.
    used = [t.slice(0, min(c, len(t))) for t, c in zip(trains, train_mix.counts)]
    generated = [t.name for t in trains if isinstance(t, GeneratedTask)]
    check_disjoint(used, reported_eval_sets(home, generated), fix="Remove that task from --mix.")
    return train_mix, Mixture(vals, epochs=[1.0] * len(vals), seed=seed + 1)


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
    counts = loader.render_stats.as_dict()
    if rt.distributed:
        import torch.distributed as dist

        parts = [None] * rt.world_size
        dist.all_gather_object(parts, counts)
        counts = {}
        for part in parts:
            for task, c in part.items():
                acc = counts.setdefault(task, {"ok": 0, "shortened": 0, "dropped": 0})
                for k, v in c.items():
                    acc[k] += v
    return counts


def write_summary(tag_dir: Path, rt, summary: dict) -> None:
    """summary.json last and atomically: its presence marks the stage complete (docs/architecture.md)."""
    from chibichat.common import atomic_write_json

    if rt.is_master:
        atomic_write_json(Path(tag_dir) / "summary.json", summary)


# ----------------------------------------------------------------------------------------------
# The conversation stages (midtrain and sft share this)


def add_conversation_args(p, *, default_from: str, steps: int, batch: int, lr_frac: float, mode: str) -> None:
    add_home_arg(p)
    add_runtime_args(p)
    add_source_args(p, default_from)
    p.add_argument("--mix", default=None,
                   help=f"task mixture as name=epochs,... (default EN: {SFT_MIX_EN}; a Japanese tokenizer adds "
                        f"{SFT_MIX_JA}). Your own data: file:/path.jsonl=epochs (OpenAI chat, ShareGPT, Alpaca "
                        "JSONL or parquet; check it first with `chibichat data check`). Online tasks (smoltalk, "
                        "mmlu-aux, arc-easy-train, arc-challenge-train, gsm8k-train) can be named once downloaded into the home")
    p.add_argument("--identity", default=None, metavar="name=...,creator=...|FILE.json",
                   help="your assistant's persona: the identity tasks (EN and JA) answer with this name and "
                        "creator instead of the shipped chibichat persona")
    p.add_argument("--mode", default=mode, choices=("pack", "pad", "stream"),
                   help=f"how conversations fill rows (default: {mode})")
    p.add_argument("--overflow", default="shorten", choices=("shorten", "drop"),
                   help="an over-length conversation loses whole early turns (shorten) or is left out (drop)")
    p.add_argument("--val-items", type=int, default=50, help="held-out items per task (default: 50)")
    p.add_argument("--val-batches", type=int, default=8, help="validation batches per evaluation (default: 8)")
    add_optim_args(p, lr_frac)
    add_loop_args(p, steps, batch)


def run_conversation_stage(args, *, stage: str, train_all_tokens: bool, mix_en: str, mix_ja: str) -> int:
    import torch

    from chibichat.common import Home, check_home, checkpoint_bytes, init_runtime, print0, shutdown_runtime
    from chibichat.data.loader import ConversationLoader
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.loop import LoopConfig, train

    for name in ("device_batch_size", "val_items", "val_batches"):
        if getattr(args, name) < 1:
            raise ChibiError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.mix:  # the default mixture depends on the tokenizer; a given one is checked before anything loads
        parse_mix(args.mix)
    home = Home.resolve(args.home)
    check_home(home)
    rt = init_runtime(args.device, args.dtype)
    try:
        tok = Tokenizer.load(home.tokenizer_dir)
        torch.manual_seed(args.seed)
        model, src_meta, tag = load_source(args, home, tok, rt)
        seq_len = model.config.seq_len
        mix = parse_mix(args.mix or default_mix(tok, mix_en, mix_ja))
        persona = None
        if args.identity is not None:
            from chibichat.tasks.identity import parse_persona

            persona = parse_persona(args.identity)
        train_mix, val_mix = build_mixtures(mix, args.val_items, args.seed, home, persona)
        loader = ConversationLoader(train_mix, tok, args.device_batch_size, seq_len, rt, mode=args.mode,
                                    overflow=args.overflow, epochs=None, train_all_tokens=train_all_tokens)
        lrs = source_lrs(src_meta, args, model)
        optimizer = make_optimizer(model, lrs)
        tag_dir = home.checkpoints_dir(stage, tag)
        cfg = LoopConfig(tag_dir=tag_dir, num_steps=args.num_steps, grad_accum=args.grad_accum,
                         warmdown_frac=args.warmdown_frac, momentum_warmup_steps=0, eval_every=args.eval_every,
                         save_every=args.save_every, resume=args.resume, overwrite=args.overwrite,
                         flops_per_token=model.flops_per_token(), trim_heap=args.trim_heap,
                         minutes=args.minutes, fit_after=args.fit_steps)
        meta = stage_meta(model, tok, args, src_meta, stage, {"mixture": train_mix.summary(), "lrs": lrs})
        print0(rt, f"{stage}: from {src_meta['checkpoint_dir']} -> {tag_dir} | seq_len {seq_len} | "
                   f"mixture {train_mix.summary()} | mode {args.mode} | lrs {lrs}")

        t0 = time.time()
        samples = None if args.no_samples else sample_fn(tok, rt, SAMPLE_PROMPTS, seq_len)
        saves = (args.num_steps // args.save_every if args.save_every else 0) + 1
        check_home(home, checkpoint_bytes(model.num_params(), saves, cfg.keep_last), f"this {stage} run")
        res = train(model, optimizer, loader, token_loss_sum, rt, cfg, meta=meta,
                    eval_fn=val_loss_fn(val_mix, tok, args, rt, train_all_tokens, args.mode),
                    sample_fn=samples)
        counts = gather_render_counts(loader, rt)
        summary = {
            "stage": stage, "tag": tag, "source": src_meta["checkpoint_dir"], "steps": res.steps,
            "tokens": res.tokens, "train_time_s": res.train_time_s, "wall_time_s": time.time() - t0,
            "final_loss": res.final_loss, "val_loss": res.final_eval.get("val_loss"),
            "checkpoint": res.checkpoint, "mode": args.mode, "overflow": args.overflow, "minutes_fit": res.fit or None,
            "loss_on": "all tokens" if train_all_tokens else "assistant tokens (mask 1)",
            "mixture": train_mix.summary(),
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
        description=__doc__.split("\n\n")[0] + " Loss on assistant tokens only, conversations packed or padded, "
                    "over-length policy counted per task in summary.json.")
    add_conversation_args(p, default_from="mid", steps=60, batch=8, lr_frac=0.5, mode="pack")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.mode == "stream":
        raise ChibiError("sft trains conversation by conversation: --mode stream is midtraining's; use pack or pad")
    return run_conversation_stage(args, stage="sft", train_all_tokens=False, mix_en=SFT_MIX_EN, mix_ja=SFT_MIX_JA)
