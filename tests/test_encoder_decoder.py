"""
Tests for model.py's encoder-decoder: what attends to what, decoding (cached and not, greedy and beam
search, against an exhaustive search), and that a tiny model learns to copy and to reverse.

    python -m pytest tests/test_encoder_decoder.py -q

Tiny models on CPU; the file runs in about ten seconds.
"""

import itertools
import math

import pytest
import torch

from conftest import spread_weights
from model import EncoderDecoder, EncoderDecoderConfig, beam_search

STYLES = {
    "modern": dict(),
    "vaswani": dict(norm="layernorm", mlp="relu2", pos="sinusoidal", tie_embeddings=True, bias=True),
    "learned": dict(norm="layernorm", mlp="gelu", pos="learned", qk_norm=True, n_kv_head=2),
}


def tiny_model(style="modern", seed=0, **overrides):
    """A tiny encoder-decoder in eval mode, with weights larger than the init's so that attention is far
    from uniform and greedy decoding has clear winners that vary by position."""
    torch.manual_seed(seed)
    config = dict(vocab_size=40, block_size=16, n_layer=2, n_encoder_layer=2, n_head=4, n_embd=32)
    return spread_weights(EncoderDecoder(EncoderDecoderConfig(**{**config, **STYLES[style], **overrides})).eval(), 0.3)


