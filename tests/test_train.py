"""train.py: it learns, it resumes exactly, it writes what later stages read, it stops safely."""

import json
import math
import os

import pytest
import torch

from checkpoint import checkpoint_writer, load_checkpoint, model_from_checkpoint, save_training_checkpoint
from conftest import LLAMA, TINY_MODEL, read_metrics, run_script
from data import TokenBins
from optim import learning_rate_at, make_optimizer


def train(data_root, out_dir, *args, check=True):
    return run_script("train.py", *TINY_MODEL, f"--data_root={data_root}", "--dataset=tiny", f"--out_dir={out_dir}",
                      *args, check=check)


def test_training_lowers_the_validation_loss(tiny_data_root, tmp_path):
    train(tiny_data_root, tmp_path, "--max_iters=60", "--eval_interval=60", "--learning_rate=3e-3", "--warmup_iters=5")
    evals = [m for m in read_metrics(tmp_path) if "val_loss" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_data_root, tmp_path):
    # dropout makes the losses depend on the restored random state, not only on weights and data
    args = ["--dropout=0.1", "--eval_interval=3", "--warmup_iters=2", "--max_iters=6", "--init_from=auto"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(tiny_data_root, whole, *args)
    # a run stopped after step 3 is the first run's step-3 checkpoint in an otherwise empty out_dir
    resumed.mkdir()
    os.link(whole / "ckpt-0000003.pt", resumed / "ckpt-0000003.pt")
    train(tiny_data_root, resumed, *args)
    losses = lambda out: {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
    assert losses(resumed) == {step: loss for step, loss in losses(whole).items() if step > 3}
    assert sorted(losses(resumed)) == [4, 5, 6]


def test_checkpoint_holds_what_sample_and_resume_need(tiny_checkpoint):
    path = os.path.join(tiny_checkpoint, "ckpt.pt")
    ckpt = load_checkpoint(path)
    assert ckpt["kind"] == "pretrain" and ckpt["step"] == 4
    assert ckpt["tokenizer"]["kind"] == "byte" and ckpt["config"]["n_embd"] == 32
    assert {"optimizer", "rng", "best_val_loss"} <= set(ckpt)
    model, tokenizer = model_from_checkpoint(ckpt)
    assert model.config.n_layer == 2 and tokenizer.decode(tokenizer.encode("é\n")) == "é\n"


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_data_root, tmp_path):
    train(tiny_data_root, tmp_path, "--max_iters=2", "--eval_interval=2")
    ckpt = tmp_path / "ckpt.pt"
    before = ckpt.read_bytes()
    result = train(tiny_data_root, tmp_path, "--max_iters=6", "--eval_interval=2", "--init_from=resume",
                   "--learning_rate=1e8", "--warmup_iters=0", "--grad_clip=0.0", check=False)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train error: the loss is not finite") and "at step" in last_line
    assert ckpt.read_bytes() == before


def test_bad_config_is_a_one_line_error(tiny_data_root, tmp_path):
    for args, expected in [
        (["--n_layers=3"], "unknown key 'n_layers'"),
        (["--max_iters=ten"], "max_iters='ten'"),
        (["--n_head=3"], "must be divisible by n_head"),
        (["--dataset=missing"], "no "),
        (["--init_from=resume"], "no checkpoint at"),
        (["config/no_such_file.py"], "not found"),
    ]:
        result = train(tiny_data_root, tmp_path / "bad", *args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], (args, result.stderr)


def test_windows_never_cross_shards_and_cover_every_start(tmp_path):
    # two shards of distinct values: a window must hold values of one shard only
    import numpy as np
    np.arange(0, 10, dtype=np.uint16).tofile(tmp_path / "a.bin")
    np.arange(100, 104, dtype=np.uint16).tofile(tmp_path / "b.bin")
    meta = {"dtype": "uint16", "splits": {"train": {"files": ["a.bin", "b.bin"]}}}
    bins = TokenBins(str(tmp_path), meta, "train", block_size=3)
    x, y = bins.sample(2000, (0,))
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = set(x[:, 0].tolist())
    assert starts == set(range(0, 7)) | {100}  # 7 starts in a, 1 in b: every one is drawn
    assert all((row < 100).all() or (row >= 100).all() for row in torch.cat([x, y[:, -1:]], 1))


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    lr = lambda s: learning_rate_at(s, 1.0, 10, 110, 0.1)
    assert math.isclose(lr(0), 0.1) and math.isclose(lr(9), 1.0)
    assert math.isclose(lr(10), 1.0) and math.isclose(lr(60), 0.55) and math.isclose(lr(110), 0.1)
    assert lr(500) == 0.1
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))


def test_the_eta_is_the_clock_left_for_a_run_on_the_clock_and_the_steps_left_otherwise(monkeypatch):
    import trainer
    now = [100.0]
    monkeypatch.setattr(trainer.time, "time", lambda: now[0])
    pace = trainer.Pace(0, max_iters=1000)
    now[0] += 20.0  # 10 steps at 2 s
    seconds, text = pace.lap(10)
    assert seconds == 2.0 and text == "2000 ms/step | eta 33m00s"  # 990 steps left at 2 s
    now[0] += 20.0
    assert pace.lap(20, seconds_left=125.0)[1] == "2000 ms/step | eta 2m05s"  # max_seconds governs, not max_iters
    now[0] += 20.0
    assert pace.lap(30, seconds_left=-3.0)[1].endswith("eta 0m00s")  # the last step ran past the clock


