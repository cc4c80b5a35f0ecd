"""The fast recipe's pieces: Muon (against the paper's equations in float64, Newton-Schulz against the
SVD's polar factor, every parallel layout against one process, exact resume), the warmup-stable-decay
schedule, and the model options relu2, zero-initialised projections, logit soft-capping and sinusoidal
positions.

    python -m pytest tests/test_recipe.py -q     # about a minute on 2 cores, most of it the torchrun runs
"""

import io
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_MODEL, run_script
from hf import architecture_of
from model import GPT, GPTConfig
from muon_worker import full_gradients, tiny_model
from test_distributed import FAST, assert_same_weights, losses, train, weights
from optim import MuonWithAdamW, learning_rate_at, make_optimizer, newton_schulz

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic's coefficients in the Muon paper and torch.optim.Muon


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32), **overrides}))


def reference_newton_schulz(g, steps=5):
    """The quintic iteration in float64, from the paper: X0 = G / ||G||_F (wide side first), then
    X <- aX + b(XX^T)X + c(XX^T)^2 X."""
    a, b, c = NS_COEFFICIENTS
    x = g.double().T if g.size(0) > g.size(1) else g.double()
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if g.size(0) > g.size(1) else x


def test_muon_steps_follow_the_papers_equations_and_adamw_takes_the_rest():
    lr, muon_lr, momentum, weight_decay = 1e-3, 0.05, 0.95, 0.1
    model = tiny_gpt()
    optimizer = make_optimizer(model, lr, weight_decay, (0.9, 0.95), "cpu", "muon", muon_lr, momentum)
    muon_names = {n for n, p in model.named_parameters() if any(p is q for q in optimizer.muon.param_groups[0]["params"])}
    assert muon_names == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert "wte.weight" not in muon_names and "lm_head.weight" not in muon_names
    for group in optimizer.param_groups:  # what the training loop does
        group["lr"] = lr * group["lr_scale"]
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    expected, buffers = dict(start), {}
    torch.manual_seed(1)
    for _ in range(2):  # the second step shows the momentum and Nesterov terms
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        optimizer.step()
        for n in muon_names:  # B <- mu B + G;  Nesterov: G + mu B;  W <- W(1 - lr wd) - lr sqrt(max(1, rows/cols)) NS(.)
            g = grads[n].double()
            buffers[n] = momentum * buffers.get(n, 0) + g
            rows, cols = g.shape
            update = reference_newton_schulz(g + momentum * buffers[n]) * math.sqrt(max(1, rows / cols))
            expected[n] = expected[n] * (1 - muon_lr * weight_decay) - muon_lr * update
    for n in muon_names:
        moved, want = (dict(model.named_parameters())[n].double() - start[n]), expected[n] - start[n]
        # Newton-Schulz runs in float32 on a CPU: float64's result to rounding (the shape scaling is sqrt(3)
        # for c_attn and c_fc; dropping Nesterov changes the direction)
        assert (moved - want).abs().max() < 1e-4 * want.abs().max(), n
    reference = torch.optim.AdamW([start["wte.weight"].float().clone().requires_grad_()], lr=lr, betas=(0.9, 0.95),
                                  weight_decay=weight_decay)
    torch.manual_seed(1)
    for _ in range(2):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        reference.param_groups[0]["params"][0].grad = grads["wte.weight"]
        reference.step()
    torch.testing.assert_close(model.wte.weight.detach(), reference.param_groups[0]["params"][0].detach())


