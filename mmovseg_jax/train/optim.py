"""Optimiser from a config: AdamW with warmup + cosine decay, optional global-norm clipping.

Weight decay applies to matrices only (kernels of linear and conv layers); norms,
biases, embeddings and position tables are not decayed. Parameter groups can train at
multiples of the base learning rate (the DEF stage's CLIP at 1/100), through
`optax.multi_transform`; clipping is over the global norm of all groups together.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import ml_collections
import optax


def schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup to config.lr, then cosine (or constant) decay."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, max(warmup, 1), max(total_steps, warmup + 1),
                                                  end_value=config.lr * config.get("end_lr_factor", 0.0))
    if config.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, config.lr, max(warmup, 1)),
                                     optax.constant_schedule(config.lr)], [max(warmup, 1)])
    raise ValueError(f"config.optimizer.schedule: {config.schedule!r} is not 'cosine' or 'constant'")


def decay_mask(params) -> object:
    """True for parameters that get weight decay: kernels (matrices and conv filters)."""
    def is_kernel(path, leaf) -> bool:
        return getattr(path[-1], "key", None) == "kernel" and getattr(leaf, "ndim", 0) >= 2
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make(config: ml_collections.ConfigDict, total_steps: int,
         groups: tuple[Callable[[Any], Any], Mapping[str, float]] | None = None
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser named by config.optimizer and its (base) learning-rate schedule.

    groups: (labels_fn, {label: lr multiplier}); labels_fn maps the parameter tree to a
    tree of labels, as for `optax.multi_transform`.
    """
    if config.name != "adamw":
        raise ValueError(f"config.optimizer.name: {config.name!r} is not supported (adamw)")
    lr = schedule(config, total_steps)

    def adamw(multiplier: float) -> optax.GradientTransformation:
        rate = lr if multiplier == 1.0 else (lambda step: multiplier * lr(step))
        return optax.adamw(rate, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask)

    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
    if groups is None:
        parts.append(adamw(1.0))
    else:
        labels_fn, multipliers = groups
        parts.append(optax.multi_transform({name: adamw(m) for name, m in multipliers.items()}, labels_fn))
    return optax.chain(*parts), lr
