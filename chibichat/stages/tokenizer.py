"""`chibichat tokenizer train|eval`: train the BPE tokenizer on a corpus slice; measure its compression.

train  reads whole documents from the corpus train split until --max-chars characters (the slice),
       caps each document at --doc-cap characters (counted and reported), trains, and writes
       home/tokenizer/ atomically. --split auto picks the Japanese-aware split for ja/mixed corpora.
eval   bytes/token per text kind (shipped English prose, Python code, LaTeX math, Japanese prose, and
       the corpus val split) for our tokenizer and, where their files are cached locally, GPT-2 and
       GPT-4 (cl100k); writes home/tokenizer/eval.json.
"""

from __future__ import annotations

from chibichat.common import ChibiError, add_home_arg

# 2M characters trains in a few seconds on 2 CPU cores and already gives stable merges for an
# 8K vocabulary; real runs pass billions (nanochat: 2B).
DEFAULT_MAX_CHARS = 2_000_000
# nanochat's per-document cap: one huge document cannot dominate the pair statistics.
DEFAULT_DOC_CAP = 10_000
DEFAULT_VAL_CHARS = 500_000

# Reference encodings: tiktoken name and the files it needs (tiktoken caches them under the sha1
# of the URL). They are used only when already cached: eval never downloads.
_BLOB = "https://openaipublic.blob.core.windows.net"
REFERENCES = {
    "GPT-2": ("gpt2", [f"{_BLOB}/gpt-2/encodings/main/vocab.bpe", f"{_BLOB}/gpt-2/encodings/main/encoder.json"]),
    "GPT-4": ("cl100k_base", [f"{_BLOB}/encodings/cl100k_base.tiktoken"]),
}
# A corrupt cache file makes tiktoken try the network; never wait longer than this for it.
REFERENCE_LOAD_TIMEOUT_S = 20.0


def register(sub) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="train the BPE tokenizer / evaluate its compression",
        description="Train the byte-level BPE tokenizer (rustbpe) or evaluate bytes/token.",
    )
    actions = p.add_subparsers(dest="action", metavar="<action>")

    t = actions.add_parser("train", help="train on a corpus slice and save to home/tokenizer/")
    add_home_arg(t)
    t.add_argument("--corpus", default="embedded-en", help="corpus name (see `chibichat data list`) or local:/folder")
    t.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary incl. 256 bytes and 9 specials")
    t.add_argument(
        "--max-chars", type=int, default=DEFAULT_MAX_CHARS,
        help=f"characters of training text: whole documents are read until this many (default {DEFAULT_MAX_CHARS:,})",
    )
    t.add_argument(
        "--doc-cap", type=int, default=DEFAULT_DOC_CAP,
        help=f"use at most this many leading characters of each document (default {DEFAULT_DOC_CAP:,}; counted)",
    )
    t.add_argument(
        "--split", choices=("auto", "gpt4", "ja", "ja-script"), default="auto",
        help="pre-split regex: gpt4; ja (Japanese-aware: content word + particles); ja-script (break at every "
             "Japanese script change: fastest, compresses worse); auto = ja when the corpus is ja/mixed, else gpt4",
    )
    t.add_argument(
        "--overwrite", action="store_true",
        help="replace a tokenizer that existing checkpoints were trained with; the old one is moved to "
             "HOME/tokenizer.bak-<hash>/ (without this flag such a replacement is refused)",
    )
    t.set_defaults(func=run_train)

    e = actions.add_parser("eval", help="bytes/token per text kind vs GPT-2/GPT-4; writes home/tokenizer/eval.json")
    add_home_arg(e)
    e.add_argument("--corpus", default=None, help="corpus whose val split is measured (default: the training corpus)")
    e.add_argument("--no-corpus", action="store_true", help="measure only the shipped samples")
    e.add_argument("--val-chars", type=int, default=DEFAULT_VAL_CHARS, help="characters of the val split to measure")
    e.set_defaults(func=run_eval)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ChibiError(f"{name} must be a positive number, got {value}")


def resolve_split(split: str, lang: str) -> str:
    if split != "auto":
        return split
    if lang not in ("en", "ja", "mixed"):
        raise ChibiError(f"--split auto needs the corpus language, which is {lang!r}; pass --split gpt4|ja|ja-script")
    return "ja" if lang in ("ja", "mixed") else "gpt4"