def test_a_benchmark_is_scored_at_every_evaluation(tiny_data_root, tmp_path):
    questions = tmp_path / "arc.jsonl"
    questions.write_text("\n".join(json.dumps({"query": f"Question {i}: what is {i} plus one?",
                                               "choices": [str(i + 1), str(i + 7)], "gold": 0}) for i in range(5)))
    result = train(tiny_data_root, tmp_path / "run", "--max_iters=2", "--eval_interval=1", f"--benchmark={questions}")
    evals = [m for m in read_metrics(tmp_path / "run") if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 1, 2]
    assert all(m["benchmark_examples"] == 5 and 0 <= m["benchmark_accuracy"] <= 1 for m in evals)
    assert "arc.jsonl accuracy" in result.stdout


def test_a_batch_is_one_contiguous_window_array_cut_into_x_and_y(tmp_path):
    import numpy as np
    np.arange(0, 500, dtype=np.uint16).tofile(tmp_path / "a.bin")
    meta = {"dtype": "uint16", "splits": {"train": {"files": ["a.bin"]}}}
    bins = TokenBins(str(tmp_path), meta, "train", block_size=8)
    x, y = bins.sample(16, (3, 1))
    # one copy to the device: x and y are views of the same contiguous (rows, block_size + 1) windows
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() and x.stride() == (9, 1)
    windows = torch.cat([x, y[:, -1:]], 1)
    assert torch.equal(windows, x[:, :1] + torch.arange(9))  # each row is the file's tokens from its start
    many_x, many_y = bins.sample_many(16, [(3, 1), (3, 2)])
    assert torch.equal(many_x[:16], x) and torch.equal(many_y[:16], y)
    assert torch.equal(many_x[16:], bins.sample(16, (3, 2))[0])


def tiny_training_state():
    """A tiny model and its AdamW, and a function that takes one training step."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16, **LLAMA))
    optimizer = make_optimizer(model, 1e-2, 0.1, (0.9, 0.95), "cpu")

    def train_step():
        x = torch.randint(0, 64, (2, 16))
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()

    return model, optimizer, train_step


def test_a_checkpoint_written_in_the_background_holds_the_state_when_saved_while_training_goes_on(tmp_path,
                                                                                                   monkeypatch):
    import threading
    from checkpoint import gather_training_state, save_checkpoint
    from runtime import Distributed
    model, optimizer, train_step = tiny_training_state()
    train_step()
    weights, optimizer_state = gather_training_state(model, optimizer)
    save_checkpoint({"model": weights, "optimizer": optimizer_state}, tmp_path / "sync.pt")
    # the writer's torch.save waits until released: meanwhile training must go on
    release, original_save = threading.Event(), torch.save
    monkeypatch.setattr(torch, "save", lambda *args: release.wait(60) and original_save(*args))
    path = save_training_checkpoint(model, optimizer, Distributed(0, 0, 1, "cpu"), str(tmp_path / "run"), keep=2,
                                    kind="pretrain", step=1)
    train_step()
    train_step()
    assert not os.path.exists(path)
    release.set()
    checkpoint_writer.wait()
    monkeypatch.undo()
    written, sync = (torch.load(p, weights_only=True) for p in (path, tmp_path / "sync.pt"))
    assert written["step"] == 1 and os.path.samefile(path, tmp_path / "run" / "ckpt.pt")
    for name, tensor in sync["model"].items():
        assert torch.equal(written["model"][name], tensor), name
        assert not torch.equal(model.state_dict()[name], tensor) or tensor.dim() < 2  # training moved on
    for name, state in sync["optimizer"]["state"].items():
        assert all(torch.equal(written["optimizer"]["state"][name][k], v) for k, v in state.items()), name


def test_a_failed_background_write_stops_the_run_with_one_line_at_the_next_save_or_the_end(tmp_path, monkeypatch):
    import checkpoint
    from runtime import Distributed
    model, optimizer, train_step = tiny_training_state()
    (tmp_path / "not_a_folder").write_text("")
    save_training_checkpoint(model, optimizer, Distributed(0, 0, 1, "cpu"), str(tmp_path / "not_a_folder"), keep=2,
                             kind="pretrain", step=1)
    with pytest.raises(SystemExit) as stopped:
        checkpoint_writer.wait()
    message = str(stopped.value)
    assert message.startswith("checkpoint error: writing a checkpoint to disk failed") and "\n" not in message
    checkpoint_writer.wait()  # reported once: the next write starts afresh
    # an error that is already one line (save_checkpoint's, say) stops the run as it is
    def full_disk(*args):
        raise SystemExit("disk error: full")

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    save_training_checkpoint(model, optimizer, Distributed(0, 0, 1, "cpu"), str(tmp_path / "run"), keep=2,
                             kind="pretrain", step=2)
    with pytest.raises(SystemExit, match="^disk error: full$"):
        checkpoint_writer.wait()
