"""prepare.py: files in, train/val bins and meta.json out, split by document, deterministic, one-line errors;
and the data pipeline's steps: extraction, cleaning, quality filters, deduplication, sharded output, a report."""

import functools
import hashlib
import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time

import numpy as np
import pytest

import prepare
from conftest import REPO, run_script
from tokenizer import Tokenizer, read_ranks

TIKTOKEN_CACHE = os.path.join(REPO, os.pardir, "shared", "data", "tiktoken_cache")
GUTENBERG = os.path.join(REPO, os.pardir, "shared", "data", "gutenberg")


@pytest.fixture
def gpt2_files(monkeypatch):
    if not os.path.isdir(TIKTOKEN_CACHE):
        pytest.skip("tiktoken's gpt2 files are not in ../shared/data/tiktoken_cache, and tests do not download them")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(TIKTOKEN_CACHE))


def write_files(folder, files):
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")
    return folder


def corpus(n=20):
    """n small documents with non-ASCII text, half of them in a subfolder."""
    return {f"{'sub/' if i % 2 else ''}doc{i:02d}.txt": f"document {i}: café, naïve, 日本語, 🙂\r\nits second line\n"
            for i in range(n)}


def prepare_run(tmp_path, *args, check=True):
    return run_script("prepare.py", f"--data_root={tmp_path / 'data'}", "--dataset=t", *args, check=check)


def load(data_dir):
    with open(data_dir / "meta.json") as f:
        meta = json.load(f)
    ids = {split: np.fromfile(data_dir / s["files"][0], dtype=meta["dtype"]) for split, s in meta["splits"].items()}
    return meta, ids


def documents(meta, ids):
    """The decoded documents of one split: the runs of ids that end with end-of-text."""
    tok = Tokenizer(meta["tokenizer"])
    ends = np.flatnonzero(ids == meta["eot_id"])
    return [tok.decode(doc[:-1]) for doc in np.split(ids, ends + 1)[:-1]]


def written_files(tmp_path):
    return [p for p in (tmp_path / "data").rglob("*") if p.is_file()]


@pytest.mark.parametrize("kind", ["byte", "char", "gpt2", "bpe"])
def test_each_tokenizer_round_trips_every_document(tmp_path, kind, request):
    if kind == "gpt2":
        request.getfixturevalue("gpt2_files")
    texts = corpus()
    write_files(tmp_path / "in", texts)
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}", f"--tokenizer={kind}", "--bpe_vocab_size=300")
    meta, ids = load(tmp_path / "data" / "t")
    assert meta["tokenizer"]["kind"] == kind
    assert sorted(documents(meta, ids["train"]) + documents(meta, ids["val"])) == sorted(texts.values())


def test_a_trained_bpe_is_in_meta_json_and_in_a_tiktoken_file_beside_it(tmp_path):
    write_files(tmp_path / "in", corpus())
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}", "--tokenizer=bpe", "--bpe_vocab_size=300")
    meta, ids = load(tmp_path / "data" / "t")
    description = meta["tokenizer"]
    assert meta["tokenizer_file"] == "tokenizer.tiktoken"
    assert (tmp_path / "data" / "t" / "tokenizer.tiktoken").read_text() == description["ranks"]
    merges = len(read_ranks(description["ranks"])) - 256
    assert 0 < merges <= 300 - 257 and meta["eot_id"] == 256 + merges == description["special_tokens"]["<|endoftext|>"]
    assert meta["vocab_size"] == 256 + merges + 1 and ids["train"].max() == meta["eot_id"]


