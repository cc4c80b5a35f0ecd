"""
What a run leaves for people to look at: its metrics log (and the same records in an
experiment tracker), a plot of its curves, and a report card.

A trainer keeps one RunLog (rank 0 does the work; on the other processes it does nothing):

    run_log = RunLog(out_dir, config, master, stage="pretrain", parameters=..., device=...)
    run_log.log({"step": 10, "loss": 3.2, ...})   # a line of out_dir/metrics.jsonl, and to W&B / TensorBoard
    run_log.plot()                                # out_dir/plot.png from metrics.jsonl
    run_log.finish()                              # the last plot, report.md, trackers closed

Everything here reads only the files a run leaves, so plot.py and report.py draw and summarise any run,
finished or not. The plot, the trackers (and how a resumed run continues their curves), the cards: docs/train.md.
"""

import contextlib
import glob
import json
import os
import pathlib
import statistics
import tempfile
import time

from optional import optional

PLOT_SIZE = (12, 7)  # inches; at PLOT_DPI the PNG is 1080 x 630 pixels
PLOT_DPI = 90


UMASK = os.umask(0o022)
os.umask(UMASK)  # read once, at import: os.umask can only be read by setting it, which threads must not race


def save_atomically(path, write, mode="w", sync=False):
    """Write path through write(file) to a temporary name beside it (f.name, for a writer that opens it
    itself), then rename it into place, so a reader sees the old file or the whole new one; with sync,
    flushed to disk first (checkpoints, exports). Every file the repository writes whole goes through here."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's file is its owner's alone; the finished file reads as any other
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())  # whichever handle wrote the file: fsync flushes the file itself
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_json(path, missing=None):
    """The JSON value in path; missing when there is no such file."""
    if not os.path.isfile(path):
        return missing
    with open(path) as f:
        return json.load(f)


def read_metrics(folder):
    """The records of folder/metrics.jsonl ([] if there is none); a line cut short by a crash is skipped."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


# -----------------------------------------------------------------------------
# experiment trackers

WANDB_ID_NAME = "wandb_run_id"  # in out_dir: the W&B run a resumed run continues


class WandbTracker:
    def __init__(self, project, out_dir, config, resumed, owns_folder):
        self.wandb = wandb = optional("wandb", "wandb_project")
        id_path = os.path.join(out_dir, WANDB_ID_NAME)
        run_id = resumed and os.path.isfile(id_path) and pathlib.Path(id_path).read_text().strip() or None
        self.run = wandb.init(project=project, name=os.path.basename(os.path.abspath(out_dir)), config=config,
                              dir=out_dir, id=run_id, resume="allow" if run_id else None)
        # where a resumed run finds the run's id: written once this run owns out_dir (None: it is there already)
        self.id_path = None if run_id else id_path
        self.owns_folder = owns_folder

    def log(self, record):
        self.run.log(record, step=record["step"])
        if self.id_path and self.owns_folder():
            save_atomically(self.id_path, lambda f: f.write(self.run.id + "\n"))
            self.id_path = None

    def image(self, name, path, step):
        self.run.log({name: self.wandb.Image(path)}, step=step)

    def close(self):
        self.run.finish()


class TensorBoardTracker:
    def __init__(self, out_dir, config, resumed_at=None):
        SummaryWriter = optional("torch.utils.tensorboard", "tensorboard=True", "tensorboard").SummaryWriter
        # A new events file beside the earlier run's; purge_step hides that run's events after the
        # checkpoint's step (TensorBoard's Python reader showed both otherwise; its Rust one keeps the newest).
        self.writer = SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"),
                                    purge_step=None if resumed_at is None else resumed_at + 1)
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def log(self, record):
        for key, value in record.items():
            if key not in ("step", "time"):
                self.writer.add_scalar(key, value, record["step"], walltime=record.get("time"))
        self.writer.flush()  # on disk now, not within 2 minutes: a killed run loses no event before its checkpoint

    def image(self, name, path, step):
        image = optional("matplotlib.image", "a plot in TensorBoard")
        self.writer.add_image(name, image.imread(path)[..., :3], step, dataformats="HWC")

    def close(self):
        self.writer.close()


