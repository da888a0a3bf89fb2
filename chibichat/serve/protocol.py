"""The OpenAI wire format: request validation for /v1/chat/completions and /v1/completions.

Validation is written out by hand rather than with pydantic models so that every failure maps to
an OpenAI-style error body {"error": {"message", "type", "param", "code"}} with the status the
OpenAI API gives: 400 for any bad request (not JSON, a field of the wrong type or shape, a value out
of range; `param` names the field's path, e.g. "messages[2].role"), 404 for an unknown model, 413 for
a body over Limits.max_body_bytes.
"""

from __future__ import annotations

import json
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
    max_user_chars: int = 256  # the `user` id
    timeout_s: float | None = 300.0  # per request, from arrival to the last token (None: no limit)
    # Request body bytes, refused (413) before they are all read. A request within the character limits
    # above is far smaller: max_total_chars written as JSON escapes (at most 12 bytes per character, a
    # surrogate pair) is 384 KB, plus the messages' own keys.
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    """Settings shared by /v1/chat/completions and /v1/completions."""

    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    n: int = 1  # choices, sampled from one prefill
    stop: tuple[str, ...] = ()  # generation ends before any of these strings
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely
    user: str | None = None  # the caller's end-user id (OpenAI's abuse-monitoring field): checked, not stored
    max_tokens_param: str = "max_tokens"  # the name the client sent max_tokens under (errors name it)


@dataclass
class ChatRequest(Sampling):
    messages: list[dict] = None  # render.py conversation messages
    truncate_history: bool = False  # chibichat extension: drop oldest turns instead of failing on overflow


@dataclass
class CompletionRequest(Sampling):
    prompt: str = ""


# Parameters each route implements (anything else is refused by name, never ignored). A parameter
# sent as null counts as not sent, as in the OpenAI API.
SAMPLING_PARAMS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "n", "stop",
                   "seed", "logprobs", "presence_penalty", "frequency_penalty", "user"}  # fmt: skip
CHAT_PARAMS = SAMPLING_PARAMS | {"messages", "max_completion_tokens", "top_logprobs", "truncate_history",
                                 "response_format"}  # fmt: skip
COMPLETION_PARAMS = SAMPLING_PARAMS | {"prompt", "echo", "best_of", "suffix"}
MAX_TOP_LOGPROBS = 20  # chat (OpenAI's limit); /v1/completions takes logprobs 0..5 like the OpenAI API
_TOOLS = ("this server's model has one built-in tool (the calculator, or python under `serve --tools python`) that "
          "the server runs itself: its calls and results appear in the reply as <<expr=result>> and in "
          "chibichat.tool_calls. Client-defined tools are not supported; leave out")  # fmt: skip
WHY_UNSUPPORTED = {
    "tools": f"{_TOOLS} 'tools'",
    "tool_choice": f"{_TOOLS} 'tool_choice'",
    "functions": f"{_TOOLS} 'functions'",
    "function_call": f"{_TOOLS} 'function_call'",
    "parallel_tool_calls": f"{_TOOLS} 'parallel_tool_calls'",
    "logit_bias": "per-token logit biases are not implemented; leave out 'logit_bias'",
    "audio": "this is a text-only model; leave out 'audio'",
    "modalities": "this is a text-only model; leave out 'modalities'",
    "prediction": "predicted outputs are not implemented; leave out 'prediction'",
}


def _refuse_unknown(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed or value is None:
            continue
        why = WHY_UNSUPPORTED.get(key, f"it is not implemented; the parameters this route takes are {sorted(allowed)}")
        raise ApiError(400, f"'{key}' is not supported by this server: {why}", key, "unsupported_parameter")


def _number(body, name, lo, hi, default, integer=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", name, "invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {v}", name, "out_of_range")
    return v


def _content_text(content, i: int) -> str:
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            where = f"messages[{i}].content[{k}]"
            if not (isinstance(part, dict) and isinstance(part.get("type"), str)):
                raise ApiError(400, f"{where} must be a part {{'type': 'text', 'text': str}}", where, "invalid_type")
            if part["type"] != "text":  # image_url, input_audio, file, ...
                raise ApiError(400, f"{where} has type {part['type']!r}: this is a text-only model; send text "
                               "parts only", f"{where}.type", "unsupported_parameter")  # fmt: skip
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.text must be a string", f"{where}.text", "invalid_type")
            for key, value in part.items():  # a key dropped here would be a setting silently ignored
                if key not in ("type", "text") and value is not None:
                    raise ApiError(400, f"{where}.{key} is not supported (text parts take type and text only)",
                                   f"{where}.{key}", "unsupported_parameter")  # fmt: skip
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins them: parts stay apart (words never run together)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
                   "invalid_type")  # fmt: skip


def _body(raw: bytes, model_ids: list[str]) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, f"'model' is required; this server serves {model_ids}", "model", "invalid_type")
    if model not in model_ids:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {model_ids}", "model",
                       "model_not_found")  # fmt: skip
    return body


