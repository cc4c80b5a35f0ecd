"""
Plan a training run before paying for it: the model a compute budget buys, and what a training
config costs in FLOPs, time and memory per GPU.

    python plan.py --flops=1e21                                   # compute-optimal model for a budget
    python plan.py --gpu=H100 --num_gpus=8 --hours=24 --mfu=0.4   # the same, the budget in GPU hours
    python plan.py --flops=1e21 --law=kaplan                      # the 2020 advice instead (--law=both: side by side)
    python plan.py config/train_gpt2.py --gpu=H100 --num_gpus=8   # cost and memory of a training config
    python plan.py config/quickstart.py --n_layer=8 --json        # any train.py key; one JSON object
    python plan.py --num_gpus=8 --pipeline_stages=4 --parallelism=fsdp --cpu_offload=True  # per stage; CPU and PCIe

plan.py's own options are in OPTIONS below; every other key is train.py's, read exactly as train.py reads
it (defaults, config files, --key=value, checks). Runs nothing and writes nothing: the model is built on the
'meta' device. The vocabulary it assumes, and how each number is found: docs/planning.md.
"""

import bisect
import functools
import itertools
import json
import math
import os
import sys
from dataclasses import replace

import torch

from configurator import configure, defaults_only
from model import GPT, GPTConfig
from parallel import check_layout
from pipeline import pipeline_layers
from runlog import format_duration
from runtime import GPUS, gpu_named

OPTIONS = dict(
    gpu="H100",  # a GPU of runtime.GPUS, which gives its peak FLOP/s and its memory
    num_gpus=1,  # the run's world size: the processes that split each step and, under FSDP, the state
    mfu=0.4,  # the model FLOPs utilisation assumed for time (train.py logs the real one)
    flops=0.0,  # a compute budget: plan the compute-optimal model for it
    hours=0.0,  # or a budget of hours on num_gpus x gpu at mfu
    law="chinchilla",  # the budget's split: 'chinchilla' (2022), 'kaplan' (2020) or 'both', a table of the two
    gpu_memory_gb=0.0,  # memory per GPU in GiB; 0: from runtime.GPUS
    pcie_gb_per_s=25.0,  # host<->GPU bandwidth assumed for cpu_offload's copies: ~25 for PCIe Gen4 x16, ~50 for Gen5
    json=False,  # print one JSON object instead of the report
)

GIB = 2**30
FALLBACK_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64
TOKENS_PER_PARAM, TOKENS_PER_PARAM_BAND = 20, (10, 40)  # Hoffmann et al. 2022; a config outside the band is warned
PF_DAY = 1e15 * 24 * 3600  # FLOPs in a petaflop/s-day, Kaplan et al.'s unit of compute
KAPLAN_PARAMS_AT_PF_DAY, KAPLAN_EXPONENT = 1.3e9, 0.73  # Kaplan et al. 2020, eq. 6.1 and Figure 14
BUDGET_RANGE = tuple(float(f"1e{e}") for e in range(18, 25))  # the budgets of --law=both's table
FLOPS_RANGE = (1e12, 1e27)  # a second of a laptop; ten times the largest training runs so far
MAX_LAYERS = 2000  # deeper than any transformer trained; the meta model is built layer by layer
SHAPE_TOLERANCE, ASPECT_RANGE, ASPECT_PREFERRED = 0.02, (64, 128), 96  # a shape's count and n_embd/n_layer
HEADROOM = 0.9  # plan within 90% of the GPU's memory
COMBOS = (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True))  # (parallelism, activation checkpointing)


# -----------------------------------------------------------------------------
# the config, as train.py would see it

def read_config(argv):
    """(plan.py's options, train.py's config) after argv: config files and --key=value for either."""
    argv = ["--json=True" if a == "--json" else a for a in argv]  # a bare --json, as the usage line writes it
    with defaults_only() as namespace:  # train.py's config defaults: its configure(globals()) ends the import
        import train  # noqa: F401
    default_dataset = namespace["dataset"]
    namespace.update(OPTIONS)  # one namespace, so a key that is neither plan.py's nor train.py's is an error
    namespace["__doc__"] = __doc__  # for --help
    config = configure(namespace, argv)  # which checks each value against its range
    options = {k: config.pop(k) for k in OPTIONS}
    # the combinations plan.py cannot plan with, before any model is built
    if config["n_layer"] > MAX_LAYERS:
        raise SystemExit(f"config error: n_layer={config['n_layer']} is deeper than any transformer trained; "
                         f"plan.py plans up to {MAX_LAYERS} layers")
    if options["flops"] and options["hours"]:
        raise SystemExit("config error: give the budget as --flops or as --hours, not both")
    if options["law"] == "kaplan" and not (options["flops"] or options["hours"]):
        raise SystemExit("config error: --law=kaplan plans a budget; give --flops or --hours (or --law=both for "
                         "the table of budgets)")
    # A budget plans for GPT-2's vocabulary unless a dataset is named (a local one may be a toy's).
    options["dataset_given"] = (any(a.startswith("--dataset=") for a in argv)
                                or config["dataset"] != default_dataset)
    return options, config


