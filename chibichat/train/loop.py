"""The one training loop every stage reuses (pretrain, midtrain, SFT, RL).

A stage provides only what is specific to it:

    batches   an iterator of micro-batches with state_dict()/load_state_dict() (exact resume); each
              micro-batch is a tuple whose element 1 is the targets tensor (-1 = not trained on), e.g.
              PretrainLoader's (inputs, targets) or ConversationLoader's; extra elements (RL advantages)
              are carried along untouched. Tensors are moved to rt.device here.
    loss_fn   loss_fn(model, batch) -> (loss_sum, n_tokens): the SUM of per-token losses and how many
              target tokens it covers. e.g. `lambda m, b: (m(b[0], b[1], reduction="sum"), int((b[1] >= 0).sum()))`
    count_fn  optional count_fn(batch) -> int, the target tokens of a micro-batch *before* the forward
              (default: (batch[1] >= 0).sum()), for a stage whose loss is normalised by another count.
              RL uses the default: its batches hold as targets exactly the sampled tokens it normalises by
              (groups without signal are left out of the batch); DPO counts pairs (its loss is a mean over
              pairs). The loop checks that loss_fn reports the same count.
    tokens_fn optional tokens_fn(batch) -> int, the tokens a micro-batch trains, for tok/s, MFU and the
              `tokens` total, where count_fn counts something else (DPO: count_targets, the target tokens
              of its chosen and rejected rows); default: count_fn's count.
    lr_share_fn optional lr_share_fn(batch) -> (weight, out_of): the step's learning rate is multiplied by
              Σ weight / Σ out_of over its micro-batches and ranks. RL: (informative groups, groups), so a
              step where few groups carry a signal moves the weights that much less. Muon and Adam take a
              step of about the same size whatever the gradient's norm, so a step whose gradient rests on
              one group out of eight (mostly that group's noise) would otherwise move as far as a step
              that rests on all eight; rescaling the loss cannot change that, the learning rate can.
    eval_fn   optional eval_fn(model, step) -> {"val_bpb": ..., ...}: runs on every rank (it may
              all-reduce), model in eval mode; keys go to metrics.jsonl, "val_bpb" is tracked (min/final).
    sample_fn optional sample_fn(model, step) -> list[str]: rank 0 only (no collectives), printed and
              appended to samples.jsonl.
    meta      JSON-serialisable dict stored in every checkpoint (model_config, tokenizer, flags, ...).

What the loop does, per optimizer step s (s = 0 .. num_steps-1; one "step" = one optimizer step,
never a micro-batch):
  1. prefetch the step's `grad_accum` micro-batches, count their target tokens, all-reduce the count
     (one tiny collective, with lr_share_fn's sums) -> N, the global target-token total of the step;
  2. set each group's lr = initial_lr * lr_multiplier(s) (* the lr_share_fn share) and the Muon momentum
     for s. N = 0 is an error, unless cfg.skip_empty_steps (RL: every group of the step had equal
     rewards, so there is no learning signal): then the step is skipped whole, on every rank (no
     forward/backward and no optimizer step, so weights, moments and momentum buffers stay bitwise
     unchanged; the LR schedule still advances),
     logged as {"step", "skipped": true} and counted in skipped_steps;
  3. for each micro-batch, backward(loss_sum / N): the gradient is then the per-token mean over the
     whole step on every rank and micro-batch (not a mean of micro-batch means);
  4. optimizer.step(), which sums gradients over ranks itself (MuonAdamW: bucketed all-reduces launched
     from gradient hooks during the last micro-step's backward; earlier ones run under no_sync()), then zero_grad;
  5. log loss (Σ loss_sum / N, all-reduced), lr multiplier, tok/s, MFU, elapsed, ETA.
Evaluation runs at step 0, every eval_every steps and at the end, samples every sample_every steps and at
the end (never at step 0: the untrained model's samples say nothing); checkpoints
every save_every steps and at the end (rank 0 writes; loader and RNG states of all ranks are gathered).
Under torchrun a fresh run gives each rank its own torch RNG stream before step 0, so random draws in
training forwards (embedding noise, LoRA dropout) differ between ranks.

Wall-clock budget (`minutes`): num_steps is then the most steps the run may take. The first step (compile,
warm-up) is not timed; the next `fit_after` steps are (skipped ones too), and after them the run's step count
is fitted (fit_num_steps): as many steps as fit in what is left of the budget at the measured seconds per step
(evaluations every eval_every steps and the final one costed at what the step-0 evaluation took), at most
num_steps. Every rank fits from rank 0's timings, so all take the same number of steps. It is fitted again,
each time from the steps since the fit before, every REFIT_FRAC of the way through the run until the warmdown
starts (the first steps can run slower than the rest, and a machine's speed drifts: the last fit before the
warmdown leaves only the warmdown's share to chance). Until a fit the LR schedule is that of the previous
count, which equals the fitted schedule on every step taken so far as long as those steps come before its
warmdown (warmup is in steps, warmdown a fraction of the count). A budget too short even for that runs the
fewest steps that keep it (the steps taken stay before the warmdown) and says by how much it overruns: the
work done is kept rather than thrown away by an error late in a run. Where the LR was already falling when the
count is fitted (a warmdown that starts before the fit: --warmdown-frac 1.0, nanochat's SFT and RL recipe), no
count keeps the steps taken on its schedule: the fitted count stands and the steps left fall linearly from the
last step's LR to the final one (fit["decay_from"], schedule.lr_multiplier); without this such a run ignored
its budget. The fitted count, the measured seconds per step and tok/s go into the loop state (so a resume
keeps the count; a refit still to come at the checkpoint is not made, as the resumed process cannot know how
much of the budget the killed one spent) and LoopResult.fit; the step-0 evaluation's seconds go into the loop
state too (a process resumed before the fit costs evaluations at them). The budget covers the loop (from the
call to train() to the final checkpoint), not the stage's start-up; checkpoint writes and sampling are not
costed.

Exact resume (`resume=True`): weights, optimizer, every rank's loader state, loop counters and RNG
states come back from the newest checkpoint in tag_dir, and metrics.jsonl is cut back to that step,
so a killed-and-resumed run computes exactly what an uninterrupted one does. What would make it another
run is refused: another world size, model_config, tokenizer, LoRA base or settings (meta["lora"]),
schedule and batch (SCHEDULE_FLAGS, saved as meta["schedule"]), or precision (the compute dtype as resolved,
so --dtype auto on the same machine is the same, and fp8 matmuls: meta["precision"]). Two changes are allowed
and printed as notes: the learning rates and weight decay of this invocation apply, and num_steps may change (a run
continued for more steps; not with `minutes`, where it is the cap of the fitted count).

Files in tag_dir (rank 0): step_XXXXXX/ checkpoints, metrics.jsonl (one JSON object per step and
per eval), samples.jsonl. A stage's summary.json (written by the stage when it finishes) is removed
once the run is known to start (its resume/overwrite checks passed), so a refused run leaves it and a
running one never shows a stale one. Console: one compact line every log_every steps. wandb only when
cfg.wandb_project is set (imported here, then).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from chibichat.common import (
    ChibiError, Runtime, atomic_write_text, gather_objects, print0, recover_asides, remove_dir, write_error,
)
from chibichat.train.checkpoint import (
    STEP_RE, list_steps, load_optimizer, load_weights, read_meta, save_checkpoint, step_dir, unwrap,
)
from chibichat.train.optim import muon_momentum, set_muon_momentum
from chibichat.train.schedule import lr_multiplier

# Dense bf16 peak of one accelerator, for MFU. A GPU not in the table reports no MFU rather than a
# made-up one (--peak-tflops supplies the figure by hand); a CPU's peak is measured (peak_flops).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
                   "A10G": 125e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
GC_EVERY = 1000  # steps between manual collections once automatic GC is off
# Steps between measurements of a CPU's matmul peak. A shared or throttled CPU can run at half speed for
# minutes, so a peak measured once at start-up may be a slow phase's and put MFU above 100%; the highest
# measured so far is the one quoted (~30 ms per measurement at 1024^3).
PEAK_EVERY = 100


@dataclass
class LoopConfig:
    tag_dir: Path
    num_steps: int
    grad_accum: int = 1
    warmup_steps: int = 0
    warmdown_frac: float = 0.2
    final_lr_frac: float = 0.0
    momentum_warmup_steps: int = 300
    eval_every: int = 0          # 0: evaluate only at the start and the end
    sample_every: int = 0        # 0: sample only at the end
    save_every: int = 0          # 0: save only at the end
    keep_last: int = 2           # 0 keeps every checkpoint
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False      # a fresh run into a tag_dir that already holds checkpoints
    wandb_project: str | None = None
    run_name: str | None = None
    flops_per_token: float = 0.0
    peak_flops: float | None = None   # per device; None = look up PEAK_BF16_FLOPS
    trim_heap: bool = False      # release_free_heap() after every optimizer step (host memory, glibc only)
    skip_empty_steps: bool = False  # a step with no target tokens on any rank is skipped (see above), not an error
    minutes: float | None = None  # wall-clock budget: fit the step count (num_steps is then the cap)
    fit_after: int = 5           # steps timed (after the untimed first one) before the count is fitted

    def __post_init__(self):
        self.tag_dir = Path(self.tag_dir)
        # Each field is set by the flag of its name (--num-steps ...): the messages name the flag.
        for name in ("num_steps", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ChibiError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "sample_every", "save_every", "keep_last",
                     "momentum_warmup_steps"):
            if getattr(self, name) < 0:
                raise ChibiError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("warmdown_frac", "final_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ChibiError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.minutes is not None and not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise ChibiError(f"--minutes must be a positive number, got {self.minutes}")
        if self.fit_after < 1:
            raise ChibiError(f"fit_after (steps timed before fitting --minutes) must be >= 1, got {self.fit_after}")
        if self.resume and self.overwrite:
            raise ChibiError("--resume continues a run and --overwrite replaces it: pass one of them")
        if self.warmup_steps + round(self.warmdown_frac * self.num_steps) > self.num_steps:
            raise ChibiError(f"warmup ({self.warmup_steps} steps) + warmdown ({self.warmdown_frac} x "
                             f"{self.num_steps} steps) exceed the run's {self.num_steps} steps; shorten one")


@dataclass
class LoopState:
    """Counters that survive a resume (saved in meta.json under "loop")."""
    step: int = 0
    tokens: int = 0              # target tokens trained on, all ranks
    train_time_s: float = 0.0    # wall time inside optimizer steps (excludes eval/sample/save)
    min_val_bpb: float | None = None
    last_eval: dict = field(default_factory=dict)
    last_loss: float | None = None
    skipped_steps: int = 0       # steps without target tokens, skipped under cfg.skip_empty_steps
    fit: dict = field(default_factory=dict)  # --minutes: the fitted step count and what it was fitted to
    # --minutes: seconds of the run's step-0 evaluation, what the fit costs every evaluation at (rank 0's once
    # fitted). Kept here because a resumed process skips the evaluation at the step it resumes at, and a fit
    # without it would leave no time for the evaluations still to come.
    eval_s: float = 0.0


@dataclass
class LoopResult:
    steps: int
    tokens: int
    train_time_s: float
    wall_time_s: float
    final_loss: float | None
    final_eval: dict
    min_val_bpb: float | None
    checkpoint: str | None
    skipped_steps: int = 0
    fit: dict = field(default_factory=dict)


REFIT_FRAC = 0.1  # --minutes: the step count is fitted again every this much of the run (see train())

# What decides the LR/momentum schedule and the batches of every step, saved in each checkpoint as
# meta["schedule"] and compared on resume: with the stage flag that sets each. num_steps may change on
# resume (a run continued for more steps) unless the count is fitted to --minutes, where it is the cap.
SCHEDULE_FLAGS = {"num_steps": "--num-steps", "grad_accum": "--grad-accum (pretrain: --total-batch / --device-batch)",
                  "warmup_steps": "--warmup-steps", "warmdown_frac": "--warmdown-frac",
                  "final_lr_frac": "--final-lr-frac", "momentum_warmup_steps": "--momentum-warmup-steps",
                  "minutes": "--minutes", "fit_after": "--fit-steps"}
# meta["lora"] keys (checkpoint.py) and the flags that set them
LORA_FLAGS = {"base": "--from/--from-tag/--from-step", "rank": "--lora", "alpha": "--lora-alpha",
              "dropout": "--lora-dropout", "targets": "--lora-targets"}


def fit_num_steps(minutes: float, elapsed_s: float, steps_done: int, step_times: list[float], tokens_timed: int,
                  eval_s: float, eval_every: int, cap: int, warmup_steps: int, warmdown_frac: float,
                  final_lr_frac: float = 0.0, ran_under: int | None = None) -> dict:
    """The step count that ends a run within `minutes` (module docstring), with what it was fitted to.

    elapsed_s: wall time of the run so far; steps_done: steps taken, under the LR schedule of `ran_under`
    steps (default: cap); step_times: seconds of the timed steps, which trained on tokens_timed target
    tokens; eval_s: seconds of one evaluation (0: none)."""
    if not step_times:
        raise ChibiError("fitting --minutes needs at least one timed step")
    sec_per_step = sum(step_times) / len(step_times)
    per_step = sec_per_step + (eval_s / eval_every if eval_every else 0.0)
    left = minutes * 60.0 - elapsed_s - eval_s  # the final evaluation is still to come
    fitted = steps_done + max(0, math.floor(left / per_step))
    num_steps = min(fitted, cap)
    fit = {"minutes": minutes, "num_steps": num_steps, "capped": fitted > cap, "cap": cap,
           "sec_per_step": sec_per_step, "tok_per_s": tokens_timed / sum(step_times),
           "timed_steps": len(step_times), "eval_s": eval_s, "fitted_after_s": elapsed_s, "fitted_at_step": steps_done}
    need = max(steps_done, warmup_steps)
    ran_under = cap if ran_under is None else ran_under
    last = steps_done - 1

    def warmdown_start(n: int) -> int:
        return n - round(warmdown_frac * n)

    if not (num_steps < cap and warmdown_start(num_steps) < need):
        return fit
    if last >= warmup_steps and last >= warmdown_start(ran_under):
        # The LR was already falling when the count was fitted (a warmdown that starts before the fit, as
        # --warmdown-frac 1.0 does): no count keeps the steps taken on the fitted schedule, so the count keeps
        # the budget and the steps left fall on from the last step's LR to the final one.
        fit["decay_from"] = [steps_done, lr_multiplier(last, ran_under, warmup_steps, warmdown_frac, final_lr_frac)]
    else:
        fewest = next(n for n in range(num_steps, cap + 1) if warmdown_start(n) >= need or n == cap)
        over_s = (fewest - fitted) * per_step
        fit.update(num_steps=fewest, over_budget_s=over_s,
                   note=f"--minutes {minutes:g} is too short: after {steps_done} steps ({elapsed_s:.0f} s, "
                        f"{sec_per_step:.3f} s per step) it leaves room for {fitted} steps in all, too few to keep "
                        f"the steps taken and the {warmup_steps} warmup steps before the final {warmdown_frac:g} "
                        f"warmdown; running {fewest} steps, ~{over_s:.0f} s over the budget")
    return fit


def count_targets(batch) -> int:
    return int((batch[1] >= 0).sum())


def _to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _all_sum(rt: Runtime, values: list[float]) -> list[float]:
    """Sum a few numbers over ranks in one collective (float64 so token counts stay exact)."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def _broadcast0(rt: Runtime, values: list[float]) -> list[float]:
    """Rank 0's numbers on every rank (float64)."""
    if not rt.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.broadcast(t, 0)
    return t.tolist()


