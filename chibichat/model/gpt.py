"""The GPT: a small modern decoder in the nanochat family, with attention or SLC2 token mixers.

Architecture: token embedding -> parameter-free RMSNorm -> blocks -> RMSNorm ->
untied lm_head -> logit softcap 15*tanh(z/15). Each block is pre-norm:
    x <- x + mixer(norm(x));  x <- x + MLP(norm(x))
with mixer = causal self-attention (RoPE, QK-norm, GQA, optional sliding window; SDPA, or explicit
matmuls on CPU for short contexts) or SLC2
(chibichat/model/slc2.py), and MLP = W_2 relu(W_1 u)^2 with hidden width 4E. No biases anywhere,
no learned norm gains, so the parameter count is exactly the published one.

Precision and run settings: parameters are fp32 masters; `RunConfig` (given to the constructor) says
how the model computes: the compute dtype of every matmul (weights are cast to it inside forward, so
gradients still land on the masters), activation recomputation, fp8 training projections
(chibichat/model/fp8.py; every projection goes through `project()` for that). The residual stream stays
fp32; logits and the loss are fp32 per chunk only (see `_HeadLossSum`), so no fp32 (B, T, V) tensor is
ever materialised in training.

One forward: `forward(idx, targets)` trains and scores; `forward(idx, state=new_state(...))` prefills and
decodes (per-layer state: KV cache for attention, last k-1 conv inputs for SLC2; per-row positions
for one-token steps). Both run the same blocks; decoding adds only where keys are stored and which
ones each query sees (`_Step`). Generation takes weights laid out once for inference
(model/decode.py) through the same projection calls. Training may wrap the model in
`torch.compile(model, dynamic=False)` (the stage does); decoding runs eagerly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chibichat.common import ChibiError
from chibichat.model.fp8 import check_fp8_dtype, check_fp8_layers, project
from chibichat.model.slc2 import SLC2

LAYOUT_NAMES = ("dense", "iberis")  # named layouts accepted by layer_pattern (for CLI help/choices)

# Rows of the loss are processed in chunks of about this many logits, so
# the loss needs O(chunk * V) memory whatever B*T is. fp32: 8 MiB per temporary.
LOSS_CHUNK_ELEMENTS = 1 << 21

# On CPU, attention over at most this many scores (B * H * t * L) per layer is computed with explicit
# matmuls (faster there for short contexts); longer contexts use SDPA, which never stores the scores.
EXPLICIT_ATTENTION_MAX_SCORES = 1 << 23


# Activation recomputation in training (RunConfig.recompute): which activations are dropped after the
# forward and rebuilt during backward, trading compute for memory. "none" keeps everything; "mlp"
# keeps only the MLP input of each block (drops its norm, 4E-wide hidden and square); "block" keeps
# only each block's input (a second forward of every block in backward). Gradients are unchanged.
RECOMPUTE = ("none", "mlp", "block")


@dataclass(frozen=True)
class RunConfig:
    """How a model computes, chosen by each invocation (--dtype, --recompute, --fp8) and given to its
    constructor: GPT(config, RunConfig(...)). Not part of GPTConfig and never saved with a checkpoint:
    the same weights run in fp32 on a laptop and bf16 + fp8 on an H100 (the stage records its flags in
    meta["flags"]). A --resume may change recompute (the same numbers), not the dtype or fp8: the training loop
    refuses those (meta["precision"]). The defaults are a plain fp32 model.

    compute_dtype: the dtype of every matmul; the fp32 master weights are cast to it inside forward, so
        gradients still land on the masters (chat/serve store the weights in it: engine.prepare_for_inference).
    recompute: activation recomputation in training, one of RECOMPUTE.
    fp8: the block projections of training forwards multiply in fp8 (model/fp8.py); needs bf16, and the
        device check `fp8.check_fp8_runtime` is the stage's (the model is built before it is moved).
    embed_noise: in forwards with autograd on (training), uniform noise of this RMS is added to every normed
        token embedding (RMS 1), drawn from torch's global generator: the idea of NEFTune (Jain et al. 2023,
        arXiv:2310.05914), scaled to the normed embedding instead of by sequence length and width. 0 = off;
        scoring, sampling and decoding never see it.
    """

    compute_dtype: torch.dtype = torch.float32
    recompute: str = "none"
    fp8: bool = False
    embed_noise: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.embed_noise < float("inf"):
            raise ChibiError(f"embed_noise must be a finite number >= 0, got {self.embed_noise!r}")
        if self.recompute not in RECOMPUTE:
            raise ChibiError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if self.fp8:
            check_fp8_dtype(self.compute_dtype)


def layer_pattern(spec: str, n_layer: int) -> str:
    """Mixer per layer as a string of "A" (attention) / "S" (SLC2).

    "dense": all attention. "iberis": attention where layer % 3 == 1 and on the last layer, SLC2
    elsewhere (Saint Iberis placement; d20 -> attention at 1, 4, ..., 19). Anything else must be an
    explicit string of n_layer characters from {A, S}.
    """
    if n_layer < 1:
        raise ChibiError(f"n_layer must be >= 1, got {n_layer}")
    if spec == "dense":
        return "A" * n_layer
    if spec == "iberis":
        return "".join("A" if (i % 3 == 1 or i == n_layer - 1) else "S" for i in range(n_layer))
    pattern = spec.upper()
    if len(pattern) != n_layer or set(pattern) - {"A", "S"}:
        raise ChibiError(
            f"layer layout {spec!r} is not valid for {n_layer} layers: use 'dense', 'iberis', or a string of "
            f"exactly {n_layer} characters from A (attention) and S (SLC2), e.g. {'AS' * (n_layer // 2) + 'A' * (n_layer % 2)!r}"
        )
    return pattern


@dataclass
class GPTConfig:
    """Shape of a model. `layers` accepts "dense"/"iberis" and is stored expanded ("ASSA..")."""

    vocab_size: int
    seq_len: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    layers: str = "dense"
    windows: list[int] | None = field(default=None)  # per layer sliding window in tokens, 0 = full causal
    conv_kernel: int = 3
    softcap: float = 15.0
    rope_base: float = 10000.0

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "n_layer", "n_embd", "n_head", "n_kv_head", "conv_kernel"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ChibiError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ChibiError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}; pick a width that is")
        if self.head_dim % 2:
            raise ChibiError(f"head dim {self.head_dim} (n_embd / n_head) must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise ChibiError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head} (GQA groups)")
        self.layers = layer_pattern(self.layers, self.n_layer)
        if self.windows is None:
            self.windows = [0] * self.n_layer
        # Checked, never converted: int(2.7) would silently run a window of 2.
        if (not isinstance(self.windows, (list, tuple)) or len(self.windows) != self.n_layer
                or any(not isinstance(w, int) or isinstance(w, bool) or w < 0 for w in self.windows)):
            raise ChibiError(f"GPTConfig.windows must be {self.n_layer} non-negative ints (0 = full causal), "
                             f"got {self.windows!r}")
        self.windows = list(self.windows)
        for i, (kind, w) in enumerate(zip(self.layers, self.windows)):
            if kind == "S" and w:
                raise ChibiError(f"layer {i} is SLC2 but has window {w}: windows apply to attention layers only; set 0")
        # An infinite softcap makes every logit NaN (apply_softcap computes inf - inf); a RoPE base <= 1
        # gives no ladder of frequencies (and a negative one NaN angles).
        for name, low in (("softcap", 0.0), ("rope_base", 1.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not low < v < math.inf:
                raise ChibiError(f"GPTConfig.{name} must be a finite number > {low:g}, got {v!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ChibiError(f"model config has unknown keys {sorted(unknown)}: written by a newer chibichat?")
        try:
            return cls(**d)
        except TypeError as e:
            raise ChibiError(f"model config is incomplete ({e}); the checkpoint's meta.json is corrupt") from None


# ----------------------------------------------------------------------------------------------
# Small pieces


NORM_EPS = torch.finfo(torch.float32).eps


class _RMSNorm(torch.autograd.Function):
    """Parameter-free RMSNorm computed in fp32 whatever the input dtype, returning the input dtype.

    Why not F.rms_norm: for a bf16 input it keeps an fp32 copy of the input for backward (measured:
    16 MB of the 124 MB saved per d4 step) and uses eps = finfo(bf16).eps = 0.0078 instead of fp32's,
    so bf16 and fp32 runs would normalise differently. Here only the input itself (shared with the
    caller) and one fp32 scalar per row are kept.
    """

    @staticmethod
    def forward(ctx, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + NORM_EPS)
        ctx.save_for_backward(x, rstd)
        return (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        gf = g.to(rstd.dtype)
        dx = rstd * (gf - xhat * (gf * xhat).mean(dim=-1, keepdim=True))
        return dx.to(x.dtype)


def decoding() -> bool:
    """Whether this forward decodes (runs in inference mode, keeping nothing for a backward). Never inside a
    compiled graph, which only trains (decoding runs eagerly): dynamo cannot trace
    torch.is_inference_mode_enabled() and would break the graph at every call (every norm, MLP, attention)."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def norm(x):
    """Parameter-free RMSNorm over the last dim (fp32 statistics, output in x's dtype). Decoding (run in
    inference mode) uses torch's one fused kernel for the same function; everything else this one, so a
    recomputed (activation-checkpointed) forward runs the very kernels of the first one."""
    if decoding():
        return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)
    return _RMSNorm.apply(x)


