"""The stages a speedrun runs under torchrun, run under torchrun (2 gloo ranks on CPU) and compared with
one process: `eval base` (val bpb and CORE-lite), `eval chat`, `eval jglue`, `rl`, and a two-"node" pretraining run
(`torchrun --nnodes 2` with c10d rendezvous on 127.0.0.1) that is killed and resumed.

This file doubles as the worker script (`torchrun ... test_distributed_stages.py stages-worker HOME OUT JGLUE_DIR`).
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
CPU = ["--device", "cpu", "--dtype", "float32"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CHIBICHAT_HOME"):
        env.pop(k, None)
    return env


def _run(argv, timeout=300):
    r = subprocess.run([str(a) for a in argv], env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A tokenizer and one tiny model with a random (not zero) head, saved as a base and an SFT checkpoint:
    a zero head scores every token alike, which would make any two evaluations agree."""
    import torch

    from chibichat.common import Home
    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.tokenizer import train_tokenizer
    from chibichat.train.checkpoint import save_checkpoint
    from chibichat.train.optim import build_optimizer
    from test_stages_chat import _texts

    home = Home.resolve(tmp_path_factory.mktemp("dist") / "home")
    tok = train_tokenizer(_texts(), vocab_size=512)
    tok.save(home.tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, seq_len=160, n_layer=1, n_embd=32, n_head=2, n_kv_head=2))
    with torch.no_grad():
        model.lm_head.normal_(0.0, 0.5)
    opt = build_optimizer(model.param_groups(), matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                          other_lr=0.02, compute_dtype=torch.float32)
    meta = {"model_config": model.config.to_dict(), "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size},
            "corpus": "embedded-en"}
    for stage in ("base", "sft"):
        save_checkpoint(home.checkpoints_dir(stage, "d1"), 5, model, opt, meta)
    return home


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# RL on a toy task: every rank samples its own prompts; one update over the global batch


class VowelTask:
    """Generative toy task with a graded reward (share of vowels in the completion), so that a random
    model's samples get different rewards and the policy gradient is not zero. `log` collects
    (prompt, reward) for every completion scored."""

    name, kind, lang, runs_code = "vowels", "generative", "en", False

    def __init__(self, items=None, log=None):
        self.items = items or [{"messages": [{"role": "user", "content": f"say vowels {i}"}]} for i in range(24)]
        self.log = log

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def shuffled(self, seed):
        items = list(self.items)
        random.Random(seed).shuffle(items)
        return VowelTask(items, self.log)

    def evaluate(self, item, text):
        r = sum(c in "aeiou" for c in text) / max(len(text), 1)
        if self.log is not None:
            self.log.append((item["messages"][0]["content"], r))
        return r


# ----------------------------------------------------------------------------------------------
# eval base, eval chat and rl: one process vs 2 gloo ranks

# eval base: 7 micro-batches of 2 x 160 tokens (rank 0 scores 4, rank 1 scores 3) and two CORE-lite tasks.
EVAL_BASE = ["eval", "base", "--from", "base", "--tag", "d1", *CPU, "--eval-tokens", str(7 * 320), "--device-batch",
             "2", "--sample-tokens", "2", "--core-tasks", "core-copa,core-hellaswag", "--core-items", "7",
             "--eval-batch-size", "3"]
EVAL_CHAT = ["eval", "chat", "--from", "sft", "--tag", "d1", *CPU, "--tasks", "arc-easy,spelling", "--max-items", "5",
             "--max-new-tokens", "6", "--eval-batch-size", "2", "--temperature", "1.0"]  # sampled: seeded per item
EVAL_JGLUE = ["eval", "jglue", "--from", "base", "--tag", "d1", *CPU, "--shots", "1", "--jsquad-shots", "0",
              "--jsquad-max-tokens", "4", "--eval-batch-size", "2"]
# sft: its val loss at step 0 (before any update) over 3 val batches (rank 0 scores 2, rank 1 scores 1).
SFT = ["sft", "--from", "base", "--from-tag", "d1", "--tag", "s1", *CPU, "--num-steps", "1", "--device-batch-size", "2",
       "--val-items", "4", "--val-batches", "3", "--no-samples", "--mix", "arithmetic=0.05"]
