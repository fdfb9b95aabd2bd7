"""Our encoders vs the authors' own PyTorch outputs (shared/fixtures/official_release_b16).

The released MM-OVSeg model was run once with deterministic synthetic weights; its
checkpoint is rebuilt here key by key from the manifest (only the DINO and CLIP keys),
converted with `convert_to_flax` exactly as a released checkpoint would be (wrapped in
{"model": ...}, encoder taken by key prefix), and fed the stored pixels and tokens.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import RELEASE_FIXTURE, check_close, record
from convert.to_flax import convert_to_flax
from mmovseg_jax.models import clip, dino
from mmovseg_jax.models.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

FIXTURE = RELEASE_FIXTURE
DINO_BLOCKS = (3, 7, 11)  # the release's blocks 4, 8, 12
CLIP_PREFIX = "sem_seg_head.predictor.clip_model."
STAT_TOL = 1e-5  # on the mean and std of a whole (2305, 768) block output (std about 1)

if not (FIXTURE / "manifest.json").is_file() or not (FIXTURE / "fixture.npz").is_file():
    pytest.skip(f"release fixture not found at {FIXTURE} (expected ../shared beside the checkout)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def stored():
    with np.load(FIXTURE / "fixture.npz") as z:
        return {k: z[k] for k in z.files if not k.startswith("buffer/")}


def rebuild(manifest, prefix: str) -> dict[str, torch.Tensor]:
    """The release checkpoint's tensors under `prefix`, by the fixture's rule."""
    out = {}
    for key, spec in manifest["weights"].items():
        if not key.startswith(prefix):
            continue
        assert "buffer" not in spec, key
        rng = np.random.default_rng(zlib.crc32(key.encode()) ^ manifest["seed"])
        value = spec["base"] + spec["std"] * rng.standard_normal(spec["shape"], dtype=np.float32)
        out[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    assert out, prefix
    return out


def convert_subset(manifest, prefix: str, folder: Path, **kwargs) -> Path:
    """Saves the subset as a released checkpoint would hold it and converts it by prefix."""
    torch.save({"model": rebuild(manifest, prefix)}, folder / "release.pth")
    out = convert_to_flax(folder / "release.pth", folder / "flax", prefix=prefix, **kwargs)
    (folder / "release.pth").unlink()
    return out


def normalise(pixels: np.ndarray) -> jnp.ndarray:
    """(3, H, W) uint8 -> (1, H, W, 3) float32, CLIP mean/std on the 0-255 scale."""
    x = pixels.astype(np.float32).transpose(1, 2, 0)
    x = (x - np.asarray(clip.PIXEL_MEAN, np.float32)) / np.asarray(clip.PIXEL_STD, np.float32)
    return jnp.asarray(x[None])


@pytest.mark.parametrize("modality,prefix", [("rgb", "dino_model."), ("sar", "dino_sarmodel.")])
def test_dino(manifest, stored, tmp_path, modality, prefix):
    model = dino.load(convert_subset(manifest, prefix, tmp_path, pos_interpolation="dino"))
    cfg = model.config
    assert (cfg.patch_size, cfg.width, cfg.depth, cfg.num_heads, cfg.image_size) == (8, 768, 12, 12, 224)
    assert cfg.pos_interpolation == "dino" and cfg.layer_norm_eps == 1e-6
    if modality == "rgb":
        pixels = stored["input_rgb"]
    else:  # single-channel SAR, replicated to 3 channels as the release does
        pixels = np.repeat(stored["input_sar"][None], 3, axis=0)
    outs = model(normalise(pixels), DINO_BLOCKS, norm=True)
    for i, out in zip(DINO_BLOCKS, outs):
        out = np.asarray(out[0])
        assert out.shape == (1 + 48 * 48, 768)
        key = f"dino_{modality}/block{i + 1}"
        check_close(f"release DINO {modality} block{i + 1} first 256 tokens", out[:256], stored[f"{key}_first256"])
        mean, std = stored[f"{key}_mean_std"]
        d_mean = abs(float(out.mean(dtype=np.float64)) - mean)
        d_std = abs(float(out.std(dtype=np.float64)) - std)  # population std (ddof=0), as stored
        record(f"release DINO {modality} block{i + 1} |mean diff| (ref {mean:.3e})", d_mean, STAT_TOL)
        record(f"release DINO {modality} block{i + 1} |std diff| (ref {std:.4f})", d_std, STAT_TOL)
        assert d_mean <= STAT_TOL and d_std <= STAT_TOL


@pytest.fixture(scope="module")
def release_clip(manifest, tmp_path_factory):
    model = clip.load(convert_subset(manifest, CLIP_PREFIX, tmp_path_factory.mktemp("release_clip")))
    assert model.config.text.pooling == "argmax" and model.config.vision.patch_size == 16
    return model


def test_clip_dense(release_clip, stored, manifest):
    size = manifest["input_size"]
    dense = release_clip.encode_image(normalise(stored["input_rgb"]), dense=True).dense
    assert dense.shape == (1, 1 + (size // 16) ** 2, 512)
    check_close("release CLIP dense (577, 512) at 384", dense[0], stored["clip/dense"])


def test_clip_text_stored_tokens(release_clip, stored):
    tokens = jnp.asarray(stored["clip/tokens"].astype(np.int32))
    check_close("release CLIP text raw (stored tokens)", release_clip.encode_text(tokens), stored["clip/text_raw"])


def test_clip_text_our_tokenizer(release_clip, stored, manifest):
    prompts = [manifest["template"].format(c) for c in manifest["classes"]]
    ids = Tokenizer()(prompts)
    ref_ids = stored["clip/tokens"]
    # Same ids up to the end token (the release pads with 0, we with the end token).
    for ours, ref in zip(ids, ref_ids):
        n = int(np.argmax(ref == ref.max())) + 1
        assert ours[:n].tolist() == ref[:n].tolist()
    check_close("release CLIP text raw (our tokenizer)", release_clip.encode_text(jnp.asarray(ids)),
                stored["clip/text_raw"])
