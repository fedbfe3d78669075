"""Checkpoint reading, layout conversion and loading (REFERENCE.md, "Checkpoint layouts").

No real JAX / MAE / MoCo-v3 / Hugging Face checkpoint is available offline, so each test writes a small
random model in that layout itself (with an inverse mapping written here, independent of vptune's
converters) and checks that vptune loads it back exactly. The shared real ViT-Ti is checked when
``VPTUNE_ASSETS`` is set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vptune.backbones import LoadReport, create_backbone, detect_source, load_weights, read_state_dict
from vptune.backbones.checkpoint import config_from_folder
from vptune.backbones.vit import VisionTransformer, resize_pos_embed
from vptune.errors import VptuneError

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8}


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)
    return model.eval()


def tiny(name: str = "vit_tiny_patch16_224", seed: int = 0, **kw) -> VisionTransformer:
    return _randomize(create_backbone(name, **{**TINY, **kw}), seed)


def _head(d: int = 32, n: int = 5) -> dict[str, torch.Tensor]:
    return {"head.weight": torch.randn(n, d), "head.bias": torch.randn(n)}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, size: int = 32) -> None:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# ---------------------------------------------------------------------------------------------- JAX

def timm_to_jax(sd: dict[str, torch.Tensor], heads: int, big_vision: bool = False) -> dict[str, np.ndarray]:
    """The inverse of vptune's ``jax`` converter, written from the layout description alone."""
    ln1, mha, ln2, mlp = (0, 0, 1, 0) if big_vision else (0, 1, 2, 3)
    d = sd["cls_token"].shape[-1]
    out = {"embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),  # OIHW -> HWIO
           "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
           "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
           "Transformer/encoder_norm/scale": sd["norm.weight"],
           "Transformer/encoder_norm/bias": sd["norm.bias"]}
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for ln, norm in ((ln1, "norm1"), (ln2, "norm2")):
            out[f"{p}LayerNorm_{ln}/scale"] = sd[f"{b}{norm}.weight"]
            out[f"{p}LayerNorm_{ln}/bias"] = sd[f"{b}{norm}.bias"]
        ws, bs = sd[b + "attn.qkv.weight"].chunk(3), sd[b + "attn.qkv.bias"].chunk(3)
        for name, w, bias in zip(("query", "key", "value"), ws, bs):
            out[f"{p}MultiHeadDotProductAttention_{mha}/{name}/kernel"] = w.t().reshape(d, heads, d // heads)
            out[f"{p}MultiHeadDotProductAttention_{mha}/{name}/bias"] = bias.reshape(heads, d // heads)
        proj = sd[b + "attn.proj.weight"]  # (d, heads*head_dim) -> kernel (heads, head_dim, d)
        out[f"{p}MultiHeadDotProductAttention_{mha}/out/kernel"] = proj.t().reshape(heads, d // heads, d)
        out[f"{p}MultiHeadDotProductAttention_{mha}/out/bias"] = sd[b + "attn.proj.bias"]
        for j, fc in ((0, "fc1"), (1, "fc2")):
            out[f"{p}MlpBlock_{mlp}/Dense_{j}/kernel"] = sd[f"{b}mlp.{fc}.weight"].t()
            out[f"{p}MlpBlock_{mlp}/Dense_{j}/bias"] = sd[f"{b}mlp.{fc}.bias"]
    return {k: v.detach().numpy().copy() for k, v in out.items()}


@pytest.mark.parametrize("sep,big_vision", [("/", False), (".", False), ("/", True)])
def test_jax_npz_round_trip(tmp_path: Path, sep: str, big_vision: bool) -> None:
    ref = tiny()
    arrays = timm_to_jax(ref.state_dict(), heads=2, big_vision=big_vision)
    arrays.update({"pre_logits/kernel": np.ones((32, 32), np.float32),
                   "pre_logits/bias": np.zeros(32, np.float32),
                   "head/kernel": np.ones((32, 7), np.float32), "head/bias": np.zeros(7, np.float32)})
    path = tmp_path / "imagenet21k_ViT-Ti_8.npz"
    np.savez(path, **{k.replace("/", sep): v for k, v in arrays.items()})
    model = create_backbone("vit_tiny_patch16_224", weights=path, source="jax", **TINY).eval()
    _same_weights(model, ref)
    _same_outputs(model, ref)
    rep = model.load_report
    assert rep.source == "jax" and rep.complete
    assert rep.dropped == ["head.bias", "head.weight", "pre_logits.fc.bias", "pre_logits.fc.weight"]
    assert detect_source(read_state_dict(path)) == "jax"


# --------------------------------------------------------------------------------- timm files, safety

@pytest.mark.parametrize("fmt", ["safetensors", "pth", "bin"])
def test_timm_files_load(tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    ref = tiny()
    sd = {**ref.state_dict(), **_head()}
    path = tmp_path / f"model.{fmt}"
    save_file(sd, path) if fmt == "safetensors" else torch.save({"model": sd, "epoch": 3}, path)
    with caplog.at_level(logging.INFO, logger="vptune"):
        model = create_backbone("vit_tiny_patch16_224", weights=path, **TINY).eval()
    _same_weights(model, ref)
    _same_outputs(model, ref)
    rep = model.load_report
    assert isinstance(rep, LoadReport) and rep.source == "timm" and rep.loaded == len(ref.state_dict())
    assert rep.missing == [] and rep.unexpected == [] and rep.dropped == ["head.bias", "head.weight"]
    assert "source 'timm'" in caplog.text and "dropped 2: head.bias, head.weight" in str(rep)


def test_keep_head_returns_it(tmp_path: Path) -> None:
    head = _head()
    path = tmp_path / "m.safetensors"
    save_file({**tiny().state_dict(), **head}, path)
    rep = load_weights(create_backbone("vit_tiny_patch16_224", **TINY), path, keep_head=True)
    assert rep.dropped == [] and set(rep.head) == set(head)
    assert all(torch.equal(rep.head[k], head[k]) for k in head)


class Payload:  # a custom class: pickling it makes a file that weights_only=True refuses
    pass


@pytest.mark.parametrize("extra", [Payload(), argparse.Namespace(lr=0.1)])
def test_pickled_object_refused(tmp_path: Path, extra: object) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny().state_dict(), "args": extra}, path)
    with pytest.raises(VptuneError, match=r"refusing to unpickle .*evil\.pth"):
        read_state_dict(path)


def test_npz_object_array_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, cls=np.array([{"a": 1}], dtype=object))
    with pytest.raises(VptuneError, match="refusing to unpickle"):
        read_state_dict(path)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "npz"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file(tmp_path: Path, fmt: str, damage: str) -> None:
    sd = tiny().state_dict()
    path = tmp_path / f"broken.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    elif fmt == "safetensors":
        save_file(sd, path)
    else:
        np.savez(path, **{k: v.numpy() for k, v in sd.items()})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00junk" * 40)
    with pytest.raises(VptuneError, match=r"broken\." + fmt):
        read_state_dict(path)


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(VptuneError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(VptuneError, match="valid choices: .safetensors"):
        read_state_dict(tmp_path / "w.onnx")
    with pytest.raises(VptuneError, match="holds no weights file"):
        read_state_dict(tmp_path)
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(VptuneError, match="no state dict of tensors"):
        read_state_dict(tmp_path / "empty.pth")


# --------------------------------------------------------------------------- detection, strictness

def test_auto_detection_names_the_source() -> None:
    sd = tiny().state_dict()
    assert detect_source({**sd, **_head()}) == "timm"
    assert detect_source({**sd, "decoder_embed.weight": torch.zeros(1)}) == "mae"
    assert detect_source({"module.base_encoder." + k: v for k, v in sd.items()}) == "mocov3"
    with pytest.raises(VptuneError, match="ambiguous .*mae.*timm|ambiguous .*timm.*mae"):
        detect_source(sd)  # a head-less timm file is also an encoder-only MAE file
    assert detect_source(sd, tiny()) == "timm"  # ... the backbone settles it
    assert detect_source(sd, tiny("mae_vit_base_patch16")) == "mae"
    with pytest.raises(VptuneError, match="could not recognise .*valid|pass source= one of: .*hf.*jax"):
        detect_source({"foo.weight": torch.zeros(1)})


def test_bad_source_lists_valid() -> None:
    with pytest.raises(VptuneError, match="unknown checkpoint source 'caffe'; valid choices: auto, ") as e:
        load_weights(tiny(), tiny().state_dict(), source="caffe")
    assert all(s in str(e.value) for s in ("hf", "jax", "mae", "mocov3", "timm"))


def test_strict_refusal_lists_missing(tmp_path: Path) -> None:
    ref = tiny()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("blocks.1.")}
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_file(sd, path)
    model = tiny(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VptuneError, match="missing 12: blocks.1.attn.proj.bias") as e:
        load_weights(model, path, source="timm")
    assert "unexpected 1: extra.weight" in str(e.value) and "partial.safetensors" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded
    rep = load_weights(model, path, source="timm", strict=False)
    assert len(rep.missing) == 12 and rep.unexpected == ["extra.weight"] and not rep.complete
    assert torch.equal(model.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_shape_mismatch_refused() -> None:
    sd = tiny(embed_dim=64, num_heads=4).state_dict()
    with pytest.raises(VptuneError, match=r"shape mismatch .*checkpoint \(64"):
        load_weights(tiny(), sd, source="timm")


def test_pos_embed_resized_from_larger_grid() -> None:
    big = tiny(img_size=64)  # a "384" checkpoint for a "224" config, in miniature: 8x8 -> 4x4 grid
    model = tiny(seed=3)
    rep = load_weights(model, big.state_dict())
    assert rep.resized == ["pos_embed"] and rep.complete
    assert torch.equal(model.pos_embed.data, resize_pos_embed(big.pos_embed.data, (4, 4)))
    assert torch.equal(model.blocks[1].mlp.fc2.weight, big.blocks[1].mlp.fc2.weight)


# ------------------------------------------------------------------------------------ MAE, MoCo-v3

def test_mae_layout(tmp_path: Path) -> None:
    enc = tiny()  # a timm-named encoder with a final norm, as in mae_pretrain_vit_base.pth
    sd = dict(enc.state_dict())
    decoder = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32),
               "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
               "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.randn(192, 16)}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {**sd, **decoder}}, path)
    model = create_backbone("mae_vit_base_patch16", weights=path, **TINY).eval()
    rep = model.load_report
    assert rep.source == "mae" and rep.complete and rep.missing == []
    assert rep.dropped == sorted(decoder)
    assert torch.equal(model.fc_norm.weight, sd["norm.weight"]) and isinstance(model.norm, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # mean of the patch tokens, then the pretrained final norm
        tokens = enc.embed(x)
        for i in range(enc.num_blocks):
            tokens = enc.run_block(i, tokens)
        torch.testing.assert_close(model(x), enc.norm(tokens.x[:, 1:].mean(1)))


def test_mocov3_layout(tmp_path: Path) -> None:
    base = tiny("mocov3_vit_small_patch16")
    momentum = tiny("mocov3_vit_small_patch16", seed=9)
    sd = {"module.base_encoder." + k: v for k, v in base.state_dict().items()}
    sd.update({"module.momentum_encoder." + k: v for k, v in momentum.state_dict().items()})
    sd.update({"module.base_encoder.head.0.weight": torch.randn(64, 32),
               "module.predictor.0.weight": torch.randn(8, 8)})
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd}, path)
    model = create_backbone("mocov3_vit_small_patch16", weights=path, **TINY).eval()
    rep = model.load_report
    assert rep.source == "mocov3" and rep.complete and rep.missing == []
    assert "module.predictor.0.weight" in rep.dropped and "head.0.weight" in rep.dropped
    assert sum(k.startswith("module.momentum_encoder.") for k in rep.dropped) == len(momentum.state_dict())
    _same_weights(model, base)
    _same_outputs(model, base)


