#!/usr/bin/env bash
# Issue 4's GPU check in one device call (under 8 minutes on an H100): real-shape correctness of
# every Triton kernel vs its reference in fp32/fp16/bf16, whole-model parity (Triton path vs
# LORAPLEX_KERNELS=ref, fp32 and bf16), then the kernel benchmarks. Results land in $OUT:
#   tests.log, tests.xml   pytest of tests/kernels/test_triton_{kernels,attention}.py (small +
#                          Llama-3-8B shapes)
#   parity.json/.log       whole-model logits, Triton vs references
#   kernels.json/.md, bench.log   the benchmarks (loadtest/bench_kernels.py)
# Run from the repository root:  bash loadtest/gpu_check.sh   (OUT defaults to ./gpu_out)
set -u
source "$(dirname "$0")/gpu_env.sh"
export TRITON_DEFAULT_FP_FUSION=1
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
} | tee "$OUT/env.txt"

stamp "tests"
# --noconftest: these tests need no fixture of tests/conftest.py (nor its transformers/peft).
timeout 200 "$PY" -m pytest -q -p no:cacheprovider --noconftest tests/kernels/test_triton_kernels.py \
    tests/kernels/test_triton_attention.py \
    --junitxml="$OUT/tests.xml" --durations=10 > "$OUT/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/summary.txt"
tail -n 25 "$OUT/tests.log"

stamp "parity"
timeout 60 "$PY" -m loraplex.loadtest.bench_kernels --parity --out "$OUT" > "$OUT/parity.log" 2>&1
echo "parity rc=$?" | tee -a "$OUT/summary.txt"
tail -n 30 "$OUT/parity.log"

stamp "benchmarks"
timeout 240 "$PY" -m loraplex.loadtest.bench_kernels --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/summary.txt"
stamp "done"
tail -n 80 "$OUT/bench.log"
