"""
The training machinery that train.py (and the post-training scripts) share:
reading token bins, placing and wrapping the model for DDP or FSDP, the AdamW
parameter groups, the learning-rate schedule, one optimizer step with gradient
accumulation and clipping, loss estimation, checkpoints of a run, and the
metrics log. Each piece is small; the loop that uses them stays in the stage
script, where a reader sees it top to bottom.

Batches are stateless: the windows for (step, micro_step) come from a random
generator seeded with exactly those numbers. So the data position of a run is
its step count, a resumed run reads the same batches as one never stopped, and
nothing about the loader needs saving.
"""

import json
import math
import os
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import gather_training_state, save_run_checkpoint
from runtime import rng_state, set_rng_state


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise SystemExit(f"data error: no {path}; prepare the data first (python prepare.py [config/data_x.py]) "
                         "or set --dataset to a prepared one")
    with open(path) as f:
        return json.load(f)


class TokenBins:
    """The token files of one split, memory-mapped once, read as random windows.

    A split may be several files (shards); a window never crosses from one file into the
    next, and every possible window start is equally likely.
    """

    def __init__(self, data_dir, meta, split, block_size):
        if split not in meta["splits"]:
            raise SystemExit(f"data error: {data_dir}/meta.json has no '{split}' split")
        self.block_size = block_size
        self.files = []
        for name in meta["splits"][split]["files"]:
            path = os.path.join(data_dir, name)
            if not os.path.isfile(path):
                raise SystemExit(f"data error: {path} is listed in meta.json but missing; run prepare.py again")
            self.files.append(np.memmap(path, dtype=meta["dtype"], mode="r"))
        starts = [max(0, len(f) - block_size) for f in self.files]  # each window needs block_size + 1 tokens
        if sum(starts) == 0:
            longest = max(len(f) for f in self.files)
            raise SystemExit(f"data error: the {split} split of {data_dir} has at most {longest} tokens in a file, "
                             f"fewer than block_size+1={block_size + 1}; lower block_size or add data")
        self.cumulative_starts = np.cumsum(starts)

    def sample(self, batch_size, seed):
        """batch_size windows (x, y) as int64 tensors, y shifted by one; seed is a tuple of ints."""
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, self.cumulative_starts[-1], size=batch_size)
        which = np.searchsorted(self.cumulative_starts, picks, side="right")
        offsets = picks - np.concatenate(([0], self.cumulative_starts))[which]
        windows = np.stack([self.files[w][o : o + self.block_size + 1] for w, o in zip(which, offsets)]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]


def to_device(x, y, device):
    if device.startswith("cuda"):
        # Pinned memory lets the copy run asynchronously while the GPU is still busy.
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def place_model(model, dist, parallelism, dtype):
    """Put the model where it trains: sharded over the processes (FSDP), or whole on this process's device."""
    if parallelism == "fsdp" and dist.world_size > 1:
        # Shard each block on its own, so only one block's full parameters exist at a time during
        # forward and backward; the root call takes the embeddings, final norm and output layer.
        # Compute in dtype but reduce gradients in fp32, so the average over processes loses nothing.
        precision = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=precision)
        fully_shard(model, mp_policy=precision)
    else:
        model.to(dist.device)


def wrap_model(model, dist, parallelism, compile, log=print):
    """The module the training loop calls: compiled, and under DDP wrapped to average gradients."""
    if compile:
        log("compiling the model (the first steps are slow)...")
        model = torch.compile(model)
    if parallelism == "ddp" and dist.world_size > 1:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None)
    return model


def make_optimizer(model, learning_rate, weight_decay, betas, device):
    """AdamW with weight decay on matrices (linear weights, embeddings) only.

    Decaying gains and biases would pull norms toward zero and buys nothing, so
    every parameter with fewer than 2 dimensions goes to the group without decay.
    The fused CUDA kernel updates all parameters in a few launches instead of several per tensor.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device.startswith("cuda"))


def learning_rate_at(step, learning_rate, warmup_iters, decay_iters, min_lr):
    """Linear warmup to learning_rate, then cosine decay to min_lr at decay_iters, then flat."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip):
    """One optimizer step: accumulate the gradients of accumulation_steps micro-batches
    (micro_step_loss(i) runs the forward of micro-batch i and returns its mean loss), clip the
    global gradient norm, update, and return the step's mean loss as a tensor (not synchronised)."""
    loss_sum = None
    for micro_step in range(accumulation_steps):
        if isinstance(model, DDP):
            # Average gradients across processes once, on the last micro-step, not on every one.
            model.require_backward_grad_sync = micro_step == accumulation_steps - 1
        loss = micro_step_loss(micro_step) / accumulation_steps  # the mean over the whole step
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


@torch.no_grad()
def estimate_loss(model, bins_by_split, eval_iters, batch_size, device, autocast, seed, rank=0, world_size=1):
    """Mean loss per split over eval_iters batches. The batches are the same at every call
    (seeded by split and index), so successive evaluations differ only by the model. Under
    torchrun the batches are dealt out to the processes and the sums added up, so the result
    does not depend on the number of processes."""
    was_training = model.training
    model.eval()
    losses = {}
    for split_index, (split, bins) in enumerate(bins_by_split.items()):
        total = torch.zeros((), device=device)
        # Every process runs the same number of forward passes: under FSDP each one is a collective.
        for i in range(rank, world_size * math.ceil(eval_iters / world_size), world_size):
            x, y = to_device(*bins.sample(batch_size, (seed, 1, split_index, i % eval_iters)), device)
            with autocast:
                _, loss = model(x, y)
            if i < eval_iters:
                total += loss.float()
        losses[split] = all_reduce_sum(total, world_size).item() / eval_iters
    model.train(was_training)
    return losses


def all_reduce_sum(tensor, world_size):
    if world_size > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def save_training_checkpoint(raw_model, optimizer, dist, out_dir, keep, **fields):
    """Gather the model, optimizer and every process's random state, and (rank 0) write them with
    fields (kind, step, config, tokenizer, ...) as out_dir/ckpt-<step>.pt. Every process must call
    this. Returns the path written (None on the other ranks)."""
    model_state, optimizer_state = gather_training_state(raw_model, optimizer)
    rng_states = [None] * dist.world_size
    if dist.world_size > 1:
        torch.distributed.all_gather_object(rng_states, rng_state())
    else:
        rng_states = [rng_state()]
    if not dist.is_main:
        return None
    checkpoint = {"model_config": asdict(raw_model.config), "model": model_state, "optimizer": optimizer_state,
                  "rng": rng_states, **fields}
    return save_run_checkpoint(checkpoint, out_dir, keep)


def restore_rng_state(rng_states, dist, log=print):
    """Each process takes back its own random state, if the checkpoint has one per process."""
    if len(rng_states) == dist.world_size:
        set_rng_state(rng_states[dist.rank])
    else:
        log(f"note: the checkpoint was written by {len(rng_states)} processes, this run has {dist.world_size}: "
            "the weights, optimizer and data position resume exactly, dropout's random state starts afresh")


def append_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def format_duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
