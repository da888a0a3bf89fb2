"""Conversations to token ids plus a per-token loss mask, with an explicit over-length policy.

Layout:  <|bos|>  then per exchange
         <|user_start|> text <|user_end|>  <|assistant_start|> parts <|assistant_end|>
An assistant turn is a string or a list of parts: "text"; "python" (a tool call, wrapped in
<|python_start|>..<|python_end|>); "python_output" (the tool's answer, wrapped in
<|output_start|>..<|output_end|>).

Mask (1 = the model is trained to produce it): assistant text, python calls with their delimiters,
and <|assistant_end|>. Everything the model only reads is 0: BOS, user turns with their
delimiters, <|assistant_start|>, and tool output (it comes from the tool, not from the model).
An earlier assistant message may carry "weight": 0 (OpenAI's fine-tuning format): the whole turn is
then read as context, all of it mask 0; "weight": 1 is the default. The final assistant turn is the
one learned, so weight 0 there is refused, as is a weight on any other role.

Length: the caller passes `max_len` (derived from the model's context; no hidden default). Nothing
is ever cut mid-turn: an over-length conversation is either dropped or loses whole earlier
exchanges from the front, always keeping BOS, the final user message and the whole final
assistant turn including <|assistant_end|>. The status says which happened, and RenderStats
counts it so that stages can report it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chibichat.common import ChibiError

OVERFLOW_POLICIES = ("shorten", "drop")
PART_TYPES = ("text", "python", "python_output")


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]
    status: str  # "ok" | "shortened" | "dropped"
    dropped_turns: int = 0  # messages removed from the front ("shortened"), 0 otherwise


@dataclass
class Prompt:
    ids: list[int]  # ends with <|assistant_start|>
    dropped_turns: int  # earlier messages left out to fit max_len (the chat CLI tells the user)


@dataclass
class _Exchange:
    user: str
    assistant: object  # str | list[part] | None (None: the prompt's final user message)
    trained: bool = True  # False: the assistant turn has weight 0 (read, never a target)


# The default cap of the budgets whose replies a checker scores (eval skills, RL): room for every reply the chat
# data teaches (the longest, a Japanese letter count in the 1,024-token vocabulary, takes ~84 tokens), while a
# reply that runs on past its answer stops within twice that.
CHECKED_REPLY_CAP = 128


def reply_budget(seq_len: int, requested: int | None = None, cap: int = 256, what: str = "--max-tokens") -> int:
    """Tokens a generated reply may take in a context of `seq_len`; the prompt gets the rest. The one rule
    for every generation budget: the requested count, else half the context, at most `cap` (the caller's
    default reply length). A request that leaves no room for a prompt is refused, naming `what`."""
    budget = min(cap, seq_len // 2) if requested is None else requested
    if not 1 <= budget < seq_len:
        raise ChibiError(f"{what} {budget} must be in [1, {seq_len - 1}] (the model's context is {seq_len})")
    return budget


def _parse(conv, *, need_final_assistant: bool) -> tuple[str | None, list[_Exchange]]:
    """Validate a conversation dict; return (system text, exchanges). Errors name the bad turn."""
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
        raise ChibiError(f"a conversation must be a dict with a 'messages' list, got {type(conv).__name__}")
    messages = conv["messages"]
    if not messages:
        raise ChibiError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ChibiError(f"message {i} must be a dict with role system|user|assistant, got {m!r:.80}")
        if m["role"] != "assistant" and m.get("weight") is not None:
            raise ChibiError(f"message {i} ({m['role']}): only assistant messages take a 'weight' (whether that "
                             "reply is trained); remove it")
    system = None
    if messages[0]["role"] == "system":
        system = messages[0].get("content")
        if not isinstance(system, str):
            raise ChibiError("message 0 (system): content must be a string")
        messages = messages[1:]
    exchanges: list[_Exchange] = []
    offset = 0 if system is None else 1
    for j, m in enumerate(messages):
        i = j + offset
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ChibiError(
                f"message {i} has role {m['role']!r} but {expected!r} was expected: after an optional first "
                "system message, roles must strictly alternate user, assistant, user, ..."
            )
        content = m.get("content")
        if expected == "user":
            if not isinstance(content, str):
                raise ChibiError(f"message {i} (user): content must be a string")
            exchanges.append(_Exchange(content, None))
        else:
            _check_assistant(content, i)
            exchanges[-1].assistant = content
            exchanges[-1].trained = message_weight(m.get("weight"), f"message {i} (assistant)", ChibiError) == 1
    if not exchanges:
        raise ChibiError("conversation has only a system message; it needs at least one user message")
    if need_final_assistant and exchanges[-1].assistant is None:
        raise ChibiError(
            f"conversation ends with a user message (message {len(conv['messages']) - 1}); a training "
            "conversation must end with the assistant turn that is learned"
        )
    if need_final_assistant and not exchanges[-1].trained:
        raise ChibiError(
            f"message {len(conv['messages']) - 1} (the final assistant turn) has weight 0, but a training "
            "conversation ends with the turn that is learned; remove its weight or end the conversation at "
            "the last trained reply"
        )
    return system, exchanges


def message_weight(value, where: str, error=ChibiError) -> int:
    """An assistant message's OpenAI fine-tuning "weight": absent = 1; else exactly 0 (not trained) or 1 (trained),
    no partial weighting. A bad value raises `error` naming `where`."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise error(f"{where}: weight must be 0 (not trained) or 1 (trained), got {value!r}")
    return int(value)


