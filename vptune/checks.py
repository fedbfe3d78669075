"""Type checks of free-form settings against the dataclass that will receive them.

``method.options`` and ``backbone.config`` are free-form mappings in a config (the method and the backbone
own their keys), and so are the ``options`` of a ``task.json``. Handing them to a dataclass unchecked turns
``num_tokens="abc"`` into a ``TypeError`` deep inside a forward pass; :func:`coerce_fields` converts each
value to its field's annotated type (``"8"`` -> 8, ``"1e-3"`` -> 0.001) or raises one
:class:`~vptune.errors.VptuneError` naming the key, the expected type and the value.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from vptune.errors import VptuneError

_SCALARS = (bool, int, float, str)


def coerce_fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with every key that is a field of dataclass ``cls`` converted to the field's type.

    Unknown keys are left alone (the receiver refuses them with its own list of valid keys); fields whose
    annotation is not a plain scalar, an optional scalar or a tuple of scalars are passed through."""
    if not isinstance(values, dict):
        raise VptuneError(f"{where} must be a mapping, got {values!r}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 -- unresolvable annotations: nothing to check against
        return dict(values)
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: _coerce(v, hints[k], f"{where}.{k}") if k in names and k in hints else v
            for k, v in values.items()}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        items = args[:-1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise VptuneError(f"{key} must have {len(items)} values, got {list(value)!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if tp in _SCALARS:
        return scalar(value, tp, key)
    return value


def scalar(value: Any, tp: type, key: str) -> Any:
    """``value`` as a ``bool``, ``int`` (whole numbers only), finite ``float`` or ``str``, else VptuneError."""
    bad = VptuneError(f"{key} must be {tp.__name__}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        number = float(value) if tp is float else _whole(value)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if tp is float and not math.isfinite(number):
        raise VptuneError(f"{key} must be a finite number, got {value!r}")
    if tp is int and not -(2**63) <= number < 2**63:  # what a tensor shape or index can hold
        raise VptuneError(f"{key} must be an integer in the int64 range, got {value!r}")
    return number


def _whole(value: Any) -> int:
    if isinstance(value, int):
        return value
    f = float(value)
    if not f.is_integer():
        raise ValueError(value)
    return int(f)
