"""
Pipeline parallelism: the model's layers cut into consecutive stages on different processes, and
the schedule (GPipe or 1F1B, torch.distributed.pipelining) that runs a step's micro-batches through
them; beside it, data parallelism over the processes that hold the same stage.

    pipeline = Pipeline(model, dist, stages=2, schedule="1f1b", microbatches=8, parallelism="ddp",
                        dtype="bfloat16", cpu_offload=False, compile=True, seed=1337)
    loss = pipeline_optimizer_step(pipeline, optimizer, x, y, grad_clip, autocast)

A stage keeps the names of the parts it holds (layer 7 stays blocks.7), so its state dict is a piece
of the whole model's: checkpoints have one format for every layout (join_pipeline_stages to save,
pipeline_stage_part to resume).
"""

import torch
import torch.distributed
import torch.nn as nn
from torch.distributed.tensor import DTensor

from checkpoint import gather_training_state
from model import cross_entropy
from parallel import compile_blocks, init_weights, shard_model

def pipeline_layers(n_layer, stages, tie_embeddings=False):
    """Each stage's layers: consecutive, as even as whole layers allow; a config error if the model cannot be cut so."""
    if not 1 <= stages <= n_layer:
        raise SystemExit(f"config error: pipeline_stages={stages} must be between 1 and n_layer={n_layer}")
    if stages > 1 and tie_embeddings:
        raise SystemExit("config error: tie_embeddings=True shares one matrix between the first and the last "
                         "pipeline stage; set --tie_embeddings=False")
    return [range(s * n_layer // stages, (s + 1) * n_layer // stages) for s in range(stages)]


def split_for_pipeline(model, layers, first, last):
    """Cut the model down in place to one stage: its layers, embeddings on the first, ln_f and lm_head on the last."""
    for i in range(len(model.blocks)):
        if i not in layers:
            model.blocks[i] = None
    if not first:
        model.wte = model.wpe = None
    if not last:
        model.ln_f = model.lm_head = None
    return model


class PipelineStageModule(nn.Module):
    """A stage as the schedule calls it: token ids or hidden states in, hidden states or every position's logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, all_logits=True)[0]


class Pipeline:
    """This process's place on a (pipeline x data) grid of processes, its stage of the model, and the
    schedule that runs the step's micro-batches through the stages. Process r holds stage
    r // data_parallel as replica r % data_parallel: one stage's processes average their gradients (the
    mesh's 'data' dimension), one replica's pass activations and gradients (its 'pipeline' dimension).
    The schedules, their memory and their bubble: docs/planning.md."""

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
        if compile:  # in place, as under FSDP, so FSDP and the schedule see the same modules
            compile_blocks(model)
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
        """Forward (and backward) micro-batches x (m * batch, T), targets y; the last stage returns the m losses."""
        losses = []
        inputs = (x,) if self.is_first else ()  # later stages receive their inputs from the stage before
        run = self.schedule.step if backward else self.schedule.eval
        run(*inputs, target=y if self.is_last else None, losses=losses, return_outputs=False)
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
        """Scale the gradients to a norm of at most max_norm over the whole model, every stage's; returns the norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):  # under FSDP: the norm of the whole stage, not of this shard
            norm = norm.full_tensor()
        squares = norm.square()  # each stage holds different parameters: their squared norms add up
        torch.distributed.all_reduce(squares, group=self.group)
        norm = squares.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def training_state(self, model, optimizer, dist):
        """For a checkpoint: on rank 0 the whole model's and optimizer's state dicts, (None, None) elsewhere."""
        return join_pipeline_stages(gather_training_state(model, optimizer, keep=self.data_rank == 0), dist)


def pipeline_optimizer_step(pipeline, optimizer, x, y, grad_clip, autocast):
    """One optimizer step of a pipeline stage, gradients averaged over the replicas and clipped over all stages;
    returns the step's mean loss on the last stage and 0 on the others, as a tensor (not synchronised)."""
    with autocast:
        losses = pipeline.run(x, y)
    pipeline.average_gradients()
    if grad_clip > 0:
        pipeline.clip_gradients(grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses.mean().detach() if pipeline.is_last else torch.zeros((), device=x.device)


def join_pipeline_stages(part, dist):
    """On rank 0, the whole model's and optimizer's state dicts from every stage's part (None from replicas)."""
    parts = [None] * dist.world_size if dist.is_main else None
    torch.distributed.gather_object(part, parts, dst=0)
    if not dist.is_main:
        return None, None
    stages = [p for p in parts if p[0] is not None]  # in stage order
    model_state = {k: v for stage_model, _ in stages for k, v in stage_model.items()}
    state = {k: v for _, stage_optimizer in stages for k, v in stage_optimizer["state"].items()}
    groups = [dict(same[0], params=[p for group in same for p in group["params"]])  # a group's params of every stage
              for same in zip(*(stage_optimizer["param_groups"] for _, stage_optimizer in stages))]
    return model_state, {"state": state, "param_groups": groups}


def pipeline_stage_part(checkpoint, model):
    """The part of a whole model's checkpoint (weights and optimizer state) that a pipeline stage holds."""
    names = set(model.state_dict())
    optimizer = checkpoint["optimizer"]
    return {**checkpoint, "model": {k: v for k, v in checkpoint["model"].items() if k in names},
            "optimizer": {"state": {k: v for k, v in optimizer["state"].items() if k in names},
                          "param_groups": [dict(group, params=[p for p in group["params"] if p in names])
                                           for group in optimizer["param_groups"]]}}