def _rng_state(rt: Runtime) -> dict:
    st = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if rt.device.type == "cuda":
        st["cuda"] = base64.b64encode(torch.cuda.get_rng_state(rt.device).numpy().tobytes()).decode()
    return st


def _set_rng_state(rt: Runtime, st: dict) -> None:
    def decode(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(st["cpu"]))
    if rt.device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(decode(st["cuda"]), rt.device)


def measure_matmul_peak(dtype, device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul in `dtype` on `device`, with the current thread count.
    Its operands come from a generator of its own: measuring mid-run leaves the run's random state alone."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    a @ b  # first call: kernel selection, weight packing

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(rt: Runtime, override: float | None) -> float | None:
    """Per-device FLOP/s that MFU is quoted against: --peak-tflops, else the GPU's datasheet bf16
    figure, else (CPU) a measured one. No datasheet number fits a CPU (cores, clocks, SIMD width,
    AMX or not: the 2-core Zen 4 this was developed on does ~410 GFLOP/s in bf16, not the ~1,300 its
    instruction tables suggest), so a CPU's MFU is against what a 1024^3 matmul in the compute dtype
    achieves on it at start-up (~0.1 s)."""
    if override:
        return override
    if rt.device.type == "cpu":
        return measure_matmul_peak(rt.compute_dtype, rt.device, n=1024)
    if rt.device.type != "cuda" or rt.compute_dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(rt.device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Metrics:
    """metrics.jsonl / samples.jsonl on rank 0, plus wandb when asked."""

    def __init__(self, rt: Runtime, cfg: LoopConfig, resume_step: int | None, meta: dict):
        self.on = rt.is_master
        self.wandb = None
        if not self.on:
            return
        cfg.tag_dir.mkdir(parents=True, exist_ok=True)
        self.path = cfg.tag_dir / "metrics.jsonl"
        self.samples_path = cfg.tag_dir / "samples.jsonl"
        wandb = None
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ChibiError("--wandb needs the wandb package: pip install 'chibichat[wandb]'") from None
        for p in (self.path, self.samples_path):
            self._cut(p, resume_step)
        self.f = open(self.path, "a", encoding="utf-8")
        if wandb is not None:
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, config=meta.get("flags", {}),
                                    resume="allow")

    @staticmethod
    def _cut(path: Path, resume_step: int | None) -> None:
        """Fresh run: start empty. Resume from step n: keep records of steps <= n (what the saved
        state had already logged), so the file reads as one uninterrupted run."""
        if not path.exists():
            return
        if resume_step is None:
            path.unlink()
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= resume_step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                break  # a torn last line from the kill: drop it and everything after
        atomic_write_text(path, "".join(l + "\n" for l in keep))

    def log(self, record: dict) -> None:
        if not self.on:
            return
        try:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        except OSError as e:
            raise write_error(self.path, e) from None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def samples(self, step: int, texts: list[str]) -> None:
        if not self.on:
            return
        try:
            with open(self.samples_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "samples": texts}, ensure_ascii=False) + "\n")
        except OSError as e:
            raise write_error(self.samples_path, e) from None

    def close(self) -> None:
        if self.on:
            self.f.close()
            if self.wandb is not None:
                self.wandb.finish()


