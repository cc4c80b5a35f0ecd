"""
Tests for decoding.py: slots at their own positions, sequences joining and leaving a running batch,
per-row stop tokens and seeds, the batched sampler's per-row settings, the bucketed cache reads,
and the compiled step.

    python -m pytest -q tests/test_decoding.py

Tiny models on CPU. Greedy tokens are compared with recomputing each prompt alone without a
cache (test_model.greedy_reference), which knows nothing of slots, caches or buckets.
"""

import math

import pytest
import torch

import decoding
from decoding import Decoder, attended_length, kept_logits, sample_next_token
from test_model import DEVICES, greedy_reference, random_prompts, tiny_model


def run(decoder, requests, steps):
    """Step decoder `steps` times; request i = (step, prompt, settings) is prefilled just before that step.
    Returns each request's slot and the tokens it got, one per step from its first."""
    slots, tokens = {}, {}
    for step in range(steps):
        for i, (start, prompt, settings) in enumerate(requests):
            if start == step:
                [slots[i]], tokens[i] = decoder.prefill([prompt], **settings), []
        new = decoder.step().tolist()
        for i, slot in slots.items():
            tokens[i].append(new[slot])
    return slots, tokens


GREEDY = dict(temperature=0.0)


def test_a_greedy_row_gives_the_same_tokens_alone_and_beside_rows_that_join_at_different_times():
    # Prompts of 3, 12 and 7 tokens in a 16-token context, joining at steps 0, 4 and 9, each at its own
    # position in every step; all of them fill the context and slide past it.
    model = tiny_model("modern", n_kv_head=2)
    prompts = random_prompts([3, 12, 7])
    _, tokens = run(Decoder(model, slots=3), [(0, prompts[0], GREEDY), (4, prompts[1], GREEDY),
                                              (9, prompts[2], GREEDY)], steps=40)
    expected = greedy_reference(model, prompts, 40)
    assert len({tuple(e.tolist()) for e in expected}) == 3  # rows differ, so the match means something
    for i, start in enumerate([0, 4, 9]):
        assert tokens[i] == expected[i][: 40 - start].tolist(), i


def test_a_freed_slot_takes_a_new_sequence_and_the_other_rows_go_on_unchanged():
    model = tiny_model("modern", n_kv_head=2)
    first, second, late = random_prompts([9, 4, 2], seed=11)
    decoder = Decoder(model, slots=2)
    a, b = decoder.prefill([first, second], **GREEDY)  # two lengths: two batches
    steps = [decoder.step() for _ in range(5)]
    decoder.free(a)  # cancelled mid-answer: 14 positions of its keys stay behind in the slot
    assert decoder.free_slots == [a]
    [c] = decoder.prefill([late], **GREEDY)
    assert c == a and decoder.free_slots == []
    steps += [decoder.step() for _ in range(12)]
    expected = greedy_reference(model, [second, late], 17)
    assert [t[b].item() for t in steps] == expected[0].tolist()
    assert [t[c].item() for t in steps[5:]] == expected[1][:12].tolist()


def test_each_row_stops_at_its_own_stop_tokens_and_then_repeats_it():
    model = tiny_model("modern", n_kv_head=2)
    prompts = random_prompts([5, 3], seed=40)
    free = [e.tolist() for e in greedy_reference(model, prompts, 12)]
    stop_a, stop_b = free[0][3], free[1][6]
    assert stop_a not in free[0][:3] and stop_b not in free[1][:6]
    assert stop_a in free[1][:6]  # row b meets row a's stop token before its own: it must not stop there
    decoder = Decoder(model, slots=2)
    [a] = decoder.prefill([prompts[0]], stop_tokens=[stop_a], **GREEDY)
    [b] = decoder.prefill([prompts[1]], stop_tokens=[stop_b, 999], **GREEDY)
    steps, finished = [], []
    for _ in range(12):
        steps.append(decoder.step().tolist())
        finished.append(decoder.finished.tolist())
    assert [t[a] for t in steps] == free[0][:4] + [stop_a] * 8
    assert [t[b] for t in steps] == free[1][:7] + [stop_b] * 5
    assert [f[a] for f in finished] == [False] * 3 + [True] * 9
    assert [f[b] for f in finished] == [False] * 6 + [True] * 6


