"""
Plan a training run before paying for it: the model a compute budget buys, and what a training
config costs in FLOPs, time and memory per GPU.

    python plan.py --flops=1e21                                   # compute-optimal model for a budget
    python plan.py --gpu=H100 --num_gpus=8 --hours=24 --mfu=0.4   # the same, the budget in GPU hours
    python plan.py config/train_gpt2.py --gpu=H100 --num_gpus=8   # cost and memory of a training config
    python plan.py config/quickstart.py --n_layer=8 --json        # any train.py key; one JSON object

plan.py's own options are listed in OPTIONS below; every other key is train.py's, read exactly as
train.py reads it: train.py's defaults (its source up to `config = configure(globals())`), then
config files, then --key=value. The vocabulary size comes from data_root/dataset/meta.json, or is
GPT-2's 50304 (padded) when the data is not prepared yet. Runs nothing and writes nothing: the
model is built on the 'meta' device (shapes, no storage), so counting its parameters costs nothing.

Compute-optimal size (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", the
Chinchilla paper). Training costs C = 6*N*D FLOPs for N parameters and D tokens (2N per token
forward, 4N backward; Kaplan et al. 2020), and for a given C the lowest loss comes from growing N and
D together at about D = 20*N (Chinchilla: 70B parameters, 1.4T tokens). So C = 120*N^2:
    N = sqrt(C / 120),  D = 20 * N
N counts every parameter, embeddings included, as the paper does and as train.py prints. A config
between 10 and 40 tokens per parameter is close enough (N within sqrt(2) of the optimum for its
FLOPs, where the IsoFLOP curves are flat); below, the same FLOPs give a lower loss with a smaller
model on more tokens; above, with a bigger one (fine on purpose: a small model is cheaper to run).
A budget in time: C = peak bf16 FLOP/s (model.py's PEAK_BF16_FLOPS) * num_gpus * seconds * mfu.

The shape for N: the modern defaults of train.py (or the config's style), head size 64 below
n_embd 1024 and 128 from there (GPT-2, Llama), n_embd a multiple of it, aspect ratio n_embd/n_layer
from 64 to 128 (GPT-2 124M has 64, Llama-2 7B 128; Kaplan et al. found loss nearly flat across
this range). Of the shapes whose parameter count (exact, from model.py) is within 2% of N, the one
with aspect ratio nearest 96; if none is, the nearest count. block_size stays the config's.

Cost of a config. FLOPs per token: model.flops_per_token(block_size), 6*N_non-embedding plus
attention's 12*n_layer*n_embd*block_size (PaLM, appendix B). Total: that * total_batch_tokens *
max_iters. Time: total / (num_gpus * peak * mfu); activation checkpointing runs each block's forward
twice, 8N instead of 6N per token, so 4/3 of that.

Memory per GPU, at the peak (the top of a micro-step's backward), in eager mode (torch.compile
usually keeps less). P: parameters as stored (vocabulary padding included); P_block: one block's;
P_root = P - n_layer*P_block (embeddings, final norm, head); W: num_gpus, the world size; S = W
under FSDP, 1 under DDP; h = n_embd, a = n_head, kv = n_kv_head*head_dim, f = ffn_hidden,
V = the padded vocabulary; e = 2 bytes under bf16/fp16 autocast, 4 in float32.
- weights 4P/S, gradients 4P/S, AdamW's two moments 8P/S: all fp32 (autocast computes in 16 bits
  but keeps the fp32 weights as the master copy); the fused AdamW kernel needs no temporaries.
- communication: DDP (W > 1) all-reduces the gradients from buckets of its own, one more copy: 4P.
  FSDP (W > 1; train.py shards each block, then the root, with 16-bit compute parameters) gathers
  the root's parameters (embeddings, head) for the whole step and two blocks' at a time (the one
  computing, the next prefetched), and holds one unit's full gradient, plus its fp32 copy for the
  reduce-scatter: e*(P_root + 2*P_block) + (e + 4)*max(P_root, P_block).
- 16-bit weight copies, DDP or one GPU: autocast casts each weight once per forward and the matmul
  keeps the copy for its backward: 2*(n_layer*P_block + V*h); with checkpointing, one block's:
  2*(P_block + V*h). FSDP's gathered parameters are already 16-bit: none.
- activations, bytes per token per block, counting what each op of model.py's Block saves for
  backward (checked with torch.autograd.graph.saved_tensors_hooks; SDPA/flash stores no a*s*s
  score matrix):
      8h          the fp32 residual stream at the inputs of the two norms (the embedding is fp32,
                  so the stream is; layer_norm and CUDA's fused rms_norm keep just their input,
                  the CPU's composite rms_norm its output too)
      e*3h        the 16-bit inputs of c_attn and c_fc, and attention's output (kept by SDPA; on
                  CUDA the input of c_proj is a view of it)
      e*(h+2kv)   c_attn's output: v is a view into it, so all of it stays alive
      e*(h+kv)    q and k after RoPE (RoPE only)
      4a          attention's log-sum-exp per head
      e*4f        SwiGLU: gate and up (2f), silu(gate) (f) and the product (f); GELU: e*2f
      4(h+kv)     QK-norm only: the fp32 inputs of the q and k norms
      2h          dropout > 0 only: the 1-byte masks of the two residual dropouts
  GPT-2 124M: 36h + 4a. Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models") count 34h + 5as for the same block all in 16 bits with dropout: their 5as
  is the stored scores, which flash attention does not keep; +4h here for the fp32 residual
  stream, -2h for no dropout masks. The modern block keeps more (SwiGLU's wider MLP, RoPE's
  copies of q and k): 45.4h at n_embd 768.
  Outside the blocks: the final norm's fp32 input and the head's input, 4h + e*h per token.
  With activation checkpointing each block keeps only its fp32 input, 4h per token, and the
  backward recomputes one block's activations at a time. Under FSDP the residual stream may be
  16-bit (the parameters are), so these are a little high there.
- logits and loss, 12*V per token: the fp32 log-probabilities cross_entropy keeps, and the two
  fp32 gradients of that shape alive at the top of the backward (train.py drops the logits
  themselves, and the fp32 copy made for the loss, once the loss is computed).
A config fits when the total is within 90% of the GPU's memory: the rest is for the CUDA context,
allocator fragmentation and the small temporaries not counted. The micro-batch to use is the
largest power of two that fits and divides the step: accumulation = total_batch_tokens /
(micro_batch * block_size * num_gpus).
"""

