"""serve.py: the official openai client against a live server on 127.0.0.1, malformed requests,
capacity (429, disconnects), concurrency, safety, and the chat page in a real browser."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pytest
import torch

from chat import CHAT_TOKENS, add_chat_tokens, prompt_ids
from checkpoint import load_checkpoint, save_checkpoint
from conftest import REPO, run_script
from forked import error_line, run_forked
from model import GPT, GPTConfig
from tokenizer import Tokenizer

openai = pytest.importorskip("openai", reason="the serve tests use the openai client: pip install openai")
pytest.importorskip("fastapi", reason="serve.py needs fastapi and uvicorn: pip install fastapi uvicorn")
pytest.importorskip("uvicorn", reason="serve.py needs fastapi and uvicorn: pip install fastapi uvicorn")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's
SCREENSHOT = os.path.join(tempfile.gettempdir(), "serve_page_phone.png")  # the browser test's, kept after the run


class Server:
    """serve.py with args, in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, *args, env=None):
        self.process = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), "--port=0", "--device=cpu", *args],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self.output, started = [], threading.Event()

        def read():  # keeps the pipe drained, and notes the line that names the port
            for line in self.process.stdout:
                self.output.append(line)
                if line.startswith("serving ") and "http://127.0.0.1:" in line:
                    self.port = int(line.rsplit(":", 1)[1].strip(" /\n"))
                    started.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.time() + 120
        while not started.wait(0.2):
            assert self.process.poll() is None and time.time() < deadline, "serve.py did not start:\n" + "".join(self.output)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def request(self, method, path, body=b"", headers=None):
        """(status, headers, parsed JSON or text) of one raw HTTP request."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            text = response.read().decode()
        finally:
            connection.close()
        try:
            return response.status, response.headers, json.loads(text)
        except ValueError:
            return response.status, response.headers, text

    def health(self):
        return self.request("GET", "/health")[2]

    def wait_until_idle(self, seconds=10):
        deadline = time.time() + seconds
        while (health := self.health())["running"] or health["waiting"]:
            assert time.time() < deadline, health
            time.sleep(0.02)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        assert "Traceback" not in "".join(self.output), "".join(self.output)


@pytest.fixture(scope="module")
def server(tiny_sft_checkpoint):
    """The tiny chat model of conftest, 4 slots."""
    server = Server(f"--out_dir={tiny_sft_checkpoint}", "--slots=4", "--max_n=2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """A random tiny chat model with a 2048-token context that never ends an answer by itself: a
    request can keep a slot busy for seconds, long enough to be seen decoding, cancelled or queued."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=2048, n_layer=2, n_head=2, n_embd=32))
    tokenizer = Tokenizer({"kind": "byte", "eot": "<|endoftext|>"})
    model, tokenizer = add_chat_tokens(model, tokenizer)
    with torch.no_grad():  # greedy never picks the end tokens: every other logit beats 0 somewhere
        for name in CHAT_TOKENS + ("<|endoftext|>",):
            model.lm_head.weight[tokenizer.special_tokens[name]] = 0
    path = str(tmp_path_factory.mktemp("long") / "ckpt.pt")
    save_checkpoint({"kind": "sft", "model_config": asdict(model.config), "model": model.state_dict(),
                     "tokenizer": tokenizer.description}, path)
    return path


@pytest.fixture(scope="module")
def long_server(long_checkpoint):
    """One slot and a queue of one, so that a long answer holds the server."""
    server = Server(f"--ckpt={long_checkpoint}", "--slots=1", "--max_queue=1", "--max_n=1")
    yield server
    server.stop()


def sample_py(out_dir, *args):
    """sample.py's greedy text for the same request (what it prints, less its own decoration)."""
    return run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--temperature=0", *args).stdout


def tokenizer_of(out_dir):
    return Tokenizer(load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["tokenizer"])


# -----------------------------------------------------------------------------
# the API, through the openai client


