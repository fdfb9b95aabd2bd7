#!/usr/bin/env bash
# Issue 6's measurements on one lent H100/H200, in a single call of at most ~9 minutes.
# Run from the repository root. Before the call, on the session's own machine:
#   mkdir -p .shared_copy/bench && cp ../shared/bench/torch_cmu_anchor.py .shared_copy/bench/
# then: device run, carry [".whl", ".shared_copy"], timeout_s 600, command
#   bash benchmarks/gpu_issue6.sh
# (.whl: grain, array_record, ml_collections, portpicker, tensorboardx wheels, see
# /work/.library/device/README.md; .shared_copy: the PyTorch anchor and the test fixtures.)
#
# Stages, most important first, each under its own time limit inside an overall budget
# (BUDGET_S, default 530 s from the start): a stage that would start with under 30 s left
# is skipped and says so.
#   1. cmu_step at 224 px, batch 128, XLA and cuDNN attention, PyTorch eager anchor beside (ratio line)
#   2. tests/test_attention.py on the GPU (cuDNN vs XLA attention, bf16, values and gradients;
#      DINO B/16 end to end)
#   3. def_step inference (release shapes: B, 384 px, batch 8, 8 classes), XLA and cuDNN
#   4. cmu_step at 384 px, batch 48, XLA and cuDNN, anchor beside
#   5. input_pipeline: Grain pairs/s at 384 px crops of 512 px tiles, 0, 4 and 16 workers,
#      ArrayRecord (npz) and PNG folder (this host's CPUs feed the GPU in training)
#   6. def_step train step, cuDNN then XLA attention (whatever time is left)
# Everything goes to $OUT: gpu_issue6.log (all output), RESULTS_issue6.md (the tables, to
# append to benchmarks/RESULTS.md by hand after review) and one JSON per stage.
set -uo pipefail
START=$SECONDS
BUDGET_S=${BUDGET_S:-530}
OUT=${OUT:-/tmp/gpu_issue6}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_issue6.log") 2>&1

if [ -d .whl ] && [ "${SMOKE:-0}" != 1 ]; then  # packages the device image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || echo "!! wheel install failed: grain/ml_collections may be missing"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
[ -d .shared_copy ] && export MMOVSEG_SHARED="$PWD/.shared_copy"
ANCHOR=.shared_copy/bench/torch_cmu_anchor.py
[ -f "$ANCHOR" ] || ANCHOR=../shared/bench/torch_cmu_anchor.py
[ -f "$ANCHOR" ] || echo "!! torch_cmu_anchor.py not found: copy it to .shared_copy/bench/ (no PyTorch ratio this run)"
RES="$OUT/RESULTS_issue6.md"
# SMOKE=1: the same stages at toy sizes, to check this script on a CPU (cuDNN rows then fail, as they must).
if [ "${SMOKE:-0}" = 1 ]; then
  CMU224="--variant tiny --sizes 32 --batch 4 --steps 2 --warmup 1"; CMU384="$CMU224"
  DEF="--variant toy --steps 2 --warmup 1"
  INPUT="--records 8 --tile 96 --crop 64 --batch 4 --batches 2 --workers 0,1"
else
  CMU224="--sizes 224"; CMU384="--sizes 384"; DEF=""
  INPUT="--workers 0,4,16 --batch 16 --records 64"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local elapsed=$((SECONDS - START)) left
  left=$((BUDGET_S - elapsed))
  if [ "$left" -lt 30 ]; then echo "== $name: SKIPPED ($left s of the budget left)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s; ${elapsed} s elapsed)"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (TIMED OUT: rows printed as "done:" above are what was measured)')"
}

stage "cmu_step 224" 170 python3 benchmarks/cmu_step.py $CMU224 --attention xla,cudnn \
  --torch-anchor "$ANCHOR" --results "$RES" --json "$OUT/cmu_224.json"
stage "attention tests (GPU)" 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_attention.py
stage "def_step inference" 150 python3 benchmarks/def_step.py $DEF --modes inference --attention xla,cudnn \
  --results "$RES" --json "$OUT/def_inference.json"
stage "cmu_step 384" 130 python3 benchmarks/cmu_step.py $CMU384 --attention xla,cudnn \
  --torch-anchor "$ANCHOR" --results "$RES" --json "$OUT/cmu_384.json"
stage "input_pipeline" 100 python3 benchmarks/input_pipeline.py $INPUT --results "$RES" --json "$OUT/input_pipeline.json"

stage "def_step train" 130 python3 benchmarks/def_step.py $DEF --modes train --attention cudnn,xla \
  --results "$RES" --json "$OUT/def_train.json"
echo "== total $((SECONDS - START)) s"
exit 0
