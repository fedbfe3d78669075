"""Prompt initialisation from the data (Self-Prompt Tuning, Wang et al., "Revisiting the Power of Prompt
for Visual Tuning", ICML 2024): ``init="prototype"``.

SPT starts the prompts of block i at *prototypes* of the downstream tokens block i sees, because prompts
that share information with the patch tokens train better than random ones. The paper builds the
prototypes by k-means over the tokens and also studies cheaper samplings (random tokens, mean or max
pooling). vptune implements the **k-means variant**: on a sample of training images (``PROTOTYPE_IMAGES``,
drawn with a fixed seed) the frozen plain backbone runs once; the image tokens entering each prompted
block (the [CLS]/prefix tokens left out) are subsampled to at most ``MAX_TOKENS`` and clustered into p
centres by Lloyd's k-means (``KMEANS_ITERS`` iterations from a k-means++ initialisation with a fixed
seed; an empty cluster keeps its centre). Nothing here draws from the global RNG, so a model's
other initialisation (head, other parameters) is the same as with ``init="uniform"``.

:func:`init_from_dataset` is the trainer's hook: it runs once before training when the method asks for
it (``method.needs_data_init``), calling ``method.init_from_data(backbone, images)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vptune.backbones.base import Backbone
from vptune.errors import VptuneError

PROTOTYPE_IMAGES = 64  # training images the prototypes are computed from
MAX_TOKENS = 8192  # tokens per block fed to k-means (a seeded subsample)
KMEANS_ITERS = 20
SEED = 0
CHUNK = 16  # images per forward pass


def _block_module(backbone: Backbone, i: int) -> nn.Module:
    return backbone.get_submodule(backbone.block_prefix(i).rstrip("."))


@torch.no_grad()
def block_tokens(backbone: Backbone, images: Tensor, blocks: Sequence[int],
                 max_tokens: int = MAX_TOKENS) -> dict[int, Tensor]:
    """{i: (n, d_i)} the image tokens entering block i on a plain frozen pass over ``images``, at most
    ``max_tokens`` per block (a seeded subsample, the same count from every image)."""
    if images.shape[0] == 0:
        raise VptuneError("init='prototype' needs at least one training image")
    per_image = max(1, -(-max_tokens // images.shape[0]))
    gen = torch.Generator().manual_seed(SEED)
    skip = backbone.num_prefix_tokens  # ViT: [CLS] first; a Swin block receives image tokens only
    seen: dict[int, list[Tensor]] = {i: [] for i in blocks}

    def hook(i: int) -> Any:
        def keep(_module: nn.Module, args: tuple) -> None:
            x = args[0][:, skip:]  # (B, N, d_i)
            idx = torch.rand(x.shape[:2], generator=gen).argsort(dim=1)[:, :per_image].to(x.device)
            seen[i].append(x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])).flatten(0, 1).float().cpu())
        return keep

    handles = [_block_module(backbone, i).register_forward_pre_hook(hook(i)) for i in blocks]
    was_training = backbone.training
    try:
        backbone.eval()
        for chunk in images.split(CHUNK):
            backbone.forward_features(chunk)
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    return {i: torch.cat(seen[i])[:max_tokens] for i in blocks}


def kmeans_plus_plus(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k initial centres by k-means++ (Arthur and Vassilvitskii, 2007): each next centre drawn with
    probability proportional to its squared distance from the nearest centre so far."""
    centres = [x[int(torch.randint(x.shape[0], (1,), generator=gen))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        j = int(torch.multinomial(d2 + 1e-12, 1, generator=gen)) if d2.sum() > 0 else len(centres)
        centres.append(x[j])
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    return torch.stack(centres)


def kmeans(x: Tensor, k: int, iters: int = KMEANS_ITERS, seed: int = SEED) -> Tensor:
    """(n, d) points -> (k, d) Lloyd k-means centres, k-means++ initialisation with a fixed seed."""
    n = x.shape[0]
    if n < k:
        raise VptuneError(f"init='prototype' needs at least {k} tokens per block, the sample gave {n}")
    x = x.float()
    centres = kmeans_plus_plus(x, k, torch.Generator().manual_seed(seed))
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(dim=1)  # (n,)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1.0), centres)
    return centres


def sample_images(dataset: Any, count: int = PROTOTYPE_IMAGES, seed: int = SEED) -> Tensor:
    """(min(count, len), 3, H, W) images drawn from a (image, label) dataset with a fixed seed."""
    n = len(dataset)
    if n == 0:
        raise VptuneError("init='prototype' needs training images, the training set is empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([dataset[int(j)][0] for j in order])


def init_from_dataset(model: Any, dataset: Any, device: torch.device, count: int = PROTOTYPE_IMAGES) -> None:
    """The trainer's hook: when ``model.method.needs_data_init`` (``init="prototype"``), set its prompts
    from ``count`` training images with the frozen backbone on ``device`` (once, before training)."""
    method = model.method
    if not getattr(method, "needs_data_init", False):
        return
    model.to(device)
    method.init_from_data(model.backbone, sample_images(dataset, count).to(device))
