"""
Checkpoints: save and load, shared by every stage script, and a training run's checkpoints,
written in the background while it trains and resumed exactly (weights, optimizer, step and
every process's random state).

A checkpoint is one file that torch.load(weights_only=True) reads: a dict with
  kind          'pretrain', 'sft', 'dpo', 'rl' or 'translate', what produced it
  model_config  GPTConfig fields
  model         the model's state_dict (of a LoRA checkpoint: the adapters only)
  lora, base    a LoRA checkpoint's settings and base checkpoint (path, step, sha256; see lora.py)
  reference     dpo.py's reference model's checkpoint, named as a base is
  tokenizer     the tokenizer description from meta.json, so sample.py and
                evaluate.py need nothing but this file
  config        the run's final config
  step, optimizer, rng   for resuming a run (a LoRA checkpoint's optimizer state is the adapters')
  val_loss, val, best_val_loss   the evaluation at that step (and train.py's best so far)

Saving writes a temporary file beside the target, flushed to disk, and renames it into place, so a
crash never leaves a half-written ckpt.pt; a full disk stops the run with one line. Loading uses
weights_only=True: a checkpoint is untrusted input, and a plain pickle could run arbitrary code.

A training run keeps its last few as out_dir/ckpt-<step>.pt (ckpt.pt a hard link to the newest), written
from a thread (docs/train.md). Full (unsharded) state dicts make a checkpoint one file from one process,
DDP or FSDP at any world size, that loads into any of them.
"""

import errno
import glob
import os
import random
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed

from hf import read_folder
from lora import lora_state, merge_lora, model_with_adapters
from model import GPT, EncoderDecoder, EncoderDecoderConfig, GPTConfig
from runlog import save_atomically
from tokenizer import Tokenizer


def save_checkpoint(checkpoint, path):
    try:
        save_atomically(path, lambda f: torch.save(checkpoint, f), "wb", sync=True)
    except BaseException as e:
        if _disk_full(e):
            folder = os.path.dirname(os.path.abspath(path))
            raise SystemExit(f"disk error: no space left for {path} (it needs about {_tensor_bytes(checkpoint) / 1e6:,.1f} "
                             f"MB, {shutil.disk_usage(folder).free / 1e6:,.1f} MB are free); the earlier checkpoints are "
                             "kept. Free some space: a run needs room for keep_checkpoints+1 checkpoints") from None
        raise


