"""The method protocol, its registry and trainability as data.

A method (peft-style, one file each) supplies hooks to the one block loop,
:meth:`vptune.model.TunedModel.forward_features` (the paper's Eq. 1-6)::

    tokens = embed(images)
    for i in blocks:  tokens, given = method.block_input(i, tokens, B);  tokens = run_block(i, tokens, given)
    features = method.fuse(method.pool(backbone, tokens), images)

and never owns the loop. What it declares:

- ``trainable_patterns(backbone)``: anchored regular expressions over the parameter names of the
  :class:`~vptune.model.TunedModel` (``backbone.*``, ``method.*``, ``head.*``) that train. The head always
  trains. :func:`set_trainable` is the one place that sets ``requires_grad``; it raises on a pattern
  that matches nothing (big_vision's trainability-as-data). ``changes_backbone`` is derived from them
  (:func:`trains_backbone`), never kept by hand.
- ``block_prompts(i, batch)``: the prompts block ``i`` receives (or None), and ``block_adapter(i)``: an
  optional FFN adapter module for block ``i``; :meth:`Method.block_input` packs them into a
  :class:`BlockInput` (a method with more to say, such as VPT's prompt location, overrides it). The
  backbone alone decides where those go; methods never slice token sequences.
- ``pool(backbone, tokens)`` and ``fuse(features, images)``: the head's input (a side branch such as
  side-tuning blends in at ``fuse``).
- ``build_head(in_dim, num_classes)``: the classifier (linear by default).
- Its optimisation, as data: ``optimizer`` (vptune's default recipe) and ``paper_optimizer`` (the paper's,
  Sec. 4.1, used by ``recipe: reference``), ``default_lr`` (the peak lr per optimiser when a config gives
  none), ``lr_groups`` (named groups of trained tensors whose lr a config may scale; the head is always the
  group ``head``) and ``no_decay_patterns`` (tensors that take no weight decay beyond the general rule).
- ``head_only``: only a linear head trains, on the plain backbone's pooled features (the linear probe;
  the one-pass linear sweep keys off it); ``sweep_axes``: which options a sweep grid may vary; ``shared_pass(num_blocks)``: how the
  task joins a mixed batch on a shared frozen backbone (:class:`SharedPass`), or None for its own pass.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from vptune.backbones.base import Backbone, Taps, Tokens
from vptune.checks import coerce_fields
from vptune.errors import VptuneError, check_choice

METHODS: dict[str, type[Method]] = {}
_SUFFIXED = re.compile(r"^(?P<base>[a-z]+)-(?P<k>\d+)$")


@dataclasses.dataclass
class NoOptions:
    """Methods without options."""


@dataclasses.dataclass(frozen=True)
class BlockInput:
    """What block ``i`` receives besides the running tokens (see :meth:`Backbone.run_block`).

    prompts: (p, d_i) or (B, p, d_i) prompts to insert or replace, or None. location: 'prepend' or 'add'.
    ffn_adapter: an optional module mapping the FFN output h to h + adapter(h).
    prompt_replace: (B,) bool per sample, mixed batches only. prompt_outputs: False when nobody reads
    this block's prompt outputs (the backbone may skip them).
    taps: layer name -> tap changing that layer's output inside the block (LoRA, DoRA, SSF; see
    :mod:`vptune.backbones.base`), or None.
    kv_prompts: learned (keys, values), each (L, d_i), concatenated to K and V in the block's attention
    (E2VPT). prompt_gate: a scalar in [0, 1]: how much the block changes the prompt tokens (gated prompts).
    attn_temperature: a scalar tau > 0 dividing the block's attention logits (gated prompts' attention
    shaping). All three None by default (and then not passed to ``run_block``)."""

    prompts: Tensor | None = None
    location: str = "prepend"
    ffn_adapter: nn.Module | None = None
    prompt_replace: Tensor | None = None
    prompt_outputs: bool = True
    taps: Taps | None = None
    kv_prompts: tuple[Tensor, Tensor] | None = None
    prompt_gate: Tensor | None = None
    attn_temperature: Tensor | None = None


class BlockHooks(Protocol):
    """What the block loop asks of a method (or of a mixed-batch hook set, :mod:`vptune.methods.mixed`)."""

    def block_input(self, i: int, tokens: Tokens, batch: int) -> tuple[Tokens, BlockInput]: ...

    def pool(self, backbone: Backbone, tokens: Tokens) -> Any: ...

    def fuse(self, features: Any, images: Tensor) -> Any: ...


@dataclasses.dataclass
class SharedPass:
    """How a task joins a mixed batch on a shared frozen backbone: per block its (p, d_i) prompts (None
    where it places none; all None for a head-only task) and its pool mode (None: the backbone's).
    ``taps``: block index -> layer name -> that layer's update (a :class:`vptune.methods.taps.LayerUpdate`:
    per-channel scale/shift and/or a low-rank term), applied per sample in the shared pass (SSF, LoRA, DoRA)."""

    prompts: list[Tensor | None]
    pool_mode: str | None = None
    taps: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)


class Method(nn.Module):
    """Base class: the plain frozen backbone with a linear head, nothing else trained."""

    name: ClassVar[str] = ""
    options_cls: ClassVar[type] = NoOptions
    suffix_option: ClassVar[str | None] = None  # "k" for partial-k and mlp-k
    optimizer: ClassVar[str] = "sgd"  # vptune's default recipe (see vptune/engine/recipes.py)
    paper_optimizer: ClassVar[str] = "sgd"  # the paper's optimiser for this method (Sec. 4.1)
    # peak lr (no batch-size scaling) per optimiser when a config gives none; chosen by the val-only
    # recipe study (benchmarks/recipe_study.py, BENCHMARKS.md "Recipe study")
    default_lr: ClassVar[dict[str, float]] = {"sgd": 0.1, "adamw": 1e-3}
    # the sweep's lr grid per optimiser under vptune's recipe (peak lrs; `recipe: reference` uses the paper's)
    lr_grid: ClassVar[dict[str, tuple[float, ...]]] = {"sgd": (0.1, 0.5, 2.5), "adamw": (1e-4, 3e-4, 1e-3)}
    lr_groups: ClassVar[dict[str, tuple[str, ...]]] = {}  # group name -> anchored patterns
    no_decay_patterns: ClassVar[tuple[str, ...]] = ()  # anchored patterns: no weight decay
    head_only: ClassVar[bool] = False  # only a linear head trains, on the plain backbone's pooled features
    sweep_axes: ClassVar[tuple[str, ...]] = ()  # options a sweep grid may vary (e.g. VPT's num_tokens)
    sweep_axis_names: ClassVar[dict[str, str]] = {}  # a sweep axis -> its short name in grid folder names

    def __init__(self, backbone: Backbone, options: Any) -> None:
        super().__init__()
        self.options = options
        self._changes_backbone: bool | None = None

    # --- what trains -----------------------------------------------------------------------------
    def trainable_patterns(self, backbone: Backbone) -> list[str]:
        return []

    @property
    def changes_backbone(self) -> bool:
        """Whether this method trains backbone tensors (so a model owns a copy of the backbone); derived
        from :meth:`trainable_patterns` by :func:`build_method`."""
        if self._changes_backbone is None:
            raise VptuneError(f"method {self.name!r} was not built with build_method(); changes_backbone is unknown")
        return self._changes_backbone

    # --- what the backbone receives (hooks of the block loop) ------------------------------------
    def block_prompts(self, i: int, batch: int) -> Tensor | None:
        return None

    def block_adapter(self, i: int) -> nn.Module | None:
        return None

    def block_taps(self, i: int) -> Taps | None:
        """Layer name -> tap for block ``i`` (LoRA, DoRA, SSF), or None."""
        return None

    def block_input(self, i: int, tokens: Tokens, batch: int) -> tuple[Tokens, BlockInput]:
        """The tokens block ``i`` runs on and what it receives (prompts, FFN adapter, taps)."""
        return tokens, BlockInput(prompts=self.block_prompts(i, batch), ffn_adapter=self.block_adapter(i),
                                  taps=self.block_taps(i))

    def pool(self, backbone: Backbone, tokens: Tokens) -> Tensor:
        """The final tokens -> (B, num_features), the backbone's default pooling."""
        return backbone.pool(tokens)

    def fuse(self, features: Tensor, images: Tensor) -> Tensor:
        """Blend a side branch into the pooled features (none by default)."""
        return features

    def shared_pass(self, num_blocks: int) -> SharedPass | None:
        """How this task joins a mixed batch on a shared frozen backbone, or None (it runs its own pass).
        A head-only method joins with no prompts; methods that only hand prepended prompts override."""
        return SharedPass([None] * num_blocks) if self.head_only else None

    def build_head(self, in_dim: int, num_classes: int) -> nn.Module:
        return linear_head(in_dim, num_classes)

    def option_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)


