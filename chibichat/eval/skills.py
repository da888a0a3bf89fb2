"""`chibichat eval skills`: the held-out skills prompt set (chibichat/tasks/skills.py), greedy.

Every prompt is rendered as a one-turn conversation up to <|assistant_start|> and answered by the
engine with greedy decoding (tools on: arithmetic and letter counting use the calculator) within
`max_tokens`. Each reply is checked by its item's checker; accuracy per skill is right/scored, and
`skills` (or `skills_ja`) is the mean of the per-skill accuracies, so every skill weighs the same
whatever its item count. Open prompts are scored by the reply-quality proxy. A prompt that does not
leave `max_tokens` free in the context is counted as skipped, never cut.

summary.json keys (prefix "skills" for en, "skills_ja" for ja; with --casual, every prompt typed as people
type, "skills_casual" / "skills_ja_casual"): <prefix> (mean per-skill accuracy),
<prefix>_<skill> (underscored skill names), <prefix>_n, <prefix>_skipped_too_long, and
<prefix>_open_score / _open_ended_share / _open_distinct_2 / _open_repeat_free / _open_tool_free /
_open_on_topic, and
<prefix>_simple_bpb: the model's bits per byte on assets/simple-<lang>.txt, 30 hand-written simple
sentences (one document each, after <|bos|>): how well it still predicts plain grammatical text, the
third part of the open-prompt proxy (lower is better; comparable across tokenizers, being per byte).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from chibichat.common import ChibiError
from chibichat.tasks.skills import LANGS, OPEN, SKILLS, check_reply, reply_quality
from chibichat.render import CHECKED_REPLY_CAP, reply_budget


class ReplyGenerator(Protocol):
    def replies(self, prompts: Sequence[list[int]], max_tokens: int) -> list[tuple[str, str]]:
        """One greedy (text, finish_reason) per prompt; finish_reason "stop" or "length"."""
        ...


class EngineReplies:
    """Greedy replies with the tools on, decoded as `eval chat` decodes (eval.chat.EngineGenerator: a
    continuous batch of up to `batch_size` prompts); a reply's text as Engine.generate gives it."""

    def __init__(self, engine, batch_size: int = 8):
        from chibichat.eval.chat import EngineGenerator

        self.gen = EngineGenerator(engine, batch_size)  # (checks batch_size)

    def replies(self, prompts, max_tokens):
        return [(self.gen.text(c), c["finish_reason"])
                for (c,) in self.gen.choices(prompts, 1, max_tokens, 0.0, None, [0] * len(prompts))]


def summary_prefix(lang: str) -> str:
    return "skills" if lang == "en" else f"skills_{lang}"


def evaluate_skills(items: list[dict], lang: str, gen: ReplyGenerator, tok, max_len: int, max_tokens: int,
                    prefix: str | None = None) -> dict:
    """{"summary": flat keys (under `prefix`, default summary_prefix(lang)), "skills": {skill: {accuracy, n}},
    "open": proxy, "rows": per item}."""
    from chibichat.render import render_for_completion

    if max_len - max_tokens < 2:
        raise ChibiError(f"--max-new-tokens {max_tokens} leaves no room for a prompt in the model's {max_len}-token "
                         "context; lower it")
    rows, prompts, owners = [], [], []
    for item in items:
        ids = render_for_completion(tok, {"messages": [{"role": "user", "content": item["prompt"]}]}, 1 << 30)
        row = {"id": item["id"], "skill": item["skill"], "prompt": item["prompt"], "status": "ok",
               "reply": None, "finish_reason": None, "correct": None}
        rows.append(row)
        if len(ids) > max_len - max_tokens:
            row["status"] = "skipped_too_long"
            continue
        prompts.append(ids)
        owners.append((row, item))
    outs = gen.replies(prompts, max_tokens) if prompts else []
    if len(outs) != len(prompts):
        raise ChibiError(f"the generator returned {len(outs)} replies for {len(prompts)} prompts")
    open_rows = []
    for (row, item), (text, finish) in zip(owners, outs):
        row["reply"], row["finish_reason"] = text, finish
        if item["skill"] != OPEN:
            row["correct"] = bool(check_reply(item, text, lang))
        else:
            open_rows.append((text, finish, item["topic"]))
    prefix = prefix or summary_prefix(lang)
    per_skill: dict[str, dict] = {}
    for skill in SKILLS:
        scored = [r for r in rows if r["skill"] == skill and r["status"] == "ok"]
        if scored:
            per_skill[skill] = {"accuracy": sum(r["correct"] for r in scored) / len(scored), "n": len(scored)}
    if not per_skill:
        raise ChibiError("no skills prompt fits the model's context with --max-new-tokens free; lower it")
    quality = reply_quality(open_rows, lang) if open_rows else None
    flat = {prefix: sum(s["accuracy"] for s in per_skill.values()) / len(per_skill),
            f"{prefix}_n": sum(s["n"] for s in per_skill.values()),
            f"{prefix}_skipped_too_long": sum(r["status"] != "ok" for r in rows)}
    for skill, s in per_skill.items():
        flat[f"{prefix}_{skill.replace('-', '_')}"] = s["accuracy"]
    if quality is not None:
        for k in ("score", "ended_share", "distinct_2", "repeat_free", "tool_free", "on_topic"):
            flat[f"{prefix}_open_{k}"] = quality[k]
    return {"summary": flat, "skills": per_skill, "open": quality, "rows": rows}


