"""A GPT-style character model on data/tinyshakespeare.txt, trained with torch autograd and shardopt's
ShardedOptimizer (ZeRO stage 2, Muon for hidden matrices, AdamW for the rest).

  python examples/train_gpt_torch.py --steps 200                 # one process
  torchrun --nproc-per-node 2 examples/train_gpt_torch.py        # 2 ranks (gloo), batch split by rank
  mpirun -np 2 python examples/train_gpt_torch.py                # 2 ranks over MPI

Needs the shardopt package: `pip install --no-build-isolation .` in the project venv, or
PYTHONPATH=build/python after scripts/build.
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from shardopt.torch import ShardedOptimizer


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.fc_out = nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, context, width, heads, layers):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "data", "tinyshakespeare.txt"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences), split across ranks")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    ap.add_argument("--matrix-lr", type=float, default=0.02, help="Muon learning rate")
    ap.add_argument("--matrix", default="muon", help="muon, normuon or none")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--layout", default="owned")
    ap.add_argument("--grad-memory", default="sharded", help="sharded (ZeRO-2) or full (local accumulation)")
    ap.add_argument("--save", help="checkpoint root written at the end (shardopt's resharding format)")
    a = ap.parse_args()

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    text = open(a.data, "rb").read()
    data = torch.tensor(list(text), dtype=torch.long)
    model = GPT(256, a.context, a.width, a.heads, a.layers)

    # The change from a plain torch trainer: this line instead of torch.optim.AdamW(...).
    opt = ShardedOptimizer(model.named_parameters(), matrix=None if a.matrix == "none" else a.matrix,
                           elementwise="adamw", lr=a.lr, matrix_lr=a.matrix_lr, stage=a.stage, layout=a.layout,
                           grad_memory=a.grad_memory)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    rank, world = opt.rank, opt.world_size
    if a.batch % world:
        raise SystemExit(f"--batch {a.batch} must be divisible by the world size {world}")
    per_rank = a.batch // world
    gen = torch.Generator().manual_seed(1234)  # the same global batches on every rank
    start = time.time()
    for step in range(a.steps):
        starts = torch.randint(0, len(data) - a.context - 1, (a.batch,), generator=gen)[rank * per_rank:(rank + 1) * per_rank]
        x = torch.stack([data[s:s + a.context] for s in starts])
        y = torch.stack([data[s + 1:s + a.context + 1] for s in starts])
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if rank == 0 and (step % 10 == 0 or step == a.steps - 1):
            report = opt.last_step_reports[0]
            print(f"step {step:4d}  loss {loss.item():.4f}  grad_norm {report['grad_norm']:.3f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - start:.1f}s", flush=True)
    if a.save:
        dirs = opt.save(a.save)
        if rank == 0:
            print("saved", *dirs)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
