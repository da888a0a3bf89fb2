"""What the stages that fine-tune a checkpoint share (midtrain, sft, rl, dpo): their flags, loading the source
checkpoint (refusing another tokenizer; fp8, recompute and LoRA as this invocation asks), inheriting its
learning rates, the optimizer, the checkpoint meta and the summary file."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from chibichat.common import CHECKPOINT_STAGES, ChibiError, add_fp8_arg, add_memory_args, parse_str_list

LR_GROUPS = ("matrix", "embedding", "head", "other")
LORA_LR = 2e-3
LORA_FLAGS = ("lora_alpha", "lora_dropout", "lora_targets", "lora_lr")


# ----------------------------------------------------------------------------------------------
# Flags


def add_source_args(p, default_from: str) -> None:
    p.add_argument("--from", dest="from_stage", default=default_from, choices=CHECKPOINT_STAGES,
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


def add_loop_args(p, steps: int, batch: int | None, evals: bool = True, samples: bool = True) -> None:
    """The loop flags of a fine-tuning stage. A stage that sets its own evaluation cadence (evals=False) or
    writes no sample replies (samples=False) does not take those flags, so passing one is an error, not a no-op."""
    p.add_argument("--num-steps", type=int, default=steps, help=f"optimizer steps (default: {steps})")
    if batch is not None:  # RL sizes its micro-batches in prompts x samples instead
        p.add_argument("--device-batch-size", type=int, default=batch, help=f"rows per micro-batch (default: {batch})")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    if evals:
        p.add_argument("--eval-every", type=int, default=0, help="steps between validation runs (0: start and end)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: end only)")
    p.add_argument("--resume", action="store_true", help="continue the run saved under --tag")
    p.add_argument("--overwrite", action="store_true", help="replace existing checkpoints under --tag")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixture order and initialisation")
    if samples:
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
                        "default: those of attn,mlp,slc2 the model has")
    p.add_argument("--lora-lr", type=float, default=None,
                   help=f"AdamW learning rate of the adapters (default: {LORA_LR})")


def lora_config(args, model=None):
    """The LoRAConfig of --lora*, or None without --lora. With the `model` it adapts: the default targets are
    the kinds of weight this model has (a dense model's: attn,mlp), and a given target that selects no weight
    in it (slc2 on a dense model) is refused rather than left without adapters."""
    from chibichat.model.lora import TARGETS, LoRAConfig, target_weights

    if not getattr(args, "lora", 0):
        given = [f"--{f.replace('_', '-')}" for f in LORA_FLAGS if getattr(args, f, None) is not None]
        if given:
            raise ChibiError(f"{', '.join(given)} only apply with --lora RANK; add --lora or drop them")
        return None
    if args.lora < 0:
        raise ChibiError(f"--lora must be a rank >= 1 (or 0 for full fine-tuning), got {args.lora}")
    if args.fp8:
        raise ChibiError("--lora with --fp8 is not supported (the adapted weight is rebuilt each forward); drop one")
    given = args.lora_targets is not None
    cfg = LoRAConfig(rank=args.lora, alpha=args.lora_alpha if args.lora_alpha is not None else float(args.lora),
                     dropout=args.lora_dropout or 0.0,
                     targets=tuple(parse_str_list(args.lora_targets, "--lora-targets")) if given else TARGETS)
    if model is None:
        return cfg
    empty = [t for t in cfg.targets if not target_weights(model, (t,))]
    if not empty or len(empty) == len(cfg.targets):  # (none at all: apply_lora says what the model has)
        return cfg
    if not given:
        return dataclasses.replace(cfg, targets=tuple(t for t in cfg.targets if t not in empty))
    kinds = "".join(sorted(set(model.config.layers)))
    raise ChibiError(f"--lora-targets {args.lora_targets}: {', '.join(empty)} selects no weight in this model (layers "
                     f"{kinds!r}: attn needs A layers, slc2 needs S layers); drop {', '.join(empty)}")


# ----------------------------------------------------------------------------------------------
# Source checkpoint and learning rates


def load_source(args, home, tok, rt, embed_noise: float = 0.0):
    """(model, meta, tag) from `--from`, refusing a checkpoint trained with another tokenizer; with --fp8
    the block matmuls of training switch to fp8, and --recompute sets activation recomputation (each stage
    chooses both, like --dtype; neither is read from the source). With --lora the model gets frozen base
    weights and trainable adapters (a source that is itself an adapter checkpoint arrives merged)."""
    from chibichat.model.fp8 import check_fp8_runtime
    from chibichat.model.gpt import RunConfig
    from chibichat.train.checkpoint import load_model

    if args.fp8:
        check_fp8_runtime(rt.device, rt.compute_dtype)
    run = RunConfig(compute_dtype=rt.compute_dtype, recompute=args.recompute, fp8=args.fp8, embed_noise=embed_noise)
    model, meta = load_model(home, args.from_stage, args.from_tag, args.from_step, rt=rt, tokenizer=tok, run=run)
    lcfg = lora_config(args, model)
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
    elif isinstance(meta.get("lrs"), dict):  # an average of runs (sft --soup) has no optimizer: its runs' LRs
        saved = {g: float(v) for g, v in meta["lrs"].items()}
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
    from chibichat.train.optim import build_optimizer

    if "lora" in lrs:
        from chibichat.model.lora import lora_parameters
        from chibichat.train.optim import build_lora_optimizer

        return build_lora_optimizer(lora_parameters(model), lrs["lora"])

    return build_optimizer(model.param_groups(), matrix_lr=lrs["matrix"], embedding_lr=lrs["embedding"],
                           unembedding_lr=lrs["head"], other_lr=lrs["other"], compute_dtype=model.compute_dtype)


def stage_meta(model, tok, args, source_meta: dict, stage: str, extra: dict | None = None) -> dict:
    flags = {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, (str, int, float, bool, type(None)))}
    lcfg = lora_config(args, model)
    if lcfg is not None:  # the checkpoint holds adapters on top of the source (train/checkpoint.py)
        from chibichat.train.checkpoint import relative_to_checkpoints, weights_sha256

        base = relative_to_checkpoints(source_meta["checkpoint_dir"])
        # the base's fingerprint: a base trained again in the same place is refused on load (check_lora_base)
        extra = {**(extra or {}), "lora": {**lcfg.to_dict(), "base": base,
                                           "base_sha256": weights_sha256(source_meta["checkpoint_dir"])}}
    return {"stage": stage, "model_config": model.config.to_dict(),
            "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size}, "flags": flags,
            "source": {"checkpoint": source_meta["checkpoint_dir"], "step": source_meta.get("step")},
            **(extra or {})}


def write_summary(tag_dir: Path, rt, summary: dict) -> None:
    """summary.json last and atomically: its presence marks the stage complete (docs/architecture.md)."""
    from chibichat.common import atomic_write_json

    if rt.is_master:
        atomic_write_json(Path(tag_dir) / "summary.json", summary)


# ----------------------------------------------------------------------------------------------
# The run


def loop_config(args, model, tag_dir, **overrides):
    """The LoopConfig of the shared flags (add_loop_args, add_optim_args); `overrides` are the stage's own."""
    from chibichat.train.loop import LoopConfig

    kw = dict(tag_dir=tag_dir, num_steps=args.num_steps, grad_accum=args.grad_accum, warmdown_frac=args.warmdown_frac,
              momentum_warmup_steps=0, save_every=args.save_every, resume=args.resume,
              overwrite=args.overwrite, flops_per_token=model.flops_per_token(), trim_heap=args.trim_heap,
              minutes=args.minutes, fit_after=args.fit_steps)
    if "eval_every" not in overrides:  # a stage that sets it itself (rl) has no --eval-every flag
        kw["eval_every"] = args.eval_every
    return LoopConfig(**{**kw, **overrides})


def check_room(home, model, args, cfg, stage: str) -> None:
    """Before step 0: the home has room for every checkpoint this run keeps (common.checkpoint_bytes)."""
    from chibichat.common import check_home, checkpoint_bytes

    saves = (args.num_steps // args.save_every if args.save_every else 0) + 1
    check_home(home, checkpoint_bytes(model.num_params(), saves, cfg.keep_last), f"this {stage} run")


def summary_head(stage: str, tag: str, source_meta: dict, res, t0: float) -> dict:
    """The keys every fine-tuning stage's summary.json starts with (LoopResult `res`, wall clock from t0)."""
    return {"stage": stage, "tag": tag, "source": source_meta["checkpoint_dir"], "steps": res.steps,
            "tokens": res.tokens, "train_time_s": res.train_time_s, "wall_time_s": time.time() - t0,
            "checkpoint": res.checkpoint, "minutes_fit": res.fit or None}
