"""
Documented Python functions -> SFT and DPO records: offline post-training data made from a
prepared code corpus. Each documented function becomes a chat turn, the request made of its name,
arguments and the first paragraph of its docstring, the answer its code without the docstring;
and a preference pair, chosen that code, rejected (in turn) another function's body under its def
line, its body under another function's def line, or its body cut in half.

    python prepare_chat.py                        # data/pystdlib_bpe -> data/pystdlib_bpe_chat, for run.sh's chain
    python prepare_chat.py --dataset=pystdlib --block_size=512         # prepare.py's default dataset, bytes
    python prepare_chat.py --dataset=sitepackages --block_size=1024    # SCALE=gpt2 bash run.sh

    {"instruction": "Write a Python function `quotedata(data)` that: Quote data for email.",
     "output": "def quotedata(data):\n    return re.sub(...)", "function": "quotedata"}

Reads data_root/<dataset>/ as prepare.py wrote it (meta.json and the token files of each split):
the documents are decoded with the dataset's tokenizer and parsed as Python, so the functions are
those of the very text pretraining reads. The split follows pretraining's: the functions of the
train split's documents are for training, those of the val split's are held out. A held-out
function was so never trained on, neither as a chat turn nor as text in pretraining, and a
held-out score measures what a model makes of a request for code it has never read. The
training functions were in pretraining's text, inside their files, before they became chat
turns: SFT teaches the format and the link from a description to code the model may have read.

Kept: functions at module level and methods of module-level classes that are public (no leading
underscore, so no dunders either), not tests (test*, Test* classes), have a docstring and more than
a stub after it (not only pass, ... or raise NotImplementedError), an answer of at most
max_answer_chars, and a request and answers that fit block_size tokens in chat.py's format (both
answers of the pair too). A repeated request within a split is dropped, and a held-out function
whose request or answer is also a training one's (code copied between files).

Writes into data_root/<dataset>_chat/, each file under a temporary name, then renamed:
    sft_train.jsonl, sft_heldout.jsonl   {"instruction", "output", "function"}: sft.py's Alpaca-style records
    dpo_train.jsonl, dpo_heldout.jsonl   {"instruction", "chosen", "rejected", "function", "rejected_is"}: dpo.py's
    heldout_def_lines.jsonl  {"prompt", "answer"}: each held-out request and the first line of its answer, a
                             generation task for evaluate.py (exact match and F1 of the first line written)
    example_request.txt      one held-out request, for sample.py --chat=True --prompt="$(cat ...)"
    report.json, report.md   what was kept, and why the rest was not
The SFT and DPO train files hold the same functions in the same order, so sft.py and dpo.py,
holding out the same val_fraction of their records (chat.split_held_out), hold out the same
functions: DPO's held-out pairs are of functions SFT did not train on either. Reruns write
byte-identical files (all but report.json's time).
"""

import ast
import json
import os
import re
import time
import warnings

import numpy as np

from configurator import configure, print_config
from data import TokenBins, load_meta
from runlog import save_atomically, write_card
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
dataset = "pystdlib_bpe"  # the prepared code corpus, data_root/<dataset> (prepare.py config/data_pystdlib_bpe.py)
data_root = "data"
out_dir = ""  # where the records go; empty: data_root/<dataset>_chat
block_size = 256  # the chat model's context in tokens: a request with its answer (each answer of a pair) must fit
max_answer_chars = 2000  # longer answers are left out, whatever the context
seed = 1337  # which other function's body a rejected answer borrows
config = configure(globals())
print_config(config)
if max_answer_chars < 1:
    raise SystemExit(f"config error: max_answer_chars={max_answer_chars} must be >= 1")
# -----------------------------------------------------------------------------

CHAT_TOKENS_PER_TURN = 5  # chat.render: <|endoftext|><|user|> request <|end|><|assistant|> answer <|end|>
STUB_LINES = {"pass", "...", "raise NotImplementedError", "raise NotImplementedError()"}


def documents(folder, meta, tokenizer, split):
    """The documents of a prepared split as text: its token files (checked as train.py checks them: there,
    whole tokens, ids in the vocabulary), decoded, cut at end-of-text."""
    ids = np.concatenate(TokenBins(folder, meta, split, block_size=1).files)
    ends = np.flatnonzero(ids == tokenizer.eot_id)
    starts = np.concatenate([[0], ends + 1])
    return [tokenizer.decode(ids[a:b]) for a, b in zip(starts, np.append(ends, len(ids))) if b > a]


