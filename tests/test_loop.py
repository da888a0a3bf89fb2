"""The shared training loop on a tiny real GPT and a toy batch source."""

import json
import re

import pytest
import torch

from chibichat.common import ChibiError, Runtime
from chibichat.model.gpt import GPT, GPTConfig
from chibichat.train.checkpoint import list_steps, read_meta
from chibichat.train.loop import LoopConfig, train
from chibichat.train.optim import build_optimizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than two, and far faster when the 2 cores are shared
    (OpenMP workers spin-wait for a core). Restored after each test."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


V, T = 48, 16


class ToySource:
    """Deterministic micro-batches: batch k of rank r is drawn from seed (k * world + r), so a 2-rank
    run sees the same batches as a 1-rank run with 2 micro-steps. Learnable: each row starts at a
    random token and follows a fixed permutation (a bigram table to learn). `holes` masks a varying
    number of targets (-1) per batch."""

    def __init__(self, batch_size=2, rank=0, world=1, holes=False):
        self.b, self.rank, self.world, self.holes = batch_size, rank, world, holes
        self.k = 0

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(1000 + self.k * self.world + self.rank)
        self.k += 1
        perm = torch.randperm(V, generator=torch.Generator().manual_seed(7))
        cols = [torch.randint(0, V, (self.b,), generator=g)]
        for _ in range(T):
            cols.append(perm[cols[-1]])
        rows = torch.stack(cols, 1)
        x, y = rows[:, :-1].clone(), rows[:, 1:].clone()
        if self.holes:
            n = int(torch.randint(1, T, (1,), generator=g))
            y[0, :n] = -1
        return x, y

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, d):
        self.k = d["k"]


def loss_fn(model, batch):
    x, y = batch
    return model(x, y, reduction="sum"), int((y >= 0).sum())


def make(seed=0, layers="dense", run=None):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, seq_len=T, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, layers=layers), run)
    opt = build_optimizer(model.param_groups(), matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.02,
                          other_lr=0.02, compute_dtype=torch.float32)
    return model, opt


def cpu_rt(rank=0, world=1):
    return Runtime(device=torch.device("cpu"), compute_dtype=torch.float32, rank=rank, local_rank=rank,
                   world_size=world)


def meta_for(model):
    return {"model_config": model.config.to_dict(), "tokenizer": {"hash": "toy", "vocab_size": V}}


def val_loss_fn(source_seed=99):
    def fn(model, step):
        g = torch.Generator().manual_seed(source_seed)
        src = ToySource(batch_size=4)
        src.k = 10_000
        x, y = next(src)
        with torch.no_grad():
            return {"val_loss": float(model(x, y))}
    return fn


def run(tag_dir, steps, accum=1, batch=2, resume=False, save_every=0, holes=False, **kw):
    model, opt = make()
    src = ToySource(batch_size=batch, holes=holes)
    cfg = LoopConfig(tag_dir=tag_dir, num_steps=steps, grad_accum=accum, save_every=save_every,
                     resume=resume, keep_last=0, momentum_warmup_steps=5, **kw)
    res = train(model, opt, src, loss_fn, cpu_rt(), cfg, meta=meta_for(model), eval_fn=val_loss_fn(),
                sample_fn=lambda m, s: [f"sample at {s}"])
    return model, res


def test_loss_falls_and_files_are_written(tmp_path, capsys):
    model, res = run(tmp_path / "t", 20, eval_every=10, warmdown_frac=0.3)
    recs = [json.loads(l) for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, 21))
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert all(r["tok_per_s"] > 0 and 0 <= r["lr"] <= 1 for r in train_recs)
    assert train_recs[-1]["tokens"] == 20 * 2 * T == res.tokens
    assert list_steps(tmp_path / "t") == [20] and res.checkpoint.endswith("step_000020")
    assert res.final_eval == {"val_loss": evals[-1]["val_loss"]}
    samples = [json.loads(l) for l in (tmp_path / "t" / "samples.jsonl").read_text().splitlines()]
    assert samples == [{"step": 20, "samples": ["sample at 20"]}]
    out = capsys.readouterr().out
    assert "step 000020/000020" in out and "eta" in out and "tok/s" in out


