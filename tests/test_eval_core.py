"""CORE scoring against hand-computed results, with fake scorers whose choices are known exactly."""

import json
import random

import pytest
import torch

from chibichat.common import ChibiError
from chibichat.eval import core as C
from chibichat.eval.metrics import write_eval_outputs


class CharTok:
    """Character-level tokenizer: ids are code points, BOS is 0 (never a character of the test data)."""

    bos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class FakeScorer:
    """Loss of a continuation = judge(context_text, continuation_text) per token; argmax reproduces
    the continuation iff `lm_ok(context, continuation)`."""

    def __init__(self, judge, lm_ok=lambda c, x: False, max_len=10_000):
        self.judge, self.lm_ok, self.max_len = judge, lm_ok, max_len
        self.calls = 0

    def continuation_scores(self, requests):
        self.calls += 1
        out = []
        for ids, start in requests:
            ctx, cont = CharTok().decode(ids[1:start]), CharTok().decode(ids[start:])
            n = len(ids) - start
            argmax = ids[start:] if self.lm_ok(ctx, cont) else [1] * n
            out.append(([self.judge(ctx, cont)] * n, argmax))
        return out


class FakeCoreTask:
    """The task protocol eval/core.py reads (tasks.base.CoreTask has the same shape)."""

    def __init__(self, name, items, num_fewshot=0, random_baseline=0.0, self_shot=False):
        self.name, self.items, self.num_fewshot, self.random_baseline = name, items, num_fewshot, random_baseline
        self.self_shot = self_shot

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def fewshot_indices(self, i):
        if self.self_shot:
            return [i]
        return random.Random(1234 + i).sample([j for j in range(len(self.items)) if j != i], self.num_fewshot)


def mc_task(golds, shots=0):
    items = [{"type": "multiple_choice", "context": f"Q{i}:", "continuations": [f" a{i}", f" b{i}", f" c{i}", f" d{i}"],
              "gold": g} for i, g in enumerate(golds)]
    return FakeCoreTask("mc", items, num_fewshot=shots, random_baseline=0.25)


GOLDS = [0, 1, 2, 3, 0, 0, 1, 2]  # 3 of 8 have gold 0


def test_multiple_choice_always_first_and_oracle():
    task = mc_task(GOLDS, shots=2)
    first = FakeScorer(lambda ctx, cont: 0.0 if cont.strip().startswith("a") else 1.0)
    out = C.evaluate_core(first, CharTok(), [task], full_bundle=False)
    s = out["tasks"][0]
    assert s["accuracy"] == 3 / 8
    assert s["baseline"] == 0.25
    assert s["centered"] == pytest.approx((3 / 8 - 0.25) / 0.75)
    assert out["label"] == "CORE-lite" and out["score"] == pytest.approx(s["centered"])
    assert first.calls == 1  # every item in one batched request list

    gold_text = {f"Q{i}:": ["a", "b", "c", "d"][g] + str(i) for i, g in enumerate(GOLDS)}

    def oracle(ctx, cont):
        query = ctx.split("\n\n")[-1]
        return 0.0 if cont.strip() == gold_text[query] else 2.0

    out = C.evaluate_core(FakeScorer(oracle), CharTok(), [task], full_bundle=True)
    assert out["tasks"][0]["accuracy"] == 1.0 and out["score"] == 1.0 and out["label"] == "CORE"


def test_ties_go_to_the_first_option_and_losses_are_means():
    task = mc_task([1, 1])
    # every option has the same per-token loss -> the first option wins -> both wrong
    out = C.evaluate_core(FakeScorer(lambda c, x: 0.7), CharTok(), [task], full_bundle=False)
    assert out["tasks"][0]["accuracy"] == 0.0
    assert out["items"][0]["losses"] == pytest.approx([0.7] * 4)


