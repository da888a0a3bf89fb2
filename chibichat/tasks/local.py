"""Your own data as a task: `file:/path/to/data.jsonl` next to the named tasks.

`--mix chitchat=1,file:/data/support.jsonl=3` (midtrain, sft) and `rl --task file:/data/qa.jsonl`
resolve the name through `chibichat.tasks.registry.get_task`, which hands every name that starts with
`file:` to `file_task` here. The path is everything after `file:` (in --mix, the epochs follow the LAST
`=`; a path may not contain a comma).

Files: `.jsonl` (one JSON object per line, UTF-8) or `.parquet` (one object per row, the columns being
its keys). Each row is one of these shapes, detected from its keys:

  OpenAI chat   {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}
                content: a string, or a list of {"type": "text", "text": ...} parts. An assistant message
                may carry OpenAI "tool_calls" to the calculator: function name "python", "calculator" or
                "calculate" with JSON arguments {"expression": "..."} (or "code"/"expr"); the following
                "tool" message is its output. A tool call becomes a python part (supervised), the tool
                output a python_output part (never supervised), and an assistant message right after a
                tool output continues the same assistant turn, so the model learns to call the tool
                between <|python_start|> and <|python_end|> and read the result, as in the arithmetic task.
                An assistant message may carry OpenAI's fine-tuning "weight": 0 (the turn is read as context,
                not trained; not on the final assistant message) or 1 (the default).
  ShareGPT      {"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": str}, ...]}
  Alpaca        {"instruction": str, "input": str (optional), "output": str}; the user message is the
                instruction, then a blank line and the input when the input is not empty
  Verifiable    {"prompt": str, "answer": str|number, "match": "exact"|"numeric"|"regex" (optional,
                default "exact")}: a generative task for `rl --task` (reward 1 when the completion
                matches; see `FileTask.evaluate`)

Any chat row may also carry a top-level "system" string (it becomes the first message; a row with both
that and a system message is refused). A system message is rendered into the first user message by
chibichat.render (read by the model, never trained on, kept when early turns are shortened away).

Every key is read: a key a row's shape does not take (e.g. Alpaca "history"), a row with the keys of two
shapes and a message key the role does not take are refused, naming the keys that are accepted. A key whose
value is null counts as absent, in JSON Lines as in parquet (parquet, and pandas' `to_json(lines=True)`, give
every row and message all of its columns' fields).

Every problem is a ChibiError naming the file and the line (row for parquet): bad JSON (NaN and Infinity
included), a key given twice in one object (JSON readers keep only one of the two values), a non-object, a
whole file that is one JSON array or object spread over lines instead of JSON Lines, non-UTF-8 bytes, a blank
line, an unknown role, shape or key, empty content, two user (or assistant) turns in a row, a conversation that
does not end with the assistant, a file that mixes chats and verifiable rows. A UTF-8 byte-order mark at the
start of the file is an encoding mark, not data, and is read past (as the local corpora do).
`chibichat data check FILE` lists all of them at once (`check_file`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from chibichat.common import ChibiError
from chibichat.render import message_weight
from chibichat.tasks.base import Task

PREFIX = "file:"
SUFFIXES = (".jsonl", ".parquet")
TOOL_NAMES = ("python", "calculator", "calculate")
TOOL_ARG_KEYS = ("expression", "code", "expr")
MATCH_MODES = ("exact", "numeric", "regex")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_ROLES = ("system", "user", "assistant", "tool")
# The keys each row shape and each OpenAI message role takes; anything else is refused, never ignored.
SHAPE_KEYS = {
    "OpenAI chat": ("messages", "system"),
    "ShareGPT": ("conversations", "system"),
    "Alpaca": ("instruction", "input", "output", "system"),
    "verifiable": ("prompt", "answer", "match", "system"),
}
MESSAGE_KEYS = {"system": ("role", "content"), "user": ("role", "content"),
                "assistant": ("role", "content", "tool_calls", "weight"), "tool": ("role", "content", "tool_call_id")}
SHAREGPT_KEYS = ("from", "value")
UTF8_BOM = b"\xef\xbb\xbf"


class RowError(ValueError):
    """One row's problem, without its location (the reader adds file and line)."""


