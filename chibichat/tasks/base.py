"""The task framework: what a task is, deterministic views of it, and mixtures of tasks.

A task is an indexable, finite sequence of *items*. Every item is a conversation dict (see
docs/architecture.md "Conversations and rendering") plus the fields its kind needs:

kind "conversation"  training data only; the item is just `{"messages": [...]}`.
kind "categorical"   multiple choice answered by one letter. Extra fields:
                     "letters" (list of choice letters, e.g. ["A","B","C","D"]), "answer" (the correct
                     letter), "choices" (choice texts), "question". The user message lists every choice as
                     "- <choice>=<letter>" (no space before the letter, so the letter token an evaluator
                     compares equals the bare-letter answer) and the assistant message is the letter.
kind "generative"    answered by free text; `evaluate(item, completion_text)` scores it. Extra fields
                     depend on the family and are documented in its module ("answer" for numeric tasks,
                     "prompt"/"test"/"entry_point" for HumanEval, ...).
kind "core"          in-context items for base-model evaluation (DCLM CORE style, no chat format):
                       {"type": "multiple_choice", "context": str, "continuations": [str], "gold": int}
                       {"type": "schema", "contexts": [str], "continuation": str, "gold": int}
                       {"type": "language_modeling", "context": str, "continuation": str}
                     The text is exactly context + continuation; the loss is scored on the continuation
                     with the spaces that end the context (a separator " " or "\\nAnswer: " ends the
                     context, or a leading space starts the continuation). The task carries `num_fewshot` (K) and
                     `random_baseline` (a fraction in [0, 1)); `fewshot_indices(i)` picks the K
                     demonstration items for item i (never i itself). A demonstration is rendered as
                     its context + its gold continuation, demonstrations separated by a blank line.
                     CORE items have no "messages".

Views (`slice`, `shuffled`) never copy items; they hold an index array into the base task, so a view of
a 460K-row task costs one integer array. Shuffling uses numpy's PCG64 permutation, the same order the
Hugging Face `datasets` library produces for `shuffle(seed)`.
"""

from __future__ import annotations

import hashlib
import operator
import random
from typing import Sequence

from chibichat.common import ChibiError

KINDS = ("conversation", "categorical", "generative", "core")


