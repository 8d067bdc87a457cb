#!/usr/bin/env bash
# One call on a lent GPU machine (no TorchServe there): the GPU tests of the
# core, the engine variants, then the GPU bench. Everything lands under $OUT
# (default out/gpu).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# compiled kernels cached on disk: a second run (a worker restart) skips code generation
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  $PY -m pytest -q -p no:cacheprovider -p no:logging -s -k "gpu or cuda or sync or graph or estimate_bounds or lbfgs or stall or compile or batch" \
      tests/core/test_lbfgs.py tests/core/test_memory.py tests/core/test_compile.py tests/core/test_batch.py 2>&1 | tee "$OUT/gpu_tests.log" \
      | grep -E "passed|failed|error|peak|batched|FAILED|Error" | tail -30
fi
$PY bench/gpu.py --out "$OUT/gpu_results.json" "$@" 2>&1 | tee "$OUT/gpu_bench.md" | tail -40
if [ "${VARIANTS:-1}" = 1 ]; then
  $PY bench/gpu_variants.py --out "$OUT/gpu_variants.json" 2>&1 | tee "$OUT/gpu_variants.log" | tail -60
fi
