"""
Load on serve.py: 1, 8, 32 and 64 clients at once, each streaming one chat request after another.

    python bench/serve_load.py --out_dir=out/sft_quickstart                  # 60 s per level
    python bench/serve_load.py --out_dir=out/sft_quickstart --seconds=10 --levels=[1,32]

Starts serve.py on a free port of 127.0.0.1 (never another host) with as many slots as the largest
level, then per level runs that many client threads for `seconds`: each sends a streaming chat
request (stream_options.include_usage), reads it to the end, and sends the next; a request still
under way when the time is up is finished and counted, so a level takes a little longer than
`seconds`. Per level it prints the requests, the errors (any status but 200, a stream without
[DONE] or usage), the time to first token (p50, p99; queueing included), and tokens/s: all
completion tokens over the level's wall time. With batching a level's tokens/s grows with its
clients; with queueing it stays at one client's. The server's decoding step has a static shape
(every slot computes, used or not), so one client on a server of many slots pays for all of them:
the last row runs one client on a server of one slot (`baseline`), the fairest one-client rate.
Reads the checkpoint only; writes nothing.
"""

import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import configure  # noqa: E402  (after the path: run from anywhere)

out_dir = "out/sft_quickstart"  # the chat model to serve
levels = [1, 8, 32, 64]  # clients at once
seconds = 60.0  # per level
max_tokens = 64  # per answer
temperature = 0.8
baseline = True  # also one client on a server with one slot
configure(globals())
if not levels or not all(1 <= n <= 256 for n in levels) or seconds <= 0 or max_tokens < 1:
    raise SystemExit("config error: need levels of 1 to 256 clients, seconds > 0 and max_tokens >= 1")

QUESTIONS = ["Name a color.", "What is the capital of France?", "Give me a synonym for fast.", "What is 7 times 8?",
             "Translate 'thank you' to Spanish.", "Name an animal that lives in the sea.", "What is the opposite of hot?",
             "Write a short greeting."]


def start_server(slots):
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), f"--out_dir={out_dir}", "--port=0",
                                f"--slots={slots}", f"--max_queue={2 * slots}"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # serve.py prints its address once it listens, or one line of error and stops
        if line.startswith("serving ") and "http://127.0.0.1:" in line:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its pipe drained
            return process, int(line.rsplit(":", 1)[1].strip(" /\n"))
    raise SystemExit(f"bench error: serve.py did not start (exit {process.wait()}); run it alone to see why")


def one_request(port, question):
    """(seconds to the first token, seconds in all, completion tokens), or an error string."""
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}})
    start, first, usage, done = time.perf_counter(), None, None, False
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return f"HTTP {response.status}: {response.read()[:200]!r}"
        for line in response:
            if first is None and line.startswith(b'data: {"id"') and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter() - start
            elif line.startswith(b'data: {"id"') and b'"usage"' in line:
                usage = json.loads(line[6:])["usage"]
            elif line.strip() == b"data: [DONE]":
                done = True
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        connection.close()
    if not done or usage is None:
        return "the stream ended without usage and [DONE]"
    return first, time.perf_counter() - start, usage["completion_tokens"]


def run_level(port, clients):
    results, lock = [], threading.Lock()
    begin = time.perf_counter()
    stop_at = begin + seconds

    def client(k):
        i = k
        while time.perf_counter() < stop_at:
            result = one_request(port, QUESTIONS[i % len(QUESTIONS)])
            with lock:
                results.append(result)
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    good = [r for r in results if not isinstance(r, str)]
    errors = [r for r in results if isinstance(r, str)]
    firsts = sorted(r[0] for r in good if r[0] is not None)
    p99 = firsts[min(len(firsts) - 1, int(0.99 * len(firsts)))] if firsts else float("nan")
    return {"clients": clients, "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else "",
            "ttft_p50": statistics.median(firsts) if firsts else float("nan"), "ttft_p99": p99,
            "tokens": sum(r[2] for r in good), "wall": wall, "tokens_per_s": sum(r[2] for r in good) / wall}


def show(row, one, label=None):
    ratio = f"{row['tokens_per_s'] / one:5.1f}x" if one else "     "
    print(f"{label or row['clients']:>10} {row['requests']:9d} {row['errors']:7d} {row['ttft_p50'] * 1000:9.0f} ms "
          f"{row['ttft_p99'] * 1000:9.0f} ms {row['tokens_per_s']:10.1f} {ratio}", flush=True)
    if row["errors"]:
        print(f"           first error: {row['first_error']}", flush=True)


print(f"serve.py load: {out_dir}, {seconds:g} s per level, max_tokens {max_tokens}, temperature {temperature}; "
      f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, "
      f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
print(f"{'clients':>10} {'requests':>9} {'errors':>7} {'TTFT p50':>12} {'TTFT p99':>12} {'tokens/s':>10} vs 1")
server, port = start_server(max(levels))
try:
    one_client = None
    for clients in levels:
        row = run_level(port, clients)
        one_client = one_client or (row["tokens_per_s"] if clients == 1 else None)
        show(row, one_client)
finally:
    server.terminate()
    server.wait()
if baseline:
    server, port = start_server(1)
    try:
        show(run_level(port, 1), one_client, label="1, 1 slot")
    finally:
        server.terminate()
        server.wait()
print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
