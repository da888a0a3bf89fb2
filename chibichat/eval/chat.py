"""Chat-model evaluation: categorical tasks by restricted letter logits, generative tasks by sampling
and checking, and ChatCORE.

Categorical (ARC-Easy/Challenge, MMLU): the prompt is rendered with the chat template up to
<|assistant_start|>; the prediction is the argmax of the next-token log-probabilities restricted to
the item's choice letters (each letter must be one token). No sampling, so the score is exact.

Generative (GSM8K with the calculator, HumanEval in the sandbox, spelling): `num_samples` completions
per prompt from the batched engine; each is checked by the task's own `evaluate`. The item score is
the unbiased pass@1 estimate c/n (with greedy decoding and n = 1 that is simply right/wrong), and
pass@n (any sample right) is recorded beside it.

Length: a categorical prompt must fit the context; a generative prompt must leave `max_tokens` free
for the answer (every item gets the same budget). Items that do not fit are skipped and counted,
never cut.

Distributed (torchrun): rank r of W evaluates items r, r+W, r+2W, ... of every task; the per-item rows
are gathered to every rank and put back in item order before anything is summarised, and rank 0
alone writes the files. Categorical scores and generations do not depend on which other items
share a batch beyond float rounding, so W ranks report what one process does: each prompt's samples
are drawn from its own generator, seeded with GenSettings.seed + the item's index in its task, so
sampled generations (temperature > 0) too are the same whatever the number of ranks or
--eval-batch-size.

ChatCORE = mean over tasks of centered accuracy, baseline 1/#letters for categorical tasks and 0
for generative ones. It is labelled "chatcore" only when every task of CHATCORE_TASKS was scored;
scores over other task sets are not comparable and are stored as "chatcore_partial". A task none of
whose items fits the context is reported with accuracy None and left out of the mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from chibichat.common import ChibiError
from chibichat.eval.metrics import accuracy, centered, pass_at_k
from chibichat.sandbox import add_allow_weak_arg, check_sandbox
from chibichat.tasks.evalsets import CHATCORE_TASKS, ONLINE_TEST_SETS, TEST_SETS
from chibichat.tasks.registry import eval_task
from chibichat.render import reply_budget

UNBOUNDED = 1 << 30  # render limit used only to measure a prompt's full length before the fit check


class Generator(Protocol):
    def generate_texts(self, prompts: Sequence[list[int]], num_samples: int, max_tokens: int,
                       temperature: float, top_k: int | None, seeds: Sequence[int]) -> list[list[str]]:
        """num_samples completion texts per prompt, prompt i's drawn with seeds[i] whatever the other prompts."""
        ...


class EngineGenerator:
    """The engine behind the Generator interface (tools on: GSM8K uses the calculator).

    The prompts are decoded together by a continuous `Batcher`, at most `batch_size` of them at a time
    (a finished prompt's rows go to the next one), each prompt's samples drawn from its own generator
    seeded with its seed: a prompt's texts are what `Engine.generate([prompt], ..., seed=its seed)`
    gives, whatever else shares the batch (up to float rounding), so they do not depend on the batch
    size nor on how the prompts are split over ranks."""

    def __init__(self, engine, batch_size: int = 8, tools: bool = True):
        if batch_size < 1:
            raise ChibiError(f"--eval-batch-size must be >= 1, got {batch_size}")
        self.engine, self.batch_size, self.tools = engine, batch_size, tools

    def generate_texts(self, prompts, num_samples, max_tokens, temperature, top_k, seeds):
        return [[self.text(c) for c in choices]
                for choices in self.choices(prompts, num_samples, max_tokens, temperature, top_k, seeds)]

    def text(self, choice: dict) -> str:
        """A choice's text as Engine.generate gives it: its tokens decoded, the end token of a "stop" left out
        (no stop strings here, so a "stop" choice ends with its end token)."""
        tokens = choice["tokens"]
        return self.engine.tokenizer.decode(tokens[:-1] if choice["finish_reason"] == "stop" else tokens)

    def choices(self, prompts, num_samples, max_tokens, temperature, top_k, seeds) -> list[list[dict]]:
        """Per prompt, its num_samples choices as `Engine.stream_choices` reports them ("tokens",
        "finish_reason", ...). Decoding runs on the batcher's thread: OpenMP threads spinning in a process's
        main thread make each small decoding op wait on cores that other work is using (see
        common.passive_thread_waits), where a second thread's do not (docs/benchmarks.md, session 31)."""
        import threading

        from chibichat.engine import Batcher, Job, SamplingParams

        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per prompt")
        if not prompts:
            return []
        results: list = [None] * len(prompts)  # per prompt: ("done", result) or ("error", exception)
        finished = threading.Semaphore(0)

        def emitter(i):
            def emit(events):  # called from the batcher's thread
                for kind, value in events:
                    if kind in ("done", "error"):
                        results[i] = (kind, value)
                        finished.release()
            return emit

        params = SamplingParams(temperature, top_k)
        batcher = Batcher(self.engine, max_rows=self.batch_size * num_samples, name="eval")
        try:
            for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
                batcher.submit(Job(list(prompt), num_samples, max_tokens, params, seed, self.tools, emitter(i)))
            for _ in prompts:
                finished.acquire()
        finally:
            batcher.stop()
        for kind, value in results:
            if kind == "error":
                raise value
        return [value["choices"] for _, value in results]


