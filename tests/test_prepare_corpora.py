"""prepare.py on real pretraining corpora, without a network: Parquet, gzip and zstd files, JSON Lines named
.json, JSON arrays, row filters and limits; downloads from a local HTTP server (resume after a dropped
connection, sha256 checks, URL lists, 404) and hf:// paths from a local fake of the Hugging Face hub; stale
temporaries, Ctrl-C, and a table of bad inputs that must each stop with one line and touch nothing."""

import gzip
import hashlib
import http.server
import io
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pyarrow
import pyarrow.parquet
import pytest
import zstandard

import prepare
from conftest import REPO
from test_prepare import documents, load, prepare_run, write_files

HUB_COMMIT = "c0ffee" * 6 + "c0ff"  # the fake hub's one commit; every dataset name holds server.hub's files


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files ({url path: bytes}) with HTTP Range support, dropping the connection half-way the
    first time a path in server.drop_once is asked for; and the hub endpoints that huggingface_hub calls
    for a dataset, whose files are server.hub ({path in the repository: (bytes, sha256 the hub states)})."""

    def log_message(self, *args):
        pass

    def reply(self, code, body=b"", headers=(), send=None):
        self.send_response(code)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body if send is None else send)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        server, path = self.server, urllib.parse.unquote(self.path.split("?")[0])
        if path in server.files:
            data = server.files[path]
            start = int((re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")) or [0, 0])[1])
            server.ranges.append((path, start))
            if start:
                return self.reply(206, data[start:], [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")])
            if path in server.drop_once:
                server.drop_once.remove(path)
                self.close_connection = True
                return self.reply(200, data, send=data[:len(data) // 2])
            return self.reply(200, data)
        if repo := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(/revision/[^/]+)?", path):
            return self.reply(200, json.dumps({"id": repo[1], "sha": HUB_COMMIT}).encode())
        if tree := re.fullmatch(r"/api/datasets/[^/]+/[^/]+/tree/[^/]+/?(.*)", path):
            folder, entries = tree[1].strip("/"), {}
            for name, (data, sha) in server.hub.items():
                parts = name.split("/")
                for i in range(1, len(parts)):  # the folders above the file
                    entries["/".join(parts[:i])] = {"type": "directory", "path": "/".join(parts[:i]), "oid": "0" * 40}
                entries[name] = {"type": "file", "path": name, "size": len(data), "oid": "1" * 40,
                                 "lfs": {"oid": sha, "size": len(data), "pointerSize": 130}}
            inside = [e for p, e in sorted(entries.items()) if not folder or p.startswith(folder + "/")]
            if "recursive=true" not in self.path.lower():
                inside = [e for e in inside if e["path"].rpartition("/")[0] == folder]
            return self.reply(200, json.dumps(inside).encode())
        if (file := re.fullmatch(r"/datasets/[^/]+/[^/]+/resolve/[^/]+/(.+)", path)) and file[1] in server.hub:
            data = server.hub[file[1]][0]
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            return self.reply(200, data, [("X-Repo-Commit", HUB_COMMIT), ("ETag", etag), ("X-Linked-Etag", etag),
                                          ("X-Linked-Size", str(len(data)))])
        self.reply(404, b'{"error": "not found"}', [("X-Error-Code", "EntryNotFound")])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, which the prepare.py subprocesses reach as plain URLs and as HF_ENDPOINT."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.drop_once, httpd.ranges, httpd.hub = {}, set(), [], {}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NO_PROXY", "127.0.0.1")  # a proxy configured in the environment must not see loopback requests
        env.setenv("HF_ENDPOINT", httpd.url)
        env.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        env.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        env.delenv("HF_HUB_OFFLINE", raising=False)
        yield httpd
    httpd.shutdown()
    httpd.server_close()


TEXTS = [f"document {i}: café, 日本語\nits second line {i}\n" for i in range(24)]


def parquet_bytes(rows, row_group_size=4):
    out = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), out, row_group_size=row_group_size)
    return out.getvalue()


def jsonl(texts, **fields):
    return "".join(json.dumps({"text": t, **fields}) + "\n" for t in texts).encode()


def all_documents(data_dir):
    meta, ids = load(data_dir)
    return meta, sorted(documents(meta, ids["train"]) + documents(meta, ids["val"]))


def test_parquet_gzip_zstd_json_lines_named_json_and_json_arrays_are_each_read_as_records(tmp_path):
    t = TEXTS
    write_files(tmp_path / "in", {
        "a.parquet": parquet_bytes([{"id": i, "text": x} for i, x in enumerate(t[0:6])]),  # two row groups, a half
        "b.jsonl.gz": gzip.compress(jsonl(t[6:9])),
        "c.json.zst": zstandard.ZstdCompressor().compress(jsonl(t[9:12])),  # Dolma's and DCLM's shards
        "d.json": json.dumps([{"text": x} for x in t[12:15]], indent=1).encode(),
        "e.txt.gz": gzip.compress(t[15].encode()),
        "f.jsonl.zstd": zstandard.ZstdCompressor().compress(jsonl(t[16:18])),
        "g.json": jsonl(t[18:20]),
    })
    result = prepare_run(tmp_path, f"--input={tmp_path / 'in'}")
    meta, docs = all_documents(tmp_path / "data" / "t")
    assert docs == sorted(t[:20]) and meta["sources"]["files"] == 7 and "warning" not in result.stdout


def test_a_json_array_is_parsed_record_by_record_across_read_boundaries():
    records = [{"text": "x" * 1000 + str(i), "n": [i, {"nested": "]"}]} for i in range(3000)]  # 3 MB: 3 reads
    data = json.dumps(records).encode()
    parsed = list(prepare.json_array_records(io.BytesIO(data)))
    assert [r for _, r, _ in parsed] == records and [n for n, _, _ in parsed] == list(range(1, 3001))
    assert [r for _, r, _ in prepare.json_array_records(io.BytesIO(b' [ ] '))] == []
    assert [r for _, r, _ in prepare.json_array_records(io.BytesIO(b'[{"text": "a"}, {"text": '))] == [{"text": "a"}, None]


def test_row_filters_keep_the_rows_whose_columns_pass_and_count_the_rest(tmp_path):
    rows = [{"text": x, "score": i % 5, "language": "en" if i % 3 else "fr"} for i, x in enumerate(TEXTS)]
    write_files(tmp_path / "in", {"shard.parquet": parquet_bytes(rows), "more.jsonl": jsonl(TEXTS[:2])})
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}", "--row_filters={'score': (3, None), 'language': ['en']}")
    _, docs = all_documents(tmp_path / "data" / "t")
    assert docs == sorted(r["text"] for r in rows if r["score"] >= 3 and r["language"] == "en")
    report = json.loads((tmp_path / "data" / "t" / "report.json").read_text())
    by_score = sum(r["score"] < 3 for r in rows) + 2  # the .jsonl records have no score column
    assert report["removed"]["row_filter:score"] == by_score
    assert report["removed"]["row_filter:language"] == sum(r["score"] >= 3 and r["language"] != "en" for r in rows)


@pytest.mark.parametrize("limit, expected", [("--max_documents=7", 7), (f"--max_tokens={7 * 40}", 7)])
def test_limits_keep_a_prefix_of_the_stream(tmp_path, limit, expected):
    texts = [f"doc {i:02d} " + "x" * 31 + "\n" for i in range(20)]  # 39 bytes: 40 byte tokens with end-of-text
    write_files(tmp_path / "in", {"shard.jsonl.gz": gzip.compress(jsonl(texts))})
    result = prepare_run(tmp_path, f"--input={tmp_path / 'in'}", limit)
    meta, docs = all_documents(tmp_path / "data" / "t")
    assert docs == texts[:expected] and "stopping at the limit" in result.stdout
    assert sum(s["tokens"] for s in meta["splits"].values()) == 40 * expected


def test_a_dropped_download_resumes_with_a_range_request_and_is_checked(tmp_path, server):
    padding = [{"text": f"{i} " + os.urandom(3000).hex()} for i in range(100)]  # 600 KB: many 64 KB chunks
    data = parquet_bytes([{"text": x} for x in TEXTS] + padding, row_group_size=8)
    server.files["/drop/shard.parquet"] = data
    server.drop_once.add("/drop/shard.parquet")
    sha = hashlib.sha256(data).hexdigest()
    result = prepare_run(tmp_path, f"--input={server.url}/drop/shard.parquet", f"--input_sha256={sha}")
    assert "resuming" in result.stdout
    starts = [start for path, start in server.ranges if path == "/drop/shard.parquet"]
    assert len(starts) == 2 and starts[0] == 0 and len(data) // 4 < starts[1] <= len(data) // 2
    meta, docs = all_documents(tmp_path / "data" / "t")
    assert docs == sorted(TEXTS + [r["text"] for r in padding]) and meta["sources"]["url_sha256"] == sha
    assert (tmp_path / "data" / "t" / "download" / "shard.parquet").read_bytes() == data


def test_a_url_list_downloads_every_shard_checks_each_sha256_and_reads_them_in_order(tmp_path, server):
    shards = [jsonl(TEXTS[i:i + 8]) for i in range(0, 24, 8)]
    for i, shard in enumerate(shards):
        server.files[f"/list/{i}/part{i}.jsonl"] = shard
    lines = [f"{server.url}/list/{i}/part{i}.jsonl {hashlib.sha256(s).hexdigest()}" for i, s in enumerate(shards)]
    (tmp_path / "urls.txt").write_text("# three shards\n" + "\n".join(lines) + "\n")
    prepare_run(tmp_path, f"--input={tmp_path / 'urls.txt'}", "--download_workers=2")
    meta, docs = all_documents(tmp_path / "data" / "t")
    assert docs == sorted(TEXTS) and meta["sources"]["files"] == 3
    assert sorted(p.name for p in (tmp_path / "data" / "t" / "download").iterdir()) == ["part0.jsonl", "part1.jsonl", "part2.jsonl"]


def test_a_url_list_that_names_a_hub_path_is_a_one_line_error_saying_where_hub_paths_go(tmp_path):
    (tmp_path / "urls.txt").write_text("https://example.com/a.jsonl\nhf://datasets/o/n/*.parquet\n")
    result = prepare_run(tmp_path, f"--input={tmp_path / 'urls.txt'}", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "names hf://datasets/o/n/*.parquet; pass hf:// paths in --input itself" in result.stderr


def test_a_url_list_keeps_its_urls_past_a_comment_longer_than_one_read_and_a_nul_anywhere_makes_it_no_list(tmp_path):
    # url_list reads 64 KB at a time (a binary file may hold no newline): a comment's tail is still comment.
    urls = tmp_path / "urls.txt"
    urls.write_text("# " + "x" * 200_000 + "\nhttps://example.com/a.jsonl\n")
    assert prepare.url_list(urls) == [("https://example.com/a.jsonl", "")]
    urls.write_text("# a note \0\nhttps://example.com/a.jsonl\n")
    assert prepare.url_list(urls) is None


def test_the_fineweb_edu_config_reads_its_hub_glob_into_the_hub_cache_and_checks_each_sha256(tmp_path, server):
    server.hub.clear()
    for i in range(2):
        data = parquet_bytes([{"text": x, "score": 3.1} for x in TEXTS[i * 12:(i + 1) * 12]])
        server.hub[f"sample/10BT/{i:03d}_00000.parquet"] = (data, hashlib.sha256(data).hexdigest())
    server.hub["sample/100BT/000_00000.parquet"] = server.hub["sample/10BT/000_00000.parquet"]  # not in the glob
    server.hub["sample/10BT/README.md"] = (b"not a shard", hashlib.sha256(b"not a shard").hexdigest())
    data_dir = tmp_path / "data" / "fineweb_edu"
    prepare_run(tmp_path, "config/data_fineweb_edu.py", "--tokenizer=byte", "--row_filters={'score': (3, None)}")
    meta, docs = all_documents(data_dir)
    assert docs == sorted(TEXTS) and meta["sources"]["files"] == 2
    assert meta["sources"]["input"] == "hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet"
    cached = list(pathlib.Path(os.environ["HF_HOME"]).rglob("*.parquet"))
    assert len(cached) == 2 and all(HUB_COMMIT in str(p) for p in cached)
    server.hub["sample/10BT/001_00000.parquet"] = (data, "0" * 64)  # the hub states another sha256
    for p in cached:
        p.unlink()
    result = prepare_run(tmp_path, "config/data_fineweb_edu.py", "--tokenizer=byte", check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "the hub says 000" in result.stderr


def test_stale_temporaries_of_a_killed_run_are_removed_and_a_live_runs_are_kept(tmp_path):
    write_files(tmp_path / "in", {f"{i}.txt": x for i, x in enumerate(TEXTS[:4])})
    out = tmp_path / "data" / "t"
    out.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no process holds any more
    stale = [out / f"documents.jsonl.{gone.pid}.tmp", out / f"train_000.bin.{gone.pid}.tmp"]
    live = out / f"val_000.bin.{os.getpid()}.tmp"
    for path in [*stale, live]:
        path.write_bytes(b"x" * 1000)
    result = prepare_run(tmp_path, f"--input={tmp_path / 'in'}")
    assert not any(p.exists() for p in stale) and live.exists() and "left by a run that was stopped" in result.stdout


def test_ctrl_c_ends_with_one_line_naming_the_untouched_dataset_and_no_traceback(tmp_path):
    write_files(tmp_path / "in", {"a.txt": "some text\n" * 100, "b.txt": "more text\n" * 100})
    prepare_run(tmp_path, f"--input={tmp_path / 'in'}")
    out = tmp_path / "data" / "t"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # a URL that never answers keeps the run waiting, its worker pool started, until Ctrl-C
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/never.txt"
        process = subprocess.Popen([sys.executable, os.path.join(REPO, "prepare.py"), f"--data_root={tmp_path / 'data'}",
                                    "--dataset=t", f"--input={tmp_path / 'in'} {url}"],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, NO_PROXY="127.0.0.1"),
                                   # Ctrl-C as from a terminal: SIGINT at its default, even if the pytest worker ignores it
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        listener.settimeout(120)
        connection, _ = listener.accept()  # the download has started: the run is past its setup
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
        connection.close()
    assert process.returncode != 0 and "Traceback" not in stderr + stdout
    assert stderr.strip().splitlines() == [f"prepare stopped: interrupted; {out} is as it was before this run"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.fixture(scope="module")
def earlier_dataset(tmp_path_factory):
    """A data_root holding dataset t, prepared once; and its bad inputs' folder."""
    root = tmp_path_factory.mktemp("table")
    write_files(root / "in", {f"{i}.txt": x for i, x in enumerate(TEXTS[:6])})
    write_files(root / "bad", {
        "blob.bin": b"\0\1\2\3" * 100,
        "words.json": b"just words, not JSON\n",
        "other.parquet": parquet_bytes([{"body": "a text in the wrong column"}]),
        "cut.jsonl.gz": gzip.compress(jsonl(TEXTS))[:60],
        "urls.txt": b"http://127.0.0.1:9/a.txt\n",  # filled in by the test with the server's address
    })
    prepare_run(root, f"--input={root / 'in'}")
    return root


