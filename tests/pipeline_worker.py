"""Run by test_pipeline.py under torchrun: one pipeline step of a tiny GPT cut into STAGES stages,
each replicated over the processes / STAGES data-parallel replicas: every micro-batch forward and
backward, the gradients averaged over the replicas and clipped to norm 0.5 over the stages. Each
process saves its stage's gradients, the gradient norm, and on the last stage the micro-batch
losses, to OUT_DIR/rank<r>.pt.

    torchrun --nproc_per_node=4 tests/pipeline_worker.py OUT_DIR STAGES SCHEDULE MICROBATCHES POS
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402
from runtime import setup_distributed, teardown_distributed  # noqa: E402
from pipeline import Pipeline  # noqa: E402


def tiny_model(pos):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=4, n_head=2, n_embd=32, pos=pos,
                         norm="layernorm" if pos == "learned" else "rmsnorm"))


MAX_NORM = 0.5  # below the tiny model's gradient norm, so the clipping acts


def batch(microbatches):
    """microbatches x 3 sequences of 16 tokens, and their targets."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (3 * microbatches, 17), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


if __name__ == "__main__":
    out_dir, stages, schedule, microbatches, pos = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    dist = setup_distributed("cpu")
    model = tiny_model(pos)
    pipeline = Pipeline(model, dist, stages, schedule, microbatches, "ddp", "float32", cpu_offload=False,
                        compile=False)
    # the whole batch holds every replica's micro-batches, one replica's after another's
    x, y = (t.chunk(pipeline.data_parallel)[pipeline.data_rank] for t in batch(microbatches * pipeline.data_parallel))
    losses = pipeline.run(x, y)
    pipeline.average_gradients()
    norm = pipeline.clip_gradients(MAX_NORM)
    grads = {name: p.grad for name, p in model.named_parameters()}
    torch.save({"losses": losses, "grads": grads, "norm": norm}, os.path.join(out_dir, f"rank{dist.rank}.pt"))
    teardown_distributed()
