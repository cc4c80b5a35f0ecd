"""
Load on serve.py: 1, 4 and 8 clients at once, each streaming one chat request after another, on a
server that batches them (continuous batching) and on one that answers one at a time.

    python bench/serve_load.py --out_dir=out/sft_quickstart        # 3 rounds of 10 s per level and server
    python bench/serve_load.py --out_dir=out/sft_quickstart --seconds=60 --rounds=1 --levels=[1,8,32,64]

Starts serve.py twice on free ports of 127.0.0.1 (never another host): with as many slots as the
largest level (`batched`), and with one slot and a queue long enough for every client (`one at a
time`). Both listen throughout; each level runs `rounds` times on one server, then the other, in
turn, so that a change in the machine's load falls on both alike. A round runs that many client
threads for `seconds`: each sends a streaming chat request (stream_options.include_usage), reads
it to the end, and sends the next; a request still under way when the time is up is finished
and counted. Per level and server it prints the requests, the errors (any status but 200, a
stream without [DONE] or usage), the time to first token and to the whole answer (p50, p99 over
all rounds; queueing included), and tokens/s (all completion tokens over a round's wall time;
the median and the min of the rounds) with its ratio to one client on the same server. With
batching tokens/s grow with the clients; one at a time they stay at one client's and the waits
grow instead. Reads the checkpoint only; writes nothing.
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
levels = [1, 4, 8]  # clients at once
seconds = 10.0  # per round of a level on a server
rounds = 3  # of each level on each server, in turn
max_tokens = 64  # per answer
temperature = 0.8
one_at_a_time = True  # also every level on a server with one slot
configure(globals())
if not levels or not all(1 <= n <= 256 for n in levels) or seconds <= 0 or rounds < 1 or max_tokens < 1:
    raise SystemExit("config error: need levels of 1 to 256 clients, seconds > 0, rounds >= 1 and max_tokens >= 1")

QUESTIONS = ["Name a color.", "What is the capital of France?", "Give me a synonym for fast.", "What is 7 times 8?",
             "Translate 'thank you' to Spanish.", "Name an animal that lives in the sea.", "What is the opposite of hot?",
             "Write a short greeting."]


def start_server(slots, max_queue):
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), f"--out_dir={out_dir}", "--port=0",
                                f"--slots={slots}", f"--max_queue={max_queue}"], cwd=REPO, stdout=subprocess.PIPE,
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
    return results, time.perf_counter() - begin


def percentiles(times):
    """(p50, p99) in milliseconds."""
    times = sorted(times)
    if not times:
        return float("nan"), float("nan")
    return 1000 * statistics.median(times), 1000 * times[min(len(times) - 1, int(0.99 * len(times)))]


def show(label, clients, runs, one_client):
    """A table row for the rounds `runs` [(results, wall)] of one level on one server; returns its median tokens/s."""
    results = [r for run, _ in runs for r in run]
    good = [r for r in results if not isinstance(r, str)]
    errors = [r for r in results if isinstance(r, str)]
    rates = sorted(sum(r[2] for r in run if not isinstance(r, str)) / wall for run, wall in runs)
    ttft, latency = percentiles([r[0] for r in good if r[0] is not None]), percentiles([r[1] for r in good])
    ratio = f"{statistics.median(rates) / one_client:.1f}x" if one_client else "1.0x"
    print(f"| {label} | {clients} | {len(results)} | {len(errors)} | {ttft[0]:.0f} / {ttft[1]:.0f} | "
          f"{latency[0]:.0f} / {latency[1]:.0f} | {statistics.median(rates):.0f} ({rates[0]:.0f}) | {ratio} |", flush=True)
    if errors:
        print(f"first error: {errors[0]}", flush=True)
    return statistics.median(rates)


print(f"serve.py load: {out_dir}, {rounds} rounds of {seconds:g} s per level, max_tokens {max_tokens}, temperature "
      f"{temperature}; CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, torch threads "
      f"{torch.get_num_threads()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
print("| server | clients | requests | errors | first token p50 / p99 (ms) | whole answer p50 / p99 (ms) | "
      "tokens/s median (min) | vs 1 client |")
print("|---|---|---|---|---|---|---|---|")
# Both servers listen throughout (an idle one waits, computing nothing) and each round of a level runs
# on one, then the other, so that a change in the machine's load falls on both alike.
servers = {f"batched, {max(levels)} slots": start_server(max(levels), 2 * max(levels))}
if one_at_a_time:
    servers["one at a time"] = start_server(1, max(levels))
try:
    for _, port in servers.values():  # the first request pays one-time costs (allocations, lazy imports)
        one_request(port, QUESTIONS[0])
    one_client = {}
    for clients in levels:
        runs = {label: [] for label in servers}
        for _ in range(rounds):
            for label, (_, port) in servers.items():
                runs[label].append(run_level(port, clients))
        for label in servers:
            rate = show(label, clients, runs[label], one_client.get(label))
            one_client.setdefault(label, rate if clients == 1 else None)
finally:
    for process, _ in servers.values():
        process.terminate()
        process.wait()
print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
