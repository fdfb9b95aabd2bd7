"""DINOv3 ViT checkpoint formats: transformers' DINOv3ViTModel and the original `.pth`.

transformers (on disk; in memory the layers sit under `model.layer.{i}`):
embeddings.{cls_token (1, 1, D), register_tokens (1, R, D), mask_token (1, 1, D),
patch_embeddings.{weight, bias}}, layer.{i}.{norm1, norm2, attention.{q,k,v,o}_proj,
layer_scale{1,2}.lambda1, mlp.{up,down}_proj | mlp.{gate,up,down}_proj}, norm; the
architecture comes from config.json.

Original facebookresearch/dinov3 (`dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth` ...):
cls_token (1, 1, D), storage_tokens (1, R, D), mask_token (1, D), patch_embed.proj,
rope_embed.periods (buffer), blocks.{i}.{norm1, norm2, attn.qkv (fused [q; k; v], with a
bias_mask buffer that zeroes the key bias), attn.proj, ls1.gamma, ls2.gamma, mlp.fc1/fc2 |
mlp.w1/w2/w3}, norm, and in the SAT-493M ViT-L a training-only local_cls_norm. The
architecture is inferred from the shapes (heads from the RoPE periods buffer, which holds
head_dim / 4 values, else width // 64, unless given); the buffers and local_cls_norm are kept aside and written back.

The key bias that bias_mask zeroes has no effect; it is converted as absent, so a
checkpoint whose masked key third is not zero comes back with zeros there (a note says so).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from convert import rules as R
from convert.torch_io import log
from mmovseg_jax.models import dinov3

HF_MODEL_TYPE = "dinov3_vit"


def _no_pos_interpolation(pos_interpolation: str | None) -> None:
    if pos_interpolation:
        raise R.ConversionError("--pos-interpolation does not apply to DINOv3 (rotary position embedding)")


def _heads(width: int, given: int | None) -> int:
    return given or max(1, width // 64)


def _scalar_size(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise R.ConversionError(f"config.json: non-square {what} {value} is not supported")
        value = value[0]
    return int(value)


def _layerscale_rules(t: str, f: str, names: tuple[str, str], cfg: dinov3.Config) -> list[R.Rule]:
    if cfg.layerscale is None:
        return []
    return [R.copy(f"{t}.{names[0]}", f"{f}.ls1.gamma"), R.copy(f"{t}.{names[1]}", f"{f}.ls2.gamma")]


# --------------------------------------------------------------- transformers

class HfDinov3Format:
    name = "hf_dinov3"
    family = "dinov3"

    @staticmethod
    def detect(keys) -> bool:
        return "embeddings.patch_embeddings.weight" in keys and any(
            k.endswith(".attention.q_proj.weight") for k in keys)

    @staticmethod
    def style(keys) -> dict:
        return {"layer": "model.layer" if any(k.startswith("model.layer.0.") for k in keys) else "layer"}

    @staticmethod
    def auxiliary(key: str) -> bool:
        # An empty (1, 0, D) register table of a model without registers.
        return key == "embeddings.register_tokens"

    @staticmethod
    def infer_config(state: Mapping[str, np.ndarray], hf_config: dict | None, num_heads: int | None,
                     pos_interpolation: str | None) -> dinov3.Config:
        _no_pos_interpolation(pos_interpolation)
        if hf_config:
            return HfDinov3Format.config_from_hf(hf_config, num_heads)
        layer = HfDinov3Format.style(state)["layer"]
        width = state["embeddings.cls_token"].shape[-1]
        gated = f"{layer}.0.mlp.gate_proj.weight" in state
        q = lambda name: f"{layer}.0.attention.{name}.bias" in state  # noqa: E731
        return dinov3.Config(
            patch_size=state["embeddings.patch_embeddings.weight"].shape[-1], width=width,
            depth=R.numbered(state, layer + ".{i}."), num_heads=_heads(width, num_heads),
            mlp_dim=state[f"{layer}.0.mlp.up_proj.weight"].shape[0],
            num_register_tokens=state["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in state else 0,
            layerscale=1.0, mlp="swiglu" if gated else "mlp", query_bias=q("q_proj"), key_bias=q("k_proj"),
            value_bias=q("v_proj"), proj_bias=q("o_proj"), mlp_bias=f"{layer}.0.mlp.up_proj.bias" in state)

    @staticmethod
    def config_from_hf(c: dict, num_heads: int | None = None) -> dinov3.Config:
        """Our Config from a transformers DINOv3ViTConfig dict (config.json)."""
        if c.get("model_type", HF_MODEL_TYPE) != HF_MODEL_TYPE:
            raise R.ConversionError(f"config.json: model_type {c['model_type']!r} is not {HF_MODEL_TYPE!r}")
        gated = bool(c.get("use_gated_mlp", False))
        act = c.get("hidden_act", "gelu")
        if act != ("silu" if gated else "gelu"):
            raise R.ConversionError(f"config.json: hidden_act {act!r} with use_gated_mlp={gated} is not supported "
                                    f"(DINOv3 uses 'gelu', or 'silu' for SwiGLU)")
        return dinov3.Config(
            patch_size=_scalar_size(c.get("patch_size", 16), "patch_size"), width=c["hidden_size"],
            depth=c["num_hidden_layers"], num_heads=num_heads or c["num_attention_heads"],
            mlp_dim=c["intermediate_size"], num_register_tokens=c.get("num_register_tokens", 0),
            layerscale=float(c.get("layerscale_value", 1.0)), layer_norm_eps=float(c.get("layer_norm_eps", 1e-5)),
            rope_base=float(c.get("rope_theta", 100.0)), rope_shift=c.get("pos_embed_shift"),
            rope_jitter=c.get("pos_embed_jitter"), rope_rescale=c.get("pos_embed_rescale", 2.0),
            mlp="swiglu" if gated else "mlp", query_bias=c.get("query_bias", True),
            key_bias=c.get("key_bias", False), value_bias=c.get("value_bias", True),
            proj_bias=c.get("proj_bias", True), mlp_bias=c.get("mlp_bias", True),
            image_size=_scalar_size(c.get("image_size", 224), "image_size"))

    @staticmethod
    def hf_config(cfg: dinov3.Config) -> dict:
        """transformers DINOv3ViTConfig arguments for this architecture."""
        if cfg.rope_base is None or cfg.rope_normalize_coords != "separate":
            raise R.ConversionError("transformers' DINOv3 supports only rope_base periods with 'separate' "
                                    "coordinate normalisation")
        if cfg.layerscale is None:
            raise R.ConversionError("transformers' DINOv3 always has LayerScale; this model has none")
        return dict(patch_size=cfg.patch_size, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                    num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
                    hidden_act="silu" if cfg.mlp == "swiglu" else "gelu", use_gated_mlp=cfg.mlp == "swiglu",
                    layer_norm_eps=cfg.layer_norm_eps, rope_theta=cfg.rope_base, image_size=cfg.image_size,
                    query_bias=cfg.query_bias, key_bias=cfg.key_bias, value_bias=cfg.value_bias,
                    proj_bias=cfg.proj_bias, mlp_bias=cfg.mlp_bias, layerscale_value=cfg.layerscale,
                    num_register_tokens=cfg.num_register_tokens, pos_embed_shift=cfg.rope_shift,
                    pos_embed_jitter=cfg.rope_jitter, pos_embed_rescale=cfg.rope_rescale)

    @staticmethod
    def rules(cfg: dinov3.Config, style: dict) -> list[R.Rule]:
        d = cfg.width
        out = [R.reshaped("embeddings.cls_token", "cls_token", (1, 1, d), (d,)),
               R.reshaped("embeddings.mask_token", "mask_token", (1, 1, d), (d,)),
               *R.conv("embeddings.patch_embeddings", "patch_embed.proj", bias=True),
               *R.layer_norm("norm", "norm")]
        if cfg.num_register_tokens:
            out.append(R.reshaped("embeddings.register_tokens", "register_tokens", (1, -1, d), (-1, d)))
        mlp = ({"gate_proj": "gate", "up_proj": "up", "down_proj": "down"} if cfg.mlp == "swiglu"
               else {"up_proj": "fc1", "down_proj": "fc2"})
        for i in range(cfg.depth):
            t, f = f"{style.get('layer', 'layer')}.{i}", f"blocks.{i}"
            out += [*R.layer_norm(f"{t}.norm1", f"{f}.norm1"), *R.layer_norm(f"{t}.norm2", f"{f}.norm2"),
                    *_layerscale_rules(t, f, ("layer_scale1.lambda1", "layer_scale2.lambda1"), cfg)]
            for hf, ours, bias in (("q_proj", "query", cfg.query_bias), ("k_proj", "key", cfg.key_bias),
                                   ("v_proj", "value", cfg.value_bias), ("o_proj", "out", cfg.proj_bias)):
                out += R.linear(f"{t}.attention.{hf}", f"{f}.attn.{ours}", bias=bias)
            for hf, ours in mlp.items():
                out += R.linear(f"{t}.mlp.{hf}", f"{f}.mlp.{ours}", bias=cfg.mlp_bias)
        return out


# ------------------------------------------------------------- original .pth

def _qkv_bias_rule(t: str, f: str, cfg: dinov3.Config) -> R.Rule:
    """Fused (3D,) [q; k; v] bias <-> query/value (and key, if used) biases.

    Without a key bias the key third is dropped (the checkpoint's bias_mask zeroes it)
    and written back as zeros."""
    names = ["query", "key", "value"] if cfg.key_bias else ["query", "value"]

    def to_flax(xs):
        q, k, v = R._split3(xs[0])
        return [q, k, v] if cfg.key_bias else [q, v]

    def to_torch(bs):
        q, *k, v = bs
        return [np.concatenate([q, k[0] if k else np.zeros_like(q), v])]

    return R.Rule((f"{t}.attn.qkv.bias",), tuple(f"{f}.attn.{n}.bias" for n in names), to_flax, to_torch)


class Dinov3Format:
    name = "dinov3"
    family = "dinov3"

    @staticmethod
    def detect(keys) -> bool:
        return ("blocks.0.attn.qkv.weight" in keys and "cls_token" in keys and "pos_embed" not in keys
                and ("rope_embed.periods" in keys or "storage_tokens" in keys or "blocks.0.ls1.gamma" in keys))

    @staticmethod
    def style(keys) -> dict:
        return {}

    @staticmethod
    def auxiliary(key: str) -> bool:
        # Buffers (checked against the architecture by check_buffers) and the SAT-493M ViT-L's
        # local-crop CLS norm, which only training uses.
        return (key == "rope_embed.periods" or key.startswith("local_cls_norm.")
                or (key.startswith("blocks.") and key.endswith(".attn.qkv.bias_mask")))

    @staticmethod
    def infer_config(state: Mapping[str, np.ndarray], hf_config: dict | None, num_heads: int | None,
                     pos_interpolation: str | None) -> dinov3.Config:
        _no_pos_interpolation(pos_interpolation)
        width = state["cls_token"].shape[-1]
        periods = state.get("rope_embed.periods")
        if num_heads is None and periods is not None and np.ndim(periods) == 1 and width % (4 * len(periods)) == 0:
            num_heads = width // (4 * len(periods))  # the buffer holds head_dim / 4 periods
        heads = _heads(width, num_heads)
        swiglu = "blocks.0.mlp.w1.weight" in state
        qkv_bias = "blocks.0.attn.qkv.bias" in state
        mask = state.get("blocks.0.attn.qkv.bias_mask")
        key_bias = qkv_bias and (mask is None or bool(np.all(np.asarray(mask)[width:2 * width] != 0)))
        rope = _rope_from_periods(periods, width // heads)
        return dinov3.Config(
            patch_size=state["patch_embed.proj.weight"].shape[-1], width=width,
            depth=R.numbered(state, "blocks.{i}."), num_heads=heads,
            mlp_dim=state["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0],
            num_register_tokens=state["storage_tokens"].shape[1] if "storage_tokens" in state else 0,
            layerscale=1e-5 if "blocks.0.ls1.gamma" in state else None, layer_norm_eps=1e-5, **rope,
            mlp="swiglu" if swiglu else "mlp", query_bias=qkv_bias, key_bias=key_bias, value_bias=qkv_bias,
            proj_bias="blocks.0.attn.proj.bias" in state,
            mlp_bias=("blocks.0.mlp.w1.bias" if swiglu else "blocks.0.mlp.fc1.bias") in state)

    @staticmethod
    def rules(cfg: dinov3.Config, style: dict) -> list[R.Rule]:
        if not (cfg.query_bias == cfg.value_bias and (cfg.query_bias or not cfg.key_bias)):
            raise R.ConversionError("the original DINOv3 code has one qkv bias for query, key and value; "
                                    f"this model has query/key/value biases {cfg.query_bias}/{cfg.key_bias}/"
                                    f"{cfg.value_bias}")
        d = cfg.width
        out = [R.reshaped("cls_token", "cls_token", (1, 1, d), (d,)),
               R.reshaped("mask_token", "mask_token", (1, d), (d,)),
               *R.conv("patch_embed.proj", "patch_embed.proj", bias=True),
               *R.layer_norm("norm", "norm")]
        if cfg.num_register_tokens:
            out.append(R.reshaped("storage_tokens", "register_tokens", (1, -1, d), (-1, d)))
        mlp = {"w1": "gate", "w2": "up", "w3": "down"} if cfg.mlp == "swiglu" else {"fc1": "fc1", "fc2": "fc2"}
        for i in range(cfg.depth):
            t = f = f"blocks.{i}"
            out += [*R.layer_norm(f"{t}.norm1", f"{f}.norm1"), *R.layer_norm(f"{t}.norm2", f"{f}.norm2"),
                    *_layerscale_rules(t, f, ("ls1.gamma", "ls2.gamma"), cfg),
                    *R.fused_qkv(f"{t}.attn.qkv.weight", None, f"{f}.attn"),
                    *R.linear(f"{t}.attn.proj", f"{f}.attn.out", bias=cfg.proj_bias)]
            if cfg.query_bias:
                out.append(_qkv_bias_rule(t, f, cfg))
            for orig, ours in mlp.items():
                out += R.linear(f"{t}.mlp.{orig}", f"{f}.mlp.{ours}", bias=cfg.mlp_bias)
        return out

    @staticmethod
    def buffers(cfg: dinov3.Config) -> dict[str, np.ndarray]:
        """The original model's buffers for this architecture: RoPE periods and, with a qkv
        bias, the bias masks (key third 0 unless the key bias is used)."""
        out = {"rope_embed.periods": dinov3.rope_periods(cfg).astype(np.float32)}
        if cfg.query_bias:
            d = cfg.width
            mask = np.ones(3 * d, np.float32)
            if not cfg.key_bias:
                mask[d:2 * d] = 0
            out.update({f"blocks.{i}.attn.qkv.bias_mask": mask.copy() for i in range(cfg.depth)})
        return out

    @staticmethod
    def check_buffers(cfg: dinov3.Config, state: Mapping[str, np.ndarray], where: str) -> None:
        """Stored buffers must be what this architecture computes; notes a non-zero masked key bias."""
        expected = Dinov3Format.buffers(cfg)
        for key, theirs in state.items():
            if not Dinov3Format.auxiliary(key) or key.startswith("local_cls_norm."):
                continue
            mine = expected.get(key)
            theirs = np.asarray(theirs, np.float32)
            ok = mine is not None and theirs.shape == mine.shape and (
                np.allclose(theirs, mine, rtol=1e-5, atol=0) if key == "rope_embed.periods"
                else np.array_equal(theirs, mine))
            if not ok:
                what = "RoPE periods" if key == "rope_embed.periods" else "qkv bias mask"
                raise R.ConversionError(f"{where}: buffer {key} {theirs.shape} is not the {what} of the inferred "
                                        f"architecture {None if mine is None else mine.shape}")
        if cfg.query_bias and not cfg.key_bias:
            d = cfg.width
            worst = max((float(np.abs(np.asarray(state[f"blocks.{i}.attn.qkv.bias"])[d:2 * d]).max())
                         for i in range(cfg.depth) if f"blocks.{i}.attn.qkv.bias" in state), default=0.0)
            if worst:
                log(f"the masked key third of attn.qkv.bias is not zero (max |b| = {worst:.3g}); it has no "
                    f"effect and is not kept (written back as zeros)")


def _rope_from_periods(periods, head_dim: int) -> dict:
    """RoPE parameters that reproduce a stored periods buffer (base 100 when there is none)."""
    if periods is None:
        return {"rope_base": 100.0}
    periods = np.asarray(periods, np.float64)
    if periods.shape != (head_dim // 4,):
        raise R.ConversionError(f"rope_embed.periods has shape {periods.shape}, expected ({head_dim // 4},) for a "
                                f"head width of {head_dim}; pass --num-heads")
    n = len(periods)
    candidates = []
    if n > 1 and periods[1] > 0:
        base = float(periods[1] ** (head_dim / 4))
        rounded = float(round(base))
        candidates.append({"rope_base": rounded if abs(rounded - base) <= 1e-4 * base else base})
    candidates.append({"rope_base": None, "rope_min_period": float(periods[0]), "rope_max_period": float(periods[-1])})
    for c in candidates:
        try:
            mine = dinov3.rope_periods(dinov3.Config(width=head_dim, num_heads=1, depth=1, mlp_dim=1, **c))
        except ValueError:
            continue
        if np.allclose(mine, periods, rtol=1e-5, atol=0):
            return c
    raise R.ConversionError(f"rope_embed.periods {periods.tolist()} fit neither base ** (4k / head_dim) nor the "
                            f"min/max-period form")
