"""The task registry: every task name, what it is, and the function that builds it.

`get_task(name, **options)` builds a task. Options by family:
    generated (identity, spelling, letter-count, arithmetic; "-ja" variants):
        split="train"|"test", size=<items>, seed=<int>
    shipped conversations (chitchat, chatterbot, chatterbot-ja): no options
    shipped evaluation subsets (arc-easy, arc-challenge, mmlu, gsm8k, humaneval, core-*):
        source="shipped" (default) needs nothing; source="online" downloads the full set and takes
        home=<Home>, split=<split name of the source>
    online-only (smoltalk, mmlu-aux, gsm8k-train, JGLUE): home=<Home>, split=<split>
An option a family does not take is a ChibiError, never silently ignored.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from chibichat.common import ChibiError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    lang: str
    target: str  # "module:function" building the task from keyword options
    fixed: tuple = ()  # keyword arguments always passed (e.g. lang="ja")
    description: str = ""
    # What the built task's own `eval_only` is under the default options (the only ones a training
    # mixture or `rl --task` can name): declared here so a training stage can refuse an evaluation
    # set while it checks its arguments, before anything is loaded or downloaded. A test builds every
    # task and checks that the two agree.
    eval_only: bool = False


def _g(spec_name, kind, spec_lang, target, desc, **fixed):
    return TaskSpec(spec_name, kind, spec_lang, target, tuple(sorted(fixed.items())), desc)


def _specs() -> list[TaskSpec]:
    gen = "chibichat.tasks"
    specs = [
        _g("identity", "conversation", "en", f"{gen}.identity:Identity", "who the assistant is", lang="en"),
        _g("identity-ja", "conversation", "ja", f"{gen}.identity:Identity", "who the assistant is (JA)", lang="ja"),
        _g("spelling", "generative", "en", f"{gen}.spelling:Spelling", "spell a word", lang="en"),
        _g("spelling-ja", "generative", "ja", f"{gen}.spelling:Spelling", "spell a katakana word", lang="ja"),
        _g("letter-count", "generative", "en", f"{gen}.spelling:LetterCount",
           "count a letter with a python call", lang="en"),
        _g("letter-count-ja", "generative", "ja", f"{gen}.spelling:LetterCount",
           "count a character with a python call (JA)", lang="ja"),
        _g("arithmetic", "generative", "en", f"{gen}.arithmetic:Arithmetic",
           "word problems answered with a calculator call", lang="en"),
        _g("arithmetic-ja", "generative", "ja", f"{gen}.arithmetic:Arithmetic",
           "word problems answered with a calculator call (JA)", lang="ja"),
        _g("arithmetic-multi", "generative", "en", f"{gen}.arithmetic:Arithmetic",
           "two-step word problems (3-4 numbers) answered with one calculator call", lang="en", multi=True),
        _g("arithmetic-multi-ja", "generative", "ja", f"{gen}.arithmetic:Arithmetic",
           "two-step word problems answered with one calculator call (JA)", lang="ja", multi=True),
        _g("chitchat", "conversation", "en", f"{gen}.conversations:shipped_conversations",
           "human small-talk chats (shipped)", name="chitchat"),
        _g("chatterbot", "conversation", "en", f"{gen}.conversations:shipped_conversations",
           "chatterbot-corpus EN (shipped)", name="chatterbot"),
        _g("chatterbot-ja", "conversation", "ja", f"{gen}.conversations:shipped_conversations",
           "chatterbot-corpus JA (shipped)", name="chatterbot-ja"),
    ]
    specs += _optional_specs()
    return specs


# Families whose modules define their own specs (evaluation subsets, CORE-lite, online loaders, JGLUE).
FAMILY_MODULES = ("chibichat.tasks.evalsets", "chibichat.tasks.core", "chibichat.tasks.online",
                  "chibichat.tasks.jglue")


def _optional_specs(modules: tuple[str, ...] = FAMILY_MODULES) -> list[TaskSpec]:
    """The specs of every family module. All of them ship with chibichat, so a missing one is a broken
    installation, reported as such (never a registry that silently lacks a family's tasks)."""
    out: list[TaskSpec] = []
    for mod in modules:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            raise ChibiError(f"task family module {mod} is missing from this chibichat installation, so its "
                             f"tasks cannot be listed; reinstall chibichat (pip install -e . in a checkout)") from None
        out += m.task_specs()
    return out


def specs() -> dict[str, TaskSpec]:
    return {s.name: s for s in _specs()}


def list_tasks() -> list[str]:
    return sorted(specs())


def get_spec(name: str) -> TaskSpec:
    table = specs()
    if name not in table:
        raise ChibiError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(table))}")
    return table[name]


def needs_home(name: str) -> bool:
    """True if the task's builder requires a home to read its downloads from (online-only tasks, JGLUE);
    False for tasks whose home is optional (shipped evaluation subsets take one only with source="online")."""
    spec = get_spec(name)
    module, func = spec.target.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), func)).parameters
    return "home" in params and params["home"].default is inspect.Parameter.empty


def describe_tasks() -> list[dict]:
    """One row per task for listings: name, kind, lang, description, online_only (needs home=)."""
    rows = []
    for spec in sorted(specs().values(), key=lambda s: s.name):
        module, func = spec.target.split(":")
        params = inspect.signature(getattr(importlib.import_module(module), func)).parameters
        online_only = "home" in params and params["home"].default is inspect.Parameter.empty
        rows.append({"name": spec.name, "kind": spec.kind, "lang": spec.lang, "description": spec.description,
                     "online_only": online_only})
    return rows


def get_task(name: str, **options):
    spec = get_spec(name)
    module, func = spec.target.split(":")
    factory = getattr(importlib.import_module(module), func)
    kwargs = dict(spec.fixed)
    params = inspect.signature(factory).parameters
    accepted = set(params) - set(kwargs)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ChibiError(f"task {name!r} does not take option(s) {unknown}; it takes {sorted(accepted) or 'none'}")
    required = sorted(k for k in accepted if params[k].default is inspect.Parameter.empty and k not in options)
    if required:
        raise ChibiError(f"task {name!r} needs option(s) {required} (online tasks download into home=<Home>)")
    kwargs.update(options)
    return factory(**kwargs)