def apply_softcap(logits, c: float):
    """c * tanh(logits / c), written as c * (2 * sigmoid(2 logits / c) - 1): a CPU's tanh costs 3-6x a
    sigmoid, and the two agree to a few fp32 ulps (the training loss uses the same form, _head_chunk).
    In place when decoding (inference mode: nothing is kept for a backward)."""
    if decoding():
        return logits.mul_(2.0 / c).sigmoid_().mul_(2.0 * c).sub_(c)
    return torch.sigmoid(logits * (2.0 / c)) * (2.0 * c) - c


def rope_table(length: int, head_dim: int, base: float, device=None):
    """(cos, signed sin) of shape (length, head_dim), fp32, for apply_rope: [cos, cos] and [sin, -sin]
    of the half-split frequencies."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)


def apply_rope(x, cos, sin):
    """Half-split rotation [x1, x2] -> [x1 c + x2 s, x2 c - x1 s], written x * [c, c] + roll(x) * [s, -s]
    (three operations, no split/cat). x: (B, T, H, D); cos/sin (rope_table) broadcastable to (B, T, 1, D)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def linear_init_(w):
    """nanochat OLD init: N(0, s) with s = 1/sqrt(fan_in) * min(1, sqrt(fan_out / fan_in))."""
    fan_out, fan_in = w.shape
    std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
    torch.nn.init.normal_(w, mean=0.0, std=std)


