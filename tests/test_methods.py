"""Core method behaviour: exact trainable counts, prompt placement, gradients, adapters."""

from __future__ import annotations

import copy

import pytest
import torch

import vptune
from vptune.backbones.vit import VIT_CONFIGS, VisionTransformer
from vptune.errors import VptuneError
from vptune.methods import set_trainable

C = 7  # classes
D, N = 192, 12  # ViT-Ti width and depth
HEAD = (D + 1) * C


@pytest.fixture(scope="module")
def vit_ti() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(VIT_CONFIGS["vit_tiny_patch16_224"]).eval()


def _block_params() -> int:
    ln = 2 * D
    qkv, proj = 3 * D * D + 3 * D, D * D + D
    fc1, fc2 = 4 * D * D + 4 * D, 4 * D * D + D
    return 2 * ln + qkv + proj + fc1 + fc2


@pytest.mark.parametrize(
    "method, options, expected",
    [
        ("linear", {}, HEAD),
        ("vpt-shallow", {"num_tokens": 10}, 10 * D + HEAD),
        ("vpt-deep", {"num_tokens": 10}, N * 10 * D + HEAD),
        ("vpt-deep", {"num_tokens": 10, "deep_layers": 3}, 3 * 10 * D + HEAD),
        ("vpt-deep", {"num_tokens": 10, "deep_layers": -4}, 4 * 10 * D + HEAD),
        ("vpt-deep", {"num_tokens": 10, "project_dim": 16}, N * 10 * 16 + 16 * D + D + HEAD),
        ("vpt-shallow", {"location": "add"}, 196 * D + HEAD),
        # BitFit: patch-embed bias + per block (norm1, qkv, proj, norm2, fc1, fc2 biases) + final norm bias
        ("bias", {}, D + N * (D + 3 * D + D + D + 4 * D + D) + D + HEAD),
        # adapter r=8: Linear(192, 24) + Linear(24, 192) per block
        ("adapter", {"reduction": 8}, N * ((D * 24 + 24) + (24 * D + D)) + HEAD),
        ("partial-1", {}, _block_params() + 2 * D + HEAD),
        ("partial-2", {}, 2 * _block_params() + 2 * D + HEAD),
        # MLP-3: two hidden Linear(D, D) + BatchNorm1d(D), then the output layer
        ("mlp-3", {}, 2 * (D * D + D + 2 * D) + HEAD),
        ("full", {}, 5_524_416 + HEAD),
    ],
)
def test_exact_trainable_counts_vit_ti(vit_ti, method, options, expected):
    model = vptune.create_model(vit_ti, method, C, **options)
    assert model.num_trainable_parameters() == expected


def test_full_count_is_the_backbone(vit_ti):
    assert sum(p.numel() for p in vit_ti.parameters()) == 5_524_416  # ViT-Ti/16 without head


def test_sidetune_count(vit_ti):
    model = vptune.create_model(vit_ti, "sidetune", C, width=8)
    convs = 3 * 8 * 9 + 8 * 16 * 9 + 16 * 32 * 9 + 32 * 64 * 9
    bns = 2 * (8 + 16 + 32 + 64)
    assert model.num_trainable_parameters() == convs + bns + (64 * D + D) + 1 + HEAD


def test_zero_prompts_equal_plain_backbone(tiny_vit):
    x = torch.randn(3, 3, 32, 32)
    for method in ("vpt-shallow", "vpt-deep"):
        model = vptune.create_model(tiny_vit, method, 4, num_tokens=0).eval()
        torch.testing.assert_close(model.features(x), tiny_vit(x), rtol=0, atol=0)


