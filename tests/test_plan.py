"""plan.py: its numbers equal the documented formulas worked out by hand, and bad input stops in one line."""

import json
import math

import pytest

import plan
from conftest import run_script
from model import PEAK_BF16_FLOPS

GIB = 2**30
GPT2 = ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024", "--norm=layernorm", "--mlp=gelu",
        "--pos=learned", "--tie_embeddings=True", "--bias=True"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Two prepared datasets as far as plan.py looks: meta.json with GPT-2's and the byte vocabulary."""
    root = tmp_path_factory.mktemp("data")
    for name, vocab in (("gpt2ish", 50257), ("bytes", 257)):
        (root / name).mkdir()
        (root / name / "meta.json").write_text(json.dumps({"vocab_size": vocab}))
    return str(root)


def report(data_root, dataset, *argv):
    options, config = plan.read_config([f"--data_root={data_root}", f"--dataset={dataset}", *argv])
    return plan.plan_config(config, options)


def test_gpt2_parameters_and_flops_equal_the_hand_count(data_root):
    r = report(data_root, "gpt2ish", *GPT2, "--total_batch_tokens=524288", "--max_iters=2000")
    V, T, L, h = 50257, 1024, 12, 768
    block = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h)
    params = V * h + T * h + L * block + 2 * h  # tied head; learned positions; final LayerNorm
    assert params == r["params"] == 124_439_808
    flops_per_token = 6 * (params - T * h) + 12 * L * h * T  # 6N without lookup tables, plus attention
    assert r["flops_per_token"] == flops_per_token
    assert r["train_flops"] == flops_per_token * 524288 * 2000
    assert r["tokens_per_param"] == pytest.approx(524288 * 2000 / params)
    seconds = r["train_flops"] / (PEAK_BF16_FLOPS["H100"] * 0.4)
    assert r["hours"] == pytest.approx(seconds / 3600)


def test_memory_of_a_small_modern_model_equals_the_documented_formulas(data_root):
    args = ["--n_layer=2", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=4", "--num_gpus=2"]
    r = report(data_root, "bytes", *args)
    L, h, a, f, V, V_pad, tokens = 2, 128, 4, 384, 257, 320, 4 * 64  # f: 8/3 h up to 64; V padded to 64
    block = 2 * h + 3 * h * h + h * h + 2 * h * f + f * h  # two RMSNorm gains, qkv, proj, gate+up, down
    assert r["params"] == 2 * V * h + L * block + h  # untied embedding and head, final RMSNorm
    P = 2 * V_pad * h + L * block + h  # what memory holds: the padded rows too
    root = P - L * block
    # bf16: fp32 residual at two norms, inputs of c_attn and c_fc and attention's output, the qkv buffer,
    # q and k after RoPE, log-sum-exp per head, SwiGLU's gate+up, silu and product
    per_layer = 8 * h + 2 * 3 * h + 2 * 3 * h + 2 * 2 * h + 4 * a + 2 * 4 * f
    head = 4 * h + 2 * h
    logits = V_pad * 12
    expected = {
        "ddp": dict(weights=4 * P, gradients=4 * P, optimizer=8 * P, communication=4 * P,
                    weight_copies=2 * (L * block + V_pad * h),
                    activations=tokens * (L * per_layer + head), logits=tokens * logits),
        "ddp+ckpt": dict(weights=4 * P, gradients=4 * P, optimizer=8 * P, communication=4 * P,
                         weight_copies=2 * (block + V_pad * h),
                         activations=tokens * (L * 4 * h + per_layer + head), logits=tokens * logits),
        "fsdp": dict(weights=2 * P, gradients=2 * P, optimizer=4 * P,
                     communication=2 * (root + 2 * block) + 6 * max(root, block), weight_copies=0,
                     activations=tokens * (L * per_layer + head), logits=tokens * logits),
    }
    for run, terms in expected.items():
        got = r["memory"][run]
        assert {k: got[k] * GIB for k in terms} == pytest.approx(terms), run
        assert got["total"] * GIB == pytest.approx(sum(terms.values()))


def test_gpt2_activations_are_36h_plus_4a_bytes_per_token_per_layer(data_root):
    r = report(data_root, "gpt2ish", *GPT2, "--batch_size=1")
    h, a, tokens = 768, 12, 1024
    assert r["memory"]["ddp"]["activations"] * GIB == pytest.approx(tokens * (12 * (36 * h + 4 * a) + 6 * h))


def test_fsdp_divides_weights_gradients_and_optimizer_by_the_world_size(data_root):
    r = report(data_root, "gpt2ish", *GPT2, "--num_gpus=8")
    for key in ("weights", "gradients", "optimizer"):
        assert r["memory"]["fsdp"][key] == pytest.approx(r["memory"]["ddp"][key] / 8)
        assert r["memory"]["fsdp+ckpt"][key] == pytest.approx(r["memory"]["ddp+ckpt"][key] / 8)


def test_the_micro_batch_is_the_largest_power_of_two_that_fits_and_divides_the_step(data_root):
    r = report(data_root, "gpt2ish", *GPT2, "--gpu_memory_gb=24", "--num_gpus=2", "--total_batch_tokens=524288")
    options, config = plan.read_config([f"--data_root={data_root}", "--dataset=gpt2ish", *GPT2])
    c = plan.model_config(config, 50257)
    model = plan.on_meta(c)
    P, block = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.blocks[0].parameters())
    for run, (parallelism, checkpointing) in zip(r["memory"], plan.COMBOS):
        micro = r["memory"][run]["max_micro_batch"]
        assert micro & (micro - 1) == 0 and micro * 1024 * 2 * r["memory"][run]["accumulation"] == 524288
        fits = lambda m: sum(plan.memory_per_gpu(c, P, block, m, 2, "auto", parallelism, checkpointing).values())
        assert fits(micro) <= 0.9 * 24 * GIB < fits(2 * micro)


