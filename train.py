"""
Pretrain a GPT on the token bins that prepare.py wrote, on one CPU or GPU or many.

    python train.py config/quickstart.py                  # small model, 2-core CPU, a few minutes
    python train.py config/train_gpt2.py                  # GPT-2 124M on one GPU
    python train.py config/quickstart.py --init_from=resume   # continue from out_dir/ckpt.pt
    python train.py config/quickstart.py --max_seconds=60 --eval_seconds=10   # a time budget, the schedule on the clock
    python train.py config/quickstart.py --init_from=hf:out/quickstart/hf --out_dir=out/ft   # from a Hugging Face folder
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py            # 8 GPUs, DDP
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --parallelism=fsdp
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py config/train_gpt2.py --init_from=auto
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --pipeline_stages=2 --tie_embeddings=False
    python train.py config/train_gpt2.py --parallelism=fsdp --cpu_offload=True   # optimizer state in CPU memory

Reads data/<dataset>/meta.json and its bins. Writes out_dir/ckpt-<step>.pt (model, optimizer, step,
RNG states, config and tokenizer: all that sample.py and a resumed run need), keeping the last
keep_checkpoints with ckpt.pt linked to the newest, and metrics.jsonl, plot.png and report.md.

total_batch_tokens fixes the tokens per step and the gradient accumulation follows, so a config gives the
same optimization on 1 or 8 GPUs; a checkpoint of any layout (DDP, FSDP, pipeline stages) resumes in any
other. More: docs/train.md and docs/scaling.md.

Every default below is a config key: override it in a config file or with --key=value.
"""

import math
import os
import time

import torch

from benchmarks import read_benchmark, score_benchmark
from checkpoint import load_checkpoint, load_newest_checkpoint
from configurator import configure, print_config
from data import TokenBins, load_meta
from model import GPT, GPTConfig
from optim import learning_rate_at, make_optimizer, optimizer_step, set_learning_rate
from parallel import all_reduce_sum, check_layout, estimate_loss, place_model, wrap_model
from pipeline import Pipeline, pipeline_layers, pipeline_optimizer_step, pipeline_stage_part
from runtime import device_name, peak_flops as gpu_peak_flops, seed_everything
from tokenizer import Tokenizer
from trainer import (Pace, finish, gradient_accumulation, gradient_scaler, open_run_log, resume_state, save, start,
                     stop_if_not_finite, take_out_dir)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out/default"