def _check_assistant(content, i: int) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ChibiError(f"message {i} (assistant): content must be a string or a list of parts")
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise ChibiError(
                f"message {i} (assistant) part {k}: expected {{'type': one of {PART_TYPES}, 'text': str}}, "
                f"got {part!r:.80}"
            )


def _user_block(tok, text: str) -> list[int]:
    return [tok.special_id("<|user_start|>"), *tok.encode(text), tok.special_id("<|user_end|>")]


def _assistant_block(tok, content, trained: bool = True) -> tuple[list[int], list[int]]:
    """<|assistant_start|> (mask 0), the parts, <|assistant_end|> (mask 1); all mask 0 when not `trained`."""
    ids, mask = [tok.special_id("<|assistant_start|>")], [0]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    for part in parts:
        body = tok.encode(part["text"])
        if part["type"] == "text":
            ids += body
            mask += [1] * len(body)
        elif part["type"] == "python":
            span = [tok.special_id("<|python_start|>"), *body, tok.special_id("<|python_end|>")]
            ids += span
            mask += [1] * len(span)
        else:  # python_output: produced by the tool, so never a training target
            span = [tok.special_id("<|output_start|>"), *body, tok.special_id("<|output_end|>")]
            ids += span
            mask += [0] * len(span)
    ids.append(tok.special_id("<|assistant_end|>"))
    mask.append(1)
    if not trained:
        mask = [0] * len(ids)
    return ids, mask


def _merged_user(system: str | None, user: str) -> str:
    """The system message lives inside the first user message that is rendered, so it survives shortening."""
    return user if system is None else f"{system}\n\n{user}"


def _check_max_len(max_len) -> None:
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
        raise ChibiError(f"max_len must be an int >= 2 derived from the model's context, got {max_len!r}")


def _fit_start(lengths: list[int], first_len_at: list[int], budget: int) -> int | None:
    """Smallest start index k such that exchanges k.. fit in `budget` tokens, the final one always kept.

    lengths[k] is the length of exchange k; first_len_at[k] is its length when it is the first one
    rendered (it then carries the system text). None when even the final exchange alone does not fit.
    """
    n = len(lengths)
    suffix = 0  # total length of exchanges k+1..n-1
    best = None
    for k in range(n - 1, -1, -1):
        if first_len_at[k] + suffix <= budget:
            best = k
        suffix += lengths[k]
        if suffix > budget:  # adding earlier exchanges can only grow the total
            break
    return best


