#!/usr/bin/env bash
# The engine's own parity tests on a GPU, in one device call: fp32 with the Triton path (every
# test of tests/scheduler and the forward tests), then bf16 parity (relative error <= 2e-2).
# The oracles (transformers + peft) run on the CPU. Results in $OUT (default ./gpu_out).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET LORAPLEX_KERNELS
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import loraplex.kernels" 2>/dev/null; then  # a bare device machine
    mkdir -p /tmp/loraplex_ns/loraplex
    for d in server scheduler memory model kernels clients loadtest; do
        ln -sfn "$PWD/$d" "/tmp/loraplex_ns/loraplex/$d"
    done
    export PYTHONPATH="/tmp/loraplex_ns:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())" | tee "$OUT/engine_env.txt"
LORAPLEX_TEST_DEVICE=cuda LORAPLEX_TEST_DTYPE=float32 timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
    tests/scheduler/test_engine_parity.py tests/scheduler/test_engine_batching.py \
    tests/scheduler/test_engine_lifecycle.py > "$OUT/engine_fp32.log" 2>&1
echo "fp32 rc=$?" | tee "$OUT/engine_summary.txt"
tail -n 15 "$OUT/engine_fp32.log"
LORAPLEX_TEST_DEVICE=cuda LORAPLEX_TEST_DTYPE=bfloat16 timeout 120 "$PY" -m pytest -q -p no:cacheprovider \
    tests/scheduler/test_engine_parity.py > "$OUT/engine_bf16.log" 2>&1
echo "bf16 rc=$?" | tee -a "$OUT/engine_summary.txt"
tail -n 15 "$OUT/engine_bf16.log"
