"""Float8 inference with static scales: calibrate a model's float8 layers, then freeze them.

A model built with `fp8=True` (config.model.fp8, `storage.load_model(..., fp8=True)`)
scales every float8 product by the current max |value| of both operands: one extra pass
over each activation, and a cast and transpose of each weight, on every call. For
inference both can be fixed once:

    model = storage.load_model(folder, dtype="bfloat16", fp8=True)
    fp8_inference.prepare(model, lambda m, rgb, sar: m.encode_images(rgb, sar), batches)

`calibrate` runs the model on a few representative batches and keeps, per float8
layer, the largest |input| seen; `freeze` stores each layer's kernel in float8,
transposed to the (N, K) form the GPU's float8 GEMM reads, with its scale (and each
attention's fused query/key/value kernel with one scale, as its single GEMM reads it).
Frozen layers then compute `ops.fp8.frozen_matmul`; inputs beyond the calibrated range
saturate at float8's largest value. Calibration runs the layers in the model's own
precision (bf16 products), so the ranges are the bf16 model's and the same however the
tiles are batched, over devices or processes (a current float8 scale is its batch's).

Inference only: a gradient through a frozen layer raises (its float8 weights are copies
that training would not update). Frozen state is `layers.Fp8Frozen`, not a parameter:
saved model folders do not keep it; calibrate again after loading.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mmovseg_jax.models import layers
from mmovseg_jax.ops import fp8 as fp8_ops

Path = tuple[Any, ...]


def float8_layers(model: nnx.Module) -> dict[Path, layers.Dense]:
    """The model's float8 Dense layers by module path."""
    return {path: m for path, m in nnx.iter_modules(model) if isinstance(m, layers.Dense) and m.fp8}


def calibrate(model: nnx.Module, forward: Callable[..., Any], batches: Iterable[Any]) -> int:
    """Runs `forward(model, *batch)` (jitted) for each batch (a tuple of arrays, or one
    array) and records in every float8 layer it reaches the largest |input| seen, also
    across earlier calibrate calls. Returns the number of batches.

    With several processes (jax.distributed) every process must call it: the maxima and
    the count are taken over all processes' batches, so each holds the same scales."""
    found = float8_layers(model)
    if not found:
        raise ValueError("the model has no float8 layers to calibrate: build it with fp8=True "
                         "(config.model.fp8, storage.with_kernels or storage.load_model(..., fp8=True))")
    if any(m.frozen for m in found.values()):
        raise ValueError("the model's float8 layers are frozen already; calibrate before freeze")
    for m in found.values():
        m.calibrating = True
    try:
        graphdef, state = nnx.split(model)

        @jax.jit
        def amaxes(state, *inputs):
            calibrated = nnx.merge(graphdef, state)
            forward(calibrated, *inputs)
            return {path[:-1]: v[...] for path, v in nnx.state(calibrated, nnx.Intermediate).flat_state()}

        seen: dict[Path, float] = {}
        count = 0
        for batch in batches:
            for path, amax in amaxes(state, *(batch if isinstance(batch, tuple) else (batch,))).items():
                seen[path] = max(seen.get(path, 0.0), float(amax))
            count += 1
    finally:
        for m in found.values():
            m.calibrating = False
    count, seen = _over_processes(count, seen, list(found))
    if count == 0:
        raise ValueError("calibrate needs at least one batch")
    for path, amax in seen.items():
        layer = found[path]
        previous = 0.0 if layer.input_amax is None else float(layer.input_amax[...])
        layer.input_amax = layers.Fp8Frozen(jnp.float32(max(previous, amax)))
    return count


def _over_processes(count: int, seen: dict[Path, float], paths: list[Path]) -> tuple[int, dict[Path, float]]:
    """(batches, amax per layer reached) summed and maxed over every process; one process: as given."""
    if jax.process_count() == 1:
        return count, seen
    # One vector per process in the model's own layer order: the count, then each layer's
    # amax, -1 where this process's forward never reached the layer.
    local = np.array([count] + [seen.get(p, -1.0) for p in paths], np.float32)
    gathered = np.asarray(multihost_utils.process_allgather(local))
    amaxes = gathered[:, 1:].max(axis=0)
    return int(gathered[:, 0].sum()), {p: float(a) for p, a in zip(paths, amaxes) if a >= 0}


def freeze(model: nnx.Module) -> int:
    """Stores the float8 kernel (N, K) and scale of every calibrated float8 layer, and
    for each attention whose query was calibrated the fused q/k/v kernel with one shared
    scale, as its single GEMM reads it. Layers `calibrate` never reached (CLIP's last
    query and key in dense mode) keep current scaling. Returns the number of layers frozen."""
    frozen = 0
    for layer in float8_layers(model).values():
        if layer.input_amax is not None and not layer.frozen:
            kernel_t, scale = fp8_ops.quantize_kernel(layer.kernel[...], layer.dtype)
            layer.frozen_kernel, layer.frozen_kernel_scale = layers.Fp8Frozen(kernel_t), layers.Fp8Frozen(scale)
            frozen += 1
    for _, attention in nnx.iter_modules(model):
        if isinstance(attention, layers.Attention) and attention.query.frozen and attention.frozen_qkv is None:
            qkv = jnp.concatenate([attention.query.kernel[...], attention.key.kernel[...],
                                   attention.value.kernel[...]], axis=1)
            kernel_t, scale = fp8_ops.quantize_kernel(qkv, attention.query.dtype)
            attention.frozen_qkv, attention.frozen_qkv_scale = layers.Fp8Frozen(kernel_t), layers.Fp8Frozen(scale)
    return frozen


def prepare(model: nnx.Module, forward: Callable[..., Any], batches: Iterable[Any]) -> dict[str, int]:
    """`calibrate` then `freeze`; returns {"batches", "layers", "frozen"} counts."""
    count = calibrate(model, forward, batches)
    frozen = freeze(model)
    return {"batches": count, "layers": len(float8_layers(model)), "frozen": frozen}


def input_amaxes(model: nnx.Module) -> dict[str, float]:
    """Calibrated max |input| per float8 layer, by dotted module path (for reports)."""
    return {".".join(map(str, p)): float(np.asarray(m.input_amax[...]))
            for p, m in float8_layers(model).items() if m.input_amax is not None}
