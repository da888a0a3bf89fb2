"""Chat eval against hand-computed results: always-first and oracle scorers, scripted generators."""

import pytest

from chibichat.common import ChibiError
from chibichat.eval import chat as E
from chibichat.tokenizer import SPECIAL_TOKENS

LETTERS = ["A", "B", "C", "D"]
ANSWERS = ["A", "C", "B", "A", "D", "A", "B", "C"]  # 3 of 8 are "A"


class CharTok:
    """Code points for text, 1000+k for special k."""

    def __init__(self):
        self.bos_id = 1000

    def special_id(self, name):
        return 1000 + SPECIAL_TOKENS.index(name)

    def encode(self, text):
        return [ord(c) for c in text]


class ListTask:
    def __init__(self, name, kind, items, evaluate=None):
        self.name, self.kind, self.items, self._evaluate = name, kind, items, evaluate

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def evaluate(self, item, text):
        return self._evaluate(item, text)


def mc_items(answers=ANSWERS, question_len=5):
    return [{"messages": [{"role": "user", "content": f"q{i}" + "x" * question_len + " - a=A - b=B - c=C - d=D"},
                          {"role": "assistant", "content": a}], "letters": LETTERS, "answer": a}
            for i, a in enumerate(answers)]


class FirstScorer:
    def __init__(self):
        self.prompts = []

    def next_token_logprobs(self, prompts, candidates):
        self.prompts += prompts
        return [[-1.0] + [-2.0] * (len(c) - 1) for c in candidates]


class OracleScorer:
    """Knows the answers: puts its mass on the answer letter's token id."""

    def __init__(self, items):
        self.answer_by_prompt = {}
        self.items = items

    def next_token_logprobs(self, prompts, candidates):
        out = []
        for p, c in zip(prompts, candidates):
            q = "".join(chr(t) for t in p if t < 1000)
            item = next(it for it in self.items if q.startswith(it["messages"][0]["content"]))
            want = ord(item["answer"])
            out.append([0.0 if cid == want else -5.0 for cid in c])
        return out


def test_categorical_always_first_and_oracle():
    items = mc_items()
    task = ListTask("arc-easy", "categorical", items)
    scorer = FirstScorer()
    out = E.evaluate_chat([task], scorer=scorer, gen=None, tok=CharTok(), max_len=200, cfg=E.GenSettings())
    s = out["tasks"][0]
    assert s["accuracy"] == 3 / 8 and s["baseline"] == 0.25
    assert s["centered"] == pytest.approx((3 / 8 - 0.25) / 0.75)
    assert out["summary"]["chatcore_partial"] == pytest.approx(s["centered"])
    assert "chatcore" not in out["summary"]
    # the prompt stops right after <|assistant_start|>: the letter is the next token
    tok = CharTok()
    assert all(p[-1] == tok.special_id("<|assistant_start|>") and p[0] == tok.bos_id for p in scorer.prompts)
    assert all(tok.special_id("<|assistant_end|>") not in p for p in scorer.prompts)  # answer turn left out

    out = E.evaluate_chat([task], scorer=OracleScorer(items), gen=None, tok=CharTok(), max_len=200, cfg=E.GenSettings())
    assert out["summary"]["arc_easy"] == 1.0 and out["summary"]["arc_easy_centered"] == 1.0
    assert [r["pred"] for r in out["items"]["arc-easy"]] == ANSWERS


def test_summary_keys_name_files_without_paths():
    assert E.summary_key("arc-easy") == "arc_easy"
    assert E.summary_key("file:/data/My QA-test.v2.jsonl") == "file_my_qa_test"
    assert E.summary_key("file:examples/support-heldout.jsonl") == "file_support_heldout"
    assert E.items_name("arc-easy") == "chat_arc_easy" and E.items_name("file:/d/qa.jsonl") == "chat_file_qa"


def test_two_files_of_one_file_name_are_refused_and_replace_each_other_in_a_record():
    # a/qa.jsonl and b/qa.jsonl are both file_qa: one run would overwrite one's scores with the other's
    both = [ListTask("file:a/qa.jsonl", "categorical", mc_items()), ListTask("file:b/qa.jsonl", "categorical", mc_items())]
    with pytest.raises(ChibiError) as e:
        E.evaluate_chat(both, scorer=FirstScorer(), gen=None, tok=CharTok(), max_len=200, cfg=E.GenSettings())
    assert str(e.value) == ("--tasks 'file:a/qa.jsonl' and 'file:b/qa.jsonl' would both be recorded as 'file_qa' in "
                            "summary.json (a local file is keyed by its file name), one overwriting the other's scores: "
                            "rename one of the files")
    with pytest.raises(ChibiError, match=r"^--tasks lists 'mmlu' twice; list it once$"):
        E.refuse_shared_keys(["mmlu", "arc-easy", "mmlu"])
    E.refuse_shared_keys(["file:a/qa.jsonl", "file:b/qa-test.jsonl", "mmlu", "jsquad"])  # distinct keys pass
    # a later run of b/qa.jsonl replaces a/qa.jsonl's entry in the record (their keys and files are one)
    assert E.replaced_in_record(["file:a/qa.jsonl", "mmlu", "file:b/other.jsonl"], ["file:b/qa.jsonl"]) == \
        ["file:a/qa.jsonl"]
    assert E.replaced_in_record(["file:b/qa.jsonl", "mmlu"], ["file:b/qa.jsonl", "mmlu"]) == []


