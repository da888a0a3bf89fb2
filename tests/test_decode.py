"""Decoding over laid-out weights (chibichat/model/decode.py): same logits as the full forward and as
the model's forward with a state over its master weights, for every layout; state interplay
(expand/select/stack), errors, weight changes."""

import pytest
import torch

from chibichat.common import ChibiError, init_runtime
from chibichat.engine import Engine, prepare_for_inference
from chibichat.model import gpt as gpt_mod
from chibichat.model.decode import Decoder
from chibichat.model.gpt import GPT, GPTConfig, InferenceState, RunConfig
from chibichat.tokenizer import Tokenizer
from test_model import LAYOUTS as MODEL_LAYOUTS

V = 61


pytestmark = pytest.mark.usefixtures("one_thread")

# every layout the model's own tests cover, plus grouped-query attention under sliding windows
LAYOUTS = {**MODEL_LAYOUTS, "gqa-window": dict(layers="AAAA", n_kv_head=1, windows=[4, 0, 2, 0])}


def tiny(layers="dense", n_head=4, n_kv_head=4, windows=None, n_layer=4, seq_len=24, n_embd=32, k=3, vocab=V,
         dtype=torch.float32):
    cfg = GPTConfig(vocab_size=vocab, seq_len=seq_len, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                    n_kv_head=n_kv_head, layers=layers, windows=windows, conv_kernel=k)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg, RunConfig(compute_dtype=dtype))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised projections would make every layer an identity
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_decoder_equals_full_forward(name):
    m = tiny(**LAYOUTS[name])
    d = Decoder(m)
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(2))
    full = m(idx)
    st = d.new_state(2, 24)
    one_by_one = torch.cat([d.forward(idx[:, i : i + 1], st) for i in range(20)], dim=1)
    assert torch.allclose(one_by_one, full, atol=1e-5), (one_by_one - full).abs().max()
    assert st.pos.tolist() == [20, 20] and st.lengths == [20, 20]
    st = d.new_state(2, 24)
    chunks = [d.forward(idx[:, a:b], st) for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)
    st = d.new_state(2, 24)  # last_only: just the last position's logits
    last = d.forward(idx[:, :13], st, last_only=True)
    assert last.shape == (2, 1, V) and torch.allclose(last[:, 0], full[:, 12], atol=1e-5)


@pytest.mark.parametrize("name", ["dense", "slc2-only", "iberis", "gqa", "window", "gqa-window"])
def test_decoder_rows_at_different_positions(name):
    """Stacked prefills of different lengths, then select: every row continues as if alone."""
    m = tiny(**LAYOUTS[name])
    d = Decoder(m)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (1, n), generator=g) for n in (3, 11, 6)]
    cont = torch.randint(0, V, (3, 5), generator=g)
    states = []
    for p in prompts:
        s = d.new_state(1, 24)
        d.forward(p, s, last_only=True)
        states.append(s)
    st = InferenceState.stack(states)
    assert st.lengths == [3, 11, 6]
    got = torch.cat([d.forward(cont[:, i : i + 1], st) for i in range(3)], dim=1)
    sub = st.select([2, 0])  # drop the middle row mid-generation, reorder the others
    assert sub.lengths == [9, 6] and sub.pos.tolist() == [9, 6]
    more = torch.cat([d.forward(cont[[2, 0], i : i + 1], sub) for i in range(3, 5)], dim=1)
    for r, p in enumerate(prompts):
        alone = m(torch.cat([p, cont[r : r + 1]], dim=1))[:, p.shape[1] :]
        assert torch.allclose(got[r : r + 1], alone[:, :3], atol=1e-5), (name, r)
    for j, r in enumerate([2, 0]):
        alone = m(torch.cat([prompts[r], cont[r : r + 1]], dim=1))[:, prompts[r].shape[1] :]
        assert torch.allclose(more[j : j + 1], alone[:, 3:], atol=1e-5), (name, r)


