"""A lean inference path for GPT: the same function as `GPT.forward_step`, with less work per step.

On a small model one decode step is ~10 MFLOP: its time goes to dispatching ~100s of tiny operations
and to streaming the weights through the cache once per step, not to arithmetic. `GPT.forward_step` is
written for clarity and shares code with training: every step it concatenates the QKV weights, casts
weights to the compute dtype, rebuilds the attention mask in every layer, repeats K/V for GQA and
syncs the host to find the context length. `Decoder` does all of that once, when it is built:

- weights are laid out once in the compute dtype: fused QKV per attention layer, fused input
  projection per SLC2 layer; on CPU wide fp32 weights stored transposed, bf16 ones packed for oneDNN
  (the faster kernels, see _Proj);
- the residual stream, norms, RoPE, QK-norm and attention products run in fp32 in every compute dtype
  (as in training); only projection inputs are cast, which in bf16 saves ~80 casts per step;
- RoPE is one full-width cos table and one signed sin table indexed by position, so the rotation
  is x * cos + roll(x, D/2) * sin (no split/cat);
- QK-norm and every RMSNorm are single fused `rms_norm` calls (fp32 statistics whatever the input
  dtype, the same values as gpt.norm);
- each row's length is known on the host (`InferenceState.lengths`), so the context length needs no
  device sync, and when all rows are at the same position (batch 1, a fresh batch of equal prompts)
  no mask is built at all; otherwise one additive mask per distinct window is built per step and
  shared by every layer;
- GQA attends grouped query heads to the shared K/V heads with a reshape, never copying the cache;
- a prefill can return the last position's logits only (the engine needs nothing else), which
  saves the (t, V) head matmul.

Memory: tensors already in the compute dtype are shared with the model, not copied; the copies are
the fused QKV / SLC2 input weights and, on CPU, one oneDNN-packed copy of every projection (about one
more copy of the model) plus, in fp32, the transposed wide weights (head, MLP up) for one-row steps.
`extra_bytes` counts them (bench infer reports it).

The state is the ordinary `InferenceState` of gpt.py (same tensors, same layout), so clone/expand/
select/stack and `GPT.forward_step` interoperate with it. The weights are copies taken when the
Decoder is built: after the model's weights change (RL updates), build a new one (see
`Decoder.matches`). Equality with the full forward is tested for every layout, like forward_step's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chibichat.common import ChibiError
from chibichat.model.gpt import EXPLICIT_ATTENTION_MAX_SCORES, NORM_EPS, InferenceState, empty_state, rope_table


def _rms(x):
    # Same function as gpt.norm: fp32 statistics, output in x's dtype (rms_norm upcasts half inputs).
    return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)


def _softcap_(logits, c: float):
    """c * tanh(logits / c), in place on fp32 logits, written as c * (2 * sigmoid(2 logits / c) - 1):
    torch's CPU tanh is 3-4x slower than these four passes (measured on (8, 8192): 218 vs 64 us, one
    thread; 32 vs 16 us at one row), a step's largest elementwise cost at batch 8. Within a few fp32
    ulps of tanh (the training loss uses the same form, gpt._head_chunk)."""
    return logits.mul_(2.0 / c).sigmoid_().mul_(2.0 * c).sub_(c)


def weights_fingerprint(model) -> tuple:
    """Identity of the model's current weights: storage and in-place version of every parameter.
    An optimizer step bumps the versions, so a Decoder built before it no longer matches."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters()) + (model.compute_dtype,)


def _packed_linear_works(dtype) -> bool:
    """Whether oneDNN's pre-packed linear (the kernels torch.compile's CPU backend uses) is available
    here and computes F.linear; checked once per Decoder, so a torch without it falls back."""
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
        if self.packed is not None and (self.kind == "packed" or x.numel() > x.shape[-1]):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        if self.kind == "transposed":
            return torch.matmul(x, self.w)
        return F.linear(x, self.w)


class _AttnLayer:
    def __init__(self, mixer, dtype, packed):
        self.kind = "A"
        self.H, self.Hk, self.D, self.window = mixer.n_head, mixer.n_kv_head, mixer.head_dim, mixer.window
        self.qkv = _Proj(torch.cat([mixer.w_q, mixer.w_k, mixer.w_v], dim=0), dtype, packed)
        self.o = _Proj(mixer.w_o, dtype, packed)


