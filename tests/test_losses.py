"""CMU alignment losses: references, chunked == dense, 8-device mesh == one device, memory."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmovseg_jax import losses

from conftest import check_close

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _pair(shape, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=shape).astype(np.float32)
    k = (0.7 * q + 0.5 * rng.normal(size=shape)).astype(np.float32)  # correlated, as aligned pairs
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype)


def _optax_info_nce(q, k, t, symmetric):
    qn = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    logits = qn @ kn.T / t
    labels = jnp.arange(q.shape[0])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if symmetric:
        loss = 0.5 * (loss + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
    return loss


def _numpy_info_nce(q, k, t, symmetric):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    logits = q @ k.T / t

    def ce(x):
        m = x.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
        return np.mean(lse - np.diag(x))

    return 0.5 * (ce(logits) + ce(logits.T)) if symmetric else ce(logits)


_LOSSES = {"info_nce": losses.info_nce, "dense_info_nce": losses.dense_info_nce, "optax": _optax_info_nce}


@functools.partial(jax.jit, static_argnames=("loss", "symmetric", "chunk_size"))
def _value_and_grads(q, k, log_t, *, loss: str, symmetric: bool, chunk_size: int | None = None):
    """Value and gradients w.r.t. q, k and log_t of the loss at temperature exp(log_t); one
    compilation per static configuration and shape."""
    def f(q, k, lt):
        kw = {} if loss == "optax" else dict(chunk_size=chunk_size)
        return _LOSSES[loss](q, k, jnp.exp(lt), symmetric=symmetric, **kw)

    return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, log_t)


def test_embed_tokens():
    tokens = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    np.testing.assert_array_equal(losses.embed_tokens(tokens, "cls"), tokens[:, 0])
    np.testing.assert_allclose(losses.embed_tokens(tokens, "mean"), np.asarray(tokens)[:, 1:].mean(1))
    np.testing.assert_array_equal(losses.embed_tokens(tokens, "dense"), tokens[:, 1:])
    assert losses.embed_tokens(tokens, "dense").shape == (2, 4, 3)
    with pytest.raises(ValueError, match="unknown embedding mode"):
        losses.embed_tokens(tokens, "max")
    with pytest.raises(ValueError, match="1\\+N"):
        losses.embed_tokens(tokens[:, :1], "mean")


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_info_nce_matches_references(symmetric, temperature):
    q, k = _pair((24, 16))
    ours = losses.info_nce(q, k, temperature, symmetric=symmetric)
    check_close(f"info_nce vs optax (sym={symmetric}, T={temperature})", ours,
                _optax_info_nce(q, k, temperature, symmetric), TOL)
    check_close(f"info_nce vs numpy fp64 (sym={symmetric}, T={temperature})", ours,
                _numpy_info_nce(q, k, temperature, symmetric), TOL)
    # gradients against autodiff of the optax reference, temperature as exp(log T)
    log_t = jnp.log(jnp.float32(temperature))
    _, g = _value_and_grads(q, k, log_t, loss="info_nce", symmetric=symmetric)
    _, r = _value_and_grads(q, k, log_t, loss="optax", symmetric=symmetric)
    for name, a, b in zip(("query", "key", "log_temperature"), g, r):
        check_close(f"info_nce grad {name} vs optax (sym={symmetric}, T={temperature})", a, b, TOL)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 7, 12, 100])
def test_chunked_equals_dense(symmetric, chunk_size):
    """48 rows: chunks dividing (1, 12), not dividing (7: six of 7 and a remainder of 6),
    and larger than the batch (100: one chunk of 48)."""
    q, k = _pair((48, 32), seed=1)
    log_t = jnp.log(jnp.float32(0.1))
    dense_v, dense_g = _value_and_grads(q, k, log_t, loss="info_nce", symmetric=symmetric)
    v, g = _value_and_grads(q, k, log_t, loss="info_nce", symmetric=symmetric, chunk_size=chunk_size)
    tag = f"(sym={symmetric}, chunk={chunk_size})"
    check_close(f"chunked vs dense value {tag}", v, dense_v, TOL)
    for name, a, b in zip(("query", "key", "log_temperature"), g, dense_g):
        check_close(f"chunked vs dense grad {name} {tag}", a, b, TOL)


def test_symmetric_is_mean_of_both_directions():
    q, k = _pair((20, 8), seed=2)
    sym = losses.info_nce(q, k, 0.2, symmetric=True)
    q2k = losses.info_nce(q, k, 0.2, symmetric=False)
    k2q = losses.info_nce(k, q, 0.2, symmetric=False)
    assert abs(float(sym - q2k)) > 1e-3, "symmetric and one-directional losses should differ"
    check_close("symmetric = mean of both directions", sym, 0.5 * (q2k + k2q), TOL)
    chunked = losses.info_nce(q, k, 0.2, symmetric=True, chunk_size=3)
    check_close("chunked symmetric = mean of both directions", chunked, 0.5 * (q2k + k2q), TOL)


def test_temperature_gradient_matches_finite_difference():
    q, k = _pair((16, 8), seed=3)
    for chunk_size in (None, 5):
        def f(log_t):
            return losses.info_nce(q, k, jnp.exp(log_t), chunk_size=chunk_size)

        g = float(jax.grad(f)(jnp.float32(np.log(0.2))))
        eps = 1e-2
        fd = float(f(jnp.float32(np.log(0.2) + eps)) - f(jnp.float32(np.log(0.2) - eps))) / (2 * eps)
        assert g != 0.0
        assert abs(g - fd) <= 2e-3 * max(1.0, abs(fd)), (chunk_size, g, fd)


def test_low_temperature_is_stable_and_bf16_inputs():
    q, k = _pair((32, 16), seed=4)
    for chunk_size in (None, 6):
        v, g = jax.value_and_grad(lambda a: losses.info_nce(a, k, 1e-3, chunk_size=chunk_size))(q)
        assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))
    check_close("T=1e-3 chunked vs numpy fp64", losses.info_nce(q, k, 1e-3, chunk_size=6),
                _numpy_info_nce(q, k, 1e-3, True), 1e-3)  # logits up to 1000: fp32 relative error
    qb, kb = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    v, g = jax.value_and_grad(lambda a: losses.info_nce(a, kb, 0.1, chunk_size=6))(qb)
    assert v.dtype == jnp.float32 and g.dtype == jnp.bfloat16
    check_close("bf16 inputs vs fp32 on the same values", v,
                losses.info_nce(qb.astype(jnp.float32), kb.astype(jnp.float32), 0.1), TOL)


def _loop_dense_info_nce(q, k, t, symmetric):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    total, count = 0.0, 0
    for b in range(q.shape[0]):
        qn = q[b] / np.linalg.norm(q[b], axis=-1, keepdims=True)
        kn = k[b] / np.linalg.norm(k[b], axis=-1, keepdims=True)
        for p in range(q.shape[1]):
            def ce(row, target):
                m = row.max()
                return m + np.log(np.exp(row - m).sum()) - row[target]

            loss = ce(qn[p] @ kn.T / t, p)
            if symmetric:
                loss = 0.5 * (loss + ce(kn[p] @ qn.T / t, p))
            total += loss
            count += 1
    return total / count


@pytest.mark.parametrize("symmetric", [True, False])
def test_dense_info_nce_matches_loop(symmetric):
    q, k = _pair((3, 10, 8), seed=5)
    ref = _loop_dense_info_nce(q, k, 0.1, symmetric)
    check_close(f"dense_info_nce vs loop (sym={symmetric})", losses.dense_info_nce(q, k, 0.1, symmetric=symmetric),
                ref, TOL)
    log_t = jnp.log(jnp.float32(0.1))
    v, g = _value_and_grads(q, k, log_t, loss="dense_info_nce", symmetric=symmetric)
    vc, gc = _value_and_grads(q, k, log_t, loss="dense_info_nce", symmetric=symmetric, chunk_size=3)
    check_close(f"dense_info_nce chunked vs loop (sym={symmetric})", vc, ref, TOL)
    for name, a, b in zip(("query", "key", "log_temperature"), gc, g):
        check_close(f"dense_info_nce chunked vs unchunked grad {name} (sym={symmetric})", a, b, TOL)
    # per-image negatives only: other images' patches do not change the loss of image 0
    one = losses.dense_info_nce(q[:1], k[:1], 0.1, symmetric=symmetric)
    check_close("dense_info_nce image 0 alone", one, _loop_dense_info_nce(q[:1], k[:1], 0.1, symmetric), TOL)


@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_regression_loss(kind):
    q, k = _pair((4, 6, 5), seed=6)
    d = np.asarray(q, np.float64) - np.asarray(k, np.float64)
    ref = np.mean(d * d) if kind == "mse" else np.mean(np.abs(d))
    check_close(f"{kind} vs numpy", losses.regression_loss(q, k, kind), ref, TOL)
    g = jax.grad(lambda a: losses.regression_loss(a, k, kind))(q)
    gref = 2 * d / d.size if kind == "mse" else np.sign(d) / d.size
    check_close(f"{kind} grad vs numpy", g, gref, TOL)


def test_argument_errors():
    q, k = _pair((8, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        losses.info_nce(q, k, 0.1, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.info_nce(q, k, 0.1, chunk_size=2.5)
    with pytest.raises(ValueError, match="equal shape"):
        losses.info_nce(q, k[:4], 0.1)
    with pytest.raises(ValueError, match="equal shape"):
        losses.dense_info_nce(q, k, 0.1)
    with pytest.raises(ValueError, match="mse"):
        losses.regression_loss(q, k, "huber")


# ------------------------------------------------------------------------------------------
# 8 fake CPU devices: XLA_FLAGS must be set before JAX starts, so these run in a subprocess.

_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mmovseg_jax import losses

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    one = jax.devices()[0]
    rng = np.random.default_rng(0)

    def pair(shape):
        q = rng.normal(size=shape).astype(np.float32)
        return q, (0.7 * q + 0.5 * rng.normal(size=shape)).astype(np.float32)

    q2, k2 = pair((64, 32))
    q3, k3 = pair((16, 12, 32))
    log_t = np.float32(np.log(0.2))
    info, dense_info, regression = losses.info_nce, losses.dense_info_nce, losses.regression_loss
    sharded = lambda **kw: (lambda q, k, t: losses.sharded_info_nce(q, k, t, mesh=mesh, **kw))
    # References on one device: the plain (unchunked) loss of the same global batch; that
    # chunked equals unchunked on one device is tested in-process.
    references = {
        "sym": lambda q, k, t: info(q, k, t),
        "one-way": lambda q, k, t: info(q, k, t, symmetric=False),
        "dense sym": lambda q, k, t: dense_info(q, k, t),
        "dense one-way": lambda q, k, t: dense_info(q, k, t, symmetric=False),
        "mse": lambda q, k, t: regression(q, k, "mse"),
        "l1": lambda q, k, t: regression(q, k, "l1"),
    }
    cases = {  # name: (loss on the 8-device mesh, its one-device reference, 2-D or 3-D inputs)
        "info_nce dense sym": (references["sym"], "sym", 2),
        "info_nce dense one-way": (references["one-way"], "one-way", 2),
        "info_nce chunked16 sym": (lambda q, k, t: info(q, k, t, chunk_size=16), "sym", 2),
        "info_nce chunked24 one-way": (lambda q, k, t: info(q, k, t, symmetric=False, chunk_size=24), "one-way", 2),
        "sharded dense sym": (sharded(), "sym", 2),
        "sharded dense one-way": (sharded(symmetric=False), "one-way", 2),
        "sharded chunked16 sym": (sharded(chunk_size=16), "sym", 2),
        "sharded chunked24 one-way": (sharded(symmetric=False, chunk_size=24), "one-way", 2),
        "sharded chunked24 sym": (sharded(chunk_size=24), "sym", 2),
        "sharded chunked5 sym": (sharded(chunk_size=5), "sym", 2),
        "dense_info_nce sym": (references["dense sym"], "dense sym", 3),
        "dense_info_nce one-way chunked5": (lambda q, k, t: dense_info(q, k, t, symmetric=False, chunk_size=5),
                                            "dense one-way", 3),
        "dense_info_nce chunked5 per device in shard_map": (
            jax.shard_map(lambda q, k, t: jax.lax.pmean(dense_info(q, k, t, chunk_size=5), "data"),
                          mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=P()), "dense sym", 3),
        "mse": (references["mse"], "mse", 2),
        "l1": (references["l1"], "l1", 2),
        "mse dense tokens": (references["mse"], "mse", 3),
    }

    def value_and_grads(fn, q, k, lt):
        return jax.jit(jax.value_and_grad(lambda q, k, lt: fn(q, k, jnp.exp(lt)), argnums=(0, 1, 2)))(q, k, lt)

    single = {}
    results = {}
    for name, (fn, ref, ndim) in cases.items():
        q, k = (q2, k2) if ndim == 2 else (q3, k3)
        qs, ks = jax.device_put(q, batch_sharded), jax.device_put(k, batch_sharded)
        v, g = value_and_grads(fn, qs, ks, jax.device_put(log_t, replicated))
        assert len(g[0].sharding.device_set) == 8
        if (ref, ndim) not in single:
            single[ref, ndim] = value_and_grads(references[ref], jax.device_put(q, one), jax.device_put(k, one),
                                                jax.device_put(log_t, one))
        rv, rg = single[ref, ndim]
        assert len(rg[0].sharding.device_set) == 1
        diff = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        results[name] = dict(loss=float(rv), value=diff(v, rv), query=diff(g[0], rg[0]), key=diff(g[1], rg[1]),
                             log_temperature=diff(g[2], rg[2]), grad_log_temperature=float(rg[2]))

    try:
        losses.sharded_info_nce(q2[:60], k2[:60], 0.1, mesh=mesh)
        results["indivisible batch error"] = "no error"
    except ValueError as e:
        results["indivisible batch error"] = str(e)
    hlo = jax.jit(jax.grad(sharded(chunk_size=16), argnums=(0, 1))).lower(
        jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=batch_sharded),
        jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=batch_sharded), 0.1).as_text()
    results["chunked collectives"] = [op for op in ("all_gather", "reduce_scatter") if op in hlo]
    print("RESULTS " + json.dumps(results))
""")