def load_simple_text(lang: str) -> list[str]:
    from chibichat.tasks.shipped import asset_path

    if lang not in LANGS:
        raise ChibiError(f"simple text: --lang must be one of {LANGS}, got {lang!r}")
    path = asset_path(f"simple-{lang}.txt")
    if not path.exists():
        raise ChibiError(f"simple-text set {path} is missing; reinstall chibichat")
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def simple_text_bpb(model, tok, rt, lines: list[str], max_len: int) -> dict:
    """{"bpb", "bytes", "n", "skipped_too_long"}: bits per byte of `model` over `lines`, each scored as
    one document ([bos] + its tokens, every next token predicted); a line longer than the context is
    skipped and counted, never cut."""
    import torch

    from chibichat.eval.bpb import evaluate_bpb

    batches, skipped = [], 0
    for line in lines:
        ids = [tok.bos_id] + tok.encode(line)
        if len(ids) - 1 > max_len:
            skipped += 1
            continue
        batches.append((torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])))
    if not batches:
        return {"bpb": None, "bytes": 0, "n": 0, "skipped_too_long": skipped}
    with torch.no_grad():
        r = evaluate_bpb(model, batches, tok.token_bytes(), rt)
    return {"bpb": r["val_bpb"], "bytes": r["val_bytes"], "n": len(batches), "skipped_too_long": skipped}


def add_skills_args(p) -> None:
    p.add_argument("--lang", choices=("en", "ja"), default=None,
                   help="which prompt set (default: the language of the checkpoint's training corpus)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens per reply (default: min(128, half the model's context))")
    p.add_argument("--eval-batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    p.add_argument("--max-per-skill", type=int, default=None,
                   help="first N prompts of each skill and of the open prompts (smoke runs; default: all)")
    p.add_argument("--casual", action="store_true",
                   help="type every prompt casually (EN: no capital, no closing ? or .; JA: no closing ？ or 。), "
                        "as people type; written to skills_casual.* (skills_ja_casual.*) beside the usual files")


def prompt_set(lang: str, max_per_skill: int | None, casual: bool) -> tuple[list[dict], str]:
    """The held-out items to ask and the summary prefix (file stem) their figures go under. `casual`
    types each prompt as people type into a chat box ("what is 12 times 7", "いま何時ですか"): the same
    skills, measured against the lower case and missing question marks of real use."""
    from chibichat.tasks.paraphrase import casual_form
    from chibichat.tasks.skills import load_items

    items = first_per_skill(load_items(lang), max_per_skill)
    if not casual:
        return items, summary_prefix(lang)
    return [{**it, "prompt": casual_form(it["prompt"], lang)} for it in items], summary_prefix(lang) + "_casual"


def first_per_skill(items: list[dict], n: int | None) -> list[dict]:
    """The first n items of every skill (open prompts included), in file order; all when n is None."""
    if n is None:
        return list(items)
    if n < 1:
        raise ChibiError(f"--max-per-skill must be >= 1, got {n}")
    seen: dict[str, int] = {}
    out = []
    for it in items:
        seen[it["skill"]] = seen.get(it["skill"], 0) + 1
        if seen[it["skill"]] <= n:
            out.append(it)
    return out


