"""Task artifacts: round trips, only trained tensors stored, backbone identity, bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vptune
from tests.conftest import TINY
from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.errors import VptuneError

ALL = ["linear", "vpt-shallow", "vpt-deep", "full", "partial-1", "mlp-3", "sidetune", "bias", "adapter"]


def _trained_once(model, x):
    model.train()
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.1)
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    return model.eval()


@pytest.mark.parametrize("method", ALL)
def test_round_trip_identical_logits(tiny_vit, tmp_path, method):
    x = torch.randn(3, 3, 32, 32)
    model = _trained_once(vptune.create_model(tiny_vit, method, 5, label_names=list("abcde")), x)
    model.save_pretrained(tmp_path / "task")
    loaded = vptune.TunedModel.from_pretrained(tmp_path / "task", backbone=tiny_vit).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.label_names == list("abcde")
    stored = load_file(str(tmp_path / "task" / "weights.safetensors"))
    assert set(stored) == set(model.trained_state_dict())
    if not model.method.changes_backbone:
        assert not any(k.startswith("backbone.") for k in stored), "a frozen backbone tensor was stored"


@pytest.mark.parametrize("method", ["vpt-deep", "linear", "vpt-shallow"])
def test_weights_file_is_about_four_bytes_per_parameter(tiny_vit, tmp_path, method):
    model = vptune.create_model(tiny_vit, method, 10, num_tokens=8) if "vpt" in method else \
        vptune.create_model(tiny_vit, method, 10)
    model.save_pretrained(tmp_path)
    size = (tmp_path / "weights.safetensors").stat().st_size
    n = model.num_trainable_parameters()
    assert 4 * n <= size <= 4 * n + 1024  # float32 payload plus a small header


def test_task_json_contents(tiny_vit, tmp_path):
    model = vptune.create_model(tiny_vit, "vpt-deep", 3, num_tokens=4, dropout=0.1)
    model.save_pretrained(tmp_path, training={"epochs": 1})
    meta = json.loads((tmp_path / "task.json").read_text())
    assert meta["format"] == "vptune-task" and meta["format_version"] == 1
    assert meta["vptune_version"] == vptune.__version__
    assert meta["method"] == "vpt-deep" and meta["options"]["num_tokens"] == 4
    assert meta["options"]["dropout"] == 0.1
    assert meta["num_classes"] == 3 and len(meta["label_names"]) == 3
    assert meta["backbone"]["arch"] == "vit" and len(meta["backbone"]["sha256"]) == 64
    assert meta["backbone"]["config"]["embed_dim"] == 32
    assert meta["preprocessing"]["input_size"] == 32
    assert meta["training"] == {"epochs": 1}
    assert meta["trained_parameters"] == model.num_trainable_parameters()


def test_partial_k_name_round_trips(tiny_vit, tmp_path):
    vptune.create_model(tiny_vit, "partial-2", 3).save_pretrained(tmp_path)
    loaded = vptune.TunedModel.from_pretrained(tmp_path, backbone=tiny_vit)
    assert loaded.method_name == "partial-2"


def test_other_backbone_is_refused_naming_both(tiny_vit, tmp_path):
    vptune.create_model(tiny_vit, "vpt-shallow", 3).save_pretrained(tmp_path)
    torch.manual_seed(1)
    other = VisionTransformer(ViTConfig(**TINY))  # same shape, other weights
    with pytest.raises(VptuneError, match=r"trained on backbone vit 32x2 \(weights sha256 .*given backbone is vit"):
        vptune.TunedModel.from_pretrained(tmp_path, backbone=other)
    wider = VisionTransformer(ViTConfig(**{**TINY, "embed_dim": 64}))
    with pytest.raises(VptuneError, match="vit 64x2"):
        vptune.TunedModel.from_pretrained(tmp_path, backbone=wider)


def test_missing_and_corrupt_files(tiny_vit, tmp_path):
    with pytest.raises(VptuneError, match="does not exist"):
        vptune.TunedModel.from_pretrained(tmp_path / "nope", backbone=tiny_vit)
    with pytest.raises(VptuneError, match="task.json is missing"):
        vptune.TunedModel.from_pretrained(tmp_path, backbone=tiny_vit)
    vptune.create_model(tiny_vit, "linear", 3).save_pretrained(tmp_path)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(VptuneError, match="corrupt"):
        vptune.TunedModel.from_pretrained(tmp_path, backbone=tiny_vit)
    weights.unlink()
    with pytest.raises(VptuneError, match="weights.safetensors is missing"):
        vptune.TunedModel.from_pretrained(tmp_path, backbone=tiny_vit)
    (tmp_path / "task.json").write_text("{not json")
    with pytest.raises(VptuneError, match="corrupt"):
        vptune.TunedModel.from_pretrained(tmp_path, backbone=tiny_vit)


def test_weights_that_do_not_match_task_json_are_refused(tiny_vit, tmp_path):
    vptune.create_model(tiny_vit, "vpt-deep", 3, num_tokens=4).save_pretrained(tmp_path / "a")
    vptune.create_model(tiny_vit, "vpt-deep", 3, num_tokens=6).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "weights.safetensors").write_bytes((tmp_path / "b" / "weights.safetensors").read_bytes())
    with pytest.raises(VptuneError, match="sha256 differs"):
        vptune.TunedModel.from_pretrained(tmp_path / "a", backbone=tiny_vit)
    meta = json.loads((tmp_path / "a" / "task.json").read_text())
    del meta["weights_sha256"]  # a task written before the sha256 was recorded: the shapes still catch it
    (tmp_path / "a" / "task.json").write_text(json.dumps(meta))
    with pytest.raises(VptuneError, match="shape"):
        vptune.TunedModel.from_pretrained(tmp_path / "a", backbone=tiny_vit)


def test_save_overwrites_atomically(tiny_vit, tmp_path):
    model = vptune.create_model(tiny_vit, "linear", 3)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.json", "weights.safetensors"]
