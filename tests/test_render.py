import pytest

from chibichat.common import ChibiError
from chibichat.render import RenderStats, render_conversation, render_for_completion, render_prompt
from chibichat.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    import pydoc_data.topics

    docs = [t[:2000] for t in sorted(pydoc_data.topics.topics.values())]
    return train_tokenizer(docs + ["こんにちは、元気ですか？ 2+2=4 print(1)"], vocab_size=600, split="gpt4")


def conv(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"messages": msgs}


def S(tok, name):
    return tok.special_id(f"<|{name}|>")


def test_layout_and_masks_per_role(tok):
    c = conv(
        "What is 2+2?",
        [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ],
    )
    r = render_conversation(tok, c, max_len=1000)
    assert r.status == "ok" and r.dropped_turns == 0
    e = tok.encode
    expect = [
        (S(tok, "bos"), 0),
        (S(tok, "user_start"), 0),
        *[(i, 0) for i in e("What is 2+2?")],
        (S(tok, "user_end"), 0),
        (S(tok, "assistant_start"), 0),
        *[(i, 1) for i in e("Let me compute.")],
        (S(tok, "python_start"), 1),
        *[(i, 1) for i in e("2+2")],
        (S(tok, "python_end"), 1),
        (S(tok, "output_start"), 0),
        *[(i, 0) for i in e("4")],
        (S(tok, "output_end"), 0),
        *[(i, 1) for i in e("It is 4.")],
        (S(tok, "assistant_end"), 1),
    ]
    assert list(zip(r.ids, r.mask)) == expect


def test_system_is_merged_into_first_user(tok):
    with_sys = render_conversation(tok, conv("Hi", "Hello!", system="Be brief."), max_len=500)
    merged = render_conversation(tok, conv("Be brief.\n\nHi", "Hello!"), max_len=500)
    assert with_sys.ids == merged.ids and with_sys.mask == merged.mask


def test_multi_turn_every_assistant_turn_supervised(tok):
    r = render_conversation(tok, conv("a", "b", "c", "d"), max_len=500)
    assert r.ids.count(S(tok, "assistant_end")) == 2
    supervised = tok.decode([i for i, m in zip(r.ids, r.mask) if m])
    assert supervised == "b<|assistant_end|>d<|assistant_end|>"


def long_conv(n_pairs, words=30):
    turns = []
    for i in range(n_pairs):
        turns += [f"question {i} " + "word " * words, f"answer {i} " + "text " * words]
    return conv(*turns)


def test_over_length_shorten_keeps_bos_and_final_turn(tok):
    c = long_conv(4)
    full = render_conversation(tok, c, max_len=10_000)
    assert full.status == "ok"
    limit = len(full.ids) - 5  # just too long: the first exchange must go
    r = render_conversation(tok, c, max_len=limit)
    assert r.status == "shortened" and r.dropped_turns == 2 and len(r.ids) <= limit
    assert r.ids[0] == tok.bos_id and r.ids[-1] == S(tok, "assistant_end")
    text = tok.decode(r.ids)
    assert "question 0" not in text and "answer 0" not in text
    assert text.endswith("answer 3 " + "text " * 30 + "<|assistant_end|>")
    # the kept part is exactly the tail of the full render (whole exchanges, nothing cut)
    assert r.ids[1:] == full.ids[len(full.ids) - len(r.ids) + 1 :]
    assert r.mask[1:] == full.mask[len(full.mask) - len(r.mask) + 1 :]


def test_shorten_keeps_system_text(tok):
    c = long_conv(3)
    c["messages"].insert(0, {"role": "system", "content": "SYSTEM RULES"})
    full = render_conversation(tok, c, max_len=10_000)
    r = render_conversation(tok, c, max_len=len(full.ids) - 3)
    assert r.status == "shortened" and tok.decode(r.ids).startswith("<|bos|><|user_start|>SYSTEM RULES\n\nquestion 1")


def test_over_length_drop_and_final_pair_too_long(tok):
    c = long_conv(3)
    full = render_conversation(tok, c, max_len=10_000)
    r = render_conversation(tok, c, max_len=len(full.ids) - 1, overflow="drop")
    assert (r.status, r.ids, r.mask) == ("dropped", [], [])
    # exactly fits: ok
    assert render_conversation(tok, c, max_len=len(full.ids)).status == "ok"
    # even the last exchange alone is longer than max_len -> dropped, never cut
    r = render_conversation(tok, long_conv(1, words=200), max_len=50)
    assert (r.status, r.ids) == ("dropped", [])


def test_render_stats_counts(tok):
    stats = RenderStats()
    c = long_conv(3)
    n = len(render_conversation(tok, c, max_len=10_000).ids)
    for limit, task in [(n, "a"), (n - 2, "a"), (10, "a"), (n, "b")]:
        stats.add(task, render_conversation(tok, c, max_len=limit).status)
    assert stats.as_dict() == {"a": {"ok": 1, "shortened": 1, "dropped": 1}, "b": {"ok": 1, "shortened": 0, "dropped": 0}}
    assert stats.total("dropped") == 1
    assert "a: 1 shortened, 1 dropped of 3" in stats.summary()
    with pytest.raises(ValueError):
        stats.add("a", "truncated")


