"""
Decoding on a CPU: every linear layer multiplies through oneDNN, on a copy of its weight packed once
into oneDNN's blocked layout, instead of through MKL's sgemm on the weight as it lies.

    store = {}
    with packed_linear.weights(store):   # decoding.Decoder, around each of its model calls
        logits, _ = model(...)           # model.linear_parts takes the packed copies from store

Why: a decoding step multiplies every weight by a few rows (one per sequence), and there MKL's sgemm
is far from the core's peak. On a 2-core AMD EPYC, one thread, float32, 8 x 768 x 2,048 (24 weights
in turn): MKL 40 GFLOP/s, oneDNN on the packed weight 103 (AVX512), 58 with oneDNN held to AVX2;
oneDNN on the unpacked weight 60 and 40 (bench/cpu_linear.py, docs/benchmarks.md). The same float32
products, summed in another order: a result differs from F.linear's in the last bits.

The packed copies are a second copy of the weights, kept in the caller's store while it lives, and
valid only while the weights do not change (a Decoder's life: nothing trains a model mid-decode).
Outside weights(), under gradients, under torch.compile (which has its own kernels), off a CPU, in
another dtype than float32 or under autocast, with torch.backends.mkldnn.enabled = False (to spare the memory), or
where this torch's oneDNN lacks the packed product, F.linear runs.
"""

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F

_local = threading.local()  # .store: the store of the weights() this thread is in, if any


@contextlib.contextmanager
def weights(store):
    """Within it, parts() packs into and reads from store (a dict: weight -> its packed parts; None: packs nothing)."""
    outer, _local.store = getattr(_local, "store", None), store
    try:
        yield
    finally:
        _local.store = outer


def parts(weight, sizes, x):
    """weight's blocks of rows of the given sizes, each packed (made once per store), for a product
    with x; None where the packed product does not apply (see the top of this file)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():  # first: a compiled graph reads nothing below
        return None
    store = getattr(_local, "store", None)
    if (store is None or x.device.type != "cpu" or not x.dtype == weight.dtype == torch.float32
            or torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.enabled or not works()):
        return None
    key = (weight, tuple(sizes))
    if key not in store:
        store[key] = [torch.ops.mkldnn._reorder_linear_weight(block, None) for block in weight.split(sizes)]
    return store[key]


def multiply(x, packed, bias):
    """x @ weight.T + bias, the weight packed by parts()."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def works():
    """Whether this torch has oneDNN's packed product (a private op inductor uses, in torch 2.11 to 2.14)
    and it gives F.linear's numbers, tried once on a small product."""
    # Numbers made without the global random generator, whose draws a seeded run counts on; in float32
    # whatever the caller's autocast, since the answer is kept for the process.
    x = torch.linspace(-1, 1, 48, dtype=torch.float32).view(3, 16)
    weight = torch.linspace(-2, 1, 128, dtype=torch.float32).view(8, 16).cos()
    try:
        with torch.autocast("cpu", enabled=False):
            return torch.allclose(multiply(x, torch.ops.mkldnn._reorder_linear_weight(weight, None), None),
                                  F.linear(x, weight), rtol=1e-4, atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