@pytest.mark.parametrize("name", ["dense", "iberis"])
def test_decoder_expand_clone_and_model_forward_share_state(name):
    m = tiny(**LAYOUTS[name])
    d = Decoder(m)
    prompt = torch.randint(0, V, (1, 9))
    cont = torch.randint(0, V, (3, 6))
    st = d.new_state(1, 24)
    d.forward(prompt, st)
    st3 = st.expand(3)
    assert st3.lengths == [9, 9, 9]
    twin = st3.clone()
    got = torch.cat([d.forward(cont[:, i : i + 1], st3) for i in range(6)], dim=1)
    # the same state: the model's forward over its master weights continues a Decoder's state
    ref = torch.cat([m(cont[:, i : i + 1], state=twin) for i in range(6)], dim=1)
    full = m(torch.cat([prompt.expand(3, -1), cont], dim=1))[:, 9:]
    assert torch.allclose(got, full, atol=1e-5) and torch.allclose(ref, full, atol=1e-5)
    assert twin.lengths == st3.lengths == [15, 15, 15]


def test_decoder_sdpa_branch_agrees(monkeypatch):
    m = tiny("AASA", windows=[0, 5, 0, 0], n_kv_head=2)
    idx = torch.randint(0, V, (2, 20))
    full = m(idx)
    monkeypatch.setattr(gpt_mod, "EXPLICIT_ATTENTION_MAX_SCORES", 0)  # force SDPA everywhere
    d = Decoder(m)
    st = d.new_state(2, 24)
    chunks = [d.forward(idx[:, a:b], st) for a, b in ((0, 9), (9, 10), (10, 20))]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)
    rows = InferenceState.stack([d.new_state(1, 24), d.new_state(1, 24)])
    d.forward(idx[:1, :4], s1 := rows.select([0]))
    d.forward(idx[1:, :7], s2 := rows.select([1]))
    st = InferenceState.stack([s1, s2])
    step = d.forward(torch.tensor([[5], [6]]), st)
    assert torch.allclose(step[0, 0], m(torch.cat([idx[:1, :4], torch.tensor([[5]])], 1))[0, -1], atol=1e-5)
    assert torch.allclose(step[1, 0], m(torch.cat([idx[1:, :7], torch.tensor([[6]])], 1))[0, -1], atol=1e-5)


@pytest.mark.parametrize("name", ["dense", "iberis", "gqa"])
def test_decoder_bf16_matches_the_model_forward(name):
    """In bf16 (weights stored in bf16, as chat/serve/bench prepare them) the decoder's laid-out weights
    (oneDNN-packed on CPU) give the model's own forward with a state, to bf16 precision."""
    m = prepare_for_inference(tiny(**LAYOUTS[name], dtype=torch.bfloat16))
    d = Decoder(m)
    idx = torch.randint(0, V, (2, 16))
    a, b = d.new_state(2, 24), m.new_state(2, 24)
    assert a.layers[0][0].dtype == torch.bfloat16
    got = torch.cat([d.forward(idx[:, :10], a)] + [d.forward(idx[:, i : i + 1], a) for i in range(10, 16)], dim=1)
    ref = torch.cat([m(idx[:, :10], state=b)] + [m(idx[:, i : i + 1], state=b) for i in range(10, 16)], dim=1)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=0.1), (got - ref).abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # rows at different positions (the per-row cache write) in bf16 too
    states = []
    for n in (3, 7):
        s = d.new_state(1, 24)
        d.forward(idx[:1, :n], s)
        states.append(s)
    st = InferenceState.stack(states)
    step = d.forward(torch.tensor([[4], [9]]), st)
    for r, n in enumerate((3, 7)):
        s = m.new_state(1, 24)
        alone = m(torch.cat([idx[:1, :n], torch.tensor([[(4, 9)[r]]])], dim=1), state=s)[0, -1]
        assert torch.allclose(step[r, 0], alone, atol=0.1), (step[r, 0] - alone).abs().max()