@dataclass
class GenSettings:
    num_samples: int = 1
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise ChibiError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.max_tokens < 1:
            raise ChibiError(f"--max-new-tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ChibiError(f"--temperature must be >= 0, got {self.temperature}")


def _full_prompt(tok, item) -> list[int]:
    from chibichat.render import render_for_completion

    return render_for_completion(tok, item, UNBOUNDED)


def letter_ids(tok, letters: Sequence[str], where: str) -> list[int]:
    ids = []
    for letter in letters:
        enc = tok.encode(letter)
        if len(enc) != 1:
            raise ChibiError(
                f"{where}: choice letter {letter!r} encodes to {len(enc)} tokens; restricted-letter scoring "
                "needs single-token letters (every byte-level tokenizer has them for A-Z)"
            )
        ids.append(enc[0])
    return ids


def eval_categorical(scorer, tok, task, indices: Sequence[int], max_len: int) -> list[dict]:
    """Per-item rows {task, index, status, pred, answer, correct, n_choices}; scorer batches the prompts."""
    rows, prompts, cands, owners = [], [], [], []
    for i in indices:
        item = task[i]
        where = f"task {task.name!r} item {i}"
        letters = item.get("letters")
        if not letters or item.get("answer") not in letters:
            raise ChibiError(f"{where}: a categorical item needs 'letters' and an 'answer' among them")
        prompt = _full_prompt(tok, item)
        row = {"task": task.name, "index": i, "status": "ok", "pred": None, "answer": item["answer"],
               "correct": None, "n_choices": len(letters), "prompt_tokens": len(prompt)}
        rows.append(row)
        if len(prompt) > max_len:
            row["status"] = "skipped_too_long"
            continue
        prompts.append(prompt)
        cands.append(letter_ids(tok, letters, where))
        owners.append(row)
    logps = scorer.next_token_logprobs(prompts, cands) if prompts else []
    for row, lp in zip(owners, logps):
        letters = task[row["index"]]["letters"]
        row["pred"] = letters[max(range(len(lp)), key=lambda j: lp[j])]  # ties -> first letter
        row["correct"] = row["pred"] == row["answer"]
    return rows


def eval_generative(gen: Generator, tok, task, indices: Sequence[int], max_len: int, cfg: GenSettings) -> list[dict]:
    """Per-item rows {task, index, status, n_correct, n_samples, pass1, passn, completion}."""
    rows, prompts, owners = [], [], []
    budget = max_len - cfg.max_tokens
    if budget < 2:
        raise ChibiError(
            f"--max-new-tokens {cfg.max_tokens} leaves no room for a prompt in the model's {max_len}-token "
            "context; lower it"
        )
    for i in indices:
        prompt = _full_prompt(tok, task[i])
        row = {"task": task.name, "index": i, "status": "ok", "n_correct": None, "n_samples": cfg.num_samples,
               "pass1": None, "passn": None, "prompt_tokens": len(prompt), "completion": None}
        rows.append(row)
        if len(prompt) > budget:
            row["status"] = "skipped_too_long"
            continue
        prompts.append(prompt)
        owners.append(row)
    # A seed per item (not per batch of this rank's items): an item's samples are the same whatever the ranks.
    seeds = [cfg.seed + row["index"] for row in owners]
    texts = gen.generate_texts(prompts, cfg.num_samples, cfg.max_tokens, cfg.temperature, cfg.top_k, seeds) \
        if prompts else []
    for row, samples in zip(owners, texts):
        item = task[row["index"]]
        c = sum(bool(task.evaluate(item, t)) for t in samples)
        row["n_correct"] = c
        row["pass1"] = pass_at_k(len(samples), c, 1)
        row["passn"] = float(c > 0)
        row["completion"] = samples[0]
    return rows


def _task_stem(task_name: str) -> str:
    """The task name lower-case with underscores ("arc-easy" -> "arc_easy"); a local file task by its file
    name ("file:/data/qa-test.jsonl" -> "file_qa_test"). It names files, so it holds no path separator."""
    from chibichat.tasks.local import PREFIX

    if task_name.startswith(PREFIX):
        stem = task_name[len(PREFIX):].replace("\\", "/").rsplit("/", 1)[-1].split(".", 1)[0]
        return "file_" + re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")
    return task_name.lower().replace("-", "_")


def summary_key(task_name: str) -> str:
    """summary.json keys are lower-case with underscores ("arc-easy" -> "arc_easy"; docs/architecture.md).
    A JGLUE task gets "_chat" ("jsquad" -> "jsquad_chat"): `eval jglue` writes its few-shot scores of the
    same task under the plain name ("jsquad_n", "jnli", ...) into the same summary.json, and neither may
    overwrite the other."""
    from chibichat.tasks.jglue import TASKS as JGLUE_TASKS

    stem = _task_stem(task_name)
    return f"{stem}_chat" if task_name in JGLUE_TASKS else stem


def items_name(task_name: str) -> str:
    """The stem of a task's per-item files, chat_<task>.jsonl/.csv (beside `eval jglue`'s <task>.jsonl)."""
    return f"chat_{_task_stem(task_name)}"


def refuse_shared_keys(names: Sequence[str]) -> None:
    """One run records each task under its own summary keys and per-item files: two tasks sharing them (local
    files of one file name, "a/qa.jsonl" and "b/qa.jsonl" are both "file_qa") would overwrite each other's scores."""
    seen: dict[str, str] = {}
    for name in names:
        key = summary_key(name)
        if key not in seen:
            seen[key] = name
        elif seen[key] == name:
            raise ChibiError(f"--tasks lists {name!r} twice; list it once")
        else:
            raise ChibiError(f"--tasks {seen[key]!r} and {name!r} would both be recorded as {key!r} in summary.json "
                             "(a local file is keyed by its file name), one overwriting the other's scores: rename "
                             "one of the files")


def replaced_in_record(earlier_names: Sequence[str], names: Sequence[str]) -> list[str]:
    """The tasks of an earlier record that a run of `names` replaces although named otherwise: those under the
    same summary keys (a local file by another path, or another file of the same file name), which the
    record cannot hold beside the new scores."""
    keys = {summary_key(n) for n in names}
    return [n for n in earlier_names if n not in set(names) and summary_key(n) in keys]


def summarize(task_kind: str, rows: list[dict]) -> dict:
    scored = [r for r in rows if r["status"] == "ok"]
    skipped = len(rows) - len(scored)
    name = rows[0]["task"] if rows else "?"
    if not scored:
        # Reported, not fatal: the other tasks still count, and ChatCORE is then marked partial.
        return {"task": name, "kind": task_kind, "accuracy": None, "baseline": None, "centered": None,
                "n_scored": 0, "n_skipped_too_long": skipped,
                "note": "no item fits the model's context (longer-context model or smaller --max-new-tokens)"}
    if task_kind == "categorical":
        acc = accuracy([r["correct"] for r in scored])
        base = sum(1.0 / r["n_choices"] for r in scored) / len(scored)
        extra = {}
    else:
        acc = accuracy([r["pass1"] for r in scored])
        base = 0.0
        extra = {"passn": accuracy([r["passn"] for r in scored])}
    return {"task": name, "kind": task_kind, "accuracy": acc, "baseline": base, "centered": centered(acc, base),
            "n_scored": len(scored), "n_skipped_too_long": skipped, **extra}


def evaluate_chat(tasks: list, *, scorer, gen: Generator | None, tok, max_len: int, cfg: GenSettings,
                  max_items: int | None = None, rank: int = 0, world_size: int = 1, gather=None) -> dict:
    """Run every task; returns {"summary": flat keys for summary.json, "tasks": [...], "items": {name: rows}}.

    Ranks stride over items (rank, rank + world_size, ...); `gather(list) -> list of lists` (every
    rank's rows, one list per rank) is required when world_size > 1 and merges them in item order."""
    if not tasks:
        raise ChibiError("no chat tasks to evaluate")
    if world_size > 1 and gather is None:
        raise ChibiError("evaluate_chat over several ranks needs a gather function to merge their items")
    refuse_shared_keys([t.name for t in tasks])
    per_task, items = [], {}
    for task in tasks:
        n = len(task) if max_items is None else min(max_items, len(task))
        mine = range(rank, n, world_size)
        if task.kind == "categorical":
            rows = eval_categorical(scorer, tok, task, mine, max_len)
        elif task.kind == "generative":
            if gen is None:
                raise ChibiError(f"task {task.name!r} is generative but no generator was given")
            rows = eval_generative(gen, tok, task, mine, max_len, cfg)
        else:
            raise ChibiError(f"task {task.name!r} is of kind {task.kind!r}; chat eval takes categorical or generative")
        if world_size > 1:
            rows = sorted((r for part in gather(rows) for r in part), key=lambda r: r["index"])
        per_task.append(summarize(task.kind, rows))
        items[task.name] = rows
    if not any(s["n_scored"] > 0 for s in per_task):
        raise ChibiError("no item of any task fits the model's context; nothing was evaluated")
    return {"summary": flat_summary(per_task), "tasks": per_task, "items": items}


CHATCORE_KEYS = ("chatcore", "chatcore_partial", "chatcore_tasks")

# What makes two `eval chat` scores one test: the same checkpoint (path, step, and its meta.json's mtime,
# which a stage trained again rewrites) scored on the same test sets, items and decoding. A record keeps
# earlier tasks only of the same checkpoint, each with the decoding settings it was scored under, and its
# ChatCORE tasks under one setting (carry_over_tasks), so ChatCORE is never a mean over different tests.
RECORD_SETTINGS = ("checkpoint", "checkpoint_mtime_ns", "step", "test_sets", "max_items", "num_samples",
                   "max_new_tokens", "temperature", "top_k", "seed")
CHECKPOINT_SETTINGS = RECORD_SETTINGS[:3]
DECODE_SETTINGS = RECORD_SETTINGS[3:]  # kept with each task too (its entry's "settings")


def carry_over_tasks(earlier: dict, earlier_tasks: list[dict], now: dict, tasks: Sequence[str]):
    """Which earlier tasks a run of `tasks` with settings `now` keeps: (kept entries, dropped names, note or
    None). Another checkpoint drops them all. Otherwise a task keeps the settings it was scored under (its
    entry's "settings"; a record from before those were kept: the record's), and only ChatCORE, a mean over
    its tasks, needs one setting: the earlier ChatCORE tasks go when this run scores one under other settings.
    So scoring your own file with other settings keeps the speedrun's ChatCORE, and the file's score keeps
    its own settings when ChatCORE is scored again."""
    from chibichat.eval.metrics import carry_over

    # An entry from before the settings were kept per task gets the record's, so it keeps them from now on.
    earlier_tasks = [t if isinstance(t.get("settings"), dict) else
                     {**t, "settings": {k: earlier.get(k) for k in DECODE_SETTINGS}} for t in earlier_tasks]
    names = [t["task"] for t in earlier_tasks]
    kept, dropped, note = carry_over(earlier, now, CHECKPOINT_SETTINGS, names, tasks)
    if dropped or not any(t in CHATCORE_TASKS for t in tasks):
        return [t for t in earlier_tasks if t["task"] in kept], dropped, note
    differ: dict[str, list[str]] = {}
    for t in earlier_tasks:
        if t["task"] in kept and t["task"] in CHATCORE_TASKS:
            for k in DECODE_SETTINGS:
                if t["settings"].get(k) != now[k]:
                    differ.setdefault(t["task"], []).append(f"{k} {t['settings'].get(k)!r}, now {now[k]!r}")
    if not differ:
        return [t for t in earlier_tasks if t["task"] in kept], [], None
    gone = list(differ)
    why = sorted({d for ds in differ.values() for d in ds})
    note = (f"dropped the earlier scores of {', '.join(gone)} from the record, with their per-item files: ChatCORE "
            f"averages its tasks under one setting, and they were scored with other settings ({', '.join(why)})")
    return [t for t in earlier_tasks if t["task"] in kept and t["task"] not in differ], gone, note


def task_keys(name: str) -> tuple[str, ...]:
    """The flat summary.json keys one task's scores are written under."""
    key = summary_key(name)
    return key, f"{key}_centered", f"{key}_n", f"{key}_skipped_too_long"


def flat_summary(per_task: list[dict]) -> dict:
    """summary.json's flat keys for these task scores: each task's accuracy, centered accuracy and counts,
    and ChatCORE over the scored ChatCORE tasks among them ("chatcore" only when all were scored)."""
    flat: dict = {}
    for s in per_task:
        flat.update(zip(task_keys(s["task"]), (s["accuracy"], s["centered"], s["n_scored"], s["n_skipped_too_long"])))
    core = [s for s in per_task if s["n_scored"] > 0 and s["task"] in CHATCORE_TASKS]  # not your own files
    if core:
        names = [s["task"] for s in core]
        complete = sorted(names) == sorted(CHATCORE_TASKS)
        flat["chatcore" if complete else "chatcore_partial"] = sum(s["centered"] for s in core) / len(core)
        flat["chatcore_tasks"] = names
    return flat


# ----------------------------------------------------------------------------------------------
# Entry point for `chibichat eval chat` (registered in stages/evaluate.py)


def add_chat_args(p) -> None:
    p.add_argument("--tasks", default=",".join(CHATCORE_TASKS),
                   help=f"comma-separated tasks (default: the ChatCORE set {','.join(CHATCORE_TASKS)})")
    p.add_argument("--test-sets", default="shipped", choices=TEST_SETS,
                   help="shipped (default): the subsets that ship with chibichat (ARC-E/C 500 each, MMLU 600, GSM8K "
                        "500, HumanEval 164); online: the full test splits of "
                        f"{', '.join(ONLINE_TEST_SETS)} (ARC-E 2,376, ARC-C 1,172, MMLU 14,042, GSM8K 1,319, "
                        "HumanEval 164), downloaded once into the home (or beforehand with `chibichat data tasks "
                        f"{','.join(ONLINE_TEST_SETS)}`). Generated tasks (spelling, ...) score their generated "
                        "test split either way")
    p.add_argument("--max-items", type=int, default=None, help="first N items per task (default: all)")
    add_allow_weak_arg(p)
    p.add_argument("--num-samples", type=int, default=1, help="samples per generative prompt (default: 1)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per generated answer (default: min(256, half the model's context))")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=50, help="top-k when sampling (default: 50; 0 = off)")
    p.add_argument("--seed", type=int, default=0,
                   help="with --temperature > 0: item i of a task samples with seed + i (default: 0)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="prompts per batch (default: 8)")


def run_chat(args) -> int:
    import time

    from chibichat.common import Home, init_runtime, print0, rank_gather, shutdown_runtime
    from chibichat.engine import Engine, prepare_for_inference
    from chibichat.eval.core import ModelScorer
    from chibichat.eval.metrics import checkpoint_settings, read_summary, write_eval_outputs, write_record
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import load_model

    if args.max_items is not None and args.max_items < 1:
        raise ChibiError(f"--max-items must be >= 1, got {args.max_items}")
    if args.source == "base":
        raise ChibiError("eval chat needs a chat model (--from mid, sft, rl or dpo); a base model has no chat format. "
                         "Use `chibichat eval base` for base models")
    home = Home.resolve(args.home)  # a path only: nothing is created
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    refuse_shared_keys(names)  # before any file is read or model loaded
    tasks = [eval_task(n, home, args.test_sets) for n in names]
    for task in tasks:
        if task.runs_code:
            check_sandbox(args.allow_weak_sandbox, f"eval chat --tasks {task.name}")
    rt = init_runtime(args.device, args.dtype)
    try:
        t0 = time.time()
        tok = Tokenizer.load(home.tokenizer_dir)
        model, meta = load_model(home, args.source, args.tag, args.step, rt, tokenizer=tok)
        prepare_for_inference(model)
        seq_len = model.config.seq_len
        cfg = GenSettings(num_samples=args.num_samples,
                          max_tokens=reply_budget(seq_len, args.max_new_tokens, what="--max-new-tokens"),
                          temperature=args.temperature, top_k=args.top_k or None, seed=args.seed)
        out = evaluate_chat(tasks, scorer=ModelScorer(model, rt, args.eval_batch_size),
                            gen=EngineGenerator(Engine(model, tok, rt), args.eval_batch_size), tok=tok,
                            max_len=seq_len, cfg=cfg, max_items=args.max_items, rank=rt.rank,
                            world_size=rt.world_size, gather=rank_gather(rt))
        tag = meta["checkpoint_dir"].rstrip("/").split("/")[-2]
        out_dir = home.eval_dir(args.source, tag)
        # Another eval of the same checkpoint (your own file after the speedrun's ChatCORE) adds its tasks to
        # the record instead of replacing it; a task evaluated again replaces its own entry, and the flat keys
        # (ChatCORE included) are recomputed over the whole record. The scores of another checkpoint (another
        # step, or the stage trained again since), and ChatCORE tasks of other settings where this run scores
        # ChatCORE tasks (carry_over_tasks), are dropped with their per-item files, never left beside the new ones.
        earlier = read_summary(out_dir).get("chat_eval")
        earlier = earlier if isinstance(earlier, dict) else {}
        earlier_tasks = [t for t in earlier.get("tasks", []) if isinstance(t, dict) and "task" in t]
        replaced = replaced_in_record([t["task"] for t in earlier_tasks], [t["task"] for t in out["tasks"]])
        if replaced:
            # Their keys and per-item files are the new tasks' own, which this run writes.
            print0(rt, f"replaced the earlier scores of {', '.join(replaced)} in the record: a task of this run has "
                       "the same summary keys (a local file is keyed by its file name)")
            earlier_tasks = [t for t in earlier_tasks if t["task"] not in replaced]
        settings = {**checkpoint_settings(meta), "test_sets": args.test_sets, "max_items": args.max_items,
                    "num_samples": cfg.num_samples, "max_new_tokens": cfg.max_tokens,
                    "temperature": cfg.temperature, "top_k": cfg.top_k,
                    "seed": cfg.seed if cfg.temperature > 0 else None}  # (greedy replies draw nothing)
        kept, dropped, note = carry_over_tasks(earlier, earlier_tasks, settings, [t["task"] for t in out["tasks"]])
        if note:
            print0(rt, note)
        own = {k: settings[k] for k in DECODE_SETTINGS}
        out["tasks"] = [{**t, "settings": own} for t in out["tasks"]]
        stale = {k for t in earlier_tasks for k in task_keys(t["task"])} | set(CHATCORE_KEYS)
        summary = {**flat_summary(kept + out["tasks"]), "chat_eval": {
            "stage": args.source, "tag": tag, **settings, "tasks": kept + out["tasks"],
            "world_size": rt.world_size, "seconds": time.time() - t0}}
        if rt.is_master:
            for name, rows in out["items"].items():
                write_eval_outputs(out_dir, items_name(name), rows, None)
            # Files this run just wrote stay (two local files of the same name share them).
            write_record(out_dir, summary, stale, [items_name(n) for n in dropped],
                         [items_name(n) for n in out["items"]])
        for s in out["tasks"]:
            if s["n_scored"] == 0:
                print0(rt, f"{s['task']:>14}: not scored: {s['note']} ({s['n_skipped_too_long']} items)")
                continue
            print0(rt, f"{s['task']:>14}: {s['accuracy']:.4f} (centered {s['centered']:+.4f}, n={s['n_scored']}, "
                       f"skipped too long {s['n_skipped_too_long']})")
        key = next((k for k in ("chatcore", "chatcore_partial") if k in out["summary"]), None)
        whole = next((k for k in ("chatcore", "chatcore_partial") if k in summary), None)
        record = f" ({whole} {summary[whole]:.4f} over the record's {len(kept) + len(out['tasks'])} tasks)" \
            if kept and whole else ""
        print0(rt, (f"{key}: {out['summary'][key]:.4f}{record} | " if key else "") + f"{args.test_sets} test sets | "
                   f"wrote {out_dir / 'summary.json'}")
        return 0
    finally:
        shutdown_runtime(rt)
