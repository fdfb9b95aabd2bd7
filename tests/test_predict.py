"""Inference API (`mmovseg_jax.inference.Segmenter`) and the prediction CLI
(`mmovseg_jax.predict`) on a tiny MM-OVSeg model with random weights, saved and loaded
through the model-folder format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmovseg_jax import inference, predict
from mmovseg_jax.data import preprocess
from mmovseg_jax.evaluation.sliding_window import sliding_window_probabilities
from mmovseg_jax.inference import Segmenter
from mmovseg_jax.models import clip, def_head, dino, mmovseg, params, storage
from mmovseg_jax.models.tokenizer import BUNDLED_BPE, Tokenizer, tokenizer_files

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["water", "road", "forest"]
SIZE = 64


def tiny_config() -> mmovseg.Config:
    return mmovseg.Config(
        clip=clip.Config(vision=clip.VisionConfig(patch_size=16, width=64, depth=2, num_heads=1, mlp_dim=128,
                                                  image_size=SIZE),
                         text=clip.TextConfig(width=32, depth=2, num_heads=2, mlp_dim=64), embed_dim=32),
        dino=dino.Config(patch_size=8, width=48, depth=4, num_heads=3, mlp_dim=96, image_size=SIZE,
                         pos_interpolation="dino"),
        head=def_head.HeadConfig(embed_dim=32, hidden_dim=32, window=4, pad_len=16, appearance_proj_dim=16,
                                 text_proj_dim=16, decoder_dims=(32, 16), guidance_dims=(32, 16),
                                 clip_guidance_proj_dims=(16, 16), dino_guidance_proj_dims=(16, 16)),
        image_size=SIZE, clip_guidance_blocks=(0, 1), dino_blocks=(1, 2, 3))


def random_params(config: mmovseg.Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters of a useful scale, drawn on the host (eager init is slow):
    norm scales 1 + 0.1 N, kernels N(0, 1/fan_in), other vectors and tables 0.1-0.5 N."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, (shape, dtype) in params.param_shapes_of(storage.build_abstract("mmovseg", config)).items():
        noise = rng.standard_normal(shape)
        if key.endswith("scale") and len(shape) == 1:
            value = 1 + 0.1 * noise
        elif key.endswith("logit_scale"):
            value = np.full(shape, np.log(20.0))
        elif len(shape) >= 2 and "embedding" not in key:
            value = noise / np.sqrt(np.prod(shape[:-1]))
        elif len(shape) >= 2:
            value = 0.5 * noise
        else:
            value = 0.1 * noise
        out[key] = value.astype(dtype)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = tiny_config()
    return storage.save(tmp_path_factory.mktemp("tiny") / "model", "mmovseg", cfg, random_params(cfg),
                        source={"test": "random weights"}, files=tokenizer_files(BUNDLED_BPE))


@pytest.fixture(scope="module")
def seg(model_dir) -> Segmenter:
    return Segmenter.load(model_dir, batch_size=8)


@pytest.fixture(scope="module")
def direct(seg, model_dir):
    """Reference path: the model's own jitted forward on normalised inputs at S x S, and its
    token ids -> (N, T, S, S) probabilities (rgb (N, S, S, 3), sar (N, S, S), 0-255)."""
    model, tokenizer = seg.model, Tokenizer(model_dir)
    forward = jax.jit(lambda m, r, s, t: mmovseg.probabilities(m(r, s, t), (SIZE, SIZE)))

    def run(rgb, sar, classes=CLASSES):
        r = preprocess.normalize(jnp.asarray(rgb))
        s = preprocess.normalize(preprocess.sar_as_rgb(jnp.asarray(sar)))
        tokens = jnp.asarray(mmovseg.tokenize_classes(tokenizer, classes, model.config.templates))
        return np.asarray(forward(model, r, s, tokens))

    return run


def tile(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (h, w), dtype=np.uint8)


def test_model_sized_tile_equals_direct_forward(seg, direct):
    rgb, sar = tile(SIZE, SIZE)
    probs = seg.probabilities(rgb, sar, CLASSES)
    assert probs.shape == (3, SIZE, SIZE) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, direct(rgb[None], sar[None])[0], atol=1e-5)
    np.testing.assert_allclose(seg.probabilities(rgb, sar[..., None], CLASSES), probs, atol=1e-6)
    assert seg.predict(rgb, sar, CLASSES).dtype == np.uint8
    np.testing.assert_array_equal(seg.predict(rgb, sar, CLASSES), probs.argmax(0))


def test_small_tile_resized_like_the_release(seg, direct):
    """A 40x50 tile: resized to S (bilinear, half-pixel), predicted, probabilities resized back."""
    from mmovseg_jax.ops.resize import resize_bilinear

    rgb, sar = tile(40, 50, seed=1)
    probs = seg.probabilities(rgb, sar, CLASSES)
    assert probs.shape == (3, 40, 50)
    up_rgb = resize_bilinear(rgb.astype(np.float32), (SIZE, SIZE), axes=(0, 1))
    up_sar = resize_bilinear(sar.astype(np.float32), (SIZE, SIZE), axes=(0, 1))
    want = resize_bilinear(direct(up_rgb[None], up_sar[None])[0], (40, 50), axes=(-2, -1))
    np.testing.assert_allclose(probs, want, atol=1e-5)


def test_batch_equals_single_tiles(seg):
    tiles = [tile(40, 50, seed=s) for s in range(3)]
    rgb, sar = np.stack([t[0] for t in tiles]), np.stack([t[1] for t in tiles])
    small_batches = Segmenter(seg.model, seg.tokenizer, batch_size=2)  # 3 tiles: one padded chunk
    out = small_batches.probabilities_batch(rgb, sar, CLASSES)
    assert out.shape == (3, 3, 40, 50) and out.dtype == np.float32
    for i in range(3):
        np.testing.assert_allclose(out[i], seg.probabilities(rgb[i], sar[i], CLASSES), atol=1e-5)


def test_large_tile_uses_sliding_window_with_sar(seg, direct):
    rgb, sar = tile(150, 100, seed=2)
    probs = seg.probabilities(rgb, sar, CLASSES)
    assert probs.shape == (3, 150, 100) and probs.dtype == np.float32
    assert np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1
    assert seg.windows(150, 100) == 4 * 2 + 1  # rows 0, 42, 84, 86; columns 0, 36; global view
    want = sliding_window_probabilities(lambda r, s: direct(r, s), rgb, sar, window=SIZE, batch_size=8)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    other_sar = sar.copy()
    other_sar[100:] = 255 - other_sar[100:]  # SAR windows are built: changing the SAR changes the output
    assert np.abs(seg.probabilities(rgb, other_sar, CLASSES) - probs)[:, 110:].max() > 1e-4
    batch = seg.probabilities_batch(rgb[None], sar[None], CLASSES)
    np.testing.assert_allclose(batch[0], probs, atol=1e-6)


def test_text_embeddings_per_class_list(seg, monkeypatch):
    calls = []
    encode = inference._encode_text
    monkeypatch.setattr(inference, "_encode_text", lambda *a: calls.append(1) or encode(*a))
    fresh = Segmenter(seg.model, seg.tokenizer)
    a = fresh.text(CLASSES)
    assert a.shape == (3, 1, 32) and len(calls) == 1
    assert fresh.text(list(CLASSES)) is a and len(calls) == 1  # cached for the same list
    b = fresh.text(["building", "road"])
    assert b.shape == (2, 1, 32) and len(calls) == 2  # another list: encoded, not reused
    np.testing.assert_allclose(b[1], a[1], atol=1e-6)  # "road" in both lists
    assert np.abs(np.asarray(b[0]) - np.asarray(a[0])).max() > 1e-3
    reordered = fresh.text(CLASSES[::-1])
    assert len(calls) == 3
    np.testing.assert_allclose(reordered, a[::-1], atol=1e-6)
    rgb, sar = tile(SIZE, SIZE, seed=3)
    p_a, p_b = fresh.probabilities(rgb, sar, CLASSES), fresh.probabilities(rgb, sar, ["building", "road"])
    assert p_b.shape == (2, SIZE, SIZE)
    assert np.abs(p_b - p_a[:2]).max() > 1e-4  # classes attend to each other: the list matters
    np.testing.assert_allclose(fresh.probabilities(rgb, sar, np.asarray(b)), p_b, atol=1e-6)
    for bad in ([], ["road", "road"], "water", ["water", " "]):
        with pytest.raises(ValueError):
            fresh.text(bad)


@pytest.mark.parametrize("rgb, sar, match", [
    (np.zeros((64, 64, 3), np.uint8), np.zeros((64, 60), np.uint8), "sizes differ"),
    (np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64), np.uint8), "rgb must be"),
    (np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8), "sar must be single-band"),
    (np.full((64, 64, 3), np.nan, np.float32), np.zeros((64, 64), np.uint8), "non-finite"),
    (np.zeros((64, 64, 3), np.uint8), None, "SAR branch"),
])
def test_input_checks(seg, rgb, sar, match):
    with pytest.raises(ValueError, match=match):
        seg.probabilities(rgb, sar, CLASSES)


def test_load_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        Segmenter.load(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="not an MM-OVSeg model folder"):
        Segmenter.load(tmp_path)


# -- CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A 70x90 RGB PNG and a float32 dB SAR GeoTIFF (larger than the model input)."""
    import tifffile

    folder = tmp_path_factory.mktemp("pair")
    rgb, _ = tile(70, 90, seed=4)
    Image.fromarray(rgb).save(folder / "rgb.png")
    db = np.random.default_rng(5).uniform(-30, 8, (70, 90)).astype(np.float32)
    tifffile.imwrite(folder / "sar.tif", db)
    return folder / "rgb.png", folder / "sar.tif", rgb


