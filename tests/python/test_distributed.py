"""N ranks (torchrun/gloo and mpirun/MPI) against one process: same losses and parameters for
stages 1-2, owned and dim0 layouts, sharded (ZeRO-2) and full gradient memory, 2 micro-batches per
step against one big batch; gradient memory per rank as each mode's formula says; a checkpoint saved
at 2 ranks resumes at 3; ranks that disagree on a parameter's shape fail with its name."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
from dist_worker import CONFIGS as WORKER_CONFIGS, config_name  # noqa: E402
from memory_formula import check_grad_memory  # noqa: E402

CONFIGS = [config_name(*c) for c in WORKER_CONFIGS]
# Micro-batched runs equal the one-process run on whole batches of the same stage, layout and mode.
REFERENCE = {c: c.replace("-accum2", "") for c in CONFIGS}
REL = 1e-5


def env():
    e = dict(os.environ)
    e.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return e


def launch(cmd, timeout=400):
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def torchrun(n, *args):
    return launch([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                   "--master-port", str(29400 + n + os.getpid() % 500), WORKER, *args])


def mpirun(n, *args):
    mpiexec = shutil.which("mpirun")
    if mpiexec is None:
        pytest.skip("mpirun not found")
    return launch([mpiexec, "--oversubscribe", "--mca", "btl", "self,vader", "--bind-to", "none", "-np", str(n),
                   sys.executable, WORKER, *args])


def load(out, n):
    return [torch.load(f"{out}.rank{r}.pt") for r in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    launch([sys.executable, WORKER, str(d / "one")])
    two_out = torchrun(2, str(d / "two"), "--save", str(d / "ckpt"), "--save-at", "3", "--mismatch")
    torchrun(3, str(d / "three"), "--resume", str(d / "ckpt" / "ckpt-3"), "--resume-at", "3",
             "--resume-dcp", str(d / "ckpt" / "dcp"))
    return {"one": load(d / "one", 1)[0], "two": load(d / "two", 2), "three": load(d / "three", 3), "dir": d,
            "two_stdout": two_out}


def assert_same_as_one_process(one, ranks, config, first_step=0):
    world = len(ranks)
    # Each rank's loss is the mean over its equal slice of the global batch: their mean is the loss
    # one process computes on the whole batch.
    losses = [sum(r[config]["losses"][i] for r in ranks) / world for i in range(len(ranks[0][config]["losses"]))]
    assert losses == pytest.approx(one["losses"][first_step:], rel=REL)
    for r, result in enumerate(ranks):
        for name, ref in one["params"].items():
            got = result[config]["params"][name]
            scale = ref.abs().max().item()
            assert (got - ref).abs().max().item() <= REL * scale, f"rank {r}/{world} {config} {name}"
        # state_dict(): the gathered optimizer state, whatever the world, equals one process's.
        for name, ref_state in one["state"].items():
            for key, ref in ref_state.items():
                got = result[config]["state"][name][key]
                assert got.shape == ref.shape, f"rank {r}/{world} {config} {name} {key}"
                scale = ref.abs().max().item()
                # exp_avg_sq holds squared gradients: twice the gradients' relative rounding.
                assert (got - ref).abs().max().item() <= 10 * REL * scale, f"rank {r}/{world} {config} {name} {key}"


@pytest.mark.parametrize("config", CONFIGS)
def test_torchrun_two_ranks_equal_one_process(runs, config):
    assert_same_as_one_process(runs["one"][REFERENCE[config]], runs["two"], config)


@pytest.mark.parametrize("config", CONFIGS)
def test_torchrun_three_ranks_equal_one_process(runs, config):
    assert_same_as_one_process(runs["one"][REFERENCE[config]], runs["three"], config)


@pytest.mark.parametrize("config", CONFIGS)
def test_gradient_memory_per_rank_matches_each_modes_formula(runs, config):
    stage, layout, grad_memory, accumulation = WORKER_CONFIGS[CONFIGS.index(config)]
    sharded = stage >= 2 and grad_memory == "sharded"
    for world in ("one", "two", "three"):
        ranks = [runs[world]] if world == "one" else runs[world]
        shard_elems = 0
        for r, result in enumerate(ranks):
            res = result[config]
            check_grad_memory(res["memory"], res["buckets"], res["numels"], sharded, layout == "dim0", accumulation,
                              f"{world} rank {r} {config}")
            shard_elems += res["memory"]["grad_shard_bytes"] // 4
        # Each gradient element is reduced onto exactly one rank: the shards add up to the buckets.
        assert shard_elems == sum(n for n, _, _ in ranks[0][config]["buckets"])


def test_saved_at_two_ranks_resumed_at_three_equals_uninterrupted(runs):
    # Steps 3..5 after loading the 2-rank checkpoint of step 3 at 3 ranks.
    resumed = [{"resume": r["resume"]} for r in runs["three"]]
    assert_same_as_one_process(runs["one"]["2-owned"], resumed, "resume", first_step=3)


def test_dcp_saved_at_two_ranks_resumed_at_three_in_another_layout_equals_uninterrupted(runs):
    # torch.distributed.checkpoint of model.state_dict() + opt.sharded_state_dict() at 2 ranks (owned
    # layout), loaded at 3 ranks into a dim0 optimizer built from another seed: steps 3..5 as uninterrupted.
    resumed = [{"resume_dcp": r["resume_dcp"]} for r in runs["three"]]
    assert_same_as_one_process(runs["one"]["2-dim0"], resumed, "resume_dcp", first_step=3)


def test_mpirun_two_ranks_equal_one_process(runs):
    out = runs["dir"] / "mpi"
    mpirun(2, str(out))
    ranks = load(out, 2)
    for config in CONFIGS:
        assert_same_as_one_process(runs["one"][REFERENCE[config]], ranks, config)


def test_ranks_with_different_shapes_fail_naming_the_parameter(runs):
    out = runs["two_stdout"]
    # The launcher relays both ranks' output concurrently, so their lines can run together: find each
    # rank's report by its prefix rather than by line.
    reports = {}
    for r in (0, 1):
        prefix = f"rank {r}: ValueError: ranks disagree on the engine configuration"
        assert out.count(prefix) == 1, out
        start = out.index(prefix)
        other = out.find(f"rank {1 - r}: ValueError:", start + 1)
        reports[r] = out[start:other if other > start else len(out)]
    assert "parameter 'lm_head.weight'" in reports[1], out


def test_torchrun_two_ranks_clip_grad_norm_equals_torch(runs):
    """opt.clip_grad_norm_ at 2 ranks (each on half the batch) against torch.nn.utils.clip_grad_norm_ +
    torch.optim.AdamW in one process on the whole batch: same returned norms, same parameters."""
    from dist_worker import CLIP_MAX_NORM, STEPS as WORKER_STEPS
    from gpt_model import GPT, batch
    ref = GPT()
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.01)
    ref_norms = []
    for step in range(WORKER_STEPS):
        x, y = batch(step)
        ref(x, y).backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP_MAX_NORM).item())
        opt.step()
        opt.zero_grad()
    assert max(ref_norms) > CLIP_MAX_NORM  # the clip changes the run
    for r, result in enumerate(runs["two"]):
        assert result["clip"]["norms"] == pytest.approx(ref_norms, rel=1e-4), f"rank {r}"
        for name, p in ref.named_parameters():
            got = result["clip"]["params"][name]
            assert (got - p.detach()).abs().max().item() <= 1e-4 * p.abs().max().item(), f"rank {r} {name}"
