"""
Evaluate a checkpoint: perplexity and bits per byte on text, zero-shot multiple-choice
benchmarks, and exact match / F1 on generation tasks; prints one table and writes one
JSON report.

    python evaluate.py --out_dir=out/quickstart --data_dir=../shared/data/evals
    python evaluate.py --out_dir=out/quickstart --data_dir=../shared/data/evals --tasks=hellaswag,piqa --limit=200
    python evaluate.py --out_dir=out/quickstart --tasks=perplexity --text_file=../shared/data/wikitext-2/test.txt --stride=64
    python evaluate.py --ckpt=out/run/ckpt.pt --tasks=my_questions.jsonl --max_new_tokens=16
    torchrun --standalone --nproc_per_node=8 evaluate.py --out_dir=out/gpt2 --data_dir=../shared/data/evals

Tasks (--tasks, comma-separated): hellaswag, arc_easy, piqa, winogrande and lambada are
read from --data_dir (the file names are in _BENCHMARKS below; README.md says where to get
them); any other entry ending in .jsonl is a file whose format is told by its keys:
  HellaSwag   {"activity_label", "ctx", "endings", "label"}   context "<activity_label>: <ctx>"
  ARC, PIQA   {"query", "choices", "gold"}                     context "<query>\\nAnswer:"
  Winogrande  {"context_options", "continuation", "gold"}      each option is a context; the shared
                                                               continuation is what gets scored
  LAMBADA     {"context", "continuation"}                      the last word of a passage
  generation  {"prompt", "answers": [...]} or {"prompt", "answer"}
and 'perplexity' scores --text_file, or else the --split of data_root/<dataset> (by default
the dataset the checkpoint was trained on).

Scoring:
- Every context starts with end-of-text, as a document does in training. A continuation is
  joined to its context by one space, which BPE tokenizers attach to the next word (' dog'
  is one token); no space goes before a continuation that starts with ,.;:!?) or 's.
- Multiple choice: the log-likelihood of each option's continuation given its context.
  'accuracy' picks the highest sum; 'accuracy_norm' the highest sum per character of the
  continuation (its leading space included), as lm-evaluation-harness's acc_norm, which
  keeps long endings from losing only for being long.
- LAMBADA: 'accuracy' counts passages whose last word greedy decoding gets exactly (every
  token of it the most likely one); 'perplexity' is exp of the mean negative
  log-likelihood per word, as lm-evaluation-harness reports it.
- Generation: greedy decoding from the prompt, up to max_new_tokens, ending at
  end-of-text (and at a newline if stop_at_newline); exact match and token F1 after SQuAD's
  answer normalisation, the best over the references. Prompts are batched by length and
  left-padded, with the padding masked, so each answer is the one its prompt gets alone.
- Perplexity: the text is cut into windows of block_size tokens starting every `stride`
  tokens; each token is scored once, in the first window that reaches it, so with a
  stride below block_size every token but the first block_size has at least
  block_size - stride tokens of context (and the run costs block_size / stride times more).
  bits_per_byte = total nats / ln 2 / UTF-8 bytes of the scored text, which compares
  models with different tokenizers.
- A context longer than block_size keeps its last tokens, so the continuation is always
  scored. Options are right-padded into batches (positions stay those of an unpadded
  row) and the padding is masked out of every sum.

Chat models (those with chat.py's tokens: sft.py and dpo.py checkpoints) get each
generation prompt as a user turn in chat.py's format and answer in the assistant's turn,
cut at <|end|> (chat='auto'; 'always' or 'never' forces it). Multiple choice and perplexity stay
plain text for every model: they score how likely a text continues, which is what the
benchmarks define, and a chat wrapper around a sentence fragment would change the task.

Under torchrun the examples are dealt out by rank and the results gathered, so the
numbers equal a single process's; rank 0 alone prints and writes.

Reads the checkpoint (the model, its config and tokenizer) and the task files. Writes
the report (--report, default eval.json beside the checkpoint) under a temporary name,
then renames it into place. train.py can call evaluate_examples() and perplexity()
directly for benchmark scores during training.
"""

import json
import math
import os
import re
import string
import tempfile
import time
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from chat import has_chat_tokens, prompt_ids, stop_ids
from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import configure, print_config
from runlog import write_card
from runtime import autocast_context, device_name, pick_dtype, setup_distributed, teardown_distributed
from training import load_meta