def test_a_seeded_row_samples_the_same_tokens_alone_and_beside_other_rows():
    model = tiny_model("modern", n_kv_head=2, sharpen=False)  # small weights: flat distributions to sample from
    prompt, other, third = random_prompts([4, 6, 3], seed=13)
    seeded = dict(temperature=1.0, top_k=40, seed=1234)
    _, alone = run(Decoder(model, slots=1), [(0, prompt, seeded)], steps=20)
    torch.manual_seed(0)  # the unseeded row draws its seed from torch's generator
    _, beside = run(Decoder(model, slots=3), [(0, other, dict(temperature=0.8, top_p=0.9)), (2, third, GREEDY),
                                              (3, prompt, seeded)], steps=23)
    _, reseeded = run(Decoder(model, slots=1), [(0, prompt, seeded | dict(seed=1235))], steps=20)
    assert beside[2] == alone[0]
    assert reseeded[0] != alone[0]  # the seed decides the tokens, so the match means something
    assert alone[0] != greedy_reference(model, [prompt], 20)[0].tolist()


# Per-row settings in one batch: (temperature, top_k, top_p), greedy rows among them.
MIXED = [(1.0, None, None), (0.7, 5, None), (1.5, None, 0.6), (0.0, None, None), (1.0, 3, 0.9), (2.0, 40, 0.95),
         (0.5, 1, None), (1.0, None, 1.0), (0.0, 4, 0.5), (1.2, 64, 0.3)]


def kept_reference(logits, temperature, top_k, top_p):
    """The token ids one row keeps, written out in float64 Python: top_k keeps the ids whose scaled
    logit is at least the k-th largest; then top_p keeps an id if the ids more likely than it hold
    less than p of the probability left."""
    scaled = (logits.float() / (temperature or 1.0)).tolist()
    kept = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    if top_k:
        kept = [i for i in kept if scaled[i] >= scaled[kept[min(top_k, len(kept)) - 1]]]
    if top_p is not None and top_p < 1.0:
        weights = [math.exp(scaled[i] - scaled[kept[0]]) for i in kept]
        before = [sum(weights[:j]) / sum(weights) for j in range(len(kept))]
        kept = [i for i, b in zip(kept, before) if b < top_p]
    return set(kept)


def test_the_batched_sampler_keeps_per_row_exactly_the_tokens_each_row_keeps_alone():
    logits = 2.0 * torch.randn(len(MIXED), 64, generator=torch.Generator().manual_seed(3))
    temperature, top_k, top_p = map(list, zip(*MIXED))
    batched = kept_logits(logits, temperature, top_k, top_p)
    for row, (t, k, p) in enumerate(MIXED):
        alone = kept_logits(logits[row : row + 1], t, k, p)[0]
        assert torch.equal(batched[row], alone), row  # the same numbers, not only the same mask
        assert set(torch.isfinite(alone).nonzero()[:, 0].tolist()) == kept_reference(logits[row], t, k, p), row
    sizes = [int(torch.isfinite(row).sum()) for row in batched]
    assert len(set(sizes)) >= 5 and sizes[6] == 1 and 64 in sizes  # the settings really differ per row


def test_each_row_samples_from_softmax_over_its_temperature_of_the_tokens_it_keeps_and_0_is_greedy():
    # 3,000 copies of each setting of MIXED in one batch; each row's frequencies against its distribution.
    vocab, copies = 6, 3000
    base = torch.tensor([1.5, -0.5, 0.3, 0.9, -1.2, 0.0])
    settings = MIXED * copies
    temperature, top_k, top_p = map(list, zip(*settings))
    logits = base.expand(len(settings), vocab)
    tokens = sample_next_token(logits, temperature, top_k, top_p, torch.Generator().manual_seed(4))[:, 0]
    for row, (t, k, p) in enumerate(MIXED):
        drawn = tokens[row :: len(MIXED)]
        if t == 0:
            assert (drawn == base.argmax()).all(), row
            continue
        kept = sorted(kept_reference(base, t, k, p))
        expected = torch.zeros(vocab, dtype=torch.float64)
        expected[kept] = (base.double()[kept] / t).softmax(dim=0)
        frequencies = torch.bincount(drawn, minlength=vocab).double() / copies
        assert set(drawn.tolist()) == set(kept), row  # never a dropped token
        assert 0.5 * (frequencies - expected).abs().sum() < 0.03, (row, frequencies, expected)  # total variation


