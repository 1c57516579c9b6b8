#!/usr/bin/env bash
# Measurements on a lent GPU, one stage per call (each fits a 10-minute command).
#   bash scripts/gpu_session.sh check|probe|host|retest|targets|final|workloads|train|train-check|s6|s7|s7-all|s7-final|s7-last|s8-a|s8-b|s10|s11|s11-tune|i16-deepseek-v3|i16-kimi-k2|i16-sweep|sweep   (writes under $OUT, or ./gpu_out)
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
# the tree arrives without its history: records take the commit from .devcarry/COMMIT
[ -f .devcarry/COMMIT ] && export MAMBA_BENCH_GIT_COMMIT=$(cat .devcarry/COMMIT)
BENCH="python3 -m mamba_decoder.bench.cli run --no-progress --no-plots"
runs=()
log() { echo "== $* ($(date -u +%T))"; }
env_info() {
  log env; nvidia-smi -L
  python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'
}
# mamba_ssm + causal_conv1d, prebuilt for the H200 (shared/peer copied into .devcarry/peer), on PYTHONPATH
load_peer() {
  if [ -f .devcarry/peer/peer_so.tar.xz ]; then
    mkdir -p /tmp/peerbuild && tar xJf .devcarry/peer/peer_so.tar.xz -C /tmp/peerbuild
    export PYTHONPATH=$PYTHONPATH:/tmp/peerbuild/cc:/tmp/peerbuild/ss:$PWD/.devcarry/peer/src
  fi
}
# the tests on the card: card_tests TIMEOUT PATH... (failures and the count echoed)
card_tests() {
  local t=$1; shift
  log tests; timeout "$t" python3 -m pytest -q -p no:cacheprovider --tb=short "$@" > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR|E  )|passed|failed" "$OUT/gpu_tests.txt" | head -30
}
# the fast backend eager at the issue's latency shapes, kept as run NAME: eager NAME
eager() {
  log eager; timeout 100 $BENCH --dim 512 --seq-lens 128 2048 --batch-sizes 1 8 --dtype bfloat16 \
      --output-dir "/tmp/r/$1" --overwrite 2>&1 | grep -E "SeqLen|error"
  runs+=("$1")
}
# issue 3's table: the fast backend eager and graphed, then the reference, at its shapes
targets() {
  for v in "" "--cuda-graphs"; do
    log targets $v
    timeout 150 $BENCH --dim 512 --seq-lens 128 2048 8192 --batch-sizes 1 8 $v --dtype bfloat16 \
        --output-dir "/tmp/r/targets${v:+_graphs}" --overwrite 2>&1 | grep -E "SeqLen|error"
    runs+=("targets${v:+_graphs}")
  done
  log targets reference
  timeout 200 $BENCH --dim 512 --seq-lens 128 2048 8192 --batch-sizes 1 8 --backend reference --dtype bfloat16 \
      --output-dir /tmp/r/targets_reference --overwrite 2>&1 | grep -E "SeqLen|error"
  runs+=(targets_reference)
}

# issue 12's targets from the suite, fast and mamba_ssm: train (B8), graphed forward, graphed decode (runs kept as NAME<suffix>)
issue12_suite() {
  log suite train; timeout 120 $BENCH --mode train --backend fast mamba_ssm --dim 512 --seq-lens 2048 8192 \
      --batch-sizes 8 --dtype bfloat16 --output-dir "/tmp/r/train$1" --overwrite 2>&1 | grep -E "SeqLen|error|Kernels"
  log suite forward graphed; timeout 50 $BENCH --cuda-graphs --backend fast mamba_ssm --models "Regular Mamba" \
      --dim 512 --seq-lens 2048 8192 --batch-sizes 8 --dtype bfloat16 --output-dir "/tmp/r/fwd$1" --overwrite 2>&1 \
      | grep -E "SeqLen|error"
  log suite decode graphed; timeout 60 $BENCH --mode decode --cuda-graphs --backend fast mamba_ssm --models "Regular Mamba" \
      --dim 512 --seq-lens 512 --batch-sizes 1 8 64 --dtype bfloat16 --runs 50 --warmup 10 --output-dir "/tmp/r/decode$1" \
      --overwrite 2>&1 | grep -E "SeqLen|error"
  runs+=("train$1" "fwd$1" "decode$1")
}