class Projector:
    """`lin(name, x)` = x @ W^T for one block's weights by name (`Block.fused_weights`), straight from
    the fp32 masters: cast (and fused) on every forward, so gradients reach them, and in fp8 when the
    run asks for it (fp8.project). Inference may pass weights laid out once instead (model/decode.py
    `DecodeWeights`): the math calls both the same way."""

    def __init__(self, weights: dict, dtype, fp8: bool):
        self.weights, self.dtype, self.fp8 = weights, dtype, fp8

    def __call__(self, name: str, x):
        return project(x, self.weights[name], self.dtype, self.fp8)


def attention_mask(first: int, t: int, L: int, window: int, pos, device):
    """Which of the keys 0..L-1 each query sees: (mask, causal). Queries are positions first..first+t-1,
    or with `pos` (B,) and t == 1 each row's own position. mask: bool (B|1, 1, t, L), True = visible, or
    None with causal=True (plain causal: SDPA's is_causal) or causal=False (every key visible)."""
    cut = bool(window) and window < L
    if pos is None:
        if not cut and t == 1:
            return None, False
        if not cut and first == 0 and t == L:
            return None, True
        d = (first + torch.arange(t, device=device))[:, None] - torch.arange(L, device=device)  # (t, L)
    else:
        d = (pos[:, None] - torch.arange(L, device=device))[:, None]  # (B, 1, L)
    ok = d >= 0
    if window:
        ok = ok & (d < window)
    return ok.view(-1, 1, t, L), False


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, window: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.window = cfg.n_head, cfg.n_kv_head, cfg.head_dim, window
        E, kv = cfg.n_embd, cfg.n_kv_head * cfg.head_dim
        self.w_q = nn.Parameter(torch.empty(E, E))
        self.w_k = nn.Parameter(torch.empty(kv, E))
        self.w_v = nn.Parameter(torch.empty(kv, E))
        self.w_o = nn.Parameter(torch.empty(E, E))

    @torch.no_grad()
    def reset_parameters(self) -> list:
        for w in (self.w_q, self.w_k, self.w_v):
            linear_init_(w)
        self.w_o.zero_()
        return [self.w_q, self.w_k, self.w_v, self.w_o]

    def matrix_params(self) -> list:
        return [self.w_q, self.w_k, self.w_v, self.w_o]

    def fused_weights(self) -> dict:
        # Fused QKV: one matmul over the concatenated (separately stored, separately Muon'd) weights.
        return {"qkv": torch.cat([self.w_q, self.w_k, self.w_v], dim=0), "o": self.w_o}

    def _attend(self, q, k, v, mask, causal):
        """q: (B, H, t, D); k, v: (B, Hk, L, D); mask/causal as attention_mask returns them."""
        B, H, t, D = q.shape
        Hk, L = k.shape[1], k.shape[2]
        rep = H // Hk
        if q.device.type == "cpu" and B * H * t * L <= EXPLICIT_ATTENTION_MAX_SCORES:
            # Short contexts on CPU: two batched matmuls in the compute dtype with an fp32 softmax
            # between them beat the CPU SDPA kernels (measured ~1.5x on fwd+bwd at T=256, Dh=64,
            # bf16), which are tuned for long sequences. The score tensor is bounded above.
            # The softmax accumulates in fp32 internally but returns the compute dtype, like a flash
            # kernel's P: one (B, H, t, L) tensor is kept for backward, not an fp32 copy as well.
            if causal:
                i = torch.arange(t, device=q.device)
                mask = (i[:, None] >= i[None, :]).view(1, 1, t, L)
            out = q.dtype
            if k.dtype != torch.float32 and decoding():
                # Decoding in reduced precision: the CPU's bf16 batched matmuls are 3-4x slower than
                # fp32 ones at these shapes, so the products run on an exact fp32 upcast.
                q, k, v = q.float(), k.float(), v.float()
            # Query head h = g * rep + r reads K/V head g: queries grouped (B, Hk, rep * t, D), no K/V copy.
            scores = (q.reshape(B, Hk, rep * t, D) * D**-0.5) @ k.transpose(-1, -2)
            if mask is not None:
                scores = scores.view(B, Hk, rep, t, L).masked_fill(~mask[:, :, None], float("-inf")).view(B, Hk, rep * t, L)
            return (torch.softmax(scores, dim=-1) @ v).view(B, H, t, D).to(out)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def forward(self, u, cos, sin, lin, step=None, cache=None):
        """u (B, T, E) normed input; `lin` the block's projections. With `step` (a decoding _Step) the
        new keys/values go into `cache` (k, v) at the rows' positions and the queries attend to it."""
        B, T, E = u.shape
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        qk, v = lin("qkv", u).view(B, T, H + 2 * Hk, D).split([H + Hk, Hk], dim=2)
        q, k = norm(apply_rope(qk, cos, sin)).split([H, Hk], dim=2)  # RoPE and QK-norm: per head, both at once
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if step is None:
            mask, causal = attention_mask(0, T, T, self.window, None, u.device)
        else:
            k, v = step.write(cache, k, v)
            mask, causal = step.mask(self.window)
        y = self._attend(q, k, v, mask, causal)
        return lin("o", y.transpose(1, 2).reshape(B, T, E))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.w_fc = nn.Parameter(torch.empty(4 * n_embd, n_embd))
        self.w_proj = nn.Parameter(torch.empty(n_embd, 4 * n_embd))

    @torch.no_grad()
    def reset_parameters(self) -> list:
        linear_init_(self.w_fc)
        self.w_proj.zero_()
        return [self.w_fc, self.w_proj]

    def forward(self, u, lin):
        h = lin("fc", u)  # decoding (inference mode) works in place: nothing is kept for a backward
        return lin("proj", torch.relu_(h).square_() if decoding() else F.relu(h).square())


