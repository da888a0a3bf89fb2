"""`chibichat bench infer`: inference speed of the Engine on a random-init model, one table.

For each layout (dense, iberis) x dtype (fp32, bf16), in a fresh process (so peak memory is that
configuration's own):
  - TTFT: generate(max_tokens=1) on one prompt of --prompt tokens (prefill + first sample);
  - prefill tok/s: the batch-1 prompt forward alone, as the engine runs it (its decode path, logits of
    the last position only);
  - decode tok/s at each batch size: (generate(max_tokens=1+N) - generate(max_tokens=1)) / (B*N),
    i.e. the per-step cost of decoding including sampling and the engine's bookkeeping;
  - memory: weights + inference state (exact tensor bytes), the weight copies the decode path keeps
    (fused / transposed layouts), and the process's peak RSS (CPU) or peak allocated CUDA memory;
  - aten ops/step: operations one batch-1 decode step of the engine's decode path dispatches
    (machine-independent overhead).
Decode is measured greedy ("greedy") and sampled at temperature 0.8, top-k 50 ("sampled", what chat
uses). The benchmark's tokenizer stand-in gives the special tokens ids outside the vocabulary, so no
row ever samples a stop token and every run decodes exactly N tokens.
Each figure is the best of --repeats runs (the machine may be shared: compare within one run).
bf16 models are prepared with engine.prepare_for_inference (weights stored in bf16).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from chibichat.common import ChibiError, add_runtime_args, parse_str_list

HELP = "inference TTFT, prefill and decode tokens/s (batch 1 and 8), memory: dense vs iberis, fp32 vs bf16"


def add_args(p) -> None:
    p.add_argument("--depth", type=int, default=4, help="layers (default: 4)")
    p.add_argument("--width", type=int, default=256, help="model width n_embd (default: 256); heads of 64")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default: 8192)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--decode", type=int, default=64, help="decode steps measured (default: 64)")
    p.add_argument("--batches", default="1,8", help="decode batch sizes (default: 1,8)")
    p.add_argument("--layouts", default="dense,iberis", help="layer layouts (default: dense,iberis)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes (default: float32,bfloat16)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is reported (default: 3)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's choice)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: elapsed time (default); cpu: this process's CPU time, a steadier estimate of a quiet "
                        "machine's figures when the machine is shared (CPU device with --threads 1 only)")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_runtime_args(p)  # --device (auto/cpu/cuda)
    p.set_defaults(dtype=None)  # --dtype given is refused in run(): the dtypes measured are --dtypes


def _parse_list(text: str, what: str, conv=str) -> list:
    try:
        items = [conv(x) for x in parse_str_list(text, f"--{what}")]
    except ValueError:
        kind = " of integers, e.g. 1,8" if conv is int else ""
        raise ChibiError(f"--{what} must be a comma-separated list{kind}, got {text!r}") from None
    if not items:
        raise ChibiError(f"--{what} is empty")
    twice = sorted({str(x) for x in items if items.count(x) > 1})
    if twice:  # it would be measured twice (and a batch size's columns overwritten)
        raise ChibiError(f"--{what} lists {', '.join(twice)} more than once; list each value once")
    return items


def measure(cfg: dict) -> dict:
    """One configuration, in this process. Returns the figures as a dict."""
    import torch

    from chibichat.common import init_runtime
    from chibichat.engine import Engine, prepare_for_inference
    from chibichat.model.gpt import GPT, GPTConfig, RunConfig
    from chibichat.tokenizer import SPECIAL_TOKENS

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    rt = init_runtime(cfg["device"], cfg["dtype"])
    width, depth = cfg["width"], cfg["depth"]
    gcfg = GPTConfig(vocab_size=cfg["vocab"], seq_len=cfg["prompt"] + cfg["decode"] + 1, n_layer=depth,
                     n_embd=width, n_head=max(1, width // 64), n_kv_head=max(1, width // 64), layers=cfg["layout"])  # fmt: skip
    torch.manual_seed(0)
    model = prepare_for_inference(GPT(gcfg, RunConfig(compute_dtype=rt.compute_dtype)).to(rt.device))

    class _Tok:  # the engine only needs special ids and decoding; stop ids the model cannot emit
        vocab_size = cfg["vocab"]

        def special_id(self, name):
            return cfg["vocab"] + SPECIAL_TOKENS.index(name)

        def decode(self, ids):
            return ""

    engine = Engine(model, _Tok(), rt)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    clock = time.process_time if cfg.get("clock") == "cpu" else time.perf_counter
    if cfg.get("clock") == "cpu" and (rt.device.type != "cpu" or cfg["threads"] != 1):
        raise ChibiError("--clock cpu measures one CPU thread: use it with --device cpu --threads 1")
    g = torch.Generator().manual_seed(1)
    prompt_of = lambda: torch.randint(0, cfg["vocab"] - len(SPECIAL_TOKENS), (cfg["prompt"],), generator=g).tolist()  # noqa: E731

    def best(fn):
        times = []
        for _ in range(cfg["repeats"]):
            sync()
            t0 = clock()
            fn()
            sync()
            times.append(clock() - t0)
        return min(times)

    def gen(prompts, n, temperature=0.0):
        out = engine.generate(prompts, max_tokens=n, temperature=temperature, top_k=50, tools=False)
        assert all(len(s[0].tokens) == n for s in out), "a row stopped early; the timing would be wrong"

    one = [prompt_of()]
    res = {"layout": cfg["layout"], "dtype": cfg["dtype"], "device": str(rt.device)}
    gen(one, 2)  # warm-up (allocator, kernels)
    ids = torch.tensor(one, device=rt.device)

    decoder = engine.decoder()

    def prefill():
        with torch.inference_mode():
            decoder.forward(ids, decoder.new_state(1, cfg["prompt"]), last_only=True)

    res["prefill_tok_s"] = cfg["prompt"] / best(prefill)
    res["ttft_ms"] = 1000 * best(lambda: gen(one, 1))
    n = cfg["decode"]
    for B in cfg["batches"]:
        prompts = [prompt_of() for _ in range(B)]
        gen(prompts, 2)
        for name, temperature in (("decode", 0.0), ("sampled", 0.8)):
            t1 = best(lambda: gen(prompts, 1, temperature))
            tn = best(lambda: gen(prompts, 1 + n, temperature))
            res[f"{name}_tok_s_b{B}"] = B * n / max(tn - t1, 1e-9)
    res["ops_per_step"] = _count_ops(decoder, engine, cfg["prompt"])
    state = model.new_state(max(cfg["batches"]), gcfg.seq_len)
    state_bytes = sum(t.numel() * t.element_size() for layer in state.layers for t in layer)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res["weights_mib"] = weight_bytes / 2**20
    res["decoder_copies_mib"] = decoder.extra_bytes(model) / 2**20
    res["state_mib"] = state_bytes / 2**20
    if rt.device.type == "cuda":
        res["peak_mib"] = torch.cuda.max_memory_allocated(rt.device) / 2**20
        res["peak_kind"] = "cuda allocated"
    else:
        import resource

        res["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        res["peak_kind"] = "process RSS"
    res["params"] = model.num_params()
    return res


def _count_ops(decoder, engine, prompt_len: int) -> int:
    """aten operations dispatched by one batch-1 decode step (decode step + greedy pick): a
    machine-independent measure of the per-step overhead that bounds small-model decoding."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from chibichat.engine import SamplingParams, sample_next

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    dev = engine.rt.device
    with torch.inference_mode():
        state = decoder.new_state(1, prompt_len + 1)
        decoder.forward(torch.zeros(1, prompt_len, dtype=torch.long, device=dev), state)
        with Count() as count:
            logits = decoder.forward(torch.zeros(1, 1, dtype=torch.long, device=dev), state, check_ids=False)
            sample_next(logits[:, -1], SamplingParams(0.0), None).tolist()
    return count.n