case "${1:-check}" in
check)   # correctness on the card, the floor, the scan kernels, where eager host time goes
  env_info
  git rev-parse HEAD 2>/dev/null || true
  card_tests 240 tests/gpu
  log floor; timeout 150 python3 .devcarry/gpu_floor.py | tee "$OUT/floor.jsonl"
  log scan; timeout 150 python3 scripts/scan_study.py --skip-check | tee "$OUT/scan.jsonl"
  log host; timeout 60 python3 scripts/profile_gpu.py --host | tee "$OUT/host.txt"
  ;;
probe)   # A/B of candidate fast paths: scan tiles, the MoE's dense-small limit, host time by switch and by op
  env_info
  log scan; timeout 130 python3 scripts/scan_study.py --tune --skip-check --budget 110 \
      --tune-dtypes bf16 fp32 --skip-table > "$OUT/scan.jsonl" 2>&1
  grep -E "tune_fwd|error" "$OUT/scan.jsonl" | python3 -c 'import sys, json
for l in sys.stdin:
    r = json.loads(l); print(r.get("dtype"), r.get("ms"), r.get("cfg"), r.get("error", "")[:300])'
  log moe; timeout 90 python3 scripts/profile_gpu.py --moe | tee "$OUT/moe.txt"
  log host; timeout 120 python3 scripts/profile_gpu.py --host > "$OUT/host.txt" 2>&1; grep -E "^  |batch 8|per forward" "$OUT/host.txt" | head -40
  log ops; timeout 100 python3 scripts/profile_gpu.py --ops > "$OUT/ops.txt" 2>&1; grep "###" "$OUT/ops.txt"
  ;;
host)   # launch-bound sizes: the tests on the card, host time by switch, by op and by Python function, the eager targets
  env_info
  card_tests 200 tests/gpu tests/models/test_moe.py tests/models/test_blocks.py tests/models/test_mla.py
  log host; timeout 150 python3 scripts/profile_gpu.py --host > "$OUT/host.txt" 2>&1; grep -E "^  .*\]|per forward" "$OUT/host.txt" | head -40
  log ops; timeout 100 python3 scripts/profile_gpu.py --ops > "$OUT/ops.txt" 2>&1; grep "###" "$OUT/ops.txt"
  eager eager
  ;;
retest)  # the tests on the card and one more eager sample of the issue's shapes (host variance)
  env_info
  card_tests 200 tests/gpu tests/models/test_moe.py
  eager eager_retest
  ;;
final)   # one call: tests on the card, the floor, the targets (fast eager / graphed, reference), host A/B, decode and train
  env_info
  card_tests 200 tests/gpu tests/models/test_moe.py
  log floor; timeout 120 python3 .devcarry/gpu_floor.py > "$OUT/floor.jsonl"; grep bfloat16 "$OUT/floor.jsonl"; tail -1 "$OUT/floor.jsonl"
  targets
  log decode graphs; timeout 60 $BENCH --mode decode --cuda-graphs --seq-lens 512 8192 --batch-sizes 8 --dtype bfloat16 \
      --runs 50 --warmup 10 --output-dir /tmp/r/decode_graphs --overwrite 2>&1 | grep -E "SeqLen|error"
  runs+=(decode_graphs)
  log train; timeout 70 $BENCH --mode train --seq-lens 2048 --batch-sizes 8 --dtype bfloat16 \
      --output-dir /tmp/r/train --overwrite 2>&1 | grep -E "SeqLen|error"
  runs+=(train)
  log host; timeout 90 python3 scripts/profile_gpu.py --host > "$OUT/host.txt" 2>&1; grep -E "^  .*\]" "$OUT/host.txt"
  log sdpa; timeout 90 python3 scripts/profile_gpu.py --sdpa 2>&1 | tee "$OUT/sdpa.txt"
  ;;