def test_bins_hold_the_declared_dtype_token_counts_and_one_eot_per_document(tmp_path):
    write_files(tmp_path / "in", corpus())
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}")
    meta, ids = load(tmp_path / "data" / "t")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 257 and meta["eot_id"] == 256
    for split, s in meta["splits"].items():
        assert (tmp_path / "data" / "t" / f"{split}.bin").stat().st_size == 2 * s["tokens"] == 2 * len(ids[split])
        assert np.count_nonzero(ids[split] == meta["eot_id"]) == s["documents"] and ids[split][-1] == meta["eot_id"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 20


def test_dtype_is_uint16_up_to_65536_ids_and_uint32_beyond():
    assert prepare.token_dtype(257) == np.uint16 and prepare.token_dtype(65536) == np.uint16
    assert prepare.token_dtype(65537) == np.uint32


def test_a_char_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    chars = [chr(i) for i in range(0x10000, 0x10000 + 66000)]  # past the BMP: no surrogates, all valid UTF-8
    lines = ["".join(chars[i:i + 100]) + "\n" for i in range(0, len(chars), 100)]
    texts = {"a.txt": "".join(lines[: len(lines) // 2]), "b.txt": "".join(lines[len(lines) // 2:])}
    write_files(tmp_path / "in", texts)
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}", "--tokenizer=char")
    meta, ids = load(tmp_path / "data" / "t")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 66002  # the chars, newline, end-of-text
    assert max(ids["train"].max(), ids["val"].max()) == 66001  # the end-of-text id, which uint16 would wrap
    assert sorted(documents(meta, ids["train"]) + documents(meta, ids["val"])) == sorted(texts.values())


def test_split_is_by_whole_document_with_val_fraction_of_them_in_val(tmp_path):
    texts = corpus(20)
    write_files(tmp_path / "in", texts)
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}", "--val_fraction=0.25")
    meta, ids = load(tmp_path / "data" / "t")
    train, val = documents(meta, ids["train"]), documents(meta, ids["val"])
    assert len(val) == 5 and len(train) == 15
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(texts.values())
    path_of = {text: rel for rel, text in texts.items()}
    for docs in (train, val):  # each split keeps the sorted file order
        assert [path_of[d] for d in docs] == sorted(path_of[d] for d in docs)


def test_rerunning_the_same_config_rewrites_byte_identical_files(tmp_path):
    write_files(tmp_path / "in", corpus())
    out = tmp_path / "data" / "t"
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}")
    first = {name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}")
    assert {name: (out / name).read_bytes() for name in first} == first
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "report.json", "report.md", "train.bin", "val.bin"]  # no temp files left


def test_a_different_seed_gives_a_different_split(tmp_path):
    write_files(tmp_path / "in", corpus())
    val = {}
    for seed in (1337, 1):
        prepare_run(tmp_path, f"--input={tmp_path / 'in'}", f"--seed={seed}")
        meta, ids = load(tmp_path / "data" / "t")
        val[seed] = documents(meta, ids["val"])
    assert len(val[1337]) == len(val[1]) == 2 and set(val[1337]) != set(val[1])


def test_a_single_large_file_is_cut_into_pieces_that_land_in_both_splits(tmp_path):
    lines = [f"line {i:04d} of the only file\n" for i in range(444)]
    write_files(tmp_path / "in", {"big.txt": "".join(lines)})
    prepare_run(tmp_path, f"--input={tmp_path / 'in' / 'big.txt'}", "--max_document_chars=1000", "--val_fraction=0.25")
    meta, ids = load(tmp_path / "data" / "t")
    assert meta["splits"]["train"]["pieces"] + meta["splits"]["val"]["pieces"] == 12  # 444 lines of 27 chars, 37 to a piece
    train, val = documents(meta, ids["train"]), documents(meta, ids["val"])
    # one document per split: its pieces there are joined, in order, with no end-of-text between them
    assert len(train) == 1 and len(val) == 1
    train_lines, val_lines = train[0].splitlines(keepends=True), val[0].splitlines(keepends=True)
    assert train_lines == sorted(train_lines) and val_lines == sorted(val_lines)
    assert sorted(train_lines + val_lines) == lines and len(val_lines) == 3 * 37


def test_long_document_is_cut_after_line_ends_and_nothing_is_lost():
    text = "short\n" * 30 + "x" * 120 + "\n" + "tail line\n" * 5 + "no newline at the end"
    pieces = prepare.split_document(text, 50)
    assert "".join(pieces) == text and all(pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])
    assert all(len(p) <= 50 for p in pieces if "x" not in p)
    assert prepare.split_document("fits\n", 50) == ["fits\n"]


def test_glob_matches_relative_paths_at_any_depth():
    match = prepare.glob_regex("**/*.py").match
    assert match("a.py") and match("pkg/sub/a.py")
    assert not match("a.pyc") and not match("a_py")
    top = prepare.glob_regex("*.py").match
    assert top("a.py") and not top("pkg/a.py")
    assert prepare.glob_regex("docs/**").match("docs/x/y.md") and not prepare.glob_regex("docs/**").match("src/y.md")


