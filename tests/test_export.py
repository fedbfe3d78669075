"""ONNX export: one backbone graph (prompts as inputs) for every prompt task, checked with onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="the 'onnx' extra (onnx) is not installed: pip install 'vptune[onnx]'")
pytest.importorskip(
    "onnxruntime", reason="the 'onnx' extra (onnxruntime) is not installed: pip install 'vptune[onnx]'"
)

import vptune
from tests.helpers import TINY, tiny_vit
from vptune import create_model
from vptune.errors import VptuneError
from vptune.export import OnnxMultiTask, export_onnx
from vptune.multitask import MultiTaskModel

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for tiny models


SPECS = {
    "shallow3": ("vpt-shallow", 3, {"num_tokens": 3}),
    "deep5": ("vpt-deep", 5, {"num_tokens": 5, "pool": "prompt_mean"}),
    "late2": ("vpt-deep", 2, {"num_tokens": 2, "deep_layers": -1, "pool": "image_mean"}),
    "lin": ("linear", 4, {}),
    "mlp": ("mlp-2", 3, {}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    backbone = tiny_vit()
    root = tmp_path_factory.mktemp("export")
    mt = MultiTaskModel(backbone)
    for name, (method, nc, opts) in SPECS.items():
        m = create_model(backbone, method, nc, **opts)
        with torch.no_grad():
            for _, p in m.trainable_parameters():
                p.add_(0.3 * torch.randn_like(p))
        m.save_pretrained(root / "tasks" / name)
        mt.add_task(name, root / "tasks" / name)
    manifest = export_onnx(mt, root / "onnx")
    return backbone, mt, root, manifest


def test_manifest_and_files(exported):
    _, _, root, _manifest = exported
    out = root / "onnx"
    assert (out / "backbone.onnx").is_file()
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["verification"]["max_abs_diff"] <= 1e-4
    assert set(on_disk["tasks"]) == set(SPECS)
    for t in on_disk["tasks"].values():
        assert (out / t["head"]).is_file() and (out / t["prompts"]).is_file()
    with np.load(out / on_disk["tasks"]["shallow3"]["prompts"]) as z:
        assert z["prompts"].shape == (2, 3, 32) and z["replace"].tolist() == [True, False]
    with np.load(out / on_disk["tasks"]["late2"]["prompts"]) as z:
        assert z["replace"].tolist() == [False, True]


def test_onnx_matches_each_tuned_model(exported):
    backbone, _, root, _ = exported
    runner = OnnxMultiTask(root / "onnx")
    names = ["lin", "deep5", "shallow3", "late2", "mlp", "deep5", "lin"]  # batch 7 (exported with 2)
    x = torch.randn(len(names), 3, 32, 32)
    got = runner.predict(x.numpy(), names)
    for b, name in enumerate(names):
        model = vptune.TunedModel.from_pretrained(root / "tasks" / name, backbone=backbone).eval()
        with torch.no_grad():
            ref = model(x[b : b + 1])[0].numpy()
        np.testing.assert_allclose(got[b], ref, atol=1e-4, rtol=0, err_msg=name)
    # a batch whose longest task has fewer prompt slots than at export time (dynamic slot axis)
    got = runner.predict(x[:3].numpy(), ["shallow3", "lin", "shallow3"])
    assert got[1].shape == (4,)


def test_weight_changing_task_is_refused(exported, tmp_path):
    backbone, _mt, _root, _ = exported
    create_model(backbone, "bias", 2).save_pretrained(tmp_path / "bias")
    mt2 = MultiTaskModel(backbone)
    mt2.add_task("bias", tmp_path / "bias")
    with pytest.raises(VptuneError, match="cannot use the shared prompt graph"):
        export_onnx(mt2, tmp_path / "out", verify=False)


def test_cli_export(exported, tmp_path):
    from safetensors.torch import save_file

    from vptune.cli import main

    backbone, _, root, _ = exported
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    opts = [f"--backbone-option={k}={v}" for k, v in TINY.items()]
    rc = main(
        [
            "export",
            "--format",
            "onnx",
            "--backbone",
            "vit_tiny_patch16_224",
            "--weights",
            str(weights),
            *opts,
            "--task",
            f"a={root / 'tasks' / 'deep5'}",
            "--task",
            str(root / "tasks" / "lin"),
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert rc == 0
    assert set(json.loads((tmp_path / "cli" / "manifest.json").read_text())["tasks"]) == {"a", "lin"}


@pytest.mark.parametrize("prompt_merge", ["carry", "drop"])
def test_swin_export_matches_each_tuned_model(tmp_path, prompt_merge):
    """Swin: stages of different widths (prompts padded to the widest), prompts through patch merging
    (carried or dropped); onnxruntime against each task's own TunedModel, 1e-4."""
    from vptune.backbones.swin import SwinConfig, SwinTransformer

    torch.manual_seed(0)
    bb = SwinTransformer(SwinConfig(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                    window_size=4, prompt_merge=prompt_merge)).eval()
    specs = {"deep": ("vpt-deep", 3, {"num_tokens": 3}), "shallow": ("vpt-shallow", 2, {"num_tokens": 2}),
             "late": ("vpt-deep", 4, {"num_tokens": 2, "deep_layers": -1}), "lin": ("linear", 3, {})}
    mt = MultiTaskModel(bb)
    models = {}
    for name, (method, nc, opts) in specs.items():
        models[name] = create_model(bb, method, nc, **opts)
        with torch.no_grad():
            for _, p in models[name].trainable_parameters():
                p.add_(0.3 * torch.randn_like(p))
        mt.add_model(name, models[name])
    manifest = export_onnx(mt, tmp_path / "onnx")
    assert manifest["block_dims"] == [16, 16, 32, 32] and manifest["dim"] == 32
    names = ["late", "deep", "lin", "shallow", "deep"]
    x = torch.randn(len(names), 3, 32, 32)
    got = OnnxMultiTask(tmp_path / "onnx").predict(x.numpy(), names)
    for b, name in enumerate(names):
        with torch.no_grad():
            ref = models[name].eval()(x[b : b + 1])[0].numpy()
        np.testing.assert_allclose(got[b], ref, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("method, reason", [("full", "trains backbone weights"),
                                            ("partial-1", "trains backbone weights"),
                                            ("lora", "changes the backbone's layers per task"),
                                            ("ssf", "changes the backbone's layers per task"),
                                            ("vpt-kv", "acts inside the blocks"), ("gated", "acts inside the blocks"),
                                            ("adapter", "acts inside the blocks")])
def test_methods_outside_the_prompt_graph_are_refused_with_reason(tmp_path, method, reason):
    backbone = tiny_vit()
    mt = MultiTaskModel(backbone)
    mt.add_model("t", create_model(backbone, method, 2))
    with pytest.raises(VptuneError, match=reason):
        export_onnx(mt, tmp_path / "out", verify=False)
