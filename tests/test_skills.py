import json
import re
import unicodedata

import pytest

from chibichat.common import ChibiError, Home
from chibichat.eval import skills as ES
from chibichat.tasks import skills as S
from chibichat.tokenizer import SPECIAL_TOKENS

# Near-duplicate rule of the disjointness test. Text is normalised (NFKC, lower case, every number
# replaced by "#", punctuation dropped, whitespace collapsed), so a held-out prompt that only swaps the
# numbers or names of a training template still counts as that template. Two prompts are near-duplicates
# when their normalised texts are equal or the Jaccard similarity of their n-gram sets (EN: word 3-grams,
# JA: character 4-grams) is >= NEAR_DUP.
NEAR_DUP = 0.5
SAMPLE = 1500  # train items drawn from each generated task


def normalise(text: str) -> str:
    t = unicodedata.normalize("NFKC", text).lower()
    t = re.sub(r"\d+", "#", t)
    t = re.sub(r"[^\w#\s]", " ", t)
    return " ".join(t.split())


def grams(text: str, lang: str) -> frozenset:
    if lang == "en":
        w = text.split()
        return frozenset(tuple(w[i:i + 3]) for i in range(max(1, len(w) - 2)))
    c = text.replace(" ", "")
    return frozenset(c[i:i + 4] for i in range(max(1, len(c) - 3)))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def training_prompts(lang: str) -> set[str]:
    """Every user turn of the chat data's generators (a sample of SAMPLE train items per generated task)
    and of the shipped conversations. Every phrasing itself is compared in the phrasing-level test below."""
    from chibichat.tasks.registry import get_task

    sfx = "" if lang == "en" else "-ja"
    out = set()
    generated = [n + sfx for n in ("identity", "arithmetic", "arithmetic-multi", "spelling", "letter-count", "describe")]
    for name in generated + (["topic-sentence"] if lang == "en" else []):
        task = get_task(name, split="train", size=SAMPLE)
        out |= {m["content"] for i in range(SAMPLE) for m in task[i]["messages"] if m["role"] == "user"}
    for name in (("chitchat", "chatterbot") if lang == "en" else ("chatterbot-ja",)):
        task = get_task(name)
        out |= {m["content"] for i in range(len(task)) for m in task[i]["messages"]
                if m["role"] == "user" and isinstance(m["content"], str)}
    return out


def _near_duplicates(heldout: dict, train: set[str], lang: str) -> tuple[float, str | None, str | None]:
    """The most similar (held-out, training) pair by Jaccard of n-grams, after asserting no held-out
    text equals a training text. `heldout` maps normalised texts to the item ids they come from."""
    by_gram: dict = {}  # n-gram -> training texts holding it (only those can have Jaccard > 0)
    train_grams = {}
    for t in train:
        train_grams[t] = grams(t, lang)
        for g in train_grams[t]:
            by_gram.setdefault(g, []).append(t)
    worst = (0.0, None, None)
    for p, ident in heldout.items():
        assert p not in train, f"{ident} {p!r} equals a training prompt after normalisation"
        g = grams(p, lang)
        for t in {t for x in g for t in by_gram.get(x, ())}:
            j = jaccard(g, train_grams[t])
            if j > worst[0]:
                worst = (j, p, t)
    return worst


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_heldout_prompts_are_disjoint_from_training_prompts(lang):
    train = {normalise(t) for t in training_prompts(lang)}
    worst = _near_duplicates({normalise(it["prompt"]): it["id"] for it in S.load_items(lang)}, train, lang)
    assert worst[0] < NEAR_DUP, f"near-duplicate (Jaccard {worst[0]:.2f}): {worst[1]!r} ~ {worst[2]!r}"


SLOT = "#"  # what every slot becomes on both sides of the phrasing-level comparison


def heldout_phrasing(item: dict, lang: str) -> str:
    """A held-out prompt with its slot values (the spelled or counted word, the letter; numbers are
    replaced by normalise) replaced by SLOT: the wording a training phrasing must not share."""
    text = item["prompt"]
    word = item.get("word") or (item["answer"] if item["skill"] == "spelling" else None)
    if word:
        text = text.replace(word, SLOT)
    if item.get("letter"):
        letter = item["letter"]
        text = re.sub(rf"(?<![a-z]){re.escape(letter)}(?![a-z])", SLOT, text) if lang == "en" else \
            text.replace(letter, SLOT)
    return normalise(text)


