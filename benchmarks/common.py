"""Pieces shared by the benchmark scripts: the device and its peak, timing, FLOP counts,
Markdown tables and the RESULTS.md / JSON writers.

Import from a script in this folder as `from common import ...` (each script puts this
folder and the repository root on sys.path).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def xla_attention(model: Any):
    """Within the block, every `layers.Attention` of the nnx `model` runs XLA attention,
    which runs on any device (e.g. to calibrate float8 layers on the CPU); the configured
    kernels are put back after."""
    from flax import nnx

    from mmovseg_jax.models import layers

    attentions = [m for _, m in nnx.iter_modules(model) if isinstance(m, layers.Attention)]
    kernels = [a.implementation for a in attentions]
    for a in attentions:
        a.implementation = "xla"
    try:
        yield model
    finally:
        for a, kernel in zip(attentions, kernels):
            a.implementation = kernel


def random_init(make: Callable[[], Any], seed: int = 0) -> Any:
    """`make()` (an nnx module) with random weights drawn on the host with NumPy.

    The module is traced abstractly (`nnx.eval_shape`), then every float array is filled:
    LayerNorm scales (and any `var`) with ones, biases (and any `mean`) with zeros, all
    else N(0, 0.02^2), and put on the default device. Benchmarks only: no initialiser is
    compiled (running each module initialiser costs one compilation per shape, and one
    jitted fill of all arrays took over three minutes to compile on an H200); values
    differ from the modules' own initialisers, speed does not. Falls back to `make()` for
    modules holding non-float state.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(make))
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    if not all(jnp.issubdtype(leaf.dtype, jnp.floating) for _, leaf in flat):
        return make()
    rng = np.random.default_rng(seed)
    arrays = []
    for path, leaf in flat:
        name = _leaf_name(path)
        if name in ("scale", "var"):
            host = np.ones(leaf.shape, np.float32)
        elif name in ("bias", "mean"):
            host = np.zeros(leaf.shape, np.float32)
        else:
            host = 0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)
        arrays.append(jnp.asarray(host, dtype=leaf.dtype))
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, arrays))


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


