"""
Pretrain a GPT on the token bins that prepare.py wrote.

    python train.py config/quickstart.py                  # small model, 2-core CPU, a few minutes
    python train.py config/train_gpt2.py                  # GPT-2 124M on one GPU
    python train.py config/quickstart.py --max_iters=2000 --learning_rate=1e-3
    python train.py config/quickstart.py --init_from=resume   # continue from out_dir/ckpt.pt

Reads data/<dataset>/meta.json and its bins. Writes out_dir/ckpt.pt (model,
optimizer, step, RNG state, config and tokenizer: everything sample.py needs
and everything a resumed run needs to continue exactly) and appends one JSON
line per log step and per evaluation to out_dir/metrics.jsonl.

Every default below is a config key: override it in a config file or with --key=value.
"""

import math
import os
import time
from dataclasses import asdict

import torch

from checkpoint import load_checkpoint, save_checkpoint
from configurator import configure, print_config
from model import GPT, GPTConfig, peak_flops as gpu_peak_flops
from runtime import autocast_context, device_name, pick_device, pick_dtype, rng_state, seed_everything, set_rng_state
from training import (TokenBins, append_metrics, estimate_loss, format_duration, learning_rate_at, load_meta,
                      make_optimizer, to_device)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out/default"
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
eval_interval = 250  # evaluate and save a checkpoint every this many steps, and at the end
eval_iters = 50  # batches per split in each evaluation
log_interval = 10
# data
dataset = "pystdlib"  # a folder under data_root written by prepare.py
data_root = "data"
batch_size = 16  # sequences per micro-step
block_size = 1024  # tokens per sequence
gradient_accumulation_steps = 4  # micro-steps per optimizer step
# model (see model.py's GPTConfig; the defaults are the modern style)
n_layer = 12
n_head = 12
n_kv_head = 0  # 0: same as n_head; fewer shares each key/value head among several query heads
n_embd = 768
ffn_hidden = 0  # 0: derived from mlp
norm = "rmsnorm"
mlp = "swiglu"
pos = "rope"
rope_theta = 10000.0
qk_norm = False
tie_embeddings = False
bias = False
dropout = 0.0
norm_eps = 1e-5
# AdamW
learning_rate = 6e-4
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
# learning-rate schedule: linear warmup, cosine decay to min_lr
warmup_iters = 100
lr_decay_iters = 0  # 0: max_iters
min_lr = 6e-5
# system
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'
compile = True  # torch.compile the model: slower start, faster steps
seed = 1337
peak_flops = 0.0  # the GPU's peak FLOP/s for MFU; 0 looks it up by the GPU's name
config = configure(globals())
print_config(config)
# -----------------------------------------------------------------------------

device = pick_device(device)
dtype = pick_dtype(device, dtype)
autocast = autocast_context(device, dtype)
seed_everything(seed)
if device.startswith("cuda"):
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores
    torch.backends.cudnn.allow_tf32 = True
lr_decay_iters = lr_decay_iters or max_iters
tokens_per_step = gradient_accumulation_steps * batch_size * block_size
print(f"device {device_name(device)}, {dtype}; {tokens_per_step:,} tokens per step "
      f"({gradient_accumulation_steps} x {batch_size} sequences x {block_size} tokens)")

# data: the bins are memory-mapped once and read as random windows
data_dir = os.path.join(data_root, dataset)
meta = load_meta(data_dir)
bins = {split: TokenBins(data_dir, meta, split, block_size) for split in ("train", "val")}
print(f"data {data_dir}: {meta['splits']['train']['tokens']:,} train and {meta['splits']['val']['tokens']:,} val tokens, "
      f"{meta['tokenizer']['kind']} tokenizer, vocabulary {meta['vocab_size']}")

# model: from scratch, or from the checkpoint of a run to continue
ckpt_path = os.path.join(out_dir, "ckpt.pt")
model_args = dict(vocab_size=meta["vocab_size"], block_size=block_size, n_layer=n_layer, n_head=n_head,
                  n_kv_head=n_kv_head, n_embd=n_embd, ffn_hidden=ffn_hidden, norm=norm, mlp=mlp, pos=pos,
                  rope_theta=rope_theta, qk_norm=qk_norm, tie_embeddings=tie_embeddings, bias=bias,
                  dropout=dropout, norm_eps=norm_eps)
step, best_val_loss, checkpoint = 0, float("inf"), None
if init_from == "resume":
    checkpoint = load_checkpoint(ckpt_path)
    if checkpoint["model_config"]["vocab_size"] != meta["vocab_size"]:
        raise SystemExit(f"train error: {ckpt_path} has vocabulary {checkpoint['model_config']['vocab_size']} "
                         f"but {data_dir} has {meta['vocab_size']}; resume on the dataset it was trained on")
    model_config = GPTConfig.from_dict(checkpoint["model_config"])  # the architecture is the checkpoint's
    step, best_val_loss = checkpoint["step"], checkpoint["best_val_loss"]
    print(f"resuming {ckpt_path} at step {step}")