@pytest.mark.parametrize("style", STYLES)
def test_source_padding_changes_nothing(style):
    model = tiny_model(style)
    src, tgt = torch.randint(0, 40, (3, 9)), torch.randint(0, 40, (3, 6))
    lengths = torch.tensor([9, 5, 2])
    logits, _ = model(src, tgt, src_lengths=lengths)
    other = src.clone()
    other[1, 5:], other[2, 2:] = torch.randint(0, 40, (4,)), torch.randint(0, 40, (7,))  # any ids in the padding
    assert torch.allclose(model(other, tgt, src_lengths=lengths)[0], logits, atol=1e-5)
    for row, n in enumerate(lengths.tolist()):  # and a row alone, unpadded, computes what it did in the batch
        alone, _ = model(src[row : row + 1, :n], tgt[row : row + 1])
        assert torch.allclose(alone[0], logits[row], atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_decoder_is_causal(style):
    model = tiny_model(style)
    src, tgt = torch.randint(0, 40, (2, 7)), torch.randint(0, 40, (2, 8))
    logits, _ = model(src, tgt)
    changed = tgt.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 40
    after, _ = model(src, changed)
    assert torch.allclose(after[:, :5], logits[:, :5], atol=1e-6)
    assert not torch.allclose(after[:, 5:], logits[:, 5:], atol=1e-3)


def test_cross_attention_reads_the_source():
    model = tiny_model()
    src, tgt = torch.randint(0, 40, (2, 7)), torch.randint(0, 40, (2, 5))
    logits, _ = model(src, tgt)
    for position in (0, 6):  # every source position reaches every target position
        changed = src.clone()
        changed[:, position] = (changed[:, position] + 1) % 40
        after, _ = model(changed, tgt)
        assert (after - logits).abs().amax(dim=-1).min() > 1e-4


def test_loss_is_the_cross_entropy_of_the_targets_not_minus_one():
    model = tiny_model()
    src, tgt = torch.randint(0, 40, (2, 7)), torch.randint(0, 40, (2, 5))
    targets = torch.randint(0, 40, (2, 5))
    targets[1, 3:] = -1
    logits, loss = model(src, tgt, targets)
    kept = targets >= 0
    expected = -logits.double().log_softmax(-1)[kept].gather(1, targets[kept][:, None]).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_cached_decoding_equals_uncached(style):
    model = tiny_model(style)
    src, lengths = torch.randint(3, 40, (4, 10)), torch.tensor([10, 7, 3, 1])
    for beam_size in (1, 3):
        cached = model.translate(src, lengths, 1, 2, 14, beam_size=beam_size)
        assert cached == model.translate(src, lengths, 1, 2, 14, beam_size=beam_size, use_cache=False)
    assert any(len(row) > 3 for row in cached)  # long enough that the cache is really used


def test_batched_translation_equals_one_row_at_a_time():
    model = tiny_model()
    src, lengths = torch.randint(3, 40, (3, 8)), torch.tensor([8, 4, 6])
    for beam_size in (1, 4):
        batched = model.translate(src, lengths, 1, 2, 12, beam_size=beam_size)
        alone = [model.translate(src[i : i + 1, :n], None, 1, 2, 12, beam_size=beam_size)[0]
                 for i, n in enumerate(lengths.tolist())]
        assert batched == alone


def test_beam_size_one_is_greedy():
    for seed in range(3):
        model = tiny_model(seed=seed)
        src, lengths = torch.randint(3, 40, (5, 9)), torch.tensor([9, 8, 5, 3, 2])
        assert model.translate(src, lengths, 1, 2, 15, beam_size=1) == \
            model.translate(src, lengths, 1, 2, 15, beam_size=1, length_penalty=0.0)  # greedy either way
        greedy = model.translate(src, lengths, 1, 2, 15)
        step = model.stepper(src, lengths)
        assert beam_search(step, torch.ones(5, 1, dtype=torch.long), 2, [15] * 5, 1) == greedy


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_finds_the_best_sequence_by_exhaustive_search(length_penalty):
    """With more beams than sequences, beam search is exhaustive: its pick must be the best of all sequences
    of up to 3 tokens (ending in the end token, or cut at 3), scored as log-probability / length**penalty."""
    model = tiny_model(vocab_size=4, seed=1)
    src = torch.randint(0, 4, (2, 5))
    end, start, max_new = 3, 0, 3
    found = model.translate(src, None, start, end, max_new, beam_size=32, length_penalty=length_penalty)
    for row in range(2):
        best, best_score = None, -math.inf
        for n in range(max_new + 1):
            for body in itertools.product(range(3), repeat=n):
                sequence = list(body) + ([end] if n < max_new else [])
                tgt = torch.tensor([[start] + sequence[:-1]]) if sequence else None
                logprobs = model(src[row : row + 1], tgt)[0][0].double().log_softmax(-1)
                score = sum(logprobs[i, t].item() for i, t in enumerate(sequence)) / len(sequence) ** length_penalty
                if score > best_score:
                    best, best_score = list(body), score
        assert found[row] == best


def test_longer_than_block_size_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_tiny_model_learns_to_copy_and_to_reverse(task):
    """Sequences of 2 to 7 tokens from 10 symbols, 150 AdamW steps: the test sequences, which it has
    almost surely never seen, come out exactly right, greedy and with beams. Learned positions: the
    cross-attention finds source position i from target position i through them."""
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(vocab_size=13, block_size=10, n_layer=2, n_encoder_layer=2,
                                                n_head=4, n_embd=48, pos="learned"))
    start, end, pad = 10, 11, 12

    def batch(n, generator):
        lengths = torch.randint(2, 8, (n,), generator=generator)
        src = torch.randint(0, 10, (n, 7), generator=generator)
        tgt = torch.full((n, 9), pad)
        tgt[:, 0] = start
        targets = torch.full((n, 9), -1)
        for i, length in enumerate(lengths.tolist()):
            out = src[i, :length] if task == "copy" else src[i, :length].flip(0)
            tgt[i, 1 : length + 1], targets[i, :length], targets[i, length] = out, out, end
        return src, lengths, tgt, targets

    steps, peak_lr = 150, 3e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in optimizer.param_groups:  # warmup, then linear decay
            group["lr"] = peak_lr * min(1.0, (step + 1) / 50) * (1 - step / steps)
        src, lengths, tgt, targets = batch(64, generator)
        _, loss = model(src, tgt, targets, lengths)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    src, lengths, _, targets = batch(200, torch.Generator().manual_seed(99))
    wanted = [row[: row.index(end)] for row in targets.tolist()]
    for beam_size in (1, 3):
        got = model.translate(src, lengths, start, end, 9, beam_size=beam_size)
        exact = sum(g == w for g, w in zip(got, wanted)) / len(wanted)
        assert exact >= 0.95, (task, beam_size, exact)
