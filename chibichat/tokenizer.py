"""Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken, saved without pickle.

Layout of ids: 0..255 are the raw bytes, then the learned merges in the order they were learned,
then the 9 special tokens (ids V-9..V-1). Ordinary text is encoded with tiktoken's
`encode_ordinary`, so a document that literally contains "<|bos|>" is encoded as the bytes of
that string and can never smuggle a special token into a training row.

Three pre-split patterns are available (`split`):
  gpt4       GPT-4's cl100k pattern with nanochat's digit rule (runs of 1-2 digits, which nanochat
             found the best of 1/2/3). Under it a Japanese clause is one `\\p{L}+` chunk
             (mean ~17 bytes, max ~300 on embedded-ja); long, mostly unique chunks are what make BPE
             training slow and memory-hungry on Japanese.
  ja         (default for ja/mixed corpora) bunsetsu-like chunks: a Han or Katakana(+ー) run (up to
             10) with up to 3 hiragana after it (particles, okurigana: 東京都に / 住んでい|る / コーヒーを),
             or a hiragana run (up to 6); optionally led by one non-letter (space, 「) and ended by up to
             two closing marks and their line breaks (私は、 / ます。\\n); each part capped (JA_*_CAP).
             Splitting where a new content word starts keeps the merges that pay (word + particle +
             punctuation) and drops the clause-long chunks.
  ja-script  break at every script change (Han | Hiragana | Katakana), runs capped at
             JA_SCRIPT_CAP: the fastest and lightest to train, but it forbids word+particle tokens,
             so it compresses in-domain Japanese noticeably worse. For corpora too big for `ja`.
English text is split identically by all three. The figures behind the choice of `ja` (training CPU
time and held-out bytes/token of ~50 variants) are in docs/benchmarks.md. Trainer: rustbpe over Hugging
Face `tokenizers`: for an equal number of merges on the same text and pre-split it used less CPU time and
gave the same bytes/token.
"""

from __future__ import annotations

import base64
import hashlib
import operator
import time
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Iterator

from chibichat.common import ChibiError, atomic_directory, atomic_write_bytes, read_json, recover_aside

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

# The smallest vocabulary that still holds every byte and every special token.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

FORMAT = "chibichat-tokenizer-v1"
META_FILE = "tokenizer.json"
RANKS_FILE = "tokenizer.tiktoken"

# Pieces of the GPT-4 pattern, shared by every split; only the letter-run branch differs (the
# Japanese splits keep Japanese scripts out of it, see _NON_JA_LETTER).
_CONTRACTIONS = r"'(?i:[sdmt]|ll|ve|re)"
_DIGITS = r"\p{N}{1,2}"
_PUNCT = r" ?[^\s\p{L}\p{N}]++[\r\n]*"
_SPACES = r"\s*[\r\n]|\s+(?!\S)|\s+"

GPT4_PATTERN = "|".join(
    [_CONTRACTIONS, r"[^\r\n\p{L}\p{N}]?+\p{L}+", _DIGITS, _PUNCT, _SPACES]
)

# Japanese script classes. 々 and 〆 are Han-like marks; ー (U+30FC, script Common) lengthens
# katakana words, so it belongs to katakana (and hiragana) runs.
_HAN = r"[\p{Han}々〆]"
_KANA = r"[\p{Katakana}ー]"
_HIRA = r"[\p{Hiragana}ー]"  # ー also lengthens hiragana (すごーい)
# Letters that are not Japanese: "a letter, and not Han/Hiragana/Katakana". Without this the generic
# letter run `\p{L}+` would swallow Japanese before the Japanese alternatives are tried.
_NON_JA_LETTER = r"[^\P{L}\p{Han}\p{Hiragana}\p{Katakana}ー々〆]"
_LEAD = r"[^\r\n\p{L}\p{N}]?+"  # one optional leading non-letter, as in GPT-4's letter runs
JA_SCRIPT_CAP = 6

# The `ja` split's caps (characters). Chosen by a sweep on 2M chars of embedded-ja, vocab 8192
# (figures in docs/benchmarks.md): shorter caps train faster but cost compression, longer ones the
# reverse; these are the knee of that curve.
JA_CONTENT_CAP = 10  # a Han or Katakana run (most words are 1-6; longer runs are compounds)
JA_TAIL_CAP = 3  # hiragana kept after a content run: particles and okurigana (東京で / 食べる)
JA_HIRA_CAP = 6  # a run of hiragana on its own (ことがで|きる)
JA_CLOSE_CAP = 2  # closing punctuation kept at the end of a chunk (です。 / 」。)
# Punctuation that ends a Japanese phrase: it follows the word (は、 / ます。) rather than leading the
# next one, so it joins the end of the chunk. ASCII forms included for mixed-width text.
_JA_CLOSE = r"[、。，．！？」』）)】〉》”’!?,.]"


