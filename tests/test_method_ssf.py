"""SSF (issue 14 item 3): counts, init, ViT and Swin, round trip, re-parameterisation."""

from __future__ import annotations

import pytest
import torch

import vptune
from tests.peft_helpers import C, backbone, check_merge, check_trains_and_round_trips, images
from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.methods.ssf import merge

pytestmark = pytest.mark.usefixtures("one_thread")


def ssf_count(bb) -> int:
    """2 * sum over blocks of (7 d + hidden): gamma and beta after norm1 (d), qkv (3d), proj (d), norm2 (d),
    fc1 (hidden) and fc2 (d); plus the head."""
    total = 0
    for i, info in enumerate(bb.block_infos()):
        hidden = bb.get_submodule(bb.block_prefix(i) + "mlp.fc1").out_features
        total += 2 * (7 * info.dim + hidden)
    return total + (bb.num_features + 1) * C


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_counts_training_and_round_trip(arch, tmp_path):
    bb = backbone(arch)
    model = vptune.create_model(bb, "ssf", C)
    assert model.num_trainable_parameters() == ssf_count(bb)
    check_trains_and_round_trips(model, bb, images(arch), tmp_path)


def test_init_is_the_papers():
    torch.manual_seed(0)
    bb = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=256, depth=2, num_heads=2))
    model = vptune.create_model(bb, "ssf", C)
    gamma = torch.cat([m.gamma for layers in model.method.layers for m in layers.values()])
    beta = torch.cat([m.beta for layers in model.method.layers for m in layers.values()])
    assert abs(gamma.mean().item() - 1.0) < 2e-3 and abs(gamma.std().item() - 0.02) < 1e-3
    assert abs(beta.mean().item()) < 2e-3 and abs(beta.std().item() - 0.02) < 1e-3


def test_tap_scales_and_shifts_each_layer():
    bb = backbone("vit")
    model = vptune.create_model(bb, "ssf", C)
    x = torch.randn(2, 5, 32)
    for name in ("norm1", "attn.proj"):
        layer, ss = bb.get_submodule("blocks.1." + name), model.method.layers[1][name.replace(".", "_")]
        torch.testing.assert_close(ss(layer, x, layer(x)), layer(x) * ss.gamma + ss.beta, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_reparameterisation_gives_identical_logits(arch):
    bb = backbone(arch)
    check_merge(vptune.create_model(bb, "ssf", C), merge, images(arch))


def test_reparameterisation_without_qkv_bias():
    """A qkv without bias gets one (beta) when the shift is folded in."""
    torch.manual_seed(0)
    bb = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                     qkv_bias=False)).eval()
    check_merge(vptune.create_model(bb, "ssf", C), merge, images("vit"))
