"""The training engine: config, recipe, learning, resume, NaN handling, run folders, metrics."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY
from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.engine import (
    config_from_dict,
    config_to_dict,
    load_config,
    run_training,
)
from vptune.engine.checkpoint import load_checkpoint
from vptune.engine.evaluate import compute_metrics, evaluate
from vptune.engine.optim import build_optimizer, build_scheduler, no_decay_names, scaled_lr
from vptune.engine.trainer import Trainer
from vptune.errors import VptuneError
from vptune.model import create_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COLORS = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])


class ColorTask(torch.utils.data.Dataset):
    """4 classes of 32x32 noisy images that differ by colour."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = [i % 4 for i in range(n)]
        self.x = COLORS[self.labels][:, :, None, None] * 0.5 + 0.3 * torch.randn(n, 3, 32, 32, generator=g)
        self.num_classes = 4
        self.class_names = ["red", "green", "blue", "yellow"]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], self.labels[i]


class Poisoned(ColorTask):
    """Returns NaN images once ``clean`` items have been served (to make the loss NaN mid-run)."""

    def __init__(self, n: int, seed: int, clean: int) -> None:
        super().__init__(n, seed)
        self.clean, self.served = clean, 0

    def __getitem__(self, i: int):
        self.served += 1
        x, y = super().__getitem__(i)
        return (x * float("nan") if self.served > self.clean else x), y


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for tiny models


def tiny_backbone() -> VisionTransformer:
    torch.manual_seed(123)
    return VisionTransformer(ViTConfig(**TINY))


def splits(n_train: int = 64) -> dict:
    return {"train": ColorTask(n_train, 1), "val": ColorTask(32, 2), "test": ColorTask(32, 3)}


def tiny_cfg(out: Path, **sections):
    d = {"method": {"name": "vpt-deep", "options": {"num_tokens": 2}},
         "optim": {"epochs": 4, "warmup_epochs": 1, "batch_size": 16, "base_lr": 2.5, "optimizer": "paper",
                   "lr_scaling": "linear"},
         "data": {"num_workers": 0, "val_split": "val200"}, "runtime": {"progress": False, "precision": "fp32"},
         "output": str(out)}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return config_from_dict(d)


# ------------------------------------------------------------------------------------------ config

def test_config_yaml_overrides_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: vpt-shallow\n  options: {num_tokens: 5}\noptim:\n  epochs: 3\n")
    cfg = load_config(path, ["optim.base_lr=0.5", "optim.weight_decay=1e-3", "method.options.dropout=0.1",
                             "data.val_split=null", "runtime.progress=false", "backbone.config.depth=2"])
    assert cfg.method.name == "vpt-shallow" and cfg.method.options == {"num_tokens": 5, "dropout": 0.1}
    assert cfg.optim.epochs == 3 and cfg.optim.base_lr == 0.5 and cfg.optim.weight_decay == 1e-3
    assert cfg.data.val_split is None and cfg.runtime.progress is False
    assert cfg.backbone.config == {"depth": 2}
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert load_config(None).optim.momentum == 0.9


