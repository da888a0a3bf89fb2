"""`chibichat serve`: the chat page and an OpenAI-compatible API over a checkpoint (FastAPI + uvicorn).

Binds 127.0.0.1 by default (no auth: expose it deliberately with --host). Conversations are not
logged. Workers: one model replica per CUDA GPU, or --workers N threads sharing one model on CPU.
"""

from __future__ import annotations

import argparse

from chibichat.common import ChibiError, add_home_arg, add_runtime_args
from chibichat.sandbox import add_allow_weak_arg, check_sandbox
from chibichat.stages.chat import add_model_args


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="web chat page + OpenAI-compatible API (/v1/chat/completions) over a checkpoint",
        description="Serve a checkpoint: the chat page at /, POST /v1/chat/completions, GET /v1/models, GET /health.",
    )
    add_home_arg(p)
    add_runtime_args(p)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--workers", type=int, default=None,
                   help="model workers: default one per CUDA GPU, or 1 on CPU (CPU workers share one model)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a worker before 503 (default: 64)")
    p.add_argument("--max-tokens", type=int, default=512, help="reply budget when a request gives none (default: 512)")
    p.add_argument("--tools", default="calculator", choices=("none", "calculator", "python"),
                   help="tool the model may call (default: calculator)")  # fmt: skip
    add_allow_weak_arg(p)
    p.set_defaults(func=run)


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
            engines.append(Engine(prepare_for_inference(model, rti.compute_dtype), tok, rti))
    else:
        n = args.workers or 1
        if n < 1:
            raise ChibiError(f"--workers must be >= 1, got {n}")
        model, meta = load_model(home, args.source, args.tag, args.step, rt, tokenizer=tok)
        prepare_for_inference(model, rt.compute_dtype)
        first = Engine(model, tok, rt)
        # threads share the read-only weights and one decoder (its weight copies built once, not per worker)
        engines = [first] + [first.sibling() for _ in range(n - 1)]
    tag = meta["checkpoint_dir"].rstrip("/").split("/")[-2]
    return WorkerPool(engines, max_queue=args.max_queue), f"chibichat-{args.source}-{tag}", meta


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from chibichat.serve.app import create_app
    from chibichat.serve.protocol import Limits

    if not 0 < args.port < 65536:
        raise ChibiError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 0:
        raise ChibiError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_tokens < 1:
        raise ChibiError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.tools == "python":
        check_sandbox(args.allow_weak_sandbox, "serve --tools python")
    pool, model_id, meta = build_pool(args)
    app = create_app(pool, model_id, Limits(default_max_tokens=args.max_tokens),
                     tools=None if args.tools == "none" else args.tools)  # fmt: skip
    print(f"chibichat serve: {model_id} from {meta['checkpoint_dir']} with {len(pool.engines)} worker(s) "
          f"at http://{args.host}:{args.port}/", flush=True)  # fmt: skip
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        pool.shutdown()
    return 0
