"""Opt-in fp8 training matmuls for the block projections (`--fp8`).

What runs in fp8: the attention q/k/v/o, MLP up/down and SLC2 input/output projections, in forwards
that record autograd (training). Not the embedding lookup, not the lm head (its logits feed a softcap
and the loss, where fp8's 3-bit mantissa costs the most), and not no-grad forwards: val bpb, samples and
decoding run in the compute dtype, so `eval base` on a checkpoint reproduces the val bpb logged while
training, and decoding never sees fp8.

One projection y = x W^T (x (..., K), W (N, K) an fp32 master):
  forward   x and W are cast to float8_e4m3fn, each with a dynamic per-tensor scale
            s = fp8_max / amax (fp32; s = 1 for an all-zero tensor), and multiplied by torch._scaled_mm
            with the inverse scales, output in the compute dtype (bf16).
  backward  grad_output g is cast to float8_e5m2 (wider range, 2-bit mantissa: gradients span more
            decades than activations) with its own dynamic scale;
            grad_x = g W  and  grad_W = g^T x  are _scaled_mm products of the saved fp8 x and W.
            grad_W is returned in fp32 (the master's dtype), so the optimizer sees fp32 params and grads.
Only the fp8 copies of x and W are saved for backward (1 byte per value instead of 2).

torch._scaled_mm's rules on CUDA (checked here on every device, so CPU tests cover the GPU's layouts):
the first operand row-major, the second column-major, its two dims multiples of 16, fp32 scalar scales,
and not e5m2 x e5m2. The model's feature counts are checked once by `check_fp8_layers` (GPT's constructor) (ChibiError naming the
layer); out-features that are not a multiple of 16 (SLC2's fused input projection has 2E + H + Dh rows)
are zero-padded, which is exact; a token count that is not a multiple of 16 makes grad_W fall back to a
bf16 matmul (see `_Fp8Linear.backward`).

On CPU the fp8 product is an fp32 matmul of the upcast operands (see `scaled_mm`): there are no fp8
units, so it exists to test the numerics. It is meant for H100-class GPUs (SM 8.9+).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chibichat.common import ChibiError

E4M3 = torch.float8_e4m3fn  # activations and weights: 4 exponent bits, 3 mantissa bits, max 448
E5M2 = torch.float8_e5m2  # gradients: 5 exponent bits, 2 mantissa bits, max 57344
ALIGN = 16  # _scaled_mm: both dims of the second operand multiples of 16 (CUDA)
MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with fp8 tensor cores


def fp8_scale(t: torch.Tensor, fp8_dtype) -> torch.Tensor:
    """Per-tensor scale s (fp32 scalar) so that t * s spans the fp8 range: fp8_max / amax(|t|).

    An all-zero tensor gets s = 1 (amax = 0 would divide by zero; any s maps zeros to zeros)."""
    amax = t.detach().abs().amax().float()
    fmax = torch.finfo(fp8_dtype).max
    return torch.where(amax > 0, fmax / amax, torch.ones_like(amax))


def to_fp8(t: torch.Tensor, fp8_dtype):
    """(t * s cast to fp8, 1 / s): the fp8 tensor and the fp32 scale that undoes its scaling.

    The product is clamped to +-fp8_max first: fp32 rounding can push amax * s a hair past the max, and
    float8_e4m3fn has no infinity (an out-of-range cast gives NaN on CUDA)."""
    s = fp8_scale(t, fp8_dtype)
    fmax = torch.finfo(fp8_dtype).max
    return (t.float() * s).clamp_(-fmax, fmax).to(fp8_dtype), s.reciprocal()


def scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """torch._scaled_mm with its CUDA layout rules asserted, so a CPU run cannot pass a layout the GPU
    would refuse: a (M, K) row-major, b (K, N) column-major, K and N multiples of 16."""
    assert a.stride(-1) == 1 and b.stride(0) == 1, "fp8 matmul layout: a row-major, b column-major"
    assert a.shape[1] % ALIGN == 0 and b.shape[1] % ALIGN == 0, f"fp8 matmul dims {tuple(a.shape)} x {tuple(b.shape)}"
    if a.device.type == "cpu":
        # torch 2.13's CPU _scaled_mm has no fast kernel for e4m3 x e4m3 (hundreds of times slower than its
        # e5m2 x e4m3 path at the same sizes). The same product, computed directly: a product of two fp8
        # values (at most 4 significant bits each) is exact in fp32, so the fp32 matmul of the upcast
        # operands, scaled and cast once, differs from _scaled_mm only in summation order.
        return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)
    return torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=out_dtype)


def _col_major(t):
    """The same (rows, cols) matrix stored column-major (one copy of an fp8 tensor: 1 byte per value)."""
    return t.t().contiguous().t()


def _pad_rows(t, multiple):
    pad = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, pad)) if pad else t


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T with fp8 operands; see the module docstring."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        K, N = x.shape[-1], w.shape[0]
        x2 = x.reshape(-1, K)
        x8, x_inv = to_fp8(x2, E4M3)
        # Zero rows padding W to a multiple of 16 give zero output columns, sliced off below: exact.
        w8, w_inv = to_fp8(_pad_rows(w, ALIGN), E4M3)
        y = scaled_mm(x8, w8.t(), x_inv, w_inv, out_dtype)[:, :N]
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.meta = (x.shape, x.dtype, w.dtype, N, out_dtype)
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, g):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, N, out_dtype = ctx.meta
        g2 = g.reshape(-1, N)
        M, N16 = g2.shape[0], w8.shape[0]
        # g padded with zero columns to W's padded rows (exact: they meet W's zero rows).
        g8, g_inv = to_fp8(F.pad(g2, (0, N16 - N)) if N16 != N else g2, E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # (M, N16) e5m2 row-major x (N16, K) e4m3 column-major -> (M, K)
            grad_x = scaled_mm(g8, _col_major(w8), g_inv, w_inv, out_dtype).reshape(x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            if M % ALIGN == 0:
                # (N, M) e5m2 row-major x (M, K) e4m3 column-major -> (N, K), accumulated and returned in fp32
                grad_w = scaled_mm(g8[:, :N].t().contiguous(), _col_major(x8), g_inv, x_inv, torch.float32)
            else:
                # bf16 fallback: M (tokens in this micro-batch) is the contraction dim here, and _scaled_mm
                # needs it to be a multiple of 16 on CUDA. Odd M happens only with odd batch shapes (e.g. RL
                # rows cut to the longest rollout). The saved fp8 x is dequantised in fp32 (one rounding to
                # bf16 at the end) and g is used unquantised.
                xd = (x8.float() * x_inv).to(out_dtype)
                grad_w = (g2.to(out_dtype).t() @ xd).float()
            grad_w = grad_w.to(w_dtype)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, out_dtype=torch.bfloat16) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T in fp8, output in `out_dtype`; differentiable in x and w.
    K must be a multiple of 16 (check_fp8_layers checks the model's layers by name)."""
    if x.shape[-1] % ALIGN:
        raise ChibiError(f"fp8 matmul needs the input features ({x.shape[-1]}) to be a multiple of {ALIGN}")
    return _Fp8Linear.apply(x, w, out_dtype)


