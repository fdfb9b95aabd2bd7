"""CLIP checkpoint formats: transformers' CLIPModel and OpenAI's state dict.

OpenAI naming: visual.{conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks.{i}.{ln_1, attn.in_proj_weight | attn.{q,k,v}_proj_weight,
attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj},
token_embedding, positional_embedding, transformer.resblocks..., ln_final,
text_projection, logit_scale. The MM-OVSeg release keeps separate q/k/v weights
("split"); OpenAI's own files fuse them ("fused").
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from convert import rules as R
from mmovseg_jax.models import clip

# ---------------------------------------------------------------- transformers


def _hf_block(t: str, f: str) -> list[R.Rule]:
    out = []
    for n, fn in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out")):
        out += R.linear(f"{t}.self_attn.{n}", f"{f}.attn.{fn}")
    return out + [*R.layer_norm(f"{t}.layer_norm1", f"{f}.norm1"), *R.layer_norm(f"{t}.layer_norm2", f"{f}.norm2"),
                  *R.linear(f"{t}.mlp.fc1", f"{f}.mlp.fc1"), *R.linear(f"{t}.mlp.fc2", f"{f}.mlp.fc2")]


def _activation(name: str, where: str) -> str:
    if name not in ("quick_gelu", "gelu"):
        raise R.ConversionError(f"config.json: {where}.hidden_act {name!r} is not supported")
    return name


class HfClipFormat:
    name = "hf_clip"
    family = "clip"

    @staticmethod
    def detect(keys) -> bool:
        return "vision_model.embeddings.class_embedding" in keys and "text_model.embeddings.token_embedding.weight" in keys

    @staticmethod
    def style(keys) -> dict:
        return {}

    @staticmethod
    def auxiliary(key: str) -> bool:
        return key.endswith("embeddings.position_ids")  # buffers of older transformers files

    @staticmethod
    def infer_config(state: Mapping[str, np.ndarray], hf_config: dict | None, num_heads: int | None,
                     pos_interpolation: str | None) -> clip.Config:
        if hf_config is None:
            raise R.ConversionError("a transformers CLIP checkpoint needs its config.json beside the weights")
        v, t = hf_config.get("vision_config", {}), hf_config.get("text_config", {})
        vision = clip.VisionConfig(
            patch_size=v.get("patch_size", 32), width=v.get("hidden_size", 768),
            depth=v.get("num_hidden_layers", 12), num_heads=v.get("num_attention_heads", 12),
            mlp_dim=v.get("intermediate_size", 3072), image_size=v.get("image_size", 224),
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
            activation=_activation(v.get("hidden_act", "quick_gelu"), "vision_config"))
        eos = t.get("eos_token_id", 2)
        text = clip.TextConfig(
            vocab_size=t.get("vocab_size", 49408), context_length=t.get("max_position_embeddings", 77),
            width=t.get("hidden_size", 512), depth=t.get("num_hidden_layers", 12),
            num_heads=t.get("num_attention_heads", 8), mlp_dim=t.get("intermediate_size", 2048),
            layer_norm_eps=t.get("layer_norm_eps", 1e-5),
            activation=_activation(t.get("hidden_act", "quick_gelu"), "text_config"),
            # transformers pools at the largest token id when eos_token_id is the legacy 2.
            eos_token_id=eos, pooling="argmax" if eos == 2 else "eos")
        return clip.Config(vision=vision, text=text, embed_dim=hf_config.get("projection_dim", 512))

    @staticmethod
    def rules(cfg: clip.Config, style: dict) -> list[R.Rule]:
        vm, tm = "vision_model", "text_model"
        out = [R.copy(f"{vm}.embeddings.class_embedding", "vision.class_embedding"),
               *R.conv(f"{vm}.embeddings.patch_embedding", "vision.patch_embed.proj", bias=False),
               R.copy(f"{vm}.embeddings.position_embedding.weight", "vision.pos_embed"),
               *R.layer_norm(f"{vm}.pre_layrnorm", "vision.pre_norm"),
               *R.layer_norm(f"{vm}.post_layernorm", "vision.post_norm"),
               *R.linear("visual_projection", "vision.projection", bias=False),
               R.copy(f"{tm}.embeddings.token_embedding.weight", "text.token_embed.embedding"),
               R.copy(f"{tm}.embeddings.position_embedding.weight", "text.pos_embed"),
               *R.layer_norm(f"{tm}.final_layer_norm", "text.final_norm"),
               *R.linear("text_projection", "text.projection", bias=False),
               R.copy("logit_scale", "logit_scale")]
        for i in range(cfg.vision.depth):
            out += _hf_block(f"{vm}.encoder.layers.{i}", f"vision.blocks.{i}")
        for i in range(cfg.text.depth):
            out += _hf_block(f"{tm}.encoder.layers.{i}", f"text.blocks.{i}")
        return out

    @staticmethod
    def hf_config(cfg: clip.Config) -> dict:
        """transformers CLIPConfig arguments for this architecture."""
        v, t = cfg.vision, cfg.text
        return dict(
            projection_dim=cfg.embed_dim,
            vision_config=dict(hidden_size=v.width, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
                               intermediate_size=v.mlp_dim, image_size=v.image_size, patch_size=v.patch_size,
                               layer_norm_eps=v.layer_norm_eps, hidden_act=v.activation, projection_dim=cfg.embed_dim),
            text_config=dict(vocab_size=t.vocab_size, max_position_embeddings=t.context_length,
                             hidden_size=t.width, num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
                             intermediate_size=t.mlp_dim, layer_norm_eps=t.layer_norm_eps, hidden_act=t.activation,
                             eos_token_id=t.eos_token_id if t.pooling == "eos" else 2,
                             projection_dim=cfg.embed_dim))


# --------------------------------------------------------------------- OpenAI

def _openai_block(t: str, f: str, qkv: str) -> list[R.Rule]:
    if qkv == "split":
        attn = R.split_qkv_weights_fused_bias(f"{t}.attn", f"{f}.attn")
    else:
        attn = R.fused_qkv(f"{t}.attn.in_proj_weight", f"{t}.attn.in_proj_bias", f"{f}.attn")
    return [*attn, *R.linear(f"{t}.attn.out_proj", f"{f}.attn.out"),
            *R.layer_norm(f"{t}.ln_1", f"{f}.norm1"), *R.layer_norm(f"{t}.ln_2", f"{f}.norm2"),
            *R.linear(f"{t}.mlp.c_fc", f"{f}.mlp.fc1"), *R.linear(f"{t}.mlp.c_proj", f"{f}.mlp.fc2")]


class OpenAiClipFormat:
    name = "openai_clip"
    family = "clip"

    @staticmethod
    def detect(keys) -> bool:
        return "visual.class_embedding" in keys and "token_embedding.weight" in keys

    @staticmethod
    def style(keys) -> dict:
        fused = any(k.endswith("attn.in_proj_weight") for k in keys)
        return {"qkv": "fused" if fused else "split"}

    @staticmethod
    def auxiliary(key: str) -> bool:
        # Scalars that OpenAI's TorchScript archives carry beside the weights.
        return key in ("input_resolution", "context_length", "vocab_size")

    @staticmethod
    def infer_config(state: Mapping[str, np.ndarray], hf_config: dict | None, num_heads: int | None,
                     pos_interpolation: str | None) -> clip.Config:
        # OpenAI's rule, as in its build_model: one head per 64 channels in both towers.
        conv = state["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
        text_width = state["ln_final.weight"].shape[0]
        vision = clip.VisionConfig(
            patch_size=patch, width=width, depth=R.numbered(state, "visual.transformer.resblocks.{i}."),
            num_heads=max(1, width // 64), mlp_dim=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            image_size=grid * patch)
        text = clip.TextConfig(
            vocab_size=state["token_embedding.weight"].shape[0],
            context_length=state["positional_embedding"].shape[0], width=text_width,
            depth=R.numbered(state, "transformer.resblocks.{i}."), num_heads=max(1, text_width // 64),
            mlp_dim=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            eos_token_id=state["token_embedding.weight"].shape[0] - 1, pooling="argmax")
        return clip.Config(vision=vision, text=text, embed_dim=state["text_projection"].shape[1])

    @staticmethod
    def rules(cfg: clip.Config, style: dict) -> list[R.Rule]:
        qkv = style.get("qkv", "fused")
        out = [*R.conv("visual.conv1", "vision.patch_embed.proj", bias=False),
               R.copy("visual.class_embedding", "vision.class_embedding"),
               R.copy("visual.positional_embedding", "vision.pos_embed"),
               *R.layer_norm("visual.ln_pre", "vision.pre_norm"),
               *R.layer_norm("visual.ln_post", "vision.post_norm"),
               R.matrix("visual.proj", "vision.projection.kernel"),
               R.copy("token_embedding.weight", "text.token_embed.embedding"),
               R.copy("positional_embedding", "text.pos_embed"),
               *R.layer_norm("ln_final", "text.final_norm"),
               R.matrix("text_projection", "text.projection.kernel"),
               R.copy("logit_scale", "logit_scale")]
        for i in range(cfg.vision.depth):
            out += _openai_block(f"visual.transformer.resblocks.{i}", f"vision.blocks.{i}", qkv)
        for i in range(cfg.text.depth):
            out += _openai_block(f"transformer.resblocks.{i}", f"text.blocks.{i}", qkv)
        return out
