"""
Benchmarks: reading benchmark files and scoring a model on them, exactly as EleutherAI's
lm-evaluation-harness (lm-eval 0.4.x) scores its zero-shot tasks. evaluate.py runs them from the
command line; train.py scores one at every evaluation (--benchmark). Nothing here is run alone.

Formats (one JSON object per line; the keys tell the format, every record of a file in one):
  HellaSwag, original  {"activity_label", "ctx_a", "ctx_b", "endings", "label"}
  HellaSwag, cleaned   {"activity_label", "ctx", "endings", "label"}   (activity_label optional)
  ARC, PIQA            {"query", "choices", "gold"}     context "<query>\\nAnswer:"
  Winogrande           {"context_options", "continuation", "gold"}
  LAMBADA              {"context", "continuation"}      the passage's last word is the continuation
  generation           {"prompt", "answers": [...]} or {"prompt", "answer"}

lm-eval's conventions, each mirrored from the lm-eval file named (paths inside its lm_eval package):
- No leading end-of-text: a context is scored from its first token, as lm-eval's HF model does for
  GPT-2-style tokenizers (api/model.py loglikelihood adds its prefix token only to an empty context).
  bos=True puts end-of-text first, for models trained to expect one.
- Context and continuation are joined by one space, whatever the continuation starts with (the
  target_delimiter " " of api/task.py construct_requests). Trailing whitespace of the context moves to
  the start of the continuation, and the continuation's tokens are those of the whole text after the
  context's own tokens (api/model.py _encode_pair), so BPE sees ' word' as one piece.
- accuracy picks the choice with the highest log-likelihood; accuracy_norm the highest log-likelihood
  per character of the choice itself, without the space before it (api/task.py process_results,
  completion_len = len(choice); its byte-length acc_bytes is another metric).
- HellaSwag (tasks/hellaswag/utils.py): the context is activity_label + ': ' + ctx_a + ' ' + ctx_b
  with ctx_b's first letter upper-cased and the rest lower-cased (Python's capitalize); context and
  endings lose WikiHow's bracketed tags ([header], [step], ...), ' [title]' becoming '. ', and one pass
  turns double spaces into single ones. The cleaned format gets the same clean-up, which changes
  nothing in text that is clean already.
- ARC and PIQA (tasks/arc/arc_easy.yaml, tasks/piqa/piqa.yaml): "Question: <question>\\nAnswer:" then
  each choice; the query here holds "Question: <question>", and any whitespace around it is dropped.
- Winogrande (tasks/winogrande/preprocess_winogrande.py): partial scoring. Each option fills the blank
  and ends its own context; the rest of the sentence (stripped) is the continuation all options share,
  and only it is scored. lm-eval's choices are those contexts, so accuracy_norm divides by their length
  (lm-eval's winogrande task reports accuracy alone).
- LAMBADA (tasks/lambada/lambada_openai.yaml): the last word, after one space, is the continuation;
  'accuracy' counts passages whose every token of it is the greedy one, 'perplexity' is exp of the
  mean negative log-likelihood of that word.
- Generation: greedy decoding from the prompt, up to max_new_tokens, ending at end-of-text (and at a
  newline if stop_at_newline); exact match and token F1 after SQuAD's answer normalisation, the best
  over the references. Prompts are batched by length and left-padded, with the padding masked, so each
  answer is the one its prompt gets alone.

A context longer than block_size loses its first tokens, so the continuation is always scored (as
lm-eval truncates too). Options are right-padded into batches (positions stay those of an unpadded
row) and the padding is masked out of every sum.
"""

import json
import math
import os
import re
import string
import sys
from collections import Counter
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from chat import prompt_ids, stop_ids

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


def hellaswag_clean(text):
    """lm-eval's clean-up of HellaSwag text (see the docstring), in its order."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def choice_example(contexts, continuations, choices, gold):
    """A multiple-choice example: one (context, continuation) pair per option, the continuation led by
    the joining space; accuracy_norm divides by the characters of each choice."""
    return {"options": [(c, " " + t) for c, t in zip(contexts, continuations)],
            "choice_chars": [len(choice) for choice in choices], "gold": gold}


def parse_record(record, where):
    """(kind, example) for one benchmark record; the keys tell the format."""
    keys = set(record)
    if {"activity_label", "ctx_a", "ctx_b", "endings", "label"} <= keys:  # HellaSwag's original files
        if not all(isinstance(record[k], str) for k in ("activity_label", "ctx_a", "ctx_b")):
            raise bad_record(where, "'activity_label', 'ctx_a' and 'ctx_b' must be strings")
        context = hellaswag_clean(f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}")
        endings = [hellaswag_clean(e) for e in string_list(record, "endings", where, 2)]
        return "choice", choice_example([context] * len(endings), endings, endings,
                                        gold_index(record["label"], len(endings), where))
    if {"ctx", "endings", "label"} <= keys:  # HellaSwag, cleaned
        context = text_field(record, "ctx", where)
        if record.get("activity_label"):
            context = f"{record['activity_label']}: {context}"
        endings = [hellaswag_clean(e) for e in string_list(record, "endings", where, 2)]
        return "choice", choice_example([hellaswag_clean(context)] * len(endings), endings, endings,
                                        gold_index(record["label"], len(endings), where))
    if {"query", "choices", "gold"} <= keys:  # ARC, PIQA
        context = text_field(record, "query", where).strip() + "\nAnswer:"
        choices = string_list(record, "choices", where, 2)
        return "choice", choice_example([context] * len(choices), choices, choices,
                                        gold_index(record["gold"], len(choices), where))
    if {"context_options", "continuation", "gold"} <= keys:  # Winogrande
        continuation = text_field(record, "continuation", where).strip()
        contexts = string_list(record, "context_options", where, 2)
        return "choice", choice_example(contexts, [continuation] * len(contexts), contexts,
                                        gold_index(record["gold"], len(contexts), where))
    if {"context", "continuation"} <= keys:  # LAMBADA
        return "lambada", {"pair": (text_field(record, "context", where), " " + text_field(record, "continuation", where))}
    if "prompt" in keys and ("answers" in keys or "answer" in keys):
        answers = record["answers"] if "answers" in keys else [record["answer"]]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise bad_record(where, "'answers' must be a list of strings, or 'answer' a string")
        return "generation", {"prompt": text_field(record, "prompt", where), "answers": answers}
    raise SystemExit(f"evaluate error: {where}: unknown record format (keys {', '.join(sorted(keys))}); expected "
                     "HellaSwag (activity_label, ctx_a, ctx_b, endings, label; or ctx, endings, label), ARC/PIQA "
                     "(query, choices, gold), Winogrande (context_options, continuation, gold), LAMBADA (context, "
                     "continuation) or generation (prompt, answers)")


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


# -----------------------------------------------------------------------------
# scoring


def progress_bar(items, description):
    """items with a progress bar on stderr when description is set and stderr is a terminal (a log file
    gets none)."""
    return tqdm(items, desc=description, leave=False, disable=not description or not sys.stderr.isatty())


@torch.no_grad()
def score_rows(model, rows, batch_size=16, autocast=nullcontext(), progress=""):
    """Score the last n tokens of each row (ids, n), each token predicted from every token before it.

    A row holds at most block_size + 1 tokens. Returns per row (sum of the n tokens' log-probabilities,
    whether greedy decoding gives all n of them). Rows are batched by length and right-padded, so every
    row keeps the positions it would have alone; targets of -1 mark context and padding, which no sum counts.
    progress: the description of a progress bar over the batches; empty for none.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    results = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch: less padding
    for first in progress_bar(range(0, len(order), batch_size), progress):
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


