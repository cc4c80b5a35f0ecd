"""Shared fixtures: a tiny byte-level dataset and a way to run the stage scripts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# A model small enough that a training step takes milliseconds on a CPU.
TINY_MODEL = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
              "--batch_size=4", "--total_batch_tokens=256", "--eval_iters=2", "--log_interval=1",
              "--optimizer=adamw", "--zero_init_proj=False"]
# AdamW and no zero-initialised projections, so that runs in different layouts end at the same weights:
# a projection at zero gives the layers before it gradients of exactly zero in one layout and of
# rounding noise in another, which Adam's (and Muon's) normalised steps blow up to full-size updates.
# tests/test_recipe.py checks Muon across layouts.


def run_script(script, *args, check=True, stdin=None):
    """Run a stage script of the repository in a subprocess (stdin: text to pipe in); return the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600, input=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def run_torchrun(script, *args, nproc=2):
    """Run a stage script in nproc CPU processes under torchrun; return the CompletedProcess (it must succeed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(REPO, script), *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"torchrun {script} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def stop_and_resume(script, args, root, at_step, nproc=1):
    """Run script with args (which must include --resume=auto) to its end in root/whole, then again in
    root/resumed holding only the whole run's step-at_step checkpoint: a run stopped there and resumed,
    in nproc processes. Returns the two out_dirs and the resumed run's output."""
    whole, resumed = root / "whole", root / "resumed"
    run_script(script, *args, f"--out_dir={whole}")
    resumed.mkdir()
    os.link(whole / f"ckpt-{at_step:07d}.pt", resumed / f"ckpt-{at_step:07d}.pt")
    run = run_script if nproc == 1 else lambda *a: run_torchrun(*a, nproc=nproc)
    return whole, resumed, run(script, *args, f"--out_dir={resumed}").stdout


def logged_after(out_dir, step):
    """The records of out_dir/metrics.jsonl after step, without their wall-clock times."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in f]
    return [r for r in records if r["step"] > step]


def write_byte_dataset(data_dir, documents, val_documents):
    """A dataset in prepare.py's format, byte-tokenized, without running prepare.py."""
    os.makedirs(data_dir, exist_ok=True)
    splits = {}
    for split, docs in (("train", documents), ("val", val_documents)):
        ids = [t for doc in docs for t in list(doc.encode("utf-8")) + [256]]
        np.array(ids, dtype=np.uint16).tofile(os.path.join(data_dir, f"{split}.bin"))
        splits[split] = {"files": [f"{split}.bin"], "tokens": len(ids), "documents": len(docs)}
    meta = {"dataset": os.path.basename(data_dir), "tokenizer": {"kind": "byte", "eot": "<|endoftext|>"},
            "vocab_size": 257, "eot_id": 256, "dtype": "uint16", "splits": splits}
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    """data_root holding dataset 'tiny': this repository's own model.py and train.py as text."""
    root = tmp_path_factory.mktemp("data")
    docs = []
    for name in ("model.py", "train.py", "optim.py", "configurator.py"):
        with open(os.path.join(REPO, name)) as f:
            docs.append(f.read())
    write_byte_dataset(os.path.join(root, "tiny"), docs[:3], docs[3:])
    return str(root)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data_root, tmp_path_factory):
    """out_dir of a tiny model trained for a few steps on the tiny dataset, in Llama's architecture
    (SwiGLU, no QK-norm or soft-cap) so that the export tests can export it."""
    out_dir = str(tmp_path_factory.mktemp("run"))
    run_script("train.py", *TINY_MODEL, f"--data_root={tiny_data_root}", "--dataset=tiny", f"--out_dir={out_dir}",
               "--max_iters=4", "--eval_interval=4", "--mlp=swiglu", "--qk_norm=False", "--logit_softcap=0")
    return out_dir


# Instruction records short enough for the tiny model's 32-token context in the chat format.
TOY_INSTRUCTIONS = [
    {"instruction": "Say hi.", "output": "Hi there!"},
    {"instruction": "What is 2+2?", "output": "Four."},
    {"instruction": "Name a color.", "input": "warm", "output": "Red."},
    {"instruction": "Capital of France?", "output": "Paris."},
    {"instruction": "Opposite of up?", "output": "Down."},
    {"instruction": "A pet?", "output": "A cat."},
]
TOY_VAL_FRACTION = 0.2  # two of the six are held out


@pytest.fixture(scope="session")
def tiny_sft_checkpoint(tiny_checkpoint, tmp_path_factory):
    """out_dir of sft.py run from tiny_checkpoint on TOY_INSTRUCTIONS long enough to learn them by heart."""
    root = tmp_path_factory.mktemp("sft")
    (root / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))
    run_script("sft.py", f"--init_from={tiny_checkpoint}/ckpt.pt", f"--data={root / 'toy.json'}", f"--out_dir={root / 'out'}",
               "--device=cpu", f"--val_fraction={TOY_VAL_FRACTION}", "--batch_size=4", "--total_batch_size=4",
               "--max_iters=80", "--learning_rate=1e-2", "--min_lr=1e-3", "--eval_interval=40", "--log_interval=20")
    return str(root / "out")