def test_schema_and_language_modeling():
    items = [{"type": "schema", "contexts": [f"x{i}", f"y{i}"], "continuation": " end", "gold": i % 2} for i in range(6)]
    schema = FakeCoreTask("wino", items, num_fewshot=1, random_baseline=0.5)
    # prefer the context whose option starts with "y": correct for odd items (3 of 6)
    sc = FakeScorer(lambda ctx, cont: 0.0 if ctx.split("\n\n")[-1].startswith("y") else 1.0)
    s = C.evaluate_core(sc, CharTok(), [schema], full_bundle=False)["tasks"][0]
    assert s["accuracy"] == 0.5 and s["baseline"] == 0.5 and s["centered"] == 0.0

    lm_items = [{"type": "language_modeling", "context": f"c{i}", "continuation": f" w{i}"} for i in range(5)]
    lm = FakeCoreTask("lambada", lm_items, num_fewshot=0, random_baseline=0.0)
    ok = FakeScorer(lambda c, x: 0.1, lm_ok=lambda ctx, cont: cont.strip() in ("w1", "w3"))
    s = C.evaluate_core(ok, CharTok(), [lm], full_bundle=False)["tasks"][0]
    assert s["accuracy"] == 2 / 5 and s["baseline"] == 0.0 and s["centered"] == 2 / 5

    out = C.evaluate_core(ok, CharTok(), [schema, lm], full_bundle=False)
    assert out["score"] == pytest.approx((0.0 + 0.4) / 2)


def test_fewshot_prompt_layout_and_self_shot_refused():
    task = mc_task(GOLDS, shots=3)
    ctx, cont = C.item_texts(task, 5)[1]
    shots = ctx.split("\n\n")
    assert len(shots) == 4 and shots[-1] == "Q5:" and cont == " b5"
    # a demonstration shows its gold continuation
    j = task.fewshot_indices(5)[0]
    assert shots[0] == f"Q{j}: " + ["a", "b", "c", "d"][GOLDS[j]] + str(j)
    bad = FakeCoreTask("leaky", task.items, num_fewshot=1, self_shot=True)
    with pytest.raises(ChibiError, match="own demonstration"):
        C.item_texts(bad, 0)


def test_context_trailing_space_moves_to_the_continuation():
    task = FakeCoreTask("t", [{"type": "multiple_choice", "context": "Q\nAnswer: ", "continuations": ["x", "y"],
                               "gold": 0}] * 2)
    assert C.item_texts(task, 0)[0] == ("Q\nAnswer:", " x")
    ids, start = C.item_requests(CharTok(), task, 0)[0]
    assert ids[0] == 0 and CharTok().decode(ids[start:]) == " x"


def test_over_length_items_are_skipped_and_counted():
    items = [{"type": "multiple_choice", "context": "Q" * (50 if i == 2 else 3), "continuations": [" a", " b"],
              "gold": 0} for i in range(4)]
    task = FakeCoreTask("long", items, random_baseline=0.5)
    out = C.evaluate_core(FakeScorer(lambda c, x: 0.0, max_len=20), CharTok(), [task], full_bundle=False)
    s = out["tasks"][0]
    assert s["n_scored"] == 3 and s["n_skipped_too_long"] == 1 and s["accuracy"] == 1.0
    assert [r["status"] for r in out["items"]] == ["ok", "ok", "skipped_too_long", "ok"]
    with pytest.raises(ChibiError, match="longer than the model's context"):
        C.evaluate_core(FakeScorer(lambda c, x: 0.0, max_len=5), CharTok(), [task], full_bundle=False)


@pytest.mark.parametrize("item,msg", [
    ({"type": "cloze"}, "type"),
    ({"type": "multiple_choice", "context": "q", "continuations": [" a", " b"], "gold": 2}, "gold"),
    ({"type": "multiple_choice", "context": "q", "continuations": [" a"], "gold": 0}, "at least 2"),
    ({"type": "language_modeling", "context": "q"}, "lacks"),
])
def test_bad_items_raise(item, msg):
    with pytest.raises(ChibiError, match=msg):
        C.evaluate_core(FakeScorer(lambda c, x: 0.0), CharTok(), [FakeCoreTask("t", [item])], full_bundle=False)


