"""CORE-style in-context evaluation of a base model (the three DCLM task kinds).

  multiple_choice    one context, several continuations: predict the continuation with the lowest
                     mean loss per continuation token.
  schema             several contexts, one shared continuation: predict the context under which the
                     continuation has the lowest mean loss.
  language_modeling  correct only if greedy argmax reproduces every continuation token.

Each task reports accuracy and centered accuracy (acc - b) / (1 - b); CORE is the mean centered
accuracy over tasks. The score is labelled "CORE" only when the full DCLM bundle was evaluated and
"CORE-lite" otherwise (the shipped subsets are a different, smaller test and must not be confused
with published CORE numbers).

Scoring goes through a small `Scorer` interface (`continuation_scores`, `next_token_logprobs`) so
that fake models (always-first, oracle) can test the logic exactly; `ModelScorer` implements it for
a GPT with batched forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from chibichat.common import ChibiError
from chibichat.eval.metrics import accuracy, centered

CORE_KINDS = ("multiple_choice", "schema", "language_modeling")
SHOT_SEPARATOR = "\n\n"  # demonstrations are separated by a blank line (tasks/base.py "core" schema)


class Scorer(Protocol):
    max_len: int  # the longest token sequence it can score (the model's context)

    def continuation_scores(self, requests: Sequence[tuple[list[int], int]]) -> list[tuple[list[float], list[int]]]:
        """For each (ids, start): per continuation token ids[start:], its loss in nats given all earlier
        tokens, and the model's greedy (argmax) prediction for that position."""
        ...

    def next_token_logprobs(self, prompts: Sequence[list[int]], candidates: Sequence[list[int]]) -> list[list[float]]:
        """For each prompt, log p(next token = c) over the full vocabulary, for each candidate id c."""
        ...


# ----------------------------------------------------------------------------------------------
# Tasks: any object with name, len, [i], num_fewshot, random_baseline and fewshot_indices(i)
# (chibichat.tasks.base.CoreTask and its views). Items follow the "core" schema of tasks/base.py:
#   {"type": "multiple_choice", "context", "continuations", "gold"}
#   {"type": "schema", "contexts", "continuation", "gold"}
#   {"type": "language_modeling", "context", "continuation"}
# The text is exactly context + continuation; the continuation's tokens, with the spaces that end the context
# (_move_trailing_spaces), are the scored ones: a separator such as "\nAnswer: " ends the context, as in DCLM.

_FIELDS = {"multiple_choice": ("context", "continuations", "gold"), "schema": ("contexts", "continuation", "gold"),
           "language_modeling": ("context", "continuation")}


def task_kind(task) -> str:
    """The one item type a CORE task holds; every item is validated so a bad file fails by name."""
    if len(task) == 0:
        raise ChibiError(f"CORE task {task.name!r} has no items")
    kinds = set()
    for i in range(len(task)):
        _validate_item(task.name, i, task[i])
        kinds.add(task[i]["type"])
    if len(kinds) != 1:
        raise ChibiError(f"CORE task {task.name!r} mixes item types {sorted(kinds)}; one task holds one type")
    return kinds.pop()


def _validate_item(name: str, i: int, it: dict) -> None:
    where = f"CORE task {name!r} item {i}"
    kind = it.get("type") if isinstance(it, dict) else None
    if kind not in CORE_KINDS:
        raise ChibiError(f"{where}: 'type' must be one of {CORE_KINDS}, got {kind!r}")
    missing = [k for k in _FIELDS[kind] if k not in it]
    if missing:
        raise ChibiError(f"{where} lacks field(s) {missing} required by type {kind!r}")
    options = {"multiple_choice": it.get("continuations"), "schema": it.get("contexts")}.get(kind)
    if kind != "language_modeling":
        if not isinstance(options, list) or len(options) < 2:
            raise ChibiError(f"{where}: needs a list of at least 2 options, got {options!r:.80}")
        if not isinstance(it["gold"], int) or not 0 <= it["gold"] < len(options):
            raise ChibiError(f"{where}: gold {it['gold']!r} is not an index into its {len(options)} options")


@dataclass
class ItemResult:
    task: str
    index: int
    status: str  # "ok" | "skipped_too_long"
    correct: bool | None = None
    pred: int | None = None
    gold: int | None = None
    n_tokens: int = 0  # longest scored sequence (with few-shot prompt), for the over-length report
    losses: list[float] = field(default_factory=list)  # mean continuation loss per option (MC/schema)


# ----------------------------------------------------------------------------------------------
# Prompts


def _shot_text(it: dict) -> str:
    """A demonstration: the item's context followed by its gold continuation."""
    if it["type"] == "multiple_choice":
        return it["context"] + it["continuations"][it["gold"]]
    if it["type"] == "schema":
        return it["contexts"][it["gold"]] + it["continuation"]
    return it["context"] + it["continuation"]


