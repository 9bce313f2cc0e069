"""ShardedOptimizer on CUDA parameters: the engine's buffers on the GPU (memory_space "cuda").

On a machine with a GPU and a build with the CUDA toolkit: the same model trained with CUDA tensors
and with CPU tensors, and the CUDA engine against the CPU engine on identical gradients. Without a
GPU those tests skip with a message; the construction errors run everywhere.

Tolerances:
  * Identical gradients, AdamW: both engines evaluate the same fp32 formula in another order, a few
    ulps per step: 4 * steps * eps * max|p| (as against torch.optim.AdamW in test_torch_optimizer).
  * Identical gradients, Muon: the device orthogonalizes in bf16, the host in fp32:
    test_torch_optimizer.muon_tolerance_bf16 (the measured bf16-vs-fp32 Newton-Schulz difference on
    the model's shapes, lr * shape scale per step).
  * Training (gradients from each device's own forward/backward, TF32 off): the gradients differ by
    the fp32 reduction order of the two devices' kernels (relative 1e-6 per step), which AdamW's
    normalized step passes on almost unchanged: losses within 1e-4 relative, parameters within
    1e-4 * max|p| after the run. A gradient read before its kernels finished, or a stream not waited
    for, breaks both by orders of magnitude.
"""
import math

import pytest
import torch

from gpt_model import GPT, batch
from shardopt import _C
from shardopt.torch import ShardedOptimizer

FP32_EPS = torch.finfo(torch.float32).eps
HAVE_GPU = torch.cuda.is_available() and getattr(_C, "has_cuda", False)
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device or a build without CUDA: GPU test skipped")
STEPS = 12


def engine(memory_space, comm=None):
    return _C.Engine(comm or _C.thread_world_of_one(), [("w", [8, 4], "")], stage=2, layout="owned",
                     bucket_bytes=1 << 20, matrix_optimizer="", elementwise_optimizer="kind: OPTIMIZER_ADAMW lr: 0.001",
                     routing="", max_grad_norm=0.0, overlap=True, memory_space=memory_space)


def test_unknown_memory_space_is_named():
    with pytest.raises(ValueError, match="memory space must be host"):
        engine("tpu")


def test_parameter_neither_on_the_cpu_nor_on_a_gpu_is_named():
    odd = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="'odd' is on meta"):
        ShardedOptimizer([("w", GPT().lm_head.weight), ("odd", odd)], matrix=None)


@pytest.mark.skipif(HAVE_GPU or not getattr(_C, "has_cuda", False),
                    reason="needs a CUDA build on a machine without a GPU")
def test_cuda_engine_without_a_device_is_a_clear_error():
    with pytest.raises(_C.Error, match="no CUDA device"):
        engine("cuda")
    with pytest.raises(_C.Error, match="CUDA"):
        _C.cuda_thread_world_of_one(0)


@needs_gpu
def test_cuda_engine_refuses_a_host_communicator():
    with pytest.raises(ValueError, match="communicator"):
        engine("cuda", _C.thread_world_of_one())