def check_resumable(rt: Runtime, cfg: LoopConfig, meta: dict, model, batches=None) -> None:
    """What resume refuses (another world size, model, tokenizer, LoRA base or settings, schedule, precision of
    `model`; with `batches`, another data stream), checked against the newest checkpoint in cfg.tag_dir without
    loading anything: a stage that spends minutes before train() (RL's pass@k evaluation) calls it first, so a
    run that cannot resume says so at once. train() checks all of it again."""
    sdir, saved, _ = _resumable(rt, cfg, meta, _precision(rt, model))
    if batches is not None:
        try:
            loader_state = saved["loader"][rt.rank]
        except (KeyError, IndexError, TypeError) as e:
            raise ChibiError(f"--resume: {sdir}/meta.json lacks the loop state ({e}); it was not written by "
                             f"the training loop, so it cannot be resumed") from None
        batches.load_state_dict(loader_state)


def _resumable(rt: Runtime, cfg: LoopConfig, meta: dict, precision: dict) -> tuple[Path, dict, dict | None]:
    """(step dir, its meta, its schedule) of the newest checkpoint, once the run may resume from it;
    `precision`: this run's (_precision)."""
    steps = list_steps(cfg.tag_dir)
    if not steps:
        raise ChibiError(f"--resume: no checkpoint in {cfg.tag_dir} to resume from; run without --resume")
    sdir = step_dir(cfg.tag_dir, steps[-1])
    saved = read_meta(sdir)
    if saved.get("world_size") != rt.world_size:
        raise ChibiError(f"--resume: {sdir} was saved by {saved.get('world_size')} ranks, this run has "
                         f"{rt.world_size}; the data order is per rank, so resume with the same number of ranks "
                         f"(torchrun --nproc_per_node; a speedrun: --nproc-per-node {saved.get('world_size')})")
    if "model_config" in meta and saved.get("model_config") != meta["model_config"]:
        diff = sorted(k for k in meta["model_config"] if saved.get("model_config", {}).get(k) != meta["model_config"][k])
        raise ChibiError(f"--resume: {sdir} holds a model with different {diff}; use the flags it was trained "
                         f"with (see its meta.json) or a new --tag")
    if "tokenizer" in meta and saved.get("tokenizer") != meta["tokenizer"]:
        raise ChibiError(f"--resume: {sdir} was trained with another tokenizer ({saved.get('tokenizer')}); "
                         f"restore that tokenizer or start a new --tag")
    _check_lora(sdir, saved.get("lora"), meta.get("lora"), (meta.get("model_config") or {}).get("layers"))
    _check_precision(sdir, saved.get("precision"), precision)
    return sdir, saved, _check_schedule(sdir, saved.get("schedule"), cfg)


