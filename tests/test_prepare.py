"""prepare.py: files in, train/val bins and meta.json out, split by document, deterministic, one-line errors."""

import functools
import hashlib
import http.server
import json
import os
import sysconfig
import threading

import numpy as np
import pytest

import prepare
from conftest import REPO, run_script
from tokenizer import Tokenizer

TIKTOKEN_CACHE = os.path.join(REPO, os.pardir, "shared", "data", "tiktoken_cache")


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


@pytest.mark.parametrize("kind", ["byte", "char", "gpt2"])
def test_each_tokenizer_round_trips_every_document(tmp_path, kind, request):
    if kind == "gpt2":
        request.getfixturevalue("gpt2_files")
    texts = corpus()
    write_files(tmp_path / "in", texts)
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}", f"--tokenizer={kind}")
    meta, ids = load(tmp_path / "data" / "t")
    assert meta["tokenizer"]["kind"] == kind
    assert sorted(documents(meta, ids["train"]) + documents(meta, ids["val"])) == sorted(texts.values())


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
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no temp files left


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
    loss = prepare.unigram_loss(np.array([0, 0, 1]), np.array([0, 2]), 3)
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
], ids=["missing path", "empty folder", "nothing matches glob", "only binary files", "one piece cannot split"])
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
