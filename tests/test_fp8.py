"""Float8 matrix multiplies (ops/fp8.py, the models' `fp8` option) compute what they claim.

- The forward product equals an independent NumPy/ml_dtypes computation of the same
  rounding (per-tensor scale amax/448, e4m3), and differs from the plain bf16 product by
  the size float8 rounding predicts: the quantisation really happens.
- The gradients are the e5m2-rounded cotangent times the saved e4m3 operands.
- A sharded operand's scale is its global amax: 8 devices give the one-device result.
- Encoders with fp8 keep their parameter tree (checkpoints are interchangeable), stay
  close to bf16, and refuse float32; saved folders record fp8 off; the CMU step trains
  with it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from configs import cmu as cmu_configs
from mmovseg_jax.models import clip, dino, dinov3, params, storage
from mmovseg_jax.ops import fp8
from mmovseg_jax.train import cmu, sharding

ROOT = Path(__file__).resolve().parents[1]
BF16 = ml_dtypes.bfloat16


def _np_quantize(x: np.ndarray, fp8_dtype, limit: float) -> np.ndarray:
    """The float8 values times their scale, in float64: x divided by the bf16-rounded
    scale amax/limit, clipped, rounded to `fp8_dtype`, times the float32 scale (what
    ops/fp8.py documents; its products multiply the float8 arrays, then the scales)."""
    amax = np.float32(np.abs(x.astype(np.float32)).max())
    scale = amax / np.float32(limit) if amax > 0 else np.float32(1.0)
    scaled = (x.astype(BF16) / BF16(scale)).astype(np.float32)
    q = np.clip(scaled, -limit, limit).astype(BF16).astype(fp8_dtype)
    return q.astype(np.float64) * np.float64(scale)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _operands(seed=0, m=(3, 50), k=64, n=48):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*m, k)).astype(np.float32)
    x[0, 0, 0] = 9.0  # an outlier sets the activation scale, as in real activations
    w = (0.05 * rng.standard_normal((k, n))).astype(np.float32)
    return x, w


def test_forward_is_the_float8_rounded_product():
    x, w = _operands()
    y = np.asarray(jax.jit(fp8.matmul, static_argnums=2)(x, w, jnp.bfloat16), np.float64)
    ref = _np_quantize(x, ml_dtypes.float8_e4m3fn, 448.0) @ _np_quantize(w, ml_dtypes.float8_e4m3fn, 448.0)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    plain = np.asarray(jnp.asarray(x, jnp.bfloat16) @ jnp.asarray(w, jnp.bfloat16), np.float64)
    # only bf16 roundings of the output (the product, its scale: 0.4% here) separate us
    # from the float8 reference ...
    assert _rel(y, ref) < 8e-3, _rel(y, ref)
    # ... while float8 operands are an order of magnitude further from the exact product
    # than bf16 operands are
    assert _rel(y, exact) > 5 * _rel(plain, exact), (_rel(y, exact), _rel(plain, exact))
    assert 0.005 < _rel(y, exact) < 0.1


def test_gradients_are_e5m2_cotangent_times_the_saved_operands():
    x, w = _operands(1)
    g = np.random.default_rng(2).standard_normal((3, 50, 48)).astype(np.float32)
    y, vjp = jax.vjp(lambda a, b: fp8.matmul(a, b, jnp.bfloat16), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g, y.dtype))
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32  # cast back to the operands' dtypes
    xd = _np_quantize(x, ml_dtypes.float8_e4m3fn, 448.0)
    wd = _np_quantize(w, ml_dtypes.float8_e4m3fn, 448.0)
    gd = _np_quantize(g.astype(BF16), ml_dtypes.float8_e5m2, 57344.0)
    ref_dx = gd @ wd.T
    ref_dw = np.einsum("bmk,bmn->kn", xd, gd)
    assert _rel(dx, ref_dx) < 8e-3 and _rel(dw, ref_dw) < 8e-3, (_rel(dx, ref_dx), _rel(dw, ref_dw))
    exact_dx = g.astype(np.float64) @ w.astype(np.float64).T
    assert 0.01 < _rel(dx, exact_dx) < 0.2  # e5m2's 2 mantissa bits show


def test_zero_operand_gives_zero_not_nan():
    x = jnp.zeros((4, 16))
    w = jnp.ones((16, 8))
    y, vjp = jax.vjp(lambda a, b: fp8.matmul(a, b, jnp.bfloat16), x, w)
    dx, dw = vjp(jnp.zeros_like(y))
    for a in (y, dx, dw):
        assert np.all(np.asarray(a) == 0)


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from mmovseg_jax.ops import fp8
from mmovseg_jax.train import sharding
assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
# each device's rows at another magnitude: per-shard scales would round them differently
x = (rng.standard_normal((8, 16, 32)) * (4.0 ** np.arange(8))[:, None, None]).astype(np.float32)
w = rng.standard_normal((32, 24)).astype(np.float32)
mesh = sharding.make_mesh()  # the training mesh: (data 8, fsdp 1)
xs = jax.device_put(x, sharding.batch_sharding(mesh))
assert len(xs.sharding.device_set) == 8
f = jax.jit(lambda a, b: jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(fp8.matmul(a, b, jnp.bfloat16)
                                                                         .astype(jnp.float32))), (0, 1))(a, b))
one = f(x, w)
eight = f(xs, w)
for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
print("SHARDED_EQUAL")
"""


def test_sharded_operand_uses_its_global_scale():
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "SHARDED_EQUAL" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


def _tiny_dino(**kw) -> dino.Config:
    return dino.Config(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32,
                       dtype="bfloat16", **kw)