RL = ["rl", "--from", "sft", "--from-tag", "d1", "--tag", "rl2", *CPU, "--num-steps", "2", "--prompts-per-step", "2",
      "--num-samples", "4", "--max-new-tokens", "6", "--passk-items", "10", "--passk-k", "2", "--seed", "3",
      "--save-every", "0"]


def stages_worker(home: str, out: str, jglue: str) -> None:
    """One rank under torchrun: eval base, eval chat, eval jglue, sft, then rl on VowelTask. Dumps the prompts/rewards this
    rank scored in rl and its final weights. The stages share one process group: each would leave it at its
    end (shutdown_runtime), and rejoining a group in the same process can race on the rendezvous store's old
    keys, so leaving is deferred to the end of the worker (each CLI run is its own process in real use)."""
    import torch
    import torch.distributed as dist

    import chibichat.common as common
    import chibichat.stages.rl as rl
    import chibichat.train.loop as loop
    from chibichat.cli import main

    common.shutdown_runtime = lambda rt: None
    for argv in (EVAL_BASE, EVAL_CHAT, [*EVAL_JGLUE, "--jglue-dir", jglue], SFT):
        assert main([*argv, "--home", home]) == 0
    log: list = []
    rl._tasks = lambda args, h: (VowelTask(log=log), VowelTask())
    real_train = loop.train

    def train(model, *a, **kw):
        res = real_train(model, *a, **kw)
        rank = int(os.environ.get("RANK", "0"))
        torch.save({"log": log, "weights": {k: v.clone() for k, v in model.state_dict().items()}},
                   Path(out) / f"rank{rank}.pt")
        return res

    loop.train = train
    assert main([*RL, "--home", home]) == 0
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(home, tmp_path_factory):
    """The evaluations once in this process (one thread, as every torchrun rank here has) with their
    outputs moved to one/, then eval base, eval chat and rl under torchrun with 2 ranks (outputs in the home).
    Returns (home, one, rl_dumps)."""
    import shutil

    import torch

    from chibichat.cli import main

    from test_eval_core import _write_jglue

    one = tmp_path_factory.mktemp("one")
    jglue = tmp_path_factory.mktemp("jglue")
    _write_jglue(jglue)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for argv, stage, name in ((EVAL_BASE, "base", "base"), (EVAL_CHAT, "sft", "sft"),
                                  ([*EVAL_JGLUE, "--jglue-dir", str(jglue)], "base", "jglue")):
            assert main([*argv, "--home", str(home.root)]) == 0
            shutil.move(home.eval_dir(stage, "d1"), one / name)
        assert main([*SFT, "--home", str(home.root)]) == 0
        shutil.move(home.checkpoints_dir("sft", "s1"), one / "sft-run")
    finally:
        torch.set_num_threads(threads)
    dumps = tmp_path_factory.mktemp("rl")
    _run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(Path(__file__)), "stages-worker", home.root, dumps,
          jglue])
    return home, one, dumps


@pytest.mark.slow
def test_eval_base_two_ranks_score_what_one_process_scores(runs):
    home, one_dir, _ = runs
    out_dir = home.eval_dir("base", "d1")
    one, one_items = json.loads((one_dir / "base" / "summary.json").read_text()), _jsonl(one_dir / "base" / "core.jsonl")
    two, two_items = json.loads((out_dir / "summary.json").read_text()), _jsonl(out_dir / "core.jsonl")
    assert one["base_eval"]["val_tokens"] == two["base_eval"]["val_tokens"] == 7 * 320
    assert one["base_eval"]["val_bytes"] == two["base_eval"]["val_bytes"]
    # The same per-micro-batch sums, added in the same order in float64: bitwise equal.
    assert two["val_bpb"] == one["val_bpb"] and two["val_loss"] == one["val_loss"]
    assert two["core"] == one["core"] and two["core_tasks"] == one["core_tasks"]
    assert [(r["task"], r["index"], r["status"], r["pred"], r["correct"]) for r in two_items] == \
           [(r["task"], r["index"], r["status"], r["pred"], r["correct"]) for r in one_items]
    assert len(one_items) == 14 and {r["pred"] for r in one_items if r["task"] == "core-hellaswag"} != {0}
    for a, b in zip(one_items, two_items):
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)


