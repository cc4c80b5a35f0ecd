"""
Train a translation model from scratch on parallel text: the encoder-decoder Transformer of
model.py (or, to compare, a decoder-only GPT on `source <end-of-text> target`), scored by
sacreBLEU and chrF on held-out sentences at every evaluation.

    python translate.py config/multi30k_de_en.py        # German->English on Multi30K, 2-core CPU, 30 minutes
    python translate.py config/multi30k_de_en.py --multi30k_dir=../shared/data/translation/multi30k   # offline
    python translate.py config/multi30k_de_en.py --max_seconds=300 --out_dir=out/short
    python translate.py config/multi30k_de_en.py --resume=yes          # continue the run in out_dir
    python translate.py --data=train.de,train.en --val_data=dev.de,dev.en --test_data=test.de,test.en
    python translate.py --data=pairs.jsonl --val_fraction=0.01 --tokenizer=gpt2 --out_dir=out/mine
    python translate.py config/multi30k_de_en.py --architecture=decoder-only --n_layer=6   # the comparison
    torchrun --standalone --nproc_per_node=8 translate.py config/multi30k_de_en_gpu.py

Reads the parallel data (translation.py: two line-aligned files, plain or .gz, a .jsonl file of
source/target records, or Multi30K from multi30k_dir or its public URLs, sha256-checked). Pairs
with an empty side are left out and a side longer than block_size tokens is cut, each with a count
in the log. A new run first learns its tokenizer on the training pairs, both sides (a joint BPE of
vocab_size ids; or GPT-2's), which its checkpoints carry. Writes out_dir/ckpt-<step>.pt (kind
'translate': the model, its tokenizer, the optimizer state, the step and every process's random
state) with out_dir/ckpt.pt linked to the newest, and out_dir/metrics.jsonl, plot.png and report.md.
sample.py --translate_file and evaluate.py read the checkpoint.

Every evaluation reports the held-out loss per target token and the BLEU and chrF of the greedy
translations of the held-out sources (val_data, or a fixed val_fraction of data; bleu_sentences of
them), detokenized and cased, against the raw references, with sacreBLEU's signature; the end of
the run also scores test_data greedy and with beam search (beam_size). The training loop is the
other trainers' (trainer.py): AdamW or Muon, warmup and cosine or WSD decay, gradient accumulation
and clipping, DDP or FSDP under torchrun. A batch holds batch_size sentence pairs of about the same
length (translation.batch_at, a pure function of the step), and the step's loss weighs every target
token alike, with label smoothing. max_seconds bounds the training time as in train.py: the
schedule runs on the clock, and evaluations do not count.

Resuming: resume='yes' continues the run in out_dir from its newest checkpoint that loads, as if it
had never stopped (the model, tokenizer, optimizer, step, and so the batches, and the random
state); 'auto' does that if there is a checkpoint and starts a new run if not. A resumed run must
keep the keys that fix the model and the data (RUN_KEYS below).

Every default below is a config key: override it in a config file or with --key=value.
"""

import math
import time
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from benchmarks import gather
from chat import collate
from checkpoint import checkpoint_to_resume, model_from_checkpoint
from configurator import configure, print_config
from data import to_device
from model import EncoderDecoder, EncoderDecoderConfig, GPT, GPTConfig
from optim import learning_rate_at, make_optimizer, optimizer_step, set_learning_rate
from parallel import all_reduce_sum, place_model, sum_over_batches, wrap_model
from runtime import device_name
from trainer import (Pace, finish, gradient_accumulation, gradient_scaler, open_run_log, resume_state, save, start,
                     stop_if_not_finite, take_out_dir)
from translation import (batch_at, collate_pairs, corpus_scores, data_of, decoder_only_example, encode_pairs,
                         held_out_split, read_pairs, train_tokenizer, translate_lines)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out/translate"
