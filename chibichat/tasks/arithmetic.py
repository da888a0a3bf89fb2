"""Generated arithmetic word problems (EN and JA) whose answers call the calculator tool.

Item (kind "generative"):
    messages: user question; assistant parts
        text   one sentence saying what to compute
        python the expression, e.g. "12*7+3"          (the calculator call)
        python_output what chibichat.tools.calculate returns for it, e.g. "87"
        text   the answer in a sentence, then "\n#### 87"
    answer: "87"   (the number evaluate() compares with the one after "####" in a completion)
    expr:   "12*7+3"

Every template uses +, -, * and exact / on small non-negative integers and never produces a negative
or fractional result, so the problems stay short and regular enough for a tiny model to learn the pattern
"read numbers -> write expression -> copy tool output -> #### answer".
"""

from __future__ import annotations

import random
import re

from chibichat.tasks.answers import extract_final_number, numbers_equal
from chibichat.tasks.generated import GeneratedTask

EN_NAMES = ["Tom", "Sara", "Ben", "Mia", "Leo", "Ana", "Sam", "Emma", "Noah", "Lily", "Omar", "Yuki"]
# (thing, container, containers): each thing with a container it plausibly comes in
EN_THINGS = [("apples", "basket", "baskets"), ("pencils", "box", "boxes"), ("stickers", "sheet", "sheets"),
             ("marbles", "bag", "bags"), ("books", "shelf", "shelves"), ("cookies", "jar", "jars"),
             ("stamps", "album", "albums"), ("cards", "pack", "packs"), ("shells", "bucket", "buckets"),
             ("coins", "purse", "purses"), ("eggs", "carton", "cartons"), ("crayons", "box", "boxes")]
JA_NAMES = ["たろう", "はなこ", "けんた", "さくら", "ゆうき", "あおい", "そうた", "みお", "れん", "ひなた"]
# (thing, counter, container)
JA_THINGS = [("りんご", "個", "かご"), ("えんぴつ", "本", "箱"), ("シール", "枚", "シート"), ("ビー玉", "個", "袋"),
             ("本", "冊", "たな"), ("クッキー", "枚", "びん"), ("切手", "枚", "アルバム"), ("カード", "枚", "パック"),
             ("貝がら", "個", "バケツ"), ("たまご", "個", "パック"), ("クレヨン", "本", "箱")]


def _en(rng: random.Random) -> tuple[str, str, str, str]:
    """(question, reasoning sentence, expression, answer sentence template with {r})."""
    name = rng.choice(EN_NAMES)
    thing, g1, gs = rng.choice(EN_THINGS)
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return (f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
                "We add the new ones to the old ones.", f"{a}+{b}", f"{name} has {{r}} {thing} now.")
    if kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a)
        return (f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?",
                "We subtract the ones given away.", f"{a}-{b}", f"{name} has {{r}} {thing} left.")
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"A {g1} holds {a} {thing}. How many {thing} are in {b} {gs}?",
                f"We multiply the {thing} per {g1} by the number of {gs}.", f"{a}*{b}",
                f"There are {{r}} {thing} in {b} {gs}.")
    if kind == 3:
        a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
        return (f"There are {a} {gs} with {b} {thing} each and {c} loose {thing}. How many {thing} are there in all?",
                f"We multiply to count the {thing} in the {gs}, then add the loose ones.", f"{a}*{b}+{c}",
                f"There are {{r}} {thing} in all.")
    if kind == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        c = rng.randint(1, a * b)
        return (f"{name} has {a} {gs} of {b} {thing} and uses {c} of them. How many {thing} are left?",
                f"We count all the {thing}, then subtract the ones used.", f"{a}*{b}-{c}",
                f"{name} has {{r}} {thing} left.")
    if kind == 6:
        each, k = rng.randint(2, 12), rng.randint(2, 9)
        return (f"{name} shares {each * k} {thing} equally among {k} friends. How many {thing} does each friend get?",
                "We divide the total by the number of friends.", f"{each * k}/{k}",
                f"Each friend gets {{r}} {thing}.")
    if kind == 7:
        per, k = rng.randint(2, 12), rng.randint(2, 9)
        return (f"{name} packs {per * k} {thing} into {gs} of {per}. How many {gs} are needed?",
                f"We divide the {thing} by the number that fit in one {g1}.", f"{per * k}/{per}",
                f"{name} needs {{r}} {gs}.")
    price, n = rng.randint(2, 15), rng.randint(2, 6)
    paid = rng.choice([p for p in (20, 50, 100) if p >= price * n] or [100])
    return (f"A pack of {thing} costs {price} dollars. {name} buys {n} packs and pays with {paid} dollars. "
            "How much change does " + name + " get?",
            "We subtract the total cost from the money paid.", f"{paid}-{price}*{n}",
            f"{name} gets {{r}} dollars in change.")


def _ja(rng: random.Random) -> tuple[str, str, str, str]:
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
            "はらったお金から代金を引きます。", f"{paid}-{price}*{n}", f"おつりは{{r}}円です。")


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

    def __init__(self, lang: str = "en", split: str = "train", size: int | None = None, seed: int = 0):
        self.lang = lang
        self.name = "arithmetic" if lang == "en" else "arithmetic-ja"
        self.description = "generated arithmetic word problems answered with a calculator call and '#### n'"
        super().__init__(split, size, seed)

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        question, reasoning, expr, final = (_en if self.lang == "en" else _ja)(rng)
        result = str(int_value(expr))
        parts = [
            {"type": "text", "text": reasoning},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": result},
            {"type": "text", "text": final.format(r=result) + f"\n#### {result}"},
        ]
        item = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": result, "expr": expr}
        return question, item

    def evaluate(self, item: dict, completion_text: str) -> bool:
        return numbers_equal(extract_final_number(completion_text), item["answer"])
