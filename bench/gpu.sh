#!/usr/bin/env bash
# For a lent GPU: ROME and MEMIT speed on LLaMA-2-7B shapes with random weights (fp32, one device).
# Random weights never trigger early stopping, so all target-vector steps run.
# Usage: bash bench/gpu.sh   (expects the venv from `make install`; writes bench/results/*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CORPUS=${CORPUS:-../shared/data/wikitext-2/valid.txt}
export MEDIT_CACHE=${MEDIT_CACHE:-$PWD/.bench-cache}
$PY bench/edit_speed.py --method rome --model llama-2-7b --random-init --device cuda --n 5 \
    --stats-corpus "$CORPUS" --fresh-stats --out bench/results/gpu-rome-llama-2-7b.json
$PY bench/edit_speed.py --method memit --model llama-2-7b --random-init --device cuda --n 3 \
    --stats-corpus "$CORPUS" --fresh-stats --out bench/results/gpu-memit-llama-2-7b.json
