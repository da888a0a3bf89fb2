"""The walkthrough's example data (examples/, made by dev/example_support.py): reproducible, clean for
`data check`, and its held-out questions worded unlike every training question."""

from __future__ import annotations

from pathlib import Path

import pytest

from chibichat.tasks.local import check_file
from chibichat.tasks.registry import get_task
from dev import example_support

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_examples_equal_a_fresh_build(tmp_path):
    example_support.main(["--out", str(tmp_path)])
    for name in ("support.jsonl", "support-heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "examples" / name).read_bytes(), name


def test_training_file_is_200_clean_distinct_conversations_with_the_system_prompt():
    report = check_file(ROOT / "examples" / "support.jsonl")
    assert (report["rows"], report["valid"], report["kind"]) == (200, 200, "chat")
    assert report["errors"] == [] and report["duplicates"] == []
    first = report["items"][0][1]
    assert first["messages"][0] == {"role": "system", "content": example_support.SYSTEM}


def test_heldout_file_is_a_verifiable_task_that_scores_the_canonical_answers():
    task = get_task(f"file:{ROOT / 'examples' / 'support-heldout.jsonl'}")
    assert task.kind == "generative" and len(task) == 20
    answers = {f".*{regex}.*": ans for ans, regex, _, _ in example_support.TOPICS.values()}
    for i in range(len(task)):
        item = task.get(i)
        assert task.evaluate(item, answers[item["answer"]])
        assert not task.evaluate(item, "Please ask our team.")


def test_heldout_questions_share_no_training_phrasing():
    train = example_support.training_rows(200)
    held = example_support.heldout_rows()
    example_support.check_disjoint(train, held)  # the builder's own check
    leaky = [{**held[0], "prompt": "Hi, how do I reset my password?"}]
    with pytest.raises(SystemExit, match="repeats a training phrasing"):
        example_support.check_disjoint(train, leaky)
