#!/usr/bin/env bash
# The GPU session: checks of the CUDA paths and GPU measurements, in one command on a machine with one NVIDIA GPU,
# PyTorch, timm and transformers (no network). Results go to $OUT (default /tmp/gpu-out).
#
# Needs two git-ignored folders made here first, on a machine with ../shared/data:
#   .pack  .venv/bin/python bench/sweep_recipe.py pack      (Flickr8k squares, CIFAR-10 test images, MiniLM features, ~57 MiB)
#   .whl   open_clip_torch 3.3.0, ftfy and wcwidth wheels    (open_clip for the side-by-side step benchmark)
# Then: bash bench/gpu.sh   (about 9 minutes; each part has its own time limit)
#
# 1. the offline recipe's hyper-parameter sweep (bench/sweep_recipe.py), six processes sharing the GPU;
# 2. `clipcraft demo` on cuda in bf16 with the tiny preset (the MiniLM package is not there): the trainer's CUDA
#    path end to end (loader, autocast, feature cache, checkpoints, eval, zero-shot);
# 3. bench/bench_train.py on cuda: the seed architecture against open_clip, bf16 at batch 16 and 128, fp32 at
#    batch 16, and LiT at batch 128.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python -c "import open_clip; print('open_clip', open_clip.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

echo "== 1. recipe sweep"
timeout 300 python bench/sweep_recipe.py run --pack .pack --out "$OUT/sweep-recipe.json" --procs 6 --budget 160 --stop 255 2>&1 \
    | grep -v -i warn | tail -40
pkill -f "sweep_recipe.py _worker" || true

echo "== 2. clipcraft demo on cuda, bf16"
timeout 90 python -m clipcraft demo --out /tmp/demo device=cuda precision=bf16 model=tiny 2>&1 | tail -25

echo "== 3. training step, seed architecture, clipcraft vs open_clip"
libs="clipcraft open_clip"
python -c "import open_clip" 2>/dev/null || libs="clipcraft"
timeout 80 python bench/bench_train.py --device cuda --libs $libs --batch 16 128 --precision bf16 --out "$OUT/train-cuda-bf16.json" 2>&1 | tail -6
timeout 45 python bench/bench_train.py --device cuda --libs $libs --batch 16 --precision fp32 --out "$OUT/train-cuda-fp32.json" 2>&1 | tail -4
timeout 45 python bench/bench_train.py --device cuda --libs $libs --batch 128 --lit --out "$OUT/train-cuda-lit.json" 2>&1 | tail -4
ls -la "$OUT"
