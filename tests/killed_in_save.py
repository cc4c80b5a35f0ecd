"""Run a stage script as `python script args` would, but SIGKILL the process halfway through writing
its Nth checkpoint: torch.save has put 4 KB of the file on disk when the kill comes, as a power cut
or an out-of-memory kill might find it. Used by test_faults.py.

    python tests/killed_in_save.py N train.py --out_dir=... ...
"""

import os
import runpy
import signal
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

kill_at = int(sys.argv[1])
sys.argv = sys.argv[2:]
real_save, saves = torch.save, 0


def save_then_die(obj, f, *args, **kwargs):
    global saves
    saves += 1
    if saves == kill_at:
        f.write(b"PK\x03\x04" + bytes(4092))  # the start of a zip, as torch.save begins one
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = save_then_die
runpy.run_path(os.path.join(REPO, sys.argv[0]), run_name="__main__")
