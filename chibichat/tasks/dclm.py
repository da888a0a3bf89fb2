"""The real DCLM CORE bundle (online): download once, read the 22 tasks straight from the zip.

Layout (the bundle nanochat uses, `eval_bundle.zip`): one top folder holding
    core.yaml            icl_tasks: a list of {label, dataset_uri, num_fewshot: [K, ...], icl_task_type,
                         continuation_delimiter (optional, default " ")}
    eval_meta_data.csv   one row per task: "Eval Task" (= label), "Random baseline" (percent), ...
    eval_data/<dataset_uri>   JSON lines, by icl_task_type:
        multiple_choice    {"query", "choices": [str], "gold": int}
        schema             {"context_options": [str], "continuation", "gold": int}
        language_modeling  {"context", "continuation"}

Bundle items become chibichat "core" items (tasks/base.py) with the delimiter ending the context, so
the text is DCLM's (query + delim + choice; context option + delim + continuation; trimmed context +
delim + continuation) and so are the scored tokens: only the choice or continuation, as DCLM's ICL
code scores them (a delimiter such as "\\nAnswer: " is shared by every choice and is no part of the
answer; eval/core.py moves the delimiter's trailing spaces onto the continuation, " Paris", as DCLM
gives the continuation its leading space). Few-shot K is the first entry of num_fewshot;
the random baseline is the CSV's percentage / 100. The zip is cached at home/data/core/eval_bundle.zip
and never extracted; eval_bundle.source.json beside it records the URL it came from, and another URL downloads
the bundle again. `chibichat eval base --core full` uses it (eval/core.py); the score is then
labelled "CORE" (and "CORE-lite" for the shipped subsets).
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import zipfile
from pathlib import Path

from chibichat.common import ChibiError
from chibichat.tasks.base import CoreTask

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
URL_SETTINGS = "--core-bundle-url or $CHIBICHAT_CORE_BUNDLE_URL"  # what chooses another URL (eval/core.py)
KINDS = ("multiple_choice", "schema", "language_modeling")


# ----------------------------------------------------------------------------------------------
# core.yaml: the bundle uses a small, fixed subset of YAML (a list of flat mappings whose values are
# scalars or one-line [lists], with # comments, also after a value as DCLM's task files write them:
# `continuation_delimiter: "\nAnswer: " # this separates ...`). It is parsed here, so the runtime needs
# no YAML library; anything outside that subset is refused by line rather than guessed at.


def _uncomment(line: str) -> str:
    """`line` without its YAML comment: from a '#' that starts the line or follows whitespace, outside a
    quoted string (a quote opens a string only where a value starts: first on the line, after '[' or ',', or
    after ': ' or '- ')."""
    quote, prev, i = None, "", 0
    while i < len(line):
        c = line[i]
        if quote:
            if quote == '"' and c == "\\":
                i += 1  # an escaped character, \" included
            elif c == quote:
                if quote == "'" and line[i + 1 : i + 2] == "'":
                    i += 1  # '' is a quote inside a single-quoted string
                else:
                    quote = None
        elif c in "\"'" and (prev in ("", "[", ",") or prev in (":", "-") and line[i - 1].isspace()):
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        if not c.isspace():
            prev = c
        i += 1
    return line


def _scalar(text: str, where: str):
    t = text.strip()
    if t.startswith('"'):
        try:
            return json.loads(t)  # YAML double-quoted escapes (\n, \t, \", \\, \uXXXX) are JSON's
        except json.JSONDecodeError:
            raise ChibiError(f"{where}: unsupported double-quoted string {t!r}") from None
    if t.startswith("'"):
        if len(t) < 2 or not t.endswith("'"):
            raise ChibiError(f"{where}: unterminated single-quoted string {t!r}")
        return t[1:-1].replace("''", "'")
    if t.startswith("["):
        if not t.endswith("]"):
            raise ChibiError(f"{where}: a [list] must close on the same line: {t!r}")
        inner = t[1:-1].strip()
        return [_scalar(x, where) for x in inner.split(",")] if inner else []
    if t in ("true", "True"):
        return True
    if t in ("false", "False"):
        return False
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def parse_core_yaml(text: str, what: str = "core.yaml") -> list[dict]:
    """The `icl_tasks` list of a DCLM core.yaml (other top-level keys are skipped)."""
    tasks: list[dict] | None = None
    top, current = None, None
    for n, line in enumerate(text.splitlines(), 1):
        line = _uncomment(line)
        if not line.strip():
            continue
        where = f"{what} line {n}"
        if not line[0].isspace() and not line.startswith("-"):  # a top-level key
            key, sep, rest = line.partition(":")
            if not sep:
                raise ChibiError(f"{where}: expected 'key:', got {line!r}")
            top, current = key.strip(), None
            if top == "icl_tasks":
                if rest.strip():
                    raise ChibiError(f"{where}: icl_tasks must be a block list ('- label: ...' lines)")
                tasks = []
            continue
        if top != "icl_tasks":
            continue  # content of a key we do not read
        body = line.strip()
        if body.startswith("-"):
            current = {}
            tasks.append(current)
            body = body[1:].strip()
            if not body:
                continue
        if current is None:
            raise ChibiError(f"{where}: a task field before the first '-' entry")
        key, sep, rest = body.partition(":")
        if not sep or not key.strip():
            raise ChibiError(f"{where}: expected 'key: value', got {body!r}")
        current[key.strip()] = _scalar(rest, where)
    if not tasks:
        raise ChibiError(f"{what} lists no icl_tasks; is this the DCLM eval bundle?")
    return tasks


# ----------------------------------------------------------------------------------------------
# The zip


def _root(z: zipfile.ZipFile) -> str:
    """The folder inside the zip that holds core.yaml ("" when it is at the top)."""
    hits = sorted((n for n in z.namelist() if posixpath.basename(n) == "core.yaml"), key=lambda n: n.count("/"))
    if not hits:
        raise ChibiError(f"{z.filename} holds no core.yaml; it is not a DCLM eval bundle (check --core-bundle-url)")
    return posixpath.dirname(hits[0])


def _read(z: zipfile.ZipFile, root: str, rel: str) -> str:
    name = posixpath.join(root, rel) if root else rel
    try:
        return z.read(name).decode("utf-8")
    except KeyError:
        raise ChibiError(f"{z.filename} lacks {name}; the bundle is incomplete (delete it to download again)") from None


def random_baselines(text: str, what: str = "eval_meta_data.csv") -> dict[str, float]:
    """{task label: random baseline as a fraction} from eval_meta_data.csv (percent column)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "Eval Task" not in rows[0] or "Random baseline" not in rows[0]:
        raise ChibiError(f"{what} needs the columns 'Eval Task' and 'Random baseline'")
    out = {}
    for r in rows:
        try:
            pct = float(r["Random baseline"])
        except (TypeError, ValueError):
            raise ChibiError(f"{what}: task {r['Eval Task']!r} has a non-numeric random baseline "
                             f"{r['Random baseline']!r}") from None
        if not 0.0 <= pct < 100.0:
            raise ChibiError(f"{what}: task {r['Eval Task']!r} random baseline {pct} is not a percentage in [0, 100)")
        out[r["Eval Task"]] = pct / 100.0
    return out