# -------------------------------------------------------------------------------- folders (HF, timm)

def test_hf_folder_without_name(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                 intermediate_size=192, patch_size=8, image_size=32,
                                 attn_implementation="eager")
    hf = _randomize(transformers.ViTModel(cfg))
    hf.save_pretrained(tmp_path)
    model = create_backbone(weights=tmp_path).eval()
    assert model.config.norm_eps == 1e-12 and model.config.embed_dim == 48 and model.config.depth == 2
    assert model.load_report.source == "hf" and model.load_report.complete
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state[:, 0]
        assert ((model(x) - ref).norm() / ref.norm()) < 1e-5


def test_timm_style_folder_config(tmp_path: Path) -> None:
    ref = tiny()
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    raw = {"architecture": "vit_custom", "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
           "patch_size": 8, "img_size": 32, "qkv_bias": True, "layer_norm_eps": 1e-6, "global_pool": "token",
           "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    name, cfg = config_from_folder(tmp_path)
    assert name == "vit" and cfg.global_pool == "cls" and not cfg.fc_norm and cfg.mean == (0.1, 0.2, 0.3)
    model = create_backbone(weights=tmp_path, input_size=48).eval()
    _same_weights(model, ref)
    assert model.preprocessing.input_size == 48 and model.preprocessing.interpolation == "bicubic"
    (tmp_path / "config.json").write_text(json.dumps({**raw, "global_pool": "avg"}))
    assert config_from_folder(tmp_path)[1].fc_norm  # timm: fc_norm defaults on with average pooling
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "beit"}))
    with pytest.raises(VptuneError, match="model_type 'beit'.*valid choices: .*vit"):
        config_from_folder(tmp_path)