def _with_japanese(runs: list[str]) -> str:
    return "|".join([_CONTRACTIONS, _LEAD + _NON_JA_LETTER + "+", *runs, _DIGITS, _PUNCT, _SPACES])


def ja_pattern(content: int = JA_CONTENT_CAP, tail: int = JA_TAIL_CAP, hira: int = JA_HIRA_CAP,
               close: int = JA_CLOSE_CAP) -> str:
    """The `ja` split: bunsetsu-like chunks, every part capped.

    A chunk is [one leading non-letter] + (Han run | Katakana run) + up to `tail` hiragana, or a
    hiragana run, then up to `close` closing punctuation marks and the line breaks after them.
    Four choices are about training speed, not just compression:
      - the Japanese runs come first in the alternation: most chunks of Japanese text are Japanese,
        so the regex engine stops trying alternatives sooner;
      - the three Japanese runs share one lead and one ending inside a single group, so the
        backtracking VM (fancy-regex, needed for GPT-4's one lookahead) hands them to the fast
        regex engine as one sub-match instead of trying three branches (less training CPU; the
        chunks are identical: leftmost-first alternation order is kept, tested);
      - leads and runs are greedy, not possessive (`?` rather than GPT-4's `?+`): the classes that
        follow are disjoint from the lead, so the matches are the same, but without possessive
        quantifiers fancy-regex delegates these branches to the fast engine (less split time);
      - every part is capped, which bounds chunk length and the number of distinct chunks.
    """
    lead = r"[^\r\n\p{L}\p{N}]?"
    end = f"(?:{_JA_CLOSE}{{1,{close}}}[\\r\\n]*)?"
    tail_run = f"{_HIRA}{{0,{tail}}}"
    runs = f"{_HAN}{{1,{content}}}{tail_run}|{_KANA}{{1,{content}}}{tail_run}|{_HIRA}{{1,{hira}}}"
    return "|".join([
        f"{lead}(?:{runs}){end}",
        _CONTRACTIONS, lead + _NON_JA_LETTER + "+", _DIGITS, r" ?[^\s\p{L}\p{N}]+[\r\n]*", _SPACES,
    ])


def ja_script_pattern(cap: int = JA_SCRIPT_CAP) -> str:
    """The `ja-script` split: one chunk per script run, each at most `cap` chars."""
    return _with_japanese([f"{_HAN}{{1,{cap}}}", f"{_HIRA}{{1,{cap}}}", f"{_KANA}{{1,{cap}}}"])


JA_PATTERN = ja_pattern()

# Read-only: a split name must always mean the same regex for newly trained tokenizers. A saved
# tokenizer records its own pattern (and hashes it), so one trained under an earlier definition of a
# name (e.g. the first `ja`, see tests) still loads and encodes exactly as it was trained.
SPLIT_PATTERNS = MappingProxyType({"gpt4": GPT4_PATTERN, "ja": JA_PATTERN, "ja-script": ja_script_pattern()})
# The split name of a tokenizer whose pattern is none of SPLIT_PATTERNS (an imported one, e.g. GPT-2's):
# it runs its own saved pattern; the name only says that no chibichat split describes it.
CUSTOM_SPLIT = "custom"


def check_no_surrogate(text: str, what: str) -> None:
    """Refuse a str holding a surrogate code point (U+D800..U+DFFF): half of a UTF-16 pair, e.g. from a
    JSON escape "\\ud800" without its partner. It is no character and has no UTF-8 bytes."""
    if isinstance(text, str) and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # strict UTF-8 fails on surrogates only
            raise ChibiError(
                f"{what} has a lone surrogate U+{ord(text[e.start]):04X} at character {e.start} (half of a UTF-16 "
                "pair, e.g. a JSON \\ud800 escape without its partner): it is no Unicode character and cannot be "
                "encoded; remove it or fix the text's encoding") from None


class TooLittleText(ChibiError):
    """The training text yields fewer merges than the vocabulary needs: `chars` of text gave `merges` of `needed`."""

    def __init__(self, message: str, chars: int, merges: int, needed: int):
        super().__init__(message)
        self.chars, self.merges, self.needed = chars, merges, needed


def _ranks_hash(pattern: str, ranks: list[bytes], specials: dict[str, int]) -> str:
    """sha256 over everything that decides which ids a text gets: pattern, merges, specials."""
    h = hashlib.sha256()
    h.update(pattern.encode("utf-8") + b"\n")
    for token in ranks:
        h.update(base64.b64encode(token) + b"\n")
    for name, i in specials.items():
        h.update(f"{name} {i}\n".encode("utf-8"))
    return h.hexdigest()