resume = "no"  # 'yes': continue the run in out_dir; 'auto': continue it if out_dir has a checkpoint, else a new run
keep_checkpoints = 2
eval_interval = 500  # evaluate and save a checkpoint every this many steps, and at the end
eval_seconds = 0.0  # >0: also evaluate every this many seconds of training (BLEU against time)
log_interval = 50
wandb_project = ""  # a Weights & Biases project to log the run to (pip install wandb); '' for none
tensorboard = False  # also write TensorBoard events to out_dir/tensorboard (pip install tensorboard)
# data: 'multi30k', SOURCE_FILE,TARGET_FILE (plain or .gz, line-aligned) or FILE.jsonl
data = "multi30k"
val_data = ""  # held-out pairs; '' : Multi30K's val with data='multi30k', else val_fraction of data
test_data = ""  # pairs scored at the end; '' : Multi30K's test_2016_flickr with data='multi30k', else none
val_fraction = 0.02  # of data, held out when there is no val_data (always the same pairs)
multi30k_dir = ""  # a folder holding Multi30K's files (train.de.gz, ...); '' downloads them into data/multi30k
source_lang = "de"
target_lang = "en"
source_field = "source"  # the fields of a .jsonl file's records
target_field = "target"
tokenizer = "bpe"  # 'bpe': a byte-level BPE learned on both sides of the training pairs; 'gpt2': GPT-2's
vocab_size = 8000  # of the BPE: bytes, merges and end-of-text
block_size = 64  # tokens per side (a decoder-only model's context holds both: 2 x block_size)
bleu_sentences = 0  # held-out sentences translated for BLEU at each evaluation; 0: all
# model (see model.py): the encoder-decoder, or a decoder-only GPT of n_layer blocks
architecture = "encoder-decoder"  # or 'decoder-only': a GPT on source <end-of-text> target, the loss on the target
n_layer = 3  # the decoder's blocks (decoder-only: all of them)
n_encoder_layer = 3
n_head = 4
n_kv_head = 0
n_embd = 256
ffn_hidden = 0
norm = "rmsnorm"
mlp = "relu2"
pos = "learned"  # learned positions give the cross-attention where each token is; 'rope' or 'sinusoidal' also work
rope_theta = 10000.0
qk_norm = False
tie_embeddings = True  # one table for source, target and output: the vocabulary is joint
bias = False
dropout = 0.1
norm_eps = 1e-5
zero_init_proj = False
logit_softcap = 0.0
label_smoothing = 0.1  # Szegedy et al. 2016, as in Vaswani et al. 2017
# optimizer and schedule
optimizer = "adamw"  # or 'muon': Muon for the blocks' matrices, AdamW for the rest
learning_rate = 2e-3
muon_lr = 0.02
muon_momentum = 0.95
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.98
grad_clip = 1.0
batch_size = 64  # sentence pairs per micro-step on each process
total_batch_size = 64  # sentence pairs per optimizer step over all processes; sets the gradient accumulation
max_iters = 4000
max_seconds = 0.0  # >0: stop after this many seconds of training (not max_iters); the schedule runs on the clock
lr_schedule = "cosine"  # or 'wsd'
warmup_iters = 200
lr_decay_fraction = 0.3  # wsd: the fraction of the run spent decaying
min_lr = 2e-4
# decoding at the end of the run (evaluations translate greedily)
beam_size = 4
length_penalty = 1.0  # beam search ranks finished translations by log-probability / length**length_penalty
# system
device = "auto"
dtype = "auto"
compile = False  # batches change shape from step to step: compiling rarely pays off
seed = 1337
parallelism = "ddp"  # or 'fsdp'
config = configure(globals())
print_config(config)
# -----------------------------------------------------------------------------

# The keys that fix the model and its data: a resumed run must have the values it started with.
RUN_KEYS = ("data", "source_lang", "target_lang", "tokenizer", "vocab_size", "block_size", "architecture")

dist, dtype, autocast = start(device, dtype, seed, parallelism)
device, log = dist.device, dist.log  # log: print on rank 0 only
if architecture not in ("encoder-decoder", "decoder-only"):
    raise SystemExit(f"config error: architecture='{architecture}' is not one of encoder-decoder, decoder-only")
if beam_size < 1:
    raise SystemExit(f"config error: beam_size={beam_size} must be at least 1 (1 is greedy)")
accumulation_steps = gradient_accumulation("total_batch_size", total_batch_size, batch_size=batch_size,
                                           processes=dist.world_size)
stop = take_out_dir(out_dir, dist, "--resume=yes")
checkpoint, ckpt_path = checkpoint_to_resume(resume, out_dir, "translate", config, RUN_KEYS)

# data: pairs of sentences (the test set's read now too: a bad file stops the run before it trains)
specs = {split: data_of(config, split) for split in ("train", "val", "test")}
train_text, n_empty = read_pairs(specs["train"], source_field, target_field)
if specs["val"]:
    val_text, n_val_empty = read_pairs(specs["val"], source_field, target_field)
    n_empty += n_val_empty
else:
    train_text, val_text = held_out_split(train_text, val_fraction)
test_text = read_pairs(specs["test"], source_field, target_field)[0] if specs["test"] else []
if not train_text:
    raise SystemExit(f"data error: {data} has no pair with text on both sides to train on; check the files")
if checkpoint is None:
    t0 = time.time()
    tokenizer = train_tokenizer(tokenizer, [text for pair in train_text for text in pair], vocab_size)
    log(f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size:,} ids ({time.time() - t0:.1f} s)")
    model_keys = {f.name for f in fields(EncoderDecoderConfig)} - {"vocab_size", "block_size"}
    model_config = dict({k: config[k] for k in model_keys if k in config}, vocab_size=tokenizer.vocab_size,
                        block_size=block_size if architecture == "encoder-decoder" else 2 * block_size)
    try:
        if architecture == "encoder-decoder":
            model = EncoderDecoder(EncoderDecoderConfig(**model_config))
        else:
            model = GPT(GPTConfig(**{k: v for k, v in model_config.items() if k != "n_encoder_layer"}))
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
else:
    model, tokenizer = model_from_checkpoint(checkpoint, ckpt_path)
    log(f"resuming {ckpt_path} at step {checkpoint['step']}")
