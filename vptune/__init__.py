"""vptune: Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv 2203.12119) for frozen vision backbones.

``import vptune`` loads the core (backbones, methods, model, task files); the serving layer
(:class:`MultiTaskModel`, ONNX export, the HTTP server) loads on first use.
"""

from typing import Any

from vptune import artifact as _artifact  # noqa: F401  (registers TunedModel.save_pretrained / from_pretrained)
from vptune.backbones import create_backbone, list_backbones
from vptune.errors import VptuneError
from vptune.methods import list_methods
from vptune.model import TunedModel, create_model
from vptune.version import __version__


def __getattr__(name: str) -> Any:
    if name == "MultiTaskModel":  # lazily: the serving layer is not part of the core import
        from vptune.multitask import MultiTaskModel

        return MultiTaskModel
    raise AttributeError(f"module 'vptune' has no attribute {name!r}")


__all__ = ["MultiTaskModel", "TunedModel", "VptuneError", "__version__", "create_backbone", "create_model",
           "list_backbones", "list_methods"]
