#!/usr/bin/env bash
# Issue 6's measurements on one lent H100/H200, in a single call of at most ~9 minutes.
# Run from the repository root. Before the call, on the session's own machine:
#   bash benchmarks/device_wheels.sh
# (.whl: the grain, array_record, ml_collections, portpicker and tensorboardX wheels the
# device image lacks; .shared_copy: the PyTorch anchor), then: device run, carry
# [".whl", ".shared_copy"], timeout_s 600, command
#   bash benchmarks/gpu_issue6.sh
#
# Stages (STAGES="a b ..." picks and orders them), most important first, each under its own
# time limit inside an overall budget (BUDGET_S, default 530 s from the start): a stage that
# would start with under 30 s left is skipped and says so.
#   cmu224           cmu_step at 224 px, batch 128, cuDNN attention, CLS shortcut off and on,
#                    the PyTorch eager anchor beside (ratio lines), matmul ceiling measured
#   cmu224_fast      the same step (shortcut on) with the options that change results:
#                    --fast-numerics on (bf16 residual stream, tanh GELU), without and with
#                    float8 block GEMMs (config.model.fp8; "f8 GEMMs" counts the float8 GEMMs
#                    XLA compiled, 192 expected)
#   cmu224_actremat  the step (shortcut on) with config.remat none and activation (the MLP GELU
#                    recomputed from its input in the backward pass: 3.4 GB fewer per step
#                    compiled, 6.8 GB with the tanh GELU, which cuBLASLt then applies in fc1's
#                    epilogue), fast numerics off and on
#   cmu224_tfp8      the step with its frozen teacher in float8 with static scales
#                    (config.model.teacher_fp8=static; the student in bf16), fast numerics off and on
#   cmu224_pad2      the step with cuDNN tokens padded to a multiple of 2 (197 -> 198), not 64
#                    (256): does cuDNN take it for training, and how much faster
#   def_infer_nopad  DEF inference with no token padding for cuDNN (--cudnn-pad-multiple 1: JAX
#                    checks no length for inference), with and without --fast-numerics
#   cmu224_fp8       float8 GEMMs alone (not in the default list)
#   cmu224_profile   the same step split by XLA op (command buffers off), top ops printed
#   def_infer        def_step inference, batch 8 (DEF_BATCHES=8,32 adds 32), encoder MFU: bf16, fp8
#                    (current scaling) and fp8 static (calibrated, frozen), each with and without
#                    --fast-numerics
#   def_profile      DEF inference (release shapes, bf16) split by XLA op (command buffers off),
#                    and the encoders alone (the difference is the head's time)
#   cmu224_flags     cmu_step 224 under XLA_FLAGS=$FLAGS_VARIANT (default: Triton GEMMs off)
#   attention_tests  tests/test_attention.py, test_fast_paths.py, test_fp8.py, test_fast_numerics.py and
#                    test_fp8_inference.py on the GPU
#   cmu224_remat     cmu_step 224 with the student's blocks rematerialised (speed and temp GiB)
#   cmu224_xla       cmu_step 224 with XLA attention (not in the default list)
#   cmu384           cmu_step at 384 px, batch 48, anchor beside
#   input            input_pipeline: Grain pairs/s at 384 px crops, 0, 4 and 16 workers
#   def_train        def_step train step, config.remat none and activation
# Measured 2026-11-28 on an H200 (stages cmu224 def_infer): 81 s and 84 s after start-up.
# Everything goes to $OUT (the device tool returns at most 8 files): gpu_issue6.log (all
# output), RESULTS_issue6.md (the tables, to append to benchmarks/RESULTS.md by hand after
# review) and details.tar.gz: one JSON per stage and hlo/, the optimised HLO of each timed
# row of cmu224, cmu224_fast and def_infer (fusions, GEMM custom calls), to read offline.
set -uo pipefail
START=$SECONDS
BUDGET_S=${BUDGET_S:-530}
OUT=${OUT:-/tmp/gpu_issue6}
WORK="$OUT/details"
mkdir -p "$WORK"
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
# SMOKE=1: the same stages at toy sizes with XLA attention (ATTENTION, default cudnn), to check
# this script on a CPU (tests/test_benchmarks.py does); ATTENTION=cudnn there makes every row fail, as it must.
if [ "${SMOKE:-0}" = 1 ]; then
  ATTENTION=${ATTENTION:-xla}
  CMU224="--variant tiny --sizes 32 --batch 4 --steps 2 --warmup 1"; CMU384="$CMU224"
  DEF="--variant toy --steps 2 --warmup 1"; DEF_BATCHES=2
  INPUT="--records 8 --tile 96 --crop 64 --batch 4 --batches 2 --workers 0,1"
else
  CMU224="--sizes 224"; CMU384="--sizes 384"; DEF=""; DEF_BATCHES=${DEF_BATCHES:-8}
  INPUT="--workers 0,4,16 --batch 16 --records 64"
  ATTENTION=${ATTENTION:-cudnn}
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