def test_greedy_chat_equals_sample_py_and_counts_its_tokens(server, tiny_sft_checkpoint):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    reply = server.client().chat.completions.create(model="out", messages=messages, temperature=0)
    answer = reply.choices[0].message.content
    assert sample_py(tiny_sft_checkpoint, "--chat=True", "--prompt=What is 2+2?") == answer + "\n"
    assert answer == "Four." and reply.choices[0].finish_reason == "stop"  # the toy SFT data, learned by heart
    tokenizer = tokenizer_of(tiny_sft_checkpoint)
    prompt = len(prompt_ids(tokenizer, messages))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (prompt, len(tokenizer.encode(answer)) + 1, prompt + len(tokenizer.encode(answer)) + 1)  # + <|end|>
    assert reply.object == "chat.completion" and reply.model == "out" and reply.choices[0].message.role == "assistant"


def test_greedy_completion_equals_sample_py(server, tiny_sft_checkpoint):
    reply = server.client().completions.create(model="out", prompt="def ", max_tokens=12, temperature=0)
    text = reply.choices[0].text
    printed = sample_py(tiny_sft_checkpoint, "--start=def ", "--num_samples=1", "--max_new_tokens=12")
    sampled = printed.split("--- sample 1/1 ---\n", 1)[1].removeprefix("def ")
    if reply.choices[0].finish_reason == "stop":  # ended at end-of-text, which sample.py prints and goes past
        assert sampled.startswith(text + "<|endoftext|>")
    else:
        assert sampled == text + "\n" and reply.usage.completion_tokens == 12
    assert reply.object == "text_completion" and reply.usage.prompt_tokens == 4


def test_streaming_gives_the_same_text_in_pieces_then_usage(server):
    messages = [{"role": "user", "content": "Capital of France?"}]
    whole = server.client().chat.completions.create(model="out", messages=messages, temperature=0)
    chunks = list(server.client().chat.completions.create(model="out", messages=messages, temperature=0, stream=True,
                                                           stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    status, headers, text = server.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 3,
                                                                                  "stream": True}).encode())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = text.strip().split("\n\n")
    assert events[-1] == "data: [DONE]" and len(events) == 5  # three tokens, the end, [DONE]


