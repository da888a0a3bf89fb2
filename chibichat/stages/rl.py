"""`chibichat rl`: on-policy policy gradient with group-relative advantages on verifiable rewards.

nanochat's simplified GRPO, which is REINFORCE with a per-group mean baseline:
each step takes P training prompts, samples G completions of each with the engine (tools on: the
calculator runs and its output is forced into the sequence), scores every completion with the
task's own checker (reward 0/1), and sets the advantage A = r - mean(r over the prompt's group) (no
std normalisation, no KL, no ratio clipping: one update per batch, so the samples come from the weights
being updated). The loss is -sum(log p(token) * A) over the *sampled* generated tokens, divided by their
number (token-level mean across the whole step): prompt tokens and tool-forced tokens are not the
policy's choices and carry no gradient. The samples are not drawn from the distribution the loss
differentiates, though: sampling applies --temperature and --top-k (default 50) and the engine never
samples <|output_start|>/<|output_end|>, while log p is the model's full softmax; no importance ratio
corrects for that, so the update is near on-policy, not exactly. A group whose samples all got the same reward has A = 0
everywhere: it teaches nothing, so it is left out of the batch (and out of the token count that
normalises the loss, which would otherwise shrink the step by the share of such groups). A micro-batch
whose groups are all flat carries no targets, and an optimizer step none of whose micro-batches (on any
rank) has a target is skipped whole (LoopConfig.skip_empty_steps): with zero advantages the gradient is
zero, but Muon's momentum and AdamW's moments would still move the weights. Skipped steps are logged
and counted in summary.json ("skipped_steps"). For the same reason a step's learning rate is scaled by
the share of groups that carry a signal (`signal_share`, the loop's lr_share_fn): Muon and Adam step about
as far whatever the gradient's norm, so without it a step resting on one group of eight (mostly that
group's sampling noise) moves the weights as far as a step resting on all eight. Once SFT has nearly
solved the training prompts, most groups are flat and the unscaled steps were what made RL unlearn
(docs/benchmarks.md, "RL steps scaled by their signal").

A resumed run continues the rollout cursor only under the settings that produced it: the sampler state
carries a fingerprint of the prompt stream and its sampling (task, every prompt and its item, order seed, prompts per
micro-batch, samples per prompt, max new tokens, temperature, top-k, ranks) and a mismatch is refused.

Offline the tasks are the generated ones (by default one- and two-step arithmetic with the calculator in
turn: SFT leaves the two-step problems only partly solved, and RL on them alone unlearned one-step
problems; also spelling and letter counting; their test splits are disjoint from train); online,
GSM8K's train split (`--task gsm8k-train --eval-task gsm8k`). Before and after training, pass@k
(k = 1..K, unbiased estimator) is measured on held-out prompts; the per-step training reward is logged
in metrics.jsonl ("reward"), and summary.json holds the curve and pass@k before/after.

Under torchrun every rank samples its own prompts (rank r takes prompts r, r+W, ... of the task's
seeded shuffle, with a sampling seed that includes r) and scores its own groups; advantages never mix
ranks. The loop divides every rank's loss sum by the step's global token count and the optimizer
sums gradients over ranks, so the update is the per-token mean over the global batch. Logged and
summarised rewards are means over all ranks' samples (each rank draws the same number per batch).
"""

from __future__ import annotations

import time

from chibichat.common import ChibiError, add_home_arg, add_runtime_args, check_at_least, gather_objects
from chibichat.sandbox import add_allow_weak_arg, check_sandbox


# ----------------------------------------------------------------------------------------------
# Advantages and rows (pure functions: tested directly)


def group_advantages(rewards: list[list[float]]) -> list[list[float]]:
    """A = r - mean(r) within each prompt's group of samples; exactly 0 where the group's rewards are all
    equal (the float mean of equal non-dyadic rewards such as 0.1 is not quite the reward, and a flat group
    must read as flat to informative_groups)."""
    out = []
    for group in rewards:
        if not group:
            raise ChibiError("a prompt got no samples; --num-samples must be >= 1")
        m = sum(group) / len(group)
        out.append([0.0] * len(group) if min(group) == max(group) else [r - m for r in group])
    return out


def informative_groups(advantages: list[list[float]]) -> list[int]:
    """Indices of the groups with some non-zero advantage (their rewards differ); at least one index
    (the first group) so that a micro-batch whose groups are all flat is still well-formed (it then
    carries no targets: see RolloutBatches)."""
    keep = [g for g, a in enumerate(advantages) if any(x != 0.0 for x in a)]
    return keep or [0]


