"""`chibichat report`: the report card — report/report.md plus PNG plots, built from the artifacts that
every stage leaves under the home directory (see docs/architecture.md "Summaries").

Layout: an environment header; a summary table (stage x headline metric x time) with the loss and
learning-rate plots of all stages; the evaluations of every stage side by side and the held-out
skills table; then one section per stage (tokenizer, BASE, MID, SFT, RL, DPO) holding a short table of
what matters for that stage, its evaluation and the plots that show those numbers; the timings of the
speedrun's steps; and an appendix with every value the stages recorded (collapsed), so no figure a
stage writes is lost from the card even when no table shows it.

The report only reads artifacts; it never re-runs anything. A stage that has not run is listed as
"not run" rather than silently omitted, so a reader can tell a skipped stage from a missing section.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from chibichat import __version__
from chibichat.common import ChibiError, Home, add_home_arg, atomic_write_bytes, atomic_write_text, check_home

# The training stages in pipeline order, with the name used in tables.
TRAIN_STAGES = [("base", "BASE"), ("mid", "MID"), ("sft", "SFT"), ("rl", "RL"), ("dpo", "DPO")]
# Stages outside the speedrun's pipeline: shown only when they ran (a pipeline stage that did not run
# is listed as "not run").
OPTIONAL_STAGES = ("dpo",)
STAGE_TITLES = {"base": "pretraining", "mid": "midtraining", "sft": "supervised fine-tuning",
                "rl": "reinforcement learning", "dpo": "preference tuning"}
# The speedrun steps (report/timing.json) whose seconds make up each row's time in the summary.
TIMING_STEPS = {"tokenizer": ("tokenizer", "tokenizer-eval"), "base": ("pretrain", "eval-base"),
                "mid": ("midtrain", "eval-mid", "skills-mid"), "sft": ("sft", "eval-sft", "skills-sft"),
                "rl": ("rl", "eval-rl", "skills-rl"), "dpo": ("dpo", "eval-dpo", "skills-dpo")}

# Evaluation-table rows: (label, eval-summary key). Values come from home/eval/<stage>/<tag>/summary.json.
METRIC_ROWS = [
    ("val bpb", "val_bpb"),
    ("CORE", "core"),
    ("ARC-Easy", "arc_easy"),
    ("ARC-Challenge", "arc_challenge"),
    ("MMLU", "mmlu"),
    ("GSM8K", "gsm8k"),
    ("HumanEval", "humaneval"),
    ("Spelling", "spelling"),
    ("ChatCORE", "chatcore"),
]
JGLUE_ROWS = [
    ("JCommonsenseQA", "jcommonsenseqa"),
    ("JNLI", "jnli"),
    ("JSTS Pearson", "jsts_pearson"),
    ("JSTS Spearman", "jsts_spearman"),
    ("JSQuAD EM", "jsquad_em"),
    ("JSQuAD F1", "jsquad_f1"),
]
# Keys the appendix leaves out, each shown elsewhere in full (plotted, or a table row per element).
APPENDIX_SHOWN_ELSEWHERE = {
    "reward_curve": "plotted in reward.png",
    "evals": "plotted in reward_accuracy.png and reward_margin.png",
    "core_tasks": "one row per task in the CORE table",
    "tasks": "one row per task in the evaluation table",
    "render_counts": "one row per task in the mixture table",
    "special_tokens": "fixed by the tokenizer format",
    "pattern": "fixed by the tokenizer's split",
}

# Rough on-demand prices per device-hour, for the cost line (a laptop CPU costs nothing extra).
HOURLY_USD = {"H100": 3.00, "H200": 3.50, "A100": 1.79, "V100": 0.55, "L4": 0.80, "A10": 0.75}


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write the report card (report/report.md + plots) from the artifacts in the home",
        description=(
            "Collect every stage's summary, metrics and evaluations under the home directory into "
            "report/report.md: an environment header, a summary table (stage x headline metric x time), "
            "the evaluations x {BASE, MID, SFT, RL, DPO} table, the held-out skills table, one section per stage "
            "with a short table of its figures (tokenizer: vocab and compression; pretraining: parameters, "
            "tokens, time, tok/s, MFU, bpb; MID/SFT: mixture and over-length counts, loss; RL: reward and pass@k; "
            "DPO: reward accuracy/margin) beside PNG plots of loss, bpb, learning rate, RL reward and DPO "
            "reward accuracy/margin, the speedrun's timings, and an appendix of every recorded value."
        ),
    )
    add_home_arg(p)
    p.add_argument("--tag", default=None,
                   help="model tag to report on: every stage is shown for this tag alone, a stage that has not "
                        "run under it as not run (default: the newest base tag)")
    p.add_argument("--wall-time", type=float, default=None, help="total wall-clock seconds to state in the header")
    p.add_argument("--hourly-usd", type=float, default=None,
                   help="price per device-hour for the cost estimate (default: the table's price for a known GPU; "
                        "an unknown GPU's cost is reported as unknown, a CPU run as $0)")
    p.add_argument("--print", dest="print_report", action="store_true", help="also print the report to stdout")
    p.set_defaults(func=run)


@dataclass
class StageArtifacts:
    stage: str
    tag: str | None
    summary: dict | None
    metrics: list[dict]
    evals: dict | None


@dataclass
class RunArtifacts:
    """Everything the report reads: the tokenizer's files, the stages of one tag, the speedrun's timing of
    that tag ({"stages": {step: seconds}, "wall_s": ...}; None when no speedrun timed it)."""
    tok_meta: dict | None
    tok_eval: dict | None
    stages: list[StageArtifacts]
    timing: dict | None
    tag: str | None = None
    untagged_timing: bool = False  # timing.json holds figures from before timings were kept per tag


def _read_json(path: Path) -> dict | None:
    """A JSON object file (every file the report reads is one); None when it does not exist."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ChibiError(f"{path} is corrupt ({e}); re-run the stage that writes it") from None
    if not isinstance(data, dict):
        raise ChibiError(f"{path} is corrupt (a JSON {type(data).__name__}, not an object); re-run the stage "
                         "that writes it")
    return data


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    # Split as bytes: a line cut mid-character must not make the whole file undecodable.
    lines = path.read_bytes().splitlines()
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            # A run killed mid-write can leave one partial last line; anything else is corruption.
            if n == len(lines):
                continue
            raise ChibiError(f"{path} line {n} is not JSON; delete the file or re-run the stage") from None
        if not isinstance(row, dict):
            raise ChibiError(f"{path} line {n} is not a JSON object; delete the file or re-run the stage")
        rows.append(row)
    return rows


