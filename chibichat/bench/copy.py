"""`chibichat bench copy`: how well saved models copy from their context (an induction probe).

Spelling, letter counting, the calculator's numbers and on-topic sentences all need the model to write a
token it has just read. This benchmark measures that ability directly, for several checkpoints side by side.

A probe row holds 2H + 1 ids (H = half the model's context by default) and repeats some of its tokens: either
  - half: BOS, H tokens, then the same H tokens again (the repeat is always H back), or
  - span: BOS, 2H - S tokens, then S of them from a random place (S from H/4 to H, drawn per row), so the
    repeat is a different distance back in every row. Only a model that finds by content where the text it
    reads appeared before (an induction head) predicts these; one that learnt to attend a fixed distance
    back predicts the half rows and not these (docs/benchmarks.md, session 44).
The loss is read on the original and on the repeat, each without its first target, which no copying predicts
(nothing says that a repeat begins). The tokens are
  - text: consecutive pieces of a corpus's validation split (default: the corpus the checkpoint was trained
    on); a language model predicts part of the original already, so the gain is a lower bound;
  - random: ordinary tokens drawn uniformly (special tokens excluded); the original costs about ln(V), and
    only copying makes the repeat cheaper.
Per checkpoint and kind: mean loss in nats per token on the original and on the repeat, and the gain
(original - repeat). A model that copies well has a gain of several nats on random rows of both layouts.
"""

from __future__ import annotations

import random

from chibichat.common import CHECKPOINT_STAGES, ChibiError, add_runtime_args

HELP = ("in-context copying of saved checkpoints: loss on repeated tokens against their first reading (text and "
        "random tokens; a repeated half, and a span repeated at a random distance)")


def add_args(p) -> None:
    p.add_argument("--model", action="append", default=None, metavar="STAGE/TAG", required=True,
                   help="checkpoint to probe, e.g. base/d4 (repeat to compare several; the newest step of each)")
    p.add_argument("--rows", type=int, default=32, help="probe rows of each kind (default: 32)")
    p.add_argument("--half", type=int, default=None,
                   help="tokens in each half of a row (default: half of the smallest context among the models)")
    p.add_argument("--corpus", default=None,
                   help="corpus whose validation split gives the text rows (default: each checkpoint's own corpus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rows (default: 0)")
    p.add_argument("--name", default="copy", help="report name: report/bench-<name>.{json,md} (default: copy)")
    add_runtime_args(p)


def parse_model(text: str) -> tuple[str, str]:
    """'base/d4' -> ('base', 'd4'); the stage must be one that saves checkpoints."""
    stage, sep, tag = text.partition("/")
    if not sep or not stage or not tag or "/" in tag:
        raise ChibiError(f"--model {text!r}: write STAGE/TAG, e.g. --model base/d4 (stages: {', '.join(CHECKPOINT_STAGES)})")
    if stage not in CHECKPOINT_STAGES:
        raise ChibiError(f"--model {text!r}: unknown stage {stage!r}; stages: {', '.join(CHECKPOINT_STAGES)}")
    return stage, tag


KINDS = ("text", "text_span", "random", "random_span")  # tokens x layout (the module docstring)


def probe_rows(pieces: list[list[int]], bos: int) -> list[list[int]]:
    """BOS + piece + piece for every piece (all of one length H)."""
    return [[bos, *p, *p] for p in pieces]


