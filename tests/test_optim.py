import math

import pytest
import torch

from chibichat.train.optim import (
    MuonAdamW,
    build_optimizer,
    muon_momentum,
    newton_schulz_dtype,
    orthogonalize,
    set_muon_momentum,
)
from chibichat.train.schedule import lr_multiplier


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than two, and far faster when the 2 cores are shared
    (OpenMP workers spin-wait for a core). Restored after each test."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _with_spectrum(shape, smin, smax, seed=0):
    """A batch of matrices U diag(s) V^T with singular values spread over [smin, smax]."""
    g = torch.Generator().manual_seed(seed)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(3, shape[0], k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(3, shape[1], k, generator=g))
    s = torch.linspace(smin, smax, k).expand(3, k)
    return u @ torch.diag_embed(s) @ v.mT, u @ v.mT


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_is_near_orthogonal(shape, dtype):
    # Condition number 100 (relative to the Frobenius norm the iteration normalises by).
    x, polar = _with_spectrum(shape, 0.05, 5.0)
    o = orthogonalize(x, dtype=dtype)
    assert o.shape == x.shape and o.dtype == x.dtype
    s = torch.linalg.svdvals(o.float())
    # The quintic iteration does not converge to exactly 1; it lands every singular value in a band.
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # It keeps the singular vectors: O is close to the exact polar factor U V^T.
    cos = (o.float() * polar).sum((-2, -1)) / (o.float().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.97).all()


def _one_muon_update(shape, lr=0.02):
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(*shape))
    opt = MuonAdamW([dict(params=[p], kind="muon", lr=lr, momentum=0.95)], ns_dtype=torch.float32)
    before = p.detach().clone()
    p.grad = _with_spectrum(shape, 0.01, 1.0, seed=2)[0][0]
    opt.step()
    return (before - p.detach()) / lr


@pytest.mark.parametrize("shape", [(48, 48), (24, 72), (72, 24)])
def test_muon_update_is_near_orthogonal_and_shape_scaled(shape):
    upd = _one_muon_update(shape)
    scale = math.sqrt(max(1.0, shape[0] / shape[1]))
    s = torch.linalg.svdvals(upd / scale)
    assert s.min() > 0.6 and s.max() < 1.25


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10, 7))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MuonAdamW([dict(params=[a], kind="adamw", lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)])
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for i in range(5):
        grad = torch.randn(10, 7)
        a.grad = grad.clone()
        b.grad = grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 32)
        self.w1 = torch.nn.Linear(32, 64, bias=False)
        self.w2 = torch.nn.Linear(64, 16, bias=False)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, idx):
        return self.w2(torch.relu(self.w1(self.emb(idx)))) * self.scale

    def param_groups(self):
        return {"matrix": [self.w1.weight], "embedding": [self.emb.weight], "head": [self.w2.weight],
                "other": [self.scale]}


def _toy_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(16, generator=g)  # learn a fixed permutation of 16 symbols
    return perm


def test_converges_on_toy_problem():
    torch.manual_seed(0)
    model = _Toy()
    opt = build_optimizer(model.param_groups(), matrix_lr=0.02, embedding_lr=0.05, unembedding_lr=0.02,
                          other_lr=0.01, compute_dtype=torch.float32)
    perm = _toy_task()
    x = torch.arange(16)
    losses = []
    for step in range(150):
        set_muon_momentum(opt, muon_momentum(step, warmup_steps=50))
        loss = torch.nn.functional.cross_entropy(model(x), perm[x])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.5
    assert losses[-1] < 0.05, losses[-1]
    assert (model(x).argmax(-1) == perm).all()


def test_state_dict_resume_is_bitwise_exact():
    perm = _toy_task()
    x = torch.arange(16)

    def make():
        torch.manual_seed(0)
        m = _Toy()
        o = build_optimizer(m.param_groups(), matrix_lr=0.02, embedding_lr=0.05, unembedding_lr=0.02,
                            other_lr=0.01, compute_dtype=torch.float32)
        return m, o

    def run(m, o, steps):
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(m(x), perm[x])
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    m1, o1 = make()
    run(m1, o1, 6)
    m2, o2 = make()
    run(m2, o2, 3)
    saved_model, saved_opt = m2.state_dict(), o2.state_dict()
    m3, o3 = make()
    m3.load_state_dict(saved_model)
    o3.load_state_dict(saved_opt)
    run(m3, o3, 3)
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


def test_grad_clip_uses_global_norm():
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(4))
    opt = MuonAdamW([dict(params=[p, q], kind="adamw", lr=0.0)], grad_clip=1.0)
    p.grad = torch.full((3,), 2.0)
    q.grad = torch.full((4,), 2.0)
    norm = opt.step()
    assert norm.item() == pytest.approx(math.sqrt(7 * 4.0))
    total = torch.cat([p.grad, q.grad]).norm().item()
    assert total == pytest.approx(1.0, rel=1e-5)


