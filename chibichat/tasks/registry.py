"""The task registry: every task name, what it is, the function that builds it and the options it takes.

`get_task(name, **options)` builds a task. Options by family:
    generated (identity, spelling, letter-count, arithmetic(-multi), zero-division, describe; "-ja" variants;
    topic-sentence, EN):
        split="train"|"test", size=<items>, seed=<int> (identity also persona=)
    shipped conversations (chitchat, chatterbot, chatterbot-ja), CORE-lite (core-*), mmlu-dev: none
    shipped evaluation subsets (arc-easy, arc-challenge, mmlu, gsm8k, humaneval):
        source="shipped" (default) needs nothing; source="online" downloads the full set and takes
        home=<Home>, split=<split name of the source>
    online-only (smoltalk, mmlu-aux, gsm8k-train, arc-*-train, JGLUE): home=<Home> (+ split=)
An option a task does not take is a ChibiError, never silently ignored. `file:PATH` names the user's own
data (tasks/local.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from chibichat.common import ChibiError
from chibichat.tasks.arithmetic import Arithmetic, ZeroDivision
from chibichat.tasks.base import GeneratedTask, Task
from chibichat.tasks.describe import Describe
from chibichat.tasks.evalsets import arc, arc_train, gsm8k, gsm8k_train, humaneval, mmlu, mmlu_dev
from chibichat.tasks.identity import Identity
from chibichat.tasks.jglue import TASKS as JGLUE_TASKS, jglue_task
from chibichat.tasks.local import file_task, is_file_task
from chibichat.tasks.online import mmlu_aux, smoltalk
from chibichat.tasks.shipped import CORE_TASKS, SHIPPED_CONVERSATIONS, core_task, shipped_conversations
from chibichat.tasks.sentences import TopicSentence
from chibichat.tasks.spelling import LetterCount, Spelling

GENERATED_OPTIONS = ("split", "size", "seed")
SOURCE_OPTIONS = ("source", "home", "split")

# The RL tasks of the CPU presets and of `bench skills --rl-steps` (en, ja): one- and two-step problems in turn,
# since RL on the two-step ones alone lowered the one-step score on held-out prompts (docs/benchmarks.md,
# 2026-12-05). Here, below both, so the bench and the speedrun read one value.
CPU_RL_TASKS = ("arithmetic,arithmetic-multi", "arithmetic-ja,arithmetic-multi-ja")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    lang: str
    build: Callable[..., Task]  # called with `fixed` plus the caller's options
    description: str
    fixed: dict = field(default_factory=dict)  # keyword arguments always passed (e.g. lang="ja")
    options: tuple[str, ...] = ()  # the options a caller may pass ...
    required: tuple[str, ...] = ()  # ... and those it must pass (a test checks both against `build`)
    # What the built task's own `eval_only` is under the default options (the only ones a training
    # mixture or `rl --task` can name): declared here so a training stage can refuse an evaluation
    # set while it checks its arguments, before anything is loaded or downloaded. A test builds every
    # task and checks that the two agree.
    eval_only: bool = False


def _generated() -> list[TaskSpec]:
    out = []
    for lang, sfx, ja in (("en", "", ""), ("ja", "-ja", " (JA)")):
        g = {"kind": "generative", "lang": lang, "options": GENERATED_OPTIONS}
        out += [
            TaskSpec(f"identity{sfx}", "conversation", lang, Identity, f"who the assistant is{ja}",
                     {"lang": lang}, GENERATED_OPTIONS + ("persona",)),
            TaskSpec(f"spelling{sfx}", build=Spelling, fixed={"lang": lang}, **g,
                     description="spell a katakana word" if ja else "spell a word"),
            TaskSpec(f"letter-count{sfx}", build=LetterCount, fixed={"lang": lang}, **g,
                     description=f"count a {'character' if ja else 'letter'} with a python call{ja}"),
            TaskSpec(f"arithmetic{sfx}", build=Arithmetic, fixed={"lang": lang, "multi": False}, **g,
                     description=f"word problems answered with a calculator call{ja}"),
            TaskSpec(f"arithmetic-multi{sfx}", build=Arithmetic, fixed={"lang": lang, "multi": True}, **g,
                     description=f"two-step word problems (3-4 numbers) answered with one calculator call{ja}"),
            TaskSpec(f"zero-division{sfx}", build=ZeroDivision, fixed={"lang": lang}, **g,
                     description=f"division by zero: the calculator's error read, no answer made up{ja}"),
            TaskSpec(f"describe{sfx}", "conversation", lang, Describe, f"{Describe.description}{ja}", {"lang": lang},
                     GENERATED_OPTIONS),
        ]
    # English only: the Japanese corpus is technical prose, not sentences about everyday topics.
    out.append(TaskSpec("topic-sentence", "conversation", "en", TopicSentence, TopicSentence.description,
                        options=GENERATED_OPTIONS))
    return out


def _shipped() -> list[TaskSpec]:
    out = [TaskSpec(n, "conversation", lang, shipped_conversations, d, {"name": n})
           for n, (lang, d) in SHIPPED_CONVERSATIONS.items()]
    out += [TaskSpec(n, "core", "en", core_task, d, {"name": n}, eval_only=True) for n, (_, _, d) in CORE_TASKS.items()]
    return out


def _evalsets() -> list[TaskSpec]:
    home = ("home",)
    return [
        TaskSpec("arc-easy", "categorical", "en", arc, "ARC-Easy (4-way MC)", {"subset": "ARC-Easy"},
                 SOURCE_OPTIONS, eval_only=True),
        TaskSpec("arc-challenge", "categorical", "en", arc, "ARC-Challenge (4-way MC)", {"subset": "ARC-Challenge"},
                 SOURCE_OPTIONS, eval_only=True),
        TaskSpec("mmlu", "categorical", "en", mmlu, "MMLU (57 subjects, 4-way MC)", {}, SOURCE_OPTIONS,
                 eval_only=True),
        TaskSpec("gsm8k", "generative", "en", gsm8k, "GSM8K math word problems, '#### n'", {}, SOURCE_OPTIONS,
                 eval_only=True),
        TaskSpec("humaneval", "generative", "en", humaneval, "HumanEval Python functions", {}, SOURCE_OPTIONS,
                 eval_only=True),
        TaskSpec("mmlu-dev", "categorical", "en", mmlu_dev,
                 "MMLU dev+validation splits, shipped training data (4-way MC)"),
        TaskSpec("gsm8k-train", "generative", "en", gsm8k_train, "GSM8K train split (online)", {}, home, home),
        TaskSpec("arc-easy-train", "categorical", "en", arc_train, "ARC-Easy train split (online)",
                 {"subset": "ARC-Easy"}, home, home),
        TaskSpec("arc-challenge-train", "categorical", "en", arc_train, "ARC-Challenge train split (online)",
                 {"subset": "ARC-Challenge"}, home, home),
    ]


def _online() -> list[TaskSpec]:
    split = ("home", "split")
    out = [TaskSpec("smoltalk", "conversation", "en", smoltalk, "SmolTalk chats (online)", {}, split, ("home",)),
           TaskSpec("mmlu-aux", "categorical", "en", mmlu_aux, "MMLU auxiliary_train (online)", {}, split,
                    ("home",))]
    kinds = {"jcommonsenseqa": "categorical", "jnli": "categorical", "jsts": "generative", "jsquad": "generative"}
    out += [TaskSpec(t, kinds[t], "ja", jglue_task, f"JGLUE {t} (online; dev set by default)", {"task": t},
                     split, ("home",), eval_only=True) for t in JGLUE_TASKS]
    return out


def specs() -> dict[str, TaskSpec]:
    """Every registered task by name (built on each call: no module-level mutable state)."""
    return {s.name: s for s in _generated() + _shipped() + _evalsets() + _online()}


def list_tasks() -> list[str]:
    return sorted(specs())


def get_spec(name: str) -> TaskSpec:
    table = specs()
    if name not in table:
        raise ChibiError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(table))}")
    return table[name]


def needs_home(name: str) -> bool:
    """True if the task's builder requires a home to read its downloads from (online-only tasks, JGLUE);
    False for tasks whose home is optional (shipped evaluation subsets take one only with source="online")
    and for the user's own files."""
    return not is_file_task(name) and "home" in get_spec(name).required


