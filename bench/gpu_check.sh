#!/usr/bin/env bash
# Everything GPU-side in one run, for a session that is lent the H200 (device tool):
#   random-weight ViT-L/14@518 artifact -> bare encoder sweep (torch fp32/bf16/fp16, ORT CUDA /
#   TensorRT when onnxruntime-gpu is importable) -> /detect single-image latency vs the encoder ->
#   end-to-end throughput under load. JSON lands in $OUT (the device tool brings it back).
# Target (issue 5): >= 390 img/s end to end, p50 <= 20 ms for one image.
# The device image has torch/onnx but not open_clip, fastapi & co: carry them as wheels in .whl
# (see the device README) and start the command with the pip --target line it gives.
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
echo done
