"""ShardedOptimizer in one process against torch's own optimizers and a torch-semantics Muon."""
import copy
import math

import pytest
import torch

from gpt_model import GPT, batch
from memory_formula import check_grad_memory
from shardopt.torch import ShardedOptimizer

STEPS = 20
FP32_EPS = torch.finfo(torch.float32).eps
NS = (3.4445, -4.7750, 2.0315)


def run(model, opts, steps=STEPS, schedulers=()):
    losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
        for o in opts:
            o.zero_grad()
        for s in schedulers:
            s.step()
        losses.append(loss.item())
    return losses


def max_abs_diff(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return max((pa[k] - pb[k]).abs().max().item() for k in pa)


@pytest.mark.parametrize("grad_memory", ["sharded", "full"])
def test_adamw_equals_torch_adamw(grad_memory):
    ours, ref = GPT(), GPT()
    opt = ShardedOptimizer(ours.named_parameters(), matrix=None, elementwise="adamw", lr=3e-3, weight_decay=0.05,
                           grad_memory=grad_memory)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.05)
    assert opt.matrix_parameter_names == []
    l_ours, l_ref = run(ours, [opt]), run(ref, [torch_opt])
    # Same formula in fp32; only the order of rounding differs: a few ulps per step on values of
    # order 1, compounded over STEPS (the loss responds smoothly to parameters this small).
    scale = max(p.abs().max().item() for p in ref.parameters())
    assert max_abs_diff(ours, ref) <= 4 * STEPS * FP32_EPS * scale
    assert l_ours == pytest.approx(l_ref, rel=1e-5)
    assert l_ref[-1] < l_ref[0] - 0.1  # it trains, so equality is not trivial
    # state_dict names follow torch.optim.AdamW's.
    sd, tsd = opt.state_dict(), torch_opt.state_dict()
    names = [n for n, _ in ref.named_parameters()]
    for i, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sd["state"][name][key], tsd["state"][i][key], rtol=1e-4, atol=1e-7)
        assert sd["state"][name]["step"].item() == tsd["state"][i]["step"].item() == STEPS


def newton_schulz(update, dtype=torch.float32, ns_steps=5, eps=1e-7):
    """torch.optim.Muon's orthogonalization, computed in `dtype` (torch itself uses bf16)."""
    x = update.to(dtype)
    x = x.T if update.shape[0] > update.shape[1] else x
    x = x / x.norm().clamp(min=eps)
    a, b, c = NS
    for _ in range(ns_steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    x = x.T if update.shape[0] > update.shape[1] else x
    return x.float()


def muon_fp32_step(p, grad, buf, lr, wd, mu):
    """torch.optim.Muon's update (Nesterov, 'original' shape scale), entirely in fp32."""
    buf.lerp_(grad, 1 - mu)
    x = newton_schulz(grad.lerp(buf, mu))
    p.mul_(1 - lr * wd)
    p.add_(x, alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))


class MuonFp32:
    def __init__(self, params, lr, weight_decay, momentum):
        self.params, self.lr, self.wd, self.mu = list(params), lr, weight_decay, momentum
        self.bufs = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        for p, buf in zip(self.params, self.bufs):
            muon_fp32_step(p, p.grad, buf, self.lr, self.wd, self.mu)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def split(model, matrix_names):
    named = dict(model.named_parameters())
    return [named[n] for n in matrix_names], [p for n, p in named.items() if n not in matrix_names]


def muon_setup(reference):
    ours, ref = GPT(), GPT()
    opt = ShardedOptimizer(ours.named_parameters(), matrix="muon", elementwise="adamw", lr=3e-3, matrix_lr=0.02,
                           matrix_weight_decay=0.1, weight_decay=0.01)
    matrices = opt.matrix_parameter_names
    # The engine's routing: every hidden 2-D weight, not the embeddings or the head.
    assert sorted(matrices) == sorted(n for n, p in ref.named_parameters()
                                      if p.ndim == 2 and n.startswith("blocks."))
    mats, rest = split(ref, matrices)
    return ours, ref, opt, reference(mats), torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.01)


