"""The training recipes (issue 12): vptune's default, ``recipe: reference``, per-group lrs, head norm,
precision auto and divergence as a result.

The reference numbers below are written down by hand from the reference code's definitions (REFERENCE.md,
"The reference code's exact training behaviour"), not computed with vptune's code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_vit as tiny_backbone
from vptune.data.transforms import Transform, tf_bilinear_resize
from vptune.engine.config import config_from_dict, load_config
from vptune.engine.evaluate import resolve_precision
from vptune.engine.optim import (
    ReferenceEpochSchedule,
    build_optimizer,
    build_scheduler,
    resolve_optimizer_name,
    scaled_lr,
)
from vptune.engine.recipes import REFERENCE_SEEDS
from vptune.errors import VptuneError
from vptune.model import TunedModel, create_model

# ------------------------------------------------------------------------------------------ presets

def test_reference_recipe_sets_the_reference_values_and_config_keys_win():
    ref = config_from_dict({"recipe": "reference"})
    assert (ref.optim.optimizer, ref.optim.lr_scaling, ref.optim.schedule) == ("paper", "linear", "epoch")
    assert ref.optim.warmup_start_factor == 0.0 and ref.optim.batch_size == 128
    assert (ref.method.head_init, ref.method.head_norm) == ("reference", "none")
    assert ref.data.normalize == "imagenet" and ref.data.antialias is False
    assert REFERENCE_SEEDS == (42, 44, 82, 100, 800)
    mine = load_config(None, ["recipe=reference", "optim.batch_size=64"])
    assert mine.optim.batch_size == 64 and mine.optim.schedule == "epoch"
    default = config_from_dict({})
    assert default.recipe == "default" and default.optim.schedule == "step" and default.optim.base_lr is None
    with pytest.raises(VptuneError, match="recipe.*default, reference"):
        config_from_dict({"recipe": "paperish"})


def test_optimizer_families_and_default_lrs():
    bb = tiny_backbone()
    default, paper = config_from_dict({}).optim, config_from_dict({"recipe": "reference"}).optim
    vpt, full, linear = (create_model(bb, m, 4) for m in ("vpt-deep", "full", "linear"))
    assert resolve_optimizer_name(default, vpt) == "adamw" and resolve_optimizer_name(paper, vpt) == "sgd"
    assert resolve_optimizer_name(default, full) == resolve_optimizer_name(paper, full) == "adamw"
    # no lr given: the method's own default for its optimiser (never the SGD default for AdamW)
    assert scaled_lr(default, full) == full.method.default_lr["adamw"] <= 1e-3
    assert scaled_lr(default, vpt) == vpt.method.default_lr["adamw"]
    assert scaled_lr(paper, linear) == linear.method.default_lr["sgd"]
    # an lr given: as is (lr_scaling none) or scaled by batch/256 (linear, the paper's rule)
    assert scaled_lr(config_from_dict({"optim": {"base_lr": 0.01, "batch_size": 32}}).optim, vpt) == 0.01
    assert scaled_lr(config_from_dict({"recipe": "reference", "optim": {"base_lr": 0.5}}).optim) == 0.25


def test_per_group_lrs_follow_the_methods_declared_groups():
    model = create_model(tiny_backbone(), "vpt-deep", 4, num_tokens=2)
    cfg = config_from_dict({"optim": {"base_lr": 0.01, "lr_scale": {"head": 0.5, "prompts": 2.0}}}).optim
    groups = build_optimizer(model, cfg).param_groups
    by_name = {n: g["lr"] for g in groups for n in g["names"]}
    assert by_name["method.prompts.0"] == by_name["method.prompts.1"] == pytest.approx(0.02)
    assert by_name["head.weight"] == by_name["head.bias"] == pytest.approx(0.005)
    opt = build_optimizer(model, cfg)
    build_scheduler(opt, cfg, steps_per_epoch=1)  # every group warms up from its own peak
    start = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert start["method.prompts.0"] == pytest.approx(0.02 * cfg.warmup_start_factor)
    assert start["head.weight"] == pytest.approx(0.005 * cfg.warmup_start_factor)
    bad = config_from_dict({"optim": {"lr_scale": {"backbone": 2.0}}}).optim
    with pytest.raises(VptuneError, match=r"unknown group.*backbone.*head, prompts, other"):
        build_optimizer(model, bad)


# ------------------------------------------------------------------------------------------ schedule

def test_reference_schedule_is_the_per_epoch_staircase_from_zero():
    """LambdaLR stepped per epoch: e/w during warmup (epoch 0 at lr 0), then 0.5 (1 + cos(pi (e-w)/(T-w)))."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = ReferenceEpochSchedule(opt, epochs=5, warmup_epochs=2, steps_per_epoch=3)
    lrs = []
    for _ in range(15):
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    # epoch:        0 (x3)      1 (x3)      2 (x3)   3: 0.5(1+cos(pi/3))  4: 0.5(1+cos(2pi/3))
    expected = [0.0] * 3 + [0.5] * 3 + [1.0] * 3 + [0.75] * 3 + [0.25] * 3
    assert lrs == pytest.approx(expected, abs=1e-12)
    # the paper's length: 100 epochs, 10 warmup -> the last epoch runs at 0.5 (1 + cos(pi 89/90)) = 3.0459e-4
    long = ReferenceEpochSchedule(torch.optim.SGD([param], lr=1.0), 100, 10, steps_per_epoch=1)
    assert long.lr_at(99) == pytest.approx(3.0459e-4, rel=1e-4) and long.lr_at(9) == pytest.approx(0.9)
    cfg = config_from_dict({"recipe": "reference", "optim": {"epochs": 5, "warmup_epochs": 2}}).optim
    built = build_scheduler(torch.optim.SGD([param], lr=1.0), cfg, steps_per_epoch=3)
    assert isinstance(built, ReferenceEpochSchedule) and built.lr_at(4) == pytest.approx(0.5)


