"""Preference pairs for `chibichat dpo`: a prompt, a chosen reply and a rejected one.

A pair is `{"messages": [prompt messages, ending with a user message], "chosen": C, "rejected": R}`
where C and R are assistant contents (a string or a list of parts, as in chibichat.render).

From a file (`load_pairs`): .jsonl / .parquet rows
    {"prompt": str, "chosen": str, "rejected": str}                       (optional "system": str)
    {"messages": [...prompt...], "chosen": ..., "rejected": ...}
    {"chosen": [...conversation...], "rejected": [...conversation...]}    (HF style: two whole chats that
                                                                           share everything but the last reply)
chosen/rejected may also be a single {"role": "assistant", "content": ...} message (a tool call needs its output,
so a reply with tool calls comes as a whole HF-style conversation). A reply given as parts takes the parts of
chibichat.render (text, python, python_output) and needs some text or a tool call. "system" is a non-empty
string, as in chat files. A per-message "weight" is refused: DPO scores the final replies only. Any other key
(a misspelt "system", a score) is refused, never ignored; a null counts as absent. Problems are ChibiErrors
naming the file and line.

Generated from the verifiable tasks (`generated_pairs`), so that DPO has something measurable offline:
    prefs-arithmetic   a calculator answer vs the same answer with a wrong result (result + d, d != 0)
    prefs-spelling     the spelling reply vs the same reply whose last line, copied from the tool's output,
                       has two letters swapped or one replaced (the tool's output is the same)
    prefs-language     an identity question answered in the asked language vs the other language (EN/JA)
Train/test splits are disjoint by construction (the underlying generated tasks' key split).

Online (`hub_pairs`, through the same hub loader as the online tasks, chibichat/tasks/hub.py):
    ultrafeedback      HuggingFaceH4/ultrafeedback_binarized, train_prefs / test_prefs (the first N rows);
                       a row whose chosen and rejected replies are identical teaches nothing: it is left out
                       and counted
"""

from __future__ import annotations

import copy
import json
import random

from chibichat.common import ChibiError

GENERATED = ("prefs-arithmetic", "prefs-spelling", "prefs-language")
PAIR_KEYS = ("prompt", "messages", "chosen", "rejected", "system")
# name -> (repo, subset, train split, test split)
ONLINE = {"ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", "default", "train_prefs", "test_prefs")}


# ----------------------------------------------------------------------------------------------
# From a file


def _reply(value, where: str):
    from chibichat.render import PART_TYPES

    if isinstance(value, dict):
        if value.get("role") not in (None, "assistant"):
            raise ChibiError(f"{where}: a chosen/rejected message must have role assistant, got {value.get('role')!r}")
        if value.get("tool_calls"):
            raise ChibiError(f"{where}: a reply message with tool_calls needs the tool's output after it; give chosen "
                             "and rejected as whole conversations (lists of messages, with the tool message)")
        unknown = sorted(k for k, v in value.items() if v is not None and k not in ("role", "content", "tool_calls"))
        if unknown:
            raise ChibiError(f"{where}: unknown key(s) {unknown} in the reply message; it takes role, content")
        value = value.get("content")
    if isinstance(value, str):
        if not value.strip():
            raise ChibiError(f"{where}: empty reply")
        return value
    if not (isinstance(value, list) and value):
        raise ChibiError(f"{where}: a reply must be a non-empty string, an assistant message or a list of parts")
    for k, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise ChibiError(f"{where} part {k}: expected {{'type': one of {PART_TYPES}, 'text': str}}, got {part!r:.80}")
    if not any(p["text"].strip() for p in value if p["type"] != "python_output"):
        raise ChibiError(f"{where}: empty reply (its parts hold no text and no tool call)")
    return value


def rendered_reply(content) -> tuple:
    """A reply as chibichat.render reads it, for comparing two replies: its (type, text) parts, a string being
    one text part, consecutive text parts joined (one text to the model) and empty ones dropped (no tokens)."""
    out: list[tuple[str, str]] = []
    for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
        kind, text = part["type"], part["text"]
        if kind == "text" and not text:
            continue
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + text)
        else:
            out.append((kind, text))
    return tuple(out)


def pair_key(pair: dict) -> str:
    """A pair's content as one string, its replies as rendered: equal for two rows that make the same pair."""
    return json.dumps([pair["messages"], rendered_reply(pair["chosen"]), rendered_reply(pair["rejected"])],
                      sort_keys=True, ensure_ascii=False)


def _refuse_weight(messages, where: str) -> None:
    """OpenAI's per-message "weight" says which chat turns train; DPO scores the final replies only."""
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and m.get("weight") is not None:
            raise ChibiError(f"{where} message {i} has a 'weight', which has no meaning in a preference pair (DPO "
                             "scores only the final chosen and rejected replies); remove it")


