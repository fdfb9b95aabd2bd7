"""data/make_cloudy.py: cloudy copies of an image folder, reproducible per file name, resumable."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from data import make_cloudy
from mmovseg_jax.data.clouds import PRESETS

REPO = Path(__file__).resolve().parents[1]
H, W = 48, 64
NAMES = ("a.png", "b.png", "c.jpg", "d.tif", "e.png")


def _scene(rng: np.random.Generator) -> np.ndarray:
    """A smooth-ish random scene, so clouds visibly change it."""
    base = rng.integers(20, 200, (H // 8, W // 8, 3), dtype=np.uint8)
    return np.kron(base, np.ones((8, 8, 1), np.uint8)).astype(np.uint8)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clear")
    rng = np.random.default_rng(0)
    for name in NAMES:
        rgb = _scene(rng)
        if name.endswith(".tif"):
            tifffile.imwrite(folder / name, rgb, photometric="rgb")
        else:
            Image.fromarray(rgb).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    return folder


def _run(*args: str) -> tuple[int, str]:
    stream = io.StringIO()
    rc = make_cloudy.main([str(a) for a in args], stream=stream)
    return rc, stream.getvalue()


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "clouds.json"}


def _error_line(log: str) -> str:
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log
    return errors[0]


@pytest.fixture(scope="module")
def thick(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("thick") / "out"
    rc, log = _run("--src", src, "--out", out, "--preset", "big", "--preset", "local", "--seed", "0",
                   "--opacity-maps")
    assert rc == 0, log
    assert "5/5 images" in log and "images/s" in log and "ETA" in log
    return out


def test_outputs_mirror_inputs(src, thick):
    assert sorted(_bytes(thick)) == sorted(NAMES)  # same names and extensions; txt / hidden files ignored
    changed = 0
    for name in NAMES:
        clear = np.asarray(Image.open(src / name)) if not name.endswith(".tif") else tifffile.imread(src / name)
        cloudy = np.asarray(Image.open(thick / name)) if not name.endswith(".tif") else tifffile.imread(thick / name)
        assert cloudy.shape == (H, W, 3) and cloudy.dtype == np.uint8
        changed += int(np.abs(cloudy.astype(int) - clear.astype(int)).mean() > 1.0)
    assert changed == len(NAMES)


def test_clouds_json_records_parameters(src, thick):
    meta = json.loads((thick / "clouds.json").read_text())
    assert meta["tool"] == "data.make_cloudy" and meta["version"] == make_cloudy.TOOL_VERSION
    assert meta["seed"] == 0 and meta["presets"] == ["big", "local"] and meta["shadows"] is False
    assert meta["source"] == str(src.resolve()) and meta["ext"] is None
    for name in ("big", "local"):
        assert meta["params"][name] == json.loads(json.dumps(dataclasses.asdict(PRESETS[name])))
    assert sorted(meta["files"]) == sorted(NAMES)
    for name, entry in meta["files"].items():
        assert entry["output"] == name
        assert entry["preset"] == make_cloudy.draw(0, name, ["big", "local"])[0]


def test_opacity_maps(thick):
    maps = sorted((thick / "opacity").iterdir())
    assert [p.name for p in maps] == sorted(Path(n).stem + ".png" for n in NAMES)
    for p in maps:
        with Image.open(p) as im:
            assert im.mode == "L" and im.size == (W, H)
            a = np.asarray(im)
        assert a.max() > 0  # big / local clouds reach full opacity somewhere


def test_same_seed_same_bytes_other_seed_differs(src, thick, tmp_path):
    rc, log = _run("--src", src, "--out", tmp_path / "again", "--preset", "big", "--preset", "local", "--seed", "0")
    assert rc == 0, log
    assert _bytes(tmp_path / "again") == _bytes(thick)
    rc, log = _run("--src", src, "--out", tmp_path / "seed1", "--preset", "big", "--preset", "local", "--seed", "1")
    assert rc == 0, log
    other = _bytes(tmp_path / "seed1")
    assert all(other[n] != _bytes(thick)[n] for n in NAMES)


def test_subset_gives_same_bytes(src, thick, tmp_path):
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in ("e.png", "c.jpg"):
        shutil.copy(src / name, subset / name)
    rc, log = _run("--src", subset, "--out", tmp_path / "out", "--preset", "big", "--preset", "local")
    assert rc == 0, log
    full = _bytes(thick)
    assert _bytes(tmp_path / "out") == {n: full[n] for n in ("c.jpg", "e.png")}
    meta = json.loads((tmp_path / "out" / "clouds.json").read_text())
    full_meta = json.loads((thick / "clouds.json").read_text())
    assert meta["files"] == {n: full_meta["files"][n] for n in ("c.jpg", "e.png")}


def test_rerun_skips_existing_and_fills_gaps(src, thick, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(thick, out)
    (out / "a.png").write_bytes(b"sentinel")  # an existing output is not rewritten
    (out / "b.png").unlink()                  # a missing one is made again, identically
    (out / "opacity" / "c.png").unlink()      # a missing opacity map redoes its image
    rc, log = _run("--src", src, "--out", out, "--preset", "big", "--preset", "local", "--opacity-maps")
    assert rc == 0, log
    assert "wrote 2, skipped 3" in log
    assert (out / "a.png").read_bytes() == b"sentinel"
    assert (out / "b.png").read_bytes() == (thick / "b.png").read_bytes()
    assert (out / "opacity" / "c.png").read_bytes() == (thick / "opacity" / "c.png").read_bytes()
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    assert sorted(json.loads((out / "clouds.json").read_text())["files"]) == sorted(NAMES)


def test_mismatching_parameters_refused(src, thick, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(thick, out)
    before = _bytes(out)
    for extra in (["--preset", "big", "--preset", "local", "--seed", "1"], ["--preset", "thin"],
                  ["--preset", "big", "--preset", "local", "--shadows"]):
        rc, log = _run("--src", src, "--out", out, *extra)
        assert rc == 2
        line = _error_line(log)
        assert "clouds.json records different parameters" in line
    assert "seed: recorded 0, now 1" in _run("--src", src, "--out", out, "--preset", "big", "--preset", "local",
                                             "--seed", "1")[1]
    assert _bytes(out) == before


def test_ext_and_shadows(src, tmp_path):
    out = tmp_path / "out"
    rc, log = _run("--src", src, "--out", out, "--preset", "thin", "--ext", "png", "--shadows", "--seed", "2")
    assert rc == 0, log
    assert sorted(_bytes(out)) == sorted(Path(n).stem + ".png" for n in NAMES)
    meta = json.loads((out / "clouds.json").read_text())
    assert meta["ext"] == ".png" and meta["shadows"] is True and meta["params"]["thin"]["shadows"] is True
    assert meta["files"]["d.tif"] == {"output": "d.png", "preset": "thin"}


def test_layout_oem(src, tmp_path):
    root = tmp_path / "oem"
    (root / "train" / "rgb_images").mkdir(parents=True)
    for name in ("a.png", "d.tif"):
        shutil.copy(src / name, root / "train" / "rgb_images" / name)
    rc, log = _run("--layout", "oem", "--variant", "thick", "--src", root, "--out", tmp_path / "OEM", "--ext", "png")
    assert rc == 0, log
    assert "split val skipped" in log
    thick = tmp_path / "OEM" / "train" / "rgb_cloud"
    assert sorted(_bytes(thick)) == ["a.png", "d.png"]
    assert json.loads((thick / "clouds.json").read_text())["presets"] == ["big", "local"]
    rc, log = _run("--layout", "oem", "--variant", "thin", "--src", root, "--out", tmp_path / "OEM")
    assert rc == 0, log
    thin = tmp_path / "OEM" / "train" / "rgb_cloud_thin"
    assert sorted(_bytes(thin)) == ["a.png", "d.tif"]
    assert json.loads((thin / "clouds.json").read_text())["presets"] == ["thin"]


def test_errors_exit_2_with_one_line(src, tmp_path):
    cases = [
        (["--src", tmp_path / "missing", "--out", tmp_path / "o1", "--preset", "thin"], "no such folder"),
        (["--src", src, "--out", tmp_path / "o2"], "--preset"),
        (["--src", src, "--out", tmp_path / "o3", "--preset", "cumulus"], "cumulus"),
        (["--src", src, "--out", tmp_path / "o4", "--preset", "thin", "--ext", "bmp"], "--ext"),
        (["--src", src, "--out", src, "--preset", "thin"], "source folder"),
        (["--layout", "oem", "--src", src, "--out", tmp_path / "o5"], "--variant"),
        (["--layout", "oem", "--variant", "thin", "--src", src, "--out", tmp_path / "o5"], "rgb_images"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["--src", empty, "--out", tmp_path / "o6", "--preset", "thin"], "no PNG/JPEG/TIFF"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "a.png").write_bytes(b"x")
    cases.append((["--src", src, "--out", taken, "--preset", "thin"], "no clouds.json"))
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cases.append((["--src", bad, "--out", tmp_path / "o7", "--preset", "thin"], "b.png"))
    for args, needle in cases:
        rc, log = _run(*args)
        assert rc == 2, (args, log)
        line = _error_line(log)
        assert needle in line, (needle, line)
    # the unreadable image stopped the run after a.png; a.png is recorded, no temporary files remain
    assert _bytes(tmp_path / "o7") == {"a.png": (tmp_path / "o7" / "a.png").read_bytes()}
    assert list(json.loads((tmp_path / "o7" / "clouds.json").read_text())["files"]) == ["a.png"]


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data.make_cloudy", "--src", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "out"), "--preset", "thin"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --src {tmp_path / 'missing'}: no such folder"]
