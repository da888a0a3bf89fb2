import subprocess
import sys

import pytest

from chibichat.cli import build_parser, main
from chibichat.common import ChibiError, Home, atomic_directory, atomic_write_json, read_json


def test_help_lists_registered_stages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: chibichat")


def test_every_registered_subcommand_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert capsys.readouterr().out.strip(), f"{name} --help printed nothing"


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "chibichat", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "chibichat" in r.stdout


def test_home_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIBICHAT_HOME", str(tmp_path / "h"))
    h = Home.resolve(None)
    assert h.root == (tmp_path / "h").resolve()
    assert h.checkpoints_dir("base", "d4") == h.root / "checkpoints" / "base" / "d4"
    assert Home.resolve(str(tmp_path / "x")).root == (tmp_path / "x").resolve()


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as d:
            (d / "a").write_text("half")
            raise RuntimeError("crash")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(final) as d:
        (d / "a").write_text("whole")
    assert (final / "a").read_text() == "whole"


def test_read_json_errors_name_the_file(tmp_path):
    p = tmp_path / "meta.json"
    with pytest.raises(ChibiError, match="not found"):
        read_json(p, "checkpoint metadata")
    p.write_text("{not json")
    with pytest.raises(ChibiError, match="corrupt.*meta.json"):
        read_json(p, "checkpoint metadata")
    atomic_write_json(p, {"a": 1})
    assert read_json(p, "x") == {"a": 1}


def test_atomic_write_gives_normal_file_mode(tmp_path):
    import os

    p = tmp_path / "f.txt"
    atomic_write_json(p, {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_auto_dtype_on_cpu_is_bf16_only_with_native_bf16_kernels(monkeypatch):
    """Without native bf16 kernels (an AVX2-only CPU) bf16 matmuls are ~50x slower than fp32: auto is fp32."""
    import torch

    from chibichat import common

    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: True)
    assert common.default_compute_dtype(cpu) == torch.bfloat16
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: False)
    assert common.default_compute_dtype(cpu) == torch.float32
    assert common.init_runtime("cpu", "auto").compute_dtype == torch.float32
    assert common.init_runtime("cpu", "bfloat16").compute_dtype == torch.bfloat16  # asked for: kept
