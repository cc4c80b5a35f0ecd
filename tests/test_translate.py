"""
Tests for translation: reading parallel text (translation.py), its batches, and the scores,
which must be sacrebleu's own.

    python -m pytest tests/test_translate.py -q
"""

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from model import GPT, GPTConfig, until_end
from tokenizer import Tokenizer
from translation import (batch_at, collate_pairs, corpus_scores, decoder_only_example, encode_pairs, epoch_batches,
                         read_parallel, translate_lines, without_empty)

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                      "translation", "multi30k")


def write(path, lines, gz=False):
    text = "".join(line + "\n" for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def one_line_error(call):
    with pytest.raises(SystemExit) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    return message


def test_two_files_plain_or_gz_and_jsonl_read_the_same_pairs(tmp_path):
    sources, targets = ["Ein Hund läuft.", "Zwei Katzen\u2028schlafen."], ["A dog runs.", "Two cats sleep."]
    plain = f"{write(tmp_path / 'a.de', sources)},{write(tmp_path / 'a.en', targets)}"
    gz = f"{write(tmp_path / 'a.de.gz', sources, gz=True)},{write(tmp_path / 'a.en.gz', targets, gz=True)}"
    records = [json.dumps({"de": s, "en": t}) for s, t in zip(sources, targets)]
    jsonl = write(tmp_path / "a.jsonl", records)
    assert read_parallel(plain) == read_parallel(gz) == read_parallel(jsonl, "de", "en") == (sources, targets)


def test_bad_parallel_files_are_one_line_errors(tmp_path):
    a, b = write(tmp_path / "a.txt", ["one", "two", "three"]), write(tmp_path / "b.txt", ["eins", "zwei"])
    assert "3 lines but" in one_line_error(lambda: read_parallel(f"{a},{b}"))
    assert "no file" in one_line_error(lambda: read_parallel(f"{a},{tmp_path / 'missing.txt'}"))
    (tmp_path / "latin1.txt").write_bytes("Grüße\nzwei\ndrei\n".encode("latin-1"))
    assert "not UTF-8" in one_line_error(lambda: read_parallel(f"{a},{tmp_path / 'latin1.txt'}"))
    (tmp_path / "cut.gz").write_bytes(gzip.compress(b"eins\nzwei\ndrei\n")[:-6])
    assert "cannot be read" in one_line_error(lambda: read_parallel(f"{a},{tmp_path / 'cut.gz'}"))
    bad = write(tmp_path / "bad.jsonl", [json.dumps({"source": "x", "target": 3})])
    assert "string fields" in one_line_error(lambda: read_parallel(bad))
    assert "neither" in one_line_error(lambda: read_parallel(a))


def test_pairs_with_an_empty_side_are_left_out_and_counted():
    assert without_empty(["a", " ", "c", "d"], ["A", "B", "", "D"]) == (["a", "d"], ["A", "D"], 2)


def test_a_side_longer_than_block_size_is_cut_and_counted():
    tokenizer = Tokenizer.train("byte")
    pairs, n_cut = encode_pairs(tokenizer, ["abcdefgh", "ab"], ["xy", "uvwxyz"], block_size=5)
    eot = tokenizer.eot_id
    assert pairs == [([97, 98, 99, 100, 101], [eot, 120, 121, eot]), ([97, 98, eot], [eot, 117, 118, 119, 120, 121])]
    assert n_cut == 2  # the first source (9 ids) and the second target (8 ids, 7 allowed)


def test_batches_are_a_pure_function_of_the_step_and_visit_every_example_once_per_epoch():
    lengths = tuple((i * 7919) % 50 + 1 for i in range(1000))
    epoch = [i for index in range(32) for i in batch_at(lengths, 32, index, seed=3)]  # 1000 / 32: 32 batches
    assert sorted(epoch) == list(range(1000))
    epoch_batches.cache_clear()  # computed afresh, the batches are the same
    assert [i for index in range(32) for i in batch_at(lengths, 32, index, seed=3)] == epoch
    assert batch_at(lengths, 32, 32, seed=3) != batch_at(lengths, 32, 0, seed=3)  # a new epoch, a new order
    # examples of about the same length go together: far less padding than a random batch would have
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch_batches(lengths, 32, 3, 0)]
    assert sum(spread) / len(spread) < 10