def is_file_task(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


# ----------------------------------------------------------------------------------------------
# Reading rows


@dataclass
class FileRows:
    """Every row of a file parsed, plus the problems found, each as (line, message)."""

    path: Path
    unit: str  # "line" (JSONL) or "row" (parquet)
    rows: list = field(default_factory=list)  # (line, dict)
    errors: list = field(default_factory=list)  # (line, message)


def _resolve(path) -> Path:
    p = Path(path).expanduser()
    if p.suffix not in SUFFIXES:
        raise ChibiError(f"{p}: unsupported file type {p.suffix or '(none)'!r}; give a .jsonl or .parquet file")
    # read for file: tasks, `data check FILE` and `dpo --data FILE` alike, so the messages name no flag
    if p.is_dir():
        raise ChibiError(f"{p} is a directory, not a file; give the path of a {p.suffix} file")
    if not p.is_file():
        raise ChibiError(f"{p}: no such file; check the path")
    return p


def read_rows(path) -> FileRows:
    """All rows of a .jsonl / .parquet file with their line (row) numbers, 1-based; problems collected."""
    p = _resolve(path)
    if p.suffix == ".parquet":
        return _read_parquet(p)
    out = FileRows(p, "line")
    data = p.read_bytes().removeprefix(UTF8_BOM)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the newline that ends the last line opens no new line
        lines.pop()
    for n, raw in enumerate(lines, start=1):
        raw = raw.rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.errors.append((n, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                  "re-save the file as UTF-8"))
            continue
        if not text.strip():
            out.errors.append((n, "blank line; remove it"))
            continue
        try:
            row = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            out.errors.append((n, f"bad JSON ({e.msg} at column {e.colno})"))
            continue
        except ValueError as e:  # NaN / Infinity, a repeated key: from _refuse_constant / _unique_keys
            out.errors.append((n, f"bad JSON ({e})"))
            continue
        if not isinstance(row, dict):
            out.errors.append((n, f"expected a JSON object, got {type(row).__name__}"))
            continue
        out.rows.append((n, {k: v for k, v in row.items() if v is not None}))  # null = absent, as in parquet
    if not lines:
        out.errors.append((0, "the file is empty"))
    elif out.errors:
        whole = _one_document(data, len(lines), p)
        if whole:  # one pretty-printed document: one clear problem instead of one per line
            out.rows, out.errors = [], [(1, whole)]
    return out


def _refuse_constant(name: str):
    """Python's json reads NaN/Infinity, which JSON does not have (an answer NaN could never match)."""
    raise ValueError(f"{name} is not JSON; write a number or a string")


def _unique_keys(pairs: list) -> dict:
    """An object's keys, each once: Python's json would keep the last of two values and drop the other."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object; keep one")
        out[k] = v
    return out


def _one_document(data: bytes, n_lines: int, p: Path) -> str | None:
    """The problem of a .jsonl file that is a single JSON array or object (a .json file renamed, or a
    pretty-printed one), or None when the file is not one JSON document. JSON Lines of two or more rows never
    parse as one document, so this only runs on a file that already has problems and stops at the second row."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except ValueError:  # not UTF-8 or not one JSON document: the per-line problems stand
        return None
    where = "one line" if n_lines == 1 else f"{n_lines} lines"
    if isinstance(doc, list):
        return (f"the file is one JSON array (of {len(doc)} items, on {where}), not JSON Lines; write each item as "
                f"a JSON object on a line of its own (e.g. `jq -c '.[]' {p.name} > {p.stem}-lines.jsonl`)")
    if isinstance(doc, dict) and n_lines > 1:
        return (f"the file is one JSON object spread over {where}, not JSON Lines; write each row as a JSON "
                f"object on a single line (e.g. `jq -c . {p.name} > {p.stem}-lines.jsonl`)")
    return None


def _read_parquet(p: Path) -> FileRows:
    import pyarrow.parquet as pq

    out = FileRows(p, "row")
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise ChibiError(f"{p}: not a readable parquet file ({e})") from None
    for n, row in enumerate(table.to_pylist(), start=1):
        out.rows.append((n, {k: v for k, v in row.items() if v is not None}))
    if table.num_rows == 0:
        out.errors.append((0, "the file has no rows"))
    return out


# ----------------------------------------------------------------------------------------------
# Rows to conversations


def row_shape(row: dict) -> str:
    """The row's shape (a key of SHAPE_KEYS); RowError for no shape, two shapes or a key the shape does not take."""
    shapes = [name for name, present in (("OpenAI chat", "messages" in row), ("ShareGPT", "conversations" in row),
                                         ("Alpaca", "instruction" in row and "output" in row),
                                         ("verifiable", "prompt" in row and "answer" in row)) if present]
    if len(shapes) > 1:
        raise RowError(f"the row has the keys of {len(shapes)} shapes ({', '.join(shapes)}); keep one per row")
    if not shapes:
        if "chosen" in row or "rejected" in row:
            raise RowError("a preference pair (chosen/rejected) is not a conversation; give chat rows here "
                           "(`chibichat dpo --data FILE` reads preference files and lists their problems)")
        raise RowError(f"unknown row shape with keys {sorted(row)[:8]}; expected 'messages' (OpenAI), "
                       "'conversations' (ShareGPT), 'instruction'+'output' (Alpaca) or 'prompt'+'answer' "
                       "(verifiable)")
    shape = shapes[0]
    unknown = sorted(set(row) - set(SHAPE_KEYS[shape]))
    if unknown:
        hint = ("; Alpaca 'history' (earlier turns) is not read: write the row as OpenAI chat {\"messages\"} "
                "with every turn") if shape == "Alpaca" and "history" in unknown else ""
        raise RowError(f"unknown key(s) {unknown} in a row of the {shape} shape, which takes {', '.join(SHAPE_KEYS[shape])}{hint}")
    return shape


def row_kind(row: dict) -> str:
    """"chat" or "verifiable"; RowError for a shape this module does not read (see row_shape)."""
    return "verifiable" if row_shape(row) == "verifiable" else "chat"


def _unknown_keys(m: dict, accepted: tuple, what: str) -> None:
    unknown = sorted(k for k, v in m.items() if v is not None and k not in accepted)
    if unknown:
        raise RowError(f"{what}: unknown key(s) {unknown}; it takes {', '.join(accepted)}")


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RowError(f"{where}: only text content parts are supported, got {part!r:.60}")
            texts.append(part["text"])
        return "".join(texts)
    raise RowError(f"{where}: content must be a string, got {type(content).__name__}")


def _nonempty(text: str, where: str) -> str:
    if not text.strip():
        raise RowError(f"{where}: empty content")
    return text


def _tool_call(call, where: str) -> str:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        raise RowError(f"{where}: a tool call needs a 'function' object with 'name' and 'arguments'")
    if fn.get("name") not in TOOL_NAMES:
        raise RowError(f"{where}: tool {fn.get('name')!r} is not supported; the model's one tool is the calculator "
                       f"(function name one of {TOOL_NAMES})")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise RowError(f"{where}: tool call arguments are not JSON: {args!r:.60}") from None
    if isinstance(args, dict):
        found = [args[k] for k in TOOL_ARG_KEYS if isinstance(args.get(k), str)]
        if len(found) == 1 and len(args) == 1:
            return _nonempty(found[0], where + " tool call")
    raise RowError(f"{where}: tool call arguments must be one of {TOOL_ARG_KEYS} with a string, got {args!r:.60}")


def _messages_from_openai(msgs, where: str) -> list[dict]:
    """OpenAI messages (with tool calls / tool results) -> chibichat messages (assistant parts)."""
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"{where}: 'messages' must be a non-empty list")
    out: list[dict] = []
    open_tool = False  # the last assistant turn ended with a tool call whose output has not come yet
    for i, m in enumerate(msgs):
        at = f"message {i}"
        if not isinstance(m, dict):
            raise RowError(f"{at}: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise RowError(f"{at}: unknown role {role!r}; expected one of {CHAT_ROLES}")
        _unknown_keys(m, MESSAGE_KEYS[role], f"{at} ({role})")
        prev = out[-1] if out else None
        if role == "tool":
            if not open_tool:
                raise RowError(f"{at}: a tool message must follow an assistant tool call")
            prev["content"].append({"type": "python_output", "text": _text(m.get("content"), at)})
            open_tool = False
            continue
        if open_tool:
            raise RowError(f"{at}: the assistant's tool call has no tool message with its output")
        if role == "assistant":
            content = m.get("content")
            parts = []
            if content is not None:
                text = _text(content, at)
                if text.strip() or not m.get("tool_calls"):
                    parts.append({"type": "text", "text": _nonempty(text, at)})
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list) or len(calls) > 1:
                raise RowError(f"{at}: at most one tool call per assistant message is supported")
            for call in calls:
                parts.append({"type": "python", "text": _tool_call(call, at)})
                open_tool = True
            if not parts:
                raise RowError(f"{at}: empty content (an assistant message needs text or a tool call)")
            weight = message_weight(m.get("weight"), at, RowError)
            continues = prev is not None and prev["role"] == "assistant" and prev["content"] \
                and prev["content"][-1]["type"] == "python_output"
            if continues:  # the reply after a tool result belongs to the same assistant turn
                if weight != prev.get("weight", 1):
                    raise RowError(f"{at}: weight {weight} differs from the weight {prev.get('weight', 1)} of the "
                                   "tool call whose output it follows (one assistant turn); give both the same weight")
                prev["content"] += parts
                continue
            # Weight 1 is the default and is not stored, so unweighted rows give the same items as before.
            out.append({"role": "assistant", "content": parts, **({"weight": 0} if weight == 0 else {})})
        else:
            out.append({"role": role, "content": _nonempty(_text(m.get("content"), at), at)})
    if open_tool:
        raise RowError("the last assistant tool call has no tool message with its output")
    for m in out:  # a plain one-part text turn is stored as a string, like the shipped tasks
        if m["role"] == "assistant" and len(m["content"]) == 1 and m["content"][0]["type"] == "text":
            m["content"] = m["content"][0]["text"]
    return out


