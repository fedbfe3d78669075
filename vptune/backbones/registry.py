"""Named backbone configs and checkpoint converters, both registered as data.

- ``register_arch(arch, cls, config_cls, configs)``: a backbone family (``vit``, ``swin``) with its named
  configs; ``resolve(name)`` finds the family and a copy of the config.
- ``register_converter(source, fn, detect=None, arch=...)``: a pure ``state_dict -> state_dict``
  function that maps a checkpoint layout (``timm``, ``jax``, ``hf``, ``mae``, ``mocov3``, ...) to our
  (timm) names. ``detect`` (optional) says whether a raw state dict looks like that layout, for
  ``source="auto"``, which always names what it found.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from vptune.errors import VptuneError

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class Family:
    arch: str
    cls: type
    config_cls: type
    configs: dict[str, Any]


@dataclass(frozen=True)
class Converter:
    source: str
    fn: Callable[[StateDict], StateDict]
    detect: Callable[[StateDict], bool] | None
    arch: str
    description: str


FAMILIES: dict[str, Family] = {}
CONVERTERS: dict[str, Converter] = {}


def register_arch(arch: str, cls: type, config_cls: type, configs: dict[str, Any]) -> None:
    FAMILIES[arch] = Family(arch, cls, config_cls, configs)


def register_converter(source: str, fn: Callable[[StateDict], StateDict], *, arch: str,
                       detect: Callable[[StateDict], bool] | None = None, description: str = "") -> None:
    CONVERTERS[source] = Converter(source, fn, detect, arch, description)


def list_backbones() -> list[str]:
    return sorted(name for fam in FAMILIES.values() for name in fam.configs)


def resolve(name: str) -> tuple[Family, Any]:
    """Family and a fresh copy of the named config; unknown names list the valid ones."""
    for fam in FAMILIES.values():
        if name in fam.configs:
            return fam, copy.deepcopy(fam.configs[name])
    raise VptuneError(f"unknown backbone {name!r}; valid choices: {', '.join(list_backbones())}")


def family_of(arch: str) -> Family:
    if arch not in FAMILIES:
        raise VptuneError(f"unknown backbone architecture {arch!r}; valid choices: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[arch]
