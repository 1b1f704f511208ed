#!/usr/bin/env bash
# GPU correctness tests and single-GPU benchmarks of the library's fast path, two GPUs used side by side
# (GPU 0 and GPU 1 run independent single-GPU jobs; one GPU runs both lanes one after the other).
# Every result lands under $OUT (JSON lines, logs). Run from the project root with TransformerEngine and
# megatron-core importable (PYTHONPATH), e.g. on the GPU machine after ../shared/device staging:
#   PYTHONPATH=$PWD:/tmp/site bash tools/run_gpu_checks.sh all    # GPU tests, rollout/replay/attention benches, and
#                                                                 # 147-frame KVPO iterations (bf16; FP8 rollout)
#   PYTHONPATH=$PWD:/tmp/site bash tools/run_gpu_checks.sh tests  # GPU tests only
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

FASTCFG="model.overrides.spec=te model.overrides.use_cpu_initialization=false model.compile=true model.cuda_graphs=true"
FP8CFG="model.overrides.fp8=hybrid model.overrides.fp8_recipe=delayed model.overrides.fp8_dot_product_attention=true \
  model.fp8_linears=[ffn]"
IT="python3 tools/bench_iteration.py --preset wan-1.3b --frames 147 --branches 8 --window 5 --lora-rank 256 \
  --warmup 1 --json-out $OUT/iteration.jsonl"

case $part in
all)  # GPU tests, then the 147-frame bf16 iteration | rollout and replay benches, then the FP8-rollout iteration
  lane 0 tests_iter_bf16 "KVPO_GPU_REPORT=$OUT/gpu_report.jsonl python3 -m pytest -m gpu -q --timeout 300 \
      tests/kvpo/test_gpu_fast_path.py tests/model/test_gpu_te.py tests/model/test_split_attention.py -p no:cacheprovider;
    $IT $FASTCFG;
    python3 tools/bench_attention.py --batch 1,2 | tail -1 >> $OUT/bench.jsonl;
    python3 tools/bench_rollout.py --config wan2.2-5b --generator longlive2-5b --latent-h 44 --latent-w 80 \
      --frames 48 $FAST --lora-rank 128 --no-reference | tail -1 >> $OUT/bench.jsonl" &
  lane "$second" bench_iter_fp8 "python3 tools/bench_rollout.py --config wan-1.3b $W13 $FAST --lora-rank 256 \
      | tail -1 >> $OUT/bench.jsonl;
    python3 tools/bench_replay.py --config wan-1.3b $W13 --branches 2 --spec te --compile --no-reference \
      | tail -1 >> $OUT/bench.jsonl;
    $IT $FASTCFG $FP8CFG" &
  wait ;;
tests)
  lane 0 tests "KVPO_GPU_REPORT=$OUT/gpu_report.jsonl python3 -m pytest -m gpu -q --timeout 300 \
      tests/kvpo/test_gpu_fast_path.py tests/model/test_gpu_te.py tests/model/test_split_attention.py -p no:cacheprovider" ;;
*) echo "usage: $0 all|tests" >&2; exit 2 ;;
esac
cat "$OUT/lanes.txt"