def _move_trailing_spaces(ctx: str, cont: str) -> tuple[str, str]:
    """Spaces at the end of a context belong to the continuation: BPE with a GPT-4 split glues a
    leading space to the next word (" Paris"), so cutting before the space gives the tokens a natural
    reading of the full string would."""
    stripped = ctx.rstrip(" ")
    return stripped, ctx[len(stripped):] + cont


def item_texts(task, index: int) -> list[tuple[str, str]]:
    """(context, continuation) text pairs to score for one item, few-shot prefix included."""
    it = task[index]
    demo = task.fewshot_indices(index)
    if index in demo:  # would leak the answer into the prompt
        raise ChibiError(f"CORE task {task.name!r}: item {index} was drawn as its own demonstration")
    shots = [_shot_text(task[j]) for j in demo]
    prefix = "".join(s + SHOT_SEPARATOR for s in shots)
    if it["type"] == "multiple_choice":
        pairs = [(prefix + it["context"], c) for c in it["continuations"]]
    elif it["type"] == "schema":
        pairs = [(prefix + c, it["continuation"]) for c in it["contexts"]]
    else:
        pairs = [(prefix + it["context"], it["continuation"])]
    return [_move_trailing_spaces(c, x) for c, x in pairs]


def item_requests(tok, task, index: int) -> list[tuple[list[int], int]]:
    """Token requests (ids, start) for one item: BOS + context, then the continuation tokens."""
    reqs = []
    for ctx, cont in item_texts(task, index):
        ctx_ids = [tok.bos_id, *tok.encode(ctx)]
        cont_ids = tok.encode(cont)
        if not cont_ids:
            raise ChibiError(f"CORE task {task.name!r} item {index}: the continuation is empty; fix the data")
        reqs.append((ctx_ids + cont_ids, len(ctx_ids)))
    return reqs


# ----------------------------------------------------------------------------------------------
# Scoring


def score_items(scorer: Scorer, tok, task, indices: Sequence[int], kind: str | None = None) -> list[ItemResult]:
    """Score the given items with one flat, batched list of requests (the scorer batches them)."""
    kind = kind or task_kind(task)
    results: list[ItemResult] = []
    flat: list[tuple[list[int], int]] = []
    owners: list[tuple[int, int]] = []  # (position in results, option index)
    for i in indices:
        gold = task[i].get("gold")
        # Cheap first: the longest context alone (+ BOS + one continuation token) already over the
        # context means the item is skipped without tokenizing every option.
        bound = 2 + max(len(tok.encode(ctx)) for ctx, _ in item_texts(task, i)[:2])
        if bound > scorer.max_len:
            results.append(ItemResult(task.name, i, "skipped_too_long", gold=gold, n_tokens=bound))
            continue
        reqs = item_requests(tok, task, i)
        longest = max(len(ids) for ids, _ in reqs)
        if longest > scorer.max_len:
            # Over the model's context: counted and reported, never silently cut.
            results.append(ItemResult(task.name, i, "skipped_too_long", gold=gold, n_tokens=longest))
            continue
        results.append(ItemResult(task.name, i, "ok", gold=gold, n_tokens=longest))
        for k, r in enumerate(reqs):
            flat.append(r)
            owners.append((len(results) - 1, k))
    scores = scorer.continuation_scores(flat) if flat else []
    per_item: dict[int, list] = {}
    for (pos, k), (ids_start, sc) in zip(owners, zip(flat, scores)):
        per_item.setdefault(pos, []).append((ids_start, sc))
    for pos, opts in per_item.items():
        res = results[pos]
        if kind == "language_modeling":
            (ids, start), (losses, argmax) = opts[0]
            res.correct = list(argmax) == ids[start:]
            res.losses = [sum(losses) / len(losses)]
        else:
            res.losses = [sum(losses) / len(losses) for _, (losses, _) in opts]
            res.pred = min(range(len(res.losses)), key=lambda j: res.losses[j])  # ties -> first option
            res.correct = res.pred == res.gold
    return results


@dataclass
class TaskSummary:
    name: str
    kind: str
    accuracy: float | None  # None: no item fits the model's context (reported, left out of the mean)
    baseline: float
    centered: float | None
    n_scored: int
    n_skipped_too_long: int
    num_fewshot: int


def summarize_task(task, kind: str, results: list[ItemResult]) -> TaskSummary:
    scored = [r for r in results if r.status == "ok"]
    skipped = len(results) - len(scored)
    b = task.random_baseline
    if not scored:
        return TaskSummary(task.name, kind, None, b, None, 0, skipped, task.num_fewshot)
    acc = accuracy([bool(r.correct) for r in scored])
    return TaskSummary(task.name, kind, acc, b, centered(acc, b), len(scored), skipped, task.num_fewshot)


