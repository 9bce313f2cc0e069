#!/usr/bin/env bash
# deploy/slurm-train.sbatch, run for real: a single-node Slurm cluster (scripts/slurm-local) takes the
# recipe with sbatch, 4 tasks on 1 node, each a shardopt rank started by srun --mpi=pmix. The job must
# end COMPLETED, its output must report a 4-rank MPI run, and its losses (loss.csv: step, train_loss,
# val_loss) must equal the same run on the threads backend. Skips (exit 77) where Slurm or munge is not
# installed (nothing is installed here: apt-get install slurmctld slurmd slurm-client munge) or the
# daemons cannot start.
# Usage: slurm_recipe_test.sh SHARDOPT_BINARY SOURCE_DIR WORK_DIR
set -uo pipefail
bin="$1"
src="$2"
work="$3"
rm -rf "$work"
mkdir -p "$work"
cluster="$work/cluster"
"$src/scripts/slurm-local" start "$cluster" || exit $?
trap '"$src/scripts/slurm-local" stop "$cluster"' EXIT
export SLURM_CONF="$cluster/slurm.conf"
PATH="$PATH:/usr/sbin"

train=(--d-model 32 --layers 2 --heads 2 --context 16 --batch 8 --steps 6 --eval-every 3 --log-every 0
       --trace-steps 0 --sample-chars 0 --data "$src/data/tinyshakespeare.txt")
"$bin" train "${train[@]}" --backend threads --ranks 4 --out "$work/threads" > "$work/threads.log" 2>&1 ||
  { echo "FAIL: threads run"; cat "$work/threads.log"; exit 1; }

cd "$work"
job=$(SHARDOPT_ROOT="$work" SHARDOPT_BIN="$bin" sbatch --parsable --wait --nodes=1 --ntasks-per-node=4 \
        --time=00:05:00 "$src/deploy/slurm-train.sbatch" "${train[@]}")
rc=$?
out="$work/shardopt-$job.out"
[ $rc -eq 0 ] || { echo "FAIL: sbatch --wait exited $rc (job $job)"; cat "$out" 2>/dev/null; tail -20 "$cluster/log/slurmd.log"; exit 1; }
grep -aq "6 steps, 4 ranks on mpi" "$out" || { echo "FAIL: job $job did not report a 4-rank MPI run"; cat "$out"; exit 1; }
run="$work/runs/slurm-$job"
cut -d, -f1-3 "$work/threads/loss.csv" > threads.cols
cut -d, -f1-3 "$run/loss.csv" > slurm.cols
[ "$(wc -l < threads.cols)" -eq 7 ] || { echo "FAIL: expected 6 steps"; cat threads.cols; exit 1; }
cmp -s threads.cols slurm.cols || { echo "FAIL: the Slurm run differs from the threads run"; diff threads.cols slurm.cols; exit 1; }
echo "PASS: sbatch deploy/slurm-train.sbatch (job $job): 4 tasks via srun --mpi=pmix == 4 threads"
