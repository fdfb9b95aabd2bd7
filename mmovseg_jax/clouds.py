"""Add synthetic clouds (and shadows) to an RGB image.

    python -m mmovseg_jax.clouds IN OUT [--preset thin|big|local|fog|wide] [--seed 0] \\
        [--opacity X] [--shadows] [--opacity-map MAP.png] [--debug]

IN: RGB PNG/JPEG/GeoTIFF (3 or 4 bands; non-uint8 is stretched to uint8 per image).
OUT: the cloudy image, uint8 RGB, written as PNG, JPEG or TIFF by its extension.
--opacity-map: the cloud opacity (mean over bands), PNG/JPEG as 8-bit grey (0..255 =
opacity 0..1), TIFF as float32. --opacity forces a uniform opacity (0 = unchanged image).
The same IN, preset, seed and options give the same output (mmovseg_jax.data.clouds).

Errors (missing or unreadable file, unknown preset, bad option) print one line
`error: ...` and exit with code 2 (--debug: the traceback). Outputs go to temporary
files renamed into place once all are written, so a failed run writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mmovseg_jax.cli import OneLineParser, UsageError, check_output, with_one_line_errors, write_all
from mmovseg_jax.data import imageio

WRITE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
PRESET_NAMES = ("thin", "big", "local", "fog", "wide")


def _image_writer(array: np.ndarray, path: Path) -> Callable:
    """writer(file object) saving (H, W[, 3]) uint8 or float32 (TIFF only) by `path`'s extension."""
    ext = path.suffix.lower()
    if ext in (".tif", ".tiff"):
        import tifffile

        return lambda f: tifffile.imwrite(f, array, photometric="rgb" if array.ndim == 3 else "minisblack")
    from PIL import Image

    image = Image.fromarray(array)
    if ext == ".png":
        return lambda f: image.save(f, format="PNG")
    return lambda f: image.save(f, format="JPEG", quality=95)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m mmovseg_jax.clouds", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, metavar="IN", help="RGB image (PNG/JPEG/GeoTIFF)")
    p.add_argument("output", type=Path, metavar="OUT", help="cloudy image (.png/.jpg/.tif)")
    p.add_argument("--preset", default="thin", type=str.lower, choices=PRESET_NAMES, help="cloud type (default thin)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--opacity", type=float, help="uniform cloud opacity in [0, 1] instead of the preset's range")
    p.add_argument("--shadows", action="store_true", help="add cloud shadows")
    p.add_argument("--opacity-map", type=Path, help="write the cloud opacity map here (.png/.jpg/.tif)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> dict:
    """Checks, reads, clouds and writes; returns a summary. Raises before writing anything."""
    import jax

    from mmovseg_jax.data import clouds

    if args.opacity is not None and not 0.0 <= args.opacity <= 1.0:
        raise UsageError(f"--opacity must lie in [0, 1], got {args.opacity}")
    out = check_output(args.output, "OUT", WRITE_EXTENSIONS)
    targets = [out] + ([check_output(args.opacity_map, "--opacity-map", WRITE_EXTENSIONS)] if args.opacity_map else [])
    if len({t.resolve() for t in targets}) != len(targets):
        raise UsageError(f"output paths collide: {', '.join(map(str, targets))}")
    try:
        rgb = imageio.to_uint8_rgb(imageio.read_image(args.input), args.input)
    except ValueError as e:
        raise UsageError(f"IN {e}") from e

    params = clouds.PRESETS[args.preset]
    if args.shadows:
        params = dataclasses.replace(params, shadows=True)
    cloudy, alpha = clouds.add_clouds_uint8(jax.random.key(args.seed), rgb, params, opacity=args.opacity)
    outputs = {out: _image_writer(np.asarray(cloudy), out)}
    if args.opacity_map:
        mean = np.asarray(alpha, np.float32).mean(axis=-1)
        is_tiff = args.opacity_map.suffix.lower() in (".tif", ".tiff")
        mean = mean if is_tiff else np.rint(np.clip(mean, 0.0, 1.0) * 255.0).astype(np.uint8)
        outputs[args.opacity_map] = _image_writer(mean, args.opacity_map)
    write_all(outputs)
    return {"size": rgb.shape[:2], "preset": args.preset, "mean_opacity": float(np.mean(alpha)),
            "written": list(outputs)}


def _print_summary(s: dict) -> None:
    h, w = s["size"]
    print(f"{h}x{w}, preset {s['preset']}, mean opacity {s['mean_opacity']:.3f}; wrote: "
          + ", ".join(map(str, s["written"])))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return with_one_line_errors(argv, lambda: _print_summary(run(build_parser().parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
