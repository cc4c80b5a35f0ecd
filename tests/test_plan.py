"""plan.py: its numbers equal the documented formulas worked out by hand, and bad input stops in one line."""

import json
import math

import pytest

import plan
from conftest import run_script
from runtime import GPUS, peak_flops

GIB = 2**30
GPT2 = ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024", "--norm=layernorm", "--mlp=gelu",
        "--pos=learned", "--tie_embeddings=True", "--bias=True", "--qk_norm=False", "--logit_softcap=0"]

# A small modern model on the byte vocabulary, worked out by hand for the pipeline and offload tests:
# RMSNorm, RoPE, SwiGLU with f = 8/3 h rounded up to 64, untied head, vocabulary 257 padded to 320.
SMALL = ["--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=4", "--mlp=swiglu", "--qk_norm=False",
         "--logit_softcap=0"]
H, A, F, V_PAD, TOKENS = 128, 4, 384, 320, 4 * 64  # TOKENS: one micro-batch
BLOCK = 2 * H + 3 * H * H + H * H + 2 * H * F + F * H  # two RMSNorm gains, qkv, proj, gate+up, down
PER_LAYER = 8 * H + 2 * 3 * H + 2 * 3 * H + 2 * 2 * H + 4 * A + 2 * 4 * F  # the docstring's table in bf16


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
    seconds = r["train_flops"] / (GPUS["H100"][0] * 0.4)
    assert r["hours"] == pytest.approx(seconds / 3600)


def test_memory_of_a_small_modern_model_equals_the_documented_formulas(data_root):
    args = ["--n_layer=2", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=4", "--num_gpus=2",
            "--mlp=swiglu", "--qk_norm=False", "--logit_softcap=0"]
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
    assert flops == GPUS["H100"][0] * 8 * 24 * 3600 * 0.4
    plan.print_budget_report(plan.plan_budget(flops, config, options), options, argv[-2:])
    out = capsys.readouterr().out
    assert out.startswith(f"budget    {flops:.3g} FLOPs (8 x H100 for 24 h at 40% MFU)")
    assert "train     python train.py --data_root=" in out and "max micro-batch" in out


def test_pipeline_bubble_is_p_minus_1_over_m_plus_p_minus_1_and_stretches_the_time(data_root):
    # p = 4 stages on 8 GPUs: dp = 2, m = 4096 / (4 * 64 * 2) = 8; p = 2 on 2 GPUs: dp = 1, m = 1024 / (4 * 64) = 4
    for stages, gpus, step_tokens, m, bubble in ((4, 8, 4096, 8, 3 / 11), (2, 2, 1024, 4, 1 / 5)):
        args = ["--n_layer=4", *SMALL, f"--num_gpus={gpus}", f"--total_batch_tokens={step_tokens}"]
        r = report(data_root, "bytes", *args, f"--pipeline_stages={stages}")
        flat = report(data_root, "bytes", *args)
        assert r["pipeline"]["micro_batches"] == r["accumulation"] == m
        assert r["pipeline"]["bubble"] == pytest.approx(bubble)
        assert r["hours"] == pytest.approx(flat["hours"] / (1 - bubble))
        assert r["tokens_per_sec"] == pytest.approx(flat["tokens_per_sec"] * (1 - bubble))
        assert "pipeline" not in flat and "stage" not in flat["memory"]["ddp"]


def test_pipeline_stages_split_the_parameters_first_embedding_last_head(data_root):
    r = report(data_root, "bytes", "--n_layer=5", *SMALL, "--num_gpus=2", "--pipeline_stages=2")
    P = 2 * V_PAD * H + 5 * BLOCK + H  # embedding, five blocks, head and final RMSNorm, as stored
    assert r["pipeline"]["layers"] == [[0, 2], [2, 5]]  # consecutive, as even as whole layers allow
    assert r["pipeline"]["params"] == [2 * BLOCK + V_PAD * H, 3 * BLOCK + V_PAD * H + H]
    assert sum(r["pipeline"]["params"]) == P


