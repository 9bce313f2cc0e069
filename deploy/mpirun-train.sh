#!/usr/bin/env bash
# Usage: deploy/mpirun-train.sh NP [HOSTFILE] -- [shardopt train flags...]
#   deploy/mpirun-train.sh 4 -- --optimizer muon --steps 500          (one host)
#   deploy/mpirun-train.sh 16 deploy/hostfile.example -- --stage 3     (several hosts)
# On one host the shared-memory transport is used (btl self,vader); across hosts OpenMPI picks TCP or
# its fastest transport unless OMPI_MCA_btl says otherwise.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
np="${1:?number of ranks}"; shift
hostfile=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then hostfile="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
args=(--bind-to none -x OPENBLAS_NUM_THREADS -x SHARDOPT_COMM_TIMEOUT_MS -x SHARDOPT_COMM_CHECKED)
if [ -n "$hostfile" ]; then
  args+=(--hostfile "$hostfile")
else
  args+=(--oversubscribe --mca btl self,vader)
fi
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
export SHARDOPT_COMM_TIMEOUT_MS="${SHARDOPT_COMM_TIMEOUT_MS:-300000}" SHARDOPT_COMM_CHECKED="${SHARDOPT_COMM_CHECKED:-0}"
[ "$(id -u)" -eq 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec mpirun "${args[@]}" -np "$np" "$root/build/bin/shardopt" train --out "${SHARDOPT_OUT:-$root/runs/mpirun}" "$@"
