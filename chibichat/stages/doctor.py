"""`chibichat doctor --gpu`: does this machine's GPU stack do what the GPU presets need, and how fast?

Checks, each recorded as {"ok": bool, ...} (or {"skipped": reason}) in one JSON file:
  cuda       device name, compute capability (SM), memory, torch and CUDA versions
  bf16       a bf16 matmul agrees with the fp32 one (relative error < 1e-2)
  compile    a torch.compile'd function gives the eager result
  sdpa       scaled_dot_product_attention forced onto the flash backend equals the math backend
  fp8        on SM >= 8.9: a d2 model with fp8 block matmuls runs forward + backward to a finite loss
  nccl       all-reduce of each GPU's rank over every visible GPU (one process per GPU) gives the sum
  mfu        for d12 and d20 at seq 2048 (65,536 vocab, bf16): median step time of real optimizer steps
             (bench train's run_config), MFU = flops_per_token x tokens/s / the card's datasheet bf16 peak,
             flops_per_token = 6 x matmul params + attention (GPT.flops_per_token, nanochat's definition)

Without --gpu (or without CUDA) it refuses with what to install: there is nothing to check on a CPU.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from chibichat.common import ChibiError, atomic_write_json, check_output

MFU_SEQ = 2048
MFU_VOCAB = 65536


def peak_bf16(device_name: str) -> float | None:
    """Datasheet dense bf16 FLOP/s of a GPU by name (longest table key contained in the name)."""
    from chibichat.train.loop import PEAK_BF16_FLOPS

    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the peak."""
    if not peak > 0:
        raise ChibiError(f"MFU needs a positive peak FLOP/s, got {peak}")
    return flops_per_token * tokens_per_s / peak


def mfu_shape(depth: int) -> dict:
    """The depth dial's shape (train/scaling.py) for a d<depth> model at seq 2048."""
    from chibichat.train.scaling import Overrides, derive_shape

    s = derive_shape(depth, Overrides(seq_len=MFU_SEQ))
    return {"width": s.width, "heads": s.heads, "kv_heads": s.kv_heads, "seq_len": s.seq_len}


def write_report(path: Path, report: dict) -> Path:
    """The report as indented JSON, atomically."""
    atomic_write_json(path, report)
    return path


def register(sub) -> None:
    p = sub.add_parser(
        "doctor", help="check the GPU stack (bf16, compile, flash SDPA, fp8, NCCL) and measure MFU at d12/d20",
        description=__doc__.split("\n\n")[0] + " Writes every figure to --json.")
    p.add_argument("--gpu", action="store_true", help="run the GPU checks (required: the checks are all GPU checks)")
    p.add_argument("--json", default="doctor.json", help="where to write the results (default: doctor.json)")
    p.add_argument("--mfu-depths", default="12,20", help="depths whose training MFU is measured (default 12,20; '' = none)")
    p.add_argument("--mfu-batch", type=int, default=8, help="rows of 2048 tokens per micro-batch (default 8)")
    p.add_argument("--mfu-steps", type=int, default=5, help="timed optimizer steps per depth (default 5)")
    p.add_argument("--no-compile", action="store_true", help="measure MFU without torch.compile")
    p.add_argument("--fp8", action="store_true", help="measure MFU with fp8 block matmuls too (SM >= 8.9)")
    p.set_defaults(func=run)


def _check(fn) -> dict:
    """{"ok": True, ...fn()'s figures}, {"ok": False, "error"} when fn raises, or fn()'s {"skipped": reason}
    as it is (a check that does not apply here is neither passed nor failed)."""
    t0 = time.time()
    try:
        res = fn() or {}
        out = dict(res) if "skipped" in res else {"ok": True, **res}
    except Exception as e:  # a failed check is a result to report, not a crash of the doctor
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out["seconds"] = round(time.time() - t0, 2)
    return out


def parse_depths(text: str) -> list[int]:
    """--mfu-depths as depths, parsed before any check runs (a typo must not cost the GPU checks' minutes and
    the report): comma-separated distinct positive integers, '' for none (a depth given twice would be measured
    twice, and its rows counted as one)."""
    depths = []
    for part in text.split(","):
        if not part.strip():
            continue
        if not (part.strip().isascii() and part.strip().isdigit()) or int(part) < 1:
            raise ChibiError(f"--mfu-depths {text!r}: {part.strip()!r} is not a depth; give comma-separated positive "
                             "integers like 12,20 (or '' for none)")
        if int(part) in depths:
            raise ChibiError(f"--mfu-depths {text!r}: depth {int(part)} is given twice; list each depth once")
        depths.append(int(part))
    return depths


def outcome(checks: dict, mfu_rows: list[dict]) -> tuple[str, int]:
    """The closing line's counts and the exit status: every check and every MFU row is ok, skipped or failed
    (a failed MFU measurement fails the doctor like a failed check); exit 1 when any failed."""
    rows = {**checks, **{f"mfu d{r['depth']}" + (" fp8" if r.get("fp8") else ""): r for r in mfu_rows}}
    skipped = [k for k, v in rows.items() if "skipped" in v]
    failed = [k for k, v in rows.items() if "skipped" not in v and not v.get("ok")]
    ok = len(rows) - len(skipped) - len(failed)
    line = (f"{ok} ok" + (f", {len(skipped)} skipped ({', '.join(skipped)})" if skipped else "")
            + (f", {len(failed)} failed ({', '.join(failed)})" if failed else ""))
    return line, 1 if failed else 0


def _nccl_worker(rank: int, world: int, port: int, q) -> None:
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    t = torch.full((1024,), float(rank), device=f"cuda:{rank}")
    dist.all_reduce(t)
    torch.cuda.synchronize()
    q.put((rank, float(t[0])))
    dist.destroy_process_group()