def reward_windows(curve: list[float], windows: int = 5) -> list[float]:
    """Mean reward of `windows` consecutive, near-equal slices of the per-batch curve (first -> last):
    the compact curve the summary and the report show."""
    if not curve:
        raise ChibiError("the RL run recorded no reward; it ran no step")
    n = min(windows, len(curve))
    bounds = [round(k * len(curve) / n) for k in range(n + 1)]
    return [sum(curve[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]


def windows_label(windows: list[float]) -> str:
    """What reward_windows' values are: fifths of the run, or (a run of fewer than five steps) its steps."""
    return "fifths of the run" if len(windows) == 5 else "step"


def sample_rows(prompt: list[int], tokens: list[int], forced: list[int], advantage: float, pad_id: int, width: int):
    """(inputs, targets, weights) of one prompt+completion, padded to `width` + 1 tokens.

    Targets are the completion's sampled tokens; prompt tokens, tool-forced tokens and padding are -1.
    Weights hold the advantage at every target position (0 elsewhere)."""
    if not prompt:
        raise ChibiError("an RL sample needs a non-empty prompt: its first completion token is predicted from the "
                         "prompt's last one")
    if len(tokens) != len(forced):
        raise ChibiError(f"an RL sample has {len(tokens)} tokens but {len(forced)} forced flags; they must be "
                         "one flag per token")
    ids = prompt + tokens
    if len(ids) > width + 1:
        raise ChibiError(f"a prompt+completion of {len(ids)} tokens exceeds the row of {width + 1}")
    targets = [-1] * (len(prompt) - 1) + [t if not f else -1 for t, f in zip(tokens, forced)]
    ids = ids + [pad_id] * (width + 1 - len(ids))
    targets = targets + [-1] * (width - len(targets))
    weights = [advantage if t >= 0 else 0.0 for t in targets]
    return ids[:-1], targets, weights


def signal_share(batch) -> tuple[int, int]:
    """The loop's lr_share_fn: (groups with a learning signal, groups drawn) of a micro-batch."""
    return batch[3]


def pg_loss_sum(model, batch):
    """The loop's loss_fn: sum over sampled tokens of -log p(token) * A, and how many tokens."""
    x, y, w = batch[:3]
    nll = model(x, y, reduction="none")  # (B, T), 0 where y == -1
    return (nll * w).sum(), int((y >= 0).sum())


# ----------------------------------------------------------------------------------------------
# The on-policy batch source


class RolloutBatches:
    """Each micro-batch: P prompts (this rank's stride of a shuffled task) x G engine samples, as
    (inputs, targets, advantage weights). Sampling happens when the loop asks for the batch, i.e.
    with the weights of the current step. The sampling seed is a function of (seed, batch index,
    rank), so a resumed run draws what the uninterrupted one would have."""

    def __init__(self, engine, tok, task, rt, *, prompts: int, samples: int, max_tokens: int,
                 temperature: float, top_k: int | None, seed: int):
        from chibichat.render import render_for_completion

        self.engine, self.tok, self.task, self.rt = engine, tok, task, rt
        self.prompts, self.samples, self.max_tokens = prompts, samples, max_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        seq_len = engine.seq_len
        self.width = seq_len
        # Prompts that leave no room for max_tokens are skipped and counted, never cut.
        self.items, self.skipped_too_long = [], 0
        order = task.shuffled(seed)
        if len(order) < rt.world_size:  # the same on every rank: all stop here, none waits in a collective
            raise ChibiError(f"task {task.name!r} has {len(order)} training prompt(s) for {rt.world_size} ranks, and "
                             "every rank samples prompts of its own; use more prompts (--train-items for a generated "
                             f"task) or run with at most {len(order)} rank(s)")
        for i in range(rt.rank, len(order), rt.world_size):
            item = order[i]
            ids = render_for_completion(tok, item, 1 << 30)
            if len(ids) + max_tokens > seq_len:
                self.skipped_too_long += 1
                continue
            self.items.append((item, ids))
        if not self.items:
            raise ChibiError(f"no prompt of task {task.name!r} leaves room for --max-new-tokens {max_tokens} in the "
                             f"{seq_len}-token context; lower --max-new-tokens")
        self.cursor, self.batches = 0, 0
        self.history: list[dict] = []  # per batch: mean reward, mean completion length
        from chibichat.data.loader import _digest

        n = len(self.items)
        # every prompt this rank samples and the item it is scored against (its answer), in order: an edited,
        # reordered or re-answered task is another stream
        self.fingerprint = {"task": task.name, "items": n, "prompts": _digest([[ids, item] for item, ids in self.items]),
                            "seed": seed, "prompts_per_step": prompts, "rank": rt.rank, "world_size": rt.world_size,
                            "num_samples": samples, "max_new_tokens": max_tokens, "temperature": temperature,
                            "top_k": top_k}

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        picked = [self.items[(self.cursor + k) % len(self.items)] for k in range(self.prompts)]
        self.cursor = (self.cursor + self.prompts) % len(self.items)
        seed = self.seed * 1_000_003 + self.batches * 1009 + self.rt.rank
        self.batches += 1
        outs = self.engine.generate([ids for _, ids in picked], num_samples=self.samples, max_tokens=self.max_tokens,
                                    temperature=self.temperature, top_k=self.top_k, seed=seed, tools=True)
        rewards = [[float(self.task.evaluate(item, s.text)) for s in group] for (item, _), group in zip(picked, outs)]
        adv = group_advantages(rewards)
        keep = informative_groups(adv)
        xs, ys, ws = [], [], []
        for g in keep:
            (_, ids), group, a_group = picked[g], outs[g], adv[g]
            for s, a in zip(group, a_group):
                x, y, w = sample_rows(ids, s.tokens, s.forced, a, self.tok.bos_id, self.width)
                xs.append(x), ys.append(y), ws.append(w)
        flat = [r for g in rewards for r in g]
        lengths = [len(s.tokens) for g in outs for s in g]
        informative = len(keep) if any(x != 0.0 for x in adv[keep[0]]) else 0
        if not informative:  # every group flat: no targets, so the loop skips the step if no rank has any
            ys = [[-1] * len(y) for y in ys]
        self.history.append({"reward": sum(flat) / len(flat), "length": sum(lengths) / len(lengths),
                             "groups_used": informative / len(adv)})
        # Trim the common right padding: rows are padded to the context, most of it unused.
        y = torch.tensor(ys, dtype=torch.long)
        used = int((y >= 0).any(0).nonzero().max()) + 1 if bool((y >= 0).any()) else 1
        return (torch.tensor(xs, dtype=torch.long)[:, :used], y[:, :used],
                torch.tensor(ws, dtype=torch.float32)[:, :used], (informative, len(adv)))

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "batches": self.batches, "history": self.history,
                "fingerprint": dict(self.fingerprint)}

    def load_state_dict(self, d: dict) -> None:
        saved = d.get("fingerprint") if isinstance(d, dict) else None
        if not isinstance(saved, dict):
            raise ChibiError("--resume: the saved RL sampler state has no fingerprint of its prompt stream (an "
                             "older or foreign checkpoint), so its cursor cannot be trusted; start a new --tag "
                             "or pass --overwrite")
        diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self.fingerprint.items() if saved.get(k) != v]
        if diff:
            raise ChibiError(f"--resume: the saved RL run sampled another prompt stream ({'; '.join(diff)}); resume "
                             "with the same --task, --train-items, --seed, --prompts-per-step, --num-samples, "
                             "--max-new-tokens, --temperature, --top-k and number of ranks, or start a new --tag")
        try:
            self.cursor, self.batches, self.history = int(d["cursor"]), int(d["batches"]), list(d["history"])
        except (KeyError, TypeError, ValueError) as e:
            raise ChibiError(f"--resume: the saved RL sampler state is malformed ({e})") from None


