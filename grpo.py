"""
The arithmetic of reinforcement learning from verifiable rewards, as rl.py uses it: sampling a
group of answers per prompt, the group-relative advantages, and the policy-gradient loss.

    answers = sample_groups(model, prompts, group_size=8, max_new_tokens=16, stop_tokens=ends, seeds=seeds)
    advantages = group_advantages(rewards, group_size=8, scale_by_std=False)      # (prompts * 8,)
    loss_sum, kl_sum = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)

GRPO (Shao et al. 2024, DeepSeekMath) replaces PPO's value model by a baseline from the group:
each prompt gets G sampled answers, and an answer's advantage is its reward minus the group's
mean, over the group's standard deviation. Dr. GRPO (Liu et al. 2025) shows the division by the
std weighs prompts the model almost always (or almost never) solves most, a bias; without it the
update is plain REINFORCE with a group-mean baseline (as nanochat's chat_rl.py). Every token of
an answer gets its answer's advantage. The loss is PPO's clipped surrogate per token,

    ratio = exp(logp - logp_old);  loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)

summed here over the answer tokens; rl.py divides by the batch's answer tokens (DAPO, Yu et al.
2025: every token weighs the same, so long answers are not diluted as a per-answer mean does).
On the first update after sampling logp_old is logp itself (detached), the ratio is 1 and the
gradient is exactly REINFORCE's A * grad logp; clipping matters only for further updates on the
same answers. A KL penalty to a reference model uses Schulman's k3 estimator per token,
exp(ref - logp) - (ref - logp) - 1, which is unbiased and never negative.
"""

import torch
import torch.nn.functional as F

from decoding import Decoder


@torch.no_grad()
def sample_groups(model, prompts, group_size, max_new_tokens, stop_tokens, seeds, temperature=1.0):
    """group_size answers (token lists, ending with their stop token when they reached one) to each
    prompt (a list of token ids), in one decoding.Decoder, answer j of prompt i sampled with the seed
    seeds[i] + j: so an answer depends on its seed alone, not on what else is in the batch."""
    decoder = Decoder(model, len(prompts) * group_size)
    for prompt, seed in zip(prompts, seeds):  # prompt i takes slots i * group_size ...
        decoder.prefill([prompt] * group_size, temperature, seed=seed, stop_tokens=stop_tokens)
    answers, done = [[] for _ in range(decoder.slots)], [False] * decoder.slots
    for _ in range(max_new_tokens):
        for slot, token in enumerate(decoder.step().tolist()):
            if not done[slot]:
                answers[slot].append(token)
                done[slot] = token in stop_tokens
        if all(done):
            break
    return answers


def group_advantages(rewards, group_size, scale_by_std):
    """Each answer's reward minus its group's mean (rewards: (groups * group_size,), groups of
    consecutive answers); scale_by_std divides by the group's standard deviation as GRPO does. A group
    whose rewards are all equal has advantages of exactly 0: no signal."""
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-4)
    return advantages.flatten()


def token_logprobs(logits, targets):
    """The log-probability of each target token (B, T) under logits (B, T, V); 0 where the target is -1."""
    return -F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1, reduction="none")


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, reference_logprobs=None):
    """(The clipped surrogate loss summed over the answer tokens, and the k3 KL to the reference summed
    over them, or None): logprobs (B, T) with gradients, old_logprobs the same under the policy that
    sampled the answers, advantages (B,), mask (B, T) true on answer tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages[:, None]
    surrogate = torch.minimum(ratio * advantage, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantage)
    loss = -(surrogate * mask).sum()
    if reference_logprobs is None:
        return loss, None
    log_ratio = reference_logprobs - logprobs
    kl = ((torch.exp(log_ratio) - log_ratio - 1) * mask).sum()
    return loss, kl
