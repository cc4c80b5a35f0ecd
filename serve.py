"""
Serve a checkpoint over OpenAI's API, with a web page to chat with it in a browser.

    python serve.py --out_dir=out/dpo_quickstart                 # then open http://127.0.0.1:8000/
    python serve.py --ckpt=out/quickstart/ckpt.pt --port=8001     # a base model: /v1/completions only
    python serve.py --ckpt=hf:out/quickstart/hf                   # a Hugging Face folder (see export.py)
    SERVE_API_KEY=secret python serve.py --out_dir=out/sft_quickstart --host=0.0.0.0   # reachable from other machines

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Name a color."}], "temperature": 0}'

Reads the checkpoint only (any that sample.py reads: base, SFT, DPO, LoRA adapters on their base,
hf:FOLDER) and serve.html, the page at /. Writes nothing. Endpoints:
  POST /v1/chat/completions, /v1/completions   OpenAI's request and response schemas: messages or
        prompt, max_tokens, temperature, top_p, stop, seed, n, stream (server-sent events ending
        with data: [DONE]; stream_options.include_usage), usage counts
  GET  /v1/models, /v1/models/{id}, /health, and / (the chat page)
A chat request is rendered in chat.py's format and answered until <|end|>; a model without chat
tokens (a base model) answers /v1/completions only, which stop at end-of-text.

Concurrency: one background thread steps one decoding.Decoder while any sequence is active; every
active sequence advances in the same batched step, and a request takes free slots between two
steps (continuous batching). `slots` sequences decode at once (a request with n=3 takes three);
up to `max_queue` more wait, and past that a request gets 429 with Retry-After. A client that
goes away (a closed stream, a dropped connection) frees its slots before the next step. Each
sequence keeps its own position, sampling settings, seed and stops, so a request at temperature 0
(or with a seed) gets the same answer alone or beside others. The work per token stays small
beside the step: the step's tokens reach the event loop in one wake-up for all requests, a stream
writes all the events it has pending in one write, and requests that arrive together and sample
alike share one prefill.

Safety: binds 127.0.0.1 unless --host says otherwise. With api_key (or SERVE_API_KEY in the
environment) every /v1/ request needs `Authorization: Bearer KEY`; a host other than loopback
will not start without one. On loopback, requests must name a loopback Host (no DNS rebinding),
and POST bodies must be application/json (a web page elsewhere cannot send one without a CORS
preflight, and CORS is off unless cors_origins names who may). A request is JSON data, never
code: wrong JSON, types, fields, values, model names, or a prompt longer than the context get
a 4xx with OpenAI's {"error": {"message", "type", "param", "code"}}, and the server goes on.
"""

import asyncio
import collections
import hmac
import ipaddress
import json
import os
import socket
import threading
import time
import traceback
import uuid
from typing import Literal, Optional
from urllib.parse import urlsplit

from chat import has_chat_tokens, prompt_ids, stop_ids
from checkpoint import model_for_generation
from configurator import configure
from decoding import Decoder
from model import EncoderDecoder
from optional import optional
from runtime import autocast_context, pick_device, pick_dtype

# -----------------------------------------------------------------------------
out_dir = "out/default"  # serves out_dir/ckpt.pt ...
ckpt = ""  # ... unless a checkpoint path, or hf:FOLDER for a Hugging Face folder, is given here
model_name = ""  # the model id of the API; empty: the checkpoint's folder name
host = "127.0.0.1"  # loopback: this machine only; 0.0.0.0 listens on every interface (needs an API key)
port = 8000  # 0: any free port (the line printed at start names it)
api_key = ""  # clients send it as "Authorization: Bearer KEY"; empty: SERVE_API_KEY from the environment, if set
cors_origins = ""  # comma-separated origins whose web pages may call the API ("*": any); empty: none
# capacity
slots = 16  # sequences decoded together in one batch; the KV cache holds slots x block_size positions
max_queue = 64  # sequences waiting for a free slot; past that, 429
max_n = 8  # the most sequences (choices) one request may ask for (at most slots)
max_body_bytes = 1_000_000  # a larger request body is refused (413)
# model
device = "auto"
dtype = "auto"
log_requests = False  # uvicorn's access log: a line per request
config = configure(globals())
# -----------------------------------------------------------------------------

