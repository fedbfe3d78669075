"""Data layer: readers, transforms, VTAB-1k splits, FGVC labels, TFRecord/idx/npz, errors and the CLI."""

from __future__ import annotations

import gzip
import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vptune.backbones.base import Preprocessing
from vptune.cli import main
from vptune.data import (
    DataConfig,
    ImageDataset,
    build_transform,
    detect_format,
    list_vtab_tasks,
    load_image,
    open_split,
    task_info,
)
from vptune.data.readers import read_split_file
from vptune.data.tfrecord import encode_example, masked_crc32c, parse_example, write_examples
from vptune.data.vtab import vtab1k_from_class_folder
from vptune.errors import VptuneError

PRE = Preprocessing(input_size=32)


def _png(path, color, size=(12, 10), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)


def _read(path):
    with open(path) as f:
        return [ln.split() for ln in f if ln.strip()]


@pytest.fixture(scope="module")
def big_class_folder(tmp_path_factory):
    """7 classes x 330 tiny PNGs (2310 images), enough for 800 / 200 / 1000 splits."""
    root = tmp_path_factory.mktemp("classes")
    tiny = root / "tiny.png"
    Image.new("RGB", (4, 4), (10, 20, 30)).save(tiny)
    for c in range(7):
        os.makedirs(root / f"class{c}")
        for i in range(330):
            os.link(tiny, root / f"class{c}" / f"{i:04d}.png")
    tiny.unlink()
    return str(root)


# ------------------------------------------------------------------------------------------------------


def test_vtab_task_table():
    tasks = list_vtab_tasks()
    assert len(tasks) == 19
    groups = [g for _, g in tasks.values()]
    assert (groups.count("Natural"), groups.count("Specialized"), groups.count("Structured")) == (7, 4, 8)
    assert tasks["sun397"] == (397, "Natural") and tasks["clevr_count"] == (8, "Structured")
    assert tasks["dsprites_ori"][0] == 16 and tasks["smallnorb_azi"][0] == 18
    with pytest.raises(VptuneError, match="valid tasks: cifar100, caltech101"):
        task_info("cifar1000")


@pytest.mark.parametrize("mode,color", [("L", 128), ("RGBA", (1, 2, 3, 0)), ("CMYK", (0, 0, 0, 0)),
                                        ("P", 5), ("I;16", 3000), ("LA", (9, 255))])
