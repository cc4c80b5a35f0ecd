"""
Direct preference optimization (DPO, Rafailov et al. 2023): tune a chat model toward the
chosen answers of preference pairs and away from the rejected ones, without a reward model.
All weights, or LoRA adapters (lora_rank > 0).

    python dpo.py config/dpo_quickstart.py                      # after config/sft_quickstart.py, CPU, minutes
    python dpo.py --init_from=out/sft/ckpt.pt --data=prefs.json --beta=0.1 --lora_rank=8
    python dpo.py config/dpo_quickstart.py --label_smoothing=0.1   # conservative DPO: some labels may be wrong
    python dpo.py config/dpo_quickstart.py --resume=yes         # continue the run in out_dir
    torchrun --standalone --nproc_per_node=8 dpo.py --init_from=out/sft_gpt2/ckpt.pt --data=prefs.json

Reads the chat checkpoint init_from (from sft.py, or an earlier dpo.py run) and preference records
("chosen" and "rejected" after an instruction or messages; see chat.py). Writes out_dir/ckpt-<step>.pt
(kind 'dpo'; with LoRA only the adapters and their base's name, step and sha256), ckpt.pt linked to
the newest, metrics.jsonl, plot.png and report.md; resume='yes' or 'auto' continues the run exactly.

The loss, for a prompt x with chosen answer y_w and rejected y_l, policy pi and frozen reference ref
(the starting checkpoint; with LoRA the policy with its adapters off, else a frozen copy):

    margin = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
    loss   = -log sigmoid(margin)                                   (the paper's equation 7)

log pi(y|x) summing the answer's tokens, <|end|> included; label_smoothing e > 0 is conservative DPO
(Mitchell 2023). At the start every margin is 0 and the loss ln 2 = 0.6931. More: docs/post-training.md.

Every default below is a config key: override it in a config file or with --key=value.
"""

import math
import time

import torch
import torch.nn.functional as F

from chat import (batch_of, collate, preference, read_records, render, response_logprobs,
                  split_held_out, training_example)
from checkpoint import checkpoint_to_resume
from configurator import configure, print_config
from data import to_device
from lora import lora_settings
from optim import optimizer_step
from parallel import all_reduce_sum, sum_over_batches
from runtime import device_name
from trainer import (TUNED_KEYS, Pace, begin_step, context_length, finish, gradient_accumulation, model_to_tune,
                     on_reference, prepare_to_tune, reference_model, save, start, stop_if_not_finite, take_out_dir)

# -----------------------------------------------------------------------------
# I/O
init_from = "out/sft/ckpt.pt"  # the chat checkpoint to tune (sft.py's); it is also the reference model
out_dir = "out/dpo"
resume = "no"  # 'yes': continue the run in out_dir; 'auto': continue it if out_dir has a checkpoint, else a new run
eval_interval = 50  # evaluate and save a checkpoint every this many steps, and at the end
keep_checkpoints = 2
log_interval = 10
wandb_project = ""  # a Weights & Biases project to log the run to (pip install wandb); '' for none
tensorboard = False  # also write TensorBoard events to out_dir/tensorboard (pip install tensorboard)
# data
data = "data/instruction/instruction-data-with-preference.json"  # preference records, .json or .jsonl: a path or a URL
data_sha256 = ""  # the expected sha256 of data given by URL (downloaded once into data/downloads/); empty: no check
val_fraction = 0.05  # of the records, held out for evaluation (always the same ones)
block_size = 0  # longest prompt + answer; longer ones are cut. 0: the model's context
batch_size = 4  # pairs per micro-step on each process
total_batch_size = 16  # pairs per optimizer step over all processes; sets the gradient accumulation
epochs = 1
max_iters = 0  # optimizer steps; 0: as many as `epochs` passes over the training pairs take
# DPO
beta = 0.1  # how strongly the policy is held to the reference: small lets it move further
label_smoothing = 0.0  # conservative DPO: the probability that a pair's labels are swapped
# LoRA: rank 0 trains every weight
lora_rank = 0
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "c_attn,c_proj,c_fc"
# AdamW and the schedule (linear warmup, cosine decay to min_lr)
learning_rate = 5e-6
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 10
min_lr = 5e-7
# system
device = "auto"
dtype = "auto"
compile = False
parallelism = "ddp"  # or 'fsdp', as in train.py
seed = 1337
config = configure(globals())
print_config(config)
# -----------------------------------------------------------------------------

dist, dtype, autocast = start(device, dtype, seed, parallelism)
accumulation_steps = gradient_accumulation("total_batch_size", total_batch_size, batch_size=batch_size,
                                           processes=dist.world_size)
stop = take_out_dir(out_dir, dist, "--resume=yes")

# model: a new run's chat checkpoint init_from (adapters merged); a resumed run's own, adapters included
checkpoint, ckpt_path = checkpoint_to_resume(resume, out_dir, "dpo", config, TUNED_KEYS)
model, tokenizer, reference_file = model_to_tune(init_from, checkpoint, ckpt_path, dist.log, chat_script="dpo")
block_size = context_length(block_size, model)

# data: records -> (prompt, chosen, rejected) -> a unit (inputs, targets, doc ids) for each answer
records = [preference(record, where) for where, record in read_records(data, data_sha256)]
train_records, val_records = split_held_out(records, val_fraction)


