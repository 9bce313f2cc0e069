"""Trains gpt_model.GPT with ShardedOptimizer on one rank of a world (torchrun, mpirun or alone) for
every (stage, layout), each rank on its slice of the global batch, and writes what it saw.

  python dist_worker.py OUT [--save DIR --save-at K] [--resume DIR --resume-at K]
writes OUT.rank<r>.pt: {config: {"losses": [local losses], "params": {name: tensor}, "state": ...,
"memory": opt.memory()[0], "buckets": the engine's buckets}} for every config in CONFIGS: stage-layout,
"-full" = grad_memory="full" (else ZeRO-2 sharded gradients at stage 2), "-accum2" = each rank's slice
in 2 micro-batches (losses halved, backward_passes_per_step=2).
--save: the stage-2 owned run also saves a checkpoint after step K (under DIR).
--mismatch: finally rank 1 constructs an optimizer whose lm_head.weight has another shape and
prints the error every rank got.
Also a run "clip" (stage 2, owned, AdamW only) that calls opt.clip_grad_norm_(CLIP_MAX_NORM) before
every step and records the norms it returned ("norms").
--resume: one more run "resume" (stage 2, owned) loads DIR, continues from step K to the end.
--save under torch.distributed also writes DIR/dcp with torch.distributed.checkpoint (model state_dict
+ opt.sharded_state_dict()); --resume-dcp DIR/dcp: a run "resume_dcp" (stage 2, dim0, another initial
seed) loads it and continues from step K.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt_model import GPT, batch  # noqa: E402
from shardopt.torch import ShardedOptimizer  # noqa: E402

torch.set_num_threads(1)

STEPS = 6
GLOBAL_BATCH = 12  # sequences per step: equal slices at 1, 2 and 3 ranks, each split in 2 equal micro-batches
# (stage, layout, grad_memory, micro-batches per step)
CONFIGS = [(1, "owned", "sharded", 1), (2, "owned", "sharded", 1), (1, "dim0", "sharded", 1), (2, "dim0", "sharded", 1),
           (2, "owned", "full", 1), (2, "dim0", "full", 1), (2, "owned", "sharded", 2), (2, "owned", "full", 2),
           (2, "dim0", "sharded", 2)]


def config_name(stage, layout, grad_memory, accumulation):
    return f"{stage}-{layout}" + ("-full" if grad_memory == "full" else "") + \
        (f"-accum{accumulation}" if accumulation > 1 else "")


def train(stage, layout, rank, world, save=None, save_at=None, resume=None, resume_at=0, grad_memory="sharded",
          accumulation=1, layout_seed=0, dcp_resume=None):
    model = GPT(seed=layout_seed)
    opt = ShardedOptimizer(model.named_parameters(), matrix="muon", elementwise="adamw", lr=3e-3, matrix_lr=0.02,
                           stage=stage, layout=layout, bucket_bytes=16 << 10, grad_memory=grad_memory,
                           backward_passes_per_step=accumulation)
    assert opt.world_size == world, (opt.world_size, world)
    first = 0
    if resume:
        opt.load(resume)
        first = resume_at
    if dcp_resume:  # torch.distributed.checkpoint: the model and the optimizer's sharded state dict
        import torch.distributed.checkpoint as dcp
        sd = {"model": model.state_dict(), "optim": opt.sharded_state_dict()}
        dcp.load(sd, checkpoint_id=dcp_resume)
        model.load_state_dict(sd["model"])
        opt.load_sharded_state_dict(sd["optim"])
        first = resume_at
    losses = []
    for step in range(first, STEPS):
        x, y = batch(step, GLOBAL_BATCH)
        n = x.shape[0] // world
        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        loss = 0.0
        for m in range(accumulation):  # strided micro-batches of this rank's slice
            micro = model(x[m::accumulation], y[m::accumulation]) / accumulation
            micro.backward()
            loss += micro.item()
        opt.step()
        opt.zero_grad()
        losses.append(loss)
        if save and step + 1 == save_at:
            opt.save(save)
            if dist.is_initialized():
                import torch.distributed.checkpoint as dcp
                dcp.save({"model": model.state_dict(), "optim": opt.sharded_state_dict()},
                         checkpoint_id=os.path.join(save, "dcp"))
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "state": opt.state_dict()["state"], "memory": opt.memory()[0], "buckets": opt._engines[0].buckets(),
            "numels": [p.numel() for p in model.parameters()]}


CLIP_MAX_NORM = 0.5  # below this model's early gradient norms (about 1-3): the clip is active


def train_clip(rank, world):
    model = GPT()
    opt = ShardedOptimizer(model.named_parameters(), matrix=None, elementwise="adamw", lr=3e-3,
                           bucket_bytes=16 << 10)
    losses, norms = [], []
    for step in range(STEPS):
        x, y = batch(step)
        n = x.shape[0] // world
        loss = model(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
        loss.backward()
        norm = opt.clip_grad_norm_(CLIP_MAX_NORM)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        norms.append(norm.item())
    return {"losses": losses, "norms": norms, "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--save")
    ap.add_argument("--save-at", type=int, default=3)
    ap.add_argument("--resume")
    ap.add_argument("--resume-at", type=int, default=3)
    ap.add_argument("--resume-dcp", help="also a run that loads this torch.distributed.checkpoint (dim0 layout)")
    ap.add_argument("--mismatch", action="store_true", help="then rank 1 gives lm_head.weight another shape")
    a = ap.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", 0))
        world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1))
    results = {}
    for stage, layout, grad_memory, accumulation in CONFIGS:
        name = config_name(stage, layout, grad_memory, accumulation)
        save = a.save if name == "2-owned" else None
        results[name] = train(stage, layout, rank, world, save, a.save_at, grad_memory=grad_memory,
                              accumulation=accumulation)
    results["clip"] = train_clip(rank, world)
    if a.resume:
        results["resume"] = train(2, "owned", rank, world, resume=a.resume, resume_at=a.resume_at)
    if a.resume_dcp:  # another seed: everything must come from the checkpoint; dim0 here (saved owned)
        results["resume_dcp"] = train(2, "dim0", rank, world, resume_at=a.resume_at, layout_seed=7,
                                      dcp_resume=a.resume_dcp)
    torch.save(results, f"{a.out}.rank{rank}.pt")
    if a.mismatch:
        model = GPT()
        params = list(model.named_parameters())
        if rank == 1:
            params[-1] = ("lm_head.weight", torch.nn.Parameter(torch.zeros(params[-1][1].shape[0] + 1, params[-1][1].shape[1])))
        try:
            ShardedOptimizer(params)
            print(f"rank {rank}: no error", flush=True)
        except ValueError as e:
            print(f"rank {rank}: ValueError: {e}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
