#!/usr/bin/env bash
# The GPU measurements of issue 12 as one prepared script, for a session that is lent a GPU machine.
#
# That machine has PyTorch, torchvision, numpy, pillow, pyyaml, tqdm and matplotlib but cannot install anything, so
# the package runs from the checkout (PYTHONPATH), not from .venv: training and `workbench bench` import none of the
# notebook/dashboard packages. Results go to $OUT (the device tool brings back what is written there), else to
# reports/bench. Sized for a 15-minute device budget: run the two parts as two calls.
#
#   bash benchmarks/gpu_session.sh efficiency   # ~8 min on an H100: 9 methods x (fp32, bf16, bf16+channels_last) +
#                                               # UniMatch toggles, DeepLabV3+ ResNet-101 321x321 batch 8+8, 1 round
#   bash benchmarks/gpu_session.sh amp          # ~6 min: UniMatch, ResNet-101, bf16 vs fp32 curves, 2 seeds x 150 steps
#   bash benchmarks/gpu_session.sh syncs        # ~2 min: every method's step, untrained and confident, ResNet-101
#                                               # 321x321 batch 2+2: the counter of workbench/engine/syncs.py
#                                               # against torch.cuda.set_sync_debug_mode("warn") on the same step
#
# Each writes <name>.json and <name>.md; efficiency also gives every method's step time and memory relative to
# UniMatch at the same precision. More rounds/steps: edit the numbers below when the budget allows.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-reports/bench}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
"$py" - <<'PY'
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
case "${1:-}" in
    efficiency)
        "$py" benchmarks/efficiency.py --preset paper --rounds 1 --iters 5 --warmup 3 --repeats 2 --out "$out" \
            2>&1 | tee "$out/efficiency.log" ;;
    amp)
        [ -f data/synthetic/manifest.json ] || "$py" -m workbench data synth --out data/synthetic
        "$py" benchmarks/amp_curves.py --iters 150 --seeds 0 1 \
            --set model.backbone=resnet101 --set model.width=1.0 --set model.head_width=1.0 \
            --set model.output_stride=16 --set model.aspp_rates=null --out "$out/amp_curves_cuda" 2>&1 | tee "$out/amp.log" ;;
    syncs)
        # fails (after writing the JSON) when the CPU-side counter and CUDA's own sync report disagree on a step
        "$py" benchmarks/syncs.py --device cuda --label cuda --crop 321 --batch 2 --classes 21 \
            --set model.backbone=resnet101 --set model.stem=deep --set model.width=1.0 --set model.head_width=1.0 \
            --set model.output_stride=16 --set model.aspp_rates=null --out "$out/syncs_cuda" 2>&1 | tee "$out/syncs.log" ;;
    *) echo "usage: bash benchmarks/gpu_session.sh efficiency|amp|syncs" >&2; exit 2 ;;
esac
