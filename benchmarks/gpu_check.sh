#!/usr/bin/env bash
# GPU checks for a machine with one CUDA GPU (run from the repository root):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. benchmarks/gpu_benchmark.py: fused attention kernels, bf16/fp16 steps, the on-device skip of
#    non-finite steps, training throughput of Swin-B / ViT-B / SwinV2-B;
# 2. the official Swin-B pre-training YAML end to end (data loading, bf16, checkpoint) on the
#    synthetic set; 3. fp16 + GradScaler through the training loop; 4. two torchrun ranks (NCCL).
# Wheels of packages the machine lacks (e.g. yacs, termcolor) may be put in .whl/.
set -uo pipefail
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" >> "$OUT/nvidia_smi.txt"

python3 benchmarks/gpu_benchmark.py --out "$OUT/gpu_benchmark.md" --steps 20 > "$OUT/gpu_benchmark.log" 2>&1

timeout 150 python3 main_simmim.py \
    --cfg configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml \
    --batch-size 128 --output /tmp/e2e --opts DATA.DATASET synthetic DATA.SYNTHETIC.TRAIN_SIZE 5120 \
    DATA.NUM_WORKERS 15 TRAIN.EPOCHS 1 PRINT_FREQ 10 TENSORBOARD False > "$OUT/e2e_swinb.log" 2>&1
echo "exit code $?" >> "$OUT/e2e_swinb.log"

timeout 90 python3 main_simmim.py --cfg configs/quickstart/simmim_pretrain__swin_tiny__img64__synthetic.yaml \
    --output /tmp/fp16 --opts AMP_DTYPE float16 TRAIN.EPOCHS 2 PRINT_FREQ 16 DATA.NUM_WORKERS 8 \
    VIS_FREQ 1 > "$OUT/fp16_quickstart.log" 2>&1
echo "exit code $?" >> "$OUT/fp16_quickstart.log"

timeout 60 torchrun --nproc_per_node 2 main_simmim.py --cfg tests/configs/tiny_swin_pretrain.yaml \
    --output /tmp/nccl --opts TRAIN.EPOCHS 1 DATA.BATCH_SIZE 4 > "$OUT/torchrun_nccl.log" 2>&1
echo "exit code $?" >> "$OUT/torchrun_nccl.log"

# --- Scale (issue 11): the memory planner against measured peaks, FSDP overhead and images/s of
# SwinV2-B/L/H/G (benchmarks/memory_check.py; one GPU, so FSDP runs over a group of one rank). ---
timeout 420 python3 benchmarks/memory_check.py --device cuda --out "$OUT/memory_gpu.md" > "$OUT/memory_gpu.log" 2>&1
echo "exit code $?" >> "$OUT/memory_gpu.log"
