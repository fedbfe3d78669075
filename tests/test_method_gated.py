"""gated (Yoo et al., ICML 2023): the per-block prompt gate P' = g f(P) + (1 - g) P against an oracle,
the attention temperature against a model whose query projection is divided by tau, g = 1 is VPT-shallow
exactly, g = 0 carries the prompts through untouched, exact counts, ViT and Swin, save/load bit-exact."""

from __future__ import annotations

import copy

import pytest
import torch

import vptune
from tests.test_method_vpt_kv import BACKBONES, C
from vptune.errors import VptuneError

pytestmark = pytest.mark.usefixtures("one_thread")
P = 3


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_trainable_count_is_the_formula(arch):
    backbone = BACKBONES[arch]()
    model = vptune.create_model(backbone, "gated", C, num_tokens=P)
    infos = backbone.block_infos()
    head = (backbone.num_features + 1) * C
    assert model.num_trainable_parameters() == P * infos[0].dim + 2 * len(infos) + head
    assert torch.equal(model.method.gates(), torch.sigmoid(torch.full((len(infos),), -5.0)))  # nearly closed
    assert torch.equal(model.method.temperatures.detach(), torch.ones(len(infos)))
    plain = vptune.create_model(backbone, "gated", C, num_tokens=P, attention_shaping=False)
    assert plain.num_trainable_parameters() == P * infos[0].dim + len(infos) + head
    assert "method.temperatures" not in dict(plain.named_parameters())


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_attention_temperature_equals_dividing_the_query_projection(arch):
    """softmax(q k^T / (sqrt(d_h) tau) [+ bias / tau]): the same as a backbone whose q rows of qkv (and,
    on Swin, relative-position bias table) are divided by tau."""
    torch.manual_seed(0)
    backbone = BACKBONES[arch]().eval()
    tau = torch.tensor(0.37)
    scaled = copy.deepcopy(backbone)
    with torch.no_grad():
        for name, module in scaled.named_modules():
            if name.endswith("attn"):
                d = module.qkv.weight.shape[1]
                module.qkv.weight[:d] /= tau
                module.qkv.bias[:d] /= tau
                if hasattr(module, "relative_position_bias_table"):
                    module.relative_position_bias_table /= tau
    tokens = backbone.embed(torch.randn(2, 3, 32, 32))
    prompts = torch.randn(P, backbone.block_infos()[0].dim)
    got = backbone.run_block(0, tokens, prompts, attn_temperature=tau)
    want = scaled.run_block(0, tokens, prompts)
    torch.testing.assert_close(got.x, want.x, rtol=1e-5, atol=1e-5)
    moved = (got.x - backbone.run_block(0, tokens, prompts).x).abs().max()
    assert moved > 100 * (got.x - want.x).abs().max() and moved > 1e-4  # tau matters


def test_temperatures_learn_and_stay_in_range():
    backbone = BACKBONES["vit"]()
    model = vptune.create_model(backbone, "gated", C, num_tokens=P)
    with torch.no_grad():
        model.method.temperatures.copy_(torch.tensor([50.0, -1.0] + [1.0] * (backbone.num_blocks - 2)))
    model.train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    t = model.method.temperatures
    assert t[0].item() == 10.0 and t[1].item() == pytest.approx(0.01)  # projected before the forward
    assert t.grad is not None and t.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_gate_mixes_block_output_and_input_of_the_prompts(arch):
    backbone = BACKBONES[arch]()
    tokens = backbone.embed(torch.randn(2, 3, 32, 32))
    prompts = torch.randn(P, backbone.block_infos()[0].dim)
    g = torch.tensor(0.3)
    free = backbone.run_block(0, tokens, prompts)
    gated = backbone.run_block(0, tokens, prompts, prompt_gate=g)
    if arch == "vit":
        before = prompts.expand(2, -1, -1)
        torch.testing.assert_close(gated.x[:, 1:1 + P], g * free.x[:, 1:1 + P] + (1 - g) * before)
        assert torch.equal(gated.x[:, :1], free.x[:, :1]) and torch.equal(gated.x[:, 1 + P:], free.x[:, 1 + P:])
    else:
        torch.testing.assert_close(gated.prompts, g * free.prompts + (1 - g) * prompts.expand(2, -1, -1))
        assert torch.equal(gated.x, free.x)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_open_gates_are_vpt_shallow_exactly(arch):
    backbone = BACKBONES[arch]()
    torch.manual_seed(3)
    shallow = vptune.create_model(backbone, "vpt-shallow", C, num_tokens=P).eval()
    torch.manual_seed(3)
    gated = vptune.create_model(backbone, "gated", C, num_tokens=P, gate_init=1e4,
                                attention_shaping=False).eval()
    torch.manual_seed(3)
    shaped = vptune.create_model(backbone, "gated", C, num_tokens=P, gate_init=1e4).eval()  # tau_i = 1
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gated(x), shallow(x))
    torch.testing.assert_close(shaped(x), shallow(x), rtol=0, atol=1e-6)  # q / 1: another kernel path


def test_closed_gates_carry_the_prompts_unchanged():
    backbone = BACKBONES["vit"]()
    model = vptune.create_model(backbone, "gated", C, num_tokens=P, gate_init=-1e4,
                                pool="prompt_mean").eval()
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    want = backbone.norm(model.method.prompts[0]).mean(0).expand(2, -1)
    torch.testing.assert_close(feats, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_gates_train_and_save_bit_exact(arch, tmp_path):
    backbone = BACKBONES[arch]()
    model = vptune.create_model(backbone, "gated", C, num_tokens=P)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).logsumexp(-1).sum().backward()
    assert model.method.gate_logits.grad is not None and model.method.gate_logits.grad.abs().sum() > 0
    with torch.no_grad():
        model.method.gate_logits.add_(torch.randn_like(model.method.gate_logits))
    model.eval().save_pretrained(tmp_path)
    loaded = vptune.TunedModel.from_pretrained(tmp_path, backbone=backbone).eval()
    assert torch.equal(loaded(x), model(x)) and loaded.method.shared_pass(backbone.num_blocks) is None


def test_bad_options_refused():
    with pytest.raises(VptuneError, match="prepend"):
        vptune.create_model(BACKBONES["vit"](), "gated", C, location="add")
