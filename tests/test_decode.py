"""The lean decode path (chibichat/model/decode.py): same logits as the full forward and as
GPT.forward_step for every layout, state interplay (expand/select/stack), errors, weight changes."""

import logging

import pytest
import torch

from chibichat.common import ChibiError, init_runtime
from chibichat.engine import Engine, prepare_for_inference
from chibichat.model import decode as decode_mod
from chibichat.model.decode import Decoder, StepDecoder, decoder_for
from chibichat.model.gpt import GPT, GPTConfig, InferenceState
from chibichat.tokenizer import Tokenizer
from test_model import LAYOUTS as MODEL_LAYOUTS

V = 61


pytestmark = pytest.mark.usefixtures("one_thread")

# every layout the model's own tests cover, plus grouped-query attention under sliding windows
LAYOUTS = {**MODEL_LAYOUTS, "gqa-window": dict(layers="AAAA", n_kv_head=1, windows=[4, 0, 2, 0])}


def tiny(layers="dense", n_head=4, n_kv_head=4, windows=None, n_layer=4, seq_len=24, n_embd=32, k=3, vocab=V):
    cfg = GPTConfig(vocab_size=vocab, seq_len=seq_len, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                    n_kv_head=n_kv_head, layers=layers, windows=windows, conv_kernel=k)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg)
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
def test_decoder_expand_clone_and_forward_step_share_state(name):
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
    # the same state layout: GPT.forward_step continues a Decoder's state (and vice versa)
    ref = torch.cat([m.forward_step(cont[:, i : i + 1], twin) for i in range(6)], dim=1)
    full = m(torch.cat([prompt.expand(3, -1), cont], dim=1))[:, 9:]
    assert torch.allclose(got, full, atol=1e-5) and torch.allclose(ref, full, atol=1e-5)
    assert twin.lengths == st3.lengths == [15, 15, 15]


def test_decoder_sdpa_branch_agrees(monkeypatch):
    m = tiny("AASA", windows=[0, 5, 0, 0], n_kv_head=2)
    idx = torch.randint(0, V, (2, 20))
    full = m(idx)
    monkeypatch.setattr(decode_mod, "EXPLICIT_ATTENTION_MAX_SCORES", 0)  # force SDPA everywhere
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
def test_decoder_bf16_matches_forward_step(name):
    """In bf16 (weights stored in bf16, as chat/serve/bench prepare them) the decoder computes the same
    function as forward_step: both round at the same places, so they agree to bf16 precision."""
    m = prepare_for_inference(tiny(**LAYOUTS[name]), torch.bfloat16)
    d = Decoder(m)
    idx = torch.randint(0, V, (2, 16))
    a, b = d.new_state(2, 24), m.new_state(2, 24)
    assert a.layers[0][0].dtype == torch.bfloat16
    got = torch.cat([d.forward(idx[:, :10], a)] + [d.forward(idx[:, i : i + 1], a) for i in range(10, 16)], dim=1)
    ref = torch.cat([m.forward_step(idx[:, :10], b)] + [m.forward_step(idx[:, i : i + 1], b) for i in range(10, 16)], dim=1)
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
        alone = m.forward_step(torch.cat([idx[:1, :n], torch.tensor([[(4, 9)[r]]])], dim=1), s)[0, -1]
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
    ref = torch.cat([m.forward_step(ids[:, i : i + 1], ref_state) for i in range(20)], dim=1)
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
                          ns_dtype=torch.float32)  # fmt: skip
    m(torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))).backward()
    assert d.matches(m)
    opt.step()
    assert not d.matches(m)
    assert Decoder(m).matches(m)


def test_decoder_for_picks_the_fast_path_for_gpts_only():
    m = tiny("dense")
    assert isinstance(decoder_for(m), Decoder)

    class Wrapped:  # anything with new_state/forward_step
        def __init__(self, inner):
            self.inner = inner

        def new_state(self, b, n):
            return self.inner.new_state(b, n)

        def forward_step(self, idx, state):
            return self.inner.forward_step(idx, state)

    patched = tiny("dense")
    patched.forward_step = lambda idx, state: torch.zeros(idx.shape[0], idx.shape[1], V)  # a scripted double
    assert isinstance(decoder_for(patched), StepDecoder)
    w = Wrapped(m)
    sd = decoder_for(w)
    assert isinstance(sd, StepDecoder) and sd.matches(w)
    st = sd.new_state(1, 24)
    out = sd.forward(torch.randint(0, V, (1, 5)), st, last_only=True)
    assert out.shape == (1, 1, V)


# -- opt-in compiled one-token steps (chibichat/model/compiled.py) ---------------------------------


@pytest.fixture
def fp32_rows_compiled(monkeypatch):
    # fp32 compiles one-row steps only (speed); tests compile several rows too, where fp32's tight
    # tolerance checks the per-row masks and cache writes.
    from chibichat.model import compiled as compiled_mod

    monkeypatch.setattr(compiled_mod, "FP32_MAX_ROWS", 64)