def _newest_tag(home: Home, stage: str) -> str | None:
    root = home.root / "checkpoints" / stage
    if not root.is_dir():
        return None
    tags = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not tags:
        return None
    return max(tags, key=lambda d: d.stat().st_mtime).name


def known_tags(home: Home) -> list[str]:
    """Every tag some training stage has a checkpoint or evaluation folder of."""
    tags = set()
    for stage, _ in TRAIN_STAGES:
        for root in (home.root / "checkpoints" / stage, home.root / "eval" / stage):
            if root.is_dir():
                tags |= {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    return sorted(tags)


def report_tag(home: Home, tag: str | None) -> str | None:
    """The tag the report shows: `tag`, which must be one some stage ran under (ChibiError listing the known
    ones), else the newest base tag, else the newest tag of the first stage that has one (a home holding
    only an imported chat model); None in a home where nothing has run."""
    if tag is not None:
        known = known_tags(home)
        if tag not in known:
            raise ChibiError(f"--tag {tag!r}: no stage in {home.root} has run under that tag; known tags: "
                             f"{', '.join(known) or 'none (nothing has run in this home)'}")
        return tag
    return next((t for stage, _ in TRAIN_STAGES if (t := _newest_tag(home, stage))), None)


def collect(home: Home, tag: str | None) -> list[StageArtifacts]:
    """The stages of `tag` alone (report_tag): a stage that did not run under it is shown as not run, never
    filled in from another tag's run."""
    out = []
    for stage, _ in TRAIN_STAGES:
        run_dir = home.checkpoints_dir(stage, tag) if tag else None
        summary = _read_json(run_dir / "summary.json") if run_dir else None
        metrics = _read_jsonl(run_dir / "metrics.jsonl") if run_dir else []
        evals = _read_json(home.eval_dir(stage, tag) / "summary.json") if tag else None
        if stage in OPTIONAL_STAGES and not (summary or metrics or evals):
            continue
        out.append(StageArtifacts(stage, tag, summary, metrics, evals))
    return out


def collect_run(home: Home, tag: str | None) -> RunArtifacts:
    tag = report_tag(home, tag)
    timing = _read_json(home.report_dir / "timing.json") or {}
    runs = timing.get("runs", {})
    if not isinstance(runs, dict):
        raise ChibiError(f"{home.report_dir / 'timing.json'} is corrupt (its \"runs\" is not an object); delete it "
                         "(the report then shows the stages' own times)")
    return RunArtifacts(_read_json(home.tokenizer_dir / "tokenizer.json"), _read_json(home.tokenizer_dir / "eval.json"),
                        collect(home, tag), runs.get(tag) if tag else None, tag,
                        untagged_timing=bool(timing) and ("runs" not in timing or "untagged" in timing))


# ----------------------------------------------------------------------------------------------
# Formatting


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if v is None:
        return "-"
    return str(v)


def fmt_int(v) -> str:
    return "-" if v is None else f"{int(round(v)):,}"


def fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def fmt_duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def fmt_time(s) -> str:
    return "-" if s is None else fmt_duration(s)


def before_after(before, after) -> str:
    return f"{fmt(before)} → {fmt(after)}"


def kv_table(rows: list[tuple[str, str]]) -> str:
    """A two-column table of (what, value) rows; rows whose value is None are left out (not recorded)."""
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    return "\n".join(lines) + "\n"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def images(names: list[str], written: set[str]) -> str:
    """Markdown images of the plots among `names` that were drawn (a quantity no stage logged has none)."""
    shown = [f"![{n}]({n})" for n in names if n in written]
    return (" ".join(shown) + "\n") if shown else ""


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            items.extend(_flatten(v, key + "."))
        elif isinstance(v, list) and len(v) > 8:
            items.append((key, f"[{len(v)} values]"))
        else:
            items.append((key, v))
    return items


def label(stage: str) -> str:
    return dict(TRAIN_STAGES)[stage]


def _of(tag: str | None) -> str:
    """" (tag)" after a heading whose table shows one tag's stages."""
    return f" ({tag})" if tag else ""


# ----------------------------------------------------------------------------------------------
# Summary (stage x headline x time) and the cross-stage tables


def median_mfu(metrics: list[dict]) -> float | None:
    """Median MFU of the logged steps (the first steps, compiling or warming up, do not move it much)."""
    vals = [r["mfu"] for r in metrics if isinstance(r.get("mfu"), (int, float))]
    return statistics.median(vals) if vals else None


def stage_seconds(st: StageArtifacts | None, steps: tuple[str, ...], timing: dict | None) -> float | None:
    """Seconds of a stage with its evaluations: the speedrun's timing of its steps when it recorded them,
    else the stage's own wall time plus its evaluations' seconds (stages run by hand)."""
    recorded = (timing or {}).get("stages", {})
    if any(s in recorded for s in steps):
        return sum(recorded.get(s, 0.0) for s in steps)
    if st is None or not st.summary:
        return None
    total = st.summary.get("wall_time_s") or 0.0
    for v in (st.evals or {}).values():
        if isinstance(v, dict) and isinstance(v.get("seconds"), (int, float)):
            total += v["seconds"]
    return total or None


def _skills_headline(ev: dict) -> list[str]:
    return [f"skills {name} {fmt(ev[key])}" for name, key in (("EN", "skills"), ("JA", "skills_ja"))
            if ev.get(key) is not None]


def headline(st: StageArtifacts) -> str:
    """The few numbers that say how a stage went."""
    s, ev = st.summary or {}, st.evals or {}
    if not (s or ev or st.metrics):
        return "not run"
    if not (s or ev):  # metrics only: no figure of the stage's own to head with
        return "ran (no summary: unfinished?)"
    parts = []
    if st.stage == "base":
        bpb = ev.get("val_bpb", s.get("final_val_bpb"))
        parts.append(f"val bpb {fmt(bpb)}")
        if ev.get("core") is not None:
            parts.append(f"{ev.get('core_label', 'CORE')} {fmt(ev['core'])}")
    elif st.stage == "dpo":
        if "reward_accuracy_after" in s:
            parts.append(f"reward accuracy {before_after(s.get('reward_accuracy_before'), s['reward_accuracy_after'])}")
    else:
        if st.stage == "rl" and s.get("pass_at_k_after"):
            parts.append(f"pass@1 {before_after(s['pass_at_k_before'].get('pass@1'), s['pass_at_k_after'].get('pass@1'))}")
        elif s.get("val_loss") is not None:
            parts.append(f"val loss {fmt(s['val_loss'])}")
        chat = ev.get("chatcore")
        if chat is not None:
            parts.append(f"ChatCORE {fmt(chat)}")
        elif ev.get("chatcore_partial") is not None:
            parts.append(f"ChatCORE (partial) {fmt(ev['chatcore_partial'])}")
    parts += _skills_headline(ev)
    return " · ".join(parts) if parts else "ran (no summary: unfinished?)"


def summary_rows(run: RunArtifacts) -> str:
    rows = []
    if run.tok_meta:
        val = next((k for k in (run.tok_eval or {}).get("kinds", {}) if k.endswith(" val")), None)
        bpt = f" · {run.tok_eval['kinds'][val]['bytes_per_token']:.2f} bytes/token on {val}" if val else ""
        tok_head = f"vocab {run.tok_meta.get('vocab_size', 0):,}{bpt}"
    else:
        tok_head = "not run"
    rows.append(["Tokenizer", tok_head, fmt_time(stage_seconds(None, TIMING_STEPS["tokenizer"], run.timing))])
    for st in run.stages:
        name = label(st.stage) + (f" ({st.tag})" if st.tag else "")
        rows.append([name, headline(st), fmt_time(stage_seconds(st, TIMING_STEPS[st.stage], run.timing))])
    wall = (run.timing or {}).get("wall_s")
    if wall is not None:
        rows.append(["**total**", "", f"**{fmt_duration(wall)}**"])
    return table(["Stage", "Headline", "Time"], rows)


def _extra_task_rows(stages: list[StageArtifacts], known: set[str]) -> list[tuple[str, str]]:
    """Tasks an eval scored beyond the standard rows (e.g. the Japanese generated tasks): a key X with X_n."""
    extra = []
    for st in stages:
        for key in (st.evals or {}):
            task = key[: -len("_n")] if key.endswith("_n") else None
            if task and task not in known and task in st.evals and (task, task) not in extra:
                extra.append((task, task))
    return extra


def summary_table(stages: list[StageArtifacts], with_jglue: bool) -> str:
    """Every evaluation metric (rows) of every stage (columns); a metric no stage measured is named in one
    line below the table instead of a row of dashes (a Japanese run asks no ARC, MMLU or GSM8K)."""
    rows = METRIC_ROWS + (JGLUE_ROWS if with_jglue else [])
    rows = rows + _extra_task_rows(stages, {k for _, k in rows} | {"skills", "skills_ja"})
    if any((st.evals or {}).get("chatcore") is None and (st.evals or {}).get("chatcore_partial") is not None for st in stages):
        rows.append(("ChatCORE (partial: the tasks above that ran)", "chatcore_partial"))
    header = "| Metric | " + " | ".join(label(st.stage) for st in stages) + " |"
    sep = "|---|" + "---|" * len(stages)
    lines, unmeasured = [header, sep], []
    for name, key in rows:
        cells = []
        for st in stages:
            v = (st.evals or {}).get(key)
            if key == "val_bpb" and v is None and st.summary:
                v = st.summary.get("val_bpb") or st.summary.get("final_val_bpb")
            cells.append(fmt(v) if v is not None else "-")
        if name == "CORE":
            core_labels = {(st.evals or {}).get("core_label") for st in stages} - {None}
            if core_labels == {"CORE-lite"}:
                name = "CORE-lite"
        if all(c == "-" for c in cells):
            unmeasured.append(name)
            continue
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(lines) == 2:  # nothing measured at all: the table would be empty
        return "No stage has been evaluated yet.\n"
    note = f"\nNot measured on any stage: {', '.join(unmeasured)}.\n" if unmeasured else ""
    return "\n".join(lines) + "\n" + note


def skills_table(stages: list[StageArtifacts], tag: str | None = None) -> str | None:
    """Per-skill accuracy on the held-out skills prompts (`eval skills`) for each chat stage, with the
    open-prompt reply-quality proxy; None when no stage was evaluated on them."""
    from chibichat.tasks.skills import SKILLS

    chat = [st for st in stages if st.stage != "base"]
    prefixes = [p for p in ("skills", "skills_ja") if any((st.evals or {}).get(p) is not None for st in chat)]
    if not prefixes:
        return None
    out = []
    for prefix in prefixes:
        rows = [("all skills (mean)", prefix)] + [(s, f"{prefix}_{s.replace('-', '_')}") for s in SKILLS]
        rows += [("open prompts: proxy score", f"{prefix}_open_score"),
                 ("open prompts: ended in budget", f"{prefix}_open_ended_share"),
                 ("open prompts: on topic", f"{prefix}_open_on_topic"),
                 ("open prompts: distinct-2", f"{prefix}_open_distinct_2"),
                 ("simple-text bpb", f"{prefix}_simple_bpb")]
        lang = "EN" if prefix == "skills" else "JA"
        lines = [f"| Held-out skills ({lang}) | " + " | ".join(label(st.stage) for st in chat) + " |",
                 "|---|" + "---|" * len(chat)]
        for name, key in rows:
            lines.append(f"| {name} | " + " | ".join(fmt((st.evals or {}).get(key)) for st in chat) + " |")
        out.append("\n".join(lines))
    return f"## Held-out skills{_of(tag)}\n\nGreedy replies to prompts worded unlike the training templates (`chibichat eval " \
           "skills`).\n\n" + "\n\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# One section per stage


def tokenizer_section(meta: dict | None, ev: dict | None) -> str:
    if not meta:
        return "## Tokenizer\n\nnot run\n"
    tr = meta.get("training", {})
    rows = [("vocab size", fmt_int(meta.get("vocab_size"))), ("pre-split", meta.get("split")),
            ("trained on", f"{fmt_int(tr.get('chars'))} characters of {tr.get('corpus', '?')} "
                           f"({fmt_int(tr.get('docs'))} documents)" if tr else None),
            ("training time", f"{tr['seconds']:.1f} s ({fmt_int(tr.get('chars_per_s'))} chars/s)"
             if isinstance(tr.get("seconds"), (int, float)) else None),
            ("pre-split chunks", f"{fmt_int(tr.get('chunks'))} ({fmt_int(tr.get('unique_chunks'))} unique, "
                                 f"mean {tr.get('mean_chunk_bytes', 0):.1f} bytes)" if "chunks" in tr else None)]
    out = "## Tokenizer\n\n" + kv_table(rows)
    kinds = (ev or {}).get("kinds")
    if kinds:
        refs = [r for r in ("GPT-2", "GPT-4") if any(r in k for k in kinds.values())]
        body = [[name, fmt_int(k.get("bytes")), fmt_int(k.get("tokens")), f"{k['bytes_per_token']:.3f}"]
                + [_ref_cell(k.get(r)) for r in refs] for name, k in kinds.items()]
        out += ("\nCompression (bytes per token, higher is better):\n\n"
                + table(["text", "bytes", "tokens", "bytes/token"] + [f"{r} bytes/token" for r in refs], body))
    return out


def _ref_cell(v) -> str:
    if isinstance(v, dict):
        v = v.get("bytes_per_token")
    return f"{v:.3f}" if isinstance(v, float) else fmt(v)


def _throughput(s: dict) -> str | None:
    tps = s.get("tok_per_s")
    if tps is None and s.get("tokens") and s.get("train_time_s"):
        tps = s["tokens"] / s["train_time_s"]
    return None if tps is None else f"{fmt_int(tps)} tok/s"


def _time_row(s: dict) -> str | None:
    if s.get("train_time_s") is None:
        return None
    wall = f" (stage wall time {fmt_duration(s['wall_time_s'])})" if s.get("wall_time_s") is not None else ""
    fit = " · fitted to --minutes" if s.get("minutes_fit") else ""
    return fmt_duration(s["train_time_s"]) + wall + fit


def base_section(st: StageArtifacts, written: set[str]) -> str:
    s = st.summary or {}
    params = None
    if s.get("params") is not None:
        params = fmt_int(s["params"]) + (f" ({fmt_int(s['scaling_params'])} for scaling)" if s.get("scaling_params") else "")
    rows = [("model", f"depth {s['depth']}, layers {s.get('layers', '?')}" if "depth" in s else None),
            ("parameters", params),
            ("data", s.get("corpus", "?") + (f" (pass {s['epoch'] + 1} over it" if isinstance(s.get("epoch"), int) else " (")
             + (f"; packing cropped {fmt_pct(s['crop_fraction'])} of the tokens taken)"
                if s.get("crop_fraction") is not None else ")") if s.get("corpus") else None),
            ("tokens", fmt_int(s["tokens"]) if s.get("tokens") is not None else None),
            ("steps", f"{fmt_int(s['steps'])} × {fmt_int(s.get('total_batch'))} tokens (seq len {s.get('seq_len')})"
             if s.get("steps") is not None else None),
            ("training time", _time_row(s)),
            ("throughput", _throughput(s)),
            ("MFU (median over steps)", fmt_pct(median_mfu(st.metrics)) if median_mfu(st.metrics) is not None else None),
            ("device", f"{s['device']} · {s.get('compute_dtype', '?')}" + (" · fp8" if s.get("fp8") else "")
             if s.get("device") else None),
            ("final train loss", fmt(s.get("final_loss")) if s.get("final_loss") is not None else None),
            ("val bpb", f"{fmt(s['final_val_bpb'])} (min {fmt(s.get('min_val_bpb'))})"
             if s.get("final_val_bpb") is not None else None)]
    return _stage_block(st, rows, ["base_loss.png", "val_bpb.png"], written) + base_eval_section(st)


def base_eval_section(st: StageArtifacts) -> str:
    ev = st.evals
    if not ev:
        return "\n### BASE evaluation\n\nnot run\n"
    be = ev.get("base_eval", {})
    on = f" on {fmt_int(be['val_tokens'])} tokens of {be.get('corpus', '?')}" if be.get("val_tokens") else ""
    rows = [("val bpb", fmt(ev.get("val_bpb")) + on if "val_bpb" in ev else None),
            (ev.get("core_label", "CORE"), fmt(ev["core"]) if ev.get("core") is not None else None),
            ("items longer than the context", fmt(ev.get("core_skipped_too_long")) if "core_skipped_too_long" in ev else None)]
    rows += [(f"{name} (few-shot)", fmt(ev[key])) for name, key in JGLUE_ROWS if ev.get(key) is not None]
    out = "\n### BASE evaluation\n\n" + kv_table(rows)
    tasks = ev.get("core_tasks")
    if isinstance(tasks, list) and tasks:
        body = [[t.get("name", "?"), fmt(t.get("accuracy")), fmt(t.get("centered")), fmt(t.get("n_scored")),
                 fmt(t.get("n_skipped_too_long")), fmt(t.get("num_fewshot"))] for t in tasks if isinstance(t, dict)]
        out += "\n" + table(["CORE task", "accuracy", "centered", "items", "too long", "shots"], body)
    return out


def chat_stage_section(st: StageArtifacts, written: set[str]) -> str:
    s = st.summary or {}
    rows = [("source", s.get("source")), ("steps", fmt_int(s.get("steps")) if s.get("steps") is not None else None),
            ("tokens", fmt_int(s.get("tokens")) if s.get("tokens") is not None else None),
            ("training time", _time_row(s)), ("throughput", _throughput(s)),
            ("loss on", s.get("loss_on")),
            ("final train loss", fmt(s.get("final_loss")) if s.get("final_loss") is not None else None),
            ("val loss", fmt(s.get("val_loss")) if s.get("val_loss") is not None else None),
            ("over-length policy", f"{s['mode']} / {s.get('overflow')}" if s.get("mode") else None)]
    soup = s.get("soup")
    if isinstance(soup, dict) and soup.get("members"):  # --soup: the checkpoint is the members' average
        if len(soup["members"]) == 1:  # the budget fitted one run of full length (sft.fewer_full_runs)
            rows.append(("weights", f"one run (seed {', '.join(str(x) for x in soup.get('seeds', []))}): no other "
                         "run of full length fitted the stage's minutes"))
        else:
            rows.append(("weights", f"average of {len(soup['members'])} runs (seeds "
                         + ", ".join(str(x) for x in soup.get("seeds", [])) + "; val loss "
                         + ", ".join(fmt(v) for v in soup.get("member_val_loss", [])) + "); steps, tokens and time "
                         "are the runs' together, the val loss the average's"))
    out = _stage_block(st, rows, [f"{st.stage}_loss.png"], written)
    mixture, counts = s.get("mixture") or {}, s.get("render_counts") or {}
    if mixture or counts:
        body = [[task, fmt(mixture.get(task)), *(fmt(counts.get(task, {}).get(k, 0) if task in counts else None)
                                                 for k in ("ok", "shortened", "dropped"))]
                for task in list(mixture) + [t for t in sorted(counts) if t not in mixture]]
        out += ("\nMixture: rows per task; of the conversations this run rendered, those kept whole, shortened or "
                "dropped as over-length:\n\n"
                + table(["task", "rows", "ok", "shortened", "dropped"], body))
    return out + chat_eval_section(st)


def rl_section(st: StageArtifacts, written: set[str]) -> str:
    from chibichat.stages.rl import windows_label

    s = st.summary or {}
    windows = s.get("reward_windows")
    rows = [("source", s.get("source")),
            ("task", f"{s['task']} (pass@k on {s.get('eval_task', '?')})" if s.get("task") else None),
            ("steps", f"{fmt_int(s['steps'])} × {s.get('prompts_per_step', '?')} prompts × {s.get('num_samples', '?')} "
                      "samples" if s.get("steps") is not None else None),
            ("training time", _time_row(s)),
            (f"mean reward by {windows_label(windows) if windows else 'fifths of the run'}",
             " → ".join(f"{w:.3f}" for w in windows) if windows else None),
            ("steps without signal", fmt(s.get("skipped_steps")) if "skipped_steps" in s else None),
            ("prompts left out as too long", fmt(s.get("train_prompts_skipped_too_long"))
             if "train_prompts_skipped_too_long" in s else None)]
    out = _stage_block(st, rows, ["reward.png"], written)
    before, after = s.get("pass_at_k_before") or {}, s.get("pass_at_k_after") or {}
    ks = [k for k in after if k.startswith("pass@")] or [k for k in before if k.startswith("pass@")]
    if ks:
        out += "\n" + table(["metric", "before RL", "after RL"], [[k, fmt(before.get(k)), fmt(after.get(k))] for k in ks])
    return out + chat_eval_section(st)


def dpo_section(st: StageArtifacts, written: set[str]) -> str:
    s = st.summary or {}
    left = s.get("pairs_left_out_too_long") or {}
    rows = [("source", s.get("source")), ("data", s.get("data")), ("beta", fmt(s.get("beta")) if "beta" in s else None),
            ("pairs", f"{fmt_int(s['train_pairs'])} train, {fmt_int(s.get('val_pairs'))} held out"
             + (f" ({left.get('train', 0)} + {left.get('val', 0)} left out as too long)" if left else "")
             if s.get("train_pairs") is not None else None),
            ("steps", fmt_int(s.get("steps")) if s.get("steps") is not None else None),
            ("training time", _time_row(s))]
    for name, key in (("held-out reward accuracy", "reward_accuracy"), ("held-out reward margin", "reward_margin"),
                      ("held-out DPO loss", "val_dpo_loss")):
        if f"{key}_after" in s:
            rows.append((name, before_after(s.get(f"{key}_before"), s[f"{key}_after"])))
    return _stage_block(st, rows, ["reward_accuracy.png", "reward_margin.png"], written) + chat_eval_section(st)


def _stage_block(st: StageArtifacts, rows: list[tuple[str, str | None]], plots: list[str], written: set[str]) -> str:
    title = f"## {label(st.stage)}: {STAGE_TITLES[st.stage]}" + (f" ({st.tag})" if st.tag else "")
    if not (st.summary or st.metrics):
        return f"{title}\n\nnot run\n"
    if not st.summary:
        rows = [("status", "no summary.json: the run did not finish (metrics only)")] + rows
    pics = images(plots, written)
    return f"{title}\n\n" + kv_table(rows) + ("\n" + pics if pics else "")


def chat_eval_section(st: StageArtifacts) -> str:
    """The chat tasks of `eval chat` (accuracy, centered, items); skills are in the held-out skills table."""
    from chibichat.eval.chat import summary_key

    title = f"\n### {label(st.stage)} evaluation\n\n"
    ev = st.evals or {}
    tasks = (ev.get("chat_eval") or {}).get("tasks")
    names = [t["task"] for t in tasks if isinstance(t, dict) and "task" in t] if isinstance(tasks, list) else \
        [k[:-2] for k in ev if k.endswith("_n") and k[:-2] in ev and not k.startswith("skills")]
    if not names:
        skills = _skills_headline(ev)
        return title + (("held-out skills: " + ", ".join(skills) + " (table above)\n") if skills else "not run\n")
    body = []
    for name in names:
        key = summary_key(name)
        body.append([name, fmt(ev.get(key)), fmt(ev.get(f"{key}_centered")), fmt(ev.get(f"{key}_n")),
                     fmt(ev.get(f"{key}_skipped_too_long"))])
    for name, key in (("**ChatCORE**", "chatcore"), ("**ChatCORE (partial)**", "chatcore_partial")):
        if ev.get(key) is not None:
            body.append([name, "", fmt(ev[key]), "", ""])
    return title + table(["task", "accuracy", "centered", "items", "too long"], body)


def timings_section(timing: dict | None, tag: str | None = None, untagged: bool = False) -> str:
    steps = (timing or {}).get("stages") or {}
    note = ("\nreport/timing.json also holds timings recorded before they were kept per tag: no run can claim "
            "them, so none is shown\n") if untagged else ""
    if not steps:
        return (f"## Timings\n\nno speedrun timing recorded{' for ' + tag if tag else ''} (report/timing.json); "
                "stage times above are their own\n" + note)
    total = sum(steps.values()) or 1.0
    # A speedrun with a time budget records the seconds it gave each training step (its share of what the
    # steps before it left): shown beside the time each took. Their total is not shown: the shares overlap.
    given = (timing or {}).get("budget_s") or {}
    head = ["speedrun step", "time", "share"] + (["budget"] if given else [])
    body = []
    for name, sec in steps.items():
        row = [name, fmt_duration(sec), f"{100 * sec / total:.1f}%"]
        body.append(row + [fmt_duration(given[name]) if name in given else ""] if given else row)
    total_row = ["**total**", f"**{fmt_duration(sum(steps.values()))}**", "100%"]
    body.append(total_row + [""] if given else total_row)
    return "## Timings\n\n" + table(head, body) + note


def appendix(run: RunArtifacts) -> str:
    """Every recorded value, collapsed; keys listed in APPENDIX_SHOWN_ELSEWHERE are named, not repeated."""
    sources = [("tokenizer/tokenizer.json", run.tok_meta), ("tokenizer/eval.json", run.tok_eval)]
    for st in run.stages:
        where = f"{st.stage}/{st.tag}" if st.tag else st.stage
        sources += [(f"checkpoints/{where}/summary.json", st.summary), (f"eval/{where}/summary.json", st.evals)]
    sources.append(("report/timing.json", {"runs": {run.tag: run.timing}} if run.timing else None))
    parts = ["## Appendix: every recorded value\n"]
    for name, data in sources:
        if not data:
            continue
        dropped: set[str] = set()
        lines = [f"<details><summary>{name}</summary>", ""]
        lines += [f"- {k}: {fmt(v)}" for k, v in _flatten(_drop(data, dropped))]
        if dropped:
            lines.append("- (not repeated here: " + "; ".join(f"{k}: {APPENDIX_SHOWN_ELSEWHERE[k]}"
                                                             for k in sorted(dropped)) + ")")
        parts.append("\n".join(lines + ["", "</details>", ""]))
    if len(parts) == 1:
        parts.append("nothing recorded yet\n")
    return "\n".join(parts)


def _drop(d: dict, dropped: set[str]) -> dict:
    """`d` without the keys shown elsewhere, at any depth (their names are added to `dropped`)."""
    out = {}
    for k, v in d.items():
        if k in APPENDIX_SHOWN_ELSEWHERE:
            dropped.add(k)
        else:
            out[k] = _drop(v, dropped) if isinstance(v, dict) else v
    return out


# ----------------------------------------------------------------------------------------------
# Environment header


def _git_info() -> dict:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {"commit": "unknown (not a git checkout)"}
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": "unknown (git not available)"}


def _hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["ram"] = f"{pages * page / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpus"] = f"{len(names)} x {names[0]}"
    else:
        info["gpus"] = "none"
    info["python"] = platform.python_version()
    info["torch"] = torch.__version__
    info["chibichat"] = __version__
    return info


