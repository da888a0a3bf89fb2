"""A pool of model workers that runs generation off the event loop.

Each worker is an Engine (one model replica per GPU; on CPU N workers may share one model, since
inference only reads the weights). A request waits for a free worker (bounded queue: beyond
`max_queue` waiting requests the server answers "busy" at once), then generates in a thread of the
pool's executor while the event loop keeps serving other clients. Text pieces travel from the
thread to the loop through an asyncio.Queue; a client that goes away cancels its generation.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator


class PoolBusy(Exception):
    """More requests are waiting than the queue allows."""


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    tools: str | None
    n: int = 1  # choices, decoded together from one prefill
    stop: tuple[str, ...] = ()  # strings that end a choice (not included in its text)


class WorkerPool:
    def __init__(self, engines: list, max_queue: int = 64):
        if not engines:
            raise ValueError("WorkerPool needs at least one engine")
        self.engines = list(engines)
        self.max_queue = max_queue
        self.waiting = 0
        self._free: asyncio.Queue | None = None  # created on the serving loop (see _queue)
        self._executor = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="chibichat-gen")

    def _queue(self) -> asyncio.Queue:
        if self._free is None:
            self._free = asyncio.Queue()
            for e in self.engines:
                self._free.put_nowait(e)
        return self._free

    @property
    def available(self) -> int:
        return self._queue().qsize()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def generate(self, req: GenerationRequest, result: dict) -> AsyncIterator[tuple[int, str]]:
        """(choice index, text piece) of one completion's req.n choices; `result` gets the engine's
        per-choice "choices" (finish_reason, completion_tokens) and the total "completion_tokens"."""
        free = self._queue()
        if free.empty() and self.waiting >= self.max_queue:
            raise PoolBusy(f"{self.waiting} requests are already waiting for a model worker")
        self.waiting += 1
        try:
            engine = await free.get()
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work():
            try:
                for piece in engine.stream_choices(req.prompt, req.n, max_tokens=req.max_tokens,
                                                   temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                                   seed=req.seed, tools=req.tools, result=result,
                                                   stop=list(req.stop)):  # fmt: skip
                    if cancel.is_set():
                        result["finish_reason"] = "cancelled"
                        break
                    loop.call_soon_threadsafe(pieces.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(pieces.put_nowait, ("done", None))
            except BaseException as e:  # surfaced to the request, never kills the worker thread
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", e))

        future = loop.run_in_executor(self._executor, work)
        # The worker goes back to the pool only when its thread has really finished (also when this
        # request is cancelled mid-stream: nothing below needs to run for that to happen).
        future.add_done_callback(lambda _: free.put_nowait(engine))
        try:
            while True:
                kind, value = await pieces.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            cancel.set()
