"""``vptune train -> eval -> predict -> info`` end to end through the command line, on PNG folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import TINY, TINY_BACKBONE_YAML, save_tiny_vit, write_split_files
from vptune.backbones.vit import VisionTransformer, ViTConfig
from vptune.cli import main

CLASSES = ["red", "green", "blue", "yellow"]
RGB = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]], dtype=np.float32)
SPLITS = {"train800": 48, "val200": 16, "test": 16}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for tiny models


def write_png(path: Path, label: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.clip(RGB[label] + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory):
    """A VTAB-style task folder (split txt files + classes.json), the same test images as a class
    folder, and a tiny random ViT saved as safetensors."""
    root = tmp_path_factory.mktemp("cli")
    vtab, folder = root / "colors", root / "colors_folder"
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {}
    for split, n in SPLITS.items():
        for i in range(n):
            rel = f"images/{split}/{i:03d}.png"
            write_png(vtab / rel, i % 4, rng)
            lines.setdefault(split, []).append(f"{rel} {i % 4}")
            if split == "test":
                write_png(folder / "test" / CLASSES[i % 4] / f"{i:03d}.png", i % 4, rng)
    write_split_files(vtab, lines)
    (vtab / "classes.json").write_text(json.dumps(CLASSES))
    weights = save_tiny_vit(root / "vit_tiny.safetensors")
    config = root / "tiny.yaml"
    config.write_text(
        TINY_BACKBONE_YAML
        + "method:\n  name: vpt-deep\n  options: {num_tokens: 2}\n"
        "data:\n  train_split: train800\n  val_split: val200\n  test_split: test\n  num_workers: 0\n"
        "optim:\n  epochs: 4\n  warmup_epochs: 1\n  batch_size: 16\n  base_lr: 2.5\n")
    return {"root": root, "vtab": vtab, "folder": folder, "weights": weights, "config": config}


def train_args(a: dict, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(a["config"]), "--data", str(a["vtab"]), "--weights", str(a["weights"]),
            "--output", str(out), "--no-progress", *extra]


def test_train_eval_predict_info_end_to_end(cli_assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(cli_assets, out, "--seed", "3", "--set", "optim.weight_decay=0.0")) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "done" and result["config"]["runtime"]["seed"] == 3
    assert result["config"]["optim"]["weight_decay"] == 0.0 and "test top-1" in printed
    assert result["test"]["top1"] >= 75 and result["data"]["n_train"] == 48
    assert result["backbone"]["weights"] == str(cli_assets["weights"].resolve())

    # eval: the backbone weights default to the path recorded at training
    metrics = tmp_path / "metrics.json"
    assert main(["eval", str(out / "task"), "--data", str(cli_assets["vtab"]), "--split", "test",
                 "--num-workers", "0", "--json", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    assert m["top1"] == pytest.approx(result["test"]["top1"]) and len(m["confusion"]) == 4
    assert "top-1" in capsys.readouterr().out

    # eval on a class folder holding the same test images (run folder given instead of task folder)
    assert main(["eval", str(out), "--data", str(cli_assets["folder"]), "--format", "class-folder",
                 "--split", "test", "--num-workers", "0", "--weights", str(cli_assets["weights"])]) == 0
    assert "test: top-1" in capsys.readouterr().out

    images = sorted((cli_assets["folder"] / "test" / "blue").glob("*.png"))[:2]
    preds = tmp_path / "preds.json"
    assert main(["predict", str(out / "task"), *map(str, images), "--top-k", "2", "--json", str(preds)]) == 0
    shown = capsys.readouterr().out
    assert shown.count("blue") >= 2 and all(len(p["top"]) == 2 for p in json.loads(preds.read_text()))

    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "status: done" in shown and "vpt-deep" in shown and "red, green, blue, yellow" in shown
    assert main(["info", str(out / "task"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trained_parameters"] == result["trainable_parameters"] and info["backbone"]["arch"] == "vit"
    assert info["stored_bytes"] == result["stored_bytes"]
    assert main(["info", str(out / "checkpoint.pt")]) == 0
    assert "epoch: 4" in capsys.readouterr().out

    # the same command again: already done, the stored result comes back
    assert main(train_args(cli_assets, out, "--seed", "3", "--set", "optim.weight_decay=0.0")) == 0
    assert json.loads((out / "result.json").read_text())["wall_s"] == result["wall_s"]


@pytest.mark.parametrize("extra, words", [
    (["--set", "optim.lr=0.5"], ["optim.lr", "optim.base_lr"]),
    (["--method", "vpt-deeper"], ["unknown method", "vpt-deep", "linear"]),
    (["--option", "num_token=3"], ["num_tokens"]),
    (["--set", "optim.epochs=many"], ["optim.epochs", "int"]),
    (["--set", "novalue"], ["key=value"]),
])
def test_user_errors_exit_2_without_traceback(cli_assets, tmp_path, capsys, extra, words):
    assert main(train_args(cli_assets, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("vptune: error:") and err.count("\n") == 1
    for w in words:
        assert w in err


def test_changed_config_in_existing_folder_is_refused(cli_assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(cli_assets, out, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(train_args(cli_assets, out, "--epochs", "2")) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "optim.epochs" in err and "--resume" in err
    assert main(train_args(cli_assets, out, "--epochs", "2", "--resume")) == 0
    assert json.loads((out / "result.json").read_text())["epochs"] == 2


def test_eval_without_recorded_weights_asks_for_them(tmp_path, capsys):
    from vptune.model import create_model

    torch.manual_seed(0)
    model = create_model(VisionTransformer(ViTConfig(**TINY)), "linear", 4)
    model.save_pretrained(tmp_path / "task")
    assert main(["eval", str(tmp_path / "task"), "--data", str(tmp_path)]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nothing")]) == 2
