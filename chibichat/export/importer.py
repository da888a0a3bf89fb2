"""A NanoChat-format folder or hub repo -> a chibichat home (tokenizer + checkpoint).

After the import `chat`, `serve`, `eval` and further `sft`/`rl` find the model like any other
checkpoint: home/tokenizer/ holds the converted tokenizer, home/checkpoints/<stage>/<tag>/step_000000/
the weights (fp32) with a meta.json saying where they came from.

Only what chibichat runs identically is accepted (hf.gpt_config_from_hf lists the checks). Weights
are read from safetensors only (no pickle, so an untrusted repo cannot run code). A vocabulary padded
beyond the tokenizer (nanochat pads to a multiple of 64 for speed) loses its padding rows: no token
id can reach them, and the importer says how many it dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from chibichat.common import ChibiError, Home

HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "*.safetensors", "model.safetensors.index.json", "README.md")


def fetch(source: str, revision: str | None = None) -> tuple[Path, str]:
    """(local folder, provenance string). A local folder is used as is; otherwise `source` must be a hub
    repo id, downloaded (config, tokenizer, safetensors only) into the huggingface_hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), str(path.resolve())
    if path.exists():
        raise ChibiError(f"{source} is a file; give the folder that holds config.json, or a hub repo id")
    # A hub id is owner/name, neither part starting with "." or "-": "./out" or "../x/y" is a path.
    if not re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", source):
        raise ChibiError(f"{source!r} is neither a local folder nor a hub repo id (owner/name): no folder "
                         f"{path.absolute()} exists; check the path")
    from chibichat.export.hf_tokenizer import need

    hub = need("huggingface_hub")
    try:
        folder = hub.snapshot_download(repo_id=source, revision=revision, allow_patterns=list(HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo: all with the hub's own message
        # owner/name is also a relative path: say that no such folder exists, for a mistyped local path
        raise ChibiError(f"cannot download {source} from the hub: {e}. Check the repo id and that you are online "
                         "(or download it yourself and pass the folder; there is no local folder "
                         f"{path.absolute()})") from None
    return Path(folder), f"{hub.constants.ENDPOINT}/{source}" + (f" @ {revision}" if revision else "")


def read_weights(folder: Path) -> dict:
    """All tensors of model.safetensors or of the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise ChibiError(f"{index} is corrupt ({e})") from None
        files = [folder / n for n in shard_names]
    else:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {pickles}: pickle files are refused, they can run code)" if pickles else ""
        raise ChibiError(f"no model.safetensors in {folder}{hint}; convert the weights to safetensors first")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except FileNotFoundError:
            raise ChibiError(f"weight shard {f} is missing; the download is incomplete") from None
        except Exception as e:
            raise ChibiError(f"{f} is not a readable safetensors file ({e})") from None
    return state


def convert(folder: Path):
    """(GPT model in fp32, Tokenizer, notes dict) from a NanoChat-format folder."""
    import torch

    from chibichat.common import read_json
    from chibichat.export.hf import from_hf_state, gpt_config_from_hf, rms_eps
    from chibichat.export.hf_tokenizer import tokenizer_from_hf
    from chibichat.model.gpt import GPT

    config = read_json(folder / "config.json", "model config (config.json)")
    tok = tokenizer_from_hf(folder / "tokenizer.json")
    cfg = gpt_config_from_hf(config, tok.vocab_size, folder / "config.json")
    hf_state = read_weights(folder)
    notes = {"source_dtype": str(next(iter(hf_state.values())).dtype).replace("torch.", "")}
    eps = config.get("rms_norm_eps", 1e-6)
    if eps != rms_eps():
        notes["rms_norm_eps"] = f"source config has rms_norm_eps {eps}; chibichat normalises with float32 eps {rms_eps():.3g}"
    state = from_hf_state(hf_state, cfg.layers, folder)
    del hf_state  # a large model should not sit in memory three times
    rows = state["wte"].shape[0]
    if state["lm_head"].shape[0] != rows:
        raise ChibiError(f"{folder}: embedding has {rows} rows but lm_head {state['lm_head'].shape[0]}")
    if rows < tok.vocab_size:
        raise ChibiError(f"{folder}: the model has {rows} token rows but the tokenizer {tok.vocab_size} ids")
    if rows > tok.vocab_size:
        # Padding rows: no tokenizer id maps to them; dropping them keeps every real logit unchanged.
        notes["vocab_padding_dropped"] = rows - tok.vocab_size
        state["wte"] = state["wte"][: tok.vocab_size].clone()
        state["lm_head"] = state["lm_head"][: tok.vocab_size].clone()
    with torch.device("cpu"):
        model = GPT(cfg)
    own = model.state_dict()
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ChibiError(f"{folder}: tensor for {k} has shape {tuple(v.shape)}, config implies {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, tok, notes


def import_hf(source: str, home: Home, stage: str, tag: str | None, overwrite: bool = False,
              revision: str | None = None) -> tuple[Path, dict]:
    """Import `source` into `home` as checkpoint <stage>/<tag>/step_000000. Returns (step dir, notes)."""
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import list_steps, save_checkpoint

    folder, provenance = fetch(source, revision)
    tag = tag or re.sub(r"[^\w.-]+", "-", Path(source.rstrip("/")).name).strip("-") or "imported"
    tag_dir = home.checkpoints_dir(stage, tag)
    if list_steps(tag_dir) and not overwrite:
        raise ChibiError(f"{tag_dir} already holds checkpoints; choose another --tag or pass --overwrite")
    model, tok, notes = convert(folder)
    if (home.tokenizer_dir / "tokenizer.json").exists():
        current = Tokenizer.load(home.tokenizer_dir)
        if current.hash != tok.hash:
            raise ChibiError(
                f"{home.root} already has a different tokenizer ({current.hash[:12]}, vocab {current.vocab_size}; "
                f"the import needs {tok.hash[:12]}, vocab {tok.vocab_size}). Its checkpoints would stop working if it "
                "were replaced: import into a fresh home (--home DIR)"
            )
    else:
        tok.training = {"imported_from": provenance}
        tok.save(home.tokenizer_dir)
    meta = {"stage": stage, "model_config": model.config.to_dict(),
            "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size},
            "imported_from": provenance, "import": notes, "flags": {}}
    if overwrite and tag_dir.exists():
        from chibichat.common import at_destination, atomic_directory
        from chibichat.train.checkpoint import step_dir

        # The new tag directory is written beside the old one and replaces it only once complete: a failed
        # import leaves the old checkpoints as they were.
        tmp = None
        try:
            with atomic_directory(tag_dir) as tmp:
                save_checkpoint(tmp, 0, model, None, meta, report_kept=False)
        except ChibiError as e:
            raise ChibiError(f"the import into {tag_dir} failed and its old checkpoints were kept as they "
                             f"were: {at_destination(e, tmp, tag_dir)}") from None
        return step_dir(tag_dir, 0), notes
    sdir = save_checkpoint(tag_dir, 0, model, None, meta)
    return sdir, notes


def compare_logits(source: str, sdir: Path, revision: str | None = None, batch: int = 2, length: int = 32) -> float:
    """Max |logit difference| between transformers' model of `source` and the imported checkpoint `sdir`,
    on seeded random token ids, both in fp32."""
    import torch

    from chibichat.export.hf import IBERIS_TYPE
    from chibichat.export.hf_tokenizer import need
    from chibichat.train.checkpoint import build_model, load_weights, read_meta

    transformers = need("transformers")
    folder, _ = fetch(source, revision)
    meta = read_meta(sdir)
    ours = build_model(meta, sdir)
    load_weights(sdir, ours)
    ours.eval()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, trust_remote_code=config.get("model_type") == IBERIS_TYPE).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (batch, min(length, ours.config.seq_len)), generator=g)
    with torch.no_grad():
        a = ours(ids)
        b = theirs(ids).logits[..., : ours.config.vocab_size].float()
    return float((a - b).abs().max())