def test_mixed_or_empty_tasks_raise():
    items = [{"type": "language_modeling", "context": "q", "continuation": " a"},
             {"type": "schema", "contexts": ["a", "b"], "continuation": " c", "gold": 0}]
    with pytest.raises(ChibiError, match="mixes"):
        C.task_kind(FakeCoreTask("t", items))
    with pytest.raises(ChibiError, match="no items"):
        C.task_kind(FakeCoreTask("t", []))


def test_ranks_stride_and_gather_equal_single_process():
    task = mc_task(GOLDS)
    judge = FakeScorer(lambda ctx, cont: 0.0 if cont.strip()[0] in "ab" and cont.strip()[1] in "0246" else 1.0)
    single = C.evaluate_core(judge, CharTok(), [task], full_bundle=False)
    parts = [C.score_items(judge, CharTok(), task, range(r, len(GOLDS), 2)) for r in range(2)]
    merged = C.evaluate_core(judge, CharTok(), [task], full_bundle=False, rank=0, world_size=2,
                             gather=lambda mine: parts)
    assert merged["tasks"] == single["tasks"]


class CumsumLM(torch.nn.Module):
    """A causal toy LM whose logits depend on the whole prefix (running mean of embeddings)."""

    def __init__(self, vocab=300, seq_len=64):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 16)
        self.out = torch.nn.Linear(16, vocab)
        self.config = type("Cfg", (), {"seq_len": seq_len})()

    def forward(self, idx):
        e = self.emb(idx)
        steps = torch.arange(1, idx.shape[1] + 1, device=idx.device).view(1, -1, 1)
        return self.out(e.cumsum(1) / steps)


def _rt():
    from chibichat.common import Runtime

    return Runtime(device=torch.device("cpu"), compute_dtype=torch.float32)


def test_model_scorer_batched_equals_one_by_one():
    model = CumsumLM()
    reqs = [([0, 5, 6, 7, 8], 2), ([0, 9, 10], 1), ([0, 1, 2, 3, 4, 5, 6, 7], 5), ([0, 11, 12, 13], 3)]
    batched = C.ModelScorer(model, _rt(), batch_size=4).continuation_scores(reqs)
    single = C.ModelScorer(model, _rt(), batch_size=1).continuation_scores(reqs)
    for (lb, ab), (ls, as_) in zip(batched, single):
        assert lb == pytest.approx(ls, abs=1e-5) and ab == as_
    # by hand for request 1: loss of token 10 at position 1
    logits = model(torch.tensor([[0, 9, 10]]))[0]
    want = torch.nn.functional.cross_entropy(logits[0:2], torch.tensor([9, 10]), reduction="none")
    assert batched[1][0] == pytest.approx(want.tolist(), abs=1e-5)
    lp = C.ModelScorer(model, _rt(), batch_size=2).next_token_logprobs([[0, 5], [0, 1, 2]], [[7, 8], [3]])
    ref = torch.log_softmax(model(torch.tensor([[0, 1, 2]]))[0, -1], -1)[3].item()
    assert lp[1][0] == pytest.approx(ref, abs=1e-5) and len(lp[0]) == 2


def test_write_eval_outputs(tmp_path):
    task = mc_task(GOLDS)
    out = C.evaluate_core(FakeScorer(lambda c, x: 0.0), CharTok(), [task], full_bundle=False)
    write_eval_outputs(tmp_path, "core", out["items"], {"core_label": out["label"], "core": out["score"]})
    write_eval_outputs(tmp_path, "other", [{"a": 1}], {"x": 2})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"core_label": "CORE-lite", "core": 1 / 3 * 0 + out["score"], "x": 2}
    lines = (tmp_path / "core.jsonl").read_text().splitlines()
    assert len(lines) == len(GOLDS) and json.loads(lines[1])["gold"] == 1
    header = (tmp_path / "core.csv").read_text().splitlines()[0]
    assert "correct" in header and "losses" not in header
