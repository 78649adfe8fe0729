#!/usr/bin/env bash
# One GPU session's record, sized for a 15-minute lease. Usage (repository root, on the GPU machine):
#   OUT=dir PARTS="tests bench lowbit matrix" bash bench/gpu_record.sh
# PARTS picks what runs, in this order (default "tests bench"); each part is cut off by its own timeout
# so the script always finishes and packs what it measured:
#   tests   the compiled-kernel tests (TRITON_INTERPRET=0): gpu-tests.log
#   bench   bench_gpu.py one suite at a time (--append): gpu-<device>.{json,md,png}
#   lowbit  lowbit_gpu_check.py, int8/int4-state rows against torch fused, warps per block: lowbit/
#   matrix  bench_matrix.py --device cuda (Shampoo, SOAP, Kron): matrix-cuda-<device>.{json,md}
# Everything lands in $OUT: device.txt, session.log and record.tgz (all result files, as the device
# returns at most 8 files).
set -uo pipefail
OUT=${OUT:-bench/results}
PARTS=${PARTS:-tests bench}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
log() { echo "$*" | tee -a "$OUT/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='code %h %s' 2>/dev/null || true
  date -u +'start %FT%TZ'; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
for part in $PARTS; do
  date -u +"$part %T" | tee -a "$OUT/device.txt"
  case $part in
  tests)  # every test that steps fused=True, against its reference or the foreach path, on CUDA parameters
    TRITON_INTERPRET=0 timeout ${TEST_S:-300} python3 -m pytest -n ${WORKERS:-14} -q -p no:cacheprovider \
      -k "fused or Fused or large or kernel" --junitxml="$WORK/gpu-tests.xml" \
      tests/test_fused.py tests/test_differential.py tests/test_zoo_lang.py tests/test_zoo_specs.py \
      tests/test_zoo_frontier.py tests/test_zoo_matrix.py tests/test_zoo_kron.py tests/test_dropin.py \
      tests/test_random.py > "$WORK/gpu-tests.log" 2>&1
    log "tests rc=$?"; tail -25 "$WORK/gpu-tests.log" ;;
  bench)
    for suite in ${SUITES:-gpt2 large small llama1b}; do
      timeout ${BENCH_S:-75} python3 bench/bench_gpu.py --suites "$suite" --no-compile --windows 3 \
        --optimizers adamw,lion,sgd,lamb,adafactor --append --out "$WORK" 2>&1 | tail -3
      log "bench $suite rc=${PIPESTATUS[0]}"
    done ;;
  lowbit)
    mkdir -p "$WORK/lowbit"
    timeout ${CHECK_S:-60} python3 bench/lowbit_gpu_check.py 2>&1 | tee "$WORK/lowbit/check.log" | tail -8
    log "lowbit check rc=${PIPESTATUS[0]}"
    timeout ${LOWBIT_S:-120} python3 bench/bench_gpu.py --suites gpt2,large --dtypes fp32,bf16 --optimizers adamw,lion \
      --no-compile --windows 3 --out "$WORK/lowbit" \
      --impls "optdsl fused,optdsl fused bf16 states,optdsl fused int8 states,optdsl fused int4 states,torch fused" 2>&1 | tail -30
    log "lowbit bench rc=${PIPESTATUS[0]}"
    timeout ${SWEEP_S:-60} python3 bench/bench_gpu.py --sweep-lowbit --windows 3 --out "$WORK/lowbit" 2>&1 | tail -30
    log "lowbit sweep rc=${PIPESTATUS[0]}" ;;
  matrix)
    timeout ${MATRIX_S:-120} python3 bench/bench_matrix.py --device cuda --windows 3 --steps 2 --out "$WORK" 2>&1 | tail -16
    log "matrix rc=${PIPESTATUS[0]}" ;;
  esac
done
date -u +'end %FT%TZ' >> "$OUT/device.txt"
tar czf "$OUT/record.tgz" -C "$WORK" .
