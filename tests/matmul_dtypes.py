"""Which dtypes the matrix products (and attention) of some code run in: a CPU without native bfloat16
runs them ~25x slower in bfloat16 than in float32, so on a CPU the defaults must never choose it.

    with MatmulDtypes() as recorded:
        optimizer.step()
    assert set(recorded.seen) == {torch.float32}

Run as a script, it runs a stage script as `python script.py args` would, under MatmulDtypes, and writes
the dtypes seen (their names, once each) to a JSON file, even when the script fails:

    python tests/matmul_dtypes.py seen.json train.py --device=cpu ...
"""

import json
import os
import runpy
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# what multiplies matrices on a CPU once linear layers and attention are taken apart into aten operations
MATRIX_PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "_scaled_dot_product_flash_attention_for_cpu",
                   "_scaled_dot_product_flash_attention_for_cpu_backward")


class MatmulDtypes(TorchDispatchMode):
    """Records in .seen the dtype of every floating-point input of every matrix product run while it is active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATRIX_PRODUCTS:
            self.seen += [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        return func(*args, **(kwargs or {}))


if __name__ == "__main__":
    out, script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` would
    with MatmulDtypes() as recorded:
        try:
            runpy.run_path(script, run_name="__main__")
        finally:
            with open(out, "w") as f:
                json.dump(sorted({str(dtype).removeprefix("torch.") for dtype in recorded.seen}), f)