train_examples, n_cut = encode_pairs(tokenizer, train_text, block_size)
val_examples, n_val_cut = encode_pairs(tokenizer, val_text, block_size)
if architecture == "decoder-only":
    train_units = [decoder_only_example(*example) for example in train_examples]
    val_units = [decoder_only_example(*example) for example in val_examples]
else:
    train_units, val_units = train_examples, val_examples
lengths = tuple(len(s) + len(t) for s, t in train_examples)  # what batches of like length are made by
target_counts = [len(t) - 1 for _, t in train_examples]  # the tokens each pair's loss is over
bleu_text = val_text[: bleu_sentences or None]
log(f"data {data}: {len(train_examples):,} train and {len(val_examples):,} held-out pairs, "
    f"{sum(target_counts):,} target tokens to learn" + (f"; {n_empty} pairs with an empty side left out" if n_empty else "")
    + (f"; {n_cut + n_val_cut} sides longer than block_size={block_size} tokens cut" if n_cut + n_val_cut else ""))
steps_per_epoch = math.ceil(len(train_examples) / total_batch_size)
log(f"device {device_name(device)} x {dist.world_size} processes, {dtype}; {total_batch_size} pairs per step = "
    f"{batch_size} x {dist.world_size} processes x {accumulation_steps} accumulation steps; "
    + (f"{max_seconds:.0f} s of training" if max_seconds else f"{max_iters} steps")
    + f" ({steps_per_epoch} steps per epoch)")

log(f"model: {architecture}, {model.num_params() / 1e6:.2f}M parameters")
unwrapped = type(model)  # FSDP makes the model an instance of a class of its own
place_model(model, dist, parallelism, dtype)
torch.manual_seed(seed + dist.rank)  # different dropout masks in each process
optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device, optimizer, muon_lr,
                           muon_momentum)
step, train_seconds = 0, 0.0
if checkpoint is not None:
    step, train_seconds = resume_state(model, optimizer, checkpoint, dist), checkpoint["train_seconds"]
checkpoint = None  # free the memory
scaler = gradient_scaler(dist, dtype)
raw_model = model
model = wrap_model(model, dist, parallelism, compile, log)
run_log = open_run_log(out_dir, config, dist, dtype, step, "translate", data=data, parameters=raw_model.num_params())


def batch_sums(units):
    """(summed loss, target tokens) of units: label-smoothed cross-entropy over the target tokens."""
    if architecture == "decoder-only":
        x, y, _ = to_device(torch.stack(collate([(x, y, [0] * len(x)) for x, y in units], tokenizer.eot_id)), device)
        with autocast:
            logits, _ = model(x, all_logits=True)
    else:
        src, src_lengths, tgt, y = (to_device(t, device) for t in collate_pairs(units, tokenizer.eot_id))
        with autocast:
            logits, _ = model(src, tgt, src_lengths=src_lengths)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum",
                           label_smoothing=label_smoothing)
    return loss, (y >= 0).sum()


def batch_indices(index):
    return batch_at(lengths, batch_size, index, seed)


def micro_step_loss(micro_step):
    index = (step * dist.world_size + dist.rank) * accumulation_steps + micro_step
    loss_sum, _ = batch_sums([train_units[i] for i in batch_indices(index)])
    # The step's loss is its summed token losses over its target-token count, so every target token
    # weighs the same whatever batch it is in; optimizer_step divides by accumulation_steps and DDP or
    # FSDP average over the processes: this undoes both.
    return loss_sum * (accumulation_steps * dist.world_size / step_target_tokens)


def target_tokens_of_step(at_step):
    """The target tokens of every process's batches of a step: the batches are a pure function of their
    index, so each process counts them all without asking the others."""
    first = at_step * dist.world_size * accumulation_steps
    return sum(target_counts[i] for index in range(first, first + dist.world_size * accumulation_steps)
               for i in batch_indices(index))


def held_out_sums(units):
    loss_sum, count = batch_sums(units)
    return torch.stack([loss_sum.float(), count.float()])


