#!/usr/bin/env python3
"""torch's Muon orthogonalization on the same shapes as gpu_bench, in the same run, as JSON lines.

Uses torch.optim's own `_zeropower_via_newtonschulz` (the function `torch.optim.Muon` calls; 2-D,
one matrix per call, so a batch is a Python loop as in the optimizer) when it can be imported, and
also a batched re-implementation of the documented algorithm with torch.baddbmm ("torch_bmm_reimpl").
Inputs are random bf16 (never zeros); timing is CUDA events, median of the repetitions.
"""
import json
import sys

import torch

A, B, C = 3.4445, -4.7750, 2.0315
STEPS, EPS = 5, 1e-7


def load_torch_ns():
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz  # noqa: PLC0415
        return _zeropower_via_newtonschulz
    except Exception as err:  # pragma: no cover - depends on the torch build
        print(json.dumps({"bench": "note", "torch_ns_import_error": repr(err)}), flush=True)
        return None


def ns_bmm(g):
    """Documented NS5 on a batch [b, m, n] in bf16: wide orientation, Frobenius norm clamped at eps."""
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=EPS)
    for _ in range(STEPS):
        a = x @ x.mT
        b = torch.baddbmm(a, a, a, beta=B, alpha=C)
        x = torch.baddbmm(x, b, x, beta=A)
    return x.mT if tall else x


def median_seconds(fn, warmup=2, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3)
    times.sort()
    return times[len(times) // 2]


def flops(rows, cols):
    p, q = min(rows, cols), max(rows, cols)
    return STEPS * (4.0 * p * p * q + 2.0 * p ** 3)


def main():
    quick = "--quick" in sys.argv
    reps = 5 if quick else 20
    dev = torch.device("cuda")
    print(json.dumps({"bench": "torch_device", "name": torch.cuda.get_device_name(0), "torch": torch.__version__}),
          flush=True)
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    s = median_seconds(lambda: a @ b, 3, reps)
    gemm = 2.0 * n ** 3 / s / 1e12
    print(json.dumps({"bench": "torch_gemm_bf16", "m": n, "n": n, "k": n, "seconds": s, "tflops": gemm}), flush=True)
    del a, b
    zp = load_torch_ns()
    shapes = [(1024, 1024, 1), (2048, 2048, 1), (4096, 4096, 1), (4096, 11008, 1), (11008, 4096, 1),
              (1024, 1024, 16), (2048, 2048, 8)]
    for rows, cols, batch in shapes:
        g = torch.randn(batch, rows, cols, device=dev, dtype=torch.bfloat16)
        work = flops(rows, cols) * batch
        impls = {"torch_bmm_reimpl": lambda: ns_bmm(g)}
        if zp is not None:
            impls["torch_optim_muon_zeropower"] = lambda: [zp(g[i], (A, B, C), STEPS, EPS) for i in range(batch)]
        for name, fn in impls.items():
            s = median_seconds(fn, 2, reps)
            print(json.dumps({"bench": "ns5", "impl": name, "rows": rows, "cols": cols, "batch": batch, "seconds": s,
                              "tflops_plain_gemm_count": work / s / 1e12,
                              "ratio_vs_gemm_bf16": work / s / 1e12 / gemm}), flush=True)
        if zp is not None:  # the two torch paths compute the same function
            ref = zp(g[0], (A, B, C), STEPS, EPS).float()
            mine = ns_bmm(g[:1])[0].float()
            rel = ((ref - mine).norm() / ref.norm()).item()
            print(json.dumps({"bench": "ns5_check", "rows": rows, "cols": cols,
                              "rel_frobenius_torch_zeropower_vs_bmm_reimpl": rel}), flush=True)
        del g


if __name__ == "__main__":
    main()
