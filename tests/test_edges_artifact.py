"""Task folders that lie or break: every bad ``task.json`` and bad weights file is one VptuneError, and a
save is never seen half done (issue 15, item 3 and the load_task findings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vptune
from vptune.artifact import load_task
from vptune.errors import VptuneError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def task(tiny_vit, tmp_path) -> Path:
    vptune.create_model(tiny_vit, "vpt-deep", 3, num_tokens=2).save_pretrained(tmp_path / "task")
    return tmp_path / "task"


def edit(task: Path, change) -> None:
    meta = json.loads((task / "task.json").read_text())
    change(meta)
    (task / "task.json").write_text(json.dumps(meta))


BAD_META = {
    "no method": (lambda m: m.pop("method"), "required key 'method' is missing"),
    "method not a string": (lambda m: m.update(method=3), "'method' must be str"),
    "no num_classes": (lambda m: m.pop("num_classes"), "required key 'num_classes' is missing"),
    "num_classes a string": (lambda m: m.update(num_classes="3"), "'num_classes' must be int"),
    "num_classes zero": (lambda m: m.update(num_classes=0), "num_classes must be in 1.."),
    "num_classes true": (lambda m: m.update(num_classes=True), "'num_classes' must be int"),
    "no options": (lambda m: m.pop("options"), "required key 'options' is missing"),
    "options a list": (lambda m: m.update(options=[1]), "'options' must be dict"),
    "option of the wrong type": (lambda m: m["options"].update(num_tokens="abc"),
                                 "options.num_tokens must be int, got 'abc'"),
    "unknown option": (lambda m: m["options"].update(bogus=1), "no option"),
    "unknown method": (lambda m: m.update(method="vpt-sideways"), "unknown method"),
    "no preprocessing": (lambda m: m.pop("preprocessing"), "required key 'preprocessing' is missing"),
    "2-element mean": (lambda m: m["preprocessing"].update(mean=[0.5, 0.5]), "mean must be 3 finite"),
    "std of zero": (lambda m: m["preprocessing"].update(std=[0.5, 0.0, 0.5]), "std must be 3 finite"),
    "input size negative": (lambda m: m["preprocessing"].update(input_size=-32), "input_size must be an int"),
    "input size huge": (lambda m: m["preprocessing"].update(input_size=10**6), "input_size must be an int"),
    "input size a float": (lambda m: m["preprocessing"].update(input_size=32.5), "input_size must be an int"),
    "label names of the wrong length": (lambda m: m.update(label_names=["a"]), "label_names must be a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_bad_task_json_is_one_clear_error(tiny_vit, task, case):
    change, message = BAD_META[case]
    edit(task, change)
    with pytest.raises(VptuneError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_task(task, tiny_vit)


def test_a_task_without_preprocessing_never_runs_at_224(tiny_vit, task):
    """The old code silently fell back to 224 px; the task was trained at 32."""
    assert json.loads((task / "task.json").read_text())["preprocessing"]["input_size"] == 32
    edit(task, lambda m: m.pop("preprocessing"))
    with pytest.raises(VptuneError, match="preprocessing"):
        load_task(task, tiny_vit)


def test_option_given_as_a_numeric_string_is_converted(tiny_vit, task):
    edit(task, lambda m: m["options"].update(num_tokens="2"))
    assert load_task(task, tiny_vit).method.options.num_tokens == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tiny_vit, task, bad):
    from safetensors.torch import load_file

    state = load_file(str(task / "weights.safetensors"))
    name = min(state)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = bad
    save_file(state, str(task / "weights.safetensors"))
    edit(task, lambda m: m.pop("weights_sha256"))  # so that the finiteness check, not the sha, refuses it
    with pytest.raises(VptuneError, match=f"{name} holds NaN or infinite"):
        load_task(task, tiny_vit)


def test_weights_of_another_save_are_refused_by_sha256(tiny_vit, tmp_path):
    """The reported mix: task.json of one save beside the weights of a later one (same shapes)."""
    model = vptune.create_model(tiny_vit, "vpt-deep", 3, num_tokens=2)
    model.save_pretrained(tmp_path / "epoch3", training={"epochs": 3})
    with torch.no_grad():
        model.head.weight.add_(1.0)
    model.save_pretrained(tmp_path / "epoch6", training={"epochs": 6})
    (tmp_path / "epoch3" / "weights.safetensors").write_bytes(
        (tmp_path / "epoch6" / "weights.safetensors").read_bytes())
    with pytest.raises(VptuneError, match="sha256 differs"):
        load_task(tmp_path / "epoch3", tiny_vit)


def test_save_replaces_the_folder_whole(tiny_vit, tmp_path):
    folder = tmp_path / "task"
    model = vptune.create_model(tiny_vit, "linear", 3)
    model.save_pretrained(folder)
    first = (folder / "task.json").stat().st_ino
    (tmp_path / ".task.tmp-stale").mkdir()  # what a writer killed mid-save leaves behind
    model.save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]  # no temporary sibling left, stale one gone
    assert sorted(p.name for p in folder.iterdir()) == ["task.json", "weights.safetensors"]
    assert (folder / "task.json").stat().st_ino != first  # a new folder, renamed into place
    meta = json.loads((folder / "task.json").read_text())
    assert meta["weights_bytes"] == (folder / "weights.safetensors").stat().st_size
    load_task(folder, tiny_vit)


def test_save_into_a_shared_folder_keeps_other_files(tiny_vit, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    vptune.create_model(tiny_vit, "linear", 3).save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    load_task(tmp_path, tiny_vit)


def test_save_to_a_file_is_refused(tiny_vit, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(VptuneError, match="is a file"):
        vptune.create_model(tiny_vit, "linear", 3).save_pretrained(tmp_path / "f")


def test_training_summary_gets_stored_bytes_at_save_time(tiny_vit, tmp_path):
    vptune.create_model(tiny_vit, "linear", 3).save_pretrained(tmp_path / "t", training={"stored_bytes": None})
    meta = json.loads((tmp_path / "t" / "task.json").read_text())
    assert meta["training"]["stored_bytes"] == (tmp_path / "t" / "weights.safetensors").stat().st_size


class Crash(BaseException):
    """What a kill looks like to the writer: nothing after this point runs."""


@pytest.mark.parametrize("where", ["os.replace", "os.fsync", "shutil.rmtree"])
def test_a_save_cut_short_at_any_call_leaves_the_old_task_or_the_new_one(tiny_vit, tmp_path, monkeypatch, where):
    """Re-save a task and stop the writer at its k-th file-system call, for every k: the folder then holds
    exactly the old weights or exactly the new ones (or, between the two renames, no task) -- never a mix."""
    import os
    import shutil

    folder = tmp_path / "task"
    model = vptune.create_model(tiny_vit, "vpt-deep", 3, num_tokens=2)
    old = {k: v.clone() for k, v in model.trained_state_dict().items()}
    with torch.no_grad():
        model.head.weight.add_(1.0)
    new = {k: v.clone() for k, v in model.trained_state_dict().items()}
    module, name = where.split(".")
    target = {"os": os, "shutil": shutil}[module]
    real = getattr(target, name)
    outcomes = set()
    for k in range(8):
        shutil.rmtree(tmp_path, ignore_errors=True)
        tmp_path.mkdir()
        with torch.no_grad():
            model.head.weight.copy_(old["head.weight"])
        model.save_pretrained(folder)  # the old task
        with torch.no_grad():
            model.head.weight.copy_(new["head.weight"])
        calls = [0]

        def cut(*a, _k=k, _calls=calls, **kw):
            _calls[0] += 1
            if _calls[0] > _k:
                raise Crash
            return real(*a, **kw)

        monkeypatch.setattr(target, name, cut)
        try:
            model.save_pretrained(folder)
            outcomes.add("finished")
        except Crash:
            pass
        finally:
            monkeypatch.setattr(target, name, real)
        if not folder.exists():
            outcomes.add("absent")
            continue
        loaded = load_task(folder, tiny_vit).trained_state_dict()
        same_old = all(torch.equal(loaded[n], old[n]) for n in old)
        same_new = all(torch.equal(loaded[n], new[n]) for n in new)
        assert same_old or same_new, f"cut after {k} calls of {where}: a mix"
        outcomes.add("old" if same_old else "new")
    assert "finished" in outcomes  # k large enough: the save completes
    if where == "os.replace":  # cut before the first rename: old; between the two: absent
        assert {"old", "absent", "new"} <= outcomes


def test_the_server_path_gets_a_vptune_error_not_a_500(tiny_vit, task):
    """The HTTP server answers VptuneError with 400; a KeyError/TypeError from task.json used to be a 500."""
    from vptune.multitask import MultiTaskModel

    edit(task, lambda m: m.update(num_classes="three"))
    with pytest.raises(VptuneError, match="'num_classes' must be int"):
        MultiTaskModel(tiny_vit).add_task("t", task)