api_key = api_key or os.environ.get("SERVE_API_KEY", "")
try:
    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
except ValueError:
    raise SystemExit(f"config error: host={host!r} is not an IP address; use 127.0.0.1 (this machine only) or "
                     "0.0.0.0 (every interface)") from None
if not loopback and not api_key:
    raise SystemExit(f"config error: host={host} lets other machines in, so an API key is required; set "
                     "SERVE_API_KEY=<a long random string> in the environment (or --api_key), or keep host=127.0.0.1")
if not 0 <= port < 65536 or slots < 1 or max_queue < 0 or max_n < 1 or max_body_bytes < 1:
    raise SystemExit("config error: need 0 <= port < 65536, slots >= 1, max_queue >= 0, max_n >= 1, max_body_bytes >= 1")
max_n = min(max_n, slots)
uvicorn = optional("uvicorn", "serve.py", "fastapi uvicorn")
optional("fastapi", "serve.py", "fastapi uvicorn")  # with pydantic and starlette, its own dependencies
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
page_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
with open(page_path, encoding="utf-8") as f:
    page = f.read()

device = pick_device(device)
autocast = autocast_context(device, pick_dtype(device, dtype))
ckpt_path = ckpt or os.path.join(out_dir, "ckpt.pt")
model, tokenizer, _ = model_for_generation(ckpt_path, device, "serve")  # a decoder-only translator completes text
if isinstance(model, EncoderDecoder):
    raise SystemExit(f"serve error: {ckpt_path} is a translation model, which the API does not serve; translate with "
                     f"python sample.py --ckpt={ckpt_path} --translate_file=FILE")
model_name = model_name or os.path.basename(os.path.abspath(ckpt_path[3:] if ckpt_path.startswith("hf:") else
                                                            os.path.dirname(ckpt_path)))
chat_model = has_chat_tokens(tokenizer)
block_size = model.config.block_size
created = int(time.time())


# -----------------------------------------------------------------------------
# errors: OpenAI's shape, for every status


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        self.status, self.message, self.param, self.code, self.kind, self.headers = status, message, param, code, kind, headers

    def response(self):
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def validation_error(error):
    """A 400 for the first problem pydantic found in a request."""
    first = error.errors()[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unknown field '{param}'; this server takes only the fields in docs/serving.md", param,
                        "unknown_field")
    if first["type"] == "missing":
        return APIError(400, f"'{param}' is required", param, "missing_field")
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param, "invalid_value")


# -----------------------------------------------------------------------------
# requests


