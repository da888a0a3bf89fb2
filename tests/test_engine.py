"""Engine: sampling against hand-computed distributions, incremental == full-forward greedy decoding,
independent samples, reproducibility, the tool state machine, stop reasons and UTF-8-safe streaming."""

import math

import pytest
import torch

from chibichat.common import ChibiError, init_runtime
from chibichat.engine import (Engine, SamplingParams, apply_penalties, apply_repetition_penalty, sample_next,
                              sampling_probs)
from chibichat.model.gpt import GPT, GPTConfig
from chibichat.tokenizer import Tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer([bytes([i]) for i in range(256)], split="gpt4")  # byte-level: no training needed


@pytest.fixture(scope="module")
def rt():
    return init_runtime("cpu", "float32")


def random_model(tok, layers, seq_len=48, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=seq_len, n_layer=len(layers), n_embd=32, n_head=4,
                    n_kv_head=2, layers=layers)  # fmt: skip
    model = GPT(cfg)
    with torch.no_grad():  # fresh init zeroes the output projections and head: make every layer matter
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


# -- sampling -------------------------------------------------------------------------------------


def logits_of(probs):
    return torch.log(torch.tensor([probs], dtype=torch.float32))


def test_top_p_keeps_smallest_set_reaching_p():
    p = sampling_probs(logits_of([0.5, 0.3, 0.2]), 1.0, top_p=0.7)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0]]), atol=1e-6)
    # unsorted input: the kept set is found by probability, not position
    p = sampling_probs(logits_of([0.2, 0.5, 0.3]), 1.0, top_p=0.7)
    assert torch.allclose(p, torch.tensor([[0.0, 0.625, 0.375]]), atol=1e-6)
    # the most likely token is always kept
    p = sampling_probs(logits_of([0.2, 0.5, 0.3]), 1.0, top_p=0.01)
    assert torch.allclose(p, torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.allclose(sampling_probs(logits_of([0.5, 0.3, 0.2]), 1.0, top_p=1.0), torch.tensor([[0.5, 0.3, 0.2]]))


def test_top_k_and_temperature():
    p = sampling_probs(logits_of([0.1, 0.5, 0.15, 0.25]), 1.0, top_k=2)
    assert torch.allclose(p, torch.tensor([[0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75]]), atol=1e-6)
    # T = 2 on log-probs: p_i^(1/2) renormalised
    q = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    p = sampling_probs(logits_of([0.5, 0.3, 0.2]), 2.0)
    assert torch.allclose(p, (q / q.sum())[None], atol=1e-6)
    # top-k then top-p: top-2 of [.4,.3,.2,.1] = [4/7, 3/7]; top_p .5 keeps only the first
    p = sampling_probs(logits_of([0.4, 0.3, 0.2, 0.1]), 1.0, top_k=2, top_p=0.5)
    assert torch.allclose(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_repetition_penalty_values():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5]]))
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_sampled_frequencies_match_distribution():
    g = torch.Generator().manual_seed(0)
    logits = logits_of([0.5, 0.3, 0.2]).expand(20000, -1)
    got = sample_next(logits, SamplingParams(1.0, None, 0.7), g)
    freq = torch.bincount(got, minlength=3).float() / got.numel()
    assert freq[2] == 0
    assert abs(freq[0] - 0.625) < 0.02 and abs(freq[1] - 0.375) < 0.02


@pytest.mark.parametrize(
    "probs, params",
    [
        ([0.5, 0.3, 0.2], SamplingParams(1.0)),
        ([0.1, 0.5, 0.15, 0.25], SamplingParams(1.0, top_k=2)),
        ([0.5, 0.3, 0.2], SamplingParams(2.0)),
        ([0.4, 0.3, 0.2, 0.1], SamplingParams(1.0, top_k=3, top_p=0.6)),
        ([0.2, 0.5, 0.3], SamplingParams(0.5, top_p=0.9)),
    ],
)
def test_sampler_follows_sampling_probs(probs, params):
    """sample_next takes shortcuts (top-k subsets, a nucleus probe, one uniform per row located in the
    cumulative sums instead of multinomial): its draws must still follow sampling_probs' distribution."""
    g = torch.Generator().manual_seed(1)
    logits = logits_of(probs)
    want = sampling_probs(logits, params.temperature, params.top_k, params.top_p)[0]
    got = sample_next(logits.expand(20000, -1), params, g)
    freq = torch.bincount(got, minlength=len(probs)).float() / got.numel()
    assert torch.allclose(freq, want, atol=0.015), (freq, want)
    assert (freq[want == 0] == 0).all()


def test_draw_locates_each_uniform_in_the_cumulative_weights():
    from chibichat.engine import _draw

    # cumulative weights 0.2, 0.2, 0.7, 1.0: the zero-weight token 1 is never drawn, ties go right
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).expand(6, -1)
    u = torch.tensor([[0.0], [0.1999], [0.2], [0.6999], [0.7], [0.999999]], dtype=torch.float64)
    assert _draw(probs, u).tolist() == [0, 0, 2, 2, 3, 3]
    # weights need not sum to 1; a uniform of 1 (rounding of u * total) stops at the last weighted token
    assert _draw(torch.tensor([[1.0, 3.0, 0.0, 0.0]]), torch.tensor([[0.25]], dtype=torch.float64)).tolist() == [1]
    assert _draw(torch.tensor([[1.0, 3.0, 0.0, 0.0]]), torch.tensor([[1.0]], dtype=torch.float64)).tolist() == [1]
    # several blocks, whole blocks of zeros: the two-level search equals one search of the full cumulative sum
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 300, generator=g) * (torch.rand(64, 300, generator=g) < 0.3)
    probs[:, 64:192] = 0
    u = torch.rand(64, 1, generator=g, dtype=torch.float64)
    cdf = torch.cumsum(probs.double(), dim=-1)
    want = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    got = _draw(probs, u)
    assert torch.equal(got, want) and bool((probs.gather(1, got[:, None]) > 0).all())


