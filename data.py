"""
The pretraining data as train.py reads it: data_dir/meta.json (checked), the token bins of a split
memory-mapped once and read as random windows, and the copy of a batch to the device.

    meta = load_meta("data/pystdlib")
    bins = TokenBins("data/pystdlib", meta, "train", block_size=1024)
    x, y = bins.sample(16, (seed, 0, step, micro_step), "cuda")   # (16, 1024) inputs and targets

Batches are stateless: the windows for (step, micro_step) come from a random generator seeded with
exactly those numbers, so a resumed run reads the same batches and nothing about the loader is saved.
"""

import json
import os

import numpy as np
import torch

def load_meta(data_dir):
    """data_dir/meta.json, checked for what the trainers read from it; one line if it is missing or broken."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise SystemExit(f"data error: no {path}; prepare the data first (python prepare.py [config/data_x.py]) "
                         "or set --dataset to a prepared one")
    again = "run prepare.py again"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise SystemExit(f"data error: {path} is not valid JSON ({e}); {again}") from None
    missing = [k for k in ("tokenizer", "vocab_size", "dtype", "splits") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise SystemExit(f"data error: {path} lacks {', '.join(missing)}; {again}")
    if not isinstance(meta["vocab_size"], int) or meta["vocab_size"] < 1:
        raise SystemExit(f"data error: {path} has vocab_size={meta['vocab_size']!r}, not a positive integer; {again}")
    if meta["dtype"] not in ("uint8", "uint16", "uint32", "int32", "int64"):
        raise SystemExit(f"data error: {path} has dtype={meta['dtype']!r}, not an integer type of numpy's; {again}")
    splits = meta["splits"]
    if not isinstance(splits, dict) or not all(isinstance(s, dict) and isinstance(s.get("files"), list)
                                               and isinstance(s.get("tokens"), int) for s in splits.values()):
        raise SystemExit(f"data error: {path}'s splits are not {{split: {{files: [...], tokens: N}}}}; {again}")
    return meta


# Token ids are checked against the vocabulary in chunks of this many: a sequential read that
# holds 64 MB of uint16 at most, so even a 10 GB bin is checked at disk speed with little memory.
_CHECK_CHUNK = 1 << 25


class TokenBins:
    """The token files of one split, memory-mapped once, read as random windows: a window never crosses
    from one file (shard) into the next, and every possible window start is equally likely."""

    def __init__(self, data_dir, meta, split, block_size):
        if split not in meta["splits"]:
            raise SystemExit(f"data error: {data_dir}/meta.json has no '{split}' split")
        self.block_size = block_size
        self.files = []
        for name in meta["splits"][split]["files"]:
            path = os.path.join(data_dir, name)
            if not os.path.isfile(path):
                raise SystemExit(f"data error: {path} is listed in meta.json but missing; run prepare.py again")
            size, itemsize = os.path.getsize(path), np.dtype(meta["dtype"]).itemsize
            if size == 0 or size % itemsize:
                raise SystemExit(f"data error: {path} has {size} bytes, " + ("no tokens" if size == 0 else
                                 f"not a whole number of {meta['dtype']} tokens") + "; run prepare.py again")
            tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
            # An id beyond the vocabulary would index past the embedding: a crash on a GPU, garbage on a CPU.
            # (load_meta makes sure a meta.json has vocab_size; a dict made in code may leave it out.)
            largest = max(int(tokens[i : i + _CHECK_CHUNK].max()) for i in range(0, len(tokens), _CHECK_CHUNK))
            if largest >= meta.get("vocab_size", largest + 1):
                raise SystemExit(f"data error: {path} holds token id {largest}, but meta.json's vocab_size is "
                                 f"{meta['vocab_size']}; the bins and meta.json are from different runs of prepare.py; "
                                 "run it again")
            self.files.append(tokens)
        starts = [max(0, len(f) - block_size) for f in self.files]  # each window needs block_size + 1 tokens
        if sum(starts) == 0:
            longest = max(len(f) for f in self.files)
            raise SystemExit(f"data error: the {split} split of {data_dir} has at most {longest} tokens in a file, "
                             f"fewer than block_size+1={block_size + 1}; lower block_size or add data")
        self.cumulative_starts = np.cumsum(starts)

    def sample(self, batch_size, seed, device="cpu"):
        """batch_size windows (x, y) as int64 tensors on device, y shifted by one; seed is a tuple of ints."""
        return self.sample_many(batch_size, [seed], device)

    def sample_many(self, batch_size, seeds, device="cpu"):
        """The batches of several seeds in one (len(seeds) * batch_size) batch, read into one contiguous pinned
        array, copied at once and cut into x and y on the device (views that could not be copied in one piece)."""
        windows = torch.empty((len(seeds) * batch_size, self.block_size + 1), dtype=torch.int64,
                              pin_memory=device.startswith("cuda"))
        rows = windows.numpy()
        for i, seed in enumerate(seeds):
            picks = np.random.default_rng(seed).integers(0, self.cumulative_starts[-1], size=batch_size)
            which = np.searchsorted(self.cumulative_starts, picks, side="right")
            offsets = picks - np.concatenate(([0], self.cumulative_starts))[which]
            for row, (w, o) in enumerate(zip(which, offsets), start=i * batch_size):
                rows[row] = self.files[w][o : o + self.block_size + 1]
        windows = to_device(windows, device)
        return windows[:, :-1], windows[:, 1:]


def to_device(tensor, device):
    """A CPU tensor on device: to a GPU from pinned memory without waiting, so the copy overlaps the work
    queued before it. Tensors sent together go best as one contiguous tensor, cut up on the device."""
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