# -----------------------------------------------------------------------------
# what to evaluate
out_dir = "out/default"  # reads out_dir/ckpt.pt ...
ckpt = ""  # ... unless a checkpoint path is given here
tasks = "hellaswag,arc_easy,piqa,winogrande,lambada,perplexity"  # names, 'perplexity', or paths to .jsonl files
data_dir = "data/evals"  # the folder holding the benchmark files named in _BENCHMARKS
limit = 0  # only the first N examples of each task (perplexity: the first N * block_size tokens); 0 for all
report = ""  # the JSON report's path; empty: eval.json beside the checkpoint
# perplexity
text_file = ""  # score this UTF-8 text file; empty: the split below of a prepared dataset
dataset = ""  # data_root/<dataset>; empty: the dataset the checkpoint was trained on
data_root = "data"
split = "val"
stride = 0  # tokens between window starts; 0: block_size (windows do not overlap)
# generation tasks
max_new_tokens = 32
stop_at_newline = True  # an answer ends at its first newline (and always at end-of-text)
chat = "auto"  # prompts as a user turn in chat.py's format: 'auto' (models with chat tokens), 'always', 'never'
# running
batch_size = 16  # sequences per forward pass; lower it if memory runs out
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------

# Benchmark files in data_dir, by task name (the underscore keeps it out of the config keys).
_BENCHMARKS = {
    "hellaswag": "hellaswag_val.jsonl",
    "arc_easy": "arc_easy.jsonl",
    "piqa": "piqa.jsonl",
    "winogrande": "winogrande.jsonl",
    "lambada": "lambada_openai.jsonl",
}


# -----------------------------------------------------------------------------
# reading benchmark files


def bad_record(where, problem):
    return SystemExit(f"evaluate error: {where}: {problem}; fix the record or remove the line")


def text_field(record, key, where):
    if not isinstance(record[key], str) or not record[key].strip():
        raise bad_record(where, f"'{key}' must be a non-empty string")
    return record[key]


def gold_index(value, n_options, where):
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # HellaSwag's original files store the label as a string
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_options:
        raise bad_record(where, f"the gold answer {value!r} is not an index into the {n_options} options")
    return value


def string_list(record, key, where, at_least):
    values = record[key]
    if not isinstance(values, list) or len(values) < at_least or not all(isinstance(v, str) and v.strip() for v in values):
        raise bad_record(where, f"'{key}' must be a list of at least {at_least} non-empty strings")
    return values


def spaced(context, continuation):
    """context and continuation with the space between them leading the continuation (see the docstring)."""
    context, continuation = context.rstrip(" "), continuation.lstrip(" ")
    if continuation[0] in ",.;:!?)" or continuation.startswith("'s"):
        return context, continuation
    return context, " " + continuation


def parse_record(record, where):
    """(kind, example) for one benchmark record; the keys tell the format."""
    keys = set(record)
    if {"ctx", "endings", "label"} <= keys:  # HellaSwag
        context = text_field(record, "ctx", where)
        if record.get("activity_label"):
            context = f"{record['activity_label']}: {context}"
        endings = string_list(record, "endings", where, 2)
        return "choice", {"options": [spaced(context, e) for e in endings],
                          "gold": gold_index(record["label"], len(endings), where)}
    if {"query", "choices", "gold"} <= keys:  # ARC, PIQA
        context = text_field(record, "query", where).strip() + "\nAnswer:"
        choices = string_list(record, "choices", where, 2)
        return "choice", {"options": [spaced(context, c) for c in choices],
                          "gold": gold_index(record["gold"], len(choices), where)}
    if {"context_options", "continuation", "gold"} <= keys:  # Winogrande
        continuation = text_field(record, "continuation", where)
        contexts = string_list(record, "context_options", where, 2)
        return "choice", {"options": [spaced(c, continuation) for c in contexts],
                          "gold": gold_index(record["gold"], len(contexts), where)}
    if {"context", "continuation"} <= keys:  # LAMBADA
        return "lambada", {"pair": spaced(text_field(record, "context", where), text_field(record, "continuation", where))}
    if "prompt" in keys and ("answers" in keys or "answer" in keys):
        answers = record["answers"] if "answers" in keys else [record["answer"]]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise bad_record(where, "'answers' must be a list of strings, or 'answer' a string")
        return "generation", {"prompt": text_field(record, "prompt", where), "answers": answers}
    raise SystemExit(f"evaluate error: {where}: unknown record format (keys {', '.join(sorted(keys))}); expected "
                     "HellaSwag (ctx, endings, label), ARC/PIQA (query, choices, gold), Winogrande (context_options, "
                     "continuation, gold), LAMBADA (context, continuation) or generation (prompt, answers)")