def test_nucleus_probe_falls_back_to_full_sort():
    # 1000 near-equal tokens: the top NUCLEUS_PROBE hold far less than top_p, so the full sort is used
    g = torch.Generator().manual_seed(2)
    logits = torch.zeros(4000, 1000)
    logits[:, :10] = -50.0  # ten tokens that the nucleus (0.95 of the mass) must exclude
    got = sample_next(logits, SamplingParams(1.0, top_p=0.95), g)
    assert int(got.min()) >= 10
    assert len(torch.unique(got)) > 600  # spread over the whole nucleus, not just the probe


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 0.0, 1.0]])
    assert sample_next(logits, SamplingParams(0.0), None).tolist() == [1, 0]


def test_tiny_temperature_is_greedy(tok, rt):
    # logits / 1e-38 overflowed float32 to inf, softmax gave NaN and the draw an index out of range
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g) * 5
    for params in (SamplingParams(1e-38, 50), SamplingParams(1e-38), SamplingParams(1e-38, top_p=0.9)):
        assert sample_next(logits, params.validate(), g).tolist() == logits.argmax(-1).tolist()
    assert torch.equal(sampling_probs(logits, 1e-38), torch.nn.functional.one_hot(logits.argmax(-1), 300).float())
    from chibichat.engine import _Group, draw_together

    engine = Engine(random_model(tok, "A"), tok, rt)
    x = torch.randn(2, tok.vocab_size, generator=g) * 5
    groups = [_Group(engine, 2, 10, SamplingParams(1e-38, 50), seed, None) for seed in (0, 1)]
    assert draw_together([(grp, x) for grp in groups]) == [x.argmax(-1).tolist()] * 2


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5},
                                {"repetition_penalty": 0}])  # fmt: skip
def test_bad_sampling_params(kw):
    with pytest.raises(ChibiError):
        SamplingParams(**kw).validate()


# -- decoding -------------------------------------------------------------------------------------


def full_forward_greedy(model, prompt, max_tokens, stop_ids):
    ids = list(prompt)
    out = []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        t = int(torch.argmax(logits))
        out.append(t)
        if t in stop_ids:
            break
        ids.append(t)
    return out


@pytest.mark.parametrize("layers", ["AAAA", "SSSS", "ASSA"])
def test_incremental_greedy_equals_full_forward(tok, rt, layers):
    model = random_model(tok, layers)
    engine = Engine(model, tok, rt)
    prompts = [[tok.bos_id, 72, 105], [tok.bos_id, 7], [tok.bos_id, 72, 105, 33, 10, 200], [tok.bos_id, 5, 9]]
    out = engine.generate(prompts, num_samples=2, max_tokens=20, temperature=0.0, tools=False)
    total = 0
    for prompt, samples in zip(prompts, out):
        want = full_forward_greedy(model, prompt, 20, engine.stop_ids)
        total += len(want)
        for s in samples:
            assert s.tokens == want
            assert s.forced == [0] * len(want)
    assert total >= 30  # most rows ran long enough to exercise many decode steps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layers", ["AAAA", "ASSA"])
def test_cuda_incremental_greedy_equals_full_forward(tok, layers):
    rt = init_runtime("cuda", "float32")
    model = random_model(tok, layers).to(rt.device)
    engine = Engine(model, tok, rt)
    prompts = [[tok.bos_id, 72, 105], [tok.bos_id, 7, 9, 11, 13]]
    out = engine.generate(prompts, num_samples=2, max_tokens=16, temperature=0.0, tools=False)
    for prompt, samples in zip(prompts, out):
        ids, want = list(prompt), []
        for _ in range(16):
            with torch.no_grad():
                t = int(torch.argmax(model(torch.tensor([ids], device=rt.device))[0, -1]))
            want.append(t)
            if t in engine.stop_ids:
                break
            ids.append(t)
        assert all(s.tokens == want for s in samples)


def test_samples_are_independent_from_the_first_token(tok, rt):
    model = random_model(tok, "AS")
    with torch.no_grad():
        model.lm_head.mul_(0.01)  # near-uniform next-token distribution
    engine = Engine(model, tok, rt)
    samples = engine.generate([[tok.bos_id, 1]], num_samples=8, max_tokens=3, temperature=1.0, seed=3, tools=False)[0]
    firsts = [s.tokens[0] for s in samples]
    assert len(set(firsts)) > 1, firsts  # REFERENCE §20 #16: the first token was broadcast upstream


def test_reproducible_per_seed(tok, rt):
    engine = Engine(random_model(tok, "AS"), tok, rt)
    kw = dict(num_samples=3, max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, tools=False)
    a = engine.generate([[tok.bos_id, 1], [tok.bos_id]], seed=7, **kw)
    b = engine.generate([[tok.bos_id, 1], [tok.bos_id]], seed=7, **kw)
    c = engine.generate([[tok.bos_id, 1], [tok.bos_id]], seed=8, **kw)
    assert [[s.tokens for s in x] for x in a] == [[s.tokens for s in x] for x in b]
    assert [[s.tokens for s in x] for x in a] != [[s.tokens for s in x] for x in c]


