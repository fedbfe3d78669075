"""MultiTaskModel: mixed batches equal each task's own TunedModel."""

from __future__ import annotations

import pytest
import torch

import vptune
from tests.helpers import TINY, tiny_vit
from vptune import create_model
from vptune.backbones import swin
from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.errors import VptuneError
from vptune.multitask import MultiTaskModel, pad_logits

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for tiny models


# name -> (method, num_classes, options)
TASKS = {
    "shallow3": ("vpt-shallow", 3, {"num_tokens": 3}),
    "deep5": ("vpt-deep", 5, {"num_tokens": 5}),
    "deep2_proj": ("vpt-deep", 4, {"num_tokens": 2, "project_dim": 8, "pool": "prompt_mean"}),
    "deep_last": ("vpt-deep", 6, {"num_tokens": 4, "deep_layers": -1, "pool": "image_mean"}),
    "shallow7_mean": ("vpt-shallow", 2, {"num_tokens": 7, "pool": "prompt_mean"}),
    "linear": ("linear", 7, {}),
    "mlp": ("mlp-2", 3, {}),
    "bias": ("bias", 4, {}),
    "full": ("full", 2, {}),
    "adapter": ("adapter", 3, {"reduction": 4}),
    "sidetune": ("sidetune", 2, {"width": 4}),
}


def _perturb(model: torch.nn.Module) -> None:
    """Give every trained tensor non-trivial values, as training would."""
    g = torch.Generator().manual_seed(hash(model.method_name) % 1000)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    backbone = tiny_vit()
    root = tmp_path_factory.mktemp("tasks")
    dirs = {}
    for name, (method, nc, opts) in TASKS.items():
        model = create_model(backbone, method, nc, **opts)
        _perturb(model)
        dirs[name] = model.save_pretrained(root / name)
    return backbone, dirs


_MODELS: dict = {}


def _reference(backbone, dirs, name, x):
    key = (id(backbone), name)
    if key not in _MODELS:
        _MODELS[key] = vptune.TunedModel.from_pretrained(dirs[name], backbone=backbone).eval()
    with torch.no_grad():
        return _MODELS[key](x)


@pytest.mark.parametrize("pad_tolerance", [None, 0.25])
def test_mixed_batch_equals_each_task_alone(task_dirs, pad_tolerance):
    backbone, dirs = task_dirs
    mt = MultiTaskModel(backbone, pad_tolerance=pad_tolerance)  # None: all prompt lengths in one pass
    for name, d in dirs.items():
        mt.add_task(name, d)
    assert set(mt.tasks) == set(TASKS)
    assert mt.tasks["deep5"].shared and mt.tasks["linear"].shared and mt.tasks["shallow3"].shared
    assert not mt.tasks["bias"].shared and not mt.tasks["adapter"].shared and not mt.tasks["sidetune"].shared
    names = list(TASKS) * 2 + ["deep5", "shallow3", "linear", "bias"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(names), 3, 32, 32, generator=g)
    out = mt(x, names)
    assert len(out) == len(names)
    for b, name in enumerate(names):
        ref = _reference(backbone, dirs, name, x[b : b + 1])[0]
        assert out[b].shape == (TASKS[name][1],)
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5, msg=f"sample {b} task {name}")
    padded, lengths = pad_logits(out)
    assert padded.shape == (len(names), 7) and lengths.tolist() == [TASKS[n][1] for n in names]


def test_only_prompt_tasks_different_lengths_and_depths(task_dirs):
    backbone, dirs = task_dirs
    mt = MultiTaskModel(backbone, pad_tolerance=None)
    for name in ("shallow3", "deep5", "deep_last", "shallow7_mean", "linear"):
        mt.add_task(name, dirs[name])
    names = ["deep5", "shallow3", "deep_last", "shallow7_mean", "shallow3", "deep5", "linear"]
    x = torch.randn(len(names), 3, 32, 32)
    passes = []
    run = mt._shared_pass
    mt._shared_pass = lambda x, entries: passes.append(len(entries)) or run(x, entries)
    out = mt(x, names)
    assert passes == [len(names)], "every prompt task and the linear probe share one backbone pass"
    for b, name in enumerate(names):
        torch.testing.assert_close(
            out[b], _reference(backbone, dirs, name, x[b : b + 1])[0], atol=1e-5, rtol=1e-5
        )


