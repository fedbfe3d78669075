"""Reading checkpoint files safely and loading them into a backbone, loudly.

- :func:`read_state_dict`: ``.safetensors``, ``.pth/.pt/.bin/.tar/.ckpt`` (``torch.load(weights_only=True)``
  only: vptune never unpickles arbitrary objects), ``.npz`` (``allow_pickle=False``) or a folder holding
  ``model.safetensors`` / ``pytorch_model.bin``. Containers ``{'model': sd}`` (MAE, Swin),
  ``{'state_dict': sd}`` (MoCo-v3) and ``{'module': sd}`` are unwrapped here.
- :func:`detect_source`: which registered layout (``timm``, ``jax``, ``hf``, ``mae``, ``mocov3``, ...) a
  state dict is in; it always names what it found.
- :func:`config_from_folder`: a backbone config from a timm-style or Hugging Face ``config.json``.
- :func:`load_weights`: convert, compare key sets and shapes, refuse silent partial loads, resize
  position embeddings to the config's grid, load, and return a :class:`LoadReport`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vptune.backbones import convert  # noqa: F401  (registers the ViT converters)
from vptune.backbones.convert import HEAD_PREFIXES
from vptune.backbones.registry import CONVERTERS, FAMILIES, StateDict, resolve
from vptune.backbones.vit import VIT_CONFIGS, ViTConfig, resize_pos_embed, sincos_pos_embed
from vptune.errors import VptuneError

logger = logging.getLogger("vptune")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
VALID_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".npz")
CONTAINER_KEYS = ("model", "state_dict", "module")
MAX_LISTED = 10


# ------------------------------------------------------------------------------------------ reading

def read_state_dict(path: str | Path) -> StateDict:
    """Read the tensors of a checkpoint file or folder (see the module docstring for the formats)."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found:
            present = ", ".join(sorted(p.name for p in path.iterdir())[:MAX_LISTED]) or "nothing"
            raise VptuneError(f"folder {str(path)!r} holds no weights file; expected one of "
                              f"{', '.join(WEIGHT_FILES)}, found: {present}")
        path = found[0]
    if not path.is_file():
        raise VptuneError(f"checkpoint {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return unwrap_state_dict(_read_torch(path), path)
    if suffix == ".npz":
        return _read_npz(path)
    raise VptuneError(f"unknown checkpoint format {suffix or '(no suffix)'!r} for {str(path)!r}; "
                      f"valid choices: {', '.join(VALID_SUFFIXES)} "
                      f"or a folder with {' or '.join(WEIGHT_FILES)}")


def _read_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for bad headers and short files
        raise VptuneError(f"cannot read {str(path)!r}: corrupt or truncated safetensors file ({e})") from None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch words every weights_only failure "Weights only load failed"; only a forbidden global means
        # a real pickle that was refused -- random bytes or a truncated file are just unreadable
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if not found:
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", str(e) + "\n")
            first = (detail.group(1) if detail else str(e).strip().split("\n")[0])[:200] or type(e).__name__
            raise VptuneError(f"cannot read {str(path)!r}: corrupt, truncated or not a PyTorch checkpoint "
                              f"({first})") from None
        what = f" (it holds a pickled {found.group(1)})"
        raise VptuneError(
            f"refusing to unpickle {str(path)!r}{what}: vptune loads .pth files with weights_only=True only, "
            "since unpickling can run arbitrary code. If you trust the file, re-save just its tensors, e.g. "
            "safetensors.torch.save_file(state_dict, 'model.safetensors'), and load that") from None
    except Exception as e:  # noqa: BLE001 -- zip reader errors, EOF, random bytes
        raise VptuneError(f"cannot read {str(path)!r}: corrupt or truncated checkpoint "
                          f"({type(e).__name__}: {str(e)[:200]})") from None


def _read_npz(path: Path) -> StateDict:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise VptuneError(f"refusing to unpickle {str(path)!r}: it holds object arrays; "
                              "vptune reads .npz files with allow_pickle=False only") from None
        raise VptuneError(f"cannot read {str(path)!r}: corrupt .npz file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise VptuneError(f"cannot read {str(path)!r}: corrupt or truncated .npz file ({e})") from None


def unwrap_state_dict(obj: Any, where: str | Path = "checkpoint") -> StateDict:
    """Tensors of a loaded checkpoint, unwrapping ``{'model': ...}``, ``{'state_dict': ...}`` and
    ``{'module': ...}`` containers (other entries such as ``epoch`` or ``optimizer`` are ignored)."""
    for _ in range(3):  # containers nest at most a couple of levels in practice
        if not isinstance(obj, Mapping) or any(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)} if isinstance(obj, Mapping) else {}
    if not sd:
        keys = list(obj)[:MAX_LISTED] if isinstance(obj, Mapping) else type(obj).__name__
        raise VptuneError(f"{str(where)!r} holds no state dict of tensors (found: {keys}); expected tensors "
                          f"at the top level or under one of {', '.join(CONTAINER_KEYS)}")
    return sd


# ------------------------------------------------------------------------------------------ sources

def detect_source(sd: StateDict, backbone: nn.Module | None = None) -> str:
    """Name the registered checkpoint layout that ``sd`` is in.

    Every registered ``detect`` predicate is tried. When several match (a head-less timm file also looks
    like an encoder-only MAE file) and a ``backbone`` is given, the one whose converted keys fit the
    backbone exactly wins. No match or a remaining ambiguity raises :class:`VptuneError` naming the
    candidates found and the valid sources.
    """
    matches = [s for s, c in CONVERTERS.items() if c.detect is not None and c.detect(sd)]
    valid = ", ".join(sorted(CONVERTERS))
    if not matches:
        sample = ", ".join(list(sd)[:6])
        raise VptuneError(f"could not recognise the checkpoint layout (first keys: {sample}); "
                          f"pass source= one of: {valid}")
    if backbone is not None:
        same_arch = [s for s in matches if CONVERTERS[s].arch == backbone.arch]
        if not same_arch:
            raise VptuneError(f"the checkpoint looks like {' or '.join(map(repr, matches))} "
                              f"({CONVERTERS[matches[0]].arch}), but the backbone is a {backbone.arch!r}")
        matches = _closest(same_arch, sd, backbone)
    if len(matches) > 1:
        raise VptuneError(f"ambiguous checkpoint layout: it matches {', '.join(matches)}; "
                          f"pass source= one of: {valid}")
    return matches[0]


def _closest(sources: list[str], sd: StateDict, backbone: nn.Module) -> list[str]:
    """The layouts whose converted key set is nearest the backbone's (an exact fit when one exists), so
    that a checkpoint of another size is loaded as its layout and then refused for its real gaps."""
    own = set(backbone.state_dict())
    gaps = {s: len(set(_split_head(CONVERTERS[s].fn(sd))[0]) ^ own) for s in sources}
    best = min(gaps.values())
    return [s for s in sources if gaps[s] == best]


def _split_head(sd: StateDict) -> tuple[StateDict, StateDict]:
    head = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIXES)}
    return {k: v for k, v in sd.items() if k not in head}, head


