"""
Benchmarks: reading benchmark files and scoring a model on them, exactly as EleutherAI's
lm-evaluation-harness (lm-eval 0.4.x) scores its tasks. evaluate.py runs them from the command line;
train.py and sft.py score one at every evaluation (--benchmark). Nothing here is run alone.

    kind, examples = read_task("gsm8k", "../shared/data/evals", limit=50)   # or a .jsonl path
    evaluate_examples(kind, examples, model, tokenizer, chat=True)    # {"exact_match_flexible": ..., "chance": 0.0, ...}

The file formats (a record's keys tell which) and lm-eval's conventions, each with the lm-eval file it mirrors:
docs/evaluation.md. Every task's result has 'chance', the score of guessing, for evaluate.py's summary score.
"""

import math
import os
import random
import re
import string
import sys
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch

import sandbox
from chat import bad_record, collate, jsonl_records, prompt_ids, read_text, response_logprobs, stop_ids, text_field
from decoding import Decoder
from download import file_sha256
from optional import optional

# -----------------------------------------------------------------------------
# reading benchmark files


def options_and_gold(record, key, gold_key, where):
    """A multiple-choice record's options, record[key], and the index of the right one, record[gold_key]."""
    values, gold = record[key], record[gold_key]
    if not isinstance(values, list) or len(values) < 2 or not all(isinstance(v, str) and v.strip() for v in values):
        raise bad_record(where, f"'{key}' must be a list of at least 2 non-empty strings")
    if isinstance(gold, str) and gold.strip().isdigit():
        gold = int(gold)  # HellaSwag's original files store the label as a string
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(values):
        raise bad_record(where, f"the gold answer {gold!r} is not an index into the {len(values)} options")
    return values, gold


def hellaswag_clean(text):
    """lm-eval's clean-up of HellaSwag text (tasks/hellaswag/utils.py), in its order."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def choice_example(contexts, continuations, choices, gold):
    """A multiple-choice example: one (context, continuation) pair per option, the continuation led by
    the joining space; accuracy_norm divides by the characters of each choice."""
    return {"options": [(c, " " + t) for c, t in zip(contexts, continuations)],
            "choice_chars": [len(choice) for choice in choices], "gold": gold}


def parse_record(record, where):
    """(kind, example) for one benchmark record; the keys tell the format."""
    keys = set(record)
    original = {"activity_label", "ctx_a", "ctx_b", "endings", "label"} <= keys  # HellaSwag's original files
    if original or {"ctx", "endings", "label"} <= keys:  # HellaSwag, original or cleaned
        if original and not all(isinstance(record[k], str) for k in ("activity_label", "ctx_a", "ctx_b")):
            raise bad_record(where, "'activity_label', 'ctx_a' and 'ctx_b' must be strings")
        context = f"{record['ctx_a']} {record['ctx_b'].capitalize()}" if original else text_field(record, "ctx", where)
        if original or record.get("activity_label"):
            context = f"{record['activity_label']}: {context}"
        endings, gold = options_and_gold(record, "endings", "label", where)
        endings = [hellaswag_clean(e) for e in endings]
        return "choice", choice_example([hellaswag_clean(context)] * len(endings), endings, endings, gold)
    if {"query", "choices", "gold"} <= keys:  # ARC, PIQA
        context = text_field(record, "query", where).strip() + "\nAnswer:"
        choices, gold = options_and_gold(record, "choices", "gold", where)
        return "choice", choice_example([context] * len(choices), choices, choices, gold)
    if {"context_options", "continuation", "gold"} <= keys:  # Winogrande
        continuation = text_field(record, "continuation", where).strip()
        contexts, gold = options_and_gold(record, "context_options", "gold", where)
        return "choice", choice_example(contexts, [continuation] * len(contexts), contexts, gold)
    if {"context", "continuation"} <= keys:  # LAMBADA
        return "lambada", {"pair": (text_field(record, "context", where), " " + text_field(record, "continuation", where))}
    if {"task_id", "prompt", "test", "entry_point"} <= keys:  # HumanEval
        return "code", {"task_id": str(record["task_id"]), "prompt": text_field(record, "prompt", where),
                        "test": text_field(record, "test", where), "entry_point": text_field(record, "entry_point", where)}
    if {"question", "answer"} <= keys:  # GSM8K
        question, answer = text_field(record, "question", where), text_field(record, "answer", where)
        return "gsm8k", {"question": question, "answer": answer, "base_prompt": gsm8k_question(question)}
    if "prompt" in keys and ("answers" in keys or "answer" in keys):
        answers = record["answers"] if "answers" in keys else [record["answer"]]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise bad_record(where, "'answers' must be a list of strings, or 'answer' a string")
        return "generation", {"prompt": text_field(record, "prompt", where), "answers": answers}
    raise SystemExit(f"evaluate error: {where}: unknown record format (keys {', '.join(sorted(keys))}); expected "
                     "HellaSwag (activity_label, ctx_a, ctx_b, endings, label; or ctx, endings, label), ARC/PIQA "
                     "(query, choices, gold), Winogrande (context_options, continuation, gold), LAMBADA (context, "
                     "continuation), generation (prompt, answers), GSM8K (question, answer) or HumanEval (task_id, prompt, "
                     "test, entry_point)")


def read_examples(path, limit=0, stage="evaluate", hint="point --data_dir at the folder holding it or pass the "
                  "path of a .jsonl file in --tasks"):
    """(kind, examples) of a benchmark JSONL file (.jsonl.gz too), all its records in one format; limit > 0 reads
    only the first ones. A bad file stops with one line of stage's; hint says where the script names another."""
    text = read_text(path, stage, "benchmark file", hint)
    kind, examples = None, []
    for where, record in jsonl_records(text, path):
        if limit and len(examples) == limit:
            break
        if not isinstance(record, dict):
            raise bad_record(where, "a record must be a JSON object")
        record_kind, example = parse_record(record, where)
        if kind not in (None, record_kind):
            raise bad_record(where, f"a {record_kind} record in a file of {kind} records")
        kind = record_kind
        examples.append(example)
    if not examples:
        raise SystemExit(f"{stage} error: {path} holds no records; it should have one JSON object per line")
    return kind, examples


