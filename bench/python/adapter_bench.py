"""Optimizer step time of shardopt.torch.ShardedOptimizer against the Engine alone and against torch.

  PYTHONPATH=build/python $VENV/bin/python bench/python/adapter_bench.py --json [--repeat N] [--steps S]

For each model (the tests' nanoGPT-style GPT; a reduced Llama-style shape set), Muon on the hidden
matrices (the engine's routing) and AdamW on the rest, ZeRO stage 2 with sharded gradient memory:
one process:
  adapter: ShardedOptimizer.step() (gradients from a backward, so its hooks handed them to the engine;
           backward not timed)
  engine:  the same Engine configuration driven directly: the same backward on plain parameters, then
           accept_grad(t) for every tensor (untimed, what the adapter's hooks do), step(1.0) timed
  torch:   torch.optim.Muon.step() + torch.optim.AdamW(fused=True).step() on the same split
two processes (gloo, one thread each; --ranks2 0 skips them):
  adapter_2rank: ShardedOptimizer.step() at 2 ranks (each rank's backward untimed; the step includes
                 waiting for the gradient reduce-scatters backward started)
  torch_2rank:   the hidden matrices owned round-robin, each rank's torch.optim.Muon.step() over its own
                 then every matrix broadcast from its owner, + ZeroRedundancyOptimizer(AdamW) over the
                 rest (bench/peers/torch_peers.py's torch_step_dist; no gradient reduction timed)
  Times at 2 ranks are the max over ranks of each timed step.
Each figure is the fastest of --repeat x --steps timed steps, the optimizers interleaved step by step
so machine load hits them alike (on a shared machine single steps are slowed at random; the fastest
is the least disturbed). adapter_overhead_ratio = adapter / engine;
adapter_outside_engine_us = the fastest step's adapter wall time minus the
engine's own time of that step (the Python layer's cost); ratio_vs_torch_single = torch / adapter and
ratio_vs_torch_2rank = torch_2rank / adapter_2rank (> 1:
the adapter is faster). Threads: torch.set_num_threads(1) and OPENBLAS_NUM_THREADS=1 unless set (the
engine steps on one thread, as the adapter configures it).
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "python"))

import torch  # noqa: E402

from shardopt.torch import ShardedOptimizer  # noqa: E402

LR, MATRIX_LR = 3e-4, 0.02


def gpt_shapes():
    from gpt_model import GPT
    return [(n, tuple(p.shape)) for n, p in GPT().named_parameters()]


def llama_shapes(d=256, ffn=688, layers=4, vocab=4096):
    """Llama-style: token embedding, per layer q/k/v/o, gate/up/down and two RMSNorm weights, final norm, head."""
    s = [("embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"layers.{i}."
        s += [(p + f"attn.{w}.weight", (d, d)) for w in ("q_proj", "k_proj", "v_proj", "o_proj")]
        s += [(p + "mlp.gate_proj.weight", (ffn, d)), (p + "mlp.up_proj.weight", (ffn, d)),
              (p + "mlp.down_proj.weight", (d, ffn))]
        s += [(p + "input_norm.weight", (d,)), (p + "post_attention_norm.weight", (d,))]
    return s + [("norm.weight", (d,)), ("lm_head.weight", (vocab, d))]


def make_params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(*s, generator=g) * 0.02)) for n, s in shapes]


def make_grads(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * 1e-2 for _, s in shapes]


def sharded(shapes):
    params = make_params(shapes)
    opt = ShardedOptimizer(params, matrix="muon", elementwise="adamw", lr=LR, matrix_lr=MATRIX_LR)
    return params, opt


def bench_model(model, shapes, steps, repeat):
    grads = make_grads(shapes)
    # adapter: gradients arrive by backward (hooks fire as in training), step() timed.
    a_params, adapter = sharded(shapes)

    outside_engine = []

    def adapter_step():
        adapter.zero_grad()
        sum((p * g).sum() for (_, p), g in zip(a_params, grads)).backward()
        t0 = time.perf_counter()
        adapter.step()
        seconds = time.perf_counter() - t0
        outside_engine.append(seconds - adapter.last_step_reports[0]["seconds"])
        return seconds

    # engine alone: another optimizer's Engine, driven without the adapter: the same (untimed)
    # backward on plain parameters, whose gradients are then handed over as a hand-written trainer
    # would, so both steps start from the same cache state.
    _, holder = sharded(shapes)
    engine = holder._engines[0]
    e_params = make_params(shapes)

    def engine_step():
        sum((p * g).sum() for (_, p), g in zip(e_params, grads)).backward()
        for t, (_, p) in enumerate(e_params):
            engine.accept_grad(t, p.grad.view(-1))
            p.grad = None
        t0 = time.perf_counter()
        engine.step(1.0)
        return time.perf_counter() - t0

    # torch in one process, the same split.
    matrix = set(adapter.matrix_parameter_names)
    t_params = make_params(shapes)
    for (_, p), g in zip(t_params, grads):
        p.grad = g.clone()
    muon = torch.optim.Muon([p for n, p in t_params if n in matrix], lr=MATRIX_LR, weight_decay=0.1,
                            momentum=0.95, nesterov=True)
    adamw = torch.optim.AdamW([p for n, p in t_params if n not in matrix], lr=LR, weight_decay=0.01, fused=True)

    def torch_step():
        t0 = time.perf_counter()
        muon.step()
        adamw.step()
        return time.perf_counter() - t0

    fns = {"adapter": adapter_step, "engine": engine_step, "torch": torch_step}
    for fn in fns.values():  # warm-up: state allocation, first-touch
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat * steps):
        for k, fn in fns.items():
            best[k] = min(best[k], fn())
    n_params = sum(p.numel() for _, p in t_params)
    return {"bench": "adapter_step", "model": model, "tensors": len(shapes), "matrices": len(matrix),
            "params": n_params, "threads": torch.get_num_threads(),
            "openblas_threads": int(os.environ["OPENBLAS_NUM_THREADS"]), "steps": steps, "repeat": repeat,
            "adapter_step_ms": best["adapter"] * 1e3, "engine_step_ms": best["engine"] * 1e3,
            "torch_step_ms": best["torch"] * 1e3,
            "adapter_overhead_ratio": best["adapter"] / best["engine"],
            # step() wall time minus the engine's own step time: what the Python layer adds per step
            "adapter_outside_engine_us": min(outside_engine) * 1e6,
            "ratio_vs_torch_single": best["torch"] / best["adapter"]}


def two_rank_worker(rank, port, model, steps, repeat, results):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shapes = MODELS[model]()
    grads = make_grads(shapes)
    a_params, adapter = sharded(shapes)  # its own gloo group (default_communicator)
    matrix = set(adapter.matrix_parameter_names)

    def adapter_step():
        adapter.zero_grad()
        sum((p * g).sum() for (_, p), g in zip(a_params, grads)).backward()
        dist.barrier()
        t0 = time.perf_counter()
        adapter.step()
        return time.perf_counter() - t0

    t_params = make_params(shapes)
    for (_, p), g in zip(t_params, grads):
        p.grad = g.clone()
    hidden = [p for n, p in t_params if n in matrix]
    muon = torch.optim.Muon([p for i, p in enumerate(hidden) if i % 2 == rank], lr=MATRIX_LR, weight_decay=0.1,
                            momentum=0.95, nesterov=True)
    zero = ZeroRedundancyOptimizer([p for n, p in t_params if n not in matrix], optimizer_class=torch.optim.AdamW,
                                   lr=LR, weight_decay=0.01)

    def torch_step():
        dist.barrier()
        t0 = time.perf_counter()
        muon.step()
        for i, p in enumerate(hidden):  # owners send their updated matrices
            dist.broadcast(p.data, src=i % 2)
        zero.step()  # AdamW on this rank's shard, then the shards broadcast
        return time.perf_counter() - t0

    def max_over_ranks(seconds):
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    fns = {"adapter": adapter_step, "torch": torch_step}
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat * steps):
        for k, fn in fns.items():
            best[k] = min(best[k], max_over_ranks(fn()))
    if rank == 0:
        results.put(best)
    dist.destroy_process_group()


def bench_two_ranks(model, steps, repeat):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=two_rank_worker, args=(r, port, model, steps, repeat, results)) for r in range(2)]
    for p in procs:
        p.start()
    best = results.get()
    for p in procs:
        p.join()
    return {"adapter_2rank_step_ms": best["adapter"] * 1e3, "torch_2rank_step_ms": best["torch"] * 1e3,
            "ratio_vs_torch_2rank": best["torch"] / best["adapter"]}


MODELS = {"gpt": gpt_shapes, "llama": llama_shapes}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (each --steps steps of every optimizer)")
    ap.add_argument("--steps", type=int, default=5, help="steps per round; the fastest step is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--models", default="gpt,llama")
    ap.add_argument("--ranks2", type=int, default=1, help="1: also the 2-rank rows (gloo, spawned processes)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for m in a.models.split(","):
        r = bench_model(m, MODELS[m](), a.steps, a.repeat)
        if a.ranks2:
            r.update(bench_two_ranks(m, a.steps, a.repeat))
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{m}: {r['params']} params, {r['matrices']} Muon matrices: adapter {r['adapter_step_ms']:.3f} ms, "
                  f"engine {r['engine_step_ms']:.3f} ms (x{r['adapter_overhead_ratio']:.3f}), torch "
                  f"{r['torch_step_ms']:.3f} ms (torch/adapter {r['ratio_vs_torch_single']:.2f})", flush=True)
            if a.ranks2:
                print(f"{m} at 2 ranks: adapter {r['adapter_2rank_step_ms']:.3f} ms, torch round-robin Muon + "
                      f"ZeroRedundancyOptimizer {r['torch_2rank_step_ms']:.3f} ms (torch/adapter "
                      f"{r['ratio_vs_torch_2rank']:.2f})", flush=True)


if __name__ == "__main__":
    main()