@pytest.mark.parametrize("override, words", [
    ("optim.lr=0.5", ["optim.lr", "base_lr"]),
    ("optimm.base_lr=1", ["optimm", "backbone", "runtime"]),
    ("runtime.precison=bf16", ["precison", "precision"]),
    ("optim.epochs=ten", ["optim.epochs", "int"]),
    ("optim.optimizer=lion", ["lion", "sgd", "adamw"]),
    ("runtime.precision=fp8", ["fp8", "bf16"]),
    ("optim.warmup_start_factor=0", ["warmup_start_factor"]),
])
def test_bad_config_is_refused_with_valid_choices(override, words):
    with pytest.raises(VptuneError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_example_configs_load_and_name_valid_methods():
    from vptune.engine.trainer import check_method

    files = sorted(CONFIGS.glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        check_method(load_config(f))


def test_unknown_method_or_option_refused_before_any_work(tmp_path):
    with pytest.raises(VptuneError, match="valid choices: .*vpt-deep"):
        run_training(tiny_cfg(tmp_path / "a", method={"name": "vpt-deeper"}))
    with pytest.raises(VptuneError, match="valid options: .*num_tokens"):
        run_training(tiny_cfg(tmp_path / "b", method={"options": {"num_token": 3}}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------ recipe

def test_optimizer_recipe_per_method():
    bb = tiny_backbone()
    cfg = tiny_cfg(Path("unused"))
    vpt = create_model(bb, "vpt-deep", 4, num_tokens=2)
    opt = build_optimizer(vpt, cfg.optim)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5 * 16 / 256) == scaled_lr(cfg.optim)
    for method in ("full", "partial-1", "bias", "adapter"):
        assert isinstance(build_optimizer(create_model(bb, method, 4), cfg.optim), torch.optim.AdamW), method
    for method in ("linear", "mlp-2", "vpt-shallow"):
        assert isinstance(build_optimizer(create_model(bb, method, 4), cfg.optim), torch.optim.SGD), method
    forced = config_from_dict({"optim": {"optimizer": "adamw"}}).optim
    assert isinstance(build_optimizer(vpt, forced), torch.optim.AdamW)


def test_weight_decay_on_weights_and_prompts_only():
    model = create_model(tiny_backbone(), "full", 4)
    skip = no_decay_names(model)
    assert "backbone.blocks.0.attn.qkv.bias" in skip and "backbone.blocks.0.norm1.weight" in skip
    assert "head.bias" in skip and "backbone.blocks.0.attn.qkv.weight" not in skip
    vpt = create_model(tiny_backbone(), "vpt-deep", 4, num_tokens=2)
    groups = build_optimizer(vpt, tiny_cfg(Path("x")).optim).param_groups
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"method.prompts.0", "method.prompts.1", "head.weight"} <= decayed and plain == {"head.bias"}
    mlp = create_model(tiny_backbone(), "mlp-2", 4)
    bn = [n for n, m in mlp.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bn and all(f"{n}.weight" in no_decay_names(mlp) for n in bn)


def test_first_step_lr_is_not_zero_and_schedule_is_warmup_cosine():
    model = create_model(tiny_backbone(), "linear", 4)
    optim = tiny_cfg(Path("x"), optim={"epochs": 10, "warmup_epochs": 2, "min_lr": 1e-4}).optim
    opt = build_optimizer(model, optim)
    sched = build_scheduler(opt, optim, steps_per_epoch=5)
    peak = scaled_lr(optim)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == pytest.approx(peak * 0.01) and lrs[0] > 0
    assert all(a < b for a, b in itertools.pairwise(lrs[:11]))  # linear warmup, per iteration
    assert lrs[10] == pytest.approx(peak)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # cosine decay
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # reaches min_lr at the end


def test_frozen_parameters_get_no_optimizer_state(tmp_path):
    model = create_model(tiny_backbone(), "vpt-deep", 4, num_tokens=2)
    trainer = Trainer(tiny_cfg(tmp_path), model, splits(32), torch.device("cpu"), tmp_path)
    assert trainer.train_epoch(1) is not None
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    with_state = {id(p) for p in trainer.optimizer.state}
    trainable = {id(p) for _, p in model.trainable_parameters()}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen and in_optimizer == trainable and with_state == trainable
    assert not (frozen & in_optimizer) and all(p.grad is None for p in model.backbone.parameters())


# ------------------------------------------------------------------------------------------ training

def test_tiny_model_learns_and_writes_a_complete_run(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, optim={"epochs": 5, "grad_clip": 5.0})
    summary = run_training(cfg, datasets=splits(96), backbone=tiny_backbone())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["lr"] > 0 and lines[-1]["train_loss"] < 0.5 * lines[0]["train_loss"]
    assert summary["status"] == "done" and summary["epochs"] == 5
    assert summary["val"]["top1"] >= 75 and summary["test"]["top1"] >= 75  # chance: 25
    assert set(summary["test"]) >= {"top1", "top5", "per_class", "confusion", "loss", "n"}
    assert len(summary["test"]["confusion"]) == 4 and summary["test"]["n"] == 32
    assert summary["stored_bytes"] == (out / "task" / "weights.safetensors").stat().st_size
    assert summary["trainable_parameters"] == 2 * 2 * 32 + 32 * 4 + 4
    assert summary["method"] == "vpt-deep" and summary["optimizer"] == "sgd"
    from vptune.engine.evaluate import cpu_model

    assert summary["host"] == {"cpu": cpu_model(), "threads": torch.get_num_threads()}  # where it ran
    for name in ("config.yaml", "checkpoint.pt", "task/task.json", "result.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.*"))
    assert json.loads((out / "result.json").read_text())["test"]["top1"] == summary["test"]["top1"]
    assert load_config(out / "config.yaml") == cfg
    task = json.loads((out / "task" / "task.json").read_text())
    assert task["training"]["stored_bytes"] == summary["stored_bytes"] and task["label_names"][0] == "red"
    # the saved task reproduces the run's test metrics on the same backbone
    from vptune import TunedModel

    again = evaluate(TunedModel.from_pretrained(out / "task", tiny_backbone()), ColorTask(32, 3))
    assert again["top1"] == pytest.approx(summary["test"]["top1"])


def test_interrupted_then_resumed_run_matches_uninterrupted(tmp_path, caplog):
    opts = {"method": {"options": {"num_tokens": 2, "dropout": 0.1}}}  # dropout: RNG state must resume too
    full = run_training(tiny_cfg(tmp_path / "a", **opts), datasets=splits(48), backbone=tiny_backbone())
    steps_per_epoch = 3
    cut = tiny_cfg(tmp_path / "b", runtime={"max_steps": 2 * steps_per_epoch + 1}, **opts)
    stopped = run_training(cut, datasets=splits(48), backbone=tiny_backbone())
    assert stopped["status"] == "stopped"
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2
    resumed = run_training(tiny_cfg(tmp_path / "b", **opts), resume=True, datasets=splits(48),
                           backbone=tiny_backbone())
    assert "changed config: runtime.max_steps" in caplog.text
    assert resumed["status"] == "done" and resumed["epochs"] == 4
    a = load_file(tmp_path / "a/task/weights.safetensors")
    b = load_file(tmp_path / "b/task/weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert resumed["test"]["top1"] == full["test"]["top1"]
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_nan_loss_stops_cleanly_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    data = {"train": Poisoned(32, 1, clean=64), "val": ColorTask(16, 2)}  # 2 clean epochs of 32 images
    summary = run_training(tiny_cfg(out), datasets=data, backbone=tiny_backbone())
    assert summary["status"] == "diverged" and "loss became nan at epoch 3" in summary["diverged"]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2  # the last good checkpoint is kept
    assert json.loads((out / "result.json").read_text())["status"] == "diverged"
    assert not (out / "task").exists()  # nothing is saved or evaluated for a diverged run


def test_existing_run_folder_rules(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, optim={"epochs": 1})
    first = run_training(cfg, datasets=splits(32), backbone=tiny_backbone())
    # same config, finished: the stored result comes back without training
    again = run_training(tiny_cfg(out, optim={"epochs": 1}, runtime={"progress": True}))
    assert again == json.loads((out / "result.json").read_text()) and again["wall_s"] == first["wall_s"]
    with pytest.raises(VptuneError, match="different config .*optim.base_lr.*--resume.*--overwrite"):
        run_training(tiny_cfg(out, optim={"epochs": 1, "base_lr": 1.0}), datasets=splits(32))
    over = run_training(tiny_cfg(out, optim={"epochs": 1, "base_lr": 1.0}), overwrite=True,
                        datasets=splits(32), backbone=tiny_backbone())
    assert over["config"]["optim"]["base_lr"] == 1.0
    # an unfinished run of the same config needs --resume or --overwrite
    (out / "result.json").unlink()
    with pytest.raises(VptuneError, match="unfinished run"):
        run_training(tiny_cfg(out, optim={"epochs": 1, "base_lr": 1.0}), datasets=splits(32))


def test_precision_rules_on_cpu(tmp_path):
    with pytest.raises(VptuneError, match="fp16 needs a CUDA device"):
        run_training(tiny_cfg(tmp_path / "a", runtime={"precision": "fp16", "device": "cpu"}),
                     datasets=splits(16), backbone=tiny_backbone())
    cfg = tiny_cfg(tmp_path / "b", optim={"epochs": 1, "label_smoothing": 0.1},
                   method={"name": "linear", "options": {}},
                   runtime={"precision": "bf16", "device": "cpu", "gradient_checkpointing": True})
    s = run_training(cfg, datasets=splits(16), backbone=tiny_backbone())
    assert s["status"] == "done" and s["precision"] == "bf16"


# ------------------------------------------------------------------------------------------ metrics

def test_metrics_from_confusion_and_evaluate():
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    m = compute_metrics(conf, top5_hits=6, loss_sum=3.0, n=6)
    assert m["top1"] == pytest.approx(500 / 6) and m["top5"] == 100.0 and m["loss"] == 0.5
    assert m["per_class"] == [75.0, 100.0, None] and m["confusion"] == conf.tolist()

    class Fixed(torch.nn.Module):  # predicts class (label + shift) % 4
        num_classes = 4

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 4).float()

    xs = torch.zeros(8, 3, 2, 2)
    xs[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])
    ys = [0, 1, 2, 3, 1, 1, 2, 3]
    m = evaluate(Fixed(), list(zip(xs, ys)), device="cpu", batch_size=3)
    assert m["top1"] == 75.0 and m["top5"] == 100.0 and m["n"] == 8
    assert m["confusion"][1] == [1, 2, 0, 0] and m["per_class"] == [100.0, 66.6667, 100.0, 50.0]