def test_folder_input_skips_hidden_folders_and_its_own_output(tmp_path):
    texts = corpus(4)
    write_files(tmp_path / "in", {**texts, ".git/config": "[core]\n", ".notes.txt": "hidden\n"})
    args = (f"--data_root={tmp_path / 'in' / 'data'}", "--dataset=t", f"--input={tmp_path / 'in'}")
    run_script("prepare.py", *args)
    first = (tmp_path / "in" / "data" / "t" / "meta.json").read_bytes()
    run_script("prepare.py", *args)  # the first run's bins and meta.json now lie inside the input folder
    assert (tmp_path / "in" / "data" / "t" / "meta.json").read_bytes() == first
    meta, ids = load(tmp_path / "in" / "data" / "t")
    assert meta["sources"]["files"] == 4
    assert sorted(documents(meta, ids["train"]) + documents(meta, ids["val"])) == sorted(texts.values())


def test_the_default_corpus_is_the_standard_library_byte_level(tmp_path):
    run_script("prepare.py", f"--data_root={tmp_path / 'data'}")
    meta, ids = load(tmp_path / "data" / "pystdlib")
    assert meta["dataset"] == "pystdlib" and meta["tokenizer"]["kind"] == "byte"
    assert meta["sources"]["input"] == sysconfig.get_paths()["stdlib"] and meta["sources"]["files"] > 100
    assert len(ids["train"]) + len(ids["val"]) > 1e6
    assert 0 < meta["unigram_loss"] < np.log(meta["vocab_size"])


def test_unigram_loss_is_val_cross_entropy_under_add_one_smoothed_train_counts():
    # train counts 2, 1, 0 become 3, 2, 1 of 6: val token 0 has p = 1/2, token 2 has p = 1/6
    loss = prepare.unigram_loss(np.bincount([0, 0, 1], minlength=3), np.bincount([0, 2], minlength=3))
    assert loss == pytest.approx(-(np.log(1 / 2) + np.log(1 / 6)) / 2)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on the loopback interface for the folder tmp_path/www."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy configured in the environment must not see loopback requests

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    (tmp_path / "www").mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=tmp_path / "www"))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_port}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def served_corpus(tmp_path):
    data = "".join(f"served line {i}\n" for i in range(100)).encode()
    (tmp_path / "www" / "corpus.txt").write_bytes(data)
    return data


def test_a_url_is_downloaded_once_and_then_read_from_the_cache(tmp_path, server):
    data = served_corpus(tmp_path)
    sha = hashlib.sha256(data).hexdigest()
    args = (f"--url={server.url}/corpus.txt", f"--url_sha256={sha}", "--max_document_chars=300")
    prepare_run(tmp_path, *args)
    meta_path = tmp_path / "data" / "t" / "meta.json"
    first = meta_path.read_bytes()
    meta = json.loads(first)
    assert meta["sources"]["input"] == f"{server.url}/corpus.txt" and meta["sources"]["url_sha256"] == sha
    assert (tmp_path / "data" / "t" / "download" / "corpus.txt").read_bytes() == data
    server.shutdown()
    server.server_close()
    result = prepare_run(tmp_path, *args)
    assert "cached" in result.stdout and meta_path.read_bytes() == first


