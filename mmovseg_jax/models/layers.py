"""Transformer pieces shared by the DINO and CLIP encoders.

Conventions: images are NHWC, token sequences are (batch, tokens, width). Parameters
are always float32; `dtype` is the compute dtype of the matrix multiplies. LayerNorms
compute in float32, and the residual stream is float32 unless an encoder's
`residual_dtype` asks for bfloat16 (a speed option that changes results).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmovseg_jax.ops import fp8 as fp8_ops

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> jnp.dtype:
    """Maps a config string ("float32" or "bfloat16") to a JAX dtype."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch nn.GELU()
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # torch nn.GELU(approximate="tanh")
    "quick_gelu": quick_gelu,
}

# Set while tracing blocks under the "activation" remat policy (see `rematted`): the MLPs
# traced then keep only their activation's input for the backward pass.
_ACTIVATION_KEEPS_ONLY_ITS_INPUT = contextvars.ContextVar("activation_keeps_only_its_input", default=False)


def mlp_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The MLP activation ACTIVATIONS[name], elementwise on (rows, hidden). Traced under
    the "activation" remat policy, it is wrapped in jax.checkpoint: its backward pass then
    keeps only its input (the fc1 output, which exists anyway) and recomputes the rest,
    where plain autodiff keeps intermediates as large as the hidden activations (the tanh
    GELU: four more). The same values and gradients as the plain activation, bit for bit
    (tests/test_fast_paths.py); inside a whole jitted step XLA may fuse, and so round,
    differently, which is why it is an option and not the default."""
    activation = ACTIVATIONS[name]
    return jax.checkpoint(activation) if _ACTIVATION_KEEPS_ONLY_ITS_INPUT.get() else activation


@contextlib.contextmanager
def _activations_keep_only_their_input() -> Iterator[None]:
    token = _ACTIVATION_KEEPS_ONLY_ITS_INPUT.set(True)
    try:
        yield
    finally:
        _ACTIVATION_KEEPS_ONLY_ITS_INPUT.reset(token)

# The GELU of the DINO encoders: "exact" (erf, what the checkpoints were trained with) or
# "tanh" (its tanh approximation, within about 1e-3 of it; cuBLASLt can apply it in the
# fc1 GEMM's epilogue, saving a pass over the MLP's hidden activations on a GPU).
GELUS = {"exact": "gelu", "tanh": "gelu_tanh"}
# The encoders' residual stream: "float32" (default) or "bfloat16" (half the bytes of
# every residual read and write; changes results).
RESIDUAL_DTYPES = ("float32", "bfloat16")


def gelu_activation(gelu: str) -> str:
    """The ACTIVATIONS key of a DINO config's `gelu` ("exact" | "tanh")."""
    if gelu not in GELUS:
        raise ValueError(f"gelu must be one of {sorted(GELUS)}, got {gelu!r}")
    return GELUS[gelu]


def residual_dtype(name: str) -> jnp.dtype:
    """The dtype of an encoder config's `residual_dtype` ("float32" | "bfloat16")."""
    if name not in RESIDUAL_DTYPES:
        raise ValueError(f"residual_dtype must be one of {RESIDUAL_DTYPES}, got {name!r}")
    return DTYPES[name]


def as_rows(x: jax.Array) -> jax.Array:
    """x (..., width) as a (rows, width) matrix. The encoders' LayerNorms and projections
    run on token rows so: their parameter gradients are then sums over one row axis.
    Over (batch, tokens) axes, XLA's GPU compiler laid the residual stream out
    batch-minor and transposed it around every GEMM (a deviceless compile of the CMU
    step for an H200: 17 GB per step without the CLS shortcut, 3 GB with it)."""
    return x.reshape(-1, x.shape[-1])


