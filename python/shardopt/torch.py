"""ShardedOptimizer: shardopt's engine as a torch.optim.Optimizer.

    opt = ShardedOptimizer(model.named_parameters(), matrix="muon", elementwise="adamw", lr=3e-4,
                           matrix_lr=0.02)
    for batch in data:
        loss = model(batch).backward()   # each complete bucket's reduce-scatter starts here
        opt.step()                       # sharded update + all-gather into the model's parameters
        opt.zero_grad()

What happens:
  * Each param group becomes one Engine (runtime/engine.h) over the same communicator. At
    construction rank 0's parameter values are broadcast (like DistributedDataParallel), copied into
    the engine, and every parameter's storage is replaced by a view of the engine's parameter
    buffer, so step() needs no copy into the model.
  * A post-accumulate-grad hook per parameter hands the gradient to the engine; when every tensor of
    a bucket has one, the bucket's reduce-scatter starts while backward continues.
    grad_memory="sharded" (ZeRO-2, the default at stage 2): the hook copies autograd's gradient into
    the engine's pooled bucket buffer and drops .grad (None), so no full-size gradient stays
    resident; every micro-batch is reduce-scattered into this rank's gradient shard.
    grad_memory="full" (and stage 1): .grad is a persistent view of a full-size engine buffer that
    autograd accumulates into; one reduce-scatter per step, after the last micro-batch.
  * step() reads each group's "lr" (so torch.optim.lr_scheduler works) and runs the engine's step.
    Gradients are averaged over ranks, like DDP.
Communication: torch.distributed initialized -> a process group of its own (gloo) over the
trainer's ranks; launched by mpirun -> the MPI backend; otherwise one rank.
CUDA parameters (a build with the CUDA toolkit): the engine's buffers live on the parameters' GPU
(memory_space "cuda"); its collectives run on NCCL (a clique of its own, bootstrapped over
torch.distributed or MPI) or, in one process, on the threads backend on device memory. Whatever
reads a gradient first synchronizes torch's current stream; step() returns with the parameters
written, so any stream may read them.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import re
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch.optim import optimizer as torch_optimizer

from . import _C
from ._torch_comm import TorchDistributedCollectives

__all__ = ["ShardedOptimizer", "default_communicator"]

_ELEMENTWISE_KINDS = {"adamw": "OPTIMIZER_ADAMW", "lion": "OPTIMIZER_LION", "sgd": "OPTIMIZER_SGD"}
_MATRIX_KINDS = {"muon": "OPTIMIZER_MUON", "normuon": "OPTIMIZER_NORMUON"}
_SHAPE_SCALES = {"original": "MUON_SHAPE_SCALE_ORIGINAL", "match_rms_adamw": "MUON_SHAPE_SCALE_MATCH_RMS_ADAMW",
                 "spectral": "MUON_SHAPE_SCALE_SPECTRAL"}
# Engine state names -> the names torch's optimizers use in their state_dict.
_STATE_NAMES = {"adam_m": "exp_avg", "adam_v": "exp_avg_sq", "momentum": "momentum_buffer",
                "normuon_row_v": "normuon_row_v", "param": "param"}
_ENGINE_STATE_NAMES = {v: k for k, v in _STATE_NAMES.items()}

_mpi_finalizer_registered = False


def _launched_by_mpirun() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


def _register_mpi_finalizer() -> None:
    global _mpi_finalizer_registered
    if not _mpi_finalizer_registered:
        atexit.register(_C.mpi_finalize)
        _mpi_finalizer_registered = True


def default_communicator(process_group=None, device: Optional[torch.device] = None):
    """The communicator a ShardedOptimizer uses: torch.distributed, MPI, or a world of one rank.

    Host parameters (device None or cpu): under torch.distributed the engine gets a gloo group of
    its own (dist.new_group over the trainer's ranks; collective: every rank of the default group
    must construct its optimizer), so its collectives never interleave with the trainer's. A
    process_group given by the caller is used as is and should be reserved for shardopt.

    CUDA parameters on `device`: an NCCL communicator of the engine's own (one GPU per rank), its
    clique id broadcast from the group's first rank over torch.distributed (process_group, or the
    default group), or over MPI under mpirun; in one process, the threads backend on device memory.
    """
    if device is not None and device.type == "cuda":
        return _cuda_communicator(process_group, device)
    if dist.is_available() and dist.is_initialized():
        group = process_group if process_group is not None else dist.new_group(backend="gloo")
        return _C.python_communicator(TorchDistributedCollectives(group))
    if process_group is not None:
        raise ValueError("process_group was given but torch.distributed is not initialized")
    if _launched_by_mpirun():
        comm = _C.mpi_world()
        _register_mpi_finalizer()
        return comm
    return _C.thread_world_of_one()


def _cuda_communicator(process_group, device: torch.device):
    if not getattr(_C, "has_cuda", False):
        raise ValueError("the parameters are on a CUDA device, but this build of shardopt has no CUDA support "
                         "(built without the CUDA toolkit)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if dist.is_available() and dist.is_initialized():
        group = process_group if process_group is not None else dist.group.WORLD
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        box = [_C.nccl_unique_id() if rank == 0 else None]
        # The id travels as a pickled tensor: on the GPU for an NCCL group, in host memory otherwise.
        carrier = device if dist.get_backend(group) == "nccl" else None
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group, device=carrier)
        return _C.nccl_communicator(box[0], rank, size, index)
    if process_group is not None:
        raise ValueError("process_group was given but torch.distributed is not initialized")
    if _launched_by_mpirun():
        comm = _C.nccl_mpi_world(index)
        _register_mpi_finalizer()
        return comm
    return _C.cuda_thread_world_of_one(index)


def _current_stream(device: torch.device) -> int:
    """The handle of torch's current CUDA stream on `device` (0 for host engines: nothing to wait for)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _step_hooks_or_profiler(opt) -> bool:
    """Whether step() must go through torch.optim.Optimizer's hook/profiler wrapper. The globals are
    torch's private ones; if a torch version lacks them, always take the wrapper."""
    global_pre = getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
    global_post = getattr(torch_optimizer, "_global_optimizer_post_hooks", None)
    profiler = getattr(torch.autograd.profiler, "_is_profiler_enabled", True)
    return bool(profiler or global_pre is None or global_post is None or global_pre or global_post
                or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks)