def _run_8_devices(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_sharded_8_devices_equal_single_device():
    proc = _run_8_devices(["-c", _SHARDED_SCRIPT])
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    assert "not divisible" in results.pop("indivisible batch error")
    assert results.pop("chunked collectives") == ["all_gather", "reduce_scatter"]
    assert len(results) == 16
    for name, r in results.items():
        for field in ("value", "query", "key", "log_temperature"):
            check_close(f"8 devices vs 1: {name} {field}", r[field], 0.0, TOL)
        if "info_nce" in name:
            assert r["grad_log_temperature"] != 0.0, name


def test_memory_benchmark_smoke(tmp_path):
    """benchmarks/infonce_memory.py at toy sizes on 8 fake devices: every row is there and
    the chunked sharded loss compiles to fewer temporaries than the dense ones. `--record`
    goes to a temporary file, never to benchmarks/RESULTS.md."""
    results = tmp_path / "RESULTS.md"
    proc = _run_8_devices(["benchmarks/infonce_memory.py", "--batches", "64,128", "--dim", "32", "--chunk", "16",
                           "--record", "--results", str(results)])
    print(proc.stdout)
    recorded = results.read_text()
    assert "## infonce_memory" in recorded and "8 x cpu" in recorded and "| 128 | 32 | 16 | sharded chunked |" in recorded
    temp = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0].isdigit():
            temp[int(cells[0]), cells[3]] = float(cells[4])
    assert set(temp) == {(b, v) for b in (64, 128) for v in
                         ("info_nce dense", "info_nce chunked", "sharded dense", "sharded chunked")}
    for b in (64, 128):
        assert temp[b, "sharded chunked"] < temp[b, "sharded dense"]
        assert temp[b, "sharded chunked"] < temp[b, "info_nce dense"]
