"""Shared helpers for the parity tests: tiny transformers models with random weights,
NCHW -> NHWC, and a recorder that prints every measured max-abs difference."""

from __future__ import annotations

import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

# Largest absolute difference accepted between our fp32 outputs and PyTorch's.
# The project's read-only shared folder (../shared beside the checkout, as in CI);
# MMOVSEG_SHARED points elsewhere, e.g. on a machine that got a copy of it.
SHARED = Path(os.environ.get("MMOVSEG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
RELEASE_FIXTURE = SHARED / "fixtures" / "official_release_b16"

TOL = 1e-4

torch.manual_seed(0)
torch.set_grad_enabled(False)

_MEASURED: list[tuple[str, float, float]] = []


def to_nhwc(x: torch.Tensor) -> jnp.ndarray:
    """(B, C, H, W) torch tensor -> (B, H, W, C) JAX array."""
    return jnp.asarray(x.permute(0, 2, 3, 1).contiguous().numpy())


def as_numpy(x) -> np.ndarray:
    """Tensor, JAX array or a transformers output holding `pooler_output` -> float64 numpy."""
    if hasattr(x, "pooler_output"):
        x = x.pooler_output
    if isinstance(x, torch.Tensor):
        x = x.detach().float().numpy()
    return np.asarray(x, dtype=np.float64)


def max_diff(a, b) -> float:
    a, b = as_numpy(a), as_numpy(b)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a - b).max())


def check_close(name: str, ours, ref, tol: float = TOL) -> float:
    """Asserts max |ours - ref| <= tol, printing and recording the number."""
    d = max_diff(ours, ref)
    _MEASURED.append((name, d, tol))
    print(f"[diff] {name}: max abs diff {d:.3e} (tol {tol:.2g})")
    assert d <= tol, f"{name}: max abs diff {d:.3e} > {tol:.0e}"
    return d


def record(name: str, value: float, bound: float) -> None:
    """Records a number checked against some other bound (relative errors, statistics)."""
    _MEASURED.append((name, value, bound))
    print(f"[diff] {name}: {value:.3e} (bound {bound:.2g})")


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("measured differences")
        for name, d, tol in _MEASURED:
            terminalreporter.write_line(f"{d:.3e}  (<= {tol:.2g})  {name}")


_TABLES = ("cls_token", "class_embedding", "position_embeddings", "position_embedding.weight",
           "token_embedding.weight")


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replaces every parameter with random values of a useful scale, in place.

    LayerNorm weights become 1 + 0.1 N(0, 1) and biases 0.1 N(0, 1) (a swapped or
    dropped norm shows); matrices N(0, 1/fan_in), so attention is far from uniform and a
    q/k/v mix-up shows; other vectors (biases, CLS/position/token tables) 0.1-0.5 N(0, 1).
    """
    g = torch.Generator().manual_seed(seed)
    norms = {id(p): kind for m in model.modules() if isinstance(m, torch.nn.LayerNorm)
             for kind, p in (("scale", m.weight), ("shift", m.bias))}
    for name, p in model.named_parameters():
        kind = norms.get(id(p))
        noise = torch.randn(p.shape, generator=g)
        if kind == "scale":
            value = 1 + 0.1 * noise
        elif kind == "shift":
            value = 0.1 * noise
        elif name.endswith("logit_scale"):
            value = torch.tensor(math.log(20.0))
        elif name.endswith(_TABLES):
            value = 0.5 * noise
        elif p.ndim >= 2:
            value = noise / math.sqrt(math.prod(p.shape[1:]))
        else:
            value = 0.1 * noise
        p.copy_(value.reshape(p.shape))
    return model.eval()


def vit_model(seed: int = 0, **config):
    """transformers ViTModel (no pooler) with random weights; eager attention."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(**config)
    cfg._attn_implementation = "eager"
    return randomize_(ViTModel(cfg, add_pooling_layer=False), seed)


def clip_model(seed: int = 0, vision: dict | None = None, text: dict | None = None, projection_dim: int = 512):
    """transformers CLIPModel with random weights; eager attention."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(vision_config=vision or {}, text_config=text or {}, projection_dim=projection_dim)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    return randomize_(CLIPModel(cfg), seed)


# Tiny CLIP, head width 64 as OpenAI's rule (heads = width // 64) requires.
TINY_CLIP_VISION = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                        image_size=32, patch_size=8)
TINY_CLIP_TEXT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                      vocab_size=300, max_position_embeddings=16, eos_token_id=299, bos_token_id=298,
                      pad_token_id=0)
TINY_CLIP_PROJECTION = 32


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood lies entirely inside `mask` (bool (H, W))."""
    h, w = mask.shape
    padded = np.pad(mask, radius, constant_values=False)
    out = np.ones_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out
