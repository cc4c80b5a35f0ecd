"""
Race nanoGPT's train.py against ours on Tiny Shakespeare characters at nanoGPT's README CPU settings, side by
side in one run: the wall time each takes to reach nanoGPT's final validation loss.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python bench/nanogpt_race.py --nanogpt=/tmp/nanoGPT --input=../shared/data/tinyshakespeare/input.txt
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/nanogpt_race.py --nanogpt=/tmp/nanoGPT \
        --input=../shared/data/tinyshakespeare/input.txt       # as on a CPU without bfloat16 matrix units

--input is a local copy of https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt.
nanoGPT runs `python train.py config/train_shakespeare_char.py` with SETTINGS below (its README's CPU command)
from a copy of the checkout in a temporary folder. Ours runs `python train.py config/train_shakespeare_char_cpu.py`
with the same SETTINGS: the default recipe (Muon, WSD, ReLU², QK-norm, soft-capped logits) with that config's
learning rates for this size. The data is the same for both: `python prepare.py config/data_shakespeare_char.py
--input=...` writes ours, and nanoGPT gets the same token ids as the train.bin, val.bin and meta.pkl that its
data/shakespeare_char/prepare.py writes (the same character ids; the vocabulary has one more, prepare.py's end of
text), so that both losses are on the same validation text. (nanoGPT's own prepare.py holds out the file's last
tenth; prepare.py's validation text is a shuffled piece of 100,000 characters. On which text a loss is measured
matters: a character 4-gram model scores 1.69 nats on one and 1.78 on the other.)

Each run is timed from its start (importing torch included) to each evaluation it prints ("step N: train loss X,
val loss Y", the same line in both). The target is nanoGPT's final val loss, and a run's time to it is that of
its first evaluation at or below it: nanoGPT evaluates every 250 steps (its config), ours every eval_interval of
its config, and the evaluations' time counts. Ours is stopped there (finish=True runs all its steps). The runs
take turns (nanoGPT, ours, nanoGPT, ours ... `repeats` times), so that a change in the machine's load hits both.
Writes out_dir/summary.json and each run's output, with the seconds at each line, to out_dir/<run>-<race>.log.
"""

import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import configure  # noqa: E402  (after the path: run from anywhere)
from runlog import save_atomically  # noqa: E402
from runtime import describe_machine, machine_facts  # noqa: E402

# nanoGPT's README: "python train.py config/train_shakespeare_char.py --device=cpu --compile=False ..."
SETTINGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
            "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
            "--lr_decay_iters=2000", "--dropout=0.0"]
EVAL_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
STEP_MS = re.compile(r"time ([\d.]+)ms|([\d,.]+) ms/step")  # in nanoGPT's log lines, in ours

# -----------------------------------------------------------------------------
nanogpt = ""  # a checkout of https://github.com/karpathy/nanoGPT (git clone it)
input = ""  # a local copy of Tiny Shakespeare's input.txt
ours_config = "config/train_shakespeare_char_cpu.py"
ours = ""  # more train.py overrides for ours, space-separated (e.g. "--muon_lr=0.02")
repeats = 1  # races, each nanoGPT then ours
finish = False  # let ours run all its steps (to see its final loss) instead of stopping it at the target
out_dir = "out/nanogpt_race"
configure(globals())
# -----------------------------------------------------------------------------

if not all(os.path.isfile(os.path.join(nanogpt, name)) for name in ("train.py", "configurator.py")):
    raise SystemExit(f"config error: --nanogpt='{nanogpt}' is not a nanoGPT checkout; "
                     "git clone https://github.com/karpathy/nanoGPT and pass its folder")
if not os.path.isfile(input):
    raise SystemExit(f"config error: --input='{input}' is not a file; download Tiny Shakespeare's input.txt "
                     "(the URL in config/data_shakespeare_char.py) and pass its path")
machine = machine_facts()
print(describe_machine(machine), flush=True)
os.makedirs(out_dir, exist_ok=True)


