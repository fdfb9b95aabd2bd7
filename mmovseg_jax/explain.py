"""Where does a prompt match? Similarity heatmaps of an MM-OVSeg model over one tile
(the paper's Figure 5 view).

    python -m mmovseg_jax.explain --model MODEL_DIR --rgb tile.tif --sar tile_sar.tif \\
        --prompt forest [--prompt water ...] --out fig.png [--classes "water,road,forest"] \\
        [--size 2.5] [--dpi 100] [--cmap jet] [--debug]

One figure row per prompt, columns RGB | SAR | CLIP | fused DINO | final:
  CLIP        cosine similarity of the CLIP dense patch embeddings with the prompt's
              text embedding (the head's CLIP cost map, on the CLIP grid G x G)
  fused DINO  cosine similarity of the fused DINO level (RGB + SAR level-12 maps
              projected to the CLIP grid and added) with the same text embedding
              (the head's DINO cost map; RGB only for models without a SAR branch)
  final       the model's sigmoid probability for the prompt, with the --classes list
              as the other classes of the forward (classes attend to each other in the
              head); default: the prompts themselves; prompts missing from --classes
              are appended to it
With several prompt templates the cosines are averaged over the templates. Every map is
resized bilinearly (half-pixel centres) to the tile size. The CLIP and DINO maps come from
the tile resized to the model input S x S (for tiles larger than S this is one global
view); the final map is exactly what `inference.Segmenter.probabilities` gives (a sliding
window for tiles larger than S).

Writes --out (PNG, colour bars beside the heatmaps) and <out>.npz beside it: `clip`,
`dino`, `final` (P, H, W) float32 for the P prompts, `prompts` and `classes` (strings).
Bad input (a missing or unreadable file, an empty or duplicate prompt, RGB/SAR of
different sizes, an output folder that is missing or not writable, a folder that is not a
model) prints one line `error: ...` and exits with code 2, writing nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmovseg_jax.cli import OneLineParser, UsageError, check_output, reading, with_one_line_errors, write_all
from mmovseg_jax.data import imageio, preprocess
from mmovseg_jax.models import def_head, mmovseg
from mmovseg_jax.ops.resize import resize_bilinear
from mmovseg_jax.predict import parse_classes, read_rgb, read_sar

COLUMNS = ("RGB", "SAR", "CLIP", "fused DINO", "final")


def model_input(pixels: np.ndarray, size: int) -> jax.Array:
    """(H, W, 3) 0-255 pixels -> (1, size, size, 3) CLIP-normalised (normalise, then
    resize bilinearly with half-pixel centres), as `inference.Segmenter` does."""
    x = preprocess.normalize(jnp.asarray(pixels)[None])
    if x.shape[1:3] != (size, size):
        x = resize_bilinear(x, (size, size), align_corners=False, axes=(1, 2))
    return x


@nnx.jit
def cost_maps(model: mmovseg.Model, rgb: jax.Array, sar: jax.Array | None,
              text: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The head's two cost maps before aggregation, averaged over prompt templates.

    rgb, sar: (B, S, S, 3) CLIP-normalised model inputs (sar None without a SAR branch);
    text: (T, P, E) from `Model.encode_text`. -> (clip, dino), each (B, T, G, G) float32
    cosine similarities in [-1, 1] on the CLIP grid G (CLIP sees the tile as
    `Model.clip_input` resizes it; the fused DINO cost level is the sum of the RGB and SAR
    level projections, as `Model.logits` computes it).
    """
    b, g = rgb.shape[0], model.config.clip_grid
    vision, rgb_maps, sar_maps = model.encode_images(rgb, sar)  # what Model.logits reads
    clip_features = vision.dense[:, 1:].reshape(b, g, g, -1)
    dino = model.rgb_levels(rgb_maps)[2]
    if sar_maps is not None:
        dino = dino + model.sar_levels(sar_maps)[2]
    return (def_head.cosine_cost(clip_features, text).mean(-1),
            def_head.cosine_cost(dino, text).mean(-1))