def test_grad_accumulation_is_per_token_not_per_microbatch(tmp_path):
    # One micro-batch of 4 rows == two micro-batches of 2 rows, even though the micro-batches hold
    # different numbers of target tokens (holes): the loss is divided by the step's token total.
    class Joined(ToySource):
        def __next__(self):
            a, b = ToySource.__next__(self), ToySource.__next__(self)
            return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])

    m1, o1 = make()
    m2, o2 = make()
    cfg = dict(num_steps=4, keep_last=0, momentum_warmup_steps=2)
    train(m1, o1, ToySource(2, holes=True), loss_fn, cpu_rt(), LoopConfig(tmp_path / "a", grad_accum=2, **cfg),
          meta=meta_for(m1))
    train(m2, o2, Joined(2, holes=True), loss_fn, cpu_rt(), LoopConfig(tmp_path / "b", grad_accum=1, **cfg),
          meta=meta_for(m2))
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=n)
    a = [json.loads(l)["loss"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l)["loss"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert a == pytest.approx(b, rel=1e-5)


def test_resume_in_process_is_exact(tmp_path):
    full, _ = run(tmp_path / "full", 8, save_every=4)
    # Interrupted run: the same 8-step plan, stopped right after the step-4 checkpoint.
    model, opt = make()
    src = ToySource()
    cfg = LoopConfig(tag_dir=tmp_path / "part", num_steps=8, save_every=4, keep_last=0, momentum_warmup_steps=5)

    class Stop(Exception):
        pass

    calls = {"n": 0}

    def stopping_loss(m, b):
        calls["n"] += 1
        if calls["n"] > 5:  # dies during step 5, after step_000004 was written
            raise Stop
        return loss_fn(m, b)

    with pytest.raises(Stop):
        train(model, opt, src, stopping_loss, cpu_rt(), cfg, meta=meta_for(model), eval_fn=val_loss_fn())
    assert list_steps(tmp_path / "part") == [4]
    (tmp_path / "part" / ".tmp-step_000006-abc").mkdir()  # as if a save had been killed midway
    # as if a save over step 4 had been killed between its two renames: the step is only aside
    (tmp_path / "part" / "step_000004").rename(tmp_path / "part" / ".aside-step_000004-123")
    resumed, res = run(tmp_path / "part", 8, save_every=4, resume=True)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert res.steps == 8
    assert not list((tmp_path / "part").glob(".tmp-*")) and not list((tmp_path / "part").glob(".aside-*"))
    # metrics.jsonl reads as one run: no duplicate steps, same losses as the uninterrupted run.
    def losses(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    meta = read_meta(tmp_path / "part" / "step_000008")
    assert meta["loader"] == [{"k": 8}] and meta["loop"]["step"] == 8


def test_the_next_run_drops_what_a_failed_delete_of_a_replaced_step_left(tmp_path, monkeypatch, refuse_old_deletes):
    """A save over an existing step renames the old one aside, then deletes it as `.old-.aside-step_*`
    (common.remove_dir); a delete that fails there (the save stands) leaves that folder, which the next run
    drops like any other leftover of a save."""
    import os

    from chibichat.train.checkpoint import save_checkpoint

    tag = tmp_path / "t"
    run(tag, 2)
    refuse_old_deletes()
    model, _ = make()
    save_checkpoint(tag, 2, model, None, meta_for(model))  # replaces step 2
    monkeypatch.undo()
    pid = os.getpid()
    assert sorted(p.name for p in tag.iterdir() if p.name.startswith(".")) == [f".old-.aside-step_000002-{pid}-{pid}"]
    run(tag, 2, overwrite=True)
    assert sorted(p.name for p in tag.iterdir() if p.name.startswith(".")) == []


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    run(tmp_path / "t", 2)
    with pytest.raises(ChibiError, match="--resume to continue"):
        run(tmp_path / "t", 2)
    run(tmp_path / "t", 3, overwrite=True)
    assert list_steps(tmp_path / "t") == [3]
    with pytest.raises(ChibiError, match="no checkpoint"):
        run(tmp_path / "empty", 2, resume=True)


def test_resume_with_other_model_config_is_refused(tmp_path):
    run(tmp_path / "t", 2)
    model, opt = make(layers="ASA"[:2] if False else "SA")
    cfg = LoopConfig(tag_dir=tmp_path / "t", num_steps=4, resume=True)
    with pytest.raises(ChibiError, match="different"):
        train(model, opt, ToySource(), loss_fn, cpu_rt(), cfg, meta=meta_for(model))


def test_loss_fn_count_mismatch_is_caught(tmp_path):
    model, opt = make()
    bad = lambda m, b: (m(b[0], b[1], reduction="sum"), b[1].numel() - 1)  # noqa: E731
    with pytest.raises(ChibiError, match="disagree"):
        train(model, opt, ToySource(), bad, cpu_rt(), LoopConfig(tmp_path / "t", num_steps=1), meta=meta_for(model))


def test_bad_loop_config():
    # the messages name the flags (they named the dataclass fields: "warmdown_frac must be ...")
    with pytest.raises(ChibiError, match=r"^--num-steps must be >= 1, got 0$"):
        LoopConfig("x", num_steps=0)
    with pytest.raises(ChibiError, match="exceed"):
        LoopConfig("x", num_steps=10, warmup_steps=5, warmdown_frac=0.6)
    with pytest.raises(ChibiError, match=r"^--warmdown-frac must be in \[0, 1\], got 1.5$"):
        LoopConfig("x", num_steps=10, warmdown_frac=1.5)
    with pytest.raises(ChibiError, match=r"^--momentum-warmup-steps must be >= 0, got -1$"):
        LoopConfig("x", num_steps=10, momentum_warmup_steps=-1)
    with pytest.raises(ChibiError, match="one of them"):
        LoopConfig("x", num_steps=10, resume=True, overwrite=True)


def test_wandb_only_when_asked(tmp_path, monkeypatch):
    import sys
    import types

    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or fake_run,
    )
    fake_run = types.SimpleNamespace(log=lambda rec, step: calls.append(("log", step, rec)),
                                     finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(tmp_path / "a", 2)
    assert calls == []  # not asked: never touched
    run(tmp_path / "b", 2, wandb_project="proj", run_name="r")
    assert calls[0][0] == "init" and calls[0][1]["project"] == "proj" and calls[0][1]["name"] == "r"
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged] == [0, 1, 2, 2] and "loss" in logged[1][2] and "val_loss" in logged[0][2]
    assert calls[-1] == ("finish",)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ChibiError, match="pip install"):
        run(tmp_path / "c", 2, wandb_project="proj")


def test_exhausted_batch_source_is_a_clear_error(tmp_path):
    class Finite(ToySource):
        def __next__(self):
            if self.k >= 3:
                raise StopIteration
            return super().__next__()

    model, opt = make()
    with pytest.raises(ChibiError, match="ran out during step 1"):
        train(model, opt, Finite(), loss_fn, cpu_rt(), LoopConfig(tmp_path / "t", num_steps=5, grad_accum=2),
              meta=meta_for(model))


def test_resuming_a_finished_run_is_a_no_op(tmp_path):
    done, res1 = run(tmp_path / "t", 3)
    again, res2 = run(tmp_path / "t", 3, resume=True)
    for a, b in zip(done.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert res2.steps == 3 and res2.checkpoint == res1.checkpoint and res2.final_eval == res1.final_eval
    with pytest.raises(ChibiError, match="past --num-steps"):
        run(tmp_path / "t", 2, resume=True)


def test_resume_applies_this_runs_learning_rates(tmp_path, capsys):
    from safetensors.torch import load_file

    run(tmp_path / "t", 4, save_every=2, warmdown_frac=0.0)
    import shutil

    shutil.rmtree(tmp_path / "t" / "step_000004")  # resume from step 2
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, seq_len=T, n_layer=2, n_embd=32, n_head=2, n_kv_head=2))
    frozen = build_optimizer(model.param_groups(), matrix_lr=0.0, embedding_lr=0.0, unembedding_lr=0.0,
                             other_lr=0.0, compute_dtype=torch.float32)
    cfg = LoopConfig(tag_dir=tmp_path / "t", num_steps=4, resume=True, keep_last=0, warmdown_frac=0.0,
                     momentum_warmup_steps=5)
    train(model, frozen, ToySource(), loss_fn, cpu_rt(), cfg, meta=meta_for(model))
    assert "lr 0.02 -> 0.0" in capsys.readouterr().out
    saved = load_file(tmp_path / "t" / "step_000002" / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k  # LR 0 after the resume: nothing moved


def test_trim_heap_runs_once_per_step_and_changes_nothing(tmp_path, monkeypatch):
    import platform

    import chibichat.train.loop as loop_mod

    assert loop_mod.release_free_heap() is (platform.libc_ver()[0] == "glibc")  # False = a no-op elsewhere
    calls = []
    monkeypatch.setattr(loop_mod, "release_free_heap", lambda: calls.append(1) or True)
    trimmed, _ = run(tmp_path / "a", 3, trim_heap=True)
    assert len(calls) == 3
    plain, _ = run(tmp_path / "b", 3)
    assert len(calls) == 3
    for (n, a), b in zip(trimmed.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), n


def test_cpu_mfu_is_against_a_measured_peak_or_the_given_one(tmp_path, capsys):
    _, _ = run(tmp_path / "m", 3, flops_per_token=1e6)
    recs = [r for r in map(json.loads, (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(recs) == 3
    out = capsys.readouterr().out
    m = re.search(r"measured CPU matmul peak of (\d+) GFLOP/s \(float32", out)
    assert m and int(m.group(1)) > 0
    for r in recs:
        # MFU = achieved / measured peak; the rounded peak printed reproduces it to the rounding
        assert r["mfu"] == pytest.approx(1e6 * r["tok_per_s"] / (int(m.group(1)) * 1e9), rel=0.02)
    _, _ = run(tmp_path / "g", 2, flops_per_token=1e6, peak_flops=1e9)
    recs = [r for r in map(json.loads, (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert "measured CPU matmul peak" not in capsys.readouterr().out
    assert len(recs) == 2 and all(r["mfu"] == pytest.approx(1e6 * r["tok_per_s"] / 1e9, rel=1e-2) for r in recs)


def test_cpu_peak_is_measured_again_and_the_highest_is_quoted(tmp_path, monkeypatch, capsys):
    """A CPU that ran slow when its peak was first measured gets the higher peak measured later (never a lower
    one), so MFU does not pass 100% after a slow start; measuring leaves the global random state alone."""
    import chibichat.train.loop as loop_mod

    state = torch.get_rng_state()
    loop_mod.measure_matmul_peak(torch.float32, torch.device("cpu"), n=64, repeats=1)
    assert torch.equal(state, torch.get_rng_state())
    peaks = iter([1e9, 4e9, 2e9])
    monkeypatch.setattr(loop_mod, "measure_matmul_peak", lambda *a, **k: next(peaks))
    monkeypatch.setattr(loop_mod, "PEAK_EVERY", 2)
    _, _ = run(tmp_path / "m", 5, flops_per_token=1e6)
    recs = [r for r in map(json.loads, (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    against = [1e6 * r["tok_per_s"] / r["mfu"] for r in recs]
    assert against == pytest.approx([1e9, 1e9, 4e9, 4e9, 4e9])  # measured after steps 2 and 4: 4e9, then 2e9 (kept 4e9)
    out = capsys.readouterr().out
    assert "MFU from step 3 is against a measured CPU matmul peak of 4 GFLOP/s (was 1: the CPU ran slower when " \
           "measured before)" in out
    assert out.count("MFU from step") == 1


class FakeClock:
    """Seconds that advance only when told: every training forward costs `step_s` (the run's first one
    `first_s`, as compilation would) and every evaluation `eval_s`, so --minutes fits are exact."""

    def __init__(self, first_s=3.0, step_s=0.5, eval_s=2.0):
        self.t, self.first_s, self.step_s, self.eval_s, self.calls = 0.0, first_s, step_s, eval_s, 0

    def __call__(self):
        return self.t

    def loss(self, stop_after=None):
        def fn(m, b):
            self.calls += 1
            if stop_after is not None and self.calls > stop_after:
                raise KeyboardInterrupt
            self.t += self.first_s if self.calls == 1 else self.step_s
            return loss_fn(m, b)
        return fn

    def evaluate(self, model, step):
        self.t += self.eval_s
        return val_loss_fn()(model, step)


def budget_run(tag_dir, clock, minutes=0.25, cap=100, stop_after=None, src=None, **kw):
    model, opt = make()
    cfg = LoopConfig(tag_dir=tag_dir, num_steps=cap, keep_last=0, momentum_warmup_steps=5, minutes=minutes,
                     fit_after=4, **{"warmdown_frac": 0.2, **kw})
    res = train(model, opt, src or ToySource(), clock.loss(stop_after), cpu_rt(), cfg, meta=meta_for(model),
                eval_fn=clock.evaluate, clock=clock)
    return model, res


def test_minutes_fits_the_step_count_and_schedule_to_the_measured_throughput(tmp_path, capsys):
    from chibichat.train.schedule import lr_multiplier

    clock = FakeClock()
    _, res = budget_run(tmp_path / "b", clock)
    # 2 s step-0 eval + 3 s untimed first step + 4 timed steps of 0.5 s: fitted after 5 steps at 7 s.
    # 15 s budget - 7 s - 2 s for the final eval = 6 s = 12 more steps of 0.5 s -> 17 steps. Fitted again
    # every 4 steps (max(fit_after, 10% of 17)) until the warmdown (from step 14): at step 9 (9 s), 15 - 9 - 2
    # = 4 s = 8 more steps, and at step 13 (11 s), 2 s = 4 more steps -> 17 each time.
    earlier = [{"num_steps": 17, "sec_per_step": 0.5, "timed_steps": 4, "fitted_at_step": s} for s in (5, 9)]
    assert res.fit == {"minutes": 0.25, "num_steps": 17, "capped": False, "cap": 100, "sec_per_step": 0.5,
                       "tok_per_s": 64.0, "timed_steps": 4, "eval_s": 2.0, "fitted_after_s": 11.0,
                       "fitted_at_step": 13, "earlier_fits": earlier}
    assert res.steps == 17
    assert res.wall_time_s == 15.0  # the run ends exactly on budget
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs == [lr_multiplier(s, 17, 0, 0.2, 0.0) for s in range(17)]  # the 17-step schedule throughout
    out = capsys.readouterr().out
    assert "--minutes 0.25: 0.500 s/step (64 tok/s) over 4 timed steps -> 17 steps\n" in out
    assert out.count("--minutes 0.25:") == 1  # the refits at steps 9 and 13 changed nothing: not printed
    assert read_meta(tmp_path / "b" / "step_000017")["loop"]["fit"]["num_steps"] == 17


class SlowStartClock(FakeClock):
    """The first `slow` training forwards after the first one take `slow_s`, the rest `step_s`."""

    def __init__(self, slow=4, slow_s=1.0, **kw):
        super().__init__(**kw)
        self.slow, self.slow_s = slow, slow_s

    def loss(self, stop_after=None):
        inner = super().loss(stop_after)

        def fn(m, b):
            out = inner(m, b)
            if 1 < self.calls <= 1 + self.slow:
                self.t += self.slow_s - self.step_s
            return out
        return fn


@pytest.mark.parametrize("slow, earlier, last, refit_line", [
    # Steps 2-5 at 1 s, the rest at 0.5 s: the first fit (step 5, 9 s spent) gives 5 + (30 - 9 - 2) / 1 = 24 steps,
    # which would end at 20.5 s; the second (step 9, 11 s spent, from steps 6-9) gives 9 + (30 - 11 - 2) / 0.5 = 43,
    # which ends on the budget; the fits every 4 steps after it, up to the last before the warmdown (step 33, 23 s
    # spent), keep 43.
    (4, [(5, 24)] + [(s, 43) for s in range(9, 30, 4)], (33, 43, 23.0), "-> 43 steps (refitted at step 9; the fit "
                                                                         "before: 24)"),
    # A machine that speeds up later (other work on its cores ended): steps 2-12 at 1 s. Fits at steps 5 and 9
    # give 24 steps; a run that stopped fitting there ended at 24 s, 6 s under its budget. The fit at step 13
    # (steps 10-13: 0.875 s, 16.5 s spent) gives 13 + 11.5 // 0.875 = 26, the one at step 17 (0.5 s, 18.5 s spent)
    # 17 + 9.5 / 0.5 = 36, and so do those at 21 and 25; the next (29) would be in the 36-step run's warmdown.
    # 36 steps end on the budget: 22.5 s at step 25 + 11 x 0.5 s + the final 2 s evaluation.
    (11, [(5, 24), (9, 24), (13, 26), (17, 36), (21, 36)], (25, 36, 22.5), "-> 36 steps (refitted at step 17; the "
                                                                          "fit before: 26)"),
])
def test_minutes_refits_until_the_warmdown_as_the_speed_changes(tmp_path, capsys, slow, earlier, last, refit_line):
    """The first `slow` timed steps at 1 s, the rest at 0.5 s, a 30 s budget: the count is fitted again every
    4 steps (max(fit_after, 10% of the count)) until the warmdown, and ends the run on its budget."""
    from chibichat.train.schedule import lr_multiplier

    _, res = budget_run(tmp_path / "s", SlowStartClock(slow=slow), minutes=0.5)
    assert [(f["fitted_at_step"], f["num_steps"]) for f in res.fit["earlier_fits"]] == earlier
    assert (res.fit["fitted_at_step"], res.fit["num_steps"], res.fit["fitted_after_s"]) == last
    assert res.steps == last[1] and res.wall_time_s == 30.0
    rows = [json.loads(l) for l in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    # every count's schedule is 1.0 before the earliest warmdown, so the steps follow the last count's schedule
    assert [r["lr"] for r in rows if "lr" in r] == [lr_multiplier(s, last[1], 0, 0.2, 0.0) for s in range(last[1])]
    assert refit_line in capsys.readouterr().out


def test_minutes_with_a_warmdown_that_starts_before_the_fit_keeps_the_budget(tmp_path, capsys):
    """--warmdown-frac 1.0 (nanochat's SFT and RL): the LR falls from the first step, so no count keeps the
    steps taken on its own schedule. The fit at step 5 (7 s spent) gives 5 + (15 - 7 - 2) / 0.5 = 17 steps as
    ever; steps 0-4 fell under the 100-step cap's schedule (to 0.96 at step 4), steps 5-16 fall on from there to
    0 over the 12 left. The old rule ran all 100 steps, 41.5 s over the 15 s budget."""
    from chibichat.train.schedule import lr_multiplier

    full, res = budget_run(tmp_path / "w", FakeClock(), warmdown_frac=1.0)
    assert res.steps == 17 and res.wall_time_s == 15.0 and "over_budget_s" not in res.fit
    assert res.fit["decay_from"] == [5, 0.96]
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs[:5] == [lr_multiplier(s, 100, 0, 1.0, 0.0) for s in range(5)]
    assert lrs[5:] == pytest.approx([0.96 * (17 - s) / 13 for s in range(5, 17)])
    assert "note: the LR was already falling (a warmdown of 1 starts before the fit): steps 6-17 fall on from " \
           "0.960 towards --final-lr-frac 0" in capsys.readouterr().out
    # a resume after the fit keeps the count and the decay: the same weights as the uninterrupted run
    with pytest.raises(KeyboardInterrupt):
        budget_run(tmp_path / "p", FakeClock(), warmdown_frac=1.0, save_every=10, stop_after=12)
    resumed, res = budget_run(tmp_path / "p", FakeClock(first_s=30.0, step_s=5.0), warmdown_frac=1.0, save_every=10,
                              resume=True)
    assert res.steps == 17 and res.fit["decay_from"] == [5, 0.96]
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_lr_multiplier_decay_from_continues_the_fall():
    from chibichat.train.schedule import lr_multiplier

    # from step 5 at 0.96 (the multiplier of step 4) to 0.1 over steps 5-16: the step "after the end" is exactly 0.1
    got = [lr_multiplier(s, 17, 0, 1.0, 0.1, decay_from=(5, 0.96)) for s in range(5, 17)]
    assert got == pytest.approx([0.1 + 0.86 * (17 - s) / 13 for s in range(5, 17)])
    assert got[0] < 0.96 and got == sorted(got, reverse=True)
    assert lr_multiplier(3, 17, 0, 1.0, 0.1, decay_from=(5, 0.96)) == lr_multiplier(3, 17, 0, 1.0, 0.1)  # before it
    with pytest.raises(ValueError, match="decay_from's multiplier must lie in"):
        lr_multiplier(6, 17, 0, 1.0, 0.1, decay_from=(5, 0.05))


def test_minutes_resume_keeps_the_fitted_count(tmp_path):
    full, _ = budget_run(tmp_path / "full", FakeClock())
    with pytest.raises(KeyboardInterrupt):
        budget_run(tmp_path / "part", FakeClock(), save_every=10, stop_after=12)  # dies in step 12
    assert list_steps(tmp_path / "part") == [10]
    # The resumed process runs on a 10x slower clock: a new fit would choose fewer steps; it must not refit.
    resumed, res = budget_run(tmp_path / "part", FakeClock(first_s=30.0, step_s=5.0), save_every=10, resume=True)
    assert res.steps == 17 and res.fit["num_steps"] == 17 and res.fit["sec_per_step"] == 0.5
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_minutes_resumed_before_the_fit_still_costs_the_evaluations(tmp_path):
    """A process resumed before the fit skips the evaluation at its first step, so it fits with the step-0
    evaluation's 2 s from the loop state: resumed at step 2, first step 3 s, steps 3-6 timed at 0.5 s: fitted
    at step 7 (5 s) to 7 + (15 - 5 - 2) / 0.5 = 23 steps, ending on the budget with the final evaluation (an
    evaluation costed at 0 s gave 27 steps and 17 s)."""
    with pytest.raises(KeyboardInterrupt):
        budget_run(tmp_path / "r", FakeClock(), save_every=2, stop_after=3)  # dies in step 3
    assert list_steps(tmp_path / "r") == [2] and read_meta(tmp_path / "r" / "step_000002")["loop"]["eval_s"] == 2.0
    _, res = budget_run(tmp_path / "r", FakeClock(), save_every=2, resume=True)
    assert (res.steps, res.fit["num_steps"], res.fit["eval_s"], res.wall_time_s) == (23, 23, 2.0, 15.0)


class EmptyAt(ToySource):
    """ToySource whose micro-batches `empty` hold no targets (RL: every group flat); fetching one takes
    `fetch_s` on the clock (RL samples it), the time a trained step takes in FakeClock."""

    def __init__(self, clock, empty, fetch_s=0.5):
        super().__init__()
        self.clock, self.empty, self.fetch_s = clock, set(empty), fetch_s

    def __next__(self):
        k = self.k
        x, y = super().__next__()
        if k in self.empty:
            self.clock.t += self.fetch_s
            y = torch.full_like(y, -1)
        return x, y


def test_minutes_fits_even_when_the_step_reaching_the_fit_is_skipped(tmp_path):
    """Step 5 (batch 4) is skipped: the fit after it still happens at step 5, with the skipped step's time
    (0.5 s on the injected clock) among the timed ones: as in the plain run, 17 steps."""
    clock = FakeClock()
    _, res = budget_run(tmp_path / "k", clock, src=EmptyAt(clock, {4}), skip_empty_steps=True)
    assert res.skipped_steps == 1 and res.steps == 17 and res.wall_time_s == 15.0
    assert res.fit["earlier_fits"][0] == {"num_steps": 17, "sec_per_step": 0.5, "timed_steps": 4, "fitted_at_step": 5}
    assert (res.fit["num_steps"], res.fit["sec_per_step"], res.fit["fitted_after_s"]) == (17, 0.5, 11.0)
    rows = [json.loads(l) for l in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    # the skipped step's time comes from the loop's clock: 0.5 s, after 4 trained steps (3 s + 3 x 0.5 s)
    assert [r for r in rows if r.get("skipped")] == [{"step": 5, "skipped": True, "dt_s": 0.5, "elapsed_s": 5.0,
                                                      "tokens": 4 * 2 * T}]


def test_minutes_capped_by_num_steps_and_too_short_budgets(tmp_path):
    _, res = budget_run(tmp_path / "cap", FakeClock(), minutes=10, cap=12)
    assert res.steps == 12 and res.fit["capped"] is True and res.fit["num_steps"] == 12
    _, res = budget_run(tmp_path / "tiny", FakeClock(), minutes=10, cap=4)  # the cap ends it before any fit
    assert res.steps == 4 and res.fit["num_steps"] == 4 and "ends the run before 4 steps were timed" in res.fit["note"]
    # too short: the fewest steps that keep the 5 taken before the warmdown, and by how much it overruns
    _, res = budget_run(tmp_path / "short", FakeClock(), minutes=0.1)
    assert res.steps == res.fit["num_steps"] == 6 and res.fit["over_budget_s"] > 0, res.fit
    assert res.fit["note"].startswith("--minutes 0.1 is too short: after 5 steps (7 s, 0.500 s per step) it leaves "
                                      "room for 5 steps in all") and "running 6 steps, ~" in res.fit["note"]
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ChibiError, match="--minutes must be a positive number"):
            LoopConfig(tag_dir=tmp_path, num_steps=10, minutes=bad)


def test_fit_num_steps_costs_periodic_evaluations():
    from chibichat.train.loop import fit_num_steps

    # 30 s budget, 7 s spent after 5 steps, 0.5 s/step + a 2 s eval every 8 steps (0.25 s/step amortised),
    # 2 s kept for the final eval: (30 - 7 - 2) / 0.75 = 28 more steps.
    fit = fit_num_steps(0.5, 7.0, 5, [0.5] * 4, 128, 2.0, 8, 1000, 0, 0.2)
    assert fit["num_steps"] == 33 and fit["tok_per_s"] == 64.0
    assert fit_num_steps(0.5, 7.0, 5, [0.5] * 4, 128, 2.0, 0, 1000, 0, 0.2)["num_steps"] == 47
    # warmup steps must also fit before the warmdown of the fitted count
    # (here 47 - 9 = 38 < 40: the fewest that keep them, 50 = 40 + a 10-step warmdown, 3 steps over)
    fit = fit_num_steps(0.5, 7.0, 5, [0.5] * 4, 128, 2.0, 0, 1000, 40, 0.2)
    assert fit["num_steps"] == 50 and fit["over_budget_s"] == 1.5 and "and the 40 warmup steps" in fit["note"]


def test_lr_share_scales_each_steps_learning_rate(tmp_path):
    """lr_share_fn's share multiplies the step's learning rate: a run whose every micro-batch reports
    (1, 2) ends bitwise where a run with every learning rate halved ends (halving is exact in floats),
    and not where the unscaled run ends; shares are summed over a step's micro-batches."""
    def halved(opt):
        for g in opt.param_groups:
            g["initial_lr"] *= 0.5
        return opt

    cfg = dict(num_steps=3, keep_last=0, momentum_warmup_steps=2, grad_accum=2, warmdown_frac=0.0)
    m1, o1 = make()
    train(m1, o1, ToySource(2), loss_fn, cpu_rt(), LoopConfig(tmp_path / "a", **cfg), meta=meta_for(m1),
          lr_share_fn=lambda b: (1, 2))
    m2, o2 = make()
    train(m2, halved(o2), ToySource(2), loss_fn, cpu_rt(), LoopConfig(tmp_path / "b", **cfg), meta=meta_for(m2))
    m3, o3 = make()
    train(m3, o3, ToySource(2), loss_fn, cpu_rt(), LoopConfig(tmp_path / "c", **cfg), meta=meta_for(m3))
    for (n, a), b, c in zip(m1.named_parameters(), m2.parameters(), m3.parameters()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, c) for a, c in zip(m1.parameters(), m3.parameters()))
    # the share is summed over the step's micro-batches: (1, 2) and (0, 2) give 1/4
    m4, o4 = make()
    flip = iter([(1, 2), (0, 2)] * 3)
    train(m4, o4, ToySource(2), loss_fn, cpu_rt(), LoopConfig(tmp_path / "d", **cfg), meta=meta_for(m4),
          lr_share_fn=lambda b: next(flip))
    m5, o5 = make()
    train(m5, halved(halved(o5)), ToySource(2), loss_fn, cpu_rt(), LoopConfig(tmp_path / "e", **cfg), meta=meta_for(m5))
    for (n, a), b in zip(m4.named_parameters(), m5.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("share", [(3, 2), (-1, 2), (0, 0)])
def test_lr_share_outside_zero_one_is_refused(tmp_path, share):
    model, opt = make()
    cfg = LoopConfig(tmp_path / "t", num_steps=2, keep_last=0)
    with pytest.raises(ChibiError, match=re.escape(f"step 0: lr_share_fn gave a share of {float(share[0])} out of "
                                                   f"{float(share[1])}; it must lie in [0, 1]")):
        train(model, opt, ToySource(2), loss_fn, cpu_rt(), cfg, meta=meta_for(model), lr_share_fn=lambda b: share)


def test_resume_refuses_another_schedule_and_notes_another_step_count(tmp_path, capsys):
    run(tmp_path / "t", 10)
    sdir = tmp_path / "t" / "step_000010"
    tail = ("; a resumed run continues the same schedule and batches, so pass the values it was trained with, "
            "or start a new --tag")
    with pytest.raises(ChibiError) as e:
        run(tmp_path / "t", 10, resume=True, warmdown_frac=0.5)
    assert str(e.value) == f"--resume: {sdir} was trained with --warmdown-frac 0.2 (this run: 0.5)" + tail
    with pytest.raises(ChibiError) as e:
        run(tmp_path / "t", 10, accum=2, resume=True, final_lr_frac=0.1)
    assert str(e.value) == (f"--resume: {sdir} was trained with --grad-accum (pretrain: --total-batch / "
                            f"--device-batch) 1 (this run: 2), --final-lr-frac 0.0 (this run: 0.1)" + tail)
    # A longer run is allowed; the note says that steps taken (step 9, at LR x 0.5) were in the 10-step warmdown.
    # Without --minutes, --fit-steps changes nothing and is not compared.
    capsys.readouterr()
    _, res = run(tmp_path / "t", 12, resume=True, fit_after=7)
    assert res.steps == 12
    assert ("note: --num-steps 10 -> 12: the steps from 10 on follow the LR schedule of 12 steps; the 10 steps "
            "taken followed that of 10 (their warmdown), so this run differs from an uninterrupted 12-step one\n"
            in capsys.readouterr().out)
    # With --minutes, --num-steps is the cap of the fitted count: not changeable on resume.
    with pytest.raises(KeyboardInterrupt):
        budget_run(tmp_path / "b", FakeClock(), save_every=10, stop_after=12)
    with pytest.raises(ChibiError) as e:
        budget_run(tmp_path / "b", FakeClock(), cap=120, save_every=10, resume=True)
    assert str(e.value) == (f"--resume: {tmp_path / 'b' / 'step_000010'} was trained with --num-steps 100 (this "
                            f"run: 120)" + tail + "; with --minutes, --num-steps is the cap of the fitted step count")
    # A checkpoint of an older chibichat records no schedule: resumed, with a note.
    meta = json.loads((tmp_path / "t" / "step_000012" / "meta.json").read_text())
    del meta["schedule"]
    (tmp_path / "t" / "step_000012" / "meta.json").write_text(json.dumps(meta))
    run(tmp_path / "t", 12, resume=True)
    assert (f"note: {tmp_path / 't' / 'step_000012'} records no schedule (an older chibichat saved it), so this "
            "run's --num-steps, --grad-accum, --warmup-steps, --warmdown-frac, --final-lr-frac, "
            "--momentum-warmup-steps, --minutes, --fit-steps cannot be checked against it; pass the values it was "
            "started with" in capsys.readouterr().out)


def test_resume_refuses_another_precision(tmp_path, capsys):
    """The resolved compute dtype and fp8 are saved with every checkpoint (meta["precision"]): a resume in another
    one would continue the run in another precision, so it is refused, naming saved and asked values and the fix."""
    from chibichat.model.gpt import RunConfig

    run(tmp_path / "t", 2)
    sdir = tmp_path / "t" / "step_000002"
    assert read_meta(sdir)["precision"] == {"compute_dtype": "float32", "fp8": False}
    model, opt = make(run=RunConfig(compute_dtype=torch.bfloat16))
    bf16 = Runtime(device=torch.device("cpu"), compute_dtype=torch.bfloat16)
    cfg = LoopConfig(tag_dir=tmp_path / "t", num_steps=3, keep_last=0, momentum_warmup_steps=5, resume=True)
    with pytest.raises(ChibiError) as e:
        train(model, opt, ToySource(), loss_fn, bf16, cfg, meta=meta_for(model))
    assert str(e.value) == (f"--resume: {sdir} was trained with --dtype float32 (this run: bfloat16); a resumed run "
                            "continues in the precision it was trained in, so pass --dtype float32, or start a new "
                            "--tag")
    meta = json.loads((sdir / "meta.json").read_text())
    meta["precision"]["fp8"] = True
    (sdir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ChibiError) as e:
        run(tmp_path / "t", 3, resume=True)
    assert str(e.value) == (f"--resume: {sdir} was trained with --fp8 set (this run: not set); a resumed run "
                            "continues in the precision it was trained in, so pass --fp8, or start a new --tag")
    # A checkpoint of an older chibichat records no precision: resumed, with a note.
    del meta["precision"]
    (sdir / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert run(tmp_path / "t", 3, resume=True)[1].steps == 3
    assert (f"note: {sdir} records no precision (an older chibichat saved it), so this run's --dtype and --fp8 "
            "cannot be checked against it; pass the values it was started with\n") in capsys.readouterr().out


def test_lora_resume_refuses_another_base_or_settings(tmp_path):
    """The adapters of a LoRA run sit on the base checkpoint they were trained on: a resume whose --from
    now resolves to another base step (or with other LoRA settings) is refused, naming the saved base."""
    from chibichat.model.lora import LoRAConfig, apply_lora, lora_parameters
    from chibichat.train.optim import build_lora_optimizer

    def lora_run(base, alpha=4.0, resume=False, sha=None, tag="lo", targets=("attn", "mlp", "slc2")):
        model, _ = make()
        lcfg = LoRAConfig(rank=4, alpha=alpha, targets=targets)
        apply_lora(model, lcfg)
        opt = build_lora_optimizer(lora_parameters(model), 1e-3)
        fingerprint = {} if sha is None else {"base_sha256": sha}
        meta = {**meta_for(model), "lora": {**lcfg.to_dict(), "base": base, **fingerprint}}
        cfg = LoopConfig(tag_dir=tmp_path / tag, num_steps=2, keep_last=0, resume=resume)
        return train(model, opt, ToySource(), loss_fn, cpu_rt(), cfg, meta=meta)

    lora_run("base/d2/step_000010")
    assert lora_run("base/d2/step_000010", resume=True).steps == 2  # same base and settings: resumed
    sdir = tmp_path / "lo" / "step_000002"
    with pytest.raises(ChibiError) as e:
        lora_run("base/d2/step_000020", resume=True)  # a newer base step appeared since
    assert str(e.value) == (
        f"--resume: {sdir} holds LoRA adapters trained with --from/--from-tag/--from-step base/d2/step_000010 "
        "(this run: base/d2/step_000020); the adapters only continue on the base and settings they were trained "
        "with: pass --from base --from-tag d2 --from-step 10 and the same --lora flags, or start a new --tag")
    with pytest.raises(ChibiError, match=re.escape("--lora-alpha 4.0 (this run: 8.0)")):
        lora_run("base/d2/step_000010", alpha=8.0, resume=True)
    # saved without a base fingerprint (an older chibichat): resumed without comparing it
    assert lora_run("base/d2/step_000010", resume=True, sha="a" * 64).steps == 2
    lora_run("base/d2/step_000010", sha="a" * 64, tag="fp")
    assert lora_run("base/d2/step_000010", resume=True, sha="a" * 64, tag="fp").steps == 2
    with pytest.raises(ChibiError) as e:
        lora_run("base/d2/step_000010", resume=True, sha="b" * 64, tag="fp")  # the same base step, trained again
    assert str(e.value) == (
        f"--resume: {tmp_path / 'fp' / 'step_000002'} holds LoRA adapters trained on base/d2/step_000010, whose "
        "weights have changed since (sha256 aaaaaaaaaaaa then, bbbbbbbbbbbb now: that base was trained again); the "
        "adapters only continue on the weights they were trained on: restore that checkpoint, or start a new --tag")
    # Targets are compared by the kinds they select: on this dense model "attn,mlp,slc2" (the default before the
    # default became the model's own kinds) adapts what "attn,mlp" does, so a run saved with it resumes.
    assert "A" in meta_for(make()[0])["model_config"]["layers"] and "S" not in meta_for(make()[0])["model_config"]["layers"]
    assert lora_run("base/d2/step_000010", resume=True, targets=("attn", "mlp")).steps == 2
    with pytest.raises(ChibiError, match=re.escape("--lora-targets ['attn', 'mlp', 'slc2'] (this run: ['mlp'])")):
        lora_run("base/d2/step_000010", resume=True, targets=("mlp",))
