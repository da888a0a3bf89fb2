"""Categorical (multiple-choice) items: one question, lettered choices, answered by one letter.

The user message lists each choice followed directly by "=" and its letter ("- Paris=B"): with no
space before the letter, the letter the model should produce is the same token as a bare-letter
answer, so an evaluator can compare the logits of the letter tokens only (nanochat's ChatCORE
convention). The assistant message is the correct letter.
"""

from __future__ import annotations

from chibichat.common import ChibiError

LETTERS = "ABCDEFGHIJ"

INSTRUCTION = {
    "en": ("Multiple Choice question: ", "Respond only with the letter of the correct answer."),
    "ja": ("多肢選択問題: ", "正しい答えの記号だけを答えてください。"),
}


def categorical_item(question: str, choices: list[str], gold: int, lang: str = "en", **extra) -> dict:
    """A categorical item (see tasks/base.py): messages + letters + answer + choices + question."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ChibiError(f"a multiple-choice item needs 2-{len(LETTERS)} choices, got {len(choices)}: {question[:60]!r}")
    if not 0 <= gold < len(choices):
        raise ChibiError(f"gold index {gold} out of range for {len(choices)} choices: {question[:60]!r}")
    letters = list(LETTERS[: len(choices)])
    head, tail = INSTRUCTION[lang]
    listing = "\n".join(f"- {c}={l}" for c, l in zip(choices, letters))
    user = f"{head}{question}\n{listing}\n\n{tail}"
    item = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": letters[gold]}],
            "letters": letters, "answer": letters[gold], "choices": list(choices), "question": question}
    item.update(extra)
    return item


def mc_items(rows: list[dict]) -> list[dict]:
    return [categorical_item(r["question"], r["choices"], r["gold"], id=r["id"], **({"subject": r["subject"]}
                             if "subject" in r else {})) for r in rows]
