"""Paraphrase generators for the synthetic chat data: every skill's user prompt is drawn from many
phrasings (EN and JA) instead of one template, so a small model learns the skill, not one sentence.

A phrasing is a `str.format` template with named slots ({word}, {letter}, {x}, ...). Each skill's
phrasings are the products of small part lists (an opener, a request, a closing), expanded in a fixed
order by `phrasings(lang, skill)`; `phrase(rng, lang, skill, **slots)` draws one and fills it in, and
types CASUAL_SHARE of them casually (`casual`: "what is 12 times 7", as people type into a chat box; so
are the identity questions and the word problems).

Skills and their slots:
    spelling        {word}              spell a word
    letter-count    {word}, {letter}    count a letter in a word
    identity        -                   ask the assistant's name / who it is
    greeting        -                   greet the assistant
    refusal         -                   ask for a fact the assistant cannot know (the user's private
                                        life, the future); answered with REFUSAL_ANSWERS
    arithmetic      {x}                 a bare calculation; {x} is an expression in words from
                                        `expression(rng, lang, op, a, b)`
    arithmetic-command {c}              a bare calculation asked with an operation verb; {c} from
                                        `command(rng, lang, op, a, b)` ("subtract 17 from 60")

The held-out skills prompts (assets/skills-<lang>.jsonl) are worded differently on purpose:
tests/test_skills.py compares every phrasing here with the phrasing of every held-out prompt (slot
values replaced by a marker) and fails on equal or near-equal pairs. A phrasing added here must keep
that test passing; when it fails, reword the new phrasing, never the held-out prompt.
"""

from __future__ import annotations

import itertools
import random

from chibichat.common import ChibiError

# (lang, skill) -> groups; a group is a tuple of part lists whose product (parts joined as they are)
# gives phrasings. EN phrasings get an upper-case first letter.
_EN_OPENERS = ["", "hey, ", "quick question: ", "so, ", "excuse me, "]
_JA_OPENERS = ["", "ねえ、", "ちょっと聞きたいんだけど、", "すみません、"]

