"""Make a cloudy copy of a folder of optical images, reproducibly (synthetic clouds).

    python -m data.make_cloudy --src DIR --out DIR --preset thin [--preset big ...] [--seed 0] \\
        [--opacity-maps] [--shadows] [--ext png]
    python -m data.make_cloudy --layout oem --variant thick|thin --src OEM_SAR_ROOT --out OUT [--ext png]

Every PNG/JPEG/TIFF in SRC (not recursive, hidden files skipped) becomes OUT/<same name>
(the extension replaced by --ext if given), clouded by `mmovseg_jax.data.clouds.add_clouds_uint8`.
Optical that is not uint8 is stretched to uint8 first (`imageio.to_uint8_rgb`); GeoTIFF
georeferencing tags are not copied.

Reproducibility: image NAME (its source file name) gets the key
fold_in(fold_in(jax.random.key(seed), w0), w1), w0, w1 = the first two little-endian
uint32 words of sha256(NAME); split(key) = (k_preset, k_cloud); its preset is
presets[randint(k_preset, 0, len(presets))] and its clouds are drawn with k_cloud. The
output of a file thus depends only on (seed, its name, the presets, --shadows), not on the
file order or on which other files are processed.

OUT/clouds.json records the parameters (seed, preset names and every CloudParams field,
--shadows, --ext, the resolved source folder, tool version) and each written file's preset.
--opacity-maps writes OUT/opacity/<stem>.png, the band-mean cloud opacity as 8-bit grey
(0..255 = opacity 0..1). Resuming: a rerun skips outputs that already exist (and their
opacity map, when asked for) and refuses to run if OUT/clouds.json records different
parameters. Each file is written to a hidden temporary name and renamed into place.
Progress (done/total, images/s, ETA) goes to stderr. Errors (missing folder, unreadable
image, ...) print one line `error: ...` and exit with code 2 (--debug: the traceback).

OEM-thick / OEM-thin (REFERENCE.md sections 3-4; the authors did not publish their cloud
parameters, so these are approximations): `--layout oem` reads ROOT/{train,val}/rgb_images
of clear OpenEarthMap-SAR (splits without rgb_images are skipped) and writes the
prepared-copy folders OUT/{train,val}/rgb_cloud (`--variant thick`: presets big + local,
one drawn per image) or OUT/{train,val}/rgb_cloud_thin (`--variant thin`: preset thin);
--preset overrides the variant's presets. Only the optical folders are made:

    python -m data.make_cloudy --layout oem --variant thick --src /data/OpenEarthMap-SAR --out /data/MM-OVSeg/OEM --ext png
    python -m data.make_cloudy --layout oem --variant thin  --src /data/OpenEarthMap-SAR --out /data/MM-OVSeg/OEM --ext png
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence, TextIO

import numpy as np

from mmovseg_jax.cli import OneLineParser, Progress, UsageError
from mmovseg_jax.data.imageio import IMAGE_EXTENSIONS, read_image, to_uint8_rgb

TOOL = "data.make_cloudy"
TOOL_VERSION = 1
META_NAME = "clouds.json"
OPACITY_DIR = "opacity"
PRESET_NAMES = ("thin", "big", "local", "fog", "wide")  # mmovseg_jax.data.clouds.PRESETS
OEM_SPLITS = ("train", "val")
OEM_VARIANTS = {"thick": ("rgb_cloud", ("big", "local")), "thin": ("rgb_cloud_thin", ("thin",))}
KEY_DERIVATION = ("fold_in(fold_in(jax.random.key(seed), w0), w1), (w0, w1) = first two little-endian uint32 of "
                  "sha256(source file name); (k_preset, k_cloud) = split(key); preset = presets[randint(k_preset, 0, "
                  "len(presets))]; image = add_clouds_uint8(k_cloud, rgb, params)")
# Fields compared on a rerun: a difference changes the output bytes.
COMPARED = ("tool", "version", "seed", "presets", "params", "shadows", "ext", "source")


# ----------------------------------------------------------------------------- pieces

def list_images(src: Path) -> list[Path]:
    """The optical images of `src` (PNG/JPEG/TIFF, not hidden), sorted by name."""
    if not src.is_dir():
        raise UsageError(f"--src {src}: no such folder")
    files = sorted(p for p in src.iterdir()
                   if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UsageError(f"--src {src}: no PNG/JPEG/TIFF images in it")
    return files


def normalise_ext(ext: str | None) -> str | None:
    if ext is None:
        return None
    ext = ext.lower() if ext.startswith(".") else "." + ext.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise UsageError(f"--ext {ext!r}: unsupported (known: {', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    return ext


def image_key(seed: int, name: str):
    """The PRNG key of the source file `name` (see the module docstring)."""
    import jax

    digest = hashlib.sha256(name.encode("utf-8")).digest()
    key = jax.random.key(seed)
    for k in range(2):
        key = jax.random.fold_in(key, int.from_bytes(digest[4 * k: 4 * k + 4], "little"))
    return key


def draw(seed: int, name: str, presets: Sequence[str]):
    """(preset name, cloud key) of the source file `name`."""
    import jax

    k_preset, k_cloud = jax.random.split(image_key(seed, name))
    index = int(jax.random.randint(k_preset, (), 0, len(presets)))
    return presets[index], k_cloud


def build_params(presets: Sequence[str], shadows: bool) -> dict:
    """Preset name -> CloudParams (with shadows switched on if asked)."""
    from mmovseg_jax.data.clouds import PRESETS

    out = {}
    for name in presets:
        if name not in PRESETS:
            raise UsageError(f"--preset {name!r}: unknown (known: {', '.join(PRESETS)})")
        params = PRESETS[name]
        out[name] = dataclasses.replace(params, shadows=True) if shadows else params
    return out


def settings(*, seed: int, presets: Sequence[str], params: dict, shadows: bool, ext: str | None, src: Path) -> dict:
    """The recorded parameters, as they read back from JSON (tuples become lists)."""
    record = {"tool": TOOL, "version": TOOL_VERSION, "seed": seed, "presets": list(presets),
              "params": {name: dataclasses.asdict(p) for name, p in params.items()}, "shadows": shadows,
              "ext": ext, "source": str(src.resolve()), "key": KEY_DERIVATION}
    return json.loads(json.dumps(record))


def _write_atomic(path: Path, writer: Callable) -> None:
    """writer(binary file object) into a hidden temporary file beside `path`, then renamed to `path`."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            writer(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_image(array: np.ndarray, path: Path) -> None:
    """(H, W[, 3]) uint8 saved by `path`'s extension (PNG, JPEG quality 95, TIFF)."""
    ext = path.suffix.lower()
    if ext in (".tif", ".tiff"):
        import tifffile

        photometric = "rgb" if array.ndim == 3 else "minisblack"
        _write_atomic(path, lambda f: tifffile.imwrite(f, array, photometric=photometric))
        return
    from PIL import Image

    image = Image.fromarray(array)
    if ext == ".png":
        _write_atomic(path, lambda f: image.save(f, format="PNG"))
    else:
        _write_atomic(path, lambda f: image.save(f, format="JPEG", quality=95))


