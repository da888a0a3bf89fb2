"""Generation: prefill once, decode incrementally, sample, use tools, stream text.

Flow of one `generate` call:
1. Prefill: prompts of equal length are prefilled together (a forward of t > 1 tokens needs equal
   positions); each prompt's last-position logits are kept. The per-prompt states are then laid out
   as rows [prompt0 x num_samples, prompt1 x num_samples, ...] with `select` (a row copy, like
   `expand`) and merged with `InferenceState.stack`. Rows of different lengths decode together
   because the model's forward takes per-row positions for one-token steps.
2. Decode: every step samples one token per row from that row's own logits (the first token too:
   upstream once broadcast the first sample to every row), runs the per-row tool
   state machine, and feeds all live rows one token. Finished rows are dropped from the batch.
3. Tools: `<|python_start|>` expr `<|python_end|>` -> the expression is evaluated and
   `<|output_start|>` result `<|output_end|>` is queued; queued tokens are fed one per step instead of
   sampling and flagged forced=1 (RL leaves them out of the loss). A failed call's result is its error
   ("Error: division by zero"), and so is a result that, with its two markers, does not fit in the
   tokens the row has left ("Error: output of N tokens exceeds the M left"): a forced output is never
   cut before its <|output_end|>. Tool output comes only from the tool: the model is never allowed to
   sample <|output_start|> or <|output_end|> itself (a small model that was taught "a call is followed by
   its output" would otherwise write an output of its own after a failed call, and the transcript would
   show a calculator result no calculator produced).

Continuous batching (`Batcher`, used by the server): one decode loop per model replica keeps a batch
of rows from many requests; requests join and leave between steps, each sampled by its own `_Group`
(the same class the loop above uses), so a request's output does not depend on its batch-mates.

Per-step host work is kept small (one device->host copy of the sampled ids per step, plain Python
lists for row bookkeeping) because on small models that overhead, not arithmetic, bounds tokens/s.
"""

from __future__ import annotations

import codecs
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

from chibichat.common import ChibiError
from chibichat.tools import MAX_EXPR_CHARS, known_result, run_tool, tool_error

TOOL_CHOICES = ("calculator", "python")


