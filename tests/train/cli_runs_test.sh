#!/usr/bin/env bash
# The shardopt program end to end, from a working directory outside the source tree:
#  1. `train` without --data finds the source tree's corpus; the run folder holds config.json;
#  2. `train --config <out>/config.json` repeats the run: the same losses, step for step;
#  3. a flag overrides the file; an unknown key is an error naming the key;
#  4. an installed layout (<prefix>/bin/shardopt, <prefix>/share/shardopt/tinyshakespeare.txt) is
#     preferred to the source tree;
#  5. `compare` prints each run's final losses as in its summary.json and writes a PNG.
# Usage: cli_runs_test.sh SHARDOPT_BINARY WORK_DIR SOURCE_CORPUS
set -euo pipefail
bin="$1"
work="$2"
corpus="$3"
rm -rf "$work"
mkdir -p "$work/elsewhere"
cd "$work/elsewhere"
small=(--ranks 2 --d-model 32 --layers 1 --heads 2 --context 16 --batch 4 --eval-every 2 --log-every 0
       --trace-steps 0 --sample-chars 16)

"$bin" train "${small[@]}" --steps 4 --out "$work/a" > a.log
grep -aq "^data: $corpus " a.log || { echo "FAIL: default corpus not found from $PWD"; cat a.log; exit 1; }
test -f "$work/a/config.json" || { echo "FAIL: no config.json"; exit 1; }

"$bin" train --config "$work/a/config.json" --out "$work/b" > b.log
cut -d, -f1-3 "$work/a/loss.csv" > a.cols
cut -d, -f1-3 "$work/b/loss.csv" > b.cols
cmp -s a.cols b.cols || { echo "FAIL: --config run differs"; diff a.cols b.cols; exit 1; }
[ "$(wc -l < a.cols)" -eq 5 ] || { echo "FAIL: expected 4 steps"; cat a.cols; exit 1; }

"$bin" train --config "$work/a/config.json" --steps 3 --out "$work/c" > c.log
grep -aq "(3 steps" c.log || { echo "FAIL: --steps did not override the file"; cat c.log; exit 1; }
echo '{"steps": 2, "stepz": 3}' > bad.json
if "$bin" train --config bad.json > bad.log 2>&1; then echo "FAIL: unknown key accepted"; exit 1; fi
grep -aq "unknown key 'stepz'" bad.log || { echo "FAIL: error does not name the key"; cat bad.log; exit 1; }

prefix="$work/prefix"
mkdir -p "$prefix/bin" "$prefix/share/shardopt"
cp "$bin" "$prefix/bin/shardopt"
head -c 20000 "$corpus" > "$prefix/share/shardopt/tinyshakespeare.txt"
"$prefix/bin/shardopt" train "${small[@]}" --steps 1 --out "$work/d" > d.log
grep -aq "^data: $prefix/share/shardopt/tinyshakespeare.txt (20000 bytes)" d.log ||
  { echo "FAIL: installed corpus not preferred"; head -3 d.log; exit 1; }

"$bin" compare "$work/a" "$work/c" --out "$work/cmp.png" > cmp.log
for run in a c; do
  want=$(python3 -c "import json,sys; s=json.load(open('$work/$run/summary.json')); print(f\"{s['final_train_loss']:.4f} {s['final_val_loss']:.4f}\")")
  got=$(awk -v r="$run" '$1 == r { print $3, $4 }' cmp.log)
  [ "$want" = "$got" ] || { echo "FAIL: compare row $run: '$got', summary.json: '$want'"; cat cmp.log; exit 1; }
done
[ "$(head -c 4 "$work/cmp.png" | od -An -tx1 | tr -d ' ')" = "89504e47" ] || { echo "FAIL: no PNG"; cat cmp.log; exit 1; }
echo "PASS"
