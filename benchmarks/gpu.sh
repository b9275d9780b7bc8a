#!/usr/bin/env bash
# The GPU benchmark in one go: training steps and class images at SD 1.5 size (512 px, batch 1 + 1 prior,
# through dreamlora's train() and make_class_images on a random-weight SD 1.5 folder) and SDXL size
# (1024 px, batch 1 + 1 prior, rank 16, through train() on a random-weight SDXL folder: the UNet alone and with
# both text encoders), in bf16 and fp16, with and without gradient checkpointing and 8-bit AdamW; then one table.
#
#   bash benchmarks/gpu.sh               # on a CUDA machine; about 8 minutes on one H100/H200-class GPU
#   bash benchmarks/gpu.sh --quick       # bf16 only, no compile row, no quality references: about 4 minutes
#   bash benchmarks/gpu.sh --flux        # FLUX.1-dev at 512 px, rank 16, batch 1 + 1 prior, cached latents and T5
#                                        # states (T5 on the CPU), checkpointing, 8-bit AdamW: NF4 (target <= 10 GB),
#                                        # int8 (<= 16 GB) and bf16 transformers; random weights at full size
#                                        # (builds a 24 GB folder first: about 10 minutes, 50 GB of disk)
#   bash benchmarks/gpu.sh --cpu-smoke   # the same code paths on the CPU at reduced size (a few minutes)
#
# Results: one JSON line a row in $RESULTS (default: $OUT/dreamlora-bench.jsonl when $OUT is set,
# else /tmp/dreamlora-bench.jsonl), the combined table on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=gpu
quick=0
flux=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) mode=cpu-smoke ;;
    --quick) quick=1 ;;
    --flux) flux=1 ;;
    *) echo "usage: bash benchmarks/gpu.sh [--cpu-smoke] [--quick] [--flux]" >&2; exit 2 ;;
  esac
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DREAMLORA_BENCH_DIR="${DREAMLORA_BENCH_DIR:-/tmp/dreamlora-bench}"
export DREAMLORA_CACHE="${DREAMLORA_CACHE:-$DREAMLORA_BENCH_DIR/cache}"
results="${RESULTS:-${OUT:-/tmp}/dreamlora-bench.jsonl}"
: > "$results"

if [[ $mode == gpu ]]; then
  if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device here; run with --cpu-smoke on a CPU machine" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python -c "import torch, diffusers, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| bitsandbytes', b.__version__)" 2>/dev/null

status=0
train_args=(--preset "$mode" --json "$results" --timeout 400)
priors_args=(--preset "$mode" --json "$results" --timeout 400)
if [[ $quick == 1 ]]; then
  export DREAMLORA_BENCH_QUICK=1  # train_step.py: bf16 rows only, no compile row
  priors_args+=(--no-quality)
fi
if [[ $flux == 1 && $mode == gpu ]]; then
  echo "== Flux training steps" >&2
  python benchmarks/train_step.py --preset gpu-flux --json "$results" --timeout 1200 >&2 || status=1
  python benchmarks/report.py "$results" || status=1
  exit $status
fi
echo "== training steps ($mode)" >&2
python benchmarks/train_step.py "${train_args[@]}" >&2 || status=1
echo "== class images ($mode)" >&2
python benchmarks/priors.py "${priors_args[@]}" >&2 || status=1
python benchmarks/report.py "$results" || status=1
exit $status
