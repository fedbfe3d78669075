"""Methods, one file each, registered by name: vpt-shallow, vpt-deep, linear, full, partial-k, mlp-k,
sidetune, bias, adapter, lora, dora, ssf, vpt-kv, vfpt, gated."""

from vptune.methods import (  # noqa: F401
    adapter,
    bias,
    dora,
    full,
    gated,
    linear,
    lora,
    mlp,
    partial,
    sidetune,
    ssf,
    vfpt,
    vpt,
    vpt_kv,
)
from vptune.methods.base import METHODS, Method, build_method, list_methods, set_trainable

__all__ = ["METHODS", "Method", "build_method", "list_methods", "set_trainable"]