def vocab_size(config):
    """(vocabulary size, warning) for the config's dataset: GPT-2's, with a warning, when there is no data yet."""
    path = os.path.join(config["data_root"], config["dataset"], "meta.json")
    if not os.path.isfile(path):
        return FALLBACK_VOCAB, f"no {path}: assumed GPT-2's vocabulary, {FALLBACK_VOCAB} (padded)"
    try:
        with open(path) as f:
            vocab = json.load(f)["vocab_size"]
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"data error: {path} is not a meta.json with a vocab_size; prepare the dataset again "
                         "with prepare.py") from None
    if not isinstance(vocab, int) or vocab < 1:
        raise SystemExit(f"data error: {path} has vocab_size={vocab!r}; prepare the dataset again with prepare.py")
    return vocab, None


def model_config(config, vocab):
    try:
        return GPTConfig.from_dict(dict(config, vocab_size=vocab))  # GPTConfig's fields are train.py keys
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None


def gpu_spec(options, config):
    """(name, peak bf16 FLOP/s, memory in GiB) of the GPU named by --gpu; train.py's --peak_flops overrides the peak."""
    name = gpu_named(options["gpu"])
    peak, memory = GPUS.get(name, (0, 0))
    peak, memory = config["peak_flops"] or peak, options["gpu_memory_gb"] or memory
    if not peak or not memory:
        raise SystemExit(f"plan error: unknown GPU '{options['gpu']}'; use one of {', '.join(GPUS)}, "
                         "or give --peak_flops and --gpu_memory_gb")
    return name or options["gpu"], peak, memory


# -----------------------------------------------------------------------------
# compute-optimal size (Hoffmann et al. 2022; before it, Kaplan et al. 2020): docs/planning.md

def chinchilla(flops):
    """(parameters, tokens) that spend flops at the lowest loss: C = 6ND and D = 20N."""
    params = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
    return params, TOKENS_PER_PARAM * params


def kaplan(flops):
    """(non-embedding parameters, tokens) loss-optimal for flops: N = 1.3e9 (C / PF-day)^0.73, D = C/6N."""
    params = KAPLAN_PARAMS_AT_PF_DAY * (flops / PF_DAY) ** KAPLAN_EXPONENT
    return params, flops / (6 * params)


def on_meta(c):
    """The model with shapes but no storage: free to build at any size."""
    with torch.device("meta"):
        return GPT(c)


