"""Generation's view of a model: the GPT's own forward with a state, over weights laid out once.

The model's math lives in gpt.py only. What decoding adds is a layout: on a small model one decode step
is ~10 MFLOP, so its time goes to dispatching small operations and streaming the weights through the
cache once per step, not to arithmetic. A training forward concatenates the fused QKV / SLC2 input
weights and casts every weight to the compute dtype on every call (the masters may change between
calls); `DecodeWeights` does that once, and on CPU stores each projection the way it multiplies
fastest (see _Proj). `GPT.forward(..., weights=DecodeWeights(model))` multiplies through these
copies by the same names it otherwise takes from the masters.

The copies are taken when DecodeWeights is built: after the model's weights change (RL updates),
build new ones (`matches`). Memory: tensors already in the compute dtype are shared with the model,
not copied; the copies are the fused weights and, on CPU, one oneDNN-packed copy of every projection
plus, in fp32, the transposed wide weights for one-row steps. `extra_bytes` counts them (bench infer
reports it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chibichat.model.gpt import GPT


def weights_fingerprint(model) -> tuple:
    """Identity of the model's current weights: storage and in-place version of every parameter.
    An optimizer step bumps the versions, so weights laid out before it no longer match."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters()) + (model.compute_dtype,)


def _packed_linear_works(dtype) -> bool:
    """Whether oneDNN's pre-packed linear (the kernels torch.compile's CPU backend uses) is available
    here and computes F.linear; checked once per layout, so a torch without it falls back."""
    try:
        w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), None, "none", [], "")
        return torch.allclose(got.float(), F.linear(x, w).float(), atol=1e-2)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class _Proj:
    """y = x W^T for an (out, in) weight W, stored the way this device multiplies it fastest.

    Measured on this project's 2-core CPU with the weights read from memory (as in a decode step,
    where the whole model passes through the cache once):
    - fp32: MKL's x (in, out) product beats F.linear's x (out, in)^T by 1.8-2.7x when out > in (QKV,
      MLP up-projection, the head at E=256) and loses when out < in (MLP down-projection), so only wide
      weights are stored transposed (a copy);
    - bf16: F.linear re-lays the weight out for oneDNN on every call; a weight packed once for oneDNN
      is 1.3-1.8x faster (e.g. the 8192 x 256 head: 377 vs 578 us) with identical results;
    - fp32 with several rows (batched decode, prefill): the packed oneDNN weight beats both MKL forms
      (head at 8 rows: 741 vs 1298 us), but loses at one row (884 vs 397 us), so fp32 keeps both a
      one-row layout and a packed copy (one more copy of the model, for up to 1.8x at batch 8).
    """

    def __init__(self, w, dtype, packed: bool):
        w = w.detach().to(dtype)
        cpu = w.device.type == "cpu"
        self.packed = None  # used when x has more than one row
        if cpu and packed:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 8)
        self.kind = "linear"  # the one-row layout
        if cpu and dtype == torch.bfloat16 and packed:
            self.kind, self.w = "packed", self.packed
        elif cpu and dtype == torch.float32 and w.shape[0] > w.shape[1]:
            self.kind, self.w = "transposed", w.t().contiguous()
        else:
            self.w = w.contiguous()

    def __call__(self, x):
        if x.dtype != self.w.dtype:
            x = x.to(self.w.dtype)
        if self.packed is not None and (self.kind == "packed" or x.numel() > x.shape[-1]):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        if self.kind == "transposed":
            return torch.matmul(x, self.w)
        return F.linear(x, self.w)


class _Block:
    """One block's projections as `lin(name, x)`, the call gpt.Projector answers for training."""

    def __init__(self, projs: dict):
        self.projs = projs

    def __call__(self, name: str, x):
        return self.projs[name](x)


class DecodeWeights:
    """A GPT's projection weights laid out once for inference: `blocks[i]` answers block i's
    projections, `head(h)` the lm head. Pass as GPT.forward(..., weights=)."""

    @torch.no_grad()
    def __init__(self, model):
        dt = model.compute_dtype
        self.fingerprint = weights_fingerprint(model)
        packed = dt in (torch.bfloat16, torch.float32) and model.wte.device.type == "cpu" and _packed_linear_works(dt)
        self.head = _Proj(model.lm_head, dt, packed)
        self.blocks = [_Block({k: _Proj(w, dt, packed) for k, w in b.fused_weights().items()}) for b in model.blocks]

    def matches(self, model) -> bool:
        """True while the model's weights (and compute dtype) are those copied here. Detects any in-place
        update made through torch ops (optimizer steps, load_state_dict, copy_ under no_grad); writes
        through `param.data` bypass version counters and are not seen."""
        return weights_fingerprint(model) == self.fingerprint

    def extra_bytes(self, model) -> int:
        """Bytes of the weight copies held here beyond the model's own tensors."""
        own = {p.data_ptr() for p in model.parameters()}
        tensors = []
        for p in [self.head] + [p for b in self.blocks for p in b.projs.values()]:
            tensors += [p.w] + ([p.packed] if p.packed is not None and p.packed is not p.w else [])
        # packed (oneDNN) weights have no plain storage: always copies
        return sum(t.numel() * t.element_size() for t in tensors if t.is_mkldnn or t.data_ptr() not in own)


class Decoder:
    """What the Engine decodes with: `new_state(B, max_len)` and `forward(idx, state, last_only, check_ids)`
    = the model's forward with a state, over DecodeWeights for a GPT (anything else with
    `new_state` and `forward(idx, state=..., **options)`, e.g. a test double, is called as it is)."""

    def __init__(self, model):
        self.model = model
        inner = getattr(model, "_orig_mod", model)  # behind a torch.compile wrapper: the eager module
        self.weights = DecodeWeights(inner) if isinstance(inner, GPT) else None

    def matches(self, model) -> bool:
        return model is self.model and (self.weights is None or self.weights.matches(model))

    def extra_bytes(self, model) -> int:
        return 0 if self.weights is None else self.weights.extra_bytes(model)

    def new_state(self, batch_size: int, max_len: int):
        return self.model.new_state(batch_size, max_len)

    @torch.inference_mode()
    def forward(self, idx, state, last_only: bool = False, check_ids: bool = True):
        """Logits (B, t, V) fp32 of idx (B, t) fed to `state` (advanced in place), or (B, 1, V) with
        last_only; GPT.forward's contract and errors."""
        inner = getattr(self.model, "_orig_mod", self.model)
        return inner(idx, state=state, weights=self.weights, last_only=last_only, check_ids=check_ids)
