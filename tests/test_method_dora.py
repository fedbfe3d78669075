"""DoRA (issue 14 item 2): counts, untrained identity, the formula, ViT and Swin, round trip, merge."""

from __future__ import annotations

import pytest
import torch

import vptune
from tests.peft_helpers import C, backbone, block_layers, check_merge, check_trains_and_round_trips, images
from vptune.methods.dora import merge

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_counts_training_and_round_trip(arch, tmp_path):
    bb = backbone(arch)
    model = vptune.create_model(bb, "dora", C, r=2)
    layers = block_layers(bb, ["attn.qkv", "attn.proj"])
    want = (bb.num_features + 1) * C + sum(2 * (m.in_features + m.out_features) + m.out_features
                                           for _, _, m in layers)
    assert model.num_trainable_parameters() == want
    check_trains_and_round_trips(model, bb, images(arch), tmp_path)


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_untrained_equals_the_backbone(arch):
    bb = backbone(arch)
    model = vptune.create_model(bb, "dora", C, targets=[r"^attn\.", r"^mlp\."])
    for i, n, m in block_layers(bb, ["attn.qkv", "mlp.fc1"]):
        torch.testing.assert_close(model.method.layers[i][n.replace(".", "_")].magnitude, m.weight.norm(dim=1))
    x = images(arch)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(bb(x)), rtol=0, atol=1e-6)


def test_tap_equals_the_formula():
    """m * (W + s B A) / ||W + s B A||_c applied to x, plus the bias, computed by hand."""
    bb = backbone("vit")
    model = vptune.create_model(bb, "dora", C, r=2, alpha=4)
    lin = bb.blocks[0].attn.qkv
    lo = model.method.layers[0]["attn_qkv"]
    with torch.no_grad():
        lo.lora_B.normal_()
        lo.magnitude.mul_(1.5)
        x = torch.randn(2, 5, lin.in_features)
        v = lin.weight + 2.0 * lo.lora_B @ lo.lora_A
        w = lo.magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
        torch.testing.assert_close(lo(lin, x, lin(x)), x @ w.T + lin.bias, rtol=1e-5, atol=1e-6)


def test_norm_is_detached():
    """The paper's Sec. 4.3: ||W + dW||_c is a constant in the backward pass; gradients reach A, B and m."""
    bb = backbone("vit")
    model = vptune.create_model(bb, "dora", C)
    lo = model.method.layers[0]["attn_qkv"]
    with torch.no_grad():
        lo.lora_B.normal_()
    scale = lo.dora_scale(bb.blocks[0].attn.qkv)  # m / ||W + s B A||_c
    g_a, g_m = torch.autograd.grad(scale.sum(), [lo.lora_A, lo.magnitude], allow_unused=True)
    assert g_a is None and g_m is not None  # no path from the norm back to A
    model.train()
    model(images("vit")).sum().backward()
    assert lo.magnitude.grad is not None and lo.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_merge_equals_unmerged(arch):
    bb = backbone(arch)
    check_merge(vptune.create_model(bb, "dora", C, r=4), merge, images(arch))
