"""JGLUE for base models, few-shot, on the official files (yahoojapan/JGLUE, CC BY-SA 4.0: never shipped).

  JCommonsenseQA  5-way multiple choice by lowest mean continuation loss; accuracy, centered at 0.2.
  JNLI            3-way loss scoring over the Japanese label words 含意 / 矛盾 / 中立; accuracy.
  JSTS            similarity = expected value of the next-token distribution restricted to the digits
                  0..5 after "類似度："; Pearson and Spearman against the gold scores.
  JSQuAD          greedy generation; the first non-empty line is the answer; exact match and
                  character-level F1 with JGLUE's own normalisation (chibichat.tasks.jglue.jsquad_scores,
                  the same scoring `eval chat --tasks jsquad` uses).

Prompts are base-model few-shot text ("質問：...\n答え："), not the chat format: `eval chat --tasks
jcommonsenseqa,jnli,jsts,jsquad` scores chat models on the same records in the chat format instead.
Files are read by chibichat.tasks.jglue.read_records (the one JGLUE parser, which validates every
record): JCQA/JNLI/JSTS are JSON lines with the official field names; JSQuAD is the SQuAD-format JSON
of the official repo, or JSON lines of flattened records (Hub copies). Public dev sets are what
everyone reports (test sets are not distributed). Demonstrations come from the same
file, drawn per item with the tasks' seeded rule and never the item itself. Over-length items are
skipped and counted, as in CORE.

A run of some tasks adds them to the jglue_eval record of the checkpoint's summary.json; the record's
other tasks stay only when they were scored on the same checkpoint with the same settings
(RECORD_SETTINGS), as with `eval chat`.

Distributed (torchrun): rank r of W scores items r, r+W, ... of every task; the per-item rows are
gathered and put back in item order before any metric is computed, and rank 0 alone writes files.
"""

from __future__ import annotations

import math
from pathlib import Path

from chibichat.common import ChibiError
from chibichat.eval import core
from chibichat.eval.metrics import accuracy, pearson, spearman
from chibichat.tasks.jglue import NLI_WORDS as NLI_LABELS
from chibichat.tasks.jglue import TASKS as JGLUE_TASKS
from chibichat.tasks.jglue import jsquad_scores, read_records
STS_DIGITS = [str(d) for d in range(6)]


# ----------------------------------------------------------------------------------------------
# Files


def find_files(root) -> dict[str, Path]:
    """The dev file of each JGLUE task under root: the official layout
    `<task>-v1.1/valid-v1.1.json` or a file named `<task>*.json[l]` directly in root."""
    root = Path(root)
    if not root.is_dir():
        raise ChibiError(f"--jglue {root} is not a directory; point it at a clone of yahoojapan/JGLUE's datasets/")
    found = {}
    for t in JGLUE_TASKS:
        hits = sorted(root.glob(f"{t}-v*/valid-v*.json")) + sorted(root.glob(f"{t}*.json")) + \
            sorted(root.glob(f"{t}*.jsonl"))
        if hits:
            found[t] = hits[-1] if "valid" in hits[-1].name else hits[0]
    if not found:
        raise ChibiError(
            f"no JGLUE dev file under {root}: expected e.g. {root}/jcommonsenseqa-v1.1/valid-v1.1.json "
            "(the official repo's datasets/ folder) or jcommonsenseqa.jsonl"
        )
    return found


# ----------------------------------------------------------------------------------------------
# Records -> CORE-schema items (so the CORE scorer and few-shot rule are reused, not re-written)


def jcqa_items(records: list[dict]) -> list[dict]:
    items = []
    for r in records:
        choices = [str(r[f"choice{k}"]) for k in range(5)]
        ctx = f"質問：{r['question']}\n選択肢：{' / '.join(choices)}\n答え："
        items.append({"type": "multiple_choice", "context": ctx, "continuations": choices, "gold": r["label"]})
    return items


def jnli_items(records: list[dict]) -> list[dict]:
    words = list(NLI_LABELS.values())
    return [{"type": "multiple_choice", "context": f"前提：{r['sentence1']}\n仮説：{r['sentence2']}\n関係：",
             "continuations": words, "gold": words.index(NLI_LABELS[r["label"]])} for r in records]


def jsts_items(records: list[dict]) -> list[dict]:
    items = []
    for r in records:
        score = float(r["label"])
        ctx = f"文1：{r['sentence1']}\n文2：{r['sentence2']}\n類似度："
        # a demonstration shows the rounded score: the model answers with one digit
        items.append({"type": "language_modeling", "context": ctx, "continuation": str(int(score + 0.5)),
                      "score": score})
    return items