def row_to_pair(row: dict, where: str) -> dict:
    from chibichat.tasks.local import RowError, _check_order, _messages_from_openai, _with_system

    unknown = sorted(k for k, v in row.items() if v is not None and k not in PAIR_KEYS)
    if unknown:
        raise ChibiError(f"{where}: unknown key(s) {unknown} in a preference row, which takes {', '.join(PAIR_KEYS)}")
    if "chosen" not in row or "rejected" not in row:
        raise ChibiError(f"{where}: a preference row needs 'chosen' and 'rejected' (and 'prompt' or 'messages')")
    chosen, rejected = row["chosen"], row["rejected"]
    for key in ("messages", "chosen", "rejected"):
        _refuse_weight(row.get(key), f"{where}: {key}")
    try:
        if isinstance(chosen, list) and chosen and isinstance(chosen[0], dict) and "role" in chosen[0]:
            if not (isinstance(rejected, list) and rejected):
                raise ChibiError(f"{where}: chosen is a conversation, so rejected must be one too")
            c_msgs, r_msgs = _messages_from_openai(chosen, "chosen"), _messages_from_openai(rejected, "rejected")
            if c_msgs[:-1] != r_msgs[:-1] or c_msgs[-1]["role"] != "assistant" or r_msgs[-1]["role"] != "assistant":
                raise ChibiError(f"{where}: chosen and rejected conversations must share every message but a final "
                                 "assistant reply")
            prompt, chosen, rejected = c_msgs[:-1], c_msgs[-1]["content"], r_msgs[-1]["content"]
            # Hugging Face preference sets repeat the prompt beside the chats (UltraFeedback: 'prompt' is the
            # user's question, 'messages' the chosen chat): kept only when it says the same, never ignored
            if row.get("prompt") is not None and not (prompt and prompt[-1]["role"] == "user"
                                                      and row["prompt"] == prompt[-1]["content"]):
                raise ChibiError(f"{where}: 'prompt' is not the last user message of the chosen/rejected chats; "
                                 "leave it out or make it that message")
            if row.get("messages") is not None and _messages_from_openai(row["messages"], "messages") not in (
                    prompt, c_msgs):
                raise ChibiError(f"{where}: 'messages' is neither the chats' shared prompt nor the chosen chat; "
                                 "leave it out")
        elif row.get("messages") is not None and row.get("prompt") is not None:
            raise ChibiError(f"{where}: give the prompt as 'prompt' or as 'messages', not both")
        elif "messages" in row:
            prompt = _messages_from_openai(row["messages"], "messages")
        elif "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ChibiError(f"{where}: 'prompt' must be a non-empty string")
            prompt = [{"role": "user", "content": row["prompt"]}]
        else:
            raise ChibiError(f"{where}: a preference row needs 'prompt' or 'messages' (or chosen/rejected chats)")
        prompt = _with_system(row, prompt)  # the chat files' rule: a non-empty string, and not twice
        _check_order(prompt + [{"role": "assistant", "content": "x"}], final_assistant=True)
    except RowError as e:
        raise ChibiError(f"{where}: {e}") from None
    c, r = _reply(chosen, f"{where} chosen"), _reply(rejected, f"{where} rejected")
    if rendered_reply(c) == rendered_reply(r):  # a string and the same text as parts read the same
        raise ChibiError(f"{where}: chosen and rejected are identical; the pair teaches nothing")
    return {"messages": prompt, "chosen": c, "rejected": r}


def load_pairs(path) -> list[dict]:
    """Every pair of a file; a ChibiError naming the first problem and the lines of all of them (`chibichat data
    check` reads chat files only, so this is where a preference file's problems are listed)."""
    from chibichat.tasks.local import read_rows

    rows = read_rows(path)
    problems = [(n, f"{rows.path} {rows.unit} {n}: {msg}") for n, msg in rows.errors]
    pairs = []
    for n, row in rows.rows:
        try:
            pairs.append(row_to_pair(row, f"{rows.path} {rows.unit} {n}"))
        except ChibiError as e:
            problems.append((n, str(e)))
    if problems:
        problems.sort(key=lambda p: p[0])
        lines = [str(n) for n, _ in problems]
        more = f", ... ({len(lines) - 20} more)" if len(lines) > 20 else ""
        raise ChibiError(f"{problems[0][1]} ({len(problems)} problem(s), at {rows.unit}s {', '.join(lines[:20])}{more}; "
                         "fix them all before training)")
    return pairs


# ----------------------------------------------------------------------------------------------
# Generated


