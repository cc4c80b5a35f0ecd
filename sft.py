"""
Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat format of chat.py,
on instruction records, with the loss on the assistant's tokens only. All weights, or LoRA
adapters (lora_rank > 0).

    python sft.py config/sft_quickstart.py                       # the quickstart model, CPU, minutes
    python sft.py config/sft_gpt2.py                             # GPT-2 124M (hf:FOLDER), one GPU
    python sft.py config/sft_quickstart.py --lora_rank=8 --learning_rate=3e-3 --out_dir=out/sft_lora
    python sft.py --init_from=out/run/ckpt.pt --data=chats.jsonl --packing=False
    python sft.py config/sft_quickstart.py --resume=yes          # continue the run in out_dir
    torchrun --standalone --nproc_per_node=8 sft.py config/sft_gpt2.py
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 sft.py config/sft_gpt2.py --resume=auto

Reads the checkpoint init_from and the records in data (see chat.py); a model without the chat tokens
gets them first. Writes out_dir/ckpt-<step>.pt (kind 'sft'; with LoRA only the adapters and their base's
name, step and sha256), ckpt.pt linked to the newest, metrics.jsonl, plot.png and report.md.

A batch is a pure function of the step, so resume='yes' (or 'auto', for torchrun --max-restarts)
continues the run in out_dir exactly. The skeleton is trainer.py's. More: docs/post-training.md.

Every default below is a config key: override it in a config file or with --key=value.
"""

import math
import time

import numpy as np
import torch

from benchmarks import read_benchmark, score_benchmark
from chat import (CHAT_TOKENS, add_chat_tokens, batch_of, collate, conversation, has_chat_tokens, pack, read_records,
                  render, split_held_out, training_example)
from checkpoint import checkpoint_to_resume
from configurator import configure, print_config
from data import to_device
from lora import lora_settings
from optim import optimizer_step
from parallel import all_reduce_sum, sum_over_batches
from runtime import device_name
from trainer import (TUNED_KEYS, Pace, begin_step, context_length, finish, gradient_accumulation, model_to_tune,
                     prepare_to_tune, save, start, stop_if_not_finite, take_out_dir)

# -----------------------------------------------------------------------------
# I/O
init_from = "out/quickstart/ckpt.pt"  # the checkpoint to fine-tune: pretraining, SFT, or hf:FOLDER
out_dir = "out/sft"
resume = "no"  # 'yes': continue the run in out_dir; 'auto': continue it if out_dir has a checkpoint, else a new run
keep_checkpoints = 2
eval_interval = 100  # evaluate and save a checkpoint every this many steps, and at the end
log_interval = 10
wandb_project = ""  # a Weights & Biases project to log the run to (pip install wandb); '' for none
tensorboard = False  # also write TensorBoard events to out_dir/tensorboard (pip install tensorboard)
benchmark = ""  # scored at every evaluation, in chat prompts: a task of evaluate.py (gsm8k, ...) or a JSONL path
benchmark_dir = "data/evals"  # the folder holding the task files (evaluate.py's data_dir)
benchmark_limit = 100  # how many of its examples to score (gsm8k and humaneval generate up to 256 and 512 tokens each)
# data
data = "data/instruction/instruction-data.json"  # Alpaca-style or chat records, .json or .jsonl: a path or a URL
data_sha256 = ""  # the expected sha256 of data given by URL (downloaded once into data/downloads/); empty: no check
val_fraction = 0.05  # of the records, held out for the eval loss (always the same ones)
packing = True  # rows of block_size tokens packed with whole examples; False: pad each batch to its longest example
block_size = 0  # tokens per row; longer examples are cut. 0: the model's context
batch_size = 8  # rows (or examples, without packing) per micro-step on each process
total_batch_size = 32  # rows (or examples) per optimizer step over all processes; sets the gradient accumulation
epochs = 2
max_iters = 0  # optimizer steps; 0: as many as `epochs` passes over the training examples take
# LoRA: rank 0 trains every weight
lora_rank = 0
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "c_attn,c_proj,c_fc"  # linear layers of each block that get adapters
# AdamW and the schedule (linear warmup, cosine decay to min_lr)
learning_rate = 3e-5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 10
min_lr = 3e-6
# system
device = "auto"
dtype = "auto"
compile = False  # SFT runs are short; compiling rarely pays off
seed = 1337
parallelism = "ddp"  # or 'fsdp', as in train.py
config = configure(globals())
print_config(config)
# -----------------------------------------------------------------------------

dist, dtype, autocast = start(device, dtype, seed, parallelism)
if benchmark and parallelism == "fsdp" and dist.world_size > 1:
    raise SystemExit("config error: benchmark scoring runs on the whole, unsharded model; use it with parallelism='ddp'")
benchmark_data = read_benchmark(benchmark, benchmark_dir, benchmark_limit, dist.log) if benchmark else None
stop = take_out_dir(out_dir, dist, "--resume=yes")

# model: a new run's init_from (adapters merged) with the chat tokens; a resumed run's own, adapters included
checkpoint, ckpt_path = checkpoint_to_resume(resume, out_dir, "sft", config, TUNED_KEYS)
model, tokenizer, base = model_to_tune(init_from, checkpoint, ckpt_path, dist.log, describe_start=lora_rank > 0)
if checkpoint is None and not has_chat_tokens(tokenizer):
    model, tokenizer = add_chat_tokens(model, tokenizer)
    dist.log("added the chat tokens: " + ", ".join(f"{name} {tokenizer.special_tokens[name]}" for name in CHAT_TOKENS)
        + f"; the embedding has {model.config.padded_vocab_size} rows")
block_size = context_length(block_size, model)