def rank_mean(rt, vals):
    """Element-wise mean of a float64 CPU tensor over ranks (the tensor itself on one process)."""
    if not rt.distributed:
        return vals
    import torch.distributed as dist

    out = vals.to(rt.device)
    dist.all_reduce(out)
    return (out / rt.world_size).cpu()


def rank_sum_int(rt, n: int) -> int:
    """An integer count summed over ranks."""
    if not rt.distributed:
        return n
    import torch
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64, device=rt.device)
    dist.all_reduce(t)
    return int(t[0])


# ----------------------------------------------------------------------------------------------
# pass@k on held-out prompts


def pass_at_k_eval(engine, tok, task, rt, *, items: int, k: int, max_tokens: int, temperature: float,
                   top_k: int | None, seed: int, batch: int = 8) -> dict:
    """{"pass@1": .., ..., "pass@k": .., "n": items scored, "skipped_too_long": n} over this task's
    first `items` prompts, k samples each. The prompts that fit are cut into batches of `batch` with
    seed + offset each; ranks take whole batches (r, r+W, ...) and the counts are gathered in prompt
    order, so W ranks draw exactly the samples one process draws."""
    from chibichat.eval.metrics import pass_at_k
    from chibichat.render import render_for_completion

    n = min(items, len(task))
    fitting, skipped = [], 0
    for i in range(n):  # every rank checks every prompt (cheap), so all agree on the batches
        ids = render_for_completion(tok, task[i], 1 << 30)
        if len(ids) + max_tokens > engine.seq_len:
            skipped += 1
        else:
            fitting.append((i, ids))
    counts = []  # (prompt index, samples right)
    for c, s in enumerate(range(0, len(fitting), batch)):
        if c % rt.world_size != rt.rank:
            continue
        chunk = fitting[s : s + batch]
        outs = engine.generate([ids for _, ids in chunk], num_samples=k, max_tokens=max_tokens,
                               temperature=temperature, top_k=top_k, seed=seed + s, tools=True)
        for (i, _), group in zip(chunk, outs):
            counts.append((i, sum(bool(task.evaluate(task[i], smp.text)) for smp in group)))
    counts = [c for _, c in sorted(x for p in gather_objects(rt, counts) for x in p)]
    if not counts:
        raise ChibiError(f"pass@k: no prompt of {task.name!r} fits the context with --max-new-tokens {max_tokens}")
    out = {f"pass@{j}": sum(pass_at_k(k, c, j) for c in counts) / len(counts) for j in range(1, k + 1)}
    out.update(n=len(counts), skipped_too_long=skipped)
    return out