def test_bad_conversations_name_the_turn(tok):
    with pytest.raises(ChibiError, match="message 1 has role 'user'"):
        render_conversation(tok, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 100)
    with pytest.raises(ChibiError, match="message 2 has role 'system'"):
        msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}]
        render_conversation(tok, {"messages": msgs}, 100)
    with pytest.raises(ChibiError, match="ends with a user message"):
        render_conversation(tok, conv("a", "b", "c"), 100)
    with pytest.raises(ChibiError, match="no messages"):
        render_conversation(tok, {"messages": []}, 100)
    with pytest.raises(ChibiError, match="only a system message"):
        render_conversation(tok, {"messages": [{"role": "system", "content": "s"}]}, 100)
    with pytest.raises(ChibiError, match="part 0"):
        render_conversation(tok, conv("a", [{"type": "image", "text": "x"}]), 100)
    with pytest.raises(ChibiError, match=r"message 0 \(user\): content must be a string"):
        render_conversation(tok, conv(["a"], "b"), 100)
    with pytest.raises(ChibiError, match="max_len"):
        render_conversation(tok, conv("a", "b"), None)
    with pytest.raises(ChibiError, match="overflow policy"):
        render_conversation(tok, conv("a", "b"), 100, overflow="truncate")
    with pytest.raises(ChibiError, match="dict with a 'messages' list"):
        render_conversation(tok, [], 100)


def test_weight_zero_leaves_an_earlier_assistant_turn_out_of_the_mask(tok):
    plain = conv("Hi", "Hello there.", "2+2?", "4.")
    weighted = {"messages": [dict(m) for m in plain["messages"]]}
    weighted["messages"][1]["weight"] = 0
    weighted["messages"][3]["weight"] = 1
    a, b = render_conversation(tok, plain, 500), render_conversation(tok, weighted, 500)
    assert b.ids == a.ids  # the turn is still read
    first_end = a.ids.index(S(tok, "assistant_end"))
    assert b.mask[:first_end + 1] == [0] * (first_end + 1)  # ... but none of it is a target
    assert b.mask[first_end + 1:] == a.mask[first_end + 1:] and sum(a.mask[:first_end + 1]) > 0
    for i, w, match in [(1, 0.5, r"message 1 \(assistant\): weight must be 0 \(not trained\) or 1 \(trained\), got 0.5"),
                        (1, True, "weight must be 0"),
                        (0, 1, r"message 0 \(user\): only assistant messages take a 'weight'"),
                        (3, 0, r"message 3 \(the final assistant turn\) has weight 0")]:
        bad = {"messages": [dict(m) for m in plain["messages"]]}
        bad["messages"][i]["weight"] = w
        with pytest.raises(ChibiError, match=match):
            render_conversation(tok, bad, 500)


def test_render_for_completion(tok):
    c = conv("Hi", "Hello!", "How are you?", "Fine.")
    ids = render_for_completion(tok, c, max_len=500)
    assert ids[-1] == S(tok, "assistant_start")
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Hi<|user_end|><|assistant_start|>Hello!<|assistant_end|>"
        "<|user_start|>How are you?<|user_end|><|assistant_start|>"
    )
    # the same prompt rendered from a conversation that ends with the user
    assert render_for_completion(tok, conv("Hi", "Hello!", "How are you?"), max_len=500) == ids
    # the prompt equals the training render up to the final <|assistant_start|>
    full = render_conversation(tok, c, max_len=500).ids
    assert full[: len(ids)] == ids


def test_render_prompt_drops_oldest_and_reports(tok):
    c = long_conv(3)
    c["messages"].pop()  # ends with the user: a chat prompt
    full = render_prompt(tok, c, max_len=10_000)
    assert full.dropped_turns == 0
    p = render_prompt(tok, c, max_len=len(full.ids) - 1)
    assert p.dropped_turns == 2 and len(p.ids) < len(full.ids)
    assert p.ids[0] == tok.bos_id and p.ids[-1] == S(tok, "assistant_start")
    assert "question 0" not in tok.decode(p.ids) and "question 2" in tok.decode(p.ids)
    with pytest.raises(ChibiError, match="too long for the model's context"):
        render_prompt(tok, conv("word " * 300), max_len=64)


def test_reply_budget_is_the_one_rule_for_generation_lengths():
    from chibichat.common import ChibiError
    from chibichat.render import reply_budget

    assert reply_budget(2048) == 256 and reply_budget(256) == 128 and reply_budget(100) == 50
    assert reply_budget(256, cap=48) == 48 and reply_budget(64, cap=48) == 32
    assert reply_budget(256, 200) == 200  # a request is taken as it is while it leaves room for a prompt
    for bad in (0, 256, 300):
        with pytest.raises(ChibiError, match=rf"--max-new-tokens {bad} must be in \[1, 255\] \(the model's context is 256\)"):
            reply_budget(256, bad, what="--max-new-tokens")