class Tokenizer:
    """A trained tokenizer. Build with `train_tokenizer` or `Tokenizer.load`."""

    def __init__(self, ranks: list[bytes], split: str, pattern: str | None = None):
        """`ranks[i]` is the byte string of token id i (i < number of merges + 256)."""
        import tiktoken

        if split == CUSTOM_SPLIT and pattern is None:
            raise ChibiError(f"a tokenizer with split {CUSTOM_SPLIT!r} needs its pattern")
        if split not in SPLIT_PATTERNS and split != CUSTOM_SPLIT:
            raise ChibiError(f"unknown tokenizer split {split!r}; choose one of {sorted(SPLIT_PATTERNS)}")
        self.split = split
        self.pattern = SPLIT_PATTERNS[split] if pattern is None else pattern
        self._ranks = list(ranks)
        n = len(self._ranks)
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self._specials = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        try:
            self._enc = tiktoken.Encoding(
                name=f"chibichat-{split}-{self.vocab_size}",
                pat_str=self.pattern,
                mergeable_ranks={tok: i for i, tok in enumerate(self._ranks)},
                special_tokens=self._specials,
            )
        except ValueError as e:  # tiktoken rejects a bad regex or duplicate ranks
            raise ChibiError(f"tokenizer cannot be built: {e}. Retrain it with `chibichat tokenizer train`.") from None
        self.bos_id = self._specials["<|bos|>"]
        self.hash = _ranks_hash(self.pattern, self._ranks, self._specials)
        # How it was trained (text size, time, corpus): saved in tokenizer.json for the report,
        # not part of the hash (two trainings that learn the same merges are the same tokenizer).
        self.training: dict = {}

    # -- ids ---------------------------------------------------------------------------------

    def special_id(self, name: str) -> int:
        try:
            return self._specials[name]
        except KeyError:
            raise ChibiError(f"{name!r} is not a special token; the specials are {SPECIAL_TOKENS}") from None

    @property
    def special_ids(self) -> set[int]:
        return set(self._specials.values())

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids. Special-token strings in `text` are encoded as plain bytes. A surrogate
        code point is refused (ChibiError), not replaced: tiktoken would encode it as U+FFFD."""
        check_no_surrogate(text, "the text")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        texts = list(texts)
        for k, text in enumerate(texts):
            check_no_surrogate(text, f"text {k} of the batch")
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        """Ids to text; a byte sequence that is not valid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        """Ids to raw bytes: a streamer can hold back an incomplete UTF-8 tail."""
        ids = list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):  # tiktoken: unknown id, negative or huge id, non-integer
            ids_are = f"this tokenizer's ids are the integers 0..{self.vocab_size - 1}"
            for i in ids:
                try:
                    j = operator.index(i)
                except TypeError:
                    raise ChibiError(f"token id {i!r} is not an integer; {ids_are}") from None
                if j < 0:
                    raise ChibiError(f"token id {j} is negative; {ids_are}") from None
                if j >= self.vocab_size:
                    raise ChibiError(
                        f"token id {j} is outside this tokenizer's vocabulary of {self.vocab_size}: the model and the "
                        "tokenizer do not belong together (retrain or load the tokenizer the model was trained with)"
                    ) from None
            raise

    def id_to_bytes(self, i: int) -> bytes:
        return self._enc.decode_single_token_bytes(i)

    def token_byte_lengths(self) -> list[int]:
        """Byte length of every id, counted from the raw token bytes; 0 for specials (bpb skips them)."""
        return [len(t) for t in self._ranks] + [0] * len(SPECIAL_TOKENS)

    def token_bytes(self):
        """int32 tensor (V,) of `token_byte_lengths()`, the denominator of bits-per-byte."""
        import torch

        return torch.tensor(self.token_byte_lengths(), dtype=torch.int32)

    # -- persistence -------------------------------------------------------------------------

    def meta(self) -> dict:
        return {
            "format": FORMAT,
            "split": self.split,
            "pattern": self.pattern,
            "vocab_size": self.vocab_size,
            "num_merges": len(self._ranks) - 256,
            "special_tokens": dict(self._specials),
            "hash": self.hash,
            "training": dict(self.training),
        }

    def save(self, directory) -> None:
        """Write tokenizer.json + tokenizer.tiktoken as one atomic directory replacement.

        Replacing the directory as a whole also discards files that described an older tokenizer
        (e.g. its eval.json), which would otherwise sit beside a tokenizer they do not describe.
        """
        import json

        lines = b"".join(base64.b64encode(tok) + b" %d\n" % i for i, tok in enumerate(self._ranks))
        with atomic_directory(directory) as tmp:
            atomic_write_bytes(Path(tmp) / RANKS_FILE, lines)
            atomic_write_bytes(
                Path(tmp) / META_FILE, (json.dumps(self.meta(), indent=2, ensure_ascii=False) + "\n").encode()
            )

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        directory = Path(directory)
        fix = "Re-create it with `chibichat tokenizer train`."
        recover_aside(directory)  # a replacement (save) cut off by a crash left the old one aside
        if not directory.is_dir():
            raise ChibiError(f"no tokenizer at {directory}. Train one with `chibichat tokenizer train`.")
        meta = read_json(directory / META_FILE, "tokenizer metadata")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ChibiError(f"{directory / META_FILE} is not a {FORMAT} file. {fix}")
        for key, typ in (("split", str), ("pattern", str), ("vocab_size", int), ("special_tokens", dict), ("hash", str)):
            if not isinstance(meta.get(key), typ):
                raise ChibiError(f"{directory / META_FILE}: field {key!r} missing or not a {typ.__name__}. {fix}")
        ranks = _read_ranks(directory / RANKS_FILE, fix)
        if meta["vocab_size"] != len(ranks) + len(SPECIAL_TOKENS):
            raise ChibiError(
                f"{directory}: tokenizer.json says vocab_size {meta['vocab_size']} but tokenizer.tiktoken holds "
                f"{len(ranks)} tokens + {len(SPECIAL_TOKENS)} specials. The two files do not belong together. {fix}"
            )
        expected_specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        if meta["special_tokens"] != expected_specials:
            raise ChibiError(f"{directory / META_FILE}: special tokens do not match {SPECIAL_TOKENS} at ids V-9..V-1. {fix}")
        tok = cls(ranks, split=meta["split"], pattern=meta["pattern"])
        if tok.hash != meta["hash"]:
            raise ChibiError(f"{directory}: tokenizer hash mismatch (files edited or mixed from two runs). {fix}")
        tok.training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
        return tok


