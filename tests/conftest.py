import os

import pytest


@pytest.fixture(autouse=True)
def _plans_of_a_bf16_cpu(monkeypatch):
    """Speedrun plans as on a CPU with native bf16 kernels, whatever CPU runs the tests: the cpu preset plans a
    smaller model where it would compute in fp32 (speedrun.for_machine), so its depth and tags would otherwise
    depend on the test machine. Only the planning is pinned: the stages still pick their dtype from the real
    CPU. A test of the fp32 plan sets speedrun.cpu_has_fast_bf16 itself."""
    import chibichat.stages.speedrun as speedrun

    monkeypatch.setattr(speedrun, "cpu_has_fast_bf16", lambda: True)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh artifact home for one test; CHIBICHAT_HOME points at it."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("CHIBICHAT_HOME", str(h))
    return h


@pytest.fixture
def no_hf_token(tmp_path, monkeypatch):
    """No Hugging Face token but what the test sets: none in the environment, from OIDC or stored by `hf auth
    login` on this machine (huggingface_hub reads that file at constants.HF_TOKEN_PATH on each get_token)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    try:
        import huggingface_hub.constants
    except ImportError:
        return
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-hf-token"))


@pytest.fixture
def byte_engine():
    """(engine, prompts): an Engine over a tiny random 2-layer model with a byte tokenizer, its weights drawn
    large enough that the logits depend on the prompt (a fresh init zeroes the output projections), and five
    prompts of different lengths: for tests of how replies are decoded and batched."""
    import torch

    from chibichat.common import init_runtime
    from chibichat.engine import Engine
    from chibichat.model.gpt import GPT, GPTConfig
    from chibichat.tokenizer import Tokenizer

    tok = Tokenizer([bytes([i]) for i in range(256)], split="gpt4")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, seq_len=48, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                          layers="AA"))  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    engine = Engine(model.eval(), tok, init_runtime("cpu", "float32"))
    return engine, [[tok.bos_id, *tok.encode(t)] for t in ("hi", "a longer prompt", "xy", "q", "zw")]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (use with pytest.mark.usefixtures): on a loaded
    2-core machine extra threads only add synchronisation, which can cost 50x. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fsynced(monkeypatch):
    """fsynced(path) -> whether os.fsync was called on that directory since the test started, by inode:
    a temp dir fsynced before its rename counts for its final name. fsynced.seen.clear() starts over."""
    import stat

    seen = set()
    real = os.fsync

    def recording(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            seen.add((st.st_dev, st.st_ino))
        return real(fd)

    def check(path) -> bool:
        st = os.stat(path)
        return (st.st_dev, st.st_ino) in seen

    monkeypatch.setattr(os, "fsync", recording)
    check.seen = seen
    return check


@pytest.fixture
def fail_dir_fsync(monkeypatch):
    """fail_dir_fsync(folder): from then on os.fsync of that folder (by inode) raises EIO; every other fsync (the
    files, other folders) runs as usual."""
    import errno
    import stat

    real = os.fsync

    def arm(folder):
        target = (os.stat(folder).st_dev, os.stat(folder).st_ino)

        def fsync(fd):
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == target:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    return arm


@pytest.fixture
def refuse_old_deletes(monkeypatch):
    """refuse_old_deletes(): from then on shutil.rmtree of a `.old-*` folder (what remove_dir renamed aside) fails
    with EACCES, as a delete the OS refuses; monkeypatch.undo() ends it."""
    import errno
    import shutil
    from pathlib import Path

    real = shutil.rmtree

    def refused(path, *a, **kw):
        if Path(path).name.startswith(".old-"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **kw)

    return lambda: monkeypatch.setattr(shutil, "rmtree", refused)


def pytest_configure(config):
    # Keep tests deterministic and polite on a 2-core machine.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