def parsed(text):
    """The Python of a document as [(lines, module tree)]: the whole of it, or, when it does not parse
    (the pieces of a long file that prepare.py cut and split apart), each top-level block that does."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # the parser's line ends, so its line numbers match
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarnings of old code (invalid escapes) are not ours to report
        for block in [text] + (re.split(r"\n(?=\S)", text) if "\n" in text else []):
            try:
                tree = ast.parse(block)
            except (SyntaxError, ValueError):
                continue
            yield block.split("\n"), tree
            if block is text:
                return


def functions(tree):
    """(class name or None, function node) of each function at module level or in a module-level class."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield None, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield node.name, item


def chat_turn(lines, cls, node):
    """(request, def lines, body lines) of a function, or the reason it is left out."""
    name = node.name
    if name.startswith("_") or (cls or "").startswith("_"):
        return "private"
    if name.startswith("test") or (cls or "").startswith("Test"):
        return "test"
    doc = ast.get_docstring(node)
    if not doc or not doc.strip():
        return "undocumented"
    docstring, code = node.body[0], node.body[1:]
    if not code or all(ast.unparse(statement) in STUB_LINES for statement in code):
        return "stub"
    if docstring.lineno == node.lineno or code[0].lineno == docstring.end_lineno:
        return "one-line"  # the docstring shares a line with code: no clean cut
    source = lines[node.lineno - 1 : node.end_lineno]
    indent = source[0][: node.col_offset]
    if any(line.strip() and not line.startswith(indent) for line in source):
        return "unparsable"  # a multi-line string less indented than the method
    source = [line[len(indent):] for line in source]
    head = source[: docstring.lineno - node.lineno]
    body = source[docstring.end_lineno - node.lineno + 1 :]
    while body and not body[0].strip():
        body.pop(0)
    try:
        ast.parse("\n".join(head + body))
    except SyntaxError:
        return "unparsable"
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    signature = f"`{name}({ast.unparse(node.args)})`"
    kind = "an async" if isinstance(node, ast.AsyncFunctionDef) else "a"
    request = (f"Write {kind} method {signature} of a Python class `{cls}` that: {paragraph}" if cls else
               f"Write {kind} Python function {signature} that: {paragraph}")
    return request, head, body


if not os.path.isfile(os.path.join(data_root, dataset, "meta.json")):
    raise SystemExit(f"prepare_chat error: no prepared dataset in {os.path.join(data_root, dataset)}; run "
                     f"python prepare.py first (with --dataset={dataset} if it is not the default)")
t0 = time.time()
folder = os.path.join(data_root, dataset)
meta = load_meta(folder)  # checked, as train.py reads it: a broken meta.json is one line
if not {"train", "val"} <= set(meta["splits"]):
    raise SystemExit(f"prepare_chat error: {folder} has no val split to hold functions out from; prepare it "
                     "with --val_fraction above 0")
tokenizer = Tokenizer(meta["tokenizer"])
out_dir = out_dir or os.path.join(data_root, f"{dataset}_chat")


def n_tokens(text):
    return len(tokenizer.encode(text))


def fits(request, answer):
    return n_tokens(request) + n_tokens(answer) + CHAT_TOKENS_PER_TURN <= block_size + 1  # chat.training_example


# every function of each split, as (name, request, def lines, body lines); what was left out, by reason
removed = dict.fromkeys(["private", "test", "undocumented", "stub", "one-line", "unparsable", "too long",
                         "repeated", "also in train"], 0)
kept = {"train": [], "val": []}
for split in kept:
    seen = set()
    for text in documents(folder, meta, tokenizer, split):
        for lines, tree in parsed(text):
            for cls, node in functions(tree):
                turn = chat_turn(lines, cls, node)
                if isinstance(turn, str):
                    removed[turn] += 1
                    continue
                request, head, body = turn
                answer = "\n".join(head + body)
                if len(answer) > max_answer_chars or not fits(request, answer):
                    removed["too long"] += 1
                elif request in seen:
                    removed["repeated"] += 1
                else:
                    seen.add(request)
                    kept[split].append((f"{cls}.{node.name}" if cls else node.name, request, head, body))