def test_length_and_argument_errors(tok, rt):
    model = random_model(tok, "A", seq_len=16)
    engine = Engine(model, tok, rt)
    s = engine.generate([[tok.bos_id]], max_tokens=5, temperature=0, tools=False)[0][0]
    if s.finish_reason == "length":
        assert len(s.tokens) == 5
    with pytest.raises(ChibiError, match="seq_len"):
        engine.generate([[tok.bos_id] * 10], max_tokens=7)
    long_prompt = [tok.bos_id] * 10
    assert len(engine.generate([long_prompt], max_tokens=None, temperature=0, tools=False)[0][0].tokens) <= 6
    for bad in (dict(prompts=[]), dict(prompts=[[]]), dict(prompts=[[99999]]), dict(prompts=[[1]], num_samples=0),
                dict(prompts=[[1]], max_tokens=0), dict(prompts=[[1]], tools="shell")):  # fmt: skip
        with pytest.raises(ChibiError):
            engine.generate(**{"prompts": [[1]], **bad})
    other = Tokenizer([bytes([i]) for i in range(256)] + [b"ab"], split="gpt4")
    with pytest.raises(ChibiError, match="vocab"):
        Engine(model, other, rt)


# -- tools and stop tokens with a scripted model --------------------------------------------------


class Scripted(torch.nn.Module):
    """A real GPT's state machinery with scripted logits: next token = table[last token fed], or
    with `script`, next token = script[position - 1] (position of the token fed, prompt included)."""

    def __init__(self, model, table, default, script=None):
        super().__init__()
        self.inner, self.config, self.table, self.default, self.script = model, model.config, table, default, script

    def new_state(self, batch_size, max_len):
        return self.inner.new_state(batch_size, max_len)

    def forward(self, idx, state=None, **options):
        pos = state.pos.clone()
        self.inner(idx, state=state)
        B, t = idx.shape
        logits = torch.zeros(B, t, self.config.vocab_size)
        for b in range(B):
            for j in range(t):
                if self.script is not None:
                    p = int(pos[b]) + j - 1
                    nxt = self.script[p] if 0 <= p < len(self.script) else self.default
                else:
                    nxt = self.table.get(int(idx[b, j]), self.default)
                logits[b, j, nxt] = 10.0
        return logits


def chain(pairs):
    return {a: b for a, b in zip(pairs, pairs[1:])}


def calculator_engine(tok, rt):
    """An engine whose model, after prompt token 65, calls the calculator on "12*3" and ends after its output;
    returns it and the ids of <|python_start|>, <|python_end|>, <|output_start|>, <|output_end|>,
    <|assistant_end|>."""
    sid = tok.special_id
    ps, pe, os_, oe, ae = (sid(n) for n in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                             "<|output_end|>", "<|assistant_end|>"))  # fmt: skip
    table = chain([65, ps, *tok.encode("12*3"), pe])
    table[oe] = ae
    return Engine(Scripted(random_model(tok, "AS"), table, default=88), tok, rt), (ps, pe, os_, oe, ae)


def test_calculator_tool_forces_output(tok, rt):
    engine, (ps, pe, os_, oe, ae) = calculator_engine(tok, rt)
    plain = dict(chain([66, 67, ae]))  # a second prompt that never calls the tool
    engine.model.table.update(plain)
    out = engine.generate([[tok.bos_id, 65], [tok.bos_id, 66]], max_tokens=30, temperature=0)
    s = out[0][0]
    want = [ps, *tok.encode("12*3"), pe, os_, *tok.encode("36"), oe, ae]
    assert s.tokens == want
    assert s.forced == [0] * 6 + [1] * 4 + [0]
    assert s.finish_reason == "stop"
    assert s.text == "<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>"
    assert out[1][0].tokens == [67, ae] and out[1][0].forced == [0, 0]
    pieces = list(engine.stream([tok.bos_id, 65], max_tokens=30, temperature=0))
    assert "".join(pieces) == "<<12*3=36>>"
    # without tools nothing is forced: the model's own (scripted) token follows python_end
    s = engine.generate([[tok.bos_id, 65]], max_tokens=8, temperature=0, tools=False)[0][0]
    assert s.forced == [0] * len(s.tokens) and os_ not in s.tokens


def test_logprobs_of_tool_forced_tokens_are_certain(tok, rt):
    """A token the tool forced was not drawn: logprob 0.0 with itself the only alternative (never the -inf the
    tool-output markers have under the model's masked logits), so the logprobs of a reply sum to those of the
    model's own choices."""
    import math

    engine, (ps, pe, os_, oe, ae) = calculator_engine(tok, rt)
    forced = [os_, *tok.encode("36"), oe]
    for k, alternatives in ((2, lambda t: [(t, 0.0)]), (0, lambda t: [])):
        result = {}
        list(engine.stream_choices([tok.bos_id, 65], 1, 30, 0.0, None, None, 1.0, 0, True, result, top_logprobs=k))
        c = result["choices"][0]
        assert c["tokens"] == [ps, *tok.encode("12*3"), pe, *forced, ae]
        assert c["logprobs"][6:10] == [(0.0, alternatives(t)) for t in forced]
        assert all(math.isfinite(lp) and all(math.isfinite(v) for _, v in top) for lp, top in c["logprobs"])
        assert all(len(top) == k for lp, top in c["logprobs"][:6])