def pairs_of(records):
    """(chosen unit, rejected unit) per record, but for pairs that the cut at block_size leaves an empty answer."""
    pairs = ([training_example(*render(tokenizer, prompt + [{"role": "assistant", "content": answer}]), block_size)
              for answer in (chosen, rejected)] for prompt, chosen, rejected in records)
    return [tuple((x, y, [0] * len(x)) for x, y in pair) for pair in pairs if None not in pair]


train_pairs, val_pairs = pairs_of(train_records), pairs_of(val_records)
if not train_pairs:
    raise SystemExit(f"data error: no pair of {data} fits block_size={block_size} with an answer left on both sides; "
                     "raise block_size or shorten the prompts")
steps_per_epoch = math.ceil(len(train_pairs) / total_batch_size)
max_iters = max_iters or epochs * steps_per_epoch
dropped = len(records) - len(train_pairs) - len(val_pairs)
dist.log(f"data {data}: {len(train_pairs)} train and {len(val_pairs)} held-out pairs"
    + (f" ({dropped} dropped: no answer left within block_size={block_size})" if dropped else ""))
dist.log(f"device {device_name(dist.device)} x {dist.world_size} processes, {dtype}; {total_batch_size} pairs per "
    f"step = {batch_size} x {dist.world_size} processes x {accumulation_steps} accumulation steps; {max_iters} steps "
    f"({steps_per_epoch} per epoch)")

lora = lora_settings(lora_rank, lora_alpha, lora_dropout, lora_targets)
reference = reference_model(model, lora, checkpoint, reference_file, ckpt_path, dist, parallelism, dtype)
model, raw_model, optimizer, scaler, step, run_log = prepare_to_tune(
    model, checkpoint, lora, dist, dtype, config, "dpo",
    "; reference: " + ("the same model, adapters off" if lora else "a frozen copy"))
checkpoint = None  # free the memory

STATS = ("loss", "accuracy", "margin", "logp_chosen", "logp_rejected")


def pair_stats(pairs):
    """The mean DPO loss over pairs (a tensor to backpropagate) and STATS, summed over the pairs."""
    x, y, _ = collate([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs], tokenizer.eot_id)
    x, y = to_device(torch.stack((x, y)), dist.device)  # one copy, cut up on the device
    def logprobs(net):
        with autocast:
            return response_logprobs(net(x, all_logits=True)[0], y)
    # chosen and rejected go through the model as one batch: one forward pass, not two
    policy_chosen, policy_rejected = logprobs(model).chunk(2)
    ref_chosen, ref_rejected = on_reference(reference, raw_model, logprobs).chunk(2)
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    stats = torch.stack([loss, (margin > 0).float(), margin, policy_chosen, policy_rejected]).detach().sum(dim=1)
    return loss.mean(), stats


def micro_step_loss(micro_step):
    index = (step * dist.world_size + dist.rank) * accumulation_steps + micro_step
    loss, stats = pair_stats([train_pairs[i] for i in batch_of(len(train_pairs), batch_size, index, seed)])
    step_stats.add_(stats)
    return loss


val_batches = [val_pairs[i : i + batch_size] for i in range(0, len(val_pairs), batch_size)]


def describe(stats):
    return (f"loss {stats['loss']:.4f} | accuracy {stats['accuracy']:.2f} | margin {stats['margin']:.3f} | "
            f"logp chosen {stats['logp_chosen']:.1f} rejected {stats['logp_rejected']:.1f}")


# -----------------------------------------------------------------------------
# training loop
start_step, val_stats = step, None
pace = Pace(step, max_iters)
while True:
    lr, done = begin_step(step, max_iters, stop, optimizer, config)  # the one place where the run decides to end

    if step % eval_interval == 0 or done:
        if val_batches:  # val_fraction=0: nothing held out
            val_sums = sum_over_batches(model, val_batches, lambda pairs: pair_stats(pairs)[1], dist)
            val_stats = dict(zip(STATS, (val_sums / len(val_pairs)).tolist()))
            dist.log(f"step {step}: held-out {describe(val_stats)}")
        if step > start_step:
            save(raw_model, optimizer, dist, out_dir, keep_checkpoints, run_log, "dpo",
                 [val_stats and val_stats["loss"], step_stats], lora=lora, base=reference_file, kind="dpo", step=step,
                 val=val_stats, reference=reference_file, config=config, tokenizer=tokenizer.description)
        if val_stats is not None:
            run_log.log({"step": step, **{f"val_{k}": v for k, v in val_stats.items()}})
            run_log.plot()
        pace.restart(step)
    if done:
        break

    step_stats = torch.zeros(len(STATS), device=dist.device)  # summed over the step's pairs by micro_step_loss
    optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip)
    step += 1

    if step % log_interval == 0 or step == max_iters:
        # the last step's pairs, over every process
        stats = dict(zip(STATS, (all_reduce_sum(step_stats, dist.world_size) / total_batch_size).tolist()))
        stop_if_not_finite(stats["loss"], step, dist, "dpo", out_dir)
        dist.log(f"step {step}/{max_iters} | {describe(stats)} | lr {lr:.2e} | {pace.lap(step)[1]}")
        run_log.log({"step": step, **stats, "lr": lr, "time": time.time()})

finish(run_log, dist, stop, step, f"done after {step} steps"
       + (f", held-out {describe(val_stats)}" if val_stats is not None else "")
       + f"; chat with: python sample.py --out_dir={out_dir} --chat=True")