def test_collated_batch_pads_the_sources_and_masks_the_targets():
    src, src_lengths, tgt, targets = collate_pairs([([5, 6, 9], [9, 1, 2, 9]), ([7, 9], [9, 3, 9])], pad_id=0)
    assert src.tolist() == [[5, 6, 9], [7, 9, 0]] and src_lengths.tolist() == [3, 2]
    assert tgt.tolist() == [[9, 1, 2], [9, 3, 0]] and targets.tolist() == [[1, 2, 9], [3, 9, -1]]


def test_bleu_and_chrf_equal_the_sacrebleu_command_line(tmp_path):
    references = ["Two young, White males are outside near many bushes.",
                  "A little girl climbing into a wooden playhouse.",
                  "Several men in hard hats are operating a giant pulley system.",
                  "A man in a blue shirt is standing on a ladder.",
                  "Two men are at the stove preparing food."]
    hypotheses = ["Two young white men are outside near many bushes.",
                  "A little girl climbs into a playhouse made of wood.",
                  "Several men in helmets operate a drive wheel system.",
                  "A man in a blue shirt stands on a ladder.",
                  "two men are cooking at the stove ."]
    if os.path.isdir(SHARED):  # real text where it is at hand: each Multi30K val caption scored against the next
        references = read_parallel(f"{SHARED}/val.de.gz,{SHARED}/val.en.gz")[1]
        hypotheses = references[1:] + references[:1]
    ours = corpus_scores(hypotheses, references)
    write(tmp_path / "ref.txt", references)
    write(tmp_path / "hyp.txt", hypotheses)
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
                          "-m", "bleu", "chrf", "-w", "6"], capture_output=True, text=True, check=True)
    bleu, chrf = json.loads(cli.stdout)
    assert ours["bleu"] == pytest.approx(bleu["score"], abs=1e-5)
    assert ours["chrf"] == pytest.approx(chrf["score"], abs=1e-5)
    assert ours["bleu_signature"] == bleu["signature"] and ours["chrf_signature"] == chrf["signature"]
    assert 0 < ours["bleu"] < 100


def test_a_decoder_only_model_translates_as_its_own_generate_continues_the_source():
    """translate_lines on a GPT: greedy continuation of `source <end-of-text>`, batched and left-padded, is
    what GPT.generate gives one line at a time; beam search with one beam is the same."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() >= 2 else p.add_(0.1 * torch.randn_like(p))
    tokenizer = Tokenizer.train("byte")
    lines = ["abc", "", "hello there", "x"]
    greedy, n_cut = translate_lines(model, tokenizer, lines, batch_size=2)
    assert n_cut == 0 and greedy[1] == "" and translate_lines(model, tokenizer, lines, beam_size=1)[0] == greedy
    for line, translation in zip(lines, greedy):
        if line:
            prompt = torch.tensor([tokenizer.encode(line) + [tokenizer.eot_id]])
            limit = min(2 * prompt.size(1) + 10, 48 - 48 // 2)  # the context's other half is the translation's
            out = model.generate(prompt, limit, temperature=0.0, stop_tokens=[tokenizer.eot_id])
            assert translation == tokenizer.decode(until_end(out[0, prompt.size(1):].tolist(), tokenizer.eot_id)).strip()


def test_decoder_only_rows_mask_the_source_and_learn_the_target():
    x, y = decoder_only_example([5, 6, 9], [9, 1, 2, 9])
    assert x == [5, 6, 9, 1, 2] and y == [-1, -1, 1, 2, 9]
