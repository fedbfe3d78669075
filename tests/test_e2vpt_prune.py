"""E2VPT's prompt pruning (vpt-kv ``keep_tokens`` / ``pruned_segments``, :mod:`vptune.engine.prune`): a masked
prompt token is the same as a removed one (ViT and Swin), pruned segments are zeros that get no gradient,
the importance score is |dL/d rho| (finite differences), the plan drops the lowest scores per block, and
``vptune prune`` retrains from the rewound initialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers import TINY_BACKBONE_YAML, save_tiny_vit, tiny_vit, write_split_files
from tests.test_matrix import BACKBONES
from vptune import create_model
from vptune.cli import main
from vptune.engine.config import config_from_dict
from vptune.engine.prune import prompt_importance, prune_plan
from vptune.engine.runfolder import read_run_config
from vptune.engine.trainer import build_trainer
from vptune.errors import VptuneError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for tiny models


def _pruned_copy(full, keep, **extra):
    """A vpt-kv model with ``keep_tokens=keep`` holding ``full``'s values (its kept prompt rows)."""
    backbone, p = full.backbone, full.method.options.num_tokens
    pruned = create_model(backbone, "vpt-kv", full.num_classes, num_tokens=p, keep_tokens=keep,
                          kv_tokens=full.method.options.kv_tokens, **extra).double().eval()
    sd = {k: v[list(keep[int(k.rsplit(".", 1)[1])])] if k.startswith("method.prompts.") else v
          for k, v in full.state_dict().items()}
    pruned.load_state_dict(sd)
    return pruned


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_a_masked_prompt_token_is_a_removed_one(arch):
    backbone = (tiny_vit() if arch == "vit" else BACKBONES["swin"]()).double()
    n = backbone.num_blocks
    full = create_model(backbone, "vpt-kv", 3, num_tokens=4).double().eval()
    pruned = _pruned_copy(full, ((0, 2),) * n)  # slots 1 and 3 pruned in every block
    small = create_model(backbone, "vpt-kv", 3, num_tokens=2).double().eval()
    small.load_state_dict({k: v[[0, 2]] if k.startswith("method.prompts.") else v
                           for k, v in full.state_dict().items()})
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), small(x), rtol=0, atol=1e-10)
        assert (full(x) - pruned(x)).abs().max() > 1e-6  # pruning changed something
    # only the kept tokens are parameters (E2VPT's parameter saving), per block
    keep = tuple((0, 2) if j % 2 == 0 else (1, 2, 3) for j in range(n))
    varied = _pruned_copy(full, keep)
    dims = [b.dim for b in backbone.block_infos()]
    kv = 2 * 5 * sum(dims)  # kv_tokens=5 keys and values per block
    head = 3 * (dims[-1] + 1)
    assert varied.num_trainable_parameters() == sum(len(k) * d for k, d in zip(keep, dims)) + kv + head
    assert full.num_trainable_parameters() == 4 * sum(dims) + kv + head


def test_pruned_segments_are_zeros_without_gradient():
    backbone = tiny_vit().double()
    n = backbone.num_blocks
    d = backbone.block_infos()[0].dim
    model = create_model(backbone, "vpt-kv", 3, num_tokens=3, segments=4,
                         pruned_segments=((1, 8),) + ((),) * (n - 1)).double().eval()
    ref = create_model(backbone, "vpt-kv", 3, num_tokens=3).double().eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    q = d // 4
    sd["method.prompts.0"][0, q:2 * q] = 0.0  # segment 1 = token 0, second quarter
    sd["method.prompts.0"][2, 0:q] = 0.0  # segment 8 = token 2, first quarter
    ref.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-10)
    model(x).sum().backward()
    g = model.method.prompts[0].grad
    assert g[0, q:2 * q].abs().max() == 0 and g[2, :q].abs().max() == 0 and g[1].abs().max() > 0


