"""Run by test_recipe.py under torchrun: two optimizer steps of Muon (with AdamW) on a tiny GPT sharded by
FSDP2 over the processes, with the same full gradients on every process. Rank 0 saves the whole weights
afterwards to OUT_DIR/fsdp.pt.

    torchrun --nproc_per_node=2 tests/muon_worker.py OUT_DIR
"""

import os
import sys

import torch
from torch.distributed.tensor import distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402
from runtime import setup_distributed, teardown_distributed  # noqa: E402
from optim import make_optimizer  # noqa: E402
from parallel import shard_model  # noqa: E402


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))


def full_gradients(model, step):
    generator = torch.Generator().manual_seed(step)
    return {n: torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()}


if __name__ == "__main__":
    dist = setup_distributed("cpu")
    model = tiny_model()
    shard_model(model, model.blocks, None, "float32", cpu_offload=False)
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon", muon_lr=0.05)
    for step in range(2):
        for name, grad in full_gradients(model, step).items():
            param = dict(model.named_parameters())[name]
            param.grad = distribute_tensor(grad, param.device_mesh, param.placements)
        optimizer.step()
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    if dist.is_main:
        torch.save(weights, os.path.join(sys.argv[1], "fsdp.pt"))
    teardown_distributed()
