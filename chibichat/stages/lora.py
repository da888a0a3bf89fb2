"""`chibichat lora merge|info`: LoRA adapter checkpoints (written by midtrain/sft/rl with --lora).

merge  fold an adapter checkpoint into its base and save the result as an ordinary checkpoint (full
       weights, no adapters, no optimizer state): chat/serve/eval read adapters directly, so merging is
       for handing the model on (export, a full fine-tune on top, sharing one file)
info   what an adapter checkpoint holds: rank, alpha, targets, its base chain and its size on disk
"""

from __future__ import annotations

from chibichat.common import ChibiError, add_home_arg

STAGES = ("mid", "sft", "rl", "dpo")


def register(sub) -> None:
    p = sub.add_parser("lora", help="merge or inspect LoRA adapter checkpoints",
                       description="Merge a LoRA adapter checkpoint into its base, or describe one.")
    actions = p.add_subparsers(dest="action", metavar="<action>")
    m = actions.add_parser("merge", help="fold adapters into their base, saved as a full checkpoint",
                           description="Fold " + __doc__.split("\n\n")[1].split("info")[0].strip().removeprefix("merge  fold "))
    add_home_arg(m)
    m.add_argument("--from", dest="source", required=True, choices=STAGES, help="stage of the adapter checkpoint")
    m.add_argument("--tag", default=None, help="its tag (default: the most recently written one)")
    m.add_argument("--step", type=int, default=None, help="its step (default: the newest)")
    m.add_argument("--to-tag", default=None, help="tag of the merged checkpoint, same stage (default: <tag>-merged)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing merged checkpoint at that step")
    m.set_defaults(func=run_merge)
    i = actions.add_parser("info", help="rank, targets, base chain and size of an adapter checkpoint",
                           description="What an adapter checkpoint holds: " + __doc__.split("info   what an adapter "
                                                                                             "checkpoint holds: ")[1].split("\n")[0])
    add_home_arg(i)
    i.add_argument("--from", dest="source", required=True, choices=STAGES, help="stage of the adapter checkpoint")
    i.add_argument("--tag", default=None, help="its tag (default: the most recently written one)")
    i.add_argument("--step", type=int, default=None, help="its step (default: the newest)")
    i.set_defaults(func=run_info)

    def no_action(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_action)


def _adapter_dir(args, home, action: str):
    from chibichat.train.checkpoint import ADAPTER_FILE, list_steps, read_meta, resolve_checkpoint, step_dir

    sdir = resolve_checkpoint(home, args.source, args.tag, args.step)
    meta = read_meta(sdir)
    if not (sdir / ADAPTER_FILE).is_file():
        # Without --tag the newest checkpoint is taken, which after a merge is the merged one: name the adapters.
        stage_dir = sdir.parent.parent
        tags = sorted(d.name for d in stage_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                      and (steps := list_steps(d)) and (step_dir(d, steps[-1]) / ADAPTER_FILE).is_file())
        hint = (f"pass --tag of an adapter checkpoint ({args.source}: {', '.join(tags)})" if tags
                else f"no {args.source} checkpoint holds an adapter (train one with --lora RANK)")
        raise ChibiError(f"{sdir} holds full weights, not a LoRA adapter; nothing to {action}: {hint}")
    return sdir, meta


def run_merge(args) -> int:
    import torch

    from chibichat.common import Home, atomic_write_json, read_json
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import (ADAPTER_FILE, load_model, lora_base_dir, read_meta, save_checkpoint,
                                            step_dir)

    home = Home.resolve(args.home)
    sdir, meta = _adapter_dir(args, home, "merge")
    to_tag = args.to_tag or f"{sdir.parent.name}-merged"
    tag_dir = home.checkpoints_dir(args.source, to_tag)
    target = step_dir(tag_dir, meta["step"])
    # The adapter and the checkpoints under it must survive the merge: replacing one would break this adapter
    # (and any other adapter trained on that base).
    chain, cur, cmeta = [sdir], sdir, meta
    while (cur / ADAPTER_FILE).is_file():
        cur = lora_base_dir(cur, cmeta)
        cmeta = read_meta(cur)
        chain.append(cur)
    if any(target.resolve() == c.resolve() for c in chain):
        what = "the adapter itself" if target.resolve() == sdir.resolve() else "a checkpoint the adapter sits on"
        raise ChibiError(f"--to-tag {to_tag!r} would write the merged model over {target}, {what}; choose another "
                         "--to-tag")
    if target.exists() and not args.overwrite:
        raise ChibiError(f"{target} exists; pass --overwrite to replace it or choose --to-tag")
    tok = Tokenizer.load(home.tokenizer_dir)
    model, _ = load_model(home, args.source, sdir.parent.name, meta["step"], rt=None, tokenizer=tok)
    keep = {k: v for k, v in meta.items() if k not in ("lora", "format", "step", "world_size", "checkpoint_dir")}
    keep["merged_from"] = {"adapter": str(sdir), "lora": meta["lora"]}
    # No removal first with --overwrite: save_checkpoint's atomic directory swaps the old checkpoint out only
    # once the new one is complete, so a failed save leaves it as it was.
    with torch.no_grad():
        out = save_checkpoint(tag_dir, meta["step"], model, None, keep)
    # summary.json last, the completion marker of a checkpoint folder: the adapter run's figures (the merged
    # model computes what the adapter on its base did), naming where they came from.
    ran = sdir.parent / "summary.json"
    summary = read_json(ran, "the adapter run's summary") if ran.is_file() else {"stage": args.source}
    atomic_write_json(tag_dir / "summary.json", {**summary, "tag": to_tag, "checkpoint": str(out),
                                                 "merged_from": keep["merged_from"]})
    print(f"lora merge: {sdir} (rank {meta['lora']['rank']}) + base {meta['lora']['base']} -> {out}")
    return 0


def run_info(args) -> int:
    from chibichat.common import Home
    from chibichat.train.checkpoint import ADAPTER_FILE, lora_base_dir, read_meta

    home = Home.resolve(args.home)
    sdir, meta = _adapter_dir(args, home, "describe")
    lo = meta["lora"]
    size = (sdir / ADAPTER_FILE).stat().st_size
    print(f"{sdir}: rank {lo['rank']}, alpha {lo['alpha']}, dropout {lo['dropout']}, targets {','.join(lo['targets'])}, "
          f"{ADAPTER_FILE} {size / 1e3:.1f} kB")
    cur, cmeta = sdir, meta
    while (cur / ADAPTER_FILE).is_file():
        cur = lora_base_dir(cur, cmeta)
        cmeta = read_meta(cur)
        print(f"  on top of {cur}" + (" (adapter)" if (cur / ADAPTER_FILE).is_file() else ""))
    return 0