def project(x: torch.Tensor, w: torch.Tensor, dtype, fp8: bool) -> torch.Tensor:
    """The block projections' matmul: x @ w^T in the compute dtype, or in fp8 when this layer has fp8 on
    and the forward records autograd (training). No-grad forwards (evaluation, decoding) stay in `dtype`."""
    if fp8 and torch.is_grad_enabled():
        return fp8_linear(x, w, dtype)
    return F.linear(x.to(dtype), w.to(dtype))


# ----------------------------------------------------------------------------------------------
# Checks for a model built with RunConfig(fp8=True) (the stages' --fp8)


def check_fp8_dtype(compute_dtype) -> None:
    """ChibiError unless the compute dtype is bf16 (fp8 matmuls return bf16 activations)."""
    if compute_dtype != torch.bfloat16:
        raise ChibiError(f"--fp8 needs the bfloat16 compute dtype (fp8 matmuls return bf16 activations), but "
                         f"the compute dtype is {str(compute_dtype).replace('torch.', '')}; pass --dtype bfloat16 or drop --fp8")


def check_fp8_runtime(device, compute_dtype) -> None:
    """ChibiError unless fp8 training can run on this device with this compute dtype (the stages call it
    before building a model with RunConfig(fp8=True))."""
    check_fp8_dtype(compute_dtype)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < MIN_CAPABILITY:
            raise ChibiError(f"fp8 needs an H100-class GPU (SM 8.9+); this is SM {major}.{minor}; drop --fp8")
    elif device.type != "cpu":
        raise ChibiError(f"--fp8 runs on CUDA GPUs with SM 8.9+ (and, slowly, on CPU for testing), not on "
                         f"{device.type}; drop --fp8")


def fp8_layers(model) -> list:
    """(name, module, [(weight name, in_features)]) of every module whose projections go fp8."""
    out = []
    for i, block in enumerate(model.blocks):
        for part in ("mixer", "mlp"):
            mod = getattr(block, part)
            weights = [(n, p.shape[1]) for n, p in mod.named_parameters() if p.dim() == 2]
            out.append((f"blocks.{i}.{part}", mod, weights))
    return out


def check_fp8_layers(model) -> int:
    """ChibiError naming the first layer of `model` (a GPT built with RunConfig(fp8=True)) whose input
    features are not a multiple of 16; else how many modules multiply in fp8. Embedding and lm head
    stay in the compute dtype."""
    layers = fp8_layers(model)
    for name, _, weights in layers:
        for wname, k in weights:
            if k % ALIGN:
                raise ChibiError(f"--fp8: layer {name}.{wname} has {k} input features, not a multiple of {ALIGN} "
                                 f"(fp8 matmuls need it); pick a --width that is a multiple of {ALIGN}, or drop --fp8")
    return len(layers)
