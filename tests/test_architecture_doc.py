"""docs/architecture.md's worked example ("Adding a method in one file") runs as written: registered by
name, it trains only what it declares, leaves the backbone untouched at its init, and reaches block i
through the one loop."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_vit
from vptune import create_model
from vptune.methods.base import METHODS

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def method_example() -> str:
    text = DOC.read_text()
    section = text[text.index("## Adding a method in one file"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture
def scale_method():
    namespace: dict = {}
    exec(compile(method_example(), str(DOC), "exec"), namespace)  # noqa: S102 -- the doc's own code
    try:
        yield METHODS["scale"]
    finally:
        METHODS.pop("scale", None)


def test_the_documented_method_works_in_one_file(scale_method) -> None:
    backbone = tiny_vit()
    model = create_model(backbone, "scale", 3).eval()
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    dim, depth = backbone.block_infos()[0].dim, backbone.num_blocks
    assert trained == sorted([f"method.scales.{i}.gamma" for i in range(depth)] + ["head.bias", "head.weight"])
    assert not model.method.changes_backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model.head(backbone.forward_features(x))
        torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-6)  # gamma = 0: the backbone itself
        model.method.scales[depth - 1].gamma.fill_(0.5)  # the last block's module is used, through the loop
        assert (model(x) - plain).abs().max() > 1e-3
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("method.")) == depth * dim