def test_warmup_from_zero_only_with_the_reference_schedule():
    with pytest.raises(VptuneError, match="warmup_start_factor"):
        load_config(None, ["optim.warmup_start_factor=0"])
    assert load_config(None, ["optim.warmup_start_factor=0", "optim.schedule=epoch"]).optim.schedule == "epoch"


# ------------------------------------------------------------------------------------------ inputs

def test_tf_bilinear_resize_matches_hand_computed_values():
    """tf.image.resize bilinear: src = (dst + 0.5) * in / out - 0.5, two taps, no antialiasing."""
    x = torch.arange(16.0).view(1, 4, 4)
    assert torch.equal(tf_bilinear_resize(x, 2, 2), torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))
    row = tf_bilinear_resize(torch.arange(4.0).view(1, 1, 4), 1, 3)  # src 1/6, 3/2, 17/6
    assert row.flatten().tolist() == pytest.approx([1 / 6, 1.5, 17 / 6], abs=1e-6)
    # Pillow's antialiased bilinear averages over the whole footprint when shrinking: it differs
    pil = np.asarray(Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).resize(
        (2, 2), Image.Resampling.BILINEAR), dtype=np.float64)
    assert not np.allclose(pil, np.array([[2.5, 4.5], [10.5, 12.5]]) * 16, atol=1.0)


def test_reference_input_pipeline_numbers():
    """ImageNet mean/std with TF resizing: a 4x4 grey ramp to 2x2, channel 0: (v / 255 - 0.485) / 0.229."""
    ramp = (np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    img = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    t = Transform("vtab", train=False, size=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                  interpolation="tf_bilinear")
    out = t(img.resize((4, 4)))  # 4x4 -> 8x8 upsample: corners replicate the edge pixels
    assert out.shape == (3, 8, 8)
    assert float(out[0, 0, 0]) == pytest.approx((0 / 255 - 0.485) / 0.229, abs=1e-6)
    assert float(out[2, 7, 7]) == pytest.approx((240 / 255 - 0.406) / 0.225, abs=1e-6)
    # one interior sample: dst (1, 1) -> src (0.25, 0.25): 0.75^2 * 0 + 0.75 * 0.25 * (16 + 64) + 0.25^2 * 80
    v = 0.75 * 0.25 * (16 + 64) + 0.0625 * 80
    assert float(out[1, 1, 1]) == pytest.approx((v / 255 - 0.456) / 0.224, abs=1e-5)


def test_reference_preprocessing_travels_with_the_task(tmp_path):
    from vptune.engine.trainer import task_preprocessing

    prep = task_preprocessing(tiny_backbone(), None, normalize="imagenet", antialias=False)
    assert prep.mean == (0.485, 0.456, 0.406) and prep.std == (0.229, 0.224, 0.225)
    assert prep.interpolation == "tf_bilinear"


# ------------------------------------------------------------------------------------------ head

def test_batchnorm_head_round_trips_with_its_running_statistics(tmp_path):
    bb = tiny_backbone()
    model = create_model(bb, "vpt-deep", 4, num_tokens=2, head_norm="batchnorm")
    model.train()
    assert model.head.norm.training and model.head.norm.weight is None  # no affine parameters
    model(torch.randn(8, 3, 32, 32))  # updates the running statistics
    state = model.trained_state_dict()
    assert {"head.norm.running_mean", "head.norm.running_var", "head.fc.weight"} <= set(state)
    assert model.num_trainable_parameters() == 2 * 2 * 32 + 32 * 4 + 4  # the norm adds no parameters
    model.save_pretrained(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "task.json").read_text())["head_norm"] == "batchnorm"
    again = TunedModel.from_pretrained(tmp_path / "t", backbone=bb)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    assert torch.equal(again(x), model(x))


