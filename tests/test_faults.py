"""What a run survives, pinned: stopped by signals mid-run and resumed twice, it ends as one
uninterrupted run; killed (SIGKILL) halfway through writing a checkpoint, it resumes from the one
before; two prepare runs into one folder leave what one would; two torchrun agents train as a
two-node job on 127.0.0.1, and when one of their processes is killed both agents end in bounded
time; prepare's worker pool ends without a hang with batches still in flight; a download resumes
a dropped connection; a server answers misbehaving clients (and a temperature or top_p too small
for float32, a stop string of 500,000 characters) and goes on; programs that fight the
sandbox fail in their time; and a checkpoint crafted to run code when unpickled runs nothing in any
stage that loads checkpoints.

The tables take a row per stage or fault: a new trainer adds itself to TRAINERS, a new reader of
checkpoints to CHECKPOINT_READERS, a new way for a torchrun job to fail to TORCHRUN_FAULTS. Every
process here runs on one thread (OMP_NUM_THREADS=1), so runs that should agree do so bit for bit.
(The first 18 tests, about 130 CPU-seconds, the shared tiny_checkpoint and tiny_sft_checkpoint fixtures
included: 8 minutes on 2 cores shared with other jobs at load 12. The 12 tests round 3 added took
about 40-55 s more at load 18: translate.py's signals 22-31 s, the server 10-12 s, the rest a few seconds.
Round 4's 4 tests (rl.py's signals and crafted checkpoints) and three requests to the server took
about 11 s at load 5, rl.py's signals 10 s of it. 34 tests in all.)
"""

import hashlib
import http.server
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import REPO, TINY_MODEL, TOY_INSTRUCTIONS, TOY_VAL_FRACTION, assert_same_weights, weights
from forked import Forked, run_forked
from test_rl import TOY_PROMPTS

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
TOY_PAIRS = [  # the chosen answers are the ones SFT taught (TOY_INSTRUCTIONS)
    {"instruction": "What is 2+2?", "chosen": "Four.", "rejected": "Five."},
    {"instruction": "Say hi.", "chosen": "Hi there!", "rejected": "Go away."},
    {"instruction": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
]


def train_args(fixtures, root):
    return [*TINY_MODEL, f"--data_root={fixtures['tiny_data_root']}", "--dataset=tiny", "--learning_rate=1e-2",
            "--warmup_iters=1", "--max_iters=40", "--eval_interval=4", "--init_from=auto"]


def sft_args(fixtures, root):
    (root / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))
    return ["--device=cpu", f"--init_from={fixtures['tiny_checkpoint']}/ckpt.pt", f"--data={root / 'toy.json'}",
            f"--val_fraction={TOY_VAL_FRACTION}", "--batch_size=2", "--total_batch_size=4", "--max_iters=40",
            "--eval_interval=4", "--log_interval=1", "--learning_rate=1e-2", "--warmup_iters=1", "--resume=auto"]


def dpo_args(fixtures, root):
    (root / "pairs.json").write_text(json.dumps(TOY_PAIRS))
    return ["--device=cpu", f"--init_from={fixtures['tiny_sft_checkpoint']}/ckpt.pt", f"--data={root / 'pairs.json'}",
            "--val_fraction=0.3", "--batch_size=1", "--total_batch_size=2", "--max_iters=40", "--eval_interval=4",
            "--log_interval=1", "--beta=0.5", "--learning_rate=1e-3", "--warmup_iters=1", "--resume=auto"]


def translate_args(fixtures, root):
    numbers = ["null", "eins", "zwei", "drei", "vier"], ["zero", "one", "two", "three", "four"]
    for side, words in zip(("de", "en"), numbers):
        (root / f"pairs.{side}").write_text("".join(f"{words[i % 5]} {words[i // 5 % 5]}.\n" for i in range(60)))
    return ["--device=cpu", f"--data={root}/pairs.de,{root}/pairs.en", "--val_fraction=0.1", "--test_data=",
            "--vocab_size=280", "--block_size=8", "--n_layer=1", "--n_encoder_layer=1", "--n_head=2", "--n_embd=32",
            "--batch_size=4", "--total_batch_size=8", "--max_iters=16", "--eval_interval=4", "--log_interval=1",
            "--warmup_iters=1", "--beam_size=1", "--resume=auto"]


