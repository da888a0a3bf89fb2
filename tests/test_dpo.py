"""`chibichat dpo` (chibichat/stages/dpo.py) and its preference pairs (chibichat/tasks/preferences.py)."""

import json
import math

import pytest
import torch

from chibichat.common import ChibiError
from chibichat.stages.dpo import dpo_loss
from chibichat.tasks.preferences import generated_pairs, load_pairs


def test_dpo_loss_equals_the_hand_computed_value_on_two_pairs():
    pi_c, pi_r = torch.tensor([-5.0, -2.0]), torch.tensor([-6.0, -1.0])
    ref_c, ref_r = torch.tensor([-5.5, -2.5]), torch.tensor([-5.0, -1.5])
    losses, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # pair 0: rewards 0.5*(0.5)=0.25 and 0.5*(-1)=-0.5 -> margin 0.75; pair 1: 0.25 and 0.25 -> margin 0
    assert rc.tolist() == [0.25, 0.25] and rr.tolist() == [-0.5, 0.25]
    expect = [math.log(1 + math.exp(-0.75)), math.log(2.0)]
    assert losses.tolist() == pytest.approx(expect, abs=1e-6)
    assert float(losses.mean()) == pytest.approx((expect[0] + expect[1]) / 2, abs=1e-6)


def test_generated_pairs_differ_only_where_they_should():
    a = generated_pairs("prefs-arithmetic", "train", 20)
    for p in a:
        chosen, rejected = p["chosen"], p["rejected"]
        assert chosen[1] == rejected[1]  # the same calculator call
        assert chosen[2]["text"] != rejected[2]["text"]  # a wrong tool result and final answer
    s = generated_pairs("prefs-spelling", "train", 20)
    for p in s:  # the same call and tool output; only the copied last line is misspelled
        chosen, rejected = p["chosen"], p["rejected"]
        assert chosen[:3] == rejected[:3] and chosen[3] != rejected[3]
        word = chosen[2]["text"].replace("-", "")
        wrong = rejected[3]["text"].strip().replace("-", "")
        assert len(wrong) == len(word) and wrong != word
    lang = generated_pairs("prefs-language", "test", 20)
    for p in lang:
        q_ja = any(ord(ch) > 0x3000 for ch in p["messages"][0]["content"])
        assert any(ord(ch) > 0x3000 for ch in p["chosen"]) == q_ja != any(ord(ch) > 0x3000 for ch in p["rejected"])
    train_q = {p["messages"][0]["content"] for p in generated_pairs("prefs-language", "train", 200)}
    assert not train_q & {p["messages"][0]["content"] for p in lang}  # held-out questions are unseen
    with pytest.raises(ChibiError, match="unknown preference task 'prefs-x'"):
        generated_pairs("prefs-x")


def test_language_pairs_choose_an_answer_that_answers_the_question():
    from chibichat.tasks.identity import EN_TOPICS, JA_TOPICS, fitting_answers

    fits = {q: fitting_answers(lang, q, answers) for lang, topics in (("en", EN_TOPICS), ("ja", JA_TOPICS))
            for questions, answers in topics.values() for q in questions}
    pairs = generated_pairs("prefs-language", "train", 400)
    for p in pairs:
        q = p["messages"][0]["content"]
        assert p["chosen"] in fits[q], (q, p["chosen"])
    assert sum(p["messages"][0]["content"] in ("Do you have feelings?", "気持ちはありますか？") for p in pairs) >= 3


def test_pair_files_in_three_shapes(tmp_path):
    rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "system": "Be kind."},
        {"messages": [{"role": "user", "content": "Hi"}], "chosen": {"role": "assistant", "content": "Hello!"},
         "rejected": "Go away."},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
    ]
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pairs = load_pairs(p)
    assert pairs[0]["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert pairs[1] == pairs[2] == {"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello!",
                                    "rejected": "Go away."}
    p.write_text(json.dumps({"prompt": "Hi", "chosen": "same", "rejected": "same"}) + "\n", encoding="utf-8")
    with pytest.raises(ChibiError, match=r"p.jsonl line 1: chosen and rejected are identical"):
        load_pairs(p)


