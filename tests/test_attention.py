"""The attention implementation option (models/layers.py).

On any device: the padded, key-masked formulation used for cuDNN flash attention, run
through XLA, equals plain unpadded attention (values and gradients), and the "xla"
default leaves the encoders unchanged. On a GPU only: cuDNN attention against XLA
attention in bfloat16, per call and through a whole DINO ViT-B/16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmovseg_jax.models import clip, dino, layers

ON_GPU = jax.default_backend() == "gpu"


def _qkv(key, b: int, t: int, heads: int = 2, head_dim: int = 16, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    shape = (b, t, heads, head_dim)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in (kq, kk, kv))


def _value_and_grads(fn, q, k, v, w):
    """Output and gradients w.r.t. q, k, v of sum(w * fn(q, k, v)) (a random cotangent)."""
    def loss(q, k, v):
        return jnp.sum(w * fn(q, k, v).astype(jnp.float32))
    out = fn(q, k, v)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return out, grads


@pytest.mark.parametrize("t,multiple,causal", [(197, 64, False), (197, 16, False), (197, 2, False), (197, 1, False), (50, 64, True),
                                               (65, 8, False), (64, 64, False)])
def test_padded_masked_attention_equals_unpadded(t, multiple, causal):
    # float32 at full matmul precision: a GPU's default (TF32) differs by ~1e-4 run to run
    with jax.default_matmul_precision("highest"):
        _check_padded_equals_unpadded(t, multiple, causal)


def _check_padded_equals_unpadded(t, multiple, causal):
    q, k, v = _qkv(jax.random.key(t), 2, t)
    w = jax.random.normal(jax.random.key(1), q.shape)

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)

    def padded(q, k, v):
        return layers.padded_attention(q, k, v, causal=causal, implementation="xla", multiple=multiple)

    ref, ref_grads = _value_and_grads(jax.jit(plain), q, k, v, w)
    out, grads = _value_and_grads(jax.jit(padded), q, k, v, w)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert float(jnp.abs(out - ref).max()) < 1e-6
    for g, r in zip(grads, ref_grads):
        assert float(jnp.abs(g - r).max()) < 1e-6


def test_padding_keys_are_masked():
    """Without the key mask the zero-padded keys would take softmax weight: the mask matters."""
    q, k, v = _qkv(jax.random.key(0), 1, 10)
    pad = ((0, 0), (0, 54), (0, 0), (0, 0))
    with jax.default_matmul_precision("highest"):
        ref = jax.nn.dot_product_attention(q, k, v)
        out = layers.padded_attention(q, k, v, implementation="xla", multiple=64)
        unmasked = jax.nn.dot_product_attention(*(jnp.pad(x, pad) for x in (q, k, v)))[:, :10]
    assert float(jnp.abs(out - ref).max()) < 1e-6
    assert float(jnp.abs(unmasked - ref).max()) > 1e-2


def test_resolve_attention():
    assert layers.resolve_attention("xla") == "xla"
    assert layers.resolve_attention("cudnn") == "cudnn"
    expected = "cudnn" if ON_GPU else "xla"
    assert layers.resolve_attention("auto", jnp.bfloat16) == expected
    assert layers.resolve_attention("auto", jnp.float32) == "xla"
    with pytest.raises(ValueError, match="attention implementation"):
        layers.resolve_attention("flash")
    with pytest.raises(ValueError, match="attention implementation"):
        dino.Model(dataclasses.replace(dino.Config(width=32, depth=1, num_heads=2, mlp_dim=64, image_size=32),
                                       attention="pallas"))


def _tiny_dino(**kw) -> dino.Config:
    return dino.Config(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, image_size=32, **kw)


def test_default_attention_is_xla_and_unchanged():
    """The default config field is "xla" and gives exactly what plain dot_product_attention gives."""
    assert dino.Config().attention == "xla" and clip.VisionConfig().attention == "xla"
    model = dino.Model(_tiny_dino(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    out = model(x, (0, 1))
    # The same blocks by hand with jax.nn.dot_product_attention.
    h = model.embed(x)
    for block in model.blocks:
        a = block.attn
        y = block.norm1(h)
        q, k, v = a._heads(a.query(y)), a._heads(a.key(y)), a._heads(a.value(y))
        h = h + a.out(jax.nn.dot_product_attention(q, k, v).reshape(h.shape))
        h = h + block.mlp(block.norm2(h))
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(model.norm(h)))


def test_auto_on_cpu_matches_xla_model():
    """A model configured "auto" builds and, off the GPU, gives the "xla" model's output."""
    if ON_GPU:
        pytest.skip("checks the CPU fallback")
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    ref = dino.Model(_tiny_dino(dtype="bfloat16"), rngs=nnx.Rngs(0))(x)[0]
    out = dino.Model(_tiny_dino(dtype="bfloat16", attention="auto"), rngs=nnx.Rngs(0))(x)[0]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


# ----------------------------------------------------------------------------- GPU only

gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs an NVIDIA GPU")


@gpu
@pytest.mark.parametrize("t,causal", [(197, False), (577, False), (2305, False), (77, True)])
def test_cudnn_matches_xla_bf16(t, causal):
    """cuDNN flash attention on padded tokens vs XLA attention, bf16, values and gradients,
    at ViT-B token counts (224/16, 384/16, 384/8) and CLIP's causal text length."""
    q, k, v = _qkv(jax.random.key(t), 4, t, heads=12, head_dim=64, dtype=jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), q.shape)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)

    def cudnn(q, k, v):
        return layers.attention(q, k, v, causal=causal, implementation="cudnn")

    # Reference in float32 so both bf16 paths are judged against the same thing.
    ref, ref_grads = _value_and_grads(jax.jit(xla), *(x.astype(jnp.float32) for x in (q, k, v)), w)
    for fn in (xla, cudnn):
        out, grads = _value_and_grads(jax.jit(fn), q, k, v, w)
        assert out.dtype == jnp.bfloat16
        err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
        assert err < 3e-2, (fn.__name__, err)
        for g, r in zip(grads, ref_grads):
            rel = float(jnp.abs(g.astype(jnp.float32) - r).max() / jnp.abs(r).max())
            assert rel < 3e-2, (fn.__name__, rel)


@gpu
def test_cudnn_dino_b16_matches_xla():
    """DINO ViT-B/16 in bf16 at 224: cuDNN attention vs XLA attention, same weights."""
    x = jax.random.normal(jax.random.key(4), (8, 224, 224, 3))
    base = dataclasses.replace(dino.VARIANTS["B/16"], dtype="bfloat16")
    ref_model = dino.Model(base, rngs=nnx.Rngs(0))
    fast_model = dino.Model(dataclasses.replace(base, attention="cudnn"), rngs=nnx.Rngs(0))
    ref = nnx.jit(lambda m, x: m(x, (3, 11)))(ref_model, x)
    out = nnx.jit(lambda m, x: m(x, (3, 11)))(fast_model, x)
    for o, r in zip(out, ref):
        rel = float(jnp.linalg.norm(o - r) / jnp.linalg.norm(r))
        assert rel < 2e-2, rel
