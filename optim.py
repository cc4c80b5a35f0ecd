"""
The optimizer and its schedule, for every trainer: AdamW, or Muon for the blocks' matrices with
AdamW for the rest, as one optimizer (make_optimizer); the learning-rate schedules; and one
optimizer step with gradient accumulation, clipping and fp16 loss scaling (optimizer_step).

    optimizer = make_optimizer(model, 6e-4, 0.1, (0.9, 0.95), "cuda", "muon")
    set_learning_rate(optimizer, learning_rate_at(step, 6e-4, 100, 5000, 6e-5, "wsd"))
    loss = optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip=1.0)

Muon (Jordan et al. 2024) replaces a matrix's update by its nearest orthogonal matrix (newton_schulz),
so every direction of the update moves at the same rate. More: docs/train.md.
"""

import math

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

def make_optimizer(model, learning_rate, weight_decay, betas, device, optimizer="adamw", muon_lr=0.02,
                   muon_momentum=0.95):
    """AdamW with weight decay on matrices only (decaying gains and biases pulls norms toward zero and buys
    nothing); with optimizer='muon', Muon for the blocks' matrices. Each group's lr_scale is its peak
    learning rate over learning_rate, so one schedule (set_learning_rate) drives both optimizers."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Muon orthogonalises an update, which only means something for a matrix that maps one hidden
    # space to another: the embeddings are lookup tables and the output layer's rows are per-token.
    # (An encoder-decoder's encoder blocks are such matrices too.)
    hidden = {n for n, p in named if optimizer == "muon" and p.dim() == 2 and n.startswith(("blocks.", "encoder."))}
    matrices = [p for n, p in named if p.dim() >= 2 and n not in hidden]
    adamw_groups = [{"params": matrices, "weight_decay": weight_decay, "lr_scale": 1.0},
                    {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
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
    """torch.optim.Muon's update of one matrix (its default 'original' lr adjustment, sqrt(max(1, rows/cols))).
    A matrix that FSDP2 shards (a DTensor) is gathered and orthogonalised whole, bit for bit as one process
    would, each process keeping its shard: DTensor's own matmuls lose precision (docs/train.md)."""
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
    param.mul_(1 - group["lr"] * group["weight_decay"])
    param.add_(update, alpha=-group["lr"] * math.sqrt(max(1, param.size(0) / param.size(1))))


def newton_schulz(matrix, coefficients, steps, eps, dtype=None):
    """The matrix's orthogonal polar factor U V^T, approximately, as torch.optim.Muon computes it: scaled to a
    spectral norm of at most 1, then steps of the quintic X <- a X + (b A + c A^2) X with A = X X^T on the wide
    orientation (the smaller Gram matrix). In bfloat16 on a GPU, as torch does, in float32 on a CPU, or in dtype."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = (matrix.T if tall else matrix).to(dtype or (torch.bfloat16 if matrix.is_cuda else torch.float32))
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def learning_rate_at(step, learning_rate, warmup_iters, decay_iters, min_lr, schedule="cosine", decay_fraction=0.2,
                     decay_shape="linear"):
    """Linear warmup to learning_rate, then down to min_lr at decay_iters, then flat: 'cosine' decays from the
    end of the warmup; 'wsd' (warmup-stable-decay) holds learning_rate until the last decay_fraction of
    decay_iters, then falls linearly or as 1 - sqrt(progress) ('1-sqrt')."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    if schedule == "cosine":
        progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)
    decay_start = max(warmup_iters, decay_iters - round(decay_fraction * decay_iters))
    if step < decay_start:
        return learning_rate
    progress = (step - decay_start) / max(1, decay_iters - decay_start)
    remaining = 1.0 - progress if decay_shape == "linear" else 1.0 - math.sqrt(progress)
    return min_lr + remaining * (learning_rate - min_lr)


def set_learning_rate(optimizer, lr):
    """Set lr times its lr_scale on every group (a checkpoint's groups from before Muon have none: 1); returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def optimizer_step(model, optimizer, scaler, accumulation_steps, micro_step_loss, grad_clip,
                   sync_every_micro_step=False):
    """One optimizer step over accumulation_steps micro-batches (micro_step_loss(i): micro-batch i's mean loss),
    clipped and scaled; returns the step's mean loss as a tensor. Gradients sync after the last micro-step only;
    under FSDP, sync_every_micro_step reduce-scatters them after every one: less memory, more communication."""
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
