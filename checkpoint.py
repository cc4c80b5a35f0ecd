"""
Checkpoint save and load, shared by every stage script.

A checkpoint is one file that torch.load(weights_only=True) reads: a dict with
  kind          'pretrain' (later: 'sft', 'dpo'), what produced it
  model_config  GPTConfig fields
  model         the model's state_dict
  tokenizer     the tokenizer description from meta.json, so sample.py and
                evaluate.py need nothing but this file
  config        the run's final config
  step, best_val_loss, optimizer, rng   for resuming a run

Saving writes a temporary file beside the target, flushes it to disk and renames
it into place, so a crash mid-write never leaves a half-written ckpt.pt where a
reader would take it. Loading uses weights_only=True because a checkpoint is
untrusted input: a plain pickle could run arbitrary code.
"""

import os
import tempfile

import torch

from model import GPT, GPTConfig
from tokenizer import Tokenizer


def save_checkpoint(checkpoint, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint, or stop with one line saying what is wrong with the file."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint error: no checkpoint at {path}; train one first (python train.py ...) or pass its path")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().split(". ")[0][:160] or type(e).__name__  # torch's messages run long
        raise SystemExit(f"checkpoint error: {path} is corrupt or not a checkpoint ({reason}); "
                         "use an earlier checkpoint or train again") from None
    missing = [k for k in ("model_config", "model", "tokenizer") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise SystemExit(f"checkpoint error: {path} lacks {', '.join(missing)}; it was not written by this repository's train.py")
    return checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint"):
    """The GPT and Tokenizer a checkpoint describes, weights loaded (on the CPU, in float32)."""
    model = GPT(GPTConfig.from_dict(checkpoint["model_config"]))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise SystemExit(f"checkpoint error: {path}'s weights do not fit its model config "
                         f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return model, Tokenizer(checkpoint["tokenizer"])
