"""Gradient memory per rank that each mode should hold, from the plan's buckets alone (the formulas of
runtime/engine.h, as tests/runtime/engine_test.cc checks them for the C++ Engine):
  full buffers (grad_memory="full", stage 1): every bucket in full (padding included; dim0 adds the
    per-tensor buffers .grad views) + the reduced fp32 shard;
  sharded (ZeRO-2): the shard + 2 pooled bucket buffers of the largest bucket (dim0 adds each slot's
    tensor-major copy; accumulation adds a segment-sized reduce-scatter output per slot).
"""


def expected_grad_memory(buckets, numels, sharded, dim0, accumulation):
    """buckets: engine.buckets() (numel, my segment, tensors); numels: per tensor. Returns
    (grad_buffer_bytes, grad_shard_bytes, grad_slots)."""
    shard = sum(seg for _, seg, _ in buckets)
    if not sharded:
        return 4 * (sum(n for n, _, _ in buckets) + (sum(numels) if dim0 else 0)), 4 * shard, 0
    slot = max(n for n, _, _ in buckets)
    if dim0:
        slot += max(sum(numels[t] for t in tensors) for _, _, tensors in buckets)
    if accumulation > 1:
        slot += max(seg for _, seg, _ in buckets)
    return 4 * 2 * slot, 4 * shard, 2


def check_grad_memory(report, buckets, numels, sharded, dim0, accumulation, what=""):
    buffer, shard, slots = expected_grad_memory(buckets, numels, sharded, dim0, accumulation)
    assert report["grad_buffer_bytes"] == buffer, (what, report, buffer)
    assert report["grad_shard_bytes"] == shard, (what, report, shard)
    assert report["grad_slots"] == slots, (what, report, slots)
