#!/usr/bin/env python3
"""16-rank simulations of sim/step_sim under SimGrid SMPI (scripts/simulate), checked against
quantities computed independently of the simulator:

1. Bytes: the mean bytes a rank sends in one step equal the ZeRO arithmetic on the plan's bucket
   buffers (2 Psi'(N-1)/N for stage 2) + the dim0 Muon exchange + the check all-reduce, to the byte.
2. Bandwidth: going from 2 to 4 transformer layers, reduce-scatter + all-gather grow by the extra
   bytes a rank sends divided by the link bandwidth read from the platform file (each rank sends and
   receives at once on its full-duplex link; SMPI's bandwidth/latency correction factors are set to 1
   and its ACK cross-traffic model is off),
   within a tolerance derived from the same file: the latency of the extra messages on top, and a
   relative 5% for the store-and-forward and pipelining of the ompi algorithms.
3. Slow host: a host at 0.5x speed doubles the modelled compute of its rank exactly and no other's.
5. `shardopt simulate` (when its path is given) prints the same prediction as scripts/simulate for the
   same options, as text and as JSON (dim0, DiLoCo and a training step, so that no option can silently
   fall back to its default).
4. NoLoCo's pairwise exchange: with 2, 8 and 16 replicas on the same 16 hosts (disjoint pairs on a
   non-blocking switch), the exchange takes the bytes a rank sends / the link bandwidth, within 2% and
   a few latencies, whatever the number of pairs (SMPI's injected MPI_Test time once made it grow).
7. Slow link: h5's own links at 0.5x bandwidth double reduce-scatter + all-gather (ring steps wait for
   the slowest link; bandwidth-bound at 1 GB/s), name those two links, and leave the bytes unchanged.
6. Messages of 2 GiB: SMPI 3.32 copies (and with payloads off never frees) a message of 2^31 bytes or
   more, so step_sim refuses a bucket that large with an error naming it, and runs one just below.
8. Training step (--tokens-per-rank): the forward and backward take the FLOPs of the formula computed
   here from the preset's shape (2·P·T + 4·L·S·d·T forward, twice that backward, P = the 2-D tensors
   except the embedding) x shardopt_flops_per_model_flop / host speed; on a link so fast that
   communication is ~0 the training step is forward + backward + the optimizer step of a step-only run;
   on the 1 GB/s link the reduce-scatters overlap the backward: the exposed part is below the total
   (which equals the step-only run's) and at least the last bucket's reduce-scatter (it starts when the
   backward has ended).
9. The reference transformer (--preset reference: what `shardopt train` trains, for sim/validate.py
   --train): its forward takes model::Transformer::forward_flops' count, computed here from the shape
   (per layer 2·n·(4d² + 2·d·4d) + 4·B·S²·d, plus the LM head 2·n·d·256; n = B·S tokens) x
   shardopt_flops_per_model_flop / host speed, the backward twice that on the fast link; the bytes sent
   are the ZeRO formula on its plan; tokens that are not whole sequences are refused.

usage: check_step_sim.py SCRIPTS_SIMULATE SIM_BUILD_DIR NETWORK_PLATFORM_XML COMPUTE_PLATFORM_XML [SHARDOPT]
(the first platform has negligible compute, the second the same network with hosts named h0..h15)
Exit 77 (CTest skip) when smpirun is not installed.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

SKIP = 77


def main():
    simulate, build, platform, compute_platform = sys.argv[1:5]
    shardopt = sys.argv[5] if len(sys.argv) > 5 else None
    if shutil.which("smpirun") is None:
        print("SKIPPED: SimGrid (smpirun) is not installed; scripts/setup installs simgrid libsimgrid-dev")
        return SKIP
    if not os.access(os.path.join(build, "bin", "step_sim"), os.X_OK):
        print(f"SKIPPED: {build}/bin/step_sim is not built (the build found no smpicxx when it was configured)")
        return SKIP
    root = ET.fromstring(re.sub(r"<!DOCTYPE[^>]*>", "", open(platform).read()))
    cluster = next(root.iter("cluster"))
    bw = parse_unit(cluster.get("bw"), {"GBps": 1e9, "MBps": 1e6, "Bps": 1})
    lat = parse_unit(cluster.get("lat"), {"us": 1e-6, "ms": 1e-3, "s": 1})
    ranks = 16
    cfg = ["--cfg=smpi/bw-factor:0:1", "--cfg=smpi/lat-factor:0:1", "--cfg=network/crosstraffic:0"]

    def run(*args, on=platform, preset="llama-125m"):
        cmd = [simulate, "--platform", on, "--ranks", str(ranks), "--sim-build", build, *cfg,
               "--preset", preset, "--stage", "2", "--json", *args]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    failures = []
    tmp = tempfile.TemporaryDirectory()
    small = run("--layout", "dim0", "--layers", "2")
    large = run("--layout", "dim0", "--layers", "4")
    for r in (small, large):
        expected = r["zero_formula_bytes_per_rank"] + r["dim0_extra_formula_bytes_per_rank"] + \
            r["check_allreduce_bytes_per_rank"]
        print(f"layers {r['layers']}: mean bytes sent {r['bytes_sent_per_rank_mean']:.0f}, formula {expected:.0f}")
        if abs(r["bytes_sent_per_rank_mean"] - expected) > 1:
            failures.append(f"layers {r['layers']}: mean bytes sent {r['bytes_sent_per_rank_mean']} != formula {expected}")

    # Reduce-scatter + all-gather move equal segments (dim0): every rank sends and receives the same
    # bytes, so the time is bytes / bandwidth. (The dim0 all-to-all is left out: its owner receives
    # far more than the mean, so the mean bytes do not predict it.)
    def comm_seconds(r):
        return r["predicted_reduce_scatter_seconds"] + r["predicted_all_gather_seconds"]

    extra_bytes = large["zero_formula_bytes_per_rank"] - small["zero_formula_bytes_per_rank"]
    predicted = extra_bytes / bw
    # Extra messages: ring-type algorithms take N-1 steps per collective, one latency each.
    extra_buckets = large["buckets"] - small["buckets"]
    latency_bound = 2 * extra_buckets * (ranks - 1) * lat * 4
    got = comm_seconds(large) - comm_seconds(small)
    lo, hi = predicted, predicted * 1.05 + latency_bound
    print(f"extra communication: {got:.6f} s for {extra_bytes:.0f} extra bytes per rank; "
          f"bandwidth predicts {predicted:.6f} s, allowed [{lo:.6f}, {hi:.6f}]")
    if not lo * (1 - 1e-9) <= got <= hi:
        failures.append(f"extra communication {got} s outside [{lo}, {hi}]")

    base = run("--layout", "owned", "--layers", "2", on=compute_platform)
    slow = run("--layout", "owned", "--layers", "2", "--slow-host", "h5:0.5", on=compute_platform)
    print(f"slow host h5 (rank 5): slowest compute rank {slow['slowest_compute_rank']} "
          f"{slow['slowest_compute_seconds']:.6f} s; without it rank {base['slowest_compute_rank']} "
          f"{base['slowest_compute_seconds']:.6f} s")
    per_base, per_slow = base["per_rank_compute_seconds"], slow["per_rank_compute_seconds"]
    for r in range(ranks):
        want = per_base[r] * (2 if r == 5 else 1)
        if abs(per_slow[r] - want) > 1e-6 * want + 1e-9:
            failures.append(f"rank {r}: compute {per_slow[r]} s with h5 at 0.5x, expected {want} s")
    if per_base[5] <= 0:
        failures.append("rank 5 has no modelled compute: the slow-host check would prove nothing")

    # On a 100 Gb/s copy of the network platform: the exchange lasts milliseconds, so simulated time
    # that does not come from the bytes (100 us per injected MPI_Test) shows.
    fast_bw, fast = 12.5e9, os.path.join(tmp.name, "fast16.xml")
    with open(fast, "w") as f:
        f.write(re.sub(r'bw="[^"]*"', 'bw="12.5GBps"', open(platform).read(), count=1))
    for replicas in (2, 8, 16):
        r = run("--layout", "dim0", "--layers", "2", "--sync", "noloco", "--replicas", str(replicas), on=fast)
        want = r["outer_bytes_sent_per_rank"] / fast_bw
        got = r["predicted_outer_exchange_seconds"]
        lo, hi = want, want * 1.02 + 10 * lat
        print(f"noloco {replicas} replicas: exchange {got:.6f} s for {r['outer_bytes_sent_per_rank']} bytes per rank; "
              f"bandwidth predicts {want:.6f} s, allowed [{lo:.6f}, {hi:.6f}]")
        if want <= 0 or not lo * (1 - 1e-9) <= got <= hi:
            failures.append(f"noloco {replicas} replicas: exchange {got} s outside [{lo}, {hi}]")

    # llama-1b (4.4 GB in fp32): 2100 MiB buckets fill to 2.2e9 bytes >= 2^31, 1900 MiB ones stay below.
    def run_bucket(mib):
        cmd = [simulate, "--platform", platform, "--ranks", str(ranks), "--sim-build", build, *cfg,
               "--preset", "llama-1b", "--layout", "dim0", "--bucket-mib", str(mib), "--json"]
        return subprocess.run(cmd, capture_output=True, text=True)
    too_large, fits = run_bucket(2100), run_bucket(1900)
    print(f"2100 MiB buckets: exit {too_large.returncode}; 1900 MiB buckets: exit {fits.returncode}")
    if too_large.returncode == 0 or "2 GiB" not in too_large.stderr:
        failures.append(f"a 2100 MiB bucket (>= 2 GiB) ran or failed without naming the limit: exit "
                        f"{too_large.returncode}, stderr {too_large.stderr[-500:]!r}")
    if fits.returncode != 0:
        failures.append(f"1900 MiB buckets (< 2 GiB) failed: {fits.stderr[-500:]!r}")
    elif json.loads(fits.stdout.strip().splitlines()[-1])["bucket_bytes"] != 1900 << 20:
        failures.append("1900 MiB buckets: the plan was made with another bucket size")

    slow_link = run("--layout", "dim0", "--layers", "2", "--slow-link", "h5:0.5")
    ratio = comm_seconds(slow_link) / comm_seconds(small)
    print(f"slow link h5 at 0.5x: reduce-scatter + all-gather {comm_seconds(small):.6f} -> "
          f"{comm_seconds(slow_link):.6f} s (x{ratio:.4f}); links {slow_link.get('slow_links')}")
    if not 1.95 <= ratio <= 2.0 + 1e-9:
        failures.append(f"slow link h5 at 0.5x: communication x{ratio}, expected x2 (within 2.5%)")
    if sorted(slow_link.get("slow_links", [])) != ["flat_link_5_DOWN", "flat_link_5_UP"]:
        failures.append(f"slow link h5: slowed {slow_link.get('slow_links')}, expected flat_link_5_UP and _DOWN")
    if slow_link["bytes_sent_per_rank_mean"] != small["bytes_sent_per_rank_mean"]:
        failures.append("slow link: the bytes sent changed")

    if shardopt:
        train = ["--tokens-per-rank", "256", "--seq-len", "128"]
        opts = ["--preset", "llama-125m", "--layers", "2", "--stage", "2", "--layout", "dim0", "--sync", "diloco",
                "--replicas", "4", *train]
        script = run("--layers", "2", "--layout", "dim0", "--sync", "diloco", "--replicas", "4", *train)
        cli_cmd = [shardopt, "simulate", "--platform", platform, "--ranks", str(ranks), "--sim-build", build,
                   *[c for cfg_opt in cfg for c in ("--cfg", cfg_opt.removeprefix("--cfg="))], *opts]
        cli = json.loads(subprocess.run(cli_cmd + ["--json"], check=True, capture_output=True,
                                        text=True).stdout.strip().splitlines()[-1])
        text = subprocess.run(cli_cmd, check=True, capture_output=True, text=True).stdout
        keys = [k for k in script if k.startswith("predicted_") or k.startswith("bytes_") or
                k in ("layout", "sync", "replicas", "tokens_per_rank", "seq_len")]
        diff = [k for k in keys if cli.get(k) != script[k]]
        print(f"shardopt simulate vs scripts/simulate: {len(keys) - len(diff)}/{len(keys)} fields equal; "
              f"step {cli['predicted_step_seconds']} s")
        if diff:
            failures.append("shardopt simulate differs from scripts/simulate in " +
                            ", ".join(f"{k} ({cli.get(k)} vs {script[k]})" for k in diff))
        step_line = f"predicted step         {script['predicted_step_seconds']:10.4f} s"
        if step_line not in text:
            failures.append(f"shardopt simulate's text output lacks '{step_line}':\n{text}")

    failures += check_training(run, compute_platform, tmp.name)
    failures += check_reference_model(run, os.path.join(tmp.name, "train16-fast.xml"), compute_platform)

    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


def check_training(run, compute_platform, tmp):
    """Check 8 (module docstring)."""
    failures = []
    text = open(compute_platform).read()
    speed = parse_unit(re.search(r'speed="([^"]+)"', text).group(1), {"Gf": 1e9, "Mf": 1e6, "f": 1})
    factor, tokens, seq = 0.5, 256, 128
    # Stream passes ~free (flops_per_byte 1e-9): what is left is NS, forward/backward and the network.
    base = text.replace('<prop id="shardopt_flops_per_byte" value="1"/>',
                        '<prop id="shardopt_flops_per_byte" value="1e-9"/>'
                        f'<prop id="shardopt_flops_per_model_flop" value="{factor}"/>')
    assert base != text, "compute16.xml no longer has the flops_per_byte property this check rewrites"
    slow_path, fast_path = os.path.join(tmp, "train16.xml"), os.path.join(tmp, "train16-fast.xml")
    open(slow_path, "w").write(base)
    open(fast_path, "w").write(re.sub(r'bw="[^"]*"', 'bw="1000000GBps"', re.sub(r'lat="[^"]*"', 'lat="1ns"', base)))
    # llama-125m (presets.cc): d 768, ffn 2048, vocab 32000, 12 heads = 12 kv heads; 2 layers kept.
    d, ffn, vocab, layers = 768, 2048, 32000, 2
    product_params = layers * (4 * d * d + 3 * d * ffn) + vocab * d  # + lm_head; the embedding is a lookup
    forward = (2 * product_params * tokens + 4 * layers * seq * d * tokens) * factor / speed
    # 4 MiB buckets (the Engine's default): 17 of them, so there is a backward left to overlap with (auto
    # buckets at 16 ranks are two: every product parameter in the first, the embedding in the second).
    common = ["--layout", "dim0", "--layers", str(layers), "--bucket-mib", "4"]
    train = [*common, "--tokens-per-rank", str(tokens), "--seq-len", str(seq)]
    for name, path in (("fast link", fast_path), ("1 GB/s link", slow_path)):
        t = run(*train, on=path)
        step_only = run(*common, on=path)
        fwd, bwd = t["predicted_forward_seconds"], t["predicted_backward_seconds"]
        rs, exposed, last = (t["predicted_reduce_scatter_seconds"], t["predicted_exposed_reduce_scatter_seconds"],
                             t["predicted_last_bucket_reduce_scatter_seconds"])
        print(f"training step, {name}: {t['predicted_train_step_seconds']:.6f} s = forward {fwd:.6f} (formula "
              f"{forward:.6f}) + backward {bwd:.6f} (formula {2 * forward:.6f}) + step {t['predicted_step_seconds']:.6f}; "
              f"reduce-scatter {rs:.6f} s, exposed {exposed:.6f} s, last bucket {last:.6f} s; "
              f"step-only run: step {step_only['predicted_step_seconds']:.6f}, reduce-scatter "
              f"{step_only['predicted_reduce_scatter_seconds']:.6f} s")
        if abs(fwd - forward) > 1e-6 * forward:
            failures.append(f"{name}: forward {fwd} s, formula {forward} s")
        if abs(t["predicted_train_step_seconds"] - (fwd + bwd + t["predicted_step_seconds"])) > 1e-6:
            failures.append(f"{name}: training step is not forward + backward + step")
        if name == "fast link":
            if abs(bwd - 2 * forward) > 1e-6 * forward:
                failures.append(f"{name}: backward {bwd} s, formula {2 * forward} s")
            want = forward + 2 * forward + step_only["predicted_step_seconds"]
            if abs(t["predicted_train_step_seconds"] - want) > 1e-3 * want:
                failures.append(f"{name}: training step {t['predicted_train_step_seconds']} s, expected forward + "
                                f"backward + the step-only step = {want} s")
        else:
            if abs(rs - step_only["predicted_reduce_scatter_seconds"]) > 0.01 * rs:
                failures.append(f"{name}: overlapped reduce-scatter {rs} s differs from the step-only run's "
                                f"{step_only['predicted_reduce_scatter_seconds']} s (a bucket skipped or doubled?)")
            if not exposed < 0.9 * rs:
                failures.append(f"{name}: exposed reduce-scatter {exposed} s is not below the total {rs} s: no overlap")
            if not last * (1 - 1e-9) <= exposed:
                failures.append(f"{name}: exposed reduce-scatter {exposed} s below the last bucket's {last} s")
            if not last > 0.01:
                failures.append(f"{name}: the last bucket's reduce-scatter ({last} s) is too small to test the overlap")
    return failures


def check_reference_model(run, fast_path, compute_platform):
    """Check 9 (module docstring). fast_path: check 8's platform (factor 0.5, free streams, fast links)."""
    failures = []
    speed = parse_unit(re.search(r'speed="([^"]+)"', open(compute_platform).read()).group(1),
                       {"Gf": 1e9, "Mf": 1e6, "f": 1})
    factor, d, layers, heads, seq, batch = 0.5, 64, 2, 4, 32, 2
    n = batch * seq
    forward = (layers * (2 * n * (4 * d * d + 2 * d * 4 * d) + 4 * batch * seq * seq * d) + 2 * n * d * 256) * \
        factor / speed
    shape = ["--d-model", str(d), "--layers", str(layers), "--heads", str(heads), "--context", str(seq)]
    r = run(*shape, "--tokens-per-rank", str(n), on=fast_path, preset="reference")
    fwd, bwd = r["predicted_forward_seconds"], r["predicted_backward_seconds"]
    expected_bytes = r["zero_formula_bytes_per_rank"] + r["check_allreduce_bytes_per_rank"]
    print(f"reference model d {d}, {layers} layers, {n} tokens per rank: forward {fwd:.9f} s (formula {forward:.9f}), "
          f"backward {bwd:.9f} s; mean bytes sent {r['bytes_sent_per_rank_mean']:.0f}, formula {expected_bytes:.0f}")
    if abs(fwd - forward) > 1e-6 * forward:
        failures.append(f"reference model: forward {fwd} s, formula {forward} s")
    if abs(bwd - 2 * forward) > 1e-3 * forward:
        failures.append(f"reference model: backward {bwd} s, formula {2 * forward} s")
    if abs(r["bytes_sent_per_rank_mean"] - expected_bytes) > 1:
        failures.append(f"reference model: mean bytes sent {r['bytes_sent_per_rank_mean']}, formula {expected_bytes}")
    try:
        run(*shape, "--tokens-per-rank", str(n + 1), on=fast_path, preset="reference")
        failures.append("reference model: --tokens-per-rank that is not whole sequences was accepted")
    except subprocess.CalledProcessError as e:
        if "multiple of the sequence length" not in (e.stdout or "") + (e.stderr or ""):
            failures.append(f"reference model: unclear error for partial sequences: {e.stderr[-300:]}")
    return failures


def parse_unit(text, units):
    for suffix, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    raise ValueError(f"unknown unit in {text!r}")


if __name__ == "__main__":
    sys.exit(main())