def _disk_full(error):
    """Whether error, or one it was raised while handling (torch.save wraps the OSError), is a full disk."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _tensor_bytes(value):
    if isinstance(value, (dict, list, tuple)):
        return sum(map(_tensor_bytes, value.values() if isinstance(value, dict) else value))
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint, or stop with one line saying what is wrong with the file. 'hf:FOLDER' reads a
    Hugging Face GPT-2 or Llama folder as a checkpoint of kind 'hf' (model_config, model, tokenizer; see hf.py)."""
    if path.startswith("hf:"):
        return read_folder(path[len("hf:"):])
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint error: no checkpoint at {path}; train one first (python train.py ...) or pass its path")
    try:
        # mmap: tensors are read from the file as they are used, so N processes loading one checkpoint
        # share the page cache instead of each holding a copy
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:
        # torch's messages run long, and of a file that is no zip archive name the wrong cause (mmap)
        reason = (str(e).strip().split(". ")[0][:160] or type(e).__name__) if zipfile.is_zipfile(path) else \
            "not a file torch.save wrote"
        raise SystemExit(f"checkpoint error: {path} is corrupt or not a checkpoint ({reason}); "
                         "use an earlier checkpoint or train again") from None
    missing = [k for k in ("model_config", "model", "tokenizer") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise SystemExit(f"checkpoint error: {path} lacks {', '.join(missing)}; it was not written by this repository's train.py")
    try:
        model_class_of(checkpoint)[1].from_dict(checkpoint["model_config"])
    except (ValueError, TypeError) as e:
        raise SystemExit(f"checkpoint error: {path} has an invalid model_config ({e}); "
                         "use an earlier checkpoint or train again") from None
    return checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint"):
    """The GPT and Tokenizer a checkpoint describes, weights loaded (on the CPU, in float32). Of a LoRA
    checkpoint: its base with the adapters added, not merged (lora.merge_lora folds them in)."""
    if "lora" in checkpoint:
        return model_with_adapters(checkpoint, path, lambda base: model_from_checkpoint(load_checkpoint(base), base))
    model_class, config_class = model_class_of(checkpoint)
    model = model_class(config_class.from_dict(checkpoint["model_config"]))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise SystemExit(f"checkpoint error: {path}'s weights do not fit its model config "
                         f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return model, Tokenizer(checkpoint["tokenizer"])


def model_class_of(checkpoint):
    """(model class, config class) of a checkpoint: an encoder-decoder's config has n_encoder_layer."""
    encoder_decoder = isinstance(checkpoint["model_config"], dict) and "n_encoder_layer" in checkpoint["model_config"]
    return (EncoderDecoder, EncoderDecoderConfig) if encoder_decoder else (GPT, GPTConfig)


def model_for_generation(path, device, script):
    """(model, tokenizer, whether it translates) of checkpoint `path`, for sample.py and serve.py: adapters
    folded in, eval mode, on device; weights not all finite stop with one line naming `script`. A translator
    is translate.py's: an encoder-decoder, or a decoder-only GPT continuing `source <end-of-text>`."""
    checkpoint = load_checkpoint(path)
    model, tokenizer = model_from_checkpoint(checkpoint, path)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise SystemExit(f"{script} error: {path} has NaN or infinite weights (its run diverged); use an earlier "
                         "checkpoint of the run (ckpt-*.pt) or train again with a lower learning_rate")
    translator = isinstance(model, EncoderDecoder) or checkpoint.get("kind") == "translate"
    return merge_lora(model).eval().to(device), tokenizer, translator


def gather_training_state(model, optimizer, keep=True):
    """Copies of the full model and optimizer state dicts on the CPU where keep is true (None elsewhere).
    Under FSDP every process must call this: the shards are gathered one tensor at a time."""
    # imported here: they take most of a second, and sample.py and evaluate.py never need them
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    def whole_on_cpu(value):
        if isinstance(value, dict):
            return {k: whole_on_cpu(v) for k, v in value.items()}
        if isinstance(value, list):
            return [whole_on_cpu(v) for v in value]
        if isinstance(value, DTensor):
            if value.device.type != value.device_mesh.device_type:  # offloaded to the CPU: gather on the GPU
                value = value.to(value.device_mesh.device_type)
            value = value.full_tensor()  # a collective: every process holding a shard takes part
        # a copy even of a CPU tensor: training goes on changing the original while the copy is written
        return value.detach().to("cpu", copy=True) if keep and isinstance(value, torch.Tensor) else value

    # Under FSDP these hold DTensors (each process's shards); torch's own full_state_dict option
    # keeps the gathered result on global rank 0 only, but under pipeline parallelism each stage's
    # first process must keep its stage's part.
    model_state, optimizer_state = map(whole_on_cpu, get_state_dict(model, optimizer))
    return (model_state, optimizer_state) if keep else (None, None)


def restore_training_state(model, optimizer, checkpoint):
    """Load a checkpoint's weights (and optimizer state, if given) into a model that FSDP may shard, every
    process passing the whole checkpoint; weights it lacks (a LoRA checkpoint's base's) keep their values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, () if optimizer is None else optimizer, model_state_dict=checkpoint["model"],
                   optim_state_dict={} if optimizer is None else checkpoint["optimizer"],
                   options=StateDictOptions(full_state_dict=True))


# -----------------------------------------------------------------------------
# a training run's checkpoints: written in the background, resumed exactly

def _step_of(path):
    match = re.fullmatch(r"ckpt-(\d+)\.pt", os.path.basename(path))
    return int(match.group(1)) if match else None


def checkpoints_newest_first(out_dir):
    """The step-numbered checkpoints of a run, newest first."""
    paths = [p for p in glob.glob(os.path.join(out_dir, "ckpt-*.pt")) if _step_of(p) is not None]
    return sorted(paths, key=_step_of, reverse=True)


def run_checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"ckpt-{step:07d}.pt")


def save_run_checkpoint(checkpoint, out_dir, keep):
    """Write out_dir/ckpt-<step>.pt, point out_dir/ckpt.pt at it, and delete all but the newest keep."""
    path = run_checkpoint_path(out_dir, checkpoint["step"])
    save_checkpoint(checkpoint, path)
    latest = os.path.join(out_dir, "ckpt.pt")
    tmp = latest + ".link.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(path, tmp)
        os.replace(tmp, latest)  # readers see the old newest or the new one, never neither
    except OSError:  # a filesystem without hard links: a second copy
        save_checkpoint(checkpoint, latest)
    # Files of later steps belong to a future this run abandoned (it fell back past a damaged
    # checkpoint): they must not be taken as the newest at the next restart.
    kept = [p for p in checkpoints_newest_first(out_dir) if _step_of(p) <= checkpoint["step"]]
    for old in set(checkpoints_newest_first(out_dir)) - set(kept[: max(1, keep)]):
        os.unlink(old)
    return path


def load_newest_checkpoint(out_dir):
    """(checkpoint, path) of out_dir's newest that loads, past damaged ones (saying so); (None, None) if none."""
    for path in checkpoints_newest_first(out_dir):
        try:
            return load_checkpoint(path), path
        except SystemExit as e:
            print(f"warning: {e}; trying the previous checkpoint")
    return None, None


class BackgroundCheckpointWriter:
    """Writes run checkpoints (a copy training no longer changes) from a thread, one at a time, while
    training goes on. wait(), before each write and at the end, stops with one line if the last failed."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self.pending = None  # the Future of the write under way
        self.written = None  # the path of the last checkpoint written to disk

    def save(self, checkpoint, out_dir, keep):
        """Start writing checkpoint; returns the path it goes to."""
        self.wait()
        self.pending = self.pool.submit(save_run_checkpoint, checkpoint, out_dir, keep)
        return run_checkpoint_path(out_dir, checkpoint["step"])

    def wait(self):
        """Until the checkpoint under way is on disk (one line if writing it failed); call it before the run ends."""
        if self.pending is None:
            return
        error = self.pending.exception()  # a Ctrl-C meanwhile leaves it pending, for the handler's own wait()
        pending, self.pending = self.pending, None
        if error is None:
            self.written = pending.result()
        elif isinstance(error, SystemExit):  # already the one line to stop with
            raise error
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SystemExit(f"checkpoint error: writing a checkpoint to disk failed ({reason}); check that the "
                             "out_dir is writable and has free space, then resume from the last checkpoint")


checkpoint_writer = BackgroundCheckpointWriter()  # rank 0's: one per process, as there is one run per process


def save_training_checkpoint(raw_model, optimizer, dist, out_dir, keep, pipeline=None, lora=None, base=None,
                             **fields):
    """Gather the model, optimizer and every process's random state into CPU memory, and (rank 0) write them
    with fields (kind, step, config, ...) as out_dir/ckpt-<step>.pt in the background (with lora: the adapters
    only, with lora and base). Every process must call this; returns the path being written (None elsewhere)."""
    if pipeline is None:
        model_state, optimizer_state = gather_training_state(raw_model, optimizer, keep=dist.is_main)
    else:
        model_state, optimizer_state = pipeline.training_state(raw_model, optimizer, dist)
    rng_states = [None] * dist.world_size if dist.world_size > 1 else [rng_state()]
    if dist.world_size > 1:
        torch.distributed.all_gather_object(rng_states, rng_state())
    if not dist.is_main:
        return None
    weights = {"model": model_state} if lora is None else {"model": lora_state(model_state), "lora": lora, "base": base}
    checkpoint = {"model_config": asdict(raw_model.config), **weights, "optimizer": optimizer_state, "rng": rng_states,
                  **fields}
    return checkpoint_writer.save(checkpoint, out_dir, keep)


def rng_state():
    """Every random-number generator's state, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    key, pos = torch.from_numpy(np_state["state"]["key"].astype(np.int64)), np_state["state"]["pos"]
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": key, "pos": pos, "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]}}
    if torch.cuda.is_available():
        # this process's GPU only: a process uses one, and a resumed run may see fewer GPUs per process
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(rng_states, dist, log=print):
    """Each process takes back its own random state, if the checkpoint has one per process."""
    if len(rng_states) != dist.world_size:
        log(f"note: the checkpoint was written by {len(rng_states)} processes, this run has {dist.world_size}: "
            "the weights, optimizer and data position resume exactly, dropout's random state starts afresh")
        return
    state = rng_states[dist.rank]
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # older checkpoints hold every visible GPU's state: take this process's
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def checkpoint_to_resume(resume, out_dir, kind, config, model_keys):
    """The checkpoint, and its path, that a post-training run of this kind continues: the newest of out_dir
    that loads ('yes': one must exist; 'auto': else (None, None)). Stops with one line if another script
    wrote it, it has no optimizer state, or it was trained with other values of model_keys."""
    if resume == "no":
        return None, None
    checkpoint, path = load_newest_checkpoint(out_dir)
    if checkpoint is None:
        if resume == "yes":
            raise SystemExit(f"config error: resume='yes' but {out_dir} has no checkpoint that loads; check --out_dir, "
                             "or start a new run with --resume=no")
        return None, None
    if checkpoint.get("kind") != kind:
        raise SystemExit(f"checkpoint error: {path} is of kind '{checkpoint.get('kind')}', not one of {kind}.py's; "
                         "resume it with the script that wrote it, or set another --out_dir")
    if "optimizer" not in checkpoint:
        raise SystemExit(f"checkpoint error: {path} holds no optimizer state (an older {kind}.py wrote it) and cannot "
                         f"resume; start a new run from it with --init_from={path} and another --out_dir")
    for key in model_keys:
        if checkpoint["config"][key] != config[key]:
            raise SystemExit(f"config error: {path} was trained with {key}={checkpoint['config'][key]!r}, this run "
                             f"has {key}={config[key]!r}; resume with the run's value, or set another --out_dir")
    return checkpoint, path
