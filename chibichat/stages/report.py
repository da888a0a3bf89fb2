"""`chibichat report`: the report card — report/report.md plus PNG plots, built from the artifacts that
every stage leaves under the home directory (see docs/architecture.md "Summaries").

The report only reads artifacts; it never re-runs anything. A stage that has not run is listed as
"not run" rather than silently omitted, so a reader can tell a skipped stage from a missing section.
"""

from __future__ import annotations

import io
import json
import os
import platform
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

# Summary-table rows: (label, eval-summary key). Values come from home/eval/<stage>/<tag>/summary.json.
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

# Rough on-demand prices per device-hour, for the cost line (a laptop CPU costs nothing extra).
HOURLY_USD = {"H100": 3.00, "H200": 3.50, "A100": 1.79, "V100": 0.55, "L4": 0.80, "A10": 0.75}


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write the report card (report/report.md + plots) from the artifacts in the home",
        description=(
            "Collect every stage's summary, metrics and evaluations under the home directory into "
            "report/report.md: an environment header, one section per stage, data counts (including "
            "conversations dropped or shortened as over-length), a metrics x {BASE, MID, SFT, RL, DPO} table "
            "and PNG plots of loss, bpb, learning rate, RL reward and DPO reward accuracy/margin."
        ),
    )
    add_home_arg(p)
    p.add_argument("--tag", default=None, help="model tag to report on (default: the newest base tag)")
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


def _read_json(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChibiError(f"{path} is corrupt ({e}); re-run the stage that writes it") from None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write can leave one partial last line; anything else is corruption.
            if n == len(lines):
                continue
            raise ChibiError(f"{path} line {n} is not JSON; delete the file or re-run the stage") from None
    return rows


def _newest_tag(home: Home, stage: str) -> str | None:
    root = home.root / "checkpoints" / stage
    if not root.is_dir():
        return None
    tags = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not tags:
        return None
    return max(tags, key=lambda d: d.stat().st_mtime).name


def collect(home: Home, tag: str | None) -> list[StageArtifacts]:
    tag = tag or _newest_tag(home, "base")
    out = []
    for stage, _ in TRAIN_STAGES:
        t = tag if tag and (home.checkpoints_dir(stage, tag)).exists() else _newest_tag(home, stage)
        run_dir = home.checkpoints_dir(stage, t) if t else None
        summary = _read_json(run_dir / "summary.json") if run_dir else None
        metrics = _read_jsonl(run_dir / "metrics.jsonl") if run_dir else []
        evals = _read_json(home.eval_dir(stage, t) / "summary.json") if t else None
        if stage in OPTIONAL_STAGES and not (summary or metrics or evals):
            continue
        out.append(StageArtifacts(stage, t, summary, metrics, evals))
    return out


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


def section(title: str, data: dict | None) -> str:
    if not data:
        return f"## {title}\n\nnot run\n"
    lines = [f"## {title}", ""]
    lines += [f"- {k}: {fmt(v)}" for k, v in _flatten(data)]
    return "\n".join(lines) + "\n"


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
    rows = METRIC_ROWS + (JGLUE_ROWS if with_jglue else [])
    rows = rows + _extra_task_rows(stages, {k for _, k in rows} | {"skills", "skills_ja"})
    if any((st.evals or {}).get("chatcore") is None and (st.evals or {}).get("chatcore_partial") is not None for st in stages):
        rows.append(("ChatCORE (partial: the tasks above that ran)", "chatcore_partial"))
    names = dict(TRAIN_STAGES)
    header = "| Metric | " + " | ".join(names[st.stage] for st in stages) + " |"
    sep = "|---|" + "---|" * len(stages)
    lines = [header, sep]
    for label, key in rows:
        cells = []
        for st in stages:
            v = (st.evals or {}).get(key)
            if key == "val_bpb" and v is None and st.summary:
                v = st.summary.get("val_bpb") or st.summary.get("final_val_bpb")
            cells.append(fmt(v) if v is not None else "-")
        if label == "CORE":
            core_labels = {(st.evals or {}).get("core_label") for st in stages} - {None}
            if core_labels == {"CORE-lite"}:
                label = "CORE-lite"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def skills_table(stages: list[StageArtifacts]) -> str | None:
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
                 ("open prompts: distinct-2", f"{prefix}_open_distinct_2"),
                 ("simple-text bpb", f"{prefix}_simple_bpb")]
        lang = "EN" if prefix == "skills" else "JA"
        lines = [f"| Held-out skills ({lang}) | " + " | ".join(dict(TRAIN_STAGES)[st.stage] for st in chat) + " |",
                 "|---|" + "---|" * len(chat)]
        for label, key in rows:
            lines.append(f"| {label} | " + " | ".join(fmt((st.evals or {}).get(key)) for st in chat) + " |")
        out.append("\n".join(lines))
    return "## Held-out skills\n\nGreedy replies to prompts worded unlike the training templates (`chibichat eval " \
           "skills`).\n\n" + "\n\n".join(out) + "\n"