def test_reference_head_init():
    model = create_model(tiny_backbone(), "linear", 5, head_init="reference")
    assert torch.all(model.head.bias == -math.log(99.0))
    std = float(model.head.weight.detach().std())
    assert std == pytest.approx(math.sqrt(2.0 / 5), rel=0.3)  # kaiming normal, fan_out = 5 classes


# ------------------------------------------------------------------------------------------ precision

def test_precision_auto(monkeypatch):
    import importlib

    ev = importlib.import_module("vptune.engine.evaluate")

    monkeypatch.setattr(ev, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision(torch.device("cpu"), "auto") == "bf16"
    monkeypatch.setattr(ev, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision(torch.device("cpu"), "auto") == "fp32"
    assert resolve_precision(torch.device("cpu"), "fp32") == "fp32"
    assert config_from_dict({}).runtime.precision == "auto"


def test_cpu_bf16_detection_reads_the_cpu_flags():
    from vptune.engine.evaluate import cpu_has_native_bf16

    path = Path("/proc/cpuinfo")
    if not path.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = next((ln for ln in path.read_text().splitlines() if ln.startswith("flags")), "")
    assert cpu_has_native_bf16() == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


# ------------------------------------------------------------------------------------------ defaults learn

@pytest.mark.parametrize("method", ["linear", "full", "partial-1", "mlp-2", "sidetune", "bias", "adapter",
                                    "vpt-shallow", "vpt-deep"])
def test_every_method_learns_with_no_lr_given(method, tmp_path):
    """The default recipe with no optim.base_lr: the method's own default for its optimiser family."""
    from tests.test_engine import ColorTask
    from vptune.engine.trainer import run_training

    cfg = config_from_dict({"method": {"name": method}, "data": {"num_workers": 0},
                            "optim": {"epochs": 8, "warmup_epochs": 1, "batch_size": 8},
                            "runtime": {"progress": False, "precision": "fp32", "eval_every": 0},
                            "output": str(tmp_path / method)})
    assert cfg.optim.base_lr is None
    data = {"train": ColorTask(64, 1), "val": ColorTask(32, 2)}
    summary = run_training(cfg, datasets=data, backbone=tiny_backbone())
    losses = [json.loads(x)["train_loss"] for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "done" and losses[-1] < 0.9 * losses[0], losses


def test_task_with_an_unknown_head_norm_is_refused(tmp_path):
    bb = tiny_backbone()
    create_model(bb, "linear", 3).save_pretrained(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "task.json").read_text())
    meta["head_norm"] = "layernorm"
    (tmp_path / "t" / "task.json").write_text(json.dumps(meta))
    with pytest.raises(VptuneError, match="head_norm must be one of none, batchnorm"):
        TunedModel.from_pretrained(tmp_path / "t", backbone=bb)


def test_one_pass_linear_sweep_only_for_the_sgd_probe():
    """vptune's recipe trains the linear probe with AdamW, which the one-pass (SGD) sweep does not do."""
    from vptune.engine.features import one_pass_eligible

    assert "adamw" in one_pass_eligible(config_from_dict({"method": {"name": "linear"}}))
    sgd = config_from_dict({"method": {"name": "linear"}, "optim": {"optimizer": "paper"}})
    assert one_pass_eligible(sgd) is None