def test_tokens_per_parameter_far_from_20_warns(data_root):
    args = [*GPT2, "--total_batch_tokens=524288"]
    assert any("tokens per parameter" in w for w in report(data_root, "gpt2ish", *args, "--max_iters=1000")["warnings"])
    assert report(data_root, "gpt2ish", *args, "--max_iters=4750")["warnings"] == []  # 20 tokens per parameter


def test_without_prepared_data_the_vocabulary_is_gpt2s_and_says_so(tmp_path):
    r = report(str(tmp_path), "nothing_here")
    assert r["vocab_size"] == 50304 and any("assumed GPT-2's vocabulary, 50304" in w for w in r["warnings"])


def test_chinchilla_budget_gives_20_tokens_per_parameter_and_a_shape_that_matches(data_root):
    result = run_script("plan.py", "--flops=1e21", "--json", f"--data_root={data_root}", "--dataset=gpt2ish")
    r = json.loads(result.stdout)
    assert abs(r["params"] - math.sqrt(1e21 / 120)) <= 0.5 and r["tokens"] == 20 * r["params"]
    assert abs(r["shape_params"] / r["params"] - 1) <= 0.02
    s = r["shape"]
    assert s["n_embd"] % 128 == 0 and s["n_embd"] // s["n_head"] == 128 and 64 <= s["n_embd"] / s["n_layer"] <= 128
    assert r["training"]["params"] == r["shape_params"] and r["training"]["tokens_per_param"] == pytest.approx(20, rel=0.01)


def test_a_budget_in_gpu_hours_is_peak_times_gpus_times_seconds_times_mfu(data_root, capsys):
    argv = ["--gpu=H100", "--num_gpus=8", "--hours=24", "--mfu=0.4", f"--data_root={data_root}", "--dataset=bytes"]
    options, config = plan.read_config(argv)
    flops = plan.budget_flops(options, config)
    assert flops == PEAK_BF16_FLOPS["H100"] * 8 * 24 * 3600 * 0.4
    plan.print_budget_report(plan.plan_budget(flops, config, options), options, argv[-2:])
    out = capsys.readouterr().out
    assert out.startswith(f"budget    {flops:.3g} FLOPs (8 x H100 for 24 h at 40% MFU)")
    assert "train     python train.py --data_root=" in out and "max micro-batch" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpu=Z100"], "plan error: unknown GPU 'Z100'; use one of H100 PCIe"),
    (["--n_layr=3"], "config error: unknown key 'n_layr' on the command line; did you mean --n_layer"),
    (["--n_embd=100"], "config error: n_embd=100 must be divisible by n_head=12"),
])
def test_bad_input_stops_with_one_line(argv, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        report(str(tmp_path), "none", *argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_command_line_error_is_one_line_on_stderr():
    result = run_script("plan.py", "--gpu=Z100", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("plan error: unknown GPU 'Z100'") and result.stderr.count("\n") == 1
