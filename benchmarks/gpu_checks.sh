#!/usr/bin/env bash
# One accelerator session's checks, in one go: encoder parity on the device (fp32 at
# HIGHEST matmul precision; XLA's default for f32 on recent NVIDIA GPUs is TF32), the
# size of the TF32 effect, and the encoder benchmark beside PyTorch, recorded in
# benchmarks/RESULTS.md. Run from the repository root; copies RESULTS.md to $OUT if set.
set -uo pipefail
if [ -d .whl ]; then  # packages the device image lacks (ml_collections), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

echo "== parity on the device (fp32, HIGHEST precision)"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 300 python3 -m pytest -q -p no:cacheprovider \
  tests/test_dino_parity.py tests/test_clip_parity.py tests/test_release_fixture_encoders.py 2>&1 | tail -4

echo "== TF32 effect: DINO B/16, default vs highest f32 matmul precision"
python3 - <<'PY'
import jax, jax.numpy as jnp
from flax import nnx
from mmovseg_jax.models import dino
m = dino.Model(dino.VARIANTS["B/16"], rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (4, 224, 224, 3))
f = nnx.jit(lambda m, x: m(x, (-1,))[0])
default = f(m, x)
with jax.default_matmul_precision("highest"):
    highest = nnx.jit(lambda m, x: m(x, (-1,))[0])(m, x)
print(f"max |default - highest| = {float(jnp.abs(default - highest).max()):.3e}")
PY

echo "== encoder benchmark"
python3 benchmarks/encoder_forward.py --models dino_b16,clip_b16 --size 224 --batch 128 --dtype bfloat16 --steps 20 --torch --record
python3 benchmarks/encoder_forward.py --models dino_b8,clip_b16,clip_b16_dense --size 384 --batch 16 --dtype bfloat16 --steps 20 --torch --record
python3 benchmarks/encoder_forward.py --models dino_b8,clip_b16 --size 384 --batch 8 --dtype float32 --steps 10 --torch --record
[ -n "${OUT:-}" ] && cp benchmarks/RESULTS.md "$OUT/"
exit 0
