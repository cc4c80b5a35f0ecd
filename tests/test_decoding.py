"""
Tests for decoding.py: slots at their own positions, sequences joining and leaving a running batch,
per-row stop tokens and seeds, the bucketed cache reads, and the compiled step.

    python -m pytest -q tests/test_decoding.py

Tiny models on CPU. Greedy tokens are compared with recomputing each prompt alone without a
cache (test_model.greedy_reference), which knows nothing of slots, caches or buckets.
"""

import pytest
import torch

import decoding
from decoding import Decoder, attended_length
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


def test_a_step_reads_the_next_power_of_two_of_cache_slots_within_64_and_block_size():
    assert [attended_length(n, 1024) for n in (1, 63, 64, 65, 128, 129, 1000, 1024)] == [
        64, 64, 64, 128, 128, 256, 1024, 1024]
    assert attended_length(20, 16) == 16 and attended_length(100, 192) == 128 and attended_length(150, 192) == 192


def test_bucketed_cache_reads_give_the_tokens_of_reading_the_whole_cache(monkeypatch):
    # A 256-token context; two rows at different lengths grow through the buckets 64, 128 and 256.
    model = tiny_model("modern", n_kv_head=2, block_size=256)
    prompts = random_prompts([10, 50], seed=14)
    read = []
    monkeypatch.setattr(decoding, "attended_length", lambda *a: read.append(attended_length(*a)) or read[-1])
    _, bucketed = run(Decoder(model, slots=2), [(0, prompts[0], GREEDY), (0, prompts[1], GREEDY)], steps=150)
    assert {64, 128, 256} <= set(read)
    monkeypatch.setattr(decoding, "attended_length", lambda longest, block_size: block_size)
    _, whole = run(Decoder(model, slots=2), [(0, prompts[0], GREEDY), (0, prompts[1], GREEDY)], steps=150)
    assert bucketed == whole
    assert len(set(whole[0])) > 5 and whole[0] != whole[1]  # tokens vary, so the match means something


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
    # leaving change no shape, so it compiles once (fullgraph) and a second decoder recompiles nothing.
    model = tiny_model("modern", n_kv_head=2).to(device)
    prompts = [p.to(device) for p in random_prompts([2, 5, 4])]
    requests = [(0, prompts[0], GREEDY), (3, prompts[1], GREEDY), (5, prompts[2], dict(temperature=1.0, seed=5))]
    _, eager = run(Decoder(model, slots=3, compile=False), requests, steps=12)
    for _ in range(2):  # a second decoder brings a new cache: CUDA graphs record again, nothing recompiles
        assert run(Decoder(model, slots=3, compile=True), requests, steps=12)[1] == eager
