"""chibichat checkpoints <-> Hugging Face folders: the NanoChat model type, or remote code for hybrids.

Conventions, checked against transformers' own NanoChat implementation (models/nanochat/):

| | chibichat GPT | transformers NanoChat | conversion |
|---|---|---|---|
| RoPE | half-split, rotation (x1 c + x2 s, x2 c - x1 s) | rotate_half = (x2, -x1): the same formula | none |
| RoPE base | GPTConfig.rope_base | rope_parameters.rope_theta | copied |
| QK norm | parameter-free RMSNorm after RoPE | RMSNorm after RoPE, no weight | none |
| RMSNorm eps | F.rms_norm default = float32 machine eps | rms_norm_eps | written as float32 eps; import accepts <= 1e-5 (noted) |
| norms | after embedding, pre-block, final; no gains | the same (extra norm before the layers) | none |
| MLP | relu(W1 x)^2, 4E hidden, no bias | fc1 -> relu2 -> fc2 | names only |
| logits | softcap 15 tanh(z/15) | final_logit_softcapping | copied |
| GQA | n_kv_head | num_key_value_heads | copied |
| vocab | exactly the tokenizer's | vocab_size (nanochat may pad) | export: none; import: padding rows dropped (reported) |
| sliding windows | per layer | not supported | export refused |

A model with SLC2 layers is not a NanoChat model: it is exported with `remote_iberis.py` (a
self-contained transformers modeling file) and loads with trust_remote_code=True.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from chibichat.common import ChibiError

WEIGHTS = "model.safetensors"
REMOTE_FILE = "modeling_chibichat_iberis.py"
IBERIS_TYPE = "chibichat_iberis"
# nanochat itself normalises with float32 machine eps (1.19e-7); transformers' NanoChat config defaults to
# 1e-6. Both are far below a normal activation's mean square, so any eps up to this is accepted on
# import (the difference is recorded in the checkpoint's meta) and larger ones are refused.
MAX_EPS = 1e-5


def rms_eps() -> float:
    """The eps F.rms_norm uses for float32 when none is given (what our model runs with)."""
    import torch

    return float(torch.finfo(torch.float32).eps)


# ----------------------------------------------------------------------------------------------
# Names: our parameter -> the HF parameter


def _layer_names(kind: str) -> dict[str, str]:
    """Parameter-name suffix map within one block: ours -> HF."""
    mlp = {"mlp.w_fc": "mlp.fc1.weight", "mlp.w_proj": "mlp.fc2.weight"}
    if kind == "A":
        return {"mixer.w_q": "self_attn.q_proj.weight", "mixer.w_k": "self_attn.k_proj.weight",
                "mixer.w_v": "self_attn.v_proj.weight", "mixer.w_o": "self_attn.o_proj.weight", **mlp}
    return {"mixer.w_x": "mixer.x_proj.weight", "mixer.w_b": "mixer.b_proj.weight",
            "mixer.w_alpha": "mixer.alpha_proj.weight", "mixer.w_a": "mixer.a_proj.weight",
            "mixer.conv": "mixer.conv.weight", "mixer.w_o": "mixer.o_proj.weight", **mlp}


def name_map(layers: str) -> dict[str, str]:
    """Every chibichat state-dict key -> its HF key, for a model with this layer layout."""
    out = {"wte": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}
    for i, kind in enumerate(layers):
        for ours, theirs in _layer_names(kind).items():
            out[f"blocks.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return out


def to_hf_state(state: dict, layers: str) -> dict:
    """Our state dict -> HF state dict (same tensors, contiguous fp32). Every key must map."""
    names = name_map(layers)
    if set(state) != set(names):
        raise ChibiError(f"checkpoint keys do not match a {layers!r} model: unexpected {sorted(set(state) - set(names))[:5]}, "
                         f"missing {sorted(set(names) - set(state))[:5]}")
    return {names[k]: v.float().contiguous() for k, v in state.items()}


def from_hf_state(hf_state: dict, layers: str, where) -> dict:
    """HF state dict -> our state dict; every tensor must be used and every parameter found."""
    back = {v: k for k, v in name_map(layers).items()}
    extra = sorted(set(hf_state) - set(back))
    missing = sorted(set(back) - set(hf_state))
    if extra or missing:
        raise ChibiError(f"{where}: weights do not match a {layers!r} NanoChat model: unexpected {extra[:5]}, "
                         f"missing {missing[:5]}. Biases, norm gains or extra modules have no chibichat equivalent")
    return {back[k]: v.float().contiguous() for k, v in hf_state.items()}


# ----------------------------------------------------------------------------------------------
# Configs


# GPTConfig fields whose meaning the exporter (and the remote code) reproduces. A field added to GPTConfig
# later changes the network in a way this file does not know, so exporting refuses until it is handled.
KNOWN_FIELDS = frozenset({"vocab_size", "seq_len", "n_layer", "n_embd", "n_head", "n_kv_head", "layers", "windows",
                          "conv_kernel", "softcap", "rope_base"})


def check_exportable(cfg) -> None:
    """Refuse what the HF side cannot run the same way."""
    unknown = sorted(set(cfg.to_dict()) - KNOWN_FIELDS)
    if unknown:
        raise ChibiError(f"model config fields {unknown} are unknown to the HF exporter, so transformers could not be "
                         "made to compute the same logits; teach chibichat/export/hf.py about them first")
    if any(cfg.windows):
        raise ChibiError(
            f"this model uses sliding-window attention (windows {cfg.windows}); the NanoChat model type and the "
            "exported remote code only do full causal attention, so the logits would differ. Export a model "
            "trained without --windows"
        )


def hf_config(cfg, tok) -> dict:
    """config.json for our GPTConfig: NanoChat for all-attention models, remote code for hybrids."""
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": rms_eps(),
        "final_logit_softcapping": float(cfg.softcap),
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.special_id("<|assistant_end|>"),
        "pad_token_id": tok.bos_id,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    if set(cfg.layers) == {"A"}:
        return {
            "architectures": ["NanoChatForCausalLM"],
            "model_type": "nanochat",
            **common,
            "hidden_act": "relu2",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
            "use_cache": True,
        }
    module = REMOTE_FILE[:-3]
    return {
        "architectures": ["ChibiIberisForCausalLM"],
        "model_type": IBERIS_TYPE,
        "auto_map": {"AutoConfig": f"{module}.ChibiIberisConfig",
                     "AutoModelForCausalLM": f"{module}.ChibiIberisForCausalLM"},
        **common,
        "mixer_pattern": cfg.layers,
        "conv_kernel": cfg.conv_kernel,
        "rope_theta": float(cfg.rope_base),
        "use_cache": True,
    }


def gpt_config_from_hf(config: dict, vocab_size: int, where):
    """Our GPTConfig from a NanoChat (or exported iberis) config.json, refusing what we cannot run."""
    from chibichat.model.gpt import GPTConfig

    mtype = config.get("model_type")
    if mtype not in ("nanochat", IBERIS_TYPE):
        raise ChibiError(f"{where}: model_type {mtype!r} is not 'nanochat' (or {IBERIS_TYPE!r}); chibichat imports "
                         "only NanoChat-format checkpoints")

    def get(key, default=None, kind=int):
        """config[key] (or default), which must be an int (kind=int) or any real number (kind=float)."""
        v = default if config.get(key) is None else config[key]
        if v is None:
            raise ChibiError(f"{where}: config.json lacks {key!r}")
        if isinstance(v, bool) or not isinstance(v, int if kind is int else (int, float)):
            raise ChibiError(f"{where}: config.json's {key!r} must be {'an integer' if kind is int else 'a number'}, "
                             f"got {v!r}")
        return v

    E, H = get("hidden_size"), get("num_attention_heads")
    problems = []
    if get("intermediate_size") != 4 * E:
        problems.append(f"intermediate_size {config['intermediate_size']} != 4 x hidden_size ({4 * E})")
    if mtype == "nanochat":
        if config.get("hidden_act", "relu2") != "relu2":
            problems.append(f"hidden_act {config['hidden_act']!r} is not relu2")
        if config.get("attention_bias"):
            problems.append("attention_bias is true (chibichat has no biases)")
        rope = config.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_type {rope.get('rope_type')!r} (only plain RoPE is supported)")
        theta = rope.get("rope_theta", config.get("rope_theta"))
        layers = "dense"
    else:
        theta, layers = config.get("rope_theta"), config.get("mixer_pattern")
        if not isinstance(layers, str):
            raise ChibiError(f"{where}: config.json's 'mixer_pattern' must be a string, got {layers!r}")
    if config.get("head_dim") not in (None, E // H):
        problems.append(f"head_dim {config['head_dim']} != hidden_size / heads ({E // H})")
    for key in ("sliding_window", "layer_types", "rope_scaling", "attn_logit_softcapping"):
        if config.get(key):
            problems.append(f"{key} = {config[key]!r} (chibichat runs full causal attention with plain RoPE)")
    if config.get("tie_word_embeddings"):
        problems.append("tied embeddings (chibichat's are untied)")
    if config.get("final_logit_softcapping") is None:
        problems.append("no final_logit_softcapping (chibichat always caps logits)")
    if theta is None:
        problems.append("no rope_theta")
    if problems:
        raise ChibiError(f"{where}: this model differs from the chibichat architecture: {'; '.join(problems)}")
    eps = config.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not 0 <= eps <= MAX_EPS:
        raise ChibiError(f"{where}: rms_norm_eps {eps!r} is not in [0, {MAX_EPS}]; chibichat's norms use float32 "
                         "machine eps and would give different numbers")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise ChibiError(f"{where}: config.json's rope_theta must be a number, got {theta!r}")
    return GPTConfig(
        vocab_size=vocab_size, seq_len=get("max_position_embeddings"), n_layer=get("num_hidden_layers"),
        n_embd=E, n_head=H, n_kv_head=get("num_key_value_heads", H), layers=layers,
        conv_kernel=get("conv_kernel", 3), softcap=float(get("final_logit_softcapping", kind=float)),
        rope_base=float(theta),
    )


def generation_config(tok) -> dict:
    """Defaults of `chibichat chat` (temperature 0.6, top-k 50); stops where our engine stops."""
    return {
        "bos_token_id": tok.bos_id,
        "eos_token_id": [tok.special_id("<|assistant_end|>"), tok.bos_id],
        "pad_token_id": tok.bos_id,
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 50,
    }


# ----------------------------------------------------------------------------------------------
# Export


def export_folder(model, tok, out: Path, card: str, overwrite: bool = False) -> Path:
    """Write the HF folder for `model` (a chibichat GPT, weights as trained) to `out`, atomically."""
    from importlib.resources import files

    from safetensors.torch import save_file

    from chibichat.common import atomic_directory, plain_file_mode
    from chibichat.export.hf_tokenizer import tokenizer_files

    cfg = model.config
    check_exportable(cfg)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ChibiError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ChibiError(f"{out} exists and is not a directory; choose another --out")
    iberis = set(cfg.layers) != {"A"}
    tensors = to_hf_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg.layers)
    files_text = tokenizer_files(tok, cfg.seq_len)  # checks the HF tokenizer before anything is written
    files_text["config.json"] = json.dumps(hf_config(cfg, tok), indent=2) + "\n"
    files_text["generation_config.json"] = json.dumps(generation_config(tok), indent=2) + "\n"
    files_text["README.md"] = card
    if iberis:
        files_text[REMOTE_FILE] = (files("chibichat.export") / "remote_iberis.py").read_text(encoding="utf-8")
    with atomic_directory(out) as tmp:
        # straight to the file (no second in-memory copy of a large model); "pt" is what transformers expects
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for name, text in files_text.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for f in tmp.iterdir():  # durable before the rename makes the folder visible
            with open(f, "rb") as fh:
                os.fchmod(fh.fileno(), plain_file_mode())  # safetensors' save_file creates 0600
                os.fsync(fh.fileno())
    return out


PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def peft_adapter(adapter: dict, lora: dict, layers: str, base_hint: str) -> tuple[dict, dict]:
    """(tensors, adapter_config) of a PEFT LoRA folder for chibichat adapter tensors
    (`blocks.i.<sub>.<w>.lora_A/B`, chibichat/model/lora.py). Module names are the HF ones of name_map;
    PEFT's update is (lora_alpha / r) B @ A on the module's input, the same as ours. target_modules lists
    the full module paths, so an attention `o_proj` is never confused with an SLC2 `o_proj`."""
    names = name_map(layers)
    tensors, modules = {}, set()
    for key, t in adapter.items():
        ours, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B") or ours not in names:
            raise ChibiError(f"adapter tensor {key!r} does not belong to a {layers!r} model's projections")
        module = names[ours][: -len(".weight")]
        modules.add(module)
        tensors[f"base_model.model.{module}.{part}.weight"] = t.float().contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora["rank"]), "lora_alpha": float(lora["alpha"]),
        # ours drops whole rank components in training; inference (all PEFT does with this folder) has none
        "lora_dropout": 0.0, "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "base_model_name_or_path": base_hint,
    }
    return tensors, config


def write_peft_folder(tensors: dict, config: dict, out: Path) -> Path:
    """adapter_model.safetensors + adapter_config.json in `out`, atomically."""
    from safetensors.torch import save_file

    from chibichat.common import atomic_directory, plain_file_mode

    with atomic_directory(Path(out)) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fchmod(fh.fileno(), plain_file_mode())  # safetensors' save_file creates 0600
                os.fsync(fh.fileno())
    return Path(out)


def push_folder(folder: Path, repo_id: str, private: bool = False, token: str | None = None,
                endpoint: str | None = None) -> str:
    """Upload an export folder to the hub with huggingface_hub (create the repo if needed, one commit with
    every file). Token: `token`, else the login / HF_TOKEN; endpoint: `endpoint`, else HF_ENDPOINT / the
    public hub. Returns the repo URL."""
    from chibichat.export.hf_tokenizer import need

    hub = need("huggingface_hub")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ChibiError(f"--push {repo_id!r} is not a hub repo id of the form owner/name")
    api = hub.HfApi(token=token, endpoint=endpoint)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload chibichat export")
    except Exception as e:  # network, auth and hub errors all come here with their own message
        raise ChibiError(f"uploading {folder} to {repo_id} failed: {e}. The folder is complete; retry with "
                         "`huggingface-cli upload` or `chibichat export hf ... --push` once online and logged in "
                         "(`hf auth login` or HF_TOKEN)") from None
    return str(url)
