"""rl.py and its parts: the advantages and loss of a hand-built group against hand computation; a
group of equal rewards moves nothing; rewarding one answer makes it likelier; the verifiers' table;
a stopped run resumes exactly; two processes equal one; evaluate.py scores the held-out prompts as
rl.py does; bad input stops with one line."""

import json
import math

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import (FIXTURE_THREADS, assert_same_weights, logged_after, read_metrics, run_script, run_torchrun,
                      stop_and_resume, tiny_gpt)
from grpo import group_advantages, policy_loss, sample_groups, token_logprobs
from verifiers import addition_problems, reward, sum_without_carries, write_addition_task

# toy prompts the tiny SFT model (conftest's TOY_INSTRUCTIONS) learned some answers to
TOY_PROMPTS = [{"prompt": "What is 2+2?", "answer": "Four."}, {"prompt": "Say hi.", "answer": "Hi there!"},
               {"prompt": "A pet?", "answer": "A cat."}, {"prompt": "Opposite of up?", "answer": "Down."}]


def test_group_advantages_are_reward_minus_the_group_mean_optionally_over_its_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    expected = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75]
    assert group_advantages(rewards, 4, scale_by_std=False).tolist() == expected
    std = [math.sqrt(1 / 3), 0.0, math.sqrt(0.25)]  # the sample std (n - 1) of each group
    scaled = group_advantages(rewards, 4, scale_by_std=True)
    assert torch.allclose(scaled, torch.tensor([a / (std[i // 4] + 1e-4) for i, a in enumerate(expected)]))


def test_policy_loss_by_hand_reinforce_on_policy_clipped_off_policy_and_k3_kl():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    advantages = torch.tensor([2.0, -1.0])
    loss, kl = policy_loss(logprobs, logprobs.detach(), advantages, mask, clip_eps=0.2)
    loss.backward()
    assert kl is None and loss.item() == pytest.approx(-(2 * 2 - 1 * 3))  # ratio 1: -sum of A over answer tokens
    assert logprobs.grad.tolist() == [[-2.0, -2.0, 0.0], [1.0, 1.0, 1.0]]  # REINFORCE: -A per answer token
    # off-policy: ratio 1.5 is clipped to 1.2 where A > 0 (no gradient) but not where A < 0 (pessimistic min)
    logprobs.grad = None
    old = logprobs.detach() - math.log(1.5)
    loss, _ = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.2 * 2 * 2 - 1.5 * 1 * 3), rel=1e-5)
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [1.5, 1.5, 1.5]]))
    reference = logprobs.detach() + 0.1
    _, kl = policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2, reference)
    assert kl.item() == pytest.approx(5 * (math.exp(0.1) - 0.1 - 1), rel=1e-4)


def answer_rows(prompt, answers):
    """Rows (inputs, targets) of prompt + answer, the targets -1 on the prompt."""
    x = torch.tensor([prompt + a[:-1] for a in answers])
    y = torch.tensor([[-1] * (len(prompt) - 1) + a for a in answers])
    return x, y


def test_a_group_whose_rewards_are_equal_gives_no_gradient():
    model = tiny_gpt(spread=0.1)
    x, y = answer_rows([1, 2, 3], [[4, 5], [6, 7], [8, 9], [4, 7]])
    advantages = group_advantages(torch.ones(4), 4, scale_by_std=True)
    logprobs = token_logprobs(model(x, all_logits=True)[0], y)
    loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, y >= 0, 0.2)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_rewarding_one_answer_makes_it_more_likely_in_a_few_steps():
    model = tiny_gpt(spread=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prompt, target, group = [1, 2, 3], 7, 16

    def target_probability():
        with torch.no_grad():
            return model(torch.tensor([prompt]), all_logits=True)[0][0, -1].softmax(-1)[target].item()

    before = target_probability()
    for step in range(5):
        answers = sample_groups(model.eval(), [prompt], group, max_new_tokens=1, stop_tokens=[], seeds=[step * group])
        model.train()
        rewards = torch.tensor([float(a == [target]) for a in answers])
        if step == 0:
            answers[0], rewards[0] = [target], 1.0  # make sure the first group has signal
        x, y = answer_rows(prompt, answers)
        logprobs = token_logprobs(model(x, all_logits=True)[0], y)
        loss, _ = policy_loss(logprobs, logprobs.detach(), group_advantages(rewards, group, False), y >= 0, 0.2)
        (loss / y.numel()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert target_probability() > before + 0.1


@pytest.mark.parametrize("kind, text, answer, expected", [
    ("gsm8k", "She pays 18 dollars.", "... so 18.\n#### 18", 1.0),  # right, a trailing period
    ("gsm8k", "She pays 17 dollars.", "#### 18", 0.0),  # wrong
    ("gsm8k", "I do not know.", "#### 18", 0.0),  # no number at all
    ("gsm8k", "3 + 4 = 7, then 7 * 2 = 14", "#### 14", 1.0),  # several numbers: the last counts
    ("gsm8k", "14, then 3", "#### 14", 0.0),
    ("gsm8k", "The total is $1,234.", "#### 1234", 1.0),  # commas and dollar signs
    ("generation", "1258", "1258", 1.0),
    ("generation", "1258.", "1258", 1.0),  # punctuation is normalised away
    ("generation", "1,258", "1258", 1.0),
    ("generation", "1257", "1258", 0.0),
    ("generation", "twelve", "1258", 0.0),  # unparsable
    ("generation", "12 58", "1258", 0.0),
    ("generation", "1258\nand more", "1258", 1.0),  # the first line, as evaluate.py cuts a generation answer
])
def test_the_verifiers_table(kind, text, answer, expected):
    example = {"answer": answer} if kind == "gsm8k" else {"answers": [answer]}
    assert reward(kind, text, example) == expected


def test_addition_sets_are_disjoint_and_within_their_digits():
    held = addition_problems(2, 50, seed=0)
    train = addition_problems(2, 500, seed=1, exclude=held)
    assert len(set(held)) == 50 and not set(held) & set(train) and max(max(p) for p in train) < 100


def test_a_careless_teacher_forgets_every_carry_in_its_share_of_the_sft_answers_only(tmp_path):
    assert [sum_without_carries(*p) for p in [(57, 68), (99, 1), (12, 34), (5, 5), (0, 0)]] == [15, 90, 46, 0, 0]
    write_addition_task(str(tmp_path / "right"), 2, 100, 300, 2000, seed=3)
    write_addition_task(str(tmp_path / "careless"), 2, 100, 300, 2000, seed=3, careless=0.5)
    for name in ("held_out.jsonl", "prompts.jsonl"):  # what RL learns from and is scored on stays right
        assert (tmp_path / "right" / name).read_text() == (tmp_path / "careless" / name).read_text()
    right, careless = ([json.loads(line) for line in open(tmp_path / run / "sft.jsonl")] for run in ("right", "careless"))
    carries = slips = 0
    for r, c in zip(right, careless):
        a, b = map(int, r["instruction"][len("What is "):-1].split("+"))
        assert r["instruction"] == c["instruction"] and r["output"] == str(a + b)
        carries += sum_without_carries(a, b) != a + b
        slips += c["output"] != r["output"]
        assert c["output"] in (str(a + b), str(sum_without_carries(a, b)))
    assert carries > 1000 and 0.45 < slips / carries < 0.55


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_task")
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in TOY_PROMPTS))
    return str(path)


