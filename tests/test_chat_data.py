"""Post-training data: prepare_chat.py makes SFT records and DPO pairs of a prepared corpus's documented
functions (which are kept, which are not, the held-out split, the pairs, determinism), and chat.py
downloads records given by URL, checked by sha256 (from a local HTTP server, never the internet)."""

import functools
import hashlib
import http.server
import json
import os
import textwrap
import threading

import pytest

from chat import read_records, split_held_out
from conftest import run_script, write_byte_dataset

TRAIN_MODULE = textwrap.dedent('''\
    """A module of the training split."""
    import os


    def join_words(words, sep=" "):
        """Join words with sep between them.

        The second paragraph is not part of the request.
        """
        # a comment stays
        return sep.join(words)


    def _private(x):
        """Private helpers are left out."""
        return x


    def undocumented(x):
        return x + 1


    def test_something():
        """Tests are left out."""
        assert True


    def abstract(self):
        """A stub is left out."""
        raise NotImplementedError


    def long_one(n):
        """Too long for the context."""
    ''') + "".join(f"    n += {i}\n" for i in range(200)) + textwrap.dedent('''\
        return n


    class Stack:
        """A class."""

        def __init__(self):
            """Dunders are private too."""
            self.items = []

        def push(self, item):
            """Put item on top."""
            self.items.append(item)
            return len(self.items)

        def peek(self):
            """The top item, or None."""
            return self.items[-1] if self.items else None


    def copied(a, b):
        """Copied code: the same function in both splits."""
        return a * b + 1
    ''')

VAL_MODULE = textwrap.dedent('''\
    def count_vowels(text, vowels="aeiou"):
        """Count the vowels in text."""
        total = 0
        for char in text.lower():
            total += char in vowels
        return total


    async def fetch_all(urls):
        """Fetch every url."""
        return [await fetch(url) for url in urls]


    def copied(a, b):
        """Copied code: the same function in both splits."""
        return a * b + 1
    ''')


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    write_byte_dataset(str(root / "data" / "code"), [TRAIN_MODULE, "not Python at all: (\n"], [VAL_MODULE])
    run = run_script("prepare_chat.py", f"--data_root={root / 'data'}", "--dataset=code", "--block_size=256")
    return root / "data" / "code_chat", run.stdout


def test_a_documented_function_becomes_a_request_from_its_signature_and_first_paragraph_and_its_code(chat_data):
    folder, _ = chat_data
    sft = {r["function"]: r for r in records(folder / "sft_train.jsonl")}
    assert sft["join_words"]["instruction"] == ("Write a Python function `join_words(words, sep=' ')` that: Join words "
                                                "with sep between them.")
    assert sft["join_words"]["output"] == 'def join_words(words, sep=" "):\n    # a comment stays\n    return sep.join(words)'
    assert sft["Stack.push"]["instruction"] == ("Write a method `push(self, item)` of a Python class `Stack` that: Put "
                                                "item on top.")
    assert sft["Stack.push"]["output"] == "def push(self, item):\n    self.items.append(item)\n    return len(self.items)"
    heldout = {r["function"]: r for r in records(folder / "sft_heldout.jsonl")}
    assert heldout["fetch_all"]["instruction"].startswith("Write an async Python function `fetch_all(urls)`")


def test_private_undocumented_test_stub_and_overlong_functions_are_left_out_and_counted(chat_data):
    folder, stdout = chat_data
    kept = {r["function"] for r in records(folder / "sft_train.jsonl")}
    assert kept == {"join_words", "Stack.push", "Stack.peek", "copied"}
    removed = json.loads((folder / "report.json").read_text())["removed"]
    # _private and Stack.__init__; test_something; undocumented; abstract; long_one; copied in the val split
    assert (removed["private"], removed["test"], removed["undocumented"], removed["stub"], removed["too long"],
            removed["also in train"]) == (2, 1, 1, 1, 1, 1)
    assert "4 training and 2 held-out functions" in stdout


def test_held_out_functions_are_those_of_the_val_split_and_never_in_a_train_file(chat_data):
    folder, _ = chat_data
    heldout = records(folder / "sft_heldout.jsonl")
    assert {r["function"] for r in heldout} == {"count_vowels", "fetch_all"}
    train_text = (folder / "sft_train.jsonl").read_text() + (folder / "dpo_train.jsonl").read_text()
    for record in heldout:
        assert record["function"] not in train_text and record["output"] not in train_text
    assert [r["answer"] for r in records(folder / "heldout_def_lines.jsonl")] == [
        'def count_vowels(text, vowels="aeiou"):', "async def fetch_all(urls):"]
    assert (folder / "example_request.txt").read_text().startswith("Write a Python function `count_vowels(")


