"""Run a stage script as `python script.py args` would, a hundred times faster than a subprocess.

A server process imports torch and this repository's modules once, then forks a child for each run
(a fresh copy of that process, with stdout and stderr sent to files at the file-descriptor level)
which runs the script as __main__ the way the interpreter would: a SystemExit message goes to stderr
with exit status 1, any other exception prints its traceback. The server never runs a torch
operation, so forking it is safe. Used by the bad-input tables, where each row is one short run, and
by the fault tests, which signal a run (Forked) while it trains.

It stays because the stage scripts stay flat scripts that run at import, as nanoGPT's do: each run
needs a fresh process, and a subprocess spends seconds importing torch where a fork spends milliseconds.
Why a server and not a fork of pytest itself: by the time a test runs, pytest's process has run
torch operations (its intra-op thread pool, maybe gloo's threads), and threads do not survive a
fork; it has also registered its own atexit handlers and may hold monkeypatched modules. The server
is a clean process that only imported modules. Its children run in its process group, so a run
past the timeout is ended with the server, and the next call starts a new one.
"""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER = r"""
import atexit, json, os, runpy, sys, traceback
sys.path.insert(0, REPO)
import torch, torch.distributed.checkpoint.state_dict, numpy
import checkpoint, configurator, chat, data, evaluate, hf, lora, model, optim, outdir, parallel, pipeline, runlog
import runtime, tokenizer
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                               (2, request["stderr"], os.O_WRONLY)):
            os.dup2(os.open(path, mode), fd)
        sys.stdin = open(os.devnull)
        sys.argv = [request["script"], *request["args"]]
        code = 0
        try:
            runpy.run_path(request["script"], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # the script's own, such as releasing an out_dir lock
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
""".replace("REPO", repr(REPO))

TIMEOUT = 600  # seconds, as conftest.run_script's

_server = None


class Forked:
    """A run of REPO/script with args in a child forked from the server: pid, the child's id (to signal
    it, as a test of interrupts does), stdout_path (to watch), and wait() for its result. One at a time."""

    def __init__(self, script, *args):
        global _server
        if _server is None:
            _server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=REPO, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, start_new_session=True,
                                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
            atexit.register(_server.stdin.close)
        self.folder = tempfile.TemporaryDirectory()
        self.stdout_path, self.stderr_path = (os.path.join(self.folder.name, name) for name in ("stdout", "stderr"))
        for path in (self.stdout_path, self.stderr_path):
            open(path, "w").close()
        self.command = f"{script} {' '.join(args)}"
        _server.stdin.write(json.dumps({"script": os.path.join(REPO, script), "args": list(args),
                                        "stdout": self.stdout_path, "stderr": self.stderr_path}) + "\n")
        _server.stdin.flush()
        self.pid = int(self._reply())

    def _reply(self):
        global _server
        if not select.select([_server.stdout], [], [], TIMEOUT)[0]:
            os.killpg(_server.pid, signal.SIGKILL)  # the server and the child still running
            _server.wait()
            _server = None
            raise AssertionError(f"{self.command} did not finish in {TIMEOUT} s")
        reply = _server.stdout.readline()
        if not reply:
            _server = None
            raise AssertionError("the fork server of tests/forked.py died; its traceback is above")
        return reply

    def wait(self):
        """The finished run: an object with returncode, stdout and stderr."""
        returncode = int(self._reply())
        with open(self.stdout_path) as f_out, open(self.stderr_path) as f_err:
            result = SimpleNamespace(returncode=returncode, stdout=f_out.read(), stderr=f_err.read())
        self.folder.cleanup()
        return result


def run_forked(script, *args):
    """Run REPO/script with args in a forked child; return an object with returncode, stdout and stderr."""
    return Forked(script, *args).wait()


def error_line(result):
    """The one line a failed run printed, after checking it failed without a traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    return lines[0]
