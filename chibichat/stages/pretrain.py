"""`chibichat pretrain`: train a base GPT on a corpus from `--depth` (and any overrides).

Writes home/checkpoints/base/<tag>/ (step dirs, metrics.jsonl, samples.jsonl, summary.json).
Distributed: `torchrun --nproc_per_node=N -m chibichat pretrain ...` (gloo on CPU, NCCL on CUDA);
several nodes: `torchrun --nnodes=M --nproc_per_node=N --rdzv-backend=c10d --rdzv-endpoint=HOST:29500
-m chibichat pretrain ...` on every node (torchrun's own rendezvous; nothing else to configure).
"""

from __future__ import annotations

import argparse

from chibichat.common import ChibiError, add_fp8_arg, add_home_arg, add_memory_args, add_runtime_args, check_at_least

DEFAULT_DEPTH = 4  # CPU-sized; GPU runs pass --depth 20 and up


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already names its default or there is none to
    show (None, False: a default derived at run time or a switch that is off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def register(sub) -> None:
    from chibichat.train.scaling import add_plan_args, add_shape_args

    p = sub.add_parser(
        "pretrain",
        help="pretrain a base model on a corpus (depth dial, Muon+AdamW, checkpoints, val bpb)",
        description=(
            "Pretrain a GPT on a corpus. --depth alone derives width, heads, context, learning rates, batch "
            "and horizon (printed at start); every derived value has a flag to override it. Checkpoints, "
            "metrics.jsonl, samples.jsonl and summary.json go to HOME/checkpoints/base/<tag>/. "
            "Multi-GPU/CPU: torchrun --nproc_per_node=N -m chibichat pretrain ...; multi-node: add "
            "--nnodes=M --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT on every node."
        ),
        formatter_class=_DefaultsFormatter,
    )
    add_home_arg(p)
    add_runtime_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward (static shapes)")
    add_fp8_arg(p)
    add_memory_args(p)
    p.add_argument("--corpus", default="embedded-en", help="corpus name (see `chibichat data list`) or local:/folder")
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="number of layers: the one dial")
    p.add_argument("--layers", default="dense",
                   help="token mixers: dense (all attention), iberis (SLC2 with attention every 3rd layer and last), "
                        "or a string of A/S per layer, e.g. ASSA")
    p.add_argument("--seed", type=int, default=0, help="seed of the weight init")
    add_shape_args(p)
    add_plan_args(p)
    s = p.add_argument_group("schedule and regularisation")
    s.add_argument("--warmup-steps", type=int, default=0, help="linear LR warmup steps")
    s.add_argument("--warmdown-frac", type=float, default=0.2, help="fraction of steps of linear LR warmdown at the end")
    s.add_argument("--final-lr-frac", type=float, default=0.0, help="LR multiplier reached at the end of warmdown")
    s.add_argument("--momentum-warmup-steps", type=int, default=300, help="steps over which Muon momentum goes 0.85->0.95")
    s.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay of the Muon matrices")
    s.add_argument("--grad-clip", type=float, default=0.0, help="clip the global gradient norm (0 = off), after the rank reduction")
    d = p.add_argument_group("data")
    d.add_argument("--long-docs", choices=("split", "crop"), default="split",
                   help="documents longer than a row: split into BOS-led pieces (no text lost on small looped "
                        "corpora) or crop to the row (nanochat)")
    d.add_argument("--repeat-rows", type=int, default=0, metavar="N",
                   help="every Nth row repeats its first half in its second half, which teaches copying from "
                        "the context early (0 = off)")
    r = p.add_argument_group("run, evaluation and checkpoints")
    r.add_argument("--tag", default=None, help="run name under checkpoints/base/ (default d<depth>)")
    r.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint of --tag")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run of the same --tag")
    from chibichat.train.schedule import add_budget_args

    add_budget_args(r)
    r.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (0 = only at the end)")
    r.add_argument("--keep-last", type=int, default=2, help="keep the newest N checkpoints (0 = all)")
    r.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (0 = only first and last)")
    r.add_argument("--eval-tokens", type=int, default=None,
                   help="val tokens per evaluation (default 4 x total batch), rounded down to whole micro-batches")
    r.add_argument("--sample-every", type=int, default=500, help="greedy samples every N steps (0 = only at the end)")
    r.add_argument("--sample-tokens", type=int, default=24, help="tokens per greedy sample")
    r.add_argument("--log-every", type=int, default=1, help="console line every N steps")
    r.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this wandb project")
    r.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak TFLOP/s for MFU (default: the datasheet bf16 figure of a known GPU; on CPU a matmul peak measured at start)")
    p.set_defaults(func=run)


