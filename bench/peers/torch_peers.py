#!/usr/bin/env python3
"""torch peers of bench/peers/peers_bench: one JSON object per line on stdout.

Rows (each the best of --reps timed repetitions after one warm-up, on torch.set_num_threads(T)):
  torch_muon         torch.optim.Muon.step over the Llama-style hidden matrices (bf16 Newton-Schulz)
  torch_muon_f32     the same step with torch's NS5 in fp32 (its algorithm, without the bf16 cast)
  torch_adamw_fused  torch.optim.AdamW(fused=True).step over `--elements` fp32 parameters
  torch_muon_dist    with --dist-ranks N: N processes (gloo, 1 thread each), the hidden matrices owned
                     round-robin: each rank's torch.optim.Muon.step over its own (dtype bf16), or the
                     same step with the fp32 NS5 above (dtype f32, with --dist-dtypes bf16,f32), then
                     every matrix broadcast from its owner (max over ranks)
  torch_step_dist    the same plus ZeroRedundancyOptimizer(AdamW) over the other tensors (embedding,
                     norms, head): the whole optimizer step of N ranks (max over ranks). Gradients are
                     taken as already averaged: no gradient reduction is timed. Both N-rank figures
                     come from the same --reps whole steps (the Muon phase timed inside each).
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


def dist_rank(rank, world, port, d, ffn, vocab, layers, reps, dtypes, results):
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)

    def param(*shape):
        p = torch.nn.Parameter(torch.randn(*shape, generator=gen) * 0.02)
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        return p

    hidden = [param(*s) for s in hidden_shapes(d, ffn, layers)]
    others = [param(vocab, d)] + [param(d) for _ in range(2 * layers + 1)] + [param(vocab, d)]
    owned = [p for i, p in enumerate(hidden) if i % world == rank]
    muon = torch.optim.Muon(owned, lr=1e-3)
    bufs = [torch.zeros_like(p) for p in owned]
    zero = ZeroRedundancyOptimizer(others, optimizer_class=torch.optim.AdamW, lr=1e-4)

    for dtype in dtypes:
        def muon_phase():
            if dtype == "bf16":
                muon.step()
            else:
                muon_f32_step(owned, bufs)
            for i, p in enumerate(hidden):  # owners send their updated matrices
                dist.broadcast(p.data, src=i % world)

        # One set of whole steps gives both figures: the Muon phase (ends with the owners'
        # broadcasts, which synchronize the ranks) and the whole step (then
        # ZeroRedundancyOptimizer(AdamW): AdamW on this rank's shard, the shards broadcast). Each the
        # best over reps of the max over ranks.
        muon_phase()  # warm-up: momentum buffers, gloo connections
        zero.step()
        muon_s = step_s = float("inf")
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            muon_phase()
            t1 = time.perf_counter()
            zero.step()
            t = torch.tensor([t1 - t0, time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            muon_s, step_s = min(muon_s, t[0].item()), min(step_s, t[1].item())
        if rank == 0:
            results.put((dtype, muon_s, step_s, len(hidden), sum(p.numel() for p in hidden + others)))
    dist.destroy_process_group()


def run_dist(a):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    dtypes = [x for x in a.dist_dtypes.split(",") if x]
    procs = [ctx.Process(target=dist_rank, args=(r, a.dist_ranks, port, a.d_model, a.ffn, a.vocab, a.layers,
                                                 a.reps, dtypes, results)) for r in range(a.dist_ranks)]
    for p in procs:
        p.start()
    for _ in dtypes:
        dtype, muon_s, step_s, matrices, elements = results.get()
        common = {"ranks": a.dist_ranks, "threads": 1, "dtype": dtype, "grad_dtype": "f32", "matrices": matrices}
        print(json.dumps({"peer": "torch_muon_dist", **common, "seconds": muon_s}), flush=True)
        print(json.dumps({"peer": "torch_step_dist", **common, "elements": elements, "seconds": step_s}), flush=True)
    for p in procs:
        p.join()


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
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dist-ranks", type=int, default=0, help="also the N-rank rows (gloo, 1 thread each)")
    ap.add_argument("--dist-dtypes", default="bf16", help="NS precisions of the N-rank rows (bf16, f32)")
    a = ap.parse_args()
    try:
        import torch
    except ImportError as e:  # the caller prints the skip message
        print(json.dumps({"peer": "torch", "error": f"torch not importable: {e}"}))
        return 0

    if a.dist_ranks > 0:
        run_dist(a)
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
