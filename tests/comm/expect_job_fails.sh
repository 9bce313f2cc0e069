#!/usr/bin/env bash
# Usage: expect_job_fails.sh SECONDS command...
# Passes when the command exits non-zero within SECONDS; fails when it succeeds or hangs.
set -u
limit="$1"
shift
start=$(date +%s)
timeout --kill-after=5 "$limit" "$@"
rc=$?
took=$(( $(date +%s) - start ))
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "FAIL: the job was still running after ${limit} s (rc $rc)"
  exit 1
fi
if [ "$rc" -eq 0 ]; then
  echo "FAIL: the job succeeded although a rank died"
  exit 1
fi
echo "PASS: the job failed with status $rc after ${took} s"
