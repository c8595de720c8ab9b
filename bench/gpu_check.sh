#!/usr/bin/env bash
# GPU acceptance check of the product on one NVIDIA GPU node, in one run:
#   bake a random-weight ViT-L/14@518 artifact (the production geometry; weights do not change
#   speed) -> bare encoder sweep (torch fp32/bf16/fp16; ONNX Runtime CUDA / TensorRT when
#   onnxruntime-gpu is installed, fp16 graph included) -> /detect single-image latency against the
#   bare encoder -> end-to-end throughput under concurrent load -> the reference search (a product's
#   bank) per provider -> TensorRT fp16 vs fp32 alone (ONNX Runtime, interleaved) -> tiles per
#   second at 5 MP (a 4 x 4 tiled product under load). Every result is JSON in $OUT.
# Targets for a GPU node: >= 390 images/s end to end, p50 <= 20 ms for a single image.
# Needs the `train` extra (to bake) and the service install; run from the repository root:
#   OUT=/tmp/dapo-gpu bash bench/gpu_check.sh
set -euo pipefail
OUT=${OUT:-/tmp/dapo-gpu}; mkdir -p "$OUT"
ART=/tmp/vitl518
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true
# the fp16 ONNX graph only pays off where ORT has the CUDA provider (onnxruntime-gpu)
FP16=$(python3 -c "import onnxruntime as o; print('--fp16' if 'CUDAExecutionProvider' in o.get_available_providers() else '')")
python3 -m service.cli bake --prompts handcrafted --backbone ViT-L-14-336-quickgelu --pretrained '' \
  --image-size 518 --out "$ART" --force $FP16 > "$OUT/bake.json"
python3 -m service.cli bench --artifact "$ART" --mode encoder --backends torch,onnxruntime \
  --precisions bf16,fp16,fp32 --batch-sizes 1,8,32,64 --seconds 5 > "$OUT/encoder.json"
python3 -m service.cli bench --artifact "$ART" --mode e2e --images 32 --rounds 3 \
  --server-env DAPO_BACKEND=torch --server-env DAPO_PRECISION=bf16 > "$OUT/e2e_torch_bf16.json"
python3 -m service.cli bench --artifact "$ART" --mode load --concurrency 256 --requests 6000 \
  --server-env DAPO_BACKEND=torch --server-env DAPO_PRECISION=bf16 --server-env DAPO_MAX_BATCH_SIZE=64 \
  --server-env DAPO_MAX_QUEUE_SIZE=512 --server-env DAPO_MAX_INFLIGHT_REQUESTS=512 > "$OUT/load_torch_bf16.json"
# the reference search (a product's bank, docs/references.md) on the same providers as the encoder:
# ViT-L/14@518 geometry (37 x 37 patches, two taps of width 1024), a 16-image bank at the coreset limit
python3 bench/references_search.py --grid 37 --dim 2048 --global-dim 768 --bank 2304 --images 16 \
  --providers TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider > "$OUT/references_search.json"
# TensorRT fp16 vs fp32, timed in turns (ONNX Runtime's TensorRT provider; the fp16 graph from --fp16)
python3 -m service.cli bench --artifact "$ART" --mode encoder --backends onnxruntime --precisions fp16,fp32 \
  --batch-sizes 1,8,32 --interleave 20 --providers TensorrtExecutionProvider,CUDAExecutionProvider \
  > "$OUT/tensorrt_fp16_vs_fp32.json"
# tiles per second at 5 MP: a product tiled 4 x 4 (612 px tiles of a 2448 x 2048 image: 16 tiles + the whole)
python3 - "$ART" <<'PY'
import sys
from service.runtime.artifact import Product, Tiling, read_manifest, write_manifest
m = read_manifest(sys.argv[1]); m.products["cam5mp"] = Product(tiling=Tiling(tile=612)); write_manifest(sys.argv[1], m)
PY
python3 -m service.cli bench --artifact "$ART" --mode load --concurrency 64 --requests 400 --size 2448x2048 \
  --product cam5mp --server-env DAPO_BACKEND=torch --server-env DAPO_PRECISION=bf16 \
  --server-env DAPO_MAX_BATCH_SIZE=64 --server-env DAPO_MAX_QUEUE_SIZE=2048 \
  --server-env DAPO_MAX_INFLIGHT_REQUESTS=128 > "$OUT/load_tiled_5mp.json"
echo done
