"""The CLI used as a hostile user would (issue 15): wrong paths, a file where a folder is expected and the
reverse, empty and corrupt YAML / JSON / safetensors / images, bad numbers (negative, NaN, inf, huge),
unknown choices -- for every subcommand. Each must print exactly one line to stderr and exit 2, never a
traceback. Run in-process (``vptune.cli.main``); nothing may start a server, a demo or a long training
(``run_server`` and ``run_demo`` are replaced by functions that fail the test)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY, TINY_BACKBONE_YAML, save_tiny_vit, tiny_vit
from vptune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def make_assets(root: Path) -> Path:
    """Everything the cases point at, good and bad, under ``root``."""
    import vptune

    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(3):
            path = root / "data" / f"c{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 32, 3), 60 + 120 * c, np.uint8)).save(path)
    save_tiny_vit(root / "vit.safetensors")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "rand.safetensors").write_bytes(rng.bytes(4000))
    (root / "badheader.safetensors").write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + bytes(64))
    (root / "huge_header.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    (root / "c.yaml").write_text(TINY_BACKBONE_YAML + "method:\n  name: linear\n"
                                 "data:\n  train_split: all\n  test_split: null\n  num_workers: 0\n"
                                 "optim:\n  epochs: 1\n  batch_size: 4\n")
    (root / "empty.yaml").write_text("")
    (root / "bad.yaml").write_text("method: [unclosed\n  name: {")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "scalar.yaml").write_text("42\n")
    (root / "unknown.yaml").write_text("bogus_section: 1\n")
    (root / "badtype.yaml").write_text("optim: 5\n")
    (root / "a_file").write_text("not a folder")
    (root / "empty_dir").mkdir()
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    (root / "empty.png").write_bytes(b"")
    (root / "rand.pt").write_bytes(rng.bytes(3000))
    model = vptune.create_model(tiny_vit(), "linear", 2, label_names=["a", "b"])
    model.save_pretrained(root / "task")
    for name, text in (("task_badjson", "{"), ("task_list", "[1, 2]"), ("task_empty_json", "")):
        model.save_pretrained(root / name)
        (root / name / "task.json").write_text(text)
    model.save_pretrained(root / "task_badweights")
    (root / "task_badweights" / "weights.safetensors").write_bytes(rng.bytes(500))
    model.save_pretrained(root / "task_noweights")
    (root / "task_noweights" / "weights.safetensors").unlink()
    (root / "run_badckpt").mkdir()
    (root / "run_badckpt" / "checkpoint.pt").write_bytes(rng.bytes(3000))
    (root / "runs_badresult" / "r1").mkdir(parents=True)
    (root / "runs_badresult" / "r1" / "result.json").write_text("{\"status\": ")
    (root / "runs_listresult" / "r1").mkdir(parents=True)
    (root / "runs_listresult" / "r1" / "result.json").write_text("[1]")
    ok = (f"base: c.yaml\noutput: {root}/sweep_out\ntasks: {{root: {root}, names: [data]}}\nmethods: [linear]\n"
          "splits: {fit: all, select: all, final: all, test: all}\n")
    sweeps = {"empty": "", "bad": "grid: [", "list": "- 1\n", "unknown": "bogus: 1\n", "ok": ok + "seeds: 1\n",
              "badlr": ok + "grid: {lr: [abc], wd: [0.0]}\n", "badseeds": ok + "seeds: -2\n"}
    for name, text in sweeps.items():
        (root / f"sweep_{name}.yaml").write_text(text)
    return root


TRAIN = ["train", "--config", "{r}/c.yaml", "--data", "{r}/data", "--weights", "{r}/vit.safetensors",
         "--output", "{out}", "--no-progress"]
EVAL = ["eval", "{r}/task", "--data", "{r}/data", "--split", "all", "--weights", "{r}/vit.safetensors"]
PREDICT = ["predict", "{r}/task", "{r}/data/c0/0.png", "--weights", "{r}/vit.safetensors"]
TINY_OPTIONS = [a for k, v in TINY.items() for a in ("--backbone-option", f"{k}={v}")]
SERVE = ["serve", "--weights", "{r}/vit.safetensors", "--backbone", "vit_tiny_patch16_224", *TINY_OPTIONS,
         "--task", "{r}/task"]
EXPORT = ["export", "--weights", "{r}/vit.safetensors", "--backbone", "vit_tiny_patch16_224", *TINY_OPTIONS,
          "--task", "{r}/task", "--out", "{r}/onnx_out"]


def replace(base: list[str], flag: str, value: str) -> list[str]:
    """``base`` with ``flag``'s value replaced (or the positional at index ``flag`` when it is a number)."""
    out = list(base)
    i = int(flag) if flag.isdigit() else out.index(flag) + 1
    out[i] = value
    return out


