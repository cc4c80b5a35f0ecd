"""
The training machinery that train.py (and the post-training scripts) share:
reading token bins, placing and wrapping the model for DDP or FSDP, the
optimizer (AdamW, or Muon with AdamW) and its parameter groups, the learning-rate
schedules, one optimizer step with gradient accumulation and clipping, loss
estimation, and checkpoints of a run (the metrics log is runlog.py's). Each piece
is small; the loop that uses them stays in the stage script, where a reader sees
it top to bottom.

Batches are stateless: the windows for (step, micro_step) come from a random
generator seeded with exactly those numbers. So the data position of a run is
its step count, a resumed run reads the same batches as one never stopped, and
nothing about the loader needs saving.
"""

import json
import math
import os
import zlib
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import BackgroundCheckpointWriter, gather_training_state, load_newest_checkpoint
from lora import checkpoint_weights
from model import RMSNorm, cross_entropy, rope_tables
from runtime import rng_state, set_rng_state


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
    """The token files of one split, memory-mapped once, read as random windows.

    A split may be several files (shards); a window never crosses from one file into the
    next, and every possible window start is equally likely.
    """

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
        """The batches of several seeds, one after another in one (len(seeds) * batch_size) batch.

        The windows are read into one contiguous (rows, block_size + 1) array, in pinned memory when
        it goes to a GPU, copied there at once, and cut into x and y on the device: x and y themselves
        are strided views, which could be neither pinned nor copied in one piece."""
        windows = torch.empty((len(seeds) * batch_size, self.block_size + 1), dtype=torch.int64,
                              pin_memory=device.startswith("cuda"))
        rows = windows.numpy()
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng(seed)
            picks = rng.integers(0, self.cumulative_starts[-1], size=batch_size)
            which = np.searchsorted(self.cumulative_starts, picks, side="right")
            offsets = picks - np.concatenate(([0], self.cumulative_starts))[which]
            for row, (w, o) in enumerate(zip(which, offsets), start=i * batch_size):
                rows[row] = self.files[w][o : o + self.block_size + 1]
        windows = to_device(windows, device)
        return windows[:, :-1], windows[:, 1:]


