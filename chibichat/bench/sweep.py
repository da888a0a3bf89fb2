"""`chibichat bench sweep`: model size against tokens at one wall-clock budget.

On a CPU the budget, not the data, limits learning: a quickstart pretrains for ~4.4 minutes. For each
depth in --depths this runs `chibichat pretrain --depth D --minutes M` in its own process, into the home's
checkpoints/base/sweep-<M>m-dD (the home's tokenizer; shape and learning rates from the depth dial;
--seq-len, --device-batch, --total-batch as given, the same for every depth). --minutes fits each run's
step count and LR schedule to its own measured throughput, so a small model sees more tokens and a large
one fewer in the same time. Each run scores its final val bpb on the same --eval-tokens of the corpus's
validation split, which makes the rows comparable (bpb does not depend on the model).

Writes DIR/sweep-<M>m.json (one row per depth), .md (the table) and .png (val bpb against scaling
parameters, each point labelled with its depth and tokens), DIR = --out or home/report. A depth whose run
already wrote its summary.json is read, not run again: an interrupted sweep resumes, and a finished one
is re-tabulated for free. The tag holds only the minutes and the depth, so a finished run is read only
when it ran with the flags this sweep gives it (bench/reuse.py: --corpus, --layers, --seq-len, the batch
flags, --eval-tokens, ...); a rerun with other settings is refused, naming the flag. Timings are only
comparable within one quiet run of the sweep.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from chibichat.common import (ChibiError, Home, atomic_write_bytes, atomic_write_json, atomic_write_text, check_output,
                              parse_int_list)

HELP = "pretrain several depths for the same minutes and compare val bpb (model size against tokens)"


def add_args(p) -> None:
    p.add_argument("--depths", default="2,3,4,6", help="comma list of depths (default: 2,3,4,6)")
    p.add_argument("--minutes", type=float, default=7.5, help="training minutes per depth (default: 7.5, "
                   "the cpu preset's pretraining share when the sweep was first run)")
    p.add_argument("--corpus", default="embedded-en", help="pretraining corpus (default: embedded-en)")
    p.add_argument("--layers", default="dense", help="token mixers, as pretrain --layers (default: dense)")
    p.add_argument("--seq-len", type=int, default=256, help="context of a training row (default: 256)")
    p.add_argument("--device-batch", type=int, default=16, help="rows per micro-batch (default: 16)")
    p.add_argument("--total-batch", type=int, default=4096, help="tokens per optimizer step (default: 4096)")
    p.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens scored at the end "
                   "(default: 32768)")
    p.add_argument("--device", default="auto", help="passed to pretrain")
    p.add_argument("--dtype", default="auto", help="passed to pretrain")
    p.add_argument("--out", default=None, help="folder for sweep-<M>m.{json,md,png} (default: home/report)")


def parse_depths(text: str) -> list[int]:
    return sorted(parse_int_list(text, "--depths", "depths", 1, "2,3,4,6"))


def sweep_name(minutes: float) -> str:
    return f"sweep-{minutes:g}m"


def pretrain_argv(args, home: Home, depth: int) -> list[str]:
    """One depth's pretraining: the budget decides the step count (the --num-steps cap is never reached),
    evaluation and the checkpoint happen once, at the end, inside the budget."""
    never = "1000000"
    return ["pretrain", "--home", str(home.root), "--corpus", args.corpus, "--layers", args.layers,
            "--depth", str(depth), "--seq-len", str(args.seq_len), "--device-batch", str(args.device_batch),
            "--total-batch", str(args.total_batch), "--num-steps", never, "--minutes", f"{args.minutes:g}",
            "--eval-every", never, "--save-every", never, "--eval-tokens", str(args.eval_tokens),
            "--sample-every", "0", "--device", args.device, "--dtype", args.dtype,
            "--tag", f"{sweep_name(args.minutes)}-d{depth}"]


def row_of(depth: int, summary: dict) -> dict:
    tokens = summary["tokens"]
    return {"depth": depth, "params": summary["params"], "scaling_params": summary["scaling_params"],
            "steps": summary["steps"], "tokens": tokens, "tok_per_s": summary["tok_per_s"],
            "tokens_per_param": tokens / summary["scaling_params"], "train_time_s": summary["train_time_s"],
            "val_bpb": summary["final_val_bpb"]}


def table_md(rows: list[dict], minutes: float) -> str:
    best = min(rows, key=lambda r: r["val_bpb"])
    lines = [f"Pretraining for {minutes:g} minutes per depth (`chibichat bench sweep`); lower val bpb is better.", "",
             "| depth | params | scaling params | steps | tokens | tok/s | tokens / param | train s | val bpb |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (best)" if r is best else ""
        lines.append(f"| {r['depth']} | {r['params']:,} | {r['scaling_params']:,} | {r['steps']:,} | {r['tokens']:,} | "
                     f"{r['tok_per_s']:,.0f} | {r['tokens_per_param']:.2f} | {r['train_time_s']:.0f} | "
                     f"{r['val_bpb']:.4f}{mark} |")
    return "\n".join(lines) + "\n"


def plot_png(rows: list[dict], minutes: float) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display; set here, not at import
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [r["scaling_params"] for r in rows], [r["val_bpb"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r in rows:
        ax.annotate(f"d{r['depth']}\n{r['tokens'] / 1e6:.1f}M tok", (r["scaling_params"], r["val_bpb"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.1)  # room for the labels of the outermost points
    ax.set_xlabel("scaling parameters (log)")
    ax.set_ylabel("final val bpb")
    ax.set_title(f"Model size against tokens: {minutes:g} min of pretraining each")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run(args) -> int:
    if not args.minutes > 0:
        raise ChibiError(f"--minutes must be positive, got {args.minutes}")
    depths = parse_depths(args.depths)
    if args.out:
        check_output(args.out, "--out", folder=True)  # written after every depth has trained
    home = Home.resolve(args.home)
    rows = []
    for depth in depths:
        tag = f"{sweep_name(args.minutes)}-d{depth}"
        summary_path = home.checkpoints_dir("base", tag) / "summary.json"
        argv = pretrain_argv(args, home, depth)
        if summary_path.exists():
            from chibichat.bench.reuse import flag_mismatch

            differ = flag_mismatch(home, "base", tag, argv)
            if differ is not None:
                flag, had, want = differ
                raise ChibiError(f"d{depth}: {home.checkpoints_dir('base', tag)} was pretrained with {flag} {had}, "
                                 f"this sweep asks {want}: rerun the sweep with the settings of its finished runs, "
                                 "another --minutes, or delete that folder to train the depth again")
            print(f"d{depth}: done already ({summary_path}), reading it", flush=True)
        else:
            print(f"d{depth}: $ chibichat {' '.join(argv)}", flush=True)
            rc = subprocess.run([sys.executable, "-m", "chibichat", *argv]).returncode
            if rc != 0:
                raise ChibiError(f"pretraining depth {depth} failed (exit code {rc}); its output is above. Re-run "
                                 "the sweep to resume: finished depths are read, not run again")
        rows.append(row_of(depth, json.loads(summary_path.read_text())))
    out = Path(args.out) if args.out else home.report_dir
    out.mkdir(parents=True, exist_ok=True)
    name = sweep_name(args.minutes)  # "sweep-7.5m": not Path.with_suffix, which would cut at the ".5m"
    atomic_write_json(out / f"{name}.json", {"minutes": args.minutes, "corpus": args.corpus,
                                                  "layers": args.layers, "rows": rows})
    md = table_md(rows, args.minutes)
    atomic_write_text(out / f"{name}.md", md)
    atomic_write_bytes(out / f"{name}.png", plot_png(rows, args.minutes))
    print(md + f"wrote {out / name}.json, .md and .png", flush=True)
    return 0
