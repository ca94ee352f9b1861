#!/usr/bin/env bash
# The GPU checks of the open issues, in one run on a lent GPU machine (torch only there; open_clip,
# ftfy and torchao travel as wheels in .whl/: `make gpu-wheels`). Each part has its own time limit (T_*, seconds; 0 skips it),
# cut to what is left of BUDGET seconds for the whole script; results land in $OUT (at most 8 files
# come back). The console shows each part's summary lines; $OUT/full_log.txt keeps everything they
# printed, so a part stopped at its limit still shows how far it got.
# torch.compile's artifacts come back as $OUT/*_cache.xz (in 15 MiB parts *_cache.xz.1, ... when larger, as the
# device tool brings back files of at most 16 MiB): put them all in .gpucache/ (carried with
# `carry: [".whl", ".gpucache"]`) and the next run on the same torch and card loads them instead of
# compiling. At most 8 files come back: the profiler tables end up in full_log.txt, not files of their own.
# What the defaults run, in one call (`timeout_s` 600), one part after another on the whole machine:
#   Next run's plan (fifth run, H200: T_CL's compile had not finished at 400 s, 27 graphs; the CLIP part
#   measured): call 1 the defaults (T_CL alone, 545 s), call 2 while warm `T_CL=0 T_EAGER=0 T_CLIP=200
#   BUDGET=210` (the CLIP part now also compiles the text tower: ~20-30 s more than the fifth run's 110 s).
#   900 s hold both, not a third part: the eager baselines are on record per card (H100 third run, H200
#   fifth run), and MFU is against the card's peak, not a baseline.
#   T_CL (issue "Training", 545 s): the compiled rectify step at batch 6 with the UNet's activations
#             stored channels-last (--channels-last, train.channels_last: the convolutions read and write
#             NHWC, no layout conversions around them), every UNet block and the frozen VAE encoder's
#             blocks torch.compile'd with static shapes under an activation budget (RB, default 0.3:
#             train.recompute_budget, the compiler recomputing norms and activations rather than whole
#             blocks), CL_LEVELS (default none,0 since the fifth run: the budget's own case first, so
#             that a compile cut short still measures it, then every UNet block recomputed; before:
#             0,none,1, every UNet block recomputed, then none (the
#             budget alone; estimated from the saved bytes on the CPU, scaled by the 11 GiB that levels 2
#             measured over all: ~55 GiB at RB 0.3, ~68 at 0.5, ~106 without a budget), then only the finest level, then the first again with cuDNN's autotuning; a
#             profile of one step (kernel time by kind) goes to the full log. Levels 0 recompute
#             whole blocks as before, so that row is channels-last's own gain, give or take the
#             budget's extra recompute inside a recomputed block.
#             A compile from scratch: 390 s for the plain layout on 8 CPUs beside another compile
#             (fourth run), more than 280 s alone (third run), so it gets the whole machine and goes
#             first; its artifacts come back as train_cl_cache.xz*. On an H200 every rectify part caps
#             torch's allocator at an 80 GB card's 79.1 GiB (training.bench_gpu --memory-cap-gib), so a
#             batch that fits fits the issue's card.
#   T_COMPILE (140 s, and only when .gpucache/train_cache.xz was carried): the same step in the plain
#             layout without a budget, its baseline in the same run, from an earlier run's artifacts
#             (fourth run: 1.24 s/step, 21.7% MFU by the step's own FLOP count, 24.1% by MODEL.md
#             Appendix E's), with its own profile of one step. FORCE_CL=1 compiles every block
#             channels-last inside inductor instead (TORCHINDUCTOR_FORCE_LAYOUT_OPT); FLOAT8=tensorwise
#             runs the UNet's large transformer linears as torchao fp8 GEMMs (train.float8; 27% of a
#             forward's FLOPs).
#   T_EAGER (100 s, when no cache was carried, else 0; only when that much is left, as cut short it
#             measures little: after T_CL's 545 s it waits for the second call): the rectify step
#             eager at levels 0 and 2, the same-run baseline then. The compile caches are not committed, so a fresh checkout has
#             none: the plain layout's compile from scratch (~280 s alone) does not fit in one call
#             after T_CL's. The third run measured eager at 1.99-2.10 s/step and the fourth the
#             compiled plain layout at 1.238-1.321 s, so this run's eager rows carry the comparison.
#   T_CLIP (110 s, only when that much is left, else in a second call while the machine is warm:
#             `T_CL=0 T_EAGER=0 T_CLIP=200 BUDGET=210`; issue "Curate, part 2"): aesthetic +
#             alignment clips/s with the image tower compiled, in fp16 and with fp8 e4m3 linears
#             (fourth run: 680 and 789 clips/s together): the fp8 tower as the stage runs it (biases
#             in the GEMMs, patch embedding as a GEMM, last block for the class token alone, inductor's
#             persistent kernels for the MLP's 4,096-wide rows), then replayed as CUDA graphs, then its
#             baseline (the fourth run's form: biases after the GEMMs, patch embedding a convolution,
#             whole last block, looped reductions), and a profiler table of one call of the fastest
#             form (how busy the GPU was, then its kernels); then the fastest form and alignment at
#             more clips per call (CPC, default 256,1024; the stages' own: 256 and 128 since the fifth
#             run, 64 and 128 before); the alignment stage with its captions tokenized in Rust (the
#             same ids as open_clip's), then its text tower compiled and replayed as CUDA graphs
#             (alignment.compile, alignment.cuda_graph), and the fastest forms of both together.
# Other parts, run when their limits are set:
#   T_BESIDE: the plain-layout compiled rectify step in the background from the start, on half the
#             CPUs, beside the sample on the other half (the fourth run's plan: 514 s in all). Its first
#             step (the compile) uses the GPU a little at a time; it then creates $GATE/train_compiled and
#             waits for $GATE/gpu_free before any other step, and the sample waits (at most GATE_MAX s)
#             for the first file before its timed samples: neither times beside the other's GPU work.
#   T_SAMPLE: `interpolate` seconds per sample and peak memory with the UNet and the VAE decoder's
#             blocks compiled (issue "Inference": 4.65-4.79 s on an H100, fourth run), the CLIP towers
#             visiting from host memory, then kept on the device (--clip-resident), then each UNet call
#             replayed as a CUDA graph (--cuda-graph), then a profiler table of a short compiled sample;
#             from .gpucache/sample_cache.xz* its first sample takes ~24 s instead of ~295 s;
#             SAMPLE_COMPILE=staged times the UNet compiled alone first; SAMPLE_CL=1 keeps the UNet's
#             activations channels-last (a compile of its own: no carried cache)
#   T_GRAPH:  one UNet call with the branches' inputs stacked vs shared vs as a CUDA graph (eager: no
#             compiling; GRAPH_MODE=compile compiles both forms); beside a compile still running, its
#             ratios are noisier
#   T_UNET:   where a sampling UNet forward spends its time (eager, by part), Conv3d vs Conv2d temporal
#             convs (the faster is used below)
#   T_MODEL:  UNet training step at batch 1 with gradient checkpointing off and on
#   T_CLIP with FPF=192: forwards of 48 vs 192 frames
#   T_TRAIN / T_CURATE: the batch search + decoder, the model stages at full size
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
BUDGET=${BUDGET:-575}
START=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
exec 2>&1
exec 3>&1  # the parts' headers, past the filters on their output
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__)"
for f in .gpucache/*_cache.xz*; do [ -f "$f" ] && cp "$f" "$OUT/" && echo "compile cache carried: $f"; done
# The rectify step's same-run baseline: the compiled plain layout from a carried cache, else eager.
if [ -f .gpucache/train_cache.xz ]; then T_COMPILE=${T_COMPILE:-140}; T_EAGER=${T_EAGER:-0}
else T_COMPILE=${T_COMPILE:-0}; T_EAGER=${T_EAGER:-100}; fi
GATE=/tmp/inbetweener_gates; rm -rf "$GATE"; mkdir -p "$GATE"
NCPU=$(nproc); HALF=$((NCPU / 2)); FG=0-$((HALF - 1)); BG=$HALF-$((NCPU - 1))
command -v taskset >/dev/null || { FG=; BG=; }  # without taskset both run on every CPU
part() {  # part SECONDS command...: run with a time limit cut to what is left; 0 or < 20 s skips it
  # (PIN: the CPUs it runs on; LOG: where its whole output goes, full_log.txt by default; WHOLE=1: skip
  # it unless its whole limit is left, for a part whose first minutes measure nothing)
  local limit=$1; shift
  local left=$((BUDGET - ($(date +%s) - START)))
  [ -n "${WHOLE:-}" ] && [ "$limit" -gt "$left" ] && limit=0
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -ge 20 ]; then
    echo "== ${limit}s${PIN:+ on CPUs $PIN}: $*" | tee -a "${LOG:-$OUT/full_log.txt}" >&3
    timeout "$limit" ${PIN:+taskset -c $PIN} "$@" 2>&1 | tee -a "${LOG:-$OUT/full_log.txt}"
  else
    echo "== skipped: $*" >&3
  fi
}
BESIDE=
if [ "${T_BESIDE:-0}" -ge 20 ] && [ "$HALF" -ge 2 ]; then
  # in the background, its whole output in beside_log.txt; when it ends, for whatever reason, the sample
  # need not wait for it any longer
  (
    export TORCHINDUCTOR_COMPILE_THREADS=$HALF
    PIN=$BG LOG=$OUT/beside_log.txt part ${T_BESIDE:-0} env TORCHINDUCTOR_FORCE_LAYOUT_OPT=${FORCE_CL:-0} python3 -m training.bench_gpu --batches 6 --steps 3 --warmup 2 --no-decoder --compile inductor --breakdown --checkpoint-levels "${LEVELS:-0,2}" --float8 "${FLOAT8:-}" --json "$OUT/train_compiled.json" --compile-cache "$OUT/train_cache.xz" --signal-compiled "$GATE/train_compiled" --wait-for "$GATE/gpu_free" 2>&1 | grep -vE "^ |^W[0-9]" | sed 's/^/[beside] /' | tail -16
    touch "$GATE/train_compiled"
  ) &
  BESIDE=$!
  export TORCHINDUCTOR_COMPILE_THREADS=$HALF
else
  touch "$GATE/train_compiled"  # nothing compiles beside the sample: it need not wait
  FG=
fi
PIN=$FG part ${T_UNET:-0} python3 -m training.profile_unet --kernels 30 --json "$OUT/unet.json" 2>&1 | grep -v "^ " | tail -16
TC=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['temporal_conv'])" "$OUT/unet.json" 2>/dev/null || echo conv3d)
echo "temporal conv: $TC"
PIN=$FG part ${T_SAMPLE:-0} python3 -m inference.bench_gpu --compile "${SAMPLE_COMPILE:-on}" ${SAMPLE_CL:+--channels-last} --repeats 3 --clip-resident --cuda-graph --temporal-conv "$TC" --profile "$OUT/sample_kernels.txt" --json "$OUT/sample.json" --compile-cache "$OUT/sample_cache.xz" --wait-for "$GATE/train_compiled" --wait-max "${GATE_MAX:-120}" 2>&1 | grep -E "^(built|eager|compiled|compile cache|interpolation bench)|Error" | tail -12
PIN=$FG part ${T_GRAPH:-0} python3 bench/cuda_graph_check.py toon-512 cuda "${GRAPH_MODE:-eager}" "$(( ${T_GRAPH:-0} - 5 ))" 2>&1 | grep -vE "^W[0-9]"
part ${T_MODEL:-0} python3 -m training.bench_model --no-sample --repeats 2 --temporal-conv "$TC" --json "$OUT/model.json" 2>&1 | tail -14
touch "$GATE/gpu_free"  # the compiled rectify step beside may now time its steps
[ -n "$BESIDE" ] && wait "$BESIDE"
unset TORCHINDUCTOR_COMPILE_THREADS
part ${T_CL:-545} env TORCHINDUCTOR_FORCE_LAYOUT_OPT=${FORCE_CL:-0} python3 -m training.bench_gpu --batches 6 --steps 3 --warmup 2 --no-decoder --compile inductor --breakdown --checkpoint-levels "${CL_LEVELS:-none,0}" --recompute-budget "${RB:-0.3}" --cudnn-benchmark --channels-last --temporal-conv "$TC" --profile "$OUT/train_cl_kernels.txt" --json "$OUT/train_cl.json" --compile-cache "$OUT/train_cl_cache.xz" 2>&1 | grep -vE "^ |^W[0-9]" | tail -16
part $T_COMPILE env TORCHINDUCTOR_FORCE_LAYOUT_OPT=${FORCE_CL:-0} python3 -m training.bench_gpu --batches 6 --steps 3 --warmup 2 --no-decoder --compile inductor --breakdown --checkpoint-levels "${LEVELS:-0,2}" --cudnn-benchmark --temporal-conv "$TC" --float8 "${FLOAT8:-}" --profile "$OUT/train_kernels.txt" --json "$OUT/train_compiled.json" --compile-cache "$OUT/train_cache.xz" 2>&1 | grep -vE "^ |^W[0-9]" | tail -16
WHOLE=1 part $T_EAGER python3 -m training.bench_gpu --batches 6 --steps 3 --warmup 1 --no-decoder --breakdown --checkpoint-levels "${LEVELS:-0,2}" --cudnn-benchmark --temporal-conv "$TC" --json "$OUT/train_eager6.json" 2>&1 | grep -vE "^ |^W[0-9]" | tail -12
WHOLE=1 part ${T_CLIP:-110} python3 -m pipeline.bench_models_gpu --stages aesthetic,alignment --batches 5 --frames-per-forward "${FPF:-}" --compile inductor --fp8 --clips-per-call "${CPC:-256,1024}" --out "$OUT/clip.json" --profile "$OUT/clip_kernels.txt" 2>&1 | grep -vE "^W[0-9]|WARNING|^measured " | tail -16
part ${T_TRAIN:-0} python3 -m training.bench_gpu --batches 1,2,4,6 --steps 3 --warmup 1 --json "$OUT/train.json" 2>&1 | tail -25
part ${T_CURATE:-0} python3 -m pipeline.bench_models_gpu --batches 3 --out "$OUT/curate_models.json" 2>&1 | tail -20
for f in .gpucache/*_cache.xz; do  # a carried cache, saved again by its bench, adds nothing: not back
  [ -f "$f" ] && rm -f "$OUT/$(basename "$f")" "$OUT/$(basename "$f")".*
done
for extra in "$OUT"/beside_log.txt "$OUT"/*_kernels.txt; do  # into the full log: at most 8 files come back
  [ -f "$extra" ] && { echo "== $extra"; cat "$extra"; } >> "$OUT/full_log.txt" && rm "$extra"
done
echo "== done in $(($(date +%s) - START)) s"