def render_conversation(tok, conv, max_len: int, overflow: str = "shorten") -> Rendered:
    """Render a training conversation (must end with an assistant turn) into ids and a loss mask.

    Over `max_len` tokens: overflow="drop" returns status "dropped" with empty ids; "shorten" removes
    whole exchanges from the front (status "shortened"), or drops when the final exchange alone does
    not fit.
    """
    _check_max_len(max_len)
    if overflow not in OVERFLOW_POLICIES:
        raise ChibiError(f"overflow policy {overflow!r} is not one of {OVERFLOW_POLICIES}")
    system, exchanges = _parse(conv, need_final_assistant=True)

    assistant = [_assistant_block(tok, ex.assistant, ex.trained) for ex in exchanges]
    users = [_user_block(tok, ex.user) for ex in exchanges]
    lengths = [len(u) + len(a[0]) for u, a in zip(users, assistant)]
    first_users = {0: _user_block(tok, _merged_user(system, exchanges[0].user))}
    budget = max_len - 1  # BOS

    total = len(first_users[0]) + len(assistant[0][0]) + sum(lengths[1:])
    if total <= budget:
        start, status = 0, "ok"
    elif overflow == "drop":
        return Rendered([], [], "dropped")
    else:
        if system is not None:  # the first kept user block carries the system text: measure it merged
            for k in range(1, len(exchanges)):
                first_users[k] = _user_block(tok, _merged_user(system, exchanges[k].user))
        first_len_at = [len(first_users.get(k, users[k])) + len(assistant[k][0]) for k in range(len(exchanges))]
        start = _fit_start(lengths, first_len_at, budget)
        if start is None:
            return Rendered([], [], "dropped")
        status = "shortened"

    ids, mask = [tok.bos_id], [0]
    for k in range(start, len(exchanges)):
        u = first_users.get(k, users[k]) if k == start else users[k]
        ids += u
        mask += [0] * len(u)
        ids += assistant[k][0]
        mask += assistant[k][1]
    if not any(mask):  # cannot happen with <|assistant_end|> supervised; guards future edits
        raise ChibiError("rendered conversation has no supervised token; it needs an assistant turn")
    assert len(ids) == len(mask) <= max_len
    return Rendered(ids, mask, status, dropped_turns=2 * start)


def render_prompt(tok, conv, max_len: int) -> Prompt:
    """Render a prompt for generation: the final assistant turn (if any) is left out and the ids end
    with <|assistant_start|>. Whole oldest exchanges are left out until it fits in `max_len`; the
    count is returned so that a chat UI can say so. If the final user message alone does not fit,
    that is an error the user must act on.
    """
    _check_max_len(max_len)
    msgs = conv.get("messages") if isinstance(conv, dict) else None
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        conv = {**conv, "messages": msgs[:-1]}
    system, exchanges = _parse(conv, need_final_assistant=False)
    if exchanges[-1].assistant is not None:  # unreachable after the strip above; keeps the invariant explicit
        raise ChibiError("a prompt must end with a user message")

    def block(k: int, first: bool) -> list[int]:
        u = _user_block(tok, _merged_user(system, exchanges[k].user) if first else exchanges[k].user)
        if exchanges[k].assistant is None:
            return u + [tok.special_id("<|assistant_start|>")]
        return u + _assistant_block(tok, exchanges[k].assistant)[0]

    rest = [block(k, first=False) for k in range(len(exchanges))]
    lengths = [len(b) for b in rest]
    first_len_at = [len(block(k, first=True)) if system is not None else lengths[k] for k in range(len(exchanges))]
    start = _fit_start(lengths, first_len_at, max_len - 1)
    if start is None:
        raise ChibiError(
            f"the message is too long for the model's context: it needs {first_len_at[-1] + 1} tokens but only "
            f"{max_len} are available; shorten the message"
        )
    ids = [tok.bos_id] + block(start, first=True)
    for k in range(start + 1, len(exchanges)):
        ids += rest[k]
    return Prompt(ids, dropped_turns=2 * start)


def render_for_completion(tok, conv, max_len: int) -> list[int]:
    """`render_prompt(...).ids`: the prompt ids ending with <|assistant_start|>."""
    return render_prompt(tok, conv, max_len).ids


@dataclass
class RenderStats:
    """Counts of ok / shortened / dropped renders per task, for the stage's log and the report."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, task: str, status: str) -> None:
        if status not in ("ok", "shortened", "dropped"):
            raise ValueError(f"unknown render status {status!r}")
        per = self.counts.setdefault(task, {"ok": 0, "shortened": 0, "dropped": 0})
        per[status] += 1

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {task: dict(c) for task, c in self.counts.items()}

    def total(self, status: str) -> int:
        return sum(c[status] for c in self.counts.values())

    def summary(self) -> str:
        """One line per task with any over-length example, e.g. 'smoltalk: 3 shortened, 1 dropped of 500'."""
        lines = []
        for task, c in self.counts.items():
            n = sum(c.values())
            if c["shortened"] or c["dropped"]:
                lines.append(f"{task}: {c['shortened']} shortened, {c['dropped']} dropped of {n} (over max_len)")
        return "\n".join(lines) if lines else "no conversation exceeded max_len"
