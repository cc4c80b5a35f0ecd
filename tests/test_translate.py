"""
Tests for translation: reading parallel text (translation.py), its batches, and the scores, which
must be sacrebleu's own; translate.py learning a toy language, resuming exactly, in two processes as
in one; sample.py and evaluate.py with its checkpoints, encoder-decoder and decoder-only; bad input as one line.

    python -m pytest tests/test_translate.py -q
"""

import gzip
import json
import os
import random
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from conftest import logged_after, run_script, run_torchrun
from forked import error_line, run_forked
from model import GPT, GPTConfig, until_end
from tokenizer import Tokenizer
from translation import (batch_at, collate_pairs, corpus_scores, decoder_only_example, encode_pairs, epoch_batches,
                         read_lines, read_pairs, read_parallel, translate_lines)

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


def test_pairs_with_an_empty_side_are_left_out_and_counted(tmp_path):
    spec = f"{write(tmp_path / 'a.txt', ['a', ' ', 'c', 'd'])},{write(tmp_path / 'b.txt', ['A', 'B', '', 'D'])}"
    assert read_pairs(spec) == ([("a", "A"), ("d", "D")], 2)


def test_a_side_longer_than_block_size_is_cut_and_counted():
    tokenizer = Tokenizer.train("byte")
    pairs, n_cut = encode_pairs(tokenizer, [("abcdefgh", "xy"), ("ab", "uvwxyz")], block_size=5)
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


# ---------------------------------------------------------------------------------------------
# translate.py, sample.py and evaluate.py on a toy language: numbers spelled in German, to English

GERMAN = "null eins zwei drei vier fünf sechs sieben acht neun".split()
ENGLISH = "zero one two three four five six seven eight nine".split()


