"""LoRA: low-rank adapters on the block projections, the base weights frozen.

A targeted weight W (out, in) of a block (attention q/k/v/o, MLP fc/proj, SLC2 x/b/alpha/A/o) is
replaced, everywhere the model reads it, by

    W' = W + (alpha / rank) * B @ A        A: (rank, in), B: (out, rank)

through torch's parametrizations: `module.w_q` returns W' while the frozen W lives on as
`parametrizations.w_q.original`. Nothing in the model's code changes, so training forward, the
forward with a decoding state, the decoding weight layouts and recompute all see the adapted weight
(the stages refuse --lora with --fp8) and the model's math stays in gpt.py / slc2.py. A starts like
PEFT's (Kaiming-uniform, a=sqrt(5)) and B at zero, so a fresh adapter leaves the model's outputs unchanged.

Dropout (`dropout` > 0): because the update is folded into the weight, a dropped unit is a whole rank
component (row k of A and column k of B, kept ones scaled by 1/(1-p)), drawn once per forward in
training mode with autograd on (a no-grad read, e.g. the Decoder's weight copy during RL, sees no
dropout). This is not PEFT's input dropout; at inference both are the identity.

Adapter tensors are named `<weight path>.lora_A` / `.lora_B` (e.g. `blocks.0.mixer.w_q.lora_A`), the
layout `adapter.safetensors` holds (chibichat/train/checkpoint.py). `merge_lora` folds the adapters into
plain weights (the same W' as adapters-on) and removes the parametrizations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from chibichat.common import ChibiError

TARGETS = ("attn", "mlp", "slc2")
ATTN_WEIGHTS = ("w_q", "w_k", "w_v", "w_o")
MLP_WEIGHTS = ("w_fc", "w_proj")
SLC2_WEIGHTS = ("w_x", "w_b", "w_alpha", "w_a", "w_o")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ChibiError(f"--lora rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ChibiError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ChibiError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ChibiError(f"--lora-targets {','.join(self.targets)!r}: each must be one of {','.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        try:
            return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                       targets=tuple(d["targets"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ChibiError(f"LoRA settings {d!r} are incomplete ({e}); the checkpoint's meta.json is corrupt") from None


class LoRADelta(nn.Module):
    """The parametrization W -> W + scale * B @ A (see the module docstring)."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, dropout: float):
        super().__init__()
        self.rank, self.scale, self.dropout = rank, scale, dropout
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, W):
        A = self.lora_A
        if self.training and self.dropout > 0 and torch.is_grad_enabled():  # never in a no-grad weight copy
            keep = (torch.rand(self.rank, 1, device=A.device) >= self.dropout).to(A.dtype) / (1.0 - self.dropout)
            A = A * keep
        return W + (self.scale * (self.lora_B @ A)).to(W.dtype)


