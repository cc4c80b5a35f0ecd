"""
Device, precision, distributed and random-state setup shared by every stage script.

    dist = setup_distributed("auto")             # rank, world size and device, from torchrun's variables
    dtype = pick_dtype(dist.device, "auto")      # bfloat16 where the GPU has it, else float16 / float32
    autocast = autocast_context(dist.device, dtype)   # `with autocast:` around forward passes

Run under torchrun, a script gets one process per GPU (or CPU worker); torchrun sets
RANK, LOCAL_RANK and WORLD_SIZE, and the processes meet through torch.distributed
(NCCL between GPUs, gloo between CPU processes). Run plainly, it is rank 0 of 1.
"""

import os
import random
from dataclasses import dataclass
from contextlib import nullcontext

import numpy as np
import torch


def pick_device(device="auto"):
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"device error: device='{device}' but no CUDA GPU is visible; use --device=cpu or auto")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class Distributed:
    rank: int  # this process among all of them
    local_rank: int  # this process among those on its machine: picks its GPU
    world_size: int
    device: str

    @property
    def is_main(self):
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    def log(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs)


def setup_distributed(device="auto", cpu_offload=False):
    """Join the process group when launched by torchrun, and pick this process's device.
    cpu_offload (FSDP's): a process group even for a single process, since FSDP needs one, and on
    GPUs gloo beside NCCL, since the offloaded shards' collectives (the gradient norm) run on CPU tensors."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1 and not cpu_offload:
        return Distributed(0, 0, 1, pick_device(device))
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    elif device == "mps":
        raise SystemExit("device error: torchrun with several processes needs CUDA or CPU; use --device=cpu")
    backend = "gloo"
    if device.startswith("cuda"):
        backend = "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"
    if not dist.is_initialized():
        # torchrun keeps one key-value store across restarts (--max-restarts), so the addresses that
        # the processes of the killed attempt published are still in it; without a prefix per
        # attempt, restarted processes would try to connect to those dead ones.
        if "WORLD_SIZE" in os.environ:
            store, _, _ = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        else:
            store = dist.HashStore()  # one process, not launched by torchrun: nobody else to meet
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                device_id=torch.device(device) if device.startswith("cuda") else None)
    return Distributed(rank, local_rank, world_size, device)


def teardown_distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Leave together: a process that closed its gloo connections while a peer was still
        # writing the last checkpoint sometimes made the peer abort at exit (seen 3 in 24 runs).
        dist.barrier()
        dist.destroy_process_group()


def pick_dtype(device, dtype="auto"):
    """The compute precision: bf16 on GPUs that have it, fp16 on older GPUs, else float32.

    On CPUs bf16 autocast works but is slower than float32 unless the CPU has bf16
    matrix units, so 'auto' keeps float32 there; ask for bfloat16 explicitly to try it.
    """
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"config error: dtype='{dtype}' is not one of auto, float32, bfloat16, float16")
    return dtype


def autocast_context(device, dtype):
    """Mixed precision for forward passes: weights stay float32, matmuls run in dtype."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def device_name(device):
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
