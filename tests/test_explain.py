"""The heatmap CLI (`python -m mmovseg_jax.explain`) on a tiny random-weight model folder:
outputs, the CLIP and fused-DINO maps against an independent computation (NumPy cosine,
PyTorch resizing), the final map against `Segmenter.probabilities`, and bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import check_close
from mmovseg_jax import explain
from mmovseg_jax.inference import Segmenter
from mmovseg_jax.models import storage
from mmovseg_jax.models.clip import PIXEL_MEAN, PIXEL_STD
from mmovseg_jax.models.mmovseg import tokenize_classes
from mmovseg_jax.models.tokenizer import BUNDLED_BPE, Tokenizer, tokenizer_files
from test_predict import random_params, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = tiny_config()
    return storage.save(tmp_path_factory.mktemp("tiny") / "model", "mmovseg", cfg, random_params(cfg, seed=7),
                        source={"test": "random weights"}, files=tokenizer_files(BUNDLED_BPE))


@pytest.fixture(scope="module")
def seg(model_dir) -> Segmenter:
    return Segmenter.load(model_dir)


def write_pair(folder: Path, h: int, w: int, seed: int = 0) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """uint8 RGB and grey SAR PNGs of h x w (read back unchanged by the CLI)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    sar = rng.integers(0, 256, (h, w), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(sar, "L").save(folder / "sar.png")
    return folder / "rgb.png", folder / "sar.png", rgb, sar


def torch_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, C, h, w) -> (N, C, *size): PyTorch bilinear, half-pixel centres, no antialias."""
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(x, np.float32)), size=size, mode="bilinear",
                         align_corners=False).numpy()


def reference_maps(seg: Segmenter, model_dir: Path, rgb: np.ndarray, sar: np.ndarray,
                   prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(P, H, W) CLIP and fused-DINO cosine maps, computed here: inputs normalised with the
    CLIP mean/std and resized by PyTorch, text from the model's own text tower, the cosine
    in float64 NumPy, the G x G maps resized back by PyTorch."""
    model, cfg = seg.model, seg.config
    h, w = rgb.shape[:2]
    s, g = cfg.image_size, cfg.clip_grid

    def model_in(pixels: np.ndarray) -> jnp.ndarray:
        x = (pixels.astype(np.float32) - np.asarray(PIXEL_MEAN, np.float32)) / np.asarray(PIXEL_STD, np.float32)
        return jnp.asarray(torch_resize(x.transpose(2, 0, 1)[None], (s, s)).transpose(0, 2, 3, 1))

    tokens = tokenize_classes(Tokenizer(model_dir), prompts, cfg.templates)
    text = np.asarray(model.clip.encode_text(jnp.asarray(tokens.reshape(-1, tokens.shape[-1]))), np.float64)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)  # (P, E): one template

    rgb_in, sar_in = model_in(rgb), model_in(np.repeat(sar[..., None], 3, axis=-1))
    assert cfg.clip_input_size == s  # this model's CLIP sees the S x S input unresized
    clip_dense = np.asarray(model.clip.encode_image(rgb_in, (), dense=True).dense[0, 1:], np.float64)
    d = cfg.dino_grid  # DINO v1: the last requested block after the final norm, CLS dropped
    dino = sum(np.asarray(level(encoder(x, cfg.dino_blocks, norm=True)[2][:, 1:].reshape(1, d, d, -1))[0],
                          np.float64)
               for encoder, level, x in ((model.rgb_dino, model.rgb_levels.cost, rgb_in),
                                         (model.sar_dino, model.sar_levels.cost, sar_in)))

    def cosine(features: np.ndarray) -> np.ndarray:
        f = features.reshape(g * g, -1)
        f = f / np.linalg.norm(f, axis=-1, keepdims=True)
        return torch_resize((text @ f.T).reshape(1, len(prompts), g, g), (h, w))[0]

    return cosine(clip_dense), cosine(dino)


