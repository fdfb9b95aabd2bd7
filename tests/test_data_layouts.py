"""Original dataset layouts -> canonical records, and the ArrayRecord pack / read round trip.

Every fixture writes small look-alike files with the real band counts and dtypes:
SpaceNet 6 (4-band float32 dB SAR-Intensity with a zero no-data border, band-sequential
like GDAL's INTERLEAVE=BAND; 3-band uint8 PS-RGB; an orientation file flagging one strip),
DFC2023 (3-band uint8 RGB + 1-band SAR GeoTIFFs) and a paired folder of PNG/JPEG/TIFF.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from data.pack_arrayrecord import main as pack_main
from data.pack_arrayrecord import pack
from mmovseg_jax.data.arrayrecord import ArrayRecordPairs, decode_record, encode_record, shard_paths
from mmovseg_jax.data.imageio import read_image, sar_to_uint8, to_uint8_rgb
from mmovseg_jax.data.layouts import (DFC2023, SN6_DB_RANGE, ConcatSource, PairedFolder, SpaceNet6,
                                      read_sar_orientations)

REPO = Path(__file__).resolve().parents[1]
H, W = 40, 48  # not square, so a transposed axis would show
BORDER = 3  # SAR no-data columns on the left
NAN_AT = (5, 7)
STRIP_FLIPPED, STRIP_KEPT = "20190804111224_20190804111453", "20190823162315_20190823162606"
SN6_TILES = [(STRIP_FLIPPED, 1), (STRIP_FLIPPED, 2), (STRIP_KEPT, 3)]  # sorted order of the keys
SN6_DIR = "train/AOI_11_Rotterdam"
PREFIX = "SN6_Train_AOI_11_Rotterdam"

# HH pixels with known dB values, for a db_range of (10, 61): 5 grey levels per dB.
PROBE_RANGE = (10.0, 61.0)
PROBES = {(10, 10): (20.0, 50), (10, 11): (5.0, 0), (10, 12): (70.0, 255), (10, 13): (35.4, 127), (10, 14): (31.0, 105)}


def sn6_sar(seed: int) -> np.ndarray:
    """(H, W, 4) float32 dB, each band in its own range (HH 10-30 ... VV 70-90), zero border, one NaN."""
    rng = np.random.default_rng(seed)
    sar = np.stack([10 + 20 * b + 20 * rng.random((H, W)) for b in range(4)], axis=-1).astype(np.float32)
    for (y, x), (value, _) in PROBES.items():
        sar[y, x, 0] = value
    sar[:, :BORDER] = 0.0
    sar[NAN_AT] = np.nan
    return sar


def rgb_image(seed: int, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(100 + seed)
    return rng.integers(0, 256, (H, W, 3)).astype(dtype)


@pytest.fixture
def sn6_root(tmp_path: Path) -> Path:
    base = tmp_path / "sn6" / SN6_DIR
    for sub in ("PS-RGB", "SAR-Intensity", "SummaryData"):
        (base / sub).mkdir(parents=True)
    for n, (strip, tile) in enumerate(SN6_TILES):
        key = f"{strip}_tile_{tile}"
        tifffile.imwrite(base / "PS-RGB" / f"{PREFIX}_PS-RGB_{key}.tif", rgb_image(n), photometric="rgb")
        tifffile.imwrite(base / "SAR-Intensity" / f"{PREFIX}_SAR-Intensity_{key}.tif",
                         np.moveaxis(sn6_sar(n), -1, 0), photometric="minisblack", planarconfig="separate")
    (base / "SummaryData" / "SAR_orientations.txt").write_text(f"{STRIP_FLIPPED} 1\n{STRIP_KEPT} 0\n")
    return tmp_path / "sn6"


def expected_sar(sar_band: np.ndarray, db_range=SN6_DB_RANGE) -> tuple[np.ndarray, np.ndarray]:
    low, high = db_range
    valid = np.isfinite(sar_band) & (sar_band != 0)
    image = np.rint((np.clip(np.nan_to_num(sar_band), low, high) - low) * 255 / (high - low))
    return np.where(valid, image, 0).astype(np.uint8), valid


# ---- SpaceNet 6 ------------------------------------------------------------------------------------------


def test_spacenet6_pairs_and_maps_db(sn6_root):
    src = SpaceNet6(sn6_root)
    assert len(src) == 3
    assert [src.name(i) for i in range(3)] == [f"{s}_tile_{t}" for s, t in SN6_TILES]
    rec = src[2]  # strip flagged 0: as stored
    assert set(rec) == {"rgb", "sar", "valid", "index"} and rec["index"] == 2 and rec["index"].dtype == np.int64
    assert rec["rgb"].dtype == np.uint8 and rec["rgb"].shape == (H, W, 3)
    assert rec["sar"].dtype == np.uint8 and rec["sar"].shape == (H, W) and rec["valid"].dtype == bool
    np.testing.assert_array_equal(rec["rgb"], rgb_image(2))
    sar, valid = expected_sar(sn6_sar(2)[..., 0])
    np.testing.assert_array_equal(rec["sar"], sar)
    np.testing.assert_array_equal(rec["valid"], valid)
    assert rec["sar"][10, 14] == 85  # 31 dB of 0..93 dB
    assert not rec["valid"][:, :BORDER].any() and not rec["valid"][NAN_AT]
    assert rec["valid"].sum() == H * (W - BORDER) - 1
    assert (rec["sar"][~rec["valid"]] == 0).all()


def test_spacenet6_db_values_at_probe_pixels(sn6_root):
    rec = SpaceNet6(sn6_root, db_range=PROBE_RANGE)[2]
    for (y, x), (_, grey) in PROBES.items():
        assert rec["sar"][y, x] == grey, (y, x)
    assert rec["valid"][10, 11]  # clipped, not no-data


def test_spacenet6_band_choice(sn6_root):
    hh, vv = SpaceNet6(sn6_root, sar_band="HH")[2], SpaceNet6(sn6_root, sar_band="vv")[2]
    assert not np.array_equal(hh["sar"], vv["sar"])
    np.testing.assert_array_equal(vv["sar"], expected_sar(sn6_sar(2)[..., 3])[0])
    np.testing.assert_array_equal(hh["rgb"], vv["rgb"])
    with pytest.raises(ValueError, match="sar_band"):
        SpaceNet6(sn6_root, sar_band="XX")


def test_spacenet6_rotates_flagged_strip_only(sn6_root):
    src, plain = SpaceNet6(sn6_root), SpaceNet6(sn6_root, rotate_by_orientation=False)
    for n in (0, 1):  # flagged strip: both modalities turned by 180 degrees
        sar, valid = expected_sar(sn6_sar(n)[..., 0])
        rec = src[n]
        np.testing.assert_array_equal(rec["rgb"], np.rot90(rgb_image(n), 2))
        np.testing.assert_array_equal(rec["sar"], np.rot90(sar, 2))
        np.testing.assert_array_equal(rec["valid"], np.rot90(valid, 2))
        assert not rec["valid"][:, -BORDER:].any() and rec["valid"][:, :BORDER].all()
        np.testing.assert_array_equal(plain[n]["rgb"], rgb_image(n))
        np.testing.assert_array_equal(plain[n]["sar"], sar)
    np.testing.assert_array_equal(src[2]["rgb"], rgb_image(2))
    assert read_sar_orientations(sn6_root / SN6_DIR / "SummaryData" / "SAR_orientations.txt") == {
        STRIP_FLIPPED: 1, STRIP_KEPT: 0}


def test_spacenet6_missing_orientation_file_warns_and_keeps(sn6_root):
    (sn6_root / SN6_DIR / "SummaryData" / "SAR_orientations.txt").unlink()
    with pytest.warns(UserWarning, match="SAR_orientations.txt: not found"):
        src = SpaceNet6(sn6_root)
    np.testing.assert_array_equal(src[0]["rgb"], rgb_image(0))


def test_spacenet6_uint16_rgb_is_stretched(sn6_root):
    path = next((sn6_root / SN6_DIR / "PS-RGB").glob(f"*{STRIP_KEPT}_tile_3.tif"))
    rgb16 = rgb_image(2, np.uint16) * 8 + 100
    tifffile.imwrite(path, rgb16, photometric="rgb")
    rgb = SpaceNet6(sn6_root)[2]["rgb"]
    lo, hi = np.percentile(rgb16, (2, 98))
    np.testing.assert_array_equal(rgb, np.rint(np.clip((rgb16 - lo) * (255 / (hi - lo)), 0, 255)))


def test_spacenet6_truncated_sar_names_file(sn6_root):
    path = next((sn6_root / SN6_DIR / "SAR-Intensity").glob(f"*{STRIP_KEPT}_tile_3.tif"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    src = SpaceNet6(sn6_root)
    with pytest.raises(ValueError, match="cannot be read as an image") as err:
        src[2]
    assert str(path) in str(err.value)
    src[0]  # the others still read


# ---- DFC2023 -------------------------------------------------------------------------------------------


def make_dfc(root: Path, sar: dict[str, np.ndarray]) -> Path:
    for sub in ("rgb", "sar"):
        (root / "train" / sub).mkdir(parents=True)
    for n, (name, band) in enumerate(sorted(sar.items())):
        tifffile.imwrite(root / "train" / "rgb" / f"{name}.tif", rgb_image(10 + n), photometric="rgb")
        tifffile.imwrite(root / "train" / "sar" / f"{name}.tif", band)
    return root


def linear_sar() -> np.ndarray:
    """(H, W) float32 linear intensity with probes at -23, -1 and +10 dB, a zero and a NaN."""
    sar = np.full((H, W), 10 ** -1.5, np.float32)  # -15 dB -> 85
    sar[0, 0], sar[0, 1], sar[0, 2] = 10 ** -2.3, 10 ** -0.1, 10.0
    sar[1, 0], sar[1, 1] = 0.0, np.nan
    return sar


def test_dfc2023_float_linear_default(tmp_path):
    src = DFC2023(make_dfc(tmp_path / "dfc", {"0001": linear_sar(), "0002": linear_sar() * 2}))
    assert len(src) == 2 and src.name(0) == "0001"
    rec = src[0]
    np.testing.assert_array_equal(rec["rgb"], rgb_image(10))
    assert rec["sar"][0, :3].tolist() == [17, 204, 255] and rec["sar"][5, 5] == 85
    assert rec["valid"][0, :3].all() and not rec["valid"][1, 0] and not rec["valid"][1, 1]
    assert rec["sar"][1, 0] == rec["sar"][1, 1] == 0 and rec["valid"].sum() == H * W - 2


def test_dfc2023_db_and_uint8_sar(tmp_path):
    db = np.full((H, W), -15.0, np.float32)
    sar8 = np.random.default_rng(3).integers(0, 256, (H, W)).astype(np.uint8)
    root = make_dfc(tmp_path / "dfc", {"a": db, "b": sar8})
    rec_db, rec8 = DFC2023(root, sar_db=True)[0], DFC2023(root)[1]
    assert (rec_db["sar"] == 85).all() and rec_db["valid"].all()
    np.testing.assert_array_equal(rec8["sar"], sar8)
    assert rec8["valid"].all()


# ---- paired folder -------------------------------------------------------------------------------------


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "pie"
    for sub in ("rgb", "sar", "label"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(7)
    Image.fromarray(rgb_image(20)).save(root / "rgb" / "a.jpg", quality=95)
    Image.fromarray(rgb_image(21)).save(root / "rgb" / "b.png")
    Image.fromarray(rng.integers(0, 256, (H, W)).astype(np.uint8)).save(root / "sar" / "a.png")
    tifffile.imwrite(root / "sar" / "b.tif", rng.integers(0, 256, (H, W)).astype(np.uint8))
    for name in ("a", "b"):
        label = rng.integers(0, 6, (H, W)).astype(np.uint8)
        label[:2] = 255
        Image.fromarray(label).save(root / "label" / f"{name}.png")
    return root


def test_paired_folder_mixed_extensions(folder_root):
    src = PairedFolder(folder_root, label_dir="label")
    assert len(src) == 2 and [src.name(i) for i in range(2)] == ["a", "b"]
    assert src.keys == ("rgb", "sar", "valid", "label")
    for i, name in enumerate("ab"):
        rec = src[i]
        assert rec["rgb"].shape == (H, W, 3) and rec["rgb"].dtype == np.uint8
        sar_file = folder_root / "sar" / ("a.png" if name == "a" else "b.tif")
        np.testing.assert_array_equal(rec["sar"], read_image(sar_file))
        np.testing.assert_array_equal(rec["label"], np.array(Image.open(folder_root / "label" / f"{name}.png")))
        assert rec["valid"].all() and (rec["label"][:2] == 255).all()
    np.testing.assert_array_equal(src[1]["rgb"], rgb_image(21))
    assert "label" not in PairedFolder(folder_root)[0]


def test_paired_folder_grey_rgb_sar_png(folder_root):
    grey = read_image(folder_root / "sar" / "a.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(folder_root / "sar" / "a.png")
    np.testing.assert_array_equal(PairedFolder(folder_root)[0]["sar"], grey)
    grey_b = read_image(folder_root / "sar" / "b.tif")  # grey SAR saved as an RGB JPEG, as in DDCH
    (folder_root / "sar" / "b.tif").unlink()
    Image.fromarray(np.stack([grey_b] * 3, -1)).save(folder_root / "sar" / "b.jpg", quality=90)
    decoded = read_image(folder_root / "sar" / "b.jpg").astype(float)
    assert decoded.ndim == 3
    np.testing.assert_array_equal(PairedFolder(folder_root)[1]["sar"], np.rint(decoded.mean(-1)))
    Image.fromarray(rgb_image(5)).save(folder_root / "sar" / "a.png")  # a colour image is not SAR
    with pytest.raises(ValueError, match="a.png: expected a single-band SAR image"):
        PairedFolder(folder_root)[0]


def test_paired_folder_unpaired_error_and_skip(folder_root):
    Image.fromarray(rgb_image(22)).save(folder_root / "rgb" / "c.png")
    Image.fromarray(rgb_image(23)[..., 0]).save(folder_root / "sar" / "d.png")
    with pytest.raises(ValueError, match="2 file\\(s\\) without a partner") as err:
        PairedFolder(folder_root)
    assert "rgb/c.png" in str(err.value) and "sar/d.png" in str(err.value)
    with pytest.warns(UserWarning, match="skipped 2 unpaired"):
        src = PairedFolder(folder_root, skip_unpaired=True)
    assert len(src) == 2 and src.num_unpaired == 2


def test_paired_folder_size_mismatch_names_both_files(folder_root):
    sar = folder_root / "sar" / "a.png"
    Image.fromarray(np.zeros((H, W + 4), np.uint8)).save(sar)
    src = PairedFolder(folder_root)
    with pytest.raises(ValueError, match="sizes differ") as err:
        src[0]
    message = str(err.value)
    assert str(folder_root / "rgb" / "a.jpg") in message and str(sar) in message
    assert f"({H}, {W}, 3)" in message and f"({H}, {W + 4})" in message


def test_paired_folder_truncated_png_names_file(folder_root):
    path = folder_root / "rgb" / "b.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot be read as an image") as err:
        PairedFolder(folder_root)[1]
    assert str(path) in str(err.value)


# ---- imageio helpers -----------------------------------------------------------------------------------


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(ValueError, match="x.bmp: unsupported image extension"):
        read_image(tmp_path / "x.bmp")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="junk.tif: cannot be read as an image"):
        read_image(tmp_path / "junk.tif")


def test_to_uint8_rgb_rules():
    rgba = np.dstack([rgb_image(1), np.full((H, W), 7, np.uint8)])
    np.testing.assert_array_equal(to_uint8_rgb(rgba, "x.png"), rgb_image(1))
    with pytest.raises(ValueError, match=r"x.tif: optical image must have 3 or 4 bands, got shape \(40, 48, 2\)"):
        to_uint8_rgb(np.zeros((H, W, 2), np.uint16), "x.tif")
    img = np.linspace(1.0, 100.0, H * W * 3).reshape(H, W, 3)
    img[0, 0] = 0.0  # no-data pixel: left out of the percentiles, stays 0
    img[0, 1] = np.nan
    out = to_uint8_rgb(img, "x.tif")
    data = img.reshape(-1, 3)[2:]  # every pixel but the two no-data ones
    lo, hi = np.percentile(data, (2, 98))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(out.reshape(-1, 3)[2:], np.rint(np.clip((data - lo) * (255 / (hi - lo)), 0, 255)))


def test_sar_to_uint8_nonfinite_and_nodata():
    x = np.array([[-25.0, 5.0, -10.0, np.inf], [-np.inf, np.nan, -9999.0, 20.0]], np.float32)
    image, valid = sar_to_uint8(x, "s.tif", db=True, nodata=-9999.0)
    assert image.tolist() == [[0, 255, 128, 0], [0, 0, 0, 255]]
    assert valid.tolist() == [[True, True, True, False], [False, False, False, True]]
    with pytest.raises(ValueError, match=r"s.tif: SAR band must be 2-D"):
        sar_to_uint8(np.zeros((2, 2, 2), np.float32), "s.tif", db=True)


# ---- concatenation -------------------------------------------------------------------------------------


def test_concat_source_lengths_and_indices(sn6_root, tmp_path, folder_root):
    sn6, dfc = SpaceNet6(sn6_root), DFC2023(make_dfc(tmp_path / "dfc", {"0001": linear_sar(), "0002": linear_sar()}))
    cmu = ConcatSource(sn6, dfc)
    assert len(cmu) == 5
    assert [int(cmu[i]["index"]) for i in range(5)] == [0, 1, 2, 3, 4] and cmu[-1]["index"] == 4
    np.testing.assert_array_equal(cmu[3]["sar"], dfc[0]["sar"])
    assert dfc[0]["index"] == 0
    np.testing.assert_array_equal(cmu[2]["rgb"], sn6[2]["rgb"])
    with pytest.raises(IndexError):
        cmu[5]
    with pytest.raises(ValueError, match="different fields"):
        ConcatSource(sn6, PairedFolder(folder_root, label_dir="label"))
    restored = pickle.loads(pickle.dumps(cmu))  # what Grain does for worker processes
    np.testing.assert_array_equal(restored[4]["sar"], cmu[4]["sar"])


# ---- ArrayRecord ---------------------------------------------------------------------------------------


def assert_same_records(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        assert set(ra) == set(rb)
        for key in ra:
            assert ra[key].dtype == rb[key].dtype, key
            np.testing.assert_array_equal(ra[key], rb[key], err_msg=f"record {i} {key}")


def test_pack_and_read_back_in_process(sn6_root, tmp_path):
    src, out, log = SpaceNet6(sn6_root), tmp_path / "packed" / "sn6.array_record", io.StringIO()
    paths = pack(src, out, shards=2, stream=log)
    assert paths == shard_paths(out, 2) and all(p.is_file() for p in paths)
    assert sorted(p.name for p in out.parent.iterdir()) == [p.name for p in paths]  # no temporary files left
    assert "3/3 records (100%)" in log.getvalue() and "records/s" in log.getvalue()
    packed = ArrayRecordPairs(out)
    assert_same_records(packed, src)
    assert_same_records(ArrayRecordPairs(paths[1]), _Slice(src, 1, 3))  # shard 1 of 2 holds records 1, 2
    assert_same_records(pickle.loads(pickle.dumps(packed)), src)
    import grain

    assert_same_records(grain.MapDataset.source(packed), src)


class _Slice:
    def __init__(self, src, start, stop):
        self.src, self.start, self.stop = src, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        rec = self.src[self.start + i]
        rec["index"] = np.int64(i)
        return rec


def test_pack_failure_leaves_nothing(folder_root, tmp_path):
    (folder_root / "sar" / "b.tif").write_bytes(b"II*\x00broken")
    out = tmp_path / "out" / "bad.array_record"
    with pytest.raises(ValueError, match="b.tif"):
        pack(PairedFolder(folder_root), out, stream=io.StringIO())
    assert list(out.parent.iterdir()) == []
    assert pack_main(["--layout", "folder", "--root", str(folder_root), "--out", str(out)]) == 2
    assert list(out.parent.iterdir()) == []


def test_record_codec_checks():
    rec = {"rgb": rgb_image(0), "sar": np.zeros((H, W), np.uint8), "index": np.int64(9)}
    back = decode_record(encode_record(rec), 4)
    assert set(back) == {"rgb", "sar", "index"} and back["index"] == 4
    with pytest.raises(ValueError, match="field 'sar'"):
        encode_record({"rgb": rgb_image(0), "sar": np.zeros((H, W), np.float32)})
    with pytest.raises(ValueError, match="record 3: not an npz"):
        decode_record(b"garbage", 3)


def test_pack_cli_round_trip(folder_root, tmp_path):
    out = tmp_path / "pie.array_record"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "data.pack_arrayrecord", "--layout", "folder", "--root",
                             str(folder_root), "--label-dir", "label", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2/2 records (100%)" in result.stderr and "records/s" in result.stderr and "ETA" in result.stderr
    assert_same_records(ArrayRecordPairs(out), PairedFolder(folder_root, label_dir="label"))
