"""Checkpoint converters: pure ``state_dict -> state_dict`` maps from published layouts to our timm names.

Each converter is registered with :func:`vptune.backbones.registry.register_converter` under a ``source``
name, with the backbone family it targets (``arch``) and a ``detect`` predicate used by ``source="auto"``.
The layouts (see REFERENCE.md, "Checkpoint layouts"):

- ``timm``: timm's ViT names (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.{norm1,
  attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``) -- the identity.
- ``jax``: Google's original ViT ``.npz`` (Dosovitskiy et al. 2021; ``imagenet21k_ViT-B_16.npz`` and the
  AugReg / big_vision files).
- ``hf``: Hugging Face ``ViTModel`` / ``ViTForImageClassification``.
- ``mae``: ``mae_pretrain_vit_base.pth`` (He et al. 2022), timm names plus the decoder.
- ``mocov3``: ``vit-b-300ep.pth.tar`` (Chen et al. 2021), ``module.base_encoder.`` prefixes.

Conventions shared by every converter (so that ``load_weights`` can treat them alike):

- classifier heads are *renamed* to timm names (``head.*``, ``pre_logits.fc.*``), never dropped here;
  ``load_weights`` splits them off (dropped by default, returned with ``keep_head=True``);
- keys that belong to no backbone (MAE decoder, MoCo momentum encoder and predictor, HF pooler) are
  dropped, and their original names are listed on the result's ``dropped`` attribute
  (:class:`Converted`, a plain ``dict`` subclass);
- keys a converter does not recognise pass through unchanged, so a strict load names them.

Unwrapping ``{'model': ...}`` / ``{'state_dict': ...}`` containers is the file reader's job
(:mod:`vptune.backbones.checkpoint`), not the converters'.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from vptune.backbones.registry import StateDict, register_converter
from vptune.errors import VptuneError

HEAD_PREFIXES = ("head.", "head_drop.", "pre_logits.")


class Converted(dict):
    """A converted state dict (``dict[str, Tensor]``) that also lists the source keys it dropped."""

    def __init__(self, items: Iterable[tuple[str, Tensor]] = (), dropped: Iterable[str] = ()) -> None:
        super().__init__(items)
        self.dropped: list[str] = sorted(dropped)


def _split(sd: StateDict, drop: Callable[[str], bool]) -> tuple[StateDict, list[str]]:
    kept = {k: v for k, v in sd.items() if not drop(k)}
    return kept, [k for k in sd if drop(k)]


def _has_timm_vit_keys(sd: StateDict, prefix: str = "") -> bool:
    return f"{prefix}patch_embed.proj.weight" in sd and f"{prefix}blocks.0.attn.qkv.weight" in sd


# --------------------------------------------------------------------------------------------- timm

def _is_aux(k: str) -> bool:
    return k.startswith("decoder") or k == "mask_token"


def convert_timm(sd: StateDict) -> StateDict:
    """timm ViT -> timm ViT: the identity (the head is split off later by ``load_weights``)."""
    return Converted(sd.items())


def detect_timm(sd: StateDict) -> bool:
    return _has_timm_vit_keys(sd) and not any(_is_aux(k) for k in sd)


# ---------------------------------------------------------------------------------------------- MAE

def convert_mae(sd: StateDict) -> StateDict:
    """MAE (``mae_pretrain_vit_base.pth``, ``{'model': sd}``) -> timm names.

    The MAE encoder is stored in timm names with no head; the decoder (``decoder_*``) and ``mask_token``
    are dropped. MAE fine-tuning pools the mean of the patch tokens through a *new* ``fc_norm`` (and
    deletes the final ``norm``); our MAE configs (``fc_norm=True``) do the same. Decision: since the
    backbone stays frozen under VPT, the checkpoint's pretrained final ``norm.*`` is reused as the
    pooled-feature ``fc_norm.*`` rather than leaving a randomly initialised norm in front of the head.
    A checkpoint that already carries ``fc_norm.*`` (an MAE fine-tuned model) keeps it unchanged.
    """
    kept, dropped = _split(sd, _is_aux)
    if "fc_norm.weight" not in kept and "norm.weight" in kept:
        kept = {("fc_" + k if k.startswith("norm.") else k): v for k, v in kept.items()}
    return Converted(kept.items(), dropped)


def detect_mae(sd: StateDict) -> bool:
    """MAE: timm names with the decoder, or an encoder-only file with no head (also fits ``timm``;
    ``load_weights`` then picks whichever fits the target backbone)."""
    if not _has_timm_vit_keys(sd):
        return False
    return any(_is_aux(k) for k in sd) or ("head.weight" not in sd and "fc_norm.weight" not in sd)


# ------------------------------------------------------------------------------------------ MoCo-v3

MOCO_BASE, MOCO_MODULE = "module.base_encoder.", "module."


def convert_mocov3(sd: StateDict) -> StateDict:
    """MoCo-v3 (``vit-b-300ep.pth.tar``, ``{'state_dict': sd}``) -> timm names.

    Keeps ``module.base_encoder.*`` with the prefix removed; drops ``module.momentum_encoder.*`` and
    ``module.predictor.*``. The base encoder's ``head.*`` (its projection MLP) is left as ``head.*`` for
    ``load_weights`` to split off. The fixed 2-D sin-cos ``pos_embed`` is stored in the file and loaded
    as is. The linear-probe checkpoint (``linear-vit-b-300ep.pth.tar``, plain ``module.`` prefix, as used
    by the reference VPT code) is accepted too.
    """
    prefix = MOCO_BASE if any(k.startswith(MOCO_BASE) for k in sd) else MOCO_MODULE
    kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return Converted(kept.items(), [k for k in sd if not k.startswith(prefix)])


def detect_mocov3(sd: StateDict) -> bool:
    return _has_timm_vit_keys(sd, MOCO_BASE) or _has_timm_vit_keys(sd, MOCO_MODULE)


# ------------------------------------------------------------------------------------- Hugging Face

_HF_BLOCK = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",  # transformers >= 5 in-memory names
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
           "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_LAYER = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def convert_hf(sd: StateDict) -> StateDict:
    """Hugging Face ViT (``[vit.]embeddings.*``, ``[vit.]encoder.layer.{i}.*``, ``[vit.]layernorm``,
    ``classifier``) -> timm names. ``query``/``key``/``value`` are fused into ``attn.qkv`` (q;k;v
    stacked on the output axis); ``pooler.*`` and ``embeddings.mask_token`` are dropped. The hub
    (``save_pretrained``) names are the ones above; the in-memory names of transformers >= 5
    (``layers.{i}.attention.{q,k,v,o}_proj``, ``layers.{i}.mlp.fc{1,2}``) are accepted too."""
    sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[int, Tensor]] = {}
    dropped = [k for k in sd if k.startswith("pooler.") or k == "embeddings.mask_token"]
    for k, v in sd.items():
        m = _HF_LAYER.match(k)
        if k in dropped:
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif m and m.group(2) in _HF_QKV:
            qkv.setdefault((m.group(1), m.group(3)), {})[_HF_QKV[m.group(2)]] = v
        elif m and m.group(2) in _HF_BLOCK:
            out[f"blocks.{m.group(1)}.{_HF_BLOCK[m.group(2)]}.{m.group(3)}"] = v
        else:
            out[k] = v  # unrecognised: passes through so a strict load names it
    for (i, kind), parts in qkv.items():
        if len(parts) != 3:
            raise VptuneError(f"Hugging Face layer {i} lacks some of query/key/value {kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return Converted(out.items(), dropped)


def detect_hf(sd: StateDict) -> bool:
    marks = ("encoder.layer.0.attention.attention.query.weight", "layers.0.attention.q_proj.weight")
    return any(k.removeprefix("vit.") in marks for k in sd) and any(
        k.removeprefix("vit.") == "embeddings.patch_embeddings.projection.weight" for k in sd)


# ---------------------------------------------------------------------------------------------- JAX

_JAX_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.+)$")


def _jax_names(sd: StateDict) -> dict[str, int]:
    """Sub-module indices of this file's block layout: original ViT (``LayerNorm_0``,
    ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``) or big_vision
    (``_0, _0, _1, _0``)."""
    if any("MultiHeadDotProductAttention_0" in k for k in sd):
        return {"ln1": 0, "mha": 0, "ln2": 1, "mlp": 0}
    return {"ln1": 0, "mha": 1, "ln2": 2, "mlp": 3}


def _jax_linear(kernel: Tensor) -> Tensor:
    """Flax Dense kernel (in, out) -> torch Linear weight (out, in)."""
    return kernel.t().contiguous()


def _jax_block(rest: str, sd: StateDict, prefix: str, n: dict[str, int]) -> dict[str, Tensor] | None:
    """Map one block's keys (``rest`` relative to ``Transformer/encoderblock_{i}/``); None if unknown."""
    mha = f"MultiHeadDotProductAttention_{n['mha']}"
    for ln, ours in ((f"LayerNorm_{n['ln1']}", "norm1"), (f"LayerNorm_{n['ln2']}", "norm2")):
        if rest in (f"{ln}/scale", f"{ln}/bias"):
            return {f"{ours}.{'weight' if rest.endswith('scale') else 'bias'}": sd[prefix + rest]}
    for j, ours in ((0, "fc1"), (1, "fc2")):
        dense = f"MlpBlock_{n['mlp']}/Dense_{j}"
        if rest == f"{dense}/kernel":
            return {f"mlp.{ours}.weight": _jax_linear(sd[prefix + rest])}
        if rest == f"{dense}/bias":
            return {f"mlp.{ours}.bias": sd[prefix + rest]}
    if rest == f"{mha}/out/kernel":  # (heads, head_dim, d) -> (d, heads*head_dim)
        return {"attn.proj.weight": _jax_linear(sd[prefix + rest].flatten(0, 1))}
    if rest == f"{mha}/out/bias":
        return {"attn.proj.bias": sd[prefix + rest]}
    if rest == f"{mha}/query/kernel":  # fuse q, k, v: kernels (d, heads, head_dim), biases (heads, head_dim)
        ws = [_jax_linear(sd[f"{prefix}{mha}/{p}/kernel"].flatten(1)) for p in ("query", "key", "value")]
        out = {"attn.qkv.weight": torch.cat(ws, dim=0)}
        if f"{prefix}{mha}/query/bias" in sd:
            bs = [sd[f"{prefix}{mha}/{p}/bias"].flatten() for p in ("query", "key", "value")]
            out["attn.qkv.bias"] = torch.cat(bs)
        return out
    if rest.startswith(f"{mha}/") and rest.split("/")[1] in ("query", "key", "value"):
        return {}  # consumed with query/kernel above
    return None


