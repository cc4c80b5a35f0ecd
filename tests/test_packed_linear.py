"""
Tests for packed_linear.py: decoding on a CPU multiplies every linear layer through oneDNN on packed
copies of the weights, as accurately as F.linear, only inside a Decoder's calls, and never on the
weights of an earlier decoder.

    python -m pytest -q tests/test_packed_linear.py
"""

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as model_module
import packed_linear
from decoding import Decoder
from test_model import greedy_reference, random_prompts, tiny_model

needs_onednn = pytest.mark.skipif(not packed_linear.works(), reason="this torch's oneDNN has no packed linear")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_product_is_within_float32s_rounding_bound_of_float64_and_is_packed_once(bias):
    torch.manual_seed(0)
    layer = nn.Linear(768, 80, bias=bias)
    x = torch.randn(5, 3, 768)[:, -2:]  # a view, as the last position's hidden states are
    sizes = [16, 32, 32]
    weight, b = layer.weight.double(), None if layer.bias is None else layer.bias.double()
    exact = F.linear(x.double(), weight, b)
    # Any order of summing 768 float32 products errs by at most 768 * 2^-24 times the sum of their magnitudes
    # (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), the bias's own rounding added.
    bound = (769 * 2.0**-24) * (F.linear(x.double().abs(), weight.abs(), None if b is None else b.abs()))
    store = {}
    with torch.no_grad(), packed_linear.weights(store):
        parts = model_module.linear_parts(layer, x, sizes)
        again = model_module.linear_parts(layer, x, sizes)
    assert [p.shape for p in parts] == [(5, 2, n) for n in sizes]
    error = (torch.cat(parts, dim=-1).double() - exact).abs()
    assert (error <= bound).all(), (error / bound).max()
    assert error.max() > 0  # float32 really ran, not a float64 copy
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert list(store) == [(layer.weight, tuple(sizes))] and len(store[layer.weight, tuple(sizes)]) == 3


@needs_onednn
def test_nothing_is_packed_outside_weights_under_gradients_or_in_bfloat16():
    layer, x, store = nn.Linear(32, 48), torch.randn(4, 32), {}
    with torch.no_grad():
        assert packed_linear.parts(layer.weight, [48], x) is None  # outside weights()
        with packed_linear.weights(store):
            assert packed_linear.parts(layer.weight, [48], x.bfloat16()) is None
            with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 x, but the product is autocast's
                assert packed_linear.parts(layer.weight, [48], x) is None
                assert model_module.linear(layer, x).dtype == torch.bfloat16
    with packed_linear.weights(store):
        assert packed_linear.parts(layer.weight, [48], x) is None  # gradients on: training
    assert store == {}


def test_weights_restores_the_outer_store_and_another_thread_sees_none_of_it():
    outer, inner, seen = {}, {}, []
    with packed_linear.weights(outer):
        with packed_linear.weights(inner):
            assert packed_linear._local.store is inner
            thread = threading.Thread(target=lambda: seen.append(getattr(packed_linear._local, "store", None)))
            thread.start()
            thread.join()
        assert packed_linear._local.store is outer
    assert packed_linear._local.store is None and seen == [None]


def count_packed_products(monkeypatch):
    calls = []
    multiply = packed_linear.multiply
    monkeypatch.setattr(packed_linear, "multiply", lambda *args: calls.append(1) or multiply(*args))
    return calls


# Products per block: q, k, v, the output projection, then SwiGLU gate, up and down, or GELU up and down.
@needs_onednn
@pytest.mark.parametrize("style,products", [("modern", 7), ("gpt2", 6)])
def test_a_decoder_on_a_cpu_runs_every_linear_layer_packed_and_a_plain_forward_none(style, products, monkeypatch):
    model = tiny_model(style)
    calls = count_packed_products(monkeypatch)
    decoder = Decoder(model, slots=2)
    decoder.prefill(random_prompts([5, 5]), temperature=0.0)
    decoder.step()  # the prefill's logits: no forward
    assert len(calls) == products * model.config.n_layer + 1  # and the output layer
    decoder.step()
    assert len(calls) == 2 * (products * model.config.n_layer + 1)
    assert len(decoder.packed) == 4 * model.config.n_layer + 1  # each weight packed once: 4 a block
    with torch.no_grad():
        model(random_prompts([5])[0][None])
    assert len(calls) == 2 * (products * model.config.n_layer + 1)


@pytest.mark.parametrize("style", ["modern", "gpt2"])
def test_packed_decoding_gives_the_tokens_and_logits_of_unpacked_decoding(style, monkeypatch):
    model, prompts = tiny_model(style), random_prompts([3, 7, 7])

    def decode():
        decoder = Decoder(model, slots=3)
        decoder.prefill(prompts, temperature=0.0)
        tokens, logits = [], []
        for _ in range(20):
            tokens.append(decoder.step())
            logits.append(decoder.logits.clone())
        return torch.stack(tokens), torch.stack(logits)

    packed_tokens, packed_logits = decode()
    monkeypatch.setattr(packed_linear, "works", lambda: False)
    tokens, logits = decode()
    assert torch.equal(packed_tokens, tokens)
    torch.testing.assert_close(packed_logits, logits, rtol=1e-5, atol=1e-5)


def test_a_new_decoder_decodes_with_the_weights_as_they_are_now():
    # An optimizer's fused kernel or `param.data = ...` changes a weight without moving its version
    # counter, so packed copies must never outlive the decoder that made them.
    model, prompts = tiny_model("modern"), random_prompts([6, 6])
    before = model.generate(torch.stack(prompts), 12, temperature=0.0)[:, 6:]
    for p in model.parameters():
        p.data = p.data.flip(0).clone()
    after = model.generate(torch.stack(prompts), 12, temperature=0.0)[:, 6:]
    expected = greedy_reference(model, prompts, 12)
    assert not torch.equal(before, torch.stack(expected))  # the change changes the answer
    assert torch.equal(after, torch.stack(expected))


def test_a_compiled_decoder_packs_nothing_not_even_for_its_eager_prefill(monkeypatch):
    # Its steps multiply with inductor's kernels: packed copies would cost memory and time for nothing.
    calls = count_packed_products(monkeypatch)
    decoder = Decoder(tiny_model("modern"), slots=2, compile=True)
    decoder.prefill(random_prompts([5, 5]), temperature=0.0)  # eager: compiling starts at the first step
    assert decoder.packed is None and calls == []


def test_trying_whether_the_packed_product_works_draws_nothing_from_the_global_generator():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    packed_linear.works.__wrapped__()  # the try itself, not the answer cached by an earlier test
    assert torch.equal(torch.rand(3), expected)


@needs_onednn
def test_trying_the_packed_product_under_bfloat16_autocast_still_finds_it_works():
    # The answer is kept for the process: a first decode under autocast must not switch packing off.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_linear.works.__wrapped__()
