"""What a compiled step is made of, read from its optimised HLO text: kernels by kind and
the bytes each kind moves through memory, with the time those bytes take at a bandwidth.

    python benchmarks/hlo_traffic.py /tmp/hlo/*.hlo.txt                # tables per file
    python benchmarks/hlo_traffic.py A.hlo.txt B.hlo.txt --top 20       # and the 20 largest fusion families

The files are what `cmu_step.py` / `def_step.py --hlo-dir DIR` write on a GPU, or what
`compile_for_gpu.py` writes on a machine without one. For every instruction of the
entry computation that launches work (fusions, GEMM and attention calls, copies), the
bytes of its operands and results are added up under its kind:

  gemm / gemm f8     cuBLAS(Lt) calls, bf16 or float8 operands
  gemm (triton)      Triton GEMM fusions (float8 ones are counted by `float8_gemms`)
  attention          cuDNN fused attention calls (forward and backward)
  loop fusion        elementwise work (XLA kLoop)
  reduction/transpose fusion   reductions and transposes (XLA kInput)

"ms at bandwidth" is bytes / bandwidth (default 4.8 TB/s, an H200's HBM): a lower bound
on the memory-bound kinds' time, and no estimate at all for GEMMs and attention, which
are bound by their FLOPs. The table says where traffic goes; only a profile says time.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
         "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z\-]*)\(")
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_NO_WORK = {"parameter", "bitcast", "get-tuple-element", "tuple", "constant", "after-all", "partition-id"}
H200_BANDWIDTH = 4.8e12


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO type such as "bf16[128,197,768]{2,1,0}" or a tuple of them."""
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * BYTES.get(dtype, 4)
    return total


def _entry_lines(text: str) -> list[str]:
    start = re.search(r"^ENTRY ", text, re.MULTILINE)
    if start is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return text[start.start():].splitlines()[1:]


def _operands(line: str, op: str) -> list[str]:
    call = re.search(re.escape(op) + r"\(([^)]*)\)", line)
    return re.findall(r"%([\w.\-]+)", call.group(1)) if call else []


def _kind(line: str, op: str) -> str:
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', line)
        target = target.group(1) if target else "?"
        if target.endswith("$f8"):
            return "gemm f8"
        if "matmul" in target or "gemm" in target:
            return "gemm"
        if "fmha" in target or "attention" in target:
            return "attention"
        return f"custom-call {target}"
    if op == "fusion":
        kind = re.search(r"kind=(\w+)", line)
        kind = kind.group(1) if kind else "?"
        if kind == "kCustom":
            return "gemm (triton)" if "gemm" in line else "custom fusion"
        return {"kLoop": "loop fusion", "kInput": "reduction/transpose fusion",
                "kOutput": "output fusion"}.get(kind, f"fusion {kind}")
    return op


def launches(text: str) -> list[dict]:
    """One record per work-launching instruction of the entry computation: name, kind,
    bytes (operands + results; a GEMM call's workspace excluded)."""
    sizes: dict[str, int] = {}
    records = []
    for line in _entry_lines(text):
        m = _DEFINITION.match(line)
        if not m:
            continue
        name, type_text, op = m.groups()
        out = shape_bytes(type_text)
        if op == "custom-call" and type_text.startswith("(") and "s8[" in type_text:
            out = shape_bytes(type_text.rsplit("s8[", 1)[0])  # (result, s8[workspace])
        sizes[name] = out
        if op in _NO_WORK:
            continue
        moved = out + sum(sizes.get(n, 0) for n in _operands(line, op))
        records.append({"name": name, "kind": _kind(line, op), "bytes": moved})
    return records


def float8_gemms(text: str) -> int:
    """Matrix multiplies that read float8 operands: cuBLASLt float8 calls
    (`__cublas$lt$matmul$f8`), and GEMM calls or Triton GEMM fusions with a float8
    operand. Nonzero on a GPU shows ops/fp8.py's products ran as float8 GEMMs; 0 on CPUs."""
    lines = text.splitlines()
    dtypes = {}
    for m in map(_DEFINITION.match, lines):
        if m:
            first = _SHAPE.search(m.group(2))
            dtypes[m.group(1)] = first.group(1) if first else ""
    count = 0
    for line in lines:
        m = _DEFINITION.match(line)
        if not m or m.group(3) not in ("custom-call", "fusion"):
            continue
        kind = _kind(line, m.group(3))
        if kind == "gemm f8":
            count += 1
        elif kind in ("gemm", "gemm (triton)") and any(dtypes.get(n, "").startswith("f8")
                                                      for n in _operands(line, m.group(3))):
            count += 1
    return count


def summary(text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count": launches, "gb": GB moved}} over the entry computation."""
    table: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"count": 0, "gb": 0.0})
    for r in launches(text):
        table[r["kind"]]["count"] += 1
        table[r["kind"]]["gb"] += r["bytes"] / 1e9
    return dict(table)


def families(text: str, top: int) -> list[tuple[str, int, float]]:
    """The `top` fusion families (instruction names without their numeric suffix, e.g.
    loop_pad_fusion) by GB moved: (family, count, GB)."""
    table: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for r in launches(text):
        if r["kind"].endswith("fusion") and not r["kind"].startswith("gemm"):
            family = re.sub(r"(\.\d+)+$", "", r["name"])
            table[family][0] += 1
            table[family][1] += r["bytes"] / 1e9
    rows = sorted(((f, n, gb) for f, (n, gb) in table.items()), key=lambda row: -row[2])
    return rows[:top]


def table_text(text: str, bandwidth: float = H200_BANDWIDTH) -> str:
    """The summary as a markdown table, largest traffic first, with a total row."""
    rows = sorted(summary(text).items(), key=lambda kv: -kv[1]["gb"])
    out = ["| kind | launches | GB moved | ms at bandwidth |", "|---|---|---|---|"]
    for kind, r in rows:
        out.append(f"| {kind} | {r['count']} | {r['gb']:.2f} | {1e3 * r['gb'] * 1e9 / bandwidth:.2f} |")
    total = sum(r["gb"] for _, r in rows)
    memory = sum(r["gb"] for k, r in rows if not k.startswith("gemm") and k != "attention")
    out.append(f"| all | {sum(r['count'] for _, r in rows)} | {total:.2f} | {1e3 * total * 1e9 / bandwidth:.2f} |")
    out.append(f"| memory-bound kinds (not GEMM, not attention) | - | {memory:.2f} | "
               f"{1e3 * memory * 1e9 / bandwidth:.2f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="optimised HLO text files (*.hlo.txt)")
    p.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="bytes/s (default 4.8e12, H200)")
    p.add_argument("--top", type=int, default=0, help="also list the N largest fusion families")
    args = p.parse_args(argv)
    for path in args.files:
        text = path.read_text()
        print(f"\n{path.name}: {float8_gemms(text)} float8 GEMMs\n")
        print(table_text(text, args.bandwidth))
        if args.top:
            print("\n| fusion family | launches | GB moved |\n|---|---|---|")
            for family, n, gb in families(text, args.top):
                print(f"| {family} | {n} | {gb:.2f} |")


if __name__ == "__main__":
    main()
