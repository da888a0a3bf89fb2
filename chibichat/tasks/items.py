"""Item formats the evaluation sets share: lettered multiple choice, GSM8K solutions, HumanEval programs.

Each builder turns a source row (shipped file or online download: the same shape either way) into an
item of tasks/base.py's schema, and each checker scores a completion against one. evalsets.py, online.py
and jglue.py build their tasks from these.
"""

from __future__ import annotations

import re
import secrets

from chibichat.common import ChibiError
from chibichat.eval.metrics import extract_final_number, numbers_equal

# ----------------------------------------------------------------------------------------------
# Categorical (multiple-choice) items: one question, lettered choices, answered by one letter.
#
# The user message lists each choice followed directly by "=" and its letter ("- Paris=B"): with no
# space before the letter, the letter the model should produce is the same token as a bare-letter
# answer, so an evaluator can compare the logits of the letter tokens only (nanochat's ChatCORE
# convention). The assistant message is the correct letter.

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


# ----------------------------------------------------------------------------------------------
# GSM8K: grade-school math word problems (generative, "#### n" answers).
#
# The reference solutions carry calculator annotations "<<48/2=24>>". They become tool-call parts so a
# model learns to use the calculator: text before the annotation stays text, the expression becomes a
# python part and the annotated result a python_output part (the result is the dataset's own number,
# which the model is then trained to copy). The text after the annotation (normally the same number
# again) stays text. The final "#### n" line is kept.
#
# Item (kind "generative"): messages (user question, assistant parts), "answer" (the number after
# "####", commas removed), "question".

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


# ----------------------------------------------------------------------------------------------
# HumanEval: write a Python function from its signature and docstring (generative, run against tests).
#
# Item (kind "generative"): messages (user: the prompt code; assistant: prompt + canonical solution),
# "task_id", "prompt", "canonical_solution", "test" (defines check(candidate)), "entry_point".
#
# evaluate(item, completion): take the code of the completion (the first ``` fenced block if there is
# one, else the whole text); if it does not define the entry point, treat it as the function body and
# prepend the prompt; if it does, still prepend the prompt (a valid program: the signature and docstring
# make a function its own definition replaces), whose imports and helpers (poly, encode_cyclic, ...) the
# function and the test may use; then run program + test + check(entry_point) in chibichat.sandbox (a
# fresh, confined interpreter). Passing = exit status 0 within the time limit and a line printed after
# check() returned: a completion that ends the program before the tests run (exit(), sys.exit(0),
# os._exit(0), also from inside the function) exits 0 too, so the line carries a token drawn per run.

_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)


def humaneval_item(row: dict) -> dict:
    for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point"):
        if key not in row:
            raise ChibiError(f"HumanEval row lacks field {key!r}: {str(row)[:80]}")
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
            "task_id": row["task_id"], "prompt": row["prompt"], "canonical_solution": row["canonical_solution"],
            "test": row["test"], "entry_point": row["entry_point"]}


def extract_code(completion: str) -> str:
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def build_program(item: dict, completion: str) -> str:
    code = extract_code(completion)
    if not re.search(rf"def\s+{re.escape(item['entry_point'])}\s*\(", code):
        code = item["prompt"] + code  # a bare body continuing the prompt
    else:
        # A whole function: after the prompt, whose imports and other functions it and the test may call
        # (HumanEval/38's test calls encode_cyclic); its own definition replaces the prompt's.
        code = item["prompt"] + "\n" + code
    return f"{code}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"


def evaluate_humaneval(item: dict, completion: str, timeout_s: float = 5.0) -> bool:
    from chibichat.sandbox import run_python

    token = secrets.token_hex(16)
    result = run_python(build_program(item, completion) + f"print({token!r})\n", timeout_s=timeout_s)
    return bool(result.ok) and token in result.stdout.splitlines()
