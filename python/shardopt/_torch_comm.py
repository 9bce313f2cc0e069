"""The engine's collectives carried out by torch.distributed.

The engine (C++) issues every collective of its step (bucket reduce-scatters during backward, the
norm all-reduce, dim0 all-to-alls, parameter all-gathers) on a Communicator. Inside torchrun that
Communicator is shardopt._C.python_communicator(TorchDistributedCollectives(group)): the C++ side
re-acquires the GIL and calls the methods below with numpy views of the engine's buffers; each
returns a handle whose wait() completes the operation. Keeping the schedule in the engine (rather
than re-implementing it in Python) means the torchrun path runs exactly the step the MPI and
threads backends run, overlap included.

gloo (CPU tensors) has no uneven all-gather and no reduce-scatter, so:
  reduce_scatter = all_reduce of a copy, then this rank's segment (2x the logical traffic);
  all_gather     = all_gather of segments padded to the largest, then compacted.
The copies happen at issue time (inputs) and at wait() (outputs), so callers' buffers follow the
Communicator contract (untouched until wait, send may alias recv).
"""
from __future__ import annotations

import datetime

import numpy as np
import torch
import torch.distributed as dist

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(array)
    if dtype == "bf16":
        return t.view(torch.bfloat16)
    if dtype == "f16":
        return t.view(torch.float16)
    return t


def _divide(t: torch.Tensor, n: int) -> None:
    if t.is_floating_point():
        t.div_(n)
    else:
        t.copy_(torch.div(t, n, rounding_mode="trunc"))


class _Pending:
    """Torch work handles plus what to do with the data once they completed."""

    def __init__(self, works, finish=None):
        self._works = [w for w in works if w is not None]
        self._finish = finish
        self._finished = False

    def wait(self, timeout_ms: int) -> None:
        if self._finished:
            return
        for w in self._works:
            w.wait(datetime.timedelta(milliseconds=timeout_ms))
        self._finished = True
        if self._finish is not None:
            self._finish()

    def is_completed(self) -> bool:
        return self._finished or all(w.is_completed() for w in self._works)


class TorchDistributedCollectives:
    """The collectives of shardopt's Communicator on one torch.distributed process group."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._global = [dist.get_global_rank(group, r) for r in range(self.size)]

    def all_reduce(self, send, recv, dtype, op):
        s, r = _tensor(send, dtype), _tensor(recv, dtype)
        if s.data_ptr() != r.data_ptr():
            r.copy_(s)
        work = dist.all_reduce(r, _REDUCE_OPS[op], group=self.group, async_op=True)
        return _Pending([work], (lambda: _divide(r, self.size)) if op == "avg" else None)

    def reduce_scatter(self, send, recv, counts, dtype, op):
        full = _tensor(send, dtype).clone()
        r = _tensor(recv, dtype)
        offset = sum(counts[: self.rank])
        work = dist.all_reduce(full, _REDUCE_OPS[op], group=self.group, async_op=True)

        def finish():
            r.copy_(full[offset : offset + counts[self.rank]])
            if op == "avg":
                _divide(r, self.size)

        return _Pending([work], finish)

    def all_gather(self, send, recv, counts, dtype):
        s, r = _tensor(send, dtype), _tensor(recv, dtype)
        largest = max(counts)
        own = torch.zeros(largest, dtype=s.dtype)
        own[: counts[self.rank]].copy_(s)
        pieces = [torch.empty(largest, dtype=s.dtype) for _ in range(self.size)]
        work = dist.all_gather(pieces, own, group=self.group, async_op=True)

        def finish():
            offset = 0
            for piece, n in zip(pieces, counts):
                r[offset : offset + n].copy_(piece[:n])
                offset += n

        return _Pending([work], finish)

    def reduce(self, send, recv, dtype, op, root):
        full = _tensor(send, dtype).clone()
        r = _tensor(recv, dtype)
        work = dist.all_reduce(full, _REDUCE_OPS[op], group=self.group, async_op=True)

        def finish():
            if self.rank == root:
                r.copy_(full)
                if op == "avg":
                    _divide(r, self.size)

        return _Pending([work], finish)

    def broadcast(self, buf, dtype, root):
        work = dist.broadcast(_tensor(buf, dtype), src=self._global[root], group=self.group, async_op=True)
        return _Pending([work])

    def all_to_all(self, send, send_counts, recv, recv_counts, dtype):
        work = dist.all_to_all_single(_tensor(recv, dtype), _tensor(send, dtype), output_split_sizes=list(recv_counts),
                                      input_split_sizes=list(send_counts), group=self.group, async_op=True)
        return _Pending([work])

    def send(self, buf, dtype, peer, tag):
        return _Pending([dist.isend(_tensor(buf, dtype), dst=self._global[peer], group=self.group, tag=tag)])

    def recv(self, buf, dtype, peer, tag):
        return _Pending([dist.irecv(_tensor(buf, dtype), src=self._global[peer], group=self.group, tag=tag)])

    def sendrecv(self, send, dst, recv, src, dtype, tag):
        works = []
        if dst >= 0:
            works.append(dist.isend(_tensor(send, dtype), dst=self._global[dst], group=self.group, tag=tag))
        if src >= 0:
            works.append(dist.irecv(_tensor(recv, dtype), src=self._global[src], group=self.group, tag=tag))
        return _Pending(works)

    def barrier(self):
        return _Pending([dist.barrier(group=self.group, async_op=True)])

    def abort(self, reason):
        # torch.distributed has no per-group abort on gloo; the error reaches this rank's caller.
        pass
