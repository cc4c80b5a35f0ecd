"""sample.py: reproducible samples from a checkpoint, and one-line errors for bad input."""

import os

from conftest import run_script


def sample(out_dir, *args, check=True):
    return run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", *args, check=check)


def test_the_same_seed_gives_the_same_text_and_another_seed_differs(tiny_checkpoint):
    args = ["--num_samples=2", "--max_new_tokens=40", "--temperature=1.0"]
    first, again = sample(tiny_checkpoint, *args), sample(tiny_checkpoint, *args)
    other = sample(tiny_checkpoint, *args, "--seed=7")
    assert first.stdout == again.stdout and first.stdout != other.stdout
    assert first.stdout.count("--- sample") == 2


def test_the_prompt_is_printed_then_continued(tiny_checkpoint, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("import torch\n")
    result = sample(tiny_checkpoint, f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=20")
    body = result.stdout.split("--- sample 1/1 ---\n", 1)[1]
    assert body.startswith("import torch\n") and len(body) > len("import torch\n")


def test_a_prompt_longer_than_the_context_is_cropped_with_a_warning(tiny_checkpoint):
    result = sample(tiny_checkpoint, "--start=" + "x" * 100, "--num_samples=1", "--max_new_tokens=5")
    assert "warning: the prompt is 100 tokens, longer than the model's context of 32" in result.stderr


def test_missing_or_corrupt_checkpoints_are_one_line_errors(tiny_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pt"
    with open(os.path.join(tiny_checkpoint, "ckpt.pt"), "rb") as f:
        truncated.write_bytes(f.read()[:5000])
    not_a_checkpoint = tmp_path / "text.pt"
    not_a_checkpoint.write_text("hello")
    for ckpt, expected in [(tmp_path / "none.pt", "no checkpoint at"),
                           (truncated, "is corrupt or not a checkpoint"),
                           (not_a_checkpoint, "is corrupt or not a checkpoint")]:
        result = sample(tiny_checkpoint, f"--ckpt={ckpt}", check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr


def test_bad_sampling_settings_and_missing_prompt_files_are_one_line_errors(tiny_checkpoint, tmp_path):
    for args, expected in [(["--top_p=0"], "0 < top_p <= 1"), (["--temperature=-1"], "temperature >= 0"),
                           ([f"--start=FILE:{tmp_path}/none.txt"], "prompt file")]:
        result = sample(tiny_checkpoint, *args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr
