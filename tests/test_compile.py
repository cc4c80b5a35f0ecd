"""train.py with torch.compile on gives the losses of the eager run: in one process, and in two gloo
processes under DDP and under FSDP (whose blocks are compiled one by one).

Compiling on a CPU runs gcc, so these are the slowest tests of the suite: about a minute per compiled
run on an idle 2-core machine (the eager reference is shared), several under load. The smallest
model, two steps, two micro-steps per process so that accumulation is compiled too."""

import json
import os

import pytest

from conftest import TINY_MODEL, run_script, run_torchrun

ARGS = [a for a in TINY_MODEL if a != "--compile=False"] + [
    "--dataset=tiny", "--max_iters=2", "--eval_interval=2", "--learning_rate=1e-2", "--warmup_iters=1",
    "--total_batch_tokens=512"]


def all_losses(out_dir):
    """Every loss metrics.jsonl holds: the train loss of each step and the evaluations' train and val losses."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {(r["step"], key): r[key] for r in records for key in ("loss", "train_loss", "val_loss") if key in r}


@pytest.fixture(scope="module")
def eager_losses(tiny_data_root, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("eager")
    run_script("train.py", *ARGS, "--compile=False", f"--data_root={tiny_data_root}", f"--out_dir={out_dir}")
    return all_losses(out_dir)


@pytest.mark.parametrize("layout", ["one process", "ddp", "fsdp"])
def test_compiled_training_has_the_losses_of_eager_training(layout, eager_losses, tiny_data_root, tmp_path):
    args = [*ARGS, "--compile=True", f"--data_root={tiny_data_root}", f"--out_dir={tmp_path}"]
    if layout == "one process":
        stdout = run_script("train.py", *args).stdout
    else:
        stdout = run_torchrun("train.py", *args, f"--parallelism={layout}").stdout
    assert "compiling the model" in stdout
    compiled = all_losses(tmp_path)
    assert compiled.keys() == eager_losses.keys() and len(compiled) == 6  # steps 1, 2; evaluations at 0, 2
    assert compiled == pytest.approx(eager_losses, abs=1e-4)
