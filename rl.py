"""
Reinforcement learning from verifiable rewards: tune a chat model on prompts whose answers a
program checks (verifiers.py), by sampling a group of answers to each prompt and making the
better-than-average ones more likely (GRPO and its refinements; see grpo.py). All weights, or
LoRA adapters (lora_rank > 0).

    python verifiers.py --digits=2 --careless=0.5 --held_out=1000 --prompts=3000 --sft=6000
    python sft.py config/sft_addition.py                        # the base: SFT on a careless teacher's sums
    python rl.py config/rl_quickstart.py                        # held-out pass@1 ~70% -> ~93%, CPU (docs/rl.md)
    python rl.py --init_from=out/sft_gpt2/ckpt.pt --data=data/evals/gsm8k/train.jsonl \\
        --held_out=data/evals/gsm8k/test.jsonl --held_out_limit=200 --max_new_tokens=256
    python rl.py config/rl_quickstart.py --resume=yes           # continue the run in out_dir
    torchrun --standalone --nproc_per_node=8 rl.py --init_from=out/sft_gpt2/ckpt.pt ...

Reads the chat checkpoint init_from (sft.py's or dpo.py's, or any with the chat tokens), the
prompts in data and the held-out prompts in held_out: benchmark files (benchmarks.py) of GSM8K
records {"question", "answer"} or generation records {"prompt", "answer"}, each kind with its
verifier (verifiers.reward). Writes out_dir/ckpt-<step>.pt (kind 'rl'; with LoRA only the
adapters and the base's name, step and sha256; and the optimizer state, the step and every
process's random state), out_dir/ckpt.pt linked to the newest, and out_dir/metrics.jsonl, plot.png
and report.md. resume='yes' (or 'auto', for torchrun --max-restarts) continues the run in out_dir
exactly; see sft.py's docstring.

A step: prompts_per_step prompts (batch_size per micro-step on each process, drawn as sft.py
draws its batches: a pure function of the step), group_size answers to each, sampled at
temperature 1 with seeds that are a function of the step and the prompt's place in it (so the
answers do not depend on the number of processes, and a resumed run samples what it would have);
a reward for each; then `epochs` optimizer updates on those answers (grpo.py's loss, divided by
the answer tokens of the whole step over every process). Groups whose answers all got the same
reward carry no signal; their share is logged, and they are left out of the forward passes.

Logged every step: the mean reward, the share of groups with no signal, the mean answer length,
the KL to the starting model (kl_coef > 0), tokens/s of sampling and of training; at each eval,
pass@1 on the held-out prompts: greedy answers scored by benchmarks.evaluate_examples, the same
code and rule as `python evaluate.py --ckpt=out_dir/ckpt.pt --tasks=<held_out> --max_new_tokens=<max_new_tokens>`.

Every default below is a config key: override it in a config file or with --key=value.
"""

import time

import torch

from benchmarks import evaluate_examples, read_examples
from chat import batch_of, collate, prompt_ids, stop_ids
from checkpoint import checkpoint_to_resume
from configurator import configure, print_config
from grpo import group_advantages, policy_loss, sample_groups, token_logprobs
from lora import lora_settings
from optim import optimizer_step
from parallel import all_reduce_sum
from runtime import device_name
import verifiers  # a module, so that its KINDS is no config key of this script
from trainer import (TUNED_KEYS, Pace, begin_step, finish, gradient_accumulation, model_to_tune, on_reference,
                     prepare_to_tune, reference_model, save, start, stop_if_not_finite, take_out_dir)

