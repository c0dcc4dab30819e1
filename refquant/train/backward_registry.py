"""The backward registry: for each op type, the function that maps output gradients to input gradients.

A backward is registered beside the op's forward kernel (same op type, same normalized attributes):

    @register_backward("Relu")
    def relu_backward(grads_out, inputs, outputs, **attrs):
        return [grads_out[0] * (inputs[0] > 0)]

``grads_out``: one array (or None when that output does not reach the loss) per node output;
``inputs`` / ``outputs``: the forward's input and output arrays (None for an omitted optional input);
``attrs``: the node's attributes exactly as the forward kernel receives them.
Returns one gradient per input, None where the input is not differentiable (shapes, indices, ...).
"""

from __future__ import annotations

from typing import Callable

_BACKWARD: dict[str, Callable] = {}


def register_backward(op_type: str):
    """Decorator: make ``fn`` the backward of ``op_type`` (default ONNX domain)."""

    def wrap(fn: Callable) -> Callable:
        _BACKWARD[op_type] = fn
        return fn

    return wrap


def lookup_backward(op_type: str) -> Callable | None:
    """The registered backward of ``op_type``, or None."""
    return _BACKWARD.get(op_type)


def differentiable_ops() -> list[str]:
    """Every op type with a registered backward."""
    return sorted(_BACKWARD)
