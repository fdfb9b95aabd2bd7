"""Deterministic synthetic co-registered optical (RGB) + SAR scenes with land-cover labels.

Rendering model, per scene (all randomness from ``np.random.default_rng(seed)``):

* **Layout.** Smooth multi-scale value noise fields decide where things go. A rotated
  grid of rectangular fields (farmland, some bare soil) covers the tile; forest patches
  follow a noise field; lakes are the lowest part of an "elevation" noise, optionally
  with a meandering river; city blocks (a rotated street grid whose streets are roads,
  each block holding 1-4 rectangular buildings) sit where an "urban" noise is high;
  straight main roads cross the scene. Class shares, scales, angles and colours are
  drawn per scene, so scenes differ widely.
* **Optical.** Per-class colours with texture: dark blue-green smooth water, dark
  textured green forest, farmland fields in varied greens/yellows/browns with row
  stripes and darker field boundaries, tan bare soil, grey city ground with bright
  varied roofs and sun shadows, grey roads; then a scene gain/colour cast/haze and
  per-pixel Gaussian noise.
* **SAR.** Per-class backscatter in dB: water dark and smooth, city bright with
  strong point scatterers, bright double-bounce lines at sensor-facing building walls
  and radar shadows behind them, forest medium with volume texture, farmland
  medium-low varying per field with its crop, bare soil low-medium, roads dark. Multiplicative
  ``SAR_LOOKS``-look speckle (Gamma(L, 1/L) intensity) is applied, and the dB image is
  mapped linearly from ``SAR_DB_RANGE`` to uint8 (``sar_uint8_to_intensity`` inverts it).
"""

from __future__ import annotations

import functools
import math

import numpy as np

CLASSES = ("water", "forest", "city", "road", "farmland", "bare soil")
WATER, FOREST, CITY, ROAD, FARMLAND, BARE = range(len(CLASSES))

SAR_LOOKS = 4
SAR_DB_RANGE = (-35.0, 10.0)

# Optical palettes (RGB, 0-255).
_CROP_COLOURS = np.array([
    (95, 140, 60),    # young green crop
    (70, 115, 45),    # dense green crop
    (190, 175, 95),   # ripe yellow
    (170, 150, 100),  # stubble
    (120, 95, 70),    # ploughed brown
    (140, 160, 90),   # pale green
], np.float32)
# Mean backscatter (dB) of each crop state above: the crop drives both looks (dense green
# canopy scatters most, stubble least, ploughed soil is rough), so fields correspond.
_CROP_DB = np.array([-12.5, -9.5, -14.5, -16.0, -11.0, -13.0], np.float32)
_ROOF_COLOURS = np.array([
    (190, 190, 185),  # light grey
    (225, 225, 220),  # white
    (160, 85, 65),    # red-brown tiles
    (100, 100, 105),  # dark grey
    (125, 140, 155),  # blue-grey metal
], np.float32)


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=8)
def _centred_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates relative to the tile centre: (yy, xx), each (n, n) float32."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) - np.float32((n - 1) / 2)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _rotate(yy: np.ndarray, xx: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) in a frame rotated by `angle` radians; inputs/outputs (n, n) float32."""
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    return xx * c + yy * s, yy * c - xx * s


def _interp_matrix(n: int, cell: float, rng: np.random.Generator) -> np.ndarray:
    """(n, g) float32 matrix that smoothly interpolates g lattice values (spacing `cell` px)."""
    g = int(math.ceil(n / cell)) + 2
    t = np.arange(n, dtype=np.float32) / np.float32(cell) + np.float32(rng.random())
    i0 = t.astype(np.int64)
    f = t - i0
    f = f * f * (3 - 2 * f)  # smoothstep: no visible lattice creases
    w = np.zeros((n, g), np.float32)
    rows = np.arange(n)
    w[rows, i0] = 1 - f
    w[rows, i0 + 1] = f
    return w