BAD_INPUTS = [
    ("bad/blob.bin", [], "no format prepare.py reads"),
    ("bad/words.json", [], "no format prepare.py reads"),
    ("bad/other.parquet", [], "has no column 'text'"),
    ("bad/other.parquet", ["--text_field=body", "--row_filters={'score': (3, None)}"], "has no column 'score'"),
    ("bad/cut.jsonl.gz", [], "cannot read"),
    ("in", ["--dataset=../x"], "not a folder name"),
    ("in", ["--dataset="], "not a folder name"),
    ("in", ["--val_fraction=0"], "val_fraction=0"),
    ("in", ["--tokenizer=char", "--max_tokens=100"], "max_tokens needs"),
    ("in", ["--row_filters={'score': (3,)}"], "not a (min, max) pair"),
    ("URL/table/a.txt", [f"--input_sha256={'0' * 64}"], "expected 000"),
    ("in/0.txt", [f"--input_sha256={'0' * 64}"], "expected input_sha256=000"),
    ("URL/table/missing.txt", [], "404"),
    ("bad/urls.txt", [], "expected 000"),
    ("URL/table/a.txt URL/table/b.txt", ["--input_sha256=abc"], "input_sha256 checks a single file or URL"),
    ("hf://datasets/o/n/nothing/*.parquet", [], "cannot list hf://datasets/o/n/nothing"),
]


@pytest.mark.parametrize("input_name, extra, problem", BAD_INPUTS,
                         ids=[f"{i}-{p.split()[0]}" for i, (_, _, p) in enumerate(BAD_INPUTS)])
def test_a_bad_input_stops_with_one_line_and_leaves_the_earlier_dataset_byte_for_byte(
        earlier_dataset, server, input_name, extra, problem):
    root = earlier_dataset
    server.files["/table/a.txt"] = server.files["/table/b.txt"] = b"served text\n" * 20
    (root / "bad" / "urls.txt").write_text(f"{server.url}/table/a.txt {'0' * 64}\n")
    before = {p: p.read_bytes() for p in (root / "data").rglob("*") if p.is_file()}
    spec = " ".join(part if part.startswith(("URL", "hf://")) else str(root / part) for part in input_name.split())
    result = prepare_run(root, f"--input={spec.replace('URL', server.url)}", *extra, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare error") and problem in lines[0], result.stderr
    assert {p: p.read_bytes() for p in (root / "data").rglob("*") if p.is_file() and "download" not in p.parts} == \
        {p: b for p, b in before.items() if "download" not in p.parts}
    assert not (root / "x").exists()
