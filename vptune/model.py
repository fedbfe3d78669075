"""``TunedModel``: a frozen backbone, a method and a head, with a peft-like API.

    model = vptune.create_model(backbone, "vpt-deep", num_classes=10, num_tokens=10)
    model.print_trainable_parameters()
    model.save_pretrained("tasks/dtd")                      # only the trained tensors
    same = vptune.TunedModel.from_pretrained("tasks/dtd", backbone=backbone)

Frozen parameters have ``requires_grad=False`` and stay in eval mode under ``model.train()`` (the
paper keeps the pretrained blocks frozen, so no dropout or drop-path runs in them). Methods that train
backbone tensors (full, partial-k, bias) get their own copy of the backbone, so one backbone object can
serve many tasks at once.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vptune.backbones.base import Backbone
from vptune.methods import Method, build_method, set_trainable
from vptune.methods.base import build_task_head


class TunedModel(nn.Module):
    def __init__(self, backbone: Backbone, method: Method, num_classes: int,
                 label_names: list[str] | None = None, head_norm: str = "none", head_init: str = "small") -> None:
        super().__init__()
        backbone.fingerprint()  # pin the pretrained identity before any copy trains
        if method.changes_backbone:
            backbone = copy.deepcopy(backbone)
        self.backbone = backbone
        self.method = method
        self.num_classes = int(num_classes)
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_classes)]
        self.head_norm = head_norm
        self.head = build_task_head(method, backbone.num_features, num_classes, head_norm, head_init)
        self.gradient_checkpointing = False
        self.preprocessing = copy.deepcopy(backbone.preprocessing)  # per task: input size may differ
        self.trainable_names = set_trainable(self, method.trainable_patterns(backbone) + [r"^head\."])
        self.train(False)

    @property
    def method_name(self) -> str:
        name = self.method.name
        k = self.method.suffix_option
        return f"{name}-{getattr(self.method.options, k)}" if k else name

    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_features), the head's input."""
        return self.method.features(self.backbone, images, self.gradient_checkpointing)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, num_classes)

    def train(self, mode: bool = True) -> TunedModel:
        """Train mode for modules that hold trained parameters; every frozen module stays in eval."""
        super().train(mode)
        if mode:
            for module in self.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self

    # --- parameter accounting (peft-like) ---------------------------------------------------------
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_backbone_parameters(self) -> int:
        return sum(p.numel() for p in self.backbone.parameters())

    def print_trainable_parameters(self) -> None:
        t, b = self.num_trainable_parameters(), self.num_backbone_parameters()
        print(f"trainable params: {t:,} || backbone params: {b:,} || trainable%: {100 * t / b:.4f}")

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trained_state_dict(self) -> dict[str, Tensor]:
        """What a task file stores: trained parameters plus the buffers of the method and head
        (BatchNorm statistics of an MLP head or side network); never a frozen backbone tensor."""
        state = {n: p.detach() for n, p in self.trainable_parameters()}
        for prefix, module in (("method.", self.method), ("head.", self.head)):
            for n, b in module.named_buffers():
                state[prefix + n] = b.detach()
        return state

    # --- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, training: dict[str, Any] | None = None) -> Path:
        from vptune.artifact import save_task

        return save_task(self, directory, training=training)

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: Backbone, *,
                        check_backbone: bool = True) -> TunedModel:
        from vptune.artifact import load_task

        return load_task(directory, backbone, check_backbone=check_backbone)


def create_model(backbone: Backbone, method: str, num_classes: int, *, label_names: list[str] | None = None,
                 head_norm: str = "none", head_init: str = "small", **options: Any) -> TunedModel:
    """Adapt ``backbone`` to a ``num_classes`` task with a registered method (see ``list_methods()``).

    ``head_norm="batchnorm"`` puts a BatchNorm without affine parameters before the head (MAE's linear
    probe; it makes the head's lr independent of the backbone's feature scale); ``head_init="reference"``
    uses the reference code's head init (kaiming-normal fan-out, bias -4.595) instead of a small one."""
    from vptune.errors import VptuneError

    if int(num_classes) < 1:
        raise VptuneError(f"num_classes must be >= 1, got {num_classes}")
    if label_names is not None and len(label_names) != num_classes:
        raise VptuneError(f"{len(label_names)} label names given for {num_classes} classes")
    return TunedModel(backbone, build_method(method, backbone, **options), num_classes, label_names,
                      head_norm=head_norm, head_init=head_init)
