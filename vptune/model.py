"""``TunedModel``: a frozen backbone, a method and a head, with a peft-like API.

    model = vptune.create_model(backbone, "vpt-deep", num_classes=10, num_tokens=10)
    model.print_trainable_parameters()
    model.save_pretrained("tasks/dtd")                      # only the trained tensors
    same = vptune.TunedModel.from_pretrained("tasks/dtd", backbone=backbone)

Frozen parameters have ``requires_grad=False`` and stay in eval mode under ``model.train()`` (the
paper keeps the pretrained blocks frozen, so no dropout or drop-path runs in them). Methods that train
backbone tensors (full, partial-k, bias) get their own copy of the backbone, so one backbone object can
serve many tasks at once.

The forward pass is timm's staged style, ``forward = forward_head(forward_features(x))``, and
:meth:`TunedModel.forward_features` is the one block loop of vptune: methods (and the mixed-batch hooks
of :mod:`vptune.multitask` and :mod:`vptune.export`) supply hooks only (see :mod:`vptune.methods.base`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vptune.backbones.base import Backbone, Tokens
from vptune.errors import VptuneError
from vptune.methods import Method, build_method, set_trainable
from vptune.methods.base import BlockHooks, BlockInput, build_task_head

# The task-file layer (vptune.artifact, above this module: it builds models) registers how a model is
# saved and loaded; ``import vptune`` always imports it, so the registry is filled before any use.
_PERSISTENCE: dict[str, Callable[..., Any]] = {}


def register_persistence(save: Callable[..., Path], load: Callable[..., TunedModel]) -> None:
    _PERSISTENCE.update(save=save, load=load)


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

    def forward_features(self, images: Tensor, hooks: BlockHooks | None = None) -> Any:
        """(B, 3, H, W) -> (B, num_features), the head's input: the paper's Eq. 1-6,

            x_0 = embed(I);  x_i = L_i(x_{i-1}, block i's input);  f = fuse(pool(x_N), I).

        ``hooks`` (default: this model's method) say what block i receives and how the final tokens
        pool; a mixed batch of many tasks brings its own (:class:`vptune.methods.mixed.MixedPrompts`)."""
        hooks = self.method if hooks is None else hooks
        tokens = self.backbone.embed(images)
        for i in range(self.backbone.num_blocks):
            tokens, given = hooks.block_input(i, tokens, images.shape[0])
            tokens = self._run_block(i, tokens, given)
        return hooks.fuse(hooks.pool(self.backbone, tokens), images)

    features = forward_features  # the name before issue 13

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)  # (B, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def _run_block(self, i: int, tokens: Tokens, given: BlockInput) -> Tokens:
        kwargs = {"location": given.location, "ffn_adapter": given.ffn_adapter,
                  "prompt_replace": given.prompt_replace, "prompt_outputs": given.prompt_outputs}
        if given.taps:  # only when some: backbones without taps keep working for every other method
            kwargs["taps"] = given.taps
        for key in ("kv_prompts", "prompt_gate", "attn_temperature"):  # vpt-kv, gated: only when set
            if getattr(given, key) is not None:
                kwargs[key] = getattr(given, key)
        if not self.gradient_checkpointing:
            return self.backbone.run_block(i, tokens, given.prompts, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.backbone.run_block, i, tokens, given.prompts, use_reentrant=False, **kwargs)

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
        (BatchNorm statistics of an MLP head or side network); never a frozen backbone tensor, nor a
        non-persistent buffer (derived from the options, e.g. vpt-kv's pruning masks)."""
        state = {n: p.detach() for n, p in self.trainable_parameters()}
        for prefix, module in (("method.", self.method), ("head.", self.head)):
            persistent = module.state_dict().keys()
            for n, b in module.named_buffers():
                if n in persistent:
                    state[prefix + n] = b.detach()
        return state

    # --- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, training: dict[str, Any] | None = None) -> Path:
        """Write the task folder (:func:`vptune.artifact.save_task`)."""
        return _PERSISTENCE["save"](self, directory, training=training)

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone: Backbone, *,
                        check_backbone: bool = True) -> TunedModel:
        """Rebuild a task folder on ``backbone`` (:func:`vptune.artifact.load_task`)."""
        return _PERSISTENCE["load"](directory, backbone, check_backbone=check_backbone)


def create_model(backbone: Backbone, method: str, num_classes: int, *, label_names: list[str] | None = None,
                 head_norm: str = "none", head_init: str = "small", **options: Any) -> TunedModel:
    """Adapt ``backbone`` to a ``num_classes`` task with a registered method (see ``list_methods()``).

    ``head_norm="batchnorm"`` puts a BatchNorm without affine parameters before the head (MAE's linear
    probe; it makes the head's lr independent of the backbone's feature scale); ``head_init="reference"``
    uses the reference code's head init (kaiming-normal fan-out, bias -4.595) instead of a small one."""

    if int(num_classes) < 1:
        raise VptuneError(f"num_classes must be >= 1, got {num_classes}")
    if label_names is not None and len(label_names) != num_classes:
        raise VptuneError(f"{len(label_names)} label names given for {num_classes} classes")
    return TunedModel(backbone, build_method(method, backbone, **options), num_classes, label_names,
                      head_norm=head_norm, head_init=head_init)


def frozen_model(backbone: Backbone) -> TunedModel:
    """The plain frozen backbone as a model (linear method, one class), for callers that run the block
    loop with their own hooks (mixed batches, ONNX export). Built without drawing from the global RNG."""
    with torch.random.fork_rng(devices=[]):
        return create_model(backbone, "linear", 1)