HEAD_NORMS = ("none", "batchnorm")
HEAD_INITS = ("small", "reference")
REFERENCE_HEAD_BIAS = -math.log((1 - 0.01) / 0.01)  # -4.595: the reference code's focal-loss prior


class NormedHead(nn.Module):
    """``head(BatchNorm(features))`` with a BatchNorm without affine parameters, as MAE's linear probe
    (He et al. 2022, Sec. A.2): the head then sees unit-scale features on any backbone, so one lr range
    suits every backbone's feature scale. In training it normalises with batch statistics, in eval with
    the running ones (stored in the task file)."""

    def __init__(self, in_dim: int, head: nn.Module) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)
        self.fc = head

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.norm(features))  # (B, d) -> (B, num_classes)


def build_task_head(method: Method, in_dim: int, num_classes: int, head_norm: str = "none",
                    head_init: str = "small") -> nn.Module:
    """The method's head, optionally behind a BatchNorm (``head_norm``) and with the reference code's
    init of its last Linear (``head_init="reference"``: kaiming-normal fan-out weight, bias -4.595)."""
    check_choice("head_norm", head_norm, HEAD_NORMS)
    check_choice("head_init", head_init, HEAD_INITS)
    head = method.build_head(in_dim, num_classes)
    if head_init == "reference":
        last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.kaiming_normal_(last.weight, a=0, mode="fan_out")
        nn.init.constant_(last.bias, REFERENCE_HEAD_BIAS)
    return NormedHead(in_dim, head) if head_norm == "batchnorm" else head


