"""Generated spelling and letter-counting tasks (EN and JA) from the shipped word lists.

Words come from assets/words-en.txt.gz (Debian wamerican, lower-case ASCII words of 3-10 letters) and
assets/words-ja.txt.gz (katakana words found in the chatterbot-corpus Japanese conversations). Every
word is a train word or a test word by its hash (generated.key_split), so test words never occur in
training items.

spelling / spelling-ja (kind "generative"):
    user 'Spell the word "apple".' (or another phrasing of tasks/paraphrase.py) -> assistant parts
        text 'I will spell it with Python.', python '"-".join("apple")', python_output "a-p-p-l-e",
        text "\na-p-p-l-e"
    item["answer"] = "a-p-p-l-e"; evaluate: the completion's last line equals the answer (an optional
    "apple:" prefix and a trailing full stop are tolerated). The letters come from the tool because a
    token does not show its letters: " apple" is one or two tokens, and a small model cannot learn every
    token's spelling from a few thousand examples, but it can copy the word into the call and the tool's
    output onto the last line. Unquoted words are written as in letter-count, with their leading space:
    '"-".join(" apple".strip())'.
letter-count / letter-count-ja (kind "generative"):
    user 'How many times does "r" appear in "strawberry"?' -> assistant parts
        text 'I will count the letter "r" with Python.', python '"strawberry".count("r")', python_output "3",
        text '... 3 times ...\n#### 3'
    item["answer"] = "3"; evaluate: the number after "####" equals it. About one question in five asks
    for a letter the word does not contain (answer 0), so "always some" is not a shortcut.
    EN replies write the word as the question does: quoted ("strawberry" -> '"strawberry".count("r")') or
    not (strawberry -> '" strawberry".count("r")', the space kept inside the quotes). A BPE token carries
    the space before a word, so " strawberry" and "strawberry" are different tokens; a small model can copy
    tokens from the prompt (pretraining's copy rows) but not map one token to the other for a word it never
    saw counted.

The EN replies' opening sentence names the task and not the word, so the word is copied from the
question once, into the call (the shape of the arithmetic replies, whose opening names the operation
and whose call holds the numbers). With the word in the opening ('I will spell "apple" with Python.')
the copy came right after prose, where a small model often wrote a word it predicted instead of the
one it was asked about ("spell better" -> "I will spell good"), and naming only the task raised
held-out spelling and letter counting. The JA replies keep the word in their opening, where the same
change cost the other skills more than it gained (both measured in docs/benchmarks.md, 2026-12-05,
session 23).
"""

from __future__ import annotations

import random

from chibichat.eval.metrics import extract_final_number, final_line, numbers_equal
from chibichat.tasks.base import GeneratedTask
from chibichat.tasks.paraphrase import phrase

EN_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def load_words(lang: str) -> list[str]:
    from chibichat.tasks.shipped import read_lines_gz

    return read_lines_gz(f"words-{lang}.txt.gz")


def _as_written(word: str, question: str) -> tuple[str, str]:
    """How an EN reply writes `word`: (in its text, as the call's string literal). Quoted in the question:
    '"word"' both times; unquoted: 'word' and '" word"', the leading space kept inside the quotes so that
    the literal holds the same tokens as the question (see the module docstring)."""
    if f'"{word}"' in question:
        return f'"{word}"', f'"{word}"'
    return word, f'" {word}"'


class _WordTask(GeneratedTask):
    def __init__(self, lang: str = "en", split: str = "train", size: int | None = None, seed: int = 0):
        self.lang = lang
        super().__init__(split, size, seed)
        self.words = load_words(lang)


class Spelling(_WordTask):
    kind = "generative"
    default_size = {"train": 2000, "test": 200}
    description = "spell a word letter by letter with a python \"-\".join call"

    def __init__(self, lang: str = "en", split: str = "train", size: int | None = None, seed: int = 0):
        self.name = "spelling" if lang == "en" else "spelling-ja"
        super().__init__(lang, split, size, seed)

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        word = rng.choice(self.words)
        spelled = "-".join(word)
        question = phrase(rng, self.lang, "spelling", word=word)
        if self.lang == "en":
            quoted = _as_written(word, question)[1]
            call = f'"-".join({quoted})' if quoted == f'"{word}"' else f'"-".join({quoted}.strip())'
            lead = "I will spell it with Python."
        else:
            call, lead = f'"-".join("{word}")', f"Pythonで「{word}」を一文字ずつ区切ります。"
        # The last line is the tool's output again: the answer is read from the reply's final line.
        parts = [{"type": "text", "text": lead}, {"type": "python", "text": call},
                 {"type": "python_output", "text": spelled}, {"type": "text", "text": "\n" + spelled}]
        item = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "word": word, "answer": spelled}
        return word, item

    def evaluate(self, item: dict, completion_text: str) -> bool:
        line = final_line(completion_text)
        word = item["word"]
        for prefix in (f"{word}:", f"{word}："):
            if line.startswith(prefix):
                line = line[len(prefix):].strip()
        return line == item["answer"]


class LetterCount(_WordTask):
    kind = "generative"
    default_size = {"train": 2000, "test": 200}
    description = "count a letter in a word with a python str.count call, answer '#### n'"

    def __init__(self, lang: str = "en", split: str = "train", size: int | None = None, seed: int = 0):
        self.name = "letter-count" if lang == "en" else "letter-count-ja"
        super().__init__(lang, split, size, seed)

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        word = rng.choice(self.words)
        if rng.random() < 0.2:
            pool = EN_ALPHABET if self.lang == "en" else "".join(sorted({c for w in self.words for c in w}))
            absent = [c for c in pool if c not in word]
            letter = rng.choice(absent)
        else:
            letter = rng.choice(word)
        n = word.count(letter)
        question = phrase(rng, self.lang, "letter-count", word=word, letter=letter)
        call = f'"{word}".count("{letter}")'
        if self.lang == "en":
            # The reply writes the word as the question does, so that copying it is copying its tokens:
            # unquoted, " bliss" is the tokens " bl|iss" and quoted it is "bl|iss"; in the call it keeps
            # its space inside the quotes (" bliss".count("s") counts the same), see module docstring.
            shown, quoted = _as_written(word, question)
            call = f'{quoted}.count("{letter}")'
            lead = f'I will count the letter "{letter}" with Python.'
            times = "time" if n == 1 else "times"
            final = f'The letter "{letter}" appears {n} {times} in {shown}.\n#### {n}'
        else:
            lead = f"Pythonで「{word}」の中の「{letter}」を数えます。"
            final = f"「{letter}」は「{word}」に{n}回出てきます。\n#### {n}"
        parts = [{"type": "text", "text": lead}, {"type": "python", "text": call},
                 {"type": "python_output", "text": str(n)}, {"type": "text", "text": final}]
        item = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "word": word, "letter": letter, "answer": str(n)}
        # The key is the word: a test word is never counted (or spelled) in training.
        return word, item

    def evaluate(self, item: dict, completion_text: str) -> bool:
        return numbers_equal(extract_final_number(completion_text), item["answer"])
