"""`chibichat serve`: the chat page and an OpenAI-compatible API over a checkpoint (FastAPI + uvicorn).

Binds 127.0.0.1 by default; --api-key / --api-key-file require a bearer key on /v1/* and /metrics
(expose the server beyond this machine with --host only with a key: a --host that is not a loopback
address without a key starts with a warning on stderr). Conversations are not logged.
Workers = model replicas: one per CUDA GPU, or --workers N decode loops sharing one model on CPU;
each runs a continuous batch of up to --max-batch rows (engine.Batcher). The server listens at once
and loads the model in the background (/health says "loading" until it is ready). SIGINT/SIGTERM:
no new connections; in-flight streams get --shutdown-grace seconds to finish, then are cancelled.
"""

from __future__ import annotations

import argparse
import math
import sys

from chibichat.common import ChibiError, add_home_arg, add_model_args, add_runtime_args
from chibichat.sandbox import add_allow_weak_arg, check_sandbox

GIL_SWITCH_INTERVAL_S = 0.0005  # see run()


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="web chat page + OpenAI-compatible API (/v1/chat/completions) over a checkpoint",
        description="Serve a checkpoint: the chat page at /, POST /v1/chat/completions and /v1/completions, "
        "GET /v1/models, /health and /metrics (Prometheus).",
    )
    add_home_arg(p)
    add_runtime_args(p)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--workers", type=int, default=None,
                   help="model replicas: default one per CUDA GPU, or 1 on CPU (CPU replicas share one model's weights)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=32,
                   help="rows (sequences) each replica decodes together; a request of n choices takes n (default: 32)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for free batch rows before the server answers 503 (default: 64)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a request may take from arrival to its last token; past it: 504 / an error event "
                        "(default: 300; 0 = no limit)")  # fmt: skip
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* and /metrics")
    p.add_argument("--api-key-file", default=None, help="like --api-key, the key read from this file (first line)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are cancelled "
                        "(default: 30)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=512, help="reply budget when a request gives none (default: 512)")
    p.add_argument("--tools", default="calculator", choices=("none", "calculator", "python"),
                   help="tool the model may call (default: calculator)")  # fmt: skip
    add_allow_weak_arg(p)
    p.set_defaults(func=run, decodes_only=True)  # cli.main: common.passive_thread_waits


def build_pool(args):
    """(WorkerPool, model id) for the checkpoint named by args."""
    import torch

    from chibichat.common import Home, init_runtime
    from chibichat.engine import Engine, prepare_for_inference
    from chibichat.serve.pool import WorkerPool
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import load_model

    home = Home.resolve(args.home)
    tok = Tokenizer.load(home.tokenizer_dir)
    rt = init_runtime(args.device, args.dtype)
    engines = []
    if rt.device.type == "cuda" and args.device in ("auto", "cuda"):
        n = args.workers or torch.cuda.device_count()
        if n > torch.cuda.device_count():
            raise ChibiError(f"--workers {n} but only {torch.cuda.device_count()} GPUs: one replica per GPU")
        for i in range(n):
            rti = init_runtime(f"cuda:{i}", args.dtype)
            model, meta = load_model(home, args.source, args.tag, args.step, rti, tokenizer=tok)
            engines.append(Engine(prepare_for_inference(model), tok, rti))
    else:
        n = args.workers or 1
        if n < 1:
            raise ChibiError(f"--workers must be >= 1, got {n}")
        model, meta = load_model(home, args.source, args.tag, args.step, rt, tokenizer=tok)
        prepare_for_inference(model)
        first = Engine(model, tok, rt)
        # threads share the read-only weights and one decoder (its weight copies built once, not per worker)
        engines = [first] + [first.sibling() for _ in range(n - 1)]
    tag = meta["checkpoint_dir"].rstrip("/").split("/")[-2]
    return WorkerPool(engines, max_queue=args.max_queue, max_rows=args.max_batch), f"chibichat-{args.source}-{tag}", meta


def api_key(args) -> str | None:
    """The key from --api-key or --api-key-file (not both); ChibiError for an empty or unreadable one."""
    if args.api_key is not None and args.api_key_file is not None:
        raise ChibiError("give --api-key or --api-key-file, not both")
    key = args.api_key
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ChibiError(f"cannot read --api-key-file {args.api_key_file}: {e}") from None
    if key is not None and (not key or any(c.isspace() for c in key) or not key.isprintable()):
        raise ChibiError("the API key must be non-empty printable text without spaces (--api-key / --api-key-file)")
    return key


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine ("localhost" or a loopback address)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def open_host_warning(host: str, key: str | None) -> str | None:
    """The start-up warning for a server reachable beyond this machine without an API key, else None."""
    if key is not None or is_loopback(host):
        return None
    return (f"chibichat serve: warning: --host {host} is reachable beyond this machine and no API key is set: "
            "anyone who can reach it can use the model; give --api-key or --api-key-file")


def listen_socket(host: str, port: int):
    """A TCP socket bound to (host, port), as uvicorn would bind it, so that a port in use or an address this
    machine does not have is a ChibiError naming the fix, before the server says it is listening."""
    import errno
    import socket

    addr = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except OSError as e:
        sock.close()
        fix = {errno.EADDRINUSE: "another process listens on that port: choose another --port, or stop it",
               errno.EADDRNOTAVAIL: "it is not an address of this machine: give --host 127.0.0.1 (this machine only), "
                                    "0.0.0.0 (every interface) or one of its addresses",
               errno.EACCES: "ports below 1024 need privileges: choose a --port of 1024 or more"}.get(
            e.errno, "check --host and --port")
        raise ChibiError(f"cannot listen on {host}:{port}: {e.strerror or e}; {fix}") from None
    sock.set_inheritable(True)
    return sock


def check_args(args) -> None:
    if not 0 < args.port < 65536:
        raise ChibiError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 0:
        raise ChibiError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_tokens < 1:
        raise ChibiError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_batch < 8:
        raise ChibiError(f"--max-batch must be >= 8 (a request may ask for n = 8 choices), got {args.max_batch}")
    if not (math.isfinite(args.timeout) and args.timeout >= 0):  # nan passes every comparison: no limit at all
        raise ChibiError(f"--timeout must be a finite number of seconds >= 0 (0 = no limit), got {args.timeout}")
    if not (math.isfinite(args.shutdown_grace) and args.shutdown_grace >= 0):
        raise ChibiError(f"--shutdown-grace must be a finite number of seconds >= 0, got {args.shutdown_grace}")
    if args.workers is not None and args.workers < 1:
        raise ChibiError(f"--workers must be >= 1, got {args.workers}")
    if args.tools == "python":
        check_sandbox(args.allow_weak_sandbox, "serve --tools python")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from chibichat.common import Home
    from chibichat.serve.app import create_app
    from chibichat.serve.protocol import Limits
    from chibichat.train.checkpoint import resolve_checkpoint

    check_args(args)
    key = api_key(args)
    warning = open_host_warning(args.host, key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    step_dir = resolve_checkpoint(Home.resolve(args.home), args.source, args.tag, args.step)  # fails fast, before listening
    model_id = f"chibichat-{args.source}-{step_dir.parent.name}"
    pools = []

    def load():
        pool, _, meta = build_pool(args)
        pools.append(pool)
        print(f"chibichat serve: {model_id} from {meta['checkpoint_dir']} ready: {len(pool.engines)} replica(s) "
              f"x {args.max_batch} batch rows", flush=True)  # fmt: skip
        return pool

    sock = listen_socket(args.host, args.port)  # a port in use fails here, not after "listening at"
    limits = Limits(default_max_tokens=args.max_tokens, timeout_s=args.timeout or None)
    app = create_app(None, model_id, limits, tools=None if args.tools == "none" else args.tools, api_key=key, load=load)
    print(f"chibichat serve: loading {model_id}; listening at http://{args.host}:{args.port}/"
          f"{' (API key required)' if key else ''}", flush=True)  # fmt: skip
    # The decode loops release the GIL inside every tensor op and want it back right after; under
    # Python's default 5 ms switch interval a busy event loop (a burst of requests to parse) holds it
    # that long each time. A shorter interval hands it back sooner: measured on a loaded 2-core machine,
    # a 23-prompt prefill next to a busy Python thread took ~20% less wall time at 0.5 ms than at 5 ms.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_grace)  # fmt: skip
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        for pool in pools:
            pool.shutdown()
    return 0
