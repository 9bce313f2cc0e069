#!/usr/bin/env python3
"""torch peers of bench/peers/peers_bench: one JSON object per line on stdout.

Rows (each the best of --reps timed repetitions after one warm-up, on torch.set_num_threads(T)):
  torch_muon         torch.optim.Muon.step over the Llama-style hidden matrices (bf16 Newton-Schulz)
  torch_muon_f32     the same step with torch's NS5 in fp32 (its algorithm, without the bf16 cast)
  torch_adamw_fused  torch.optim.AdamW(fused=True).step over `--elements` fp32 parameters
Shapes: per layer 4 x (d, d) attention and (ffn, d), (ffn, d), (d, ffn) MLP matrices.
"""
import argparse
import json
import sys
import time


def best_seconds(fn, reps):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def hidden_shapes(d, ffn, layers):
    per_layer = [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn)]
    return per_layer * layers


def ns5_f32(g, coefficients=(3.4445, -4.775, 2.0315), steps=5, eps=1e-7):
    """torch.optim._muon._zeropower_via_newtonschulz in fp32 (the fp32 reference)."""
    import torch

    a, b, c = coefficients
    x = g.to(dtype=torch.float32, copy=True)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x.T if tall else x


def muon_f32_step(params, bufs, lr=1e-3, wd=0.1, momentum=0.95):
    """torch.optim.Muon.step's arithmetic (nesterov, original shape scale) with the fp32 NS5."""
    import torch

    with torch.no_grad():
        for p, buf in zip(params, bufs):
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum)
            o = ns5_f32(update)
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1 - lr * wd)
            p.add_(o, alpha=-lr * scale)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--elements", type=int, default=134_000_000)
    ap.add_argument("--muon-threads", type=int, default=2)
    ap.add_argument("--adamw-threads", default="1,2")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--skip-muon", action="store_true")
    a = ap.parse_args()
    try:
        import torch
    except ImportError as e:  # the caller prints the skip message
        print(json.dumps({"peer": "torch", "error": f"torch not importable: {e}"}))
        return 0

    shapes = hidden_shapes(a.d_model, a.ffn, a.layers)
    if not a.skip_muon:
        torch.set_num_threads(a.muon_threads)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt = torch.optim.Muon(params, lr=1e-3)
        s = best_seconds(opt.step, a.reps)
        print(json.dumps({"peer": "torch_muon", "dtype": "bf16", "ranks": 1, "threads": a.muon_threads,
                          "matrices": len(shapes), "seconds": s}), flush=True)
        bufs = [torch.zeros_like(p) for p in params]
        s = best_seconds(lambda: muon_f32_step(params, bufs), a.reps)
        print(json.dumps({"peer": "torch_muon_f32", "dtype": "f32", "ranks": 1, "threads": a.muon_threads,
                          "matrices": len(shapes), "seconds": s}), flush=True)
        del params, bufs, opt

    p = torch.nn.Parameter(torch.randn(a.elements) * 0.02)
    p.grad = torch.randn(a.elements) * 1e-3
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    for t in [int(x) for x in a.adamw_threads.split(",") if x]:
        torch.set_num_threads(t)
        s = best_seconds(opt.step, a.reps + 2)
        print(json.dumps({"peer": "torch_adamw_fused", "grad_dtype": "f32", "ranks": 1, "threads": t,
                          "elements": a.elements, "seconds": s}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