class RunLog:
    """The log of one run: metrics.jsonl, the trackers, the plot and the card (see the module's doc)."""

    def __init__(self, out_dir, config, enabled=True, metrics_path=None, resumed_at=None, **facts):
        """metrics_path: where records go, out_dir/metrics.jsonl by default; a new run in a folder holding an
        earlier one logs to its own file until its first checkpoint (outdir.py), leaving the earlier run's
        plot, run.json and card alone. resumed_at: the step of the checkpoint a resumed run continues from."""
        self.enabled = enabled
        if not enabled:  # not rank 0: nothing to write, no tracker to open
            return
        self.out_dir, self.step, self.plotted = out_dir, 0, False
        self.metrics_path = metrics_path or os.path.join(out_dir, "metrics.jsonl")
        # how long the last drawing took (a guess before the first) and when it ended (or the run began)
        self.plot_seconds, self.plotted_at = 1.0, time.time()
        os.makedirs(out_dir, exist_ok=True)
        if resumed_at is not None and os.path.isfile(self.metrics_path):
            kept = [r for r in read_metrics(out_dir) if r.get("step", 0) <= resumed_at]
            save_atomically(self.metrics_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept))
        self.trackers = []
        if config.get("wandb_project"):
            self.trackers.append(WandbTracker(config["wandb_project"], out_dir, config, resumed_at is not None,
                                              self.owns_folder))
        if config.get("tensorboard"):
            self.trackers.append(TensorBoardTracker(out_dir, config, resumed_at))
        self.run_info = {**facts, "started": time.time(), "config": config}

    def owns_folder(self):
        """Whether out_dir's metrics.jsonl is this run's (see __init__)."""
        return os.path.abspath(self.metrics_path) == os.path.abspath(os.path.join(self.out_dir, "metrics.jsonl"))

    def log(self, record):
        """Append record (it has a 'step'; None values are left out) to metrics.jsonl and send it to the trackers."""
        if not self.enabled:
            return
        record = {**{k: v for k, v in record.items() if v is not None}, "time": record.get("time") or time.time()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)
        self.step, self.plotted = record["step"], False

    def plot(self, always=False):
        """Draw out_dir/plot.png at an evaluation and return its path; None without matplotlib, or when drawing
        would take over a twentieth of the time since the last (evaluations seconds apart draw at the end)."""
        if not self.enabled or not self.owns_folder() or not always and time.time() - self.plotted_at < 20 * self.plot_seconds:
            return None
        start = time.time()
        path = plot_runs([self.out_dir], os.path.join(self.out_dir, "plot.png"))
        self.plotted, self.plotted_at = path is not None, time.time()
        self.plot_seconds = self.plotted_at - start
        return path

    def finish(self):
        """At the end of the run: the last plot (also to the trackers), report.md, the trackers closed."""
        if not self.enabled or not self.owns_folder():  # a run that ended before its first checkpoint
            return
        plot_path = os.path.join(self.out_dir, "plot.png") if self.plotted else self.plot(always=True)
        self.run_info["seconds"] = time.time() - self.run_info["started"]
        save_atomically(os.path.join(self.out_dir, "run.json"), lambda f: json.dump(self.run_info, f, indent=1))
        for tracker in self.trackers:
            if plot_path:
                tracker.image("plot", plot_path, self.step)
            tracker.close()
        write_card(self.out_dir)


# -----------------------------------------------------------------------------
# the plot

_warned_no_matplotlib = False


def curve(records, y_key, x_key="step"):
    """The (xs, ys) of the records that have both keys; x 'time' counts seconds from the run's first record."""
    points = [(r[x_key], r[y_key]) for r in records if r.get(x_key) is not None and r.get(y_key) is not None]
    if x_key == "time" and points:
        start = min(r["time"] for r in records if "time" in r)
        points = [(x - start, y) for x, y in points]
    return [x for x, _ in points], [y for _, y in points]