def _resume(model, optimizer, batches, rt: Runtime, cfg: LoopConfig, meta: dict) -> LoopState:
    sdir, saved, schedule = _resumable(rt, cfg, meta, _precision(rt, model))
    try:
        loader_state, loop, rng = saved["loader"][rt.rank], saved["loop"], saved["rng"][rt.rank]
        state = LoopState(**loop)
    except (KeyError, IndexError, TypeError) as e:
        raise ChibiError(f"--resume: {sdir}/meta.json lacks the loop state ({e}); it was not written by "
                         f"the training loop, so it cannot be resumed") from None
    load_weights(sdir, model)
    # The optimizer state brings back its saved hyperparameters; the LRs and weight decay of *this*
    # invocation win (identical flags -> identical values, so resume stays exact; changed flags apply).
    wanted = [(g["initial_lr"], g.get("weight_decay")) for g in optimizer.param_groups]
    load_optimizer(sdir, optimizer)
    for g, (lr, wd) in zip(optimizer.param_groups, wanted):
        if (g["initial_lr"], g.get("weight_decay")) != (lr, wd):
            print0(rt, f"note: group {g.get('name', g['kind'])}: lr {g['initial_lr']} -> {lr}, weight decay "
                       f"{g.get('weight_decay')} -> {wd} (flags of this run)")
        g["initial_lr"], g["weight_decay"] = lr, wd
    batches.load_state_dict(loader_state)
    _set_rng_state(rt, rng)
    print0(rt, f"resumed from {sdir} (step {state.step})")
    if saved.get("precision") is None:
        print0(rt, f"note: {sdir} records no precision (an older chibichat saved it), so this run's --dtype and "
                   f"--fp8 cannot be checked against it; pass the values it was started with")
    if schedule is None:
        print0(rt, f"note: {sdir} records no schedule (an older chibichat saved it), so this run's "
                   f"{', '.join(f.split(' ')[0] for f in SCHEDULE_FLAGS.values())} cannot be checked against it; "
                   f"pass the values it was started with")
    elif schedule["num_steps"] != cfg.num_steps:
        before, now = schedule["num_steps"], cfg.num_steps
        taken = range(min(state.step, before, now))
        same = all(lr_multiplier(s, before, cfg.warmup_steps, cfg.warmdown_frac, cfg.final_lr_frac)
                   == lr_multiplier(s, now, cfg.warmup_steps, cfg.warmdown_frac, cfg.final_lr_frac) for s in taken)
        print0(rt, f"note: --num-steps {before} -> {now}: the steps from {state.step} on follow the LR schedule of "
                   f"{now} steps" + ("" if same else f"; the {state.step} steps taken followed that of {before} "
                                                     f"(their warmdown), so this run differs from an uninterrupted "
                                                     f"{now}-step one"))
    return state


