"""Evaluation data never reaches training: refused by the task's own flag before anything loads, and
training items checked disjoint from evaluation items by content."""

import argparse
import json

import pytest

from chibichat.cli import main
from chibichat.common import ChibiError, Home

EVAL_ONLY = {"arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "jcommonsenseqa", "jnli", "jsts", "jsquad"}


def _fake_hub(home, repo, subset, split, rows):
    """A complete hub cache of (repo, subset, split), as fetch_split leaves it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chibichat.tasks.hub import cache_dir

    d = cache_dir(home, repo, subset, split)
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), d / "0000.parquet")
    (d / "manifest.json").write_text(json.dumps({"files": [{"file": "0000.parquet"}]}), "utf-8")


GSM_ROWS = [{"question": f"Tom has {k} apples and buys 2 more. How many apples does he have?",
             "answer": f"He has {k} + 2 = {k + 2}.\n#### {k + 2}"} for k in range(3, 9)]


def _jglue_files(home):
    from chibichat.tasks.jglue import jglue_dir, relative_path

    recs = {
        "jcommonsenseqa": [{"q_id": 0, "question": "問？", **{f"choice{k}": f"答{k}" for k in range(5)}, "label": 1}],
        "jnli": [{"sentence_pair_id": "0", "sentence1": "猫がいる。", "sentence2": "動物がいる。", "label": "entailment"}],
        "jsts": [{"sentence_pair_id": "0", "sentence1": "犬が走る。", "sentence2": "犬が歩く。", "label": 3.2}],
        "jsquad": [{"id": "q0", "context": "東京は首都。", "question": "首都は？", "answers": ["東京"]}],
    }
    for task, rows in recs.items():
        p = jglue_dir(home) / relative_path(task, "valid")
        p.parent.mkdir(parents=True)
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


@pytest.fixture
def home(tmp_path):
    return Home.resolve(tmp_path / "home")


def test_every_spec_declares_the_eval_only_flag_its_task_has(home):
    """The registry's flag (checked before loading) equals the built task's own flag, for every task."""
    from chibichat.tasks.registry import get_task, home_option, specs

    _fake_hub(home, "openai/gsm8k", "main", "train", GSM_ROWS)
    for subset in ("ARC-Easy", "ARC-Challenge"):
        _fake_hub(home, "allenai/ai2_arc", subset, "train", [
            {"id": "a1", "question": "Which is a metal?", "choices": {"label": ["A", "B"], "text": ["iron", "wood"]},
             "answerKey": "A"}])
    _fake_hub(home, "HuggingFaceTB/smol-smoltalk", "default", "train",
              [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    _fake_hub(home, "cais/mmlu", "auxiliary_train", "train",
              [{"train": {"subject": "", "question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1}}])
    _jglue_files(home)
    table = specs()
    assert {n for n, s in table.items() if s.eval_only} == EVAL_ONLY | {n for n in table if n.startswith("core-")}
    for name, spec in table.items():
        task = get_task(name, **home_option(name, home))
        assert task.eval_only == spec.eval_only, name


@pytest.mark.parametrize("argv, message", [
    (["sft", "--mix", "chitchat=1,jcommonsenseqa=1"],
     "--mix names 'jcommonsenseqa', an evaluation-only task (JGLUE jcommonsenseqa (online; dev set by default)); "
     "training on it would contaminate the scores reported on it. Remove it from --mix"),
    (["midtrain", "--mix", "mmlu=0.5"],
     "--mix names 'mmlu', an evaluation-only task (MMLU (57 subjects, 4-way MC)); training on it would contaminate "
     "the scores reported on it. Remove it from --mix"),
    (["rl", "--task", "gsm8k"],
     "--task names 'gsm8k', an evaluation-only task (GSM8K math word problems, '#### n'); training on it would "
     "contaminate the scores reported on it. Remove it from --task (its training split is 'gsm8k-train')"),
    (["rl", "--task", "jsquad", "--eval-task", "jsquad"],
     "--task names 'jsquad', an evaluation-only task (JGLUE jsquad (online; dev set by default)); training on it "
     "would contaminate the scores reported on it. Remove it from --task"),
    (["sft", "--mix", "chitchat=1,no-such-task=1"], "unknown task 'no-such-task'; valid tasks: "),
    (["rl", "--eval-task", "no-such-task"], "unknown task 'no-such-task'; valid tasks: "),
])
def test_training_paths_refuse_evaluation_tasks_before_loading_anything(tmp_path, capsys, argv, message):
    empty = tmp_path / "empty-home"  # no tokenizer, no checkpoint: the refusal must come first
    rc = main([argv[0], "--home", str(empty), *argv[1:]])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"chibichat {argv[0]}: error: {message}" in err
    assert not empty.exists()


def test_built_task_flag_is_checked_too():
    from chibichat.tasks.registry import get_task
    from chibichat.tasks.leakage import refuse_eval_only_task

    refuse_eval_only_task(get_task("spelling"), "--mix")  # the train split: fine
    with pytest.raises(ChibiError) as e:
        refuse_eval_only_task(get_task("spelling", split="test"), "--task")
    assert str(e.value).startswith("--task names 'spelling', an evaluation-only task")


def test_prompt_keys_normalise_text_and_ignore_answers():
    from chibichat.tasks.leakage import prompt_key

    a = {"messages": [{"role": "user", "content": "What is  ２+2?\n"}, {"role": "assistant", "content": "4"}]}
    b = {"messages": [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "five"}]}
    c = {"messages": [{"role": "user", "content": "what is 2+3?"}, {"role": "assistant", "content": "4"}]}
    assert prompt_key(a) == prompt_key(b) != prompt_key(c)
    assert prompt_key({"context": "What is 2+2?", "continuation": " 4"}) == prompt_key(b)


def test_rl_task_and_eval_task_of_the_same_items_are_refused(home):
    from chibichat.stages.rl import _tasks

    _fake_hub(home, "openai/gsm8k", "main", "train", GSM_ROWS)
    args = argparse.Namespace(task="gsm8k-train", eval_task="gsm8k-train", train_items=10, passk_items=4, seed=0)
    with pytest.raises(ChibiError) as e:
        _tasks(args, home)
    assert str(e.value).startswith(
        "training task 'gsm8k-train' shares 6 item(s) with evaluation set 'gsm8k-train' (same prompt after NFKC, "
        "case folding and whitespace collapsing; e.g. its item 0: 'tom has 3 apples and buys 2 more. how many apples "
        "does he have?'); training on them would inflate gsm8k-train's score. Train and evaluate on disjoint sets")
    # a generated task's own held-out split is disjoint by construction, and passes the content check
    task, ev = _tasks(argparse.Namespace(task="spelling", eval_task=None, train_items=50, passk_items=8, seed=0), home)
    assert (task.split, ev.split) == ("train", "test")


def test_a_copy_of_an_evaluation_item_under_another_name_is_found_by_content(home):
    """A training split that holds a question of the shipped GSM8K evaluation subset (re-spaced and
    re-cased) is refused, in SFT's mixture and in RL alike."""
    from chibichat.stages.rl import _tasks
    from chibichat.stages.sft import build_mixtures
    from chibichat.tasks.registry import get_task

    q = get_task("gsm8k")[7]["messages"][0]["content"]
    leaked = {"question": "  " + q.upper().replace(" ", "   ") + " ", "answer": "#### 1"}
    _fake_hub(home, "openai/gsm8k", "main", "train", [leaked] + GSM_ROWS)
    want = "training task 'gsm8k-train' shares 1 item(s) with evaluation set 'gsm8k' (same prompt after NFKC"
    with pytest.raises(ChibiError, match="Remove that task from --mix, or pass --drop-eval-overlap to train on the "
                                         "rest of it.$") as e:
        build_mixtures([("gsm8k-train", 1.0)], 1, 0, home)
    assert str(e.value).startswith(want)
    with pytest.raises(ChibiError) as e:
        _tasks(argparse.Namespace(task="gsm8k-train", eval_task="arithmetic", train_items=10, passk_items=4, seed=0),
               home)
    assert str(e.value).startswith(want)


def test_jglue_dev_sets_in_the_home_are_checked_against_training(home):
    from chibichat.tasks.base import ListTask
    from chibichat.tasks.jglue import jsquad_item
    from chibichat.tasks.leakage import check_disjoint, reported_eval_sets

    _jglue_files(home)
    evals = reported_eval_sets(home)
    assert {"jcommonsenseqa", "jnli", "jsts", "jsquad"} <= {t.name for t in evals}
    copy = ListTask("my-qa", "generative", [jsquad_item({"id": "x", "context": "東京は首都。", "question": "首都は？",
                                                         "answers": ["東京"]})])
    with pytest.raises(ChibiError, match="^training task 'my-qa' shares 1 item\\(s\\) with evaluation set 'jsquad'"):
        check_disjoint([copy], evals, fix="x")


def test_full_online_test_sets_in_the_home_are_checked_against_training(home):
    """Once `data tasks gsm8k` has put GSM8K's full test split into the home (as the GPU presets do before
    training), a training split holding one of its questions is refused, in SFT's mixture and in RL."""
    from chibichat.stages.rl import _tasks
    from chibichat.stages.sft import build_mixtures
    from chibichat.tasks.evalsets import cached_online_test_sets
    from chibichat.tasks.leakage import reported_eval_sets

    test_q = "A farmer has 17 cows and buys 5 more. How many cows does the farmer have?"
    _fake_hub(home, "openai/gsm8k", "main", "train", [{"question": test_q, "answer": "#### 22"}] + GSM_ROWS)
    build_mixtures([("gsm8k-train", 1.0)], 1, 0, home)  # no test split in the home yet: nothing to compare
    assert cached_online_test_sets(home) == []
    _fake_hub(home, "openai/gsm8k", "main", "test", [{"question": test_q, "answer": "#### 22"}])
    assert cached_online_test_sets(home) == ["gsm8k"]
    online = [t for t in reported_eval_sets(home) if t.description == "GSM8K (online)"]
    assert [len(t) for t in online] == [1]
    want = ("training task 'gsm8k-train' shares 1 item(s) with evaluation set 'gsm8k' (same prompt after NFKC, case "
            "folding and whitespace collapsing; e.g. its item 0: 'a farmer has 17 cows and buys 5 more. how many cows "
            "does the farmer have?'); training on them would inflate gsm8k's score. Remove that task from --mix, or pass "
            "--drop-eval-overlap to train on the rest of it.")
    with pytest.raises(ChibiError) as e:
        build_mixtures([("gsm8k-train", 1.0)], 1, 0, home)
    assert str(e.value) == want
    # --drop-eval-overlap: the shared question is left out and counted, the rest trains
    train, _, dropped, _ = build_mixtures([("gsm8k-train", 1.0)], 1, 0, home, drop_overlap=True)
    assert dropped == {"gsm8k-train": {"gsm8k": 1}}
    questions = [item["messages"][0]["content"] for _, item in train]
    assert test_q not in questions and len(questions) == len(GSM_ROWS) - 1  # one more row held out for validation
    with pytest.raises(ChibiError, match="^training task 'gsm8k-train' shares 1 item"):
        _tasks(argparse.Namespace(task="gsm8k-train", eval_task="arithmetic", train_items=10, passk_items=4, seed=0),
               home)


def test_shipped_training_data_of_the_default_mixtures_is_disjoint_from_the_evaluation_sets():
    """mmlu-dev (MMLU's dev+validation) next to the MMLU evaluation subset, and the shipped chats, pass
    (the generated tasks' splits are disjoint by construction and are checked in every stage test)."""
    from chibichat.stages.sft import build_mixtures, parse_mix

    train, _, dropped, _ = build_mixtures(parse_mix("mmlu-dev=1,chitchat=1,chatterbot=1,chatterbot-ja=1"), 50, 0)
    assert dropped == {}
    assert set(train.summary()) == {"mmlu-dev", "chitchat", "chatterbot", "chatterbot-ja"}
