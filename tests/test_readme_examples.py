"""Every `vptune train` example in the README learns (issue 12): run as written on the real assets, with the
epoch count cut for the test's budget, and the training loss must fall and test top-1 beat chance."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k_ft_tinyimagenet"


def readme_commands(prefix: str) -> list[str]:
    """The README's shell lines starting with ``prefix`` (backslash continuations joined, comments cut)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip().startswith(prefix)]


def _expand(cmd: str, assets: Path) -> list[str]:
    env = {"VPTUNE_ASSETS": str(assets), "W": str(assets / WEIGHTS)}
    return [re.sub(r"\$(\w+)", lambda m: env.get(m[1], m[0]), a) for a in shlex.split(cmd)]


def _vptune(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "vptune", *args[1:]], cwd=cwd, env=env, capture_output=True, check=False,
                          text=True, timeout=900)


def test_readme_has_train_examples():
    cmds = readme_commands("vptune train")
    assert cmds and all("--method" in c for c in cmds)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", readme_commands("vptune train"))
def test_readme_train_example_learns(cmd, assets, tmp_path):
    for data_cmd in readme_commands("vptune data vtab1k"):
        r = _vptune(_expand(data_cmd, assets), tmp_path)
        assert r.returncode == 0, r.stderr
    args = _expand(cmd, assets) + ["--set", "optim.epochs=3", "--set", "optim.warmup_epochs=1", "--no-progress"]
    r = _vptune(args, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / args[args.index("--output") + 1]
    losses = [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "done" and losses[-1] < 0.8 * losses[0], losses
    classes = result["num_classes"]
    assert result["test"]["top1"] > 2 * 100.0 / classes, result["test"]["top1"]  # well above chance


def test_readme_method_table_matches_the_registry():
    """The method table lists every registered method, with the optimiser and peak lr each really
    defaults to (``Method.optimizer``, ``Method.default_lr``) and its paper's optimiser."""
    from vptune.methods.base import METHODS

    rows = re.findall(r"^\| `([a-z-]+)` \| [^|]+ \| (SGD|AdamW) \| (SGD|AdamW) ([0-9.e-]+) \|",
                      (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    names = {re.sub(r"-k$", "", name) for name, *_ in rows}
    assert names == set(METHODS), names ^ set(METHODS)
    for name, paper, optimizer, lr in rows:
        cls = METHODS[re.sub(r"-k$", "", name)]
        assert (paper.lower(), optimizer.lower()) == (cls.paper_optimizer, cls.optimizer), name
        assert float(lr) == cls.default_lr[cls.optimizer], name