def test_newton_schulz_gives_the_polar_factor_within_the_iterations_band():
    torch.manual_seed(0)
    for rows, cols in ((64, 64), (96, 32), (32, 96)):
        k = min(rows, cols)
        u, _ = torch.linalg.qr(torch.randn(rows, k, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(cols, k, dtype=torch.float64))
        singular = torch.logspace(-1.3, 0, k, dtype=torch.float64)  # condition number 20
        g = u @ torch.diag(singular) @ v.T
        ortho = newton_schulz(g.float(), NS_COEFFICIENTS, 5, 1e-7).double()
        in_basis = u.T @ ortho @ v  # U S' V^T: diagonal in G's singular vectors
        diagonal = in_basis.diagonal()
        # five steps of this quintic leave singular values in about [0.68, 1.2], not at 1 (bfloat16 adds ~0.01)
        assert diagonal.min() > 0.65 and diagonal.max() < 1.25
        assert (in_basis - torch.diag(diagonal)).abs().max() < 0.05
        assert torch.linalg.matrix_norm(ortho - u @ v.T, 2) < 0.36
        torch.testing.assert_close(ortho, reference_newton_schulz(g), atol=0.03, rtol=0)


def test_newton_schulz_in_bfloat16_is_torch_muons_and_float32_stays_within_the_iterations_band():
    # the update of a step with lr 1, no momentum or decay, on a square matrix, is -NS(G): in bfloat16 (the
    # GPU's choice) newton_schulz must give torch's result exactly; float32 (the CPU's) differs from it by
    # no more than bfloat16's rounding moves singular values inside the band (about 0.01 of each)
    torch.manual_seed(0)
    g = torch.randn(48, 48)
    weight = torch.nn.Parameter(torch.zeros(48, 48))
    weight.grad = g.clone()
    torch.optim.Muon([weight], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False).step()
    in_bfloat16 = newton_schulz(g, NS_COEFFICIENTS, 5, 1e-7, dtype=torch.bfloat16)
    torch.testing.assert_close(-weight.detach(), in_bfloat16.float(), atol=0, rtol=0)
    in_float32 = newton_schulz(g, NS_COEFFICIENTS, 5, 1e-7)
    assert in_float32.dtype == torch.float32
    assert 0 < (in_float32 - in_bfloat16.float()).abs().max() < 0.03


def test_a_cpu_muon_step_runs_no_bfloat16_matrix_product():
    # torch.optim.Muon casts to bfloat16, which an AVX2 CPU runs 20x slower than float32: the step must not
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                       torch.ops.aten.matmul):
                self.seen.append(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    model = tiny_gpt()
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with MatmulDtypes() as recorded:
        optimizer.step()
    assert len(recorded.seen) >= 2 * 5 * len(optimizer.muon.param_groups[0]["params"])  # 2 per iteration per matrix
    assert set(recorded.seen) == {torch.float32}


def test_muon_optimizer_state_round_trips_through_a_state_dict():
    model = tiny_gpt()
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    copy = tiny_gpt()
    copy.load_state_dict(model.state_dict())
    restored = make_optimizer(copy, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon")
    saved = io.BytesIO()  # through a file's bytes, as a checkpoint: loading a live state dict would share its tensors
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    assert isinstance(restored, MuonWithAdamW) and restored.muon.state is restored.state
    for opt, m in ((optimizer, model), (restored, copy)):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
        opt.step()
    assert_same_weights(copy.state_dict(), model.state_dict(), atol=0)


@pytest.fixture(scope="module")
def one_process_muon_run(tiny_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("muon_single")
    train(tiny_data_root, out, *FAST, "--max_iters=4", "--optimizer=muon")
    return out


def test_muon_on_fsdp_shards_steps_exactly_like_muon_on_whole_matrices(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(REPO, "tests", "muon_worker.py"), str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    model = tiny_model()
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon", muon_lr=0.05)
    for step in range(2):
        for name, grad in full_gradients(model, step).items():
            dict(model.named_parameters())[name].grad = grad
        optimizer.step()
    # the same gradients give the same bits: each process orthogonalised the whole gathered matrix
    assert_same_weights(torch.load(tmp_path / "fsdp.pt", weights_only=True), dict(model.named_parameters()), atol=0)


# DDP and pipeline stages see the gradients of one process bit for bit. FSDP's reduce-scatter adds in
# another order, and Newton-Schulz in bfloat16 turns those last-bit differences into bfloat16 roundings
# of the update: after 4 steps up to 1.3e-3 measured, for weights that moved ~5e-2.
@pytest.mark.parametrize("layout, atol", [("--parallelism=ddp", 1e-5), ("--pipeline_stages=2", 1e-5),
                                          ("--parallelism=fsdp", 5e-3)])
def test_muon_in_two_processes_ends_with_the_weights_of_one_process(layout, atol, one_process_muon_run,
                                                                    tiny_data_root, tmp_path):
    stdout = train(tiny_data_root, tmp_path, *FAST, "--max_iters=4", "--optimizer=muon", layout, nproc=2)
    assert "x 2 processes" in stdout
    assert_same_weights(weights(tmp_path), weights(one_process_muon_run), atol=atol)
    assert losses(tmp_path).keys() == losses(one_process_muon_run).keys()


def test_a_resumed_muon_run_gives_the_losses_of_an_uninterrupted_one(tiny_data_root, tmp_path):
    args = ["--optimizer=muon", "--lr_schedule=wsd", *FAST, "--max_iters=4", "--init_from=auto"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(tiny_data_root, whole, *args)
    resumed.mkdir()
    (resumed / "ckpt-0000002.pt").hardlink_to(whole / "ckpt-0000002.pt")
    assert "at step 2" in train(tiny_data_root, resumed, *args)
    assert losses(resumed) == {s: l for s, l in losses(whole).items() if s > 2}


def test_a_run_resumed_with_another_optimizer_stops_with_one_line(tiny_data_root, tmp_path):
    train(tiny_data_root, tmp_path, *FAST, "--max_iters=2")
    result = run_script("train.py", *TINY_MODEL, f"--data_root={tiny_data_root}", "--dataset=tiny",
                        f"--out_dir={tmp_path}", "--init_from=resume", "--optimizer=muon", check=False)
    assert result.returncode != 0 and "trained with optimizer='adamw'" in result.stderr
    assert "Traceback" not in result.stderr


def test_wsd_warms_up_holds_then_decays_over_the_last_fraction():
    lr = lambda s, shape="linear": learning_rate_at(s, 1.0, 10, 100, 0.1, "wsd", 0.2, shape)
    assert math.isclose(lr(0), 0.1) and math.isclose(lr(9), 1.0)
    assert all(lr(s) == 1.0 for s in range(10, 81))  # decay starts at 100 - 0.2 * 100
    assert math.isclose(lr(90), 0.55) and math.isclose(lr(100), 0.1) and lr(150) == 0.1
    assert math.isclose(lr(85, "1-sqrt"), 0.1 + 0.9 * (1 - math.sqrt(0.25)))
    assert lr(85, "1-sqrt") < lr(85) and all(lr(s) >= lr(s + 1) for s in range(80, 110))
    with pytest.raises(SystemExit, match="lr_schedule='step'"):
        learning_rate_at(50, 1.0, 10, 100, 0.1, "step")


def test_relu2_mlp_is_relu_squared_with_4x_hidden():
    model = tiny_gpt(mlp="relu2")
    mlp = model.blocks[0].mlp
    assert mlp.c_fc.weight.shape == (128, 32)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))


def test_zero_initialised_projections_make_every_block_the_identity_and_still_learn():
    model = tiny_gpt(zero_init_proj=True)
    x = torch.randn(2, 8, 32)
    for block in model.blocks:
        assert torch.equal(block(x, (model.rope_cos[:8], model.rope_sin[:8])), x)
    idx = torch.randint(0, 64, (2, 8))
    model(idx, idx)[1].backward()
    assert model.blocks[0].mlp.c_proj.weight.grad.abs().sum() > 0 and model.blocks[0].attn.c_proj.weight.grad.abs().sum() > 0
    # the other weights are drawn exactly as without the option
    assert torch.equal(model.blocks[0].attn.c_attn.weight, tiny_gpt().blocks[0].attn.c_attn.weight)


def test_logit_softcap_bounds_the_logits_by_tanh():
    capped, plain = tiny_gpt(logit_softcap=2.0), tiny_gpt()
    with torch.no_grad():
        plain.lm_head.weight.mul_(100)  # logits far beyond the cap
        capped.lm_head.weight.copy_(plain.lm_head.weight)
    idx = torch.randint(0, 64, (2, 8))
    raw, capped_logits = plain(idx, all_logits=True)[0], capped(idx, all_logits=True)[0]
    assert raw.abs().max() > 10 and capped_logits.abs().max() <= 2.0  # tanh rounds to 1 in float32 far out
    torch.testing.assert_close(capped_logits, 2.0 * torch.tanh(raw / 2.0))


def test_sinusoidal_positions_are_the_original_transformers_and_not_learned():
    model = tiny_gpt(pos="sinusoidal")
    table = model.sinusoidal_pos.double()
    for pos in (0, 3, 15):
        for i in (0, 5, 15):  # channel i holds sin(pos / 10000^(2i/d)), channel 16 + i its cosine
            angle = pos / 10000 ** (2 * i / 32)
            assert math.isclose(table[pos, i], math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[pos, 16 + i], math.cos(angle), abs_tol=1e-6)
    assert "sinusoidal_pos" not in model.state_dict() and model.wpe is None
    same_token = torch.full((1, 8), 7)
    logits = model(same_token, all_logits=True)[0]
    assert not torch.allclose(logits[0, 1], logits[0, 5])  # positions tell equal tokens apart


@pytest.mark.parametrize("option", [dict(mlp="relu2"), dict(pos="sinusoidal"), dict(logit_softcap=15.0)])
def test_export_refuses_options_hugging_face_cannot_express(option):
    with pytest.raises(SystemExit, match=f"export error: {next(iter(option))}="):
        architecture_of(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, **option))