def test_importance_is_the_gradient_of_a_token_mask():
    torch.manual_seed(0)
    backbone = tiny_vit().double()
    model = create_model(backbone, "vpt-kv", 3, num_tokens=3).double().eval()
    torch.nn.init.normal_(model.head.weight, std=3.0)  # a head that reads the features: gradients of size
    data = [(torch.randn(3, 32, 32, dtype=torch.float64), i % 3) for i in range(6)]
    tok, seg = prompt_importance(model, data, torch.device("cpu"), segments=2, batch_size=6)
    images, labels = torch.stack([a for a, _ in data]), torch.tensor([b for _, b in data])

    def loss_with(j, k, scale, dims=slice(None)):
        p = model.method.prompts[j]
        keep = p.data.clone()
        p.data[k, dims] *= scale
        with torch.no_grad():
            out = F.cross_entropy(model(images), labels).item()
        p.data.copy_(keep)
        return out

    eps = 1e-4  # central differences in float64: truncation ~eps^2, rounding ~1e-16 / eps
    d = model.method.prompts[0].shape[1]
    for j, k in ((0, 0), (0, 2), (1, 1)):
        fd = (loss_with(j, k, 1 + eps) - loss_with(j, k, 1 - eps)) / (2 * eps)
        assert tok[j][k].item() == pytest.approx(abs(fd), rel=1e-6)
        half = slice(d // 2, d)
        fd = (loss_with(j, k, 1 + eps, half) - loss_with(j, k, 1 - eps, half)) / (2 * eps)
        assert seg[j][k, 1].item() == pytest.approx(abs(fd), rel=1e-6)


def test_the_plan_drops_the_lowest_scores_per_block_and_keeps_earlier_pruning():
    tok = [torch.tensor([0.5, 0.1, 0.9, 0.3]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    seg = [torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.2, 5.0], [3.0, 4.0]]), torch.ones(4, 2)]
    keep, pruned = prune_plan(tok, seg, tokens=0.5, segment_fraction=0.25)
    assert keep == ((0, 2), (2, 3))
    assert pruned[0] == (4,)  # of the kept tokens' 4 segments, the lowest: token 2, segment 0
    assert pruned[1] == (4,)  # ties go to the lower index
    # a second round prunes from what is left, keeps the first round's choices, and keeps one token
    keep2, pruned2 = prune_plan(tok, seg, tokens=0.5, keep_tokens=keep, pruned_segments=pruned)
    assert keep2 == ((2,), (3,)) and pruned2 == pruned  # half of the two left
    keep3, _ = prune_plan(tok, seg, tokens=0.9, keep_tokens=keep2, pruned_segments=pruned2)
    assert keep3 == keep2  # the last token of a block stays
    with pytest.raises(VptuneError, match="fraction to prune"):
        prune_plan(tok, seg, tokens=1.0)


@pytest.mark.parametrize("options, message", [
    ({"num_tokens": 0, "keep_tokens": ((0,),)}, "need num_tokens > 0"),
    ({"num_tokens": 4, "keep_tokens": ((0,),)}, "one list per prompted block"),
    ({"num_tokens": 4, "keep_tokens": ((0, 9),) * 2}, "distinct prompt slots in 0..3"),
    ({"num_tokens": 4, "keep_tokens": ((),) * 2}, "at least one"),
    ({"num_tokens": 4, "segments": 5, "pruned_segments": ((0,),) * 2}, "must divide the prompt width"),
    ({"num_tokens": 4, "segments": 0}, "segments must be >= 1"),
    ({"num_tokens": 4, "init": "prototype", "keep_tokens": ((0,),) * 2}, "prune a run with init 'uniform'"),
])
def test_bad_pruning_options_are_refused_clearly(options, message):
    with pytest.raises(VptuneError, match=message):
        create_model(tiny_vit(), "vpt-kv", 3, **options)


# ------------------------------------------------------------------------------------------ vptune prune