def test_failed_tool_call_injects_its_error(tok, rt):
    sid = tok.special_id
    ps, pe, os_, oe, ae = (sid(n) for n in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                             "<|output_end|>", "<|assistant_end|>"))  # fmt: skip
    error = 'Error: only the forms "text".count("x"), "-".join("text") and "text".strip() may be called'
    # the script's tokens where the result is forced are never sampled: padding
    script = [ps, *tok.encode("__import__('os')"), pe] + [88] * (len(tok.encode(error)) + 2) + [ae]
    engine = Engine(Scripted(random_model(tok, "A", seq_len=256), {}, default=88, script=script), tok, rt)
    s = engine.generate([[tok.bos_id, 65]], max_tokens=200, temperature=0)[0][0]
    assert s.tokens[-len(tok.encode(error)) - 3 :] == [os_, *tok.encode(error), oe, ae]
    assert sum(s.forced) == len(tok.encode(error)) + 2
    assert "".join(engine.stream([tok.bos_id, 65], max_tokens=200, temperature=0)) == f"<<__import__('os')={error}>>"
    # cut right after python_end by max_tokens: the annotation is still closed
    n = len(tok.encode("__import__('os')")) + 2
    assert "".join(engine.stream([tok.bos_id, 65], max_tokens=n, temperature=0)) == "<<__import__('os')>>"


def test_tool_call_making_a_lone_surrogate_gets_an_error_result(tok, rt):
    """A call whose string result could not be tokenized ended the whole generation with a ChibiError."""
    ps, pe, ae = (tok.special_id(n) for n in ("<|python_start|>", "<|python_end|>", "<|assistant_end|>"))
    error = "Error: string literal has a lone surrogate U+D800, which is no character"
    call = '"\\ud800".strip()'
    script = [ps, *tok.encode(call), pe] + [88] * (len(tok.encode(error)) + 2) + [ae]
    engine = Engine(Scripted(random_model(tok, "A", seq_len=256), {}, default=88, script=script), tok, rt)
    assert "".join(engine.stream([tok.bos_id, 65], max_tokens=200, temperature=0)) == f"<<{call}={error}>>"


def test_model_never_writes_tool_output_itself(tok, rt):
    """A model that wants to write <|output_start|> (after a failed call, or anywhere) cannot: only
    the tool's forced result opens an output. Its next choice is sampled instead."""
    sid = tok.special_id
    os_, oe, ae = sid("<|output_start|>"), sid("<|output_end|>"), sid("<|assistant_end|>")
    table = {65: os_, os_: oe, oe: ae}
    engine = Engine(Scripted(random_model(tok, "A"), table, default=88), tok, rt)
    for tools in (True, False):
        s = engine.generate([[tok.bos_id, 65]], max_tokens=6, temperature=0, tools=tools)[0][0]
        assert os_ not in s.tokens and oe not in s.tokens and len(s.tokens) == 6
        for seed in range(3):
            s = engine.generate([[tok.bos_id, 65]], max_tokens=6, temperature=1.0, seed=seed, tools=tools)[0][0]
            assert os_ not in s.tokens and oe not in s.tokens


def test_tool_errors_name_the_failure():
    from chibichat.tools import run_tool

    assert run_tool("calculator", "7/0") == "Error: division by zero"
    assert run_tool("calculator", "36+36*ice") == "Error: Name is not allowed in a calculator expression"
    assert run_tool("calculator", "10**400") == "Error: exponent 400 exceeds the bound 64"
    assert run_tool("calculator", "45 plus 38") == "Error: not a valid expression: invalid syntax"


def test_python_tool_error_is_the_exception_text():
    from chibichat.tools import TOOL_ERROR_CHARS, run_tool

    assert run_tool("python", "36+36*ice") == "Error: NameError: name 'ice' is not defined"
    assert run_tool("python", "print(1)\nraise ValueError('bad\\nline')") == "Error: ValueError: bad line"
    assert run_tool("python", "x = (") .startswith("Error: SyntaxError:")
    long = run_tool("python", "raise ValueError('v' * 500)")
    assert long == "Error: ValueError: " + "v" * (TOOL_ERROR_CHARS - 3 - len("ValueError: ")) + "..."
    assert run_tool("python", "while True: pass") == "Error: timed out after 2 s (wall clock)"


def test_python_tool_errors_instead_of_raising():
    from chibichat.tools import run_tool

    # the parser gives up on these (RecursionError, ValueError): they run as scripts and report why
    assert run_tool("python", "-" * 3000 + "1").startswith("Error: ")
    assert run_tool("python", "1\x00").startswith("Error: ")
    # a bare expression with a trailing comment still prints its value; commas stay python's
    assert run_tool("python", 'len("abc")  # length') == "3"
    assert run_tool("python", "(3,4)") == "(3, 4)"
    assert run_tool("python", "1,5+1") == "(1, 6)"
    assert run_tool("python", "max(1,234, 5)") == "234"
    # a call whose value is None shows only what it printed, as a REPL does
    assert run_tool("python", "print(1)") == "1"
    assert run_tool("python", "[].sort()") == ""
    assert run_tool("python", "words = 'word ' * 100000\nprint(words)") == (
        "Error: output of 499999 characters exceeds the 100000 a call may return")


def test_a_failing_tool_is_the_calls_result_not_a_crash(tok, rt, monkeypatch):
    import chibichat.engine as engine_module

    def broken(kind, source):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(engine_module, "run_tool", broken)
    sid = tok.special_id
    ps, pe, ae = (sid(n) for n in ("<|python_start|>", "<|python_end|>", "<|assistant_end|>"))
    script = [ps, *tok.encode("1+1"), pe] + [88] * 80 + [ae]
    engine = Engine(Scripted(random_model(tok, "A", seq_len=128), {}, default=88, script=script), tok, rt)
    s = engine.generate([[tok.bos_id, 65]], max_tokens=100, temperature=0)[0][0]
    assert ("<|python_end|><|output_start|>Error: the tool failed: RecursionError: maximum recursion depth "
            "exceeded<|output_end|>") in s.text