def test_decoder_errors():
    m = tiny("iberis")
    d = Decoder(m)
    st = d.new_state(2, 8)
    with pytest.raises(ChibiError, match="max_len"):
        d.forward(torch.zeros(2, 9, dtype=torch.long), st)
    with pytest.raises(ChibiError, match="rows"):
        d.forward(torch.zeros(3, 1, dtype=torch.long), st)
    with pytest.raises(ChibiError, match=r"outside \[0, 61\)"):
        d.forward(torch.full((2, 1), V, dtype=torch.long), st)
    with pytest.raises(ChibiError, match="LongTensor"):
        d.forward(torch.zeros(2, dtype=torch.long), st)
    a, b = d.new_state(1, 8), d.new_state(1, 8)
    d.forward(torch.zeros(1, 2, dtype=torch.long), a)
    with pytest.raises(ChibiError, match="same position"):
        d.forward(torch.zeros(2, 2, dtype=torch.long), InferenceState.stack([a, b]))
    with pytest.raises(ChibiError, match="layer count"):
        d.forward(torch.zeros(1, 1, dtype=torch.long), tiny("AA", n_layer=2).new_state(1, 8))
    with pytest.raises(ChibiError, match="batch_size"):
        d.new_state(0, 8)


def test_decoder_past_seq_len_grows_rope():
    m = tiny("dense", seq_len=8)
    d = Decoder(m)
    st = d.new_state(1, 20)
    ids = torch.randint(0, V, (1, 20))
    got = torch.cat([d.forward(ids[:, i : i + 1], st) for i in range(20)], dim=1)
    ref_state = m.new_state(1, 20)
    ref = torch.cat([m(ids[:, i : i + 1], state=ref_state) for i in range(20)], dim=1)
    assert torch.allclose(got, ref, atol=1e-5)


def test_decoder_follows_weight_changes():
    """A Decoder copies weights: after an in-place update (an optimizer step) it no longer matches,
    and the Engine rebuilds it, so generation always uses the current weights."""
    tok = Tokenizer([bytes([i]) for i in range(256)], split="gpt4")
    m = tiny("iberis", vocab=tok.vocab_size, seq_len=32)
    d = Decoder(m)
    assert d.matches(m)
    engine = Engine(m, tok, init_runtime("cpu", "float32"))
    before = engine.generate([[tok.bos_id, 65, 66]], max_tokens=8, temperature=0, tools=False)[0][0].tokens
    with torch.no_grad():
        m.lm_head.mul_(-1.0)  # a different model: greedy picks change
    assert not d.matches(m)
    after = engine.generate([[tok.bos_id, 65, 66]], max_tokens=8, temperature=0, tools=False)[0][0].tokens
    fresh = Engine(m, tok, init_runtime("cpu", "float32"))
    assert after == fresh.generate([[tok.bos_id, 65, 66]], max_tokens=8, temperature=0, tools=False)[0][0].tokens
    assert after != before


def test_optimizer_step_invalidates_the_decoder():
    """RL trains the model the Engine samples from: a real MuonAdamW step must be seen by `matches`
    (it updates parameters in place through the dispatcher, which bumps their version counters)."""
    from chibichat.train.optim import build_optimizer

    m = tiny("iberis")
    m.train()
    d = Decoder(m)
    opt = build_optimizer(m.param_groups(), matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, other_lr=0.02,
                          compute_dtype=torch.float32)  # fmt: skip
    m(torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))).backward()
    assert d.matches(m)
    opt.step()
    assert not d.matches(m)
    assert Decoder(m).matches(m)


def test_decoder_lays_out_gpts_and_calls_anything_else_as_it_is():
    m = tiny("dense")
    assert Decoder(m).weights is not None and Decoder(m).extra_bytes(m) > 0

    class Wrapped:  # anything with new_state / forward(idx, state=...)
        def __init__(self, inner):
            self.inner = inner

        def new_state(self, b, n):
            return self.inner.new_state(b, n)

        def __call__(self, idx, state=None, **options):
            return self.inner(idx, state=state, **options)

    w = Wrapped(m)
    sd = Decoder(w)
    assert sd.weights is None and sd.matches(w) and not sd.matches(m) and sd.extra_bytes(m) == 0
    st = sd.new_state(1, 24)
    out = sd.forward(torch.randint(0, V, (1, 5)), st, last_only=True)
    assert out.shape == (1, 1, V) and st.lengths == [5]