def _messages_from_sharegpt(turns, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RowError(f"{where}: 'conversations' must be a non-empty list")
    out = []
    for i, t in enumerate(turns):
        at = f"turn {i}"
        if not isinstance(t, dict):
            raise RowError(f"{at}: expected an object, got {type(t).__name__}")
        _unknown_keys(t, SHAREGPT_KEYS, at)
        role = SHAREGPT_ROLES.get(t.get("from"))
        if role is None:
            raise RowError(f"{at}: unknown role {t.get('from')!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": _nonempty(_text(t.get("value"), at), at)})
    return out


def _messages_from_alpaca(row) -> list[dict]:
    instruction = _nonempty(_text(row["instruction"], "instruction"), "instruction")
    extra = _text(row.get("input", ""), "input")
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": _nonempty(_text(row["output"], "output"), "output")}]


def _with_system(row: dict, msgs: list[dict]) -> list[dict]:
    system = row.get("system")
    if system is None:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        raise RowError("the row has both a 'system' key and a system message; keep one")
    return [{"role": "system", "content": _nonempty(_text(system, "system"), "system")}, *msgs]


def _check_order(msgs: list[dict], *, final_assistant: bool) -> None:
    """Optional system first, then user/assistant strictly alternating, ending as required."""
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i > 0:
            raise RowError(f"message {i}: a system message may only come first")
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not body or body[0]["role"] != "user":
        raise RowError("the conversation must start with a user message (after an optional system message)")
    for a, b in zip(body, body[1:]):
        if a["role"] == b["role"]:
            raise RowError(f"two {a['role']} turns in a row; merge them or add the missing "
                           f"{'assistant' if a['role'] == 'user' else 'user'} turn")
    if final_assistant and body[-1]["role"] != "assistant":
        raise RowError("the conversation ends with a user message; a training conversation ends with the "
                       "assistant reply that is learned")
    if final_assistant and body[-1].get("weight") == 0:
        raise RowError("the final assistant message has weight 0, but a training conversation ends with the reply "
                       "that is learned; remove its weight or end the row at the last trained reply")


