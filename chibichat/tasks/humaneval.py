"""HumanEval: write a Python function from its signature and docstring (generative, run against tests).

Item (kind "generative"): messages (user: the prompt code; assistant: prompt + canonical solution),
"task_id", "prompt", "canonical_solution", "test" (defines check(candidate)), "entry_point".

evaluate(item, completion): take the code of the completion (the first ``` fenced block if there is
one, else the whole text); if it does not define the entry point, treat it as the function body and
prepend the prompt; then run program + test + check(entry_point) in chibichat.sandbox (a fresh,
confined interpreter). Passing = exit status 0 within the time limit.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)


def humaneval_item(row: dict) -> dict:
    for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point"):
        if key not in row:
            from chibichat.common import ChibiError

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
        # keep the prompt's imports (typing etc.) which a rewritten function may rely on
        imports = "".join(ln + "\n" for ln in item["prompt"].splitlines() if ln.startswith(("import ", "from ")))
        code = imports + code
    return f"{code}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"


def evaluate_humaneval(item: dict, completion: str, timeout_s: float = 5.0) -> bool:
    from chibichat.sandbox import run_python

    result = run_python(build_program(item, completion), timeout_s=timeout_s)
    return bool(result.ok)
