"""Checkpoint naming conversions written for the tests, independently of convert/."""

from __future__ import annotations

import torch


def hf_clip_to_openai(hf: dict, qkv: str, depths: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict under OpenAI CLIP's published names, built
    independently of convert/: q/k/v "fused" (in_proj_weight) or "split"
    (q/k/v_proj_weight plus in_proj_bias, the MM-OVSeg release's layout).
    depths: (vision blocks, text blocks)."""
    vm, tm = "vision_model.", "text_model."
    out = {"visual.conv1.weight": hf[f"{vm}embeddings.patch_embedding.weight"],
           "visual.class_embedding": hf[f"{vm}embeddings.class_embedding"],
           "visual.positional_embedding": hf[f"{vm}embeddings.position_embedding.weight"],
           "visual.proj": hf["visual_projection.weight"].T,
           "token_embedding.weight": hf[f"{tm}embeddings.token_embedding.weight"],
           "positional_embedding": hf[f"{tm}embeddings.position_embedding.weight"],
           "text_projection": hf["text_projection.weight"].T,
           "logit_scale": hf["logit_scale"]}
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = hf[f"{vm}pre_layrnorm.{p}"]
        out[f"visual.ln_post.{p}"] = hf[f"{vm}post_layernorm.{p}"]
        out[f"ln_final.{p}"] = hf[f"{tm}final_layer_norm.{p}"]
    for src, dst, depth in ((vm, "visual.transformer.resblocks.", depths[0]),
                            (tm, "transformer.resblocks.", depths[1])):
        for i in range(depth):
            h, b = f"{src}encoder.layers.{i}.", f"{dst}{i}."
            for p in ("weight", "bias"):
                out[f"{b}ln_1.{p}"] = hf[f"{h}layer_norm1.{p}"]
                out[f"{b}ln_2.{p}"] = hf[f"{h}layer_norm2.{p}"]
                out[f"{b}attn.out_proj.{p}"] = hf[f"{h}self_attn.out_proj.{p}"]
                out[f"{b}mlp.c_fc.{p}"] = hf[f"{h}mlp.fc1.{p}"]
                out[f"{b}mlp.c_proj.{p}"] = hf[f"{h}mlp.fc2.{p}"]
            qkv_w = [hf[f"{h}self_attn.{n}_proj.weight"] for n in "qkv"]
            out[f"{b}attn.in_proj_bias"] = torch.cat([hf[f"{h}self_attn.{n}_proj.bias"] for n in "qkv"])
            if qkv == "fused":
                out[f"{b}attn.in_proj_weight"] = torch.cat(qkv_w)
            else:
                for n, w in zip("qkv", qkv_w):
                    out[f"{b}attn.{n}_proj_weight"] = w
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