def test_pairs_choose_the_real_code_and_reject_another_body_another_def_line_or_half_the_body(chat_data):
    folder, _ = chat_data
    for suffix in ("train", "heldout"):
        sft, dpo = records(folder / f"sft_{suffix}.jsonl"), records(folder / f"dpo_{suffix}.jsonl")
        # the same functions in the same order: sft.py and dpo.py hold out the same ones
        assert [r["function"] for r in sft] == [r["function"] for r in dpo]
        held_out = [[r["function"] for r in split_held_out(made, 0.5)[1]] for made in (sft, dpo)]
        assert held_out[0] == held_out[1]
        for s, pair in zip(sft, dpo):
            assert pair["instruction"] == s["instruction"] and pair["chosen"] == s["output"]
            def_line, *body = pair["chosen"].split("\n")
            rejected_def_line, *rejected_body = pair["rejected"].split("\n")
            if pair["rejected_is"] == "another function's body":
                assert rejected_def_line == def_line and rejected_body != body
            elif pair["rejected_is"] == "another function's def line":
                assert rejected_def_line != def_line and rejected_body == body
            else:
                assert pair["rejected_is"] == "its body cut in half"
                assert rejected_def_line == def_line and rejected_body == body[: len(body) // 2]
    kinds = [r["rejected_is"] for r in records(folder / "dpo_train.jsonl")]
    assert kinds == ["another function's body", "another function's def line", "its body cut in half",
                     "another function's body"]


def test_the_same_corpus_gives_byte_identical_files(chat_data, tmp_path):
    folder, _ = chat_data
    run_script("prepare_chat.py", f"--data_root={folder.parent}", "--dataset=code", "--block_size=256",
               f"--out_dir={tmp_path}")
    for path in folder.iterdir():
        if not path.name.startswith("report."):  # the card and its timings
            assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_missing_dataset_or_one_without_functions_stops_with_one_line(tmp_path):
    missing = run_script("prepare_chat.py", f"--data_root={tmp_path}", "--dataset=none", check=False)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines() == [
        f"prepare_chat error: no prepared dataset in {tmp_path / 'none'}; run python prepare.py first (with "
        "--dataset=none if it is not the default)"]
    write_byte_dataset(str(tmp_path / "prose"), ["Just words.\n"], ["More words.\n"])
    prose = run_script("prepare_chat.py", f"--data_root={tmp_path}", "--dataset=prose", check=False)
    assert prose.returncode != 0 and len(prose.stderr.strip().splitlines()) == 1
    assert "0 training and 0 held-out documented functions" in prose.stderr


# -----------------------------------------------------------------------------
# records by URL


class Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        self.server.requests.append(self.path)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server of tmp_path/served; the tests run in tmp_path, so data/downloads is there."""
    (tmp_path / "served").mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Files, directory=tmp_path / "served"))
    httpd.requests, httpd.url = [], f"http://127.0.0.1:{httpd.server_port}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.chdir(tmp_path)
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def serve(tmp_path, name, records):
    data = json.dumps(records).encode()
    (tmp_path / "served" / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_records_by_url_are_downloaded_once_checked_and_then_read_from_the_copy(server, tmp_path):
    sha = serve(tmp_path, "instructions.json", [{"instruction": "Say hi.", "output": "Hi!"}])
    url = f"{server.url}/instructions.json"
    first = read_records(url, sha)
    assert first == [("data/downloads/instructions.json record 1", {"instruction": "Say hi.", "output": "Hi!"})]
    assert read_records(url, sha) == first and server.requests == ["/instructions.json"]  # the second from the copy
    assert sorted(os.listdir("data/downloads")) == ["instructions.json"]


def test_a_wrong_sha256_stops_with_one_line_and_leaves_nothing_behind(server, tmp_path):
    sha = serve(tmp_path, "prefs.json", [{"instruction": "Hi?", "chosen": "Hello.", "rejected": "Go away."}])
    with pytest.raises(SystemExit) as stop:
        read_records(f"{server.url}/prefs.json", "0" * 64)
    assert str(stop.value) == (f"data error: {server.url}/prefs.json has sha256 {sha}, expected {'0' * 64}; the "
                               "file changed upstream: check it, then pass its sha256 (--data_sha256=) or leave the "
                               "check out")
    assert os.listdir("data/downloads") == []


def test_processes_that_ask_for_the_same_url_at_once_download_it_once(server, tmp_path):
    sha = serve(tmp_path, "big.json", [{"instruction": f"Say {i}.", "output": "x" * 1000} for i in range(300)])
    results = []
    readers = [threading.Thread(target=lambda: results.append(read_records(f"{server.url}/big.json", sha)))
               for _ in range(3)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert len(results) == 3 and results[0] == results[1] == results[2] and len(results[0]) == 300
    assert server.requests == ["/big.json"]
