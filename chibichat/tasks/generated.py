"""Base class of the generated tasks: items made on demand from a seed, deterministic and split-disjoint.

Item i of a generated task is drawn from a `random.Random` seeded by the string
"<task>:<seed>:<i>:<attempt>" (string seeds are hashed with SHA-512 by CPython, so the sequence does
not depend on PYTHONHASHSEED or the platform). Each item has a *key* (the problem itself, e.g. the word
or the question); SHA-256 of the key puts every possible problem in exactly one of train (90%) or
test (10%), and an item is redrawn (next attempt) until its key falls in the task's split. So test
problems never appear in training data, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import random

from chibichat.common import ChibiError
from chibichat.tasks.base import Task

SPLITS = ("train", "test")
TEST_SHARE = 10  # one key in TEST_SHARE is a test key


def key_split(key: str) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h % TEST_SHARE == 0 else "train"


class GeneratedTask(Task):
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