class Strict(BaseModel):
    # strict: "1" is not a number and true is not an integer; unknown fields are errors, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1)
    stop: Optional[list[str]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**63)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # an id of the end user, which OpenAI's API takes; unused

    @field_validator("stop", mode="before")
    @classmethod
    def stop_strings(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None and not (isinstance(value, list) and len(value) <= 4
                                      and all(isinstance(s, str) and s for s in value)):
            raise ValueError("must be a non-empty string or a list of up to 4 of them")
        return value


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(Sampling):
    prompt: str


async def read_request(request, schema):
    """The request's JSON body as a `schema`, or an APIError saying what is wrong with it."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "the body must be JSON sent with 'Content-Type: application/json'", code="unsupported_media_type")
    length = request.headers.get("content-length", "")
    too_large = APIError(413, f"the body is larger than this server's limit of {max_body_bytes} bytes", code="request_too_large")
    if length.isdigit() and int(length) > max_body_bytes:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise too_large
    except ClientDisconnect:  # no one to answer, but no traceback in the log either
        raise APIError(400, "the client left before sending the whole body", code="incomplete_body") from None

    def refuse_constant(name):  # json accepts NaN and Infinity, which are not JSON
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
        reason = e.args[0] if isinstance(e, ValueError) and e.args else "nested too deep"
        raise APIError(400, f"the body is not valid JSON ({str(reason)[:120]})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, not a {type(data).__name__}", code="invalid_json")
    try:  # JSON's \ud800 escapes make Python strings that are not Unicode text, which no tokenizer takes
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the body holds a lone surrogate (an escape from \\ud800 to \\udfff), which is not Unicode "
                       "text", code="invalid_json") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def encode(text, param):
    try:
        return tokenizer.encode(text)
    except SystemExit as e:  # a char-level vocabulary without one of the characters
        raise APIError(400, str(e).removeprefix("tokenizer error: "), param, "invalid_value") from None


# -----------------------------------------------------------------------------
# sequences and the decoding loop


class Answer:
    """One sequence's text as its tokens arrive. It ends at one of stop_tokens, a stop string or
    max_tokens; add() returns only text that can no longer change: not a character whose bytes are
    still coming, nor what may be the start of a stop string."""

    def __init__(self, stop_tokens, stop_strings, max_tokens):
        self.stop_tokens, self.stop_strings, self.max_tokens = stop_tokens, stop_strings, max_tokens
        self.ids, self.tokens, self.sent, self.finish_reason = [], 0, 0, None

    def add(self, token):
        self.tokens += 1
        if token in self.stop_tokens:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
        text = tokenizer.decode(self.ids)
        ends = [text.find(s) for s in self.stop_strings if s in text]
        if ends:
            text, self.finish_reason = text[: min(ends)], "stop"
        elif self.finish_reason is None and self.tokens >= self.max_tokens:
            self.finish_reason = "length"
        ready = len(text)
        if self.finish_reason is None:
            # a stop string's start can be no longer than the text: a client's 500,000-character stop string
            # would otherwise cost a quadratic scan (minutes) at every token, with every slot waiting
            ready -= max([len(text) - len(text.rstrip("\ufffd"))] +
                         [k for s in self.stop_strings for k in range(1, min(len(s), len(text) + 1))
                          if text.endswith(s[:k])])
        new, self.sent = text[self.sent : ready], max(self.sent, ready)
        return new


class Job:
    """A request: n sequences of one prompt, and the events (text, ends) its handler awaits."""

    def __init__(self, ids, n, max_tokens, temperature, top_p, seed, stop_tokens, stop_strings):
        self.ids, self.n, self.temperature, self.top_p, self.seed, self.stop_tokens = ids, n, temperature, top_p, seed, stop_tokens
        self.answers = [Answer(stop_tokens, stop_strings, max_tokens) for _ in range(n)]
        self.events, self.ready, self.loop = [], asyncio.Event(), asyncio.get_running_loop()
        self.cancelled = False

    def emit(self, *event):
        self.loop.call_soon_threadsafe(deliver, [(self, event)])

    async def take(self):
        """Every event that came since the last take, in order (waits for one)."""
        await self.ready.wait()
        self.ready.clear()
        events, self.events = self.events, []
        return events


class Batcher:
    """The one thread that decodes: it takes waiting jobs into free slots, steps every active
    sequence together, and hands each job its tokens as text."""

    def __init__(self, decoder, max_queue):
        self.decoder, self.max_queue = decoder, max_queue
        self.waiting = collections.deque()  # jobs, first come first served
        self.running = {}  # slot -> (job, choice index)
        self.wake = threading.Condition()
        threading.Thread(target=self.run, name="decoder", daemon=True).start()

    def counts(self):
        with self.wake:
            return {"running": len(self.running), "waiting": sum(job.n for job in self.waiting)}

    def submit(self, job):
        """Queue a job; False when the queue has no room for its sequences."""
        with self.wake:
            if sum(j.n for j in self.waiting) + job.n > self.max_queue:
                return False
            self.waiting.append(job)
            self.wake.notify()
        return True

    def cancel(self, job):
        """The job's client is gone or has all it wants: its slots free before the next step."""
        with self.wake:
            job.cancelled = True
            self.wake.notify()

    def run(self):
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.running or self.waiting)
            for slot, (job, _) in list(self.running.items()):
                if job.cancelled:
                    self.end(slot)
            with self.wake:
                self.waiting = collections.deque(job for job in self.waiting if not job.cancelled)
                admitted, free = [], len(self.decoder.free_slots)
                while self.waiting and self.waiting[0].n <= free:  # in order: a large request is not passed over
                    admitted.append(self.waiting.popleft())
                    free -= admitted[-1].n
            # Jobs that sample alike start in one prefill, where prompts of one length share a forward; a
            # seeded job starts alone, as its choices take seed, seed + 1, ...
            groups = {}
            for job in admitted:
                groups.setdefault(job if job.seed is not None else (job.temperature, job.top_p, tuple(job.stop_tokens)),
                                  []).append(job)
            for jobs in groups.values():
                self.start(jobs)
            if self.running:
                self.step()

    def start(self, jobs):
        """Prefill the sequences of jobs that share their sampling settings."""
        job = jobs[0]
        choices = [(job, i) for job in jobs for i in range(job.n)]
        try:
            with autocast:
                slots = self.decoder.prefill([job.ids for job, _ in choices], job.temperature, top_p=job.top_p,
                                             seed=job.seed, stop_tokens=job.stop_tokens)
        except Exception as e:
            self.fail(jobs, e)
            return
        self.running.update(zip(slots, choices))

    def step(self):
        try:
            with autocast:
                tokens = self.decoder.step().tolist()
        except Exception as e:  # out of memory, say: every running request fails, the server goes on
            self.fail({job for job, _ in self.running.values()}, e)
            return
        events = []  # (job, event): handed over together below
        for slot, (job, i) in list(self.running.items()):
            answer = job.answers[i]
            try:
                text = answer.add(tokens[slot])
            except Exception as e:  # an id the tokenizer cannot decode
                self.fail([job], e)
                continue
            if text:
                events.append((job, ("text", i, text)))
            if answer.finish_reason:
                events.append((job, ("end", i, answer.finish_reason)))
                self.end(slot)
        # One wake-up of the event loop per step for all jobs, not one per token (each is a write to the
        # loop's pipe and a turn of the loop).
        for loop in {job.loop for job, _ in events}:
            loop.call_soon_threadsafe(deliver, [(job, event) for job, event in events if job.loop is loop])

    def end(self, slot):
        self.decoder.free(slot)
        del self.running[slot]

    def fail(self, jobs, error):
        traceback.print_exception(error)
        for job in jobs:
            job.emit("error", f"{type(error).__name__}: {error}")
            job.cancelled = True
            for slot in [s for s, (j, _) in self.running.items() if j is job]:
                self.end(slot)


