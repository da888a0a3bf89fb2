"""`chibichat eval <what>`: evaluations of saved checkpoints.

One parser, one sub-subcommand per evaluation; each dispatches to a module in chibichat/eval/.
    base   val bpb on a fixed slice of a val split + greedy samples   (chibichat/eval/base.py)
           + CORE-style in-context tasks (CORE-lite offline)          (chibichat/eval/core.py)
    chat   categorical by letter logits, generative by sampling, ChatCORE   (chibichat/eval/chat.py)
    jglue  JCommonsenseQA, JNLI, JSTS, JSQuAD on the official dev files    (chibichat/eval/jglue.py)
    skills held-out skills prompts (EN/JA), greedy, per-skill accuracy  (chibichat/eval/skills.py)
Results go to home/eval/<stage>/<tag>/summary.json (flat metric keys, see docs/architecture.md)
with per-item files beside it. To add an evaluation: a module chibichat/eval/<name>.py with
`add_<name>_args(parser)` and `run_<name>(args)`, listed in `DELEGATED` and `register`.
"""

from __future__ import annotations

from chibichat.common import ChibiError, add_home_arg, add_model_args, add_runtime_args, check_at_least


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (base: val bpb + CORE; chat: ChatCORE; jglue)",
                       description="Evaluate a saved checkpoint. Pick an evaluation: " + ", ".join(["base", "chat", "jglue", "skills"]))
    actions = p.add_subparsers(dest="evaluation", metavar="<evaluation>")
    _add_base(actions)
    from chibichat.eval.chat import add_chat_args, run_chat
    from chibichat.eval.jglue import add_jglue_args, run_jglue
    from chibichat.eval.skills import add_skills_args, run_skills

    _add_delegated(actions, "chat", add_chat_args, run_chat)
    _add_delegated(actions, "jglue", add_jglue_args, run_jglue)
    _add_delegated(actions, "skills", add_skills_args, run_skills)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _add_checkpoint_args(p, source: str) -> None:
    add_home_arg(p)
    add_runtime_args(p)
    add_model_args(p, source)