# ----------------------------------------------------------------------------------------------
# The stage


def register(sub):
    from chibichat.tasks.registry import CPU_RL_TASKS
    from chibichat.train.finetune import add_loop_args, add_optim_args, add_source_args

    p = sub.add_parser(
        "rl", help="RL with group-relative advantages on verifiable rewards (pass@k before/after)",
        description=__doc__.split("\n\n")[0] + " Samples with the engine (tools on), reward from the task's "
                    "checker, A = r - mean(group), loss over sampled tokens only.")
    add_home_arg(p)
    add_runtime_args(p)
    add_source_args(p, "sft")
    # The CPU presets' pair: RL on the two-step problems alone lowered the one-step score (docs/benchmarks.md).
    p.add_argument("--task", default=CPU_RL_TASKS[0],
                   help=f"generative training task with a checker, or a comma list of them taken in turn (default: "
                        f"{CPU_RL_TASKS[0]}, one- and two-step problems; a Japanese model: {CPU_RL_TASKS[1]}; "
                        "offline also spelling, letter-count and their -ja variants; online gsm8k-train)")
    p.add_argument("--eval-task", default=None,
                   help="held-out task for pass@k (default: the test split(s) of a generated --task)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per micro-batch (default: 8)")
    p.add_argument("--num-samples", type=int, default=8, help="samples per prompt, the group size (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per completion (default: min(128, half the model's context))")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling (default: 50; 0 = off)")
    p.add_argument("--train-items", type=int, default=2000, help="generated training prompts, per task of a --task list (default: 2000)")
    p.add_argument("--passk-items", type=int, default=48, help="held-out prompts for pass@k (default: 48)")
    add_allow_weak_arg(p)
    p.add_argument("--passk-k", type=int, default=4, help="largest k of pass@k, = samples per prompt (default: 4)")
    # A small --lr-frac: Muon takes a full-size step even when the advantage-weighted gradient is mostly
    # noise, and larger fractions drifted down or collapsed the reward (docs/benchmarks.md).
    add_optim_args(p, lr_frac=0.15)
    add_loop_args(p, steps=60, batch=None, evals=False, samples=False)  # the reward is logged every step
    p.set_defaults(func=run, warmdown_frac=0.2)