def test_tool_output_that_does_not_fit_is_an_error(tok, rt):
    sid = tok.special_id
    ps, pe, os_, oe, ae = (sid(n) for n in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                             "<|output_end|>", "<|assistant_end|>"))

    def run(call, max_tokens, tools="calculator"):
        script = [ps, *tok.encode(call), pe] + [88] * 300 + [ae]
        engine = Engine(Scripted(random_model(tok, "A", seq_len=256), {}, default=88, script=script), tok, rt)
        s = engine.generate([[tok.bos_id, 65]], max_tokens=max_tokens, temperature=0, tools=tools)[0][0]
        after = len(call) + 2  # the byte-level tokenizer: one token per character of the call
        return s, s.tokens[after:], s.forced[after:]

    call = '"-".join("' + "a" * 100 + '")'  # a result of 199 tokens
    s, out, forced = run(call, len(call) + 2 + 60)
    error = "Error: output of 199 tokens exceeds the 58 left"
    assert out[: len(error) + 2] == [os_, *tok.encode(error), oe] and forced[: len(error) + 2] == [1] * (len(error) + 2)
    assert out[len(error) + 2 :] == [88] * (60 - len(error) - 2) and s.finish_reason == "length"
    # no room even for the error: the row ends at the call, no output opened
    s, out, _ = run(call, len(call) + 4)
    assert s.tokens[-1] == pe and out == [] and s.finish_reason == "length"
    # a python call printing 10**5 words: its output is refused before it is tokenized, and the error fits
    call = "words = 'word ' * 10**5\nprint(words)"
    s, out, _ = run(call, 120, tools="python")
    error = "Error: output of 499999 characters exceeds the 100000 a call may return"
    assert out[: len(error) + 2] == [os_, *tok.encode(error), oe]


def test_python_tool_runs_in_sandbox(tok, rt):
    sid = tok.special_id
    ps, pe, ae = (sid(n) for n in ("<|python_start|>", "<|python_end|>", "<|assistant_end|>"))
    result = "['a', 'b', 'c']"
    script = [ps, *tok.encode("sorted('cab')"), pe] + [88] * (len(result) + 2) + [ae]
    engine = Engine(Scripted(random_model(tok, "A", seq_len=160), {}, default=88, script=script), tok, rt)
    s = engine.generate([[tok.bos_id, 65]], max_tokens=60, temperature=0, tools="python")[0][0]
    assert s.text.endswith(f"<|python_end|><|output_start|>{result}<|output_end|>") and s.finish_reason == "stop"
    # the calculator's error (about 90 tokens) needs a larger budget: an output that does not fit is not shown
    s = engine.generate([[tok.bos_id, 65]], max_tokens=150, temperature=0, tools="calculator")[0][0]
    assert "<|python_end|><|output_start|>Error: only the forms" in s.text and result not in s.text


def test_stop_on_bos_and_length(tok, rt):
    table = chain([65, 66, tok.bos_id])
    engine = Engine(Scripted(random_model(tok, "A"), table, default=70), tok, rt)
    s = engine.generate([[tok.bos_id, 65]], max_tokens=10, temperature=0)[0][0]
    assert s.tokens == [66, tok.bos_id] and s.finish_reason == "stop" and s.text == "B"
    s = engine.generate([[tok.bos_id, 70]], max_tokens=4, temperature=0)[0][0]
    assert s.tokens == [70] * 4 and s.finish_reason == "length"