def test_load_image_modes_become_rgb(tmp_path, mode, color):
    path = tmp_path / f"img_{mode.replace(';', '')}.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    Image.new(mode, (6, 5), color).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (6, 5)


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(VptuneError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(VptuneError, match="not found"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("size", [112, 128, 224])
def test_vtab_transform_resizes_and_normalises(size):
    pre = Preprocessing(input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    tf = build_transform(pre, "vtab", train=True, input_size=size)
    x = tf(Image.new("RGB", (300, 200), (255, 0, 51)))
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    expect = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    torch.testing.assert_close(x.mean((1, 2)), expect, atol=1e-5, rtol=0)
    assert torch.equal(tf(Image.new("L", (50, 60), 7)), tf(Image.new("L", (50, 60), 7)))  # no augmentation


def test_fgvc_transform_crops_and_flips():
    arr = np.zeros((256, 256, 3), np.uint8)
    arr[:, :128] = 255  # left half white
    img = Image.fromarray(arr)
    ev = build_transform(PRE, "fgvc", train=False, input_size=224)
    x = ev(img)
    assert x.shape == (3, 224, 224)
    assert torch.equal(x, ev(img))
    assert x[0, :, :50].mean() > 0.9 and x[0, :, -50:].mean() < -0.9  # center crop keeps left/right
    tr = build_transform(PRE, "fgvc", train=True, input_size=224)
    torch.manual_seed(0)
    outs = [tr(img) for _ in range(12)]
    assert all(o.shape == (3, 224, 224) for o in outs)
    assert any(o[0, :, :20].mean() < -0.9 for o in outs)  # flipped at least once
    with pytest.raises(VptuneError, match="protocol"):
        build_transform(PRE, "imagenet", train=False)


# ------------------------------------------------------------------------------------------------------
# VTAB-1k splits
# ------------------------------------------------------------------------------------------------------


def test_vtab1k_split_sizes_disjoint_and_deterministic(big_class_folder, tmp_path):
    a = vtab1k_from_class_folder(big_class_folder, str(tmp_path / "a"), seed=3, test_cap=1000,
                                 task_name="toy", mode="symlink", progress=False)
    b = vtab1k_from_class_folder(big_class_folder, str(tmp_path / "b"), seed=3, test_cap=1000,
                                 task_name="toy", mode="symlink", progress=False)
    c = vtab1k_from_class_folder(big_class_folder, str(tmp_path / "c"), seed=4, test_cap=10,
                                 task_name="toy", mode="symlink", progress=False)
    rows = {s: _read(os.path.join(a, f"{s}.txt")) for s in ("train800", "val200", "train800val200", "test")}
    assert [len(rows[s]) for s in ("train800", "val200", "train800val200", "test")] == [800, 200, 1000, 1000]
    sources = {s: {os.path.realpath(os.path.join(a, p)) for p, _ in r} for s, r in rows.items()}
    assert not sources["train800"] & sources["val200"]
    assert not (sources["train800"] | sources["val200"]) & sources["test"]
    assert sources["train800val200"] == sources["train800"] | sources["val200"]
    assert all(0 <= int(y) < 7 for r in rows.values() for _, y in r)
    def text(task, s):
        return Path(task, f"{s}.txt").read_text()

    assert all(text(a, s) == text(b, s) for s in ("train800", "val200", "test"))
    assert text(a, "train800") != text(c, "train800")
    # labels agree with the class folder the image came from
    names = json.loads(Path(a, "classes.json").read_text())["class_names"]
    assert all(p.split("/")[2] == names[int(y)] for p, y in rows["test"])
    ds = open_split(DataConfig(root=a), "train800", PRE, train=True)
    assert len(ds) == 800 and ds.num_classes == 7 and len(ds.labels) == 800
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int) and y == ds.labels[0]


def test_vtab1k_idempotent_and_settings_guard(big_class_folder, tmp_path):
    out = str(tmp_path / "o")
    args = ["data", "vtab1k", big_class_folder, "--out", out, "--seed", "1", "--test-cap", "50",
            "--task-name", "t", "--mode", "symlink", "--train", "40", "--val", "10"]
    assert main(args) == 0
    stamp = os.path.getmtime(os.path.join(out, "t", "train800.txt"))
    assert main(args) == 0
    assert os.path.getmtime(os.path.join(out, "t", "train800.txt")) == stamp
    assert main(args[:6] + ["2"] + args[7:]) == 2  # other seed on a built folder: clear error


def test_vtab_class_count_sources(tmp_path):
    for name in ("dtd", "custom", "custom2"):
        os.makedirs(tmp_path / name / "images")
        _png(str(tmp_path / name / "images" / "a.png"), (1, 2, 3))
        for s in ("train800", "val200", "test"):
            (tmp_path / name / f"{s}.txt").write_text("images/a.png 4\n")
    (tmp_path / "custom" / "classes.json").write_text(json.dumps({"class_names": list("abcdefgh")}))
    counts = {n: open_split(DataConfig(root=str(tmp_path / n)), "test", PRE, False).num_classes
              for n in ("dtd", "custom", "custom2")}
    assert counts == {"dtd": 47, "custom": 8, "custom2": 5}


def test_fraction_is_stratified_and_deterministic(big_class_folder, tmp_path):
    task = vtab1k_from_class_folder(big_class_folder, str(tmp_path), seed=0, test_cap=10, task_name="f",
                                    mode="symlink", progress=False)
    cfg = DataConfig(root=task, fraction=0.25)
    a, b = open_split(cfg, "train800", PRE, True, seed=5), open_split(cfg, "train800", PRE, True, seed=5)
    assert a.indices == b.indices and 190 <= len(a) <= 210
    assert set(a.labels) == set(open_split(DataConfig(root=task), "train800", PRE, True).labels)
    assert len(open_split(cfg, "val200", PRE, False)) == 200  # only training splits shrink


# ------------------------------------------------------------------------------------------------------
# FGVC
# ------------------------------------------------------------------------------------------------------


def test_fgvc_one_label_mapping_over_splits(tmp_path):
    root = tmp_path / "cub"
    anno = {"train": {}, "val": {}, "test": {}}
    for cid in (1, 2, 3, 7):
        for s, mapping in anno.items():
            if s == "val" and cid == 2:
                continue  # val lacks class 2: per-split remapping would shift class 3 and 7
            for i in range(3):
                rel = f"{cid:03d}.cls/{s}_{i}.jpg"
                _png(str(root / "images" / rel), (cid * 30, 0, 0))
                mapping[rel] = cid
    for s, mapping in anno.items():
        (root / f"{s}.json").write_text(json.dumps(mapping))
    (root / "train_34.json").write_text(json.dumps(dict(list(anno["train"].items())[::3])))
    assert detect_format(str(root)) == "fgvc"
    cfg = DataConfig(root=str(root), protocol="fgvc")
    splits = {s: open_split(cfg, s, PRE, train=(s == "train")) for s in anno}
    want = {1: 0, 2: 1, 3: 2, 7: 3}
    for s, ds in splits.items():
        assert ds.num_classes == 4
        for path, y in zip(ds.source.paths, ds.labels):
            assert y == want[int(os.path.basename(os.path.dirname(path))[:3])]
    assert splits["val"].num_classes == 4 and 1 not in splits["val"].labels
    small = open_split(DataConfig(root=str(root), fraction=0.34), "train", PRE, True)
    assert len(small) == 4  # train_34.json used as is
    with pytest.raises(VptuneError, match="available splits: train, val, test, train_34"):
        open_split(cfg, "validation", PRE, False)


# ------------------------------------------------------------------------------------------------------
# TFRecord, idx, npz
# ------------------------------------------------------------------------------------------------------


def _png_bytes(arr):
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_tfrecord_roundtrip_identical_pixels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(12)]
    root = tmp_path / "tfds" / "toy" / "1.0.0"
    root.mkdir(parents=True)
    write_examples(root / "toy-train.tfrecord-00000-of-00002",
                   [{"image": _png_bytes(a), "label": i % 5, "id": f"{i}"} for i, a in enumerate(arrays[:6])])
    write_examples(root / "toy-train.tfrecord-00001-of-00002",
                   [{"image": _png_bytes(a), "label": (i + 6) % 5} for i, a in enumerate(arrays[6:10])])
    write_examples(root / "toy-test.tfrecord-00000-of-00001",
                   [{"image": _png_bytes(a), "label": 4, "score": [0.5, -1.25]} for a in arrays[10:]])
    (root / "label.labels.txt").write_text("a\nb\nc\nd\ne\n")
    assert detect_format(str(root)) == "tfrecord"
    cfg = DataConfig(root=str(root))
    train = open_split(cfg, "train", PRE, train=True)
    assert len(train) == 10 and train.labels == [i % 5 for i in range(10)] and train.class_names[0] == "a"
    for i in range(10):
        assert np.array_equal(np.asarray(train.load_image(i)), arrays[i])
    assert open_split(cfg, "train[2:5]", PRE, False).labels == [2, 3, 4]
    assert len(open_split(cfg, "train800", PRE, False)) == 10  # VTAB names map onto TFDS slices
    x, y = open_split(cfg, "test", PRE, False)[1]
    assert x.shape == (3, 32, 32) and y == 4
    div = open_split(DataConfig(root=str(root), tfrecord_label_divisor=2.5, num_classes=2), "train", PRE, False)
    assert div.labels == [int(v // 2.5) for v in train.labels]
    ex = parse_example(encode_example({"f": [1.5, 2.0], "i": [-3, 2**40], "s": ["x", b"y"]}))
    assert ex == {"f": [1.5, 2.0], "i": [-3, 2**40], "s": [b"x", b"y"]}


def test_tfrecord_reads_files_written_by_protobuf(tmp_path):
    """Cross-check against the real protobuf runtime and TensorBoard's TF-compatible record writer."""
    pytest.importorskip("google.protobuf", reason="protobuf not installed")
    rw = pytest.importorskip("tensorboard.summary.writer.record_writer", reason="tensorboard not installed")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="ex.proto", package="tt", syntax="proto3")
    lists = {"BytesList": 12, "FloatList": 2, "Int64List": 3}
    for name, typ in lists.items():
        m = fdp.message_type.add(name=name)
        m.field.add(name="value", number=1, type=typ, label=3)
    feat = fdp.message_type.add(name="Feature")
    feat.oneof_decl.add(name="kind")
    for i, (fname, tname) in enumerate([("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                        ("int64_list", "Int64List")]):
        feat.field.add(name=fname, number=i + 1, type=11, type_name=f".tt.{tname}", label=1, oneof_index=0)
    feats = fdp.message_type.add(name="Features")
    entry = feats.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=9, label=1)
    entry.field.add(name="value", number=2, type=11, type_name=".tt.Feature", label=1)
    feats.field.add(name="feature", number=1, type=11, type_name=".tt.Features.FeatureEntry", label=3)
    exm = fdp.message_type.add(name="Example")
    exm.field.add(name="features", number=1, type=11, type_name=".tt.Features", label=1)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    Example = message_factory.GetMessageClass(pool.FindMessageTypeByName("tt.Example"))

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (7, 5), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / "mnist-test.tfrecord-00000-of-00001"
    with open(path, "wb") as f:
        writer = rw.RecordWriter(f)
        for i, a in enumerate(arrays):
            e = Example()
            e.features.feature["image"].bytes_list.value.append(_png_bytes(a))
            e.features.feature["label"].int64_list.value.append(i + 1)
            writer.write(e.SerializeToString())
        writer.flush()
    ds = open_split(DataConfig(root=str(tmp_path)), "test", PRE, False)
    assert ds.labels == [1, 2, 3] and ds.num_classes == 4
    for i, a in enumerate(arrays):
        assert np.array_equal(np.asarray(ds.load_image(i))[..., 0], a)


def test_tfrecord_corruption_is_reported(tmp_path):
    path = tmp_path / "x-train.tfrecord"
    write_examples(path, [{"image": b"not an image", "label": 0}])
    data = bytearray(path.read_bytes())
    assert struct.unpack("<I", data[8:12])[0] == masked_crc32c(bytes(data[:8]))
    ds = open_split(DataConfig(root=str(tmp_path)), "train", PRE, False)
    with pytest.raises(VptuneError, match="cannot decode image"):
        ds[0]
    data[3] = 7  # absurd length
    path.write_bytes(bytes(data))
    with pytest.raises(VptuneError, match="bad length checksum"):
        open_split(DataConfig(root=str(tmp_path)), "train", PRE, False)


def _write_idx(path, arr, gz):
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    (gzip.open if gz else open)(path, "wb").write(head + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_lazy_uint8(tmp_path, gz):
    rng = np.random.default_rng(2)
    imgs, labels = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), rng.integers(0, 10, 20, dtype=np.uint8)
    ext = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", imgs, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labels, gz)
    assert detect_format(str(tmp_path)) == "idx"
    ds = open_split(DataConfig(root=str(tmp_path)), "test", PRE, False)
    assert ds.labels == labels.tolist() and ds.num_classes == int(labels.max()) + 1
    assert np.array_equal(np.asarray(ds.load_image(7))[..., 1], imgs[7])
    arr = ds.source._array()
    assert arr.dtype == np.uint8 and (isinstance(arr, np.memmap) or gz)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_reader(tmp_path, compressed):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (10, 8, 6, 3), dtype=np.uint8)
    y = np.arange(10) % 3
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", x_train=x, y_train=y,
                                                      x_test=x[:4], y_test=y[:4])
    cfg = DataConfig(root=str(tmp_path / "d.npz"))
    ds = open_split(cfg, "train", PRE, False)
    assert ds.labels == y.tolist() and ds.num_classes == 3
    assert np.array_equal(np.asarray(ds.load_image(9)), x[9])
    assert ds.source._array().dtype == np.uint8
    assert isinstance(ds.source._array(), np.memmap) != compressed
    assert len(open_split(cfg, "test", PRE, False)) == 4


# ------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------


@pytest.fixture()
def small_task(tmp_path):
    task = tmp_path / "mytask"
    for i in range(6):
        _png(str(task / "images" / f"{i}.png"), (i * 40, 0, 0))
    (task / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    lines = "".join(f"images/{i}.png {i % 3}\n" for i in range(6))
    (task / "train800.txt").write_text(lines + "images/bad.png 1\n")
    (task / "val200.txt").write_text(lines)
    (task / "test.txt").write_text(lines)
    return task


def test_errors_are_clear(small_task, tmp_path):
    with pytest.raises(VptuneError, match="dataset not found"):
        open_split(DataConfig(root=str(tmp_path / "nope")), "test", PRE, False)
    with pytest.raises(VptuneError, match="available splits: train800, val200, test"):
        open_split(DataConfig(root=str(small_task)), "train800val200", PRE, False)
    with pytest.raises(VptuneError, match="split file not found"):
        read_split_file(str(small_task / "train800val200.txt"))
    with pytest.raises(VptuneError, match="unknown data format"):
        open_split(DataConfig(root=str(small_task), format="parquet"), "test", PRE, False)
    (small_task / "classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(VptuneError, match=r"2 label\(s\) out of range 0..1"):
        open_split(DataConfig(root=str(small_task)), "test", PRE, False)
    (small_task / "classes.json").unlink()
    (small_task / "test.txt").write_text("images/0.png x\n")
    with pytest.raises(VptuneError, match="test.txt:1"):
        open_split(DataConfig(root=str(small_task)), "test", PRE, False)
    empty = tmp_path / "cf"
    _png(str(empty / "cat" / "a.png"), (0, 0, 0))
    os.makedirs(empty / "dog")
    with pytest.raises(VptuneError, match="empty class folder.*dog"):
        open_split(DataConfig(root=str(empty)), "all", PRE, False)
    with pytest.raises(VptuneError, match="cannot tell the dataset format"):
        detect_format(str(empty / "dog"))


def test_corrupt_images_named_skipped_and_checked(small_task, capsys):
    ds = open_split(DataConfig(root=str(small_task)), "train800", PRE, False)
    with pytest.raises(VptuneError, match=r"bad\.png.*vptune data check"):
        ds[6]
    with pytest.warns(UserWarning, match="skipping 1 unreadable image"):
        ok = open_split(DataConfig(root=str(small_task), skip_corrupt=True), "train800", PRE, False)
    assert len(ok) == 6 and all(ok[i][0].shape == (3, 32, 32) for i in range(6))
    assert main(["data", "check", str(small_task)]) == 2
    out, err = capsys.readouterr()
    assert "train800: 7 images" in out and "1 unreadable" in out and "bad.png" in out
    assert "1 unreadable image(s)" in err
    assert main(["data", "check", str(small_task), "--split", "val200"]) == 0
    assert main(["data", "check", str(small_task), "--split", "nope"]) == 2


def test_dataloader_workers(big_class_folder):
    ds = open_split(DataConfig(root=big_class_folder), "all", PRE, train=True)
    assert isinstance(ds, ImageDataset) and len(ds) == 2310 and ds.class_names[0] == "class0"
    sub = torch.utils.data.Subset(ds, list(range(0, 2310, 300)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xb, yb = next(iter(torch.utils.data.DataLoader(sub, batch_size=8, num_workers=2)))
    assert xb.shape == (8, 3, 32, 32) and yb.tolist() == [ds.labels[i] for i in range(0, 2310, 300)]


def test_cli_tasks_and_unknown(capsys):
    assert main(["data", "tasks"]) == 0
    assert "smallnorb_ele" in capsys.readouterr().out
    assert main(["data", "generate", "dsprites_size", "--out", "/tmp/never"]) == 2
    assert "valid tasks: dsprites_loc" in capsys.readouterr().err


def test_fgvc_without_val_json_gets_the_papers_90_10_split(tmp_path):
    root = tmp_path / "dogs"
    train, test = {}, {}
    for cid, n in ((5, 30), (9, 11), (12, 1)):
        for i in range(n):
            rel = f"{cid}/{i}.png"
            _png(str(root / "images" / rel), (cid * 20, i, 0))
            train[rel] = cid
        test[f"{cid}/0.png"] = cid
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))
    cfg = DataConfig(root=str(root), protocol="fgvc")
    tr, va, tv = (open_split(cfg, s, PRE, train=False) for s in ("train", "val", "trainval"))
    assert (len(tr), len(va), len(tv)) == (42 - 4, 4, 42)  # 10% of each class: 3 + 1 + 0 (a lone image stays)
    assert sorted(va.labels) == [0, 0, 0, 1] and tr.num_classes == va.num_classes == 3
    assert not set(tr.source.paths) & set(va.source.paths)
    assert sorted(tr.source.paths + va.source.paths) == sorted(tv.source.paths)
    again = open_split(cfg, "val", PRE, train=False)  # fixed seed: the same split every time
    assert again.source.paths == va.source.paths
    with pytest.raises(VptuneError, match="available splits: train, val, test, trainval"):
        open_split(cfg, "validation", PRE, False)
