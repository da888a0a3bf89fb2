"""The model contract: shapes, parameter counts, init, loss, gradients, incremental == full decoding."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from chibichat.common import ChibiError
from chibichat.model import gpt as gpt_mod
from chibichat.model.gpt import GPT, GPTConfig, InferenceState, RunConfig, layer_pattern
from chibichat.model.slc2 import causal_depthwise_conv

V = 61


def tiny(layers="dense", n_head=4, n_kv_head=4, windows=None, n_layer=4, seq_len=24, n_embd=32, k=3):
    cfg = GPTConfig(vocab_size=V, seq_len=seq_len, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                    n_kv_head=n_kv_head, layers=layers, windows=windows, conv_kernel=k)
    torch.manual_seed(0)
    model = GPT(cfg)
    perturb(model)
    return model


@torch.no_grad()
def perturb(model, scale=0.1):
    """Zero-initialised out-projections and head make a fresh model's output constant (and block
    gradients at step 0); perturb every parameter so the tests exercise every path."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


LAYOUTS = {
    "dense": dict(layers="dense"),
    "slc2-only": dict(layers="SSSS"),
    "iberis": dict(layers="iberis"),
    "gqa": dict(layers="ASAA", n_kv_head=2),
    "window": dict(layers="AASA", windows=[0, 5, 0, 3]),
    "slc2-k4": dict(layers="SASA", k=4),
}


# ------------------------------------------------------------------------------------------------
# layout, config, counts


def test_layer_pattern():
    assert layer_pattern("dense", 3) == "AAA"
    ib = layer_pattern("iberis", 20)
    assert [i for i, c in enumerate(ib) if c == "A"] == [1, 4, 7, 10, 13, 16, 19]
    assert layer_pattern("iberis", 4) == "SASA"
    assert layer_pattern("assa", 4) == "ASSA"
    for bad in ("ASA", "AXAA", "", "sparse"):
        with pytest.raises(ChibiError, match="layer layout"):
            layer_pattern(bad, 4)


def test_config_roundtrip_and_validation():
    cfg = GPTConfig(vocab_size=100, seq_len=32, n_layer=4, n_embd=64, n_head=4, n_kv_head=2, layers="iberis",
                    windows=[0, 8, 0, 0])
    assert cfg.layers == "SASA"
    d = cfg.to_dict()
    assert d["layers"] == "SASA" and d["windows"] == [0, 8, 0, 0]
    assert GPTConfig.from_dict(d) == cfg
    with pytest.raises(ChibiError, match="unknown keys"):
        GPTConfig.from_dict({**d, "bogus": 1})
    bad = [dict(n_embd=60), dict(n_kv_head=3), dict(windows=[0, 0, 4, 0]), dict(windows=[0]), dict(seq_len=0),
           dict(n_embd=20, n_head=4)]  # 60/4=15 odd head dim; 4 % 3; window on an S layer; wrong length; ...
    for kw in bad:
        with pytest.raises(ChibiError):
            GPTConfig(**{**dict(vocab_size=100, seq_len=32, n_layer=4, n_embd=64, n_head=4, n_kv_head=4,
                                layers="iberis"), **kw})
    # fields that would give NaN logits or a silently different model are refused by name
    base = dict(vocab_size=100, seq_len=32, n_layer=4, n_embd=64, n_head=4, n_kv_head=4)
    for kw, msg in [(dict(softcap=float("inf")), "GPTConfig.softcap must be a finite number > 0, got inf"),
                    (dict(softcap=float("nan")), "GPTConfig.softcap must be a finite number > 0, got nan"),
                    (dict(rope_base=-1.0), "GPTConfig.rope_base must be a finite number > 1, got -1.0"),
                    (dict(rope_base=1), "GPTConfig.rope_base must be a finite number > 1, got 1"),
                    (dict(rope_base="10000"), "GPTConfig.rope_base must be a finite number > 1, got '10000'"),
                    (dict(windows=[0, 2.7, 0, 0]),
                     "GPTConfig.windows must be 4 non-negative ints (0 = full causal), got [0, 2.7, 0, 0]"),
                    (dict(windows=[0, True, 0, 0]), "GPTConfig.windows must be 4 non-negative ints")]:
        with pytest.raises(ChibiError, match=re.escape(msg)):
            GPTConfig(**base, **kw)
    # an integer softcap or RoPE base (as JSON may hold) and a tuple of windows are fine
    ok = GPTConfig(**base, softcap=30, rope_base=500000, windows=(0, 8, 0, 0))
    assert ok.windows == [0, 8, 0, 0] and GPTConfig.from_dict(ok.to_dict()) == ok