def training_phrasings(lang: str) -> set[str]:
    """Every phrasing of every paraphrase generator, slots filled with SLOT (a bare calculation's {x}
    with every wording of every operator), plus the identity task's other questions. (Word problems are
    compared item by item in the test above.)"""
    from chibichat.tasks import identity, paraphrase

    out = set()
    for skill in paraphrase.SKILLS:
        for p in paraphrase.phrasings(lang, skill):
            if skill == "arithmetic":
                out |= {p.format(x=e.format(a=SLOT, b=SLOT)) for op in "+-*/" for e in paraphrase.expressions(lang, op)}
            elif skill == "arithmetic-command":
                out |= {p.format(c=e.format(a=SLOT, b=SLOT)) for op in "+-*/" for e in paraphrase.commands(lang, op)}
            else:
                out.add(p.format(word=SLOT, letter=SLOT))
    topics = identity.EN_TOPICS if lang == "en" else identity.JA_TOPICS
    out |= {q for qs, _ in topics.values() for q in qs}
    if lang == "en":
        from chibichat.tasks.sentences import PHRASINGS

        out |= {p.format(topic=SLOT) for p in PHRASINGS}
    from chibichat.tasks import describe

    asks = describe.ASKS[lang]
    out |= {p.format(t=SLOT) for p in asks["sentence"] + asks["story"]}
    return {normalise(t) for t in out}


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_heldout_phrasing_differs_from_every_training_phrasing(lang):
    """Phrasing-level disjointness: with the slot values on both sides replaced by one marker, no
    held-out prompt is worded like any phrasing the paraphrase generators can produce (equal or
    near-equal), so the skills score measures the skill on new wordings, not recall of a template."""
    from chibichat.tasks import paraphrase

    train = training_phrasings(lang)
    assert len(train) >= 250  # many phrasings per skill, not one template each
    assert all(len(paraphrase.phrasings(lang, s)) >= 16 for s in paraphrase.SKILLS)
    heldout = {heldout_phrasing(it, lang): it["id"] for it in S.load_items(lang)}
    assert heldout_phrasing({"prompt": 'Count every o in "cocoa".', "skill": "letter-count", "word": "cocoa",
                             "letter": "o"}, "en") == "count every # in #"
    worst = _near_duplicates(heldout, train, lang)
    assert worst[0] < NEAR_DUP, f"near-duplicate phrasing (Jaccard {worst[0]:.2f}): {worst[1]!r} ~ {worst[2]!r}"


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_prompt_set_covers_every_skill_with_heldout_words(lang):
    from chibichat.tasks.base import key_split

    items = S.load_items(lang)
    scored = [it for it in items if it["skill"] != S.OPEN]
    assert len(scored) >= 100
    assert {it["skill"] for it in scored} == set(S.SKILLS)
    assert min(sum(it["skill"] == s for it in scored) for s in S.SKILLS) >= 10
    assert sum(it["skill"] == S.OPEN for it in items) == 8
    for it in items:
        if it["skill"] == "spelling":
            assert key_split(it["answer"]) == "test", it  # never spelled in training
            assert it["answer"] in it["prompt"]
        if it["skill"] == "letter-count":
            assert key_split(it["word"]) == "test", it  # never counted in training
            assert it["word"] in it["prompt"] and it["letter"] in it["prompt"]
            assert it["answer"] == str(it["word"].count(it["letter"])), it
    assert {it["answer"] for it in items if it["skill"] == "letter-count"} >= {"0", "1", "2"}


def test_load_items_refuses_bad_language_and_malformed_lines(tmp_path, monkeypatch):
    with pytest.raises(ChibiError, match="--lang must be one of"):
        S.load_items("fr")
    bad = tmp_path / "skills-en.jsonl"
    monkeypatch.setattr(S, "asset_file", lambda lang: bad)
    bad.write_text(json.dumps({"id": "a", "skill": "spelling", "prompt": "p", "check": "number", "answer": "x"}) + "\n")
    with pytest.raises(ChibiError, match="skill 'spelling' with check 'number'"):
        S.load_items("en")
    bad.write_text(json.dumps({"id": "a", "skill": "arithmetic", "prompt": "p", "check": "number"}) + "\n")
    with pytest.raises(ChibiError, match="needs a string 'answer'"):
        S.load_items("en")
    row = json.dumps({"id": "a", "skill": "greeting", "prompt": "hi", "check": "greeting"})
    bad.write_text(row + "\n" + row + "\n")
    with pytest.raises(ChibiError, match=r"skills-en.jsonl:2: duplicate id 'a'"):
        S.load_items("en")
    for topic in (None, [], [""]):
        bad.write_text(json.dumps({"id": "o", "skill": "open", "prompt": "p", "check": "open", "topic": topic}) + "\n")
        with pytest.raises(ChibiError, match=r"skills-en.jsonl:1: an open item needs 'topic', a non-empty list"):
            S.load_items("en")