def test_padding_tolerance_splits_passes_by_prompt_length(task_dirs):
    backbone, dirs = task_dirs
    mt = MultiTaskModel(backbone)  # 16 patches + [CLS]: p = 0..4 within 25% of 17 tokens, p = 5..7 of 22
    for name in ("shallow3", "deep5", "shallow7_mean", "linear", "deep2_proj"):
        mt.add_task(name, dirs[name])
    names = ["deep5", "linear", "shallow7_mean", "deep2_proj", "shallow3", "deep5"]
    x = torch.randn(len(names), 3, 32, 32)
    passes = []
    run = mt._shared_pass
    mt._shared_pass = lambda x, entries: passes.append(sorted(e.name for e in entries)) or run(x, entries)
    out = mt(x, names)
    assert sorted(passes) == [["deep2_proj", "linear", "shallow3"], ["deep5", "deep5", "shallow7_mean"]]
    for b, name in enumerate(names):
        torch.testing.assert_close(
            out[b], _reference(backbone, dirs, name, x[b : b + 1])[0], atol=1e-5, rtol=1e-5
        )


def test_images_as_list_of_different_sizes(task_dirs):
    backbone, dirs = task_dirs
    mt = MultiTaskModel(backbone)
    mt.add_task("deep5", dirs["deep5"])
    mt.add_task("linear", dirs["linear"])
    imgs = [torch.randn(3, 32, 32), torch.randn(3, 48, 48), torch.randn(3, 32, 32)]
    out = mt(imgs, ["deep5", "linear", "linear"])
    for b, name in enumerate(["deep5", "linear", "linear"]):
        ref = _reference(backbone, dirs, name, imgs[b][None])[0]
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5)


def test_task_from_another_backbone_is_rejected(task_dirs):
    _, dirs = task_dirs
    torch.manual_seed(123)
    other = VisionTransformer(ViTConfig(**TINY)).eval()  # same config, other weights
    mt = MultiTaskModel(other)
    with pytest.raises(VptuneError, match="trained on backbone"):
        mt.add_task("deep5", dirs["deep5"])
    wider = VisionTransformer(ViTConfig(**{**TINY, "embed_dim": 48})).eval()
    with pytest.raises(VptuneError, match="trained on backbone"):
        MultiTaskModel(wider).add_task("linear", dirs["linear"])
    assert len(mt) == 0


def test_add_remove_and_errors(task_dirs):
    backbone, dirs = task_dirs
    mt = MultiTaskModel(backbone)
    mt.add_task("a", dirs["deep5"])
    with pytest.raises(VptuneError, match="already loaded"):
        mt.add_task("a", dirs["linear"])
    mt.add_task("a", dirs["linear"], replace=True)
    assert mt.tasks["a"].method == "linear"
    with pytest.raises(VptuneError, match="bad task name"):
        mt.add_task("../x", dirs["linear"])
    with pytest.raises(VptuneError, match="unknown task 'b'"):
        mt(torch.randn(1, 3, 32, 32), ["b"])
    mt.remove_task("a")
    assert "a" not in mt
    with pytest.raises(VptuneError, match="unknown task"):
        mt.remove_task("a")
    with pytest.raises(VptuneError, match="does not exist"):
        mt.add_task("c", dirs["linear"].parent / "nope")


def test_exported_from_package():
    assert vptune.MultiTaskModel is MultiTaskModel


@pytest.mark.parametrize("prompt_merge", ["carry", "drop"])
def test_swin_mixed_batch_equals_each_task_alone(tmp_path, prompt_merge):
    torch.manual_seed(0)
    cfg = swin.SwinConfig(
        embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=56, window_size=7, prompt_merge=prompt_merge
    )
    backbone = swin.SwinTransformer(cfg).eval()
    specs = {
        "s3": ("vpt-shallow", 3, {"num_tokens": 3}),
        "d5": ("vpt-deep", 5, {"num_tokens": 5}),
        "lin": ("linear", 4, {}),
        "late": ("vpt-deep", 2, {"num_tokens": 2, "deep_layers": -1}),
        "bias": ("bias", 2, {}),
    }
    mt = MultiTaskModel(backbone, pad_tolerance=None)
    refs = {}
    for name, (method, nc, opts) in specs.items():
        model = create_model(backbone, method, nc, **opts)
        _perturb(model)
        model.save_pretrained(tmp_path / name)
        mt.add_task(name, tmp_path / name)
        refs[name] = vptune.TunedModel.from_pretrained(tmp_path / name, backbone=backbone).eval()
    assert mt.mixes_prompts
    names = ["s3", "d5", "lin", "late", "bias", "d5", "s3"]
    x = torch.randn(len(names), 3, 56, 56)
    out = mt(x, names)
    for b, name in enumerate(names):
        with torch.no_grad():
            ref = refs[name](x[b : b + 1])[0]
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5, msg=f"sample {b} task {name}")
