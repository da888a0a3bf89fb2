"""CORE scoring against hand-computed results, with fake scorers whose choices are known exactly."""

import json
import math
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
    with pytest.raises(ChibiError, match="fits the model's context"):
        C.evaluate_core(FakeScorer(lambda c, x: 0.0, max_len=5), CharTok(), [task], full_bundle=False)
    # a task with no fitting item is reported unscored and left out of the mean; the label drops to CORE-lite
    short = FakeCoreTask("short", [{"type": "language_modeling", "context": "c", "continuation": " w"}] * 2)
    out = C.evaluate_core(FakeScorer(lambda c, x: 0.0, lm_ok=lambda c, x: True, max_len=4), CharTok(),
                          [task, short], full_bundle=True)
    assert out["unscored"] == ["long"] and out["score"] == 1.0 and out["label"] == "CORE-lite"
    assert out["tasks"][0]["accuracy"] is None and out["tasks"][0]["n_skipped_too_long"] == 4


def test_full_bundle_with_a_skipped_item_is_core_lite():
    # every task scored, but one item of one task did not fit: not "all items", so not "CORE"
    items = [{"type": "multiple_choice", "context": "Q" * (50 if i == 2 else 3), "continuations": [" a", " b"],
              "gold": 0} for i in range(4)]
    long = FakeCoreTask("long", items, random_baseline=0.5)
    short = FakeCoreTask("short", [{"type": "language_modeling", "context": "c", "continuation": " w"}] * 2)
    scorer = FakeScorer(lambda c, x: 0.0, lm_ok=lambda c, x: True, max_len=20)
    out = C.evaluate_core(scorer, CharTok(), [long, short], full_bundle=True)
    assert [s["n_skipped_too_long"] for s in out["tasks"]] == [1, 0] and out["unscored"] == []
    assert out["label"] == "CORE-lite"
    # the same two tasks with every item fitting are the full test
    out = C.evaluate_core(scorer, CharTok(), [FakeCoreTask("long", [items[0]] * 2, random_baseline=0.5), short],
                          full_bundle=True)
    assert out["label"] == "CORE"


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
    # the per-item files go when their summary keys do; a missing one is not an error
    from chibichat.eval.metrics import remove_eval_outputs

    assert remove_eval_outputs(tmp_path, "core") == [str(tmp_path / "core.jsonl"), str(tmp_path / "core.csv")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.csv", "other.jsonl", "summary.json"]
    assert remove_eval_outputs(tmp_path, "core") == []


# ----------------------------------------------------------------------------------------------
# JGLUE (tests use hand-written records in the official formats; JGLUE itself is never shipped)

from chibichat.eval import jglue as J  # noqa: E402

JCQA_LABELS = [0, 1, 0, 2, 4]
NLI = ["entailment", "neutral", "contradiction", "entailment", "neutral", "neutral"]
STS = [0.0, 1.2, 2.5, 3.8, 5.0, 4.4]


def _write_jglue(root):
    d = root / "jcommonsenseqa-v1.1"
    d.mkdir(parents=True)
    recs = [{"q_id": i, "question": f"問{i}は？", **{f"choice{k}": f"答{i}{k}" for k in range(5)}, "label": lab}
            for i, lab in enumerate(JCQA_LABELS)]
    (d / "valid-v1.1.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), "utf-8")
    (d / "train-v1.1.json").write_text("not read\n", "utf-8")
    nli = [{"sentence_pair_id": str(i), "yjcaptions_id": "x", "sentence1": f"猫{i}がいる。", "sentence2": f"動物{i}がいる。",
            "label": lab} for i, lab in enumerate(NLI)]
    (root / "jnli.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in nli), "utf-8")
    sts = [{"sentence_pair_id": str(i), "yjcaptions_id": "x", "sentence1": f"犬{i}が走る。", "sentence2": f"犬{i}が歩く。",
            "label": lab} for i, lab in enumerate(STS)]
    (root / "jsts.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in sts), "utf-8")
    squad = {"version": "v1.1", "data": [{"title": "東京", "paragraphs": [
        {"context": f"東京[SEP]段落{p}。", "qas": [
            {"id": f"q{p}{k}", "question": f"問{p}{k}？", "answers": [{"text": f"東京都{p}{k}", "answer_start": 0}],
             "is_impossible": False} for k in range(2)]} for p in range(2)]}]}
    d = root / "jsquad-v1.1"
    d.mkdir()
    (d / "valid-v1.1.json").write_text(json.dumps(squad, ensure_ascii=False, indent=2), "utf-8")


class JScorer(FakeScorer):
    """Continuation scoring as FakeScorer; next-token log-probs from `digits(prompt_text) -> 6 logps`."""

    def __init__(self, judge, digits=None, max_len=10_000):
        super().__init__(judge, max_len=max_len)
        self.digits = digits

    def next_token_logprobs(self, prompts, candidates):
        assert all(c == [ord(str(d)) for d in range(6)] for c in candidates)
        return [self.digits(CharTok().decode(p[1:])) for p in prompts]


def _sts_index(prompt_text):
    last = prompt_text.split("\n\n")[-1]
    return int(last.split("犬")[1][0])


def test_jglue_files_found_in_both_layouts(tmp_path):
    _write_jglue(tmp_path)
    f = J.find_files(tmp_path)
    assert f["jcommonsenseqa"].name == "valid-v1.1.json" and f["jnli"].name == "jnli.jsonl"
    assert len(J.read_records("jsquad", f["jsquad"])) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChibiError, match="no JGLUE dev file"):
        J.find_files(tmp_path / "empty")
    with pytest.raises(ChibiError, match="not a directory"):
        J.find_files(tmp_path / "missing")


def test_jcqa_and_jnli_always_first(tmp_path):
    _write_jglue(tmp_path)
    files = {k: v for k, v in J.find_files(tmp_path).items() if k in ("jcommonsenseqa", "jnli")}
    first = JScorer(lambda ctx, cont: 0.0 if cont in ("含意",) or cont.endswith("0") else 1.0)
    out = J.evaluate_jglue(files, scorer=first, gen=None, tok=CharTok(), max_len=10_000,
                           shots={"jcommonsenseqa": 2, "jnli": 1})
    s = out["summary"]
    assert s["jcommonsenseqa"] == 2 / 5 and s["jcommonsenseqa_centered"] == pytest.approx((0.4 - 0.2) / 0.8)
    assert s["jnli"] == 2 / 6  # "含意" (entailment) is right for 2 of 6
    # the 5 choices are listed in the prompt, and a demonstration carries its gold choice
    ctx, cont = J.core.item_texts(J.build_task("jcommonsenseqa", J.read_records("jcommonsenseqa", files["jcommonsenseqa"]), 1), 0)[0]
    assert "選択肢：答00 / 答01 / 答02 / 答03 / 答04\n答え：" in ctx and cont == "答00"


def test_jsts_expected_value_pearson_spearman(tmp_path):
    _write_jglue(tmp_path)
    files = {"jsts": J.find_files(tmp_path)["jsts"]}

    def exact(prompt_text):
        # put the mass on floor(g) and ceil(g) so that the expectation is exactly the gold score
        g = STS[_sts_index(prompt_text)]
        lo = int(g)
        hi = min(lo + 1, 5)
        w = [0.0] * 6
        w[lo] += 1 - (g - lo)
        w[hi] += g - lo
        return [math.log(x) if x > 0 else -1e9 for x in w]

    out = J.evaluate_jglue(files, scorer=JScorer(None, exact), gen=None, tok=CharTok(), max_len=10_000,
                           shots={"jsts": 2})
    assert [r["pred"] for r in out["items"]["jsts"]] == pytest.approx(STS)
    assert out["summary"]["jsts_pearson"] == pytest.approx(1.0)
    assert out["summary"]["jsts_spearman"] == pytest.approx(1.0)

    # uniform over the six digits: every prediction is 2.5 -> correlation undefined, said so
    out = J.evaluate_jglue(files, scorer=JScorer(None, lambda t: [0.0] * 6), gen=None, tok=CharTok(),
                           max_len=10_000, shots={"jsts": 0})
    assert out["items"]["jsts"][0]["pred"] == pytest.approx(2.5)
    assert out["summary"]["jsts_pearson"] is None and "undefined" in out["summary"]["jsts_note"]
    assert set(out["summary"]) == set(J.task_keys("jsts"))

    # mass 1 on the digit 5 - round(gold): predictions 5,4,2,1,0,1 against gold 0,1.2,2.5,3.8,5,4.4
    def flipped(t):
        d = 5 - int(STS[_sts_index(t)] + 0.5)
        return [0.0 if k == d else -1e9 for k in range(6)]

    out = J.evaluate_jglue(files, scorer=JScorer(None, flipped), gen=None, tok=CharTok(), max_len=10_000,
                           shots={"jsts": 0})
    pred = [5, 4, 2, 1, 0, 1]
    assert [r["pred"] for r in out["items"]["jsts"]] == pytest.approx(pred)
    assert out["summary"]["jsts_pearson"] == pytest.approx(J.pearson(pred, STS))
    assert out["summary"]["jsts_spearman"] == pytest.approx(J.spearman(pred, STS))


def test_jsquad_em_and_char_f1(tmp_path):
    _write_jglue(tmp_path)
    files = {"jsquad": J.find_files(tmp_path)["jsquad"]}
    # Hand-computed with JGLUE's normalisation (lower-case, trailing "。" stripped, whitespace collapsed):
    # q00: exact, after a blank first line and before rambling -> EM 1, F1 1
    # q01: full-width digits are not folded: 東京都０１ vs 東京都01 share 3 of 5 chars -> EM 0, F1 0.6
    # q10: half the answer ("東京" of "東京都10": P=1, R=2/5 -> F1=4/7), q11: wrong
    replies = {"問00？": "\n東京都00。\n質問：次", "問01？": "東京都０１。", "問10？": "東京", "問11？": "大阪"}

    class Gen:
        def generate_texts(self, prompts, n, max_tokens, temperature, top_k, seed):
            assert n == 1 and temperature == 0.0 and max_tokens == 16
            out = []
            for p in prompts:
                q = CharTok().decode(p[1:]).split("質問：")[-1].split("\n")[0]
                out.append([replies[q]])
            return out

    out = J.evaluate_jglue(files, scorer=None, gen=Gen(), tok=CharTok(), max_len=10_000, shots={"jsquad": 1},
                           jsquad_max_tokens=16)
    s = out["summary"]
    assert s["jsquad_em"] == pytest.approx(1 / 4)
    assert s["jsquad_f1"] == pytest.approx((1 + 0.6 + 4 / 7 + 0) / 4)
    assert out["items"]["jsquad"][0]["pred"] == "東京都00。"
    assert set(s) == set(J.task_keys("jsquad")) - {"jsquad_note"}


def test_jglue_bad_records_and_over_length(tmp_path):
    p = tmp_path / "jnli.jsonl"
    p.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": "maybe"}) + "\n", "utf-8")
    with pytest.raises(ChibiError, match="not one of"):
        J.evaluate_jglue({"jnli": p}, scorer=None, gen=None, tok=CharTok(), max_len=100, shots={"jnli": 0})
    p.write_text('{"sentence1": "a"\n', "utf-8")
    with pytest.raises(ChibiError, match="line 1 is not valid JSON"):
        J.read_records("jnli", p)
    _write_jglue(tmp_path / "j")
    files = {"jcommonsenseqa": J.find_files(tmp_path / "j")["jcommonsenseqa"]}
    # 3 shots make every prompt far longer than 60 characters -> all skipped, reported with a note
    out = J.evaluate_jglue(files, scorer=JScorer(lambda c, x: 0.0, max_len=60), gen=None, tok=CharTok(), max_len=60,
                           shots={"jcommonsenseqa": 3})
    assert out["summary"]["jcommonsenseqa"] is None and out["summary"]["jcommonsenseqa_skipped_too_long"] == 5
    assert "fewer --shots" in out["summary"]["jcommonsenseqa_note"]
    # task_keys names every key a task may write (a rerun removes exactly these)
    assert set(out["summary"]) == set(J.task_keys("jcommonsenseqa"))
    with pytest.raises(ChibiError, match="needs more than"):
        J.evaluate_jglue(files, scorer=None, gen=None, tok=CharTok(), max_len=60, shots={"jcommonsenseqa": 5})


def test_eval_jglue_and_eval_chat_agree_on_jsquad_exact_match(tmp_path):
    """The same completions get the same per-item exact match from `eval jglue` (base few-shot prompts)
    and `eval chat --tasks jsquad` (chat prompts): one parser, one normaliser, one scoring."""
    from chibichat.common import Home
    from chibichat.eval import chat as E
    from chibichat.tasks.jglue import jglue_dir, relative_path
    from chibichat.tokenizer import SPECIAL_TOKENS

    class ChatCharTok(CharTok):
        def special_id(self, name):
            return 0x110000 + SPECIAL_TOKENS.index(name)

        def decode(self, ids):
            return "".join(chr(i) for i in ids if i < 0x110000)

    _write_jglue(tmp_path / "j")
    # EM by hand (JGLUE normalisation): q00 yes (trailing 。 stripped), q01 no (full-width digits),
    # q10 no (part of the answer), q11 yes (after a blank first line)
    replies = {"問00？": "東京都00。", "問01？": "東京都０１", "問10？": "東京", "問11？": "\n 東京都11 \n続き"}

    class Gen:
        def generate_texts(self, prompts, n, max_tokens, temperature, top_k, seed):
            return [[replies[ChatCharTok().decode(p).split("質問：")[-1].split("\n")[0]]] for p in prompts]

    src = J.find_files(tmp_path / "j")["jsquad"]
    base = J.evaluate_jglue({"jsquad": src}, scorer=None, gen=Gen(), tok=ChatCharTok(), max_len=10_000,
                            shots={"jsquad": 1}, jsquad_max_tokens=16)
    home = Home.resolve(tmp_path / "home")
    dest = jglue_dir(home) / relative_path("jsquad", "valid")
    dest.parent.mkdir(parents=True)
    dest.write_bytes(src.read_bytes())
    task = E.eval_task("jsquad", home)
    chat = E.evaluate_chat([task], scorer=None, gen=Gen(), tok=ChatCharTok(), max_len=10_000,
                           cfg=E.GenSettings(max_tokens=16))
    assert [r["em"] for r in base["items"]["jsquad"]] == [1.0, 0.0, 0.0, 1.0]
    assert [float(r["n_correct"]) for r in chat["items"]["jsquad"]] == [1.0, 0.0, 0.0, 1.0]
    assert chat["summary"]["jsquad_chat"] == base["summary"]["jsquad_em"] == 0.5


def test_eval_jglue_and_eval_chat_keys_share_one_summary(tmp_path):
    """`eval jglue` and `eval chat --tasks jcommonsenseqa,jnli,jsts,jsquad` of one checkpoint write one
    summary.json: in either order, and with eval chat dropping its own earlier keys, both sets survive."""
    from chibichat.eval import chat as E
    from chibichat.eval.metrics import merge_summary

    _write_jglue(tmp_path / "j")

    class Gen:
        def generate_texts(self, prompts, n, max_tokens, temperature, top_k, seed):
            return [["東京"] for _ in prompts]

    jglue = J.evaluate_jglue(J.find_files(tmp_path / "j"), scorer=JScorer(lambda c, x: 0.0, lambda t: [0.0] * 6),
                             gen=Gen(), tok=CharTok(), max_len=10_000, jsquad_max_tokens=4,
                             shots={"jcommonsenseqa": 1, "jnli": 1, "jsts": 1, "jsquad": 0})["summary"]
    assert (jglue["jcommonsenseqa_n"], jglue["jnli_n"], jglue["jsts_n"], jglue["jsquad_n"]) == (5, 6, 6, 4)
    chat = E.flat_summary([{"task": t, "accuracy": 0.5, "centered": 0.25, "n_scored": 3, "n_skipped_too_long": 1}
                           for t in J.JGLUE_TASKS])
    assert (chat["jcommonsenseqa_chat_n"], chat["jnli_chat_n"], chat["jsts_chat_n"], chat["jsquad_chat_n"]) == (3,) * 4
    assert set(chat) & set(jglue) == set()
    stale = {k for t in J.JGLUE_TASKS for k in E.task_keys(t)} | set(E.CHATCORE_KEYS)  # what run_chat drops
    for i, (first, second, drop) in enumerate([(jglue, chat, stale), (chat, jglue, ())]):
        merge_summary(tmp_path / str(i), first)
        path = merge_summary(tmp_path / str(i), second, drop=drop)
        assert json.loads(path.read_text()) == {**jglue, **chat}
