"""Reusing a finished stage run in a bench: only when it ran with the settings the bench gives it.

A bench (sweep, skills) names its runs by tags that do not hold every setting, and reads a run whose
summary exists instead of running it again. `flag_mismatch` compares the flags the run's checkpoint
recorded (its meta "flags": the stage's parsed arguments) with the "--flag value" pairs the bench
itself builds for that stage, so a rerun with other settings is refused instead of tabulating old runs
under new labels.
"""

from __future__ import annotations

from chibichat.common import Home

# Flags that say where and how a stage ran, not what it trained: they may differ on reuse.
REUSE_IGNORES = ("--home", "--device", "--dtype", "--resume", "--overwrite")
# Switches (flags without a value) that say how a stage ran: --compile gives eager's numbers within rounding.
RUN_SWITCHES = ("--compile",)
# Flags whose recorded name (argparse dest) is not the flag's own.
DESTS = {"--from": "from_stage"}


def flag_mismatch(home: Home, stage: str, tag: str, argv: list[str]) -> tuple[str, object, str] | None:
    """(flag, recorded value, value in `argv`) of the first flag of `argv` that checkpoints/<stage>/<tag>
    recorded otherwise (or not at all), REUSE_IGNORES aside; None when all agree. `argv` is a command
    name then "--flag value" pairs, each value compared as the recorded value's type parses it, and
    RUN_SWITCHES anywhere among them (not compared)."""
    from chibichat.train.checkpoint import read_meta, resolve_checkpoint

    pairs = [a for a in argv[1:] if a not in RUN_SWITCHES]
    if len(pairs) % 2 or not all(f.startswith("--") for f in pairs[::2]):
        raise ValueError(f"flag_mismatch needs a command and --flag value pairs, got {argv}")
    had = read_meta(resolve_checkpoint(home, stage, tag)).get("flags", {})
    for flag, text in zip(pairs[::2], pairs[1::2]):
        key = DESTS.get(flag, flag[2:].replace("-", "_"))
        if flag in REUSE_IGNORES:
            continue
        if key not in had:
            return flag, "(not recorded)", text
        value = had[key]
        try:
            same = value is not None and not isinstance(value, bool) and type(value)(text) == value
        except (TypeError, ValueError):
            same = False
        if not same:
            return flag, value, text
    return None