@pytest.mark.slow
def test_eval_chat_two_ranks_give_one_process_results(runs):
    home, one_dir, _ = runs
    out_dir = home.eval_dir("sft", "d1")
    files = ("chat_arc_easy.jsonl", "chat_spelling.jsonl")
    one = json.loads((one_dir / "sft" / "summary.json").read_text())
    one_items = {f: _jsonl(one_dir / "sft" / f) for f in files}
    two = json.loads((out_dir / "summary.json").read_text())
    two_items = {f: _jsonl(out_dir / f) for f in files}
    assert two_items == one_items  # every item: index, prediction, sampled completion, correctness
    assert [r["index"] for r in one_items["chat_spelling.jsonl"]] == [0, 1, 2, 3, 4]
    assert one["chat_eval"]["world_size"] == 1 and two["chat_eval"]["world_size"] == 2
    for s in (one, two):
        s["chat_eval"].pop("seconds"), s["chat_eval"].pop("world_size")
    assert two == one


@pytest.mark.slow
def test_eval_jglue_two_ranks_give_one_process_results(runs):
    home, one_dir, _ = runs
    out_dir = home.eval_dir("base", "d1")  # shared with eval base's keys in the 2-rank run
    one = json.loads((one_dir / "jglue" / "summary.json").read_text())
    two = json.loads((out_dir / "summary.json").read_text())
    keys = [k for k in one if k != "jglue_eval"]
    assert {"jcommonsenseqa", "jnli", "jsts_pearson", "jsquad_f1"} <= set(keys)
    assert {k: two[k] for k in keys} == {k: one[k] for k in keys}
    assert one["jcommonsenseqa_n"] + one["jcommonsenseqa_skipped_too_long"] == 5
    for name in ("jcommonsenseqa", "jnli", "jsts", "jsquad"):
        a, b = _jsonl(one_dir / "jglue" / f"{name}.jsonl"), _jsonl(out_dir / f"{name}.jsonl")
        assert [r["index"] for r in b] == list(range(len(a))), name
        # Continuation losses come from batches of other compositions: equal up to float rounding.
        for ra, rb in zip(a, b):
            la, lb = ra.pop("losses", None), rb.pop("losses", None)
            assert rb == ra and (la is None) == (lb is None), (name, ra, rb)
            if la is not None:
                assert lb == pytest.approx(la, rel=1e-5)


@pytest.mark.slow
def test_sft_val_loss_two_ranks_equal_one_process(runs):
    home, one_dir, _ = runs
    one = [m for m in _jsonl(one_dir / "sft-run" / "metrics.jsonl") if "val_loss" in m]
    two = [m for m in _jsonl(home.checkpoints_dir("sft", "s1") / "metrics.jsonl") if "val_loss" in m]
    assert one[0]["step"] == two[0]["step"] == 0
    assert two[0]["val_loss"] == one[0]["val_loss"]  # same val batches, same sums in the same order


@pytest.mark.slow
def test_rl_two_ranks_sample_their_own_prompts_and_stay_in_sync(runs):
    import torch
    from safetensors.torch import load_file

    home, _, dumps = runs
    r0, r1 = torch.load(dumps / "rank0.pt"), torch.load(dumps / "rank1.pt")
    per_step = 2 * 4  # prompts x samples per micro-batch, one micro-batch per step
    assert len(r0["log"]) == len(r1["log"]) == 2 * per_step
    # Rank r takes prompts r, r+2, ... of the seeded shuffle: disjoint, and the same on every run.
    order = [it["messages"][0]["content"] for it in VowelTask().shuffled(3).items]
    assert [p for p, _ in r0["log"][::4]] == [order[0], order[2], order[4], order[6]]
    assert [p for p, _ in r1["log"][::4]] == [order[1], order[3], order[5], order[7]]
    # One update over the global batch: the replicas are identical, and they did move.
    init = load_file(home.checkpoints_dir("sft", "d1") / "step_000005" / "model.safetensors")
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), f"ranks diverged on {k}"
    assert any(not torch.equal(r0["weights"][k], init[k]) for k in init)
    # The logged reward of each step is the mean over both ranks' samples of that step.
    run_dir = home.checkpoints_dir("rl", "rl2")
    logged = {m["step"]: m["reward"] for m in _jsonl(run_dir / "metrics.jsonl") if "reward" in m}
    for step in (1, 2):
        both = [r for log in (r0["log"], r1["log"]) for _, r in log[(step - 1) * per_step: step * per_step]]
        assert logged[step] == pytest.approx(sum(both) / len(both), rel=1e-12, abs=1e-12)
    mine = [r for _, r in r0["log"][:per_step]]
    assert logged[1] != pytest.approx(sum(mine) / len(mine))  # not rank 0's own mean
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["reward_curve"] == pytest.approx([logged[1], logged[2]])
    # pass@k before training: rank 0 sampled the first batch of 8 held-out prompts, rank 1 the last 2; one
    # process drawing both batches with the same seeds gets the same counts.
    from chibichat.common import Runtime
    from chibichat.engine import Engine
    from chibichat.stages.rl import pass_at_k_eval
    from chibichat.tokenizer import Tokenizer
    from chibichat.train.checkpoint import load_model

    rt = Runtime(device=torch.device("cpu"), compute_dtype=torch.float32)
    tok = Tokenizer.load(home.tokenizer_dir)
    model, _ = load_model(home, "sft", "d1", None, rt, tokenizer=tok)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = pass_at_k_eval(Engine(model, tok, rt), tok, VowelTask(), rt, items=10, k=2, max_tokens=6,
                             temperature=1.0, top_k=50, seed=12345)
    finally:
        torch.set_num_threads(threads)
    assert summary["pass_at_k_before"] == one and one["n"] == 10


