"""Segment one optical + SAR pair with a trained MM-OVSeg model, for any class list.

    python -m mmovseg_jax.predict --checkpoint MODEL_DIR --rgb tile.tif --sar tile_sar.tif \\
        --classes "water,road,forest" --out mask.png [--probabilities probs.npy] \\
        [--overlay overlay.png] [--sar-nodata zero|refuse] [--fp8 off|on|static] [--debug]

Writes
  --out            the colour mask (fixed palette) with a legend panel (swatch + name per
                   class) to its right; the mask occupies the top-left H x W pixels
  <out>_index.png  beside it: single-channel uint8 class indices (position in --classes)
  --probabilities  float32 (T, H, W) .npy, sigmoid probabilities at the input size
  --overlay        the colour mask blended over the RGB, with the same legend panel

RGB: PNG/JPEG/GeoTIFF, 3 or 4 bands (non-uint8 stretched to uint8 per image). SAR: one
band (or a grey image saved as RGB); non-uint8 values are backscatter in dB (or linear
with --sar-units linear) mapped from --sar-db-range to 0..255.

No-data policy (--sar-nodata): SAR pixels that are NaN or inf, equal to the no-data
value 0, or (--sar-units linear) not positive carry no backscatter. By default (`zero`)
they become 0, the release's no-data value, after one `warning:` line on stderr counting
them; `refuse` stops with an error instead. uint8 SAR is display-scaled and used as is.
Non-finite pixels of a float RGB image become 0 after a `warning:` line.

Float8 (--fp8, H100/H200; changes results): `on` runs the vision encoders' block GEMMs in
float8 with current scaling (bf16 compute); `static` first calibrates every float8 layer's
range on this tile's own model inputs, then runs with those ranges fixed. On one tile
`static` pays an extra bf16 pass, so it shows what static float8 does to a result; the
speed is for many tiles sharing one calibration (Segmenter.calibrate_fp8, or the DEF
stage's config.eval.fp8 = "static").

Errors (missing or unreadable file, corrupt or truncated image, RGB/SAR size mismatch,
wrong band count or dtype, empty or duplicate class names, a folder that is not an
MM-OVSeg model or misses parameters) print one line `error: ...` and exit with code 2
(--debug: the traceback). Outputs are written to temporary files and renamed into place
only once all of them are ready, so a failed run writes nothing.
"""

from __future__ import annotations

import argparse
import colorsys
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mmovseg_jax.cli import OneLineParser, UsageError, check_output, reading, with_one_line_errors, write_all
from mmovseg_jax.data import imageio

# Kelly's colours of maximum contrast (white and black left out), then golden-ratio hues.
PALETTE = np.array([
    (243, 195, 0), (135, 86, 146), (243, 132, 0), (161, 202, 241), (190, 0, 50), (194, 178, 128),
    (132, 132, 130), (0, 136, 86), (230, 143, 172), (0, 103, 165), (249, 147, 121), (96, 78, 151),
    (246, 166, 0), (179, 68, 108), (220, 211, 0), (136, 45, 23), (141, 182, 0), (101, 69, 34),
    (226, 88, 34), (43, 61, 38)], np.uint8)
