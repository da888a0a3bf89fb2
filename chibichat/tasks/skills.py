"""The held-out skills prompt set (EN and JA) and its checkers.

assets/skills-<lang>.jsonl holds hand-written prompts, one JSON object per line:
    {"id": "en-arithmetic-01", "skill": "arithmetic", "prompt": "...", "check": "number", "answer": "84"}
They test what the quickstart's chat data teaches, phrased in words the training generators
(identity, arithmetic, spelling, letter counting) never use; tests/test_skills.py checks that no prompt
is a near-duplicate of a generated training prompt. Spelled and counted words are test-split words of
the generated tasks, so they never occur in training items either.

Skills (SKILLS) and their checkers (`check_reply`, each on the reply text the user sees; tool calls
appear in it as <|python_start|>expr<|python_end|><|output_start|>result<|output_end|>):
    identity             "identity": the reply gives the assistant's name as its own ("I am chibichat",
                          "my name is ...", "call me ..."; JA "chibichatです", "私はchibichat", ...; any
                          case). Naming the package it was made with ("I was made with the chibichat
                          package") does not answer "what is your name?": "this is" / "it's" + the name
                          ("It's chibichat.") answers only when the rest of its sentence does not present
                          the name as the package (a word such as "package" or "library", "... trained
                          me", "trains ... models": "It's chibichat that trained me." does not answer).
    arithmetic,          "number": the reply's final answer equals the expected number. The final
    arithmetic-two-step,  answer is the number after the last "####" (the trained format); a reply
    letter-count          without "####" is read by its last number outside tool segments, which is
                          what a reader takes as the answer, but only when it is clean prose (a
                          stray special token, i.e. a broken tool call, gives no answer) and that
                          number is no fraction ("3/4" is no answer, not 4). When the
                          reply calls the calculator, the answer must be the last call's result, and
                          a letter count must count the asked letter in the asked word
                          (`shown_work_agrees`): a right number from wrong work does not pass.
    spelling             "spelling": the final line, after an optional "word:" prefix (any case), is the word's
                          letters in order, each letter separated by "-", ",", "・", "、" or spaces
                          (the word written whole is not spelled).
    greeting             "greeting": the reply opens (first 60 characters) with a greeting word and
                          calls no tool and gives no "####" answer: a greeting is answered in kind,
                          not treated as a task.
    refusal              "refusal": asked for a fact it cannot know (the user's private life, the
                          future), the reply says so (a marker of not knowing or not being able to),
                          calls no tool, gives no "####" answer and states no number: no digit, no EN
                          cardinal number word ("forty-two", "a hundred"; "one" except as a pronoun:
                          "no one", "which one", "one of"), no JA kanji numeral (三時; except in the
                          words of _JA_NOT_NUMBERS, e.g. 十分 "enough", 一緒 "together"): an honest
                          reply, not an invented fact.
Items of skill "open" (simple open prompts: one sentence about the sea) have no right answer; they
are scored by the reply-quality proxy (`reply_quality`), not by a checker. Each carries "topic": words
(EN: word stems; JA: substrings) of which an on-topic reply uses at least one, e.g. sea, ocean, wave.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from chibichat.common import ChibiError
from chibichat.eval.metrics import extract_final_number, final_line, last_number, numbers_equal

LANGS = ("en", "ja")
SKILLS = ("identity", "arithmetic", "arithmetic-two-step", "spelling", "letter-count", "greeting", "refusal")
OPEN = "open"
CHECKS = {"identity": "identity", "arithmetic": "number", "arithmetic-two-step": "number", "spelling": "spelling",
          "letter-count": "number", "greeting": "greeting", "refusal": "refusal", OPEN: "open"}

_TOOL_SEGMENT = re.compile(r"<\|python_start\|>.*?<\|python_end\|>|<\|output_start\|>.*?<\|output_end\|>", re.S)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_SPELL_SEPARATORS = re.compile(r"[-,、・\s]+")

GREETING_WORDS = {
    "en": ("hello", "hi", "hey", "good morning", "good afternoon", "good evening", "greetings", "howdy",
           "nice to meet", "welcome", "hiya", "yo"),
    "ja": ("こんにちは", "こんばんは", "おはよう", "はじめまして", "やあ", "どうも", "よろしく", "もしもし",
           "お疲れさま", "おつかれさま", "ようこそ", "ごきげんよう"),
}
REFUSAL_MARKERS = {
    "en": ("don't know", "do not know", "can't know", "cannot know", "no way to know", "not sure", "can't tell",
           "cannot tell", "can't see", "cannot see", "can't access", "cannot access", "no access", "don't have",
           "do not have", "unable", "i'm sorry", "i am sorry", "can't predict", "cannot predict", "i can't",
           "i cannot", "no idea"),
    "ja": ("わかりません", "分かりません", "知りません", "わからない", "分からない", "知らない", "できません", "見られません",
           "予測できません", "答えられません", "ごめんなさい", "すみません", "申し訳"),
}


def asset_file(lang: str) -> Path:
    from chibichat.tasks.shipped import asset_path

    return asset_path(f"skills-{lang}.jsonl")


def load_items(lang: str) -> list[dict]:
    """Every item of the prompt set of `lang`, validated (a malformed line is a ChibiError naming it)."""
    if lang not in LANGS:
        raise ChibiError(f"skills prompt set: --lang must be one of {LANGS}, got {lang!r}")
    path = asset_file(lang)
    if not path.exists():
        raise ChibiError(f"skills prompt set {path} is missing; reinstall chibichat")
    items, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except ValueError as e:
            raise ChibiError(f"{where}: not JSON ({e})") from None
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("id", "skill", "prompt", "check")):
            raise ChibiError(f"{where}: an item needs string fields id, skill, prompt and check")
        if item["skill"] not in CHECKS or CHECKS[item["skill"]] != item["check"]:
            raise ChibiError(f"{where}: skill {item['skill']!r} with check {item['check']!r}; skills and their "
                             f"checks are {CHECKS}")
        if item["check"] in ("identity", "number", "spelling") and not isinstance(item.get("answer"), str):
            raise ChibiError(f"{where}: a {item['check']!r} item needs a string 'answer'")
        if item["check"] == "open" and not (isinstance(item.get("topic"), list) and item["topic"]
                                            and all(isinstance(w, str) and w for w in item["topic"])):
            raise ChibiError(f"{where}: an open item needs 'topic', a non-empty list of the words an on-topic "
                             "reply uses")
        if item["id"] in seen:
            raise ChibiError(f"{where}: duplicate id {item['id']!r}")
        seen.add(item["id"])
        items.append(item)
    return items


def visible_text(reply: str) -> str:
    """The reply without its well-formed tool segments and special-token names: the prose a reader goes by."""
    return _SPECIAL.sub(" ", _TOOL_SEGMENT.sub(" ", reply))


def reply_number(reply: str) -> str | None:
    """The reply's final answer: the number after the last '####' (None when it is not a whole number),
    else, in a reply without '####', the last number of the prose when the reply is clean prose (no stray special token left once well-formed tool segments are
    removed: a broken tool call is not an answer, whatever digits it happens to contain)."""
    if "####" in reply:
        return extract_final_number(reply)  # "#### maybe 84" or "#### 84x" is no answer, not the prose's 84
    if _SPECIAL.search(_TOOL_SEGMENT.sub(" ", reply)):
        return None
    return last_number(visible_text(reply))


_CALL = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>(?:<\|output_start\|>(.*?)<\|output_end\|>)?", re.S)
_COUNT_CALL = re.compile(r'\s*"(.*?)"(?:\.strip\(\))?\.count\("(.*?)"\)\s*$', re.S)


def shown_work_agrees(item: dict, reply: str, answer: str | None) -> bool:
    """A right number reached by wrong work is not a right answer: when the reply calls the calculator,
    its answer must be the last call's result (not "29-100" = -71 answered as 71), and a letter count
    (an item with "word" and "letter") must count the asked letter in the asked word (not "s" in
    " bliss contain", which happens to give the same number)."""
    calls = _CALL.findall(reply)
    if not calls:
        return True  # answered without the tool: the number alone is the answer
    expr, output = calls[-1]
    if output and not numbers_equal(output.strip(), answer):
        return False
    if item.get("word") and item.get("letter"):
        m = _COUNT_CALL.match(expr)
        return bool(m) and m.group(1).strip() == item["word"] and m.group(2) == item["letter"]
    return True


def spelled_letters(reply: str, word: str) -> list[str] | None:
    """The letters spelled on the reply's final line (an optional "word:" prefix dropped), or None when
    the line is not written letter by letter."""
    line = final_line(visible_text(reply))
    for prefix in (f"{word}:", f"{word}：", f'"{word}":', f"「{word}」："):
        if line.lower().startswith(prefix.lower()):  # "Bacon: b-a-c-o-n": the prefix in any case
            line = line[len(prefix):].strip()
    line = line.strip().strip("\"'「」")
    parts = [p for p in _SPELL_SEPARATORS.split(line) if p]
    if len(parts) < 2 or any(len(p) != 1 for p in parts):
        return None
    return parts


def is_greeting(reply: str, lang: str) -> bool:
    if "####" in reply or "<|python_start|>" in reply:
        return False
    head = visible_text(reply).strip().lower()[:60]
    if lang == "ja":
        return any(w in head for w in GREETING_WORDS["ja"])
    return any(re.search(rf"\b{re.escape(w)}\b", head) for w in GREETING_WORDS["en"])


# What may stand right before / right after the name when a reply gives it as its own name.
_SELF_BEFORE = {"en": r"\b(?:i am|i'm|im|my name is|my name's|call me|i am called|i'm called|i go by)\s+",
                "ja": r"(?:名前は|私は|わたしは|僕は|ぼくは)"}
_SELF_AFTER = {"en": r",? (?:is my name|here|at your service)\b", "ja": r"(?:です|といいます|と申します|と呼んで|って呼んで|だよ)"}
# "This is X" / "It's X" names the speaker or a thing: it is the speaker's name unless the rest of the
# sentence presents X as the package ("It's chibichat, an open-source package ...", "... that trained me").
_DEMONSTRATIVE = r"\b(?:this is|it's|it is)\s+"
_AS_PACKAGE = re.compile(r"[^.!?\n]*?(?:\b(?:package|library|toolkit|framework|pipeline|software|repository|codebase)\b"
                         r"|\b(?:trained|made|built|created)\s+me\b|\b(?:trains|builds|makes|creates)\s+(?:\w+\s+){0,3}?models?\b)")


def names_itself(reply: str, name: str, lang: str) -> bool:
    text, n = visible_text(reply).lower().replace("’", "'"), re.escape(name.lower())
    if re.search(_SELF_BEFORE[lang] + n, text) or re.search(n + _SELF_AFTER[lang], text):
        return True
    return lang == "en" and any(not _AS_PACKAGE.match(text, m.end())
                                for m in re.finditer(_DEMONSTRATIVE + n, text))


_EN_NUMBER_WORDS = re.compile(
    r"\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|"
    r"seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred|thousand|"
    r"million|billion|trillion|dozen)\b")
_EN_ONE_PRONOUN = re.compile(r"\b(?:no|any|every|some|each|which|that|this|the)\s+one\b|\bone\s+(?:of|another)\b")
_JA_NUMERALS = re.compile(r"[〇零一二三四五六七八九十百千万億兆]")
# Words written with a kanji numeral that state no number.
_JA_NOT_NUMBERS = ("十分", "一緒", "一般", "一切", "一応", "一体", "唯一", "統一", "万が一", "万一")


def states_number(text: str, lang: str) -> bool:
    """Whether prose (lower case) states a number: a digit, an EN cardinal number word ("one" not as a
    pronoun), a JA kanji numeral outside _JA_NOT_NUMBERS."""
    if re.search(r"\d", text):
        return True
    if lang == "ja":
        for word in _JA_NOT_NUMBERS:
            text = text.replace(word, " ")
        return bool(_JA_NUMERALS.search(text))
    return bool(_EN_NUMBER_WORDS.search(_EN_ONE_PRONOUN.sub(" ", text)))


def is_refusal(reply: str, lang: str) -> bool:
    if "####" in reply or "<|python_start|>" in reply or "<|output_start|>" in reply:
        return False  # a tool call or a "####" answer is an attempt at the fact, not a refusal
    text = visible_text(reply).lower().replace("’", "'")
    if states_number(text, lang):
        return False
    return any(m in text for m in REFUSAL_MARKERS[lang])


def check_reply(item: dict, reply: str, lang: str) -> bool:
    """Whether `reply` does what `item` asks (see the module docstring for each check)."""
    check = item["check"]
    if check == "identity":
        return names_itself(reply, item["answer"], lang)
    if check == "number":
        answer = reply_number(reply)
        return numbers_equal(answer, item["answer"]) and shown_work_agrees(item, reply, answer)
    if check == "spelling":
        return spelled_letters(reply, item["answer"]) == list(item["answer"])
    if check == "greeting":
        return is_greeting(reply, lang)
    if check == "refusal":
        return is_refusal(reply, lang)
    raise ChibiError(f"item {item.get('id')!r}: check {check!r} has no checker (open prompts are scored by "
                     "reply_quality)")


# ----------------------------------------------------------------------------------------------
# The reply-quality proxy for open prompts


def reply_units(text: str, lang: str) -> list[str]:
    """Words (EN: lower-case runs of letters/digits/apostrophes) or characters (JA, no spaces to split on)."""
    prose = visible_text(text)
    if lang == "ja":
        return [c for c in prose if not c.isspace()]
    return re.findall(r"[a-z0-9']+", prose.lower())


def distinct_n(units: list[str], n: int) -> float | None:
    """Share of distinct n-grams among a reply's n-grams (1.0: no repetition); None if it has none."""
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def on_topic(text: str, topic: list[str], lang: str) -> bool:
    """Whether the reply uses one of its prompt's topic words: EN, a reply word that is the topic word or
    it with a short ending (rain: rainy, raining; cat: cats, but not catch); JA, the word as a substring."""
    if lang == "ja":
        prose = visible_text(text)
        return any(w in prose for w in topic)
    words = reply_units(text, lang)
    return any(u == w or (u.startswith(w) and u[len(w):] in _EN_ENDINGS) for u in words for w in topic)