TOOL = "<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>"


@pytest.mark.parametrize("reply,ok", [
    (f"We multiply. {TOOL}12 times 7 is 84.\n#### 84", True),
    ("It is 84.", True),                        # no '####': the last number of the prose
    ("84 is wrong, it is 85", False),
    (f"{TOOL}", False),                          # only the tool's output, no answer given
    ("#### 84.0", True),
    ("#### 48", False),
    ("I think #### 84 or maybe 85", True),       # the number after #### wins
    ("How many 84<|python_end|><|output_start|>84<|python_end|>", False),  # a broken tool call is no answer
    (f"{TOOL} so 84", True),                     # after a well-formed call, clean prose counts
    ("<|python_start|>12*7", False),             # an unfinished call
    ("#### maybe 84", False),                    # a '####' without a number is no answer, not the prose's 84
    ("It is 84.\n#### 84x", False),              # nor one whose number is not whole
    ("#### 84/2", False),
    ("The answer is 1/84.", False),              # without '####' too: a fraction is not its denominator
    ("答えは168分の84です。", False),             # nor in Japanese (84/168)
    ("It is 168-84.", False),                    # a sum not worked out is no answer, not its last part
    ("168-84=84", True),
])
def test_number_checker(reply, ok):
    assert S.check_reply({"check": "number", "answer": "84"}, reply, "en") is ok


@pytest.mark.parametrize("reply,ok", [
    ('I will count "o" in "cocoa" with Python.<|python_start|>"cocoa".count("o")<|python_end|><|output_start|>2'
     '<|output_end|>The letter "o" appears 2 times in "cocoa".\n#### 2', True),
    ('<|python_start|>" cocoa".strip().count("o")<|python_end|><|output_start|>2<|output_end|>#### 2', True),
    ('<|python_start|>" cocoa".count("o")<|python_end|><|output_start|>2<|output_end|>#### 2', True),
    ('<|python_start|>"cocoa".count("c")<|python_end|><|output_start|>2<|output_end|>#### 2', False),  # other letter
    ('<|python_start|>" cocoa tea".count("o")<|python_end|><|output_start|>2<|output_end|>#### 2', False),  # other word
    ('<|python_start|>"cocoa".count("o")<|python_end|><|output_start|>2<|output_end|>#### 3', False),
    ("There are 2.", True),                                                   # no tool: the number is the answer
])
def test_letter_count_checker_wants_the_asked_word_and_letter(reply, ok):
    item = {"check": "number", "answer": "2", "word": "cocoa", "letter": "o"}
    assert S.check_reply(item, reply, "en") is ok


def test_number_checker_wants_the_answer_the_tool_gave():
    item = {"check": "number", "answer": "71"}
    wrong_work = ("We subtract.<|python_start|>29-100<|python_end|><|output_start|>-71<|output_end|>"
                  "The answer is 71.\n#### 71")
    assert S.check_reply(item, wrong_work, "en") is False
    assert S.check_reply(item, wrong_work.replace("29-100", "100-29").replace(">-71<", ">71<"), "en") is True
    ja = {"check": "number", "answer": "1", "word": "スキル", "letter": "ス"}
    call = '<|python_start|>"{}".count("ス")<|python_end|><|output_start|>1<|output_end|>#### 1'
    assert S.check_reply(ja, call.format("スキル"), "ja") is True
    assert S.check_reply(ja, call.format("オフスル"), "ja") is False


@pytest.mark.parametrize("reply,ok", [
    ("b-a-c-o-n", True), ("bacon: b-a-c-o-n.", True), ("b a c o n", True), ("B-A-C-O-N", False),
    ("bacon", False), ("b-a-c-n", False), ("Here it is:\nb, a, c, o, n", True), ("ba-con", False),
    ("Bacon: b-a-c-o-n.", True), ('"BACON": b a c o n', True),  # the "word:" prefix in any case
])
def test_spelling_checker(reply, ok):
    assert S.check_reply({"check": "spelling", "answer": "bacon"}, reply, "en") is ok


