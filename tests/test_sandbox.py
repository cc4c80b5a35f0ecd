"""sandbox.py, the only code that runs model-written programs: hostile programs are contained, each scored as a
failure, and the programs after them still run. A few seconds in all (the timeouts are one second)."""

import os
import socket
import threading
import time

import pytest

import sandbox
from conftest import REPO
from sandbox import isolation, run_program, run_programs

FAST = dict(timeout=1.0, memory_mb=512)


@pytest.fixture(scope="module")
def mode():
    mode = isolation()["mode"]
    if mode == "none":
        pytest.skip("this machine allows no namespaces (as root or unprivileged): hostile programs would run as this "
                    "user, with resource limits only; see sandbox.py")
    return mode


def test_a_program_that_runs_to_its_end_passes_and_its_output_comes_back():
    result = run_program("import math, typing, collections\nprint(math.factorial(5))\nassert sum([1, 2]) == 3", **FAST)
    assert result.passed and result.status == "passed" and result.output == "120\n"


def test_an_exception_a_failed_assert_or_a_syntax_error_fails():
    for source in ("raise ValueError('no')", "assert 1 == 2", "def f(:\n  pass"):
        result = run_program(source, **FAST)
        assert not result.passed and result.status == "exit status 1", source


def test_hostile_programs_are_contained_and_fail_while_the_evaluation_goes_on(mode, tmp_path, monkeypatch):
    repo_file = os.path.join(REPO, "sandbox_was_here.txt")
    host_tmp_file = os.path.join("/tmp", f"sandbox_was_here_{os.getpid()}.txt")
    home_secret = os.path.join(os.path.expanduser("~"), f".sandbox_test_secret_{os.getpid()}")
    with open(home_secret, "w") as f:
        f.write("hunter2")
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "hunter2")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(4)
    connections = []
    waiter = threading.Thread(target=lambda: connections.append(_accept(listener)), daemon=True)
    waiter.start()
    me = os.getpid()
    hostile = {
        "infinite loop": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "thread": "import threading\nthreading.Thread(target=print).start()",
        "allocate 50 GB": "x = bytearray(50 * 2**30)",
        "write a 10 GB file": "with open('big', 'wb') as f:\n    for _ in range(10240):\n        f.write(bytes(2**20))",
        "write into the repository": f"open({repo_file!r}, 'w').write('x')",
        "write into the host's /tmp": f"open({host_tmp_file!r}, 'w').write('x')",
        "read a secret in the home folder": f"print(open({home_secret!r}).read())",
        "read the environment": "import os\nprint(os.environ['SANDBOX_TEST_SECRET'])",
        "read the evaluator's environment": f"print(open('/proc/{me}/environ').read())",
        "open a socket to 127.0.0.1": f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), 1)",
        "kill its parent": "import os, time\nos.kill(os.getppid(), 9)\ntime.sleep(0.5)",
        "kill the evaluator": f"import os\nos.kill({me}, 9)",
        "sys.exit(0) before the tests": "import sys\nsys.exit(0)\nassert False",
        "os._exit(0) before the tests": "import os\nos._exit(0)\nassert False",
        "print 1 GB": "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)",
        "escape its session and sleep": "import os, time\nos.setsid()\ntime.sleep(30)",
        "read from standard input": "import sys\nprint(sys.stdin.read())",
    }
    try:
        results = run_programs([*hostile.values(), "assert 2 + 2 == 4"], workers=4, **FAST)
    finally:
        os.remove(home_secret)
        listener.close()
        waiter.join(5)
    for (name, _), result in zip(hostile.items(), results):
        print(f"{name:<36} {result.status:<22} {result.seconds:.2f} s  {result.output.strip()[-70:]!r}")
        assert not result.passed, name
        assert "hunter2" not in result.output, name
        assert result.seconds < 3, name
    assert results[-1].passed  # the evaluation went on
    assert not os.path.exists(repo_file) and not os.path.exists(host_tmp_file)
    assert connections == [None]  # the listener saw no connection
    assert "Network is unreachable" in results[list(hostile).index("open a socket to 127.0.0.1")].output
    assert not _sandbox_processes(), "a sandboxed process outlived its run"


def test_without_namespaces_the_limits_alone_still_contain_what_they_bound(monkeypatch):
    # Runs on every machine, also one (a CI container, say) where the table above skips: what the resource
    # limits, the timeout and the pass token stop does not depend on namespaces.
    monkeypatch.setitem(sandbox._modes, "best", "none")
    bounded = {
        "infinite loop": ("while True:\n    pass", "timed out or killed by signal 24"),  # or the CPU limit first
        "fork bomb": ("import os\nwhile True:\n    os.fork()", "exit status 1"),
        "thread": ("import threading\nthreading.Thread(target=print).start()", "exit status 1"),
        "allocate 50 GB": ("x = bytearray(50 * 2**30)", "exit status 1"),
        "write a 10 GB file": ("with open('big', 'wb') as f:\n    for _ in range(10240):\n        f.write(bytes(2**20))",
                               "exit status 1"),
        "sys.exit(0) before the tests": ("import sys\nsys.exit(0)\nassert False", "exit status 0"),
        "print 1 GB": ("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)", "output limit"),
        "escape its session and sleep": ("import os, time\nos.setsid()\ntime.sleep(30)", "timed out"),
    }
    # A longer timeout than FAST's: each program must be stopped by its own limit, not by a loaded machine's clock.
    results = run_programs([source for source, _ in bounded.values()], workers=4, timeout=4.0, memory_mb=512)
    for (name, (_, expected)), result in zip(bounded.items(), results):
        assert result.status in expected.split(" or "), (name, result)
    assert "File too large" in results[list(bounded).index("write a 10 GB file")].output  # the file-size limit
    assert "MemoryError" in results[list(bounded).index("allocate 50 GB")].output
    assert not any(r.passed for r in results) and all(r.seconds < 6 for r in results)
    # The program that left its session dies of its parent-death signal, a moment after its run ends.
    deadline = time.monotonic() + 2
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _sandbox_processes(), "a sandboxed process outlived its run by two seconds"
    after = run_program("assert 2 + 2 == 4", timeout=10)  # the evaluation goes on (a loaded machine's start-up time)
    assert after.passed, after


def test_the_working_directory_is_empty_writable_and_removed_afterwards(mode):
    source = "import os\nassert os.listdir('.') == [], os.listdir('.')\nopen('f', 'w').write('x')\nprint(os.getcwd())"
    result = run_program(source, **FAST)
    assert result.passed, result.output
    assert not os.path.exists(result.output.strip())


def _accept(listener):
    try:
        return listener.accept()
    except OSError:  # timed out, or closed: nothing connected
        return None


def _sandbox_processes():
    """Processes still running sandbox.py's child."""
    found, script = [], os.path.abspath(sandbox.__file__).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if script in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            pass
    return found
