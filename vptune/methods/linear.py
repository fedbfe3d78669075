"""Linear probing: a linear head on the frozen backbone's final [CLS] (the paper's 'Linear')."""

from __future__ import annotations

from vptune.methods.base import Method, register


@register
class Linear(Method):
    name = "linear"
    optimizer = "sgd"
    paper_optimizer = "sgd"
    head_only = True
