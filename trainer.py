"""
The skeleton every trainer shares (train.py, sft.py, dpo.py, rl.py, translate.py), as plain functions
that a script calls where a reader sees them, so that it still reads top to bottom with its own
loop in view. A post-training script is written like this (sft.py is the shortest whole one):

    dist, dtype, autocast = start(device, dtype, seed, parallelism)
    stop = take_out_dir(out_dir, dist, "--resume=yes")      # one run per out_dir; Ctrl-C ends it in one line
    checkpoint, ckpt_path = checkpoint_to_resume(resume, out_dir, "rl", config, TUNED_KEYS)
    model, tokenizer, origin = model_to_tune(init_from, checkpoint, ckpt_path, dist.log)
    model, raw_model, optimizer, scaler, step, run_log = prepare_to_tune(model, checkpoint, lora, dist, dtype, config, "rl")
    pace = Pace(step, max_iters)
    while True:                                             # its own data, batches and loss around these
        lr, done = begin_step(step, max_iters, stop, optimizer, config)   # the one place where the run decides to end
        if step % eval_interval == 0 or done:
            save(raw_model, optimizer, dist, out_dir, keep_checkpoints, run_log, ...)
        if done:
            break
        loss = optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip)
        step += 1                                           # at log steps: stop_if_not_finite, pace.lap
    finish(run_log, dist, stop, step, f"done after {step} steps")
"""

import copy
import math
import time

import torch

from chat import has_chat_tokens
from checkpoint import (checkpoint_writer, load_checkpoint, model_from_checkpoint, restore_rng_state,
                        restore_training_state, save_training_checkpoint)
from lora import add_lora, adapters_disabled, checked_base, describe_base, merge_lora
from model import EncoderDecoder
from optim import learning_rate_at, make_optimizer, set_learning_rate
from outdir import (StopSignals, exit_quietly_on_interrupt, lock_out_dir, replace_earlier_run, run_log_path,
                    stop_unless_finite)
from parallel import place_model, wrap_model
from runlog import RunLog, format_duration
from runtime import (autocast_context, device_name, pick_dtype, seed_everything, setup_distributed,
                     teardown_distributed)