def translate_held_out(pairs, beam=1):
    """BLEU and chrF of the translations of pairs' sources against their targets, the lines dealt out to the
    processes. Under FSDP each process translates with a whole copy of the model: decoding keeps its cache
    in dicts passed to the blocks, which FSDP's calls would copy, and a copy needs no collectives."""
    if isinstance(raw_model, FSDPModule):
        translator = unwrapped(raw_model.config).to(device)
        translator.load_state_dict(get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True)))
    else:
        translator = raw_model
    translator.eval()
    sources = [s for s, _ in pairs][dist.rank :: dist.world_size]
    translations = gather(translate_lines(translator, tokenizer, sources, 64, beam, length_penalty, autocast,
                                          device)[0], dist.world_size)
    raw_model.train()
    return corpus_scores(translations, [t for _, t in pairs])


def test_set_scores():
    """The test set's BLEU and chrF, greedy and with beam_size beams, as {test_bleu_beam1: ..., ...}."""
    results = {}
    for beam in sorted({1, beam_size}):
        scores = translate_held_out(test_text, beam)
        log(f"test ({len(test_text)} sentences, {'greedy' if beam == 1 else f'beam {beam}'}): "
            f"BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}")
        results.update({f"test_bleu_beam{beam}": scores["bleu"], f"test_chrf_beam{beam}": scores["chrf"]})
    log(f"sacreBLEU {scores['bleu_signature']}; chrF {scores['chrf_signature']}")
    return results


val_batches = [[val_units[i] for i in range(j, min(j + batch_size, len(val_units)))]
               for j in range(0, len(val_units), batch_size)]

# -----------------------------------------------------------------------------
# training loop
start_step = step
pace = Pace(step, max_iters)
next_eval_seconds = (train_seconds // eval_seconds + 1) * eval_seconds if eval_seconds else 0.0
while True:
    # Under a time budget the schedule runs on the clock, so that it ends when the time does.
    schedule_step = min(max_iters, int(max_iters * train_seconds / max_seconds)) if max_seconds else step
    lr = set_learning_rate(optimizer, learning_rate_at(schedule_step, learning_rate, warmup_iters, max_iters, min_lr,
                                                       lr_schedule, lr_decay_fraction))
    stopped = stop.requested()  # a signal (preemption): save now; the resumed run translates at its end
    done = (train_seconds >= max_seconds if max_seconds else step >= max_iters) or stopped  # where the run ends
    eval_due = eval_seconds and train_seconds >= next_eval_seconds
    if eval_due:  # the next multiple of eval_seconds: adding it up to the clock would loop for ever at 1e-20
        next_eval_seconds = (train_seconds // eval_seconds + 1) * eval_seconds

    if step % eval_interval == 0 or done or eval_due:
        sums = sum_over_batches(model, val_batches, held_out_sums, dist) if val_batches else None
        val_loss = (sums[0] / sums[1]).item() if sums is not None else None
        # Translating takes minutes on a CPU, more than a preemption's grace period: a stopped run skips it.
        scores = translate_held_out(bleu_text) if bleu_text and step > 0 and not stopped else {}  # step 0: noise
        test_scores = test_set_scores() if done and test_text and not stopped else {}
        if val_loss is not None:
            log(f"step {step}: held-out loss {val_loss:.4f}" + (f", BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}"
                                                               f" ({len(bleu_text)} sentences, greedy)" if scores else ""))
        if step > start_step:
            save(raw_model, optimizer, dist, out_dir, keep_checkpoints, run_log, "translate", [val_loss, loss_sum],
                 kind="translate", step=step, train_seconds=train_seconds, val_loss=val_loss,
                 val_bleu=scores.get("bleu"), **test_scores, config=config, tokenizer=tokenizer.description)
        run_log.log({"step": step, "val_loss": val_loss, "val_bleu": scores.get("bleu"), "val_chrf": scores.get("chrf"),
                     **test_scores, "train_seconds": train_seconds})
        run_log.plot()
        pace.restart(step)
    if done:
        break

    t_step = time.time()
    step_target_tokens = target_tokens_of_step(step)
    loss_sum = optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip)
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # the step's kernels have run, not only been queued
    # every process takes the slowest one's time, so that they all stop and evaluate at the same step
    seconds = torch.tensor(time.time() - t_step, device=device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    train_seconds += seconds.item()
    step += 1

    if step % log_interval == 0:
        train_loss = all_reduce_sum(loss_sum, dist.world_size).item() / dist.world_size
        stop_if_not_finite(train_loss, step, dist, "translate", out_dir)
        seconds_per_step, pace_text = pace.lap(step, max_seconds - train_seconds if max_seconds else None)
        log(f"step {step} | loss {train_loss:.4f} | lr {lr:.2e} | {pace_text}")
        run_log.log({"step": step, "loss": train_loss, "lr": lr, "time": time.time(),
                     "tokens_per_sec": step_target_tokens / seconds_per_step})

finish(run_log, dist, stop, step, f"done after {step} steps ({train_seconds:.0f} s of training); translate with: "
       f"python sample.py --out_dir={out_dir} --translate_file=FILE")