def test_prompts_change_features(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    model = vptune.create_model(tiny_vit, "vpt-deep", 4, num_tokens=3).eval()
    assert not torch.allclose(model.features(x), tiny_vit(x))


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_prompt_order_is_equivalent(tiny_vit, method):
    """[CLS, P, patches] and [CLS, patches, P] give the same [CLS] output (paper, Sec. 3.2)."""
    x = torch.randn(2, 3, 32, 32)
    model = vptune.create_model(tiny_vit, method, 4, num_tokens=5).eval()
    with torch.no_grad():
        ours = model.features(x)
        tokens = tiny_vit.embed(x).x  # (B, 1+N, d)
        n = tokens.shape[1]
        for i, block in enumerate(tiny_vit.blocks):
            p = model.method.block_prompts(i, 2)
            if p is not None:  # append after the patches instead, replacing earlier prompt outputs
                tokens = torch.cat([tokens[:, :n], p.expand(2, -1, -1)], dim=1)
            tokens = block(tokens)
        theirs = tiny_vit.norm(tokens)[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_deep_prompts_replace_previous_outputs(tiny_vit):
    """Deep: block i sees its own prompts, not block i-1's prompt outputs."""
    model = vptune.create_model(tiny_vit, "vpt-deep", 4, num_tokens=2).eval()
    x = torch.randn(1, 3, 32, 32)
    tokens = tiny_vit.embed(x)
    tokens = tiny_vit.run_block(0, tokens, model.method.block_prompts(0, 1))
    tokens = tiny_vit.run_block(1, tokens, model.method.block_prompts(1, 1))
    assert tokens.num_prompts == 2 and tokens.x.shape[1] == 1 + 2 + 16


def expected_trainable(method: str, backbone_names: list[str]) -> set[str]:
    """The tensors each method trains on the tiny ViT (2 blocks), written out by hand from the paper's
    definitions (Sec. 3-4.1), not from the methods' patterns."""
    head = {"head.weight", "head.bias"}
    wb = ("weight", "bias")
    side = {"method.alpha"} | {f"method.side.{i}.weight" for i in (0, 3, 6, 9)} | \
        {f"method.side.{i}.{w}" for i in (1, 4, 7, 10, 14) for w in wb}
    return {
        "vpt-shallow": {"method.prompts.0"} | head,
        "vpt-deep": {"method.prompts.0", "method.prompts.1"} | head,
        "adapter": {f"method.adapters.{i}.{m}.{w}" for i in (0, 1) for m in ("down", "up") for w in wb} | head,
        "bias": {"backbone." + n for n in backbone_names if n.endswith(".bias")} | head,
        "partial-1": {"backbone." + n for n in backbone_names if n.startswith(("blocks.1.", "norm."))} | head,
        "mlp-3": {f"head.{i}.{w}" for i in (0, 1, 4, 5, 8) for w in wb},
        "sidetune": side | head,
        "linear": head,
        "full": {"backbone." + n for n in backbone_names} | head,
    }[method]


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep", "adapter", "bias", "partial-1", "mlp-3",
                                    "sidetune", "linear", "full"])
def test_gradients_reach_only_trained_tensors(tiny_vit, method):
    expected = expected_trainable(method, [n for n, _ in tiny_vit.named_parameters()])
    model = vptune.create_model(tiny_vit, method, 4).train()
    x = torch.randn(4, 3, 32, 32)
    model(x).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert set(model.trainable_names) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_frozen_modules_stay_in_eval(tiny_vit):
    model = vptune.create_model(tiny_vit, "vpt-deep", 4, dropout=0.1).train()
    assert not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    assert model.method.training and model.head.training
    full = vptune.create_model(tiny_vit, "full", 4).train()
    assert full.backbone.training


