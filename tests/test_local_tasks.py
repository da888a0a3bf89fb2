"""Your own data as tasks (`file:PATH`, chibichat/tasks/local.py) and `chibichat data check`."""

import json
import re

import pytest

from chibichat.common import ChibiError
from chibichat.render import render_conversation
from chibichat.tasks.local import match_answer
from chibichat.tasks.registry import get_task
from chibichat.tokenizer import train_tokenizer

SYSTEM = "You are Kiku, the support bot of Acme."
USER1, BOT1 = "How do I reset my password?", "Open Settings, then Account, then Reset."
USER2, BOT2 = "And my email?", "Same page, one line below."


@pytest.fixture(scope="module")
def tok():
    import pydoc_data.topics

    docs = [t[:2000] for t in sorted(pydoc_data.topics.topics.values())]
    return train_tokenizer(docs + [SYSTEM, USER1, BOT1, USER2, BOT2], vocab_size=600, split="gpt4")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


OPENAI = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER1},
                       {"role": "assistant", "content": BOT1}, {"role": "user", "content": USER2},
                       {"role": "assistant", "content": [{"type": "text", "text": BOT2}]}]}
OPENAI_PLAIN = {"messages": OPENAI["messages"][:4] + [{"role": "assistant", "content": BOT2}]}  # parquet: one type
SHAREGPT = {"system": SYSTEM, "conversations": [{"from": "human", "value": USER1}, {"from": "gpt", "value": BOT1},
                                                {"from": "human", "value": USER2}, {"from": "gpt", "value": BOT2}]}


def test_every_format_renders_to_the_same_ids(tok, tmp_path):
    alpaca_one = {"system": SYSTEM, "instruction": USER1, "input": "", "output": BOT1}
    openai_one = {"messages": OPENAI["messages"][:3]}
    files = {
        "openai.jsonl": write_jsonl(tmp_path / "openai.jsonl", [OPENAI]),
        "sharegpt.jsonl": write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT]),
        "openai.parquet": write_parquet(tmp_path / "openai.parquet", [OPENAI_PLAIN]),
        "sharegpt.parquet": write_parquet(tmp_path / "sharegpt.parquet", [SHAREGPT]),
    }
    ids = {}
    for name, path in files.items():
        t = get_task(f"file:{path}")
        assert t.kind == "conversation" and len(t) == 1
        ids[name] = render_conversation(tok, t[0], 1000).ids
    reference = render_conversation(tok, OPENAI, 1000).ids
    assert all(v == reference for v in ids.values()), ids
    # Alpaca holds one exchange: the same ids as the one-exchange OpenAI row, JSONL and parquet
    one = render_conversation(tok, openai_one, 1000).ids
    for path in (write_jsonl(tmp_path / "a.jsonl", [alpaca_one]), write_parquet(tmp_path / "a.parquet", [alpaca_one])):
        assert render_conversation(tok, get_task(f"file:{path}")[0], 1000).ids == one
    # Alpaca input joins the instruction after a blank line
    t = get_task(f"file:{write_jsonl(tmp_path / 'b.jsonl', [{'instruction': 'Sum', 'input': '2 3', 'output': '5'}])}")
    assert t[0]["messages"][0] == {"role": "user", "content": "Sum\n\n2 3"}


def test_system_prompt_is_read_not_trained_and_survives_shortening(tok, tmp_path):
    t = get_task(f"file:{write_jsonl(tmp_path / 'c.jsonl', [OPENAI])}")
    full = render_conversation(tok, t[0], 1000)
    first = tok.encode(f"{SYSTEM}\n\n{USER1}")  # the system text leads the first user message
    assert full.ids[:2] == [tok.bos_id, tok.special_id("<|user_start|>")]
    assert full.ids[2:2 + len(first)] == first and not any(full.mask[:2 + len(first) + 1])
    short = render_conversation(tok, t[0], len(full.ids) - 3)  # too long: the first exchange goes
    assert short.status == "shortened" and short.dropped_turns == 2
    second = tok.encode(f"{SYSTEM}\n\n{USER2}")  # still read, now ahead of the kept user message
    assert short.ids[2:2 + len(second)] == second and not any(short.mask[:2 + len(second) + 1])


