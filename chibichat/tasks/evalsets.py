"""Chat evaluation sets: ARC-Easy, ARC-Challenge, MMLU (categorical), GSM8K, HumanEval (generative).

source="shipped" (default): the fixed-seed subsets in assets/ (no download; see assets/manifest.json):
    arc-easy, arc-challenge  500 items each from the ARC test sets
    mmlu                     600 items from the MMLU test set (all subjects)
    gsm8k                    500 items from the GSM8K test set
    humaneval                all 164 problems
    mmlu-dev                 training data, not an evaluation set: MMLU dev + validation (1,773 items,
                             disjoint from the MMLU test questions)
source="online": the full set from the Hugging Face hub (tasks/online.py), cached under
    home/data/tasks/; takes home= and split= (the source's split names: ARC train/validation/test,
    MMLU test/validation/dev, GSM8K train/test, HumanEval test).
Training splits also have their own names (online only, home= required): gsm8k-train,
arc-easy-train, arc-challenge-train.

Test sets (`eval_task(name, home, test_sets)`, what `eval chat --test-sets` picks): "shipped" scores the
subsets above; "online" scores the full test split of every task in ONLINE_TEST_SETS (ARC-Easy 2,376,
ARC-Challenge 1,172, MMLU 14,042, GSM8K 1,319, HumanEval 164), read from (or downloaded into) the home's
task cache. Generated tasks (spelling, ...) have no online source: both choices score their generated test
split, which is complete by construction.

Shipped files store the source fields ({"question","choices","gold"} / {"question","solution"} / the
HumanEval row); items are built from them at load time by the same code the online loaders use.
"""

from __future__ import annotations

from chibichat.common import ChibiError
from chibichat.tasks.base import ListTask
from chibichat.tasks.gsm8k import evaluate_gsm8k, gsm8k_item
from chibichat.tasks.humaneval import evaluate_humaneval, humaneval_item
from chibichat.tasks.multiple_choice import mc_items
from chibichat.tasks.online import ARC_REPO, GSM8K, HUMANEVAL, MMLU_REPO
from chibichat.tasks.registry import TaskSpec
from chibichat.tasks.shipped import read_shipped

SOURCES = ("shipped", "online")
TEST_SETS = ("shipped", "online")  # the choices of `eval chat --test-sets`
# The evaluation sets with a full online test split, and where the hub keeps it (the places tasks/online.py reads). Downloaded by `chibichat data tasks NAME`; checked against training data once present.
TEST_SPLIT = "test"
ONLINE_TEST_SETS = {"arc-easy": (ARC_REPO, "ARC-Easy"), "arc-challenge": (ARC_REPO, "ARC-Challenge"),
                    "mmlu": (MMLU_REPO, "all"), "gsm8k": GSM8K, "humaneval": HUMANEVAL}


class GSM8K(ListTask):
    def evaluate(self, item, completion_text):
        return evaluate_gsm8k(item, completion_text)


class HumanEval(ListTask):
    runs_code = True

    def evaluate(self, item, completion_text):
        return evaluate_humaneval(item, completion_text)


def _check_source(name, source, home, split):
    if source not in SOURCES:
        raise ChibiError(f"task {name!r}: source must be one of {SOURCES}, got {source!r}")
    if source == "shipped" and (home is not None or split is not None):
        raise ChibiError(f"task {name!r}: the shipped subset has one fixed split and needs no home; "
                         "pass source='online' to choose a split of the full data set")
    if source == "online" and (home is None or split is None):
        raise ChibiError(f"task {name!r}: source='online' needs home= and split=")


def _eval_only(source: str, split: str | None) -> bool:
    """Shipped subsets are test/validation data; online, only a "train" split is training data."""
    return source == "shipped" or split != "train"


def arc(subset: str, source: str = "shipped", home=None, split: str | None = None) -> ListTask:
    name = "arc-easy" if subset == "ARC-Easy" else "arc-challenge"
    _check_source(name, source, home, split)
    if source == "shipped":
        rows = read_shipped(name)
    else:
        from chibichat.tasks.online import arc_rows

        rows = arc_rows(home, subset, split)
    return ListTask(name, "categorical", mc_items(rows), description=f"AI2 {subset} ({source})",
                    eval_only=_eval_only(source, split))


def mmlu(source: str = "shipped", home=None, split: str | None = None) -> ListTask:
    _check_source("mmlu", source, home, split)
    if source == "shipped":
        rows = read_shipped("mmlu")
    else:
        from chibichat.tasks.online import mmlu_rows

        rows = mmlu_rows(home, "all", split)
    return ListTask("mmlu", "categorical", mc_items(rows), description=f"MMLU ({source})",
                    eval_only=_eval_only(source, split))


def mmlu_dev() -> ListTask:
    """MMLU's dev + validation splits (shipped, all of them): offline multiple-choice *training* data
    for midtraining/SFT. The builder drops any row whose question is an MMLU test question, so it is
    disjoint from the `mmlu` evaluation subset (tested)."""
    return ListTask("mmlu-dev", "categorical", mc_items(read_shipped("mmlu-dev")),
                    description="MMLU dev+validation (shipped training MC data)", eval_only=False)