def jsquad_items(records: list[dict]) -> list[dict]:
    return [{"type": "language_modeling", "context": f"文脈：{r['context']}\n質問：{r['question']}\n答え：",
             "continuation": r["answers"][0], "answers": r["answers"]} for r in records]


def build_task(name: str, records: list[dict], num_fewshot: int):
    from chibichat.tasks.base import CoreTask

    items = {"jcommonsenseqa": jcqa_items, "jnli": jnli_items, "jsts": jsts_items, "jsquad": jsquad_items}[name](records)
    baseline = {"jcommonsenseqa": 0.2, "jnli": 1 / 3}.get(name, 0.0)
    if num_fewshot >= len(items):
        raise ChibiError(f"{name}: {num_fewshot}-shot needs more than {num_fewshot} records, the file has {len(items)}")
    return CoreTask(name, items, num_fewshot=num_fewshot, random_baseline=baseline, lang="ja")


# ----------------------------------------------------------------------------------------------
# Scoring


def _merge(rows: list, gather, key) -> list:
    """Every rank's rows in item order (`gather` as in evaluate_jglue); the rows themselves on one process."""
    if gather is None:
        return rows
    return sorted((r for part in gather(rows) for r in part), key=key)


def eval_choice_task(scorer, tok, task, indices=None, gather=None) -> tuple[dict, list[dict]]:
    """JCQA / JNLI: CORE multiple_choice scoring."""
    results = core.score_items(scorer, tok, task, range(len(task)) if indices is None else indices,
                               "multiple_choice")
    results = _merge(results, gather, lambda r: r.index)
    s = core.summarize_task(task, "multiple_choice", results)
    summary = {task.name: s.accuracy, f"{task.name}_centered": s.centered, f"{task.name}_n": s.n_scored,
               f"{task.name}_skipped_too_long": s.n_skipped_too_long}
    if s.n_scored == 0:
        summary[f"{task.name}_note"] = "no item fits the model's context with its few-shot prompt; use fewer --shots"
    return summary, [r.__dict__ for r in results]


def eval_jsts(scorer, tok, task, indices=None, gather=None) -> tuple[dict, list[dict]]:
    digit_ids = single_token_ids(tok, STS_DIGITS)
    rows, prompts = [], []
    for i in range(len(task)) if indices is None else indices:
        ctx, _ = core.item_texts(task, i)[0]
        ids = [tok.bos_id, *tok.encode(ctx)]
        row = {"task": "jsts", "index": i, "status": "ok", "gold": task[i]["score"], "pred": None,
               "prompt_tokens": len(ids)}
        rows.append(row)
        if len(ids) > scorer.max_len:
            row["status"] = "skipped_too_long"
        else:
            prompts.append((row, ids))
    logps = scorer.next_token_logprobs([p for _, p in prompts], [digit_ids] * len(prompts)) if prompts else []
    for (row, _), lp in zip(prompts, logps):
        # renormalise over the six digits: the expected similarity under the model's digit distribution
        m = max(lp)
        w = [math.exp(x - m) for x in lp]
        row["pred"] = sum(d * wd for d, wd in enumerate(w)) / sum(w)
    rows = _merge(rows, gather, lambda r: r["index"])
    scored = [r for r in rows if r["status"] == "ok"]
    if len(scored) < 2:
        return {"jsts_pearson": None, "jsts_spearman": None, "jsts_n": len(scored),
                "jsts_skipped_too_long": len(rows) - len(scored),
                "jsts_note": "fewer than 2 items fit the model's context: correlation undefined"}, rows
    pr = pearson([r["pred"] for r in scored], [r["gold"] for r in scored])
    sr = spearman([r["pred"] for r in scored], [r["gold"] for r in scored])
    summary = {"jsts_pearson": None if math.isnan(pr) else pr, "jsts_spearman": None if math.isnan(sr) else sr,
               "jsts_n": len(scored), "jsts_skipped_too_long": len(rows) - len(scored)}
    if math.isnan(pr):
        summary["jsts_note"] = "the model predicted one similarity for every pair: correlation undefined"
    return summary, rows


def single_token_ids(tok, symbols: list[str]) -> list[int]:
    ids = []
    for s in symbols:
        enc = tok.encode(s)
        if len(enc) != 1:
            raise ChibiError(f"JSTS needs each digit to be one token; {s!r} encodes to {len(enc)} tokens")
        ids.append(enc[0])
    return ids