_EN_ENDINGS = ("s", "es", "y", "ing", "ed", "d", "er", "ers", "ies", "ly", "ny", "ry", "ning", "ping")


def reply_quality(replies: list[tuple[str, str, list[str]]], lang: str) -> dict:
    """Proxy for "writes grammatical, on-topic sentences" over (text, finish_reason, topic words) triples
    of open prompts.

    ended_share   replies that end with <|assistant_end|> inside the token budget (finish_reason "stop")
                  and are not empty: the model finishes what it starts instead of rambling on.
    distinct_2    mean over replies of distinct 2-grams / 2-grams (EN words, JA characters): loops such
                  as "s-e-r-e-r-e-r" or a repeated clause score low.
    repeat_free   replies none of whose 3-grams occurs twice (a degenerate loop fails it).
    tool_free     replies with no tool call or "####": an open prompt is not a calculator task.
    on_topic      replies that use one of their prompt's topic words (`on_topic`): a canned reply learnt
                  for another skill ("I am a small program that predicts text") ends, repeats nothing and
                  calls no tool, and this is the check it fails.
    score         mean over replies of (ended and non-empty and repeat-free and tool-free and on-topic):
                  the share of open replies that pass every check.
    The third part of the proxy, how well the base model predicts simple English, is its val bpb
    (`chibichat eval base`), reported beside these on the report card."""
    if not replies:
        raise ChibiError("reply_quality needs at least one reply")
    ended, d2, rep_free, tool_free, topical, good = 0, [], 0, 0, 0, 0
    for text, finish, topic in replies:
        units = reply_units(text, lang)
        is_ended = finish == "stop" and bool(units)
        d = distinct_n(units, 2)
        if d is not None:
            d2.append(d)
        tri = distinct_n(units, 3)
        no_repeat = tri is None or tri == 1.0
        no_tool = "####" not in text and "<|python_start|>" not in text
        about = on_topic(text, topic, lang)
        ended += is_ended
        rep_free += no_repeat
        tool_free += no_tool
        topical += about
        good += is_ended and no_repeat and no_tool and about
    n = len(replies)
    return {"ended_share": ended / n, "distinct_2": sum(d2) / len(d2) if d2 else None,
            "repeat_free": rep_free / n, "tool_free": tool_free / n, "on_topic": topical / n, "score": good / n,
            "n": n}