class LateGradients(torch.autograd.Function):
    """Identity whose backward first keeps the GPU busy ~20 ms: every gradient of the model lands
    after it in stream order, so the host reaches the optimizer's hooks (and the buckets' launches)
    while the kernels writing the gradients are still queued. An engine that read a gradient without
    waiting for torch's stream would reduce stale or zero values."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        torch.cuda._sleep(40_000_000)  # clock cycles: ~20 ms at 2 GHz
        return g


def train(device, steps=STEPS, side_stream=False, late=False, **kw):
    """Losses and the final model of `steps` steps of GPT on `device`."""
    model = GPT().to(device)
    opt = ShardedOptimizer(model.named_parameters(), lr=3e-3, **kw)
    stream = torch.cuda.Stream(device) if side_stream else None

    def forward_backward(x, y):
        loss = model(x, y)
        (LateGradients.apply(loss) if late else loss).backward()
        opt.step()
        opt.zero_grad()
        return loss

    losses = []
    for step in range(steps):
        x, y = (t.to(device) for t in batch(step))
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # backward on a side stream: the engine must follow it
                loss = forward_backward(x, y)
        else:
            loss = forward_backward(x, y)
        losses.append(loss.item())
    return losses, model, opt


def max_abs_diff(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return max((pa[k].detach().cpu() - pb[k].detach().cpu()).abs().max().item() for k in pa)


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@needs_gpu
@pytest.mark.parametrize("grad_memory", ["sharded", "full"])
@pytest.mark.parametrize("side_stream,late", [(False, False), (True, False), (False, True), (True, True)])
def test_cuda_training_follows_cpu_training(no_tf32, grad_memory, side_stream, late):
    l_gpu, m_gpu, opt = train("cuda", matrix=None, grad_memory=grad_memory, side_stream=side_stream, late=late)
    l_cpu, m_cpu, _ = train("cpu", matrix=None, grad_memory=grad_memory)
    assert all(p.device.type == "cuda" for p in m_gpu.parameters())
    assert opt.memory()[0]["param_bytes"] > 0
    assert l_gpu == pytest.approx(l_cpu, rel=1e-4)
    scale = max(p.abs().max().item() for p in m_cpu.parameters())
    assert max_abs_diff(m_gpu, m_cpu) <= 1e-4 * scale
    assert l_cpu[-1] < l_cpu[0] - 0.1  # it trains


def step_on_fixed_gradients(device, steps, **kw):
    """A model stepped `steps` times on the same hand-assigned gradients on either device."""
    model = GPT().to(device)
    opt = ShardedOptimizer(model.named_parameters(), lr=3e-3, matrix_lr=0.02, **kw)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(device)
        opt.step()
    return model, opt


@needs_gpu
def test_cuda_engine_equals_cpu_engine_on_identical_gradients():
    from test_torch_optimizer import max_shape_scale, muon_tolerance_bf16
    steps = 5
    gpu, _ = step_on_fixed_gradients("cuda", steps, matrix=None)
    cpu, _ = step_on_fixed_gradients("cpu", steps, matrix=None)
    scale = max(p.abs().max().item() for p in cpu.parameters())
    assert max_abs_diff(gpu, cpu) <= 4 * steps * FP32_EPS * scale
    gpu, opt = step_on_fixed_gradients("cuda", steps, matrix="muon")
    cpu, _ = step_on_fixed_gradients("cpu", steps, matrix="muon")
    assert opt.matrix_parameter_names
    bound = muon_tolerance_bf16(cpu) * steps / 20  # muon_tolerance_bf16 is for its 20 steps
    assert max_abs_diff(gpu, cpu) <= bound, (max_abs_diff(gpu, cpu), bound, max_shape_scale(cpu))
    assert max_abs_diff(gpu, GPT()) > 1e-3  # it moved


@needs_gpu
def test_cuda_state_dict_round_trip_continues_exactly():
    ref, ref_opt = step_on_fixed_gradients("cuda", 4, matrix="muon")
    first, first_opt = step_on_fixed_gradients("cuda", 2, matrix="muon")
    sd = first_opt.state_dict()
    assert all(t.device.type == "cpu" for s in sd["state"].values() for t in s.values())
    model = GPT().to("cuda")
    model.load_state_dict(first.state_dict())
    opt = ShardedOptimizer(model.named_parameters(), lr=3e-3, matrix="muon", matrix_lr=0.02)
    opt.load_state_dict(sd)
    g = torch.Generator().manual_seed(7)
    for _ in range(2):  # the gradients of steps 1-2, then those of 3-4
        for p in model.parameters():
            torch.randn(p.shape, generator=g)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to("cuda")
        opt.step()
    assert max_abs_diff(model, ref) == 0.0
