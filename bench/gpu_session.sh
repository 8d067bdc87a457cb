#!/usr/bin/env bash
# One call on a lent GPU machine (no TorchServe there): the GPU bench, then
# the GPU tests, inside SESSION_S seconds in all. The bench goes first: its
# sections decide the engine (core, engine_ablation, candidate, then the
# profile, in that order), and it starts a section only where its estimate
# (bench/gpu.py's SECTION_ESTIMATE_S) ends before the time kept for the tests
# (TESTS_S). The tests are the core's
# tests that need a GPU (`pytest -m gpu`: the CPU runs the rest in CI), cut
# off before the call's limit, most wanted first (GPU_TESTS). Everything lands under $OUT (default out/gpu);
# the bench rewrites its JSON after every section.
#
# One call does one run of this script: each run takes SESSION_S from its own
# start and rewrites $OUT's logs, so two runs chained in one call would pass
# the call's 600 s. The tests alone: SKIP_BENCH=1; tests and the shipped
# engine's figures in one call:
#   SECTIONS=core,profile,memory,precisions TESTS_S=290 OUT=$OUT bash bench/gpu_session.sh
# (those sections' estimates, SECTION_ESTIMATE_S in bench/gpu.py, add up to
# 270 s: batching_256's 70 more would not fit beside 290 s of tests)
# With less device time left than a whole call, set SESSION_S to the call's
# limit_s minus 20. Then bench/gpu_merge.py merges the results into
# bench/gpu_results_<card>.json (h100 or h200: it refuses to mix cards).
set -uo pipefail
export PYTHONUNBUFFERED=1
began=$(date +%s)
SESSION_S=${SESSION_S:-580}  # a lent call runs at most 600 s
TESTS_S=${TESTS_S:-150}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# compiled kernels cached on disk: a second run (a worker restart) skips code generation
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}  # not under $OUT: only 8 files come back
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/env.txt"
left() { echo $(( SESSION_S - ($(date +%s) - began) )); }
budget=$(( $(left) - TESTS_S ))
# SECTIONS: a comma-separated subset of the bench's sections (bench/gpu.py --only), e.g. core
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # a hard stop a minute past its budget: a section that hangs or overruns
  # its estimate takes at most that minute (and 15 s to die) of the tests'
  # time (SIGINT: what has finished is already in the JSON)
  timeout -s INT -k 15 $(( (budget > 0 ? budget : 0) + 60 )) $PY bench/gpu.py --out "$OUT/gpu_results.json" --budget-s $(( budget > 0 ? budget : 0 )) \
      ${SECTIONS:+--only "$SECTIONS"} "$@" 2>&1 \
      | tee "$OUT/gpu_bench.md" | tail -80
fi
# The files with GPU tests, in the order a cut-off run should keep them: the
# memory calibration admission control rests on, the host-sync, CUDA-graph
# and float16 tests, then the compile tests (each compiles afresh).
# GPU_TESTS may name others (a second call on a warm machine, say).
GPU_TESTS=${GPU_TESTS:-"tests/core/test_memory.py tests/core/test_precision.py tests/core/test_lbfgs.py
           tests/core/test_kept_programs.py tests/core/test_batch.py tests/core/test_compile.py"}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  t=$(( $(left) - 10 ))
  per_test=""  # pytest-timeout's flag only where it is installed: an unknown flag would run nothing
  $PY -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=150"
  if [ "$t" -gt 30 ]; then
    # SIGINT, not SIGTERM: a cut-off pytest still prints which tests passed,
    # failed or did not run; -v names each in the log as it ends; no test
    # may hang for more than 150 s (pytest.ini's 600 would eat the call)
    timeout -s INT -k 15 "$t" $PY -m pytest -v -p no:cacheprovider -p no:logging -s -rs --durations=15 \
        $per_test -m gpu $GPU_TESTS 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|peak|batched|compiled vs|update vs|float16 at|FAILED|Error" \
        | tail -40
  else
    echo "GPU tests: no time left ($t s)" | tee "$OUT/gpu_tests.log"
  fi
fi
echo "session: $(( $(date +%s) - began )) s"