def test_d20_parameter_counts_published():
    with torch.device("meta"):
        dense = GPT(GPTConfig(vocab_size=65536, seq_len=2048, n_layer=20, n_embd=1280, n_head=10, n_kv_head=10))
        iberis = GPT(GPTConfig(vocab_size=65536, seq_len=2048, n_layer=20, n_embd=1280, n_head=10, n_kv_head=10,
                               layers="iberis"))
    assert dense.num_params() == 560_988_160
    assert iberis.num_params() == 542_035_200


def test_small_parameter_count_formula_with_gqa():
    E, H, Hk, k = 32, 4, 2, 3
    m = tiny(layers="ASAS", n_kv_head=Hk, k=k)
    Dh = E // H
    attn = 2 * E * E + 2 * E * Hk * Dh
    slc2 = 3 * E * E + E * (H + Dh + k)
    assert m.num_params() == 2 * V * E + 2 * attn + 2 * slc2 + 4 * 8 * E * E


def test_flops_per_token_charges_slc2_as_slc2():
    dense, hybrid = tiny("AAAA"), tiny("SASA")
    E, T, L = 32, 24, 4
    assert dense.flops_per_token() == 6 * (dense.num_params() - V * E) + L * 12 * E * T
    assert hybrid.flops_per_token() == 6 * (hybrid.num_params() - V * E) + 2 * 12 * E * T
    win = tiny("AASA", windows=[0, 5, 0, 30])  # a window >= seq_len costs a full layer
    assert win.flops_per_token() == 6 * (win.num_params() - V * E) + 12 * E * (T + 5 + T)


def test_param_groups_partition_parameters():
    m = tiny("SASA")
    groups = m.param_groups()
    assert set(groups) == {"matrix", "embedding", "head", "other"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert all(p.dim() == 2 for p in groups["matrix"])
    assert groups["embedding"] == [m.wte] and groups["head"] == [m.lm_head]
    assert [p.shape for p in groups["other"]] == [torch.Size([32, 1, 3])] * 2


# ------------------------------------------------------------------------------------------------
# init


def test_init_overwrites_every_parameter():
    m = tiny("SASA")
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    m.init_weights()
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all(), name
    for b in m.blocks:
        assert (b.mixer.w_o == 0).all() and (b.mlp.w_proj == 0).all()
        if b.kind == "S":
            bound = 1 / math.sqrt(3)
            assert b.mixer.conv.abs().max() <= bound and b.mixer.conv.std() > 0.2 * bound
    assert (m.lm_head == 0).all()
    assert abs(m.wte.std().item() - 1.0) < 0.1
    # fresh model: zero head -> uniform prediction, loss = ln V exactly
    idx = torch.randint(0, V, (2, 8))
    assert m(idx, idx).item() == pytest.approx(math.log(V), abs=1e-5)


# ------------------------------------------------------------------------------------------------
# forward and loss


def test_forward_shapes_and_softcap():
    m = tiny("iberis")
    with torch.no_grad():
        m.lm_head.mul_(1000)  # push raw logits far past the cap
    logits = m(torch.randint(0, V, (3, 10)))
    assert logits.shape == (3, 10, V) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0


def test_loss_matches_reference_cross_entropy_with_ignore_index():
    m = tiny("iberis")
    idx = torch.randint(0, V, (3, 12))
    tgt = torch.randint(0, V, (3, 12))
    tgt[0, :5] = -1
    tgt[2, -1] = -1
    logits = m(idx)
    ref = F.cross_entropy(logits.view(-1, V), tgt.view(-1), ignore_index=-1, reduction="none").view(3, 12)
    n = (tgt >= 0).sum()
    assert torch.allclose(m(idx, tgt, reduction="none"), ref, atol=1e-5)
    assert torch.allclose(m(idx, tgt, reduction="sum"), ref.sum(), atol=1e-4)
    assert torch.allclose(m(idx, tgt), ref.sum() / n, atol=1e-5)
    assert (m(idx, tgt, reduction="none")[tgt < 0] == 0).all()


def _grads(model, fn):
    model.zero_grad()
    fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_chunked_loss_gradients_equal_plain_autograd(monkeypatch, reduction):
    # Chunks of 7 rows (36 rows total: several chunks and a ragged last one).
    monkeypatch.setattr(gpt_mod, "LOSS_CHUNK_ELEMENTS", 7 * V)
    m = tiny("SASA")
    idx = torch.randint(0, V, (3, 12))
    tgt = torch.randint(0, V, (3, 12))
    tgt[1, 3:9] = -1
    w = torch.rand(3, 12)  # per-token weights, as RL would apply to reduction="none"

    def ours():
        out = m(idx, tgt, reduction=reduction)
        return (out * w).sum() if reduction == "none" else out

    def plain():
        per = F.cross_entropy(m(idx).view(-1, V), tgt.view(-1), ignore_index=-1, reduction="none").view(3, 12)
        return {"mean": per.sum() / (tgt >= 0).sum(), "sum": per.sum(), "none": (per * w).sum()}[reduction]

    g1, g2 = _grads(m, ours), _grads(m, plain)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-5, rtol=1e-4), name


