"""`vptune sweep`: spec validation, val-only selection and its tie-break, idempotence, the cost estimate,
and the one-pass linear sweep against separate runs (a plain reference and the real trainer)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.engine import features as F_
from vptune.engine import sweep as S
from vptune.engine.config import config_to_dict
from vptune.errors import VptuneError

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
SIZES = {"train800": 24, "val200": 12, "test": 15}


# ------------------------------------------------------------------------------------------------------
# fixtures: a tiny VTAB-format task and tiny ViT weights
# ------------------------------------------------------------------------------------------------------


def make_task(root: Path, name: str = "toy", classes: int = 3, sizes: dict[str, int] = SIZES) -> Path:
    """A VTAB-1k style folder: images/<split>/*.png, train800/val200/train800val200/test lists."""
    folder = root / name
    rng = np.random.default_rng(0)
    lists: dict[str, list[str]] = {}
    for split, n in sizes.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            y = i % classes
            arr = rng.integers(0, 60, (16, 16, 3)) + np.array([80 * y, 200 - 80 * y, 120])[None, None, :] * 0.7
            rel = f"images/{split}/{i}.png"
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / rel)
            lines.append(f"{rel} {y}")
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_task(root, "toy")
    make_task(root, "toy2", classes=2)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(**TINY))
    save_file({k: t.contiguous() for k, t in vit.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_test", **TINY}))
    return folder


def base_config(weights: Path | str = "w", **optim: Any) -> dict[str, Any]:
    return {"backbone": {"weights": str(weights)},
            "optim": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, **optim},
            "runtime": {"device": "cpu", "progress": False, "eval_every": 0},
            "data": {"num_workers": 0}}


def sweep_dict(tmp: Path, data_root: Path, weights: Path | str = "w", **extra: Any) -> dict[str, Any]:
    d = {"base": base_config(weights), "output": str(tmp / "out"),
         "tasks": {"root": str(data_root), "names": ["toy"]},
         "methods": [{"name": "vpt-deep", "options": {"num_tokens": 2}}],
         "grid": {"lr": [0.5, 0.1], "wd": [0.0]}, "seeds": 2}
    d.update(extra)
    return d


def fake_env(trainer: FakeTrainer) -> S.Env:
    return S.Env(train_fn=trainer, backbone="no backbone needed by the fake trainer")


class FakeTrainer:
    """Stands in for run_training: writes a result.json whose val and test disagree, counts calls."""

    def __init__(self, val: dict[tuple, float], test: dict[tuple, float]) -> None:
        self.val, self.test, self.calls = val, test, []

    def __call__(self, cfg: Any, *, resume: bool = False, overwrite: bool = False, backbone: Any = None) -> dict:
        self.calls.append((cfg.output, resume, overwrite))
        key = (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.method.options.get("num_tokens"))
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        result = {"status": "done", "epochs": cfg.optim.epochs, "config": config_to_dict(cfg), "wall_s": 2.0,
                  "data": {"n_train": 24, "format": "vtab"}, "trainable_parameters": 100,
                  "backbone_parameters": 1000, "stored_bytes": 400, "method": cfg.method.name,
                  "val": {"top1": self.val[key]} if cfg.data.val_split else None,
                  "test": {"top1": self.test.get(key, 50.0) + cfg.runtime.seed} if cfg.data.test_split else None}
        (out / "result.json").write_text(json.dumps(result))
        return result


# ------------------------------------------------------------------------------------------------------
# spec validation
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch, needle", [
    ({"epochz": 3}, "valid keys: name, base"),
    ({"methods": ["vpt-deeep"]}, "valid choices:"),
    ({"methods": [{"name": "vpt-deep", "options": {"num_tokenz": 3}}]}, "valid keys: num_tokens"),
    ({"methods": [{"name": "linear", "grid": {"num_tokens": [1, 5]}}]}, "vpt-deep"),
    ({"methods": [{"name": "linear", "grid": {"num_tokens": [1]}}]}, ("not a sweep axis of method 'linear' (its grid "
                                                                      "axes: lr, wd, fraction)")),
    ({"methods": [{"name": "vpt-deep", "grid": {"dropout": [0.1]}}]}, "unknown key(s) dropout in methods[0].grid"),
    ({"methods": [{"name": "vpt-deep", "grid": {"num_tokens": [-1]}}]}, "num_tokens must be in 0..10000"),
    ({"methods": [{"name": "linear", "color": 1}]}, "valid keys: name, label, options, grid, config"),
    ({"grid": {"lr": [0.1], "momentum": [0.9]}}, "unknown key(s) momentum in grid; valid keys: lr, wd"),
    ({"grid": {"lr": [-1]}}, "> 0"),
    ({"grid": {"fraction": [1.5]}}, "in (0, 1]"),
    ({"base": {"optim": {"lr": 0.1}}}, "valid keys"),
    ({"methods": [{"name": "linear", "config": {"optim": {"wd": 0}}}]}, "valid keys"),
    ({"splits": {"train": "x"}}, "valid keys: fit, select, final, test"),
    ({"tasks": [{"path": "x"}]}, "valid keys: name, root, data"),
    ({"tasks": {"root": "x", "names": ["a"], "data": {"formatt": "vtab"}}}, "valid keys"),
    ({"backend": "slurm"}, "valid choices: local"),
    ({"seeds": [1, 1]}, "duplicate seed"),
    ({"linear_one_pass": "maybe"}, "valid choices"),
])
def test_sweep_spec_refuses_unknowns_with_valid_choices(tmp_path: Path, data_root: Path, patch: dict, needle: str) -> None:
    d = sweep_dict(tmp_path, data_root)
    d.update(patch)
    with pytest.raises(VptuneError, match=None) as e:
        S.parse_sweep(d)
    assert needle in str(e.value), str(e.value)


def test_sweep_spec_defaults_to_the_paper_grids(tmp_path: Path, data_root: Path) -> None:
    d = sweep_dict(tmp_path, data_root, methods=["vpt-deep", "full", {"name": "linear", "label": "lin"}])
    d.pop("grid")
    d.pop("seeds")
    default = S.parse_sweep(d)  # vptune's recipe: each method's grid for its optimiser
    dv, df, dl = default.methods
    assert dv.grid.lr == [3e-3, 1e-2] and df.grid.lr == [3e-5, 1e-4, 3e-4] and dl.grid.lr == [3e-3, 1e-2]
    assert dv.grid.wd == [0.0001, 0.01]
    d["base"]["recipe"] = "reference"  # the paper's grids
    spec = S.parse_sweep(d)
    vpt, full, lin = spec.methods
    assert vpt.grid.lr == list(S.PAPER_SGD_LRS) and full.grid.lr == list(S.PAPER_ADAMW_LRS)
    assert lin.label == "lin" and vpt.grid.wd == [0.01, 0.001, 0.0001, 0.0] and vpt.grid.fraction == [1.0]
    assert spec.seeds == [0, 1, 2] and spec.splits.fit == "train800" and spec.splits.select == "val200"
    assert len(S.plan_grid(spec)) == 40 + 16 + 40


def test_cli_user_error_prints_one_line(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    from vptune.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(sweep_dict(tmp_path, data_root, methods=["nope"])))
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unknown method 'nope'" in err and len(err.strip().splitlines()) == 1


def test_backend_registry_is_a_seam(tmp_path: Path, data_root: Path) -> None:
    seen: list[int] = []

    class Recording(S.LocalBackend):
        def run(self, jobs: list[S.Job]) -> None:
            seen.append(len(jobs))
            super().run(jobs)

    S.register_backend("recording", Recording)
    try:
        d = sweep_dict(tmp_path, data_root, backend="recording", seeds=1)
        trainer = FakeTrainer({(0.5, 0.0, 2): 1.0, (0.1, 0.0, 2): 2.0}, {})
        S.run_sweep(S.parse_sweep(d), env=fake_env(trainer), log=lambda m: None)
        assert seen == [2, 1] and len(trainer.calls) == 3
    finally:
        S.BACKENDS.pop("recording")
    with pytest.raises(VptuneError, match="valid choices: local"):
        S.backend_factory("nonexistent")


def test_folder_names() -> None:
    assert S.grid_folder(50, 0.0001) == "lr50_wd0.0001"
    assert S.grid_folder(2.5, 0.0, {"p": 10}, 0.5) == "lr2.5_wd0_p10_frac0.5"
    assert S.grid_folder(1e-5, 0.01, None, 1.0) == "lr1e-05_wd0.01"
    assert S.final_folder(3) == "seed3" and S.final_folder(0, 0.1) == "seed0_frac0.1"


# ------------------------------------------------------------------------------------------------------
# selection: val only, documented tie-break
# ------------------------------------------------------------------------------------------------------


def test_tie_break_smaller_lr_then_wd_then_prompt_length() -> None:
    G = S.GridScore
    def p(n: int) -> tuple:
        return (("num_tokens", n),)

    a = G(0.5, 0.0, p(10), 1.0, 80.0)
    assert S.select_best([a, G(0.1, 0.01, p(50), 1.0, 80.0), G(5.0, 0.0, p(1), 1.0, 79.5)]).lr == 0.1
    assert S.select_best([G(0.1, 0.01, p(1), 1.0, 80.0), G(0.1, 0.001, p(50), 1.0, 80.0)]).wd == 0.001
    assert S.select_best([G(0.1, 0.0, p(50), 1.0, 80.0), G(0.1, 0.0, p(5), 1.0, 80.0)]).axis("num_tokens") == 5
    # equal to 6 decimals is a tie (float noise from different summation orders); beyond is not
    assert S.select_best([G(0.5, 0.0, (), 1.0, 80.0000001), G(0.1, 0.0, (), 1.0, 80.0)]).lr == 0.1
    assert S.select_best([G(0.5, 0.0, (), 1.0, 80.001), G(0.1, 0.0, (), 1.0, 80.0)]).lr == 0.5
    with pytest.raises(VptuneError):
        S.select_best([])


def test_selection_uses_val_only_and_is_idempotent(tmp_path: Path, data_root: Path) -> None:
    d = sweep_dict(tmp_path, data_root, grid={"lr": [0.5, 0.1, 2.5], "wd": [0.0, 0.01], "num_tokens": [1, 4]})
    spec = S.parse_sweep(d)
    # val: (0.5, 0.01, p=1) and (2.5, 0, p=4) and (0.5, 0.0, p=4) tie at 70 -> smaller lr 0.5, then smaller wd 0.0;
    # test would pick lr 0.1 (90).
    val = {(lr, wd, p): 60.0 for lr in (0.5, 0.1, 2.5) for wd in (0.0, 0.01) for p in (1, 4)}
    val.update({(0.5, 0.01, 1): 70.0, (2.5, 0.0, 4): 70.0, (0.5, 0.0, 4): 70.0, (0.1, 0.0, 1): 10.0})
    test = {(0.1, 0.0, 1): 90.0}
    trainer = FakeTrainer(val, test)
    logs: list[str] = []
    out = S.run_sweep(spec, env=fake_env(trainer), log=logs.append)
    assert len(trainer.calls) == 12 + 2 and all(not r and not o for _, r, o in trainer.calls)
    choice = out.choices[("toy", "vpt-deep", 1.0)]
    assert (choice.lr, choice.wd, choice.axis("num_tokens"), choice.val_top1) == (0.5, 0.0, 4, 70.0)
    sel = json.loads((tmp_path / "out/toy/vpt-deep/selection.json").read_text())
    assert sel["choice"]["lr"] == 0.5 and sel["choice"]["num_tokens"] == 4 and len(sel["grid"]) == 12
    assert sel["selected_on"] == "val200" and "smaller lr" in sel["rule"]
    assert [g["val_top1"] for g in sel["grid"][:3]] == [70.0, 70.0, 70.0]
    for seed in (0, 1):
        res = json.loads((tmp_path / f"out/toy/vpt-deep/final/seed{seed}/result.json").read_text())
        c = res["config"]
        assert c["optim"]["base_lr"] == 0.5 and c["method"]["options"]["num_tokens"] == 4
        assert c["data"]["train_split"] == "train800val200" and c["data"]["val_split"] is None
        assert c["data"]["test_split"] == "test" and c["runtime"]["seed"] == seed
    grid_cfg = json.loads((tmp_path / "out/toy/vpt-deep/grid/lr0.5_wd0_p4/result.json").read_text())["config"]
    assert grid_cfg["data"]["test_split"] is None and grid_cfg["data"]["train_split"] == "train800"
    assert "0 already done, 14 to train" in logs[0]
    assert "cost: 14 run(s) x 1 epoch(s) x 24-36 training images = 360 image-epochs" in logs[0]
    # idempotence: a second sweep trains nothing and now estimates time from the finished runs
    trainer2, logs2 = FakeTrainer(val, test), []
    out2 = S.run_sweep(S.parse_sweep(d), env=fake_env(trainer2), log=logs2.append)
    assert trainer2.calls == [] and out2.trained == [] and "14 already done, 0 to train" in logs2[0]
    assert "estimated time: 0.0 min" in logs2[0]


def test_stale_and_partial_runs(tmp_path: Path, data_root: Path) -> None:
    d = sweep_dict(tmp_path, data_root, grid={"lr": [0.5], "wd": [0.0]}, seeds=1)
    val, test = {(0.5, 0.0, None): 50.0, (0.5, 0.0, 2): 50.0}, {}
    S.run_sweep(S.parse_sweep(d), env=fake_env(FakeTrainer(val, test)), log=lambda m: None)
    # a changed base config makes the finished runs stale: refused unless overwrite_stale
    d2 = {**d, "base": {**d["base"], "optim": {**d["base"]["optim"], "momentum": 0.8}}}
    with pytest.raises(VptuneError, match="optim.momentum"):
        S.run_sweep(S.parse_sweep(d2), env=fake_env(FakeTrainer(val, test)), log=lambda m: None)
    t = FakeTrainer(val, test)
    S.run_sweep(S.parse_sweep(d2), env=fake_env(t), overwrite_stale=True, log=lambda m: None)
    assert [o for _, _, o in t.calls] == [True, True]
    # an interrupted run of the same config (config.yaml, no result.json) is resumed
    folder = tmp_path / "out/toy/vpt-deep/final/seed0"
    cfg = json.loads((folder / "result.json").read_text())["config"]
    (folder / "result.json").unlink()
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    t = FakeTrainer(val, test)
    S.run_sweep(S.parse_sweep(d2), env=fake_env(t), log=lambda m: None)
    assert t.calls == [(str(folder), True, False)]


def test_fraction_axis_selects_per_fraction(tmp_path: Path, data_root: Path) -> None:
    d = sweep_dict(tmp_path, data_root, grid={"lr": [0.5, 0.1], "wd": [0.0], "fraction": [1.0, 0.5]}, seeds=1)
    val = {(0.5, 0.0, 2): 40.0, (0.1, 0.0, 2): 40.0}
    trainer = FakeTrainer(val, {})
    out = S.run_sweep(S.parse_sweep(d), env=fake_env(trainer), log=lambda m: None)
    assert {k[2] for k in out.choices} == {1.0, 0.5}
    names = sorted(p.name for p in (tmp_path / "out/toy/vpt-deep/grid").iterdir())
    assert names == ["lr0.1_wd0", "lr0.1_wd0_frac0.5", "lr0.5_wd0", "lr0.5_wd0_frac0.5"]
    assert (tmp_path / "out/toy/vpt-deep/final/seed0_frac0.5/result.json").is_file()
    sel = json.loads((tmp_path / "out/toy/vpt-deep/selection.json").read_text())
    assert sel["choice"] is None and [c["fraction"] for c in sel["choices"]] == [1.0, 0.5]


# ------------------------------------------------------------------------------------------------------
# the one-pass linear sweep
# ------------------------------------------------------------------------------------------------------


def test_epoch_order_is_the_trainers_loader_order() -> None:
    from vptune.engine.evaluate import make_loader

    for n, seed, epoch in ((10, 0, 1), (37, 3, 5)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = make_loader(list(range(n)), n, shuffle=True, generator=gen)
        assert next(iter(loader)).tolist() == F_.epoch_order(n, seed, epoch).tolist()


def reference_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, head: F_.HeadSpec,
                   r: F_.HeadRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """A separate run, written out: nn.Linear, torch.optim.SGD (momentum, wd on the weight only),
    lr = base_lr * bs / 256, warmup from lr * warmup_start_factor then cosine, per iteration, the trainer's
    DataLoader order."""
    from vptune.engine.evaluate import make_loader
    from vptune.methods.base import linear_head

    torch.manual_seed(head.seed)
    lin = linear_head(x.shape[1], num_classes)
    peak = head.base_lr * r.batch_size / 256
    opt = torch.optim.SGD([{"params": [lin.weight], "weight_decay": head.weight_decay},
                           {"params": [lin.bias], "weight_decay": 0.0}], lr=peak, momentum=r.momentum)
    n = x.shape[0]
    drop = n > r.batch_size and n % r.batch_size == 1
    steps = n // r.batch_size if drop else math.ceil(n / r.batch_size)
    total, warm = steps * r.epochs, r.warmup_epochs * steps
    step = 0
    data = list(zip(x, y))
    for epoch in range(1, r.epochs + 1):
        gen = torch.Generator().manual_seed(head.seed * 1_000_003 + epoch)
        for xb, yb in make_loader(data, r.batch_size, shuffle=True, generator=gen, drop_last=drop):
            if step < warm:
                lr = peak * (r.warmup_start_factor + (1 - r.warmup_start_factor) * step / warm)
            else:
                lr = r.min_lr + (peak - r.min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = torch.nn.functional.cross_entropy(lin(xb), yb, label_smoothing=r.label_smoothing)
            opt.zero_grad()
            loss.backward()
            if r.grad_clip:
                torch.nn.utils.clip_grad_norm_(lin.parameters(), r.grad_clip)
            opt.step()
            step += 1
    return lin.weight.detach(), lin.bias.detach()


@pytest.mark.parametrize("recipe", [
    F_.HeadRecipe(batch_size=16, epochs=3, warmup_epochs=1, warmup_start_factor=0.01),
    F_.HeadRecipe(batch_size=16, epochs=3, warmup_epochs=1, min_lr=1e-3, label_smoothing=0.1, grad_clip=0.5),
])
def test_one_pass_heads_equal_separate_runs(recipe: F_.HeadRecipe) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(49, 12, generator=g), torch.randint(0, 5, (49,), generator=g)  # 49 % 16 == 1: drop_last
    heads = [F_.HeadSpec(5.0, 0.01, 0), F_.HeadSpec(0.5, 0.0, 0), F_.HeadSpec(0.05, 0.01, 0),
             F_.HeadSpec(5.0, 0.0, 7), F_.HeadSpec(0.5, 0.01, 7)]  # two seeds: two minibatch orders
    got = F_.train_linear_heads(x, y, 5, heads, recipe)
    for k, h in enumerate(heads):
        w, b = reference_head(x, y, 5, h, recipe)
        torch.testing.assert_close(got.weight[k], w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.bias[k], b, rtol=1e-4, atol=1e-5)


def test_one_pass_matches_the_trainer_and_caches_features(tmp_path: Path, data_root: Path, weights: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from vptune.engine.config import config_from_dict
    from vptune.engine.trainer import build_backbone, run_training

    cfgs = []
    for i, (lr, wd, seed) in enumerate(((2.5, 0.0, 0), (0.5, 0.01, 0), (1.0, 0.001, 3))):
        d = base_config(weights, epochs=3, warmup_epochs=1)
        d["method"] = {"name": "linear"}
        d["data"].update(root=str(data_root / "toy"), train_split="train800", val_split="val200", test_split="test")
        d["optim"].update(base_lr=lr, weight_decay=wd, optimizer="paper", lr_scaling="linear")  # the SGD probe
        d["runtime"].update(seed=seed, precision="fp32")
        d["output"] = str(tmp_path / f"sep{i}")
        cfgs.append(config_from_dict(d))
    backbone = build_backbone(cfgs[0])
    separate = [run_training(c, backbone=backbone) for c in cfgs]
    one = [config_from_dict({**config_to_dict(c), "output": str(tmp_path / f"one{i}")}) for i, c in enumerate(cfgs)]
    results = F_.train_linear_runs(one, backbone, tmp_path / "cache")
    for i, (a, b) in enumerate(zip(separate, results)):
        assert abs(a["val"]["top1"] - b["val"]["top1"]) < 1e-6 and abs(a["test"]["top1"] - b["test"]["top1"]) < 1e-6
        assert a["trainable_parameters"] == b["trainable_parameters"] and a["stored_bytes"] == b["stored_bytes"]
        ta, tb = (load_file(str(tmp_path / f"{p}{i}/task/weights.safetensors")) for p in ("sep", "one"))
        torch.testing.assert_close(ta["head.weight"], tb["head.weight"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ta["head.bias"], tb["head.bias"], rtol=1e-4, atol=1e-5)
    # the run folders load as tasks, and the features now come from the cache
    from vptune.model import TunedModel

    TunedModel.from_pretrained(tmp_path / "one0/task", backbone=backbone)
    cached = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) == 3 and backbone.fingerprint()[:16] in str(cached[0])
    monkeypatch.setattr(F_, "extract_features", lambda *a, **k: pytest.fail("features recomputed"))
    again = [config_from_dict({**config_to_dict(c), "output": str(tmp_path / f"again{i}")}) for i, c in enumerate(cfgs)]
    val_again = F_.train_linear_runs(again, backbone, tmp_path / "cache")[0]["val"]
    assert {k: v for k, v in val_again.items() if k != "loss"} == {k: v for k, v in results[0]["val"].items()
                                                                  if k != "loss"}
    assert val_again["loss"] == pytest.approx(results[0]["val"]["loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------------------
# end to end: the real engine, a tiny ViT, a tiny dataset
# ------------------------------------------------------------------------------------------------------


def test_sweep_end_to_end(tmp_path: Path, data_root: Path, weights: Path) -> None:
    d = sweep_dict(tmp_path, data_root, weights,
                   methods=[{"name": "vpt-deep", "options": {"num_tokens": 2}},
                            {"name": "linear", "config": {"optim": {"optimizer": "paper"}}}],  # SGD: one pass
                   tasks={"root": str(data_root), "names": ["toy"]})
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(d))
    spec = S.load_sweep(sweep_file)
    assert spec.name == "sweep"
    logs: list[str] = []
    out = S.run_sweep(spec, log=logs.append)
    assert len(out.trained) == (2 + 2) * 2
    for task in ("toy",):
        for method in ("vpt-deep", "linear"):
            base = tmp_path / "out" / task / method
            assert (base / "selection.json").is_file()
            for seed in (0, 1):
                res = json.loads((base / f"final/seed{seed}/result.json").read_text())
                assert res["status"] == "done" and res["test"]["n"] == 15 and res["val"] is None
    lin = json.loads((tmp_path / "out/toy/linear/grid/lr0.5_wd0/result.json").read_text())
    assert lin["one_pass"]["heads"] == 2 and lin["test"] is None and lin["val"]["n"] == 12
    assert any("one linear pass" in m for m in logs)
    out2 = S.run_sweep(S.load_sweep(sweep_file), log=logs.append)
    assert out2.trained == []
    # the CLI on the finished sweep: a dry run and a report
    from vptune.cli import main

    assert main(["sweep", str(sweep_file), "--dry-run", "--quiet"]) == 0
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep/report.md").is_file() and (tmp_path / "rep/per_task.png").is_file()


def test_example_sweeps_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "configs" / "sweeps"
    files = sorted(root.glob("*.yaml"))
    assert {f.name for f in files} >= {"vtab1k.yaml", "smoke.yaml"}
    for f in files:
        spec = S.load_sweep(f)
        assert spec.tasks and spec.methods
    spec = S.load_sweep(root / "vtab1k.yaml")
    assert len(spec.tasks) == 19 and [m.label for m in spec.methods] == ["vpt-deep", "linear", "full"]
    vpt, lin, full = spec.methods
    assert vpt.grid.axes["num_tokens"] == [1, 5, 10, 50, 100, 200] and vpt.options["dropout"] == 0.1
    assert lin.grid.lr == [3e-3, 1e-2] and full.grid.lr == [3e-5, 1e-4, 3e-4]  # vptune's recipe: the methods' grids
    assert spec.seeds == [42, 44, 82] and spec.grid_seed == 42
    ref = S.load_sweep(root / "vtab1k_reference.yaml")  # the paper's recipe, grids and five seeds
    assert ref.base["recipe"] == "reference" and ref.seeds == [42, 44, 82, 100, 800]
    _, rlin, rfull = ref.methods
    assert len(rlin.grid.lr) * len(rlin.grid.wd) == 40 and rfull.grid.lr == [0.001, 0.0001, 0.0005, 0.005]


def test_feature_cache_follows_the_split_file(tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vptune.backbones import create_backbone
    from vptune.data import DataConfig

    task = make_task(tmp_path, "cachetask", sizes={"train800": 6, "val200": 3, "test": 3})
    backbone = create_backbone(None, weights=str(weights))
    calls = []
    real = F_.extract_features
    monkeypatch.setattr(F_, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = DataConfig(root=str(task), num_workers=0)
    a = F_.load_features(backbone, data, "val200", tmp_path / "cache")
    b = F_.load_features(backbone, data, "val200", tmp_path / "cache")
    assert len(calls) == 1 and torch.equal(a.features, b.features) and b.labels.tolist() == [0, 1, 2]
    lines = (task / "val200.txt").read_text().splitlines()
    (task / "val200.txt").write_text("\n".join([lines[0].rsplit(" ", 1)[0] + " 2", *lines[1:]]) + "\n")
    c = F_.load_features(backbone, data, "val200", tmp_path / "cache")
    assert len(calls) == 2 and c.labels.tolist() == [2, 1, 2]


class DivergingTrainer(FakeTrainer):
    """A fake trainer whose runs at the listed base lrs diverge: result.json status 'diverged', no val."""

    def __init__(self, val: dict[tuple, float], diverge_lrs: set[float]) -> None:
        super().__init__(val, {})
        self.diverge_lrs = diverge_lrs

    def __call__(self, cfg: Any, **kwargs: Any) -> dict:
        if cfg.optim.base_lr not in self.diverge_lrs:
            return super().__call__(cfg, **kwargs)
        self.calls.append((cfg.output, False, False))
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        result = {"status": "diverged", "config": config_to_dict(cfg), "val": None, "test": None,
                  "diverged": "loss 1e+09 at epoch 1 step 3 (> 100x the first)"}
        (out / "result.json").write_text(json.dumps(result))
        return result


def test_selection_skips_diverged_runs(tmp_path: Path, data_root: Path) -> None:
    """A diverged grid point (the best-looking lr) is a failed point: listed, never selected, not retrained."""
    spec = S.parse_sweep(sweep_dict(tmp_path, data_root, grid={"lr": [0.5, 2.5], "wd": [0.0]}))
    trainer = DivergingTrainer({(0.5, 0.0, 2): 60.0}, {2.5})
    logs: list[str] = []
    out = S.run_sweep(spec, env=fake_env(trainer), log=logs.append)
    assert out.choices[("toy", "vpt-deep", 1.0)].lr == 0.5
    summary = logs[-1].splitlines()  # the printed summary lists the diverged grid run with its reason
    assert summary[-2:] == ["1 grid run(s) diverged (status 'diverged' in result.json; never selected):",
                            "  toy/vpt-deep/grid/lr2.5_wd0: loss 1e+09 at epoch 1 step 3 (> 100x the first)"]
    sel = json.loads((tmp_path / "out/toy/vpt-deep/selection.json").read_text())
    assert [g["lr"] for g in sel["grid"]] == [0.5]
    assert sel["diverged"] == [str(tmp_path / "out/toy/vpt-deep/grid/lr2.5_wd0")]
    calls = len(trainer.calls)
    S.run_sweep(spec, env=fake_env(trainer), log=lambda _: None)
    assert len(trainer.calls) == calls, "a diverged run is finished: a re-run does not train it again"


def test_all_diverged_raises(tmp_path: Path, data_root: Path) -> None:
    spec = S.parse_sweep(sweep_dict(tmp_path, data_root, grid={"lr": [0.5, 2.5], "wd": [0.0]}))
    with pytest.raises(VptuneError, match="every grid run of toy/vpt-deep diverged"):
        S.run_sweep(spec, env=fake_env(DivergingTrainer({}, {0.5, 2.5})), log=lambda _: None)
