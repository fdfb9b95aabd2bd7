"""DINO ViT checkpoint formats: the original repository's `.pth` naming and transformers' ViT.

Original DINO (torch hub): cls_token (1, 1, D), pos_embed (1, 1 + N, D),
patch_embed.proj, blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm.

transformers ViT on disk (and facebook/dino-vit* files): embeddings.{cls_token,
position_embeddings, patch_embeddings.projection}, encoder.layer.{i}.{attention.attention.
{query,key,value}, attention.output.dense, intermediate.dense, output.dense,
layernorm_before, layernorm_after}, layernorm; the in-memory naming of transformers 5
(layers.{i}.attention.{q,k,v,o}_proj, layers.{i}.mlp.fc1/fc2) is read too, as are a
`vit.` prefix and TF-era LayerNorm `gamma`/`beta` names.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from convert import rules as R
from mmovseg_jax.models import dino


def _heads(width: int, given: int | None) -> int:
    return given or max(1, width // 64)


# ----------------------------------------------------------------- original DINO

class DinoFormat:
    name = "dino"
    family = "dino"

    @staticmethod
    def detect(keys) -> bool:
        return "pos_embed" in keys and "blocks.0.attn.qkv.weight" in keys

    @staticmethod
    def style(keys) -> dict:
        return {}

    @staticmethod
    def auxiliary(key: str) -> bool:
        # The projection head of a DINO training checkpoint: not part of the backbone.
        return key.startswith("head.")

    @staticmethod
    def infer_config(state: Mapping[str, np.ndarray], hf_config: dict | None, num_heads: int | None,
                     pos_interpolation: str | None) -> dino.Config:
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
        return dino.Config(patch_size=patch, width=width, depth=R.numbered(state, "blocks.{i}."),
                           num_heads=_heads(width, num_heads), mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
                           image_size=grid * patch, layer_norm_eps=1e-6,
                           qkv_bias="blocks.0.attn.qkv.bias" in state,
                           pos_interpolation=pos_interpolation or "dino")

    @staticmethod
    def rules(cfg: dino.Config, style: dict) -> list[R.Rule]:
        out = [R.reshaped("cls_token", "cls_token", (1, 1, -1), (-1,)),
               R.reshaped("pos_embed", "pos_embed", (1, -1, cfg.width), (-1, cfg.width)),
               *R.conv("patch_embed.proj", "patch_embed.proj", bias=True),
               *R.layer_norm("norm", "norm")]
        for i in range(cfg.depth):
            t, f = f"blocks.{i}", f"blocks.{i}"
            out += [*R.layer_norm(f"{t}.norm1", f"{f}.norm1"), *R.layer_norm(f"{t}.norm2", f"{f}.norm2"),
                    *R.fused_qkv(f"{t}.attn.qkv.weight", f"{t}.attn.qkv.bias" if cfg.qkv_bias else None,
                                 f"{f}.attn"),
                    *R.linear(f"{t}.attn.proj", f"{f}.attn.out"),
                    *R.linear(f"{t}.mlp.fc1", f"{f}.mlp.fc1"), *R.linear(f"{t}.mlp.fc2", f"{f}.mlp.fc2")]
        return out


# ------------------------------------------------------------ transformers ViT

_V4 = {"layer": "encoder.layer.{i}", "q": "attention.attention.query", "k": "attention.attention.key",
       "v": "attention.attention.value", "o": "attention.output.dense", "fc1": "intermediate.dense",
       "fc2": "output.dense"}
_V5 = {"layer": "layers.{i}", "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
       "o": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class HfVitFormat:
    name = "hf_vit"
    family = "dino"

    @staticmethod
    def detect(keys) -> bool:
        return any(k.endswith("embeddings.position_embeddings") for k in keys) and any(
            ".attention.attention.query." in k or ".attention.q_proj." in k for k in keys)

    @staticmethod
    def style(keys) -> dict:
        keys = list(keys)
        prefix = "vit." if any(k.startswith("vit.embeddings.") for k in keys) else ""
        names = "v5" if any(k.startswith(f"{prefix}layers.0.") for k in keys) else "v4"
        norm = ("gamma", "beta") if any(k.endswith("layernorm.gamma") for k in keys) else ("weight", "bias")
        return {"prefix": prefix, "names": names, "norm": list(norm)}

    @staticmethod
    def auxiliary(key: str) -> bool:
        return key.split(".")[-3:-2] == ["pooler"] or key.endswith("mask_token") or key.startswith("classifier.")

    @staticmethod
    def infer_config(state, hf_config: dict | None, num_heads: int | None,
                     pos_interpolation: str | None) -> dino.Config:
        style = HfVitFormat.style(state)
        p = style["prefix"]
        if hf_config:
            act = hf_config.get("hidden_act", "gelu")
            if act != "gelu":
                raise R.ConversionError(f"config.json: hidden_act {act!r} is not supported (DINO uses 'gelu')")
            return dino.Config(patch_size=hf_config["patch_size"], width=hf_config["hidden_size"],
                               depth=hf_config["num_hidden_layers"],
                               num_heads=num_heads or hf_config["num_attention_heads"],
                               mlp_dim=hf_config["intermediate_size"], image_size=hf_config["image_size"],
                               layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
                               qkv_bias=hf_config.get("qkv_bias", True),
                               pos_interpolation=pos_interpolation or "size")
        names = _V5 if style["names"] == "v5" else _V4
        layer0 = p + names["layer"].format(i=0)
        width = state[f"{p}embeddings.cls_token"].shape[-1]
        patch = state[f"{p}embeddings.patch_embeddings.projection.weight"].shape[-1]
        grid = math.isqrt(state[f"{p}embeddings.position_embeddings"].shape[1] - 1)
        return dino.Config(patch_size=patch, width=width, depth=R.numbered(state, p + names["layer"] + "."),
                           num_heads=_heads(width, num_heads), mlp_dim=state[f"{layer0}.{names['fc1']}.weight"].shape[0],
                           image_size=grid * patch, layer_norm_eps=1e-12,
                           qkv_bias=f"{layer0}.{names['q']}.bias" in state,
                           pos_interpolation=pos_interpolation or "size")

    @staticmethod
    def rules(cfg: dino.Config, style: dict) -> list[R.Rule]:
        p = style.get("prefix", "")
        names = _V5 if style.get("names") == "v5" else _V4
        norm = tuple(style.get("norm", ("weight", "bias")))
        out = [R.reshaped(f"{p}embeddings.cls_token", "cls_token", (1, 1, -1), (-1,)),
               R.reshaped(f"{p}embeddings.position_embeddings", "pos_embed", (1, -1, cfg.width), (-1, cfg.width)),
               *R.conv(f"{p}embeddings.patch_embeddings.projection", "patch_embed.proj", bias=True),
               *R.layer_norm(f"{p}layernorm", "norm", norm)]
        for i in range(cfg.depth):
            t, f = p + names["layer"].format(i=i), f"blocks.{i}"
            for n, fn in (("q", "query"), ("k", "key"), ("v", "value")):
                out += R.linear(f"{t}.{names[n]}", f"{f}.attn.{fn}", bias=cfg.qkv_bias)
            out += [*R.linear(f"{t}.{names['o']}", f"{f}.attn.out"),
                    *R.linear(f"{t}.{names['fc1']}", f"{f}.mlp.fc1"), *R.linear(f"{t}.{names['fc2']}", f"{f}.mlp.fc2"),
                    *R.layer_norm(f"{t}.layernorm_before", f"{f}.norm1", norm),
                    *R.layer_norm(f"{t}.layernorm_after", f"{f}.norm2", norm)]
        return out

    @staticmethod
    def hf_config(cfg: dino.Config) -> dict:
        """transformers ViTConfig arguments for this architecture."""
        return dict(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                    intermediate_size=cfg.mlp_dim, image_size=cfg.image_size, patch_size=cfg.patch_size,
                    layer_norm_eps=cfg.layer_norm_eps, qkv_bias=cfg.qkv_bias, hidden_act="gelu")

