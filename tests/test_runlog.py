"""runlog.py, plot.py and report.py: the plot is a real PNG of the promised size, the trackers get
exactly the records of metrics.jsonl, and the report cards hold the run's final numbers.
(Alone: 107 s under load average 12 on 2 cores, 42 s of CPU, most of it one tiny train.py run and
the tiny_checkpoint and tiny_sft_checkpoint fixtures, which the whole suite shares with other files.)"""

import importlib.util
import json
import os
import runpy
import shutil
import statistics
import struct
import sys
import types

import pytest

from conftest import TINY_MODEL, read_metrics, run_script
import runlog

# A stand-in for the wandb package: each call goes as one JSON line to the file $FAKE_WANDB_LOG,
# so a test sees what a trainer in a subprocess sent.
FAKE_WANDB = '''
import json, os

def _write(call, **fields):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"call": call, **fields}) + "\\n")

class Image:
    def __init__(self, path):
        self.path = path

class Run:
    def __init__(self, id):
        self.id = id

    def log(self, data, step=None):
        _write("log", data={k: v.path if isinstance(v, Image) else v for k, v in data.items()}, step=step,
               image=any(isinstance(v, Image) for v in data.values()))

    def finish(self):
        _write("finish")

def init(project=None, name=None, config=None, dir=None, id=None, resume=None):
    run = Run(id or os.urandom(4).hex())
    _write("init", project=project, config=config, id=run.id, resume=resume)
    return run
'''


@pytest.fixture
def fake_wandb(tmp_path, monkeypatch):
    """The fake wandb importable here and in subprocesses; returns a function reading its calls."""
    package = tmp_path / "fake_packages" / "wandb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_WANDB)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    monkeypatch.setenv("FAKE_WANDB_LOG", str(tmp_path / "wandb_calls.jsonl"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    yield lambda: [json.loads(line) for line in open(tmp_path / "wandb_calls.jsonl")]
    sys.modules.pop("wandb", None)


@pytest.fixture
def fake_tensorboard(monkeypatch):
    """A stand-in for torch.utils.tensorboard whose SummaryWriter keeps its calls in a list."""
    calls = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step, walltime=None):
            calls.append(("scalar", tag, value, step))

        def add_text(self, tag, text):
            calls.append(("text", tag, text))

        def flush(self):
            calls.append(("flush",))

        def add_image(self, tag, image, step, dataformats):
            calls.append(("image", tag, image.shape, dataformats))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    return calls

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install matplotlib)")


