"""DINOv3 vision transformer (Siméoni et al. 2025) in Flax NNX.

Differences from DINO v1 (`dino.py`): no learned position table but a 2-D rotary
embedding (RoPE) on the query/key of the patch tokens only; register ("storage")
tokens after CLS; LayerScale on both residual branches; no key bias (the original
code masks it to zero); optionally a SwiGLU feed-forward network.

`Model(config)(images, block_indices, norm)` returns the whole token sequence (CLS,
registers, patches) after the chosen blocks, through the final LayerNorm when `norm`
is set; `Model.patch_tokens` returns only the normalised patch tokens, which is what
the release's `get_intermediate_layers` gives. Any input size divisible by the patch
size works: RoPE needs no interpolation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmovseg_jax.models import layers

MLP_KINDS = ("mlp", "swiglu")
COORD_NORMALIZATIONS = ("separate", "min", "max")


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of a DINOv3 ViT.

    RoPE periods follow either `rope_base` (period_k = base ** (4k / head_dim)) or, when
    `rope_base` is None, the min/max-period form of the original code. `rope_shift`,
    `rope_jitter` and `rope_rescale` are training-time coordinate augmentations: they are
    kept so that a transformers config survives a round trip, and do nothing at inference.
    `layerscale` is the LayerScale initial value (None: no LayerScale). `mlp` is "mlp"
    (fc1 -> exact GELU -> fc2) or "swiglu" (silu(gate) * up -> down); `mlp_dim` is the
    hidden width actually stored. `image_size` is informational (the training size).
    """

    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    num_register_tokens: int = 4
    layerscale: float | None = 1e-5
    layer_norm_eps: float = 1e-5
    rope_base: float | None = 100.0
    rope_min_period: float | None = None
    rope_max_period: float | None = None
    rope_normalize_coords: str = "separate"
    rope_shift: float | None = None
    rope_jitter: float | None = None
    rope_rescale: float | None = 2.0
    mlp: str = "mlp"
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    image_size: int = 224
    dtype: str = "float32"
    # Attention kernel: "xla" (exact), "cudnn" or "auto"; see layers.attention.
    attention: str = "xla"
    # The blocks' weight matrix multiplies in float8 (see dino.Config.fp8).
    fp8: bool = False
    # The residual stream's dtype and the MLP's GELU (see dino.Config; change results).
    residual_dtype: str = "float32"
    gelu: str = "exact"

    def __post_init__(self):
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"RoPE needs a head width divisible by 4, got {self.head_dim}")
        periods = self.rope_min_period is not None and self.rope_max_period is not None
        if (self.rope_base is None) == (not periods):
            raise ValueError("give either rope_base or both rope_min_period and rope_max_period")
        if self.rope_normalize_coords not in COORD_NORMALIZATIONS:
            raise ValueError(f"rope_normalize_coords must be one of {COORD_NORMALIZATIONS}, "
                             f"got {self.rope_normalize_coords!r}")
        layers.resolve_attention(self.attention)
        layers.check_fp8(self.fp8, layers.compute_dtype(self.dtype))
        layers.residual_dtype(self.residual_dtype)
        layers.gelu_activation(self.gelu)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens, which precede the patch tokens."""
        return 1 + self.num_register_tokens

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        return cls(**dict(d))


def _vit(width: int, depth: int, heads: int, mlp: str = "mlp", ratio: float = 4.0) -> Config:
    hidden = int(width * ratio)
    if mlp == "swiglu":  # the original SwiGLUFFN: 2/3 of the ratio, rounded up to a multiple of 8
        hidden = int(hidden * 2 / 3)
        hidden += -hidden % 8
    return Config(width=width, depth=depth, num_heads=heads, mlp_dim=hidden, mlp=mlp)


# The released DINOv3 ViTs (hub/backbones.py of facebookresearch/dinov3); all patch 16,
# 4 registers, LayerScale, LayerNorm eps 1e-5, RoPE base 100, masked key bias.
VARIANTS: dict[str, Config] = {
    "S/16": _vit(384, 12, 6),
    "S+/16": _vit(384, 12, 6, "swiglu", 6.0),
    "B/16": _vit(768, 12, 12),
    "L/16": _vit(1024, 24, 16),
    "L+/16": _vit(1024, 24, 16, "swiglu", 6.0),
    "H+/16": _vit(1280, 32, 20, "swiglu", 6.0),
}


def rope_periods(config: Config) -> np.ndarray:
    """The (head_dim / 4,) RoPE periods, float64, in units of the normalised coordinate."""
    n = config.head_dim // 4
    if config.rope_base is not None:
        return config.rope_base ** (2.0 * np.arange(n, dtype=np.float64) / (config.head_dim // 2))
    ratio = config.rope_max_period / config.rope_min_period
    return ratio ** np.linspace(0.0, 1.0, n) / ratio * config.rope_max_period


@functools.lru_cache(maxsize=64)
def _rope_tables(config: Config, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    if config.rope_normalize_coords == "separate":
        dh, dw = gh, gw
    elif config.rope_normalize_coords == "max":
        dh = dw = max(gh, gw)
    else:
        dh = dw = min(gh, gw)
    ys = 2.0 * (np.arange(gh, dtype=np.float64) + 0.5) / dh - 1.0
    xs = 2.0 * (np.arange(gw, dtype=np.float64) + 0.5) / dw - 1.0
    coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(gh * gw, 2)
    angles = 2.0 * np.pi * coords[:, :, None] / rope_periods(config)[None, None, :]  # (N, 2, dh/4)
    angles = np.tile(angles.reshape(gh * gw, -1), (1, 2))  # (N, dh): [y freqs, x freqs] twice
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def rope_tables(config: Config, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos tables (gh * gw, head_dim) float32 for a patch grid, row-major.

    Patch centres are normalised to [-1, 1] (per axis for "separate"); the first half of
    the head channels rotate with the y coordinate's angles then x's, and the second half
    repeats them, pairing channel c with c + head_dim / 2 as `rotate_half` does.
    """
    return _rope_tables(config, int(grid[0]), int(grid[1]))


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates the last `sin.shape[0]` tokens of x (B, T, H, dh), in float32; prefix tokens are left as they are."""
    prefix = x.shape[1] - sin.shape[0]
    head, patches = x[:, :prefix], x[:, prefix:].astype(jnp.float32)
    rotated = patches * cos[None, :, None] + _rotate_half(patches) * sin[None, :, None]
    return jnp.concatenate([head, rotated.astype(x.dtype)], axis=1)


def _linear(d_in: int, d_out: int, bias: bool, dtype, rngs: nnx.Rngs, fp8: bool) -> layers.Dense:
    return layers.Dense(d_in, d_out, bias=bias, dtype=dtype, fp8=fp8, rngs=rngs)


class Attention(nnx.Module):
    """Self-attention with separate query/key/value/out projections and RoPE on patch tokens."""

    def __init__(self, config: Config, *, dtype, rngs: nnx.Rngs):
        d = config.width
        self.num_heads = config.num_heads
        self.implementation = config.attention
        self.query = _linear(d, d, config.query_bias, dtype, rngs, config.fp8)
        self.key = _linear(d, d, config.key_bias, dtype, rngs, config.fp8)
        self.value = _linear(d, d, config.value_bias, dtype, rngs, config.fp8)
        self.out = _linear(d, d, config.proj_bias, dtype, rngs, config.fp8)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        """x: (B, T, D) with the last sin.shape[0] tokens the patches -> (B, T, D)."""
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)  # noqa: E731
        q = apply_rope(heads(self.query(x)), sin, cos)
        k = apply_rope(heads(self.key(x)), sin, cos)
        y = layers.attention(q, k, heads(self.value(x)), implementation=self.implementation)
        return self.out(y.reshape(b, t, d))


class Mlp(nnx.Module):
    """fc1 -> GELU (exact, or its tanh approximation with config.gelu="tanh") -> fc2."""

    def __init__(self, config: Config, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(config.width, config.mlp_dim, config.mlp_bias, dtype, rngs, config.fp8)
        self.fc2 = _linear(config.mlp_dim, config.width, config.mlp_bias, dtype, rngs, config.fp8)
        self.activation = layers.gelu_activation(config.gelu)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(layers.mlp_activation(self.activation)(self.fc1(x)))


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)); the original's w1, w2, w3."""

    def __init__(self, config: Config, *, dtype, rngs: nnx.Rngs):
        self.gate = _linear(config.width, config.mlp_dim, config.mlp_bias, dtype, rngs, config.fp8)
        self.up = _linear(config.width, config.mlp_dim, config.mlp_bias, dtype, rngs, config.fp8)
        self.down = _linear(config.mlp_dim, config.width, config.mlp_bias, dtype, rngs, config.fp8)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class LayerScale(nnx.Module):
    """Per-channel scale of a residual branch."""

    def __init__(self, width: int, init: float):
        self.gamma = nnx.Param(jnp.full((width,), init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(jnp.float32) * self.gamma[...]


class Block(nnx.Module):
    """x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x))); the residual stream in x's dtype
    (float32 unless config.residual_dtype), the layer scales applied in float32."""

    def __init__(self, config: Config, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.norm1 = layers.LayerNorm(config.width, eps, rngs=rngs)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.norm2 = layers.LayerNorm(config.width, eps, rngs=rngs)
        self.mlp = (Mlp if config.mlp == "mlp" else SwiGLU)(config, dtype=dtype, rngs=rngs)
        scaled = config.layerscale is not None
        self.ls1 = LayerScale(config.width, config.layerscale) if scaled else None
        self.ls2 = LayerScale(config.width, config.layerscale) if scaled else None

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
        y = self.attn(self.norm1(x), sin, cos).astype(jnp.float32)
        x = x + (self.ls1(y) if self.ls1 is not None else y).astype(x.dtype)
        y = self.mlp(self.norm2(x)).astype(jnp.float32)
        return x + (self.ls2(y) if self.ls2 is not None else y).astype(x.dtype)


class Model(nnx.Module):
    """DINOv3 ViT encoder. Call with images (B, H, W, 3), already normalised.

    `mask_token` is a parameter of the checkpoints (used in masked-image training) that
    inference never reads; it is kept so that conversions lose nothing.
    """

    def __init__(self, config: Config, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        dtype = layers.compute_dtype(config.dtype)
        d = config.width
        self.patch_embed = layers.PatchEmbed(config.patch_size, d, bias=True, dtype=dtype, rngs=rngs)
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (d,)))
        if config.num_register_tokens:
            self.register_tokens = nnx.Param(init(rngs.params(), (config.num_register_tokens, d)))
        else:
            self.register_tokens = None
        self.mask_token = nnx.Param(jnp.zeros((d,), jnp.float32))
        self.blocks = nnx.List([Block(config, dtype=dtype, rngs=rngs) for _ in range(config.depth)])
        self.norm = layers.LayerNorm(d, config.layer_norm_eps, rngs=rngs)

    def embed(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        """CLS, registers, then patch tokens: (B, 1 + R + N, D) in the residual stream's dtype
        (float32 unless config.residual_dtype), and the patch grid (gh, gw)."""
        x, grid = self.patch_embed(images.astype(layers.compute_dtype(self.config.dtype)))
        b, _, d = x.shape
        prefix = [self.cls_token[...][None]]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens[...])
        prefix = jnp.broadcast_to(jnp.concatenate(prefix, axis=0)[None], (b, self.config.num_prefix_tokens, d))
        tokens = jnp.concatenate([prefix, x.astype(jnp.float32)], axis=1)
        return tokens.astype(layers.residual_dtype(self.config.residual_dtype)), grid

    def __call__(self, images: jax.Array, block_indices: Sequence[int] = (-1,),
                 norm: bool = True, remat: str = "none") -> tuple[jax.Array, ...]:
        """Tokens after each requested block (0-based; -1 is the last).

        images: (B, H, W, 3) normalised pixels, H and W divisible by the patch size.
        Returns one (B, 1 + R + H/p * W/p, D) float32 array per index: CLS, the R register
        tokens, then the patch tokens (row-major), through the final LayerNorm when `norm`.
        `remat`: recompute the blocks' activations when differentiating (layers.rematted).
        """
        wanted = layers.normalize_block_indices(block_indices, self.config.depth)
        run = layers.rematted(lambda blk, h, s, c: blk(h, s, c), remat)
        x, grid = self.embed(images)
        sin, cos = (jnp.asarray(t) for t in rope_tables(self.config, grid))
        outputs = {}
        for i, block in enumerate(self.blocks):
            if i > max(wanted):
                break
            x = run(block, x, sin, cos)
            if i in wanted:
                outputs[i] = self.norm(x) if norm else x.astype(jnp.float32)
        return tuple(outputs[i] for i in wanted)

    def patch_tokens(self, images: jax.Array, block_indices: Sequence[int]) -> tuple[jax.Array, ...]:
        """Normalised patch tokens only, (B, H/p * W/p, D) per requested block: what the
        original `get_intermediate_layers(x, n=...)` returns (n=24 on ViT-L: all blocks)."""
        prefix = self.config.num_prefix_tokens
        return tuple(t[:, prefix:] for t in self(images, block_indices, norm=True))


def load(folder: str) -> Model:
    """Builds a Model from a folder written by `convert.to_flax` (family "dinov3")."""
    from mmovseg_jax.models import storage

    return storage.load_model(folder, expect_family="dinov3")
