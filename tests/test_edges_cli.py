"""Bad command lines get one line on stderr and exit code 2, never a traceback (issue 15 findings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import TINY_BACKBONE_YAML, save_tiny_vit
from tests.test_cli_train import write_png
from vptune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges_cli")
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(4):
            write_png(root / "data" / f"c{c}" / f"{i}.png", c, rng)
    (root / "c.yaml").write_text(TINY_BACKBONE_YAML + "method:\n  name: vpt-deep\n  options: {num_tokens: 2}\n"
                                 "data:\n  train_split: all\n  test_split: null\n  num_workers: 0\n"
                                 "optim:\n  epochs: 1\n  batch_size: 4\n")
    save_tiny_vit(root / "vit.safetensors")
    (root / "rand.pth").write_bytes(np.random.default_rng(1).bytes(3000))
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "a_file").write_text("not a folder")
    return root


def run_cli(capsys, args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err.strip().splitlines()


def train(root, *extra):
    return ["train", "--config", root / "c.yaml", "--data", root / "data", "--weights", root / "vit.safetensors",
            "--output", root / "out", "--no-progress", *extra]


CASES = {
    "option of the wrong type": (["--set", "method.options.num_tokens=abc"],
                                 "method.options.num_tokens must be int, got 'abc'"),
    "backbone config of the wrong type": (["--set", "backbone.config.depth=abc"],
                                          "backbone.config.depth must be int, got 'abc'"),
    "seed too large": (["--set", "runtime.seed=1.0e+20"], "runtime.seed must be an integer in the int64 range"),
    "seed too large as an int": (["--set", "runtime.seed=100000000000000000000"], "runtime.seed must be an"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_values_are_one_line(setup, capsys, case):
    extra, message = CASES[case]
    code, err = run_cli(capsys, train(setup, *extra))
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_output_that_is_a_file(setup, capsys):
    args = train(setup)
    args[args.index(setup / "out")] = setup / "a_file"
    code, err = run_cli(capsys, args)
    assert code == 2 and err == [(f"vptune: error: output {setup / 'a_file'} is a file, not a folder; "
                                  "choose another --output")]


def test_binary_config_file(setup, capsys):
    code, err = run_cli(capsys, ["train", "--config", setup / "binary.yaml"])
    assert code == 2 and err == [f"vptune: error: config file {setup / 'binary.yaml'} is not a text (YAML) file"]


def test_missing_weights_path_says_it_does_not_exist(setup, capsys):
    """Was: 'give a backbone name or a weights folder' (when no --backbone was given)."""
    code, err = run_cli(capsys, ["train", "--data", setup / "data", "--weights", setup / "nope",
                                 "--output", setup / "out"])
    assert code == 2 and err == [(f"vptune: error: backbone weights {setup / 'nope'} do not exist "
                                  "(backbone.weights / --weights)")]


def test_random_bytes_as_weights_are_not_called_a_refused_pickle(setup, capsys):
    args = train(setup)
    args[args.index(setup / "vit.safetensors")] = setup / "rand.pth"
    code, err = run_cli(capsys, args)
    assert code == 2 and len(err) == 1
    assert "corrupt, truncated or not a PyTorch checkpoint" in err[0] and "unpickle" not in err[0]


def test_a_real_pickle_is_still_refused(tmp_path):
    from fractions import Fraction

    from vptune.backbones.checkpoint import read_state_dict
    from vptune.errors import VptuneError

    torch.save({"w": torch.zeros(1), "f": Fraction(1, 3)}, tmp_path / "p.pth")
    with pytest.raises(VptuneError, match="refusing to unpickle .* holds a pickled fractions.Fraction"):
        read_state_dict(tmp_path / "p.pth")


def test_the_corrupt_image_hint_names_a_flag_train_has(setup, capsys):
    """`vptune data check` tells users to pass --skip-corrupt: train now has it, and it works."""
    import contextlib
    import io

    from vptune.cli import build_parser

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "--skip-corrupt" in buf.getvalue()
    (setup / "data" / "c0" / "broken.png").write_bytes(b"not a png")
    try:
        code, _ = run_cli(capsys, train(setup, "--skip-corrupt", "--output", setup / "out_skip"))
    finally:
        (setup / "data" / "c0" / "broken.png").unlink()
    assert code == 0
    summary = json.loads((setup / "out_skip" / "result.json").read_text())
    assert summary["config"]["data"]["skip_corrupt"] is True and summary["data"]["n_train"] == 8
