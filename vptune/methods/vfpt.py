"""Visual Fourier Prompt Tuning (Zeng et al., NeurIPS 2024), written from the paper.

VPT-deep whose prompts of every block are split in two: a fraction ``fourier_ratio`` of them (the
first m_i = round(ratio * p) of block i's p prompts) are "Fourier prompts", passed through a 2-D fast
Fourier transform over the token (sequence) and hidden dimensions before insertion, of which only the
real part is kept; the rest stay spatial prompts:

    P_i' = [ Re(FFT_2D(P_i[:m_i])) ; P_i[m_i:] ]      (FFT over both axes of the (m_i, d) block)

Only the prompt parameters change the computation (the transform is fixed), so the trainable count is
VPT-deep's, N * p * d. ``fourier_ratio=0`` is VPT-deep exactly (same parameters, same RNG draws, the same
tensors reach the backbone). Everything else (dropout, deep_layers, pool, prototype init) is VPT's. The
transform runs on the prompt values each forward, so a mixed batch and the ONNX graph see the
transformed prompts (``shared_pass``). The paper trains with SGD on VPT's recipe (``paper_optimizer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vptune.backbones.base import Backbone
from vptune.errors import VptuneError
from vptune.methods.base import register
from vptune.methods.vpt import VPTDeep, VPTOptions


@dataclass
class VFPTOptions(VPTOptions):
    """fourier_ratio: the fraction of each block's prompts that are Fourier prompts, in [0, 1]."""

    fourier_ratio: float = 0.5

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.fourier_ratio <= 1.0:
            raise VptuneError(f"fourier_ratio must be in [0, 1], got {self.fourier_ratio}")


def fourier_prompts(prompts: Tensor) -> Tensor:
    """(m, d) -> (m, d): the real part of the 2-D FFT over the token and hidden dimensions."""
    return torch.fft.fft2(prompts.float(), dim=(-2, -1)).real.to(prompts.dtype)


@register
class VFPT(VPTDeep):
    """VPT-deep with a fraction of each block's prompts in the frequency domain (Fourier prompts)."""

    name = "vfpt"
    options_cls = VFPTOptions
    sweep_axes = ("num_tokens", "fourier_ratio")

    def __init__(self, backbone: Backbone, options: VFPTOptions) -> None:
        super().__init__(backbone, options)
        self.num_fourier = round(options.fourier_ratio * options.num_tokens) if options.location == "prepend" \
            else round(options.fourier_ratio * backbone.num_patches())

    def transform_prompts(self, i: int, prompts: Tensor) -> Tensor:
        m = self.num_fourier
        if m == 0:
            return prompts  # VPT-deep exactly
        return torch.cat([fourier_prompts(prompts[:m]), prompts[m:]], dim=0)