def test_1f1b_holds_p_minus_s_micro_batches_on_stage_s_and_gpipe_all_m(data_root):
    # 4 stages of one layer on 4 GPUs (dp = 1), m = 2048 / (4 * 64) = 8 micro-batches, DDP without checkpointing
    args = ["--n_layer=4", *SMALL, "--num_gpus=4", "--pipeline_stages=4", "--total_batch_tokens=2048"]
    one_f_one_b = report(data_root, "bytes", *args, "--pipeline_schedule=1f1b")["pipeline"]
    gpipe = report(data_root, "bytes", *args, "--pipeline_schedule=gpipe")["pipeline"]
    assert one_f_one_b["micro_batches_held"] == [4, 3, 2, 1] and gpipe["micro_batches_held"] == [8, 8, 8, 8]
    for s, held in enumerate((4, 3, 2, 1)):
        kept = PER_LAYER + 4 * H + (2 * H if s == 3 else 0)  # the stage's fp32 output; the head's input on the last
        assert one_f_one_b["memory"][s]["activations"] * GIB == pytest.approx(TOKENS * held * kept)
    assert gpipe["memory"][0]["activations"] / one_f_one_b["memory"][0]["activations"] == pytest.approx(8 / 4)
    # the last stage: log-probabilities and bf16 logits of each held micro-batch, the two fp32 gradients of one
    assert one_f_one_b["memory"][3]["logits"] * GIB == pytest.approx(TOKENS * (1 * 6 * V_PAD + 8 * V_PAD))
    assert gpipe["memory"][3]["logits"] * GIB == pytest.approx(TOKENS * (8 * 6 * V_PAD + 8 * V_PAD))
    assert all(stage["logits"] == 0 for stage in gpipe["memory"][:3])


def test_a_pipelines_fsdp_shards_the_state_but_holds_the_stage_gathered_with_its_whole_gradient(data_root):
    args = ["--n_layer=4", *SMALL, "--num_gpus=4", "--pipeline_stages=2", "--parallelism=fsdp"]  # dp = 2
    r = report(data_root, "bytes", *args)
    for stage, P_s in zip(r["pipeline"]["memory"], (2 * BLOCK + V_PAD * H, 2 * BLOCK + V_PAD * H + H)):
        assert stage["weights"] * GIB == pytest.approx(4 * P_s / 2)
        assert stage["optimizer"] * GIB == pytest.approx(8 * P_s / 2)
        assert stage["communication"] * GIB == pytest.approx((2 + 4) * P_s) and stage["weight_copies"] == 0
    loaded = r["memory"]["fsdp"]["stage"]
    assert r["memory"]["fsdp"]["total"] == pytest.approx(max(s["total"] for s in r["pipeline"]["memory"]))
    assert r["pipeline"]["memory"][loaded]["total"] == r["memory"]["fsdp"]["total"]


def test_a_pipeline_without_fsdp_has_no_ddp_buckets_and_keeps_every_16_bit_cast_for_the_step(data_root):
    args = ["--n_layer=4", *SMALL, "--num_gpus=4", "--pipeline_stages=2"]  # dp = 2, two layers a stage
    for checkpointing in ("False", "True"):  # autocast's cache keeps the casts until the schedule's end
        r = report(data_root, "bytes", *args, f"--activation_checkpointing={checkpointing}")
        for s, stage in enumerate(r["pipeline"]["memory"]):
            assert stage["communication"] == 0  # each gradient all-reduced in place, once per step
            assert stage["weight_copies"] * GIB == pytest.approx(2 * (2 * BLOCK + (V_PAD * H if s == 1 else 0)))


def test_1f1b_with_fewer_micro_batches_than_stages_warns_and_the_advice_has_enough(data_root):
    args = ["--n_layer=4", *SMALL, "--num_gpus=4", "--pipeline_stages=4", "--total_batch_tokens=512"]  # m = 2
    r = report(data_root, "bytes", *args)
    assert any("1f1b needs at least pipeline_stages=4 micro-batches" in w for w in r["warnings"])
    # micro-batch 4 would give m = 2 < 4: 2 is the largest with enough (m = 4); GPipe takes any m, down to one of 8
    assert r["memory"]["ddp"]["max_micro_batch"] == 2 and r["memory"]["ddp"]["accumulation"] == 4
    assert r["memory"]["ddp"]["bubble"] == pytest.approx(3 / 7)  # at the advised micro-batch
    gpipe = report(data_root, "bytes", *args, "--pipeline_schedule=gpipe")
    assert not any("1f1b" in w for w in gpipe["warnings"])
    assert gpipe["memory"]["ddp"]["max_micro_batch"] == 8 and gpipe["memory"]["ddp"]["accumulation"] == 1


