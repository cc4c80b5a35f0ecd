"""Nothing lost, nothing cryptic: every bad setting, config file, dataset and checkpoint given to a
stage stops the script with one line naming the problem, no traceback, and an earlier run in the
same out_dir unchanged byte for byte. Then the out_dir lock, the removal of a killed save's
temporaries, Ctrl-C and a full disk, each on its own.

The table's rows (ROWS: train.py, sft.py, dpo.py) run each script as __main__ in a child forked
from a server process that has imported torch and the repository's modules once (tests/forked.py):
a real separate process that starts in milliseconds rather than the two seconds of a fresh
interpreter. A second table (NEW_STAGE_ROWS) does the same for the later stages: round 3's
(translate.py, sample.py --translate_file, evaluate.py's generative and translation tasks,
export.py, serve.py, prepare_chat.py), 47 rows, about 15 s at load 18 beyond one 2-step
translate.py run; and round 4's, 45 rows: rl.py's (task files, counts, checkpoints, out_dirs) and a
sweep of the others (seeds, broken datasets given to prepare_chat.py, a translation checkpoint given
to a post-trainer, two tasks of one name), 4.5 s at load 5 beyond one 2-step rl.py run. EXTREMES
holds valid settings at their extremes that once crashed or hung (a temperature of 1e-300,
eval_seconds of 1e-20): each must run to its end (7 s). The lock, interrupt, run.sh and torchrun
tests start fresh interpreters. 242 tests; the file took 112 s on 2 busy cores (load 12) before
round 4 added its 55, about 12 s at load 5.
"""

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import outdir
from checkpoint import load_checkpoint
from configurator import configure
from data import TokenBins, load_meta
from conftest import REPO, TINY_MODEL, TOY_INSTRUCTIONS, write_byte_dataset
from forked import error_line, run_forked
from test_chat_data import TRAIN_MODULE, VAL_MODULE
from test_rl import TOY_PROMPTS


