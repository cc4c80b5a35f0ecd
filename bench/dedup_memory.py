"""
Memory that prepare.py's deduplication holds per document, measured with tracemalloc.

    python bench/dedup_memory.py [--documents=200000]

Feeds Duplicates (prepare.py's dedup sets) distinct documents, named as FineWeb's Parquet rows are
("000_00000.parquet:123456"), with exact keys (a 128-bit hash) or MinHash signatures (16 bands x 8 rows
of 32-bit values, prepare.py's defaults), and prints the bytes it keeps per document and per million
documents. Every document is kept, the worst case: a duplicate adds nothing.
"""

import argparse
import os
import sys
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=200_000)
    n = parser.parse_args().documents
    rng = np.random.default_rng(0)
    for kind in ("exact", "near"):
        seen = prepare.Duplicates(16, 8, 0.8)
        tracemalloc.start()
        for i in range(n):
            source = f"{i // 1_000_000:03d}_00000.parquet:{i % 1_000_000 + 1}"  # made here: the sets keep it alive
            if kind == "exact":
                seen.match(source, prepare.exact_key(str(i)), None)
            else:
                seen.match(source, None, rng.integers(0, 2**32, size=128, dtype=np.uint32))
        used = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        print(f"{kind} dedup: {used / n:,.0f} bytes per kept document, {used / n * 1e6 / 2**30:.2f} GiB per million")


if __name__ == "__main__":
    main()
