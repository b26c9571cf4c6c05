#!/usr/bin/env bash
# One run on a lent GPU measures everything (target: under 5 minutes): the `cuda` tests, then one table of
# step-time ratios -- metagate bench on CUDA (fixed, hard, meta, reinforce against a hand-written KD step) and
# GatedKDTrainer (fixed, bf16) against a hand-written transformers KD loop.
# Usage: scripts/gpu_check.sh   (from the repository root, with the venv's python on PATH or PYTHON=...)
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")'
export HF_HUB_OFFLINE=1
echo "== cuda tests"
"$PY" -m pytest -q -p no:cacheprovider -m cuda tests/
echo "== metagate bench --device cuda"
"$PY" -m metagate.cli bench --device cuda --task fashion --steps 30 --repeats 5 --gates fixed hard meta reinforce
echo "== GatedKDTrainer (fixed, bf16) vs a hand-written transformers KD loop"
"$PY" scripts/hf_measure.py --part speed --device cuda --bf16 --gates fixed hard
