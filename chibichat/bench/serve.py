"""`chibichat bench serve`: the real HTTP server under load from concurrent streaming clients.

Starts `chibichat serve` on a checkpoint of the home as a subprocess on 127.0.0.1 (or drives a server
already running, --url), then for each client count N (--clients, default 1,8,32,64): N clients each
send --rounds streaming chat requests one after another (different seeds, --max-tokens each), all N
at once; a level of few clients sends more rounds so that it makes at least --min-requests requests
(a 1-client level of 2 requests is over in seconds and moves with anything else the machine runs). Per level it reports:
  - aggregate tok/s: completion tokens of every successful request / the level's wall time;
  - TTFT p50/p95/p99: request sent -> first content chunk received (client side, HTTP included);
  - ITL p50/p95/p99: gaps between one request's consecutive content chunks (client side);
  - ok / 503 / failed requests (failed: any other status, a broken stream or an in-band error);
  - mean batch occupancy over the level, from the server's /metrics (rows per decode step).
The clients run in this process (asyncio + httpx), on the same machine as the server: on a small
machine they take CPU from it, so figures are a lower bound of what remote clients would see.
The flags that set up the started server (URL_REFUSES) are refused with --url, whose server is already set
up; the JSON records the server's batch rows, queue and replicas as its /health reports them. The
started server's output goes to a temporary file (a pipe nobody reads would stall a chatty server once
full); its tail is shown when the server fails to start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from chibichat.common import ChibiError, add_runtime_args, parse_int_list

# Flags that only set up the server this bench starts: with --url they would be ignored, so they are refused.
URL_REFUSES = (("--home", "home"), ("--from", "source"), ("--tag", "tag"), ("--step", "step"), ("--device", "device"),
               ("--dtype", "dtype"), ("--workers", "workers"), ("--max-batch", "max_batch"), ("--max-queue", "max_queue"))
HELP = "serve under load: N concurrent streaming clients -> aggregate tok/s, TTFT and inter-token latency, 503s"


def add_args(p) -> None:
    from chibichat.common import add_model_args

    add_model_args(p)
    add_runtime_args(p)
    p.set_defaults(source=None, device=None, dtype=None)  # unset: the started server's defaults (sft, auto, auto)
    p.add_argument("--clients", default="1,8,32,64", help="concurrent client counts, one level each (default: 1,8,32,64)")
    p.add_argument("--rounds", type=int, default=2, help="requests each client sends one after another (default: 2)")
    p.add_argument("--min-requests", type=int, default=8,
                   help="requests per level at least: few clients send more rounds (default: 8)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every request (default: 1.0)")
    p.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: its own, 32)")
    p.add_argument("--max-queue", type=int, default=None, help="the server's --max-queue (default: its own, 64)")
    p.add_argument("--workers", type=int, default=None, help="the server's --workers (default: its own default)")
    p.add_argument("--url", default=None, help="bench the server already running at this URL instead of starting one")
    p.add_argument("--api-key", default=None, help="bearer key for a server that requires one")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server (default: 300)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _levels(text: str) -> list[int]:
    return parse_int_list(text, "--clients", "client counts", 1, "1,8,32")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _one(client, url, headers, body) -> dict:
    """One streaming request: status, ttft, content-chunk gaps, completion tokens, error."""
    out = {"status": None, "ttft": None, "gaps": [], "tokens": 0, "error": None}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            out["status"] = r.status_code
            if r.status_code != 200:  # the server's reason, not only the status (a 503 is counted, not listed)
                body = await r.aread()
                try:
                    out["error"] = f"HTTP {r.status_code}: {json.loads(body)['error']['message']}"
                except (ValueError, KeyError, TypeError):
                    out["error"] = f"HTTP {r.status_code}: {body[:200].decode('utf-8', 'replace')}"
                return out
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                # Content chunks are recognised by their text (the server's own json.dumps layout) and
                # only the rare others are parsed: the clients share the CPU with the server.
                content = '"delta": {"content": "' in data and '"delta": {"content": ""' not in data
                if not content and ('"usage"' in data or '"error"' in data):
                    obj = json.loads(data)
                    if "error" in obj:
                        out["error"] = obj["error"].get("message", "error event")
                        break
                    if obj.get("usage"):
                        out["tokens"] = obj["usage"]["completion_tokens"]
                if content:
                    now = time.perf_counter()
                    if last is None:
                        out["ttft"] = now - t0
                    else:
                        out["gaps"].append(now - last)
                    last = now
            if not done and out["error"] is None:
                out["error"] = "stream ended without [DONE]"
    except Exception as e:  # a broken connection counts as a failed request
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def run_level(url: str, model: str, clients: int, rounds: int, max_tokens: int, temperature: float,
              api_key: str | None) -> dict:  # fmt: skip
    import asyncio

    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def client_loop(client, i):
        results = []
        for k in range(rounds):
            body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": temperature,
                    "seed": 1000 * i + k, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": f"Tell me something interesting, number {i}."}]}  # fmt: skip
            results.append(await _one(client, url, headers, body))
        return results

    async def main():
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
            t0 = time.perf_counter()
            per = await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
            return time.perf_counter() - t0, [r for rs in per for r in rs]

    before = _scrape(url, headers)
    wall, results = asyncio.run(main())
    after = _scrape(url, headers)
    ok = [r for r in results if r["status"] == 200 and r["error"] is None]
    busy = sum(r["status"] == 503 for r in results)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    steps = after.get("chibichat_decode_steps_total", 0) - before.get("chibichat_decode_steps_total", 0)
    rows = after.get("chibichat_decode_rows_total", 0) - before.get("chibichat_decode_rows_total", 0)
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    return {
        "clients": clients, "requests": len(results), "ok": len(ok), "busy_503": busy,
        "failed": len(results) - len(ok) - busy, "wall_s": round(wall, 3), "completion_tokens": tokens,
        "tok_s": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p95": ms(percentile(ttft, 95)),
        "ttft_ms_p99": ms(percentile(ttft, 99)), "itl_ms_p50": ms(percentile(gaps, 50)),
        "itl_ms_p95": ms(percentile(gaps, 95)), "itl_ms_p99": ms(percentile(gaps, 99)),
        "mean_batch_rows": round(rows / steps, 2) if steps else None,
        "errors": sorted({r["error"] for r in results if r not in ok and r["status"] != 503})[:5],
    }  # fmt: skip


def summary(results: list[dict]) -> list[str]:
    """The load test's headline figures: the 32-client level against the 1-client one (aggregate
    tok/s ratio, p95 TTFT; targets: >= 6x, < 1 s), failed requests of every level (target: none) and
    the 503s of the levels that had any."""
    by = {r["clients"]: r for r in results}
    lines = []
    if 1 in by and 32 in by and by[1]["tok_s"] and by[32]["tok_s"] is not None:
        lines.append(f"32 clients: {by[32]['tok_s'] / by[1]['tok_s']:.1f}x the 1-client tok/s (target >= 6), "
                     f"p95 TTFT {by[32]['ttft_ms_p95']} ms (target < 1000)")  # fmt: skip
    failed = sum(r["failed"] for r in results)
    lines.append(f"failed requests: {failed} of {sum(r['requests'] for r in results)} (target 0)"
                 + "".join(f"; {r['clients']} clients: {r['busy_503']} answered 503" for r in results if r["busy_503"]))
    return lines


def _scrape(url: str, headers: dict) -> dict:
    import httpx

    from chibichat.serve.metrics import parse_metrics

    try:
        r = httpx.get(url + "/metrics", headers=headers, timeout=30)
        return parse_metrics(r.text) if r.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-2000:]


def _start_server(args, log):
    """`chibichat serve` as a subprocess, its output into the file `log`; returns (process, url) once
    /health says ok."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "chibichat", "serve", "--port", str(port), "--max-tokens", str(args.max_tokens)]
    for flag, dest in (*URL_REFUSES, ("--api-key", "api_key")):
        value = getattr(args, dest)
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ChibiError(f"`chibichat serve` exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    proc.wait()
    raise ChibiError(f"`chibichat serve` was not ready within --startup-timeout {args.startup_timeout} s; its output "
                     f"ends:\n{_tail(log)}")


def run(args) -> int:
    import httpx

    from chibichat.common import atomic_write_json

    import tempfile

    from chibichat.serve.protocol import Limits

    levels = _levels(args.clients)
    for name in ("rounds", "min_requests", "max_tokens"):
        if getattr(args, name) < 1:
            raise ChibiError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    hottest = Limits().max_temperature
    if not 0 <= args.temperature <= hottest:  # every request would get a 400
        raise ChibiError(f"--temperature must be between 0 and {hottest} (the server's range), got {args.temperature}")
    if args.url is not None:
        given = [flag for flag, dest in URL_REFUSES if getattr(args, dest, None) is not None]
        if given:
            raise ChibiError(f"{', '.join(given)} set up the server bench serve starts; with --url the server is "
                             "already running with its own settings: drop them (its /health shows them)")
    if args.json:
        from chibichat.common import check_output

        check_output(args.json, "--json")  # written after every level has run
    proc, log = None, None
    url = args.url
    if url is None:
        log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        try:
            proc, url = _start_server(args, log)
        except BaseException:
            log.close()
            raise
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
        if r.status_code != 200:
            raise ChibiError(f"{url}/v1/models answered {r.status_code}: {r.text[:200]} (--api-key?)")
        model = r.json()["data"][0]["id"]
        health = httpx.get(url + "/health", timeout=30).json()
        rows = (health.get("workers") or 0) * (health.get("max_batch_rows") or 0)
        print(f"bench serve: {model} at {url}, context {health.get('context')}, {health.get('workers')} replica(s) x "
              f"{health.get('max_batch_rows')} rows, max queue {health.get('max_queue')}: {rows} requests decode at "
              f"once, {health.get('max_queue')} more wait, the rest get 503; {args.rounds} request(s) per client "
              f"(at least {args.min_requests} per level), "
              f"max_tokens {args.max_tokens}, temperature {args.temperature}", flush=True)  # fmt: skip
        run_level(url, model, 1, 1, 8, args.temperature, args.api_key)  # warm-up (first-call costs)
        results = []
        for n in levels:
            rounds = max(args.rounds, -(-args.min_requests // n))
            res = run_level(url, model, n, rounds, args.max_tokens, args.temperature, args.api_key)
            results.append(res)
            print(json.dumps(res), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not None:
            log.close()
    base = results[0]["tok_s"] if results and results[0]["clients"] == 1 else None
    cols = ["clients", "ok", "busy_503", "failed", "tok_s", "ttft_ms_p50", "ttft_ms_p95", "ttft_ms_p99", "itl_ms_p50",
            "itl_ms_p95", "itl_ms_p99", "mean_batch_rows"]  # fmt: skip
    print("| " + " | ".join(cols + ["x 1-client"]) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for res in results:
        speedup = f"{res['tok_s'] / base:.1f}" if base and res["tok_s"] else "-"
        print("| " + " | ".join("-" if res[c] is None else str(res[c]) for c in cols) + f" | {speedup} |")
    for line in summary(results):
        print(line)
    if args.json:
        atomic_write_json(args.json, {"model": model, "url": url, "rounds": args.rounds, "min_requests": args.min_requests,
                                      "max_tokens": args.max_tokens, "temperature": args.temperature,
                                      # the server's own figures (also with --url), None where /health lacks them
                                      "max_batch": health.get("max_batch_rows"), "max_queue": health.get("max_queue"),
                                      "workers": health.get("workers"), "levels": results})  # fmt: skip
    return 0