_PARTS: dict[tuple[str, str], list[tuple[list[str], ...]]] = {
    ("en", "spelling"): [
        (["", "please ", "now ", "ok, "],
         ["spell {word}", "spell the word {word}", 'spell "{word}"', "write {word} letter by letter",
          'spell "{word}" letter by letter', "spell {word} with dashes between the letters",
          "show me how {word} is spelled"],
         [".", "!"]),
        (["can you ", "could you please ", "would you "],
         ["spell {word}", "spell the word {word}", 'spell "{word}"', "write {word} letter by letter"],
         ["?"]),
        (["", "hey, ", "sorry, "],
         ["how do you spell {word}?", "how is {word} spelled?", "how do I spell {word}?",
          "what is the spelling of {word}?", 'what is the correct spelling of "{word}"?'],),
        # Asked with "letters" but not "how many": the spelling, not a count (the letter-count phrasings
        # ask how many or say count).
        (["", "please "],
         ["list the letters of {word}", "write out each letter of {word}", "split {word} into single letters",
          "name the letters in {word} in order", 'split "{word}" into letters', 'list each letter of "{word}"'],
         [".", " with dashes."]),
        # The word in the middle of the request, after a verb other than "spell" or a phrasal verb: the reply
        # must copy the word, not the words around it ("spell out clear" is "clear", not "out clear").
        (["", "now ", "ok, "],
         ["spell out {word}", "type {word} one letter at a time", "take {word} apart into letters",
          "show {word} letter by letter", "write out {word} in single letters", "spell out the word {word}"],
         [".", "!"]),
        (["", "so, "],
         ["which letters are in {word}, in order?", "what are the letters of {word}?",
          'what letters does "{word}" have, one by one?', "how is the word {word} written, letter by letter?"],),
        # The word with other words after it, after verbs that are not "spell": the reply copies the word alone.
        (["", "please "],
         ["spell {word} ", "write {word} ", "show me {word} "],
         ["for me.", "one letter at a time.", "and put dashes between the letters.", "as single letters."]),
        (["could you ", "can you "],
         ["cut {word} into letters", "turn {word} into single letters", "split the word {word} up"],
         ["?", " for me?"]),
    ],
    ("ja", "spelling"): [
        (["", "ねえ、"],
         ["「{word}」", "{word}"],
         ["を一文字ずつ区切って書いてください。", "を一文字ずつ書いて。", "を一文字ずつ区切ってください。",
          "のつづりを一文字ずつ書いてください。", "を一文字ずつハイフンでつないで書いて。", "のつづりを教えてください。",
          "を一文字ずつに分解して。", "を文字に区切って書いてくれる？"]),
        (["", "ねえ、"],
         ["「{word}」", "{word}"],
         ["に使われている文字を順に書いて。", "の文字を全部、順番に並べて。", "を1文字ずつ分けて見せて。"]),
    ],
    ("en", "letter-count"): [
        (_EN_OPENERS,
         ['how many times does the letter "{letter}" appear in "{word}"?',
          "how many times does the letter {letter} appear in {word}?", "how many {letter}'s are in the word {word}?",
          "how many {letter}'s are there in {word}?", 'how many "{letter}" are in "{word}"?',
          "how many times is {letter} used in {word}?", "what is the count of {letter} in the word {word}?",
          'how many copies of "{letter}" does "{word}" have?']),
        (["", "so, "],
         ["how often does {letter} appear in {word}?", 'how often does the letter "{letter}" show up in "{word}"?',
          "in {word}, how many times can you find {letter}?", "how frequently does {letter} occur in the word {word}?"]),
        (["", "please "],
         ['count the letter "{letter}" in "{word}"', "count the letter {letter} in the word {word}",
          "count how many {letter}'s {word} has", "find how many times {letter} shows up in {word}"],
         [".", " for me.", " with Python."]),
        # The word before a verb or a noun after it ("... does {word} have?", "... does the word {word} include?"), and the
        # letter named as a "character": the reply must copy the one word asked about, not its neighbours.
        (["", "so, ", "hey, "],
         ["how many {letter}'s does {word} have?", "how many times does {letter} occur in {word}?",
          "how many {letter} characters are in {word}?", "what is the number of {letter}'s in {word}?",
          "does {word} have any {letter}'s? How many?",
          "how many {letter}'s does the word {word} include?", "how many times is the letter {letter} found in {word}?"]),
        (["", "now "],
         ["give me the count of {letter} in {word}", "work out how many {letter}'s are in {word}",
          "check how often {letter} shows up in the word {word}"],
         [".", ", please."]),
        # The word with other words after it, in every position a question puts it: the reply's call holds the
        # word alone (" bliss contain".count("s") was the miss of a model that had seen only "have" and "include"
        # after the word).
        (["", "so, "],
         ["how many {letter}'s does {word} ", "how many copies of {letter} does {word} "],
         ["hold?", "carry?", "use?", "show?", "have in it?", "have altogether?"]),
        (["", "please "],
         ["count the {letter}'s in {word} ", "find the {letter}'s in {word} "],
         ["and tell me how many.", "and give me the number.", "one by one."]),
        (["", "hey, "],
         ["is the letter {letter} in {word}", "does {word} use the letter {letter}"],
         ["? How many times?", ", and how often?"]),
    ],
    ("ja", "letter-count"): [
        (["", "ねえ、"],
         ["「{word}」に「{letter}」は何回出てきますか？", "「{word}」の中に「{letter}」はいくつありますか？",
          "{word}に含まれる「{letter}」の数を数えてください。", "「{word}」に「{letter}」は何個ありますか？",
          "「{word}」の「{letter}」の個数を教えてください。", "{word}という単語に{letter}は何回使われていますか？",
          "「{letter}」は「{word}」に何回登場しますか？", "「{word}」で「{letter}」を数えるといくつ？"]),
    ],
    ("en", "identity"): [
        (_EN_OPENERS,
         ["what is your name?", "who are you?", "what should I call you?", "what are you?", "introduce yourself.",
          "tell me about yourself.", "do you have a name?", "what are you called?", "tell me your name.",
          "how should I address you?", "who exactly are you?", "what name were you given?"]),
        (["", "so, ", "by the way, "],
         ["what is the name of this assistant?", "what is the name you use?", "what is the name of the bot I am using?",
          "tell me the name of this assistant.", "tell me the name you use.", "tell me the name of the bot I am using."]),
        (["", "hello, ", "hi, "],
         ["who am I chatting with?", "who is this?", "which model are you?", "what kind of assistant are you?",
          "are you a bot? What is your name?", "is this a bot? Who are you?", "what is this chatbot?"]),
        (["could you ", "can you ", "would you "],
         ["introduce yourself", "say what your name is", "tell me what I should call you"],
         ["?", ", please?"]),
        # Requests without a question ("..., please."), the one answering named from outside ("who is writing
        # these replies?"), and the assistant's name asked in the passive ("what is this bot called?").
        (["", "ok, ", "now "],
         ["state your name", "share your name with me", "describe yourself", "let me know your name",
          "write your name", "introduce yourself briefly"],
         [".", ", please.", " in a few words."]),
        (["", "hi, ", "just wondering, "],
         ["who is writing these replies?", "who is on the other side of this chat?", "who is chatting with me?",
          "what is this bot called?", "how is this assistant named?", "what is the chat model here called?",
          "which program is answering my messages?", "who is the assistant in this chat?"]),
    ],
    ("ja", "identity"): [
        (_JA_OPENERS,
         ["あなたの名前は何ですか？", "あなたは誰ですか？", "何と呼べばいいですか？", "自己紹介してください。",
          "あなたについて教えて。", "名前はあるの？", "あなたはどなたですか？", "あなたのことを何て呼んだらいい？",
          "お名前は何といいますか？"]),
        # As in EN: the assistant or bot named in the third person, who-is-this forms, polite requests.
        (["", "ところで、", "ちなみに、"],
         ["このボットの呼び方を教えて。", "このAIアシスタントは何と呼ばれていますか？", "使っているアシスタントの名前を知りたいです。",
          "あなたのお名前、教えてもらえる？", "このアプリで答えているAIの名前は？"]),
        (["", "こんにちは、", "やあ、"],
         ["あなたはどんなアシスタントですか？", "あなたはどのモデルですか？", "これはボット？名前は何？", "あなたはAIですか？名前を教えて。"]),
        (["", "よければ、"],
         ["自己紹介をお願いできますか？", "あなたの名前を教えてもらえますか？", "何とお呼びすればいいでしょうか？"]),
    ],
    ("en", "greeting"): [
        (["hi", "hello", "hey", "hi there", "hello there", "good morning", "good evening", "hey hey", "howdy", "hiya",
          "heya", "greetings", "good afternoon", "good day", "yo"],
         ["!", ".", ", how are you?", ", nice to meet you.", "! How's it going?", ", are you around?"]),
        # Greetings with a body: a wish or news after the hello is still a greeting, not a question.
        (["hi", "hello", "hey", "hi there", "hello there", "good morning", "good evening", "morning", "afternoon",
          "howdy", "hiya"],
         [", how is your day going?", "! Long time no see.", ", I'm back.", ", hope you are doing well.",
          ", what's new?", "! Nice to talk to you again.", ", good to be here."]),
        # ... or a name for the assistant after it.
        (["hi", "hello", "hey", "howdy", "greetings", "good day", "hiya"],
         [" buddy", ", my friend", " there, assistant", ", little bot", " to you", ", chat model"],
         ["!", "."]),
    ],
    ("ja", "greeting"): [
        (["こんにちは", "はじめまして", "おはよう", "やあ", "こんにちは、はじめまして"],
         ["！", "。", "、お元気ですか？", "、調子はどう？", "、話しかけてもいい？", "、いい天気ですね。"]),
        (["こんにちは", "おはよう", "こんばんは", "やあ"],
         ["、きょうはいい日だね。", "、ひさしぶり！", "、また来たよ。", "、元気にしてた？", "！少し話そうよ。"]),
    ],
    ("en", "refusal"): [
        (["", "quick question: ", "be honest, ", "you must know this: "],
         ["where did I leave my keys?", "what is my favourite colour?", "what did I dream about last night?",
          "how old is my grandmother?", "what does my neighbour do for a living?", "what did I do last weekend?",
          "what is in my pocket right now?", "which city does my best friend live in?",
          "who will win the next election?", "what will I have for dinner tomorrow?",
          "will it rain in my city tomorrow?", "which song will be the most popular next year?"]),
        (["do you know ", "can you tell me ", "could you guess "],
         ["where I left my keys", "my favourite colour", "what I dreamt about last night", "how old my grandmother is",
          "what my neighbour does for a living", "who will win the next election", "what I will have for dinner tomorrow",
          "whether it will rain in my city tomorrow"],
         ["?"]),
        # The user's own private facts: a question about "my ..." that only the user can answer.
        (["", "tell me, ", "guess: "],
         ["what is my "],
         ["brother's name", "home address", "cat's name", "shoe size", "teacher's favourite food", "middle name",
          "boss's birthday", "PIN code", "mother's job"],
         ["?"]),
        (["", "quick question: "],
         ["how many books do I own?", "how tall is my father?", "what time did I wake up today?",
          "where did my brother go on holiday?", "what did my friend say to me yesterday?",
          "what is the name of my street?", "which school did my cousin go to?"]),
        # Things only the user's head or accounts hold, facts about "the X of my Y", and other futures.
        (["", "be honest, ", "tell me, "],
         ["what is the name of my first pet?", "what is the colour of my front door?", "what word am I picturing?",
          "which card did I just pick?", "what is the code that unlocks my phone?", "how much did I pay for my bike?",
          "how many messages are waiting in my inbox?", "what are next week's lottery numbers?",
          "which team will lift the cup this year?", "what will a loaf of bread cost next month?",
          "what is the age of my neighbour's dog?", "how much do I have in my wallet?"]),
    ],
    ("ja", "refusal"): [
        (["", "ねえ、", "当ててみて。", "教えてください。"],
         ["私の好きな色は何ですか？", "昨日の夜、私はどんな夢を見ましたか？", "私のおばあちゃんは何歳ですか？",
          "いま私のポケットには何が入っていますか？", "私の親友はどこに住んでいますか？", "私はかぎをどこに置きましたか？",
          "先週末、私は何をしていましたか？", "次の選挙で勝つのは誰ですか？", "明日の私の夕ごはんは何ですか？",
          "明日、私の町で雨はふりますか？", "来年いちばんはやる歌は何ですか？"]),
        # The user's own private facts (as in EN).
        (["", "ねえ、"],
         ["私の家の住所", "私のねこの年", "私のくつのサイズ", "私の先生の好きな食べ物", "私の母の仕事", "私の上司の誕生日"],
         ["を知っていますか？", "を当てて。"]),
        (["", "ねえ、"],
         ["私は本を何さつ持っていますか？", "私の父の身長は何センチ？", "私はけさ何時に起きた？",
          "兄は休みにどこへ行ったと思う？", "きのう友だちは私に何と言った？"]),
    ],
    ("en", "arithmetic"): [
        (["", "please "],
         ["calculate {x}", "work out {x}", "find {x}", "tell me the result of {x}", "give me the answer to {x}",
          "solve {x}", "do the math: {x}"],
         [".", "!"]),
        (["can you ", "could you "], ["work out {x}", "calculate {x}", "find {x} for me"], ["?"]),
        (["", "quick sum: "], ["{x} equals what?", "{x} is how much?", "{x} makes how many?"]),
    ],
    # A bare calculation asked with an operation verb; {c} is a command from `command(rng, lang, op, a, b)`
    # ("subtract 17 from 60"). The phrasings are longer than a bare command so that none equals a held-out
    # prompt ("Multiply 9 by 8." is one).
    ("en", "arithmetic-command"): [
        (["", "hey, ", "now "],
         ["{c} and tell me the result.", "{c} and give me the answer.", "I need you to {c}.", "help me {c} on the calculator.",
          "use the calculator to {c}.", "{c}, then say what comes out."]),
        (["can you ", "would you "], ["{c} and tell me the result?", "{c} with the calculator?"]),
    ],
    ("ja", "arithmetic-command"): [
        (["", "ねえ、", "電卓で"],
         ["{c}みて。", "{c}、答えを教えて。", "{c}、いくつになるか教えて。", "{c}もらえますか？", "{c}、結果をお願い。",
          "{c}答えを出して。"]),
    ],
    ("ja", "arithmetic"): [
        (["", "ねえ、"],
         ["{x}の答えを教えてください。", "{x}を求めてください。", "{x}は何になりますか？", "{x}の計算をお願いします。",
          "{x}の値を出して。", "{x}の結果を教えて。", "{x}を電卓で求めて。", "{x}の答えは何ですか？"]),
    ],
}