def test_replies_that_render_the_same_are_identical():
    """A string and the same text as parts (split, or with an empty part) render to the same tokens: refused."""
    from chibichat.tasks.preferences import row_to_pair

    for rejected in ([{"type": "text", "text": "same"}], [{"type": "text", "text": "sa"}, {"type": "text", "text": "me"}],
                     {"role": "assistant", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "same"}]}):
        with pytest.raises(ChibiError) as e:
            row_to_pair({"prompt": "Hi", "chosen": "same", "rejected": rejected}, "p.jsonl line 3")
        assert str(e.value) == "p.jsonl line 3: chosen and rejected are identical; the pair teaches nothing"
    # the same text as a tool call is another reply
    call = [{"type": "python", "text": "same"}]
    assert row_to_pair({"prompt": "Hi", "chosen": "same", "rejected": call}, "x")["rejected"] == call


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_dpo_refuses_fp8_before_loading_anything(tmp_path):
    """Reference log-probabilities come from no-grad forwards (never fp8): an fp8 policy would differ from its own
    reference by rounding alone."""
    from chibichat.cli import build_parser
    from chibichat.stages import dpo

    args = build_parser().parse_args(["dpo", "--home", str(tmp_path / "none"), "--data", "prefs-arithmetic",
                                      "--device", "cpu", "--dtype", "bfloat16", "--fp8"])
    with pytest.raises(ChibiError) as e:
        dpo.run(args)
    assert str(e.value) == ("dpo does not take --fp8: its reference log-probabilities come from no-grad forwards, "
                            "which never run in fp8, so the policy's (fp8) would differ from them by rounding "
                            "alone; drop --fp8")


def test_thirty_cpu_steps_raise_held_out_reward_accuracy(tmp_path):
    from test_stages_chat import make_base, run_cli

    from chibichat.train.checkpoint import load_model, save_checkpoint

    from chibichat.model.gpt import GPT, GPTConfig

    home, tok = make_base(tmp_path / "home")
    _, meta = load_model(home, "base")
    torch.manual_seed(0)  # a 512-token context: Japanese replies are long in this small byte-level vocabulary
    model = GPT(GPTConfig(**{**meta["model_config"], "seq_len": 512}))
    with torch.no_grad():  # a non-zero head, so that every weight receives gradient from the first step
        model.lm_head.normal_(0.0, 0.05)
    save_checkpoint(home.checkpoints_dir("sft", "d2"), 1, model, None,
                    {"model_config": model.config.to_dict(), "tokenizer": meta["tokenizer"]})
    run_cli("dpo", "--home", home.root, "--from", "sft", "--data", "prefs-language", "--device", "cpu",
            "--dtype", "float32", "--num-steps", 30, "--device-batch-size", 8, "--train-items", 200,
            "--val-items", 40, "--lora", 8, "--lora-lr", 1e-2, "--beta", 0.5, "--eval-every", 10)
    s = json.loads((home.checkpoints_dir("dpo", "d2") / "summary.json").read_text())
    assert s["steps"] == 30 and s["reward_accuracy_before"] == 0.0  # policy = reference: no margin yet
    assert s["reward_accuracy_after"] >= 0.8 and s["reward_margin_after"] > 0.1
    lines = [json.loads(line) for line in (home.checkpoints_dir("dpo", "d2") / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "reward_accuracy" in r] == [0, 10, 20, 30]
    assert all("train_reward_margin" in r for r in lines if "reward_accuracy" in r and r["step"] > 0)


def test_throughput_counts_the_trained_tokens_of_both_sides_not_pairs(tmp_path):
    """DPO normalises its loss by pairs, but tok/s, MFU and `tokens` count the target tokens it trains."""
    from test_stages_chat import make_base, run_cli

    from chibichat.stages.dpo import render_pairs
    from chibichat.tasks.preferences import load_pairs
    from chibichat.train.checkpoint import load_model

    home, tok = make_base(tmp_path / "home")
    model, _ = load_model(home, "base")
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"What is {k} times 3?", "chosen": f"It is {3 * k}.",
                                     "rejected": f"Maybe {3 * k + 1}, or so."}) + "\n" for k in range(20)),
                 encoding="utf-8")
    run_cli("dpo", "--home", home.root, "--from", "base", "--data", p, "--device", "cpu", "--dtype", "float32",
            "--num-steps", 1, "--device-batch-size", 18)  # one step over all 18 training pairs
    rendered, _, _ = render_pairs(tok, load_pairs(p)[:18], model.config.seq_len + 1)
    want = sum(sum(cm[1:]) + sum(rm[1:]) for _, cm, _, rm in rendered)
    assert want > 18 * 2
    s = json.loads((home.checkpoints_dir("dpo", "d2") / "summary.json").read_text())
    assert s["tokens"] == want
    step = next(json.loads(line) for line in (home.checkpoints_dir("dpo", "d2") / "metrics.jsonl").read_text()
                .splitlines() if "loss" in json.loads(line))
    assert step["tokens"] == want and step["tok_per_s"] == pytest.approx(want / step["dt_s"])


