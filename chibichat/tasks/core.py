"""CORE-lite: shipped in-context tasks for base-model evaluation (kind "core", schema in base.py).

Fixed-seed subsets (500 items, COPA all 100, ARC-Challenge validation all 299) of the validation
sets of the DCLM CORE tasks that are legally shippable (see assets/NOTICE.md; CoQA and Jeopardy are
left out as partly non-commercial, SQuAD/BIG-bench/LSAT-AR/Winograd are not in a registry package).
Few-shot K and the random baseline follow DCLM's core.yaml / eval_meta_data.csv; BoolQ's baseline
is the majority-class rate DCLM uses. A score over these is "CORE-lite", not comparable with CORE.
"""

from __future__ import annotations

from chibichat.tasks.base import CoreTask
from chibichat.tasks.registry import TaskSpec
from chibichat.tasks.shipped import read_shipped

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
}


def core_task(name: str) -> CoreTask:
    k, baseline, description = CORE_TASKS[name]
    return CoreTask(name, read_shipped(name), num_fewshot=k, random_baseline=baseline, description=description)


def core_lite_names() -> list[str]:
    return list(CORE_TASKS)


def task_specs() -> list[TaskSpec]:
    return [TaskSpec(n, "core", "en", "chibichat.tasks.core:core_task", (("name", n),), d)
            for n, (_, _, d) in CORE_TASKS.items()]
