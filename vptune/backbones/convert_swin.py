"""Swin checkpoint converters and config readers: published layouts -> our (timm >= 0.9) names.

Registered sources (``arch="swin"``; the registry keys converters by source name only, so the Swin ones
carry a ``-swin`` suffix and never clash with the ViT ``timm`` / ``hf`` converters):

- ``timm-swin``: timm >= 0.9 (``layers.{s}.downsample`` at the START of stage s >= 1, ``head.fc``).
  Ours already; ``head.fc.*`` is renamed ``head.*``.
- ``ms-swin``: the original Microsoft ``.pth`` files (``{'model': sd}``, e.g.
  ``swin_base_patch4_window7_224_22k.pth``) and timm < 0.9, which share a layout: ``layers.{s}.downsample``
  at the END of stage s < last is moved to ``layers.{s+1}.downsample``.
- ``hf-swin``: Hugging Face ``SwinModel`` / ``SwinForImageClassification`` / ``SwinForMaskedImageModeling``
  / ``SwinBackbone`` (``swin.`` prefix optional), in the hub names that ``save_pretrained`` writes
  (``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``,
  ``output.dense``) and in transformers >= 5's in-memory names (``attention.{q,k,v,o}_proj``,
  ``attention.relative_position_bias.relative_position_bias_table``, ``mlp.fc1``, ``mlp.fc2``).
  ``encoder.layers.{s}.downsample`` sits at the END of stage s there too, so it moves to s + 1.

Patch merging: all three concatenate the 2x2 neighbours in the same order (x0..x3 = ``[0::2, 0::2]``,
``[1::2, 0::2]``, ``[0::2, 1::2]``, ``[1::2, 1::2]``; timm >= 0.9's ``reshape(B, H/2, 2, W/2, 2, C)
.permute(0, 1, 3, 4, 2, 5)`` yields that order too), so merge norms and reductions are moved unpermuted;
``tests/test_backbone_swin.py`` checks that every layout gives identical outputs.

Conventions of :mod:`vptune.backbones.convert`: classifier heads are renamed to ``head.*`` (split off by
``load_weights``), buffers (``relative_position_index``, ``attn_mask``) and non-backbone parts (HF pooler,
decoder, mask token) are dropped and listed on ``Converted.dropped``; unknown keys pass through so a strict
load names them. Absolute position embeddings (``ape``) are not supported: they pass through as
``absolute_pos_embed`` and a strict load refuses them.

Config readers for ``create_backbone(weights=folder)`` without a name: Hugging Face ``config.json`` with
``model_type: swin`` and timm-style ``config.json`` with ``architecture: swin_*`` are added to
:mod:`vptune.backbones.checkpoint`'s ``HF_CONFIG_READERS`` / ``TIMM_CONFIG_READERS``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from vptune.backbones import checkpoint
from vptune.backbones.convert import Converted
from vptune.backbones.registry import StateDict, register_converter
from vptune.backbones.swin import SWIN_CONFIGS, SwinConfig
from vptune.errors import VptuneError

_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


def _is_buffer(k: str) -> bool:
    return k.rsplit(".", 1)[-1] in _BUFFERS


def _has_swin_keys(sd: StateDict) -> bool:
    return "patch_embed.proj.weight" in sd and "layers.0.blocks.0.attn.qkv.weight" in sd


# --------------------------------------------------------------------------------------- timm >= 0.9

def convert_timm_swin(sd: StateDict) -> StateDict:
    """timm >= 0.9 Swin -> ours: identity but for ``head.fc.*`` -> ``head.*`` and dropped buffers."""
    dropped = [k for k in sd if _is_buffer(k)]
    out = {("head." + k[len("head.fc."):] if k.startswith("head.fc.") else k): v
           for k, v in sd.items() if not _is_buffer(k)}
    return Converted(out.items(), dropped)


def detect_timm_swin(sd: StateDict) -> bool:
    return _has_swin_keys(sd) and not detect_ms_swin(sd)


# --------------------------------------------------------------------------------- Microsoft / timm<0.9

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")


def convert_ms_swin(sd: StateDict) -> StateDict:
    """Microsoft Swin ``.pth`` (and timm < 0.9) -> ours: ``layers.{s}.downsample`` -> ``layers.{s+1}``;
    ``head.*`` stays ``head.*`` (split off later); ``relative_position_index`` and ``attn_mask`` dropped;
    ``absolute_pos_embed`` (ape models) passes through and is refused by a strict load."""
    dropped, out = [], {}
    for k, v in sd.items():
        if _is_buffer(k):
            dropped.append(k)
            continue
        m = _DOWNSAMPLE.match(k)
        out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else k] = v
    return Converted(out.items(), dropped)


def detect_ms_swin(sd: StateDict) -> bool:
    """Patch merging stored at the end of stage 0 only happens in the Microsoft / timm < 0.9 layout."""
    return _has_swin_keys(sd) and "layers.0.downsample.reduction.weight" in sd


# ------------------------------------------------------------------------------------- Hugging Face

_HF_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
}
_HF_TABLE = ("attention.self.relative_position_bias_table",
             "attention.relative_position_bias.relative_position_bias_table")
_HF_TOP = {
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.norm.weight": "patch_embed.norm.weight",
    "embeddings.norm.bias": "patch_embed.norm.bias",
    "embeddings.position_embeddings": "absolute_pos_embed",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_BLOCK_KEY = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_TABLE_KEY = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_HF_DOWN_KEY = re.compile(r"^encoder\.layers\.(\d+)\.downsample\.(.+)$")


def _hf_dropped(k: str) -> bool:
    return (_is_buffer(k) or k.startswith(("pooler.", "decoder.", "hidden_states_norms."))
            or k == "embeddings.mask_token")


def convert_hf_swin(sd: StateDict) -> StateDict:
    """Hugging Face Swin -> ours. ``query``/``key``/``value`` are fused into ``attn.qkv`` (q;k;v stacked on
    the output axis); ``encoder.layers.{s}.downsample`` (end of stage s) -> ``layers.{s+1}.downsample``;
    ``embeddings.norm`` -> ``patch_embed.norm``; ``layernorm`` -> ``norm``; ``classifier`` -> ``head``."""
    sd = {k.removeprefix("swin."): v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    dropped = [k for k in sd if _hf_dropped(k)]
    for k, v in sd.items():
        if k in dropped:
            continue
        block, table, down = _HF_BLOCK_KEY.match(k), _HF_TABLE_KEY.match(k), _HF_DOWN_KEY.match(k)
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif table and table.group(3) in _HF_TABLE:
            out[f"layers.{table.group(1)}.blocks.{table.group(2)}.attn.relative_position_bias_table"] = v
        elif block and block.group(3) in _HF_QKV:
            prefix = f"layers.{block.group(1)}.blocks.{block.group(2)}.attn.qkv"
            qkv.setdefault((prefix, block.group(4)), {})[_HF_QKV[block.group(3)]] = v
        elif block and block.group(3) in _HF_BLOCK:
            s, b, name, kind = block.groups()
            out[f"layers.{s}.blocks.{b}.{_HF_BLOCK[name]}.{kind}"] = v
        elif down:
            out[f"layers.{int(down.group(1)) + 1}.downsample.{down.group(2)}"] = v
        else:
            out[k] = v  # unrecognised: passes through so a strict load names it
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise VptuneError(f"Hugging Face Swin checkpoint holds only {sorted(parts)} of q, k, v "
                              f"for {prefix}")
        out[f"{prefix}.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return Converted(out.items(), dropped)


def detect_hf_swin(sd: StateDict) -> bool:
    keys = {k.removeprefix("swin.") for k in sd}
    return ("embeddings.patch_embeddings.projection.weight" in keys
            and any(k.startswith("encoder.layers.0.blocks.0.") for k in keys))


# ------------------------------------------------------------------------------------------ configs

def _int_list(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise VptuneError(f"config.json: {what} must be a non-empty list, got {v!r}")
    return tuple(int(x) for x in v)


def _side(v: Any, what: str) -> int:
    if isinstance(v, (list, tuple)):
        vals = {int(x) for x in v[-2:]}
        if len(vals) != 1:
            raise VptuneError(f"config.json: {what} {list(v)} is not square; vptune's Swin needs square ones")
        return vals.pop()
    return int(v)


def hf_swin_config(raw: dict[str, Any]) -> tuple[str, SwinConfig]:
    """A Hugging Face Swin ``config.json`` (``model_type: swin``) -> ("swin", SwinConfig)."""
    if raw.get("use_absolute_embeddings", False):
        raise VptuneError("config.json sets use_absolute_embeddings=true (ape); "
                          "vptune's Swin does not support it")
    if raw.get("hidden_act", "gelu") != "gelu" or int(raw.get("num_channels", 3)) != 3:
        raise VptuneError("vptune's Swin supports hidden_act='gelu' and num_channels=3 only, config.json has "
                          f"{raw.get('hidden_act')!r} and {raw.get('num_channels')!r}")
    embed = int(raw.get("embed_dim", 96))
    depths = _int_list(raw.get("depths", [2, 2, 6, 2]), "depths")
    heads = _int_list(raw.get("num_heads", [3, 6, 12, 24]), "num_heads")
    if len(depths) != len(heads):
        raise VptuneError(f"config.json: depths {list(depths)} and num_heads {list(heads)} differ in length")
    cfg = SwinConfig(
        img_size=_side(raw.get("image_size", 224), "image_size"),
        patch_size=_side(raw.get("patch_size", 4), "patch_size"),
        embed_dim=embed, depths=depths, num_heads=heads,
        window_size=int(raw.get("window_size", 7)),
        mlp_ratio=float(raw.get("mlp_ratio", 4.0)),
        qkv_bias=bool(raw.get("qkv_bias", True)),
        norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
    )
    return "swin", cfg


def timm_swin_config(raw: dict[str, Any]) -> tuple[str, SwinConfig]:
    """A timm-style ``config.json`` (``architecture: swin_base_patch4_window7_224[.tag]``) -> SwinConfig:
    the registered config of that name (``swin`` defaults otherwise), updated by ``embed_dim``,
    ``depths``, ``num_heads``, ``window_size``, ``img_size`` and ``mean``/``std`` when present (at the top
    level, under ``model_args`` or under ``pretrained_cfg``)."""
    arch = str(raw.get("architecture", "swin")).split(".")[0]
    cfg = SWIN_CONFIGS[arch] if arch in SWIN_CONFIGS else SwinConfig()
    merged = {**raw.get("pretrained_cfg", {}), **raw.get("model_args", {}), **raw}
    upd: dict[str, Any] = {}
    for key, f in (("embed_dim", int), ("window_size", int), ("mlp_ratio", float), ("qkv_bias", bool)):
        if key in merged:
            upd[key] = f(merged[key])
    for key in ("depths", "num_heads"):
        if key in merged:
            upd[key] = _int_list(merged[key], key)
    if "patch_size" in merged:
        upd["patch_size"] = _side(merged["patch_size"], "patch_size")
    if "img_size" in merged or "input_size" in merged:
        upd["img_size"] = _side(merged.get("img_size", merged.get("input_size")), "img_size")
    upd.update({k: tuple(float(x) for x in merged[k]) for k in ("mean", "std") if k in merged})
    if merged.get("ape") or merged.get("absolute_pos_embed"):
        raise VptuneError("config.json asks for absolute position embeddings (ape); "
                          "vptune's Swin does not support them")
    return (arch if arch in SWIN_CONFIGS else "swin"), replace(cfg, **upd)


def _register() -> None:
    register_converter("timm-swin", convert_timm_swin, arch="swin", detect=detect_timm_swin,
                       description="timm >= 0.9 Swin (layers.S.downsample at the start of stage S, head.fc)")
    register_converter("ms-swin", convert_ms_swin, arch="swin", detect=detect_ms_swin,
                       description="Microsoft Swin .pth / timm < 0.9 (downsample at the end of each stage)")
    register_converter("hf-swin", convert_hf_swin, arch="swin", detect=detect_hf_swin,
                       description="Hugging Face SwinModel / SwinForImageClassification "
                                   "([swin.]encoder.layers...)")
    checkpoint.HF_CONFIG_READERS.setdefault("swin", hf_swin_config)
    checkpoint.TIMM_CONFIG_READERS.setdefault("swin", timm_swin_config)


_register()
