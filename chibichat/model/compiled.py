"""A torch.compile'd single-token decode step (opt-in; see Decoder(compile=True)).

Eager decoding of a small model is bound by per-op overhead (~150 aten ops per step, each a few
microseconds of dispatch) more than by arithmetic. Inductor fuses the elementwise work (norms, RoPE,
softmax, residual adds, the logit softcap) into a few generated C++ loops and calls the matmuls
directly. It needs static shapes to compile once: the step attends over the whole preallocated cache
(max_len keys) with a mask built from each row's position tensor, so neither the number of keys nor a
host-side position enters the graph, and one compiled graph serves every step of a (batch, max_len).

Measured with `chibichat bench infer --threads 1 --clock cpu --repeats 5` (depth 4, width 256, vocab
8192, prompt 128; engine greedy decode tok/s, 2-core CPU shared with other jobs, load 2-3, so +-15%):
compile on, bf16, batch 1 / batch 8: dense 1,234 / 3,984, iberis 1,368 / 4,854 (eager: ~570-620 /
2,560-2,660); fp32 batch 1: dense 758, iberis 746 (eager ~610-630). Before the graph stopped writing
the caches and used the C++ wrapper, the same runs gave bf16 dense 948 / 2,591, iberis 940 / 3,770.
Inductor's "freezing" folds the weights in as constants and packs them for oneDNN. fp32 gains less
(wide weights stored transposed: MKL's faster one-row layout, see _Proj in decode.py) and loses at
batch 8, where eager's packed oneDNN weights win (measured again with freezing and with the C++
wrapper: 1,400-1,500 vs 1,630), so fp32 compiles one-row steps only (FP32_MAX_ROWS). The price is
compile time: ~10-15 s of CPU for each new (batch, max_len) in bf16 (~4 s in fp32), paid by the first
step that needs it (inductor caches compiled code on disk, so a later process pays less): hence
opt-in (Decoder(model, compile=True)).
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from chibichat.common import ChibiError
from chibichat.model.gpt import NORM_EPS

log = logging.getLogger(__name__)

# Distinct (batch, max_len) shapes compiled per Decoder; later shapes run eager. Bounds the compile
# time one session can spend (a batch that shrinks row by row would otherwise compile each size).
MAX_COMPILED_SHAPES = 4
# fp32 steps with more rows than this run eager (faster there, see above).
FP32_MAX_ROWS = 1
# Inductor's C++ wrapper: the compiled step calls its kernels from generated C++ instead of a Python
# function (one Python call per step instead of ~40 kernel calls, size/stride asserts and buffer
# bookkeeping). Measured (dense bf16, one thread, CPU clock, in-process interleaved): batch 1 1,120 ->
# 925 us per step, batch 8 2,201 -> 1,977 us; it adds ~4 s to each shape's compile (a C++ build).
CPP_WRAPPER = True


def _rms(x):
    return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)


class StepModule(nn.Module):
    """forward(idx (B, 1), pos (B,), *state tensors) -> (logits (B, 1, V) fp32, [new K, new V per
    attention layer] (B, Hk, 1, D) in the cache dtype, [new SLC2 histories]).

    The graph only reads the caches (the caller stores the new K/V, see the attention comment); SLC2
    histories are returned (their shift is a new tensor anyway). Weights are buffers so inductor's
    freezing can treat them as constants (and pre-pack them for oneDNN)."""

    def __init__(self, model, dtype, transpose_wide: bool = False):
        super().__init__()
        cfg = model.config
        self.cfg, self.dtype = cfg, dtype
        self.kinds = []
        self.slc2_heads = {}  # layer -> (heads, head size) of an SLC2 mixer
        self.windows = list(cfg.windows)
        self.transposed = set()  # fp32 wide weights stored (in, out): see _Proj in decode.py

        def own(name, w):
            w = w.detach().to(dtype)
            if transpose_wide and dtype == torch.float32 and w.dim() == 2 and w.shape[0] > w.shape[1]:
                self.transposed.add(name)
                w = w.t()
            self.register_buffer(name, w.contiguous(), persistent=False)

        self.register_buffer("wte", model.wte.detach(), persistent=False)
        own("head", model.lm_head)
        for i, block in enumerate(model.blocks):
            mx = block.mixer
            self.kinds.append(block.kind)
            if block.kind == "A":
                own(f"qkv{i}", torch.cat([mx.w_q, mx.w_k, mx.w_v], dim=0))
            else:
                self.slc2_heads[i] = (mx.n_head, mx.head_dim)
                own(f"in{i}", torch.cat([mx.w_x, mx.w_b, mx.w_alpha, mx.w_a], dim=0))
                own(f"taps{i}", mx.conv.squeeze(1).t())
            own(f"o{i}", mx.w_o)
            own(f"fc{i}", block.mlp.w_fc)
            own(f"proj{i}", block.mlp.w_proj)

    def _lin(self, x, name):
        w = getattr(self, name)
        return torch.matmul(x, w) if name in self.transposed else F.linear(x, w)

    def forward(self, idx, pos, cos_tab, sin_tab, key_pos, *states):
        cfg, dt = self.cfg, self.dtype
        B = idx.shape[0]
        H, Hk, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        rep = H // Hk
        x = _rms(F.embedding(idx, self.wte).float())  # (B, 1, E)
        cos, sin = cos_tab[pos][:, None, None], sin_tab[pos][:, None, None]  # (B, 1, 1, D)
        d = pos[:, None] - key_pos  # (B, max_len): how far back each key is
        hists, new_kv = [], []
        si = 0
        for i, kind in enumerate(self.kinds):
            u = _rms(x).to(dt)
            if kind == "A":
                ck, cv = states[si], states[si + 1]
                si += 2
                qk, v = self._lin(u, f"qkv{i}").view(B, 1, H + 2 * Hk, D).split([H + Hk, Hk], dim=2)
                qk = qk.float()
                qk = _rms(qk * cos + qk.roll(D // 2, dims=-1) * sin)
                q, k = qk.split([H, Hk], dim=2)
                # The new key/value are rounded to the cache dtype, as the eager Decoder reads them
                # back from the cache. The graph never writes the caches: it attends over the cached
                # keys (those before each row's position) plus the new key on its own, and returns the
                # new K/V for `CompiledSteps.step` to store. Written in the graph (scatter_ into an
                # input), the functionalised update copied the whole cache every step (measured: the
                # reason batch 8 gained nothing).
                kn = k.transpose(1, 2).to(ck.dtype)  # (B, Hk, 1, D)
                vn = v.transpose(1, 2).to(cv.dtype)
                new_kv += [kn, vn]
                ok = d > 0
                if self.windows[i]:
                    ok = ok & (d < self.windows[i])
                mask = torch.zeros(ok.shape, dtype=torch.float32, device=ok.device).masked_fill(~ok, float("-inf"))
                qg = q.reshape(B, Hk, rep, D)
                old = torch.matmul(qg, ck.float().transpose(-1, -2)) * D**-0.5 + mask[:, None, None]
                own = (qg * kn.float()).sum(dim=-1, keepdim=True) * D**-0.5  # (B, Hk, rep, 1)
                p = torch.softmax(torch.cat([old, own], dim=-1), dim=-1)
                y = torch.matmul(p[..., :-1], cv.float()) + p[..., -1:] * vn.float()
                y = y.reshape(B, 1, H * D)
                y = self._lin(y.to(dt), f"o{i}")
            else:
                hist = states[si]
                si += 1
                E = cfg.n_embd
                Hs, Dh = self.slc2_heads[i]
                xs, b, alpha, a = self._lin(u, f"in{i}").split([E, E, Hs, Dh], dim=-1)
                gate = F.silu(F.silu(alpha).unsqueeze(-1) * a.unsqueeze(-2))
                v = gate.reshape(B, 1, E) * xs
                buf = torch.cat([hist, v], dim=1)  # (B, k, E)
                c = (buf * getattr(self, f"taps{i}")).sum(dim=1, keepdim=True)
                hists.append(buf[:, 1:].contiguous())
                y = self._lin(b * F.silu(c), f"o{i}")
            x = x + y
            u = _rms(x).to(dt)
            x = x + self._lin(torch.relu(self._lin(u, f"fc{i}")).square(), f"proj{i}")
        h = _rms(x).to(dt)
        # softcap c * tanh(z / c) as c * (2 sigmoid(2 z / c) - 1): see decode._softcap_
        c = cfg.softcap
        logits = (torch.sigmoid(self._lin(h, "head").float() * (2.0 / c)) * (2.0 * c)) - c
        return logits, new_kv, hists


class CompiledSteps:
    """Compiled single-token steps of one Decoder, one graph per (batch, max_len) seen, at most
    MAX_COMPILED_SHAPES of them. `step` returns None where the caller should run the step eager: a
    shape past the cap, or fp32 with more than one row (where eager is faster)."""

    def __init__(self, model, dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ChibiError(f"compiled decoding supports float32 and bfloat16, not {dtype}")
        from torch._inductor import config as inductor_config  # imported on use, not at module import

        self.inductor_config = inductor_config
        bf16 = dtype == torch.bfloat16
        # bf16: freezing lets inductor pack the constant weights for oneDNN (1.3-1.8x the plain
        # kernels); fp32: oneDNN loses to MKL at one row, so keep MKL's transposed layout instead.
        self.module = StepModule(model, dtype, transpose_wide=not bf16).eval()
        self.freezing = bf16
        # (batch, max_len) -> (compiled step, its RoPE / key-position tables)
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.eager_shapes: set[tuple[int, int]] = set()  # shapes past the cap (logged once each)
        self.warm: set[tuple[int, int]] = set()  # graphs whose first call (the compile) has run

    def _compile(self):
        """A compiled callable of the step module with its own dynamo cache. Dynamo keeps compiled
        graphs per *code object*, and its recompile limit (torch._dynamo.config.recompile_limit, 8)
        counts per code object too: had every (batch, max_len) of every Decoder compiled the one
        StepModule.forward, an RL run (a new Decoder, hence new frozen weights, per update) would
        reach the limit after 8 updates, where fullgraph=True makes dynamo raise (measured:
        FailOnRecompileLimitHit at the 9th compiled bf16 Decoder), and every call would first check
        the guards of the earlier graphs. A copy of the function with a fresh code object gives each
        graph its own cache, freed with this object."""
        f = StepModule.forward
        fresh = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        # dynamic=False: every shape is static (see the module docstring), so the graph never
        # recompiles between steps; a new (batch, max_len) is a new entry in self.graphs.
        return torch.compile(types.MethodType(fresh, self.module), dynamic=False, fullgraph=True)

    def step(self, idx, state, cos, sin, key_pos):
        """Logits (B, 1, V) of one token per row, the new K/V stored at each row's position and the
        SLC2 histories replaced (the caller advances pos / lengths); None if this shape is past the
        cap or fp32 with several rows (the caller runs the step eager). cos/sin (>= max_len, D) fp32 RoPE tables, key_pos (>= max_len,) arange."""
        B, n = idx.shape[0], state.max_len
        key = (B, n)
        if not self.freezing and B > FP32_MAX_ROWS:
            return None  # fp32 with several rows: eager's pre-packed oneDNN weights are faster
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= MAX_COMPILED_SHAPES:
                if key not in self.eager_shapes:
                    self.eager_shapes.add(key)
                    log.info("compiled decoding: %d shapes compiled already (MAX_COMPILED_SHAPES), so steps of "
                             "batch %d, max_len %d run eager", MAX_COMPILED_SHAPES, B, n)  # fmt: skip
                return None
            # The tables' first n rows never change (they only grow): slice them once per graph.
            entry = self.graphs[key] = (self._compile(), cos[:n], sin[:n], key_pos[:n])
        fn, cos_n, sin_n, keys_n = entry
        # The graph is specialised to its inputs' strides and dispatch keys too (a tensor made in
        # inference mode has different ones): an SLC2 history left by an eager prefill is a strided
        # view, and pos / histories made outside inference mode differ from those the steps return.
        # So pass copies of these small tensors, always made here (in the Decoder's inference mode),
        # and contiguous K/V caches (a no-op for the engine's, written in place through the state's
        # own tensors).
        state.layers = [tuple(t.contiguous() if len(layer) == 2 else t.clone(memory_format=torch.contiguous_format)
                              for t in layer) for layer in state.layers]  # fmt: skip
        flat = [t for layer in state.layers for t in layer]
        pos = state.pos.clone()
        args = (idx.clone(), pos, cos_n, sin_n, keys_n, *flat)
        if key in self.warm:
            logits, new_kv, hists = fn(*args)
        else:
            # Inductor reads `freezing` and `cpp_wrapper` when it compiles, i.e. inside the first call
            # (measured: passing them as torch.compile(options=...) does not reach the freezing pass on
            # this torch), so set them here; later calls skip the patch (~20 us) since the graph never
            # recompiles (its inputs keep their shapes, strides and dispatch keys, see above).
            with self.inductor_config.patch(freezing=self.freezing, cpp_wrapper=CPP_WRAPPER):
                logits, new_kv, hists = fn(*args)
            self.warm.add(key)
        lengths = state.lengths
        at = None
        if min(lengths) != max(lengths):  # rows at different positions: one index for every layer
            at = pos.view(B, 1, 1, 1).expand(B, new_kv[0].shape[1], 1, new_kv[0].shape[3]) if new_kv else None
        kv, it = iter(new_kv), iter(hists)
        for layer in state.layers:
            if len(layer) == 1:
                continue
            for cache in layer:
                new = next(kv)
                if at is None:
                    cache.narrow(2, lengths[0], 1).copy_(new)
                else:
                    cache.scatter_(2, at, new)
        state.layers = [(next(it),) if len(layer) == 1 else layer for layer in state.layers]
        return logits