def test_ultrafeedback_pairs_through_the_hub_loader(tmp_path, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import pyarrow as pa
    import pyarrow.parquet as pq

    from chibichat.common import Home
    from chibichat.tasks.preferences import hub_pairs

    def chat(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    files = {}
    for split, n in (("train_prefs", 5), ("test_prefs", 3)):
        rows = [{"prompt": f"q{k}", "chosen": chat(f"q{k}", f"good {k}"),
                 "rejected": chat(f"q{k}", "same" if k == 1 else f"bad {k}")} for k in range(n)]
        rows[1]["chosen"] = chat("q1", "same")  # a tie: left out and counted
        for k, row in enumerate(rows):  # the real layout repeats the chosen chat as 'messages', with scores
            row.update(messages=row["chosen"], prompt_id=f"id{k}", score_chosen=8.0, score_rejected=3.0)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{split}.parquet")
        files[split] = (tmp_path / f"{split}.parquet").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            parts = self.path.strip("/").split("/")
            port = self.server.server_port
            if parts[:4] == ["api", "datasets", "HuggingFaceH4", "ultrafeedback_binarized"] and parts[6] in files:
                body = json.dumps([f"http://127.0.0.1:{port}/files/{parts[6]}/0.parquet"]).encode()
            elif parts[0] == "files" and parts[1] in files:
                body = files[parts[1]]
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("CHIBICHAT_HF_ENDPOINT", f"http://127.0.0.1:{srv.server_port}")
    try:
        home = Home.resolve(tmp_path / "home")
        pairs, ties = hub_pairs(home, "ultrafeedback", "train", 4)
        assert ties == 1 and [p["chosen"] for p in pairs] == ["good 0", "good 2", "good 3"]
        assert pairs[0] == {"messages": [{"role": "user", "content": "q0"}], "chosen": "good 0", "rejected": "bad 0"}
        test, _ = hub_pairs(home, "ultrafeedback", "test", 10)
        assert [p["rejected"] for p in test] == ["bad 0", "bad 2"]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("row, match", [
    ({"prompt": "Hi", "chosen": [{"type": "image"}], "rejected": "x"},
     r"p.jsonl line 1 chosen part 0: expected \{'type': one of \('text', 'python', 'python_output'\), 'text': str\}, "
     r"got \{'type': 'image'\}"),
    ({"prompt": "Hi", "chosen": "x", "rejected": [{"type": "text", "text": " "}]},
     r"p.jsonl line 1 rejected: empty reply \(its parts hold no text and no tool call\)"),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b", "system": 7}, r"p.jsonl line 1: system: content must be a string, "
                                                                     r"got int"),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b", "system": ""}, r"p.jsonl line 1: system: empty content"),
    ({"prompt": "Hi", "rejected": "b", "chosen": {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}]}},
     r"p.jsonl line 1 chosen: a reply message with tool_calls needs the tool's output after it"),
    ({"prompt": "Hi", "chosen": {"role": "assistant", "content": "a", "name": "bot"}, "rejected": "b"},
     r"p.jsonl line 1 chosen: unknown key\(s\) \['name'\] in the reply message; it takes role, content"),
    ({"messages": [{"role": "user", "content": "Hi", "weight": 1}], "chosen": "a", "rejected": "b"},
     r"p.jsonl line 1: messages message 0 has a 'weight', which has no meaning in a preference pair"),
    ({"messages": [{"role": "user", "content": "Hi"}], "prompt": "Hi", "chosen": "a", "rejected": "b"},
     r"p.jsonl line 1: give the prompt as 'prompt' or as 'messages', not both"),
    ({"prompt": "Other", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "b"}]},
     r"p.jsonl line 1: 'prompt' is not the last user message of the chosen/rejected chats; leave it out"),
    ({"messages": [{"role": "user", "content": "Other"}],
      "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "b"}]},
     r"p.jsonl line 1: 'messages' is neither the chats' shared prompt nor the chosen chat; leave it out"),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b", "sytem": "Be kind."},  # a typo is refused, not ignored
     r"p.jsonl line 1: unknown key\(s\) \['sytem'\] in a preference row, which takes prompt, messages, chosen, "
     r"rejected, system \(1 problem"),
])
def test_bad_pair_rows_are_refused_with_file_and_line(tmp_path, row, match):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    assert load_pairs(p) == [{"messages": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}]
    p.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(ChibiError, match=match):
        load_pairs(p)


