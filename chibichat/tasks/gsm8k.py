"""GSM8K: grade-school math word problems (generative, "#### n" answers).

The reference solutions carry calculator annotations "<<48/2=24>>". They become tool-call parts so a
model learns to use the calculator: text before the annotation stays text, the expression becomes a
python part and the annotated result a python_output part (the result is the dataset's own number,
which the model is then trained to copy). The text after the annotation (normally the same number
again) stays text. The final "#### n" line is kept.

Item (kind "generative"): messages (user question, assistant parts), "answer" (the number after
"####", commas removed), "question".
"""

from __future__ import annotations

import re

from chibichat.common import ChibiError
from chibichat.tasks.answers import extract_final_number, numbers_equal

_ANNOTATION = re.compile(r"<<([^<>]*)>>")


def solution_to_parts(solution: str) -> list[dict]:
    """A GSM8K solution string -> assistant content parts (see the module docstring)."""
    parts: list[dict] = []
    pos = 0
    for m in _ANNOTATION.finditer(solution):
        if m.start() > pos:
            parts.append({"type": "text", "text": solution[pos : m.start()]})
        body = m.group(1)
        if "=" not in body:
            raise ChibiError(f"GSM8K calculator annotation <<{body}>> has no '='; the solution is malformed")
        expr, result = body.rsplit("=", 1)
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(solution):
        parts.append({"type": "text", "text": solution[pos:]})
    return parts


def gsm8k_item(question: str, solution: str) -> dict:
    answer = extract_final_number(solution)
    if answer is None:
        raise ChibiError(f"GSM8K solution has no '#### <number>' line: {solution[-80:]!r}")
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": solution_to_parts(solution)}],
            "answer": answer, "question": question}


def evaluate_gsm8k(item: dict, completion_text: str) -> bool:
    return numbers_equal(extract_final_number(completion_text), item["answer"])
