"""`chibichat export hf`: a checkpoint as a Hugging Face transformers folder (optionally pushed to the hub).

All-attention models become the native `nanochat` model type; hybrid (SLC2) models carry a
self-contained modeling file for trust_remote_code=True. See chibichat/export/hf.py for the
convention table and docs/architecture.md "Export / import".
"""

from __future__ import annotations

from chibichat.common import CHECKPOINT_STAGES, ChibiError, add_home_arg



def register(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to another format (hf: Hugging Face transformers)",
                       description="Export a checkpoint so that other tools can load it.")
    formats = p.add_subparsers(dest="format", metavar="<format>")
    hf = formats.add_parser(
        "hf", help="Hugging Face transformers folder (NanoChat model type; remote code for hybrids)",
        description=(
            "Write model.safetensors, config.json, generation_config.json, tokenizer.json (+ config and chat "
            "template) and a model card to --out; for a LoRA adapter checkpoint the weights are merged and "
            "--out/adapter/ also holds a PEFT adapter for an export of its base. Loads with "
            "AutoModelForCausalLM / AutoTokenizer; hybrid "
            "(SLC2) models need trust_remote_code=True. Needs the hf extra: pip install 'chibichat[hf]'."
        ),
    )
    add_home_arg(hf)
    hf.add_argument("--from", dest="source", required=True, choices=CHECKPOINT_STAGES, help="checkpoint stage")
    hf.add_argument("--tag", default=None, help="checkpoint tag (default: the most recently written one)")
    hf.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    hf.add_argument("--out", required=True, help="output folder (created; see --overwrite)")
    hf.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    hf.add_argument("--push", metavar="REPO_ID", default=None,
                    help="also upload the folder to this hub repo (owner/name); needs a login or HF_TOKEN")
    hf.add_argument("--private", action="store_true", help="create the pushed repo as private")
    hf.set_defaults(func=run)
    p.set_defaults(func=_no_format)


def _no_format(args) -> int:
    raise ChibiError("choose an export format: `chibichat export hf --from sft --out DIR` (see --help)")


def check_out(out, home) -> None:
    """--out may not be the home, hold it or lie inside it: an export replaces --out whole (--overwrite), which
    would delete the home's tokenizer and checkpoints, the exported one included, or one of its folders."""
    o, h = out.resolve(), home.root.resolve()
    rel = "is" if o == h else "holds" if h.is_relative_to(o) else "is inside" if o.is_relative_to(h) else None
    if rel:
        raise ChibiError(f"--out {out} {rel} the artifact home {h}; the export folder replaces --out whole, so it must "
                         "not overlap the home's tokenizer and checkpoints: choose a folder outside the home")


def run(args) -> int:
    from pathlib import Path

    from chibichat.common import Home
    from chibichat.export.card import model_card
    from chibichat.export.hf import export_folder, push_folder
    from chibichat.export.hf_tokenizer import need
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import load_model

    need("tokenizers")
    if args.push:
        need("huggingface_hub")
    home = Home.resolve(args.home)
    check_out(Path(args.out).expanduser(), home)
    tok = Tokenizer.load(home.tokenizer_dir)
    model, meta = load_model(home, args.source, args.tag, args.step, rt=None, tokenizer=tok)
    card = model_card(home, meta, tok, model, repo_hint=args.push or str(Path(args.out)))
    out = export_folder(model, tok, Path(args.out).expanduser(), card, overwrite=args.overwrite)
    kind = "nanochat" if set(model.config.layers) == {"A"} else "chibichat_iberis (trust_remote_code=True)"
    print(f"exported {meta['checkpoint_dir']} -> {out} ({kind}, {model.num_params():,} parameters)")
    if "lora" in meta:  # an adapter checkpoint: the folder holds the merged model, adapter/ the PEFT adapter
        from chibichat.export.hf import peft_adapter, write_peft_folder
        from chibichat.train.checkpoint import ADAPTER_FILE, _read_tensors, lora_base_dir

        sdir = Path(meta["checkpoint_dir"])
        base = lora_base_dir(sdir, meta)
        tensors, config = peft_adapter(_read_tensors(sdir / ADAPTER_FILE, "the adapter weights file"), meta["lora"],
                                       model.config.layers, base_hint=str(base))
        write_peft_folder(tensors, config, out / "adapter")
        print(f"  + {out / 'adapter'}: PEFT LoRA adapter (rank {meta['lora']['rank']}) for an export of {base} "
              f"(`chibichat export hf` of that checkpoint; PeftModel.from_pretrained(base_model, adapter_dir))")
    if args.push:
        url = push_folder(out, args.push, private=args.private)
        print(f"pushed to {url}")
    return 0
