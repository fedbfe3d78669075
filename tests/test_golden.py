"""Agreement with golden task files made before the architecture restructure (issue 13).

``tests/data/make_golden.py`` built, for a tiny seeded ViT and Swin and each of the nine methods, a model
with deterministically perturbed trained tensors, saved it with ``save_pretrained`` and recorded logits
on a fixed input. Rebuilding with the current code must give the same ``weights.safetensors`` (header parsed and exact, tensors to 1e-6), the
same logits to 1e-6 (see ``ATOL``), and every ``task.json`` key of the golden file with its value unchanged
(new keys may appear). Excluded as volatile: ``vptune_version``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.data.make_golden import BACKBONES, METHODS, ROOT, build, logits_of

VOLATILE = {"vptune_version"}
# Logits are compared to 1e-6, not bit for bit: float32 CPU kernels round differently on different CPUs
# (the goldens were recorded on an AMD EPYC; an Intel Xeon with AMX gives logits up to 9e-8 away, one or two
# ulps of logits of size ~0.5). Any change to what the model computes moves them by orders of magnitude more.
# The same holds for trained tensors whose init is computed (the adapter's up-projection bias), so the saved
# tensors get the same tolerance; the safetensors header is compared exactly.
ATOL = 1e-6


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: object) -> None:
    torch.testing.assert_close(got, want, rtol=0.0, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _safetensors_header(folder) -> dict:
    """``weights.safetensors``'s parsed header: names, dtypes, shapes, offsets and metadata. Compared parsed
    because safetensors writes its ``__metadata__`` map in hash order (two saves of one model may differ there)."""
    raw = (folder / "weights.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])
CASES = [(k, m) for k in BACKBONES for m in METHODS]


@pytest.mark.parametrize(("kind", "method"), CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_task_file_and_logits_match_golden(tmp_path, kind, method):
    golden = ROOT / kind / method
    model = build(kind, method)
    model.save_pretrained(tmp_path)
    assert _safetensors_header(tmp_path) == _safetensors_header(golden)
    got, want = load_file(str(tmp_path / "weights.safetensors")), load_file(str(golden / "weights.safetensors"))
    for name in want:
        _assert_close(got[name], want[name], (kind, method, name))
    _assert_close(logits_of(model, kind), load_file(str(golden / "logits.safetensors"))["logits"], (kind, method))
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
            _assert_close(logits_of(model, kind), want, (kind, method))
