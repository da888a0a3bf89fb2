"""Generation: prefill once, decode incrementally, sample, use tools, stream text.

Flow of one `generate` call:
1. Prefill: prompts of equal length are prefilled together (forward_step with t > 1 needs equal
   positions); each prompt's last-position logits are kept. The per-prompt states are then laid out
   as rows [prompt0 x num_samples, prompt1 x num_samples, ...] with `select` (a row copy, like
   `expand`) and merged with `InferenceState.stack`. Rows of different lengths decode together
   because forward_step takes per-row positions for one-token steps.
2. Decode: every step samples one token per row from that row's own logits (the first token too:
   upstream once broadcast the first sample to every row, REFERENCE §20 #16), runs the per-row tool
   state machine, and feeds all live rows one token. Finished rows are dropped from the batch.
3. Tools: `<|python_start|>` expr `<|python_end|>` -> the expression is evaluated and
   `<|output_start|>` result `<|output_end|>` is queued; queued tokens are fed one per step instead of
   sampling and flagged forced=1 (RL leaves them out of the loss). A failed tool call injects nothing.

Per-step host work is kept small (one device->host copy of the sampled ids per step, plain Python
lists for row bookkeeping) because on small models that overhead, not arithmetic, bounds tokens/s.
"""

from __future__ import annotations

import ast
import codecs
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