# ----------------------------------------------------------------------------------------------
# Two "nodes" on one machine: train, kill, resume == uninterrupted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRETRAIN = ["--depth", "1", "--width", "32", "--heads", "2", "--seq-len", "64", "--device-batch", "2",
            "--total-batch", "256", "--eval-tokens", "128", "--sample-tokens", "2", "--eval-every", "0",
            "--sample-every", "0", "--save-every", "2", "--keep-last", "0", "--num-steps", "16", *CPU]


def _pretrain(home, tag, launcher, agents, *extra):
    """`agents` torchrun agents with the same command line, each in its own session so that the test can
    kill a whole "node" (agent and worker)."""
    cmd = [str(TORCHRUN), *launcher, "-m", "chibichat", "pretrain", "--home", str(home.root), "--tag", tag,
           *PRETRAIN, *extra]
    return [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for _ in range(agents)]


def _two_nodes(home, tag, *extra):
    """Two torchrun agents (one process each) meeting at a c10d rendezvous on 127.0.0.1."""
    port = _free_port()
    return _pretrain(home, tag, ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                                 "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"t{port}"], 2, *extra)


def _wait(procs, timeout=300):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    return outs


@pytest.mark.slow
def test_two_node_pretrain_killed_and_resumed_matches_uninterrupted(home):
    from safetensors.torch import load_file

    # The uninterrupted reference, alongside: the same 2 ranks from one agent (fewer processes on a small CI
    # machine; rank r reads the same data and the all-reduces add the same two operands).
    full = _pretrain(home, "n-full", ["--standalone", "--nproc_per_node", "2"], 1)
    victim = _two_nodes(home, "n-killed")
    run_dir = home.checkpoints_dir("base", "n-killed")
    deadline = time.time() + 300
    while not (run_dir / "step_000002" / "meta.json").exists():
        assert all(p.poll() is None for p in victim), [p.communicate()[0] for p in victim]
        assert time.time() < deadline, "no checkpoint at step 2 in time"
        time.sleep(0.05)
    for p in victim:  # both "nodes" go down at once, agents and workers
        os.killpg(p.pid, signal.SIGKILL)
    for p in victim:
        p.wait(timeout=30)
    assert "step_000016" not in {d.name for d in run_dir.glob("step_*")}, "finished before the kill: lengthen it"
    outs = _wait(_two_nodes(home, "n-killed", "--resume"))
    assert any("resumed from" in o for o in outs), outs
    _wait(full)
    full = json.loads((home.checkpoints_dir("base", "n-full") / "summary.json").read_text())
    assert full["world_size"] == 2 and full["steps"] == 16
    a = load_file(home.checkpoints_dir("base", "n-full") / "step_000016" / "model.safetensors")
    b = load_file(run_dir / "step_000016" / "model.safetensors")
    for k in a:
        assert (a[k] - b[k]).abs().max() == 0, f"{k} differs after kill + resume"


if __name__ == "__main__":
    if sys.argv[1] == "stages-worker":
        stages_worker(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