def rl_args(fixtures, root):
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in TOY_PROMPTS))
    return ["--device=cpu", f"--init_from={fixtures['tiny_sft_checkpoint']}/ckpt.pt", f"--data={root}/prompts.jsonl",
            f"--held_out={root}/prompts.jsonl", "--batch_size=1", "--prompts_per_step=2", "--group_size=4",
            "--max_new_tokens=8", "--max_iters=12", "--eval_interval=4", "--learning_rate=1e-2", "--min_lr=1e-3",
            "--warmup_iters=1", "--temperature=1.5", "--resume=auto"]  # 1.5: groups with signal (tests/test_rl.py)


# Trainers: the script, the fixtures its arguments need, and the arguments of a short run (40 steps, a
# checkpoint every 4) that resumes the newest checkpoint of its out_dir if there is one.
TRAINERS = {
    "train": ("train.py", ["tiny_data_root"], train_args),
    "sft": ("sft.py", ["tiny_checkpoint"], sft_args),
    "dpo": ("dpo.py", ["tiny_sft_checkpoint"], dpo_args),
    "translate": ("translate.py", [], translate_args),
    "rl": ("rl.py", ["tiny_sft_checkpoint"], rl_args),
}


@pytest.fixture
def trainer(request, tmp_path):
    """(script, arguments) of the TRAINERS row the test is parametrized with."""
    script, needs, args = TRAINERS[request.param]
    return script, args({name: request.getfixturevalue(name) for name in needs}, tmp_path)


def start(script, *args):
    """Start a script of the repository (a path under it, or `-m module`) in its own process group."""
    command = [sys.executable, *(script if isinstance(script, list) else [os.path.join(REPO, script)]), *args]
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process, timeout=300):
    """Wait for process; returns (returncode, stdout, stderr)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, stdout, stderr


def succeed(script, *args):
    """Run script to its end in a forked child (tests/forked.py); returns its stdout."""
    result = run_forked(script, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def signal_at_first_save(signum, script, *args):
    """Run script in a forked child and send it signum once it has saved a checkpoint (its 'saving ...'
    line): the runs have many steps left then, so the signal comes mid-run. Returns the child's result."""
    run = Forked(script, *args)
    deadline = time.time() + 300
    while "\nsaving " not in "\n" + open(run.stdout_path).read():
        assert time.time() < deadline, f"{script} saved no checkpoint in 300 s"
        time.sleep(0.01)
    os.kill(run.pid, signum)
    result = run.wait()
    assert result.returncode != 0, "the run ended before the signal came:\n" + result.stdout + result.stderr
    return result


def stopped_at(stderr):
    """The step a signal stopped a run at, from its last line (or every process's, under torchrun)."""
    return {int(line.split(" at step ")[1].split(":")[0]) for line in stderr.splitlines()
            if line.startswith("stopped by SIG")}


def assert_same_run(stopped, whole, stops):
    """stopped (resumed after each stop) logged what whole did, plus an evaluation where each stop
    came (a stopped run evaluates and saves as at its end), and ends with its weights."""
    extra = [r for r in records(stopped) if r not in records(whole)]
    assert all(r["step"] in stops and "lr" not in r for r in extra), extra
    assert [r for r in records(stopped) if r not in extra] == records(whole)
    assert_same_weights(weights(stopped), weights(whole))


def records(out_dir):
    """metrics.jsonl without wall-clock times, each record once: a resumed run evaluates again at the
    step it resumes from, and finds what the stopped run found there."""
    unique = []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            record = {k: v for k, v in json.loads(line).items()
                      if k not in ("time", "compile_seconds", "train_seconds") and not k.endswith("tokens_per_sec")}
            if record not in unique:
                unique.append(record)
    return unique


