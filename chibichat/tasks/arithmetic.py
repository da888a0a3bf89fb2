"""Generated arithmetic word problems (EN and JA) whose answers call the calculator tool.

Item (kind "generative"):
    messages: user question; assistant parts
        text   one sentence saying what to compute (EN: the plan, operations only: "First we multiply,
               then we add.")
        python the expression, e.g. "12*7+3"          (the calculator call)
        python_output what chibichat.tools.calculate returns for it, e.g. "87"
        text   the answer in a sentence, then "\n#### 87"
    answer: "87"   (the number evaluate() compares with the one after "####" in a completion)
    expr:   "12*7+3"
    form:   "bare" (a calculation asked in words) or "story" (a word problem)

Every problem uses +, -, * and exact / on small non-negative integers and never produces a negative
or fractional result, so the problems stay short and regular enough for a tiny model to learn the pattern
"read numbers -> write expression -> copy tool output -> #### answer".

About BARE_SHARE of the one-step items are bare calculations ("Calculate 12 x 7.", "12かける7の答えを
教えてください。") in the phrasings of tasks/paraphrase.py. English stories are composed from parts by
tasks/word_problems.py, so each operation comes in many wordings; Japanese stories keep one canonical
question per kind, and `paraphrase.vary_question` rewords its closing question and sometimes adds an
opener. Every item is keyed by its expression: however it is worded, a test problem never trains.

arithmetic-multi(-ja) uses the same item format with two-step problems (three or four numbers, some of
three digits, one calculator call such as "4*12+3*15"): the RL stage's default task, because SFT on the
one-step problems nearly saturates those but leaves the longer expressions only partly right.
"""

from __future__ import annotations

import random
import re

from chibichat.eval.metrics import extract_final_number, numbers_equal
from chibichat.tasks.base import GeneratedTask
from chibichat.tasks import word_problems
from chibichat.tasks.paraphrase import vary_question

JA_NAMES = ["たろう", "はなこ", "けんた", "さくら", "ゆうき", "あおい", "そうた", "みお", "れん", "ひなた"]
# (thing, counter, container)
JA_THINGS = [("りんご", "個", "かご"), ("えんぴつ", "本", "箱"), ("シール", "枚", "シート"), ("ビー玉", "個", "袋"),
             ("本", "冊", "たな"), ("クッキー", "枚", "びん"), ("切手", "枚", "アルバム"), ("カード", "枚", "パック"),
             ("貝がら", "個", "バケツ"), ("たまご", "個", "パック"), ("クレヨン", "本", "箱")]