def _schedule(cfg: LoopConfig) -> dict:
    return {k: getattr(cfg, k) for k in SCHEDULE_FLAGS}


def _precision(rt: Runtime, model) -> dict:
    """How the run computes, saved in every checkpoint as meta["precision"] and compared on resume: the compute
    dtype as resolved (--dtype auto is what it picked on this machine) and whether training's block matmuls run
    in fp8 (the model's gpt.RunConfig; a model without one has no fp8 matmuls)."""
    run = getattr(unwrap(model), "run", None)
    return {"compute_dtype": str(rt.compute_dtype).replace("torch.", ""), "fp8": bool(getattr(run, "fp8", False))}


def _check_precision(sdir: Path, saved, now: dict) -> None:
    """Refuse a resume in another precision than the checkpoint's: the steps still to come would compute in
    another dtype (or with or without fp8 matmuls) than the steps taken, so the run would silently stop being
    the one it continues. None (an older chibichat recorded none): not checked, _resume notes it."""
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ChibiError(f"--resume: {sdir}/meta.json has a malformed precision ({saved!r}); it is corrupt")
    diff, fix = [], []
    if saved.get("compute_dtype") != now["compute_dtype"]:
        diff.append(f"--dtype {saved.get('compute_dtype')} (this run: {now['compute_dtype']})")
        fix.append(f"--dtype {saved.get('compute_dtype')}")
    if saved.get("fp8") != now["fp8"]:
        was, asked = ("set" if v else "not set" for v in (saved.get("fp8"), now["fp8"]))
        diff.append(f"--fp8 {was} (this run: {asked})")
        fix.append("--fp8" if saved.get("fp8") else "no --fp8")
    if diff:
        raise ChibiError(f"--resume: {sdir} was trained with " + ", ".join(diff) + "; a resumed run continues in "
                         "the precision it was trained in, so pass " + " and ".join(fix) + ", or start a new --tag")


def _check_schedule(sdir: Path, saved, cfg: LoopConfig) -> dict | None:
    """Refuse a resume whose schedule or batch differs from the checkpoint's (SCHEDULE_FLAGS): the run
    would silently stop being the one it continues. Returns the saved schedule (None: not recorded)."""
    if saved is None:
        return None
    if not isinstance(saved, dict):
        raise ChibiError(f"--resume: {sdir}/meta.json has a malformed schedule ({saved!r}); it is corrupt")
    now = _schedule(cfg)
    # Without --minutes the step count may grow, and --fit-steps (how many steps time the fit) does nothing;
    # a --minutes now, where the checkpoint had none, differs in "minutes" and is refused for that.
    free = {"num_steps", "fit_after"} if saved.get("minutes") is None else set()
    diff = [k for k in now if k not in free and saved.get(k) != now[k]]
    if diff:
        raise ChibiError(f"--resume: {sdir} was trained with " + ", ".join(
            f"{SCHEDULE_FLAGS[k]} {saved.get(k)} (this run: {now[k]})" for k in diff)
            + "; a resumed run continues the same schedule and batches, so pass the values it was trained with, "
              "or start a new --tag" + ("; with --minutes, --num-steps is the cap of the fitted step count"
                                        if "num_steps" in diff else ""))
    return saved


def _check_lora(sdir: Path, saved, now, layers: str | None = None) -> None:
    """Refuse a resume whose LoRA adapters would sit on another base checkpoint (another step directory, or the
    same one holding other weights: `base_sha256`), or whose LoRA settings differ from the saved ones: the saved
    adapters were trained on that base with those settings. Adapters saved before `base_sha256` was recorded
    are compared without it; targets are compared by the kinds they select in a model of `layers` (the model
    itself is compared before), so names of kinds the model lacks make no difference."""
    if isinstance(saved, dict) and isinstance(now, dict) and "base_sha256" not in saved:
        now = {k: v for k, v in now.items() if k != "base_sha256"}
    if isinstance(saved, dict) and isinstance(now, dict) and layers and isinstance(saved.get("targets"), list):
        from chibichat.model.lora import selected_kinds

        if selected_kinds(saved["targets"], layers) == selected_kinds(now.get("targets") or [], layers):
            now = {**now, "targets": saved["targets"]}
    if saved == now:
        return
    if not isinstance(saved, dict):
        raise ChibiError(f"--resume: {sdir} was trained without LoRA; resume it without --lora, or start a new --tag")
    if not isinstance(now, dict):
        raise ChibiError(f"--resume: {sdir} holds LoRA adapters (rank {saved.get('rank')}); resume it with the "
                         f"--lora flags it was trained with, or start a new --tag")
    diff = [k for k in LORA_FLAGS if saved.get(k) != now.get(k)]
    base = Path(str(saved.get("base")))
    where = f"--from/--from-tag/--from-step naming {base}"
    if not base.is_absolute() and len(base.parts) == 3:  # stage/tag/step_XXXXXX under home/checkpoints/
        m = STEP_RE.match(base.parts[2])
        if m:
            where = f"--from {base.parts[0]} --from-tag {base.parts[1]} --from-step {int(m.group(1))}"
    if not diff:  # the same base directory and settings: the base's weights were replaced since
        raise ChibiError(f"--resume: {sdir} holds LoRA adapters trained on {base}, whose weights have changed since "
                         f"(sha256 {str(saved.get('base_sha256'))[:12]} then, {str(now.get('base_sha256'))[:12]} "
                         "now: that base was trained again); the adapters only continue on the weights they were "
                         "trained on: restore that checkpoint, or start a new --tag")
    raise ChibiError(f"--resume: {sdir} holds LoRA adapters trained with " + ", ".join(
        f"{LORA_FLAGS[k]} {saved.get(k)} (this run: {now.get(k)})" for k in diff)
        + f"; the adapters only continue on the base and settings they were trained with: pass {where} and "
          "the same --lora flags, or start a new --tag")