init_from = "scratch"  # 'scratch'; 'resume' (out_dir/ckpt.pt); 'auto' (the newest good checkpoint, else scratch)
# or 'hf:FOLDER': a new run from the weights (and architecture) of a Hugging Face GPT-2 or Llama folder
keep_checkpoints = 3  # how many of the newest checkpoints to keep
eval_interval = 250  # evaluate and save a checkpoint every this many steps, and at the end
eval_iters = 50  # batches per split in each evaluation
benchmark = ""  # scored at every evaluation: a task of evaluate.py (arc_easy, gsm8k, ...) or a JSONL in its formats
benchmark_dir = "data/evals"  # the folder holding the task files (evaluate.py's data_dir)
benchmark_limit = 500  # how many of its examples to score (gsm8k and humaneval generate up to 256 and 512 tokens each)
log_interval = 10
wandb_project = ""  # a Weights & Biases project to log the run to (pip install wandb); '' for none
tensorboard = False  # also write TensorBoard events to out_dir/tensorboard (pip install tensorboard)
# data
dataset = "pystdlib"  # a folder under data_root written by prepare.py
data_root = "data"
batch_size = 16  # sequences per micro-step on each process (GPU)
block_size = 1024  # tokens per sequence
total_batch_tokens = 65536  # tokens per optimizer step over all processes; sets the gradient accumulation
# model (model.py's GPTConfig): the README's "A faster recipe"; config/train_gpt2.py sets the classic one
n_layer = 12
n_head = 12
n_kv_head = 0  # 0: same as n_head; fewer shares each key/value head among several query heads
n_embd = 768
ffn_hidden = 0  # 0: derived from mlp
norm = "rmsnorm"
mlp = "relu2"  # ReLU squared: as good as SwiGLU at less compute per parameter
pos = "rope"
rope_theta = 10000.0
qk_norm = True  # normalised queries and keys keep attention logits bounded at high learning rates
tie_embeddings = False
bias = False
dropout = 0.0
norm_eps = 1e-5
zero_init_proj = True  # attention's and the MLP's output projections start at zero: each block starts as the identity
logit_softcap = 15.0  # >0: logits = cap * tanh(logits / cap), no early runaway of a few logits; 0: off
# optimizer
optimizer = "muon"  # 'muon': Muon for the blocks' matrices, AdamW for the rest; or 'adamw' for all
learning_rate = 6e-4  # AdamW's
muon_lr = 0.02  # Muon's peak learning rate (the schedule scales it like learning_rate)
muon_momentum = 0.95
max_iters = 5000
max_seconds = 0.0  # >0: stop after this many seconds of training (not max_iters); step s of the schedule is at s/max_iters of it
eval_seconds = 0.0  # >0: also evaluate every this many seconds of training (for loss-versus-time curves)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 disables
# learning-rate schedule: linear warmup, then 'cosine' decay to min_lr, or 'wsd': constant, then decay in the last steps
lr_schedule = "wsd"
warmup_iters = 100
lr_decay_iters = 0  # 0: max_iters
lr_decay_fraction = 0.3  # wsd: the fraction of lr_decay_iters spent decaying
lr_decay_shape = "linear"  # wsd: 'linear' or '1-sqrt'
min_lr = 6e-5
# system
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'
compile = True  # torch.compile the model: slower start, faster steps
seed = 1337
peak_flops = 0.0  # the GPU's peak FLOP/s for MFU; 0 looks it up by the GPU's name
# distributed (torchrun)
parallelism = "ddp"  # 'ddp': every process holds the whole model; 'fsdp': parameters, gradients and optimizer state sharded
activation_checkpointing = False  # recompute each block's activations in the backward pass: less memory, ~30% more compute
pipeline_stages = 1  # >1: split the layers into this many stages on as many processes; the rest of the world is data parallel
pipeline_schedule = "1f1b"  # 'gpipe' (all forwards, then all backwards) or '1f1b' (alternating: fewer activations held)
cpu_offload = False  # with parallelism='fsdp': parameters, gradients and optimizer state live in CPU memory (slower, larger models)
fsdp_sync_every_micro_step = False  # with parallelism='fsdp': reduce-scatter gradients every micro-step, not only the last (less memory)
config = configure(globals())
print_config(config)
# -----------------------------------------------------------------------------

dist, dtype, autocast = start(device, dtype, seed, parallelism, cpu_offload)
device, log = dist.device, dist.log  # log: print on rank 0 only
check_layout(parallelism, dtype, cpu_offload, pipeline_stages, dist.world_size)
if benchmark and (pipeline_stages > 1 or parallelism == "fsdp" and dist.world_size > 1):
    raise SystemExit("config error: benchmark scoring runs on the whole, unsharded model; use it with "
                     "parallelism='ddp' and without pipeline_stages")
if init_from not in ("scratch", "resume", "auto") and not init_from.startswith("hf:"):
    raise SystemExit(f"config error: init_from='{init_from}' is not one of scratch, resume, auto, hf:FOLDER")
lr_decay_iters = lr_decay_iters or max_iters
data_parallel = dist.world_size // pipeline_stages  # the processes that read different batches
# micro-steps per optimizer step; under pipelining, the micro-batches of the schedule
accumulation_steps = gradient_accumulation("total_batch_tokens", total_batch_tokens, batch_size=batch_size,
                                           block_size=block_size, data_parallel=data_parallel)