def max_shape_scale(model):
    return max(math.sqrt(max(1.0, p.shape[0] / p.shape[1])) for p in model.parameters() if p.ndim == 2)


def muon_tolerance_fp32(model):
    # Per step the orthogonalized update O (entries <= 1) differs by the Newton-Schulz rounding
    # error: fp32 eps per operation, amplified by at most |p'(0)| = a = 3.4445 per iteration
    # (5 iterations) and summed over sqrt(n) terms of each product; the step applies lr*s*O.
    n = max(max(p.shape) for p in model.parameters() if p.ndim == 2)
    return STEPS * 0.02 * max_shape_scale(model) * NS[0] ** 5 * FP32_EPS * math.sqrt(n)


def muon_tolerance_bf16(model):
    # torch.optim.Muon orthogonalizes in bf16: its error on one update is measured here, as the
    # largest difference between bf16 and fp32 Newton-Schulz on Gaussian matrices of the model's
    # matrix shapes; at most that much per step, lr*s times, over STEPS steps.
    g = torch.Generator().manual_seed(0)
    err = max((newton_schulz(G, torch.bfloat16) - newton_schulz(G)).abs().max().item()
              for G in (torch.randn(p.shape, generator=g) for p in model.parameters() if p.ndim == 2))
    return STEPS * 0.02 * max_shape_scale(model) * err


def test_muon_equals_fp32_torch_semantics_muon():
    ours, ref, opt, muon_ref, adamw_ref = muon_setup(lambda ps: MuonFp32(ps, lr=0.02, weight_decay=0.1, momentum=0.95))
    l_ours, l_ref = run(ours, [opt]), run(ref, [muon_ref, adamw_ref])
    tol = muon_tolerance_fp32(ref)
    diff = max_abs_diff(ours, ref)
    assert diff <= tol, (diff, tol)
    assert l_ours == pytest.approx(l_ref, rel=1e-4)


def test_muon_within_bf16_error_of_torch_optim_muon():
    ours, ref, opt, muon_ref, adamw_ref = muon_setup(
        lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True))
    run(ours, [opt]), run(ref, [muon_ref, adamw_ref])
    diff = max_abs_diff(ours, ref)
    assert diff <= muon_tolerance_bf16(ref), (diff, muon_tolerance_bf16(ref))
    # ...and the difference is the bf16 one: above the fp32 bound (torch runs Newton-Schulz in bf16).
    assert diff > muon_tolerance_fp32(ref)


def test_lr_scheduler_drives_the_step():
    def schedule(step):
        return 1.0 if step < 5 else 0.1

    ours, ref, plain = GPT(), GPT(), GPT()
    opt = ShardedOptimizer(ours.named_parameters(), matrix=None, lr=3e-3)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    opt_plain = ShardedOptimizer(plain.named_parameters(), matrix=None, lr=3e-3)
    run(ours, [opt], 10, [torch.optim.lr_scheduler.LambdaLR(opt, schedule)])
    run(ref, [torch_opt], 10, [torch.optim.lr_scheduler.LambdaLR(torch_opt, schedule)])
    run(plain, [opt_plain], 10)
    assert max_abs_diff(ours, ref) <= 40 * FP32_EPS
    assert max_abs_diff(ours, plain) > 1e-3  # the schedule changed what was applied


