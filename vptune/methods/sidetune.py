"""Side-tuning (Zhang et al. 2020), the paper's 'Sidetune': a small side CNN learns beside the frozen
backbone and the two feature vectors are blended through a learned gate,

    f = sigmoid(alpha) * backbone(x) + (1 - sigmoid(alpha)) * side(x),   alpha starts at 0.

The reference code uses an ImageNet AlexNet as the side network; no such weights can be shipped here, so
the side network is a small CNN trained from scratch (four stride-2 conv-BN-ReLU stages, global average
pooling and a linear map to the backbone's width).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from vptune.backbones.base import Backbone
from vptune.errors import VptuneError
from vptune.methods.base import Method, register


@dataclass
class SidetuneOptions:
    width: int = 32  # channels of the side CNN's first stage (doubling each stage)

    def validate(self) -> None:
        if self.width < 1:
            raise VptuneError(f"sidetune width must be >= 1, got {self.width}")


def side_cnn(width: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for s in range(4):
        c_out = width * 2**s
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, out_dim)]
    return nn.Sequential(*layers)


@register
class Sidetune(Method):
    name = "sidetune"
    options_cls = SidetuneOptions
    optimizer = "sgd"
    paper_optimizer = "sgd"
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {"side": (r"^method\.",)}

    def __init__(self, backbone: Backbone, options: SidetuneOptions) -> None:
        super().__init__(backbone, options)
        self.side = side_cnn(options.width, backbone.num_features)
        self.alpha = nn.Parameter(torch.zeros(()))

    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return [r"^method\.side\.", r"^method\.alpha$"]

    def fuse(self, features: Tensor, images: Tensor) -> Tensor:
        frozen = features  # (B, d)
        gate = torch.sigmoid(self.alpha)
        return gate * frozen + (1 - gate) * self.side(images)  # (B, d)
