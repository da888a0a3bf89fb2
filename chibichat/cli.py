"""The `chibichat` command: an argparse tree whose subcommands are the stages.

Each stage module in chibichat/stages/ exposes `register(subparsers)`, which adds its parser and sets
`func=run` on it. A stage is listed in STAGES only once it works end to end (a half-built stage
stays unregistered rather than broken). Stage modules keep heavy imports (torch, ...) inside run()
so that `chibichat --help` is fast and importing never touches a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from chibichat import __version__
from chibichat.common import WRITE_ERRNOS, ChibiError, eprint, passive_thread_waits, write_error

# Order here is the order in `chibichat --help`: the flow of a run.
STAGES = [
    "chibichat.stages.data",
    "chibichat.stages.tokenizer",
    "chibichat.stages.pretrain",
    "chibichat.stages.midtrain",
    "chibichat.stages.sft",
    "chibichat.stages.rl",
    "chibichat.stages.dpo",
    "chibichat.stages.lora",
    "chibichat.stages.evaluate",
    "chibichat.stages.chat",
    "chibichat.stages.serve",
    "chibichat.stages.speedrun",
    "chibichat.stages.report",
    "chibichat.stages.bench",
    "chibichat.stages.doctor",
    "chibichat.stages.export",
    "chibichat.stages.import_hf",
]


def _available_stage_modules():
    for name in STAGES:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as e:
            # Only "this stage does not exist yet" is tolerated; a missing dependency inside an
            # existing stage module is a real error and must surface.
            if e.name != name:
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chibichat",
        description=(
            "chibichat: train a tokenizer, pretrain a GPT, midtrain/SFT/RL it into a chat model, "
            "evaluate it and talk to it. Every stage reads and writes artifacts under one home "
            "directory (--home, $CHIBICHAT_HOME, default ~/.cache/chibichat). "
            "Distributed: torchrun --nproc_per_node=N -m chibichat <stage> ..."
        ),
    )
    parser.add_argument("--version", action="version", version=f"chibichat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    for mod in _available_stage_modules():
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    if hasattr(args, "parse_command"):  # the benches: their stage commands parse as this CLI parses them
        args.parse_command = parser.parse_args
    if getattr(args, "decodes_only", False):  # set by chat and serve: see passive_thread_waits
        passive_thread_waits()
    try:
        rc = args.func(args)
    except ChibiError as e:
        eprint(f"chibichat {args.command}: error: {e}")
        return 2
    except OSError as e:
        # A write the stage did not route through the atomic writers (a log file, a cache) that failed
        # because of where it writes (full disk, read-only): the same clear message, not a traceback.
        # Other OS errors may come from reads or bugs and keep their traceback.
        if e.errno not in WRITE_ERRNOS:
            raise
        eprint(f"chibichat {args.command}: error: {write_error(e.filename, e)}")
        return 2
    except KeyboardInterrupt:
        eprint("interrupted")
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
