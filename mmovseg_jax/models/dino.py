"""DINO v1 vision transformer (Caron et al. 2021) in Flax NNX.

`Model(config)(images, block_indices, norm)` returns the token sequences (CLS first)
after the chosen blocks, optionally passed through the final LayerNorm, which is what
DINO's `get_intermediate_layers` returns. Any input size divisible by the patch size
works: the position table is resized bicubically, its CLS row kept apart.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmovseg_jax.models import layers


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of a DINO ViT. `image_size` is the size its position table was trained at."""

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    # "size": transformers' interpolate_pos_encoding; "dino": the original repository's
    # scale factor (g + 0.1) / n, which the MM-OVSeg release uses.
    pos_interpolation: str = "size"
    dtype: str = "float32"
    # Attention kernel: "xla" (exact, default), "cudnn" (flash attention on padded tokens,
    # GPU, bf16) or "auto" (cudnn on a GPU in bf16/fp16, else xla); see layers.attention.
    attention: str = "xla"
    # The blocks' weight matrix multiplies in float8 (bf16 dtype only; H100/H200 float8
    # tensor cores; changes results, see ops/fp8.py). Off unless asked for.
    fp8: bool = False
    # Speed options that change results (off unless asked for; not stored with a model):
    # the residual stream's dtype ("float32" | "bfloat16", layers.RESIDUAL_DTYPES) and the
    # GELU ("exact" | "tanh", layers.GELUS).
    residual_dtype: str = "float32"
    gelu: str = "exact"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _vit(width: int, heads: int, patch: int) -> Config:
    return Config(patch_size=patch, width=width, num_heads=heads, mlp_dim=4 * width)


VARIANTS: dict[str, Config] = {
    "S/16": _vit(384, 6, 16),
    "S/8": _vit(384, 6, 8),
    "B/16": _vit(768, 12, 16),
    "B/8": _vit(768, 12, 8),
}


# With `cls_only`, the token rows kept after the CLS shortcut's slice: the CLS token and
# the first patch token, which is computed and dropped. Two, not one: with a (B, 1, D)
# slice, XLA's GPU layout assignment laid the whole residual stream out batch-minor and
# transposed it around every GEMM (a deviceless compile of the CMU step for an H200:
# 12 GB of transposes per step, gone with two rows). The deepest block's attention still
# runs for every query on the configured kernel (a separate few-query XLA attention gave
# its gradients a token-minor layout too); its output projection and MLP for two rows.
CLS_SHORTCUT_ROWS = 2


class Model(nnx.Module):
    """DINO ViT encoder. Call with images (B, H, W, 3), already normalised."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        dtype = layers.compute_dtype(config.dtype)
        if config.pos_interpolation not in layers.POS_INTERPOLATIONS:
            raise ValueError(f"pos_interpolation must be one of {layers.POS_INTERPOLATIONS}")
        self.patch_embed = layers.PatchEmbed(config.patch_size, config.width, bias=True, dtype=dtype, rngs=rngs)
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (config.width,)))
        self.pos_embed = nnx.Param(init(rngs.params(), (config.grid ** 2 + 1, config.width)))
        layers.residual_dtype(config.residual_dtype)  # validates the name
        self.blocks = nnx.List([
            layers.Block(config.width, config.num_heads, config.mlp_dim, eps=config.layer_norm_eps,
                         activation=layers.gelu_activation(config.gelu), qkv_bias=config.qkv_bias, dtype=dtype,
                         attention=config.attention, fp8=config.fp8, rngs=rngs)
            for _ in range(config.depth)])
        self.norm = layers.LayerNorm(config.width, config.layer_norm_eps, rngs=rngs)

    def embed(self, images: jax.Array) -> jax.Array:
        """Patch tokens with CLS prepended and position embeddings added: (B, 1 + N, D) in
        the residual stream's dtype (float32 unless config.residual_dtype says otherwise)."""
        dtype = layers.compute_dtype(self.config.dtype)
        x, grid = self.patch_embed(images.astype(dtype))
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x.astype(jnp.float32)], axis=1)
        pos = layers.resize_position_table(self.pos_embed[...], grid, self.config.pos_interpolation)
        return (x + pos[None]).astype(layers.residual_dtype(self.config.residual_dtype))

    def __call__(self, images: jax.Array, block_indices: Sequence[int] = (-1,),
                 norm: bool = True, cls_only: bool = False, remat: str = "none") -> tuple[jax.Array, ...]:
        """Tokens after each requested block (0-based; -1 is the last).

        images: (B, H, W, 3) normalised pixels, H and W divisible by the patch size.
        Returns one (B, 1 + H/p * W/p, D) float32 array per index, CLS token first,
        passed through the final LayerNorm when `norm` is set. With `cls_only` each is
        the CLS token alone, (B, 1, D), the same values: the deepest requested block's
        output projection and MLP then run for its first CLS_SHORTCUT_ROWS tokens only,
        since no other token of it is read. `remat` ("none" | "activation" | "full" |
        "dots", see layers.rematted) trades the blocks' stored activations for recomputation when
        differentiating.
        """
        wanted = layers.normalize_block_indices(block_indices, self.config.depth)
        run = layers.rematted(lambda blk, h: blk(h), remat)
        x = self.embed(images)
        outputs = {}
        for i, block in enumerate(self.blocks):
            if i > max(wanted):
                break
            last = i == max(wanted)
            x = block.leading_call(x, CLS_SHORTCUT_ROWS) if cls_only and last else run(block, x)
            if i in wanted:
                y = x[:, :CLS_SHORTCUT_ROWS] if cls_only else x
                y = self.norm(y) if norm else y.astype(jnp.float32)
                outputs[i] = y[:, :1] if cls_only else y
        return tuple(outputs[i] for i in wanted)


def load(folder: str) -> Model:
    """Builds a Model from a folder written by `convert.to_flax` (or `save`)."""
    from mmovseg_jax.models import storage

    return storage.load_model(folder, expect_family="dino")