# The config keys that fix a post-training run's model: a resumed run must have the values it started with.
TUNED_KEYS = ("init_from", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def start(device, dtype, seed, parallelism, cpu_offload=False):
    """Join the processes (under torchrun) and pick the device and precision: (dist, dtype, autocast).
    Every process seeds its generators alike, so every process builds the same initial weights."""
    dist = setup_distributed(device, cpu_offload=parallelism == "fsdp" and cpu_offload)
    dtype = pick_dtype(dist.device, dtype)
    seed_everything(seed)
    if dist.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # float32 on tensor cores
    return dist, dtype, autocast_context(dist.device, dtype)


def gradient_accumulation(key, total, **parts):
    """Micro-steps per optimizer step: total (the value of the config key `key`) over the product of
    parts, what one micro-step holds over all processes; a config error unless it divides."""
    per_micro_step = math.prod(parts.values())
    if total % per_micro_step:
        raise SystemExit(f"config error: {key}={total} is not a multiple of {' x '.join(parts)} = "
                         f"{' x '.join(map(str, parts.values()))}; change one of them")
    return total // per_micro_step


def take_out_dir(out_dir, dist, how_to_continue):
    """Lock out_dir for this run (outdir.py), and end the run on Ctrl-C with one line saying how to go on.
    Returns its StopSignals: SIGTERM or SIGUSR1 (a preemption) makes stop.requested() true on every process
    at the same step, and the run saves that step as at its end and exits with the signal's status."""
    lock_out_dir(out_dir, dist, dist.log)
    exit_quietly_on_interrupt(out_dir, dist, how_to_continue)
    return StopSignals(dist, how_to_continue)


def model_to_tune(init_from, checkpoint, ckpt_path, log, describe_start=True, chat_script=None):
    """(model, tokenizer, origin) a post-training run tunes: a resumed run's checkpoint, adapters included, with
    the origin it recorded (its reference, else its base); a new run's init_from, merged, with origin its
    lora.describe_base (if describe_start), and with chat_script (dpo, rl) an error unless it has chat tokens."""
    if checkpoint is not None:
        log(f"resuming {ckpt_path} at step {checkpoint['step']}")
        return *model_from_checkpoint(checkpoint, ckpt_path), checkpoint.get("reference", checkpoint.get("base"))
    start_checkpoint = load_checkpoint(init_from)
    model, tokenizer = model_from_checkpoint(start_checkpoint, init_from)
    if isinstance(model, EncoderDecoder):  # its forward takes a source and a target: no chat turn fits it
        raise SystemExit(f"checkpoint error: {init_from} is a translation model (encoder-decoder), which post-training "
                         "does not tune; start from a decoder-only checkpoint (train.py's, sft.py's)")
    if chat_script and not has_chat_tokens(tokenizer):
        raise SystemExit(f"{chat_script} error: {init_from} is not a chat model (it has no chat tokens); fine-tune "
                         "it with sft.py first and pass that checkpoint")
    return merge_lora(model), tokenizer, describe_base(init_from, start_checkpoint) if describe_start else None


def reference_model(model, lora, checkpoint, reference_file, ckpt_path, dist, parallelism, dtype):
    """The frozen starting model that dpo.py and rl.py measure the policy against: None with LoRA (the
    policy with its adapters off is the starting model, at no cost in memory); else a frozen copy of
    the model about to be tuned, or for a resumed run the starting checkpoint reference_file again."""
    if lora:
        return None
    if checkpoint is None:
        reference = copy.deepcopy(model)
    else:
        path = checked_base(reference_file, ckpt_path)
        reference = merge_lora(model_from_checkpoint(load_checkpoint(path), path)[0])
    reference.requires_grad_(False).eval()
    place_model(reference, dist, parallelism, dtype)
    return reference


@torch.no_grad()
def on_reference(reference, raw_model, forward):
    """forward(net) on reference_model()'s model: the frozen copy, or with LoRA the policy, adapters off, no dropout."""
    if reference is not None:
        return forward(reference)
    was_training = raw_model.training
    raw_model.eval()
    with adapters_disabled(raw_model):
        result = forward(raw_model)
    raw_model.train(was_training)
    return result


def context_length(block_size, model):
    """The block_size key's tokens (0: the model's context), which the model's context must hold."""
    if block_size > model.config.block_size:
        raise SystemExit(f"config error: block_size={block_size} is longer than the model's context of "
                         f"{model.config.block_size}; set --block_size=0 to use it")
    return block_size or model.config.block_size


def prepare_to_tune(model, checkpoint, lora, dist, dtype, config, stage, note=""):
    """A post-training run's model made ready for its loop: a new run's LoRA adapters added, a line on how many
    parameters train (with note), the model placed with its AdamW and a resumed run's state, wrapped; and its
    RunLog, from the script's config. (model to call, raw model to save, optimizer, scaler, step, run_log)."""
    if lora and checkpoint is None:
        add_lora(model, **lora)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dist.log(f"model: {model.num_params() / 1e6:.2f}M parameters, {trained:,} of them trained "
             f"({100 * trained / sum(p.numel() for p in model.parameters()):.2f}%){note}")
    place_model(model, dist, config["parallelism"], dtype)
    seed_everything(config["seed"] + dist.rank)  # different dropout masks in each process
    optimizer = make_optimizer(model, config["learning_rate"], config["weight_decay"],
                               (config["beta1"], config["beta2"]), dist.device)
    step = 0 if checkpoint is None else resume_state(model, optimizer, checkpoint, dist)
    wrapped = wrap_model(model, dist, config["parallelism"], config["compile"], dist.log)
    run_log = open_run_log(config["out_dir"], config, dist, dtype, step, stage, data=config["data"],
                           parameters=model.num_params(), trained_parameters=trained)
    return wrapped, model, optimizer, gradient_scaler(dist, dtype), step, run_log


def begin_step(step, max_iters, stop, optimizer, config):
    """(The step's learning rate, now set: warmup, then a cosine to min_lr at max_iters; whether the run ends here)."""
    lr = set_learning_rate(optimizer, learning_rate_at(step, config["learning_rate"], config["warmup_iters"],
                                                       max_iters, config["min_lr"]))
    return lr, step >= max_iters or stop.requested()


def resume_state(model, optimizer, checkpoint, dist):
    """Put a checkpoint's weights, optimizer state and this process's random state back; returns its step."""
    restore_training_state(model, optimizer, checkpoint)
    restore_rng_state(checkpoint["rng"], dist, dist.log)
    return checkpoint["step"]


def gradient_scaler(dist, dtype):
    return torch.amp.GradScaler(dist.device.split(":")[0], enabled=dtype == "float16")  # fp16 needs loss scaling


def open_run_log(out_dir, config, dist, dtype, step, stage, **facts):
    """The run's RunLog: a resumed run (step > 0) goes on in metrics.jsonl from its step; a new one logs beside it."""
    return RunLog(out_dir, config, dist.is_main, run_log_path(out_dir, resumed=step > 0), resumed_at=step or None,
                  stage=stage, device=device_name(dist.device), processes=dist.world_size, dtype=dtype, **facts)


def save(raw_model, optimizer, dist, out_dir, keep, run_log, script, losses, pipeline=None, lora=None, base=None,
         **fields):
    """At an evaluation, on every process: stop if the model or losses are not finite, else write the checkpoint
    in the background; a new run's first one, once on disk, replaces the earlier run in out_dir."""
    stop_unless_finite(raw_model, losses, dist, script, fields["step"], out_dir)
    path = save_training_checkpoint(raw_model, optimizer, dist, out_dir, keep, pipeline, lora, base, **fields)
    dist.log(f"saving {path} in the background")
    if dist.is_main and not run_log.owns_folder():
        checkpoint_writer.wait()
        run_log.metrics_path = replace_earlier_run(out_dir, path, run_log.metrics_path, dist.log)


def stop_if_not_finite(loss, step, dist, script, out_dir):
    """At a log step: stop, without saving, if the training loss (the same on every process) is not finite."""
    if not math.isfinite(loss):
        # every process reaches this together; one message is enough
        raise SystemExit(f"{script} error: the loss is not finite ({loss}) at step {step}; stopping without saving, "
                         f"so {out_dir} keeps the last good checkpoint. Lower learning_rate or check the data."
                         if dist.is_main else 1)


class Pace:
    """Seconds per optimizer step between log lines, evaluations left out, and the time left at that pace."""

    def __init__(self, step, max_iters):
        self.max_iters = max_iters
        self.restart(step)

    def restart(self, step):
        """Count from now, at step: after an evaluation, whose time is no step's."""
        self.since, self.since_step = time.time(), step

    def lap(self, step, seconds_left=None):
        """(seconds per step since the last lap, 'N ms/step | eta T' for the log line); counts on from now.
        The eta is seconds_left for a run that ends on the clock, else max_iters' steps left at this pace."""
        seconds = (time.time() - self.since) / (step - self.since_step)
        self.restart(step)
        eta = (self.max_iters - step) * seconds if seconds_left is None else max(0.0, seconds_left)
        return seconds, f"{1000 * seconds:.0f} ms/step | eta {format_duration(eta)}"


def finish(run_log, dist, stop, step, line):
    """The end of a run: the last checkpoint on disk, the plot and report card, the closing line; or
    for a run that a signal stopped (stop), the line that says so and how to continue."""
    checkpoint_writer.wait()
    run_log.finish()
    if stop.agreed:
        stop.exit(step, checkpoint_writer.written)
    dist.log(line)
    teardown_distributed()
