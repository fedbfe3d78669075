"""vfpt (Visual Fourier Prompt Tuning): ratio 0 is VPT-deep exactly, the Fourier prompts against
numpy's FFT, exact trainable counts, ViT and Swin, save/load bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vptune
from tests.test_method_vpt_kv import BACKBONES, C
from vptune.errors import VptuneError

pytestmark = pytest.mark.usefixtures("one_thread")
P = 4


def _pair(arch, **options):
    backbone = BACKBONES[arch]()
    torch.manual_seed(7)
    deep = vptune.create_model(backbone, "vpt-deep", C, num_tokens=P)
    torch.manual_seed(7)
    vfpt = vptune.create_model(backbone, "vfpt", C, num_tokens=P, **options)
    return deep.eval(), vfpt.eval()


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_ratio_zero_is_vpt_deep_exactly(arch):
    deep, vfpt = _pair(arch, fourier_ratio=0.0)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(vfpt(x), deep(x))
    assert vfpt.num_trainable_parameters() == deep.num_trainable_parameters()


@pytest.mark.parametrize("arch", sorted(BACKBONES))
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_fourier_prompts_are_the_real_part_of_the_2d_fft(arch, ratio):
    deep, vfpt = _pair(arch, fourier_ratio=ratio)
    m = round(ratio * P)
    for i in range(vfpt.backbone.num_blocks):
        raw = vfpt.method.prompts[i].detach()
        want = raw.clone()
        want[:m] = torch.from_numpy(np.fft.fft2(raw[:m].double().numpy()).real).float()
        torch.testing.assert_close(vfpt.method.block_prompts(i, 1), want, rtol=0, atol=1e-5)
    # the same parameters and counts as VPT-deep, different logits
    dims = [b.dim for b in vfpt.backbone.block_infos()]
    assert vfpt.num_trainable_parameters() == P * sum(dims) + (vfpt.backbone.num_features + 1) * C
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(vfpt(x), deep(x))


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_trains_and_saves_bit_exact(arch, tmp_path):
    _, model = _pair(arch, fourier_ratio=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.method.prompts)
    model.eval().save_pretrained(tmp_path)
    loaded = vptune.TunedModel.from_pretrained(tmp_path, backbone=model.backbone).eval()
    assert torch.equal(loaded(x), model(x)) and loaded.method.num_fourier == 2


def test_bad_ratio_refused():
    with pytest.raises(VptuneError, match="fourier_ratio"):
        vptune.create_model(BACKBONES["vit"](), "vfpt", C, fourier_ratio=1.5)


def test_mixed_batch_with_vpt_kv_and_gated_matches_each_task_alone(tmp_path):
    """vfpt joins the shared pass (its transformed prompts); vpt-kv and gated run their own pass; every
    sample's logits equal its task run alone (1e-5)."""
    from vptune import MultiTaskModel

    backbone = BACKBONES["vit"]()
    models = {"vfpt": vptune.create_model(backbone, "vfpt", C, num_tokens=P),
              "deep": vptune.create_model(backbone, "vpt-deep", C, num_tokens=2),
              "kv": vptune.create_model(backbone, "vpt-kv", C, kv_tokens=2),
              "gated": vptune.create_model(backbone, "gated", C, num_tokens=P)}
    mt = MultiTaskModel(backbone)
    for name, model in models.items():
        model.eval().save_pretrained(tmp_path / name)
        mt.add_task(name, tmp_path / name)
    assert mt.tasks["vfpt"].shared and not mt.tasks["kv"].shared and not mt.tasks["gated"].shared
    names = ["vfpt", "kv", "deep", "gated", "vfpt", "deep"]
    x = torch.randn(len(names), 3, 32, 32)
    out = mt(x, names)
    for b, name in enumerate(names):
        torch.testing.assert_close(out[b], models[name](x[b:b + 1])[0], atol=1e-5, rtol=1e-5)
