"""Methods, one file each, registered by name: vpt-shallow, vpt-deep, linear, full, partial-k, mlp-k,
sidetune, bias, adapter, vpt-kv, vfpt, gated."""

from vptune.methods import (  # noqa: F401
    adapter,
    bias,
    full,
    gated,
    linear,
    mlp,
    partial,
    sidetune,
    vfpt,
    vpt,
    vpt_kv,
)
from vptune.methods.base import METHODS, Method, build_method, list_methods, set_trainable

__all__ = ["METHODS", "Method", "build_method", "list_methods", "set_trainable"]
