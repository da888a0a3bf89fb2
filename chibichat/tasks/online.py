"""Online loaders: the full data sets from the Hugging Face hub (see hub.py for fetching/caching).

Each *_rows function returns rows in the shape the shipped files use, so one item builder serves
both (evalsets.py): categorical {"id","question","choices","gold"[, "subject"]}, GSM8K
{"question","solution"}, HumanEval rows as published. Online-only training tasks defined here:

smoltalk   HuggingFaceTB/smol-smoltalk (kind "conversation"), split train | test
mmlu-aux   cais/mmlu auxiliary_train (kind "categorical", ~100K items for midtraining), split train
"""

from __future__ import annotations

from chibichat.common import ChibiError, Home
from chibichat.tasks.base import ListTask
from chibichat.tasks.hub import hub_rows

ROLES = ("system", "user", "assistant")

# Where the hub keeps each source (repo, subset); evalsets.ONLINE_TEST_SETS points at the same places.
ARC_REPO = "allenai/ai2_arc"  # subsets ARC-Easy, ARC-Challenge
MMLU_REPO = "cais/mmlu"  # subsets all, auxiliary_train
GSM8K = ("openai/gsm8k", "main")
HUMANEVAL = ("openai/openai_humaneval", "openai_humaneval")


def _home(home) -> Home:
    return home if isinstance(home, Home) else Home.resolve(home)


def arc_rows(home, subset: str, split: str) -> list[dict]:
    rows = hub_rows(_home(home), ARC_REPO, subset, split, ("id", "question", "choices", "answerKey"))
    out = []
    for r in rows:
        labels, texts = list(r["choices"]["label"]), list(r["choices"]["text"])
        if r["answerKey"] not in labels:
            raise ChibiError(f"ARC {subset}/{split} item {r['id']}: answer {r['answerKey']!r} not among {labels}")
        out.append({"id": r["id"], "question": r["question"], "choices": texts, "gold": labels.index(r["answerKey"])})
    return out


def mmlu_rows(home, subset: str, split: str) -> list[dict]:
    rows = hub_rows(_home(home), MMLU_REPO, subset, split,
                    ("train",) if subset == "auxiliary_train" else ("question", "choices", "answer"))
    out = []
    for k, r in enumerate(rows):
        if subset == "auxiliary_train":
            r = r["train"]  # this subset wraps each row in a "train" struct
        out.append({"id": f"{r.get('subject') or subset}/{k}", "subject": r.get("subject") or "",
                    "question": r["question"], "choices": list(r["choices"]), "gold": int(r["answer"])})
    return out


def gsm8k_rows(home, split: str) -> list[dict]:
    rows = hub_rows(_home(home), *GSM8K, split, ("question", "answer"))
    return [{"question": r["question"], "solution": r["answer"]} for r in rows]


def humaneval_rows(home, split: str) -> list[dict]:
    return hub_rows(_home(home), *HUMANEVAL, split,
                    ("task_id", "prompt", "canonical_solution", "test", "entry_point"))


def check_messages(messages, where: str) -> list[dict]:
    """Validate a conversation (optional leading system, then user/assistant alternating, ending with
    the assistant) and return it as plain {"role","content"} dicts."""
    if not isinstance(messages, list) or not messages:
        raise ChibiError(f"{where}: no messages")
    out = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    body = out[1:] if out[0]["role"] == "system" else out
    for k, m in enumerate(body):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want or not isinstance(m["content"], str):
            raise ChibiError(f"{where}: message {k} should be a {want} message with text, got role {m['role']!r}")
    if not body or body[-1]["role"] != "assistant":
        raise ChibiError(f"{where}: a training conversation must end with an assistant message")
    return out


def smoltalk(home, split: str = "train") -> ListTask:
    rows = hub_rows(_home(home), "HuggingFaceTB/smol-smoltalk", "default", split, ("messages",))
    items = [{"messages": check_messages(r["messages"], f"smol-smoltalk {split} row {k}")} for k, r in enumerate(rows)]
    return ListTask("smoltalk", "conversation", items, description=f"SmolTalk ({split})")


def mmlu_aux(home, split: str = "train") -> ListTask:
    from chibichat.tasks.items import mc_items

    return ListTask("mmlu-aux", "categorical", mc_items(mmlu_rows(home, "auxiliary_train", split)),
                    description="MMLU auxiliary_train (ARC, OBQA, RACE, MCTest as 4-way MC)")
