"""The FastAPI app: the chat page at /, OpenAI-compatible /v1/chat/completions, /v1/completions and
/v1/models, /health and Prometheus /metrics.

`create_app` builds everything from its arguments (no module-level app or state), so tests and the
`serve` stage can create as many independent apps as they like. With `load` the model loads in a
background thread after the server starts: /health answers 503 {"status": "loading"} and the API 503
until it is ready. With `api_key`, /v1/* and /metrics need `Authorization: Bearer <key>` (the scheme in
any case, RFC 9110; 401 otherwise); the page and /health stay open (the page asks for the key and sends it).
Every 503 carries Retry-After (RETRY_AFTER_S): seconds a client should wait before trying again.
"""

# No `from __future__ import annotations` here: FastAPI resolves the route parameter annotations
# (Request) at runtime, and they are imported inside create_app.
import asyncio
import codecs
import hmac
import json
import os
import sys
import threading
import time
from importlib import resources

from chibichat.common import ChibiError
from chibichat.serve.pool import GenerationRequest, PoolBusy, WorkerPool
from chibichat.serve.protocol import ApiError, Limits, new_id, parse_chat_request, parse_completion_request, sse
from chibichat.render import reply_budget

# Retry-After of a 503, by error code: "server_busy" frees as soon as any reply ends (replies take
# seconds); "loading" takes as long as reading the checkpoint.
RETRY_AFTER_S = {"server_busy": 1, "loading": 5}
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
                "chat.css": "text/css; charset=utf-8"}  # fmt: skip
# Headers of the page and its files: it runs its own script and style only (none inline, nothing from another
# origin: the product runs offline, and model output shown by a script bug could not load or run anything),
# no other site may frame it (the API key form), and no file is sniffed as another type.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff"}


def _static(name: str) -> bytes:
    return resources.files("chibichat.serve").joinpath("static", name).read_bytes()


def top_logprob_keys(chosen_text: str, alternatives) -> list:
    """The keys of one position's /v1/completions top_logprobs: [(is the chosen token, the bytes it shows)],
    most likely first -> [key, or None where left out]. The chosen token is keyed by `chosen_text`, its entry
    in `tokens`, so that a client finds it under that string; the string is reserved for it even when it is
    not among them. Every other alternative reads as its own bytes: their text when they are whole UTF-8
    characters, else (or when that text is taken) OpenAI's "bytes:\\xNN..." form, which keeps apart tokens
    that are parts of characters (decoded, each would read U+FFFD). One whose two forms are both taken (it
    shows the same bytes as more likely alternatives) is left out, as a dict holds one value per key: that
    position then lists fewer alternatives than asked (chat's top_logprobs list keeps every one)."""
    taken, keys = {chosen_text}, []
    for chosen, raw in alternatives:
        if chosen:
            keys.append(chosen_text)
            continue
        forms = ["bytes:" + "".join(f"\\x{b:02x}" for b in raw)]
        try:
            forms.insert(0, raw.decode("utf-8"))
        except UnicodeDecodeError:
            pass
        key = next((f for f in forms if f not in taken), None)
        keys.append(key)
        taken.add(key)
    return keys


class _Auth:
    """ASGI middleware: the API key check on protected paths, and the request counter by route and
    status (read from the response start, so streamed responses count too). `route_of(scope)` names the
    route a /v1/* request is counted under."""

    def __init__(self, app, api_key, metrics_of, route_of):
        self.app, self.key, self.metrics_of, self.route_of = app, api_key, metrics_of, route_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        counted = path.startswith("/v1/")
        if self.key is not None and (counted or path == "/metrics"):
            scheme, _, sent = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if not (hmac.compare_digest(sent.lstrip(b" "), self.key.encode()) and scheme.lower() == b"bearer"):
                body = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                "(the key given to `chibichat serve --api-key/--api-key-file`)", None,
                                "invalid_api_key").body()  # fmt: skip
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})  # fmt: skip
                await send({"type": "http.response.body", "body": json.dumps(body).encode()})
                self._count(scope, 401)
                return None
        if not counted:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self._count(scope, message["status"])
            await send(message)

        return await self.app(scope, receive, counting_send)

    def _count(self, scope, status):
        metrics = self.metrics_of()
        if metrics is not None:
            metrics.count_request(self.route_of(scope), status)


