#!/usr/bin/env python3
"""Scaling sweep with scripts/simulate: step time and phases over rank counts (owned vs dim0), the
outer-step latency of NoLoCo vs DiLoCo over replica counts, and a straggler (one slow host) per phase.
Writes a markdown table and JSON lines into OUT_DIR and, when gnuplot is installed,
OUT_DIR/sim_scaling.png. Each row records the simulation's own wall time (simulation_wall_seconds).

usage: sim/sweep.py --platform sim/platforms/cpu-cluster.xml --preset llama-1b --ranks 2,4,...,1024
                    [--bucket-mib auto] [--outer-ranks-per-replica 1] [--replicas 8,...,1024]
                    [--straggler cpu-5:0.5 --straggler-ranks 16] [--out docs/img]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def simulate(platform, ranks, *args):
    out = subprocess.run([os.path.join(ROOT, "scripts/simulate"), "--platform", platform, "--ranks", str(ranks),
                          "--json", *args], check=True, capture_output=True, text=True).stdout
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--platform", default=os.path.join(ROOT, "sim/platforms/cpu-cluster.xml"))
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--layers", default="0")
    ap.add_argument("--ranks", default="2,4,8,16,32,64,128,256")
    ap.add_argument("--bucket-mib", default="auto")
    ap.add_argument("--replicas", default="8,16,32,64,128")
    ap.add_argument("--outer-ranks-per-replica", type=int, default=1)
    ap.add_argument("--outer-preset", default="tiny",
                    help="model of the outer-step rows (one rank per replica holds the whole model: DiLoCo's "
                         "all-reduce of llama-1b per rank does not fit in memory here)")
    ap.add_argument("--layouts", default="owned,dim0")
    ap.add_argument("--straggler", default="", help="HOST:FACTOR: also simulate --straggler-ranks with that host slow")
    ap.add_argument("--straggler-ranks", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/img"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    common = ["--preset", a.preset, "--layers", a.layers, "--stage", "2", "--bucket-mib", a.bucket_mib]
    step_rows, outer_rows = [], []
    with open(os.path.join(a.out, "sim_scaling.jsonl"), "w") as log:
        for n in [int(x) for x in a.ranks.split(",")]:
            for layout in a.layouts.split(","):
                r = simulate(a.platform, n, *common, "--layout", layout)
                step_rows.append(r)
                log.write(json.dumps(r) + "\n")
                log.flush()
                print(f"N={n} {layout}: step {r['predicted_step_seconds']:.3f} s", file=sys.stderr)
        for rep in [int(x) for x in a.replicas.split(",")]:
            for sync in ("diloco", "noloco"):
                outer_common = ["--preset", a.outer_preset, "--stage", "2", "--bucket-mib", a.bucket_mib]
                r = simulate(a.platform, rep * a.outer_ranks_per_replica, *outer_common, "--layout", "dim0",
                             "--sync", sync, "--replicas", str(rep))
                outer_rows.append(r)
                log.write(json.dumps(r) + "\n")
                log.flush()
                print(f"R={rep} {sync}: outer {r['predicted_outer_step_seconds']:.3f} s", file=sys.stderr)

        straggler_rows = []
        if a.straggler:
            for slow in ("", a.straggler):
                extra = ["--slow-host", slow] if slow else []
                r = simulate(a.platform, a.straggler_ranks, *common, "--layout", "dim0", *extra)
                r["straggler"] = slow or "none"
                straggler_rows.append(r)
                log.write(json.dumps(r) + "\n")
                log.flush()

    phases = ["reduce_scatter", "check", "elementwise", "ns", "dim0_exchange", "all_gather"]
    lines = ["| N | layout | buckets | step s | " + " | ".join(f"{p} s" for p in phases) +
             " | bytes sent/rank (mean) | simulation wall s |", "|" + "---|" * (len(phases) + 6)]
    for r in step_rows:
        lines.append(f"| {r['ranks']} | {r['layout']} | {r['buckets']} | {r['predicted_step_seconds']:.3f} | " +
                     " | ".join(f"{r[f'predicted_{p}_seconds']:.3f}" for p in phases) +
                     f" | {r['bytes_sent_per_rank_mean']:,.0f} | {r['simulation_wall_seconds']:.1f} |")
    lines += ["", "| replicas | ranks | sync | outer step s | exchange s | all-gather s | outer bytes sent/rank | "
              "simulation wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in outer_rows:
        lines.append(f"| {r['replicas']} | {r['ranks']} | {r['sync']} | {r['predicted_outer_step_seconds']:.4f} | "
                     f"{r['predicted_outer_exchange_seconds']:.4f} | {r['predicted_outer_all_gather_seconds']:.4f} | "
                     f"{r['outer_bytes_sent_per_rank']:,} | {r['simulation_wall_seconds']:.1f} |")
    if straggler_rows:
        lines += ["", "| slow host | step s | " + " | ".join(f"{p} s" for p in phases) +
                  " | slowest compute rank (s) | fastest compute rank (s) |", "|" + "---|" * (len(phases) + 4)]
        for r in straggler_rows:
            lines.append(f"| {r['straggler']} | {r['predicted_step_seconds']:.3f} | " +
                         " | ".join(f"{r[f'predicted_{p}_seconds']:.3f}" for p in phases) +
                         f" | {r['slowest_compute_rank']} ({r['slowest_compute_seconds']:.3f}) | "
                         f"{r['fastest_compute_rank']} ({r['fastest_compute_seconds']:.3f}) |")
    with open(os.path.join(a.out, "sim_scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    if shutil.which("gnuplot"):
        data = os.path.join(a.out, "sim_scaling.dat")
        with open(data, "w") as f:
            for layout in ("owned", "dim0"):
                f.write(f"# {layout}: N step rs ns ag\n")
                for r in step_rows:
                    if r["layout"] == layout:
                        f.write(f"{r['ranks']} {r['predicted_step_seconds']} {r['predicted_reduce_scatter_seconds']} "
                                f"{r['predicted_ns_seconds']} {r['predicted_all_gather_seconds']}\n")
                f.write("\n\n")
            for sync in ("diloco", "noloco"):
                f.write(f"# {sync}: replicas outer\n")
                for r in outer_rows:
                    if r["sync"] == sync:
                        f.write(f"{r['replicas']} {r['predicted_outer_step_seconds']}\n")
                f.write("\n\n")
        png = os.path.join(a.out, "sim_scaling.png")
        script = f"""
set terminal pngcairo size 1200,480
set output '{png}'
set multiplot layout 1,2
set logscale x 2
set xlabel 'ranks'; set ylabel 'simulated seconds'; set key top left
set title 'Optimizer step ({a.preset}, stage 2, {os.path.basename(a.platform)})'
plot '{data}' index 0 using 1:2 with linespoints title 'owned step', \\
     '{data}' index 0 using 1:3 with lines dt 2 title 'owned reduce-scatter', \\
     '{data}' index 1 using 1:2 with linespoints title 'dim0 step', \\
     '{data}' index 1 using 1:3 with lines dt 2 title 'dim0 reduce-scatter', \\
     '{data}' index 1 using 1:4 with lines dt 3 title 'NS (max rank)'
set xlabel 'replicas ({a.outer_ranks_per_replica} ranks each)'
set title 'Outer step latency'
plot '{data}' index 2 using 1:2 with linespoints title 'DiLoCo (all-reduce)', \\
     '{data}' index 3 using 1:2 with linespoints title 'NoLoCo (pairwise)'
unset multiplot
"""
        subprocess.run(["gnuplot"], input=script, text=True, check=True)
        print(f"wrote {png}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
