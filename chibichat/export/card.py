"""The model card (README.md) of an export: what the model is, how to load it, how it was trained,
on which data under which licences, and the metrics the home holds for it.

Everything comes from files the stages wrote: the checkpoint's meta.json and its `source` chain
(sft -> mid -> base), each stage's summary.json, home/eval/<stage>/<tag>/summary.json, the
corpus registry (name, source, licence) and the shipped task data's NOTICE.md. A missing piece is
written as "not recorded", never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from chibichat.common import ChibiError, Home

# summary.json keys worth a row in the card's training table
TRAIN_KEYS = ("steps", "tokens", "train_time_s", "final_loss", "final_val_bpb", "min_val_bpb", "val_loss",
              "loss_on", "mode")


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def lineage(meta: dict) -> list[dict]:
    """This checkpoint's meta followed by its sources' metas (newest first), as far as they exist."""
    chain, seen = [meta], set()
    while True:
        src = (chain[-1].get("source") or {}).get("checkpoint")
        if not src or src in seen:
            return chain
        seen.add(src)
        m = _json(Path(src) / "meta.json")
        if not isinstance(m, dict):
            return chain
        m["checkpoint_dir"] = src
        chain.append(m)


def _stage_and_tag(m: dict) -> tuple[str, str]:
    d = Path(m["checkpoint_dir"])
    return m.get("stage") or d.parent.parent.name, d.parent.name


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return "not recorded" if v is None else str(v)


def _data_rows(chain: list[dict]) -> list[str]:
    from chibichat.data.corpora import get_corpus

    rows = []
    for m in reversed(chain):
        stage, tag = _stage_and_tag(m)
        summary = _json(Path(m["checkpoint_dir"]).parent / "summary.json") or {}
        if m.get("corpus"):
            try:
                c = get_corpus(m["corpus"])
                rows.append(f"| {stage} | corpus `{c.name}` ({c.lang}): {c.description} | {c.source} | {c.licence} |")
            except ChibiError:
                rows.append(f"| {stage} | corpus `{m['corpus']}` | not in this chibichat's registry | not recorded |")
        elif summary.get("mixture") or (m.get("flags") or {}).get("mix"):
            mix = summary.get("mixture") or m["flags"]["mix"]
            rows.append(f"| {stage} | tasks: {_fmt(mix)} | chibichat task registry | see the data notices below |")
        elif m.get("imported_from"):
            rows.append(f"| {stage} | imported from `{m['imported_from']}` | see that model's card | see that model's card |")
        else:
            rows.append(f"| {stage} | not recorded | | |")
    return rows


def _metric_rows(home: Home, chain: list[dict]) -> list[str]:
    rows = []
    for m in reversed(chain):
        stage, tag = _stage_and_tag(m)
        summary = _json(Path(m["checkpoint_dir"]).parent / "summary.json") or {}
        train = {k: summary[k] for k in TRAIN_KEYS if summary.get(k) is not None}
        if train:
            rows.append(f"| {stage}/{tag} | training | {_fmt(train)} |")
        evals = _json(home.eval_dir(stage, tag) / "summary.json")
        if isinstance(evals, dict):
            # The summary is shared by every evaluation of the tag, and its flat keys do not say which
            # evaluation wrote them: its figures are this checkpoint's only when every evaluation record
            # (`<name>_eval`) is of this step; one of another step (the tag trained since) hides them all.
            steps = {k: v.get("step") for k, v in evals.items() if k.endswith("_eval") and isinstance(v, dict)}
            if steps and all(s == m.get("step") for s in steps.values()):
                flat = {k: v for k, v in evals.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
                rows.append(f"| {stage}/{tag} | evaluation | {_fmt(flat)} |")
            else:
                held = ", ".join(f"{k} of step {_fmt(s)}" for k, s in steps.items()) or "no evaluation record"
                rows.append(f"| {stage}/{tag} | evaluation | not recorded for this step ({m.get('step')}); "
                            f"the home's summary holds {held} |")
    return rows


def model_card(home: Home, meta: dict, tok, model, repo_hint: str = "DIR") -> str:
    from importlib.resources import files

    cfg = model.config
    iberis = set(cfg.layers) != {"A"}
    chain = lineage(meta)
    stage, tag = _stage_and_tag(meta)
    trust = ", trust_remote_code=True" if iberis else ""
    kind = ("a hybrid of attention and SLC2 gated short convolutions (Saint Iberis layout), loaded through the "
            "remote code in `modeling_chibichat_iberis.py`") if iberis else "a transformers `NanoChat` model"
    metrics = _metric_rows(home, chain) or ["| | | no metrics recorded in this home |"]
    notice = (files("chibichat.tasks.assets") / "NOTICE.md").read_text(encoding="utf-8")
    lines = [
        "---",
        "library_name: transformers",
        "license: other",
        "license_name: training-data-terms",
        "pipeline_tag: text-generation",
        "tags: [chibichat, nanochat" + (", iberis" if iberis else "") + "]",
        "---",
        f"# chibichat {stage} model `{tag}`",
        "",
        f"Trained with chibichat and exported with `chibichat export hf`: {kind}.",
        "",
        "## Use",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{repo_hint}"{trust})',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_hint}"{trust})',
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True, '
        'return_tensors="pt", return_dict=True)',
        'out = model.generate(**ids, max_new_tokens=64)',
        "```",
        "The chat template renders exactly as chibichat's renderer: `<|bos|>`, then per exchange "
        "`<|user_start|>…<|user_end|><|assistant_start|>…<|assistant_end|>`; a system message is merged into "
        "the first user message after a blank line; assistant tool calls are parts "
        '`{"type": "python"|"python_output", "text": ...}`. Generation stops at `<|assistant_end|>` or `<|bos|>`.'
        + (" Batches of prompts of different lengths: pad on the left (`tok.padding_side = \"left\"`)." if iberis else ""),
        "",
        "## Model",
        "| | |",
        "|---|---|",
        f"| layers | {cfg.n_layer} (`{cfg.layers}`: A attention, S SLC2) |",
        f"| width / heads / kv heads | {cfg.n_embd} / {cfg.n_head} / {cfg.n_kv_head} |",
        f"| context | {cfg.seq_len} tokens |",
        f"| vocabulary | {tok.vocab_size} (byte-level BPE, `{tok.split}` split, 9 special tokens) |",
        f"| parameters | {model.num_params():,} |",
        f"| logit softcap / RoPE base | {cfg.softcap} / {cfg.rope_base} |",
        f"| checkpoint | {stage}/{tag} step {meta.get('step')} |",
        "",
        "## Training data",
        "The weights carry the terms of the data they were trained on (below); chibichat's code is MIT.",
        "",
        "| stage | data | source | licence |",
        "|---|---|---|---|",
        *_data_rows(chain),
        "",
        "## Metrics",
        "| run | kind | figures |",
        "|---|---|---|",
        *metrics,
        "",
        "## Data notices",
        "The shipped task data chibichat trains and evaluates on comes with these notices:",
        "",
        ("\n" + notice).replace("\n# ", "\n### ").lstrip("\n"),
    ]
    return "\n".join(lines).rstrip() + "\n"