class Task:
    """Base class. Subclasses set `name`, `kind`, `lang` and implement `__len__` and `get(i)`."""

    name: str = ""
    kind: str = ""
    lang: str = "en"
    description: str = ""
    runs_code: bool = False  # True when evaluate() executes the completion (in chibichat.sandbox)
    # True for evaluation data (test/validation splits, shipped eval subsets, CORE): a training stage
    # must not put it in a training mixture (it may use it for validation loss).
    eval_only: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int) -> dict:
        """Item i of this task, 0 <= i < len(self) (already bounds-checked by __getitem__)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        try:
            i = operator.index(i)  # ints and numpy integers
        except TypeError:
            raise TypeError(f"task index must be an integer, got {type(i).__name__}; use .slice() for ranges") from None
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"task {self.name!r} has {n} items; index {i} is out of range")
        return self.get(i)

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def evaluate(self, item: dict, completion_text: str) -> bool | float:
        raise ChibiError(
            f"task {self.name!r} is of kind {self.kind!r} and has no evaluate(); only generative tasks are "
            "scored from a completion (categorical tasks compare the letter, core tasks compare losses)"
        )

    # -- views -------------------------------------------------------------------------------
    def slice(self, start: int | None = None, stop: int | None = None) -> "TaskView":
        r = range(len(self))[slice(start, stop)]
        return TaskView(self, r)

    def shuffled(self, seed: int) -> "TaskView":
        import numpy as np

        perm = np.random.default_rng(seed).permutation(len(self))
        return TaskView(self, perm)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} kind={self.kind} lang={self.lang} n={len(self)}>"


class TaskView(Task):
    """A deterministic re-indexing of a base task (slice or shuffle); evaluate() delegates to the base."""

    def __init__(self, base: Task, indices: Sequence[int]):
        self.base = base
        self.indices = indices
        self.name = base.name
        self.kind = base.kind
        self.lang = base.lang
        self.description = base.description
        self.runs_code = base.runs_code
        self.eval_only = base.eval_only
        # CORE metadata travels with the view so a shuffled CORE task is still a CORE task.
        for attr in ("num_fewshot", "random_baseline"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, i: int) -> dict:
        return self.base[int(self.indices[i])]

    def evaluate(self, item: dict, completion_text: str) -> bool | float:
        return self.base.evaluate(item, completion_text)

    def fewshot_indices(self, i: int, k: int | None = None) -> list[int]:
        # Demonstrations are chosen within the view, so they never include the item itself.
        return _fewshot_indices(len(self), i, self.num_fewshot if k is None else k)


class ListTask(Task):
    """A task over an in-memory list of items (shipped subsets, parsed downloads, generated data)."""

    def __init__(self, name: str, kind: str, items: list[dict], lang: str = "en", description: str = "",
                 eval_only: bool = False):
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
        self.name, self.kind, self.lang, self.description = name, kind, lang, description
        self.items = items
        self.eval_only = eval_only

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int) -> dict:
        return self.items[i]


class TaskUnion(Task):
    """Several generative tasks as one: their items taken in turn (item 0 of each task, then item 1 of each
    task that has one, ...), so any prefix holds the tasks in equal shares. Each item is a copy with
    "source_task" (its task's name) added, and evaluate() hands it to that task's checker. Used where a
    stage takes one task but should see several, e.g. `rl --task arithmetic,spelling`."""

    def __init__(self, tasks: Sequence[Task]):
        tasks = list(tasks)
        if len(tasks) < 2:
            raise ChibiError("a task union needs at least two tasks")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ChibiError(f"a task union lists a task twice: {names}")
        kinds = {t.kind for t in tasks}
        if kinds != {"generative"}:
            raise ChibiError(f"a task union takes generative tasks (scored by their checkers); got kinds "
                             f"{', '.join(f'{t.name}: {t.kind}' for t in tasks)}")
        self.tasks = {t.name: t for t in tasks}
        self.name = ",".join(names)
        self.kind = "generative"
        self.lang = tasks[0].lang if len({t.lang for t in tasks}) == 1 else "mixed"
        self.description = "the union of " + ", ".join(names)
        self.runs_code = any(t.runs_code for t in tasks)
        self.eval_only = any(t.eval_only for t in tasks)
        longest = max(len(t) for t in tasks)
        self._order = [(t.name, j) for j in range(longest) for t in tasks if j < len(t)]

    def __len__(self) -> int:
        return len(self._order)

    def get(self, i: int) -> dict:
        name, j = self._order[i]
        return {**self.tasks[name][j], "source_task": name}

    def evaluate(self, item: dict, completion_text: str) -> bool | float:
        name = item.get("source_task")
        if name not in self.tasks:
            raise ChibiError(f"task union {self.name!r}: the item comes from {name!r}, not one of its tasks")
        return self.tasks[name].evaluate(item, completion_text)


def _fewshot_indices(n: int, i: int, k: int, seed: int = 1234) -> list[int]:
    """K distinct demonstration indices for item i, never i, from a generator seeded by seed + i
    (so the choice is the same on every rank and every run, independent of evaluation order)."""
    import random

    if k <= 0:
        return []
    if k > n - 1:
        raise ChibiError(f"{k}-shot evaluation needs at least {k + 1} items but the task has {n}; lower K")
    rng = random.Random(seed + i)
    pool = [j for j in range(n) if j != i] if n < 4096 else None
    if pool is not None:
        return rng.sample(pool, k)
    out: list[int] = []
    while len(out) < k:  # large task: rejection-sample instead of materialising the pool
        j = rng.randrange(n)
        if j != i and j not in out:
            out.append(j)
    return out


class CoreTask(ListTask):
    """A base-model in-context task (see the module docstring for the item schema)."""

    def __init__(self, name: str, items: list[dict], num_fewshot: int, random_baseline: float,
                 lang: str = "en", description: str = ""):
        super().__init__(name, "core", items, lang, description, eval_only=True)
        if not 0.0 <= random_baseline < 1.0:
            raise ValueError(f"random_baseline of {name} must be a fraction in [0, 1), got {random_baseline}")
        self.num_fewshot = num_fewshot
        self.random_baseline = random_baseline

    def fewshot_indices(self, i: int, k: int | None = None) -> list[int]:
        return _fewshot_indices(len(self), i, self.num_fewshot if k is None else k)


# Generated tasks (GeneratedTask below)
SPLITS = ("train", "test")
TEST_SHARE = 10  # one key in TEST_SHARE is a test key


def key_split(key: str) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h % TEST_SHARE == 0 else "train"


class GeneratedTask(Task):
    """Items made on demand from a seed, deterministic and split-disjoint.

    Item i is drawn from a `random.Random` seeded by the string "<task>:<seed>:<i>:<attempt>" (CPython
    hashes string seeds with SHA-512, so the sequence depends on neither PYTHONHASHSEED nor the platform).
    Each item has a *key* (the problem itself, e.g. the word or the question); SHA-256 of the key puts
    every possible problem in exactly one of train (90%) or test (10%), and an item is redrawn (next
    attempt) until its key falls in the task's split, so test problems never appear in training data,
    whatever the seeds and sizes. Subclasses implement `sample(rng) -> (key, item)`."""

    default_size = {"train": 1000, "test": 200}

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0):
        if split not in SPLITS:
            raise ChibiError(f"task {self.name!r}: split must be one of {SPLITS}, got {split!r}")
        size = self.default_size[split] if size is None else size
        if not isinstance(size, int) or size <= 0:
            raise ChibiError(f"task {self.name!r}: size must be a positive integer, got {size!r}")
        self.split, self.size, self.seed = split, size, seed
        self.eval_only = split == "test"

    def __len__(self) -> int:
        return self.size

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        """Return (key, item) drawn with rng."""
        raise NotImplementedError

    def get(self, i: int) -> dict:
        for attempt in range(1000):
            rng = random.Random(f"{self.name}:{self.seed}:{i}:{attempt}")
            key, item = self.sample(rng)
            if key_split(key) == self.split:
                item["key"] = key
                return item
        # 1000 misses in a row at a 10% share has probability ~1e-46 unless the key space is tiny.
        raise ChibiError(f"task {self.name!r} could not draw a {self.split} item; its key space is too small")


class Mixture:
    """A deterministic interleaving of tasks, indexable -> (task_name, item).

    Per-task counts come either from `epochs` (one float per task: 2.0 = every item twice, 0.5 = the
    first half of the task's order) or from `weights` + `length` (counts proportional to the weights,
    largest-remainder rounding so they sum exactly to `length`; a task smaller than its count is cycled).
    Occurrence j of task t is item j mod len(t). The whole list of (task, occurrence) pairs is then
    shuffled once with `seed`. Position i depends only on (tasks, counts, seed), so a loader can store
    its index and resume exactly.
    """

    def __init__(self, tasks: Sequence[Task], epochs: Sequence[float] | None = None,
                 weights: Sequence[float] | None = None, length: int | None = None, seed: int = 0,
                 shuffle: bool = True):
        import numpy as np

        tasks = list(tasks)
        if not tasks:
            raise ChibiError("a task mixture needs at least one task")
        for t in tasks:
            if len(t) == 0:
                raise ChibiError(f"task {t.name!r} has no items; remove it from the mixture or fix its data")
        if epochs is not None and weights is not None:
            raise ChibiError("give a mixture either per-task epochs or weights (+ length), not both")
        if weights is not None:
            counts = _apportion(weights, length, [t.name for t in tasks])
        else:
            epochs = [1.0] * len(tasks) if epochs is None else list(epochs)
            if len(epochs) != len(tasks):
                raise ChibiError(f"got {len(epochs)} epochs values for {len(tasks)} tasks; give one per task")
            counts = []
            for t, e in zip(tasks, epochs):
                if not 0 <= e < float("inf"):
                    raise ChibiError(f"epochs for task {t.name!r} must be a finite number >= 0, got {e}")
                counts.append(int(round(e * len(t))))
                if e > 0 and counts[-1] == 0:  # asked for, yet nothing of it would train
                    raise ChibiError(f"epochs {e:g} of task {t.name!r} ({len(t)} items) rounds to 0 items; give it "
                                     f"epochs >= {1 / len(t):.3g} (one item), or leave it out of the mixture")
        if sum(counts) == 0:
            raise ChibiError("the task mixture is empty (all counts are 0); raise epochs/weights/length")
        self.tasks = tasks
        self.counts = counts
        self.seed = seed
        task_ids = np.concatenate([np.full(c, k, dtype=np.int32) for k, c in enumerate(counts)])
        occ = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
        if shuffle:
            perm = np.random.default_rng(seed).permutation(len(task_ids))
            task_ids, occ = task_ids[perm], occ[perm]
        self._task_ids, self._occ = task_ids, occ

    def __len__(self) -> int:
        return len(self._task_ids)

    def __getitem__(self, i: int) -> tuple[str, dict]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"mixture has {n} items; index {i} is out of range")
        t = self.tasks[int(self._task_ids[i])]
        return t.name, t[int(self._occ[i]) % len(t)]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def summary(self) -> dict:
        """{task name: rows in the mixture} for logs and reports."""
        out: dict[str, int] = {}
        for t, c in zip(self.tasks, self.counts):
            out[t.name] = out.get(t.name, 0) + c
        return out


def _apportion(weights: Sequence[float], length: int | None, names: list[str]) -> list[int]:
    if length is None or length <= 0:
        raise ChibiError("a weighted mixture needs length > 0 (total rows); give length or use epochs")
    if len(weights) != len(names):
        raise ChibiError(f"got {len(weights)} weights for {len(names)} tasks; give one per task")
    if any(not 0 <= w < float("inf") for w in weights) or sum(weights) <= 0:
        raise ChibiError(f"mixture weights must be finite and >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    exact = [w / total * length for w in weights]
    counts = [int(x) for x in exact]
    # Largest remainder, ties broken by task order: deterministic and sums exactly to length.
    order = sorted(range(len(exact)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: length - sum(counts)]:
        counts[k] += 1
    starved = [n for n, w, c in zip(names, weights, counts) if w > 0 and c == 0]
    if starved:  # asked for, yet nothing of it would train
        raise ChibiError(f"a weighted mixture of {length} rows gives task(s) {starved} no row; raise their weights "
                         "or the length, or leave them out")
    return counts
