#!/usr/bin/env bash
# GPU checks in one go, for a session lent an H100/H200 (about 5-10 minutes):
#   bash bench/gpu.sh        (from the repository root; installs the project first if needed)
# Prints PASS/FAIL per target and exits non-zero when one is missed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  PY=.venv/bin/python
elif ! "$PY" -c "import clipbatch, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  "$PY" -m pip install -q -e . 2>&1 | tail -2
fi
# The ViT-H-14 and SigLIP-SO400M shapes run through the open_clip and transformers backends.
if ! "$PY" -c "import open_clip, transformers, sentencepiece" 2>/dev/null; then
  "$PY" -m pip install -q -e '.[open_clip,hf]' 2>&1 | tail -2
fi
export PREFECT_SERVER_ANALYTICS_ENABLED=false CLIPBATCH_BENCH_DIR=${CLIPBATCH_BENCH_DIR:-/tmp/clipbatch-bench}
exec "$PY" -m bench --gpu