def recompute_in_backward(fn, x, *args):
    """fn(x, *args), keeping only the inputs: the activations inside fn are rebuilt during backward
    (activation checkpointing; the gradients are bitwise those of a plain call, tested).

    Eager runs use torch's reentrant checkpoint, called past the torch._disable_dynamo wrapper of
    torch.utils.checkpoint.checkpoint: the non-reentrant form reads torch._dynamo.config and the
    wrapper imports torch._dynamo on first use, and that import alone adds ~70 MB of resident memory
    (measured), a seventh of the 0.5 GB a d4 run aims for; outside torch.compile the wrapper does
    nothing else. The reentrant form needs an input that requires grad (callers only recompute when
    one does) and is used with .backward(), never torch.autograd.grad on its inputs. Under
    torch.compile dynamo is loaded anyway and traces the non-reentrant form natively.
    """
    if torch.compiler.is_compiling():
        return checkpoint(fn, x, *args, use_reentrant=False)
    return getattr(checkpoint, "__wrapped__", checkpoint)(fn, x, *args, use_reentrant=True)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, i: int, fp8: bool = False):
        super().__init__()
        self.index, self.kind, self.fp8 = i, cfg.layers[i], fp8  # fp8: training projections (RunConfig.fp8)
        if self.kind == "A":
            self.mixer = Attention(cfg, cfg.windows[i])
        else:
            self.mixer = SLC2(cfg.n_embd, cfg.n_head, cfg.conv_kernel)
        self.mlp = MLP(cfg.n_embd)

    def fused_weights(self) -> dict:
        """The block's projection weights by the names its math multiplies them under."""
        return {**self.mixer.fused_weights(), "fc": self.mlp.w_fc, "proj": self.mlp.w_proj}

    def forward(self, x, cos, sin, dtype, recompute: str = "none", step=None, lin=None):
        """x (B, T, E) residual stream. step: a decoding _Step (this layer's state is read and replaced
        in step.state); lin: laid-out inference weights, else the masters (Projector)."""
        if lin is None:
            lin = Projector(self.fused_weights(), dtype, self.fp8)
        layer = None if step is None else step.state.layers[self.index]
        u = norm(x)
        if self.kind == "A":
            x = x + self.mixer(u, cos, sin, lin, step, layer)
        else:
            y, history = self.mixer(u, dtype, lin, None if layer is None else layer[0])
            if step is not None:
                step.state.layers[self.index] = (history,)
            x = x + y
        if recompute == "mlp":
            # Only x is kept; norm(x), the 4E-wide hidden and its square are rebuilt in backward.
            return x + recompute_in_backward(lambda x: self.mlp(norm(x), lin), x)
        return x + self.mlp(norm(x), lin)


# ----------------------------------------------------------------------------------------------
# The loss: lm_head + softcap + cross-entropy, chunked over rows.


