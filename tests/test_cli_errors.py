"""Every bad input is refused clearly: the CLIs run as a user runs them (subprocesses), exit
with code 2 and one `error:` line naming the file / argument and what is wrong, show no
traceback (unless --debug) and write nothing. Rows of docs/errors.md that earlier tests
already cover are not repeated here; this file holds the missing ones, the SAR no-data
policy of predict and the `skip_bad_samples` option of the data loaders.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_predict import random_params, tiny_config

from mmovseg_jax import predict
from mmovseg_jax.data.layouts import PairedFolder
from mmovseg_jax.data.segmentation import LabelledFolder
from mmovseg_jax.models import dino, storage
from mmovseg_jax.models.params import param_shapes_of
from mmovseg_jax.models.tokenizer import BUNDLED_BPE, tokenizer_files

REPO = Path(__file__).resolve().parents[1]
H, W = 24, 32  # tiles smaller than the tiny model's 64 px input: one window


# ------------------------------------------------------------------------------- helpers

def run_cli(module: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, stderr ends with exactly one `error:` line holding every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def rgb_tile(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def sar_db(seed: int = 1, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-24.0, 4.0, (h, w)).astype(np.float32)


def truncate(path: Path, keep: int | None = None) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep is not None else len(data) // 2])
    return path


# ------------------------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = tiny_config()
    return storage.save(tmp_path_factory.mktemp("tiny") / "model", "mmovseg", cfg, random_params(cfg),
                        source={"test": "random weights"}, files=tokenizer_files(BUNDLED_BPE))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A good RGB PNG and float32 dB SAR GeoTIFF pair, and bad variants of them."""
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(rgb_tile()).save(d / "rgb.png")
    tifffile.imwrite(d / "sar.tif", sar_db())
    truncate(shutil.copy(d / "rgb.png", d / "truncated.png"))
    tifffile.imwrite(d / "big_sar.tif", sar_db(h=256, w=256))  # large enough that half is pixel data
    truncate(d / "big_sar.tif")
    tifffile.imwrite(d / "two_band.tif", rgb_tile()[..., :2], planarconfig="contig")
    Image.fromarray(rgb_tile(5)).save(d / "colour_sar.png")
    tifffile.imwrite(d / "complex_sar.tif", sar_db().astype(np.complex64))
    tifffile.imwrite(d / "bool_rgb.tif", rgb_tile() > 128, photometric="rgb")
    nan_sar = sar_db()
    nan_sar[0, :3] = np.nan
    nan_sar[1, 0] = np.inf
    nan_sar[2, 0] = 0.0  # the no-data value
    tifffile.imwrite(d / "nan_sar.tif", nan_sar)
    return d


def predict_args(model: Path, inputs: Path, out: Path, **overrides) -> list[str]:
    args = {"--checkpoint": model, "--rgb": inputs / "rgb.png", "--sar": inputs / "sar.tif",
            "--classes": "water,road", "--out": out / "mask.png", "--probabilities": out / "p.npy"}
    args.update(overrides)
    return [str(x) for kv in args.items() for x in kv]


PREDICT_CASES = [
    ("missing_sar", {"--sar": "nope.tif"}, ["--sar", "nope.tif: no such image file"]),
    ("missing_checkpoint", {"--checkpoint": "no_model"}, ["--checkpoint", "no_model: no such folder"]),
    ("truncated_png", {"--rgb": "truncated.png"}, ["--rgb", "truncated.png: cannot be read as an image"]),
    ("truncated_geotiff", {"--sar": "big_sar.tif"}, ["--sar", "big_sar.tif: cannot be read as an image"]),
    ("rgb_two_bands", {"--rgb": "two_band.tif"}, ["two_band.tif: optical image must have 3 or 4 bands"]),
    ("sar_colour", {"--sar": "colour_sar.png"}, ["colour_sar.png: expected a single-band SAR image"]),
    ("sar_complex_dtype", {"--sar": "complex_sar.tif"}, ["complex_sar.tif: unsupported SAR dtype complex64"]),
    ("rgb_bool_dtype", {"--rgb": "bool_rgb.tif"}, ["bool_rgb.tif: unsupported optical dtype bool"]),
    ("sar_nodata_refuse", {"--sar": "nan_sar.tif", "--sar-nodata": "refuse"},
     ["--sar", "nan_sar.tif: 5 of 768 pixels have no backscatter (4 NaN/inf, 1 no-data", "--sar-nodata refuse"]),
]


