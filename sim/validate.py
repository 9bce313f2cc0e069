#!/usr/bin/env python3
"""Validation of the simulation on this machine: the same configurations run for real (bench/step's
step_bench under mpirun: Engine::step() on the MPI backend) and simulated (scripts/simulate on
sim/platforms/local-2core.xml). Prints one JSON object per configuration with the measured and predicted
phase times and predicted_over_measured per phase (docs/simulation.md has the table).

usage: sim/validate.py [--ranks 2,4] [--layouts owned,dim0] [--preset llama-125m] [--layers 2]
                       [--build build] [--sim-build build-sim] [--steps 2]
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (simulation field, step_bench field)
PHASES = [("step", "step_seconds"), ("reduce_scatter", "reduce_wait_seconds"), ("check", "check_seconds"),
          ("elementwise", "elementwise_seconds"), ("ns", "matrix_seconds"),
          ("dim0_exchange", "dim0_exchange_seconds"), ("all_gather", "gather_seconds")]


def last_json(text):
    return json.loads([l for l in text.splitlines() if l.startswith("{")][-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--layouts", default="owned,dim0")
    ap.add_argument("--preset", default="llama-125m")
    ap.add_argument("--layers", default="2")
    ap.add_argument("--stage", default="2")
    ap.add_argument("--steps", default="2")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--sim-build", default=os.path.join(ROOT, "build-sim"))
    a = ap.parse_args()
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OPENBLAS_NUM_THREADS="1")
    for n in a.ranks.split(","):
        for layout in a.layouts.split(","):
            real = subprocess.run(
                ["mpirun", "--oversubscribe", "--mca", "btl", "self,vader", "--bind-to", "none", "-np", n,
                 os.path.join(a.build, "bench/step/step_bench"), "--json", "--shapes", a.preset, "--layers", a.layers,
                 "--stages", a.stage, "--layouts", layout, "--steps", a.steps],
                check=True, capture_output=True, text=True, env=env).stdout
            measured = last_json(real)
            sim = subprocess.run(
                [os.path.join(ROOT, "scripts/simulate"), "--platform", os.path.join(ROOT, "sim/platforms/local-2core.xml"),
                 "--ranks", n, "--sim-build", a.sim_build, "--preset", a.preset, "--layers", a.layers,
                 "--stage", a.stage, "--layout", layout, "--json"],
                check=True, capture_output=True, text=True).stdout
            predicted = last_json(sim)
            row = {"ranks": int(n), "preset": a.preset, "layers": int(a.layers), "stage": int(a.stage), "layout": layout}
            for sim_phase, bench_field in PHASES:
                p, m = predicted[f"predicted_{sim_phase}_seconds"], measured[bench_field]
                row[f"measured_{sim_phase}_seconds"] = m
                row[f"predicted_{sim_phase}_seconds"] = p
                row[f"predicted_over_measured_{sim_phase}"] = p / m if m > 0 else None
            row["measured_bytes_sent_per_rank"] = measured["bytes_sent_per_rank"]
            row["predicted_bytes_sent_per_rank_max"] = predicted["bytes_sent_per_rank_max"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
