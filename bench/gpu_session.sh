#!/usr/bin/env bash
# One call on a lent GPU machine (no TorchServe there): the GPU tests of the
# core, then the GPU bench, inside SESSION_S seconds in all (the bench skips
# the sections it has no time left for). Everything lands under $OUT
# (default out/gpu); the bench rewrites its JSON after every section.
set -uo pipefail
export PYTHONUNBUFFERED=1
began=$(date +%s)
SESSION_S=${SESSION_S:-540}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# compiled kernels cached on disk: a second run (a worker restart) skips code generation
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}  # not under $OUT: only 8 files come back
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # the tests that skip without a GPU, and the compile policy's
  $PY -m pytest -q -p no:cacheprovider -p no:logging -s -rs --durations=15 \
      -k "gpu or cuda or sync or graph or estimate_bounds or warmed or compile" \
      tests/core/test_lbfgs.py tests/core/test_memory.py tests/core/test_compile.py tests/core/test_batch.py \
      tests/core/test_kept_programs.py tests/core/test_precision.py 2>&1 \
      | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|peak|batched|compiled vs|update vs|float16 at|FAILED|Error" | tail -40
fi
left=$(( SESSION_S - ($(date +%s) - began) ))
# stop starting sections with ~100 s to spare: the longest one takes about that
# SECTIONS: a comma-separated subset of the bench's sections (bench/gpu.py --only), e.g. core
$PY bench/gpu.py --out "$OUT/gpu_results.json" --budget-s $(( left > 100 ? left - 100 : 0 )) \
    ${SECTIONS:+--only "$SECTIONS"} "$@" 2>&1 \
    | tee "$OUT/gpu_bench.md" | tail -80
echo "session: $(( $(date +%s) - began )) s"