def _ja(rng: random.Random) -> tuple[str, str, str, str]:
    """(question, reasoning sentence, expression, answer sentence template with {r})."""
    name = rng.choice(JA_NAMES)
    thing, unit, group = rng.choice(JA_THINGS)
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return (f"{name}さんは{thing}を{a}{unit}持っています。{b}{unit}もらいました。{thing}は全部で何{unit}ですか？",
                "もらった分を足します。", f"{a}+{b}", f"{thing}は全部で{{r}}{unit}です。")
    if kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a)
        return (f"{name}さんは{thing}を{a}{unit}持っていて、{b}{unit}あげました。残りは何{unit}ですか？",
                "あげた分を引きます。", f"{a}-{b}", f"残りは{{r}}{unit}です。")
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"1つの{group}に{thing}が{a}{unit}入っています。{b}つの{group}には何{unit}入っていますか？",
                f"1つの{group}の数に{group}の数をかけます。", f"{a}*{b}", f"{b}つの{group}には{{r}}{unit}入っています。")
    if kind == 3:
        a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
        return (f"{thing}が{b}{unit}ずつ入った{group}が{a}つと、ばらの{thing}が{c}{unit}あります。全部で何{unit}ですか？",
                "かけ算で{group}の中の数を求め、ばらの分を足します。".replace("{group}", group), f"{a}*{b}+{c}",
                f"全部で{{r}}{unit}です。")
    if kind == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        c = rng.randint(1, a * b)
        return (f"{name}さんは{thing}が{b}{unit}ずつ入った{group}を{a}つ持っていて、{c}{unit}使いました。残りは何{unit}ですか？",
                "全部の数を求めてから、使った分を引きます。", f"{a}*{b}-{c}", f"残りは{{r}}{unit}です。")
    if kind == 6:
        each, k = rng.randint(2, 12), rng.randint(2, 9)
        return (f"{thing}{each * k}{unit}を{k}人で同じ数ずつ分けます。1人何{unit}になりますか？",
                "全部の数を人数でわります。", f"{each * k}/{k}", f"1人{{r}}{unit}です。")
    if kind == 7:
        per, k = rng.randint(2, 12), rng.randint(2, 9)
        return (f"{thing}{per * k}{unit}を1つの{group}に{per}{unit}ずつ入れます。{group}はいくつ必要ですか？",
                f"全部の数を1つの{group}に入る数でわります。", f"{per * k}/{per}", f"{group}は{{r}}つ必要です。")
    price, n = rng.randint(20, 150) * 10, rng.randint(2, 6)
    paid = rng.choice([p for p in (1000, 5000, 10000) if p >= price * n] or [10000])
    return (f"{thing}1つは{price}円です。{name}さんは{n}つ買って{paid}円はらいました。おつりはいくらですか？",
            "はらったお金から代金を引きます。", f"{paid}-{price}*{n}", "おつりは{r}円です。")