train|train-check)   # issue 12: fast vs mamba_ssm on the card; train-check: the tests, the mixer and the suite's train step only
  env_info
  load_peer
  if [ "$1" = train-check ]; then
    card_tests 100 -x tests/gpu/test_mamba_ssm.py tests/kernels/test_selective_scan_bdl.py tests/kernels/test_causal_conv.py \
        -k "mamba_ssm or fused or triton_backward"
    log study; timeout 80 python3 scripts/train_study.py --skip-tune --profile > "$OUT/study.jsonl" 2>&1
    grep -E "scan_fwd_bwd|mixer|error" "$OUT/study.jsonl" | cut -c1-260
    log suite train; timeout 80 $BENCH --mode train --backend fast mamba_ssm --dim 512 --seq-lens 2048 8192 \
        --batch-sizes 8 --dtype bfloat16 --output-dir /tmp/r/train12 --overwrite 2>&1 | grep -E "SeqLen|error"
    runs+=(train12)
    tar czf "$OUT/runs-train-check.tgz" -C /tmp/r "${runs[@]}"; log done; exit 0
  fi
  card_tests 150 tests/gpu/test_mamba_ssm.py tests/kernels/test_causal_conv.py tests/kernels/test_selective_scan_bdl.py \
      -k "mamba_ssm or conv or fused or fwd_bwd or gradients"
  log study; timeout 150 python3 scripts/train_study.py --budget 60 --profile > "$OUT/study.jsonl" 2>&1
  grep -E "tune_bwd|scan_fwd_bwd|mixer|error" "$OUT/study.jsonl" | cut -c1-260
  issue12_suite 12
  ;;
s6)   # session 6: every tests/gpu test at this commit, then issue 12's targets from the suite (fast and mamba_ssm)
  env_info
  load_peer
  card_tests 270 tests/gpu
  issue12_suite _s6
  ;;
s7)   # session 7: every tests/gpu test, then the training MoE's interleaved A/B (old autograd path vs the Function)
  env_info
  card_tests 330 tests/gpu
  log moe study; timeout 200 python3 scripts/moe_train_study.py | tee "$OUT/moe_study.jsonl"
  ;;
s7-all)   # session 7 in one call: issue 12's suite targets (fast and mamba_ssm), the train-step profile, and issue 13's before/after
  env_info
  load_peer
  issue12_suite _s7
  log profile; timeout 100 python3 scripts/moe_train_study.py --profile > "$OUT/profile.txt" 2>&1; grep profile "$OUT/profile.txt"
  for r in 1 2; do for t in before after; do
    dir=$PWD; [ $t = before ] && dir=$PWD/.devcarry/before
    log $t $r
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout 60 $BENCH --cuda-graphs --dim 512 --seq-lens 2048 8192 \
        --batch-sizes 8 --dtype bfloat16 --output-dir "/tmp/r/redesign_${t}_$r" --overwrite 2>&1 | grep -E "SeqLen|error")
    runs+=("redesign_${t}_$r")
  done; done
  ;;
s7-last)   # session 7's last minutes: tests/gpu with the peer loaded, then the mixer's train memory against mamba_ssm
  env_info
  load_peer
  card_tests 150 tests/gpu
  log train memory; timeout 45 $BENCH --mode train --backend fast mamba_ssm --models "Regular Mamba" --dim 512 \
      --seq-lens 2048 8192 --batch-sizes 8 --dtype bfloat16 --runs 10 --output-dir /tmp/r/train_mem --overwrite 2>&1 | grep -E "SeqLen|rror:"
  runs+=(train_mem)
  ;;
s7-final)   # session 7's last call: every tests/gpu test with the peer loaded, the mixer's train memory against
  # mamba_ssm, then issue 16's DeepSeek-V3-shaped blocks (forward, train) and the n_experts sweep at seq 2048
  env_info
  load_peer
  card_tests 190 tests/gpu
  log train memory; timeout 60 $BENCH --mode train --backend fast mamba_ssm --models "Regular Mamba" --dim 512 \
      --seq-lens 2048 8192 --batch-sizes 8 --dtype bfloat16 --output-dir /tmp/r/train_mem --overwrite 2>&1 | grep -E "SeqLen|rror:"
  runs+=(train_mem)
  I16="--preset deepseek-v3 --models MambaDecoderBlock MLABlock --dtype bfloat16 --batch-sizes 1 --warmup 2 --runs 5 --min-time 2"
  for mode in forward train; do
    log deepseek-v3 $mode; timeout 100 $BENCH $I16 --mode $mode --isolate --seq-lens 2048 8192 \
        --output-dir "/tmp/r/deepseek-v3_$mode" --overwrite 2>&1 | grep -E "SeqLen|rror:"
    runs+=("deepseek-v3_$mode")
  done
  log n_experts sweep; timeout 100 $BENCH $I16 --n-experts 8 64 256 --seq-lens 2048 --output-dir /tmp/r/sweep_n_experts \
      --overwrite 2>&1 | grep -E "SeqLen|rror:"
  runs+=(sweep_n_experts)
  ;;