def test_openai_tool_calls_become_calculator_parts(tok, tmp_path):
    row = {"messages": [
        {"role": "user", "content": "What is 12*7+3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*7+3"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "87"},
        {"role": "assistant", "content": "#### 87"}]}
    item = get_task(f"file:{write_jsonl(tmp_path / 't.jsonl', [row])}")[0]
    assert item["messages"][1] == {"role": "assistant", "content": [
        {"type": "python", "text": "12*7+3"}, {"type": "python_output", "text": "87"},
        {"type": "text", "text": "#### 87"}]}
    r = render_conversation(tok, item, 1000)
    S = tok.special_id
    i, j = r.ids.index(S("<|python_start|>")), r.ids.index(S("<|output_start|>"))
    assert r.mask[i] == 1 and r.mask[j] == 0  # the call is learned, the tool's output only read
    bad = {"messages": [row["messages"][0], {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "web_search", "arguments": "{}"}}]}]}
    with pytest.raises(ChibiError, match=r"line 1: message 1: tool 'web_search' is not supported"):
        get_task(f"file:{write_jsonl(tmp_path / 'u.jsonl', [bad])}")


def test_file_in_mix_with_epochs_after_the_last_equals(tmp_path):
    from chibichat.stages.sft import build_mixtures, parse_mix

    d = tmp_path / "x=y"
    d.mkdir()
    path = write_jsonl(d / "s.jsonl", [support_row(k) for k in range(40)])
    mix = parse_mix(f"chitchat=0.1,file:{path}=3")
    assert mix == [("chitchat", 0.1), (f"file:{path}", 3.0)]
    train, val, _, copies = build_mixtures(mix, val_items=5, seed=0)
    assert train.summary()[f"file:{path}"] == 3 * 38 and val.summary()[f"file:{path}"] == 2  # last 5% held out
    assert copies == {}


def support_row(k):
    return {"messages": [{"role": "user", "content": f"{USER1} ({k})"}, {"role": "assistant", "content": BOT1}]}


def test_held_out_rows_that_repeat_a_training_row_are_left_out_and_counted(tmp_path):
    """A row repeated in a file must not land on both sides: the held-out loss would be training loss."""
    from chibichat.stages.sft import build_mixtures, parse_mix

    # the last 2 rows are held out; the first repeats row 3 (as ShareGPT: the same conversation once parsed)
    sharegpt3 = {"conversations": [{"from": "human", "value": f"{USER1} (3)"}, {"from": "gpt", "value": BOT1}]}
    path = write_jsonl(tmp_path / "s.jsonl", [support_row(k) for k in range(38)] + [sharegpt3, support_row(39)])
    train, val, _, copies = build_mixtures(parse_mix(f"file:{path}=1"), val_items=5, seed=0)
    assert copies == {f"file:{path}": 1} and val.summary() == {f"file:{path}": 1}
    assert val.tasks[0][0]["messages"][0]["content"] == f"{USER1} (39)" and train.summary() == {f"file:{path}": 38}
    write_jsonl(path, [support_row(k) for k in range(38)] + [sharegpt3, support_row(4)])
    with pytest.raises(ChibiError) as e:
        build_mixtures(parse_mix(f"file:{path}=1"), val_items=5, seed=0)
    assert str(e.value) == (f"each of the 2 held-out items of 'file:{path}' (its last 2 rows) repeats one of its "
                            "training rows, so the held-out loss would be measured on training data; remove the "
                            f"repeated rows (`chibichat data check {path}` lists them)")


