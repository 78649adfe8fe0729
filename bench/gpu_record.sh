#!/usr/bin/env bash
# One GPU session's record, sized for a 15-minute lease: the compiled-kernel tests, then the benchmark.
# Usage (repository root, on the GPU machine): OUT=dir bash bench/gpu_record.sh
# Everything lands in $OUT: device.txt, gpu-tests.log, gpu-tests.xml, gpu-<device>.{json,md,png}.
set -uo pipefail
OUT=${OUT:-bench/results}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='code %h %s' 2>/dev/null || true
  date -u +'start %FT%TZ'; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
# The fused kernels compiled for the GPU (TRITON_INTERPRET=0): every test that steps fused=True, against
# its reference or the foreach path, on CUDA parameters (test files pick cuda when ON_GPU).
TRITON_INTERPRET=0 timeout ${TEST_S:-300} python3 -m pytest -n ${WORKERS:-14} -q -p no:cacheprovider \
  -k "fused or Fused or large or kernel" --junitxml="$OUT/gpu-tests.xml" \
  tests/test_fused.py tests/test_differential.py tests/test_zoo_lang.py tests/test_zoo_specs.py \
  tests/test_zoo_frontier.py tests/test_zoo_matrix.py tests/test_dropin.py tests/test_random.py \
  > "$OUT/gpu-tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/device.txt"
tail -25 "$OUT/gpu-tests.log"
# The benchmark, one suite at a time (--append), so a suite cut off by the lease keeps the others.
for suite in ${SUITES:-gpt2 large small llama1b}; do
  timeout ${BENCH_S:-75} python3 bench/bench_gpu.py --suites "$suite" --no-compile --windows 3 \
    --optimizers adamw,lion,sgd,lamb,adafactor --append --out "$OUT" 2>&1 | tail -3
  echo "bench $suite rc=${PIPESTATUS[0]}" | tee -a "$OUT/device.txt"
done
date -u +'end %FT%TZ' >> "$OUT/device.txt"
