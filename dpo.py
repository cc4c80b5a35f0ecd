"""
Direct preference optimization (DPO, Rafailov et al. 2023): tune a chat model toward the
chosen answers of preference pairs and away from the rejected ones, without a reward model.
All weights, or LoRA adapters (lora_rank > 0).

    python dpo.py config/dpo_quickstart.py                      # after config/sft_quickstart.py, CPU, minutes
    python dpo.py --init_from=out/sft/ckpt.pt --data=prefs.json --beta=0.1 --lora_rank=8
    python dpo.py config/dpo_quickstart.py --label_smoothing=0.1   # conservative DPO: some labels may be wrong
    python dpo.py config/dpo_quickstart.py --resume=yes         # continue the run in out_dir
    torchrun --standalone --nproc_per_node=8 dpo.py --init_from=out/sft_gpt2/ckpt.pt --data=prefs.json

Reads the chat checkpoint init_from (from sft.py, or an earlier dpo.py run) and preference
records (instruction and input, or messages ending with the user's turn, plus "chosen" and
"rejected"; see chat.py). Writes out_dir/ckpt-<step>.pt (kind 'dpo'; with LoRA, only the
adapters and the base's name, step and sha256; and the optimizer state, the step and every
process's random state), out_dir/ckpt.pt linked to the newest, and out_dir/metrics.jsonl, plot.png, report.md.
resume='yes' (or 'auto', for torchrun --max-restarts) continues the run in out_dir exactly; see
sft.py's docstring.

The loss, for a prompt x with chosen answer y_w and rejected y_l, policy pi and frozen
reference model ref (the starting checkpoint), is

    margin = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
    loss   = -log sigmoid(margin)                                   (the paper's equation 7)

where log pi(y|x) sums the log-probabilities of the answer's tokens (its <|end|> included).
beta * (log pi - log ref) is the answer's implicit reward; beta sets how far the policy may
move from the reference. With label_smoothing e > 0 (conservative DPO, Mitchell 2023), each
label is taken to be wrong with probability e: loss = -(1-e) log sigmoid(margin) - e log
sigmoid(-margin). At the start the policy is the reference, so every margin is 0 and the loss
is ln 2 = 0.6931. Logged: the loss, the reward accuracy (the share of pairs whose chosen answer
has the larger reward), the mean reward margin, and the policy's mean log-probabilities of the
chosen and the rejected answers (when both fall, the policy is moving away from the data).

The reference model: with LoRA it is the policy itself with its adapters switched off (the
starting weights, frozen under the adapters), which costs no memory; a LoRA checkpoint given as
init_from has its adapters merged first, so that is the model it was. Without LoRA it is a
frozen copy of the starting model: one more set of weights, but no gradients or optimizer state.
Checkpoints name the reference (the starting checkpoint's path, step and sha256, as a LoRA
checkpoint names its base), so a resumed run loads the same one again.

Every default below is a config key: override it in a config file or with --key=value.
"""

import copy
import math
import time

import torch
import torch.nn.functional as F

from chat import (batch_of, collate, has_chat_tokens, preference, read_records, render, response_logprobs,
                  split_held_out, training_example)
from checkpoint import load_checkpoint, model_from_checkpoint, restore_training_state
from configurator import configure, print_config
from lora import adapters_disabled, add_lora, checked_base, describe_base, merge_lora
from outdir import exit_quietly_on_interrupt, lock_out_dir, replace_earlier_run, run_log_path, stop_unless_finite
from runlog import RunLog
from runtime import autocast_context, device_name, pick_dtype, seed_everything, setup_distributed, teardown_distributed
from training import (all_reduce_sum, checkpoint_to_resume, format_duration, learning_rate_at,
                      make_optimizer, optimizer_step, place_model, restore_rng_state, save_training_checkpoint,
                      to_device, wait_for_checkpoint, wrap_model)

# -----------------------------------------------------------------------------
# I/O
init_from = "out/sft/ckpt.pt"  # the chat checkpoint to tune (sft.py's); it is also the reference model
out_dir = "out/dpo"
resume = "no"  # 'yes': continue the run in out_dir; 'auto': continue it if out_dir has a checkpoint, else a new run
keep_checkpoints = 2
eval_interval = 50  # evaluate and save a checkpoint every this many steps, and at the end
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

