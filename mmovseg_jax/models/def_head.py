"""The DEF segmentation head: cost maps, their fusion, cost aggregation and decoder.

Inputs per tile: CLIP dense embeddings and fused DINO features on one grid (G x G,
24 x 24 for the released B model), text embeddings of the T class names, and two
decoder guidance levels (2G and 4G) from CLIP and from DINO. Output: one logit map
per class at 4G x 4G. Every module is shared across classes, so T is set only by the
class list.

Cost maps are cosine similarities of L2-normalised features with each class's text
embedding. With both CLIP and DINO present ("query_guided" fusion, the release),
each cost map passes a 7x7 conv + sigmoid, the two are fused by a 7x7 conv + sigmoid
and the CLIP embedding is added back as a residual.

Layout: channels-last throughout, cost volumes (B, T, H, W, C).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmovseg_jax.models import aggregation, convs, layers


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Widths of the head. Defaults are the released B model's."""

    embed_dim: int = 512  # CLIP joint space = width of the DINO level-12 projection
    hidden_dim: int = 128
    num_prompts: int = 1  # prompt templates per class (channels of a cost map)
    num_layers: int = 2  # aggregation layers; 0 gives the paper's plain description
    num_heads: int = 4
    window: int = 12
    pooling: tuple[int, int] = (2, 2)
    pad_len: int = 256
    appearance_proj_dim: int = 128
    text_proj_dim: int = 128
    decoder_dims: tuple[int, int] = (64, 32)
    guidance_dims: tuple[int, int] = (256, 128)  # channels of the 2G and 4G guidance maps
    clip_guidance_proj_dims: tuple[int, int] = (32, 16)
    dino_guidance_proj_dims: tuple[int, int] = (32, 16)
    use_clip_cost: bool = True
    use_dino_cost: bool = True