def test_a_row_drawing_from_its_own_generator_samples_the_same_in_any_batch():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    temperature, top_k, top_p = [1.0, 0.8, 1.3, 1.0, 0.9], [None, 10, None, None, 20], [None, None, 0.9, 0.8, None]

    def generators(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = generators(range(5))
    together = torch.cat([sample_next_token(logits, temperature, top_k, top_p, batch) for _ in range(40)], dim=1)
    for row in range(5):
        alone = generators([row])
        tokens = torch.cat([sample_next_token(logits[row : row + 1], temperature[row], top_k[row], top_p[row], alone)
                            for _ in range(40)], dim=1)
        assert torch.equal(tokens[0], together[row]), row
    assert len(set(together[0].tolist())) > 5  # the draws vary, so the match means something


def test_a_compiled_step_reads_the_next_power_of_two_of_cache_slots_within_64_and_block_size():
    assert [attended_length(n, 1024, bucketed=True) for n in (1, 63, 64, 65, 128, 129, 1000, 1024)] == [
        64, 64, 64, 128, 128, 256, 1024, 1024]
    assert [attended_length(n, 16, True) for n in (1, 16)] == [16, 16] and attended_length(150, 192, True) == 192
    assert attended_length(65, 1024, bucketed=False) == 65  # eager: exactly the longest row


@pytest.mark.parametrize("read", ["buckets", "all"])
def test_reading_the_cache_in_buckets_or_whole_gives_the_tokens_of_reading_the_filled_part(read, monkeypatch):
    # A 256-token context; two rows at different lengths grow through the buckets 64, 128 and 256. An
    # eager step reads exactly the filled part; here it reads what a compiled step would, or everything.
    model = tiny_model("modern", n_kv_head=2, block_size=256)
    requests = [(0, p, GREEDY) for p in random_prompts([10, 50], seed=14)]
    exact = run(Decoder(model, slots=2), requests, steps=150)[1]
    lengths = []
    def bucketed(longest, block_size, bucketed):
        lengths.append(attended_length(longest, block_size, True) if read == "buckets" else block_size)
        return lengths[-1]
    monkeypatch.setattr(decoding, "attended_length", bucketed)
    assert run(Decoder(model, slots=2), requests, steps=150)[1] == exact
    assert set(lengths) == ({64, 128, 256} if read == "buckets" else {256})
    assert len(set(exact[0])) > 5 and exact[0] != exact[1]  # tokens vary, so the match means something


def test_prefill_refuses_an_empty_prompt_and_more_prompts_than_free_slots():
    decoder = Decoder(tiny_model("modern"), slots=2)
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        decoder.prefill([[]])
    decoder.prefill([[1, 2]])
    with pytest.raises(RuntimeError, match="2 prompts and 1 of 2 slots free"):
        decoder.prefill([[3], [4, 5]])


@pytest.mark.parametrize("device", DEVICES)
def test_the_compiled_step_gives_the_eager_tokens_as_rows_join_and_leave(device):
    # The one test that compiles the decoding step (on CUDA it replays as CUDA graphs): rows joining and
    # leaving change no shape; the longest row grows from the 64-slot bucket into the 128-slot one, so it
    # compiles two graphs (fullgraph), and a second decoder recompiles nothing.
    model = tiny_model("modern", n_kv_head=2, block_size=128).to(device)
    prompts = [p.to(device) for p in random_prompts([2, 60, 4])]
    requests = [(0, prompts[0], GREEDY), (3, prompts[1], GREEDY), (5, prompts[2], dict(temperature=1.0, seed=5))]
    _, eager = run(Decoder(model, slots=3, compile=False), requests, steps=12)
    for _ in range(2):  # a second decoder brings a new cache: CUDA graphs record again, nothing recompiles
        assert run(Decoder(model, slots=3, compile=True), requests, steps=12)[1] == eager