# Benchmark files in a data folder (evaluate.py's --data_dir), by task name.
TASKS = {"hellaswag": "hellaswag_val.jsonl", "arc_easy": "arc_easy.jsonl", "piqa": "piqa.jsonl",
         "winogrande": "winogrande.jsonl", "lambada": "lambada_openai.jsonl", "gsm8k": "gsm8k/test.jsonl",
         "humaneval": "humaneval/HumanEval.jsonl.gz"}
# Where the generative tasks' files come from, each pinned by its sha256: a missing file is an error that says
# how to fetch it, and a different one an error too (another version would give other scores).
GSM8K_DATA = ("https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/"
              "grade_school_math/data/")
SOURCES = {
    "gsm8k/test.jsonl": (GSM8K_DATA + "test.jsonl", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    "gsm8k/train.jsonl": (GSM8K_DATA + "train.jsonl", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "humaneval/HumanEval.jsonl.gz": ("https://github.com/openai/human-eval/raw/"
                                     "6d43fb980f9fee3c892a914eda09951f772ad10d/data/HumanEval.jsonl.gz",
                                     "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"),
}


def task_file(data_dir, name):
    """The path of a task's file under data_dir, checked against its sha256 where SOURCES pins one."""
    path = os.path.join(data_dir, name)
    if name not in SOURCES:
        return path
    url, sha256 = SOURCES[name]
    if not os.path.isfile(path):
        raise SystemExit(f"evaluate error: no benchmark file {path}; fetch it (curl -L --create-dirs -o {path} {url}, "
                         f"sha256 {sha256}) or point --data_dir at the folder holding {name}")
    if (digest := file_sha256(path)) != sha256:
        raise SystemExit(f"evaluate error: {path} has sha256 {digest}, not {sha256} (the file of {url}); "
                         "fetch that file again: another version gives other scores")
    return path


def read_task(task, data_dir="data/evals", limit=0):
    """(kind, examples) of a task: a name in TASKS, read from data_dir, or a .jsonl(.gz) path. gsm8k by name gets
    lm-eval's five-shot prompts from its train split (for base models), a GSM8K file by path the zero-shot one."""
    if task.endswith((".jsonl", ".jsonl.gz")):
        return read_examples(task, limit)
    if task not in TASKS:
        raise SystemExit(f"evaluate error: unknown task '{task}'; use {', '.join(TASKS)}, perplexity or the path of "
                         "a .jsonl file")
    kind, examples = read_examples(task_file(data_dir, TASKS[task]), limit)
    if task == "gsm8k":
        add_gsm8k_shots(examples, read_examples(task_file(data_dir, "gsm8k/train.jsonl"))[1])
    return kind, examples


# -----------------------------------------------------------------------------
# scoring


def progress_bar(items, description):
    """items with a progress bar on stderr when description is set and stderr is a terminal (not a log file)."""
    if not description or not sys.stderr.isatty():
        return items
    return optional("tqdm", "a progress bar").tqdm(items, desc=description, leave=False)


@torch.no_grad()
def score_rows(model, rows, batch_size=16, autocast=nullcontext(), progress=""):
    """Per row (ids, n) of at most block_size + 1 tokens: (the summed log-probability of its last n tokens, whether
    greedy decoding gives all n), each scored as alone (right-padded, batched by length). progress: a bar's label."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch: less padding
    for first in progress_bar(range(0, len(order), batch_size), progress):
        batch = order[first : first + batch_size]
        # padded as chat.collate pads SFT examples: inputs with 0, targets with -1 (not scored)
        units = [(ids[:-1], [-1] * (len(ids) - 1 - n) + ids[-n:], []) for ids, n in (rows[i] for i in batch)]
        inputs, targets, _ = (tensor.to(device) for tensor in collate(units, 0))
        with autocast:
            logits, _ = model(inputs, all_logits=True)
        logits = logits.float()
        logits[..., model.config.vocab_size :] = -float("inf")  # the vocabulary's padding ids are not tokens
        greedy = ((logits.argmax(dim=-1) == targets) | (targets < 0)).all(dim=1)
        for i, logprob, hit in zip(batch, response_logprobs(logits, targets).tolist(), greedy.tolist()):
            results[i] = (logprob, hit)
    model.train(was_training)
    return results


def score_continuations(model, tokenizer, pairs, bos=False, batch_size=16, autocast=nullcontext(), progress=""):
    """Per (context, continuation) pair: (log-likelihood of the continuation, whether greedy decoding gives it).
    Tokenized as lm-eval does (api/model.py _encode_pair): the context's trailing whitespace moves to the
    continuation, whose tokens are those of the whole text after the context's. bos: end-of-text first.
    A pair longer than the model's context loses its first tokens."""
    block_size = model.config.block_size
    rows = []
    for context, continuation in pairs:
        context_ids = tokenizer.encode(context.rstrip())  # its trailing whitespace goes with the continuation
        continuation_ids = tokenizer.encode(context + continuation)[len(context_ids) :]
        ids = ([tokenizer.eot_id] if bos else []) + context_ids + continuation_ids
        rows.append((ids[-(block_size + 1) :], min(len(continuation_ids), block_size)))
    return score_rows(model, rows, batch_size, autocast, progress)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts, max_new_tokens, end_ids=(), stop_strings=(), temperature=0.0,
                   batch_size=16, autocast=nullcontext()):
    """The text each prompt (token ids) continues with: up to max_new_tokens tokens, greedy at temperature 0
    (else sampled), ending before the first of end_ids and cut before the first of stop_strings. The one
    door to the model's decoding for every benchmark: prompts go batch_size at a time, sorted by length,
    each in a slot of its own decoding.Decoder, so a greedy answer is the one its prompt gets alone. A
    prompt longer than the context keeps its last block_size tokens, the window sliding as it grows."""
    was_training = model.training
    model.eval()
    rows = [ids[-model.config.block_size :] for ids in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    longest_stop = max((len(stop) for stop in stop_strings), default=0)
    texts = [None] * len(rows)
    for batch in (order[first : first + batch_size] for first in range(0, len(order), batch_size)):
        new, done = [[] for _ in batch], [False] * len(batch)
        tails = [""] * len(batch)  # the end of each row's text so far, to spot a stop string
        decoder = Decoder(model, len(batch))
        with autocast:
            decoder.prefill([rows[i] for i in batch], temperature)  # slot r is the batch's row r
            for _ in range(max_new_tokens):
                for r, token in enumerate(decoder.step().tolist()):
                    if done[r] or token in end_ids:
                        done[r] = True
                        continue
                    new[r].append(token)
                    if stop_strings:
                        tails[r] = (tails[r] + tokenizer.decode([token]))[-(longest_stop + 64) :]
                        done[r] = any(stop in tails[r] for stop in stop_strings)
                if all(done):
                    break
        for r, i in enumerate(batch):
            text = tokenizer.decode(new[r])
            texts[i] = text[: min((text.index(stop) for stop in stop_strings if stop in text), default=len(text))]
    model.train(was_training)
    return texts


def answer_texts(model, tokenizer, prompts, chat, bos, max_new_tokens, stops, temperature=0.0, batch_size=16,
                 autocast=nullcontext()):
    """generate_texts for prompts given as strings: with chat, each a user turn in chat.py's format answered in the
    assistant's turn up to its <|end|>; else the text after it (after end-of-text with bos) up to end-of-text."""
    if chat:
        rows, ends = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts], sorted(stop_ids(tokenizer))
    else:
        rows, ends = [([tokenizer.eot_id] if bos else []) + tokenizer.encode(p) for p in prompts], [tokenizer.eot_id]
    return generate_texts(model, tokenizer, rows, max_new_tokens, ends, stops, temperature, batch_size, autocast)


def generate_answers(model, tokenizer, prompts, max_new_tokens=32, stop_at_newline=True, autocast=nullcontext(),
                     chat=False, batch_size=16):
    """Greedy answers to prompts (after end-of-text, or as user turns with chat), up to a newline if asked, stripped."""
    texts = answer_texts(model, tokenizer, prompts, chat, True, max_new_tokens, ["\n"] if stop_at_newline else [],
                         batch_size=batch_size, autocast=autocast)
    return [text.strip() for text in texts]


def normalize_answer(text):
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match_score(prediction, references):
    """1.0 if the prediction equals one of the references (a string or a list) after normalisation, else 0.0."""
    references = [references] if isinstance(references, str) else references
    return max(float(normalize_answer(prediction) == normalize_answer(r)) for r in references)


def f1_score(prediction, references):
    """SQuAD's token F1, the best over the references (1 where both normalise to nothing, 0 where only one does)."""
    references = [references] if isinstance(references, str) else references
    predicted, best = normalize_answer(prediction).split(), 0.0
    for expected in (normalize_answer(reference).split() for reference in references):
        common = sum((Counter(predicted) & Counter(expected)).values())
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
        elif common:
            precision, recall = common / len(predicted), common / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# -----------------------------------------------------------------------------
# GSM8K, as lm-evaluation-harness 0.4's gsm8k task (tasks/gsm8k/gsm8k.yaml; filters/extraction.py RegexFilter,
# api/metrics.py exact_match_hf_evaluate, api/samplers.py ContextSampler)

GSM8K_SHOTS, GSM8K_SEED = 5, 1234  # its num_fewshot, and lm-eval's default fewshot_random_seed
GSM8K_STOPS = ["Question:", "</s>", "<|im_end|>"]  # its generation_kwargs' until (and end-of-text ends an answer)
GSM8K_MAX_NEW_TOKENS = 256  # lm-eval's default max_gen_toks
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # strict-match: the number after '#### ', the first one
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # flexible-extract: the last number-like run
GSM8K_IGNORE = [",", r"\$", "(?s).*#### ", r"\.$"]  # regexes_to_ignore, removed in this order before comparing
GSM8K_INVALID = "[invalid]"  # the filters' fallback when nothing matches


def gsm8k_question(question):
    return f"Question: {question}\nAnswer:"


def add_gsm8k_shots(examples, shots):
    """Give each example (in order) lm-eval's five-shot prompt: worked examples drawn from shots (the train split)
    by one random.Random(1234) in turn, each followed by a blank line, then the example's own question."""
    rng = random.Random(GSM8K_SEED)
    for example in examples:
        drawn = rng.sample(shots, GSM8K_SHOTS)
        example["base_prompt"] = "".join(f"{gsm8k_question(s['question'])} {s['answer']}\n\n" for s in drawn) \
            + gsm8k_question(example["question"])


def gsm8k_extract(text, strict=False):
    """The answer in a GSM8K solution: strict, the number after the first '#### ' (the format the dataset's
    answers end with); else the last number in the text. GSM8K_INVALID when there is none."""
    found = (GSM8K_STRICT if strict else GSM8K_FLEXIBLE).findall(text)
    if not found:
        return GSM8K_INVALID
    return found[0].strip() if strict else "".join(found[-1]).strip()  # a flexible match: one of its two groups


def gsm8k_normalize(text):
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_correct(text, reference, strict=False):
    """Whether the answer extracted from a model's text equals a reference (a worked answer ending in '#### N',
    or just N) after lm-eval's normalisation: no commas, dollar signs, trailing period, or text up to '#### '."""
    return gsm8k_normalize(gsm8k_extract(text, strict)) == gsm8k_normalize(reference)


# -----------------------------------------------------------------------------
# HumanEval: completions run as programs in the sandbox (sandbox.py), scored by pass@k

CODE_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # the HumanEval paper's, as lm-eval's humaneval.yaml
CODE_MAX_NEW_TOKENS = 512
CODE_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def code_completion(example, text, chat):
    """The code that follows the prompt: a base model's text as it is; of a chat answer, its first fenced block (or
    all of it) up to a main guard, which may continue the function's body or define it anew (replacing the stub)."""
    if not chat:
        return text
    fenced = CODE_FENCE.search(text)
    return (fenced.group(1) if fenced else text).split("\nif __name__")[0]


def pass_at_k(n, c, k):
    """The unbiased estimate of pass@k from n samples of which c passed (Chen et al. 2021, eq. 1):
    1 - C(n - c, k) / C(n, k), as a running product for numerical stability."""
    return 1.0 if n - c < k else float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def gather(local, world_size):
    """Every rank's results in the order of the items they were dealt from: rank r had items r, r + world_size, ..."""
    if world_size == 1:
        return local
    parts = [None] * world_size
    torch.distributed.all_gather_object(parts, local)
    return [parts[i % world_size][i // world_size] for i in range(sum(len(p) for p in parts))]


def evaluate_examples(kind, examples, model, tokenizer, batch_size=16, autocast=nullcontext(), rank=0, world_size=1,
                      max_new_tokens=0, stop_at_newline=True, chat=False, bos=False, progress="", *, temperature=0.0,
                      samples=1, code_timeout=3.0, unisolated_code=False, details=False):
    """The metrics of one task (read_task's kind and examples), each rank taking its share, with 'chance'.
    chat: prompts in the chat format; bos: contexts after end-of-text; max_new_tokens 0: the task's own;
    code: samples per problem (pass@1, 10, 100 up to it), the sandbox's timeout, and whether to run programs
    it cannot isolate. details: also the answers, example by example."""
    mine = examples[rank::world_size]
    if kind == "generation":
        answers = generate_answers(model, tokenizer, [ex["prompt"] for ex in mine], max_new_tokens or 32, stop_at_newline,
                                   autocast, chat, batch_size)
        scores = gather([(exact_match_score(a, ex["answers"]), f1_score(a, ex["answers"])) for a, ex in zip(answers, mine)],
                        world_size)
        return {"examples": len(scores), "exact_match": sum(em for em, _ in scores) / len(scores),
                "f1": sum(f1 for _, f1 in scores) / len(scores), "chance": 0.0}
    if kind == "gsm8k":  # a base model gets lm-eval's prompt and stop strings, a chat model the question as a user turn
        texts = answer_texts(model, tokenizer, [ex["question" if chat else "base_prompt"] for ex in mine], chat, bos,
                             max_new_tokens or GSM8K_MAX_NEW_TOKENS, [] if chat else GSM8K_STOPS, temperature,
                             batch_size, autocast)
        rows = [{"target": gsm8k_normalize(ex["answer"]), "completion": text,
                 "strict": gsm8k_extract(text, strict=True), "flexible": gsm8k_extract(text),
                 "strict_correct": gsm8k_correct(text, ex["answer"], strict=True),
                 "flexible_correct": gsm8k_correct(text, ex["answer"])} for ex, text in zip(mine, texts)]
        rows = gather(rows, world_size)
        result = {"examples": len(rows), "exact_match_strict": sum(r["strict_correct"] for r in rows) / len(rows),
                  "exact_match_flexible": sum(r["flexible_correct"] for r in rows) / len(rows), "chance": 0.0}
        return {**result, "per_example": rows} if details else result
    if kind == "code":  # HumanEval's pass@k, each completion run with its tests as human-eval's execution.py does
        texts = answer_texts(model, tokenizer, [ex["prompt"] for ex in mine for _ in range(samples)], chat, bos,
                             max_new_tokens or CODE_MAX_NEW_TOKENS, [] if chat else CODE_STOPS, temperature,
                             batch_size, autocast)
        programs = [f"{ex['prompt']}{code_completion(ex, texts[i * samples + j], chat)}\n{ex['test']}\n"
                    f"check({ex['entry_point']})" for i, ex in enumerate(mine) for j in range(samples)]
        code_sandbox(code_timeout, unisolated_code)
        try:
            runs = sandbox.run_programs(programs, timeout=code_timeout)
        except sandbox.SandboxError as e:
            raise SystemExit(f"evaluate error: the sandbox failed: {e}") from None
        per_problem = [slice(i * samples, (i + 1) * samples) for i in range(len(mine))]
        rows = gather([{"task_id": ex["task_id"], "passed": sum(r.passed for r in runs[part]),
                        "completions": texts[part], "statuses": [r.status for r in runs[part]]}
                       for ex, part in zip(mine, per_problem)], world_size)
        pass_at = {f"pass@{k}": sum(pass_at_k(samples, r["passed"], k) for r in rows) / len(rows)
                   for k in (1, 10, 100) if k <= samples}
        result = {"examples": len(rows), "samples": samples, **pass_at, "chance": 0.0}
        return {**result, "per_example": rows} if details else result
    pairs = [pair for ex in mine for pair in (ex["options"] if kind == "choice" else [ex["pair"]])]
    scores = iter(score_continuations(model, tokenizer, pairs, bos, batch_size, autocast, progress) if pairs else [])
    if kind == "lambada":
        results = gather([next(scores) for _ in mine], world_size)
        return {"examples": len(results), "accuracy": sum(hit for _, hit in results) / len(results),
                "perplexity": math.exp(-sum(logprob for logprob, _ in results) / len(results)), "chance": 0.0}
    picks = []
    for ex in mine:
        logprobs = [next(scores)[0] for _ in ex["options"]]
        per_char = [logprob / chars for logprob, chars in zip(logprobs, ex["choice_chars"])]
        picks.append((int(np.argmax(logprobs)) == ex["gold"], int(np.argmax(per_char)) == ex["gold"], len(logprobs)))
    picks = gather(picks, world_size)
    return {"examples": len(picks), "accuracy": sum(hit for hit, _, _ in picks) / len(picks),
            "accuracy_norm": sum(hit for _, hit, _ in picks) / len(picks),
            "chance": sum(1 / n for _, _, n in picks) / len(picks)}


def code_sandbox(timeout, unisolated=False):
    """How model-written programs will run, for reports: sandbox.isolation() with the limits in words."""
    try:
        isolation = sandbox.isolation()
    except sandbox.SandboxError as e:
        raise SystemExit(f"evaluate error: the sandbox cannot run programs here: {e}") from None
    if isolation["mode"] == "none" and not unisolated:
        raise SystemExit("evaluate error: this machine allows no Linux namespaces (not root, no unprivileged user "
                         "namespaces), so model-written programs would run as you with resource limits only; run "
                         "as root or enable user namespaces, or pass --unisolated_code=True to evaluate.py to run "
                         "them anyway")
    return {**isolation, "limits": sandbox.limits_description(timeout)}


def read_benchmark(task, data_dir, limit, log=print):
    """(name, kind, examples) of the benchmark a training run (train.py, sft.py) scores at every evaluation: a task
    of evaluate.py read from data_dir, or a .jsonl path; a code task's sandbox is checked and described first."""
    kind, examples = read_task(task, data_dir, limit)
    if kind == "code":
        used = code_sandbox(3.0)
        log(f"benchmark {task}: model-written programs run in sandbox.py: {used['description']}; {used['limits']}")
    return os.path.basename(task), kind, examples


def score_benchmark(benchmark, model, tokenizer, batch_size, autocast, dist, chat, step, log=print):
    """A training run's benchmark (read_benchmark's) scored on the whole model, for its metrics: 'benchmark_<metric>'."""
    name, kind, examples = benchmark
    scores = evaluate_examples(kind, examples, model, tokenizer, batch_size, autocast, dist.rank, dist.world_size,
                               chat=chat)
    log(f"step {step}: {name} {describe(scores)}")
    return {f"benchmark_{key}": value for key, value in scores.items()}


# describe's line for a task's metrics, by the first of these keys its result has (HumanEval's: pass@k)
DESCRIPTIONS = {
    "bleu": "BLEU {bleu:.2f}  chrF {chrf:.2f}  (beam {beam_size})",
    "bits_per_byte": "perplexity {perplexity:.4f}  bits/byte {bits_per_byte:.4f}  loss {loss:.4f} nats/token",
    "accuracy_norm": "accuracy {accuracy:.2%}  accuracy_norm {accuracy_norm:.2%}",
    "exact_match": "exact_match {exact_match:.2%}  f1 {f1:.2%}",
    "exact_match_strict": "exact_match {exact_match_strict:.2%} strict-match  {exact_match_flexible:.2%} flexible-extract",
    "accuracy": "accuracy {accuracy:.2%}  perplexity {perplexity:.4g}",  # LAMBADA
}


def describe(result):
    """The metrics of one task as table text."""
    if "pass@1" in result:
        return "  ".join(f"{key} {value:.2%}" for key, value in result.items() if key.startswith("pass@"))
    return DESCRIPTIONS[next(key for key in DESCRIPTIONS if key in result)].format(**result)