def test_a_wrong_url_sha256_is_a_one_line_error_and_leaves_no_file(tmp_path, server):
    served_corpus(tmp_path)
    result = prepare_run(tmp_path, f"--url={server.url}/corpus.txt", f"--url_sha256={'0' * 64}", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("prepare error") and "sha256" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert written_files(tmp_path) == []


def test_an_unreachable_url_is_a_one_line_error_that_suggests_a_local_input(tmp_path, server):
    served_corpus(tmp_path)
    server.shutdown()
    server.server_close()
    result = prepare_run(tmp_path, f"--url={server.url}/corpus.txt", check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare error") and "--input=PATH" in lines[0]
    assert written_files(tmp_path) == []


@pytest.mark.parametrize("files, input_name, extra", [
    ({}, "missing", []),
    ({"empty/": None}, "empty", []),
    ({"in/a.txt": "text\n"}, "in", ["--glob=**/*.md"]),
    ({"in/a.bin": b"\0\1\2", "in/b.bin": b"\0\3"}, "in", []),
    ({"in/only.txt": "one short line\n"}, "in", []),
    ({"in/a.txt": "a short note\n", "in/b.txt": "another one\n"}, "in", ["--quality_filters={'words': (50, None)}"]),
    ({"in/a.txt": "same\n", "in/b.txt": "SAME \n"}, "in", ["--dedup_exact=True"]),
    ({"in/a.jsonl": '{"body": "text"}\nnot json\n'}, "in", []),
    ({"in/a.txt": "text\n", "in/b.txt": "more\n"}, "in", ["--quality_filters={'wordz': (1, None)}"]),
    ({"in/a.txt": "text\n", "in/b.txt": "more\n"}, "in", ["--quality_filters={'words': 50}"]),
], ids=["missing path", "empty folder", "nothing matches glob", "only binary files", "one piece cannot split",
        "filters remove everything", "one document after dedup", "no jsonl record has the text field",
        "unknown quality rule", "a bound that is not a pair"])
def test_unusable_input_is_a_one_line_error_and_writes_nothing(tmp_path, files, input_name, extra):
    for rel, content in files.items():
        if content is None:
            (tmp_path / rel).mkdir()
        else:
            write_files(tmp_path, {rel: content})
    result = prepare_run(tmp_path, f"--input={tmp_path / input_name}", *extra, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare error"), result.stderr
    assert written_files(tmp_path) == []


def test_binary_files_in_a_folder_are_skipped_with_a_warning(tmp_path):
    texts = corpus(4)
    write_files(tmp_path / "in", {**texts, "logo.png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"})
    result = prepare_run(tmp_path, f"--input={tmp_path / 'in'}")
    assert "warning: skipping binary file logo.png" in result.stdout
    meta, ids = load(tmp_path / "data" / "t")
    assert meta["sources"]["files"] == 4 and meta["sources"]["skipped_binary"] == 1
    assert sorted(documents(meta, ids["train"]) + documents(meta, ids["val"])) == sorted(texts.values())


def test_invalid_utf8_is_replaced_and_counted_but_a_real_replacement_character_is_not(tmp_path):
    write_files(tmp_path / "in", {"bad.txt": b"ok \xff\xfe bad\n", "good.txt": "a real \ufffd in valid UTF-8\n"})
    result = prepare_run(tmp_path, f"--input={tmp_path / 'in'}")
    assert "bad.txt is not valid UTF-8; 2 characters replaced" in result.stdout and "good.txt" not in result.stdout
    meta, _ = load(tmp_path / "data" / "t")
    assert meta["sources"]["replaced_chars"] == 2


# ----- the data pipeline ------------------------------------------------------

PROSE = """The river ran slowly past the old mill, and the miller's daughter watched it from the bridge.
She had lived in the valley all her life, yet every spring the water seemed new to her.
Boats came down from the hills with timber, wool and apples, and the men called out the news.
In the evenings her father counted the sacks of flour while she read aloud from borrowed books.
Nobody in the village expected that she would one day leave for the city, least of all herself.
"""


@pytest.mark.parametrize("rule, bound, failing", [
    ("words", (50, None), "A short note, nothing more."),
    ("mean_word_length", (3, 10), "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3),
    ("mean_word_length", (3, 10), "Pneumonoultramicroscopicsilicovolcanoconiosis supercalifragilisticexpialidocious " * 30),
    ("symbol_word_ratio", (None, 0.1), "Follow #news #sports #weather #music #travel for more... and more..."),
    ("punctuation_word_ratio", (None, 0.5), "x = {'a': [1, 2], 'b': (3, 4)}; y = x['a'][0] * 2 + (x['b'][1] / 3);"),
    ("lines_ending_in_punctuation", (0.5, None), "Home\nAbout us\nProducts\nContact\nLog in\n" + PROSE[:100] + ".\n"),
    ("duplicate_lines", (None, 0.3), "Buy now and save!\n" * 4 + PROSE),
    ("duplicate_paragraphs", (None, 0.3), "Subscribe to our newsletter.\n\n" * 4 + PROSE),
    ("top_2gram", (None, 0.2), "click here " * 30 + PROSE),
    ("top_3gram", (None, 0.18), "one two three " * 25 + PROSE),
    ("top_4gram", (None, 0.16), "all rights are reserved " * 20 + PROSE),
    ("non_alphabetic", (None, 0.2), "2023-01-01 12:00 4.5 7.25 ; 2023-01-02 13:30 4.7 7.50 ; 2023-01-03 09:15 4.4 7.10"),
])
def test_each_quality_rule_keeps_prose_and_drops_its_kind_of_bad_document(rule, bound, failing):
    assert prepare.quality_problem(PROSE, {rule: bound}) is None
    assert prepare.quality_problem(failing, {rule: bound}) == rule


def test_quality_measures_count_what_their_names_say():
    m = prepare._MEASURES
    assert m["words"]("one two  three\nfour") == 4 and m["mean_word_length"]("ab abcd") == 3
    assert m["duplicate_lines"]("a\nb\n\na\nc\n") == 0.25  # one of four non-blank lines repeats an earlier one
    assert m["duplicate_paragraphs"]("p one\n\np two\n\np one") == pytest.approx(1 / 3)
    assert m["top_2gram"]("the cat the cat sat") == pytest.approx(2 * 6 / 15)  # "the cat" twice, 6 of 15 word characters
    assert m["lines_ending_in_punctuation"]("Done.\nMenu\nReally?\nLink") == 0.5
    assert m["non_alphabetic"]("ab12 c!") == pytest.approx(3 / 6)
    assert m["symbol_word_ratio"]("#a b... c") == pytest.approx(2 / 3)


def test_a_document_breaking_several_rules_is_counted_under_the_first_in_the_config():
    bounds = {"words": (50, None), "duplicate_lines": (None, 0.3)}
    assert prepare.quality_problem("spam\n" * 10, bounds) == "words"
    assert prepare.quality_problem("spam\n" * 10, dict(reversed(bounds.items()))) == "duplicate_lines"
    assert prepare.quality_problem("spam\n" * 10, {"words": (None, None)}) is None  # open at both ends


PAGE = """<!DOCTYPE html>
<html><head><title>Page title</title><meta charset="utf-8"><style>p { color: red; }</style>
<script>var x = "<p>not text</p>";</script></head>
<body><header><a href="/">Home</a> | <a href="/about">About</a></header>
<nav><ul><li>Menu one</li><li>Menu two</li></ul></nav>
<h1>Caf&eacute; &amp; Cr&egrave;me</h1>
<p>First   paragraph,
   with <b>bold</b> and <a href="#">a link</a>.</p>
<!-- a comment -->
<p>Second&nbsp;paragraph&#8217;s line<br>and a new line.</p>
<pre>def f():
    return 1</pre>
<ul><li>item one</li><li>item two</li></ul>
<footer>&copy; 2024 Someone</footer>
</body></html>"""


def test_html_becomes_its_visible_text_in_paragraphs_without_markup_scripts_or_page_chrome():
    assert prepare.html_text(PAGE) == ("Caf\u00e9 & Cr\u00e8me\n\nFirst paragraph, with bold and a link.\n\n"
                                       "Second paragraph\u2019s line\nand a new line.\n\ndef f():\n    return 1\n\n"
                                       "item one\n\nitem two")
    assert prepare.html_text("<p>unclosed <i>tags<p>and text") == "unclosed tags\n\nand text"


def gutenberg_book(start="*** START OF THIS PROJECT GUTENBERG EBOOK A BOOK ***", end="*** END OF THIS PROJECT GUTENBERG EBOOK A BOOK ***"):
    lines = ["The Project Gutenberg EBook of A Book, by Someone", "", "Title: A Book", "", start, "", "", "",
             "CHAPTER I.   ", "", "", "", "It was a dark night.", "The end.", "", "",
             "End of the Project Gutenberg EBook of A Book, by Someone", "", end, "", "Section 1. The licence.", ""]
    return "\r\n".join(lines)


@pytest.mark.parametrize("start, end", [
    ("*** START OF THIS PROJECT GUTENBERG EBOOK A BOOK ***", "*** END OF THIS PROJECT GUTENBERG EBOOK A BOOK ***"),
    ("***START OF THE PROJECT GUTENBERG EBOOK A BOOK***", "***END OF THE PROJECT GUTENBERG EBOOK A BOOK***"),
    ("*** START OF THIS PROJECT GUTENBERG EBOOK A BOOK WITH\r\nA LONG TITLE ***", "*** END OF THIS PROJECT GUTENBERG EBOOK"),
])
def test_gutenberg_header_and_licence_go_and_crlf_becomes_lf(start, end):
    settings = {"html_to_text": True, "strip_gutenberg": True, "unicode_nfc": True, "normalize_whitespace": True}
    text, changes = prepare.clean("book.txt", gutenberg_book(start, end), settings)
    assert text == "CHAPTER I.\n\nIt was a dark night.\nThe end."
    assert changes["gutenberg"][0] and changes["whitespace"][0] and not changes["nfc"][0]
    assert prepare.gutenberg_text("no markers here\r\n") == "no markers here\r\n"


def test_every_real_gutenberg_book_loses_its_header_and_licence_and_little_else():
    if not os.path.isdir(GUTENBERG):
        pytest.skip("the Gutenberg books are not in ../shared/data/gutenberg")
    for name in sorted(os.listdir(GUTENBERG)):
        with open(os.path.join(GUTENBERG, name), encoding="utf-8", newline="") as f:
            raw = f.read()
        text = prepare.tidy_whitespace(prepare.gutenberg_text(raw))
        assert not re.search(r"^\*\*\* ?(START|END) OF|Project Gutenberg-tm", text, re.MULTILINE), name
        assert not text.split("\n", 1)[0].endswith("***"), name  # nor the end of a START line that wraps
        assert 0.75 * len(raw) < len(text) < len(raw), name


def test_nfc_makes_composed_and_decomposed_text_equal():
    settings = {"html_to_text": False, "strip_gutenberg": False, "unicode_nfc": True, "normalize_whitespace": False}
    assert prepare.clean("a.txt", "cafe\u0301", settings)[0] == prepare.clean("b.txt", "caf\u00e9", settings)[0] == "caf\u00e9"


def planted_corpus():
    """30 distinct documents of random words, 3 exact copies (other case and spacing) and 4 near copies (4 words
    of 400 changed, a line added), and 2 documents that share half their text with another (similarity ~1/3)."""
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]

    def lines(words):
        return "".join(" ".join(words[i:i + 12]) + ".\n" for i in range(0, len(words), 12))

    originals = [[rng.choice(vocab) for _ in range(400)] for _ in range(30)]
    docs = {f"doc{i:02d}.txt": lines(w) for i, w in enumerate(originals)}
    exact = {f"exact{i}.txt": lines(originals[i]).upper().replace(" ", "  ") for i in (0, 5, 9)}
    near = {}
    for i in (1, 2, 3, 4):
        words = list(originals[i])
        for j in rng.sample(range(400), 4):
            words[j] = rng.choice(vocab)
        near[f"near{i}.txt"] = lines(words) + "one more line at the end.\n"
    halves = {f"half{i}.txt": lines(originals[i][:200] + [rng.choice(vocab) for _ in range(200)]) for i in (10, 11)}
    return docs, exact, near, halves


def test_dedup_finds_every_planted_exact_and_near_copy_and_keeps_the_distinct_documents():
    docs, exact, near, halves = planted_corpus()
    seen = prepare.Duplicates(16, 8, 0.8)
    a, b = prepare.minhash_functions(128)
    found = {}
    for source, text in {**docs, **exact, **near, **halves}.items():
        normal = prepare.normalized(text)
        found[source] = seen.match(source, prepare.exact_key(normal), prepare.minhash(normal, a, b))
    assert {s: r for s, r in found.items() if r} == {
        "exact0.txt": ("exact", "doc00.txt"), "exact5.txt": ("exact", "doc05.txt"), "exact9.txt": ("exact", "doc09.txt"),
        "near1.txt": ("near", "doc01.txt"), "near2.txt": ("near", "doc02.txt"),
        "near3.txt": ("near", "doc03.txt"), "near4.txt": ("near", "doc04.txt"),
    }


def test_minhash_agreement_estimates_jaccard_similarity_of_the_shingles():
    docs, _, near, halves = planted_corpus()
    a, b = prepare.minhash_functions(128)
    sig = {name: prepare.minhash(prepare.normalized(text), a, b) for name, text in {**docs, **near, **halves}.items()}
    assert (sig["doc01.txt"] == sig["near1.txt"]).mean() > 0.8
    assert 0.15 < (sig["doc10.txt"] == sig["half10.txt"]).mean() < 0.5
    assert (sig["doc01.txt"] == sig["doc02.txt"]).mean() < 0.05


def test_the_report_counts_what_each_step_removed(tmp_path):
    docs, exact, near, halves = planted_corpus()
    bad = {"short.txt": "Too short to keep.\n", "numbers.txt": "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15\n" * 10}
    write_files(tmp_path / "in", {**docs, **exact, **near, **halves, **bad, "empty.txt": ""})
    config = tmp_path / "filters.py"
    config.write_text("quality_filters = {'words': (50, None), 'non_alphabetic': (None, 0.2)}\n"
                      "dedup_exact = True\ndedup_near = True\n")
    result = prepare_run(tmp_path, str(config), f"--input={tmp_path / 'in'}")
    report = json.loads((tmp_path / "data" / "t" / "report.json").read_text())
    assert report["input"]["documents"] == 42
    assert report["removed"] == {"empty": 1, "words": 1, "non_alphabetic": 1}
    assert report["duplicates"] == {"exact": 3, "near": 4}
    assert report["examples"]["words"] == ["short.txt"] and "near1.txt repeats doc01.txt" in report["examples"]["near"]
    assert report["output"]["documents"] == 32 and report["mb_per_s"] > 0
    assert report["output"]["tokens"]["train"] + report["output"]["tokens"]["val"] == sum(
        json.loads((tmp_path / "data" / "t" / "meta.json").read_text())["splits"][s]["tokens"] for s in ("train", "val"))
    assert "duplicates: exact 3, near 4" in result.stdout


def test_jsonl_records_and_html_pages_are_documents_and_bad_records_are_skipped_and_counted(tmp_path):
    records = [{"text": "first record\n", "id": 1}, {"text": "second record \u00e9\n"}, {"content": "no text field"}]
    jsonl = "".join(json.dumps(r) + "\n" for r in records) + "\nnot json\n" + json.dumps({"text": "third\n"}) + "\n"
    write_files(tmp_path / "in", {"a.jsonl": jsonl, "page.html": PAGE, "notes.md": "# Notes\n"})
    result = prepare_run(tmp_path, f"--input={tmp_path / 'in'}")
    assert "skipping 2 records of a.jsonl" in result.stdout and "(the first: a.jsonl:3)" in result.stdout
    meta, ids = load(tmp_path / "data" / "t")
    assert meta["sources"]["files"] == 3 and meta["sources"]["bad_records"] == 2
    assert sorted(documents(meta, ids["train"]) + documents(meta, ids["val"])) == sorted(
        ["first record\n", "second record \u00e9\n", "third\n", prepare.html_text(PAGE), "# Notes\n"])
    result = prepare_run(tmp_path, f"--input={tmp_path / 'in'}", "--text_field=content")
    meta, _ = load(tmp_path / "data" / "t")
    assert meta["sources"]["bad_records"] == 4 and meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 3


def test_sharded_and_single_file_outputs_hold_the_same_tokens(tmp_path):
    write_files(tmp_path / "in", corpus(40))
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}", "--tokenizer=char")
    single, single_ids = load(tmp_path / "data" / "t")
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}", "--tokenizer=char", "--shard_tokens=100")
    with open(tmp_path / "data" / "t" / "meta.json") as f:
        sharded = json.load(f)
    out = tmp_path / "data" / "t"
    for split in ("train", "val"):
        files = sharded["splits"][split]["files"]
        assert files == [f"{split}_{i:03d}.bin" for i in range(len(files))] and len(files) > 1
        shards = [np.fromfile(out / name, dtype=sharded["dtype"]) for name in files]
        assert all(len(s) == 100 for s in shards[:-1]) and 0 < len(shards[-1]) <= 100
        assert np.array_equal(np.concatenate(shards), single_ids[split])
        assert sharded["splits"][split]["tokens"] == single["splits"][split]["tokens"]
    assert not (out / "train.bin").exists()  # the single-file run's bins are gone, not left beside the shards


def test_the_number_of_workers_does_not_change_the_output(tmp_path):
    write_files(tmp_path / "in", corpus(30))
    bins = {}
    for workers in (1, 3):
        prepare_run(tmp_path, f"--input={tmp_path / 'in'}", "--tokenizer=bpe", "--bpe_vocab_size=400",
                    "--dedup_near=True", f"--num_workers={workers}")
        bins[workers] = [(tmp_path / "data" / "t" / f"{split}.bin").read_bytes() for split in ("train", "val")]
    assert bins[1] == bins[3]


def test_the_pool_never_holds_more_than_ahead_tasks():
    class Pool:
        def __init__(self):
            self.in_flight = self.most = 0

        def apply_async(self, fn, args):
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            pool = self

            class Result:
                def get(self):
                    pool.in_flight -= 1
                    return fn(*args)
            return Result()

    pool = Pool()
    assert list(prepare.imap_bounded(pool, lambda x: 2 * x, iter(range(100)), ahead=4)) == [2 * x for x in range(100)]
    assert pool.most == 4


def test_an_interrupted_run_leaves_the_previous_dataset_whole_and_no_temporary_file(tmp_path):
    run_script("prepare.py", f"--data_root={tmp_path}")
    out = tmp_path / "pystdlib"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "report.json"}
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "prepare.py"), f"--data_root={tmp_path}", "--tokenizer=char"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any(p.name.endswith(".bin.tmp") for p in out.iterdir()) and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)  # Ctrl-C, while the new bins are being written
    process.wait(timeout=60)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    if process.returncode != 0:  # it stopped before renaming anything into place
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "report.json"} == before


