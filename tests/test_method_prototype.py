"""init="prototype" (Self-Prompt Tuning, k-means variant): k-means against known clusters, the tokens
each block sees, prompts set from them for vpt-shallow/deep/vfpt/gated on ViT and Swin, no global RNG
drawn, the trainer's hook, refusals."""

from __future__ import annotations

import pytest
import torch

import vptune
from tests.test_engine import splits, tiny_backbone, tiny_cfg
from tests.test_method_vpt_kv import BACKBONES, C
from vptune.engine.trainer import build_trainer
from vptune.errors import VptuneError
from vptune.methods.prototype import block_tokens, kmeans, sample_images

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centres[:, None] + 0.1 * torch.randn(3, 50, 2, generator=g)).reshape(-1, 2)
    found = kmeans(x, 3)
    means = x.view(3, 50, 2).mean(1)
    order = torch.cdist(means, found).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(found[order], means, rtol=0, atol=1e-5)


def test_block_tokens_are_what_each_block_receives():
    vit = BACKBONES["vit"]()
    images = torch.randn(2, 3, 32, 32)
    got = block_tokens(vit, images, [0, 1], max_tokens=10_000)
    want0 = vit.embed(images).x[:, 1:].reshape(-1, 32)  # patches, [CLS] left out
    gap = (got[0][:, None] - want0[None]).abs().amax(-1).min(1).values  # each kept token is a patch token
    assert got[0].shape == want0.shape and gap.max() == 0
    swin = BACKBONES["swin"]()
    t = block_tokens(swin, images, [0, 2], max_tokens=40)
    assert t[0].shape == (40, 16) and t[2].shape == (32, 32)  # block 2: stage 1, after patch merging (16/img)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep", "vfpt", "gated"])
def test_prompts_start_at_the_prototypes_of_each_block(arch, method):
    backbone = BACKBONES[arch]()
    model = vptune.create_model(backbone, method, C, num_tokens=3, init="prototype")
    assert model.method.needs_data_init
    images = torch.randn(4, 3, 32, 32)
    rng = torch.get_rng_state()
    model.method.init_from_data(model.backbone, images)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    tokens = block_tokens(backbone, images, model.method.blocks)
    for j, i in enumerate(model.method.blocks):
        assert torch.equal(model.method.prompts[j].detach(), kmeans(tokens[i], 3))
    assert len(model.method.blocks) == (1 if method in ("vpt-shallow", "gated") else backbone.num_blocks)


def test_trainer_hook_initialises_prompts_before_training(tmp_path):
    cfg = tiny_cfg(tmp_path, method={"options": {"num_tokens": 2, "init": "prototype"}})
    data = splits(32)
    trainer = build_trainer(cfg, torch.device("cpu"), datasets=data, backbone=tiny_backbone())
    method = trainer.model.method
    tokens = block_tokens(trainer.model.backbone, sample_images(data["train"]), method.blocks)
    for j, i in enumerate(method.blocks):
        assert torch.equal(method.prompts[j].detach(), kmeans(tokens[i], 2))
    plain = build_trainer(tiny_cfg(tmp_path / "b"), torch.device("cpu"), datasets=data, backbone=tiny_backbone())
    assert not torch.equal(plain.model.method.prompts[0], method.prompts[0])


def test_prototype_refusals():
    with pytest.raises(VptuneError, match="prototype"):
        vptune.create_model(BACKBONES["vit"](), "vpt-deep", C, init="prototype", project_dim=8)
    with pytest.raises(VptuneError, match="at least 5 tokens"):
        kmeans(torch.randn(4, 2), 5)
