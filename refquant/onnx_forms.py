"""Opset-dependent node forms, normalized once at import and restored at export.

Over ONNX's history many attributes became inputs (Clip's min/max at opset 11, the axes of
Squeeze/Unsqueeze/ReduceSum at 13 and of the other reductions at 18, Slice's starts/ends at 10,
...). The IR holds every node in its newest form, so kernels and passes handle one form only:
an attribute of an older form becomes a constant initializer wired to the input it moved to,
and the node's ``version`` becomes the opset that introduced the input form. Export reverses it
when the target opset predates that form.

Semantic changes that are not a move (Softmax's 2-D coercion before opset 13, Resize-10's
coordinates, GroupNormalization-18's per-group affine) are versioned kernels, not rewrites.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ir import Graph, Node


@dataclass(frozen=True)
class Moved:
    attr: str  # the attribute's name in the old form
    index: int  # the input it became
    dtype: str  # "int64", "float32" or "data": same element type as input 0


@dataclass(frozen=True)
class Form:
    since: int  # the opset where the input form starts
    moved: tuple[Moved, ...]


_REDUCE_18 = Form(18, (Moved("axes", 1, "int64"),))
FORMS: dict[str, Form] = {
    "Clip": Form(11, (Moved("min", 1, "data"), Moved("max", 2, "data"))),
    "Dropout": Form(12, (Moved("ratio", 1, "float32"),)),
    "Pad": Form(11, (Moved("pads", 1, "int64"), Moved("value", 2, "data"))),
    "Slice": Form(10, (Moved("starts", 1, "int64"), Moved("ends", 2, "int64"), Moved("axes", 3, "int64"))),
    "Split": Form(13, (Moved("split", 1, "int64"),)),
    "Squeeze": Form(13, (Moved("axes", 1, "int64"),)),
    "Unsqueeze": Form(13, (Moved("axes", 1, "int64"),)),
    "TopK": Form(10, (Moved("k", 1, "int64"),)),
    "Upsample": Form(9, (Moved("scales", 1, "float32"),)),
    "ReduceSum": Form(13, (Moved("axes", 1, "int64"),)),
    **{op: _REDUCE_18 for op in (
        "ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
}


def normalize_node(node: Node, graph: Graph, data_dtype=None) -> None:
    """Rewrite ``node`` (in place) into its newest input form, adding constants to ``graph``."""
    if node.domain not in ("", "ai.onnx"):
        return
    if node.op_type == "Pad" and "paddings" in node.attrs:  # Pad-1 named it differently
        node.attrs["pads"] = node.attrs.pop("paddings")
    if node.op_type == "BatchNormalization":
        for legacy in ("spatial", "is_test", "consumed_inputs"):
            node.attrs.pop(legacy, None)
    if node.op_type == "Dropout":
        node.attrs.pop("is_test", None)
    form = FORMS.get(node.op_type)
    if form is None or node.version >= form.since:
        return
    for moved in form.moved:
        if moved.attr not in node.attrs:
            continue
        value = node.attrs.pop(moved.attr)
        dtype = data_dtype if moved.dtype == "data" else moved.dtype
        array = np.array(value, dtype=dtype or np.float32)
        if moved.attr in ("pads", "starts", "ends", "axes", "split", "scales"):
            array = array.reshape(-1)
        else:
            array = array.reshape(())
        name = _fresh_name(graph, f"{node.name or node.op_type}_{moved.attr}")
        graph.initializers[name] = array
        while len(node.inputs) <= moved.index:
            node.inputs.append("")
        node.inputs[moved.index] = name
    node.version = form.since


def denormalize_node(node: Node, constants: dict[str, np.ndarray], opset: int) -> Node:
    """A copy of ``node`` in the form of ``opset`` (moved inputs back into attributes)."""
    form = FORMS.get(node.op_type)
    if node.domain not in ("", "ai.onnx") or form is None or opset >= form.since:
        return node
    inputs = list(node.inputs)
    attrs = dict(node.attrs)
    for moved in form.moved:
        if moved.index >= len(inputs) or not inputs[moved.index]:
            continue
        name = inputs[moved.index]
        if name not in constants:
            raise ValueError(
                f"node {node.name!r} ({node.op_type}): input {moved.index} ({name!r}) is not constant, "
                f"so it cannot be written as attribute {moved.attr!r} of opset {opset}; export at opset "
                f">= {form.since}"
            )
        array = constants[name]
        attrs[moved.attr] = array.reshape(-1).tolist() if array.ndim else array.item()
        inputs[moved.index] = ""
    while inputs and not inputs[-1]:
        inputs.pop()
    return Node(node.op_type, inputs, list(node.outputs), attrs, node.name, node.domain, opset)


def _fresh_name(graph: Graph, base: str) -> str:
    name, k = base, 0
    while name in graph.initializers or name in graph.values:
        k += 1
        name = f"{base}_{k}"
    return name