def deliver(events):
    """Hand each (job, event) to its job (in the event loop's thread)."""
    for job, event in events:
        job.events.append(event)
        job.ready.set()


batcher = Batcher(Decoder(model, slots), max_queue)


# -----------------------------------------------------------------------------
# generation, shared by chat and completions


def sampling_job(req, ids, stop_tokens, prompt_param):
    """The Job for a validated request and its prompt ids, or an APIError for what the model cannot do."""
    if req.model not in (None, model_name):
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")
    n = req.n or 1
    if n > max_n:
        raise APIError(400, f"n={n} is more than this server's max_n={max_n}", "n", "invalid_value")
    max_tokens = req.max_tokens or getattr(req, "max_completion_tokens", None)
    if len(ids) + (max_tokens or 1) > block_size:
        asked = f" and max_tokens {max_tokens}" if max_tokens else ", leaving no room for an answer"
        raise APIError(400, f"this model's context is {block_size} tokens, but the prompt is {len(ids)} tokens{asked}; "
                            "shorten the prompt" + (" or lower max_tokens" if max_tokens else ""),
                       prompt_param if len(ids) >= block_size or not max_tokens else "max_tokens", "context_length_exceeded")
    temperature = 1.0 if req.temperature is None else req.temperature
    return Job(ids, n, max_tokens or block_size - len(ids), temperature, req.top_p, req.seed, stop_tokens, req.stop or [])


