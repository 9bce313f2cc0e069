#!/usr/bin/env bash
# A whole node killed mid-run (SIGKILL to every process of namespace so1: its MPI daemon and its 2
# ranks, as when a machine dies) ends the job instead of hanging it: mpirun exits non-zero within 60 s
# of the kill. The checkpoints published before the kill are complete: `shardopt ckpt inspect`
# verifies the latest one and a threads run resumes from it and finishes.
# Usage: node_killed_test.sh SHARDOPT_BINARY NETNS_MPIRUN WORK_DIR CORPUS
# Exit 77 (skip) when the namespaces cannot be made here.
set -uo pipefail
bin="$1"
netns="$2"
work="$3"
corpus="$4"
rm -rf "$work"
mkdir -p "$work"
cd "$work"
run=(train --d-model 32 --layers 2 --heads 2 --context 16 --batch 8 --eval-every 100000 --log-every 0
     --trace-steps 0 --sample-chars 0 --data "$corpus" --ckpt-dir "$work/ckpt")

"$netns" --nodes 2 --per-node 2 -- "$bin" "${run[@]}" --save-every 5 --steps 100000 --backend mpi --out "$work/nodes" \
  > nodes.log 2>&1 &
job=$!
# Wait for two published checkpoints (a folder without the .tmp suffix is complete by construction).
published() { find "$work/ckpt" -maxdepth 1 -name 'ckpt-*' ! -name '*.tmp' 2>/dev/null | wc -l; }
for _ in $(seq 1200); do
  [ "$(published)" -ge 2 ] && break
  kill -0 $job 2>/dev/null || break
  sleep 0.1
done
if ! kill -0 $job 2>/dev/null; then
  wait $job
  rc=$?
  if [ $rc -eq 77 ]; then cat nodes.log; exit 77; fi
  echo "FAIL: the job ended (exit $rc) before it was killed"; cat nodes.log; exit 1
fi
[ "$(published)" -ge 2 ] || { echo "FAIL: no two checkpoints within 120 s"; kill $job; cat nodes.log; exit 1; }

pids=$(ip netns pids so1)
[ -n "$pids" ] || { echo "FAIL: no processes in namespace so1"; kill $job; exit 1; }
killed_at=$(date +%s)
kill -9 $pids
for _ in $(seq 900); do kill -0 $job 2>/dev/null || break; sleep 0.1; done
if kill -0 $job 2>/dev/null; then
  echo "FAIL: the job still runs 90 s after node so1 was killed"; kill -9 $job; cat nodes.log; exit 1
fi
wait $job
rc=$?
elapsed=$(( $(date +%s) - killed_at ))
[ $rc -ne 0 ] || { echo "FAIL: mpirun exited 0 after a node was killed"; cat nodes.log; exit 1; }
[ $elapsed -le 60 ] || { echo "FAIL: the job took $elapsed s to end after the kill"; cat nodes.log; exit 1; }

latest=$(find "$work/ckpt" -maxdepth 1 -name 'ckpt-*' ! -name '*.tmp' | sort -V | tail -1)
step=${latest##*ckpt-}
"$bin" ckpt inspect "$latest" > inspect.log 2>&1 || { echo "FAIL: ckpt inspect $latest"; cat inspect.log; exit 1; }
"$bin" "${run[@]}" --steps $((step + 3)) --backend threads --ranks 4 --resume "$latest" \
  --out "$work/resumed" > resumed.log 2>&1 || { echo "FAIL: resume from $latest"; cat resumed.log; exit 1; }
[ "$(wc -l < "$work/resumed/loss.csv")" -ge 2 ] || { echo "FAIL: the resumed run wrote no steps"; exit 1; }
echo "PASS: node so1 killed after step $step was saved: job ended in $elapsed s (exit $rc); ckpt-$step verified and resumed"