def _head_chunk(h, w_half, targets, softcap, need_grad):
    """Loss of one chunk of rows, and optionally d(loss sum)/d(r) for it, r = h @ lm_head^T the raw logits.

    The softcapped logit is c * tanh(r / c) = c * (2 * sig - 1) with sig = sigmoid(2r / c): written with
    a sigmoid because on a CPU torch's tanh costs ~6x a sigmoid (measured 5.3 vs 0.85 ms per 2M fp32
    values), and sig also gives the softcap's derivative 1 - tanh^2 = 4 sig (1 - sig) for free.
    h (n, E) and w_half = lm_head * (2 / c) (V, E) are in the compute dtype; sig is fp32.

    Returns (per-row loss (n,) fp32 with 0 on ignored targets, dr (n, V) in h's dtype or None) with
    dr = (softmax - onehot) * 4 sig (1 - sig). A handful of in-place passes over the (n, V) block:
    on a CPU these elementwise passes, not the matmul, are what a head costs beyond its FLOPs.
    """
    c = float(softcap)
    sig = F.linear(h, w_half).float().sigmoid_()
    valid = targets >= 0
    tgt = targets.clamp(min=0)[:, None]
    # logit - c = 2c (sig - 1) lies in [-2c, 0]: with c <= 40, exp of it neither overflows nor underflows
    # to 0 in fp32, and a fixed shift saves the max pass of a generic logsumexp.
    e = torch.sub(sig, 1.0).mul_(2 * c)
    shift = None if c <= 40.0 else e.amax(dim=-1, keepdim=True)
    if shift is not None:
        e.sub_(shift)
    e.exp_()
    s = e.sum(dim=-1)
    # loss = logsumexp(logits) - logit[target] = log(s) + shift + c - c (2 sig_t - 1)
    loss = s.log().add_(2 * c * (1.0 - sig.gather(1, tgt).squeeze(1)))
    if shift is not None:
        loss += shift.squeeze(1)
    loss = torch.where(valid, loss, 0.0)
    if not need_grad:
        return loss, None
    scale = (4.0 * valid / s)[:, None]
    e.mul_(scale)  # 4 * softmax on valid rows, 0 on ignored ones
    e.scatter_add_(1, tgt, -4.0 * valid[:, None].to(e.dtype))
    sig.addcmul_(sig, sig, value=-1.0)  # sig (1 - sig)
    if h.dtype == e.dtype:
        return loss, e.mul_(sig)
    return loss, torch.mul(e, sig, out=torch.empty_like(e, dtype=h.dtype))  # product written in h's dtype


class _HeadLossSum(torch.autograd.Function):
    """Sum of token losses over valid targets, with the gradient computed chunk by chunk in forward.

    Backpropagating through a plain chunked loss would keep every chunk's logits alive until backward
    (= the full (N, V) tensor). Instead each chunk's d(loss)/d(logits) is folded straight into
    d/dh and d/dW and dropped, so memory stays at one chunk; backward only scales by the incoming
    (scalar) gradient. Same FLOPs as an unfused head: one forward and two backward matmuls.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, dtype, chunk):
        w_half = (weight * (2.0 / softcap)).to(dtype)  # scale the (V, E) weight, not the (n, V) logits
        w = weight.to(dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need = need_h or need_w
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk]
            loss, dz = _head_chunk(hc, w_half, targets[s : s + chunk], softcap, need)
            total = total + loss.sum()
            if need:
                if need_h:
                    torch.mm(dz, w, out=grad_h[s : s + chunk])
                if need_w:
                    grad_w += dz.t() @ hc  # fp32 accumulator += compute-dtype product (promoting add)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * g.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * g if grad_w is not None else None,
            None,
            None,
            None,
            None,
        )


def _per_token_loss(h, weight, targets, softcap, dtype, chunk):
    """(N,) losses, 0 on ignored targets. With grad, each chunk is recomputed in backward (checkpoint),
    because a per-token upstream gradient cannot be folded in ahead of time."""
    def one(hc, wt, tc):
        return _head_chunk(hc, (wt * (2.0 / softcap)).to(dtype), tc, softcap, need_grad=False)[0]

    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    outs = []
    for s in range(0, h.shape[0], chunk):
        args = (h[s : s + chunk], weight, targets[s : s + chunk])
        outs.append(recompute_in_backward(one, *args) if grad else one(*args))
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------
# Inference state


class InferenceState:
    """Per-row decoding state: `pos` (B,) tokens consumed per row, and per layer a tuple of tensors
    with the batch in dim 0: (k_cache, v_cache) each (B, n_kv_head, max_len, head_dim) for attention,
    (history,) of shape (B, k-1, E) (the last k-1 conv inputs) for SLC2. All in the compute dtype.
    `lengths` mirrors `pos` as a host list, so decoders know every row's length without a device sync.

    `GPT.forward(..., state=)` mutates a state in place; `clone`, `expand`, `select` and `stack` return new ones.
    """

    def __init__(self, pos, max_len: int, layers: list, lengths: list[int] | None = None):
        self.pos = pos
        self.max_len = max_len
        self.layers = layers
        self.lengths = pos.tolist() if lengths is None else list(lengths)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def _map(self, fn, lengths) -> "InferenceState":
        return InferenceState(fn(self.pos), self.max_len, [tuple(fn(t) for t in layer) for layer in self.layers], lengths)

    def clone(self) -> "InferenceState":
        return self._map(lambda t: t.clone(), self.lengths)

    def expand(self, n: int) -> "InferenceState":
        """Batch-1 state (e.g. after a prefill) -> n independent rows (e.g. n samples)."""
        if self.batch_size != 1:
            raise ChibiError(f"expand needs a batch-1 state, this one has {self.batch_size} rows; use select/stack")
        if n < 1:
            raise ChibiError(f"expand(n) needs n >= 1, got {n}")
        return self._map(lambda t: t.expand(n, *t.shape[1:]).clone(), self.lengths * n)

    def select(self, rows) -> "InferenceState":
        """Keep the given rows (list of ints or LongTensor), in that order."""
        keep = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        keep = [int(r) for r in (keep if isinstance(keep, list) else [keep])]
        if not keep or min(keep) < 0 or max(keep) >= self.batch_size:
            raise ChibiError(f"select rows {keep} out of range for a state of {self.batch_size} rows")
        idx = torch.tensor(keep, dtype=torch.long, device=self.pos.device)
        return self._map(lambda t: t.index_select(0, idx), [self.lengths[r] for r in keep])

    def head(self, n: int, lengths: list[int]) -> "InferenceState":
        """A view of rows 0..n-1 sharing storage: a forward over it writes those rows' KV caches in place;
        SLC2 histories it replaces with new tensors, which `keep_histories` copies back."""
        return InferenceState(self.pos[:n], self.max_len, [tuple(t[:n] for t in layer) for layer in self.layers],
                              lengths)

    def keep_histories(self, view: "InferenceState") -> None:
        """Copy the SLC2 histories a forward over `view` (= self.head(n, ...)) produced into rows 0..n-1."""
        n = view.batch_size
        for mine, theirs in zip(self.layers, view.layers):
            if len(mine) == 1:
                mine[0][:n].copy_(theirs[0])

    def copy_row(self, dst: int, src: "InferenceState", row: int, length: int) -> None:
        """Row `row` of `src` (its first `length` positions) into row `dst` of this state, in place, with
        its position counter. The host `lengths` are the caller's to keep."""
        for mine, theirs in zip(self.layers, src.layers):
            for d, s_ in zip(mine, theirs):
                if d.dim() == 4:  # attention cache (rows, kv heads, positions, head dim)
                    d[dst, :, :length].copy_(s_[row, :, :length])
                else:  # SLC2 history
                    d[dst].copy_(s_[row])
        self.pos[dst] = src.pos[row]

    @staticmethod
    def stack(states: list["InferenceState"]) -> "InferenceState":
        """Merge states (e.g. batch-1 prefills of different lengths) into one batch, rows in order."""
        if not states:
            raise ChibiError("InferenceState.stack needs at least one state")
        first = states[0]
        for s in states[1:]:
            if s.max_len != first.max_len or len(s.layers) != len(first.layers):
                raise ChibiError(
                    f"cannot stack states of different models or max_len ({s.max_len} vs {first.max_len}); "
                    "create them all with the same model.new_state(..., max_len)"
                )
        layers = [tuple(torch.cat(ts, dim=0) for ts in zip(*group)) for group in zip(*(s.layers for s in states))]
        lengths = [n for s in states for n in s.lengths]
        return InferenceState(torch.cat([s.pos for s in states]), first.max_len, layers, lengths)