def explain(segmenter, rgb: np.ndarray, sar: np.ndarray | None, prompts: Sequence[str],
            classes: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Heatmaps of each prompt over one tile.

    segmenter: an `inference.Segmenter`; rgb (H, W, 3), sar (H, W) uint8 (None without a
    SAR branch); classes: the class list of the final forward (default: the prompts;
    prompts missing from it are appended). -> {"clip", "dino", "final": (P, H, W) float32,
    "classes": the class list used}.
    """
    prompts = list(prompts)
    context = list(classes or []) + [p for p in prompts if p not in (classes or [])]
    height, width = rgb.shape[:2]
    size = segmenter.image_size
    final_all = segmenter.probabilities(rgb, sar, context)  # checks the pair; (T, H, W)
    final = final_all[[context.index(p) for p in prompts]]
    text = segmenter.text(prompts)
    sar_in = None
    if segmenter.config.use_sar:
        sar_in = model_input(np.repeat(np.asarray(sar)[..., None], 3, axis=-1), size)
    clip_map, dino_map = cost_maps(segmenter.model, model_input(rgb, size), sar_in, text)
    up = lambda m: np.asarray(resize_bilinear(np.asarray(m[0], np.float32), (height, width), axes=(1, 2)))
    return {"clip": up(clip_map), "dino": up(dino_map), "final": np.asarray(final, np.float32),
            "classes": context}


def figure_png(rgb: np.ndarray, sar: np.ndarray | None, prompts: Sequence[str], maps: dict[str, np.ndarray],
               panel_inches: float = 2.5, dpi: int = 100, cmap: str = "jet", dino_label: str = "fused DINO") -> bytes:
    """The figure as PNG bytes: one row per prompt, columns RGB | SAR | CLIP | DINO | final,
    each heatmap with its colour bar (CLIP and DINO: cosine, own range; final: 0..1)."""
    from matplotlib.figure import Figure

    rows = len(prompts)
    height, width = rgb.shape[:2]
    aspect = height / width
    fig = Figure(figsize=(5 * panel_inches * 1.2, rows * panel_inches * aspect + 0.6), dpi=dpi,
                 layout="constrained")
    axes = np.asarray(fig.subplots(rows, 5, squeeze=False))
    titles = ("RGB", "SAR", "CLIP (cosine)", f"{dino_label} (cosine)", "final (probability)")
    for i, prompt in enumerate(prompts):
        row = axes[i]
        row[0].imshow(rgb)
        if sar is None:
            row[1].text(0.5, 0.5, "no SAR branch", ha="center", va="center", transform=row[1].transAxes)
        else:
            row[1].imshow(sar, cmap="gray", vmin=0, vmax=255)
        for ax, key in zip(row[2:], ("clip", "dino", "final")):
            limits = {"vmin": 0.0, "vmax": 1.0} if key == "final" else {}
            image = ax.imshow(maps[key][i], cmap=cmap, **limits)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        row[0].set_ylabel(prompt, fontsize=12)
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def npz_path(out: Path) -> Path:
    """<out stem>.npz beside `out`."""
    return out.with_suffix(".npz")


def parse_prompts(prompts: Sequence[str]) -> list[str]:
    """Stripped prompts; UsageError for an empty or duplicate one."""
    names = [p.strip() for p in prompts]
    if any(not p for p in names):
        raise UsageError(f"--prompt: empty prompt in {list(prompts)!r}")
    dupes = sorted({p for p in names if names.count(p) > 1})
    if dupes:
        raise UsageError(f"--prompt: duplicate prompts: {', '.join(dupes)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m mmovseg_jax.explain", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="MM-OVSeg model folder")
    p.add_argument("--rgb", required=True, type=Path, help="optical image (PNG/JPEG/GeoTIFF)")
    p.add_argument("--sar", type=Path, help="single-band SAR image (required by models with a SAR branch)")
    p.add_argument("--prompt", required=True, action="append", help="a class name to explain; repeatable")
    p.add_argument("--classes", help="comma-separated class list of the final panel's forward "
                                     "(default: the prompts)")
    p.add_argument("--out", required=True, type=Path, help="figure PNG; the maps go to <out>.npz beside it")
    p.add_argument("--size", type=float, default=2.5, help="side of one panel in inches (default 2.5)")
    p.add_argument("--dpi", type=int, default=100, help="figure resolution (default 100)")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map of the heatmaps (default jet)")
    p.add_argument("--sar-units", choices=("db", "linear"), default="db",
                   help="units of non-uint8 SAR values (default dB)")
    p.add_argument("--sar-db-range", type=float, nargs=2, default=imageio.DEFAULT_DB_RANGE,
                   metavar=("LOW", "HIGH"), help="dB range mapped to 0..255 (default -25 5)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the model's)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> dict:
    """Reads, checks, explains and writes; returns a summary. Bad inputs raise UsageError /
    FileNotFoundError / ValueError before anything is written."""
    from matplotlib import colormaps

    from mmovseg_jax.inference import Segmenter

    prompts = parse_prompts(args.prompt)
    classes = parse_classes(args.classes) if args.classes is not None else None
    if not args.size > 0 or not np.isfinite(args.size):
        raise UsageError(f"--size must be a positive number of inches, got {args.size}")
    if not 10 <= args.dpi <= 1000:
        raise UsageError(f"--dpi must lie in [10, 1000], got {args.dpi}")
    if args.cmap not in colormaps:
        raise UsageError(f"--cmap {args.cmap!r}: not a matplotlib colour map (e.g. jet, viridis, magma)")
    out = check_output(args.out, "--out", (".png",))
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: folder {out.parent} is not writable")
    maps_path = npz_path(out)
    if maps_path.is_dir():
        raise UsageError(f"--out {out}: {maps_path} is a folder")

    rgb = reading("--rgb", read_rgb, args.rgb)
    sar = None
    if args.sar is not None:
        sar = reading("--sar", read_sar, args.sar, args.sar_units, tuple(args.sar_db_range))
        if sar.shape != rgb.shape[:2]:
            raise UsageError(f"--rgb {args.rgb} is {rgb.shape[0]}x{rgb.shape[1]} but --sar {args.sar} is "
                             f"{sar.shape[0]}x{sar.shape[1]}: the pair must have the same size")

    t0 = time.perf_counter()
    if not args.model.is_dir():
        raise UsageError(f"--model {args.model}: no such folder")
    try:
        seg = Segmenter.load(args.model, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model {e}") from e
    if seg.config.use_sar and sar is None:
        raise UsageError(f"--sar: the model in {args.model} has a SAR branch; pass the SAR image")
    sar = sar if seg.config.use_sar else None
    t1 = time.perf_counter()

    maps = explain(seg, rgb, sar, prompts, classes)
    t2 = time.perf_counter()
    png = figure_png(rgb, sar, prompts, maps, panel_inches=args.size, dpi=args.dpi, cmap=args.cmap,
                     dino_label="fused DINO" if seg.config.use_sar else "DINO, RGB only")
    arrays = {k: maps[k].astype(np.float32) for k in ("clip", "dino", "final")}
    arrays.update(prompts=np.asarray(prompts, dtype=str), classes=np.asarray(maps["classes"], dtype=str))
    write_all({out: lambda f: f.write(png), maps_path: lambda f: np.savez(f, **arrays)})
    return {"prompts": prompts, "classes": maps["classes"], "size": rgb.shape[:2], "load_s": t1 - t0,
            "explain_s": t2 - t1, "written": [out, maps_path]}


def _print_summary(s: dict) -> None:
    h, w = s["size"]
    print(f"prompts: {', '.join(s['prompts'])}; final panel with classes: {', '.join(s['classes'])}")
    print(f"tile: {h}x{w}; seconds: load {s['load_s']:.1f}, explain {s['explain_s']:.1f}")
    print("wrote: " + ", ".join(map(str, s["written"])))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return with_one_line_errors(argv, lambda: _print_summary(run(build_parser().parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
