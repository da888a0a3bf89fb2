"""Bits per byte: a loss that does not depend on the tokenizer (REFERENCE §9).

    bpb = Σ nats over targets whose token has > 0 bytes  /  (ln 2 · Σ bytes of those targets)

Special tokens (0 bytes) and ignored targets (-1) drop out of both sums, so two models with different
vocabularies are compared on the same bytes of text. Sums are all-reduced over ranks (each rank
scores its own val rows). `val_loss` (mean nats per valid target token) comes along for free.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from chibichat.common import ChibiError, Runtime


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor, rt: Runtime) -> dict:
    """Score every (inputs, targets) batch in `batches` (an iterable, already limited to the val
    budget). Returns {"val_bpb", "val_loss", "val_tokens", "val_bytes"} over all ranks."""
    tb = token_bytes.to(rt.device, torch.int64)
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # nats_bytes, bytes, nats_all, tokens
    for x, y in batches:
        x, y = x.to(rt.device), y.to(rt.device)
        loss = model(x, y, reduction="none").double()          # (B, T), 0 where y == -1
        valid = y >= 0
        nbytes = torch.where(valid, tb[y.clamp(min=0)], 0)
        counted = nbytes > 0
        sums += torch.stack([(loss * counted).sum(), nbytes.sum().double(), (loss * valid).sum(),
                             valid.sum().double()])
    if rt.distributed:
        dist.all_reduce(sums)
    nats_b, nbytes, nats_all, ntok = sums.tolist()
    if nbytes == 0:
        raise ChibiError("the val batches hold no target bytes (empty val set or only special tokens); "
                         "check the corpus val split and --eval-tokens")
    return {"val_bpb": nats_b / (math.log(2) * nbytes), "val_loss": nats_all / ntok,
            "val_tokens": int(ntok), "val_bytes": int(nbytes)}