# The words for a bare calculation's {x} slot, by operator ("+", "-", "*", "/").
_EXPRESSIONS = {
    "en": {"+": ["{a} plus {b}", "{a} + {b}", "the sum of {a} and {b}", "{a} and {b} added together"],
           "-": ["{a} minus {b}", "{a} - {b}", "{a} take away {b}", "the difference between {a} and {b}"],
           "*": ["{a} times {b}", "{a} x {b}", "{a} * {b}", "{a} multiplied by {b}", "the product of {a} and {b}"],
           "/": ["{a} divided by {b}", "{a} / {b}", "{a} shared equally among {b}"]},
    "ja": {"+": ["{a}たす{b}", "{a}+{b}", "{a}と{b}の和"],
           "-": ["{a}ひく{b}", "{a}-{b}", "{a}と{b}の差"],
           "*": ["{a}かける{b}", "{a}×{b}", "{a}と{b}の積"],
           "/": ["{a}わる{b}", "{a}÷{b}"]},
}

# The operation verbs of an "arithmetic-command" phrasing's {c}, by operator: "{a} op {b}" is the calculation
# whatever order the words name them in ("subtract {b} from {a}" is a-b). JA: te-forms ("{a}から{b}を引いて").
_COMMANDS = {
    "en": {"+": ["add {b} to {a}", "add {a} and {b}", "add up {a} and {b}"],
           "-": ["subtract {b} from {a}", "take {b} away from {a}", "deduct {b} from {a}"],
           "*": ["multiply {a} by {b}", "multiply {a} and {b}"],
           "/": ["divide {a} by {b}", "split {a} into {b} equal parts"]},
    "ja": {"+": ["{a}に{b}を足して", "{a}と{b}を合わせて"],
           "-": ["{a}から{b}を引いて", "{a}から{b}を取って"],
           "*": ["{a}に{b}をかけて", "{a}と{b}をかけ合わせて"],
           "/": ["{a}を{b}で割って", "{a}を{b}等分して"]},
}

