"""train.py under torchrun on CPU processes (gloo): DDP and FSDP match one process, runs resume
exactly, checkpoints move between world sizes, and a killed worker is recovered automatically."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY_MODEL

# Enough learning rate that 4 steps move the weights well beyond float noise.
FAST = ["--learning_rate=1e-2", "--warmup_iters=1", "--eval_interval=2"]


def torchrun_command(*args, nproc=2, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", os.path.join(REPO, "train.py"), *TINY_MODEL, *args]


def train(data_root, out_dir, *args, nproc=1):
    """Run train.py in nproc processes (plainly when 1); return its stdout."""
    common = [f"--data_root={data_root}", "--dataset=tiny", f"--out_dir={out_dir}", *args]
    cmd = torchrun_command(*common, nproc=nproc) if nproc > 1 else [sys.executable, "train.py", *TINY_MODEL, *common]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f) if "loss" in m}


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def one_process_run(tiny_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train(tiny_data_root, out, *FAST, "--max_iters=4")
    return out


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_end_with_the_weights_of_one_process_with_the_same_global_batch(
        parallelism, one_process_run, tiny_data_root, tmp_path):
    # TINY_MODEL's global batch is 256 tokens: 2 micro-steps of 4 x 32 in one process, 1 in each of two
    stdout = train(tiny_data_root, tmp_path, *FAST, "--max_iters=4", f"--parallelism={parallelism}", nproc=2)
    assert "x 2 data-parallel processes x 1 accumulation steps" in stdout and f"({parallelism})" in stdout
    start = GPT_INIT_DISTANCE(one_process_run)
    assert start > 1e-2  # the weights really moved, so agreement below means something
    assert_same_weights(weights(tmp_path), weights(one_process_run), atol=1e-5)
    assert losses(tmp_path).keys() == losses(one_process_run).keys()


def GPT_INIT_DISTANCE(out_dir):
    """How far training moved the weights from their initial values (same seed, same init)."""
    from model import GPT, GPTConfig
    from parallel import init_weights
    checkpoint = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
    init = GPT(GPTConfig.from_dict(checkpoint["model_config"]))
    init_weights(init, checkpoint["config"]["seed"])
    init = init.state_dict()
    return max((checkpoint["model"][k] - init[k]).abs().max().item() for k in init)


def test_two_process_resume_gives_the_losses_of_an_uninterrupted_run(tiny_data_root, tmp_path):
    args = ["--dropout=0.1", *FAST, "--max_iters=4", "--init_from=auto"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(tiny_data_root, whole, *args, nproc=2)
    # a run stopped after step 2 is the first run's step-2 checkpoint in an otherwise empty out_dir
    resumed.mkdir()
    os.link(whole / "ckpt-0000002.pt", resumed / "ckpt-0000002.pt")
    stdout = train(tiny_data_root, resumed, *args, nproc=2)
    assert "resuming" in stdout and "at step 2" in stdout
    assert losses(resumed) == {s: l for s, l in losses(whole).items() if s > 2}


def test_fsdp_checkpoint_resumes_in_one_process_as_if_trained_there(one_process_run, tiny_data_root, tmp_path):
    train(tiny_data_root, tmp_path, *FAST, "--max_iters=2", "--parallelism=fsdp", nproc=2)
    train(tiny_data_root, tmp_path, *FAST, "--max_iters=4", "--init_from=resume")
    assert_same_weights(weights(tmp_path), weights(one_process_run), atol=1e-5)


def test_a_killed_worker_is_restarted_and_the_run_finishes_from_its_last_checkpoint(tiny_data_root, tmp_path):
    cmd = torchrun_command(f"--data_root={tiny_data_root}", "--dataset=tiny", f"--out_dir={tmp_path}",
                           "--max_iters=300", "--eval_interval=25", "--log_interval=50", "--init_from=auto",
                           restarts=1)
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not any(name.startswith("ckpt-") for name in os.listdir(tmp_path)):
            assert time.time() < deadline and launcher.poll() is None, "no checkpoint appeared"
            time.sleep(0.05)
        workers = child_pids(launcher.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=240)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output
    assert "resuming" in output and "done: val loss" in output
    with open(tmp_path / "metrics.jsonl") as f:
        assert max(json.loads(line)["step"] for line in f) == 300


def child_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_a_truncated_newest_checkpoint_is_skipped_with_a_message(tiny_data_root, tmp_path):
    train(tiny_data_root, tmp_path, *FAST, "--max_iters=4")
    newest = tmp_path / "ckpt-0000004.pt"
    newest.write_bytes(newest.read_bytes()[:2000])  # also truncates ckpt.pt, a link to it
    stdout = train(tiny_data_root, tmp_path, *FAST, "--max_iters=6", "--init_from=auto")
    assert "ckpt-0000004.pt is corrupt" in stdout and "trying the previous checkpoint" in stdout
    assert "ckpt-0000002.pt at step 2" in stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 6


def test_only_the_newest_checkpoints_are_kept_and_ckpt_pt_is_the_newest(tiny_data_root, tmp_path):
    train(tiny_data_root, tmp_path, *FAST, "--max_iters=8", "--keep_checkpoints=2")
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt")) == [
        "ckpt-0000006.pt", "ckpt-0000008.pt", "ckpt.pt"]
    assert os.path.samefile(tmp_path / "ckpt.pt", tmp_path / "ckpt-0000008.pt")


@pytest.mark.parametrize("sync_every_micro_step", [False, True])
def test_fsdp_with_accumulation_syncing_once_or_every_micro_step_ends_with_the_weights_of_one_process(
        sync_every_micro_step, tiny_data_root, tmp_path):
    # 512 tokens per step: 4 micro-steps of 4 x 32 in one process, 2 in each of two (gradients reduced on the
    # last one only, unless every micro-step is asked for)
    args = [*FAST, "--max_iters=2", "--total_batch_tokens=512"]
    train(tiny_data_root, tmp_path / "one", *args)
    stdout = train(tiny_data_root, tmp_path / "two", *args, "--parallelism=fsdp",
                   f"--fsdp_sync_every_micro_step={sync_every_micro_step}", nproc=2)
    assert "x 2 data-parallel processes x 2 accumulation steps" in stdout
    assert_same_weights(weights(tmp_path / "two"), weights(tmp_path / "one"), atol=1e-5)


@pytest.mark.parametrize("style", [dict(tie_embeddings=True), dict(norm="layernorm", bias=True, pos="learned")])
def test_a_model_built_on_the_meta_device_gets_block_by_block_the_weights_of_one_built_whole(style):
    from model import GPT, GPTConfig
    from parallel import init_weights
    config = GPTConfig(vocab_size=100, n_layer=2, n_head=2, n_embd=16, block_size=16, **style)
    whole = GPT(config)
    init_weights(whole, 7)
    with torch.device("meta"):
        parts = GPT(config)
    # as under FSDP: one block at a time gets memory and weights, the rest stays on the meta device
    init_weights(parts, 7, lambda name: name.startswith("blocks.1."))
    assert {n for n, p in parts.named_parameters() if not p.is_meta} == {
        n for n, _ in parts.named_parameters() if n.startswith("blocks.1.")}
    init_weights(parts, 7, lambda name: name.startswith("blocks.0."))
    init_weights(parts, 7, lambda name: not name.startswith("blocks."))
    assert (parts.lm_head.weight is parts.wte.weight) == config.tie_embeddings
    assert whole.state_dict().keys() == parts.state_dict().keys()
    for name, tensor in whole.state_dict().items():
        assert torch.equal(parts.state_dict()[name], tensor), name
    for name, buffer in whole.named_buffers():
        assert torch.equal(dict(parts.named_buffers())[name], buffer), name
    # the model's own init rule: unit gains, zero biases, residual projections scaled down
    state = whole.state_dict()
    assert torch.equal(state["blocks.0.ln_1.weight"], torch.ones(16))
    assert abs(state["blocks.1.mlp.c_proj.weight"].std().item() / state["blocks.1.mlp.c_fc.weight"].std().item()
               - 0.5) < 0.1  # 0.02 / sqrt(2 * n_layer) against 0.02
    reseeded = GPT(config)
    init_weights(reseeded, 8)
    assert not torch.equal(reseeded.state_dict()["blocks.0.attn.c_attn.weight"], state["blocks.0.attn.c_attn.weight"])
