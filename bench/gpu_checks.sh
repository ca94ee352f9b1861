#!/usr/bin/env bash
# The GPU checks of the open issues, in one run on a lent GPU machine (torch only there; open_clip
# and ftfy travel as wheels in .whl/). Each part has its own time limit; results land in $OUT.
# In order of what is least measured so far:
#   model:    UNet training step at batch 1 with gradient checkpointing off and on
#   clip:     aesthetic + alignment clips/s: CLIP forwards of 48 frames (host work overlapping the
#             GPU) against one forward of 192 per call, and the image tower torch.compile'd
#   training: rectify step at batch 6, eager and with each UNet block torch.compile'd (same card,
#             same run, so the two compare), each timed by part (--breakdown), then the largest
#             batch that fits + decoder at batch 1
#   curate:   the model stages' clips/s and peak memory at full size, random weights
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
part() {  # part SECONDS command...: run with a time limit; 0 skips the part
  local limit=$1; shift
  if [ "$limit" -gt 0 ]; then timeout "$limit" "$@"; else echo "skipped: $*"; fi
}
part ${T_MODEL:-60} python3 -m training.bench_model --no-sample --repeats 2 --json "$OUT/model.json" 2>&1 | tail -20
part ${T_CLIP:-160} python3 -m pipeline.bench_models_gpu --stages aesthetic,alignment --batches 5 --frames-per-forward 192 --compile inductor --out "$OUT/clip_compiled.json" 2>&1 | tail -8
part ${T_EAGER:-75} python3 -m training.bench_gpu --batches 6 --steps 3 --warmup 1 --no-decoder --breakdown --json "$OUT/train_eager6.json" 2>&1 | tail -8
part ${T_COMPILE:-240} python3 -m training.bench_gpu --batches 6,8 --steps 3 --warmup 2 --no-decoder --compile inductor --breakdown --json "$OUT/train_compiled.json" 2>&1 | tail -10
part ${T_TRAIN:-0} python3 -m training.bench_gpu --batches 1,2,4,6 --steps 3 --warmup 1 --json "$OUT/train.json" 2>&1 | tail -25
part ${T_CURATE:-0} python3 -m pipeline.bench_models_gpu --batches 3 --out "$OUT/curate_models.json" 2>&1 | tail -20
