import os

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh artifact home for one test; CHIBICHAT_HOME points at it."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("CHIBICHAT_HOME", str(h))
    return h


def pytest_configure(config):
    # Keep tests deterministic and polite on a 2-core machine.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
