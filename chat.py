"""
The chat format, in one place: how a conversation becomes token ids, which of them a model learns to say, and how
post-training data is read and batched. sft.py, dpo.py, sample.py --chat (and evaluate.py) all go through it.

    from chat import add_chat_tokens, render, prompt_ids
    model, tokenizer = add_chat_tokens(model, tokenizer)   # once, on a pretrained model
    ids, learned = render(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])   # then generate until <|end|>

A conversation is an end-of-text token, then for each message its role token, its content as ordinary text (so
typing "<|user|>" cannot fake a turn), and <|end|>:

    <|endoftext|><|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>4<|end|>

A model learns only the assistant's tokens (its content and <|end|>); the other targets are -1. A prompt for
generation ends with <|assistant|>, and the answer at <|end|>. Data files hold Alpaca-style {"instruction", "input"
(optional), "output"} or chat {"messages": [...]} records (preference records: "chosen" and "rejected" instead of
the output). The new ids and the files: docs/post-training.md.
"""

import functools
import gzip
import json
import math
import os
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from download import download
from tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"
CHAT_TOKENS = tuple(f"<|{role}|>" for role in ROLES) + (END,)


def has_chat_tokens(tokenizer):
    return set(CHAT_TOKENS) <= tokenizer.special_tokens.keys()


def add_chat_tokens(model, tokenizer):
    """Give a model (in place) and its tokenizer (a new one) the chat tokens, after the last id."""
    first = max(model.config.vocab_size, tokenizer.vocab_size)
    ids = {name: first + i for i, name in enumerate(CHAT_TOKENS)}
    chat_tokenizer = Tokenizer({**tokenizer.description, "special_tokens": {**tokenizer.special_tokens, **ids}})
    config = replace(model.config, vocab_size=first + len(CHAT_TOKENS))
    if config.padded_vocab_size > model.config.padded_vocab_size:  # larger layers, the old rows kept
        old_wte, old_head = model.wte, model.lm_head
        n, like = old_wte.num_embeddings, dict(device=old_wte.weight.device, dtype=old_wte.weight.dtype)
        model.wte = nn.Embedding(config.padded_vocab_size, old_wte.embedding_dim, **like)
        model.lm_head = nn.Linear(old_wte.embedding_dim, config.padded_vocab_size, bias=False, **like)
        for new, old in ((model.wte, old_wte), (model.lm_head, old_head)):
            model._init_weights(new)
            with torch.no_grad():
                new.weight[:n] = old.weight
        if config.tie_embeddings:
            model.lm_head.weight = model.wte.weight
    model.config = config
    weights = [model.wte.weight] + ([] if config.tie_embeddings else [model.lm_head.weight])
    with torch.no_grad():
        for name, i in ids.items():
            word = name[2:-2]  # "<|user|>" -> "user"
            spellable = tokenizer.kind != "char" or set(word) <= set(tokenizer.chars)
            rows = tokenizer.encode(word) if spellable else list(range(first))
            for weight in weights:
                weight[i] = weight[rows].mean(dim=0)
    return model, chat_tokenizer


# -----------------------------------------------------------------------------
# conversations as ids


def render(tokenizer, messages):
    """A conversation's token ids, and for each whether the model learns to say it (the assistant's and its <|end|>)."""
    special = tokenizer.special_tokens
    ids, learned = [tokenizer.eot_id], [False]
    for message in messages:
        content = tokenizer.encode(message["content"]) + [special[END]]
        ids += [special[f"<|{message['role']}|>"]] + content
        learned += [False] + [message["role"] == "assistant"] * len(content)
    return ids, learned


def prompt_ids(tokenizer, messages):
    """The ids that ask for the next assistant turn: the conversation so far, then <|assistant|>."""
    return render(tokenizer, messages)[0] + [tokenizer.special_tokens["<|assistant|>"]]