def target_weights(model, targets) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, dotted path) of every weight the targets select, in model order."""
    out = []
    for i, block in enumerate(model.blocks):
        if block.kind == "A" and "attn" in targets:
            out += [(block.mixer, a, f"blocks.{i}.mixer.{a}") for a in ATTN_WEIGHTS]
        if block.kind == "S" and "slc2" in targets:
            out += [(block.mixer, a, f"blocks.{i}.mixer.{a}") for a in SLC2_WEIGHTS]
        if "mlp" in targets:
            out += [(block.mlp, a, f"blocks.{i}.mlp.{a}") for a in MLP_WEIGHTS]
    return out


def selected_kinds(targets, layers: str) -> list[str]:
    """The targets that select a weight in a model of these layer kinds ("AASA": A attention, S SLC2), in
    their order: what an adapter set is, whatever names were given for kinds the model lacks (a checkpoint
    of a dense model saved with "attn,mlp,slc2", the default before it became the kinds the model has)."""
    has = {"attn": "A" in layers, "slc2": "S" in layers, "mlp": True}
    return [t for t in targets if has.get(t, True)]


def has_lora(model) -> bool:
    return any(isinstance(m, LoRADelta) for m in model.modules())


def apply_lora(model, cfg: LoRAConfig) -> list[nn.Parameter]:
    """Freeze every parameter of `model`, attach adapters to the targeted weights, return the adapter
    parameters (the only trainable ones). ChibiError when the targets select nothing in this model, the
    rank exceeds the model's width or the model already has adapters."""
    if has_lora(model):
        raise ChibiError("this model already has LoRA adapters; merge them first (`chibichat lora merge`)")
    width = model.config.n_embd
    if cfg.rank > width:  # every targeted projection reads or writes the residual stream, of this width
        raise ChibiError(f"--lora {cfg.rank} is larger than the model's width ({width}): B @ A of a weight {width} "
                         f"wide has rank at most {width}, so such an adapter holds more parameters than the weight it "
                         f"adapts and learns nothing more; use a rank <= {width} (LoRA ranks are usually 4-64), or "
                         "fine-tune all weights without --lora")
    picked = target_weights(model, cfg.targets)
    if not picked:
        kinds = "".join(sorted(set(model.config.layers)))
        raise ChibiError(f"--lora-targets {','.join(cfg.targets)} selects no weight in this model (layers "
                         f"{kinds!r}: attn needs A layers, slc2 needs S layers); add mlp or the other kind")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for module, attr, _ in picked:
        W = getattr(module, attr)
        delta = LoRADelta(W.shape[0], W.shape[1], cfg.rank, cfg.scale, cfg.dropout).to(W.device)
        parametrize.register_parametrization(module, attr, delta, unsafe=True)
        params += [delta.lora_A, delta.lora_B]
    return params


def _deltas(model) -> list[tuple[str, LoRADelta]]:
    out = []
    for i, block in enumerate(model.blocks):
        for sub_name in ("mixer", "mlp"):
            sub = getattr(block, sub_name)
            plist = getattr(sub, "parametrizations", None)
            if plist is None:
                continue
            for attr, chain in plist.items():
                for p in chain:
                    if isinstance(p, LoRADelta):
                        out.append((f"blocks.{i}.{sub_name}.{attr}", p))
    return out


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for _, d in _deltas(model) for p in (d.lora_A, d.lora_B)]


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """{"<weight path>.lora_A": A, "<weight path>.lora_B": B} as fp32 CPU tensors."""
    out = {}
    for path, d in _deltas(model):
        out[f"{path}.lora_A"] = d.lora_A.detach().to("cpu", torch.float32).contiguous()
        out[f"{path}.lora_B"] = d.lora_B.detach().to("cpu", torch.float32).contiguous()
    return out


def load_adapter_state(model, state: dict, where) -> None:
    """Strict load of an adapter_state_dict into a model with the same adapters attached."""
    own = {}
    for path, d in _deltas(model):
        own[f"{path}.lora_A"], own[f"{path}.lora_B"] = d.lora_A, d.lora_B
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ChibiError(f"adapter {where} does not fit this model's adapters: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}; it was saved with other --lora-targets or another model")
    with torch.no_grad():
        for k, p in own.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise ChibiError(f"adapter {where}: {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)} "
                                 "(another rank or model)")
            p.copy_(state[k])


@torch.no_grad()
def merge_lora(model) -> int:
    """Fold every adapter into its weight (W' = W + scale * B @ A, computed exactly as in the forward),
    leave plain parameters, unfreeze them; returns how many weights were merged."""
    n = 0
    for block in model.blocks:
        for sub in (block.mixer, block.mlp):
            if not parametrize.is_parametrized(sub):
                continue
            for attr in list(sub.parametrizations.keys()):
                sub.parametrizations[attr].eval()  # no dropout in the merged weight
                parametrize.remove_parametrizations(sub, attr, leave_parametrized=True)
                n += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return n


def count_parameters(model) -> dict:
    """{"trainable", "frozen", "adapter"} parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen, "adapter": sum(p.numel() for p in lora_parameters(model))}
