#!/usr/bin/env bash
# Measurements on a lent GPU, one stage per call (each fits a 10-minute command).
#   bash scripts/gpu_session.sh check|sweep|workloads   (writes under $OUT, or ./gpu_out)
# Needs the runtime wheels in .whl/ (mambapy, open-kimi, pydantic...) and gpu_floor.py in .devcarry/.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
BENCH="python3 -m mamba_decoder.bench.cli run --no-progress --no-plots"
runs=()
log() { echo "== $* ($(date -u +%T))"; }

case "${1:-check}" in
check)
  log env; nvidia-smi -L; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'
  git rev-parse HEAD 2>/dev/null || true
  log floor; timeout 150 python3 .devcarry/gpu_floor.py | tee "$OUT/floor.jsonl"
  log tests; timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/gpu 2>&1 | tail -15
  log targets
  timeout 240 $BENCH --dim 512 --seq-lens 128 2048 8192 --batch-sizes 1 8 --backend fast reference \
      --dtype bfloat16 --output-dir /tmp/r/targets_bf16 --overwrite 2>&1 | grep -v "^$" | tail -45
  runs+=(targets_bf16)
  ;;
sweep)
  log tests; timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -4
  log targets, graphed forward
  timeout 120 $BENCH --dim 512 --seq-lens 128 2048 8192 --batch-sizes 1 8 --cuda-graphs \
      --dtype bfloat16 --output-dir /tmp/r/targets_bf16_graphs --overwrite 2>&1 | grep -E "SeqLen|error"
  runs+=(targets_bf16_graphs)
  log default sweep fp32+bf16, both backends
  timeout 560 $BENCH --backend fast reference --dtype float32 bfloat16 --output-dir /tmp/r/default_sweep \
      --overwrite 2>&1 | tail -60
  runs+=(default_sweep)
  ;;
workloads)
  log tests; timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/gpu > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|E  )|passed|failed" "$OUT/gpu_tests.txt" | head -30
  log decode eager + graphs
  for v in "" "--cuda-graphs"; do
    timeout 150 $BENCH --mode decode $v --seq-lens 512 2048 8192 --batch-sizes 8 --dtype bfloat16 --runs 50 \
        --warmup 10 --output-dir "/tmp/r/decode${v:+_graphs}" --overwrite 2>&1 | grep -E "SeqLen|error" | tail -12
    runs+=("decode${v:+_graphs}")
  done
  timeout 100 $BENCH --mode decode --cache-kind full --models MLABlock --seq-lens 512 2048 8192 --batch-sizes 8 \
      --dtype bfloat16 --runs 50 --warmup 10 --output-dir /tmp/r/decode_fullcache --overwrite 2>&1 | grep -E "SeqLen|error"
  runs+=(decode_fullcache)
  log train
  timeout 150 $BENCH --mode train --seq-lens 2048 --batch-sizes 8 --dtype bfloat16 --backend fast reference \
      --output-dir /tmp/r/train --overwrite 2>&1 | grep -E "SeqLen|error"
  runs+=(train)
  log timer vs do_bench; timeout 60 python3 scripts/timer_vs_do_bench.py | tee "$OUT/timer_vs_do_bench.txt"
  log profile; timeout 90 python3 scripts/profile_gpu.py | tee "$OUT/profile.txt"
  ;;
final)
  log tests; timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/gpu > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|E  )|passed|failed" "$OUT/gpu_tests.txt" | head -20
  for v in "" "--cuda-graphs"; do
    log targets $v
    timeout 150 $BENCH --dim 512 --seq-lens 128 2048 8192 --batch-sizes 1 8 $v --dtype bfloat16 \
        --output-dir "/tmp/r/final_targets${v:+_graphs}" --overwrite 2>&1 | grep -E "SeqLen|error"
    runs+=("final_targets${v:+_graphs}")
  done
  log timer vs do_bench; timeout 60 python3 scripts/timer_vs_do_bench.py | tee "$OUT/timer_vs_do_bench.txt"
  for v in "" "--cuda-graphs"; do
    log decode $v
    timeout 120 $BENCH --mode decode $v --seq-lens 512 2048 8192 --batch-sizes 8 --dtype bfloat16 --runs 50 \
        --warmup 10 --output-dir "/tmp/r/final_decode${v:+_graphs}" --overwrite 2>&1 | grep -E "SeqLen|error"
    runs+=("final_decode${v:+_graphs}")
  done
  log train
  timeout 100 $BENCH --mode train --seq-lens 2048 --batch-sizes 8 --dtype bfloat16 \
      --output-dir /tmp/r/final_train --overwrite 2>&1 | grep -E "SeqLen|error"
  runs+=(final_train)
  ;;
esac
[ ${#runs[@]} -gt 0 ] && tar czf "$OUT/runs-${1:-check}.tgz" -C /tmp/r "${runs[@]}"
log done