def data_counts(stages: list[StageArtifacts]) -> str:
    """Per-task ok/shortened/dropped counts of the conversation stages (the over-length policy at work)."""
    lines = []
    for st in stages:
        counts = (st.summary or {}).get("render_counts")
        if not counts:
            continue
        lines.append(f"**{st.stage}**\n")
        lines.append("| task | ok | shortened | dropped |")
        lines.append("|---|---|---|---|")
        for task, c in sorted(counts.items()):
            lines.append(f"| {task} | {c.get('ok', 0)} | {c.get('shortened', 0)} | {c.get('dropped', 0)} |")
        lines.append("")
    if not lines:
        return "## Data counts\n\nno conversation stage has run\n"
    return "## Data counts (conversations kept, shortened or dropped as over-length)\n\n" + "\n".join(lines)


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
        info["ram_gb"] = round(pages * page / 2**30, 1)
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
        rate, count = (hourly or 0.0), 1
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
    lines = ["# chibichat report card", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from `{home.root}`", ""]
    lines += [f"- {k}: {fmt(v)}" for k, v in {**git, **hw}.items()]
    lines.append(f"- wall time: {fmt_duration(wall_s) if wall_s is not None else 'unknown'}")
    lines.append(f"- estimated cost: {_estimated_cost(hw, wall_s, hourly)}")
    return "\n".join(lines) + "\n"


def fmt_duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


# ----------------------------------------------------------------------------------------------
# Plots


def plot(stages: list[StageArtifacts], out_dir: Path) -> list[str]:
    """One PNG per quantity, one line per stage. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")  # no display; set here, not at import, so importing this module has no side effects
    import matplotlib.pyplot as plt

    written = []
    plots = [
        ("loss.png", "train loss", "loss"),
        ("val_bpb.png", "validation bits per byte", "val_bpb"),
        ("lr.png", "learning rate (multiplier)", "lr"),
        ("reward.png", "RL mean reward", "reward"),
        ("reward_accuracy.png", "DPO held-out reward accuracy", "reward_accuracy"),
        ("reward_margin.png", "DPO held-out reward margin", "reward_margin"),
    ]
    for fname, title, key in plots:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        any_line = False
        for st in stages:
            pts = [(r["step"], r[key]) for r in st.metrics if r.get(key) is not None and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=st.stage, marker="." if len(pts) < 30 else None)
                any_line = True
        if not any_line:
            plt.close(fig)
            continue
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


def build_report(home: Home, tag: str | None = None, wall_s: float | None = None, hourly: float | None = None) -> Path:
    if not home.root.exists():
        raise ChibiError(f"home {home.root} does not exist; run `chibichat speedrun` (or the stages) first")
    stages = collect(home, tag)
    if wall_s is None:
        timing = _read_json(home.report_dir / "timing.json")
        if timing:
            wall_s = timing.get("wall_s")
    tok_meta = _read_json(home.tokenizer_dir / "tokenizer.json")
    tok_eval = _read_json(home.tokenizer_dir / "eval.json")
    with_jglue = any(
        (st.evals or {}).get(k) is not None for st in stages for _, k in JGLUE_ROWS
    )

    parts = [header(home, wall_s, hourly)]
    parts.append("## Summary\n\n" + summary_table(stages, with_jglue))
    skills = skills_table(stages)
    if skills:
        parts.append(skills)
    tok_train = None
    if tok_meta:
        tok_train = {k: v for k, v in tok_meta.items() if k not in ("special_tokens", "pattern")}
    parts.append(section("Tokenizer training", tok_train))
    parts.append(section("Tokenizer evaluation", tok_eval))
    titles = {"base": "Base training", "mid": "Midtraining", "sft": "SFT", "rl": "RL", "dpo": "DPO"}
    eval_titles = {"base": "Base evaluation", "mid": "Chat evaluation (MID)", "sft": "Chat evaluation (SFT)",
                   "rl": "Chat evaluation (RL)", "dpo": "Chat evaluation (DPO)"}
    for st in stages:
        parts.append(section(f"{titles[st.stage]}" + (f" ({st.tag})" if st.tag else ""), st.summary))
        parts.append(section(eval_titles[st.stage], st.evals))
    parts.append(data_counts(stages))

    out_dir = home.report_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plot(stages, out_dir)
    if pngs:
        parts.append("## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in pngs) + "\n")
    text = "\n".join(parts)
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