def _hourly_rate(gpu_name: str) -> float | None:
    """The table's price for a GPU whose name holds a table key as a whole word ("NVIDIA A100-SXM4-80GB" ->
    A100; "NVIDIA L40S" matches no key, not L4), else None: an unknown GPU has no invented price."""
    import re

    words = set(re.split(r"[\s\-_/]+", gpu_name.upper()))
    return next((r for k, r in HOURLY_USD.items() if k in words), None)


def _estimated_cost(hw: dict, wall_s: float | None, hourly: float | None) -> str:
    if hourly is not None and not hourly >= 0:
        raise ChibiError(f"--hourly-usd must be a price >= 0, got {hourly}")
    if wall_s is None:
        return "unknown (no wall time recorded)"
    if hw.get("gpus", "none") == "none":
        if hourly is None:  # a CPU run: the user's own machine, unless they price a rented one
            return "$0.00 on your own CPU (pass --hourly-usd with a rented machine's price per hour)"
        rate, count = hourly, 1
    else:
        count = int(hw["gpus"].split(" x ")[0])
        name = hw["gpus"].split(" x ")[1]
        rate = hourly if hourly is not None else _hourly_rate(name)
        if rate is None:
            return (f"unknown (no price on file for {name}; pass --hourly-usd with its price per device-hour, "
                    f"known: {', '.join(HOURLY_USD)})")
    return f"${rate * count * wall_s / 3600:.2f} ({count} device(s) x ${rate:.2f}/h x {wall_s / 3600:.2f} h)"