@pytest.mark.parametrize("case, override, needles", PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_refuses_bad_input(case, override, needles, model_dir, inputs, tmp_path):
    """Input files are checked before the model loads: each case is a fresh `predict` process."""
    override = {k: v if k == "--sar-nodata" else (inputs / v if k != "--checkpoint" else tmp_path / v)
                for k, v in override.items()}
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(run_cli("mmovseg_jax.predict", *predict_args(model_dir, inputs, out, **override)), *needles)
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    cfg = dino.Config(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16)
    shapes = param_shapes_of(storage.build_abstract("dino", cfg))
    values = {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
    return storage.save(tmp_path_factory.mktemp("dino") / "dino", "dino", cfg, values, source={})


@pytest.fixture(scope="module")
def deeper_config_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model's folder whose model.json asks for one DINO block more than it stores."""
    folder = tmp_path_factory.mktemp("deeper") / "model"
    shutil.copytree(model_dir, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["config"]["dino"]["depth"] += 1
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def test_predict_checkpoint_of_another_architecture(dino_dir, inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("mmovseg_jax.predict", *predict_args(dino_dir, inputs, out))
    assert_refused(proc, f"--checkpoint {dino_dir}: not a usable MM-OVSeg model folder",
                   "holds a dino model, not mmovseg")
    assert list(out.iterdir()) == []


def test_predict_checkpoint_with_missing_keys(deeper_config_dir, inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("mmovseg_jax.predict", *predict_args(deeper_config_dir, inputs, out))
    line = assert_refused(proc, f"--checkpoint {deeper_config_dir}", "does not fit the architecture", "missing")
    assert "missing 32: rgb_dino.blocks.4." in line  # the parameters of the block the folder does not hold
    assert line.endswith(", ... (26 more))")  # the first 6 of them are listed
    assert list(out.iterdir()) == []


def test_predict_debug_shows_traceback(inputs, tmp_path):
    proc = run_cli("mmovseg_jax.predict", *predict_args(tmp_path / "no_model", inputs, tmp_path), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "no_model: no such folder" in proc.stderr
    assert not (tmp_path / "mask.png").exists()


NAN_WARNING = ("warning: --sar {}: 5 of 768 pixels have no backscatter (4 NaN/inf, 1 no-data: 0); they are set "
               "to 0 (--sar-nodata refuse stops instead)")


def test_predict_sar_nodata_default_sets_zero_with_warning(inputs, tmp_path, capsys):
    """Default policy: one warning line counting the pixels, which become 0; the other
    pixels are those of a clean file. Linear units also count values <= 0."""
    image = predict.read_sar(inputs / "nan_sar.tif", "db", (-25.0, 5.0))
    assert capsys.readouterr().err.strip() == NAN_WARNING.format(inputs / "nan_sar.tif")
    assert image[0, :3].tolist() == [0, 0, 0] and image[1, 0] == 0 and image[2, 0] == 0
    clean = sar_db()
    clean[0, :3], clean[1, 0], clean[2, 0] = -25.0, -25.0, -25.0  # the low end of the range maps to 0 too
    tifffile.imwrite(tmp_path / "clean.tif", clean)
    np.testing.assert_array_equal(image, predict.read_sar(tmp_path / "clean.tif", "db", (-25.0, 5.0)))
    assert capsys.readouterr().err == ""  # a clean file: no warning
    linear = np.full((4, 4), 0.01, np.float32)
    linear[0, 0], linear[0, 1], linear[0, 2] = -1.0, 0.0, np.nan
    tifffile.imwrite(tmp_path / "linear.tif", linear)
    predict.read_sar(tmp_path / "linear.tif", "linear", (-25.0, 5.0))
    assert "3 of 16 pixels have no backscatter (1 NaN/inf, 2 no-data: 0 or <= 0 linear)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="linear.tif: 3 of 16 pixels .* refused by --sar-nodata refuse"):
        predict.read_sar(tmp_path / "linear.tif", "linear", (-25.0, 5.0), "refuse")


@pytest.mark.slow
def test_predict_sar_nodata_default_cli_completes(model_dir, inputs, tmp_path):
    """The user sees the one warning line and gets finite outputs (loads and runs the model)."""
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("mmovseg_jax.predict", *predict_args(model_dir, inputs, out, **{"--sar": inputs / "nan_sar.tif"}))
    assert proc.returncode == 0, proc.stderr
    warnings_ = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings_ == [NAN_WARNING.format(inputs / "nan_sar.tif")]
    probs = np.load(out / "p.npy")
    assert probs.shape == (2, H, W) and np.isfinite(probs).all()


def test_predict_float_rgb_nan_warns(tmp_path, capsys):
    rgb = rgb_tile().astype(np.float32)
    rgb[0, 0, 1] = np.nan
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    out = predict.read_rgb(tmp_path / "rgb.tif")
    assert out[0, 0].tolist() == [0, 0, 0]
    assert capsys.readouterr().err.strip() == (f"warning: --rgb {tmp_path / 'rgb.tif'}: 1 of 768 pixels are NaN "
                                              "or inf; they are set to 0")


# ------------------------------------------------------------------------------- data loaders (pack CLI)

def write_labelled(root: Path, names=("a", "b", "c"), classes: int = 3) -> Path:
    for sub in ("rgb", "sar", "lab"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        Image.fromarray(rgb_tile(n)).save(root / "rgb" / f"{name}.png")
        Image.fromarray(rgb_tile(n)[..., 0]).save(root / "sar" / f"{name}.png")
        label = np.random.default_rng(n).integers(0, classes, (H, W)).astype(np.uint8)
        label[0] = 255
        Image.fromarray(label).save(root / "lab" / f"{name}.png")
    return root


def pack_args(root: Path, out: Path, *extra) -> list:
    return ["--layout", "folder", "--root", root, "--label-dir", "lab", "--out", out, *extra]


def _label_outside_classes(root: Path) -> list[str]:
    label = np.array(Image.open(root / "lab" / "b.png"))
    label[3, 3], label[4, 4] = 3, 9
    Image.fromarray(label).save(root / "lab" / "b.png")
    return [f"{root / 'lab' / 'b.png'}: label values [3, 9] are not allowed", "classes water, road, forest"]


def _label_size(root: Path) -> list[str]:
    Image.fromarray(np.zeros((H + 2, W), np.uint8)).save(root / "lab" / "b.png")
    return ["image sizes differ", str(root / "lab" / "b.png"), f"({H + 2}, {W})"]


def _label_dtype(root: Path) -> list[str]:
    (root / "lab" / "b.png").unlink()
    tifffile.imwrite(root / "lab" / "b.tif", np.zeros((H, W), np.float32))
    return [f"{root / 'lab' / 'b.tif'}: label must hold integers, got dtype float32"]


def _truncated_geotiff(root: Path) -> list[str]:
    (root / "sar" / "b.png").unlink()
    tifffile.imwrite(root / "sar" / "b.tif", np.zeros((256, 256), np.uint8))
    truncate(root / "sar" / "b.tif")
    return [f"{root / 'sar' / 'b.tif'}: cannot be read as an image"]


@pytest.mark.parametrize("make", [_label_outside_classes, _label_size, _label_dtype, _truncated_geotiff],
                         ids=["label-outside-classes", "label-size", "label-dtype", "truncated-geotiff"])
def test_pack_refuses_bad_sample(make, tmp_path):
    root = write_labelled(tmp_path / "ds")
    needles = make(root)
    out = tmp_path / "out" / "ds.array_record"
    out.parent.mkdir()
    proc = run_cli("data.pack_arrayrecord", *pack_args(root, out, "--classes", "water,road,forest"))
    assert_refused(proc, *needles, "(nothing was written)")
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("args, needles", [
    (["--classes", "water,road,water"], ["--classes 'water,road,water': duplicate class names: water"]),
    (["--classes", " , "], ["--classes ' , ': the class list is empty"]),
    (["--root", "missing_root"], ["missing folder(s): ", "missing_root/rgb, "]),
], ids=["duplicate-classes", "empty-classes", "missing-root"])
def test_pack_refuses_bad_arguments(args, needles, tmp_path):
    root = write_labelled(tmp_path / "ds")
    out = tmp_path / "out" / "ds.array_record"
    out.parent.mkdir()
    base = pack_args(root, out, "--classes", "water,road,forest")
    if args[0] == "--root":
        base[base.index("--root") + 1] = tmp_path / args[1]
    else:
        base = pack_args(root, out, *args)
    assert_refused(run_cli("data.pack_arrayrecord", *base), *needles)
    assert list(out.parent.iterdir()) == []


def test_pack_skip_bad_samples_counts(tmp_path):
    from mmovseg_jax.data.arrayrecord import ArrayRecordPairs

    root = write_labelled(tmp_path / "ds")
    _label_outside_classes(root)
    out = tmp_path / "ds.array_record"
    proc = run_cli("data.pack_arrayrecord", *pack_args(root, out, "--classes", "water,road,forest",
                                                         "--skip-bad-samples"))
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "record 1 skipped" in warned[0] and "b.png: label values [3, 9]" in warned[0]
    assert "pack: wrote 2 records" in proc.stderr and "skipped 1 bad sample(s)" in proc.stderr
    packed = ArrayRecordPairs(out)
    assert len(packed) == 2
    want = LabelledFolder(root, "rgb", "sar", "lab", ("water", "road", "forest"))
    np.testing.assert_array_equal(packed[1]["label"], want[2]["label"])  # a, c: b left out


# ------------------------------------------------------------------------------- skip_bad_samples (library)

def test_sources_skip_bad_samples_and_count(tmp_path):
    root = write_labelled(tmp_path / "ds", names=("a", "b", "c", "d"))
    _label_outside_classes(root)  # b: label values outside the class list
    truncate(root / "rgb" / "d.png", 100)  # d: truncated PNG
    classes = ("water", "road", "forest")

    strict = LabelledFolder(root, "rgb", "sar", "lab", classes)
    with pytest.raises(ValueError, match="b.png: label values"):
        strict[1]
    assert strict.skipped == 0

    src = LabelledFolder(root, "rgb", "sar", "lab", classes, skip_bad_samples=True)
    with pytest.warns(UserWarning, match="skipping bad sample 'b'"):
        rec = src[1]
    assert int(rec["index"]) == 2  # replaced by the next readable sample
    np.testing.assert_array_equal(rec["label"], strict[2]["label"])
    with pytest.warns(UserWarning, match=r"skipping bad sample 'd'.*d\.png: cannot be read"):
        rec = src[3]
    assert int(rec["index"]) == 0  # wraps around
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad samples: counted again, not warned again
        assert int(src[1]["index"]) == 2
        for i in (0, 2):
            assert int(src[i]["index"]) == i
    assert src.skipped == 3 and sorted(src.bad_samples) == ["b", "d"]
    assert "skipped 3 bad sample request(s) (2 distinct: b, d)" in src.skip_report()

    copy = pickle.loads(pickle.dumps(src))  # Grain workers get a pickled copy
    assert copy.skipped == 3 and int(copy[1]["index"]) == 2 and copy.skipped == 4

    for name in "abc":
        truncate(root / "rgb" / f"{name}.png", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="all 4 samples are bad"):
            PairedFolder(root, skip_bad_samples=True)[0]


# ------------------------------------------------------------------------------- clouds

def test_clouds_refuses_truncated_image(tmp_path):
    Image.fromarray(rgb_tile()).save(tmp_path / "tile.png")
    truncate(tmp_path / "tile.png")
    proc = run_cli("mmovseg_jax.clouds", tmp_path / "tile.png", tmp_path / "cloudy.png")
    assert_refused(proc, f"IN {tmp_path / 'tile.png'}: cannot be read as an image")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tile.png"]