def local_input_for(config_path, folder):
    """A small local stand-in for what a data config downloads or reads, in the format it expects."""
    text = "".join(f"Line {i}: the quick brown fox, said she, jumps over the lazy dog.\n" for i in range(400))
    texts = ["".join(f"{word} {i}: the {word} fox, said {word}, jumps over the dog.\n" for i in range(400))
             for word in ("red", "quiet", "older")]  # different enough to survive near deduplication
    if "fineweb" in config_path:
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = folder / "shard.parquet"
        pq.write_table(pa.table({"text": [text[i:i + 2000] for i in range(0, len(text), 2000)]}), path)
        return path
    if "gutenberg" in config_path or "sitepackages" in config_path:  # configs that read a folder
        name = "{}.py" if "sitepackages" in config_path else "{}.txt"
        write_files(folder / "in", {name.format(i): t for i, t in enumerate(texts)})
        return folder / "in"
    (folder / "input.txt").write_text(text * 10)  # 260 KB: more than one piece of max_document_chars
    return folder / "input.txt"


DATA_CONFIGS = sorted(os.path.relpath(p, REPO) for p in __import__("glob").glob(os.path.join(REPO, "config", "data_*.py")))


@pytest.mark.parametrize("config_path", DATA_CONFIGS)
def test_every_data_config_prepares_a_local_input_offline(tmp_path, config_path, monkeypatch):
    # the README's offline form of every data config: --input replaces the config's url (whose checksum is
    # the download's, not the local file's) or its folder
    source = (open(os.path.join(REPO, config_path)).read())
    if 'tokenizer = "gpt2"' in source:
        if not os.path.isdir(TIKTOKEN_CACHE):
            pytest.skip("tiktoken's gpt2 files are not in ../shared/data/tiktoken_cache, and tests do not download them")
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(TIKTOKEN_CACHE))
    local = local_input_for(config_path, tmp_path)
    extra = ["--bpe_vocab_size=300", "--quality_filters={}"] if "gutenberg" in config_path else []
    result = run_script("prepare.py", config_path, f"--input={local}", f"--data_root={tmp_path / 'data'}", *extra)
    assert "Traceback" not in result.stderr
    dataset = next(p for p in (tmp_path / "data").iterdir())
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] > 0


