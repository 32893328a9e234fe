#!/usr/bin/env bash
# Runs kvpack's GPU tests, checks and benchmarks on a CUDA machine, one stage after another.
# Usage: bash benchmarks/gpu_run.sh STAGE...   (stages: env tests cuda triton attention sweep bench
# bench-g128 bench-large bench-attention e2e profile-e2e overhead int4 eval tune grouped, pytest:FILE for one test file in
# 8 workers, and ncu:g128 or ncu:int4,TOKENS for Nsight Compute on one kernel of benchmarks/ncu_probe.py).
# Logs and results go to ${OUT:-gpu-out} (results in results-HHMMSS.tgz).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
kvpack=(python3 -W ignore -c 'import sys; from kvpack.cli import main; sys.exit(main())')

stage() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name"
  timeout "${STAGE_TIMEOUT:-580}" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
}

for s in "$@"; do
  case $s in
    env) stage env bash -c 'nvidia-smi; python3 -c "import torch, triton, transformers, cupy; print(torch.__version__, triton.__version__, transformers.__version__, cupy.__version__, torch.cuda.get_device_name())"' ;;
    tests) stage tests python3 -m pytest -q -x -rs -p no:cacheprovider tests ;;
    gpu-tests) stage gpu-tests python3 -m pytest -q -rs -p no:cacheprovider -n 4 tests/test_triton_quant.py \
      tests/test_custom_ops.py tests/test_attention.py tests/test_hf_attention.py tests/test_bench.py tests/test_cache.py tests/test_hf.py ;;
    cuda) stage cuda python3 benchmarks/gpu_check_cuda.py ;;
    triton) stage triton python3 benchmarks/gpu_check_triton.py ;;
    attention) stage attention python3 benchmarks/gpu_check_attention.py --no-sweep ;;
    sweep) stage sweep python3 benchmarks/gpu_check_attention.py --no-tests --no-bench ;;
    pytest:*) f=${s#pytest:}; stage "pytest-$(basename "$f" .py)" python3 -m pytest -v -rfEs -p no:cacheprovider \
      -n "${PYTEST_WORKERS:-8}" "$f" ;;
    bench) stage bench "${kvpack[@]}" bench --out "$OUT/results/bench" ;;
    bench-g128) stage bench-g128 "${kvpack[@]}" bench --configs 131072x8192 --dtype float16 --format int8-channel-g128 \
      --no-cpu-baselines --out "$OUT/results/bench-g128-fp16" ;;
    bench-large) stage bench-large "${kvpack[@]}" bench --large --out "$OUT/results/bench-large" ;;
    bench-attention) stage bench-attention "${kvpack[@]}" bench-attention --out "$OUT/results/attention" ;;
    e2e) stage e2e "${kvpack[@]}" bench-attention --e2e --no-kernels --out "$OUT/results/e2e" ;;
    eval) for mode in dequantize fused; do
            stage "eval-$mode" "${kvpack[@]}" eval --model smollm2-135m --formats int8,int4 --chunk 16 \
              --attention "$mode" --dtype "${EVAL_DTYPE:-float16}" --out "$OUT/results/eval-$mode"
          done ;;
    tune) stage tune python3 benchmarks/tune_quant.py ${TUNE_WORDS:-} ;;
    grouped) stage grouped python3 -W ignore benchmarks/grouped_variants.py ;;
    profile-e2e) stage profile-e2e python3 -W ignore benchmarks/profile_e2e.py ;;
    overhead) stage overhead python3 -W ignore benchmarks/decode_overhead.py ;;
    ncu:*) w=${s#ncu:}; case $w in g128) k=_channel_kernel;; *) k=decode_int4;; esac
      stage "ncu-${w%%,*}" ncu --clock-control none --kernel-name "regex:$k" --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section SchedulerStats \
        --section WarpStateStats --section LaunchStats python3 -W ignore benchmarks/ncu_probe.py ${w//,/ } ;;
    int4) stage int4 python3 -W ignore benchmarks/decode_int4.py --out "$OUT/results" ${INT4_ARGS:-} ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
# One archive per invocation (several invocations in one device call must not overwrite each other).
tar -czf "$OUT/results-$(date +%H%M%S).tgz" -C "$OUT" results && rm -rf "$OUT/results"