@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    rgb = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]], dtype=np.float32)
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {}
    for split, n in {"train800": 24, "val200": 9, "test": 9}.items():
        for i in range(n):
            rel = f"images/{split}/{i:03d}.png"
            (root / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
            img = np.clip(rgb[i % 3] + rng.normal(0, 50, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "data" / rel)
            lines.setdefault(split, []).append(f"{rel} {i % 3}")
    write_split_files(root / "data", lines)
    weights = save_tiny_vit(root / "vit.safetensors")
    config = root / "kv.yaml"
    config.write_text(TINY_BACKBONE_YAML + "method:\n  name: vpt-kv\n  options: {num_tokens: 4, kv_tokens: 2}\n"
                      "data:\n  train_split: train800\n  val_split: val200\n  test_split: test\n  num_workers: 0\n"
                      "optim:\n  epochs: 2\n  warmup_epochs: 1\n  batch_size: 8\n"
                      "runtime:\n  device: cpu\n  precision: fp32\n")
    first = root / "first"
    assert main(["train", "--config", str(config), "--data", str(root / "data"), "--weights", str(weights),
                 "--output", str(first), "--no-progress"]) == 0
    return {"root": root, "first": first, "config": config, "weights": weights}


def test_vptune_prune_masks_the_lowest_tokens_and_retrains_from_the_rewound_init(run_assets, capsys):
    out = run_assets["root"] / "pruned"
    assert main(["prune", str(run_assets["first"]), "--output", str(out), "--tokens", "0.5", "--segments", "2",
                 "--segment-fraction", "0.25", "--no-progress"]) == 0
    assert "task saved to" in capsys.readouterr().out
    # the same command again finds the finished run of the same config (scores are deterministic)
    assert main(["prune", str(run_assets["first"]), "--output", str(out), "--tokens", "0.5", "--segments", "2",
                 "--segment-fraction", "0.25", "--no-progress", "--resume"]) == 0
    assert "already holds a finished run" in capsys.readouterr().err
    options = json.loads((out / "task" / "task.json").read_text())["options"]
    record = json.loads((out / "prune.json").read_text())
    n = len(options["keep_tokens"])
    assert all(len(k) == 2 for k in options["keep_tokens"]) and options["segments"] == 2
    assert all(len(s) == 1 for s in options["pruned_segments"])  # 25% of the kept 2 x 2 segments
    assert record["prompt_tokens_kept"] == 2 * n and record["prompt_tokens"] == 4 * n
    for j, keep in enumerate(options["keep_tokens"]):  # the kept tokens are the best-scored ones
        scores = record["token_scores"][j]
        assert min(scores[k] for k in keep) >= max(s for k, s in enumerate(scores) if k not in keep)
    # the rewind: the second run starts where the first one started (its kept prompt rows, key-value
    # prompts, head)
    a, b = (build_trainer(config_from_dict(read_run_config(d)), torch.device("cpu")).model
            for d in (run_assets["first"], out))
    sa, sb = a.trained_state_dict(), b.trained_state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        ref = sa[k][list(options["keep_tokens"][int(k.rsplit(".", 1)[1])])] if k.startswith("method.prompts.") \
            else sa[k]
        assert torch.equal(sb[k], ref), k
    # the task file holds the kept rows only; scoring the pruned run again puts 0 on the pruned slots
    from vptune.artifact import load_task

    task = load_task(out / "task", a.backbone)
    assert all(p.shape[0] == 2 for p in task.method.prompts)
    first = json.loads((run_assets["first"] / "result.json").read_text())
    assert json.loads((out / "result.json").read_text())["stored_bytes"] < first["stored_bytes"]
    data = [(torch.randn(3, 32, 32), i % 3) for i in range(4)]
    tok, _ = prompt_importance(task, data, torch.device("cpu"), batch_size=4)
    for j, keep in enumerate(options["keep_tokens"]):
        assert all(tok[j][k] == 0 for k in range(4) if k not in keep) and all(tok[j][k] > 0 for k in keep)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "done" and result["options"]["keep_tokens"] == options["keep_tokens"]


def test_pruning_a_run_of_another_method_is_refused(run_assets, tmp_path, capsys):
    other = tmp_path / "deep"
    assert main(["train", "--config", str(run_assets["config"]), "--data", str(run_assets["root"] / "data"),
                 "--weights", str(run_assets["weights"]), "--output", str(other), "--no-progress",
                 "--method", "vpt-deep", "--set", "method.options={num_tokens: 2}", "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["prune", str(other), "--output", str(tmp_path / "p"), "--tokens", "0.5"]) == 2
    assert "pruning needs a vpt-kv run" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "nothing"), "--output", str(tmp_path / "p"), "--tokens", "0.5"]) == 2
    assert "is not a finished training run" in capsys.readouterr().err
    for flags, message in ((["--tokens", "1.5"], "tokens is the fraction to prune"),
                           (["--tokens", "0.5", "--segments", "0"], "segments and max_batches must be >= 1"),
                           (["--tokens", "0.5", "--segments", "5"], "must divide every prompt width")):
        assert main(["prune", str(run_assets["first"]), "--output", str(tmp_path / "p"), *flags]) == 2
        assert message in capsys.readouterr().err