def test_input_sha256_checks_a_local_input_file(tmp_path):
    (tmp_path / "input.txt").write_text("some text to check\n" * 50)
    sha = hashlib.sha256((tmp_path / "input.txt").read_bytes()).hexdigest()
    good = prepare_run(tmp_path, f"--input={tmp_path / 'input.txt'}", f"--input_sha256={sha}", "--max_document_chars=200")
    assert good.returncode == 0
    bad = prepare_run(tmp_path, f"--input={tmp_path / 'input.txt'}", f"--input_sha256={'1' * 64}", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        f"prepare error: {tmp_path / 'input.txt'} has sha256 {sha}, expected input_sha256={'1' * 64}; "
        "check the file, or leave the check out"]


def test_a_machine_without_the_optional_libraries_prepares_plain_text_and_names_the_pip_command_for_the_rest(
        tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"  # modules that fail to import, found before the installed ones
    for module in ("zstandard", "pyarrow", "huggingface_hub"):
        write_files(blocked, {f"{module}.py": "raise ImportError('not installed')\n"})
    monkeypatch.setenv("PYTHONPATH", str(blocked))
    write_files(tmp_path, {"in/a.txt": "one document\n" * 50, "in/b.txt": "another one\n" * 50})
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}")
    assert (tmp_path / "data" / "t" / "meta.json").exists()
    for name, library in (("c.parquet", "pyarrow"), ("d.jsonl.zst", "zstandard")):
        write_files(tmp_path, {name: b"PAR1" if library == "pyarrow" else b"\x28\xb5\x2f\xfd"})
        result = prepare_run(tmp_path, f"--input={tmp_path / name}", "--dataset=u", check=False)
        assert result.stderr.strip().endswith(f"needs {library}; pip install {library}"), result.stderr