def test_cpu_offload_moves_the_16_bytes_per_parameter_and_shard_from_the_gpu_to_the_cpu(data_root):
    # 2 GPUs, m = 2048 / (4 * 64 * 2) = 4 micro-steps
    args = ["--n_layer=2", *SMALL, "--num_gpus=2", "--parallelism=fsdp", "--total_batch_tokens=2048", "--max_iters=10"]
    kept, offloaded = report(data_root, "bytes", *args), report(data_root, "bytes", *args, "--cpu_offload=True")
    P = 2 * V_PAD * H + 2 * BLOCK + H
    root = P - 2 * BLOCK
    for run in ("fsdp", "fsdp+ckpt"):
        assert offloaded["memory"][run]["weights"] == offloaded["memory"][run]["optimizer"] == 0
        assert offloaded["memory"][run]["cpu_memory"] * GIB == pytest.approx(16 * P / 2)
        assert (kept["memory"][run]["total"] - offloaded["memory"][run]["total"]) * GIB == pytest.approx(16 * P / 2)
    assert offloaded["memory"]["ddp"] == kept["memory"]["ddp"]
    o = offloaded["offload"]
    to_gpu = 4 * 4 * (2 * 2 * BLOCK + root) / 2  # per micro-step: the blocks twice (forward, backward), the root once
    to_cpu = 4 * 4 * P / 2  # per micro-step: the fp32 gradient shard
    assert o["to_gpu_gb"] * 1e9 == pytest.approx(to_gpu) and o["to_cpu_gb"] * 1e9 == pytest.approx(to_cpu)
    assert o["transfer_seconds"] == pytest.approx((to_gpu + to_cpu) / 25e9)
    assert o["compute_seconds"] == pytest.approx(offloaded["hours"] * 3600 / 10)


def test_cpu_offload_runs_fsdp_on_a_single_gpu(data_root):
    args = ["--n_layer=2", *SMALL, "--parallelism=fsdp"]
    plain = report(data_root, "bytes", *args)["memory"]["fsdp"]
    offloaded = report(data_root, "bytes", *args, "--cpu_offload=True")["memory"]["fsdp"]
    P = 2 * V_PAD * H + 2 * BLOCK + H
    root = P - 2 * BLOCK
    assert plain["communication"] == 0 and plain["weight_copies"] > 0  # without offload, a plain model
    assert offloaded["communication"] * GIB == pytest.approx(2 * (root + 2 * BLOCK) + 6 * max(root, BLOCK))
    assert offloaded["weight_copies"] == 0 and offloaded["cpu_memory"] * GIB == pytest.approx(16 * P)