def fingerprint(folder):
    """Every file under folder, by relative path, with its sha256."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


def write_bad_datasets(root):
    """One broken dataset per way a prepared dataset can be broken, beside a good one ('tiny')."""
    good = root / "tiny"
    meta = json.loads((good / "meta.json").read_text())

    def variant(name, meta_text=None, **files):
        folder = root / name
        shutil.copytree(good, folder)
        if meta_text is not None:
            (folder / "meta.json").write_bytes(meta_text if isinstance(meta_text, bytes) else meta_text.encode())
        for file, data in files.items():
            if data is None:
                (folder / f"{file}.bin").unlink()
            else:
                (folder / f"{file}.bin").write_bytes(data)

    def without(key):
        return json.dumps({k: v for k, v in meta.items() if k != key})

    variant("not_json", "{'dtype': uint16")
    variant("not_utf8", b"\xff\xfe{}")
    variant("a_list", "[1, 2]")
    variant("no_splits", without("splits"))
    variant("no_vocab", without("vocab_size"))
    variant("no_dtype", without("dtype"))
    variant("bad_dtype", json.dumps({**meta, "dtype": "float7"}))
    variant("float_dtype", json.dumps({**meta, "dtype": "float32"}))
    variant("string_vocab", json.dumps({**meta, "vocab_size": "257"}))
    variant("bad_splits", json.dumps({**meta, "splits": {"train": {"files": "train.bin"}}}))
    variant("no_val_split", json.dumps({**meta, "splits": {"train": meta["splits"]["train"]}}))
    variant("odd_bytes", train=(good / "train.bin").read_bytes() + b"\x01")
    variant("empty_val", val=b"")
    variant("missing_train", train=None)
    variant("big_id", val=(good / "val.bin").read_bytes()[:-2] + (300).to_bytes(2, "little"))
    variant("short_val", val=(good / "val.bin").read_bytes()[:40])


def write_bad_checkpoints(root, good_path):
    """Checkpoints with a nonsense model config, and files that are no checkpoint, each as
    root/<name>/ckpt.pt (an out_dir to resume) and root/<name>.pt."""
    good = torch.load(good_path, weights_only=True)
    variants = {
        "n_head_0": {**good, "model_config": {**good["model_config"], "n_head": 0}},
        "n_layer_text": {**good, "model_config": {**good["model_config"], "n_layer": "2"}},
        "config_a_list": {**good, "model_config": [2, 2, 32]},
        "dropout_2": {**good, "model_config": {**good["model_config"], "dropout": 2.0}},
        "no_model": {k: v for k, v in good.items() if k != "model"},
    }
    for name, checkpoint in variants.items():
        torch.save(checkpoint, root / f"{name}.pt")
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all" * 10)
    (root / "empty.pt").write_bytes(b"")
    for name in [*variants, "garbage", "empty"]:
        (root / name).mkdir()
        shutil.copy(root / f"{name}.pt", root / name / "ckpt.pt")


@pytest.fixture(scope="session")
def world(tiny_data_root, tiny_checkpoint, tmp_path_factory):
    """The files the rows run on: data_root (good and broken datasets), a finished run to keep
    intact, broken checkpoints, bad config files and instruction data."""
    root = tmp_path_factory.mktemp("errors")
    data = root / "data"
    shutil.copytree(tiny_data_root, data)
    write_bad_datasets(data)
    run = root / "finished"
    shutil.copytree(tiny_checkpoint, run)
    bad = root / "bad"
    bad.mkdir()
    write_bad_checkpoints(bad, run / "ckpt.pt")
    configs = root / "configs"
    configs.mkdir()
    (configs / "syntax.py").write_text("max_iters = 10\nlearning_rate = (3e-4\n")
    (configs / "raises.py").write_text("max_iters = 10\nlearning_rate = 1 / 0\n")
    (configs / "latin1.py").write_bytes(b"max_iters = 10\n# caf\xe9\n")
    (configs / "nul.py").write_bytes(b"max_iters = 10\x00\n")
    (configs / "unknown.py").write_text("max_iter = 10\n")
    (configs / "wrong_type.py").write_text("max_iters = 'ten'\n")
    (configs / "range.py").write_text("dropout = 2.0\n")
    (configs / "import_error.py").write_text("import no_such_module\n")
    (root / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))
    (root / "empty").mkdir()
    return root


TRAIN = "train.py"
SFT = "sft.py"
DPO = "dpo.py"

# (script, arguments, what the error line must contain). {root} is the world fixture's folder; every
# row runs with --out_dir={root}/finished unless it names another.
ROWS = [
    # train.py: values out of range, unknown or of the wrong type
    (TRAIN, "--dropout=1.5", "dropout=1.5 is invalid"),
    (TRAIN, "--dropout=-0.1", "dropout=-0.1 is invalid"),
    (TRAIN, "--total_batch_tokens=0", "total_batch_tokens=0"),
    (TRAIN, "--total_batch_tokens=-256", "total_batch_tokens=-256"),
    (TRAIN, "--total_batch_tokens=100", "not a multiple of batch_size"),
    (TRAIN, "--max_iters=0", "max_iters=0"),
    (TRAIN, "--max_iters=-5", "max_iters=-5"),
    (TRAIN, "--learning_rate=1e999", "learning_rate=inf"),
    (TRAIN, "--learning_rate=1e39", "learning_rate=1e+39"),
    (TRAIN, "--learning_rate=-1e999", "learning_rate=-inf"),
    (TRAIN, "--learning_rate=0", "learning_rate=0.0"),
    (TRAIN, "--learning_rate=nan", "learning_rate='nan'"),
    (TRAIN, "--device=tpu", "device='tpu'"),
    (TRAIN, "--device=cuda:x", "device='cuda:x'"),
    (TRAIN, "--log_interval=0", "log_interval=0"),
    (TRAIN, "--eval_iters=0", "eval_iters=0"),
    (TRAIN, "--eval_interval=0", "eval_interval=0"),
    (TRAIN, "--n_head=0", "n_head=0"),
    (TRAIN, "--n_layer=0", "n_layer=0"),
    (TRAIN, "--n_layer=-1", "n_layer=-1"),
    (TRAIN, "--n_embd=0", "n_embd=0"),
    (TRAIN, "--n_kv_head=-1", "n_kv_head=-1"),
    (TRAIN, "--block_size=0", "block_size=0"),
    (TRAIN, "--block_size=-8", "block_size=-8"),
    (TRAIN, "--batch_size=0", "batch_size=0"),
    (TRAIN, "--warmup_iters=-1", "warmup_iters=-1"),
    (TRAIN, "--keep_checkpoints=0", "keep_checkpoints=0"),
    (TRAIN, "--weight_decay=-0.1", "weight_decay=-0.1"),
    (TRAIN, "--beta2=1.0", "beta2=1.0"),
    (TRAIN, "--grad_clip=-1", "grad_clip=-1.0"),
    (TRAIN, "--min_lr=1e999", "min_lr=inf"),
    (TRAIN, "--norm_eps=0", "norm_eps=0.0"),
    (TRAIN, "--rope_theta=-1", "rope_theta=-1.0"),
    (TRAIN, "--n_head=3", "must be divisible by n_head"),
    (TRAIN, "--norm=batchnorm", "norm='batchnorm'"),
    (TRAIN, "--parallelism=zero", "parallelism='zero'"),
    (TRAIN, "--dtype=float8", "dtype='float8'"),
    (TRAIN, "--init_from=somewhere", "init_from='somewhere'"),
    (TRAIN, "--pipeline_stages=2", "pipeline_stages=2 does not divide"),
    (TRAIN, "--pipeline_stages=0", "pipeline_stages=0"),
    (TRAIN, "--cpu_offload=True", "cpu_offload=True"),
    (TRAIN, "--n_layers=3", "unknown key 'n_layers'"),
    (TRAIN, "--max_iters=ten", "max_iters='ten'"),
    (TRAIN, "--max_iters=1.5", "max_iters=1.5"),
    (TRAIN, "--compile=1", "compile=1"),
    (TRAIN, "--max_iters", "has no value"),
    (TRAIN, "--block_size=16384 --total_batch_tokens=65536", "fewer than block_size+1"),
    (TRAIN, "--init_from=hf:{root}/empty", "import error: no"),
    (TRAIN, "--benchmark={root}/no_such.jsonl", "no benchmark file"),
    (TRAIN, "--init_from=resume --out_dir={root}/empty", "no checkpoint at"),
    (TRAIN, "--out_dir={root}/toy.json", "cannot write in"),
    (SFT, "--out_dir={root}/toy.json/sub", "cannot write in"),
    # train.py: a run that fails after training started keeps the earlier run too
    # (the default soft-capped logits, QK-norm and zero-initialised projections keep even this finite)
    (TRAIN, "--learning_rate=1e8 --logit_softcap=0 --qk_norm=False --zero_init_proj=False --mlp=swiglu "
            "--warmup_iters=0 --grad_clip=0.0 --max_iters=3 --eval_interval=2",
     "train error: the loss is not finite"),
    # config files
    (TRAIN, "{root}/configs/syntax.py", "syntax.py line 2 is not valid Python"),
    (TRAIN, "{root}/configs/raises.py", "raises.py line 2 raised ZeroDivisionError"),
    (TRAIN, "{root}/configs/import_error.py", "import_error.py line 1 raised ModuleNotFoundError"),
    (TRAIN, "{root}/configs/latin1.py", "latin1.py line 2 is not UTF-8"),
    (TRAIN, "{root}/configs/nul.py", "nul.py"),
    (TRAIN, "{root}/configs/unknown.py", "unknown key 'max_iter'"),
    (TRAIN, "{root}/configs/wrong_type.py", "max_iters='ten'"),
    (TRAIN, "{root}/configs/range.py", "dropout=2.0 is invalid"),
    (TRAIN, "{root}/configs/missing.py", "not found"),
    (SFT, "{root}/configs/raises.py", "raises.py line 2 raised ZeroDivisionError"),
    (DPO, "{root}/configs/syntax.py", "syntax.py line 2 is not valid Python"),
    # data
    (TRAIN, "--dataset=missing", "meta.json; prepare the data first"),
    (TRAIN, "--dataset=not_json", "is not valid JSON"),
    (TRAIN, "--dataset=not_utf8", "is not valid JSON"),
    (TRAIN, "--dataset=a_list", "lacks tokenizer, vocab_size, dtype, splits"),
    (TRAIN, "--dataset=no_splits", "lacks splits"),
    (TRAIN, "--dataset=no_vocab", "lacks vocab_size"),
    (TRAIN, "--dataset=no_dtype", "lacks dtype"),
    (TRAIN, "--dataset=bad_dtype", "dtype='float7'"),
    (TRAIN, "--dataset=float_dtype", "dtype='float32'"),
    (TRAIN, "--dataset=string_vocab", "vocab_size='257'"),
    (TRAIN, "--dataset=bad_splits", "splits are not"),
    (TRAIN, "--dataset=no_val_split", "has no 'val' split"),
    (TRAIN, "--dataset=odd_bytes", "not a whole number of uint16 tokens"),
    (TRAIN, "--dataset=empty_val", "val.bin has 0 bytes"),
    (TRAIN, "--dataset=missing_train", "train.bin is listed in meta.json but missing"),
    (TRAIN, "--dataset=big_id", "holds token id 300, but meta.json's vocab_size is 257"),
    (TRAIN, "--dataset=short_val", "fewer than block_size+1"),
    # checkpoints
    (TRAIN, "--init_from=resume --out_dir={root}/bad/n_head_0", "n_head=0 must be at least 1"),
    (TRAIN, "--init_from=resume --out_dir={root}/bad/n_layer_text", "n_layer='2' is not of type int"),
    (TRAIN, "--init_from=resume --out_dir={root}/bad/config_a_list", "invalid model_config"),
    (TRAIN, "--init_from=resume --out_dir={root}/bad/dropout_2", "invalid model_config"),
    (TRAIN, "--init_from=resume --out_dir={root}/bad/no_model", "lacks model"),
    (TRAIN, "--init_from=resume --out_dir={root}/bad/garbage", "is corrupt or not a checkpoint"),
    (TRAIN, "--init_from=resume --out_dir={root}/bad/empty", "is corrupt or not a checkpoint"),
    (SFT, "--init_from={root}/bad/n_head_0.pt", "n_head=0 must be at least 1"),
    (SFT, "--init_from={root}/bad/n_layer_text.pt", "is not of type int"),
    (SFT, "--init_from={root}/bad/garbage.pt", "is corrupt or not a checkpoint"),
    (SFT, "--init_from={root}/no_such.pt", "no checkpoint at"),
    (DPO, "--init_from={root}/bad/config_a_list.pt", "invalid model_config"),
    (DPO, "--init_from={root}/bad/no_model.pt", "lacks model"),
    (DPO, "--init_from={root}/finished/ckpt.pt", "is not a chat model"),
    # sft.py
    (SFT, "--learning_rate=1e999", "learning_rate=inf"),
    (SFT, "--learning_rate=0", "learning_rate=0.0"),
    (SFT, "--lora_dropout=1.0", "lora_dropout=1.0"),
    (SFT, "--batch_size=0", "batch_size=0"),
    (SFT, "--total_batch_size=0", "total_batch_size=0"),
    (SFT, "--batch_size=4 --total_batch_size=6", "not a multiple of batch_size"),
    (SFT, "--eval_interval=0", "eval_interval=0"),
    (SFT, "--log_interval=0", "log_interval=0"),
    (SFT, "--warmup_iters=-1", "warmup_iters=-1"),
    (SFT, "--max_iters=-1", "max_iters=-1"),
    (SFT, "--epochs=0", "epochs=0"),
    (SFT, "--val_fraction=1.0", "val_fraction=1.0"),
    (SFT, "--lora_rank=-1", "lora_rank=-1"),
    (SFT, "--device=tpu", "device='tpu'"),
    (SFT, "--block_size=-1", "block_size=-1"),
    (SFT, "--block_size=100000", "longer than the model's context"),
    (SFT, "--keep_checkpoints=0", "keep_checkpoints=0"),
    (SFT, "--resume=maybe", "resume='maybe'"),
    (SFT, "--resume=yes", "is of kind 'pretrain'"),
    (SFT, "--parallelism=x", "parallelism='x'"),
    (SFT, "--data={root}/no_such.json", "no file"),
    (SFT, "--data={root}/configs/latin1.py", "is not UTF-8 text"),
    (SFT, "--learning_rate=1e8 --warmup_iters=0 --grad_clip=0.0 --max_iters=3 --eval_interval=2 --log_interval=100",
     "sft error: the model is not finite at step 2"),
    # dpo.py
    (DPO, "--beta=0", "beta=0.0"),
    (DPO, "--label_smoothing=0.5", "label_smoothing=0.5"),
    (DPO, "--learning_rate=-1", "learning_rate=-1.0"),
    (DPO, "--batch_size=0", "batch_size=0"),
    (DPO, "--total_batch_size=3", "not a multiple of batch_size"),
    (DPO, "--eval_interval=0", "eval_interval=0"),
    (DPO, "--log_interval=0", "log_interval=0"),
    (DPO, "--epochs=0", "epochs=0"),
    (DPO, "--max_iters=-1", "max_iters=-1"),
    (DPO, "--val_fraction=-0.5", "val_fraction=-0.5"),
    (DPO, "--device=tpu", "device='tpu'"),
    (DPO, "--lora_alpha=0", "lora_alpha=0.0"),
    (DPO, "--resume=yes", "is of kind 'pretrain'"),
]


def base_args(script, root):
    if script == TRAIN:
        return [*TINY_MODEL, f"--data_root={root}/data", "--dataset=tiny", "--max_iters=8", "--eval_interval=4"]
    return ["--device=cpu", f"--init_from={root}/finished/ckpt.pt", f"--data={root}/toy.json", "--batch_size=2",
            "--total_batch_size=4", "--max_iters=2", "--val_fraction=0.2"]


@pytest.mark.parametrize("script, args, expected", ROWS, ids=[f"{s[:-3]} {a}" for s, a, _ in ROWS])
def test_bad_input_stops_with_one_line_and_keeps_the_earlier_run(world, script, args, expected):
    args = [a.replace("{root}", str(world)) for a in args.split()]
    out_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--out_dir=")), str(world / "finished"))
    before = fingerprint(out_dir)
    result = run_forked(script, *base_args(script, world), f"--out_dir={out_dir}", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert fingerprint(out_dir) == before


def test_zero_is_valid_only_where_it_is_the_default_meaning_derive_it():
    assert configure({"max_iters": 0}, ["--max_iters=0"])["max_iters"] == 0  # sft.py: from epochs
    with pytest.raises(SystemExit, match="max_iters=0 is invalid; max_iters must be an integer >= 1"):
        configure({"max_iters": 100}, ["--max_iters=0"])
    with pytest.raises(SystemExit, match="max_iters=-1 is invalid"):
        configure({"max_iters": 0}, ["--max_iters=-1"])


def test_token_ids_are_checked_in_every_chunk_of_a_bin(world, monkeypatch):
    meta = load_meta(str(world / "data" / "big_id"))
    TokenBins(str(world / "data" / "big_id"), meta, "train", 32)  # the train bin is good
    monkeypatch.setattr("data._CHECK_CHUNK", 7)  # the bad id, last in val.bin, falls in a later chunk
    with pytest.raises(SystemExit, match="val.bin holds token id 300"):
        TokenBins(str(world / "data" / "big_id"), meta, "val", 32)


# -----------------------------------------------------------------------------
# the out_dir lock


def hold_lock(out_dir):
    """Fork a process that takes out_dir's lock and holds it until killed; returns its pid once it holds it."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            outdir._take_lock(str(out_dir))
            os.write(ready_w, b"1")
            time.sleep(600)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid


