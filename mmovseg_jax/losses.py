"""CMU alignment losses on already-extracted embeddings (REFERENCE.md section 1).

The student (SAR) embedding is the query, the frozen teacher (RGB) embedding the key.

- `embed_tokens`: (B, 1+N, D) ViT tokens -> CLS, mean-pooled patches or the patches.
- `info_nce`: InfoNCE over the global batch (every other sample is a negative); plain
  (B x B logits) or chunked (never builds B x B). Works under `jax.jit` on arrays
  sharded over any mesh (XLA partitions it).
- `sharded_info_nce`: the same loss written explicitly for a data-parallel mesh with
  `jax.shard_map` (open_clip style): each device scores its own B/n rows against the
  keys of every device.
- `dense_info_nce`: per-patch InfoNCE, negatives are the other patches of the same tile.
- `regression_loss`: MSE / L1 on the raw features (the paper's Table 4 alternatives).

Chunked InfoNCE: design
-----------------------
All InfoNCE variants reduce to two log-sum-exps over one logit matrix
L = (q / T) k^T of L2-normalised rows: the row lse (query -> key direction) and the
column lse (key -> query direction), minus the positive logits q_i . k_i / T, which are
computed directly from the paired rows (B dot products, no matrix).

With `chunk_size` set, `_block_lse` computes both with a `lax.scan` over chunks of
keys: a chunk's logits are (rows, chunk); the row lse is carried as a running
(max, sum of exp) pair; the column lse of the chunk's keys is complete within the
chunk (every query row is present), so it is emitted as a scan output. Both directions
come from the same logit chunk, so the symmetric loss costs one pass, not two.

The backward pass is a `jax.custom_vjp`: the residuals are only the inputs and the two
lse vectors; the backward scan recomputes each logit chunk and forms
dL/dlogits = g_row * softmax_row + g_col * softmax_col (each softmax is exp(L - lse)),
then dq += dL k_c and dk_c = dL^T q. No B x B (or rows x B) array is ever stored, in
either pass; the peak is a few (rows x chunk) blocks. A chunk size that does not divide
the key count is fine: the remainder keys form one last, smaller step.

In `sharded_info_nce` the same primitive runs per device with the collectives inside
it: each step all-gathers `chunk_size // n` keys from every device (so a step sees
`chunk_size` keys of the global batch), reduces the column statistics of those keys over
the devices (`pmax` + `psum_scatter`, vectors only), and the backward scatters the key
gradient of each chunk back to its owner with `psum_scatter`. So neither the gathered
keys (B x D) nor their gradient is ever held whole on a device: per-device memory is
O((B/n) x chunk + chunk x D + (B/n) x D). Without `chunk_size` it is the plain open_clip
form: all-gather the normalised keys (and queries, for the symmetric direction),
(B/n) x B logits per device, autodiff through `all_gather`. `info_nce` with
`chunk_size` on batch-sharded arrays is also correct, but there XLA's partitioner
chooses the layout (it gathers the keys): prefer `sharded_info_nce` at large B
(benchmarks/infonce_memory.py compares the four).

The loss is computed in float32 whatever the input dtype; the matrix multiplies follow
JAX's default matmul precision (`jax_default_matmul_precision`).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

_EPS = 1e-6
EMBED_MODES = ("cls", "mean", "dense")


def embed_tokens(tokens: jax.Array, mode: str) -> jax.Array:
    """(B, 1+N, D) tokens, CLS first -> "cls": (B, D) token 0; "mean": (B, D) mean of the
    N patch tokens (CLS excluded); "dense": (B, N, D) the patch tokens. "cls" also takes
    the CLS token alone, (B, 1, D)."""
    if tokens.ndim != 3 or tokens.shape[1] < (1 if mode == "cls" else 2):
        raise ValueError(f"tokens must be (B, 1+N, D) with N >= 1, got shape {tokens.shape}")
    if mode == "cls":
        return tokens[:, 0]
    if mode == "mean":
        return jnp.mean(tokens[:, 1:], axis=1)
    if mode == "dense":
        return tokens[:, 1:]
    raise ValueError(f"unknown embedding mode {mode!r}; choose from {EMBED_MODES}")


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(||x||, 1e-6) along `axis`, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), _EPS * _EPS))


def regression_loss(query: jax.Array, key: jax.Array, kind: Literal["mse", "l1"]) -> jax.Array:
    """Mean squared ("mse") or mean absolute ("l1") difference of the raw features (any
    matching shapes, e.g. (B, D) or (B, N, D)) -> scalar."""
    if query.shape != key.shape:
        raise ValueError(f"query {query.shape} and key {key.shape} shapes differ")
    diff = query.astype(jnp.float32) - key.astype(jnp.float32)
    if kind == "mse":
        return jnp.mean(diff * diff)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    raise ValueError(f"unknown regression loss {kind!r}; choose 'mse' or 'l1'")


# ----------------------------------------------------------------------------------------
# The chunked row/column log-sum-exp primitive.


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _plan(keys: int, chunk: int, axis: str | None) -> tuple[int, int, int]:
    """This device's `keys` in steps of `chunk // devices` (at least 1) ->
    (own keys per step, full steps, remainder keys for one last smaller step)."""
    n = 1 if axis is None else jax.lax.axis_size(axis)
    per = max(1, min(chunk // n, keys))
    full, rem = divmod(keys, per)
    return per, full, rem


def _gather(x: jax.Array, axis: str | None) -> jax.Array:
    return x if axis is None else jax.lax.all_gather(x, axis, tiled=True)


def _chunk_forward(q, kc, axis, cols: bool):
    """Logits of local rows vs one gathered key chunk -> (row max, row sum-exp at that max,
    column lse of the chunk's own keys (or None))."""
    logits = q @ _gather(kc, axis).T  # (b, n * size)
    rmax = jnp.max(logits, axis=1)
    rsum = jnp.sum(jnp.exp(logits - rmax[:, None]), axis=1)
    if not cols:
        return rmax, rsum, None
    cmax = jnp.max(logits, axis=0)
    if axis is not None:
        cmax = jax.lax.pmax(cmax, axis)
    csum = jnp.sum(jnp.exp(logits - cmax[None, :]), axis=0)
    size = kc.shape[0]
    if axis is not None:
        csum = jax.lax.psum_scatter(csum, axis, scatter_dimension=0, tiled=True)
        cmax = jax.lax.dynamic_slice_in_dim(cmax, jax.lax.axis_index(axis) * size, size)
    return rmax, rsum, cmax + jnp.log(csum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _block_lse(q: jax.Array, k: jax.Array, chunk: int, axis: str | None, cols: bool):
    """This device's q (b, D) and k (b', D) -> (row lse (b,) of the logits q k^T over the keys
    of every device on `axis`, column lse (b',) of this device's keys over the queries of
    every device, or None unless `cols`). axis None: one device. Scans over key chunks
    of `chunk` keys; backward by chunks too (see the module docstring)."""
    return _block_lse_fwd(q, k, chunk, axis, cols)[0]


def _block_lse_fwd(q, k, chunk, axis, cols):
    per, full, rem = _plan(k.shape[0], chunk, axis)
    # carries built with *_like(q) keep q's device-varying type inside shard_map
    m = jnp.full_like(q[:, 0], -jnp.inf)
    s = jnp.zeros_like(q[:, 0])

    def merge(m, s, rmax, rsum):
        new = jnp.maximum(m, rmax)
        return new, s * jnp.exp(m - new) + rsum * jnp.exp(rmax - new)

    col_parts = []
    if full:
        def body(carry, i):
            m, s = carry
            kc = jax.lax.dynamic_slice_in_dim(k, i * per, per)
            rmax, rsum, clse = _chunk_forward(q, kc, axis, cols)
            return merge(m, s, rmax, rsum), clse

        (m, s), clse = jax.lax.scan(body, (m, s), jnp.arange(full))
        if cols:
            col_parts.append(clse.reshape(full * per))
    if rem:
        rmax, rsum, clse = _chunk_forward(q, k[full * per:], axis, cols)
        m, s = merge(m, s, rmax, rsum)
        if cols:
            col_parts.append(clse)
    row = m + jnp.log(s)
    col = (jnp.concatenate(col_parts) if len(col_parts) > 1 else col_parts[0]) if cols else None
    return (row, col), (q, k, row, col)


def _block_lse_bwd(chunk, axis, cols, res, g):
    q, k, row, col = res
    g_row, g_col = g
    per, full, rem = _plan(k.shape[0], chunk, axis)

    def chunk_grads(kc, gc, lc):
        kg = _gather(kc, axis)
        logits = q @ kg.T
        p = g_row[:, None] * jnp.exp(logits - row[:, None])
        if cols:
            p = p + _gather(gc, axis)[None, :] * jnp.exp(logits - _gather(lc, axis)[None, :])
        dq = p @ kg
        dk = p.T @ q
        if axis is not None:
            dk = jax.lax.psum_scatter(dk, axis, scatter_dimension=0, tiled=True)
        return dq, dk

    dq = jnp.zeros_like(q)
    dk_parts = []
    if full:
        def body(dq, i):
            sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * per, slice_size=per)
            dq_c, dk_c = chunk_grads(sl(k), sl(g_col) if cols else None, sl(col) if cols else None)
            return dq + dq_c, dk_c

        dq, dk = jax.lax.scan(body, dq, jnp.arange(full))
        dk_parts.append(dk.reshape(full * per, k.shape[1]))
    if rem:
        lo = full * per
        dq_c, dk_c = chunk_grads(k[lo:], g_col[lo:] if cols else None, col[lo:] if cols else None)
        dq = dq + dq_c
        dk_parts.append(dk_c)
    dk = jnp.concatenate(dk_parts) if len(dk_parts) > 1 else dk_parts[0]
    return dq.astype(q.dtype), dk.astype(k.dtype)


_block_lse.defvjp(_block_lse_fwd, _block_lse_bwd)


def _dense_lse(q: jax.Array, k: jax.Array, cols: bool):
    """Unchunked counterpart of `_block_lse` on one device: (row lse, column lse or None)."""
    logits = q @ k.T
    row = jax.nn.logsumexp(logits, axis=1)
    return row, (jax.nn.logsumexp(logits, axis=0) if cols else None)


def _local_info_nce(qn: jax.Array, kn: jax.Array, temperature: jax.Array, symmetric: bool,
                    chunk_size: int | None, axis: str | None = None) -> jax.Array:
    """Mean InfoNCE of this device's rows (normalised qn, kn (b, D)) against all keys."""
    qs = qn / temperature
    pos = jnp.sum(qs * kn, axis=-1)  # positive logits, (b,)
    if chunk_size is None:
        row, col = _dense_lse(qs, kn, symmetric)
    else:
        row, col = _block_lse(qs, kn, chunk_size, axis, symmetric)
    loss = jnp.mean(row - pos)
    if symmetric:
        loss = 0.5 * (loss + jnp.mean(col - pos))
    return loss


def _check_pair(query: jax.Array, key: jax.Array, ndim: int) -> None:
    if query.ndim != ndim or query.shape != key.shape:
        raise ValueError(f"query {query.shape} and key {key.shape} must both be {ndim}-D and of equal shape")


def info_nce(query: jax.Array, key: jax.Array, temperature: float | jax.Array, *, symmetric: bool = True,
             chunk_size: int | None = None) -> jax.Array:
    """InfoNCE of paired embeddings query (B, D), key (B, D) -> scalar.

    Rows are L2-normalised; logits = q k^T / temperature; cross-entropy with the diagonal
    as targets, mean over rows; `symmetric` averages the query->key and key->query
    directions. Every sample of the (global) batch is a negative. `chunk_size` (keys per
    step, any positive int; a remainder forms a last smaller step) never builds the
    B x B logits, forward or backward (a (B, chunk_size) block at a time). `temperature`
    may be a traced scalar (e.g. `jnp.exp(log_temperature)`); it receives a gradient.
    """
    _check_pair(query, key, 2)
    _check_chunk(chunk_size)
    t = jnp.asarray(temperature, jnp.float32)
    return _local_info_nce(l2_normalize(query), l2_normalize(key), t, symmetric, chunk_size)


def sharded_info_nce(query: jax.Array, key: jax.Array, temperature: float | jax.Array, *, mesh: Mesh,
                     axis: str | tuple[str, ...] = "data", symmetric: bool = True,
                     chunk_size: int | None = None) -> jax.Array:
    """`info_nce` written explicitly for a batch split over mesh axis `axis` -> scalar.

    `axis` may be a tuple of mesh axes (e.g. ("data", "fsdp")) over which the batch is split.

    query, key (B, D) with B divisible by the axis size n. Under `jax.shard_map` each
    device scores its B/n rows against the keys of all devices (and, if symmetric, its
    B/n keys against all queries) and the per-device means are `pmean`-ed. Without
    `chunk_size` the normalised keys (and queries) are all-gathered whole: (B/n) x B
    logits per device. With `chunk_size` each step all-gathers `chunk_size // n` keys of
    every device (at least one): (B/n) x chunk_size logits, and the key gradients are
    reduce-scattered chunk by chunk. Same value and gradients as `info_nce`.
    """
    _check_pair(query, key, 2)
    _check_chunk(chunk_size)
    n = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
    if query.shape[0] % n:
        raise ValueError(f"batch {query.shape[0]} is not divisible by the {n} devices of mesh axis {axis!r}")
    t = jnp.asarray(temperature, jnp.float32)

    def local(q, k, t):
        qn, kn = l2_normalize(q), l2_normalize(k)
        if chunk_size is not None:
            loss = _local_info_nce(qn, kn, t, symmetric, chunk_size, axis)
        else:
            qs = qn / t
            pos = jnp.sum(qs * kn, axis=-1)
            loss = jnp.mean(jax.nn.logsumexp(qs @ _gather(kn, axis).T, axis=1) - pos)
            if symmetric:
                ks = kn / t
                loss = 0.5 * (loss + jnp.mean(jax.nn.logsumexp(ks @ _gather(qn, axis).T, axis=1) - pos))
        return jax.lax.pmean(loss, axis)

    spec = PartitionSpec(axis)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=PartitionSpec())
    return fn(query, key, t)


def dense_info_nce(query: jax.Array, key: jax.Array, temperature: float | jax.Array, *, symmetric: bool = True,
                   chunk_size: int | None = None) -> jax.Array:
    """Per-patch InfoNCE of query (B, N, D), key (B, N, D) -> scalar.

    The positive of patch p of image b is patch p of image b of the other modality; the
    negatives are the other N - 1 patches of the same image (location discrimination
    within a tile, as in dense contrastive learning: co-registered tiles make the
    location the label, and other images' patches of the same land cover would be
    false negatives). Mean over b and p; `symmetric` averages both directions.
    `chunk_size` chunks the N x N logits of each image as in `info_nce`.
    """
    _check_pair(query, key, 3)
    _check_chunk(chunk_size)
    t = jnp.asarray(temperature, jnp.float32)
    per_image = jax.vmap(lambda q, k: _local_info_nce(q, k, t, symmetric, chunk_size))
    return jnp.mean(per_image(l2_normalize(query), l2_normalize(key)))
