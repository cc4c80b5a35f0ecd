"""
Export a checkpoint as a Hugging Face folder that transformers loads with no code of ours.

    python export.py --out_dir=out/quickstart                   # out/quickstart/ckpt.pt -> out/quickstart/hf
    python export.py --ckpt=out/gpt2/ckpt-0005000.pt --folder=hf/gpt2-small --dtype=bfloat16

and then, in Python with transformers installed:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/quickstart/hf")

Reads the checkpoint (of a LoRA run: its base too, and the adapters are merged
into the weights). Writes into the folder (each file under a temporary name,
then renamed): config.json, model.safetensors, tokenizer_description.json, and
for byte-level BPE tokenizers (gpt2, bpe) vocab.json, merges.txt and
tokenizer_config.json, which AutoTokenizer reads. The 'gpt2' style exports as
GPT2LMHeadModel, the modern style as LlamaForCausalLM; options neither can
express (qk_norm, a mixed style) stop with a one-line error naming the option.
The mapping is in hf.py, which also reads such folders back: train.py
--init_from=hf:FOLDER and sample.py --ckpt=hf:FOLDER. On a terminal a bar on
stderr names the step running (reading, building, writing: seconds each per 100M
parameters); piped or logged, it stays quiet.
"""

import os
import sys

import torch
from tqdm import tqdm

from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import configure
from hf import ARCHITECTURES, architecture_of, save_folder
from lora import merge_lora

# -----------------------------------------------------------------------------
out_dir = "out/default"  # exports out_dir/ckpt.pt ...
ckpt = ""  # ... unless a checkpoint path is given here
folder = ""  # the folder to write; empty: 'hf' beside the checkpoint
dtype = "float32"  # of the weights written: 'float32', 'bfloat16' or 'float16'
config = configure(globals())
# -----------------------------------------------------------------------------

if dtype not in ("float32", "bfloat16", "float16"):
    raise SystemExit(f"config error: dtype='{dtype}' is not one of float32, bfloat16, float16")
ckpt_path = ckpt or os.path.join(out_dir, "ckpt.pt")
folder = folder or os.path.join(os.path.dirname(ckpt_path), "hf")
existing = os.path.abspath(folder)  # the folder, or the nearest of its parents that exists
while not os.path.exists(existing):
    existing = os.path.dirname(existing)
if not os.path.isdir(existing):
    raise SystemExit(f"export error: {existing} is a file, not a folder; choose another --folder")

# Each of the three steps takes seconds per 100M parameters (37 s in all for GPT-2 124M on a busy CPU),
# so a terminal shows which one is running; piped or logged, nothing.
with tqdm(total=3, desc="export", bar_format="{desc} {n}/{total} steps, {elapsed}{postfix}",
          disable=not sys.stderr.isatty()) as steps:
    steps.set_postfix_str("reading the checkpoint")
    checkpoint = load_checkpoint(ckpt_path)
    steps.update()
    # A LoRA checkpoint loads as its base with the adapters added; merging folds them into the weights,
    # so what is written is a plain GPT (a model without adapters is left as it is).
    steps.set_postfix_str("building the model")
    model, tokenizer = model_from_checkpoint(checkpoint, ckpt_path)
    merge_lora(model)
    architecture = ARCHITECTURES[architecture_of(model.config)]
    steps.update()
    steps.set_postfix_str(f"writing {folder}")
    files = save_folder(folder, model, tokenizer, getattr(torch, dtype))
    steps.set_postfix_str("done", refresh=False)
    steps.update()

print(f"{ckpt_path} -> {folder}: {architecture}, {model.num_params() / 1e6:.2f}M parameters in {dtype}, "
      f"vocabulary {model.config.vocab_size}, context {model.config.block_size}")
print(f"wrote {', '.join(files)}")
if "vocab.json" in files:
    print(f"load it: AutoModelForCausalLM.from_pretrained('{folder}'), AutoTokenizer.from_pretrained('{folder}')")
else:
    print(f"load it: AutoModelForCausalLM.from_pretrained('{folder}'); transformers has no {tokenizer.kind} tokenizer"
          + (": ids 0-255 are the bytes, 256 is end-of-text" if tokenizer.kind == "byte" else "")
          + f"; this repository reads it back with --ckpt=hf:{folder}")