def _read_ranks(path: Path, fix: str) -> list[bytes]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ChibiError(f"tokenizer ranks not found: {path}. {fix}") from None
    ranks: list[bytes] = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected '<base64 token> <rank>'")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except ValueError as e:
            raise ChibiError(f"{path} line {lineno} is corrupt ({e}). {fix}") from None
        if rank != len(ranks):
            raise ChibiError(f"{path} line {lineno}: rank {rank}, expected {len(ranks)} (ranks must be 0,1,2,...). {fix}")
        ranks.append(token)
    if sorted(ranks[:256]) != [bytes([b]) for b in range(256)]:
        raise ChibiError(f"{path}: the first 256 ranks must be the 256 single bytes. {fix}")
    if len(set(ranks)) != len(ranks):
        raise ChibiError(f"{path}: duplicate tokens. {fix}")
    return ranks


class _Counted:
    """Iterator wrapper that counts documents, characters and pre-split chunks; rejects non-strings and lone
    surrogates loudly.

    The chunk statistics (how many chunks, how many distinct, their bytes) are what BPE training
    cost depends on, so `tokenizer train` reports them. rustbpe does not expose its chunk map, so the
    text is split a second time here with the same pattern; that time is kept apart (`stats_seconds`)
    so the training rate is the trainer's own.
    """

    def __init__(self, texts: Iterable[str], pattern: str):
        import regex

        self._it = iter(texts)
        self._rx = regex.compile(pattern)
        self.docs = 0
        self.chars = 0
        self.bytes = 0
        self.chunks = 0
        self.unique: set[str] = set()
        self.stats_seconds = 0.0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        text = next(self._it)
        if not isinstance(text, str):
            raise ChibiError(f"tokenizer training text #{self.docs} is a {type(text).__name__}, not a str")
        t0 = time.perf_counter()
        try:
            nbytes = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate, on which rustbpe stops with a bare UnicodeEncodeError
            check_no_surrogate(text, f"tokenizer training text #{self.docs}")
            raise
        chunks = self._rx.findall(text)
        self.chunks += len(chunks)
        self.unique.update(chunks)
        self.bytes += nbytes
        self.stats_seconds += time.perf_counter() - t0
        self.docs += 1
        self.chars += len(text)
        return text

    def chunk_stats(self) -> dict:
        return {
            "chunks": self.chunks,
            "unique_chunks": len(self.unique),
            # every character lands in exactly one chunk, so total bytes / chunks is the mean
            "mean_chunk_bytes": round(self.bytes / max(self.chunks, 1), 2),
            "max_chunk_bytes": max((len(c.encode("utf-8")) for c in self.unique), default=0),
        }


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MiB (None where `resource` is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 2**10, 1)


