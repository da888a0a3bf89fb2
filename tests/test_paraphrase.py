import random
import re

import pytest

from chibichat.common import ChibiError
from chibichat.tasks import paraphrase as P
from chibichat.tasks import skills as S
from chibichat.tasks.registry import get_task

SLOTS = {"spelling": {"word": "apple"}, "letter-count": {"word": "apple", "letter": "p"}, "arithmetic": {"x": "2 plus 3"},
         "arithmetic-command": {"c": "add 3 to 2"}}


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_every_phrasing_fills_its_slots(lang):
    for skill in P.SKILLS:
        texts = P.phrasings(lang, skill)
        assert len(texts) == len(set(texts)) >= 16, skill
        for t in texts:
            filled = t.format(**SLOTS.get(skill, {}))
            assert "{" not in filled and "}" not in filled, t
            if skill in SLOTS:
                assert all(v in filled for v in SLOTS[skill].values()), t
            if lang == "en":
                assert filled[0].isupper() or filled[0] in "\"'0123456789" or t.startswith("{"), t
            # An English prompt opening with the word would capitalise it ("Bliss has ...") while the reply
            # copies the word as it is ("bliss"): a small model cannot map one token to the other.
            assert not (lang == "en" and skill in ("spelling", "letter-count") and t.startswith("{word}")), t
    # a phrasing that opens with its slot is capitalised once filled (lower case only as typed casually)
    rng = random.Random(0)
    for skill, slots, text in [("arithmetic", {"x": "the sum of 2 and 3"}, "The sum of 2 and 3 equals what?"),
                               ("arithmetic-command", {"c": "subtract 17 from 60"},
                                "Subtract 17 from 60 and tell me the result.")]:
        filled = {t.format(**slots)[:1].upper() + t.format(**slots)[1:] for t in P.phrasings("en", skill)}
        drawn = {P.phrase(rng, "en", skill, **slots) for _ in range(2000)}
        assert text in filled and text in drawn and all(t[0].isupper() for t in filled)
        assert drawn - filled and drawn - filled <= {P.casual_form(t) for t in filled}


def test_some_prompts_are_typed_casually(monkeypatch):
    """CASUAL_SHARE of the prompts (every skill's phrasings, the identity questions and greetings, the word
    problems) come as typed into a chat box: English lower-cased without its closing mark, Japanese without
    its closing mark. A model trained on proper prompts alone answered "what is 12 times 7" with noise, and
    a Japanese one refused nothing once the "？" was gone (docs/benchmarks.md, 2026-12-07, session 40)."""
    assert P.casual_form("What is 12 times 7?") == "what is 12 times 7"
    assert P.casual_form('Spell "apple".') == 'spell "apple"'
    assert P.casual_form("I have 3 apples. How many?") == "I have 3 apples. How many"
    assert P.casual_form("Hello!") == "hello!"
    assert P.casual_form("いま何時ですか？", "ja") == "いま何時ですか"
    assert P.casual_form("「りんご」を一文字ずつ書いて。", "ja") == "「りんご」を一文字ずつ書いて"
    assert P.casual_form("こんにちは！", "ja") == "こんにちは！"

    def users(name):
        t = get_task(name, size=600)
        return [m["content"] for i in range(len(t)) for m in t[i]["messages"] if m["role"] == "user"]

    def typed(texts):
        return [u for u in texts if u[0].islower() and u[-1] not in "?."]

    def unmarked(texts):
        return [u for u in texts if u[-1] not in "？。?"]

    for name in ("arithmetic", "arithmetic-multi", "spelling", "letter-count", "identity"):
        texts = users(name)
        assert 0.08 < len(typed(texts)) / len(texts) < 0.25, name
    for name in ("arithmetic-ja", "spelling-ja", "letter-count-ja", "identity-ja"):
        monkeypatch.setattr(P, "CASUAL_SHARE", 0.0)
        proper = users(name)  # some phrasings end without a mark already ("...を当てて")
        monkeypatch.setattr(P, "CASUAL_SHARE", 0.15)
        texts = users(name)
        assert 0.06 < len(unmarked(texts)) / len(texts) - len(unmarked(proper)) / len(proper) < 0.25, name
    monkeypatch.setattr(P, "CASUAL_SHARE", 0.0)
    assert not typed(users("arithmetic")) and not typed(users("identity"))


