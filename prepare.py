"""
Turn raw text into the token files that train.py reads: find the files, split
them into train and val by document, tokenize, and write the ids to disk.

    python prepare.py                                   # offline default: the Python standard library's source, byte-level
    python prepare.py config/data_shakespeare_char.py   # Tiny Shakespeare, char-level (downloads 1.1 MB once)
    python prepare.py config/data_shakespeare_char.py --input=path/to/input.txt   # the same from a local copy
    python prepare.py --input=~/notes --glob='**/*.md' --dataset=notes --tokenizer=gpt2

Reads one of: --input (a file; a folder, searched recursively for the files
matching --glob, skipping hidden and binary ones; or an http(s) URL), the
preset's --url (downloaded once into <data_root>/<dataset>/download/ and checked
against url_sha256), or, when both are empty, the standard library's own .py
files without its test suites: about 12 MB of code on any machine, no network.

Every file is a document. A document longer than max_document_chars is cut at
line ends into pieces, so even a single-file corpus splits into train and val.
The pieces are shuffled with a fixed seed and a val_fraction of them go to val;
within a split, a document's pieces are joined back in order and followed by
the end-of-text token.

Writes to <data_root>/<dataset>/:
    train.bin, val.bin  token ids, raw uint16 (uint32 when the vocabulary exceeds 65536), for np.memmap
    meta.json           tokenizer description, vocab_size, eot_id, dtype, per-split files and counts,
                        sources and their sha256, the unigram baseline loss, the config
Each file is written under a temporary name and renamed into place, meta.json
last, so a dataset with a meta.json is complete. Re-running with the same config
rewrites byte-identical files.
"""

import hashlib
import json
import os
import re
import sysconfig
import time
import urllib.parse

import numpy as np
import requests

from configurator import configure
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# output
dataset = "pystdlib"  # the folder under data_root
data_root = "data"
# source
input = ""  # a file, a folder or an http(s) URL; empty: url if set, else the standard library
url = ""  # a preset's download, used when input is empty
url_sha256 = ""  # the download's expected sha256; empty skips the check
glob = "**/*"  # which files of a folder to read, matched on the path relative to it ('**/' spans folders)
# tokenizer
tokenizer = "byte"  # 'gpt2' | 'char' | 'byte'
# split
val_fraction = 0.1  # share of the documents (pieces) that go to val
seed = 1337
max_document_chars = 100_000  # longer documents are cut at line ends into pieces of at most this size
# -----------------------------------------------------------------------------


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url, expected_sha256, folder):
    """Fetch url into folder unless a matching copy is already there; return its path and sha256."""
    path = os.path.join(folder, os.path.basename(urllib.parse.urlparse(url).path) or "download")
    if os.path.isfile(path):
        digest = file_sha256(path)
        if not expected_sha256 or digest == expected_sha256:
            print(f"using the cached download {path}")
            return path, digest
        print(f"the cached {path} does not match url_sha256; downloading it again")
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".part"
    print(f"downloading {url}")
    h = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=30) as r:
            r.raise_for_status()
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
        digest = h.hexdigest()
        if expected_sha256 and digest != expected_sha256:
            raise SystemExit(
                f"prepare error: {url} has sha256 {digest}, expected {expected_sha256}; the file changed upstream: "
                "check it, then pass --url_sha256=<its sha256> (or --url_sha256= to skip the check)"
            )
        os.replace(tmp, path)
    except requests.RequestException as e:
        raise SystemExit(
            f"prepare error: could not download {url} ({type(e).__name__}: {e}); "
            "check the network, or fetch the file another way and pass --input=PATH"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path, digest


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
        # Hidden folders (.git, .venv) hold no corpus text, and a corpus folder that holds
        # the output folder must not read back its own bins and meta.json.
        subfolders[:] = [
            d for d in subfolders
            if not d.startswith(".") and d not in skip_names and os.path.join(folder, d) != skip_folder
        ]
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if not name.startswith(".") and match(rel):
                found.append((rel, path))
    return sorted(found)


def read_files(files):
    """Read the text files as UTF-8, skipping binary ones; return [(relpath, text)] of the non-empty ones and a summary."""
    docs, n_read, n_bytes, n_binary, n_replaced = [], 0, 0, 0, 0
    combined = hashlib.sha256()
    last_print = time.time()
    for i, (rel, path) in enumerate(files):
        if time.time() - last_print > 10:
            print(f"  read {i:,}/{len(files):,} files", flush=True)
            last_print = time.time()
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SystemExit(f"prepare error: cannot read {path} ({e.strerror}); fix its permissions or leave it out with --glob")
        if b"\0" in data[:8192]:  # text files never hold NUL bytes; images, archives and .bin files do
            print(f"warning: skipping binary file {rel}")
            n_binary += 1
            continue
        text = data.decode("utf-8", errors="replace")
        # a U+FFFD that the file already holds is text, not a replacement
        replaced = text.count("\ufffd") - data.count("\ufffd".encode())
        if replaced:
            print(f"warning: {rel} is not valid UTF-8; {replaced} characters replaced with U+FFFD")
        n_read, n_bytes, n_replaced = n_read + 1, n_bytes + len(data), n_replaced + replaced
        combined.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode(errors="surrogateescape"))
        if text:
            docs.append((rel, text))
    summary = {"files": n_read, "bytes": n_bytes, "sha256": combined.hexdigest(),
               "skipped_binary": n_binary, "replaced_chars": n_replaced}
    return docs, summary


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


def choose_val(n, val_fraction, seed):
    """A boolean mask over n pieces, True for the ones that go to val; both splits get at least one."""
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return is_val