def test_stream_never_splits_utf8(tok, rt):
    text = "日本語です、ok"
    data = list(text.encode("utf-8"))
    ae = tok.special_id("<|assistant_end|>")
    engine = Engine(Scripted(random_model(tok, "A", seq_len=64), {}, default=ae, script=data + [ae]), tok, rt)
    result = {}
    pieces = list(engine.stream([tok.bos_id, 65], max_tokens=40, temperature=0, result=result))
    assert "".join(pieces) == text
    assert all(p and "\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["日", "本", "語"]
    assert result["finish_reason"] == "stop" and result["completion_tokens"] == len(data) + 1


def test_stop_matcher_holds_back_possible_starts():
    from chibichat.engine import StopMatcher

    m = StopMatcher(["cd", "xyz"])
    assert [m.feed(p) for p in ("ab", "c", "x", "y", "q", "c")] == ["ab", "", "c", "", "xyq", ""]
    assert not m.stopped
    assert m.feed("d") == "" and m.stopped and m.feed("more") == "" and m.flush() == ""
    m = StopMatcher(["ab"])
    assert m.feed("xxa") == "xx" and m.feed("bc") == "" and m.stopped  # stop split across pieces
    m = StopMatcher(["ab", "b"])  # the earliest match wins, whichever string it is
    assert m.feed("zab") == "z" and m.stopped
    m = StopMatcher(["。"])
    assert m.feed("こんにちは。さよなら") == "こんにちは" and m.stopped
    m = StopMatcher(["xy"])
    assert m.feed("abx") == "ab" and m.flush() == "x"  # the text ended: the held-back "x" was not a stop
    m = StopMatcher([])
    assert m.feed("abc") == "abc" and m.flush() == ""


def test_stream_choices_with_stop_strings(tok, rt):
    text = "one two three four"
    data = list(text.encode("utf-8"))
    ae = tok.special_id("<|assistant_end|>")
    engine = Engine(Scripted(random_model(tok, "AS", seq_len=64), {}, default=ae, script=data + [ae]), tok, rt)
    prompt = [tok.bos_id, 65]
    result = {}
    pieces = list(engine.stream_choices(prompt, 3, max_tokens=40, temperature=0, stop=["thr", "ou"], result=result))
    assert {i for i, _ in pieces} == {0, 1, 2}
    for i in range(3):
        assert "".join(p for j, p in pieces if j == i) == "one two "
    # generation ended at the token completing "thr": 11 tokens, not the full 19
    assert [c["finish_reason"] for c in result["choices"]] == ["stop"] * 3
    assert [c["completion_tokens"] for c in result["choices"]] == [len("one two thr")] * 3
    assert result["completion_tokens"] == 3 * len("one two thr")
    # no stop string: the whole text, finish "stop" from <|assistant_end|>; a non-matching one: the same
    for stop in (None, ["zzz"], ["four"]):
        r = {}
        out = "".join(engine.stream(prompt, max_tokens=40, temperature=0, stop=stop, result=r))
        if stop == ["four"]:
            assert out == "one two three " and r["finish_reason"] == "stop"
        else:
            assert out == text and r["finish_reason"] == "stop" and r["completion_tokens"] == len(data) + 1
    r = {}
    assert "".join(engine.stream(prompt, max_tokens=5, temperature=0, stop=["e t"], result=r)) == "on"
    assert r["finish_reason"] == "stop"  # the stop string completed exactly at the last allowed token
    r = {}
    assert "".join(engine.stream(prompt, max_tokens=4, temperature=0, stop=["e t"], result=r)) == "one "
    assert r["finish_reason"] == "length"  # "e " could still have been a stop string, but the budget ended
    with pytest.raises(ChibiError, match="stop"):
        list(engine.stream(prompt, stop=[""]))


# -- bench infer ----------------------------------------------------------------------------------


def test_bench_infer_measures_a_tiny_model():
    from chibichat.bench.infer import format_table, measure

    cfg = dict(layout="iberis", dtype="float32", device="cpu", depth=3, width=64, vocab=300, prompt=8, decode=4,
               batches=[1, 2], repeats=1, threads=1)  # fmt: skip
    r = measure(cfg)
    for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b2", "sampled_tok_s_b1",
                "sampled_tok_s_b2", "weights_mib", "peak_mib", "ops_per_step"):
        assert r[key] > 0, key
    # exact bytes: fp32 weights; state for batch 2 of 13 tokens. iberis at depth 3 = "SAA":
    # 2 attention layers x (k, v) x 2 rows x 1 head x 13 x 64, plus 1 conv history of 2 rows x (k-1=2) x 64
    assert r["weights_mib"] * 2**20 == r["params"] * 4
    # decode copies: fused QKV (2 layers x 3 x 64 x 64) and SLC2 input (64 + 64 + 1 + 64 rows x 64), fp32;
    # transposed wide weights (fp32 CPU): MLP up (3 x 256 x 64), head (300 x 64)
    fused = 2 * 3 * 64 * 64 + (64 + 64 + 1 + 64) * 64
    # and, for batched rows, a oneDNN-packed copy of every projection (params minus embedding and taps)
    packed = r["params"] - 300 * 64 - 3 * 64
    assert r["decoder_copies_mib"] * 2**20 == 4 * (fused + 3 * 256 * 64 + 300 * 64 + packed)
    assert r["state_mib"] * 2**20 == 4 * (2 * 2 * 2 * 1 * 13 * 64 + 1 * 2 * 2 * 64)
    table = format_table([r], [1, 2])
    assert "greedy tok/s b2" in table and "sampled tok/s b1" in table and "iberis" in table


def test_bench_infer_cli_rejects_bad_flags(capsys):
    from chibichat.cli import main

    assert main(["bench", "infer", "--layouts", "dense,XYZ"]) == 2
    assert "layout" in capsys.readouterr().err
    assert main(["bench", "infer", "--width", "100"]) == 2
    assert main(["bench", "infer", "--dtypes", "float64"]) == 2
    assert main(["bench", "infer", "--clock", "cpu", "--threads", "2", "--device", "cpu"]) == 2
    assert "--threads 1" in capsys.readouterr().err
    assert main(["bench", "infer", "--dtype", "bfloat16"]) == 2  # not silently measured at both dtypes
    assert capsys.readouterr().err.strip() == (
        "chibichat bench: error: bench infer measures every dtype of --dtypes (default: float32,bfloat16), not "
        "--dtype: give --dtypes bfloat16 instead of --dtype bfloat16")
    assert main(["bench", "infer", "--dtype", "auto"]) == 2
    assert capsys.readouterr().err.strip().endswith("not --dtype: drop it")


