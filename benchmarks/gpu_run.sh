#!/usr/bin/env bash
# One GPU session: build rkd (C++ and CUDA extensions) against the machine's torch, run the GPU tests and
# the CUDA benchmarks. Usage: bash benchmarks/gpu_run.sh [build] [tests] [bench] [bench-quick] [wide] [train] [sweep]
# Everything a CPU can check (interpreter, g++ emulation of the .cu, nvcc compile) is checked by `make test` first.
# Results go to $OUT (or benchmarks/results) so they can be committed.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
for stage in "$@"; do
  case "$stage" in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
      nvcc --version | tail -1
      ( time python3 -m pip install --no-build-isolation --no-deps -e . ) > "$OUT/gpu_build.log" 2>&1
      tail -5 "$OUT/gpu_build.log"
      python3 -c "import torch, rkd_engine; print(rkd_engine.explain_backends('cuda', torch.bfloat16, 131072))"
      ;;
    tests)
      files=$(ls tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_ops.py tests/test_dro.py \
        tests/test_ignore_index.py tests/test_validate.py tests/test_autograd_edges.py tests/test_wide.py \
        tests/test_cuda_graphs.py 2>/dev/null)
      RKD_TEST_LARGE=1 timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider $files 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -25
      ;;
    bench)
      timeout ${BENCH_TIMEOUT:-560} python3 benchmarks/bench_loss.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" | grep -v "^W1\|warn"
      ;;
    bench-quick)
      timeout 300 python3 benchmarks/bench_loss.py --device cuda --out "$OUT" --tag quick \
        --methods eager,compile,rkd-triton,rkd-cuda,liger-kldiv 2>&1 | tee "$OUT/gpu_bench_quick.log"
      ;;
    wide)
      timeout ${WIDE_TIMEOUT:-420} python3 benchmarks/bench_wide.py --device cuda --dtype bfloat16 --out "$OUT" 2>&1 \
        | tee "$OUT/gpu_bench_wide.log" | grep -v "^W1\|warn"
      ;;
    train)
      timeout ${TRAIN_TIMEOUT:-240} python3 benchmarks/bench_train.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/gpu_bench_train.log"
      ;;
    sweep)
      timeout ${SWEEP_TIMEOUT:-240} rkd sweep --out /tmp/gpu_sweep --alpha-t 0,1 --alpha-s 0,1 --seeds 1 --baselines post-shift \
        --device cuda --set epochs=3 2>&1 | tee "$OUT/gpu_sweep.log" | tail -20
      ;;
  esac
done
