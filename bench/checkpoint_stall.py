"""
How long saving a checkpoint stops training: the main thread's time in checkpoint.save_training_checkpoint,
which copies the model and AdamW state to CPU memory and leaves the writing to a background thread,
against a synchronous save (the same call, then waiting until the file is on disk).

    python bench/checkpoint_stall.py                              # 71M parameters (GPT-2 vocabulary), CPU
    python bench/checkpoint_stall.py --n_layer=12 --n_embd=768 --device=cuda   # GPT-2 124M's size, one GPU

The two are interleaved (background, synchronous, background, ...) in one run, so the machine's load
touches both alike; min and median over the repeats are printed. Writes into out_dir, then removes it.
"""

import os
import shutil
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import configure  # noqa: E402  (after the path: run from anywhere)
from model import GPT, GPTConfig  # noqa: E402
from runtime import Distributed  # noqa: E402
from checkpoint import checkpoint_writer, save_training_checkpoint  # noqa: E402
from optim import make_optimizer  # noqa: E402

n_layer = 6
n_embd = 512
vocab_size = 50304
repeats = 3
device = "cpu"
out_dir = "out/bench_checkpoint_stall"
configure(globals())

model = GPT(GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_embd // 64, n_embd=n_embd)).to(device)
optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), device)
x = torch.randint(0, vocab_size, (1, 64), device=device)
model(x, x)[1].backward()
optimizer.step()  # AdamW's moments exist: the state is 3x the weights, as in a real checkpoint
dist = Distributed(0, 0, 1, device)
print(f"{model.num_params() / 1e6:.1f}M parameters, {device}; {repeats} saves of each kind, interleaved")

stalls = {"background": [], "synchronous": []}
for step in range(1, repeats + 1):
    for kind in stalls:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        save_training_checkpoint(model, optimizer, dist, out_dir, keep=1, kind="bench", step=step)
        if kind == "synchronous":
            checkpoint_writer.wait()
        stalls[kind].append(time.perf_counter() - start)
        checkpoint_writer.wait()  # the next save starts from an idle disk either way
shutil.rmtree(out_dir)
for kind, seconds in stalls.items():
    print(f"{kind:>12}: training stopped for min {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s")
