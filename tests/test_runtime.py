"""runtime.py: the default precision is the fast one on the machine at hand, and the facts of the machine that a
timing depends on are measured.

    python -m pytest -q tests/test_runtime.py      # about 10 s: one tiny train.py run and one sample.py run
"""

import json
import os
import subprocess
import sys

import torch

from conftest import REPO, TINY_MODEL, run_script
from matmul_dtypes import MatmulDtypes
from model import GPT, GPTConfig
from runtime import describe_machine, machine_facts, pick_dtype

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # what most laptops' CPUs can do


def test_auto_precision_is_float32_on_a_cpu_and_16_bit_on_a_gpu(monkeypatch):
    assert pick_dtype("cpu") == "float32" and pick_dtype("mps") == "float32"
    assert pick_dtype("cpu", "bfloat16") == "bfloat16"  # asked for, given
    for bf16, expected in ((True, "bfloat16"), (False, "float16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        assert pick_dtype("cuda:0") == expected


def test_the_recorder_sees_bfloat16_autocast():
    # what the tests below rely on: a forward pass under bfloat16 autocast shows up as bfloat16 products
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with MatmulDtypes() as recorded, torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.zeros(1, 8, dtype=torch.long))
    assert torch.bfloat16 in recorded.seen


def run_recording_dtypes(tmp_path, script, *args):
    seen = tmp_path / "matmul_dtypes.json"
    run_script(os.path.join("tests", "matmul_dtypes.py"), str(seen), script, *args)
    return json.loads(seen.read_text())


def test_a_cpu_training_run_with_the_default_recipe_multiplies_in_float32_only(tiny_data_root, tmp_path):
    # the defaults: dtype='auto' and Muon (TINY_MODEL asks for AdamW), forward, backward, step and evaluation
    args = [a for a in TINY_MODEL if a not in ("--optimizer=adamw", "--zero_init_proj=False")]
    seen = run_recording_dtypes(tmp_path, "train.py", *args, f"--data_root={tiny_data_root}", "--dataset=tiny",
                                f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--eval_interval=2")
    assert seen == ["float32"]
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["config"]["optimizer"] == "muon"


def test_sampling_on_a_cpu_multiplies_in_float32_only(tiny_checkpoint, tmp_path):
    seen = run_recording_dtypes(tmp_path, "sample.py", f"--out_dir={tiny_checkpoint}", "--device=cpu",
                                "--num_samples=1", "--max_new_tokens=4", "--start=a")
    assert seen == ["float32"]


def test_machine_facts_measure_whether_bfloat16_is_native():
    facts = machine_facts("cpu")
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["threads"] == torch.get_num_threads() and facts["gpu"] is None and facts["cpu"]
    line = describe_machine(facts)
    assert facts["cpu_capability"] in line and facts["cpu"] in line and "GPU none" in line
    # limited to AVX2, no CPU has bfloat16 matrix units: the products are emulated, many times slower
    code = "import json, runtime; print(json.dumps(runtime.machine_facts('cpu')))"
    avx2 = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, **AVX2_ONLY),
                                     capture_output=True, text=True, check=True).stdout)
    assert avx2["cpu_capability"] == "AVX2" and not avx2["cpu_bfloat16_native"]
    assert avx2["cpu_bfloat16_gflops"] < avx2["cpu_float32_gflops"] / 4
