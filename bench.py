"""
Measure the hot paths on one device: training tokens/s, MFU and peak memory, eager and compiled;
decoding tokens/s and time to first token at batch 1 and 8, for our generate and for Hugging Face
generate on the same weights (exported with hf.py), side by side in one run.

    python bench.py                                              # GPT-2 124M shape, GPU if there is one
    python bench.py --n_layer=4 --n_head=4 --n_embd=128 --block_size=128 --vocab_size=257 --device=cpu
    python bench.py --device=cpu --compile=False --out=bench.json   # JSON as well as the table
    python bench.py --device=cpu --train=False --compile=False     # decoding alone, ours beside transformers

The model keys are train.py's; weights and tokens are random. Timings are medians over `repeats` after
`warmup` untimed runs, the variants interleaved A B A B; the table and the JSON start with the machine's
facts (runtime.machine_facts). More: docs/benchmarks.md.
"""

import json
import os
import resource
import statistics
import time
from dataclasses import fields

import torch

from configurator import configure, print_config
from model import GPT, GPTConfig
from optim import make_optimizer
from runlog import save_atomically
from runtime import (autocast_context, describe_machine, device_name, machine_facts, peak_flops as gpu_peak_flops,
                     pick_device, pick_dtype)

# -----------------------------------------------------------------------------
# model: every GPTConfig field is a key, as in train.py (n_layer, n_embd, mlp, pos, ...), with
# GPTConfig's default, train.py's: GPT-2 124M's shape (and vocabulary) in train.py's style
globals().update({f.name: f.default for f in fields(GPTConfig)})
# training
train = True  # False: time decoding alone (a 124M training step takes minutes on a CPU)
batch_size = 8  # sequences per step
activation_checkpointing = False  # recompute each block's activations in the backward pass, as train.py's key
optimizers = "muon"  # train.py's optimizer: 'muon' or 'adamw'; or both, "muon,adamw", timed in turn
learning_rate = 6e-4
weight_decay = 0.1
# decoding
decode_batch_sizes = [1, 8]
prompt_tokens = 64
new_tokens = 64
hf = True  # also time transformers' generate on the same weights, when transformers is installed
# measurement
warmup = 2  # untimed runs of each variant first
repeats = 5  # timed runs of each variant; the median is reported
out = ""  # write the results as JSON to this file too
# system
device = "auto"
dtype = "auto"
compile = True  # also time the compiled model (training) and the compiled decoding step
eager = True  # time the eager model too; False spares its steps when only the compiled speed matters
peak_flops = 0.0  # the GPU's peak FLOP/s for MFU; 0 looks it up by the GPU's name
seed = 1337
config = configure(globals())
print_config(config)
# -----------------------------------------------------------------------------

if not (eager or compile):
    raise SystemExit("config error: eager=False needs compile=True: there would be nothing to time")
if warmup < 1 or repeats < 1 or new_tokens < 2 or prompt_tokens < 1 or prompt_tokens + new_tokens > block_size:
    raise SystemExit("config error: need warmup >= 1, repeats >= 1, new_tokens >= 2, prompt_tokens >= 1 and "
                     f"prompt_tokens + new_tokens <= block_size ({block_size})")
device = pick_device(device)
dtype = pick_dtype(device, dtype)
autocast = autocast_context(device, dtype)
cuda = device.startswith("cuda")
machine = machine_facts(device)  # before the runs: the load average is the one they start under
torch.manual_seed(seed)
try:
    model_config = GPTConfig(**{f.name: config[f.name] for f in fields(GPTConfig)})
except ValueError as e:
    raise SystemExit(f"config error: {e}") from None
model = GPT(model_config).to(device)
model.activation_checkpointing = activation_checkpointing
peak = gpu_peak_flops(device_name(device), peak_flops)  # a CPU's name is no GPU's: peak_flops, or 0


def interleaved(variants, run):
    """{name: [seconds of each timed run]} of run(variant), its GPU work included, after `warmup` untimed runs
    of each, taking the variants in turn (A B A B ...)."""
    sync = torch.cuda.synchronize if cuda else lambda: None
    for fn in variants.values():
        for _ in range(warmup):
            run(fn)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            run(fn)
            sync()
            times[name].append(time.perf_counter() - start)
    return times


# -----------------------------------------------------------------------------
# training: whole steps on random tokens
if not set(optimizers.split(",")) <= {"muon", "adamw"}:
    raise SystemExit(f"config error: optimizers={optimizers!r}: each is 'muon' or 'adamw', "
                     "e.g. --optimizers=muon,adamw")
optimizer_of = {name: make_optimizer(model, learning_rate, weight_decay, (0.9, 0.95), device, name)
                for name in optimizers.split(",")}