def newest_checkpoint_step(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["step"]


# -----------------------------------------------------------------------------
# signals, kills during a save, resumes


@pytest.mark.parametrize("trainer, signals", [("train", ("SIGINT", "SIGTERM", "SIGUSR1")), ("sft", ("SIGUSR1", "SIGINT")),
                                              ("dpo", ("SIGTERM", "SIGINT")), ("translate", ("SIGTERM", "SIGINT")),
                                              ("rl", ("SIGUSR1", "SIGINT"))],
                         indirect=["trainer"])
def test_stopped_by_signals_and_resumed_each_time_a_run_ends_as_one_uninterrupted_run(trainer, signals, tmp_path):
    script, args = trainer
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    succeed(script, *args, f"--out_dir={whole}")
    stops = set()
    for signum in signals:
        result = signal_at_first_save(getattr(signal, signum), script, *args, f"--out_dir={stopped}")
        assert "Traceback" not in result.stderr, result.stderr
        if signum == "SIGINT":  # Ctrl-C: one line naming the newest checkpoint, which a background save finished
            assert result.returncode == 130, result.stderr
            assert result.stderr.startswith("interrupted: the newest checkpoint is "), result.stderr
        else:  # preemption: the step in flight finishes, and every step done is saved
            (step,) = stops_here = stopped_at(result.stderr)
            assert result.returncode == 128 + getattr(signal, signum), result.stderr
            assert result.stderr == f"stopped by {signum} at step {step}: saved {stopped}/ckpt-{step:07d}.pt; " \
                f"continue with {'--init_from=auto' if script == 'train.py' else '--resume=yes'}\n"
            assert newest_checkpoint_step(stopped) == step == max(r["step"] for r in records(stopped))
            stops |= stops_here
    assert "resuming" in succeed(script, *args, f"--out_dir={stopped}")
    assert_same_run(stopped, whole, stops)


def test_killed_while_writing_a_checkpoint_a_run_resumes_from_the_one_before(tiny_data_root, tmp_path):
    args = train_args({"tiny_data_root": tiny_data_root}, tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    succeed("train.py", *args, f"--out_dir={whole}")
    # the third checkpoint, of step 12, is half written when the process is killed
    assert run_forked("tests/killed_in_save.py", "3", "train.py", *args, f"--out_dir={killed}").returncode == \
        -signal.SIGKILL
    half_written = [name for name in os.listdir(killed) if name.endswith(".tmp")]
    assert [name.split(".")[0] for name in half_written] == ["ckpt-0000012"]
    assert newest_checkpoint_step(killed) == 8
    stdout = succeed("train.py", *args, f"--out_dir={killed}")
    assert "removed 1 temporary files" in stdout and "at step 8" in stdout
    assert not [name for name in os.listdir(killed) if name.endswith(".tmp")]
    assert records(killed) == records(whole)
    assert_same_weights(weights(killed), weights(whole))


# -----------------------------------------------------------------------------
# two prepare runs into one folder; prepare's pool with batches in flight


class SlowServer(http.server.BaseHTTPRequestHandler):
    """Serves server.data at any path in 16 KB pieces over about a second, so that two runs that start
    together download at the same time."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.data)))
        self.end_headers()
        for start in range(0, len(self.server.data), 1 << 14):
            self.wfile.write(self.server.data[start : start + (1 << 14)])
            time.sleep((1 << 14) / len(self.server.data))

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy configured in the environment must not see loopback requests
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowServer)
    httpd.data = b"".join(open(os.path.join(REPO, name), "rb").read() for name in sorted(os.listdir(REPO))
                          if name.endswith(".py"))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_two_prepare_runs_downloading_into_one_folder_leave_what_one_run_leaves(tmp_path, slow_server):
    # as every node of a job would, preparing onto one shared folder
    url = f"http://127.0.0.1:{slow_server.server_port}/corpus.txt"
    args = [f"--input={url}", f"--input_sha256={hashlib.sha256(slow_server.data).hexdigest()}", "--dataset=code",
            "--num_workers=2", "--max_document_chars=20000"]
    alone, together = tmp_path / "alone", tmp_path / "together"
    succeed("prepare.py", *args, f"--data_root={alone}")
    both = [start("prepare.py", *args, f"--data_root={together}") for _ in range(2)]
    outputs = [finish(process) for process in both]
    for returncode, stdout, stderr in outputs:
        assert returncode == 0 and "Traceback" not in stderr, stdout + stderr
    assert any("using the cached download" in stdout for _, stdout, _ in outputs)  # one waited for the other's
    assert sorted(os.listdir(together / "code")) == sorted(os.listdir(alone / "code"))
    assert os.listdir(together / "code" / "download") == ["corpus.txt"]
    for name in ("train.bin", "val.bin"):
        assert (together / "code" / name).read_bytes() == (alone / "code" / name).read_bytes()
    metas = [json.loads((root / "code" / "meta.json").read_text()) for root in (alone, together)]
    assert metas[1]["splits"] == metas[0]["splits"]


class DroppingServer(http.server.BaseHTTPRequestHandler):
    """At /resumes/NAME the first response drops after a third of server.data and a Range request gets
    the rest (206); at /drops/NAME every response drops so, Range or not; at /whole/NAME all of it."""

    def do_GET(self):
        mode = self.path.split("/")[1]
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        ranged = mode == "resumes" and start > 0
        body = self.server.data[start if ranged else 0 :]
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "drops" or (mode == "resumes" and not ranged):
            body = body[: len(body) // 3]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


DATA_SHA256 = "sha256 of the served data"
# (where the file is asked for, what is expected, what the download prints or says in one line)
DOWNLOAD_FAULTS = [
    ("resumes", DATA_SHA256, "failed (ChunkedEncodingError); resuming"),
    ("drops", DATA_SHA256, "fault error: could not download http://{host}/drops/data.bin (ChunkedEncodingError"),
    ("whole", "0" * 64, "fault error: http://{host}/whole/data.bin has sha256 "),
    ("whole/into_a_file", DATA_SHA256, "fault error: cannot create {folder} ("),
]


@pytest.mark.parametrize("where, sha256, expected", DOWNLOAD_FAULTS, ids=[w for w, _, _ in DOWNLOAD_FAULTS])
def test_a_download_resumes_a_dropped_connection_and_otherwise_fails_in_one_line_leaving_no_file(
        where, sha256, expected, tmp_path, monkeypatch, capsys):
    from download import download
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DroppingServer)
    httpd.data = bytes(range(256)) * 4096  # 1 MB
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{httpd.server_port}"
    folder = tmp_path / "downloads"
    if where.endswith("into_a_file"):
        (tmp_path / "a_file").write_text("the user's\n")
        folder = tmp_path / "a_file" / "downloads"
    sha256 = hashlib.sha256(httpd.data).hexdigest() if sha256 == DATA_SHA256 else sha256
    try:
        if where == "resumes":
            path, digest = download(f"http://{host}/resumes/data.bin", sha256, str(folder), stage="fault",
                                    local_option="--input", sha256_option="--url_sha256=")
            assert open(path, "rb").read() == httpd.data and digest == sha256 and os.listdir(folder) == ["data.bin"]
            assert expected in capsys.readouterr().out
            return
        with pytest.raises(SystemExit) as stopped:
            download(f"http://{host}/{where.split('/')[0]}/data.bin", sha256, str(folder), stage="fault",
                     local_option="--input", sha256_option="--url_sha256=")
    finally:
        httpd.shutdown()
        httpd.server_close()
    line = str(stopped.value)
    assert "\n" not in line and line.startswith(expected.format(host=host, folder=folder)), line
    assert not folder.exists() or not [n for n in os.listdir(folder) if n == "data.bin"]


POOL_WITH_BATCHES_IN_FLIGHT = r"""
import random, sys, time
sys.path.insert(0, sys.argv[1])
from prepare import worker_pool

def clean(seed):  # a batch of cleaned text comes back as about 1 MB, more than a pipe holds
    time.sleep(random.Random(seed).random() * 0.02)
    return b"x" * (1 << 20)

if __name__ == "__main__":
    for attempt in range(10):
        with worker_pool(8, None, ()) as pool:
            in_flight = [pool.apply_async(clean, (16 * attempt + k,)) for k in range(16)]
            in_flight[0].get()  # then stop, as prepare does at max_tokens, with the rest still running
    print("ended")
"""


def test_prepares_worker_pool_ends_with_large_batches_still_in_flight(tmp_path):
    # multiprocessing.Pool's own `with` hung in 26 of 40 such pools (one worker killed while it held the
    # result queue's lock); prepare hung so after "stopping at the limit" in 2 of 200 runs
    (tmp_path / "pool.py").write_text(POOL_WITH_BATCHES_IN_FLIGHT)
    returncode, stdout, stderr = finish(start([str(tmp_path / "pool.py"), REPO]), timeout=120)
    assert returncode == 0 and stdout == "ended\n", stderr


# -----------------------------------------------------------------------------
# a server meeting clients that misbehave


def raw_exchange(port, data, seconds):
    """Send data on a new connection to 127.0.0.1:port, and read what comes back for up to seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as connection:
        connection.sendall(data)
        reply = b""
        try:
            while chunk := connection.recv(1 << 16):
                reply += chunk
        except TimeoutError:
            pass
    return reply


def test_a_server_answers_misbehaving_clients_with_4xx_and_goes_on_serving_with_no_traceback(tiny_sft_checkpoint):
    pytest.importorskip("fastapi", reason="serve.py needs fastapi and uvicorn: pip install fastapi uvicorn")
    pytest.importorskip("uvicorn", reason="serve.py needs fastapi and uvicorn: pip install fastapi uvicorn")
    server = start("serve.py", f"--out_dir={tiny_sft_checkpoint}", "--device=cpu", "--port=0", "--slots=2",
                   "--max_queue=4")
    try:
        line = server.stdout.readline()
        assert line.startswith("serving "), line + server.stderr.read()
        port = int(line.rsplit(":", 1)[1].strip(" /\n"))
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"

        def post(body, seconds=10):
            return raw_exchange(port, head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body, seconds)

        # a lone surrogate escape, which is JSON but not text: a 400, not a 500
        reply = post(b'{"prompt": "\\ud800x"}')
        assert reply.startswith(b"HTTP/1.1 400") and b"lone surrogate" in reply, reply
        # a client that promises 100 bytes, sends 11 and leaves
        raw_exchange(port, head + b'Content-Length: 100\r\n\r\n{"prompt": ', 0.5)
        # a TLS hello to a plain-HTTP port
        assert raw_exchange(port, bytes.fromhex("160301020001000001fc0303") + bytes(100), 10).startswith(b"HTTP/1.1 400")
        # a temperature or top_p too small for float32 (was a 500: NaN probabilities), and a stop string of 500,000
        # characters (was a quadratic scan at every token: minutes, every slot waiting)
        for body in ({"prompt": "x", "max_tokens": 4, "temperature": 1e-300}, {"prompt": "x", "max_tokens": 4, "top_p": 1e-50},
                     {"prompt": "x", "max_tokens": 8, "stop": ["y" * 500_000]}):
            reply = post(json.dumps(body).encode(), 20)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        # 20 requests at once on 2 slots and a queue of 4: each is answered or told to retry
        def complete(n):
            reply = post(json.dumps({"prompt": "x" * n, "max_tokens": 8, "temperature": 0}).encode(), 60)
            return int(reply.split(b" ", 2)[1])

        with ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(complete, [1 + i % 5 for i in range(20)]))
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 2, statuses
        deadline = time.time() + 10
        while True:  # every slot freed: the last answers were sent a moment before their slots were
            health = json.loads(raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                             b"Connection: close\r\n\r\n", 10).split(b"\r\n\r\n", 1)[1])
            if health["status"] == "ok" and health["running"] == health["waiting"] == 0:
                break
            assert time.time() < deadline, health
            time.sleep(0.05)
    finally:
        server.send_signal(signal.SIGINT)
        returncode, stdout, stderr = finish(server, timeout=30)
    assert "Traceback" not in stdout + stderr, stdout + stderr


