"""`chibichat dpo`: preference tuning (Direct Preference Optimization) on chosen/rejected reply pairs.

For a pair (prompt x, chosen c, rejected r), with log pi(y|x) the sum of the policy's log-probabilities
of the reply's supervised tokens (as rendered by chibichat.render: the reply text, tool calls and
<|assistant_end|>; tool output and the prompt's user and system text are not counted; the prompt's earlier
assistant turns are, on both sides alike, so they cancel in every difference below) and ref the same under
the frozen starting checkpoint:

    reward(y) = beta * (log pi(y|x) - log ref(y|x))
    loss      = -log sigmoid(reward(c) - reward(r))           (mean over pairs)

The reference log-probabilities are computed once, before training, with the starting model (in eval
mode), so no second copy of the model is ever held; with --lora the starting model is the base the
adapters sit on, and the adapters start at zero. Logged: `reward_accuracy` (fraction of pairs with
reward(c) > reward(r)) and `reward_margin` (mean reward(c) - reward(r)) on the held-out pairs at
every evaluation, and the same over the training pairs since the previous evaluation
(`train_reward_accuracy`, `train_reward_margin`). Data: `--data FILE` (.jsonl/.parquet, see
chibichat/tasks/preferences.py; the last <=10% held out, less those that repeat a pair of the rest (left out and
counted), --train-items takes the first N of the rest), a
generated task (prefs-arithmetic, prefs-spelling, prefs-language) or the online UltraFeedback binarized set
(`ultrafeedback`, first --train-items / --val-items rows). A pair longer than the context loses the same
earliest turns on both sides (counted as shortened), or is left out when its final exchange alone does not fit.
"""

from __future__ import annotations

import math
import time

from chibichat.common import ChibiError, add_home_arg, add_runtime_args, check_at_least

DEFAULT_TRAIN_ITEMS = 500  # pairs of a generated task or ultrafeedback when --train-items is not given


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float):
    """Per-pair DPO losses and rewards: (losses, reward_chosen, reward_rejected), tensors of shape (B,)."""
    import torch.nn.functional as F

    rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return -F.logsigmoid(rc - rr), rc, rr


def sequence_logps(model, x, y):
    """Sum of log-probabilities of the target tokens (y >= 0) per row: (B,) float32."""
    return -model(x, y, reduction="none").float().sum(dim=1)


def render_pairs(tok, pairs: list[dict], max_len: int) -> tuple[list[tuple], int, int]:
    """([(chosen ids, chosen mask, rejected ids, rejected mask)], pairs that did not fit (a side dropped by
    chibichat.render's shortening), pairs shortened).

    Both sides of a pair are read under the same prompt ids, else the loss would compare log-probabilities
    under two prompts: when the longer reply makes chibichat.render leave out more early turns on its side,
    the other side is rendered from that same turn (the system text still leads its first user message)."""
    from chibichat.render import render_conversation

    def side(p, key, skip):
        msgs = p["messages"]
        head = 1 if msgs[0]["role"] == "system" else 0
        conv = {"messages": [*msgs[:head], *msgs[head + skip:], {"role": "assistant", "content": p[key]}]}
        return render_conversation(tok, conv, max_len, overflow="shorten")

    out, dropped, shortened = [], 0, 0
    for p in pairs:
        sides = [side(p, key, 0) for key in ("chosen", "rejected")]
        if any(r.status == "dropped" for r in sides):
            dropped += 1
            continue
        skip = max(r.dropped_turns for r in sides)
        sides = [r if r.dropped_turns == skip else side(p, key, skip) for r, key in zip(sides, ("chosen", "rejected"))]
        if any(r.status == "dropped" for r in sides):  # cannot happen (fewer turns are shorter); keeps the count exact
            dropped += 1
            continue
        shortened += int(skip > 0)
        out.append((sides[0].ids, sides[0].mask, sides[1].ids, sides[1].mask))
    return out, dropped, shortened


def pairs_digest(rendered: list[tuple]) -> str:
    """SHA-256 over every token id and mask value of the rendered pairs, in order: a resume on other data (one
    pair edited, added, removed or moved) is caught without storing the data."""
    import hashlib
    from array import array

    h = hashlib.sha256()
    for seqs in rendered:
        for seq in seqs:
            h.update(len(seq).to_bytes(8, "little"))
            h.update(array("q", seq).tobytes())
    return h.hexdigest()[:32]


