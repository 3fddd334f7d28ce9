#!/bin/bash
# Interleaved before/after rounds of e2e.py for two source trees, the same script for both.
#
#   benchmarks/e2e_ab.sh LABEL_A TREE_A LABEL_B TREE_B ROUNDS MATRIX [more e2e.py options]
#   e.g. git worktree add /tmp/before <commit>
#        benchmarks/e2e_ab.sh before /tmp/before after . 3 none:0,key:0 \
#            --modes matrix,drain --drain-matrix none:0,key:0
#
# Each tree runs on PYTHONPATH (its daemon and its reference server), with this checkout's
# venv and e2e.py; odd rounds run A first, even rounds B first. One line per row and round;
# the JSON of each goes to /tmp/ab-LABEL-ROUND.json.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=$here/.venv/bin/python
script=$here/benchmarks/e2e.py
LA=$1 TA=$(cd "$2" && pwd) LB=$3 TB=$(cd "$4" && pwd) R=$5 M=$6
shift 6
for r in $(seq 1 "$R"); do
  if [ $((r % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for w in $order; do
    if [ "$w" = A ]; then L=$LA T=$TA; else L=$LB T=$TB; fi
    (cd "$T" && PYTHONPATH=$T "$python" "$script" --modes matrix --matrix "$M" --rounds 1 \
        --events 20000 --output "/tmp/ab-$L-$r.json" "$@" 2>&1) \
      | grep -E "delivered(,| from)" | sed "s/^/$L r$r: /"
  done
done