# Honest replies to a question about what the assistant cannot know: say so, invent nothing (no number).
REFUSAL_ANSWERS = {
    "en": ["I don't know. I cannot see your life, so I have no way to know that.",
           "I'm sorry, I can't know that: I only see this conversation.",
           "I don't know, and I won't make something up. I have no access to that information.",
           "I cannot predict the future or see your private life, so I don't know."],
    "ja": ["わかりません。あなたの生活は私には見えないので、知ることができません。",
           "ごめんなさい、それは私にはわかりません。この会話しか見えないからです。",
           "わかりません。作り話はしたくありません。その情報は私には見られません。",
           "未来のことやあなたの私生活は、私には予測できません。わかりません。"],
}
GREETING_REPLIES = {
    "en": ["Hello!", "Hi! How can I help?", "Hello, nice to meet you!", "Hi there! What can I do for you?",
           "Hello! What would you like to talk about?", "Hey! How can I help you today?"],
    "ja": ["こんにちは！", "こんにちは。何かお手伝いしましょうか？", "はじめまして！", "こんにちは！今日は何を話しましょうか？",
           "やあ、こんにちは！何でも聞いてください。"],
}

SKILLS = ("spelling", "letter-count", "identity", "greeting", "refusal", "arithmetic", "arithmetic-command")