def collate(rendered: list[tuple], pad_id: int):
    """(x (2B, T), y (2B, T)) with the B chosen rows first, then the B rejected; T = longest - 1."""
    import torch

    rows = [(c, cm) for c, cm, _, _ in rendered] + [(r, rm) for _, _, r, rm in rendered]
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        tgt = torch.tensor(ids[1:])
        y[i, :n] = torch.where(torch.tensor(mask[1:]) == 1, tgt, torch.full_like(tgt, -1))
    return x, y


def reference_logps(model, rendered, pad_id, batch: int, rt):
    """(chosen, rejected) log-probabilities of every pair under `model` as it is now (no grad, eval)."""
    import torch

    was = model.training
    model.eval()
    cs, rs = [], []
    with torch.no_grad():
        for k in range(0, len(rendered), batch):
            part = rendered[k:k + batch]
            x, y = collate(part, pad_id)
            lp = sequence_logps(model, x.to(rt.device), y.to(rt.device)).cpu()
            cs.append(lp[:len(part)])
            rs.append(lp[len(part):])
    model.train(was)
    return torch.cat(cs), torch.cat(rs)


class PairBatches:
    """Micro-batches of B pairs as (x, y, ref_chosen, ref_rejected); a shuffled order per epoch, resumable."""

    def __init__(self, rendered, ref_c, ref_r, batch: int, pad_id: int, seed: int):
        self.rendered, self.ref_c, self.ref_r = rendered, ref_c, ref_r
        self.digest = pairs_digest(rendered)
        self.batch, self.pad_id, self.seed = batch, pad_id, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._perm()

    def _perm(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return torch.randperm(len(self.rendered), generator=g).tolist()

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        idx = []
        while len(idx) < self.batch:
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._perm()
            idx.append(self._order[self.cursor])
            self.cursor += 1
        x, y = collate([self.rendered[i] for i in idx], self.pad_id)
        t = torch.tensor(idx)
        return x, y, self.ref_c[t], self.ref_r[t]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "pairs": len(self.rendered), "seed": self.seed,
                "data": self.digest}

    def load_state_dict(self, d: dict) -> None:
        if d.get("pairs") != len(self.rendered) or d.get("seed") != self.seed:
            raise ChibiError(f"the checkpoint's DPO data ({d.get('pairs')} pairs, seed {d.get('seed')}) differs from "
                             f"this run's ({len(self.rendered)} pairs, seed {self.seed}); resume with the same --data, "
                             "--seed and --train-items, or start without --resume")
        if d.get("data") != self.digest:
            what = "has no fingerprint of its pairs (written by an older version)" if d.get("data") is None else \
                f"was trained on other pairs (data fingerprint {d['data']}, now {self.digest})"
            raise ChibiError(f"the checkpoint's DPO training data {what}: the --data pairs (or the tokenizer or "
                             "context that renders them) changed since it was saved; restore the data it was trained "
                             "on, or start without --resume")
        self.epoch, self.cursor = int(d["epoch"]), int(d["cursor"])
        self._order = self._perm()


def register(sub):
    from chibichat.train.finetune import add_loop_args, add_optim_args, add_source_args

    p = sub.add_parser("dpo", help="preference tuning (DPO) on chosen/rejected pairs",
                       description=__doc__.split("\n\n")[0] + " Reference = the starting checkpoint (no second "
                                   "copy: its log-probabilities are computed once); reward accuracy and margin "
                                   "are logged to metrics.jsonl and summary.json.")
    add_home_arg(p)
    add_runtime_args(p)
    add_source_args(p, "sft")
    p.add_argument("--data", required=True,
                   help="preference pairs: a .jsonl/.parquet file ({prompt|messages, chosen, rejected}), a "
                        "generated task (prefs-arithmetic, prefs-spelling, prefs-language) or the online "
                        "ultrafeedback (UltraFeedback binarized, downloaded into the home)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta (default: 0.1)")
    p.add_argument("--train-items", type=int, default=None,
                   help="training pairs: of a generated task or ultrafeedback (default: 500), or the first N of a "
                        "file's training pairs (default: all of them)")
    p.add_argument("--val-items", type=int, default=100,
                   help="held-out pairs: a generated task's test split, else the last <=10%% of the file (default: 100)")
    add_optim_args(p, lr_frac=0.05)
    add_loop_args(p, steps=30, batch=4, samples=False)
    p.set_defaults(func=run)


