"""
Turn raw text into the token files that train.py reads: read the documents, clean them, drop the
low-quality ones and the duplicates, split them into train and val, tokenize, and write the ids to
disk, with a report of what each step removed.

    python prepare.py                                   # offline default: the Python standard library's source, byte-level
    python prepare.py config/data_gutenberg.py --input=../shared/data/gutenberg   # books: clean, filter, dedup, train a BPE
    python prepare.py config/data_shakespeare_char.py   # Tiny Shakespeare, char-level (downloads 1.1 MB once)
    python prepare.py --input=~/notes --glob='**/*.md' --dataset=notes --tokenizer=gpt2
    python prepare.py config/data_fineweb_edu.py        # FineWeb-Edu's Parquet shards from the Hugging Face hub
    python prepare.py --input=urls.txt --tokenizer=gpt2 --dataset=web --max_tokens=1_000_000_000

Reads --input (files, folders, URLs, hf:// globs, URL lists), else the preset's --url, else the standard
library's .py files (no network). Writes <data_root>/<dataset>/: train.bin and val.bin (or numbered
shards), meta.json (written last: a dataset with one is complete), tokenizer.tiktoken for 'bpe', and
report.json. The formats, the steps (clean, filter, dedup, split, tokenize), the files and the
measurements: docs/prepare.md.
"""

import collections
import concurrent.futures
import contextlib
import functools
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import sysconfig
import threading
import time
import unicodedata
import urllib.parse
from html.parser import HTMLParser

import numpy as np

from configurator import configure
from download import download, file_sha256, progress
from optional import optional
from runlog import save_atomically, write_card
from tokenizer import Tokenizer, count_words

# -----------------------------------------------------------------------------
# output
dataset = "pystdlib"  # the folder under data_root
data_root = "data"
shard_tokens = 100_000_000  # tokens per bin file; a split with more is written as numbered shards
# source
# --input: a file, a folder, an http(s) URL, hf://datasets/OWNER/NAME/path/glob, a file listing URLs (one a line,
# each optionally followed by its sha256), or several of these separated by spaces; empty: url, else the stdlib
input = ""
url = ""  # a preset's download, used when input is empty
url_sha256 = ""  # the expected sha256 of url; a config's url and its checksum are not used when --input is given
input_sha256 = ""  # the expected sha256 of --input when it is one file or URL; empty skips the check
glob = "**/*"  # which files of a folder to read, matched on the path relative to it ('**/' spans folders)
text_field = "text"  # the field (JSON) or column (Parquet) of each record that holds its document
download_workers = 4  # downloads that run at once, ahead of the file being read
# cleaning, in this order
html_to_text = True  # .html/.htm files: the visible text, without tags, scripts, styles, navigation, headers, footers
strip_gutenberg = False  # keep only the book between Project Gutenberg's "*** START OF" and "*** END OF" lines
unicode_nfc = False  # compose characters (e + U+0301 becomes é), so equal text is equal bytes
normalize_whitespace = False  # CRLF to LF, no trailing spaces, at most one blank line in a row
# row filters on the records' other fields or columns: {column: (min, max) | [allowed values] | value};
# e.g. {"score": (3, None), "language": "en"}; a record without the column is dropped
row_filters = {}
# limits: a deterministic prefix of a large corpus (0: no limit), counted after filters and dedup
max_documents = 0
max_tokens = 0  # with end-of-text; 'gpt2' and 'byte' tokenizers only (they exist before the corpus is read)
# quality filters: {rule: (min, max)}, None for an open end; the rules are in _MEASURES, values in config/data_gutenberg.py
quality_filters = {}
# deduplication
dedup_exact = False  # drop a document whose lower-cased, whitespace-collapsed text was seen before
dedup_near = False  # drop a document whose MinHash signature is near_threshold similar to a kept one's
near_threshold = 0.8  # estimated Jaccard similarity of the documents' sets of shingles
minhash_bands = 16  # LSH: a pair is compared when all minhash_rows values of one band agree;
minhash_rows = 8  # with 16 x 8, a pair of similarity 0.8 is compared with probability 0.95, 0.9 with 0.9999
# tokenizer
tokenizer = "byte"  # 'gpt2' | 'bpe' (trained here) | 'char' | 'byte'
bpe_vocab_size = 8192  # 'bpe': all ids, the 256 bytes, the merges and end-of-text
# split
val_fraction = 0.1  # share of the documents (pieces) that go to val
seed = 1337
max_document_chars = 100_000  # longer documents are cut at line ends into pieces of at most this size
# work
num_workers = 0  # processes that clean and tokenize; 0: one per CPU core
# -----------------------------------------------------------------------------

# ----- reading ---------------------------------------------------------------


