"""Reading optical / SAR image files into numpy, and mapping them to the canonical uint8 record.

Conventions (shared by every reader in `layouts`):

- `read_image` returns the file's own dtype: (H, W) for one band, (H, W, bands) otherwise.
  GeoTIFFs stored band-sequential (planar "separate", GDAL's INTERLEAVE=BAND) are moved to
  bands-last. LZW/JPEG-compressed TIFFs need the optional `imagecodecs` package.
- Optical to uint8 (`to_uint8_rgb`): uint8 is kept as is; any other dtype is stretched per
  image, jointly over the three bands, from its 2nd to its 98th percentile to 0..255.
  Pixels that are zero in every band or non-finite are no-data: they are left out of the
  percentiles and come out as 0.
- SAR to uint8 (`sar_to_uint8`): uint8 is kept as is (already display-scaled, as the
  authors' PNGs). Other dtypes are backscatter: linear intensity (`db=False`) is converted
  with 10 log10(x) (x <= 0 is no-data); dB values are clipped to `db_range` (default
  -25..5 dB, calibrated sigma0 of C/X-band sensors) and scaled linearly to 0..255.
  `valid` is False on no-data, NaN and inf; those pixels are 0 in the image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike

TIFF_EXTENSIONS = (".tif", ".tiff")
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGE_EXTENSIONS = TIFF_EXTENSIONS + PIL_EXTENSIONS

DEFAULT_DB_RANGE = (-25.0, 5.0)
RGB_PERCENTILES = (2.0, 98.0)

# PIL modes whose samples are not RGB(A) or plain values; converted to RGB on read.
_PIL_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")


def read_image(path: PathLike) -> np.ndarray:
    """GeoTIFF / PNG / JPEG -> (H, W) or (H, W, bands) array of the file's dtype.

    Raises FileNotFoundError for a missing file, ValueError naming the file for an
    unsupported extension or a file the library cannot decode (corrupt, truncated).
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"{path}: unsupported image extension {path.suffix!r} (known: {', '.join(IMAGE_EXTENSIONS)})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        return _read_tiff(path) if ext in TIFF_EXTENSIONS else _read_pil(path)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as e:  # the libraries raise many types (TiffFileError, OSError, KeyError, struct.error, ...)
        reason = f"{type(e).__name__}: {e}"
        raise ValueError(f"{path}: cannot be read as an image ({reason})") from e


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        array, axes = series.asarray(), series.axes
    while array.ndim > 3 and array.shape[0] == 1:
        array, axes = array[0], axes[1:]
    if array.ndim == 3 and axes.endswith("YX"):  # band-sequential (planar separate or one band per page)
        array = np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D raster, got shape {array.shape} (axes {axes})")
    return np.ascontiguousarray(array)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in _PIL_TO_RGB:
            im = im.convert("RGB")
        return np.array(im)


def to_uint8_rgb(array: np.ndarray, path: PathLike, *, percentiles: tuple[float, float] = RGB_PERCENTILES
                 ) -> np.ndarray:
    """(H, W, 3|4) optical image -> (H, W, 3) uint8; a 4th band (alpha/NIR) is dropped.

    uint8 is returned as is; other dtypes get the joint per-image percentile stretch
    described in the module docstring. `path` only names the file in errors.
    """
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"{path}: optical image must have 3 or 4 bands, got shape {array.shape}")
    rgb = array[..., :3]
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if not (np.issubdtype(rgb.dtype, np.integer) or np.issubdtype(rgb.dtype, np.floating)):
        raise ValueError(f"{path}: unsupported optical dtype {rgb.dtype}")
    return _percentile_stretch(rgb.astype(np.float64), percentiles)


def _percentile_stretch(rgb: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """(H, W, 3) float -> uint8, [p_lo, p_hi] of the data pixels mapped to [0, 255]."""
    finite = np.isfinite(rgb).all(axis=-1)
    data = finite & (rgb != 0).any(axis=-1)
    out = np.zeros(rgb.shape, np.uint8)
    if not data.any():
        return out
    lo, hi = np.percentile(rgb[data], percentiles)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    stretched = np.clip((rgb[finite] - lo) * scale, 0.0, 255.0)
    out[finite] = np.rint(stretched).astype(np.uint8)
    return out


def sar_to_uint8(array: np.ndarray, path: PathLike, *, db: bool, db_range: tuple[float, float] = DEFAULT_DB_RANGE,
                 nodata: float | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) or (H, W, 1) SAR band -> ((H, W) uint8 image, (H, W) bool valid).

    db: the values are dB (True) or linear intensity (False, converted with 10 log10).
    db_range: (low, high) dB mapped to 0 and 255; values outside are clipped.
    nodata: value marking no-data pixels (compared before any conversion), None for none.
    uint8 input is kept as is (only `nodata` applies). `path` only names the file in errors.
    """
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"{path}: SAR band must be 2-D (H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        valid = array != nodata if nodata is not None else np.ones(array.shape, bool)
        return np.ascontiguousarray(array), valid
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{path}: unsupported SAR dtype {array.dtype}")
    low, high = map(float, db_range)
    if not high > low:
        raise ValueError(f"db_range must be (low, high) with high > low, got {db_range}")
    values = array.astype(np.float64)
    valid = np.isfinite(values)
    if nodata is not None:
        valid &= values != nodata
    if not db:
        valid &= values > 0
        values = 10.0 * np.log10(np.where(valid, values, 1.0))
    scaled = (np.clip(values, low, high) - low) * (255.0 / (high - low))
    image = np.where(valid, np.rint(np.nan_to_num(scaled)), 0.0).astype(np.uint8)
    return image, valid


def sar_single_band(array: np.ndarray, path: PathLike, *, grey_tolerance: int = 8) -> np.ndarray:
    """SAR file read as (H, W), (H, W, 1) or grey (H, W, 3|4) -> (H, W).

    A 3/4-band file is a grey image saved as RGB(A): its first three bands must agree to
    within `grey_tolerance` (JPEG rounding), and their rounded mean is returned (equal to
    the band itself when they are identical). Colour SAR composites raise ValueError.
    """
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[2] == 1:
        return array[..., 0]
    if array.ndim == 3 and array.shape[2] in (3, 4) and np.issubdtype(array.dtype, np.integer):
        bands = array[..., :3].astype(np.int64)
        spread = int((bands.max(axis=-1) - bands.min(axis=-1)).max(initial=0))
        if spread <= grey_tolerance:
            return np.rint(bands.mean(axis=-1)).astype(array.dtype)
    raise ValueError(f"{path}: expected a single-band SAR image, got shape {array.shape}"
                     + (" with differing colour bands" if array.ndim == 3 else ""))


def to_label(array: np.ndarray, path: PathLike) -> np.ndarray:
    """(H, W) integer label map (255 = ignore) -> (H, W) uint8; values above 255 are an error."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"{path}: label must be single-channel (H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise ValueError(f"{path}: label must hold integers, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{path}: label values must be 0..255, got {array.min()}..{array.max()}")
    return array.astype(np.uint8)