# -----------------------------------------------------------------------------
# I/O
init_from = "out/sft/ckpt.pt"  # the chat checkpoint to tune (sft.py's or dpo.py's); also the KL reference
out_dir = "out/rl"
resume = "no"  # 'yes': continue the run in out_dir; 'auto': continue it if out_dir has a checkpoint, else a new run
keep_checkpoints = 2
eval_interval = 20  # score the held-out prompts and save a checkpoint every this many steps, and at the end
log_interval = 1  # a step is seconds to minutes of sampling: log each
wandb_project = ""  # a Weights & Biases project to log the run to (pip install wandb); '' for none
tensorboard = False  # also write TensorBoard events to out_dir/tensorboard (pip install tensorboard)
# data
data = "data/addition/prompts.jsonl"  # prompts to learn from: GSM8K or generation records (verifiers.py)
held_out = "data/addition/held_out.jsonl"  # prompts for pass@1, never trained on; '' for none
held_out_limit = 0  # score only the first N held-out prompts; 0 for all
max_new_tokens = 32  # an answer's longest; evaluate.py's generation files default to 32 too
batch_size = 4  # prompts per micro-step on each process (each sampled group_size times)
prompts_per_step = 16  # prompts per step over all processes; sets the gradient accumulation
max_iters = 100  # steps (each one batch of sampled answers)
# the algorithm (grpo.py)
group_size = 8  # answers per prompt: the baseline is their mean; more answers, fewer groups with no signal
temperature = 1.0  # sample from the policy itself: the policy gradient is for its own distribution
scale_by_std = False  # GRPO divides by the group's std; Dr. GRPO shows that favours too-easy and too-hard prompts
epochs = 1  # updates per batch of answers; 1 is on-policy REINFORCE, more reuse the samples under PPO's clipping
clip_eps = 0.2  # PPO's clip on the probability ratio (only acts when epochs > 1); 0.2 as PPO and GRPO
kl_coef = 0.0  # a KL penalty to the starting model; off, as DAPO and Dr. GRPO find it unneeded with verifiable rewards
# LoRA: rank 0 trains every weight
lora_rank = 0
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "c_attn,c_proj,c_fc"
# AdamW and the schedule (linear warmup, cosine decay to min_lr)
learning_rate = 1e-5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 5
min_lr = 1e-5  # no decay by default: RL runs are stopped when the reward stops rising, not at a planned step
# system
device = "auto"
dtype = "auto"
compile = False  # the shapes change with every batch of answers
seed = 1337
parallelism = "ddp"  # the only choice: see the check below
config = configure(globals())
print_config(config)
# -----------------------------------------------------------------------------

# Each process samples its answers for as many decoding steps as they take: FSDP's sharded forward
# needs every process in every call
if parallelism != "ddp":
    raise SystemExit(f"config error: rl.py runs with parallelism='ddp', not {parallelism!r}; set --parallelism=ddp")
# Values that would crash mid-run, or run on learning nothing: a group of one answer is its own baseline and
# a temperature of 0 samples one answer group_size times, so no group would ever carry signal.
for key, valid, must in (("group_size", group_size >= 2, "an integer >= 2"),
                         ("prompts_per_step", prompts_per_step >= 1, "an integer >= 1"),
                         ("max_new_tokens", max_new_tokens >= 1, "an integer >= 1"),
                         ("held_out_limit", held_out_limit >= 0, "an integer >= 0 (0: all)"),
                         ("temperature", 0 < temperature < float("inf"), "a finite number > 0"),
                         ("clip_eps", 0 < clip_eps < float("inf"), "a finite number > 0"),
                         ("kl_coef", 0 <= kl_coef < float("inf"), "a finite number >= 0")):
    if not valid:
        raise SystemExit(f"config error: {key}={config[key]!r} is invalid; {key} must be {must}")
dist, dtype, autocast = start(device, dtype, seed, parallelism)
device, log = dist.device, dist.log  # log: print on rank 0 only
accumulation_steps = gradient_accumulation("prompts_per_step", prompts_per_step, batch_size=batch_size,
                                           processes=dist.world_size)
stop = take_out_dir(out_dir, dist, "--resume=yes")

# model: a new run takes the chat checkpoint, merged if it holds adapters; a resumed run takes its
# own checkpoint's model as it was, adapters included
checkpoint, ckpt_path = checkpoint_to_resume(resume, out_dir, "rl", config, TUNED_KEYS)
model, tokenizer, reference_file = model_to_tune(init_from, checkpoint, ckpt_path, log, chat_script="rl")
ends = sorted(stop_ids(tokenizer))


def task(path, key, limit=0):
    """(kind, examples) of the task file of config key `key`, whose kind has a verifier."""
    kind, examples = read_examples(path, limit, "rl", f"check --{key} (python verifiers.py writes the addition "
                                   "task's files)")
    if kind not in verifiers.KINDS:
        raise SystemExit(f"data error: {path} holds {kind} records; rl.py needs GSM8K (question, answer) or generation "
                         "(prompt, answer) records, which verifiers.py can check")
    return kind, examples