def run_train(args) -> int:
    from tqdm import tqdm

    from chibichat.common import Home, check_home
    from chibichat.data.corpora import get_corpus
    from chibichat.tokenizer import MIN_VOCAB_SIZE, TooLittleText, corpus_slice, train_tokenizer

    _positive("--max-chars", args.max_chars)
    _positive("--doc-cap", args.doc_cap)
    home = Home.resolve(args.home)
    check_home(home, TOKENIZER_BYTES_PER_TOKEN * args.vocab_size, "tokenizer train")
    old_hash = replaceable_tokenizer(home, args.overwrite)
    corpus = get_corpus(args.corpus)
    for note in corpus.notes():
        print(note, flush=True)
    if args.split == "auto":
        reason = corpus.lang_reason  # a local folder is sampled here: an unreadable one fails with its own error
    split = resolve_split(args.split, corpus.lang)
    if args.split == "auto":
        print(f"--split auto: {split}, because corpus {corpus.name} is {corpus.lang} ({reason}); "
              "pass --split to choose", flush=True)
    print(f"training tokenizer: corpus {corpus.name} ({corpus.lang}), split {split}, vocab {args.vocab_size:,}, "
          f"up to {args.max_chars:,} chars, doc cap {args.doc_cap:,}", flush=True)
    stats: dict = {}
    try:
        with tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="reading text", leave=False) as bar:
            tok = train_tokenizer(
                corpus_slice(corpus, "train", home, args.max_chars, args.doc_cap, stats, bar), args.vocab_size,
                split=split,
            )
    except TooLittleText as e:
        if not stats["exhausted"]:
            raise
        # the whole split was read, so more --max-chars gives no more text
        capped = f"; {stats['capped']:,} of {stats['docs']:,} documents cut to --doc-cap {args.doc_cap:,}" \
            if stats["capped"] else ""
        raise ChibiError(
            f"the whole train split of {corpus.name} ({e.chars:,} chars{capped}) only supports {e.merges} merges but "
            f"vocab size {args.vocab_size} needs {e.needed}; use a larger corpus{' or --doc-cap' if capped else ''}, "
            f"or --vocab-size {e.merges + MIN_VOCAB_SIZE} or less"
        ) from None
    tok.training.update(
        corpus=corpus.name,
        corpus_lang=corpus.lang,
        max_chars=args.max_chars,
        doc_cap=args.doc_cap,
        docs_capped=stats["capped"],
        corpus_exhausted=stats["exhausted"],
    )
    if old_hash is not None and old_hash != tok.hash:
        backup = keep_old_tokenizer(home, old_hash)
        print(f"the replaced tokenizer {old_hash[:12]} (its checkpoints need it) is kept in {backup}; move it back "
              f"to {home.tokenizer_dir} to use those checkpoints again", flush=True)
    tok.save(home.tokenizer_dir)
    tr = tok.training
    if stats["exhausted"] and stats["chars"] < args.max_chars:
        print(f"note: the train split of {corpus.name} has only {stats['chars']:,} chars (< --max-chars); used all of it")
    if stats["capped"]:
        print(f"note: {stats['capped']:,} of {stats['docs']:,} documents were longer than --doc-cap "
              f"{args.doc_cap:,} chars; only their first {args.doc_cap:,} chars were used")
    print(f"trained {tok.vocab_size:,}-token tokenizer ({tok.split} split) on {tr['chars']:,} chars / {tr['docs']:,} docs "
          f"in {tr['seconds']:.2f} s = {tr['chars_per_s'] / 1e6:.2f} M chars/s")
    # what training cost depends on: the distinct pre-split chunks and their length
    rss = "n/a" if tr["peak_rss_mb"] is None else f"{tr['peak_rss_mb']:,.0f} MiB"
    print(f"pre-split: {tr['chunks']:,} chunks, {tr['unique_chunks']:,} unique, mean {tr['mean_chunk_bytes']:.1f} B, "
          f"max {tr['max_chunk_bytes']:,} B (counted in {tr['stats_seconds']:.2f} s, not in the rate); "
          f"peak RSS of this process {rss}")
    print(f"saved to {home.tokenizer_dir} (hash {tok.hash[:12]})")
    return 0


# An upper estimate of tokenizer.json + tokenizer.tiktoken per vocabulary entry, for the free-space check.
TOKENIZER_BYTES_PER_TOKEN = 256


def replaceable_tokenizer(home, overwrite: bool) -> str | None:
    """Before training: the hash of home/tokenizer/ when checkpoints were trained with it (it will be
    kept as a backup when replaced), else None. Without --overwrite such a tokenizer is refused, since
    replacing it would make every one of those checkpoints unloadable."""
    from chibichat.common import recover_aside
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import TOKENIZER_BACKUP_PREFIX, checkpoints_using_tokenizer

    recover_aside(home.tokenizer_dir)  # a tokenizer a crash left aside is still the one checkpoints need
    if not home.tokenizer_dir.is_dir():
        return None
    try:
        old = Tokenizer.load(home.tokenizer_dir)
    except ChibiError:
        return None  # unreadable: no checkpoint can use it either
    users = checkpoints_using_tokenizer(home, old.hash)
    if not users:
        return None
    if not overwrite:
        names = ", ".join(str(p.relative_to(home.root / "checkpoints")) for p in users[:3])
        more = f" and {len(users) - 3} more" if len(users) > 3 else ""
        raise ChibiError(
            f"{home.tokenizer_dir} (tokenizer {old.hash[:12]}) is the tokenizer {len(users)} checkpoint(s) were "
            f"trained with ({names}{more}); a new one would make them unusable. Pass --overwrite to replace it "
            f"(the old one is kept as {home.root / (TOKENIZER_BACKUP_PREFIX + old.hash[:12])}/), or use another --home"
        )
    return old.hash


