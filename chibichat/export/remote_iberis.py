"""transformers modeling code for chibichat hybrid models (attention + SLC2 gated short convolution).

Shipped inside an exported folder by `chibichat export hf` and loaded with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. Self-contained on purpose:
it needs torch and transformers only, not chibichat.

The network (per layer, pre-norm; all RMSNorms are parameter-free):
    x = norm(embed(ids))
    x = x + mixer(norm(x)),  mixer = attention (RoPE then QK-norm, GQA, causal) or SLC2
    x = x + fc2(relu(fc1(norm(x)))^2)
    logits = softcap * tanh(lm_head(norm(x)) / softcap)
SLC2 on u (E channels, H heads of Dh):
    x = Wx u, b = Wb u, alpha = Walpha u (H), a = Wa u (Dh)
    v = SiLU(a[d] * SiLU(alpha[h])) (channel h*Dh+d) * x
    c_t = sum_w conv[:, 0, w] * v[t - (k-1) + w]  (causal depthwise, zeros before the start)
    y = Wo (b * SiLU(c))

Generation keeps a per-layer cache (keys/values for attention, the last k-1 values v for SLC2) in
`IberisCache`. Batches may be left-padded (tokenizer padding_side="left", attention_mask 0 on pads):
pads get no RoPE position, are never attended to, and feed zeros into the convolution, so each row
computes exactly what it would alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class ChibiIberisConfig(PretrainedConfig):
    model_type = "chibichat_iberis"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=None, mixer_pattern="SA", conv_kernel=3,
                 max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1.1920928955078125e-07,
                 final_logit_softcapping=15.0, use_cache=True, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.mixer_pattern = mixer_pattern
        self.conv_kernel = conv_kernel
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.final_logit_softcapping = final_logit_softcapping
        self.use_cache = use_cache
        if len(mixer_pattern) != num_hidden_layers or set(mixer_pattern) - {"A", "S"}:
            raise ValueError(f"mixer_pattern {mixer_pattern!r} must be {num_hidden_layers} characters from A/S")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


def _norm(x, eps):
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class IberisCache:
    """Decoding state: per layer (k, v) for attention or (history,) for SLC2, plus tokens seen."""

    is_compileable = False

    def __init__(self, n_layers):
        self.layers = [None] * n_layers
        self.seen = 0

    def get_seq_length(self, layer_idx=0):
        return self.seen

    def reorder_cache(self, beam_idx):
        self.layers = [None if s is None else tuple(t.index_select(0, beam_idx.to(t.device)) for t in s)
                       for s in self.layers]


class IberisAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        E = config.hidden_size
        self.n_head, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = E // self.n_head
        self.eps = config.rms_norm_eps
        self.q_proj = nn.Linear(E, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(E, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(E, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(E, E, bias=False)

    @staticmethod
    def rope(x, cos, sin):
        d = x.shape[-1] // 2
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

    def forward(self, u, cos, sin, state, mask):
        """mask: None (plain causal, no cache, no padding) or bool (B, 1, T, past + T) of allowed keys."""
        B, T, E = u.shape
        D = self.head_dim
        q = _norm(self.rope(self.q_proj(u).view(B, T, self.n_head, D), cos, sin), self.eps).transpose(1, 2)
        k = _norm(self.rope(self.k_proj(u).view(B, T, self.n_kv, D), cos, sin), self.eps).transpose(1, 2)
        v = self.v_proj(u).view(B, T, self.n_kv, D).transpose(1, 2)
        past = 0
        if state is not None:
            past = state[0].shape[2]
            k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)
        if self.n_kv != self.n_head:
            rep = self.n_head // self.n_kv
            kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        else:
            kk, vv = k, v
        if mask is None:
            if past:
                raise ValueError("a cached attention step needs the key mask")
            y = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, E)), (k, v)


class IberisSLC2(nn.Module):
    def __init__(self, config):
        super().__init__()
        E, H = config.hidden_size, config.num_attention_heads
        self.E, self.H, self.Dh, self.k = E, H, E // H, config.conv_kernel
        self.x_proj = nn.Linear(E, E, bias=False)
        self.b_proj = nn.Linear(E, E, bias=False)
        self.alpha_proj = nn.Linear(E, H, bias=False)
        self.a_proj = nn.Linear(E, self.Dh, bias=False)
        self.conv = nn.Conv1d(E, E, self.k, groups=E, bias=False)  # weight (E, 1, k); applied by hand below
        self.o_proj = nn.Linear(E, E, bias=False)

    def forward(self, u, state, keep):
        """keep: None, or (B, T, 1) with 0 on padding so that pads enter the convolution as zeros."""
        B, T, E = u.shape
        x, b = self.x_proj(u), self.b_proj(u)
        gate = F.silu(F.silu(self.alpha_proj(u)).unsqueeze(-1) * self.a_proj(u).unsqueeze(-2))  # (B, T, H, Dh)
        v = gate.reshape(B, T, E) * x
        if keep is not None:
            v = v * keep
        history = v.new_zeros(B, self.k - 1, E) if state is None else state[0]
        buf = torch.cat([history, v], dim=1)
        taps = self.conv.weight[:, 0, :]  # (E, k), the last tap weights the current token
        c = buf[:, 0:T] * taps[:, 0]
        for w in range(1, self.k):
            c = c + buf[:, w:w + T] * taps[:, w]
        return self.o_proj(b * F.silu(c)), (buf[:, buf.shape[1] - (self.k - 1):],)


class IberisMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)).square())


class IberisLayer(nn.Module):
    def __init__(self, config, kind):
        super().__init__()
        self.kind = kind
        if kind == "A":
            self.self_attn = IberisAttention(config)
        else:
            self.mixer = IberisSLC2(config)
        self.mlp = IberisMLP(config)
        self.eps = config.rms_norm_eps

    def forward(self, x, cos, sin, state, mask, keep):
        u = _norm(x, self.eps)
        if self.kind == "A":
            y, state = self.self_attn(u, cos, sin, state, mask)
        else:
            y, state = self.mixer(u, state, keep)
        x = x + y
        return x + self.mlp(_norm(x, self.eps)), state


class ChibiIberisPreTrainedModel(PreTrainedModel):
    config_class = ChibiIberisConfig
    base_model_prefix = "model"
    _no_split_modules = ["IberisLayer"]

    def _init_weights(self, module):
        # Loading always overwrites every weight; fresh models get a small normal init.
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)


class ChibiIberisModel(ChibiIberisPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([IberisLayer(config, kind) for kind in config.mixer_pattern])
        self.post_init()

    def rope(self, positions, dtype):
        """positions (B, T) -> cos, sin of shape (B, T, 1, D/2)."""
        D = self.config.hidden_size // self.config.num_attention_heads
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=positions.device) / D))
        freqs = positions.float()[..., None] * inv
        return freqs.cos().to(dtype)[:, :, None, :], freqs.sin().to(dtype)[:, :, None, :]

    def forward(self, input_ids, cache=None, attention_mask=None, hidden_states=None):
        """attention_mask: None or (B, past + T), 1 on real tokens, 0 on (left) padding. `hidden_states`: a list
        that gets what transformers' NanoChat reports (each layer's input, then the final normed output)."""
        eps = self.config.rms_norm_eps
        B, T = input_ids.shape
        dev = input_ids.device
        past = cache.seen if cache is not None else 0
        x = _norm(self.embed_tokens(input_ids), eps)
        if attention_mask is None:
            real = torch.ones(B, past + T, dtype=torch.bool, device=dev)
        else:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
            real = attention_mask.to(dev).bool()
        # A token's position counts the real tokens before it, so a left-padded row is positioned as if alone.
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        cos, sin = self.rope(positions, x.dtype)
        padded = not bool(real.all())
        if past == 0 and not padded:
            mask, keep = None, None
        else:
            qpos = past + torch.arange(T, device=dev)
            kpos = torch.arange(past + T, device=dev)
            causal = qpos[:, None] >= kpos[None, :]
            # keys must be real; a pad query may see itself so that no softmax row is empty
            mask = (causal[None] & real[:, None, :]) | (qpos[:, None] == kpos[None, :])[None]
            mask = mask[:, None]
            keep = real[:, past:, None].to(x.dtype) if padded else None
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            state = cache.layers[i] if cache is not None else None
            x, state = layer(x, cos, sin, state, mask, keep)
            if cache is not None:
                cache.layers[i] = state
        if cache is not None:
            cache.seen += input_ids.shape[1]
        x = _norm(x, eps)
        if hidden_states is not None:
            hidden_states.append(x)  # as NanoChat: the last layer's output only normed
        return x


class ChibiIberisForCausalLM(ChibiIberisPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = ChibiIberisModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # our own IberisCache (conv histories are not key/value pairs)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      use_cache=True, **kwargs):
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.seen:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None, use_cache=None,
                logits_to_keep=0, output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        if input_ids is None:
            raise ValueError("ChibiIberisForCausalLM needs input_ids")
        if output_attentions:  # asked for, it must not come back silently empty
            raise ValueError("ChibiIberisForCausalLM computes attention with scaled_dot_product_attention and "
                             "returns no attention weights; drop output_attentions")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = past_key_values
        if cache is None and use_cache:
            cache = IberisCache(self.config.num_hidden_layers)
        states = [] if output_hidden_states else None
        h = self.model(input_ids, cache, attention_mask, states)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        cap = self.config.final_logit_softcapping
        logits = self.lm_head(h)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None,
                                     hidden_states=None if states is None else tuple(states))
        return out if return_dict is not False else out.to_tuple()