# the prompts to learn from, those that leave room for an answer; the held-out ones all, as evaluate.py reads them
kind, examples = task(data, "data")
prompts = [prompt_ids(tokenizer, [{"role": "user", "content": verifiers.question(kind, ex)}]) for ex in examples]
fits = [i for i, ids in enumerate(prompts) if len(ids) + max_new_tokens <= model.config.block_size]
examples, prompts = [examples[i] for i in fits], [prompts[i] for i in fits]
if not examples:
    raise SystemExit(f"data error: no prompt of {data} fits the model's context of {model.config.block_size} tokens "
                     f"with max_new_tokens={max_new_tokens} left for the answer; lower max_new_tokens")
held_kind, held_examples = task(held_out, "held_out", held_out_limit) if held_out else (None, [])
log(f"data {data}: {len(examples)} {kind} prompts; held out {held_out or 'none'}: {len(held_examples)} prompts")
log(f"device {device_name(device)} x {dist.world_size} processes, {dtype}; {prompts_per_step} prompts x {group_size} "
    f"answers per step = {batch_size} x {dist.world_size} processes x {accumulation_steps} accumulation steps; "
    f"{max_iters} steps")

lora = lora_settings(lora_rank, lora_alpha, lora_dropout, lora_targets)
reference = reference_model(model, lora, checkpoint, reference_file, ckpt_path, dist, parallelism, dtype) \
    if kl_coef > 0 else None
model, raw_model, optimizer, scaler, step, run_log = prepare_to_tune(model, checkpoint, lora, dist, dtype, config,
                                                                     "rl")
checkpoint = None  # free the memory


