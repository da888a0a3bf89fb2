"""`chibichat import hf SOURCE`: a NanoChat-format model (local folder or hub repo) into the home.

The tokenizer goes to home/tokenizer/ (a home that already has a different tokenizer is refused:
its checkpoints would stop working) and the weights to home/checkpoints/<stage>/<tag>/step_000000/,
so `chat`, `serve`, `eval`, `sft` and `rl` use it like a model trained here.
"""

from __future__ import annotations

from chibichat.common import ChibiError, add_home_arg

STAGES = ("base", "mid", "sft", "rl")


def register(sub) -> None:
    p = sub.add_parser("import", help="import a model from another format (hf: NanoChat-format transformers)",
                       description="Import a model so that every chibichat stage can use it.")
    formats = p.add_subparsers(dest="format", metavar="<format>")
    hf = formats.add_parser(
        "hf", help="a NanoChat-format transformers folder or hub repo (e.g. karpathy/nanochat-d32)",
        description=(
            "Convert a NanoChat-format checkpoint (config.json with model_type nanochat, or a chibichat iberis "
            "export; tokenizer.json; safetensors weights) into a chibichat tokenizer + checkpoint. SOURCE is a "
            "local folder or, when online, a hub repo id. Needs the hf extra: pip install 'chibichat[hf]'."
        ),
    )
    hf.add_argument("source", metavar="SOURCE", help="local folder or hub repo id (owner/name)")
    add_home_arg(hf)
    hf.add_argument("--stage", default="sft", choices=STAGES,
                    help="stage to file the checkpoint under (default: sft, i.e. a chat model; base for a "
                         "pretrained-only model)")
    hf.add_argument("--tag", default=None, help="checkpoint tag (default: the folder/repo name)")
    hf.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to download")
    hf.add_argument("--overwrite", action="store_true", help="replace checkpoints already under --tag")
    hf.add_argument("--verify", action="store_true",
                    help="also load the source with transformers and compare logits (needs memory for two copies)")
    hf.set_defaults(func=run)
    p.set_defaults(func=_no_format)


def _no_format(args) -> int:
    raise ChibiError("choose an import format: `chibichat import hf SOURCE` (see --help)")


def run(args) -> int:
    from chibichat.common import Home, check_home
    from chibichat.export.hf_tokenizer import need
    from chibichat.export.importer import import_hf

    need("tokenizers")
    home = Home.resolve(args.home)
    check_home(home)
    sdir, notes = import_hf(args.source, home, args.stage, args.tag, overwrite=args.overwrite,
                            revision=args.revision)
    if notes.get("rms_norm_eps"):
        print(f"note: {notes['rms_norm_eps']}")
    if notes.get("vocab_padding_dropped"):
        print(f"note: dropped {notes['vocab_padding_dropped']} padding rows of the embedding and lm_head "
              "(no token id reaches them)")
    if args.verify:
        from chibichat.export.importer import compare_logits

        diff = compare_logits(args.source, sdir, revision=args.revision)
        print(f"verify: max |logit difference| vs transformers = {diff:.3g}")
        if diff > 1e-3:
            raise ChibiError(f"imported model differs from the transformers model by {diff:.3g} in logits; "
                             f"{sdir} is kept for inspection but should not be trusted")
    print(f"imported {args.source} -> {sdir}")
    print(f"try: chibichat chat --home {home.root} --from {args.stage} --tag {sdir.parent.name}")
    return 0