class LayerNorm(nnx.LayerNorm):
    """LayerNorm with float32 parameters, computed in float32 whatever the input dtype."""

    def __init__(self, width: int, eps: float, *, rngs: nnx.Rngs):
        super().__init__(width, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., width) -> (..., width) float32, normalised as one (rows, width) matrix
        (see `as_rows`)."""
        return super().__call__(as_rows(x).astype(jnp.float32)).reshape(x.shape)


class Fp8Frozen(nnx.Variable):
    """Inference-only float8 state (models/fp8_inference.py): a Dense's calibrated input
    amax, float8 kernel and scale, or an attention's fused float8 q/k/v kernel and scale.
    Not a parameter: optimisers and saved model folders leave it out."""


class Dense(nnx.Linear):
    """nnx.Linear with float32 parameters whose matrix multiply can run in float8.

    fp8=False: exactly nnx.Linear in `dtype`. fp8=True: x @ kernel through
    `ops.fp8.matmul` (e4m3 operands, e5m2 gradients, per-tensor current scaling; float8
    tensor cores on H100/H200), the bias added in `dtype`. Same parameters either way.
    Once `fp8_inference.freeze` has given it a calibrated input amax and a float8 kernel
    (`frozen_kernel`, (d_out, d_in) e4m3), it runs `ops.fp8.frozen_matmul` instead:
    static scales, inference only.
    """

    def __init__(self, d_in: int, d_out: int, *, bias: bool = True, dtype=jnp.float32, fp8: bool = False,
                 rngs: nnx.Rngs):
        super().__init__(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.fp8 = fp8
        self.calibrating = False  # while True, calls record max |input| (nnx.Intermediate "calibration_amax")
        # Set by fp8_inference (data attributes, so they can turn from None into variables).
        self.input_amax: Fp8Frozen | None = nnx.data(None)
        self.frozen_kernel: Fp8Frozen | None = nnx.data(None)
        self.frozen_kernel_scale: Fp8Frozen | None = nnx.data(None)

    @property
    def frozen(self) -> bool:
        return self.frozen_kernel is not None

    def record_input(self, rows: jax.Array) -> None:
        """While calibrating, keeps the running max |input| (in the compute dtype) of this call."""
        if self.calibrating:
            amax = jnp.max(jnp.abs(rows.astype(self.dtype))).astype(jnp.float32)
            self.sow(nnx.Intermediate, "calibration_amax", amax, reduce_fn=jnp.maximum, init_fn=lambda: jnp.float32(0))

    def float8_product(self, rows: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
        """rows (M, d_in) @ kernel in float8 -> (M, N) in `dtype`, no bias: static scales
        once frozen, else current scaling of `kernel` (default: this layer's own). While
        calibrating, the product runs in `dtype` instead: the ranges recorded are the
        model's own, which do not depend on how inputs are batched (a current float8
        scale is the whole batch's)."""
        if self.frozen and kernel is None:
            return self.static_product(rows, self.frozen_kernel[...], self.frozen_kernel_scale[...])
        kernel = self.kernel[...] if kernel is None else kernel
        if self.calibrating:
            self.record_input(rows)
            return rows.astype(self.dtype) @ kernel.astype(self.dtype)
        return fp8_ops.matmul(rows, kernel, self.dtype)

    def static_product(self, rows: jax.Array, kernel_t: jax.Array, kernel_scale: jax.Array) -> jax.Array:
        """rows (M, d_in) @ a frozen float8 kernel (N, d_in) with its scale, the input scaled
        by this layer's calibrated amax -> (M, N) in `dtype`, no bias."""
        return fp8_ops.frozen_matmul(rows, kernel_t, fp8_ops.scale_from_amax(self.input_amax[...]), kernel_scale,
                                     self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., d_in) -> (..., d_out)."""
        if not self.fp8:
            return super().__call__(as_rows(x)).reshape(*x.shape[:-1], -1)
        y = self.float8_product(as_rows(x))
        y = y if self.bias is None else y + self.bias[...].astype(y.dtype)
        return y.reshape(*x.shape[:-1], -1)


def check_fp8(fp8: bool, dtype) -> None:
    """float8 matrix multiplies are offered with bfloat16 compute only (what the GPU runs)."""
    if fp8 and jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"fp8 matrix multiplies need dtype 'bfloat16', got {jnp.dtype(dtype).name!r}")


def _linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs, bias: bool = True, fp8: bool = False) -> Dense:
    return Dense(d_in, d_out, bias=bias, dtype=dtype, fp8=fp8, rngs=rngs)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")
# cuDNN's fused (flash) attention refuses ViT token counts such as 197 or 577 for training;
# tokens are padded up to a multiple of this and the padding keys masked out. 64 is what
# ran on an H200. The refusal is JAX's check that a biased attention has an even length
# (jax 0.10's `check_is_flash_attention` counts its placeholder for "no bias" as a bias),
# so 2 may be enough: 197 -> 198 tokens instead of 256, 40% less attention work at 224 px.
# For inference JAX checks no length at all: 1 (no padding) may do there. `padded_attention`
# reads it at call time; the benchmarks' `--cudnn-pad-multiple` sets it to try other values
# on a card.
CUDNN_PAD_MULTIPLE = 64
_HALF = (jnp.bfloat16, jnp.float16)


def resolve_attention(implementation: str, dtype=jnp.float32) -> str:
    """"xla" or "cudnn" for a configured attention implementation.

    "auto" is "cudnn" when JAX's default backend is a GPU and the compute dtype is
    bfloat16/float16, else "xla" (float32 models keep exact XLA attention everywhere).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if implementation == "auto":
        return "cudnn" if jax.default_backend() == "gpu" and jnp.dtype(dtype) in _HALF else "xla"
    return implementation


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                     implementation: str = "cudnn", multiple: int | None = None) -> jax.Array:
    """Self-attention over tokens zero-padded to a multiple of `multiple` (default
    CUDNN_PAD_MULTIPLE), padding keys masked.

    q, k, v: (B, T, heads, head_dim) -> (B, T, heads, head_dim) in q's dtype. The keys
    beyond T are excluded through `key_value_seq_lengths`; the padded query rows are
    computed and dropped, so values and gradients equal unpadded attention. With
    implementation="cudnn" (cuDNN flash attention, GPU only) inputs that are not
    bfloat16/float16 are cast to bfloat16 (an approximation). implementation="xla"
    runs the same padded, masked formulation with XLA (used to test it on any device).
    """
    b, t = q.shape[:2]
    multiple = CUDNN_PAD_MULTIPLE if multiple is None else multiple
    padded = -(-t // multiple) * multiple
    out_dtype = q.dtype
    if implementation == "cudnn" and q.dtype not in _HALF:
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    if padded == t:  # nothing to pad or mask
        y = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
        return y.astype(out_dtype)
    widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    lengths = jnp.full((b,), t, jnp.int32)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                     implementation=implementation)
    return y[:, :t].astype(out_dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
              implementation: str = "xla") -> jax.Array:
    """Multi-head self-attention, (B, T, heads, head_dim) each -> (B, T, heads, head_dim).

    implementation: "xla" (XLA's softmax(QK^T)V, exact), "cudnn" (cuDNN flash attention on
    tokens padded to a multiple of CUDNN_PAD_MULTIPLE, see `padded_attention`) or "auto"
    (see `resolve_attention`).
    """
    if resolve_attention(implementation, q.dtype) == "cudnn":
        return padded_attention(q, k, v, causal=causal, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


class Attention(nnx.Module):
    """Multi-head self-attention with separate query/key/value/out projections.

    Separate projections (rather than one fused qkv matrix) let an optimiser select,
    say, only the query and value weights for fine-tuning. `implementation` picks the
    attention kernel ("xla", "cudnn" or "auto"; see `attention`); `fp8` runs the
    projections as float8 matrix multiplies (see `Dense`; where q/k/v run as one GEMM
    over their concatenated kernels, the three share one weight scale).
    """

    def __init__(self, width: int, num_heads: int, *, qkv_bias: bool = True, dtype=jnp.float32,
                 implementation: str = "xla", fp8: bool = False, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        resolve_attention(implementation)  # validates the name
        check_fp8(fp8, dtype)
        self.num_heads = num_heads
        self.implementation = implementation
        self.query = _linear(width, width, dtype, rngs, qkv_bias, fp8)
        self.key = _linear(width, width, dtype, rngs, qkv_bias, fp8)
        self.value = _linear(width, width, dtype, rngs, qkv_bias, fp8)
        self.out = _linear(width, width, dtype, rngs, fp8=fp8)
        # The q/k/v kernels as one float8 (3 width, width) matrix with one scale, as their
        # fused GEMM reads them (fp8_inference.freeze; each Dense keeps its own for solo use).
        self.frozen_qkv: Fp8Frozen | None = nnx.data(None)
        self.frozen_qkv_scale: Fp8Frozen | None = nnx.data(None)

    def _heads(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        return x.reshape(b, t, self.num_heads, d // self.num_heads)

    def _projections(self, x: jax.Array, names: tuple[str, ...]) -> list[jax.Array]:
        """The named projections of x (B, T, D) as one matrix multiply over their
        concatenated kernels (one wide GEMM instead of two or three narrow ones); each
        output column is the same dot product as the separate layer's. -> [(B, T, D), ...]."""
        layers_ = [getattr(self, n) for n in names]
        if len(layers_) == 1:
            return [layers_[0](x)]
        first, rows = layers_[0], as_rows(x)
        if first.fp8 and self.frozen_qkv is not None and names == ("query", "key", "value"):
            y = first.static_product(rows, self.frozen_qkv[...], self.frozen_qkv_scale[...])
        else:
            kernel = jnp.concatenate([l.kernel[...] for l in layers_], axis=1)
            if first.fp8:
                for other in layers_[1:]:
                    other.record_input(rows)
                y = first.float8_product(rows, kernel=kernel)
            else:
                y = rows.astype(first.dtype) @ kernel.astype(first.dtype)
        y = y.reshape(*x.shape[:-1], -1)
        if any(l.bias is not None for l in layers_):
            y = y + jnp.concatenate([l.bias[...] if l.bias is not None else jnp.zeros((l.out_features,))
                                     for l in layers_]).astype(first.dtype)
        return jnp.split(y, len(layers_), axis=-1)

    def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
        """x: (B, T, D) -> (B, T, D)."""
        q, k, v = map(self._heads, self._projections(x, ("query", "key", "value")))
        y = attention(q, k, v, causal=causal, implementation=self.implementation)
        return self.out(y.reshape(x.shape[0], x.shape[1], -1))

    def leading_rows(self, x: jax.Array, n: int) -> jax.Array:
        """Attention output at the first n tokens only: x (B, T, D) -> (B, n, D), equal to
        `self(x)[:, :n]`. Attention runs for every query on the configured kernel; the
        output projection for the n rows alone."""
        q, k, v = map(self._heads, self._projections(x, ("query", "key", "value")))
        y = attention(q, k, v, implementation=self.implementation)[:, :n]
        return self.out(y.reshape(x.shape[0], n, -1))


# cuBLASLt's float8 GEMMs take row counts divisible by 16 (XLA pads other counts).
FP8_ROWS = 16


class MLP(nnx.Module):
    """Two-layer feed-forward network, width -> hidden -> width (float8 GEMMs with `fp8`)."""

    def __init__(self, width: int, hidden: int, activation: str, *, dtype=jnp.float32, fp8: bool = False,
                 rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        check_fp8(fp8, dtype)
        self.activation = activation
        self.fc1 = _linear(width, hidden, dtype, rngs, fp8=fp8)
        self.fc2 = _linear(hidden, width, dtype, rngs, fp8=fp8)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., width) -> (..., width). The hidden activations stay a (rows, hidden)
        matrix: a reshape between fc1 and its activation kept XLA's GPU compiler from
        folding the activation and fc2's float8 quantisation into fc1's GEMM epilogue.
        Frozen float8 layers (fp8_inference) pad the rows with zeros to a multiple of
        FP8_ROWS once, here, rather than XLA around each float8 GEMM, which blocks those
        fusions too. Current float8 scaling keeps the per-layer form: with fc1's output
        as rows, XLA (jax 0.10.2, H200 target) folds the amax of the activation into fc1's
        GEMM and also feeds the scale made from it back into the same GEMM, and the
        compile fails ("A cycle is detected")."""
        activation = mlp_activation(self.activation)
        if self.fc1.fp8 and not self.fc1.frozen:
            return self.fc2(activation(self.fc1(x)))
        rows = as_rows(x)
        pad = -rows.shape[0] % FP8_ROWS if self.fc1.frozen else 0
        hidden = activation(self.fc1(jnp.pad(rows, ((0, pad), (0, 0))) if pad else rows))
        return self.fc2(hidden)[:rows.shape[0]].reshape(x.shape)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)).

    fp8: the block's weight matrix multiplies (q/k/v, out, fc1, fc2) in float8 (see
    `Dense`); LayerNorms, attention itself and the residual stream keep their precision."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, eps: float, activation: str,
                 qkv_bias: bool = True, dtype=jnp.float32, attention: str = "xla", fp8: bool = False,
                 rngs: nnx.Rngs):
        self.norm1 = LayerNorm(width, eps, rngs=rngs)
        self.attn = Attention(width, num_heads, qkv_bias=qkv_bias, dtype=dtype, implementation=attention,
                              fp8=fp8, rngs=rngs)
        self.norm2 = LayerNorm(width, eps, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, activation, dtype=dtype, fp8=fp8, rngs=rngs)

    def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
        """x (B, T, D) -> (B, T, D), in x's dtype (the residual stream's)."""
        x = x + self.attn(self.norm1(x), causal=causal).astype(x.dtype)
        return x + self.mlp(self.norm2(x)).astype(x.dtype)

    def leading_call(self, x: jax.Array, n: int) -> jax.Array:
        """The block's output at the first n tokens only: x (B, T, D) -> (B, n, D), equal to
        `self(x)[:, :n]` (non-causal). For a last block whose other tokens nobody reads."""
        y = x[:, :n] + self.attn.leading_rows(self.norm1(x), n).astype(x.dtype)
        return y + self.mlp(self.norm2(y)).astype(x.dtype)

    def dense_call(self, x: jax.Array) -> jax.Array:
        """The MaskCLIP-style "dense" variant of the block used by CAT-Seg/MM-OVSeg.

        Attention is replaced by each token's own value path through the output
        projection; the residual is the CLS token of the input (token 0), broadcast
        to every position. x: (B, T, D) -> (B, T, D).
        """
        y = self.attn.out(self.attn.value(self.norm1(x)))
        y = y + x[:, :1]
        return y + self.mlp(self.norm2(y)).astype(y.dtype)


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
    """Interpolation matrix (out_size, in_size) of PyTorch's 1-D bicubic resampling.

    Matches `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`:
    cubic convolution with A = -0.75, border samples clamped. With `scale_factor`
    the source coordinate uses 1/scale_factor as PyTorch does when a scale factor
    (not a size) is passed; otherwise in_size/out_size.
    """
    a = -0.75
    step = 1.0 / scale_factor if scale_factor else in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = step * (i + 0.5) - 0.5
        base = int(np.floor(src))
        t = src - base
        weights = (
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        )
        for k, w in enumerate(weights):
            matrix[i, min(max(base - 1 + k, 0), in_size - 1)] += w
    return matrix.astype(np.float32)


POS_INTERPOLATIONS = ("size", "dino")


def resize_position_table(table: jax.Array, grid: tuple[int, int], mode: str = "size") -> jax.Array:
    """Bicubically resizes a (1 + n*n, D) position table (CLS row first) to `grid`.

    Returns (1 + gh*gw, D); the CLS row is kept apart and unchanged. `mode="size"`
    samples as transformers' `interpolate_pos_encoding` (target size given);
    `mode="dino"` as the original DINO code (scale factor (g + 0.1) / n).
    """
    n = int(round((table.shape[0] - 1) ** 0.5))
    if n * n != table.shape[0] - 1:
        raise ValueError(f"position table of {table.shape[0] - 1} patch rows is not a square grid")
    gh, gw = grid
    if (gh, gw) == (n, n):
        return table
    if mode == "size":
        mh, mw = bicubic_matrix(n, gh), bicubic_matrix(n, gw)
    elif mode == "dino":
        mh, mw = bicubic_matrix(n, gh, (gh + 0.1) / n), bicubic_matrix(n, gw, (gw + 0.1) / n)
    else:
        raise ValueError(f"position interpolation must be one of {POS_INTERPOLATIONS}, got {mode!r}")
    patches = table[1:].reshape(n, n, -1).astype(jnp.float32)
    resized = jnp.einsum("ah,hwd,bw->abd", mh, patches, mw, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([table[:1], resized.reshape(gh * gw, -1).astype(table.dtype)], axis=0)


class PatchEmbed(nnx.Module):
    """Non-overlapping patch projection: (B, H, W, C) -> (B, H/p * W/p, D), grid (H/p, W/p)."""

    def __init__(self, patch_size: int, width: int, *, bias: bool, channels: int = 3, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nnx.Conv(channels, width, kernel_size=(patch_size, patch_size),
                             strides=(patch_size, patch_size), padding="VALID", use_bias=bias,
                             dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        b, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        # A patch embedding is a matrix multiply over flattened patches; written so, it is
        # one GEMM on every backend rather than a strided convolution with 3 input channels.
        # Same parameters as the convolution: kernel (p, p, C, D), flattened in the same
        # (row, column, channel) order.
        gh, gw = h // p, w // p
        patches = images.reshape(b, gh, p, gw, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
        kernel = self.proj.kernel[...]
        dtype = self.proj.dtype or jnp.result_type(images, kernel)
        x = patches.astype(dtype) @ kernel.reshape(-1, kernel.shape[-1]).astype(dtype)
        if self.proj.bias is not None:
            x = x + self.proj.bias[...].astype(dtype)
        return x, (gh, gw)


REMAT_POLICIES = ("none", "activation", "full", "dots")


def rematted(call: Callable, policy: str) -> Callable:
    """`call(block, *arrays)` made to recompute some of its activations in the backward pass.

    policy: "none" (keep every activation: fastest, most memory), "activation" (keep
    every activation but the MLP activation's intermediates, recomputed from its input,
    `mlp_activation`: less memory traffic for one elementwise pass of recompute), "full"
    (keep only the block's inputs, recompute the rest: about one more forward pass of
    compute) or "dots" (keep the outputs of the weight matmuls, recompute attention
    scores and elementwise work). Values and gradients do not change beyond float
    rounding (XLA fuses the recomputation differently); only memory and time do.
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {policy!r}")
    if policy == "none":
        return call
    if policy == "activation":
        def traced_so(*args):
            with _activations_keep_only_their_input():
                return call(*args)
        return traced_so
    saveable = {"full": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
    return nnx.remat(call, policy=saveable)


def normalize_block_indices(indices, depth: int) -> tuple[int, ...]:
    """Resolves block indices (0-based; negative counts from the end) against `depth`."""
    resolved = []
    for i in indices:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"block index {i} is out of range for a {depth}-block encoder")
        resolved.append(j)
    return tuple(resolved)