def _flags(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func" and not callable(v)}


def check_sample_prompts(tok, lang: str, seq_len: int) -> None:
    """The greedy samples taken during and at the end of the run must fit the context: refuse a
    --seq-len too short for the longest sample prompt before any step is trained."""
    from chibichat.eval.base import SAMPLE_PROMPTS

    prompts = SAMPLE_PROMPTS["ja" if lang == "ja" else "en"]
    need, longest = max((1 + len(tok.encode(p)), p) for p in prompts)  # BOS + the prompt
    if need >= seq_len:
        raise ChibiError(f"--seq-len {seq_len} is too short for the greedy sample prompts: {longest!r} is {need} "
                         f"tokens with BOS and a sample needs room for at least one more; pass --seq-len "
                         f"{need + 1} or more")


def _probe_device_batch(model, plan, overrides, args, rt, vocab_size: int, scaling_params: int):
    """--device-batch auto: the plan re-derived with the probed rows per device (the smallest over ranks;
    a resumed run keeps the rows of its checkpoint, so the data order continues exactly)."""
    from chibichat.common import print0
    from chibichat.train.batchprobe import auto_device_batch
    from chibichat.train.checkpoint import list_steps, read_meta, step_dir
    from chibichat.train.scaling import derive_plan, derive_shape

    saved = None
    if args.resume:
        from chibichat.common import Home

        tdir = Home.resolve(args.home).checkpoints_dir("base", args.tag or f"d{args.depth}")
        steps = list_steps(tdir)
        if steps:
            saved = read_meta(step_dir(tdir, steps[-1])).get("plan", {}).get("device_batch")
    if saved:
        rows, how = int(saved), "kept from the checkpoint being resumed"
    else:
        rows, how = auto_device_batch(model, plan.total_batch, plan.seq_len, rt.world_size, rt.device)
        if rt.distributed:
            import torch
            import torch.distributed as dist

            t = torch.tensor([rows], device=rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            rows = int(t.item())
    print0(rt, f"--device-batch auto: {rows} rows per device ({how})")
    overrides.device_batch, overrides.total_batch = rows, plan.total_batch
    fresh = derive_shape(args.depth, overrides)
    return derive_plan(fresh, overrides, vocab_size=vocab_size, scaling_params=scaling_params,
                       device_type=rt.device.type, world_size=rt.world_size)


def run(args) -> int:
    import time

    import torch

    from chibichat.common import (Home, atomic_write_json, check_cpu_compile, check_home, checkpoint_bytes,
                                  init_runtime, print0, shutdown_runtime)
    from chibichat.data.corpora import get_corpus
    from chibichat.data.loader import PretrainLoader
    from chibichat.eval.base import eval_steps, evaluate_base, samples, val_batches
    from chibichat.model.fp8 import check_fp8_runtime
    from chibichat.model.gpt import GPT, GPTConfig, RunConfig, layer_pattern
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.loop import LoopConfig, train
    from chibichat.train.optim import build_optimizer
    from chibichat.train.scaling import derive_plan, derive_shape, overrides_from_args, window_schedule

    check_at_least(args, 0, "save_every", "keep_last", "eval_every", "sample_every", "warmup_steps", "momentum_warmup_steps", "repeat_rows")
    check_at_least(args, 1, "sample_tokens", "log_every")
    if args.weight_decay < 0 or args.grad_clip < 0:
        raise ChibiError("--weight-decay and --grad-clip must be >= 0")
    check_at_least(args, 1, "eval_tokens")

    t_start = time.time()
    home = Home.resolve(args.home)
    check_home(home)
    tok = Tokenizer.load(home.tokenizer_dir)
    corpus = get_corpus(args.corpus)
    rt = init_runtime(args.device, args.dtype)
    try:
        if rt.compute_dtype == torch.float16:
            raise ChibiError("--dtype float16 training would need loss scaling, which chibichat does not do; "
                             "use --dtype bfloat16 (GPUs from Ampere on) or float32")
        overrides = overrides_from_args(args)
        if args.device_batch == "auto":
            overrides.device_batch = 1  # any divisor derives the total batch; the probe sets the real rows
        plan = derive_shape(args.depth, overrides)
        layers = layer_pattern(args.layers, args.depth)
        cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=plan.seq_len, n_layer=args.depth, n_embd=plan.width,
                        n_head=plan.heads, n_kv_head=plan.kv_heads, layers=layers,
                        windows=window_schedule(args.window, layers, plan.seq_len))
        if args.fp8:
            check_fp8_runtime(rt.device, rt.compute_dtype)
        if args.compile:
            check_cpu_compile(rt.device)
        torch.manual_seed(args.seed)
        # built on CPU so the init is the same on every device, then moved
        model = GPT(cfg, RunConfig(compute_dtype=rt.compute_dtype, recompute=args.recompute, fp8=args.fp8))
        groups = model.param_groups()
        scaling_params = sum(p.numel() for name in ("matrix", "head", "other") for p in groups[name])
        derive_plan(plan, overrides, vocab_size=tok.vocab_size, scaling_params=scaling_params,
                    device_type=rt.device.type, world_size=rt.world_size)
        # Everything the run needs at its end is checked before its first step.
        check_sample_prompts(tok, corpus.lang, plan.seq_len)
        saves = (plan.num_steps // args.save_every if args.save_every else 0) + 1
        check_home(home, checkpoint_bytes(model.num_params(), saves, args.keep_last), "this pretraining run")
        model.to(rt.device)
        if args.device_batch == "auto":
            plan = _probe_device_batch(model, plan, overrides, args, rt, tok.vocab_size, scaling_params)
        tag = args.tag or f"d{args.depth}"
        tag_dir = home.checkpoints_dir("base", tag)
        print0(rt, plan.describe())
        print0(rt, f"model: {cfg.layers} ({cfg.layers.count('A')} attention, {cfg.layers.count('S')} SLC2), "
                   f"{'windows ' + str(cfg.windows) + ', ' if any(cfg.windows) else ''}"
                   f"vocab {cfg.vocab_size:,}, {model.num_params():,} params, {model.flops_per_token():.3e} FLOPs/token; "
                   f"device {rt.device}, compute {str(rt.compute_dtype).replace('torch.', '')}{' + fp8 matmuls' if args.fp8 else ''}, world {rt.world_size}; "
                   f"corpus {corpus.name}; run dir {tag_dir}")
        for note in corpus.notes():
            print0(rt, note)

        optimizer = build_optimizer(groups, matrix_lr=plan.matrix_lr, embedding_lr=plan.embedding_lr,
                                    unembedding_lr=plan.unembedding_lr, other_lr=plan.other_lr,
                                    compute_dtype=rt.compute_dtype, weight_decay=args.weight_decay,
                                    grad_clip=args.grad_clip)
        split_long = args.long_docs == "split"
        loader = PretrainLoader(corpus, "train", home, tok, plan.device_batch, plan.seq_len, rt,
                                split_long_docs=split_long, repeat_every=args.repeat_rows)
        eval_tokens = args.eval_tokens or 4 * plan.total_batch
        n_eval = eval_steps(eval_tokens, plan.device_batch, plan.seq_len)
        val = val_batches(corpus, home, tok, rt, plan.device_batch, plan.seq_len, n_eval, split_long)
        print0(rt, f"val: {n_eval * plan.device_batch * plan.seq_len:,} tokens of {corpus.name} val "
                   f"per evaluation")

        train_model = model
        if args.compile:
            train_model = torch.compile(model, dynamic=False)

        def loss_fn(m, batch):
            x, y = batch
            return m(x, y, reduction="sum"), y.numel()  # packed pretraining rows: every target counts

        loop_cfg = LoopConfig(
            tag_dir=tag_dir, num_steps=plan.num_steps, grad_accum=plan.grad_accum,
            warmup_steps=args.warmup_steps, warmdown_frac=args.warmdown_frac, final_lr_frac=args.final_lr_frac,
            momentum_warmup_steps=args.momentum_warmup_steps, eval_every=args.eval_every,
            sample_every=args.sample_every, save_every=args.save_every, keep_last=args.keep_last,
            log_every=args.log_every, resume=args.resume, overwrite=args.overwrite, wandb_project=args.wandb,
            run_name=f"base-{tag}", flops_per_token=model.flops_per_token(),
            peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None,
            trim_heap=args.trim_heap, minutes=args.minutes, fit_after=args.fit_steps,
        )
        meta = {
            "stage": "base",
            "model_config": cfg.to_dict(),
            "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size},
            "corpus": corpus.name,
            "corpus_lang": corpus.lang,
            "plan": plan.as_dict(),
            "flags": _flags(args),
        }
        result = train(
            model, optimizer, loader, loss_fn, rt, loop_cfg, meta=meta, train_model=train_model,
            eval_fn=lambda m, step: evaluate_base(m, tok, val, rt),
            sample_fn=lambda m, step: samples(m, tok, corpus.lang, args.sample_tokens),
        )
        summary = {
            "stage": "base", "tag": tag, "corpus": corpus.name, "depth": args.depth, "layers": cfg.layers,
            "params": model.num_params(), "scaling_params": scaling_params,
            "flops_per_token": model.flops_per_token(), "steps": result.steps, "tokens": result.tokens,
            "total_batch": plan.total_batch, "seq_len": plan.seq_len, "world_size": rt.world_size,
            "device": str(rt.device), "compute_dtype": str(rt.compute_dtype).replace("torch.", ""), "fp8": args.fp8,
            "train_time_s": result.train_time_s, "wall_time_s": time.time() - t_start,
            "tok_per_s": result.tokens / result.train_time_s if result.train_time_s else None,
            "final_loss": result.final_loss, "minutes_fit": result.fit or None,
            "final_val_bpb": result.final_eval.get("val_bpb"), "final_val_loss": result.final_eval.get("val_loss"),
            "min_val_bpb": result.min_val_bpb, "val_tokens": int(result.final_eval.get("val_tokens", 0)),
            "crop_fraction": loader.stats.get("crop_fraction"), "epoch": loader.stats.get("epoch"),
            "repeat_rows": args.repeat_rows, "checkpoint": result.checkpoint,
        }
        if rt.is_master:
            atomic_write_json(tag_dir / "summary.json", summary)
        print0(rt, f"done: {result.steps} steps, {result.tokens:,} tokens in {result.train_time_s:.1f}s; "
                   f"val bpb {summary['final_val_bpb']} (min {result.min_val_bpb}); summary {tag_dir / 'summary.json'}")
    finally:
        shutdown_runtime(rt)
    return 0