def row_to_item(row: dict) -> dict:
    """One row -> a task item (a conversation dict; verifiable rows add "answer" and "match")."""
    kind = row_kind(row)
    if kind == "verifiable":
        prompt = _nonempty(_text(row["prompt"], "prompt"), "prompt")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise RowError(f"answer must be a string or a number, got {type(answer).__name__}")
        if isinstance(answer, float) and not math.isfinite(answer):  # parquet holds NaN/inf; no completion matches
            raise RowError(f"answer must be a finite number, got {answer}")
        answer = _nonempty(str(answer), "answer")
        match = row.get("match", "exact")
        if match not in MATCH_MODES:
            raise RowError(f"match {match!r} is not one of {MATCH_MODES}")
        if match == "numeric" and _to_number(answer) is None:
            raise RowError(f"match 'numeric' needs a numeric answer, got {answer!r}")
        if match == "regex":
            try:
                re.compile(answer)
            except re.error as e:
                raise RowError(f"answer is not a valid regular expression ({e})") from None
        msgs = _with_system(row, [{"role": "user", "content": prompt}])
        return {"messages": msgs, "answer": answer, "match": match}
    if "messages" in row:
        msgs = _messages_from_openai(row["messages"], "messages")
    elif "conversations" in row:
        msgs = _messages_from_sharegpt(row["conversations"], "conversations")
    else:
        msgs = _messages_from_alpaca(row)
    msgs = _with_system(row, msgs)
    _check_order(msgs, final_assistant=True)
    return {"messages": msgs}