def plot_runs(folders, out_path, labels=None):
    """One PNG of the runs' curves overlaid, a colour per run: train and val loss (RL: reward and held-out
    pass@1) against steps, tokens and wall time; the learning rate, tokens/s and MFU (translation: held-out
    BLEU; RL: groups without signal) against steps. out_path, or None without matplotlib."""
    global _warned_no_matplotlib
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no window, works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_no_matplotlib:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)")
            _warned_no_matplotlib = True
        return None
    labels = labels or [os.path.basename(os.path.normpath(f)) or f for f in folders]
    runs = [read_metrics(folder) for folder in folders]
    logged = {key for records in runs for r in records for key in r}
    # Each panel draws every one of its choices of (y keys, y label) that some run logged, so that runs of
    # different trainers compare on one plot: an RL run logs a reward and a held-out pass@1 where the other
    # trainers log losses. A panel whose choices no run logged says so under its first label.
    loss = [(("loss", "val_loss"), "loss"), (("reward", "val_pass_at_1"), "reward (train), held-out pass@1 (val)")]
    speed = [(("tokens_per_sec", "sampling_tokens_per_sec", "training_tokens_per_sec"), "tokens/s")]
    last = [(("mfu",), "MFU"), (("val_bleu",), "held-out BLEU"), (("no_signal",), "groups without signal")]
    fig, axes = plt.subplots(2, 3, figsize=PLOT_SIZE, dpi=PLOT_DPI)
    def chosen(choices):
        picked = [c for c in choices if logged & set(c[0])] or choices[:1]
        return tuple(key for keys, _ in picked for key in keys), ", ".join(name for _, name in picked)

    panels = [(ax, x_key, chosen(choices)) for ax, (x_key, choices)
              in zip(axes.flat, [("step", loss), ("tokens", loss), ("time", loss),
                                 ("step", [(("lr",), "learning rate")]), ("step", speed), ("step", last)])]
    for i, (records, label) in enumerate(zip(runs, labels)):
        color = f"C{i % 10}"
        for ax, x_key, (y_keys, _) in panels:
            for y_key in y_keys:
                xs, ys = curve(records, y_key, x_key)
                if not xs:
                    continue
                val = y_key.startswith("val_")
                pair = any(y_key in keys for keys, _ in loss)  # a training curve and its held-out points
                name = ("val" if val else "train") if pair else y_key.replace("_tokens_per_sec", "")
                ax.plot(xs, ys, color=color, linestyle="--" if val else "-", marker="o" if val else None,
                        markersize=3, label=f"{label} {name}" if len(y_keys) > 1 else label)
    for ax, x_key, (_, y_name) in panels:
        ax.set_xlabel("wall time (s)" if x_key == "time" else x_key)
        ax.set_ylabel(y_name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(", ".join(labels))
    fig.tight_layout()
    save_atomically(out_path, lambda f: fig.savefig(f, format="png", dpi=PLOT_DPI), mode="wb")
    plt.close(fig)
    return out_path


# -----------------------------------------------------------------------------
# report cards

def summarise(folder):
    """The numbers of a card, from the files in folder: a run's (run.json, metrics.jsonl, evaluation
    reports) or a prepared dataset's (report.json, meta.json)."""
    summary = {"folder": folder, **read_json(os.path.join(folder, "run.json"), {})}
    # prepare.py's report (or prepare_chat.py's, which names its stage)
    if (prepared := read_json(os.path.join(folder, "report.json"))) is not None:
        summary |= {"prepare": prepared, "stage": prepared.get("stage", "prepare"),
                    "seconds": prepared.get("seconds", {}).get("total"),
                    "tokens": sum(prepared.get("output", {}).get("tokens", {}).values()) or None}
        if (meta := read_json(os.path.join(folder, "meta.json"))) is not None:
            summary |= {"tokenizer": f"{meta['tokenizer']['kind']}, vocabulary {meta['vocab_size']}",
                        "unigram_loss": meta.get("unigram_loss")}
    records = read_metrics(folder)
    logs = [r for r in records if "lr" in r]  # log steps; evaluations have no lr
    evals = [r for r in records if "lr" not in r]
    if records:
        summary["steps"] = max(r["step"] for r in records)
        summary["tokens"] = max((r["tokens"] for r in records if "tokens" in r), default=None)
        # the final value of every metric: the last log step's, then the last evaluation's
        summary["final"] = {k: v for r in (logs[-1:] + evals[-1:]) for k, v in r.items() if k not in ("step", "time")}
        summary["best_val_loss"] = min((r["val_loss"] for r in evals if "val_loss" in r), default=None)
        times = [r["time"] for r in records if "time" in r]
        if summary.get("seconds") is None and times:  # a run still going, or one without run.json
            summary["seconds"] = max(times) - min(times)
        # the median, not the mean: the first log step includes compiling and warming up
        for key in ("tokens_per_sec", "mfu"):
            values = [r[key] for r in logs if r.get(key) is not None]
            summary[key] = statistics.median(values) if values else None
    summary["evaluations"] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        report = read_json(path)
        if isinstance(report, dict) and "results" in report and "checkpoint" in report:  # evaluate.py's
            summary["evaluations"].update(report["results"])
    summary["plot"] = "plot.png" if os.path.isfile(os.path.join(folder, "plot.png")) else None
    return summary


def headline(result):
    """The main number of one evaluate.py task result, as (name, value)."""
    keys = ("pass@1", "exact_match_flexible", "accuracy_norm", "exact_match", "accuracy", "bits_per_byte", "bleu")
    return next(((key, result[key]) for key in keys if key in result), (None, None))


def centred_scores(results):
    """The summary score of evaluate.py's results, as nanochat's CORE: {'score': the mean over the tasks with a
    chance level of (metric - chance) / (1 - chance), 0 for guessing and 1 for perfect, 'tasks': {task: that}}."""
    tasks = {task: (headline(r)[1] - r["chance"]) / (1 - r["chance"]) for task, r in results.items() if "chance" in r}
    return {"score": sum(tasks.values()) / len(tasks) if tasks else None, "tasks": tasks}


def number(value, key=None):
    """value as a card shows it (of the metric key: tokens/s whole, MFU in percent); '-' for None."""
    if value is None:
        return "-"
    if key in ("tokens_per_sec", "mfu"):
        return f"{value:,.0f}" if key == "tokens_per_sec" else f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) >= 1e5 or abs(value) < 1e-3 else f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_duration(seconds):
    """A time left or taken as a log line shows it: 1h02m, 12m05s."""
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def duration(seconds):
    return "-" if seconds is None else f"{seconds / 3600:.1f} h" if seconds >= 3600 else \
        f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def card(summary, image_prefix=""):
    """The Markdown card of one summary; image_prefix is the path from the page to the run's folder."""
    stage = summary.get("stage", "run")
    lines = [f"## {stage}: {summary['folder']}"]
    facts = [("stage", stage)]
    for key in ("data", "tokenizer", "parameters", "trained_parameters", "device", "processes", "dtype"):
        if summary.get(key) is not None:
            facts.append((key.replace("_", " "), number(summary[key])))
    if summary.get("started"):
        facts.append(("started", time.strftime("%Y-%m-%d %H:%M", time.localtime(summary["started"]))))
    facts.append(("time", duration(summary.get("seconds"))))
    for key, name in (("steps", "steps"), ("tokens", "tokens" if stage == "prepare" else "tokens trained on"), ("tokens_per_sec", "tokens/s (median)"),
                      ("mfu", "MFU (median)"), ("best_val_loss", "best val loss"), ("unigram_loss", "unigram loss")):
        if summary.get(key) is not None:
            facts.append((name, number(summary[key], key)))
    lines += ["", *table(("", ""), facts)]
    if summary.get("final"):
        lines += ["", "Final numbers (last log step and last evaluation):", "",
                  *table(("metric", "value"), [(k, number(v, k)) for k, v in summary["final"].items()])]
    if "prepare" in summary:
        report = summary["prepare"]
        rows = [(k, number(v)) for k, v in report.get("output", {}).items() if not isinstance(v, dict)]
        rows += [(f"{split} tokens", number(n)) for split, n in report.get("output", {}).get("tokens", {}).items()]
        rows += [(f"removed: {k}", number(v)) for k, v in (report.get("removed") or {}).items()]
        rows += [("MB/s", number(report.get("mb_per_s")))]
        lines += ["", *table(("data", "value"), rows)]
    if summary["evaluations"]:
        centred = centred_scores(summary["evaluations"])
        rows = []
        for task, result in summary["evaluations"].items():
            metric, value = headline(result)
            others = ", ".join(f"{k} {number(v)}" for k, v in result.items() if isinstance(v, float)
                               and k not in (metric, "chance", "seconds", "loss"))
            rows.append((task, metric or "-", number(value), number(result.get("chance")),
                         number(centred["tasks"].get(task)), others or "-"))
        lines += ["", "Benchmarks (evaluate.py):", ""]
        if centred["score"] is not None:
            lines += [f"Summary score {number(centred['score'])}: the mean over {len(centred['tasks'])} tasks of "
                      "(metric - chance) / (1 - chance), 0 for guessing and 1 for perfect.", ""]
        lines += table(("task", "metric", "value", "chance", "centred", "other metrics"), rows)
    if summary["plot"]:
        lines += ["", f"![curves of {summary['folder']}]({image_prefix}{summary['plot']})"]
    if summary.get("config"):
        lines += ["", "<details><summary>config</summary>", "", "```",
                  *[f"{k} = {v!r}" for k, v in summary["config"].items()], "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def write_card(folder):
    """Write folder/report.md, the card of the run or dataset in folder; returns its path."""
    path = os.path.join(folder, "report.md")
    save_atomically(path, lambda f: f.write("# Report card\n\n" + card(summarise(folder))))
    return path


def comparison(summaries):
    """One Markdown table comparing the summaries' headline numbers, with a column per benchmark."""
    tasks = sorted({task for s in summaries for task in s["evaluations"]})
    header = ["folder", "stage", "steps", "tokens", "time", "tokens/s", "MFU", "train loss", "val loss",
              *[f"{task} ({headline(next(s['evaluations'][task] for s in summaries if task in s['evaluations']))[0]})"
                for task in tasks]]
    rows = []
    for s in summaries:
        final = s.get("final", {})
        rows.append([s["folder"], s.get("stage", "run"), number(s.get("steps")), number(s.get("tokens")),
                     duration(s.get("seconds")), number(s.get("tokens_per_sec"), "tokens_per_sec"),
                     number(s.get("mfu"), "mfu"), number(final.get("loss")), number(final.get("val_loss")),
                     *[number(headline(s["evaluations"][t])[1]) if t in s["evaluations"] else "-" for t in tasks]])
    return "\n".join(table(header, rows)) + "\n"


def pipeline_page(folders, page_path):
    """One Markdown page for the folders of a pipeline (prepare, pretrain, SFT, DPO, ...): a table
    comparing them, then each one's card, the images linked relative to the page."""
    for folder in folders:
        if not os.path.isdir(folder):
            raise SystemExit(f"report error: {folder} is not a folder; name run folders (out/x) or dataset folders "
                             "(data/x)")
    summaries = [summarise(folder) for folder in folders]
    page_folder = os.path.dirname(os.path.abspath(page_path))
    cards = [card(s, os.path.relpath(os.path.abspath(s["folder"]), page_folder) + "/") for s in summaries]
    return "# Pipeline report\n\n" + comparison(summaries) + "\n" + "\n".join(cards)