def half_spans(rows: list[list[int]]) -> list[tuple[int, int, int]]:
    """The repeat of probe_rows as (original start, repeat start, length) per row: (1, H + 1, H)."""
    return [(1, (len(r) + 1) // 2, (len(r) - 1) // 2) for r in rows]


def span_rows(pieces: list[list[int]], bos: int, seed: int) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """For every piece (all of one length 2H): BOS + its first 2H - S tokens + S of them from a random place,
    S drawn from max(2, H // 4) .. H; with each row its (original start, repeat start, S)."""
    rng = random.Random(f"bench-copy-span:{seed}")
    rows, spans = [], []
    for p in pieces:
        n = len(p)
        s = rng.randint(max(2, n // 8), n // 2)
        i = rng.randint(0, n - 2 * s)
        head = p[:n - s]
        rows.append([bos, *head, *head[i:i + s]])
        spans.append((1 + i, 1 + n - s, s))
    return rows, spans


def random_pieces(rows: int, half: int, vocab_regular: int, seed: int) -> list[list[int]]:
    rng = random.Random(f"bench-copy:{seed}")
    return [[rng.randrange(vocab_regular) for _ in range(half)] for _ in range(rows)]


def text_pieces(corpus, home, tok, rows: int, half: int) -> list[list[int]]:
    """The first rows x half tokens of the corpus's validation split, cut into consecutive pieces."""
    need = rows * half
    ids: list[int] = []
    for shard in corpus.shards("val", home):
        for g in range(shard.num_groups()):
            for doc in shard.read_group(g):
                ids += tok.encode(doc)
                if len(ids) >= need:
                    return [ids[k * half:(k + 1) * half] for k in range(rows)]
    raise ChibiError(f"corpus {corpus.name!r}: its validation split holds {len(ids):,} tokens, fewer than --rows {rows} "
                     f"x --half {half} = {need:,}; lower --rows or --half")


def copy_losses(model, rows: list[list[int]], spans: list[tuple[int, int, int]], device,
                batch: int = 8) -> tuple[float, float]:
    """(mean loss on the originals, mean loss on the repeats) in nats per token over all rows, where row k's
    `spans[k]` = (a, b, n) says its n tokens from position a are repeated from position b; each side without
    its first token."""
    import torch

    first = repeat = 0.0
    count = 0
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            x = torch.tensor(rows[s:s + batch], device=device)
            loss = model(x[:, :-1], x[:, 1:], reduction="none").float()
            for k, (a, b, n) in enumerate(spans[s:s + batch]):
                # target j predicts row[j + 1]: positions a+1 .. a+n-1 are targets a .. a+n-2
                first += loss[k, a:a + n - 1].sum().item()
                repeat += loss[k, b:b + n - 1].sum().item()
                count += n - 1
    return first / count, repeat / count


def run(args) -> int:
    from chibichat.common import Home, atomic_write_json, atomic_write_text, check_at_least, init_runtime
    from chibichat.data.corpora import get_corpus
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import load_model, read_meta, resolve_checkpoint

    from chibichat.bench.skills import NAME_RE

    check_at_least(args, 1, "rows")
    if not NAME_RE.match(args.name):
        raise ChibiError(f"--name {args.name!r} must be lower-case letters, digits and '-' (it names the report files)")
    if args.half is not None and args.half < 2:
        raise ChibiError(f"--half must be >= 2 (a first token and one to copy), got {args.half}")
    models = [parse_model(m) for m in args.model]
    twice = sorted({f"{s}/{t}" for s, t in models if models.count((s, t)) > 1})
    if twice:  # it would be loaded and probed twice, for the same row
        raise ChibiError(f"--model {', '.join(twice)} is given more than once; give each checkpoint once")
    home = Home.resolve(args.home)
    tok = Tokenizer.load(home.tokenizer_dir)
    metas = [read_meta(resolve_checkpoint(home, stage, tag)) for stage, tag in models]
    context = min(m["model_config"]["seq_len"] for m in metas)
    half = args.half if args.half is not None else context // 2
    if 2 * half > context:
        raise ChibiError(f"--half {half}: a row needs 2 x {half} = {2 * half} positions but the smallest context among "
                         f"the models is {context}; use --half {context // 2} or less")
    rt = init_runtime(args.device, args.dtype)
    regular = min(tok.special_ids)  # specials are the last ids (tokenizer.py)
    random_rows = probe_rows(random_pieces(args.rows, half, regular, args.seed), tok.bos_id)
    probes = {"random": (random_rows, half_spans(random_rows)),
              "random_span": span_rows(random_pieces(args.rows, 2 * half, regular, args.seed + 1), tok.bos_id,
                                       args.seed)}
    text_probes: dict[str, dict] = {}
    results = []
    for (stage, tag), meta in zip(models, metas):
        corpus_name = args.corpus or meta.get("corpus")
        if not corpus_name:
            raise ChibiError(f"--model {stage + '/' + tag!r}: its checkpoint does not say which corpus it was trained on; "
                             "name one with --corpus")
        if corpus_name not in text_probes:
            corpus = get_corpus(corpus_name)
            rows = probe_rows(text_pieces(corpus, home, tok, args.rows, half), tok.bos_id)
            text_probes[corpus_name] = {
                "text": (rows, half_spans(rows)),
                "text_span": span_rows(text_pieces(corpus, home, tok, args.rows, 2 * half), tok.bos_id, args.seed)}
        model, _ = load_model(home, stage, tag, rt=rt, tokenizer=tok)
        row = {"model": f"{stage}/{tag}", "step": meta.get("step"), "corpus": corpus_name}
        for kind in KINDS:
            rows, spans = {**text_probes[corpus_name], **probes}[kind]
            first, repeat = copy_losses(model, rows, spans, rt.device)
            row[kind] = {"first": first, "repeat": repeat, "gain": first - repeat}
        results.append(row)
        del model
    table = format_table(results, args.rows, half)
    print(table)
    out = home.report_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"bench-{args.name}.json",
                      {"rows": args.rows, "half": half, "seed": args.seed, "results": results})
    atomic_write_text(out / f"bench-{args.name}.md", table + "\n")
    print(f"wrote {out / f'bench-{args.name}.json'} and .md")
    return 0


def format_table(results: list[dict], rows: int, half: int) -> str:
    lines = [f"`chibichat bench copy`: rows of {2 * half + 1} tokens; half: BOS + {half} tokens + the same {half} again; "
             f"span: BOS + {2 * half} - S tokens + S of them from a random place, S from {max(2, half // 4)} to "
             f"{half}; {rows} rows of each kind. Mean loss (nats "
             "per token) on the original and on the repeat, gain = original - repeat: a gain on the half rows and "
             "none on the span rows is a head that attends a fixed distance back, not copying.", "",
             "| model | step | text corpus | text: half gain | text: span gain | random: half gain | random: span gain "
             "| random: span original / repeat |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['step']} | {r['corpus']} | " + " | ".join(
            f"**{r[k]['gain']:.3f}**" for k in KINDS)
            + f" | {r['random_span']['first']:.3f} / {r['random_span']['repeat']:.3f} |")
    return "\n".join(lines)