def join_pieces(pieces, keep):
    """The documents of one split: for each document, its kept pieces joined in their original order."""
    documents = {}
    for (doc, piece), k in zip(pieces, keep):
        if k:
            documents.setdefault(doc, []).append(piece)
    return ["".join(parts) for parts in documents.values()]


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def tokenize(tok, texts, dtype, name):
    """The ids of all texts, each followed by end-of-text, as one array."""
    eot = np.array([tok.eot_id], dtype=dtype)
    arrays, last_print = [], time.time()
    for i, text in enumerate(texts):
        arrays += [np.array(tok.encode(text), dtype=dtype), eot]
        if time.time() - last_print > 10:
            print(f"  {name}: {i + 1:,}/{len(texts):,} documents", flush=True)
            last_print = time.time()
    return np.concatenate(arrays)


def unigram_loss(train_ids, val_ids, vocab_size):
    """Cross-entropy (nats/token) of val under train's token frequencies, add-one smoothed: the loss of a model that ignores context."""
    counts = np.bincount(train_ids, minlength=vocab_size) + 1.0
    return float(-np.log(counts[val_ids] / counts.sum()).mean())


def save_bin(path, ids):
    tmp = path + ".tmp"
    ids.tofile(tmp)
    os.replace(tmp, path)  # a reader sees the old file or the whole new one, never half of one


def save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    config = configure(globals())
    print(f"prepare config: {json.dumps(config)}")
    t0 = time.time()
    if tokenizer not in ("gpt2", "char", "byte"):
        raise SystemExit(f"prepare error: unknown tokenizer '{tokenizer}'; use --tokenizer=gpt2, char or byte")
    if not 0 <= val_fraction < 1:
        raise SystemExit(f"prepare error: val_fraction={val_fraction} is outside [0, 1); use e.g. --val_fraction=0.1")
    if max_document_chars < 1:
        raise SystemExit(f"prepare error: max_document_chars={max_document_chars} must be positive; use e.g. --max_document_chars=100000")
    out_dir = os.path.join(data_root, dataset)

    # find the source: --input, else the preset's download, else the standard library
    url_digest = None
    if input.startswith(("http://", "https://")):
        source, url_digest = download(input, "", os.path.join(out_dir, "download"))
    elif input:
        source = os.path.expanduser(input)
        if not os.path.exists(source):
            raise SystemExit(f"prepare error: --input={input} does not exist; pass an existing file, folder or http(s) URL")
    elif url:
        source, url_digest = download(url, url_sha256, os.path.join(out_dir, "download"))
    else:
        source = sysconfig.get_paths()["stdlib"]
    if os.path.isfile(source):
        files = [(os.path.basename(source), source)]
    elif input:
        files = list_files(source, glob, skip_folder=os.path.abspath(out_dir))
    else:
        # the standard library's own modules: not the third-party packages installed inside it, nor its test suites
        skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
        files = [f for f in list_files(source, glob, skip_names=skip) if f[0].endswith(".py")]
    if not files:
        raise SystemExit(f"prepare error: no files in {source} match --glob={glob}; check --input and --glob")

    # read the documents and cut the long ones into pieces
    print(f"reading {len(files):,} files from {source}")
    docs, sources = read_files(files)
    sources = {"input": input or url or source, **sources}
    if url_digest:
        sources["url_sha256"] = url_digest
    if not docs:
        raise SystemExit(f"prepare error: the {len(files)} files from {source} hold no text; point --input at text files")
    n_chars = sum(len(text) for _, text in docs)
    print(f"read {sources['files']:,} files, {sources['bytes'] / 1e6:.1f} MB: {len(docs):,} non-empty documents, {n_chars:,} characters")
    pieces = [(i, piece) for i, (_, text) in enumerate(docs) for piece in split_document(text, max_document_chars)]
    if len(pieces) < 2:
        raise SystemExit(
            f"prepare error: the corpus is one piece of {n_chars:,} characters and cannot be split into train and val; "
            "add files or lower --max_document_chars"
        )

    # split by piece, so a document (or a piece of one) is never half in train and half in val
    is_val = choose_val(len(pieces), val_fraction, seed)
    keep = {"train": ~is_val, "val": is_val}
    texts = {split: join_pieces(pieces, keep[split]) for split in keep}

    # tokenize
    tok = Tokenizer.train(tokenizer, (text for _, text in docs))
    dtype = token_dtype(tok.vocab_size)
    print(f"tokenizing with {tokenizer} (vocab {tok.vocab_size:,}, {np.dtype(dtype).name})")
    ids = {split: tokenize(tok, texts[split], dtype, split) for split in keep}

    # write: the bins, then meta.json, which marks the dataset complete; the old one goes first
    # so a crash in between never pairs new bins with old counts
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    splits = {}
    for split in keep:
        print(f"writing {split}.bin: {len(ids[split]):,} tokens")
        save_bin(os.path.join(out_dir, f"{split}.bin"), ids[split])
        splits[split] = {"files": [f"{split}.bin"], "tokens": len(ids[split]),
                         "documents": len(texts[split]), "pieces": int(keep[split].sum())}
    loss = unigram_loss(ids["train"], ids["val"], tok.vocab_size)
    meta = {
        "dataset": dataset,
        "tokenizer": tok.description,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": np.dtype(dtype).name,
        "splits": splits,
        "sources": sources,
        "unigram_loss": round(loss, 4),
        "config": config,
    }
    save_json(meta_path, meta)

    print(f"{out_dir}: {len(docs):,} documents in {len(pieces):,} pieces, {tokenizer} tokens as {meta['dtype']}")
    for split, s in splits.items():
        print(f"  {split:5s} {s['tokens']:>12,} tokens  {s['documents']:>7,} documents  {s['pieces']:>7,} pieces")
    print(f"unigram baseline loss {loss:.4f} nats/token; done in {time.time() - t0:.1f}s")