def _sampling(body: dict, limits: Limits, max_tokens_keys: tuple[str, ...]) -> dict:
    """The Sampling fields of a request body (validated)."""
    n = _number(body, "n", 1, limits.max_n, 1, integer=True)
    stop = _stop(body.get("stop"), limits)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    opts = {key: value for key, value in opts.items() if value is not None}  # null: not sent, as at the top level
    for key in opts:
        if key != "include_usage":
            raise ApiError(400, f"'stream_options.{key}' is not supported (only include_usage is)",
                           f"stream_options.{key}", "unsupported_parameter")  # fmt: skip
    include_usage = opts.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", "stream_options.include_usage",
                       "invalid_type")  # fmt: skip
    if opts and not stream:
        raise ApiError(400, "'stream_options' is only allowed with stream: true", "stream_options", "invalid_value")
    max_tokens, max_tokens_param = None, max_tokens_keys[-1]
    for key in max_tokens_keys:  # chat takes both names of one setting: each is checked, and they must agree
        value = _number(body, key, 1, 10**9, None, integer=True)
        if value is None:
            continue
        if max_tokens is not None and value != max_tokens:
            raise ApiError(400, f"'{max_tokens_param}' {max_tokens} and '{key}' {value} disagree: they are two names "
                           "of one setting; send one of them", key, "invalid_value")  # fmt: skip
        if max_tokens is None:
            max_tokens, max_tokens_param = value, key
    top_k = _number(body, "top_k", 0, limits.max_top_k, 0, integer=True)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p", "out_of_range")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "'user' must be a string", "user", "invalid_type")
    if user is not None and len(user) > limits.max_user_chars:
        raise ApiError(400, f"'user' has {len(user)} characters, more than {limits.max_user_chars}", "user",
                       "out_of_range")  # fmt: skip
    return dict(
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        temperature=float(_number(body, "temperature", 0.0, limits.max_temperature, 1.0)),
        top_k=top_k or None,
        top_p=None if top_p >= 1 else float(top_p),
        seed=_number(body, "seed", -(2**63), 2**63 - 1, None, integer=True),
        n=n,
        stop=stop,
        presence_penalty=float(_number(body, "presence_penalty", -2.0, 2.0, 0.0)),
        frequency_penalty=float(_number(body, "frequency_penalty", -2.0, 2.0, 0.0)),
        user=user,
    )


