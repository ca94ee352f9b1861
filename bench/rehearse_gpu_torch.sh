#!/usr/bin/env bash
# Rehearse the GPU checks on this CPU with the GPU machine's torch (`make gpu-rehearsal`). The lent
# machine runs an older torch than the project's pin (2.11.0+cu130 in every run so far) and has none of
# our other dependencies, and a path that fails there fails after minutes of a 15-minute session. This
# builds .venv-gpu with that torch and the packages the machine has (torchvision, transformers, OpenCV,
# einops, safetensors, PyYAML, plus the wheels gpu_checks.sh carries in .whl/), then runs there:
#   1. tests/test_gpu_machine.py: every bench's CPU smoke mode with Ray, pyarrow, PyAV... unimportable,
#      every gpu_checks.sh command through its parser, the script's part selection;
#   2. the model FLOP count on the meta device at toon-512 (training.bench_gpu's MFU numerator);
#   3. T_CL's command (compiled, channels-last, recompute budget) at the tiny preset (~5 min here);
#   4. that this torch's inductor takes the fp8 aesthetic tower's compile options (WIDE_REDUCTIONS).
# Deselected: the fp8 aesthetic tower on the CPU. Before torch 2.14 the CPU's _scaled_mm takes only
# per-tensor scales; the tower's rowwise scales run on CUDA (the fourth run measured them on 2.11).
# Downloads ~5 GB (torch and its CUDA libraries) the first time.
set -euo pipefail
GPU_TORCH=${GPU_TORCH:-2.11.0}
GPU_TORCHVISION=${GPU_TORCHVISION:-0.26.0}
VENV=${VENV:-.venv-gpu}
PY=${PY:-python3.11}
if [ ! -f "$VENV/.torch-$GPU_TORCH" ]; then
  rm -rf "$VENV"
  $PY -m venv "$VENV"
  # the machine's pip constraints cap torch at the project's pin; this venv wants another release
  PIP_CONSTRAINT= "$VENV/bin/pip" install -q "torch==$GPU_TORCH" "torchvision==$GPU_TORCHVISION" \
    transformers opencv-python-headless==4.12.0.88 einops safetensors pyyaml pytest pytest-timeout
  [ -d .whl ] || make gpu-wheels
  PIP_CONSTRAINT= "$VENV/bin/pip" install -q --no-deps .whl/*.whl
  touch "$VENV/.torch-$GPU_TORCH"
fi
export PYTHONPATH=$PWD
"$VENV/bin/python" -c "import torch; print('rehearsing with torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_gpu_machine.py \
  -k "not test_model_stage_bench or without_the_open_clip_wheels"
"$VENV/bin/python" -c "
from training.bench_gpu import count_flops
for stage in ('rectify', 'decoder'):
    print(f'{stage}: {count_flops(stage, \"toon-512\") / 1e12:.2f} TFLOP per toon-512 clip (meta device)')"
OUT=$(mktemp -d)
"$VENV/bin/python" -m training.bench_gpu --device cpu --preset tiny --batches 1 --steps 1 --warmup 1 \
  --no-decoder --compile inductor --checkpoint-levels 0,none --recompute-budget 0.3 --channels-last \
  --json "$OUT/cl.json" 2>&1 | grep -E "^\| rectify"
"$VENV/bin/python" -c "
import torch
from pipeline.stages.aesthetic import WIDE_REDUCTIONS
x = torch.randn(3, 4096)
got = torch.compile(lambda t: t.abs().amax(-1), backend='inductor', options=WIDE_REDUCTIONS)(x)
torch.testing.assert_close(got, x.abs().amax(-1))
print('inductor takes', WIDE_REDUCTIONS)"
echo "rehearsal passed: torch $GPU_TORCH"