def evaluate_core(scorer: Scorer, tok, tasks: list, *, full_bundle: bool,
                  rank: int = 0, world_size: int = 1, gather=None) -> dict:
    """Evaluate every task; returns {"label", "score", "tasks": [summaries], "items": [per-item rows]}.

    Ranks stride over items; `gather(list) -> list of lists` (all ranks' results) merges them.
    To evaluate a subset, pass views (e.g. `task.shuffled(1337).slice(0, n)`).
    """
    if not tasks:
        raise ChibiError("no CORE tasks to evaluate")
    all_rows, summaries = [], []
    for task in tasks:
        kind = task_kind(task)
        results = score_items(scorer, tok, task, range(rank, len(task), world_size), kind)
        if gather is not None:
            results = [r for part in gather(results) for r in part]
            results.sort(key=lambda r: r.index)
        s = summarize_task(task, kind, results)
        summaries.append(s.__dict__)
        all_rows += [r.__dict__ for r in results]
    scored = [s for s in summaries if s["n_scored"] > 0]
    if not scored:
        raise ChibiError("no item of any CORE task fits the model's context (items with their few-shot prompts "
                         "are longer); use a longer-context model or fewer shots")
    score = sum(s["centered"] for s in scored) / len(scored)
    # The full-bundle label needs every item of every task scored; a skipped item (too long for the
    # context) or an unscored task makes the mean a different test.
    complete = len(scored) == len(summaries) and all(s["n_skipped_too_long"] == 0 for s in summaries)
    label = "CORE" if full_bundle and complete else "CORE-lite"
    return {"label": label, "score": score, "tasks": summaries, "items": all_rows,
            "unscored": [s["name"] for s in summaries if s["n_scored"] == 0]}


# ----------------------------------------------------------------------------------------------
# The real model behind the Scorer interface


class ModelScorer:
    """Batched scoring with a GPT. Rows of a batch are right-padded: the model is causal (attention
    and SLC2 convolutions only look left), so padding after a row's end cannot change its scores."""

    def __init__(self, model, rt, batch_size: int = 8):
        if batch_size < 1:
            raise ChibiError(f"--eval-batch-size must be >= 1, got {batch_size}")
        self.model, self.rt, self.batch_size = model, rt, batch_size
        self.max_len = model.config.seq_len

    def _logits(self, rows: list[list[int]]):
        import torch

        for r in rows:
            if not r or len(r) > self.max_len:
                raise ChibiError(f"cannot score a sequence of {len(r)} tokens with a {self.max_len}-token model")
        width = max(len(r) for r in rows)
        idx = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        idx = idx.to(self.rt.device)
        # The GPT casts to its own compute_dtype inside forward (set by the stage from the Runtime)
        # and returns fp32 logits, so no autocast here.
        with torch.no_grad():
            return self.model(idx).float()

    def _batches(self, lengths: list[int]):
        # Sort by length so each batch pads little; yield index lists.
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        for s in range(0, len(order), self.batch_size):
            yield order[s : s + self.batch_size]

    def continuation_scores(self, requests):
        import torch

        out: list = [None] * len(requests)
        for batch in self._batches([len(ids) for ids, _ in requests]):
            logits = self._logits([requests[i][0] for i in batch])
            for row, i in enumerate(batch):
                ids, start = requests[i]
                if not 1 <= start < len(ids):
                    raise ChibiError(f"bad scoring request: continuation start {start} for {len(ids)} tokens")
                # position p predicts token p+1
                lg = logits[row, start - 1 : len(ids) - 1]
                target = torch.tensor(ids[start:], device=lg.device)
                losses = torch.nn.functional.cross_entropy(lg, target, reduction="none")
                out[i] = (losses.tolist(), lg.argmax(dim=-1).tolist())
        return out

    def next_token_logprobs(self, prompts, candidates):
        import torch

        out: list = [None] * len(prompts)
        for batch in self._batches([len(p) for p in prompts]):
            logits = self._logits([prompts[i] for i in batch])
            for row, i in enumerate(batch):
                logp = torch.log_softmax(logits[row, len(prompts[i]) - 1], dim=-1)
                out[i] = logp[torch.tensor(candidates[i], device=logp.device)].tolist()
        return out


# ----------------------------------------------------------------------------------------------
# Entry point for `chibichat eval base` (the stage merges the returned keys into summary.json)

SHUFFLE_SEED = 1337  # a --core-items subset is the first N of this fixed shuffle, so it is stable


CORE_ITEMS_LITE = 100  # default --core-items for the shipped subsets (a CPU-sized check)


