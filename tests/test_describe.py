"""The describe task: simple on-topic sentences and two-line stories, kept apart from the held-out open prompts."""

import re

import pytest

from chibichat.tasks import describe as D
from chibichat.tasks import skills as S
from chibichat.tasks.base import key_split
from chibichat.tasks.registry import get_task


def heldout_topic_words(lang: str) -> list[list[str]]:
    return [it["topic"] for it in S.load_items(lang) if it["skill"] == S.OPEN]


def all_frames(lang: str) -> list[str]:
    if lang == "en":
        return [f for table in (D.EN_SENTENCES, D.EN_STORIES) for frames in table.values() for pair in frames
                for f in pair]
    return [f for table in (D.JA_SENTENCES, D.JA_STORIES) for frames in table.values() for f in frames]


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_no_topic_and_no_frame_word_is_a_heldout_topic_word(lang):
    """A reply to a held-out open prompt can be on topic only by carrying the prompt's own topic: the task
    never writes about a held-out subject, and its fixed wording uses none of their topic words."""
    nouns = ([t.noun for t in D.en_topics()] + [t.plural for t in D.en_topics() if t.plural]) if lang == "en" \
        else list(D.JA_TOPICS)
    adjectives = [a for t in D.en_topics() for a in t.adjectives] if lang == "en" else \
        [a for adjs in D.JA_ADJECTIVES.values() for a in adjs]
    for topic in heldout_topic_words(lang):
        for word in nouns + adjectives:
            assert not S.on_topic(word, topic, lang), (word, topic)
        for frame in all_frames(lang):
            assert not S.on_topic(frame.format(T="", t="", v="いました ありました"), topic, lang), (frame, topic)


@pytest.mark.parametrize("name,lang", [("describe", "en"), ("describe-ja", "ja")])
def test_items_carry_their_topic_into_the_reply(name, lang):
    task = get_task(name, split="train", size=300)
    stories = 0
    for i in range(len(task)):
        item = task[i]
        question, reply = item["messages"][0]["content"], item["messages"][1]["content"]
        topic = item["topic"]
        assert topic in question
        assert topic in reply or (topic[:1].upper() + topic[1:]) in reply
        assert reply.count("\n") == (1 if item["story"] else 0)
        stories += item["story"]
        assert "{" not in reply and "{" not in question
        assert key_split(item["key"]) == "train"
    assert 60 < stories < 180  # both forms are taught


def test_english_agreement_and_articles():
    rng_items = get_task("describe", split="train", size=400)
    for i in range(len(rng_items)):
        item = rng_items[i]
        reply = item["messages"][1]["content"]
        topic = item["topic"]
        assert not topic.startswith("a ") or topic[2] not in "aeiou", topic  # "an owl", never "a owl"
        if item["kind"] in ("sky", "weather", "time"):
            assert not topic.startswith("my "), topic  # not "my sunset"
        if item["kind"] == "time" and item["story"]:
            assert not reply.startswith(("One day I saw", "Once upon a time")), reply  # a birthday is not "seen"
        first = reply.split("\n")[0]
        if first.startswith(topic[:1].upper() + topic[1:] + " "):
            verb = first[len(topic) + 1:].split()[0]
            plural = item["topic"].split()[-1] in {t.plural for t in D.en_topics() if t.plural and t.plural != t.noun}
            if verb in ("is", "are"):
                assert verb == ("are" if plural else "is"), (topic, reply)


def test_english_asks_read_as_english():
    # "Please I'd like one line on a kite." and "Please what can you say about snow in a few words?" are not
    for ask in D.ASKS["en"]["sentence"] + D.ASKS["en"]["story"]:
        words = ask.split()
        assert not (words[0] == "please" and words[1] in ("I'd", "what")), ask
        first = next(w for w in words if w not in ("please", "hey,", "ok,"))
        assert ask.endswith("?") == (first in ("could", "what")), ask


@pytest.mark.parametrize("name", ["describe", "describe-ja"])
def test_train_and_test_topics_are_disjoint_and_items_deterministic(name):
    train = get_task(name, split="train", size=200)
    test = get_task(name, split="test", size=50)
    assert {train[i]["key"] for i in range(200)}.isdisjoint({test[i]["key"] for i in range(50)})
    assert get_task(name, split="train", size=5, seed=3)[4] == get_task(name, split="train", size=5, seed=3)[4]


def test_english_replies_fit_their_topic():
    task = get_task("describe", split="train", size=2000, seed=1)
    singular = {form: t.noun for t in D.en_topics() for form in (t.noun, t.plural) if form}  # "cherries" -> "cherry"
    days = 0
    for i in range(len(task)):
        item = task[i]
        reply, topic = item["messages"][1]["content"], item["topic"]
        noun = singular[topic.split()[-1]]
        assert not ("My mother made" in reply and noun in D.EN_NOT_MADE), reply  # "made lemons"
        if "the best day of the year" in reply:
            days += 1
            assert noun in D.EN_DAYS, reply  # "Winter came ... the best day of the year"
        assert not ("new" in topic.split() and ("It was old" in reply or "They were old" in reply)), reply
        assert not re.search(r"there (was|were) (my|the) ", reply), reply  # "Once upon a time there was my duck."
        assert not ("sunshine" in topic and "stay inside" in reply), reply
        assert not ("homemade" in topic.split() and noun in D.EN_NOT_MADE), topic  # "homemade honey"
    assert days > 0


def test_japanese_replies_fit_their_topic():
    task = get_task("describe-ja", split="train", size=2000, seed=1)
    generic_time = 0
    for i in range(len(task)):
        item = task[i]
        reply, kind, topic = item["messages"][1]["content"], item["kind"], item["topic"]
        if kind == "animal":
            assert "がありました" not in reply, reply  # むかしむかし、りすがいました
        if item["story"] and kind in ("time", "weather"):
            assert not reply.startswith(("ある日、", "むかしむかし、")), reply  # "ある日、休みの日を見つけました。"
            generic_time += reply.startswith(f"{topic}、") or reply.startswith("夕方、")
        assert not (reply.startswith("母が誕生日に") and any(topic.endswith(n) for n in D.JA_NOT_MADE)), reply
        assert not (topic.startswith("新しい") and "古かった" in reply), reply  # a new blanket found old
        assert not (topic.startswith("手作りの") and topic.removeprefix("手作りの") in D.JA_NOT_MADE), topic
    assert generic_time > 0
    assert any(it["kind"] == "animal" and "がいました" in it["messages"][1]["content"]
               for it in (task[i] for i in range(len(task))))


def test_english_topics_are_many_and_every_kind_has_its_frames():
    """Carrying a topic is copying its tokens: 150 English nouns (77 carried fewer held-out topics,
    docs/benchmarks.md 2026-12-07), each of a kind with its own sentence and story frames."""
    topics = D.en_topics()
    assert len({t.noun for t in topics}) == len(topics) >= 150
    kinds = {t.kind for t in topics}
    assert kinds <= set(D.EN_SENTENCES) and kinds <= set(D.EN_STORIES)
    assert all(sum(t.kind == k for t in topics) >= 8 for k in kinds - {"sky", "weather"})