def temp_gib(compiled) -> float | None:
    """Temporary (activation and scratch) memory of a compiled computation in GiB, from
    XLA's buffer assignment (`memory_analysis()`), or None when the backend gives none."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2 ** 30
    except Exception:  # some backends/versions do not implement it
        return None


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


def add_hlo_arg(parser) -> None:
    """--hlo-dir DIR, for the scripts that compile a step (see `write_hlo`)."""
    parser.add_argument("--hlo-dir", type=Path, default=None,
                        help="also write each row's optimised HLO (what XLA compiled: fusions, GEMM calls) "
                             "to a text file in this folder, for reading after a GPU session")


# What `--fast-numerics on` sets (config.model fields, storage.with_kernels keywords): a
# bfloat16 residual stream and the tanh GELU. They change results; both are off by default.
FAST_NUMERICS = {"residual_dtype": "bfloat16", "gelu": "tanh"}
ON_OFF = {"on": (True,), "off": (False,), "both": (False, True)}


def add_fast_numerics_arg(parser) -> None:
    """--fast-numerics on|off|both (see FAST_NUMERICS)."""
    parser.add_argument("--fast-numerics", default="off", choices=sorted(ON_OFF),
                        help="the encoders' residual stream in bfloat16 and the tanh GELU (config.model."
                             "residual_dtype=bfloat16, gelu=tanh; change results; off, the default), or a row of each")


def add_cudnn_pad_arg(parser) -> None:
    """--cudnn-pad-multiple N (layers.CUDNN_PAD_MULTIPLE; see `apply_cudnn_pad`)."""
    parser.add_argument("--cudnn-pad-multiple", type=int, default=None,
                        help="pad tokens for cuDNN attention to a multiple of this (default "
                             "layers.CUDNN_PAD_MULTIPLE, 64; 2 tries the least padding JAX accepts for training)")


def apply_cudnn_pad(multiple: int | None) -> str:
    """Sets layers.CUDNN_PAD_MULTIPLE (None keeps it); returns the label for the attention
    column: "" for the default 64, else " (pad N)"."""
    from mmovseg_jax.models import layers

    if multiple is not None:
        if multiple < 1:
            raise SystemExit(f"--cudnn-pad-multiple must be >= 1, got {multiple}")
        layers.CUDNN_PAD_MULTIPLE = multiple
    return "" if layers.CUDNN_PAD_MULTIPLE == 64 else f" (pad {layers.CUDNN_PAD_MULTIPLE})"


def write_hlo(folder: Path | None, name: str, text: str) -> None:
    """Writes optimised HLO text (`compiled.as_text()`) to folder/name.hlo.txt (nothing when
    folder is None)."""
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.hlo.txt").write_text(text)


def results_path(args) -> Path | None:
    """Where to append the table, or None when neither --record nor --results was given."""
    if args.results is not None:
        return args.results
    return RESULTS if args.record else None


def measured_matmul_tflops(n: int | None = None, repeats: int = 10) -> float:
    """bf16 TFLOP/s of one n x n x n matrix product on the default device (random data),
    the practical ceiling MFU can also be read against (REFERENCE.md: 825 on an H200).
    n defaults to 8192 on a GPU and 512 elsewhere (CPU smoke runs)."""
    import jax
    import jax.numpy as jnp

    n = n or (8192 if jax.default_backend() == "gpu" else 512)

    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
    matmul = jax.jit(lambda x, y: x @ y)
    seconds, _ = time_loop(lambda _: matmul(a, b), None, repeats, 2)
    return 2 * n ** 3 / seconds / 1e12


_KERNEL_KINDS = (("attention", ("fmha", "flash", "cudnn_generated", "sdpa", "attention")),
                 ("conv", ("convolution", "cudnn-conv", "fprop", "dgrad", "wgrad")),
                 ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90", "dot")))


def kernel_kind(name: str) -> str:
    """A coarse class of a device kernel from its name: attention | gemm | conv | other."""
    low = name.lower()
    return next((kind for kind, keys in _KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_profile(step: Callable[[Any], Any], carry: Any, steps: int = 3, top: int = 20) -> dict[str, Any]:
    """Device time per call of `carry = step(carry)` (as `time_loop`'s; compiled and warmed
    up), split by XLA op, from a `jax.profiler` trace read back with
    `jax.profiler.ProfileData`.

    Returns {"device_ms": busy kernel time per step, "kinds": {kind: ms per step},
    "ops": the `top` ops by time, each {"op", "ms", "share", "kind", "kernel", "source"}}.
    GPU: the kernels on the device's streams; CPU (smoke tests): the thunks XLA ran. XLA
    replays most GPU kernels from command buffers (CUDA graphs), which hide the op each
    kernel belongs to: run with XLA_FLAGS=--xla_gpu_enable_command_buffer= for a split by op.
    """
    import glob
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(steps):
                carry = step(carry)
            jax.block_until_ready(carry)
        files = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        if not files:
            return {"error": "the profiler wrote no trace"}
        data = jax.profiler.ProfileData.from_file(files[0])
    ops: dict[str, dict[str, Any]] = {}
    device_planes = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in device_planes or data.planes:
        for line in plane.lines:
            if device_planes and not line.name.startswith("Stream"):
                continue  # the "XLA Ops"/"XLA Modules" lines repeat the stream kernels
            for event in line.events:
                stats = dict(event.stats)
                op = str(stats.get("hlo_op", ""))
                if not op:
                    continue
                # Kernels replayed from an XLA command buffer (a CUDA graph) all carry the
                # buffer's name: key those by kernel name instead.
                key = event.name if op.startswith("command_buffer") else op
                row = ops.setdefault(key, {"op": op, "ns": 0.0, "kernel": event.name,
                                           "source": str(stats.get("tf_op", ""))[-90:]})
                row["ns"] += event.duration_ns
    total = sum(r["ns"] for r in ops.values()) or 1.0
    kinds: dict[str, float] = {}
    rows = []
    for r in sorted(ops.values(), key=lambda r: -r["ns"]):
        kind = kernel_kind(r["kernel"] + " " + r["op"])
        kinds[kind] = kinds.get(kind, 0.0) + r["ns"] / steps / 1e6
        rows.append({"op": r["op"], "ms": r["ns"] / steps / 1e6, "share": r["ns"] / total, "kind": kind,
                     "kernel": r["kernel"][:70], "source": r["source"]})
    return {"device_ms": total / steps / 1e6, "kinds": kinds, "ops": rows[:top]}


def profile_text(profile: dict[str, Any], title: str) -> str:
    """`kernel_profile`'s result as a few printable lines."""
    if "error" in profile:
        return f"{title}: {profile['error']}"
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(profile["kinds"].items(), key=lambda kv: -kv[1]))
    lines = [f"{title}: device busy {profile['device_ms']:.2f} ms/step ({kinds} ms)"]
    lines += [f"  {r['ms']:8.3f} ms {100 * r['share']:5.1f}% {r['kind']:<9} {r['op'][:28]:<28} {r['kernel'][:48]:<48} "
              f"{r['source']}" for r in profile["ops"]]
    return "\n".join(lines)