def test_a_second_run_in_a_locked_out_dir_is_refused_and_its_temporaries_stay(world, tmp_path):
    out_dir = tmp_path / "run"
    shutil.copytree(world / "finished", out_dir)
    (out_dir / "ckpt-0000008.pt.abc123.tmp").write_bytes(b"a live run's save in progress")
    holder = hold_lock(out_dir)
    try:
        before = fingerprint(out_dir)
        result = run_forked(TRAIN, *base_args(TRAIN, world), f"--out_dir={out_dir}")
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.strip() == (f"run error: {out_dir} is in use by process {holder} on "
                                         f"{os.uname().nodename} (it holds {out_dir}/run.lock); "
                                         "wait for that run to end, or use another --out_dir")
        assert fingerprint(out_dir) == before
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def test_a_killed_runs_lock_and_temporaries_are_taken_over_at_the_next_start(world, tmp_path):
    out_dir = tmp_path / "run"
    shutil.copytree(world / "finished", out_dir)
    holder = hold_lock(out_dir)
    os.kill(holder, signal.SIGKILL)  # as kill -9 would: no chance to release anything
    os.waitpid(holder, 0)
    stale = [out_dir / "ckpt-0000008.pt.abc123.tmp", out_dir / "ckpt.pt.link.tmp", out_dir / "metrics.jsonl.new.tmp"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    checkpoints = {name: digest for name, digest in fingerprint(out_dir).items() if name.endswith(".pt")}
    # resuming the finished run at its last step: it evaluates and ends, saving nothing
    result = run_forked(TRAIN, *base_args(TRAIN, world), "--max_iters=4", "--init_from=auto", f"--out_dir={out_dir}")
    assert result.returncode == 0, result.stderr
    assert (f"was left by process {holder} on {os.uname().nodename}, which ended without releasing it"
            in result.stdout)
    assert f"removed 3 temporary files (0.0 MB) that interrupted saves left in {out_dir}" in result.stdout
    assert not any(path.exists() for path in stale) and not (out_dir / "run.lock").exists()
    assert {n: d for n, d in fingerprint(out_dir).items() if n.endswith(".pt")} == checkpoints


def test_under_torchrun_every_process_stops_when_the_out_dir_is_locked(world, tmp_path):
    out_dir = tmp_path / "run"
    holder = hold_lock(out_dir)
    try:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        # --tee=3 prefixes each worker's lines with [default<rank>]:, setting them apart from torchrun's own report
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--tee=3", os.path.join(REPO, TRAIN), *base_args(TRAIN, world), f"--out_dir={out_dir}"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    assert result.returncode != 0
    worker_errors = [line for line in result.stderr.splitlines() if line.startswith("[default")]
    assert worker_errors == [f"[default0]:run error: {out_dir} is in use by process {holder} on {os.uname().nodename} "
                             f"(it holds {out_dir}/run.lock); wait for that run to end, or use another --out_dir"]


# -----------------------------------------------------------------------------
# a new run, a non-finite model, Ctrl-C, a full disk


def test_a_new_run_replaces_the_earlier_one_only_with_its_first_checkpoint(world, tmp_path):
    out_dir = tmp_path / "run"
    shutil.copytree(world / "finished", out_dir)  # one checkpoint, of step 4
    # a run whose first checkpoint, of step 5, would be kept beside the earlier run's if nothing removed it
    result = run_forked(TRAIN, *base_args(TRAIN, world), "--max_iters=5", "--eval_interval=5", "--seed=7",
                        f"--out_dir={out_dir}")
    assert result.returncode == 0, result.stderr
    assert "removed 1 checkpoints of an earlier run" in result.stdout
    assert sorted(os.listdir(out_dir)) == ["ckpt-0000005.pt", "ckpt.pt", "metrics.jsonl", "plot.png", "report.md",
                                           "run.json"]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 5]  # this run's evaluations and log lines only


