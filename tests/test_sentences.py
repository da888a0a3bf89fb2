"""The topic-sentence task: corpus sentences that use the word the user names."""

from collections import Counter

import pytest

from chibichat.tasks import sentences as T
from chibichat.tasks.base import key_split


def test_corpus_sentences_keeps_plain_ones_and_never_cuts_at_an_abbreviation():
    doc = ("The old dog slept by the warm fire all day. Mr. Smith walked to the river with his son. "
           "J. Ford wrote a book about the sea and its ships. Short one here. "
           "It rained on 12 May and the streets were very wet. Why did the cat run into the garden so fast?\n"
           "A line that goes on and on with far too many words to be a simple sentence for a small model to copy.")
    assert T.corpus_sentences([doc]) == ["The old dog slept by the warm fire all day.",
                                         "Why did the cat run into the garden so fast?"]


class FakeCorpus:
    def __init__(self, docs):
        self.docs, self.splits = docs, []

    def iter_documents(self, split, home):
        self.splits.append(split)
        return iter(self.docs)


@pytest.fixture
def fake(monkeypatch):
    people = [f"The people of town number {w} came out to see it." for w in
              ("one two three four five six seven eight nine ten eleven twelve".split())]
    corpus = FakeCorpus([" ".join(people) + " We looked at the old lamp for a long while."])
    monkeypatch.setattr("chibichat.data.corpora.get_corpus", lambda name: corpus)
    return corpus


def test_items_use_the_named_word_balance_topics_and_read_only_the_train_documents(fake):
    task = T.TopicSentence(split="train", size=200)
    assert fake.splits == ["train"]  # the corpus's validation text never becomes chat data
    items = [task[i] for i in range(200)]
    for it in items:
        user, reply = (m["content"] for m in it["messages"])
        assert it["topic"] in reply.lower().split() or it["topic"] in reply.lower()
        assert any(user.lower() == p.format(topic=it["topic"]).lower() for p in T.PHRASINGS)
        assert key_split(it["key"]) == "train" and it["key"] == reply
    # "lamp" is in 1 sentence of 13, "people" in 12, "town" in 12: each topic is drawn about equally
    counts = Counter(it["topic"] for it in items)
    assert set(counts) == {"lamp", "people", "town"} and min(counts.values()) > 40
    test = T.TopicSentence(split="test", size=20)
    assert not {test[i]["key"] for i in range(20)} & {it["key"] for it in items}


def test_doubled_marks_are_corpus_artifacts_not_prose():
    doc = "The farmer sold his cow;; then he went home to rest. The farmer sold his cow; then he went home to rest."
    assert T.corpus_sentences([doc]) == ["The farmer sold his cow; then he went home to rest."]


def test_no_topic_is_a_heldout_open_prompt_topic_word():
    from chibichat.tasks import skills as S

    heldout = [it["topic"] for it in S.load_items("en") if it["skill"] == S.OPEN]
    assert len(heldout) == 8 and len(T.TOPICS) >= 60
    for word in T.TOPICS:
        assert not any(S.on_topic(word, topic, "en") for topic in heldout), word
    assert not {"sea", "moon", "rain", "dog", "park", "trees", "food", "ball"} & set(T.TOPICS)


def test_a_corpus_without_topic_sentences_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("chibichat.data.corpora.get_corpus", lambda name: FakeCorpus(["Nothing at all to say here today."]))
    with pytest.raises(Exception, match="gave no usable sentence; reinstall chibichat"):
        T.TopicSentence(split="train", size=5)


def test_phrasings_are_many_and_each_names_the_topic():
    assert len(T.PHRASINGS) >= 32 and len(set(T.PHRASINGS)) == len(T.PHRASINGS)
    assert all("{topic}" in p for p in T.PHRASINGS)
