import random
import re

from chibichat.tasks import word_problems as W
from chibichat.tasks.arithmetic import int_value

WORDS = {w: i for i, w in enumerate(W._NUMBER_WORDS)}


def _numbers_in(question: str) -> list[int]:
    """The numbers a question states, digits or words, in order."""
    return [int(t) if t.isdigit() else WORDS[t.lower()]
            for t in re.findall(r"\d+|[A-Za-z]+", question) if t.isdigit() or t.lower() in WORDS and t.lower() != "one"]


def _draw(make, n=3000, seed=0):
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]


def test_expression_uses_exactly_the_story_numbers():
    # Every number of the expression is stated in the question (digits, or a word for 2..12), and the
    # question states no other number ("one" as in "one piece" is not a number of the problem): a
    # distractor the model never learned to skip would teach it to copy numbers at random.
    for p in _draw(W.one_step) + _draw(W.two_step):
        stated = _numbers_in(p.question)
        assert sorted(int(x) for x in re.findall(r"\d+", p.expr)) == sorted(stated), p
        assert int_value(p.expr) >= 0
    # sums and products keep the story's order (the model copies left to right)
    for p in _draw(W.one_step, 1000):
        if "+" in p.expr:
            assert [int(x) for x in p.expr.split("+")] == _numbers_in(p.question), p


def test_plans_name_the_operations_in_the_order_the_calculator_applies_them():
    assert W.plan("45+23") == "We add the numbers together."
    assert W.plan("90/9") == "We divide the total into equal parts."
    assert W.plan("50-3*16") == "First we multiply, then we subtract."
    assert W.plan("123-83+78") == "First we subtract, then we add."
    assert W.plan("3*7+3*3") == "We multiply for each group, then add."
    assert W.plan("2*9*3") == "We multiply all three numbers."
    assert W.plan("57+46+38") == "We add all three numbers."
    assert W.plan("300-20-30") == "We subtract both parts from the start."
    for p in _draw(W.one_step, 500) + _draw(W.two_step, 500):
        assert p.plan == W.plan(p.expr)
        assert not re.search(r"\d", p.plan)  # the plan never restates the story


def test_each_operation_comes_in_many_wordings():
    # A skeleton is the question with numbers, names and nouns blanked: what the model must learn to read.
    names = {n for n, _ in W._PEOPLE} | {"I", "We", "we"}
    nouns = {w for t in W._THINGS for w in t} | {w for t in W._ITEMS for w in t} | {m[0] for m in W._MOVERS}

    def skeleton(q):
        q = re.sub(r"\d+", "#", q)
        for w in sorted(names | nouns, key=len, reverse=True):
            q = re.sub(rf"\b{re.escape(w)}\b", "_", q)
        return q.split(".")[0]

    by_op: dict[str, set] = {}
    for p in _draw(W.one_step, 4000):
        by_op.setdefault(next(c for c in p.expr if c in "+-*/"), set()).add(skeleton(p.question))
    assert {op: len(s) >= 12 for op, s in by_op.items()} == dict.fromkeys("+-*/", True), \
        {op: len(s) for op, s in by_op.items()}
    two = {re.sub(r"\d+", "#", p.expr) for p in _draw(W.two_step, 2000)}
    assert {"#*#+#", "#*#-#", "#-#*#", "#+#-#", "#-#+#", "#*#+#*#", "#*#*#", "#+#+#"} <= two


def test_grammar_agrees_with_the_subject():
    for p in _draw(W.one_step, 3000, seed=1) + _draw(W.two_step, 3000, seed=1):
        q = p.question
        assert not re.search(r"\b(I|we|We) (has|does|gets|sells|buys|packs|shares|reads|saves|puts)\b", q), q
        assert not re.search(r"\b(does|do|did) (I|we) have\b", q) or re.search(r"\bdo (I|we) have\b", q), q
        assert not re.search(r"\ba [aeiou]", q), q
        assert (q[0].isupper() or q[0].isdigit()) and q.endswith("?") and "  " not in q
