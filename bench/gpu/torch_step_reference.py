#!/usr/bin/env python3
"""torch's optimizer step on the same parameters as engine_step_bench, on the same GPU, as JSON lines.

The peer a user would pick: torch.optim.Muon on the tensors shardopt routes to Muon (the hidden 2-D
matrices) and torch.optim.AdamW(fused=True) on the rest, fp32 parameters and gradients, the
hyperparameters of engine_step_bench (Muon lr 0.02, AdamW lr 1e-3). Each optimizer's step() is timed
on its own with CUDA events (median of --reps after two warm-up steps), and the device memory its
state takes is read from torch's allocator.

Usage: torch_step_reference.py SHAPES_JSON [--reps N]   (SHAPES_JSON from engine_step_bench --shapes-out)
"""
import argparse
import json

import torch


def median_step_seconds(opt, reps):
    for _ in range(2):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    tensors = json.load(open(args.shapes))
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def make(shape):
        p = torch.nn.Parameter(torch.randn(*shape, device=dev, generator=gen) * 0.02)
        p.grad = torch.randn(*shape, device=dev, generator=gen) * 1e-3
        return p

    muon_params = [make(t["shape"]) for t in tensors if t["muon"]]
    other_params = [make(t["shape"]) for t in tensors if not t["muon"]]
    row = {"bench": "torch_step", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "muon_params": sum(p.numel() for p in muon_params),
           "elementwise_params": sum(p.numel() for p in other_params)}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    adamw = torch.optim.AdamW(other_params, lr=1e-3, fused=True)
    row["adamw_fused_seconds"] = median_step_seconds(adamw, args.reps)
    row["adamw_state_bytes"] = torch.cuda.memory_allocated() - before
    if hasattr(torch.optim, "Muon"):
        before = torch.cuda.memory_allocated()
        muon = torch.optim.Muon(muon_params, lr=0.02)
        row["muon_seconds"] = median_step_seconds(muon, args.reps)
        row["muon_state_bytes"] = torch.cuda.memory_allocated() - before
    else:
        row["muon_note"] = "torch.optim.Muon is not in torch " + torch.__version__
    row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
