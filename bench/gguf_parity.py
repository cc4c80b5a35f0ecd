"""
How closely llama.cpp runs a checkpoint exported as GGUF: for each GGUF type, the file's size, how
many of llama.cpp's greedy tokens equal ours, and the largest logit difference over the prompt and
the tokens generated. Ours is computed twice: with the weights rounded as the file holds them (the
difference is llama.cpp's arithmetic alone) and as trained, in float32 (the export's rounding too).

    pip install llama-cpp-python        # compiles llama.cpp: several minutes
    python bench/gguf_parity.py --out_dir=out/llama
    python bench/gguf_parity.py --ckpt=out/llama/ckpt.pt --types="f16,q8_0" --prompt="def " --out=parity.json

Reads the checkpoint; writes each type's file into a temporary folder (removed at the end), prints
one row per type and, with --out, the rows as JSON. Logits are compared on llama.cpp's own sequence
(the prompt, then its tokens), so one early difference in a token does not shift every later row;
where the tokens differ, the row says how far apart our logits of the two picks were (a near-tie is
one either side's rounding may break). --kv_cache=f32 leaves out llama.cpp's float16 keys and values.
"""

import copy
import json
import os
import sys
import tempfile

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402  (after the path: run from anywhere)
from configurator import configure  # noqa: E402
from gguf_file import GGUF_TYPES, save_gguf  # noqa: E402
from optional import optional  # noqa: E402
from lora import merge_lora  # noqa: E402
from runlog import save_atomically  # noqa: E402

out_dir = "out/default"  # compares out_dir/ckpt.pt ...
ckpt = ""  # ... unless a checkpoint path is given here
types = "f32,f16,bf16,q8_0"  # the GGUF types to compare, comma-separated
prompt = ""  # the text to continue; empty: from end-of-text, as sample.py starts
new_tokens = 64
threads = 2  # llama.cpp's CPU threads
kv_cache = "f16"  # llama.cpp's key/value cache: 'f16' (its default, rounds keys and values) or 'f32'
out = ""  # a JSON file for the rows; empty: print only
configure(globals())

try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError:
    raise SystemExit("bench error: this compares with llama.cpp through llama-cpp-python; pip install llama-cpp-python "
                     "(it compiles llama.cpp, several minutes)") from None
gguf = optional("gguf", "bench/gguf_parity.py")
for gguf_type in types.split(","):
    if gguf_type not in GGUF_TYPES:
        raise SystemExit(f"config error: types has '{gguf_type}', not one of {', '.join(GGUF_TYPES)}")
if kv_cache not in ("f16", "f32"):
    raise SystemExit(f"config error: kv_cache='{kv_cache}' is not one of f16, f32")


def rounded_like_the_file(model, gguf_type):
    """A copy of model whose matrices went through gguf_type and back, as save_gguf writes them:
    vectors and the position table stay float32, a row q8_0 cannot split into blocks is float16."""
    model = copy.deepcopy(model)
    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and name != "wpe.weight":
                array = weight.detach().numpy()
                try:
                    array = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)
                except gguf.QuantError:
                    array = array.astype(np.float16).astype(np.float32)
                weight.copy_(torch.from_numpy(array))
    return model


def llama_cpp_greedy(path, prompt_ids, n, context):
    """llama.cpp's greedy continuation of prompt_ids (n tokens, each the argmax of its logits, as
    llama.cpp's greedy sampler picks) and its logits at every position, (len(prompt_ids) + n - 1, V)."""
    cache = llama_cpp.GGML_TYPE_F16 if kv_cache == "f16" else llama_cpp.GGML_TYPE_F32
    llm = Llama(model_path=path, n_ctx=context, logits_all=True, n_threads=threads, type_k=cache, type_v=cache,
                verbose=False)
    llm.eval(prompt_ids)
    tokens = []
    for i in range(n):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if i < n - 1:
            llm.eval(tokens[-1:])
    logits = torch.from_numpy(np.array(llm.scores[: llm.n_tokens], dtype=np.float32))
    llm.close()  # now: left to the garbage collector at exit, llama-cpp-python 0.3 prints a TypeError
    return tokens, logits


ckpt_path = ckpt or os.path.join(out_dir, "ckpt.pt")
model, tokenizer = model_from_checkpoint(load_checkpoint(ckpt_path), ckpt_path)
merge_lora(model)
model = model.float().eval()
prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
context = model.config.block_size
if len(prompt_ids) + new_tokens > context:
    raise SystemExit(f"config error: the prompt's {len(prompt_ids)} tokens and new_tokens={new_tokens} do not fit in "
                     f"the model's context of {context}; llama.cpp would go past it where model.py slides a window")
print(f"{ckpt_path}: {model.num_params() / 1e6:.2f}M parameters; {len(prompt_ids)} prompt tokens, {new_tokens} greedy "
      f"tokens; llama-cpp-python {llama_cpp.__version__} with a {kv_cache} KV cache, torch {torch.__version__}, "
      f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
rows = []
with tempfile.TemporaryDirectory() as folder:
    for gguf_type in types.split(","):
        path = os.path.join(folder, f"model-{gguf_type}.gguf")
        save_gguf(path, model, tokenizer, gguf_type)
        theirs, their_logits = llama_cpp_greedy(path, prompt_ids, new_tokens, context)
        row = {"type": gguf_type, "kv_cache": kv_cache, "file_mb": os.path.getsize(path) / 1e6}
        text = f"{gguf_type:>5}: {row['file_mb']:8.2f} MB;"
        for name, ours_model in (("rounded", rounded_like_the_file(model, gguf_type)), ("float32", model)):
            with torch.no_grad():
                ours = ours_model.generate(torch.tensor([prompt_ids]), new_tokens, temperature=0)[0, len(prompt_ids):]
                sequence = torch.tensor([prompt_ids + theirs[:-1]])
                our_logits = ours_model(sequence, all_logits=True)[0][0, :, : model.config.vocab_size]
            same = next((i for i, (a, b) in enumerate(zip(ours.tolist(), theirs)) if a != b), new_tokens)
            # At the first difference the two saw the same tokens; how far apart are our logits of the two picks?
            # No further than twice the logit difference means a tie that either's rounding may break.
            gap = None if same == new_tokens else (lambda z: (z[ours[same]] - z[theirs[same]]).item())(
                our_logits[len(prompt_ids) - 1 + same])
            row |= {f"same_tokens_{name}": same, f"gap_at_difference_{name}": gap,
                    f"max_logit_diff_{name}": (our_logits - their_logits).abs().max().item()}
            text += (f" {'weights as in the file' if name == 'rounded' else 'float32'}: {same}/{new_tokens} greedy "
                     f"tokens equal" + ("" if gap is None else f" (then our top two {gap:.1e} apart)")
                     + f", max |logit difference| {row[f'max_logit_diff_{name}']:.1e};")
        rows.append(row)
        print(text.rstrip(";"))
if out:
    save_atomically(out, lambda f: json.dump(rows, f, indent=2))
