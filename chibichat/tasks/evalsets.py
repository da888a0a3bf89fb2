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

Test sets (registry.eval_task(name, home, test_sets), what `eval chat --test-sets` picks): "shipped" scores
the subsets above; "online" scores the full test split of every task in ONLINE_TEST_SETS (ARC-Easy 2,376,
ARC-Challenge 1,172, MMLU 14,042, GSM8K 1,319, HumanEval 164), read from (or downloaded into) the home's
task cache. Generated tasks (spelling, ...) have no online source: both choices score their generated test
split, which is complete by construction.

Shipped files store the source fields ({"question","choices","gold"} / {"question","solution"} / the
HumanEval row); items are built from them at load time by the same code the online loaders use.
"""

from __future__ import annotations

from chibichat.common import ChibiError
from chibichat.tasks.base import ListTask
from chibichat.tasks.items import evaluate_gsm8k, evaluate_humaneval, gsm8k_item, humaneval_item, mc_items
from chibichat.tasks.online import ARC_REPO, GSM8K, HUMANEVAL, MMLU_REPO
from chibichat.tasks.shipped import read_shipped

SOURCES = ("shipped", "online")
TEST_SETS = ("shipped", "online")  # the choices of `eval chat --test-sets`
# The evaluation sets with a full online test split, and where the hub keeps it (the places tasks/online.py reads).
# Downloaded by `chibichat data tasks NAME`; checked against training data once present.
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


# The ChatCORE set of `eval chat` (registry names); also what training data is checked disjoint from.
CHATCORE_TASKS = ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval", "spelling")


def cached_online_test_sets(home) -> list[str]:
    """The names of ONLINE_TEST_SETS whose full test split is completely in `home`'s task cache (a split
    folder with its manifest; hub.fetch_split writes that last)."""
    from chibichat.common import Home
    from chibichat.tasks.hub import cache_dir

    home = home if isinstance(home, Home) else Home.resolve(home)
    return [n for n, (repo, subset) in ONLINE_TEST_SETS.items()
            if (cache_dir(home, repo, subset, TEST_SPLIT) / "manifest.json").is_file()]
