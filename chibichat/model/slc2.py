"""SLC2: the gated short-convolution token mixer of Saint Iberis, written afresh.

On the pre-normed input u (B, T, E) of one layer, with H heads of size Dh = E / H and kernel k:

    x = W_x u            (E)     value branch
    b = W_b u            (E)     output gate (no activation)
    alpha = W_alpha u    (H)     one scalar per head
    a = W_A u            (Dh)    one head-size vector, shared by every head
    G[h, d] = SiLU(a[d] * SiLU(alpha[h]))      laid out head-major: channel h * Dh + d
    v = G * x
    c_t = sum_w K[:, w] * v[t - (k - 1) + w]   causal depthwise conv, zeros before the first token
    y = W_o (b * SiLU(c))                      W_o zero-initialised, so a fresh layer adds nothing

The only state needed to decode incrementally is the last k - 1 values of v per row (no KV cache),
and the full forward is literally the incremental path started from an all-zero history, so the two
cannot drift apart (the fork's decode bug came from two separate code paths).

Parameters: 3E^2 (W_x, W_b, W_o) + E*(H + Dh) (W_alpha, W_A) + E*k (conv taps): no biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def causal_depthwise_conv(v, taps, history):
    """Causal depthwise convolution over time.

    v: (B, T, E) new inputs; taps: (E, k) with taps[:, k-1] weighting the current token;
    history: (B, k-1, E) the k-1 inputs before v (zeros at the start of a sequence).
    Returns (c (B, T, E), new_history (B, k-1, E)).

    Written as k shifted multiply-adds rather than F.conv1d: it needs no (B, E, T) transposes, works
    identically for T = 1 decode steps, and torch.compile fuses it into one elementwise kernel.
    """
    k = taps.shape[1]
    T = v.shape[1]
    if k == 1:
        return v * taps[:, 0], history
    buf = torch.cat([history, v], dim=1)  # (B, k-1+T, E)
    c = buf[:, 0:T] * taps[:, 0]
    for w in range(1, k):
        c = c + buf[:, w : w + T] * taps[:, w]
    return c, buf[:, T:]


class SLC2(nn.Module):
    """The SLC2 mixer of one layer. Weights are fp32 masters; forward casts them to `dtype`."""

    def __init__(self, n_embd: int, n_head: int, conv_kernel: int):
        super().__init__()
        self.n_embd, self.n_head, self.head_dim, self.kernel = n_embd, n_head, n_embd // n_head, conv_kernel
        E, H, Dh = n_embd, n_head, self.head_dim
        # Parameters are created uninitialised and filled by reset_parameters(): nothing is left to
        # whatever torch.empty returned (GPT.init_weights asserts that every parameter was visited).
        self.w_x = nn.Parameter(torch.empty(E, E))
        self.w_b = nn.Parameter(torch.empty(E, E))
        self.w_alpha = nn.Parameter(torch.empty(H, E))
        self.w_a = nn.Parameter(torch.empty(Dh, E))
        # Stored like a Conv1d depthwise weight (E, 1, k): 3-D on purpose, so that no optimizer rule
        # keyed on "2-D means Muon" can route it to Muon by accident.
        self.conv = nn.Parameter(torch.empty(E, 1, conv_kernel))
        self.w_o = nn.Parameter(torch.empty(E, E))

    @torch.no_grad()
    def reset_parameters(self, linear_init) -> list:
        """Initialise every parameter; returns them so the caller can check none was missed."""
        for w in (self.w_x, self.w_b, self.w_alpha, self.w_a):
            linear_init(w)
        # Conv taps U(-1/sqrt(k), 1/sqrt(k)): PyTorch's Conv1d default for a depthwise filter (fan_in = k),
        # i.e. what the Saint Iberis author's model would have had if its meta-device build had not
        # skipped the conv. All k taps start active, so gradients into x, b and G see a well-scaled
        # filter with history from the first step (an identity tap would start every SLC2 layer as a
        # purely pointwise unit and make the history taps learn from zero).
        bound = 1.0 / math.sqrt(self.kernel)
        self.conv.uniform_(-bound, bound)
        self.w_o.zero_()  # a fresh layer is an identity on the residual stream (as attention/MLP out)
        return [self.w_x, self.w_b, self.w_alpha, self.w_a, self.conv, self.w_o]

    def matrix_params(self) -> list:
        return [self.w_x, self.w_b, self.w_alpha, self.w_a, self.w_o]

    def fused_weights(self) -> dict:
        # One matmul for the four input projections (separate parameters, so Muon still sees each
        # matrix on its own; the concatenation is cheap next to the matmul it saves).
        return {"in": torch.cat([self.w_x, self.w_b, self.w_alpha, self.w_a], dim=0), "o": self.w_o}

    def forward(self, u, dtype, lin, history=None):
        """u: (B, T, E) pre-normed input; lin(name, x): the block's projections (gpt.Projector).
        history: (B, k-1, E) in `dtype`, or None for a fresh sequence.

        Returns (y (B, T, E) in `dtype`, new_history (B, k-1, E)).
        """
        B, T, E = u.shape
        H, Dh = self.n_head, self.head_dim
        x, b, alpha, a = lin("in", u).split([E, E, H, Dh], dim=-1)
        gate = F.silu(F.silu(alpha).unsqueeze(-1) * a.unsqueeze(-2))  # (B, T, H, Dh), head-major
        v = gate.reshape(B, T, E) * x
        if history is None:
            history = v.new_zeros(B, self.kernel - 1, E)
        c, new_history = causal_depthwise_conv(v, self.conv.to(dtype).squeeze(1), history)
        y = lin("o", b * F.silu(c))
        return y, new_history