def test_scheduler_scales_the_matrix_lr_with_lr():
    # A schedule that changes lr every step: Muon's rate follows it (the step applied it: the
    # parameters differ from the same run at constant lr).
    ours, plain = GPT(), GPT()
    opt = ShardedOptimizer(ours.named_parameters(), matrix="muon", lr=3e-3, matrix_lr=0.02)
    opt_plain = ShardedOptimizer(plain.named_parameters(), matrix="muon", lr=3e-3, matrix_lr=0.02)
    run(ours, [opt], 5, [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))])
    run(plain, [opt_plain], 5)
    assert opt.param_groups[0]["matrix_lr"] == pytest.approx(0.02 / 5)  # applied at the last step (s=4)
    assert max_abs_diff(ours, plain) > 1e-3
    opt.param_groups[0]["matrix_lr"] = 0.5
    with pytest.raises(ValueError, match="matrix_lr cannot be set on its own"):
        opt.step()


def test_param_groups_have_their_own_lr_and_weight_decay():
    ours, ref = GPT(), GPT()
    decay = lambda m: [(n, p) for n, p in m.named_parameters() if p.ndim == 2]  # noqa: E731
    no_decay = lambda m: [(n, p) for n, p in m.named_parameters() if p.ndim != 2]  # noqa: E731
    opt = ShardedOptimizer([{"params": decay(ours), "weight_decay": 0.1}, {"params": no_decay(ours), "lr": 1e-3,
                            "weight_decay": 0.0}], matrix=None, lr=3e-3)
    torch_opt = torch.optim.AdamW([{"params": [p for _, p in decay(ref)], "weight_decay": 0.1},
                                   {"params": [p for _, p in no_decay(ref)], "lr": 1e-3, "weight_decay": 0.0}],
                                  lr=3e-3)
    run(ours, [opt], 10), run(ref, [torch_opt], 10)
    assert max_abs_diff(ours, ref) <= 40 * FP32_EPS


@pytest.mark.parametrize("matrix", [None, "muon", "normuon"])
def test_state_dict_round_trip_continues_exactly(matrix):
    a = GPT()
    opt_a = ShardedOptimizer(a.named_parameters(), matrix=matrix, lr=3e-3, matrix_lr=0.02)
    run(a, [opt_a], 4)
    model_sd = copy.deepcopy(a.state_dict())
    opt_sd = copy.deepcopy(opt_a.state_dict())
    run(a, [opt_a], 4)

    b = GPT(seed=7)  # different initial values: everything must come from the state dicts
    opt_b = ShardedOptimizer(b.named_parameters(), matrix=matrix, lr=3e-3, matrix_lr=0.02)
    b.load_state_dict(model_sd)
    opt_b.load_state_dict(opt_sd)
    run(b, [opt_b], 4)
    assert max_abs_diff(a, b) == 0.0