def parse_chat_request(raw: bytes, limits: Limits, model_ids: list[str]) -> ChatRequest:
    body = _body(raw, model_ids)
    _refuse_unknown(body, CHAT_PARAMS)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, f"'response_format' {json.dumps(fmt)[:100]} is not supported: this model has no JSON or "
                       "schema-constrained mode; leave it out or send {\"type\": \"text\"}", "response_format",
                       "unsupported_parameter")  # fmt: skip
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages", "invalid_type")
    if len(msgs) > limits.max_messages:
        raise ApiError(400, f"too many messages: {len(msgs)} > {limits.max_messages}", "messages", "too_many_messages")
    messages, total = [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object {{'role': ..., 'content': ...}}", f"messages[{i}]",
                           "invalid_type")  # fmt: skip
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role {role!r} is not supported: roles are system (or developer), "
                           "user and assistant", f"messages[{i}].role", "invalid_role")  # fmt: skip
        if role in ("system", "developer") and i > 0:  # the template has one system text, merged into the first turn
            raise ApiError(400, f"messages[{i}] is a {role} message, but only the first message may be a system (or "
                           "developer) message; merge its text into messages[0]", f"messages[{i}].role",
                           "invalid_messages")  # fmt: skip
        for key, value in m.items():
            if key not in ("role", "content") and value is not None:
                raise ApiError(400, f"messages[{i}].{key} is not supported (messages take role and content only)",
                               f"messages[{i}].{key}", "unsupported_parameter")  # fmt: skip
        text = _content_text(m.get("content"), i)
        if len(text) > limits.max_message_chars:
            raise ApiError(400, f"messages[{i}] has {len(text)} characters, more than {limits.max_message_chars}",
                           f"messages[{i}].content", "message_too_long")  # fmt: skip
        total += len(text)
        # "developer" is the OpenAI API's newer name for the system role
        messages.append({"role": "system" if role == "developer" else role, "content": text})
    if total > limits.max_total_chars:
        raise ApiError(400, f"messages hold {total} characters, more than {limits.max_total_chars}", "messages",
                       "conversation_too_long")  # fmt: skip
    last = len(messages) - 1
    if messages[last]["role"] == "assistant":  # the model answers the last user message; it never continues a reply
        raise ApiError(400, f"messages[{last}] is an assistant message, but the conversation must end with the user "
                       "message to answer (continuing an assistant reply is not supported); leave it out",
                       f"messages[{last}].role", "invalid_messages")  # fmt: skip
    sampling = _sampling(body, limits, ("max_completion_tokens", "max_tokens"))
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ApiError(400, "'logprobs' must be a boolean", "logprobs", "invalid_type")
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
    if top is not None and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    truncate = body.get("truncate_history", False)
    if not isinstance(truncate, bool):
        raise ApiError(400, "'truncate_history' must be a boolean", "truncate_history", "invalid_type")
    return ChatRequest(**sampling, top_logprobs=(top or 0) if logprobs else None, messages=messages,
                       truncate_history=truncate)  # fmt: skip


def parse_completion_request(raw: bytes, limits: Limits, model_ids: list[str]) -> CompletionRequest:
    body = _body(raw, model_ids)
    _refuse_unknown(body, COMPLETION_PARAMS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise ApiError(400, "'prompt' must be one string (or a list of one string): batches of prompts and token-id "
                       "prompts are not supported; send one request per prompt", "prompt", "unsupported_parameter")  # fmt: skip
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string", "prompt", "invalid_type")
    if len(prompt) > limits.max_total_chars:
        raise ApiError(400, f"'prompt' has {len(prompt)} characters, more than {limits.max_total_chars}", "prompt",
                       "conversation_too_long")  # fmt: skip
    if body.get("echo") not in (None, False):
        raise ApiError(400, "'echo' is not supported: the reply never repeats the prompt; leave it out", "echo",
                       "unsupported_parameter")  # fmt: skip
    if body.get("suffix") is not None:
        raise ApiError(400, "'suffix' (fill-in-the-middle) is not supported by this model; leave it out", "suffix",
                       "unsupported_parameter")  # fmt: skip
    sampling = _sampling(body, limits, ("max_tokens",))
    best_of = body.get("best_of")
    if best_of is not None and best_of != sampling["n"]:
        raise ApiError(400, f"'best_of' {best_of!r} is not supported: choices are never ranked server-side; leave it "
                       "out (or equal to n)", "best_of", "unsupported_parameter")  # fmt: skip
    logprobs = _number(body, "logprobs", 0, 5, None, integer=True)
    return CompletionRequest(**sampling, top_logprobs=logprobs, prompt=prompt)


def _stop(value, limits: Limits) -> tuple[str, ...]:
    """OpenAI `stop`: null, a string, or a list of up to max_stop strings."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > limits.max_stop:
        raise ApiError(400, f"'stop' holds {len(items)} strings, at most {limits.max_stop} are allowed", "stop",
                       "out_of_range")  # fmt: skip
    for x in items:
        if not x or len(x) > limits.max_stop_chars:
            raise ApiError(400, f"stop strings must have 1 to {limits.max_stop_chars} characters, got {x!r}", "stop",
                           "out_of_range")  # fmt: skip
    return tuple(dict.fromkeys(items))  # duplicates change nothing


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-" + uuid.uuid4().hex[:24]


def sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")
