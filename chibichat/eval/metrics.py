"""The numbers every evaluation reports, written once and tested against hand-computed values.

Pure Python on purpose: these run on a few thousand items at most, and keeping torch/numpy out
makes them trivially checkable and importable anywhere (the report reads summaries with them too).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Sequence

from chibichat.common import ChibiError


def accuracy(correct: Sequence[bool | float]) -> float:
    """Mean of per-item scores (bools count 1/0; floats such as pass@1 estimates are averaged)."""
    if len(correct) == 0:
        raise ChibiError("accuracy of zero items is undefined: the task produced no scorable items")
    return sum(float(c) for c in correct) / len(correct)


def centered(acc: float, baseline: float) -> float:
    """Centered accuracy (acc - b) / (1 - b): 0 at chance, 1 at perfect, negative below chance.

    This is how CORE and ChatCORE put tasks with different numbers of choices on one scale.
    """
    if not 0.0 <= baseline < 1.0:
        raise ChibiError(f"random baseline must be in [0, 1), got {baseline}")
    return (acc - baseline) / (1.0 - baseline)


def _check_pair(x: Sequence[float], y: Sequence[float], what: str) -> None:
    if len(x) != len(y):
        raise ChibiError(f"{what}: the two series differ in length ({len(x)} vs {len(y)})")
    if len(x) < 2:
        raise ChibiError(f"{what} needs at least 2 items, got {len(x)}")


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation. NaN when either series is constant: correlation is then undefined
    (a model that predicts one similarity for every pair), and reporting 0 would be a made-up value."""
    _check_pair(x, y, "Pearson correlation")
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0.0 or syy == 0.0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks with ties given the mean of the ranks they span (the standard for Spearman)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        mean_rank = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            r[order[k]] = mean_rank
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation = Pearson correlation of the (tie-averaged) ranks."""
    _check_pair(x, y, "Spearman correlation")
    return pearson(ranks(x), ranks(y))


def normalize_answer_ja(text: str) -> str:
    """JSQuAD answer normalisation exactly as JGLUE's own evaluation does it (its patch to the SQuAD
    v1.1 metric of transformers' squad_metrics.py): lower-case; strip trailing "。"; split on
    whitespace and re-join with single spaces. Nothing else: no Unicode folding (full-width "１" and
    "1" differ), no punctuation removal (that step is disabled for Japanese), no English articles."""
    return " ".join(text.lower().rstrip("。").split())


def _golds(golds: Sequence[str], what: str) -> list[str]:
    """The gold answers as the SQuAD metric uses them: those that normalise to empty are left out, and
    an item with no other answer is scored against the empty string."""
    if not golds:
        raise ChibiError(f"{what} needs at least one gold answer; the item has none")
    kept = [g for g in golds if normalize_answer_ja(g)]
    return kept or [""]


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer (max over golds)."""
    p = normalize_answer_ja(prediction)
    return float(any(p == normalize_answer_ja(g) for g in _golds(golds, "exact match")))


def char_f1(prediction: str, golds: Sequence[str]) -> float:
    """Character-level F1 of the normalised strings (characters as a multiset; a kept single space
    counts as a character, as in JGLUE's metric), max over gold answers. An empty side scores 1.0
    if both are empty, else 0.0."""
    p = list(normalize_answer_ja(prediction))
    best = 0.0
    for g in _golds(golds, "F1"):
        gn = list(normalize_answer_ja(g))
        if not p or not gn:
            best = max(best, float(p == gn))
            continue
        common = sum((Counter(p) & Counter(gn)).values())
        if common == 0:
            continue
        precision, recall = common / len(p), common / len(gn)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ChibiError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


# ----------------------------------------------------------------------------------------------
# Result files: every eval writes its per-item rows and a summary the report reads.


