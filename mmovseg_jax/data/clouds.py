"""Seeded, jit-able synthetic clouds and shadows for optical tiles (JAX).

An independent implementation of the algorithm of SatelliteCloudGenerator (Czerkawski
et al. 2023, Remote Sensing 15(17):4138) as described in REFERENCE.md section 4:

1. Noise: multi-octave Perlin noise, cell sizes 4, 8, ... up to about a quarter of the
   tile, octave of cell size s weighted s**decay_factor, normalised by max |x|, tanh(4x).
2. Mask: the product of `locality_degree` such noises, each min-max scaled to [0, 1];
   values below `clear_threshold` cleared, the rest shifted down by it and rescaled so the
   maximum is 1; alpha = mask * (max_lvl - min_lvl) + min_lvl.
3. Per band: alpha * (1 + channel_magnitude_shift * U(-1, 1)), clipped to [0, 1], then
   shifted by up to `channel_offset` pixels (cropped by the largest shift and resized back).
4. Mixing: the (shadowed) image is blurred with a Gaussian of per-pixel sigma
   blur_scaling * mean_bands(alpha) pixels; cloud base B = alpha + colour * (1 - alpha),
   colour = per-band mean of the blurred image / mean over bands, scaled so the largest
   is 1 (white if `cloud_color` is off); out = blurred * (1 - alpha) + B * alpha, so a
   fully opaque cloud is white and a thin one takes the scene's tint.
5. Shadows (optional, applied before the clouds): an independent mask with min 0,
   max `shadow_max_lvl`, clear threshold 0.4, decay 1.5, locality one less than the
   cloud's; out = x * (1 - alpha_shadow), so shadows only darken.

Every random parameter range (lo, hi) is sampled per image from the key. Images are
(H, W, C) or (B, H, W, C) float reflectance in [0, 1]; everything traces under
`jax.jit(add_clouds, static_argnames=("params",))` and vmaps over a batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class CloudParams:
    """Cloud synthesis settings; (lo, hi) ranges are sampled uniformly per image.

    min_lvl / max_lvl: opacity range of the cloud (max is drawn from [max(lo, min), hi]).
    clear_threshold: mask values below it are cleared (more clear sky).
    locality_degree: integer range of how many noises are multiplied (more = patchier).
    decay_factor: octave weight exponent (higher = smoother clouds).
    channel_offset: largest per-band spatial shift of the opacity, pixels.
    channel_magnitude_shift: per-band opacity factor 1 +- this.
    blur_scaling: ground blur sigma (pixels) at full opacity; 0 disables the blur.
    cloud_color: tint the cloud with the image's mean colour (else white).
    shadows: add an independent cloud shadow with max opacity in `shadow_max_lvl`.
    """

    min_lvl: Range = (0.0, 0.05)
    max_lvl: Range = (0.95, 1.0)
    clear_threshold: Range = (0.0, 0.0)
    locality_degree: tuple[int, int] = (1, 1)
    decay_factor: Range = (1.0, 1.0)
    channel_offset: int = 2
    channel_magnitude_shift: float = 0.05
    blur_scaling: float = 2.0
    cloud_color: bool = True
    shadows: bool = False
    shadow_max_lvl: Range = (0.3, 0.6)
    shadow_clear_threshold: float = 0.4
    shadow_decay_factor: float = 1.5

    def __post_init__(self):  # ranges become float tuples (hashable: params is a static jit argument)
        for name in ("min_lvl", "max_lvl", "clear_threshold", "decay_factor", "shadow_max_lvl"):
            lo, hi = (float(v) for v in getattr(self, name))
            object.__setattr__(self, name, (lo, hi))
            if not lo <= hi:
                raise ValueError(f"CloudParams.{name}: need lo <= hi, got ({lo}, {hi})")
        lo, hi = self.locality_degree
        if not (int(lo) == lo and int(hi) == hi and 1 <= lo <= hi):
            raise ValueError(f"CloudParams.locality_degree: need integers 1 <= lo <= hi, got ({lo}, {hi})")
        object.__setattr__(self, "locality_degree", (int(lo), int(hi)))
        if self.channel_offset < 0 or int(self.channel_offset) != self.channel_offset:
            raise ValueError(f"CloudParams.channel_offset must be an integer >= 0, got {self.channel_offset}")
        if self.blur_scaling < 0:
            raise ValueError(f"CloudParams.blur_scaling must be >= 0, got {self.blur_scaling}")


# Presets of REFERENCE.md section 4 (the package's configs); all blur 2, cloud colour on.
WIDE = CloudParams(min_lvl=(0.0, 0.8), max_lvl=(0.0, 1.0), clear_threshold=(0.0, 0.1), locality_degree=(1, 3),
                   decay_factor=(0.8, 1.2), channel_offset=2)
BIG = CloudParams(min_lvl=(0.0, 0.0), max_lvl=(1.0, 1.0), clear_threshold=(0.0, 0.2), locality_degree=(1, 1),
                  channel_offset=2)
LOCAL = dataclasses.replace(BIG, locality_degree=(2, 4))
THIN = CloudParams(min_lvl=(0.0, 0.1), max_lvl=(0.4, 0.7), clear_threshold=(0.0, 0.0), locality_degree=(1, 3),
                   channel_offset=4)
FOG = CloudParams(min_lvl=(0.3, 0.6), max_lvl=(0.6, 0.7), clear_threshold=(0.0, 0.0), locality_degree=(1, 1),
                  channel_offset=2)
PRESETS: dict[str, CloudParams] = {"thin": THIN, "big": BIG, "local": LOCAL, "fog": FOG, "wide": WIDE}


# ----------------------------------------------------------------------------- noise

def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {(h, w)}")
    return int(h), int(w)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _lattice(shape: tuple[int, int], min_cell: int) -> tuple[int, int]:
    """Gradient lattice (rows, cols) covering the next power-of-two canvas >= shape."""
    return -(-_next_pow2(shape[0]) // min_cell) + 1, -(-_next_pow2(shape[1]) // min_cell) + 1


def _perlin(angle: jax.Array, shape: tuple[int, int], cell: jax.Array) -> jax.Array:
    """(H, W) gradient noise from lattice gradient directions `angle` (radians) and a
    (possibly traced) cell size in pixels; smoothstep (3t^2 - 2t^3) interpolation."""
    h, w = shape
    g = jnp.stack([jnp.sin(angle), jnp.cos(angle)])  # (2, rows, cols): y and x components
    y = jnp.arange(h, dtype=jnp.float32) / cell
    x = jnp.arange(w, dtype=jnp.float32) / cell
    iy, ix = jnp.floor(y).astype(jnp.int32), jnp.floor(x).astype(jnp.int32)
    ty, tx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy: int, dx: int) -> jax.Array:  # dot(gradient at corner, offset from corner)
        grad = jnp.take(jnp.take(g, iy + dy, axis=1), ix + dx, axis=2)
        return grad[0] * (ty - dy) + grad[1] * (tx - dx)

    uy, ux = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return top * (1 - uy) + bottom * uy


def perlin_noise(key: jax.Array, shape: tuple[int, int], cell_size: int) -> jax.Array:
    """(H, W) float32 gradient noise with lattice cells of `cell_size` pixels, in about [-0.71, 0.71].

    Unit gradients of uniformly random direction on the lattice of the next power-of-two
    canvas >= (H, W), smoothstep interpolation; the canvas is cropped to its top-left (H, W).
    """
    h, w = _size2(shape)
    angle = jax.random.uniform(key, _lattice((h, w), int(cell_size)), jnp.float32, 0.0, 2 * math.pi)
    return _perlin(angle, (h, w), jnp.float32(cell_size))


def octave_cell_sizes(size: int | Sequence[int]) -> tuple[int, ...]:
    """Cell sizes (pixels) of the octaves: powers of two ending at ~max(H, W)/4 (>= 4);
    one octave per power of two from 4 to min(H, W)/4 (at least one). 256 -> 4..64."""
    h, w = _size2(size)
    top = max(2, int(math.floor(math.log2(max(h, w) / 4))))
    count = max(1, int(math.floor(math.log2(min(h, w)))) - 3)
    return tuple(2 ** e for e in range(max(2, top - count + 1), top + 1))


def _octave_noise(angles: jax.Array, shape: tuple[int, int], decay: jax.Array) -> jax.Array:
    """angles (octaves, rows, cols) -> (H, W) multi-octave noise in (-1, 1)."""
    cells = jnp.asarray(octave_cell_sizes(shape), jnp.float32)

    def octave(total: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        angle, s = xs  # one compiled body for all octaves (fast to compile at any tile size)
        return total + jnp.power(s, decay) * _perlin(angle, shape, s), None

    total, _ = jax.lax.scan(octave, jnp.zeros(shape, jnp.float32), (angles, cells))
    peak = jnp.max(jnp.abs(total))
    return jnp.tanh(4.0 * total / jnp.where(peak > 0, peak, 1.0))


def _octave_angles(key: jax.Array, shape: tuple[int, int], batch: tuple[int, ...] = ()) -> jax.Array:
    """(*batch, octaves, rows, cols) gradient directions for `_octave_noise`, one draw."""
    cells = octave_cell_sizes(shape)
    return jax.random.uniform(key, (*batch, len(cells), *_lattice(shape, cells[0])), jnp.float32, 0.0, 2 * math.pi)


def multi_octave_noise(key: jax.Array, size: int | Sequence[int], decay_factor: float | jax.Array = 1.0
                       ) -> jax.Array:
    """(H, W) float32 in (-1, 1): sum of Perlin octaves (cell s weighted s**decay_factor),
    divided by its max |value|, then tanh(4 x). decay_factor may be traced."""
    shape = _size2(size)
    return _octave_noise(_octave_angles(key, shape), shape, jnp.asarray(decay_factor, jnp.float32))


# ----------------------------------------------------------------------------- masks

N_DRAWS = 5  # scalars drawn per mask: min_lvl, max_lvl, clear_threshold, decay_factor, locality degree


def _lerp(bounds: Sequence[float], u: jax.Array) -> jax.Array:
    lo, hi = bounds
    return lo + (hi - lo) * u if hi > lo else jnp.float32(lo)


def _unit_scale(x: jax.Array) -> jax.Array:
    """Min-max scaling to [0, 1] (all zeros for a constant map)."""
    lo, hi = jnp.min(x), jnp.max(x)
    return jnp.where(hi > lo, (x - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)


def _mask_draws(u: jax.Array, params: CloudParams, opacity) -> tuple[jax.Array, ...]:
    """u (N_DRAWS,) uniforms -> (min_lvl, max_lvl, clear_threshold, decay_factor, degree).

    max_lvl is drawn from [max(max_lo, min_lvl), max_hi] and kept >= min_lvl; `opacity`
    (scalar) overrides both levels. degree is an integer in the locality range."""
    if opacity is None:
        low = _lerp(params.min_lvl, u[0])
        floor = jnp.maximum(jnp.float32(params.max_lvl[0]), low)
        high = jnp.maximum(low, floor + (params.max_lvl[1] - floor) * u[1])
    else:
        low = high = jnp.clip(jnp.asarray(opacity, jnp.float32), 0.0, 1.0)
    lo, hi = params.locality_degree
    degree = jnp.minimum(lo + jnp.floor(u[4] * (hi - lo + 1)), hi)
    return low, high, _lerp(params.clear_threshold, u[2]), _lerp(params.decay_factor, u[3]), degree


def _noises(key: jax.Array, shape: tuple[int, int], decays: jax.Array) -> jax.Array:
    """(N, H, W) independent multi-octave noises, each min-max scaled to [0, 1]; decays (N,)."""
    angles = _octave_angles(key, shape, (decays.shape[0],))
    return jax.vmap(lambda a, d: _unit_scale(_octave_noise(a, shape, d)))(angles, decays)


def _opacity(noises: jax.Array, draws: tuple[jax.Array, ...]) -> jax.Array:
    """(hi, H, W) unit noises -> (H, W) opacity: product of the first `degree`, clear
    threshold, rescaled to max 1, mapped to [min_lvl, max_lvl]."""
    low, high, threshold, _, degree = draws
    used = jnp.arange(noises.shape[0]) < degree  # noises past `degree` count as 1
    mask = jnp.prod(jnp.where(used[:, None, None], noises, 1.0), axis=0)
    mask = jnp.clip(jnp.where(mask < threshold, 0.0, mask - threshold), 0.0, 1.0)
    peak = jnp.max(mask)
    mask = jnp.where(peak > 0, mask / jnp.where(peak > 0, peak, 1.0), 0.0)
    return jnp.clip(mask * (high - low) + low, 0.0, 1.0)


def cloud_mask(key: jax.Array, size: int | Sequence[int], params: CloudParams | None = None, *,
               opacity: float | jax.Array | None = None) -> jax.Array:
    """(H, W) float32 cloud opacity in [0, 1] (before the per-band jitter and offsets).

    Draws min_lvl, then max_lvl from [max(max_lo, min_lvl), max_hi], the clear threshold,
    decay factor and locality degree (integer, lo..hi) from their ranges.
    opacity: optional scalar overriding min_lvl = max_lvl (a uniform sheet of that opacity).
    """
    params = THIN if params is None else params
    shape = _size2(size)
    k_draw, k_noise = jax.random.split(key)
    draws = _mask_draws(jax.random.uniform(k_draw, (N_DRAWS,), jnp.float32), params, opacity)
    return _opacity(_noises(k_noise, shape, jnp.full((params.locality_degree[1],), draws[3])), draws)


def shadow_params(params: CloudParams) -> CloudParams:
    """The shadow mask's settings: min 0, max shadow_max_lvl, clear threshold 0.4, decay 1.5,
    locality one less than the cloud's (at least 1); band jitter and offsets as the cloud's."""
    lo, hi = params.locality_degree
    return dataclasses.replace(params, min_lvl=(0.0, 0.0), max_lvl=params.shadow_max_lvl,
                               clear_threshold=(params.shadow_clear_threshold,) * 2,
                               locality_degree=(max(1, lo - 1), max(1, hi - 1)),
                               decay_factor=(params.shadow_decay_factor,) * 2, shadows=False)


def _resample_axis(a: jax.Array, coords: jax.Array, axis: int) -> jax.Array:
    """Linear interpolation of `a` along `axis` at float coordinates (clamped to the edges)."""
    n = a.shape[axis]
    c = jnp.clip(coords, 0.0, n - 1.0)
    i0 = jnp.floor(c).astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, n - 1)
    f = c - i0
    f = f[:, None] if axis == 0 else f[None, :]
    return jnp.take(a, i0, axis=axis) * (1.0 - f) + jnp.take(a, i1, axis=axis) * f


def _per_band(u: jax.Array, alpha: jax.Array, params: CloudParams) -> jax.Array:
    """(H, W) opacity -> (H, W, C) with u (3, C) uniforms: per-band magnitude jitter, clip,
    per-band spatial shift."""
    factor = 1.0 + abs(params.channel_magnitude_shift) * (2.0 * u[0] - 1.0)
    alpha = jnp.clip(alpha[..., None] * factor, 0.0, 1.0)
    if params.channel_offset == 0:
        return alpha
    h, w = alpha.shape[:2]
    o = params.channel_offset
    offsets = jnp.minimum(jnp.floor(u[1:] * (2 * o + 1)), 2 * o) - o  # (2, C) integers in [-o, o]
    # Shift band c by offsets[:, c] (a roll), crop `crop` pixels off every side (crop = the
    # largest |shift|, so nothing wrapped survives) and resize back bilinearly, edges aligned:
    # output pixel i samples the source at crop + i * (n - 1 - 2 crop) / (n - 1) - shift.
    crop = jnp.minimum(jnp.max(jnp.abs(offsets)), (min(h, w) - 1) // 2)

    def axis(n: int, shift: jax.Array) -> jax.Array:
        return crop + jnp.arange(n, dtype=jnp.float32) * ((n - 1 - 2 * crop) / max(n - 1, 1)) - shift

    def band(a: jax.Array, dy: jax.Array, dx: jax.Array) -> jax.Array:
        return _resample_axis(_resample_axis(a, axis(h, dy), 0), axis(w, dx), 1)

    return jax.vmap(band, in_axes=(2, 0, 0), out_axes=2)(alpha, offsets[0], offsets[1])


# ----------------------------------------------------------------------------- mixing

def local_gaussian_blur(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """(H, W, C) image blurred with a per-pixel Gaussian of std sigma (H, W) pixels.

    Separable: a horizontal then a vertical pass of 2 radius + 1 taps, each weighted with
    the output pixel's sigma and renormalised; edges replicate. sigma 0 is the identity.
    """
    if radius <= 0:
        return image
    inv = 1.0 / (2.0 * jnp.square(sigma)[..., None] + 1e-12)

    def one_pass(x: jax.Array, ax: int) -> jax.Array:
        n = x.shape[ax]
        pad = [(0, 0)] * x.ndim
        pad[ax] = (radius, radius)
        padded = jnp.pad(x, pad, mode="edge")

        def tap(j: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            num, den = carry
            wgt = jnp.exp(-jnp.square((j - radius).astype(jnp.float32)) * inv)
            return num + wgt * jax.lax.dynamic_slice_in_dim(padded, j, n, axis=ax), den + wgt

        num, den = jax.lax.fori_loop(0, 2 * radius + 1, tap, (jnp.zeros_like(x), jnp.zeros_like(inv)))
        return num / den

    return one_pass(one_pass(image, 1), 0)


def cloud_colour(image: jax.Array) -> jax.Array:
    """(C,) cloud tint: per-band mean / mean over bands, scaled so the largest is 1; ones for a black image."""
    mean = jnp.mean(image, axis=(0, 1))
    colour = mean / jnp.where(jnp.mean(mean) > 0, jnp.mean(mean), 1.0)
    peak = jnp.max(colour)
    return jnp.where(peak > 0, colour / jnp.where(peak > 0, peak, 1.0), 1.0)


@functools.partial(jax.jit, static_argnames=("params",))
def _add_clouds_single(key: jax.Array, image: jax.Array, params: CloudParams, opacity) -> tuple[jax.Array, jax.Array]:
    """One (H, W, C) image; jitted so that un-jitted callers do not dispatch op by op.

    All scalars come from one uniform draw and all noises (cloud, then shadow) from one
    vmapped octave sum, which keeps the program small and quick to compile."""
    h, w, c = image.shape
    k_draw, k_noise = jax.random.split(key)
    shadow = shadow_params(params) if params.shadows else None
    u = jax.random.uniform(k_draw, (2, N_DRAWS + 3 * c), jnp.float32)  # row 0: cloud, row 1: shadow
    cloud = _mask_draws(u[0, :N_DRAWS], params, opacity)
    n_cloud = params.locality_degree[1]
    decays = [jnp.full((n_cloud,), cloud[3])]
    if shadow is not None:
        shade = _mask_draws(u[1, :N_DRAWS], shadow, None)
        decays.append(jnp.full((shadow.locality_degree[1],), shade[3]))
    noises = _noises(k_noise, (h, w), jnp.concatenate(decays))
    x = image
    if shadow is not None:
        x = x * (1.0 - _per_band(u[1, N_DRAWS:].reshape(3, c), _opacity(noises[n_cloud:], shade), shadow))
    alpha = _per_band(u[0, N_DRAWS:].reshape(3, c), _opacity(noises[:n_cloud], cloud), params)
    if params.blur_scaling > 0:
        radius = int(math.ceil(3.0 * params.blur_scaling))  # alpha <= 1, so sigma <= blur_scaling
        x = local_gaussian_blur(x, params.blur_scaling * jnp.mean(alpha, axis=-1), radius)
    colour = cloud_colour(x) if params.cloud_color else jnp.ones((c,), jnp.float32)
    base = alpha + colour * (1.0 - alpha)
    return x * (1.0 - alpha) + base * alpha, alpha


def add_clouds(key: jax.Array, image: jax.Array, params: CloudParams = THIN, *,
               opacity: float | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Cloudy image and its per-band cloud opacity.

    image: (H, W, C) or (B, H, W, C) reflectance-like floats in [0, 1].
    key: a PRNG key; for a batch, image i uses jax.random.split(key, B)[i] (or pass B keys).
    opacity: scalar (or (B,) for a batch) forcing min_lvl = max_lvl = opacity (the +-5 % band
      jitter still applies): 0 returns the image unchanged (shadows, if on, still darken it);
      towards 1 the output approaches the cloud base B, which is white at full opacity.
    Returns (cloudy float32 like image, opacity float32 (H, W, C) or (B, H, W, C) in [0, 1]).
    Jit with `jax.jit(add_clouds, static_argnames=("params",))`.
    """
    image = jnp.asarray(image, jnp.float32)
    if image.ndim == 3:
        return _add_clouds_single(key, image, params=params, opacity=opacity)
    if image.ndim != 4:
        raise ValueError(f"image must be (H, W, C) or (B, H, W, C), got shape {image.shape}")
    b = image.shape[0]
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    keys = key if key.ndim == (1 if typed else 2) else jax.random.split(key, b)
    if opacity is not None and jnp.ndim(opacity) == 1:
        per_image = lambda k, x, o: _add_clouds_single(k, x, params=params, opacity=o)
        return jax.vmap(per_image)(keys, image, jnp.asarray(opacity, jnp.float32))
    return jax.vmap(lambda k, x: _add_clouds_single(k, x, params=params, opacity=opacity))(keys, image)


def add_clouds_uint8(key: jax.Array, rgb: np.ndarray | jax.Array, params: CloudParams = THIN, *,
                     opacity: float | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """uint8 (..., H, W, C) image -> (cloudy uint8 same shape, opacity float32 same shape).

    The image is scaled to [0, 1] by 1/255, clouded with `add_clouds`, and rounded back.
    """
    x = jnp.asarray(rgb)
    if x.dtype != jnp.uint8:
        raise ValueError(f"add_clouds_uint8 needs a uint8 image, got {x.dtype}")
    out, alpha = add_clouds(key, x.astype(jnp.float32) / 255.0, params, opacity=opacity)
    return jnp.round(jnp.clip(out, 0.0, 1.0) * 255.0).astype(jnp.uint8), alpha