# ------------------------------------------------------------------------------------------- config

def _square(v: Any, what: str) -> int:
    if isinstance(v, (list, tuple)):
        v = [int(x) for x in v[-2:]]
        if len(set(v)) != 1:
            raise VptuneError(f"{what} {v} is not square; vptune's ViT needs square inputs and patches")
        return v[0]
    return int(v)


def _mlp_ratio(hidden: int, dim: int) -> float:
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise VptuneError(f"intermediate size {hidden} is not representable as mlp_ratio * {dim}")
    return ratio


_TIMM_POOL = {"token": "cls", "avg": "image_mean", "cls": "cls", "image_mean": "image_mean"}
_TIMM_SUPPORTED = {"class_token": (True, None), "no_embed_class": (False, None), "pre_norm": (False, None),
                   "reg_tokens": (0, None), "init_values": (None,)}


def _timm_vit_config(raw: dict[str, Any]) -> tuple[str, ViTConfig]:
    """A timm-style ``config.json`` (``architecture``, ``embed_dim``, ``depth``, ...) -> ViTConfig."""
    name = str(raw.get("architecture", "vit"))
    for key, ok in _TIMM_SUPPORTED.items():
        if raw.get(key) not in ok:
            raise VptuneError(f"config.json sets {key}={raw[key]!r}, which vptune's ViT does not support "
                              f"(supported: {ok[0]!r})")
    pool = raw.get("global_pool", "token")
    if pool not in _TIMM_POOL:
        raise VptuneError(f"unknown global_pool {pool!r} in config.json; "
                          f"valid choices: {', '.join(_TIMM_POOL)}")
    cfg = VIT_CONFIGS[name] if name in VIT_CONFIGS else ViTConfig()
    plain = {"embed_dim": int, "depth": int, "num_heads": int, "mlp_ratio": float, "qkv_bias": bool}
    upd: dict[str, Any] = {k: f(raw[k]) for k, f in plain.items() if k in raw}
    if "patch_size" in raw:
        upd["patch_size"] = _square(raw["patch_size"], "patch_size")
    if "img_size" in raw or "input_size" in raw:
        upd["img_size"] = _square(raw.get("img_size", raw.get("input_size")), "img_size")
    if "layer_norm_eps" in raw:
        upd["norm_eps"] = float(raw["layer_norm_eps"])
    upd.update({k: tuple(float(x) for x in raw[k]) for k in ("mean", "std") if k in raw})
    upd["global_pool"] = _TIMM_POOL[pool]
    fc_norm = raw.get("fc_norm")  # timm: None means "on for average pooling"
    upd["fc_norm"] = bool(pool == "avg" if fc_norm is None else fc_norm)
    return (name if name in VIT_CONFIGS else "vit"), replace(cfg, **upd)