import json
import math
import os
import sys
from dataclasses import replace

import torch

from configurator import configure
from model import GPT, GPTConfig, peak_flops
from training import format_duration

REPO = os.path.dirname(os.path.abspath(__file__))

# plan.py's own options (--key=value); every other key is train.py's.
OPTIONS = dict(
    gpu="H100",  # a name from GPU_MEMORY_GIB; its peak FLOP/s come from model.py's PEAK_BF16_FLOPS
    num_gpus=1,  # the run's world size: the processes that split each step and, under FSDP, the state
    mfu=0.4,  # the model FLOPs utilisation assumed for time (train.py logs the real one)
    flops=0.0,  # a compute budget: plan the compute-optimal model for it
    hours=0.0,  # or a budget of hours on num_gpus x gpu at mfu
    gpu_memory_gb=0.0,  # memory per GPU in GiB; 0: from GPU_MEMORY_GIB
    json=False,  # print one JSON object instead of the report
)

# Memory per GPU in GiB (2^30 bytes), from vendor data sheets. As in model.peak_flops, the first key
# found in the name wins, so longer names come first ('GH200' before 'H200', 'A100 40GB' before 'A100').
GPU_MEMORY_GIB = {
    "H100 PCIe": 80,
    "H100 NVL": 94,
    "H100": 80,
    "GH200": 96,
    "H200": 141,
    "H800": 80,
    "B200": 180,
    "A100 40GB": 40,
    "A100": 80,
    "A800": 80,
    "A10G": 24,
    "A10": 24,
    "L40S": 48,
    "L40": 48,
    "L4": 24,
    "RTX 6000 Ada": 48,
    "A6000": 48,
    "RTX 4090": 24,
    "RTX 3090": 24,
    "MI300X": 192,
}