from chibichat.common import ChibiError
from chibichat.tools import ToolError, calculate

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

    def validate(self) -> "SamplingParams":
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise ChibiError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ChibiError(f"top_k must be a positive integer or None (off), got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ChibiError(f"top_p must be in (0, 1] or None (off), got {self.top_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise ChibiError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        return self


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

    logits = logits.float() / temperature
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


# Nucleus candidates tried before a full sort: if the top NUCLEUS_PROBE tokens of every row already
# hold top_p of the mass, the nucleus lies among them and sorting all V logits is unnecessary.
NUCLEUS_PROBE = 64


def _exponential_race(probs, generator):
    """Index of argmax(p_i / E_i) with E_i ~ Exp(1): exactly a draw from p (the smallest of independent
    exponentials with rates p_i is i with probability p_i / sum p). On CPU this is several times
    faster than torch.multinomial over a large vocabulary."""
    import torch

    # E = -log(U) with U ~ U[0, 1) from torch.rand (vectorised, ~5x faster than exponential_ on CPU).
    # U < 1 always, so E > 0 and no token can win by a division by zero; U == 0 (chance 2^-24 per
    # entry in fp32) gives E = inf, i.e. that entry just loses this one race.
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float32)
    return torch.argmax(probs / -torch.log(uniform), dim=-1)


def sample_next(logits, params: SamplingParams, generator, seen=None):
    """One token id per row (LongTensor (N,)), drawn from `sampling_probs(...)`'s distribution
    (tested by frequency), computed on as few candidates as possible. temperature 0 -> argmax."""
    import torch

    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits.float() / params.temperature
    V = logits.shape[-1]
    top_k = params.top_k if params.top_k is not None and params.top_k < V else None
    top_p = params.top_p if params.top_p is not None and params.top_p < 1.0 else None
    if top_k is None and top_p is None:
        return _exponential_race(torch.softmax(logits, dim=-1), generator)
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
    return idx.gather(-1, _exponential_race(probs, generator)[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Tools


def run_tool(kind: str, source: str) -> str | None:
    """Result text of one tool call, or None when the call fails (then nothing is injected)."""
    try:
        return calculate(source)
    except ToolError:
        if kind != "python":
            return None
    from chibichat.sandbox import run_python

    code = source
    try:
        ast.parse(source, mode="eval")
        code = f"print({source})"  # a bare expression: show its value, like a REPL would
    except SyntaxError:
        pass
    result = run_python(code, timeout_s=2.0, memory_mb=256)
    return result.stdout.strip() if result.ok else None


@dataclass
class _Row:
    """Bookkeeping of one generated sequence."""

    tokens: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    queue: deque = field(default_factory=deque)  # tokens to force before sampling again
    expr: list[int] | None = None  # collecting a tool call when not None
    finish: str | None = None


class Engine:
    """Generation for one model + tokenizer on one device (see the module docstring)."""

    def __init__(self, model, tokenizer, rt, compile: bool = False):
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
        self._decoder = None  # chibichat.model.decode.Decoder, rebuilt when the model's weights change
        self.compile = compile  # torch.compile the decoder's one-token steps (opt-in, see model/compiled.py)

    def decoder(self):
        """The lean decode path for the model's current weights (built once, rebuilt after the
        weights change, e.g. between RL steps: a cheap fingerprint check per generate call)."""
        from chibichat.model.decode import decoder_for

        if self._decoder is None or not self._decoder.matches(self.model):
            self._decoder = None  # free the old copy before making the new one
            self._decoder = decoder_for(self.model, compile=self.compile)
        return self._decoder

    def sibling(self) -> "Engine":
        """Another Engine on the same model that shares this one's decoder (for worker threads on one
        CPU model: the Decoder holds a compute-dtype copy of the weights, ~10 MB bf16 / ~35 MB fp32 at d4,
        and only reads it while generating, so one copy serves every thread). Each engine still
        rebuilds its own decoder if the model's weights change."""
        twin = Engine(self.model, self.tokenizer, self.rt, compile=self.compile)
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
            logits = decoder.forward(ids, state, last_only=True, check_ids=False)[:, -1]  # ids checked in _check
            for r, i in enumerate(idxs):
                parts[i] = (state, r, logits[r])
        states, last = [], []
        for i in range(len(prompts)):
            state, r, logit = parts[i]
            states.append(state.select([r] * num_samples))
            last.append(logit.expand(num_samples, -1))
        state = states[0] if len(states) == 1 else type(states[0]).stack(states)
        return state, torch.cat(last, dim=0)

    def _decode(self, prompts, num_samples, max_tokens, params: SamplingParams, seed, tools) -> Iterator[list]:
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
        n = logits.shape[0]
        rows = [_Row() for _ in range(n)]
        live = list(range(n))  # row index of each batch position
        generator = torch.Generator(device=dev).manual_seed(seed)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(n, logits.shape[-1], dtype=torch.bool, device=dev)
        for step in range(max_tokens):
            with inference():
                sampled = sample_next(logits, params, generator, seen).tolist()
            emitted = []
            for b, r in enumerate(live):
                row = rows[r]
                if row.queue:
                    tok, forced = row.queue.popleft(), 1
                else:
                    tok, forced = sampled[b], 0
                row.tokens.append(tok)
                row.forced.append(forced)
                if not forced:
                    self._advance_tools(row, tok, tools)
                if row.finish is None and len(row.tokens) >= max_tokens:
                    row.finish = "length"
                emitted.append((r, tok, forced, row.finish is not None))
            for r in (yield emitted) or ():  # rows the consumer ended
                if rows[r].finish is None:
                    rows[r].finish = "stop"
            keep = [b for b, r in enumerate(live) if rows[r].finish is None]
            if not keep:
                break
            feed = [rows[live[b]].tokens[-1] for b in keep]
            with inference():
                if seen is not None:  # every token the row has produced so far (forced ones too)
                    rows_idx = torch.arange(len(live), device=dev)
                    seen[rows_idx, torch.tensor([e[1] for e in emitted], device=dev)] = True
                if len(keep) < len(live):  # finished rows leave the batch
                    state = state.select(keep)
                    if seen is not None:
                        seen = seen.index_select(0, torch.tensor(keep, device=dev))
                    live = [live[b] for b in keep]
                # Sampled ids are < vocab by construction and forced ones come from the tokenizer, whose
                # vocab equals the model's (checked in __init__): no per-step range check (a host sync).
                feed_ids = torch.tensor(feed, dtype=torch.long, device=dev)[:, None]
                logits = decoder.forward(feed_ids, state, check_ids=False)[:, -1]
        return rows

    def _advance_tools(self, row: _Row, tok: int, tools) -> None:
        """Per-row state machine on a sampled token: stop tokens end the row; python_start ...
        python_end is a tool call whose result is queued as forced tokens."""
        if tok in self.stop_ids:
            row.finish = "stop"
        elif tools is None:
            return
        elif tok == self.python_start:
            row.expr = []
        elif tok == self.python_end and row.expr is not None:
            result = run_tool(tools, self.tokenizer.decode(row.expr))
            row.expr = None
            if result is not None:
                row.queue.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.expr is not None:
            row.expr.append(tok)

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

        Tool calls are shown in the GSM8K annotation style: <<expr=result>> (<<expr>> if the call failed).
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
    ) -> Iterator[tuple[int, str]]:
        """(choice index, text piece) for `num_samples` samples of one prompt, decoded together from
        one prefill, as they are generated; pieces never split a UTF-8 character.

        `stop`: strings that end a sample (finish_reason "stop") before they appear: the stop string
        and anything after it are never shown, and text that might still turn out to be the start of a
        stop string is held back until the next tokens settle it. If `result` is a dict, it receives
        "choices" (per sample: finish_reason, tokens, completion_tokens) and "completion_tokens" (total).
        """
        stops = list(stop or [])
        if not all(isinstance(x, str) and x for x in stops):
            raise ChibiError(f"stop must be a list of non-empty strings, got {stop!r}")
        max_tokens, tools = self._check([prompt], num_samples, max_tokens, tools)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty).validate()
        # <|python_start|> -> "<<", <|output_start|> -> "=", <|output_end|> -> ">>"; <|python_end|> shows
        # nothing until the next token tells whether a result follows ("<<expr=result>>") or the call
        # failed and nothing was injected ("<<expr>>").
        shown = {self.python_start: b"<<", self.python_end: b"", self.output_start: b"=", self.output_end: b">>"}
        utf8 = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(num_samples)]
        matchers = [StopMatcher(stops) for _ in range(num_samples)]
        unclosed = [False] * num_samples
        gen = self._decode([prompt], num_samples, max_tokens, params, seed, tools)
        ended: list[int] = []  # rows a stop string ended in this step, sent back to the decode loop
        while True:
            try:
                emitted = gen.send(ended or None)
            except StopIteration as done:
                rows = done.value
                break
            ended = []
            for r, tok, _, finished in emitted:
                piece = b""
                if unclosed[r] and tok != self.output_start:
                    piece = b">>"
                unclosed[r] = tok == self.python_end
                if tok not in self.stop_ids:
                    piece += shown[tok] if tok in shown else self.tokenizer.id_to_bytes(tok)
                text = matchers[r].feed(utf8[r].decode(piece))
                if finished and not matchers[r].stopped:  # the row's last token: flush what it holds
                    text += matchers[r].feed((utf8[r].decode(b">>") if unclosed[r] else "") + utf8[r].decode(b"", final=True))
                    text += matchers[r].flush()
                if matchers[r].stopped and not finished:
                    ended.append(r)
                if text:
                    yield r, text
        if result is not None:
            choices = []
            for r, row in enumerate(rows):
                reason = "stop" if matchers[r].stopped else (row.finish or "length")
                choices.append({"finish_reason": reason, "tokens": row.tokens, "completion_tokens": len(row.tokens)})
            result.update(choices=choices, completion_tokens=sum(c["completion_tokens"] for c in choices))


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


def prepare_for_inference(model, dtype):
    """Make a model that will only run inference fast in `dtype`: store its weights in that dtype,
    so forward's per-step `weight.to(compute_dtype)` is a no-op instead of a full weight copy (which
    made bf16 decoding slower than fp32). Only for models that are not trained afterwards (chat,
    serve, bench); RL keeps fp32 masters. Returns the model (modified in place), in eval mode."""
    model.to(dtype=dtype)
    model.compute_dtype = dtype
    return model.eval()
