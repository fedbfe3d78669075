"""Bit-identity against golden task files made before the architecture restructure (issue 13).

``tests/data/make_golden.py`` built, for a tiny seeded ViT and Swin and each of the nine methods, a model
with deterministically perturbed trained tensors, saved it with ``save_pretrained`` and recorded logits
on a fixed input. Rebuilding with the current code must give the same ``weights.safetensors`` (header parsed, tensor bytes exact), the
same logits (``torch.equal``), and every ``task.json`` key of the golden file with its value unchanged
(new keys may appear). Excluded as volatile: ``vptune_version``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.data.make_golden import BACKBONES, METHODS, ROOT, build, logits_of

VOLATILE = {"vptune_version"}


def _safetensors_parts(folder) -> tuple[dict, bytes]:
    """``weights.safetensors`` as (parsed header, tensor bytes). The header is compared parsed because
    safetensors writes its ``__metadata__`` map in hash order (two saves of one model may differ there);
    offsets, dtypes, shapes and every tensor byte are compared exactly."""
    raw = (folder / "weights.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]
CASES = [(k, m) for k in BACKBONES for m in METHODS]


@pytest.mark.parametrize(("kind", "method"), CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_task_file_and_logits_bit_identical(tmp_path, kind, method):
    golden = ROOT / kind / method
    model = build(kind, method)
    model.save_pretrained(tmp_path)
    assert _safetensors_parts(tmp_path) == _safetensors_parts(golden)
    assert torch.equal(logits_of(model, kind), load_file(str(golden / "logits.safetensors"))["logits"])
    before = json.loads((golden / "task.json").read_text())
    after = json.loads((tmp_path / "task.json").read_text())
    for key, value in before.items():
        if key not in VOLATILE:
            assert after.get(key) == value, key


def test_golden_reload_gives_same_logits():
    """The golden folders themselves load with the current code and give the recorded logits."""
    import vptune
    from tests.data.make_golden import tiny_backbone

    for kind in BACKBONES:
        for method in METHODS:
            model = vptune.TunedModel.from_pretrained(ROOT / kind / method, backbone=tiny_backbone(kind)).eval()
            want = load_file(str(ROOT / kind / method / "logits.safetensors"))["logits"]
            assert torch.equal(logits_of(model, kind), want), (kind, method)