def compute_optimal_shape(target, base, non_embedding=False):
    """The shape nearest target parameters (without the embeddings when non_embedding): (GPTConfig,
    parameters so counted). Of the shapes of base's style within 2% of target, the one with n_embd/n_layer
    nearest 96; if none is, the nearest count. The family and the search: docs/planning.md."""
    @functools.cache
    def count(i):  # (GPTConfig of one layer, the count without its blocks, parameters per block)
        n_embd = 64 * i if i <= 16 else 1024 + 128 * (i - 16)  # 64, 128, ..., 1024, then steps of 128
        c = replace(base, n_layer=1, n_embd=n_embd, n_head=n_embd // (64 if n_embd < 1024 else 128), n_kv_head=0,
                    ffn_hidden=0)
        one = on_meta(c)
        per_block = sum(p.numel() for p in one.blocks[0].parameters())
        return c, one.num_params(non_embedding=non_embedding) - per_block, per_block

    def wide_enough(i):  # the aspect ratio n_embd/n_layer at the target count reaches the preferred one
        c, rest, per_block = count(i)
        return c.n_embd * per_block >= ASPECT_PREFERRED * (target - rest)

    high = 1
    while not wide_enough(high):
        high *= 2
    low = bisect.bisect_left(range(high + 1), True, lo=high // 2 + 1, key=wide_enough)  # the narrowest wide enough

    best = None  # (key, width index, n_layer); key (0, aspect distance) within tolerance, else (1, error)

    def consider(i):
        nonlocal best
        c, rest, per_block = count(i)
        shallowest, deepest = max(1, math.ceil(c.n_embd / ASPECT_RANGE[1])), max(1, c.n_embd // ASPECT_RANGE[0])
        ideal = (target - rest) / per_block
        depths = {math.floor(ideal), math.ceil(ideal), c.n_embd // ASPECT_PREFERRED, -(-c.n_embd // ASPECT_PREFERRED),
                  math.ceil(((1 - SHAPE_TOLERANCE) * target - rest) / per_block),
                  math.floor(((1 + SHAPE_TOLERANCE) * target - rest) / per_block)}
        for n_layer in {min(max(d, shallowest), deepest) for d in depths}:
            error = abs((rest + n_layer * per_block) / target - 1)
            key = (0, abs(c.n_embd / n_layer - ASPECT_PREFERRED)) if error <= SHAPE_TOLERANCE else (1, error)
            if best is None or (key, i, n_layer) < best:  # ties: the narrower (width grows with i), then shallower
                best = (key, i, n_layer)

    def hopeless(i, upward):  # no width from i on, in that direction, can beat the best shape found
        c, rest, per_block = count(i)
        if best[0][0] == 1:  # nothing within tolerance yet: upward, stop past the first width too big at any depth
            previous, rest_before, per_block_before = count(i - 1) if upward else count(i)
            shallowest = rest_before + max(1, math.ceil(previous.n_embd / ASPECT_RANGE[1])) * per_block_before
            return upward and shallowest > (1 + SHAPE_TOLERANCE) * target
        # The aspect ratios a width can reach within tolerance lie between n_embd/n_layer at the two ends
        # of the tolerance, an interval that moves up with the width.
        if upward:
            room = (1 + SHAPE_TOLERANCE) * target - rest
            return room <= 0 or c.n_embd * per_block / room - ASPECT_PREFERRED > best[0][1]
        room = (1 - SHAPE_TOLERANCE) * target - rest
        return room > 0 and ASPECT_PREFERRED - c.n_embd * per_block / room > best[0][1]

    consider(low)
    for i in itertools.takewhile(lambda i: not hopeless(i, upward=True), itertools.count(low + 1)):
        consider(i)
    for i in itertools.takewhile(lambda i: not hopeless(i, upward=False), range(low - 1, 0, -1)):
        consider(i)
    _, i, n_layer = best
    c, rest, per_block = count(i)
    return replace(c, n_layer=n_layer), rest + n_layer * per_block


# -----------------------------------------------------------------------------
# cost of a config: FLOPs, time, and memory per GPU term by term (the formulas: docs/planning.md)

def activation_bytes_per_token(c, e):
    """What one Block saves for backward, bytes per token with e bytes per 16-bit element, counted op by
    op in model.py's Block (the table of terms: docs/planning.md)."""
    h, kv = c.n_embd, c.n_kv_head * c.head_dim
    saved = 8 * h + e * 3 * h + e * (h + 2 * kv) + 4 * c.n_head + e * (4 if c.mlp == "swiglu" else 2) * c.ffn_hidden
    return (saved + (e * (h + kv) if c.pos == "rope" else 0) + (4 * (h + kv) if c.qk_norm else 0)
            + (2 * h if c.dropout > 0 else 0))


def stage_parameters(c, params, block_params, stages):
    """(blocks, parameters, parameters outside the blocks) of each pipeline stage, as stored: the token
    embedding (and learned positions) on the first, the final norm and head on the last."""
    embedding = c.padded_vocab_size * c.n_embd + (c.block_size * c.n_embd if c.pos == "learned" else 0)
    head = params - c.n_layer * block_params - embedding  # just the final norm when tied (then one stage)
    roots = [(embedding if s == 0 else 0) + (head if s == stages - 1 else 0) for s in range(stages)]
    return [(len(layers), len(layers) * block_params + root, root)
            for layers, root in zip(pipeline_layers(c.n_layer, stages), roots)]


def pipeline_bubble(stages, micro_batches):
    """The fraction of a step a pipeline stage idles, GPipe's and 1F1B's alike; 0 for one stage."""
    return (stages - 1) / (micro_batches + stages - 1)


def micro_batches_held(stage, stages, schedule, micro_batches):
    """The micro-batches whose activations a stage holds at its peak: all m under GPipe, min(m, p - s) under 1F1B."""
    if stages == 1:
        return 1  # train.py's own loop: each micro-step's backward follows its forward
    return micro_batches if schedule == "gpipe" else min(micro_batches, stages - stage)


def memory_per_stage(c, params, block_params, micro_batch, world, dtype, parallelism, checkpointing,
                     stages=1, schedule="1f1b", micro_batches=1, cpu_offload=False):
    """Peak GPU bytes by term on each pipeline stage; params and block_params as stored. With one stage,
    the whole model; cpu_offload applies to the FSDP runs only."""
    e = 4 if dtype == "float32" else 2  # bytes per activation element: 'auto' is bf16 autocast on the GPUs planned for
    dp = world // stages
    offload = cpu_offload and parallelism == "fsdp"
    # train.py runs FSDP on one process per stage as a plain model, unless it offloads
    fsdp = parallelism == "fsdp" and (dp > 1 or offload)
    h, V, tokens = c.n_embd, c.padded_vocab_size, micro_batch * c.block_size
    per_block = activation_bytes_per_token(c, e)
    memory = []
    for s, (blocks, stage_params, root) in enumerate(stage_parameters(c, params, block_params, stages)):
        last = s == stages - 1
        if fsdp and stages > 1:
            communication = (e + 4) * stage_params  # the schedule keeps every unit gathered and its gradient whole
        elif fsdp:
            communication = e * (root + min(2, blocks) * block_params) + (e + 4) * max(root, block_params)
        else:
            communication = 4 * stage_params if dp > 1 and stages == 1 else 0  # a pipeline all-reduces in place
        # autocast's (none under FSDP or in fp32): one block's under checkpointing without pipelining; a
        # pipeline's autocast cache keeps them all
        cast_blocks = 1 if checkpointing and stages == 1 else blocks
        weight_copies = 0 if fsdp or e == 4 else 2 * (cast_blocks * block_params + (V * h if last else 0))
        on_gpu = 0 if offload else stage_params / (dp if fsdp else 1)  # the parameters whose fp32 state this GPU keeps
        held = micro_batches_held(s, stages, schedule, micro_batches)
        # Per token of a held micro-batch: its blocks' activations and the stage's fp32 output (the last
        # stage's is the final norm's input, and the head's 16-bit input besides).
        per_token = blocks * (4 * h if checkpointing else per_block) + 4 * h + (e * h if last else 0)
        recomputed = per_block if checkpointing else 0  # one block of one micro-batch at a time
        # on the last stage; a pipeline's schedule keeps the logits, the stage's output, with the
        # log-probabilities of each held micro-batch
        logits = (12 * V if stages == 1 else held * (4 + e) * V + 8 * V) if last else 0
        memory.append({"weights": 4 * on_gpu, "gradients": 4 * on_gpu, "optimizer": 8 * on_gpu,
                       "communication": communication, "weight_copies": weight_copies,
                       "activations": tokens * (held * per_token + recomputed), "logits": tokens * logits})
    return memory


def memory_per_gpu(c, params, block_params, micro_batch, world, dtype, parallelism, checkpointing, **placement):
    """memory_per_stage's most loaded stage (the whole model without pipelining)."""
    return max(memory_per_stage(c, params, block_params, micro_batch, world, dtype, parallelism, checkpointing,
                                **placement), key=lambda terms: sum(terms.values()))


def offload_traffic(c, params, block_params, world, stages, micro_batches):
    """(bytes to the GPU, bytes back) per step under CPU offload, on the stage that moves the most: each
    micro-step copies every block's fp32 shard up twice (forward, backward) and the root's once, and the
    gradient shard back."""
    dp = world // stages
    gradient_copies = 1 if stages > 1 else micro_batches  # a pipeline reduce-scatters once per step
    return max(((micro_batches * 4 * (2 * blocks * block_params + root) / dp, gradient_copies * 4 * stage_params / dp)
                for blocks, stage_params, root in stage_parameters(c, params, block_params, stages)), key=sum)


def largest_micro_batch(c, params, block_params, step_tokens, world, dtype, parallelism, checkpointing, budget,
                        stages=1, schedule="1f1b", cpu_offload=False):
    """The largest power-of-two micro-batch that fits budget bytes on every stage and divides the step; 0 if
    none. A 1F1B pipeline needs at least as many micro-batches as stages (torch's Schedule1F1B)."""
    dp = world // stages
    fewest = stages if schedule == "1f1b" else 1
    best, micro = 0, 1
    while micro * c.block_size * dp * fewest <= step_tokens:
        memory = memory_per_gpu(c, params, block_params, micro, world, dtype, parallelism, checkpointing, stages=stages,
                                schedule=schedule, micro_batches=step_tokens / (micro * c.block_size * dp),
                                cpu_offload=cpu_offload)
        if sum(memory.values()) > budget:
            break
        if step_tokens % (micro * c.block_size * dp) == 0:
            best = micro
        micro *= 2
    return best


def plan_config(config, options, vocab=None):
    """Everything plan.py reports about a training config, as a dict (numbers in FLOPs, GiB, hours);
    vocab: (size, warning) when not the config's dataset's."""
    vocab, vocab_warning = vocab or vocab_size(config)
    c = model_config(config, vocab)
    gpu, peak, gpu_memory = gpu_spec(options, config)
    model = on_meta(c)
    stored = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in model.blocks[0].parameters())
    world, step_tokens = options["num_gpus"], config["total_batch_tokens"]
    stages, schedule, offload = config["pipeline_stages"], config["pipeline_schedule"], config["cpu_offload"]
    check_layout(config["parallelism"], config["dtype"], offload, stages, world)
    layers = pipeline_layers(c.n_layer, stages, c.tie_embeddings)
    dp = world // stages
    warnings = [vocab_warning] if vocab_warning else []

    flops_per_token = model.flops_per_token(c.block_size)
    tokens = step_tokens * config["max_iters"]
    train_flops = flops_per_token * tokens
    tokens_per_param = tokens / model.num_params()
    if not TOKENS_PER_PARAM_BAND[0] <= tokens_per_param <= TOKENS_PER_PARAM_BAND[1]:
        n, d = chinchilla(train_flops)
        side = "smaller model on more tokens" if tokens_per_param < TOKENS_PER_PARAM else "bigger model on fewer tokens"
        warnings.append(f"{tokens_per_param:.1f} tokens per parameter is far from the compute-optimal ~20 "
                        f"(Hoffmann et al. 2022): these FLOPs reach a lower loss with a {side} "
                        f"({n / 1e6:,.1f}M parameters on {d / 1e9:,.2f}B tokens)")

    micro = config["batch_size"]
    micro_batches = step_tokens / (micro * c.block_size * dp)  # a fraction where train.py would stop
    if step_tokens % (micro * c.block_size * dp):
        warnings.append(f"total_batch_tokens={step_tokens} is not a multiple of batch_size x block_size x {dp} "
                        f"data-parallel processes = {micro * c.block_size * dp}, so train.py would stop; "
                        "use the micro-batch above")
    if stages > 1 and schedule == "1f1b" and micro_batches < stages:
        warnings.append(f"1f1b needs at least pipeline_stages={stages} micro-batches per step (torch's Schedule1F1B), "
                        f"the config has {micro_batches:g}, so train.py would stop; use the micro-batch above, "
                        "or --pipeline_schedule=gpipe")
    bubble = pipeline_bubble(stages, micro_batches)
    recompute = 4 / 3 if config["activation_checkpointing"] else 1.0
    seconds = train_flops * recompute / (world * peak * options["mfu"] * (1 - bubble))

    placement = dict(stages=stages, schedule=schedule, cpu_offload=offload)
    layout = stage_parameters(c, stored, block_params, stages)
    run = config["parallelism"] + ("+ckpt" if config["activation_checkpointing"] else "")
    memory, stage_memory = {}, {}  # for each combination: the most loaded stage's; each stage's, GiB per GPU
    for parallelism, checkpointing in COMBOS:
        name = parallelism + ("+ckpt" if checkpointing else "")
        per_stage = stage_memory[name] = [
            {**{k: v / GIB for k, v in terms.items()}, "total": sum(terms.values()) / GIB}
            for terms in memory_per_stage(c, stored, block_params, micro, world, config["dtype"], parallelism,
                                          checkpointing, micro_batches=micro_batches, **placement)]
        loaded = max(range(stages), key=lambda s: per_stage[s]["total"])
        best = largest_micro_batch(c, stored, block_params, step_tokens, world, config["dtype"], parallelism,
                                   checkpointing, HEADROOM * gpu_memory * GIB, **placement)
        accumulation = step_tokens // (best * c.block_size * dp) if best else 0
        memory[name] = {**per_stage[loaded], "fits": per_stage[loaded]["total"] <= HEADROOM * gpu_memory,
                        "max_micro_batch": best, "accumulation": accumulation}
        if stages > 1:
            memory[name] |= {"stage": loaded, "bubble": pipeline_bubble(stages, accumulation) if best else 0}
        if offload and parallelism == "fsdp":
            # per process: its shard of the largest stage's fp32 weights, gradients and moments
            memory[name]["cpu_memory"] = 16 * max(p for _, p, _ in layout) / dp / GIB
    report = {
        "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
        "vocab_size": c.vocab_size, "flops_per_token": flops_per_token, "tokens": tokens, "train_flops": train_flops,
        "tokens_per_param": tokens_per_param,
        "gpu": gpu, "num_gpus": world, "peak_flops": peak, "mfu": options["mfu"], "gpu_memory_gib": gpu_memory,
        "tokens_per_sec": world * peak * options["mfu"] * (1 - bubble) / (flops_per_token * recompute),
        "hours": seconds / 3600, "dtype": config["dtype"], "micro_batch": micro, "accumulation": micro_batches,
        "run": run, "memory": memory, "warnings": warnings,
    }
    if stages > 1:
        report["pipeline"] = {
            "stages": stages, "schedule": schedule, "data_parallel": dp, "micro_batches": micro_batches,
            "bubble": bubble, "layers": [[r.start, r.stop] for r in layers], "params": [p for _, p, _ in layout],
            "micro_batches_held": [micro_batches_held(s, stages, schedule, micro_batches) for s in range(stages)],
            "memory": stage_memory[run],
            "message_mib": 4 * micro * c.block_size * c.n_embd / 2**20,  # the fp32 activation sent per micro-batch
        }
    if offload:
        to_gpu, to_cpu = offload_traffic(c, stored, block_params, world, stages, micro_batches)
        pcie = options["pcie_gb_per_s"]
        report["offload"] = {
            "cpu_memory": memory[run]["cpu_memory"],
            "to_gpu_gb": to_gpu / 1e9, "to_cpu_gb": to_cpu / 1e9,  # per step and GPU
            "pcie_gb_per_s": pcie, "transfer_seconds": (to_gpu + to_cpu) / (pcie * 1e9),
            "compute_seconds": seconds / config["max_iters"],  # a step's, for comparison
        }
    return report


def budget_flops(options, config):
    """The compute budget: --flops, or --hours on num_gpus x gpu at mfu; 0 when neither is given."""
    flops = options["flops"]
    if options["hours"]:
        flops = gpu_spec(options, config)[1] * options["num_gpus"] * options["hours"] * 3600 * options["mfu"]
    if flops and not FLOPS_RANGE[0] <= flops <= FLOPS_RANGE[1]:
        raise SystemExit(f"config error: a budget of {flops:.3g} FLOPs is outside what plan.py plans, "
                         f"{FLOPS_RANGE[0]:g} (a second of a laptop) to {FLOPS_RANGE[1]:g} (ten times the largest "
                         "training runs so far)")
    return flops


def plan_budget(flops, config, options, law="chinchilla"):
    """The compute-optimal model for flops under law ('chinchilla' or 'kaplan'), its shape (for Kaplan matched
    on the count without embeddings), and the report of training it on config's settings."""
    params = round((kaplan if law == "kaplan" else chinchilla)(flops)[0])
    tokens = round(flops / (6 * params)) if law == "kaplan" else TOKENS_PER_PARAM * params
    vocab = vocab_size(config) if options.get("dataset_given", True) else (
        FALLBACK_VOCAB, f"assumed GPT-2's vocabulary, {FALLBACK_VOCAB} (padded); --dataset=NAME plans with a "
                        "prepared dataset's")
    shape, shape_params = compute_optimal_shape(params, model_config(config, vocab[0]), non_embedding=law == "kaplan")
    size = dict(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd)
    keys = dict(size, n_kv_head=0, ffn_hidden=0, max_iters=math.ceil(tokens / config["total_batch_tokens"]))
    return {"law": law, "flops": flops, "params": params, "tokens": tokens,
            "shape": dict(size, block_size=shape.block_size), "shape_params": shape_params,
            "train_keys": {k: v for k, v in keys.items() if config[k] != v},
            "training": plan_config(dict(config, **keys), options, vocab)}


def plan_both(flops, config, options):
    """--law=both: the two plans for flops (none without a budget) and what each law advises for each budget
    of BUDGET_RANGE: parameters, tokens and tokens per parameter, side by side."""
    report = {"law": "both", "flops": flops, "range": []}
    for budget in BUDGET_RANGE:
        (n_c, d_c), (n_k, d_k) = chinchilla(budget), kaplan(budget)
        report["range"].append({"flops": budget, "chinchilla_params": n_c, "chinchilla_tokens": d_c,
                                "chinchilla_tokens_per_param": d_c / n_c, "kaplan_params": n_k, "kaplan_tokens": d_k,
                                "kaplan_tokens_per_param": d_k / n_k, "params_ratio": n_k / n_c})
    if flops:
        report |= {law: plan_budget(flops, config, options, law) for law in ("chinchilla", "kaplan")}
    return report


# -----------------------------------------------------------------------------
# printing

def print_row(label, cells):
    print(f"  {label:<24}" + "".join(f"{cell:>12}" for cell in cells))


def print_config_report(r):
    print(f"model     {r['params'] / 1e6:,.2f}M parameters ({r['non_embedding_params'] / 1e6:,.2f}M without "
          f"embeddings): {r['n_layer']} layers x {r['n_embd']}, {r['n_head']} heads, block_size {r['block_size']}, "
          f"vocabulary {r['vocab_size']}")
    print(f"compute   {r['flops_per_token'] / 1e9:,.3f} GFLOPs per token x {r['tokens'] / 1e9:,.3f}B tokens "
          f"= {r['train_flops']:.3g} FLOPs; {r['tokens_per_param']:.1f} tokens per parameter")
    slower = [why for why, applies in (("checkpointing's recompute", r["run"].endswith("+ckpt")),
                                       ("the pipeline bubble", "pipeline" in r)) if applies]
    print(f"time      {r['num_gpus']} x {r['gpu']} ({r['peak_flops'] / 1e12:,.0f} TFLOP/s bf16) at "
          f"{100 * r['mfu']:.0f}% MFU: {r['tokens_per_sec']:,.0f} tokens/s, {format_duration(3600 * r['hours'])}"
          + (f" (with {' and '.join(slower)})" if slower else ""))
    precision = "float32" if r["dtype"] == "float32" else f"{r['dtype'].replace('auto', 'bfloat16')} autocast"
    where = " on the most loaded stage" if "pipeline" in r else ""
    print(f"memory    GiB per GPU{where} at micro-batch {r['micro_batch']} x {r['block_size']} tokens, {precision}, "
          f"{r['num_gpus']} GPU(s); a {r['gpu']} has {r['gpu_memory_gib']:g}, plan within {HEADROOM:.0%}")
    columns = r["memory"].values()  # one for each combination of COMBOS
    print_row("", [name + ("*" if name == r["run"] else "") for name in r["memory"]])
    for label, key in (("weights (fp32)", "weights"), ("gradients (fp32)", "gradients"),
                       ("AdamW moments (fp32)", "optimizer"), ("DDP buckets/FSDP gather", "communication"),
                       ("16-bit weight copies", "weight_copies"), ("activations", "activations"),
                       ("logits and loss", "logits"), ("total", "total")):
        print_row(label, [f"{m[key]:.2f}" for m in columns])
    if "offload" in r:
        print_row("CPU memory (offload)", [f"{m['cpu_memory']:.2f}" if "cpu_memory" in m else "-" for m in columns])
    if "pipeline" in r:
        print_row("most loaded stage", [m["stage"] for m in columns])
    print_row("fits", ["yes" if m["fits"] else "no" for m in columns])
    print_row("max micro-batch", [m["max_micro_batch"] or "-" for m in columns])
    print_row("accumulation", [m["accumulation"] or "-" for m in columns])
    if "pipeline" in r:
        print_row("pipeline bubble", [f"{m['bubble']:.1%}" for m in columns])
    run = r["memory"][r["run"]]
    if run["max_micro_batch"]:
        print(f"use       --batch_size={run['max_micro_batch']} (accumulation {run['accumulation']}) for the "
              f"config's {r['run']} (*); the config has batch_size={r['micro_batch']} (accumulation {r['accumulation']:g})")
        if "pipeline" in r:
            print(f"          with a bubble of {run['bubble']:.1%}: a smaller micro-batch shrinks it, "
                  "at some cost in each GPU's efficiency")
    else:
        print(f"use       nothing fits with the config's {r['run']} (*) even at micro-batch 1: try "
              "--parallelism=fsdp, --activation_checkpointing=True, more GPUs or a smaller block_size")
    if "pipeline" in r:
        p = r["pipeline"]
        print(f"pipeline  {p['stages']} stages x {p['data_parallel']} data-parallel, {p['schedule']}: "
              f"{p['micro_batches']:g} micro-batches per step; bubble (p-1)/(m+p-1) = {100 * p['bubble']:.1f}%, "
              "in the time above")
        print_row("stage", range(p["stages"]))
        print_row("layers", [f"{start}-{stop - 1}" for start, stop in p["layers"]])
        print_row("parameters (M)", [f"{n / 1e6:,.2f}" for n in p["params"]])
        print_row("micro-batches held", [f"{n:g}" for n in p["micro_batches_held"]])
        print_row(f"GiB per GPU ({r['run']})", [f"{m['total']:.2f}" for m in p["memory"]])
        print(f"  each micro-batch sends {p['message_mib']:.1f} MiB of fp32 activations to the next stage")
    if "offload" in r:
        o = r["offload"]
        print(f"offload   {o['cpu_memory']:.2f} GiB of CPU memory per GPU: the fp32 weights, gradients and AdamW "
              "moments, 16 bytes per parameter / shards")
        print(f"          per step {o['to_gpu_gb']:.2f} GB to the GPU and {o['to_cpu_gb']:.2f} GB back: "
              f"{o['transfer_seconds']:.2f} s at an assumed {o['pcie_gb_per_s']:g} GB/s (--pcie_gb_per_s), "
              f"beside {o['compute_seconds']:.2f} s of compute")
    for warning in r["warnings"]:
        print(f"warning: {warning}")


LAW_SUMMARY = (
    "law       Kaplan et al. 2020: N grows as C^0.73 and D as C^0.27 (each 10x of compute: 5.4x the parameters, "
    "1.9x the tokens), so tokens per parameter fall as budgets grow\n"
    "law       Hoffmann et al. 2022 (Chinchilla): N and D both grow as C^0.5, about 20 tokens per parameter at any "
    "budget; Chinchilla supersedes Kaplan for this choice (Hoffmann et al. trace the gap mainly to Kaplan's "
    "learning-rate schedule, one length for every run rather than matched to its tokens)"
)
LAW_FORMULA = {
    "chinchilla": "Hoffmann et al. 2022: C = 6ND, D = 20N, so N = sqrt(C/120)",
    "kaplan": "Kaplan et al. 2020, eq. 6.1: N = 1.3e9 (C / PF-day)^0.73 without embeddings, D = C/(6N)",
}


def print_budget_report(b, options, train_args, brief=False):
    """The budget, the law's optimum and shape (counted in b's law's sense), the train.py command, and the
    report of training it; brief (--law=both, after Chinchilla's): no budget, the report's time alone."""
    if not brief or b["law"] == "chinchilla":
        how = (f" ({options['num_gpus']} x {b['training']['gpu']} for {options['hours']:g} h at "
               f"{100 * options['mfu']:.0f}% MFU)" if options["hours"] else "")
        print(f"budget    {b['flops']:.3g} FLOPs{how}")
    counted = " non-embedding" if b["law"] == "kaplan" else ""
    s, t = b["shape"], b["training"]
    print(f"optimal   {b['params'] / 1e6:,.1f}M{counted} parameters on {b['tokens'] / 1e9:,.2f}B tokens, "
          f"{b['tokens'] / b['params']:.1f} per parameter ({LAW_FORMULA[b['law']]})")
    print(f"shape     n_layer={s['n_layer']} n_head={s['n_head']} n_embd={s['n_embd']} block_size={s['block_size']}: "
          f"{b['shape_params'] / 1e6:,.1f}M{counted} parameters ({100 * (b['shape_params'] / b['params'] - 1):+.1f}%); "
          f"head size {s['n_embd'] // s['n_head']}, n_embd/n_layer in 64..128, nearest 96")
    print("train     python train.py " + " ".join(train_args + [f"--{k}={v}" for k, v in b["train_keys"].items()]))
    if brief:
        print(f"time      {t['num_gpus']} x {t['gpu']} at {100 * t['mfu']:.0f}% MFU: "
              f"{format_duration(3600 * t['hours'])}; {t['train_flops']:.3g} FLOPs with attention")
        return
    print_config_report(t)
    if b["law"] == "kaplan":
        n, d = chinchilla(b["flops"])
        print(f"note      Chinchilla's plan for this budget: {n / 1e6:,.1f}M parameters (embeddings included) on "
              f"{d / 1e9:,.2f}B tokens (--law=chinchilla)")
        print(LAW_SUMMARY)


def print_both(report, options, train_args):
    if report["flops"]:
        for law in ("chinchilla", "kaplan"):
            print(f"--- {law} ---")
            print_budget_report(report[law], options, train_args, brief=True)
        print("---")
    print(f"{'':<8}  {'Chinchilla: N':>14} {'D':>9} {'D/N':>6}  {'Kaplan: N (no emb.)':>20} {'D':>9} {'D/N':>6}  "
          f"{'N ratio':>7}")
    for r in report["range"]:
        print(f"{r['flops']:<8.0e}  {r['chinchilla_params'] / 1e9:>13,.3f}B {r['chinchilla_tokens'] / 1e9:>8,.1f}B "
              f"{r['chinchilla_tokens_per_param']:>6.1f}  {r['kaplan_params'] / 1e9:>19,.3f}B "
              f"{r['kaplan_tokens'] / 1e9:>8,.1f}B {r['kaplan_tokens_per_param']:>6.2f}  {r['params_ratio']:>6.2f}x")
    print(LAW_SUMMARY)


if __name__ == "__main__":
    options, config = read_config(sys.argv[1:])
    flops = budget_flops(options, config)
    if options["law"] == "both":
        report = plan_both(flops, config, options)
    else:
        report = plan_budget(flops, config, options, options["law"]) if flops else plan_config(config, options)
    train_args = [a for a in sys.argv[1:] if a[2:].partition("=")[0] not in OPTIONS]
    if options["json"]:
        print(json.dumps(report, indent=1))
    elif options["law"] == "both":
        print_both(report, options, train_args)
    elif flops:
        print_budget_report(report, options, train_args)
    else:
        print_config_report(report)
