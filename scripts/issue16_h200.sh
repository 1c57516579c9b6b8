#!/usr/bin/env bash
# Issue 16's H200 figures, one stage per call (each well under a 10-minute command):
#   bash scripts/issue16_h200.sh deepseek-v3|kimi-k2|sweep      (records under $OUT/issue16, or ./gpu_out/issue16)
# deepseek-v3 / kimi-k2: the preset's MLA+MoE block against the Mamba+MoE block of the same width
#   and MoE (MLABlock vs MambaDecoderBlock), forward and train, seq 2048 and 8192, batch 1, bf16.
#   --isolate: each config in its own process, so one model's weights and gradients (Kimi K2:
#   384 experts of 7168 x 2048, 34 GB of bf16 weights) are freed before the next is built.
# sweep: the DeepSeek-V3 block shape with --n-experts 8 64 256 (forward, seq 2048 8192, batch 1).
# Energy per token comes from NVML (nvidia-ml-py: the wheel in .whl/ as gpu_session.sh installs it);
# --min-time 2 makes the timed region long enough for the counter's steps.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/issue16"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ -f .devcarry/COMMIT ] && export MAMBA_BENCH_GIT_COMMIT=$(cat .devcarry/COMMIT)
BENCH="python3 -m mamba_decoder.bench.cli run --no-progress --dtype bfloat16 --batch-sizes 1 --seq-lens 2048 8192 --warmup 2 --runs 5 --min-time 2"
nvidia-smi -L
case "${1:-}" in
  deepseek-v3|kimi-k2)
    for mode in forward train; do
      echo "== $1 $mode ($(date -u +%T))"
      timeout 280 $BENCH --preset "$1" --models MambaDecoderBlock MLABlock --mode "$mode" --isolate \
          --output-dir "$OUT/issue16/$1_$mode" --overwrite 2>&1 | grep -vE "^\s*$" | tail -25
    done ;;
  sweep)
    echo "== n_experts sweep ($(date -u +%T))"
    timeout 560 $BENCH --preset deepseek-v3 --n-experts 8 64 256 --models MambaDecoderBlock MLABlock \
        --output-dir "$OUT/issue16/sweep_n_experts" --overwrite 2>&1 | grep -vE "^\s*$" | tail -30 ;;
  *) echo "usage: $0 deepseek-v3|kimi-k2|sweep"; exit 2 ;;
esac