# ----------------------------------------------------------------------------------------------
# The model


def empty_state(cfg: GPTConfig, batch_size: int, max_len: int, dtype, device) -> InferenceState:
    """Zeroed per-layer decoding state: preallocated (K, V) caches of `max_len` positions for attention
    layers, the last k-1 inputs for SLC2 layers."""
    if batch_size < 1 or max_len < 1:
        raise ChibiError(f"new_state needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
    layers = []
    for kind in cfg.layers:
        if kind == "A":
            shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
            layers.append((torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)))
        else:
            layers.append((torch.zeros(batch_size, cfg.conv_kernel - 1, cfg.n_embd, dtype=dtype, device=device),))
    return InferenceState(torch.zeros(batch_size, dtype=torch.long, device=device), max_len, layers, [0] * batch_size)


class _Step:
    """One forward over a decoding state: where the new tokens go and what they see.

    Every row's length is known on the host (`state.lengths`), so nothing here syncs the device. When
    all rows are at one position (batch 1, a fresh batch of equal prompts) positions are slices and a
    one-token step needs no mask at all; otherwise (t == 1, per-row positions) one mask per distinct
    window is built per step and shared by every layer."""

    def __init__(self, model, idx, state: InferenceState):
        B, t = idx.shape
        if B != len(state.lengths):
            raise ChibiError(f"forward with a state got {B} rows for a state of {len(state.lengths)} rows")
        if len(state.layers) != model.config.n_layer:
            raise ChibiError("inference state was made by a different model (layer count differs)")
        lengths = state.lengths
        first, longest = lengths[0], max(lengths)
        uniform = min(lengths) == longest
        if t > 1 and not uniform:
            raise ChibiError(
                "decoding several tokens per row needs all rows at the same position; "
                "prefill rows one by one (batch 1) and merge with InferenceState.stack, then decode 1 token at a time"
            )
        if longest + t > state.max_len:
            raise ChibiError(
                f"decoding would reach {longest + t} tokens, past the state's max_len={state.max_len}; "
                "allocate a larger state or stop generating earlier"
            )
        model._ensure_rope(state.max_len)
        self.state, self.first, self.t, self.L = state, first, t, longest + t
        self.pos = None if uniform else state.pos
        if uniform:
            self.cos, self.sin = model.rope_cos[None, first : first + t, None], model.rope_sin[None, first : first + t, None]
        else:
            self.cos, self.sin = model.rope_cos[state.pos][:, None, None], model.rope_sin[state.pos][:, None, None]
        self.masks: dict[int, tuple] = {}

    def mask(self, window: int):
        if window not in self.masks:
            self.masks[window] = attention_mask(self.first, self.t, self.L, window, self.pos, self.cos.device)
        return self.masks[window]

    def write(self, cache, k, v):
        """Store the new k, v (B, Hk, t, D) at the rows' positions; the keys/values to attend (B, Hk, L, D)."""
        ck, cv = cache
        if self.pos is None:
            ck[:, :, self.first : self.first + self.t] = k  # copies, rounding to the cache's dtype
            cv[:, :, self.first : self.first + self.t] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)
            ck[rows, :, self.pos] = k[:, :, 0].to(ck.dtype)  # index_put does not cast, copy_ does
            cv[rows, :, self.pos] = v[:, :, 0].to(cv.dtype)
        return ck[:, :, : self.L], cv[:, :, : self.L]

    def advance(self) -> None:
        self.state.pos = self.state.pos + self.t
        self.state.lengths = [n + self.t for n in self.state.lengths]