def _fmt(x: float) -> str:
    return repr(float(x))


def _elementwise_text(kind: str, group: Dict[str, Any]) -> str:
    if kind not in _ELEMENTWISE_KINDS:
        raise ValueError(f"elementwise must be one of {sorted(_ELEMENTWISE_KINDS)}, got {kind!r}")
    t = [f"kind: {_ELEMENTWISE_KINDS[kind]}", f"lr: {_fmt(group['lr'])}"]
    if group["weight_decay"] is not None:
        t.append(f"weight_decay: {_fmt(group['weight_decay'])}")
    if kind in ("adamw", "lion") and group["betas"] is not None:
        b1, b2 = group["betas"]
        t += [f"beta1: {_fmt(b1)}", f"beta2: {_fmt(b2)}"]
    if kind == "adamw":
        t.append(f"eps: {_fmt(group['eps'])}")
    if kind == "sgd":
        t += [f"momentum: {_fmt(group['sgd_momentum'])}", f"dampening: {_fmt(group['dampening'])}",
              f"nesterov: {'true' if group['sgd_nesterov'] else 'false'}"]
    return " ".join(t)


def _matrix_text(kind: str, group: Dict[str, Any]) -> str:
    if kind not in _MATRIX_KINDS:
        raise ValueError(f"matrix must be one of {sorted(_MATRIX_KINDS)} or None, got {kind!r}")
    if group["shape_scale"] not in _SHAPE_SCALES:
        raise ValueError(f"shape_scale must be one of {sorted(_SHAPE_SCALES)}, got {group['shape_scale']!r}")
    t = [f"kind: {_MATRIX_KINDS[kind]}", f"lr: {_fmt(group['matrix_lr'])}",
         f"weight_decay: {_fmt(group['matrix_weight_decay'])}", f"momentum: {_fmt(group['momentum'])}",
         f"nesterov: {'true' if group['nesterov'] else 'false'}", f"ns_steps: {int(group['ns_steps'])}",
         f"ns_eps: {_fmt(group['ns_eps'])}", f"shape_scale: {_SHAPE_SCALES[group['shape_scale']]}"]
    return " ".join(t)


def _named(params: Iterable, start: int) -> List[tuple]:
    """(name, tensor) pairs from named_parameters() output or plain tensors (named 'param.<i>')."""
    out = []
    for i, p in enumerate(params):
        if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            out.append(p)
        elif isinstance(p, torch.Tensor):
            out.append((f"param.{start + i}", p))
        else:
            raise TypeError(f"ShardedOptimizer: expected tensors or (name, tensor) pairs, got {type(p).__name__}")
    return out