def _ja_multi(rng: random.Random) -> tuple[str, str, str, str]:
    name, other = rng.sample(JA_NAMES, 2)
    thing, unit, group = rng.choice(JA_THINGS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b, c = rng.randint(100, 900), rng.randint(10, 99), rng.randint(10, 99)
        return (f"{name}さんは{thing}を{a}{unit}持っています。{other}さんから{b}{unit}もらい、さらに{c}{unit}見つけました。"
                f"{thing}は全部で何{unit}ですか？", "もらった分と見つけた分を足します。", f"{a}+{b}+{c}",
                f"{thing}は全部で{{r}}{unit}です。")
    if kind == 1:
        a, b, c, d = rng.randint(2, 9), rng.randint(10, 30), rng.randint(2, 9), rng.randint(10, 30)
        return (f"{thing}が{b}{unit}入った{group}が{a}つと、{d}{unit}入った{group}が{c}つあります。全部で何{unit}ですか？",
                "それぞれかけ算をしてから足します。", f"{a}*{b}+{c}*{d}", f"全部で{{r}}{unit}です。")
    if kind == 2:
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 12)
        return (f"部屋が{a}つあり、1つの部屋に{group}が{b}つ、1つの{group}に{thing}が{c}{unit}あります。"
                f"{thing}は全部で何{unit}ですか？", "3つの数をかけます。", f"{a}*{b}*{c}", f"全部で{{r}}{unit}です。")
    if kind == 3:
        a = rng.randint(200, 999)
        b, c = rng.randint(10, a // 3), rng.randint(10, a // 3)
        return (f"{name}さんは{thing}を{a}{unit}持っていて、{other}さんに{b}{unit}あげ、{c}{unit}売りました。"
                f"残りは何{unit}ですか？", "あげた分と売った分を引きます。", f"{a}-{b}-{c}", f"残りは{{r}}{unit}です。")
    a, b = rng.randint(2, 9), rng.randint(10, 40)
    c, d = rng.randint(1, 50), rng.randint(1, a * b)
    return (f"{name}さんは{thing}が{b}{unit}ずつ入った{group}を{a}つ持っていて、{c}{unit}もらい、{d}{unit}使いました。"
            f"残りは何{unit}ですか？", "全部の数を求め、もらった分を足して使った分を引きます。", f"{a}*{b}+{c}-{d}",
            f"残りは{{r}}{unit}です。")


BARE_SHARE = 0.3  # of the one-step items: a bare calculation ("Calculate 12 x 7.") instead of a story
_OP_WORDS = {"en": {"+": "plus", "-": "minus", "*": "times", "/": "divided by"},
             "ja": {"+": "たす", "-": "ひく", "*": "かける", "/": "わる"}}


def _bare(rng: random.Random, lang: str) -> tuple[str, str, str, str]:
    """A bare calculation in one of many phrasings (tasks/paraphrase.py); same 4-tuple as `_en`."""
    from chibichat.tasks.paraphrase import expression, phrase

    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(2, 500), rng.randint(2, 500)
    elif op == "-":
        a = rng.randint(10, 500)
        b = rng.randint(1, a)
    elif op == "*":
        a, b = rng.randint(2, 30), rng.randint(2, 20)
    else:
        b = rng.randint(2, 12)
        a = b * rng.randint(2, 40)
    question = phrase(rng, lang, "arithmetic", x=expression(rng, lang, op, a, b))
    said = f"{a} {_OP_WORDS['en'][op]} {b}" if lang == "en" else f"{a}{_OP_WORDS['ja'][op]}{b}"
    if lang == "en":
        return question, "I will compute it with the calculator.", f"{a}{op}{b}", f"{said} is {{r}}."
    return question, "電卓で計算します。", f"{a}{op}{b}", f"{said}は{{r}}です。"


def int_value(expr: str) -> int:
    """Value of a template expression: non-negative integers joined by +, -, * and exact /, with the
    usual precedence.

    Computed here, independently of chibichat.tools.calculate, so that the test comparing every
    generated tool output with the real calculator is a genuine cross-check.
    """
    total = 0
    for sign, term in re.findall(r"([+-]?)([0-9*/]+)", expr):
        tokens = re.findall(r"[*/]|\d+", term)
        value = int(tokens[0])
        for op, num in zip(tokens[1::2], tokens[2::2]):
            if op == "*":
                value *= int(num)
            else:
                if value % int(num):
                    raise ValueError(f"{expr}: templates must divide exactly")
                value //= int(num)
        total += -value if sign == "-" else value
    return total


class Arithmetic(GeneratedTask):
    kind = "generative"
    default_size = {"train": 2000, "test": 200}

    def __init__(self, lang: str = "en", split: str = "train", size: int | None = None, seed: int = 0,
                 multi: bool = False):
        self.lang, self.multi = lang, multi
        self.name = ("arithmetic" if lang == "en" else "arithmetic-ja") if not multi else \
            ("arithmetic-multi" if lang == "en" else "arithmetic-multi-ja")
        self.description = ("generated two-step arithmetic word problems (3-4 numbers) answered with one calculator "
                            "call and '#### n'" if multi else
                            "generated arithmetic word problems answered with a calculator call and '#### n'")
        super().__init__(split, size, seed)

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        bare = not self.multi and rng.random() < BARE_SHARE
        if bare:
            question, reasoning, expr, final = _bare(rng, self.lang)
        elif self.lang == "en":
            problem = (word_problems.two_step if self.multi else word_problems.one_step)(rng)
            question, reasoning, expr, final = problem.question, problem.plan, problem.expr, "The answer is {r}."
        else:
            question, reasoning, expr, final = (_ja_multi if self.multi else _ja)(rng)
            question = vary_question(rng, self.lang, question)
        result = str(int_value(expr))
        parts = [
            {"type": "text", "text": reasoning},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": result},
            {"type": "text", "text": final.format(r=result) + f"\n#### {result}"},
        ]
        item = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": result, "expr": expr, "form": "bare" if bare else "story"}
        # Keyed by the expression: however a problem is phrased, a test problem never trains.
        return expr, item

    def evaluate(self, item: dict, completion_text: str) -> bool:
        return numbers_equal(extract_final_number(completion_text), item["answer"])