# Stages by name; STAGES picks and orders them (default: all, in the order below). The
# profile stages turn XLA's command buffers (CUDA graphs) off, since kernels replayed from
# one are attributed to the buffer, not to their op; their timings are not the headline.
NO_GRAPHS="--xla_gpu_enable_command_buffer="
FLAGS_VARIANT=${FLAGS_VARIANT:---xla_gpu_enable_triton_gemm=false}
run_stage() {
  case $1 in
    cmu224) stage "cmu_step 224" 150 python3 benchmarks/cmu_step.py $CMU224 --attention $ATTENTION --cls-shortcut both \
              --measure-peak --torch-anchor "$ANCHOR" --results "$RES" --json "$WORK/cmu_224.json" --hlo-dir "$WORK/hlo" ;;
    cmu224_fast) stage "cmu_step 224 fast numerics, fp8 off and on" 120 python3 benchmarks/cmu_step.py $CMU224 \
              --attention $ATTENTION --fast-numerics on --fp8 both --torch off --results "$RES" \
              --json "$WORK/cmu_224_fast.json" --hlo-dir "$WORK/hlo" ;;
    cmu224_actremat) stage "cmu_step 224 remat none and activation" 120 python3 benchmarks/cmu_step.py $CMU224 \
              --attention $ATTENTION --remat none,activation --fast-numerics both --torch off --results "$RES" \
              --json "$WORK/cmu_224_actremat.json" ;;
    cmu224_tfp8) stage "cmu_step 224 teacher in static float8" 110 python3 benchmarks/cmu_step.py $CMU224 \
              --attention $ATTENTION --teacher-fp8 static --fast-numerics both --torch off --results "$RES" \
              --json "$WORK/cmu_224_tfp8.json" --hlo-dir "$WORK/hlo" ;;
    cmu224_pad2) stage "cmu_step 224 cuDNN padding to 2" 70 python3 benchmarks/cmu_step.py $CMU224 --attention $ATTENTION \
              --cudnn-pad-multiple 2 --torch off --results "$RES" --json "$WORK/cmu_224_pad2.json" ;;
    def_infer_nopad) stage "def_step inference, no cuDNN padding" 90 python3 benchmarks/def_step.py $DEF --modes inference \
              --attention $ATTENTION --batch ${DEF_BATCHES%%,*} --cudnn-pad-multiple 1 --fast-numerics both --results "$RES" \
              --json "$WORK/def_inference_nopad.json" ;;
    cmu224_fp8) stage "cmu_step 224 fp8" 90 python3 benchmarks/cmu_step.py $CMU224 --attention $ATTENTION --fp8 on \
              --torch off --results "$RES" --json "$WORK/cmu_224_fp8.json" --hlo-dir "$WORK/hlo" ;;
    cmu224_profile) stage "cmu_step 224 profile (no command buffers)" 90 env XLA_FLAGS="$NO_GRAPHS" \
              python3 benchmarks/cmu_step.py $CMU224 --attention $ATTENTION --torch off --profile --steps 5 \
              --json "$WORK/cmu_224_profile.json" ;;
    def_profile) stage "def_step inference profile (no command buffers)" 90 env XLA_FLAGS="$NO_GRAPHS" \
              python3 benchmarks/def_step.py $DEF --modes inference,encoders --attention $ATTENTION --profile --steps 5 \
              --json "$WORK/def_profile.json" ;;
    attention_tests) stage "attention and fp8 tests (GPU)" 150 python3 -m pytest -q -p no:cacheprovider -rs --tb=short \
              tests/test_attention.py tests/test_fast_paths.py tests/test_fp8.py tests/test_fast_numerics.py \
              tests/test_fp8_inference.py ;;
    def_infer) stage "def_step inference" 240 python3 benchmarks/def_step.py $DEF --modes inference --attention $ATTENTION \
              --batch $DEF_BATCHES --fp8 all --fast-numerics both --measure-peak --results "$RES" --json "$WORK/def_inference.json" --hlo-dir "$WORK/hlo" ;;
    cmu224_flags) stage "cmu_step 224 with XLA_FLAGS=$FLAGS_VARIANT" 80 env XLA_FLAGS="$FLAGS_VARIANT" \
              python3 benchmarks/cmu_step.py $CMU224 --attention $ATTENTION --torch off --json "$WORK/cmu_224_flags.json" ;;
    cmu224_remat) stage "cmu_step 224 remat full" 80 python3 benchmarks/cmu_step.py $CMU224 --attention $ATTENTION \
              --remat full --torch off --json "$WORK/cmu_224_remat.json" ;;
    cmu224_xla) stage "cmu_step 224 xla" 80 python3 benchmarks/cmu_step.py $CMU224 --attention xla --torch off \
              --results "$RES" --json "$WORK/cmu_224_xla.json" ;;
    cmu384) stage "cmu_step 384" 130 python3 benchmarks/cmu_step.py $CMU384 --attention $ATTENTION \
              --torch-anchor "$ANCHOR" --results "$RES" --json "$WORK/cmu_384.json" ;;
    input) stage "input_pipeline" 100 python3 benchmarks/input_pipeline.py $INPUT --results "$RES" \
              --json "$WORK/input_pipeline.json" ;;
    def_train) stage "def_step train" 130 python3 benchmarks/def_step.py $DEF --modes train --attention $ATTENTION \
              --remat none,activation --results "$RES" --json "$WORK/def_train.json" ;;
    *) echo "!! unknown stage $1" ;;
  esac
}
for name in ${STAGES:-cmu224 cmu224_fast def_infer cmu224_actremat cmu224_tfp8 cmu224_pad2 def_infer_nopad cmu224_profile def_profile attention_tests cmu224_flags \
               cmu224_remat cmu384 input def_train}; do
  run_stage "$name"
done
tar czf "$OUT/details.tar.gz" -C "$OUT" details && rm -rf "$WORK" && ls -l "$OUT"
echo "== total $((SECONDS - START)) s"
exit 0