if pipeline_stages > 1 and pipeline_schedule == "1f1b" and accumulation_steps < pipeline_stages:
    raise SystemExit(f"config error: 1f1b needs at least as many micro-batches as stages, and total_batch_tokens="
                     f"{total_batch_tokens} gives {accumulation_steps}; raise total_batch_tokens or lower batch_size")
layout = f"{parallelism}" if pipeline_stages == 1 else f"{pipeline_stages} pipeline stages x {data_parallel} {parallelism}"
log(f"device {device_name(device)} x {dist.world_size} processes ({layout}{', cpu offload' if cpu_offload else ''}), "
    f"{dtype}; {total_batch_tokens:,} tokens per step = {batch_size} sequences x {block_size} tokens x {data_parallel} "
    f"data-parallel processes x {accumulation_steps} " + ("accumulation steps" if pipeline_stages == 1 else
                                                           f"micro-batches ({pipeline_schedule})"))
stop = take_out_dir(out_dir, dist, "--init_from=auto")  # one run per out_dir; Ctrl-C, SIGTERM end it in one line

# data: the bins are memory-mapped once and read as random windows
data_dir = os.path.join(data_root, dataset)
meta = load_meta(data_dir)
bins = {split: TokenBins(data_dir, meta, split, block_size) for split in ("train", "val")}
if benchmark:
    tokenizer = Tokenizer(meta["tokenizer"])
    benchmark_data = read_benchmark(benchmark, benchmark_dir, benchmark_limit, log)
log(f"data {data_dir}: {meta['splits']['train']['tokens']:,} train and {meta['splits']['val']['tokens']:,} val tokens, "
    f"{meta['tokenizer']['kind']} tokenizer, vocabulary {meta['vocab_size']}")

# model: from scratch, from the checkpoint of a run to continue, or from a Hugging Face folder's weights
checkpoint, ckpt_path = None, os.path.join(out_dir, "ckpt.pt")
step, best_val_loss = 0, float("inf")
pretrained = load_checkpoint(init_from) if init_from.startswith("hf:") else None
if init_from == "resume":
    checkpoint = load_checkpoint(ckpt_path)
elif init_from == "auto":
    checkpoint, ckpt_path = load_newest_checkpoint(out_dir)
if checkpoint is not None:
    if checkpoint["model_config"]["vocab_size"] != meta["vocab_size"]:
        raise SystemExit(f"train error: {ckpt_path} has vocabulary {checkpoint['model_config']['vocab_size']} "
                         f"but {data_dir} has {meta['vocab_size']}; resume on the dataset it was trained on")
    model_config = GPTConfig.from_dict(checkpoint["model_config"])  # the architecture is the checkpoint's
    step, best_val_loss = checkpoint["step"], checkpoint["best_val_loss"]
    log(f"resuming {ckpt_path} at step {step}")
elif pretrained is not None:
    if pretrained["tokenizer"] != meta["tokenizer"]:
        raise SystemExit(f"train error: {init_from}'s tokenizer ({pretrained['tokenizer']['kind']}) is not the one "
                         f"{data_dir} was prepared with ({meta['tokenizer']['kind']}); prepare a dataset with the "
                         "model's tokenizer (python prepare.py --tokenizer=gpt2 for GPT-2's)")
    # the architecture is the folder's; dropout is a choice of this run
    model_config = GPTConfig.from_dict({**pretrained["model_config"], "dropout": dropout})
    if block_size > model_config.block_size:
        raise SystemExit(f"config error: block_size={block_size} is longer than {init_from}'s context of "
                         f"{model_config.block_size}; set --block_size={model_config.block_size} or less")
    log(f"starting a new run from the weights of {init_from}")
else:
    try:
        model_config = GPTConfig.from_dict(dict(config, vocab_size=meta["vocab_size"]))  # its fields are config keys
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
# Built on the meta device, with no memory: place_model (or the pipeline) gives it its weights, a new
# run's from the seed and under FSDP block by block, each process keeping only its shards.
with torch.device("cpu" if pretrained is not None else "meta"):
    model = GPT(model_config)