# -----------------------------------------------------------------------------
# model-written programs that fight the sandbox (tests/test_sandbox.py has the first set)

HOSTILE_PROGRAMS = {
    "segfault": "import ctypes\nctypes.string_at(0)",
    "ignore every signal, then loop": "import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU, "
                                      "signal.SIGINT):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass",
    "sleep": "import time\ntime.sleep(100)",
    "raise its memory limit": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)\n"
                              "x = bytearray(4 * 2**30)",
    "a detached child that sleeps": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                                    "time.sleep(60)",
    "fill /dev/shm": "open('/dev/shm/sandbox_fault_test', 'wb').write(bytes(2**30))",
    "100,000 files": "for i in range(100000):\n    open(f'f{i}', 'w')",
    "10,000 threads": "import threading, time\nfor _ in range(10000):\n    threading.Thread(target=time.sleep, args=(10,)).start()",
    "a UDP packet out": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))",
}


def test_programs_that_fight_the_sandbox_fail_within_their_time_and_the_evaluation_goes_on():
    from sandbox import isolation, run_programs
    if isolation()["mode"] == "none":
        pytest.skip("this machine allows no namespaces: hostile programs would run with resource limits only")
    results = run_programs([*HOSTILE_PROGRAMS.values(), "assert 2 + 2 == 4"], workers=4, timeout=1.0, memory_mb=512)
    for name, result in zip(HOSTILE_PROGRAMS, results):
        assert not result.passed and result.seconds < 3, (name, result)
    assert results[-1].passed  # the evaluation goes on
    assert not os.path.exists("/dev/shm/sandbox_fault_test")


