"""Float8 matrix multiplies with per-tensor current scaling (H100/H200 and newer GPUs).

`matmul(x, kernel, dtype)` is `x @ kernel` with both operands rounded to float8 first:

- forward: activations and weights in e4m3 (3 mantissa bits, range +-448);
- backward: the incoming gradient in e5m2 (2 mantissa bits, range +-57344), multiplied
  with the saved e4m3 operands for the input and weight gradients.

Each tensor is divided by its own scale, amax / float8_max, computed from its current
values ("current scaling": no amax history to carry in the train state), and cast to
float8; the product is a dot of the float8 arrays themselves, accumulated in float32,
times the two scales. XLA's GPU compiler turns that into a float8 GEMM (cuBLASLt's, with
the scales and a following bias add folded in, or a Triton one; Hopper tensor cores,
twice the bf16 rate). The quantise -> dequantise -> dot form some libraries use is not
safe here: XLA may simplify the float8 round trip away, leaving a bf16 GEMM. On other
backends the same float8 values are multiplied, so CPU tests see the float8 numerics.

The amax of a sharded tensor is reduced over all its shards, so a sharded step computes
what one device would. This changes results (about 2-6% relative error per product
against bf16), so models use it only when configured to (`fp8=True`), never by default.

For inference, `frozen_matmul` takes both scales as given ("static scaling"): the
activation scale from a calibration pass, the weight already in float8, transposed to
(N, K) once (`quantize_kernel`). The per-call amax reductions, weight casts and weight
transposes (K-major operands are what Hopper's float8 GEMMs read) then go away;
`models/fp8_inference.py` prepares a model so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FORWARD = jnp.float8_e4m3fn
BACKWARD = jnp.float8_e5m2


def scale_of(x: jax.Array, fp8_dtype) -> jax.Array:
    """Per-tensor scale, float32 scalar: max |x| / the float8 type's largest value (1 if x is all zero)."""
    return scale_from_amax(jnp.max(jnp.abs(x)), fp8_dtype)


def scale_from_amax(amax: jax.Array, fp8_dtype=FORWARD) -> jax.Array:
    """The scale of a tensor whose max |value| is `amax` (float32 scalar; 1 where amax is 0)."""
    amax = jnp.asarray(amax).astype(jnp.float32)
    return jnp.where(amax > 0, amax / float(jnp.finfo(fp8_dtype).max), 1.0)


def quantize(x: jax.Array, fp8_dtype, scale: jax.Array, dtype) -> jax.Array:
    """x / scale (computed in `dtype`), clipped to the float8 range and cast to `fp8_dtype`."""
    limit = float(jnp.finfo(fp8_dtype).max)
    return jnp.clip(x.astype(dtype) / scale.astype(dtype), -limit, limit).astype(fp8_dtype)


def matmul(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """x (..., K) @ kernel (K, N) -> (..., N) in `dtype` (bfloat16 for the GPU's float8 GEMMs),
    both operands cast to `dtype` and then rounded to float8 e4m3 with their own scales;
    differentiable (the gradient rounded to e5m2)."""
    return _float8_matmul(x.astype(dtype), kernel.astype(dtype))


def _scaled_dot(a: jax.Array, b: jax.Array, dims, scale: jax.Array, out_dtype) -> jax.Array:
    """dot_general of two float8 arrays times a float32 scalar scale, in out_dtype. Written
    as a dot of the float8 arrays themselves (not of values cast back up, which XLA may
    simplify away), so the GPU compiler emits a float8 GEMM with the scale folded in."""
    return jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype) * scale.astype(out_dtype)


@jax.custom_vjp
def _float8_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _forward(x, kernel)[0]


def _forward(x, kernel):
    x_scale, k_scale = scale_of(x, FORWARD), scale_of(kernel, FORWARD)
    xq, kq = quantize(x, FORWARD, x_scale, x.dtype), quantize(kernel, FORWARD, k_scale, x.dtype)
    # (..., K) x (K, N) -> (..., N); the GEMM accumulates in float32.
    y = _scaled_dot(xq, kq, (((x.ndim - 1,), (0,)), ((), ())), x_scale * k_scale, x.dtype)
    # The float8 operands (half the bytes of bf16) are what the backward pass reads.
    return y, (xq, x_scale, kq, k_scale)


def _backward(saved, g):
    xq, x_scale, kq, k_scale = saved
    g_scale = scale_of(g, BACKWARD)
    gq = quantize(g, BACKWARD, g_scale, g.dtype)
    # dx = g @ kernel^T: (..., N) x (K, N) -> (..., K).
    dx = _scaled_dot(gq, kq, (((g.ndim - 1,), (1,)), ((), ())), g_scale * k_scale, g.dtype)
    # dkernel = x^T @ g over every leading axis: (..., K) x (..., N) -> (K, N), kept in
    # float32 until the sum over a sharded batch is complete, then rounded once.
    lead = tuple(range(g.ndim - 1))
    dk = _scaled_dot(xq, gq, ((lead, lead), ((), ())), x_scale * g_scale, jnp.float32)
    return dx, dk.astype(g.dtype)


_float8_matmul.defvjp(_forward, _backward)


def quantize_kernel(kernel: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """kernel (K, N) -> (its e4m3 copy transposed to (N, K), float32 scale), rounded to
    `dtype` first and scaled by its own max |value|, as `matmul` does."""
    kernel = kernel.astype(dtype)
    scale = scale_of(kernel, FORWARD)
    return quantize(kernel, FORWARD, scale, dtype).T, scale


def frozen_matmul(x: jax.Array, kernel_t: jax.Array, x_scale: jax.Array, kernel_scale: jax.Array,
                  dtype) -> jax.Array:
    """x (..., K) @ kernel (K, N) -> (..., N) in `dtype`, for inference: `kernel_t` (N, K) is
    the e4m3 kernel of `quantize_kernel`, `x_scale` a calibrated scale (values beyond
    float8 range after it saturate). Not differentiable: the weights are frozen copies,
    so a gradient through them would be silently zero; taking one raises."""
    return _frozen_matmul(x.astype(dtype), kernel_t, x_scale, kernel_scale)


@jax.custom_vjp
def _frozen_matmul(x, kernel_t, x_scale, kernel_scale):
    xq = quantize(x, FORWARD, x_scale, x.dtype)
    # (..., K) x (N, K) -> (..., N): both operands K-major, as the float8 GEMM reads them.
    return _scaled_dot(xq, kernel_t, (((x.ndim - 1,), (1,)), ((), ())), x_scale * kernel_scale, x.dtype)


def _frozen_forward(x, kernel_t, x_scale, kernel_scale):
    return _frozen_matmul(x, kernel_t, x_scale, kernel_scale), None


def _frozen_backward(_, g):
    raise TypeError("a gradient through float8 layers frozen for inference (models/fp8_inference.freeze): "
                    "their weights are float8 copies that training would not update; differentiate a model "
                    "without frozen float8 layers")


_frozen_matmul.defvjp(_frozen_forward, _frozen_backward)
