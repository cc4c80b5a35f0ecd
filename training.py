"""
The training machinery that train.py (and the post-training scripts) share:
reading token bins, the AdamW parameter groups, the learning-rate schedule,
loss estimation, and the metrics log. Each piece is small; the loop that uses
them stays in the stage script, where a reader sees it top to bottom.

Batches are stateless: the windows for (step, micro_step) come from a random
generator seeded with exactly those numbers. So the data position of a run is
its step count, a resumed run reads the same batches as one never stopped, and
nothing about the loader needs saving.
"""

import json
import math
import os

import numpy as np
import torch
import torch.distributed


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


def append_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def format_duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
