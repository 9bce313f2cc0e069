"""Optimizer step time of shardopt.torch.ShardedOptimizer against the Engine alone and against torch.

  PYTHONPATH=build/python $VENV/bin/python bench/python/adapter_bench.py --json [--repeat N] [--steps S]

For each model (the tests' nanoGPT-style GPT; a reduced Llama-style shape set) and one process, three
optimizers over the same tensors, Muon on the hidden matrices (the engine's routing) and AdamW on the rest:
  adapter: ShardedOptimizer.step() (gradients from a backward, so its hooks ran; backward not timed)
  engine:  the same Engine configuration driven directly: grad_ready(t) for every tensor (untimed), step(1.0)
  torch:   torch.optim.Muon.step() + torch.optim.AdamW(fused=True).step() on the same split
Each figure is the best over --repeat rounds of the mean of --steps steps; the three are interleaved
per round so machine load hits them alike. adapter_overhead_ratio = adapter / engine;
ratio_vs_torch_single = torch / adapter (> 1: the adapter is faster). Threads: torch.set_num_threads(1)
and OPENBLAS_NUM_THREADS=1 unless set (the engine steps on one thread, as the adapter configures it).
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

    def adapter_step():
        adapter.zero_grad()
        sum((p * g).sum() for (_, p), g in zip(a_params, grads)).backward()
        t0 = time.perf_counter()
        adapter.step()
        return time.perf_counter() - t0

    # engine alone: another optimizer's Engine, driven without the adapter (gradients written once).
    _, holder = sharded(shapes)
    engine = holder._engines[0]
    for t, g in enumerate(grads):
        engine.grad(t)[...] = g.numpy()

    def engine_step():
        for t in range(len(grads)):  # as the adapter's hooks do during its (untimed) backward
            engine.grad_ready(t)
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
    for _ in range(repeat):
        for k, fn in fns.items():
            best[k] = min(best[k], sum(fn() for _ in range(steps)) / steps)
    n_params = sum(p.numel() for _, p in t_params)
    return {"bench": "adapter_step", "model": model, "tensors": len(shapes), "matrices": len(matrix),
            "params": n_params, "threads": torch.get_num_threads(),
            "openblas_threads": int(os.environ["OPENBLAS_NUM_THREADS"]), "steps": steps, "repeat": repeat,
            "adapter_step_ms": best["adapter"] * 1e3, "engine_step_ms": best["engine"] * 1e3,
            "torch_step_ms": best["torch"] * 1e3,
            "adapter_overhead_ratio": best["adapter"] / best["engine"],
            "ratio_vs_torch_single": best["torch"] / best["adapter"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best round's mean is reported")
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--models", default="gpt,llama")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    models = {"gpt": gpt_shapes, "llama": llama_shapes}
    for m in a.models.split(","):
        r = bench_model(m, models[m](), a.steps, a.repeat)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{m}: {r['params']} params, {r['matrices']} Muon matrices: adapter {r['adapter_step_ms']:.3f} ms, "
                  f"engine {r['engine_step_ms']:.3f} ms (x{r['adapter_overhead_ratio']:.3f}), torch "
                  f"{r['torch_step_ms']:.3f} ms (torch/adapter {r['ratio_vs_torch_single']:.2f})", flush=True)


if __name__ == "__main__":
    main()
