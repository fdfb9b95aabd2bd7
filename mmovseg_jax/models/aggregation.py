"""CAT-Seg cost aggregation, as used by the MM-OVSeg release (GSNet/CAT-Seg head).

One `AggregatorLayer` = a spatial step (two Swin blocks, plain then shifted windows,
whose queries and keys also see projected CLIP appearance guidance) followed by a
class step (linear attention across the class axis at pooled resolution, whose
queries and keys also see projected text embeddings; the class axis is padded with
learned tokens to a fixed length, as the release does).

Layout: cost volumes are channels-last, (B, T, H, W, C) with T classes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmovseg_jax.models import layers
from mmovseg_jax.ops import resize


def _linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _layer_norm(width: int, rngs: nnx.Rngs) -> layers.LayerNorm:
    return layers.LayerNorm(width, 1e-5, rngs=rngs)  # torch nn.LayerNorm default eps


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(N, H, W, C) -> (N * H/window * W/window, window * window, C)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_merge(windows: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of `window_partition`: (N * nW, window * window, C) -> (N, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


@functools.lru_cache(maxsize=None)
def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """Additive attention mask (nW, window^2, window^2) of shifted-window attention.

    Tokens that came from different image regions after the cyclic shift get -100
    (Swin's value), the rest 0.
    """
    region = np.zeros((h, w), np.float32)
    bounds = ((0, -window), (-window, -shift), (-shift, None))
    label = 0
    for y0, y1 in bounds:
        for x0, x1 in bounds:
            region[slice(y0, y1), slice(x0, x1)] = label
            label += 1
    ids = np.asarray(window_partition(region[None, :, :, None], window))[..., 0]  # (nW, window^2)
    return np.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0).astype(np.float32)


class WindowAttention(nnx.Module):
    """Multi-head attention within windows; q and k see [x, guidance], v sees x only."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dim, self.num_heads = dim, num_heads
        self.q = _linear(dim + guidance_dim, dim, dtype, rngs)
        self.k = _linear(dim + guidance_dim, dim, dtype, rngs)
        self.v = _linear(dim, dim, dtype, rngs)
        self.proj = _linear(dim, dim, dtype, rngs)

    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """x: (N * nW, L, dim + guidance_dim); mask: (nW, L, L) or None -> (N * nW, L, dim)."""
        n, length, _ = x.shape
        heads = lambda t: t.reshape(n, length, self.num_heads, -1)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x[..., :self.dim]))
        scale = q.shape[-1] ** -0.5
        logits = jnp.einsum("nqhd,nkhd->nhqk", q * scale, k).astype(jnp.float32)
        if mask is not None:
            windows = mask.shape[0]
            logits = logits.reshape(n // windows, windows, self.num_heads, length, length) + mask[None, :, None]
            logits = logits.reshape(n, self.num_heads, length, length)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        y = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, length, -1)
        return self.proj(y)


