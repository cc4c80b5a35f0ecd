"""
Generate text from a trained checkpoint, printing each sample as it is generated.

    python sample.py --out_dir=out/quickstart
    python sample.py --out_dir=out/quickstart --start="def main(" --num_samples=1 --max_new_tokens=300
    python sample.py --ckpt=out/quickstart/ckpt.pt --start=FILE:prompt.txt --temperature=0.6 --top_p=0.9
    python sample.py --ckpt=hf:out/quickstart/hf        # a Hugging Face GPT-2 or Llama folder (see export.py)
    python sample.py --out_dir=out/sft_quickstart --chat=True                     # talk to a chat model
    python sample.py --out_dir=out/sft_quickstart --chat=True --prompt="Name a color." --temperature=0
    python sample.py --out_dir=out/multi30k_de_en --translate="Ein Hund rennt über die Wiese."
    python sample.py --out_dir=out/multi30k_de_en --translate_file=sentences.de --beam_size=4 > sentences.en

Reads the checkpoint only: the model, its config and its tokenizer are all in it. With --chat=True each line
of stdin is a user turn, answered as it is generated, the whole conversation the context of the next answer.
A translation checkpoint translates each line of --translate_file to one line of stdout (notes to stderr).
"""

import os
import sys

import torch

from chat import has_chat_tokens, prompt_ids as chat_prompt_ids, read_text, stop_ids
from checkpoint import model_for_generation
from configurator import configure
from runtime import autocast_context, pick_device, pick_dtype
from translation import read_lines, translate_lines

# -----------------------------------------------------------------------------
out_dir = "out/default"  # reads out_dir/ckpt.pt ...
ckpt = ""  # ... unless a checkpoint path, or hf:FOLDER for a Hugging Face folder, is given here
start = ""  # the prompt: text, or FILE:path to read it from a file; empty starts a new document
num_samples = 3
max_new_tokens = 500
temperature = 0.8  # 0 is greedy; higher is more random
top_k = 200  # sample among the k most likely tokens; 0 for all
top_p = 1.0  # sample among the most likely tokens whose probabilities add up to p; 1.0 for all
seed = 1337
device = "auto"
dtype = "auto"
# chat models
chat = False  # a conversation: user turns from stdin (one per line), answers until <|end|>
prompt = ""  # with chat: answer this one message and stop
system = ""  # with chat: a system message that opens the conversation
# translation checkpoints (translate.py)
translate = ""  # a sentence to translate
translate_file = ""  # a file (plain or .gz) whose lines to translate, one translation per line on stdout
beam_size = 1  # 1 is greedy
length_penalty = 1.0  # beam search ranks finished translations by log-probability / length**length_penalty
config = configure(globals())
# -----------------------------------------------------------------------------

if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or num_samples < 1 or max_new_tokens < 0:
    raise SystemExit("config error: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, num_samples >= 1, "
                     "max_new_tokens >= 0")
translating = bool(translate or translate_file)
if ((prompt or system) and not chat) or (chat and start) or (translating and (chat or start)) or beam_size < 1:
    raise SystemExit("config error: --prompt and --system are for --chat=True, --start for plain text, --translate "
                     "and --translate_file for a translation model; pick one mode (and beam_size >= 1)")
lines = (read_lines(translate_file) if translate_file else [translate]) if translating else None  # before the model
device = pick_device(device)
autocast = autocast_context(device, pick_dtype(device, dtype))
torch.manual_seed(seed)

ckpt_path = ckpt or os.path.join(out_dir, "ckpt.pt")
model, tokenizer, translator = model_for_generation(ckpt_path, device, "sample")
block_size = model.config.block_size
if chat and not has_chat_tokens(tokenizer):
    raise SystemExit(f"sample error: {ckpt_path} is not a chat model (it has no chat tokens); fine-tune it with "
                     "sft.py first, or leave out --chat")
if translating != translator:
    raise SystemExit(f"sample error: {ckpt_path} is " + ("a decoder-only model, which does not translate; train a "
                     "translation model with translate.py" if translating else "a translation model; give it "
                     "--translate=TEXT or --translate_file=FILE"))

if start.startswith("FILE:"):
    start = read_text(start[len("FILE:"):], "sample", "prompt file", "check the path after --start=FILE:")
prompt_ids = tokenizer.encode(start) if start else [tokenizer.eot_id]
if len(prompt_ids) > block_size:
    print(f"warning: the prompt is {len(prompt_ids)} tokens, longer than the model's context of {block_size}; "
          f"keeping its last {block_size}", file=sys.stderr)


def stream(ids, stop_tokens=()):
    """Print what follows ids (the decoder keeps their last block_size) as it comes; its ids, stop token left out."""
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generated, shown = [], ""
    with autocast:
        for token in model.generate_stream(idx, max_new_tokens, temperature, top_k or None, top_p, stop_tokens):
            if token.item() in stop_tokens:
                break
            generated.append(token.item())
            # Decode everything so far and print what is new: one token may hold part of a
            # multi-byte character, which shows as U+FFFD until the rest arrives.
            text = tokenizer.decode(generated)
            if not text.endswith("\ufffd"):
                print(text[len(shown):], end="", flush=True)
                shown = text
    print(tokenizer.decode(generated)[len(shown):])
    return generated


if translating:
    translations, n_cut = translate_lines(model, tokenizer, lines, beam_size=beam_size, length_penalty=length_penalty,
                                          autocast=autocast, device=device)
    if n_cut:
        print(f"note: {n_cut} of {len(lines)} lines were longer than the model's block_size={block_size} tokens "
              "and were cut", file=sys.stderr)
    print("".join(t + "\n" for t in translations), end="")
elif chat:
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            text = prompt or input("> ")
        except EOFError:  # end of the piped input, or Ctrl-D
            break
        if not (prompt or text.strip()):
            continue
        messages.append({"role": "user", "content": text})
        ids = chat_prompt_ids(tokenizer, messages)
        if len(ids) > block_size:
            print(f"warning: the conversation is {len(ids)} tokens, longer than the model's context of {block_size}; "
                  f"the model sees its last {block_size}", file=sys.stderr)
        answer = stream(ids, stop_ids(tokenizer))
        messages.append({"role": "assistant", "content": tokenizer.decode(answer)})
        if prompt:
            break
else:
    for i in range(num_samples):
        print(f"--- sample {i + 1}/{num_samples} ---")
        print(start, end="", flush=True)
        stream(prompt_ids)