x, y = torch.randint(0, vocab_size, (2, batch_size, block_size), device=device).unbind(0)
nets = ({"eager": model} if eager else {}) | ({"compiled": torch.compile(model)} if compile else {})
train_variants = {(f"{mode} {name}" if len(optimizer_of) > 1 else mode): (net, opt)
                  for mode, net in nets.items() for name, opt in optimizer_of.items()}


def train_step(variant):
    net, opt = variant
    with autocast:
        loss = net(x, y)[1]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


if cuda:
    torch.cuda.reset_peak_memory_stats()
train_times = interleaved(train_variants, train_step) if train else {}
results = {"machine": machine, "config": config, "device": device_name(device), "dtype": dtype, "train": {}, "decode": {}}
for name, seconds in train_times.items():
    tokens_per_s = batch_size * block_size / statistics.median(seconds)
    results["train"][name] = {"step_ms_median": 1e3 * statistics.median(seconds), "step_ms_min": 1e3 * min(seconds),
                              "tokens_per_s": tokens_per_s,
                              "mfu": model.flops_per_token(block_size) * tokens_per_s / peak if peak else None}
# training's peak: it needs more than decoding (Linux reports ru_maxrss in KiB)
results["peak_memory_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if cuda else
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
del optimizer_of, train_variants
model.eval()

# -----------------------------------------------------------------------------
# decoding: ours, eager and compiled, beside transformers' generate on the same weights. Ours reads the
# cache's first 64, 128, 256, ... slots (decoding.attended_length), HF's cache grows by one at each step.
decoders = {"ours": lambda idx, n: model.generate(idx, n, temperature=0.0, compile=False)}
if compile:
    decoders["ours_compiled"] = lambda idx, n: model.generate(idx, n, temperature=0.0, compile=True)
try:
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError:
    hf = False
hf = hf and bool(decode_batch_sizes)  # nothing to compare without decoding
if hf:
    from hf import hf_config, to_hf
    try:
        hf_settings = hf_config(model_config, eot_id=0)
    except SystemExit as e:  # an option neither GPT-2 nor Llama has: time ours alone
        print(f"no transformers comparison: {e}")
        hf = False
if hf:
    hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_settings.pop("model_type"), **hf_settings))
    # not strict: tied, HF's lm_head is its embedding, which to_hf writes once. same_tokens_as_ours
    # below shows that the weights arrived.
    hf_model.load_state_dict(to_hf(model.state_dict(), model_config), strict=False)
    hf_model.to(device).eval()
    hf_model.generation_config.eos_token_id = None  # never stop early: every variant makes new_tokens tokens
    hf_model.generation_config.pad_token_id = 0
    decoders["hf"] = lambda idx, n: hf_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                                                      do_sample=False)

for batch in decode_batch_sizes:
    prompt = torch.randint(0, vocab_size, (batch, prompt_tokens), device=device)
    with autocast:
        outputs = {name: decode(prompt, new_tokens) for name, decode in decoders.items()}
        first = interleaved(decoders, lambda decode: decode(prompt, 1))
        whole = interleaved(decoders, lambda decode: decode(prompt, new_tokens))
    rows = {name: {"first_token_ms": 1e3 * statistics.median(first[name]),
                   "tokens_per_s": batch * new_tokens / statistics.median(whole[name]),
                   "generate_ms_median": 1e3 * statistics.median(whole[name]),
                   "generate_ms_min": 1e3 * min(whole[name]),
                   "same_tokens_as_ours": torch.equal(outputs[name], outputs["ours"])} for name in decoders}
    for r in rows.values():  # > 1: faster than transformers
        r["speed_vs_hf"] = r["tokens_per_s"] / rows["hf"]["tokens_per_s"] if hf else None
    results["decode"][f"batch{batch}"] = rows

# -----------------------------------------------------------------------------
print(f"\n{describe_machine(machine)}")
print(f"{results['device']}, {dtype}, {model.num_params() / 1e6:.1f}M parameters, load average at the end "
      f"{os.getloadavg()[0]:.1f}, peak memory {results['peak_memory_mb']:.0f} MB")
print(f"{'training':<24}{'tokens/s':>12}{'step ms':>10}{'MFU':>8}")
for name, r in results["train"].items():
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"{name:<24}{r['tokens_per_s']:>12.0f}{r['step_ms_median']:>10.1f}{mfu:>8}")
print(f"{'decoding':<24}{'tokens/s':>12}{'1st ms':>10}{'same':>8}{'vs hf':>8}")
for batch, rows in results["decode"].items():
    for name, r in rows.items():
        vs_hf = f"{r['speed_vs_hf']:.2f}x" if r["speed_vs_hf"] else "n/a"
        print(f"{batch + ' ' + name:<24}{r['tokens_per_s']:>12.1f}{r['first_token_ms']:>10.1f}"
              f"{str(r['same_tokens_as_ours']):>8}{vs_hf:>8}")
if out:
    save_atomically(out, lambda f: json.dump(results, f, indent=2))  # a reader never sees half a file
    print(f"wrote {out}")