def _check(lang: str, skill: str) -> None:
    if (lang, skill) not in _PARTS:
        raise ChibiError(f"no paraphrases for skill {skill!r} in language {lang!r}; skills: {SKILLS}, "
                         "languages: en, ja")


def phrasings(lang: str, skill: str) -> list[str]:
    """Every phrasing of `skill` in `lang`, unfilled, in a fixed order (no duplicates)."""
    _check(lang, skill)
    out: dict[str, None] = {}  # (a dict: ordered, and a membership test that does not scan; called per generated item)
    for group in _PARTS[lang, skill]:
        for parts in itertools.product(*group):
            text = "".join(parts)
            if lang == "en":
                text = text[:1].upper() + text[1:]
            out.setdefault(text)
    return list(out)


# Of the prompts: typed casually, as people type into a chat box ("what is 12 times 7", "いま何時ですか"): in
# English the first letter in lower case and the closing "?" or "." left off, in Japanese the closing "？"
# or "。". Every phrasing is written properly, so without these a model meets its first casual prompt at
# chat time.
CASUAL_SHARE = 0.15


def casual_form(text: str, lang: str = "en") -> str:
    """`text` typed casually: "What is 12 times 7?" -> "what is 12 times 7" ("I ..." keeps its capital);
    Japanese has no capitals and loses its closing mark: "いま何時ですか？" -> "いま何時ですか"."""
    if lang == "ja":
        return text[:-1] if text[-1:] in ("？", "。", "?") else text
    text = text if text.startswith("I ") else text[:1].lower() + text[1:]
    return text[:-1] if text[-1:] in ("?", ".") else text