_JAX_TOP = {
    "cls": "cls_token",
    "embedding/bias": "patch_embed.proj.bias",
    "Transformer/posembed_input/pos_embedding": "pos_embed",
    "Transformer/encoder_norm/scale": "norm.weight",
    "Transformer/encoder_norm/bias": "norm.bias",
    "head/bias": "head.bias",
    "pre_logits/bias": "pre_logits.fc.bias",
}


def _jax_top(k: str, v: Tensor) -> dict[str, Tensor] | None:
    if k in _JAX_TOP:
        return {_JAX_TOP[k]: v}
    if k == "embedding/kernel":  # HWIO -> OIHW
        return {"patch_embed.proj.weight": v.permute(3, 2, 0, 1).contiguous()}
    if k == "head/kernel":
        return {"head.weight": _jax_linear(v)}
    if k == "pre_logits/kernel":
        return {"pre_logits.fc.weight": _jax_linear(v)}
    return None


def convert_jax(sd: StateDict) -> StateDict:
    """Original Google ViT ``.npz`` -> timm names.

    ``embedding/kernel`` HWIO -> conv OIHW; ``cls`` -> ``cls_token``; ``Transformer/posembed_input/
    pos_embedding`` -> ``pos_embed``; ``Transformer/encoder_norm`` -> ``norm``; per block ``LayerNorm_0``
    -> ``norm1``, ``MultiHeadDotProductAttention_1/{query,key,value}`` (kernels (d, heads, head_dim),
    biases (heads, head_dim)) fused into ``attn.qkv``, ``.../out`` (kernel (heads, head_dim, d)) ->
    ``attn.proj``, ``LayerNorm_2`` -> ``norm2``, ``MlpBlock_3/Dense_{0,1}`` -> ``mlp.fc{1,2}`` (Flax
    kernels are (in, out), so transposed); ``pre_logits`` and ``head`` -> timm names (split off later).
    Keys written with ``.`` instead of ``/`` are accepted.
    """
    sd = {k.replace(".", "/"): v for k, v in sd.items()}
    names, out = _jax_names(sd), {}
    for k, v in sd.items():
        m = _JAX_BLOCK.match(k)
        if m:
            mapped = _jax_block(m.group(2), sd, f"Transformer/encoderblock_{m.group(1)}/", names)
            mapped = None if mapped is None else {f"blocks.{m.group(1)}.{n}": t for n, t in mapped.items()}
        else:
            mapped = _jax_top(k, v)
        out.update({k: v} if mapped is None else mapped)  # unknown keys pass through unchanged
    return Converted(out.items())


def detect_jax(sd: StateDict) -> bool:
    keys = {k.replace(".", "/") for k in sd}
    return "embedding/kernel" in keys and any(k.startswith("Transformer/encoderblock_") for k in keys)


def _register() -> None:
    register_converter("timm", convert_timm, arch="vit", detect=detect_timm,
                       description="timm ViT names (cls_token, pos_embed, blocks.N.attn.qkv, ...)")
    register_converter("jax", convert_jax, arch="vit", detect=detect_jax,
                       description="original Google ViT .npz (embedding/kernel, Transformer/encoderblock_N)")
    register_converter("hf", convert_hf, arch="vit", detect=detect_hf,
                       description="Hugging Face ViTModel / ViTForImageClassification")
    register_converter("mae", convert_mae, arch="vit", detect=detect_mae,
                       description="MAE pre-training checkpoint (timm names + decoder; norm -> fc_norm)")
    register_converter("mocov3", convert_mocov3, arch="vit", detect=detect_mocov3,
                       description="MoCo-v3 checkpoint (module.base_encoder.* prefixes)")


_register()