def deterministic(records):
    """Logged records without their timings."""
    return [{k: v for k, v in r.items() if "per_sec" not in k and k != "time"} for r in records]


def rl_args(checkpoint, task, **overrides):
    settings = dict(init_from=f"{checkpoint}/ckpt.pt", data=task, held_out=task, device="cpu", batch_size=1,
                    prompts_per_step=2, group_size=4, max_new_tokens=8, max_iters=4, eval_interval=2,
                    learning_rate=1e-2, min_lr=1e-3, warmup_iters=1, temperature=1.5)  # 1.5: some answers wrong, some right
    return [f"--{k}={v}" for k, v in {**settings, **overrides}.items()]


def test_rl_stopped_and_resumed_ends_as_an_uninterrupted_run_and_evaluate_agrees(tiny_sft_checkpoint, toy_task, tmp_path):
    args = rl_args(tiny_sft_checkpoint, toy_task, resume="auto")
    whole, resumed, stdout = stop_and_resume("rl.py", args, tmp_path, at_step=2)
    assert f"resuming {resumed / 'ckpt-0000002.pt'} at step 2" in stdout
    assert deterministic(logged_after(resumed, 2)) == deterministic(logged_after(whole, 2))
    assert len(logged_after(whole, 2)) == 3
    assert_same_weights(load_checkpoint(str(resumed / "ckpt.pt"))["model"], load_checkpoint(str(whole / "ckpt.pt"))["model"])
    steps = [r for r in read_metrics(whole) if "reward" in r]
    assert len(steps) == 4 and any(0 < r["no_signal"] < 1 or r["reward"] not in (0, 1) for r in steps)
    # evaluate.py scores the held-out file on the last checkpoint as rl.py did
    report = tmp_path / "eval.json"
    run_script("evaluate.py", f"--ckpt={whole}/ckpt.pt", f"--tasks={toy_task}", "--max_new_tokens=8", "--device=cpu",
               f"--report={report}")
    logged = [r["val_pass_at_1"] for r in read_metrics(whole) if "val_pass_at_1" in r]
    assert json.loads(report.read_text())["results"]["prompts"]["exact_match"] == logged[-1]  # named by the file


def test_rl_in_two_processes_equals_one_with_the_same_global_batch(tiny_sft_checkpoint, toy_task, tmp_path):
    args = rl_args(tiny_sft_checkpoint, toy_task, max_iters=2, eval_interval=2)
    run_script("rl.py", *args, f"--out_dir={tmp_path / 'one'}", threads=FIXTURE_THREADS)
    run_torchrun("rl.py", *args, f"--out_dir={tmp_path / 'two'}")
    one, two = (load_checkpoint(str(tmp_path / run / "ckpt.pt"))["model"] for run in ("one", "two"))
    assert_same_weights(two, one, atol=1e-5)
    assert deterministic(read_metrics(tmp_path / "one")) == deterministic(read_metrics(tmp_path / "two"))


@pytest.mark.parametrize("problem, expected", [
    ("choice", "data error: {task} holds choice records; rl.py needs GSM8K"),
    ("batch", "config error: prompts_per_step=3 is not a multiple of batch_size x processes"),
    ("not_chat", "rl error: {checkpoint}/ckpt.pt is not a chat model"),
])
def test_bad_input_stops_with_one_line(problem, expected, tiny_sft_checkpoint, tiny_checkpoint, toy_task, tmp_path):
    task, checkpoint, overrides = toy_task, tiny_sft_checkpoint, {}
    if problem == "choice":
        task = str(tmp_path / "arc.jsonl")
        with open(task, "w") as f:
            f.write(json.dumps({"query": "Question: 1+1?", "choices": ["2", "3"], "gold": 0}) + "\n")
    elif problem == "batch":
        overrides = dict(prompts_per_step=3, batch_size=2)
    else:
        checkpoint = tiny_checkpoint
    result = run_script("rl.py", *rl_args(checkpoint, task, out_dir=tmp_path / "out", **overrides), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(expected.format(task=task, checkpoint=checkpoint)), last