def test_verifiable_rows_are_an_rl_task(tmp_path):
    rows = [{"prompt": "2+2?", "answer": 4, "match": "numeric"}, {"prompt": "Capital of France?", "answer": "Paris"},
            {"prompt": "A colour", "answer": "(red|blue)", "match": "regex"}]
    t = get_task(f"file:{write_jsonl(tmp_path / 'v.jsonl', rows)}")
    assert t.kind == "generative" and t[0]["messages"] == [{"role": "user", "content": "2+2?"}]
    assert t.evaluate(t[0], "so #### 4") and t.evaluate(t[0], "It is 4.0") and not t.evaluate(t[0], "#### 5")
    # the last number is read only without "####": a "####" that gives no number is no answer
    assert not match_answer("numeric", "7", "#### maybe 7") and not match_answer("numeric", "4", "#### 4/5 or 4")
    assert match_answer("numeric", "7", "It is 7.")
    assert not match_answer("numeric", "4", "It is 3/4.")  # a fraction is no answer, not its denominator
    assert not match_answer("numeric", "3", "4分の3です")  # 3/4 in Japanese, the same
    # a sum not worked out is no answer: neither its last part nor that part made negative
    assert not match_answer("numeric", "-2", "the answer is 5-2") and not match_answer("numeric", "2", "It is 5-2")
    assert match_answer("numeric", "3", "5-2=3") and match_answer("numeric", "-5", "It is -5.")
    assert t.evaluate(t[1], " Paris\n") and not t.evaluate(t[1], "Paris!")
    assert t.evaluate(t[2], "blue") and not t.evaluate(t[2], "green")
    with pytest.raises(ChibiError, match=r"line 1: match 'numeric' needs a numeric answer"):
        get_task(f"file:{write_jsonl(tmp_path / 'w.jsonl', [{'prompt': 'p', 'answer': 'x', 'match': 'numeric'}])}")
    with pytest.raises(ChibiError, match="mixes chat rows and verifiable"):
        get_task(f"file:{write_jsonl(tmp_path / 'm.jsonl', [OPENAI, rows[0]])}")


BAD_LINES = [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', None),
    (b'{"messages": [{"role": "user", "content": "hi"', "bad JSON"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    (b'{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "yo"}]}', "empty content"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
     b'{"role": "assistant", "content": "c"}]}', "two user turns in a row"),
    (b'{"instruction": "caf\xe9", "output": "x"}', "not UTF-8"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "duplicate"),
]


def test_loading_stops_at_the_first_bad_line_with_its_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    with pytest.raises(ChibiError, match=r"bad.jsonl line 2: bad JSON .*2 problem\(s\)"):
        get_task(f"file:{p}")


def test_data_check_lists_every_error_with_its_line(tmp_path, capsys):
    from chibichat.tasks.local import check_file

    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    report = check_file(p)
    got = {n: msg for n, msg in report["errors"]}
    for n, (_, expect) in enumerate(BAD_LINES, start=1):
        if expect is None or expect == "duplicate":
            assert n not in got
        else:
            assert expect in got[n], (n, got.get(n))
    assert report["rows"] == 7 and report["valid"] == 2 and report["duplicates"] == [(7, 1)]


def test_a_bom_nulls_a_repeated_key_a_json_array_and_a_folder(tmp_path):
    """Windows files (BOM, CRLF, no final newline) and nulls load; a key given twice, a .json array saved as
    .jsonl and a folder are refused with the fix, never read as something else."""
    from chibichat.tasks.local import load_items

    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    p = tmp_path / "win.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\r\n" + json.dumps(row).encode())
    assert load_items(p)[1] == [row, row]
    p.write_bytes(b'{"messages": [{"role": "user", "content": "hi", "content": "bye"}, '
                  b'{"role": "assistant", "content": "yo"}]}\n')
    with pytest.raises(ChibiError) as e:
        load_items(p)
    assert str(e.value) == (f"{p} line 1: bad JSON (key 'content' appears twice in one object; keep one) (1 problem(s); "
                            f"`chibichat data check {p}` lists them all)")
    p = tmp_path / "array.jsonl"
    text = json.dumps([row, row], indent=2)
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ChibiError) as e:
        load_items(p)
    assert str(e.value) == (f"{p} line 1: the file is one JSON array (of 2 items, on {text.count(chr(10)) + 1} lines), "
                            "not JSON Lines; write each item as a JSON object on a line of its own (e.g. `jq -c '.[]' "
                            f"array.jsonl > array-lines.jsonl`) (1 problem(s); `chibichat data check {p}` lists them all)")
    # a null is an absent key in JSON Lines as in parquet (pandas writes one for every missing field)
    p = write_jsonl(tmp_path / "nulls.jsonl", [{"instruction": "hi", "input": None, "output": "yo", "system": None}])
    assert load_items(p)[1] == [row]
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    with pytest.raises(ChibiError) as e:
        load_items(folder)
    assert str(e.value) == f"{folder} is a directory, not a file; give the path of a .jsonl file"