def _add_base(actions) -> None:
    p = actions.add_parser(
        "base", help="val bits-per-byte, CORE-style tasks (CORE-lite offline) and greedy samples",
        description="Val bits-per-byte (tokenizer-independent) on a fixed number of val tokens of a corpus, "
                    "and greedy samples from fixed prompts. Writes home/eval/<stage>/<tag>/summary.json and "
                    "samples.json.")
    _add_checkpoint_args(p, "base")
    p.add_argument("--corpus", default=None, help="corpus whose val split is scored (default: the one it was trained on)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="val tokens (default: what pretraining used, 4 x its total batch)")
    p.add_argument("--device-batch", type=int, default=None, help="rows per forward (default: as in training)")
    p.add_argument("--long-docs", choices=("split", "crop"), default=None,
                   help="val packing of long documents (default: as in training)")
    p.add_argument("--sample-tokens", type=int, default=24, help="tokens per greedy sample")
    from chibichat.eval.core import add_core_args

    add_core_args(p)
    p.set_defaults(func=run_base)


# name -> (help, description, default --from) of the evaluations that live wholly in chibichat/eval/<name>.py
# (its add_<name>_args(parser) and run_<name>(args), passed in by register).
DELEGATED = {
    "chat": ("ChatCORE: ARC-E/C and MMLU by letter logits, GSM8K/HumanEval/spelling by generation",
             "Chat-model evaluation: categorical tasks by the argmax of the choice-letter logits, generative "
             "tasks by sampling with the engine and checking (GSM8K with the calculator, HumanEval in the "
             "sandbox), ChatCORE = mean centered accuracy. Per-item chat_<task>.jsonl/.csv and "
             "summary.json under home/eval/<stage>/<tag>/.", "sft"),
    "jglue": ("JGLUE few-shot: JCommonsenseQA, JNLI, JSTS, JSQuAD (dev files given by --jglue-dir)",
              "JGLUE on the official dev files: JCQA and JNLI by lowest continuation loss (accuracy), JSTS by "
              "the expected digit 0-5 (Pearson, Spearman), JSQuAD by greedy generation (EM, character F1 "
              "with JGLUE's own normalisation). Prompts are base-model few-shot text; `eval chat --tasks "
              "jsquad` scores the same records in the chat format. Per-item files and summary.json under "
              "home/eval/<stage>/<tag>/.", "base"),
    "skills": ("held-out prompts for every taught skill (identity, arithmetic, spelling, ...), greedy",
               "The held-out skills prompt set (identity, one- and two-step arithmetic, spelling, letter "
               "counting, greeting, refusal to invent facts; EN or JA), answered greedily and checked per "
               "item; prints per-skill accuracy and the open-prompt reply-quality proxy. Per-item "
               "skills.jsonl/.csv (skills_ja.* for --lang ja) and summary.json under home/eval/<stage>/<tag>/.", "sft"),
}


def _add_delegated(actions, name: str, add_args, run) -> None:
    help_text, description, source = DELEGATED[name]
    p = actions.add_parser(name, help=help_text, description=description)
    _add_checkpoint_args(p, source)
    add_args(p)
    p.set_defaults(func=run)


def run_base(args) -> int:
    import time

    from chibichat.common import Home, atomic_write_json, init_runtime, print0, read_json, shutdown_runtime
    from chibichat.data.corpora import get_corpus
    from chibichat.eval.base import eval_steps, evaluate_base, samples, val_batches
    from chibichat.eval.core import is_core_key
    from chibichat.eval.metrics import merge_summary, remove_eval_outputs
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import load_model

    check_at_least(args, 1, "eval_tokens", "device_batch", "sample_tokens")
    home = Home.resolve(args.home)
    tok = Tokenizer.load(home.tokenizer_dir)
    rt = init_runtime(args.device, args.dtype)
    try:
        t0 = time.time()
        model, meta = load_model(home, args.source, args.tag, args.step, rt, tokenizer=tok)
        flags, plan = meta.get("flags", {}), meta.get("plan", {})
        corpus_name = args.corpus or meta.get("corpus")
        if not corpus_name:
            raise ChibiError(f"{meta['checkpoint_dir']} records no corpus; pass --corpus")
        corpus = get_corpus(corpus_name)
        seq_len = model.config.seq_len
        device_batch = args.device_batch or plan.get("device_batch") or max(1, 2 ** 14 // seq_len)
        eval_tokens = args.eval_tokens or flags.get("eval_tokens") or 4 * plan.get("total_batch", device_batch * seq_len)
        long_docs = args.long_docs or flags.get("long_docs", "split")
        n = eval_steps(eval_tokens, device_batch, seq_len)
        batches = val_batches(corpus, home, tok, rt, device_batch, seq_len, n, long_docs == "split")
        result = evaluate_base(model, tok, batches, rt)
        texts = samples(model, tok, corpus.lang, args.sample_tokens) if rt.is_master else []
        tag = meta["checkpoint_dir"].rstrip("/").split("/")[-2]
        out_dir = home.eval_dir(args.source, tag)
        if args.core:
            from chibichat.eval.core import run_core

            core = run_core(model, tok, rt, out_dir, args, home)
            print0(rt, f"{core['core_label']}: {core['core']:.4f} over {len(core['core_tasks'])} tasks "
                       f"({core['core_skipped_too_long']} items longer than the context skipped)")
        # Flat metric keys (shared with the other evaluations of this checkpoint) + this eval's details.
        summary = {
            "val_bpb": result["val_bpb"], "val_loss": result["val_loss"],
            "base_eval": {
                "stage": args.source, "tag": tag, "step": meta["step"], "checkpoint": meta["checkpoint_dir"],
                "corpus": corpus.name, "val_tokens": result["val_tokens"], "val_bytes": result["val_bytes"],
                "seq_len": seq_len, "device_batch": device_batch, "long_docs": long_docs,
                "seconds": time.time() - t0,
            },
        }
        if args.core:
            summary.update(core)
        print0(rt, f"{args.source}/{tag} step {meta['step']}: val bpb {result['val_bpb']:.4f} "
                   f"(loss {result['val_loss']:.4f}) on {result['val_tokens']:,} tokens of {corpus.name} val")
        for t in texts:
            print0(rt, f"  {t!r}")
        if rt.is_master:
            atomic_write_json(out_dir / "samples.json", [{"text": t} for t in texts])
            # The CORE keys of an earlier `eval base` (another step, task set or --core mode) never stay
            # beside this run's figures: a CORE run replaces them all, --no-core removes them, and with them
            # the per-item core.jsonl/.csv (which a CORE run rewrites).
            path = out_dir / "summary.json"
            earlier = read_json(path, "eval summary") if path.exists() else {}
            stale = [k for k in earlier if is_core_key(k)] if isinstance(earlier, dict) else []
            merge_summary(out_dir, summary, drop=stale)  # shared by every eval of the checkpoint
            if not args.core:
                removed = remove_eval_outputs(out_dir, "core")
                if stale or removed:
                    print0(rt, f"CORE not run (--no-core): removed the earlier CORE scores from {path}"
                               + "".join(f" and {p}" for p in removed))
            print0(rt, f"wrote {path}")
    finally:
        shutdown_runtime(rt)
    return 0
