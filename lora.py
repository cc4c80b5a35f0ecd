"""
LoRA (Hu et al. 2021): fine-tune a frozen model through small low-rank adapters.

    from lora import add_lora, merge_lora
    add_lora(model, rank=8, alpha=16, dropout=0.05, targets=["c_attn", "c_proj", "c_fc"])
    ...                   # train: only the adapters require gradients
    merge_lora(model)     # fold them into the weights: a plain GPT again (export.py does this)

Each targeted linear layer y = W x + b becomes y = W x + b + (alpha / rank) B A x, with A random and
B zero, so the model starts out unchanged and only rank * (in + out) numbers train; alpha / rank keeps
the update's size, and so the learning rate, about the same across ranks (the paper, section 4.1).
The state dict is the base model's plus lora_A and lora_B entries. An adapter checkpoint holds only
those, the settings, and its base's path, step and sha256, which loading checks.
"""

import glob
import hashlib
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from chat import add_chat_tokens


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, linear, rank, alpha, dropout):
        super().__init__()
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, **like))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.enabled:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        return y


def lora_layers(model):
    """(parent module, attribute name, layer) for every LoRA layer of the model."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, LoRALinear)]


def add_lora(model, rank, alpha, dropout, targets):
    """Freeze the model and put adapters on the linear layers of its blocks named in targets."""
    available = {name.split(".")[-1] for name, m in model.blocks[0].named_modules() if isinstance(m, nn.Linear)}
    unknown = set(targets) - available
    if unknown or not targets:
        raise SystemExit(f"config error: lora_targets names {', '.join(sorted(unknown)) or 'no layer'}; "
                         f"the linear layers of a block are {', '.join(sorted(available))}")
    model.requires_grad_(False)
    for block in model.blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha, dropout))


def lora_settings(rank, alpha, dropout, targets):
    """The config keys lora_rank, lora_alpha, lora_dropout and lora_targets ('c_attn,c_proj') as add_lora's
    keyword arguments, which a LoRA checkpoint records; None for rank 0 (every weight trains)."""
    if not rank:
        return None
    return dict(rank=rank, alpha=alpha, dropout=dropout, targets=[t.strip() for t in targets.split(",")])


def merge_lora(model):
    """Fold every adapter into its layer's weight (W += alpha / rank * B A), put plain nn.Linear
    layers back and make every parameter trainable again. A model without adapters is left as it is."""
    layers = lora_layers(model)
    for parent, name, layer in layers:
        linear = nn.Linear(layer.lora_A.size(1), layer.lora_B.size(0), bias=layer.bias is not None, device="meta")
        with torch.no_grad():
            layer.weight += layer.scale * layer.lora_B @ layer.lora_A
        linear.weight, linear.bias = layer.weight, layer.bias
        setattr(parent, name, linear)
    if layers:
        model.requires_grad_(True)
    return model


@contextmanager
def adapters_disabled(model):
    """Within this, the model computes what its base does (dpo.py's reference model)."""
    layers = [layer for _, _, layer in lora_layers(model)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def lora_state(state_dict):
    """The adapter entries of a model's state dict: all an adapter checkpoint stores of the weights."""
    return {k: v for k, v in state_dict.items() if k.endswith((".lora_A", ".lora_B"))}


def checkpoint_sha256(path):
    """sha256 of a checkpoint file, or of an hf:FOLDER's files in name order."""
    folder = Path(path.removeprefix("hf:"))
    files = sorted(f for f in folder.iterdir() if f.is_file()) if path.startswith("hf:") else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def describe_base(path, checkpoint):
    """What an adapter checkpoint records of its base checkpoint: its absolute path, step and sha256.
    A run's ckpt.pt moves on with the run, so the step-numbered file it links to is named instead."""
    if path.startswith("hf:"):
        absolute = "hf:" + os.path.abspath(path[len("hf:"):])
    else:
        absolute = os.path.abspath(path)
        siblings = glob.glob(os.path.join(os.path.dirname(absolute), "ckpt-*.pt"))
        absolute = next((p for p in siblings if os.path.samefile(p, absolute)), absolute)
    return {"path": absolute, "step": checkpoint.get("step"), "sha256": checkpoint_sha256(path)}


def checked_base(base, path):
    """The path of the base (describe_base) of checkpoint `path`, checked to be there and unchanged: adapters,
    or a resumed run's reference, never go on weights other than those they were trained with."""
    where = f"{path} was trained on {base['path']} (step {base['step']}, sha256 {base['sha256'][:12]}...)"
    if not os.path.exists(base["path"].removeprefix("hf:")):
        raise SystemExit(f"checkpoint error: {where}, which is missing; put it back")
    if checkpoint_sha256(base["path"]) != base["sha256"]:
        raise SystemExit(f"checkpoint error: {where}, which has changed since (another sha256); "
                         "restore that file, or train again on the new one")
    return base["path"]


def model_with_adapters(checkpoint, path, load_base):
    """The model and tokenizer of an adapter checkpoint: its base (from load_base(path)), its own adapters merged
    as the trainer did, with the chat tokens if the adapters were trained with them, and the adapters."""
    model, tokenizer = load_base(checked_base(checkpoint["base"], path))
    merge_lora(model)
    if checkpoint["model_config"]["vocab_size"] > model.config.vocab_size:
        model, tokenizer = add_chat_tokens(model, tokenizer)
    add_lora(model, **checkpoint["lora"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    wrong = [k for k, v in checkpoint["model"].items() if k in shapes and v.shape != shapes[k]]
    if wrong:  # a base of another shape (the base entry edited, or the file replaced along with its sha256)
        raise SystemExit(f"checkpoint error: {path}'s adapters do not fit its base {checkpoint['base']['path']} "
                         f"({wrong[0]} is {list(checkpoint['model'][wrong[0]].shape)} in the adapters, "
                         f"{list(shapes[wrong[0]])} in the base); load them on the model they were trained on")
    result = model.load_state_dict(checkpoint["model"], strict=False)
    missing = [k for k in result.missing_keys if k.endswith((".lora_A", ".lora_B"))]
    if missing or result.unexpected_keys:
        raise SystemExit(f"checkpoint error: {path}'s adapters do not fit its base "
                         f"({(missing + result.unexpected_keys)[0]} {'missing' if missing else 'unexpected'})")
    return model, tokenizer
