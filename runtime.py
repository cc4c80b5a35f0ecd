"""
Device, precision, distributed and random-state setup shared by every stage script.

    dist = setup_distributed("auto")             # rank, world size and device, from torchrun's variables
    dtype = pick_dtype(dist.device, "auto")      # bfloat16 where the GPU has it, else float16 / float32
    autocast = autocast_context(dist.device, dtype)   # `with autocast:` around forward passes
    print(describe_machine(machine_facts(dist.device)))   # what a timing depends on, to print beside it

Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE) a script is one process per GPU or CPU worker, meeting the
others through NCCL or gloo; run plainly, it is rank 0 of 1.
"""

import os
import platform
import random
import time
from dataclasses import dataclass
from contextlib import nullcontext

import numpy as np
import torch


def pick_device(device="auto"):
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"device error: device='{device}' but no CUDA GPU is visible; use --device=cpu or auto")
        return device
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


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
    """Join the process group when launched by torchrun, and pick this process's device. cpu_offload (FSDP's):
    a group even for one process, and gloo beside NCCL for the offloaded shards' collectives on CPU tensors."""
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
    backend = ("cuda:nccl,cpu:gloo" if cpu_offload else "nccl") if device.startswith("cuda") else "gloo"
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
    """The compute precision: bf16 on GPUs that have it, fp16 on older GPUs, else float32 (a CPU's bfloat16 is
    mostly emulated, ~25x slower, and not faster even with AVX512-BF16: docs/train.md; ask for it to try it)."""
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


def cpu_model_name():
    try:
        with open("/proc/cpuinfo") as f:  # Linux
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def matmul_gflops(dtype, size=256, seconds=0.05):
    """GFLOP/s of one CPU core's size x size matrix products in dtype: the fastest of those run in
    `seconds`, on one thread, so that a busy machine's interruptions and a late thread do not count."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b  # the first call sets up the kernel
        fastest, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            began = time.perf_counter()
            a @ b
            fastest = min(fastest, time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / fastest / 1e9


def machine_facts(device="cpu"):
    """What a speed measured on this machine depends on, in a fraction of a second. A CPU's bfloat16 matmuls
    are native when at least half as fast as float32 ones (AMX, AVX512-BF16); emulated, ~25x slower."""
    float32, bfloat16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    return {"torch": torch.__version__, "cpu": cpu_model_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "cpu_float32_gflops": round(float32, 1),
            "cpu_bfloat16_gflops": round(bfloat16, 1), "cpu_bfloat16_native": bfloat16 >= 0.5 * float32,
            "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
            "load_average": round(os.getloadavg()[0], 2)}


def describe_machine(facts):
    """machine_facts as one line, to print at the top of a table of timings."""
    bf16 = "native" if facts["cpu_bfloat16_native"] else "emulated"
    return (f"machine: {facts['cpu']} ({facts['cpu_capability']}, {facts['threads']} threads; bfloat16 matmul {bf16}: "
            f"{facts['cpu_bfloat16_gflops']:g} vs {facts['cpu_float32_gflops']:g} GFLOP/s float32 per core), "
            f"GPU {facts['gpu'] or 'none'}, torch {facts['torch']}, load average {facts['load_average']:g}")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# What each GPU can do, by a name found in torch.cuda.get_device_name(): peak dense bf16 tensor FLOP/s
# (no sparsity), for MFU and plan.py's times, and memory in GiB (2^30 bytes), for plan.py; from vendor
# data sheets. The first key found in a name wins, so longer names come first ('GH200' before 'H200').
GPUS = {
    "H100 PCIe": (756e12, 80), "H100 NVL": (835e12, 94), "H100": (989e12, 80),  # the last: SXM
    "GH200": (989e12, 96), "H200": (989e12, 141), "H800": (989e12, 80), "B200": (2250e12, 180),
    "A100 40GB": (312e12, 40), "A100": (312e12, 80), "A800": (312e12, 80), "A10G": (70e12, 24), "A10": (125e12, 24),
    "L40S": (362e12, 48), "L40": (181e12, 48), "L4": (121e12, 24),
    "RTX 6000 Ada": (364e12, 48), "A6000": (155e12, 48), "RTX 4090": (165e12, 24), "RTX 3090": (71e12, 24),
    "MI300X": (1307e12, 192),
}


def gpu_named(name):
    """The key of GPUS found in name (a device name, or a user's 'h100'), or None."""
    return next((key for key in GPUS if key.lower() in name.lower()), None)


def peak_flops(device_name, override=0.0):
    """Peak bf16 FLOP/s of a GPU by name, or override if given; 0.0 when unknown (MFU is then not shown)."""
    return override or GPUS.get(gpu_named(device_name), (0.0,))[0]
