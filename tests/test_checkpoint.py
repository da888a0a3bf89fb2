import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chibichat.common import ChibiError, Home
from chibichat.model.gpt import GPT, GPTConfig
from chibichat.train.checkpoint import (
    check_tokenizer, list_steps, load_model, load_optimizer, load_weights, read_meta, resolve_checkpoint,
    save_checkpoint, step_dir, strip_prefixes,
)
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


TOK = SimpleNamespace(hash="a" * 64, vocab_size=64)


def _model(layers="dense", seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, seq_len=16, n_layer=3, n_embd=32, n_head=2, n_kv_head=2, layers=layers)
    return GPT(cfg)


def _opt(model):
    return build_optimizer(model.param_groups(), matrix_lr=0.02, embedding_lr=0.1, unembedding_lr=0.01,
                           other_lr=0.01, compute_dtype=torch.float32)


def _meta(model):
    return {"model_config": model.config.to_dict(), "tokenizer": {"hash": TOK.hash, "vocab_size": TOK.vocab_size}}


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 17), generator=g)
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_round_trip_model_and_optimizer_resumes_exactly(tmp_path):
    m, o = _model("iberis"), None
    o = _opt(m)
    _train(m, o, 2)
    sdir = save_checkpoint(tmp_path / "d2", 2, m, o, _meta(m))
    assert sdir == tmp_path / "d2" / "step_000002"
    assert sorted(p.name for p in sdir.iterdir()) == [
        "meta.json", "model.safetensors", "optim_rank0.json", "optim_rank0.safetensors"]
    meta = read_meta(sdir)
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["model_config"]["layers"] == m.config.layers

    m2 = _model("iberis", seed=1)
    o2 = _opt(m2)
    load_weights(sdir, m2)
    load_optimizer(sdir, o2)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    _train(m, o, 2, seed=5)
    _train(m2, o2, 2, seed=5)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_compiled_prefix_is_stripped(tmp_path):
    m = _model()
    sdir = save_checkpoint(tmp_path / "t", 1, m, None, _meta(m))
    # A checkpoint written by another tool from a compiled/DDP module: keys carry wrapper prefixes.
    from safetensors.torch import load_file, save_file
    state = load_file(sdir / "model.safetensors")
    save_file({"_orig_mod." + k: v for k, v in state.items()}, sdir / "model.safetensors")
    m2 = _model(seed=3)
    load_weights(sdir, m2)
    assert torch.equal(m2.wte, m.wte)
    assert strip_prefixes({"module._orig_mod.a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_keep_last_and_latest(tmp_path):
    m = _model()
    tag = tmp_path / "d3"
    for s in (1, 2, 3, 4):
        save_checkpoint(tag, s, m, None, _meta(m), keep_last=2)
    assert list_steps(tag) == [3, 4]
    # A leftover temp dir from a crashed save is ignored.
    (tag / ".tmp-step_000009-xyz").mkdir()
    (tag / "step_000010").mkdir()  # no meta.json: incomplete, ignored
    assert list_steps(tag) == [3, 4]


def test_load_model_picks_newest_tag_and_checks_tokenizer(tmp_path):
    home = Home(tmp_path)
    m = _model()
    save_checkpoint(home.checkpoints_dir("base", "d3"), 5, m, None, _meta(m))
    model, meta = load_model(home, "base", tokenizer=TOK)
    assert meta["step"] == 5 and not model.training
    assert torch.equal(model.wte, m.wte)
    other = SimpleNamespace(hash="b" * 64, vocab_size=64)
    with pytest.raises(ChibiError, match="trained with tokenizer"):
        load_model(home, "base", tokenizer=other)
    with pytest.raises(ChibiError, match="vocab 80"):
        check_tokenizer(meta, SimpleNamespace(hash="a" * 64, vocab_size=80), "x")


def test_missing_checkpoint_names_the_command(tmp_path):
    home = Home(tmp_path)
    with pytest.raises(ChibiError, match="chibichat pretrain"):
        resolve_checkpoint(home, "base")
    with pytest.raises(ChibiError, match="chibichat sft"):
        load_model(home, "sft")
    m = _model()
    save_checkpoint(home.checkpoints_dir("base", "d3"), 5, m, None, _meta(m))
    with pytest.raises(ChibiError, match="tags that exist: d3"):
        resolve_checkpoint(home, "base", tag="d9")
    with pytest.raises(ChibiError, match=r"no step 7; saved steps: \[5\]"):
        resolve_checkpoint(home, "base", tag="d3", step=7)


def test_corrupt_and_mismatched_checkpoints_raise(tmp_path):
    m = _model()
    o = _opt(m)
    _train(m, o, 1)
    sdir = save_checkpoint(tmp_path / "t", 1, m, o, _meta(m))
    # Truncated weights.
    data = (sdir / "model.safetensors").read_bytes()
    (sdir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ChibiError, match="^the checkpoint weights file is corrupt"):
        load_weights(sdir, _model())
    # Weights for a different shape.
    sdir2 = save_checkpoint(tmp_path / "t", 2, m, o, _meta(m))
    big = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=3, n_embd=64, n_head=2, n_kv_head=2))
    with pytest.raises(ChibiError, match="different model config"):
        load_weights(sdir2, big)
    # Optimizer of a different layout (iberis has an extra AdamW group of conv taps).
    with pytest.raises(ChibiError, match="different model config|does not fit"):
        load_optimizer(sdir2, _opt(_model("iberis")))
    # Corrupt meta.json.
    (sdir2 / "meta.json").write_text("{not json")
    with pytest.raises(ChibiError, match="corrupt"):
        read_meta(sdir2)
    (sdir2 / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ChibiError, match="not a chibichat-checkpoint"):
        read_meta(sdir2)