def test_weight_changing_methods_leave_shared_backbone_alone(tiny_vit):
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    model = vptune.create_model(tiny_vit, "bias", 4)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(1.0)
    for k, v in tiny_vit.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_adapter_starts_as_identity_and_every_tensor_learns(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    model = vptune.create_model(tiny_vit, "adapter", 4, reduction=4).train()
    h = torch.randn(2, 17, 32) * 3
    for adapter in model.method.adapters:  # an exact no-op up to float rounding of W a - W a
        assert adapter(h).abs().max() < 1e-6 * h.abs().max()
    torch.testing.assert_close(model.features(x), tiny_vit(x), rtol=1e-4, atol=1e-5)
    model(x).logsumexp(-1).sum().backward()
    for name, p in model.method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_vpt_init_rule(vit_ti):
    model = vptune.create_model(vit_ti, "vpt-deep", 2, num_tokens=50)
    v = (6.0 / (3 * 16 * 16 + 192)) ** 0.5
    p = model.method.prompts[0]
    assert p.abs().max() <= v and p.abs().max() > 0.9 * v


def test_unknown_method_and_option_list_choices(tiny_vit):
    with pytest.raises(VptuneError, match="valid choices: .*vpt-deep"):
        vptune.create_model(tiny_vit, "vpt-deeper", 4)
    with pytest.raises(VptuneError, match="valid options: .*num_tokens"):
        vptune.create_model(tiny_vit, "vpt-deep", 4, num_prompts=3)
    with pytest.raises(VptuneError, match="valid choices: prepend, add"):
        vptune.create_model(tiny_vit, "vpt-deep", 4, location="middle")
    with pytest.raises(VptuneError, match="pool mode"):
        vptune.create_model(tiny_vit, "vpt-deep", 4, pool="max")


def test_set_trainable_refuses_unmatched_or_unanchored(tiny_vit):
    with pytest.raises(VptuneError, match="match no parameter"):
        set_trainable(tiny_vit, [r"^nonexistent\."])
    with pytest.raises(VptuneError, match="anchored"):
        set_trainable(tiny_vit, [r"blocks\."])


def test_pool_modes(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    outs = {m: vptune.create_model(tiny_vit, "vpt-shallow", 3, num_tokens=4, pool=m).eval().features(x)
            for m in ("cls", "image_mean", "prompt_mean")}
    assert not torch.allclose(outs["cls"], outs["image_mean"])
    assert not torch.allclose(outs["prompt_mean"], outs["image_mean"])


def test_gradient_checkpointing_matches(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    model = vptune.create_model(tiny_vit, "vpt-deep", 3, num_tokens=2).train()
    model(x).sum().backward()
    g1 = model.method.prompts[0].grad.clone()
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x).sum().backward()
    torch.testing.assert_close(model.method.prompts[0].grad, g1)


@pytest.mark.parametrize("pool", [None, "image_mean"])
def test_deep_prompts_as_keys_and_values_equal_the_full_sequence(tiny_vit, pool):
    """VPT-deep skips computing prompt outputs that the next block discards; results are unchanged."""
    x = torch.randn(3, 3, 32, 32)
    model = vptune.create_model(tiny_vit, "vpt-deep", 4, num_tokens=5, pool=pool).eval()
    assert not model.method.prompt_outputs_needed(0, 2)
    with torch.no_grad():
        fast = model.features(x)
        tokens = tiny_vit.embed(x)
        for i in range(tiny_vit.num_blocks):  # the plain path: prompts in the sequence, outputs computed
            tokens = tiny_vit.run_block(i, tokens, model.method.block_prompts(i, 3))
        slow = tiny_vit.pool(tokens, pool)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_prompt_outputs_are_kept_when_read(tiny_vit):
    for method, opts in [("vpt-shallow", {}), ("vpt-deep", {"pool": "prompt_mean"}),
                         ("vpt-deep", {"deep_layers": 1})]:
        model = vptune.create_model(tiny_vit, method, 4, **opts)
        assert model.method.prompt_outputs_needed(0, 2)


def test_prompt_dropout_masks_differ_per_sample(tiny_vit):
    model = vptune.create_model(tiny_vit, "vpt-deep", 4, num_tokens=20, dropout=0.5).train()
    p = model.method.block_prompts(0, 2)
    assert p.shape == (2, 20, 32) and not torch.equal(p[0] == 0, p[1] == 0)
    model.eval()
    assert model.method.block_prompts(0, 2).shape == (20, 32)


def test_deep_prompt_gradients_equal_the_full_sequence(tiny_vit):
    x = torch.randn(3, 3, 32, 32)
    model = vptune.create_model(tiny_vit, "vpt-deep", 4, num_tokens=5).train()
    model(x).logsumexp(-1).sum().backward()
    fast = [p.grad.clone() for p in model.method.prompts]
    model.zero_grad()
    tokens = tiny_vit.embed(x)
    for i in range(tiny_vit.num_blocks):
        tokens = tiny_vit.run_block(i, tokens, model.method.block_prompts(i, 3))
    model.head(tiny_vit.pool(tokens)).logsumexp(-1).sum().backward()
    for g_fast, p in zip(fast, model.method.prompts):
        torch.testing.assert_close(g_fast, p.grad, rtol=1e-4, atol=1e-6)


def test_block_i_uses_its_own_prompts():
    """VPT-deep: changing block k's prompts leaves every block before k untouched and moves block k's
    output and the features; the hooks reach block k through the one loop (forward_features)."""
    from tests.helpers import tiny_vit as make

    torch.manual_seed(0)
    bb = make()
    bb.blocks.append(copy.deepcopy(bb.blocks[0]))  # three blocks, so a middle one exists
    bb.config.depth = 3
    model = vptune.create_model(bb, "vpt-deep", 4, num_tokens=2).eval()
    x = torch.randn(2, 3, 32, 32)
    seen: dict[int, torch.Tensor] = {}
    hooks = [blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.detach().clone()))
             for i, blk in enumerate(bb.blocks)]
    with torch.no_grad():
        before_feats = model.forward_features(x)
        before = dict(seen)
        model.method.prompts[1].add_(torch.randn_like(model.method.prompts[1]))  # block 1 only (not a constant: LN removes it)
        after_feats = model.forward_features(x)
    for h in hooks:
        h.remove()
    assert torch.equal(seen[0], before[0]), "block 0 does not see block 1's prompts"
    assert not torch.allclose(seen[1], before[1]) and not torch.allclose(after_feats, before_feats)