class ShardedOptimizer(torch.optim.Optimizer):
    """A sharded optimizer (ZeRO stage 1 or 2, owned or dim0 layout) with owner-rank Muon.

    Args (torch names and defaults where torch has them):
      params: model.named_parameters(), tensors, or torch-style param groups (list of dicts whose
        "params" are either); a group may set any keyword below except matrix/elementwise/stage/layout.
      matrix: "muon", "normuon" or None (every tensor element-wise: plain ZeRO AdamW/Lion/SGD).
      elementwise: "adamw", "lion" or "sgd": embeddings, head, norms, biases, every non-2-D tensor.
      lr: element-wise learning rate (AdamW's 1e-3). matrix_lr: Muon's (None = lr).
        Both follow the group's "lr" over time: the engine steps with lr_multiplier = lr / lr_at_start.
      weight_decay: element-wise (None = the kind's torch default: AdamW 0.01, Lion/SGD 0).
      matrix_weight_decay: Muon's (torch.optim.Muon's 0.1).
      betas, eps: AdamW/Lion (None = the kind's default: AdamW (0.9, 0.999), Lion (0.9, 0.99)).
      momentum, nesterov, ns_steps, ns_eps, shape_scale: Muon, as torch.optim.Muon ("original":
        lr * sqrt(max(1, rows/cols))).
      sgd_momentum, dampening, sgd_nesterov: element-wise SGD (torch.optim.SGD's).
      stage: ZeRO stage 1 or 2 (stage 3 needs the trainer to gather parameters: docs/pytorch.md).
      layout: "owned" (whole tensors per rank) or "dim0" (row shards; Muon travels to its owner).
      routing: {parameter name: "matrix" | "elementwise"} overrides the engine's routing (2-D hidden
        matrices -> Muon; names containing embed/head/norm/bias/wte/wpe -> element-wise).
      max_grad_norm: > 0 clips the global gradient norm in every step (or call opt.clip_grad_norm_
        before a step; torch.nn.utils.clip_grad_norm_ does not apply: gradients are reduced during
        backward, so .grad holds this rank's unreduced gradient).
      backward_passes_per_step: backward() calls accumulated into one step (gradient accumulation).
        The step uses the sum of their gradients (what .grad accumulates in torch; divide the loss
        by the number of micro-batches for their mean, as usual).
      grad_memory: "sharded" (ZeRO-2: pooled bucket buffers + this rank's gradient shard; each
        micro-batch is reduce-scattered as backward produces it; .grad is None after backward) or
        "full" (full-size gradient buffers that .grad views and autograd accumulates into; one
        reduction per step, fewer collectives with accumulation). Stage 1 always keeps full buffers.
      bucket_bytes, overlap: the engine's bucket size and whether reductions start during backward.
      process_group: see default_communicator.
    Devices: the parameters' device is the engine's: all on the CPU, or all on one CUDA device (a
      build with the CUDA toolkit; the step then runs on that GPU, see default_communicator for the
      collectives). Gradients are read after torch's current stream is synchronized.
    Errors (ValueError unless said): non-float32, non-contiguous, duplicated parameters or
    parameters on different devices (naming the parameter), param groups added after construction,
    ranks disagreeing on names, shapes or options (naming the first differing field).
    """

    def __init__(self, params, *, matrix: Optional[str] = "muon", elementwise: str = "adamw", lr: float = 1e-3,
                 matrix_lr: Optional[float] = None, weight_decay: Optional[float] = None,
                 matrix_weight_decay: float = 0.1, betas: Optional[tuple] = None, eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, ns_eps: float = 1e-7,
                 shape_scale: str = "original", sgd_momentum: float = 0.0, dampening: float = 0.0,
                 sgd_nesterov: bool = False, stage: int = 2, layout: str = "owned",
                 routing: Optional[Dict[str, str]] = None, max_grad_norm: float = 0.0,
                 backward_passes_per_step: int = 1, grad_memory: str = "sharded", bucket_bytes: int = 4 << 20,
                 overlap: bool = True, process_group=None):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2 from PyTorch, got {stage} (stage 3: see docs/pytorch.md)")
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be >= 1")
        if grad_memory not in ("sharded", "full"):
            raise ValueError(f"grad_memory must be 'sharded' or 'full', got {grad_memory!r}")
        if weight_decay is None:
            weight_decay = 0.01 if elementwise == "adamw" else 0.0
        defaults = dict(lr=lr, matrix_lr=lr if matrix_lr is None else matrix_lr, weight_decay=weight_decay,
                        matrix_weight_decay=matrix_weight_decay, betas=betas, eps=eps, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, ns_eps=ns_eps, shape_scale=shape_scale,
                        sgd_momentum=sgd_momentum, dampening=dampening, sgd_nesterov=sgd_nesterov)
        self._matrix, self._elementwise = matrix, elementwise
        self._routing = dict(routing or {})
        for name, route in self._routing.items():
            if route not in ("matrix", "elementwise"):
                raise ValueError(f"routing['{name}'] must be 'matrix' or 'elementwise', got {route!r}")
        self._backward_passes = backward_passes_per_step
        # Stage 1 keeps full gradient buffers whatever grad_memory says (runtime/engine.h).
        self._sharded_grads = grad_memory == "sharded" and stage >= 2
        self._constructing = True

        # Param groups as torch has them, with the names kept in "param_names".
        params = list(params)
        if not params:
            raise ValueError("ShardedOptimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        torch_groups, seen, count = [], set(), 0
        for g in groups:
            named = _named(g["params"], count)
            count += len(named)
            for name, p in named:
                self._check_param(name, p, seen)
            tg = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            tg["params"] = [p for _, p in named]
            tg["param_names"] = [n for n, _ in named]
            torch_groups.append(tg)
        super().__init__(torch_groups, defaults)
        self._constructing = False

        self._device = self._common_device()
        self._on_cuda = self._device.type == "cuda"
        # Views of the engine's buffers as tensors: numpy arrays (host) or CUDA DLPack arrays.
        self._wrap = torch.from_dlpack if self._on_cuda else torch.from_numpy
        self._comm = default_communicator(process_group, self._device)
        self._engines: List[Any] = []
        # Sharded gradients: gradients the hooks handed over since the last step (a list cell the
        # hooks share); step() looks for hand-assigned .grad only when some are missing.
        self._handed_over = [0]
        self._expected_handovers = sum(len(g["params"]) for g in self.param_groups) * backward_passes_per_step
        self._grad_views: List[List[torch.Tensor]] = []  # full gradient buffers only
        self._passes: List[List[int]] = []
        self._hooks = []
        self._last_reports: List[dict] = []
        self._max_grad_norm = float(max_grad_norm)
        self._pending_clip: Optional[tuple] = None  # (max_norm, tensor the next step() fills)
        self._matrix_names: List[str] = []
        for gi, group in enumerate(self.param_groups):
            self._build_engine(gi, group, stage, layout, bucket_bytes, max_grad_norm, overlap)

    # ---------------------------------------------------------------- construction
    @staticmethod
    def _check_param(name: str, p: torch.Tensor, seen: set) -> None:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter '{name}' is a {type(p).__name__}, not a tensor")
        if p.dtype != torch.float32:
            raise ValueError(f"parameter '{name}' has dtype {p.dtype}; ShardedOptimizer keeps float32 parameters "
                             "(every parameter must be float32)")
        if not p.is_contiguous():
            raise ValueError(f"parameter '{name}' is not contiguous; its storage becomes a view of the engine's "
                             "buffer, which is contiguous")
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"parameter '{name}' is on {p.device}; the engine's buffers are in host memory or on "
                             "a CUDA device")
        if not p.requires_grad:
            raise ValueError(f"parameter '{name}' does not require grad")
        if id(p) in seen:
            raise ValueError(f"parameter '{name}' appears twice")
        seen.add(id(p))

    def _common_device(self) -> torch.device:
        """The one device of every parameter (the engine's memory space); ValueError naming two that differ."""
        first = None
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                device = p.device if p.device.type == "cpu" or p.device.index is not None else \
                    torch.device("cuda", torch.cuda.current_device())
                if first is None:
                    first = (name, device)
                elif device != first[1]:
                    raise ValueError(f"parameter '{name}' is on {device} but '{first[0]}' on {first[1]}; one "
                                     "ShardedOptimizer keeps its parameters on one device")
        return first[1]

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not getattr(self, "_constructing", False):
            names = param_group.get("param_names") or [n for n, _ in _named(param_group.get("params", []), 0)
                                                         if not isinstance(param_group.get("params"), torch.Tensor)]
            raise ValueError("ShardedOptimizer: param groups cannot be added after construction (the engine's "
                             f"buffers and shard plan are fixed); parameters: {names}")
        super().add_param_group(param_group)

    def _build_engine(self, gi, group, stage, layout, bucket_bytes, max_grad_norm, overlap):
        specs = []
        for name, p in zip(group["param_names"], group["params"]):
            route = self._routing.get(name, "")
            engine_group = {"matrix": "muon", "elementwise": "adamw", "": ""}[route]
            specs.append((name, list(p.shape), engine_group))
        if group["lr"] <= 0:
            raise ValueError(f"param group {gi}: lr must be > 0 at construction (schedules scale it), got {group['lr']}")
        matrix_text = "" if self._matrix is None else _matrix_text(self._matrix, group)
        # Sharded gradients: every micro-batch is handed over (accept_grad) and reduce-scattered, and
        # the engine averages its micro-batches; full buffers: autograd sums them locally and the
        # engine sees one gradient per step.
        accumulation = self._backward_passes if self._sharded_grads else 1
        try:
            engine = _C.Engine(self._comm, specs, stage=stage, layout=layout, bucket_bytes=bucket_bytes,
                               matrix_optimizer=matrix_text,
                               elementwise_optimizer=_elementwise_text(self._elementwise, group),
                               routing="elementwise_only: true" if self._matrix is None else "",
                               max_grad_norm=float(max_grad_norm), overlap=overlap,
                               grad_memory="sharded" if self._sharded_grads else "full",
                               grad_accumulation_steps=accumulation,
                               memory_space="cuda" if self._on_cuda else "host",
                               device=self._device.index if self._on_cuda else -1)
        except ValueError as e:
            # The engine names tensors by index ("plan_request.params[24].shape[0]"): add their names.
            names = group["param_names"]
            indices = sorted({int(i) for i in re.findall(r"params\[(\d+)\]", str(e)) if int(i) < len(names)})
            if not indices:
                raise
            raise ValueError(f"{e} (" + ", ".join(f"params[{i}] is parameter '{names[i]}'" for i in indices) + ")") \
                from None
        group["initial_lr_"] = group["lr"]
        group["initial_matrix_lr_"] = group["matrix_lr_shown_"] = group["matrix_lr"]
        group["initial_weight_decay_"] = (group["weight_decay"], group["matrix_weight_decay"])
        with torch.no_grad():
            values = []
            for p in group["params"]:
                v = p.detach().clone().contiguous().view(-1)
                # Rank 0's initial values, like DistributedDataParallel (in the engine's memory space).
                engine.broadcast_(v if self._on_cuda else v.numpy(), 0, _current_stream(self._device))
                values.append(v.cpu().numpy())
            engine.set_params(values)
            assert engine.sharded_grads == self._sharded_grads
            views = []
            for t, (name, p) in enumerate(zip(group["param_names"], group["params"])):
                p.data = self._wrap(engine.param(t))
                if self._sharded_grads:
                    p.grad = None
                    hook = self._sharded_grad_hook(engine, t, name)
                else:
                    g = self._wrap(engine.grad(t))
                    g.zero_()
                    p.grad = g
                    views.append(g)
                    hook = self._hook(gi, t)
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))
        self._matrix_names.extend(n for t, n in enumerate(group["param_names"]) if engine.is_muon(t))
        self._engines.append(engine)
        self._grad_views.append(views)
        self._passes.append([0] * len(group["params"]))

    # ---------------------------------------------------------------- backward
    def _sharded_grad_hook(self, engine, t: int, name: str):
        """ZeRO-2: the hook copies autograd's gradient into the engine's bucket buffer (scaled by the
        number of micro-batches: the engine averages them, the step uses their sum, as torch does)
        and drops .grad, so the model keeps no full-size gradient. One C++ call per tensor per
        micro-batch; the address skips a DLPack conversion (autograd's gradient has the parameter's
        shape, dtype and device; contiguity is checked). On CUDA the copy is a kernel on torch's
        current stream (the one backward runs on, where autograd allocated the gradient, so dropping
        it is safe in that stream's order) and the bucket's reduction waits for that stream on the
        device: backward never waits on the host."""
        accept = engine.accept_grad_at
        scale = float(self._backward_passes)
        passes = self._backward_passes
        handed_over = self._handed_over
        device = self._device

        def on_grad_accumulated(p: torch.Tensor) -> None:
            g = p.grad
            p.grad = None
            if not g.is_contiguous():
                g = g.contiguous()
            try:
                accept(t, g.data_ptr(), scale, _current_stream(device))
                handed_over[0] += 1
            except ValueError as e:
                raise RuntimeError(f"ShardedOptimizer: parameter '{name}' got more than backward_passes_per_step="
                                   f"{passes} backward passes before step() ({e})") from None
        return on_grad_accumulated

    def _hook(self, gi: int, t: int):
        def on_grad_accumulated(p: torch.Tensor) -> None:
            self._gradient_accumulated(gi, t, p)
        return on_grad_accumulated

    def _gradient_accumulated(self, gi: int, t: int, p: torch.Tensor) -> None:
        """The one place that hands a gradient to the engine: it lands in engine.grad(t) (autograd
        accumulates into the view in place; a .grad replaced by the user is copied in), and after the
        step's last backward pass engine.grad_ready(t) lets a complete bucket's reduction start."""
        view = self._grad_views[gi][t]
        if p.grad is None or p.grad.data_ptr() != view.data_ptr():
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view
        self._passes[gi][t] += 1
        if self._passes[gi][t] > self._backward_passes:
            name = self.param_groups[gi]["param_names"][t]
            raise RuntimeError(f"ShardedOptimizer: parameter '{name}' got more than backward_passes_per_step="
                               f"{self._backward_passes} backward passes before step() (its gradient was already "
                               "being reduced)")
        if self._passes[gi][t] == self._backward_passes:
            self._engines[gi].grad_ready(t, _current_stream(self._device))

    # ---------------------------------------------------------------- torch.optim.Optimizer API
    def step(self, closure=None):
        """torch.optim.Optimizer.step: reads each group's lr, runs the engines' steps (gradients are
        final once every backward pass handed them over) and leaves the updated parameters in the
        model. Step pre/post hooks run and a profiler sees "Optimizer.step#ShardedOptimizer.step" as
        with torch's optimizers; when neither is in use the step skips torch's wrapper, which costs
        ~100 us per call (record_function), a tenth of a small model's whole step."""
        if _step_hooks_or_profiler(self):
            return self._profiled_step(closure)
        return self._step(closure)

    step.hooked = True  # torch.optim.Optimizer must not wrap it (it would on construction)

    def _step(self, closure=None):
        # No torch.no_grad needed: the engine writes the parameters through its own buffers, and
        # nothing here records autograd operations.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._on_cuda:
            # Kernels of the backward still queued on torch's stream may read the parameters the
            # step is about to overwrite.
            torch.cuda.current_stream(self._device).synchronize()
        reports = []
        clip = self._pending_clip
        self._pending_clip = None
        if clip is not None:
            self._engines[0].max_grad_norm = clip[0]
        if self._sharded_grads:
            if self._handed_over[0] != self._expected_handovers:
                self._hand_over_assigned_grads()
            self._handed_over[0] = 0
        for gi, group in enumerate(self.param_groups):
            if (group["weight_decay"], group["matrix_weight_decay"]) != group["initial_weight_decay_"]:
                raise ValueError(f"param group {gi}: weight_decay cannot change after construction "
                                 f"(was {group['initial_weight_decay_']})")
            if group["matrix_lr"] != group["matrix_lr_shown_"]:
                raise ValueError(f"param group {gi}: matrix_lr cannot be set on its own; it follows lr "
                                 "(lr_multiplier = lr / initial lr): schedule 'lr'")
            multiplier = group["lr"] / group["initial_lr_"]
            reports.append(self._engines[gi].step(float(multiplier)))
            if not self._sharded_grads:
                self._passes[gi] = [0] * len(self._passes[gi])
            # Shows the matrix learning rate this step applied.
            group["matrix_lr"] = group["matrix_lr_shown_"] = group["initial_matrix_lr_"] * multiplier
        if clip is not None:
            self._engines[0].max_grad_norm = self._max_grad_norm
            report = reports[0]
            # A step skipped for NaN/Inf gradients computed no norm: NaN, as torch's would be non-finite.
            clip[1].fill_(report["grad_norm"] if not report["nonfinite_tensors"] else math.nan)
        self._last_reports = reports
        return loss

    _profiled_step = torch.optim.Optimizer.profile_hook_step(_step)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clips the next step's gradient to global L2 norm max_norm; returns that norm, known only in step().

        FSDP's clip_grad_norm_ reads the reduced gradients and returns the norm at once. Here the
        gradients are reduce-scattered during backward and the global norm exists only inside
        step(), where the engine computes it (one all-reduce it makes anyway) and clips with torch's
        rule (scale = max_norm / (norm + 1e-6) when norm > max_norm). So this call schedules the clip
        for the next step() only, and returns a 0-d float32 tensor that is NaN until that step()
        writes the global norm of the rank-averaged gradient before clipping (what
        torch.nn.utils.clip_grad_norm_ returns on the same gradient); read it after step():

            norm = opt.clip_grad_norm_(1.0); opt.step(); log(norm.item())

        It also appears as last_step_reports[0]["grad_norm"]. Collective in effect: call it on every
        rank with the same max_norm before the same step. Only norm_type=2 and one param group (each
        group is its own engine, and the norm would have to span them).
        """
        if float(norm_type) != 2.0:
            raise ValueError(f"clip_grad_norm_: only norm_type=2 is supported (the engine's global L2 norm), "
                             f"got {norm_type}")
        max_norm = float(max_norm)
        if not (max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"clip_grad_norm_: max_norm must be finite and > 0, got {max_norm}")
        if len(self._engines) != 1:
            raise ValueError(f"clip_grad_norm_: supported with one param group, this optimizer has "
                             f"{len(self._engines)} (each group's engine computes its own norm; use "
                             "max_grad_norm= for a per-group clip)")
        norm = torch.full((), math.nan, dtype=torch.float32)
        self._pending_clip = (max_norm, norm)
        return norm

    @property
    def last_step_reports(self) -> List[dict]:
        """Per param group: applied, nonfinite_tensors, grad_norm, step, seconds, bytes_sent."""
        return self._last_reports

    def _hand_over_assigned_grads(self) -> None:
        """Sharded gradients: a .grad that no backward hook took (assigned by hand) goes to the engine
        now, in parameter order (the same on every rank)."""
        for gi, group in enumerate(self.param_groups):
            for t, p in enumerate(group["params"]):
                if p.grad is not None:
                    g = p.grad.detach().to(self._device, torch.float32).contiguous()
                    p.grad = None
                    if self._on_cuda:
                        self._engines[gi].accept_grad_at(t, g.data_ptr(), float(self._backward_passes),
                                                         _current_stream(self._device))
                    else:
                        self._engines[gi].accept_grad(t, g.view(-1), float(self._backward_passes))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Sharded gradients: .grad is already None after backward (the engine holds the gradient);
        any .grad assigned by hand is dropped. Full buffers: zeroes them in place, so .grad stays a
        view of the engine's buffer (set_to_none is accepted for compatibility and ignored)."""
        for gi, group in enumerate(self.param_groups):
            if self._sharded_grads:
                for p in group["params"]:
                    p.grad = None
                continue
            self._engines[gi].zero_grads()
            for p, view in zip(group["params"], self._grad_views[gi]):
                p.grad = view

    def memory(self) -> List[dict]:
        """Per param group, the bytes this rank's engine holds by kind (runtime::MemoryReport):
        param_bytes, grad_buffer_bytes (full buffers, or the ZeRO-2 pool of grad_slots bucket
        buffers), grad_shard_bytes (the reduced gradient shard), master_bytes, state_bytes, ..."""
        return [e.memory() for e in self._engines]

    @property
    def matrix_parameter_names(self) -> List[str]:
        """Names of the parameters the matrix optimizer (Muon/NorMuon) updates."""
        return list(self._matrix_names)

    @property
    def world_size(self) -> int:
        return self._comm.size

    @property
    def rank(self) -> int:
        return self._comm.rank

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Collective. The full (gathered) state, identical on every rank, keyed by parameter name:
        {"format": "shardopt", "param_groups": [...], "state": {name: {"step", "exp_avg", ...}}}.
        It does not depend on world size, stage or layout, so it loads into any of them. Its tensors
        are in host memory for CUDA parameters too (every rank holds the whole state)."""
        groups, state = [], {}
        for gi, group in enumerate(self.param_groups):
            engine = self._engines[gi]
            gathered = engine.gather_state()
            step = engine.optimizer_step
            for name, p, states in zip(group["param_names"], group["params"], gathered):
                entry = {"step": torch.tensor(float(step))}
                for sname, arr in states.items():
                    if sname == "param":
                        continue  # the model's own state_dict holds the parameters
                    t = torch.from_numpy(arr)
                    entry[_STATE_NAMES[sname]] = t if sname == "normuon_row_v" else t.view(p.shape)
                state[name] = entry
            g = {k: v for k, v in group.items() if k != "params" and not k.endswith("_")}
            g["params"] = list(group["param_names"])
            g["step"] = step
            groups.append(g)
        return {"format": "shardopt", "param_groups": groups, "state": state}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Collective. Loads a state_dict() taken at any world size, stage or layout. The parameters
        are taken from the model as it is now (load the model's state_dict first)."""
        if state_dict.get("format") != "shardopt":
            raise ValueError("load_state_dict: not a ShardedOptimizer state_dict (missing format 'shardopt')")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"load_state_dict: {len(saved_groups)} param groups saved, {len(self.param_groups)} here")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if list(saved["params"]) != list(group["param_names"]):
                raise ValueError(f"load_state_dict: param group {gi} has parameters {saved['params']} saved but "
                                 f"{group['param_names']} here")
            engine = self._engines[gi]
            states = []
            for t, (name, p) in enumerate(zip(group["param_names"], group["params"])):
                entry = state_dict["state"].get(name)
                if entry is None:
                    raise ValueError(f"load_state_dict: no state for parameter '{name}'")
                s = {"param": p.detach().reshape(-1).cpu().numpy()}
                for sname in engine.states_of(t):
                    if sname == "param":
                        continue
                    key = _STATE_NAMES[sname]
                    if key not in entry:
                        raise ValueError(f"load_state_dict: parameter '{name}' lacks state '{key}' (saved with a "
                                         "different optimizer or routing?)")
                    value = entry[key].detach().to("cpu", torch.float32).contiguous().reshape(-1)
                    s[sname] = value.numpy()
                states.append(s)
            engine.scatter_state(states, int(saved["step"]))
            for k, v in saved.items():
                if k not in ("params", "step", "param_names"):
                    group[k] = v
            group["matrix_lr_shown_"] = group["matrix_lr"]
            # "lr" as saved (a scheduler's current value); the engine's base stays as constructed.

    def sharded_state_dict(self) -> Dict[str, Any]:
        """Collective (torch.distributed). The state as this rank holds it, for
        torch.distributed.checkpoint (DCP): {"format": "shardopt-sharded", "param_groups": JSON text,
        "state": {name: {"step", "param", "exp_avg", ...}}} where every state is a 1-D ShardedTensor
        over the default group (the flattened tensor; NorMuon's row state has one value per row)
        whose local shards are views of this rank's engine buffers at their global offsets ("param"
        is the fp32 master). No copy is made and nothing is gathered; DCP reshards on load, so
        a checkpoint written at one world size, stage or layout loads at another:

            dcp.save({"model": model.state_dict(), "optim": opt.sharded_state_dict()}, checkpoint_id=d)
            sd = {"model": model.state_dict(), "optim": opt.sharded_state_dict()}
            dcp.load(sd, checkpoint_id=d)          # writes into the engine's buffers in place
            model.load_state_dict(sd["model"]); opt.load_sharded_state_dict(sd["optim"])

        ShardedTensor, not DTensor: a DTensor shards along tensor dimensions in equal blocks, while the
        engine's pieces are arbitrary ranges of the flattened tensor (whole tensors per owner, bucket
        segments cutting rows); ShardedTensor states each piece's offset and DCP reads it."""
        from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sharded_state_dict needs torch.distributed (ShardedTensors over the default group); "
                               "without it use save()/load() or state_dict()")
        if self.world_size != dist.get_world_size():
            raise ValueError(f"sharded_state_dict: the optimizer's process group has {self.world_size} ranks, the "
                             f"default group {dist.get_world_size()}; DCP shards over the default group")
        rank = dist.get_rank()
        groups, state = [], {}
        for gi, group in enumerate(self.param_groups):
            engine = self._engines[gi]
            pieces: Dict[tuple, list] = {}
            for t, sname, offset, _, view in engine.state_ranges():
                meta = ShardMetadata(shard_offsets=[offset], shard_sizes=[view.shape[0]],
                                     placement=f"rank:{rank}/{self._device}")
                pieces.setdefault((t, sname), []).append(Shard(self._wrap(view), meta))
            step = engine.optimizer_step
            for t, (name, p) in enumerate(zip(group["param_names"], group["params"])):
                entry = {"step": torch.tensor(float(step))}
                for sname in engine.states_of(t):  # the same order on every rank: the tensors are collective
                    size = p.shape[0] if sname == "normuon_row_v" else p.numel()
                    entry[_STATE_NAMES[sname]] = init_from_local_shards(pieces.get((t, sname), []), [size])
                state[name] = entry
            g = {k: v for k, v in group.items() if k != "params" and not k.endswith("_")}
            g["params"] = list(group["param_names"])
            g["step"] = step
            groups.append(g)
        # param_groups as one JSON string: DCP's loader flattens tensor-free containers differently from
        # its saver when it reads the checkpoint as an older format ("Missing key ... param_groups").
        return {"format": "shardopt-sharded", "param_groups": json.dumps(groups), "state": state}

    def load_sharded_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Collective. After dcp.load into sharded_state_dict()'s tensors (which view the engine's
        buffers): takes the step and hyperparameters, copies any shard that is not already a view
        of this optimizer's buffers, and all-gathers the parameters from the loaded masters."""
        if state_dict.get("format") != "shardopt-sharded":
            raise ValueError("load_sharded_state_dict: not a sharded_state_dict() (missing format 'shardopt-sharded')")
        saved_groups = json.loads(state_dict["param_groups"])
        for g in saved_groups:
            if g.get("betas") is not None:
                g["betas"] = tuple(g["betas"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"load_sharded_state_dict: {len(saved_groups)} param groups saved, "
                             f"{len(self.param_groups)} here")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if list(saved["params"]) != list(group["param_names"]):
                raise ValueError(f"load_sharded_state_dict: param group {gi} has parameters {saved['params']} saved "
                                 f"but {group['param_names']} here")
            engine = self._engines[gi]
            names = group["param_names"]
            for t, sname, offset, _, view in engine.state_ranges():
                entry = state_dict["state"].get(names[t], {})
                key = _STATE_NAMES[sname]
                if key not in entry:
                    raise ValueError(f"load_sharded_state_dict: parameter '{names[t]}' lacks state '{key}'")
                mine = self._wrap(view)
                for shard in entry[key].local_shards():
                    if shard.metadata.shard_offsets[0] == offset and shard.tensor.data_ptr() != mine.data_ptr():
                        mine.copy_(shard.tensor.reshape(-1))
            engine.optimizer_step = int(saved["step"])
            for k, v in saved.items():
                if k not in ("params", "step", "param_names"):
                    group[k] = v
            group["matrix_lr_shown_"] = group["matrix_lr"]
            engine.refresh_params()

    def save(self, root: str) -> List[str]:
        """Collective. Writes shardopt's resharding checkpoint (runtime/checkpoint_io.h) of every
        param group: <root>/ckpt-<step> (one group) or <root>/group<i>/ckpt-<step>. Returns the
        directories; load() takes the same list (or the one path)."""
        dirs = []
        for gi, engine in enumerate(self._engines):
            sub = root if len(self._engines) == 1 else os.path.join(root, f"group{gi}")
            lrs = {"lr": repr(float(self.param_groups[gi]["lr"]))}
            dirs.append(engine.save(sub, lrs))
        return dirs

    def load(self, dirs) -> None:
        """Collective. Loads checkpoints written by save() at any world size, stage or layout; the
        parameters (masters) and optimizer states come from the checkpoint."""
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        if len(dirs) != len(self._engines):
            raise ValueError(f"load: {len(dirs)} checkpoint directories for {len(self._engines)} param groups")
        for gi, (engine, d) in enumerate(zip(self._engines, dirs)):
            extra = engine.load(os.fspath(d))
            if "lr" in extra:
                self.param_groups[gi]["lr"] = float(extra["lr"])
