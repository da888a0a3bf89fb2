"""JGLUE (yahoojapan/JGLUE, CC BY-SA 4.0): fetch the official files and read them into chat tasks.

The data is in no package registry and is never shipped: `fetch_jglue` downloads the official files
of the v1.3.0 release (pinned commit) into home/data/tasks/jglue/ keeping the repository's own layout
    <task>-v1.3/<split>-v1.3.json      task in jcommonsenseqa | jnli | jsts | jsquad, split train | valid
so `chibichat evaluate --jglue home/data/tasks/jglue` (chibichat/eval/jglue.py, base-model few-shot
scoring) reads the same files. The base URL is overridable with $CHIBICHAT_JGLUE_BASE (tests use a
local server). Test sets are not distributed; "valid" (dev) is what everyone reports.

This module is the one reader of JGLUE files and the one JSQuAD scorer: `chibichat eval jglue`
(chibichat/eval/jglue.py: base-model few-shot prompts) builds its items from `read_records` too, and
scores JSQuAD with `jsquad_scores`, so the two evaluations agree on the same outputs.

Formats: JCommonsenseQA/JNLI/JSTS are JSON lines (despite .json); JSQuAD is SQuAD-format JSON, or JSON
lines of already flattened records (Hub copies; answers as ["..."], [{"text": ...}] or {"text": [...]}).
Records (official field names, validated by `read_records`):
    jcommonsenseqa  q_id, question, choice0..choice4, label (0-4)
    jnli            sentence_pair_id, sentence1 (premise), sentence2 (hypothesis),
                    label in entailment | contradiction | neutral
    jsts            sentence_pair_id, sentence1, sentence2, label (similarity 0-5, float)
    jsquad          flattened to one record per question: id, title, context, question,
                    answers (list of answer texts)

Chat tasks (for chat evaluation on valid; `eval chat --tasks jsquad`), all lang "ja":
    jcommonsenseqa  categorical, 5 letters A-E
    jnli            categorical, choices 含意 / 矛盾 / 中立 (A/B/C)
    jsts            generative: assistant answers the similarity with one decimal ("3.4");
                    item["score"] is the gold float; evaluate() = |prediction - gold| <= 0.5
                    (correlations are computed by the evaluator from item["score"])
    jsquad          generative: assistant answers with the first gold answer; item["answers"] holds
                    all; evaluate() = JGLUE's exact match (`jsquad_scores`: the first non-empty line
                    of the completion against every gold answer, normalised as JGLUE's own JSQuAD
                    evaluation does, chibichat.eval.metrics.normalize_answer_ja)
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path

from chibichat.common import ChibiError, Home
from chibichat.tasks.base import ListTask
from chibichat.tasks.items import categorical_item

JGLUE_COMMIT = "6f071c09316baae89c3d083a90985b4b1cb9968c"  # release v1.3.0
JGLUE_BASE = f"https://raw.githubusercontent.com/yahoojapan/JGLUE/{JGLUE_COMMIT}/datasets"
JGLUE_BASE_ENV = "CHIBICHAT_JGLUE_BASE"
VERSION = "v1.3"
TASKS = ("jcommonsenseqa", "jnli", "jsts", "jsquad")
SPLITS = ("train", "valid")
NLI_WORDS = {"entailment": "含意", "contradiction": "矛盾", "neutral": "中立"}


def relative_path(task: str, split: str) -> str:
    return f"{task}-{VERSION}/{split}-{VERSION}.json"


def jglue_dir(home: Home) -> Path:
    return home.data_dir / "tasks" / "jglue"


def fetch_jglue(home: Home, task: str, split: str = "valid", base: str | None = None) -> Path:
    """The local official file of (task, split), downloaded once (resumable, retried, and parsed by
    read_records before it gets its final name, so a truncated or HTML error page never lands)."""
    from chibichat.data.download import download_file
    from chibichat.tasks.hub import BACKOFF_S, RETRIES, TIMEOUT_S

    if task not in TASKS:
        raise ChibiError(f"unknown JGLUE task {task!r}; use one of {TASKS}")
    if split not in SPLITS:
        raise ChibiError(f"JGLUE split must be one of {SPLITS} (test sets are not distributed), got {split!r}")
    dest = jglue_dir(home) / relative_path(task, split)
    if dest.exists():
        return dest
    base = (base or os.environ.get(JGLUE_BASE_ENV) or JGLUE_BASE).rstrip("/")
    url = f"{base}/{relative_path(task, split)}"
    return download_file(url, dest, validate=lambda p: read_records(task, p), retries=RETRIES,
                         backoff=BACKOFF_S, timeout=TIMEOUT_S, where=f"${JGLUE_BASE_ENV}")


def _need(rec: dict, key: str, where: str):
    if key not in rec:
        raise ChibiError(f"{where} lacks field {key!r}; expected the official JGLUE {VERSION} format")
    return rec[key]


def read_records(task: str, path: Path) -> list[dict]:
    """Validated records of a JGLUE file (see the module docstring): the one parser of JGLUE data."""
    path = Path(path)
    if task not in TASKS:
        raise ChibiError(f"unknown JGLUE task {task!r}; use one of {TASKS}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChibiError(f"JGLUE {task} file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ChibiError(f"JGLUE {task} file {path} is not UTF-8 ({e}); replace it with the official file") from None
    if task == "jsquad":
        try:  # a whole-file JSON document with "data" is SQuAD format; anything else is JSON lines
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and "data" in doc:
            return _squad_records(doc, path)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChibiError(f"JGLUE {task} file {path} line {n} is not valid JSON ({e}); replace it with the "
                             "official file (delete a downloaded one to re-download it)") from None
        where = f"JGLUE {task} {path.name} line {n}"
        if not isinstance(r, dict):
            raise ChibiError(f"{where} is not a JSON object; expected the official JGLUE {VERSION} format")
        if task == "jcommonsenseqa":
            for k in range(5):
                _need(r, f"choice{k}", where)
            label = _need(r, "label", where)
            if not isinstance(label, int) or not 0 <= label < 5:
                raise ChibiError(f"{where}: label {label!r} is not 0-4")
            _need(r, "question", where)
        elif task == "jnli":
            if _need(r, "label", where) not in NLI_WORDS:
                raise ChibiError(f"{where}: label {r['label']!r} is not one of {list(NLI_WORDS)}")
            _need(r, "sentence1", where), _need(r, "sentence2", where)
        elif task == "jsts":
            label = _need(r, "label", where)
            if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 5:
                raise ChibiError(f"{where}: similarity {label!r} is not a number in 0-5")
            _need(r, "sentence1", where), _need(r, "sentence2", where)
        else:  # jsquad, already flattened
            r = _squad_record(r.get("id"), r.get("title", ""), _need(r, "context", where), _need(r, "question", where),
                              _answer_texts(_need(r, "answers", where)), r.get("is_impossible", False), where)
        rows.append(r)
    if not rows:
        raise ChibiError(f"JGLUE {task} file {path} holds no records; replace it with the official file")
    return rows


def _answer_texts(answers) -> list:
    if isinstance(answers, dict):
        return list(answers.get("text") or [])
    if isinstance(answers, list):
        return [a.get("text") if isinstance(a, dict) else a for a in answers]
    return []


def _squad_record(qid, title, context, question, answers: list, impossible, where: str) -> dict:
    if impossible or not answers or not all(isinstance(a, str) and a for a in answers):
        raise ChibiError(f"{where}: question {qid} has no answer text; every JSQuAD question is answerable")
    return {"id": qid, "title": title, "context": context, "question": question, "answers": answers}


def _squad_records(doc: dict, path: Path) -> list[dict]:
    try:
        rows = []
        for article in doc["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    rows.append(_squad_record(qa["id"], article.get("title", ""), para["context"], qa["question"],
                                              _answer_texts(qa["answers"]), qa.get("is_impossible"), f"JSQuAD {path}"))
    except (KeyError, TypeError, AttributeError) as e:
        raise ChibiError(f"JSQuAD file {path} is not in SQuAD format (missing {e})") from None
    if not rows:
        raise ChibiError(f"JSQuAD file {path} holds no questions")
    return rows


# ----------------------------------------------------------------------------------------------
# Records -> chat items


def jcqa_item(r: dict) -> dict:
    return categorical_item(r["question"], [r[f"choice{k}"] for k in range(5)], r["label"], lang="ja", id=r.get("q_id"))


def jnli_item(r: dict) -> dict:
    words = list(NLI_WORDS.values())
    question = f"前提：{r['sentence1']}\n仮説：{r['sentence2']}\n前提に対して仮説は含意・矛盾・中立のどれですか？"
    return categorical_item(question, words, words.index(NLI_WORDS[r["label"]]), lang="ja",
                            id=r.get("sentence_pair_id"), label=r["label"])


def jsts_item(r: dict) -> dict:
    score = float(r["label"])
    user = f"次の二つの文の意味がどれくらい似ているかを0から5の数で答えてください。\n文1：{r['sentence1']}\n文2：{r['sentence2']}"
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": f"{score:.1f}"}],
            "score": score, "id": r.get("sentence_pair_id")}


def jsquad_item(r: dict) -> dict:
    user = f"{r['context']}\n\n質問：{r['question']}\n本文から抜き出して答えてください。"
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["answers"][0]}],
            "answers": r["answers"], "id": r["id"]}


def jsquad_prediction(completion: str) -> str:
    """The answer a completion gives: its first non-empty line, stripped (base and chat models alike)."""
    lines = [ln.strip() for ln in completion.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def jsquad_scores(completion: str, answers: list[str]) -> tuple[str, float, float]:
    """(prediction, exact match, character F1) of a completion against the gold answers, with JGLUE's
    normalisation: the single JSQuAD scoring of `eval jglue` and `eval chat`."""
    from chibichat.eval.metrics import char_f1, exact_match

    pred = jsquad_prediction(completion)
    return pred, exact_match(pred, answers), char_f1(pred, answers)


_NUM = re.compile(r"-?\d+(?:\.\d+)?")


class JSTS(ListTask):
    def evaluate(self, item, completion_text):
        m = _NUM.search(unicodedata.normalize("NFKC", completion_text))
        return m is not None and abs(float(m.group(0)) - item["score"]) <= 0.5


class JSQuAD(ListTask):
    def evaluate(self, item, completion_text):
        return jsquad_scores(completion_text, item["answers"])[1] == 1.0


def jglue_task(task: str, home, split: str = "valid") -> ListTask:
    home = home if isinstance(home, Home) else Home.resolve(home)
    records = read_records(task, fetch_jglue(home, task, split))
    kw = {"lang": "ja", "description": f"JGLUE {task} {VERSION} {split}", "eval_only": split == "valid"}
    if task == "jcommonsenseqa":
        return ListTask(task, "categorical", [jcqa_item(r) for r in records], **kw)
    if task == "jnli":
        return ListTask(task, "categorical", [jnli_item(r) for r in records], **kw)
    if task == "jsts":
        return JSTS(task, "generative", [jsts_item(r) for r in records], **kw)
    return JSQuAD(task, "generative", [jsquad_item(r) for r in records], **kw)