def keep_old_tokenizer(home, old_hash: str):
    """Move home/tokenizer/ to home/tokenizer.bak-<hash[:12]>/ (one rename, so it is never half-moved);
    returns the backup path. A backup of the same hash already there holds the same tokenizer."""
    import os
    import shutil

    from chibichat.common import write_error
    from chibichat.train.checkpoint import TOKENIZER_BACKUP_PREFIX

    backup = home.root / (TOKENIZER_BACKUP_PREFIX + old_hash[:12])
    try:
        if backup.exists():
            shutil.rmtree(home.tokenizer_dir)
        else:
            os.replace(home.tokenizer_dir, backup)
    except OSError as e:
        raise write_error(backup, e) from None
    return backup


def run_eval(args) -> int:
    from chibichat.common import Home, atomic_write_json
    from chibichat.data.corpora import get_corpus
    from chibichat.tokenizer import Tokenizer, corpus_slice, shipped_samples

    _positive("--val-chars", args.val_chars)
    if args.no_corpus and args.corpus:
        raise ChibiError("--corpus and --no-corpus contradict each other; pass one of them")
    home = Home.resolve(args.home)
    tok = Tokenizer.load(home.tokenizer_dir)
    texts = shipped_samples()
    if not args.no_corpus:
        name = args.corpus or tok.training.get("corpus")
        if not name:
            raise ChibiError("the tokenizer records no training corpus; pass --corpus NAME or --no-corpus")
        corpus = get_corpus(name)
        stats: dict = {}
        val = "\n".join(corpus_slice(corpus, "val", home, args.val_chars, None, stats))
        if not val:
            raise ChibiError(f"the val split of {corpus.name} is empty; pass another --corpus or --no-corpus")
        if stats["exhausted"] and stats["chars"] < args.val_chars:
            print(f"note: the val split of {corpus.name} has only {stats['chars']:,} chars (< --val-chars "
                  f"{args.val_chars:,}); measured all of it")
        texts[f"{corpus.name} val"] = val
    refs = {name: reference_encoding(enc, files) for name, (enc, files) in REFERENCES.items()}
    rows = measure(tok, texts, refs)
    print(format_table(rows, list(refs)))
    unavailable = [name for name, r in refs.items() if isinstance(r, str)]
    for name in unavailable:
        print(f"{name}: unavailable ({refs[name]})")
    result = {
        "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size,
        "split": tok.split,
        "references": {name: ("available" if not isinstance(r, str) else f"unavailable: {r}") for name, r in refs.items()},
        "kinds": rows,
    }
    atomic_write_json(home.tokenizer_dir / "eval.json", result)
    print(f"wrote {home.tokenizer_dir / 'eval.json'}")
    return 0


def tiktoken_cache_dir():
    """Where tiktoken looks for cached encoding files (its own rule), or None when caching is off."""
    import os
    import tempfile

    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def reference_encoding(name: str, urls: list[str]):
    """A tiktoken Encoding if its files are cached locally, else a string saying why not."""
    import hashlib
    import os
    import threading

    cache = tiktoken_cache_dir()
    if cache is None:
        return "tiktoken caching is disabled (TIKTOKEN_CACHE_DIR is empty)"
    missing = [u for u in urls if not os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest()))]
    if missing:
        return f"not in the tiktoken cache {cache}; eval never downloads"
    box: dict = {}

    def load():
        import tiktoken

        try:
            box["enc"] = tiktoken.get_encoding(name)
        except Exception as e:  # a corrupt cache that tiktoken could not re-fetch
            box["err"] = f"{type(e).__name__}: {e}"

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(REFERENCE_LOAD_TIMEOUT_S)
    if "enc" in box:
        return box["enc"]
    return f"cached files did not load ({box.get('err', 'timed out')})"


def measure(tok, texts: dict[str, str], refs: dict) -> dict[str, dict]:
    """Per kind: UTF-8 bytes, our token count and bytes/token, and each reference's bytes/token."""
    rows = {}
    for kind, text in texts.items():
        nbytes = len(text.encode("utf-8"))
        ours = len(tok.encode(text))
        row = {"bytes": nbytes, "chars": len(text), "tokens": ours, "bytes_per_token": round(nbytes / ours, 3)}
        for name, enc in refs.items():
            if isinstance(enc, str):
                row[name] = "unavailable"
            else:
                row[name] = round(nbytes / len(enc.encode_ordinary(text)), 3)
        rows[kind] = row
    return rows


def format_table(rows: dict[str, dict], ref_names: list[str]) -> str:
    head = ["text kind", "bytes", "tokens", "ours B/tok"] + [f"{n} B/tok" for n in ref_names]
    body = [
        [kind, f"{r['bytes']:,}", f"{r['tokens']:,}", f"{r['bytes_per_token']:.2f}"]
        + [r[n] if isinstance(r[n], str) else f"{r[n]:.2f}" for n in ref_names]
        for kind, r in rows.items()
    ]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])