@pytest.fixture(scope="module")
def tok():
    from chibichat.tokenizer import train_tokenizer

    return train_tokenizer(["What is the capital of France? Paris is. Be kind. Thanks!"] * 4, vocab_size=300)


def test_an_overflowing_pair_loses_the_same_turns_on_both_sides(tok):
    from chibichat.render import render_conversation, render_prompt
    from chibichat.stages.dpo import render_pairs

    system = {"role": "system", "content": "Be kind."}
    first = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    last = {"role": "user", "content": "Thanks!"}
    pair = {"messages": [system, *first, last], "chosen": "You are welcome, happy to help any time. " * 6,
            "rejected": "Ok."}
    big = 1 << 20
    whole = len(render_conversation(tok, {"messages": [*pair["messages"], {"role": "assistant", "content": pair["chosen"]}]},
                                    big).ids)
    out, dropped, shortened = render_pairs(tok, [pair], big)
    assert (len(out), dropped, shortened) == (1, 0, 0)
    # only the chosen side overflows: its first exchange goes, and the rejected side loses the same one
    out, dropped, shortened = render_pairs(tok, [pair], whole - 1)
    assert (len(out), dropped, shortened) == (1, 0, 1)
    c_ids, _, r_ids, _ = out[0]
    start = tok.special_id("<|assistant_start|>")
    prompt = lambda ids: ids[:len(ids) - ids[::-1].index(start)]  # through the final <|assistant_start|>
    assert prompt(c_ids) == prompt(r_ids) == render_prompt(tok, {"messages": [system, last]}, big).ids
    alone = len(render_conversation(tok, {"messages": [system, last, {"role": "assistant", "content": pair["chosen"]}]},
                                    big).ids)
    assert render_pairs(tok, [pair], alone - 1) == ([], 1, 0)  # the final exchange alone does not fit: left out


