"""
Train several recipes for the same wall-clock budget, one after the other on the same prepared bins,
and compare their validation loss over training time.

    python prepare.py && python bench/recipe.py                                   # classic vs today's default
    python bench/recipe.py --recipes=classic,muon,wsd,relu2,default --budget_seconds=60
    python bench/recipe.py --base_config=config/train_gpt2.py --common="--device=cuda --compile=True"

Each recipe is train.py on base_config with a few overrides (RECIPES below), run with a time budget
(train.py's max_seconds: the schedule runs on the clock and ends with it) and an evaluation every
eval_seconds of training. Evaluation, start-up and the first step's compilation are not training time;
the compile time is reported. Writes out_dir/<recipe>/metrics.jsonl (train.py's log), out_dir/summary.json
(each recipe's curve, its loss at the budget, and when it first reached the first recipe's final loss,
interpolated between evaluations) and out_dir/recipe.png (loss versus time, all recipes).

Timings swing with the machine's load: compare recipes only within one run.
"""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import configure  # noqa: E402  (after the path: run from anywhere)

# The first recipe is the reference whose final loss the others race to. Each entry is train.py
# overrides on top of base_config, whose own settings are the new default recipe ('default'); the
# rows from 'classic' to 'relu2' add one change at a time (the README's ablation table).
CLASSIC = ["--norm=layernorm", "--mlp=gelu", "--pos=learned", "--tie_embeddings=True", "--bias=True",
           "--qk_norm=False", "--zero_init_proj=False", "--logit_softcap=0", "--optimizer=adamw",
           "--lr_schedule=cosine", "--learning_rate=2e-3", "--min_lr=2e-4", "--batch_size=32",
           "--total_batch_tokens=4096", "--max_iters=600", "--warmup_iters=30"]
MODERN_BLOCK = ["--norm=rmsnorm", "--pos=rope", "--tie_embeddings=False", "--bias=False"]
RECIPES = {
    "classic": CLASSIC,  # 2019: GPT-2's block, AdamW, warmup + cosine (the old quickstart's learning rate and batch)
    "sinusoidal": [*CLASSIC, "--pos=sinusoidal"],  # the original Transformer's fixed positions instead of learned
    "previous": [*CLASSIC, *MODERN_BLOCK, "--mlp=swiglu"],  # the quickstart before this recipe: Llama's block, AdamW
    "muon": [*CLASSIC, "--optimizer=muon"],
    "wsd": [*CLASSIC, "--optimizer=muon", "--lr_schedule=wsd"],
    "relu2": [*CLASSIC, "--optimizer=muon", "--lr_schedule=wsd", *MODERN_BLOCK, "--mlp=relu2"],
    "default": [],  # relu2 + QK-norm, zero-initialised projections, soft-capped logits, tuned rates and batch
}

# -----------------------------------------------------------------------------
recipes = "classic,default"  # comma-separated names from RECIPES, each optionally with +--key=value overrides
budget_seconds = 150.0  # training time per recipe
eval_seconds = 15.0  # evaluate every this many seconds of training
base_config = "config/quickstart.py"
common = "--eval_iters=8 --log_interval=5"  # more train.py overrides for every recipe, space-separated, e.g. "--seed=2"
out_dir = "out/recipe_bench"
configure(globals())
# -----------------------------------------------------------------------------

names = recipes.split(",")  # e.g. 'default+--muon_lr=0.04': the default recipe with one key changed
unknown = [n.split("+")[0] for n in names if n.split("+")[0] not in RECIPES]
if unknown:
    raise SystemExit(f"config error: unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
os.makedirs(out_dir, exist_ok=True)
curves = {}
for name in names:
    base, *overrides = name.split("+")
    run_dir = os.path.join(out_dir, "".join(c if c.isalnum() or c in "._=" else "_" for c in name))
    args = [base_config, *RECIPES[base], *overrides, *common.split(), f"--out_dir={run_dir}", f"--max_seconds={budget_seconds}",
            f"--eval_seconds={eval_seconds}", "--eval_interval=1000000000", "--keep_checkpoints=1"]
    print(f"--- {name}: python train.py {' '.join(args)}", flush=True)
    started = time.time()
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"bench error: recipe {name} failed:\n{result.stdout[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "tokens_per_sec" in r]
    curves[name] = {
        "seconds": [r["train_seconds"] for r in evals], "val_loss": [r["val_loss"] for r in evals],
        "steps": evals[-1]["step"], "compile_seconds": sum(r.get("compile_seconds", 0.0) for r in records),
        "tokens_per_sec": sorted(r["tokens_per_sec"] for r in steps)[len(steps) // 2] if steps else None,
        "wall_seconds": time.time() - started, "args": args,
    }
    print(f"{name}: val loss {evals[-1]['val_loss']:.4f} after {evals[-1]['train_seconds']:.1f} s of training, "
          f"{evals[-1]['step']} steps", flush=True)


def first_time_below(seconds, losses, target):
    """When the loss curve first reaches target, interpolated linearly between evaluations; None if never."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return seconds[0]
            t0, t1, l0, l1 = seconds[i - 1], seconds[i], losses[i - 1], loss
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


reference = names[0]
target = curves[reference]["val_loss"][-1]
target_seconds = curves[reference]["seconds"][-1]
print(f"\ntarget: {reference}'s final val loss {target:.4f} at {target_seconds:.1f} s of training")
width = max(12, *map(len, curves))
print(f"{'recipe':<{width}} {'final val':>9} {'steps':>6} {'tok/s':>7} {'to target':>10} {'speed-up':>8}")
for name, curve in curves.items():
    reached = first_time_below(curve["seconds"], curve["val_loss"], target)
    curve["seconds_to_target"] = reached
    speedup = f"{target_seconds / reached:.2f}x" if reached else "-"
    print(f"{name:<{width}} {curve['val_loss'][-1]:>9.4f} {curve['steps']:>6} {curve['tokens_per_sec'] or 0:>7,.0f} "
          f"{f'{reached:.1f} s' if reached else 'never':>10} {speedup:>8}")
summary = {"target_recipe": reference, "target_val_loss": target, "budget_seconds": budget_seconds,
           "eval_seconds": eval_seconds, "load_average": os.getloadavg(), "recipes": curves}
with open(os.path.join(out_dir, "summary.json.tmp"), "w") as f:
    json.dump(summary, f, indent=1)
os.replace(os.path.join(out_dir, "summary.json.tmp"), os.path.join(out_dir, "summary.json"))

import matplotlib  # noqa: E402  (only needed once the runs are done)

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
for name, curve in curves.items():
    ax.plot(curve["seconds"], curve["val_loss"], marker=".", label=name)
ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"{reference}'s final loss")
ax.set_xlabel("training time (s)")
ax.set_ylabel("validation loss")
ax.set_ylim(min(min(c["val_loss"]) for c in curves.values()) - 0.1, target + 1.5)  # the race, not the first drop
ax.set_title(f"{os.path.basename(base_config)}, {budget_seconds:.0f} s per recipe")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
plot_path = os.path.join(out_dir, "recipe.png")
fig.savefig(plot_path + ".tmp.png")
os.replace(plot_path + ".tmp.png", plot_path)
print(f"wrote {os.path.join(out_dir, 'summary.json')} and {plot_path}")
