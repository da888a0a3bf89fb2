"""`chibichat bench train`: training throughput of the model as tokens/s, FLOP/s and MFU.

For every combination of --layers x --dtype x --compile x --fp8 x --recompute x --trim-heap x --lora (a
cartesian product), a fresh process builds the model and the real optimizer (MuonAdamW from chibichat/train/optim.py: Muon on block matrices,
AdamW on embedding/head/conv taps), and runs full optimizer steps of --total-batch tokens each
(gradient accumulation over micro-batches of --batch rows of --seq-len tokens). After --warmup steps
(which include torch.compile's compilation), --steps steps are timed; the median step time gives:

  tokens/s    = total_batch / median step time
  FLOP/s      = model.flops_per_token() * tokens/s   (SLC2 layers charged as SLC2, not attention)
  MFU         = FLOP/s / peak, where peak is *measured* in the same process, dtype and thread count
                by a square matmul calibration (best of several), not a datasheet number
  peak RSS    = the process's maximum resident memory (ru_maxrss) over the training steps (read before
                the calibration), torch runtime included; the RSS before the model was built is
                reported as the baseline. On CUDA: the most GPU memory torch allocated instead

--lora RANK freezes the model and trains rank-RANK adapters on every block projection (chibichat/model/lora.py,
AdamW over the adapters alone, as `sft --lora`); "optim MB" is the optimizer state actually held (Muon
momenta + Adam moments, or the adapters' Adam moments) and "trainable" the parameters it updates. A LoRA
row's zero-initialised head is first filled with N(0, 1/width) (a zero head passes no gradient to the
adapters; a real base has a trained one), so its loss column starts from another model.

--recompute (RunConfig.recompute) trades compute for activation memory; --trim-heap returns freed heap to
the OS after every step (glibc malloc_trim). Losses are identical in every setting; the figures are in
docs/benchmarks.md.

Each configuration runs in its own spawned process so that peak memory, compile caches and thread
pools of one configuration cannot leak into the next. The training data is a fixed random Markov
chain (4 successors per token), identical for every configuration, so the final-loss column shows
whether a faster setting learns the same (it can fall from ln V towards ln 4).

Timings on a shared machine are noisy: compare configurations from one run, and rerun when quiet.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import asdict, dataclass

from chibichat.common import ChibiError, parse_str_list

HELP = ("training throughput (tokens/s, FLOP/s, MFU, peak memory) over layouts x dtypes x compile x fp8 x recompute x "
        "trim x lora")

DTYPES = ("float32", "bfloat16")
COMPILE = {"off": False, "on": True}
FP8 = {"off": False, "on": True}


@dataclass(frozen=True)
class TrainBenchConfig:
    depth: int
    width: int
    heads: int
    kv_heads: int
    seq_len: int
    vocab: int
    batch: int
    layers: str
    dtype: str
    compile: bool
    steps: int
    warmup: int
    total_batch: int
    threads: int
    window: str = "0"
    seed: int = 0
    fp8: bool = False  # block matmuls in fp8 (model/fp8.py); bfloat16 only
    recompute: str = "none"
    trim_heap: bool = False
    lora: int = 0  # LoRA rank (0: full training)

    @property
    def grad_accum(self) -> int:
        return self.total_batch // (self.batch * self.seq_len)


def add_args(p) -> None:
    p.add_argument("--depth", type=int, default=4, help="number of layers")
    p.add_argument("--width", type=int, default=256, help="model width n_embd")
    p.add_argument("--heads", type=int, default=4, help="attention heads (also SLC2 gate heads)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads for GQA (default: --heads)")
    p.add_argument("--seq-len", type=int, default=256, help="context length of a training row")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--total-batch", type=int, default=2048,
                   help="tokens per optimizer step; a multiple of batch * seq-len (gradient accumulation)")
    p.add_argument("--layers", default="dense", help="comma list of layouts: dense, iberis or strings like ASSA")
    p.add_argument("--window", default="0", metavar="N[:PATTERN]",
                   help="sliding-window attention, as `pretrain --window` (0 = full causal everywhere)")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma list of compute dtypes: float32, bfloat16")
    p.add_argument("--compile", default="off", help="comma list of off, on (torch.compile of the model)")
    p.add_argument("--fp8", default="off",
                   help="comma list of off, on: block matmuls in fp8 (bfloat16 dtype only; meant for H100-class "
                        "GPUs, slower than bf16 on CPU, which has no fp8 units)")
    p.add_argument("--recompute", default="none",
                   help="comma list of activation recomputation settings: none, mlp, block (RunConfig.recompute)")
    p.add_argument("--trim-heap", default="off",
                   help="comma list of off, on: return freed heap to the OS after every optimizer step "
                        "(malloc_trim, glibc; as `pretrain --trim-heap`)")
    p.add_argument("--lora", default="off",
                   help="comma list of off or LoRA ranks: train adapters on a frozen model (as `sft --lora RANK`)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (compilation happens here)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _split(value: str, allowed, flag: str) -> list[str]:
    items = parse_str_list(value, flag)
    if not items:
        raise ChibiError(f"{flag} is empty; give a comma-separated list")
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise ChibiError(f"{flag} has unknown values {bad}; choose from {', '.join(allowed)}")
    _no_repeats(items, flag)
    return items


def _no_repeats(values: list, flag: str) -> None:
    """A value listed twice would run (and tabulate) the same configuration twice."""
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise ChibiError(f"{flag} lists {', '.join(twice)} more than once; list each value once")


def configs_from_args(args) -> list[TrainBenchConfig]:
    """The cartesian product of the list flags, validated before any process is started."""
    from chibichat.model.gpt import RECOMPUTE, layer_pattern
    from chibichat.train.scaling import window_schedule

    for name in ("depth", "width", "heads", "seq_len", "vocab", "batch", "total_batch", "steps"):
        if getattr(args, name) < 1:
            raise ChibiError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.kv_heads is not None and args.kv_heads < 1:  # 0 is not "the default": leave the flag out for that
        raise ChibiError(f"--kv-heads must be >= 1, got {args.kv_heads} (leave it out for --heads)")
    if args.warmup < 0 or args.threads < 0:
        raise ChibiError("--warmup and --threads must be >= 0")
    row = args.batch * args.seq_len
    if args.total_batch % row:
        raise ChibiError(
            f"--total-batch {args.total_batch} is not a multiple of --batch x --seq-len = {row}; "
            f"use e.g. --total-batch {row * max(1, round(args.total_batch / row))}"
        )
    layouts = _split(args.layers, None, "--layers")
    for lay in layouts:
        window_schedule(args.window, layer_pattern(lay, args.depth), args.seq_len)  # raise ChibiError naming the problem
    dtypes = _split(args.dtype, DTYPES, "--dtype")
    compiles = _split(args.compile, tuple(COMPILE), "--compile")
    fp8s = _split(args.fp8, tuple(FP8), "--fp8")
    if "on" in fp8s and dtypes != ["bfloat16"]:
        raise ChibiError("--fp8 on needs --dtype bfloat16 (fp8 matmuls return bf16 activations); "
                         "pass --dtype bfloat16 or --fp8 off")
    recomputes = _split(args.recompute, RECOMPUTE, "--recompute")
    trims = _split(args.trim_heap, tuple(COMPILE), "--trim-heap")
    loras = []
    for v in _split(args.lora, None, "--lora"):
        if v != "off" and not (v.isdigit() and int(v) >= 1):
            raise ChibiError(f"--lora {v!r}: give off or a rank >= 1, e.g. --lora off,8")
        loras.append(0 if v == "off" else int(v))
    _no_repeats(loras, "--lora")  # "8,08"
    if any(loras) and "on" in fp8s:
        raise ChibiError("--lora with --fp8 on is not supported (as in the training stages); drop one")
    return [
        TrainBenchConfig(
            depth=args.depth, width=args.width, heads=args.heads, kv_heads=args.kv_heads or args.heads,
            seq_len=args.seq_len, vocab=args.vocab, batch=args.batch, layers=lay, dtype=dt, compile=COMPILE[c],
            steps=args.steps, warmup=args.warmup, total_batch=args.total_batch, threads=args.threads,
            window=args.window, fp8=FP8[f], recompute=rc, trim_heap=COMPILE[tr], lora=lo,
        )
        for lay, dt, c, f, rc, tr, lo in itertools.product(layouts, dtypes, compiles, fp8s, recomputes, trims, loras)
    ]


# ----------------------------------------------------------------------------------------------
# One configuration (runs inside its own process)


def markov_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int):
    """n (inputs, targets) pairs from a fixed random Markov chain with 4 successors per token."""
    import torch

    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(n):
        rows = torch.empty(batch, seq_len + 1, dtype=torch.long)
        rows[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        choice = torch.randint(0, 4, (batch, seq_len), generator=g)
        for t in range(seq_len):
            rows[:, t + 1] = succ[rows[:, t], choice[:, t]]
        out.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_config(cfg: TrainBenchConfig, device: str = "cpu", calib_n: int = 2048) -> dict:
    """Build, warm up and time one configuration in this process; returns the figures as a dict."""
    import resource

    import torch

    from chibichat.model.fp8 import check_fp8_runtime
    from chibichat.model.gpt import GPT, GPTConfig, RunConfig, layer_pattern
    from chibichat.train.loop import measure_matmul_peak, release_free_heap
    from chibichat.train.optim import build_optimizer
    from chibichat.train.scaling import window_schedule

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(device)
    dtype = getattr(torch, cfg.dtype)
    baseline_rss = _rss_mb()
    torch.manual_seed(cfg.seed)
    if cfg.fp8:
        check_fp8_runtime(dev, dtype)
    with dev:
        model = GPT(GPTConfig(vocab_size=cfg.vocab, seq_len=cfg.seq_len, n_layer=cfg.depth, n_embd=cfg.width,
                              n_head=cfg.heads, n_kv_head=cfg.kv_heads, layers=cfg.layers,
                              windows=window_schedule(cfg.window, layer_pattern(cfg.layers, cfg.depth), cfg.seq_len)),
                    RunConfig(compute_dtype=dtype, recompute=cfg.recompute, fp8=cfg.fp8))
    # nanochat OLD learning rates, AdamW ones scaled by (E/768)^-0.5.
    s = (cfg.width / 768) ** -0.5
    if cfg.lora:
        from chibichat.model.lora import LoRAConfig, apply_lora
        from chibichat.train.optim import build_lora_optimizer

        # A fresh model's head is zero, which would pass no gradient to any adapter; a fine-tuned base has a
        # trained one: stand in with N(0, 1/width).
        with torch.no_grad():
            model.lm_head.normal_(0.0, cfg.width ** -0.5)

        opt = build_lora_optimizer(apply_lora(model, LoRAConfig(rank=cfg.lora, alpha=float(cfg.lora))), lr=2e-3)
    else:
        opt = build_optimizer(model.param_groups(), matrix_lr=0.02, embedding_lr=0.2 * s, unembedding_lr=0.004 * s,
                              other_lr=0.02 * s, compute_dtype=dtype)
    train_model = torch.compile(model, dynamic=False) if cfg.compile else model
    batches = markov_batches(cfg.grad_accum * (cfg.warmup + cfg.steps), cfg.batch, cfg.seq_len, cfg.vocab, cfg.seed)
    batches = [(x.to(dev), y.to(dev)) for x, y in batches]

    times, cpu_times, losses = [], [], []
    warmup_s = 0.0
    it = iter(batches)
    for step in range(cfg.warmup + cfg.steps):
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        total = 0.0
        for _ in range(cfg.grad_accum):
            x, y = next(it)
            loss = train_model(x, y) / cfg.grad_accum
            loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.trim_heap:
            release_free_heap()
        losses.append(float(total))  # also synchronises, so the step is complete
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if step < cfg.warmup:
            warmup_s += dt
        else:
            times.append(dt)
            cpu_times.append(cpu)
    if not all(math.isfinite(v) for v in losses):
        raise ChibiError(f"{cfg.layers}/{cfg.dtype}: the loss became non-finite ({losses}); this setting is unsafe")

    # Read before the matmul calibration below, whose own operands would otherwise count as training memory.
    # ru_maxrss and /proc VmRSS are accounted slightly differently; the peak is at least the current RSS
    peak_rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _rss_mb())
    if dev.type == "cuda":
        peak_rss = torch.cuda.max_memory_allocated(dev) / 2**20
    median = statistics.median(times)
    tok_s = cfg.total_batch / median
    flops = model.flops_per_token() * tok_s
    peak = measure_matmul_peak(dtype, dev, n=calib_n)
    optim_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                      if torch.is_tensor(v))
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return dict(
        optim_mb=optim_bytes / 2**20, trainable_params=trainable,
        config=asdict(cfg), params=model.num_params(), flops_per_token=model.flops_per_token(),
        step_ms=median * 1000, step_ms_min=min(times) * 1000, step_ms_max=max(times) * 1000,
        cpu_ms=statistics.median(cpu_times) * 1000,
        tokens_per_s=tok_s, flops_per_s=flops, peak_flops_per_s=peak, mfu=flops / peak,
        peak_mem_mb=peak_rss, baseline_rss_mb=baseline_rss, warmup_s=warmup_s,
        first_loss=losses[0], final_loss=statistics.mean(losses[-min(3, len(losses)):]),
        threads=torch.get_num_threads(), device=str(dev),
    )


def footnote(r0: dict) -> str:
    """What the table's columns are, for a run whose first result is `r0` (its device decides what peak MB is)."""
    memory = ("peak MB = the most GPU memory torch allocated over the training steps. " if r0["device"].startswith("cuda")
              else "peak MB = max RSS of the process incl. the torch runtime (baseline before building the model: "
                   f"{r0['baseline_rss_mb']:.0f} MB). ")
    return (f"* peak = best-of-5 {2048}^3 matmul measured in each process in its dtype with {r0['threads']} threads "
            "(MFU is relative to what this machine delivered, not a datasheet; fp8 rows against the bf16 peak). "
            "FLOPs/token = 6 x matmul params + attention (SLC2 charged as SLC2). " + memory + "Optimizer: MuonAdamW. "
            "cpu ms/step = process CPU time per step (all threads; with --threads 1 it shows what one core does even "
            "when the machine is shared, as wall time then includes waiting for a core). Shared machines give noisy "
            "timings: compare within one run.")