def convert_item(kind: str, row: dict, delim: str, where: str) -> dict:
    """A bundle row -> a chibichat "core" item (the delimiter ends the context: see the module docstring)."""
    need = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
            "language_modeling": ("context", "continuation")}[kind]
    missing = [k for k in need if k not in row]
    if missing:
        raise ChibiError(f"{where}: a {kind} row lacks {missing}")
    if kind == "multiple_choice":
        return {"type": kind, "context": row["query"] + delim, "continuations": list(row["choices"]),
                "gold": row["gold"]}
    if kind == "schema":
        return {"type": kind, "contexts": [c + delim for c in row["context_options"]],
                "continuation": row["continuation"], "gold": row["gold"]}
    return {"type": kind, "context": row["context"].strip() + delim, "continuation": row["continuation"]}


def load_bundle(path: str | Path) -> list[CoreTask]:
    """Every task of a bundle zip, in core.yaml order."""
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ChibiError(f"{path} is not a readable zip ({e}); delete it to download the bundle again") from None
    with z:
        root = _root(z)
        specs = parse_core_yaml(_read(z, root, "core.yaml"))
        baselines = random_baselines(_read(z, root, "eval_meta_data.csv"))
        tasks = []
        for k, spec in enumerate(specs):
            missing = [f for f in ("label", "dataset_uri", "num_fewshot", "icl_task_type") if f not in spec]
            if missing:
                raise ChibiError(f"core.yaml task #{k + 1} lacks {missing}")
            label, kind = str(spec["label"]), spec["icl_task_type"]
            if kind not in KINDS:
                raise ChibiError(f"core.yaml task {label!r}: icl_task_type {kind!r} is not one of {KINDS}")
            shots = spec["num_fewshot"]
            shots = shots[0] if isinstance(shots, list) and shots else shots
            if not isinstance(shots, int) or shots < 0:
                raise ChibiError(f"core.yaml task {label!r}: num_fewshot must be [K] with K >= 0, got {spec['num_fewshot']!r}")
            if label not in baselines:
                raise ChibiError(f"eval_meta_data.csv has no row for task {label!r} (its random baseline)")
            delim = spec.get("continuation_delimiter", " ")
            rel = posixpath.join("eval_data", str(spec["dataset_uri"]))
            items = []
            for n, line in enumerate(_read(z, root, rel).splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{rel} line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChibiError(f"{where} is not JSON ({e})") from None
                items.append(convert_item(kind, row, delim, where))
            if not items:
                raise ChibiError(f"{rel} (task {label!r}) holds no items")
            tasks.append(CoreTask(label, items, num_fewshot=shots, random_baseline=baselines[label],
                                  description=f"DCLM CORE {label} ({kind}, {shots}-shot)"))
    return tasks


def _valid_bundle(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise ValueError(f"member {bad} fails its CRC check")
        _root(z)


SOURCE_RECORD = "eval_bundle.source.json"  # beside the cached zip: {"url", "sha256"} of the zip


def _recorded_source(dest: Path, record: Path) -> tuple[str | None, str]:
    """(the URL the cached zip `dest` came from, else None and why that is unknown: no record, an unreadable one,
    or one stating another sha256, as an update stopped between writing the record and renaming the zip leaves)."""
    if not record.exists():
        return None, f"has no record of the URL it came from ({record.name})"
    try:
        rec = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"has an unreadable record {record.name} ({e})"
    if not isinstance(rec, dict) or not isinstance(rec.get("url"), str) or not isinstance(rec.get("sha256"), str):
        return None, f"has a record {record.name} without its \"url\" and \"sha256\" strings"
    from chibichat.common import sha256_file

    if sha256_file(dest) != rec["sha256"]:
        return None, f"is not the file its record {record.name} describes"
    return rec["url"], ""


def fetch_bundle(home, url: str = BUNDLE_URL) -> Path:
    """The bundle zip, downloaded into home/data/core/ on first use (resumable, validated, atomic), and again when
    `url` is not the one the cached zip came from (SOURCE_RECORD, _recorded_source; a zip with no record, cached
    before records were kept, counts as the default URL's), saying why on stderr. A new zip is downloaded beside
    the cached one and replaces it only once complete and valid."""
    import hashlib
    import os

    from chibichat.common import atomic_write_json, eprint, file_lock, fsync_renamed, sha256_file, write_error
    from chibichat.data.download import download_file

    if not url.startswith(("http://", "https://")):
        raise ChibiError(f"the CORE bundle URL ({URL_SETTINGS}) must be an http(s) URL, got {url!r}")
    dest = Path(home.data_dir) / "core" / "eval_bundle.zip"
    # The new zip's name is the URL's: what a stopped run left there (a .part to resume, a finished zip) is this URL's.
    fresh = dest.with_name(f"eval_bundle.{hashlib.sha256(url.encode()).hexdigest()[:16]}.zip")
    record = dest.with_name(SOURCE_RECORD)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.with_name(".eval_bundle.lock")):  # torchrun ranks all fetch it at once
        if dest.exists():
            source, why = _recorded_source(dest, record)
            if source == url or not record.exists() and url == BUNDLE_URL:  # a cache from before the records
                try:
                    _valid_bundle(dest)
                    return dest
                except Exception as e:
                    why = f"is not a valid bundle ({e})"
            elif source is not None:
                why = f"came from {source}"
            eprint(f"the cached CORE bundle {dest} {why}: downloading {url}")
        download_file(url, fresh, validate=_valid_bundle, where=URL_SETTINGS)
        # The record first, with the new zip's sha256: a stop before the rename leaves the old zip, which the
        # record then does not describe, so it is fetched again rather than taken for the new URL's.
        atomic_write_json(record, {"url": url, "sha256": sha256_file(fresh)})
        try:
            os.replace(fresh, dest)
        except OSError as e:
            raise write_error(dest, e) from None
        fsync_renamed(dest)
    return dest