# -----------------------------------------------------------------------------
# two torchrun agents as a two-node job on 127.0.0.1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_nodes(*args):
    """Two torchrun agents, node 0 and node 1 of a job on 127.0.0.1, one training process each."""
    port = free_port()
    return [start(["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", os.path.join(REPO, "train.py")], *args)
            for node in (0, 1)]


def until_first_save(process):
    """Read process's output until it says it is saving a checkpoint; returns what it read."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("saving "):
            return "".join(seen)
    raise AssertionError("the run ended without saving a checkpoint:\n" + "".join(seen) + process.stderr.read())


def signal_agent(signum):
    return lambda agent: agent.send_signal(signum)


def kill_a_worker(agent):
    os.kill(child_pids(agent.pid)[-1], signal.SIGKILL)


# Faults a torchrun job meets, each given to a run once it has saved a checkpoint: the torchrun flags
# the row needs, what the test does to the job, and whether the job then finishes by itself (else it is
# started again with the same command). A new fault adds a row.
TORCHRUN_FAULTS = [
    ("SIGTERM to torchrun", [], signal_agent(signal.SIGTERM), False),
    # without --signals-to-handle=...,SIGUSR1 torchrun dies of it; its processes, told so by the kernel
    # (SIGTERM), stop as above (with the flag, torchrun passes SIGUSR1 on as it does SIGTERM)
    ("SIGUSR1 to torchrun", [], signal_agent(signal.SIGUSR1), False),
    ("a worker killed, --max-restarts=1", ["--max-restarts=1"], kill_a_worker, True),
]


def test_a_torchrun_job_meeting_every_fault_in_turn_ends_as_one_uninterrupted_job(tiny_data_root, tmp_path):
    args = [*train_args({"tiny_data_root": tiny_data_root}, tmp_path), "--max_iters=24"]

    def torchrun(out_dir, flags=()):
        return start(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *flags,
                      os.path.join(REPO, "train.py")], *args, f"--out_dir={out_dir}")

    whole, faulted = tmp_path / "whole", tmp_path / "faulted"
    returncode, stdout, stderr = finish(torchrun(whole))
    assert returncode == 0, stdout + stderr
    stops = set()
    for name, flags, fault, recovers in TORCHRUN_FAULTS:
        job = torchrun(faulted, flags)
        seen = until_first_save(job)
        fault(job)
        returncode, stdout, stderr = finish(job)
        assert (returncode == 0) == recovers, f"{name}:\n{seen}{stdout}{stderr}"
        if not recovers:  # stopped by a signal: both processes at the same step, and every step done is saved
            (step,) = stops_here = stopped_at(stderr)
            assert newest_checkpoint_step(faulted) == step == max(r["step"] for r in records(faulted)), \
                f"{name}:\n{seen}{stdout}{stderr}"
            stops |= stops_here
    assert "resuming" in stdout and "done: val loss" in stdout
    assert_same_run(faulted, whole, stops)


def test_two_torchrun_agents_train_as_a_two_node_job_like_one_process_and_end_when_one_process_is_killed(
        tiny_data_root, tmp_path):
    # lr_decay_iters fixes the schedule, so the first 5 steps are the same in a 5-step and an endless run
    args = [*TINY_MODEL, f"--data_root={tiny_data_root}", "--dataset=tiny", "--learning_rate=1e-2",
            "--warmup_iters=1", "--lr_decay_iters=100000", "--eval_interval=5", "--keep_checkpoints=1000"]
    succeed("train.py", *args, "--max_iters=5", f"--out_dir={tmp_path / 'one'}")
    agents = start_two_nodes(*args, "--max_iters=100000", "--log_interval=100", f"--out_dir={tmp_path / 'two'}")
    try:
        deadline = time.time() + 300
        while not os.path.exists(tmp_path / "two" / "ckpt-0000010.pt"):  # training is under way
            assert time.time() < deadline and all(a.poll() is None for a in agents), "no checkpoint appeared"
            time.sleep(0.05)
        (worker,) = child_pids(agents[1].pid)
        os.kill(worker, signal.SIGKILL)
        killed = time.time()
        ends = [finish(agent, timeout=90) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
    assert time.time() - killed < 90 and all(returncode != 0 for returncode, _, _ in ends)
    assert "x 2 processes" in ends[0][1]
    step_5 = torch.load(tmp_path / "two" / "ckpt-0000005.pt", weights_only=True)["model"]
    assert_same_weights(step_5, weights(tmp_path / "one"), atol=1e-5)


def child_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


# -----------------------------------------------------------------------------
# a checkpoint crafted to run code when unpickled


class CreatesAFile:
    """Unpickling this calls open(path, 'w'): code from the file, run by the reader."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# (script, arguments, what the output says). {bad} is a crafted checkpoint, {bad_run} an out_dir whose newest
