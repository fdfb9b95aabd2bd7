"""Pixel preprocessing shared by the stages: CLIP normalisation and SAR as three channels.

MM-OVSeg normalises RGB and SAR alike with CLIP's mean and std (0-255 scale), and feeds
single-channel SAR to the ViTs replicated to three channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmovseg_jax.models.clip import PIXEL_MEAN, PIXEL_STD


def normalize(pixels: jax.Array) -> jax.Array:
    """(..., 3) pixels on the 0-255 scale (any dtype) -> CLIP-normalised float32."""
    return (pixels.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)


def sar_as_rgb(sar: jax.Array) -> jax.Array:
    """(B, H, W) or (B, H, W, 1) single-channel SAR -> (B, H, W, 3), the channel replicated."""
    if sar.ndim == 4:
        sar = sar[..., 0]
    return jnp.repeat(sar[..., None], 3, axis=-1)
