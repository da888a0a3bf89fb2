"""Generated open-writing task (EN): a sentence of the shipped corpus on the topic the user names.

topic-sentence (kind "conversation", training only):
    user "Make up a sentence that mentions house." (one of PHRASINGS)
    -> assistant "I will walk within my house with a perfect heart." (a sentence of the corpus)
The reply is a sentence of the embedded-en corpus's *train* documents (so no validation text leaks into
chat data) that uses the topic word, one of TOPICS (everyday concrete nouns, singular or plural as the
sentence has it). Sentences are 6-20 words of plain prose: a capital first letter, letters, spaces and
, ; ' - only (none doubled: ";;" is a corpus artifact), and a final . ! or ?; a sentence cut at an abbreviation ("Mr.") is never taken.

Why: every other shipped chat task has a fixed kind of answer (a name, a number, letters, a canned
refusal), so a small model answered "Write one sentence about the sea." with one of those (`eval skills`
open prompts: 0 of 8 replies on topic). This task is the only one whose answer is free prose about the
asked topic. The held-out open prompts are worded unlike PHRASINGS (tests/test_skills.py checks it).
Measured on the quickstart's d4 (docs/benchmarks.md, 2026-12-03) it made those replies prose but not yet
on topic, so it is not in the default mixtures (tasks/describe.py is): name it with `--mix ...,topic-sentence=1`.
Each item is keyed by its sentence, so train and test items never share a sentence.
"""

from __future__ import annotations

import random
import re

from chibichat.common import ChibiError
from chibichat.tasks.base import GeneratedTask

# No topic is a word of a held-out open prompt's topic (sea, moon, rain, dog, park, trees, food, ...; as in
# tasks/describe.py, tests/test_sentences.py checks it): a reply to a held-out prompt is on topic only by
# carrying the prompt's own topic, not by recalling a sentence this task taught for that word.
TOPICS = (
    "animal baby bed book bridge brother car child children city coat coffee cow door eyes farm father field "
    "fire friend friends garden girl glass hair hand hat hill home horse horses house ice island king lake lamp "
    "letter meat milk money morning mother mountain music paper people river road rock room rose school shoes "
    "shop sister snow soldier song stone street summer sun table tea teacher town village wall weather wind "
    "window wine winter"
).split()

# Openers x requests x closings; {topic} is the slot. Worded unlike the held-out open prompts ("Write one
# sentence about the sea."): they ask for the word to be used, not for a description or a story.
PHRASINGS = [opener + request + end
             for opener in ("", "please ", "ok, ", "hey, ")
             for request in ("use the word {topic} in a sentence", "give me a sentence with the word {topic}",
                             "make up a sentence that mentions {topic}", "say a sentence in which {topic} appears",
                             "put {topic} into a sentence", "show me {topic} used in a sentence",
                             "compose one line on the subject of {topic}", "write an example sentence for {topic}")
             for end in (".", "!")]

_ABBREVIATIONS = ("Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "Gen.", "Col.", "Lt.", "Capt.", "Sen.", "Rep.",
                  "Gov.", "Prof.", "No.", "Co.", "Inc.", "Mt.", "vs.", "etc.")
_SENTENCE = re.compile(r"[A-Z][^.!?]*[.!?]")
# a doubled mark (";;", ",,", "--", "''") is a corpus artifact, not prose
_PLAIN = re.compile(r"(?!.*([,;'\-])\1)[A-Z][A-Za-z ,;'\-]*[a-z][.!?]")
_WORD = re.compile(r"[a-z]+")
_INITIAL = re.compile(r"\b([A-Z])\. ")


def corpus_sentences(documents) -> list[str]:
    """Plain sentences of 6-20 words from `documents` (see the module docstring), in document order."""
    out = []
    for doc in documents:
        text = " ".join(doc.split())
        for abbr in _ABBREVIATIONS:  # a sentence may not end at an abbreviation: mark them so none matches
            text = text.replace(abbr + " ", abbr[:-1] + "\x00 ")
        text = _INITIAL.sub("\\1\x00 ", text)  # nor at an initial ("J. Ford")
        for s in _SENTENCE.findall(text):
            if 6 <= len(s.split()) <= 20 and _PLAIN.fullmatch(s):
                out.append(s)
    return out


_TOPIC_SET = frozenset(TOPICS)


class TopicSentence(GeneratedTask):
    name = "topic-sentence"
    kind = "conversation"
    default_size = {"train": 2000, "test": 200}
    description = "a corpus sentence using the word the user names (open writing on a topic)"

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0):
        super().__init__(split, size, seed)
        from chibichat.common import Home
        from chibichat.data.corpora import get_corpus

        # The corpus's train documents whatever this task's split: the item split (by sentence) keeps
        # train and test items apart, and the corpus's validation text stays out of every task.
        sentences = corpus_sentences(get_corpus("embedded-en").iter_documents("train", Home.resolve(None)))
        # topic -> its sentences: items draw the topic first, so "people" (in 1 sentence of 8) does not
        # crowd out "moon" or "cat"; a topic the corpus never uses in a plain sentence is left out.
        self.by_topic: dict[str, list[str]] = {}
        for s in sentences:
            for w in sorted(_TOPIC_SET & set(_WORD.findall(s.lower()))):
                self.by_topic.setdefault(w, []).append(s)
        self.topics = sorted(self.by_topic)
        if not self.topics:
            raise ChibiError("topic-sentence: the embedded-en corpus gave no usable sentence; reinstall chibichat")

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        topic = rng.choice(self.topics)
        sentence = rng.choice(self.by_topic[topic])
        question = rng.choice(PHRASINGS).format(topic=topic)
        item = {"messages": [{"role": "user", "content": question[:1].upper() + question[1:]},
                             {"role": "assistant", "content": sentence}], "topic": topic}
        return sentence, item