# data: records -> conversations -> (inputs, targets) -> units (packed rows, or examples)
records = [conversation(record, where) for where, record in read_records(data, data_sha256)]
train_records, val_records = split_held_out(records, val_fraction)
if not train_records:
    raise SystemExit(f"data error: {data} has {len(records)} records, none left to train on after holding out "
                     f"val_fraction={val_fraction}; add records or lower val_fraction")


def units_of(conversations):
    """The conversations as training units, and how many were longer than block_size."""
    rendered = [render(tokenizer, messages) for messages in conversations]
    examples = [e for e in (training_example(ids, learned, block_size) for ids, learned in rendered) if e is not None]
    n_long = sum(len(ids) > block_size + 1 for ids, _ in rendered)
    if packing:
        # Shuffled once before packing, so a row holds unrelated examples; the batches reshuffle the rows.
        order = np.random.default_rng(seed).permutation(len(examples))
        return pack([examples[i] for i in order], block_size), n_long
    return [(x, y, [0] * len(x)) for x, y in examples], n_long


train_units, n_long = units_of(train_records)
val_units = units_of(val_records)[0]
if not train_units:
    raise SystemExit(f"data error: no record of {data} has an answer within block_size={block_size} tokens; "
                     "raise block_size or shorten the prompts")
steps_per_epoch = math.ceil(len(train_units) / total_batch_size)
max_iters = max_iters or epochs * steps_per_epoch
answer_counts = [sum(t >= 0 for t in y) for _, y, _ in train_units]
dist.log(f"data {data}: {len(train_records)} train and {len(val_records)} held-out records, {sum(answer_counts):,} "
    f"answer tokens to learn in {len(train_units)} {'packed rows' if packing else 'examples'} of up to {block_size} "
    f"tokens{f'; {n_long} train records cut at block_size (those left with no answer are dropped)' if n_long else ''}")
accumulation_steps = gradient_accumulation("total_batch_size", total_batch_size, batch_size=batch_size,
                                           processes=dist.world_size)
dist.log(f"device {device_name(dist.device)} x {dist.world_size} processes, {dtype}; {total_batch_size} "
    f"{'rows' if packing else 'examples'} per step = {batch_size} x {dist.world_size} processes x {accumulation_steps} "
    f"accumulation steps; {max_iters} steps ({steps_per_epoch} per epoch)")

lora = lora_settings(lora_rank, lora_alpha, lora_dropout, lora_targets)
model, raw_model, optimizer, scaler, step, run_log = prepare_to_tune(model, checkpoint, lora, dist, dtype, config,
                                                                     "sft")
checkpoint = None  # free the memory


def batch_sums(units):
    """The units' loss summed over their answer tokens, and the count of those tokens."""
    x, y, docs = to_device(torch.stack(collate(units, tokenizer.eot_id)), dist.device)  # one copy, cut up on the device
    count = (y >= 0).sum()
    with autocast:
        return model(x, y, doc_ids=docs if packing else None)[1] * count, count


def micro_step_loss(micro_step):
    index = (step * dist.world_size + dist.rank) * accumulation_steps + micro_step
    loss_sum, _ = batch_sums([train_units[i] for i in batch_of(len(train_units), batch_size, index, seed)])
    # The step's loss is the sum of its token losses over its answer-token count, so every answer token weighs
    # the same whatever batch it is in (a mean of the batches' means would weigh short answers' tokens more).
    # optimizer_step divides by accumulation_steps and DDP/FSDP average over the processes: this undoes both.
    return loss_sum * (accumulation_steps * dist.world_size / step_answer_tokens)


val_batches = [val_units[i : i + batch_size] for i in range(0, len(val_units), batch_size)]

# -----------------------------------------------------------------------------
# training loop
start_step = step
pace = Pace(step, max_iters)
while True:
    lr, done = begin_step(step, max_iters, stop, optimizer, config)  # the one place where the run decides to end

    if step % eval_interval == 0 or done:
        val_loss = None  # val_fraction=0: nothing held out
        if val_batches:
            val_sum, val_count = sum_over_batches(model, val_batches, lambda b: torch.stack(batch_sums(b)), dist)
            val_loss = (val_sum / val_count).item()  # the mean per answer token
            dist.log(f"step {step}: held-out loss {val_loss:.4f}")
        scores = score_benchmark(benchmark_data, raw_model, tokenizer, batch_size, autocast, dist, True, step,
                                 dist.log) if benchmark else {}
        if step > start_step:
            save(raw_model, optimizer, dist, out_dir, keep_checkpoints, run_log, "sft", [val_loss, loss_sum],
                 lora=lora, base=base, kind="sft", step=step, val_loss=val_loss, config=config,
                 tokenizer=tokenizer.description)
        run_log.log({"step": step, "val_loss": val_loss, **scores})
        run_log.plot()
        pace.restart(step)
    if done:
        break

    # The answer tokens in the step's batches, over every process and micro-step: the batches are a pure
    # function of their index, so each process counts them all without asking the others.
    first = step * dist.world_size * accumulation_steps
    step_answer_tokens = sum(answer_counts[i] for index in range(first, first + dist.world_size * accumulation_steps)
                             for i in batch_of(len(train_units), batch_size, index, seed))
    loss_sum = optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip)
    step += 1

    if step % log_interval == 0 or step == max_iters:
        train_loss = all_reduce_sum(loss_sum, dist.world_size).item() / dist.world_size
        stop_if_not_finite(train_loss, step, dist, "sft", out_dir)
        dist.log(f"step {step}/{max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {pace.lap(step)[1]}")
        run_log.log({"step": step, "loss": train_loss, "lr": lr, "time": time.time()})

finish(run_log, dist, stop, step, f"done after {step} steps"
       + (f", held-out loss {val_loss:.4f}" if val_loss is not None else "")
       + f"; chat with: python sample.py --out_dir={out_dir} --chat=True")