def load_items(path) -> tuple[str, list[dict], FileRows]:
    """(kind, items, rows) of a file; ChibiError at the first problem, naming its line."""
    rows = read_rows(path)
    where = f"{rows.path}"
    if rows.errors:
        n, msg = rows.errors[0]
        raise ChibiError(f"{where} {rows.unit} {n}: {msg} ({len(rows.errors)} problem(s); "
                         f"`chibichat data check {rows.path}` lists them all)")
    items, kinds = [], set()
    for n, row in rows.rows:
        try:
            kinds.add(row_kind(row))
            items.append(row_to_item(row))
        except RowError as e:
            raise ChibiError(f"{where} {rows.unit} {n}: {e} (`chibichat data check {rows.path}` lists every "
                             "problem)") from None
        if len(kinds) > 1:
            raise ChibiError(f"{where} {rows.unit} {n}: the file mixes chat rows and verifiable prompt/answer rows; "
                             "put them in two files")
    return kinds.pop(), items, rows


# ----------------------------------------------------------------------------------------------
# The task


def _to_number(text: str):
    from decimal import Decimal, InvalidOperation

    try:
        return Decimal(text.strip().replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def match_answer(mode: str, answer: str, completion: str) -> bool:
    """exact: the stripped completion equals the stripped answer. numeric: the number after the last
    "####" (or, only without one, the last number in the completion) equals the answer as a number. regex: the
    answer pattern matches the whole stripped completion."""
    from chibichat.eval.metrics import extract_final_number, last_number

    text = completion.strip()
    if mode == "exact":
        return text == answer.strip()
    if mode == "numeric":
        # A "####" that does not parse is no answer: falling back to the last number would pass "#### maybe 7".
        got = extract_final_number(text) if "####" in text else last_number(text)
        return got is not None and _to_number(got) == _to_number(answer)
    if mode == "regex":
        return re.fullmatch(answer, text, flags=re.DOTALL) is not None
    raise ChibiError(f"match {mode!r} is not one of {MATCH_MODES}")


class FileTask(Task):
    """A task read from a local file (see the module docstring). Kind "conversation" for chat rows,
    "generative" (with `evaluate`) for verifiable prompt/answer rows."""

    def __init__(self, path):
        kind, items, rows = load_items(path)
        self.path = rows.path
        self.name = PREFIX + str(path)
        self.kind = "conversation" if kind == "chat" else "generative"
        self.lang = "en"
        self.description = f"{len(items)} {'conversations' if kind == 'chat' else 'prompt/answer rows'} from {rows.path}"
        self.items = items
        self.unit = rows.unit
        # Lines (rows) with a weight-0 assistant message, for the stages that cannot honour it.
        self.weight0_lines = [n for (n, _), item in zip(rows.rows, items)
                              if any(m.get("weight") == 0 for m in item["messages"])]

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int) -> dict:
        return self.items[i]

    def evaluate(self, item: dict, completion_text: str) -> bool:
        if self.kind != "generative":
            return super().evaluate(item, completion_text)
        return match_answer(item["match"], item["answer"], completion_text)


