"""Per-pixel losses of the DEF stage over class logit maps.

    logits (B, T, H, W) float, labels (B, H, W) int with values in [0, T) or `ignore`

"bce": binary cross-entropy of every class map against the one-hot label (the
release's loss); "ce": softmax cross-entropy over classes (the paper's). Ignore pixels
are excluded from both. `release_ignore=True` reproduces the release instead: with BCE,
ignore pixels are all-zero targets that count in the mean.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

IGNORE = 255


def segmentation_loss(logits: jax.Array, labels: jax.Array, kind: Literal["bce", "ce"] = "bce", *,
                      ignore: int = IGNORE, release_ignore: bool = False) -> jax.Array:
    """Mean loss over the counted pixels (a scalar float32); 0 when no pixel counts."""
    if logits.ndim != 4 or labels.shape != (logits.shape[0],) + logits.shape[2:]:
        raise ValueError(f"logits (B, T, H, W) and labels (B, H, W) do not match: {logits.shape}, {labels.shape}")
    logits = logits.astype(jnp.float32)
    classes = logits.shape[1]
    labels = labels.astype(jnp.int32)
    valid = labels != ignore
    onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), classes, axis=1) * valid[:, None]  # (B, T, H, W)
    if kind == "bce":
        per_pixel = optax.sigmoid_binary_cross_entropy(logits, onehot)  # (B, T, H, W)
        if release_ignore:
            return per_pixel.mean()
        counted = valid.sum() * classes
        return jnp.where(counted > 0, (per_pixel * valid[:, None]).sum() / jnp.maximum(counted, 1), 0.0)
    if kind == "ce":
        if release_ignore:
            raise ValueError("release_ignore applies to the BCE loss only")
        per_pixel = -(jax.nn.log_softmax(logits, axis=1) * onehot).sum(axis=1)  # (B, H, W), 0 at ignore
        counted = valid.sum()
        return jnp.where(counted > 0, per_pixel.sum() / jnp.maximum(counted, 1), 0.0)
    raise ValueError(f"loss kind must be 'bce' or 'ce', got {kind!r}")