class SwinBlock(nnx.Module):
    """Swin transformer block with appearance guidance (window or shifted window)."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, window: int, shift: int, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.window, self.shift = window, shift
        self.norm1 = _layer_norm(dim, rngs)
        self.attn = WindowAttention(dim, guidance_dim, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(dim, rngs)
        self.mlp = layers.MLP(dim, 4 * dim, "gelu", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, guidance: jax.Array | None) -> jax.Array:
        """x: (N, H, W, C); guidance: (N, H, W, G) or None -> (N, H, W, C)."""
        n, h, w, c = x.shape
        window, shift = self.window, self.shift
        if min(h, w) <= window:  # one window covers the map: no partition, no shift
            window, shift = min(h, w), 0
        if h % window or w % window:
            raise ValueError(f"cost map {h}x{w} is not divisible by the window size {window}")
        y = self.norm1(x)
        if guidance is not None:
            y = jnp.concatenate([y, guidance.astype(y.dtype)], axis=-1)
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        mask = shifted_window_mask(h, w, window, shift) if shift else None
        y = window_merge(self.attn(window_partition(y, window), mask), window, h, w)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + y.astype(jnp.float32)
        return x + self.mlp(self.norm2(x)).astype(jnp.float32)


class SpatialAggregation(nnx.Module):
    """Two Swin blocks (shift 0, then window // 2) applied to every class's cost map."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, window: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.block_1 = SwinBlock(dim, guidance_dim, num_heads, window, 0, dtype=dtype, rngs=rngs)
        self.block_2 = SwinBlock(dim, guidance_dim, num_heads, window, window // 2, dtype=dtype, rngs=rngs)
        self.guidance_norm = _layer_norm(guidance_dim, rngs) if guidance_dim else None

    def __call__(self, x: jax.Array, guidance: jax.Array | None) -> jax.Array:
        """x: (B, T, H, W, C); guidance: (B, H, W, G) or None."""
        b, t, h, w, c = x.shape
        x = x.reshape(b * t, h, w, c)
        if guidance is not None:
            guidance = self.guidance_norm(guidance)
            guidance = jnp.broadcast_to(guidance[:, None], (b, t) + guidance.shape[1:]).reshape(b * t, h, w, -1)
        x = self.block_2(self.block_1(x, guidance), guidance)
        return x.reshape(b, t, h, w, c)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Kernelised attention of "Transformers are RNNs" with the elu + 1 feature map.

    q: (N, L, H, D), k and v: (N, S, H, D) -> (N, L, H, D).
    """
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    length = v.shape[1]
    kv = jnp.einsum("nshd,nshv->nhdv", k, v / length)
    z = 1.0 / (jnp.einsum("nlhd,nhd->nlh", q, k.sum(axis=1)) + eps)
    return jnp.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * length


class ClassAggregation(nnx.Module):
    """Attention across classes at each pooled position, guided by text embeddings."""

    def __init__(self, dim: int, guidance_dim: int, num_heads: int, pooling: tuple[int, int], pad_len: int, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads, self.pooling, self.pad_len = num_heads, tuple(pooling), pad_len
        self.q = _linear(dim + guidance_dim, dim, dtype, rngs)
        self.k = _linear(dim + guidance_dim, dim, dtype, rngs)
        self.v = _linear(dim, dim, dtype, rngs)
        self.norm1 = _layer_norm(dim, rngs)
        self.norm2 = _layer_norm(dim, rngs)
        self.mlp_in = _linear(dim, 4 * dim, dtype, rngs)
        self.mlp_out = _linear(4 * dim, dim, dtype, rngs)
        self.padding_tokens = nnx.Param(jnp.zeros((dim,), jnp.float32)) if pad_len else None
        self.padding_guidance = nnx.Param(jnp.zeros((guidance_dim,), jnp.float32)) if pad_len and guidance_dim else None

    def _pad_classes(self, x: jax.Array, pad: jax.Array, axis: int) -> jax.Array:
        count = self.pad_len - x.shape[axis]
        if count <= 0:
            return x
        shape = list(x.shape)
        shape[axis] = count
        return jnp.concatenate([x, jnp.broadcast_to(pad.astype(x.dtype), shape)], axis=axis)

    def __call__(self, x: jax.Array, text_guidance: jax.Array | None) -> jax.Array:
        """x: (B, T, H, W, C); text_guidance: (B, T, G) or None -> (B, T, H, W, C)."""
        b, t, h, w, c = x.shape
        ph, pw = self.pooling
        pooled = x.reshape(b, t, h // ph, ph, w // pw, pw, c).mean(axis=(3, 5))  # AvgPool2d, floor
        hp, wp = pooled.shape[2:4]
        if self.padding_tokens is not None:
            pooled = self._pad_classes(pooled, self.padding_tokens[...], 1)
        tokens = pooled.transpose(0, 2, 3, 1, 4).reshape(b * hp * wp, -1, c)  # (B h w, T', C)
        guidance = None
        if text_guidance is not None:
            if self.padding_guidance is not None:
                text_guidance = self._pad_classes(text_guidance, self.padding_guidance[...], 1)
            guidance = jnp.broadcast_to(text_guidance[:, None], (b, hp * wp) + text_guidance.shape[1:])
            guidance = guidance.reshape(b * hp * wp, -1, text_guidance.shape[-1])
        y = self.norm1(tokens)
        qk_in = y if guidance is None else jnp.concatenate([y, guidance.astype(y.dtype)], axis=-1)
        heads = lambda a: a.reshape(a.shape[0], a.shape[1], self.num_heads, -1)
        attended = linear_attention(heads(self.q(qk_in)).astype(jnp.float32), heads(self.k(qk_in)).astype(jnp.float32),
                                    heads(self.v(y)).astype(jnp.float32))
        tokens = tokens + attended.reshape(tokens.shape)
        tokens = tokens + self.mlp_out(jax.nn.relu(self.mlp_in(self.norm2(tokens)))).astype(jnp.float32)
        pooled = tokens.reshape(b, hp, wp, -1, c)[:, :, :, :t].transpose(0, 3, 1, 2, 4)  # (B, T, h, w, C)
        upsampled = resize.resize_bilinear(pooled, (h, w), align_corners=True, axes=(2, 3))
        return x + upsampled


class AggregatorLayer(nnx.Module):
    """Spatial aggregation, then class aggregation."""

    def __init__(self, dim: int, appearance_dim: int, text_dim: int, num_heads: int, window: int,
                 pooling: tuple[int, int], pad_len: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.spatial = SpatialAggregation(dim, appearance_dim, num_heads, window, dtype=dtype, rngs=rngs)
        self.classwise = ClassAggregation(dim, text_dim, num_heads, pooling, pad_len, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, appearance: jax.Array | None, text: jax.Array | None) -> jax.Array:
        """x: (B, T, H, W, C); appearance: (B, H, W, Ga); text: (B, T, Gt)."""
        return self.classwise(self.spatial(x, appearance), text)