def create_app(pool: "WorkerPool | None", model_id: str, limits: "Limits | None" = None,
               tools: "str | None" = "calculator", api_key: "str | None" = None, load=None):  # fmt: skip
    """pool: the WorkerPool, or None with `load` (a callable returning it, run in a thread at startup)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.routing import Match

    if (pool is None) == (load is None):
        raise ValueError("create_app needs exactly one of pool and load")
    limits = limits or Limits()
    created = int(time.time())
    holder = {"pool": pool, "error": None}  # this app's own state (the loaded pool, or why loading failed)

    def load_in_background():
        try:
            holder["pool"] = load()
        except BaseException as e:  # reported by /health and every API call
            holder["error"] = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(app):
        if load is not None:
            threading.Thread(target=load_in_background, name="chibichat-load", daemon=True).start()
        yield

    app = FastAPI(title="chibichat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def route_of(scope) -> str:
        """The /v1 route's path template ("/v1/models/{model}"), or "other" for a path no route serves:
        the metric's labels stay a fixed few whatever paths clients send."""
        for route in app.router.routes:
            if route.path.startswith("/v1/") and route.matches(scope)[0] != Match.NONE:
                return route.path_format
        return "other"

    app.add_middleware(_Auth, api_key=api_key, metrics_of=lambda: holder["pool"] and holder["pool"].metrics,
                       route_of=route_of)  # fmt: skip

    def error(e: ApiError):
        headers = {"Retry-After": str(RETRY_AFTER_S.get(e.code, 1))} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def ready_pool() -> WorkerPool:
        if holder["pool"] is None:
            if holder["error"]:
                raise ApiError(500, f"the model failed to load: {holder['error']}", None, "load_failed", "server_error")
            raise ApiError(503, "the model is still loading; retry shortly", None, "loading", "server_error")
        return holder["pool"]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404/405 etc. in the OpenAI error shape too
        return error(ApiError(exc.status_code, str(exc.detail), None, None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):  # a route's typed parameter: 400 naming it, as the OpenAI API does
        first = exc.errors()[0]
        loc = [x for x in first["loc"] if x not in ("body", "query", "path", "header", "cookie")]
        param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or None
        return error(ApiError(400, f"'{param}': {first['msg']}" if param else first["msg"], param, "invalid_type"))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # never a bare traceback page; the server keeps running
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error", "server_error"))

    @app.get("/")
    async def index():
        return Response(_static("index.html"), media_type=STATIC_FILES["index.html"], headers=PAGE_HEADERS)

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC_FILES:
            return error(ApiError(404, f"no static file {name!r}"))
        return Response(_static(name), media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        p = holder["pool"]
        if p is None:
            body = {"status": "failed", "error": holder["error"]} if holder["error"] else {"status": "loading"}
            if holder["error"]:
                return JSONResponse({**body, "model": model_id}, status_code=500)
            return JSONResponse({**body, "model": model_id}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S["loading"])})  # fmt: skip
        seq_len = p.engines[0].seq_len
        return {"status": "ok", "model": model_id, "context": seq_len, "workers": len(p.engines),
                "max_batch_rows": p.max_rows, "batch_rows": p.rows, "available_rows": p.available,
                "waiting": p.waiting, "max_queue": p.max_queue, "auth": api_key is not None}  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        p = holder["pool"]
        if p is None:
            from chibichat.serve.metrics import Metrics

            return PlainTextResponse(Metrics().render({"ready": 0}), media_type="text/plain; version=0.0.4")
        return PlainTextResponse(p.metrics.render({**p.gauges(), "ready": 1}), media_type="text/plain; version=0.0.4")

    model_card = {"id": model_id, "object": "model", "created": created, "owned_by": "chibichat"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model:path}")
    async def model_info(model: str):
        if model != model_id:
            return error(ApiError(404, f"model {model!r} does not exist; this server serves {[model_id]}", "model",
                                  "model_not_found"))  # fmt: skip
        return model_card

    async def read_body(request) -> bytes:
        """The request body, refused (413) past limits.max_body_bytes: by its Content-Length before reading
        any of it, or (a chunked body) as soon as the bytes read pass the limit."""
        cap = limits.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than this server's limit of {cap} bytes; send a "
                             "shorter conversation or prompt", None, "request_too_large")  # fmt: skip
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise too_large
        return bytes(body)

    def budget(req, used: int, seq_len: int, prompt_param: str) -> int:
        """The reply budget for a prompt of `used` tokens: max_tokens (checked against the room left), or
        the server's default capped by the room. A prompt that leaves no room is the prompt's fault,
        whatever max_tokens is."""
        room = seq_len - used
        if room < 1:
            raise ApiError(400, f"the prompt of {used} tokens fills the model's context of {seq_len} tokens; shorten it",
                           prompt_param, "context_length_exceeded")  # fmt: skip
        name = req.max_tokens_param
        if req.max_tokens is not None and req.max_tokens > room:
            raise ApiError(400, f"this model's context is {seq_len} tokens; the prompt uses {used}, so {name} "
                           f"must be at most {room} (got {req.max_tokens})", name, "context_length_exceeded")  # fmt: skip
        return min(req.max_tokens or reply_budget(seq_len, cap=limits.default_max_tokens), room)

    def prepare_chat(req, tok, seq_len):
        """Render the prompt and pick the reply budget: (prompt ids, max_tokens, dropped messages)."""
        from chibichat.engine import parts_from_text
        from chibichat.render import Prompt, render_prompt

        name = req.max_tokens_param
        if req.max_tokens is not None and req.max_tokens >= seq_len:
            raise ApiError(400, f"{name} {req.max_tokens} must be less than the model's context of {seq_len} tokens",
                           name, "context_length_exceeded")  # fmt: skip
        # A reply sent back as text reads as the model wrote it: its tool calls as tool parts (parts_from_text)
        conv = {"messages": [{**m, "content": parts_from_text(m["content"], tools)} if m["role"] == "assistant" else m
                             for m in req.messages]}  # fmt: skip
        try:  # the conversation's form (roles in order, text the tokenizer takes), whatever its length
            whole = render_prompt(tok, conv, max_len=sys.maxsize)
        except ChibiError as e:
            raise ApiError(400, str(e), "messages", "invalid_messages") from None
        # From here render_prompt fails only when the last message (with the system text), which is never
        # dropped, does not fit the context by itself.
        want = req.max_tokens or reply_budget(seq_len, cap=limits.default_max_tokens)
        head = req.messages[:1] if req.messages[0]["role"] == "system" else []
        try:
            if req.truncate_history:
                try:  # 2: render_prompt's least max_len (no prompt fits in it: a smaller room fails the same way)
                    prompt = render_prompt(tok, conv, max_len=max(seq_len - want, 2))
                except ChibiError:
                    last = render_prompt(tok, {"messages": head + req.messages[-1:]}, max_len=seq_len - 1)
                    if req.max_tokens is not None:  # the client's reserve leaves too little room for the last message
                        need = len(last.ids)
                        raise ApiError(400, f"{name} {want} leaves {seq_len - want} of the model's context of "
                                       f"{seq_len} tokens for the prompt, but its last message needs {need}; ask for "
                                       f"at most {seq_len - need}", name, "context_length_exceeded") from None  # fmt: skip
                    # Only the server's default reserve is short: every older turn goes and the reply gets the
                    # room the last message leaves, as it would without truncate_history.
                    prompt = Prompt(last.ids, dropped_turns=len(req.messages) - len(head) - 1)
            else:
                prompt = whole if len(whole.ids) < seq_len else render_prompt(tok, conv, max_len=seq_len - 1)
                if prompt.dropped_turns:
                    raise ApiError(400, f"the messages do not fit the model's context of {seq_len} tokens; send fewer "
                                   "(or set truncate_history: true)", "messages", "context_length_exceeded")  # fmt: skip
        except ChibiError as e:
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        return prompt.ids, budget(req, len(prompt.ids), seq_len, "messages"), prompt.dropped_turns

    def following(entries) -> list:
        """Each entry's next token (None for the last). The next token is always in the same list: a
        <|python_end|> alone shows no text, so its entry waits for the next piece (or is the reply's last)."""
        return [e[0] for e in entries[1:]] + [None]

    class TokenTexts:
        """One choice's chosen tokens -> each one's text: what its bytes add to the reply's text, decoded in
        sequence as the engine decodes the reply (errors replaced), so the texts add up to the reply's text
        and each starts where the ones before it end (its text_offset). A token that only starts a character
        reads "" and the one completing it carries the whole character; bytes that a later token (or the
        reply's end, for its last token) leaves unfinished give that token's text their U+FFFD.

        Logprobs cover the returned text only: a stop string cuts the reply before it, so at the end the
        tokens that add nothing before the cut (the stop string's, and "" ones starting its first character)
        are dropped, and the one straddling the cut reads only its part before it (it wrote that part, and
        without it the tokens would not add up to the text). Streamed, a token goes out only once the text
        sent covers its text ("" tokens: the character they start): until then a later stop string may still
        cut it, as the engine holds back text that may start one. A token ending inside a character also
        waits for the next piece or the end: only the end tells whether its text gets that U+FFFD."""

        def __init__(self, engine):
            self.engine = engine
            self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self.held: list = []  # (entry, text) of tokens decoded but not sent
            self.at = 0  # where the first held token's text starts in the reply's text
            self.sent = 0  # length of the reply's text sent so far

        def take(self, entries, text: str, final: bool):
            """The next logprob entries and the reply text that came with them (`final`: the reply's last)
            -> (entries, texts) ready to send."""
            self.sent += len(text)
            self.held += [(e, self.utf8.decode(self.engine.shown_bytes(e[0], after)))
                          for e, after in zip(entries, following(entries))]  # fmt: skip
            if final and self.held:
                self.held[-1] = (self.held[-1][0], self.held[-1][1] + self.utf8.decode(b"", final=True))
            cut = self.at + sum(len(t) for _, t in self.held) > self.sent  # a stop string ended the text
            ready = []
            for k, (e, t) in enumerate(self.held):
                if final:  # every token if nothing was cut, else those starting before the cut, cut there
                    if cut and self.at >= self.sent:
                        break
                    t = t[: self.sent - self.at]
                elif self.at + max(len(t), 1) > self.sent or k == len(self.held) - 1 and self.utf8.getstate()[0]:
                    break
                ready.append((e, t))
                self.at += len(t)
            self.held = [] if final else self.held[len(ready) :]
            return [e for e, _ in ready], [t for _, t in ready]

    def chat_logprobs(engine, entries, texts):
        """OpenAI chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}, the chosen tokens
        reading as `texts` (TokenTexts), each alternative as its own bytes; the chosen token among its
        alternatives reads as in its entry, so that a client finds it there by its token."""

        def entry(i, v, after, text=None):
            raw = engine.shown_bytes(i, after)
            return {"token": raw.decode("utf-8", errors="replace") if text is None else text, "logprob": v,
                    "bytes": list(raw)}  # fmt: skip

        content = []
        for (t, lp, top), text, after in zip(entries, texts, following(entries)):
            alternatives = [entry(i, v, after, text if i == t else None) for i, v in top]
            content.append({**entry(t, lp, after, text), "top_logprobs": alternatives})
        return {"content": content, "refusal": None}

    def legacy_logprobs(engine, entries, texts, offset: int):
        """OpenAI completions logprobs: parallel lists, tokens as `texts` (TokenTexts) and text_offset where
        each starts (from `offset`, where this piece starts in the choice's text); top_logprobs as
        {key: logprob} per position (top_logprob_keys: the chosen token's key is its text in tokens)."""
        tokens, lps, tops, offsets = [], [], [], []
        for (t, lp, top), text, after in zip(entries, texts, following(entries)):
            tokens.append(text)
            lps.append(lp)
            keys = top_logprob_keys(text, [(i == t, engine.shown_bytes(i, after)) for i, _ in top])
            tops.append({k: v for k, (_, v) in zip(keys, top) if k is not None})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, offset

    def merge_pieces(pieces):
        """(choice, text, logprob entries) pieces in order -> one piece per choice, in order of first appearance."""
        merged: dict = {}
        for i, text, entries in pieces:
            t, e = merged.get(i, ("", []))
            merged[i] = (t + text, e + list(entries))
        return [(i, t, e) for i, (t, e) in merged.items()]

    def tool_calls(engine, tokens):
        """The built-in tool's calls in one choice: [{"expression", "output"}]; a failed call's output is
        "Error: <why>", and output is None only when the reply ended before the result."""
        calls = []
        for part in engine.to_parts(tokens):
            if part["type"] == "python":
                calls.append({"expression": part["text"], "output": None})
            elif part["type"] == "python_output" and calls:
                calls[-1]["output"] = part["text"]
        return calls

    async def cancel_on_disconnect(request, stream):
        """Wait for the client of a request whose response has not started (a non-streaming request, or
        a streaming one before its first piece) to go away, then end its generation. Servers do not
        cancel a handler when its client disconnects (a started streaming response notices when a write
        fails), so the handler watches the connection itself: once the body has been read, the next
        ASGI message is http.disconnect, sent when the client closes."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                stream.cancel()
                return

    async def respond(request, chat: bool, req, prompt, max_tokens, use_tools, extra):
        pool = ready_pool()
        engine0 = pool.engines[0]
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        gen = GenerationRequest(prompt, max_tokens, req.temperature, req.top_k, req.top_p, seed, use_tools, req.n,
                                req.stop, req.presence_penalty, req.frequency_penalty, req.top_logprobs,
                                limits.timeout_s)  # fmt: skip
        try:
            stream = pool.submit(gen)
        except PoolBusy as e:
            return error(ApiError(503, f"server busy: {e}; retry later", None, "server_busy", "server_error"))
        cid, now = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        result = stream.result
        want_lp = req.top_logprobs is not None

        def usage():  # completion tokens of all n choices, as OpenAI counts them
            n = result.get("completion_tokens", 0)
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        def finish(i):
            choices = result.get("choices") or []
            return choices[i]["finish_reason"] if i < len(choices) else "stop"

        def failure(e):
            if isinstance(e, TimeoutError):
                return ApiError(504, f"{e} (serve --timeout); ask for fewer max_tokens", None, "timeout", "server_error")
            return ApiError(500, f"generation failed: {type(e).__name__}: {e}", None, "generation_failed", "server_error")

        if not req.stream:
            texts, lps = [""] * req.n, [[] for _ in range(req.n)]
            watch = asyncio.ensure_future(cancel_on_disconnect(request, stream))
            try:
                async for i, piece, entries in stream:
                    texts[i] += piece
                    lps[i] += entries
            except Exception as e:
                return error(failure(e))
            finally:
                watch.cancel()
                stream.cancel()  # a no-op once finished; ends the generation if this handler was cancelled
            if stream.job.cancelled:  # the client went away: nobody reads this answer
                return Response(status_code=499)
            choices = []
            for i in range(req.n):
                tokens = TokenTexts(engine0).take(lps[i], texts[i], final=True) if want_lp else None
                if chat:
                    c = {"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": finish(i),
                         "logprobs": chat_logprobs(engine0, *tokens) if want_lp else None}  # fmt: skip
                else:
                    c = {"index": i, "text": texts[i], "finish_reason": finish(i),
                         "logprobs": legacy_logprobs(engine0, *tokens, 0)[0] if want_lp else None}  # fmt: skip
                choices.append(c)
            body = {"id": cid, "object": obj, "created": now, "model": model_id, "choices": choices, "usage": usage()}
            ext = dict(extra or {})
            if chat and use_tools:
                calls = [tool_calls(engine0, c["tokens"]) for c in result.get("choices", [])]
                if any(calls):
                    ext["tool_calls"] = calls
            if ext:
                body["chibichat"] = ext
            return body

        # Wait for the first piece before answering 200, so that a failure can still be an error status.
        # Until the streaming response starts nothing else notices the client leaving, so a client that
        # gives up while queued would keep its queue slot and still be prefilled: watch from here.
        watch = asyncio.ensure_future(cancel_on_disconnect(request, stream))
        try:
            first = await anext(stream, None)
        except Exception as e:
            stream.cancel()
            return error(failure(e))
        finally:
            watch.cancel()
        if stream.job.cancelled:  # the client went away before the first piece
            return Response(status_code=499)

        def chunk(choices, usage_=None):
            body = {"id": cid, "object": obj + (".chunk" if chat else ""), "created": now, "model": model_id,
                    "choices": choices}  # fmt: skip
            if req.include_usage:  # as the OpenAI API: null on every chunk but the last, which has the counts
                body["usage"] = usage_
            return body

        offsets, token_texts = [0] * req.n, [TokenTexts(engine0) for _ in range(req.n)]

        def piece_choice(i, text, entries=(), finish_reason=None):
            if want_lp:
                entries, texts = token_texts[i].take(entries, text, final=finish_reason is not None)
            if chat:
                delta = {"content": text} if text or finish_reason is None else {}
                lp = chat_logprobs(engine0, entries, texts) if want_lp and entries else None
                return {"index": i, "delta": delta, "finish_reason": finish_reason, "logprobs": lp}
            lp = None
            if want_lp and entries:
                lp, offsets[i] = legacy_logprobs(engine0, entries, texts, offsets[i])
            return {"index": i, "text": text, "finish_reason": finish_reason, "logprobs": lp}

        async def events():
            # Pieces that are already waiting when the client's connection gets its turn (the event loop
            # fell behind the decode loop) go out merged, one chunk per choice in one write: the HTTP
            # work then grows with the steps, not the tokens, when the server is loaded.
            try:
                out = b""
                if chat:
                    head = {"role": "assistant", "content": ""}
                    for i in range(req.n):
                        c = {"index": i, "delta": head, "finish_reason": None, "logprobs": None}
                        out += sse({**chunk([c]), **({"chibichat": extra} if extra and i == 0 else {})})
                pending = [] if first is None else [first]
                try:
                    while True:
                        pending += stream.ready()
                        if pending:
                            yield out + b"".join(sse(chunk([piece_choice(*p)])) for p in merge_pieces(pending))
                            out, pending = b"", []
                        piece = await anext(stream, None)
                        if piece is None:
                            break
                        pending.append(piece)
                except Exception as e:  # mid-stream failure: tell the client in-band, then end the stream
                    yield out + sse({"error": failure(e).body()["error"]})
                    return
                # The built-in tool's calls, as a non-streamed reply has them, ride on the chunk that ends choice 0.
                calls = [tool_calls(engine0, c["tokens"]) for c in result.get("choices", [])] if chat and use_tools else []
                for i in range(req.n):
                    tail = {"chibichat": {"tool_calls": calls}} if i == 0 and any(calls) else {}
                    out += sse({**chunk([piece_choice(i, "", (), finish(i))]), **tail})
                if req.include_usage:
                    out += sse(chunk([], usage()))
                yield out + sse("[DONE]")
            finally:  # also when the client went away (the response task is cancelled): free the rows
                stream.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            pool = ready_pool()
            engine0 = pool.engines[0]
            req = parse_chat_request(await read_body(request), limits, [model_id])
            prompt, max_tokens, dropped = prepare_chat(req, engine0.tokenizer, engine0.seq_len)
            return await respond(request, True, req, prompt, max_tokens, tools, {"dropped_messages": dropped} if dropped else None)
        except ApiError as e:
            return error(e)

    @app.post("/v1/completions")
    async def completions(request: Request):
        """Plain text continuation: <|bos|> + the prompt's tokens, no chat template, no tool."""
        try:
            pool = ready_pool()
            engine0 = pool.engines[0]
            req = parse_completion_request(await read_body(request), limits, [model_id])
            tok, seq_len = engine0.tokenizer, engine0.seq_len
            try:
                prompt = [tok.bos_id, *tok.encode(req.prompt)]
            except ChibiError as e:  # text the tokenizer refuses (a lone surrogate): the client's prompt
                raise ApiError(400, f"prompt: {e}", "prompt") from None
            return await respond(request, False, req, prompt, budget(req, len(prompt), seq_len, "prompt"), None, None)
        except ApiError as e:
            return error(e)

    return app