def header(home: Home, wall_s: float | None, hourly: float | None) -> str:
    hw = _hardware()
    git = _git_info()
    rows = [(k, fmt(v)) for k, v in {**git, **hw}.items()]
    rows.append(("wall time", fmt_duration(wall_s) if wall_s is not None else "unknown"))
    rows.append(("estimated cost", _estimated_cost(hw, wall_s, hourly)))
    return (f"# chibichat report card\n\nGenerated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from `{home.root}`\n\n"
            + kv_table(rows))


# ----------------------------------------------------------------------------------------------
# Plots


def _series(st: StageArtifacts, key: str) -> tuple[list, list] | None:
    pts = [(r["step"], r[key]) for r in st.metrics if r.get(key) is not None and "step" in r]
    return (list(zip(*pts))) if pts else None


def plot_specs(stages: list[StageArtifacts]) -> list[tuple[str, str, list[tuple[str, tuple]]]]:
    """(file name, title, [(line label, (steps, values))]) of every plot with at least one line: one
    quantity across the stages (loss, lr, bpb, RL reward, DPO reward accuracy/margin) and each training
    stage's own train/val loss, drawn beside that stage's table."""
    specs = []
    for fname, title, key in [("loss.png", "train loss", "loss"), ("lr.png", "learning rate (multiplier)", "lr"),
                              ("val_bpb.png", "validation bits per byte", "val_bpb"),
                              ("reward.png", "RL mean reward", "reward"),
                              ("reward_accuracy.png", "DPO held-out reward accuracy", "reward_accuracy"),
                              ("reward_margin.png", "DPO held-out reward margin", "reward_margin")]:
        lines = [(st.stage, s) for st in stages if (s := _series(st, key))]
        if lines:
            specs.append((fname, title, lines))
    for st in stages:
        if st.stage in ("base", "mid", "sft"):
            lines = [(name, s) for name, key in (("train", "loss"), ("val", "val_loss")) if (s := _series(st, key))]
            if lines:
                specs.append((f"{st.stage}_loss.png", f"{label(st.stage)} loss", lines))
    return specs


