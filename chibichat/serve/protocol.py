"""The OpenAI chat-completions wire format: request validation and response/chunk bodies.

Validation is written out by hand rather than with pydantic models so that every failure maps to
an OpenAI-style error body {"error": {"message", "type", "param", "code"}} with a status the
official client understands: 400 for a body that is not JSON or a value out of range, 422 for
fields of the wrong type or shape, 404 for an unknown model.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_temperature: float = 2.0
    max_top_k: int = 200
    default_max_tokens: int = 512  # reply budget when the client gives none (capped by the context)
    max_n: int = 8  # choices per request (all decoded together in one batch)
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 64  # characters per stop string


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict]  # render.py conversation messages
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    truncate_history: bool  # chibichat extension: drop oldest turns instead of failing on overflow
    n: int = 1  # choices, sampled from one prefill
    stop: tuple[str, ...] = ()  # generation ends before any of these strings


def _number(body, name, lo, hi, default, integer=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(422, f"'{name}' must be {'an integer' if integer else 'a number'}", name, "invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {v}", name, "out_of_range")
    return v


def _content_text(content, i: int) -> str:
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(422, f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}",
                               f"messages[{i}].content", "invalid_type")  # fmt: skip
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(422, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
                   "invalid_type")  # fmt: skip


def parse_chat_request(raw: bytes, limits: Limits, model_ids: list[str]) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(422, f"'model' is required; this server serves {model_ids}", "model", "invalid_type")
    if model not in model_ids:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {model_ids}", "model",
                       "model_not_found")  # fmt: skip
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(422, "'messages' must be a non-empty list", "messages", "invalid_type")
    if len(msgs) > limits.max_messages:
        raise ApiError(400, f"too many messages: {len(msgs)} > {limits.max_messages}", "messages", "too_many_messages")
    messages, total = [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(422, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role",
                           "invalid_role")  # fmt: skip
        text = _content_text(m.get("content"), i)
        if len(text) > limits.max_message_chars:
            raise ApiError(400, f"messages[{i}] has {len(text)} characters, more than {limits.max_message_chars}",
                           f"messages[{i}].content", "message_too_long")  # fmt: skip
        total += len(text)
        messages.append({"role": m["role"], "content": text})
    if total > limits.max_total_chars:
        raise ApiError(400, f"messages hold {total} characters, more than {limits.max_total_chars}", "messages",
                       "conversation_too_long")  # fmt: skip
    n = _number(body, "n", 1, limits.max_n, 1, integer=True)
    stop = _stop(body.get("stop"), limits)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(422, "'stream' must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(422, "'stream_options' must be an object", "stream_options", "invalid_type")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 1, 10**9, None, integer=True)
    truncate = body.get("truncate_history", False)
    if not isinstance(truncate, bool):
        raise ApiError(422, "'truncate_history' must be a boolean", "truncate_history", "invalid_type")
    top_k = _number(body, "top_k", 0, limits.max_top_k, 0, integer=True)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p", "out_of_range")
    return ChatRequest(
        messages=messages,
        stream=stream,
        include_usage=bool(opts.get("include_usage", False)),
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 0.0, limits.max_temperature, 1.0)),
        top_k=top_k or None,
        top_p=None if top_p >= 1 else float(top_p),
        seed=_number(body, "seed", -(2**63), 2**63 - 1, None, integer=True),
        truncate_history=truncate,
        n=n,
        stop=stop,
    )


def _stop(value, limits: Limits) -> tuple[str, ...]:
    """OpenAI `stop`: null, a string, or a list of up to max_stop strings."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ApiError(422, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > limits.max_stop:
        raise ApiError(400, f"'stop' holds {len(items)} strings, at most {limits.max_stop} are allowed", "stop",
                       "out_of_range")  # fmt: skip
    for x in items:
        if not x or len(x) > limits.max_stop_chars:
            raise ApiError(400, f"stop strings must have 1 to {limits.max_stop_chars} characters, got {x!r}", "stop",
                           "out_of_range")  # fmt: skip
    return tuple(dict.fromkeys(items))  # duplicates change nothing


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(cid, model, choices: list[tuple[str, str]], usage, extra=None) -> dict:
    """choices: (text, finish_reason) per choice, in index order."""
    body = {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                     "logprobs": None} for i, (text, finish_reason) in enumerate(choices)],  # fmt: skip
        "usage": usage,
    }
    if extra:
        body["chibichat"] = extra
    return body


def chunk_body(cid, created, model, delta: dict, finish_reason=None, usage=None, choices=True, index=0) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}] if choices else []}  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return body


def sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")