def test_failed_save_leaves_no_step_dir(tmp_path):
    m = _model()
    with pytest.raises(TypeError):  # meta that is not JSON: refused before anything is written
        save_checkpoint(tmp_path / "t", 1, m, None, {"flags": {"bad": object()}})

    class Crashing:  # the optimizer fails after model.safetensors is already in the temp dir
        def state_dict(self):
            raise RuntimeError("disk full")

    save_checkpoint(tmp_path / "t", 1, m, None, _meta(m))
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "t", 2, m, Crashing(), _meta(m))
    assert list_steps(tmp_path / "t") == [1]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["step_000001"]


def test_failed_save_names_every_step_that_survives_and_how_to_resume(tmp_path, monkeypatch):
    """A full disk while a step is renamed into place: the message lists the steps left on disk (an earlier
    save of the same step included, which is put back), or says that none is."""
    import errno
    import os

    m = _model()
    real = os.replace

    def full_disk(src, dst):  # the new step's rename fails; moving an old one aside and back works
        if Path(src).name.startswith(".tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    tag = tmp_path / "t"
    disk = "No space left on device (errno 28); free some space on that disk or pass another --home"
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(ChibiError) as e:
        save_checkpoint(tag, 1, m, None, _meta(m))
    assert str(e.value) == (f"saving step 1 failed, nothing of it was kept: cannot write {tag / 'step_000001'}: "
                            f"{disk}. No checkpoint survives in {tag}")
    monkeypatch.setattr(os, "replace", real)
    save_checkpoint(tag, 1, m, None, _meta(m))
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(ChibiError) as e:
        save_checkpoint(tag, 2, m, None, _meta(m))
    assert str(e.value) == (f"saving step 2 failed, nothing of it was kept: cannot write {tag / 'step_000002'}: "
                            f"{disk}. The checkpoints saved before are intact: {tag / 'step_000001'}")
    with pytest.raises(ChibiError) as e:  # saving step 1 again: its earlier save survives, under its name
        save_checkpoint(tag, 1, m, None, _meta(m))
    assert str(e.value) == (f"saving step 1 failed, nothing of it was kept: cannot write {tag / 'step_000001'}: "
                            f"{disk}. The checkpoints saved before are intact: {tag / 'step_000001'}")
    assert sorted(p.name for p in tag.iterdir()) == ["step_000001"] and read_meta(tag / "step_000001")["step"] == 1
    # a training loop's checkpoint (with its optimizer) is what --resume continues from; a model saved without
    # one (lora merge, a soup's average, an import) is made again by its command, so no --resume is offered
    with pytest.raises(ChibiError) as e:
        save_checkpoint(tag, 2, m, _opt(m), _meta(m))
    assert str(e.value).endswith(f"The checkpoints saved before are intact: {tag / 'step_000001'}; --resume "
                                 f"continues from {tag / 'step_000001'}")
    with pytest.raises(ChibiError) as e:
        save_checkpoint(tmp_path / "u", 1, m, _opt(m), _meta(m))
    assert str(e.value).endswith(f"No checkpoint survives in {tmp_path / 'u'}: there is nothing to resume from")


def test_resolve_checkpoint_renames_back_a_tag_or_step_left_aside(tmp_path):
    """What a crash between atomic_directory's two renames leaves (the old directory as `.aside-<name>-<pid>`,
    nothing under its name) is renamed back by the next reader; hidden directories are never tags."""
    home = Home(tmp_path)
    m = _model()
    tag = home.checkpoints_dir("base", "d3")
    save_checkpoint(tag, 5, m, None, _meta(m))
    (tag / "step_000005").rename(tag / ".aside-step_000005-123")
    assert list_steps(tag) == [] and resolve_checkpoint(home, "base", "d3") == tag / "step_000005"
    assert sorted(p.name for p in tag.iterdir()) == ["step_000005"]
    tag.rename(tag.parent / ".aside-d3-123")
    newer = tag.parent / ".tmp-d4-xyz"  # a newer tag directory still being written
    save_checkpoint(newer, 6, m, None, _meta(m))
    model, meta = load_model(home, "base", tokenizer=TOK)
    assert meta["checkpoint_dir"] == str(tag / "step_000005") and torch.equal(model.wte, m.wte)
    assert sorted(p.name for p in tag.parent.iterdir()) == [".tmp-d4-xyz", "d3"]


def test_only_rank_zero_writes(tmp_path):
    from chibichat.common import Runtime

    m = _model()
    rt1 = Runtime(device=torch.device("cpu"), compute_dtype=torch.float32, rank=1, local_rank=1, world_size=2)
    path = save_checkpoint(tmp_path / "t", 3, m, None, _meta(m), rt=rt1)
    assert path == step_dir(tmp_path / "t", 3) and not path.exists()
    rt0 = Runtime(device=torch.device("cpu"), compute_dtype=torch.float32, rank=0, local_rank=0, world_size=2)
    save_checkpoint(tmp_path / "t", 3, m, None, _meta(m), rt=rt0)
    assert read_meta(path)["world_size"] == 2


def test_save_fsyncs_the_step_dir_before_its_rename_and_the_tag_dir_after(tmp_path, fsynced):
    m = _model()
    sdir = save_checkpoint(tmp_path / "t", 1, m, None, _meta(m))
    assert fsynced(sdir) and fsynced(tmp_path / "t")


def test_a_failed_fsync_of_the_tag_dir_after_the_rename_warns_and_the_save_stands(tmp_path, fail_dir_fsync, capsys):
    """The step directory is renamed into place whole; an fsync of the tag directory failing after that cannot
    undo it: the save succeeds (a new step and a step replaced alike) and a warning says that only its surviving
    a power loss is unconfirmed."""
    tag = tmp_path / "t"
    tag.mkdir()
    fail_dir_fsync(tag)  # EIO for the tag directory only: the files and the step directory are fsynced as usual
    for seed in (0, 1):  # step 1 saved, then saved again (replaced)
        m = _model(seed=seed)
        assert save_checkpoint(tag, 1, m, None, _meta(m)) == tag / "step_000001"
        assert capsys.readouterr().err == (
            f"warning: {tag / 'step_000001'} was written, but the fsync of its folder failed (Input/output error "
            "(errno 5)), so it may not survive a power loss; check that disk\n")
        assert list_steps(tag) == [1]
        loaded = _model(seed=9)
        load_weights(tag / "step_000001", loaded)
        assert torch.equal(loaded.wte, m.wte)


def test_deleting_old_steps_never_leaves_half_a_step(tmp_path, monkeypatch):
    """keep_last renames an old step out of sight before deleting it: a crash midway through the delete
    (here: the weights are gone when it dies) leaves no step_* dir that list_steps takes for complete,
    and a failed delete is an error naming what is left, not ignored."""
    import errno
    import os
    import shutil

    m = _model()
    tag = tmp_path / "t"
    for s in (1, 2):
        save_checkpoint(tag, s, m, None, _meta(m), keep_last=2)

    def dies_midway(path, *a, **kw):
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tag, 3, m, None, _meta(m), keep_last=2)
    assert list_steps(tag) == [2, 3]
    assert (tag / f".old-step_000001-{os.getpid()}" / "meta.json").is_file()  # out of sight: dropped by the next run

    def refused(path, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refused)
    with pytest.raises(ChibiError) as e:
        save_checkpoint(tag, 4, m, None, _meta(m), keep_last=2)
    assert str(e.value) == (
        f"step 4 was saved to {tag / 'step_000004'}, but deleting the older step 2 (keep_last 2) failed: cannot "
        f"finish removing {tag / 'step_000002'}: Permission denied (errno 13). It is gone under its name; what is "
        f"left of it is in {tag / f'.old-step_000002-{os.getpid()}'}, which no reader takes for it: delete that by "
        f"hand")
    assert list_steps(tag) == [3, 4]