async def answer(request, req, job, kind):
    """Run a job and answer with the whole response, or with server-sent events as it decodes."""
    if not batcher.submit(job):
        raise APIError(429, f"the server is at capacity ({slots} sequences decoding, {max_queue} waiting); retry shortly",
                       code="rate_limit_exceeded", kind="rate_limit_error", headers={"Retry-After": "1"})
    chat = kind == "chat"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": "chat.completion" if chat else
            "text_completion", "created": int(time.time()), "model": model_name}

    def usage():
        done = sum(a.tokens for a in job.answers)
        return {"prompt_tokens": len(job.ids), "completion_tokens": done, "total_tokens": len(job.ids) + done}

    async def next_events():
        """The events since the last call, ("text", choice, text) or ("end", choice, finish reason): one
        per token while the handler keeps up with the decoder, several when it has fallen behind."""
        events = await job.take()
        for event in events:
            if event[0] == "error":
                raise APIError(500, f"decoding failed ({event[1]}); the server log has the traceback",
                               kind="server_error", code="internal_error")
        return events

    if not req.stream:
        texts, reasons = [""] * job.n, [None] * job.n

        async def collect():
            while None in reasons:
                for event, i, value in await next_events():
                    if event == "text":
                        texts[i] += value
                    else:
                        reasons[i] = value

        try:
            collecting, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected(request))
            await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not collecting.done():  # the client left: there is no one to answer
                collecting.cancel()
                return JSONResponse({}, status_code=499)
            collecting.result()  # an APIError from decoding goes to the client
        finally:
            batcher.cancel(job)  # frees the slots of a client that left
        choices = [{"index": i, "message": {"role": "assistant", "content": t}} if chat else {"index": i, "text": t}
                   for i, t in enumerate(texts)]
        for choice, reason in zip(choices, reasons):
            choice.update(logprobs=None, finish_reason=reason)
        return JSONResponse({**head, "choices": choices, "usage": usage()})

    head["object"] += ".chunk"

    def chunk(i, text=None, finish_reason=None, role=False):
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": i, "delta": delta} if chat else {"index": i, "text": text or ""}
        return sse({**head, "choices": [{**choice, "logprobs": None, "finish_reason": finish_reason}]})

    async def stream():
        try:
            if chat:
                for i in range(job.n):
                    yield chunk(i, "", role=True)
            ended = 0
            while ended < job.n:
                events = await next_events()
                ended += sum(event == "end" for event, _, _ in events)
                # An event per token, all that came since the last write in one write: a handler that has
                # fallen behind (a busy server) catches up in one turn of the event loop, not one per token.
                yield "".join(chunk(i, value) if event == "text" else chunk(i, finish_reason=value)
                              for event, i, value in events)
            if req.stream_options and req.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": usage()})
        except APIError as e:  # the status line has gone: the error is the last event
            yield f"data: {e.response().body.decode()}\n\n"
        finally:
            batcher.cancel(job)  # frees the slots of a client that left (cancelled here, or the stream closed)
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(data):
    """One server-sent event holding data as compact JSON."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def disconnected(request):
    """Returns once the client has closed the connection (the body is read, so nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -----------------------------------------------------------------------------
# the app


app = FastAPI(title="serve.py", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def api_error(request, error):
    return error.response()


@app.exception_handler(HTTPException)
async def http_error(request, error):  # an unknown path, a wrong method
    return APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code="not_found"
                    if error.status_code == 404 else None).response()


@app.exception_handler(Exception)
async def internal_error(request, error):  # a bug: the client gets one line, the server log the traceback
    return APIError(500, f"internal error ({type(error).__name__}); the server log has the traceback",
                    kind="server_error", code="internal_error").response()


def refusal(scope):
    """The APIError for a request this server does not take from where it comes, else None: on a
    loopback server a Host that is not loopback (a page on another site whose name resolves to
    127.0.0.1), and a /v1/ request without the API key when there is one."""
    headers = Headers(scope=scope)
    if loopback and urlsplit("//" + headers.get("host", "")).hostname not in ("127.0.0.1", "localhost", "::1"):
        return APIError(400, "this server answers requests to 127.0.0.1 or localhost only", code="invalid_host")
    if api_key and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
        if not hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {api_key}".encode()):
            return APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                            code="invalid_api_key", kind="authentication_error")
    return None


