"""Float8 inference with static scales (models/fp8_inference.py, ops.fp8.frozen_matmul).

- At the calibrated amax, a frozen product is the current-scaling one, bit for bit (the
  same roundings; only the amax and the kernel cast moved out).
- The static scale is really used: a calibrated range wider than the input rounds more
  coarsely; inputs beyond it saturate instead of overflowing.
- Calibrated ranges are the bf16 model's, the same however the tiles are batched; the
  frozen model stays as close to bf16 as current float8 scaling does.
- The traced program of a frozen model takes no amax (max |x|) of anything at run time,
  and holds float8 kernels, not float32 ones cast per call.
- Misuse fails loudly: a gradient through frozen layers, a model without float8
  layers, calibrating twice around a freeze.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmovseg_jax.models import dino, fp8_inference, layers, mmovseg, params, storage
from mmovseg_jax.ops import fp8
from tests.test_fp8 import _rel

TINY = mmovseg.VARIANTS["tiny"]


def _operands(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((96, 64)).astype(np.float32)).at[0, 0].set(9.0)
    w = jnp.asarray((0.05 * rng.standard_normal((64, 48))).astype(np.float32))
    return x, w


def test_frozen_product_equals_current_scaling_at_the_calibrated_amax():
    x, w = _operands()
    current = fp8.matmul(x, w, jnp.bfloat16)
    kernel_t, k_scale = fp8.quantize_kernel(w, jnp.bfloat16)
    assert kernel_t.shape == (48, 64) and kernel_t.dtype == jnp.float8_e4m3fn
    amax = jnp.max(jnp.abs(x.astype(jnp.bfloat16))).astype(jnp.float32)
    frozen = fp8.frozen_matmul(x, kernel_t, fp8.scale_from_amax(amax), k_scale, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(frozen, np.float32), np.asarray(current, np.float32), rtol=0, atol=1e-6)


def test_static_scale_is_used_and_saturates():
    x, w = _operands(1)
    kernel_t, k_scale = fp8.quantize_kernel(w, jnp.bfloat16)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    fitted = fp8.frozen_matmul(x, kernel_t, fp8.scale_from_amax(9.0), k_scale, jnp.bfloat16)
    # a range 10,000x wider than the data leaves most values in float8's subnormals: coarser
    wide = fp8.frozen_matmul(x, kernel_t, fp8.scale_from_amax(9e4), k_scale, jnp.bfloat16)
    assert _rel(wide, exact) > 3 * _rel(fitted, exact), (_rel(wide, exact), _rel(fitted, exact))
    # a range 100x narrower than the data saturates at +-448 * scale, finite
    narrow = fp8.frozen_matmul(x, kernel_t, fp8.scale_from_amax(0.09), k_scale, jnp.bfloat16)
    assert np.all(np.isfinite(np.asarray(narrow, np.float32)))
    assert np.abs(np.asarray(narrow, np.float32)).max() < 0.5 * np.abs(exact).max()


def _mmovseg(fp8_on: bool) -> mmovseg.Model:
    cfg = storage.with_kernels(dataclasses.replace(TINY, dtype="bfloat16"), fp8=fp8_on)
    return mmovseg.Model(cfg, rngs=nnx.Rngs(0))


def _images(seed: int, batch: int = 2):
    rng = np.random.default_rng(seed)
    shape = (batch, TINY.image_size, TINY.image_size, 3)
    return tuple(jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))


def _logits(model, rgb, sar, text):
    return np.asarray(nnx.jit(lambda m, *a: m.logits(*a))(model, rgb, sar, text), np.float32)


@pytest.fixture(scope="module")
def models():
    """(bf16 model, current-scaling fp8 model, fp8 model frozen on batch 0, text)."""
    plain, current, frozen = _mmovseg(False), _mmovseg(True), _mmovseg(True)
    tokens = jnp.asarray(np.random.default_rng(5).integers(1, 400, (3, 1, 8)).astype(np.int32))
    text = nnx.jit(lambda m, t: m.encode_text(t))(plain, tokens)
    summary = fp8_inference.prepare(frozen, lambda m, rgb, sar: m.encode_images(rgb, sar), [_images(0)])
    return plain, current, frozen, text, summary


def test_prepare_freezes_every_float8_layer_of_the_three_encoders(models):
    _, _, frozen, _, summary = models
    # 6 float8 layers (q, k, v, out, fc1, fc2) per block, CLIP vision and both DINOs; CLIP's
    # last block runs in dense mode (value and out only), so its query and key never run
    blocks = TINY.clip.vision.depth + 2 * TINY.dino.depth
    assert summary == {"batches": 1, "layers": 6 * blocks, "frozen": 6 * blocks - 2}
    amaxes = fp8_inference.input_amaxes(frozen)
    assert len(amaxes) == 6 * blocks - 2 and all(a > 0 for a in amaxes.values())
    last = frozen.clip.vision.blocks[-1].attn
    assert not last.query.frozen and not last.key.frozen and last.value.frozen
    for attn in [b.attn for b in frozen.rgb_dino.blocks]:  # the fused q/k/v GEMM's kernel, one scale
        assert attn.frozen_qkv.shape == (3 * TINY.dino.width, TINY.dino.width)
        assert attn.frozen_qkv_scale[...] == max(attn.query.frozen_kernel_scale[...],
                                                attn.key.frozen_kernel_scale[...], attn.value.frozen_kernel_scale[...])
    assert last.frozen_qkv is None
    # frozen state is no parameter: a saved folder holds the bf16 model's parameters only
    assert params.flat_params(frozen).keys() == params.flat_params(models[0]).keys()


def _dino(fp8_on: bool) -> dino.Model:
    return dino.Model(dino.Config(patch_size=8, width=32, depth=4, num_heads=4, mlp_dim=64, image_size=32,
                                  dtype="bfloat16", fp8=fp8_on), rngs=nnx.Rngs(0))


def test_calibrated_ranges_do_not_depend_on_how_tiles_are_batched():
    """Calibration runs the layers in the model's own precision (bf16): each tile's
    activations, and so the maxima over all tiles, are the same whichever tiles share a
    batch (under current float8 scaling they would depend on the batch's range)."""
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    forward = lambda m, images: m(images, (0, 1, 2, 3))  # noqa: E731
    ranges = []
    for pieces in ([x[:2], x[2:]], [x[0::2], x[1::2]], [x[::-1][:2], x[::-1][2:]]):
        model = _dino(True)
        fp8_inference.calibrate(model, forward, pieces)
        ranges.append(fp8_inference.input_amaxes(model))
    assert len(ranges[0]) == 4 * 6 and ranges[0] == ranges[1] == ranges[2], ranges


@pytest.mark.parametrize("seed", [0, 7], ids=["calibration batch", "new inputs"])
def test_frozen_model_stays_as_close_to_bf16_as_float8_does(models, seed):
    """The whole MM-OVSeg model (three encoders, CLIP's dense last block included), on the
    batch it was calibrated on and on another."""
    plain, current, frozen, text, _ = models
    rgb, sar = _images(seed)
    ref = _logits(plain, rgb, sar, text)
    frozen_err, current_err = _rel(_logits(frozen, rgb, sar, text), ref), _rel(_logits(current, rgb, sar, text), ref)
    print("vs bf16: frozen", frozen_err, "current scaling", current_err)
    assert 1e-4 < frozen_err < 0.15 and frozen_err < 2 * current_err + 1e-3, (frozen_err, current_err)


def _primitives(fn, *args) -> list[str]:
    names: list[str] = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.append(eqn.primitive.name)
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def test_frozen_program_takes_no_amax_and_reads_float8_kernels():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    plain, current, frozen = _dino(False), _dino(True), _dino(True)
    fp8_inference.prepare(frozen, lambda m, images: m(images), [x])
    counts = {}
    for name, model in [("plain", plain), ("current", current), ("frozen", frozen)]:
        graphdef, state = nnx.split(model)
        prims = _primitives(lambda s, im: nnx.merge(graphdef, s)(im)[0], state, x)
        counts[name] = prims.count("reduce_max")
    # softmax's max is all the plain model takes; current scaling adds 2 per product
    assert counts["frozen"] == counts["plain"] < counts["current"], counts
    kernels = {v.dtype for _, v in nnx.state(frozen, layers.Fp8Frozen).flat_state() if v[...].ndim == 2}
    assert kernels == {jnp.dtype(jnp.float8_e4m3fn)}


def test_misuse_fails_loudly(models):
    _, _, frozen, text, _ = models
    rgb, sar = _images(1, batch=1)
    graphdef, state = nnx.split(frozen)
    loss = lambda s: jnp.sum(nnx.merge(graphdef, s).logits(rgb, sar, text))  # noqa: E731
    with pytest.raises(TypeError, match="frozen for inference"):
        jax.grad(loss)(state)
    with pytest.raises(ValueError, match="frozen already"):
        fp8_inference.calibrate(frozen, lambda m, r, s: m.encode_images(r, s), [(rgb, sar)])
    with pytest.raises(ValueError, match="no float8 layers"):
        fp8_inference.calibrate(_mmovseg(False), lambda m, r, s: m.encode_images(r, s), [(rgb, sar)])
    with pytest.raises(ValueError, match="at least one batch"):
        fp8_inference.calibrate(_mmovseg(True), lambda m, r, s: m.encode_images(r, s), [])


def test_frozen_mlp_pads_rows_for_the_float8_gemm_without_changing_them():
    """21 token rows go through a frozen MLP's fc1/fc2 padded to 32 (layers.FP8_ROWS):
    zero rows, which move no amax, cut off again: the values of the unpadded layers.
    Current scaling keeps the per-layer form (no padding; see layers.MLP)."""
    x = jax.random.normal(jax.random.key(0), (3, 7, 32))
    mlp = layers.MLP(32, 64, "gelu", dtype=jnp.bfloat16, fp8=True, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mlp)
    program = lambda: str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))  # noqa: E731
    assert "pad[" not in program()
    fp8_inference.prepare(mlp, lambda m, x: m(x), [x])
    graphdef, state = nnx.split(mlp)
    assert "pad[" in program() and "bf16[32,64]" in program()  # fc1's output: 32 rows
    padded = nnx.jit(lambda m, x: m(x))(mlp, x)
    plain = nnx.jit(lambda m, x: m.fc2(layers.ACTIVATIONS[m.activation](m.fc1(x))))(mlp, x)
    assert padded.shape == (3, 7, 32) and 21 % layers.FP8_ROWS
    np.testing.assert_array_equal(np.asarray(padded, np.float32), np.asarray(plain, np.float32))
