"""Server metrics in the Prometheus text exposition format (version 0.0.4), kept by hand: a few
counters and histograms behind one lock, written by the event loop and the batchers' decode threads.

Names (all prefixed `chibichat_`):
  requests_total{route,status}          HTTP requests answered on /v1/* (401s, 400s and 503s included), by
                                        route path template; paths no route serves count as route "other"
  prompt_tokens_total                   prompt tokens of admitted requests
  completion_tokens_total               tokens generated (all choices; tool-forced tokens included)
  requests_finished_total{reason}       generations ended: done | cancelled (client went away) | timeout
  requests_rejected_total               503s: the wait queue was full
  time_to_first_token_seconds           histogram, submission to the first generated token
  inter_token_latency_seconds           histogram, time between one request's consecutive tokens
  decode_steps_total / decode_rows_total  forward steps and rows they carried (mean occupancy = rows/steps)
  queue_depth                           gauge, requests waiting for batch rows
  batch_rows / batch_max_rows           gauge, rows in the batches now / their capacity (all replicas)
  replicas                              gauge, model replicas (serve --workers)
  ready                                 gauge, 1 once the model is loaded
"""

from __future__ import annotations

import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _label(value) -> str:
    """A label value escaped as the exposition format requires (backslash, double quote, line feed)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        for b, c in zip(self.buckets, self.counts):
            out.append(f'{name}_bucket{{le="{b}"}} {c}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.finished: dict[str, int] = {"done": 0, "cancelled": 0, "timeout": 0}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rejected = 0
        self.steps = 0
        self.step_rows = 0
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.itl = _Histogram(ITL_BUCKETS)

    # -- writers (any thread) -------------------------------------------------------------------

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def observe_submit(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def observe_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def observe_tokens(self, n: int, latency_s: float, first: bool) -> None:
        """n tokens of one request drawn in one step, latency_s after its previous tokens (or its
        submission when first)."""
        with self._lock:
            self.completion_tokens += n
            (self.ttft if first else self.itl).observe(latency_s)

    def observe_step(self, rows: int) -> None:
        with self._lock:
            self.steps += 1
            self.step_rows += rows

    def observe_ended(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    # -- the page -------------------------------------------------------------------------------

    def render(self, gauges: dict[str, float]) -> str:
        """The exposition text; `gauges` (name -> value) are read by the caller at scrape time."""
        with self._lock:
            lines = ["# TYPE chibichat_requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'chibichat_requests_total{{route="{_label(route)}",status="{status}"}} {n}')
            lines.append("# TYPE chibichat_requests_finished_total counter")
            for reason, n in sorted(self.finished.items()):
                lines.append(f'chibichat_requests_finished_total{{reason="{_label(reason)}"}} {n}')
            for name, v in (("prompt_tokens_total", self.prompt_tokens),
                            ("completion_tokens_total", self.completion_tokens),
                            ("requests_rejected_total", self.rejected), ("decode_steps_total", self.steps),
                            ("decode_rows_total", self.step_rows)):  # fmt: skip
                lines += [f"# TYPE chibichat_{name} counter", f"chibichat_{name} {v}"]
            lines += self.ttft.lines("chibichat_time_to_first_token_seconds")
            lines += self.itl.lines("chibichat_inter_token_latency_seconds")
        for name, v in gauges.items():
            lines += [f"# TYPE chibichat_{name} gauge", f"chibichat_{name} {v}"]
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (with its labels, as written) -> value: for tests and `bench serve`."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
