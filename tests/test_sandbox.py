"""The sandbox stops what it claims to stop, and runs correct code."""

import socket
import time

import pytest

from chibichat.common import ChibiError
from chibichat.sandbox import run_python


def test_correct_code_passes_with_stdin_and_cwd_writes():
    code = (
        "import os\n"
        "name = input()\n"
        "open('note.txt', 'w').write('kept')\n"
        "os.mkdir('sub'); open('sub/a', 'w').write('x')\n"
        "print('hello', name, open('note.txt').read(), 'こんにちは')\n"
    )
    r = run_python(code, stdin="world\n")
    assert r.ok and r.returncode == 0 and not r.timed_out and r.error is None
    assert r.stdout == "hello world kept こんにちは\n"


def test_exception_reported():
    r = run_python("assert 1 == 2, 'nope'")
    assert not r.ok and r.returncode == 1
    assert "AssertionError: nope" in r.stderr and "AssertionError" in r.error


def test_infinite_loop_times_out():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert r.timed_out and not r.ok and "timed out" in r.error
    assert time.perf_counter() - t0 < 5


def test_bounded_fork_bomb_is_stopped():
    # Bounded so that a broken sandbox cannot take the machine down: at most 30 children.
    code = (
        "import os\n"
        "made = 0\n"
        "for _ in range(30):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        print('refused', type(e).__name__); break\n"
        "    if pid == 0:\n"
        "        os._exit(0)\n"
        "    made += 1\n"
        "print('children', made)\n"
    )
    r = run_python(code)
    assert r.ok, r.stderr
    assert "refused" in r.stdout
    made = int(r.stdout.split("children")[1])
    assert made < 30


def test_subprocess_and_os_system_refused():
    r = run_python("import subprocess\nsubprocess.run(['true'])")
    assert not r.ok and "not allowed" in r.stderr
    r = run_python("import os\nos.system('true')")
    assert not r.ok and "not allowed" in r.stderr


def test_threads_still_work():
    r = run_python("import threading\nt = threading.Thread(target=print, args=('t',))\nt.start(); t.join()")
    assert r.ok and r.stdout == "t\n"


def test_two_gigabyte_allocation_fails_but_small_one_works():
    r = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr
    r = run_python("x = bytearray(32 * 1024**2)\nprint(len(x))", memory_mb=256)
    assert r.ok and r.stdout == str(32 * 1024**2) + "\n"


def test_write_outside_temp_dir_refused(tmp_path):
    target = tmp_path / "escape.txt"
    for code in [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import os\nos.chdir('/')\nopen({str(target.relative_to('/'))!r}, 'w')",
        f"import shutil\nshutil.copy('/etc/hostname', {str(target)!r})",
    ]:
        r = run_python(code)
        assert not r.ok and "PermissionError" in r.stderr, code
        assert not target.exists()
    victim = tmp_path / "victim.txt"
    victim.write_text("safe")
    r = run_python(f"import os\nos.remove({str(victim)!r})")
    assert not r.ok and victim.read_text() == "safe"
    r = run_python(f"import os\nos.link({str(victim)!r}, 'hard')\nopen('hard', 'w').write('pwned')")
    assert not r.ok and victim.read_text() == "safe"


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')")
        assert not r.ok and "connected" not in r.stdout
    finally:
        server.close()


@pytest.mark.parametrize(
    "code",
    [
        "import ctypes",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        "import os\nos.kill(os.getppid(), 0)",
        "import sys\nsys.modules.get('ctypes').CDLL(None)",
    ],
)
def test_escape_hatches_refused(code):
    r = run_python(code)
    assert not r.ok


def test_output_size_is_bounded():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout_s=10)
    assert not r.ok and not r.timed_out
    assert len(r.stdout) <= 8 * 1024 * 1024


@pytest.mark.parametrize("kw", [{"timeout_s": 0}, {"timeout_s": -1}, {"memory_mb": 1}, {"memory_mb": 1.5}])
def test_bad_arguments(kw):
    with pytest.raises(ChibiError):
        run_python("print(1)", **kw)
