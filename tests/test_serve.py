"""`chibichat serve`: the OpenAI client (unmodified) against uvicorn on 127.0.0.1 on both routes and
every parameter, refusals by name, error bodies, malformed input, API keys, /health and /metrics,
cancellation on disconnect, timeouts, graceful shutdown, 32 concurrent streaming clients, and the page
(with an API key) driven in headless Chromium; the page's script alone under node (settings, a cut-off
stream, a failed load)."""

import asyncio
import codecs
import json
import re
import socket
import threading
import time
from html.parser import HTMLParser
from types import SimpleNamespace

import httpx
import pytest
import torch

from chibichat.serve.metrics import parse_metrics
from chibichat.serve.protocol import Limits


def make_home(root, layers="AS", seq_len=96):
    """A home with a byte-level tokenizer and one random-weight sft checkpoint."""
    from chibichat.common import Home
    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import save_checkpoint

    home = Home.resolve(root)
    tok = Tokenizer([bytes([i]) for i in range(256)], split="gpt4")
    tok.save(home.tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=seq_len, n_layer=len(layers), n_embd=32, n_head=4,
                    n_kv_head=4, layers=layers)  # fmt: skip
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.lm_head[ord("a") : ord("z") + 1] += 1.5  # readable replies
        model.lm_head[ord(" ")] += 1.5
        for stop in ("<|assistant_end|>", "<|bos|>"):  # replies long enough to watch them stream
            model.lm_head[tok.special_id(stop)] -= 5.0
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"vocab_size": tok.vocab_size, "hash": tok.hash}}
    save_checkpoint(home.checkpoints_dir("sft", "d2"), 1, model, None, meta)
    return home


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a background thread of this process, stopped at teardown."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from chibichat.serve.app import create_app
    from chibichat.stages.serve import build_pool

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    home = make_home(tmp_path_factory.mktemp("serve") / "home")
    args = SimpleNamespace(home=str(home.root), device="cpu", dtype="float32", source="sft", tag=None, step=None,
                           workers=2, max_queue=64, max_batch=32)  # fmt: skip
    pool, model_id, _ = build_pool(args)
    app = create_app(pool, model_id, Limits(max_messages=8, max_message_chars=200, max_total_chars=600,
                                            default_max_tokens=24))  # fmt: skip
    with Server(app) as url:
        yield SimpleNamespace(url=url, model=model_id, pool=pool, home=home)
    pool.shutdown()
    torch.set_num_threads(before)


def test_stream_ready_takes_only_the_pieces_that_have_arrived():
    from chibichat.serve.pool import Stream

    async def main():
        queue = asyncio.Queue()
        stream = Stream(SimpleNamespace(cancelled=False), queue, {})
        assert stream.ready() == []
        queue.put_nowait([("piece", (0, "a", [])), ("piece", (1, "b", []))])
        queue.put_nowait([("piece", (0, "c", [])), ("done", {"completion_tokens": 3})])
        assert stream.ready() == [(0, "a", []), (1, "b", []), (0, "c", [])]
        assert stream.ready() == [] and not stream.finished  # the end stays for the iteration
        assert [p async for p in stream] == [] and stream.result == {"completion_tokens": 3}

    asyncio.run(main())


def test_cpu_workers_share_one_decoder(served):
    engines = served.pool.engines
    assert len(engines) == 2 and engines[0] is not engines[1]
    assert engines[0].decoder() is engines[1].decoder()


def test_openai_client_non_stream_and_stream(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [served.model]
    r = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "こんにちは"}],
                                       max_tokens=10, temperature=0.7, seed=1)  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r2 = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "こんにちは"}],
                                        max_tokens=10, temperature=0.7, seed=1)  # fmt: skip
    assert r2.choices[0].message.content == r.choices[0].message.content  # seeded = reproducible
    stream = client.chat.completions.create(model=served.model, stream=True, max_tokens=10, temperature=0.7, seed=1,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"},
                                                      {"role": "user", "content": "again"}])  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens >= 1 and text


