"""
The Hugging Face formats: model.py's weights as a transformers folder and back.

    python export.py --out_dir=out/quickstart                  # writes out/quickstart/hf (see export.py)
    python train.py --init_from=hf:path/to/folder ...          # fine-tune a GPT-2 or Llama folder
    python sample.py --ckpt=hf:path/to/folder                  # sample from one

GPT2LMHeadModel holds model.py's 'gpt2' style (learned positions, LayerNorm, GELU-tanh, no GQA) and
LlamaForCausalLM its modern style (RoPE, RMSNorm, SwiGLU, GQA); QK-norm, capped logits and mixed
styles have neither and are refused with the option named. The folder's files and the mapping,
tensor by tensor: docs/export.md.
"""

import errno
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from chat import chat_template, has_chat_tokens
from model import GPTConfig
from optional import optional
from runlog import save_atomically
from tokenizer import EOT, Tokenizer, read_ranks

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}  # model.py's two styles in transformers
TOKENIZER_SIDECAR = "tokenizer_description.json"
# Every file export writes; a folder holding anything else is not overwritten.
EXPORT_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                TOKENIZER_SIDECAR)


# -----------------------------------------------------------------------------
# configs

def architecture_of(config):
    """'gpt2' or 'llama', the transformers architecture that expresses config; a one-line error if none does."""
    def refuse(option, why):
        raise SystemExit(f"export error: {option}={getattr(config, option)!r} {why}; GPT-2 (GPT2LMHeadModel, "
                         "llama.cpp's gpt2) needs pos='learned', norm='layernorm', mlp='gelu', n_kv_head=n_head and "
                         "Llama (LlamaForCausalLM, llama.cpp's llama) pos='rope', norm='rmsnorm', mlp='swiglu'; to "
                         "export, train with one of them, e.g. --mlp=swiglu --qk_norm=False --logit_softcap=0")
    for option, unsupported in (("qk_norm", config.qk_norm), ("logit_softcap", config.logit_softcap),
                                ("mlp", config.mlp == "relu2"), ("pos", config.pos == "sinusoidal")):
        if unsupported:
            refuse(option, "has no equivalent in GPT-2 or Llama")
    gpt2 = config.pos == "learned"  # else 'rope': Llama
    for option, needed in (("norm", "layernorm" if gpt2 else "rmsnorm"), ("mlp", "gelu" if gpt2 else "swiglu")):
        if getattr(config, option) != needed:
            refuse(option, f"does not go with pos={config.pos!r} ({'GPT-2' if gpt2 else 'Llama'})")
    if gpt2 and config.n_kv_head != config.n_head:
        refuse("n_kv_head", "does not go with pos='learned' (GPT-2 has no grouped-query attention)")
    return "gpt2" if gpt2 else "llama"


def hf_config(config, eot_id):
    """config.json's contents for a GPTConfig (checked by architecture_of)."""
    if architecture_of(config) == "gpt2":
        return {
            "architectures": [ARCHITECTURES["gpt2"]], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.ffn_hidden,
            "activation_function": "gelu_new",  # GELU with the tanh approximation, as model.py's
            "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "bos_token_id": eot_id, "eos_token_id": eot_id,
        }
    return {
        "architectures": [ARCHITECTURES["llama"]], "model_type": "llama",
        "vocab_size": config.vocab_size, "max_position_embeddings": config.block_size,
        "hidden_size": config.n_embd, "intermediate_size": config.ffn_hidden, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.bias, "mlp_bias": config.bias,
        # transformers 4 reads rope_theta, 5 reads rope_parameters
        "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "bos_token_id": eot_id, "eos_token_id": eot_id,
    }


