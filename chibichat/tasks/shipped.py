"""The task data that ships inside the package (chibichat/tasks/assets/), and the tasks that are only that.

Shipped files are gzip-compressed JSON lines written by scripts/build_tasks.py, with a manifest.json
(sources, versions, sha256, counts) and NOTICE/LICENSES beside them. Nothing here downloads.

Tasks read as they ship (items `{"messages"}` or CORE items plus provenance fields):
    chitchat       human small-talk chats (chitchat-dataset, MIT), cut into windows of up to 4 exchanges
    chatterbot     chatterbot-corpus English conversations (BSD-3), one item per conversation
    chatterbot-ja  chatterbot-corpus Japanese conversations (BSD-3)
    core-*         CORE-lite (kind "core", schema in base.py): fixed-seed subsets (500 items; all of COPA's
                   100, ARC-Challenge validation's 299, BIG-bench operators' 211 and repeat_copy_logic's 32)
                   of the DCLM CORE tasks that are legally shippable (see assets/NOTICE.md; CoQA and Jeopardy
                   are left out as partly non-commercial; SQuAD, LSAT-AR and Winograd are not in a registry
                   package): 16 of CORE's 22 tasks. Few-shot K and the random baseline follow DCLM's
                   core.yaml / eval_meta_data.csv (BoolQ's baseline is the majority-class rate DCLM uses),
                   except language identification's: the subset is 11-way, so its baseline is 1/11, not the
                   CSV's 25%.
                   A score over these is "CORE-lite", not comparable with CORE.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

from chibichat.common import ChibiError, read_json
from chibichat.tasks.base import CoreTask, ListTask

ASSETS = Path(__file__).resolve().parent / "assets"


def asset_path(name: str) -> Path:
    return ASSETS / name


def read_jsonl_gz(path: str | Path, what: str) -> list[dict]:
    """All records of a .jsonl.gz file; a missing or corrupt file is a ChibiError naming it."""
    path = Path(path)
    if not path.exists():
        raise ChibiError(
            f"{what} data file {path} is missing; reinstall chibichat or rebuild the shipped tasks with "
            "`python scripts/build_tasks.py`"
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, zlib.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChibiError(f"{what} data file {path} is corrupt ({e}); reinstall chibichat or rebuild it "
                         "with `python scripts/build_tasks.py`") from None
    if not rows:
        raise ChibiError(f"{what} data file {path} holds no items; rebuild it with scripts/build_tasks.py")
    return rows


def read_shipped(name: str, what: str | None = None) -> list[dict]:
    """Records of assets/<name>.jsonl.gz."""
    return read_jsonl_gz(asset_path(f"{name}.jsonl.gz"), what or name)


def read_lines_gz(name: str) -> list[str]:
    path = asset_path(name)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except FileNotFoundError:
        raise ChibiError(f"word list {path} is missing; reinstall chibichat or run scripts/build_tasks.py") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ChibiError(f"word list {path} is corrupt ({e}); run scripts/build_tasks.py") from None
    if not lines:
        raise ChibiError(f"word list {path} is empty; run scripts/build_tasks.py")
    return lines


def manifest() -> dict:
    return read_json(asset_path("manifest.json"), "shipped task manifest")


SHIPPED_CONVERSATIONS = {
    "chitchat": ("en", "human small-talk chats (chitchat-dataset, MIT)"),
    "chatterbot": ("en", "chatterbot-corpus English conversations (BSD-3)"),
    "chatterbot-ja": ("ja", "chatterbot-corpus Japanese conversations (BSD-3)"),
}


def shipped_conversations(name: str) -> ListTask:
    lang, description = SHIPPED_CONVERSATIONS[name]
    items = read_shipped(name)
    return ListTask(name, "conversation", items, lang=lang, description=description)


# name -> (few-shot K, random baseline as a fraction, description)
CORE_TASKS = {
    "core-hellaswag": (0, 0.25, "HellaSwag sentence completion (4-way)"),
    "core-arc-easy": (10, 0.25, "ARC-Easy validation, answer text scored (4-way)"),
    "core-arc-challenge": (10, 0.25, "ARC-Challenge validation, answer text scored (4-way)"),
    "core-piqa": (10, 0.50, "PIQA physical commonsense (2-way)"),
    "core-winogrande": (0, 0.50, "WinoGrande pronoun resolution (schema, 2-way)"),
    "core-copa": (0, 0.50, "COPA cause/effect (2-way)"),
    "core-boolq": (10, 0.62, "BoolQ yes/no reading comprehension"),
    "core-openbookqa": (0, 0.25, "OpenBookQA (4-way)"),
    "core-commonsenseqa": (10, 0.20, "CommonsenseQA (5-way)"),
    "core-lambada": (0, 0.0, "LAMBADA last-word prediction (language modeling)"),
    # BIG-bench (Apache-2.0): the six tasks CORE uses, as exact-continuation language modeling except
    # language identification (11-way multiple choice: baseline 1/11, the true chance rate).
    "core-bigbench-qa-wikidata": (10, 0.0, "BIG-bench qa_wikidata: complete a Wikidata fact"),
    "core-bigbench-dyck": (10, 0.0, "BIG-bench dyck_languages: close the brackets"),
    "core-bigbench-operators": (10, 0.0, "BIG-bench operators: evaluate a newly defined operator"),
    "core-bigbench-repeat-copy-logic": (10, 0.0, "BIG-bench repeat_copy_logic: follow a repeat instruction"),
    "core-bigbench-cs-algorithms": (10, 0.0, "BIG-bench cs_algorithms: LCS length, bracket validity"),
    "core-bigbench-language-id": (10, 1 / 11, "BIG-bench language_identification (11-way)"),
}


def core_task(name: str) -> CoreTask:
    k, baseline, description = CORE_TASKS[name]
    return CoreTask(name, read_shipped(name), num_fewshot=k, random_baseline=baseline, description=description)
