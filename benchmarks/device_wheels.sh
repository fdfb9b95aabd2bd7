#!/usr/bin/env bash
# Prepares, on the session's own machine, what benchmarks/gpu_issue6.sh needs on a lent
# GPU machine (the device tool's image has JAX, flax, optax, orbax, PyTorch and
# transformers, not grain, array_record, ml_collections, portpicker or tensorboardX):
#   .whl/          their cp312 manylinux wheels (about 4.6 MB; their own needs are on the image)
#   .shared_copy/  the PyTorch anchor from ../shared/bench (../shared does not travel)
# Both are git-ignored. Then: device run, carry [".whl", ".shared_copy"], timeout_s 600,
# command "bash benchmarks/gpu_issue6.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker==1.6.0 tensorboardX==2.6.5"
mkdir -p .whl .shared_copy/bench
install -m 644 "${MMOVSEG_SHARED:-../shared}/bench/torch_cmu_anchor.py" .shared_copy/bench/
for spec in $WHEELS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -l .whl .shared_copy/bench
du -sh .whl .shared_copy
