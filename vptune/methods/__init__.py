"""Methods, one file each, registered by name: vpt-shallow, vpt-deep, linear, full, partial-k, mlp-k,
sidetune, bias, adapter, lora, dora, ssf."""

from vptune.methods import adapter, bias, dora, full, linear, lora, mlp, partial, sidetune, ssf, vpt  # noqa: F401
from vptune.methods.base import METHODS, Method, build_method, list_methods, set_trainable

__all__ = ["METHODS", "Method", "build_method", "list_methods", "set_trainable"]