def eval_jsquad(gen, tok, task, max_len: int, max_tokens: int, indices=None, gather=None) -> tuple[dict, list[dict]]:
    """Greedy answers (the first non-empty line); EM and char-F1 against every gold answer."""
    if max_tokens < 1 or max_len - max_tokens < 2:
        raise ChibiError(f"JSQuAD: --jsquad-max-tokens {max_tokens} does not fit a {max_len}-token context")
    rows, prompts = [], []
    for i in range(len(task)) if indices is None else indices:
        ctx, _ = core.item_texts(task, i)[0]
        ids = [tok.bos_id, *tok.encode(ctx)]
        row = {"task": "jsquad", "index": i, "status": "ok", "answers": task[i]["answers"], "pred": None,
               "em": None, "f1": None, "prompt_tokens": len(ids)}
        rows.append(row)
        if len(ids) + max_tokens > max_len:
            row["status"] = "skipped_too_long"
        else:
            prompts.append((row, ids))
    texts = gen.generate_texts([p for _, p in prompts], 1, max_tokens, 0.0, None, [0] * len(prompts)) if prompts else []
    for (row, _), samples in zip(prompts, texts):
        row["pred"], row["em"], row["f1"] = jsquad_scores(samples[0], row["answers"])
    rows = _merge(rows, gather, lambda r: r["index"])
    scored = [r for r in rows if r["status"] == "ok"]
    if not scored:
        return {"jsquad_em": None, "jsquad_f1": None, "jsquad_n": 0, "jsquad_skipped_too_long": len(rows),
                "jsquad_note": "no question fits the model's context with its passage; use fewer --jsquad-shots"}, rows
    summary = {"jsquad_em": accuracy([r["em"] for r in scored]), "jsquad_f1": accuracy([r["f1"] for r in scored]),
               "jsquad_n": len(scored), "jsquad_skipped_too_long": len(rows) - len(scored)}
    return summary, rows


def task_keys(name: str) -> tuple[str, ...]:
    """Every flat summary.json key evaluate_jglue may write for one task (its note included)."""
    scores = {"jsts": ("jsts_pearson", "jsts_spearman"), "jsquad": ("jsquad_em", "jsquad_f1")}.get(
        name, (name, f"{name}_centered"))
    return (*scores, f"{name}_n", f"{name}_skipped_too_long", f"{name}_note")


def evaluate_jglue(files: dict, *, scorer, gen, tok, max_len: int, shots: dict, max_items: int | None = None,
                   jsquad_max_tokens: int = 32, rank: int = 0, world_size: int = 1, gather=None) -> dict:
    """Evaluate the tasks whose files were found; returns {"summary": flat keys, "items": {task: rows}}.

    Ranks stride over items; `gather(list) -> list of lists` (every rank's rows, in rank order) is
    required when world_size > 1."""
    if world_size > 1 and gather is None:
        raise ChibiError("evaluate_jglue over several ranks needs a gather function to merge their items")
    summary, items = {}, {}
    for name, path in files.items():
        if name not in JGLUE_TASKS:
            raise ChibiError(f"unknown JGLUE task {name!r}; expected one of {JGLUE_TASKS}")
        records = read_records(name, path)
        if max_items is not None:
            records = records[:max_items]
        task = build_task(name, records, shots[name])
        mine = range(rank, len(task), world_size)
        if name in ("jcommonsenseqa", "jnli"):
            s, rows = eval_choice_task(scorer, tok, task, mine, gather)
        elif name == "jsts":
            s, rows = eval_jsts(scorer, tok, task, mine, gather)
        else:
            s, rows = eval_jsquad(gen, tok, task, max_len, jsquad_max_tokens, mine, gather)
        summary.update(s)
        items[name] = rows
    return {"summary": summary, "items": items}


# ----------------------------------------------------------------------------------------------
# Entry point for `chibichat eval jglue` (registered in stages/evaluate.py)

# What makes two `eval jglue` runs one test: the same checkpoint (metrics.checkpoint_settings) scored on the
# same dev files, items, demonstrations and answer budget. A run of some tasks keeps the jglue_eval record's
# other tasks only when all of these match (metrics.carry_over, as `eval chat` does).
RECORD_SETTINGS = ("checkpoint", "checkpoint_mtime_ns", "step", "jglue_dir", "max_items", "shots", "jsquad_shots",
                   "jsquad_max_tokens")


def add_jglue_args(p) -> None:
    p.add_argument("--jglue-dir", required=True,
                   help="folder with the JGLUE dev files (a clone of yahoojapan/JGLUE's datasets/, or "
                        "<task>.jsonl files); the data is CC BY-SA 4.0 and not shipped")
    p.add_argument("--tasks", default=",".join(JGLUE_TASKS), help=f"subset of {','.join(JGLUE_TASKS)}")
    p.add_argument("--shots", type=int, default=3, help="demonstrations for JCQA, JNLI and JSTS (default: 3)")
    p.add_argument("--jsquad-shots", type=int, default=1,
                   help="demonstrations for JSQuAD, whose passages are long (default: 1)")
    p.add_argument("--jsquad-max-tokens", type=int, default=32, help="tokens per generated answer (default: 32)")
    p.add_argument("--max-items", type=int, default=None, help="first N records per task (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")


