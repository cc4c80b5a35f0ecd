"""
A run's out_dir kept safe: one run at a time, nothing of an earlier run deleted before the new
one has a checkpoint, no non-finite model saved, a clean exit on Ctrl-C, and on SIGTERM or SIGUSR1
(preemption) a stop after the step in flight, with a checkpoint of it. Every trainer calls these
through trainer.py: take_out_dir at the start, open_run_log, and save at every evaluation.

The lock is out_dir/run.lock with an flock on it, which the kernel releases however its process ends
(kill -9 included), so a dead run's lock is taken over without guessing from process ids; holding it,
every checkpoint temporary in out_dir is a killed save's and can go.
"""

import atexit
import ctypes
import fcntl
import glob
import os
import signal
import socket
import sys

import torch

from checkpoint import checkpoint_writer, checkpoints_newest_first
from runtime import teardown_distributed

METRICS_NAME = "metrics.jsonl"
PENDING_METRICS_NAME = "metrics.jsonl.new.tmp"  # a new run's log until its first checkpoint


def _take_lock(out_dir):
    """Lock out_dir for this process (creating it); None, or the one-line refusal if another run holds it."""
    created = not os.path.isdir(out_dir)
    path = os.path.join(out_dir, "run.lock")
    while True:
        try:
            os.makedirs(out_dir, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return f"run error: cannot write in {out_dir} ({e.strerror}); set --out_dir to a folder you can write to"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return (f"run error: {out_dir} is in use by {holder} (it holds {path}); wait for that run to end, "
                    "or use another --out_dir")
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
    previous = os.read(fd, 200).decode(errors="replace").strip()
    if previous:
        print(f"note: {path} was left by {previous}, which ended without releasing it; taking it over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
    atexit.register(_release_lock, path, fd, out_dir if created else None)
    return None


def _release_lock(path, fd, created_dir):
    pending = os.path.join(os.path.dirname(path), PENDING_METRICS_NAME)
    if os.path.exists(pending):  # the log of a new run that ended before its first checkpoint
        os.unlink(pending)
    os.unlink(path)  # while still holding the flock, so nobody takes the old file as the lock
    os.close(fd)
    if created_dir is not None and not os.listdir(created_dir):
        os.rmdir(created_dir)  # a run that stopped before writing anything leaves no empty folder behind


def lock_out_dir(out_dir, dist, log=print):
    """Take out_dir for this run: rank 0 locks it and removes stale temporaries; if another run holds
    it, every process stops (rank 0 with one line saying which run). Every process must call this."""
    refusal = _take_lock(out_dir) if dist.is_main else None
    if dist.world_size > 1:
        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()
        raise SystemExit(refusal if dist.is_main else 1)
    if dist.is_main:
        stale = glob.glob(os.path.join(glob.escape(out_dir), "ckpt*.tmp")) + \
            glob.glob(os.path.join(glob.escape(out_dir), "metrics*.tmp"))
        if stale:
            size = sum(os.path.getsize(p) for p in stale)
            for path in stale:
                os.unlink(path)
            log(f"removed {len(stale)} temporary files ({size / 1e6:,.1f} MB) that interrupted saves left in {out_dir}")


def exit_quietly_on_interrupt(out_dir, dist, how_to_continue):
    """Ctrl-C ends the run with one line naming out_dir's newest checkpoint, no traceback (the other ranks
    silently), after a save under way in the background; one that fails leaves only its temporary."""

    def stop(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # neither a second Ctrl-C nor torchrun's SIGTERM cuts the line short
        if dist.is_main:
            try:
                checkpoint_writer.wait()  # a save under way in the background finishes first: it is the newest
            except SystemExit:
                pass  # it failed: the newest is the one before it
            pending = os.path.join(out_dir, PENDING_METRICS_NAME)
            if checkpoint_writer.written and os.path.exists(pending):
                # a new run stopped between its first checkpoint and replacing the earlier run: finish that,
                # or the earlier run's checkpoints would stay beside this one and this run's log would go
                replace_earlier_run(out_dir, checkpoint_writer.written, pending, lambda *args: None)
            newest = checkpoints_newest_first(out_dir)
            print("interrupted: " + (f"the newest checkpoint is {newest[0]}; continue with {how_to_continue}" if newest
                                     else f"no checkpoint was written in {out_dir}"), file=sys.stderr, flush=True)
        raise SystemExit(130)

    signal.signal(signal.SIGINT, stop)


class StopSignals:
    """SIGTERM and SIGUSR1 (a preemption, SLURM's --signal warning) ask the run to stop and save. The handler
    notes the signal; requested() gives every process the same answer at the same step through an all-reduce
    on a gloo group of its own, started at one step boundary and read at the next: no step waits for it."""

    def __init__(self, dist, how_to_continue):
        self.dist, self.how_to_continue = dist, how_to_continue
        self.received = self.agreed = 0  # signal numbers: the first one that came here; the one all stop for
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._note)
        if "TORCHELASTIC_RUN_ID" in os.environ and sys.platform.startswith("linux"):
            # Should torchrun itself die (killed, or ended by a signal it does not pass on: SIGUSR1 without
            # --signals-to-handle), the kernel sends this process SIGTERM, and it stops with a checkpoint
            # instead of training on unattended.
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        # CPU tensors over gloo even beside NCCL, outside the order of the training's own collectives
        self.group = torch.distributed.new_group(backend="gloo") if dist.world_size > 1 else None
        self.reduction = None  # (flags, work) of the all-reduce under way

    def _note(self, signum, frame):
        self.received = self.received or signum

    def requested(self):
        """At a step boundary: whether to stop here (true on every process at once)."""
        if self.group is None:
            self.agreed = self.received
        elif self.reduction is not None:
            flags, work = self.reduction
            work.wait()
            self.agreed = int(flags.item())
        if self.group is not None and not self.agreed:
            flags = torch.tensor([self.received], dtype=torch.int32)
            work = torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX, self.group, async_op=True)
            self.reduction = flags, work
        return bool(self.agreed)

    def exit(self, step, saved):
        """End a stopped run, its checkpoint (saved, or None if it took no step) on disk: one line, and the
        exit status of a process ended by the signal (128 + its number), so a scheduler sees it unfinished."""
        name = signal.Signals(self.agreed).name
        self.dist.log(f"stopped by {name} at step {step}: " + (f"saved {saved}; " if saved else "no step since the "
                      "last checkpoint; ") + f"continue with {self.how_to_continue}", file=sys.stderr, flush=True)
        teardown_distributed()
        raise SystemExit(128 + self.agreed)


def run_log_path(out_dir, resumed):
    """The file a run appends its metrics to: a resumed run its metrics.jsonl; a new run a file of its own,
    which becomes metrics.jsonl with its first checkpoint (replace_earlier_run), or goes if it ends before."""
    return os.path.join(out_dir, METRICS_NAME if resumed else PENDING_METRICS_NAME)


def replace_earlier_run(out_dir, saved, metrics_path, log=print):
    """Once a new run's first checkpoint (saved) is written, delete the earlier run's checkpoints and make the
    new run's log metrics.jsonl; returns the log's path. Call it after every save (rank 0): once done, a no-op."""
    final = os.path.join(out_dir, METRICS_NAME)
    if metrics_path == final:
        return final
    earlier = [path for path in checkpoints_newest_first(out_dir) if path != saved]
    for path in earlier:
        os.unlink(path)
    if earlier:
        log(f"this run's first checkpoint is written: removed {len(earlier)} checkpoints of an earlier run in {out_dir}")
    if os.path.exists(metrics_path):
        os.replace(metrics_path, final)
    elif os.path.exists(final):
        os.unlink(final)
    return final


def stop_unless_finite(model, losses, dist, script, step, out_dir):
    """Stop, without saving, if any process has a weight or one of losses (None: none) that is not finite: finite
    weights can still give NaN (1e30 each, say). Every process must call this."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # FSDP: this process's shards
    values = [torch.as_tensor(loss, dtype=torch.float32) for loss in losses if loss is not None]
    finite = torch.stack([torch.isfinite(t).all().to(dist.device) for t in local + values]).all().float()
    if dist.world_size > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if finite.item() < 1:
        raise SystemExit(f"{script} error: the model is not finite at step {step} (a NaN or infinite weight or loss); "
                         f"stopping without saving, so {out_dir} keeps its last good checkpoint. Lower learning_rate "
                         "or check the data" if dist.is_main else 1)