def train_ranks(texts: Iterable[str], vocab_size: int, pattern: str) -> list[bytes]:
    """The raw rustbpe call: token bytes by rank for `vocab_size - 9` ids. No validation (see train_tokenizer)."""
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
    return [bytes(tok) for tok, _ in sorted(trainer.get_mergeable_ranks(), key=lambda kv: kv[1])]


def train_tokenizer(texts: Iterable[str], vocab_size: int, split: str = "gpt4") -> Tokenizer:
    """Learn `vocab_size - 256 - 9` merges from `texts` with rustbpe and return the tokenizer.

    Raises ChibiError for a vocabulary too small to hold bytes + specials, an unknown split, a text
    that is not a str or holds a lone surrogate, an empty corpus, or a corpus too small to yield the requested number of merges (rustbpe would
    silently stop early, leaving a smaller vocabulary than the model was sized for).
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ChibiError(
            f"vocab size {vocab_size} is too small: it must hold 256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens, i.e. be at least {MIN_VOCAB_SIZE} (8192 or more is typical)"
        )
    if split not in SPLIT_PATTERNS:
        raise ChibiError(f"unknown tokenizer split {split!r}; choose one of {sorted(SPLIT_PATTERNS)}")
    counted = _Counted(texts, SPLIT_PATTERNS[split])
    t0 = time.perf_counter()
    ranks = train_ranks(counted, vocab_size, SPLIT_PATTERNS[split])
    seconds = time.perf_counter() - t0 - counted.stats_seconds
    if counted.chars == 0:
        raise ChibiError(
            f"tokenizer training text is empty ({counted.docs} documents, 0 characters); "
            "check the corpus (`chibichat data list`) or --max-chars"
        )
    want = vocab_size - len(SPECIAL_TOKENS)
    if len(ranks) != want:
        raise TooLittleText(
            f"the training text ({counted.chars:,} chars) only supports {len(ranks) - 256} merges but vocab size "
            f"{vocab_size} needs {want - 256}; give more text (--max-chars) or a smaller --vocab-size "
            f"({len(ranks) + len(SPECIAL_TOKENS)} or less)", counted.chars, len(ranks) - 256, want - 256,
        )
    tok = Tokenizer(ranks, split=split)
    # seconds include pulling the text from `texts` (e.g. decompressing a corpus): the rate a user sees;
    # they exclude the second split that measures the chunks (stats_seconds)
    tok.training = {
        "docs": counted.docs,
        "chars": counted.chars,
        "bytes": counted.bytes,
        "seconds": round(seconds, 3),
        "chars_per_s": round(counted.chars / max(seconds, 1e-9)),
        **counted.chunk_stats(),
        "stats_seconds": round(counted.stats_seconds, 3),
        # the whole process's peak (Python, the text, rustbpe's chunk map and pair index), not training alone
        "peak_rss_mb": peak_rss_mb(),
    }
    return tok


# ---------------------------------------------------------------------------------------------
# Text for training and evaluating tokenizers (used by `tokenizer train|eval` and `bench tokenizer`)

# Shipped eval samples (chibichat/data/assets/tokenizer_eval/, written for this package).
SAMPLES = [
    ("English prose", "en_prose.txt"),
    ("Python code", "code.txt"),
    ("LaTeX math", "math.txt"),
    ("Japanese prose", "ja_prose.txt"),
]


def shipped_samples() -> dict[str, str]:
    from importlib.resources import files

    root = files("chibichat.data.assets") / "tokenizer_eval"
    return {kind: (root / fname).read_text(encoding="utf-8") for kind, fname in SAMPLES}


def corpus_slice(corpus, split: str, home, max_chars: int, doc_cap: int | None, stats: dict, progress=None):
    """Whole documents of `split` until `max_chars` characters; each document capped at `doc_cap`.

    `stats` is filled in as it goes (docs, chars, capped, exhausted) so the caller can report exactly
    what was used. A generator, so rustbpe can pull text while it counts.
    """
    stats.update(docs=0, chars=0, capped=0, exhausted=True)
    for doc in corpus.iter_documents(split, home):
        if stats["chars"] >= max_chars:
            stats["exhausted"] = False
            break
        if doc_cap is not None and len(doc) > doc_cap:
            doc = doc[:doc_cap]
            stats["capped"] += 1
        stats["docs"] += 1
        stats["chars"] += len(doc)
        if progress is not None:
            progress.update(len(doc))
        yield doc
