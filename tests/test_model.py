"""
Tests for model.py: attention, RoPE, the KV cache, sampling, parameter and FLOP counts.

    python -m pytest tests/test_model.py -q

Tiny models on CPU; the whole file runs in seconds. Where a behaviour has an independent
definition (a float64 computation written out by hand, torch.nn.functional, a complex-number
rotation), the model is compared against it.
"""

import dataclasses
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from torch.nn.attention.flex_attention import create_block_mask

from conftest import GPT2, LLAMA, TINY, tiny_gpt
from decoding import sample_next_token
from model import GPT, GPTConfig, apply_rope, dense_mask, document_mask, rope_tables

# Two families model.py covers (Llama's, GPT-2's), as small as they go; tests override what they need.
STYLES = {"modern": LLAMA, "gpt2": GPT2}


# Where the GPU paths (FlexAttention, CUDA graphs) are tested when there is a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def tiny_config(style, **overrides):
    return GPTConfig(**{**TINY, "n_head": 4, **STYLES[style], **overrides})


def tiny_model(style, seed=0, sharpen=True, **overrides):
    """A tiny model in eval mode; sharpen: larger random weights than the 0.02 init (conftest.tiny_gpt)."""
    return tiny_gpt(seed, 0.3 if sharpen else 0.0, **{"n_head": 4, **STYLES[style], **overrides})


# ---------------------------------------------------------------------------------------------
# Independent references

def rope_reference(x, positions, theta):
    """Rotate each pair (x[i], x[i + d/2]) by the angle position * theta^(-2i/d), as a complex
    multiplication in float64. x is (..., T, d); positions is (T,)."""
    x = x.double()
    d = x.size(-1)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    freqs = theta ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * freqs[None, :]
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


def linear_reference(layer, x):
    out = x @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


def norm_reference(module, config, x):
    """RMSNorm or LayerNorm over the last dimension, in float64."""
    if config.norm == "rmsnorm":
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps)
    else:
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + config.norm_eps)
    x = x * module.weight.double()
    return x if getattr(module, "bias", None) is None else x + module.bias.double()


