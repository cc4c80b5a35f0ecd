"""
bench.py's smoke test: it runs end to end on a CPU with a tiny model and writes every number.

    python -m pytest -q tests/test_bench.py

One run of a few seconds (more when transformers is imported: it is timed beside ours).
"""

import json

from conftest import run_script


def test_bench_writes_training_and_decoding_numbers_for_each_variant(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench.py", "--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32",
                        "--block_size=32", "--vocab_size=257", "--batch_size=2", "--prompt_tokens=8", "--new_tokens=4",
                        "--decode_batch_sizes=[1, 2]", "--warmup=1", "--repeats=1", f"--out={out}")
    results = json.loads(out.read_text())
    assert "training" in result.stdout and "decoding" in result.stdout
    assert results["peak_memory_mb"] > 0
    step = results["train"]["eager"]
    assert step["tokens_per_s"] > 0 and step["step_ms_median"] > 0 and step["mfu"] is None  # no peak for a CPU
    assert set(results["decode"]) == {"batch1", "batch2"}
    for rows in results["decode"].values():
        assert "ours" in rows
        for row in rows.values():
            assert row["first_token_ms"] > 0 and row["tokens_per_s"] > 0
        if "hf" in rows:  # the same weights give the same greedy tokens, so the timings compare like with like
            assert rows["hf"]["same_tokens_as_ours"] and rows["ours"]["speed_vs_hf"] > 0


def test_bench_refuses_a_prompt_and_answer_longer_than_the_context():
    result = run_script("bench.py", "--device=cpu", "--block_size=16", "--prompt_tokens=10", "--new_tokens=10",
                        check=False)
    assert result.returncode != 0 and "config error" in result.stderr and "Traceback" not in result.stderr


def test_bench_trains_with_activation_checkpointing_and_skips_decoding_or_training_when_asked(tmp_path):
    out = tmp_path / "bench.json"
    tiny = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--vocab_size=257", "--batch_size=2", "--prompt_tokens=8", "--new_tokens=4", "--warmup=1", "--repeats=1",
            f"--out={out}", "--hf=False"]
    run_script("bench.py", *tiny, "--activation_checkpointing=True", "--decode_batch_sizes=[]")
    results = json.loads(out.read_text())
    assert results["config"]["activation_checkpointing"] and results["train"]["eager"]["tokens_per_s"] > 0
    assert results["decode"] == {}
    run_script("bench.py", *tiny, "--train=False", "--decode_batch_sizes=[2]")
    results = json.loads(out.read_text())
    assert results["train"] == {} and results["decode"]["batch2"]["ours"]["tokens_per_s"] > 0


def test_bench_refuses_to_time_nothing():
    result = run_script("bench.py", "--device=cpu", "--eager=False", "--compile=False", check=False)
    assert result.returncode != 0 and "eager=False needs compile=True" in result.stderr