def checkpoint_lang(meta: dict, tok) -> str:
    """The language a checkpoint was trained for: its flags' --lang, else its corpus's language, else
    the language of the corpus its tokenizer was trained on (chat stages record no corpus)."""
    flags = meta.get("flags", {})
    if flags.get("lang") in LANGS:
        return flags["lang"]
    if meta.get("corpus"):
        from chibichat.data.corpora import get_corpus

        return get_corpus(meta["corpus"]).lang
    lang = (getattr(tok, "training", None) or {}).get("corpus_lang")
    if lang in LANGS:
        return lang
    raise ChibiError(f"{meta.get('checkpoint_dir')} records no language, and neither does its tokenizer; pass --lang")


def run_skills(args) -> int:
    import time

    from chibichat.common import Home, init_runtime, print0, shutdown_runtime
    from chibichat.engine import Engine, prepare_for_inference
    from chibichat.eval.metrics import merge_summary, write_eval_outputs
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import load_model

    if args.source == "base":
        raise ChibiError("eval skills needs a chat model (--from mid, sft, rl or dpo); a base model has no chat format")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ChibiError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    rt = init_runtime(args.device, args.dtype)
    try:
        if rt.distributed:
            raise ChibiError("eval skills runs in one process (its ~120 greedy replies take seconds); run it "
                             "without torchrun")
        t0 = time.time()
        home = Home.resolve(args.home)
        tok = Tokenizer.load(home.tokenizer_dir)
        model, meta = load_model(home, args.source, args.tag, args.step, rt, tokenizer=tok)
        prepare_for_inference(model)
        lang = args.lang or checkpoint_lang(meta, tok)
        items, prefix = prompt_set(lang, args.max_per_skill, args.casual)
        seq_len = model.config.seq_len
        max_tokens = reply_budget(seq_len, args.max_new_tokens, cap=CHECKED_REPLY_CAP, what="--max-new-tokens")
        out = evaluate_skills(items, lang, EngineReplies(Engine(model, tok, rt), args.eval_batch_size), tok,
                              seq_len, max_tokens, prefix)
        tag = meta["checkpoint_dir"].rstrip("/").split("/")[-2]
        out_dir = home.eval_dir(args.source, tag)
        simple = simple_text_bpb(model, tok, rt, load_simple_text(lang), seq_len)
        out["summary"][f"{prefix}_simple_bpb"] = simple["bpb"]
        summary = {**out["summary"], f"{prefix}_eval": {"simple_text": simple,
            "stage": args.source, "tag": tag, "step": meta["step"], "checkpoint": meta["checkpoint_dir"],
            "lang": lang, "skills": out["skills"], "open": out["open"], "max_new_tokens": max_tokens,
            "max_per_skill": args.max_per_skill,
            "decoding": "greedy", "seconds": time.time() - t0}}
        merge_summary(out_dir, summary)
        # The per-item files come last, the .jsonl after the .csv (write_eval_outputs): the speedrun takes the
        # .jsonl as this evaluation's completion marker.
        write_eval_outputs(out_dir, prefix, out["rows"], None)
        for skill, s in out["skills"].items():
            print0(rt, f"{skill:>20}: {s['accuracy']:.3f} (n={s['n']})")
        if out["open"] is not None:
            q = out["open"]
            d2 = "-" if q["distinct_2"] is None else f"{q['distinct_2']:.3f}"
            print0(rt, f"{'open prompts':>20}: score {q['score']:.3f} | ended {q['ended_share']:.3f} | "
                       f"distinct-2 {d2} | repeat-free {q['repeat_free']:.3f} | on topic {q['on_topic']:.3f} (n={q['n']})")
        if simple["bpb"] is not None:
            print0(rt, f"{'simple-text bpb':>20}: {simple['bpb']:.4f} ({simple['n']} sentences, {simple['bytes']} bytes)")
        print0(rt, f"{prefix}: {out['summary'][prefix]:.4f} (mean over {len(out['skills'])} skills, "
                   f"{out['summary'][prefix + '_skipped_too_long']} prompts skipped as too long) | wrote "
                   f"{out_dir / 'summary.json'}")
        return 0
    finally:
        shutdown_runtime(rt)
