"""Bilinear resizing as explicit interpolation matrices (numpy or JAX, jit-friendly).

Matches `torch.nn.functional.interpolate(mode="bilinear", antialias=False)` for both
`align_corners` values: separable, one (out, in) matrix per spatial axis, no
antialiasing when shrinking (each output sample reads at most two input samples).

- `bilinear_matrix(in_size, out_size, align_corners)`: the 1-D (out, in) matrix.
- `resize_bilinear(x, (h, w), align_corners=False, axes=(-3, -2))`: resizes two axes of a
  numpy array (on the host, float32 BLAS) or a JAX array (`jnp.einsum` with the matrices
  as constants, so it traces inside `jax.jit`; float32 accumulation at HIGHEST precision,
  result cast back to the input's floating dtype).

The default axes are those of the project's channels-last layout, (..., H, W, C); pass
`axes=(-2, -1)` for (..., H, W) maps such as (T, H, W) class probabilities.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def _cached_matrix(in_size: int, out_size: int, align_corners: bool, scale_factor: float | None) -> np.ndarray:
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        step = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * step
    else:
        step = 1.0 / scale_factor if scale_factor else in_size / out_size
        src = np.maximum((dst + 0.5) * step - 0.5, 0.0)  # PyTorch clamps negative sources to 0
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def bilinear_matrix(in_size: int, out_size: int, align_corners: bool = False,
                    scale_factor: float | None = None) -> np.ndarray:
    """(out_size, in_size) float32 matrix of PyTorch's 1-D linear resampling (read-only).

    align_corners=False: source coordinate (i + 0.5) * in/out - 0.5 (half-pixel centres),
    clamped at 0; with `scale_factor` the step is 1/scale_factor, as PyTorch does when a
    scale factor rather than a size is passed. align_corners=True: i * (in-1)/(out-1).
    Rows sum to 1; the last input sample is repeated past the border.
    """
    return _cached_matrix(int(in_size), int(out_size), bool(align_corners),
                          None if scale_factor is None else float(scale_factor))


def _apply_numpy(x: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    # tensordot puts the new axis last; move it back (BLAS, fast for large tiles)
    return np.moveaxis(np.tensordot(x, matrix, axes=([axis], [1])), -1, axis)


def _apply_jax(x: jax.Array, matrix: np.ndarray, axis: int, precision) -> jax.Array:
    letters = "abcdefghijklmnopqrstuvwxyz"[: x.ndim]
    out = letters.replace(letters[axis], "Z")
    return jnp.einsum(f"Z{letters[axis]},{letters}->{out}", matrix, x, precision=precision)


def resize_bilinear(x, size: tuple[int, int], align_corners: bool = False,
                    axes: tuple[int, int] = (-3, -2), precision=jax.lax.Precision.HIGHEST):
    """Bilinearly resizes axes `axes` of `x` to `size` = (h, w).

    x: numpy array (computed on the host in float32, returns float32) or JAX array
    (works under `jax.jit`; computed in float32, returned in x's floating dtype, float32
    for integer inputs). Default axes (-3, -2): channels-last (..., H, W, C).
    """
    ax_h, ax_w = (a % x.ndim for a in axes)
    if ax_h == ax_w:
        raise ValueError(f"axes must name two different axes, got {axes}")
    h, w = size
    mh = bilinear_matrix(x.shape[ax_h], h, align_corners)
    mw = bilinear_matrix(x.shape[ax_w], w, align_corners)
    if isinstance(x, np.ndarray):
        y = x.astype(np.float32, copy=False)
        if y.shape[ax_h] != h:
            y = _apply_numpy(y, mh, ax_h)
        if y.shape[ax_w] != w:
            y = _apply_numpy(y, mw, ax_w)
        return y
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    y = x.astype(jnp.float32)
    if x.shape[ax_h] != h:
        y = _apply_jax(y, mh, ax_h, precision)
    if x.shape[ax_w] != w:
        y = _apply_jax(y, mw, ax_w, precision)
    return y.astype(out_dtype)