@pytest.mark.parametrize("name", ["iberis", "gqa-window", "slc2-only"])
def test_compiled_step_equals_eager_decoder(name, fp32_rows_compiled):
    """The compiled step (whole-cache attention under a per-row mask) computes the eager Decoder's
    logits, for rows at different positions, and compiles once for all the steps of one shape."""
    from torch._dynamo.utils import counters

    m = tiny(**LAYOUTS[name])
    eager, comp = Decoder(m), Decoder(m, compile=True)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, V, (1, n), generator=g) for n in (3, 11, 6)]
    cont = torch.randint(0, V, (3, 6), generator=g)
    states = {}
    for key, d in (("eager", eager), ("comp", comp)):
        parts = []
        for p in prompts:
            s = d.new_state(1, 24)
            d.forward(p, s, last_only=True)
            parts.append(s)
        states[key] = InferenceState.stack(parts)
    assert states["comp"].max_len == 64  # rounded up so different requests share a graph
    graphs_before = counters["stats"]["unique_graphs"]
    for i in range(cont.shape[1]):
        a = eager.forward(cont[:, i : i + 1], states["eager"])
        b = comp.forward(cont[:, i : i + 1], states["comp"])
        assert torch.allclose(a, b, atol=1e-5), (i, (a - b).abs().max())
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # no recompiles between steps
    assert list(comp.compiled.graphs) == [(3, 64)]
    assert states["comp"].lengths == states["eager"].lengths == [9, 17, 12]
    # the compiled decoder's state is an ordinary InferenceState: the model's own step continues it
    nxt = torch.tensor([[1], [2], [3]])
    assert torch.allclose(m.forward_step(nxt, states["comp"]), eager.forward(nxt, states["eager"]), atol=1e-5)


def test_compiled_engine_generates_the_same_tokens(monkeypatch, caplog, fp32_rows_compiled):
    """Greedy generation through the Engine is identical with compile on (fp32 dense), and a shape
    past the compile cap runs eager with the same result."""
    from chibichat.model import compiled as compiled_mod

    tok = Tokenizer([bytes([i]) for i in range(256)], split="gpt4")
    m = tiny("dense", vocab=tok.vocab_size, seq_len=48)
    rt = init_runtime("cpu", "float32")
    prompts = [[tok.bos_id, 65, 66, 67], [tok.bos_id, 70]]
    gen = lambda e, ps: [s[0].tokens for s in e.generate(ps, max_tokens=12, temperature=0, tools=False)]  # noqa: E731
    plain, comp = Engine(m, tok, rt), Engine(m, tok, rt, compile=True)
    assert gen(comp, prompts) == gen(plain, prompts)
    assert len(comp.decoder().compiled.graphs) == 1
    monkeypatch.setattr(compiled_mod, "MAX_COMPILED_SHAPES", 1)
    with caplog.at_level(logging.INFO, logger="chibichat.model.compiled"):
        assert gen(comp, prompts[:1]) == gen(plain, prompts[:1])  # batch 1: a new shape, eager
    assert len(comp.decoder().compiled.graphs) == 1
    assert "batch 1, max_len 64 run eager" in caplog.text  # said once, not silently
    monkeypatch.setattr(compiled_mod, "FP32_MAX_ROWS", 1)  # the default: fp32 batches run eager
    d = Decoder(m, compile=True)
    st = d.new_state(2, 8)
    assert d.compiled.step(torch.zeros(2, 1, dtype=torch.long), st, d.cos[:, 0], d.sin[:, 0], d.key_pos) is None


def test_compiled_bf16_agrees_and_rejects_fp16():
    m = prepare_for_inference(tiny("iberis"), torch.bfloat16)
    eager, comp = Decoder(m), Decoder(m, compile=True)
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    a, b = eager.new_state(2, 24), comp.new_state(2, 24)
    eager.forward(idx[:, :8], a)
    comp.forward(idx[:, :8], b)
    for i in range(8, 12):
        x, y = eager.forward(idx[:, i : i + 1], a), comp.forward(idx[:, i : i + 1], b)
        assert torch.allclose(x, y, atol=0.1), (x - y).abs().max()
    with pytest.raises(ChibiError, match="float32 and bfloat16"):
        Decoder(prepare_for_inference(tiny("dense"), torch.float16), compile=True)


@pytest.mark.slow  # two compiles: ~10-20 s on 2 cores
def test_compiled_graphs_have_their_own_recompile_limit(monkeypatch):
    """Dynamo's recompile limit counts compiled graphs per code object: each (batch, max_len) graph of
    each Decoder has its own, so compiling more shapes (or more Decoders: RL builds one per update)
    never reaches the limit and fails (fullgraph=True) or falls back to eager."""
    import torch._dynamo

    from chibichat.model import compiled as compiled_mod

    monkeypatch.setattr(compiled_mod, "CPP_WRAPPER", False)  # irrelevant here; saves a C++ build per graph
    m = tiny("dense")
    eager = Decoder(m)
    idx = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch._dynamo.config.patch(recompile_limit=1):
        for d in (Decoder(m, compile=True),):
            for max_len in (24, 100):  # rounded to 64 and 128: two graphs per Decoder
                a, b = eager.new_state(1, max_len), d.new_state(1, max_len)
                eager.forward(idx[:, :4], a)
                d.forward(idx[:, :4], b)
                for i in (4, 5):
                    x, y = eager.forward(idx[:, i : i + 1], a), d.forward(idx[:, i : i + 1], b)
                    assert torch.allclose(x, y, atol=1e-5), (x - y).abs().max()
            assert list(d.compiled.graphs) == [(1, 64), (1, 128)]
