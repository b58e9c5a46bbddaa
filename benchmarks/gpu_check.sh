#!/usr/bin/env bash
# GPU checks for a machine with one CUDA GPU, in at most 9 minutes (run from the repository root):
#   bash benchmarks/gpu_check.sh OUT_DIR [OFFICIAL_DIR]
# Every part is time-boxed and writes into OUT_DIR; a part that runs out of time leaves what it had.
#  1. benchmarks.speed: official SimMIM (fp16 + GradScaler, eager) vs ours eager (bf16) vs ours
#     compiled (TRAIN.COMPILE blocks / model) for Swin-B/192, ViT-B/224, SwinV2-B/192, batch 128:
#     images/s, ms/step, peak memory, TFLOP/s, MFU, ratios to the official row;
#  2. benchmarks.loader_speed: the data path per worker against the official pipeline, CPU cores
#     per GPU with and without DATA.DECODE gpu, the GPU's share of the 8-bit hand-over;
#  3. benchmarks.ddp_compile_check: DDP (NCCL, one rank) + compile, no recompilation after
#     warm-up; then main_simmim.py --compile blocks end to end (synthetic data, Swin-B YAML);
#  4. benchmarks.attention_speed: Swin window attention formulations (sdpa, flex, ...);
#  5. benchmarks.profile_step: where a Swin-B step's GPU time goes, eager and compiled;
#  6. fp16 + GradScaler end to end, two torchrun ranks on NCCL, benchmarks/memory_check.py.
# OFFICIAL_DIR (a checkout of microsoft/SimMIM) defaults to reference/official_code/SimMIM under
# ../shared, shared or ../../shared, whichever exists; without one speed.py has no official rows.
# benchmarks/gpu_benchmark.py (fused-kernel and fp16 checks, in RESULTS.md) is not rerun here. Wheels of packages the machine
# lacks (e.g. yacs, termcolor) may be put in .whl/. On a machine without CUDA every part runs its
# CPU fallback with tiny sizes (a smoke test of this script).
set -uo pipefail
OUT=${1:-${OUT:-gpu_out}}
OFFICIAL=${2:-}
for candidate in ../shared shared ../../shared; do
    [ -z "$OFFICIAL" ] && [ -d "$candidate/reference/official_code/SimMIM/models" ] \
        && OFFICIAL=$candidate/reference/official_code/SimMIM
done
TOTAL=${GPU_CHECK_SECONDS:-540}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OFFICIAL_FLAG=()
[ -n "$OFFICIAL" ] && [ -d "$OFFICIAL/models" ] && OFFICIAL_FLAG=(--official-dir "$OFFICIAL")

# run NAME LIMIT_SECONDS COMMAND...: at most LIMIT seconds and never past the total budget.
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "$name: skipped, the ${TOTAL}s budget is spent" | tee -a "$OUT/summary.txt"
        return
    fi
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    echo "$name: exit code $code after $((SECONDS - start))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
}

if command -v nvidia-smi >/dev/null && $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    CUDA=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/machine.txt"
    SPEED=(--budget 270 --row-timeout 240)
    LOADER=(--num-images 512 --batch-size 32 --workers 8 --rounds 2)
    DDP=()
    ATTN=()
    PROFILE=(--device cuda --batch-size 128 --model swin_b --steps 3)
else
    CUDA=0
    echo "no CUDA GPU: CPU smoke test with tiny sizes" > "$OUT/machine.txt"
    SPEED=(--device cpu --models vit_tiny --variants official,eager --steps 1 --rounds 1
           --warmup 1 --threads 1)
    LOADER=(--num-images 16 --batch-size 8 --workers 1 --rounds 1)
    DDP=(--cfg tests/configs/tiny_swin_pretrain.yaml --backend aot_eager --steps 2)
    ATTN=(--rounds 1 --reps 1 --variants textbook,sdpa --threads 1)
    PROFILE=(--device cpu --batch-size 2 --model vit_tiny --steps 1 --threads 1)
fi
$PY -c "import torch, torchvision, timm, PIL; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'timm', timm.__version__, 'Pillow', PIL.__version__)" >> "$OUT/machine.txt"

run speed 300 $PY -m benchmarks.speed "${SPEED[@]}" "${OFFICIAL_FLAG[@]}" --out "$OUT/speed.md"
run loader 75 $PY -m benchmarks.loader_speed "${LOADER[@]}" "${OFFICIAL_FLAG[@]}" --out "$OUT/loader.md"
run ddp_compile 60 $PY -m benchmarks.ddp_compile_check --mode blocks "${DDP[@]}" --out "$OUT/ddp_compile.md"
if [ "$CUDA" = 1 ]; then
    run e2e_compiled 75 $PY main_simmim.py \
        --cfg configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml \
        --batch-size 128 --compile blocks --output /tmp/e2e_compiled --opts DATA.DATASET synthetic \
        DATA.SYNTHETIC.TRAIN_SIZE 3840 DATA.NUM_WORKERS 12 TRAIN.EPOCHS 1 PRINT_FREQ 5 TENSORBOARD False
fi
run attention 45 $PY -m benchmarks.attention_speed "${ATTN[@]}" --out "$OUT/attention.md"
run profile_eager 30 $PY -m benchmarks.profile_step "${PROFILE[@]}" --variant eager --out "$OUT/profile_eager.md"
run profile_blocks 40 $PY -m benchmarks.profile_step "${PROFILE[@]}" --variant blocks --out "$OUT/profile_blocks.md"
if [ "$CUDA" = 1 ]; then
    # fp16 + GradScaler through the training loop, two NCCL ranks, and (issue 11) the memory
    # planner against measured peaks of SwinV2-B/L/H/G (for all sizes run memory_check.py alone).
    run fp16_quickstart 60 $PY main_simmim.py \
        --cfg configs/quickstart/simmim_pretrain__swin_tiny__img64__synthetic.yaml --output /tmp/fp16 \
        --opts AMP_DTYPE float16 TRAIN.EPOCHS 2 PRINT_FREQ 16 DATA.NUM_WORKERS 8 VIS_FREQ 1
    run torchrun_nccl 45 torchrun --nproc_per_node 2 main_simmim.py \
        --cfg tests/configs/tiny_swin_pretrain.yaml --output /tmp/nccl --opts TRAIN.EPOCHS 1 DATA.BATCH_SIZE 4
    run memory_gpu 120 $PY -m benchmarks.memory_check --device cuda --out "$OUT/memory_gpu.md"
fi
echo "total ${SECONDS}s" | tee -a "$OUT/summary.txt"
