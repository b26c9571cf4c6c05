#!/usr/bin/env bash
# Regenerate the README's compare tables end to end (teachers, every gate and baseline, paired intervals).
# Each table lands in runs/reproduce/<task>/results.md (with the machine and wall time that made it);
# the same command continues an interrupted run. JOBS=2 scripts/reproduce.sh runs two cells at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-"0 1 2 3 4"}
GATES=(ce fixed fixed-tuned hard label-filter best-teacher conf-teachers
       meta:meta_param=net meta:meta_param=table reinforce)

run() {  # task, extra flags...
  local task=$1; shift
  local t0=$SECONDS
  "$BIN/metagate" compare --task "$task" --noise 0.4 --seeds $SEEDS --jobs "$JOBS" \
    --out "runs/reproduce/$task" --gates "${GATES[@]}" "$@"
  echo "$task: $((SECONDS - t0)) s   -> runs/reproduce/$task/results.md"
}

run digits
run fashion --student mlp
# g2p joins here once its task exists: run g2p