def add_core_args(p) -> None:
    p.add_argument("--core", dest="core", nargs="?", const="lite", default="lite", choices=["lite", "full"],
                   help="CORE-style in-context tasks: lite = the shipped subsets (offline, labelled CORE-lite; "
                        "the default), full = the real DCLM eval bundle (downloaded into the home once per bundle URL, "
                        "labelled CORE when every task and item is scored)")
    p.add_argument("--no-core", dest="core", action="store_false", help="skip the CORE-style tasks")
    p.add_argument("--core-bundle-url", default=None,
                   help="where --core full downloads eval_bundle.zip (default: $CHIBICHAT_CORE_BUNDLE_URL, else nanochat's copy, "
                        "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip); the cached zip is "
                        "reused for the URL it came from and replaced by a download from another")
    p.add_argument("--core-tasks", default=None,
                   help="comma-separated task names (default: every task: the shipped core-* tasks, or with "
                        "--core full every label of the bundle's core.yaml)")
    p.add_argument("--core-items", type=int, default=None,
                   help=f"items per task, the first N of a fixed shuffle (default: {CORE_ITEMS_LITE} for lite as a "
                        "CPU-sized check, every item for full; 0 = every item; the counts are in the summary)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")


def core_tasks(args, home=None) -> tuple[list, bool]:
    """(tasks to score, whether together they are the complete DCLM CORE test)."""
    from chibichat.tasks.registry import get_task, list_tasks

    mode = getattr(args, "core", "lite") or "lite"
    items = args.core_items if args.core_items is not None else (CORE_ITEMS_LITE if mode == "lite" else 0)
    if items < 0:
        raise ChibiError(f"--core-items must be >= 0 (0 = every item), got {items}")
    wanted = [n.strip() for n in args.core_tasks.split(",") if n.strip()] if args.core_tasks else None
    if mode == "full":
        from chibichat.tasks.dclm import BUNDLE_URL, fetch_bundle, load_bundle

        if home is None:
            raise ChibiError("--core full needs a home to cache the DCLM bundle in")
        import os

        url = args.core_bundle_url or os.environ.get("CHIBICHAT_CORE_BUNDLE_URL") or BUNDLE_URL
        bundle = {t.name: t for t in load_bundle(fetch_bundle(home, url))}
        unknown = [n for n in wanted or [] if n not in bundle]
        if unknown:
            raise ChibiError(f"--core-tasks names {unknown}, not in the DCLM bundle; its tasks: {', '.join(bundle)}")
        base = [bundle[n] for n in wanted] if wanted else list(bundle.values())
    else:
        base = []
        for n in wanted or [n for n in list_tasks() if n.startswith("core-")]:
            t = get_task(n)
            if t.kind != "core":
                raise ChibiError(f"--core-tasks names {n!r}, a task of kind {t.kind!r}; CORE takes core-* tasks")
            base.append(t)
    tasks = [t.shuffled(SHUFFLE_SEED).slice(0, items) if items and items < len(t) else t for t in base]
    # "CORE" is DCLM's number: every task of the bundle, every item. Anything less is CORE-lite.
    complete = mode == "full" and wanted is None and all(len(t) == len(b) for t, b in zip(tasks, base))
    return tasks, complete, items


def is_core_key(key) -> bool:
    """Whether a summary.json key is one run_core writes ("core" and "core_*"); no other evaluation's key
    starts so (chat and JGLUE tasks are never of kind core), so `eval base` can drop them all as a set."""
    return isinstance(key, str) and (key == "core" or key.startswith("core_"))


def run_core(model, tok, rt, out_dir, args, home=None) -> dict:
    """Score the CORE tasks with `model`; write core.jsonl/core.csv (rank 0); return flat summary keys:
    core, core_label, core_<task> (centered) and the per-task details under core_tasks."""
    from chibichat.eval.metrics import write_eval_outputs

    from chibichat.common import rank_gather

    tasks, complete, items = core_tasks(args, home)
    out = evaluate_core(ModelScorer(model, rt, args.eval_batch_size), tok, tasks, full_bundle=complete,
                        rank=rt.rank, world_size=rt.world_size, gather=rank_gather(rt))
    if rt.is_master:
        write_eval_outputs(out_dir, "core", out["items"], None)
    flat = {"core": out["score"], "core_label": out["label"]}
    for s in out["tasks"]:
        key = s["name"].replace("-", "_")  # bundle labels (arc_easy, ...) get the core_ prefix of the
        flat[key if key.startswith("core_") else f"core_{key}"] = s["centered"]  # lite names: no clash with chat keys
    flat["core_skipped_too_long"] = sum(s["n_skipped_too_long"] for s in out["tasks"])
    flat["core_unscored_tasks"] = out["unscored"]  # no item fit the context: left out of the mean
    flat["core_tasks"] = out["tasks"]
    flat["core_items_per_task"] = items or "all"
    flat["core_source"] = "dclm-bundle" if getattr(args, "core", "lite") == "full" else "shipped"
    return flat