class GPT(nn.Module):
    """See the module docstring. Public API (docs/architecture.md "Model"):

    GPT(config, run=RunConfig()); forward(idx, targets=None, reduction="mean", state=None, *, weights=None,
    last_only=False, check_ids=True), new_state(batch_size, max_len), num_params(), flops_per_token(),
    param_groups(); `run` (how it computes) and `compute_dtype` (= run.compute_dtype).
    """

    def __init__(self, config: GPTConfig, run: RunConfig | None = None):
        super().__init__()
        self.config = config
        self.run = run = run or RunConfig()
        E, V = config.n_embd, config.vocab_size
        self.wte = nn.Parameter(torch.empty(V, E))
        self.blocks = nn.ModuleList([Block(config, i, run.fp8) for i in range(config.n_layer)])
        self.lm_head = nn.Parameter(torch.empty(V, E))
        cos, sin = rope_table(config.seq_len, config.head_dim, config.rope_base, device=self.wte.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if run.fp8:
            check_fp8_layers(self)
        self.init_weights()

    @property
    def compute_dtype(self):
        return self.run.compute_dtype

    @torch.no_grad()
    def init_weights(self) -> None:
        """Explicitly initialise every parameter, and check that none was missed (the
        uninitialised conv of Saint Iberis)."""
        torch.nn.init.normal_(self.wte, mean=0.0, std=1.0)
        self.lm_head.zero_()  # nanochat OLD: a zero head starts at the uniform distribution
        done = [self.wte, self.lm_head]
        for block in self.blocks:
            if block.kind == "A":
                done += block.mixer.reset_parameters()
            else:
                done += block.mixer.reset_parameters(linear_init_)
            done += block.mlp.reset_parameters()
        seen = {id(p) for p in done}
        missed = [n for n, p in self.named_parameters() if id(p) not in seen]
        assert not missed, f"init_weights skipped {missed}"

    # -- bookkeeping ------------------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward).

        6 per parameter for every parameter used as a matmul/conv weight (all but the embedding table,
        which is a lookup), plus attention scores and values, 12 * n_head * head_dim * span per
        attention layer with span = min(window, seq_len) (nanochat convention, not halved for causality).
        SLC2 layers are charged only for what they compute: their projections and conv taps, no attention.
        """
        cfg = self.config
        flops = 6 * (self.num_params() - self.wte.numel())
        for kind, w in zip(cfg.layers, cfg.windows):
            if kind == "A":
                span = min(w, cfg.seq_len) if w else cfg.seq_len
                flops += 12 * cfg.n_head * cfg.head_dim * span
        return float(flops)

    def param_groups(self) -> dict:
        """Parameters by optimizer role; every parameter appears exactly once.

        "matrix": 2-D weights inside blocks (attention q/k/v/o, MLP, SLC2 x/b/alpha/A/o) -> Muon;
        "embedding": [wte]; "head": [lm_head]; "other": SLC2 conv taps (E, 1, k) -> AdamW.
        """
        groups = {"matrix": [], "embedding": [self.wte], "head": [self.lm_head], "other": []}
        for block in self.blocks:
            groups["matrix"] += block.mixer.matrix_params()
            groups["matrix"] += [block.mlp.w_fc, block.mlp.w_proj]
            if block.kind == "S":
                groups["other"].append(block.mixer.conv)
        return groups

    def _ensure_rope(self, length: int) -> None:
        """Grow the RoPE table to cover positions < length (inference past seq_len). Made outside any
        inference mode: an inference tensor in the table could not be saved for a later backward."""
        if self.rope_cos.shape[0] < length:
            with torch.inference_mode(False):
                cos, sin = rope_table(length, self.config.head_dim, self.config.rope_base, device=self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos, sin

    def _check_ids(self, idx, what: str, sync: bool = True) -> None:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ChibiError(f"{what} must be a (B, T) LongTensor, got {tuple(idx.shape)} {idx.dtype}")
        if sync and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ChibiError(
                f"{what} has token ids outside [0, {self.config.vocab_size}): tokenizer and model vocab do not match"
            )

    def _check_batch(self, idx, targets, reduction) -> None:
        """Token-id and target ranges, read back in one host sync (it stalls a GPU queue once, not 5x)."""
        self._check_ids(idx, "input", sync=False)
        if not idx.numel():
            return
        stats = [idx.min(), idx.max()]
        if targets is not None:
            stats += [targets.min(), targets.max(), (targets >= 0).sum()]
        vals = torch.stack([v.to(torch.long) for v in stats]).tolist()
        V = self.config.vocab_size
        if vals[0] < 0 or vals[1] >= V:
            raise ChibiError(f"input has token ids outside [0, {V}): tokenizer and model vocab do not match")
        if targets is not None:
            if vals[2] < -1 or vals[3] >= V:
                raise ChibiError(f"targets must be in [0, {V}) or -1 (ignore), got range [{vals[2]}, {vals[3]}]")
            if reduction == "mean" and vals[4] == 0:
                raise ChibiError("every target is -1 (ignored): a mean loss over zero tokens is undefined")

    # -- the forward --------------------------------------------------------------------------

    def forward(self, idx, targets=None, reduction: str = "mean", state: InferenceState | None = None, *,
                weights=None, last_only: bool = False, check_ids: bool = True):
        """idx (B, T) token ids. The one forward of training, scoring, prefill and decoding.

        Without `state` (T <= seq_len): targets None -> logits (B, T, V) fp32, softcapped; targets (B, T)
        with -1 = ignore -> loss: "mean" over valid targets (scalar), "sum" (scalar), or "none" -> (B, T)
        per-token losses with 0 where the target is -1.
        With `state` (from new_state): the T new tokens of each row continue it; returns their logits and
        advances the state in place, in inference mode (no autograd). T > 1 (prefill) needs every row at the same
        position; T == 1 works with per-row positions. ChibiError if a row would pass state.max_len.
        weights: inference layouts of the weights (model/decode.py DecodeWeights) instead of the masters;
        last_only: logits of the last position only (B, 1, V); both are for logits, refused with targets.
        check_ids=False skips the token-range check (a host sync) for ids the caller made itself.
        """
        if state is not None:
            self._check_ids(idx, "input", sync=check_ids)
        if state is not None and not decoding():
            with torch.inference_mode():
                return self.forward(idx, targets, reduction, state, weights=weights, last_only=last_only,
                                    check_ids=False)  # fmt: skip
        B, T = idx.shape
        cfg, dtype = self.config, self.compute_dtype
        step = None
        if state is None:
            if reduction not in ("mean", "sum", "none"):
                raise ChibiError(f"reduction must be mean, sum or none, got {reduction!r}")
            if T > cfg.seq_len:
                raise ChibiError(f"input of {T} tokens exceeds the model context seq_len={cfg.seq_len}; crop or split it")
            if targets is not None and targets.shape != idx.shape:
                raise ChibiError(f"targets shape {tuple(targets.shape)} != input shape {tuple(idx.shape)}")
            # A loss is over every position and through the master weights (its head is self.lm_head).
            if targets is not None and (weights is not None or last_only):
                raise ChibiError("a forward with targets computes the loss over every position with the model's own "
                                 "weights; drop weights= and last_only=, which are for logits")
            if check_ids and not torch.compiler.is_compiling():  # data-dependent checks would break a compiled graph
                self._check_batch(idx, targets, reduction)
            cos, sin = self.rope_cos[None, :T, None, :], self.rope_sin[None, :T, None, :]
        else:
            if targets is not None:
                raise ChibiError("a forward with a state returns logits; compute a loss with a plain forward")
            step = _Step(self, idx, state)
            cos, sin = step.cos, step.sin
        cos, sin = cos.to(dtype), sin.to(dtype)
        # The residual stream is fp32 whatever the compute dtype (and however the weights are stored).
        x = norm(F.embedding(idx, self.wte).float())
        if self.run.embed_noise and state is None and torch.is_grad_enabled():
            # uniform on [-a, a] has RMS a / sqrt(3)
            x = x + (torch.rand_like(x) * 2 - 1) * (self.run.embed_noise * math.sqrt(3))
        recompute = self.run.recompute if torch.is_grad_enabled() else "none"
        for i, block in enumerate(self.blocks):
            if recompute == "block":
                # Only each block's input is kept; everything inside is rebuilt during backward.
                x = recompute_in_backward(block, x, cos, sin, dtype)
            else:
                x = block(x, cos, sin, dtype, recompute, step, None if weights is None else weights.blocks[i])
        if step is not None:
            step.advance()
        if last_only:
            x = x[:, -1:]
        h = norm(x).to(dtype)
        if targets is None:
            logits = weights.head(h) if weights is not None else F.linear(h, self.lm_head.to(dtype))
            return apply_softcap(logits.float(), cfg.softcap)

        flat_t = targets.reshape(-1)
        chunk = max(1, LOSS_CHUNK_ELEMENTS // cfg.vocab_size)
        h = h.reshape(B * T, -1)
        if reduction == "none":
            return _per_token_loss(h, self.lm_head, flat_t, cfg.softcap, dtype, chunk).view(B, T)
        total = _HeadLossSum.apply(h, self.lm_head, flat_t, cfg.softcap, dtype, chunk)
        if reduction == "sum":
            return total
        return total / (flat_t >= 0).sum()

    def new_state(self, batch_size: int, max_len: int) -> InferenceState:
        """Fresh state for `batch_size` rows of up to `max_len` tokens each (KV caches preallocated,
        in the compute dtype); max_len may exceed seq_len (the RoPE table grows)."""
        state = empty_state(self.config, batch_size, max_len, self.compute_dtype, self.wte.device)  # validates first
        self._ensure_rope(max_len)
        return state