def attention_reference(attn, config, x):
    """Causal self-attention of module `attn` on x (B, T, C), written out in float64: explicit
    q/k/v slices of c_attn, optional per-head norm of q and k, RoPE by complex rotation, each
    key/value head repeated for its group of query heads, masked softmax of q.k^T/sqrt(d)."""
    x = x.double()
    B, T, C = x.shape
    H, Hkv, d = config.n_head, config.n_kv_head, config.head_dim
    qkv = linear_reference(attn.c_attn, x)
    q = qkv[..., : H * d].reshape(B, T, H, d)
    k = qkv[..., H * d : (H + Hkv) * d].reshape(B, T, Hkv, d)
    v = qkv[..., (H + Hkv) * d :].reshape(B, T, Hkv, d)
    if config.qk_norm:
        q, k = norm_reference(attn.q_norm, config, q), norm_reference(attn.k_norm, config, k)
    if config.pos == "rope":
        positions = torch.arange(T)
        q = rope_reference(q.transpose(1, 2), positions, config.rope_theta).transpose(1, 2)
        k = rope_reference(k.transpose(1, 2), positions, config.rope_theta).transpose(1, 2)
    group = H // Hkv
    k = torch.stack([k[:, :, h // group] for h in range(H)], dim=2)  # query head h reads kv head h // group
    v = torch.stack([v[:, :, h // group] for h in range(H)], dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    scores = scores.masked_fill(future, -math.inf)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    y = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(B, T, H * d)
    return linear_reference(attn.c_proj, y)


def mlp_reference(mlp, config, x):
    h = linear_reference(mlp.c_fc, x)
    if config.mlp == "swiglu":
        gate, up = h[..., : config.ffn_hidden], h[..., config.ffn_hidden :]
        h = gate / (1 + torch.exp(-gate)) * up
    else:  # GPT-2's tanh approximation of GELU
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return linear_reference(mlp.c_proj, h)


def forward_reference(model, idx):
    """All-position logits of a pre-norm Transformer with model's weights, in float64."""
    c = model.config
    x = model.wte.weight.double()[idx]
    if c.pos == "learned":
        x = x + model.wpe.weight.double()[: idx.size(1)]
    for block in model.blocks:
        x = x + attention_reference(block.attn, c, norm_reference(block.ln_1, c, x))
        x = x + mlp_reference(block.mlp, c, norm_reference(block.ln_2, c, x))
    return linear_reference(model.lm_head, norm_reference(model.ln_f, c, x))


# ---------------------------------------------------------------------------------------------
# Attention and positions

@pytest.mark.parametrize("style", STYLES)
def test_logits_at_earlier_positions_do_not_depend_on_later_tokens(style):
    model = tiny_model(style)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, _ = model(idx, all_logits=True)
        for t in (0, 5, 15):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 64
            after, _ = model(changed, all_logits=True)
            torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
            assert (after[:, t] - before[:, t]).abs().max() > 1e-3  # the change itself is seen


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("style,qk_norm", [("modern", False), ("modern", True), ("gpt2", False)],
                         ids=["modern", "modern-qk_norm", "gpt2"])
def test_attention_equals_float64_masked_softmax_with_kv_heads_repeated_per_group(style, qk_norm, n_kv_head):
    model = tiny_model(style, n_kv_head=n_kv_head, qk_norm=qk_norm).double()
    config, attn = model.config, model.blocks[0].attn
    x = torch.randn(2, 16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rope = (model.rope_cos[:16], model.rope_sin[:16]) if config.pos == "rope" else None
    with torch.no_grad():
        got = attn(x, rope)
    # apply_rope works in float32 whatever the input dtype, hence the float32-sized tolerance.
    torch.testing.assert_close(got, attention_reference(attn, config, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_without_gradients_computes_what_the_one_fused_product_computes(bias):
    # Without gradients the MLP takes gate and up as two products on c_fc's halves: the same logits as
    # the training path's one product, and the same gradients where they are needed (not swapped halves).
    model = tiny_gpt(spread=0.5, mlp="swiglu", bias=bias)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with_gradients, _ = model(idx, all_logits=True)
    with torch.no_grad():
        without, _ = model(idx, all_logits=True)
    torch.testing.assert_close(without, with_gradients.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("style,overrides", [("modern", dict(n_kv_head=2, qk_norm=True)), ("gpt2", dict())])
def test_forward_equals_float64_reference_transformer(style, overrides):
    model = tiny_model(style, **overrides)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        logits, _ = model(idx, all_logits=True)
    torch.testing.assert_close(logits.double(), forward_reference(model, idx), rtol=1e-4, atol=1e-4)


def test_apply_rope_rotates_channel_pairs_like_complex_multiplication():
    config = GPTConfig(n_head=2, n_embd=32, block_size=64, rope_theta=500.0)
    cos, sin = rope_tables(config, 64)
    x = torch.randn(2, 2, 64, 16, generator=torch.Generator().manual_seed(3))
    expected = rope_reference(x, torch.arange(64), config.rope_theta)
    torch.testing.assert_close(apply_rope(x, cos, sin).double(), expected, rtol=1e-5, atol=2e-5)


def test_rope_attention_score_depends_only_on_relative_position():
    config = GPTConfig(n_head=1, n_embd=16, block_size=64)
    cos, sin = rope_tables(config, 64)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, 1, 16, generator=g).expand(1, 1, 64, 16)  # the same vector at every position
    k = torch.randn(1, 1, 1, 16, generator=g).expand(1, 1, 64, 16)
    scores = (apply_rope(q, cos, sin)[0, 0] @ apply_rope(k, cos, sin)[0, 0].T).double()  # (64, 64): q_i . k_j
    for i, j in [(3, 0), (10, 10), (7, 20), (40, 1)]:
        for s in (1, 9, 23):
            assert scores[i + s, j + s].item() == pytest.approx(scores[i, j].item(), abs=1e-4)
    assert (scores[10, 0] - scores[10, 5]).abs() > 1e-2  # and it does depend on the distance


# ---------------------------------------------------------------------------------------------
# KV cache

def greedy_reference(model, prompts, new):
    """Greedy decoding written out without a cache: every step runs each prompt's last block_size
    tokens from position 0, alone. The new tokens of each prompt."""
    block_size = model.config.block_size
    out = []
    with torch.no_grad():
        for ids in prompts:
            for _ in range(new):
                logits, _ = model(ids[None, -block_size:])
                ids = torch.cat((ids, logits[0, -1].argmax(-1, keepdim=True)))
            out.append(ids[-new:])
    return out


def left_padded(prompts, seed=9):
    """The prompts right-aligned in one (B, T) batch behind pad tokens of random ids (the ids must
    not matter), and pad (B,): how many each row starts with."""
    width = max(len(p) for p in prompts)
    filler = torch.randint(0, 64, (len(prompts), width), generator=torch.Generator().manual_seed(seed))
    pad = torch.tensor([width - len(p) for p in prompts])
    idx = torch.stack([torch.cat((filler[r, : pad[r]], p)) for r, p in enumerate(prompts)])
    return idx, pad


def random_prompts(lengths, seed=10):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("prompts", [[5, 5, 5], [2, 9, 5, 1]], ids=["same-length", "left-padded"])
@pytest.mark.parametrize("style,n_kv_head", [("modern", 4), ("modern", 2), ("modern", 1), ("gpt2", 4)],
                         ids=["modern-mha", "modern-gqa", "modern-mqa", "gpt2-learned-pos"])
def test_cached_greedy_generation_equals_recomputing_each_prompt_alone_also_past_block_size(style, n_kv_head,
                                                                                          prompts):
    # 1 to 9 tokens and a 16-token context: the context fills up and then slides, and for a while a short
    # prompt's window still holds some, not all, of its row's pad tokens.
    model = tiny_model(style, n_kv_head=n_kv_head)
    prompts = random_prompts(prompts)
    idx, pad = left_padded(prompts)
    new = 2 * model.config.block_size
    out = model.generate(idx, new, temperature=0.0, pad=pad)
    assert out.shape == (len(prompts), idx.size(1) + new) and torch.equal(out[:, : idx.size(1)], idx)
    expected = greedy_reference(model, prompts, new)
    assert len({tuple(e.tolist()) for e in expected}) == len(prompts)  # rows differ, so the match means something
    assert len(set(torch.cat(expected).tolist())) > 5  # greedy output varies by position too
    for r in range(len(prompts)):
        assert torch.equal(out[r, idx.size(1) :], expected[r]), r


@pytest.mark.parametrize("style", STYLES)
def test_decoding_steps_at_a_position_per_row_give_the_full_forward_logits_and_ignore_later_cache_slots(style):
    # Rows at different positions in one step, attending over the shortest cache prefix that holds them;
    # the slots after a row's position hold large noise (an earlier, longer sequence's keys), which the
    # mask must hide.
    model = tiny_model(style, n_kv_head=2)
    block_size = model.config.block_size
    idx = torch.randint(0, 64, (2, block_size), generator=torch.Generator().manual_seed(6))
    starts = [4, 7]
    with torch.no_grad():
        full, _ = model(idx, all_logits=True)
        cache = [{name: 10 * torch.randn(2, 2, block_size, model.config.head_dim) for name in ("k", "v")}
                 for _ in model.blocks]
        for row, start in enumerate(starts):
            layers = [{} for _ in model.blocks]
            prefix, _ = model(idx[row : row + 1, :start], all_logits=True, cache=layers)
            torch.testing.assert_close(prefix[0], full[row, :start], rtol=1e-5, atol=1e-5)
            for layer, new in zip(cache, layers):
                for name in ("k", "v"):
                    layer[name][row, :, :start] = new[name][0]
        for step in range(block_size - max(starts)):
            pos = torch.tensor(starts) + step
            logits, _ = model(idx[torch.arange(2), pos][:, None], cache=cache, pos=pos, keys=int(pos.max()) + 1)
            torch.testing.assert_close(logits[:, 0], full[torch.arange(2), pos], rtol=1e-5, atol=1e-5)


def test_a_decoding_step_without_a_position_tensor_or_of_more_than_one_token_is_refused():
    model = tiny_model("modern")
    cache = [{} for _ in model.blocks]
    for tokens, pos in [(1, 4), (3, torch.tensor([4]))]:
        with pytest.raises(ValueError, match="a decoding step is one token per row"):
            model(torch.zeros(1, tokens, dtype=torch.long), cache=cache, pos=pos)


def test_a_packed_token_sees_the_earlier_tokens_of_its_own_example_only():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [-1, -1, 3, 3, 3, 3, -1, -1]])  # runs of equal ids
    positions, mask_mod = document_mask(doc_ids)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 0, 1]]
    mask = dense_mask(mask_mod, 2, torch.arange(8), 8)
    starts = [[0, 0, 0, 3, 3, 5, 5, 5], [0, 0, 2, 2, 2, 2, 6, 6]]  # each token's run starts here
    for b in range(2):
        for q in range(8):
            assert mask[b, 0, q].tolist() == [starts[b][q] <= k <= q for k in range(8)], (b, q)


@pytest.mark.parametrize("device", DEVICES)
def test_flex_attention_gives_the_dense_mask_outputs_and_gradients(device):
    # The same mask function, materialised as a BlockMask for the compiled flex kernel or as a dense
    # boolean mask for SDPA, through the model as its forward runs it. Two blocks of 128 positions, so
    # that whole blocks are skipped.
    model = tiny_model("modern", n_kv_head=2, block_size=256, n_layer=1).to(device)
    g = torch.Generator().manual_seed(15)
    idx = torch.randint(0, 64, (2, 256), generator=g).to(device)
    positions, mask_mod = document_mask(torch.tensor([[0] * 100 + [1] * 150 + [2] * 6, [0] * 20 + [1] * 236]).to(device))
    rope = (model.rope_cos[positions][:, None], model.rope_sin[positions][:, None])
    masks = {True: create_block_mask(mask_mod, 2, None, 256, 256, device=device),
             False: dense_mask(mask_mod, 2, torch.arange(256, device=device), 256)}
    results = {}
    for flex, mask in masks.items():
        model.zero_grad()
        with torch.set_grad_enabled(device != "cpu"):  # torch 2.11-2.14 have no flex backward on CPU
            x = model.wte(idx)
            for block in model.blocks:
                x = block(x, rope, mask=mask)
            logits = model.lm_head(model.ln_f(x))
        if logits.requires_grad:
            logits.square().mean().backward()
        results[flex] = logits, [p.grad for p in model.parameters()]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for flex_grad, dense_grad in zip(results[True][1], results[False][1]):
        if device != "cpu":
            torch.testing.assert_close(flex_grad, dense_grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Loss

@pytest.mark.parametrize("vocab_size", [512, 65], ids=["multiple-of-64", "padded-to-128"])
@pytest.mark.parametrize("style", STYLES)
def test_loss_at_init_is_close_to_log_vocab_size(style, vocab_size):
    # 65 ids are padded to 128: a loss counting the padding would start at ln 128, not ln 65.
    torch.manual_seed(0)
    model = GPT(tiny_config(style, vocab_size=vocab_size, block_size=32, n_embd=64)).eval()
    idx, targets = torch.randint(0, vocab_size, (2, 8, 32)).unbind(0)
    with torch.no_grad():
        logits, loss = model(idx, targets)
    assert logits.size(-1) == vocab_size  # so DPO's and evaluation's log-probabilities leave the padding out too
    assert loss.item() == pytest.approx(math.log(vocab_size), abs=0.15)


@pytest.mark.parametrize("style", STYLES)
def test_loss_ignores_targets_of_minus_one(style):
    model = tiny_model(style)
    g = torch.Generator().manual_seed(8)
    idx, targets = torch.randint(0, 64, (2, 3, 16), generator=g).unbind(0)
    targets[0, :7] = -1
    targets[2, 10:] = -1
    with torch.no_grad():
        logits, loss = model(idx, targets)
    keep = targets != -1
    log_probs = logits.double()[keep].log_softmax(-1)
    expected = -log_probs.gather(1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[keep], targets[keep]).item(), rel=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_tiny_model_overfits_one_batch(style):
    torch.manual_seed(0)
    model = GPT(tiny_config(style, n_embd=64))
    idx, targets = torch.randint(0, 64, (2, 4, 16)).unbind(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    _, first = model(idx, targets)
    for _ in range(80):
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert first.item() > 4.0
    assert loss.item() < 0.1


# ---------------------------------------------------------------------------------------------
# Sampling

def padding_loving_model():
    """vocab_size 70 (padded to 128) with weights rigged so that every padding id has logit 32
    and every real id logit 0: without masking, sampling would almost always pick padding."""
    model = tiny_model("gpt2", vocab_size=70, sharpen=False)
    assert model.config.padded_vocab_size == 128
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)  # the final hidden state is all ones
        model.lm_head.weight.zero_()
        model.lm_head.weight[70:] = 1.0
    return model


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (1.0, 5, None), (1.0, None, 0.9),
                                                      (2.0, None, None), (0.0, None, None)])
def test_padded_vocabulary_ids_are_never_sampled(temperature, top_k, top_p):
    model = padding_loving_model()
    prompt = torch.zeros(64, 1, dtype=torch.long)
    with torch.no_grad():
        rigged = model.lm_head(model.ln_f(torch.zeros(model.config.n_embd)))  # every padded row, unsliced
    assert rigged[70:].min() > rigged[:70].max() + 10  # the rig works
    torch.manual_seed(9)
    out = model.generate(prompt, 20, temperature=temperature, top_k=top_k, top_p=top_p)
    assert out.max().item() < 70


def test_top_k_of_one_is_greedy():
    logits = 3.0 * torch.randn(256, 100, generator=torch.Generator().manual_seed(10))
    torch.manual_seed(11)
    sampled = sample_next_token(logits.clone(), temperature=1.0, top_k=1, top_p=None)
    assert torch.equal(sampled[:, 0], logits.argmax(-1))


# Hand-made distribution over 4 real ids, deliberately not sorted: probability 0.1, 0.5, 0.15, 0.25.
PROBS = [0.1, 0.5, 0.15, 0.25]


def sample_counts(top_k, top_p, temperature=1.0, draws=4000):
    """How often each of the 4 ids of PROBS is drawn."""
    logits = torch.tensor(PROBS).log().expand(draws, 4)
    torch.manual_seed(12)
    return torch.bincount(sample_next_token(logits, temperature, top_k, top_p)[:, 0], minlength=4)


def assert_drawn_from(counts, kept, probs=PROBS):
    """Exactly the ids in kept appear, each as often as its probability renormalised over kept."""
    assert set(torch.nonzero(counts)[:, 0].tolist()) == kept
    mass = sum(probs[i] for i in kept)
    for i in kept:
        assert counts[i].item() / counts.sum().item() == pytest.approx(probs[i] / mass, abs=0.04)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_samples_from_softmax_of_logits_over_temperature(temperature):
    tempered = [p ** (1 / temperature) for p in PROBS]  # softmax(log p / T) is p^(1/T), renormalised
    assert_drawn_from(sample_counts(None, None, temperature), {0, 1, 2, 3}, tempered)


@pytest.mark.parametrize("temperature, top_p", [(1e-300, None), (5e-324, None), (1.0, 1e-50)])
def test_a_temperature_or_top_p_too_small_for_float32_draws_the_most_likely_id(temperature, top_p):
    # both were 0 in float32: NaN probabilities, and multinomial raised
    assert_drawn_from(sample_counts(None, top_p, temperature), {1})


@pytest.mark.parametrize("top_k,kept", [(2, {1, 3}), (3, {1, 3, 2})])
def test_top_k_samples_only_from_the_k_most_likely_ids(top_k, kept):
    assert_drawn_from(sample_counts(top_k, None), kept)


@pytest.mark.parametrize("top_p,nucleus", [(0.3, {1}), (0.7, {1, 3}), (0.8, {1, 3, 2}), (0.95, {0, 1, 2, 3})])
def test_top_p_samples_only_from_the_smallest_set_reaching_p(top_p, nucleus):
    assert_drawn_from(sample_counts(None, top_p), nucleus)


def test_generation_stops_once_every_row_has_produced_a_stop_token():
    model = tiny_model("modern")
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(13))
    free = model.generate(prompt, 20, temperature=0.0)[:, 4:]  # greedy, no stop tokens
    stop = {free[0, 2].item(), free[1, 6].item(), free[2, 4].item()}
    # Where each row first produces any stop token; rows are independent, so a finished row
    # repeating its stop token does not change the others.
    first = [next(t for t in range(20) if free[r, t].item() in stop) for r in range(3)]
    assert max(first) > min(first)  # rows finish at different steps
    length = max(first) + 1
    expected = free[:, :length].clone()
    for r in range(3):
        expected[r, first[r] :] = free[r, first[r]]
    out = model.generate(prompt, 20, temperature=0.0, stop_tokens=stop)  # looks at the rows every 16 tokens
    assert torch.equal(out[:, :4], prompt)
    assert torch.equal(out[:, 4:], expected)
    streamed = list(model.generate_stream(prompt, 20, temperature=0.0, stop_tokens=stop))  # at every token
    assert torch.equal(torch.cat(streamed, dim=1), expected)


# ---------------------------------------------------------------------------------------------
# Sizes, FLOPs and configs

def test_the_defaults_are_train_py_s_and_a_config_from_before_an_option_existed_has_it_off():
    from configurator import defaults_only
    with defaults_only() as train_py:
        import train  # noqa: F401  (ends at train.py's configure() call)
    fields = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"}
    assert fields == {k: train_py[k] for k in fields}
    old = {k: v for k, v in asdict(GPTConfig(**LLAMA)).items() if k not in ("logit_softcap", "zero_init_proj")}
    assert GPTConfig.from_dict(old) == GPTConfig(**LLAMA)  # a checkpoint written before the two existed


def test_gpt2_preset_has_124M_parameters_and_a_vocabulary_padded_to_50304():
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(GPTConfig(**STYLES["gpt2"]))
    assert model.config.vocab_size == 50257
    assert model.num_params() == 124_439_808
    assert model.wte.weight.shape == (50304, 768)
    assert model.lm_head.weight is model.wte.weight


def non_embedding_params_by_hand(c):
    """Every weight but the lookup tables (token and learned position embeddings); the output
    layer counts, for the real vocabulary only (with tied embeddings it is the token table)."""
    C, d, b = c.n_embd, c.head_dim, int(c.bias)
    norm = C * (1 + b) if c.norm == "layernorm" else C  # LayerNorm's bias follows config.bias
    attn = C * (c.n_head + 2 * c.n_kv_head) * d + b * (c.n_head + 2 * c.n_kv_head) * d + C * C + b * C
    up = 2 * c.ffn_hidden if c.mlp == "swiglu" else c.ffn_hidden
    mlp = C * up + b * up + c.ffn_hidden * C + b * C
    return c.n_layer * (2 * norm + attn + mlp) + norm + c.vocab_size * C


@pytest.mark.parametrize("style,overrides", [("modern", dict(n_kv_head=2)), ("gpt2", dict())])
def test_flops_per_token_is_6N_plus_attention(style, overrides):
    config = tiny_config(style, vocab_size=100, n_layer=3, **overrides)
    model = GPT(config)
    N = non_embedding_params_by_hand(config)
    assert model.num_params(non_embedding=True) == N
    for T in (16, 7):
        assert model.flops_per_token(T) == 6 * N + 12 * config.n_layer * config.n_embd * T


@pytest.mark.parametrize("overrides", [
    dict(n_head=6, n_kv_head=4, n_embd=48),
    dict(n_head=4, n_kv_head=8),
    dict(norm="batchnorm"),
    dict(mlp="relu"),
    dict(pos="alibi"),
    dict(n_head=5, n_embd=32),
    dict(n_head=4, n_embd=12),  # head size 3: RoPE needs it even
], ids=["kv-not-dividing", "kv-more-than-heads", "norm", "mlp", "pos", "embd-not-dividing", "odd-rope-head"])
def test_invalid_config_raises_value_error(overrides):
    d = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)
    d.update(overrides)
    with pytest.raises(ValueError):
        GPTConfig(**d)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(tiny_config("modern"))
    idx = torch.randint(0, 64, (2, 16))

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    model.activation_checkpointing = True
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert torch.equal(plain_loss, ckpt_loss)
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
