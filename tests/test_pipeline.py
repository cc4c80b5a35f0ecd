"""Pipeline parallelism and CPU offload on CPU processes (gloo): a model cut into stages computes the
loss and gradients of the whole model, a (pipeline x data) grid of processes trains like one process
with the same global batch, checkpoints move between layouts, and FSDP with CPU offload trains
like a plain run."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_MODEL, run_script
from pipeline_worker import MAX_NORM, batch, tiny_model
from test_distributed import FAST, assert_same_weights, train, weights
from pipeline import join_pipeline_stages, pipeline_layers, pipeline_stage_part, split_for_pipeline

# 4 micro-batches of 4 sequences x 32 tokens per step: 1 process accumulates 4 micro-steps, a
# 2 x 2 grid sends 2 micro-batches through each pipeline.
STEP = ["--total_batch_tokens=512", *FAST]


@pytest.mark.parametrize("processes, stages, schedule, microbatches, pos", [
    (2, 2, "gpipe", 2, "rope"), (2, 2, "1f1b", 4, "learned"), (4, 4, "1f1b", 4, "rope"), (4, 2, "1f1b", 2, "rope")])
def test_stages_compute_the_loss_and_gradients_of_the_whole_model(processes, stages, schedule, microbatches, pos,
                                                                   tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           os.path.join(REPO, "tests", "pipeline_worker.py"), str(tmp_path), str(stages), schedule, str(microbatches),
           pos]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    replicas = processes // stages
    model = tiny_model(pos)
    x, y = batch(microbatches * replicas)
    _, loss = model(x, y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(processes)]
    # the last stage of each replica has the losses of its micro-batches (process r: stage r // replicas)
    reference = [model(xm, ym)[1].item() for xm, ym in zip(x.chunk(microbatches * replicas),
                                                           y.chunk(microbatches * replicas))]
    last_stage = torch.cat([part["losses"] for part in parts[-replicas:]])
    torch.testing.assert_close(last_stage, torch.tensor(reference), atol=1e-6, rtol=0)
    torch.testing.assert_close(last_stage.mean(), loss.detach(), atol=1e-6, rtol=0)
    # each parameter on one stage, its averaged and clipped gradient equal to the whole model's
    for part in parts:
        torch.testing.assert_close(part["norm"], norm, atol=1e-6, rtol=1e-5)
    stage_heads = parts[::replicas]
    assert sorted(n for part in stage_heads for n in part["grads"]) == sorted(n for n, _ in model.named_parameters())
    for part in parts:
        for name, grad in part["grads"].items():
            torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-6, rtol=1e-5, msg=name)


def test_stage_parts_keep_the_whole_models_names_and_join_back_into_it(monkeypatch):
    assert [list(r) for r in pipeline_layers(5, 2)] == [[0, 1], [2, 3, 4]]
    with pytest.raises(SystemExit, match="pipeline_stages=3 must be between 1 and n_layer=2"):
        pipeline_layers(2, 3)
    whole = tiny_model("rope").state_dict()
    stages = [split_for_pipeline(tiny_model("rope"), r, s == 0, s == 1) for s, r in enumerate(pipeline_layers(4, 2))]
    names = [list(stage.state_dict()) for stage in stages]
    assert names[0][0] == "wte.weight" and names[1][-1] == "lm_head.weight"
    assert names[0] + names[1] == list(whole)  # a partition, in the whole model's order

    # a whole checkpoint cut into the stages' parts and joined again is the checkpoint
    optimizer = {"state": {name: {"step": torch.tensor(3.0)} for name in whole},
                 "param_groups": [{"lr": 0.1, "params": [n for n in whole if whole[n].dim() >= 2]},
                                  {"lr": 0.1, "params": [n for n in whole if whole[n].dim() < 2]}]}
    checkpoint = {"model": whole, "optimizer": optimizer}
    parts = [pipeline_stage_part(checkpoint, stage) for stage in stages]
    assert list(parts[1]["model"]) == names[1] and set(parts[1]["optimizer"]["state"]) == set(names[1])

    class OneProcess:
        world_size, is_main = 1, True

    def gather_object(part, into, dst):  # what rank 0 receives from the first replicas of two stages
        into[:] = [(p["model"], p["optimizer"]) for p in parts]

    monkeypatch.setattr(torch.distributed, "gather_object", gather_object)
    model_state, optimizer_state = join_pipeline_stages(None, OneProcess)
    assert list(model_state) == list(whole)
    assert optimizer_state["param_groups"] == optimizer["param_groups"]
    assert set(optimizer_state["state"]) == set(whole)


@pytest.fixture(scope="module")
def one_process_512(tiny_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("single512")
    train(tiny_data_root, out, *STEP, "--max_iters=4")
    return out


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_stages_by_two_replicas_train_like_one_process(parallelism, one_process_512, tiny_data_root, tmp_path):
    stdout = train(tiny_data_root, tmp_path, *STEP, "--max_iters=4", "--pipeline_stages=2",
                   f"--parallelism={parallelism}", nproc=4)
    assert f"2 pipeline stages x 2 {parallelism}" in stdout and "x 2 micro-batches (1f1b)" in stdout
    assert_same_weights(weights(tmp_path), weights(one_process_512), atol=1e-5)

    # the pipelined run's step-2 checkpoint resumes in one process and ends where one process does
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.link(tmp_path / "ckpt-0000002.pt", resumed / "ckpt.pt")
    train(tiny_data_root, resumed, *STEP, "--max_iters=4", "--init_from=resume")
    assert_same_weights(weights(resumed), weights(one_process_512), atol=1e-5)


def test_a_one_process_checkpoint_resumes_in_a_pipeline(one_process_512, tiny_data_root, tmp_path):
    os.link(one_process_512 / "ckpt-0000002.pt", tmp_path / "ckpt.pt")
    stdout = train(tiny_data_root, tmp_path, *STEP, "--max_iters=4", "--init_from=resume",
                   "--pipeline_stages=2", "--pipeline_schedule=gpipe", nproc=2)
    assert "resuming" in stdout and "micro-batches (gpipe)" in stdout
    assert_same_weights(weights(tmp_path), weights(one_process_512), atol=1e-5)


def test_fsdp_with_cpu_offload_in_one_process_trains_like_a_plain_run(one_process_512, tiny_data_root, tmp_path):
    stdout = train(tiny_data_root, tmp_path, *STEP, "--max_iters=4", "--parallelism=fsdp", "--cpu_offload=True")
    assert "(fsdp, cpu offload)" in stdout
    assert_same_weights(weights(tmp_path), weights(one_process_512), atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--cpu_offload=True"], "cpu_offload=True offloads FSDP's shards; set --parallelism=fsdp"),
    (["--pipeline_stages=2", "--pipeline_schedule=zb"], "pipeline_schedule='zb' is not one of gpipe, 1f1b"),
    (["--pipeline_stages=2"], "pipeline_stages=2 does not divide the 1 processes"),
])
def test_bad_pipeline_settings_stop_with_one_line(args, message, tiny_data_root, tmp_path):
    result = run_script("train.py", *TINY_MODEL, f"--data_root={tiny_data_root}", "--dataset=tiny",
                        f"--out_dir={tmp_path}", *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