def toy_pairs(n, seed):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        digits = [rng.randrange(10) for _ in range(rng.randint(1, 5))]
        pairs.append((" ".join(GERMAN[d] for d in digits) + ".", " ".join(ENGLISH[d] for d in digits).capitalize() + "."))
    return pairs


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy corpus's files (train, val, test: SOURCE,TARGET strings) and the arguments of a translate.py run
    that learns it in a few seconds."""
    root = tmp_path_factory.mktemp("toy")
    specs = {}
    for split, n, seed in (("train", 1500, 0), ("val", 40, 1), ("test", 40, 2)):
        pairs = toy_pairs(n, seed)
        specs[split] = f"{write(root / f'{split}.de', [s for s, _ in pairs])},{write(root / f'{split}.en', [t for _, t in pairs])}"
    args = [f"--data={specs['train']}", f"--val_data={specs['val']}", f"--test_data={specs['test']}", "--device=cpu",
            "--vocab_size=300", "--block_size=24", "--n_layer=2", "--n_encoder_layer=2", "--n_head=4", "--n_embd=64",
            "--dropout=0", "--label_smoothing=0", "--batch_size=16", "--total_batch_size=32", "--learning_rate=4e-3",
            "--warmup_iters=10", "--min_lr=4e-4", "--max_iters=200", "--eval_interval=100", "--log_interval=20",
            "--beam_size=3"]
    return root, specs, args


@pytest.fixture(scope="module")
def toy_run(toy):
    """A toy model trained by translate.py: (out_dir, its stdout)."""
    root, _, args = toy
    result = run_script("translate.py", *args, f"--out_dir={root / 'run'}", "--resume=auto")
    return root / "run", result.stdout


def test_a_tiny_model_learns_the_toy_language_and_is_scored_at_every_evaluation(toy_run):
    out_dir, stdout = toy_run
    evaluations = [r for r in map(json.loads, open(out_dir / "metrics.jsonl")) if r.get("val_bleu") is not None]
    assert [r["step"] for r in evaluations] == [100, 200]
    assert evaluations[-1]["val_bleu"] > 80 and evaluations[-1]["val_bleu"] > evaluations[0]["val_bleu"]
    assert "sacreBLEU nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in stdout
    end = [r for r in map(json.loads, open(out_dir / "metrics.jsonl")) if "test_bleu_beam1" in r][0]
    assert end["test_bleu_beam1"] > 80 and end["test_bleu_beam3"] > 80
    checkpoint = load_checkpoint(str(out_dir / "ckpt.pt"))
    assert checkpoint["kind"] == "translate" and checkpoint["tokenizer"]["kind"] == "bpe"


def test_sample_prints_one_translation_per_line_in_order_and_nothing_else(toy, toy_run):
    root, specs, _ = toy
    source_file, target_file = specs["test"].split(",")
    lines = read_lines(source_file)[:6]
    write(root / "some.de", [lines[0], "", *lines[1:]])
    for beam in ("1", "3"):
        result = run_script("sample.py", f"--out_dir={toy_run[0]}", f"--translate_file={root / 'some.de'}",
                            f"--beam_size={beam}", "--device=cpu")
        out = result.stdout.split("\n")
        assert len(out) == 8 and out[1] == "" and out[-1] == ""  # one line per input line, the empty one kept
        wanted = read_lines(target_file)[:6]
        assert sum(a == b for a, b in zip(out[:1] + out[2:7], wanted)) >= 5
    alone = run_script("sample.py", f"--out_dir={toy_run[0]}", f"--translate={lines[0]}", "--device=cpu")
    assert alone.stdout == out[0] + "\n"


def test_evaluate_scores_the_run_test_set_as_the_sacrebleu_command_line_does(toy, toy_run):
    root, specs, _ = toy
    run_script("evaluate.py", f"--out_dir={toy_run[0]}", "--beam_size=3", "--device=cpu", f"--report={root / 'e.json'}")
    result = json.loads((root / "e.json").read_text())["results"]["translation"]
    assert result["sentences"] == 40 and result["beam_size"] == 3
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", specs["test"].split(",")[1], "-i",
                          str(root / "translations.txt"), "-m", "bleu", "chrf", "-w", "6"],
                         capture_output=True, text=True, check=True)
    bleu, chrf = json.loads(cli.stdout)
    assert result["bleu"] == pytest.approx(bleu["score"], abs=1e-5) and result["chrf"] == pytest.approx(chrf["score"],
                                                                                                         abs=1e-5)
    assert result["bleu_signature"] == bleu["signature"] and result["bleu"] > 80


def test_translate_stopped_and_resumed_ends_with_the_weights_and_scores_of_an_uninterrupted_run(toy, toy_run,
                                                                                               tmp_path):
    """The toy run saved a checkpoint at step 100: a run started from it alone finishes exactly as the toy run did."""
    _, _, args = toy
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.link(toy_run[0] / "ckpt-0000100.pt", resumed / "ckpt-0000100.pt")
    stdout = run_script("translate.py", *args, f"--out_dir={resumed}", "--resume=auto").stdout
    assert f"resuming {resumed / 'ckpt-0000100.pt'} at step 100" in stdout
    untimed = [[{k: v for k, v in r.items() if k not in ("tokens_per_sec", "train_seconds")} for r in logged_after(run, 100)]
               for run in (toy_run[0], resumed)]
    assert untimed[1] == untimed[0] and any("val_bleu" in r for r in untimed[0])
    ends = [load_checkpoint(str(run / "ckpt.pt"))["model"] for run in (toy_run[0], resumed)]
    for name, tensor in ends[0].items():
        assert torch.equal(ends[1][name], tensor), name


SHORT = ["--max_iters=4", "--eval_interval=4", "--test_data=", "--bleu_sentences=8"]


@pytest.fixture(scope="module")
def one_process_run(toy):
    root, _, args = toy
    run_script("translate.py", *args, *SHORT, f"--out_dir={root / 'one'}")
    return root / "one"


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_translate_in_two_processes_ends_with_the_weights_and_scores_of_one(parallelism, toy, one_process_run,
                                                                            tmp_path):
    """32 pairs a step: 2 micro-steps of 16 in one process, 1 in each of two (gloo)."""
    result = run_torchrun("translate.py", *toy[2], *SHORT, f"--out_dir={tmp_path}", f"--parallelism={parallelism}")
    assert "16 x 2 processes x 1 accumulation steps" in result.stdout
    one, two = (load_checkpoint(str(run / "ckpt.pt"))["model"] for run in (one_process_run, tmp_path))
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)
    scores = [[r.get("val_bleu") for r in logged_after(run, 3)] for run in (one_process_run, tmp_path)]
    assert scores[0] == scores[1]


def test_decoder_only_architecture_trains_on_the_target_only_and_sample_and_evaluate_translate_with_it(toy, tmp_path):
    _, specs, args = toy
    stdout = run_script("translate.py", *args, "--architecture=decoder-only", "--max_iters=2", "--eval_interval=2",
                        "--test_data=", "--bleu_sentences=4", f"--out_dir={tmp_path}").stdout
    assert "model: decoder-only" in stdout
    model, _ = model_from_checkpoint(load_checkpoint(str(tmp_path / "ckpt.pt")))
    assert isinstance(model, GPT) and model.config.block_size == 48
    # sample.py and evaluate.py translate with it, as translate.py's last line says (both refused it: "a
    # decoder-only model, which does not translate"; evaluate.py ran its default benchmarks instead)
    test = specs["test"].split(",")
    sample = run_forked("sample.py", f"--out_dir={tmp_path}", f"--translate_file={test[0]}", "--device=cpu")
    assert sample.returncode == 0, sample.stderr
    evaluate = run_forked("evaluate.py", f"--out_dir={tmp_path}", f"--parallel_data={specs['test']}", "--device=cpu")
    assert evaluate.returncode == 0, evaluate.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["translation"]["sentences"] == 40
    assert sample.stdout == (tmp_path / "translations.txt").read_text()  # each line as it is translated alone


@pytest.fixture(scope="module")
def bad_files(toy):
    root, specs, _ = toy
    write(root / "short.en", ["One."])
    (root / "latin1.de").write_bytes("fünf.\nzwei.\n".encode("latin-1"))
    write(root / "two.en", ["Five.", "Two."])
    write(root / "empty.de", ["eins.", "", "drei."])
    write(root / "empty.en", ["One.", "Two.", "Three."])
    write(root / "long.de", [" ".join(["neun"] * 40) + ".", "eins."])
    write(root / "long.en", ["Nine.", "One."])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint({"kind": "pretrain", "model_config": asdict(model.config), "model": model.state_dict(),
                     "tokenizer": {"kind": "byte", "eot": "<|endoftext|>"}}, str(root / "gpt" / "ckpt.pt"))
    return root


@pytest.mark.parametrize("script, args, message", [
    ("translate.py", ["--data={root}/train.de,{root}/short.en"], "data error: {root}/train.de has 1,500 lines but "
                                                                  "{root}/short.en has 1; line n of one"),
    ("translate.py", ["--data={root}/latin1.de,{root}/two.en"], "data error: {root}/latin1.de is not UTF-8 text"),
    ("translate.py", ["--data={root}/missing.de,{root}/two.en"], "data error: no file {root}/missing.de"),
    ("translate.py", ["--data={root}/train.de"], "config error: parallel data '{root}/train.de' is neither"),
    ("translate.py", ["--architecture=seq2seq"], "config error: architecture='seq2seq' is not one of"),
    ("sample.py", ["--out_dir={root}/gpt", "--translate=eins."], "sample error: {root}/gpt/ckpt.pt is a decoder-only "
                                                                  "model, which does not translate"),
    ("sample.py", ["--out_dir={root}/gpt", "--translate_file={root}/missing.de"], "data error: no file"),
])
def test_bad_input_is_one_line(bad_files, toy, script, args, message):
    root = bad_files
    base = toy[2] if script == "translate.py" else ["--device=cpu"]
    result = run_forked(script, *base, *[a.format(root=root) for a in args], f"--out_dir={root / 'bad_out'}"
                        if script == "translate.py" else "--seed=1")
    assert error_line(result).startswith(message.format(root=root))


@pytest.mark.parametrize("data, note", [
    ("{root}/empty.de,{root}/empty.en", "1 pairs with an empty side left out"),
    ("{root}/long.de,{root}/long.en", "1 sides longer than block_size=24 tokens cut"),
])
def test_empty_lines_and_long_sentences_are_counted_in_the_log(bad_files, toy, data, note, tmp_path):
    result = run_forked("translate.py", *toy[2], f"--data={data.format(root=bad_files)}", "--max_iters=1",
                        "--eval_interval=1", "--test_data=", "--bleu_sentences=2", f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert note in result.stdout