if pretrained is not None:
    model.load_state_dict(pretrained.pop("model"))  # popped: the copy is freed once loaded
model.activation_checkpointing = activation_checkpointing
flops_per_token = model.flops_per_token(block_size)
parameters = model.num_params()  # counted before pipeline stages cut the model into parts
log(f"model: {parameters / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs per token")
stage_layers = pipeline_layers(model_config.n_layer, pipeline_stages, model_config.tie_embeddings)
if pipeline_stages > 1:
    pipeline = Pipeline(model, dist, pipeline_stages, pipeline_schedule, accumulation_steps, parallelism, dtype,
                        cpu_offload, compile, seed)  # model is cut down to this process's stage
    log(f"pipeline: stage layers {[list(r) for r in stage_layers]}")
else:
    pipeline = None
    place_model(model, dist, parallelism, dtype, cpu_offload, seed)
seed_everything(seed + dist.rank)  # but different dropout masks in each process

# with cpu_offload the parameters are in CPU memory, and so the optimizer steps there
trained_with = checkpoint["config"].get("optimizer", "adamw") if checkpoint is not None else optimizer
if trained_with != optimizer:
    raise SystemExit(f"config error: {ckpt_path} was trained with optimizer='{trained_with}', this run has "
                     f"'{optimizer}'; resume with the run's optimizer, or set another --out_dir")
optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), "cpu" if cpu_offload else device,
                           optimizer, muon_lr, muon_momentum)  # the config key's string becomes the optimizer
if checkpoint is not None:
    resume_state(model, optimizer, checkpoint if pipeline is None else pipeline_stage_part(checkpoint, model), dist)
    checkpoint = None  # free the memory
scaler = gradient_scaler(dist, dtype)
raw_model = model  # what checkpoints are taken from: not the compiled or DDP wrapper
if pipeline is None:
    model = wrap_model(model, dist, parallelism, compile, log)

peak = gpu_peak_flops(device_name(device), peak_flops) if device.startswith("cuda") or peak_flops else 0.0
# metrics.jsonl, the trackers, the plot and the report card: rank 0's
run_log = open_run_log(out_dir, config, dist, dtype, step, "pretrain", parameters=parameters,
                       data=f"{data_dir}: {meta['splits']['train']['tokens']:,} train tokens")
if "unigram_loss" in meta:
    log(f"baseline: a model that ignores context (unigram) has val loss {meta['unigram_loss']:.4f}")


def micro_step_loss(micro_step):
    # Seeded by the micro-step's place in the global batch, so 1 process with 8 micro-steps
    # reads exactly the sequences that 8 processes with 1 each do.
    x, y = bins["train"].sample(batch_size, (seed, 0, step, dist.rank * accumulation_steps + micro_step), device)
    with autocast:
        return model(x, y)[1]  # holding on to the logits would keep them in memory through backward


