"""Training memory: activation recomputation (RunConfig.recompute) changes what is stored, never the numbers."""

import pytest
import torch

from chibichat.common import ChibiError
from chibichat.model.gpt import GPT, RECOMPUTE, GPTConfig, RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")

V = 61
LAYOUTS = {
    "dense": dict(layers="dense"),
    "iberis": dict(layers="iberis"),
    "gqa-window": dict(layers="ASAA", n_kv_head=2, windows=[0, 0, 5, 3]),
}


def tiny(layers="dense", n_kv_head=4, windows=None, run=None):
    """The same weights whatever `run` says (seeded init and perturbation)."""
    cfg = GPTConfig(vocab_size=V, seq_len=24, n_layer=4, n_embd=32, n_head=4, n_kv_head=n_kv_head,
                    layers=layers, windows=windows)
    torch.manual_seed(0)
    model = GPT(cfg, run)
    # Zero-initialised out-projections and head would leave most block gradients at 0: perturb all.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def batch(B=3, T=24, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :5] = -1  # ignored targets take the same path with and without recomputation
    return x, y


def loss_and_grads(model, reduction, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x, y, reduction=reduction)
    loss = out if reduction != "none" else (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_recompute_gives_identical_loss_and_gradients(layout, dtype, reduction):
    x, y = batch()
    ref_loss, ref = loss_and_grads(tiny(**LAYOUTS[layout], run=RunConfig(compute_dtype=dtype)), reduction, x, y)
    assert all(g.abs().sum() > 0 for g in ref.values())  # every parameter really gets a gradient
    for recompute in ("mlp", "block"):
        model = tiny(**LAYOUTS[layout], run=RunConfig(compute_dtype=dtype, recompute=recompute))
        loss, grads = loss_and_grads(model, reduction, x, y)
        # The recomputed forward runs the same kernels on the same inputs: bitwise equal.
        assert torch.equal(loss, ref_loss), recompute
        for name, g in grads.items():
            assert torch.equal(g, ref[name]), f"{recompute}: gradient of {name} differs"


def saved_bytes(model, x, y):
    """Bytes autograd keeps for backward after the forward (what recomputation is meant to cut)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, y)
    loss.backward()
    return total


def test_recompute_stores_less():
    x, y = batch(B=4)
    none, mlp, block = (saved_bytes(tiny(run=RunConfig(compute_dtype=torch.bfloat16, recompute=r)), x, y)
                        for r in ("none", "mlp", "block"))
    assert none > mlp > block > 0
    # "block" keeps each block's fp32 input (B, T, E) plus the head's inputs: a small fraction of "none".
    assert block < none / 4


def test_recompute_is_off_without_grad_and_matches_logits():
    x, _ = batch()
    with torch.no_grad():
        ref = tiny(layers="iberis")(x)
        assert torch.equal(tiny(layers="iberis", run=RunConfig(recompute="block"))(x), ref)


def test_bad_recompute_value_raises():
    with pytest.raises(ChibiError, match="recompute must be one of none, mlp, block"):
        RunConfig(recompute="all")


def test_every_training_stage_offers_every_setting():
    from chibichat.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for stage in ("pretrain", "midtrain", "sft", "rl"):
        action = next(a for a in sub.choices[stage]._actions if a.dest == "recompute")
        assert tuple(action.choices) == RECOMPUTE and action.default == "none", stage
        args = parser.parse_args([stage, "--recompute", "block", "--trim-heap"])
        assert args.recompute == "block" and args.trim_heap is True, stage
        assert parser.parse_args([stage]).trim_heap is False, stage


def test_eager_training_never_imports_dynamo(tmp_path):
    """Importing torch._dynamo costs ~70 MB of resident memory; eager training (every recompute setting,
    optimizer step, zero_grad, optimizer state_dict save and load) must not pull it in. A fresh
    interpreter, since another test in this process may have compiled something."""
    import subprocess
    import sys

    script = """
import sys, torch
from chibichat.model.gpt import GPT, GPTConfig, RunConfig
from chibichat.train.optim import build_optimizer
cfg = GPTConfig(vocab_size=61, seq_len=16, n_layer=3, n_embd=32, n_head=2, n_kv_head=2, layers="iberis")
x = torch.randint(0, 61, (2, 16))
for recompute in ("none", "mlp", "block"):
    model = GPT(cfg, RunConfig(recompute=recompute))
    opt = build_optimizer(model.param_groups(), matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.02, other_lr=0.02,
                          compute_dtype=model.compute_dtype)
    model(x, x).backward()
    model(x, x, reduction="none").sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
opt.load_state_dict(opt.state_dict())
print("dynamo" if "torch._dynamo" in sys.modules else "clean")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
