#!/usr/bin/env bash
# A training run across 2 "nodes" (network namespaces, scripts/netns-mpirun: 2 ranks each, TCP between
# them) equals the same run on the threads backend in one process: the train and validation losses of
# every step (loss.csv columns step, train_loss, val_loss) are identical.
# Usage: train_across_nodes_test.sh SHARDOPT_BINARY NETNS_MPIRUN WORK_DIR CORPUS [extra train flags...]
# Exit 77 (skip) when the namespaces cannot be made here.
set -uo pipefail
bin="$1"
netns="$2"
work="$3"
corpus="$4"
shift 4
rm -rf "$work"
mkdir -p "$work"
cd "$work"
run=(train --d-model 32 --layers 2 --heads 2 --context 16 --batch 8 --steps 6 --eval-every 3 --log-every 0
     --trace-steps 0 --sample-chars 0 --data "$corpus" "$@")

"$bin" "${run[@]}" --backend threads --ranks 4 --out "$work/threads" > threads.log 2>&1 ||
  { echo "FAIL: threads run"; cat threads.log; exit 1; }
"$netns" --nodes 2 --per-node 2 -- "$bin" "${run[@]}" --backend mpi --out "$work/nodes" > nodes.log 2>&1
rc=$?
if [ $rc -eq 77 ]; then cat nodes.log; exit 77; fi
[ $rc -eq 0 ] || { echo "FAIL: run across namespaces exited $rc"; cat nodes.log; exit 1; }
grep -aq "4 ranks on mpi" nodes.log || { echo "FAIL: not a 4-rank MPI run"; cat nodes.log; exit 1; }
cut -d, -f1-3 "$work/threads/loss.csv" > threads.cols
cut -d, -f1-3 "$work/nodes/loss.csv" > nodes.cols
[ "$(wc -l < threads.cols)" -eq 7 ] || { echo "FAIL: expected 6 steps"; cat threads.cols; exit 1; }
cmp -s threads.cols nodes.cols || { echo "FAIL: the run across nodes differs from the threads run"; diff threads.cols nodes.cols; exit 1; }
echo "PASS: 4 ranks on 2 nodes over TCP == 4 threads ($*)"
