#!/usr/bin/env bash
# The GPU checks of the open issues, in one run on a lent GPU machine (torch only there; open_clip
# and ftfy travel as wheels in .whl/). Each part has its own time limit; results land in $OUT.
#   training: rectify step at the largest batch that fits + decoder step at batch 1 (MFU)
#   curate:   the model stages' clips/s and peak memory at full size, random weights
#   model:    UNet training step at batch 1 with gradient checkpointing off and on
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${T_TRAIN:-150} python3 -m training.bench_gpu --batches 1,2,4,6 --steps 3 --warmup 1 --json "$OUT/train.json" 2>&1 | tail -25
timeout ${T_CURATE:-100} python3 -m pipeline.bench_models_gpu --batches 3 --out "$OUT/curate_models.json" 2>&1 | tail -20
timeout ${T_MODEL:-60} python3 -m training.bench_model --no-sample --repeats 2 --json "$OUT/model.json" 2>&1 | tail -20
