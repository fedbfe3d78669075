"""The sweep's backend registry: names -> factories, resolved lazily (so the spec layer can check a
backend name without importing any execution code).

A factory ``factory(env, log, **options)`` returns an object with ``run(jobs)`` that returns once every job
has executed (in any order: jobs passed together never depend on each other). Jobs are plain picklable
data; a fan-out backend ("ray": :mod:`vptune.engine.ray_backend`) ships them to workers that each build an
``Env()`` and call ``env.execute(job)``. A backend module named ``vptune.engine.sweep_<name>`` that calls
:func:`register_backend` on import is found by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from vptune.errors import VptuneError, check_choice

# name -> a factory, or "module:attribute" of one (imported on first use)
BACKENDS: dict[str, Callable[..., Any] | str] = {
    "local": "vptune.engine.sweep_exec:LocalBackend",
    "ray": "vptune.engine.ray_backend:make_backend",  # Ray itself is imported only when a sweep uses it
}


def register_backend(name: str, factory: Callable[..., Any]) -> None:
    """Make a backend available to sweeps as ``backend: <name>``."""
    BACKENDS[name] = factory


def check_backend(name: str) -> None:
    """Refuse an unknown backend name (importing ``vptune.engine.sweep_<name>`` when needed)."""
    if name not in BACKENDS and name.isidentifier():
        try:
            importlib.import_module(f"vptune.engine.sweep_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"vptune.engine.sweep_{name}":
                raise VptuneError(f"backend {name!r} needs {e.name!r}, which is not installed") from None
    check_choice("sweep backend", name, sorted(BACKENDS))


def backend_factory(name: str) -> Callable[..., Any]:
    """The registered backend ``name``'s factory."""
    check_backend(name)
    factory = BACKENDS[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = BACKENDS[name] = getattr(importlib.import_module(module), attr)
    return factory