def gsm8k(source: str = "shipped", home=None, split: str | None = None) -> GSM8K:
    _check_source("gsm8k", source, home, split)
    if source == "shipped":
        rows = read_shipped("gsm8k")
    else:
        from chibichat.tasks.online import gsm8k_rows

        rows = gsm8k_rows(home, split)
    items = [gsm8k_item(r["question"], r["solution"]) for r in rows]
    return GSM8K("gsm8k", "generative", items, description=f"GSM8K ({source})", eval_only=_eval_only(source, split))


def humaneval(source: str = "shipped", home=None, split: str | None = None) -> HumanEval:
    _check_source("humaneval", source, home, split)
    if source == "shipped":
        rows = read_shipped("humaneval")
    else:
        from chibichat.tasks.online import humaneval_rows

        rows = humaneval_rows(home, split)
    return HumanEval("humaneval", "generative", [humaneval_item(r) for r in rows], description=f"HumanEval ({source})",
                     eval_only=True)  # HumanEval has only a test split


def gsm8k_train(home) -> GSM8K:
    """GSM8K train (online only: no registry package has it); for SFT/RL."""
    task = gsm8k(source="online", home=home, split="train")
    task.name = "gsm8k-train"
    return task


def arc_train(subset: str, home) -> ListTask:
    """ARC train split (online only); for SFT."""
    task = arc(subset, source="online", home=home, split="train")
    task.name += "-train"
    return task


def task_specs() -> list[TaskSpec]:
    m = "chibichat.tasks.evalsets"
    return [
        TaskSpec("gsm8k-train", "generative", "en", f"{m}:gsm8k_train", (), "GSM8K train split (online)"),
        TaskSpec("arc-easy-train", "categorical", "en", f"{m}:arc_train", (("subset", "ARC-Easy"),),
                 "ARC-Easy train split (online)"),
        TaskSpec("arc-challenge-train", "categorical", "en", f"{m}:arc_train", (("subset", "ARC-Challenge"),),
                 "ARC-Challenge train split (online)"),
        TaskSpec("arc-easy", "categorical", "en", f"{m}:arc", (("subset", "ARC-Easy"),), "ARC-Easy (4-way MC)", eval_only=True),
        TaskSpec("arc-challenge", "categorical", "en", f"{m}:arc", (("subset", "ARC-Challenge"),),
                 "ARC-Challenge (4-way MC)", eval_only=True),
        TaskSpec("mmlu", "categorical", "en", f"{m}:mmlu", (), "MMLU (57 subjects, 4-way MC)", eval_only=True),
        TaskSpec("mmlu-dev", "categorical", "en", f"{m}:mmlu_dev", (),
                 "MMLU dev+validation splits, shipped training data (4-way MC)"),
        TaskSpec("gsm8k", "generative", "en", f"{m}:gsm8k", (), "GSM8K math word problems, '#### n'", eval_only=True),
        TaskSpec("humaneval", "generative", "en", f"{m}:humaneval", (), "HumanEval Python functions", eval_only=True),
    ]


# The ChatCORE set of `eval chat` (registry names); also what training data is checked disjoint from.
CHATCORE_TASKS = ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "spelling")


def online_test_set(name: str, home):
    """The full online test split of an evaluation set of ONLINE_TEST_SETS (downloaded once into `home`)."""
    from chibichat.tasks.registry import get_task

    if name not in ONLINE_TEST_SETS:
        raise ChibiError(f"task {name!r} has no online test set; those that have one: {', '.join(ONLINE_TEST_SETS)}")
    return get_task(name, source="online", home=home, split=TEST_SPLIT)


def cached_online_test_sets(home) -> list[str]:
    """The names of ONLINE_TEST_SETS whose full test split is completely in `home`'s task cache (a split
    folder with its manifest; hub.fetch_split writes that last)."""
    from chibichat.common import Home
    from chibichat.tasks.hub import cache_dir

    home = home if isinstance(home, Home) else Home.resolve(home)
    return [n for n, (repo, subset) in ONLINE_TEST_SETS.items()
            if (cache_dir(home, repo, subset, TEST_SPLIT) / "manifest.json").is_file()]


def eval_task(name: str, home=None, test_sets: str = "shipped"):
    """A task for evaluation: with test_sets="online", a task of ONLINE_TEST_SETS is its full online test
    split (in `home`); otherwise shipped tasks are their subsets, generated tasks their held-out test split,
    and tasks read from downloads (JGLUE, online sets) read them from `home`."""
    from chibichat.tasks.registry import get_task
    from chibichat.tasks.generated import GeneratedTask
    from chibichat.tasks.registry import needs_home

    if test_sets not in TEST_SETS:
        raise ChibiError(f"--test-sets {test_sets!r}: choose one of {', '.join(TEST_SETS)}")
    if test_sets == "online" and name in ONLINE_TEST_SETS:
        if home is None:
            raise ChibiError(f"the online test set of {name!r} is read from a home's task cache; pass home=")
        return online_test_set(name, home)
    task = get_task(name, **({"home": home} if home is not None and needs_home(name) else {}))
    if isinstance(task, GeneratedTask):
        task = get_task(name, split="test")
    if task.kind not in ("categorical", "generative"):
        raise ChibiError(f"--tasks names {name!r}, a task of kind {task.kind!r}; chat eval takes categorical "
                         "or generative tasks")
    return task
