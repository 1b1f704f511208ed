#!/usr/bin/env bash
# Issue 16's measurements on one host with 2 GPUs (H200s), in one call of ~9 minutes; every result is JSON under $OUT.
#
#   OUT=/some/dir bash tools/run_multi_gpu_benchmarks.sh
#
# Sections (SECTIONS, in this order; each step runs under `timeout` with its budget cut to what is left of
# TOTAL_BUDGET, and is skipped -- a "skipped" line in steps.jsonl -- when less than its minimum is left):
#   equiv    tools/kvpo_equivalence.py: single-process references (ref, ref_split2, ref_split3) and the 2-GPU
#            layouts tp2, cp2, cp2_allgather, dp2, dp2_branches, fp32 and bf16 (NCCL), then `compare`
#            -> equivalence.json (exit 0 = every layout passes its rule)                       ~1.5-2 min
#   scaling  tools/bench_iteration.py, wan-1.3b, 480x832, G=8, W=5, on the fast path ($FAST): 1 GPU, then
#            DP=2 over prompts (weak), DP=2 over branches and TP=2 (strong) in one 2-GPU launch, comm profiled for
#            TP -> scaling.jsonl                                                                 ~5 min
#   wan14b   wan-14b, TP=2, $W14_FRAMES latent frames, G=8, W=5, one iteration (no warm-up: the first step's
#            times include one-off costs) -> wan14b.jsonl                      ~5 min at 27 frames: a call of its
#            own (SECTIONS=wan14b); W14_FRAMES=87 TOTAL_BUDGET=580 is the most one 10-minute call held (~9 min)
#   cp       CP=2 with both cores (Ulysses and all-gather) on the local spec (the TE spec builds Ulysses only): its
#            own 1-GPU local baseline and the two CP layouts -> scaling_cp.jsonl                 ~3 min, if left
#
# Sizes (why fewer than 147 frames): the whole job must fit one 10-minute call. From tools/BENCHMARKS.md, one
# steady 1.3B block on the fast path is ~0.33 s per sample and a replay tuple ~0.2-0.3 s; at FRAMES=21 with the
# pivot at block 4 (the earliest allowed; fixed so that every rank and layout does the same work) a group denoises
# 4 + 9 x 3 = 31 sample-blocks, scores 8 x 3 blocks and replays 8 x 3 x 2 = 48 tuples: ~30 s per iteration on
# one GPU, and each layout runs a warm-up step (compile, graph capture) and a timed one. The 5-block window is
# cut to 3 blocks by the end of a 21-frame video; FRAMES=27 keeps W=5 whole (~1.5x the time). The 147-frame,
# 1-GPU iteration is issue 12's benchmark; scale FRAMES up when a call has the time.
#
# Knobs (environment): OUT (required), SECTIONS, TOTAL_BUDGET (s, 540), FRAMES (21), G (8), W (5), PIVOT (4),
# DTYPE (bf16), PRESET (wan-1.3b), W14_PRESET (wan-14b), LATENT ("60 104"), LORA_RANK (256), WARMUP (the
# scaling runs' warm-up flags, "--warmup 1": one full untimed step per layout),
# FAST (fast-path config overrides; without TransformerEngine the spec=te part is dropped), LOCAL_FAST (the CP
# section's), W14_FRAMES (27: pivot 4 + the whole 5-block window), W14 (14B overrides: TE,
# weights initialised on the GPUs -- seconds instead of minutes of CPU init --, the anchor and the branches one at a
# time and a replay of 4 tuples per batch with per-block recompute: 89.3-89.6 GB per GPU measured at 27-87 frames;
# all 9 samples in one batch ran out of memory at 139 GB, tools/BENCHMARKS.md).
# Files in $OUT: steps.jsonl (rc, seconds and budget of every step), run.log (all output), env.txt,
# equivalence.json, scaling.jsonl, wan14b.jsonl, scaling_cp.jsonl.
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
# NVLink multicast stays off (KINDS.md): NCCL, PyTorch symmetric memory, NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
SECTIONS=${SECTIONS:-"equiv scaling wan14b cp"}
TOTAL=${TOTAL_BUDGET:-540}
FRAMES=${FRAMES:-21} G=${G:-8} W=${W:-5} PIVOT=${PIVOT:-4} DTYPE=${DTYPE:-bf16}
PRESET=${PRESET:-wan-1.3b} W14_PRESET=${W14_PRESET:-wan-14b} LATENT=${LATENT:-"60 104"} LORA_RANK=${LORA_RANK:-256}
FAST=${FAST-"model.overrides.spec=te model.compile=true model.cuda_graphs=true"}
LOCAL_FAST=${LOCAL_FAST-"model.compile=true model.cuda_graphs=true"}
W14_FRAMES=${W14_FRAMES:-27}
W14=${W14-"model.overrides.spec=te model.overrides.use_cpu_initialization=false rollout.batch_size=1 \
replay.batch_size=4 replay.recompute=blocks"}
T0=$(date +%s)
TR1="python3 -m torch.distributed.run --standalone --nproc_per_node 1"
TR2="python3 -m torch.distributed.run --standalone --nproc_per_node 2"
read -r LH LW <<< "$LATENT"
SIZE="--latent-h $LH --latent-w $LW --lora-rank $LORA_RANK --branches $G --window $W --pivot $PIVOT --dtype $DTYPE"
WARMUP=${WARMUP-"--warmup 1"}
COMMON="--preset $PRESET --frames $FRAMES $SIZE $WARMUP --repeats 1"
EQ=$(mktemp -d)

