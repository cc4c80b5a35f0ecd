"""
The encoder-decoder against a decoder-only GPT on the same parallel data, tokenizer and training
time, at about the same parameter count: held-out BLEU against training time, and test BLEU greedy
and with beam search, in one run.

    python bench/translation_race.py --multi30k_dir=../shared/data/translation/multi30k   # Multi30K de->en, 30 min each, both at once
    python bench/translation_race.py --multi30k_dir=... --out_dir=/tmp/race --plot=/tmp/race.png
    python bench/translation_race.py --budget_seconds=300 --eval_seconds=60 --multi30k_dir=...   # a quick look

Each contestant is translate.py on base_config with max_seconds=budget_seconds and an evaluation
(held-out BLEU, greedy) every eval_seconds of training; evaluations and start-up are not training
time. By default both run at once, each on a core of its own with one thread (together=True), so
that whatever else loads the machine falls on both alike; together=False runs them one after the
other, each with every core. The encoder-decoder is as base_config has it; the decoder-only GPT learns
`source <end-of-text> target` with the loss on the target only (translate.py's
architecture='decoder-only'), with the same width, tokenizer (the same BPE, learned on the same
pairs with the same settings), data, batches and optimizer, and as many blocks as bring its
parameter count closest to the encoder-decoder's (a decoder block with cross-attention holds 4/3
of a plain one's weights). Both finish with translate.py's test scores, greedy and with beam_size
beams. Writes out_dir/<architecture>/ (each run's files), out_dir/summary.json and the plot of BLEU
against training time (plot, or out_dir/translation_race.png).

Timings swing with the machine's load: compare the two only within one run, and prefer together=True.
"""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import configure, defaults_only  # noqa: E402  (after the path: run from anywhere)
from model import EncoderDecoder, EncoderDecoderConfig, GPT, GPTConfig  # noqa: E402
from runlog import save_atomically  # noqa: E402

# -----------------------------------------------------------------------------
base_config = "config/multi30k_de_en.py"
budget_seconds = 1800.0  # training time per architecture
eval_seconds = 300.0  # held-out BLEU every this many seconds of training
multi30k_dir = ""  # passed on to translate.py: a folder holding Multi30K's files; '' downloads them
common = ""  # more translate.py overrides for both runs, space-separated, e.g. "--seed=2"
out_dir = "out/translation_race"
plot = ""  # where to write the plot (PNG); '' : out_dir/translation_race.png
together = True  # both at once, one core and one thread each; False: one after the other with every core
configure(globals())
# -----------------------------------------------------------------------------


def start(name, overrides, core=None):
    """Start translate.py for one contestant (pinned to core, with one thread, where core is given)."""
    run_dir = os.path.join(out_dir, name)
    args = [base_config, *overrides, *common.split(), f"--out_dir={run_dir}", f"--max_seconds={budget_seconds}",
            f"--eval_seconds={eval_seconds}", "--eval_interval=1000000000", "--keep_checkpoints=1"]
    if multi30k_dir:
        args.append(f"--multi30k_dir={multi30k_dir}")
    print(f"--- {name}{'' if core is None else f' (core {core})'}: python translate.py {' '.join(args)}", flush=True)
    env, pin = dict(os.environ), None
    if core is not None:
        env["OMP_NUM_THREADS"] = "1"
        pin = lambda: os.sched_setaffinity(0, {core})  # noqa: E731
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "translate.py"), *args], cwd=REPO, text=True, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=pin)
    return name, run_dir, args, process, time.time()


def finish(name, run_dir, args, process, started):
    """Wait for a contestant's run and summarise it from its metrics.jsonl and run.json."""
    output, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"bench error: the {name} run failed:\n{output[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    evals = [r for r in records if r.get("val_bleu") is not None]
    final = {k: v for r in records for k, v in r.items() if k.startswith("test_")}
    summary = {"parameters": run["parameters"], "steps": max(r["step"] for r in records),
               "seconds": [r["train_seconds"] for r in evals], "val_bleu": [r["val_bleu"] for r in evals],
               **final, "wall_seconds": time.time() - started, "args": args, "config": run["config"]}
    print(f"{name}: {summary['parameters'] / 1e6:.2f}M parameters, {summary['steps']} steps, "
          + ", ".join(f"{k} {v:.2f}" for k, v in final.items()), flush=True)
    return summary