def test_stop_strings_cut_the_text_streamed_or_not(server):
    client = server.client()
    full = client.completions.create(model="out", prompt="def ", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:7]
    cut = full[: full.index(stop)]
    reply = client.completions.create(model="out", prompt="def ", max_tokens=20, temperature=0, stop=[stop, "never seen"])
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="out", prompt="def ", max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_a_seed_repeats_a_sample_and_n_gives_n_choices(server, tiny_sft_checkpoint):
    client = server.client()
    # The toy model is sure of most tokens: 16 tokens at temperature 1.5 give two seeds room to part
    ask = dict(model="out", prompt="import ", max_tokens=16, temperature=1.5, top_p=0.9, seed=7, n=2)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1] and first.choices[0].text != first.choices[1].text
    other = client.completions.create(**{**ask, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    tokenizer = tokenizer_of(tiny_sft_checkpoint)  # a sampled byte may be half a character: count by how each ended
    produced = sum(16 if c.finish_reason == "length" else len(tokenizer.encode(c.text)) + 1 for c in first.choices)
    assert first.usage.completion_tokens == produced and first.usage.prompt_tokens == len(tokenizer.encode("import "))


def test_cors_is_off_unless_asked(server):
    """No Access-Control-Allow-Origin by default: a web page on another site cannot read an answer."""
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 405 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = server.request("GET", "/v1/models", headers={"Origin": "https://elsewhere.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["out"]
    assert server.client().models.retrieve("out").id == "out"
    health = server.health()
    assert health["status"] == "ok" and health["chat"] and health["context_length"] == 32 and health["slots"] == 4


def test_concurrent_greedy_requests_equal_their_solo_answers(server):
    client = server.client()
    asks = [dict(model="out", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=m) for q, m in
            [("Say hi.", 12), ("What is 2+2?", 8), ("Capital of France?", 10), ("A pet?", 5), ("Opposite of up?", 13),
             ("Name a color.", 10), ("Tell me a joke.", 13), ("Why?", 20)]]
    solo = [client.chat.completions.create(**ask).choices[0].message.content for ask in asks]
    noise = dict(model="out", messages=[{"role": "user", "content": "Say hi."}], temperature=1.0, max_tokens=14)
    with ThreadPoolExecutor(12) as pool:  # 8 greedy and 4 sampled requests on 4 slots: they share steps and queue
        together = [pool.submit(server.client().chat.completions.create, **ask) for ask in asks + [noise] * 4]
        answers = [f.result().choices[0].message.content for f in together[: len(asks)]]
    assert answers == solo


# -----------------------------------------------------------------------------
# malformed requests: a 4xx with OpenAI's error JSON each, and the server goes on


def chat_body(**fields):
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], **fields}).encode()


BAD_REQUESTS = [  # (method, path, body, headers, status, param)
    ("POST", "/v1/chat/completions", b"{", {}, 400, None),
    ("POST", "/v1/chat/completions", b"[1, 2]", {}, 400, None),
    ("POST", "/v1/chat/completions", b"\xff\xfe\x00", {}, 400, None),
    ("POST", "/v1/chat/completions", b"[" * 100_000, {}, 400, None),
    ("POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', {}, 400, None),
    ("POST", "/v1/chat/completions", chat_body(), {"Content-Type": "text/plain"}, 415, None),
    ("POST", "/v1/chat/completions", b"{}", {}, 400, "messages"),
    ("POST", "/v1/chat/completions", json.dumps({"messages": "Hi"}).encode(), {}, 400, "messages"),
    ("POST", "/v1/chat/completions", json.dumps({"messages": []}).encode(), {}, 400, "messages"),
    ("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "Hi"}]}).encode(), {}, 400,
     "messages[0].role"),
    ("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), {}, 400,
     "messages[0].content"),
    ("POST", "/v1/chat/completions", chat_body(temperature="hot"), {}, 400, "temperature"),
    ("POST", "/v1/chat/completions", chat_body(temperature=5), {}, 400, "temperature"),
    ("POST", "/v1/chat/completions", chat_body(top_p=0), {}, 400, "top_p"),
    ("POST", "/v1/chat/completions", chat_body(max_tokens=0), {}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", chat_body(max_tokens=10**12), {}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", chat_body(max_tokens=True), {}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", chat_body(max_tokens=5, max_completion_tokens=5), {}, 400, "max_completion_tokens"),
    ("POST", "/v1/chat/completions", chat_body(n=0), {}, 400, "n"),
    ("POST", "/v1/chat/completions", chat_body(n=3), {}, 400, "n"),  # max_n is 2
    ("POST", "/v1/chat/completions", chat_body(n=1.5), {}, 400, "n"),
    ("POST", "/v1/chat/completions", chat_body(stream="yes"), {}, 400, "stream"),
    ("POST", "/v1/chat/completions", chat_body(stop=5), {}, 400, "stop"),
    ("POST", "/v1/chat/completions", chat_body(stop=["a", "b", "c", "d", "e"]), {}, 400, "stop"),
    ("POST", "/v1/chat/completions", chat_body(stop=[""]), {}, 400, "stop"),
    ("POST", "/v1/chat/completions", chat_body(seed="abc"), {}, 400, "seed"),
    ("POST", "/v1/chat/completions", chat_body(seed=2**70), {}, 400, "seed"),
    ("POST", "/v1/chat/completions", chat_body(stream_options={"include_usage": 1}), {}, 400,
     "stream_options.include_usage"),
    ("POST", "/v1/chat/completions", chat_body(frequency_penaltyy=0.5), {}, 400, "frequency_penaltyy"),
    ("POST", "/v1/chat/completions", chat_body(tools=[{"type": "function"}]), {}, 400, "tools"),
    ("POST", "/v1/chat/completions", chat_body(model="gpt-4"), {}, 404, "model"),
    ("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 100}]}).encode(), {},
     400, "messages"),  # longer than the 32-token context
    ("POST", "/v1/completions", json.dumps({"prompt": [1, 2, 3]}).encode(), {}, 400, "prompt"),
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 32}).encode(), {}, 400, "max_tokens"),
    ("POST", "/v1/completions", json.dumps({"prompt": "x" * 2_000_000}).encode(), {}, 413, None),
    ("POST", "/v1/completions", json.dumps({"prompt": "__import__('os').system('touch /tmp/pwned')",
                                           "echo": True}).encode(), {}, 400, "echo"),
    ("GET", "/v1/chat/completions", b"", {}, 405, None),
    ("POST", "/v1/embeddings", b"{}", {}, 404, None),
    ("GET", "/health", b"", {"Host": "attacker.example:80"}, 400, None),
    ("GET", "/v1/models/gpt-4", b"", {}, 404, "model"),
]