@pytest.mark.parametrize("h, w, prompts, classes", [
    (48, 56, ["forest", "water"], None),  # smaller than the model input; the prompts are the classes
    (70, 90, ["forest", "water"], "road, water"),  # larger: sliding window; classes road, water, forest
])
def test_cli_maps(h, w, prompts, classes, model_dir, seg, tmp_path, capsys):
    rgb_path, sar_path, rgb, sar = write_pair(tmp_path, h, w, seed=h)
    out = tmp_path / "out" / "fig.png"
    out.parent.mkdir()
    argv = ["--model", str(model_dir), "--rgb", str(rgb_path), "--sar", str(sar_path), "--out", str(out)]
    argv += [x for p in prompts for x in ("--prompt", p)] + (["--classes", classes] if classes else [])
    rc = explain.main(argv)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    context = [c.strip() for c in classes.split(",")] + ["forest"] if classes else prompts
    assert f"final panel with classes: {', '.join(context)}" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["fig.npz", "fig.png"]

    figure = Image.open(out)
    assert figure.format == "PNG" and figure.size[0] > 5 * 100 and figure.size[1] > len(prompts) * 100
    maps = np.load(out.with_suffix(".npz"))
    assert sorted(maps.files) == ["classes", "clip", "dino", "final", "prompts"]
    assert list(maps["prompts"]) == prompts and list(maps["classes"]) == context
    for key in ("clip", "dino", "final"):
        assert maps[key].shape == (len(prompts), h, w) and maps[key].dtype == np.float32, key

    want_clip, want_dino = reference_maps(seg, model_dir, rgb, sar, prompts)
    check_close(f"explain CLIP map vs NumPy cosine + torch resize ({h}x{w})", maps["clip"], want_clip, 1e-5)
    check_close(f"explain fused DINO map vs NumPy cosine + torch resize ({h}x{w})", maps["dino"], want_dino, 1e-5)
    probs = seg.probabilities(rgb, sar, context)
    check_close(f"explain final map vs Segmenter.probabilities ({h}x{w})", maps["final"],
                probs[[context.index(p) for p in prompts]], 1e-5)
    for key in ("clip", "dino"):  # real maps: not constant, cosines
        assert maps[key].std() > 1e-3 and np.abs(maps[key]).max() <= 1


@pytest.mark.parametrize("case", ["missing rgb", "empty prompt", "duplicate prompt", "unwritable folder",
                                  "missing folder", "size mismatch", "not a model", "no prompt"])
def test_cli_errors(case, model_dir, tmp_path, capsys, monkeypatch):
    rgb_path, sar_path, _, _ = write_pair(tmp_path, 40, 40)
    folder = tmp_path / "out"
    folder.mkdir()
    args = {"--model": str(model_dir), "--rgb": str(rgb_path), "--sar": str(sar_path), "--prompt": "forest",
            "--out": str(folder / "fig.png")}
    if case == "missing rgb":
        args["--rgb"], expect = str(tmp_path / "nope.png"), "--rgb " + str(tmp_path / "nope.png")
    elif case == "empty prompt":
        args["--prompt"], expect = "  ", "--prompt: empty prompt"
    elif case == "duplicate prompt":
        expect = "--prompt: duplicate prompts: forest"
    elif case == "unwritable folder":
        expect = f"folder {folder} is not writable"
        if os.geteuid() == 0:  # root writes through permission bits: report the folder as unwritable
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real(p, mode))
        else:
            folder.chmod(0o500)
    elif case == "missing folder":
        args["--out"], expect = str(tmp_path / "nowhere" / "fig.png"), "does not exist"
    elif case == "size mismatch":
        Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "small_sar.png")
        args["--sar"], expect = str(tmp_path / "small_sar.png"), "small_sar.png is 40x30"
    elif case == "not a model":
        (tmp_path / "fake").mkdir()
        args["--model"], expect = str(tmp_path / "fake"), "not an MM-OVSeg model folder"
    else:
        del args["--prompt"]
        expect = "the following arguments are required: --prompt"
    argv = [x for kv in args.items() for x in kv] + (["--prompt", "forest"] if case == "duplicate prompt" else [])
    rc = explain.main(argv)
    folder.chmod(0o700)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert "Traceback" not in err
    assert list(folder.iterdir()) == []


def test_cli_subprocess_exit_code(model_dir, tmp_path):
    rgb_path, sar_path, _, _ = write_pair(tmp_path, 40, 40)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "mmovseg_jax.explain", "--model", str(model_dir),
                           "--rgb", str(rgb_path), "--sar", str(sar_path), "--prompt", "",
                           "--out", str(tmp_path / "fig.png")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: --prompt: empty prompt in ['']"
    assert not (tmp_path / "fig.png").exists() and not (tmp_path / "fig.npz").exists()