def item_key(item: dict) -> str:
    """An item's content as one string: equal for two rows that parse to the same item (`data check`'s
    duplicates, and the held-out items that repeat a training item, see `held_out_copies`)."""
    return json.dumps(item, sort_keys=True, ensure_ascii=False)


def held_out_copies(train, val) -> list[int]:
    """Positions in `val` of the items equal (`item_key`) to an item of `train`: a held-out copy of a training
    row would measure the held-out loss on training data. Views of a FileTask; O(len(train))."""
    seen = {item_key(train[i]) for i in range(len(train))}
    return [i for i in range(len(val)) if item_key(val[i]) in seen]


def refuse_weights(tasks, stage: str) -> None:
    """A stage that trains on every token (midtrain) cannot leave a weight-0 reply out: refuse a file that has one
    rather than train on it. `tasks` may be views (slices) of file tasks."""
    for t in tasks:
        while hasattr(t, "base"):
            t = t.base
        if isinstance(t, FileTask) and t.weight0_lines:
            raise ChibiError(f"{t.path} {t.unit} {t.weight0_lines[0]}: an assistant message has weight 0, but {stage} "
                             f"trains on every token, so the weight cannot apply ({len(t.weight0_lines)} row(s) have "
                             "one); train this file with sft, or remove the weights")


def file_task(name: str, **options) -> FileTask:
    """The task for a `file:PATH` name. File tasks take no options (no split/size/seed: hold-out is the
    stage's job, and RL names its held-out file with --eval-task)."""
    if options:
        raise ChibiError(f"task {name!r} is a local file and takes no options, got {sorted(options)}")
    path = name[len(PREFIX):]
    if not path:
        raise ChibiError("'file:' needs a path, e.g. file:/data/support.jsonl")
    return FileTask(path)


# ----------------------------------------------------------------------------------------------
# Checking a file before training (`chibichat data check`)


def check_file(path) -> dict:
    """Every problem of a file, not just the first: {"path", "unit", "rows" (lines/rows read), "valid",
    "kind" ("chat" | "verifiable" | None), "errors" [(line, message)], "duplicates" [(line, line of the
    first copy)], "items" [(line, item)] of the valid rows}. Rows of the minority kind in a mixed file are
    errors. Raises ChibiError only for a missing or unreadable file."""
    rows = read_rows(path)
    errors = list(rows.errors)
    parsed = []
    for n, row in rows.rows:
        try:
            parsed.append((n, row_kind(row), row_to_item(row)))
        except RowError as e:
            errors.append((n, str(e)))
    kinds = [k for _, k, _ in parsed]
    kind = max(set(kinds), key=kinds.count) if kinds else None
    items, seen, duplicates = [], {}, []
    for n, k, item in parsed:
        if k != kind:
            errors.append((n, f"a {k} row in a file of {kind} rows; put them in two files"))
            continue
        key = item_key(item)
        if key in seen:
            duplicates.append((n, seen[key]))
        else:
            seen[key] = n
        items.append((n, item))
    errors.sort(key=lambda e: e[0])
    n_rows = len(rows.rows) + sum(1 for n, _ in rows.errors if n > 0)
    return {"path": str(rows.path), "unit": rows.unit, "rows": n_rows, "valid": len(items), "kind": kind,
            "errors": errors, "duplicates": duplicates, "items": items}