def train(model, optimizer, batches, loss_fn: Callable, rt: Runtime, cfg: LoopConfig, *, meta: dict,
          train_model=None, count_fn: Callable | None = None, tokens_fn: Callable | None = None,
          eval_fn: Callable | None = None, sample_fn: Callable | None = None, lr_share_fn: Callable | None = None,
          clock: Callable[[], float] = time.perf_counter) -> LoopResult:
    """Run (or resume) the loop described in the module docstring. `model` is the plain module
    (checkpoints, callbacks); `train_model` an optional compiled wrapper used for the training forward;
    `clock` the seconds clock of step times and the --minutes budget (injectable for tests)."""
    count_fn = count_fn or count_targets
    train_model = train_model if train_model is not None else model
    raw = unwrap(model)
    wall0 = clock()

    if rt.is_master:
        recover_asides(cfg.tag_dir)  # a step a crash left aside while a save replaced it (common.atomic_directory)
    if rt.distributed:
        dist.barrier()  # every rank lists the steps after that
    existing = list_steps(cfg.tag_dir)
    if rt.is_master and cfg.tag_dir.is_dir():
        # Leftovers of a save or delete killed or failed midway (never visible as a step): safe to drop. A step
        # replaced by a save is renamed aside, then deleted as `.old-.aside-step_*` (common.remove_dir).
        for junk in [*cfg.tag_dir.glob(".tmp-step_*"), *cfg.tag_dir.glob(".old-step_*"),
                     *cfg.tag_dir.glob(".old-.aside-step_*")]:
            shutil.rmtree(junk, ignore_errors=True)
    if cfg.resume:
        state = _resume(raw, optimizer, batches, rt, cfg, meta)
    else:
        if existing and not cfg.overwrite:
            raise ChibiError(f"{cfg.tag_dir} already holds checkpoints (steps {existing}); pass --resume to "
                             f"continue that run, --overwrite to replace it, or choose another --tag")
        if existing and rt.is_master:
            for s in existing:
                remove_dir(step_dir(cfg.tag_dir, s))
        state = LoopState()
        if rt.distributed:
            # The stages seed torch's generator alike on every rank (the same model init and LoRA adapters), but
            # the draws of training forwards (--embed-noise, LoRA dropout) must differ between ranks, as they do
            # between one process's micro-batches: each rank goes on with a stream of its own (a seed drawn from
            # the shared one, plus the rank). A resume restores these per-rank states.
            torch.manual_seed(int(torch.randint(0, 2 ** 62, ())) + rt.rank)
    # The step count of this run: fixed, fitted earlier (resume), or fitted after the timed steps.
    num_steps = state.fit.get("num_steps", cfg.num_steps)
    fit_at = None
    if cfg.minutes is not None and not state.fit:
        fit_at = state.step + 1 + cfg.fit_after
        if fit_at >= cfg.num_steps:  # the cap comes before any fit could: nothing to fit
            fit_at = None
            state.fit = {"minutes": cfg.minutes, "num_steps": cfg.num_steps, "capped": True, "cap": cfg.num_steps,
                         "note": f"--num-steps {cfg.num_steps} ends the run before {cfg.fit_after} steps were timed"}
    if state.step > num_steps:
        what = f"the {num_steps} steps fitted to --minutes" if state.fit else f"--num-steps {num_steps}"
        raise ChibiError(f"the checkpoint is at step {state.step}, past {what}")
    if rt.is_master:  # summary.json marks a finished run; this one is not finished yet
        (cfg.tag_dir / "summary.json").unlink(missing_ok=True)
    metrics = _Metrics(rt, cfg, state.step if cfg.resume else None, meta)
    peak = peak_flops(rt, cfg.peak_flops)
    measured = bool(peak and not cfg.peak_flops and rt.device.type == "cpu")
    if measured:
        print0(rt, f"MFU is against a measured CPU matmul peak of {peak / 1e9:.0f} GFLOP/s "
              f"({str(rt.compute_dtype).replace('torch.', '')}, {torch.get_num_threads()} threads; "
              "--peak-tflops overrides)")
    resumed_at = state.step if cfg.resume else None
    last_ckpt = step_dir(cfg.tag_dir, state.step) if cfg.resume else None
    recent: list[float] = []  # recent step times for the ETA
    timed: list[float] = []   # --minutes: times of the timed steps
    timed_tokens = 0
    first_step = state.step
    model.train()
    try:
        step = state.step
        while True:
            last = step == num_steps
            # -- callbacks at "after `step` steps"; skipped at the step we resumed at (already done)
            if step != resumed_at:
                if eval_fn is not None and (last or step == 0 or (cfg.eval_every and step % cfg.eval_every == 0)):
                    model.eval()
                    t_eval = clock()
                    vals = {k: float(v) for k, v in eval_fn(raw, step).items()}
                    if step == 0:
                        state.eval_s = clock() - t_eval
                    model.train()
                    if vals:  # an eval_fn may have nothing to report at some steps
                        state.last_eval = vals
                        if "val_bpb" in vals:
                            state.min_val_bpb = min(vals["val_bpb"], state.min_val_bpb or float("inf"))
                        metrics.log({"step": step, **vals})
                        print0(rt, f"step {step:06d} | " + " | ".join(
                            f"{k} {v:,.0f}" if float(v).is_integer() else f"{k} {v:.4f}" for k, v in vals.items()))
                if sample_fn is not None and rt.is_master and step > 0 and (
                        last or (cfg.sample_every and step % cfg.sample_every == 0)):
                    model.eval()
                    texts = list(sample_fn(raw, step))
                    model.train()
                    metrics.samples(step, texts)
                    for t in texts:
                        print0(rt, f"  sample: {t!r}")
                if step > 0 and (last or (cfg.save_every and step % cfg.save_every == 0)):
                    last_ckpt = _save(raw, optimizer, batches, rt, cfg, meta, state)
            if last:
                break
            dt, loss, n_tokens = _train_step(train_model, optimizer, batches, loss_fn, count_fn, rt, cfg, step,
                                             num_steps, clock, lr_share_fn, tokens_fn, state.fit.get("decay_from"))
            state.step = step + 1
            state.tokens += n_tokens
            state.train_time_s += dt
            if step == first_step:
                # Python's cyclic GC pauses for hundreds of ms on big heaps; the objects alive after
                # the first step live for the whole run, so freeze them and collect by hand.
                gc.collect()
                gc.freeze()
                gc.disable()
            elif step % GC_EVERY == 0:
                gc.collect()
            if loss is None:  # skipped: no target tokens on any rank (cfg.skip_empty_steps)
                state.skipped_steps += 1
                metrics.log({"step": state.step, "skipped": True, "dt_s": dt, "elapsed_s": state.train_time_s,
                             "tokens": state.tokens})
                print0(rt, f"step {state.step:06d}/{num_steps:06d} | skipped: no target tokens in any "
                           f"micro-batch (no learning signal), weights and optimizer state unchanged")
            else:
                state.last_loss = loss
                # Step times for the ETA; the run's first step (compile, warm-up) is dropped once another exists.
                recent = [dt] if step <= first_step + 1 else (recent + [dt])[-20:]
                tok_s = n_tokens / dt
                mfu = cfg.flops_per_token * tok_s / (peak * rt.world_size) if peak and cfg.flops_per_token else None
                lrm = lr_multiplier(step, num_steps, cfg.warmup_steps, cfg.warmdown_frac, cfg.final_lr_frac,
                                    decay_from=state.fit.get("decay_from"))
                rec = {"step": state.step, "loss": loss, "lr": lrm, "tok_per_s": tok_s, "dt_s": dt,
                       "elapsed_s": state.train_time_s, "tokens": state.tokens}
                if mfu is not None:
                    rec["mfu"] = mfu
                metrics.log(rec)
            if measured and state.step % PEAK_EVERY == 0:
                again = measure_matmul_peak(rt.compute_dtype, rt.device, n=1024)
                if again > peak:
                    print0(rt, f"MFU from step {state.step + 1} is against a measured CPU matmul peak of "
                               f"{again / 1e9:.0f} GFLOP/s (was {peak / 1e9:.0f}: the CPU ran slower when measured "
                               "before)")
                    peak = again
            # A skipped step is timed too: it still fetched its batch (RL: sampled it), and the steps
            # still to come will be skipped at about the same rate.
            if fit_at is not None and step > first_step:
                timed.append(dt)
                timed_tokens += n_tokens
                if state.step == fit_at:
                    # Every rank fits from rank 0's timings (its evaluation included), so all take the
                    # same number of steps.
                    elapsed, state.eval_s = _broadcast0(rt, [clock() - wall0, state.eval_s])
                    times = _broadcast0(rt, timed)
                    before = state.fit
                    state.fit = fit_num_steps(cfg.minutes, elapsed, state.step, times, timed_tokens, state.eval_s,
                                              cfg.eval_every, cfg.num_steps, cfg.warmup_steps, cfg.warmdown_frac,
                                              cfg.final_lr_frac, ran_under=num_steps)
                    if before:  # a refit: keep what the fits before it chose
                        state.fit["earlier_fits"] = before.get("earlier_fits", []) + [
                            {k: before[k] for k in ("num_steps", "sec_per_step", "timed_steps", "fitted_at_step")}]
                    num_steps = state.fit["num_steps"]
                    if not before or before["num_steps"] != num_steps:  # a refit that changes nothing is not news
                        print0(rt, f"--minutes {cfg.minutes:g}: {state.fit['sec_per_step']:.3f} s/step "
                                   f"({state.fit['tok_per_s']:,.0f} tok/s) over {len(times)} timed steps -> "
                                   f"{num_steps} steps{' (the --num-steps cap)' if state.fit['capped'] else ''}"
                                   + (f" (refitted at step {state.step}; the fit before: {before['num_steps']})"
                                      if before else ""))
                    if "over_budget_s" in state.fit:
                        print0(rt, f"warning: {state.fit['note']}")
                    if "decay_from" in state.fit:
                        print0(rt, f"note: the LR was already falling (a warmdown of {cfg.warmdown_frac:g} starts "
                                   f"before the fit): steps {state.step + 1}-{num_steps} fall on from "
                                   f"{state.fit['decay_from'][1]:.3f} towards --final-lr-frac {cfg.final_lr_frac:g}")
                    # Fitted again every ~REFIT_FRAC of the run, from the steps since: the first timed steps
                    # can run slower than the rest (docs/benchmarks.md, 2026-12-03) and a machine's speed
                    # drifts during a run (session 31's quickstart fitted at a slow moment and ended 61 s
                    # under its budget). Only before the warmdown, where the schedule starts to depend on
                    # the count.
                    fit_at = state.step + max(cfg.fit_after, round(REFIT_FRAC * num_steps))
                    if fit_at >= num_steps - round(cfg.warmdown_frac * num_steps):
                        fit_at = None
                    timed, timed_tokens = [], 0
            if loss is not None and (state.step % cfg.log_every == 0 or state.step == num_steps):
                eta = sum(recent) / len(recent) * (num_steps - state.step)
                print0(rt, f"step {state.step:06d}/{num_steps:06d} ({100 * state.step / num_steps:5.1f}%) | "
                           f"loss {loss:.4f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {tok_s:,.0f} | "
                           f"mfu {'-' if mfu is None else f'{100 * mfu:.2f}%'} | "
                           f"elapsed {_fmt_time(state.train_time_s)} | eta {_fmt_time(eta)}")
            step += 1
    finally:
        gc.enable()
        gc.unfreeze()
        metrics.close()
    return LoopResult(steps=state.step, tokens=state.tokens, train_time_s=state.train_time_s,
                      wall_time_s=clock() - wall0, final_loss=state.last_loss,
                      final_eval=state.last_eval, min_val_bpb=state.min_val_bpb,
                      checkpoint=str(last_ckpt) if last_ckpt else None, skipped_steps=state.skipped_steps,
                      fit=dict(state.fit))


