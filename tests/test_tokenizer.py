"""tokenizer.py: the BPE trained here learns merges in the documented order, round-trips any text, and
is rebuilt from its description alone (the contract with checkpoints, sample.py and evaluate.py)."""

import json
import os
import random

import pytest
import tiktoken.load

from conftest import REPO
from tokenizer import EOT, Tokenizer, count_words, read_ranks, train_bpe

GUTENBERG = os.path.join(REPO, os.pardir, "shared", "data", "gutenberg")


def test_merges_come_out_most_frequent_pair_first_ties_to_the_smaller_ids():
    # Pair counts u+g 20, p+u 17, u+n 16, h+u 15 → "ug"; then u+n 16, h+ug 15, p+u 12 → "un"; then h+ug 15
    # → "hug"; then p+un 12 → "pun"; then p+ug and hug+s tie at 5, and (p, ug) = (112, 256) comes before
    # (hug, s) = (258, 115) → "pug", then "hugs"; then b+un 4 → "bun", and no pair is left.
    words = {b"hug": 10, b"pug": 5, b"pun": 12, b"bun": 4, b"hugs": 5}
    assert train_bpe(words, 100) == [b"ug", b"un", b"hug", b"pun", b"pug", b"hugs", b"bun"]
    assert train_bpe(words, 3) == [b"ug", b"un", b"hug"]


def test_pre_tokenization_keeps_merges_inside_words_with_their_leading_space():
    counts = count_words(["the cat, the hat", "the end"])
    assert counts == {b"the": 2, b" cat": 1, b",": 1, b" the": 1, b" hat": 1, b" end": 1}
    tok = Tokenizer.train("bpe", ["the cat, the hat the end"] * 3, vocab_size=300)
    merged = read_ranks(tok.description["ranks"])
    assert b" the" in merged and not any(b" " in token[1:] or token.endswith(b", ") for token in merged)


def test_bpe_ids_are_the_bytes_then_the_merges_then_end_of_text():
    tok = Tokenizer.train("bpe", ["low lower lowest " * 20, "new newer newest " * 20], vocab_size=270)
    ranks = read_ranks(tok.description["ranks"])
    assert [ranks[bytes([b])] for b in range(256)] == list(range(256))
    assert sorted(ranks.values()) == list(range(269)) and tok.vocab_size == 270
    assert tok.eot_id == 269 == tok.special_tokens[EOT]
    assert tok.decode([tok.eot_id]) == EOT


def random_text(rng, n):
    """Text that stresses a byte-level tokenizer: scripts, emoji, combining marks, odd whitespace, specials."""
    pieces = ["hello", " world", "\n", "\n\n", " ", "  ", "\t", "\r\n", "\u00a0", "123", "3.14", "'s", "'ll",
              "<|endoftext|>", "<|end", "\u65e5\u672c\u8a9e", "\u4e2d\u6587", "\U0001F642", "\U0001F468\u200d\U0001F469\u200d\U0001F467",
              "\U0001F44D\U0001F3FD", "e\u0301", "a\u0308\u0323", "\u0645\u0631\u062d\u0628\u0627", "\u05e9\u05dc\u05d5\u05dd",
              "\ufffd", "\x00", "\u200b", "\U0001D11E", "caf\u00e9", "na\u00efve"]
    out = []
    for _ in range(n):
        if rng.random() < 0.3:  # any code point but the surrogates, which no UTF-8 text can hold
            c = rng.randrange(0x110000 - 0x800)
            out.append(chr(c if c < 0xD800 else c + 0x800))
        else:
            out.append(rng.choice(pieces))
    return "".join(out)


@pytest.fixture(scope="module")
def bpe_on_mixed_text():
    rng = random.Random(0)
    return Tokenizer.train("bpe", [random_text(rng, 300) for _ in range(50)], vocab_size=600)


def test_bpe_round_trips_random_unicode_and_keeps_the_end_of_text_string_as_text(bpe_on_mixed_text):
    tok, rng = bpe_on_mixed_text, random.Random(1)
    for _ in range(300):
        text = random_text(rng, rng.randrange(0, 40))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_id not in ids
    assert tok.decode(tok.encode(EOT)) == EOT and len(tok.encode(EOT)) > 1
    for text in ["", " ", "\n", "  \n ", "\r\n\r\n", "e\u0301"]:
        assert tok.decode(tok.encode(text)) == text


def test_bpe_trained_on_real_text_round_trips_it_and_compresses_it():
    path = os.path.join(GUTENBERG, "carroll_alice_s_adventures_in_wonderland.txt")
    if not os.path.isfile(path):
        path = os.path.join(REPO, "README.md")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    tok = Tokenizer.train("bpe", [text[: len(text) // 2]], vocab_size=1000)
    held_out = text[len(text) // 2:]
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    assert len(ids) < 0.5 * len(held_out.encode("utf-8"))  # 743 merges at least halve the bytes of English


def test_the_description_alone_rebuilds_the_same_tokenizer_after_json(bpe_on_mixed_text):
    tok = bpe_on_mixed_text
    again = Tokenizer(json.loads(json.dumps(tok.description)))
    text = random_text(random.Random(2), 200)
    assert again.encode(text) == tok.encode(text)
    assert (again.vocab_size, again.eot_id, again.special_tokens, again.kind) == (tok.vocab_size, tok.eot_id, tok.special_tokens, "bpe")


def test_the_description_loads_under_torch_weights_only(bpe_on_mixed_text, tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"tokenizer": bpe_on_mixed_text.description}, tmp_path / "ckpt.pt")
    description = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert Tokenizer(description).encode("caf\u00e9 \U0001F642") == bpe_on_mixed_text.encode("caf\u00e9 \U0001F642")


def test_the_ranks_text_is_a_tiktoken_file(bpe_on_mixed_text, tmp_path, monkeypatch):
    # tiktoken copies every file it loads into TIKTOKEN_CACHE_DIR, which may be ../shared's: '' turns that off
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    (tmp_path / "t.tiktoken").write_text(bpe_on_mixed_text.description["ranks"])
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "t.tiktoken")) == read_ranks(bpe_on_mixed_text.description["ranks"])


def test_a_small_corpus_stops_early_with_fewer_merges():
    tok = Tokenizer.train("bpe", ["ab ab ab"], vocab_size=8192)
    assert tok.vocab_size == 256 + 2 + 1  # "ab" and " ab", then end-of-text
    assert tok.decode(tok.encode("ab ba")) == "ab ba"
