"""Data in the layouts people have (issue 15, item 4): MedMNIST npz, Hugging Face save_to_disk folders,
VTAB's derived CLEVR / dSprites TFRecord labels, and unlabeled image folders for predict."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY_BACKBONE_YAML, save_tiny_vit
from vptune.cli import main
from vptune.data import DataConfig, detect_format, open_reader, open_split
from vptune.data.tfrecord import write_examples
from vptune.errors import VptuneError

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = {"train": 40, "val": 12, "test": 12}


def medmnist_npz(path: Path, rgb: bool = False) -> Path:
    """MedMNIST's layout: <split>_images uint8 (N, 28, 28[, 3]), <split>_labels (N, 1)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in SIZES.items():
        y = np.arange(n) % 3
        x = (y * 100)[:, None, None] + rng.integers(0, 30, (n, 28, 28))
        x = np.repeat(x[..., None], 3, axis=-1) if rgb else x
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x.astype(np.uint8), y[:, None]
    np.savez_compressed(path, **arrays)
    return path


@pytest.mark.parametrize("rgb", [False, True])
def test_medmnist_npz_reads_as_is(tmp_path, rgb):
    path = medmnist_npz(tmp_path / "pathmnist.npz", rgb)
    reader = open_reader(DataConfig(root=str(path)))
    assert detect_format(str(path)) == "npz" and sorted(reader.splits) == ["test", "train", "val"]
    assert reader.num_classes == 3
    source, labels = reader.load("val")
    assert labels == [i % 3 for i in range(12)]
    arr = np.asarray(source.load(4))
    assert arr.shape == (28, 28, 3) and abs(int(arr.mean()) - (4 % 3) * 100 - 14) <= 3


def test_medmnist_multilabel_is_refused_clearly(tmp_path):
    np.savez(tmp_path / "chest.npz", train_images=np.zeros((4, 28, 28), np.uint8),
             train_labels=np.zeros((4, 14), np.uint8))
    with pytest.raises(VptuneError, match=r"multi-label data .* not supported"):
        open_reader(DataConfig(root=str(tmp_path / "chest.npz")))


def test_a_medmnist_npz_trains_through_the_cli_with_no_conversion(tmp_path, capsys):
    path = medmnist_npz(tmp_path / "bloodmnist.npz")
    weights = save_tiny_vit(tmp_path / "vit.safetensors")
    (tmp_path / "c.yaml").write_text(TINY_BACKBONE_YAML + "method:\n  name: linear\ndata:\n  num_workers: 0\n"
                                     "optim:\n  epochs: 2\n  batch_size: 8\n")
    code = main(["train", "--config", str(tmp_path / "c.yaml"), "--data", str(path), "--weights", str(weights),
                 "--output", str(tmp_path / "run"), "--no-progress", "--set", "data.train_split=train",
                 "--set", "data.val_split=val", "--set", "data.test_split=test"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "done" and result["steps"] == 2 * 5 and result["num_classes"] == 3
    assert (result["data"]["n_train"], result["data"]["n_val"], result["data"]["n_test"]) == (40, 12, 12)


def test_vtab1k_from_a_medmnist_npz(tmp_path, capsys):
    path = medmnist_npz(tmp_path / "organmnist.npz")
    assert main(["data", "vtab1k", str(path), "--out", str(tmp_path / "vt"), "--train", "20", "--val", "5"]) == 0
    task = tmp_path / "vt" / "organmnist"
    counts = {s: len((task / f"{s}.txt").read_text().splitlines()) for s in ("train800", "val200", "test")}
    assert counts == {"train800": 20, "val200": 5, "test": 12}
    ds = open_split(DataConfig(root=str(task), num_workers=0), "test", _prep(), train=False)
    assert sorted(ds.labels) == sorted(i % 3 for i in range(12))


def _prep():
    from vptune.backbones.base import Preprocessing

    return Preprocessing(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")


# ------------------------------------------------------------------------------------------ HF datasets

def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_hf_split(folder: Path, values: list[int], labels: list[int], names: list[str]) -> None:
    """What ``Dataset.save_to_disk`` writes, built with pyarrow alone."""
    pa = pytest.importorskip("pyarrow")
    folder.mkdir(parents=True)
    image = pa.array([{"bytes": png_bytes(v), "path": None} for v in values],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"img": image, "label": pa.array(labels, pa.int64())})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {
        "img": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}}))


def test_hf_save_to_disk_folder_built_with_pyarrow(tmp_path):
    root = tmp_path / "hf"
    write_hf_split(root / "train", [10, 20, 30, 40], [0, 1, 0, 1], ["cat", "dog"])
    write_hf_split(root / "test", [50, 60], [1, 0], ["cat", "dog"])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert detect_format(str(root)) == "hf-disk"
    reader = open_reader(DataConfig(root=str(root)))
    assert reader.splits == ["train", "test"] and reader.class_names == ["cat", "dog"]
    source, labels = reader.load("test")
    assert labels == [1, 0] and np.asarray(source.load(1))[0, 0].tolist() == [60, 60, 60]