def to_device(tensor, device):
    """A CPU tensor on device. To a GPU from pinned memory and without waiting, so the copy overlaps
    the work queued before it; pinning needs an accelerator, so a CPU run copies plainly (or not at
    all). Tensors sent together go best as one contiguous tensor (one copy), cut up on the device."""
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def init_weights(model, seed, which=lambda name: True):
    """Give the GPT's modules whose names pass `which` their initial weights, each module from a
    generator seeded by seed and its name, by the model's own rule. So the weights are the same
    however the model is built: whole in one process, or on the meta device and then block by
    block under FSDP, where each process holds a whole block only until it is sharded. Parameters
    on the meta device get CPU memory first (tied ones stay tied), and so do the RoPE tables."""
    materialised = {}
    for name, module in model.named_modules():
        if not which(name) or not any(p is not None for p in module._parameters.values()):
            continue
        for key, p in module._parameters.items():
            if p is not None and p.is_meta:
                module._parameters[key] = materialised.setdefault(
                    p, nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            else:
                module.reset_parameters()
            model._init_weights(module)
    if getattr(model, "rope_cos", None) is not None and model.rope_cos.is_meta:
        model.rope_cos, model.rope_sin = rope_tables(model.config, model.config.block_size)


def place_model(model, dist, parallelism, dtype, cpu_offload=False, seed=None):
    """Put the model where it trains: sharded over the processes (FSDP), or whole on this process's
    device. A model built on the meta device (a new run's) gets its initial weights here from seed."""
    on_meta = any(p.is_meta for p in model.parameters())
    if parallelism == "fsdp" and (dist.world_size > 1 or cpu_offload):
        shard_model(model, model.blocks, None, dtype, cpu_offload,
                    init=(lambda which: init_weights(model, seed, which)) if on_meta else None)
    else:
        if on_meta:
            init_weights(model, seed)
        model.to(dist.device)


def shard_model(root, blocks, mesh, dtype, cpu_offload, init=None):
    """FSDP2 over mesh (None: every process): each block on its own, so only one block's full
    parameters exist at a time during forward and backward, then the root, which takes the rest
    (embeddings, final norm, output layer). Compute in dtype but reduce gradients in fp32, so the
    average over processes loses nothing. With cpu_offload the fp32 shards, their gradients and so
    AdamW's state stay in CPU memory and the optimizer steps there: each block's parameters are
    copied to the GPU when it runs, which costs time but lets one GPU train a model whose optimizer
    state it could not hold. init(which), for a model on the meta device, gives the modules whose
    names pass `which` their weights: each block just before it is sharded, so no process ever
    holds the whole model."""
    precision = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    # Pinned host memory lets the copies to the GPU run asynchronously; without a GPU there is none to pin.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    present = [(i, block) for i, block in enumerate(blocks) if block is not None]  # None: another stage's layer
    for i, block in present:
        if init is not None:
            init(lambda name: name.startswith(f"blocks.{i}."))
        # The last block's parameters are the first the backward pass needs: freeing them after its
        # forward would only gather them again at once.
        fully_shard(block, mesh=mesh, mp_policy=precision, offload_policy=offload,
                    reshard_after_forward=block is not present[-1][1])
    if init is not None:
        init(lambda name: not name.startswith("blocks."))
    fully_shard(root, mesh=mesh, mp_policy=precision, offload_policy=offload)


def compile_blocks(model):
    """torch.compile each block in place, so that FSDP's hooks around the blocks stay outside the
    compiled code: a whole-model compile breaks its graph at every hook and runs GPT.forward eagerly."""
    for block in model.blocks:
        if block is not None:  # None: a layer of another pipeline stage
            block.compile()


def wrap_model(model, dist, parallelism, compile, log=print):
    """The module the training loop calls: compiled, and under DDP wrapped to average gradients."""
    if compile:
        log("compiling the model (the first steps are slow)...")
        if isinstance(model, FSDPModule):
            compile_blocks(model)
        else:
            model = torch.compile(model)
    if parallelism == "ddp" and dist.world_size > 1:
        # Gradients live in DDP's all-reduce buckets (no copy in and out); the only buffers are the
        # RoPE tables, which never change, so nothing needs broadcasting before each forward.
        model = DDP(model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None,
                    gradient_as_bucket_view=True, broadcast_buffers=False)
    return model


def make_optimizer(model, learning_rate, weight_decay, betas, device, optimizer="adamw", muon_lr=0.02,
                   muon_momentum=0.95):
    """AdamW with weight decay on matrices (linear weights, embeddings) only; or with optimizer='muon',
    Muon for the blocks' matrices and AdamW for the rest.

    Decaying gains and biases would pull norms toward zero and buys nothing, so
    every parameter with fewer than 2 dimensions goes to the group without decay.
    The fused CUDA kernel updates all parameters in a few launches instead of several per tensor.
    Each group's lr_scale is its peak learning rate over learning_rate: the loop sets
    lr = schedule * lr_scale on every group, so one schedule drives both optimizers.
    """
    if optimizer not in ("adamw", "muon"):
        raise SystemExit(f"config error: optimizer='{optimizer}' is not one of adamw, muon")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Muon orthogonalises an update, which only means something for a matrix that maps one hidden
    # space to another: the embeddings are lookup tables and the output layer's rows are per-token.
    hidden = {n for n, p in named if optimizer == "muon" and p.dim() == 2 and n.startswith("blocks.")}
    adamw_groups = [
        {"params": [p for n, p in named if p.dim() >= 2 and n not in hidden], "weight_decay": weight_decay},
        {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    for group in adamw_groups:
        group["lr_scale"] = 1.0
    adamw = torch.optim.AdamW(adamw_groups, lr=learning_rate, betas=betas, fused=device.startswith("cuda"))
    if not hidden:
        return adamw
    muon = torch.optim.Muon([{"params": [p for n, p in named if n in hidden], "lr_scale": muon_lr / learning_rate}],
                            lr=muon_lr, weight_decay=weight_decay, momentum=muon_momentum, nesterov=True)
    return MuonWithAdamW(muon, adamw)


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon and torch.optim.AdamW as one optimizer: one step, one list of param groups (Muon's
    first), one state dict, so the loop, the gradient scaler and the checkpoints treat it like AdamW.
    The two keep working on this object's groups and state, also after load_state_dict replaces them."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})
        self.share_groups_and_state()

    def share_groups_and_state(self):
        split = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:split], self.param_groups[split:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.share_groups_and_state()

    @torch.no_grad()
    def step(self, closure=None):
        # Not torch.optim.Muon.step: it orthogonalises in bfloat16 always, which a CPU without native
        # bfloat16 matrix products runs 20x slower than float32. Its groups and state are used as they are.
        for group in self.muon.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    muon_update(param, self.state[param], group)
        self.adamw.step()


def muon_update(param, state, group):
    """torch.optim.Muon's update of one matrix: Nesterov momentum, the update orthogonalised by
    newton_schulz, decoupled weight decay, and the learning rate scaled by sqrt(max(1, rows/cols))
    (torch's default, 'original', adjustment).

    A matrix that FSDP2 shards over the processes (a DTensor) is gathered once, orthogonalised whole
    exactly as one process would (bit for bit, tests/test_recipe.py), and each process keeps its own
    shard. Orthogonalising the shards through DTensor's own matmuls is right in exact arithmetic, but
    their partial products add up in low precision (on a 96x32 matrix over 2 processes: 0.037 from a
    float64 reference against 0.011 whole) and every iteration pays collectives."""
    momentum = group["momentum"]
    buffer = state.setdefault("momentum_buffer", torch.zeros_like(param.grad))
    buffer.lerp_(param.grad, 1 - momentum)
    update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
    coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
    if isinstance(update, DTensor):
        mesh = update.device_mesh
        # with cpu_offload the shards are in CPU memory: gathered and orthogonalised on the GPU
        whole = newton_schulz(update.to(mesh.device_type).full_tensor(), coefficients, steps, eps)
        update = distribute_tensor(whole.to(param.dtype), mesh, param.placements, src_data_rank=None).to(param.device)
    else:
        update = newton_schulz(update, coefficients, steps, eps).to(param.dtype)
    rows, cols = param.shape
    param.mul_(1 - group["lr"] * group["weight_decay"])
    param.add_(update, alpha=-group["lr"] * math.sqrt(max(1, rows / cols)))


def newton_schulz(matrix, coefficients, steps, eps, dtype=None):
    """The matrix's orthogonal polar factor U V^T, approximately, as torch.optim.Muon computes it: scaled to a
    spectral norm of at most 1, then steps of the quintic X <- a X + (b A + c A^2) X with A = X X^T, on the
    wide orientation (so A is the smaller Gram matrix). The coefficients trade accuracy for speed: singular
    values end in a band around 1, not at 1, so the iteration tolerates low precision.

    In bfloat16 on a GPU, as torch does (tensor cores); in float32 on a CPU, where bfloat16 matrix products
    are native only on the newest server chips: on an AVX2 CPU a 512x128 product ran at 3 GFLOP/s in
    bfloat16 against 81-209 in float32. dtype overrides the choice."""
    a, b, c = coefficients
    x = matrix.to(dtype or (torch.bfloat16 if matrix.is_cuda else torch.float32))
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def learning_rate_at(step, learning_rate, warmup_iters, decay_iters, min_lr, schedule="cosine", decay_fraction=0.2,
                     decay_shape="linear"):
    """Linear warmup to learning_rate, then down to min_lr at decay_iters, then flat. With schedule
    'cosine' the decay is a cosine from the end of the warmup; with 'wsd' (warmup-stable-decay) the rate
    stays at learning_rate until the last decay_fraction of decay_iters, then falls linearly or as
    1 - sqrt(progress) ('1-sqrt', which drops faster at first and slower at the end)."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    if schedule not in ("cosine", "wsd") or decay_shape not in ("linear", "1-sqrt"):
        raise SystemExit(f"config error: lr_schedule='{schedule}' / lr_decay_shape='{decay_shape}': the schedule is one "
                         "of cosine, wsd and the decay shape one of linear, 1-sqrt")
    if schedule == "cosine":
        progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)
    decay_start = max(warmup_iters, decay_iters - round(decay_fraction * decay_iters))
    if step < decay_start:
        return learning_rate
    progress = (step - decay_start) / max(1, decay_iters - decay_start)
    remaining = 1.0 - progress if decay_shape == "linear" else 1.0 - math.sqrt(progress)
    return min_lr + remaining * (learning_rate - min_lr)


def optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip,
                   sync_every_micro_step=False):
    """One optimizer step: accumulate the gradients of accumulation_steps micro-batches
    (micro_step_loss(i) runs the forward of micro-batch i and returns its mean loss), clip the
    global gradient norm, update, and return the step's mean loss as a tensor (not synchronised).
    Gradients are averaged across processes once, after the last micro-step; under FSDP that means
    each process holds whole (unsharded) gradients until then, and sync_every_micro_step
    reduce-scatters them after every micro-step instead: less memory, more communication."""
    loss_sum = None
    for micro_step in range(accumulation_steps):
        last = micro_step == accumulation_steps - 1
        if isinstance(model, DDP):
            model.require_backward_grad_sync = last
        elif isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last or sync_every_micro_step)
        loss = micro_step_loss(micro_step) / accumulation_steps  # the mean over the whole step
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


# -----------------------------------------------------------------------------
# pipeline parallelism: the layers split into stages on different processes

def pipeline_layers(n_layer, stages):
    """The layers of each pipeline stage: consecutive and as even as whole layers allow."""
    if not 1 <= stages <= n_layer:
        raise SystemExit(f"config error: pipeline_stages={stages} must be between 1 and n_layer={n_layer}")
    return [range(s * n_layer // stages, (s + 1) * n_layer // stages) for s in range(stages)]


def split_for_pipeline(model, layers, first, last):
    """Cut the model down, in place, to one pipeline stage: its layers, the embeddings if it is the
    first stage, the final norm and output layer if it is the last. The parts kept keep their names
    (layer 7 stays blocks.7), so a stage's state dict is a piece of the whole model's and checkpoints
    have one format for every layout."""
    for i in range(len(model.blocks)):
        if i not in layers:
            model.blocks[i] = None
    if not first:
        model.wte = model.wpe = None
    if not last:
        model.ln_f = model.lm_head = None
    return model


class PipelineStageModule(nn.Module):
    """A stage as the pipeline schedule calls it: one tensor in (token ids on the first stage, hidden
    states on the others) and one out (hidden states, or on the last stage the logits of every
    position, which the schedule turns into the loss with model.cross_entropy)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, all_logits=True)[0]


class Pipeline:
    """This process's place on a (pipeline x data) grid of processes, its stage of the model, and the
    schedule that runs the step's micro-batches through the stages.

    Process r holds stage r // data_parallel and is replica r % data_parallel of it: the processes of
    one stage average their gradients (an all-reduce, or FSDP, over the 'data' dimension of the
    mesh), and the processes of one replica pass activations forward and gradients back (the
    'pipeline' dimension).
    A step's micro-batches flow through the stages one after another, so stage s works on micro-batch
    i while stage s+1 works on i-1; GPipe runs every forward, then every backward, and holds all the
    micro-batches' activations; 1F1B starts each micro-batch's backward as soon as it can and holds at
    most as many as there are stages. Both leave every stage idle for a fraction
    (stages - 1) / (micro-batches + stages - 1) of the step (the bubble)."""

    def __init__(self, model, dist, stages, schedule, microbatches, parallelism, dtype, cpu_offload, compile,
                 seed=None):
        # imported here: only pipelined runs need them
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.data_parallel, self.microbatches = dist.world_size // stages, microbatches
        mesh = init_device_mesh(dist.device.split(":")[0], (stages, self.data_parallel),
                                mesh_dim_names=("pipeline", "data"))
        self.stage_index, self.data_rank = mesh.get_local_rank("pipeline"), mesh.get_local_rank("data")
        self.is_first, self.is_last = self.stage_index == 0, self.stage_index == stages - 1
        self.group = mesh["pipeline"].get_group()
        self.model = split_for_pipeline(model, pipeline_layers(model.config.n_layer, stages)[self.stage_index],
                                        self.is_first, self.is_last)
        if any(p.is_meta for p in model.parameters()):  # a new model: only this stage's layers get weights
            init_weights(model, seed)
        if compile:
            compile_blocks(model)  # in place, so FSDP and the schedule see the same modules
        module = PipelineStageModule(model)
        self.sharded = parallelism == "fsdp" and (self.data_parallel > 1 or cpu_offload)
        if self.sharded:
            shard_model(module, model.blocks, mesh["data"], dtype, cpu_offload)
        else:
            # Not wrapped in DDP: its reducer expects to see each forward and backward call, but the
            # schedule runs the backward passes itself (torch 2.13 computed wrong gradients with DDP
            # in a 2 x 2 grid); average_gradients does the all-reduce once per step instead.
            module.to(dist.device)
        self.data_group = mesh["data"].get_group()
        # The schedule averages the micro-batches' gradients (scale_grads), as gradient accumulation does.
        stage = PipelineStage(module, self.stage_index, stages, torch.device(dist.device), group=self.group)
        self.schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule](stage, microbatches,
                                                                                 loss_fn=cross_entropy)

    def run(self, x, y, backward=True):
        """Forward (and backward) micro-batches x (m * batch, T) with targets y through the stages;
        on the last stage returns the m micro-batch losses, elsewhere None."""
        losses = []
        inputs = (x,) if self.is_first else ()  # later stages receive their inputs from the stage before
        target = y if self.is_last else None
        run = self.schedule.step if backward else self.schedule.eval
        run(*inputs, target=target, losses=losses, return_outputs=False)
        return torch.stack(losses) if self.is_last else None

    def average_gradients(self):
        """Average the gradients of this stage's replicas, which saw different batches (under FSDP
        its reduce-scatter has done so already). The all-reduces are queued together, then waited for."""
        if self.sharded or self.data_parallel == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for work in [torch.distributed.all_reduce(g, group=self.data_group, async_op=True) for g in grads]:
            work.wait()
        for g in grads:
            g.div_(self.data_parallel)

    def clip_gradients(self, max_norm):
        """Scale the gradients so that their norm over the whole model, every stage's, is at most
        max_norm; returns that norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):  # under FSDP: the norm of the whole stage, not of this shard
            norm = norm.full_tensor()
        # Each stage holds different parameters: the squared norms of the stages add up.
        norm = norm.square()
        torch.distributed.all_reduce(norm, group=self.group)
        norm = norm.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm


def pipeline_optimizer_step(pipeline, optimizer, x, y, grad_clip, autocast):
    """One optimizer step of a pipeline stage: every micro-batch forward and backward through the
    schedule, gradients averaged over the replicas and clipped over all stages, the update. Returns
    the step's mean loss on the last stage and 0 on the others, as a tensor (not synchronised)."""
    with autocast:
        losses = pipeline.run(x, y)
    pipeline.average_gradients()
    if grad_clip > 0:
        pipeline.clip_gradients(grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses.mean().detach() if pipeline.is_last else torch.zeros((), device=x.device)


@torch.no_grad()
def estimate_loss_pipelined(pipeline, bins_by_split, eval_iters, batch_size, device, autocast, seed):
    """estimate_loss for a pipeline: the same batches, dealt out to the data-parallel replicas and
    sent through the schedule as many at a time as it has micro-batches; batches past eval_iters
    only fill the last group and are not counted."""
    microbatches = pipeline.microbatches
    was_training = pipeline.model.training
    pipeline.model.eval()
    losses = {}
    per_call = pipeline.data_parallel * microbatches
    for split_index, (split, bins) in enumerate(bins_by_split.items()):
        total = torch.zeros((), device=device)
        indices = range(pipeline.data_rank, per_call * math.ceil(eval_iters / per_call), pipeline.data_parallel)
        for start in range(0, len(indices), microbatches):
            group = indices[start : start + microbatches]
            x, y = bins.sample_many(batch_size, [(seed, 1, split_index, i % eval_iters) for i in group], device)
            with autocast:
                batch_losses = pipeline.run(x, y, backward=False)
            if pipeline.is_last:
                counted = torch.tensor([i < eval_iters for i in group], device=device)
                total += (batch_losses.float() * counted).sum()
        # the last stage of each replica holds its sum; the other processes add zeros
        torch.distributed.all_reduce(total)
        losses[split] = total.item() / eval_iters
    pipeline.model.train(was_training)
    return losses


@torch.no_grad()
def estimate_loss(model, bins_by_split, eval_iters, batch_size, device, autocast, seed, rank=0, world_size=1):
    """Mean loss per split over eval_iters batches. The batches are the same at every call
    (seeded by split and index), so successive evaluations differ only by the model. Under
    torchrun the batches are dealt out to the processes and the sums added up, so the result
    does not depend on the number of processes."""
    was_training = model.training
    model.eval()
    losses = {}
    for split_index, (split, bins) in enumerate(bins_by_split.items()):
        total = torch.zeros((), device=device)
        # Every process runs the same number of forward passes: under FSDP each one is a collective.
        for i in range(rank, world_size * math.ceil(eval_iters / world_size), world_size):
            x, y = bins.sample(batch_size, (seed, 1, split_index, i % eval_iters), device)
            with autocast:
                _, loss = model(x, y)
            if i < eval_iters:
                total += loss.float()
        losses[split] = all_reduce_sum(total, world_size).item() / eval_iters
    model.train(was_training)
    return losses


def all_reduce_sum(tensor, world_size):
    if world_size > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


checkpoint_writer = BackgroundCheckpointWriter()  # rank 0's: one per process, as there is one run per process


def save_training_checkpoint(raw_model, optimizer, dist, out_dir, keep, pipeline=None, lora=None, base=None,
                             **fields):
    """Gather the model, optimizer and every process's random state into CPU memory, and (rank 0)
    write them with fields (kind, step, config, tokenizer, ...) as out_dir/ckpt-<step>.pt from a
    background thread, while training goes on (wait_for_checkpoint: until it is on disk). Every
    process must call this. Returns the path being written (None on the other ranks). With lora
    (the LoRA settings) the weights written are the adapters only, with the base they go on
    (lora.checkpoint_weights); the optimizer holds only them anyway, as only they train."""
    if pipeline is None:
        model_state, optimizer_state = gather_training_state(raw_model, optimizer, keep=dist.is_main)
    else:
        # each stage's first replica gathers its stage, and rank 0 joins the stages into one model
        parts = gather_training_state(raw_model, optimizer, keep=pipeline.data_rank == 0)
        model_state, optimizer_state = join_pipeline_stages(parts, dist)
    rng_states = [None] * dist.world_size
    if dist.world_size > 1:
        torch.distributed.all_gather_object(rng_states, rng_state())
    else:
        rng_states = [rng_state()]
    if not dist.is_main:
        return None
    checkpoint = {"model_config": asdict(raw_model.config), **checkpoint_weights(model_state, lora, base),
                  "optimizer": optimizer_state, "rng": rng_states, **fields}
    return checkpoint_writer.save(checkpoint, out_dir, keep)


def wait_for_checkpoint():
    """Until the checkpoint being written in the background is on disk; stops with one line if
    writing it failed. Call it before the run ends."""
    checkpoint_writer.wait()


def join_pipeline_stages(part, dist):
    """On rank 0, the whole model's and optimizer's state dicts from every stage's (model, optimizer)
    part (None from the replicas that hold a copy); None elsewhere."""
    parts = [None] * dist.world_size if dist.is_main else None
    torch.distributed.gather_object(part, parts, dst=0)
    if not dist.is_main:
        return None, None
    model_state, optimizer_state = {}, {"state": {}, "param_groups": []}
    for stage_model, stage_optimizer in (p for p in parts if p[0] is not None):  # in stage order
        model_state.update(stage_model)
        optimizer_state["state"].update(stage_optimizer["state"])
        if not optimizer_state["param_groups"]:
            optimizer_state["param_groups"] = [dict(group, params=[]) for group in stage_optimizer["param_groups"]]
        for whole, group in zip(optimizer_state["param_groups"], stage_optimizer["param_groups"]):
            whole["params"] += group["params"]
    return model_state, optimizer_state


def pipeline_stage_part(checkpoint, model):
    """The part of a whole model's checkpoint (weights and optimizer state) that a pipeline stage holds."""
    names = set(model.state_dict())
    optimizer = checkpoint["optimizer"]
    return {"model": {k: v for k, v in checkpoint["model"].items() if k in names},
            "optimizer": {"state": {k: v for k, v in optimizer["state"].items() if k in names},
                          "param_groups": [dict(group, params=[p for p in group["params"] if p in names])
                                           for group in optimizer["param_groups"]]}}


def restore_rng_state(rng_states, dist, log=print):
    """Each process takes back its own random state, if the checkpoint has one per process."""
    if len(rng_states) == dist.world_size:
        set_rng_state(rng_states[dist.rank])
    else:
        log(f"note: the checkpoint was written by {len(rng_states)} processes, this run has {dist.world_size}: "
            "the weights, optimizer and data position resume exactly, dropout's random state starts afresh")


def checkpoint_to_resume(resume, out_dir, kind, config, model_keys):
    """The checkpoint, and its path, that a post-training run of this kind continues: with resume
    'yes' the newest one of out_dir that loads (falling back past damaged ones), with 'auto' that
    if there is one, else (None, None). Stops with one line if it cannot continue this run: there
    is none, another script wrote it, it has no optimizer state, or it was trained with other
    values of the config keys that fix the model (model_keys)."""
    if resume not in ("no", "yes", "auto"):
        raise SystemExit(f"config error: resume='{resume}' is not one of no, yes, auto")
    if resume == "no":
        return None, None
    checkpoint, path = load_newest_checkpoint(out_dir)
    if checkpoint is None:
        if resume == "yes":
            raise SystemExit(f"config error: resume='yes' but {out_dir} has no checkpoint that loads; check --out_dir, "
                             "or start a new run with --resume=no")
        return None, None
    if checkpoint.get("kind") != kind:
        raise SystemExit(f"checkpoint error: {path} is of kind '{checkpoint.get('kind')}', not one of {kind}.py's; "
                         "resume it with the script that wrote it, or set another --out_dir")
    if "optimizer" not in checkpoint:
        raise SystemExit(f"checkpoint error: {path} holds no optimizer state (an older {kind}.py wrote it) and cannot "
                         f"resume; start a new run from it with --init_from={path} and another --out_dir")
    for key in model_keys:
        if checkpoint["config"][key] != config[key]:
            raise SystemExit(f"config error: {path} was trained with {key}={checkpoint['config'][key]!r}, this run "
                             f"has {key}={config[key]!r}; resume with the run's value, or set another --out_dir")
    return checkpoint, path


def format_duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
