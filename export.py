"""
Export a checkpoint as a Hugging Face folder that transformers loads with no code of ours, or as
one GGUF file that llama.cpp and Ollama run.

    python export.py --out_dir=out/quickstart                   # out/quickstart/ckpt.pt -> out/quickstart/hf
    python export.py --ckpt=out/gpt2/ckpt-0005000.pt --folder=hf/gpt2-small --dtype=bfloat16
    python export.py --out_dir=out/llama --format=gguf          # -> out/llama/llama-f16.gguf
    python export.py --out_dir=out/llama --format=gguf --gguf_type=q8_0 --file=llama.gguf

Reads the checkpoint (a LoRA run's base too, the adapters merged). Writes the folder's files (config.json,
model.safetensors, the tokenizer's: hf.py) or one .gguf file (gguf_file.py, needs `pip install gguf`), each
atomically; a model neither format expresses stops with one line. More: docs/export.md.
"""

import os

import torch

from chat import has_chat_tokens
from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import configure
from download import progress
from gguf_file import GGUF_TYPES, save_gguf
from hf import ARCHITECTURES, architecture_of, save_folder
from lora import merge_lora
from model import EncoderDecoder

# -----------------------------------------------------------------------------
out_dir = "out/default"  # exports out_dir/ckpt.pt ...
ckpt = ""  # ... unless a checkpoint path is given here
format = "hf"  # 'hf': a Hugging Face folder; 'gguf': one file for llama.cpp and Ollama
# hf
folder = ""  # the folder to write; empty: 'hf' beside the checkpoint
dtype = "float32"  # of the weights written: 'float32', 'bfloat16' or 'float16'
# gguf
file = ""  # the .gguf file to write; empty: <run>-<gguf_type>.gguf beside the checkpoint
gguf_type = "f16"  # of the matrices written, by llama.cpp's names: 'f32', 'f16', 'bf16' or 'q8_0'
config = configure(globals())
# -----------------------------------------------------------------------------

for key, value, allowed in (("format", format, ("hf", "gguf")), ("dtype", dtype, ("float32", "bfloat16", "float16")),
                            ("gguf_type", gguf_type, GGUF_TYPES)):
    if value not in allowed:
        raise SystemExit(f"config error: {key}='{value}' is not one of {', '.join(allowed)}")
ckpt_path = ckpt or os.path.join(out_dir, "ckpt.pt")
if format == "gguf":
    # by default named after the run's folder (of an hf:FOLDER, that folder) and written into it
    run = os.path.abspath(ckpt_path[3:]) if ckpt_path.startswith("hf:") else os.path.dirname(os.path.abspath(ckpt_path))
    target = os.path.expanduser(file) if file else os.path.join(run, f"{os.path.basename(run)}-{gguf_type}.gguf")
    if os.path.isdir(target):
        raise SystemExit(f"export error: {target} is a folder; give --file a file name, such as {target}/model.gguf")
    if os.path.isfile(target):
        with open(target, "rb") as f:
            if f.read(4) != b"GGUF":  # an earlier export is replaced; anything else is the user's
                raise SystemExit(f"export error: {target} exists and is not a GGUF file; choose another --file")
    existing = os.path.dirname(os.path.abspath(target))
else:
    target = existing = folder or os.path.join(os.path.dirname(ckpt_path), "hf")
existing = os.path.abspath(existing)  # the folder to write into, or the nearest of its parents that exists
while not os.path.exists(existing):
    existing = os.path.dirname(existing)
if not os.path.isdir(existing):
    key = "file" if format == "gguf" else "folder"
    raise SystemExit(f"export error: {existing} is a file, not a folder; choose another --{key}")

# Each of the three steps takes seconds per 100M parameters (37 s in all for GPT-2 124M on a busy CPU),
# so a terminal shows which one is running; piped or logged, nothing.
with progress(total=3, desc="export", bar_format="{desc} {n}/{total} steps, {elapsed}{postfix}") as steps:
    steps.set_postfix_str("reading the checkpoint")
    checkpoint = load_checkpoint(ckpt_path)
    steps.update()
    # A LoRA checkpoint loads as its base with the adapters added; merging folds them into the weights,
    # so what is written is a plain GPT (a model without adapters is left as it is).
    steps.set_postfix_str("building the model")
    model, tokenizer = model_from_checkpoint(checkpoint, ckpt_path)
    if isinstance(model, EncoderDecoder):
        raise SystemExit(f"export error: {ckpt_path} is a translation model (encoder-decoder), which neither format "
                         f"holds; translate with python sample.py --ckpt={ckpt_path} --translate_file=FILE")
    merge_lora(model)
    architecture = architecture_of(model.config)
    steps.update()
    steps.set_postfix_str(f"writing {target}")
    if format == "gguf":
        save_gguf(target, model, tokenizer, gguf_type)
    else:
        files = save_folder(target, model, tokenizer, getattr(torch, dtype))
    steps.set_postfix_str("done", refresh=False)
    steps.update()

size = f"{model.num_params() / 1e6:.2f}M parameters in {gguf_type if format == 'gguf' else dtype}"
shape = f"vocabulary {model.config.vocab_size}, context {model.config.block_size}"
if format == "gguf":
    megabytes = os.path.getsize(target) / 1e6
    print(f"{ckpt_path} -> {target}: llama.cpp's {architecture}, {size}, {megabytes:.1f} MB, {shape}")
    command = (f"llama-cli -m {target} -c {model.config.block_size} --jinja" if has_chat_tokens(tokenizer) else
               f'llama-completion -m {target} -c {model.config.block_size} -no-cnv -p "..."')
    print(f"run it: {command} (Ollama: a Modelfile, see docs/export.md)")
else:
    print(f"{ckpt_path} -> {target}: {ARCHITECTURES[architecture]}, {size}, {shape}")
    print(f"wrote {', '.join(files)}")
    if "vocab.json" in files:
        print(f"load it: AutoModelForCausalLM.from_pretrained('{target}'), AutoTokenizer.from_pretrained('{target}')")
    else:
        print(f"load it: AutoModelForCausalLM.from_pretrained('{target}'); "
              f"transformers has no {tokenizer.kind} tokenizer"
              + (": ids 0-255 are the bytes, 256 is end-of-text" if tokenizer.kind == "byte" else "")
              + f"; this repository reads it back with --ckpt=hf:{target}")