def test_jglue_tasks_are_keyed_apart_from_eval_jglue():
    # `eval jglue` writes jsquad_em, jsquad_n, jnli, jnli_n, ... into the same summary.json
    assert E.task_keys("jsquad") == ("jsquad_chat", "jsquad_chat_centered", "jsquad_chat_n",
                                     "jsquad_chat_skipped_too_long")
    assert E.task_keys("jnli")[:3] == ("jnli_chat", "jnli_chat_centered", "jnli_chat_n")
    assert E.items_name("jsquad") == "chat_jsquad"  # beside eval jglue's jsquad.jsonl


def test_a_record_keeps_earlier_tasks_only_under_the_same_settings():
    from chibichat.eval.metrics import carry_over
    from chibichat.eval.metrics import record_mismatch as mismatch

    def record_mismatch(earlier, now):
        return mismatch(earlier, now, E.RECORD_SETTINGS)

    now = {"checkpoint": "/h/checkpoints/sft/d4/step_000010", "checkpoint_mtime_ns": 7, "step": 10,
           "test_sets": "shipped", "max_items": None, "num_samples": 1, "max_new_tokens": 128,
           "temperature": 0.0, "top_k": 50, "seed": None}
    assert record_mismatch({**now, "tasks": [], "seconds": 3.0, "world_size": 2}, now) == []
    # the seed counts when sampling (greedy records carry None, and records from before the seed was kept match)
    sampled = {**now, "temperature": 1.0, "seed": 0}
    assert record_mismatch({**sampled, "seed": 1}, sampled) == ["seed"]
    assert record_mismatch({k: v for k, v in now.items() if k != "seed"}, now) == []
    # the same step trained again (meta.json rewritten), other test sets or items: another test
    assert record_mismatch({**now, "checkpoint_mtime_ns": 8}, now) == ["checkpoint_mtime_ns"]
    assert record_mismatch({**now, "test_sets": "online", "max_items": 3}, now) == ["test_sets", "max_items"]
    # a record written before these settings were kept matches nothing
    old = {k: now[k] for k in ("checkpoint", "step", "test_sets", "num_samples", "max_new_tokens", "temperature")}
    assert record_mismatch(old, now) == ["checkpoint_mtime_ns", "top_k"]
    # the tasks not run again are kept under the same settings, dropped (and said so) under others
    assert carry_over({**now, "tasks": []}, now, E.RECORD_SETTINGS, ["arc-easy", "mmlu"], ["mmlu"]) == \
        (["arc-easy"], [], None)
    assert carry_over({**now, "top_k": 5}, now, E.RECORD_SETTINGS, ["arc-easy", "mmlu"], ["mmlu"]) == \
        ([], ["arc-easy"], "dropped the earlier scores of arc-easy from the record, with their per-item files: "
                           "they were scored with other settings (top_k 5, now 50)")
    assert carry_over({**now, "top_k": 5}, now, E.RECORD_SETTINGS, ["mmlu"], ["mmlu"]) == ([], [], None)


def test_tasks_outside_chatcore_get_no_chatcore_score():
    out = E.evaluate_chat([ListTask("file:qa.jsonl", "categorical", mc_items())], scorer=FirstScorer(), gen=None,
                          tok=CharTok(), max_len=200, cfg=E.GenSettings())
    assert out["summary"][E.summary_key("file:qa.jsonl")] == 3 / 8
    assert not {"chatcore", "chatcore_partial", "chatcore_tasks"} & set(out["summary"])
    both = [ListTask("file:qa.jsonl", "categorical", mc_items()), ListTask("mmlu", "categorical", mc_items())]
    out = E.evaluate_chat(both, scorer=FirstScorer(), gen=None, tok=CharTok(), max_len=200, cfg=E.GenSettings())
    assert out["summary"]["chatcore_tasks"] == ["mmlu"]


