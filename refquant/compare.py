"""refquant against onnxruntime on the same model and feeds, per output or per intermediate tensor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from . import dtypes
from .ir import Graph
from .runtime import Session


@dataclass
class Difference:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float  # max|a - b| / max|b|: scale-free, robust to zeros in b


def difference(name: str, ours: np.ndarray, theirs: np.ndarray) -> Difference:
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        return Difference(name, b.shape, float("inf"), float("inf"))
    if a.size == 0:
        return Difference(name, b.shape, 0.0, 0.0)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    err = np.where(same, 0.0, np.abs(a - b))
    max_abs = float(np.max(err)) if np.all(np.isfinite(err)) else float("inf")
    scale = float(np.max(np.abs(b[np.isfinite(b)]))) if np.isfinite(b).any() else 0.0
    return Difference(name, b.shape, max_abs, max_abs / scale if scale > 0 else max_abs)


def onnxruntime_outputs(model, feeds: dict, names: list[str] | None = None, graph: Graph | None = None,
                        optimize: bool = False) -> dict[str, np.ndarray]:
    """Run onnxruntime on ``model`` (path or ModelProto); extra ``names`` become graph outputs."""
    import onnxruntime as ort

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    if names:
        proto = _with_outputs(proto, names, graph)
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs()]
    return dict(zip(wanted, session.run(wanted, feeds)))


def _with_outputs(proto: onnx.ModelProto, names: list[str], graph: Graph | None) -> onnx.ModelProto:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name in existing:
            continue
        value = graph.values.get(name) if graph is not None else None
        if value is None or value.dtype is None:
            continue
        proto.graph.output.append(helper.make_tensor_value_info(name, dtypes.to_onnx(value.dtype), None))
    return proto


def compare_with_onnxruntime(model, graph: Graph, feeds: dict, all_tensors: bool = False) -> list[Difference]:
    """One Difference per graph output (and per node output with ``all_tensors``), in graph order."""
    names = list(graph.output_names)
    if all_tensors:
        produced = [o for n in graph.nodes for o in n.outputs if o and o not in names]
        names = produced + names
    theirs = onnxruntime_outputs(model, feeds, names if all_tensors else None, graph)
    ours = Session(graph).run(feeds, outputs=[n for n in names if n in theirs])
    return [difference(name, ours[name], theirs[name]) for name in names if name in theirs]