def check_task_names(args) -> None:
    """Before anything loads: --task must be a known task that is not evaluation-only, --eval-task a
    known task."""
    from chibichat.tasks.leakage import refuse_eval_only
    from chibichat.tasks.local import is_file_task
    from chibichat.tasks.registry import CPU_RL_TASKS, get_spec

    names = task_names(args.task)
    refuse_eval_only(names, "--task")
    if args.eval_task is not None and not is_file_task(args.eval_task):
        get_spec(args.eval_task)
    if len(names) > 1 and args.eval_task is not None:
        which = " (the default)" if args.task == CPU_RL_TASKS[0] else ""
        raise ChibiError(f"--task {args.task}{which} lists {len(names)} tasks; their held-out prompts are their own "
                         "test splits, so drop --eval-task, or name the one task it goes with (e.g. --task "
                         "gsm8k-train --eval-task gsm8k)")


def task_names(spec: str) -> list[str]:
    """`--task` as a list of names: one task or a comma list ("arithmetic,spelling")."""
    names = [n.strip() for n in spec.split(",")]
    if not all(names):
        raise ChibiError(f"--task {spec!r} has an empty name; write one task or a comma list such as "
                         "arithmetic,arithmetic-multi")
    if len(set(names)) != len(names):
        raise ChibiError(f"--task {spec!r} names a task twice")
    return names


def _tasks(args, home):
    """(training task, held-out task), checked disjoint by content from each other and from the
    evaluation sets the chat evaluations report against."""
    from chibichat.tasks.registry import get_task, home_option
    from chibichat.tasks.base import GeneratedTask, TaskUnion
    from chibichat.tasks.leakage import check_disjoint, refuse_eval_only_task, reported_eval_sets

    names = task_names(args.task)
    if len(names) > 1:
        # Several generated tasks: --train-items prompts of each, taken in turn, and their test splits (in
        # turn too, so pass@k's first --passk-items prompts hold every task in equal shares).
        built = [get_task(n, **home_option(n, home)) for n in names]
        other = [t.name for t in built if not isinstance(t, GeneratedTask)]
        if other:
            raise ChibiError(f"--task lists several tasks, so each must be a generated one with its own test split; "
                             f"{', '.join(other)} is not. Give that task alone with --eval-task")
        task = TaskUnion([get_task(n, split="train", size=args.train_items, seed=args.seed) for n in names])
        eval_task = TaskUnion([get_task(n, split="test", size=args.passk_items) for n in names])
        check_disjoint(list(task.tasks.values()), [*eval_task.tasks.values(), *reported_eval_sets(home, names)],
                       fix="Train and evaluate on disjoint sets.")
        return task, eval_task
    task = get_task(args.task, **home_option(args.task, home))
    refuse_eval_only_task(task, "--task")
    if task.kind != "generative":
        raise ChibiError(f"--task {args.task} is of kind {task.kind!r}; RL needs a generative task with a checker")
    if isinstance(task, GeneratedTask):
        task = get_task(args.task, split="train", size=args.train_items, seed=args.seed)
        eval_task = get_task(args.eval_task or args.task, split="test", size=args.passk_items)
    elif args.eval_task is None:
        raise ChibiError(f"--task {args.task} has no generated test split; name the held-out task with --eval-task")
    else:
        eval_task = get_task(args.eval_task, **home_option(args.eval_task, home))
    generated = [args.task] if isinstance(task, GeneratedTask) else []
    check_disjoint([task], [eval_task, *reported_eval_sets(home, generated)],
                   fix="Train and evaluate on disjoint sets: a training split as --task and its held-out split as "
                       "--eval-task (a generated --task uses its own test split when --eval-task is not given).")
    return task, eval_task