def run_jglue(args) -> int:
    import time

    from chibichat.common import Home, init_runtime, print0, shutdown_runtime
    from chibichat.engine import Engine, prepare_for_inference
    from chibichat.common import rank_gather
    from chibichat.eval.chat import EngineGenerator
    from chibichat.eval.core import ModelScorer
    from chibichat.eval.metrics import carry_over, checkpoint_settings, read_summary, write_eval_outputs, write_record
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import load_model

    for name in ("shots", "jsquad_shots"):
        if getattr(args, name) < 0:
            raise ChibiError(f"--{name.replace('_', '-')} must be >= 0")
    if args.max_items is not None and args.max_items < 1:
        raise ChibiError(f"--max-items must be >= 1, got {args.max_items}")
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = sorted(set(wanted) - set(JGLUE_TASKS))
    if bad:
        raise ChibiError(f"--tasks names unknown JGLUE task(s) {bad}; choose from {','.join(JGLUE_TASKS)}")
    found = find_files(args.jglue_dir)
    missing = [t for t in wanted if t not in found]
    if missing:
        raise ChibiError(f"no dev file for {missing} under {args.jglue_dir} (found: {sorted(found)}); "
                         "fetch them or narrow --tasks")
    rt = init_runtime(args.device, args.dtype)
    try:
        t0 = time.time()
        home = Home.resolve(args.home)
        tok = Tokenizer.load(home.tokenizer_dir)
        model, meta = load_model(home, args.source, args.tag, args.step, rt, tokenizer=tok)
        prepare_for_inference(model)
        shots = {t: args.shots for t in JGLUE_TASKS} | {"jsquad": args.jsquad_shots}
        out = evaluate_jglue({t: found[t] for t in wanted}, scorer=ModelScorer(model, rt, args.eval_batch_size),
                             gen=EngineGenerator(Engine(model, tok, rt), args.eval_batch_size, tools=False), tok=tok,
                             max_len=model.config.seq_len, shots=shots, max_items=args.max_items,
                             jsquad_max_tokens=args.jsquad_max_tokens, rank=rt.rank, world_size=rt.world_size,
                             gather=rank_gather(rt))
        tag = meta["checkpoint_dir"].rstrip("/").split("/")[-2]
        out_dir = home.eval_dir(args.source, tag)
        # The record lists its tasks by their files. An earlier run's tasks not run again are kept under the
        # same RECORD_SETTINGS and dropped, with their keys and per-item files, under others; so are JGLUE
        # scores no record lists (left by an older version of chibichat).
        before = read_summary(out_dir)
        earlier = before.get("jglue_eval")
        earlier = earlier if isinstance(earlier, dict) else {}
        earlier_files = earlier.get("files")
        earlier_files = earlier_files if isinstance(earlier_files, dict) else {}
        listed = [t for t in earlier_files if t in JGLUE_TASKS]
        settings = {**checkpoint_settings(meta), "jglue_dir": str(Path(args.jglue_dir).resolve()),
                    "max_items": args.max_items, "shots": args.shots, "jsquad_shots": args.jsquad_shots,
                    "jsquad_max_tokens": args.jsquad_max_tokens}
        kept, dropped, note = carry_over(earlier, settings, RECORD_SETTINGS, listed, wanted)
        if note:
            print0(rt, note)
        unlisted = [t for t in JGLUE_TASKS if t not in listed and t not in wanted
                    and any(k in before for k in task_keys(t))]
        if unlisted:
            print0(rt, f"dropped the scores of {', '.join(unlisted)}, which no jglue_eval record lists, with their "
                       "per-item files")
        files = {t: earlier_files[t] for t in kept} | {t: str(found[t]) for t in wanted}
        if rt.is_master:
            for name, rows in out["items"].items():
                write_eval_outputs(out_dir, name, rows, None)
            gone = dropped + unlisted
            write_record(out_dir, {**out["summary"], "jglue_eval": {
                "stage": args.source, "tag": tag, **settings, "files": files, "world_size": rt.world_size,
                "seconds": time.time() - t0}}, {k for t in gone + wanted for k in task_keys(t)}, gone)
        for k, v in out["summary"].items():
            print0(rt, f"{k}: {v}")
        return 0
    finally:
        shutdown_runtime(rt)
