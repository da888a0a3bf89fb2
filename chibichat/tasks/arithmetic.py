"""Generated arithmetic word problems (EN and JA) whose answers call the calculator tool.

Item (kind "generative"):
    messages: user question; assistant parts
        text   one sentence saying what to compute: for a word problem its plan, operations only
               ("First we multiply, then we add.", "まずかけ算をして、次にたし算をします。")
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
教えてください。") in the phrasings of tasks/paraphrase.py. Word problems are composed from parts by
tasks/word_problems.py, so each operation comes in many wordings. Every item is keyed by the canonical
form of its expression (`canonical`: the operands of + and * sorted), so however it is worded and in
whichever order its story gives the numbers, a test problem never trains; and no item of any split has
the expression (canonical form) of an arithmetic item of the held-out skills prompt set
(assets/skills-<lang>.jsonl, each such item's "expr"), so the skills score measures new problems.

arithmetic-multi(-ja) uses the same item format with two-step problems (three or four numbers, some of
three digits, one calculator call such as "4*12+3*15"): the RL stage's default task, because SFT on the
one-step problems nearly saturates those but leaves the longer expressions only partly right.
"""

from __future__ import annotations

import random
import re

from chibichat.eval.metrics import extract_final_number, numbers_equal
from chibichat.tasks.base import GeneratedTask
import chibichat.tasks.word_problems as word_problems
from chibichat.tasks.paraphrase import casual

BARE_SHARE = 0.3  # of the one-step items: a bare calculation ("Calculate 12 x 7.") instead of a story
COMMAND_SHARE = 0.35  # of the bare calculations: asked with an operation verb ("Subtract 17 from 60 and ...")
_OP_WORDS = {"en": {"+": "plus", "-": "minus", "*": "times", "/": "divided by"},
             "ja": {"+": "たす", "-": "ひく", "*": "かける", "/": "わる"}}


def _bare(rng: random.Random, lang: str) -> tuple[str, str, str, str]:
    """A bare calculation in one of many phrasings (tasks/paraphrase.py): (question, reasoning sentence,
    expression, answer sentence template with {r})."""
    from chibichat.tasks.paraphrase import command, expression, phrase

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
    if rng.random() < COMMAND_SHARE:
        question = phrase(rng, lang, "arithmetic-command", c=command(rng, lang, op, a, b))
    else:
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


def canonical(expr: str) -> str:
    """The form of a template expression that is equal for a*b and b*a, a+b and b+a: the factors of a
    product sorted (a term with a division keeps its order: 18/6*10 is not 10/6*18), the added terms
    sorted, and the subtracted terms (a-b-c is a-(b+c)) sorted after them. "36+36*2" -> "2*36+36",
    "50-6*3" -> "50-3*6"."""
    added, subtracted = [], []
    for sign, term in re.findall(r"([+-]?)([0-9*/]+)", expr):
        if "/" not in term:
            term = "*".join(sorted(term.split("*"), key=int))
        (subtracted if sign == "-" else added).append(term)
    return "+".join(sorted(added)) + "".join("-" + t for t in sorted(subtracted))


def held_out_exprs() -> frozenset[str]:
    """The canonical expressions of the arithmetic items of the held-out skills prompt set, both
    languages: no generated item may have one. Each such item carries "expr", which must evaluate to its
    answer (a wrong one would exclude the wrong problem)."""
    from chibichat.common import ChibiError
    from chibichat.tasks.skills import LANGS, asset_file, load_items

    out = set()
    for lang in LANGS:
        for item in load_items(lang):
            if not item["skill"].startswith("arithmetic"):
                continue
            expr = item.get("expr")
            if not isinstance(expr, str) or not re.fullmatch(r"\d+([+*/-]\d+)*", expr):
                raise ChibiError(f"{asset_file(lang)}: item {item['id']!r} needs 'expr', the calculation it asks "
                                 f"for (digits joined by + - * /, e.g. \"96/8\"), got {expr!r}")
            try:
                value = int_value(expr)
            except ValueError:
                value = None
            if str(value) != item["answer"]:
                raise ChibiError(f"{asset_file(lang)}: item {item['id']!r} has expr {expr!r} = {value}, not its "
                                 f"answer {item['answer']!r}; fix the expr")
            out.add(canonical(expr))
    return frozenset(out)