# ------------------------------------------------------------------------------ the real ViT-Ti asset

ASSET = "weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k_ft_tinyimagenet"


@pytest.fixture
def assets() -> Path:
    root = os.environ.get("VPTUNE_ASSETS")
    if not root:
        pytest.skip("VPTUNE_ASSETS is not set: the shared real ViT-Ti/16 checkpoint is not available")
    if not (Path(root) / ASSET / "model.safetensors").is_file():
        pytest.skip(f"VPTUNE_ASSETS={root} has no {ASSET}/model.safetensors")
    return Path(root)


def _images(root: Path, n: int = 4) -> torch.Tensor:
    from PIL import Image

    files = sorted((root / "datasets" / "caltech101").glob("*/image_0001.jpg"))[:n]
    if len(files) < n:
        pytest.skip("the Caltech-101 images of VPTUNE_ASSETS are missing")
    size = (224, 224)
    arrays = [np.asarray(Image.open(f).convert("RGB").resize(size, Image.Resampling.BILINEAR)) for f in files]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def test_real_vit_tiny(assets: Path) -> None:
    folder = assets / ASSET
    model = create_backbone(weights=folder).eval()  # no name: config.json says vit_tiny_patch16_224
    rep = model.load_report
    assert rep.source == "timm" and rep.missing == [] and rep.unexpected == [] and rep.mismatched == []
    assert rep.dropped == ["head.bias", "head.weight"] and rep.loaded == 150
    file = load_file(str(folder / "model.safetensors"))
    for k in ("pos_embed", "patch_embed.proj.weight", "cls_token", "blocks.11.mlp.fc2.weight"):
        assert torch.equal(model.state_dict()[k], file[k]), k
    rep = load_weights(model, folder, keep_head=True)
    assert rep.head["head.weight"].shape == (200, 192)
    with torch.no_grad():
        logits = model(_images(assets)) @ rep.head["head.weight"].t() + rep.head["head.bias"]
    assert logits.shape == (4, 200) and torch.isfinite(logits).all()
    assert logits.softmax(-1).max(-1).values.min() > 1.0 / 200  # not a flat (broken) distribution


def test_checkpoint_of_another_size_is_refused_for_its_gaps_not_as_ambiguous(tmp_path):
    """A headless timm file of a 2-block ViT given to a 12-block config: timm layout, missing keys named."""
    from safetensors.torch import save_file

    from vptune.backbones import create_backbone
    from vptune.backbones.vit import VisionTransformer, ViTConfig

    small = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    save_file(small.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(VptuneError, match=r"source .timm.*missing 120: blocks\.\d+\."):
        create_backbone("vit_tiny_patch16_224", weights=tmp_path / "w.safetensors", img_size=32, patch_size=8,
                        embed_dim=32, num_heads=2)
