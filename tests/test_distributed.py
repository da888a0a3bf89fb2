"""Multi-process behaviour of the shared loop: 2 gloo ranks == 1 rank with gradient accumulation 2,
and a training process killed with SIGKILL resumes to the same parameters as an uninterrupted run.

Both run real subprocesses: this file doubles as the worker script (`python test_distributed.py ...`).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _weights(tag_dir: Path, step: int):
    from safetensors.torch import load_file

    return load_file(tag_dir / f"step_{step:06d}" / "model.safetensors")


def worker(tag_dir: str, steps: int, accum: int, save_every: int, resume: bool, sleep: float) -> None:
    """One training process (one rank under torchrun): the toy GPT on ToySource via the real loop."""
    import torch

    from chibichat.common import init_runtime, shutdown_runtime
    from chibichat.model.gpt import RunConfig
    from chibichat.train.loop import LoopConfig, train
    from test_loop import ToySource, loss_fn, make, meta_for

    import chibichat.train.optim as optim

    # Tiny buckets, so the toy model's gradients travel in many buckets launched during backward.
    optim.BUCKET_BYTES = 4096
    rt = init_runtime("cpu", "float32")
    # Activation recomputation must not disturb the overlapped gradient all-reduce (its parameter
    # gradients accumulate inside a nested backward): the 2-rank run below recomputes, the 1-rank not.
    model, opt = make(run=RunConfig(recompute=os.environ.get("CHIBI_TEST_RECOMPUTE", "none")))
    if rt.distributed:
        assert len(opt._buckets) > 3, len(opt._buckets)

    def slow_loss(m, b):
        if sleep:
            time.sleep(sleep)  # gives the test time to kill us between checkpoints; no effect on numerics
        return loss_fn(m, b)

    share_fn = None
    if os.environ.get("CHIBI_TEST_SHARE"):
        # Micro-batch k of rank r is ToySource's draw k * world + r: even draws report (1, 2), odd ones
        # (0, 2). On 2 ranks rank 0 sees only even draws and rank 1 only odd ones, so only the global sum
        # (1/4 with 2 micro-steps each) matches one rank's 4 micro-steps; a per-rank share would diverge.
        drawn = [0]

        def share_fn(batch):
            k, drawn[0] = drawn[0], drawn[0] + 1
            return (1, 2) if (k * rt.world_size + rt.rank) % 2 == 0 else (0, 2)

    cfg = LoopConfig(tag_dir=Path(tag_dir), num_steps=steps, grad_accum=accum, save_every=save_every,
                     keep_last=0, resume=resume, momentum_warmup_steps=4)
    train(model, opt, ToySource(batch_size=2, rank=rt.rank, world=rt.world_size), slow_loss, rt, cfg,
          meta=meta_for(model), lr_share_fn=share_fn)
    # Every rank must hold the same replica: rank r dumps its own copy for the test to compare.
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(tag_dir) / f"rank{rt.rank}.pt")
    shutdown_runtime(rt)


def _run_single(tag_dir, steps, accum, save_every=0, resume=False, sleep=0.0, env=None, **popen):
    args = [sys.executable, str(Path(__file__)), str(tag_dir), str(steps), str(accum), str(save_every),
            str(int(resume)), str(sleep)]
    return subprocess.Popen(args, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_rank_with_accumulation(tmp_path):
    import torch

    # 2 ranks x 2 micro-steps (the first under no_sync, the second overlapping its all-reduce with
    # backward) against 1 rank x 4 micro-steps over the same 4 micro-batches per step. The 2-rank run
    # also recomputes activations (--recompute block): same numbers expected. Both report a learning-rate
    # share per micro-batch (CHIBI_TEST_SHARE) that only agrees when summed over ranks.
    steps = 4
    one = _run_single(tmp_path / "one", steps, accum=4, env=dict(_env(), CHIBI_TEST_SHARE="1"))
    out1, _ = one.communicate(timeout=240)
    assert one.returncode == 0, out1
    two = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(Path(__file__)), str(tmp_path / "two"),
         str(steps), "2", "0", "0", "0"],
        env=dict(_env(), CHIBI_TEST_RECOMPUTE="block", CHIBI_TEST_SHARE="1"), capture_output=True, text=True,
        timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = _weights(tmp_path / "one", steps), _weights(tmp_path / "two", steps)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    assert any(not torch.equal(a[k], _weights_init()[k]) for k in a)  # it did train
    r0 = torch.load(tmp_path / "two" / "rank0.pt")
    r1 = torch.load(tmp_path / "two" / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged on {k}"


def _weights_init():
    from test_loop import make

    return make()[0].state_dict()


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    import torch

    steps, save_every = 8, 2
    full = _run_single(tmp_path / "full", steps, accum=2, save_every=save_every)
    victim = _run_single(tmp_path / "killed", steps, accum=2, save_every=save_every, sleep=0.3)
    ckpt = tmp_path / "killed" / "step_000004" / "meta.json"
    deadline = time.time() + 180
    while not ckpt.exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.time() < deadline, "no checkpoint at step 4 in time"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    saved = sorted(p.name for p in (tmp_path / "killed").glob("step_*"))
    assert "step_000008" not in saved and "step_000004" in saved
    resumed = _run_single(tmp_path / "killed", steps, accum=2, save_every=save_every, resume=True)
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    out_full, _ = full.communicate(timeout=240)
    assert full.returncode == 0, out_full
    a, b = _weights(tmp_path / "full", steps), _weights(tmp_path / "killed", steps)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill+resume"


def _muon_shard_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of test_sharded_muon_step_equals_one_rank (torch.multiprocessing target)."""
    import torch
    import torch.distributed as dist

    import chibichat.train.optim as optim

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = []
    real = optim.orthogonalize

    def counting(g, *a, **kw):
        calls.append(g.shape[0])
        return real(g, *a, **kw)

    optim.orthogonalize = counting
    try:
        g = torch.Generator().manual_seed(0)
        shapes = [(16, 24)] * 5 + [(24, 16)] * 2 + [(8, 8)]
        mats = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
        other = torch.nn.Parameter(torch.randn(7, generator=g))
        opt = optim.MuonAdamW([dict(params=mats, kind="muon", lr=0.02), dict(params=[other], kind="adamw")],
                              grad_reduce="mean")
        for step in range(3):
            # Same gradients on every rank: with a mean reduction the reduced gradient is that one, so
            # any difference from the 1-rank run comes from the sharded Newton-Schulz and the gather.
            gs = torch.Generator().manual_seed(100 + step)
            for p in mats + [other]:
                p.grad = torch.randn(p.shape, generator=gs)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.save({"params": [p.detach() for p in mats + [other]], "calls": calls},
                   f"{out_dir}/rank{rank}_of{world}.pt")
    finally:
        optim.orthogonalize = real
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_muon_step_equals_one_rank(tmp_path):
    """2 gloo ranks split the Newton-Schulz work (each orthogonalises ceil(k/2) of every stack of k
    same-shaped matrices) and end with the same parameters as one rank doing all of it."""
    import torch
    import torch.multiprocessing as mp

    _muon_shard_worker(0, 1, "", str(tmp_path))
    mp.spawn(_muon_shard_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    one = torch.load(tmp_path / "rank0_of1.pt")
    r0, r1 = torch.load(tmp_path / "rank0_of2.pt"), torch.load(tmp_path / "rank1_of2.pt")
    # Stacks per step: 5 x (16, 24), 2 x (24, 16), 1 x (8, 8) -> one rank runs batches of 5, 2, 1;
    # each of two ranks runs 3, 1, 1 (padded), never the whole stack.
    assert one["calls"] == [5, 2, 1] * 3
    assert r0["calls"] == r1["calls"] == [3, 1, 1] * 3
    for a, b, c in zip(one["params"], r0["params"], r1["params"]):
        assert torch.equal(b, c), "ranks diverged"
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def _budget_worker(rank: int, world: int, init_file: str, out_dir: str, warmdown_frac: float = 0.2) -> None:
    """One rank of test_minutes_fit_is_the_same_on_every_rank (torch.multiprocessing target)."""
    import datetime
    import json

    import torch
    import torch.distributed as dist

    from chibichat.common import Runtime
    from chibichat.train.loop import LoopConfig, train
    from test_loop import FakeClock, ToySource, make, meta_for

    torch.set_num_threads(1)
    # A short timeout: ranks that disagree on the step count fail their mismatched collectives, not hang.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        rt = Runtime(device=torch.device("cpu"), compute_dtype=torch.float32, rank=rank, local_rank=rank,
                     world_size=world)
        clock = FakeClock(eval_s=2.0 + 1e-4 * rank)  # rank 1's evaluation takes 0.1 ms longer
        model, opt = make()
        cfg = LoopConfig(tag_dir=Path(out_dir) / "run", num_steps=100, keep_last=0, momentum_warmup_steps=5,
                         minutes=0.25, fit_after=4, warmdown_frac=warmdown_frac)
        res = train(model, opt, ToySource(rank=rank, world=world), clock.loss(), rt, cfg, meta=meta_for(model),
                    eval_fn=clock.evaluate, clock=clock)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"steps": res.steps, "fit": res.fit}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("warmdown_frac", [0.2, 1.0])