def read_examples(path, limit=0):
    """(kind, examples) of a benchmark JSONL file, all its records in one format; limit > 0 reads only the first ones."""
    if not os.path.isfile(path):
        raise SystemExit(f"evaluate error: no benchmark file {path}; point --data_dir at the folder holding it "
                         "or pass the path of a .jsonl file in --tasks")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")  # not splitlines(): JSON strings may hold U+2028 and its kin
    except UnicodeDecodeError:
        raise SystemExit(f"evaluate error: {path} is not UTF-8 text; convert it or pick another file") from None
    kind, examples = None, []
    for line_no, line in enumerate(lines, 1):
        if limit and len(examples) == limit:
            break
        if not line.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"evaluate error: {where} is not valid JSON ({e.msg}); "
                             "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise bad_record(where, "a record must be a JSON object")
        record_kind, example = parse_record(record, where)
        if kind not in (None, record_kind):
            raise bad_record(where, f"a {record_kind} record in a file of {kind} records")
        kind = record_kind
        examples.append(example)
    if not examples:
        raise SystemExit(f"evaluate error: {path} holds no records; it should have one JSON object per line")
    return kind, examples


def task_path(task, data_dir):
    if task.endswith(".jsonl"):
        return task
    if task in _BENCHMARKS:
        return os.path.join(data_dir, _BENCHMARKS[task])
    raise SystemExit(f"evaluate error: unknown task '{task}'; use {', '.join(_BENCHMARKS)}, perplexity "
                     "or the path of a .jsonl file")


