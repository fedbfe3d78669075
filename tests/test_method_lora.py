"""LoRA (issue 14 item 1): trainable counts from the formula, targets, ViT and Swin, round trip, merge."""

from __future__ import annotations

import math

import pytest
import torch

import vptune
from tests.peft_helpers import C, backbone, block_layers, check_merge, check_trains_and_round_trips, images
from vptune.errors import VptuneError
from vptune.methods.lora import merge

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_count(bb, names, r: int) -> int:
    """sum over blocks and targets of r * (in + out), plus the head."""
    head = (bb.num_features + 1) * C
    return head + sum(r * (m.in_features + m.out_features) for _, _, m in block_layers(bb, names))


@pytest.mark.parametrize("arch", ["vit", "swin"])
@pytest.mark.parametrize("targets,names", [
    (None, ["attn.qkv", "attn.proj"]),
    ([r"^attn\.", r"^mlp\."], ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]),
    ([r"^mlp\.fc2$"], ["mlp.fc2"]),
])
def test_counts_training_and_round_trip(arch, targets, names, tmp_path):
    bb = backbone(arch)
    opts = {"r": 3} if targets is None else {"r": 3, "targets": targets}
    model = vptune.create_model(bb, "lora", C, **opts)
    assert model.num_trainable_parameters() == lora_count(bb, names, 3)
    assert not model.method.changes_backbone
    check_trains_and_round_trips(model, bb, images(arch), tmp_path)


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_untrained_is_the_backbone_and_init(arch):
    bb = backbone(arch)
    model = vptune.create_model(bb, "lora", C, r=4, alpha=16)
    x = images(arch)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(bb(x)), rtol=0, atol=0)
    layer = model.method.layers[0]["attn_qkv"]
    assert layer.scaling == 4.0 and torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(layer.lora_A.shape[1])  # kaiming_uniform(a=sqrt(5)) bound: 1/sqrt(fan_in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound


def test_tap_equals_the_formula():
    """A trained LoRA layer's output is W x + b + (alpha / r) B A x, computed here by hand."""
    bb = backbone("vit")
    model = vptune.create_model(bb, "lora", C, r=2, alpha=6)
    with torch.no_grad():
        model.method.layers[1]["attn_proj"].lora_B.normal_()
        lin = bb.blocks[1].attn.proj
        lo = model.method.layers[1]["attn_proj"]
        x = torch.randn(2, 5, lin.in_features)
        want = x @ (lin.weight + 3.0 * lo.lora_B @ lo.lora_A).T + lin.bias
        torch.testing.assert_close(lo(lin, x, lin(x)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_merge_equals_unmerged(arch):
    bb = backbone(arch)
    check_merge(vptune.create_model(bb, "lora", C, r=4, targets=[r"^attn\.", r"^mlp\."]), merge, images(arch))


def test_dropout_acts_in_training_only():
    bb = backbone("vit")
    model = vptune.create_model(bb, "lora", C, dropout=0.5)
    with torch.no_grad():
        for layers in model.method.layers:
            for lo in layers.values():
                lo.lora_B.normal_()
    x = images("vit")
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("opts,msg", [
    ({"targets": ["attn.qkv"]}, "anchored"),
    ({"targets": [r"^attn\.nope"]}, "valid layers: attn.qkv, attn.proj, mlp.fc1, mlp.fc2"),
    ({"targets": []}, "at least one"),
    ({"r": 0}, "r must be"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_options_one_clear_error(opts, msg):
    with pytest.raises(VptuneError, match=msg):
        vptune.create_model(backbone("vit"), "lora", C, **opts)


def test_merge_refuses_other_methods():
    model = vptune.create_model(backbone("vit"), "vpt-deep", C)
    with pytest.raises(VptuneError, match="mergeable methods: lora, dora, ssf"):
        merge(model)
