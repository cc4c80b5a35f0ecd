"""sample.py: reproducible samples from a checkpoint, and one-line errors for bad input."""

from dataclasses import asdict

import pytest
import torch

from checkpoint import save_checkpoint
from conftest import run_script
from forked import error_line, run_forked
from model import GPT, GPTConfig


def sample(out_dir, *args):
    return run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", *args)


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


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A random tiny checkpoint, the same with NaN weights, and prompt files: what the table's rows read."""
    root = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=32))
    checkpoint = {"kind": "pretrain", "model_config": asdict(model.config), "model": model.state_dict(),
                  "tokenizer": {"kind": "byte", "eot": "<|endoftext|>"}}
    save_checkpoint(checkpoint, str(root / "good" / "ckpt.pt"))
    checkpoint["model"] = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    save_checkpoint(checkpoint, str(root / "nan" / "ckpt.pt"))
    (root / "truncated.pt").write_bytes((root / "good" / "ckpt.pt").read_bytes()[:5000])
    (root / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (root / "folder.txt").mkdir()
    return root


@pytest.mark.parametrize("args, message", [
    (["--start=FILE:{root}/latin1.txt"], "sample error: prompt file {root}/latin1.txt is not UTF-8 text"),
    (["--out_dir={root}/nan"], "sample error: {root}/nan/ckpt.pt has NaN or infinite weights"),
    (["--start=FILE:{root}/folder.txt"], "sample error: no prompt file {root}/folder.txt"),
    (["--start=FILE:{root}/none.txt"], "sample error: no prompt file {root}/none.txt"),
    (["--out_dir={root}/none"], "checkpoint error: no checkpoint at {root}/none/ckpt.pt"),
    (["--ckpt={root}/latin1.txt"], "checkpoint error: {root}/latin1.txt is corrupt or not a checkpoint"),
    (["--ckpt={root}/truncated.pt"], "checkpoint error: {root}/truncated.pt is corrupt or not a checkpoint"),
    (["--ckpt=hf:{root}/good"], "import error: no {root}/good/config.json"),
    (["--top_k=-1"], "config error: need temperature >= 0"),
    (["--top_p=1.5"], "config error: need temperature >= 0, 0 < top_p <= 1"),
    (["--top_p=0"], "config error: need temperature >= 0, 0 < top_p <= 1"),
    (["--temperature=-1"], "config error: need temperature >= 0"),
    (["--num_samples=0"], "config error: need temperature >= 0"),
    (["--max_new_tokens=-1"], "config error: need temperature >= 0"),
    (["--num_samples=two"], "config error: num_samples='two' on the command line is a str"),
    (["--chat=True", "--start=hi"], "config error: --prompt and --system are for --chat=True"),
    (["--prompt=hi"], "config error: --prompt and --system are for --chat=True"),
    (["--chat=True"], "sample error: {root}/good/ckpt.pt is not a chat model"),
    (["--temprature=0.5"], "config error: unknown key 'temprature' on the command line; did you mean --temperature"),
])
def test_bad_input_is_one_line_without_a_traceback(bad_inputs, args, message):
    root = str(bad_inputs)
    result = run_forked("sample.py", f"--out_dir={root}/good", "--device=cpu", "--max_new_tokens=4",
                        *(a.format(root=root) for a in args))
    line = error_line(result)
    assert line.startswith(message.format(root=root)), line