def test_gradient_reaches_every_parameter():
    m = tiny("iberis")
    idx = torch.randint(0, V, (2, 16))
    m(idx, torch.roll(idx, -1, 1)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs_raise():
    m = tiny()
    with pytest.raises(ChibiError, match="seq_len"):
        m(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ChibiError, match="token ids"):
        m(torch.full((1, 4), V, dtype=torch.long))
    with pytest.raises(ChibiError, match="targets"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -2, dtype=torch.long))
    with pytest.raises(ChibiError, match="zero tokens"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -1, dtype=torch.long))
    with pytest.raises(ChibiError, match="reduction"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), reduction="avg")
    # a loss is over every position and through the masters: last_only= and weights= are for logits
    from chibichat.model.decode import DecodeWeights

    ids = torch.zeros(1, 4, dtype=torch.long)
    for kw in (dict(last_only=True), dict(weights=DecodeWeights(m))):
        with pytest.raises(ChibiError, match="drop weights= and last_only=, which are for logits"):
            m(ids, ids, **kw)
    assert m(ids, last_only=True).shape == (1, 1, V)  # without targets both stay


def test_bf16_compute_close_to_fp32():
    m = tiny("iberis")
    idx = torch.randint(0, V, (2, 16))
    tgt = torch.roll(idx, -1, 1)
    l32 = m(idx, tgt)
    m16 = GPT(m.config, RunConfig(compute_dtype=torch.bfloat16))
    m16.load_state_dict(m.state_dict())
    l16 = m16(idx, tgt)
    l16.backward()
    assert l16.dtype == torch.float32 and abs(l16.item() - l32.item()) < 0.05
    assert all(p.grad.dtype == torch.float32 for p in m16.parameters())


def test_conv_matches_conv1d():
    torch.manual_seed(0)
    v, taps = torch.randn(2, 9, 6), torch.randn(6, 3)
    c, hist = causal_depthwise_conv(v, taps, torch.zeros(2, 2, 6))
    ref = F.conv1d(F.pad(v.transpose(1, 2), (2, 0)), taps[:, None, :], groups=6).transpose(1, 2)
    assert torch.allclose(c, ref, atol=1e-6)
    assert torch.equal(hist, v[:, -2:])


# ------------------------------------------------------------------------------------------------
# incremental decoding == full forward


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_incremental_equals_full(name):
    m = tiny(**LAYOUTS[name])
    idx = torch.randint(0, V, (2, 20))
    full = m(idx)
    st = m.new_state(2, 24)
    one_by_one = torch.cat([m(idx[:, i : i + 1], state=st) for i in range(20)], dim=1)
    assert torch.allclose(one_by_one, full, atol=1e-5), (one_by_one - full).abs().max()
    assert st.pos.tolist() == [20, 20]
    st = m.new_state(2, 24)
    chunks = [m(idx[:, a:b], state=st) for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("name", ["dense", "iberis", "window"])
def test_expand_after_batch1_prefill(name):
    m = tiny(**LAYOUTS[name])
    prompt = torch.randint(0, V, (1, 9))
    cont = torch.randint(0, V, (3, 6))  # three samples continue differently
    st = m.new_state(1, 24)
    m(prompt, state=st)
    st = st.expand(3)
    got = torch.cat([m(cont[:, i : i + 1], state=st) for i in range(6)], dim=1)
    full = m(torch.cat([prompt.expand(3, -1), cont], dim=1))[:, 9:]
    assert torch.allclose(got, full, atol=1e-5)


@pytest.mark.parametrize("name", ["dense", "slc2-only", "iberis", "gqa", "window"])
def test_stack_prompts_of_different_lengths(name):
    m = tiny(**LAYOUTS[name])
    prompts = [torch.randint(0, V, (1, n)) for n in (3, 11, 6)]
    cont = torch.randint(0, V, (3, 5))
    states = []
    for p in prompts:
        s = m.new_state(1, 24)
        m(p, state=s)
        states.append(s)
    st = InferenceState.stack(states)
    assert st.pos.tolist() == [3, 11, 6]
    got = torch.cat([m(cont[:, i : i + 1], state=st) for i in range(5)], dim=1)
    for r, p in enumerate(prompts):
        alone = m(torch.cat([p, cont[r : r + 1]], dim=1))[:, p.shape[1] :]
        assert torch.allclose(got[r : r + 1], alone, atol=1e-5), (name, r)
    # select keeps rows (in the given order) and they continue identically
    sub = st.select([2, 0])
    assert sub.pos.tolist() == [11, 8]


def test_state_clone_is_independent():
    m = tiny("iberis")
    st = m.new_state(1, 24)
    m(torch.randint(0, V, (1, 5)), state=st)
    c = st.clone()
    a = m(torch.tensor([[1]]), state=st)
    b = m(torch.tensor([[1]]), state=c)
    assert torch.equal(a, b) and st.pos.item() == c.pos.item() == 6


@pytest.mark.parametrize("name", ["dense", "iberis", "gqa"])
def test_state_rows_move_and_views_write_through(name):
    """The server's slot moves: copy_row puts a row (its filled positions) into another state's row and it
    continues as it would have; a forward over head(n) advances rows 0..n-1 of the full state once
    keep_histories has stored the SLC2 histories it made."""
    m = tiny(**LAYOUTS[name])
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    full = m(idx)
    pre = m.new_state(2, 24)
    m(idx[:, :6], state=pre)
    slots = m.new_state(3, 24)
    slots.copy_row(2, pre, 1, 6)  # row 1 of the prefill into slot 2, then slot 2 into slot 0
    slots.copy_row(0, slots, 2, 6)
    assert slots.pos.tolist() == [6, 0, 6]
    view = slots.head(2, [6, 6])
    out = m(torch.stack([idx[1, 6:7], idx[1, 6:7]]), state=view)
    slots.keep_histories(view)
    slots.pos[:2] += 1  # as the server does: the view advanced its own counter, not the full state's
    assert torch.allclose(out[0, 0], full[1, 6], atol=1e-5)
    again = slots.head(1, [7])
    assert torch.allclose(m(idx[1:, 7:8], state=again)[0, 0], full[1, 7], atol=1e-5)


def test_state_errors():
    m = tiny("iberis")
    st = m.new_state(2, 8)
    with pytest.raises(ChibiError, match="max_len"):
        m(torch.zeros(2, 9, dtype=torch.long), state=st)
    stacked = InferenceState.stack([m.new_state(1, 8), m.new_state(1, 8)])
    m(torch.zeros(1, 2, dtype=torch.long), state=stacked.select([0])) # fine on its own
    a, b = m.new_state(1, 8), m.new_state(1, 8)
    m(torch.zeros(1, 1, dtype=torch.long), state=a)
    uneven = InferenceState.stack([a, b])  # rows at positions 1 and 0
    with pytest.raises(ChibiError, match="same position"):
        m(torch.zeros(2, 2, dtype=torch.long), state=uneven)
    with pytest.raises(ChibiError, match="batch-1"):
        st.expand(3)
    with pytest.raises(ChibiError, match="max_len"):
        InferenceState.stack([m.new_state(1, 8), m.new_state(1, 9)])
    with pytest.raises(ChibiError, match="rows"):
        m(torch.zeros(3, 1, dtype=torch.long), state=st)
    with pytest.raises(ChibiError, match="out of range"):
        st.select([2])


def test_decoding_past_seq_len_grows_rope():
    m = tiny("iberis", seq_len=8)
    st = m.new_state(1, 20)
    out = torch.cat([m(torch.tensor([[i % V]]), state=st) for i in range(20)], dim=1)
    assert out.shape == (1, 20, V) and torch.isfinite(out).all()
    # the first seq_len positions still equal the full forward
    assert torch.allclose(out[:, :8], m(torch.arange(8)[None]), atol=1e-5)


def test_explicit_and_sdpa_attention_agree(monkeypatch):
    m = tiny("AASA", windows=[0, 5, 0, 0], n_kv_head=2)
    idx = torch.randint(0, V, (2, 20))
    explicit = m(idx)
    monkeypatch.setattr(gpt_mod, "EXPLICIT_ATTENTION_MAX_SCORES", 0)  # force SDPA
    assert torch.allclose(m(idx), explicit, atol=1e-5)
    st = m.new_state(2, 24)  # and the incremental path through SDPA with a mask
    steps = torch.cat([m(idx[:, i : i + 1], state=st) for i in range(20)], dim=1)
    assert torch.allclose(steps, explicit, atol=1e-5)


def test_large_softcap_uses_max_shift():
    cfg = GPTConfig(vocab_size=V, seq_len=16, n_layer=2, n_embd=32, n_head=4, n_kv_head=4, softcap=200.0)
    m = GPT(cfg)
    perturb(m)
    with torch.no_grad():
        m.lm_head.mul_(300)  # logits far from 0 so exp(logit - softcap) would underflow without the max shift
    idx = torch.randint(0, V, (2, 10))
    logits = m(idx)
    ref = F.cross_entropy(logits.view(-1, V), idx.view(-1))
    assert torch.isfinite(ref) and torch.allclose(m(idx, idx), ref, rtol=1e-5)


def test_rmsnorm_matches_reference_and_gradcheck():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + gpt_mod.NORM_EPS)
    assert torch.allclose(gpt_mod.norm(x.float()).double(), ref, atol=1e-6)
    assert torch.autograd.gradcheck(gpt_mod.norm, (x,))
    xb = x.detach().to(torch.bfloat16)
    assert gpt_mod.norm(xb).dtype == torch.bfloat16
    assert torch.allclose(gpt_mod.norm(xb).double(), gpt_mod.norm(xb.double()), atol=1e-2)


