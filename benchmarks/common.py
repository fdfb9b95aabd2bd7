"""Pieces shared by the benchmark scripts: the device and its peak, timing, FLOP counts,
Markdown tables and the RESULTS.md / JSON writers.

Import from a script in this folder as `from common import ...` (each script puts this
folder and the repository root on sys.path).
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# Dense bf16 tensor-core peak in TFLOP/s (vendor data sheets, no sparsity), matched as
# substrings of JAX's device_kind, most specific first. Unknown cards get no MFU.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
)


def initial_state(params: Any, opt_state: Any) -> dict:
    """The train state the stages build (`mmovseg_jax.train.loop.initial_state`)."""
    from mmovseg_jax.train import loop

    return loop.initial_state(params, opt_state)


def _leaf_name(path) -> str:
    """The name of the array a state path leads to (the last key that is not `value`)."""
    for k in reversed(path):
        name = getattr(k, "key", getattr(k, "name", None))
        if isinstance(name, str) and name != "value":
            return name
    return ""


def random_init(make: Callable[[], Any], seed: int = 0) -> Any:
    """`make()` (an nnx module) with random weights drawn in one jitted call.

    The module is traced abstractly (`nnx.eval_shape`), then every float array is filled:
    LayerNorm scales (and any `var`) with ones, biases (and any `mean`) with zeros, all
    else N(0, 0.02^2). Benchmarks only: one compilation instead of one per initialiser
    and shape (minutes on a loaded CPU for the DEF model); values differ from the
    modules' own initialisers, speed does not. Falls back to `make()` for modules holding
    non-float state.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(make))
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    if not all(jnp.issubdtype(leaf.dtype, jnp.floating) for _, leaf in flat):
        return make()
    kinds = []
    for path, _ in flat:
        name = _leaf_name(path)
        kinds.append("one" if name in ("scale", "var") else "zero" if name in ("bias", "mean") else "normal")
    specs = [(leaf.shape, leaf.dtype) for _, leaf in flat]

    sizes = [int(np.prod(shape)) for shape, _ in specs]
    offsets = np.cumsum([0] + sizes)

    @jax.jit
    def fill(key):  # one random vector, cut into the arrays (one RNG op: fast to compile)
        noise = 0.02 * jax.random.normal(key, (int(offsets[-1]),), jnp.float32)
        out = []
        for kind, (shape, dtype), start, size in zip(kinds, specs, offsets, sizes):
            if kind == "one":
                out.append(jnp.ones(shape, dtype))
            elif kind == "zero":
                out.append(jnp.zeros(shape, dtype))
            else:
                out.append(jax.lax.dynamic_slice_in_dim(noise, int(start), size).reshape(shape).astype(dtype))
        return out

    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, fill(jax.random.key(seed))))


def peak_tflops(device_kind: str) -> float | None:
    """bf16 dense peak TFLOP/s of a card named `device_kind` (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def device_info() -> dict[str, Any]:
    """The first JAX device: kind, platform, count, bf16 peak (None if unknown) and versions."""
    import jax
    import flax

    d = jax.devices()[0]
    return {"kind": d.device_kind, "platform": d.platform, "count": jax.device_count(),
            "peak_tflops": peak_tflops(d.device_kind) if d.platform == "gpu" else None,
            "jax": jax.__version__, "flax": flax.__version__, "host": platform.node()}


def mfu_text(tflops: float | None, peak: float | None) -> str:
    """Model FLOP utilisation as a percentage string, "n/a" without a known peak."""
    if tflops is None or not peak:
        return "n/a"
    return f"{100 * tflops / peak:.1f}%"


def time_loop(step: Callable[[Any], Any], carry: Any, steps: int, warmup: int) -> tuple[float, Any]:
    """Seconds per call of `carry = step(carry)`, after `warmup` untimed calls (at least one;
    pass an already compiled step, or the first call's compilation lands in the warm-up).

    The timed loop only dispatches; `jax.block_until_ready` runs once after the warm-up
    and once at the end, so no host synchronisation happens inside it.
    """
    import jax

    for _ in range(max(warmup, 1)):
        carry = step(carry)
    jax.block_until_ready(carry)
    start = time.perf_counter()
    for _ in range(steps):
        carry = step(carry)
    jax.block_until_ready(carry)
    return (time.perf_counter() - start) / max(steps, 1), carry


def xla_flops(lowered) -> float | None:
    """FLOPs of a `jax.jit(...).lower(...)` computation from XLA's cost analysis of its HLO
    (every floating-point op, matmuls and elementwise; custom calls such as cuDNN attention
    count as nothing), or None when the backend gives no analysis."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # some backends/versions do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def vit_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int, patch: int, channels: int = 3) -> float:
    """Matmul FLOPs of one ViT forward pass for one image: per block the q/k/v/out and MLP
    projections (2 * T * (4 d^2 + 2 d m)) and the two attention products (4 T^2 d), plus
    the patch embedding counted over all T tokens (2 * T * channels * patch^2 * d, one
    token more than it computes). For ViT-B/16 this is exactly the formula of
    shared/bench/torch_cmu_anchor.py."""
    per_block = 2 * tokens * (4 * width * width + 2 * width * mlp_dim) + 4 * tokens * tokens * width
    return depth * per_block + 2 * tokens * channels * patch * patch * width


def table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `rows` (dicts keyed by column name; missing cells are "-")."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    lines = ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, *lines])


def versions_line(info: dict[str, Any], extra: dict[str, str] | None = None) -> str:
    parts = [f"jax {info['jax']}", f"flax {info['flax']}"] + [f"{k} {v}" for k, v in (extra or {}).items()]
    return ", ".join(parts)


def record(path: Path, title: str, info: dict[str, Any], text: str, notes: str = "",
           extra_versions: dict[str, str] | None = None) -> None:
    """Appends a dated section (card, versions, the command, notes, the table) to `path`."""
    device = f"{info['count']} x {info['kind']} ({info['platform']})"
    with Path(path).open("a") as f:
        f.write(f"\n## {title}, {datetime.date.today()}, {device} ({info['host']})\n\n"
                f"{versions_line(info, extra_versions)}; command: `{' '.join(sys.argv)}`"
                f"{'; ' + notes if notes else ''}\n\n{text}\n")


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Writes `payload` as JSON to `path` (nothing when path is None)."""
    if path is not None:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def add_output_args(parser) -> None:
    """--record / --results PATH / --json PATH, shared by the scripts."""
    parser.add_argument("--record", action="store_true", help=f"append the table to {RESULTS.name}")
    parser.add_argument("--results", type=Path, default=None,
                        help="append the table to this file (implies --record; default benchmarks/RESULTS.md)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")


def results_path(args) -> Path | None:
    """Where to append the table, or None when neither --record nor --results was given."""
    if args.results is not None:
        return args.results
    return RESULTS if args.record else None