def hub_files(pattern):
    """The sources (name, ("hub", repo_id, revision, path in the repository), the hub's sha256 or None, False)
    of the files of a dataset repository that hf://datasets/OWNER/NAME[@REVISION]/GLOB matches, sorted."""
    hub, errors = optional("huggingface_hub", "an hf:// input"), optional("huggingface_hub.errors", "an hf:// input")
    fs = hub.HfFileSystem()
    try:
        resolved = fs.resolve_path(pattern)
        found = fs.glob(pattern, detail=True)
    except (errors.HfHubHTTPError, OSError, ValueError, NotImplementedError) as e:
        raise SystemExit(f"prepare error: cannot list {pattern} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "check the dataset name and path, and HF_TOKEN for a gated or private dataset") from None
    if resolved.repo_type != "dataset":
        raise SystemExit(f"prepare error: {pattern} is not a dataset path; write hf://datasets/OWNER/NAME/path/glob")
    prefix = f"{resolved.repo_type}s/{resolved.repo_id}"
    files = []
    for path, info in sorted(found.items()):
        if info["type"] == "file":
            in_repo = path.split("/", 3)[3] if path.startswith(prefix) else path
            files.append((f"{resolved.repo_id}/{in_repo}", ("hub", resolved.repo_id, resolved.revision, in_repo),
                          (info.get("lfs") or {}).get("sha256"), False))
    return files


def hub_download(repo_id, revision, in_repo, expected_sha256):
    """A dataset file from the hub, through its cache (resumed, HF_TOKEN, HF_HOME), checked against its sha256."""
    hub, errors = optional("huggingface_hub", "an hf:// input"), optional("huggingface_hub.errors", "an hf:// input")
    try:
        path = hub.hf_hub_download(repo_id, in_repo, repo_type="dataset", revision=revision)
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        raise SystemExit(f"prepare error: could not download {in_repo} of {repo_id} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); check the network and HF_TOKEN") from None
    digest = file_sha256(path)
    if expected_sha256 and digest != expected_sha256:
        raise SystemExit(f"prepare error: {in_repo} of {repo_id} in the hub cache has sha256 {digest}, the hub says "
                         f"{expected_sha256}; delete it from the cache ({path}) and run again")
    return path, digest


_REMOTE = ("http://", "https://", "hf://")


def is_remote(where):
    return not isinstance(where, str) or where.startswith(_REMOTE)


def url_list(path):
    """The (URL, sha256 or '') lines of a file that holds only URLs (and # comments), or None."""
    entries = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            in_comment = False  # in a comment line longer than one read
            for line in iter(lambda: f.readline(1 << 16), ""):  # 64 KB at most: a binary file may hold no newline
                if "\0" in line:  # a binary file
                    return None
                fields = line.split()
                comment = in_comment or bool(fields) and fields[0].startswith("#")
                in_comment = comment and not line.endswith("\n")
                if fields and not comment:
                    if fields[0].startswith("hf://"):  # a hub glob is listed by the hub, not downloaded by URL
                        raise SystemExit(f"prepare error: the URL list {path} names {fields[0]}; pass hf:// paths in "
                                         "--input itself (several separated by spaces)")
                    if not fields[0].startswith(_REMOTE) or len(fields) > 2:
                        return None
                    entries.append((fields[0], fields[1] if len(fields) == 2 else ""))
    except OSError:
        return None
    return entries


def input_sources(spec, out_dir):
    """What --input names, as (name, local path or URL or hub file, expected sha256, found in a folder)
    in reading order; a single file or URL is checked against input_sha256."""
    parts = [spec] if os.path.exists(os.path.expanduser(spec)) else spec.split()  # [spec]: a path with spaces
    sources = []
    for part in parts:
        path, urls = os.path.expanduser(part), None
        if part.startswith("hf://"):
            if not (matches := hub_files(part)):
                raise SystemExit(f"prepare error: no file of the hub matches {part}; check the path and the glob")
            sources += matches
        elif part.startswith(("http://", "https://")):
            urls = [(part, "")]
        elif not os.path.exists(path):
            raise SystemExit(f"prepare error: --input={part} does not exist; pass an existing file, folder, "
                             "http(s) URL or hf://datasets/... path")
        elif os.path.isdir(path):
            if not (found := list_files(path, glob, skip_folder=os.path.abspath(out_dir))):
                raise SystemExit(f"prepare error: no files in {path} match --glob={glob}; check --input and --glob")
            sources += [(rel, p, "", True) for rel, p in found]
        elif (urls := url_list(path)) is None:
            sources.append((os.path.basename(path), path, "", False))
        elif not urls:
            raise SystemExit(f"prepare error: the URL list {path} names no URL; add one a line")
        if urls:  # a URL, or the lines of a URL list
            sources += [(os.path.basename(urllib.parse.urlparse(u).path) or u, u, sha, False) for u, sha in urls]
    if input_sha256:
        name, where, _, listed = sources[0]
        if len(sources) != 1 or listed or isinstance(where, tuple):
            raise SystemExit(f"prepare error: input_sha256 checks a single file or URL, and --input names {len(sources)} "
                             "files; give each URL's sha256 after it in a URL list instead")
        if is_remote(where):
            sources[0] = (name, where, input_sha256, listed)  # checked as it downloads
        elif (digest := file_sha256(where)) != input_sha256:
            raise SystemExit(f"prepare error: {where} has sha256 {digest}, expected input_sha256={input_sha256}; "
                             "check the file, or leave the check out")
    names = [name for name, where, _, _ in sources if isinstance(where, str) and is_remote(where)]
    if len(set(names)) < len(names):
        raise SystemExit("prepare error: two URLs end in the same file name, and downloads are kept by name; "
                         "download them yourself into one folder and pass --input=FOLDER")
    return sources


def in_background(fn, *args):
    """Run fn(*args) in a daemon thread, which never holds up the exit after an error or Ctrl-C; return its Future."""
    future = concurrent.futures.Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # a SystemExit too: raised again where the result is read
            future.set_exception(e)
    threading.Thread(target=run, daemon=True).start()
    return future


def fetched(sources, folder, ahead, stop):
    """(name, local path, sha256 or None, found in a folder) for each source in order; remote ones are
    downloaded up to `ahead` at a time, so later shards arrive while earlier ones are read."""
    def fetch(where, sha):
        if isinstance(where, tuple):
            return hub_download(*where[1:], sha)
        return download(where, sha, folder, stop, stage="prepare", local_option="--input", sha256_option="--url_sha256= "
                        "for a config's url, --input_sha256= for --input, or after the URL in a URL list")

    def result(entry):
        name, where, future, listed = entry
        return (name, where, None, listed) if future is None else (name, *future.result(), listed)

    pending = collections.deque()
    for name, where, sha, listed in sources:
        pending.append((name, where, in_background(fetch, where, sha) if is_remote(where) else None, listed))
        while len(pending) >= ahead or (pending and pending[0][2] is None):
            yield result(pending.popleft())
    yield from map(result, pending)


def glob_regex(pattern):
    """A glob over '/'-separated relative paths: '**/' spans any number of folders, even none; '*' and '?' stay within a name."""
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    parts = re.split(r"(\*\*/?|\*|\?)", pattern)
    return re.compile("".join(wildcards.get(p, re.escape(p)) for p in parts) + r"\Z")


def list_files(root, pattern, skip_names=(), skip_folder=None):
    """(relative path, path) of the files under root that match pattern, sorted so every run reads them in the same order."""
    match = glob_regex(pattern).match
    root = os.path.abspath(root)
    found = []
    for folder, subfolders, names in os.walk(root):
        # not hidden folders (.git, .venv: no corpus text), nor the output folder (its own bins and meta.json)
        subfolders[:] = [d for d in subfolders
                         if not d.startswith(".") and d not in skip_names and os.path.join(folder, d) != skip_folder]
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if not name.startswith(".") and match(rel):
                found.append((rel, path))
    return sorted(found)


def decode(data):
    """UTF-8 bytes to text, invalid bytes replaced with U+FFFD; and how many characters were replaced."""
    text = data.decode("utf-8", errors="replace")
    # a U+FFFD that the file already holds is text, not a replacement
    return text, text.count("\ufffd") - data.count("\ufffd".encode())


def warn_replaced(source, replaced, stats):
    if replaced:
        print(f"warning: {source} is not valid UTF-8; {replaced} characters replaced with U+FFFD")
        stats["replaced_chars"] += replaced


_FORMATS = ("plain text, HTML (.html, .htm), JSON Lines (.jsonl, .ndjson, or .json holding a record a line), "
            "a JSON array of records (.json), Parquet (.parquet); each but Parquet also compressed as .gz, .zst or .zstd")


def open_decompressed(path):
    """The file's bytes, decompressed by its suffix (.gz, .zst, .zstd), as a buffered stream read on demand."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith((".zst", ".zstd")):
        zstandard = optional("zstandard", "reading .zst files")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), 1 << 20)
    return open(path, "rb")


def without_compression(name):
    """The lower-cased name without a .gz, .zst or .zstd suffix: the name of the format inside."""
    return re.sub(r"\.(gz|zst|zstd)$", "", name.lower())


def file_format(name, head):
    """'parquet', 'jsonl', 'json_array' or 'text' (HTML too), from the name without its compression suffix and
    the first bytes of the (decompressed) content; None for a format prepare.py does not read."""
    plain = without_compression(name)
    if plain.endswith(".parquet"):  # read by seeking to its footer, so never compressed as a whole
        return "parquet" if head.startswith(b"PAR1") and plain == name.lower() else None
    if b"\0" in head:  # text never holds NUL bytes; images, archives and .bin files do
        return None
    if plain.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if plain.endswith(".json"):  # Dolma's and DCLM's shards, decompressed, are JSON Lines named .json
        return {b"[": "json_array", b"{": "jsonl"}.get(head.lstrip()[:1])
    return "text"


def json_array_records(f):
    """(number, item, 0) for each item of a JSON array, parsed one at a time from a stream."""
    reader = io.TextIOWrapper(f, encoding="utf-8", errors="replace")
    decoder, buffer, pos, n = json.JSONDecoder(), "", 0, 0
    while True:
        pos = len(buffer) - len(buffer[pos:].lstrip(" \t\r\n,["))  # the opening bracket too (file_format saw it)
        if buffer.startswith("]", pos):
            return
        try:
            record, pos = decoder.raw_decode(buffer, pos)
        except ValueError:  # the record runs past the buffer: read more
            if not (more := reader.read(1 << 20)):
                if buffer[pos:].strip():
                    yield n + 1, None, 0  # the array is cut short or malformed
                return
            buffer, pos = buffer[pos:] + more, 0
            continue
        n += 1
        yield n, record, 0


def jsonl_records(f):
    """(line number, record, characters replaced) of each line of a JSON Lines stream, None for a line
    that is not JSON; blank lines skipped."""
    for n, line in enumerate(f, 1):
        if line.strip():
            line, replaced = decode(line)
            try:
                yield n, json.loads(line), replaced
            except ValueError:
                yield n, None, replaced


def parquet_records(path):
    """(row number, {column: value}, 0) for each row of a Parquet file, a row group at a time: the columns
    that text_field and row_filters name."""
    columns = list(dict.fromkeys([text_field, *row_filters]))
    parquet = optional("pyarrow.parquet", "reading Parquet files").ParquetFile(path)
    if missing := [c for c in columns if c not in parquet.schema_arrow.names]:
        raise SystemExit(f"prepare error: {path} has no column {', '.join(map(repr, missing))} (its columns: "
                         f"{', '.join(parquet.schema_arrow.names)}); set --text_field or row_filters to one of them")
    n = 0
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group, columns=columns)
        values = [table.column(c).to_pylist() for c in columns]
        for n, row in enumerate(zip(*values), n + 1):
            yield n, dict(zip(columns, row)), 0


def row_filter_problem(record, filters):
    """The first column of filters that record fails, or None. A (min, max) tuple bounds a number (None:
    open end), a list holds the values allowed, anything else is the one value allowed."""
    for column, allowed in filters.items():
        value = record.get(column)
        if isinstance(allowed, tuple):
            low, high = allowed
            if not isinstance(value, (int, float)) or (low is not None and value < low) or (high is not None and value > high):
                return column
        elif value not in (allowed if isinstance(allowed, list) else [allowed]):
            return column
    return None


def record_documents(name, records, stats, removed):
    """(source, text) of each record that holds a text_field string and passes row_filters."""
    n_bad, first_bad, replaced = 0, None, 0
    for n, record, line_replaced in records:
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            n_bad, first_bad = n_bad + 1, first_bad or n
            continue
        if row_filters and (column := row_filter_problem(record, row_filters)):
            removed[f"row_filter:{column}"] += 1
            continue
        # JSON can spell half of a surrogate pair ("\ud83d"), which is no character and has no UTF-8
        text, surrogates = re.subn("[\ud800-\udfff]", "\ufffd", text)
        replaced += line_replaced + surrogates
        yield f"{name}:{n}", text
    warn_replaced(name, replaced, stats)
    if n_bad:
        print(f"warning: skipping {n_bad:,} records of {name} that are not JSON records with a '{text_field}' string "
              f"(the first: {name}:{first_bad}); set --text_field to the field that holds the text")
        stats["bad_records"] += n_bad


def read_errors():
    """What a damaged file raises as it is read, the zstandard and Parquet readers' errors once imported."""
    return (OSError, EOFError) + tuple(getattr(sys.modules[module], name) for module, name in
                                       (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")) if module in sys.modules)


def read_documents(files, stats, removed):
    """(source, text) of every document of the files ((name, path, sha256 or None, found in a folder));
    a file in no known format is an error, or skipped with a warning when found in a folder."""
    combined = hashlib.sha256()
    for name, path, digest, listed in files:
        try:
            with open_decompressed(path) as f:
                kind = file_format(name, f.read(8192))
            if kind is None:
                if not listed:
                    raise SystemExit(f"prepare error: {name} is in no format prepare.py reads; it reads {_FORMATS}")
                print(f"warning: skipping binary file {name}: in no format prepare.py reads")
                stats["skipped_binary"] += 1
                continue
            with open_decompressed(path) as f:
                if kind == "text":
                    text, replaced = decode(f.read())
                    warn_replaced(name, replaced, stats)
                    yield name, text
                else:  # records, streamed: a file can be larger than memory
                    records = {"jsonl": jsonl_records, "json_array": json_array_records, "parquet": parquet_records}[kind]
                    yield from record_documents(name, records(path if kind == "parquet" else f), stats, removed)
        except read_errors() as e:
            raise SystemExit(f"prepare error: cannot read {path} ({type(e).__name__}: {e}); "
                             "check the file (a truncated download?) or leave it out with --glob")
        stats.update(files=1, bytes=os.path.getsize(path), downloads=bool(digest))
        if digest:
            stats["download_sha256"] = digest
        combined.update(f"{name}\0{digest or file_sha256(path)}\n".encode(errors="surrogateescape"))
        stats["sha256"] = combined.hexdigest()


# ----- cleaning --------------------------------------------------------------


class HTMLText(HTMLParser):
    """The visible text of an HTML page, a blank line between blocks: no tags, scripts, styles, title,
    navigation, headers or footers; entities decoded; whitespace collapsed as a browser shows it, but in <pre>."""

    SKIP = {"script", "style", "noscript", "template", "svg", "title", "nav", "header", "footer", "aside"}
    BLOCKS = {"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "dl",
              "dt", "dd", "table", "tr", "blockquote", "pre", "figure", "figcaption", "hr", "body", "form"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping, self.in_pre = [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")
        self.in_pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")
        self.in_pre = max(0, self.in_pre - (tag == "pre"))

    def handle_data(self, data):
        if self.skipping:
            return
        if not self.in_pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip()
        self.parts.append(data)


def html_text(html):
    parser = HTMLText()
    parser.feed(html)
    parser.close()
    text = re.sub(r"[ \t]+\n", "\n", "".join(parser.parts))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# the START line ends with "***", sometimes on the next line when the title is long
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (?:[\s\S]{0,300}?\*\*\*|.*)", re.MULTILINE)
# the licence follows the "*** END OF" line, often after an "End of the Project Gutenberg EBook of ..." line
GUTENBERG_END = re.compile(r"^(?:\*\*\* ?END OF |End of (?:the )?Project Gutenberg)", re.MULTILINE | re.IGNORECASE)


def gutenberg_text(text):
    """The book without Project Gutenberg's header and licence; text without the markers comes back as it is."""
    if start := GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := GUTENBERG_END.search(text):
        text = text[:end.start()]
    return text


def tidy_whitespace(text):
    """LF line ends, no trailing whitespace, at most one blank line in a row, nothing blank at either end."""
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def is_html(name):
    return without_compression(name).endswith((".html", ".htm"))


def clean(source, text, config):
    """The text after each switched-on cleaning step, and for each step (whether it changed the text, characters removed)."""
    changes = {}
    for name, on, step in [("html", config["html_to_text"] and is_html(source), html_text),
                           ("gutenberg", config["strip_gutenberg"], gutenberg_text),
                           ("nfc", config["unicode_nfc"], lambda t: unicodedata.normalize("NFC", t)),
                           ("whitespace", config["normalize_whitespace"], tidy_whitespace)]:
        if on:
            cleaned = step(text)
            changes[name] = (cleaned != text, len(text) - len(cleaned))
            text = cleaned
    return text, changes


# ----- quality filters -------------------------------------------------------


def ratio(part, whole):
    return part / whole if whole else 0.0


@functools.lru_cache(maxsize=1)
def words_of(text):
    """The whitespace-separated words, as Gopher counts them; cached, as most rules need them for the same text."""
    return text.split()


def lines_ending_in_punctuation(text):
    """Share of the non-blank lines that end like a sentence (C4 keeps only those lines; menus and lists do not)."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    ends = (".", "!", "?", '"', "'", "\u201d", "\u2019", ":", ";", ")")
    return ratio(sum(line.endswith(ends) for line in lines), len(lines))


def repeated_share(items):
    """Share of the non-blank items that repeat an earlier one."""
    items = [item.strip() for item in items if item.strip()]
    return ratio(len(items) - len(set(items)), len(items))


def top_ngram_share(text, n):
    """Share of the word characters covered by the most frequent word n-gram (Gopher: at most 0.20, 0.18, 0.16 for n = 2, 3, 4)."""
    words = words_of(text)
    if len(words) < n:
        return 0.0
    # one 64-bit key per n-gram: a polynomial in the words' hashes, wrapping around 2**64 (collisions are negligible)
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    keys = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for k in range(n):
        keys = keys * np.uint64(1_000_003) + ids[k:len(words) - n + 1 + k]
    values, counts = np.unique(keys, return_counts=True)
    # of the n-grams tied for most frequent, the longest, so the result does not depend on the hash values
    ends = np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=len(words)))
    chars = ends[n - 1:] - np.concatenate(([0], ends[:-n]))
    longest = chars[np.isin(keys, values[counts == counts.max()])].max()
    return min(1.0, counts.max() * longest / ends[-1])


def non_alphabetic(text):
    """Share of the non-space characters that are not letters (digits, punctuation, symbols)."""
    non_space = "".join(words_of(text))
    return ratio(len(re.sub(r"[^\W\d_]+", "", non_space)), len(non_space))


# The quality rules by name, as quality_filters names them (underscored: a config key holds settings).
_MEASURES = {
    "words": lambda text: len(words_of(text)),
    "mean_word_length": lambda text: ratio(sum(map(len, words_of(text))), len(words_of(text))),
    # hashes and ellipses per word: many mean lists of tags or truncated snippets (Gopher: at most 0.1)
    "symbol_word_ratio": lambda text: ratio(text.count("#") + text.count("...") + text.count("\u2026"),
                                            len(words_of(text))),
    # punctuation and symbol characters per word: high for tables, markup leftovers, code and spam
    "punctuation_word_ratio": lambda text: ratio(len(re.sub(r"[\w\s]+", "", text)), len(words_of(text))),
    "lines_ending_in_punctuation": lines_ending_in_punctuation,
    "duplicate_lines": lambda text: repeated_share(text.splitlines()),
    "duplicate_paragraphs": lambda text: repeated_share(re.split(r"\n\s*\n", text)),
    **{f"top_{n}gram": functools.partial(top_ngram_share, n=n) for n in (2, 3, 4)},
    "non_alphabetic": non_alphabetic,
}


def quality_problem(text, bounds):
    """The first rule of bounds ({rule: (min, max)}) whose measure of text falls outside, or None."""
    for rule, (low, high) in bounds.items():
        value = _MEASURES[rule](text)
        if (low is not None and value < low) or (high is not None and value > high):
            return rule
    return None


# ----- deduplication ---------------------------------------------------------


def normalized(text):
    """Lower case, single spaces: the form documents are compared in, so layout and capitals do not hide a copy."""
    return " ".join(text.lower().split())


def exact_key(normal):
    return hashlib.blake2b(normal.encode("utf-8"), digest_size=16).digest()


def minhash_functions(n):
    """n hash functions h(x) = (a*x + b) mod 2**64, top 32 bits (multiply-shift hashing), from a fixed seed."""
    rng = np.random.default_rng(0)
    a = rng.integers(1, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    return a, b


def minhash(normal, a, b, shingle_bytes=32):
    """MinHash signature of a normalized text: for each hash function, its smallest value over the text's
    shingles, the 32 bytes from each word start. The share of positions where two signatures agree
    estimates the Jaccard similarity of their shingle sets."""
    data = np.frombuffer(normal.encode("utf-8") + bytes(shingle_bytes), dtype=np.uint8)
    starts = np.concatenate(([0], np.flatnonzero(data[:-shingle_bytes - 1] == ord(" ")) + 1))
    # each shingle as four 64-bit numbers (its bytes 0-7, 8-15, ...), folded into one by a polynomial mod 2**64
    windows = np.lib.stride_tricks.sliding_window_view(data, 8)
    lanes = np.ascontiguousarray(windows[starts[:, None] + np.arange(0, shingle_bytes, 8)]).view(np.uint64)[..., 0]
    shingles = np.zeros(len(starts), dtype=np.uint64)
    for k in range(lanes.shape[1]):
        shingles = shingles * np.uint64(0x100000001B3) + lanes[:, k]
    # min over the shingles in blocks, so the (functions x shingles) table stays small; the top 32
    # bits of the smallest value are the smallest top 32 bits, so the shift comes last
    signature = np.full(len(a), 2**64 - 1, dtype=np.uint64)
    for i in range(0, len(shingles), 4096):
        hashes = a[:, None] * shingles[None, i:i + 4096]
        hashes += b[:, None]
        np.minimum(signature, hashes.min(axis=1), out=signature)
    return (signature >> np.uint64(32)).astype(np.uint32)


class Duplicates:
    """The kept documents, remembered by exact key and by MinHash signature; the first of a group is kept.
    LSH banding: a new signature is compared only with the kept ones that agree with it on every row of
    some band, and is a near duplicate of the first whose share of agreeing values reaches the threshold."""

    def __init__(self, bands, rows, threshold):
        self.rows, self.threshold = rows, threshold
        self.exact = {}  # exact key → source
        self.buckets = [{} for _ in range(bands)]  # for each band: {its rows' values' hash: index or indices into self.kept}
        self.kept = []  # (source, signature)

    def match(self, source, key, signature):
        """('exact' or 'near', the kept source that text repeats), or None after remembering source as kept."""
        if key is not None and key in self.exact:
            return "exact", self.exact[key]
        if signature is not None:
            # a 64-bit hash of each band's values stands for them: half the memory of the bytes, and two
            # different bands share one with probability 2**-64
            bands = [hash(signature[i:i + self.rows].tobytes()) for i in range(0, len(signature), self.rows)]
            held = [bucket.get(band, ()) for bucket, band in zip(self.buckets, bands)]
            for i in sorted({i for h in held for i in ((h,) if isinstance(h, int) else h)}):
                if np.mean(self.kept[i][1] == signature) >= self.threshold:
                    return "near", self.kept[i][0]
        if key is not None:
            self.exact[key] = source
        if signature is not None:
            index = len(self.kept)
            for bucket, band in zip(self.buckets, bands):
                held = bucket.setdefault(band, index)  # a lone index, the common case, needs no list
                if isinstance(held, list):
                    held.append(index)
                elif held != index:
                    bucket[band] = [held, index]
            self.kept.append((source, signature))
        return None


# ----- the pool of workers ----------------------------------------------------

_worker = {}  # a worker process's own state, set once by the pool's initializer, not sent with every task


def start_worker(load, *args):
    # Ctrl-C reaches every process of the terminal's group: the main process alone stops the run,
    # and ends the workers without each printing a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    load(*args)


def load_cleaner(config):
    _worker["config"] = config
    _worker["minhash"] = minhash_functions(config["minhash_bands"] * config["minhash_rows"])
    if config["max_tokens"]:
        _worker["tokenizer"] = Tokenizer.train(config["tokenizer"])


def clean_and_check(batch):
    """For each (source, text): the cleaned text, what each cleaning step changed, the quality rule it
    breaks (or None), its dedup keys, for 'bpe' its word counts, and when max_tokens is set its tokens
    (with end-of-text); the decisions that need the whole corpus stay with the caller."""
    s = _worker["config"]
    results = []
    for source, text in batch:
        text, changes = clean(source, text, s)
        rule = "empty" if not text else quality_problem(text, s["quality_filters"])
        normal = normalized(text) if rule is None and (s["dedup_exact"] or s["dedup_near"]) else None
        key = exact_key(normal) if normal is not None and s["dedup_exact"] else None
        signature = minhash(normal, *_worker["minhash"]) if normal is not None and s["dedup_near"] else None
        words = count_words([text]) if rule is None and s["tokenizer"] == "bpe" else None
        tokens = len(_worker["tokenizer"].encode(text)) + 1 if rule is None and s["max_tokens"] else 0
        results.append((source, text, changes, rule, key, signature, words, tokens))
    return results


def load_encoder(description, dtype):
    # The tokenizer is rebuilt from its description in each worker: the same description a checkpoint carries.
    _worker["tokenizer"], _worker["dtype"] = Tokenizer(description), dtype


def encode_batch(batch):
    """(split, ids, ends_document) for each (split, text, ends_document); end-of-text follows where a document ends."""
    tok, dtype = _worker["tokenizer"], _worker["dtype"]
    return [(split, np.array(tok.encode(text) + [tok.eot_id] * ends, dtype=dtype), ends) for split, text, ends in batch]


def batched(items, max_chars=1 << 20):
    """Lists of consecutive items of about max_chars of text (an item's second field) each, one list per
    task, so small documents do not each pay a round trip to a worker."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[1])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def worker_pool(workers, initializer, initargs):
    """multiprocessing.Pool, closed and joined however the block ends. Not Pool's own `with`: its terminate
    can stop a worker that is writing a result larger than a pipe holds, which then keeps the result
    queue's lock forever (prepare hung after "stopping at the limit" in 2 of 200 runs)."""
    pool = multiprocessing.Pool(workers, initializer=initializer, initargs=initargs)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()


def imap_bounded(pool, fn, batches, ahead):
    """pool.imap with at most `ahead` tasks in flight: Pool.imap reads its whole input at once,
    which would hold the corpus in memory."""
    pending = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(fn, (batch,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    yield from (result.get() for result in pending)


# ----- split, tokenize, write ------------------------------------------------


def split_document(text, max_chars):
    """Cut text after line ends into pieces of at most max_chars (a single longer line stays whole)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind("\n", start, start + max_chars) + 1
        if cut <= start:  # no line end within max_chars: end the piece at the end of this long line
            cut = text.find("\n", start + max_chars) + 1 or len(text)
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def pieces_by_split(texts, is_val, max_chars):
    """(split, piece, ends_document) for each piece of each text, in order; a document's last piece
    in a split ends it there, so each document is followed by one end-of-text in each split it is in."""
    i = 0
    for text in texts:
        pieces = split_document(text, max_chars)
        splits = ["val" if v else "train" for v in is_val[i:i + len(pieces)]]
        i += len(pieces)
        last = {split: j for j, split in enumerate(splits)}
        for j, (piece, split) in enumerate(zip(pieces, splits)):
            yield split, piece, last[split] == j


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class ShardWriter:
    """Appends one split's token ids to files of at most shard_tokens each, under temporary names until
    finish() renames them: <split>.bin when one file holds the split, else <split>_000.bin, <split>_001.bin, ..."""

    def __init__(self, folder, split, shard_tokens):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.temporary, self.file, self.room, self.tokens = [], None, 0, 0

    def write(self, ids):
        while len(ids):
            if self.room == 0:  # the next file
                if self.file:
                    self.file.close()
                self.temporary.append(temporary_name(os.path.join(self.folder, f"{self.split}_{len(self.temporary):03d}.bin")))
                self.file, self.room = open(self.temporary[-1], "wb"), self.shard_tokens
            written = min(len(ids), self.room)
            ids[:written].tofile(self.file)
            self.room, self.tokens, ids = self.room - written, self.tokens + written, ids[written:]

    def finish(self):
        self.file.close()
        names = [f"{self.split}.bin"] if len(self.temporary) == 1 else \
            [f"{self.split}_{i:03d}.bin" for i in range(len(self.temporary))]
        for tmp, name in zip(self.temporary, names):
            os.replace(tmp, os.path.join(self.folder, name))  # a reader sees the old file or the whole new one
        return names


def unigram_loss(train_counts, val_counts):
    """Cross-entropy (nats/token) of val under train's token frequencies, add-one smoothed: the loss
    of a model that ignores context. Both arguments count each id's occurrences."""
    p = (train_counts + 1.0) / (train_counts + 1.0).sum()
    return float(-(val_counts * np.log(p)).sum() / val_counts.sum())


def temporary_name(path):
    """Where a file is written before it is renamed to path: the process id in the name tells a
    later run whether the file's writer is still alive."""
    return f"{path}.{os.getpid()}.tmp"


def remove_stale_temporaries(folder):
    """Delete the temporary files that a killed run left in folder (their process is gone)."""
    for name in os.listdir(folder):
        if match := re.fullmatch(r".+\.(\d+)\.tmp", name):
            try:
                os.kill(int(match[1]), 0)  # signal 0 only asks whether the process exists
            except PermissionError:  # alive, run by another user
                pass
            except ProcessLookupError:
                with contextlib.suppress(FileNotFoundError):  # a run started beside this one may have removed it first
                    os.remove(os.path.join(folder, name))
                    print(f"removed {name}, left by a run that was stopped")


def read_scratch(path):
    """The kept documents, one JSON string a line, as prepare wrote them."""
    with open(path, encoding="utf-8") as f:
        yield from map(json.loads, f)


def check_config():
    """What configurator.VALID_RANGES cannot say about prepare.py's keys."""
    def is_bounds(v):
        return isinstance(v, (tuple, list)) and len(v) == 2 and all(x is None or isinstance(x, (int, float)) for x in v)

    if not dataset or dataset in (".", "..") or os.path.basename(dataset) != dataset or "\\" in dataset:
        raise SystemExit(f"prepare error: --dataset={dataset!r} is not a folder name; name one folder under "
                         f"{data_root}, e.g. --dataset=mycorpus")
    if not 0 < val_fraction < 1:  # train.py needs a val split to evaluate on
        raise SystemExit(f"prepare error: val_fraction={val_fraction} is outside (0, 1), and training needs a val "
                         "split; use e.g. --val_fraction=0.1 (or 0.001 for a large corpus)")
    if max_tokens and tokenizer not in ("gpt2", "byte"):
        raise SystemExit(f"prepare error: max_tokens needs a tokenizer that exists before the corpus is read "
                         f"(gpt2 or byte), not {tokenizer}; use --max_documents instead")
    for column, allowed in row_filters.items():
        if isinstance(allowed, tuple) and not is_bounds(allowed):
            raise SystemExit(f"prepare error: row_filters['{column}'] = {allowed!r} is not a (min, max) pair; write "
                             "e.g. {'score': (3, None)}, a list of allowed values, or the one value allowed")
    for rule, bound in quality_filters.items():
        if rule not in _MEASURES:
            raise SystemExit(f"prepare error: unknown quality filter '{rule}'; the rules are {', '.join(_MEASURES)}")
        if not is_bounds(bound):
            raise SystemExit(f"prepare error: quality_filters['{rule}'] = {bound!r} is not a (min, max) pair; "
                             "write e.g. (None, 0.1), None for an open end")


def summary_line(counts):
    return ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "none"


if __name__ == "__main__":
    config = configure(globals())
    print(f"prepare config: {json.dumps(config)}")
    t0 = time.time()
    check_config()
    out_dir = os.path.join(data_root, dataset)
    workers = num_workers or os.cpu_count()

    stats = collections.Counter(files=0, bytes=0, skipped_binary=0, replaced_chars=0, bad_records=0)
    scratch = temporary_name(os.path.join(out_dir, "documents.jsonl"))
    writers, replacing = {}, False
    stop_downloads = threading.Event()
    try:
        # find the sources: --input, else the preset's download, else the standard library
        if input:
            sources = input_sources(input, out_dir)
        elif url:
            sources = [(os.path.basename(urllib.parse.urlparse(url).path) or "download", url, url_sha256, False)]
        else:
            # the standard library's own modules: not the third-party packages installed inside it, nor its test suites
            skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
            stdlib = sysconfig.get_paths()["stdlib"]
            sources = [(rel, path, "", True) for rel, path in list_files(stdlib, glob, skip_names=skip) if rel.endswith(".py")]
        print(f"reading {len(sources):,} files from {input or url or stdlib}")
        os.makedirs(out_dir, exist_ok=True)
        remove_stale_temporaries(out_dir)

        # 1-3: clean, filter and dedup in stream order; the kept documents go to the scratch file
        n_in, n_docs, n_pieces, chars_kept, tokens_kept = 0, 0, 0, 0, 0
        cleaned = collections.defaultdict(lambda: {"documents_changed": 0, "chars_removed": 0})
        removed = collections.Counter({rule: 0 for rule in ["empty", *quality_filters]})
        duplicates = collections.Counter(exact=0, near=0)
        examples = collections.defaultdict(list)  # the first few documents each rule removed, to look at
        seen = Duplicates(minhash_bands, minhash_rows, near_threshold)
        word_counts = collections.Counter()  # 'bpe': the pre-tokenized words of the kept documents
        last_print, limit_reached = time.time(), False
        files = fetched(sources, os.path.join(out_dir, "download"), download_workers, stop_downloads)
        # a pool costs a round trip of each document's text: worth it only when there is work to share out
        share_out = bool(quality_filters or dedup_exact or dedup_near or max_tokens or tokenizer == "bpe" or strip_gutenberg
                         or unicode_nfc or normalize_whitespace or html_to_text and any(is_html(s[0]) for s in sources))
        if not share_out:
            load_cleaner(config)
        with (worker_pool(workers, start_worker, (load_cleaner, config)) if share_out else contextlib.nullcontext()) \
                as pool, open(scratch, "w", encoding="utf-8") as out, progress(unit=" docs", desc="reading") as bar:
            documents = read_documents(files, stats, removed)
            checked = imap_bounded(pool, clean_and_check, batched(documents), 2 * workers) if share_out else \
                map(clean_and_check, batched(documents))
            for results in checked:
                bar.update(len(results))
                for source_name, text, changes, rule, key, signature, words, tokens in results:
                    n_in += 1
                    for step, (changed, chars_removed) in changes.items():
                        cleaned[step]["documents_changed"] += changed
                        cleaned[step]["chars_removed"] += chars_removed
                    if rule:
                        removed[rule] += 1
                        example = source_name
                    elif repeat := seen.match(source_name, key, signature):
                        rule, kept_source = repeat
                        duplicates[rule] += 1
                        example = f"{source_name} repeats {kept_source}"
                    if rule:
                        if len(examples[rule]) < 5:
                            examples[rule].append(example)
                        continue
                    out.write(json.dumps(text, ensure_ascii=False) + "\n")
                    word_counts.update(words or {})
                    chars_kept += len(text)
                    tokens_kept += tokens
                    n_docs, n_pieces = n_docs + 1, n_pieces + len(split_document(text, max_document_chars))
                    limit_reached = n_docs == max_documents or 0 < max_tokens <= tokens_kept
                    if limit_reached:
                        break
                if limit_reached:
                    print(f"stopping at the limit: {n_docs:,} documents kept"
                          + (f", {tokens_kept:,} tokens" if max_tokens else ""))
                    break
                if bar.disable and time.time() - last_print > 10:
                    print(f"  {n_in:,} documents read, {n_docs:,} kept", flush=True)
                    last_print = time.time()
            documents.close()
        stop_downloads.set()  # the files fetched ahead of a limit are not needed (their .part stays for a later run)
        t_clean = time.time() - t0
        sources = {"input": input or url or stdlib}
        sources.update((k, stats[k]) for k in ("files", "bytes", "sha256", "skipped_binary", "replaced_chars", "bad_records"))
        if stats["downloads"] == 1:
            sources["url_sha256"] = stats["download_sha256"]
        print(f"read {stats['files']:,} files, {stats['bytes'] / 1e6:.1f} MB: {n_in:,} documents")
        for step, c in cleaned.items():
            print(f"cleaning {step}: {c['documents_changed']:,} documents changed, {c['chars_removed']:,} characters removed")
        print(f"removed: {summary_line(removed)}; duplicates: {summary_line(duplicates)}")
        if n_docs == 0:
            raise SystemExit(f"prepare error: none of the {n_in:,} documents from {sources['input']} is left "
                             f"(removed: {summary_line(removed)}; duplicates: {summary_line(duplicates)}); "
                             "point --input at text files, or loosen quality_filters")
        if n_pieces < 2:
            raise SystemExit(f"prepare error: the corpus is one piece of {chars_kept:,} characters and cannot be split "
                             "into train and val; add files or lower --max_document_chars")
        print(f"kept {n_docs:,} documents, {chars_kept:,} characters, in {n_pieces:,} pieces ({t_clean:.1f}s)")

        # the tokenizer: 'char' and 'bpe' learn their vocabulary from the kept documents
        t1 = time.time()
        tok = Tokenizer.train(tokenizer, read_scratch(scratch), vocab_size=bpe_vocab_size, word_counts=word_counts)
        t_tokenizer = time.time() - t1
        dtype = token_dtype(tok.vocab_size)
        print(f"tokenizing with {tokenizer} (vocab {tok.vocab_size:,}, {np.dtype(dtype).name}; built in {t_tokenizer:.1f}s)")

        # 4-5: split by piece, so a document (or a piece of one) is never half in train and half in val; tokenize
        n_val = min(n_pieces - 1, max(1, round(val_fraction * n_pieces)))  # each split gets at least one piece
        is_val = np.zeros(n_pieces, dtype=bool)
        is_val[np.random.default_rng(seed).permutation(n_pieces)[:n_val]] = True
        writers = {split: ShardWriter(out_dir, split, shard_tokens) for split in ("train", "val")}
        counts = {split: np.zeros(tok.vocab_size, dtype=np.int64) for split in writers}
        documents_per_split = collections.Counter()
        units = pieces_by_split(read_scratch(scratch), is_val, max_document_chars)
        with worker_pool(workers, start_worker, (load_encoder, tok.description, dtype)) as pool, \
                progress(total=n_pieces, unit=" pieces", desc="tokenizing") as bar:
            for results in imap_bounded(pool, encode_batch, batched(units), 2 * workers):
                bar.update(len(results))
                for split, ids, ends in results:
                    writers[split].write(ids)
                    counts[split] += np.bincount(ids, minlength=tok.vocab_size)
                    documents_per_split[split] += ends
                if bar.disable and time.time() - last_print > 10:
                    print(f"  {writers['train'].tokens + writers['val'].tokens:,} tokens written", flush=True)
                    last_print = time.time()

        # write: the old meta.json goes first, so a crash in between never pairs new bins with old
        # counts; then the bins are renamed into place, and meta.json comes last
        meta_path = os.path.join(out_dir, "meta.json")
        replacing = True
        with contextlib.suppress(FileNotFoundError):  # no earlier one, or a run beside this one removed it
            os.remove(meta_path)
        splits = {split: {"files": writer.finish(), "tokens": writer.tokens, "documents": documents_per_split[split],
                          "pieces": n_val if split == "val" else n_pieces - n_val} for split, writer in writers.items()}
    except KeyboardInterrupt:
        state = "is left without meta.json: run again to finish it" if replacing else "is as it was before this run"
        raise SystemExit(f"prepare stopped: interrupted; {out_dir} {state}") from None
    finally:  # whatever stopped the run, leave no scratch or half-written bin behind
        stop_downloads.set()
        for path in [scratch] + [p for w in writers.values() for p in w.temporary]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    written = {name for s in splits.values() for name in s["files"]}
    for name in os.listdir(out_dir):  # what an earlier run with other shards or another tokenizer left
        if re.fullmatch(r"(train|val)(_\d+)?\.bin", name) and name not in written or name == "tokenizer.tiktoken":
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))
    loss = unigram_loss(counts["train"], counts["val"])
    meta = {"dataset": dataset, "tokenizer": tok.description, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "dtype": np.dtype(dtype).name, "splits": splits, "sources": sources, "unigram_loss": round(loss, 4),
            "config": config}
    if tokenizer == "bpe":
        meta["tokenizer_file"] = "tokenizer.tiktoken"
        save_atomically(os.path.join(out_dir, meta["tokenizer_file"]), lambda f: f.write(tok.description["ranks"]))
    seconds = time.time() - t0
    report = {
        "dataset": dataset,
        "input": {"documents": n_in, **{k: v for k, v in sources.items() if k not in ("input", "sha256", "url_sha256")}},
        "cleaning": cleaned, "removed": removed, "duplicates": duplicates, "examples": examples,
        "output": {"documents": n_docs, "characters": chars_kept, "pieces": n_pieces,
                   "tokens": {split: s["tokens"] for split, s in splits.items()}},
        "seconds": {"clean_filter_dedup": round(t_clean, 2), "tokenizer": round(t_tokenizer, 2),
                    "tokenize_write": round(seconds - t_clean - t_tokenizer, 2), "total": round(seconds, 2)},
        "mb_per_s": round(stats["bytes"] / 1e6 / seconds, 2),
    }
    save_atomically(os.path.join(out_dir, "report.json"), lambda f: f.write(json.dumps(report, indent=2) + "\n"))
    save_atomically(meta_path, lambda f: f.write(json.dumps(meta, indent=2) + "\n"))

    print(f"{out_dir}: {n_docs:,} documents in {n_pieces:,} pieces, {tokenizer} tokens as {meta['dtype']}")
    for split, s in splits.items():
        print(f"  {split:5s} {s['tokens']:>12,} tokens  {s['documents']:>7,} documents  {s['pieces']:>7,} pieces"
              + (f"  in {len(s['files'])} files" if len(s["files"]) > 1 else ""))
    print(f"unigram baseline loss {loss:.4f} nats/token; done in {seconds:.1f}s, {report['mb_per_s']:.1f} MB/s")
    print(f"wrote {write_card(out_dir)}")
