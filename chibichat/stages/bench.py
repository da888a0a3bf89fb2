"""`chibichat bench <what>`: benchmarks, each in its own module under chibichat/bench/.

A benchmark module exposes `HELP` (one line), `add_args(parser)` and `run(args) -> int`. To add one,
append a (name, module) pair to BENCHES. A module that does not exist yet is simply not registered,
so a half-written benchmark never breaks the CLI.
"""

from __future__ import annotations

import importlib

from chibichat.common import add_home_arg

BENCHES = [
    ("tokenizer", "chibichat.bench.tokenizer"),
    ("train", "chibichat.bench.train"),
    ("infer", "chibichat.bench.infer"),
    ("serve", "chibichat.bench.serve"),
    ("sweep", "chibichat.bench.sweep"),
    ("skills", "chibichat.bench.skills"),
    ("copy", "chibichat.bench.copy"),
]


def _available():
    for name, modname in BENCHES:
        try:
            yield name, importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:  # a real missing dependency inside an existing module must surface
                raise


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (tokenizer, ...): speed and quality figures measured side by side",
        description="Run a benchmark. Timings on a shared machine are noisy: compare figures from one run.",
    )
    benches = p.add_subparsers(dest="bench", metavar="<benchmark>")
    for name, mod in _available():
        bp = benches.add_parser(name, help=mod.HELP, description=mod.HELP)
        add_home_arg(bp)
        mod.add_args(bp)
        # parse_command: filled by cli.main with the whole CLI's parse_args (bench skills checks its arms' stage
        # commands with it; the CLI sits a layer above)
        bp.set_defaults(func=mod.run, chat_stage_flags=preset_chat_flags, compiled_stages=preset_compiled_stages,
                        parse_command=None)
    p.set_defaults(func=lambda args: _no_bench(p))


def preset_chat_flags(name: str, lang: str) -> tuple[list[str], list[str]]:
    """(midtrain flags, sft flags) the speedrun of preset `name` passes for `lang`: handed to the benches
    (`bench skills --preset`), which sit a layer below the presets."""
    from chibichat.stages.speedrun import PRESETS, chat_stage_flags

    return chat_stage_flags(PRESETS[name], lang)


def preset_compiled_stages(name: str, device: str) -> tuple[str, ...]:
    """The training stages the speedrun of preset `name` compiles on `device` (eager, with the speedrun's note,
    on a CPU without a C++ compiler): handed to the benches, so `bench skills --preset` trains as the preset does."""
    from chibichat.stages.speedrun import PRESETS, compile_stages, resolved_device

    return compile_stages(None, PRESETS[name], resolved_device(device))


def _no_bench(parser) -> int:
    parser.print_help()
    return 2