def _worker() -> None:
    """Entry point of the per-configuration subprocess: config JSON in argv[1], result JSON out."""
    print("RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)


def run(args) -> int:
    if args.dtype is not None:
        fix = "drop it" if args.dtype == "auto" else f"give --dtypes {args.dtype} instead of --dtype {args.dtype}"
        raise ChibiError(f"bench infer measures every dtype of --dtypes (default: float32,bfloat16), not --dtype: {fix}")
    layouts = _parse_list(args.layouts, "layouts")
    dtypes = _parse_list(args.dtypes, "dtypes")
    batches = _parse_list(args.batches, "batches", int)
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise ChibiError(f"--dtypes: {d!r} is not one of float32, bfloat16, float16")
    for name, v, lo in (("depth", args.depth, 1), ("width", args.width, 64), ("vocab", args.vocab, 300),
                        ("prompt", args.prompt, 1), ("decode", args.decode, 2), ("repeats", args.repeats, 1)):  # fmt: skip
        if v < lo:
            raise ChibiError(f"--{name} must be >= {lo}, got {v}")
    if any(b < 1 for b in batches):
        raise ChibiError(f"--batches must be positive, got {batches}")
    if args.threads < 0:
        raise ChibiError(f"--threads must be >= 0 (0: torch's choice), got {args.threads}")
    if "float16" in dtypes:  # refused by init_runtime on a CPU, but only in its configuration's process
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        if device.split(":")[0] == "cpu":
            raise ChibiError(f"--dtypes float16 is not supported on CPU (--device {args.device}); use bfloat16 or "
                             "float32")
    if args.json:
        from chibichat.common import check_output

        check_output(args.json, "--json")  # written after every configuration has run
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        raise ChibiError("--clock cpu measures one CPU thread: use it with --device cpu --threads 1")
    if args.width % 64:
        raise ChibiError(f"--width {args.width} must be a multiple of 64 (heads of 64)")

    from chibichat.model.gpt import layer_pattern

    for layout in layouts:
        layer_pattern(layout, args.depth)  # ChibiError on a bad layout, before any process starts
    results = []
    print(f"bench infer: depth {args.depth}, width {args.width}, vocab {args.vocab}, prompt {args.prompt}, "
          f"{args.decode} decode steps, best of {args.repeats}, {args.clock} clock; each configuration in a fresh process",
          flush=True)  # fmt: skip
    for layout in layouts:
        for dtype in dtypes:
            cfg = dict(layout=layout, dtype=dtype, device=args.device, depth=args.depth, width=args.width,
                       vocab=args.vocab, prompt=args.prompt, decode=args.decode, batches=batches,
                       repeats=args.repeats, threads=args.threads, clock=args.clock)
            code = "from chibichat.bench.infer import _worker; _worker()"
            proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                raise ChibiError(f"bench infer {layout}/{dtype} failed: " + " | ".join(tail))
            results.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"  done {layout} {dtype}", flush=True)
    print(format_table(results, batches))
    if args.json:
        from chibichat.common import atomic_write_json

        atomic_write_json(args.json, {"args": {k: v for k, v in vars(args).items() if k != "func"}, "results": results})
    return 0


def format_table(results: list[dict], batches: list[int]) -> str:
    head = ["layout", "dtype", "TTFT ms", "prefill tok/s"] + [f"greedy tok/s b{b}" for b in batches]
    head += [f"sampled tok/s b{b}" for b in batches]
    head += ["aten ops/step", "weights+state MiB", "decode copies MiB", "peak MiB"]
    rows = []
    for r in results:
        rows.append([r["layout"], r["dtype"], f"{r['ttft_ms']:.1f}", f"{r['prefill_tok_s']:,.0f}"]
                    + [f"{r[f'decode_tok_s_b{b}']:,.0f}" for b in batches]
                    + [f"{r[f'sampled_tok_s_b{b}']:,.0f}" for b in batches]
                    + [str(r["ops_per_step"]), f"{r['weights_mib'] + r['state_mib']:.1f}", f"{r['decoder_copies_mib']:.1f}",
                       f"{r['peak_mib']:.0f} ({r['peak_kind']})"])  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows]
    return "\n".join(lines)