i16-deepseek-v3|i16-kimi-k2)   # issue 16: the preset's MLA+MoE block against the Mamba+MoE block of its width and MoE,
  # forward and train, seq 2048 and 8192, batch 1 (--isolate: one model's weights freed before the next is built;
  # --min-time 2: a timed region long enough for NVML's energy counter)
  env_info
  for mode in forward train; do
    log "${1#i16-}" $mode; timeout 105 $BENCH --preset "${1#i16-}" --models MambaDecoderBlock MLABlock --mode $mode \
        --isolate --dtype bfloat16 --batch-sizes 1 --seq-lens 2048 8192 --warmup 2 --runs 5 --min-time 2 \
        --output-dir "/tmp/r/${1#i16-}_$mode" --overwrite 2>&1 | grep -E "SeqLen|rror:"
    runs+=("${1#i16-}_$mode")
  done
  ;;
i16-sweep)   # issue 16: the DeepSeek-V3 block shape with --n-experts 8 64 256, forward
  env_info
  log n_experts sweep; timeout 300 $BENCH --preset deepseek-v3 --n-experts 8 64 256 --models MambaDecoderBlock MLABlock \
      --dtype bfloat16 --batch-sizes 1 --seq-lens 2048 8192 --warmup 2 --runs 5 --min-time 2 \
      --output-dir /tmp/r/sweep_n_experts --overwrite 2>&1 | grep -E "SeqLen|rror:"
  runs+=(sweep_n_experts)
  ;;