def test_data_check_cli_reports_fit_and_plan(tmp_path, capsys):
    from test_stages_chat import make_base

    from chibichat.cli import main

    home, tok = make_base(tmp_path / "home")
    long = {"messages": [{"role": "user", "content": "tell me a story " * 30}, {"role": "assistant", "content": "no"},
                         {"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}
    huge = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 400}]}
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\n".join(l for l, _ in BAD_LINES[:3]) + b"\n" + json.dumps(long).encode() + b"\n"
                  + json.dumps(huge).encode() + b"\n")
    rc = main(["data", "check", str(p), "--home", str(home.root), "--from", "base", "--num-steps", "10",
               "--device-batch-size", "2"])
    out = capsys.readouterr().out
    assert rc == 1  # problems found
    assert "5 lines, 3 valid (chat), 2 problem(s), 0 duplicate(s)" in out
    assert "line 2: bad JSON" in out and "line 3: message 0: unknown role 'robot'" in out
    assert "fit: 1 whole, 1 shortened (whole early turns left out), 1 dropped" in out
    assert "epochs of this file" in out and "time: unknown" in out


def test_data_check_times_an_averaged_checkpoint_by_its_member_runs(tmp_path, capsys):
    """A `--soup K` average (the quickstart's sft) logs no steps itself: the estimate uses its runs' tok/s."""
    import shutil

    from test_stages_chat import make_base

    from chibichat.cli import main

    home, tok = make_base(tmp_path / "home")
    base = home.root / "checkpoints" / "base" / "d2"
    avg = home.root / "checkpoints" / "sft" / "d2"
    shutil.copytree(base, avg)
    meta_path = next(avg.glob("step_*")) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "soup": {"members": ["d2-soup0", "d2-soup1"], "seeds": [0, 1]}}))
    for member, speeds in (("d2-soup0", [100.0, 300.0]), ("d2-soup1", [200.0])):
        (avg.parent / member).mkdir()
        (avg.parent / member / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "tok_per_s": v}) + "\n" for i, v in enumerate(speeds)))
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]}])
    assert main(["data", "check", str(p), "--home", str(home.root), "--from", "sft", "--from-tag", "d2",
                 "--num-steps", "10", "--device-batch-size", "2"]) == 0
    seq_len = meta["model_config"]["seq_len"]
    assert f"time: ~{10 * 2 * seq_len / 200:.0f} s at 200 tok/s (the source run's median)" in capsys.readouterr().out
    # RL rows: a step samples before it trains, so the chat rate does not time it; no valid row: nothing to measure
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "1+1?", "answer": "2", "match": "numeric"}])
    assert main(["data", "check", str(qa), "--home", str(home.root), "--from", "sft", "--from-tag", "d2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("time: not estimated (an RL step samples replies before it "
                                                        "trains; `rl --minutes M` fits its steps to a budget)")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1?"}])
    assert main(["data", "check", str(bad), "--home", str(home.root), "--from", "sft", "--from-tag", "d2"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (f"no valid line to measure against the context of {next(avg.glob('step_*'))}: "
                                    "fix the problems above")
    assert "None" not in out and "time:" not in out


def test_identity_persona_replaces_name_and_creator_in_en_and_ja(tmp_path):
    from chibichat.stages.sft import build_mixtures
    from chibichat.tasks.identity import parse_persona

    persona = parse_persona(" name=Kiku , creator=Acme Inc.")
    assert persona == {"name": "Kiku", "creator": "Acme Inc."}
    (tmp_path / "p.json").write_text(json.dumps({"name": "Kiku"}), encoding="utf-8")
    assert parse_persona(str(tmp_path / "p.json")) == {"name": "Kiku"}
    for bad, match in [("nick=K", r"unknown key\(s\) \['nick'\]"), ("Kiku", "write key=value"),
                       ("name=", "must be one line"), (str(tmp_path / "none.json"), "does not exist")]:
        with pytest.raises(ChibiError, match=match):
            parse_persona(bad)
    train, val, _, _ = build_mixtures([("identity", 1.0), ("identity-ja", 1.0)], val_items=20, seed=0, persona=persona)
    replies = {task: " ".join(m["content"] for t, it in train if t == task for m in it["messages"]
                              if m["role"] == "assistant") for task in ("identity", "identity-ja")}
    assert "Kiku" in replies["identity"] and "Acme Inc." in replies["identity"]
    assert "Kikuです" in replies["identity-ja"] and "Acme Inc.が作りました" in replies["identity-ja"]
    assert "chibichat" not in replies["identity"] + replies["identity-ja"]  # the shipped persona is gone
    assert any("Kiku" in m["content"] for _, it in val for m in it["messages"])  # the held-out split too
    with pytest.raises(ChibiError, match="--mix names none; add identity=1"):
        build_mixtures([("chitchat", 0.1)], val_items=5, seed=0, persona=persona)


def test_an_assistant_message_without_text_or_tool_call_is_refused(tmp_path):
    from chibichat.tasks.local import RowError, row_to_item

    with pytest.raises(RowError, match=r"^message 1: empty content \(an assistant message needs text or a tool call\)$"):
        row_to_item({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]})
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []}]}]
    for path in (write_jsonl(tmp_path / "e.jsonl", rows), write_parquet(tmp_path / "e.parquet", rows)):
        with pytest.raises(ChibiError, match=rf"e.{path.suffix[1:]} (line|row) 1: message 1: empty content"):
            get_task(f"file:{path}")