def _data(args, home):
    """(training pairs, held-out pairs, held-out pairs of a file left out as copies of a training pair)."""
    from pathlib import Path

    from chibichat.tasks.preferences import GENERATED, ONLINE, generated_pairs, hub_pairs, load_pairs, pair_key

    n_train = DEFAULT_TRAIN_ITEMS if args.train_items is None else args.train_items
    if args.data in GENERATED:
        return (generated_pairs(args.data, "train", n_train, args.seed),
                generated_pairs(args.data, "test", args.val_items, args.seed), 0)
    if args.data in ONLINE:
        (train, same_t), (val, same_v) = (hub_pairs(home, args.data, "train", n_train),
                                          hub_pairs(home, args.data, "test", args.val_items))
        if same_t or same_v:
            print(f"dpo: {same_t} training and {same_v} held-out {args.data} rows have identical chosen and rejected "
                  "replies and are left out")
        return train, val, 0
    if Path(args.data).suffix not in (".jsonl", ".parquet"):
        raise ChibiError(f"--data {args.data!r} is neither a .jsonl/.parquet file nor one of "
                         f"{', '.join(GENERATED + tuple(ONLINE))}")
    pairs = load_pairs(args.data)
    n_val = min(args.val_items, len(pairs) // 10)
    if n_val < 1:
        raise ChibiError(f"--data {args.data} has {len(pairs)} pairs: too few to hold out validation pairs (>= 10)")
    train = pairs[:-n_val]
    # A held-out pair that repeats a pair of the training part (any of it, so that the held-out set does not
    # depend on --train-items) would score the model on what it trained on.
    seen = {pair_key(p) for p in train}
    val = [p for p in pairs[-n_val:] if pair_key(p) not in seen]
    if not val:
        raise ChibiError(f"each of the {n_val} held-out pairs of --data {args.data} (its last {n_val} rows) repeats a "
                         "training pair, so the held-out scores would be measured on training data; remove the "
                         "repeated rows")
    if args.train_items is not None:
        if args.train_items > len(train):
            raise ChibiError(f"--train-items {args.train_items}, but --data {args.data} has {len(train)} training "
                             f"pairs ({n_val} of its {len(pairs)} are held out); lower --train-items, or leave it out "
                             "to train on all of them")
        train = train[:args.train_items]
    return train, val, n_val - len(val)


def run(args) -> int:
    import torch

    from chibichat.common import Home, check_home, init_runtime, print0, shutdown_runtime
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.finetune import (check_room, load_source, loop_config, make_optimizer, source_lrs,
                                          stage_meta, summary_head, write_summary)
    from chibichat.train.loop import count_targets, train

    if not args.beta > 0:
        raise ChibiError(f"--beta must be > 0, got {args.beta}")
    if args.fp8:
        # fp8 runs only in forwards that record autograd: the reference log-probabilities would be bf16 and the
        # policy's fp8, apart by rounding alone, so policy == reference would not give the loss log 2
        raise ChibiError("dpo does not take --fp8: its reference log-probabilities come from no-grad forwards, "
                         "which never run in fp8, so the policy's (fp8) would differ from them by rounding "
                         "alone; drop --fp8")
    check_at_least(args, 1, "device_batch_size", "train_items", "val_items")
    rt = init_runtime(args.device, args.dtype)
    try:
        if rt.world_size > 1:
            raise ChibiError("dpo runs in one process (its pairs are not sharded over ranks); run it without torchrun")
        home = Home.resolve(args.home)
        check_home(home)
        tok = Tokenizer.load(home.tokenizer_dir)
        torch.manual_seed(args.seed)
        model, src_meta, tag = load_source(args, home, tok, rt)
        max_len = model.config.seq_len + 1
        pad = tok.bos_id
        train_pairs, val_pairs, val_copies = _data(args, home)
        if val_copies:
            print0(rt, f"dpo: {val_copies} of the last {val_copies + len(val_pairs)} pairs of {args.data} repeat a "
                       "training pair and are left out of the held-out pairs (counted in summary.json)")
        train_r, train_dropped, train_short = render_pairs(tok, train_pairs, max_len)
        val_r, val_dropped, val_short = render_pairs(tok, val_pairs, max_len)
        if not train_r or not val_r:
            raise ChibiError(f"no {'training' if not train_r else 'held-out'} preference pair fits the model's "
                             f"{max_len}-token context ({train_dropped} training and {val_dropped} held-out pairs "
                             "are too long); shorten the prompts/replies")
        if train_dropped or val_dropped:
            print0(rt, f"dpo: {train_dropped} training and {val_dropped} held-out pairs do not fit the "
                       f"{max_len}-token context and are left out (counted in summary.json)")
        if train_short or val_short:
            print0(rt, f"dpo: {train_short} training and {val_short} held-out pairs are longer than the {max_len}-token "
                       "context and lose their earliest turns, the same ones on both sides (counted in summary.json)")
        # The reference: the starting model (with --lora: the base; fresh adapters are zero), once.
        ref_c, ref_r = reference_logps(model, train_r, pad, args.device_batch_size, rt)
        vref_c, vref_r = reference_logps(model, val_r, pad, args.device_batch_size, rt)
        batches = PairBatches(train_r, ref_c, ref_r, args.device_batch_size, pad, args.seed)
        recent: list[tuple[float, float, int]] = []  # per micro-batch: correct pairs, margin sum, pairs

        def loss_fn(m, batch):
            x, y, rc_ref, rr_ref = batch
            lp = sequence_logps(m, x, y)
            b = rc_ref.shape[0]
            losses, rc, rr = dpo_loss(lp[:b], lp[b:], rc_ref.to(lp.device), rr_ref.to(lp.device), args.beta)
            recent.append((float((rc > rr).sum()), float((rc - rr).detach().sum()), b))
            return losses.sum(), b

        def eval_fn(m, step):
            vals = evaluate_pairs(m, val_r, vref_c, vref_r, pad, args.device_batch_size, args.beta, rt)
            if recent:
                n = sum(k for _, _, k in recent)
                vals["train_reward_accuracy"] = sum(c for c, _, _ in recent) / n
                vals["train_reward_margin"] = sum(mg for _, mg, _ in recent) / n
                recent.clear()
            return vals

        lrs = source_lrs(src_meta, args, model)
        optimizer = make_optimizer(model, lrs)
        tag_dir = home.checkpoints_dir("dpo", tag)
        cfg = loop_config(args, model, tag_dir, eval_every=args.eval_every or max(1, args.num_steps // 5))
        check_room(home, model, args, cfg, "dpo")
        meta = stage_meta(model, tok, args, src_meta, "dpo", {"data": args.data, "beta": args.beta, "lrs": lrs})
        print0(rt, f"dpo: from {src_meta['checkpoint_dir']} -> {tag_dir} | {len(train_r)} train / {len(val_r)} "
                   f"held-out pairs | beta {args.beta} | lrs {lrs}")
        t0 = time.time()
        history: list[dict] = []

        def logged_eval(m, step):
            vals = eval_fn(m, step)
            history.append({"step": step, **vals})
            return vals

        res = train(model, optimizer, batches, loss_fn, rt, cfg, meta=meta, count_fn=lambda b: int(b[2].shape[0]),
                    tokens_fn=count_targets, eval_fn=logged_eval)
        first, last = history[0], history[-1]
        summary = {
            **summary_head("dpo", tag, src_meta, res, t0), "data": args.data, "beta": args.beta, "train_pairs": len(train_r), "val_pairs": len(val_r),
            "pairs_left_out_too_long": {"train": train_dropped, "val": val_dropped},
            "held_out_copies_left_out": val_copies,  # held-out pairs of a file equal to one of its training pairs
            "pairs_shortened": {"train": train_short, "val": val_short},
            "reward_accuracy_before": first["reward_accuracy"], "reward_accuracy_after": last["reward_accuracy"],
            "reward_margin_before": first["reward_margin"], "reward_margin_after": last["reward_margin"],
            "val_dpo_loss_before": first["dpo_loss"], "val_dpo_loss_after": last["dpo_loss"],
            "evals": history,
        }
        write_summary(tag_dir, rt, summary)
        print0(rt, f"dpo: held-out reward accuracy {first['reward_accuracy']:.3f} -> {last['reward_accuracy']:.3f} | "
                   f"margin {first['reward_margin']:.4f} -> {last['reward_margin']:.4f}")
        return 0
    finally:
        shutdown_runtime(rt)


def evaluate_pairs(model, rendered, ref_c, ref_r, pad, batch, beta, rt) -> dict:
    """Held-out DPO loss, reward accuracy (reward(c) > reward(r), ties count as wrong) and mean margin."""
    pi_c, pi_r = reference_logps(model, rendered, pad, batch, rt)
    losses, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    out = {"dpo_loss": float(losses.mean()), "reward_accuracy": float((rc > rr).float().mean()),
           "reward_margin": float((rc - rr).mean())}
    if not math.isfinite(out["dpo_loss"]):
        raise ChibiError("the held-out DPO loss is not finite; lower the learning rate (--lr-frac / --lora-lr)")
    return out