def png_size(path):
    """(width, height) of a PNG file, from its IHDR chunk, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def write_synthetic_run(folder, steps=100, val_every=25, scale=1.0):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in range(0, steps + 1, 5):
            if step % val_every == 0:
                f.write(json.dumps({"step": step, "tokens": step * 4096, "train_loss": scale * 5 / (1 + step / 20),
                                    "val_loss": scale * 5.2 / (1 + step / 20), "time": 1000.0 + step}) + "\n")
            if step:
                f.write(json.dumps({"step": step, "tokens": step * 4096, "loss": scale * 5 / (1 + step / 20),
                                    "lr": 1e-3, "tokens_per_sec": 5000.0 + step, "mfu": 0.3, "time": 1000.0 + step})
                        + "\n")


@needs_matplotlib
def test_plot_py_draws_several_runs_into_a_png_of_the_expected_size(tmp_path):
    write_synthetic_run(tmp_path / "a")
    write_synthetic_run(tmp_path / "b", steps=60, scale=1.2)
    out = tmp_path / "both.png"
    result = run_script("plot.py", str(tmp_path / "a"), str(tmp_path / "b"), f"--out={out}", "--labels=a,b")
    assert f"wrote {out}" in result.stdout
    expected = (runlog.PLOT_SIZE[0] * runlog.PLOT_DPI, runlog.PLOT_SIZE[1] * runlog.PLOT_DPI)
    assert png_size(out) == expected
    run_script("plot.py", str(tmp_path / "a"))  # default: beside the (first) run
    assert png_size(tmp_path / "a" / "plot.png") == expected


@needs_matplotlib
def test_runs_of_different_trainers_each_draw_their_own_curves_on_one_plot(tmp_path, monkeypatch):
    import matplotlib.axes

    write_synthetic_run(tmp_path / "pretrain")  # logs mfu
    os.makedirs(tmp_path / "translate")
    (tmp_path / "translate" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 - s / 100, "val_bleu": s / 10}) + "\n" for s in (10, 20)))
    drawn, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append(k["label"]) or plot(ax, *a, **k))
    runlog.plot_runs([tmp_path / "pretrain", tmp_path / "translate"], tmp_path / "plot.png")
    assert "pretrain mfu" in drawn and "translate val_bleu" in drawn


def test_plot_py_names_a_folder_without_metrics(tmp_path):
    result = run_script("plot.py", str(tmp_path), check=False)
    assert result.returncode != 0 and "metrics.jsonl does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_matplotlib_the_plot_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    write_synthetic_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr(runlog, "_warned_no_matplotlib", False)
    assert runlog.plot_runs([tmp_path], tmp_path / "plot.png") is None
    assert runlog.plot_runs([tmp_path], tmp_path / "plot.png") is None
    assert capsys.readouterr().out == "plot skipped: matplotlib is not installed (pip install matplotlib)\n"
    assert not (tmp_path / "plot.png").exists()


@needs_matplotlib
def test_trackers_receive_the_records_of_metrics_jsonl_the_config_and_the_plot(tmp_path, fake_wandb,
                                                                                fake_tensorboard):
    config = {"learning_rate": 1e-3, "wandb_project": "proj", "tensorboard": True}
    run_log = runlog.RunLog(str(tmp_path), config, stage="pretrain")
    run_log.log({"step": 0, "train_loss": 5.0, "val_loss": 5.1})
    run_log.log({"step": 10, "loss": 4.0, "lr": 1e-3, "tokens_per_sec": 900.0, "mfu": None, "time": 1234.5})
    run_log.log({"step": 10, "train_loss": 3.9, "val_loss": 4.2})
    run_log.finish()
    written = read_metrics(tmp_path)
    assert [r["step"] for r in written] == [0, 10, 10] and "mfu" not in written[1]  # None is left out
    calls = fake_wandb()
    assert {k: calls[0][k] for k in ("call", "project", "config", "resume")} == {
        "call": "init", "project": "proj", "config": config, "resume": None}
    assert [c["data"] for c in calls if c["call"] == "log" and not c["image"]] == written
    images = [c for c in calls if c["call"] == "log" and c["image"]]
    assert len(images) == 1 and images[0]["data"] == {"plot": str(tmp_path / "plot.png")} and images[0]["step"] == 10
    assert calls[-1] == {"call": "finish"}
    scalars = [c[1:] for c in fake_tensorboard if c[0] == "scalar"]
    assert scalars == [(k, v, r["step"]) for r in written for k, v in r.items() if k not in ("step", "time")]
    assert [c[0] for c in fake_tensorboard].count("flush") == len(written)  # each record on disk at once
    assert ("text", "config") == fake_tensorboard[1][:2] and "learning_rate = 0.001" in fake_tensorboard[1][2]
    width, height = png_size(tmp_path / "plot.png")
    assert fake_tensorboard[-2] == ("image", "plot", (height, width, 3), "HWC") and fake_tensorboard[-1] == ("close",)


def test_a_resumed_run_continues_its_wandb_run_and_its_curves_from_the_checkpoints_step(tmp_path, fake_wandb,
                                                                                        fake_tensorboard):
    config = {"wandb_project": "proj", "tensorboard": True}
    first = runlog.RunLog(str(tmp_path), config)
    for step in range(7):
        first.log({"step": step, "loss": 10.0 - step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # killed mid-line, after its last checkpoint (step 4)
    resumed = runlog.RunLog(str(tmp_path), config, resumed_at=4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]  # what the resumed run logs again is gone
    for step in range(5, 9):
        resumed.log({"step": step, "loss": 10.0 - step})
    resumed.finish()
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(9))
    inits = [c for c in fake_wandb() if c["call"] == "init"]
    assert [c["resume"] for c in inits] == [None, "allow"] and inits[1]["id"] == inits[0]["id"]
    assert (tmp_path / runlog.WANDB_ID_NAME).read_text() == inits[0]["id"] + "\n"
    # TensorBoard: a second events file in the same folder, hiding the first one's events after step 4
    assert [c[1:] for c in fake_tensorboard if c[0] == "init"] == [(str(tmp_path / "tensorboard"), None),
                                                                   (str(tmp_path / "tensorboard"), 5)]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="reads the events with TensorBoard's own reader: pip install tensorboard")
def test_tensorboard_reads_a_resumed_run_as_one_curve_without_the_killed_runs_steps_past_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    killed = runlog.RunLog(str(tmp_path), {"tensorboard": True})
    for step in range(8):  # killed after step 7; its last checkpoint is of step 4
        killed.log({"step": step, "loss": 10.0 - step})
    resumed = runlog.RunLog(str(tmp_path), {"tensorboard": True}, resumed_at=4)
    for step in range(5, 10):
        resumed.log({"step": step, "loss": 100.0 + step})
    resumed.finish()
    assert len(os.listdir(tmp_path / "tensorboard")) == 2  # an events file per run, in one folder
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("loss")
    assert [(e.step, e.value) for e in events] == ([(s, 10.0 - s) for s in range(5)]
                                                   + [(s, 100.0 + s) for s in range(5, 10)])


def test_a_new_run_in_a_used_folder_gets_its_own_wandb_run_and_names_it_only_once_it_owns_the_folder(
        tmp_path, fake_wandb):
    config = {"wandb_project": "proj"}
    runlog.RunLog(str(tmp_path), config).log({"step": 0, "loss": 1.0})
    earlier = (tmp_path / runlog.WANDB_ID_NAME).read_text()
    new = runlog.RunLog(str(tmp_path), config, metrics_path=str(tmp_path / "metrics.jsonl.new.tmp"))
    new.log({"step": 0, "loss": 2.0})
    assert (tmp_path / runlog.WANDB_ID_NAME).read_text() == earlier  # before its first checkpoint: the earlier run's
    new.metrics_path = str(tmp_path / "metrics.jsonl")  # as outdir.replace_earlier_run does at the first checkpoint
    new.log({"step": 1, "loss": 1.5})
    inits = [c for c in fake_wandb() if c["call"] == "init"]
    assert inits[1]["resume"] is None and inits[1]["id"] != inits[0]["id"]
    assert (tmp_path / runlog.WANDB_ID_NAME).read_text() == inits[1]["id"] + "\n"


def test_a_missing_tracker_package_is_one_line_naming_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match="pip install wandb"):
        runlog.RunLog(str(tmp_path), {"wandb_project": "proj"})
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        runlog.RunLog(str(tmp_path), {"tensorboard": True})


def test_only_rank_0_logs_the_other_processes_import_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would stop rank 0: the others never import it
    run_log = runlog.RunLog(str(tmp_path / "run"), {"wandb_project": "proj"}, enabled=False)
    run_log.log({"step": 1, "loss": 2.0})
    run_log.plot()
    run_log.finish()
    assert not (tmp_path / "run").exists()


@needs_matplotlib
def test_train_py_sends_its_records_to_wandb_and_leaves_a_plot_and_a_card(tiny_data_root, tmp_path, fake_wandb):
    out_dir = tmp_path / "run"
    run_script("train.py", *TINY_MODEL, f"--data_root={tiny_data_root}", "--dataset=tiny", f"--out_dir={out_dir}",
               "--max_iters=4", "--eval_interval=2", "--wandb_project=tiny")
    written = read_metrics(out_dir)
    assert [r["tokens"] for r in written if "lr" in r] == [256, 512, 768, 1024]  # step x total_batch_tokens
    calls = fake_wandb()
    assert calls[0]["project"] == "tiny" and calls[0]["config"]["max_iters"] == 4
    assert [c["data"] for c in calls if c["call"] == "log" and not c["image"]] == written
    assert png_size(out_dir / "plot.png") == (runlog.PLOT_SIZE[0] * runlog.PLOT_DPI, runlog.PLOT_SIZE[1] * runlog.PLOT_DPI)
    card = (out_dir / "report.md").read_text()
    final_eval = written[-1]
    assert final_eval["step"] == 4 and "val_loss" in final_eval
    assert f"| val_loss | {final_eval['val_loss']:.4f} |" in card
    assert f"| loss | {[r for r in written if 'lr' in r][-1]['loss']:.4f} |" in card
    assert "| steps | 4 |" in card and "| tokens trained on | 1,024 |" in card and "![curves" in card


def test_report_py_joins_the_cards_of_a_pipeline_with_a_comparison_table(tmp_path):
    data = tmp_path / "data" / "tiny"
    data.mkdir(parents=True)
    (data / "report.json").write_text(json.dumps({"output": {"documents": 3, "tokens": {"train": 900, "val": 100}},
                                                  "removed": {"too_short": 2}, "seconds": {"total": 1.5},
                                                  "mb_per_s": 2.0}))
    (data / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "byte"}, "vocab_size": 257,
                                                "unigram_loss": 3.2}))
    pre, post = tmp_path / "out" / "pre", tmp_path / "out" / "post"
    write_synthetic_run(pre)
    write_synthetic_run(post, steps=50, scale=0.5)
    (post / "eval.json").write_text(json.dumps({"checkpoint": str(post / "ckpt.pt"), "results": {
        "arc_easy": {"examples": 10, "accuracy": 0.4, "accuracy_norm": 0.45, "perplexity": 3.0}}}))
    runlog.write_card(str(pre))
    assert "| val_loss | 0.8667 |" in (pre / "report.md").read_text()  # 5.2 / (1 + 100 / 20)
    page_path = tmp_path / "pipeline.md"
    run_script("report.py", str(data), str(pre), str(post), f"--out={page_path}")
    page = page_path.read_text()
    assert "| folder | stage | steps | tokens | time | tokens/s | MFU | train loss | val loss | arc_easy (accuracy_norm) |" \
        in page
    pre_rate, post_rate = (statistics.median(r["tokens_per_sec"] for r in read_metrics(run) if "lr" in r)
                           for run in (pre, post))
    assert f"| {pre} | run | 100 | 409,600 | 1.7 min | {pre_rate:,.0f} | 30.0% | 0.8333 | 0.8667 | - |" in page
    assert f"| {post} | run | 50 | 204,800 | 50.0 s | {post_rate:,.0f} | 30.0% | 0.7143 | 0.7429 | 0.4500 |" in page
    assert f"| {data} | prepare | - | 1,000 | 1.5 s |" in page and "| train tokens | 900 |" in page and "| unigram loss | 3.2000 |" in page
    assert page.count("## ") == 3


@needs_matplotlib
def test_sft_py_leaves_a_card_with_its_final_held_out_loss(tiny_sft_checkpoint):
    written = read_metrics(tiny_sft_checkpoint)
    card = open(os.path.join(tiny_sft_checkpoint, "report.md")).read()
    final_val_loss = [r["val_loss"] for r in written if "val_loss" in r][-1]
    assert "| stage | sft |" in card and "| steps | 80 |" in card and f"| val_loss | {final_val_loss:.4f} |" in card
    assert png_size(os.path.join(tiny_sft_checkpoint, "plot.png")) == (runlog.PLOT_SIZE[0] * runlog.PLOT_DPI,
                                                                       runlog.PLOT_SIZE[1] * runlog.PLOT_DPI)


def test_evaluate_py_adds_its_scores_to_the_runs_card(tiny_checkpoint, tmp_path, monkeypatch):
    for name in ("ckpt.pt", "metrics.jsonl", "run.json"):
        shutil.copy(os.path.join(tiny_checkpoint, name), tmp_path / name)
    text = tmp_path / "text.txt"
    text.write_text(open(os.path.join(os.path.dirname(runlog.__file__), "model.py")).read()[:2000])
    # in this process, as test_evaluate.py runs it: no second torch import
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--device=cpu", f"--out_dir={tmp_path}", "--tasks=perplexity",
                                      f"--text_file={text}"])
    runpy.run_path(os.path.join(os.path.dirname(runlog.__file__), "evaluate.py"), run_name="__main__")
    perplexity = json.loads((tmp_path / "eval.json").read_text())["results"]["perplexity"]
    card = (tmp_path / "report.md").read_text()
    assert (f"| perplexity | bits_per_byte | {perplexity['bits_per_byte']:.4f} | - | - | perplexity "
            f"{perplexity['perplexity']:.4f} |") in card
    assert "| stage | pretrain |" in card and "| steps | 4 |" in card


def test_a_file_saved_atomically_reads_as_any_other_and_keeps_its_text_in_utf8(tmp_path):
    path = tmp_path / "card.md"
    runlog.save_atomically(str(path), lambda f: f.write("Grüße\n"))
    assert path.read_bytes() == "Grüße\n".encode("utf-8")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~runlog.UMASK  # not mkstemp's owner-only 0600
    assert [p.name for p in tmp_path.iterdir()] == ["card.md"]  # no temporary file left beside it