def test_spelling_checker_japanese():
    item = {"check": "spelling", "answer": "キック"}
    assert S.check_reply(item, "キ-ッ-ク", "ja") is True
    assert S.check_reply(item, "キ・ッ・ク", "ja") is True
    assert S.check_reply(item, "キ-ク", "ja") is False


@pytest.mark.parametrize("reply,lang,ok", [
    ("I am chibichat, a small language model.", "en", True), ("My name is ChibiChat.", "en", True),
    ("I'm chibichat, a tiny chat model.", "en", True), ("Hi! Call me chibichat.", "en", True),
    ("chibichat is my name.", "en", True),
    ("I am a small AI assistant.", "en", False), ("chibi", "en", False),
    # the package it was made with is not its name (replies seen from quickstart models)
    ("I was made with the chibichat package. Whoever ran its training pipeline built me.", "en", False),
    ("I was trained on chibichat, an open-source package that builds a small language model", "en", False),
    ("私はchibichatです。", "ja", True), ("chibichatといいます。", "ja", True), ("chibichatです。", "ja", True),
    # "this is" / "it's" + the name: its name, unless the sentence presents it as the package
    ("It's chibichat.", "en", True), ("This is chibichat.", "en", True), ("It is chibichat, nice to meet you!", "en", True),
    ("This is chibichat, an open-source package that trains small models.", "en", False),
    ("It's chibichat that trained me.", "en", False), ("It is chibichat, which builds small language models.", "en", False),
    ("It's chibichat, the library. I am a small model.", "en", False),
    ("chibichatというオープンソースのパッケージで学習されました。", "ja", False),
    ("chibichatパッケージで作られました。", "ja", False),
])
def test_identity_checker(reply, lang, ok):
    assert S.check_reply({"check": "identity", "answer": "chibichat"}, reply, lang) is ok


@pytest.mark.parametrize("reply,lang,ok", [
    ("Hello! How can I help?", "en", True), ("Hi there.", "en", True), ("Good evening to you too!", "en", True),
    ("This is a nice thing.", "en", False), ("Which is the highest mountain?", "en", False),
    ("Hello! #### 5", "en", False),              # a greeting that then answers a sum is not answered in kind
    ("Shiny things are nice. " * 4 + "Hello", "en", False),  # the greeting must open the reply
    ("こんにちは！何かお手伝いしましょうか？", "ja", True), ("りんごは3個です。", "ja", False),
])
def test_greeting_checker(reply, lang, ok):
    assert S.check_reply({"check": "greeting"}, reply, lang) is ok


@pytest.mark.parametrize("reply,lang,ok", [
    ("I don't know what you ate: I cannot see your life.", "en", True),
    ("I’m sorry, I have no way to know that.", "en", True),
    ("You ate eggs and toast.", "en", False),
    ("I don't know, maybe 42.", "en", False),    # hedged, but still invents a number
    ("I don't know, maybe forty-two.", "en", False),  # a number in words is a number
    ("I don't know. Perhaps one hundred people.", "en", False),
    ("I don't know, maybe one.", "en", False),
    ("No one can know that, and I don't know which one you mean.", "en", True),  # "one" as a pronoun
    # a tool call is an attempt at the fact, even when the prose then says it does not know
    ("<|python_start|>2+2<|python_end|><|output_start|>4<|output_end|>I don't know.", "en", False),
    ("<|python_start|>2+2<|python_end|>I don't know.", "en", False),
    ("I don't know.\n#### 0", "en", False),
    ("わかりません。たぶん三時です。", "ja", False),
    ("わかりません。二十歳くらいかもしれません。", "ja", False),
    ("十分な情報がないので、わかりません。", "ja", True),  # 十分 "enough" states no number
    ("わかりません。私はあなたの生活を見られません。", "ja", True),
    ("あなたの妹の名前はさくらです。", "ja", False),
])
def test_refusal_checker(reply, lang, ok):
    assert S.check_reply({"check": "refusal"}, reply, lang) is ok


def test_open_items_have_no_checker():
    with pytest.raises(ChibiError, match="scored by reply_quality"):
        S.check_reply({"id": "x", "check": "open"}, "The sea is blue.", "en")