def _hf_vit_config(raw: dict[str, Any]) -> tuple[str, ViTConfig]:
    """A Hugging Face ViT ``config.json`` (``model_type: vit``) -> ViTConfig. ``layer_norm_eps`` (usually
    1e-12 there) is kept as is: it is not timm's 1e-6."""
    if raw.get("hidden_act", "gelu") != "gelu" or int(raw.get("num_channels", 3)) != 3:
        raise VptuneError("vptune's ViT supports hidden_act='gelu' and num_channels=3 only, config.json has "
                          f"{raw.get('hidden_act')!r} and {raw.get('num_channels')!r}")
    d = int(raw.get("hidden_size", 768))
    return "vit", ViTConfig(
        img_size=_square(raw.get("image_size", 224), "image_size"),
        patch_size=_square(raw.get("patch_size", 16), "patch_size"),
        embed_dim=d,
        depth=int(raw.get("num_hidden_layers", 12)),
        num_heads=int(raw.get("num_attention_heads", 12)),
        mlp_ratio=_mlp_ratio(int(raw.get("intermediate_size", 4 * d)), d),
        qkv_bias=bool(raw.get("qkv_bias", True)),
        norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
    )


# Hugging Face configs dispatch on ``model_type``; timm-style ones on the prefix of ``architecture``.
# Other families (Swin) add their readers here from their own module.
HF_CONFIG_READERS: dict[str, Callable[[dict[str, Any]], tuple[str, Any]]] = {"vit": _hf_vit_config}
TIMM_CONFIG_READERS: dict[str, Callable[[dict[str, Any]], tuple[str, Any]]] = {
    p: _timm_vit_config for p in ("vit", "deit", "mae", "mocov3")
}


