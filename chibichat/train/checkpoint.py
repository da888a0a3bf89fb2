"""Checkpoints: safetensors weights + JSON metadata, written whole or not at all.

Layout (Home.checkpoints_dir(stage, tag) = home/checkpoints/<stage>/<tag>/):

    step_000500/
        model.safetensors        fp32 weights, keys without `_orig_mod.` / `module.` prefixes
        meta.json                {"format", "step", "world_size", "model_config", "tokenizer": {hash, vocab_size},
                                  ... whatever the caller adds: loader states, loop state, RNG, flags}
        optim_rank0.safetensors  optimizer tensors (Muon momentum, Adam moments), keys "<param idx>.<name>"
        optim_rank0.json         the optimizer's param_groups and non-tensor state (e.g. Adam step count)

A LoRA run (a model with adapters attached, chibichat/model/lora.py) writes `adapter.safetensors` (the
adapters alone, `<weight path>.lora_A/.lora_B`) instead of model.safetensors, and meta.json's "lora"
holds {rank, alpha, dropout, targets, base, base_sha256}: `base` is the step directory of the checkpoint the
adapters sit on, relative to home/checkpoints/ (absolute if outside it), `base_sha256` the SHA-256 of that
base's weights file (`weights_sha256`), so a base trained again in the same place is caught on load (an
adapter saved before the fingerprint was recorded loads without that check). Loading it loads the base (recursively:
a base may itself be an adapter), attaches the adapters, and merges them, so every reader gets a plain
model; a resuming run whose model already carries the adapters loads only them.

MuonAdamW keeps an identical replica of its state on every rank (gradients are all-reduced before
the update), so only rank 0's optimizer state is written, and every rank loads it on resume.
The `_rank0` suffix keeps room for a sharded optimizer later.

Atomicity: rank 0 builds the directory under a temporary name and renames it into place
(common.atomic_directory, with the directory and the rename fsynced), so a crash leaves either the whole
`step_XXXXXX/` or nothing; readers ignore `.tmp-*`. A save over an existing step of the same number keeps
the old one until the new one is in place (a crash between the two renames leaves it as `.aside-step_*`,
which resolve_checkpoint renames back). An old step is renamed to `.old-step_*` before it is
deleted (common.remove_dir), so a crash while deleting never leaves a step directory with part of its
files. Other ranks only contribute through collectives (gather of their loader/RNG state), which the
caller does before calling `save_checkpoint`.

No pickle anywhere: a checkpoint from an untrusted source cannot run code on load.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from chibichat.common import (ChibiError, Home, Runtime, atomic_directory, read_json, recover_asides,
                              remove_dir)

FORMAT = "chibichat-checkpoint-1"
ADAPTER_FILE = "adapter.safetensors"
STEP_RE = re.compile(r"^step_(\d{6,})$")
STAGE_COMMANDS = {"base": "chibichat pretrain", "mid": "chibichat midtrain", "sft": "chibichat sft",
                  "rl": "chibichat rl", "dpo": "chibichat dpo"}
# Wrappers that prefix parameter names: torch.compile and DDP.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def step_dir(tag_dir: str | os.PathLike, step: int) -> Path:
    return Path(tag_dir) / f"step_{step:06d}"


def list_steps(tag_dir: str | os.PathLike) -> list[int]:
    """Complete saved steps under a tag directory, ascending. Temporary/partial dirs are skipped:
    a step directory only exists after its atomic rename, and must hold meta.json."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return []
    steps = []
    for d in tag_dir.iterdir():
        m = STEP_RE.match(d.name)
        if m and (d / "meta.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def unwrap(model):
    """The plain nn.Module behind torch.compile / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def strip_prefixes(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# Saving


def _model_tensors(model) -> dict:
    import torch

    state = strip_prefixes(unwrap(model).state_dict())
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _optimizer_payload(optimizer) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (safetensors) and everything else (JSON)."""
    import torch

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalar_state": scalars}


def save_checkpoint(tag_dir: str | os.PathLike, step: int, model, optimizer, meta: dict,
                    rt: Runtime | None = None, keep_last: int = 0, report_kept: bool = True) -> Path:
    """Write step_XXXXXX/ under tag_dir (rank 0 only; other ranks return the path untouched).

    `meta` is the caller's JSON-serialisable metadata (model_config, tokenizer, loader, loop, flags);
    `format`, `step` and `world_size` are added here. `keep_last` > 0 deletes all but the newest N
    steps after a successful save. A failed save's error says which checkpoints survive in tag_dir;
    report_kept=False leaves that out, for a tag_dir that is the caller's new temporary directory
    (common.atomic_directory), where none does: the caller says what survives at its destination.
    Returns the step directory.
    """
    import json

    from safetensors.torch import save as st_save

    final = step_dir(tag_dir, step)
    if rt is not None and not rt.is_master:
        return final
    full_meta = {"format": FORMAT, "step": int(step), "world_size": rt.world_size if rt else 1, **meta}
    meta_text = json.dumps(full_meta, indent=2, ensure_ascii=False) + "\n"  # fails early if not JSON-able
    from chibichat.model.lora import adapter_state_dict, has_lora

    lora = has_lora(unwrap(model))
    if lora and not isinstance(meta.get("lora"), dict):
        raise ValueError("a model with LoRA adapters is saved with meta['lora'] = {rank, alpha, dropout, targets, base}")
    try:
        with atomic_directory(final) as tmp:
            if lora:
                (tmp / ADAPTER_FILE).write_bytes(st_save(adapter_state_dict(unwrap(model)), metadata={"format": FORMAT}))
            else:
                (tmp / "model.safetensors").write_bytes(st_save(_model_tensors(model), metadata={"format": FORMAT}))
            if optimizer is not None:
                tensors, rest = _optimizer_payload(optimizer)
                (tmp / "optim_rank0.safetensors").write_bytes(st_save(tensors, metadata={"format": FORMAT}))
                (tmp / "optim_rank0.json").write_text(json.dumps(rest, indent=1) + "\n", encoding="utf-8")
            # meta.json last: list_steps() treats a directory without it as incomplete.
            (tmp / "meta.json").write_text(meta_text, encoding="utf-8")
            for f in tmp.iterdir():  # durable before the rename makes it visible
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except ChibiError as e:  # atomic_directory's write error (full disk, read-only): say what survives
        if not report_kept:
            raise ChibiError(f"saving step {step} failed, nothing of it was kept: {e}") from None
        # Read back from disk: an earlier save of this same step survives too (atomic_directory puts it back).
        left = [str(step_dir(tag_dir, s)) for s in list_steps(tag_dir)]
        # Only a training loop's checkpoint (it holds the optimizer) is one --resume continues from; a merged,
        # averaged or imported model is made again by running its command again.
        if left:
            kept = f"The checkpoints saved before are intact: {', '.join(left)}" + (
                f"; --resume continues from {left[-1]}" if optimizer is not None else "")
        else:
            kept = f"No checkpoint survives in {tag_dir}" + (
                ": there is nothing to resume from" if optimizer is not None else "")
        raise ChibiError(f"saving step {step} failed, nothing of it was kept: {e}. {kept}") from None
    if keep_last > 0:
        for old in list_steps(tag_dir)[:-keep_last]:
            try:
                remove_dir(step_dir(tag_dir, old))
            except ChibiError as e:
                raise ChibiError(f"step {step} was saved to {final}, but deleting the older "
                                 f"step {old} (keep_last {keep_last}) failed: {e}") from None
    return final


# ----------------------------------------------------------------------------------------------
# Loading


def read_meta(sdir: str | os.PathLike) -> dict:
    sdir = Path(sdir)
    meta = read_json(sdir / "meta.json", "checkpoint metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ChibiError(f"{sdir / 'meta.json'} is not a {FORMAT} checkpoint; it was not written by this chibichat")
    return meta


def _read_tensors(path: Path, what: str) -> dict:
    from safetensors.torch import load as st_load

    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        raise ChibiError(f"{what} is missing: {path}. The checkpoint is incomplete; delete {path.parent} "
                         f"and use an earlier step") from None
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ChibiError(f"{what} is corrupt ({path}): {e}. Delete {path.parent} and use an earlier step") from None


def lora_base_dir(sdir: Path, meta: dict) -> Path:
    """The step directory an adapter checkpoint sits on (meta["lora"]["base"], see the module docstring)."""
    base = (meta.get("lora") or {}).get("base")
    if not isinstance(base, str) or not base:
        raise ChibiError(f"adapter checkpoint {sdir} names no base checkpoint in meta.json; it is corrupt")
    path = Path(base) if Path(base).is_absolute() else Path(sdir).parents[2] / base
    if not (path / "meta.json").is_file():
        raise ChibiError(f"the adapter in {sdir} sits on {path}, which is missing; restore that checkpoint "
                         "(an adapter is applied on top of its base)")
    return path


def weights_file(sdir: str | os.PathLike) -> Path:
    """The file that holds a checkpoint's weights: adapter.safetensors for an adapter, else model.safetensors."""
    sdir = Path(sdir)
    return sdir / ADAPTER_FILE if (sdir / ADAPTER_FILE).is_file() else sdir / "model.safetensors"


def weights_sha256(sdir: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's weights file (`weights_file`), the fingerprint an adapter records of its base.
    An adapter base's own base is fingerprinted in that adapter's meta, so the chain is covered link by link."""
    from chibichat.common import sha256_file

    path = weights_file(sdir)
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise ChibiError(f"checkpoint weights missing: {path}. The checkpoint is incomplete; delete {path.parent} "
                         "and use an earlier step") from None


def check_lora_base(sdir: Path, meta: dict, base: Path) -> None:
    """Refuse an adapter whose base step directory now holds another model than the one it was trained on
    (another architecture or tokenizer, e.g. the base's tag trained again with --overwrite): its weights would
    load without complaint when only a setting such as rope_base or the tokenizer differs, and the adapter would
    run on a base it was never fitted to, under the adapter's settings instead of the base's own. With the same
    settings, the base's weights file must still have the SHA-256 recorded when the adapter was saved
    (meta["lora"]["base_sha256"]; an adapter saved before it was recorded is not checked for this)."""
    from chibichat.model.gpt import GPTConfig

    base_meta = read_meta(base)
    for where, m in ((sdir, meta), (base, base_meta)):
        if not isinstance(m.get("model_config"), dict):
            raise ChibiError(f"checkpoint {where} has no model_config in meta.json; it is corrupt")
    problems = []
    mine, theirs = (GPTConfig.from_dict(m["model_config"]).to_dict() for m in (meta, base_meta))
    problems += [f"{k} {mine[k]!r} -> {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
    tok_a, tok_b = (m.get("tokenizer") or {} for m in (meta, base_meta))
    if (tok_a.get("hash"), tok_a.get("vocab_size")) != (tok_b.get("hash"), tok_b.get("vocab_size")):
        problems.append(f"tokenizer {str(tok_a.get('hash'))[:12]} (vocab {tok_a.get('vocab_size')}) -> "
                        f"{str(tok_b.get('hash'))[:12]} (vocab {tok_b.get('vocab_size')})")
    saved = (meta.get("lora") or {}).get("base_sha256")
    if not problems and saved is not None:
        now = weights_sha256(base)
        if now != saved:
            problems.append(f"{weights_file(base).name} sha256 {str(saved)[:12]} -> {now[:12]}: the same settings, "
                            "other weights")
    if problems:
        raise ChibiError(f"the adapter in {sdir} was trained on {base}, which now holds another model "
                         f"({'; '.join(problems)}): that base was replaced after the adapter was trained. Restore "
                         "the checkpoint the adapter was trained on, or train the adapter again on this one")


def relative_to_checkpoints(step_dir_path) -> str:
    """A step directory as stored in meta["lora"]["base"]: relative to home/checkpoints/ when inside it."""
    p = Path(step_dir_path).resolve()
    root = p.parents[2]
    return str(p.relative_to(root)) if root.name == "checkpoints" else str(p)


def load_weights(sdir: str | os.PathLike, model) -> None:
    """Load model.safetensors into `model` (strict: every key present, every shape equal). For an adapter
    checkpoint: the adapters alone into a model that carries them, else base + adapters, merged."""
    import torch

    from chibichat.model.lora import LoRAConfig, apply_lora, has_lora, load_adapter_state, merge_lora

    sdir = Path(sdir)
    target = unwrap(model)
    if (sdir / ADAPTER_FILE).is_file():
        meta = read_meta(sdir)
        if not has_lora(target):
            base = lora_base_dir(sdir, meta)
            check_lora_base(sdir, meta, base)
            load_weights(base, target)
            apply_lora(target, LoRAConfig.from_dict(meta["lora"]))
            load_adapter_state(target, _read_tensors(sdir / ADAPTER_FILE, "the adapter weights file"), sdir)
            merge_lora(target)
        else:
            load_adapter_state(target, _read_tensors(sdir / ADAPTER_FILE, "the adapter weights file"), sdir)
        return
    if has_lora(target):
        raise ChibiError(f"checkpoint {sdir} holds full weights, not adapters, but this run trains LoRA adapters "
                         "(--lora); resume it without --lora, or start a new --tag")
    state = strip_prefixes(_read_tensors(sdir / "model.safetensors", "the checkpoint weights file"))
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ChibiError(f"checkpoint {sdir} does not fit this model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}. It was saved for a different model config")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ChibiError(f"checkpoint {sdir}: tensor {k} has shape {tuple(v.shape)} but the model expects "
                             f"{tuple(own[k].shape)}; it was saved for a different model config")
    with torch.no_grad():
        target.load_state_dict(state, strict=True)


def load_optimizer(sdir: str | os.PathLike, optimizer) -> None:
    import json

    sdir = Path(sdir)
    tensors = _read_tensors(sdir / "optim_rank0.safetensors", "the optimizer state file")
    rest_path = sdir / "optim_rank0.json"
    try:
        rest = json.loads(rest_path.read_text(encoding="utf-8"))
        groups, scalars = rest["param_groups"], rest["scalar_state"]
    except FileNotFoundError:
        raise ChibiError(f"optimizer state missing: {rest_path}; delete {sdir} and use an earlier step") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ChibiError(f"optimizer state is corrupt ({rest_path}): {e}; delete {sdir} and use an earlier step") from None
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, d in scalars.items():
        state.setdefault(int(idx), {}).update(d)
    mine = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in mine]:
        raise ChibiError(f"optimizer state in {sdir} has groups of sizes {[len(g['params']) for g in groups]}, "
                         f"this model's optimizer {[len(g['params']) for g in mine]}: different model config")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise ChibiError(f"optimizer state in {sdir} does not fit this optimizer: {e}") from None


def average_weights(sdirs: list[Path]) -> dict:
    """The element-wise mean of the full weights of several checkpoints (a uniform "model soup", Wortsman et
    al. 2022, arXiv:2203.05482), summed in float64 and returned in float32. Every checkpoint must hold full
    weights (not LoRA adapters) of the same tensors with the same shapes; ChibiError naming the first that
    does not."""
    import torch

    if len(sdirs) < 2:
        raise ChibiError(f"averaging weights needs at least 2 checkpoints, got {len(sdirs)}")
    total, first = None, None
    for sdir in sdirs:
        if (Path(sdir) / ADAPTER_FILE).exists():
            raise ChibiError(f"{sdir} holds LoRA adapters, not full weights; averaging needs full weights")
        state = strip_prefixes(_read_tensors(Path(sdir) / "model.safetensors", "the checkpoint weights file"))
        if total is None:
            total, first = {k: v.double() for k, v in state.items()}, sdir
            continue
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != {k: tuple(v.shape) for k, v in total.items()}:
            raise ChibiError(f"{sdir} and {first} hold different tensors or shapes: only checkpoints of one "
                             "architecture can be averaged")
        for k, v in state.items():
            total[k] += v.double()
    return {k: (v / len(sdirs)).float() for k, v in total.items()}


def check_tokenizer(meta: dict, tokenizer, where) -> None:
    """Refuse a tokenizer other than the one the checkpoint was trained with."""
    saved = meta.get("tokenizer") or {}
    if saved.get("vocab_size") != tokenizer.vocab_size or saved.get("hash") != tokenizer.hash:
        short = str(saved.get("hash"))[:12]
        raise ChibiError(
            f"checkpoint {where} was trained with tokenizer {short} (vocab "
            f"{saved.get('vocab_size')}), but the loaded tokenizer is {tokenizer.hash[:12]} (vocab "
            f"{tokenizer.vocab_size}). Token ids would mean different things: use the tokenizer it was "
            f"trained with (restore home/tokenizer/; one replaced by `chibichat tokenizer train --overwrite` "
            f"was kept as home/{TOKENIZER_BACKUP_PREFIX}{short}/), or train a new model with this tokenizer"
        )


# `tokenizer train --overwrite` moves a tokenizer that checkpoints depend on to home/<prefix><hash[:12]>/.
TOKENIZER_BACKUP_PREFIX = "tokenizer.bak-"


def checkpoints_using_tokenizer(home: Home, tokenizer_hash: str) -> list[Path]:
    """Every complete step directory under home/checkpoints/ whose meta.json records this tokenizer
    hash (unreadable metadata counts as not depending on it: such a checkpoint cannot be loaded)."""
    import json

    root = home.root / "checkpoints"
    out = []
    if not root.is_dir():
        return out
    for stage in sorted(d for d in root.iterdir() if d.is_dir()):
        for tag in sorted(d for d in stage.iterdir() if d.is_dir()):
            for s in list_steps(tag):
                try:
                    meta = json.loads((step_dir(tag, s) / "meta.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(meta, dict) and (meta.get("tokenizer") or {}).get("hash") == tokenizer_hash:
                    out.append(step_dir(tag, s))
    return out


def resolve_checkpoint(home: Home, stage: str, tag: str | None = None, step: int | None = None) -> Path:
    """The step directory for (stage, tag, step). tag None -> the tag with the most recently
    written checkpoint; step None -> its newest step. A tag or step directory that a crash left aside
    mid-replacement (common.atomic_directory) is renamed back first; hidden directories (`.tmp-*`, `.old-*`)
    are never tags."""
    stage_dir = home.root / "checkpoints" / stage
    make = STAGE_COMMANDS.get(stage, f"the {stage} stage")
    recover_asides(stage_dir)
    if tag is None:
        tags = [d for d in stage_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and list_steps(d)] \
            if stage_dir.is_dir() else []
        if not tags:
            raise ChibiError(f"no {stage} checkpoint under {stage_dir}; create one with `{make}`")
        newest = max(tags, key=lambda d: (step_dir(d, list_steps(d)[-1]) / "meta.json").stat().st_mtime)
        tag = newest.name
    tag_dir = stage_dir / tag
    recover_asides(tag_dir)
    steps = list_steps(tag_dir)
    if not steps and tag_dir.is_dir():
        broken = sorted(d.name for d in tag_dir.iterdir() if STEP_RE.match(d.name) and d.is_dir())
        if broken:
            raise ChibiError(f"{tag_dir} holds {', '.join(broken)} but no complete checkpoint: a step directory "
                             f"without meta.json is an incomplete save. Delete {tag_dir} and train it again")
    if not steps:
        others = sorted(d.name for d in stage_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                        and list_steps(d)) if stage_dir.is_dir() else []
        hint = f" (tags that exist: {', '.join(others)})" if others else f"; create one with `{make}`"
        raise ChibiError(f"no {stage} checkpoint with tag {tag!r} under {stage_dir}{hint}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ChibiError(f"{stage}/{tag} has no step {step}; saved steps: {steps}")
    return step_dir(tag_dir, step)


def build_model(meta: dict, where, run=None):
    from chibichat.model.gpt import GPT, GPTConfig

    cfg = meta.get("model_config")
    if not isinstance(cfg, dict):
        raise ChibiError(f"checkpoint {where} has no model_config in meta.json; it is corrupt")
    return GPT(GPTConfig.from_dict(cfg), run)


def load_model(home: Home, stage: str, tag: str | None = None, step: int | None = None,
               rt: Runtime | None = None, tokenizer=None, run=None):
    """(model, meta) for a saved checkpoint, on rt.device, in eval mode.

    Every later stage uses this (`--from base|mid|sft|rl`). `run` (gpt.RunConfig) says how the model
    computes; by default in rt.compute_dtype (fp32 without rt). It is never read from the checkpoint:
    meta.json's model_config is the architecture only. With `tokenizer` given, a checkpoint trained
    with another tokenizer is refused before any weights are read.
    """
    from chibichat.model.gpt import RunConfig

    sdir = resolve_checkpoint(home, stage, tag, step)
    meta = read_meta(sdir)
    if tokenizer is not None:
        check_tokenizer(meta, tokenizer, sdir)
    if run is None:
        run = RunConfig() if rt is None else RunConfig(compute_dtype=rt.compute_dtype)
    model = build_model(meta, sdir, run)
    load_weights(sdir, model)
    if rt is not None:
        model.to(rt.device)
    model.eval()
    meta["checkpoint_dir"] = str(sdir)
    return model, meta