def check_nccl(n: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    if n < 2:
        return {"skipped": "one visible GPU: nothing to all-reduce across"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_nccl_worker, args=(n, port, q), nprocs=n, start_method="spawn", join=True)
    got = dict(q.get() for _ in range(n))
    want = float(sum(range(n)))
    if any(v != want for v in got.values()):
        raise ChibiError(f"NCCL all-reduce over {n} GPUs gave {got}, expected {want} everywhere")
    return {"gpus": n, "sum": want}


def run(args) -> int:
    import torch

    if not args.gpu:
        raise ChibiError("doctor checks the GPU stack: pass --gpu (on a machine with an NVIDIA GPU)")
    depths = parse_depths(args.mfu_depths)
    for flag, value in (("--mfu-batch", args.mfu_batch), ("--mfu-steps", args.mfu_steps)):
        if value < 1:
            raise ChibiError(f"{flag} must be >= 1, got {value}")
    check_output(args.json, "--json")  # written last: a bad path must not cost the checks' minutes
    if not torch.cuda.is_available():
        raise ChibiError(f"doctor --gpu: torch {torch.__version__} sees no CUDA device; install a CUDA build of "
                         "torch (https://pytorch.org) on a machine with an NVIDIA GPU and its driver")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sm = (props.major, props.minor)
    report = {"host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "device": props.name, "sm": f"{sm[0]}.{sm[1]}", "memory_gb": round(props.total_memory / 2**30, 1),
              "gpus": torch.cuda.device_count(), "peak_bf16_tflops": (peak_bf16(props.name) or 0) / 1e12 or None,
              "checks": {}}
    checks = report["checks"]

    def bf16():
        a, b = torch.randn(512, 512, device=dev), torch.randn(512, 512, device=dev)
        err = float((a.bfloat16() @ b.bfloat16()).float().sub(a @ b).norm() / (a @ b).norm())
        if not err < 1e-2:
            raise ChibiError(f"bf16 matmul relative error {err:.3g}")
        return {"rel_error": err}

    def compiled():
        f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1)
        x = torch.randn(64, 64, device=dev)
        if not torch.allclose(f(x), torch.nn.functional.gelu(x) * 2 + 1, atol=1e-5):
            raise ChibiError("compiled result differs from eager")
        return {}

    def sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (torch.randn(2, 8, 256, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(SDPBackend.MATH):
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        err = float((fa.float() - ref.float()).abs().max())
        if not err < 2e-2:
            raise ChibiError(f"flash attention differs from the math backend by {err:.3g}")
        return {"backend": "flash", "max_abs_diff": err}

    def fp8():
        if sm < (8, 9):
            return {"skipped": f"SM {sm[0]}.{sm[1]} < 8.9 has no fp8 tensor cores"}
        from chibichat.model.fp8 import check_fp8_runtime, fp8_layers
        from chibichat.model.gpt import GPT, GPTConfig, RunConfig

        check_fp8_runtime(dev, torch.bfloat16)
        with dev:
            m = GPT(GPTConfig(vocab_size=1024, seq_len=256, n_layer=2, n_embd=256, n_head=4, n_kv_head=4,
                              layers="dense", windows=[0, 0]), RunConfig(compute_dtype=torch.bfloat16, fp8=True))
        n = len(fp8_layers(m))
        x = torch.randint(0, 1024, (4, 256), device=dev)
        loss = m(x, x)
        loss.backward()
        if not torch.isfinite(loss):
            raise ChibiError(f"fp8 loss is {float(loss)}")
        return {"fp8_modules": n, "loss": float(loss)}

    for name, fn in (("bf16", bf16), ("compile", compiled), ("sdpa", sdpa), ("fp8", fp8),
                     ("nccl", lambda: check_nccl(torch.cuda.device_count()))):
        checks[name] = _check(fn)
        print(f"{name:<8} {json.dumps(checks[name])}", flush=True)

    report["mfu"] = []
    peak = peak_bf16(props.name)
    for depth in depths:
        for use_fp8 in ((False, True) if args.fp8 and sm >= (8, 9) else (False,)):
            report["mfu"].append(_mfu_row(depth, args, use_fp8, peak))
            print(f"mfu      {json.dumps(report['mfu'][-1])}", flush=True)
    path = write_report(Path(args.json), report)
    line, rc = outcome(checks, report["mfu"])
    print(f"doctor: {line}; report {path}")
    return rc


def _mfu_row(depth: int, args, use_fp8: bool, peak: float | None) -> dict:
    from chibichat.bench.train import TrainBenchConfig, run_isolated

    shape = mfu_shape(depth)
    cfg = TrainBenchConfig(depth=depth, vocab=MFU_VOCAB, batch=args.mfu_batch, layers="dense", dtype="bfloat16",
                           compile=not args.no_compile, steps=args.mfu_steps, warmup=3,
                           total_batch=args.mfu_batch * MFU_SEQ, threads=0, fp8=use_fp8, **shape)
    row = {"depth": depth, "seq_len": MFU_SEQ, "batch": args.mfu_batch, "compile": not args.no_compile, "fp8": use_fp8}
    try:
        r = run_isolated(cfg, "cuda")
    except ChibiError as e:
        return {**row, "ok": False, "error": str(e)}
    row.update(ok=True, params=r["params"], flops_per_token=r["flops_per_token"], tokens_per_s=r["tokens_per_s"],
               step_ms=r["step_ms"], peak_mem_mb=r["peak_mem_mb"],
               mfu=mfu(r["flops_per_token"], r["tokens_per_s"], peak) if peak else None,
               mfu_vs_measured_matmul=r["mfu"])
    return row
