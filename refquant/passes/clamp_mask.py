"""clamp_mask_constants: huge or infinite constants on their way to a Softmax are clamped (to ±100 or ±1e4).

Attention masks are written as ``(1 - mask) * -3.4e38`` (paraphrase-MiniLM), ``-1e9``, ``-inf``...
added to the scores before a Softmax. Any value far below the other scores gives the same Softmax:
``exp(-1e4 - s)`` is exactly 0 in float32, as ``exp(-3.4e38)`` is. But a quantizer sizes its grid on
the range it sees, and onnxruntime's quantizer picks a scale of 1.3e36 for this tensor, on which every
real score is 0. Clamping keeps the outputs (``prepare`` checks that on the model, with data where
given) and brings the range from 3.4e38 to the limit.

How far: ``limit`` (default 1e4, HuggingFace's old mask value). ``prepare`` tries 100 first and falls
back to 1e4 when the outputs move (``CANDIDATES``): the Softmax input's 8-bit grid spans the mask
value, so its step is ``limit / 255`` -- 39 at 1e4, which still sends every real score to 0, but 0.4
at 100. On paraphrase-MiniLM-L3 (W8A8 min-max QuantSim, mean cosine of the pooled embeddings against
FP32 on 128 random sentences) that is 0.71 for both -3.4e38 and -1e4, and 0.84 for -100; the outputs
in float stay identical. ``exp(-100)`` (4e-44) vanishes next to the Softmax's largest term, so -100
keeps the outputs as long as no masked score exceeds the largest real one by more than ~80.

What counts: a float constant (initializer, or a ``ConstantOfShape`` value) with a value beyond
``threshold`` (65504, the float16 maximum, by default) or infinite, that reaches a Softmax or
LogSoftmax through mask arithmetic (Mul, Add, Sub, Where, Expand, Cast, reshaping ops...). Other huge
constants are left alone and named in the notes. Names do not change; values do.
"""

from __future__ import annotations

import numpy as np

from ..ir import Graph
from .common import PassResult

LIMIT = 1e4
CANDIDATES = [{"limit": 100.0}, {"limit": LIMIT}]  # what prepare tries, boldest first
THRESHOLD = 65504.0
TARGETS = {"Softmax", "LogSoftmax"}
# ops a mask travels through between its constant and the Softmax
THROUGH = {"Mul", "Add", "Sub", "Div", "Neg", "Where", "Expand", "Cast", "CastLike", "Unsqueeze", "Squeeze",
           "Reshape", "Flatten", "Transpose", "Concat", "Tile", "Slice", "Gather", "Min", "Max", "Identity"}


def is_huge(array: np.ndarray, threshold: float = THRESHOLD) -> bool:
    if array.dtype.kind != "f" or array.size == 0:
        return False
    with np.errstate(invalid="ignore"):
        return bool(np.any(np.abs(array.astype(np.float64)) > threshold))


def reaches_softmax(graph: Graph, name: str, max_depth: int = 12) -> str | None:
    """The name of a Softmax/LogSoftmax that ``name`` reaches through mask arithmetic, or None."""
    consumers = graph.consumers()
    frontier, seen = [name], {name}
    for _ in range(max_depth):
        following = []
        for tensor in frontier:
            for node in consumers.get(tensor, []):
                if node.op_type in TARGETS and not node.domain:
                    return node.name
                if node.op_type in THROUGH and not node.domain:
                    following += [o for o in node.outputs if o and o not in seen]
                    seen.update(node.outputs)
        frontier = following
        if not frontier:
            break
    return None


def huge_constants(graph: Graph, threshold: float = THRESHOLD) -> list[tuple[str, object]]:
    """(tensor name, ConstantOfShape node or None) for every huge float constant of the graph."""
    found = [(name, None) for name, array in graph.initializers.items() if is_huge(array, threshold)]
    for node in graph.nodes:
        value = node.attrs.get("value") if node.op_type == "ConstantOfShape" and not node.domain else None
        if isinstance(value, np.ndarray) and is_huge(value, threshold):
            found.append((node.outputs[0], node))
    return found


def clamp(array: np.ndarray, limit: float) -> np.ndarray:
    """±inf and everything beyond ±limit to ±limit; NaN stays NaN."""
    return np.clip(array, -limit, limit).astype(array.dtype)


def run(graph: Graph, limit: float = LIMIT, threshold: float = THRESHOLD) -> PassResult:
    result = PassResult()
    for name, node in huge_constants(graph, threshold):
        array = graph.initializers[name] if node is None else node.attrs["value"]
        extreme = float(np.nanmax(np.abs(array.astype(np.float64))))
        softmax = reaches_softmax(graph, name)
        if softmax is None:
            result.notes.append(f"left {name!r} (|value| up to {extreme:.3g}): it does not reach a Softmax")
            continue
        clamped = clamp(array, limit)
        where = f"ConstantOfShape {node.name!r} value" if node is not None else f"initializer {name!r}"
        if node is None:
            graph.initializers[name] = clamped
        else:
            node.attrs["value"] = clamped
        result.changes.append(f"clamped {where} from |value| {extreme:.3g} to {limit:g} "
                              f"(it reaches Softmax {softmax!r})")
    return result