def _noise(rng: np.random.Generator, n: int, cells: tuple[float, ...], decay: float = 1.0) -> np.ndarray:
    """Multi-scale smooth value noise, (n, n) float32, zero mean, unit std.

    Octave with lattice spacing c px is weighted by c**decay (larger = smoother)."""
    out = np.zeros((n, n), np.float32)
    for cell in cells:
        wy, wx = _interp_matrix(n, cell, rng), _interp_matrix(n, cell, rng)
        lattice = rng.standard_normal((wy.shape[1], wx.shape[1]), dtype=np.float32)
        out += np.float32(cell ** decay) * (wy @ lattice @ wx.T)
    out -= out.mean()
    out /= out.std() + np.float32(1e-6)
    return out


def _breaks(rng: np.random.Generator, half: float, lo: float, hi: float) -> np.ndarray:
    """Sorted cut positions covering [-half, half] with gaps drawn uniformly in [lo, hi]."""
    widths = rng.uniform(lo, hi, size=int(2 * half / lo) + 2)
    cuts = -half + rng.uniform(0, hi) + np.cumsum(widths)
    return cuts[cuts < half].astype(np.float32)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = mask[y - dy, x - dx], False outside; (n, n) bool."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _cast_shadow(obj: np.ndarray, dy: int, dx: int, length: int) -> np.ndarray:
    """Pixels outside `obj` within `length` steps of (dy, dx) behind it; (n, n) bool."""
    shadow = np.zeros_like(obj)
    for k in range(1, length + 1):
        shadow |= _shift(obj, k * dy, k * dx)
    return shadow & ~obj


def _choice_bool(rng: np.random.Generator, p: float, size: int) -> np.ndarray:
    return rng.random(size) < p


# ----------------------------------------------------------------------------- SAR mapping