def test_bench_infer_refuses_repeats_cpu_float16_negative_threads_and_a_bad_json_before_any_run(tmp_path, monkeypatch,
                                                                                                capsys):
    """Each of these used to start configuration processes first: a repeated value was measured twice (a repeated
    batch size's columns overwritten), float16 and --threads -1 failed in their configuration's process after the
    others had run (the former naming --dtype, a flag bench infer refuses), a bad --json after every run."""
    from chibichat.bench import infer
    from chibichat.cli import main

    monkeypatch.setattr(infer.subprocess, "run", lambda *a, **k: pytest.fail("a configuration ran"))
    for argv, message in (
            (["--batches", "1,8,1"], "--batches lists 1 more than once; list each value once"),
            (["--layouts", "dense,dense"], "--layouts lists dense more than once; list each value once"),
            # an empty entry was skipped: "--dtypes float32," silently measured one dtype
            (["--dtypes", "float32,"], "--dtypes has an empty entry in 'float32,': remove the extra comma"),
            (["--layouts", "dense,,iberis"], "--layouts has an empty entry in 'dense,,iberis': remove the extra comma"),
            (["--batches", "1,,8"], "--batches has an empty entry in '1,,8': remove the extra comma"),
            (["--batches", "1,eight"], "--batches must be a comma-separated list of integers, e.g. 1,8, got '1,eight'"),
            (["--dtypes", "float32,float16", "--device", "cpu"],
             "--dtypes float16 is not supported on CPU (--device cpu); use bfloat16 or float32"),
            (["--threads", "-1"], "--threads must be >= 0 (0: torch's choice), got -1"),
            (["--json", str(tmp_path)], f"--json {tmp_path} is a directory; pass the path of a file")):
        assert main(["bench", "infer", *argv]) == 2, argv
        assert capsys.readouterr().err.strip() == f"chibichat bench: error: {message}"
    assert infer._parse_list("float32, bfloat16", "dtypes") == ["float32", "bfloat16"]
    assert infer._parse_list("1,8", "batches", int) == [1, 8]


# -- continuous batching ----------------------------------------------------------------------------


def run_batcher(engine, specs, max_rows=16, join_after=3):
    """Submit the first job, then the others once it has streamed `join_after` steps (so they join a
    running batch at other positions); returns per job (texts per choice, result)."""
    import threading

    from chibichat.engine import Batcher, Job

    batcher = Batcher(engine, max_rows=max_rows)
    outs = [{"texts": [""] * s["n"], "result": None, "steps": 0, "done": threading.Event()} for s in specs]
    started = threading.Event()

    def emitter(out):
        def emit(events):
            out["steps"] += 1
            if out["steps"] >= join_after:
                started.set()
            for kind, value in events:
                if kind == "piece":
                    out["texts"][value[0]] += value[1]
                elif kind == "done":
                    out["result"] = value
                    out["done"].set()
                    started.set()
                else:
                    out["result"] = value
                    out["done"].set()
        return emit

    try:
        for i, s in enumerate(specs):
            job = Job(s["prompt"], s["n"], s["max_tokens"], SamplingParams(**s["params"]), s["seed"], s.get("tools"),
                      emitter(outs[i]), tuple(s.get("stop", ())), s.get("top_logprobs"))  # fmt: skip
            batcher.submit(job)
            if i == 0:
                assert started.wait(60)
        for out in outs:
            assert out["done"].wait(60)
    finally:
        batcher.stop(timeout=10)
    assert batcher.rows == 0
    return [(o["texts"], o["result"]) for o in outs]


@pytest.mark.parametrize("layers", ["AA", "SA"])
def test_batcher_output_equals_single_request_output(tok, rt, layers):
    """Requests decoded together (joining a running batch at different positions, rows leaving as they
    finish) give exactly the text, tokens and finish reasons each gives alone with the same seed."""
    engine = Engine(random_model(tok, layers, seq_len=64), tok, rt)
    specs = [
        {"prompt": [tok.bos_id, *tok.encode("hello")], "n": 2, "max_tokens": 20, "seed": 1,
         "params": {"temperature": 1.0, "top_k": 40}},
        {"prompt": [tok.bos_id, *tok.encode("a longer prompt here")], "n": 1, "max_tokens": 9, "seed": 2,
         "params": {"temperature": 0.0}, "top_logprobs": 2},
        {"prompt": [tok.bos_id, 70], "n": 3, "max_tokens": 14, "seed": 3,
         "params": {"temperature": 0.8, "top_p": 0.9, "presence_penalty": 1.5, "frequency_penalty": 0.5}},
        {"prompt": [tok.bos_id, *tok.encode("xy")], "n": 1, "max_tokens": 16, "seed": 4,
         "params": {"temperature": 1.2, "repetition_penalty": 1.3}, "stop": ("e",)},
        {"prompt": [tok.bos_id, *tok.encode("zw")], "n": 2, "max_tokens": 12, "seed": 5,
         "params": {"temperature": 0.9}},  # as long as the previous prompt: both are prefilled together
        # settings shared with another job: drawn together with it (engine.draw_together)
        {"prompt": [tok.bos_id, 71, 72], "n": 2, "max_tokens": 18, "seed": 6,
         "params": {"temperature": 1.0, "top_k": 40}},
        {"prompt": [tok.bos_id, 73], "n": 1, "max_tokens": 10, "seed": 7, "params": {"temperature": 0.0}},
        {"prompt": [tok.bos_id, 74, 75, 76], "n": 1, "max_tokens": 15, "seed": 8, "params": {"temperature": 0.9}},
    ]  # fmt: skip
    batched = run_batcher(engine, specs)
    for s, (texts, result) in zip(specs, batched):
        alone: dict = {}
        p = s["params"]
        pieces = list(engine.stream_choices(s["prompt"], s["n"], s["max_tokens"], p["temperature"], p.get("top_k"),
                                            p.get("top_p"), p.get("repetition_penalty", 1.0), s["seed"], None, alone,
                                            list(s.get("stop", ())), p.get("presence_penalty", 0.0),
                                            p.get("frequency_penalty", 0.0), s.get("top_logprobs")))  # fmt: skip
        want = [""] * s["n"]
        for i, t in pieces:
            want[i] += t
        assert texts == want
        assert [c["tokens"] for c in result["choices"]] == [c["tokens"] for c in alone["choices"]]
        assert [c["finish_reason"] for c in result["choices"]] == [c["finish_reason"] for c in alone["choices"]]
        if s.get("top_logprobs"):
            got, ref = result["choices"][0]["logprobs"], alone["choices"][0]["logprobs"]
            assert len(got) == len(ref) == len(result["choices"][0]["tokens"])
            assert all(abs(a[0] - b[0]) < 1e-4 and [i for i, _ in a[1]] == [i for i, _ in b[1]] for a, b in zip(got, ref))
    assert any(len(set(t)) > 1 for t, _ in batched[:1])  # sampled choices differ from each other