def config_from_folder(path: str | Path) -> tuple[str, Any]:
    """(name or arch, config) from ``path/config.json``: a registered name when the timm-style
    ``architecture`` is one, else the family (``"vit"``). Mean/std from a Hugging Face
    ``preprocessor_config.json`` (``image_mean``/``image_std``) are used when present."""
    raw = _read_json(Path(path) / "config.json")
    if "model_type" in raw:
        reader = HF_CONFIG_READERS.get(raw["model_type"])
        if reader is None:
            raise VptuneError(f"unsupported Hugging Face model_type {raw['model_type']!r} in "
                              f"{str(path)!r}; valid choices: {', '.join(sorted(HF_CONFIG_READERS))}")
        name, cfg = reader(raw)
        pre = Path(path) / "preprocessor_config.json"
        if pre.is_file() and hasattr(cfg, "mean"):
            p = _read_json(pre)
            cfg = replace(cfg, mean=tuple(p.get("image_mean", cfg.mean)),
                          std=tuple(p.get("image_std", cfg.std)))
        return name, cfg
    arch = str(raw.get("architecture", ""))
    prefix = max((p for p in TIMM_CONFIG_READERS if arch.startswith(p)), key=len, default=None)
    if prefix is None:
        raise VptuneError(f"config.json in {str(path)!r} names architecture {arch!r}; valid prefixes: "
                          f"{', '.join(sorted(TIMM_CONFIG_READERS))} (or a Hugging Face 'model_type')")
    return TIMM_CONFIG_READERS[prefix](raw)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise VptuneError(f"{str(path)!r} does not exist")
    try:
        out = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VptuneError(f"cannot parse {str(path)!r}: {e}") from None
    if not isinstance(out, dict):
        raise VptuneError(f"{str(path)!r} must hold a JSON object")
    return out


def family_for(name_or_arch: str) -> Any:
    """The registered family (a ``FAMILIES`` entry) of a name returned by :func:`config_from_folder`."""
    return FAMILIES[name_or_arch] if name_or_arch in FAMILIES else resolve(name_or_arch)[0]


# ------------------------------------------------------------------------------------------ loading