def chat_template(tokenizer):
    """The format above as the Jinja chat_template of tokenizer_config.json and GGUF files, for transformers,
    llama.cpp and Ollama (which recognise special tokens by name: there, a message spelling <|user|> fakes a turn)."""
    eot = next(name for name, i in tokenizer.special_tokens.items() if i == tokenizer.eot_id)
    return (f"{eot}{{% for message in messages %}}"
            f"{{% if message['role'] not in {list(ROLES)} %}}"
            f"{{{{ raise_exception('a message role is one of {', '.join(ROLES)}') }}}}{{% endif %}}"
            f"<|{{{{ message['role'] }}}}|>{{{{ message['content'] }}}}{END}{{% endfor %}}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def stop_ids(tokenizer):
    """Where an answer ends: <|end|>, or end-of-text should a model produce that instead."""
    return {tokenizer.special_tokens[END], tokenizer.eot_id}


def training_example(ids, learned, block_size):
    """(inputs, targets) for next-token training from a rendered conversation, cut to block_size
    tokens; targets are -1 where nothing is learned. None when the cut leaves nothing to learn."""
    ids, learned = ids[: block_size + 1], learned[: block_size + 1]
    targets = [t if learn else -1 for t, learn in zip(ids[1:], learned[1:])]
    return (ids[:-1], targets) if any(learned[1:]) else None


def response_logprobs(logits, targets):
    """Per row, the summed log-probability of the targets that are not -1: logits (B, T, V), targets (B, T) -> (B,)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    return -nll.view(targets.shape).sum(dim=1)


# -----------------------------------------------------------------------------
# batches: a unit is one example (padding) or one packed row, as (inputs, targets, doc ids)


def pack(examples, block_size):
    """Lay examples (inputs, targets) end to end, in order, into rows of at most block_size
    tokens; an example never straddles two rows. Doc ids number the examples within each row."""
    rows = []
    for x, y in examples:
        if not rows or len(rows[-1][0]) + len(x) > block_size:
            rows.append(([], [], []))
        inputs, targets, docs = rows[-1]
        docs += [docs[-1] + 1 if docs else 0] * len(x)
        inputs += x
        targets += y
    return rows


def collate(units, pad_id):
    """Units as (B, T) tensors padded at the end to the longest: inputs with pad_id, targets with
    -1 (no loss), doc ids with -1 (the padding is an example of its own, attending to no other)."""
    T = max(len(x) for x, _, _ in units)
    x, y, docs = (torch.full((len(units), T), fill, dtype=torch.long) for fill in (pad_id, -1, -1))
    for row, unit in enumerate(units):
        for tensor, values in zip((x, y, docs), unit):
            tensor[row, : len(values)] = torch.tensor(values)
    return x, y, docs


@functools.lru_cache(maxsize=4)
def epoch_order(n_units, seed, epoch):
    return np.random.default_rng((seed, epoch)).permutation(n_units)


def batch_of(n_units, batch_size, index, seed):
    """The unit indices of batch `index` of an endless stream visiting every unit once per epoch, in a new
    order each epoch: a pure function, so a process takes its own batches without asking the others."""
    positions = range(index * batch_size, (index + 1) * batch_size)
    return [int(epoch_order(n_units, seed, p // n_units)[p % n_units]) for p in positions]


# -----------------------------------------------------------------------------
# data files


FORMATS = ("a record is {instruction, input (optional), output} or {messages: [{role, content}, ...]}; "
           "a preference record has chosen and rejected instead of the output")
DOWNLOADS = "data/downloads"  # where data given by URL is kept


def bad_record(where, problem):
    return SystemExit(f"data error: {where}: {problem}")


def read_text(path, stage, what, hint):
    """The UTF-8 text of path (gunzipped if it ends in .gz); a missing or unreadable file stops with stage's line."""
    if not os.path.isfile(path):
        raise SystemExit(f"{stage} error: no {what} {path}; {hint}")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise SystemExit(f"{stage} error: {what} {path} is not UTF-8 text; convert it or pick another file") from None
    except gzip.BadGzipFile:
        raise SystemExit(f"{stage} error: {what} {path} is not a gzip file; name it without .gz if it is plain text") from None


def jsonl_records(text, path):
    """(where, record) for each non-blank line of JSON Lines text read from path."""
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 and its kin
        if line.strip():
            try:
                yield f"{path} line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise bad_record(f"{path} line {n}", f"not valid JSON ({e.msg}); fix or remove the line") from None


def read_records(path, sha256=""):
    """(where, record) pairs of a .json list or a .jsonl file, `where` naming the record for errors; an
    http(s) URL is downloaded once into DOWNLOADS and checked against sha256 (unless it is empty)."""
    if path.startswith(("http://", "https://")):
        path = download(path, sha256, DOWNLOADS, stage="data", local_option="--data", sha256_option="--data_sha256=")[0]
    text = read_text(path, "data", "file", "pass --data=PATH to a .json or .jsonl file of records")
    if path.endswith(".jsonl"):
        records = list(jsonl_records(text, path))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"data error: {path} is not valid JSON ({e.msg}, line {e.lineno}); a .json file holds "
                             "one list of records, a .jsonl file one record per line") from None
        if not isinstance(data, list):
            raise SystemExit(f"data error: {path} holds a JSON {type(data).__name__}, not a list of records")
        records = [(f"{path} record {n}", record) for n, record in enumerate(data, 1)]
    if not records:
        raise SystemExit(f"data error: {path} has no records")
    return records


def text_field(record, key, where, required=True):
    if key not in record and required:
        raise bad_record(where, f"'{key}' is missing; {FORMATS}")
    value = record.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise bad_record(where, f"'{key}' must be a{' non-empty' if required else ''} string, got {value!r:.60}")
    return value


def conversation(record, where, last_role="assistant"):
    """The messages of an SFT record, Alpaca-style or chat; with last_role 'user', a preference record's prompt.
    A chat record's messages are an optional system message, then user and assistant in turn, ending with last_role."""
    if not isinstance(record, dict):
        raise bad_record(where, f"not a JSON object; {FORMATS}")
    if "messages" not in record:
        instruction = text_field(record, "instruction", where)
        extra = text_field(record, "input", where, required=False)
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}]
        if last_role == "assistant":
            messages.append({"role": "assistant", "content": text_field(record, "output", where)})
        return messages
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad_record(where, "'messages' must be a non-empty list of {role, content}")
    start = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, message in enumerate(messages):
        expected = "system" if i < start else ("user", "assistant")[(i - start) % 2]
        if not isinstance(message, dict) or message.get("role") != expected:
            got = message.get("role") if isinstance(message, dict) else message
            raise bad_record(where, f"message {i + 1} should have role '{expected}', got {got!r:.40}; a system message "
                                    "may come first, then user and assistant take turns")
        text_field(message, "content", f"{where} message {i + 1}")
    if messages[-1]["role"] != last_role:
        raise bad_record(where, f"the last message is the {messages[-1]['role']}'s; it must be the {last_role}'s")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def preference(record, where):
    """(prompt messages, chosen answer, rejected answer) of a preference record."""
    prompt = conversation(record, where, "user")
    return prompt, text_field(record, "chosen", where), text_field(record, "rejected", where)


def split_held_out(items, fraction, seed=0):
    """(train, held out): a random `fraction` of the items (at least one if fraction > 0) held out, by a
    fixed seed, so every run and every script reading the same file holds out the same records."""
    n_held = math.ceil(fraction * len(items)) if fraction > 0 else 0
    held = set(np.random.default_rng(seed).permutation(len(items))[:n_held].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