def test_reply_quality_on_hand_built_replies():
    sea = ["sea", "wave"]
    replies = [
        ("The sea is big and blue.", "stop", sea),                       # passes everything
        ("The sea is blue and the sea is blue and the sea", "length", sea),  # runs out of budget, loops
        ("Waves roll in.", "stop", sea),                                 # "waves": the topic word + s: passes
        (f"We add the waves. {TOOL}\n#### 84", "stop", sea),              # a calculator answer to an open prompt
        ("I am a small program that predicts text.", "stop", sea),       # a canned reply: off topic
    ]
    q = S.reply_quality(replies, "en")
    assert q["n"] == 5
    assert q["ended_share"] == 0.8
    assert q["repeat_free"] == 0.8
    assert q["tool_free"] == 0.8
    assert q["on_topic"] == 0.8
    assert q["score"] == 0.4
    # distinct-2 per reply: 5 of 5; 5 of 11 (the loop); 2 of 2; tool segments are dropped, leaving
    # "we add the waves 84": 4 of 4; 6 of 6
    assert q["distinct_2"] == pytest.approx((1.0 + 5 / 11 + 1.0 + 1.0 + 1.0) / 5)
    assert S.reply_quality([("", "stop", sea)], "en")["ended_share"] == 0.0  # an empty reply did not answer
    ja = S.reply_quality([("海は広くて青い。", "stop", ["海"]), ("ああああああ", "stop", ["海"]),
                          ("私は小さなプログラムです。", "stop", ["海"])], "ja")
    assert ja["repeat_free"] == pytest.approx(2 / 3) and ja["on_topic"] == pytest.approx(1 / 3)
    assert ja["score"] == pytest.approx(1 / 3)
    with pytest.raises(ChibiError, match="at least one reply"):
        S.reply_quality([], "en")


@pytest.mark.parametrize("reply, ok", [("It is raining.", True), ("Rainy days.", True), ("The cats sleep.", True),
                                       ("Catch it!", False), ("Hello!", False), ("The seas are wide.", True)])
def test_on_topic_takes_short_endings_not_other_words(reply, ok):
    assert S.on_topic(reply, ["rain", "cat", "sea"], "en") is ok


def test_every_open_prompt_has_topic_words():
    for lang in S.LANGS:
        items = [i for i in S.load_items(lang) if i["skill"] == "open"]
        assert len(items) == 8 and all(i["topic"] for i in items)


class CharTok:
    """Code points for text, 1000+k for special k (enough for render_for_completion)."""

    def __init__(self):
        self.bos_id = 1000

    def special_id(self, name):
        return 1000 + SPECIAL_TOKENS.index(name)

    def encode(self, text):
        return [ord(c) for c in text]


class ScriptedGen:
    """Replies by prompt text; records the budget it was given."""

    def __init__(self, by_prompt):
        self.by_prompt, self.calls = by_prompt, []

    def replies(self, prompts, max_tokens):
        self.calls.append((len(prompts), max_tokens))
        out = []
        for ids in prompts:
            text = "".join(chr(i) for i in ids if i < 1000)
            out.append(next(v for k, v in self.by_prompt.items() if k in text))
        return out