def test_cli_writes_outputs(model_dir, pair, tmp_path, capsys):
    rgb_path, sar_path, rgb = pair
    out = tmp_path / "mask.png"
    rc = predict.main(["--checkpoint", str(model_dir), "--rgb", str(rgb_path), "--sar", str(sar_path),
                       "--classes", "water, road,forest", "--out", str(out),
                       "--probabilities", str(tmp_path / "p.npy"), "--overlay", str(tmp_path / "overlay.png")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "water, road, forest (3)" in printed and "70x90" in printed and "seconds" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png", "mask_index.png", "overlay.png", "p.npy"]

    probs = np.load(tmp_path / "p.npy")
    assert probs.shape == (3, 70, 90) and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.max() <= 1
    index = np.array(Image.open(tmp_path / "mask_index.png"))
    assert Image.open(tmp_path / "mask_index.png").mode == "L" and index.shape == (70, 90)
    np.testing.assert_array_equal(index, probs.argmax(0))

    colours = predict.palette(3)
    mask = np.array(Image.open(out).convert("RGB"))
    assert mask.shape[0] >= 70 and mask.shape[1] > 90  # legend panel on the right
    np.testing.assert_array_equal(mask[:70, :90], colours[index])
    legend = mask[:, 90:]
    for c in colours:  # every class has its swatch
        assert (legend == c).all(-1).sum() > 50
    blend = np.array(Image.open(tmp_path / "overlay.png").convert("RGB"))[:70, :90]
    np.testing.assert_array_equal(blend, predict.overlay(rgb, colours[index]))


@pytest.mark.parametrize("case", ["missing rgb", "size mismatch", "duplicate classes", "empty classes",
                                  "not a model"])
def test_cli_errors(case, model_dir, pair, tmp_path, capsys):
    rgb_path, sar_path, _ = pair
    args = {"--checkpoint": str(model_dir), "--rgb": str(rgb_path), "--sar": str(sar_path),
            "--classes": "water,road", "--out": str(tmp_path / "out" / "mask.png"),
            "--probabilities": str(tmp_path / "out" / "p.npy")}
    (tmp_path / "out").mkdir()
    if case == "missing rgb":
        args["--rgb"], expect = str(tmp_path / "nope.png"), "nope.png"
    elif case == "size mismatch":
        Image.fromarray(np.zeros((70, 80), np.uint8)).save(tmp_path / "small_sar.png")
        args["--sar"], expect = str(tmp_path / "small_sar.png"), "small_sar.png is 70x80"
    elif case == "duplicate classes":
        args["--classes"], expect = "water,road,water", "duplicate class names: water"
    elif case == "empty classes":
        args["--classes"], expect = " , ", "--classes: the class list is empty"
    else:
        (tmp_path / "fake").mkdir()
        args["--checkpoint"], expect = str(tmp_path / "fake"), "not an MM-OVSeg model folder"
    rc = predict.main([x for kv in args.items() for x in kv])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_subprocess_exit_code(model_dir, pair, tmp_path):
    rgb_path, _, _ = pair
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "sar.png")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "mmovseg_jax.predict", "--checkpoint", str(model_dir),
                           "--rgb", str(rgb_path), "--sar", str(tmp_path / "sar.png"), "--classes", "water",
                           "--out", str(tmp_path / "mask.png")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --rgb") and "sar.png is 10x10" in proc.stderr
    assert not (tmp_path / "mask.png").exists()