def test_openai_weight_zero_is_read_but_not_trained(tok, tmp_path):
    from chibichat.tasks.local import refuse_weights

    msgs = [{"role": "user", "content": USER1}, {"role": "assistant", "content": BOT1, "weight": 0},
            {"role": "user", "content": USER2}, {"role": "assistant", "content": BOT2, "weight": 1}]
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    for path in (write_jsonl(tmp_path / "w.jsonl", [{"messages": msgs}]),
                 write_parquet(tmp_path / "w.parquet", [{"messages": msgs}])):  # parquet: weight null on users
        t = get_task(f"file:{path}")
        assert t[0]["messages"][1] == {"role": "assistant", "content": BOT1, "weight": 0}
        assert "weight" not in t[0]["messages"][3]  # 1 is the default
        r, full = render_conversation(tok, t[0], 1000), render_conversation(tok, {"messages": plain}, 1000)
        end = r.ids.index(tok.special_id("<|assistant_end|>"))
        assert r.ids == full.ids and not any(r.mask[:end + 1]) and any(full.mask[:end + 1])
        assert r.mask[end + 1:] == full.mask[end + 1:]
        assert t.weight0_lines == [1]
        with pytest.raises(ChibiError, match=rf"w.{path.suffix[1:]} (line|row) 1: an assistant message has weight 0, "
                                             r"but midtrain trains on every token, .* train this file with sft"):
            refuse_weights([t.slice(0, 1)], "midtrain")
    cases = [
        ({**msgs[1], "weight": 2}, r"line 1: message 1: weight must be 0 \(not trained\) or 1 \(trained\), got 2"),
        ({**msgs[1], "weight": "0"}, "weight must be 0"),
    ]
    for bad, match in cases:
        with pytest.raises(ChibiError, match=match):
            get_task(f"file:{write_jsonl(tmp_path / 'x.jsonl', [{'messages': [msgs[0], bad, *msgs[2:]]}])}")
    last0 = [*msgs[:3], {**msgs[3], "weight": 0}]
    with pytest.raises(ChibiError, match="line 1: the final assistant message has weight 0"):
        get_task(f"file:{write_jsonl(tmp_path / 'y.jsonl', [{'messages': last0}])}")
    user_w = [{**msgs[0], "weight": 1}, *msgs[1:]]
    with pytest.raises(ChibiError, match=r"line 1: message 0 \(user\): unknown key\(s\) \['weight'\]; it takes role, content"):
        get_task(f"file:{write_jsonl(tmp_path / 'z.jsonl', [{'messages': user_w}])}")