def test_over_length_prompts_are_skipped_and_counted():
    items = mc_items()
    items[3]["messages"][0]["content"] += "y" * 200
    out = E.evaluate_chat([ListTask("mmlu", "categorical", items)], scorer=FirstScorer(), gen=None, tok=CharTok(),
                          max_len=100, cfg=E.GenSettings())
    assert out["summary"]["mmlu_n"] == 7 and out["summary"]["mmlu_skipped_too_long"] == 1
    assert out["summary"]["mmlu"] == pytest.approx(2 / 7)  # item 3 (an "A") is out
    # a task none of whose items fits is reported unscored and ChatCORE becomes partial; nothing at all -> error
    both = [ListTask("mmlu", "categorical", items), ListTask("arc-easy", "categorical", mc_items(question_len=300))]
    out = E.evaluate_chat(both, scorer=FirstScorer(), gen=None, tok=CharTok(), max_len=100, cfg=E.GenSettings())
    assert out["summary"]["arc_easy"] is None and out["summary"]["arc_easy_skipped_too_long"] == 8
    assert out["summary"]["chatcore_tasks"] == ["mmlu"]
    assert out["summary"]["chatcore_partial"] == pytest.approx((2 / 7 - 0.25) / 0.75)
    with pytest.raises(ChibiError, match="nothing was evaluated"):
        E.evaluate_chat([ListTask("mmlu", "categorical", items)], scorer=FirstScorer(), gen=None, tok=CharTok(),
                        max_len=10, cfg=E.GenSettings())


def test_multi_token_letters_are_refused():
    class PairTok(CharTok):
        def encode(self, text):
            return [ord(c) for c in text] * (2 if text == "B" else 1)

    with pytest.raises(ChibiError, match="'B' encodes to 2 tokens"):
        E.eval_categorical(FirstScorer(), PairTok(), ListTask("arc", "categorical", mc_items()), range(2), 500)


class ScriptedGen:
    """Sample j of prompt i is right iff right(i, j); records what it was asked."""

    def __init__(self, items, right):
        self.items, self.right, self.calls = items, right, []

    def generate_texts(self, prompts, num_samples, max_tokens, temperature, top_k, seed):
        self.calls.append((len(prompts), num_samples, max_tokens))
        out = []
        for p in prompts:
            q = "".join(chr(t) for t in p if t < 1000)
            i = next(k for k, it in enumerate(self.items) if q.startswith(it["messages"][0]["content"]))
            ans = self.items[i]["answer"]
            out.append([f"so #### {ans if self.right(i, j) else ans + '1'}" for j in range(num_samples)])
        return out


def gsm_items(n=6):
    return [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                          {"role": "assistant", "content": f"#### {2 * i}"}], "answer": str(2 * i)} for i in range(n)]


def _check(item, text):
    return text.rsplit("#### ", 1)[-1] == item["answer"]


def test_generative_pass1_and_passn():
    items = gsm_items()
    task = ListTask("gsm8k", "generative", items, _check)
    gen = ScriptedGen(items, lambda i, j: i % 2 == 0)
    out = E.evaluate_chat([task], scorer=None, gen=gen, tok=CharTok(), max_len=100,
                          cfg=E.GenSettings(max_tokens=32))
    assert out["summary"]["gsm8k"] == 0.5 and out["tasks"][0]["baseline"] == 0.0
    assert gen.calls == [(6, 1, 32)]  # one batched call

    # 4 samples, only sample 0 right for every item: pass@1 = 1/4, pass@4 = 1
    gen = ScriptedGen(items, lambda i, j: j == 0)
    out = E.evaluate_chat([task], scorer=None, gen=gen, tok=CharTok(), max_len=100,
                          cfg=E.GenSettings(num_samples=4, max_tokens=32, temperature=1.0))
    assert out["summary"]["gsm8k"] == 0.25 and out["tasks"][0]["passn"] == 1.0
    row = out["items"]["gsm8k"][0]
    assert row["n_correct"] == 1 and row["completion"] == f"so #### {items[0]['answer']}"


def test_generative_budget_comes_from_the_context():
    items = gsm_items(3)
    task = ListTask("gsm8k", "generative", items, _check)
    gen = ScriptedGen(items, lambda i, j: True)
    # prompt is ~20 tokens: with 90 new tokens in a 100-token context nothing fits
    with pytest.raises(ChibiError, match="nothing was evaluated"):
        E.evaluate_chat([task], scorer=None, gen=gen, tok=CharTok(), max_len=100, cfg=E.GenSettings(max_tokens=90))
    with pytest.raises(ChibiError, match="max-new-tokens"):
        E.evaluate_chat([task], scorer=None, gen=gen, tok=CharTok(), max_len=100, cfg=E.GenSettings(max_tokens=99))
    with pytest.raises(ChibiError, match="num-samples"):
        E.GenSettings(num_samples=0)


