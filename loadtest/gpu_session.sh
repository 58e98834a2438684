#!/usr/bin/env bash
# One device call for the engine's GPU path (issues 4 and 5), stages in order of importance
# (STAGES picks and orders them; default: kernels engine bf16 bench sweep tuned pack; on an H100,
# 2026-11-26: kernels 175 s, engine 75 s, bf16 20-35 s, bench 40 s, sweep 65 s, tuned 40 s, so
# the default fits one 600 s device call; the GPU's shipped tuning table, if any, is in force
# except in the `tuned` stage, which puts the new sweep's table in force instead):
#   kernels every Triton twin vs its reference at small and Llama-3-8B shapes, fp32/fp16/bf16
#           (LoRA, DoRA, SHiRA, attention with key splits, fused norm/RoPE/SiLU) → $OUT/kernels.log
#   engine  fp32 engine tests on the Triton path with CUDA graphs (parity with transformers +
#           peft, batching, SHiRA fusion, lifecycle, device prefetch)   → $OUT/engine_fp32.log
#   load    the real-shape load test (loadtest/gpu_load.py)             → $OUT/gpu_load/
#   bf16    bf16 parity                                                 → $OUT/engine_bf16.log
#   bench   kernel and decode-step benchmarks, no reference timings     → $OUT/kernels.md/.json
#   sweep   launch-parameter sweep of the decode kernels, each checked  → $OUT/kernels_sweep.*
#           and the fastest choices at batch 64 as a kernels.tuning table → $OUT/kernels_tuned.json
#   tuned   the LoRA, attention and decode-step benchmarks again with that table in force
#           (LORAPLEX_KERNEL_TUNING)                                      → $OUT/tuned/kernels.*
#   pack    everything under $OUT in one archive, $OUT/gpu_session.tgz (the device tool brings
#           back at most 8 files)
# Run from the repository root:  OUT=gpu_out STAGES="engine bench" bash loadtest/gpu_session.sh
# (KERNELS_TIMEOUT, LOAD_BUDGET, RATES, LOAD_FLAGS, BENCH_TIMEOUT, SWEEP_TIMEOUT, TUNED_TIMEOUT
# tune the stages; STAGES="" runs none)
set -u
LOAD_BUDGET=${LOAD_BUDGET:-140}
RATES=${RATES:-4,8,16,32,64}
STAGES=${STAGES-kernels engine bf16 bench sweep tuned pack}
source "$(dirname "$0")/gpu_env.sh"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/summary.txt"; }
"$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
ENGINE_TESTS="tests/scheduler/test_engine_parity.py tests/scheduler/test_shira_fusion.py
    tests/scheduler/test_engine_batching.py tests/scheduler/test_engine_lifecycle.py"
[ -f tests/scheduler/test_device_prefetch.py ] && ENGINE_TESTS="$ENGINE_TESTS tests/scheduler/test_device_prefetch.py"

for stage in $STAGES; do
    stamp "$stage"
    case $stage in
    kernels)
        timeout ${KERNELS_TIMEOUT:-240} "$PY" -m pytest -q -p no:cacheprovider \
            tests/kernels/test_triton_kernels.py tests/kernels/test_triton_attention.py \
            tests/kernels/test_fused_kernels.py --durations=5 > "$OUT/kernels.log" 2>&1
        stamp "kernels rc=$?"; tail -n 12 "$OUT/kernels.log" ;;
    engine)
        # Graphs of decode steps (the default) and of steps with prefill (opt-in) both run.
        LORAPLEX_TEST_DEVICE=cuda LORAPLEX_TEST_DTYPE=float32 LORAPLEX_TEST_GRAPHS_PREFILL=1 \
            timeout 130 "$PY" -m pytest -q -p no:cacheprovider $ENGINE_TESTS \
            > "$OUT/engine_fp32.log" 2>&1
        stamp "engine rc=$?"; tail -n 4 "$OUT/engine_fp32.log" ;;
    load)
        timeout $((LOAD_BUDGET + 40)) "$PY" -m loraplex.loadtest.gpu_load \
            --time-budget "$LOAD_BUDGET" --num-adapters 100 --rates "$RATES" --duration 15 \
            --max-drain 8 ${LOAD_FLAGS:-} --out "$OUT/gpu_load" > "$OUT/gpu_load.log" 2>&1
        stamp "load rc=$?"; tail -n 25 "$OUT/gpu_load.log" ;;
    bf16)
        LORAPLEX_TEST_DEVICE=cuda LORAPLEX_TEST_DTYPE=bfloat16 timeout 60 "$PY" -m pytest -q \
            -p no:cacheprovider tests/scheduler/test_engine_parity.py > "$OUT/engine_bf16.log" 2>&1
        stamp "bf16 rc=$?"; tail -n 4 "$OUT/engine_bf16.log" ;;
    bench)
        timeout ${BENCH_TIMEOUT:-100} "$PY" -m loraplex.loadtest.bench_kernels --no-ref \
            --skip prefill --out "$OUT" > "$OUT/bench.log" 2>&1
        stamp "bench rc=$?"; tail -n 70 "$OUT/bench.log" ;;
    sweep)
        timeout ${SWEEP_TIMEOUT:-180} "$PY" -m loraplex.loadtest.bench_sweep --check --out "$OUT" \
            --tuned "$OUT/kernels_tuned.json" > "$OUT/sweep.log" 2>&1
        stamp "sweep rc=$?"; grep -E "failed|\[|tuned" "$OUT/sweep.log" ;;
    tuned)
        if [ ! -f "$OUT/kernels_tuned.json" ]; then stamp "tuned: no table"; continue; fi
        LORAPLEX_KERNEL_TUNING="$OUT/kernels_tuned.json" timeout ${TUNED_TIMEOUT:-100} "$PY" \
            -m loraplex.loadtest.bench_kernels --no-ref --skip prefill,fused --out "$OUT/tuned" \
            > "$OUT/tuned.log" 2>&1
        stamp "tuned rc=$?"; tail -n 40 "$OUT/tuned.log" ;;
    pack)
        tar czf /tmp/gpu_session.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete \
            && mv /tmp/gpu_session.tgz "$OUT/"
        echo "pack rc=$?" ;;
    esac
done
