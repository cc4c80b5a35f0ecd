"""
Throughput of prepare.py on Parquet input against a bare tiktoken script on the same text, side by side.

    TIKTOKEN_CACHE_DIR=../shared/data/tiktoken_cache python bench/prepare_parquet.py --source=../shared/data/gutenberg

Cuts the .txt files of --source into web-page-sized documents (about 4 KB, at blank lines), writes them
to one Parquet file (row groups of 1,000, as FineWeb's shards hold), then times, alternating A B A B:
  A  python prepare.py --input=FILE.parquet --tokenizer=gpt2  (its whole pipeline: read, scratch file,
     split, tokenize in a pool, write bins and meta.json)
  B  a bare script: read the row groups with pyarrow, tiktoken's encode_ordinary_batch on all cores,
     end-of-text after each document, the ids written as uint16
and prints each one's MB/s (min and median over the rounds) and the load average, since the machine may
be shared. Run from the repository root.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow
import pyarrow.parquet

BARE = r"""
import os, sys, numpy as np, pyarrow.parquet, tiktoken
enc = tiktoken.get_encoding("gpt2")
parquet = pyarrow.parquet.ParquetFile(sys.argv[1])
with open(sys.argv[2], "wb") as out:
    for group in range(parquet.num_row_groups):
        texts = parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
        ids = [t for doc in enc.encode_ordinary_batch(texts, num_threads=os.cpu_count()) for t in doc + [enc.eot_token]]
        np.array(ids, dtype=np.uint16).tofile(out)
"""


def documents(folder, size=4000):
    """The .txt files of folder cut at blank lines into pieces of about size characters."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                piece = ""
                for paragraph in f.read().split("\n\n"):
                    piece += paragraph + "\n\n"
                    if len(piece) >= size:
                        yield piece
                        piece = ""


def timed(command):
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--source", default=os.path.join("..", "shared", "data", "gutenberg"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=1, help="the documents this many times: a larger corpus shrinks "
                        "the share of the fixed costs (starting Python, loading tiktoken's files)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_parquet_")
    texts = [f"{copy}: {text}" for copy in range(args.copies) for text in documents(args.source)]
    parquet = os.path.join(work, "shard.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"text": texts}), parquet, row_group_size=1000)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    print(f"{len(texts):,} documents, {megabytes:.1f} MB of text, in {parquet}; {os.cpu_count()} CPUs")
    commands = {
        "prepare.py": [sys.executable, "prepare.py", f"--input={parquet}", "--tokenizer=gpt2",
                       f"--data_root={work}", "--dataset=bench"],
        "bare tiktoken": [sys.executable, "-c", BARE, parquet, os.path.join(work, "bare.bin")],
    }
    seconds = {name: [] for name in commands}
    loads = []
    for _ in range(args.rounds):
        for name, command in commands.items():
            seconds[name].append(timed(command))
            loads.append(os.getloadavg()[0])
    for name, times in seconds.items():
        print(f"{name:14s} MB/s  min-time {megabytes / min(times):6.2f}  median-time {megabytes / statistics.median(times):6.2f}"
              f"   seconds {', '.join(f'{t:.2f}' for t in times)}")
    ratio = min(seconds["prepare.py"]) / min(seconds["bare tiktoken"])
    print(f"prepare.py takes {ratio:.3f}x the bare script's time (best of each); "
          f"load average during the runs {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
