"""Grain input-pipeline throughput: decoding + paired augmentation, per worker count.

    python benchmarks/input_pipeline.py                        # 384 px crops of 512 px tiles, workers 0,1,2
    python benchmarks/input_pipeline.py --workers 0,4,8,16 --record
    python benchmarks/input_pipeline.py --records 8 --tile 96 --crop 64 --batch 4 --batches 2 --workers 0  # seconds

Writes a small data set of synthetic optical + SAR pairs to a temporary folder in each
format asked for, then reads it through the project's pipeline
(`mmovseg_jax.data.pipeline.make_iterator`, shuffled and repeated, `PairedAugment` at
`--crop`: a random similarity warp + crop of both images) and times whole batches:

- arrayrecord: one ArrayRecord file written by `data.pack_arrayrecord.pack` and read by
  `ArrayRecordPairs` (each record an uncompressed npz: decoding is parsing, no codec);
- png: a paired folder (rgb/*.png, sar/*.png) read by `layouts.PairedFolder` (PNG decoding).

worker_count 0 produces records in the main process (Grain's read threads only); N > 0
in N worker processes. "pairs/s per worker" divides by max(N, 1): read it as what one more
worker adds, to size `config.data.worker_count` for a GPU's step rate. The first
`--warmup` batches are not timed: worker start-up, and the batches the pipeline buffered
meanwhile (Grain prefetches up to 8 batches per producing process), which would otherwise
be counted as free; by default 10 + 10 x workers. Each worker produces whole batches in
turn, so the timed batches default to several rounds of the workers (4 x workers, at
least 10). The host's CPU count is printed: rates stop growing once the workers
outnumber the cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402

import common  # noqa: E402
from mmovseg_jax.data import pipeline  # noqa: E402
from mmovseg_jax.data.augment import PairedAugment  # noqa: E402

FORMATS = ("arrayrecord", "png")
COLUMNS = ("format", "workers", "tile", "crop", "batch", "warmup", "batches", "pairs/s", "pairs/s per worker",
           "ms/batch", "MB read/s", "first batch s")


def synthetic_pair(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """A smooth random RGB tile and a speckled SAR tile, uint8 (size, size, 3) and (size, size):
    low-frequency colour fields plus noise, so PNG compresses it about as it would a photo."""
    coarse = rng.uniform(0, 255, (size // 32 + 2, size // 32 + 2, 4))
    idx = np.linspace(0, coarse.shape[0] - 1.001, size)
    i0 = idx.astype(int)
    t = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - t[..., None]) + coarse[i0 + 1] * t[..., None]           # (size, n, 4)
    field = rows[:, i0] * (1 - t.T[..., None]) + rows[:, i0 + 1] * t.T[..., None]    # (size, size, 4)
    rgb = np.clip(field[..., :3] + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    sar = np.clip(field[..., 3] * rng.gamma(4.0, 0.25, (size, size)), 0, 255).astype(np.uint8)
    return {"rgb": rgb, "sar": sar}


def write_dataset(root: Path, fmt: str, records: int, tile: int, seed: int = 0):
    """Writes `records` pairs in `fmt` under `root`; returns (Grain source, bytes on disk)."""
    rng = np.random.default_rng(seed)
    pairs = [synthetic_pair(rng, tile) for _ in range(records)]
    if fmt == "arrayrecord":
        from data.pack_arrayrecord import pack
        from mmovseg_jax.data.arrayrecord import ArrayRecordPairs

        path = root / "pairs.array_record"
        pack(pairs, path, stream=io.StringIO())
        return ArrayRecordPairs(path), path.stat().st_size
    if fmt == "png":
        from PIL import Image
        from mmovseg_jax.data.layouts import PairedFolder

        for sub in ("rgb", "sar"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for i, pair in enumerate(pairs):
            Image.fromarray(pair["rgb"]).save(root / "rgb" / f"{i:05d}.png")
            Image.fromarray(pair["sar"]).save(root / "sar" / f"{i:05d}.png")
        size = sum(f.stat().st_size for f in root.rglob("*.png"))
        return PairedFolder(root), size
    raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")


def measure(source, bytes_per_record: float, workers: int, crop: int, batch: int, batches: int,
            warmup: int) -> dict:
    """Times `batches` batches of the pipeline after `warmup` untimed ones."""
    start = time.perf_counter()
    it = pipeline.make_iterator(source, global_batch_size=batch, seed=0, train=True, augment=PairedAugment(crop),
                                worker_count=workers, process_index=0, process_count=1)
    first = next(it)
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(it)
    if first["rgb"].shape != (batch, crop, crop, 3) or first["sar"].shape != (batch, crop, crop):
        raise RuntimeError(f"unexpected batch shapes {first['rgb'].shape}, {first['sar'].shape}")
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    rate = batches * batch / seconds
    del it
    return {"workers": workers, "batch": batch, "warmup": max(warmup, 1), "batches": batches, "pairs/s": rate,
            "pairs/s per worker": rate / max(workers, 1), "ms/batch": 1e3 * seconds / batches,
            "MB read/s": rate * bytes_per_record / 1e6, "first batch s": first_s}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {FORMATS}")
    p.add_argument("--workers", default="0,1,2", help="comma list of Grain worker counts")
    p.add_argument("--records", type=int, default=64, help="pairs written (the pipeline repeats them)")
    p.add_argument("--tile", type=int, default=512, help="side of the stored tiles, px")
    p.add_argument("--crop", type=int, default=384, help="side of the augmented crops, px")
    p.add_argument("--batch", type=int, default=32, help="pairs per batch")
    p.add_argument("--batches", type=int, default=None,
                   help="timed batches per worker count (default max(10, 4 x workers): whole rounds of workers)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed batches first (start-up and prefetch buffers; default 10 + 10 x workers)")
    p.add_argument("--dir", type=Path, default=None, help="where to write the data (default: a temporary folder)")
    common.add_output_args(p)
    args = p.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",")]
    for f in formats:
        if f not in FORMATS:
            p.error(f"unknown format {f!r}; choose from {FORMATS}")
    workers = [int(w) for w in args.workers.split(",")]

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for fmt in formats:
            root = Path(tmp) / fmt
            root.mkdir()
            source, size = write_dataset(root, fmt, args.records, args.tile)
            for w in workers:
                row = {"format": fmt, "tile": args.tile, "crop": args.crop}
                try:
                    warmup = args.warmup if args.warmup is not None else 10 + 10 * w
                    timed = args.batches if args.batches is not None else max(10, 4 * w)
                    row.update(measure(source, size / args.records, w, args.crop, args.batch, timed, warmup))
                except Exception as e:
                    row.update({"workers": w, "batch": args.batch,
                                "pairs/s": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"})
                rows.append(row)
                print(f"  done: {json.dumps(row, default=str)}", flush=True)

    import grain

    info = {"cpus": os.cpu_count(), "grain": getattr(grain, "__version__", "?")}
    header = (f"Grain input pipeline; host {os.uname().nodename}, {info['cpus']} CPUs; grain {info['grain']}; "
              f"{args.records} synthetic pairs of {args.tile} px, PairedAugment crop {args.crop}")
    text = common.table(COLUMNS, rows)
    print(header)
    print(text)
    out = common.results_path(args)
    if out is not None:
        import datetime

        with Path(out).open("a") as f:
            f.write(f"\n## input_pipeline, {datetime.date.today()}, {info['cpus']} CPUs ({os.uname().nodename})\n\n"
                    f"grain {info['grain']}; {args.records} synthetic pairs of {args.tile} px, PairedAugment crop "
                    f"{args.crop}; command: `{' '.join(sys.argv)}`\n\n{text}\n")
    common.write_json(args.json, {"host": info, "rows": rows, "argv": sys.argv})
    return rows


if __name__ == "__main__":
    main()