def gpt_config(hf, folder):
    """The GPTConfig of a folder's config.json; a one-line error for what model.py cannot run."""
    architecture = (hf.get("architectures") or [""])[0]
    if architecture == ARCHITECTURES["gpt2"]:
        checks = [("activation_function", hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
                  ("scale_attn_weights", hf.get("scale_attn_weights", True), (True,)),
                  ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
                  ("add_cross_attention", hf.get("add_cross_attention", False), (False,))]
        fields = dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                      n_head=hf["n_head"], n_embd=hf["n_embd"], ffn_hidden=hf.get("n_inner") or 0,
                      norm="layernorm", mlp="gelu", pos="learned", bias=True,
                      tie_embeddings=hf.get("tie_word_embeddings", True), norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    elif architecture == ARCHITECTURES["llama"]:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 and 4
        heads, width = hf["num_attention_heads"], hf["hidden_size"]
        checks = [("hidden_act", hf.get("hidden_act", "silu"), ("silu",)),
                  ("head_dim", hf.get("head_dim") or width // heads, (width // heads,)),
                  ("rope_type", rope.get("rope_type", rope.get("type", "default")), ("default",))]
        fields = dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                      n_layer=hf["num_hidden_layers"], n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
                      n_embd=width, ffn_hidden=hf["intermediate_size"], norm="rmsnorm", mlp="swiglu", pos="rope",
                      rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                      bias=bool(hf.get("attention_bias") or hf.get("mlp_bias")),
                      tie_embeddings=hf.get("tie_word_embeddings", False), norm_eps=hf.get("rms_norm_eps", 1e-6))
    else:
        raise SystemExit(f"import error: {folder}/config.json's architecture is {architecture or 'not given'}; "
                         f"only {' and '.join(ARCHITECTURES.values())} folders can be read")
    for key, value, supported in checks:
        if value not in supported:
            raise SystemExit(f"import error: {folder}/config.json has {key}={value!r}; model.py runs only "
                             + " or ".join(f"{key}={v!r}" for v in supported))
    try:
        return GPTConfig(**fields, qk_norm=False, logit_softcap=0.0, zero_init_proj=False)  # options neither has
    except ValueError as e:
        raise SystemExit(f"import error: {folder}/config.json: {e}") from None


# -----------------------------------------------------------------------------
# weights

def weight_names(config):
    """(our name, [Hugging Face names], transposed) for every tensor. Several names: our tensor is
    theirs stacked along dim 0 (Llama's q, k, v and gate, up). transposed: GPT-2's Conv1D layout."""
    gpt2 = architecture_of(config) == "gpt2"
    linear = (".weight", ".bias") if config.bias or gpt2 else (".weight",)
    norm = (".weight", ".bias") if gpt2 else (".weight",)  # RMSNorm has no bias
    if gpt2:
        names = [("wte.weight", ["transformer.wte.weight"], False), ("wpe.weight", ["transformer.wpe.weight"], False)]
        names += [("ln_f" + p, ["transformer.ln_f" + p], False) for p in norm]
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            names += [(ours + n + p, [theirs + n + p], False) for n in ("ln_1", "ln_2") for p in norm]
            names += [(ours + n + p, [theirs + n + p], p == ".weight")
                      for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for p in linear]
    else:
        names = [("wte.weight", ["model.embed_tokens.weight"], False), ("ln_f.weight", ["model.norm.weight"], False)]
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            names += [(ours + "ln_1.weight", [theirs + "input_layernorm.weight"], False),
                      (ours + "ln_2.weight", [theirs + "post_attention_layernorm.weight"], False)]
            for p in linear:
                names += [(ours + "attn.c_attn" + p, [theirs + f"self_attn.{n}_proj" + p for n in "qkv"], False),
                          (ours + "attn.c_proj" + p, [theirs + "self_attn.o_proj" + p], False),
                          (ours + "mlp.c_fc" + p, [theirs + "mlp.gate_proj" + p, theirs + "mlp.up_proj" + p], False),
                          (ours + "mlp.c_proj" + p, [theirs + "mlp.down_proj" + p], False)]
    if not config.tie_embeddings:
        names.append(("lm_head.weight", ["lm_head.weight"], False))
    return names


def to_hf(state_dict, config):
    """model.py's state dict as Hugging Face tensors (contiguous, unshared: what safetensors writes)."""
    tensors = {}
    for ours, theirs, transposed in weight_names(config):
        tensor = state_dict.get(ours)
        if tensor is None:  # a bias GPT-2 needs and a bias=False model lacks: zero is the same function
            tensor = torch.zeros(len(state_dict[ours.replace(".bias", ".weight")]))
        if ours in ("wte.weight", "lm_head.weight"):
            tensor = tensor[: config.vocab_size]  # drop the padding rows
        sizes = ([config.n_head * config.head_dim] + 2 * [config.n_kv_head * config.head_dim] if ".c_attn." in ours
                 else 2 * [config.ffn_hidden])  # stacked in ours: Llama's q, k, v, or SwiGLU's gate then up
        parts = tensor.split(sizes) if len(theirs) > 1 else [tensor]
        for name, part in zip(theirs, parts):
            # a copy of its own: safetensors refuses tensors that share memory, as split() views do
            tensors[name] = (part.t() if transposed else part).clone(memory_format=torch.contiguous_format)
    return tensors


def from_hf(tensors, config, folder):
    """Hugging Face tensors (float32) as model.py's state dict; a one-line error if one is missing."""
    if architecture_of(config) == "gpt2" and "transformer.wte.weight" not in tensors:  # saved by GPT2Model: no prefix
        tensors = {("transformer." + name if name != "lm_head.weight" else name): t for name, t in tensors.items()}
    state_dict = {}
    for ours, theirs, transposed in weight_names(config):
        missing = [name for name in theirs if name not in tensors]
        if missing and ours.endswith(".bias"):  # e.g. Llama with attention_bias but not mlp_bias
            state_dict[ours] = torch.zeros(len(state_dict[ours.replace(".bias", ".weight")]))
            continue
        if missing:
            raise SystemExit(f"import error: {folder} has no tensor {missing[0]}; the weights do not match config.json")
        tensor = torch.cat([tensors[name] for name in theirs])
        if ours in ("wte.weight", "lm_head.weight"):  # the padding rows: the mean of the real ones
            padding = tensor.mean(dim=0, keepdim=True).expand(config.padded_vocab_size - config.vocab_size, -1)
            tensor = torch.cat([tensor, padding])
        state_dict[ours] = tensor.t().contiguous() if transposed else tensor
    if config.tie_embeddings:
        state_dict["lm_head.weight"] = state_dict["wte.weight"]
    return state_dict


# -----------------------------------------------------------------------------
# tokenizers

def byte_to_unicode():
    """GPT-2's map from bytes to the characters vocab.json and merges.txt are written in: printable Latin-1 bytes
    stand for themselves, the rest (space, control bytes) move to U+0100 and up, so every token is visible."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    moved = [b for b in range(256) if b not in printable]
    return {b: chr(b) if b in printable else chr(256 + moved.index(b)) for b in range(256)}


def merges_of(tokens):
    """The pair each multi-byte token is merged from, in rank order, recovered from the ranks alone:
    BPE on the token's own bytes (lowest-ranked pair first, as tiktoken encodes) stops one merge short
    of the token, at the two parts it was made of."""
    rank = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token in tokens:
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            ranks = [rank.get(a + b, len(tokens)) for a, b in zip(parts, parts[1:])]
            i = ranks.index(min(ranks))
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append(parts)
    return merges


def byte_level_bpe(tokenizer):
    """Any of tokenizer.py's kinds as byte-level BPE for GPT2Tokenizer and llama.cpp's 'gpt2': ({token: id}, the
    merges [(left, right), ...] in rank order) in byte_to_unicode's characters. 'byte' has no merges; 'char' is
    a token per character, its bytes merged left to right (a character's later bytes never begin one)."""
    special_ids = set(tokenizer.special_tokens.values())
    if tokenizer.kind == "bpe":
        ranks = read_ranks(tokenizer.description["ranks"])
        tokens = sorted(ranks, key=ranks.get)
    elif tokenizer.kind == "gpt2":  # tiktoken's ranks are the ids that are not special
        tokens = [tokenizer._enc.decode_single_token_bytes(i) for i in range(tokenizer.vocab_size) if i not in special_ids]
    elif tokenizer.kind == "byte":
        tokens = [bytes([b]) for b in range(256)]
    else:
        tokens = [c.encode("utf-8") for c in tokenizer.chars]
    merges = (list(dict.fromkeys((t[:k], t[k : k + 1]) for t in tokens for k in range(1, len(t))))
              if tokenizer.kind == "char" else merges_of(tokens))  # merges_of: none for 'byte'
    to_char = byte_to_unicode()
    text = lambda token: "".join(to_char[b] for b in token)
    vocab = {text(token): i for i, token in enumerate(tokens)} | tokenizer.special_tokens
    return vocab, [(text(a), text(b)) for a, b in merges]


def bpe_files(tokenizer, block_size):
    """vocab.json, merges.txt and tokenizer_config.json (as text) for a byte-level BPE tokenizer."""
    vocab, merges = byte_level_bpe(tokenizer)
    eot = tokenizer.description.get("eot", EOT)
    config = {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
        "bos_token": eot, "eos_token": eot, "unk_token": eot,
        "added_tokens_decoder": {str(i): {"content": name, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False}
                                 for name, i in tokenizer.special_tokens.items()},
    }
    if has_chat_tokens(tokenizer):
        config["chat_template"] = chat_template(tokenizer)
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
            "tokenizer_config.json": json.dumps(config, indent=2)}


def tokenizer_of(folder):
    """A folder's tokenizer description: its sidecar, else GPT-2's if its vocab.json and merges.txt are GPT-2's."""
    if os.path.isfile(os.path.join(folder, TOKENIZER_SIDECAR)):
        return json.loads(Path(folder, TOKENIZER_SIDECAR).read_text())
    names = ("vocab.json", "merges.txt")
    if all(os.path.isfile(os.path.join(folder, name)) for name in names):
        gpt2 = {"kind": "gpt2", "eot": EOT}
        expected = bpe_files(Tokenizer(gpt2), 0)
        theirs = {name: Path(folder, name).read_text(encoding="utf-8") for name in names}
        merges = lambda text: [line for line in text.splitlines() if line and not line.startswith("#version")]
        if (json.loads(theirs["vocab.json"]) == json.loads(expected["vocab.json"])
                and merges(theirs["merges.txt"]) == merges(expected["merges.txt"])):
            return gpt2
    raise SystemExit(f"import error: {folder} has no {TOKENIZER_SIDECAR} and its tokenizer is not GPT-2's "
                     "(vocab.json and merges.txt); the tokenizers read are this repository's own (that file) and GPT-2's")


# -----------------------------------------------------------------------------
# folders

def write_file(path, data):
    """Write data (bytes, text, or a function that writes the file at the temporary path it is given) atomically
    and flushed to disk; a folder that cannot be written is a one-line error, with no temporary left behind."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    try:
        save_atomically(path, lambda f: data(f.name) if callable(data) else f.write(data), "wb", sync=True)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise SystemExit(f"export error: cannot write into {os.path.dirname(os.path.abspath(path))} "
                             f"({e.strerror}); choose a folder you can write to") from None
        raise SystemExit(f"export error: writing {path} failed ({e.strerror}); free some space or choose another "
                         "folder") from None
    os.chmod(path, 0o644)  # mkstemp's files are private; a model file is meant to be shared


def save_folder(folder, model, tokenizer, dtype=torch.float32):
    """Write model (a GPT) and tokenizer (a Tokenizer) as a Hugging Face folder; return the files written."""
    config = model.config
    hf = hf_config(config, tokenizer.eot_id)  # refuses what has no architecture, before anything is written
    foreign = sorted(set(os.listdir(folder)) - set(EXPORT_FILES)) if os.path.isdir(folder) else []
    if foreign:
        raise SystemExit(f"export error: {folder} holds files export.py does not write ({', '.join(foreign[:3])}); "
                         "choose a new or empty folder")
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = {name: t.to(dtype) for name, t in to_hf(model.state_dict(), config).items()}
    files = {"config.json": json.dumps(hf, indent=2), "model.safetensors": safetensors().save(tensors, metadata={"format": "pt"}),
             TOKENIZER_SIDECAR: json.dumps(tokenizer.description)}
    if tokenizer.kind in ("gpt2", "bpe"):  # byte-level BPE: transformers' GPT2Tokenizer reads it
        files |= bpe_files(tokenizer, config.block_size)
    for name in EXPORT_FILES:
        path = os.path.join(folder, name)
        if name in files:
            write_file(path, files[name])
        elif os.path.exists(path):  # an earlier export's tokenizer files, for another tokenizer
            os.unlink(path)
    return sorted(files)


def safetensors():
    return optional("safetensors.torch", "a Hugging Face folder")


def read_tensors(folder):
    """Every tensor of a folder's model.safetensors or of the shards its index lists, in float32."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise SystemExit(f"import error: {folder} has no model.safetensors or model.safetensors.index.json; "
                         "save the model with transformers' save_pretrained (safetensors)")
    return {k: v.float() for name in files for k, v in safetensors().load_file(os.path.join(folder, name)).items()}


def read_folder(folder):
    """A Hugging Face folder as a checkpoint dict (kind 'hf'): what model_from_checkpoint takes."""
    folder = os.path.expanduser(folder)  # hf:~/models/gpt2 reaches here unexpanded by the shell
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"import error: no {path}; pass hf:FOLDER with a Hugging Face model folder")
    config = gpt_config(json.loads(Path(path).read_text()), folder)
    description = tokenizer_of(folder)
    tokenizer_vocab = Tokenizer(description).vocab_size
    if tokenizer_vocab > config.vocab_size:
        raise SystemExit(f"import error: {folder}'s tokenizer has {tokenizer_vocab} ids but the model only "
                         f"{config.vocab_size}; the tokenizer files belong to another model")
    return {"kind": "hf", "source": folder, "model_config": asdict(config),
            "model": from_hf(read_tensors(folder), config, folder), "tokenizer": description}