def test_the_report_prints_the_pipeline_and_offload_lines(data_root, capsys):
    args = ["--n_layer=4", *SMALL, "--num_gpus=4", "--pipeline_stages=2", "--parallelism=fsdp", "--cpu_offload=True",
            "--total_batch_tokens=2048"]  # dp = 2, m = 2048 / (4 * 64 * 2) = 4
    plan.print_config_report(report(data_root, "bytes", *args))
    out = capsys.readouterr().out
    assert "(with the pipeline bubble)" in out and "GiB per GPU on the most loaded stage" in out
    assert "pipeline  2 stages x 2 data-parallel, 1f1b: 4 micro-batches per step; bubble (p-1)/(m+p-1) = 20.0%" in out
    assert "CPU memory (offload)" in out and "GiB of CPU memory per GPU" in out and "at an assumed 25 GB/s" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpu=Z100"], "plan error: unknown GPU 'Z100'; use one of H100 PCIe"),
    (["--n_layr=3"], "config error: unknown key 'n_layr' on the command line; did you mean --n_layer"),
    (["--n_embd=100"], "config error: n_embd=100 must be divisible by n_head=12"),
    (["--num_gpus=6", "--pipeline_stages=4"], "config error: pipeline_stages=4 does not divide the 6 processes"),
    (["--n_layer=2", "--pipeline_stages=3", "--num_gpus=3"],
     "config error: pipeline_stages=3 must be between 1 and n_layer=2"),
    (["--pipeline_schedule=zb", "--pipeline_stages=2", "--num_gpus=2"],
     "config error: pipeline_schedule='zb' is invalid; pipeline_schedule must be one of gpipe, 1f1b"),
    (["--tie_embeddings=True", "--pipeline_stages=2", "--num_gpus=2"],
     "config error: tie_embeddings=True shares one matrix between the first and the last"),
    (["--cpu_offload=True"], "config error: cpu_offload=True offloads FSDP's shards; set --parallelism=fsdp"),
])
def test_bad_input_stops_with_one_line(argv, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        report(str(tmp_path), "none", *argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_command_line_error_is_one_line_on_stderr():
    result = run_script("plan.py", "--gpu=Z100", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("plan error: unknown GPU 'Z100'") and result.stderr.count("\n") == 1


# -----------------------------------------------------------------------------
# Kaplan et al. 2020 beside Chinchilla (issue 19)

PF_DAY = 1e15 * 86400  # FLOPs


@pytest.mark.parametrize("flops", [1e19, 1e21])
def test_kaplan_budget_is_eq_6_1_worked_by_hand_with_a_shape_matched_without_embeddings(data_root, flops):
    options, config = plan.read_config([f"--data_root={data_root}", "--dataset=gpt2ish", f"--flops={flops}",
                                        "--law=kaplan"])
    b = plan.plan_budget(plan.budget_flops(options, config), config, options, options["law"])
    n = 1.3e9 * math.exp(0.73 * math.log(flops / PF_DAY))  # N(C_min) = 1.3e9 (C_min / PF-day)^0.73
    assert b["params"] == round(n) and b["tokens"] == pytest.approx(flops / (6 * n))  # C = 6ND
    t = b["training"]
    assert t["non_embedding_params"] == b["shape_params"] and abs(b["shape_params"] / n - 1) <= 0.02
    assert t["params"] > t["non_embedding_params"] and t["vocab_size"] == 50257
    assert t["tokens"] >= b["tokens"] > t["tokens"] - config["total_batch_tokens"]  # max_iters rounds up


def test_law_both_tabulates_the_two_laws_by_hand_and_says_chinchilla_supersedes(data_root, capsys):
    argv = ["--law=both", "--flops=1e20", f"--data_root={data_root}", "--dataset=gpt2ish"]
    options, config = plan.read_config(argv)
    report = plan.plan_both(1e20, config, options)
    rows = report["range"]
    assert [r["flops"] for r in rows] == [1e18, 1e19, 1e20, 1e21, 1e22, 1e23, 1e24]
    for r in rows:
        n_kaplan = 1.3e9 * (r["flops"] / 8.64e19) ** 0.73
        assert r["kaplan_params"] == pytest.approx(n_kaplan)
        assert r["kaplan_tokens_per_param"] == pytest.approx(r["flops"] / (6 * n_kaplan ** 2))
        assert r["chinchilla_params"] == pytest.approx(math.sqrt(r["flops"] / 120))
        assert r["chinchilla_tokens_per_param"] == pytest.approx(20)
    # Kaplan's D/N falls by 10^(0.27 - 0.73) per decade of compute: ~66 at 1e18 to ~0.12 at 1e24
    assert rows[0]["kaplan_tokens_per_param"] == pytest.approx(66.26, rel=1e-3)
    assert rows[-1]["kaplan_tokens_per_param"] == pytest.approx(0.1151, rel=1e-3)
    assert report["chinchilla"]["params"] == round(math.sqrt(1e20 / 120))
    assert report["kaplan"]["params"] == round(1.3e9 * (1e20 / 8.64e19) ** 0.73)
    plan.print_both(report, options, argv[2:])
    text = capsys.readouterr().out
    assert "--- chinchilla ---" in text and "--- kaplan ---" in text and text.count("python train.py") == 2
    assert "Chinchilla supersedes Kaplan" in text and "C^0.73" in text


def test_kaplan_report_names_chinchillas_plan_beside_it(data_root, capsys):
    argv = ["--flops=1e20", "--law=kaplan", f"--data_root={data_root}", "--dataset=gpt2ish"]
    options, config = plan.read_config(argv)
    plan.print_budget_report(plan.plan_budget(1e20, config, options, "kaplan"), options, argv[2:])
    out = capsys.readouterr().out
    assert "non-embedding parameters" in out and "Kaplan et al. 2020, eq. 6.1" in out
    assert f"Chinchilla's plan for this budget: {math.sqrt(1e20 / 120) / 1e6:,.1f}M parameters" in out


def test_a_budget_assumes_gpt2s_vocabulary_unless_a_dataset_is_named(tmp_path):
    (tmp_path / "pystdlib").mkdir()  # train.py's default dataset, prepared with the byte tokenizer
    (tmp_path / "pystdlib" / "meta.json").write_text(json.dumps({"vocab_size": 257}))
    for named, vocab in ((False, 50304), (True, 257)):
        argv = [f"--data_root={tmp_path}", "--flops=1e19"] + (["--dataset=pystdlib"] if named else [])
        options, config = plan.read_config(argv)
        assert plan.plan_budget(1e19, config, options)["training"]["vocab_size"] == vocab


def linear_shape_search(target, base, non_embedding):
    """The reference: every width and every depth of the family, as plan.py searched before issue 20."""
    best, n_embd = None, 0
    while True:
        n_embd += 64 if n_embd < 1024 else 128
        c = plan.replace(base, n_layer=1, n_embd=n_embd, n_head=n_embd // (64 if n_embd < 1024 else 128),
                         n_kv_head=0, ffn_hidden=0)
        one = plan.on_meta(c)
        per_block = sum(p.numel() for p in one.blocks[0].parameters())
        rest = one.num_params(non_embedding=non_embedding) - per_block
        depths = range(max(1, math.ceil(n_embd / 128)), n_embd // 64 + 1)
        for n_layer in depths:
            params = rest + n_layer * per_block
            error = abs(params / target - 1)
            key = (0, abs(n_embd / n_layer - 96)) if error <= 0.02 else (1, error)
            if best is None or key < best[0]:
                best = (key, (n_embd, n_layer, params))
        if rest + depths[0] * per_block > 1.02 * target:
            return best[1]


@pytest.mark.parametrize("vocab, non_embedding", [(257, False), (50304, True)])
def test_the_logarithmic_shape_search_finds_what_a_scan_of_every_shape_finds(vocab, non_embedding):
    base = plan.GPTConfig(vocab_size=vocab)
    for target in (3e4, 1e6, 7e6, 5e7, 3.5e8, 2e9):  # below the smallest model, where depths are coarse, and up
        c, params = plan.compute_optimal_shape(target, base, non_embedding)
        assert (c.n_embd, c.n_layer, params) == linear_shape_search(target, base, non_embedding), target


def test_the_shape_search_builds_a_few_dozen_models_even_for_the_largest_budget(monkeypatch):
    built = []
    real = plan.on_meta
    monkeypatch.setattr(plan, "on_meta", lambda c: built.append(c) or real(c))
    c, params = plan.compute_optimal_shape(plan.kaplan(plan.FLOPS_RANGE[1])[0], plan.GPTConfig(vocab_size=50304), True)
    assert len(built) < 100 and 64 <= c.n_embd / c.n_layer <= 128


# -----------------------------------------------------------------------------
# values plan.py cannot plan with: one line before any model is built (issue 20)

def plan_main(*argv):
    """What plan.py's __main__ computes for argv."""
    options, config = plan.read_config(list(argv))
    flops = plan.budget_flops(options, config)
    if options["law"] == "both":
        return plan.plan_both(flops, config, options)
    return plan.plan_budget(flops, config, options, options["law"]) if flops else plan.plan_config(config, options)


@pytest.mark.parametrize("argv, message", [
    (["--flops=-1e21"], "config error: flops=-1e+21 is invalid; flops must be a finite number >= 0"),
    (["--flops=1e60"], "config error: a budget of 1e+60 FLOPs is outside what plan.py plans, 1e+12 "),
    (["--flops=1", "--law=kaplan"], "config error: a budget of 1 FLOPs is outside what plan.py plans"),
    (["--hours=1e12", "--num_gpus=1024"], "config error: a budget of 1.46e+33 FLOPs is outside"),
    (["--flops=1e999"], "config error: flops=inf is invalid"),
    (["--flops=lots"], "config error: flops='lots' on the command line is a str"),
    (["--hours=-24"], "config error: hours=-24.0 is invalid; hours must be a finite number >= 0"),
    (["--hours=1e-9"], "config error: a budget of 1.42e+09 FLOPs is outside"),
    (["--hours=1e999"], "config error: hours=inf is invalid"),
    (["--num_gpus=0"], "config error: num_gpus=0 is invalid; num_gpus must be an integer >= 1"),
    (["--num_gpus=-8", "--flops=1e21"], "config error: num_gpus=-8 is invalid"),
    (["--mfu=0"], "config error: mfu=0.0 is invalid; mfu must be a number in (0, 1]"),
    (["--mfu=1.5", "--hours=24"], "config error: mfu=1.5 is invalid; mfu must be a number in (0, 1]"),
    (["--mfu=-0.4"], "config error: mfu=-0.4 is invalid"),
    (["--gpu_memory_gb=-80"], "config error: gpu_memory_gb=-80.0 is invalid; gpu_memory_gb must be a finite number >= 0"),
    (["--pcie_gb_per_s=0"], "config error: pcie_gb_per_s=0.0 is invalid; pcie_gb_per_s must be a finite number > 0"),
    (["--n_layer=0"], "config error: n_layer=0 is invalid; n_layer must be an integer >= 1"),
    (["--n_layer=-1"], "config error: n_layer=-1 is invalid; n_layer must be an integer >= 1"),
    (["--n_head=0"], "config error: n_head=0 is invalid; n_head must be an integer >= 1"),
    (["--n_embd=0"], "config error: n_embd=0 is invalid; n_embd must be an integer >= 1"),
    (["--block_size=0"], "config error: block_size=0 is invalid; block_size must be an integer >= 1"),
    (["--batch_size=-4"], "config error: batch_size=-4 is invalid; batch_size must be an integer >= 1"),
    (["--total_batch_tokens=0"], "config error: total_batch_tokens=0 is invalid; total_batch_tokens must be an integer >= 1"),
    (["--max_iters=0"], "config error: max_iters=0 is invalid; max_iters must be an integer >= 1"),
    (["--n_layer=100000"], "config error: n_layer=100000 is deeper than any transformer trained"),
    (["--law=hoffmann", "--flops=1e21"], "config error: law='hoffmann' is invalid; law must be one of chinchilla, kaplan, both"),
    (["--law=kaplan"], "config error: --law=kaplan plans a budget; give --flops or --hours"),
    (["--flops=1e21", "--hours=24"], "config error: give the budget as --flops or as --hours, not both"),
    (["--dataset=broken"], "data error: "),
])
def test_a_value_plan_cannot_plan_with_stops_in_one_line(argv, message, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meta.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        plan_main(f"--data_root={tmp_path}", *argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


# -----------------------------------------------------------------------------
# runtime.GPUS, the one hardware table (train.py's MFU, bench.py and plan.py read it)

@pytest.mark.parametrize("name,flops", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("Some Future Accelerator", 0.0),
])
def test_peak_flops_looks_up_the_gpu_name(name, flops):
    assert peak_flops(name) == flops


def test_peak_flops_override_wins():
    assert peak_flops("NVIDIA H100 80GB HBM3", override=123e12) == 123e12
    assert peak_flops("Some Future Accelerator", override=123e12) == 123e12


@pytest.mark.parametrize("key", GPUS)
def test_every_gpu_is_found_by_its_own_name(key):
    # Catches a shorter key placed above a longer one that contains it ('A10' above 'A100').
    assert peak_flops(f"NVIDIA {key}") == GPUS[key][0]
    assert plan.gpu_spec({"gpu": key.lower(), "gpu_memory_gb": 0}, {"peak_flops": 0})[1:] == GPUS[key]
