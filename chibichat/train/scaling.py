"""The depth dial: `--depth` alone derives the model shape, learning rates, batch and horizon.

Every formula lives here once and is printed by `Plan.describe()` at the start of a run. Every
derived value can be overridden by the flag of the same name (None = derive).

Shape (nanochat OLD, head_dim rule ours):
    width     = 64 * depth
    head_dim  = 128 if width >= 1024 and width % 128 == 0 else 64
                (small models keep more, narrower heads; d4 -> 4 x 64, d20 -> 10 x 128)
    heads     = width / head_dim ;  kv_heads = heads (no GQA by default)
    seq_len   = min(2048, 256 * depth)      context grows with depth; d4 -> 1024, d8+ -> 2048
Learning rates (nanochat OLD, §6): s = (width / 768) ** -0.5
    matrix (Muon) 0.02 ; embedding 0.2 * s ; unembedding (head) 0.004 * s ; other (conv taps) 0.02 * s
Horizon (Chinchilla-style): N = scaling params = every trained weight except the embedding lookup
    table (block matrices + head + conv taps); tokens = ratio * N, ratio = 20;
    num_steps = max(1, round(tokens / total_batch)).
Batch ("Power Lines", nanochat HEAD §5, B_opt ∝ D^0.383), anchored at d12 = 2^19 tokens:
    N_ref     = 12 * 12 * 768^2 + V * 768    (a dense d12 with this vocabulary)
    B_target  = 2^round(log2(2^19 * (tokens / (ratio * N_ref)) ^ 0.383))
    capped at 2^14 tokens on CPU (a 2-core CPU step must stay seconds long) and 2^21 on GPU,
    then rounded to a whole number of micro-batches: unit = device_batch * seq_len * world_size.
    device_batch (rows per rank per micro-step) = max(1, 2^16 // seq_len) on CUDA, max(1, 2^14 // seq_len) elsewhere.
    grad_accum = total_batch / unit (exact; a total batch that is not a multiple is an error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from chibichat.common import ChibiError

REF_DEPTH = 12
REF_BATCH = 2 ** 19
POWER_LINES_EXPONENT = 0.383
CPU_BATCH_CAP = 2 ** 14
GPU_BATCH_CAP = 2 ** 21
MICRO_TOKENS = {"cuda": 2 ** 16, "other": 2 ** 14}


@dataclass
class Overrides:
    """Flag values; None means "derive it"."""
    width: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    seq_len: int | None = None
    total_batch: int | None = None
    device_batch: int | None = None
    matrix_lr: float | None = None
    embedding_lr: float | None = None
    unembedding_lr: float | None = None
    other_lr: float | None = None
    ratio: float | None = None
    num_steps: int | None = None


@dataclass
class Plan:
    depth: int
    width: int = 0
    heads: int = 0
    kv_heads: int = 0
    seq_len: int = 0
    matrix_lr: float = 0.0
    embedding_lr: float = 0.0
    unembedding_lr: float = 0.0
    other_lr: float = 0.0
    ratio: float = 0.0
    scaling_params: int = 0
    horizon_tokens: int = 0
    device_batch: int = 0
    total_batch: int = 0
    grad_accum: int = 0
    world_size: int = 1
    num_steps: int = 0
    lines: list = field(default_factory=list)  # (name, formula, value, overridden)

    def _note(self, name: str, formula: str, value, overridden: bool) -> None:
        self.lines.append((name, formula, value, overridden))

    def describe(self) -> str:
        out = [f"depth dial: --depth {self.depth} (each value below can be set by its flag)"]
        for name, formula, value, overridden in self.lines:
            v = f"{value:,}" if isinstance(value, int) else (f"{value:.6g}" if isinstance(value, float) else str(value))
            how = "set by --" + name.replace("_", "-") if overridden else formula
            out.append(f"  {name:<15} = {v:<14} [{how}]")
        return "\n".join(out)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "lines"}


def _positive(name: str, value) -> None:
    if value is not None and not value > 0:
        raise ChibiError(f"--{name.replace('_', '-')} must be positive, got {value}")


def derive_shape(depth: int, o: Overrides) -> Plan:
    """Width, heads, kv heads and context from the depth."""
    if not isinstance(depth, int) or depth < 1:
        raise ChibiError(f"--depth must be a positive integer, got {depth!r}")
    for name in ("width", "heads", "kv_heads", "seq_len"):
        _positive(name, getattr(o, name))
    p = Plan(depth=depth)
    p.width = o.width or 64 * depth
    p._note("width", "64 * depth", p.width, o.width is not None)
    if o.heads:
        p.heads = o.heads
        if p.width % p.heads:
            raise ChibiError(f"--width {p.width} is not divisible by --heads {p.heads}")
    else:
        head_dim = 128 if (p.width >= 1024 and p.width % 128 == 0) else 64
        if p.width % head_dim:
            raise ChibiError(f"width {p.width} is not a multiple of 64; pass --heads so that width/heads is an even "
                             f"integer, or a width that is a multiple of 64")
        p.heads = p.width // head_dim
    p._note("heads", "width / (128 if width >= 1024 and width % 128 == 0 else 64)", p.heads, o.heads is not None)
    p.kv_heads = o.kv_heads or p.heads
    if p.heads % p.kv_heads:
        raise ChibiError(f"--kv-heads {p.kv_heads} must divide heads {p.heads}")
    p._note("kv_heads", "heads", p.kv_heads, o.kv_heads is not None)
    p.seq_len = o.seq_len or min(2048, 256 * depth)
    p._note("seq_len", "min(2048, 256 * depth)", p.seq_len, o.seq_len is not None)
    return p


def reference_params(vocab_size: int) -> int:
    """Scaling params of the anchor model: a dense d12 (width 768; 12 E^2 per layer) with this vocab."""
    e = 64 * REF_DEPTH
    return REF_DEPTH * 12 * e * e + vocab_size * e


def derive_plan(p: Plan, o: Overrides, *, vocab_size: int, scaling_params: int, device_type: str,
                world_size: int) -> Plan:
    """LRs, batch, micro-batching and horizon for a shape `p` (from derive_shape) whose model has
    `scaling_params` non-embedding weights. Mutates and returns p."""
    for name in ("total_batch", "device_batch", "matrix_lr", "embedding_lr", "unembedding_lr", "other_lr",
                 "ratio", "num_steps"):
        _positive(name, getattr(o, name))
    s = (p.width / 768) ** -0.5
    for name, formula, base in (("matrix_lr", "0.02", 0.02), ("embedding_lr", "0.2 * (width/768)^-0.5", 0.2 * s),
                                ("unembedding_lr", "0.004 * (width/768)^-0.5", 0.004 * s),
                                ("other_lr", "0.02 * (width/768)^-0.5", 0.02 * s)):
        val = getattr(o, name) if getattr(o, name) is not None else base
        setattr(p, name, float(val))
        p._note(name, formula, float(val), getattr(o, name) is not None)

    p.ratio = float(o.ratio) if o.ratio is not None else 20.0
    p._note("ratio", "20 tokens per scaling param", p.ratio, o.ratio is not None)
    p.scaling_params = int(scaling_params)
    p._note("scaling_params", "all trained weights but the embedding table", p.scaling_params, False)
    p.horizon_tokens = int(round(p.ratio * p.scaling_params))
    p._note("horizon_tokens", "ratio * scaling_params", p.horizon_tokens, False)

    p.world_size = world_size
    micro = MICRO_TOKENS["cuda" if device_type == "cuda" else "other"]
    p.device_batch = o.device_batch or max(1, micro // p.seq_len)
    p._note("device_batch", f"max(1, {micro} // seq_len) rows per rank per micro-step", p.device_batch,
            o.device_batch is not None)
    unit = p.device_batch * p.seq_len * world_size
    if o.total_batch is not None:
        if o.total_batch % unit:
            raise ChibiError(f"--total-batch {o.total_batch} is not a multiple of device_batch {p.device_batch} x "
                             f"seq_len {p.seq_len} x world_size {world_size} = {unit} tokens; pick a multiple "
                             f"or change --device-batch")
        p.total_batch = o.total_batch
    else:
        d_ref = p.ratio * reference_params(vocab_size)
        target = 2 ** round(math.log2(REF_BATCH * (p.horizon_tokens / d_ref) ** POWER_LINES_EXPONENT))
        target = min(target, GPU_BATCH_CAP if device_type == "cuda" else CPU_BATCH_CAP)
        p.total_batch = max(1, round(target / unit)) * unit
    cap = "2^21 (GPU)" if device_type == "cuda" else "2^14 (CPU)"
    p._note("total_batch", f"2^round(log2(2^19 (D/D_ref)^0.383)), cap {cap}, whole micro-batches",
            p.total_batch, o.total_batch is not None)
    p.grad_accum = p.total_batch // unit
    p._note("grad_accum", "total_batch / (device_batch * seq_len * world_size)", p.grad_accum, False)
    p.num_steps = o.num_steps or max(1, round(p.horizon_tokens / p.total_batch))
    p._note("num_steps", "round(horizon_tokens / total_batch)", p.num_steps, o.num_steps is not None)
    return p


WINDOW_HELP = (
    "sliding-window attention: 0 = full causal attention everywhere; N = a window of N tokens on every "
    "attention layer but the last, which stays full (local layers + one global layer, nanochat style); "
    "N:PATTERN = PATTERN of S (window N) and L (full) tiled over the attention layers, the last layer "
    "still full, e.g. 128:SSSL. SLC2 layers are never windowed. Saved in the checkpoint's model config"
)


def window_schedule(spec, layers: str, seq_len: int) -> list[int]:
    """Per-layer windows (GPTConfig.windows) from a --window value and the expanded layer string.

    "0" (or None) -> all full. "N" -> N on every attention layer except the last. "N:PATTERN" -> the S/L
    pattern tiled over the attention layers (k-th attention layer gets PATTERN[k % len]); the final
    layer is always full, so the last mixer sees the whole context. A spec that windows no layer, or a
    window that could not bind (N >= seq_len), is an error rather than a silent no-op.
    """
    if spec is None or str(spec).strip() == "0":
        return [0] * len(layers)
    size_text, _, pattern = str(spec).strip().partition(":")
    try:
        size = int(size_text)
    except ValueError:
        raise ChibiError(f"--window {spec!r}: expected 0, N or N:PATTERN (e.g. 128 or 128:SSSL)") from None
    if not 1 <= size < seq_len:
        raise ChibiError(f"--window {size} must be in [1, seq_len={seq_len}): a window of the whole context is "
                         f"full attention; use --window 0 for that")
    pattern = (pattern or "S").upper()
    if set(pattern) - {"S", "L"}:
        raise ChibiError(f"--window pattern {pattern!r} may only use S (windowed) and L (full), e.g. {size}:SSSL")
    windows, k = [], 0
    for i, kind in enumerate(layers):
        if kind != "A":
            windows.append(0)
            continue
        short = pattern[k % len(pattern)] == "S" and i != len(layers) - 1
        windows.append(size if short else 0)
        k += 1
    if not any(windows):
        raise ChibiError(f"--window {spec} windows no layer of {layers!r}: the last layer is always full and "
                         f"SLC2 layers have no attention; use more attention layers or put S in the pattern")
    return windows


def add_shape_args(parser) -> None:
    g = parser.add_argument_group("model shape (derived from --depth unless given)")
    g.add_argument("--width", type=int, default=None, help="model width n_embd (default 64*depth)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (default width/64, or width/128 from width 1024)")
    g.add_argument("--kv-heads", type=int, default=None, help="key/value heads for GQA (default = heads)")
    g.add_argument("--seq-len", type=int, default=None, help="context length in tokens (default min(2048, 256*depth))")
    g.add_argument("--window", default="0", metavar="N[:PATTERN]", help=WINDOW_HELP)


def add_plan_args(parser) -> None:
    g = parser.add_argument_group("optimisation (derived from the model unless given)")
    g.add_argument("--total-batch", type=int, default=None,
                   help="tokens per optimizer step over all ranks (default: Power Lines rule, CPU cap 16384)")
    g.add_argument("--device-batch", type=device_batch_arg, default=None,
                   help="rows per rank per micro-step (default 65536/seq_len on CUDA, 16384/seq_len on CPU); auto = "
                        "the largest that fits the card's memory, probed with a forward+backward (train/batchprobe.py)")
    g.add_argument("--matrix-lr", type=float, default=None, help="Muon LR for block matrices (default 0.02)")
    g.add_argument("--embedding-lr", type=float, default=None, help="AdamW LR of the embedding (default 0.2*(width/768)^-0.5)")
    g.add_argument("--unembedding-lr", type=float, default=None, help="AdamW LR of the head (default 0.004*(width/768)^-0.5)")
    g.add_argument("--other-lr", type=float, default=None, help="AdamW LR of conv taps/scalars (default 0.02*(width/768)^-0.5)")
    g.add_argument("--ratio", type=float, default=None, help="training tokens per scaling parameter (default 20)")
    g.add_argument("--num-steps", type=int, default=None, help="optimizer steps (default: ratio*params/total_batch)")


def device_batch_arg(value: str):
    """--device-batch: a positive integer or "auto"."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {value!r}") from None


def overrides_from_args(args) -> Overrides:
    """Flag values as Overrides; --device-batch auto is None here (the caller probes it)."""
    o = Overrides(**{k: getattr(args, k, None) for k in Overrides.__dataclass_fields__})
    if o.device_batch == "auto":
        o.device_batch = None
    return o