train_requests = {request for _, request, _, _ in kept["train"]}
train_answers = {"\n".join(head + body) for _, _, head, body in kept["train"]}
heldout = [f for f in kept["val"] if f[1] not in train_requests and "\n".join(f[2] + f[3]) not in train_answers]
removed["also in train"] = len(kept["val"]) - len(heldout)
kept["val"] = heldout


REJECTED = ("another function's body", "another function's def line", "its body cut in half")


def pairs(funcs, rng):
    """A preference record per function: chosen its code, rejected (in turn, one kind per function)
    another function's body under its def line (does the code do what was asked?), its body under
    another function's def line (is it the function that was asked for?), or its body cut to the
    first half of its lines (is it whole?). The other function is the first in a seeded order that
    makes a different answer that fits; where none does, the cut body is rejected."""
    order = rng.permutation(len(funcs))
    records = []
    for i, (name, request, head, body) in enumerate(funcs):
        chosen, rejected, kind = "\n".join(head + body), None, REJECTED[i % 3]
        if kind != REJECTED[2]:
            for j in (order[(i + k) % len(order)] for k in range(min(50, len(order)))):
                other = "\n".join(head + funcs[j][3] if kind == REJECTED[0] else funcs[j][2] + body)
                if other != chosen and fits(request, other):
                    rejected = other
                    break
        if rejected is None:
            rejected, kind = "\n".join(head + body[: len(body) // 2]), REJECTED[2]
        records.append({"instruction": request, "chosen": chosen, "rejected": rejected, "function": name,
                        "rejected_is": kind})
    return records


def write_jsonl(path, records):
    save_atomically(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


if not kept["train"] or not kept["val"]:
    raise SystemExit(f"prepare_chat error: {folder} has {len(kept['train'])} training and {len(kept['val'])} held-out "
                     f"documented functions that fit block_size={block_size}; prepare a Python corpus, or raise "
                     "block_size")
try:
    os.makedirs(out_dir, exist_ok=True)
except OSError as e:
    raise SystemExit(f"prepare_chat error: cannot write in {out_dir} ({e.strerror}); set --out_dir to a folder you "
                     "can write to") from None
counts = {}
for split, suffix in (("train", "train"), ("val", "heldout")):
    funcs = kept[split]
    sft = [{"instruction": request, "output": "\n".join(head + body), "function": name}
           for name, request, head, body in funcs]
    dpo = pairs(funcs, np.random.default_rng(seed))
    write_jsonl(os.path.join(out_dir, f"sft_{suffix}.jsonl"), sft)
    write_jsonl(os.path.join(out_dir, f"dpo_{suffix}.jsonl"), dpo)
    counts[f"{suffix} functions"] = len(funcs)
    counts[f"{suffix} methods"] = sum("." in name for name, _, _, _ in funcs)
    counts[f"{suffix} answer tokens"] = sum(n_tokens(r["output"]) for r in sft)
    for kind in REJECTED:
        counts[f"{suffix} pairs rejecting {kind}"] = sum(r["rejected_is"] == kind for r in dpo)
write_jsonl(os.path.join(out_dir, "heldout_def_lines.jsonl"),
            [{"prompt": request, "answer": head[0]} for _, request, head, _ in kept["val"]])
# the example: a held-out module-level function with a short one-line description and a body of a few lines,
# something a reader can check at a glance
candidates = [f for f in kept["val"] if "." not in f[0] and len(f[2]) == 1 and 2 <= len(f[3]) <= 8] or kept["val"]
example = min(candidates, key=lambda f: (len(f[1]), f[1]))
save_atomically(os.path.join(out_dir, "example_request.txt"), lambda f: f.write(example[1] + "\n"))
seconds = time.time() - t0
save_atomically(os.path.join(out_dir, "report.json"), lambda f: json.dump(
    {"stage": "chat data", "source": folder, "output": counts, "removed": removed, "seconds": {"total": seconds},
     "config": config}, f, indent=2))
write_card(out_dir)
print(f"{out_dir}: {len(kept['train']):,} training and {len(kept['val']):,} held-out functions of {folder} as SFT "
      f"records and DPO pairs ({sum(removed.values()):,} left out: "
      + ", ".join(f"{n:,} {reason}" for reason, n in removed.items() if n) + f"); {seconds:.1f}s")
print(f"example request: {example[1]}")
