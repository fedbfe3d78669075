"""vptune: Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv 2203.12119) for frozen vision backbones."""

__version__ = "0.1.0"

from vptune.backbones import list_backbones
from vptune.errors import VptuneError
from vptune.methods import list_methods
from vptune.model import TunedModel, create_model


def create_backbone(*args, **kwargs):
    """See :func:`vptune.backbones.create_backbone`."""
    from vptune.backbones import create_backbone as _create

    return _create(*args, **kwargs)


__all__ = ["TunedModel", "VptuneError", "__version__", "create_backbone", "create_model", "list_backbones",
           "list_methods"]

from vptune.multitask import MultiTaskModel  # noqa: F401