OVERLAY_ALPHA = 0.5


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours: the fixed palette, then evenly spread hues."""
    extra = [tuple(round(255 * c) for c in colorsys.hsv_to_rgb((0.61803398875 * i) % 1.0, 0.75, 0.9))
             for i in range(max(0, n - len(PALETTE)))]
    return np.concatenate([PALETTE, np.array(extra, np.uint8).reshape(-1, 3)])[:n]


def parse_classes(text: str) -> list[str]:
    """"water, road,forest" -> ["water", "road", "forest"]; UsageError for empty/duplicate names."""
    names = [c.strip() for c in text.split(",")]
    if not any(names):
        raise UsageError("--classes: the class list is empty")
    if not all(names):
        raise UsageError(f"--classes: empty class name in {text!r}")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise UsageError(f"--classes: duplicate class names: {', '.join(dupes)}")
    return names


NODATA_POLICIES = ("zero", "refuse")
FP8_MODES = ("off", "on", "static")


def warn(message: str) -> None:
    """One `warning: ...` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 optical image; non-finite float pixels become 0 after a warning."""
    raw = imageio.read_image(path)
    if raw.ndim == 3 and np.issubdtype(raw.dtype, np.floating):
        bad = int((~np.isfinite(raw[..., :3]).all(axis=-1)).sum())
        if bad:
            warn(f"--rgb {path}: {bad} of {raw.shape[0] * raw.shape[1]} pixels are NaN or inf; they are set to 0")
    return imageio.to_uint8_rgb(raw, path)


def read_sar(path: Path, units: str, db_range: tuple[float, float], nodata: str = "zero") -> np.ndarray:
    """(H, W) uint8 SAR image. Non-uint8 pixels without backscatter (NaN, inf, the no-data
    value 0, linear <= 0) become 0 after a warning (nodata="zero") or raise ValueError
    naming the file and their count (nodata="refuse")."""
    if nodata not in NODATA_POLICIES:
        raise ValueError(f"--sar-nodata must be one of {', '.join(NODATA_POLICIES)}, got {nodata!r}")
    band = imageio.sar_single_band(imageio.read_image(path), path)
    image, valid = imageio.sar_to_uint8(band, path, db=units == "db", db_range=db_range)
    if band.dtype != np.uint8 and not valid.all():
        values = band[..., 0] if band.ndim == 3 else band
        nonfinite = int((~np.isfinite(values)).sum()) if np.issubdtype(values.dtype, np.floating) else 0
        missing = int((~valid).sum())
        what = (f"{missing} of {valid.size} pixels have no backscatter ({nonfinite} NaN/inf, "
                f"{missing - nonfinite} no-data: 0" + (" or <= 0 linear" if units == "linear" else "") + ")")
        if nodata == "refuse":
            raise ValueError(f"{path}: {what}; refused by --sar-nodata refuse")
        warn(f"--sar {path}: {what}; they are set to 0 (--sar-nodata refuse stops instead)")
    return image


def _font(size: int = 13):
    """DejaVu Sans where installed (wide glyph coverage), else Pillow's bundled font."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _label(draw, name: str, font) -> str:
    """The name, or an ASCII fallback if the font cannot draw it."""
    try:
        draw.textbbox((0, 0), name, font=font)
        return name
    except (UnicodeError, ValueError):
        return name.encode("ascii", "replace").decode()