elif init_from == "scratch":
    try:
        model_config = GPTConfig(**model_args)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
else:
    raise SystemExit(f"config error: init_from='{init_from}' is not one of scratch, resume")
model = GPT(model_config)
if checkpoint is not None:
    model.load_state_dict(checkpoint["model"])
model.to(device)
flops_per_token = model.flops_per_token(block_size)
print(f"model: {model.num_params() / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs per token")

optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint["optimizer"])
    set_rng_state(checkpoint["rng"])
    checkpoint = None  # free the memory
scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")  # fp16 needs loss scaling; bf16 does not

raw_model = model  # the uncompiled module: its state_dict has clean names for checkpoints
if compile:
    print("compiling the model (the first steps are slow)...")
    model = torch.compile(model)

peak = gpu_peak_flops(device_name(device), peak_flops) if device.startswith("cuda") or peak_flops else 0.0
metrics_path = os.path.join(out_dir, "metrics.jsonl")
os.makedirs(out_dir, exist_ok=True)
if init_from == "scratch" and os.path.exists(metrics_path):
    os.remove(metrics_path)  # a new run gets a new log; a resumed one appends to its own
if "unigram_loss" in meta:
    print(f"baseline: a model that ignores context (unigram) has val loss {meta['unigram_loss']:.4f}")


def stop_if_not_finite(loss, at_step):
    if not math.isfinite(loss):
        raise SystemExit(f"train error: the loss is not finite ({loss}) at step {at_step}; stopping without saving, "
                         f"so {ckpt_path} keeps the last good weights. Lower learning_rate or check the data.")


# -----------------------------------------------------------------------------
# training loop
start_step = step
first_bad_step = torch.tensor(-1, device=device)  # kept on the device: reading the loss every step would stall a GPU
t_log, steps_since_log = time.time(), 0
while True:
    lr = learning_rate_at(step, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr

    if step % eval_interval == 0 or step == max_iters:
        losses = estimate_loss(model, bins, eval_iters, batch_size, device, autocast, seed)
        stop_if_not_finite(losses["train"] + losses["val"], step)
        print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        append_metrics(metrics_path, {"step": step, "train_loss": losses["train"], "val_loss": losses["val"]})
        best_val_loss = min(best_val_loss, losses["val"])
        if step > start_step:
            save_checkpoint({
                "kind": "pretrain",
                "model_config": asdict(raw_model.config),
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "best_val_loss": best_val_loss,
                "val_loss": losses["val"],
                "config": config,
                "tokenizer": meta["tokenizer"],
                "rng": rng_state(),
            }, ckpt_path)
            print(f"saved {ckpt_path}")
        t_log, steps_since_log = time.time(), 0  # evaluation time does not count toward tokens/s
    if step >= max_iters:
        break

    # one optimizer step: accumulate gradients over micro-steps, clip, update
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        x, y = to_device(*bins["train"].sample(batch_size, (seed, 0, step, micro_step)), device)
        with autocast:
            _, loss = model(x, y)
        loss = loss / gradient_accumulation_steps  # the mean over the whole step, not a sum of means
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss_sum), step, first_bad_step)
    step += 1
    steps_since_log += 1

    if step % log_interval == 0 or step == max_iters:
        train_loss = loss_sum.item()  # waits for the GPU: only at log steps
        if first_bad_step.item() >= 0:
            stop_if_not_finite(train_loss if not math.isfinite(train_loss) else float("nan"), first_bad_step.item())
        seconds_per_step = (time.time() - t_log) / steps_since_log
        tokens_per_sec = tokens_per_step / seconds_per_step
        mfu = flops_per_token * tokens_per_sec / peak if peak else None
        print(f"step {step}/{max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {tokens_per_sec:,.0f} tok/s | "
              + (f"mfu {100 * mfu:.1f}% | " if mfu is not None else "")
              + f"{1000 * seconds_per_step:.0f} ms/step | eta {format_duration((max_iters - step) * seconds_per_step)}")
        append_metrics(metrics_path, {"step": step, "loss": train_loss, "lr": lr, "tokens_per_sec": tokens_per_sec,
                                      "mfu": mfu, "time": time.time()})
        t_log, steps_since_log = time.time(), 0

print(f"done: val loss {losses['val']:.4f} (best {best_val_loss:.4f}) after {step} steps; "
      f"sample with: python sample.py --out_dir={out_dir}")