@pytest.mark.parametrize("layers", ["dense", "SA"])
def test_bf16_training_tracks_fp32(layers):
    """The same model, data and optimizer trained in bf16 and in fp32 compute follow the same loss
    curve: the per-step gap stays far below the ~2.5 nats the loss falls (a Markov chain with 4
    successors per token, from ln 256 towards ln 4), and the final losses agree closely.
    Newton-Schulz runs in bf16 in both runs (the optimizer's default), so only the compute dtype differs."""
    from chibichat.bench.train import markov_batches
    from chibichat.train.optim import build_optimizer

    data = markov_batches(40, 8, 32, 256, seed=0)

    def curve(dtype):
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=256, seq_len=32, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, layers=layers)
        model = GPT(cfg, RunConfig(compute_dtype=dtype))
        s = (64 / 768) ** -0.5
        opt = build_optimizer(model.param_groups(), matrix_lr=0.02, embedding_lr=0.2 * s,
                              unembedding_lr=0.004 * s, other_lr=0.02 * s,
                              compute_dtype=model.compute_dtype)
        out = []
        for x, y in data:
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return torch.tensor(out)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster on a shared 2-core machine
    try:
        f32, bf16 = curve(torch.float32), curve(torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert f32[0] == pytest.approx(math.log(256), abs=0.01) and bf16[0] == pytest.approx(math.log(256), abs=0.01)
    assert f32[-5:].mean() < f32[0] - 1.5, f32  # it learns
    gap = (bf16 - f32).abs()
    assert gap.max() < 0.02, gap  # measured: 0.003 (dense), 0.002 (SA)
    assert (bf16[-5:].mean() - f32[-5:].mean()).abs() < 0.01, (bf16[-5:], f32[-5:])


def _first_block_input(model, idx):
    """The residual stream entering block 0 in a training forward (autograd on)."""
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        model(idx, idx).backward()
    finally:
        handle.remove()
    return seen[0]


def test_embed_noise_is_uniform_of_the_given_rms_in_training_only():
    """RunConfig(embed_noise=r): a training forward adds noise of RMS r (bounded by r*sqrt(3)) to the normed
    embeddings; a forward without autograd (scoring, sampling) is the noise-free model's, bit for bit."""
    clean = tiny()
    noisy = GPT(clean.config, RunConfig(embed_noise=0.3))
    noisy.load_state_dict(clean.state_dict())
    idx = torch.randint(0, V, (8, 24), generator=torch.Generator().manual_seed(3))
    diff = _first_block_input(noisy, idx) - _first_block_input(clean, idx)
    assert diff.pow(2).mean().sqrt().item() == pytest.approx(0.3, rel=0.05)
    assert diff.abs().max().item() <= 0.3 * math.sqrt(3) + 1e-6
    with torch.no_grad():
        assert torch.equal(noisy(idx, idx), clean(idx, idx))
        assert torch.equal(noisy(idx), clean(idx))
    torch.manual_seed(5)
    a = noisy(idx, idx)
    torch.manual_seed(5)
    assert torch.equal(noisy(idx, idx), a)  # drawn from torch's seeded generator: a seeded run repeats


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_embed_noise_refuses_a_negative_or_non_finite_rms(bad):
    with pytest.raises(ChibiError, match="embed_noise must be a finite number >= 0"):
        RunConfig(embed_noise=bad)
