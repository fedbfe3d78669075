"""Mixed batches beyond prompts (issue 14 item 9): SSF, LoRA and DoRA tasks share one backbone pass with
prompt tasks, and every sample's logits equal its task run alone (1e-5)."""

from __future__ import annotations

import pytest
import torch

import vptune
from tests.peft_helpers import backbone, images, perturb
from vptune.errors import VptuneError
from vptune.multitask import MultiTaskModel

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = {  # name -> (method, classes, options)
    "lora2": ("lora", 3, {"r": 2}),
    "lora4_mlp": ("lora", 4, {"r": 4, "alpha": 2.0, "targets": [r"^attn\.", r"^mlp\."]}),
    "dora": ("dora", 2, {"r": 3, "targets": [r"^attn\.proj$", r"^mlp\.fc1$"]}),
    "ssf": ("ssf", 5, {}),
    "deep": ("vpt-deep", 3, {"num_tokens": 3}),
    "shallow": ("vpt-shallow", 2, {"num_tokens": 5}),
    "linear": ("linear", 3, {}),
    "adapter": ("adapter", 2, {"reduction": 4}),  # own pass, in the same call
}


def _mt(arch: str):
    bb = backbone(arch)
    mt = MultiTaskModel(bb, pad_tolerance=None)
    for j, (name, (method, nc, opts)) in enumerate(TASKS.items()):
        model = vptune.create_model(bb, method, nc, **opts)
        perturb(model, 0.3, seed=j)
        mt.add_model(name, model)
    return bb, mt


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_every_sample_equals_its_task_alone(arch):
    bb, mt = _mt(arch)
    names = list(TASKS) * 2
    x = images(arch, len(names))
    passes = []
    run = mt._shared_pass
    mt._shared_pass = lambda xx, entries: passes.append(len(entries)) or run(xx, entries)
    out = mt(x, names)
    assert passes == [len(names) - 2]  # one shared pass for all but the two adapter samples
    for b, name in enumerate(names):
        with torch.no_grad():
            alone = mt.tasks[name].model(x[b:b + 1])[0]
        torch.testing.assert_close(out[b], alone, rtol=1e-5, atol=1e-5, msg=f"sample {b} task {name}")
    for name in ("lora2", "lora4_mlp", "dora", "ssf"):
        assert mt.tasks[name].shared and mt.tasks[name].taps
    # the per-sample taps matter: a LoRA sample differs from the plain backbone's logits
    with torch.no_grad():
        plain = mt.tasks["lora2"].model.forward_head(bb(x[:1]))[0]
    assert (out[0] - plain).abs().max() > 1e-3


def test_tap_tasks_only_and_one_task_alone():
    _, mt = _mt("vit")
    names = ["ssf", "lora2", "dora", "lora2", "ssf"]
    x = images("vit", len(names))
    out = mt(x, names)
    for b, name in enumerate(names):
        with torch.no_grad():
            torch.testing.assert_close(out[b], mt.tasks[name].model(x[b:b + 1])[0], rtol=1e-5, atol=1e-5)
    single = mt(x[:2], ["lora4_mlp", "lora4_mlp"])
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(single), mt.tasks["lora4_mlp"].model(x[:2]), rtol=1e-5, atol=1e-5)


def test_onnx_export_refuses_tap_tasks(tmp_path):
    pytest.importorskip("onnx")
    from vptune.export import export_onnx

    _, mt = _mt("vit")
    with pytest.raises(VptuneError, match="lora2"):
        export_onnx(mt, tmp_path, tasks=["deep", "lora2"], verify=False)