s8-a)   # session 8: issue 16's preset blocks (DeepSeek-V3, Kimi K2) forward and train, seq 2048 and 8192, and the
  # n_experts sweep, with energy per token from NVML (--isolate: one model's weights freed before the next);
  # each step gets what is left of a $BUDGET (default 540) s budget, in order of need
  env_info
  [ "${CARD_TESTS:-1}" = 1 ] && card_tests 60 tests/gpu -k "moe or MoE"
  left() { local l=$(( ${BUDGET:-540} - SECONDS )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
  for pm in deepseek-v3:forward deepseek-v3:train kimi-k2:forward kimi-k2:train; do
    p=${pm%:*}; mode=${pm#*:}
    log $p $mode; timeout $(left 120) $BENCH --preset $p --models MambaDecoderBlock MLABlock --mode $mode --isolate \
        --dtype bfloat16 --batch-sizes 1 --seq-lens 2048 8192 --warmup 2 --runs 5 --min-time 2 \
        --output-dir "/tmp/r/${p}_$mode" --overwrite 2>&1 | tee "$OUT/${p}_$mode.txt" | grep -E "SeqLen|rror:"
    runs+=("${p}_$mode")
  done
  # blocked: one config at a time, a model's other sizes freed before the next is built
  log n_experts sweep; timeout $(left 150) $BENCH --preset deepseek-v3 --n-experts 8 64 256 --models MambaDecoderBlock \
      MLABlock --order blocked --dtype bfloat16 --batch-sizes 1 --seq-lens 2048 8192 --warmup 2 --runs 5 --min-time 2 \
      --output-dir /tmp/r/sweep_n_experts --overwrite 2>&1 | tee "$OUT/sweep_n_experts.txt" | grep -E "SeqLen|rror:"
  runs+=(sweep_n_experts)
  ;;
s8-b)   # session 8: every tests/gpu test with the peer loaded, then issue 12's suite train step (fast and
  # mamba_ssm), within $BUDGET seconds (default 540)
  env_info
  load_peer
  B=${BUDGET:-540}
  card_tests $(( B * 2 / 5 )) tests/gpu
  log suite train; timeout $(( B - SECONDS > 10 ? B - SECONDS : 10 )) $BENCH --mode train --backend fast mamba_ssm \
      --dim 512 --seq-lens 2048 8192 --batch-sizes 8 --dtype bfloat16 --output-dir /tmp/r/train_s8 --overwrite 2>&1 \
      | grep -E "SeqLen|error|Kernels"
  runs+=(train_s8)
  ;;
s10)   # session 10: the mixer against mamba_ssm with host costs and the fp32 match (train_study), issue
  # 12's suite train step (fast and mamba_ssm), then the card's tests of the time segments and the
  # fused train path (peer loaded)
  env_info
  load_peer
  log study; timeout 100 python3 scripts/train_study.py --skip-tune --skip-scan --host | tee "$OUT/study.jsonl"
  log suite train; timeout 85 $BENCH --mode train --backend fast mamba_ssm --dim 512 --seq-lens 2048 8192 \
      --batch-sizes 8 --dtype bfloat16 --output-dir /tmp/r/train_s10 --overwrite 2>&1 | grep -E "SeqLen|error|Kernels"
  runs+=(train_s10)
  card_tests 60 tests/kernels/test_selective_scan_bdl.py tests/gpu/test_mamba_ssm.py \
      -k "segments or fused_mixer or lane_backward or mamba_ssm"
  ;;
s11)   # session 11's plan (written without a card), call 1 of 2: the card tests of the session's
  # changes (autocast training through the fused Functions on CUDA, whose autocast lists differ
  # from the CPU's; the several-warp backward tiles compiled), the mixer against mamba_ssm with
  # host costs, and issue 12's suite train step (the batch-8 fix of session 10 unmeasured till now)
  env_info
  load_peer
  card_tests 120 tests/models/test_autocast.py tests/kernels/test_selective_scan_bdl.py \
      -k "autocast or several_warps or fused_mixer or lane_backward"
  log study; timeout 150 python3 scripts/train_study.py --skip-tune --skip-scan --host | tee "$OUT/study.jsonl"
  log suite train; timeout 120 $BENCH --mode train --backend fast mamba_ssm --dim 512 --seq-lens 2048 8192 \
      --batch-sizes 8 --dtype bfloat16 --output-dir /tmp/r/train_s11 --overwrite 2>&1 | grep -E "SeqLen|error|Kernels"
  runs+=(train_s11)
  ;;
s11-tune)   # call 2 of 2: the backward's tile sweep (train_study.BWD_TUNE: 1-, 2- and 4-warp tiles) at
  # B8 L2048 and L8192, each config at both shapes (NOTES.md run 9 has the predictions)
  env_info
  log tune; timeout 480 python3 -c 'import sys; sys.path.insert(0, "scripts"); import train_study as t
t.emit(what="env", device=t.torch.cuda.get_device_name()); t.tune_bwd(420)' | tee "$OUT/tune.jsonl"
  ;;
sweep)   # the spec's default grid, fp32 and bf16, both backends
  timeout 560 $BENCH --backend fast reference --dtype float32 bfloat16 --output-dir /tmp/r/default_sweep \
      --overwrite 2>&1 | tail -60
  runs+=(default_sweep)
  ;;
targets)   # issue 3: the floor, the reference and the fast backend (eager and graphed), one call
  log floor; timeout 150 python3 .devcarry/gpu_floor.py | tee "$OUT/floor.jsonl"
  targets
  ;;
workloads)   # issue 4: decode (eager, graphed, full cache), train, and the timer check
  for v in "" "--cuda-graphs"; do
    log decode $v
    timeout 120 $BENCH --mode decode $v --seq-lens 512 2048 8192 --batch-sizes 8 --dtype bfloat16 --runs 50 \
        --warmup 10 --output-dir "/tmp/r/decode${v:+_graphs}" --overwrite 2>&1 | grep -E "SeqLen|error"
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
  ;;
esac
[ ${#runs[@]} -gt 0 ] && tar czf "$OUT/runs-${1:-check}.tgz" -C /tmp/r "${runs[@]}"
log done
