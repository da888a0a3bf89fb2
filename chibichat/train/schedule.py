"""The learning-rate schedule: linear warmup, constant, linear warmdown to a final fraction.

One definition of "step" everywhere in chibichat: an *optimizer* step (all micro-batches of one
total batch), counted from 0. `step` here is the index of the step about to be taken, so a run of
`total_steps` steps calls this with 0 .. total_steps-1. Asking for a step outside that range is a
bug in the caller (nanochat PR #775 counted micro-batches and drove the LR negative), so it raises
rather than clamps.
"""

from __future__ import annotations


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, warmdown_frac: float,
                  final_frac: float, decay_from: tuple[int, float] | None = None) -> float:
    """Multiplier in [0, 1] applied to every group's initial LR.

    warmup:   steps 0..warmup-1 ramp (step+1)/warmup, so the first step already moves;
    constant: 1.0;
    warmdown: the last round(warmdown_frac*total) steps fall linearly towards final_frac, reaching
              final_frac + (1-final_frac)/W on the last step (the step "after the end" would be
              exactly final_frac).
    decay_from (a, m): from step a on the multiplier falls linearly from m (the step before a's) towards
              final_frac over the steps left, by the same rule: a step count fitted to a time budget after
              the LR had started to fall under another count (see train.loop, --minutes).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside the schedule of {total_steps} optimizer steps")
    if not 0.0 <= warmdown_frac <= 1.0:
        raise ValueError(f"warmdown_frac must be in [0, 1], got {warmdown_frac}")
    if not 0.0 <= final_frac <= 1.0:
        raise ValueError(f"final_frac must be in [0, 1], got {final_frac}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if decay_from is not None and step >= decay_from[0]:
        a, m = decay_from
        if not final_frac <= m <= 1.0:
            raise ValueError(f"decay_from's multiplier must lie in [final_frac, 1], got {m}")
        return final_frac + (m - final_frac) * (total_steps - step) / (total_steps - a + 1)
    warmdown_steps = round(warmdown_frac * total_steps)
    if step < warmup_steps:
        mult = (step + 1) / warmup_steps
    elif step >= total_steps - warmdown_steps:
        remaining = (total_steps - step) / warmdown_steps  # in (0, 1]
        mult = final_frac + (1.0 - final_frac) * remaining
    else:
        mult = 1.0
    # Warmup and warmdown may overlap in a very short run: the smaller multiplier wins.
    if step < warmup_steps and step >= total_steps - warmdown_steps:
        mult = min((step + 1) / warmup_steps, final_frac + (1.0 - final_frac) * (total_steps - step) / warmdown_steps)
    assert 0.0 <= mult <= 1.0, mult
    return mult


def add_budget_args(p) -> None:
    """--minutes / --fit-steps of every training stage (LoopConfig.minutes / fit_after)."""
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of the training loop: time the first steps, then fit the step count (at "
                        "most --num-steps) and its LR schedule so the stage ends within this many minutes")
    p.add_argument("--fit-steps", type=int, default=5,
                   help="with --minutes: steps timed (after the untimed first one) before fitting (default: 5)")