def test_malformed_requests_get_a_4xx_with_openai_error_json_and_the_server_goes_on(server):
    for method, path, body, headers, status, param in BAD_REQUESTS:
        got, _, reply = server.request(method, path, body, headers)
        where = f"{method} {path} {body[:80]!r} {headers}"
        assert got == status, (where, got, reply)
        assert isinstance(reply, dict) and set(reply) == {"error"}, (where, reply)
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"], (where, error)
        assert error["param"] == param, (where, error)
        assert "Traceback" not in error["message"] and len(error["message"].splitlines()) == 1, (where, error)
    assert server.health()["status"] == "ok" and server.process.poll() is None
    assert not os.path.exists("/tmp/pwned")


# -----------------------------------------------------------------------------
# capacity: cancellation, the queue, 429


def stream_lines(server, body):
    """An open streaming request: the connection and its response, read line by line."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}).encode(),
                       headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()


def test_a_client_that_leaves_mid_stream_frees_its_slot_and_a_full_queue_is_429(long_server):
    long = {"prompt": "x", "temperature": 0, "max_tokens": 2000}
    first, response = stream_lines(long_server, long)
    assert response.status == 200
    for _ in range(6):  # a few tokens in: the answer is under way
        assert response.readline().startswith(b"data: ") and response.readline() == b"\n"
    second, queued = stream_lines(long_server, long)  # waits for the one slot; its response starts once it runs
    deadline = time.time() + 10
    while long_server.health()["waiting"] != 1:
        assert time.time() < deadline
        time.sleep(0.01)
    status, headers, reply = long_server.request("POST", "/v1/completions", json.dumps(long).encode())
    assert status == 429 and headers["Retry-After"] == "1" and reply["error"]["code"] == "rate_limit_exceeded"
    assert long_server.health()["running"] == 1
    first.close()  # the first client goes: the queued request takes the slot at once
    assert queued.status == 200 and queued.readline().startswith(b"data: ")
    second.close()
    long_server.wait_until_idle()
    # a non-streaming request whose client gives up frees its slot too
    connection = http.client.HTTPConnection("127.0.0.1", long_server.port, timeout=0.5)
    connection.request("POST", "/v1/completions", body=json.dumps(long).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        connection.getresponse()
    assert long_server.health()["running"] == 1
    connection.close()
    long_server.wait_until_idle()
    reply = long_server.client().completions.create(model=long_server.health()["model"], prompt="y", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3


def test_a_base_model_refuses_chat_in_one_line_and_the_key_guards_the_api(tiny_checkpoint):
    base = Server(f"--out_dir={tiny_checkpoint}", "--slots=2", "--cors_origins=https://app.example",
                  env={"SERVE_API_KEY": "s3cret"})
    try:
        status, _, reply = base.request("GET", "/v1/models")
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            base.client(api_key="wrong").models.list()
        client = base.client(api_key="s3cret")
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=os.path.basename(tiny_checkpoint), messages=[{"role": "user", "content": "Hi"}])
        assert refused.value.body["code"] == "model_not_chat" and "sft.py" in refused.value.body["message"]
        assert len(refused.value.body["message"].splitlines()) == 1
        assert client.completions.create(model=os.path.basename(tiny_checkpoint), prompt="def ", max_tokens=4).usage.completion_tokens <= 4
        assert base.health()["api_key_required"] and not base.health()["chat"]  # the page and probes need no key
        for origin, allowed in [("https://app.example", True), ("https://elsewhere.example", False)]:  # CORS, asked for
            status, headers, _ = base.request("OPTIONS", "/v1/chat/completions", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
            assert (status == 200, headers.get("Access-Control-Allow-Origin")) == (allowed, origin if allowed else None)
        status, headers, page = base.request("GET", "/")
        assert status == 200 and "<html" in page and "default-src 'none'" in headers["Content-Security-Policy"]
    finally:
        base.stop()


@pytest.mark.parametrize("args, message", [
    (["--host=0.0.0.0"], "config error: host=0.0.0.0 lets other machines in, so an API key is required"),
    (["--host=example.com"], "config error: host='example.com' is not an IP address"),
    (["--slots=0"], "config error: need 0 <= port < 65536, slots >= 1"),
    (["--max_n=0"], "config error: need 0 <= port < 65536, slots >= 1, max_queue >= 0, max_n >= 1"),
    (["--port=70000"], "config error: need 0 <= port < 65536"),
    (["--out_dir={root}"], "checkpoint error: no checkpoint at {root}/ckpt.pt"),
    (["--port={busy}"], "serve error: cannot listen on 127.0.0.1:{busy}"),
])
def test_bad_settings_stop_the_server_in_one_line(tiny_checkpoint, tmp_path, args, message):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        fill = dict(root=tmp_path, busy=busy)
        result = run_forked("serve.py", f"--out_dir={tiny_checkpoint}", "--device=cpu", *(a.format(**fill) for a in args))
    assert error_line(result).startswith(message.format(**fill))


# -----------------------------------------------------------------------------
# the page, in a real browser


def test_the_page_streams_an_answer_stops_it_and_keeps_the_conversation(long_server):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser is Debian's)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 760})  # a phone
            fetched, asked = [], []
            page.on("request", lambda request: fetched.append(request.url))
            page.on("request", lambda request: asked.append(request.post_data_json) if request.method == "POST" else None)
            page.goto(long_server.url + "/")
            page.wait_for_selector(".dot.ok")
            assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
            page.click("#settings-button")  # greedy: the random model then never ends its answer by itself
            page.locator("#temperature").evaluate("(slider) => { slider.value = 0; slider.dispatchEvent(new Event('input')); }")
            page.fill("#system", "Be brief.")
            assert page.inner_text("#temperature-value") == "0.00"
            # A slow connection (3 kB/s, some 15 tokens a second), so that the answer is still arriving
            # when Stop is pressed, however fast the server writes it.
            cdp = page.context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 3000,
                                                          "uploadThroughput": -1})
            page.fill("#input", "Tell me a long story.")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant.streaming")
            lengths = set()
            deadline = time.time() + 30
            while len(lengths) < 4:  # the answer grows in pieces, each a DOM update
                lengths.add(len(page.inner_text(".msg.assistant .bubble")))
                assert time.time() < deadline, lengths
                time.sleep(0.02)
            assert page.inner_text("#send") == "Stop" and "tokens/s" in page.inner_text(".msg.assistant .meta")
            assert [(a["messages"], a["temperature"], a["stream"]) for a in asked] == \
                [([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a long story."}], 0, True)]
            page.screenshot(path=SCREENSHOT)  # to look at: the page mid-answer on a phone
            page.click("#send")
            page.wait_for_selector(".msg.assistant:not(.streaming)")
            assert page.inner_text("#send") == "Send" and "stopped" in page.inner_text(".msg.assistant .meta")
            answer = page.inner_text(".msg.assistant .bubble")
            assert len(answer) >= max(lengths) > 0
            long_server.wait_until_idle()  # the server freed the slot
            page.reload()
            page.wait_for_selector(".msg.assistant")
            assert page.inner_text(".msg.user .bubble") == "Tell me a long story."
            assert page.inner_text(".msg.assistant .bubble") == answer
            page.click("#new-chat")
            assert page.locator(".msg").count() == 0
            assert fetched and all(url.startswith(long_server.url + "/") for url in fetched)  # nothing from elsewhere
        finally:
            browser.close()
