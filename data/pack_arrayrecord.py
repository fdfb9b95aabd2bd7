"""Pack an optical + SAR dataset into ArrayRecord files for the Grain pipeline.

    python -m data.pack_arrayrecord --layout folder|spacenet6|dfc2023 --root ROOT --out OUT.array_record [--shards N]

Reads the layout's source (`mmovseg_jax.data.layouts`) record by record and writes the
npz-encoded records (`mmovseg_jax.data.arrayrecord`) in source order, contiguous blocks per
shard. Progress (records done / total, rate, ETA) goes to stderr. Shards are written
under temporary names and renamed only when all are complete: on any error nothing new is
left behind. Read the result with `ArrayRecordPairs(OUT)`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TextIO

from mmovseg_jax.cli import Progress
from mmovseg_jax.data.arrayrecord import WRITER_OPTIONS, encode_record, shard_paths
from mmovseg_jax.data.layouts import DFC2023, PairedFolder, SpaceNet6


def pack(source, out: str | os.PathLike, *, shards: int = 1, stream: TextIO | None = None,
         every: float = 1.0) -> list[Path]:
    """Writes every record of `source` to `shard_paths(out, shards)` and returns those paths.

    Progress goes to `stream` (default stderr) at most every `every` seconds.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    stream = sys.stderr if stream is None else stream
    total = len(source)
    if not 1 <= shards <= max(total, 1):
        raise ValueError(f"shards must be in 1..{total} (the number of records), got {shards}")
    finals = shard_paths(out, shards)
    temps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in finals]
    bounds = [total * k // shards for k in range(shards + 1)]
    finals[0].parent.mkdir(parents=True, exist_ok=True)
    progress = Progress(total, stream, every, label="pack")
    print(f"pack: {total} records from {source!r} -> {', '.join(p.name for p in finals)}", file=stream, flush=True)
    writer = None
    try:
        for k, temp in enumerate(temps):
            writer = ArrayRecordWriter(str(temp), WRITER_OPTIONS)
            for i in range(bounds[k], bounds[k + 1]):
                writer.write(encode_record(source[i], where=f"record {i}"))
                progress.update(i + 1)
            writer.close()
            writer = None
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise
    return finals


def build_source(args: argparse.Namespace):
    """The layouts source the command line asks for."""
    db_range = {} if args.db_range is None else {"db_range": tuple(args.db_range)}
    if args.layout == "spacenet6":
        return SpaceNet6(args.root, args.split or "train/AOI_11_Rotterdam", args.sar_band,
                         rotate_by_orientation=not args.no_rotate, skip_unpaired=args.skip_unpaired, **db_range)
    sar = {} if args.sar_scale is None else {"sar_db": args.sar_scale == "db"}
    if args.layout == "dfc2023":
        return DFC2023(args.root, args.split or "train", skip_unpaired=args.skip_unpaired, **sar, **db_range)
    root = Path(args.root) / args.split if args.split else args.root
    return PairedFolder(root, args.rgb_dir, args.sar_dir, args.label_dir, skip_unpaired=args.skip_unpaired,
                        **sar, **db_range)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data.pack_arrayrecord", description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", required=True, choices=("folder", "spacenet6", "dfc2023"))
    p.add_argument("--root", required=True, help="dataset root (see data/README.md for each layout)")
    p.add_argument("--out", required=True, help="output file; with --shards N, OUT-0000k-of-0000N")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--split", help="dfc2023: split folder (train); spacenet6: split dir (train/AOI_11_Rotterdam); "
                                   "folder: subfolder of ROOT")
    p.add_argument("--rgb-dir", default="rgb", help="folder: optical subfolder")
    p.add_argument("--sar-dir", default="sar", help="folder: SAR subfolder")
    p.add_argument("--label-dir", help="folder: label subfolder (none by default)")
    p.add_argument("--sar-band", default="HH", help="spacenet6: HH, HV, VH or VV")
    p.add_argument("--no-rotate", action="store_true", help="spacenet6: ignore SAR_orientations.txt")
    p.add_argument("--sar-scale", choices=("db", "linear"), help="non-uint8 SAR values (folder: db, dfc2023: linear)")
    p.add_argument("--db-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="dB mapped to 0..255")
    p.add_argument("--skip-unpaired", action="store_true", help="skip files without a partner instead of failing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        source = build_source(args)
        paths = pack(source, args.out, shards=args.shards)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}\nnothing was written", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in paths)
    print(f"pack: wrote {len(source)} records, {size / 2**20:.1f} MiB: {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