@dataclass
class LoadReport:
    """What :func:`load_weights` did: the layout used, and every key it could not or chose not to load.

    missing: backbone keys the checkpoint lacks. unexpected: converted checkpoint keys the backbone lacks.
    dropped: keys deliberately left out (the classifier head unless ``keep_head``, MAE decoder, MoCo
    momentum encoder, ...). mismatched: keys present on both sides with different shapes.
    resized: keys adapted to the backbone (position embeddings of another grid). head: the head tensors
    (timm names) when ``keep_head=True``, else None.
    """

    source: str
    missing: list[str]
    unexpected: list[str]
    dropped: list[str]
    mismatched: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    loaded: int = 0
    path: str | None = None
    head: dict[str, Tensor] | None = None

    @property
    def complete(self) -> bool:
        """True when every backbone tensor came from the checkpoint and nothing was left unexplained."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        parts = [f"loaded {self.loaded} tensors{where} (source '{self.source}')"]
        for what in ("missing", "unexpected", "mismatched", "dropped", "resized"):
            keys = getattr(self, what)
            if keys:
                parts.append(f"{what} {len(keys)}: {_listing(keys)}")
        if self.head:
            parts.append(f"head kept: {', '.join(f'{k} {tuple(v.shape)}' for k, v in self.head.items())}")
        return "; ".join(parts)


def _listing(keys: list[str]) -> str:
    more = f", ... (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def load_weights(backbone: nn.Module, path_or_sd: str | Path | Mapping[str, Tensor], source: str = "auto",
                 strict: bool = True, keep_head: bool = False) -> LoadReport:
    """Load a checkpoint (path, folder or state dict) into ``backbone`` and report what happened.

    ``source``: a registered layout (``timm``, ``jax``, ``hf``, ``mae``, ``mocov3``, ...) or ``"auto"``
    (:func:`detect_source`). The classifier head is dropped unless ``keep_head`` (then returned as
    ``report.head``). Position embeddings of another grid are resized to the backbone's config
    (bicubic; regenerated for fixed sin-cos ones). With ``strict`` (the default) any missing, unexpected
    or shape-mismatched key raises :class:`VptuneError` listing them, and nothing is loaded; otherwise the
    matching tensors are loaded and the rest reported (logged as a warning, never silent).
    """
    where = None if isinstance(path_or_sd, Mapping) else str(path_or_sd)
    raw = unwrap_state_dict(path_or_sd, "state dict") if where is None else read_state_dict(path_or_sd)
    source = _choose_source(raw, source, backbone)
    converted = CONVERTERS[source].fn(raw)
    sd, head = _split_head(converted)
    dropped = list(getattr(converted, "dropped", [])) + ([] if keep_head else sorted(head))
    resized = _fit_pos_embed(sd, backbone)
    own = backbone.state_dict()
    mismatched = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    report = LoadReport(source, sorted(set(own) - set(sd)), sorted(set(sd) - set(own)), dropped, mismatched,
                        resized, path=where, head=dict(head) if keep_head else None)
    if strict and not report.complete:
        raise VptuneError(_refusal(report, own, sd, backbone.arch))
    usable = {k: v for k, v in sd.items() if k in own and k not in mismatched}
    backbone.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    backbone.reset_fingerprint()
    if not report.complete:
        logger.warning("partial load (strict=False): %s", report)
    return report


def _choose_source(sd: StateDict, source: str, backbone: nn.Module) -> str:
    if source == "auto":
        found = detect_source(sd, backbone)
        logger.info("checkpoint layout detected: %r", found)
        return found
    family_source = f"{source}-{backbone.arch}"  # "timm"/"hf" name the family's layout (e.g. timm-swin)
    if source in CONVERTERS and CONVERTERS[source].arch != backbone.arch and family_source in CONVERTERS:
        source = family_source
    if source not in CONVERTERS:
        raise VptuneError(f"unknown checkpoint source {source!r}; "
                          f"valid choices: auto, {', '.join(sorted(CONVERTERS))}")
    if CONVERTERS[source].arch != backbone.arch:
        raise VptuneError(f"source {source!r} is a {CONVERTERS[source].arch!r} layout, but the backbone is a "
                          f"{backbone.arch!r}; valid sources for it: "
                          f"{', '.join(s for s, c in sorted(CONVERTERS.items()) if c.arch == backbone.arch)}")
    return source


def _fit_pos_embed(sd: dict[str, Tensor], backbone: nn.Module) -> list[str]:
    """Resize a (1, 1+N, d) ``pos_embed`` of another square grid to the backbone's (in place)."""
    own = getattr(backbone, "pos_embed", None)
    pe = sd.get("pos_embed")
    if own is None or pe is None or pe.dim() != 3 or own.dim() != 3 or pe.shape == own.shape:
        return []
    if pe.shape[-1] != own.shape[-1]:
        return []  # a width mismatch is reported as a shape mismatch, not papered over
    side = round((own.shape[1] - 1) ** 0.5)
    config = getattr(backbone, "config", None)
    if getattr(config, "pos_embed", "learn") == "sincos":
        sd["pos_embed"] = sincos_pos_embed(own.shape[-1], (side, side)).to(pe.dtype)
    else:
        sd["pos_embed"] = resize_pos_embed(pe.float(), (side, side)).to(pe.dtype)
    logger.info("resized pos_embed %s -> %s", tuple(pe.shape), tuple(own.shape))
    return ["pos_embed"]


def _refusal(report: LoadReport, own: StateDict, sd: StateDict, arch: str) -> str:
    lines = [(f"refusing a partial load of {report.path or 'the state dict'} (source '{report.source}') "
              f"into a {arch!r} backbone; pass strict=False to load the matching tensors anyway")]
    if report.missing:
        lines.append(f"missing {len(report.missing)}: {_listing(report.missing)}")
    if report.unexpected:
        lines.append(f"unexpected {len(report.unexpected)}: {_listing(report.unexpected)}")
    if report.mismatched:
        shapes = [f"{k} (checkpoint {tuple(sd[k].shape)}, backbone {tuple(own[k].shape)})"
                  for k in report.mismatched]
        lines.append(f"shape mismatch {len(shapes)}: {_listing(shapes)}")
    if report.missing and report.unexpected:
        lines.append("(a different backbone config, or another source=, may fit this checkpoint)")
    return "; ".join(lines)