def test_parameters_are_views_of_the_engine_buffers():
    model = GPT()
    opt = ShardedOptimizer(model.named_parameters(), matrix="muon", lr=3e-3, grad_memory="full")
    ptrs = {n: (p.data_ptr(), p.grad.data_ptr()) for n, p in model.named_parameters()}
    run(model, [opt], 2)
    assert ptrs == {n: (p.data_ptr(), p.grad.data_ptr()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["owned", "dim0"])
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("grad_memory", ["sharded", "full"])
def test_gradient_memory_matches_each_modes_formula(grad_memory, accumulation, layout):
    """ZeRO-2 from PyTorch: the engine holds the pooled bucket buffers + the shard (not full-size
    buffers) and the model keeps no .grad after backward; full buffers: .grad views the engine's."""
    model = GPT()
    opt = ShardedOptimizer(model.named_parameters(), matrix="muon", lr=3e-3, grad_memory=grad_memory,
                           backward_passes_per_step=accumulation, layout=layout, bucket_bytes=16 << 10)
    params = dict(model.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    for step in range(2):
        x, y = batch(step)
        for m in range(accumulation):
            model(x[m::accumulation], y[m::accumulation]).backward()
            held = sum(p.grad.numel() for p in params.values() if p.grad is not None)
            # ZeRO-2: every gradient went into the engine's bucket buffers; full: .grad is the engine's buffer.
            assert held == (0 if grad_memory == "sharded" else sum(p.numel() for p in params.values()))
        opt.step()
        opt.zero_grad()
    assert ptrs == {n: p.data_ptr() for n, p in params.items()}  # parameters stay views of the engine
    [report] = opt.memory()
    numels = [p.numel() for p in params.values()]
    check_grad_memory(report, opt._engines[0].buckets(), numels, grad_memory == "sharded", layout == "dim0",
                      accumulation, f"{grad_memory} x{accumulation} {layout}")
    if grad_memory == "sharded" and layout == "owned" and accumulation == 1:
        full = ShardedOptimizer(GPT().named_parameters(), matrix="muon", grad_memory="full", bucket_bytes=16 << 10)
        # One rank: the shard is the whole model, so ZeRO-2 saves the full buffer minus the pool.
        saved = full.memory()[0]["grad_buffer_bytes"] - report["grad_buffer_bytes"]
        assert saved >= 4 * sum(numels) - 4 * 2 * max(n for n, _, _ in opt._engines[0].buckets())


def test_routing_override_by_name():
    model = GPT()
    opt = ShardedOptimizer(model.named_parameters(), matrix="muon",
                           routing={"lm_head.weight": "matrix", "blocks.0.qkv.weight": "elementwise"})
    assert "lm_head.weight" in opt.matrix_parameter_names
    assert "blocks.0.qkv.weight" not in opt.matrix_parameter_names


def test_non_contiguous_parameter_is_named():
    w = torch.nn.Parameter(torch.randn(6, 4).t())
    with pytest.raises(ValueError, match="'odd.weight' is not contiguous"):
        ShardedOptimizer([("ok.weight", torch.nn.Parameter(torch.randn(3))), ("odd.weight", w)])


def test_mixed_dtype_parameter_is_named():
    params = [("a", torch.nn.Parameter(torch.randn(3))), ("b", torch.nn.Parameter(torch.randn(3, dtype=torch.float64)))]
    with pytest.raises(ValueError, match="'b' has dtype torch.float64"):
        ShardedOptimizer(params)


def test_param_group_after_construction_is_refused():
    opt = ShardedOptimizer([("a", torch.nn.Parameter(torch.randn(3)))], matrix=None)
    with pytest.raises(ValueError, match="cannot be added after construction.*'late'"):
        opt.add_param_group({"params": [("late", torch.nn.Parameter(torch.randn(3)))]})


@pytest.mark.parametrize("grad_memory", ["sharded", "full"])
def test_extra_backward_pass_before_step_is_refused(grad_memory):
    model = GPT()
    opt = ShardedOptimizer(model.named_parameters(), matrix=None, grad_memory=grad_memory)
    x, y = batch(0)
    model(x, y).backward()
    with pytest.raises(RuntimeError, match="parameter '.*' got more than backward_passes_per_step=1 backward passes"):
        model(x, y).backward()


@pytest.mark.parametrize("grad_memory", ["sharded", "full"])
def test_gradient_accumulation_over_backward_passes(grad_memory):
    # Two micro-batches of 3 sequences, each loss halved (the usual convention: the step uses the sum
    # of the passes' gradients) == torch.optim.AdamW on the same passes == one backward on all 6.
    ours, ref, big = GPT(), GPT(), GPT()
    opt = ShardedOptimizer(ours.named_parameters(), matrix=None, lr=3e-3, backward_passes_per_step=2,
                           grad_memory=grad_memory)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    big_opt = ShardedOptimizer(big.named_parameters(), matrix=None, lr=3e-3, grad_memory=grad_memory)
    for step in range(3):
        x, y = batch(step)
        for model in (ours, ref):
            (model(x[:3], y[:3]) / 2).backward()
            (model(x[3:], y[3:]) / 2).backward()
        big(x, y).backward()
        for o in (opt, torch_opt, big_opt):
            o.step()
            o.zero_grad()
    assert max_abs_diff(ours, ref) <= 12 * FP32_EPS
    assert max_abs_diff(ours, big) <= 12 * FP32_EPS
    assert max_abs_diff(ours, GPT()) > 1e-3  # it moved


def test_hand_assigned_gradient_reaches_the_engine():
    # Sharded gradients come through backward's hooks; a .grad assigned by hand is handed over in step().
    ours, ref = GPT(), GPT()
    opt = ShardedOptimizer(ours.named_parameters(), matrix=None, lr=3e-3)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(5)
    for p, q in zip(ours.parameters(), ref.parameters()):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    opt.step(), torch_opt.step()
    assert all(p.grad is None for p in ours.parameters())
    assert max_abs_diff(ours, ref) <= 4 * FP32_EPS


def test_clip_grad_norm_equals_torch_clip_then_adamw():
    # torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW vs opt.clip_grad_norm_ (norm filled by step()).
    max_norm = 0.5  # below this model's early gradient norms: the clip is active on most steps
    ours, ref = GPT(), GPT()
    opt = ShardedOptimizer(ours.named_parameters(), matrix=None, elementwise="adamw", lr=3e-3)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    norms, ref_norms = [], []
    for step in range(STEPS):
        x, y = batch(step)
        ours(x, y).backward()
        ref(x, y).backward()
        norm = opt.clip_grad_norm_(max_norm)
        assert math.isnan(norm.item())  # known only inside step()
        opt.step()
        norms.append(norm.item())
        assert opt.last_step_reports[0]["grad_norm"] == pytest.approx(norms[-1], rel=1e-6)
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item())
        torch_opt.step()
        opt.zero_grad()
        torch_opt.zero_grad()
    assert sum(n > max_norm for n in ref_norms) >= STEPS // 2
    assert norms == pytest.approx(ref_norms, rel=1e-4)
    scale = max(p.abs().max().item() for p in ref.parameters())
    assert max_abs_diff(ours, ref) <= 4 * STEPS * FP32_EPS * scale
    # The clip applies to that step only: the next step runs unclipped, as constructed.
    x, y = batch(STEPS)
    ours(x, y).backward()
    ref(x, y).backward()
    opt.step()
    assert opt.last_step_reports[0]["grad_norm"] > max_norm  # a clip left on would have changed it
    torch_opt.step()
    assert max_abs_diff(ours, ref) <= 4 * (STEPS + 1) * FP32_EPS * scale


def test_clip_grad_norm_refuses_what_it_cannot_do():
    opt = ShardedOptimizer(GPT().named_parameters(), matrix=None)
    with pytest.raises(ValueError, match="norm_type=2"):
        opt.clip_grad_norm_(1.0, norm_type=1.0)
    with pytest.raises(ValueError, match="max_norm must be finite and > 0"):
        opt.clip_grad_norm_(0.0)
    model = GPT()
    named = list(model.named_parameters())
    two_groups = ShardedOptimizer([{"params": named[:2]}, {"params": named[2:]}], matrix=None)
    with pytest.raises(ValueError, match="one param group"):
        two_groups.clip_grad_norm_(1.0)


def test_step_hooks_and_profiler_label_as_torch_optimizers_have_them():
    # step() skips torch.optim.Optimizer's wrapper when nothing needs it; hooks and the profiler must
    # still see every step.
    model = GPT()
    opt = ShardedOptimizer(model.named_parameters(), matrix=None, lr=3e-3)
    calls = []

    def steps_done(o):
        return o.last_step_reports[0]["step"] if o.last_step_reports else 0
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", steps_done(o))))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", steps_done(o))))
    run(model, [opt], 2)
    assert calls == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2)]
    pre.remove(), post.remove()
    run(model, [opt], 1)
    assert len(calls) == 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(model, [opt], 1)
    assert any(e.name == "Optimizer.step#ShardedOptimizer.step" for e in prof.events())