def test_unknown_keys_and_two_shapes_in_a_row_are_refused(tmp_path):
    from chibichat.tasks.local import RowError, row_to_item

    chat = OPENAI_PLAIN["messages"][1:3]
    cases = [
        ({"messages": chat, "id": 7}, r"unknown key\(s\) \['id'\] in a row of the OpenAI chat shape, which takes "
                                      r"messages, system$"),
        ({"instruction": USER1, "output": BOT1, "history": [["a", "b"]]},
         r"unknown key\(s\) \['history'\] in a row of the Alpaca shape, which takes instruction, input, output, "
         r"system; Alpaca 'history' \(earlier turns\) is not read"),
        ({**SHAREGPT, "messages": chat}, r"the row has the keys of 2 shapes \(OpenAI chat, ShareGPT\); keep one per row"),
        ({"messages": [chat[0], {**chat[1], "name": "bot"}]},
         r"message 1 \(assistant\): unknown key\(s\) \['name'\]; it takes role, content, tool_calls, weight"),
        ({"conversations": [{"from": "human", "value": "a", "weight": 0}, {"from": "gpt", "value": "b"}]},
         r"turn 0: unknown key\(s\) \['weight'\]; it takes from, value"),
        ({"prompt": "p", "answer": "a", "note": "x"}, r"unknown key\(s\) \['note'\] in a row of the verifiable shape"),
    ]
    for row, match in cases:
        with pytest.raises(RowError, match=match):
            row_to_item(row)
    p = write_jsonl(tmp_path / "k.jsonl", [OPENAI, {"messages": chat, "id": 7}])
    with pytest.raises(ChibiError, match=r"k.jsonl line 2: unknown key\(s\) \['id'\]"):
        get_task(f"file:{p}")


def test_nan_and_infinity_answers_are_refused_with_their_line(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text('{"prompt": "x", "answer": 1, "match": "numeric"}\n{"prompt": "x", "answer": NaN, "match": "numeric"}\n',
                 encoding="utf-8")
    with pytest.raises(ChibiError, match=r"n.jsonl line 2: bad JSON \(NaN is not JSON; write a number or a string\)"):
        get_task(f"file:{p}")
    p.write_text('{"prompt": "x", "answer": -Infinity}\n', encoding="utf-8")
    with pytest.raises(ChibiError, match=r"line 1: bad JSON \(-Infinity is not JSON"):
        get_task(f"file:{p}")
    q = write_parquet(tmp_path / "n.parquet", [{"prompt": "x", "answer": 1.0}, {"prompt": "y", "answer": float("nan")}])
    with pytest.raises(ChibiError, match=r"n.parquet row 2: answer must be a finite number, got nan"):
        get_task(f"file:{q}")


def test_mix_epochs_that_give_a_file_no_item_or_are_infinite_are_refused(tmp_path):
    from chibichat.stages.sft import build_mixtures, parse_mix

    path = write_jsonl(tmp_path / "small.jsonl", [support_row(k) for k in range(4)])  # 3 train items, 1 held out
    with pytest.raises(ChibiError, match=rf"epochs 0.1 of task 'file:{re.escape(str(path))}' \(3 items\) rounds to 0 items; give it "
                                         r"epochs >= 0.333 \(one item\), or leave it out of the mixture"):
        build_mixtures(parse_mix(f"file:{path}=0.1"), val_items=5, seed=0)
    assert build_mixtures(parse_mix(f"file:{path}=0.34"), val_items=5, seed=0)[0].summary() == {f"file:{path}": 1}
    for bad in ("inf", "nan", "-1"):
        with pytest.raises(ChibiError, match=rf"--mix entry 'file:{re.escape(str(path))}={bad}': epochs must be a finite number > 0"):
            parse_mix(f"file:{path}={bad}")