def casual(rng: random.Random, lang: str, text: str) -> str:
    """`text`, or with probability CASUAL_SHARE its casual form."""
    return casual_form(text, lang) if rng.random() < CASUAL_SHARE else text


def phrase(rng: random.Random, lang: str, skill: str, **slots) -> str:
    """One phrasing of `skill` drawn with rng, its slots filled from `slots` (an English prompt that
    opens with a slot, e.g. "{x} equals what?", still starts with a capital letter), sometimes typed
    casually (see `casual`)."""
    text = rng.choice(phrasings(lang, skill)).format(**slots)
    return casual(rng, lang, text[:1].upper() + text[1:] if lang == "en" else text)


def _wordings(table: dict, what: str, lang: str, op: str) -> list[str]:
    if lang not in table or op not in table[lang]:
        raise ChibiError(f"no {what} for operator {op!r} in language {lang!r}; operators: + - * /")
    return list(table[lang][op])


def expressions(lang: str, op: str) -> list[str]:
    """Every wording of `{a} op {b}` in `lang` (slots {a}, {b})."""
    return _wordings(_EXPRESSIONS, "wording", lang, op)


def expression(rng: random.Random, lang: str, op: str, a: int, b: int) -> str:
    return rng.choice(expressions(lang, op)).format(a=a, b=b)


def commands(lang: str, op: str) -> list[str]:
    """Every operation-verb wording of `{a} op {b}` in `lang` (slots {a}, {b})."""
    return _wordings(_COMMANDS, "command wording", lang, op)


def command(rng: random.Random, lang: str, op: str, a: int, b: int) -> str:
    return rng.choice(commands(lang, op)).format(a=a, b=b)
