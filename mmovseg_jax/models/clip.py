"""CLIP (Radford et al. 2021) vision and text towers in Flax NNX.

The vision tower gives the pooled image embedding, the residual stream after any
blocks, and the "dense" mode of CAT-Seg / MM-OVSeg: the last block runs without
attention (each token's value path, CLS residual, MLP), then ln_post and the
projection, giving one joint-space embedding per patch. Any input size divisible by
the patch size works through bicubic position-table interpolation.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmovseg_jax.models import layers


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    # Attention kernel of the vision blocks: "xla" (exact, default), "cudnn" or "auto"
    # (see layers.attention); the text tower always uses "xla".
    attention: str = "xla"
    # The vision blocks' weight matrix multiplies in float8 (see dino.Config.fp8).
    fp8: bool = False
    # The vision residual stream's dtype (see dino.Config.residual_dtype; changes results).
    residual_dtype: str = "float32"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    eos_token_id: int = 49407
    # "eos": the first position holding eos_token_id; "argmax": the position of the
    # largest token id (OpenAI's rule; identical when eos is the largest id).
    pooling: str = "eos"


@dataclasses.dataclass(frozen=True)
class Config:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = 512
    dtype: str = "float32"

    @staticmethod
    def from_dict(d: dict) -> "Config":
        return Config(vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]),
                      embed_dim=d["embed_dim"], dtype=d.get("dtype", "float32"))


VARIANTS: dict[str, Config] = {
    "B/32": Config(vision=VisionConfig(patch_size=32)),
    "B/16": Config(),
    "L/14": Config(vision=VisionConfig(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096),
                   text=TextConfig(width=768, num_heads=12, mlp_dim=3072), embed_dim=768),
    "L/14@336": Config(vision=VisionConfig(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                                           image_size=336),
                       text=TextConfig(width=768, num_heads=12, mlp_dim=3072), embed_dim=768),
}

# CLIP's pixel normalisation, on the 0-255 scale.
PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)


class VisionOutput(NamedTuple):
    """image_embed (B, E): pooled, projected (None in dense mode). blocks: (B, 1 + N, W)
    residual streams after the requested blocks. dense (B, 1 + N, E): per-token joint
    embeddings, CLS first (None unless dense)."""

    image_embed: jax.Array | None
    blocks: tuple[jax.Array, ...]
    dense: jax.Array | None


def _blocks(cfg, dtype, rngs) -> nnx.List:
    return nnx.List([layers.Block(cfg.width, cfg.num_heads, cfg.mlp_dim, eps=cfg.layer_norm_eps,
                                  activation=cfg.activation, dtype=dtype,
                                  attention=getattr(cfg, "attention", "xla"), fp8=getattr(cfg, "fp8", False),
                                  rngs=rngs)
                     for _ in range(cfg.depth)])


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        layers.residual_dtype(cfg.residual_dtype)  # validates the name
        scale = cfg.width ** -0.5
        self.patch_embed = layers.PatchEmbed(cfg.patch_size, cfg.width, bias=False, dtype=dtype, rngs=rngs)
        self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (cfg.width,)))
        self.pos_embed = nnx.Param(scale * jax.random.normal(rngs.params(), (cfg.grid ** 2 + 1, cfg.width)))
        self.pre_norm = layers.LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
        self.blocks = _blocks(cfg, dtype, rngs)
        self.post_norm = layers.LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
        self.projection = nnx.Linear(cfg.width, embed_dim, use_bias=False, dtype=dtype,
                                     param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, images: jax.Array, block_indices: Sequence[int] = (), dense: bool = False,
                 remat: str = "none") -> VisionOutput:
        """images: (B, H, W, 3) CLIP-normalised pixels, H and W divisible by the patch size.
        `remat` ("none" | "activation" | "full" | "dots", layers.rematted): what the blocks
        recompute instead of keeping when differentiated; the values do not change."""
        wanted = layers.normalize_block_indices(block_indices, self.cfg.depth)
        run = layers.rematted(lambda blk, h: blk(h), remat)
        run_dense = layers.rematted(lambda blk, h: blk.dense_call(h), remat)
        x, grid = self.patch_embed(images.astype(self.dtype))
        cls = jnp.broadcast_to(self.class_embedding[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x.astype(jnp.float32)], axis=1)
        x = x + layers.resize_position_table(self.pos_embed[...], grid, "size")[None]
        x = self.pre_norm(x).astype(layers.residual_dtype(self.cfg.residual_dtype))
        outputs = []
        last = self.cfg.depth - 1
        for i, block in enumerate(self.blocks):
            x = run_dense(block, x) if (dense and i == last) else run(block, x)
            if i in wanted:
                outputs.append((i, x.astype(jnp.float32)))
        blocks = tuple(dict(outputs)[i] for i in wanted)
        if dense:
            return VisionOutput(None, blocks, self.projection(self.post_norm(x)).astype(jnp.float32))
        pooled = self.projection(self.post_norm(x[:, 0])).astype(jnp.float32)
        return VisionOutput(pooled, blocks, None)


class TextTower(nnx.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.pooling not in ("eos", "argmax"):
            raise ValueError(f"text pooling must be 'eos' or 'argmax', got {cfg.pooling!r}")
        self.cfg = cfg
        self.token_embed = nnx.Embed(cfg.vocab_size, cfg.width, param_dtype=jnp.float32,
                                     embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.pos_embed = nnx.Param(0.01 * jax.random.normal(rngs.params(), (cfg.context_length, cfg.width)))
        self.blocks = _blocks(cfg, dtype, rngs)
        self.final_norm = layers.LayerNorm(cfg.width, cfg.layer_norm_eps, rngs=rngs)
        self.projection = nnx.Linear(cfg.width, embed_dim, use_bias=False, dtype=dtype,
                                     param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, token_ids: jax.Array, remat: str = "none") -> jax.Array:
        """token_ids: (N, L) int, L <= context_length -> (N, E) float32 text embeddings (not
        normalised). `remat`: as for VisionTower."""
        n, length = token_ids.shape
        if length > self.cfg.context_length:
            raise ValueError(f"token sequence of length {length} exceeds the context length "
                             f"{self.cfg.context_length}")
        x = self.token_embed(token_ids) + self.pos_embed[:length][None]
        run = layers.rematted(lambda blk, h: blk(h, causal=True), remat)
        for block in self.blocks:
            x = run(block, x)
        x = self.final_norm(x)
        if self.cfg.pooling == "argmax":
            eos = jnp.argmax(token_ids, axis=-1)
        else:
            eos = jnp.argmax(token_ids == self.cfg.eos_token_id, axis=-1)
        return self.projection(x[jnp.arange(n), eos]).astype(jnp.float32)


class Model(nnx.Module):
    """CLIP with both towers and the learned logit scale."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        dtype = layers.compute_dtype(config.dtype)
        self.vision = VisionTower(config.vision, config.embed_dim, dtype=dtype, rngs=rngs)
        self.text = TextTower(config.text, config.embed_dim, dtype=dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(jnp.log(1 / 0.07), jnp.float32))

    def encode_image(self, images: jax.Array, block_indices: Sequence[int] = (), dense: bool = False,
                     remat: str = "none") -> VisionOutput:
        return self.vision(images, block_indices, dense, remat)

    def encode_text(self, token_ids: jax.Array, remat: str = "none") -> jax.Array:
        return self.text(token_ids, remat)

    def __call__(self, images: jax.Array, token_ids: jax.Array) -> jax.Array:
        """Image-text logits (B, N): logit_scale.exp() * cosine similarity."""
        img = self.vision(images).image_embed
        txt = self.text(token_ids)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        return jnp.exp(self.logit_scale[...]) * img @ txt.T


def load(folder: str) -> Model:
    """Builds a Model from a folder written by `convert.to_flax`."""
    from mmovseg_jax.models import storage

    return storage.load_model(folder, expect_family="clip")