def test_chatcore_over_the_full_task_set():
    items = mc_items()
    tasks = [ListTask(n, "categorical", items) for n in ("arc-easy", "arc-challenge", "mmlu")]
    g = gsm_items()
    tasks += [ListTask(n, "generative", g, _check) for n in ("gsm8k", "humaneval", "spelling")]
    gen = ScriptedGen(g, lambda i, j: i < 3)  # 3 of 6 right
    out = E.evaluate_chat(tasks, scorer=OracleScorer(items), gen=gen, tok=CharTok(), max_len=200,
                          cfg=E.GenSettings(max_tokens=16))
    # three categorical tasks at centered 1.0, three generative at 0.5
    assert out["summary"]["chatcore"] == pytest.approx(0.75)
    assert out["summary"]["chatcore_tasks"] == list(E.CHATCORE_TASKS)


class SeededGen:
    """Sampled texts that are a function of the prompt and its seed alone; records the seeds it was given."""

    def __init__(self):
        self.seeds = []

    def generate_texts(self, prompts, num_samples, max_tokens, temperature, top_k, seeds):
        self.seeds += list(seeds)
        return [[f"{len(p)} seed {s} sample {j}" for j in range(num_samples)] for p, s in zip(prompts, seeds)]


def test_sampled_items_get_the_same_seed_whatever_the_number_of_ranks():
    # Each rank's first batch used seed + 0: the 2-rank texts differed from one process's at temperature > 0.
    items = gsm_items(5)
    task = ListTask("gsm8k", "generative", items, _check)
    cfg = E.GenSettings(num_samples=2, max_tokens=16, temperature=1.0, seed=100)
    one_gen = SeededGen()
    one = E.evaluate_chat([task], scorer=None, gen=one_gen, tok=CharTok(), max_len=100, cfg=cfg)
    gens, mine = [SeededGen(), SeededGen()], {}
    for r in range(2):  # each rank's own rows, as its gather would send them
        E.evaluate_chat([task], scorer=None, gen=gens[r], tok=CharTok(), max_len=100, cfg=cfg, rank=r, world_size=2,
                        gather=lambda rows, r=r: [mine.setdefault(r, rows)])
    two = E.evaluate_chat([task], scorer=None, gen=SeededGen(), tok=CharTok(), max_len=100, cfg=cfg, rank=0,
                          world_size=2, gather=lambda rows: [mine[0], mine[1]])
    assert one_gen.seeds == [100, 101, 102, 103, 104] and gens[0].seeds == [100, 102, 104] and gens[1].seeds == [101, 103]
    assert two["items"] == one["items"] and one["items"]["gsm8k"][3]["completion"].endswith(" seed 103 sample 0")


def test_engine_generator_texts_do_not_depend_on_the_batching(byte_engine):
    """A prompt's samples are those Engine.generate draws for it alone with its seed, whatever the batch size
    and whichever other prompts are decoded with it (the prompts a rank of two gets)."""
    engine, prompts = byte_engine
    seeds = [10, 11, 12, 13, 14]

    def texts(batch_size, which):
        return E.EngineGenerator(engine, batch_size).generate_texts([prompts[i] for i in which], 2, 12, 1.0, 40,
                                                                     [seeds[i] for i in which])  # fmt: skip

    alone = [[smp.text for smp in engine.generate([p], 2, 12, temperature=1.0, top_k=40, seed=s)[0]]
             for p, s in zip(prompts, seeds)]
    assert texts(4, range(5)) == alone
    assert texts(1, range(5)) == alone
    ranks = [texts(2, range(r, 5, 2)) for r in range(2)]
    assert [ranks[i % 2][i // 2] for i in range(5)] == alone
    assert len({t for row in alone for t in row}) > 5  # sampled: the texts differ
    assert E.EngineGenerator(engine, 2).generate_texts([], 2, 12, 1.0, 40, []) == []


@pytest.mark.parametrize("what, tail", [("chat", ". Use `chibichat eval base` for base models"), ("skills", "")])
def test_eval_chat_and_skills_refuse_a_base_model_naming_every_chat_stage(tmp_path, what, tail):
    from chibichat.cli import build_parser

    args = build_parser().parse_args(["eval", what, "--from", "base", "--home", str(tmp_path)])
    with pytest.raises(ChibiError) as e:
        args.func(args)
    assert str(e.value) == (f"eval {what} needs a chat model (--from mid, sft, rl or dpo); a base model has no chat "
                            f"format{tail}")
