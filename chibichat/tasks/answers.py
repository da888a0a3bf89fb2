"""Reading a final answer out of a completion, shared by every task that ends in "#### <number>".

The convention (GSM8K's, kept for arithmetic, letter counting and RL rewards): the answer is the number
written after the last "####" marker. Commas used as thousands separators are ignored; a trailing
period is ignored; everything else must match exactly (as a number).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A signed integer or decimal, optionally with thousands commas: -1,234.50
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_number(text: str) -> str | None:
    """The number after the last '####' in text (commas removed), or None if there is none."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    m = _NUMBER.search(text, idx + 4)
    if m is None or text[idx + 4 : m.start()].strip():
        return None  # "#### maybe 3" is not an answer
    return m.group(0).replace(",", "")


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