def test_bad_groups_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.zeros(2, 3, 4))], kind="muon")])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.zeros(2))], kind="sgd")])
    with pytest.raises(ValueError, match="unknown parameter groups"):
        build_optimizer({"matrix": [], "bias": []}, matrix_lr=1, embedding_lr=1, unembedding_lr=1, other_lr=1,
                        compute_dtype=torch.float32)


def test_muon_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


def test_lr_schedule_shape():
    total = 100
    m = [lr_multiplier(s, total, warmup_steps=10, warmdown_frac=0.2, final_frac=0.1) for s in range(total)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in m[10:80])
    assert m[80] == pytest.approx(1.0)
    assert m[99] == pytest.approx(0.1 + 0.9 * (1 / 20))
    assert all(a >= b for a, b in zip(m[80:], m[81:]))
    assert all(0.0 <= v <= 1.0 for v in m)
    with pytest.raises(ValueError):
        lr_multiplier(100, total, 0, 0.2, 0.0)  # past the end: a step-definition bug, not a value
    with pytest.raises(ValueError):
        lr_multiplier(0, total, 0, 1.5, 0.0)


def test_shard_bounds_cover_every_matrix_once():
    from chibichat.train.optim import shard_bounds

    for k in range(1, 9):
        for world in range(1, 6):
            owned = []
            for r in range(world):
                start, stop, size = shard_bounds(k, r, world)
                assert 0 <= stop - start <= size == -(-k // world)
                owned += list(range(start, stop))
            assert owned == list(range(k)), (k, world)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_sharded_orthogonalize_equals_unsharded(world):
    """Each simulated rank orthogonalises its slice; laid side by side (what the all-gather does) the
    slices equal one rank orthogonalising the whole stack."""
    from chibichat.train.optim import orthogonalize_sharded

    g = torch.Generator().manual_seed(3)
    mats = list(torch.randn(4, 24, 40, generator=g).unbind(0))
    whole, handle = orthogonalize_sharded(mats, 0, 1)
    assert handle is None and whole.shape == (4, 24, 40)
    torch.testing.assert_close(whole, orthogonalize(torch.stack(mats)), rtol=0, atol=0)
    pieces = []
    for r in range(world):
        # world > 1 without a process group: run the rank's share only, as step() does before gathering
        from chibichat.train import optim as optim_mod

        start, stop, size = optim_mod.shard_bounds(len(mats), r, world)
        piece = torch.stack(mats[start:stop]) if stop > start else torch.zeros(0, 24, 40)
        piece = torch.cat([piece, torch.zeros(size - (stop - start), 24, 40)])
        pieces.append(orthogonalize(piece))
    stacked = torch.cat(pieces)
    torch.testing.assert_close(stacked[: len(mats)], whole, rtol=0, atol=1e-6)
    padding = stacked[len(mats):]
    assert padding.numel() == 0 or padding.abs().max() == 0  # zero padding stays zero under Newton-Schulz


def test_newton_schulz_multiplies_in_bf16_only_for_a_bf16_model():
    # bf16 Newton-Schulz on a CPU without native bf16 kernels took each d4 pretraining step from ~1 s to ~10 s
    # (the model computes in fp32 there): the iteration follows the model's compute dtype.
    assert newton_schulz_dtype(torch.bfloat16) == torch.bfloat16
    assert newton_schulz_dtype(torch.float32) == torch.float32
    assert newton_schulz_dtype(torch.float16) == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pretraining_and_finetuning_orthogonalise_in_the_runs_compute_dtype(tmp_path, monkeypatch, dtype):
    """The hand-off from --dtype to Muon: the pretraining stage (through the CLI) and the chat stages'
    optimizer multiply their Newton-Schulz products in the run's compute dtype."""
    from test_bad_inputs import TINY, byte_tokenizer, text_corpus

    import chibichat.train.optim as optim
    from chibichat.cli import main
    from chibichat.model.gpt import GPT, GPTConfig, RunConfig
    from chibichat.train.finetune import make_optimizer

    seen = []
    real = optim.orthogonalize

    def spy(g, steps=optim.NS_STEPS, dtype=torch.bfloat16):
        seen.append(dtype)
        return real(g, steps, dtype)

    monkeypatch.setattr(optim, "orthogonalize", spy)
    home = tmp_path / "home"
    byte_tokenizer().save(home / "tokenizer")
    argv = ["pretrain", "--home", str(home), "--corpus", f"local:{text_corpus(tmp_path / 'c')}", *TINY,
            "--num-steps", "2", "--tag", "t"]
    argv[argv.index("--dtype") + 1] = dtype
    assert main(argv) == 0
    assert seen and set(seen) == {getattr(torch, dtype)}

    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_embd=32, n_head=2, n_kv_head=2),
                RunConfig(compute_dtype=getattr(torch, dtype)))
    lrs = {"matrix": 0.02, "embedding": 0.2, "head": 0.004, "other": 0.02}
    assert make_optimizer(model, lrs).ns_dtype == getattr(torch, dtype)