def text_tokens(tokenizer, path):
    """The token stream of a text file for perplexity, led by end-of-text so that its first token is scored too."""
    if not os.path.isfile(path):
        raise SystemExit(f"evaluate error: no text file {path}; check --text_file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SystemExit(f"evaluate error: {path} is not UTF-8 text; convert it or pick another file") from None
    if not text:
        raise SystemExit(f"evaluate error: {path} is empty; pick a file with text in it")
    return np.array([tokenizer.eot_id] + tokenizer.encode(text), dtype=np.int64)


def split_tokens(tokenizer, data_dir, split):
    """The token stream of a prepared split (its bin files in order), led by end-of-text like text_tokens'."""
    meta = load_meta(data_dir)
    if meta["tokenizer"] != tokenizer.description:
        raise SystemExit(f"evaluate error: {data_dir} was prepared with the {meta['tokenizer']['kind']} tokenizer, not the "
                         f"checkpoint's ({tokenizer.kind}); set --dataset to data prepared with it, or use --text_file")
    if split not in meta["splits"]:
        raise SystemExit(f"evaluate error: {data_dir} has no '{split}' split; use --split={' or '.join(meta['splits'])}")
    parts = [np.array([tokenizer.eot_id], dtype=meta["dtype"])]
    for name in meta["splits"][split]["files"]:
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise SystemExit(f"evaluate error: {path} is listed in meta.json but missing; run prepare.py again")
        parts.append(np.memmap(path, dtype=meta["dtype"], mode="r"))
    return np.concatenate(parts)


# -----------------------------------------------------------------------------
# scoring


@torch.no_grad()
def score_rows(model, rows, batch_size=16, autocast=nullcontext()):
    """Score the last n tokens of each row (ids, n), each token predicted from every token before it.

    A row holds at most block_size + 1 tokens. Returns per row (sum of the n tokens' log-probabilities,
    whether greedy decoding gives all n of them). Rows are batched by length and right-padded, so every
    row keeps the positions it would have alone; targets of -1 mark context and padding, which no sum counts.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    results = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch: less padding
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        width = max(len(rows[i][0]) for i in batch) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -1, dtype=torch.long)
        for r, i in enumerate(batch):
            ids, n = rows[i]
            inputs[r, : len(ids) - 1] = torch.tensor(ids[:-1])
            targets[r, len(ids) - 1 - n : len(ids) - 1] = torch.tensor(ids[-n:])
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast:
            logits, _ = model(inputs, all_logits=True)
        logits = logits.float()
        logits[..., vocab_size:] = -float("inf")  # the vocabulary's padding ids are not tokens: no probability
        logprobs = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        logprobs = logprobs.view_as(targets)
        greedy = ((logits.argmax(dim=-1) == targets) | (targets < 0)).all(dim=1)
        for r, (logprob, hit) in enumerate(zip(logprobs.sum(dim=1).tolist(), greedy.tolist())):
            results[batch[r]] = (logprob, hit)
    model.train(was_training)
    return results


def score_continuations(model, tokenizer, contexts, continuations, batch_size=16, autocast=nullcontext()):
    """Per (context, continuation) pair: (log-likelihood of the continuation, whether greedy decoding gives it).

    The context starts with end-of-text; when the pair is longer than the model's context, the
    context loses its first tokens (and a continuation longer than block_size its first ones too).
    """
    block_size = model.config.block_size
    rows = []
    for context, continuation in zip(contexts, continuations):
        cont = tokenizer.encode(continuation)
        ids = ([tokenizer.eot_id] + tokenizer.encode(context) + cont)[-(block_size + 1) :]
        rows.append((ids, min(len(cont), block_size)))
    return score_rows(model, rows, batch_size, autocast)


def sliding_windows(n_tokens, block_size, stride):
    """(start, end, n_scored) windows over a stream of n_tokens: tokens[start:end] is one row whose last
    n_scored tokens are scored. Windows start every stride tokens; every token but the first is scored once."""
    windows, start, scored_to = [], 0, 1
    while scored_to < n_tokens:
        end = min(start + block_size + 1, n_tokens)
        windows.append((start, end, end - scored_to))
        start, scored_to = start + stride, end
    return windows


def perplexity(model, tokens, stride=0, batch_size=16, autocast=nullcontext(), rank=0, world_size=1):
    """(total nats, scored tokens) over tokens[1:], each token scored once with up to block_size tokens of
    context; stride 0 means block_size. exp(nats / tokens) is the perplexity."""
    block_size = model.config.block_size
    windows = sliding_windows(len(tokens), block_size, stride or block_size)
    mine, nats = windows[rank::world_size], []
    for first in range(0, len(mine), batch_size):
        rows = [(tokens[start:end].tolist(), n) for start, end, n in mine[first : first + batch_size]]
        nats += [-logprob for logprob, _ in score_rows(model, rows, batch_size, autocast)]
    return sum(gather(nats, world_size)), len(tokens) - 1


def count_bytes(tokenizer, ids):
    """UTF-8 bytes of the text that ids stand for; end-of-text marks count none."""
    n_eot = int(np.count_nonzero(np.asarray(ids) == tokenizer.eot_id))
    marker = len(tokenizer.decode([tokenizer.eot_id]).encode("utf-8"))  # how decode() shows end-of-text
    return len(tokenizer.decode(ids).encode("utf-8")) - n_eot * marker


def newline_tokens(tokenizer):
    """Ids whose text holds a newline: generation stops at them when stop_at_newline."""
    return [i for i in range(tokenizer.vocab_size) if i != tokenizer.eot_id and "\n" in tokenizer.decode([i])]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, max_new_tokens=32, stop_at_newline=True, autocast=nullcontext(),
                     chat=False, batch_size=16):
    """Greedy continuations of each prompt, cut at end-of-text (and the first newline), stripped.
    With chat, each prompt is a user turn in chat.py's format and the answer is the assistant's
    turn, cut at its <|end|>. Prompts go batch_size at a time, sorted by length so that a batch
    needs little padding, and left-padded: every row's next token is at the same index, and
    generate() masks the padding, so each answer is the one its prompt gets alone."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ends = sorted(stop_ids(tokenizer)) if chat else [tokenizer.eot_id]
    stop = ends + (newline_tokens(tokenizer) if stop_at_newline else [])
    rows = []
    for prompt in prompts:
        if chat:
            ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        else:
            ids = [tokenizer.eot_id] + tokenizer.encode(prompt)
        rows.append(ids[-model.config.block_size :])
    answers = [None] * len(prompts)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    # A batch whose context fills up runs its whole window for every new token: prompts that
    # would never fill it alone get batches of their own, or they would pay that too.
    fits = [i for i in order if len(rows[i]) + max_new_tokens <= model.config.block_size]
    batches = [group[first : first + batch_size] for group in (fits, order[len(fits) :])
               for first in range(0, len(group), batch_size)]
    for batch in batches:
        width = max(len(rows[i]) for i in batch)
        pad = [width - len(rows[i]) for i in batch]  # tokens before each row, of any id: generate() masks them
        idx = torch.tensor([[tokenizer.eot_id] * n + rows[i] for n, i in zip(pad, batch)], device=device)
        with autocast:
            out = model.generate(idx, max_new_tokens, temperature=0, stop_tokens=stop,
                                 pad=torch.tensor(pad, device=device) if any(pad) else None)  # one length: no mask
        for r, i in enumerate(batch):
            # A row that stopped early repeats its stop token until the whole batch has stopped: the
            # answer ends at the first end token here, and at the first newline below.
            new = out[r, width:].tolist()
            new = new[: min((new.index(t) for t in ends if t in new), default=len(new))]
            text = tokenizer.decode(new)
            answers[i] = (text.split("\n")[0] if stop_at_newline else text).strip()
    model.train(was_training)
    return answers


def normalize_answer(text):
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction, references):
    """1.0 if the prediction equals one of the references (a string or a list) after normalisation, else 0.0."""
    references = [references] if isinstance(references, str) else references
    return max(float(normalize_answer(prediction) == normalize_answer(r)) for r in references)