def test_unknown_skill_or_operator_is_a_clear_error():
    with pytest.raises(ChibiError, match=r"no paraphrases for skill 'poetry' in language 'en'; skills: \("):
        P.phrasings("en", "poetry")
    with pytest.raises(ChibiError, match="no wording for operator '%' in language 'ja'"):
        P.expressions("ja", "%")
    with pytest.raises(ChibiError, match=r"no command wording for operator '\^' in language 'de'; operators: \+ - \* /"):
        P.commands("de", "^")


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_trained_replies_pass_the_heldout_checkers(lang):
    """What the generators teach for greetings and unknowable questions is what `eval skills` accepts."""
    assert all(S.is_refusal(a, lang) for a in P.REFUSAL_ANSWERS[lang])
    assert all(S.is_greeting(r, lang) for r in P.GREETING_REPLIES[lang])


@pytest.mark.parametrize("name,slot", [("spelling", "word"), ("spelling-ja", "word"), ("letter-count", "word"),
                                       ("letter-count-ja", "word")])
def test_generated_tasks_use_many_phrasings(name, slot):
    t = get_task(name, size=400, seed=3)
    wordings = set()
    for i in range(len(t)):
        it = t[i]
        text = it["messages"][0]["content"].replace(it[slot], "#")
        if "letter" in it:
            text = re.sub(rf"(?<![a-z]){re.escape(it['letter'])}(?![a-z])", "@", text)
        wordings.add(text)
    assert len(wordings) >= 15, sorted(wordings)


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_bare_calculations_share_key_and_format(lang):
    from chibichat.tasks.arithmetic import BARE_SHARE, canonical

    name = "arithmetic" if lang == "en" else "arithmetic-ja"
    t = get_task(name, size=600, seed=4)
    items = [t[i] for i in range(len(t))]
    assert all(it["key"] == canonical(it["expr"]) for it in items)
    bare = [it for it in items if it["form"] == "bare"]
    assert abs(len(bare) / len(t) - BARE_SHARE) < 0.06
    assert {b["expr"].strip("0123456789")[0] for b in bare} == set("+-*/")
    for b in bare[:50]:
        final = b["messages"][1]["content"][3]["text"]
        assert final.endswith(f"#### {b['answer']}") and b["answer"] in final.split("\n")[0]
    # keyed by the canonical expression: a test calculation never trains, however it is worded (bare or a
    # story) and in whichever order it gives the numbers
    test = get_task(name, split="test", size=200, seed=4)
    test_exprs = {canonical(test[i]["expr"]) for i in range(len(test))}
    assert test_exprs and not test_exprs & {canonical(it["expr"]) for it in items}
    assert all(get_task(n, size=100)[i]["form"] == "story"
               for n in (("arithmetic-multi", "arithmetic-multi-ja")) for i in range(3))


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_name_phrasings_include_the_identity_topic_questions(lang):
    from chibichat.tasks import identity

    topics = identity.EN_TOPICS if lang == "en" else identity.JA_TOPICS
    assert set(topics["name"][0]) <= set(P.phrasings(lang, "identity"))


def test_division_and_product_wordings_read_right():
    # "12 shared equally by 3" is not English; JA plan for a product names both factors without an order,
    # since the expression gives them in the story's order (4*60 as well as 60*4)
    from chibichat.tasks import word_problems

    assert "{a} shared equally among {b}" in P.expressions("en", "/")
    assert not any(" by {b}" in w and "shared" in w for w in P.expressions("en", "/"))
    assert word_problems.plan_ja("4*60") == word_problems.plan_ja("60*4") == "1つ分の数といくつ分をかけます。"


def test_english_questions_and_requests_end_as_they_should():
    # "Can you type clear one letter at a time!" is a question and "Please guess my favourite colour?" a request
    openers = ("hey,", "so,", "ok,", "now", "sorry,", "hi,", "hello,", "tell", "me,", "quick", "question:", "be",
               "honest,", "guess:", "excuse", "me,", "by", "the", "way,", "just", "wondering,", "you", "must", "know",
               "this:", "sum:")
    for skill in P.SKILLS:
        for p in P.phrasings("en", skill):
            words = p.lower().split()
            first = next((w for w in words if w not in openers), "")
            if first in ("can", "could", "would", "does", "is", "are", "will"):  # not "do": "Do the math: ...".
                assert p.endswith("?"), p
            if first == "please":
                assert not p.endswith("?"), p


@pytest.mark.parametrize("skill", ["spelling", "letter-count"])
def test_the_word_is_followed_by_many_different_words(skill):
    # The reply's call must hold the asked word alone: with few words ever after it ("have", "include") a model
    # copied " bliss contain" from "How many s letters does bliss contain?" (docs/benchmarks.md, session 39).
    after = {m[1] for p in P.phrasings("en", skill) for m in [re.search(r'\{word\}"? ([a-z]+)', p)] if m}
    assert len(after) >= 10, sorted(after)