def plot(stages: list[StageArtifacts], out_dir: Path) -> list[str]:
    """Draw every plot of `plot_specs` as a PNG in out_dir. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")  # no display; set here, not at import, so importing this module has no side effects
    import matplotlib.pyplot as plt

    written = []
    for fname, title, lines in plot_specs(stages):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, (xs, ys) in lines:
            ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(out_dir / fname, buf.getvalue())
        written.append(fname)
    return written


# ----------------------------------------------------------------------------------------------


def render(run: RunArtifacts, written: set[str]) -> list[str]:
    """The report's sections after the header, in order (each a markdown string)."""
    stages = run.stages
    with_jglue = any((st.evals or {}).get(k) is not None for st in stages for _, k in JGLUE_ROWS)
    parts = ["## Summary\n\n" + summary_rows(run) + ("\n" + images(["loss.png", "lr.png"], written)
                                                    if {"loss.png", "lr.png"} & written else "")]
    parts.append(f"## Evaluations by stage{_of(run.tag)}\n\n" + summary_table(stages, with_jglue))
    skills = skills_table(stages, run.tag)
    if skills:
        parts.append(skills)
    parts.append(tokenizer_section(run.tok_meta, run.tok_eval))
    sections = {"base": base_section, "rl": rl_section, "dpo": dpo_section}
    for st in stages:
        parts.append(sections.get(st.stage, chat_stage_section)(st, written))
    parts.append(timings_section(run.timing, run.tag, run.untagged_timing))
    parts.append(appendix(run))
    return parts


def build_report(home: Home, tag: str | None = None, wall_s: float | None = None, hourly: float | None = None) -> Path:
    if not home.root.exists():
        raise ChibiError(f"home {home.root} does not exist; run `chibichat speedrun` (or the stages) first")
    run = collect_run(home, tag)
    if wall_s is None and run.timing:
        wall_s = run.timing.get("wall_s")
    out_dir = home.report_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = set(plot(run.stages, out_dir))
    text = "\n".join([header(home, wall_s, hourly)] + render(run, written))
    atomic_write_text(out_dir / "report.md", text)
    return out_dir / "report.md"


def run(args) -> int:
    home = Home.resolve(args.home)
    check_home(home)
    path = build_report(home, args.tag, args.wall_time, args.hourly_usd)
    if args.print_report:
        print(path.read_text(encoding="utf-8"))
    print(f"report written to {path}")
    return 0