class _SLC2Layer:
    def __init__(self, mixer, dtype, packed):
        self.kind = "S"
        self.E, self.H, self.Dh = mixer.n_embd, mixer.n_head, mixer.head_dim
        self.proj_in = _Proj(torch.cat([mixer.w_x, mixer.w_b, mixer.w_alpha, mixer.w_a], dim=0), dtype, packed)
        # taps (k, E): row w weights the input w steps before the newest one + (k-1), as in slc2.
        self.taps = mixer.conv.detach().to(dtype).squeeze(1).t().contiguous()
        self.o = _Proj(mixer.w_o, dtype, packed)


class Decoder:
    """Inference-only copy of a GPT's weights with a fast `forward(idx, state)` (see module docstring)."""

    @torch.no_grad()
    def __init__(self, model, compile: bool = False):
        cfg = model.config
        self.config, self.dtype = cfg, model.compute_dtype
        self.fingerprint = weights_fingerprint(model)
        dt = self.dtype
        self.device = model.wte.device
        self.wte = model.wte.detach()  # shared, not copied; the residual stream's dtype is the table's, as in GPT.forward
        packed = dt in (torch.bfloat16, torch.float32) and self.device.type == "cpu" and _packed_linear_works(dt)
        self.head = _Proj(model.lm_head, dt, packed)
        self.layers = []
        self.mlp = []
        for block in model.blocks:
            layer = _AttnLayer(block.mixer, dt, packed) if block.kind == "A" else _SLC2Layer(block.mixer, dt, packed)
            self.layers.append(layer)
            self.mlp.append((_Proj(block.mlp.w_fc, dt, packed), _Proj(block.mlp.w_proj, dt, packed)))
        self._rope_len = 0
        self._grow_rope(cfg.seq_len)
        # Opt-in torch.compile'd one-token steps (chibichat/model/compiled.py); prefills stay eager.
        self.compiled = None
        if compile:
            from chibichat.model.compiled import CompiledSteps

            self.compiled = CompiledSteps(model, dt)

    def extra_bytes(self, model) -> int:
        """Bytes of the weight copies this Decoder holds beyond the model's own tensors."""
        own = {p.data_ptr() for p in model.parameters()}
        projs = [self.head] + [w for fc, proj in self.mlp for w in (fc, proj)]
        tensors = [self.wte]
        for layer in self.layers:
            projs += [layer.qkv, layer.o] if layer.kind == "A" else [layer.proj_in, layer.o]
            tensors += [layer.taps] if layer.kind == "S" else []
        for p in projs:
            tensors += [p.w] + ([p.packed] if p.packed is not None and p.packed is not p.w else [])
        # packed (oneDNN) weights have no plain storage: always copies
        return sum(t.numel() * t.element_size() for t in tensors if t.is_mkldnn or t.data_ptr() not in own)

    def matches(self, model) -> bool:
        """True while the model's weights (and compute dtype) are those this Decoder copied. Detects
        any in-place update made through torch ops (optimizer steps, load_state_dict, copy_ under
        no_grad); writes through `param.data` bypass version counters and are not seen."""
        return weights_fingerprint(model) == self.fingerprint

    def _grow_rope(self, length: int) -> None:
        if length <= self._rope_len:
            return
        cos, sin = rope_table(length, self.config.head_dim, self.config.rope_base, device=self.device)
        # (length, 1, D) fp32 (RoPE runs in fp32, see forward): a slice [p : p + t] broadcasts over
        # (B, t, heads, D) as it is
        self.cos = torch.cat([cos, cos], dim=-1)[:, None]
        self.sin = torch.cat([sin, -sin], dim=-1)[:, None]
        self.key_pos = torch.arange(length, device=self.device)
        self._rope_len = length

    def new_state(self, batch_size: int, max_len: int) -> InferenceState:
        """An empty state (same layout as GPT.new_state)."""
        if batch_size < 1 or max_len < 1:
            raise ChibiError(f"new_state needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
        if self.compiled is not None:
            # Compiled steps are specialised to max_len: round it up to a power of two (>= 64) so a
            # chat's turns of different lengths share a few graphs; the extra keys are masked out.
            max_len = max(64, 1 << (max_len - 1).bit_length())
        state = empty_state(self.config, batch_size, max_len, self.dtype, self.device)
        self._grow_rope(max_len)
        return state

    # -- the step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, idx, state: InferenceState, last_only: bool = False, check_ids: bool = True):
        """Feed idx (B, t) to `state` (advanced in place); logits (B, t, V) fp32, or (B, 1, V) with
        last_only. Same contract and errors as GPT.forward_step (t > 1 needs equal row positions).
        check_ids=False skips the token-range check (a host sync): for ids the caller sampled itself."""
        cfg = self.config
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ChibiError(f"decoder input must be a (B, t) LongTensor, got {tuple(idx.shape)} {idx.dtype}")
        B, t = idx.shape
        lengths = state.lengths
        if B != len(lengths):
            raise ChibiError(f"decoder got {B} rows for a state of {len(lengths)} rows")
        if len(state.layers) != cfg.n_layer:
            raise ChibiError("inference state was made by a different model (layer count differs)")
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
        self._grow_rope(state.max_len)
        L = longest + t  # keys attended: every row's valid keys lie in [0, L)
        if uniform:  # positions are host ints: slices, no gathers
            cos, sin = self.cos.narrow(0, first, t), self.sin.narrow(0, first, t)  # (t, 1, D)
            pos = None
        else:  # t == 1, rows at different positions
            pos = state.pos
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (B, 1, 1, D)
        masks: dict[int, torch.Tensor | None] = {}  # window -> additive mask (B|1, 1, 1, t, L) or None

        def mask_for(window: int):
            if window not in masks:
                masks[window] = self._mask(pos, first, t, L, window)
            return masks[window]

        if check_ids and (int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size):
            raise ChibiError(f"decoder input has token ids outside [0, {cfg.vocab_size}): wrong tokenizer for this model")
        # The residual stream, norms, RoPE/QK-norm and attention run in fp32 whatever the compute dtype,
        # as in training (fp32 residual, bf16 matmuls): only the projections' inputs are cast. In bf16
        # this replaces the many per-op up/down casts of bf16 norms and attention products (measured:
        # ~80 copies per step) with ~5 per layer, and is at least as precise as forward_step.
        if self.compiled is not None and t == 1:
            logits = self.compiled.step(idx, state, self.cos[:, 0], self.sin[:, 0], self.key_pos)
            if logits is not None:
                state.pos = state.pos + 1
                state.lengths = [n + 1 for n in lengths]
                return logits
        x = _rms(F.embedding(idx, self.wte).float())
        dt = self.dtype
        for i, layer in enumerate(self.layers):
            u = _rms(x)
            if u.dtype != dt:
                u = u.to(dt)
            if layer.kind == "A":
                y = self._attend(layer, u, cos, sin, state.layers[i], pos, first, L, mask_for(layer.window))
            else:
                y, hist = self._slc2(layer, u, state.layers[i][0])
                state.layers[i] = (hist,)
            x = x + y
            u = _rms(x)
            if u.dtype != dt:
                u = u.to(dt)
            fc, proj = self.mlp[i]
            x = x + proj(torch.relu_(fc(u)).square_())
        if last_only and t > 1:
            x = x[:, -1:]
        h = _rms(x)  # fp32
        if h.dtype != dt:
            h = h.to(dt)
        logits = _softcap_(self.head(h).float(), cfg.softcap)
        state.pos = state.pos + t
        state.lengths = [n + t for n in lengths]
        return logits

    def _mask(self, pos, first: int, t: int, L: int, window: int):
        """Additive attention mask (0 / -inf) broadcastable to (B, Hk, rep, t, L), or None if every
        query may see every key in [0, L) (uniform rows, one token, no window cutting in)."""
        keys = self.key_pos[:L]
        if pos is None:
            if t == 1 and not (window and window < L):
                return None
            q = first + torch.arange(t, device=self.device)
            d = q[:, None] - keys  # (t, L)
        else:
            d = (pos[:, None] - keys)[:, None]  # (B, 1, L): one query per row
        ok = d >= 0
        if window:
            ok = ok & (d < window)
        m = torch.zeros(ok.shape, dtype=torch.float32, device=self.device).masked_fill_(~ok, float("-inf"))
        return m.view(-1, 1, 1, t, L)

    def _attend(self, layer: _AttnLayer, u, cos, sin, cache, pos, first: int, L: int, mask):
        B, t, _ = u.shape
        H, Hk, D = layer.H, layer.Hk, layer.D
        rep = H // Hk
        qk, v = layer.qkv(u).view(B, t, H + 2 * Hk, D).split([H + Hk, Hk], dim=2)
        if qk.dtype != torch.float32:
            qk = qk.float()
        # Half-split RoPE: [x1, x2] -> [x1 c + x2 s, x2 c - x1 s] = x * [c, c] + roll(x) * [s, -s].
        qk = _rms(torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin))
        q, k = qk.split([H, Hk], dim=2)  # fp32; copy_ into the cache rounds k to its dtype
        ck, cv = cache
        if pos is None:
            ck.narrow(2, first, t).copy_(k.transpose(1, 2))
            cv.narrow(2, first, t).copy_(v.transpose(1, 2))
        else:
            rows = torch.arange(B, device=u.device)
            ck[rows, :, pos] = k[:, 0].to(ck.dtype)  # index_put does not cast, copy_ does
            cv[rows, :, pos] = v[:, 0].to(cv.dtype)
        keys, values = ck.narrow(2, 0, L), cv.narrow(2, 0, L)  # (B, Hk, L, D) views of the cache
        if B * H * t * L > EXPLICIT_ATTENTION_MAX_SCORES or u.device.type != "cpu":
            # Long prefills (and GPUs): SDPA never stores the score matrix.
            if rep > 1:
                keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
            bool_mask = None if mask is None else (mask.view(mask.shape[0], 1, t, L) == 0)
            y = F.scaled_dot_product_attention(q.transpose(1, 2).to(keys.dtype), keys, values, attn_mask=bool_mask)
            return layer.o(y.transpose(1, 2).reshape(B, t, H * D).to(u.dtype))
        # Query head h = g * rep + r reads K/V head g: group the queries as (B, Hk, rep * t, D).
        if t == 1:
            qg = q.reshape(B, Hk, rep, D)
        else:
            qg = q.reshape(B, t, Hk, rep, D).permute(0, 2, 3, 1, 4).reshape(B, Hk, rep * t, D)
        if keys.dtype != torch.float32:
            # Reduced precision: the CPU's bf16 batched matmuls are 3-4x slower than fp32 ones at these
            # shapes (measured 77 vs 19 us per layer at L=160), so the small attention products run in
            # fp32 on an upcast of the cache (exact) and only their result is rounded back.
            keys, values = keys.float(), values.float()
        scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(D**-0.5)
        if mask is not None:
            scores = scores.view(B, Hk, rep, t, L).add_(mask).view(B, Hk, rep * t, L)
        y = torch.matmul(torch.softmax(scores, dim=-1), values).to(u.dtype)  # (B, Hk, rep * t, D)
        if t == 1:
            y = y.reshape(B, 1, H * D)
        else:
            y = y.view(B, Hk, rep, t, D).permute(0, 3, 1, 2, 4).reshape(B, t, H * D)
        return layer.o(y)

    def _slc2(self, layer: _SLC2Layer, u, history):
        """One SLC2 mixer on t new inputs (the math of slc2.SLC2.forward, weights pre-fused)."""
        B, t, E = u.shape
        x, b, alpha, a = layer.proj_in(u).split([E, E, layer.H, layer.Dh], dim=-1)
        gate = F.silu(F.silu(alpha).unsqueeze(-1) * a.unsqueeze(-2))  # (B, t, H, Dh)
        v = gate.view(B, t, E) * x
        buf = torch.cat([history, v], dim=1)  # (B, k-1+t, E)
        k = layer.taps.shape[0]
        c = buf[:, 0:t] * layer.taps[0]
        for w in range(1, k):
            c = torch.addcmul(c, buf[:, w : w + t], layer.taps[w])
        return layer.o(b * F.silu(c)), buf[:, t:]


class StepDecoder:
    """The Decoder interface over any model with `new_state` / `forward_step` (e.g. a test double
    that scripts its logits); no speed-ups, just the same calls."""

    def __init__(self, model):
        self.model = model

    def matches(self, model) -> bool:
        return model is self.model

    def new_state(self, batch_size: int, max_len: int) -> InferenceState:
        return self.model.new_state(batch_size, max_len)

    def forward(self, idx, state: InferenceState, last_only: bool = False, check_ids: bool = True):
        logits = self.model.forward_step(idx, state)
        return logits[:, -1:] if last_only else logits


def decoder_for(model, compile: bool = False):
    """Decoder for a GPT (compiled one-token steps with compile=True) (also behind a torch.compile wrapper), StepDecoder for anything else, and
    for a GPT whose forward_step was replaced on the instance (a test double scripting its logits):
    that replacement is what the caller wants to decode with."""
    from chibichat.model.gpt import GPT

    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, GPT) and "forward_step" not in vars(inner) and "forward_step" not in vars(model):
        return Decoder(model, compile=compile)
    return StepDecoder(model)
