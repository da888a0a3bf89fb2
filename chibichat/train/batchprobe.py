"""`--device-batch auto`: the largest per-device batch that fits the card, from a measured probe.

The total batch (tokens per optimizer step) is fixed by the recipe; the per-device batch only decides how
many micro-batches each step accumulates (grad_accum = total / (device_batch * seq_len * world_size)).
So the candidates are the powers of two d whose micro-batch unit d * seq_len * world_size divides the
total batch exactly, largest first, and the probe picks the first that fits:

  fits(d) on CUDA: one forward + backward of a (d, seq_len) batch of random tokens on the real model,
      peak memory read with torch.cuda.max_memory_allocated, plus the optimizer state the training
      will add (fp32: two AdamW moments per embedding/head/other weight, one Muon momentum per
      block matrix) and a safety margin, must stay within the card's total memory; an
      out-of-memory error is "does not fit". Gradients and activations are freed between tries.
  Elsewhere (CPU, MPS) memory is not the limit: auto takes the largest candidate not above the
      CPU rule's 2^14 tokens per micro-batch, and says so.

The selection (candidates, first fit, the budget check) takes plain callables, so it is tested on CPU.
"""

from __future__ import annotations

from typing import Callable

from chibichat.common import ChibiError

MARGIN = 0.10  # share of the card kept free for the allocator's fragmentation, NCCL buffers, compile
CPU_MICRO_TOKENS = 2 ** 14


def candidates(total_batch: int, seq_len: int, world_size: int) -> list[int]:
    """Powers of two d (largest first) with total_batch % (d * seq_len * world_size) == 0."""
    unit = seq_len * world_size
    if total_batch % unit:
        raise ChibiError(f"--total-batch {total_batch} is not a multiple of seq_len {seq_len} x world_size "
                         f"{world_size} = {unit} tokens: no per-device batch divides it; pick a multiple")
    rows = total_batch // unit
    out, d = [], 1
    while d <= rows:
        if rows % d == 0:
            out.append(d)
        d *= 2
    return out[::-1]


def pick(cands: list[int], fits: Callable[[int], bool]) -> int:
    """The first candidate that fits (they come largest first)."""
    tried = []
    for d in cands:
        if fits(d):
            return d
        tried.append(d)
    raise ChibiError(f"--device-batch auto: not even {tried[-1] if tried else 1} row(s) per device fit in memory "
                     f"(tried {tried}); lower --depth or --seq-len, or add --recompute block / --fp8")


def within_budget(peak_bytes: int, state_bytes: int, total_bytes: int, margin: float = MARGIN) -> bool:
    """Measured fwd+bwd peak + optimizer state within the card's memory less the margin."""
    return peak_bytes + state_bytes <= (1.0 - margin) * total_bytes


def optimizer_state_bytes(model) -> int:
    """fp32 optimizer state training adds: 2 AdamW moments per embedding/head/other weight, 1 Muon momentum
    per block matrix (train/optim.py)."""
    groups = model.param_groups()
    adam = sum(p.numel() for g in ("embedding", "head", "other") for p in groups[g])
    muon = sum(p.numel() for p in groups["matrix"])
    return 4 * (2 * adam + muon)


def cuda_fits(model, seq_len: int, device) -> Callable[[int], bool]:
    """fits(d) for a CUDA model: a measured forward + backward of d rows (see the module docstring)."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    state = optimizer_state_bytes(model)
    vocab = model.config.vocab_size

    def fits(d: int) -> bool:
        ok = False
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            x = torch.randint(0, vocab, (d, seq_len), device=device)
            loss = model(x, x, reduction="sum")
            loss.backward()
            torch.cuda.synchronize(device)
            ok = within_budget(torch.cuda.max_memory_allocated(device), state, total)
        except torch.cuda.OutOfMemoryError:
            ok = False
        finally:
            model.zero_grad(set_to_none=True)
            x = loss = None
            torch.cuda.empty_cache()
        return ok

    return fits


def auto_device_batch(model, total_batch: int, seq_len: int, world_size: int, device) -> tuple[int, str]:
    """(rows per device, how it was chosen) for --device-batch auto."""
    cands = candidates(total_batch, seq_len, world_size)
    if device.type == "cuda":
        d = pick(cands, cuda_fits(model, seq_len, device))
        return d, f"largest power of two whose fwd+bwd peak + optimizer state fit {1 - MARGIN:.0%} of the card"
    small = [c for c in cands if c * seq_len <= CPU_MICRO_TOKENS] or [cands[-1]]
    return small[0], f"{device.type}: no memory probe; largest divisor with <= {CPU_MICRO_TOKENS} tokens per micro-batch"
