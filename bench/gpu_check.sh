#!/usr/bin/env bash
# GPU check: the STR pipeline (sft, sample, reward, ppo) on a GPT-2-small sized model (12 layers, 768 dim,
# 12 heads, vocab from the task's BPE tokenizer; random init, built from its config) with bf16, under
# DeepSpeed ZeRO-2 and then ZeRO-3, on every visible GPU, through `accelerate launch`. Prints, per run
# and stage, the wall time, samples/s (episodes/s and tokens/s for PPO) and the peak GPU memory
# (torch.cuda.max_memory_allocated, largest over processes), also written to OUT/gpu_check_<run>.json.
# Downloads nothing: it needs the project's Python environment already installed (PYTHON or .venv).
# Target: under ~8 minutes on one H200.
#
#   bash bench/gpu_check.sh [--out DIR] [--stages "zero2 zero3"] [--embedder NAME]
#   bash bench/gpu_check.sh --cpu --tiny     # the same wiring on CPU (gloo, fp32, 2 processes, tiny model)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT=""
RUNS="zero2 zero3"
CPU=0
TINY=0
EMBEDDER="lexical"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --stages|--runs) RUNS="$2"; shift 2 ;;
    --embedder) EMBEDDER="$2"; shift 2 ;;
    --cpu) CPU=1; shift ;;
    --tiny) TINY=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
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
  PRECISION=no
  export OMP_NUM_THREADS=1
else
  # Fail fast, before any launch, when there is no usable GPU.
  if ! NPROC="$("$PYTHON" -c 'import torch, sys; n = torch.cuda.device_count(); print(n); sys.exit(0 if n > 0 else 1)' 2>/dev/null)"; then
    echo "gpu_check: no CUDA GPU visible to torch ($PYTHON); use --cpu --tiny for the CPU wiring check" >&2
    exit 1
  fi
  PRECISION=bf16
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
  if [[ $PRECISION == bf16 ]]; then BF16='"bf16": {"enabled": "auto"},'; else BF16=""; fi
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
  env -u ACCELERATE_USE_CPU "$ACCELERATE" launch --num_processes "$NPROC" --num_machines 1 \
    --mixed_precision "$PRECISION" --dynamo_backend no --main_process_port "$PORT" \
    --use_deepspeed --deepspeed_config_file "$CONFIG" \
    "$HERE/gpu_check.py" --out "$OUT" --label "$RUN" --embedder "$EMBEDDER" "${TINY_FLAG[@]}" \
    > "$OUT/$RUN.log" 2>&1 || { tail -n 60 "$OUT/$RUN.log" >&2; echo "gpu_check: $RUN failed (log: $OUT/$RUN.log)" >&2; exit 1; }
  grep -E "^ *$RUN " "$OUT/$RUN.log" || true
  echo "gpu_check: $RUN done in $(( $(date +%s) - started )) s"
done
echo "gpu_check: results in $OUT/gpu_check_*.json"
