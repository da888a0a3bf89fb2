"""Word problems built from parts (EN and JA), for the arithmetic tasks (tasks/arithmetic.py).

A problem is composed: who (a name, a role, "I" or "we", each with its own verb forms), what (one of
many countable things, containers, movers, prices, rates), what happens (verbs of getting, losing,
leaving, arriving, sharing, cutting, packing, earning; past or present tense), and one of several
closing questions. The same operation therefore comes in many wordings, and a tiny model has to read
the cue words ("more", "flew away", "in each", "equally among") instead of recalling one sentence per
kind of problem, which is what it did with one template per kind (it then answered held-out stories
with the reasoning and numbers of the nearest template).

Two-step problems come in the kinds of grade-school word problems: two events in a row (got, then
lost; a shop's sales and deliveries; a level that rises and falls), groups plus or minus loose ones,
two kinds of groups, change from a payment, two prices, a rate then a withdrawal, three periods, three
factors, a multiple of a first amount ("twice as many"), handing the same number to each of several
people, a capacity minus what is in use, a rate over two periods, money pooled toward a cost, and a
price for some items asked for another number of them.

`one_step(rng)` and `two_step(rng)` (Japanese: `one_step_ja`, `two_step_ja`) return a Problem: the question, a plan sentence that names only the
operations ("First we multiply, then we subtract."), never the story, and the calculator expression,
whose numbers appear in it in the order the story gives them (a subtraction or division starts from
the total). Every expression evaluates to a non-negative integer (exact division).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    question: str
    plan: str
    expr: str


@dataclass(frozen=True)
class Who:
    """The subject of a story and the verb forms that agree with it."""
    name: str      # as it appears mid-sentence: "Tom", "the baker", "I"
    pro: str       # subject pronoun: "he", "she", "I", "we"
    third: bool    # third person singular: "has", "does", "gets"

    @property
    def has(self) -> str:
        return "has" if self.third else "have"

    @property
    def does(self) -> str:
        return "does" if self.third else "do"

    def verb(self, base: str, s_form: str) -> str:
        return s_form if self.third else base


_PEOPLE = [("Tom", "he"), ("Sara", "she"), ("Ben", "he"), ("Mia", "she"), ("Leo", "he"), ("Ana", "she"),
           ("Sam", "he"), ("Emma", "she"), ("Noah", "he"), ("Lily", "she"), ("Omar", "he"), ("Yuki", "she"),
           ("Max", "he"), ("Zoe", "she"), ("Ravi", "he"), ("Nina", "she"), ("Hugo", "he"), ("Ella", "she"),
           ("Jack", "he"), ("Maya", "she"), ("Ivan", "he"), ("Aiko", "she"), ("Luis", "he"), ("Rosa", "she"),
           ("the baker", "she"), ("a farmer", "he"), ("the teacher", "she"), ("a gardener", "he"),
           ("the coach", "he"), ("a shopkeeper", "she"), ("my aunt", "she"), ("my uncle", "he"),
           ("Grandpa", "he"), ("my cousin", "she")]

# (things, container, containers)
_THINGS = [("apples", "basket", "baskets"), ("pencils", "box", "boxes"), ("stickers", "sheet", "sheets"),
           ("marbles", "bag", "bags"), ("books", "shelf", "shelves"), ("cookies", "jar", "jars"),
           ("stamps", "album", "albums"), ("cards", "pack", "packs"), ("shells", "bucket", "buckets"),
           ("coins", "purse", "purses"), ("eggs", "carton", "cartons"), ("crayons", "case", "cases"),
           ("balloons", "bunch", "bunches"), ("flowers", "vase", "vases"), ("candles", "box", "boxes"),
           ("buttons", "tin", "tins"), ("toys", "chest", "chests"), ("cupcakes", "tray", "trays"),
           ("oranges", "crate", "crates"), ("bottles", "crate", "crates"), ("socks", "drawer", "drawers"),
           ("rocks", "pail", "pails"), ("plums", "bowl", "bowls"), ("nuts", "sack", "sacks"),
           ("pens", "cup", "cups"), ("bricks", "pile", "piles"), ("potatoes", "sack", "sacks")]

# (base, third person singular, past) of verbs that add to what the subject has
_GAIN = [("get", "gets", "got"), ("buy", "buys", "bought"), ("find", "finds", "found"),
         ("receive", "receives", "received"), ("collect", "collects", "collected"), ("win", "wins", "won"),
         ("bring home", "brings home", "brought home"), ("pick up", "picks up", "picked up")]
# ... and that take away from it
_LOSE = [("give away", "gives away", "gave away"), ("lose", "loses", "lost"), ("sell", "sells", "sold"),
         ("use", "uses", "used"), ("donate", "donates", "donated"), ("throw away", "throws away", "threw away"),
         ("trade away", "trades away", "traded away"), ("hand out", "hands out", "handed out")]

# (movers, where, (leave present, leave past), (arrive present, arrive past))
_MOVERS = [("birds", "in the tree", ("fly away", "flew away"), ("land there", "landed there")),
           ("ducks", "on the pond", ("swim off", "swam off"), ("join them", "joined them")),
           ("people", "on the bus", ("get off", "got off"), ("get on", "got on")),
           ("children", "in the park", ("go home", "went home"), ("come to play", "came to play")),
           ("cars", "in the car park", ("drive away", "drove away"), ("pull in", "pulled in")),
           ("sheep", "in the field", ("wander off", "wandered off"), ("come back", "came back")),
           ("frogs", "by the stream", ("hop away", "hopped away"), ("hop over", "hopped over")),
           ("guests", "at the party", ("leave", "left"), ("arrive", "arrived")),
           ("boats", "in the harbor", ("sail out", "sailed out"), ("sail in", "sailed in")),
           ("students", "in the hall", ("walk out", "walked out"), ("walk in", "walked in"))]

# (base, past, things) of things done in periods, and the periods
_DOINGS = [("read", "read", "pages"), ("bake", "baked", "cookies"), ("pick", "picked", "flowers"),
           ("sell", "sold", "tickets"), ("write", "wrote", "letters"), ("paint", "painted", "pictures"),
           ("catch", "caught", "fish"), ("plant", "planted", "trees"), ("fold", "folded", "paper cranes"),
           ("collect", "collected", "shells"), ("score", "scored", "points"), ("walk", "walked", "kilometers"),
           ("save", "saved", "dollars"), ("knit", "knitted", "hats")]
_PERIODS = [("on Monday", "on Tuesday", "on Wednesday"), ("in the morning", "in the afternoon", "in the evening"),
            ("in May", "in June", "in July"), ("on Friday", "on Saturday", "on Sunday"),
            ("in the first hour", "in the second hour", "in the third hour"),
            ("last week", "this week", "the week after"), ("before lunch", "after lunch", "at night")]

# (item, items) bought at a price
_ITEMS = [("book", "books"), ("toy car", "toy cars"), ("pen", "pens"), ("kite", "kites"), ("ball", "balls"),
          ("mug", "mugs"), ("shirt", "shirts"), ("lamp", "lamps"), ("board game", "board games"),
          ("cake", "cakes"), ("plant pot", "plant pots"), ("hat", "hats"), ("puzzle", "puzzles"),
          ("sandwich", "sandwiches"), ("bag of rice", "bags of rice")]

# (base, third person, things, per): a steady rate
_RATES = [("read", "reads", "pages", "day"), ("save", "saves", "dollars", "week"),
          ("walk", "walks", "kilometers", "day"), ("bake", "bakes", "loaves", "day"),
          ("earn", "earns", "dollars", "day"), ("practice", "practices", "minutes", "day"),
          ("swim", "swims", "laps", "day")]

# (what, unit): a length that is cut
_LENGTHS = [("ribbon", "centimeters"), ("rope", "meters"), ("board", "centimeters"), ("pipe", "meters"),
            ("string", "centimeters"), ("log", "meters"), ("roll of paper", "meters")]

# (what is measured, unit, rise, fall, question) for a level that changes by an amount
_LEVELS = [("The temperature", "degrees", "rose by", "fell by", "What is the temperature now?"),
           ("The price of a lamp", "dollars", "went up by", "went down by", "What does the lamp cost now?"),
           ("The water in the tank", "liters", "went up by", "went down by", "How much water is in the tank now?"),
           ("A sunflower", "centimeters tall", "grew by", "was cut back by", "How tall is it now?"),
           ("The score", "points", "went up by", "went down by", "What is the score now?")]

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve"]
WORD_SHARE = 0.12  # of the small numbers (2..12): written as a word, the expression still has the digits


def _who(rng: random.Random) -> Who:
    r = rng.random()
    if r < 0.08:
        return Who("I", "I", False)
    if r < 0.12:
        return Who("we", "we", False)
    name, pro = rng.choice(_PEOPLE)
    return Who(name, pro, True)


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _n(rng: random.Random, n: int) -> str:
    """n as written in a question: digits, or for 2..12 sometimes the word."""
    return _NUMBER_WORDS[n] if 2 <= n <= 12 and rng.random() < WORD_SHARE else str(n)


def _left(rng: random.Random, who: Who, things: str, lost: bool = True) -> str:
    """The closing question of a story of getting and losing; "left", "remain" and "still" only when
    something was taken away (`lost`): after gains alone the question asks what there is now, in all."""
    if not lost:
        return rng.choice([f"How many {things} {who.does} {who.pro} have now?",
                           f"How many {things} {who.does} {who.pro} have in all?",
                           f"How many {things} {who.does} {who.pro} have at the end?"])
    return rng.choice([f"How many {things} {who.does} {who.pro} have now?", f"How many {things} are left?",
                       f"How many {things} remain?", f"How many {things} {who.does} {who.pro} still have?",
                       f"How many {things} {who.does} {who.pro} have at the end?"])


def _total(rng: random.Random, things: str) -> str:
    return rng.choice([f"How many {things} are there in all?", f"How many {things} is that in total?",
                       f"What is the total number of {things}?", f"How many {things} altogether?"])



# Plan sentences by the expression's operators in the order the calculator applies them (products
# first): one operator, a whole sentence of its own; two or more, one pattern built from the verbs
# ("First we subtract, then we subtract again."), so the opening word already says one step or more and
# every later word names one operation. Whole sentences for the two-step patterns ("We subtract both
# parts from the start.") shared the one-step opening "We" and a form the model could not build from
# its parts: it chose a neighbouring pattern ("First we subtract, then we add.") for 4 of 5 such
# problems (docs/benchmarks.md, session 38).
_PLANS = {"+": "We add the numbers together.", "-": "We subtract the part that is taken away.",
          "*": "We multiply the number of groups by the size of each group.",
          "/": "We divide the total into equal parts."}
_OP_VERB = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}


def _plan(expr: str, plans: dict[str, str], verbs: dict[str, str], first: str, then: str, end: str,
          again: str, each: str) -> str:
    """The plan sentence: `plans` for one operator, else `first` verb (`then` verb)* `end`; a verb that
    repeats the one before it takes `again`; two products first ("a*b+c*d") are one `each` step."""
    ops = [c for c in expr if c in "+-*/"]
    order = "".join(o for o in ops if o in "*/") + "".join(o for o in ops if o in "+-")
    if len(order) == 1:
        return plans[order]
    terms = re.split(r"[+-]", expr)
    if order in ("**+", "**-") and len(terms) == 2 and all(t.count("*") == 1 for t in terms):
        return first + each.format(verbs["*"]) + then + verbs[order[2]] + end
    words = [verbs[order[0]]] + [again.format(verbs[o]) if o == order[i] else verbs[o]
                                 for i, o in enumerate(order[1:])]
    return first + then.join(words) + end


def plan(expr: str) -> str:
    """The plan sentence of an expression: its operators in the order the calculator applies them
    (products first), never the story. "12*3-5" -> "First we multiply, then we subtract." """
    return _plan(expr, _PLANS, _OP_VERB, "First we ", ", then we ", ".", "{} again", "{} for each group")


# --- one-step problems: each returns (question, expression) -------------------------------------------

def _gain(rng):
    who, (things, _, _) = _who(rng), rng.choice(_THINGS)
    a, b = rng.randint(2, 80), rng.randint(2, 40)
    base, s, past = rng.choice(_GAIN)
    story = rng.choice([
        f"{_cap(who.name)} {who.has} {_n(rng, a)} {things}. {_cap(who.pro)} {who.verb(base, s)} {_n(rng, b)} more.",
        f"{_cap(who.name)} had {_n(rng, a)} {things} and {past} {_n(rng, b)} more.",
        f"{_cap(who.name)} had {_n(rng, a)} {things}, then {past} another {_n(rng, b)}."])
    return f"{story} {_left(rng, who, things, lost=False)}", f"{a}+{b}"


def _loss(rng):
    who, (things, _, _) = _who(rng), rng.choice(_THINGS)
    a = rng.randint(10, 90)
    b = rng.randint(2, a - 1)
    base, s, past = rng.choice(_LOSE)
    story = rng.choice([
        f"{_cap(who.name)} {who.has} {a} {things}. {_cap(who.pro)} {who.verb(base, s)} {_n(rng, b)} of them.",
        f"{_cap(who.name)} had {a} {things} and {past} {_n(rng, b)}.",
        f"{_cap(who.name)} started with {a} {things} and {past} {_n(rng, b)}."])
    return f"{story} {_left(rng, who, things)}", f"{a}-{b}"


def _movers(rng, op: str):
    movers, where, leave, arrive = rng.choice(_MOVERS)
    a = rng.randint(10, 90)
    b = rng.randint(2, a - 1) if op == "-" else rng.randint(2, 40)
    now, past = leave if op == "-" else arrive
    more = "more " if op == "+" else ""
    story = rng.choice([f"There are {a} {movers} {where}. {_cap(_n(rng, b))} {more}{now}.",
                        f"{a} {movers} were {where}, and {_n(rng, b)} {more}{past}.",
                        f"At first there were {a} {movers} {where}. Then {_n(rng, b)} {more}{past}."])
    question = rng.choice([f"How many {movers} are {where} now?", f"How many {movers} are there now?",
                           f"How many {movers} are {where} at the end?"])
    return f"{story} {question}", f"{a}{op}{b}"


def _periods(rng, count: int = 2):
    who, (base, past, things), periods = _who(rng), rng.choice(_DOINGS), rng.choice(_PERIODS)
    nums = [rng.randint(2, 60) for _ in range(count)]
    first = f"{_cap(periods[0])}, {who.name} {past} {_n(rng, nums[0])} {things}."
    rest = [f"{_n(rng, x)} more {periods[i + 1]}" for i, x in enumerate(nums[1:])]
    story = rng.choice([f"{first} {_cap(who.pro)} {past} {' and '.join(rest)}.",
                        f"{first} Then {who.pro} {past} {' and '.join(rest)}."])
    question = rng.choice([f"How many {things} did {who.pro} {base} in all?",
                           f"What is the total number of {things}?", f"How many {things} is that in total?"])
    return f"{story} {question}", "+".join(map(str, nums))


def _level_change(rng, op: str) -> tuple[int, int]:
    """A level and the amount it rises or falls by, never below zero (EN and JA)."""
    a = rng.randint(20, 90)
    return a, rng.randint(2, a - 5) if op == "-" else rng.randint(2, 40)


def _level(rng, op: str):
    what, unit, rise, fall, question = rng.choice(_LEVELS)
    a, b = _level_change(rng, op)
    return f"{what} was {a} {unit} and then {rise if op == '+' else fall} {b}. {question}", f"{a}{op}{b}"


def _groups(rng):
    who, (things, c1, cs) = _who(rng), rng.choice(_THINGS)
    a, b = rng.randint(2, 12), rng.randint(2, 15)
    story, expr = rng.choice([
        (f"{_cap(who.name)} {who.has} {_n(rng, a)} {cs} of {b} {things}.", f"{a}*{b}"),
        (f"There are {_n(rng, a)} {cs} with {b} {things} in each.", f"{a}*{b}"),
        (f"Each {c1} holds {b} {things}, and there are {_n(rng, a)} {cs}.", f"{b}*{a}"),
        (f"{_cap(who.name)} filled {_n(rng, a)} {cs}, putting {b} {things} in every {c1}.", f"{a}*{b}")])
    return f"{story} {_total(rng, things)}", expr


def _price(rng):
    who, (item, items) = _who(rng), rng.choice(_ITEMS)
    p, n = rng.randint(2, 25), rng.randint(2, 9)
    return rng.choice([
        (f"One {item} costs {p} dollars. How much do {_n(rng, n)} {items} cost?", f"{p}*{n}"),
        (f"{_cap(items)} are {p} dollars each. What is the price of {_n(rng, n)} {items}?", f"{p}*{n}"),
        (f"{_cap(who.name)} {who.verb('buy', 'buys')} {_n(rng, n)} {items} at {p} dollars each. "
         f"How much {who.does} {who.pro} pay?", f"{n}*{p}"),
        (f"{_cap(who.name)} bought {_n(rng, n)} {items}, and each one cost {p} dollars. "
         f"How much did {who.pro} spend?", f"{n}*{p}")])


def _rate(rng):
    who, (base, s, things, per) = _who(rng), rng.choice(_RATES)
    p, n = rng.randint(2, 30), rng.randint(2, 9)
    every = rng.choice([f"every {per}", f"each {per}", f"a {per}"])
    return (f"{_cap(who.name)} {who.verb(base, s)} {p} {things} {every}. "
            f"How many {things} {who.does} {who.pro} {base} in {_n(rng, n)} {per}s?", f"{p}*{n}")


def _equal_groups(rng):
    """Who, the things (with container), a group size, a group count and the total: the draws of a division."""
    who, (things, c1, cs) = _who(rng), rng.choice(_THINGS)
    size, k = rng.randint(2, 12), rng.randint(2, 9)
    return who, things, c1, cs, size, k, size * k


def _share(rng):
    who, things, c1, cs, _, k, t = _equal_groups(rng)
    return rng.choice([
        f"{_cap(who.name)} {who.verb('share', 'shares')} {t} {things} equally among {_n(rng, k)} friends. "
        f"How many {things} does each friend get?",
        f"{t} {things} are split evenly between {_n(rng, k)} children. How many {things} does each child get?",
        f"{_cap(who.name)} put {t} {things} into {_n(rng, k)} {cs}, the same number in each. "
        f"How many {things} are in one {c1}?"]), f"{t}/{k}"


def _pack(rng):
    who, things, c1, cs, per, _, t = _equal_groups(rng)
    return rng.choice([
        f"{_cap(who.name)} {who.verb('pack', 'packs')} {t} {things} into {cs} of {_n(rng, per)}. "
        f"How many {cs} {who.does} {who.pro} need?",
        f"{t} {things} go {_n(rng, per)} to {_a(c1)}. How many {cs} are filled?",
        f"{_cap(who.name)} had {t} {things} and put {_n(rng, per)} in every {c1}. How many {cs} did {who.pro} use?"]), \
        f"{t}/{per}"


def _cut(rng):
    what, unit = rng.choice(_LENGTHS)
    each, k = rng.randint(2, 15), rng.randint(2, 9)
    t = each * k
    return rng.choice([
        f"{_cap(_a(what))} {t} {unit} long is cut into {_n(rng, k)} equal parts. What is the length of one part?",
        f"We cut {_a(what)} of {t} {unit} into {_n(rng, k)} pieces of the same length. How long is one piece?"]), \
        f"{t}/{k}"


def _unit_price(rng):
    who, (item, items) = _who(rng), rng.choice(_ITEMS)
    p, n = rng.randint(2, 20), rng.randint(2, 9)
    return rng.choice([
        f"{_cap(_n(rng, n))} {items} cost {p * n} dollars in all. What does one {item} cost?",
        f"{_cap(who.name)} paid {p * n} dollars for {_n(rng, n)} {items}. How much was each {item}?"]), \
        f"{p * n}/{n}"


_ONE_STEP = [_gain, _loss, lambda rng: _movers(rng, "-"), lambda rng: _movers(rng, "+"), _periods,
             lambda rng: _level(rng, "+"), lambda rng: _level(rng, "-"), _groups, _price, _rate, _share, _pack,
             _cut, _unit_price]


def one_step(rng: random.Random) -> Problem:
    question, expr = rng.choice(_ONE_STEP)(rng)
    return Problem(question, plan(expr), expr)


# --- two-step problems -------------------------------------------------------------------------------

def _two_events(rng):
    who, (things, _, _) = _who(rng), rng.choice(_THINGS)
    ops = rng.choice(["+-", "-+", "--", "++"])
    a = rng.randint(100, 600)
    nums = [rng.randint(10, min(90, a // 3)) for _ in ops]  # never below zero
    said = [rng.choice(_GAIN if op == "+" else _LOSE)[2] + f" {x}" + (" more" if op == "+" else "")
            for op, x in zip(ops, nums)]
    story = rng.choice([f"{_cap(who.name)} had {a} {things}. {_cap(who.pro)} {said[0]} and then {said[1]}.",
                        f"{_cap(who.name)} started with {a} {things}, {said[0]}, then {said[1]}."])
    return f"{story} {_left(rng, who, things, lost='-' in ops)}", f"{a}{ops[0]}{nums[0]}{ops[1]}{nums[1]}"


def _movers_two(rng):
    movers, where, leave, arrive = rng.choice(_MOVERS)
    ops = rng.choice(["-+", "+-", "--"])
    a = rng.randint(100, 300)
    nums = [rng.randint(5, min(60, a // 3)) for _ in ops]  # never below zero
    said = [f"{x} {(leave if op == '-' else arrive)[1]}" for op, x in zip(ops, nums)]
    return (f"There were {a} {movers} {where}. {_cap(said[0])}, and later {said[1]}. "
            f"How many {movers} are {where} now?", f"{a}{ops[0]}{nums[0]}{ops[1]}{nums[1]}")


def _groups_then(rng):
    who, (things, c1, cs) = _who(rng), rng.choice(_THINGS)
    a, b = rng.randint(2, 12), rng.randint(10, 30)
    op = rng.choice("+-")
    c = rng.randint(2, 40) if op == "+" else rng.randint(2, a * b - 1)
    if op == "+" and rng.random() < 0.5:
        return (f"There are {_n(rng, a)} {cs} with {b} {things} in each, and {c} loose {things}. "
                f"{_total(rng, things)}", f"{a}*{b}+{c}")
    base, s, _ = rng.choice(_GAIN if op == "+" else _LOSE)
    return (f"{_cap(who.name)} {who.has} {_n(rng, a)} {cs} of {b} {things} and {who.verb(base, s)} {c}"
            f"{' more' if op == '+' else ''}. {_left(rng, who, things, lost=op == '-')}", f"{a}*{b}{op}{c}")


def _two_groups(rng):
    who, (things, c1, cs) = _who(rng), rng.choice(_THINGS)
    a, b, c, d = rng.randint(2, 9), rng.randint(10, 30), rng.randint(2, 9), rng.randint(10, 30)
    return (f"{_cap(who.name)} {who.has} {_n(rng, a)} {cs} of {b} {things} and {_n(rng, c)} {cs} of {d} {things}. "
            f"{_total(rng, things)}", f"{a}*{b}+{c}*{d}")


def _change(rng):
    who, (item, items) = _who(rng), rng.choice(_ITEMS)
    p, n = rng.randint(2, 20), rng.randint(2, 6)
    paid = next(x for x in (20, 50, 100, 200) if x >= p * n)
    return (f"{_cap(who.name)} bought {_n(rng, n)} {items} at {p} dollars each and paid with {paid} dollars. "
            f"How much change did {who.pro} get?", f"{paid}-{n}*{p}")


def _two_prices(rng):
    who = _who(rng)
    (i1, is1), (i2, is2) = rng.sample(_ITEMS, 2)
    p, n, q, m = rng.randint(2, 20), rng.randint(2, 6), rng.randint(2, 20), rng.randint(2, 6)
    return (f"{_cap(who.name)} bought {_n(rng, n)} {is1} for {p} dollars each and {_n(rng, m)} {is2} for {q} "
            f"dollars each. How much did {who.pro} spend in total?", f"{n}*{p}+{m}*{q}")


def _rate_then(rng):
    who, (base, s, things, per) = _who(rng), rng.choice(_RATES)
    p, n = rng.randint(5, 30), rng.randint(2, 9)
    if rng.random() < 0.5:
        c = rng.randint(2, p * n - 1)
        return (f"{_cap(who.name)} {who.verb('put', 'puts')} {p} dollars into a piggy bank each week. After "
                f"{_n(rng, n)} weeks, {who.pro} {who.verb('take', 'takes')} out {c} dollars. How many dollars are "
                f"in the piggy bank now?", f"{p}*{n}-{c}")
    c = rng.randint(2, 40)
    return (f"{_cap(who.name)} {who.verb(base, s)} {p} {things} every {per} for {_n(rng, n)} {per}s, and then "
            f"{c} more. How many {things} is that in all?", f"{p}*{n}+{c}")


def _three_factors(rng):
    things, c1, cs = rng.choice(_THINGS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 12)
    return (f"A store has {_n(rng, a)} rooms. Every room has {_n(rng, b)} {cs}, and every {c1} holds {c} {things}. "
            f"{_total(rng, things)}", f"{a}*{b}*{c}")


_TIMES = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}


def _times_as_many(rng):
    """A first amount and a multiple of it ("twice as many"): the total is a+a*k."""
    who, (base, past, things), periods = _who(rng), rng.choice(_DOINGS), rng.choice(_PERIODS)
    a, k = rng.randint(3, 40), rng.choice(list(_TIMES))
    if rng.random() < 0.5:
        story = (f"{_cap(periods[0])}, {who.name} {past} {a} {things}. {_cap(periods[1])}, {who.pro} {past} "
                 f"{_TIMES[k]} as many.")
        question = rng.choice([f"How many {things} did {who.pro} {base} over both times?",
                               f"How many {things} is that in total?", f"What is the total number of {things}?"])
    else:
        (other, _), (things, _, _) = rng.choice(_PEOPLE), rng.choice(_THINGS)
        while other == who.name:  # "Leo has 13 plums, and Leo has five times as many" contradicts itself
            other = rng.choice(_PEOPLE)[0]
        story = f"{_cap(who.name)} {who.has} {a} {things}, and {other} has {_TIMES[k]} as many."
        together = "we" if who.pro in ("I", "we") else "they"  # "I have 38, and Jack has ...": we have together
        question = rng.choice([f"How many {things} do {together} have together?", f"How many {things} is that in all?"])
    return f"{story} {question}", f"{a}+{a}*{k}"


def _each_of(rng):
    """Some are handed out, the same number to each of several people: a total minus a product."""
    who, (things, c1, cs) = _who(rng), rng.choice(_THINGS)
    c, d = rng.randint(2, 9), rng.randint(2, 9)
    whom = rng.choice(["friends", "classmates", "neighbours", "cousins", "players", "children"])
    gave = rng.choice([f"handed {c} {things} to each of {d} {whom}", f"gave each of {d} {whom} {c} {things}",
                       f"shared out {c} {things} apiece to {d} {whom}"])
    if rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(10, 30)
        while a * b <= c * d:
            a += 1
        return (f"{_cap(who.name)} had {a} {cs} of {b} {things} and {gave}. {_left(rng, who, things)}",
                f"{a}*{b}-{c}*{d}")
    a = rng.randint(c * d + 1, c * d + 90)
    return f"{_cap(who.name)} had {a} {things} and {gave}. {_left(rng, who, things)}", f"{a}-{c}*{d}"


# (place, rows, places, filled, empty): a capacity of rows times places, part of it in use
_CAPACITY = [("A theater", "rows", "seats", "are taken", "empty"),
             ("A car park", "rows", "parking spaces", "have cars in them", "empty"),
             ("A classroom", "rows", "desks", "are in use", "unused"),
             ("A stadium block", "rows", "seats", "are sold", "still for sale"),
             ("A garden", "beds", "planting spots", "already have a plant", "open"),
             ("A hotel", "floors", "rooms", "are booked", "still open"),
             ("A shelf unit", "shelves", "slots", "hold a jar", "empty"),
             ("A ferry", "decks", "places", "are filled", "left")]


def _capacity(rng):
    place, rows, places, filled, empty = rng.choice(_CAPACITY)
    a, b = rng.randint(3, 12), rng.randint(10, 30)
    c = rng.randint(5, a * b - 1)
    story = rng.choice([f"{place} has {_n(rng, a)} {rows} with {b} {places} in each. {c} {places} {filled}.",
                        f"{place} has {_n(rng, a)} {rows}, and every one holds {b} {places}. Right now {c} of the {places} {filled}."])
    question = rng.choice([f"How many {places} are {empty}?", f"How many of the {places} are {empty}?"])
    return f"{story} {question}", f"{a}*{b}-{c}"


def _hours(rng):
    """A rate over two periods: the rate times each period, added (the rate is used twice)."""
    who = _who(rng)
    periods = rng.choice([("on Monday", "on Thursday"), ("last week", "this week"), ("in the morning", "in the evening"),
                          ("in June", "in July"), ("before the holiday", "after it")])
    p, h1, h2 = rng.randint(5, 20), rng.randint(2, 9), rng.randint(2, 9)
    job = rng.choice(["washing cars", "walking dogs", "at the cafe", "in the garden", "at the market", "tutoring"])
    story = rng.choice([f"{_cap(who.name)} {who.verb('make', 'makes')} {p} dollars for each hour {job}. {_cap(who.pro)} "
                        f"spent {h1} hours there {periods[0]} and {h2} hours {periods[1]}.",
                        f"{_cap(who.name)} {who.verb('get', 'gets')} {p} dollars per hour {job}, and {'were' if who.pro == 'we' else 'was'} busy "
                        f"{h1} hours {periods[0]} and {h2} hours {periods[1]}."])
    question = rng.choice([f"How much money did {who.pro} make?", f"How many dollars did {who.pro} earn in all?"])
    return f"{story} {question}", f"{p}*{h1}+{p}*{h2}"


def _pool(rng):
    """Several people each put in the same amount toward a cost: what is left over."""
    n, x = rng.randint(2, 9), rng.randint(5, 30)
    y = rng.randint(5, n * x - 1)
    people = rng.choice(["friends", "children", "sisters", "team mates", "neighbours"])
    buy, costs = rng.choice([("a present", "costs"), ("a cake", "costs"), ("a football", "costs"),
                             ("a board game", "costs"), ("tickets to a show", "cost"), ("a picnic lunch", "costs")])
    story = rng.choice([f"{_cap(_n(rng, n))} {people} each put in {x} dollars and bought {buy} for {y} dollars.",
                        f"{_cap(_n(rng, n))} {people} give {x} dollars apiece to pay for {buy}, which {costs} {y} dollars."])
    question = rng.choice(["How much money remains?", "How many dollars do they have after paying?",
                           "How much of the money is not spent?"])
    return f"{story} {question}", f"{n}*{x}-{y}"


def _proportion(rng):
    """A price for some items, asked for another number of them: divide for one, then multiply."""
    (item, items) = rng.choice(_ITEMS)
    p, k, m = rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 12)
    while m == k:
        m = rng.randint(2, 12)
    story = rng.choice([f"{_cap(_n(rng, k))} {items} cost {p * k} dollars together.",
                        f"At the market, {_n(rng, k)} {items} sell for {p * k} dollars."])
    question = rng.choice([f"At the same price, what would {_n(rng, m)} {items} cost?",
                           f"How many dollars are {_n(rng, m)} {items} at that price?"])
    return f"{story} {question}", f"{p * k}/{k}*{m}"


# The periods of _PERIODS that fall within one day.
_DAY_PERIODS = (("in the morning", "in the afternoon", "in the evening"),
                ("in the first hour", "in the second hour", "in the third hour"),
                ("before lunch", "after lunch", "at night"))


def _shop_day(rng):
    """A shop's stock that changes twice (sold, delivered), in one day or over days."""
    shop = rng.choice(["A shop", "A market stall", "The bakery", "A corner store", "The school kiosk", "A farm stand"])
    (things, _, _) = rng.choice(_THINGS)
    periods = rng.choice(_PERIODS)
    ops = rng.choice(["--", "-+", "+-"])
    a = rng.randint(100, 400)
    nums = [rng.randint(10, min(90, a // 3)) for _ in ops]
    said = [(f"sold {x} {periods[i]}" if op == "-" else f"got {x} more {periods[i]}") for i, (op, x) in enumerate(zip(ops, nums))]
    began = "started the day with" if periods in _DAY_PERIODS else "started with"  # no Monday or May in one day
    story = rng.choice([f"{shop} had {a} {things}. It {said[0]} and {said[1]}.",
                        f"{shop} {began} {a} {things}, {said[0]}, then {said[1]}."])
    question = rng.choice([f"How many {things} does it have now?", f"How many {things} are in stock at the end?"])
    return f"{story} {question}", f"{a}{ops[0]}{nums[0]}{ops[1]}{nums[1]}"


def _two_changes(rng) -> tuple[str, int, int, int]:
    """The draws of a level that changes twice (EN and JA): the two signs, the start and the two amounts,
    never below zero. Not a temperature: the start is 100 or more."""
    ops = rng.choice(["-+", "+-", "--"])
    a = rng.randint(100, 300)
    return ops, a, rng.randint(5, a // 3), rng.randint(5, a // 3)


def _level_two(rng):
    """A level that changes twice."""
    what, unit, rise, fall, question = rng.choice(_LEVELS[1:])
    ops, a, b, c = _two_changes(rng)
    said = [rise if op == "+" else fall for op in ops]
    return (f"{what} was {a} {unit}. It {said[0]} {b}, and later {said[1]} {c}. {question}",
            f"{a}{ops[0]}{b}{ops[1]}{c}")


_TWO_STEP = [_two_events, _movers_two, _groups_then, _two_groups, _change, _two_prices, _rate_then,
             lambda rng: _periods(rng, 3), _three_factors, _times_as_many, _each_of, _capacity, _hours, _pool,
             _proportion, _shop_day, _level_two]


def two_step(rng: random.Random) -> Problem:
    question, expr = rng.choice(_TWO_STEP)(rng)
    return Problem(question, plan(expr), expr)


# --- Japanese ----------------------------------------------------------------------------------------
# The same parts in Japanese, where the verb does not agree with the subject: who (a name with さん, a
# role, 私), what (a thing with its counter and container), what happens, and the closing question.
# Numbers are digits; a story states no other digit than the problem's, except 1 as in 1つ, 1人 ("each").

_JA_PEOPLE = ["たろうさん", "はなこさん", "けんたさん", "さくらさん", "ゆうきさん", "あおいさん", "そうたさん", "みおさん",
              "れんさん", "ひなたさん", "パン屋さん", "農家の人", "先生", "おじいさん", "おばさん", "私", "兄", "妹"]
# (thing, counter, container)
_JA_THINGS = [("りんご", "個", "かご"), ("えんぴつ", "本", "箱"), ("シール", "枚", "シート"), ("ビー玉", "個", "袋"),
              ("本", "冊", "たな"), ("クッキー", "枚", "びん"), ("切手", "枚", "アルバム"), ("カード", "枚", "パック"),
              ("貝がら", "個", "バケツ"), ("たまご", "個", "パック"), ("クレヨン", "本", "箱"), ("風船", "個", "たば"),
              ("花", "本", "花びん"), ("ボタン", "個", "かん"), ("おにぎり", "個", "皿"), ("ノート", "冊", "箱"),
              ("ミニカー", "台", "箱"), ("みかん", "個", "箱"), ("ペン", "本", "ペン立て"), ("石", "個", "バケツ")]
# Verbs that fit every thing of _JA_THINGS (作りました does not: nobody makes りんご or 石).
_JA_GAIN = ["もらいました", "買いました", "見つけました", "拾いました", "集めました", "手に入れました"]
_JA_LOSE = ["あげました", "なくしました", "売りました", "使いました", "配りました", "すてました"]
# (movers, counter, where, left, arrived)
_JA_MOVERS = [("鳥", "羽", "木に", "飛んでいきました", "飛んできました"),
              ("カモ", "羽", "池に", "泳いでいきました", "やってきました"),
              ("人", "人", "バスに", "おりました", "乗ってきました"),
              ("子ども", "人", "公園に", "帰りました", "遊びに来ました"),
              ("車", "台", "駐車場に", "出ていきました", "入ってきました"),
              ("ひつじ", "頭", "牧場に", "にげていきました", "もどってきました"),
              ("お客さん", "人", "お店に", "帰りました", "来ました"),
              ("ねこ", "匹", "広場に", "どこかへ行きました", "集まってきました")]
# (thing, counter, done) and the periods they are done in
_JA_DOINGS = [("本", "ページ", "読みました"), ("クッキー", "枚", "焼きました"), ("花", "本", "つみました"),
              ("チケット", "枚", "売りました"), ("手紙", "通", "書きました"), ("絵", "枚", "かきました"),
              ("魚", "匹", "つりました"), ("木", "本", "植えました"), ("つる", "羽", "折りました"),
              ("ぼうし", "個", "あみました")]
_JA_PERIODS = [("月曜日に", "火曜日に", "水曜日に"), ("朝", "昼", "夜"), ("春に", "夏に", "秋に"),
               ("午前中に", "午後に", "夜に"), ("先週", "今週", "その次の週"), ("金曜日に", "土曜日に", "日曜日に")]
# (item, counter) bought at a price in yen
_JA_ITEMS = [("ノート", "冊"), ("ボールペン", "本"), ("おかし", "個"), ("ケーキ", "個"), ("ジュース", "本"),
             ("ハンカチ", "枚"), ("マグカップ", "個"), ("絵本", "冊"), ("パン", "個"), ("シャツ", "枚"), ("花の種", "ふくろ")]
# (what, per, unit, question word): a steady rate
_JA_RATES = [("ページ読みます", "日", "ページ", "読みますか"), ("キロ走ります", "日", "キロ", "走りますか"),
             ("枚の絵をかきます", "週", "枚", "かきますか"), ("周泳ぎます", "日", "周", "泳ぎますか"),
             ("分練習します", "日", "分", "練習しますか")]
# (what, unit, up, down, question)
_JA_LEVELS = [("気温", "度", "上がりました", "下がりました", "いま何度ですか？"),
              ("水そうの水", "リットル", "増えました", "減りました", "いま何リットルですか？"),
              ("ゲームの得点", "点", "増えました", "減りました", "いま何点ですか？"),
              ("ひまわりの高さ", "センチ", "のびました", "短くなりました", "いま何センチですか？")]
_JA_COUNT_TOTAL = ["全部で何{c}ですか？", "合わせて何{c}になりますか？", "全部でいくつありますか？"]


def _ja_left(c: str, rng, lost: bool = True) -> str:
    """As `_left`: 残り only when something was taken away."""
    if not lost:
        return rng.choice([f"全部で何{c}になりましたか？", f"手元には何{c}ありますか？", f"いま何{c}ありますか？"])
    return rng.choice([f"残りは何{c}ですか？", f"手元には何{c}ありますか？", f"何{c}残っていますか？"])


def _ja_gain(rng):
    who, (thing, c, _) = rng.choice(_JA_PEOPLE), rng.choice(_JA_THINGS)
    a, b = rng.randint(2, 80), rng.randint(2, 40)
    v = rng.choice(_JA_GAIN)
    story = rng.choice([f"{who}は{thing}を{a}{c}持っています。{b}{c}{v}。",
                        f"{who}は{thing}を{a}{c}持っていて、さらに{b}{c}{v}。"])
    return story + rng.choice([f"{thing}は全部で何{c}ですか？", f"{thing}は何{c}になりましたか？"]), f"{a}+{b}"


def _ja_loss(rng):
    who, (thing, c, _) = rng.choice(_JA_PEOPLE), rng.choice(_JA_THINGS)
    a = rng.randint(10, 90)
    b = rng.randint(2, a - 1)
    v = rng.choice(_JA_LOSE)
    story = rng.choice([f"{who}は{thing}を{a}{c}持っていました。そのうち{b}{c}を{v}。",
                        f"{who}の{thing}は{a}{c}ありましたが、{b}{c}{v}。"])
    return story + _ja_left(c, rng), f"{a}-{b}"


def _ja_movers(rng, op: str):
    movers, c, where, left, arrived = rng.choice(_JA_MOVERS)
    a = rng.randint(10, 90)
    b = rng.randint(2, a - 1) if op == "-" else rng.randint(2, 40)
    v = left if op == "-" else arrived
    story = rng.choice([f"{where}{movers}が{a}{c}いました。{b}{c}{v}。", f"はじめ{where}{movers}が{a}{c}いましたが、{b}{c}{v}。"])
    return story + rng.choice([f"いま{where}{movers}は何{c}いますか？", f"{movers}は何{c}になりましたか？"]), f"{a}{op}{b}"


def _ja_periods(rng, count: int = 2):
    who, (thing, c, done), periods = rng.choice(_JA_PEOPLE), rng.choice(_JA_DOINGS), rng.choice(_JA_PERIODS)
    nums = [rng.randint(2, 60) for _ in range(count)]
    said = "、".join(f"{periods[i]}{x}{c}" for i, x in enumerate(nums))
    story = f"{who}は{thing}を{said}{done}。"
    return story + rng.choice([f"全部で何{c}{done[:-3]}ましたか？" if done.endswith("ました") else f"全部で何{c}ですか？",
                               f"合わせて何{c}ですか？"]), "+".join(map(str, nums))


# An air temperature in degrees Celsius stays within this range, before and after the change: 気温 77度
# reads as a mistake (the English story's degrees may be Fahrenheit; _level_change is 20-90).
JA_AIR_TEMPERATURE = (0, 35)


def _ja_level(rng, op: str):
    what, unit, up, down, question = rng.choice(_JA_LEVELS)
    if what == "気温":
        low, high = JA_AIR_TEMPERATURE
        a = rng.randint(low + 2, high - 2) if op == "+" else rng.randint(low + 7, high)
        b = rng.randint(2, high - a) if op == "+" else rng.randint(2, a - 5)
    else:
        a, b = _level_change(rng, op)
    return f"{what}は{a}{unit}でしたが、{b}{unit}{up if op == '+' else down}。{question}", f"{a}{op}{b}"


def _ja_groups(rng):
    who, (thing, c, box) = rng.choice(_JA_PEOPLE), rng.choice(_JA_THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 15)  # the counter つ goes to 9
    story, expr = rng.choice([(f"{thing}が{b}{c}ずつ入った{box}が{a}つあります。", f"{b}*{a}"),
                              (f"{who}は{b}{c}入りの{box}を{a}つ持っています。", f"{b}*{a}"),
                              (f"{box}が{a}つあり、どの{box}にも{thing}が{b}{c}入っています。", f"{a}*{b}"),
                              # "1" as in 1つ, 1列 names the unit, not a number of the problem
                              (f"1つの{box}に{thing}が{b}{c}入っています。{box}は{a}つです。", f"{b}*{a}"),
                              (f"{thing}を1列に{b}{c}ずつ、{a}列ならべました。", f"{b}*{a}")])
    return story + rng.choice(_JA_COUNT_TOTAL).format(c=c), expr


def _ja_price(rng):
    who, (item, c) = rng.choice(_JA_PEOPLE), rng.choice(_JA_ITEMS)
    p, n = rng.randint(2, 30) * 10, rng.randint(2, 9)
    return rng.choice([(f"{item}は{p}円です。{n}{c}買うといくらですか？", f"{p}*{n}"),
                       (f"{who}は{p}円の{item}を{n}{c}買いました。代金はいくらですか？", f"{p}*{n}"),
                       (f"{who}は{item}を{n}{c}買いました。どれも{p}円です。全部でいくらはらいましたか？", f"{n}*{p}"),
                       (f"{item}は1{c}{p}円で売られています。{n}{c}分の代金はいくらですか？", f"{p}*{n}")])


def _ja_rate(rng):
    who, (what, per, unit, ask) = rng.choice(_JA_PEOPLE), rng.choice(_JA_RATES)
    p, n = rng.randint(2, 30), rng.randint(2, 9)
    span = f"{n}日間" if per == "日" else f"{n}週間"
    return f"{who}は毎{per}{p}{what}。{span}では何{unit}{ask}？", f"{p}*{n}"


def _ja_share(rng):
    (thing, c, box) = rng.choice(_JA_THINGS)
    each, k = rng.randint(2, 12), rng.randint(2, 9)
    t = each * k
    return rng.choice([f"{thing}{t}{c}を{k}人で同じ数ずつ分けます。1人分は何{c}ですか？",
                       f"{t}{c}の{thing}を{k}人の子どもに同じ数ずつ配ります。1人何{c}もらえますか？",
                       f"{thing}{t}{c}を{k}つの{box}に同じ数ずつ入れます。1つの{box}には何{c}入りますか？",
                       f"{thing}が{t}{c}あります。{k}列に同じ数ずつならべると、1列に何{c}になりますか？"]), f"{t}/{k}"


def _ja_pack(rng):
    (thing, c, box) = rng.choice(_JA_THINGS)
    per, k = rng.randint(2, 12), rng.randint(2, 9)
    t = per * k
    return rng.choice([f"{thing}{t}{c}を{per}{c}ずつ{box}に入れます。{box}はいくつ必要ですか？",
                       f"{t}{c}の{thing}を{per}{c}ずつまとめると、何組できますか？"]), f"{t}/{per}"


def _ja_cut(rng):
    what, unit = rng.choice([("リボン", "センチ"), ("ひも", "メートル"), ("板", "センチ"), ("パイプ", "メートル")])
    each, k = rng.randint(2, 15), rng.randint(2, 9)
    return f"長さ{each * k}{unit}の{what}を{k}等分します。1つ分は何{unit}ですか？", f"{each * k}/{k}"


def _ja_unit_price(rng):
    (item, c) = rng.choice(_JA_ITEMS)
    p, n = rng.randint(2, 30) * 10, rng.randint(2, 9)
    return f"{item}{n}{c}で{p * n}円でした。1{c}あたりいくらですか？", f"{p * n}/{n}"


_JA_ONE_STEP = [_ja_gain, _ja_loss, lambda rng: _ja_movers(rng, "-"), lambda rng: _ja_movers(rng, "+"), _ja_periods,
                lambda rng: _ja_level(rng, "+"), lambda rng: _ja_level(rng, "-"), _ja_groups, _ja_price, _ja_rate,
                _ja_share, _ja_pack, _ja_cut, _ja_unit_price]


def _ja_two_events(rng):
    who, (thing, c, _) = rng.choice(_JA_PEOPLE), rng.choice(_JA_THINGS)
    ops = rng.choice(["+-", "-+", "--", "++"])
    a = rng.randint(100, 600)
    nums = [rng.randint(10, min(90, a // 3)) for _ in ops]  # never below zero
    said = [f"{x}{c}{rng.choice(_JA_GAIN if op == '+' else _JA_LOSE)}" for op, x in zip(ops, nums)]
    story = f"{who}は{thing}を{a}{c}持っていました。{said[0]}。そのあと{said[1]}。"
    return story + _ja_left(c, rng, lost="-" in ops), f"{a}{ops[0]}{nums[0]}{ops[1]}{nums[1]}"


def _ja_movers_two(rng):
    movers, c, where, left, arrived = rng.choice(_JA_MOVERS)
    ops = rng.choice(["-+", "+-", "--"])
    a = rng.randint(100, 300)
    nums = [rng.randint(5, min(60, a // 3)) for _ in ops]  # never below zero
    said = [f"{x}{c}{left if op == '-' else arrived}" for op, x in zip(ops, nums)]
    return (f"{where}{movers}が{a}{c}いました。{said[0]}。そのあと{said[1]}。いま{movers}は何{c}いますか？",
            f"{a}{ops[0]}{nums[0]}{ops[1]}{nums[1]}")


def _ja_groups_then(rng):
    who, (thing, c, box) = rng.choice(_JA_PEOPLE), rng.choice(_JA_THINGS)
    a, b = rng.randint(2, 9), rng.randint(10, 30)
    if rng.random() < 0.5:
        d = rng.randint(2, 40)
        return (f"{thing}が{b}{c}ずつ入った{box}が{a}つと、ばらの{thing}が{d}{c}あります。"
                + rng.choice(_JA_COUNT_TOTAL).format(c=c), f"{b}*{a}+{d}")
    d = rng.randint(2, a * b - 1)
    return (f"{who}は{b}{c}入りの{box}を{a}つ持っていて、{d}{c}{rng.choice(_JA_LOSE)}。" + _ja_left(c, rng),
            f"{b}*{a}-{d}")


def _ja_two_groups(rng):
    (thing, c, box) = rng.choice(_JA_THINGS)
    a, b, d, e = rng.randint(2, 9), rng.randint(10, 30), rng.randint(2, 9), rng.randint(10, 30)
    return (f"{b}{c}入りの{box}が{a}つと、{e}{c}入りの{box}が{d}つあります。{thing}は"
            + rng.choice(_JA_COUNT_TOTAL).format(c=c), f"{b}*{a}+{e}*{d}")


def _ja_change(rng):
    who, (item, c) = rng.choice(_JA_PEOPLE), rng.choice(_JA_ITEMS)
    p, n = rng.randint(2, 30) * 10, rng.randint(2, 6)
    paid = next(x for x in (500, 1000, 2000, 5000) if x >= p * n)
    return (f"{who}は{p}円の{item}を{n}{c}買い、{paid}円出しました。おつりは何円ですか？", f"{paid}-{p}*{n}")


def _ja_two_prices(rng):
    who = rng.choice(_JA_PEOPLE)
    (i1, c1), (i2, c2) = rng.sample(_JA_ITEMS, 2)
    p, n, q, m = rng.randint(2, 30) * 10, rng.randint(2, 6), rng.randint(2, 30) * 10, rng.randint(2, 6)
    return (f"{who}は{i1}を{n}{c1}と{i2}を{m}{c2}買いました。{i1}は{p}円、{i2}は{q}円です。代金は合わせていくらですか？",
            f"{n}*{p}+{m}*{q}")


def _ja_rate_then(rng):
    who = rng.choice(_JA_PEOPLE)
    p, n = rng.randint(2, 30) * 10, rng.randint(2, 9)
    c = rng.randint(1, p * n // 10 - 1) * 10
    return (f"{who}は貯金箱に毎週{p}円ずつ入れました。{n}週間たってから{c}円取り出しました。貯金箱にはいくらありますか？",
            f"{p}*{n}-{c}")


def _ja_three_factors(rng):
    (thing, c, box) = rng.choice(_JA_THINGS)
    a, b, d = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 12)
    return (f"倉庫に部屋が{a}つあり、どの部屋にも{box}が{b}つ、どの{box}にも{thing}が{d}{c}あります。"
            + rng.choice(_JA_COUNT_TOTAL).format(c=c), f"{a}*{b}*{d}")


def _ja_times_as_many(rng):
    who, (thing, c, done), periods = rng.choice(_JA_PEOPLE), rng.choice(_JA_DOINGS), rng.choice(_JA_PERIODS)
    a, k = rng.randint(3, 40), rng.randint(2, 5)
    return (f"{who}は{periods[0]}{thing}を{a}{c}{done}。{periods[1]}はその{k}倍の数を{done}。"
            + rng.choice([f"合わせて何{c}ですか？", f"ぜんぶで何{c}になりますか？"]), f"{a}+{a}*{k}")


def _ja_each_of(rng):
    who, (thing, c, box) = rng.choice(_JA_PEOPLE), rng.choice(_JA_THINGS)
    d, e = rng.randint(2, 9), rng.randint(2, 9)
    whom = rng.choice(["友だち", "クラスの子", "近所の子ども", "いとこ", "チームの仲間"])
    if rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(10, 30)
        while a * b <= d * e:
            b += 5
        return (f"{who}は{b}{c}入りの{box}を{a}つ持っていました。{whom}{d}人に{e}{c}ずつわたしました。" + _ja_left(c, rng),
                f"{b}*{a}-{d}*{e}")
    a = rng.randint(d * e + 1, d * e + 90)
    return f"{who}は{thing}を{a}{c}持っていて、{whom}{d}人に{e}{c}ずつ配りました。" + _ja_left(c, rng), f"{a}-{d}*{e}"


# (place, what, counter, taken, question)
_JA_CAPACITY = [("ホール", "いす", "きゃく", "人がすわっています", "だれもすわっていないいすは何きゃくですか？"),
                ("教室", "つくえ", "こ", "使われています", "使われていないつくえは何こですか？"),
                ("ホテル", "部屋", "室", "予約が入っています", "予約のない部屋は何室ですか？"),
                ("花だん", "植える場所", "か所", "もう花が植えてあります", "まだ植えていない場所は何か所ですか？"),
                ("たな", "置き場所", "か所", "びんが置いてあります", "あいている置き場所は何か所ですか？")]


def _ja_capacity(rng):
    place, what, c, taken, question = rng.choice(_JA_CAPACITY)
    a, b = rng.randint(2, 12), rng.randint(10, 30)
    d = rng.randint(5, a * b - 1)
    return (f"{place}の{what}は、1列に{b}{c}ずつ{a}列あります。そのうち{d}{c}は{taken}。{question}", f"{b}*{a}-{d}")


def _ja_hours(rng):
    who = rng.choice(_JA_PEOPLE)
    periods = rng.choice([("月曜日に", "木曜日に"), ("先週", "今週"), ("午前中に", "夕方に"), ("春休みに", "夏休みに"),
                          ("きのう", "きょう")])
    p, h1, h2 = rng.randint(8, 15) * 100, rng.randint(2, 9), rng.randint(2, 9)
    job = rng.choice(["お店の手伝い", "犬の散歩", "庭の草取り", "荷物運び"])
    return (f"{who}は{job}で1時間に{p}円もらえます。{periods[0]}{h1}時間、{periods[1]}{h2}時間やりました。"
            + rng.choice(["もらえるお金は全部でいくらですか？", "合わせていくらになりますか？"]), f"{p}*{h1}+{p}*{h2}")


def _ja_pool(rng):
    n, x = rng.randint(2, 9), rng.randint(2, 20) * 100
    y = rng.randint(1, n * x // 100 - 1) * 100
    buy = rng.choice(["花たば", "ケーキ", "ボール", "ボードゲーム", "プレゼント"])
    return (f"子ども{n}人から{x}円ずつ集めて、{y}円の{buy}を買いました。"
            + rng.choice(["集めたお金は何円残っていますか？", "使わなかったお金はいくらですか？"]), f"{n}*{x}-{y}")


def _ja_proportion(rng):
    (item, c) = rng.choice(_JA_ITEMS)
    p, k, m = rng.randint(2, 30) * 10, rng.randint(2, 9), rng.randint(2, 12)
    while m == k:
        m = rng.randint(2, 12)
    return (f"{item}は{k}{c}で{p * k}円です。同じねだんで{m}{c}買うと、代金はいくらですか？", f"{p * k}/{k}*{m}")


def _ja_shop_day(rng):
    shop = rng.choice(["お店", "八百屋さん", "売店", "パン屋さん", "文房具屋さん"])
    (thing, c, _), periods = rng.choice(_JA_THINGS), rng.choice(_JA_PERIODS)
    ops = rng.choice(["--", "-+", "+-"])
    a = rng.randint(100, 400)
    nums = [rng.randint(10, min(90, a // 3)) for _ in ops]
    said = [f"{periods[i]}{x}{c}" + ("売れました" if op == "-" else "入荷しました") for i, (op, x) in enumerate(zip(ops, nums))]
    return (f"{shop}に{thing}が{a}{c}ありました。{said[0]}。{said[1]}。いま{thing}は何{c}ありますか？",
            f"{a}{ops[0]}{nums[0]}{ops[1]}{nums[1]}")


def _ja_level_two(rng):
    what, unit, up, down, question = rng.choice(_JA_LEVELS[1:])
    ops, a, b, d = _two_changes(rng)
    said = [up if op == "+" else down for op in ops]
    return f"{what}は{a}{unit}でした。まず{b}{unit}{said[0]}。そのあと{d}{unit}{said[1]}。{question}", \
        f"{a}{ops[0]}{b}{ops[1]}{d}"


_JA_TWO_STEP = [_ja_two_events, _ja_movers_two, _ja_groups_then, _ja_two_groups, _ja_change, _ja_two_prices,
                _ja_rate_then, lambda rng: _ja_periods(rng, 3), _ja_three_factors, _ja_times_as_many, _ja_each_of,
                _ja_capacity, _ja_hours, _ja_pool, _ja_proportion, _ja_shop_day, _ja_level_two]

_JA_PLANS = {"+": "2つの数を足します。", "-": "減った分を引きます。", "*": "1つ分の数といくつ分をかけます。",
             "/": "全部の数を同じ数ずつに分けます。"}
_JA_OP = {"+": "たし算", "-": "ひき算", "*": "かけ算", "/": "わり算"}


def plan_ja(expr: str) -> str:
    """Japanese `plan`: "12*3-5" -> "まずかけ算をして、次にひき算をします。" """
    return _plan(expr, _JA_PLANS, _JA_OP, "まず", "をして、次に", "をします。", "もう一度{}", "それぞれ{}")


# Counters of the existence verb いる in the stories ("168台いました"): its stem い needs the te-form to join.
_JA_BEING = re.compile(r"\d[人匹台羽頭本個枚冊]いました$")


def _ja_run_on(rng: random.Random, question: str) -> str:
    """Join some of a story's past-tense sentences into one, as written Japanese often does: the verb's
    stem and a comma (連用中止形: "55個配りました。そのあと..." -> "55個配り、そのあと..."), the te-form for
    いる, ～ている and 来る ("168台いて、", "持っていて、", "来て、"). Each boundary between two statements is joined with
    probability 1/2; the question stays its own sentence. Without this every generated story was a row of
    short sentences, and stories told in one sentence were a wording the model had never read."""
    parts = question.split("。")
    out = parts[0]
    for part in parts[1:]:
        if part and out.endswith("ました") and not part.endswith("？") and rng.random() < 0.5:
            if _JA_BEING.search(out):
                out = out[:-4] + "いて、"
            elif out.endswith(("ていました", "来ました")):
                out = out[:-3] + "て、"
            else:
                out = out[:-3] + "、"
            out += part
        else:
            out += "。" + part
    return out


def one_step_ja(rng: random.Random) -> Problem:
    question, expr = rng.choice(_JA_ONE_STEP)(rng)
    return Problem(_ja_run_on(rng, question), plan_ja(expr), expr)


def two_step_ja(rng: random.Random) -> Problem:
    question, expr = rng.choice(_JA_TWO_STEP)(rng)
    return Problem(_ja_run_on(rng, question), plan_ja(expr), expr)