def test_batcher_cancel_frees_rows_and_full_batch_waits(tok, rt):
    """A cancelled job leaves at the next step; a job that does not fit the free rows waits for them."""
    import threading
    import time

    from test_serve import slow_engine

    from chibichat.engine import Batcher, Job

    # steps of >= 20 ms that never sample an end token: job a is still live when b arrives, on any machine
    engine = slow_engine(Engine(random_model(tok, "A", seq_len=64), tok, rt), 0.02, endless=True)
    batcher = Batcher(engine, max_rows=2)
    events = {"a": [], "b": []}
    seen_a = threading.Event()

    def emit_a(ev):
        events["a"].extend(ev)
        seen_a.set()

    try:
        a = Job([tok.bos_id, 65], 2, 60, SamplingParams(1.0), 0, None, emit_a)
        batcher.submit(a)
        assert seen_a.wait(30)
        b = Job([tok.bos_id, 66], 1, 3, SamplingParams(0.0), 0, None, events["b"].extend)
        batcher.submit(b)
        time.sleep(0.2)
        assert batcher.rows == 2 and batcher.waiting == 1 and not events["b"]  # no free row for b yet
        # a waiting job that is cancelled stops counting at once and ends with an empty "done"
        c = Job([tok.bos_id, 67], 2, 3, SamplingParams(0.0), 0, None, events.setdefault("c", []).extend)
        batcher.submit(c)
        assert batcher.waiting == 2 and batcher.reserved == 5
        c.cancelled = True
        assert batcher.waiting == 1 and batcher.reserved == 3
        deadline = time.time() + 30
        while not events["c"] and time.time() < deadline:
            time.sleep(0.01)
        none = {"finish_reason": "cancelled", "tokens": [], "completion_tokens": 0}
        assert events["c"] == [("done", {"choices": [none, none], "completion_tokens": 0})]
        assert batcher.rows == 2  # a still holds both rows: c left without them
        steps = batcher.steps
        a.cancelled = True
        deadline = time.time() + 30
        while not any(k == "done" for k, _ in events["b"]) and time.time() < deadline:
            time.sleep(0.01)
        done_a = [v for k, v in events["a"] if k == "done"]
        assert done_a and [c["finish_reason"] for c in done_a[0]["choices"]] == ["cancelled", "cancelled"]
        # a's rows left within a step of the cancel: at most one more token each
        assert all(c["completion_tokens"] <= steps + 2 for c in done_a[0]["choices"])
        assert [v for k, v in events["b"] if k == "done"][0]["choices"][0]["completion_tokens"] == 3
        assert batcher.rows == 0
    finally:
        batcher.stop(timeout=10)


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    got = apply_penalties(logits, counts, SamplingParams(1.0, presence_penalty=0.5, frequency_penalty=0.25))
    assert torch.allclose(got, torch.tensor([[2.0 - 0.5 - 0.75, -1.0 - 0.5 - 0.25, 0.5, 1.0]]))
    # negative values encourage repeats; the repetition penalty composes (applied first)
    got = apply_penalties(logits, counts, SamplingParams(1.0, repetition_penalty=2.0, presence_penalty=-1.0))
    assert torch.allclose(got, torch.tensor([[1.0 + 1.0, -2.0 + 1.0, 0.5, 1.0]]))
    # greedy with a frequency penalty picks the best token the row has used least
    assert sample_next(logits, SamplingParams(0.0, frequency_penalty=1.0), None, counts=counts).tolist() == [3]
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"presence_penalty": "1"}):
        with pytest.raises(ChibiError, match=next(iter(bad))):
            SamplingParams(1.0, **bad).validate()


def test_draw_together_equals_sample_next(tok, rt):
    from chibichat.engine import _Group, draw_together

    engine = Engine(random_model(tok, "A"), tok, rt)
    V = tok.vocab_size
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(n, V, generator=g) * 3 for n in (1, 3, 2)]
    for params in (SamplingParams(0.0), SamplingParams(0.8), SamplingParams(1.0, top_k=5)):
        together = [_Group(engine, len(x), 10, params, seed, None) for seed, x in enumerate(logits)]
        alone = [_Group(engine, len(x), 10, params, seed, None) for seed, x in enumerate(logits)]
        for _ in range(3):  # the generators advance identically too
            got = draw_together(list(zip(together, logits)))
            want = [sample_next(x, params, grp.generator).tolist() for grp, x in zip(alone, logits)]
            assert got == want
    # top-p and penalties need sample_next's own path; a lone group gains nothing from batching
    for params in (SamplingParams(1.0, top_p=0.9), SamplingParams(1.0, presence_penalty=0.5)):
        groups = [_Group(engine, len(x), 10, params, 0, None) for x in logits]
        assert draw_together(list(zip(groups, logits))) == [None, None, None]
    assert draw_together([(_Group(engine, 1, 10, SamplingParams(0.8), 0, None), logits[0])]) == [None]