def test_sft_never_saves_a_non_finite_model(world, tmp_path):
    out_dir = tmp_path / "sft"
    # the held-out loss is NaN at step 2 while every weight is still finite
    result = run_forked(SFT, *base_args(SFT, world), "--learning_rate=1e8", "--warmup_iters=0", "--grad_clip=0.0",
                        "--max_iters=3", "--eval_interval=2", "--log_interval=100", f"--out_dir={out_dir}")
    assert result.returncode != 0, result.stdout + result.stderr
    assert result.stderr.strip().startswith("sft error: the model is not finite at step 2"), result.stderr
    assert not out_dir.exists() or not [n for n in os.listdir(out_dir) if n.endswith(".pt")]


def test_ctrl_c_stops_training_with_one_line_naming_the_last_checkpoint(world, tmp_path):
    out_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, os.path.join(REPO, TRAIN), *base_args(TRAIN, world),
                                "--max_iters=100000", "--eval_interval=2", f"--out_dir={out_dir}"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:  # wait for the first checkpoint to be under way
            if line.startswith("saving "):
                break
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in stderr
    newest = sorted(p for p in os.listdir(out_dir) if p.startswith("ckpt-"))[-1]
    assert stderr.strip() == (f"interrupted: the newest checkpoint is {out_dir}/{newest}; "
                              "continue with --init_from=auto")
    assert load_checkpoint(str(out_dir / newest))["step"] >= 2
    assert not (out_dir / "run.lock").exists() and not [p for p in os.listdir(out_dir) if p.endswith(".tmp")]


