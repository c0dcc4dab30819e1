"""The op registry: ``@register("Conv", since=11)`` on a plain function.

A kernel is called as ``kernel(*inputs, **attrs)``: inputs are NumPy arrays (``None`` for an
omitted optional input), keyword arguments are the node's ONNX attributes with the defaults
written in the kernel's signature. It returns one array or a tuple (one per output).
A kernel that declares a parameter ``noutputs`` receives how many outputs the node has; one that
declares ``present_outputs`` receives one bool per output (False where the node omits it by an empty
name); one that declares ``ctx`` receives the runtime context (to run subgraphs).

Lookup resolves the entry with the highest ``since`` not above the node's opset version, like
ONNX's own versioning: a versioned op is a thin adapter over a common implementation.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

SPECIAL_PARAMS = ("noutputs", "ctx", "present_outputs")


@dataclass
class OpDef:
    op_type: str
    domain: str
    since: int
    kernel: Callable
    infer: Callable | None = None  # shape/dtype rule, see refquant.shape_inference
    shape_inputs: tuple = ()  # inputs whose *values* decide the output shape (Reshape's shape, ...)
    special: frozenset = field(default_factory=frozenset)
    attr_names: frozenset | None = None  # None: the kernel takes **attrs
    # inplace(*inputs, **attrs): the same result written into inputs[0]'s memory, or None when it cannot be
    # (dtype or broadcast shape differ); the runtime calls it only when nothing else can see inputs[0]
    inplace: Callable | None = None


_REGISTRY: dict[tuple[str, str], list[OpDef]] = {}


def register(op_type: str, since: int = 1, domain: str = "", infer: Callable | None = None,
             shape_inputs: tuple = ()):
    """Decorator: make ``fn`` the kernel of ``domain::op_type`` from opset ``since`` on.

    ``infer`` is an optional shape rule (see :mod:`refquant.shape_inference`); without one, shapes
    are inferred by running the kernel on stand-in arrays when every input shape is static and
    every input listed in ``shape_inputs`` (those whose values decide the output shape) is constant.
    """

    def wrap(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        special = frozenset(p for p in SPECIAL_PARAMS if p in params)
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            attr_names = None
        else:
            attr_names = frozenset(
                name for name, p in params.items()
                if p.kind is p.KEYWORD_ONLY and name not in SPECIAL_PARAMS
            )
        entry = OpDef(op_type, domain, since, fn, infer, shape_inputs, special, attr_names)
        versions = _REGISTRY.setdefault((domain, op_type), [])
        versions[:] = [v for v in versions if v.since != since] + [entry]
        versions.sort(key=lambda v: v.since)
        return fn

    return wrap


def register_inplace(forward: Callable):
    """Decorator: ``fn`` is the in-place form of the kernel ``forward`` (every op version using it)."""

    def wrap(fn: Callable) -> Callable:
        found = False
        for versions in _REGISTRY.values():
            for entry in versions:
                if entry.kernel is forward:
                    entry.inplace, found = fn, True
        if not found:
            raise ValueError(f"{forward.__name__} is not a registered kernel")
        return fn

    return wrap


def lookup(op_type: str, domain: str = "", version: int | None = None) -> OpDef | None:
    """The entry for ``op_type`` at opset ``version`` (the newest when version is None)."""
    versions = _REGISTRY.get((_canonical_domain(domain), op_type))
    if not versions:
        return None
    if version is None:
        return versions[-1]
    usable = [v for v in versions if v.since <= version]
    return usable[-1] if usable else None


def registered_ops() -> list[tuple[str, str]]:
    """Every (domain, op_type) with at least one kernel."""
    return sorted(_REGISTRY)


def _canonical_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain
