"""Non-overlapping resampling convolutions (kernel size = stride), channels-last.

`Resample(d_in, d_out, factor)` changes the grid by an integer factor:
factor > 1 is a transposed convolution with kernel = stride = factor (each input pixel
writes its own factor x factor block), factor < 0 is a strided convolution with
kernel = stride = -factor (each output pixel reads its own block), and factor 1 is a
1x1 convolution. Written as reshapes and one einsum, so they are exact and map
directly onto PyTorch's ConvTranspose2d / Conv2d weights.

The kernel is stored (k, k, d_in, d_out) in every case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Resample(nnx.Module):
    def __init__(self, d_in: int, d_out: int, factor: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if factor == 0 or factor == -1:
            raise ValueError(f"factor must be >= 1 (up) or <= -2 (down), got {factor}")
        self.factor, self.dtype = factor, dtype
        k = abs(factor)
        fan_in = d_in * k * k if factor < 0 else d_in
        bound = fan_in ** -0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (k, k, d_in, d_out), jnp.float32, -bound, bound))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32))

    @property
    def mode(self) -> str:
        """"up" (ConvTranspose2d), "down" (strided Conv2d) or "same" (1x1 Conv2d)."""
        return "up" if self.factor > 1 else ("down" if self.factor < 0 else "same")

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, d_in) -> (B, H*f, W*f, d_out) up, (B, H/f, W/f, d_out) down."""
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        b, h, w, _ = x.shape
        k = abs(self.factor)
        if self.factor > 1:
            y = jnp.einsum("bhwc,ijcd->bhiwjd", x, kernel).reshape(b, h * k, w * k, -1)
        else:
            if h % k or w % k:
                raise ValueError(f"feature map {h}x{w} is not divisible by the stride {k}")
            blocks = x.reshape(b, h // k, k, w // k, k, -1)
            y = jnp.einsum("bhiwjc,ijcd->bhwd", blocks, kernel)
        return y + self.bias[...].astype(y.dtype)