def home_option(name: str, home) -> dict:
    """The options that hand `home` to a task that reads its downloads from there ({} for any other task,
    and for an unknown name, which get_task then reports with the valid ones)."""
    if is_file_task(name) or name not in specs():
        return {}
    return {"home": home} if needs_home(name) else {}


def describe_tasks() -> list[dict]:
    """One row per task for listings: name, kind, lang, description, online_only (needs home=)."""
    return [{"name": s.name, "kind": s.kind, "lang": s.lang, "description": s.description,
             "online_only": "home" in s.required} for s in sorted(specs().values(), key=lambda s: s.name)]


def get_task(name: str, **options) -> Task:
    if is_file_task(name):  # "file:PATH": the user's own data (chibichat/tasks/local.py)
        return file_task(name, **options)
    spec = get_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ChibiError(f"task {name!r} does not take option(s) {unknown}; it takes {sorted(spec.options) or 'none'}")
    missing = sorted(set(spec.required) - set(options))
    if missing:
        raise ChibiError(f"task {name!r} needs option(s) {missing} (online tasks download into home=<Home>)")
    return spec.build(**spec.fixed, **options)


def online_test_set(name: str, home) -> Task:
    """The full online test split of an evaluation set of ONLINE_TEST_SETS (downloaded once into `home`)."""
    from chibichat.tasks.evalsets import ONLINE_TEST_SETS, TEST_SPLIT

    if name not in ONLINE_TEST_SETS:
        raise ChibiError(f"task {name!r} has no online test set; those that have one: {', '.join(ONLINE_TEST_SETS)}")
    return get_task(name, source="online", home=home, split=TEST_SPLIT)


def eval_task(name: str, home=None, test_sets: str = "shipped") -> Task:
    """A task for evaluation: with test_sets="online", a task of ONLINE_TEST_SETS is its full online test
    split (in `home`); otherwise shipped tasks are their subsets, generated tasks their held-out test split,
    and tasks read from downloads (JGLUE, online sets) read them from `home`."""
    from chibichat.tasks.evalsets import ONLINE_TEST_SETS, TEST_SETS

    if test_sets not in TEST_SETS:
        raise ChibiError(f"--test-sets {test_sets!r}: choose one of {', '.join(TEST_SETS)}")
    if test_sets == "online" and name in ONLINE_TEST_SETS:
        if home is None:
            raise ChibiError(f"the online test set of {name!r} is read from a home's task cache; pass home=")
        return online_test_set(name, home)
    task = get_task(name, **(home_option(name, home) if home is not None else {}))
    if isinstance(task, GeneratedTask):
        task = get_task(name, split="test")
    if task.kind not in ("categorical", "generative"):
        raise ChibiError(f"--tasks names {name!r}, a task of kind {task.kind!r}; chat eval takes categorical "
                         "or generative tasks")
    return task
