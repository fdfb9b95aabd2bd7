"""The whole released MM-OVSeg model vs the authors' own PyTorch outputs.

The release checkpoint is rebuilt from the fixture manifest (every key, buffers from
fixture.npz), saved as the authors save it ({"model": state_dict}), converted with
`convert.to_flax` (format detected, shifted-window masks checked), and run on the
stored pixels and class names. Head logits and output probabilities must match the
release's; the checkpoint written back by `convert.to_torch` must equal the rebuilt one.
"""

from __future__ import annotations

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import RELEASE_FIXTURE, check_close
from convert.to_flax import convert_to_flax
from convert.to_torch import convert_to_torch
from mmovseg_jax.data import preprocess
from mmovseg_jax.models import mmovseg
from mmovseg_jax.models.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

if not (RELEASE_FIXTURE / "manifest.json").is_file():
    pytest.skip(f"release fixture not found at {RELEASE_FIXTURE}", allow_module_level=True)


def rebuild_checkpoint(manifest: dict, npz) -> dict[str, torch.Tensor]:
    """Every tensor of the released model's state dict, by the fixture README's rule."""
    state = {}
    for key, spec in manifest["weights"].items():
        if spec.get("buffer"):
            state[key] = torch.from_numpy(np.asarray(npz[f"buffer/{key}"]))
            continue
        rng = np.random.default_rng(zlib.crc32(key.encode()) ^ manifest["seed"])
        value = spec["base"] + spec["std"] * rng.standard_normal(spec["shape"], dtype=np.float32)
        state[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return state


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release_model")
    manifest = json.loads((RELEASE_FIXTURE / "manifest.json").read_text())
    with np.load(RELEASE_FIXTURE / "fixture.npz") as z:
        stored = {k: z[k] for k in z.files}
    state = rebuild_checkpoint(manifest, stored)
    torch.save({"model": state}, folder / "release.pth")
    converted = convert_to_flax(folder / "release.pth", folder / "flax")
    return manifest, stored, state, folder, converted


def test_release_checkpoint_outputs(release):
    manifest, stored, _, _, converted = release
    model = mmovseg.load(converted)
    cfg = model.config
    assert cfg.use_sar and cfg.dino.patch_size == 8 and cfg.clip.vision.patch_size == 16
    assert cfg.head.num_layers == 2 and cfg.head.window == 12 and cfg.image_size == manifest["input_size"]
    rgb = preprocess.normalize(jnp.asarray(stored["input_rgb"].transpose(1, 2, 0))[None])
    sar = preprocess.normalize(preprocess.sar_as_rgb(jnp.asarray(stored["input_sar"])[None]))
    tokens = mmovseg.tokenize_classes(Tokenizer(converted), manifest["classes"], [manifest["template"]])
    forward = jax.jit(lambda m, r, s, t: m(r, s, t))
    logits = forward(model, rgb, sar, jnp.asarray(tokens))
    assert logits.shape == (1, len(manifest["classes"]), 96, 96)
    check_close("release head logits (1, 5, 96, 96)", logits, stored["head/logits"])
    probs = mmovseg.probabilities(logits, (384, 384))[0]
    check_close("release output probabilities (5, 384, 384)", probs, stored["output/probabilities"])
    ref = stored["output/probabilities"]
    top2 = np.sort(ref, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4  # pixels without a near tie
    assert np.array_equal(np.argmax(np.asarray(probs), 0)[clear], np.argmax(ref, 0)[clear])


def test_release_checkpoint_round_trip(release):
    _, _, state, folder, converted = release
    back = convert_to_torch(converted, folder / "back.pth")
    written = torch.load(back, weights_only=True)
    assert list(written) == ["model"]
    written = written["model"]
    assert sorted(written) == sorted(state)
    for key, value in state.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