def _conv(d_in: int, d_out: int, k: int, dtype, rngs: nnx.Rngs, bias: bool = True) -> nnx.Conv:
    return nnx.Conv(d_in, d_out, kernel_size=(k, k), padding=[(k // 2, k // 2)] * 2, use_bias=bias,
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _normalize(x: jax.Array) -> jax.Array:
    """L2 normalisation over the last axis (torch F.normalize, eps 1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_cost(features: jax.Array, text: jax.Array) -> jax.Array:
    """The head's raw cost volume: cosine similarity of every pixel with every class
    prompt. features (B, H, W, E), text (T, P, E) -> (B, T, H, W, P) float32 in [-1, 1]."""
    return jnp.einsum("bhwe,tpe->bthwp", _normalize(features.astype(jnp.float32)), _normalize(text))


class DoubleConv(nnx.Module):
    """(3x3 conv, no bias -> GroupNorm(C/16) -> ReLU) x 2."""

    def __init__(self, d_in: int, d_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv1 = _conv(d_in, d_out, 3, dtype, rngs, bias=False)
        self.norm1 = nnx.GroupNorm(d_out, num_groups=d_out // 16, epsilon=1e-5, param_dtype=jnp.float32, rngs=rngs)
        self.conv2 = _conv(d_out, d_out, 3, dtype, rngs, bias=False)
        self.norm2 = nnx.GroupNorm(d_out, num_groups=d_out // 16, epsilon=1e-5, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.norm1(self.conv1(x).astype(jnp.float32)))
        return jax.nn.relu(self.norm2(self.conv2(x).astype(jnp.float32)))


class UpBlock(nnx.Module):
    """2x transposed conv, concatenate CLIP and DINO guidance, DoubleConv."""

    def __init__(self, d_in: int, d_out: int, clip_dim: int, dino_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.up = convs.Resample(d_in, d_in - clip_dim, 2, dtype=dtype, rngs=rngs)
        self.conv = DoubleConv(d_in + dino_dim, d_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, clip_guidance: jax.Array | None, dino_guidance: jax.Array | None,
                 classes: int) -> jax.Array:
        """x: (B * T, H, W, C); guidance: (B, 2H, 2W, Cg) shared by the T classes of a tile."""
        parts = [self.up(x)]
        for g in (clip_guidance, dino_guidance):
            if g is not None:
                g = jnp.broadcast_to(g[:, None], (g.shape[0], classes) + g.shape[1:])
                parts.append(g.reshape((-1,) + g.shape[2:]).astype(parts[0].dtype))
        return self.conv(jnp.concatenate(parts, axis=-1))


class Head(nnx.Module):
    """Cost maps -> logits. See the module docstring."""

    def __init__(self, cfg: HeadConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if not (cfg.use_clip_cost or cfg.use_dino_cost):
            raise ValueError("the head needs at least one of use_clip_cost and use_dino_cost")
        self.cfg = cfg
        both = cfg.use_clip_cost and cfg.use_dino_cost
        self.clip_cost_embed = _conv(cfg.num_prompts, cfg.hidden_dim, 7, dtype, rngs)
        self.dino_cost_embed = _conv(cfg.num_prompts, cfg.hidden_dim, 7, dtype, rngs) if both else None
        self.cost_fusion = _conv(2 * cfg.hidden_dim, cfg.hidden_dim, 7, dtype, rngs) if both else None
        self.appearance_proj = _conv(cfg.embed_dim, cfg.appearance_proj_dim, 3, dtype, rngs)
        self.text_proj = nnx.Linear(cfg.embed_dim, cfg.text_proj_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.clip_guidance_proj = nnx.List([_conv(d, p, 3, dtype, rngs)
                                            for d, p in zip(cfg.guidance_dims, cfg.clip_guidance_proj_dims)])
        self.dino_guidance_proj = nnx.List([_conv(d, p, 3, dtype, rngs)
                                            for d, p in zip(cfg.guidance_dims, cfg.dino_guidance_proj_dims)])
        self.layers = nnx.List([
            aggregation.AggregatorLayer(cfg.hidden_dim, cfg.appearance_proj_dim, cfg.text_proj_dim, cfg.num_heads,
                                        cfg.window, cfg.pooling, cfg.pad_len, dtype=dtype, rngs=rngs)
            for _ in range(cfg.num_layers)])
        d1, d2 = cfg.decoder_dims
        self.decoder1 = UpBlock(cfg.hidden_dim, d1, cfg.clip_guidance_proj_dims[0], cfg.dino_guidance_proj_dims[0],
                                dtype=dtype, rngs=rngs)
        self.decoder2 = UpBlock(d1, d2, cfg.clip_guidance_proj_dims[1], cfg.dino_guidance_proj_dims[1],
                                dtype=dtype, rngs=rngs)
        self.classifier = _conv(d2, 1, 3, dtype, rngs)

    def _embed_cost(self, conv: nnx.Conv, features: jax.Array, text: jax.Array) -> jax.Array:
        """features (B, H, W, E), text (T, P, E) -> conv(cost) (B, T, H, W, hidden) before any activation."""
        cost = cosine_cost(features, text)
        b, t, h, w, p = cost.shape
        return conv(cost.reshape(b * t, h, w, p)).astype(jnp.float32).reshape(b, t, h, w, -1)

    def __call__(self, clip_features: jax.Array | None, dino_features: jax.Array | None, text: jax.Array,
                 clip_guidance: tuple[jax.Array, jax.Array] | None,
                 dino_guidance: tuple[jax.Array, jax.Array] | None, remat: str = "none") -> jax.Array:
        """Logits (B, T, 4G, 4G) float32.

        clip_features: (B, G, G, E) CLIP dense embeddings; dino_features: (B, G, G, E)
        fused DINO level-12 map; text: (T, P, E) class embeddings (P prompt templates);
        clip_guidance / dino_guidance: maps at (B, 2G, 2G, C1) and (B, 4G, 4G, C2).
        `remat` (layers.rematted): what the aggregation layers and the two decoder blocks
        recompute instead of keeping when differentiated; the values do not change.
        """
        cfg = self.cfg
        if cfg.use_clip_cost and cfg.use_dino_cost:
            clip_cost = jax.nn.sigmoid(self._embed_cost(self.clip_cost_embed, clip_features, text))
            dino_cost = jax.nn.sigmoid(self._embed_cost(self.dino_cost_embed, dino_features, text))
            both = jnp.concatenate([clip_cost, dino_cost], axis=-1)
            b, t, h, w, c = both.shape
            fused = self.cost_fusion(both.reshape(b * t, h, w, c)).astype(jnp.float32).reshape(b, t, h, w, -1)
            x = jax.nn.sigmoid(fused) + clip_cost
        else:
            x = self._embed_cost(self.clip_cost_embed, clip_features if cfg.use_clip_cost else dino_features, text)
        b, t = x.shape[:2]

        appearance = clip_features if clip_features is not None else dino_features
        appearance = jax.nn.relu(self.appearance_proj(appearance)).astype(jnp.float32)
        text_guidance = _normalize(_normalize(text).mean(axis=1))  # (T, E): mean over prompts
        text_guidance = jax.nn.relu(self.text_proj(text_guidance)).astype(jnp.float32)
        text_guidance = jnp.broadcast_to(text_guidance[None], (b,) + text_guidance.shape)
        project = lambda convs_, maps: [None, None] if maps is None else [
            jax.nn.relu(conv(g)).astype(jnp.float32) for conv, g in zip(convs_, maps)]
        clip_levels = project(self.clip_guidance_proj, clip_guidance)
        dino_levels = project(self.dino_guidance_proj, dino_guidance)

        aggregate = layers.rematted(lambda layer, x_, a, g: layer(x_, a, g), remat)
        for layer in self.layers:
            x = aggregate(layer, x, appearance, text_guidance)

        h, w, c = x.shape[2:]
        y = x.reshape(b * t, h, w, c)
        decode = layers.rematted(lambda block, y_, cg, dg: block(y_, cg, dg, t), remat)
        y = decode(self.decoder1, y, clip_levels[0], dino_levels[0])
        y = decode(self.decoder2, y, clip_levels[1], dino_levels[1])
        logits = self.classifier(y).astype(jnp.float32)
        return logits.reshape(b, t, logits.shape[1], logits.shape[2])