class Guard:
    """ASGI middleware that turns away what refusal() names (a plain one: it leaves streaming alone)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        error = refusal(scope) if scope["type"] == "http" else None
        if error:
            await error.response()(scope, receive, send)
        else:
            await self.app(scope, receive, send)


app.add_middleware(Guard)
if cors_origins:  # outside the guard, so that its refusals reach the page that asked
    app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in cors_origins.split(",")],
                       allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    req = await read_request(request, ChatRequest)
    if not chat_model:
        raise APIError(400, f"'{model_name}' is a base model without chat tokens: use /v1/completions, or fine-tune it "
                            "with sft.py to chat", "messages", "model_not_chat")
    if req.max_tokens and req.max_completion_tokens:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens", "invalid_value")
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    try:
        ids = prompt_ids(tokenizer, messages)
    except SystemExit as e:  # a char-level vocabulary without one of the characters
        raise APIError(400, str(e).removeprefix("tokenizer error: "), "messages", "invalid_value") from None
    return await answer(request, req, sampling_job(req, ids, sorted(stop_ids(tokenizer)), "messages"), "chat")


@app.post("/v1/completions")
async def completions(request: Request):
    req = await read_request(request, CompletionRequest)
    ids = encode(req.prompt, "prompt") or [tokenizer.eot_id]  # as sample.py: an empty prompt starts a new document
    return await answer(request, req, sampling_job(req, ids, [tokenizer.eot_id], "prompt"), "completion")


def model_card():
    return {"id": model_name, "object": "model", "created": created, "owned_by": "local", "context_length": block_size,
            "chat": chat_model}


@app.get("/v1/models")
async def models():
    return {"object": "list", "data": [model_card()]}


@app.get("/v1/models/{name:path}")
async def model_info(name: str):
    if name != model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")
    return model_card()


@app.get("/health")
async def health():
    return {"status": "ok", "model": model_name, "chat": chat_model, "context_length": block_size, "slots": slots,
            "api_key_required": bool(api_key), **batcher.counts()}


@app.get("/")
async def index():
    # The page loads nothing from elsewhere, and says so to the browser too.
    policy = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
              "img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
    return HTMLResponse(page, headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                                       "Referrer-Policy": "no-referrer"})


# -----------------------------------------------------------------------------
# listen: the socket is bound here, so a port in use is one line and port=0 names the port it got

try:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(2048)
except OSError as e:
    raise SystemExit(f"serve error: cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None
port = listener.getsockname()[1]
shown = f"[{host}]" if ":" in host else host
print(f"serving {ckpt_path} as '{model_name}' ({'chat and completions' if chat_model else 'completions only: no chat tokens'}, "
      f"{slots} slots, context {block_size}) at http://{shown}:{port}/", flush=True)
server = uvicorn.Server(uvicorn.Config(app, log_level="info" if log_requests else "warning", access_log=log_requests,
                                       timeout_graceful_shutdown=3))
try:
    server.run(sockets=[listener])
except KeyboardInterrupt:
    pass