has() { [[ " $SECTIONS " == *" $1 "* ]]; }

# step NAME BUDGET_S MIN_S 'COMMAND': COMMAND (evaluated; $STEP_BUDGET holds the step's budget) under a timeout.
step() {
  local name=$1 budget=$2 min=$3 cmd=$4 left s rc
  left=$(( TOTAL - ($(date +%s) - T0) ))
  (( budget > left )) && budget=$left
  if (( budget < min )); then
    echo "{\"step\": \"$name\", \"skipped\": \"$left s left of TOTAL_BUDGET\"}" | tee -a "$OUT/steps.jsonl"
    return 99
  fi
  STEP_BUDGET=$budget
  echo "=== $name (budget ${budget}s): $(eval echo "$cmd")" >> "$OUT/run.log"
  s=$(date +%s)
  timeout --kill-after=20 "$budget" bash -c "$(eval echo "$cmd")" >> "$OUT/run.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - s )), \"budget\": $budget}" \
    | tee -a "$OUT/steps.jsonl"
  return $rc
}

python3 - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print("transformer_engine", importlib.util.find_spec("transformer_engine") is not None)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/env.txt" 2>&1
if ! python3 -c "import transformer_engine.pytorch" > /dev/null 2>&1; then  # no TE here: the local spec instead
  FAST=${FAST//model.overrides.spec=te/} W14=${W14//model.overrides.spec=te/}
  echo "TransformerEngine missing: FAST='$FAST' W14='$W14'" | tee -a "$OUT/env.txt"
fi

if has equiv; then
  step equiv_refs 75 30 "$TR1 tools/kvpo_equivalence.py run --layouts ref,ref_split2,ref_split3 --out $EQ --dtype fp32,bf16" &&
  step equiv_layouts 120 40 "$TR2 tools/kvpo_equivalence.py run --layouts tp2,cp2,cp2_allgather,dp2,dp2_branches --out $EQ --dtype fp32,bf16"
  python3 tools/kvpo_equivalence.py compare "$EQ" > "$OUT/equivalence.json" 2>> "$OUT/run.log"
  echo "{\"step\": \"equiv_compare\", \"rc\": $?}" | tee -a "$OUT/steps.jsonl"
fi

if has scaling; then
  step scaling_1gpu 150 60 "$TR1 tools/bench_iteration.py $COMMON --json-out $OUT/scaling.jsonl $FAST" &&
  step scaling_2gpu 240 60 "$TR2 tools/bench_iteration.py $COMMON --layouts dp,branches,tp --profile-comm tp \
--baseline-json $OUT/scaling.jsonl --budget-s \$((STEP_BUDGET - 20)) --json-out $OUT/scaling.jsonl $FAST"
fi

if has wan14b; then
  W14CMD="$TR2 tools/bench_iteration.py --preset $W14_PRESET --frames $W14_FRAMES $SIZE --layouts tp --warmup 0 \
--repeats 1 --json-out $OUT/wan14b.jsonl"
  t=$(date +%s)
  step wan14b 560 300 "$W14CMD $W14"
  rc=$?
  if (( rc != 0 && rc != 99 && $(date +%s) - t < 90 )); then  # failed at once (e.g. GPU init): CPU init instead
    step wan14b_cpu_init 560 300 "$W14CMD ${W14//model.overrides.use_cpu_initialization=false/}"
  fi
fi

if has cp; then
  step cp_1gpu 120 60 "$TR1 tools/bench_iteration.py $COMMON --json-out $OUT/scaling_cp.jsonl $LOCAL_FAST" &&
  step cp_2gpu 150 60 "$TR2 tools/bench_iteration.py $COMMON --layouts cp,cp-allgather --profile-comm \
--baseline-json $OUT/scaling_cp.jsonl --budget-s \$((STEP_BUDGET - 20)) --json-out $OUT/scaling_cp.jsonl $LOCAL_FAST"
fi
echo "{\"total_seconds\": $(( $(date +%s) - T0 ))}" | tee -a "$OUT/steps.jsonl"
rm -rf "$EQ"
