"""MuonAdamW: one optimizer for the whole model, on one device and across ranks.

Muon (momentum orthogonalised by a Newton-Schulz iteration) updates the 2-D block matrices; AdamW
updates everything else (embeddings, the head, conv taps, scalars). Each parameter group says which
rule it uses with `kind="muon"` or `kind="adamw"`.

Distributed: there is no DDP wrapper and no second "distributed" copy of this class. When
torch.distributed is initialised with world_size > 1, the optimizer all-reduces the gradients itself,
in buckets launched from gradient hooks during backward (overlapping communication with compute;
`no_sync()` for all but the last micro-step), and `step()` waits for them before every rank applies
the same update to its replica. Muon's Newton-Schulz, the optimizer's one expensive part, is sharded:
each rank orthogonalises its slice of every stack of same-shaped matrices and the results are
all-gathered (`orthogonalize_sharded`; on one rank the same code runs with a single slice). The
training loop scales each rank's loss by the *global* token count of the step, so the reduction is a
SUM by default (`grad_reduce="sum"`); a caller whose per-rank losses are already means can ask for
"mean". Because the state is identical on every rank, one saved state resumes any world size.

Gradient clipping (off by default, as in nanochat) happens after the reduction, on the global
gradient, never on a rank's local piece.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
import torch.distributed as dist

from chibichat.common import ChibiError

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon): chosen to push every singular value of
# the normalised matrix towards 1 quickly, trading exact convergence for speed; 5 steps leave the
# singular values roughly in [0.7, 1.2], which is all Muon needs.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# Gradient all-reduce bucket size: large enough to amortise a collective's latency, small enough
# that the first buckets are on the wire while backward is still running (DDP uses 25 MiB).
BUCKET_BYTES = 25 * 2 ** 20

MUON_DEFAULTS = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)
ADAMW_DEFAULTS = dict(lr=1e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T for a batch of matrices (..., rows, cols), in `dtype`.

    The iteration is run on the wide orientation (rows <= cols) so the Gram matrix X X^T is the
    smaller one. Returns a tensor of g's dtype.
    """
    a, b, c = NS_COEFFS
    shape = g.shape
    x = g.to(dtype).reshape(-1, *shape[-2:])  # always a (batch, rows, cols) stack: baddbmm below wants 3-D
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    # Spectral norm <= Frobenius norm, so this puts every singular value in [0, 1].
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        # baddbmm folds the scalar multiply-adds into the matmuls: b*G + c*G@G and a*X + P@X without
        # separate elementwise passes (4 fewer passes over each stack per iteration).
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    if transposed:
        x = x.mT
    x = x.reshape(shape)
    return x.to(g.dtype)


