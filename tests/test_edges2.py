"""Issue 15's loose ends in the library: a missing weights path, option / config types checked for library
callers (not only the CLI), and VTAB's x255 on dSprites' 0/1 pixels in the TFRecord reader."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY, tiny_vit
from vptune.backbones import create_backbone
from vptune.data import DataConfig, open_reader
from vptune.data.tfrecord import write_examples
from vptune.errors import VptuneError
from vptune.methods import build_method

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ missing weights

@pytest.mark.parametrize("name", [None, "vit_tiny_patch16_224"])
def test_a_missing_weights_path_says_it_does_not_exist(tmp_path, name):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(VptuneError, match=r"weights .*nope.* do not exist") as e:
        create_backbone(name, weights=missing)
    assert "give a backbone name" not in str(e.value)


def test_an_existing_folder_without_config_still_asks_for_a_name(tmp_path):
    with pytest.raises(VptuneError, match="give a backbone name or a weights folder with a config.json"):
        create_backbone(None, weights=tmp_path)


# ------------------------------------------------------------------------------------------ types for library callers

@pytest.mark.parametrize("options,message", [
    ({"num_tokens": "abc"}, "num_tokens must be int, got 'abc'"),
    ({"num_tokens": 2.5}, "num_tokens must be int, got 2.5"),
    ({"dropout": float("nan")}, "dropout must be a finite number"),
    ({"init": 3}, "init must be str, got 3"),
])
def test_build_method_refuses_options_of_the_wrong_type_in_one_line(options, message):
    with pytest.raises(VptuneError, match=message) as e:
        build_method("vpt-deep", tiny_vit(), **options)
    assert "\n" not in str(e.value) and "method 'vpt-deep' options." in str(e.value)


def test_build_method_converts_options_to_their_types():
    method = build_method("vpt-deep", tiny_vit(), num_tokens="3", dropout="0.25")
    assert method.options.num_tokens == 3 and type(method.options.num_tokens) is int
    assert method.options.dropout == 0.25


@pytest.mark.parametrize("overrides,message", [
    ({"depth": "abc"}, "backbone.config.depth must be int, got 'abc'"),
    ({"embed_dim": 32.5}, "backbone.config.embed_dim must be int, got 32.5"),
    ({"drop_path_rate": "inf"}, "backbone.config.drop_path_rate must be a finite number"),
])
def test_create_backbone_refuses_config_of_the_wrong_type_in_one_line(overrides, message):
    with pytest.raises(VptuneError, match=message):
        create_backbone("vit_tiny_patch16_224", **{**TINY, **overrides})


def test_create_backbone_converts_config_strings():
    backbone = create_backbone("vit_tiny_patch16_224", **{**TINY, "depth": "1", "embed_dim": "32"})
    assert len(backbone.blocks) == 1 and backbone.config.embed_dim == 32


# ------------------------------------------------------------------------------------------ dSprites pixels

def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def dsprites_image(seed: int) -> np.ndarray:
    """A TFDS dSprites image: (H, W, 1) uint8 with values 0/1 (saved as a greyscale PNG)."""
    return np.random.default_rng(seed).integers(0, 2, (8, 8), dtype=np.uint8)


@pytest.mark.parametrize("folder,key", [("dsprites_loc", "label_x_position"), ("dsprites_ori", "label_orientation")])
def test_dsprites_pixels_are_multiplied_by_255_as_vtab_does(tmp_path, folder, key):
    root = tmp_path / folder
    root.mkdir()
    images = [dsprites_image(s) for s in range(3)]
    write_examples(root / "dsprites-train.tfrecord-00000-of-00001",
                   [{"image": png(im), key: 4, "label_shape": 1} for im in images])
    source, labels = open_reader(DataConfig(root=str(root))).load("train")
    assert labels == [2, 2, 2] if key == "label_x_position" else labels == [1, 1, 1]
    for i, im in enumerate(images):
        got = np.asarray(source.load(i))
        # VTAB: tf.tile(image, [1, 1, 3]) * 255
        np.testing.assert_array_equal(got, np.repeat(im[..., None], 3, axis=-1) * 255)
        assert set(np.unique(got)) <= {0, 255}


def test_dsprites_images_already_in_0_255_are_left_alone(tmp_path):
    root = tmp_path / "dsprites_loc"
    root.mkdir()
    im = dsprites_image(0) * 200
    write_examples(root / "dsprites-train.tfrecord-00000-of-00001",
                   [{"image": png(im), "label_x_position": 0, "label_shape": 1}])
    source, _ = open_reader(DataConfig(root=str(root))).load("train")
    np.testing.assert_array_equal(np.asarray(source.load(0))[..., 0], im)


def test_other_tfrecord_tasks_keep_their_pixels(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    im = dsprites_image(1)
    write_examples(root / "plain-train.tfrecord-00000-of-00001", [{"image": png(im), "label": 0}])
    source, _ = open_reader(DataConfig(root=str(root))).load("train")
    np.testing.assert_array_equal(np.asarray(source.load(0))[..., 0], im)