def linear_head(in_dim: int, num_classes: int) -> nn.Linear:
    """Linear head, weight ~ trunc_normal(std=0.01), bias 0, so the first logits are near zero.

    The reference code uses a kaiming-normal (fan_out) weight. On a backbone whose final features are
    large (the shared ViT-Ti's have norm ~58) that starts the loss near 28 and sends prompt gradients
    ~100x larger than with this init (measured: prompt grad norm 143 vs 1.7 at the same batch), so VPT
    diverges at every lr that moves the head. The paper does not specify the head init.
    """
    head = nn.Linear(in_dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(f"{n}-{cls.suffix_option}" if cls.suffix_option else n for n, cls in METHODS.items())


def parse_method_name(name: str) -> tuple[type[Method], dict[str, Any]]:
    """``"partial-2"`` -> (Partial, {"k": 2}); plain names map to themselves."""
    if name in METHODS and not METHODS[name].suffix_option:
        return METHODS[name], {}
    m = _SUFFIXED.match(name)
    if m and m["base"] in METHODS and METHODS[m["base"]].suffix_option:
        cls = METHODS[m["base"]]
        return cls, {cls.suffix_option: int(m["k"])}
    if name in METHODS:  # "partial" with k given as an option
        return METHODS[name], {}
    raise VptuneError(f"unknown method {name!r}; valid choices: {', '.join(list_methods())}")


def parse_options(cls: type[Method], options: dict[str, Any]) -> Any:
    """Build ``cls.options_cls`` from keyword options, refusing unknown keys with the valid ones and values
    of the wrong type (converted to the field's type where they can be: ``"8"`` -> 8)."""
    fields = {f.name: f for f in dataclasses.fields(cls.options_cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise VptuneError(f"method {cls.name!r} has no option(s) {unknown}; valid options: {valid}")
    options = coerce_fields(cls.options_cls, options, f"method {cls.name!r} options")
    try:
        opts = cls.options_cls(**options)
    except TypeError as e:
        raise VptuneError(f"bad options for method {cls.name!r}: {e}") from None
    validate = getattr(opts, "validate", None)
    if validate:
        validate()
    return opts


def build_method(name: str, backbone: Backbone, **options: Any) -> Method:
    """Instantiate a registered method on ``backbone`` with validated options."""
    cls, implied = parse_method_name(name)
    for key, value in implied.items():
        if key in options and options[key] != value:
            raise VptuneError(f"method {name!r} implies {key}={value}, but options give {key}={options[key]}")
    opts = parse_options(cls, {**options, **implied})
    try:
        method = cls(backbone, opts)
    except (RuntimeError, MemoryError, OverflowError) as e:  # sizes no tensor can have
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VptuneError(f"cannot build method {name!r} with options {opts}: {first}") from None
    method._changes_backbone = trains_backbone(method.trainable_patterns(backbone), backbone)
    return method


def trains_backbone(patterns: Sequence[str], backbone: Backbone) -> bool:
    """Whether any trainable pattern matches a parameter of ``backbone`` (named ``backbone.<name>``)."""
    compiled = [re.compile(p) for p in patterns]
    return any(c.match("backbone." + n) for n, _ in backbone.named_parameters() for c in compiled)


def set_trainable(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad`` from anchored patterns; returns the names that train.

    Every pattern must start with ``^`` and match at least one parameter name, else VptuneError.
    """
    compiled = []
    for p in patterns:
        if not p.startswith("^"):
            raise VptuneError(f"trainable pattern {p!r} must be anchored with '^'")
        compiled.append(re.compile(p))
    hits = [0] * len(compiled)
    trained = []
    for name, param in model.named_parameters():
        matched = [j for j, c in enumerate(compiled) if c.match(name)]
        for j in matched:
            hits[j] += 1
        param.requires_grad_(bool(matched))
        if matched:
            trained.append(name)
    missing = [p for p, n in zip(patterns, hits) if n == 0]
    if missing:
        raise VptuneError(f"trainable pattern(s) {missing} match no parameter of the model")
    return trained


def prefix_pattern(prefix: str) -> str:
    """Anchored pattern for every parameter under ``prefix`` (a dotted module path ending in '.')."""
    return "^" + re.escape(prefix)