GIB = 2**30
FALLBACK_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64
TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022
TOKENS_PER_PARAM_BAND = (10, 40)
SHAPE_TOLERANCE = 0.02
ASPECT_RANGE, ASPECT_PREFERRED = (64, 128), 96
HEADROOM = 0.9  # plan within 90% of the GPU's memory
COMBOS = (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True))  # (parallelism, activation checkpointing)


# -----------------------------------------------------------------------------
# the config, as train.py would see it

def train_defaults():
    """train.py's defaults: its source up to `config = configure(globals())`, run in a fresh namespace."""
    path = os.path.join(REPO, "train.py")
    with open(path) as f:
        head, found, _ = f.read().partition("\nconfig = configure(globals())")
    if not found:
        raise SystemExit(f"plan error: {path} has no line 'config = configure(globals())'; "
                         "plan.py reads train.py's defaults from above it")
    namespace = {}
    exec(compile(head, path, "exec"), namespace)
    return namespace


def read_config(argv):
    """(plan.py's options, train.py's config) after argv: config files and --key=value for either."""
    argv = ["--json=True" if a == "--json" else a for a in argv]  # a bare --json, as the usage line writes it
    namespace = train_defaults()
    namespace.update(OPTIONS)  # one namespace, so a key that is neither plan.py's nor train.py's is an error
    namespace["__doc__"] = __doc__  # for --help
    config = configure(namespace, argv)
    options = {k: config.pop(k) for k in OPTIONS}
    return options, config


def vocab_size(config):
    """(vocabulary size, warning) for the config's dataset: GPT-2's, with a warning, when there is no data yet."""
    path = os.path.join(config["data_root"], config["dataset"], "meta.json")
    if not os.path.isfile(path):
        return FALLBACK_VOCAB, f"no {path}: assumed GPT-2's vocabulary, {FALLBACK_VOCAB} (padded)"
    with open(path) as f:
        return json.load(f)["vocab_size"], None


def model_config(config, vocab):
    try:
        return GPTConfig.from_dict(dict(config, vocab_size=vocab))  # GPTConfig's fields are train.py keys
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None


def gpu_spec(options, config):
    """(name, peak bf16 FLOP/s, memory in GiB) of the GPU named by --gpu; train.py's --peak_flops overrides the peak."""
    name = next((k for k in GPU_MEMORY_GIB if k.lower() in options["gpu"].lower()), None)
    peak = peak_flops(name or "", config["peak_flops"])
    memory = options["gpu_memory_gb"] or GPU_MEMORY_GIB.get(name, 0)
    if not peak or not memory:
        raise SystemExit(f"plan error: unknown GPU '{options['gpu']}'; use one of {', '.join(GPU_MEMORY_GIB)}, "
                         "or give --peak_flops and --gpu_memory_gb")
    return name or options["gpu"], peak, memory


# -----------------------------------------------------------------------------
# compute-optimal size

def chinchilla(flops):
    """(parameters, tokens) that spend flops at the lowest loss: C = 6ND and D = 20N."""
    params = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
    return params, TOKENS_PER_PARAM * params


def on_meta(c):
    """The model with shapes but no storage: free to build at any size."""
    with torch.device("meta"):
        return GPT(c)