def run(name, command, cwd, stop_at=None):
    """Run command, writing its output with the seconds since its start at each line to out_dir/name.log,
    until it ends or, with stop_at, evaluates a val loss at or below it. Returns the seconds it ran, its
    evaluations as (seconds, step, val loss) and the milliseconds per step it logged."""
    evals, step_ms, started = [], [], time.perf_counter()
    with open(os.path.join(out_dir, f"{name}.log"), "w") as log, \
            subprocess.Popen(command, cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        log.write(f"$ cd {cwd} && {' '.join(command)}\n")
        for line in process.stdout:
            seconds = time.perf_counter() - started
            log.write(f"{seconds:8.2f} {line}")
            if match := STEP_MS.search(line):
                step_ms.append(float((match[1] or match[2]).replace(",", "")))
            if match := EVAL_LINE.match(line):
                evals.append((seconds, int(match[1]), float(match[3])))
                if stop_at is not None and evals[-1][2] <= stop_at:
                    process.kill()
                    return seconds, evals, step_ms
    if process.returncode != 0 or not evals:
        raise SystemExit(f"bench error: {name} failed (exit status {process.returncode}); see {log.name}")
    return time.perf_counter() - started, evals, step_ms


work = tempfile.mkdtemp(prefix="nanogpt_race_")
try:
    # the same token ids for both: prepare.py's bins (uint16, one file per split), which nanoGPT reads as its own
    data_root = os.path.join(work, "data")
    subprocess.run([sys.executable, "prepare.py", "config/data_shakespeare_char.py", f"--input={os.path.abspath(input)}",
                    f"--data_root={data_root}"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(data_root, "shakespeare_char", "meta.json")) as f:
        meta = json.load(f)
    nanogpt_copy = os.path.join(work, "nanoGPT")  # nanoGPT reads data/ and configurator.py from where it runs
    shutil.copytree(nanogpt, nanogpt_copy, ignore=shutil.ignore_patterns(".git", "data", "out*"))
    nanogpt_data = os.path.join(nanogpt_copy, "data", "shakespeare_char")
    os.makedirs(nanogpt_data)
    for split in ("train", "val"):
        (bin_file,) = meta["splits"][split]["files"]
        shutil.copy(os.path.join(data_root, "shakespeare_char", bin_file), os.path.join(nanogpt_data, f"{split}.bin"))
    itos = dict(enumerate(meta["tokenizer"]["chars"] + [meta["tokenizer"]["eot"]]))
    with open(os.path.join(nanogpt_data, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"], "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)

    commands = {
        "nanogpt": ([sys.executable, "train.py", "config/train_shakespeare_char.py", *SETTINGS,
                     f"--out_dir={os.path.join(work, 'out-nanogpt')}"], nanogpt_copy),
        "ours": ([sys.executable, "train.py", ours_config, *SETTINGS, f"--data_root={data_root}",
                  f"--out_dir={os.path.join(work, 'out-ours')}", *ours.split()], REPO),
    }
    races = []
    for race in range(repeats):
        runs = {}
        for name, (command, cwd) in commands.items():
            print(f"--- race {race + 1}/{repeats}, {name}: {' '.join(command)}", flush=True)
            stop_at = None if name == "nanogpt" or finish else runs["nanogpt"]["last_val_loss"]
            seconds, evals, step_ms = run(f"{name}-{race + 1}", command, cwd, stop_at)
            runs[name] = {"seconds": seconds, "evals": evals, "last_val_loss": evals[-1][2],
                          "step_ms_median": statistics.median(step_ms)}
            print(f"{name}: val loss {evals[-1][2]:.4f} at step {evals[-1][1]} after {seconds:.1f} s, "
                  f"{runs[name]['step_ms_median']:.0f} ms per step (median)", flush=True)
        target = runs["nanogpt"]["last_val_loss"]
        for r in runs.values():
            r["seconds_to_target"], r["step_at_target"] = next(((s, step) for s, step, loss in r["evals"]
                                                                if loss <= target), (None, None))
        races.append({"target_val_loss": target, **runs})
finally:
    shutil.rmtree(work, ignore_errors=True)

print(f"\n{describe_machine(machine)}")
print(f"{'race':<5} {'run':<8} {'ms/step':>8} {'target':>7} {'reached at':>20} {'speed-up':>8}")
speedups = []
for i, race in enumerate(races):
    for name in ("nanogpt", "ours"):
        r = race[name]
        reached = f"{r['seconds_to_target']:.1f} s, step {r['step_at_target']}" if r["step_at_target"] else "never"
        speedup = race["nanogpt"]["seconds_to_target"] / r["seconds_to_target"] if r["step_at_target"] else None
        if name == "ours" and speedup:
            speedups.append(speedup)
        print(f"{i + 1:<5} {name:<8} {r['step_ms_median']:>8.0f} {race['target_val_loss']:>7.4f} {reached:>20} "
              f"{f'{speedup:.2f}x' if speedup else '-':>8}")
if speedups:
    print(f"ours reached nanoGPT's final val loss {min(speedups):.2f}x (min) / {statistics.median(speedups):.2f}x "
          f"(median) sooner; load average now {os.getloadavg()[0]:.1f}")
summary = {"machine": machine, "settings": SETTINGS, "commands": {k: v[0] for k, v in commands.items()},
           "races": races, "speedups": speedups, "load_average_at_end": os.getloadavg()}
save_atomically(os.path.join(out_dir, "summary.json"), lambda f: json.dump(summary, f, indent=1))
print(f"wrote {os.path.join(out_dir, 'summary.json')}")
