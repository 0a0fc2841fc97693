"""Selectors: which layers and operations a composite's rule acts on.

A composite is an ordered list of ``(selector, rule)`` pairs (RelevancePropagation.jl's
``Composite(primitives...)``); for every affine layer and every parameter-free operation on data the
first pair whose selector matches and whose rule applies to it wins.  A selector is a frozen
dataclass with ``matches(target)`` and a ``str()`` that :func:`jaxdtd.describe` prints as the reason:

* :class:`Path` ``(glob)``: the module path (``"CNN/Dense_1"``, from Flax's name stack) or, for a
  layer, the weight's pytree path (``"params/Dense_1/kernel"``) matches the glob;
* :class:`First`: an affine layer whose input passes through no other affine layer;
* :class:`LayerKind` ``("dense" | "conv")``;
* :class:`UnitKind` ``("layer" | "operation" | "island" | "softmax")``;
* :class:`Primitive` ``(name)``: the primitive (``"tanh"``; for a layer ``"dot_general"`` or
  ``"conv_general_dilated"``);
* :class:`Default`: everything;
* ``a & b`` (:class:`Both`): both match, e.g. ``Path("*/SelfAttention_*") & Primitive("mul")``.

Rules apply by type: affine rules (and ``Gradient``, ``Norm`` meaning ``Epsilon``) to layers,
operation rules to operations and islands.
"""

from __future__ import annotations

import dataclasses
import fnmatch

__all__ = ["Both", "Default", "First", "LayerKind", "Path", "Primitive", "Selector", "Target", "UnitKind"]


#: what a rule can act on: affine layers, single operations, elementwise islands, softmax units
UNIT_KINDS = ("layer", "operation", "island", "softmax")


@dataclasses.dataclass(frozen=True)
class Target:
    """What a selector sees of a layer or an operation."""

    unit: str  # one of UNIT_KINDS
    primitive: str
    module_path: str = ""
    param_path: str = ""
    layer_kind: str | None = None  # "dense" / "conv" for layers
    first: bool = False


class Selector:
    """Base class of selectors."""

    def matches(self, target: Target) -> bool:
        raise NotImplementedError

    def __and__(self, other: Selector) -> Both:
        return Both(self, other)


@dataclasses.dataclass(frozen=True)
class Path(Selector):
    glob: str

    def matches(self, target: Target) -> bool:
        return fnmatch.fnmatchcase(target.module_path, self.glob) or bool(
            target.param_path and fnmatch.fnmatchcase(target.param_path, self.glob)
        )

    def __str__(self) -> str:
        return f"layers[{self.glob!r}]"


@dataclasses.dataclass(frozen=True)
class First(Selector):
    def matches(self, target: Target) -> bool:
        return target.unit == "layer" and target.first

    def __str__(self) -> str:
        return "first"


@dataclasses.dataclass(frozen=True)
class LayerKind(Selector):
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "conv"):
            raise ValueError(f"LayerKind: kind must be 'dense' or 'conv', got {self.kind!r}")

    def matches(self, target: Target) -> bool:
        return target.unit == "layer" and target.layer_kind == self.kind

    def __str__(self) -> str:
        return self.kind


@dataclasses.dataclass(frozen=True)
class UnitKind(Selector):
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS:
            raise ValueError(
                f"UnitKind: kind must be one of {', '.join(map(repr, UNIT_KINDS))}, got {self.kind!r}"
            )

    def matches(self, target: Target) -> bool:
        return target.unit == self.kind

    def __str__(self) -> str:
        return f"unit[{self.kind!r}]"


@dataclasses.dataclass(frozen=True)
class Primitive(Selector):
    name: str

    def matches(self, target: Target) -> bool:
        return target.primitive == self.name

    def __str__(self) -> str:
        return f"operations[{self.name!r}]"


@dataclasses.dataclass(frozen=True)
class Default(Selector):
    def matches(self, target: Target) -> bool:
        return True

    def __str__(self) -> str:
        return "default"


@dataclasses.dataclass(frozen=True)
class Both(Selector):
    first: Selector
    second: Selector

    def matches(self, target: Target) -> bool:
        return self.first.matches(target) and self.second.matches(target)

    def __str__(self) -> str:
        return f"{self.first} & {self.second}"