def sar_db_to_uint8(db: np.ndarray) -> np.ndarray:
    """Backscatter in dB (any shape, float) -> uint8 by the linear map SAR_DB_RANGE -> [0, 255]."""
    lo, hi = SAR_DB_RANGE
    return np.clip((db - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def sar_uint8_to_intensity(sar: np.ndarray) -> np.ndarray:
    """Inverse of `sar_db_to_uint8` (up to quantisation): uint8 -> linear intensity, float64."""
    lo, hi = SAR_DB_RANGE
    db = lo + sar.astype(np.float64) * ((hi - lo) / 255.0)
    return 10.0 ** (db / 10.0)


# ----------------------------------------------------------------------------- layout


def _farm_fields(rng, yy, xx, zoom):
    """Rotated rectangular field partition: field id (n, n) int64, count, distance to boundary, (u, v)."""
    n = yy.shape[0]
    u, v = _rotate(yy, xx, rng.uniform(0, math.pi))
    half = 0.75 * n + 1
    ub = _breaks(rng, half, 10 * zoom, 36 * zoom)
    vb = _breaks(rng, half, 10 * zoom, 36 * zoom)
    col, row = np.searchsorted(ub, u), np.searchsorted(vb, v)
    fid = row * (len(ub) + 1) + col
    ue = np.concatenate([[-np.inf], ub, [np.inf]]).astype(np.float32)
    ve = np.concatenate([[-np.inf], vb, [np.inf]]).astype(np.float32)
    edge = np.minimum(np.minimum(u - ue[col], ue[col + 1] - u), np.minimum(v - ve[row], ve[row + 1] - v))
    return fid, (len(ub) + 1) * (len(vb) + 1), edge, u, v


def _city_grid(rng, yy, xx, zoom):
    """Rotated street grid: block id, block count, street mask, lot id, building mask (all (n, n))."""
    u, v = _rotate(yy, xx, rng.uniform(0, math.pi / 2))
    pitch = rng.uniform(12, 22) * zoom
    street = rng.uniform(1.6, 3.0) * zoom
    margin = rng.uniform(0.8, 2.5) * zoom
    gap = rng.uniform(1.0, 2.5) * zoom
    su0, sv0 = u / pitch + rng.random(), v / pitch + rng.random()
    bi, bj = np.floor(su0).astype(np.int64), np.floor(sv0).astype(np.int64)
    bu, bv = (su0 - bi) * pitch, (sv0 - bj) * pitch
    bi -= bi.min()
    bj -= bj.min()
    nbj = int(bj.max()) + 1
    bid = bi * nbj + bj
    nblocks = (int(bi.max()) + 1) * nbj
    streets = (bu < street) | (bv < street)
    # Each block splits into 1-2 lots along each axis; a lot holds a building or not.
    inner_lo, inner_hi = street + margin, pitch - margin
    split_u = np.where(_choice_bool(rng, 0.6, nblocks), rng.uniform(0.35, 0.65, nblocks), 2.0)
    split_v = np.where(_choice_bool(rng, 0.6, nblocks), rng.uniform(0.35, 0.65, nblocks), 2.0)
    cut_u = inner_lo + split_u[bid] * (inner_hi - inner_lo)
    cut_v = inner_lo + split_v[bid] * (inner_hi - inner_lo)
    lot = bid * 4 + (bu > cut_u) * 2 + (bv > cut_v)
    present = _choice_bool(rng, rng.uniform(0.7, 0.95), nblocks * 4)
    building = ((bu >= inner_lo) & (bu < inner_hi) & (bv >= inner_lo) & (bv < inner_hi)
                & (np.abs(bu - cut_u) >= gap / 2) & (np.abs(bv - cut_v) >= gap / 2) & present[lot])
    return bid, nblocks, streets, lot, building


def _line_distance(rng, yy, xx, n, angle=None):
    """Distance (n, n) float32 to a random straight line through the tile."""
    a = rng.uniform(0, math.pi) if angle is None else angle
    return np.abs(xx * np.float32(math.cos(a)) + yy * np.float32(math.sin(a)) - np.float32(rng.uniform(-0.4, 0.4) * n))


def _layout(rng: np.random.Generator, n: int) -> dict:
    """Label map and the geometry the renderers need."""
    yy, xx = _centred_grid(n)
    zoom = rng.uniform(0.7, 1.4)
    p_water = 0.0 if rng.random() < 0.3 else rng.uniform(0.05, 0.35)
    p_city = 0.0 if rng.random() < 0.25 else rng.uniform(0.15, 0.7)
    p_forest = rng.uniform(0.05, 0.45)
    p_bare = rng.uniform(0.05, 0.5)

    fid, nfields, field_edge, fu, fv = _farm_fields(rng, yy, xx, zoom)
    bare_field = _choice_bool(rng, p_bare, nfields)
    label = np.where(bare_field[fid], BARE, FARMLAND).astype(np.uint8)

    forest_noise = _noise(rng, n, (6 * zoom, 14 * zoom, 30 * zoom), decay=1.2)
    label[forest_noise > np.quantile(forest_noise, 1 - p_forest)] = FOREST

    elevation = _noise(rng, n, (12 * zoom, 28 * zoom, 60 * zoom), decay=1.5)
    water = elevation < np.quantile(elevation, p_water) if p_water > 0 else np.zeros((n, n), bool)
    if rng.random() < 0.35:  # meandering river
        ru, rv = _rotate(yy, xx, rng.uniform(0, math.pi))
        wave = rng.uniform(3, 12) * zoom * np.sin(ru * np.float32(2 * math.pi / (rng.uniform(40, 120) * zoom))
                                                 + np.float32(rng.uniform(0, 2 * math.pi)))
        water |= np.abs(rv - rng.uniform(-0.3, 0.3) * n - wave) < rng.uniform(1.5, 5) * zoom

    bid, nblocks, streets, lot, building = _city_grid(rng, yy, xx, zoom)
    urban = _noise(rng, n, (20 * zoom, 50 * zoom), decay=1.5)
    counts = np.maximum(np.bincount(bid.ravel(), minlength=nblocks), 1)
    block_urban = np.bincount(bid.ravel(), urban.ravel(), nblocks) / counts
    block_wet = np.bincount(bid.ravel(), water.ravel(), nblocks) / counts
    eligible = (block_wet < 0.3) & (np.bincount(bid.ravel(), minlength=nblocks) > 0)
    city_block = np.zeros(nblocks, bool)
    if p_city > 0 and eligible.any():
        city_block = eligible & (block_urban >= np.quantile(block_urban[eligible], 1 - p_city))
    in_city = city_block[bid]
    label[in_city] = CITY
    label[in_city & streets] = ROAD
    label[water] = WATER

    for _ in range(rng.choice(4, p=(0.15, 0.4, 0.3, 0.15))):  # main roads crossing the scene
        width = rng.uniform(1.0, 2.0) * zoom
        label[_line_distance(rng, yy, xx, n) < width] = ROAD

    return dict(label=label, zoom=zoom, fid=fid, nfields=nfields, field_edge=field_edge, fu=fu, fv=fv,
                crop=rng.integers(len(_CROP_COLOURS), size=nfields), lot=lot, nlots=nblocks * 4, building=building & (label == CITY))


# ----------------------------------------------------------------------------- rendering


def _field_rows(rng, geo, zoom):
    """Row-stripe pattern in [-1, 1] per farmland field, (n, n) float32."""
    nf = geo["nfields"]
    period = rng.uniform(2.5, 5.0, nf).astype(np.float32) * np.float32(zoom)
    along_u = _choice_bool(rng, 0.5, nf)
    fid = geo["fid"]
    coord = np.where(along_u[fid], geo["fu"], geo["fv"])
    return np.sin(coord * (np.float32(2 * math.pi) / period[fid]))


def _render_optical(rng: np.random.Generator, geo: dict, rows: np.ndarray) -> np.ndarray:
    """Optical tile, (n, n, 3) uint8."""
    label, zoom, fid = geo["label"], geo["zoom"], geo["fid"]
    n = label.shape[0]
    jitter = lambda colour, s: np.asarray(colour, np.float32) + rng.normal(0, s, 3).astype(np.float32)

    water = jitter((30, 55, 70) if rng.random() < 0.7 else (50, 75, 65), 6)
    forest = jitter((38, 68, 38), 6)
    soil = jitter((180, 158, 122), 12)
    ground = jitter((128, 126, 120), 8)
    road = jitter((108, 108, 106), 8)

    fine = _noise(rng, n, (1.5 * zoom, 3 * zoom), decay=0.5)
    broad = _noise(rng, n, (16 * zoom, 40 * zoom), decay=1.0)
    nf = geo["nfields"]
    crop = _CROP_COLOURS[geo["crop"]] + rng.normal(0, 10, (nf, 3)).astype(np.float32)
    row_amp = rng.uniform(0.02, 0.12, nf).astype(np.float32)
    roofs = _ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS), size=geo["nlots"])]
    roofs = roofs * rng.uniform(0.85, 1.1, (geo["nlots"], 1)).astype(np.float32)

    img = np.empty((n, n, 3), np.float32)
    img[:] = soil * (1 + 0.06 * broad)[..., None]
    farm = label == FARMLAND
    img[farm] = crop[fid[farm]] * (1 + row_amp[fid[farm]] * rows[farm])[:, None]
    img[geo["field_edge"] < 0.8 * zoom] *= np.float32(0.85)  # hedges / tracks between fields
    forest_px = label == FOREST
    img[forest_px] = forest * (1 + 0.25 * fine[forest_px] + 0.08 * broad[forest_px])[:, None]
    water_px = label == WATER
    img[water_px] = water * (1 + 0.04 * broad[water_px])[:, None]
    city_px = label == CITY
    img[city_px] = ground * (1 + 0.05 * fine[city_px])[:, None]
    bld = geo["building"]
    img[bld] = roofs[geo["lot"][bld]]
    img[label == ROAD] = road
    # Sun shadows of buildings on the surrounding ground.
    sun = [(1, 0), (0, 1), (1, 1), (-1, 1), (1, -1), (-1, 0), (0, -1), (-1, -1)][rng.integers(8)]
    shade = _cast_shadow(bld, sun[0], sun[1], int(rng.integers(1, 4))) & (label != WATER)
    img[shade] *= np.float32(0.55)

    gain = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    img = img * gain + np.float32(rng.uniform(0, 20))
    img += rng.normal(0, 3.5, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _render_sar(rng: np.random.Generator, geo: dict, rows: np.ndarray) -> np.ndarray:
    """SAR tile, (n, n) uint8 (dB mapped by `sar_db_to_uint8`), with SAR_LOOKS-look speckle."""
    label, zoom, fid = geo["label"], geo["zoom"], geo["fid"]
    n = label.shape[0]
    texture = _noise(rng, n, (1.5 * zoom, 4 * zoom), decay=0.5)
    broad = _noise(rng, n, (20 * zoom, 50 * zoom), decay=1.0)
    field_db = _CROP_DB[geo["crop"]] + rng.normal(0, 0.8, geo["nfields"]).astype(np.float32)
    roof_db = rng.uniform(-6, 0, geo["nlots"]).astype(np.float32)

    db = np.empty((n, n), np.float32)
    db[:] = rng.uniform(-17, -13) + 1.0 * broad                       # bare soil: moisture/roughness
    farm = label == FARMLAND
    db[farm] = field_db[fid[farm]] + 0.8 * rows[farm]
    forest = label == FOREST
    db[forest] = rng.uniform(-10.5, -8.0) + 1.5 * texture[forest]      # canopy volume scattering
    water = label == WATER
    db[water] = rng.uniform(-24, -19) + 0.5 * broad[water]            # specular, slight wind roughening
    city = label == CITY
    db[city] = rng.uniform(-8.5, -5.5) + 1.0 * texture[city]
    bld = geo["building"]
    db[bld] = roof_db[geo["lot"][bld]]
    db[label == ROAD] = rng.uniform(-20, -16)

    # Side-looking geometry: double bounce at sensor-facing walls, radar shadow behind buildings.
    look = [(0, 1), (0, -1), (1, 0), (-1, 0)][rng.integers(4)]
    near_wall = bld & ~_shift(bld, look[0], look[1])
    db[near_wall] = rng.uniform(3, 8)
    shadow = _cast_shadow(bld, look[0], look[1], max(1, int(round(rng.uniform(1, 3) * zoom)))) & (label != WATER)
    db[shadow] = -24.0
    # Strong point scatterers (vehicles, poles, corners) in the city.
    points = city & (rng.random((n, n)) < rng.uniform(0.03, 0.08))
    db[points] += rng.uniform(6, 15, int(points.sum())).astype(np.float32)

    speckle = rng.standard_gamma(SAR_LOOKS, (n, n)).astype(np.float32) / np.float32(SAR_LOOKS)
    db += np.float32(10) * np.log10(np.maximum(speckle, np.float32(1e-6)))
    return sar_db_to_uint8(db)


def generate_scene(seed: int, size: int = 96) -> dict[str, np.ndarray]:
    """One synthetic co-registered scene, fully determined by `seed`.

    Returns {"rgb": (size, size, 3) uint8, "sar": (size, size) uint8,
    "label": (size, size) uint8 with ids into CLASSES}.
    """
    rng = np.random.default_rng(seed)
    geo = _layout(rng, size)
    rows = _field_rows(rng, geo, geo["zoom"])
    rgb = _render_optical(rng, geo, rows)
    sar = _render_sar(rng, geo, rows)
    return {"rgb": rgb, "sar": sar, "label": geo["label"]}


def record_seed(seed: int, index: int) -> int:
    """Stable 63-bit scene seed for record `index` of a dataset with base `seed` (both >= 0)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class SyntheticPairs:
    """Grain random-access source of `num_records` synthetic scenes.

    Record i is ``generate_scene(record_seed(seed, i), size)`` plus ``"index": np.int64(i)``;
    sources with different `seed` share no scenes. With `cache`, each scene is generated
    once per process and kept in memory (about 4 * size**2 bytes each), so later epochs
    cost nothing.
    """

    def __init__(self, num_records: int, size: int = 96, seed: int = 0, cache: bool = False):
        if num_records < 0 or seed < 0:
            raise ValueError(f"num_records and seed must be >= 0, got {num_records}, {seed}")
        self.num_records, self.size, self.seed = int(num_records), int(size), int(seed)
        self.cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range [0, {self.num_records})")
        if self.cache is not None and index in self.cache:
            return dict(self.cache[index])
        scene = generate_scene(record_seed(self.seed, index), self.size)
        scene["index"] = np.int64(index)
        if self.cache is not None:
            self.cache[index] = scene
            return dict(scene)
        return scene

    def __repr__(self) -> str:
        return f"SyntheticPairs(num_records={self.num_records}, size={self.size}, seed={self.seed})"