def test_minutes_fit_is_the_same_on_every_rank(tmp_path, warmdown_frac):
    """--minutes under 2 gloo ranks whose own timings differ by a hair: rank 0's step-0 evaluation takes
    2 s, rank 1's 2.0001 s. Fitted from its own, rank 1 would choose 16 steps ((15 - 7 - 2.0001) / 0.5 ->
    11 more) and rank 0 17; every rank fits from rank 0's figures, so both take 17 and finish. With a
    warmdown from the first step (1.0) both also fall on from the same LR (fit["decay_from"])."""
    import json

    import torch.multiprocessing as mp

    ctx = mp.spawn(_budget_worker, args=(2, str(tmp_path / "store"), str(tmp_path), warmdown_frac), nprocs=2,
                   join=False)
    deadline = time.time() + 240
    try:
        while not ctx.join(timeout=5):
            assert time.time() < deadline, "the ranks did not finish"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["steps"] == r0["fit"]["num_steps"] == 17 and r0["fit"]["eval_s"] == 2.0
    assert r0["fit"].get("decay_from") == ([5, 0.96] if warmdown_frac == 1.0 else None)


def _noise_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of test_training_noise_differs_between_ranks (torch.multiprocessing target)."""
    import hashlib
    import json

    import torch
    import torch.distributed as dist

    from chibichat.common import Runtime
    from chibichat.model.gpt import RunConfig
    from chibichat.train.loop import LoopConfig, train
    from test_loop import ToySource, loss_fn, make, meta_for

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rt = Runtime(device=torch.device("cpu"), compute_dtype=torch.float32, rank=rank, local_rank=rank,
                     world_size=world)
        model, opt = make(run=RunConfig(embed_noise=0.1))  # seeded alike on every rank, as the stages do
        states = []

        def noted(m, b):  # the generator's state before each training forward: it draws the embedding noise
            states.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
            return loss_fn(m, b)

        cfg = LoopConfig(tag_dir=Path(out_dir) / "run", num_steps=2, keep_last=0, momentum_warmup_steps=2)
        train(model, opt, ToySource(rank=rank, world=world), noted, rt, cfg, meta=meta_for(model))
        Path(out_dir, f"noise{rank}.json").write_text(json.dumps(states))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_training_noise_differs_between_ranks(tmp_path):
    """The stages seed torch's global generator alike on every rank (the model's init and LoRA adapters must
    match), but the draws of the training forwards (--embed-noise, LoRA dropout) must not repeat across ranks:
    rank r's micro-batch gets noise of its own, as a single process's successive micro-batches do."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_noise_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"noise{r}.json").read_text()) for r in (0, 1))
    assert len(r0) == len(r1) == 2 and len(set(r0 + r1)) == 4


if __name__ == "__main__":
    tag, steps, accum, save_every, resume, sleep = sys.argv[1:7]
    worker(tag, int(steps), int(accum), int(save_every), bool(int(resume)), float(sleep))
