"""
Where a model trains: the placements that can run (check_layout), its initial weights (the same
however it is placed), placed whole on this process's device or sharded over the processes with
FSDP2, its blocks compiled, wrapped in DDP; and evaluation batches dealt out to the processes and
summed over them (sum_over_batches, estimate_loss).

    place_model(model, dist, "fsdp", "bfloat16", seed=1337)   # a model built on the meta device gets its weights here
    model = wrap_model(model, dist, "ddp", compile=True)        # what the training loop calls

More: docs/scaling.md.
"""

import math
import zlib

import torch
import torch.distributed
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from model import rope_tables


def check_layout(parallelism, dtype, cpu_offload, stages, processes):
    """Stop with one line at a placement over the processes that training cannot run (train.py's, plan.py's)."""
    half = dtype == "float16"
    for wrong, fix in (
        (parallelism == "fsdp" and half, "parallelism='fsdp' runs in bfloat16 or float32; set --dtype=bfloat16"),
        (cpu_offload and parallelism != "fsdp", "cpu_offload=True offloads FSDP's shards; set --parallelism=fsdp"),
        (processes % stages, f"pipeline_stages={stages} does not divide the {processes} processes; run a multiple "
                             "of it (torchrun --nproc_per_node, plan.py --num_gpus)"),
        (stages > 1 and half, "pipeline stages run in bfloat16 or float32; set --dtype=bfloat16"),
    ):
        if wrong:
            raise SystemExit(f"config error: {fix}")


def init_weights(model, seed, which=lambda name: True):
    """Give the GPT's modules whose names pass `which` their initial weights by the model's own rule, each
    from a generator seeded by seed and its name: the same weights whole in one process or block by block
    under FSDP. Parameters on the meta device get CPU memory first (tied ones stay tied), as do the RoPE tables."""
    materialised = {}
    for name, module in model.named_modules():
        if not which(name) or not any(p is not None for p in module._parameters.values()):
            continue
        for key, p in module._parameters.items():
            if p is not None and p.is_meta:
                module._parameters[key] = materialised.setdefault(
                    p, nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            module.reset_parameters()
            model._init_weights(module)
    if getattr(model, "rope_cos", None) is not None and model.rope_cos.is_meta:
        model.rope_cos, model.rope_sin = rope_tables(model.config, model.config.block_size)


def place_model(model, dist, parallelism, dtype, cpu_offload=False, seed=None):
    """Put the model where it trains: sharded over the processes (FSDP), or whole on this process's
    device. A model built on the meta device (a new run's) gets its initial weights here from seed."""
    on_meta = any(p.is_meta for p in model.parameters())
    if parallelism == "fsdp" and (dist.world_size > 1 or cpu_offload):
        shard_model(model, model.blocks, None, dtype, cpu_offload,
                    init=(lambda which: init_weights(model, seed, which)) if on_meta else None)
    else:
        if on_meta:
            init_weights(model, seed)
        model.to(dist.device)


def shard_model(root, blocks, mesh, dtype, cpu_offload, init=None):
    """FSDP2 over mesh (None: every process): each block on its own, so only one block's full parameters exist
    at a time, then the root; compute in dtype, gradients reduced in fp32, with cpu_offload the shards and
    AdamW's state in CPU memory. init(which) gives a meta model's weights block by block, before each is sharded."""
    precision = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    # Pinned host memory lets the copies to the GPU run asynchronously; without a GPU there is none to pin.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    present = [(i, block) for i, block in enumerate(blocks) if block is not None]  # None: another stage's layer
    for i, block in present:
        if init is not None:
            init(lambda name: name.startswith(f"blocks.{i}."))
        # The last block's parameters are the first the backward pass needs: freeing them after its
        # forward would only gather them again at once.
        fully_shard(block, mesh=mesh, mp_policy=precision, offload_policy=offload,
                    reshard_after_forward=block is not present[-1][1])
    if init is not None:
        init(lambda name: not name.startswith("blocks."))
    fully_shard(root, mesh=mesh, mp_policy=precision, offload_policy=offload)


def compile_blocks(model):
    """torch.compile each block in place, so that FSDP's hooks around the blocks stay outside the compiled
    code: a whole-model compile breaks its graph at every hook and runs GPT.forward eagerly."""
    for block in filter(None, model.blocks):  # None: a layer of another pipeline stage
        block.compile()


def wrap_model(model, dist, parallelism, compile, log=print):
    """The module the training loop calls: compiled, and under DDP wrapped to average gradients."""
    if compile:
        log("compiling the model (the first steps are slow)...")
        if isinstance(model, FSDPModule):
            compile_blocks(model)
        else:
            model = torch.compile(model)
    if parallelism == "ddp" and dist.world_size > 1:
        # Gradients live in DDP's all-reduce buckets (no copy in and out); the only buffers are the
        # RoPE tables, which never change, so nothing needs broadcasting before each forward.
        model = DDP(model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None,
                    gradient_as_bucket_view=True, broadcast_buffers=False)
    return model


@torch.no_grad()
def sum_over_batches(model, batches, sums_of, dist):
    """The sum over batches of sums_of(batch) (a tensor), in eval mode, the batches dealt out to the processes.
    Each runs as many, since under FSDP a forward is a collective: the last round's extras do not count."""
    was_training = model.training
    model.eval()
    rounds = range(dist.rank, dist.world_size * math.ceil(len(batches) / dist.world_size), dist.world_size)
    sums = [sums_of(batches[i % len(batches)]) for i in rounds]
    total = sum((s for i, s in zip(rounds, sums) if i < len(batches)), torch.zeros_like(sums[0]))
    model.train(was_training)
    return all_reduce_sum(total, dist.world_size)


@torch.no_grad()
def estimate_loss(model, bins_by_split, eval_iters, batch_size, device, autocast, seed, dist, pipeline=None):
    """Mean loss per split over eval_iters batches, the same at every call (seeded by split and index), so that
    successive evaluations differ only by the model. They are dealt out as sum_over_batches deals its batches,
    under pipelining to the replicas, as many at a time as the schedule has micro-batches."""
    rank, replicas = (dist.rank, dist.world_size) if pipeline is None else (pipeline.data_rank, pipeline.data_parallel)
    per_call = 1 if pipeline is None else pipeline.microbatches
    was_training = model.training
    model.eval()
    losses = {}
    for split_index, (split, bins) in enumerate(bins_by_split.items()):
        total = torch.zeros((), device=device)
        indices = range(rank, replicas * per_call * math.ceil(eval_iters / (replicas * per_call)), replicas)
        for group in (indices[start : start + per_call] for start in range(0, len(indices), per_call)):
            x, y = bins.sample_many(batch_size, [(seed, 1, split_index, i % eval_iters) for i in group], device)
            with autocast:
                batch_losses = model(x, y)[1][None] if pipeline is None else pipeline.run(x, y, backward=False)
            if pipeline is None or pipeline.is_last:  # under pipelining, the other stages add nothing
                total += batch_losses.float()[: sum(i < eval_iters for i in group)].sum()  # the extras come last
        losses[split] = all_reduce_sum(total, dist.world_size).item() / eval_iters
    model.train(was_training)
    return losses


def all_reduce_sum(tensor, world_size):
    if world_size > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
