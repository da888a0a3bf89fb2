"""The FastAPI app: the chat page at /, OpenAI-compatible /v1/chat/completions and /v1/models, /health.

`create_app` builds everything from its arguments (no module-level app or state), so tests and the
`serve` stage can create as many independent apps as they like.
"""

# No `from __future__ import annotations` here: FastAPI resolves the route parameter annotations
# (Request) at runtime, and they are imported inside create_app.
import os
import time
from importlib import resources

from chibichat.common import ChibiError
from chibichat.serve.pool import GenerationRequest, PoolBusy, WorkerPool
from chibichat.serve.protocol import (
    ApiError,
    Limits,
    chunk_body,
    completion_body,
    new_id,
    parse_chat_request,
    sse,
)

STATIC_FILES = {"index.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
                "chat.css": "text/css; charset=utf-8"}  # fmt: skip


def _static(name: str) -> bytes:
    return resources.files("chibichat.serve").joinpath("static", name).read_bytes()


def create_app(pool: WorkerPool, model_id: str, limits: "Limits | None" = None, tools: "str | None" = "calculator"):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    engine0 = pool.engines[0]
    tok, seq_len = engine0.tokenizer, engine0.seq_len
    created = int(time.time())
    app = FastAPI(title="chibichat", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404/405 etc. in the OpenAI error shape too
        return error(ApiError(exc.status_code, str(exc.detail), None, None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(ApiError(422, f"invalid request: {exc.errors()}", None, "invalid_type"))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # never a bare traceback page; the server keeps running
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error", "server_error"))

    @app.get("/")
    async def index():
        return Response(_static("index.html"), media_type=STATIC_FILES["index.html"])

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC_FILES:
            return error(ApiError(404, f"no static file {name!r}"))
        return Response(_static(name), media_type=STATIC_FILES[name])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "context": seq_len, "workers": len(pool.engines),
                "available_workers": pool.available, "waiting": pool.waiting}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "chibichat"}]}

    def prepare(req):
        """Render the prompt and pick the reply budget: (prompt ids, max_tokens, dropped messages)."""
        from chibichat.render import render_prompt

        if req.max_tokens is not None and req.max_tokens >= seq_len:
            raise ApiError(400, f"max_tokens {req.max_tokens} must be less than the model's context of {seq_len} tokens",
                           "max_tokens", "context_length_exceeded")  # fmt: skip
        budget = req.max_tokens or min(limits.default_max_tokens, seq_len // 2)
        try:
            if req.truncate_history:
                prompt = render_prompt(tok, {"messages": req.messages}, max_len=seq_len - budget)
            else:
                prompt = render_prompt(tok, {"messages": req.messages}, max_len=seq_len - 1)
                if prompt.dropped_turns:
                    raise ApiError(400, f"the messages do not fit the model's context of {seq_len} tokens; send fewer "
                                   "(or set truncate_history: true)", "messages", "context_length_exceeded")  # fmt: skip
        except ChibiError as e:
            raise ApiError(400, str(e), "messages", "invalid_messages") from None
        room = seq_len - len(prompt.ids)
        if req.max_tokens is not None and req.max_tokens > room:
            raise ApiError(400, f"this model's context is {seq_len} tokens; the messages use {len(prompt.ids)}, "
                           f"so max_tokens must be at most {room} (got {req.max_tokens})", "max_tokens",
                           "context_length_exceeded")  # fmt: skip
        return prompt.ids, min(budget, room), prompt.dropped_turns

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            req = parse_chat_request(await request.body(), limits, [model_id])
            prompt, max_tokens, dropped = prepare(req)
        except ApiError as e:
            return error(e)
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        gen = GenerationRequest(prompt, max_tokens, req.temperature, req.top_k, req.top_p, seed, tools, req.n, req.stop)
        result: dict = {}
        cid, now = new_id(), int(time.time())
        extra = {"dropped_messages": dropped} if dropped else None

        def usage():  # completion tokens of all n choices, as OpenAI counts them
            n = result.get("completion_tokens", 0)
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        def finish(i):
            choices = result.get("choices") or []
            return choices[i]["finish_reason"] if i < len(choices) else "stop"

        pieces = pool.generate(gen, result)
        if not req.stream:
            texts = [""] * req.n
            try:
                async for i, piece in pieces:
                    texts[i] += piece
            except PoolBusy as e:
                return error(ApiError(503, f"server busy: {e}; retry later", None, "server_busy", "server_error"))
            return completion_body(cid, model_id, [(texts[i], finish(i)) for i in range(req.n)], usage(), extra)

        # Wait for a worker before answering 200, so that "busy" can still be a proper error status.
        try:
            first = await anext(pieces, None)
        except PoolBusy as e:
            return error(ApiError(503, f"server busy: {e}; retry later", None, "server_busy", "server_error"))

        async def events():
            head = {"role": "assistant", "content": ""}
            yield sse({**chunk_body(cid, now, model_id, head), **({"chibichat": extra} if extra else {})})
            for i in range(1, req.n):
                yield sse(chunk_body(cid, now, model_id, head, index=i))
            try:
                if first is not None:
                    yield sse(chunk_body(cid, now, model_id, {"content": first[1]}, index=first[0]))
                async for i, piece in pieces:
                    yield sse(chunk_body(cid, now, model_id, {"content": piece}, index=i))
            except Exception as e:  # mid-stream failure: tell the client in-band, then end the stream
                yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error"}})
                return
            finally:  # also on client disconnect: stops the generation thread
                await pieces.aclose()
            for i in range(req.n):
                yield sse(chunk_body(cid, now, model_id, {}, finish(i), index=i))
            if req.include_usage:
                yield sse(chunk_body(cid, now, model_id, {}, usage=usage(), choices=False))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    return app