def _wrong_number(answer: str, rng: random.Random) -> str:
    value = int(answer)
    d = rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
    return str(value + d if value + d >= 0 else value + abs(d))


def _arithmetic_pair(item: dict, rng: random.Random) -> dict:
    answer = item["answer"]
    wrong = _wrong_number(answer, rng)
    rejected = copy.deepcopy(item["messages"][-1]["content"])
    for part in rejected:
        if part["type"] in ("python_output", "text"):
            part["text"] = part["text"].replace(answer, wrong)
    return {"messages": item["messages"][:-1], "chosen": item["messages"][-1]["content"], "rejected": rejected}


def _misspell(word: str, rng: random.Random) -> str:
    letters = list(word)
    swaps = [i for i in range(len(letters) - 1) if letters[i] != letters[i + 1]]
    if swaps and rng.random() < 0.5:
        i = rng.choice(swaps)
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
    else:
        i = rng.randrange(len(letters))
        pool = [c for c in "abcdefghijklmnopqrstuvwxyz" if c != letters[i]] if letters[i].isascii() else \
            [c for c in "アイウエオカキクケコサシスセソタチツテト" if c != letters[i]]
        letters[i] = rng.choice(pool)
    return "".join(letters)


def _spelling_pair(item: dict, rng: random.Random) -> dict:
    chosen = item["messages"][-1]["content"]
    rejected = copy.deepcopy(chosen)
    rejected[-1]["text"] = "\n" + "-".join(_misspell(item["word"], rng))
    return {"messages": item["messages"][:-1], "chosen": chosen, "rejected": rejected}


def _language_pairs(split: str, size: int, seed: int) -> list[dict]:
    from chibichat.tasks.base import key_split
    from chibichat.tasks.identity import EN_TOPICS, JA_TOPICS, fitting_answers

    out = []
    for i in range(size):
        for attempt in range(1000):
            rng = random.Random(f"prefs-language:{seed}:{i}:{attempt}")
            topic = rng.choice(sorted(EN_TOPICS))
            lang = rng.choice(["en", "ja"])
            asked, other = (EN_TOPICS, JA_TOPICS) if lang == "en" else (JA_TOPICS, EN_TOPICS)
            q = rng.choice(asked[topic][0])
            if key_split(q) == split:
                out.append({"messages": [{"role": "user", "content": q}], "chosen": rng.choice(fitting_answers(lang, q, asked[topic][1])),
                            "rejected": rng.choice(other[topic][1])})
                break
        else:
            raise ChibiError("prefs-language could not draw a pair for this split")
    return out


def generated_pairs(name: str, split: str = "train", size: int = 500, seed: int = 0) -> list[dict]:
    """`size` pairs of the generated preference task `name` (see the module docstring)."""
    from chibichat.tasks.registry import get_task

    if name not in GENERATED:
        raise ChibiError(f"unknown preference task {name!r}; give a .jsonl/.parquet file or one of {', '.join(GENERATED)}")
    if name == "prefs-language":
        return _language_pairs(split, size, seed)
    base = get_task("arithmetic" if name == "prefs-arithmetic" else "spelling", split=split, size=size, seed=seed)
    make = _arithmetic_pair if name == "prefs-arithmetic" else _spelling_pair
    out = []
    for i in range(len(base)):
        item = base[i]
        out.append(make(item, random.Random(f"{name}:{seed}:{i}")))
    return out


def hub_pairs(home, name: str, split: str, size: int) -> tuple[list[dict], int]:
    """(pairs, identical pairs left out) from the first `size` rows of an online preference set's split
    ("train" | "test"); downloads and caches it under home/data/tasks/ like the online tasks."""
    from chibichat.tasks.hub import hub_rows

    if name not in ONLINE:
        raise ChibiError(f"unknown online preference set {name!r}; known: {', '.join(ONLINE)}")
    if split not in ("train", "test"):
        raise ChibiError(f"split must be train or test, got {split!r}")
    repo, subset, train_split, test_split = ONLINE[name]
    hub_split = train_split if split == "train" else test_split
    rows = hub_rows(home, repo, subset, hub_split, ("prompt", "chosen", "rejected"))
    pairs, identical = [], 0
    for k, row in enumerate(rows[:size]):
        # The set's own bookkeeping columns (UltraFeedback: prompt_id, score_chosen, score_rejected) are no part of
        # a pair; a local file's unknown keys are refused (row_to_pair).
        row = {key: v for key, v in row.items() if key in PAIR_KEYS}
        try:
            pairs.append(row_to_pair(row, f"{repo} {hub_split} row {k}"))
        except ChibiError as e:
            if "identical" not in str(e):
                raise
            identical += 1
    return pairs, identical
