"""vptune: Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv 2203.12119) for frozen vision backbones."""

__version__ = "0.1.0"

from vptune.errors import VptuneError  # noqa: E402
from vptune.backbones import list_backbones  # noqa: E402
from vptune.methods import list_methods  # noqa: E402
from vptune.model import TunedModel, create_model  # noqa: E402


def create_backbone(*args, **kwargs):  # noqa: ANN002, ANN003
    """See :func:`vptune.backbones.create_backbone`."""
    from vptune.backbones import create_backbone as _create

    return _create(*args, **kwargs)


__all__ = ["TunedModel", "VptuneError", "__version__", "create_backbone", "create_model", "list_backbones",
           "list_methods"]

from vptune.multitask import MultiTaskModel  # noqa: E402,F401
