"""Reading the task data that ships inside the package (chibichat/tasks/assets/).

Shipped files are gzip-compressed JSON lines written by scripts/build_tasks.py, with a manifest.json
(sources, versions, sha256, counts) and NOTICE/LICENSES beside them. Nothing here downloads.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

from chibichat.common import ChibiError

ASSETS = Path(__file__).resolve().parent / "assets"


def asset_path(name: str) -> Path:
    return ASSETS / name


def read_jsonl_gz(path: str | Path, what: str) -> list[dict]:
    """All records of a .jsonl.gz file; a missing or corrupt file is a ChibiError naming it."""
    path = Path(path)
    if not path.exists():
        raise ChibiError(
            f"{what} data file {path} is missing; reinstall chibichat or rebuild the shipped tasks with "
            "`python scripts/build_tasks.py`"
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, zlib.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChibiError(f"{what} data file {path} is corrupt ({e}); reinstall chibichat or rebuild it "
                         "with `python scripts/build_tasks.py`") from None
    if not rows:
        raise ChibiError(f"{what} data file {path} holds no items; rebuild it with scripts/build_tasks.py")
    return rows


def read_shipped(name: str, what: str | None = None) -> list[dict]:
    """Records of assets/<name>.jsonl.gz."""
    return read_jsonl_gz(asset_path(f"{name}.jsonl.gz"), what or name)


def read_lines_gz(name: str) -> list[str]:
    path = asset_path(name)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except FileNotFoundError:
        raise ChibiError(f"word list {path} is missing; reinstall chibichat or run scripts/build_tasks.py") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ChibiError(f"word list {path} is corrupt ({e}); run scripts/build_tasks.py") from None
    if not lines:
        raise ChibiError(f"word list {path} is empty; run scripts/build_tasks.py")
    return lines


def manifest() -> dict:
    from chibichat.common import read_json

    return read_json(asset_path("manifest.json"), "shipped task manifest")