# -----------------------------------------------------------------------------
# training loop
start_step = step
first_bad_step = torch.tensor(-1, device=device)  # kept on the device: reading the loss every step would stall a GPU
pace = Pace(step, max_iters)
timed = max_seconds > 0 or eval_seconds > 0
train_seconds, next_eval_seconds = 0.0, eval_seconds  # time in training steps, without evaluations
while True:
    # Under a time budget the schedule runs on the clock, so that it ends when the time does.
    schedule_step = min(max_iters, int(max_iters * train_seconds / max_seconds)) if max_seconds > 0 else step
    lr = set_learning_rate(optimizer, learning_rate_at(schedule_step, learning_rate, warmup_iters, lr_decay_iters,
                                                       min_lr, lr_schedule, lr_decay_fraction, lr_decay_shape))
    # where the run decides to end: at max_iters (or max_seconds), or at a stop signal every process heard of
    done = (train_seconds >= max_seconds if max_seconds > 0 else step >= max_iters) or stop.requested()
    eval_due = eval_seconds > 0 and train_seconds >= next_eval_seconds
    if eval_due:  # the next multiple of eval_seconds: adding it up to the clock would loop for ever at 1e-20
        next_eval_seconds = (train_seconds // eval_seconds + 1) * eval_seconds

    if step % eval_interval == 0 or done or eval_due:
        losses = estimate_loss(model, bins, eval_iters, batch_size, device, autocast, seed, dist, pipeline)
        stop_if_not_finite(losses["train"] + losses["val"], step, dist, "train", out_dir)
        log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        best_val_loss = min(best_val_loss, losses["val"])
        if benchmark:
            # The uncompiled model: the benchmark's varying shapes would make torch.compile recompile.
            losses.update(score_benchmark(benchmark_data, raw_model, tokenizer, batch_size, autocast, dist, False, step,
                                          log))
        if step > start_step:
            save(raw_model, optimizer, dist, out_dir, keep_checkpoints, run_log, "train", [loss_sum], pipeline,
                 kind="pretrain", step=step, best_val_loss=best_val_loss, val_loss=losses["val"], config=config,
                 tokenizer=meta["tokenizer"])
        run_log.log({"step": step, "tokens": step * total_batch_tokens,
                     **{f"{k}_loss" if k in bins else k: v for k, v in losses.items()},
                     **({"train_seconds": train_seconds} if timed else {})})
        run_log.plot()
        pace.restart(step)  # evaluation time does not count toward tokens/s
    if done:
        break

    t_step = time.time()
    if pipeline is None:
        loss_sum = optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip,
                                  fsdp_sync_every_micro_step)
    else:  # micro_step_loss's micro-batches in one batch, which the schedule splits again (the first stage
        # needs the inputs and the last the targets: both read them from the same seeds)
        seeds = [(seed, 0, step, pipeline.data_rank * accumulation_steps + m) for m in range(accumulation_steps)]
        x, y = bins["train"].sample_many(batch_size, seeds, device)
        loss_sum = pipeline_optimizer_step(pipeline, optimizer, x, y, grad_clip, autocast)
    if timed:
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # the step's kernels have run, not only been queued
        # every process takes the slowest one's time, so they all stop and evaluate at the same step
        seconds = torch.tensor(time.time() - t_step, device=device)
        if dist.world_size > 1:
            torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
        seconds = seconds.item()
        if compile and step == start_step:
            log(f"first step (compiling) took {seconds:.1f} s, not counted in train_seconds")
            run_log.log({"step": step, "compile_seconds": seconds})
        else:
            train_seconds += seconds
    first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss_sum), step, first_bad_step)
    step += 1

    if step % log_interval == 0 or step == max_iters:
        # reading values waits for the GPU, and averaging them waits for every process: only at log steps
        # each data-parallel process has its share's loss (under pipelining, the last stage; the others 0)
        train_loss = all_reduce_sum(loss_sum, dist.world_size).item() / data_parallel
        if dist.world_size > 1:
            torch.distributed.all_reduce(first_bad_step, op=torch.distributed.ReduceOp.MAX)
        if first_bad_step.item() >= 0:
            stop_if_not_finite(float("nan") if math.isfinite(train_loss) else train_loss, first_bad_step.item(), dist,
                               "train", out_dir)
        seconds_per_step, pace_text = pace.lap(step, max_seconds - train_seconds if max_seconds > 0 else None)
        tokens_per_sec = total_batch_tokens / seconds_per_step
        mfu = flops_per_token * tokens_per_sec / (peak * dist.world_size) if peak else None
        log(f"step {step}/{max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {tokens_per_sec:,.0f} tok/s | "
            + (f"mfu {100 * mfu:.1f}% | " if mfu is not None else "") + pace_text)
        run_log.log({"step": step, "tokens": step * total_batch_tokens, "loss": train_loss, "lr": lr,
                     "tokens_per_sec": tokens_per_sec, "mfu": mfu, "time": time.time()})

finish(run_log, dist, stop, step, f"done: val loss {losses['val']:.4f} (best {best_val_loss:.4f}) after {step} "
       f"steps; sample with: python sample.py --out_dir={out_dir}")
