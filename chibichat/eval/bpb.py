"""Bits per byte: a loss that does not depend on the tokenizer.

    bpb = Σ nats over targets whose token has > 0 bytes  /  (ln 2 · Σ bytes of those targets)

Special tokens (0 bytes) and ignored targets (-1) drop out of both sums, so two models with different
vocabularies are compared on the same bytes of text. `val_loss` (mean nats per valid target token)
comes along for free.

Distributed: rank r of W holds micro-batches r, r+W, r+2W, ... of one slice (eval.base.val_batches).
Each micro-batch's sums are taken in float64, gathered to every rank and added up in slice order, so
the result is bitwise the one a single process gets on the same slice (given the same per-batch
forward), whatever W is.
"""

from __future__ import annotations

import math

import torch

from chibichat.common import ChibiError, Runtime, gather_objects


def strided_sums(rt: Runtime, mine: list[list[float]], width: int) -> list[float]:
    """Column sums of per-batch rows over every rank, where rank r of W holds the rows of batches r, r+W,
    r+2W, ... of one sequence: the rows are gathered and added in sequence order in float64 (Python
    floats), so the sums are bitwise those of one process holding every row, for any W."""
    parts = gather_objects(rt, mine)
    # Sequence position i lives on rank i % W at local position i // W.
    ordered = [parts[i % rt.world_size][i // rt.world_size] for i in range(sum(len(p) for p in parts))]
    sums = [0.0] * width
    for row in ordered:
        sums = [a + b for a, b in zip(sums, row)]
    return sums


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor, rt: Runtime) -> dict:
    """Score every (inputs, targets) batch in `batches` (an iterable, already limited to the val
    budget; under torchrun this rank's strided share of the slice). Returns {"val_bpb", "val_loss",
    "val_tokens", "val_bytes"} over all ranks."""
    tb = token_bytes.to(rt.device, torch.int64)
    mine: list[list[float]] = []  # per micro-batch: nats_bytes, bytes, nats_all, tokens
    for x, y in batches:
        x, y = x.to(rt.device), y.to(rt.device)
        loss = model(x, y, reduction="none").double()          # (B, T), 0 where y == -1
        valid = y >= 0
        nbytes = torch.where(valid, tb[y.clamp(min=0)], 0)
        counted = nbytes > 0
        mine.append(torch.stack([(loss * counted).sum(), nbytes.sum().double(), (loss * valid).sum(),
                                 valid.sum().double()]).tolist())
    nats_b, nbytes, nats_all, ntok = strided_sums(rt, mine, 4)
    if nbytes == 0:
        raise ChibiError("the val batches hold no target bytes (empty val set or only special tokens); "
                         "check the corpus val split and --eval-tokens")
    return {"val_bpb": nats_b / (math.log(2) * nbytes), "val_loss": nats_all / ntok,
            "val_tokens": int(ntok), "val_bytes": int(nbytes)}