def test_evaluate_skills_scores_per_skill_and_skips_long_prompts():
    items = [
        {"id": "1", "skill": "identity", "prompt": "Your name?", "check": "identity", "answer": "chibichat"},
        {"id": "2", "skill": "identity", "prompt": "Who speaks?", "check": "identity", "answer": "chibichat"},
        {"id": "3", "skill": "arithmetic", "prompt": "6 times 7", "check": "number", "answer": "42"},
        {"id": "4", "skill": "greeting", "prompt": "Howdy", "check": "greeting"},
        {"id": "5", "skill": "refusal", "prompt": "x" * 200, "check": "refusal"},   # too long for the context
        {"id": "6", "skill": "open", "prompt": "Sea sentence", "check": "open", "topic": ["sea"]},
    ]
    gen = ScriptedGen({"Your name?": ("I am chibichat.", "stop"), "Who speaks?": ("A model.", "stop"),
                       "6 times 7": ("#### 42", "stop"), "Howdy": ("Hello!", "stop"),
                       "Sea sentence": ("The sea is calm.", "stop")})
    out = ES.evaluate_skills(items, "en", gen, CharTok(), max_len=100, max_tokens=20)
    assert gen.calls == [(5, 20)]
    assert out["skills"] == {"identity": {"accuracy": 0.5, "n": 2}, "arithmetic": {"accuracy": 1.0, "n": 1},
                             "greeting": {"accuracy": 1.0, "n": 1}}
    s = out["summary"]
    assert s["skills"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert s["skills_identity"] == 0.5 and s["skills_n"] == 4 and s["skills_skipped_too_long"] == 1
    assert "skills_refusal" not in s  # nothing scored: absent, not 0
    assert s["skills_open_score"] == 1.0 and s["skills_open_ended_share"] == 1.0 and s["skills_open_on_topic"] == 1.0
    assert [r["status"] for r in out["rows"]][4] == "skipped_too_long"
    ja = ES.evaluate_skills(items[:1], "ja", ScriptedGen({"Your name?": ("chibichatです。", "stop")}), CharTok(), 100, 20)
    assert ja["summary"] == {"skills_ja": 1.0, "skills_ja_n": 1, "skills_ja_skipped_too_long": 0,
                             "skills_ja_identity": 1.0}
    with pytest.raises(ChibiError, match="--max-new-tokens 99 leaves no room"):
        ES.evaluate_skills(items, "en", gen, CharTok(), max_len=100, max_tokens=99)


def test_the_casual_prompt_set_is_the_same_items_typed_as_people_type():
    """`eval skills --casual`: every English prompt without its capital and closing mark (Japanese: without its
    closing mark), figures and files under skills_casual / skills_ja_casual, not the speedrun's skills.jsonl."""
    items, prefix = ES.prompt_set("en", None, False)
    typed, casual_prefix = ES.prompt_set("en", None, True)
    assert (prefix, casual_prefix) == ("skills", "skills_casual")
    assert [{k: v for k, v in t.items() if k != "prompt"} for t in typed] == \
           [{k: v for k, v in t.items() if k != "prompt"} for t in items]
    assert "what is 12 times 7" in [t["prompt"] for t in typed]
    assert typed[items.index(next(t for t in items if t["prompt"] == "Please say your name."))]["prompt"] == \
           "please say your name"
    assert all(t["prompt"][-1] not in "?." and not t["prompt"][0].isupper() or t["prompt"].startswith("I ")
               for t in typed)
    assert len(ES.prompt_set("en", 2, True)[0]) == 2 * 8  # seven skills and the open prompts, two each
    ja, ja_prefix = ES.prompt_set("ja", None, True)
    assert ja_prefix == "skills_ja_casual" and [t["prompt"] for t in ja] == \
           [t["prompt"].rstrip("？。") if t["prompt"][-1:] in "？。" else t["prompt"]
            for t in ES.prompt_set("ja", None, False)[0]]
    assert sum(t["prompt"][-1] in "？。" for t in ja) == 0
    gen = ScriptedGen({"your name": ("I am chibichat.", "stop")})
    out = ES.evaluate_skills([{"id": "1", "skill": "identity", "prompt": "your name", "check": "identity",
                               "answer": "chibichat"}], "en", gen, CharTok(), 100, 20, prefix="skills_casual")
    assert out["summary"] == {"skills_casual": 1.0, "skills_casual_n": 1, "skills_casual_skipped_too_long": 0,
                              "skills_casual_identity": 1.0}


def test_the_skills_marker_is_written_only_after_its_csv(tmp_path, monkeypatch):
    """skills.jsonl is the speedrun's completion marker of an `eval skills` step: a kill after the first of the
    per-item files is written leaves the csv without the marker (the step is redone), never the marker alone."""
    from chibichat import common
    from chibichat.eval.metrics import write_eval_outputs

    rows = [{"id": "1", "skill": "greeting", "reply": "Hi", "correct": True}]
    real, written = common.atomic_write_text, []

    def killed_after_one(path, text):
        if written:
            raise KeyboardInterrupt  # the kill, between the two files
        real(path, text)
        written.append(path.name)

    monkeypatch.setattr(common, "atomic_write_text", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        write_eval_outputs(tmp_path, "skills", rows, None)
    assert written == ["skills.csv"] and sorted(p.name for p in tmp_path.iterdir()) == ["skills.csv"]
    monkeypatch.setattr(common, "atomic_write_text", real)
    write_eval_outputs(tmp_path, "skills", rows, None)
    assert (tmp_path / "skills.csv").read_text() == "id,skill,reply,correct\n1,greeting,Hi,True\n"
    assert json.loads((tmp_path / "skills.jsonl").read_text()) == rows[0]


def test_report_shows_skills_per_chat_stage():
    from chibichat.stages.report import StageArtifacts, skills_table

    def stage(name, evals):
        return StageArtifacts(name, "d2", {"steps": 3}, [], evals)

    stages = [stage("base", {"val_bpb": 1.5}), stage("mid", {"skills": 0.25, "skills_spelling": 0.125}),
              stage("sft", {"skills": 0.5, "skills_spelling": 0.25, "skills_open_score": 0.125}), stage("rl", None)]
    lines = skills_table(stages).splitlines()
    assert lines[0] == "## Held-out skills"
    assert "| Held-out skills (EN) | MID | SFT | RL |" in lines
    assert "| spelling | 0.1250 | 0.2500 | - |" in lines
    assert "| all skills (mean) | 0.2500 | 0.5000 | - |" in lines
    assert "| open prompts: proxy score | - | 0.1250 | - |" in lines
    assert not any("(JA)" in l for l in lines)
    assert skills_table([stage("sft", {"chatcore": 0.1})]) is None


def test_first_per_skill_keeps_file_order():
    items = [{"skill": s, "id": str(i)} for i, s in enumerate(["a", "b", "a", "a", "open", "b", "open"])]
    assert [it["id"] for it in ES.first_per_skill(items, 1)] == ["0", "1", "4"]
    assert [it["id"] for it in ES.first_per_skill(items, 2)] == ["0", "1", "2", "4", "5", "6"]
    assert ES.first_per_skill(items, None) == items
    with pytest.raises(ChibiError, match="--max-per-skill must be >= 1, got 0"):
        ES.first_per_skill(items, 0)


def test_simple_text_bpb_counts_bytes_and_skips_long_lines():
    import math

    import torch

    from chibichat.common import Runtime

    class ByteTok:
        bos_id = 256

        def encode(self, text):
            return list(text.encode("utf-8"))

        def token_bytes(self):
            return torch.tensor([1] * 256 + [0])

    def model(x, y, reduction="none"):  # one bit per predicted token
        assert reduction == "none"
        return torch.where(y >= 0, torch.tensor(math.log(2), dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))

    rt = Runtime(device=torch.device("cpu"), compute_dtype=torch.float32, rank=0, local_rank=0, world_size=1)
    r = ES.simple_text_bpb(model, ByteTok(), rt, ["The sea.", "x" * 40, "Hi"], max_len=20)
    assert r == {"bpb": 1.0, "bytes": 10, "n": 2, "skipped_too_long": 1}
    assert ES.simple_text_bpb(model, ByteTok(), rt, ["x" * 40], max_len=20)["bpb"] is None
    assert len(ES.load_simple_text("en")) == 30 and len(ES.load_simple_text("ja")) == 30


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_every_taught_name_answer_passes_the_identity_checker(lang):
    """The hand-off from the identity task to the checker: every answer it teaches to "what is your name?"
    (shipped, and a persona's templates) gives the name as the assistant's own; no other topic's answer does."""
    from chibichat.tasks import identity

    topics = identity.EN_TOPICS if lang == "en" else identity.JA_TOPICS
    persona = identity.EN_PERSONA if lang == "en" else identity.JA_PERSONA
    for answer in topics["name"][1]:
        assert S.names_itself(answer, "chibichat", lang), answer
    for template in persona["name"]:
        assert S.names_itself(template.format(name="Kiku"), "Kiku", lang), template
    for topic, (_, answers) in topics.items():
        if topic != "name":
            assert not any(S.names_itself(a, "chibichat", lang) for a in answers), topic


def test_engine_replies_are_the_engines_greedy_replies(byte_engine):
    """eval skills decodes through eval chat's continuous batcher (a second thread, so decoding beside other
    work on the cores does not crawl): each reply is Engine.generate's greedy reply to that prompt alone,
    its finish reason included, whatever the batch size."""
    from chibichat.eval.skills import EngineReplies

    engine, prompts = byte_engine
    alone = [engine.generate([p], num_samples=1, max_tokens=10, temperature=0.0, seed=0, tools=True)[0][0]
             for p in prompts]
    want = [(s.text, s.finish_reason) for s in alone]
    assert {r for _, r in want} <= {"stop", "length"}
    assert EngineReplies(engine, 2).replies(prompts, 10) == want == EngineReplies(engine, 8).replies(prompts, 10)
    with pytest.raises(ChibiError, match="--eval-batch-size must be >= 1, got 0"):
        EngineReplies(engine, 0)