def run(args) -> int:
    import torch

    from chibichat.common import Home, check_home, init_runtime, print0, shutdown_runtime
    from chibichat.engine import Engine
    from chibichat.render import CHECKED_REPLY_CAP, reply_budget
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.finetune import (check_room, load_source, loop_config, make_optimizer, source_lrs,
                                          stage_meta, summary_head, write_summary)
    from chibichat.train.loop import check_resumable, train

    check_at_least(args, 1, "prompts_per_step", "num_samples", "max_new_tokens", "passk_items", "passk_k", "train_items")
    if args.num_samples < 2:
        raise ChibiError("--num-samples must be >= 2: the advantage compares samples of the same prompt")
    check_task_names(args)
    top_k = args.top_k or None
    home = Home.resolve(args.home)
    # Tasks (and the sandbox they may need) are settled before any model is loaded.
    task, eval_task = _tasks(args, home)
    for t in {task.name: task, eval_task.name: eval_task}.values():
        if t.runs_code:
            check_sandbox(args.allow_weak_sandbox, f"rl with task {t.name}")
    check_home(home)
    rt = init_runtime(args.device, args.dtype)
    try:
        tok = Tokenizer.load(home.tokenizer_dir)
        torch.manual_seed(args.seed)
        model, src_meta, tag = load_source(args, home, tok, rt)
        # The loop's flags (and the home's free space) are checked before the pass@k evaluation, not after it.
        tag_dir = home.checkpoints_dir("rl", tag)
        cfg = loop_config(args, model, tag_dir, eval_every=1, skip_empty_steps=True)  # the reward is logged every step
        check_room(home, model, args, cfg, "rl")
        lrs = source_lrs(src_meta, args, model)
        engine = Engine(model, tok, rt)
        # A completion cut before its answer scores 0 whatever it knew: the cap holds every reply the data teaches.
        max_tokens = reply_budget(engine.seq_len, args.max_new_tokens, cap=CHECKED_REPLY_CAP, what="--max-new-tokens")
        passk = dict(items=args.passk_items, k=args.passk_k, max_tokens=max_tokens,
                     temperature=args.temperature, top_k=top_k, seed=12345)
        t0 = time.time()
        batches = RolloutBatches(engine, tok, task, rt, prompts=args.prompts_per_step, samples=args.num_samples,
                                 max_tokens=max_tokens, temperature=args.temperature, top_k=top_k,
                                 seed=args.seed)
        optimizer = make_optimizer(model, lrs)
        meta = stage_meta(model, tok, args, src_meta, "rl", {"task": task.name, "eval_task": eval_task.name, "lrs": lrs})
        if cfg.resume:  # before the pass@k evaluation's minutes, not after them
            check_resumable(rt, cfg, meta, model, batches)
        model.eval()
        before = pass_at_k_eval(engine, tok, eval_task, rt, **passk)
        print0(rt, f"rl: pass@k before {before}")

        def reward_fn(m, step):
            """Logged after every step: the mean reward of the samples that step trained on (all ranks)."""
            if step == 0 or not batches.history:
                return {}
            recent = batches.history[-args.grad_accum:]
            vals = torch.tensor([sum(h["reward"] for h in recent) / len(recent),
                                 sum(h["length"] for h in recent) / len(recent),
                                 sum(h.get("groups_used", 1.0) for h in recent) / len(recent)], dtype=torch.float64)
            # Every rank drew prompts_per_step x num_samples samples per batch, so the mean of the
            # ranks' means is the mean over the global batch.
            vals = rank_mean(rt, vals)
            return {"reward": float(vals[0]), "completion_tokens": float(vals[1]), "groups_used": float(vals[2])}

        res = train(model, optimizer, batches, pg_loss_sum, rt, cfg, meta=meta, eval_fn=reward_fn,
                    lr_share_fn=signal_share)
        model.eval()
        after = pass_at_k_eval(engine, tok, eval_task, rt, **passk)
        print0(rt, f"rl: pass@k after {after}")
        # The curve over all ranks' samples, batch by batch (every rank ran the same number of batches).
        curve = rank_mean(rt, torch.tensor([h["reward"] for h in batches.history], dtype=torch.float64)).tolist()
        groups_used = float(rank_mean(rt, torch.tensor(
            [sum(h.get("groups_used", 1.0) for h in batches.history) / len(batches.history)], dtype=torch.float64))[0])
        skipped = rank_sum_int(rt, batches.skipped_too_long)
        windows = reward_windows(curve)
        summary = {
            **summary_head("rl", tag, src_meta, res, t0), "task": task.name, "eval_task": eval_task.name,
            "prompts_per_step": args.prompts_per_step, "num_samples": args.num_samples,
            # The compact curve: mean reward over 5 consecutive slices of the run (first -> last).
            "reward_first": windows[0], "reward_last": windows[-1], "reward_windows": windows,
            "reward_curve": curve,  # per micro-batch: mean reward over every rank's samples, in order
            "groups_used": groups_used, "world_size": rt.world_size,
            "skipped_steps": res.skipped_steps,  # steps without signal (all groups flat on every rank)
            "pass_at_k_before": before, "pass_at_k_after": after,
            "train_prompts_skipped_too_long": skipped,
        }
        write_summary(tag_dir, rt, summary)
        print0(rt, f"rl: reward by {windows_label(windows)} {' -> '.join(f'{w:.3f}' for w in windows)} | "
                   f"pass@1 {before['pass@1']:.3f} -> {after['pass@1']:.3f}")
        return 0
    finally:
        shutdown_runtime(rt)
