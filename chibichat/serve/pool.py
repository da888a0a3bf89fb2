"""Model replicas behind the server, each with its continuous batcher (engine.Batcher).

`--workers N` means N replicas (one per GPU; on CPU, N decode loops sharing one model's weights).
Each replica's Batcher runs one decode loop in its own thread and keeps up to `max_rows` rows in its
batch; a request joins the replica with the most free rows at that replica's next step. A request
that finds no free row waits; beyond `max_queue` waiting requests the server answers "busy" (503) at
once. Events travel from the decode thread to the event loop through an asyncio.Queue (one hop per
step and request); a client that goes away cancels its request, whose rows leave at the next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass

from chibichat.serve.metrics import Metrics


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int | None = None  # None: no logprobs
    timeout_s: float | None = None  # from submission to the last token


class Stream:
    """One request's output: async-iterates (choice index, text, [logprob entries]); at the end
    `result` holds the engine's per-choice finish_reason / tokens / completion_tokens (and logprobs).
    Raises the generation's error (TimeoutError past the time limit). `cancel()` (idempotent, sync)
    ends the generation: its rows leave the batch at the next step."""

    def __init__(self, job, queue: asyncio.Queue, result: dict):
        self.job, self._queue, self.result = job, queue, result
        self._events: deque = deque()
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        while True:
            while not self._events:
                if self.finished:
                    raise StopAsyncIteration
                self._events.extend(await self._queue.get())
            kind, value = self._events.popleft()
            if kind == "piece":
                return value
            self.finished = True
            if kind == "error":
                raise value
            self.result.update(value)

    def ready(self) -> list:
        """The pieces that have already arrived, without waiting (an end or error event after them
        stays for the iteration to raise or finish on)."""
        out = []
        while True:
            if not self._events:
                try:
                    self._events.extend(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    return out
            if self._events[0][0] != "piece":
                return out
            out.append(self._events.popleft()[1])

    def cancel(self) -> None:
        if not self.finished:
            self.job.cancelled = True


class WorkerPool:
    def __init__(self, engines: list, max_queue: int = 64, max_rows: int = 32, metrics: Metrics | None = None):
        from chibichat.engine import Batcher

        if not engines:
            raise ValueError("WorkerPool needs at least one engine")
        self.engines = list(engines)
        self.max_queue, self.max_rows = max_queue, max_rows
        self.metrics = metrics or Metrics()
        self.batchers = [Batcher(e, max_rows, self.metrics, name=f"replica{i}") for i, e in enumerate(self.engines)]
        # Events from the decode threads are handed to the event loop in one callback per batch of
        # emits (not one wake-up per request and step): with 32 streams that is 1 loop wake-up per step.
        self._outbox: list = []
        self._outbox_lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return sum(b.waiting for b in self.batchers)

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.batchers)

    @property
    def available(self) -> int:
        """Free batch rows over all replicas."""
        return sum(max(0, self.max_rows - b.reserved) for b in self.batchers)

    def gauges(self) -> dict[str, float]:
        return {"queue_depth": self.waiting, "batch_rows": self.rows, "batch_max_rows": self.max_rows * len(self.batchers),
                "replicas": len(self.batchers)}  # fmt: skip

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop every decode loop: waiting requests get an error, live ones end as cancelled."""
        for b in self.batchers:
            b.stop(timeout)

    def _deliver(self) -> None:
        """On the event loop: hand every buffered batch of events to its request's queue."""
        with self._outbox_lock:
            box, self._outbox = self._outbox, []
        for queue, events in box:
            queue.put_nowait(events)

    def submit(self, req: GenerationRequest) -> Stream:
        """Start a generation (call on the event loop). PoolBusy when no replica has free rows for it
        and max_queue requests are already waiting."""
        from chibichat.engine import Job, SamplingParams

        best = max(self.batchers, key=lambda b: self.max_rows - b.reserved)
        if self.max_rows - best.reserved < req.n and self.waiting >= self.max_queue:
            self.metrics.observe_rejected()
            raise PoolBusy(f"{self.waiting} requests are already waiting for batch rows")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(events):  # decode thread -> event loop
            with self._outbox_lock:
                wake = not self._outbox
                self._outbox.append((queue, events))
            if wake:
                loop.call_soon_threadsafe(self._deliver)

        params = SamplingParams(req.temperature, req.top_k, req.top_p, 1.0, req.presence_penalty, req.frequency_penalty)
        job = Job(req.prompt, req.n, req.max_tokens, params, req.seed, req.tools, emit, tuple(req.stop),
                  req.top_logprobs, req.timeout_s)  # fmt: skip
        self.metrics.observe_submit(len(req.prompt))
        best.submit(job)
        return Stream(job, queue, {})
