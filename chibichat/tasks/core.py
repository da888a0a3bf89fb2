"""CORE-lite: shipped in-context tasks for base-model evaluation (kind "core", schema in base.py).

Fixed-seed subsets (500 items; all of COPA's 100, ARC-Challenge validation's 299, BIG-bench
operators' 211 and repeat_copy_logic's 32) of the DCLM CORE tasks that are legally shippable (see
assets/NOTICE.md; CoQA and Jeopardy are left out as partly non-commercial; SQuAD, LSAT-AR and
Winograd are not in a registry package): 16 of CORE's 22 tasks.
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


def core_lite_names() -> list[str]:
    return list(CORE_TASKS)


def task_specs() -> list[TaskSpec]:
    return [TaskSpec(n, "core", "en", "chibichat.tasks.core:core_task", (("name", n),), d, eval_only=True)
            for n, (_, _, d) in CORE_TASKS.items()]