def child_main() -> int:
    """Entry point of the per-configuration process: a JSON request on stdin, a JSON reply on stdout."""
    import json
    import sys

    req = json.loads(sys.stdin.read())
    try:
        reply = {"status": "ok", "result": run_config(TrainBenchConfig(**req["config"]), req["device"])}
    except ChibiError as e:
        reply = {"status": "error", "message": str(e)}
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(reply) + "\n")
    return 0


RESULT_MARK = "@@chibichat-bench-result@@"


def _name(cfg: TrainBenchConfig) -> str:
    return (f"{cfg.layers}/{cfg.dtype}/compile={'on' if cfg.compile else 'off'}" + ("/fp8" if cfg.fp8 else "")
            + f"/recompute={cfg.recompute}/trim={'on' if cfg.trim_heap else 'off'}" + (f"/lora={cfg.lora}" if cfg.lora else ""))


def run_isolated(cfg: TrainBenchConfig, device: str = "cpu") -> dict:
    """run_config in a fresh interpreter (clean peak memory, thread pool and compile cache).

    A plain subprocess rather than multiprocessing: it does not depend on how the parent's __main__
    was started (console script, python -m, pytest)."""
    import json
    import subprocess
    import sys

    name = _name(cfg)
    code = "import sys; from chibichat.bench.train import child_main; sys.exit(child_main())"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps({"config": asdict(cfg), "device": device}),
                          capture_output=True, text=True)
    marked = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not marked:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ChibiError(f"bench process for {name} failed (exit code {proc.returncode}):\n{tail}")
    reply = json.loads(marked[-1][len(RESULT_MARK):])
    if reply["status"] != "ok":
        raise ChibiError(f"bench {name}: {reply['message']}")
    return reply["result"]


