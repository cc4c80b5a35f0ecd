"""
How fast a CPU multiplies a few rows by a weight matrix, in float32: F.linear (MKL's sgemm in torch's
x86 builds) against oneDNN's product on the weight as it lies and on a copy packed into oneDNN's
layout, which decoding uses (packed_linear.py).

    OMP_NUM_THREADS=1 python bench/cpu_linear.py [--rows=1,8,64,512] [--repeats=5]
    OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/cpu_linear.py

x (rows, 768) times 24 weights of 2,048 x 768 in turn (150 MB, so that each comes from memory as in
a decoding step), GFLOP/s of the fastest of `repeats`, each product's largest difference from a
float64 reference beside it.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import packed_linear  # noqa: E402
from runtime import describe_machine, machine_facts  # noqa: E402


def positive_integers(text):
    try:
        values = [int(value) for value in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas, e.g. 1,8,64")
    return values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=positive_integers, default=[1, 8, 64, 512])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: give at least 1")
    if not packed_linear.works():
        raise SystemExit("bench error: this torch's oneDNN has no packed linear product; nothing to compare")
    print(describe_machine(machine_facts("cpu")))
    weights = [torch.randn(2048, 768) for _ in range(24)]
    with torch.no_grad(), packed_linear.weights({}):  # packed as decoding packs them
        packed = [packed_linear.parts(w, [len(w)], torch.empty(1, 768))[0] for w in weights]
    products = {
        "F.linear (MKL)": lambda x: [F.linear(x, w) for w in weights],
        "oneDNN, weight as it lies": lambda x: [packed_linear.multiply(x, w, None) for w in weights],
        "oneDNN, packed weight": lambda x: [packed_linear.multiply(x, w, None) for w in packed],
    }
    print(f"{'rows':>5}  " + "  ".join(f"{name:>26}" for name in products) + "   (GFLOP/s; max error vs float64)")
    for rows in args.rows:
        x = torch.randn(rows, 768)
        exact = F.linear(x.double(), weights[0].double())
        cells = []
        for product in products.values():
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = product(x)
                best = min(best, time.perf_counter() - start)
            error = (out[0].double() - exact).abs().max().item()
            cells.append(f"{2 * rows * 768 * 2048 * len(weights) / best / 1e9:>12.1f} ({error:.1e})")
        print(f"{rows:>5}  " + "  ".join(f"{cell:>26}" for cell in cells))


if __name__ == "__main__":
    main()