def write_json(path: Path, record: dict) -> None:
    text = json.dumps(record, indent=1, sort_keys=False) + "\n"
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_meta(meta_path: Path, new: dict) -> dict:
    """Files recorded by an earlier run with the same parameters ({} if none); UsageError if they differ."""
    try:
        old = json.loads(meta_path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{meta_path}: cannot be read ({type(e).__name__}: {e}); remove it or choose another --out")
    if not isinstance(old, dict) or old.get("tool") != TOOL:
        raise UsageError(f"{meta_path}: not written by {TOOL}; choose another --out")
    diffs = [f"{k}: recorded {_short(old.get(k))}, now {_short(new[k])}" for k in COMPARED
             if old.get(k) != new[k] and not (k == "params" and old.get("presets") != new["presets"])]
    if old.get("presets") == new["presets"] and isinstance(old.get("params"), dict) and old["params"] != new["params"]:
        diffs = [d for d in diffs if not d.startswith("params:")]
        for name, fields in new["params"].items():  # name the fields that differ
            was = old["params"].get(name)
            was = was if isinstance(was, dict) else {}
            diffs += [f"params.{name}.{f}: recorded {_short(was.get(f))}, now {_short(v)}"
                      for f, v in fields.items() if was.get(f) != v]
    if diffs:
        raise UsageError(f"{meta_path} records different parameters ({'; '.join(diffs)}); "
                         "rerun with the recorded ones or choose another --out")
    files = old.get("files", {})
    return dict(files) if isinstance(files, dict) else {}


# ----------------------------------------------------------------------------- the run

def make_cloudy(src: str | os.PathLike, out: str | os.PathLike, presets: Sequence[str], *, seed: int = 0,
                opacity_maps: bool = False, shadows: bool = False, ext: str | None = None,
                stream: TextIO | None = None, every: float = 1.0, label: str = "make_cloudy") -> dict:
    """Clouds every image of `src` into `out` (see the module docstring); returns counts.

    Raises UsageError (bad arguments, parameters differing from OUT/clouds.json, outputs
    already there without a record) before writing anything, and ValueError /
    FileNotFoundError / OSError naming the file when an image cannot be read or written
    (what was written so far stays and is recorded: a rerun resumes).
    """
    from mmovseg_jax.data.clouds import add_clouds_uint8

    stream = sys.stderr if stream is None else stream
    src, out = Path(src), Path(out)
    if not presets:
        raise UsageError("give at least one --preset")
    if len(set(presets)) != len(presets):
        raise UsageError(f"--preset repeated: {', '.join(presets)}")
    if not 0 <= seed < 2 ** 32:
        raise UsageError(f"--seed must be in 0..2**32-1, got {seed}")
    ext = normalise_ext(ext)
    params = build_params(presets, shadows)
    files = list_images(src)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.resolve() == src.resolve():
        raise UsageError(f"--out {out}: is the source folder (the originals would be overwritten)")

    targets: dict[str, str] = {}  # output path (image or opacity map) -> source name, for collisions
    jobs = []
    for path in files:
        image_out = out / (path.name if ext is None else path.stem + ext)
        opacity_out = out / OPACITY_DIR / f"{path.stem}.png" if opacity_maps else None
        for t in (image_out, opacity_out):
            if t is None:
                continue
            if str(t) in targets:
                raise UsageError(f"--src {src}: {targets[str(t)]} and {path.name} would both be written to {t}")
            targets[str(t)] = path.name
        jobs.append((path, image_out, opacity_out))

    record = settings(seed=seed, presets=presets, params=params, shadows=shadows, ext=ext, src=src)
    meta_path = out / META_NAME
    if meta_path.exists():
        done_files = check_meta(meta_path, record)
        old_maps = bool(json.loads(meta_path.read_text("utf-8")).get("opacity_maps", False))
    else:
        there = [j[1].name for j in jobs if j[1].exists()]
        if there:
            raise UsageError(f"--out {out}: already holds {len(there)} of the outputs ({', '.join(there[:3])}"
                             f"{', ...' if len(there) > 3 else ''}) but no {META_NAME}; remove them or choose "
                             "another --out")
        done_files, old_maps = {}, False
    record["opacity_maps"] = old_maps or opacity_maps

    import jax

    out.mkdir(parents=True, exist_ok=True)
    if opacity_maps:
        (out / OPACITY_DIR).mkdir(exist_ok=True)
    record["jax"] = {"version": jax.__version__, "backend": jax.default_backend()}  # informational
    record["files"] = done_files

    def save() -> None:
        record["files"] = dict(sorted(done_files.items()))
        write_json(meta_path, record)

    save()  # parameters are recorded before the first image is written
    print(f"{label}: {len(jobs)} images from {src} -> {out}, presets {', '.join(presets)}, seed {seed}",
          file=stream, flush=True)
    progress = Progress(len(jobs), stream, every, label, unit="images")
    made = skipped = 0
    last_save = time.monotonic()
    try:
        for i, (path, image_out, opacity_out) in enumerate(jobs):
            preset, key = draw(seed, path.name, presets)
            if image_out.exists() and (opacity_out is None or opacity_out.exists()):
                skipped += 1
            else:
                rgb = to_uint8_rgb(read_image(path), path)
                cloudy, alpha = add_clouds_uint8(key, rgb, params[preset])
                write_image(np.asarray(cloudy), image_out)
                if opacity_out is not None:
                    mean = np.asarray(alpha, np.float32).mean(axis=-1)
                    write_image(np.rint(np.clip(mean, 0.0, 1.0) * 255.0).astype(np.uint8), opacity_out)
                made += 1
            done_files[path.name] = {"output": image_out.name, "preset": preset}
            progress.update(i + 1, made)
            if time.monotonic() - last_save > 10.0:
                save()
                last_save = time.monotonic()
    finally:
        save()
    return {"images": len(jobs), "written": made, "skipped": skipped, "out": out}


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m data.make_cloudy", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path, help="folder of clear optical images (--layout oem: the "
                                                           "OpenEarthMap-SAR root holding {train,val}/rgb_images)")
    p.add_argument("--out", required=True, type=Path, help="output folder (--layout oem: the OEM prepared-copy root)")
    p.add_argument("--preset", action="append", type=str.lower, choices=PRESET_NAMES,
                   help="cloud preset; repeat to draw one per image (required unless --layout oem)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--opacity-maps", action="store_true", help=f"also write {OPACITY_DIR}/<stem>.png opacity maps")
    p.add_argument("--shadows", action="store_true", help="add cloud shadows")
    p.add_argument("--ext", help="output format by extension (png, jpg, tif); default: the source's")
    p.add_argument("--layout", choices=("oem",), help="oem: ROOT/{train,val}/rgb_images -> OUT/{train,val}/"
                                                      "rgb_cloud (thick) or rgb_cloud_thin (thin)")
    p.add_argument("--variant", choices=tuple(OEM_VARIANTS), help="--layout oem: thick (big+local) or thin")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace, stream: TextIO) -> list[dict]:
    options = dict(seed=args.seed, opacity_maps=args.opacity_maps, shadows=args.shadows, ext=args.ext, stream=stream)
    if args.layout is None:
        if args.variant:
            raise UsageError("--variant needs --layout oem")
        if not args.preset:
            raise UsageError("give at least one --preset (thin, big, local, fog, wide)")
        return [make_cloudy(args.src, args.out, args.preset, **options)]
    if not args.variant:
        raise UsageError("--layout oem needs --variant thick or thin")
    folder, default_presets = OEM_VARIANTS[args.variant]
    presets = args.preset or list(default_presets)
    if not args.src.is_dir():
        raise UsageError(f"--src {args.src}: no such folder")
    splits = [s for s in OEM_SPLITS if (args.src / s / "rgb_images").is_dir()]
    if not splits:
        raise UsageError(f"--src {args.src}: no {'/ '.join(OEM_SPLITS)} split with an rgb_images folder")
    for s in OEM_SPLITS:
        if s not in splits:
            print(f"make_cloudy: no {args.src / s / 'rgb_images'}, split {s} skipped", file=stream, flush=True)
    return [make_cloudy(args.src / s / "rgb_images", args.out / s / folder, presets, label=s, **options)
            for s in splits]


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    stream = sys.stderr if stream is None else stream
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        results = run(build_parser().parse_args(argv), stream)
    except (UsageError, ValueError, OSError) as e:  # OSError: missing / unwritable files
        if "--debug" in argv:
            raise
        message = " ".join(str(e).split()).strip() or type(e).__name__
        print(f"error: {message}", file=stream, flush=True)
        return 2
    for r in results:
        print(f"make_cloudy: {r['out']}: wrote {r['written']}, skipped {r['skipped']} already there "
              f"({r['images']} images); parameters in {Path(r['out']) / META_NAME}", file=stream, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