def write_eval_outputs(out_dir, name: str, rows: list[dict], summary: dict | None) -> dict:
    """Write `<name>.csv` (the scalar columns), then `<name>.jsonl` (one row per item), each atomically, and
    merge the flat `summary` keys (e.g. "core", "core_label", "arc_easy") into `<out_dir>/summary.json`, which
    the report reads; other evals' keys already there are kept. summary=None writes only the per-item
    files (for a caller that writes summary.json itself). The .jsonl comes after the .csv because the speedrun
    takes it as an `eval skills` step's completion marker: a kill between the two must not leave the marker
    without the csv. Returns the paths written."""
    import csv
    import io
    import json
    from pathlib import Path

    from chibichat.common import atomic_write_text

    out_dir = Path(out_dir)
    cols = [k for k in (rows[0] if rows else {}) if all(not isinstance(r.get(k), (list, dict)) for r in rows)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    csv_path = out_dir / f"{name}.csv"
    atomic_write_text(csv_path, buf.getvalue())
    jsonl = out_dir / f"{name}.jsonl"
    atomic_write_text(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    paths = {"jsonl": str(jsonl), "csv": str(csv_path)}
    if summary is not None:
        paths["summary"] = str(merge_summary(out_dir, summary))
    return paths


def remove_eval_outputs(out_dir, name: str) -> list[str]:
    """Remove the `<name>.jsonl` and `<name>.csv` that write_eval_outputs wrote, where they exist: an
    evaluation whose summary keys are dropped takes its per-item files with them, which would otherwise
    describe another run than summary.json. Returns the paths removed."""
    from pathlib import Path

    removed = []
    for path in (Path(out_dir) / f"{name}.jsonl", Path(out_dir) / f"{name}.csv"):
        if path.exists():
            path.unlink()
            removed.append(str(path))
    return removed


def merge_summary(out_dir, summary: dict, drop=()):
    """Merge flat keys into `<out_dir>/summary.json` (shared by every eval of one checkpoint), after
    removing the keys in `drop` (an evaluation's earlier figures that the new ones supersede)."""
    from pathlib import Path

    from chibichat.common import atomic_write_json

    path = Path(out_dir) / "summary.json"
    merged = read_summary(out_dir)
    for key in drop:
        merged.pop(key, None)
    merged.update(summary)
    atomic_write_json(path, merged)
    return path


# Task records: `eval chat` (chat_eval) and `eval jglue` (jglue_eval) score a chosen set of tasks and record
# which, with the settings that make two runs one test. A run of some tasks keeps the earlier record's other
# tasks only when both runs are that one test; otherwise those tasks' keys and per-item files go, so that
# summary.json never shows a score its record does not explain (of another checkpoint, or other settings).


def read_summary(out_dir) -> dict:
    """`<out_dir>/summary.json` as a dict ({} when there is none yet)."""
    from pathlib import Path

    from chibichat.common import read_json

    path = Path(out_dir) / "summary.json"
    merged = read_json(path, "eval summary") if path.exists() else {}
    if not isinstance(merged, dict):
        raise ChibiError(f"{path} is not a JSON object; delete it and re-run the evaluations")
    return merged


def checkpoint_settings(meta: dict) -> dict:
    """The record settings naming a checkpoint: its path, step and meta.json's mtime (which a stage trained
    again rewrites, so a step scored before that is another checkpoint)."""
    from pathlib import Path

    return {"checkpoint": meta["checkpoint_dir"],
            "checkpoint_mtime_ns": (Path(meta["checkpoint_dir"]) / "meta.json").stat().st_mtime_ns,
            "step": meta["step"]}


def record_mismatch(earlier: dict, now: dict, names: Sequence[str]) -> list[str]:
    """The settings `names` in which an earlier record differs from this run's (`now`); a record written
    before a setting was kept differs in it."""
    return [k for k in names if earlier.get(k) != now[k]]


def carry_over(earlier: dict, now: dict, names: Sequence[str], earlier_tasks: Sequence[str],
               tasks: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """Which of an earlier record's tasks a run of `tasks` keeps: (kept, dropped, note). The ones it does not
    run again are kept when no setting of `names` differs (record_mismatch), else dropped, and `note` says
    which and why (None when nothing is dropped)."""
    others = [t for t in earlier_tasks if t not in set(tasks)]
    differ = record_mismatch(earlier, now, names)
    if not differ:
        return others, [], None
    note = (f"dropped the earlier scores of {', '.join(others)} from the record, with their per-item files: they "
            "were scored with other settings (" + ", ".join(f"{k} {earlier.get(k)!r}, now {now[k]!r}" for k in differ)
            + ")") if others else None
    return [], others, note


def write_record(out_dir, summary: dict, drop_keys, drop_stems, written_stems=()) -> list[str]:
    """Merge `summary` into summary.json after removing `drop_keys`, then remove the per-item files of the
    stems in `drop_stems` except those this run wrote (`written_stems`: two tasks may share a stem).
    Returns the paths removed."""
    merge_summary(out_dir, summary, drop=drop_keys)
    removed = []
    for stem in sorted(set(drop_stems) - set(written_stems)):
        removed += remove_eval_outputs(out_dir, stem)
    return removed


# Final answers: the number written after the last "####" (GSM8K's convention, kept for arithmetic,
# letter counting and RL rewards); thousands commas and a trailing period are ignored.
# A signed integer or decimal, optionally with thousands commas, each followed by exactly 3 digits:
# -1,234.50 (in "1,2,3" or "12,34" no comma is a thousands separator).
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER = re.compile("-?" + _UNSIGNED)
# Number characters a reply may write in another form are read as the ASCII ones (before any pattern here
# applies, by _ascii_number_text): every Unicode decimal digit (category Nd: full-width "７", Arabic-Indic "٣",
# Devanagari "३" ...), the full-width comma and full stop and the Arabic thousands and decimal separators
# ("１，２３４．５" in Japanese text, "٣٫٥" = 3.5), the full-width plus, and the minus signs U+2212 "−" and
# U+FF0D "－" and the hyphens U+2010 "‐" and U+2011 "‑" ("−7" is -7, and "5−2" joins two numbers as "5-2" does).
_ASCII_NUMBER_CHARS = str.maketrans("，．٬٫＋−－‐‑", ",.,.+----")
# What joins two numbers into a fraction, range, date or expression still to be worked out: "/", the fraction
# and division slashes "⁄" and "∕", "-", the en, em and figure dashes, the horizontal bar and the wave dashes of
# ranges ("3–5", "3—5", "3〜5", "3～5", "3~5"), "+", "*", "x", "X", "×", "·", "⋅", "÷", "^" ("3+4", "3x4",
# "10^5"), 分の ("4分の3" = 3/4) and から ("3から5", from 3 to 5).
_JOIN = r"(?:[/／⁄∕+*xX×·⋅÷^~〜～–—‒―\-]|分の|から)"
# The "####" number must be whole: only closing punctuation may come between it and whitespace or the
# end ("#### 20.", "#### 20 apples", "#### 1,234!"). "#### 3/4", "#### 1e3", "#### 2-3", "#### 7x", "#### 5万"
# and "#### 50%" write other values: they give no answer, not the value of their leading digits; nor does a
# number joined to another across spaces ("#### 3 / 4", "#### 7 - 5", "#### 3 x 4").
_FINAL_NUMBER = re.compile(_NUMBER.pattern + r"(?![ \t]*" + _JOIN + r"[ \t]*-?\d)"
                           + r"(?=[.,!?;:)\]}\"'*。、！？）」』”’]*(?:\s|\Z))")


def _ascii_number_text(text: str) -> str:
    """text with its number characters in ASCII (_ASCII_NUMBER_CHARS): "٣" and "３" are "3", "١٢" is "12". After
    it the pattern \\d (any Nd character) matches only 0-9, so a number is never returned in another script."""
    return re.sub(r"\d", lambda m: str(unicodedata.decimal(m.group())), text.translate(_ASCII_NUMBER_CHARS))


def extract_final_number(text: str) -> str | None:
    """The number after the last '####' in text (commas removed; the digits of any script, the full-width and
    Arabic separators and other minus signs read as ASCII: _ASCII_NUMBER_CHARS), or None if there is none or
    what follows it is not a whole number (see _FINAL_NUMBER)."""
    text = _ascii_number_text(text)
    idx = text.rfind("####")
    if idx < 0:
        return None
    m = _FINAL_NUMBER.match(text[idx + 4 :].lstrip())
    if m is None:
        return None  # "#### maybe 3" and "#### 3/4" are not an answer of 3
    return m.group(0).replace(",", "")


# In running text a "-" is a minus sign only where no digit or Latin letter comes right before it ("-5",
# "is -5", "(-5)", "答えは-5"); after a digit it joins two numbers ("2-3", "2024-01-15"), after a letter it is
# a hyphen ("GPT-4", "ＧＰＴ－４").
_PROSE_NUMBER = re.compile(r"(?:(?<![0-9A-Za-zＡ-Ｚａ-ｚ])-)?" + _UNSIGNED)
# A number as written in prose, with the exponent of scientific notation ("1e-5", "2.5E3") when it has one.
_PROSE_TOKEN = _PROSE_NUMBER.pattern + r"(?:[eE][+-]?\d+)?"
# A number joined to others by _JOIN (spaces allowed): a fraction ("3/4", "3 / 4", "4分の3" = 3/4), a range,
# a difference, a sum, a product or a date ("2-3", "3〜5", "3から5", "5 - 2", "3+4", "3x4", "2024/01/15"), read
# as one token so that its last part is never taken for the number written. A number may carry Latin letters
# written onto it before the join, a variable or a unit: "3x + 4", "5kg - 2kg", "12am-3pm" are joined too.
_NUMBER_OR_JOINED = re.compile(_PROSE_TOKEN + r"(?:[A-Za-z]*[ \t]*" + _JOIN + r"[ \t]*" + _PROSE_TOKEN + r")*")


def last_number(text: str) -> str | None:
    """The last number anywhere in text (commas removed; the digits of any script, the full-width and Arabic
    separators and the minus signs "−" and "－" read as ASCII: _ASCII_NUMBER_CHARS), or None: the fallback of
    replies without "####". Decimals are numbers ("it is 2.5" -> "2.5"). When the last number is joined to
    another (_NUMBER_OR_JOINED) or written in scientific notation there is no answer, as with "#### 3/4",
    "#### 2-3" or "#### 1e3": a fraction ("3/4", "4分の3") or "1e-5" is not a whole number, and "2-3", "ages 5-7",
    "3–5", "3—5", "3〜5", "3から5", "7 - 5 apples", "3x4", "3 × 4", "3x + 4", "5kg - 2kg" or "the answer is 5-2"
    writes a range, a product or a sum still to be worked out, neither its last part nor a negative number. A worked one still
    answers: "5-2=3" -> "3", "3 x 4 = 12" -> "12"; so does a number with no other number joined to it: "12 x",
    "x4", "4 times"."""
    found = _NUMBER_OR_JOINED.findall(_ascii_number_text(text))
    if not found or not _PROSE_NUMBER.fullmatch(found[-1]):
        return None
    return found[-1].replace(",", "")


def numbers_equal(a: str | None, b: str | None) -> bool:
    """True if both parse as the same decimal number ("72" == "72.0"); False if either is missing."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a.replace(",", "")) == Decimal(b.replace(",", ""))
    except InvalidOperation:
        return False


def final_line(text: str) -> str:
    """The last non-empty line, stripped, without a trailing full stop (ASCII or Japanese)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[-1].rstrip(".。")