# checkpoint is one, {adapters} a LoRA checkpoint whose base is one (its sha256 recorded, so only unpickling
# can stop it). A new stage that reads checkpoints adds its rows.
CHECKPOINT_READERS = [
    ("train.py", "--init_from=resume --out_dir={bad_run}", "is corrupt or not a checkpoint"),
    ("train.py", "--init_from=auto --out_dir={bad_run} --max_iters=1", "trying the previous checkpoint"),
    ("sft.py", "--init_from={bad}", "is corrupt or not a checkpoint"),
    ("sft.py", "--init_from={bad_run}/ckpt.pt --resume=yes --out_dir={bad_run}", "has no checkpoint that loads"),
    ("dpo.py", "--init_from={bad}", "is corrupt or not a checkpoint"),
    ("sample.py", "--ckpt={bad}", "is corrupt or not a checkpoint"),
    ("sample.py", "--ckpt={adapters}", "is corrupt or not a checkpoint"),
    ("evaluate.py", "--ckpt={bad} --tasks=perplexity", "is corrupt or not a checkpoint"),
    ("export.py", "--ckpt={bad} --folder={out}", "is corrupt or not a checkpoint"),
    ("export.py", "--ckpt={adapters} --folder={out}", "is corrupt or not a checkpoint"),
    ("export.py", "--ckpt={bad} --format=gguf --file={out}/model.gguf", "is corrupt or not a checkpoint"),
    ("serve.py", "--ckpt={bad}", "is corrupt or not a checkpoint"),
    ("serve.py", "--ckpt={adapters}", "is corrupt or not a checkpoint"),
    ("translate.py", "--resume=yes --out_dir={bad_run}", "has no checkpoint that loads"),
    ("evaluate.py", "--ckpt={bad} --parallel_data={out}/pairs.jsonl", "is corrupt or not a checkpoint"),
    ("rl.py", "--init_from={bad}", "is corrupt or not a checkpoint"),
    ("rl.py", "--init_from={adapters}", "is corrupt or not a checkpoint"),
    ("rl.py", "--resume=yes --out_dir={bad_run}", "has no checkpoint that loads"),
]