def _sse_deltas(url, body):
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_n_choices_from_one_request(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    msgs = [{"role": "user", "content": "tell me"}]
    one = client.chat.completions.create(model=served.model, messages=msgs, max_tokens=12, temperature=0)
    three = client.chat.completions.create(model=served.model, messages=msgs, max_tokens=12, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    # greedy: every choice is the n=1 reply; usage counts the tokens of all three
    assert all(c.message.content == one.choices[0].message.content for c in three.choices)
    assert all(c.finish_reason == one.choices[0].finish_reason for c in three.choices)
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    # sampled: independent choices, reproducible per seed, and streaming carries each choice's index
    body = {"model": served.model, "messages": msgs, "max_tokens": 16, "temperature": 1.0, "seed": 3, "n": 4}
    full = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60).json()
    texts = [c["message"]["content"] for c in full["choices"]]
    assert len(set(texts)) > 1
    deltas = _sse_deltas(served.url, {**body, "stream_options": {"include_usage": True}})
    streamed, finish = [""] * 4, [None] * 4
    for d in deltas:
        for c in d["choices"]:
            streamed[c["index"]] += c["delta"].get("content") or ""
            finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
    assert streamed == texts and finish == [c["finish_reason"] for c in full["choices"]]
    assert deltas[-1]["usage"]["completion_tokens"] == full["usage"]["completion_tokens"]


def test_stop_strings_end_choices_before_the_stop_text(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    msgs = [{"role": "user", "content": "go on"}]
    base = client.chat.completions.create(model=served.model, messages=msgs, max_tokens=30, temperature=0)
    text = base.choices[0].message.content
    assert len(text) >= 8, text  # the fixture's model writes lowercase replies of several characters
    stop = text[3:6]  # three characters = three byte-level tokens: the stop string spans token boundaries
    cut = text[: text.find(stop)]
    r = client.chat.completions.create(model=served.model, messages=msgs, max_tokens=30, temperature=0,
                                       stop=[stop, "\u0000never"])  # fmt: skip
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < base.usage.completion_tokens  # generation really ended early
    stream = client.chat.completions.create(model=served.model, messages=msgs, max_tokens=30, temperature=0,
                                            stop=stop, stream=True, n=2)  # fmt: skip
    streamed, finish = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert streamed == [cut, cut] and finish == ["stop", "stop"]
    # a stop string that never appears changes nothing
    same = client.chat.completions.create(model=served.model, messages=msgs, max_tokens=30, temperature=0,
                                          stop="\u0000")  # fmt: skip
    assert same.choices[0].message.content == text and same.choices[0].finish_reason == base.choices[0].finish_reason


def test_stream_equals_non_stream_with_same_seed(served):
    body = {"model": served.model, "messages": [{"role": "user", "content": "abc"}], "max_tokens": 12, "seed": 5}
    full = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60).json()
    with httpx.stream("POST", served.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    deltas = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(d["choices"][0]["delta"].get("content", "") for d in deltas)
    assert text == full["choices"][0]["message"]["content"]
    assert deltas[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_type"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        ({"model": "M", "messages": []}, 400, "invalid_type"),
        ({"model": "M", "messages": [{"role": "tool", "content": "hi"}]}, 400, "invalid_role"),
        ({"model": "M", "messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
        ({"model": "M", "messages": [{"role": "user", "content": "x" * 201}]}, 400, "message_too_long"),
        ({"model": "M", "messages": [{"role": "user", "content": "x"}] * 9}, 400, "too_many_messages"),
        ({"model": "M", "messages": [{"role": "user", "content": "x" * 150}] * 5}, 400, "conversation_too_long"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "invalid_type"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_k": 500}, 400, "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 96}, 400, "context_length_exceeded"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 91}, 400, "context_length_exceeded"),
        ({"model": "M", "messages": [{"role": "user", "content": "x" * 120}]}, 400, "context_length_exceeded"),
        ({"model": "M", "messages": [{"role": "user", "content": "a" * 50}, {"role": "assistant", "content": "b" * 50},
                                     {"role": "user", "content": "c"}]}, 400, "context_length_exceeded"),
        ({"model": "M", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_messages"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": "2"}, 400, "invalid_type"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
         "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": "x" * 65}, 400, "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, "invalid_type"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", 1]}, 400, "invalid_type"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "invalid_type"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}, 400, "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -3}, 400, "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "invalid_value"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, 400,
         "out_of_range"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, 400, "invalid_type"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, 400,
         "invalid_value"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "user": 7}, 400, "invalid_type"),
    ],
)
def test_bad_requests_get_openai_errors(served, body, status, code):
    if isinstance(body, dict):
        if body.get("model") == "M":
            body = {**body, "model": served.model}
        body = json.dumps(body).encode()
    r = httpx.post(served.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"  # still serving


def test_truncate_history_drops_oldest_and_says_so(served):
    msgs = [{"role": "user", "content": "a" * 50}, {"role": "assistant", "content": "b" * 50},
            {"role": "user", "content": "c"}]  # fmt: skip
    r = httpx.post(served.url + "/v1/chat/completions", timeout=60,
                   json={"model": served.model, "messages": msgs, "truncate_history": True, "max_tokens": 8})  # fmt: skip
    assert r.status_code == 200 and r.json()["chibichat"]["dropped_messages"] == 2


def _chat(served, messages, **kw):
    """(status, body) of a greedy chat request."""
    r = httpx.post(served.url + "/v1/chat/completions", timeout=60,
                   json={"model": served.model, "messages": messages, "temperature": 0, **kw})  # fmt: skip
    return r.status_code, r.json()


def test_a_last_message_longer_than_the_context_is_context_length_exceeded(served):
    """The message the model must answer alone overflowing the context is coded as OpenAI codes an overflow,
    with truncate_history too (that message is never dropped); a malformed conversation stays invalid_messages."""
    too_long = {"message": "the message is too long for the model's context: it needs 124 tokens but only 95 are "
                "available; shorten the message", "type": "invalid_request_error", "param": "messages",
                "code": "context_length_exceeded"}  # fmt: skip
    x120 = [{"role": "user", "content": "x" * 120}]
    assert _chat(served, x120) == (400, {"error": too_long})
    assert _chat(served, x120, truncate_history=True) == (400, {"error": too_long})
    assert _chat(served, x120, truncate_history=True, max_tokens=4) == (400, {"error": too_long})
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    status, body = _chat(served, two_users, truncate_history=True)
    assert status == 400 and body["error"]["code"] == "invalid_messages" and body["error"]["message"].startswith(
        "message 1 has role 'user' but 'assistant' was expected")  # fmt: skip


def test_truncate_history_without_max_tokens_does_not_fail_where_the_plain_request_succeeds(served):
    """truncate_history drops old turns to keep the server's default reply reserve (24 tokens here); where the
    last message (with the system text) alone leaves less, every older turn goes and the reply gets the room
    it leaves, as without truncate_history, instead of a 400."""
    system, last = {"role": "system", "content": "be"}, {"role": "user", "content": "x" * 72}
    status, plain = _chat(served, [system, last])
    assert status == 200 and 96 - 24 < plain["usage"]["prompt_tokens"] < 95, plain
    history = [system, {"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}, last]
    status, cut = _chat(served, history, truncate_history=True)
    assert status == 200, cut
    assert cut["chibichat"] == {"dropped_messages": 2} and cut["usage"] == plain["usage"]
    assert cut["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_message_content_as_a_list_of_text_parts(served):
    """OpenAI content parts: the texts of text parts, joined by a newline (as vLLM joins them); a part kind this
    text-only model cannot read, or a key a text part does not take, is refused by name (never dropped)."""
    status, whole = _chat(served, [{"role": "user", "content": "hi\nthere"}], max_tokens=6)
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
    status2, joined = _chat(served, [{"role": "user", "content": parts}], max_tokens=6)
    assert status == status2 == 200 and joined["usage"] == whole["usage"]
    assert joined["choices"][0]["message"] == whole["choices"][0]["message"]
    cached = {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}
    assert _chat(served, [{"role": "user", "content": [cached]}]) == (400, {"error": {
        "message": "messages[0].content[0].cache_control is not supported (text parts take type and text only)",
        "type": "invalid_request_error", "param": "messages[0].content[0].cache_control",
        "code": "unsupported_parameter"}})  # fmt: skip
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert _chat(served, [{"role": "user", "content": [parts[0], image]}]) == (400, {"error": {
        "message": "messages[0].content[1] has type 'image_url': this is a text-only model; send text parts only",
        "type": "invalid_request_error", "param": "messages[0].content[1].type", "code": "unsupported_parameter"}})  # fmt: skip
    assert _chat(served, [{"role": "user", "content": [{"type": "text", "text": 5}]}]) == (400, {"error": {
        "message": "messages[0].content[0].text must be a string", "type": "invalid_request_error",
        "param": "messages[0].content[0].text", "code": "invalid_type"}})  # fmt: skip


def test_developer_role_is_the_system_role(served):
    """OpenAI's "developer" role is the system message under its newer name: the same prompt and reply; like a
    system message it may only come first."""
    user = {"role": "user", "content": "hi"}
    status, system = _chat(served, [{"role": "system", "content": "be brief"}, user], max_tokens=6)
    status2, developer = _chat(served, [{"role": "developer", "content": "be brief"}, user], max_tokens=6)
    assert status == status2 == 200 and developer["usage"] == system["usage"]
    assert developer["choices"][0]["message"] == system["choices"][0]["message"]
    late = [user, {"role": "assistant", "content": "ok"}, {"role": "developer", "content": "be brief"}, user]
    assert _chat(served, late) == (400, {"error": {
        "message": "messages[2] is a developer message, but only the first message may be a system (or developer) "
        "message; merge its text into messages[0]", "type": "invalid_request_error", "param": "messages[2].role",
        "code": "invalid_messages"}})  # fmt: skip


def test_wrong_types_are_400_naming_the_field_and_null_include_usage_is_unset(served):
    """A field of the wrong type is a 400 (as in the OpenAI API) whose param is the field's path; a null
    stream_options.include_usage counts as not sent, like any other null parameter."""
    hi = [{"role": "user", "content": "hi"}]
    assert _chat(served, hi, stream=True, stream_options={"include_usage": "yes"}) == (400, {"error": {
        "message": "'stream_options.include_usage' must be a boolean", "type": "invalid_request_error",
        "param": "stream_options.include_usage", "code": "invalid_type"}})  # fmt: skip
    assert _chat(served, [*hi, 5]) == (400, {"error": {
        "message": "messages[1] must be an object {'role': ..., 'content': ...}", "type": "invalid_request_error",
        "param": "messages[1]", "code": "invalid_type"}})  # fmt: skip
    assert _chat(served, hi, max_tokens=2, stream_options={"include_usage": None})[0] == 200
    deltas = _sse_deltas(served.url, {"model": served.model, "messages": hi, "max_tokens": 2,
                                      "stream_options": {"include_usage": None}})  # fmt: skip
    assert deltas and all("usage" not in d for d in deltas)


def test_a_route_parameter_of_the_wrong_type_is_400_naming_its_path(served):
    """FastAPI's own validation (a typed route parameter) answers in the same 400 shape, param as a path."""
    from fastapi import Body
    from fastapi.testclient import TestClient

    from chibichat.serve.app import create_app

    app = create_app(served.pool, served.model)

    @app.post("/probe")  # outside /v1/: the shared pool's request counter keeps its fixed routes
    async def probe(items: list[int] = Body(embed=True)):
        return {"items": items}

    r = TestClient(app).post("/probe", json={"items": [1, "x"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "items[1]", r.text
    assert r.json()["error"]["code"] == "invalid_type" and r.json()["error"]["message"].startswith("'items[1]': ")


def test_stream_usage_is_null_on_every_chunk_but_the_last_when_asked(served):
    """With stream_options.include_usage every chunk has "usage": null but the last, which has the counts and no
    choices (the OpenAI API's stream); without it no chunk has a usage field."""
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    asked = _sse_deltas(served.url, {**body, "stream_options": {"include_usage": True}})
    assert len(asked) >= 3 and [d["usage"] for d in asked[:-1]] == [None] * (len(asked) - 1)
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] >= 1
    assert all("usage" not in d for d in _sse_deltas(served.url, body))


def test_a_body_over_the_limit_is_413_before_it_is_read(served):
    """A body past Limits.max_body_bytes is refused: by its Content-Length before any of it arrives, or (chunked)
    once the bytes read pass the limit; the server keeps serving."""
    import http.client

    too_large = {"error": {"message": "the request body is larger than this server's limit of 1048576 bytes; send a "
                           "shorter conversation or prompt", "type": "invalid_request_error", "param": None,
                           "code": "request_too_large"}}  # fmt: skip
    host, port = served.url.removeprefix("http://").split(":")

    def post(route, headers, send_body):
        conn = http.client.HTTPConnection(host, int(port), timeout=20)
        conn.putrequest("POST", route)
        for k, v in {"Content-Type": "application/json", **headers}.items():
            conn.putheader(k, v)
        conn.endheaders()
        send_body(conn)
        r = conn.getresponse()
        out = r.status, json.loads(r.read())
        conn.close()
        return out

    # a declared 1 GB body: answered without sending any of it
    assert post("/v1/chat/completions", {"Content-Length": str(10**9)}, lambda conn: None) == (413, too_large)

    def chunks(conn):  # 5 x 256 KiB, past the 1 MiB limit, never ended
        for _ in range(5):
            conn.send(b"%x\r\n%s\r\n" % (1 << 18, b" " * (1 << 18)))

    assert post("/v1/completions", {"Transfer-Encoding": "chunked"}, chunks) == (413, too_large)
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_request_errors_name_what_the_client_sent(served):
    """max_tokens and max_completion_tokens are both checked and must agree, and errors name the one sent; a
    trailing assistant message is refused (it was dropped); a reserve too big for truncate_history names
    max_tokens; a completion prompt that fills the context names the prompt, whatever max_tokens is."""
    hi = [{"role": "user", "content": "hi"}]  # <|bos|> <|user_start|> h i <|user_end|> <|assistant_start|>: 6 tokens

    def post(route="/v1/chat/completions", **kw):
        r = httpx.post(served.url + route, json={"model": served.model, **({} if "prompt" in kw else {"messages": hi}),
                                                 **kw}, timeout=60)  # fmt: skip
        return (r.status_code, r.json()["error"]["param"], r.json()["error"]["message"]) if r.status_code != 200 else r

    assert post(max_completion_tokens=10, max_tokens=500) == (
        400, "max_tokens", "'max_completion_tokens' 10 and 'max_tokens' 500 disagree: they are two names of one setting; "
        "send one of them")  # fmt: skip
    assert post(max_completion_tokens=10, max_tokens="abc") == (400, "max_tokens", "'max_tokens' must be an integer")
    assert post(max_completion_tokens=96) == (
        400, "max_completion_tokens", "max_completion_tokens 96 must be less than the model's context of 96 tokens")
    assert post(max_completion_tokens=91) == (
        400, "max_completion_tokens", "this model's context is 96 tokens; the prompt uses 6, so max_completion_tokens "
        "must be at most 90 (got 91)")  # fmt: skip
    assert post(max_completion_tokens=3, max_tokens=3).json()["usage"]["completion_tokens"] <= 3
    assert post(messages=[*hi, {"role": "assistant", "content": "hello"}]) == (
        400, "messages[1].role", "messages[1] is an assistant message, but the conversation must end with the user "
        "message to answer (continuing an assistant reply is not supported); leave it out")  # fmt: skip
    # truncate_history: the last message (<|bos|> <|user_start|> c <|user_end|> <|assistant_start|>) is never dropped
    long = [{"role": "user", "content": "a" * 50}, {"role": "assistant", "content": "b" * 50},
            {"role": "user", "content": "c"}]  # fmt: skip
    assert post(messages=long, truncate_history=True, max_tokens=95) == (
        400, "max_tokens", "max_tokens 95 leaves 1 of the model's context of 96 tokens for the prompt, but its last "
        "message needs 5; ask for at most 91")  # fmt: skip
    assert post(messages=long, truncate_history=True, max_tokens=91).json()["chibichat"]["dropped_messages"] == 2
    assert post("/v1/completions", prompt="x" * 200, max_tokens=16) == (
        400, "prompt", "the prompt of 201 tokens fills the model's context of 96 tokens; shorten it")
    # a lone surrogate is valid JSON ("\\ud800") but no text: refused by the tokenizer, a 400 on the prompt
    r = httpx.post(served.url + "/v1/completions", headers={"content-type": "application/json"},
                   content=('{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 2}' % served.model).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert r.json()["error"]["message"].startswith("prompt: ") and "surrogate" in r.json()["error"]["message"]


def test_models_route_retrieves_one_model(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    assert client.models.retrieve(served.model).id == served.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    for name in ("gpt-4", "org/model"):
        r = httpx.get(served.url + "/v1/models/" + name)
        assert r.status_code == 404 and r.json() == {"error": {
            "message": f"model {name!r} does not exist; this server serves {[served.model]}",
            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}  # fmt: skip


def test_health_models_page_and_404(served):
    h = httpx.get(served.url + "/health").json()
    assert h["status"] == "ok" and h["workers"] == 2 and h["context"] == 96 and h["max_batch_rows"] == 32
    assert h["max_queue"] == 64
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and "chat.js" in page.text
    js = httpx.get(served.url + "/static/chat.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    r = httpx.get(served.url + "/static/../../etc/passwd")
    assert r.status_code == 404
    r = httpx.get(served.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_32_concurrent_streaming_clients_all_complete(served):
    async def one(client, i):
        body = {"model": served.model, "stream": True, "max_tokens": 16, "seed": i,
                "messages": [{"role": "user", "content": f"client {i}"}]}  # fmt: skip
        text, finish, done = "", None, False
        async with client.stream("POST", served.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    c = json.loads(line[6:])["choices"][0]
                    text += c["delta"].get("content", "")
                    finish = c["finish_reason"] or finish
        return text, finish, done

    async def main():
        async with httpx.AsyncClient(timeout=httpx.Timeout(120)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(asyncio.wait_for(main(), timeout=240))
    assert len(results) == 32
    assert all(done and finish in ("stop", "length") for _, finish, done in results)
    assert sum(bool(text) for text, _, _ in results) >= 28  # a reply may legitimately be empty (immediate stop)
    h = httpx.get(served.url + "/health").json()
    assert h["batch_rows"] == 0 and h["available_rows"] == 2 * 32 and h["waiting"] == 0


# -- the page in headless Chromium, driven over the DevTools protocol (pipe transport) -------------

CHROMIUM = "/usr/bin/chromium"


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out;
    NUL-terminated JSON messages): no websocket library and no browser download needed."""

    def __init__(self, profile_dir):
        import os
        import subprocess

        self.os = os
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={profile_dir}",
                 "--window-size=1000,700", "about:blank"]  # fmt: skip
        # bash moves the pipe ends onto fds 3 and 4 before exec'ing the browser (no preexec_fn in a
        # process that already runs server threads).
        cmd = f'exec 3<&{to_chrome_r} 4>&{from_chrome_w}; exec "$0" "$@"'
        self.proc = subprocess.Popen(["bash", "-c", cmd, CHROMIUM, *flags], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buf, self.next_id, self.session = b"", 0, None

    def call(self, method, params=None, timeout=30.0, session=True):
        import select

        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        self.os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.time()
            if left <= 0 or not select.select([self.from_chrome], [], [], left)[0]:
                raise TimeoutError(f"no DevTools reply to {method}")
            chunk = self.os.read(self.from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk

    def open(self, url):
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", {"url": url})

    def js(self, expr):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error in {expr!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expr, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expr)
            if value:
                return value
            time.sleep(0.03)
        raise TimeoutError(f"page never satisfied {expr!r}")

    def accessible_name(self, selector):
        """The name the browser gives the element `selector` to screen readers."""
        root = self.call("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        tree = self.call("Accessibility.getPartialAXTree", {"nodeId": node, "fetchRelatives": False})
        return tree["nodes"][0]["name"]["value"]

    def press_enter(self):
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13})  # fmt: skip

    def close(self):
        try:
            self.call("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.os.close(self.to_chrome)
        self.os.close(self.from_chrome)


class SlowDecoder:
    """A decoder whose steps take at least `delay_s`, so text arrives at a human-visible pace; with
    `endless`, the end tokens are never sampled, so every reply runs to its max_tokens (the fixture's
    greedy chat replies end after a few tokens)."""

    def __init__(self, inner, delay_s, endless=()):
        self.inner, self.delay, self.endless = inner, delay_s, list(endless)

    def new_state(self, *args):
        return self.inner.new_state(*args)

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        logits = self.inner.forward(*args, **kwargs)
        if self.endless:
            logits[..., self.endless] = float("-inf")
        return logits


def slow_engine(engine, delay_s, endless=False):
    twin = engine.sibling()
    slow = SlowDecoder(engine.decoder(), delay_s, sorted(engine.stop_ids) if endless else ())
    twin.decoder = lambda: slow
    return twin


def slow_pool(served, delay_s, seed=None, endless=False, **kw):
    """A one-replica pool over the fixture's model with slowed steps; `seed` fixes every request's seed
    (the page sends none, and now and then the tiny test model ends a randomly seeded reply after a
    token or two: nothing left to watch stream)."""
    from chibichat.serve.pool import WorkerPool

    class Pool(WorkerPool):
        def submit(self, req):
            if seed is not None:
                req.seed = seed
            return super().submit(req)

    return Pool([slow_engine(served.pool.engines[0], delay_s, endless)], **kw)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason="Debian chromium not installed (apt-get install chromium)")
def test_page_streams_a_reply_in_headless_chromium(served, tmp_path):
    import base64
    import os

    from chibichat.serve.app import create_app

    pool = slow_pool(served, 0.1, seed=3)  # ~4 s of streaming: several polls see it even on a loaded machine
    app = create_app(pool, served.model, Limits(default_max_tokens=40), api_key="page-key")
    browser = DevTools(tmp_path / "profile")
    try:
        with Server(app) as url:
            browser.open(url + "/")
            # the server wants a key: the page asks for it, then connects with it
            browser.wait_for("document.readyState === 'complete' && !document.getElementById('auth').hidden")
            assert browser.js("chat.model") is None
            assert browser.js("document.getElementById('model').textContent") == "API key required"
            assert browser.accessible_name("#input") == "Message"  # not its placeholder
            browser.js("document.getElementById('api-key').value = 'not-the-key'")  # a wrong key: asked again
            browser.js("document.getElementById('use-key').click()")
            browser.wait_for("document.getElementById('model').textContent === 'wrong API key' && "
                             "!document.getElementById('auth').hidden")  # fmt: skip
            assert browser.js("chat.model") is None
            browser.js("document.getElementById('api-key').value = 'page-key'")
            browser.js("document.getElementById('use-key').click()")
            browser.wait_for("chat.model !== null")
            assert served.model in browser.js("document.getElementById('model').textContent")
            browser.js("document.getElementById('input').focus()")
            browser.call("Input.insertText", {"text": "こんにちは、元気ですか？"})
            browser.press_enter()
            browser.wait_for("document.querySelector('.msg.user') !== null")
            assert browser.js("document.querySelector('.msg.user .text').textContent") == "こんにちは、元気ですか？"
            # Watch the assistant bubble grow while it is still streaming.
            seen, deadline = [], time.time() + 60
            while time.time() < deadline:
                state = browser.js("(() => { const b = document.querySelector('.msg.assistant');"
                                   " return b ? [b.classList.contains('streaming'), b.querySelector('.text').textContent,"
                                   " document.activeElement.id, document.getElementById('status').textContent]"
                                   " : null })()")  # fmt: skip
                if state and state[0] and state[1] and (not seen or seen[-1] != state[1]):
                    seen.append(state[1])
                    # Enter sent it: the focus stays in the message box; the status line says a reply is coming
                    assert state[2:] == ["input", "chibichat is replying…"]
                if state and not state[0]:
                    break
                time.sleep(0.02)
            final = browser.js("document.querySelector('.msg.assistant .text').textContent")
            assert len(seen) >= 3, seen  # several partial texts were shown before the reply finished
            assert all(final.startswith(s) for s in seen) and final
            browser.wait_for("document.getElementById('status').textContent === 'Reply finished'")
            live = "[...document.querySelectorAll('[aria-live], [role=status], [role=log], [role=alert]')]"
            # the message list itself is not read out as it changes: only the status and notice lines are
            assert browser.js(live + ".map(e => e.id)") == ["status", "notice"]
            assert browser.js("document.getElementById('notice').offsetHeight") == 0  # empty: collapsed
            assert browser.accessible_name(".msg.assistant button") == "Regenerate reply 2"
            png = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"})["data"])
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
            shot = tmp_path / "chat_page.png"
            shot.write_bytes(png)
            if os.environ.get("CHIBICHAT_SCREENSHOT"):
                with open(os.environ["CHIBICHAT_SCREENSHOT"], "wb") as f:
                    f.write(png)
            # Regenerate replaces the reply; New chat empties the page. The button it focused goes with the
            # old reply: the focus moves to Stop while the new one streams, then to the message box.
            assert browser.js("(() => { const b = [...document.querySelectorAll('.msg.assistant button')]"
                              ".find(b => b.textContent === 'Regenerate'); b.focus(); b.click();"
                              " return document.activeElement.id })()") == "stop"  # fmt: skip
            browser.wait_for("document.querySelector('.msg.assistant.streaming') === null && "
                             "document.querySelectorAll('.msg').length === 2 && !chat.busy")  # fmt: skip
            assert browser.js("document.activeElement.id") == "input"
            # Edit and resend: the edited message replaces the old one and gets a fresh reply.
            browser.js("[...document.querySelectorAll('.msg.user button')].find(b => b.textContent === 'Edit').click()")
            assert browser.accessible_name(".msg.user textarea") == "Edit message 1"
            browser.js("document.querySelector('.msg.user textarea').value = '日本語で答えて'")
            browser.js("[...document.querySelectorAll('.msg.user button')].find(b => b.textContent === 'Send').click()")
            browser.wait_for("!chat.busy && document.querySelectorAll('.msg').length === 2")
            assert browser.js("document.querySelector('.msg.user .text').textContent") == "日本語で答えて"
            browser.js("document.getElementById('new-chat').click()")
            assert browser.js("document.querySelectorAll('.msg').length") == 0
            # The Send button hides while the reply comes: the focus moves to Stop, and from Stop (stopped at
            # once, so the reply cannot finish first) back to the message box.
            browser.js("document.getElementById('input').value = 'こんにちは、元気ですか？'")
            assert browser.js("(() => { const b = document.getElementById('send'); b.focus(); b.click();"
                              " const focused = document.activeElement.id; document.getElementById('stop').click();"
                              " return focused })()") == "stop"  # fmt: skip
            browser.wait_for("!chat.busy")
            assert browser.js("document.activeElement.id") == "input"
            assert browser.js("document.getElementById('status').textContent") == "Reply stopped"
    finally:
        browser.close()
        pool.shutdown()


def page_run(**config):
    """chat.js under node with stand-ins for the DOM and fetch (tests/fixtures/chat_page_harness.js)."""
    import shutil
    import subprocess
    from importlib import resources
    from pathlib import Path

    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed (apt-get install nodejs): the page's script runs under it")
    script = resources.files("chibichat.serve").joinpath("static", "chat.js")
    harness = Path(__file__).parent / "fixtures" / "chat_page_harness.js"
    config = {"health": {"status": 200, "body": {"status": "ok", "context": 96, "workers": 1}}, **config}
    r = subprocess.run([node, str(harness), str(script), json.dumps(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


OPEN = 'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}\n\n'
PIECE = 'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}\n\n'


def test_page_shows_a_reply_cut_off_before_done_as_an_error():
    whole = page_run(send="hi", chunks=[OPEN, PIECE, "data: [DONE]\n\n"])
    assert whole["error"] is None and whole["messages"][-1] == {"role": "assistant", "content": "Hel", "streaming": False}
    assert whole["sent"][0]["temperature"] == 0.8 and whole["sent"][0]["top_k"] == 50
    cut = page_run(send="hi", chunks=[OPEN, PIECE])  # the body ends without [DONE]
    assert cut["error"] == "Error: the reply was cut off: the connection ended before the server finished it"
    assert cut["messages"][-1]["content"] == "Hel"  # what arrived stays, marked by the error


@pytest.mark.parametrize("temperature, topk, error", [
    ("5", "50", "temperature must be a number from 0 to 2, got 5"),
    ("", "50", "temperature must be a number from 0 to 2 (fix"),
    ("-0.1", "50", "temperature must be a number from 0 to 2, got -0.1"),
    ("0.8", "2.5", "top-k must be a whole number from 0 to 200, got 2.5"),
    ("0.8", "500", "top-k must be a whole number from 0 to 200, got 500"),
])
def test_page_refuses_sampling_settings_out_of_range(temperature, topk, error):
    r = page_run(send="hi", temperature=temperature, topk=topk, chunks=[OPEN, "data: [DONE]\n\n"])
    assert r["error"].startswith("Error: " + error) and r["error"].endswith("(fix it in the header, then send again)")
    assert r["sent"] == [] and r["messages"] == [] and r["input"] == "hi"  # nothing sent, the message kept


TOO_LONG = {"status": 400, "body": {"error": {
    "message": "the message is too long for the model's context: it needs 120 tokens but only 95 are available; "
               "shorten the message", "type": "invalid_request_error", "param": "messages",
    "code": "context_length_exceeded"}}}  # fmt: skip


def test_page_never_sends_two_user_messages_in_a_row_after_a_failed_reply():
    # A turn that failed before any text (here context_length_exceeded) leaves the user's message without
    # a reply: the page says why and offers Retry and Edit on it; another message is refused until then, as
    # the server refuses two user messages in a row (the conversation would fail on every later send).
    failed = page_run(send="hi", replies=[TOO_LONG], steps=["$('input').value = 'next'; send()"])
    assert failed["error"] == ("Error: your last message has no reply: Retry it or Edit it before sending another "
                               "(or start a New chat)")
    assert len(failed["sent"]) == 1 and failed["messages"] == [{"role": "user", "content": "hi"}]
    assert failed["input"] == "next" and failed["buttons"] == [["Edit", "Retry"]]
    shown = page_run(send="hi", replies=[TOO_LONG])
    assert shown["error"] == "Error: " + TOO_LONG["body"]["error"]["message"]
    retried = page_run(send="hi", replies=[TOO_LONG], chunks=[OPEN, PIECE, "data: [DONE]\n\n"], steps=["click('Retry')"])
    assert [m["messages"] for m in retried["sent"]] == [[{"role": "user", "content": "hi"}]] * 2
    assert retried["error"] is None and retried["messages"][-1]["content"] == "Hel"
    assert retried["buttons"] == [["Edit"], ["Regenerate"]]


def test_page_and_its_files_carry_the_security_headers():
    from fastapi.testclient import TestClient

    from chibichat.serve.app import create_app

    client = TestClient(create_app(None, "m", load=lambda: None))  # not entered: no model loads
    for path in ("/", "/static/index.html", "/static/chat.js", "/static/chat.css"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == "default-src 'self'; base-uri 'none'; frame-ancestors 'none'"
        assert r.headers["x-content-type-options"] == "nosniff"
        # what that policy would block: inline script or style, another origin (the product runs offline)
        assert "<script>" not in r.text and "style=" not in r.text and "<style" not in r.text, path
        assert "http:" not in r.text and "https:" not in r.text and "@import" not in r.text, path
    assert "innerHTML" not in client.get("/static/chat.js").text  # untrusted text goes in as textContent


class PageControls(HTMLParser):
    """The accessible name of each control in a page (aria-label, else an enclosing <label>'s text or a
    <label for=...>'s, else a button's text: placeholders do not count) and its live regions."""

    def __init__(self):
        super().__init__()
        self.names, self.label_for, self.live = {}, {}, []
        self.label = self.button = self.label_target = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "aria-live" in a or a.get("role") in ("status", "log", "alert"):
            self.live.append((a.get("id"), a.get("role"), a.get("aria-live")))
        if tag == "label":
            self.label, self.label_target = "", a.get("for")
        elif tag in ("input", "textarea", "select"):
            self.names[a["id"]] = a.get("aria-label")
            if self.label is not None and self.label_target is None and a.get("aria-label") is None:
                self.label_target = a["id"]
        elif tag == "button":
            self.button = (a["id"], a.get("aria-label"), "")

    def handle_data(self, data):
        if self.label is not None:
            self.label += data
        if self.button is not None:
            self.button = (*self.button[:2], self.button[2] + data)

    def handle_endtag(self, tag):
        if tag == "label":
            if self.label_target is not None:
                self.label_for[self.label_target] = self.label.strip()
            self.label = None
        elif tag == "button":
            self.names[self.button[0]] = self.button[1] or self.button[2].strip() or None
            self.button = None

    def close(self):
        super().close()
        for control, text in self.label_for.items():
            self.names[control] = self.names.get(control) or text


def test_page_controls_have_accessible_names_and_only_the_status_and_notice_lines_are_live():
    import re

    from fastapi.testclient import TestClient

    from chibichat.serve.app import create_app

    client = TestClient(create_app(None, "m", load=lambda: None))  # not entered: no model loads
    html = client.get("/").text
    page = PageControls()
    page.feed(html)
    page.close()
    assert page.names == {"temperature": "temperature", "topk": "top-k", "new-chat": "New chat", "api-key": "API key",
                          "use-key": "Use key", "input": "Message", "send": "Send", "stop": "Stop"}  # fmt: skip
    # The message list is rebuilt on render and grows with each streamed piece: were it live, a screen
    # reader could read the conversation again on every token. The status line announces each turn, the
    # notice (older messages left out, a reply at its length limit; it was silent to screen readers) its
    # own text: two polite regions, neither repeating the other.
    assert page.live == [("status", "status", None), ("notice", "status", None)]
    # The notice stays in the page (a live region that appears with its text is not reliably announced):
    # empty, its CSS collapses it instead of `hidden`.
    assert "hidden" not in re.search(r'<div id="notice"[^>]*>', html).group(0)
    css = client.get("/static/chat.css").text
    assert "#notice:empty { padding: 0; border: 0; }" in css
    assert ".visually-hidden {" in css  # the label and status line are not shown


DROPPED = ('data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}], '
           '"chibichat": {"dropped_messages": 2}}\n\n')
LENGTH = 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n'


def test_page_notice_says_what_was_left_out_or_cut_and_the_status_line_only_the_turn():
    dropped = page_run(send="hi", chunks=[DROPPED, PIECE, "data: [DONE]\n\n"])
    assert dropped["notice"] == "The conversation outgrew the model's context: the 2 oldest messages were left out."
    assert dropped["status"] == "Reply finished"  # not the notice again
    cut = page_run(send="hi", chunks=[OPEN, PIECE, LENGTH, "data: [DONE]\n\n"])
    assert cut["notice"] == "The reply reached its length limit." and cut["status"] == "Reply finished"
    assert page_run(send="hi", chunks=[OPEN, PIECE, "data: [DONE]\n\n"])["notice"] == ""
    # both in one turn: both said (the length notice replaced the dropped one)
    both = page_run(send="hi", chunks=[DROPPED, PIECE, LENGTH, "data: [DONE]\n\n"])
    assert both["notice"] == ("The conversation outgrew the model's context: the 2 oldest messages were left out. "
                              "The reply reached its length limit.")


def test_page_names_each_message_button_after_its_message():
    # Every message's buttons have the same short labels: a screen reader's list of buttons read "Edit, Edit,
    # Edit". Each one's accessible name says which message it acts on; the visible labels stay as they were.
    two = page_run(send="hi", chunks=[OPEN, PIECE, "data: [DONE]\n\n"], steps=["$('input').value = 'again'; send()"])
    assert two["buttons"] == [["Edit"], [], ["Edit"], ["Regenerate"]]
    assert two["names"] == [["Edit message 1"], [], ["Edit message 3"], ["Regenerate reply 4"]]
    editing = page_run(send="hi", chunks=[OPEN, PIECE, "data: [DONE]\n\n"], steps=["click('Edit')"])
    assert editing["buttons"][0] == ["Send", "Cancel"]
    assert editing["names"][0] == ["Edit message 1", "Send edited message 1", "Cancel editing message 1"]
    failed = page_run(send="hi", replies=[TOO_LONG])
    assert failed["buttons"] == [["Edit", "Retry"]] and failed["names"] == [["Edit message 1", "Retry message 1"]]


def test_page_announces_each_turn_once_on_its_status_line():
    done = page_run(send="hi", chunks=[OPEN, PIECE, "data: [DONE]\n\n"])
    assert done["status"] == "Reply finished" and done["messages"][-1]["content"] == "Hel"
    cut = page_run(send="hi", chunks=[OPEN, PIECE])
    cut_off = "Error: the reply was cut off: the connection ended before the server finished it"
    assert cut["status"] == cut["error"] == cut_off
    refused = page_run(send="hi", temperature="5")
    assert refused["status"] == refused["error"] and refused["status"].startswith("Error: temperature must be")
    again = page_run(send="hi", replies=[TOO_LONG], steps=["$('input').value = 'next'; send()"])
    assert again["status"] == again["error"] and again["status"].startswith("Error: your last message has no reply")


def test_page_keeps_keyboard_focus_when_send_and_stop_swap():
    # Enter in the message box: the focus stays there throughout.
    typed = page_run(send="hi", chunks=[OPEN, PIECE, "data: [DONE]\n\n"])
    assert typed["focus"] == ["input"]
    # The Send button hides while the reply streams: the focus moves to Stop, then back to the message box.
    clicked = page_run(send="hi", chunks=[OPEN, PIECE, "data: [DONE]\n\n"], before=["$('send').focus()"])
    assert clicked["focus"] == ["input", "send", "stop", "input"]
    # Retry is removed by the render that starts the reply: the same.
    retried = page_run(send="hi", replies=[TOO_LONG], chunks=[OPEN, PIECE, "data: [DONE]\n\n"],
                       steps=["click('Retry')"])
    assert retried["focus"] == ["input", None, "stop", "input"]


def test_page_stops_polling_a_model_that_failed_to_load():
    failed = page_run(health={"status": 500, "body": {"status": "failed", "error": "ChibiError: no sft checkpoint",
                                                      "model": "m"}})  # fmt: skip
    assert failed["modelText"] == "the model failed to load: ChibiError: no sft checkpoint" and failed["timeouts"] == 0
    loading = page_run(health={"status": 503, "body": {"status": "loading", "model": "m"}})
    assert loading["modelText"] == "model loading…" and loading["timeouts"] == 1 and loading["model"] is None


def test_busy_pool_answers_503_and_recovers(served):
    from chibichat.serve.app import create_app

    pool = slow_pool(served, 0.1, endless=True, max_queue=0, max_rows=8)  # one replica of 8 rows, nobody may wait
    app = create_app(pool, served.model, Limits(default_max_tokens=20))
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True,
            "temperature": 0, "n": 8}  # 8 rows of 20 tokens, 0.1 s apart, fill the batch for 2 s
    try:
        with Server(app) as url:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as first:
                assert first.status_code == 200
                second = httpx.post(url + "/v1/chat/completions", json={**body, "n": 1}, timeout=60)
                assert second.status_code == 503 and second.json()["error"]["code"] == "server_busy"
                assert second.headers["retry-after"] == "1"
                assert [ln for ln in first.iter_lines() if ln][-1] == "data: [DONE]"
            deadline = time.time() + 30
            while httpx.get(url + "/health").json()["available_rows"] != 8 and time.time() < deadline:
                time.sleep(0.05)
            again = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
            assert again.status_code == 200
            m = parse_metrics(httpx.get(url + "/metrics").text)
            assert m["chibichat_requests_rejected_total"] == 1
            assert m['chibichat_requests_total{route="/v1/chat/completions",status="503"}'] == 1
    finally:
        pool.shutdown()


# -- the rest of the OpenAI surface ------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, extra, param",
    [
        ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ("chat", {"tool_choice": "auto"}, "tool_choice"),
        ("chat", {"functions": [{"name": "f"}]}, "functions"),
        ("chat", {"logit_bias": {"65": 5}}, "logit_bias"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"frobnicate": 1}, "frobnicate"),
        ("chat", {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
         "stream_options.continuous_usage_stats"),
        ("chat", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
        ("completions", {"echo": True}, "echo"),
        ("completions", {"suffix": "end"}, "suffix"),
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"prompt": ["a", "b"]}, "prompt"),
        ("completions", {"messages": []}, "messages"),
    ],
)
def test_unsupported_parameters_are_refused_by_name(served, route, extra, param):
    body = {"model": served.model, "max_tokens": 4}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if route == "chat" else {"prompt": "hi"})
    body.update(extra)
    r = httpx.post(f"{served.url}/v1/{'chat/completions' if route == 'chat' else 'completions'}", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_parameter" and err["param"] == param and param in err["message"]


def test_openai_client_tools_and_response_format_get_400_naming_them(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    msgs = [{"role": "user", "content": "what is 2+2"}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=served.model, messages=msgs, tools=tools)
    assert e.value.status_code == 400 and "'tools' is not supported" in str(e.value) and "built-in tool" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=served.model, messages=msgs, response_format={"type": "json_object"})
    assert "'response_format'" in str(e.value)
    # {"type": "text"} is what the server does anyway: accepted, like `user`
    r = client.chat.completions.create(model=served.model, messages=msgs, max_tokens=3, response_format={"type": "text"},
                                       user="user-1234")  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length")


def test_openai_client_completions_route(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    r = client.completions.create(model=served.model, prompt="the cat", max_tokens=12, temperature=0, logprobs=2)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason in ("stop", "length") and c.text
    lp = c.logprobs
    engine = served.pool.engines[0]
    prompt = [engine.tokenizer.bos_id, *engine.tokenizer.encode("the cat")]
    n = tokens_of_text(engine, prompt, c.text, 12, None)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert all(len(t) == 2 for t in lp.top_logprobs)
    # greedy: each chosen token is the most likely one
    assert all(abs(v - max(t.values())) < 1e-5 for v, t in zip(lp.token_logprobs, lp.top_logprobs))
    assert lp.text_offset[0] == 0 and all(a <= b for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    if c.text.isascii():
        assert "".join(lp.tokens) == c.text
    assert r.usage.prompt_tokens == 1 + len("the cat")  # <|bos|> + one byte-level token per character
    # streaming: the same text, n choices with their indices, usage at the end
    stream = client.completions.create(model=served.model, prompt="the cat", max_tokens=12, temperature=0, n=2,
                                       stream=True, stream_options={"include_usage": True})  # fmt: skip
    texts, finish, usage = ["", ""], [None, None], None
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            finish[ch.index] = ch.finish_reason or finish[ch.index]
        usage = chunk.usage or usage
    assert texts == [c.text, c.text] and finish == [c.finish_reason] * 2
    assert usage.completion_tokens == 2 * r.usage.completion_tokens
    # seed: reproducible sampled completions; stop strings; max_tokens
    a = client.completions.create(model=served.model, prompt="x", max_tokens=10, seed=11, temperature=1.0)
    b = client.completions.create(model=served.model, prompt="x", max_tokens=10, seed=11, temperature=1.0)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens <= 10
    # a stop string, in the fixture's greedy reply to "the dog" (12 tokens, characters split over them too):
    # logprobs cover the tokens of the text returned, not the stop string's, though usage counts them
    prompt = [engine.tokenizer.bos_id, *engine.tokenizer.encode("the dog")]
    text = client.completions.create(model=served.model, prompt="the dog", max_tokens=12, temperature=0).choices[0].text
    assert len(text) >= 8
    cut = client.completions.create(model=served.model, prompt="the dog", max_tokens=12, temperature=0, stop=text[5:7],
                                    logprobs=2)  # fmt: skip
    cut_text = text[: text.find(text[5:7])]
    assert cut.choices[0].text == cut_text and cut.choices[0].finish_reason == "stop"
    assert "".join(cut.choices[0].logprobs.tokens) == cut_text
    assert len(cut.choices[0].logprobs.tokens) == tokens_of_text(engine, prompt, cut_text, 12, None, [text[5:7]])
    assert cut.usage.completion_tokens > len(cut.choices[0].logprobs.tokens)


def tokens_of_text(engine, prompt, text, max_tokens, tools, stop=None):
    """How many tokens of the engine's greedy reply to `prompt` make up `text`, the server's reply to the same
    request: those that start before its end, each reading as the text it adds (the engine's display), so
    not the end token, a stop string's tokens, nor the ones that only start its first character."""
    result = {}
    shown = engine.stream_choices(prompt, 1, max_tokens, 0.0, None, None, 1.0, 0, tools, result, stop)
    assert "".join(t for _, t in shown) == text  # the server's reply is the engine's
    tokens = result["choices"][0]["tokens"]
    utf8, at = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0
    for k, (t, after) in enumerate(zip(tokens, tokens[1:] + [None])):
        if at >= len(text) or t in engine.stop_ids:
            return k
        at += len(utf8.decode(engine.shown_bytes(t, after)))
    return len(tokens)


def test_chat_logprobs_and_max_completion_tokens(served):
    import openai

    from chibichat.render import render_prompt

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=served.model, messages=msgs, temperature=0, logprobs=True, top_logprobs=3,
                                       max_completion_tokens=7)  # fmt: skip
    c = r.choices[0]
    assert r.usage.completion_tokens <= 7
    content = c.logprobs.content
    engine = served.pool.engines[0]
    ids = render_prompt(engine.tokenizer, {"messages": msgs}, max_len=engine.seq_len - 1).ids
    assert len(content) == tokens_of_text(engine, ids, c.message.content, 7, "calculator")
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-5  # greedy = the most likely token
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    # streamed logprobs: the same entries, spread over the chunks
    stream = client.chat.completions.create(model=served.model, messages=msgs, temperature=0, logprobs=True,
                                            top_logprobs=3, max_completion_tokens=7, stream=True)  # fmt: skip
    streamed = [e for ch in stream for x in ch.choices if x.logprobs for e in x.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = client.chat.completions.create(model=served.model, messages=msgs, temperature=0, max_tokens=7)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == c.message.content
    # a stop string: the entries are the tokens of the content returned
    text = c.message.content
    assert len(text) >= 4  # the fixture's greedy reply, long enough to cut
    cut = client.chat.completions.create(model=served.model, messages=msgs, temperature=0, logprobs=True, top_logprobs=3,
                                         max_completion_tokens=7, stop=[text[2:4]])  # fmt: skip
    cut_text = text[: text.find(text[2:4])]
    assert cut.choices[0].message.content == cut_text and cut.choices[0].finish_reason == "stop"
    entries = cut.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == cut_text
    assert len(entries) == tokens_of_text(engine, ids, cut_text, 7, "calculator", [text[2:4]]) < cut.usage.completion_tokens


def test_presence_and_frequency_penalties_are_applied(served):
    """The server's penalised reply is the engine's with the same penalties, and differs from the plain one."""
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    engine = served.pool.engines[0]
    prompt = [engine.tokenizer.bos_id, *engine.tokenizer.encode("aaaa")]
    got, want = {}, {}
    for name, pp, fp in (("plain", 0.0, 0.0), ("presence", 2.0, 0.0), ("frequency", 0.0, 1.5)):
        r = client.completions.create(model=served.model, prompt="aaaa", max_tokens=30, temperature=0,
                                      presence_penalty=pp, frequency_penalty=fp)  # fmt: skip
        got[name] = r.choices[0].text
        want[name] = "".join(t for _, t in engine.stream_choices(prompt, 1, 30, 0.0, None, None, 1.0, 0, None, None, None,
                                                                 presence_penalty=pp, frequency_penalty=fp))
    assert got == want
    assert got["presence"] != got["plain"] and got["frequency"] != got["plain"]
    assert len(set(got["presence"])) >= len(set(got["plain"]))  # a presence penalty spreads the reply over more characters
    # the chat route passes them on too: its reply is the engine's on the rendered prompt
    from chibichat.render import render_prompt

    msgs = [{"role": "user", "content": "go on"}]
    ids = render_prompt(engine.tokenizer, {"messages": msgs}, max_len=engine.seq_len - 1).ids
    r = client.chat.completions.create(model=served.model, messages=msgs, max_tokens=30, temperature=0,
                                       presence_penalty=1.0, frequency_penalty=1.5)  # fmt: skip
    want = "".join(t for _, t in engine.stream_choices(ids, 1, 30, 0.0, None, None, 1.0, 0, "calculator", None, None,
                                                       presence_penalty=1.0, frequency_penalty=1.5))  # fmt: skip
    assert r.choices[0].message.content == want


class Steered:
    """The fixture model's decoder with its logits passed through `steer(logits, state)` (in place)."""

    def __init__(self, inner, steer):
        self.inner, self.steer = inner, steer

    def new_state(self, *a):
        return self.inner.new_state(*a)

    def forward(self, ids, state, **kw):
        logits = self.inner.forward(ids, state, **kw)
        self.steer(logits, state)
        return logits


def steered_pool(served, steer):
    """A one-replica pool over the fixture's model, its logits steered by `steer`."""
    from chibichat.serve.pool import WorkerPool

    eng = served.pool.engines[0]
    twin = eng.sibling()
    dec = Steered(eng.decoder(), steer)
    twin.decoder = lambda: dec
    return WorkerPool([twin])


def scripted(prompt_len, script):
    """A steer under which a reply to a prompt of `prompt_len` tokens opens with the tokens `script`."""

    def steer(logits, state):
        for b, n in enumerate(state.lengths):
            k = n - prompt_len
            if 0 <= k < len(script):
                logits[b, -1, script[k]] = 1e4

    return steer


def calculator_call(served, msgs, expr):
    """A steer under which the reply to `msgs` opens with a calculator call of `expr`."""
    from chibichat.render import render_prompt

    tok = served.pool.engines[0].tokenizer
    script = [tok.special_id("<|python_start|>"), *tok.encode(expr), tok.special_id("<|python_end|>")]
    return scripted(len(render_prompt(tok, {"messages": msgs}, max_len=95).ids), script)


def test_builtin_tool_call_visible_in_the_response(served):
    """A reply that calls the calculator shows the call and its result in the content and in chibichat.tool_calls;
    streamed, on the chunk that ends the choice."""
    from chibichat.serve.app import create_app

    msgs = [{"role": "user", "content": "6*7?"}]
    pool = steered_pool(served, calculator_call(served, msgs, "6*7"))
    app = create_app(pool, served.model, Limits(default_max_tokens=16))
    req = {"model": served.model, "messages": msgs, "temperature": 0, "max_tokens": 16}
    try:
        with Server(app) as url:
            body = httpx.post(url + "/v1/chat/completions", json=req, timeout=60).json()
            deltas = _sse_deltas(url, req)
    finally:
        pool.shutdown()
    assert body["choices"][0]["message"]["content"].startswith("<<6*7=42>>")
    assert body["chibichat"]["tool_calls"] == [[{"expression": "6*7", "output": "42"}]]
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in deltas).startswith("<<6*7=42>>")
    assert [d.get("chibichat") for d in deltas if d["choices"][0]["finish_reason"]] == [
        {"tool_calls": [[{"expression": "6*7", "output": "42"}]]}]
    assert all("chibichat" not in d for d in deltas if not d["choices"][0]["finish_reason"])


def test_top_logprobs_hold_the_chosen_token_as_it_reads_and_keep_partial_tokens_apart(served):
    """The chosen token is in its top_logprobs under the text it reads as in tokens ("" for a lead byte the
    next token leaves unfinished), so a client finds it there; the alternatives that are not whole UTF-8
    characters are keyed "bytes:\\xNN" as in the OpenAI API, so they do not collapse into one
    replacement-character key. In chat, the chosen token's top_logprobs entry reads as its own entry."""
    from chibichat.serve.app import create_app

    assert served.pool.engines[0].tokenizer.id_to_bytes(0xE3) == b"\xe3"  # the fixture's byte-level tokens

    def steer(logits, state):  # three bytes that are parts of multi-byte characters, far ahead of the rest
        logits[..., 0xE3], logits[..., 0x81], logits[..., 0xE4] = 1000.0, 999.0, 998.0

    pool = steered_pool(served, steer)
    msgs = [{"role": "user", "content": "hi"}]
    try:
        with Server(create_app(pool, served.model, Limits())) as url:
            r = httpx.post(url + "/v1/completions", json={"model": served.model, "prompt": "x", "max_tokens": 2,
                                                          "temperature": 0, "logprobs": 3}, timeout=60)  # fmt: skip
            chat = httpx.post(url + "/v1/chat/completions", json={"model": served.model, "messages": msgs,
                              "max_tokens": 2, "temperature": 0, "logprobs": True, "top_logprobs": 3}, timeout=60)  # fmt: skip
    finally:
        pool.shutdown()
    c = r.json()["choices"][0]
    lp = c["logprobs"]
    # the tokens read as the text they add: the second \xe3 ends the first one's character unfinished,
    # and the reply's end its own
    assert c["text"] == "\ufffd\ufffd" and lp["tokens"] == ["", "\ufffd\ufffd"] and lp["text_offset"] == [0, 0]
    assert [list(t) for t in lp["top_logprobs"]] == [["", "bytes:\\x81", "bytes:\\xe4"],
                                                     ["\ufffd\ufffd", "bytes:\\x81", "bytes:\\xe4"]]  # fmt: skip
    assert [t[token] for t, token in zip(lp["top_logprobs"], lp["tokens"])] == lp["token_logprobs"]
    entries = chat.json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == ["", "\ufffd\ufffd"] and [e["bytes"] for e in entries] == [[0xE3]] * 2
    for e in entries:
        assert e["top_logprobs"][0] == {"token": e["token"], "logprob": e["logprob"], "bytes": [0xE3]}
        assert [(x["token"], x["bytes"]) for x in e["top_logprobs"][1:]] == [("\ufffd", [0x81]), ("\ufffd", [0xE4])]


def test_top_logprobs_name_a_token_a_stop_string_cuts_as_it_reads(served):
    """<|python_start|> shows "<<" but reads "<" when the stop string "<g" cuts it, the text of the runner-up,
    the byte "<": the completions key "<" stays the chosen token's (tokens[i] must name its logprob) and the
    runner-up is keyed by its bytes. At every position the chosen token is under its tokens[i] and, in chat,
    its top_logprobs entry reads as the entry; streamed, the same."""
    from chibichat.render import render_prompt
    from chibichat.serve.app import create_app

    script = stop_script(served)
    cut_at = script.index(served.pool.engines[0].tokenizer.special_id("<|python_start|>"))
    want, tokens, _ = STOP_CASES["<g"]

    def runner_up(prompt_len):  # the script, each token with a runner-up: "<" at the cut, else \xe4
        lead = scripted(prompt_len, script)

        def steer(logits, state):
            lead(logits, state)
            for b, n in enumerate(state.lengths):
                logits[b, -1, ord("<") if n - prompt_len == cut_at else 0xE4] = 1e4 - 1

        return steer

    msgs = [{"role": "user", "content": "hi"}]
    chat_len = len(render_prompt(served.pool.engines[0].tokenizer, {"messages": msgs}, max_len=95).ids)
    got = {}
    for path, prompt_len, body in (
        ("/v1/completions", 2, {"prompt": "x", "logprobs": 2, "stop": "<g"}),  # <|bos|> x
        ("/v1/chat/completions", chat_len, {"messages": msgs, "logprobs": True, "top_logprobs": 2, "stop": ["<g"]}),
    ):
        pool = steered_pool(served, runner_up(prompt_len))
        try:
            with Server(create_app(pool, served.model, Limits(), tools=None)) as url:
                got[path] = post_and_stream(url, path, {"model": served.model, "max_tokens": 16, "temperature": 0, **body})
        finally:
            pool.shutdown()
    r, lines = got["/v1/completions"]
    lp = r.json()["choices"][0]["logprobs"]
    assert r.json()["choices"][0]["text"] == want and lp["tokens"] == tokens
    assert [list(t) for t in lp["top_logprobs"]] == [[t, "bytes:\\xe4"] for t in tokens[:-1]] + [["<", "bytes:\\x3c"]]
    assert [t[token] for t, token in zip(lp["top_logprobs"], lp["tokens"])] == lp["token_logprobs"]
    streamed = [x for line in lines[:-1] for x in [json.loads(line)["choices"][0]["logprobs"]] if x]
    assert [list(t) for x in streamed for t in x["top_logprobs"]] == [list(t) for t in lp["top_logprobs"]]
    r, lines = got["/v1/chat/completions"]
    entries = r.json()["choices"][0]["logprobs"]["content"]
    assert r.json()["choices"][0]["message"]["content"] == want and [e["token"] for e in entries] == tokens
    for e in entries:
        assert e["top_logprobs"][0] == {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}
    assert [(e["top_logprobs"][1]["token"], e["top_logprobs"][1]["bytes"]) for e in entries] == \
        [("\ufffd", [0xE4])] * (len(tokens) - 1) + [("<", [ord("<")])]  # fmt: skip
    streamed = [e for line in lines[:-1] for ch in json.loads(line)["choices"] if ch["logprobs"]
                for e in ch["logprobs"]["content"]]  # fmt: skip
    assert [[x["token"] for x in e["top_logprobs"]] for e in streamed] == [[x["token"] for x in e["top_logprobs"]] for e in entries]


def test_top_logprob_keys_reserve_the_chosen_text_and_leave_out_what_a_dict_cannot_hold():
    """top_logprob_keys: the chosen token's text names only it, even when it is not among the alternatives;
    an alternative whose text and bytes form are both taken by more likely ones is left out (None)."""
    from chibichat.serve.app import top_logprob_keys

    assert top_logprob_keys("<", [(False, b"<"), (False, b"\xe3")]) == ["bytes:\\x3c", "bytes:\\xe3"]
    assert top_logprob_keys(">>", [(False, b">>"), (True, b">>"), (False, b">>"), (False, b"a")]) == [
        "bytes:\\x3e\\x3e", ">>", None, "a"]  # fmt: skip
    assert top_logprob_keys("", [(True, b"\xe3"), (False, b"\xe3\x81"), (False, b"")]) == ["", "bytes:\\xe3\\x81", "bytes:"]


# A reply with characters split over the byte-level tokens: "あ" (3 bytes) and "😀" (4) whole, a lead byte
# that the next token ("d") leaves unfinished, and one the reply's end (max_tokens) leaves unfinished.
SPLIT_REPLY = b"a\xe3\x81\x82b\xf0\x9f\x98\x80c\xe3d\xe3\x81"
SPLIT_TEXT = "aあb😀c\ufffdd\ufffd"
SPLIT_TOKENS = ["a", "", "", "あ", "b", "", "", "", "😀", "c", "", "\ufffdd", "", "\ufffd"]


def scripted_server(served, prompt_len, script):
    """A server without a tool whose replies (to a prompt of `prompt_len` tokens) open with the tokens `script`."""
    from chibichat.serve.app import create_app

    pool = steered_pool(served, scripted(prompt_len, script))
    return pool, Server(create_app(pool, served.model, Limits(), tools=None))


def post_and_stream(url, path, body):
    """One request body sent twice: the plain response, and the streamed one's `data: ` payloads ([DONE] last)."""
    r = httpx.post(url + path, json=body, timeout=60)
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as s:
        lines = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    return r, lines


def split_reply_server(served, prompt_len):
    """A server whose replies (to a prompt of `prompt_len` tokens) are SPLIT_REPLY, one byte a token."""
    return scripted_server(served, prompt_len, list(SPLIT_REPLY))


def split_reply(served, prompt_len, path, body):
    """post_and_stream of `body` to a server answering SPLIT_REPLY (split_reply_server), then shut down."""
    pool, server = split_reply_server(served, prompt_len)
    try:
        with server as url:
            return post_and_stream(url, path, body)
    finally:
        pool.shutdown()


def test_completion_text_offsets_of_characters_split_over_tokens(served):
    """Each token reads as the text it completes ("" for one that only starts a character), and
    text_offset[i] is where that text starts in the reply: a character's bytes all point at it. Streamed,
    the chunks' tokens and offsets are the same (the last token waits for the end's U+FFFD)."""
    body = {"model": served.model, "prompt": "x", "max_tokens": len(SPLIT_REPLY), "temperature": 0, "logprobs": 1}
    r, lines = split_reply(served, 2, "/v1/completions", body)  # <|bos|> x
    c = r.json()["choices"][0]
    text, lp = c["text"], c["logprobs"]
    assert text == SPLIT_TEXT and lp["tokens"] == SPLIT_TOKENS
    assert lp["text_offset"] == [0, 1, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5, 7, 7]
    assert all(text[o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"]))
    chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
    assert "".join(ch["text"] for ch in chunks) == text
    streamed = [ch["logprobs"] for ch in chunks if ch["logprobs"]]
    assert [t for x in streamed for t in x["tokens"]] == lp["tokens"]
    assert [o for x in streamed for o in x["text_offset"]] == lp["text_offset"]


def test_chat_logprob_tokens_add_up_to_the_content_with_split_characters(served):
    """A chat reply's logprob tokens read as the text they complete, so they add up to the content
    (streamed too); `bytes` keeps each token's own bytes."""
    from chibichat.render import render_prompt

    msgs = [{"role": "user", "content": "hi"}]
    prompt_len = len(render_prompt(served.pool.engines[0].tokenizer, {"messages": msgs}, max_len=95).ids)
    body = {"model": served.model, "messages": msgs, "max_tokens": len(SPLIT_REPLY), "temperature": 0,
            "logprobs": True}  # fmt: skip
    r, lines = split_reply(served, prompt_len, "/v1/chat/completions", body)
    c = r.json()["choices"][0]
    entries = c["logprobs"]["content"]
    assert c["message"]["content"] == SPLIT_TEXT
    assert [e["token"] for e in entries] == SPLIT_TOKENS and "".join(e["token"] for e in entries) == SPLIT_TEXT
    assert [e["bytes"] for e in entries] == [[b] for b in SPLIT_REPLY]
    chunks = [json.loads(line)["choices"][0] for line in lines[:-1]]
    assert "".join(ch["delta"].get("content", "") for ch in chunks) == SPLIT_TEXT
    assert [e["token"] for ch in chunks if ch["logprobs"] for e in ch["logprobs"]["content"]] == SPLIT_TOKENS


def stop_script(served):
    """The reply "hello あ \ufffdd<<go": one byte a token, then <|python_start|> (one token showing "<<")."""
    return [*b"hello \xe3\x81\x82 \xe3d", served.pool.engines[0].tokenizer.special_id("<|python_start|>"), *b"go"]


# stop -> (returned text, its logprob tokens, tokens generated). "lo" spans two tokens (both dropped); "あ"
# starts at a character split over three tokens (all dropped, the "" ones too); "d" starts inside the token
# "d" (it ends the \xe3 before it: "\ufffdd") and "<g" inside <|python_start|> ("<<"): each straddling token
# stays, cut to its part before the stop string. The generation ends at the token completing the stop string.
STOP_CASES = {
    "lo": ("hel", ["h", "e", "l"], 5),
    "あ": ("hello ", ["h", "e", "l", "l", "o", " "], 9),
    "d": ("hello あ \ufffd", ["h", "e", "l", "l", "o", " ", "", "", "あ", " ", "", "\ufffd"], 12),
    "<g": ("hello あ \ufffdd<", ["h", "e", "l", "l", "o", " ", "", "", "あ", " ", "", "\ufffdd", "<"], 14),
}


def test_completion_logprobs_end_where_a_stop_string_cuts_the_text(served):
    """With a stop string, the logprob tokens are those of the returned text (the one straddling the cut
    reads its part before it), so they add up to the text and every text_offset lies within it; streamed,
    a token goes out only once the text sent covers it (the stop string may be recognised chunks later),
    and the chunks' tokens and offsets are the non-streamed ones. usage counts every token generated."""
    body = {"model": served.model, "prompt": "x", "max_tokens": 16, "temperature": 0, "logprobs": 1}
    pool, server = scripted_server(served, 2, stop_script(served))  # <|bos|> x
    try:
        with server as url:
            for stop, (want, tokens, generated) in STOP_CASES.items():
                r = httpx.post(url + "/v1/completions", json={**body, "stop": stop}, timeout=60)
                c = r.json()["choices"][0]
                lp = c["logprobs"]
                assert (c["text"], lp["tokens"], c["finish_reason"]) == (want, tokens, "stop"), stop
                assert lp["text_offset"] == [len("".join(tokens[:k])) for k in range(len(tokens))], stop
                assert all(o + len(t) <= len(want) for o, t in zip(lp["text_offset"], lp["tokens"])), stop
                assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(tokens), stop
                assert r.json()["usage"]["completion_tokens"] == generated, stop
                streamed = {**body, "stop": stop, "stream": True, "stream_options": {"include_usage": True}}
                with httpx.stream("POST", url + "/v1/completions", json=streamed, timeout=60) as s:
                    lines = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
                text, got, offsets = "", [], []
                for ch in [x["choices"][0] for x in lines if x["choices"]]:
                    text += ch["text"]
                    if ch["logprobs"]:
                        got += ch["logprobs"]["tokens"]
                        offsets += ch["logprobs"]["text_offset"]
                        assert offsets[-1] + len(got[-1]) <= len(text), stop  # never ahead of the text sent
                assert (text, got, offsets) == (want, tokens, lp["text_offset"]), stop
                assert lines[-1]["usage"]["completion_tokens"] == generated, stop
    finally:
        pool.shutdown()


def test_chat_logprobs_end_where_a_stop_string_cuts_the_content(served):
    """A chat reply cut by a stop string: its logprob tokens add up to the content, streamed or not (each
    chunk's tokens never ahead of the content sent); `bytes` stay each token's own, a cut one's too."""
    from chibichat.render import render_prompt

    msgs = [{"role": "user", "content": "hi"}]
    prompt_len = len(render_prompt(served.pool.engines[0].tokenizer, {"messages": msgs}, max_len=95).ids)
    body = {"model": served.model, "messages": msgs, "max_tokens": 16, "temperature": 0, "logprobs": True}
    pool, server = scripted_server(served, prompt_len, stop_script(served))
    try:
        with server as url:
            for stop, (want, tokens, generated) in STOP_CASES.items():
                r = httpx.post(url + "/v1/chat/completions", json={**body, "stop": [stop]}, timeout=60)
                c = r.json()["choices"][0]
                entries = c["logprobs"]["content"]
                assert (c["message"]["content"], [e["token"] for e in entries]) == (want, tokens), stop
                assert c["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] == generated, stop
                streamed = {**body, "stop": [stop], "stream": True}
                with httpx.stream("POST", url + "/v1/chat/completions", json=streamed, timeout=60) as s:
                    lines = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
                text, got = "", []
                for ch in [x["choices"][0] for x in lines]:
                    text += ch["delta"].get("content", "")
                    got += [e["token"] for e in (ch["logprobs"] or {"content": []})["content"]]
                    assert text.startswith("".join(got)), stop  # never ahead of the content sent
                assert (text, got) == (want, tokens), stop
    finally:
        pool.shutdown()
    assert entries[-1]["bytes"] == list(b"<<") and entries[-2]["bytes"] == list(b"d")  # the last case: "<g"


def strict_json(text):
    """json.loads that refuses NaN and Infinity (not JSON; Python's json writes them unless told not to)."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_logprobs_of_a_reply_with_a_tool_call(served):
    """logprobs of a reply that calls the calculator: strict JSON, streamed or not. The tokens the tool forced
    (not drawn by the model) are certain, logprob 0.0 with themselves as the only alternative; every token
    reads as it shows in the content, so the token texts add up to it."""
    from chibichat.serve.app import create_app

    msgs = [{"role": "user", "content": "6*7?"}]
    pool = steered_pool(served, calculator_call(served, msgs, "6*7"))
    body = {"model": served.model, "messages": msgs, "temperature": 0, "max_tokens": 16, "logprobs": True,
            "top_logprobs": 2}  # fmt: skip
    got = {}
    try:
        for tools in ("calculator", None):
            with Server(create_app(pool, served.model, Limits(), tools=tools)) as url:
                r, lines = post_and_stream(url, "/v1/chat/completions", body)
                assert r.status_code == 200, r.text
            assert lines[-1] == "[DONE]"
            chunks = [strict_json(line) for line in lines[:-1]]
            streamed = [e for c in chunks for x in c["choices"] if x["logprobs"] for e in x["logprobs"]["content"]]
            full = strict_json(r.text)["choices"][0]
            entries = full["logprobs"]["content"]
            assert [(e["token"], round(e["logprob"], 4)) for e in streamed] == [(e["token"], round(e["logprob"], 4)) for e in entries]
            assert bytes(b for e in entries for b in e["bytes"]).decode("utf-8", errors="replace") == full["message"]["content"]
            got[tools] = full["message"]["content"], entries
    finally:
        pool.shutdown()
    content, entries = got["calculator"]
    assert content.startswith("<<6*7=42>>")
    assert [e["token"] for e in entries[:5]] == ["<<", "6", "*", "7", ""]  # <|python_end|>: the result follows
    assert entries[5:9] == [{"token": t, "logprob": 0.0, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": t, "logprob": 0.0, "bytes": list(t.encode())}]}
                            for t in ("=", "4", "2", ">>")]  # fmt: skip
    content, entries = got[None]  # no tool: nothing forced, and <|python_end|> closes the call itself
    assert content.startswith("<<6*7>>") and [e["token"] for e in entries[:5]] == ["<<", "6", "*", "7", ">>"]
    assert entries[4]["logprob"] == entries[4]["top_logprobs"][0]["logprob"] > -1e-3


def recording_pool(served, steer=None):
    """A one-replica pool over the fixture's model (its logits steered by `steer`) that keeps each request's
    prompt ids and stream in `seen`."""
    from chibichat.serve.pool import WorkerPool

    class Pool(WorkerPool):
        def submit(self, req):
            stream = super().submit(req)
            self.seen.append((req.prompt, stream))
            return stream

    eng = served.pool.engines[0]
    twin = eng.sibling()
    if steer is not None:
        dec = Steered(eng.decoder(), steer)
        twin.decoder = lambda: dec
    pool = Pool([twin])
    pool.seen = []
    return pool


def tool_reply(tok, *pieces):
    """Reply token ids: a str piece is text, an (expr, result) pair a call with the result the tool forces."""
    ids = []
    for piece in pieces:
        if isinstance(piece, str):
            ids += tok.encode(piece)
        else:
            ids += [tok.special_id("<|python_start|>"), *tok.encode(piece[0]), tok.special_id("<|python_end|>"),
                    tok.special_id("<|output_start|>"), *tok.encode(piece[1]), tok.special_id("<|output_end|>")]  # fmt: skip
    return ids


def test_a_reply_sent_back_as_text_gives_the_prompt_its_tool_parts_give(served):
    """Turn 2 of a conversation whose first reply called the calculator (at its start, twice in a row, a failed
    call, at its end) sees that reply as the model wrote it: the prompt is the one of the reply's parts kept
    server-side, not of its text."""
    import sys

    from chibichat.render import render_prompt
    from chibichat.serve.app import create_app

    eng = served.pool.engines[0]
    tok = eng.tokenizer
    first = [{"role": "user", "content": "6*7?"}]
    reply = tool_reply(tok, ("6*7", "42"), ("1/0", "Error: division by zero"), " ok", ("2+3", "5"))
    script = reply + [tok.special_id("<|assistant_end|>")]
    pool = recording_pool(served, scripted(len(render_prompt(tok, {"messages": first}, max_len=95).ids), script))
    body = {"model": served.model, "temperature": 0, "max_tokens": len(script)}
    try:
        with Server(create_app(pool, served.model, Limits())) as url:
            r1 = httpx.post(url + "/v1/chat/completions", json={**body, "messages": first}, timeout=60).json()
            text = r1["choices"][0]["message"]["content"]
            history = [*first, {"role": "assistant", "content": text}, {"role": "user", "content": "and?"}]
            r2 = httpx.post(url + "/v1/chat/completions", json={**body, "messages": history, "max_tokens": 1},
                            timeout=60)  # fmt: skip
            assert r2.status_code == 200, r2.text
    finally:
        pool.shutdown()
    assert text == "<<6*7=42>><<1/0=Error: division by zero>> ok<<2+3=5>>"  # nothing but the markers' own text
    tokens = pool.seen[0][1].result["choices"][0]["tokens"]
    assert tokens == script
    kept = [*first, {"role": "assistant", "content": eng.to_parts(tokens)}, history[2]]
    assert pool.seen[1][0] == render_prompt(tok, {"messages": kept}, max_len=sys.maxsize).ids
    assert pool.seen[1][0] != render_prompt(tok, {"messages": history}, max_len=sys.maxsize).ids


def test_only_a_call_whose_result_the_tool_gives_becomes_tool_parts(served):
    """parts_from_text inverts the reply text exactly where the result is the tool's, known without running code;
    anything else, however close, stays text."""
    from chibichat.engine import _ChoiceText, parts_from_text

    eng = served.pool.engines[0]
    tok = eng.tokenizer
    call = [{"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}]
    for text in ("<<2+2=5>>", "a << b >> c", "<<x=1>>", "<<6*7>>", "<<2+2=4", "<<2+2 = 4>>", "x <= y >> z"):
        assert parts_from_text(text, "calculator") == text
    assert parts_from_text("<<2+2=5>> a << b >> c <<x=1>><<2+2=4>>", "calculator") == [
        {"type": "text", "text": "<<2+2=5>> a << b >> c <<x=1>>"}, *call]  # fmt: skip
    assert parts_from_text("<<2+2=4>>", None) == "<<2+2=4>>"  # tools off: the server never shows a result
    # python: the calculator's values only; what it refuses ran in the sandbox, which never runs for this
    assert parts_from_text("<<2+2=4>>", "python") == call
    for text in ("<<1/0=Error: division by zero>>", "<<print(3)=3>>", "<<1,234=(1, 234)>>"):
        assert parts_from_text(text, "python") == text
    # the text the engine shows for a reply, back to the reply's parts: exactly Engine.to_parts
    for pieces in [(("6*7", "42"),), ("a ", ("1,234+1", "1235"), ("1/0", "Error: division by zero"), " b"),
                   ("ま", ('"=".join("ab")', "a=b"), "=", ('">".join(">>")', ">>>"), ">"),
                   ("<", ('"x<<y".count("<")', "2"), "<<2+2=5>>", ("-1", "-1"))]:  # fmt: skip
        tokens = tool_reply(tok, *pieces)
        shown = _ChoiceText(eng, [])
        text = "".join(shown.feed(t, k == len(tokens) - 1) for k, t in enumerate(tokens))
        assert parts_from_text(text, "calculator") == eng.to_parts(tokens), text


def test_completions_prompt_keeps_tool_call_text_as_text(served):
    """/v1/completions continues the prompt's text as written; only chat history reads a call as tool parts."""
    from chibichat.serve.app import create_app

    tok = served.pool.engines[0].tokenizer
    text = "<<6*7=42>> so"
    pool = recording_pool(served)
    try:
        with Server(create_app(pool, served.model, Limits())) as url:
            r = httpx.post(url + "/v1/completions", json={"model": served.model, "prompt": text, "max_tokens": 1},
                           timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text},
                    {"role": "user", "content": "so?"}]  # fmt: skip
            r = httpx.post(url + "/v1/chat/completions", json={"model": served.model, "messages": msgs,
                           "max_tokens": 1}, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
    finally:
        pool.shutdown()
    assert pool.seen[0][0] == [tok.bos_id, *tok.encode(text)]
    assert tok.special_id("<|python_start|>") in pool.seen[1][0]


# -- operations ------------------------------------------------------------------------------------


def test_metrics_label_values_are_escaped():
    from chibichat.serve.metrics import Metrics

    m = Metrics()
    m.count_request('a"b\\c\nd', 404)
    assert r'chibichat_requests_total{route="a\"b\\c\nd",status="404"} 1' in m.render({}).splitlines()


def test_metrics_count_paths_no_route_serves_as_other(served):
    """Any /v1/* path a client sends (even one holding a quote and a line feed) is counted under its route's
    template or "other": the page stays valid exposition text and gains no series per path."""
    import re

    label = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
    sample = re.compile(rf"[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{{{label}(?:,{label})*\}})? \S+")
    key = 'chibichat_requests_total{route="other",status="404"}'
    before = parse_metrics(httpx.get(served.url + "/metrics").text).get(key, 0)
    for path in ("/v1/a%22b%0Ac", "/v1/nope"):
        assert httpx.get(served.url + path).status_code == 404
    assert httpx.get(served.url + "/v1/models/" + served.model).status_code == 200
    text = httpx.get(served.url + "/metrics").text
    for line in text.splitlines():
        assert line.startswith("# TYPE ") or sample.fullmatch(line), line
    after = parse_metrics(text)
    assert after[key] == before + 2
    assert after['chibichat_requests_total{route="/v1/models/{model}",status="200"}'] >= 1
    routes = {re.search(r'route="((?:[^"\\]|\\.)*)"', k).group(1) for k in after if k.startswith("chibichat_requests_total")}
    assert routes <= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}", "other"}, routes


def test_api_key_required_on_the_api_and_metrics(served):
    import openai

    from chibichat.serve.app import create_app

    app = create_app(served.pool, served.model, Limits(default_max_tokens=8), api_key="s3cret-key")
    with Server(app) as url:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        assert e.value.status_code == 401 and "API key" in str(e.value)
        assert httpx.post(url + "/v1/completions", json={"model": served.model, "prompt": "x"}).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key")
        assert [m.id for m in client.models.list().data] == [served.model]
        r = client.completions.create(model=served.model, prompt="x", max_tokens=3)
        assert r.usage.completion_tokens >= 1
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        # the auth scheme is case-insensitive (RFC 9110); the key is not
        for header in ("bearer s3cret-key", "BEARER  s3cret-key"):
            assert httpx.get(url + "/v1/models", headers={"Authorization": header}).status_code == 200, header
        for header in ("bearer S3CRET-KEY", "Basic s3cret-key", "s3cret-key"):
            r = httpx.get(url + "/v1/models", headers={"Authorization": header})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", header
        # the page and /health stay open (the page asks for the key itself)
        assert httpx.get(url + "/").status_code == 200 and httpx.get(url + "/health").json()["auth"] is True


def test_api_key_flags(tmp_path):
    from chibichat.common import ChibiError
    from chibichat.stages.serve import api_key

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert api_key(SimpleNamespace(api_key=None, api_key_file=str(key_file))) == "from-file"
    assert api_key(SimpleNamespace(api_key="k", api_key_file=None)) == "k"
    with pytest.raises(ChibiError, match="not both"):
        api_key(SimpleNamespace(api_key="k", api_key_file=str(key_file)))
    key_file.write_text("\n")
    with pytest.raises(ChibiError, match="non-empty"):
        api_key(SimpleNamespace(api_key=None, api_key_file=str(key_file)))
    with pytest.raises(ChibiError, match="cannot read --api-key-file"):
        api_key(SimpleNamespace(api_key=None, api_key_file=str(tmp_path / "missing")))


@pytest.mark.parametrize(
    "flag, value, message",
    [("max_batch", 4, "--max-batch must be >= 8"), ("timeout", -1.0, "--timeout must be a finite number of seconds >= 0"),
     ("shutdown_grace", -2.0, "--shutdown-grace must be a finite number of seconds >= 0, got -2.0"), ("workers", 0, "--workers must be >= 1"),
     ("max_queue", -1, "--max-queue must be >= 0"), ("port", 70000, "--port must be in 1..65535"),
     # nan passes every comparison (no request would ever time out); inf is no number of seconds
     ("timeout", float("nan"), "--timeout must be a finite number of seconds >= 0 \\(0 = no limit\\), got nan"),
     ("timeout", float("inf"), "--timeout must be a finite number"),
     ("shutdown_grace", float("nan"), "--shutdown-grace must be a finite number of seconds >= 0, got nan")],
)
def test_serve_flags_are_checked_before_loading(flag, value, message):
    from chibichat.common import ChibiError
    from chibichat.stages.serve import check_args

    ok = dict(port=8000, max_queue=64, max_tokens=512, max_batch=32, timeout=300.0, shutdown_grace=30.0, workers=None,
              tools="calculator", allow_weak_sandbox=False)
    check_args(SimpleNamespace(**ok))
    with pytest.raises(ChibiError, match=message):
        check_args(SimpleNamespace(**{**ok, flag: value}))


def test_an_open_host_without_a_key_gets_a_warning():
    from chibichat.stages.serve import is_loopback, open_host_warning

    assert [is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.com", "")] == [False] * 5
    assert open_host_warning("127.0.0.1", None) is None and open_host_warning("0.0.0.0", "key") is None
    assert open_host_warning("0.0.0.0", None) == (
        "chibichat serve: warning: --host 0.0.0.0 is reachable beyond this machine and no API key is set: anyone "
        "who can reach it can use the model; give --api-key or --api-key-file")


def test_a_port_in_use_or_a_foreign_address_is_refused_before_listening(served, capsys):
    """uvicorn would print its own error after ours said "listening at", and exit 3: the stage binds first."""
    from chibichat.cli import main
    from chibichat.common import ChibiError
    from chibichat.stages.serve import listen_socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--home", str(served.home.root), "--device", "cpu", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert "listening" not in out
    assert err.strip().splitlines()[-1] == (f"chibichat serve: error: cannot listen on 127.0.0.1:{port}: Address already "
                                            "in use; another process listens on that port: choose another --port, or "
                                            "stop it")
    with pytest.raises(ChibiError) as e:
        listen_socket("192.0.2.1", port)  # TEST-NET-1: no machine's own address
    assert str(e.value) == (f"cannot listen on 192.0.2.1:{port}: Cannot assign requested address; it is not an address "
                            "of this machine: give --host 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or "
                            "one of its addresses")


def metrics_once_cancelled(url, timeout=20.0):
    """The server's metrics as soon as one request has ended as cancelled (or when `timeout` runs out)."""
    deadline, m = time.time() + timeout, {}
    while time.time() < deadline:
        m = parse_metrics(httpx.get(url + "/metrics").text)
        if m['chibichat_requests_finished_total{reason="cancelled"}'] == 1:
            break
        time.sleep(0.02)
    return m


def test_disconnect_cancels_generation_and_frees_its_rows(served):
    from chibichat.serve.app import create_app

    pool = slow_pool(served, 0.05, endless=True)
    app = create_app(pool, served.model, Limits(default_max_tokens=80))
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 80, "stream": True,
            "temperature": 0}  # fmt: skip
    try:
        with Server(app) as url:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                got = 0
                for line in r.iter_lines():
                    got += line.startswith("data: ")
                    if got == 4:
                        break
                assert pool.rows == 1
            # the connection is closed: the request ends as cancelled and its row leaves the batch
            m = metrics_once_cancelled(url)
            assert m['chibichat_requests_finished_total{reason="cancelled"}'] == 1
            assert m["chibichat_batch_rows"] == 0 and m["chibichat_queue_depth"] == 0 and pool.rows == 0
            assert m["chibichat_completion_tokens_total"] < 40  # far from the 80 asked for: generation stopped
            assert m["chibichat_time_to_first_token_seconds_count"] == 1
            assert m["chibichat_inter_token_latency_seconds_count"] >= 2
            assert m["chibichat_decode_rows_total"] == m["chibichat_decode_steps_total"]  # one row per step
            assert m["chibichat_ready"] == 1 and m["chibichat_batch_max_rows"] == 32
    finally:
        pool.shutdown()


def test_disconnect_cancels_a_non_streaming_generation(served):
    from chibichat.serve.app import create_app

    pool = slow_pool(served, 0.05, endless=True)
    app = create_app(pool, served.model, Limits(default_max_tokens=80))
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 80, "temperature": 0}
    try:
        with Server(app) as url:
            # the client gives up after 0.4 s (8 of the 80 slowed steps) and closes its connection
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.4))
            m = metrics_once_cancelled(url)
            assert m['chibichat_requests_finished_total{reason="cancelled"}'] == 1
            assert m['chibichat_requests_finished_total{reason="done"}'] == 0
            assert m["chibichat_batch_rows"] == 0 and pool.rows == 0
            assert m["chibichat_completion_tokens_total"] < 40  # far from the 80 asked for: generation stopped
            assert m['chibichat_requests_total{route="/v1/chat/completions",status="499"}'] == 1
    finally:
        pool.shutdown()


def test_a_queued_stream_whose_client_leaves_frees_its_queue_slot(served):
    """A streaming request waiting for rows is cancelled when its client goes away, before any row frees:
    it neither keeps its queue slot nor gets prefilled later."""
    from chibichat.serve.app import create_app

    pool = slow_pool(served, 0.1, endless=True, max_queue=1, max_rows=8)
    app = create_app(pool, served.model, Limits(default_max_tokens=60))
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "stream": True,
            "temperature": 0, "n": 8}  # 8 rows for 60 steps of 0.1 s: the batch stays full for 6 s
    try:
        with Server(app) as url:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as first:
                assert first.status_code == 200
                # the second waits for a row (not 503: one may wait); its client gives up after 0.4 s
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(url + "/v1/chat/completions", json={**body, "n": 1}, timeout=httpx.Timeout(10, read=0.4))
                m = metrics_once_cancelled(url, timeout=3.0)
                assert m['chibichat_requests_finished_total{reason="cancelled"}'] == 1
                assert pool.waiting == 0 and pool.rows == 8  # out of the queue while the first holds every row
                assert m["chibichat_time_to_first_token_seconds_count"] == 1  # only the first was ever prefilled
                assert m['chibichat_requests_total{route="/v1/chat/completions",status="499"}'] == 1
    finally:
        pool.shutdown()


def test_request_timeout(served):
    from chibichat.serve.app import create_app

    pool = slow_pool(served, 0.05, endless=True)
    app = create_app(pool, served.model, Limits(default_max_tokens=60, timeout_s=0.3))
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "temperature": 0}
    try:
        with Server(app) as url:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout" and "0.3 s" in r.json()["error"]["message"]
            deltas = []
            with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
                assert s.status_code == 200
                lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
            assert lines[-1] != "data: [DONE]", lines
            deltas = [json.loads(ln[6:]) for ln in lines]
            assert deltas[-1]["error"]["code"] == "timeout"  # in-band, after some text
            m = parse_metrics(httpx.get(url + "/metrics").text)
            assert m['chibichat_requests_finished_total{reason="timeout"}'] == 2 and pool.rows == 0
    finally:
        pool.shutdown()


def test_graceful_shutdown_finishes_in_flight_streams(served):
    from chibichat.serve.app import create_app

    pool = slow_pool(served, 0.03, endless=True)
    app = create_app(pool, served.model, Limits(default_max_tokens=30))
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "stream": True,
            "temperature": 0}  # fmt: skip
    server = Server(app)
    try:
        with server as url:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                lines = iter(r.iter_lines())
                first = next(ln for ln in lines if ln.startswith("data: "))
                server.server.should_exit = True  # what SIGINT/SIGTERM do
                rest = [ln for ln in lines if ln.startswith("data: ")]
            assert first and rest[-1] == "data: [DONE]"
            server.thread.join(timeout=30)
            assert not server.thread.is_alive()
            with pytest.raises(httpx.ConnectError):
                httpx.get(url + "/health")
    finally:
        pool.shutdown()


def test_health_says_loading_until_the_model_is_ready(served):
    from chibichat.serve.app import create_app

    release = threading.Event()

    def load():
        assert release.wait(30)
        return served.pool

    app = create_app(None, served.model, Limits(default_max_tokens=8), load=load)
    with Server(app) as url:
        h = httpx.get(url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "loading" and h.headers["retry-after"] == "5"
        r = httpx.post(url + "/v1/chat/completions", json={"model": served.model, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading" and r.headers["retry-after"] == "5"
        assert parse_metrics(httpx.get(url + "/metrics").text)["chibichat_ready"] == 0
        release.set()
        deadline = time.time() + 10
        while httpx.get(url + "/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.02)
        assert httpx.get(url + "/health").json()["status"] == "ok"


# -- bench serve -------------------------------------------------------------------------------------


def test_percentile():
    from chibichat.bench.serve import percentile

    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([float(i) for i in range(101)], 95) == 95.0


def test_bench_serve_summary():
    from chibichat.bench.serve import summary

    level = lambda n, tok_s, ttft95, failed=0, busy=0: {"clients": n, "requests": 2 * n, "tok_s": tok_s,  # noqa: E731
                                                        "ttft_ms_p95": ttft95, "failed": failed, "busy_503": busy}
    results = [level(1, 50.0, 80.0), level(8, 200.0, 300.0, failed=1), level(32, 325.0, 812.5),
               level(64, 330.0, 9000.0, busy=21)]  # fmt: skip
    assert summary(results) == [
        "32 clients: 6.5x the 1-client tok/s (target >= 6), p95 TTFT 812.5 ms (target < 1000)",
        "failed requests: 1 of 210 (target 0); 64 clients: 21 answered 503",
    ]
    assert summary([level(8, 200.0, 300.0)]) == ["failed requests: 0 of 16 (target 0)"]


def test_bench_serve_against_a_running_server(served, tmp_path, capsys):
    from chibichat.bench.serve import run

    out = tmp_path / "bench.json"
    args = SimpleNamespace(clients="1,3", rounds=1, min_requests=2, max_tokens=5, temperature=1.0, url=served.url,
                           api_key=None, json=str(out), home=None, source=None, tag=None, step=None, device=None,
                           dtype=None, workers=None, max_batch=None, max_queue=None)  # fmt: skip
    assert run(args) == 0
    data = json.loads(out.read_text())
    # the running server's own settings (2 replicas of 32 rows, queue 64), from its /health
    assert (data["max_batch"], data["max_queue"], data["workers"]) == (32, 64, 2)
    levels = data["levels"]
    assert [lv["clients"] for lv in levels] == [1, 3] and [lv["requests"] for lv in levels] == [2, 3]  # >= min_requests
    assert all(lv["ok"] == lv["requests"] and lv["failed"] == 0 and lv["busy_503"] == 0 for lv in levels)
    assert all(0 < lv["completion_tokens"] <= 5 * lv["requests"] and lv["ttft_ms_p50"] > 0 for lv in levels)
    assert "| clients |" in capsys.readouterr().out


def bench_serve_args(**kw):
    return SimpleNamespace(**{**dict(clients="1", rounds=1, min_requests=1, max_tokens=5, temperature=1.0, url=None,
                                     api_key=None, json=None, home=None, source=None, tag=None, step=None, device=None,
                                     dtype=None, workers=None, max_batch=None, max_queue=None, startup_timeout=60.0),
                              **kw})  # fmt: skip


def test_bench_serve_refuses_server_flags_with_url_and_a_temperature_out_of_range():
    from chibichat.bench.serve import run
    from chibichat.common import ChibiError

    with pytest.raises(ChibiError, match=r"^--max-batch set up the server bench serve starts; with --url the server is "
                                         r"already running with its own settings: drop them"):
        run(bench_serve_args(url="http://127.0.0.1:9", max_batch=8))
    with pytest.raises(ChibiError, match=r"^--from, --device, --max-queue set up the server"):
        run(bench_serve_args(url="http://127.0.0.1:9", source="sft", device="cpu", max_queue=4))
    for t in (3.0, -0.5, float("nan")):
        with pytest.raises(ChibiError, match=rf"^--temperature must be between 0 and 2.0 \(the server's range\), got {t}$"):
            run(bench_serve_args(url="http://127.0.0.1:9", temperature=t))


def test_bench_serve_refuses_an_unwritable_json_before_starting_the_server(tmp_path, monkeypatch):
    from chibichat.bench import serve as bench_serve
    from chibichat.common import ChibiError

    monkeypatch.setattr(bench_serve, "_start_server", lambda *a: pytest.fail("started before --json was checked"))
    with pytest.raises(ChibiError) as e:
        bench_serve.run(bench_serve_args(json=str(tmp_path)))
    assert str(e.value) == f"--json {tmp_path} is a directory; pass the path of a file"


def test_bench_serve_keeps_the_servers_error_message(served):
    from chibichat.bench.serve import run_level

    level = run_level(served.url, served.model, 1, 1, 5, 3.0, None)
    assert level["failed"] == 1 and level["errors"] == ["HTTP 400: 'temperature' must be between 0.0 and 2.0, got 3.0"]


def test_bench_serve_sends_the_servers_output_to_a_file_and_shows_its_tail(tmp_path, monkeypatch):
    """A server that writes far more than a pipe holds still runs on (nobody reads a pipe during the
    bench); when it fails to start, the end of its output is in the error."""
    from chibichat.bench import serve as bench_serve
    from chibichat.common import ChibiError

    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\nhead -c 1000000 /dev/zero | tr '\\0' x\necho\necho the last words of the server\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(bench_serve.sys, "executable", str(fake))
    with pytest.raises(ChibiError, match=r"`chibichat serve` exited with 3:\n.*x\nthe last words of the server\n$"):
        bench_serve.run(bench_serve_args(startup_timeout=60.0))


@pytest.mark.slow
def test_bench_serve_starts_the_real_server_with_a_key(served, tmp_path):
    """`chibichat bench serve` starts `chibichat serve` (a subprocess: loading in the background, --api-key,
    --max-batch, --max-queue) and drives it: every request is served or answered 503, none fails (how many
    503s depends on how fast the 8 rows free up; the 503 itself is tested in test_busy_pool_...)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "chibichat", "bench", "serve", "--home", str(served.home.root), "--device", "cpu",
           "--dtype", "float32", "--clients", "12", "--rounds", "1", "--max-tokens", "40", "--max-batch", "8",
           "--max-queue", "1", "--api-key", "k3y", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    assert (data["max_batch"], data["max_queue"]) == (8, 1)  # as the started server's /health reports them
    (level,) = data["levels"]
    assert level["requests"] == 12 and level["failed"] == 0, level
    assert level["ok"] >= 8 and level["ok"] + level["busy_503"] == 12 and level["completion_tokens"] > 0


def test_readme_states_the_servers_limits_parameters_and_defaults():
    """The README's "Serving" section quotes these values; a change here must change it (and this test)."""
    from pathlib import Path

    from chibichat.cli import build_parser
    from chibichat.serve.app import RETRY_AFTER_S
    from chibichat.serve.protocol import CHAT_PARAMS, COMPLETION_PARAMS, MAX_TOP_LOGPROBS

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    serving = " ".join(text.split("\n## Serving\n", 1)[1].split("\n## ", 1)[0].split())
    lim, d = Limits(), build_parser().parse_args(["serve"])
    for phrase in (f"A request body over {lim.max_body_bytes >> 20} MiB answers 413",
                   f"`n` (≤ {lim.max_n}, one prefill)", f"`stop` (≤ {lim.max_stop} strings)",
                   f"(chat, ≤ {MAX_TOP_LOGPROBS};", f"over up to `--max-batch` rows (default {d.max_batch})",
                   f"`--max-queue` requests wait (default {d.max_queue}), then 503 with `Retry-After: "
                   f"{RETRY_AFTER_S['server_busy']}` (while loading: `Retry-After: {RETRY_AFTER_S['loading']}`)",
                   f"`--timeout` (default {d.timeout:g} s)",
                   f"`--shutdown-grace` seconds (default {d.shutdown_grace:g})",
                   f"127.0.0.1:{d.port}"):
        assert phrase in serving, phrase
    # every parameter a route takes is named (model, messages and prompt are the request itself)
    named = set(re.findall(r"`(\w+)", serving))
    assert sorted((CHAT_PARAMS | COMPLETION_PARAMS) - {"model", "messages", "prompt", "suffix"} - named) == []