def test_vtab1k_from_a_hf_save_to_disk_folder(tmp_path):
    root = tmp_path / "pets"
    write_hf_split(root / "train", list(range(10, 190, 10)), [i % 3 for i in range(18)], ["a", "b", "c"])
    write_hf_split(root / "test", [200, 210, 220, 230], [0, 1, 2, 0], ["a", "b", "c"])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert main(["data", "vtab1k", str(root), "--out", str(tmp_path / "vt"), "--train", "8", "--val", "4"]) == 0
    task = tmp_path / "vt" / "pets"
    counts = {s: len((task / f"{s}.txt").read_text().splitlines()) for s in ("train800", "val200", "test")}
    assert counts == {"train800": 8, "val200": 4, "test": 4}
    ds = open_split(DataConfig(root=str(task), num_workers=0), "test", _prep(), train=False)
    assert sorted(ds.labels) == [0, 0, 1, 2]


def test_hf_save_to_disk_folder_written_by_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)) for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(6)]}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([5, 4])}).save_to_disk(str(tmp_path / "hf"))
    reader = open_reader(DataConfig(root=str(tmp_path / "hf")))
    assert reader.num_classes == 3 and reader.class_names == ["a", "b", "c"]
    source, labels = reader.load("test")
    assert labels == [2, 1] and np.asarray(source.load(0))[0, 0].tolist() == [100, 100, 100]


# ------------------------------------------------------------------------------------------ TFRecord labels

def clevr_example(depths: list[float]) -> dict:
    coords = [v for d in depths for v in (10.0, 20.0, d)]
    return {"image": png_bytes(0), "objects/size": [1] * len(depths), "objects/pixel_coords": coords}


@pytest.mark.parametrize("folder,label_key", [("clevr_count", "label"), ("clevr", "clevr/count_all")])
def test_clevr_count_is_objects_minus_three(tmp_path, folder, label_key):
    root = tmp_path / folder
    root.mkdir()
    write_examples(root / "clevr-train.tfrecord-00000-of-00001", [clevr_example([9.0] * n) for n in (3, 7, 10)])
    reader = open_reader(DataConfig(root=str(root), tfrecord_label_key=label_key))
    assert reader.load("train")[1] == [0, 4, 7] and reader.num_classes == 8


def test_clevr_closest_distance_bins_the_smallest_depth(tmp_path):
    root = tmp_path / "clevr_dist"
    root.mkdir()
    # smallest depth -> bin of thresholds (0, 8, 8.5, 9, 9.5, 10, 100): 7.9->0, 8.2->1, 9.0->2 (9 is not < 9),
    # 9.7->4, 12->5; the other objects are farther and must not matter
    depths = [[7.9, 11.0], [12.0, 8.2, 9.9], [9.0, 9.1, 30.0], [9.7], [12.0, 40.0]]
    write_examples(root / "clevr-train.tfrecord-00000-of-00001", [clevr_example(d) for d in depths])
    reader = open_reader(DataConfig(root=str(root)))
    assert reader.load("train")[1] == [0, 1, 2, 4, 5] and reader.num_classes == 6


def test_dsprites_position_and_orientation_in_16_bins(tmp_path):
    for folder, key, values, want in [("dsprites_loc", "label_x_position", [0, 1, 2, 31], [0, 0, 1, 15]),
                                      ("dsprites_ori", "label_orientation", [0, 2, 3, 5, 39], [0, 0, 1, 2, 15])]:
        root = tmp_path / folder
        root.mkdir()
        write_examples(root / "dsprites-train.tfrecord-00000-of-00001",
                       [{"image": png_bytes(0), key: v, "label_shape": 1} for v in values])
        reader = open_reader(DataConfig(root=str(root)))
        assert reader.load("train")[1] == want and reader.num_classes == 16, folder


# ------------------------------------------------------------------------------------------ predict a folder

def test_predict_a_folder_of_unlabeled_images(tmp_path, capsys):
    import vptune
    from tests.helpers import tiny_vit

    folder = tmp_path / "unlabeled"
    (folder / "sub").mkdir(parents=True)
    for name, v in (("b.png", 10), ("a.png", 200), ("sub/c.jpg", 90)):
        Image.fromarray(np.full((32, 32, 3), v, np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image file")
    weights = save_tiny_vit(tmp_path / "vit.safetensors")
    model = vptune.create_model(tiny_vit(), "linear", 2, label_names=["x", "y"])
    model.save_pretrained(tmp_path / "task")
    code = main(["predict", str(tmp_path / "task"), str(folder), "--weights", str(weights), "--top-k", "1",
                 "--json", str(tmp_path / "p.json")])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [str(folder / n) for n in ("a.png", "b.png", "broken.png",
                                                                            "sub/c.jpg")]
    assert lines[2].startswith(f"{folder / 'broken.png'}: unreadable: cannot read image")
    assert all(ln.split(": ")[1].split(" (")[0] in ("x", "y") for i, ln in enumerate(lines) if i != 2)
    # (the last line: the backbone loading logs come first)
    assert code == 2 and err.strip().splitlines()[-1] == ("vptune: error: 1 of 4 image(s) could not be read "
                                                          "(listed above)")
    saved = json.loads((tmp_path / "p.json").read_text())
    assert [("error" in r) for r in saved] == [False, False, True, False]
