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

Reads the checkpoint init_from (a pretraining checkpoint, an earlier SFT one, or hf:FOLDER)
and the records in data (Alpaca-style or chat, .json or .jsonl; see chat.py). A model without
the chat tokens gets them first. A fixed val_fraction of the records is held out for the eval
loss: the mean loss per assistant token. Writes out_dir/ckpt-<step>.pt (kind 'sft'; with
LoRA, only the adapters and the name, step and sha256 of the base; and the optimizer state,
the step and every process's random state) with out_dir/ckpt.pt linked to the newest, and
out_dir/metrics.jsonl, plot.png and report.md. sample.py --chat, evaluate.py and dpo.py read the checkpoint.

Batches: packing lays the shuffled examples end to end into rows of block_size tokens, with
attention kept inside each example (model.forward's doc_ids), so no compute goes to padding;
packing=False pads each batch to its longest example. Either way a batch is a pure function of
the step (chat.batch_of), as in train.py. The optimizer, schedule, accumulation, clipping,
placement (DDP or FSDP) and checkpoint rotation are train.py's, from training.py.

Resuming: resume='yes' continues the run in out_dir from its newest checkpoint that loads, as
if it had never stopped: the same model (with LoRA, the base the checkpoint names plus its
adapters), the optimizer state, the step, and so the same batches, and each process's random
state (at another world size all but dropout's, which starts afresh). resume='auto' does that
if out_dir has a checkpoint and starts a new run if not, so torchrun --max-restarts recovers a
crashed run by itself. It is a key of its own, not train.py's init_from='resume': here init_from
names the checkpoint a run starts from, which resume='auto' still needs the first time. A
resumed run must have the init_from and LoRA settings it was started with; the rest (max_iters,
say) may change.

Every default below is a config key: override it in a config file or with --key=value.
"""

import math
import time

import numpy as np
import torch

from chat import (CHAT_TOKENS, add_chat_tokens, batch_of, collate, conversation, has_chat_tokens, pack, read_records,
                  render, split_held_out, training_example)
from checkpoint import load_checkpoint, model_from_checkpoint, restore_training_state
from configurator import configure, print_config
from lora import add_lora, describe_base, merge_lora
from outdir import exit_quietly_on_interrupt, lock_out_dir, replace_earlier_run, run_log_path, stop_unless_finite
from runlog import RunLog
from runtime import autocast_context, device_name, pick_dtype, seed_everything, setup_distributed, teardown_distributed
from training import (all_reduce_sum, checkpoint_to_resume, format_duration, learning_rate_at,
                      make_optimizer, optimizer_step, place_model, restore_rng_state, save_training_checkpoint,
                      to_device, wait_for_checkpoint, wrap_model)

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

dist = setup_distributed(device)
device, master = dist.device, dist.is_main
log = dist.log  # print on rank 0 only
dtype = pick_dtype(device, dtype)
autocast = autocast_context(device, dtype)
seed_everything(seed)
if parallelism not in ("ddp", "fsdp"):
    raise SystemExit(f"config error: parallelism='{parallelism}' is not one of ddp, fsdp")
if total_batch_size % (batch_size * dist.world_size):
    raise SystemExit(f"config error: total_batch_size={total_batch_size} is not a multiple of batch_size x processes "
                     f"= {batch_size} x {dist.world_size}; change one of them")
accumulation_steps = total_batch_size // (batch_size * dist.world_size)
lock_out_dir(out_dir, dist, log)  # one run per out_dir; an earlier run's files stay until this one has a checkpoint
exit_quietly_on_interrupt(out_dir, dist, "--resume=yes")

# model: a new run takes the checkpoint to fine-tune, merged if it holds adapters, with the chat
# tokens; a resumed run takes its own checkpoint's model as it was, adapters included
checkpoint, ckpt_path = checkpoint_to_resume(resume, out_dir, "sft", config,
                                             ("init_from", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"))
if checkpoint is None:
    start = load_checkpoint(init_from)
    model, tokenizer = model_from_checkpoint(start, init_from)
    base = describe_base(init_from, start) if lora_rank else None  # what a LoRA checkpoint names as its base
    start = None  # free the memory
    merge_lora(model)
    if not has_chat_tokens(tokenizer):
        model, tokenizer = add_chat_tokens(model, tokenizer)
        log("added the chat tokens: " + ", ".join(f"{name} {tokenizer.special_tokens[name]}" for name in CHAT_TOKENS)
            + f"; the embedding has {model.config.padded_vocab_size} rows")
else:
    model, tokenizer = model_from_checkpoint(checkpoint, ckpt_path)
    base = checkpoint.get("base")
    log(f"resuming {ckpt_path} at step {checkpoint['step']}")
block_size = block_size or model.config.block_size
if block_size > model.config.block_size:
    raise SystemExit(f"config error: block_size={block_size} is longer than the model's context of "
                     f"{model.config.block_size}; set --block_size=0 to use it")

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
answer_tokens = sum(answer_counts)
log(f"data {data}: {len(train_records)} train and {len(val_records)} held-out records, {answer_tokens:,} answer tokens "
    f"to learn in {len(train_units)} {'packed rows' if packing else 'examples'} of up to {block_size} tokens"
    + (f"; {n_long} train records cut at block_size (those left with no answer are dropped)" if n_long else ""))
log(f"device {device_name(device)} x {dist.world_size} processes, {dtype}; {total_batch_size} "
    f"{'rows' if packing else 'examples'} per step = {batch_size} x {dist.world_size} processes x {accumulation_steps} "
    f"accumulation steps; {max_iters} steps ({steps_per_epoch} per epoch)")

lora_settings = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                     targets=[t.strip() for t in lora_targets.split(",")]) if lora_rank else None
if lora_settings and checkpoint is None:  # a resumed model has its adapters already
    add_lora(model, **lora_settings)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
log(f"model: {model.num_params() / 1e6:.2f}M parameters, {trainable:,} of them trained "
    f"({100 * trainable / sum(p.numel() for p in model.parameters()):.2f}%)")
place_model(model, dist, parallelism, dtype)
seed_everything(seed + dist.rank)  # different dropout masks in each process

optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device)
step = 0
if checkpoint is not None:
    restore_training_state(model, optimizer, checkpoint)
    restore_rng_state(checkpoint["rng"], dist, log)
    step = checkpoint["step"]
    checkpoint = None  # free the memory
scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
raw_model = model
model = wrap_model(model, dist, parallelism, compile, log)
run_log = RunLog(out_dir, config, master, run_log_path(out_dir, resumed=step > 0), stage="sft", data=data,
                 parameters=raw_model.num_params(), trained_parameters=trainable, device=device_name(device),
                 processes=dist.world_size, dtype=dtype)


def batch_loss(units):
    x, y, docs = to_device(torch.stack(collate(units, tokenizer.eot_id)), device)  # one copy, cut up on the device
    with autocast:
        return model(x, y, doc_ids=docs if packing else None)[1], (y >= 0).sum()


def answer_tokens_of_step(at_step):
    """How many answer tokens the step's batches hold, over every process and micro-step: the batches
    are a pure function of their index, so each process counts them all without asking the others."""
    first = at_step * dist.world_size * accumulation_steps
    return sum(answer_counts[i] for index in range(first, first + dist.world_size * accumulation_steps)
               for i in batch_of(len(train_units), batch_size, index, seed))


def micro_step_loss(micro_step):
    index = (step * dist.world_size + dist.rank) * accumulation_steps + micro_step
    loss, count = batch_loss([train_units[i] for i in batch_of(len(train_units), batch_size, index, seed)])
    # The step's loss is the sum of its token losses over its answer-token count, so every answer token
    # weighs the same whatever batch it is in; a mean of the batches' means would weigh the tokens of
    # short answers more. optimizer_step divides by accumulation_steps and DDP/FSDP average over the
    # processes: this undoes both.
    return loss * count * (accumulation_steps * dist.world_size / step_answer_tokens)


@torch.no_grad()
def held_out_loss():
    """Mean loss per answer token over every held-out unit (the batches dealt out to the processes)."""
    batches = [val_units[i : i + batch_size] for i in range(0, len(val_units), batch_size)]
    model.eval()
    total = torch.zeros(2, device=device)  # loss sum, token count
    # Every process runs the same number of forward passes: under FSDP each one is a collective.
    for i in range(dist.rank, dist.world_size * math.ceil(len(batches) / dist.world_size), dist.world_size):
        loss, count = batch_loss(batches[i % len(batches)])
        if i < len(batches):
            total += torch.stack([loss.float() * count, count])
    model.train()
    total = all_reduce_sum(total, dist.world_size)
    return (total[0] / total[1]).item()


# -----------------------------------------------------------------------------
# training loop
start_step = step
t_log, steps_since_log = time.time(), 0
while True:
    lr = learning_rate_at(step, learning_rate, warmup_iters, max_iters, min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr

    if step % eval_interval == 0 or step == max_iters:
        val_loss = held_out_loss() if val_units else None  # val_fraction=0: nothing held out
        if val_loss is not None:
            log(f"step {step}: held-out loss {val_loss:.4f}")
        if step > start_step:
            stop_unless_finite(raw_model, [val_loss, loss_sum], dist, "sft", step, out_dir)
            path = save_training_checkpoint(raw_model, optimizer, dist, out_dir, keep_checkpoints, lora=lora_settings,
                                            base=base, kind="sft", step=step, val_loss=val_loss, config=config,
                                            tokenizer=tokenizer.description)
            log(f"saving {path} in the background")
            if master and not run_log.owns_folder():
                # a new run's first checkpoint: once it is on disk, and only then, the earlier run in out_dir goes
                wait_for_checkpoint()
                run_log.metrics_path = replace_earlier_run(out_dir, path, run_log.metrics_path, log)
        run_log.log({"step": step, "val_loss": val_loss})
        run_log.plot()
        t_log, steps_since_log = time.time(), 0
    if step >= max_iters:
        break

    step_answer_tokens = answer_tokens_of_step(step)
    loss_sum = optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip)
    step += 1
    steps_since_log += 1

    if step % log_interval == 0 or step == max_iters:
        train_loss = all_reduce_sum(loss_sum, dist.world_size).item() / dist.world_size
        if not math.isfinite(train_loss):
            raise SystemExit(f"sft error: the loss is not finite ({train_loss}) at step {step}; stopping without "
                             "saving. Lower learning_rate or check the data." if master else 1)
        seconds_per_step = (time.time() - t_log) / steps_since_log
        log(f"step {step}/{max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {1000 * seconds_per_step:.0f} ms/step | "
            f"eta {format_duration((max_iters - step) * seconds_per_step)}")
        run_log.log({"step": step, "loss": train_loss, "lr": lr, "time": time.time()})
        t_log, steps_since_log = time.time(), 0

wait_for_checkpoint()  # the last checkpoint is on disk before the run reports it
run_log.finish()
log(f"done after {step} steps" + (f", held-out loss {val_loss:.4f}" if val_loss is not None else "")
    + f"; chat with: python sample.py --out_dir={out_dir} --chat=True")
teardown_distributed()