@pytest.fixture(scope="module")
def crafted(tiny_checkpoint, tmp_path_factory):
    """The crafted files (see CHECKPOINT_READERS), and the file their unpickling would create."""
    root = tmp_path_factory.mktemp("crafted")
    marker = root / "code_ran"
    good = torch.load(os.path.join(tiny_checkpoint, "ckpt.pt"), weights_only=True)
    torch.save({**good, "model_config": CreatesAFile(str(marker))}, root / "bad.pt")
    torch.load(root / "bad.pt", weights_only=False)  # what a plain torch.load would do
    assert marker.exists()
    marker.unlink()
    (root / "bad_run").mkdir()
    with open(root / "bad_run" / "ckpt-0000009.pt", "wb") as f:  # the older format: a bare pickle
        pickle.dump({"model_config": good["model_config"], "model": CreatesAFile(str(marker)),
                     "tokenizer": good["tokenizer"]}, f)
    os.link(root / "bad_run" / "ckpt-0000009.pt", root / "bad_run" / "ckpt.pt")
    with open(root / "bad.pt", "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    lora = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["c_attn"]}
    torch.save({**good, "kind": "sft", "model": {}, "lora": lora,
                "base": {"path": str(root / "bad.pt"), "step": 4, "sha256": sha256}}, root / "adapters.pt")
    (root / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in TOY_PROMPTS))
    return root, marker


