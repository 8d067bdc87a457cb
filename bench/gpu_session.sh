#!/usr/bin/env bash
# One call on a lent GPU machine (no TorchServe there): the GPU tests of the
# core, then the GPU bench. Everything lands under $OUT (default out/gpu).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/env.txt"
$PY -m pytest -q -p no:cacheprovider -s -k "gpu or cuda or sync or graph or estimate_bounds or lbfgs or stall" \
    tests/core/test_lbfgs.py tests/core/test_memory.py 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|peak|FAILED|Error" | tail -30
$PY bench/gpu.py --out "$OUT/gpu_results.json" "$@" 2>&1 | tee "$OUT/gpu_bench.md" | tail -40
