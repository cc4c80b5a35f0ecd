"""dpo.py: the loss starts at ln 2 (the policy is the reference) and falls on toy pairs, with LoRA or
without; a LoRA run saves adapters on the SFT base; the whole chain base -> SFT -> DPO -> chat runs;
and a stopped run resumes exactly."""

import json
import math
import os

import pytest

from checkpoint import load_checkpoint
from conftest import (FIXTURE_THREADS, assert_same_weights, logged_after, read_metrics, run_script, run_torchrun,
                      stop_and_resume)

# the chosen answers are the ones SFT taught (TOY_INSTRUCTIONS)
TOY_PAIRS = [
    {"instruction": "What is 2+2?", "chosen": "Four.", "rejected": "Five."},
    {"instruction": "Say hi.", "chosen": "Hi there!", "rejected": "Go away."},
    {"instruction": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
]


@pytest.fixture(scope="module")
def dpo_runs(tiny_sft_checkpoint, tmp_path_factory):
    """out_dirs of two dpo.py runs from the SFT checkpoint: 'lora' and 'full'."""
    root = tmp_path_factory.mktemp("dpo")
    (root / "pairs.json").write_text(json.dumps(TOY_PAIRS))
    common = [f"--init_from={tiny_sft_checkpoint}/ckpt.pt", f"--data={root / 'pairs.json'}", "--device=cpu",
              "--val_fraction=0", "--batch_size=3", "--total_batch_size=3", "--log_interval=1", "--beta=0.5",
              "--warmup_iters=2"]
    run_script("dpo.py", *common, f"--out_dir={root / 'lora'}", "--lora_rank=4", "--max_iters=12",
               "--learning_rate=1e-2", "--min_lr=1e-3", "--eval_interval=12", threads=FIXTURE_THREADS)
    run_script("dpo.py", *common, f"--out_dir={root / 'full'}", "--max_iters=6", "--learning_rate=1e-3",
               "--min_lr=1e-4", "--eval_interval=6", threads=FIXTURE_THREADS)
    return {kind: str(root / kind) for kind in ("lora", "full")}


def train_metrics(out_dir):
    return [m for m in read_metrics(out_dir) if "loss" in m]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_dpo_loss_starts_at_ln2_when_the_policy_is_the_reference_and_falls(dpo_runs, kind):
    metrics = train_metrics(dpo_runs[kind])
    # step 1 logs the pairs of the first step, scored before any update
    assert metrics[0]["step"] == 1 and abs(metrics[0]["loss"] - math.log(2)) < 1e-6
    assert metrics[0]["margin"] == 0 and metrics[0]["accuracy"] == 0
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.2 and metrics[-1]["accuracy"] == 1
    gap = [m["logp_chosen"] - m["logp_rejected"] for m in (metrics[0], metrics[-1])]
    assert gap[1] > gap[0]  # the chosen answers gained on the rejected ones


def test_dpo_with_lora_saves_adapters_on_the_sft_checkpoint(dpo_runs, tiny_sft_checkpoint):
    ckpt = load_checkpoint(os.path.join(dpo_runs["lora"], "ckpt.pt"))
    assert ckpt["kind"] == "dpo" and all(".lora_" in k for k in ckpt["model"])
    assert os.path.dirname(ckpt["base"]["path"]) == os.path.abspath(tiny_sft_checkpoint)
    full = load_checkpoint(os.path.join(dpo_runs["full"], "ckpt.pt"))
    assert full["kind"] == "dpo" and "lora" not in full and "lm_head.weight" in full["model"]


def test_base_to_sft_to_dpo_to_chat_answers_piped_questions_turn_by_turn(dpo_runs):
    # The full run's small steps keep what SFT taught; the LoRA run's large ones (its loss must fall
    # within 12 steps) move the policy off it, so its greedy answer hangs on the last bits of the weights.
    result = run_script("sample.py", f"--out_dir={dpo_runs['full']}", "--device=cpu", "--chat=True", "--temperature=0",
                        "--max_new_tokens=12", stdin="What is 2+2?\nSay hi.\n")
    # each answer follows a '> ' prompt; the third prompt meets the end of the input
    assert result.stdout.startswith("> Four.\n> ") and result.stdout.count("> ") == 3


def test_lora_dpo_under_fsdp_in_two_processes_ends_with_the_adapters_of_one(tiny_sft_checkpoint, tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps(TOY_PAIRS + TOY_PAIRS[:1]))
    # 4 pairs per step: 2 micro-steps of 2 in one process, 1 in each of two
    args = [f"--init_from={tiny_sft_checkpoint}/ckpt.pt", f"--data={tmp_path / 'pairs.json'}", "--device=cpu",
            "--val_fraction=0", "--batch_size=2", "--total_batch_size=4", "--max_iters=3", "--eval_interval=3",
            "--lora_rank=4", "--learning_rate=1e-2", "--beta=0.5"]
    run_script("dpo.py", *args, f"--out_dir={tmp_path / 'one'}")
    run_torchrun("dpo.py", *args, f"--out_dir={tmp_path / 'two'}", "--parallelism=fsdp")
    one, two = (load_checkpoint(str(tmp_path / run / "ckpt.pt"))["model"] for run in ("one", "two"))
    assert one.keys() == two.keys() and all(".lora_" in k for k in one)
    assert max(one[k].abs().max() for k in one if "lora_B" in k) > 1e-3  # B starts at zero: the adapters trained
    assert_same_weights(two, one, atol=1e-5)


@pytest.mark.parametrize("lora", [True, False])
def test_dpo_stopped_and_resumed_ends_with_the_weights_and_losses_of_an_uninterrupted_run(lora, tiny_sft_checkpoint,
                                                                                         tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps(TOY_PAIRS))
    # two pairs to train on, one micro-step each; the third is held out
    args = [f"--init_from={tiny_sft_checkpoint}/ckpt.pt", f"--data={tmp_path / 'pairs.json'}", "--device=cpu",
            "--val_fraction=0.3", "--batch_size=1", "--total_batch_size=2", "--max_iters=4", "--eval_interval=2",
            "--log_interval=1", "--beta=0.5", "--warmup_iters=1", "--resume=auto"]
    # with LoRA, the adapters' dropout makes the losses depend on the restored random state too;
    # without, the resumed run must rebuild the frozen reference from the checkpoint it names
    args += ["--lora_rank=4", "--lora_dropout=0.1", "--learning_rate=1e-2"] if lora else ["--learning_rate=1e-3"]
    whole, resumed, stdout = stop_and_resume("dpo.py", args, tmp_path, at_step=2)
    assert f"resuming {resumed / 'ckpt-0000002.pt'} at step 2" in stdout
    assert [r["step"] for r in logged_after(whole, 2)] == [3, 4, 4]  # two steps' statistics, then the held-out ones
    assert logged_after(resumed, 2) == logged_after(whole, 2)
    ends = [load_checkpoint(str(run / "ckpt.pt")) for run in (whole, resumed)]
    assert_same_weights(ends[1]["model"], ends[0]["model"])
    assert ends[1]["reference"]["path"] == os.path.join(os.path.abspath(tiny_sft_checkpoint), "ckpt-0000080.pt")
