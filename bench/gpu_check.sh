#!/usr/bin/env bash
# GPU check: the STR pipeline (sft, sample, reward, ppo) on a GPT-2-small sized model (12 layers, 768 dim,
# 12 heads, vocab from the task's BPE tokenizer; random init, built from its config) under DeepSpeed
# ZeRO-2 and then ZeRO-3, on every visible GPU, through `accelerate launch`, with bf16 mixed precision
# switched on by the experiment's model.mixed_precision (float32 master weights; the DeepSpeed JSON
# leaves bf16 at "auto" and the launcher at --mixed_precision no). The ZeRO-2 run then checks a PPO run
# cut after step 2 and resumed: the optimizer state must come back exactly. Prints, per run and stage,
# the wall time, samples/s (episodes/s and tokens/s for PPO) and the peak GPU memory
# (torch.cuda.max_memory_allocated, largest over processes), also written to OUT/gpu_check_<run>.json.
# Downloads nothing: it needs the project's Python environment already installed (PYTHON or .venv).
# Target: about 5 minutes on one H200 (each run is one launch, well under 10 minutes).
#
#   bash bench/gpu_check.sh [--out DIR] [--stages "zero2 zero3"] [--embedder NAME] [--precision bf16|no]
#   bash bench/gpu_check.sh --cpu --tiny     # the same wiring on CPU (gloo, bf16, 2 processes, tiny model)
#
# The pre-trained SmolLM2-135M-Instruct at full size (configs/smollm2_<task>.yaml, bf16), after the runs
# above or alone: --smollm2 "squad_v2 dailydialog cornell" [--smollm2-only] [--set KEY=VALUE ...]
# (overrides for those runs, e.g. --set ppo.steps=50 to fit a time budget); each ends with its report
# table, and its run folder is OUT/runs/gpu-smollm2-<task>/. --dry-run: only the preflight of those runs (nothing trained).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT=""
RUNS="zero2 zero3"
CPU=0
TINY=0
EMBEDDER="lexical"
PRECISION=bf16
SMOLLM2=""
SMOLLM2_ONLY=0
DRY_RUN=0
SETS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --stages|--runs) RUNS="$2"; shift 2 ;;
    --embedder) EMBEDDER="$2"; shift 2 ;;
    --precision) PRECISION="$2"; shift 2 ;;
    --cpu) CPU=1; shift ;;
    --tiny) TINY=1; shift ;;
    --smollm2) SMOLLM2="$2"; shift 2 ;;
    --smollm2-only) SMOLLM2_ONLY=1; RUNS=""; shift ;;
    --set) SETS+=(--set "$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
ACCELERATE="$(dirname "$PYTHON")/accelerate"
[[ -x "$ACCELERATE" ]] || { echo "gpu_check: accelerate not found next to $PYTHON" >&2; exit 1; }
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")}"
mkdir -p "$OUT"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}"

if [[ $CPU -eq 1 ]]; then
  NPROC=2
  export OMP_NUM_THREADS=1
else
  # Fail fast, before any launch, when there is no usable GPU.
  if ! NPROC="$("$PYTHON" -c 'import torch, sys; n = torch.cuda.device_count(); print(n); sys.exit(0 if n > 0 else 1)' 2>/dev/null)"; then
    echo "gpu_check: no CUDA GPU visible to torch ($PYTHON); use --cpu --tiny for the CPU wiring check" >&2
    exit 1
  fi
fi
TINY_FLAG=()
[[ $TINY -eq 1 ]] && TINY_FLAG=(--tiny)
echo "gpu_check: $NPROC process(es), precision $PRECISION, runs: $RUNS, output $OUT"

for RUN in $RUNS; do
  case "$RUN" in
    zero2) STAGE=2 ;;
    zero3) STAGE=3 ;;
    *) echo "gpu_check: unknown run $RUN (zero2, zero3)" >&2; exit 2 ;;
  esac
  CONFIG="$OUT/ds_$RUN.json"
  # bf16 "auto": model.mixed_precision (--mixed-precision below) decides, as with the shipped JSONs.
  BF16='"bf16": {"enabled": "auto"},'
  RESUME=()
  [[ $STAGE -eq 2 ]] && RESUME=(--resume-check)
  if [[ $STAGE -eq 3 ]]; then
    ZERO='{"stage": 3, "stage3_gather_16bit_weights_on_model_save": true}'
  else
    ZERO='{"stage": 2}'
  fi
  cat > "$CONFIG" <<JSON
{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, $BF16
 "zero_optimization": $ZERO, "steps_per_print": 1000000}
JSON
  PORT=$(( 29500 + RANDOM % 2000 ))
  started=$(date +%s)
  # DeepSpeed must not see ACCELERATE_USE_CPU (accelerate would drop DeepSpeed); on CPU it uses gloo.
  # The launcher stays at --mixed_precision no: the experiment's model.mixed_precision is the one setting.
  env -u ACCELERATE_USE_CPU "$ACCELERATE" launch --num_processes "$NPROC" --num_machines 1 \
    --mixed_precision no --dynamo_backend no --main_process_port "$PORT" \
    --use_deepspeed --deepspeed_config_file "$CONFIG" \
    "$HERE/gpu_check.py" --out "$OUT" --label "$RUN" --embedder "$EMBEDDER" --mixed-precision "$PRECISION" \
    "${TINY_FLAG[@]}" "${RESUME[@]}" \
    > "$OUT/$RUN.log" 2>&1 || { tail -n 60 "$OUT/$RUN.log" >&2; echo "gpu_check: $RUN failed (log: $OUT/$RUN.log)" >&2; exit 1; }
  grep -E "^ *$RUN " "$OUT/$RUN.log" || true
  echo "gpu_check: $RUN done in $(( $(date +%s) - started )) s"
done
[[ -n "$RUNS" ]] && echo "gpu_check: results in $OUT/gpu_check_*.json"

for TASK in $SMOLLM2; do
  TASK_CONFIG="$REPO/configs/smollm2_$TASK.yaml"
  [[ -f "$TASK_CONFIG" ]] || { echo "gpu_check: no config $TASK_CONFIG (squad_v2, dailydialog)" >&2; exit 2; }
  DRY=()
  [[ $DRY_RUN -eq 1 ]] && DRY=(--dry-run)
  ON_CPU=()
  [[ $CPU -eq 1 ]] && ON_CPU=(--cpu)
  PORT=$(( 29500 + RANDOM % 2000 ))
  started=$(date +%s)
  # The configs name ../shared/data relative to the repository: run from there.
  (cd "$REPO" && "$ACCELERATE" launch ${ON_CPU[@]+"${ON_CPU[@]}"} --num_processes "$NPROC" --num_machines 1 \
    --mixed_precision no --dynamo_backend no --main_process_port "$PORT" -m selfrank run "$TASK_CONFIG" \
    --set "name=gpu-smollm2-$TASK" --set "output_dir=$OUT/runs" ${SETS[@]+"${SETS[@]}"} ${DRY[@]+"${DRY[@]}"}) \
    > "$OUT/smollm2_$TASK.log" 2>&1 || { tail -n 60 "$OUT/smollm2_$TASK.log" >&2; echo "gpu_check: smollm2 $TASK failed (log: $OUT/smollm2_$TASK.log)" >&2; exit 1; }
  grep -E "^\||^report:|^checks passed" "$OUT/smollm2_$TASK.log" || true
  echo "gpu_check: smollm2 $TASK done in $(( $(date +%s) - started )) s"
done