def shard_bounds(k: int, rank: int, world: int) -> tuple[int, int, int]:
    """Rank `rank`'s slice [start, stop) of k stacked matrices cut into `world` equal slices of
    size ceil(k / world) (the last ones may be short or empty), and that slice size."""
    size = -(-k // world)
    start = min(rank * size, k)
    return start, min(start + size, k), size


def orthogonalize_sharded(mats: list[torch.Tensor], rank: int, world: int, dtype: torch.dtype = torch.bfloat16):
    """Orthogonalise a list of same-shaped matrices with the work split over `world` ranks.

    Rank `rank` runs Newton-Schulz on its slice only (see shard_bounds); the slices are then
    all-gathered asynchronously. Returns (stack, handle): a (world * size, rows, cols) tensor whose
    first len(mats) entries are the results once `handle.wait()` returns (handle is None on one rank,
    where the stack is complete at once).
    """
    k = len(mats)
    start, stop, size = shard_bounds(k, rank, world)
    mine = torch.stack(mats[start:stop]) if stop > start else mats[0].new_zeros(0, *mats[0].shape)
    if stop - start < size:  # pad so that every rank contributes the same shape to the gather
        mine = torch.cat([mine, mine.new_zeros(size - (stop - start), *mats[0].shape)])
    mine = orthogonalize(mine, dtype=dtype)
    if world == 1:
        return mine, None
    out = mine.new_empty(world * size, *mats[0].shape)
    handle = dist.all_gather(list(out.chunk(world)), mine, async_op=True)
    return out, handle


class MuonAdamW(torch.optim.Optimizer):
    """param_groups: dicts with "params" and "kind" ("muon" | "adamw") plus that rule's settings.

    muon:  lr, momentum, nesterov, weight_decay          (params must be 2-D)
    adamw: lr, betas, eps, weight_decay                  (any shape)
    Every group also gets "initial_lr" (the LR schedule multiplies it) unless given.
    """

    def __init__(self, param_groups, grad_reduce: str = "sum", grad_clip: float = 0.0,
                 ns_dtype: torch.dtype = torch.bfloat16):
        if grad_reduce not in ("sum", "mean"):
            raise ValueError(f"grad_reduce must be 'sum' or 'mean', got {grad_reduce!r}")
        groups = []
        for g in param_groups:
            g = dict(g)
            kind = g.get("kind")
            if kind == "muon":
                g = {**MUON_DEFAULTS, **g}
                for p in g["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"Muon only takes 2-D matrices; got a parameter of shape {tuple(p.shape)}")
            elif kind == "adamw":
                g = {**ADAMW_DEFAULTS, **g}
                g["betas"] = tuple(g["betas"])
            else:
                raise ValueError(f"each param group needs kind='muon' or 'adamw', got {kind!r}")
            g.setdefault("initial_lr", g["lr"])
            g["params"] = [p for p in g["params"]]
            if g["params"]:
                groups.append(g)
        if not groups:
            raise ValueError("MuonAdamW got no parameters")
        super().__init__(groups, defaults={})
        self.grad_reduce = grad_reduce
        self.grad_clip = float(grad_clip)
        self.ns_dtype = ns_dtype
        # Distributed: build the optimizer after torch.distributed is initialised (init_runtime).
        self._sync = True
        self._buckets = None
        if self._world_size() > 1:
            self._build_buckets()

    # torch.optim.Optimizer wraps these four in torch._disable_dynamo, which imports torch._dynamo on
    # their first call, compiled or not: tens of MB of resident memory (docs/benchmarks.md) for nothing when
    # no optimizer code is compiled (it never is here). Calling the wrapped functions directly keeps
    # the behaviour and leaves dynamo unloaded unless torch.compile is really used.
    def add_param_group(self, param_group) -> None:
        _undecorated(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _undecorated(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self):
        return _undecorated(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict) -> None:
        _undecorated(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    # ------------------------------------------------------------------------------------------
    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    # Gradient reduction, overlapped with the backward pass.
    #
    # Parameters are cut into ~BUCKET_BYTES buckets in reverse order (the order backward produces
    # their gradients). A post-accumulate-grad hook counts the gradients of a bucket as they land;
    # when the bucket is complete its flat copy is all-reduced asynchronously while backward goes on
    # with earlier layers. step() launches whatever did not complete (a parameter without a gradient
    # gets zeros: every rank must send the same layout), waits for all, and copies the sums back.
    # With gradient accumulation, the caller runs all but the last micro-step under `no_sync()` so
    # only the final backward communicates. On one rank none of this exists (no hooks, no buckets).

    def _build_buckets(self) -> None:
        buckets, cur, size = [], [], 0
        for p in reversed(self._all_params()):
            if cur and (p.dtype != cur[-1].dtype or p.device != cur[-1].device or size >= BUCKET_BYTES):
                buckets.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += p.numel() * p.element_size()
        if cur:
            buckets.append(cur)
        self._buckets = [{"params": b, "ready": 0, "flat": None, "handle": None} for b in buckets]
        self._bucket_of = {p: b for b in self._buckets for p in b["params"]}
        for p in self._bucket_of:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, p) -> None:
        if not self._sync:
            return
        b = self._bucket_of[p]
        b["ready"] += 1
        if b["ready"] == len(b["params"]):
            self._launch(b)

    @torch.no_grad()
    def _launch(self, b) -> None:
        for p in b["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        b["flat"] = torch.cat([p.grad.reshape(-1) for p in b["params"]])
        b["handle"] = dist.all_reduce(b["flat"], op=dist.ReduceOp.SUM, async_op=True)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate local gradients (earlier micro-steps)."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum (or average) every gradient over ranks; no-op on one rank."""
        if self._buckets is None:
            return
        world = self._world_size()
        for b in self._buckets:
            if b["handle"] is None:
                self._launch(b)
        for b in self._buckets:
            b["handle"].wait()
            flat = b["flat"]
            if self.grad_reduce == "mean":
                flat.div_(world)
            offset = 0
            for p in b["params"]:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p))
                offset += n
            b.update(ready=0, flat=None, handle=None)

    @torch.no_grad()
    def step(self, closure=None):
        """Reduce gradients across ranks, clip (if asked), then update. Returns the global grad
        norm when clipping is on, else None."""
        if closure is not None:
            raise ValueError("MuonAdamW.step does not take a closure")
        self.reduce_gradients()
        norm = None
        if self.grad_clip > 0:
            params = [p for p in self._all_params() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return norm

    # ------------------------------------------------------------------------------------------
    # Muon, sharded over ranks (no rank repeats another rank's work).
    #
    # After the gradient reduction every rank holds the same gradients, so every rank updates its own
    # momentum buffers (cheap, elementwise; keeps the state identical everywhere, so a checkpoint
    # resumes any world size). The expensive part, Newton-Schulz, is split: the k same-shaped matrices
    # of a stack are cut into `world` equal slices (zero-padded; NS maps 0 to 0) and rank r
    # orthogonalises slice r only; an all-gather then gives every rank all k results. On one rank the
    # slice is the whole stack and the gather is skipped: the same code path, not a second copy.
    # The gathers are launched asynchronously, so one stack's communication overlaps the next's NS.

    def _muon_group(self, group) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        rank, world = (dist.get_rank(), self._world_size()) if self._world_size() > 1 else (0, 1)
        by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                by_shape[tuple(p.shape)].append(p)
        pending = []
        for (rows, cols), params in by_shape.items():
            grads = [p.grad for p in params]
            bufs = []
            for p, g in zip(params, grads):
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(g)
                bufs.append(st["momentum_buffer"])
            torch._foreach_lerp_(bufs, grads, 1 - mom)            # buf = mom*buf + (1-mom)*g
            upd = torch._foreach_lerp(grads, bufs, mom) if group["nesterov"] else bufs  # g + mom*(buf - g)
            ortho, handle = orthogonalize_sharded(upd, rank, world, self.ns_dtype)
            pending.append((params, ortho, handle, math.sqrt(max(1.0, rows / cols))))
        for params, ortho, handle, scale in pending:
            if handle is not None:
                handle.wait()
            # An orthogonal matrix has unit singular values whatever its shape; tall matrices get
            # a larger step so the per-element RMS of the update is comparable across shapes.
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, list(ortho[: len(params)].unbind(0)), alpha=-lr * scale)

    def _adamw_group(self, group) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params, grads, m1, m2 = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            m1.append(st["exp_avg"])
            m2.append(st["exp_avg_sq"])
        if not params:
            return
        # The step count lives in the group (a plain int, saved in the checkpoint's JSON) so all
        # parameters of a group share it; groups only ever step together.
        group["step"] = t = group.get("step", 0) + 1
        # torch's fused AdamW kernel (decoupled weight decay, bias corrections from the step, the same
        # formula as torch.optim.AdamW) does in one pass over each tensor what a chain of _foreach ops
        # does in seven (a few times faster on CPU: docs/benchmarks.md).
        steps = [torch.tensor(float(t), device=params[0].device)] * len(params)
        torch._fused_adamw_(params, grads, m1, m2, [], steps, lr=lr, beta1=b1, beta2=b2, weight_decay=wd,
                            eps=eps, amsgrad=False, maximize=False)


def _undecorated(fn):
    """The function under a functools.wraps decorator (itself when there is none)."""
    return getattr(fn, "__wrapped__", fn)


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300) -> float:
    """Muon momentum warms up linearly from `start` to `end` over the first `warmup_steps` optimizer
    steps (nanochat): a low momentum early lets the fast-changing early gradients through."""
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return start + (end - start) * frac


def set_muon_momentum(optimizer: MuonAdamW, momentum: float) -> None:
    for g in optimizer.param_groups:
        if g["kind"] == "muon":
            g["momentum"] = momentum


def newton_schulz_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype Muon's Newton-Schulz iteration multiplies in, for a model computing in `compute_dtype`.

    bf16 only where the model itself computes in bf16, i.e. where bf16 matmuls are fast (GPUs from
    Ampere on, CPUs with AVX-512 BF16 / AMX), as nanochat does on GPUs. Anywhere else fp32: an
    AVX2-only CPU multiplies bf16 matrices through a scalar fallback ~150x slower than fp32 (measured
    on a 2-core Zen 3: 1 against 165 GFLOP/s), which made each d4 pretraining step ~10 s instead of
    ~1 s; and a GPU without native bf16 (fp16 compute) emulates it.
    """
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32


def build_optimizer(groups: dict, *, matrix_lr: float, embedding_lr: float, unembedding_lr: float,
                    other_lr: float, compute_dtype: torch.dtype, weight_decay: float = 0.0,
                    grad_clip: float = 0.0) -> MuonAdamW:
    """The optimizer from a model's `param_groups()` dict ("matrix", "embedding", "head", "other").

    matrix -> Muon; embedding, head, other -> AdamW with betas (0.8, 0.95), eps 1e-10 (nanochat).
    Weight decay applies to the matrices only (embeddings/head/scalars decay would fight the
    softcapped logits and the gates). Unknown group names are an error, not silently dropped.
    compute_dtype: the model's (required, so that no caller gets bf16 Newton-Schulz on a CPU that
    computes in fp32; see newton_schulz_dtype).
    """
    known = {"matrix", "embedding", "head", "other"}
    unknown = set(groups) - known
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; expected {sorted(known)}")
    spec = [
        dict(params=list(groups.get("matrix", [])), kind="muon", lr=matrix_lr, weight_decay=weight_decay,
             name="matrix"),
        dict(params=list(groups.get("embedding", [])), kind="adamw", lr=embedding_lr, name="embedding"),
        dict(params=list(groups.get("head", [])), kind="adamw", lr=unembedding_lr, name="head"),
        dict(params=list(groups.get("other", [])), kind="adamw", lr=other_lr, name="other"),
    ]
    return MuonAdamW(spec, grad_clip=grad_clip, ns_dtype=newton_schulz_dtype(compute_dtype))


def build_lora_optimizer(params, lr: float):
    """AdamW (betas 0.9/0.99, eps 1e-8, no weight decay) over the adapters, through MuonAdamW so that the
    loop's LR schedule, gradient all-reduce and checkpointing apply unchanged."""
    if not lr > 0:
        raise ChibiError(f"--lora-lr must be > 0, got {lr}")
    return MuonAdamW([dict(params=list(params), kind="adamw", lr=lr, betas=(0.9, 0.99), eps=1e-8,
                           weight_decay=0.0, name="lora")])