# model: a new run takes the chat checkpoint, merged if it holds adapters; a resumed run takes its
# own checkpoint's model as it was, adapters included
checkpoint, ckpt_path = checkpoint_to_resume(resume, out_dir, "dpo", config,
                                             ("init_from", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"))
if checkpoint is None:
    start = load_checkpoint(init_from)
    model, tokenizer = model_from_checkpoint(start, init_from)
    reference_file = describe_base(init_from, start)  # path, step, sha256; with LoRA, also the base
    start = None  # free the memory
    merge_lora(model)
    if not has_chat_tokens(tokenizer):
        raise SystemExit(f"dpo error: {init_from} is not a chat model (it has no chat tokens); fine-tune it with "
                         "sft.py first and pass that checkpoint")
else:
    model, tokenizer = model_from_checkpoint(checkpoint, ckpt_path)
    reference_file = checkpoint["reference"]
    log(f"resuming {ckpt_path} at step {checkpoint['step']}")
block_size = block_size or model.config.block_size
if block_size > model.config.block_size:
    raise SystemExit(f"config error: block_size={block_size} is longer than the model's context of "
                     f"{model.config.block_size}; set --block_size=0 to use it")

# data: records -> (prompt, chosen, rejected) -> a unit (inputs, targets, doc ids) for each answer
records = [preference(record, where) for where, record in read_records(data, data_sha256)]
train_records, val_records = split_held_out(records, val_fraction)


def pairs_of(records):
    """(chosen unit, rejected unit) per record; pairs whose answer the cut at block_size leaves
    empty on either side are dropped."""
    pairs = []
    for prompt, chosen, rejected in records:
        examples = [training_example(*render(tokenizer, prompt + [{"role": "assistant", "content": answer}]), block_size)
                    for answer in (chosen, rejected)]
        if None not in examples:
            pairs.append(tuple((x, y, [0] * len(x)) for x, y in examples))
    return pairs


train_pairs, val_pairs = pairs_of(train_records), pairs_of(val_records)
if not train_pairs:
    raise SystemExit(f"data error: no pair of {data} fits block_size={block_size} with an answer left on both sides; "
                     "raise block_size or shorten the prompts")
steps_per_epoch = math.ceil(len(train_pairs) / total_batch_size)
max_iters = max_iters or epochs * steps_per_epoch
log(f"data {data}: {len(train_pairs)} train and {len(val_pairs)} held-out pairs"
    + (f" ({len(records) - len(train_pairs) - len(val_pairs)} dropped: no answer left within block_size={block_size})"
       if len(train_pairs) + len(val_pairs) < len(records) else ""))
log(f"device {device_name(device)} x {dist.world_size} processes, {dtype}; {total_batch_size} pairs per step = "
    f"{batch_size} x {dist.world_size} processes x {accumulation_steps} accumulation steps; {max_iters} steps "
    f"({steps_per_epoch} per epoch)")

lora_settings = dict(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                     targets=[t.strip() for t in lora_targets.split(",")]) if lora_rank else None
if lora_settings:
    reference = None  # the policy with its adapters off
    if checkpoint is None:  # a resumed model has its adapters already
        add_lora(model, **lora_settings)
else:
    if checkpoint is None:
        reference = copy.deepcopy(model)
    else:
        path = checked_base(reference_file, ckpt_path)
        reference = merge_lora(model_from_checkpoint(load_checkpoint(path), path)[0])
    reference.requires_grad_(False).eval()
    place_model(reference, dist, parallelism, dtype)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
log(f"model: {model.num_params() / 1e6:.2f}M parameters, {trainable:,} of them trained "
    f"({100 * trainable / sum(p.numel() for p in model.parameters()):.2f}%); reference: "
    + ("the same model, adapters off" if lora_rank else "a frozen copy"))
place_model(model, dist, parallelism, dtype)
seed_everything(seed + dist.rank)

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
run_log = RunLog(out_dir, config, master, run_log_path(out_dir, resumed=step > 0), stage="dpo", data=data,
                 parameters=raw_model.num_params(), trained_parameters=trainable, device=device_name(device),
                 processes=dist.world_size, dtype=dtype)

STATS = ("loss", "accuracy", "margin", "logp_chosen", "logp_rejected")


def logprobs(net, x, y):
    with autocast:
        return response_logprobs(net(x, all_logits=True)[0], y)


@torch.no_grad()
def reference_logprobs(x, y):
    if reference is not None:
        return logprobs(reference, x, y)
    was_training = raw_model.training
    raw_model.eval()  # the reference has no dropout
    with adapters_disabled(raw_model):
        result = logprobs(raw_model, x, y)
    raw_model.train(was_training)
    return result


def pair_stats(pairs):
    """The mean DPO loss over pairs (a tensor to backpropagate) and STATS, summed over the pairs."""
    x, y, _ = collate([chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs], tokenizer.eot_id)
    x, y = to_device(torch.stack((x, y)), device)  # one copy, cut up on the device
    # chosen and rejected go through the model as one batch: one forward pass, not two
    policy_chosen, policy_rejected = logprobs(model, x, y).chunk(2)
    ref_chosen, ref_rejected = reference_logprobs(x, y).chunk(2)
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    stats = torch.stack([loss, (margin > 0).float(), margin, policy_chosen, policy_rejected]).detach().sum(dim=1)
    return loss.mean(), stats


def micro_step_loss(micro_step):
    index = (step * dist.world_size + dist.rank) * accumulation_steps + micro_step
    loss, stats = pair_stats([train_pairs[i] for i in batch_of(len(train_pairs), batch_size, index, seed)])
    step_stats.add_(stats)
    return loss


@torch.no_grad()
def evaluate():
    """STATS as means over every held-out pair (the batches dealt out to the processes)."""
    batches = [val_pairs[i : i + batch_size] for i in range(0, len(val_pairs), batch_size)]
    model.eval()
    total = torch.zeros(len(STATS), device=device)
    # Every process runs the same number of forward passes: under FSDP each one is a collective.
    for i in range(dist.rank, dist.world_size * math.ceil(len(batches) / dist.world_size), dist.world_size):
        stats = pair_stats(batches[i % len(batches)])[1]
        if i < len(batches):
            total += stats
    model.train()
    total = all_reduce_sum(total, dist.world_size) / len(val_pairs)
    return dict(zip(STATS, total.tolist()))


def describe(stats):
    return (f"loss {stats['loss']:.4f} | accuracy {stats['accuracy']:.2f} | margin {stats['margin']:.3f} | "
            f"logp chosen {stats['logp_chosen']:.1f} rejected {stats['logp_rejected']:.1f}")


# -----------------------------------------------------------------------------
# training loop
start_step, val_stats = step, None
t_log, steps_since_log = time.time(), 0
while True:
    lr = learning_rate_at(step, learning_rate, warmup_iters, max_iters, min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr

    if step % eval_interval == 0 or step == max_iters:
        val_stats = evaluate() if val_pairs else None  # val_fraction=0: nothing held out
        if val_stats is not None:
            log(f"step {step}: held-out {describe(val_stats)}")
        if step > start_step:
            stop_unless_finite(raw_model, [val_stats and val_stats["loss"], step_stats], dist, "dpo", step, out_dir)
            path = save_training_checkpoint(raw_model, optimizer, dist, out_dir, keep_checkpoints, lora=lora_settings,
                                            base=reference_file, kind="dpo", step=step, val=val_stats,
                                            reference=reference_file, config=config, tokenizer=tokenizer.description)
            log(f"saving {path} in the background")
            if master and not run_log.owns_folder():
                # a new run's first checkpoint: once it is on disk, and only then, the earlier run in out_dir goes
                wait_for_checkpoint()
                run_log.metrics_path = replace_earlier_run(out_dir, path, run_log.metrics_path, log)
        if val_stats is not None:
            run_log.log({"step": step, **{f"val_{k}": v for k, v in val_stats.items()}})
            run_log.plot()
        t_log, steps_since_log = time.time(), 0
    if step >= max_iters:
        break

    step_stats = torch.zeros(len(STATS), device=device)  # summed over the step's pairs by micro_step_loss
    optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip)
    step += 1
    steps_since_log += 1

    if step % log_interval == 0 or step == max_iters:
        # the last step's pairs, over every process
        stats = dict(zip(STATS, (all_reduce_sum(step_stats, dist.world_size) / total_batch_size).tolist()))
        if not math.isfinite(stats["loss"]):
            raise SystemExit(f"dpo error: the loss is not finite ({stats['loss']}) at step {step}; stopping without "
                             "saving. Lower learning_rate or check the data." if master else 1)
        seconds_per_step = (time.time() - t_log) / steps_since_log
        log(f"step {step}/{max_iters} | {describe(stats)} | lr {lr:.2e} | {1000 * seconds_per_step:.0f} ms/step | "
            f"eta {format_duration((max_iters - step) * seconds_per_step)}")
        run_log.log({"step": step, **stats, "lr": lr, "time": time.time()})
        t_log, steps_since_log = time.time(), 0

wait_for_checkpoint()  # the last checkpoint is on disk before the run reports it
run_log.finish()
log(f"done after {step} steps" + (f", held-out {describe(val_stats)}" if val_stats is not None else "")
    + f"; chat with: python sample.py --out_dir={out_dir} --chat=True")
teardown_distributed()