def test_resume_on_changed_pairs_is_refused():
    from chibichat.stages.dpo import PairBatches

    rendered = [([1, 2, k], [0, 1, 1], [1, 2, k + 50], [0, 1, 1]) for k in range(6)]
    ref = torch.zeros(6)
    a = PairBatches(rendered, ref, ref, 2, 0, seed=1)
    next(a)
    state = a.state_dict()
    same = PairBatches(list(rendered), ref, ref, 2, 0, seed=1)
    same.load_state_dict(state)
    assert (same.epoch, same.cursor) == (0, 2) and torch.equal(next(same)[0], next(a)[0])
    changed = list(rendered)
    changed[3] = ([1, 2, 3], [0, 1, 1], [1, 2, 99], [0, 1, 1])  # one middle pair, same count
    with pytest.raises(ChibiError, match=r"the checkpoint's DPO training data was trained on other pairs \(data "
                                         r"fingerprint \w+, now \w+\): .* restore the data it was trained on, or start "
                                         r"without --resume"):
        PairBatches(changed, ref, ref, 2, 0, seed=1).load_state_dict(state)
    with pytest.raises(ChibiError, match="has no fingerprint of its pairs"):
        PairBatches(list(rendered), ref, ref, 2, 0, seed=1).load_state_dict({k: v for k, v in state.items() if k != "data"})


def test_train_items_takes_the_first_training_pairs_of_a_file(tmp_path):
    import argparse

    from chibichat.stages.dpo import _data

    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{k}", "chosen": f"good {k}", "rejected": f"bad {k}"}) + "\n"
                         for k in range(20)), encoding="utf-8")
    args = argparse.Namespace(data=str(p), train_items=None, val_items=100, seed=0)
    train, val, copies = _data(args, None)
    assert [len(train), len(val), copies] == [18, 2, 0] and val[0]["chosen"] == "good 18"
    args.train_items = 5
    assert _data(args, None) == (train[:5], val, 0)
    args.train_items = 19
    with pytest.raises(ChibiError, match=r"--train-items 19, but --data .*p.jsonl has 18 training pairs \(2 of its 20 "
                                         r"are held out\); lower --train-items, or leave it out"):
        _data(args, None)


def test_held_out_pairs_that_repeat_a_training_pair_are_left_out_and_counted(tmp_path):
    """The last 10% of a file is held out; a held-out row that repeats a training pair (here with its chosen reply
    as parts) would score the model on training data."""
    import argparse

    from chibichat.stages.dpo import _data

    rows = [{"prompt": f"q{k}", "chosen": f"good {k}", "rejected": f"bad {k}"} for k in range(20)]
    rows[18] = {**rows[3], "chosen": [{"type": "text", "text": "good 3"}]}
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = argparse.Namespace(data=str(p), train_items=3, val_items=100, seed=0)  # row 3 is not trained on: still out
    train, val, copies = _data(args, None)
    assert [len(train), copies] == [3, 1] and val == [{"messages": [{"role": "user", "content": "q19"}],
                                                        "chosen": "good 19", "rejected": "bad 19"}]
    rows[19] = rows[0]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ChibiError) as e:
        _data(args, None)
    assert str(e.value) == (f"each of the 2 held-out pairs of --data {p} (its last 2 rows) repeats a training pair, "
                            "so the held-out scores would be measured on training data; remove the repeated rows")


def test_a_pair_file_with_several_problems_names_every_line(tmp_path):
    good = {"prompt": "Hi", "chosen": "a", "rejected": "b"}
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join([json.dumps(good), json.dumps({**good, "chosen": "b"}), json.dumps(good), "{bad",
                            json.dumps({**good, "system": 7})]) + "\n", encoding="utf-8")
    with pytest.raises(ChibiError, match=r"p.jsonl line 2: chosen and rejected are identical; the pair teaches nothing "
                                         r"\(3 problem\(s\), at lines 2, 4, 5; fix them all before training\)$"):
        load_pairs(p)
