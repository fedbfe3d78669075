"""vpt-kv (E2VPT's key-value prompts): exact trainable counts, the key/value concatenation against an
oracle (a prompt token whose outputs are ignored contributes exactly its projected key and value), ViT
and Swin, per-sample key/values, prototype init, save/load bit-exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vptune
from vptune.backbones.swin import SwinConfig, SwinTransformer
from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.errors import VptuneError
from vptune.methods.prototype import block_tokens, kmeans

pytestmark = pytest.mark.usefixtures("one_thread")
C = 3


def vit():
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)).eval()


def swin():
    torch.manual_seed(0)
    return SwinTransformer(SwinConfig(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                      window_size=4)).eval()


BACKBONES = {"vit": vit, "swin": swin}


def _kv_of(backbone, i, prompts):
    """The keys and values block i's frozen norm1 and qkv give ``prompts`` (..., p, d): the oracle."""
    prefix = backbone.block_prefix(i)
    norm, qkv = backbone.get_submodule(prefix + "norm1"), backbone.get_submodule(prefix + "attn.qkv")
    d = prompts.shape[-1]
    out = F.linear(norm(prompts), qkv.weight[d:], qkv.bias[d:])
    return out[..., :d], out[..., d:]


@pytest.mark.parametrize("arch", sorted(BACKBONES))
@pytest.mark.parametrize(("L", "p"), [(5, 0), (2, 3)])
def test_trainable_count_is_the_formula(arch, L, p):
    backbone = BACKBONES[arch]()
    model = vptune.create_model(backbone, "vpt-kv", C, kv_tokens=L, num_tokens=p)
    dims = [b.dim for b in backbone.block_infos()]
    assert model.num_trainable_parameters() == sum(2 * L * d + p * d for d in dims) + (backbone.num_features + 1) * C
    assert all(n.startswith(("method.kv_prompts.", "method.prompts.", "head.")) for n in model.trainable_names)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
@pytest.mark.parametrize("per_sample", [False, True])
def test_key_values_equal_an_ignored_prompt_token(arch, per_sample):
    """Image ([CLS] and patch) outputs of a block with learned keys/values (K, V) equal those with
    prompt tokens P whose keys/values are (K, V): every window (Swin, shifted too), no bias, no outputs."""
    backbone = BACKBONES[arch]()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    for i in range(backbone.num_blocks):  # Swin: block 1 is a shifted-window block, block 2 starts stage 1
        tokens = backbone.embed(x)
        for j in range(i):
            tokens = backbone.run_block(j, tokens)
        d = backbone.block_infos()[i].dim
        P = torch.randn(2, 3, d) if per_sample else torch.randn(3, d)
        k, v = _kv_of(backbone, i, P)
        with_kv = backbone.run_block(i, tokens, kv_prompts=(k, v))
        with_prompts = backbone.run_block(i, tokens, P)
        assert with_kv.num_prompts == 0 and with_kv.prompts is None  # no prompt tokens, no outputs
        assert with_kv.x.shape[1] == with_prompts.x.shape[1] - (0 if arch == "swin" else 3)
        image = with_prompts.x if arch == "swin" else torch.cat([with_prompts.x[:, :1], with_prompts.x[:, 4:]], 1)
        torch.testing.assert_close(with_kv.x, image, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_key_values_reach_the_logits_and_train(arch):
    backbone = BACKBONES[arch]()
    model = vptune.create_model(backbone, "vpt-kv", C, kv_tokens=2)
    x = torch.randn(2, 3, 32, 32)
    plain = vptune.create_model(backbone, "linear", C)
    plain.head.load_state_dict(model.head.state_dict())
    assert not torch.allclose(model(x), plain(x))  # the key-value prompts reach the logits
    model.train()
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.method.kv_prompts)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_save_load_bit_exact(arch, tmp_path):
    backbone = BACKBONES[arch]()
    model = vptune.create_model(backbone, "vpt-kv", C, kv_tokens=2, num_tokens=2).eval()
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = vptune.TunedModel.from_pretrained(tmp_path, backbone=backbone).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert set(loaded.trained_state_dict()) == set(model.trained_state_dict())


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_prototype_init_sets_key_values_from_the_data(arch):
    backbone = BACKBONES[arch]()
    model = vptune.create_model(backbone, "vpt-kv", C, kv_tokens=3, num_tokens=2, init="prototype")
    images = torch.randn(4, 3, 32, 32)
    model.method.init_from_data(model.backbone, images)
    tokens = block_tokens(backbone, images, range(backbone.num_blocks))
    for i in range(backbone.num_blocks):
        k, v = _kv_of(backbone, i, kmeans(tokens[i], 3))
        torch.testing.assert_close(model.method.kv_prompts[i][0], k, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.method.kv_prompts[i][1], v, rtol=0, atol=1e-6)
        assert torch.equal(model.method.prompts[i], kmeans(tokens[i], 2))


def test_bad_options_and_no_shared_pass():
    with pytest.raises(VptuneError, match="kv_tokens"):
        vptune.create_model(vit(), "vpt-kv", C, kv_tokens=0)
    assert vptune.create_model(vit(), "vpt-kv", C).method.shared_pass(2) is None
