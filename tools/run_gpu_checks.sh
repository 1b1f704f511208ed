#!/usr/bin/env bash
# GPU correctness tests and single-GPU benchmarks of the library's fast path, two GPUs used side by side
# (GPU 0 and GPU 1 run independent single-GPU jobs; one GPU runs both lanes one after the other).
# Every result lands under $OUT (JSON lines, logs). Run from the project root with TransformerEngine and
# megatron-core importable (PYTHONPATH), e.g. on the GPU machine after ../shared/device staging:
#   PYTHONPATH=$PWD:/tmp/site bash tools/run_gpu_checks.sh tests      # GPU tests + rollout/replay/attention benches
#   PYTHONPATH=$PWD:/tmp/site bash tools/run_gpu_checks.sh iteration  # 147-frame KVPO iterations, bf16 and FP8
# Each lane has a time budget (LANE_S, seconds) so that the command returns with whatever finished.
set -uo pipefail
part=${1:-tests}
OUT=${OUT:-outputs/gpu}
LANE_S=${LANE_S:-520}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
second=$([ "$ngpu" -ge 2 ] && echo 1 || echo 0)
W13="--latent-h 60 --latent-w 104"
FAST="--spec te --compile --cuda-graphs"

lane() {  # lane GPU NAME COMMANDS...: run the commands on one GPU, in order, within LANE_S seconds
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout "$LANE_S" bash -c "$*" >"$OUT/$name.log" 2>&1
  echo "lane $name exit $?" >>"$OUT/lanes.txt"
}

case $part in
tests)
  lane 0 tests "KVPO_GPU_REPORT=$OUT/gpu_report.jsonl python3 -m pytest -m gpu -q -x tests/test_gpu_fast_path.py \
      tests/test_gpu.py tests/test_split_attention.py -p no:cacheprovider;
    python3 tools/bench_replay.py --config wan-1.3b $W13 --branches 2 --spec te --compile --no-reference \
      | tail -1 >> $OUT/bench.jsonl;
    python3 tools/bench_replay.py --config wan-1.3b $W13 --branches 4 --spec te --compile --recompute \
      --no-reference | tail -1 >> $OUT/bench.jsonl" &
  lane "$second" rollout "python3 tools/bench_rollout.py --config wan-1.3b $W13 $FAST --lora-rank 256 \
      | tail -1 >> $OUT/bench.jsonl;
    python3 tools/bench_rollout.py --config wan-1.3b $W13 $FAST --lora-rank 256 --batch 9 --no-reference \
      | tail -1 >> $OUT/bench.jsonl;
    python3 tools/bench_rollout.py --config wan-1.3b $W13 $FAST --lora-rank 256 --fp8 hybrid --fp8-recipe delayed \
      --fp8-dpa --fp8-linears ffn --no-reference | tail -1 >> $OUT/bench.jsonl;
    python3 tools/bench_attention.py --batch 1,2 | tail -1 >> $OUT/bench.jsonl;
    python3 tools/bench_rollout.py --config wan2.2-5b --generator longlive2-5b --latent-h 44 --latent-w 80 \
      --frames 48 $FAST --lora-rank 128 --no-reference | tail -1 >> $OUT/bench.jsonl" &
  wait ;;
iteration)
  IT="python3 tools/bench_iteration.py --preset wan-1.3b --frames 147 --branches 8 --window 5 --lora-rank 256 \
      $FAST --warmup-frames 30"
  lane 0 iter_bf16 "$IT --json-out $OUT/iteration.jsonl" &
  lane "$second" iter_fp8 "$IT --fp8 hybrid --fp8-recipe delayed --fp8-dpa --fp8-linears ffn \
      --json-out $OUT/iteration.jsonl" &
  wait ;;
*) echo "usage: $0 tests|iteration" >&2; exit 2 ;;
esac
cat "$OUT/lanes.txt"