def with_legend(image: np.ndarray, classes: Sequence[str], colours: np.ndarray):
    """(H, W, 3) uint8 -> PIL image: `image` at the top left, a legend panel (swatch +
    class name per class) on its right, white background."""
    from PIL import Image, ImageDraw

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [_label(probe, c, font) for c in classes]
    boxes = [probe.textbbox((0, 0), s, font=font) for s in labels]
    text_h = max(b[3] - b[1] for b in boxes)
    swatch, pad = max(12, text_h + 2), 8
    row = swatch + 4
    panel_w = pad + swatch + 6 + max(b[2] - b[0] for b in boxes) + pad
    panel_h = 2 * pad + row * len(classes)
    height, width = image.shape[:2]
    canvas = Image.new("RGB", (width + panel_w, max(height, panel_h)), (255, 255, 255))
    canvas.paste(Image.fromarray(image, "RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (name, box) in enumerate(zip(labels, boxes)):
        x, y = width + pad, pad + i * row
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(v) for v in colours[i]),
                       outline=(0, 0, 0))
        draw.text((x + swatch + 6, y + (swatch - (box[3] - box[1])) // 2 - box[1]), name, fill=(0, 0, 0),
                  font=font)
    return canvas


def overlay(rgb: np.ndarray, colour_mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8 blend: (1 - alpha) rgb + alpha mask."""
    blend = (1 - alpha) * rgb.astype(np.float32) + alpha * colour_mask.astype(np.float32)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def index_path(out: Path) -> Path:
    """<out stem>_index.png beside `out`."""
    return out.with_name(out.stem + "_index.png")


def _png_writer(image):
    return lambda f: image.save(f, format="PNG")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m mmovseg_jax.predict", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="MM-OVSeg model folder")
    p.add_argument("--rgb", required=True, type=Path, help="optical image (PNG/JPEG/GeoTIFF)")
    p.add_argument("--sar", type=Path, help="single-band SAR image (required by models with a SAR branch)")
    p.add_argument("--classes", required=True, help='comma-separated class names, e.g. "water,road,forest"')
    p.add_argument("--out", required=True, type=Path, help="colour mask PNG with legend")
    p.add_argument("--probabilities", type=Path, help="float32 (T, H, W) probabilities .npy")
    p.add_argument("--overlay", type=Path, help="mask blended over the RGB, PNG")
    p.add_argument("--sar-units", choices=("db", "linear"), default="db",
                   help="units of non-uint8 SAR values (default dB)")
    p.add_argument("--sar-db-range", type=float, nargs=2, default=imageio.DEFAULT_DB_RANGE,
                   metavar=("LOW", "HIGH"), help="dB range mapped to 0..255 (default -25 5)")
    p.add_argument("--sar-nodata", choices=NODATA_POLICIES, default="zero",
                   help="SAR pixels that are NaN/inf/no-data: set to 0 with a warning (zero, default) "
                        "or stop with an error (refuse)")
    p.add_argument("--overlap", type=float, default=1 / 3, help="sliding-window overlap (default 1/3)")
    p.add_argument("--no-global-view", action="store_true", help="no global view in the sliding window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per model call (default 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: the model's; bfloat16 with --fp8)")
    p.add_argument("--fp8", choices=FP8_MODES, default="off",
                   help="vision GEMMs in float8: off (default), on (current scaling) or static "
                        "(calibrated on this tile first); changes results")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> dict:
    """Reads, checks, segments and writes; returns a summary. UsageError / FileNotFoundError /
    ValueError for bad inputs, raised before anything is written."""
    classes = parse_classes(args.classes)
    if len(classes) > 256:
        raise UsageError(f"--classes: {len(classes)} classes, at most 256 fit the index PNG")
    if not 0 <= args.overlap < 1:
        raise UsageError(f"--overlap must lie in [0, 1), got {args.overlap}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.fp8 != "off" and args.dtype == "float32":
        raise UsageError(f"--fp8 {args.fp8} runs with bfloat16 compute: leave --dtype out or pass bfloat16")
    out = check_output(args.out, "--out", (".png",))
    targets = [out, index_path(out)]
    if args.probabilities:
        targets.append(check_output(args.probabilities, "--probabilities", (".npy",)))
    if args.overlay:
        targets.append(check_output(args.overlay, "--overlay", (".png",)))
    if len({t.resolve() for t in targets}) != len(targets):
        raise UsageError(f"output paths collide: {', '.join(map(str, targets))}")

    rgb = reading("--rgb", read_rgb, args.rgb)
    sar = None
    if args.sar is not None:
        sar = reading("--sar", read_sar, args.sar, args.sar_units, tuple(args.sar_db_range), args.sar_nodata)
        if sar.shape != rgb.shape[:2]:
            raise UsageError(f"--rgb {args.rgb} is {rgb.shape[0]}x{rgb.shape[1]} but --sar {args.sar} is "
                             f"{sar.shape[0]}x{sar.shape[1]}: the pair must have the same size")

    from mmovseg_jax.inference import Segmenter, argmax_index  # after the input checks: they need no JAX

    t0 = time.perf_counter()
    if not args.checkpoint.is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such folder")
    try:
        seg = Segmenter.load(args.checkpoint, dtype=args.dtype, fp8=args.fp8 != "off", overlap=args.overlap,
                             global_view=not args.no_global_view, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--checkpoint {e}") from e
    if seg.config.use_sar and sar is None:
        raise UsageError(f"--sar: the model in {args.checkpoint} has a SAR branch; pass the SAR image")
    if args.fp8 == "static":
        seg.calibrate_fp8([(rgb, sar if seg.config.use_sar else None)])
    t1 = time.perf_counter()

    probs = seg.probabilities(rgb, sar if seg.config.use_sar else None, classes)
    index = argmax_index(probs)
    t2 = time.perf_counter()

    from PIL import Image

    colours = palette(len(classes))
    colour_mask = colours[index]
    outputs = {out: _png_writer(with_legend(colour_mask, classes, colours)),
               index_path(out): _png_writer(Image.fromarray(index, "L"))}
    if args.probabilities:
        outputs[args.probabilities] = lambda f: np.save(f, probs.astype(np.float32))
    if args.overlay:
        outputs[args.overlay] = _png_writer(with_legend(overlay(rgb, colour_mask), classes, colours))
    write_all(outputs)
    return {"classes": classes, "size": rgb.shape[:2], "windows": seg.windows(*rgb.shape[:2]),
            "window": seg.image_size, "load_s": t1 - t0, "predict_s": t2 - t1,
            "sar_used": seg.config.use_sar, "written": list(outputs), "fp8": seg.fp8}


def _print_summary(s: dict) -> None:
    h, w = s["size"]
    print(f"classes: {', '.join(s['classes'])} ({len(s['classes'])})")
    print(f"tile: {h}x{w}, {s['windows']} model input(s) of {s['window']}x{s['window']}"
          + ("" if s["sar_used"] else ", RGB only") + ("" if s["fp8"] == "off" else f", float8 {s['fp8']}"))
    print(f"seconds: load{' and calibrate' if s['fp8'] == 'static' else ''} {s['load_s']:.1f}, "
          f"predict {s['predict_s']:.1f}")
    print("wrote: " + ", ".join(map(str, s["written"])))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return with_one_line_errors(argv, lambda: _print_summary(run(build_parser().parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
