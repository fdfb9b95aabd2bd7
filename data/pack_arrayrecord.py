"""Pack an optical + SAR dataset into ArrayRecord files for the Grain pipeline.

    python -m data.pack_arrayrecord --layout folder|spacenet6|dfc2023 --root ROOT --out OUT.array_record \
        [--shards N] [--label-dir DIR [--classes a,b,c]] [--skip-bad-samples] [--debug]

Reads the layout's source (`mmovseg_jax.data.layouts`) record by record and writes the
npz-encoded records (`mmovseg_jax.data.arrayrecord`) in source order, contiguous blocks per
shard. Progress (records done / total, rate, ETA) goes to stderr. Shards are written
under temporary names and renamed only when all are complete: on any error nothing new is
left behind. Read the result with `ArrayRecordPairs(OUT)`.

With --classes (folder layout with --label-dir) labels are checked against the class
list (`segmentation.LabelledFolder`: values 0..len-1 and 255 = ignore). A bad sample
(missing, corrupt or truncated file, different sizes, wrong band count or dtype, label
values outside the class list) stops the run with one line `error: FILE: ...`, exit code
2 (--debug: the traceback); with --skip-bad-samples it is left out, warned about and
counted in the summary line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TextIO

from mmovseg_jax.cli import OneLineParser, Progress, UsageError, with_one_line_errors
from mmovseg_jax.data.arrayrecord import WRITER_OPTIONS, encode_record, shard_paths
from mmovseg_jax.data.layouts import DFC2023, PairedFolder, SpaceNet6


def pack(source, out: str | os.PathLike, *, shards: int = 1, stream: TextIO | None = None,
         every: float = 1.0, skip_bad_samples: bool = False, skipped: list[str] | None = None) -> list[Path]:
    """Writes every record of `source` to `shard_paths(out, shards)` and returns those paths.

    Progress goes to `stream` (default stderr) at most every `every` seconds.
    A record that cannot be read raises (its error names the file) and nothing is left;
    with `skip_bad_samples` it is left out after a `warning:` line, and its one-line
    reason appended to `skipped`. ValueError when every record is bad.
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
    skipped = [] if skipped is None else skipped
    try:
        for k, temp in enumerate(temps):
            writer = ArrayRecordWriter(str(temp), WRITER_OPTIONS)
            for i in range(bounds[k], bounds[k + 1]):
                try:
                    record = source[i]
                except (ValueError, OSError) as e:
                    if not skip_bad_samples:
                        raise
                    reason = " ".join(str(e).split()) or type(e).__name__
                    print(f"warning: record {i} skipped: {reason}", file=stream, flush=True)
                    skipped.append(reason)
                else:
                    writer.write(encode_record(record, where=f"record {i}"))
                progress.update(i + 1)
            writer.close()
            writer = None
        if total and len(skipped) == total:
            raise ValueError(f"all {total} records are bad; first: {skipped[0]}")
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
    if args.classes is not None:
        from mmovseg_jax.data.segmentation import LabelledFolder, check_classes

        if args.layout != "folder" or not args.label_dir:
            raise UsageError("--classes needs --layout folder and --label-dir (the labels it checks)")
        try:
            classes = check_classes([c.strip() for c in args.classes.split(",")])
        except ValueError as e:
            raise UsageError(f"--classes {args.classes!r}: {e}") from e
        return LabelledFolder(root, args.rgb_dir, args.sar_dir, args.label_dir, classes,
                              skip_unpaired=args.skip_unpaired, **sar, **db_range)
    return PairedFolder(root, args.rgb_dir, args.sar_dir, args.label_dir, skip_unpaired=args.skip_unpaired,
                        **sar, **db_range)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m data.pack_arrayrecord", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--classes", help="folder layout with --label-dir: comma-separated class names; label values "
                                     "must be 0..len-1 or 255 (ignore)")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="leave out samples that cannot be read (counted) instead of failing")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _run(argv: list[str]) -> None:
    args = parse_args(argv)
    source = build_source(args)
    skipped: list[str] = []
    try:
        paths = pack(source, args.out, shards=args.shards, skip_bad_samples=args.skip_bad_samples, skipped=skipped)
    except (ValueError, OSError) as e:
        raise UsageError(f"{' '.join(str(e).split())} (nothing was written)") from e
    size = sum(p.stat().st_size for p in paths)
    print(f"pack: wrote {len(source) - len(skipped)} records, {size / 2**20:.1f} MiB: {', '.join(map(str, paths))}"
          + (f"; skipped {len(skipped)} bad sample(s)" if skipped else ""), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return with_one_line_errors(argv, lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