@dataclass
class Sample:
    tokens: list[int]  # generated ids only; ends with the stop token when finish_reason == "stop"
    forced: list[int]  # 1 where the token was forced by a tool (not sampled), same length as tokens
    finish_reason: str  # "stop" | "length"
    text: str  # decoded tokens without the final stop token; special tokens appear as their names


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token the row has produced
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time the row has produced the token

    def validate(self) -> "SamplingParams":
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise ChibiError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ChibiError(f"top_k must be a positive integer or None (off), got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ChibiError(f"top_p must be in (0, 1] or None (off), got {self.top_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise ChibiError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and -2 <= v <= 2):
                raise ChibiError(f"{name} must be in [-2, 2] (0 = off), got {v!r}")
        return self

    @property
    def penalised(self) -> bool:
        """Whether sampling needs each row's counts of the tokens it produced."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0


# ----------------------------------------------------------------------------------------------
# Sampling: pure functions of a (N, V) float logits tensor.


def apply_repetition_penalty(logits, seen, penalty: float):
    """CTRL-style penalty on tokens already generated in the row (`seen`, bool (N, V)): a positive
    logit is divided by `penalty`, a negative one multiplied, so the token always gets less likely."""
    import torch

    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sampling_probs(logits, temperature: float, top_k: int | None = None, top_p: float | None = None):
    """The distribution a row is sampled from: softmax(logits / T) restricted to the top-k tokens and
    then to the smallest set of most likely tokens whose mass reaches top_p, renormalised.
    temperature must be > 0 here (0 is greedy: see `sample_next`)."""
    import torch

    logits = _scaled(logits, temperature)
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep a token if the mass strictly before it is still below top_p: the most likely token
        # is always kept, and the set stops at the first token that reaches top_p.
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _scaled(logits, temperature: float):
    """float32 logits / temperature, each row shifted first so that its largest logit is 0: the scaled
    values are then <= 0 and a tiny temperature (1e-38) cannot overflow them to inf (and softmax to NaN);
    it leaves the argmax alone at 0 and sends the rest to -inf, i.e. greedy. Softmax subtracts the row's
    maximum anyway, so the distribution is the same."""
    logits = logits.float()
    return (logits - logits.amax(dim=-1, keepdim=True)) / temperature


# Nucleus candidates tried before a full sort: if the top NUCLEUS_PROBE tokens of every row already
# hold top_p of the mass, the nucleus lies among them and sorting all V logits is unnecessary.
NUCLEUS_PROBE = 64


def _uniform(n: int, generator, device):
    """The random numbers of one draw of n rows: one uniform in [0, 1) per row, (n, 1). float64 (float32
    on MPS, which has no float64) so that tokens far less likely than the top ones keep their share."""
    import torch

    dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    return torch.rand((n, 1), generator=generator, device=device, dtype=dtype)


# Tokens per block of the two-level search in `_draw`.
DRAW_BLOCK = 64


def _draw(probs, uniform):
    """One index per row of `probs` (N, K): non-negative weights, not necessarily normalised; with
    `uniform` from `_uniform`, row i gives j with probability probs[i, j] / sum(probs[i]), exactly
    (inverse transform sampling: the first j whose cumulative weight exceeds u * total).

    One uniform per row because the random numbers are what grows with the batch on CPU: an
    exponential race (argmax p / E, E ~ Exp(1)) needs K of them per row, ~3 ms per step for 32 rows
    over a 4,096-token vocabulary. A cumulative sum over all K is a sequential scan nearly as slow, so
    the search has two levels: vectorised sums of blocks of DRAW_BLOCK tokens find the block, and only
    that block is scanned. A zero weight adds nothing to a cumulative sum, so a token of probability
    zero is never drawn; the clamps below catch the rounding of u * total onto a block's end."""
    import torch

    N, K = probs.shape
    pad = -K % DRAW_BLOCK
    blocks = torch.nn.functional.pad(probs, (0, pad)) if pad else probs.contiguous()
    blocks = blocks.view(N, -1, DRAW_BLOCK).to(uniform.dtype)
    sums = blocks.sum(dim=-1)  # (N, blocks)
    ends = torch.cumsum(sums, dim=-1)
    x = uniform * ends[:, -1:]
    last = torch.searchsorted(ends, ends[:, -1:].contiguous())  # the last block with weight
    b = torch.minimum(torch.searchsorted(ends, x, right=True), last)  # (N, 1)
    start = ends.gather(1, b) - sums.gather(1, b)  # weight before block b
    inside = torch.cumsum(blocks[torch.arange(N, device=probs.device), b[:, 0]], dim=-1) + start  # (N, DRAW_BLOCK)
    j = torch.minimum(torch.searchsorted(inside, x, right=True), torch.searchsorted(inside, inside[:, -1:].contiguous()))
    return (b * DRAW_BLOCK + j).squeeze(-1)


def apply_penalties(logits, counts, params: SamplingParams):
    """Every penalty of `params` on (N, V) logits, given `counts` (N, V): how many times each row has
    produced each token so far. Repetition (CTRL-style, on tokens with a count), then OpenAI's
    presence (minus presence_penalty once a token appeared) and frequency (minus frequency_penalty per
    occurrence) penalties."""
    seen = counts > 0
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.presence_penalty:
        logits = logits - seen.to(logits.dtype) * params.presence_penalty
    if params.frequency_penalty:
        logits = logits - counts.to(logits.dtype) * params.frequency_penalty
    return logits


def sample_next(logits, params: SamplingParams, generator, seen=None, counts=None):
    """One token id per row (LongTensor (N,)), drawn from `sampling_probs(...)`'s distribution
    (tested by frequency), computed on as few candidates as possible. temperature 0 -> argmax.
    `seen` (bool (N, V)) applies the repetition penalty only; `counts` (N, V) every penalty."""
    import torch

    if counts is not None:
        logits = apply_penalties(logits, counts, params)
    elif seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = _scaled(logits, params.temperature)
    V = logits.shape[-1]
    top_k = params.top_k if params.top_k is not None and params.top_k < V else None
    top_p = params.top_p if params.top_p is not None and params.top_p < 1.0 else None
    if top_k is None and top_p is None:
        return _draw(torch.softmax(logits, dim=-1), _uniform(logits.shape[0], generator, logits.device))
    if top_k is not None:  # candidates = the top-k, renormalised among themselves
        vals, idx = torch.topk(logits, top_k, dim=-1)
        probs = torch.softmax(vals, dim=-1)
    else:  # candidates = a probe of the most likely tokens, with their mass in the full distribution
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        vals, idx = torch.topk(logits, min(NUCLEUS_PROBE, V), dim=-1)
        probs = torch.exp(vals - lse)
        if bool((probs.sum(dim=-1) < top_p).any()):
            vals, idx = torch.sort(logits, dim=-1, descending=True)
            probs = torch.exp(vals - lse)
    if top_p is not None:  # candidates are sorted by probability: keep the prefix reaching top_p
        before = torch.cumsum(probs, dim=-1) - probs
        probs = torch.where(before < top_p, probs, 0.0)
    return idx.gather(-1, _draw(probs, _uniform(probs.shape[0], generator, probs.device))[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Tools


@dataclass
class _Row:
    """Bookkeeping of one generated sequence."""

    tokens: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    queue: deque = field(default_factory=deque)  # tokens to force before sampling again
    expr: list[int] | None = None  # collecting a tool call when not None
    finish: str | None = None
    # with logprobs on: per token (logprob, [(id, logprob) of the most likely tokens]) of the model's
    # own distribution (log-softmax of the logits before temperature, top-k/p and penalties; the tool-output
    # markers, which only a tool may write, at -inf). A token forced by a tool was not drawn from it:
    # (0.0, [(id, 0.0)]), certain given the call, so a reply's logprobs sum to those of the model's choices
    logprobs: list = field(default_factory=list)


class _Group:
    """The rows one seeded generator samples together: the samples of one `generate` call, or one
    request of the continuous batcher. Each step it draws the next token of every live row from that
    row's logits (given in `live` order), runs the per-row tool state machine and keeps the penalty
    counts. The single-call decode loop and `Batcher` both drive this class, so a request decodes the
    same tokens in both (the same draws from the same generator in the same order)."""

    def __init__(self, engine: "Engine", n: int, max_tokens: int, params: SamplingParams, seed: int, tools,
                 top_logprobs: int | None = None):  # fmt: skip
        import torch

        self.engine, self.max_tokens, self.params, self.tools = engine, max_tokens, params, tools
        self.rows = [_Row() for _ in range(n)]
        self.live = list(range(n))  # row index of each logits row, in order
        self.generator = torch.Generator(device=engine.rt.device).manual_seed(seed)
        self.counts = None  # (live, V) tokens produced per row, when a penalty needs them
        self.top_logprobs = top_logprobs

    def sample(self, logits, drawn: list[int] | None = None) -> list[tuple[int, int, int, bool]]:
        """Next token of every live row -> [(row, token, forced, finished)]. `drawn`: the draws already
        made for these rows by `draw_together` (same values as sample_next would give)."""
        import torch

        dev = logits.device
        with torch.inference_mode():
            if self.counts is None and self.params.penalised:
                self.counts = torch.zeros(logits.shape, dtype=torch.float32, device=dev)
            sampled = drawn if drawn is not None else sample_next(logits, self.params, self.generator, counts=self.counts).tolist()
        emitted = []
        for b, r in enumerate(self.live):
            row = self.rows[r]
            if row.queue:
                tok, forced = row.queue.popleft(), 1
            else:
                tok, forced = sampled[b], 0
            row.tokens.append(tok)
            row.forced.append(forced)
            if not forced:
                self.engine._advance_tools(row, tok, self.tools, self.max_tokens - len(row.tokens))
            if row.finish is None and len(row.tokens) >= self.max_tokens:
                row.finish = "length"
            emitted.append((r, tok, forced, row.finish is not None))
        if self.counts is not None or self.top_logprobs is not None:
            with torch.inference_mode():
                toks = torch.tensor([e[1] for e in emitted], device=dev)
                if self.counts is not None:  # every token the row has produced so far (forced ones too)
                    self.counts[torch.arange(len(emitted), device=dev), toks] += 1
                if self.top_logprobs is not None:
                    self._logprobs(logits, toks, emitted)
        return emitted

    def _logprobs(self, logits, toks, emitted) -> None:
        import torch

        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = lp.gather(1, toks[:, None])[:, 0].tolist()
        top = [[]] * len(self.live)
        if self.top_logprobs:
            vals, ids = torch.topk(lp, min(self.top_logprobs, lp.shape[-1]), dim=-1)
            top = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
        for b, r in enumerate(self.live):
            _, tok, forced, _ = emitted[b]
            if forced:  # see _Row.logprobs (under the masked logits a forced marker would read -inf)
                self.rows[r].logprobs.append((0.0, [(tok, 0.0)] if self.top_logprobs else []))
            else:
                self.rows[r].logprobs.append((chosen[b], top[b]))

    def end(self, r: int, reason: str = "stop") -> None:
        if self.rows[r].finish is None:
            self.rows[r].finish = reason

    def keep(self) -> list[int]:
        """Positions (in `live`) of the rows that go on."""
        return [b for b, r in enumerate(self.live) if self.rows[r].finish is None]

    def compact(self, keep: list[int]) -> None:
        """Only the rows at positions `keep` stay live (finished rows leave the batch)."""
        import torch

        if len(keep) == len(self.live):
            return
        self.live = [self.live[b] for b in keep]
        if self.counts is not None and keep:
            self.counts = self.counts.index_select(0, torch.tensor(keep, device=self.counts.device))

    def feed(self) -> list[int]:
        """The token each live row feeds to the next step."""
        return [self.rows[r].tokens[-1] for r in self.live]


def draw_together(groups: list) -> list:
    """sample_next for many row groups at once, where that gives the same values: groups [(group,
    logits)] with the same temperature and top-k, no top-p and no penalty are drawn in one batched
    computation; each group still takes its uniforms from its own generator with the shape sample_next
    uses, and every other operation is row-wise, so each row's draw is the one sample_next makes.
    Returns, per group, the drawn ids, or None where the group must call sample_next itself."""
    import torch

    out: list = [None] * len(groups)
    buckets: dict = {}
    for i, (group, logits) in enumerate(groups):
        p = group.params
        V = logits.shape[-1]
        if p.penalised or (p.top_p is not None and p.top_p < 1.0):
            continue
        k = p.top_k if p.top_k is not None and p.top_k < V else None
        buckets.setdefault((p.temperature, k), []).append(i)
    for (temperature, k), idx in buckets.items():
        if len(idx) < 2:
            continue
        with torch.inference_mode():
            logits = torch.cat([groups[i][1] for i in idx])
            if temperature == 0:
                ids = torch.argmax(logits, dim=-1)
            else:
                logits = _scaled(logits, temperature)
                if k is not None:
                    vals, top = torch.topk(logits, k, dim=-1)
                    probs = torch.softmax(vals, dim=-1)
                else:
                    probs = torch.softmax(logits, dim=-1)
                uniform = torch.cat([_uniform(groups[i][1].shape[0], groups[i][0].generator, probs.device) for i in idx])
                ids = _draw(probs, uniform)
                if k is not None:
                    ids = top.gather(-1, ids[:, None]).squeeze(-1)
            ids = ids.tolist()
        at = 0
        for i in idx:
            n = groups[i][1].shape[0]
            out[i], at = ids[at : at + n], at + n
    return out


class _ChoiceText:
    """One sample's tokens -> the text pieces shown: UTF-8 never split, tool calls in the GSM8K style
    <<expr=result>> (a failed call's result is its "Error: ..."; <<expr>> when no result followed: tools off, or
    the reply ended first), stop strings cut with what may still become one held back (StopMatcher).
    parts_from_text is the inverse for the calls whose result is known without running code."""

    def __init__(self, engine: "Engine", stops: list[str]):
        self.engine = engine
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.matcher = StopMatcher(stops)
        self.unclosed = False  # a <|python_end|> whose result (or absence) is not known yet

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def feed(self, tok: int, finished: bool) -> str:
        e = self.engine
        piece = b""
        if self.unclosed and tok != e.output_start:
            piece = b">>"
        self.unclosed = tok == e.python_end
        if tok not in e.stop_ids:
            piece += e._shown[tok] if tok in e._shown else e.tokenizer.id_to_bytes(tok)
        text = self.matcher.feed(self.utf8.decode(piece))
        if finished and not self.matcher.stopped:  # the row's last token: flush what it holds
            text += self.matcher.feed((self.utf8.decode(b">>") if self.unclosed else "") + self.utf8.decode(b"", final=True))
            text += self.matcher.flush()
        return text


# A tool call's expression and the "=" after it, as _ChoiceText shows it: the first "=" outside string literals.
# Outside them the calculator has no operator with "=" or "<" (no comparison, no shift), so a "<" there ends the
# search (a failed call with one stays text); that also keeps a run of "<<" from being scanned once per position.
_EXPR_THEN_EQUALS = re.compile(r"""(?:[^<="']|"(?:[^"\\\n]|\\[\s\S])*"|'(?:[^'\\\n]|\\[\s\S])*')*=""")


def parts_from_text(text: str, tools) -> "str | list[dict]":
    """A reply as _ChoiceText showed it -> its content parts (Engine.to_parts), for the replies a client sends back
    as text in its chat history: each "<<expr=result>>" whose result is exactly what the tool returns for expr,
    known without running any code (tools.known_result: the calculator's value or error; under "python" only the
    calculator's value, as the server never runs a client's code), becomes a python and a python_output part;
    everything else stays text: a call with no result ("<<expr>>"), one whose result was replaced for want of room
    or needs the sandbox, an expression over MAX_EXPR_CHARS. `text` itself when nothing becomes a call (tools off:
    never, the server then shows no result)."""
    if tools in (None, False) or "<<" not in text:
        return text
    kind = "calculator" if tools is True else tools
    parts: list[dict] = []
    pos, i = 0, text.find("<<")
    while i != -1:
        m = _EXPR_THEN_EQUALS.match(text, i + 2, i + 3 + MAX_EXPR_CHARS)
        if m:
            expr, at = text[i + 2 : m.end() - 1], m.end()
            result = known_result(kind, expr)
            if result is not None and text.startswith(result + ">>", at):
                if i > pos:
                    parts.append({"type": "text", "text": text[pos:i]})
                parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
                pos = at + len(result) + 2
                i = text.find("<<", pos)
                continue
        i = text.find("<<", i + 1)
    if not parts:
        return text
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


class Engine:
    """Generation for one model + tokenizer on one device (see the module docstring)."""

    def __init__(self, model, tokenizer, rt):
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ChibiError(
                f"tokenizer vocab {tokenizer.vocab_size} != model vocab {model.config.vocab_size}: "
                "the checkpoint was trained with a different tokenizer"
            )
        self.model, self.tokenizer, self.rt = model, tokenizer, rt
        sid = tokenizer.special_id
        self.bos = sid("<|bos|>")
        self.assistant_end = sid("<|assistant_end|>")
        self.python_start, self.python_end = sid("<|python_start|>"), sid("<|python_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")
        self.stop_ids = frozenset((self.bos, self.assistant_end))
        # ids the model may not sample (tool_output_masked); a bench's stand-in tokenizer puts its
        # specials past the model's vocabulary, where there is nothing to mask
        self._forced_only = [i for i in (self.output_start, self.output_end) if i < model.config.vocab_size]
        # How streamed text shows tool calls: <|python_start|> -> "<<", <|output_start|> -> "=",
        # <|output_end|> -> ">>"; <|python_end|> shows nothing until the next token tells whether a result
        # follows ("<<expr=result>>") or none does (tools off: "<<expr>>").
        self._shown = {self.python_start: b"<<", self.python_end: b"", self.output_start: b"=", self.output_end: b">>"}
        self._decoder = None  # chibichat.model.decode.Decoder, rebuilt when the model's weights change

    def tool_output_masked(self, logits):
        """`logits` (rows, V) with the tool-output markers made impossible (in place): only a tool
        call's result, forced by `_advance_tools`, may open or close a tool output."""
        for i in self._forced_only:
            logits[:, i] = float("-inf")
        return logits

    def decoder(self):
        """The lean decode path for the model's current weights (built once, rebuilt after the
        weights change, e.g. between RL steps: a cheap fingerprint check per generate call)."""
        from chibichat.model.decode import Decoder

        if self._decoder is None or not self._decoder.matches(self.model):
            self._decoder = None  # free the old copy before making the new one
            self._decoder = Decoder(self.model)
        return self._decoder

    def sibling(self) -> "Engine":
        """Another Engine on the same model that shares this one's decoder (for worker threads on one
        CPU model: the Decoder holds a compute-dtype copy of the weights, ~10 MB bf16 / ~35 MB fp32 at d4,
        and only reads it while generating, so one copy serves every thread). Each engine still
        rebuilds its own decoder if the model's weights change."""
        twin = Engine(self.model, self.tokenizer, self.rt)
        twin._decoder = self.decoder()
        return twin

    @property
    def seq_len(self) -> int:
        return self.model.config.seq_len

    # -- argument checks ----------------------------------------------------------------------

    def _check(self, prompts, num_samples, max_tokens, tools):
        if not prompts:
            raise ChibiError("generate needs at least one prompt")
        V = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ChibiError(f"prompt {i} is empty; start it with <|bos|>")
            if min(p) < 0 or max(p) >= V:
                raise ChibiError(f"prompt {i} has token ids outside [0, {V}): wrong tokenizer for this model")
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ChibiError(f"num_samples must be a positive integer, got {num_samples!r}")
        longest = max(len(p) for p in prompts)
        if max_tokens is None:
            if longest >= self.seq_len:
                raise ChibiError(f"prompt of {longest} tokens fills the model's context seq_len={self.seq_len}; shorten it")
            max_tokens = self.seq_len - longest
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ChibiError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if longest + max_tokens > self.seq_len:
            raise ChibiError(
                f"prompt of {longest} tokens + max_tokens {max_tokens} exceeds the model's context seq_len="
                f"{self.seq_len}; lower max_tokens to at most {max(self.seq_len - longest, 0)} or shorten the prompt"
            )
        if tools is True:
            tools = "calculator"
        if tools not in (False, None) and tools not in TOOL_CHOICES:
            raise ChibiError(f"tools must be False, True/'calculator' or 'python', got {tools!r}")
        return max_tokens, (tools or None)

    # -- the decode core ----------------------------------------------------------------------

    def _prefill(self, decoder, prompts, num_samples, max_len):
        """Returns (state with rows prompt-major x num_samples, last logits (rows, V))."""
        import torch

        dev = self.rt.device
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        parts = {}  # prompt index -> (state of that group, row in the group, logits row)
        for length, idxs in by_len.items():
            ids = torch.tensor([prompts[i] for i in idxs], dtype=torch.long, device=dev)
            state = decoder.new_state(len(idxs), max_len)
            logits = self.tool_output_masked(decoder.forward(ids, state, last_only=True, check_ids=False)[:, -1])  # ids checked in _check
            for r, i in enumerate(idxs):
                parts[i] = (state, r, logits[r])
        states, last = [], []
        for i in range(len(prompts)):
            state, r, logit = parts[i]
            states.append(state.select([r] * num_samples))
            last.append(logit.expand(num_samples, -1))
        state = states[0] if len(states) == 1 else type(states[0]).stack(states)
        return state, torch.cat(last, dim=0)

    def _decode(self, prompts, num_samples, max_tokens, params: SamplingParams, seed, tools,
                top_logprobs: int | None = None) -> Iterator[list]:  # fmt: skip
        """Yields after every step the list of (row_index, token, forced, finished) emitted in that step;
        returns (via StopIteration.value) the list of _Row, prompt-major. The consumer may `send` a
        collection of row indices to end with finish_reason "stop" (e.g. a stop string was found)."""
        import torch

        dev = self.rt.device
        decoder = self.decoder()
        # inference_mode (lighter than no_grad: no view/version tracking) is entered around each
        # piece of tensor work rather than across `yield`, so it never leaks into the consumer's code.
        # The decoder's tensors are made outside it (decoder() above), and _check caps every row at
        # seq_len, so its RoPE table never grows here.
        inference = torch.inference_mode
        with inference():
            state, logits = self._prefill(decoder, prompts, num_samples, max(len(p) for p in prompts) + max_tokens)
        group = _Group(self, logits.shape[0], max_tokens, params, seed, tools, top_logprobs)
        for step in range(max_tokens):
            emitted = group.sample(logits)
            for r in (yield emitted) or ():  # rows the consumer ended
                group.end(r)
            keep = group.keep()
            if not keep:
                break
            with inference():
                if len(keep) < len(group.live):  # finished rows leave the batch
                    state = state.select(keep)
                group.compact(keep)
                # Sampled ids are < vocab by construction and forced ones come from the tokenizer, whose
                # vocab equals the model's (checked in __init__): no per-step range check (a host sync).
                feed_ids = torch.tensor(group.feed(), dtype=torch.long, device=dev)[:, None]
                logits = self.tool_output_masked(decoder.forward(feed_ids, state, check_ids=False)[:, -1])
        return group.rows

    def _advance_tools(self, row: _Row, tok: int, tools, left: int) -> None:
        """Per-row state machine on a sampled token: stop tokens end the row; python_start ...
        python_end is a tool call whose result is queued as forced tokens. `left`: tokens the row may
        still produce; a result that does not fit there with its markers is replaced by an error saying
        so, and when not even that fits the row ends ("length") instead of showing a cut output."""
        if tok in self.stop_ids:
            row.finish = "stop"
        elif tools is None:
            return
        elif tok == self.python_start:
            row.expr = []
        elif tok == self.python_end and row.expr is not None:
            try:
                result = run_tool(tools, self.tokenizer.decode(row.expr))
            except ChibiError:
                raise  # the sandbox cannot run here at all: a setup problem to report, not a call's result
            except Exception as e:  # any other failure is the call's result: generation goes on
                result = tool_error(f"the tool failed: {type(e).__name__}: {e}")
            row.expr = None
            ids = self.tokenizer.encode(result)
            if len(ids) + 2 > left:
                why = f"output of {len(ids)} tokens exceeds the {max(left - 2, 0)} left"
                ids = self.tokenizer.encode(tool_error(why))
            if len(ids) + 2 > left:
                row.finish = "length"
                return
            row.queue.extend([self.output_start, *ids, self.output_end])
        elif row.expr is not None:
            row.expr.append(tok)

    def shown_bytes(self, tok: int, after: int | None = None) -> bytes:
        """The bytes token `tok` adds to a reply's text as the text stream shows it, for readers of single
        tokens (logprobs): the tool markers as "<<", "=" and ">>", where <|python_end|> shows ">>" unless the
        next token `after` opens the call's result; any other token (an end token among the alternatives
        too) as its own bytes."""
        if tok == self.python_end:
            return b"" if after == self.output_start else b">>"
        return self._shown.get(tok) or self.tokenizer.id_to_bytes(tok)

    def to_parts(self, tokens: list[int]) -> list[dict]:
        """Generated ids -> assistant content parts (render.py's format): text, python (the call),
        python_output (the forced result). The final stop token, if any, is not part of the content."""
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        parts, kind, buf = [], "text", []
        markers = {self.python_start: ("text", "python"), self.python_end: ("python", "text"),
                   self.output_start: ("text", "python_output"), self.output_end: ("python_output", "text")}  # fmt: skip

        def flush():
            if buf:
                parts.append({"type": kind, "text": self.tokenizer.decode(buf)})
                buf.clear()

        for t in tokens:
            if t in markers:
                flush()
                kind = markers[t][1]
            else:
                buf.append(t)
        flush()
        return parts

    # -- public API ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        num_samples: int = 1,
        max_tokens: int | None = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        tools=True,
    ) -> list[list[Sample]]:
        """For each prompt, `num_samples` independent samples. max_tokens None = up to the context.
        Reproducible: the same arguments give the same samples."""
        max_tokens, tools = self._check(prompts, num_samples, max_tokens, tools)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty).validate()
        gen = self._decode(prompts, num_samples, max_tokens, params, seed, tools)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                rows = done.value
                break
        out = []
        for i in range(len(prompts)):
            samples = []
            for row in rows[i * num_samples : (i + 1) * num_samples]:
                body = row.tokens[:-1] if row.finish == "stop" else row.tokens
                samples.append(Sample(row.tokens, row.forced, row.finish or "length", self.tokenizer.decode(body)))
            out.append(samples)
        return out

    def stream(
        self,
        prompt: list[int],
        max_tokens: int | None = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        tools=True,
        result: dict | None = None,
        stop: list[str] | None = None,
    ) -> Iterator[str]:
        """Text pieces of one sample as they are generated, never splitting a UTF-8 character.

        Tool calls are shown in the GSM8K annotation style: <<expr=result>> (<<expr>> if no result followed).
        `stop`: see stream_choices. If `result` is a dict, it receives "finish_reason", "tokens" and
        "completion_tokens" when the stream ends.
        """
        inner: dict = {}
        for _, text in self.stream_choices(prompt, 1, max_tokens, temperature, top_k, top_p, repetition_penalty,
                                           seed, tools, inner, stop):  # fmt: skip
            yield text
        if result is not None:
            choice = inner["choices"][0]
            result.update(finish_reason=choice["finish_reason"], tokens=choice["tokens"],
                          completion_tokens=choice["completion_tokens"])  # fmt: skip

    def stream_choices(
        self,
        prompt: list[int],
        num_samples: int = 1,
        max_tokens: int | None = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        tools=True,
        result: dict | None = None,
        stop: list[str] | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        top_logprobs: int | None = None,
    ) -> Iterator[tuple[int, str]]:
        """(choice index, text piece) for `num_samples` samples of one prompt, decoded together from
        one prefill, as they are generated; pieces never split a UTF-8 character.

        `stop`: strings that end a sample (finish_reason "stop") before they appear: the stop string
        and anything after it are never shown, and text that might still turn out to be the start of a
        stop string is held back until the next tokens settle it. If `result` is a dict, it receives
        "choices" (per sample: finish_reason, tokens, completion_tokens, and with top_logprobs not None
        "logprobs": per token (logprob, [(id, logprob)] x top_logprobs)) and "completion_tokens" (total).
        """
        stops = self._check_stops(stop)
        max_tokens, tools = self._check([prompt], num_samples, max_tokens, tools)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, presence_penalty,
                                frequency_penalty).validate()  # fmt: skip
        texts = [_ChoiceText(self, stops) for _ in range(num_samples)]
        gen = self._decode([prompt], num_samples, max_tokens, params, seed, tools, top_logprobs)
        ended: list[int] = []  # rows a stop string ended in this step, sent back to the decode loop
        while True:
            try:
                emitted = gen.send(ended or None)
            except StopIteration as done:
                rows = done.value
                break
            ended = []
            for r, tok, _, finished in emitted:
                text = texts[r].feed(tok, finished)
                if texts[r].stopped and not finished:
                    ended.append(r)
                if text:
                    yield r, text
        if result is not None:
            result.update(choice_results(rows, texts, top_logprobs is not None))

    @staticmethod
    def _check_stops(stop) -> list[str]:
        stops = list(stop or [])
        if not all(isinstance(x, str) and x for x in stops):
            raise ChibiError(f"stop must be a list of non-empty strings, got {stop!r}")
        return stops