# ----------------------------------------------------------------------------------------------
# Report


def format_table(results: list[dict]) -> str:
    head = ["layers", "dtype", "compile", "fp8", "recompute", "trim", "lora", "trainable", "optim MB", "ms/step", "cpu ms/step", "tok/s", "GFLOP/s",
            "peak GFLOP/s*", "MFU", "peak MB",
            "warmup s", "loss first->last"]
    rows = []
    for r in results:
        c = r["config"]
        rows.append([
            c["layers"], c["dtype"], "on" if c["compile"] else "off", "on" if c["fp8"] else "off", c["recompute"],
            "on" if c["trim_heap"] else "off", str(c.get("lora") or "off"), f"{r['trainable_params']:,}",
            f"{r['optim_mb']:.1f}",
            f"{r['step_ms']:.1f}", f"{r['cpu_ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_s'] / 1e9:.1f}",
            f"{r['peak_flops_per_s'] / 1e9:.0f}", f"{100 * r['mfu']:.1f}%", f"{r['peak_mem_mb']:.0f}",
            f"{r['warmup_s']:.1f}", f"{r['first_loss']:.3f}->{r['final_loss']:.3f}",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def run(args) -> int:
    from chibichat.common import atomic_write_json

    from chibichat.common import check_output

    configs = configs_from_args(args)
    if args.json:
        check_output(args.json, "--json")  # written after every configuration has run
    c0 = configs[0]
    print(
        f"bench train: depth {c0.depth}, width {c0.width}, heads {c0.heads}/{c0.kv_heads} kv, seq {c0.seq_len}, "
        f"vocab {c0.vocab}, batch {c0.batch} x {c0.grad_accum} micro-steps = {c0.total_batch} tokens/step, "
        f"{c0.warmup} warmup + {c0.steps} timed steps (median), window {c0.window}, device {args.device}",
        flush=True,
    )
    results = []
    for cfg in configs:
        r = run_isolated(cfg, args.device)
        results.append(r)
        print(f"  done {_name(cfg)}: {r['tokens_per_s']:,.0f} tok/s", flush=True)
    print()
    print(format_table(results))
    print("\n" + footnote(results[0]))
    if args.json:
        atomic_write_json(args.json, results)
    return 0