def score_continuations(model, tokenizer, pairs, bos=False, batch_size=16, autocast=nullcontext(), progress=""):
    """Per (context, continuation) pair: (log-likelihood of the continuation, whether greedy decoding gives it).

    Tokenized as lm-eval does (see the docstring): the context's trailing whitespace moves to the
    continuation, whose tokens are those of the whole text after the context's. bos: end-of-text first.
    When a pair is longer than the model's context, the context loses its first tokens (and a
    continuation longer than block_size its first ones too).
    """
    block_size = model.config.block_size
    rows = []
    for context, continuation in pairs:
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped) :] + continuation
        context_ids = tokenizer.encode(context)
        continuation_ids = tokenizer.encode(context + continuation)[len(context_ids) :]
        ids = ([tokenizer.eot_id] if bos else []) + context_ids + continuation_ids
        rows.append((ids[-(block_size + 1) :], min(len(continuation_ids), block_size)))
    return score_rows(model, rows, batch_size, autocast, progress)


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
                      max_new_tokens=32, stop_at_newline=True, chat=False, bos=False, progress=""):
    """The metrics of one task (kind and examples as read_examples returns them), every rank taking its share;
    chat: generation prompts in the chat format (see generate_answers); bos: contexts scored after end-of-text;
    progress: the description of a progress bar; empty for none."""
    mine = examples[rank::world_size]
    if kind == "generation":
        answers = generate_answers(model, tokenizer, [ex["prompt"] for ex in mine], max_new_tokens, stop_at_newline,
                                   autocast, chat, batch_size)
        scores = gather([(exact_match_score(a, ex["answers"]), f1_score(a, ex["answers"])) for a, ex in zip(answers, mine)],
                        world_size)
        return {"examples": len(scores), "exact_match": sum(em for em, _ in scores) / len(scores),
                "f1": sum(f1 for _, f1 in scores) / len(scores)}
    pairs = [pair for ex in mine for pair in (ex["options"] if kind == "choice" else [ex["pair"]])]
    scores = iter(score_continuations(model, tokenizer, pairs, bos, batch_size, autocast, progress) if pairs else [])
    if kind == "lambada":
        results = gather([next(scores) for _ in mine], world_size)
        return {"examples": len(results), "accuracy": sum(hit for _, hit in results) / len(results),
                "perplexity": math.exp(-sum(logprob for logprob, _ in results) / len(results))}
    picks = []
    for ex in mine:
        logprobs = [next(scores)[0] for _ in ex["options"]]
        per_char = [logprob / chars for logprob, chars in zip(logprobs, ex["choice_chars"])]
        picks.append((argmax(logprobs) == ex["gold"], argmax(per_char) == ex["gold"]))
    picks = gather(picks, world_size)
    return {"examples": len(picks), "accuracy": sum(hit for hit, _ in picks) / len(picks),
            "accuracy_norm": sum(hit for _, hit in picks) / len(picks)}


def describe(result):
    """The metrics of one task as table text."""
    if "bleu" in result:
        return f"BLEU {result['bleu']:.2f}  chrF {result['chrf']:.2f}  (beam {result['beam_size']})"
    if "bits_per_byte" in result:
        return (f"perplexity {result['perplexity']:.4f}  bits/byte {result['bits_per_byte']:.4f}  "
                f"loss {result['loss']:.4f} nats/token")
    if "accuracy_norm" in result:
        return f"accuracy {100 * result['accuracy']:.2f}%  accuracy_norm {100 * result['accuracy_norm']:.2f}%"
    if "exact_match" in result:
        return f"exact_match {100 * result['exact_match']:.2f}%  f1 {100 * result['f1']:.2f}%"
    return f"accuracy {100 * result['accuracy']:.2f}%  perplexity {result['perplexity']:.4g}"