@pytest.mark.parametrize("script, args, expected", CHECKPOINT_READERS,
                         ids=[f"{s[:-3]} {a}" for s, a, _ in CHECKPOINT_READERS])
def test_a_checkpoint_crafted_to_run_code_runs_nothing(crafted, tiny_data_root, script, args, expected, tmp_path):
    root, marker = crafted
    shutil.copytree(root / "bad_run", tmp_path / "bad_run")  # a run may write there (train.py --init_from=auto)
    names = {"bad": root / "bad.pt", "bad_run": tmp_path / "bad_run", "adapters": root / "adapters.pt",
             "out": tmp_path / "out"}
    args = [a.format(**names) for a in args.split()]
    common = {"train.py": [*TINY_MODEL, f"--data_root={tiny_data_root}", "--dataset=tiny"],
              "sft.py": ["--device=cpu", f"--data={root / 'toy.json'}"],
              "dpo.py": ["--device=cpu", f"--data={root / 'toy.json'}"],
              "sample.py": ["--device=cpu"], "evaluate.py": ["--device=cpu"], "serve.py": ["--device=cpu", "--port=0"],
              "translate.py": ["--device=cpu"], "rl.py": ["--device=cpu", f"--data={root / 'prompts.jsonl'}"]}.get(script, [])
    if script in ("train.py", "sft.py", "dpo.py", "rl.py") and not any(a.startswith("--out_dir=") for a in args):
        common.append(f"--out_dir={names['out']}")
    result = run_forked(script, *common, *args)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert expected in result.stdout + result.stderr, result.stdout + result.stderr
    assert not marker.exists()