@pytest.fixture
def tiny_disk(tmp_path):
    """A folder on a 1 MB tmpfs: room for one tiny checkpoint but not two (needs root to mount)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a full disk is simulated with a tmpfs, which only root can mount")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_stops_with_one_line_and_keeps_the_earlier_checkpoints(world, tiny_disk):
    result = run_forked(TRAIN, *base_args(TRAIN, world), "--max_iters=4", "--eval_interval=1", f"--out_dir={tiny_disk}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"disk error: no space left for {tiny_disk}/ckpt-0000002.pt "
                                            "(it needs about ")
    assert "a run needs room for keep_checkpoints+1 checkpoints" in result.stderr
    assert sorted(os.listdir(tiny_disk)) == ["ckpt-0000001.pt", "ckpt.pt", "metrics.jsonl"]
    assert load_checkpoint(str(tiny_disk / "ckpt.pt"))["step"] == 1


# -----------------------------------------------------------------------------
# the stages of round 3: translation, generative evaluation, export, serving


@pytest.fixture(scope="module")
def new_world(tmp_path_factory, tiny_checkpoint, tiny_sft_checkpoint):
    """Parallel files good and broken, a two-step translate.py run ('translation'), generation and
    HumanEval-style task files good and broken, and a pickle that runs a command when unpickled."""
    root = tmp_path_factory.mktemp("new_stages")

    def lines(name, rows):
        (root / name).write_text("".join(row + "\n" for row in rows))

    lines("train.de", [f"eins zwei {i}." for i in range(40)])
    lines("train.en", [f"one two {i}." for i in range(40)])
    lines("blank.de", ["", " ", "\t"])
    lines("blank.en", ["x", "y", "z"])
    (root / "empty.jsonl").write_text("")
    lines("no_target.jsonl", [json.dumps({"source": "eins"})])
    lines("a_list.jsonl", [json.dumps(["eins", "one"])])
    (root / "binary.de").write_bytes(bytes(range(256)) * 4)
    (root / "folder").mkdir()
    (root / "a_file").write_text("not a folder\n")
    lines("gen.jsonl", [json.dumps({"prompt": "Say hi.", "answer": "Hi"})] * 2)
    lines("gen_no_answer.jsonl", [json.dumps({"prompt": "Say hi."})])
    lines("code_no_entry.jsonl", [json.dumps({"task_id": "t/0", "prompt": "def f():\n", "test": "assert 1"})])
    for task in ("gsm8k/test.jsonl", "humaneval/HumanEval.jsonl.gz"):  # at their names, but not the pinned files
        (root / "evals" / task).parent.mkdir(parents=True, exist_ok=True)
        (root / "evals" / task).write_bytes(b"{not json\n")
    (root / "runs_code.pt").write_bytes(pickle.dumps(RunsCode()))
    torch.save({"model": RunsCode()}, root / "runs_code.zip.pt")
    result = run_forked("translate.py", *TRANSLATE, f"--data={root}/train.de,{root}/train.en",
                        f"--out_dir={root}/translation")
    assert result.returncode == 0, result.stderr
    write_byte_dataset(str(root / "data" / "code"), [TRAIN_MODULE], [VAL_MODULE])  # a Python corpus
    shutil.copytree(root / "data" / "code", root / "data" / "tiny")  # the good dataset the broken ones are made of
    write_bad_datasets(root / "data")
    os.symlink(tiny_checkpoint, root / "pretrained")
    os.symlink(tiny_sft_checkpoint, root / "chat")
    # rl.py's task files, and a finished two-step run ('rl') that the failing runs must leave as it is
    lines("prompts.jsonl", [json.dumps(p) for p in TOY_PROMPTS])
    lines("truncated.jsonl", [json.dumps(TOY_PROMPTS[0]), json.dumps(TOY_PROMPTS[1])[:20]])
    lines("code.jsonl", [json.dumps({"task_id": "t/0", "prompt": "def f():\n", "test": "assert f() == 1",
                                     "entry_point": "f"})])
    (root / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))
    lines("gsm.jsonl", [json.dumps({"question": "What is 2+2?", "answer": "2 and 2 make 4.\n#### 4"})])
    (root / "sub").mkdir()
    shutil.copy(root / "gen.jsonl", root / "sub" / "gen.jsonl")
    result = run_forked("rl.py", *RL, f"--init_from={root}/chat/ckpt.pt", f"--data={root}/prompts.jsonl",
                        f"--held_out={root}/prompts.jsonl", f"--out_dir={root}/rl")
    assert result.returncode == 0, result.stderr
    return root


class RunsCode:
    """Unpickled, it would create a file: a checkpoint from a stranger."""
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


PWNED = f"/tmp/errors_test_pwned_{os.getpid()}"
TRANSLATE = ["--device=cpu", "--vocab_size=300", "--block_size=16", "--n_layer=1", "--n_encoder_layer=1", "--n_head=2",
             "--n_embd=32", "--batch_size=8", "--total_batch_size=8", "--max_iters=2", "--eval_interval=2",
             "--log_interval=1", "--bleu_sentences=4", "--beam_size=2", "--val_fraction=0.1"]
RL = ["--device=cpu", "--batch_size=1", "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=4", "--max_iters=2",
      "--eval_interval=2", "--temperature=1.5"]
NEW_STAGE_ROWS = [
    ("translate.py", "--data={root}/blank.de,{root}/blank.en", "blank.en has no pair with text on both sides"),
    ("translate.py", "--data={root}/empty.jsonl", "empty.jsonl has no pair with text on both sides"),
    ("translate.py", "--data={root}/no_target.jsonl",
     "no_target.jsonl line 1 is not a record with string fields 'source' and 'target'"),
    ("translate.py", "--data={root}/a_list.jsonl", "a_list.jsonl line 1 is not a record"),
    ("translate.py", "--data={root}/binary.de,{root}/train.en", "binary.de is not UTF-8 text (byte 128 is not)"),
    ("translate.py", "--data={root}/folder,{root}/train.en", "no file {root}/folder"),
    ("translate.py", "--val_data={root}/blank.de,{root}/blank.en", "blank.en has no pair with text on both sides"),
    ("translate.py", "--test_data={root}/train.de,{root}/missing.en", "no file {root}/missing.en"),
    ("translate.py", "--vocab_size=100", "vocab_size=100 leaves no room for merges"),
    ("translate.py", "--bleu_sentences=-1", "bleu_sentences=-1 is invalid"),
    ("translate.py", "--total_batch_size=-8", "total_batch_size=-8 is invalid"),
    ("translate.py", "--label_smoothing=1.5", "label_smoothing=1.5 is invalid"),
    ("translate.py", "--val_fraction=1", "val_fraction=1.0 is invalid"),
    ("translate.py", "--out_dir={root}/a_file", "cannot write in {root}/a_file"),
    ("translate.py", "--resume=yes --out_dir={root}/folder", "{root}/folder has no checkpoint that loads"),
    ("translate.py", "--resume=yes --out_dir={root}/pretrained", "is of kind 'pretrain', not one of translate.py's"),
    ("translate.py", "--data=multi30k --multi30k_dir={root}/folder", "no file {root}/folder/train.de.gz"),
    ("sample.py", "--out_dir={root}/translation --translate_file={root}/folder", "no file {root}/folder"),
    ("sample.py", "--out_dir={root}/translation --translate_file={root}/binary.de", "binary.de is not UTF-8 text"),
    ("sample.py", "--out_dir={root}/translation --translate=eins --beam_size=0", "(and beam_size >= 1)"),
    ("sample.py", "--out_dir={root}/chat --translate=eins", "is a decoder-only model, which does not translate"),
    ("sample.py", "--ckpt={root}/runs_code.pt --translate=eins",
     "runs_code.pt is corrupt or not a checkpoint (not a file torch.save wrote)"),
    ("sample.py", "--ckpt={root}/runs_code.zip.pt --translate=eins",
     "runs_code.zip.pt is corrupt or not a checkpoint (Weights only load failed)"),
    ("evaluate.py", "--out_dir={root}/translation --parallel_data={root}/blank.de,{root}/blank.en",
     "blank.en has no pair with text on both sides"),
    ("evaluate.py", "--out_dir={root}/translation --parallel_data={root}/no_target.jsonl",
     "is not a record with string fields"),
    ("evaluate.py", "--out_dir={root}/translation --beam_size=0", "beam_size=0 is invalid; beam_size must be >= 1"),
    ("evaluate.py", "--out_dir={root}/chat --tasks=gsm8k --data_dir={root}/evals", "gsm8k/test.jsonl has sha256 "),
    ("evaluate.py", "--out_dir={root}/chat --tasks=humaneval --data_dir={root}/evals",
     "HumanEval.jsonl.gz has sha256 "),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen_no_answer.jsonl",
     "gen_no_answer.jsonl line 1: unknown record format (keys prompt)"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/code_no_entry.jsonl",
     "code_no_entry.jsonl line 1: unknown record format (keys prompt, task_id, test)"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen.jsonl --samples=0", "samples=0 is invalid"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen.jsonl --temperature=-1", "temperature=-1.0 is invalid"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen.jsonl --temperature=nan",
     "temperature='nan' on the command line is a str"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen.jsonl --limit=-1", "limit=-1 is invalid"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen.jsonl --max_new_tokens=-1",
     "max_new_tokens=-1 is invalid"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen.jsonl --code_timeout=0", "code_timeout=0.0 is invalid"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen.jsonl --report={root}/folder",
     "report={root}/folder is a folder; give a file name, such as {root}/folder/eval.json"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen.jsonl --report={root}/a_file/eval.json",
     "evaluate error: cannot write {root}/a_file/eval.json"),
    ("evaluate.py", "--ckpt={root}/runs_code.zip.pt", "runs_code.zip.pt is corrupt or not a checkpoint"),
    ("export.py", "--out_dir={root}/translation --format=gguf",
     "is a translation model (encoder-decoder), which neither format holds"),
    ("export.py", "--out_dir={root}/translation", "is a translation model (encoder-decoder)"),
    ("export.py", "--ckpt={root}/runs_code.zip.pt --format=gguf", "runs_code.zip.pt is corrupt or not a checkpoint"),
    ("prepare_chat.py", "--out_dir={root}/a_file", "cannot write in {root}/a_file (File exists)"),
    ("prepare_chat.py", "--out_dir={root}/a_file/chat", "cannot write in {root}/a_file/chat (Not a directory)"),
    ("prepare_chat.py", "--max_answer_chars=0", "max_answer_chars=0 must be >= 1"),
    ("serve.py", "--out_dir={root}/translation", "is a translation model, which the API does not serve"),
    ("serve.py", "--ckpt={root}/runs_code.zip.pt", "runs_code.zip.pt is corrupt or not a checkpoint"),
    # rl.py (round 4); its out_dir is {root}/rl, a finished run, unless a row names another
    ("rl.py", "--data={root}/missing.jsonl", "rl error: no benchmark file {root}/missing.jsonl; check --data"),
    ("rl.py", "--held_out={root}/missing.jsonl", "rl error: no benchmark file {root}/missing.jsonl; check --held_out"),
    ("rl.py", "--data={root}/empty.jsonl", "rl error: {root}/empty.jsonl holds no records"),
    ("rl.py", "--data={root}/binary.de", "rl error: benchmark file {root}/binary.de is not UTF-8 text"),
    ("rl.py", "--data={root}/truncated.jsonl", "data error: {root}/truncated.jsonl line 2: not valid JSON"),
    ("rl.py", "--data={root}/code.jsonl", "data error: {root}/code.jsonl holds code records; rl.py needs GSM8K"),
    ("rl.py", "--held_out={root}/gen_no_answer.jsonl", "gen_no_answer.jsonl line 1: unknown record format"),
    ("rl.py", "--init_from={root}/folder", "checkpoint error: no checkpoint at {root}/folder"),
    ("rl.py", "--init_from={root}/translation/ckpt.pt", "{root}/translation/ckpt.pt is a translation model"),
    ("rl.py", "--init_from={root}/prompts.jsonl", "{root}/prompts.jsonl is corrupt or not a checkpoint"),
    ("rl.py", "--group_size=1", "config error: group_size=1 is invalid; group_size must be an integer >= 2"),
    ("rl.py", "--group_size=0", "config error: group_size=0 is invalid"),
    ("rl.py", "--prompts_per_step=0", "config error: prompts_per_step=0 is invalid"),
    ("rl.py", "--batch_size=0", "config error: batch_size=0 is invalid"),
    ("rl.py", "--max_iters=-1", "config error: max_iters=-1 is invalid"),
    ("rl.py", "--max_new_tokens=0", "config error: max_new_tokens=0 is invalid"),
    ("rl.py", "--max_new_tokens=-1", "config error: max_new_tokens=-1 is invalid"),
    ("rl.py", "--max_new_tokens=100", "data error: no prompt of {root}/prompts.jsonl fits the model's context of 32"),
    ("rl.py", "--temperature=0", "config error: temperature=0.0 is invalid; temperature must be a finite number > 0"),
    ("rl.py", "--temperature=-1", "config error: temperature=-1.0 is invalid"),
    ("rl.py", "--held_out_limit=-1", "config error: held_out_limit=-1 is invalid"),
    ("rl.py", "--kl_coef=-0.1", "config error: kl_coef=-0.1 is invalid"),
    ("rl.py", "--clip_eps=0", "config error: clip_eps=0.0 is invalid"),
    ("rl.py", "--epochs=0", "config error: epochs=0 is invalid"),
    ("rl.py", "--seed=4294967296", "config error: seed=4294967296 is invalid"),
    ("rl.py", "--parallelism=fsdp", "config error: rl.py runs with parallelism='ddp'"),
    ("rl.py", "--out_dir={root}/a_file", "cannot write in {root}/a_file"),
    ("rl.py", "--resume=yes --out_dir={root}/folder", "{root}/folder has no checkpoint that loads"),
    ("rl.py", "--resume=yes --out_dir={root}/translation", "is of kind 'translate', not one of rl.py's"),
    ("rl.py", "--resume=yes --lora_rank=2", "was trained with lora_rank=0, this run has lora_rank=2"),
    # the sweep of round 4 through the other new stages
    ("sft.py", "--init_from={root}/translation/ckpt.pt", "is a translation model (encoder-decoder), which post-training"),
    ("dpo.py", "--init_from={root}/translation/ckpt.pt", "is a translation model (encoder-decoder), which post-training"),
    ("sample.py", "--out_dir={root}/chat --seed=18446744073709551616", "config error: seed=18446744073709551616 is invalid"),
    ("translate.py", "--seed=-1", "config error: seed=-1 is invalid"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen.jsonl,{root}/sub/gen.jsonl",
     "config error: --tasks names two tasks 'gen' (the second is {root}/sub/gen.jsonl)"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gen.jsonl,{root}/gen.jsonl", "--tasks names two tasks 'gen'"),
    ("prepare_chat.py", "--dataset=not_json", "data error: {root}/data/not_json/meta.json is not valid JSON"),
    ("prepare_chat.py", "--dataset=not_utf8", "data error: {root}/data/not_utf8/meta.json is not valid JSON"),
    ("prepare_chat.py", "--dataset=no_splits", "data error: {root}/data/no_splits/meta.json lacks splits"),
    ("prepare_chat.py", "--dataset=bad_dtype", "has dtype='float7', not an integer type"),
    ("prepare_chat.py", "--dataset=missing_train", "train.bin is listed in meta.json but missing"),
    ("prepare_chat.py", "--dataset=odd_bytes", "train.bin has"),
    ("prepare_chat.py", "--dataset=empty_val", "val.bin has 0 bytes, no tokens"),
    ("prepare_chat.py", "--dataset=big_id", "val.bin holds token id 300, but meta.json's vocab_size is 257"),
    ("prepare_chat.py", "--seed=-1", "config error: seed=-1 is invalid"),
]


@pytest.mark.parametrize("script, args, expected", NEW_STAGE_ROWS, ids=[f"{s[:-3]} {a}" for s, a, _ in NEW_STAGE_ROWS])
def test_bad_input_to_a_new_stage_stops_with_one_line_and_changes_no_file(new_world, script, args, expected):
    args = [a.replace("{root}", str(new_world)) for a in args.split()]
    base = {"translate.py": [*TRANSLATE, f"--data={new_world}/train.de,{new_world}/train.en",
                             f"--out_dir={new_world}/new_run"],
            "sample.py": ["--device=cpu"], "evaluate.py": ["--device=cpu"], "serve.py": ["--device=cpu", "--port=0"],
            "export.py": [], "prepare_chat.py": [f"--data_root={new_world}/data", "--dataset=code"],
            "rl.py": [*RL, f"--init_from={new_world}/chat/ckpt.pt", f"--data={new_world}/prompts.jsonl",
                      f"--held_out={new_world}/prompts.jsonl", f"--out_dir={new_world}/rl"],
            **{trainer: ["--device=cpu", f"--data={new_world}/toy.json", f"--out_dir={new_world}/new_run"]
               for trainer in ("sft.py", "dpo.py")}}[script]
    before = fingerprint(new_world)
    result = run_forked(script, *base, *args)
    line = error_line(result)
    print(line)
    assert expected.replace("{root}", str(new_world)) in line
    assert fingerprint(new_world) == before
    assert not os.path.exists(PWNED)


@pytest.mark.parametrize("sub", ["", "/run"])
def test_rl_into_a_read_only_folder_stops_in_one_line(new_world, read_only_folder, sub):
    result = run_forked("rl.py", *RL, f"--init_from={new_world}/chat/ckpt.pt", f"--data={new_world}/prompts.jsonl",
                        f"--out_dir={read_only_folder}{sub}")
    assert f"cannot write in {read_only_folder}{sub}" in error_line(result)


# Settings at their extremes, valid, that once crashed or hung: each run ends by itself, well.
EXTREMES = [
    # a temperature or top_p too small for float32 gave NaN probabilities
    ("sample.py", "--out_dir={root}/chat --temperature=1e-300 --max_new_tokens=4 --num_samples=1"),
    ("sample.py", "--out_dir={root}/chat --top_p=1e-50 --max_new_tokens=4 --num_samples=1"),
    ("evaluate.py", "--out_dir={root}/chat --tasks={root}/gsm.jsonl --temperature=1e-300 --max_new_tokens=4 "
                    "--report={out}/eval.json"),
    ("rl.py", "--temperature=1e-300 --max_iters=1 --eval_interval=1 --out_dir={out}"),
    # a step at a time, eval_seconds was added up to the clock: for ever at 1e-20
    ("translate.py", "--eval_seconds=1e-20 --out_dir={out}"),
    ("train.py", "--eval_seconds=1e-20 --data_root={root}/data --dataset=code --max_iters=2 --out_dir={out}"),
]


@pytest.mark.parametrize("script, args", EXTREMES, ids=[f"{s[:-3]} {next(x for x in a.split() if '1e-' in x)}"
                                                         for s, a in EXTREMES])
def test_extreme_but_valid_settings_run_to_their_end(new_world, script, args, tmp_path):
    args = [a.replace("{root}", str(new_world)).replace("{out}", str(tmp_path)) for a in args.split()]
    base = {"translate.py": [*TRANSLATE, f"--data={new_world}/train.de,{new_world}/train.en"],
            "train.py": [*TINY_MODEL, "--eval_interval=2"], "sample.py": ["--device=cpu"], "evaluate.py": ["--device=cpu"],
            "rl.py": [*RL, f"--init_from={new_world}/chat/ckpt.pt", f"--data={new_world}/prompts.jsonl",
                      f"--held_out={new_world}/prompts.jsonl"]}[script]
    result = run_forked(script, *base, *args)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout[-2000:] + result.stderr


@pytest.mark.parametrize("setting, message", [("SCALE=foo", "SCALE=foo is not cpu or gpt2"),
                                              ("TINY=yes", "TINY=yes is not 0 or 1")])  # TINY=yes ran at full size
def test_run_sh_with_a_bad_setting_stops_in_one_line_before_any_stage(setting, message, tmp_path):
    key, value = setting.split("=")
    env = dict(os.environ, DATA=str(tmp_path / "data"), OUT=str(tmp_path / "out"), **{key: value})
    result = subprocess.run(["bash", os.path.join(REPO, "run.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"run.sh: {message}\n")
    assert not os.listdir(tmp_path)