def f1_score(prediction, references):
    """SQuAD's token F1, the best over the references; an answer that normalises to nothing scores 1 against
    a reference that does too and 0 against any other."""
    references = [references] if isinstance(references, str) else references
    best = 0.0
    predicted = normalize_answer(prediction).split()
    for reference in references:
        expected = normalize_answer(reference).split()
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
            continue
        common = sum((Counter(predicted) & Counter(expected)).values())
        if common:
            precision, recall = common / len(predicted), common / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def gather(local, world_size):
    """Every rank's results in the order of the items they were dealt from: rank r had items r, r + world_size, ..."""
    if world_size == 1:
        return local
    parts = [None] * world_size
    torch.distributed.all_gather_object(parts, local)
    return [parts[i % world_size][i // world_size] for i in range(sum(len(p) for p in parts))]


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def evaluate_examples(kind, examples, model, tokenizer, batch_size=16, autocast=nullcontext(), rank=0, world_size=1,
                      max_new_tokens=32, stop_at_newline=True, chat=False):
    """The metrics of one task (kind and examples as read_examples returns them), every rank taking its share;
    chat: generation prompts in the chat format (see generate_answers)."""
    mine = examples[rank::world_size]
    if kind == "generation":
        answers = generate_answers(model, tokenizer, [ex["prompt"] for ex in mine], max_new_tokens, stop_at_newline,
                                   autocast, chat, batch_size)
        scores = gather([(exact_match_score(a, ex["answers"]), f1_score(a, ex["answers"])) for a, ex in zip(answers, mine)],
                        world_size)
        return {"examples": len(scores), "exact_match": sum(em for em, _ in scores) / len(scores),
                "f1": sum(f1 for _, f1 in scores) / len(scores)}
    pairs = [pair for ex in mine for pair in (ex["options"] if kind == "choice" else [ex["pair"]])]
    scores = iter(score_continuations(model, tokenizer, *zip(*pairs), batch_size, autocast) if pairs else [])
    if kind == "lambada":
        results = gather([next(scores) for _ in mine], world_size)
        return {"examples": len(results), "accuracy": sum(hit for _, hit in results) / len(results),
                "perplexity": math.exp(-sum(logprob for logprob, _ in results) / len(results))}
    picks = []
    for ex in mine:
        logprobs = [next(scores)[0] for _ in ex["options"]]
        per_char = [logprob / len(continuation) for logprob, (_, continuation) in zip(logprobs, ex["options"])]
        picks.append((argmax(logprobs) == ex["gold"], argmax(per_char) == ex["gold"]))
    picks = gather(picks, world_size)
    return {"examples": len(picks), "accuracy": sum(hit for hit, _ in picks) / len(picks),
            "accuracy_norm": sum(hit for _, hit in picks) / len(picks)}


# -----------------------------------------------------------------------------
# output


def describe(result):
    """The metrics of one task as table text."""
    if "bits_per_byte" in result:
        return (f"perplexity {result['perplexity']:.4f}  bits/byte {result['bits_per_byte']:.4f}  "
                f"loss {result['loss']:.4f} nats/token")
    if "accuracy_norm" in result:
        return f"accuracy {100 * result['accuracy']:.2f}%  accuracy_norm {100 * result['accuracy_norm']:.2f}%"
    if "exact_match" in result:
        return f"exact_match {100 * result['exact_match']:.2f}%  f1 {100 * result['f1']:.2f}%"
    return f"accuracy {100 * result['accuracy']:.2f}%  perplexity {result['perplexity']:.4g}"


def save_report(path, report):
    """Write the JSON report to a temporary file beside path, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".eval-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    config = configure(globals())
    dist = setup_distributed(device)
    log = print if dist.is_main else (lambda *args, **kwargs: None)
    if dist.is_main:
        print_config(config)
    if limit < 0 or batch_size < 1 or stride < 0 or max_new_tokens < 1:
        raise SystemExit("config error: need limit >= 0, batch_size >= 1, stride >= 0 and max_new_tokens >= 1")
    autocast = autocast_context(dist.device, pick_dtype(dist.device, dtype))

    # the model: all of it from the checkpoint
    ckpt_path = ckpt or os.path.join(out_dir, "ckpt.pt")
    checkpoint = load_checkpoint(ckpt_path)
    model, tokenizer = model_from_checkpoint(checkpoint, ckpt_path)
    model.eval().to(dist.device)
    block_size = model.config.block_size
    if stride > block_size:
        raise SystemExit(f"config error: stride={stride} is more than block_size={block_size}, so tokens would go "
                         f"unscored; use a stride of at most {block_size}, or 0 for {block_size}")
    if chat not in ("auto", "always", "never"):
        raise SystemExit(f"config error: chat={chat!r} is not one of auto, always, never")
    use_chat = has_chat_tokens(tokenizer) if chat == "auto" else chat == "always"
    if use_chat and not has_chat_tokens(tokenizer):
        raise SystemExit(f"config error: chat='always' but {ckpt_path} has no chat tokens; fine-tune it with sft.py "
                         "first, or use --chat=never")
    log(f"{ckpt_path}: {checkpoint.get('kind', 'pretrain')} checkpoint, {model.num_params() / 1e6:.2f}M parameters, "
        f"{tokenizer.kind} tokenizer, context {block_size}; on {device_name(dist.device)}"
        + (f" x {dist.world_size} processes" if dist.world_size > 1 else "")
        + ("; generation prompts in the chat format" if use_chat else ""))

    # read every task's data first, so that a bad file stops the run before any compute
    task_data = {}
    for task in [t.strip() for t in tasks.split(",") if t.strip()]:
        if task == "perplexity" and text_file:
            task_data[task] = ("perplexity", (text_file, text_tokens(tokenizer, text_file)))
        elif task == "perplexity":
            folder = os.path.join(data_root, dataset or checkpoint.get("config", {}).get("dataset", ""))
            task_data[task] = ("perplexity", (f"{folder} {split}", split_tokens(tokenizer, folder, split)))
        else:
            name = os.path.splitext(os.path.basename(task))[0]
            task_data[name] = read_examples(task_path(task, data_dir), limit)
    if not task_data:
        raise SystemExit("config error: --tasks is empty; name at least one task")

    results = {}
    log(f"{'task':<16}{'examples/tokens':>16}  {'metrics':<62}{'seconds':>9}")
    for name, (kind, data) in task_data.items():
        t0 = time.time()
        if kind == "perplexity":
            source, tokens = data
            if limit:
                tokens = tokens[: limit * block_size + 1]
            nats, n_tokens = perplexity(model, tokens, stride, batch_size, autocast, dist.rank, dist.world_size)
            n_bytes = count_bytes(tokenizer, tokens[1:])
            result = {"source": source, "stride": stride or block_size, "tokens": n_tokens, "bytes": n_bytes,
                      "loss": nats / n_tokens, "perplexity": math.exp(nats / n_tokens),
                      "bits_per_byte": nats / math.log(2) / n_bytes}
            size = result["tokens"]
        else:
            result = evaluate_examples(kind, data, model, tokenizer, batch_size, autocast, dist.rank, dist.world_size,
                                       max_new_tokens, stop_at_newline, use_chat)
            size = result["examples"]
        result["seconds"] = time.time() - t0
        results[name] = result
        log(f"{name:<16}{size:>16,}  {describe(result):<62}{result['seconds']:>9.1f}")

    if dist.is_main:
        report_path = report or os.path.join(os.path.dirname(ckpt_path), "eval.json")
        save_report(report_path, {"checkpoint": ckpt_path, "kind": checkpoint.get("kind", "pretrain"), "chat": use_chat,
                                  "step": checkpoint.get("step"), "processes": dist.world_size,
                                  "device": device_name(dist.device), "config": config, "results": results})
        print(f"wrote {report_path}")
        print(f"wrote {write_card(os.path.dirname(report_path) or '.')}")
    teardown_distributed()