def rollouts(micro_step):
    """This process's answers for one micro-step: sampled, rewarded, with their advantages, as the
    rows (inputs, targets, doc ids) to train on. Prompt j of batch number `index` gets the seeds from
    its place in the stream of prompts, whichever process draws it."""
    index = (step * dist.world_size + dist.rank) * accumulation_steps + micro_step
    chosen = batch_of(len(examples), batch_size, index, seed)
    seeds = [(seed << 32) + (index * batch_size + j) * group_size for j in range(batch_size)]
    raw_model.eval()
    with autocast:
        answers = sample_groups(raw_model, [prompts[i] for i in chosen], group_size, max_new_tokens, ends, seeds,
                                temperature)
    raw_model.train()
    texts = [tokenizer.decode([t for t in answer if t not in ends]) for answer in answers]
    rewards = torch.tensor([verifiers.reward(kind, text, examples[chosen[r // group_size]])
                            for r, text in enumerate(texts)])
    advantages = group_advantages(rewards, group_size, scale_by_std)
    signal = (advantages.view(-1, group_size) != 0).any(dim=1)
    rows = [r for r in range(len(answers)) if signal[r // group_size]]
    # every process runs a forward and backward at every micro-step (DDP waits for all of them): a
    # micro-step without signal runs one answer at advantage 0, which adds nothing
    units = [(prompts[chosen[r // group_size]] + answers[r][:-1],
              [-1] * (len(prompts[chosen[r // group_size]]) - 1) + answers[r]) for r in rows or [0]]
    x, y, _ = collate([(x, y, [0] * len(x)) for x, y in units], tokenizer.eot_id)
    return {"x": x.to(device), "y": y.to(device), "advantages": advantages[rows or [0]].to(device) * bool(rows),
            "old": None, "sums": torch.tensor([rewards.sum(), len(rewards), (~signal).sum(), len(signal),
                                               sum(map(len, answers)), (y >= 0).sum() if rows else 0], device=device)}


def logprobs_of(net, batch):
    with autocast:
        return token_logprobs(net(batch["x"], all_logits=True)[0], batch["y"])


def micro_step_loss(micro_step):
    batch = batch_of_step[micro_step]
    logprobs = logprobs_of(model, batch)
    if batch["old"] is None:  # the first update: the answers' own policy, so the ratio is 1
        batch["old"] = logprobs.detach()
    ref = on_reference(reference, raw_model, lambda net: logprobs_of(net, batch)) if kl_coef > 0 else None
    loss, kl = policy_loss(logprobs, batch["old"], batch["advantages"], batch["y"] >= 0, clip_eps, ref)
    if kl is not None:
        step_kl.add_(kl.detach())
        loss = loss + kl_coef * kl
    # loss summed over answer tokens, over the step's answer tokens: optimizer_step divides by
    # accumulation_steps and DDP averages over the processes, which this undoes (as sft.py)
    return loss * (accumulation_steps * dist.world_size / max(1, step_answer_tokens))


def held_out_pass_at_1():
    """Greedy answers to the held-out prompts, scored as evaluate.py scores the file (every process a share)."""
    result = evaluate_examples(held_kind, held_examples, raw_model, tokenizer, batch_size * group_size, autocast,
                               dist.rank, dist.world_size, max_new_tokens, chat=True)
    return result["exact_match" if held_kind == "generation" else "exact_match_flexible"]


# -----------------------------------------------------------------------------
# training loop
start_step, pass_at_1 = step, None
pace = Pace(step, max_iters)
while True:
    lr, done = begin_step(step, max_iters, stop, optimizer, config)  # the one place where the run decides to end

    if step % eval_interval == 0 or done:
        if held_examples:
            pass_at_1 = held_out_pass_at_1()
            log(f"step {step}: held-out pass@1 {100 * pass_at_1:.1f}% ({len(held_examples)} prompts, greedy)")
        if step > start_step:
            save(raw_model, optimizer, dist, out_dir, keep_checkpoints, run_log, "rl", [pass_at_1, step_sums],
                 lora=lora, base=reference_file, kind="rl", step=step, val_pass_at_1=pass_at_1,
                 reference=reference_file, config=config, tokenizer=tokenizer.description)
        run_log.log({"step": step, "val_pass_at_1": pass_at_1})
        run_log.plot()
        pace.restart(step)
    if done:
        break

    sampling_started = time.time()
    batch_of_step = [rollouts(micro_step) for micro_step in range(accumulation_steps)]
    sampling_seconds = time.time() - sampling_started
    step_sums = all_reduce_sum(sum(batch["sums"] for batch in batch_of_step), dist.world_size)
    reward_sum, answers, no_signal, groups, sampled_tokens, step_answer_tokens = step_sums.tolist()
    step_kl = torch.zeros((), device=device)
    training_started = time.time()
    for epoch in range(epochs):
        loss_sum = optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip)
    training_seconds = time.time() - training_started
    step += 1

    if step % log_interval == 0 or step == max_iters:
        loss = all_reduce_sum(loss_sum, dist.world_size).item() / dist.world_size
        stop_if_not_finite(loss, step, dist, "rl", out_dir)
        stats = {"reward": reward_sum / answers, "no_signal": no_signal / groups,
                 "answer_tokens": sampled_tokens / answers,
                 "sampling_tokens_per_sec": sampled_tokens / sampling_seconds,
                 "training_tokens_per_sec": epochs * step_answer_tokens / training_seconds}
        if kl_coef > 0:
            stats["kl"] = all_reduce_sum(step_kl, dist.world_size).item() / max(1, epochs * step_answer_tokens)
        log(f"step {step}/{max_iters} | reward {stats['reward']:.3f} | no signal {100 * stats['no_signal']:.0f}% | "
            f"answer {stats['answer_tokens']:.1f} tokens" + (f" | kl {stats['kl']:.4f}" if kl_coef > 0 else "")
            + f" | sampling {stats['sampling_tokens_per_sec']:.0f} tok/s, training "
            f"{stats['training_tokens_per_sec']:.0f} tok/s | lr {lr:.2e} | {pace.lap(step)[1]}")
        run_log.log({"step": step, **stats, "policy_loss": loss, "lr": lr, "time": time.time()})

finish(run_log, dist, stop, step, f"done after {step} steps"
       + (f", held-out pass@1 {100 * pass_at_1:.1f}%" if pass_at_1 is not None else "")
       + f"; check it with: python evaluate.py --ckpt={out_dir}/ckpt.pt --tasks={held_out} "
       f"--max_new_tokens={max_new_tokens}")