CASES: dict[str, list[str]] = {
    # --- train: paths
    "train config missing": replace(TRAIN, "--config", "{r}/nope.yaml"),
    "train config is a folder": replace(TRAIN, "--config", "{r}/empty_dir"),
    "train config empty": replace(TRAIN, "--config", "{r}/empty.yaml") + ["--set", "method.name=bogus"],
    "train config bad yaml": replace(TRAIN, "--config", "{r}/bad.yaml"),
    "train config a list": replace(TRAIN, "--config", "{r}/list.yaml"),
    "train config a scalar": replace(TRAIN, "--config", "{r}/scalar.yaml"),
    "train config unknown section": replace(TRAIN, "--config", "{r}/unknown.yaml"),
    "train config section not a mapping": replace(TRAIN, "--config", "{r}/badtype.yaml"),
    "train config binary": replace(TRAIN, "--config", "{r}/rand.pt"),
    "train data missing": replace(TRAIN, "--data", "{r}/nope"),
    "train data a file": replace(TRAIN, "--data", "{r}/a_file"),
    "train data empty folder": replace(TRAIN, "--data", "{r}/empty_dir"),
    "train weights missing": replace(TRAIN, "--weights", "{r}/nope.safetensors"),
    "train weights empty file": replace(TRAIN, "--weights", "{r}/empty.safetensors"),
    "train weights random bytes": replace(TRAIN, "--weights", "{r}/rand.safetensors"),
    "train weights bad header": replace(TRAIN, "--weights", "{r}/badheader.safetensors"),
    "train weights huge header": replace(TRAIN, "--weights", "{r}/huge_header.safetensors"),
    "train weights empty folder": replace(TRAIN, "--weights", "{r}/empty_dir"),
    "train weights an image": replace(TRAIN, "--weights", "{r}/data/c0/0.png"),
    "train output a file": replace(TRAIN, "--output", "{r}/a_file"),
    "train resume corrupt checkpoint": replace(TRAIN, "--output", "{r}/run_badckpt") + ["--resume"],
    # --- train: numbers and choices
    "train epochs negative": TRAIN + ["--epochs", "-1"],
    "train epochs not a number": TRAIN + ["--epochs", "many"],
    "train batch size zero": TRAIN + ["--batch-size", "0"],
    "train batch size huge": TRAIN + ["--batch-size", "100000000000000000000000"],
    "train lr nan": TRAIN + ["--lr", "nan"],
    "train lr inf": TRAIN + ["--lr", "inf"],
    "train lr negative": TRAIN + ["--lr", "-0.1"],
    "train wd nan": TRAIN + ["--wd", "nan"],
    "train seed negative": TRAIN + ["--seed", "-3"],
    "train method unknown": TRAIN + ["--method", "vpt-bogus"],
    "train recipe unknown": TRAIN + ["--recipe", "fastest"],
    "train device unknown": TRAIN + ["--device", "tpu:7"],
    "train device cuda absent": TRAIN + ["--device", "cuda:99"],
    "train backbone unknown": TRAIN + ["--backbone", "resnet9000"],
    "train set without equals": TRAIN + ["--set", "optim.epochs"],
    "train set unknown key": TRAIN + ["--set", "optim.bogus=1"],
    "train set unknown section": TRAIN + ["--set", "bogus.key=1"],
    "train set a list for a number": TRAIN + ["--set", "optim.epochs=[1, 2]"],
    "train set nan lr": TRAIN + ["--set", "optim.base_lr=.nan"],
    "train set bad yaml value": TRAIN + ["--set", "optim.epochs={"],
    "train option unknown": TRAIN + ["--option", "bogus=1"],
    "train option negative tokens": TRAIN + ["--method", "vpt-deep", "--option", "num_tokens=-4"],
    "train option huge tokens": TRAIN + ["--method", "vpt-deep", "--option", "num_tokens=1e30"],
    "train option tokens above the bound": TRAIN + ["--method", "vpt-deep", "--option", "num_tokens=20000"],
    "train backbone depth beyond int64": TRAIN + ["--set", "backbone.config.depth=1e30"],
    "train backbone width unallocatable": TRAIN + ["--set", "backbone.config.embed_dim=100000000000"],
    "train backbone zero heads": TRAIN + ["--set", "backbone.config.num_heads=0"],
    "train backbone zero patch": TRAIN + ["--set", "backbone.config.patch_size=0"],
    "train backbone negative image size": TRAIN + ["--set", "backbone.config.img_size=-32"],
    "train backbone config not a mapping": TRAIN + ["--set", "backbone.config=7"],
    "train resume and overwrite": TRAIN + ["--resume", "--overwrite"],
    "train json is a folder": TRAIN + ["--json", "{r}/empty_dir"],
    "train no data": ["train", "--config", "{r}/c.yaml", "--weights", "{r}/vit.safetensors",
                      "--output", "{out}"],
    # --- eval
    "eval task missing": replace(EVAL, "1", "{r}/nope"),
    "eval task a file": replace(EVAL, "1", "{r}/a_file"),
    "eval task empty folder": replace(EVAL, "1", "{r}/empty_dir"),
    "eval task.json corrupt": replace(EVAL, "1", "{r}/task_badjson"),
    "eval task.json a list": replace(EVAL, "1", "{r}/task_list"),
    "eval task.json empty": replace(EVAL, "1", "{r}/task_empty_json"),
    "eval task weights corrupt": replace(EVAL, "1", "{r}/task_badweights"),
    "eval task weights missing": replace(EVAL, "1", "{r}/task_noweights"),
    "eval data missing": replace(EVAL, "--data", "{r}/nope"),
    "eval data a file": replace(EVAL, "--data", "{r}/a_file"),
    "eval split unknown": replace(EVAL, "--split", "bogus"),
    "eval format unknown": EVAL + ["--format", "parquet"],
    "eval protocol unknown": EVAL + ["--protocol", "imagenet"],
    "eval batch size zero": EVAL + ["--batch-size", "0"],
    "eval batch size negative": EVAL + ["--batch-size", "-8"],
    "eval num workers negative": EVAL + ["--num-workers", "-1"],
    "eval precision unknown": EVAL + ["--precision", "fp8"],
    "eval device unknown": EVAL + ["--device", "gpu"],
    "eval weights corrupt": replace(EVAL, "--weights", "{r}/rand.safetensors"),
    "eval weights missing": replace(EVAL, "--weights", "{r}/nope.safetensors"),
    "eval source unknown": EVAL + ["--source", "caffe"],
    "eval json is a folder": EVAL + ["--json", "{r}/empty_dir"],
    # --- predict
    "predict image missing": replace(PREDICT, "2", "{r}/nope.png"),
    "predict image corrupt": replace(PREDICT, "2", "{r}/corrupt.png"),
    "predict image empty": replace(PREDICT, "2", "{r}/empty.png"),
    "predict image folder empty": replace(PREDICT, "2", "{r}/empty_dir"),
    "predict top-k zero": PREDICT + ["--top-k", "0"],
    "predict top-k negative": PREDICT + ["--top-k", "-2"],
    "predict top-k not a number": PREDICT + ["--top-k", "all"],
    "predict task missing": replace(PREDICT, "1", "{r}/nope"),
    "predict task.json corrupt": replace(PREDICT, "1", "{r}/task_badjson"),
    "predict protocol unknown": PREDICT + ["--protocol", "bogus"],
    "predict device unknown": PREDICT + ["--device", "npu"],
    # --- info
    "info path missing": ["info", "{r}/nope"],
    "info random file": ["info", "{r}/a_file"],
    "info corrupt checkpoint": ["info", "{r}/rand.pt"],
    "info empty folder": ["info", "{r}/empty_dir"],
    "info task.json corrupt": ["info", "{r}/task_badjson"],
    "info task.json a list": ["info", "{r}/task_list"],
    "info run with corrupt checkpoint": ["info", "{r}/run_badckpt"],
    # --- sweep
    "sweep file missing": ["sweep", "{r}/nope.yaml", "--dry-run"],
    "sweep file a folder": ["sweep", "{r}/empty_dir", "--dry-run"],
    "sweep file empty": ["sweep", "{r}/sweep_empty.yaml", "--dry-run"],
    "sweep file bad yaml": ["sweep", "{r}/sweep_bad.yaml", "--dry-run"],
    "sweep file a list": ["sweep", "{r}/sweep_list.yaml", "--dry-run"],
    "sweep file unknown key": ["sweep", "{r}/sweep_unknown.yaml", "--dry-run"],
    "sweep file binary": ["sweep", "{r}/rand.pt", "--dry-run"],
    "sweep grid lr not a number": ["sweep", "{r}/sweep_badlr.yaml", "--dry-run"],
    "sweep backend unknown": ["sweep", "{r}/sweep_ok.yaml", "--dry-run", "--backend", "slurm"],
    "sweep gpus negative": ["sweep", "{r}/sweep_ok.yaml", "--dry-run", "--gpus-per-run", "-1"],
    "sweep hours nan": ["sweep", "{r}/sweep_ok.yaml", "--dry-run", "--hours-per-run", "nan"],
    "sweep retries negative": ["sweep", "{r}/sweep_ok.yaml", "--dry-run",
                               "--max-retries", "-1"],
    "sweep set unknown key": ["sweep", "{r}/sweep_ok.yaml", "--dry-run",
                              "--set", "optim.bogus=1"],
    "sweep seeds negative": ["sweep", "{r}/sweep_badseeds.yaml", "--dry-run"],
    "sweep output a file": ["sweep", "{r}/sweep_ok.yaml", "--dry-run", "--output", "{r}/a_file"],
    # --- report
    "report runs missing": ["report", "{r}/nope"],
    "report runs a file": ["report", "{r}/a_file"],
    "report no results": ["report", "{r}/empty_dir"],
    "report result.json corrupt": ["report", "{r}/runs_badresult", "--no-plots"],
    "report result.json a list": ["report", "{r}/runs_listresult", "--no-plots"],
    "report out is a file": ["report", "{r}/runs_badresult", "--out", "{r}/a_file"],
    # --- serve (nothing may bind)
    "serve no backbone": ["serve", "--task", "{r}/task"],
    "serve public host without token": SERVE + ["--host", "0.0.0.0"],
    "serve port negative": SERVE + ["--port", "-1"],
    "serve port too large": SERVE + ["--port", "99999"],
    "serve batch size zero": SERVE + ["--max-batch-size", "0"],
    "serve timeout nan": SERVE + ["--timeout", "nan"],
    "serve timeout negative": SERVE + ["--timeout", "-5"],
    "serve upload inf": SERVE + ["--max-upload-mb", "inf"],
    "serve wait nan": SERVE + ["--max-wait-ms", "nan"],
    "serve top-k zero": SERVE + ["--top-k", "0"],
    "serve threads negative": SERVE + ["--threads", "-2"],
    "serve resident tasks zero": SERVE + ["--max-resident-tasks", "0"],
    "serve limit concurrency zero": SERVE + ["--limit-concurrency", "0"],
    "serve task missing": replace(SERVE, "--task", "{r}/nope"),
    "serve task a file": replace(SERVE, "--task", "{r}/a_file"),
    "serve task.json corrupt": replace(SERVE, "--task", "{r}/task_badjson"),
    "serve task weights corrupt": replace(SERVE, "--task", "{r}/task_badweights"),
    "serve task root a file": SERVE + ["--task-root", "{r}/a_file"],
    "serve weights corrupt": replace(SERVE, "--weights", "{r}/rand.safetensors"),
    "serve backbone option bad key": SERVE + ["--backbone-option", "bogus=1"],
    "serve backbone option bad type": SERVE + ["--backbone-option", "depth=abc"],
    "serve backbone option no equals": SERVE + ["--backbone-option", "depth"],
    "serve log level unknown": SERVE + ["--log-level", "loud"],
    # --- export
    "export no task": ["export", "--weights", "{r}/vit.safetensors", "--out", "{r}/onnx_out"],
    "export out is a file": replace(EXPORT, "--out", "{r}/a_file"),
    "export task missing": replace(EXPORT, "--task", "{r}/nope"),
    "export task.json a list": replace(EXPORT, "--task", "{r}/task_list"),
    "export opset zero": EXPORT + ["--opset", "0"],
    "export opset huge": EXPORT + ["--opset", "999"],
    "export atol nan": EXPORT + ["--atol", "nan"],
    "export rtol negative": EXPORT + ["--rtol", "-1"],
    "export format unknown": EXPORT + ["--format", "tflite"],
    # --- data
    "data vtab1k src missing": ["data", "vtab1k", "{r}/nope", "--out", "{r}/vt"],
    "data vtab1k src a file": ["data", "vtab1k", "{r}/a_file", "--out", "{r}/vt"],
    "data vtab1k src empty folder": ["data", "vtab1k", "{r}/empty_dir", "--out", "{r}/vt"],
    "data vtab1k train negative": ["data", "vtab1k", "{r}/data", "--out", "{r}/vt", "--train", "-5"],
    "data vtab1k out is a file": ["data", "vtab1k", "{r}/data", "--out", "{r}/a_file", "--train", "2",
                                  "--val", "2"],
    "data vtab1k corrupt npz": ["data", "vtab1k", "{r}/corrupt.npz", "--out", "{r}/vt"],
    "data vtab1k mode unknown": ["data", "vtab1k", "{r}/data", "--out", "{r}/vt", "--mode", "move"],
    "data generate task unknown": ["data", "generate", "mnist", "--out", "{r}/gen"],
    "data generate n negative": ["data", "generate", "dsprites_loc", "--out", "{r}/gen", "--n", "-10"],
    "data generate size zero": ["data", "generate", "dsprites_loc", "--out", "{r}/gen", "--n", "20",
                                "--size", "0"],
    "data generate workers zero": ["data", "generate", "dsprites_loc", "--out", "{r}/gen", "--n", "20",
                                   "--workers", "0"],
    "data generate out is a file": ["data", "generate", "dsprites_loc", "--out", "{r}/a_file", "--n", "20"],
    "data mini-vtab no assets": ["data", "mini-vtab", "--assets", "{r}/nope", "--out", "{r}/mv"],
    "data mini-vtab scale nan": ["data", "mini-vtab", "--assets", "{r}/empty_dir", "--out", "{r}/mv",
                                 "--scale", "nan"],
    "data check root missing": ["data", "check", "{r}/nope"],
    "data check root a file": ["data", "check", "{r}/a_file"],
    "data check format unknown": ["data", "check", "{r}/data", "--format", "parquet"],
    "data check split unknown": ["data", "check", "{r}/data", "--split", "bogus"],
    "data check workers zero": ["data", "check", "{r}/data", "--workers", "0"],
    "data no subcommand": ["data"],
    # --- demo (nothing may run)
    "demo threads zero": ["demo", "--threads", "0"],
    "demo out is a file": ["demo", "--out", "{r}/a_file", "--quick"],
    "demo assets missing": ["demo", "--assets", "{r}/nope", "--quick"],
    "demo cache is a file": ["demo", "--cache", "{r}/a_file", "--quick", "--no-assets"],
    "demo assets and no-assets": ["demo", "--assets", "{r}/empty_dir", "--no-assets"],
    # --- top level
    "no command": [],
    "unknown command": ["fly"],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_assets(tmp_path_factory.mktemp("hostile"))
    (root / "corrupt.npz").write_bytes(b"PK\x03\x04" + bytes(100))
    return root


@pytest.fixture
def no_server_no_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    import vptune.demo
    import vptune.serve

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a hostile invocation got as far as starting a server or the demo")

    monkeypatch.setattr(vptune.serve, "run_server", refuse)
    monkeypatch.setattr(vptune.demo, "run_demo", refuse)
    monkeypatch.delenv("VPTUNE_API_TOKEN", raising=False)


def run(argv: list[str], root: Path, capsys: pytest.CaptureFixture[str], case: str) -> tuple[int, list[str]]:
    out = root / "outputs" / case.replace(" ", "_")  # each case its own run folder
    args = [a.replace("{r}", str(root)).replace("{out}", str(out)) for a in argv]
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    err = capsys.readouterr().err
    return code, err.strip().splitlines()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_invocation_gets_one_line_and_exit_2(case, root, capsys, no_server_no_demo):
    code, err = run(CASES[case], root, capsys, case)
    assert not any("Traceback" in ln for ln in err), "\n".join(err)
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("vptune"), err