def choice_results(rows: list[_Row], texts: list[_ChoiceText], logprobs: bool) -> dict:
    """The `result` dict of stream_choices (and of a Batcher job) from the rows and their text streams."""
    choices = []
    for row, text in zip(rows, texts):
        reason = "stop" if text.stopped else (row.finish or "length")
        choice = {"finish_reason": reason, "tokens": row.tokens, "completion_tokens": len(row.tokens)}
        if logprobs:
            choice["logprobs"] = row.logprobs
        choices.append(choice)
    return {"choices": choices, "completion_tokens": sum(c["completion_tokens"] for c in choices)}


class StopMatcher:
    """Cuts a text stream at the first occurrence of any stop string, emitting only text that can no
    longer become part of one: a suffix that is a prefix of some stop string is held back."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Append `text`; return what is safe to show now (sets `stopped` at a stop string)."""
        if self.stopped:
            return ""
        buf = self.pending + text
        if not self.stops:
            self.pending = ""
            return buf
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return buf[: min(hits)]
        # No stop string is complete in buf, so one could only start in its last longest-1 chars.
        hold = len(buf)
        for i in range(max(0, len(buf) - self.longest + 1), len(buf)):
            if any(s.startswith(buf[i:]) for s in self.stops):
                hold = i
                break
        self.pending = buf[hold:]
        return buf[:hold]

    def flush(self) -> str:
        """End of the text: what was held back is not a stop string after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def prepare_for_inference(model):
    """Make a model that will only run inference fast: store its weights in its compute dtype
    (RunConfig.compute_dtype), so no forward casts a weight (and no layout for decoding copies one).
    Only for models that are not trained afterwards (chat, serve, bench); RL keeps fp32 masters.
    Returns the model (modified in place), in eval mode."""
    return model.to(dtype=model.compute_dtype).eval()


# ----------------------------------------------------------------------------------------------
# Continuous batching


@dataclass
class Job:
    """One request for a `Batcher`: `n` samples of `prompt`. `emit(events)` is called from the batcher's
    thread once per step with that step's events for this job, in order: ("piece", (choice, text,
    [logprob entries of the tokens since the previous piece])), then at the end ("done", result) with
    stream_choices' result dict, or ("error", exception). Set `cancelled` (from any thread) to end it:
    its rows leave the batch at the start of the next step (a job cancelled while waiting ends with a
    "done" of empty cancelled choices)."""

    prompt: list[int]
    n: int
    max_tokens: int
    params: SamplingParams
    seed: int
    tools: str | None
    emit: object  # Callable[[list[tuple[str, object]]], None]
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k most likely
    timeout_s: float | None = None  # from submission; past it the job ends with a TimeoutError event
    cancelled: bool = False
    submitted: float = 0.0  # time.monotonic() at submit


class _Live:
    """A job inside the batch: its row group, text streams, logits for the next draw and slots."""

    def __init__(self, job: Job, group: _Group, texts: list, logits):
        self.job, self.group, self.texts, self.logits = job, group, texts, logits
        self.slot: dict[int, int] = {}  # row -> slot of the batch state
        self.pending_lp: list[list] = [[] for _ in range(job.n)]  # logprob entries not yet sent with a piece
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None


class Batcher:
    """Continuous batching for one model replica: one decode loop (a thread) owns a batch of live rows.

    Each step: jobs that were cancelled or ran past their timeout leave; waiting jobs are admitted
    while free rows remain (prompts of one length prefilled together, like `generate` does, and each
    job's n rows join); every job draws the next token of each of its rows from those rows' logits with
    its own `_Group` (own seeded generator, sampling settings, penalty counts, tool calls, stop strings,
    logprobs); rows that finished leave; then one forward step feeds every remaining row its token. A
    job's output is therefore the one `Engine.stream_choices` gives for the same arguments (tested),
    whatever else shares the batch (up to float rounding of matmuls over a different number of rows,
    which can only matter where two tokens' logits tie to the last bits).

    State layout: slot-based. One `InferenceState` of `capacity` rows x seq_len positions (grown by
    doubling up to `max_rows`) holds every row's KV cache and SLC2 conv history; live rows occupy
    slots 0..n-1, so each step runs the decoder on views of the first n slots (no copy, no padding
    rows). A row that leaves is replaced by the last slot's row (one row copy, only the positions that
    row has filled), which keeps the live slots contiguous. Chosen over paged KV because the decoder's
    attention reads contiguous per-row caches (paging would need a gather per layer per step), and
    over re-stacking the batch on every join/leave (a copy of every row's whole cache each time).
    Memory is capacity x seq_len per layer, paid up front for the rows in use.
    """

    def __init__(self, engine: "Engine", max_rows: int = 32, metrics=None, name: str = "batcher"):
        import threading

        if not (isinstance(max_rows, int) and max_rows >= 1):
            raise ChibiError(f"max_rows must be a positive integer, got {max_rows!r}")
        self.engine, self.max_rows, self.metrics = engine, max_rows, metrics
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._live: list[_Live] = []
        self._slots: list[tuple[_Live, int]] = []  # (job, row) in slot order
        self._admitting = 0  # rows of jobs taken off the queue whose prefill has not placed them in slots yet
        self._state = None  # the slot InferenceState (capacity rows), made on first use
        self._lengths: list[int] = []  # tokens held per slot (host copy of state.pos)
        self._stopping = False
        self.steps = 0  # forward steps run
        self._thread = threading.Thread(target=self._run, name=f"chibichat-{name}", daemon=True)
        self._thread.start()

    # -- the public side (any thread) ---------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Jobs queued for rows: submitted jobs that the free rows cannot take at the next step (a job
        that has rows free for it is about to be admitted, not waiting)."""
        free = self.max_rows - len(self._slots) - self._admitting
        queued = 0
        for job in list(self._waiting):
            if job.cancelled:  # leaves at the next step without taking rows: its client is gone
                continue
            if job.n <= free:
                free -= job.n
            else:
                free, queued = 0, queued + 1
        return queued

    @property
    def rows(self) -> int:
        """Rows in the batch now (occupancy)."""
        return len(self._slots)

    @property
    def reserved(self) -> int:
        """Rows in the batch, rows being prefilled into it, and rows the waiting jobs will take."""
        return len(self._slots) + self._admitting + sum(j.n for j in list(self._waiting) if not j.cancelled)

    def submit(self, job: Job) -> None:
        import time

        if job.n > self.max_rows:
            raise ChibiError(f"a job of {job.n} samples cannot fit a batch of {self.max_rows} rows")
        job.submitted = time.monotonic()
        with self._cond:
            if self._stopping:
                raise ChibiError("the batcher is shutting down")
            self._waiting.append(job)
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel every job (waiting ones get an error event, live ones end as cancelled) and end the loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the loop (its own thread) --------------------------------------------------------------

    def _run(self) -> None:
        import time

        while True:
            with self._cond:
                while not self._live and not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                admit, dropped, kept, free = [], [], deque(), self.max_rows - len(self._slots)
                now = time.monotonic()
                # Jobs join in order (none overtakes a job the free rows cannot take yet); one that is gone
                # or too late leaves from anywhere in the queue, not only once the jobs ahead of it joined.
                for job in self._waiting:
                    if job.cancelled or (job.timeout_s is not None and now - job.submitted > job.timeout_s):
                        dropped.append(job)
                    elif not kept and job.n <= free:
                        free -= job.n
                        admit.append(job)
                    else:
                        kept.append(job)
                self._waiting = kept
                self._admitting = sum(job.n for job in admit)
            for job in dropped:
                reason = "cancelled" if job.cancelled else "timeout"
                if self.metrics is not None:
                    self.metrics.observe_ended(reason)
                if reason == "timeout":
                    self._send(job, [("error", TimeoutError(f"the request waited past its time limit of {job.timeout_s} s"))])
                else:  # every job ends with an event, also one cancelled before it got rows
                    none = {"finish_reason": "cancelled", "tokens": [], "completion_tokens": 0,
                            **({"logprobs": []} if job.top_logprobs is not None else {})}
                    self._send(job, [("done", {"choices": [dict(none) for _ in range(job.n)], "completion_tokens": 0})])
            try:
                self._step(admit)
            except BaseException as e:  # a failing step fails its jobs, never the loop
                for live in self._live:
                    self._send(live.job, [("error", e)])
                self._live, self._slots, self._lengths = [], [], []
            finally:
                self._admitting = 0  # every admitted job is in a slot, finished or failed by now
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            self._send(job, [("error", ChibiError("the server is shutting down"))])
        for live in list(self._live):
            self._finish(live, "cancelled")

    def _send(self, job: Job, events: list) -> None:
        try:
            job.emit(events)
        except Exception:  # a consumer that went away must not stop the loop
            job.cancelled = True

    def _step(self, admit: list[Job]) -> None:
        import time

        import torch

        now = time.monotonic()
        for live in list(self._live):
            job = live.job
            if job.cancelled:
                self._finish(live, "cancelled")
            elif job.timeout_s is not None and now - job.submitted > job.timeout_s:
                self._finish(live, "timeout")
        by_len: dict[int, list] = {}  # prompts of one length are prefilled together
        for job in admit:
            try:
                checked = self._check(job)
            except Exception as e:
                self._send(job, [("error", e)])
                continue
            by_len.setdefault(len(job.prompt), []).append((job, *checked))
        for group in by_len.values():
            try:
                self._admit(group)
            except Exception as e:
                for job, *_ in group:
                    self._send(job, [("error", e)])
        if not self._live:
            return
        stamp = time.monotonic()
        drawn = draw_together([(live.group, live.logits) for live in self._live])
        for live, d in zip(list(self._live), drawn):
            self._sample(live, stamp, d)
        if not self._slots:
            return
        n = len(self._slots)
        state = self._state
        view = state.head(n, self._lengths[:n])
        feed = [live.group.rows[r].tokens[-1] for live, r in self._slots]
        with torch.inference_mode():
            ids = torch.tensor(feed, dtype=torch.long, device=self.engine.rt.device)[:, None]
            logits = self.engine.tool_output_masked(self.engine.decoder().forward(ids, view, check_ids=False)[:, -1])
            state.pos[:n] += 1
            state.keep_histories(view)
        self._lengths = [x + 1 for x in self._lengths]
        self.steps += 1
        if self.metrics is not None:
            self.metrics.observe_step(n)
        for live in self._live:
            slots = [live.slot[r] for r in live.group.live]
            first = slots[0]
            if slots == list(range(first, first + len(slots))):
                live.logits = logits[first : first + len(slots)]
            else:
                live.logits = logits.index_select(0, torch.tensor(slots, device=logits.device))

    def _check(self, job: Job):
        """(max_tokens, tools, stop strings) of a job, or the ChibiError that refuses it."""
        max_tokens, tools = self.engine._check([job.prompt], job.n, job.max_tokens, job.tools)
        job.params.validate()
        return max_tokens, tools, self.engine._check_stops(job.stop)

    def _admit(self, jobs: list) -> None:
        """Prefill prompts of one length together into free slots; each job's first draw comes from
        its row of that prefill. jobs: [(job, max_tokens, tools, stops)]."""
        import torch

        eng = self.engine
        decoder = eng.decoder()
        P = len(jobs[0][0].prompt)
        with torch.inference_mode():
            pre = decoder.new_state(len(jobs), P)
            ids = torch.tensor([job.prompt for job, *_ in jobs], dtype=torch.long, device=eng.rt.device)
            logits = eng.tool_output_masked(decoder.forward(ids, pre, last_only=True, check_ids=False)[:, -1])
            self._ensure_capacity(len(self._slots) + sum(job.n for job, *_ in jobs))
            for j, (job, max_tokens, tools, stops) in enumerate(jobs):
                group = _Group(eng, job.n, max_tokens, job.params, job.seed, tools, job.top_logprobs)
                texts = [_ChoiceText(eng, stops) for _ in range(job.n)]
                live = _Live(job, group, texts, logits[j : j + 1].expand(job.n, -1))
                for r in range(job.n):
                    slot = len(self._slots)
                    self._state.copy_row(slot, pre, j, P)
                    self._slots.append((live, r))
                    self._admitting -= 1
                    self._lengths.append(P)
                    live.slot[r] = slot
                self._live.append(live)

    def _ensure_capacity(self, rows: int) -> None:
        import torch

        state = self._state
        cap = 0 if state is None else state.batch_size
        if rows <= cap:
            return
        new_cap = min(self.max_rows, max(rows, 2 * cap, 4))
        new = self.engine.decoder().new_state(new_cap, self.engine.seq_len)
        n = len(self._slots)
        if state is not None and n:
            with torch.inference_mode():
                for slot in range(n):
                    new.copy_row(slot, state, slot, self._lengths[slot])
        self._state = new

    def _sample(self, live: _Live, stamp: float, drawn: list[int] | None = None) -> None:
        """One draw for every row of a job; stream its text; rows that end leave the batch."""
        group, job = live.group, live.job
        emitted = group.sample(live.logits, drawn)
        pieces = []
        for r, tok, _, finished in emitted:
            text = live.texts[r].feed(tok, finished)
            if live.texts[r].stopped and not finished:
                group.end(r)
            if job.top_logprobs is not None and not (finished and tok in self.engine.stop_ids):
                live.pending_lp[r].append((tok, *group.rows[r].logprobs[-1]))  # the end token is not shown
            if text or (finished or live.texts[r].stopped) and live.pending_lp[r]:
                pieces.append(("piece", (r, text, live.pending_lp[r])))
                live.pending_lp[r] = []
        if self.metrics is not None:
            self.metrics.observe_tokens(len(emitted), stamp - (live.last_token_at or job.submitted),
                                        first=live.last_token_at is None)  # fmt: skip
        live.last_token_at = stamp
        keep = group.keep()
        leaving = [r for b, r in enumerate(group.live) if b not in set(keep)]
        for r in leaving:
            self._free(live, r)
        group.compact(keep)
        if pieces:
            self._send(job, pieces)
        if not keep:
            self._live.remove(live)
            if self.metrics is not None:
                self.metrics.observe_ended("done")
            self._send(job, [("done", choice_results(group.rows, live.texts, job.top_logprobs is not None))])

    def _free(self, live: _Live, r: int) -> None:
        """Slot of (live, r) is released: the last slot's row moves into it."""
        import torch

        slot = live.slot.pop(r)
        last = len(self._slots) - 1
        if slot != last:
            other, orow = self._slots[last]
            n = self._lengths[last]
            with torch.inference_mode():
                self._state.copy_row(slot, self._state, last, n)
            self._slots[slot] = (other, orow)
            self._lengths[slot] = n
            other.slot[orow] = slot
        self._slots.pop()
        self._lengths.pop()

    def _finish(self, live: _Live, reason: str) -> None:
        """End a job early (cancelled / timeout): its rows leave the batch now."""
        for r in list(live.group.live):
            live.group.end(r, reason)
            self._free(live, r)
        live.group.compact([])
        if live in self._live:
            self._live.remove(live)
        if self.metrics is not None:
            self.metrics.observe_ended(reason)
        if reason == "timeout":
            self._send(live.job, [("error", TimeoutError(f"generation ran past its time limit of {live.job.timeout_s} s"))])
        else:
            self._send(live.job, [("done", choice_results(live.group.rows, live.texts, live.job.top_logprobs is not None))])