def matching_decoder_layers(config):
    """The decoder-only block count whose GPT has the parameter count nearest the encoder-decoder's."""
    shape = {k: v for k, v in config.items() if k in {f for f in EncoderDecoderConfig.__dataclass_fields__}}
    shape["vocab_size"] = 256 + 1  # the embedding is the same in both: any vocabulary compares them
    target = EncoderDecoder(EncoderDecoderConfig(**shape)).num_params()
    gpt_shape = {k: v for k, v in shape.items() if k != "n_encoder_layer"}
    counts = {n: GPT(GPTConfig(**{**gpt_shape, "n_layer": n, "block_size": 2 * shape["block_size"]})).num_params()
              for n in range(1, 4 * (shape["n_layer"] + shape["n_encoder_layer"]))}
    return min(counts, key=lambda n: abs(counts[n] - target))


os.makedirs(out_dir, exist_ok=True)
with defaults_only() as translate_defaults:
    import translate  # noqa: F401  (runs translate.py only up to its defaults)
layers = matching_decoder_layers(configure(dict(translate_defaults), [base_config, *common.split()]))
contestants = {"encoder-decoder": [], "decoder-only": ["--architecture=decoder-only", f"--n_layer={layers}"]}
cores = sorted(os.sched_getaffinity(0)) if together and hasattr(os, "sched_getaffinity") else []
if together and len(cores) < 2:
    raise SystemExit("bench error: together=True needs two cores; run with --together=False")
if together:
    started = [start(name, overrides, core) for (name, overrides), core in zip(contestants.items(), cores)]
    try:
        runs = {run[0]: finish(*run) for run in started}
    finally:  # one failed: stop the other rather than leave it training alone
        for run in started:
            if run[3].poll() is None:
                run[3].kill()
else:
    runs = {name: finish(*start(name, overrides)) for name, overrides in contestants.items()}

beams = sorted({int(k.split("beam")[1]) for run in runs.values() for k in run if k.startswith("test_bleu_beam")})
print(f"\n{'architecture':<16} {'params':>8} {'steps':>6} " + " ".join(f"{f'BLEU beam {b}':>12}" for b in beams))
for name, run in runs.items():
    print(f"{name:<16} {run['parameters'] / 1e6:>7.2f}M {run['steps']:>6} "
          + " ".join(f"{run.get(f'test_bleu_beam{b}', float('nan')):>12.2f}" for b in beams))
summary = {"budget_seconds": budget_seconds, "eval_seconds": eval_seconds, "load_average": os.getloadavg(),
           "runs": runs}
save_atomically(os.path.join(out_dir, "summary.json"), lambda f: json.dump(summary, f, indent=1))

import matplotlib  # noqa: E402  (only needed once the runs are done)

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
for name, run in runs.items():
    line, = ax.plot(run["seconds"], run["val_bleu"], marker=".", label=f"{name} ({run['parameters'] / 1e6:.1f}M)")
    for b in beams:  # the test scores at the end of the run
        if f"test_bleu_beam{b}" in run:
            ax.plot([run["seconds"][-1]], [run[f"test_bleu_beam{b}"]], marker="*" if b > 1 else "s", color=line.get_color(),
                    linestyle="none", label=f"{name} test, {'greedy' if b == 1 else f'beam {b}'}")
ax.set_xlabel("training time (s)")
ax.set_ylabel("sacreBLEU")
ax.set_title(f"{os.path.basename(base_config)}: {budget_seconds:.0f} s each")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plot_path = plot or os.path.join(out_dir, "translation_race.png")
save_atomically(plot_path, lambda f: fig.savefig(f, format="png"), mode="wb")
print(f"wrote {os.path.join(out_dir, 'summary.json')} and {plot_path}")