def release_free_heap() -> bool:
    """Return heap memory that glibc malloc keeps after frees to the OS (malloc_trim(0)); False, doing
    nothing, where the C library has no malloc_trim (macOS, musl).

    Why: glibc keeps freed chunks of its heap resident for reuse. In a CPU training step the freed
    activations leave tens of MB of such pages, which the next step's differently-sized tensors only
    partly reuse, so peak RSS sits well above the live tensors. Trimming between steps releases them;
    the pages that are reused are faulted back in, so it costs CPU time (figures in docs/benchmarks.md),
    hence opt-in."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def _train_step(model, optimizer, batches, loss_fn, count_fn, rt: Runtime, cfg: LoopConfig, step: int,
                num_steps: int, clock: Callable[[], float], lr_share_fn: Callable | None = None,
                tokens_fn: Callable | None = None, decay_from: list | None = None):
    """(seconds, mean loss or None when skipped, tokens trained) of one optimizer step."""
    _sync(rt)
    t0 = clock()
    try:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
    except StopIteration:
        raise ChibiError(f"the batch source ran out during step {step}; the run needs {num_steps} steps x "
                         f"{cfg.grad_accum} micro-batches per rank: lower --num-steps or loop the data") from None
    counts = [int(count_fn(b)) for b in micro]
    shares = [lr_share_fn(b) for b in micro] if lr_share_fn is not None else [(1.0, 1.0)]
    trained = sum(int(tokens_fn(b)) for b in micro) if tokens_fn is not None else sum(counts)
    total, trained, weight, out_of = _all_sum(rt, [float(sum(counts)), float(trained),
                                                   *map(float, map(sum, zip(*shares)))])
    total, trained = int(total), int(trained)
    if not out_of > 0 or not 0 <= weight <= out_of:
        raise ChibiError(f"step {step}: lr_share_fn gave a share of {weight} out of {out_of}; it must lie in [0, 1]")
    lrm = lr_multiplier(step, num_steps, cfg.warmup_steps, cfg.warmdown_frac, cfg.final_lr_frac,
                        decay_from=decay_from)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * lrm * (weight / out_of)
    set_muon_momentum(optimizer, muon_momentum(step, warmup_steps=cfg.momentum_warmup_steps))
    if total <= 0:
        if cfg.skip_empty_steps:  # the same decision on every rank: `total` is global
            _sync(rt)
            return clock() - t0, None, 0
        raise ChibiError(f"step {step}: the step's micro-batches hold no target tokens (all -1); the data "
                         f"source yields nothing to train on")
    loss_acc = torch.zeros((), dtype=torch.float32, device=rt.device)
    no_sync = getattr(optimizer, "no_sync", contextlib.nullcontext)
    for i, (b, expected) in enumerate(zip(micro, counts)):
        b = _to_device(b, rt.device)
        # Only the last micro-step's backward launches the gradient all-reduce (overlapped with it).
        with no_sync() if i < len(micro) - 1 else contextlib.nullcontext():
            loss_sum, n = loss_fn(model, b)
            if int(n) != expected:
                raise ChibiError(f"loss_fn covered {int(n)} target tokens but the micro-batch holds {expected}: "
                                 f"the loss mask and count_fn disagree")
            (loss_sum / total).backward()
        loss_acc += loss_sum.detach().float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cfg.trim_heap:
        release_free_heap()
    (loss_total,) = _all_sum(rt, [loss_acc.item()])
    _sync(rt)
    return clock() - t0, loss_total / total, trained


def _save(model, optimizer, batches, rt: Runtime, cfg: LoopConfig, meta: dict, state: LoopState) -> Path:
    # Collectives first (every rank), then rank 0 writes the whole directory.
    loaders = gather_objects(rt, batches.state_dict())
    rngs = gather_objects(rt, _rng_state(rt))
    full = {**meta, "loader": loaders, "loop": asdict(state), "rng": rngs, "schedule": _schedule(cfg),
            "precision": _precision(rt, model)}
    path = save_checkpoint(cfg.tag_dir, state.step, model, optimizer, full, rt=rt, keep_last=cfg.keep_last)
    if rt.distributed:
        dist.barrier()  # nobody races ahead (and maybe dies) before the checkpoint exists
    print0(rt, f"saved {path}")
    return path
