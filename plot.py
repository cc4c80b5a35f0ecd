"""
Draw a run's curves from its metrics.jsonl: train and val loss against steps, tokens and
wall time, the learning rate, tokens/s and MFU; several runs overlaid, one colour each.

    python plot.py out/quickstart                          # writes out/quickstart/plot.png
    python plot.py out/quickstart out/quickstart_lr1e-3    # both runs in one figure, in the first one's folder
    python plot.py out/a out/b --out=compare.png --labels=baseline,wider

Reads only the run folders' metrics.jsonl (a run still training draws fine); needs matplotlib. The
trainers draw the same plot.png at each evaluation and at the end of a run.
"""

import argparse
import os

from runlog import plot_runs

parser = argparse.ArgumentParser(description="Plot the curves of one or more runs from their metrics.jsonl.")
parser.add_argument("runs", nargs="+", help="run folders (out_dir of train.py, sft.py or dpo.py)")
parser.add_argument("--out", default="", help="the PNG to write; default: plot.png in the first run's folder")
parser.add_argument("--labels", default="", help="comma-separated legend names, one per run; default: folder names")
args = parser.parse_args()

for run in args.runs:
    if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
        raise SystemExit(f"plot error: {run}/metrics.jsonl does not exist; name the out_dir of a training run")
labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
if labels and len(labels) != len(args.runs):
    raise SystemExit(f"plot error: {len(labels)} labels for {len(args.runs)} runs; give one label per run")
out = args.out or os.path.join(args.runs[0], "plot.png")
if not plot_runs(args.runs, out, labels):
    raise SystemExit(1)
print(f"wrote {out}")