class Arithmetic(GeneratedTask):
    kind = "generative"
    default_size = {"train": 2000, "test": 200}

    def __init__(self, lang: str = "en", split: str = "train", size: int | None = None, seed: int = 0,
                 multi: bool = False):
        self.lang, self.multi = lang, multi
        self.name = ("arithmetic" if lang == "en" else "arithmetic-ja") if not multi else \
            ("arithmetic-multi" if lang == "en" else "arithmetic-multi-ja")
        self.held_out = held_out_exprs()
        self.description = ("generated two-step arithmetic word problems (3-4 numbers) answered with one calculator "
                            "call and '#### n'" if multi else
                            "generated arithmetic word problems answered with a calculator call and '#### n'")
        super().__init__(split, size, seed)

    def _draw(self, rng: random.Random) -> tuple[bool, str, str, str, str]:
        bare = not self.multi and rng.random() < BARE_SHARE
        if bare:
            question, reasoning, expr, final = _bare(rng, self.lang)
        else:
            make = {(False, "en"): word_problems.one_step, (True, "en"): word_problems.two_step,
                    (False, "ja"): word_problems.one_step_ja, (True, "ja"): word_problems.two_step_ja}
            problem = make[self.multi, self.lang](rng)
            question, reasoning, expr = casual(rng, self.lang, problem.question), problem.plan, problem.expr
            final = "The answer is {r}." if self.lang == "en" else "答えは{r}です。"
        return bare, question, reasoning, expr, final

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        bare, question, reasoning, expr, final = self._draw(rng)
        while canonical(expr) in self.held_out:  # a held-out skills problem: drawn again (same rng: deterministic)
            bare, question, reasoning, expr, final = self._draw(rng)
        result = str(int_value(expr))
        parts = [
            {"type": "text", "text": reasoning},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": result},
            {"type": "text", "text": final.format(r=result) + f"\n#### {result}"},
        ]
        item = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": result, "expr": expr, "form": "bare" if bare else "story"}
        # Keyed by the canonical expression: however a problem is phrased or ordered, a test problem never trains.
        return canonical(expr), item

    def evaluate(self, item: dict, completion_text: str) -> bool:
        return numbers_equal(extract_final_number(completion_text), item["answer"])


ZERO_WORDS = {"en": "zero", "ja": "ゼロ"}


class ZeroDivision(GeneratedTask):
    """"What is 7 divided by 0?": the calculator call fails, its output is the error the engine injects
    ("Error: division by zero", what chibichat.tools.run_tool returns), and the reply says there is no
    answer instead of making one up. The only chat data where a tool output is an error: a model that
    has never seen one continues an error with noise. Items as Arithmetic's bare calculations, with
    "answer" None; evaluate: the call was made and the reply has no '####' answer line. Keyed by the
    expression, like Arithmetic."""

    kind = "generative"
    default_size = {"train": 200, "test": 50}

    def __init__(self, lang: str = "en", split: str = "train", size: int | None = None, seed: int = 0):
        self.lang = lang
        self.name = "zero-division" if lang == "en" else "zero-division-ja"
        self.description = "division by zero: the calculator's error read, no answer made up"
        super().__init__(split, size, seed)

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        from chibichat.tasks.paraphrase import expressions, phrase
        from chibichat.tools import run_tool

        a = rng.randint(1, 999)
        # the wordings that still read naturally with 0 ("shared equally among 0" does not)
        wording = rng.choice([w for w in expressions(self.lang, "/") if "shared" not in w])
        # Half of the worded questions write the divisor as a word ("120 divided by zero"): users do, and a
        # model that only ever saw the digit reads "zero" as any number and makes an answer up. The
        # call is "a/0" either way. Symbols ("/", "÷") keep the digit: "7 / zero" is not how anyone asks.
        zero = "0"
        if not any(sym in wording for sym in "/÷") and rng.random() < 0.5:
            zero = ZERO_WORDS[self.lang]
        question = phrase(rng, self.lang, "arithmetic", x=wording.format(a=a, b=zero))
        expr = f"{a}/0"
        if self.lang == "en":
            reasoning = "I will compute it with the calculator."
            final = rng.choice([f"Dividing by zero is not defined, so {a} divided by 0 has no answer.",
                                f"The calculator cannot do it: no number times 0 gives {a}, so there is no answer.",
                                "There is no answer: a number cannot be divided by zero."])
        else:
            reasoning = "電卓で計算します。"
            final = rng.choice([f"0でわることはできないので、{a}わる0の答えはありません。",
                                "0でわる計算はできません。答えはありません。"])
        parts = [{"type": "text", "text": reasoning}, {"type": "python", "text": expr},
                 {"type": "python_output", "text": run_tool("calculator", expr)}, {"type": "text", "text": final}]
        item = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": None, "expr": expr, "form": "bare"}
        return expr, item

    def evaluate(self, item: dict, completion_text: str) -> bool:
        called = f"<|python_start|>{item['expr']}<|python_end|>" in completion_text
        # No "####" at all: "#### 0/0" or "#### 7x" is an answer made up after the error, even if it does not parse.
        return called and "####" not in completion_text
