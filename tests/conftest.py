"""Shared fixtures: a tiny byte-level dataset and a way to run the stage scripts."""

import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runlog import read_metrics  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, os.pardir, "shared")  # read-only public data, when present

# A model small enough that a training step takes milliseconds on a CPU.
TINY_MODEL = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
              "--batch_size=4", "--total_batch_tokens=256", "--eval_iters=2", "--log_interval=1",
              "--optimizer=adamw", "--zero_init_proj=False"]
# AdamW and no zero-initialised projections, so that runs in different layouts end at the same weights:
# a projection at zero gives the layers before it gradients of exactly zero in one layout and of
# rounding noise in another, which Adam's (and Muon's) normalised steps blow up to full-size updates.
# tests/test_recipe.py checks Muon across layouts.


# Model styles for tests (GPTConfig's defaults are train.py's: ReLU², QK-norm, a soft cap, output
# projections starting at zero, which would make a fresh model's blocks the identity). Llama's is what
# hf.py exports and transformers checks; GPT-2's is GPT-2 124M's.
LLAMA = dict(mlp="swiglu", qk_norm=False, logit_softcap=0.0, zero_init_proj=False)
GPT2 = dict(LLAMA, norm="layernorm", mlp="gelu", pos="learned", tie_embeddings=True, bias=True)
TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed=0, spread=0.0, **config):
    """A tiny GPT in eval mode, in Llama's style unless config (GPTConfig fields over TINY's) says
    otherwise, its weights drawn from seed. spread > 0: every matrix redrawn from N(0, spread^2) and
    every vector (norm gains, biases) moved by N(0, 0.01), so that attention is far from uniform and
    logits vary widely: greedy decoding has clear winners, options rarely tie, and a tensor mapped to
    the wrong place changes the output."""
    from model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **LLAMA, **config})).eval()
    return spread_weights(model, spread) if spread else model


def spread_weights(model, std):
    """The model with every matrix drawn anew from N(0, std) and every vector moved by N(0, 0.01)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std) if p.dim() >= 2 else p.add_(0.1 * torch.randn_like(p))
    return model


def weights(out_dir):
    """The weights of out_dir's newest checkpoint."""
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def assert_same_weights(a, b, atol=0.0):
    """Two state dicts hold the same tensors by name, to atol (0: bit for bit)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def run_script(script, *args, check=True, stdin=None, threads=None):
    """Run a stage script of the repository in a subprocess (stdin: text to pipe in; threads: torch's, else
    the environment's); return the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
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
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(out_dir) if r["step"] > step]


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


def files_under(folder):
    """{relative path: (size, mtime)} of every file under folder."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            info = os.stat(os.path.join(root, name))
            files[os.path.relpath(os.path.join(root, name), folder)] = (info.st_size, info.st_mtime_ns)
    return files


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """Each test leaves SIGINT and SIGTERM as it found them. A stage run in-process that stops ignores both
    (outdir.exit_quietly_on_interrupt), and a child process a later test starts would inherit an ignored
    SIGINT: Python then installs no KeyboardInterrupt, and the child never sees Ctrl-C."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        if handler is not None:  # None: set outside Python, nothing to put back
            signal.signal(s, handler)


@pytest.fixture(scope="session", autouse=True)
def shared_is_never_written():
    """The tests read ../shared but never write there. tiktoken, for one, copies every file it loads
    by path or URL into TIKTOKEN_CACHE_DIR, which the gpt2 tests point at ../shared/data/tiktoken_cache."""
    before = files_under(SHARED)
    yield
    after = files_under(SHARED)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"the tests wrote into {SHARED}: {', '.join(changed[:5])}"


@pytest.fixture
def read_only_folder(tmp_path):
    """An empty folder no one may write in: chmod 555, or for root (whom permissions do not stop) a
    read-only tmpfs mounted there; skips where neither works."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("root ignores permissions, and mounting a read-only tmpfs failed")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


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


# The session's trained checkpoints come out the same whatever runs beside them (test_export runs on one
# thread) and whichever test asks first (under pytest-xdist, any): a float sum's rounding depends on the
# number of threads, and test_dpo's greedy answers on those roundings.
FIXTURE_THREADS = 2


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data_root, tmp_path_factory):
    """out_dir of a tiny model trained for a few steps on the tiny dataset, in Llama's architecture
    (SwiGLU, no QK-norm or soft-cap) so that the export tests can export it."""
    out_dir = str(tmp_path_factory.mktemp("run"))
    run_script("train.py", *TINY_MODEL, f"--data_root={tiny_data_root}", "--dataset=tiny", f"--out_dir={out_dir}",
               "--max_iters=4", "--eval_interval=4", "--mlp=swiglu", "--qk_norm=False", "--logit_softcap=0",
               threads=FIXTURE_THREADS)
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
    """out_dir of sft.py run from tiny_checkpoint on TOY_INSTRUCTIONS long enough to learn them by heart,
    tracking TOY_BENCHMARK_RECORDS (its trained questions as a generation benchmark) at every evaluation."""
    from chat import split_held_out
    root = tmp_path_factory.mktemp("sft")
    (root / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))
    trained = [r for r in split_held_out(TOY_INSTRUCTIONS, TOY_VAL_FRACTION)[0] if not r.get("input")]
    (root / "toy_questions.jsonl").write_text("".join(json.dumps({"prompt": r["instruction"], "answer": r["output"]}) + "\n"
                                                      for r in trained))
    run_script("sft.py", f"--init_from={tiny_checkpoint}/ckpt.pt", f"--data={root / 'toy.json'}", f"--out_dir={root / 'out'}",
               "--device=cpu", f"--val_fraction={TOY_VAL_FRACTION}", "--batch_size=4", "--total_batch_size=4",
               "--max_iters=80", "--learning_rate=1e-2", "--min_lr=1e-3", "--eval_interval=40", "--log_interval=20",
               f"--benchmark={root / 'toy_questions.jsonl'}", threads=FIXTURE_THREADS)
    return str(root / "out")