def compute_optimal_shape(target, base):
    """The shape of the docstring's family nearest target parameters: (GPTConfig, parameters)."""
    best, n_embd = None, 0
    while True:
        n_embd += 64 if n_embd < 1024 else 128
        head_size = 64 if n_embd < 1024 else 128
        c = replace(base, n_layer=1, n_embd=n_embd, n_head=n_embd // head_size, n_kv_head=0, ffn_hidden=0)
        one = on_meta(c)
        # The count is linear in depth: the rest of the model plus n_layer identical blocks.
        per_block = sum(p.numel() for p in one.blocks[0].parameters())
        rest = one.num_params() - per_block
        depths = range(max(1, math.ceil(n_embd / ASPECT_RANGE[1])), n_embd // ASPECT_RANGE[0] + 1)
        for n_layer in depths:
            params = rest + n_layer * per_block
            error = abs(params / target - 1)
            key = (0, abs(n_embd / n_layer - ASPECT_PREFERRED)) if error <= SHAPE_TOLERANCE else (1, error)
            if best is None or key < best[0]:
                best = (key, replace(c, n_layer=n_layer))
        if rest + depths[0] * per_block > (1 + SHAPE_TOLERANCE) * target:
            break  # wider models only get bigger
    shape = best[1]
    return shape, on_meta(shape).num_params()


# -----------------------------------------------------------------------------
# cost of a config

def element_bytes(dtype):
    """Bytes per activation element: dtype 'auto' is bf16 autocast on the GPUs planned for."""
    return 4 if dtype == "float32" else 2


def activation_bytes_per_token(c, e):
    """What one Block saves for backward, bytes per token (the docstring's table)."""
    h, kv = c.n_embd, c.n_kv_head * c.head_dim
    saved = 8 * h + e * 3 * h + e * (h + 2 * kv) + 4 * c.n_head
    saved += e * (4 if c.mlp == "swiglu" else 2) * c.ffn_hidden
    if c.pos == "rope":
        saved += e * (h + kv)
    if c.qk_norm:
        saved += 4 * (h + kv)
    if c.dropout > 0:
        saved += 2 * h
    return saved


def memory_per_gpu(c, params, block_params, micro_batch, world, dtype, parallelism, checkpointing):
    """Peak bytes per GPU by term (the docstring's formulas); params and block_params as stored."""
    e = element_bytes(dtype)
    sharded = parallelism == "fsdp" and world > 1  # train.py runs FSDP on one GPU as a plain model
    shards = world if sharded else 1
    root = params - c.n_layer * block_params
    h, V, tokens = c.n_embd, c.padded_vocab_size, micro_batch * c.block_size
    if sharded:
        communication = e * (root + 2 * block_params) + (e + 4) * max(root, block_params)
        weight_copies = 0
    else:
        communication = 4 * params if world > 1 else 0
        weight_copies = 0 if e == 4 else 2 * ((1 if checkpointing else c.n_layer) * block_params + V * h)
    per_block = activation_bytes_per_token(c, e)
    if checkpointing:
        blocks = c.n_layer * 4 * h + per_block
    else:
        blocks = c.n_layer * per_block
    return {
        "weights": 4 * params / shards,
        "gradients": 4 * params / shards,
        "optimizer": 8 * params / shards,
        "communication": communication,
        "weight_copies": weight_copies,
        "activations": tokens * (blocks + 4 * h + e * h),
        "logits": tokens * V * 12,
    }


def largest_micro_batch(c, params, block_params, step_tokens, world, dtype, parallelism, checkpointing, budget):
    """The largest power-of-two micro-batch that fits budget bytes and divides the step; 0 if none."""
    best, micro = 0, 1
    while micro * c.block_size * world <= step_tokens:
        memory = memory_per_gpu(c, params, block_params, micro, world, dtype, parallelism, checkpointing)
        if sum(memory.values()) > budget:
            break
        if step_tokens % (micro * c.block_size * world) == 0:
            best = micro
        micro *= 2
    return best


def plan_config(config, options):
    """Everything plan.py reports about a training config, as a dict (numbers in FLOPs, GiB, hours)."""
    vocab, vocab_warning = vocab_size(config)
    c = model_config(config, vocab)
    gpu, peak, gpu_memory = gpu_spec(options, config)
    model = on_meta(c)
    params = model.num_params()
    stored = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.blocks[0].parameters())
    world, step_tokens = options["num_gpus"], config["total_batch_tokens"]
    warnings = [vocab_warning] if vocab_warning else []

    flops_per_token = model.flops_per_token(c.block_size)
    tokens = step_tokens * config["max_iters"]
    train_flops = flops_per_token * tokens
    tokens_per_param = tokens / params
    if not TOKENS_PER_PARAM_BAND[0] <= tokens_per_param <= TOKENS_PER_PARAM_BAND[1]:
        n, d = chinchilla(train_flops)
        side = "smaller model on more tokens" if tokens_per_param < TOKENS_PER_PARAM else "bigger model on fewer tokens"
        warnings.append(f"{tokens_per_param:.1f} tokens per parameter is far from the compute-optimal ~20 "
                        f"(Hoffmann et al. 2022): these FLOPs reach a lower loss with a {side} "
                        f"({n / 1e6:,.1f}M parameters on {d / 1e9:,.2f}B tokens)")
    recompute = 4 / 3 if config["activation_checkpointing"] else 1.0
    seconds = train_flops * recompute / (world * peak * options["mfu"])

    micro = config["batch_size"]
    if step_tokens % (micro * c.block_size * world):
        warnings.append(f"total_batch_tokens={step_tokens} is not a multiple of batch_size x block_size x num_gpus "
                        f"= {micro * c.block_size * world}, so train.py would stop; use the micro-batch above")
    memory = {}
    for parallelism, checkpointing in COMBOS:
        terms = memory_per_gpu(c, stored, block_params, micro, world, config["dtype"], parallelism, checkpointing)
        total = sum(terms.values())
        best = largest_micro_batch(c, stored, block_params, step_tokens, world, config["dtype"], parallelism,
                                   checkpointing, HEADROOM * gpu_memory * GIB)
        memory[parallelism + ("+ckpt" if checkpointing else "")] = {
            **{k: v / GIB for k, v in terms.items()},
            "total": total / GIB,
            "fits": total <= HEADROOM * gpu_memory * GIB,
            "max_micro_batch": best,
            "accumulation": step_tokens // (best * c.block_size * world) if best else 0,
        }
    return {
        "params": params,
        "non_embedding_params": model.num_params(non_embedding=True),
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
        "vocab_size": c.vocab_size,
        "flops_per_token": flops_per_token,
        "tokens": tokens,
        "train_flops": train_flops,
        "tokens_per_param": tokens_per_param,
        "gpu": gpu, "num_gpus": world, "peak_flops": peak, "mfu": options["mfu"], "gpu_memory_gib": gpu_memory,
        "tokens_per_sec": world * peak * options["mfu"] / (flops_per_token * recompute),
        "hours": seconds / 3600,
        "dtype": config["dtype"],
        "micro_batch": micro,
        "accumulation": step_tokens / (micro * c.block_size * world),  # a fraction where train.py would stop
        "run": config["parallelism"] + ("+ckpt" if config["activation_checkpointing"] else ""),
        "memory": memory,
        "warnings": warnings,
    }


def budget_flops(options, config):
    """The compute budget: --flops, or --hours on num_gpus x gpu at mfu; 0 when neither is given."""
    if options["hours"]:
        _, peak, _ = gpu_spec(options, config)
        return peak * options["num_gpus"] * options["hours"] * 3600 * options["mfu"]
    return options["flops"]


def plan_budget(flops, config, options):
    """The compute-optimal model for flops, its shape, and the report of training it on config's settings."""
    params = round(chinchilla(flops)[0])
    tokens = TOKENS_PER_PARAM * params
    shape, shape_params = compute_optimal_shape(params, model_config(config, vocab_size(config)[0]))
    keys = dict(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, n_kv_head=0, ffn_hidden=0,
                max_iters=math.ceil(tokens / config["total_batch_tokens"]))
    changed = {k: v for k, v in keys.items() if config[k] != v}
    return {
        "flops": flops,
        "params": params,
        "tokens": tokens,
        "shape": dict(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, block_size=shape.block_size),
        "shape_params": shape_params,
        "train_keys": changed,
        "training": plan_config(dict(config, **keys), options),
    }


# -----------------------------------------------------------------------------
# printing

def print_config_report(r):
    print(f"model     {r['params'] / 1e6:,.2f}M parameters ({r['non_embedding_params'] / 1e6:,.2f}M without "
          f"embeddings): {r['n_layer']} layers x {r['n_embd']}, {r['n_head']} heads, block_size {r['block_size']}, "
          f"vocabulary {r['vocab_size']}")
    print(f"compute   {r['flops_per_token'] / 1e9:,.3f} GFLOPs per token x {r['tokens'] / 1e9:,.3f}B tokens "
          f"= {r['train_flops']:.3g} FLOPs; {r['tokens_per_param']:.1f} tokens per parameter")
    print(f"time      {r['num_gpus']} x {r['gpu']} ({r['peak_flops'] / 1e12:,.0f} TFLOP/s bf16) at "
          f"{100 * r['mfu']:.0f}% MFU: {r['tokens_per_sec']:,.0f} tokens/s, {format_duration(3600 * r['hours'])}"
          + (" (with checkpointing's recompute)" if r["run"].endswith("+ckpt") else ""))
    precision = "float32" if r["dtype"] == "float32" else f"{r['dtype'].replace('auto', 'bfloat16')} autocast"
    print(f"memory    GiB per GPU at micro-batch {r['micro_batch']} x {r['block_size']} tokens, {precision}, "
          f"{r['num_gpus']} GPU(s); a {r['gpu']} has {r['gpu_memory_gib']:g}, plan within {HEADROOM:.0%}")
    names = list(r["memory"])
    print(f"  {'':<24}" + "".join(f"{n + ('*' if n == r['run'] else ''):>12}" for n in names))
    rows = [("weights (fp32)", "weights"), ("gradients (fp32)", "gradients"), ("AdamW moments (fp32)", "optimizer"),
            ("DDP buckets/FSDP gather", "communication"), ("16-bit weight copies", "weight_copies"),
            ("activations", "activations"), ("logits and loss", "logits"), ("total", "total")]
    for label, key in rows:
        print(f"  {label:<24}" + "".join(f"{r['memory'][n][key]:>12.2f}" for n in names))
    print(f"  {'fits':<24}" + "".join(f"{'yes' if r['memory'][n]['fits'] else 'no':>12}" for n in names))
    print(f"  {'max micro-batch':<24}" + "".join(f"{r['memory'][n]['max_micro_batch'] or '-':>12}" for n in names))
    print(f"  {'accumulation':<24}" + "".join(f"{r['memory'][n]['accumulation'] or '-':>12}" for n in names))
    run = r["memory"][r["run"]]
    if run["max_micro_batch"]:
        print(f"use       --batch_size={run['max_micro_batch']} (accumulation {run['accumulation']}) for the "
              f"config's {r['run']} (*); the config has batch_size={r['micro_batch']} (accumulation {r['accumulation']:g})")
    else:
        print(f"use       nothing fits with the config's {r['run']} (*) even at micro-batch 1: try "
              "--parallelism=fsdp, --activation_checkpointing=True, more GPUs or a smaller block_size")
    for warning in r["warnings"]:
        print(f"warning: {warning}")


def print_budget_report(b, options, train_args):
    how = (f" ({options['num_gpus']} x {b['training']['gpu']} for {options['hours']:g} h at {100 * options['mfu']:.0f}% MFU)"
           if options["hours"] else "")
    print(f"budget    {b['flops']:.3g} FLOPs{how}")
    print(f"optimal   {b['params'] / 1e6:,.1f}M parameters on {b['tokens'] / 1e9:,.2f}B tokens "
          f"(Hoffmann et al. 2022: C = 6ND, D = 20N, so N = sqrt(C/120))")
    s = b["shape"]
    print(f"shape     n_layer={s['n_layer']} n_head={s['n_head']} n_embd={s['n_embd']} block_size={s['block_size']}: "
          f"{b['shape_params'] / 1e6:,.1f}M parameters ({100 * (b['shape_params'] / b['params'] - 1):+.1f}%); "
          f"head size {s['n_embd'] // s['n_head']}, n_embd/n_layer in 64..128, nearest 96")
    print("train     python train.py " + " ".join(train_args + [f"--{k}={v}" for k, v in b["train_keys"].items()]))
    print_config_report(b["training"])


if __name__ == "__main__":
    options, config = read_config(sys.argv[1:])
    flops = budget_flops(options, config)
    report = plan_budget(flops, config, options) if flops else plan_config(config, options)
    if options["json"]:
        print(json.dumps(report, indent=1))
    elif flops:
        train_args = [a for a in sys.argv[1:] if a[2:].partition("=")[0] not in OPTIONS]
        print_budget_report(report, options, train_args)
    else:
        print_config_report(report)