@pytest.mark.parametrize("family", ["dino", "dinov3", "clip"])
def test_fp8_encoders_keep_their_parameters_and_stay_close(family):
    if family == "dino":
        build = lambda f: dino.Model(_tiny_dino(fp8=f), rngs=nnx.Rngs(0))  # noqa: E731
        run = lambda m, x: m(x, (0, 1))[-1]  # noqa: E731
    elif family == "dinov3":
        build = lambda f: dinov3.Model(dinov3.Config(patch_size=8, width=32, depth=2, num_heads=4,  # noqa: E731
                                                     mlp_dim=64, image_size=32, dtype="bfloat16", fp8=f,
                                                     layerscale=1.0),  # blocks that count
                                       rngs=nnx.Rngs(0))
        run = lambda m, x: m(x, (0, 1))[-1]  # noqa: E731
    else:
        vision = clip.VisionConfig(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, image_size=32)
        text = clip.TextConfig(vocab_size=64, context_length=8, width=32, depth=1, num_heads=4, mlp_dim=64,
                               eos_token_id=63)
        build = lambda f: clip.Model(clip.Config(vision=dataclasses.replace(vision, fp8=f), text=text,  # noqa: E731
                                                 embed_dim=16, dtype="bfloat16"), rngs=nnx.Rngs(0))
        run = lambda m, x: m.encode_image(x).image_embed  # noqa: E731
    plain, quant = build(False), build(True)
    plain_state, quant_state = nnx.state(plain, nnx.Param), nnx.state(quant, nnx.Param)
    assert jax.tree.structure(plain_state) == jax.tree.structure(quant_state)
    for a, b in zip(jax.tree.leaves(plain_state), jax.tree.leaves(quant_state)):
        assert a.dtype == b.dtype == jnp.float32 and np.array_equal(np.asarray(a), np.asarray(b))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    ref, out = run(plain, x), run(quant, x)
    out_rel = _rel(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    print(family, "fp8 vs bf16 relative difference", out_rel)
    assert 1e-4 < out_rel < 0.15, out_rel  # float8 is in use, and not far off

    graphdef, params = nnx.split(quant)
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(run(nnx.merge(graphdef, p), x).astype(jnp.float32))))(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_fp8_needs_bfloat16():
    with pytest.raises(ValueError, match="fp8 matrix multiplies need dtype 'bfloat16'"):
        dino.Model(dino.Config(patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64, image_size=32, fp8=True))
    with pytest.raises(ValueError, match="fp8 matrix multiplies need dtype 'bfloat16'"):
        dinov3.Config(patch_size=8, width=32, depth=1, num_heads=4, mlp_dim=64, fp8=True)


def tiny_cmu_run(steps: int = 3, **model) -> tuple[np.ndarray, float, cmu.Aligner]:
    """A tiny bf16 CMU run (CLS embeddings, shortcut on, one device) with config.model
    fields `model` set: (losses per step, largest parameter change, the aligner built)."""
    c = cmu_configs.get_config()
    c.model.update(width=32, depth=2, num_heads=2, image_size=32, dtype="bfloat16", **model)
    c.loss.embedding = "cls"
    c.blocks = (0, 1)
    c.global_batch_size = 8
    mesh = sharding.make_mesh(1, 1)
    teacher = cmu.build_teacher(c)
    aligner = cmu.Aligner(teacher.config, len(c.blocks), rngs=nnx.Rngs(1))
    s = cmu.place(aligner, teacher, c, mesh)
    step = cmu.make_train_step(s.aligner_def, s.teacher_def, s.tx, s.lr, c, mesh, s.state_shardings)
    first = jax.tree.map(np.asarray, s.state["params"])
    rng = np.random.default_rng(0)
    state, losses = s.state, []
    for _ in range(steps):
        batch = {"rgb": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
                 "sar": rng.integers(0, 256, (8, 32, 32), dtype=np.uint8)}
        state, metrics = step(state, s.teacher_params, sharding.to_global(batch, mesh))
        losses.append(float(metrics["loss"]))
    moved = max(float(np.abs(np.asarray(a) - b).max())
                for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(first)))
    return np.array(losses), moved, aligner


def test_cmu_step_trains_with_fp8():
    """The CMU step (CLS shortcut on) with float8 teacher and student GEMMs: finite losses
    that track the bf16 step's, and the student moves."""
    bf16_losses, _, _ = tiny_cmu_run(fp8=False)
    fp8_losses, moved, _ = tiny_cmu_run(fp8=True)
    assert np.all(np.isfinite(fp8_losses)) and moved > 0
    print("losses bf16", bf16_losses, "fp8", fp8_losses)
    np.testing.assert_allclose(fp8_losses, bf16_losses, rtol=0.08)


def test_saved_models_record_fp8_off_and_load_with_it_on(tmp_path):
    """float8 is a run's speed choice: a saved folder records fp8 off (it loads anywhere,
    float32 included), and `load_model(fp8=True)` turns it back on."""
    model = dino.Model(_tiny_dino(fp8=True), rngs=nnx.Rngs(0))
    folder = storage.save(tmp_path / "enc", "dino", model.config, params.flat_params(model))
    assert storage.read(folder).config.fp8 is False
    assert storage.load_model(folder, dtype="float32").blocks[0].mlp.fc1.fp8 is False
    again = storage.load_model(folder, fp8=True)
    assert again.blocks[0].mlp.fc1.fp8 and again.blocks[0].attn.query.fp8
    x = jax.random.normal(jax.random.key(2), (1, 32, 32, 3))
    np.testing.assert_array_equal(np.asarray(again(x)[0], np.float32), np.asarray(model(x)[0], np.float32))
