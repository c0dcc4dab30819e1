"""refquant's own dtype and shape inference (it never relies on value_info being present).

Three ways, tried in this order for each node:

1. **Constant propagation**: every input is constant and small -> run the kernel; the outputs become
   known values too (this resolves Shape -> Gather -> Concat -> Reshape chains).
2. **A shape rule** registered beside the kernel (``infer=``): ``rule(*infos, **attrs)`` receives one
   :class:`TensorInfo` per input (dtype, shape with symbolic dims, constant value if known) and returns
   one TensorInfo per output. Rules carry symbolic dims such as ``"batch"`` through.
3. **Probing**: all input shapes are static and every value-deciding input (``shape_inputs``) is
   constant -> run the kernel on zero-filled stand-ins of those shapes.

Anything else stays unknown (``None``), which is allowed everywhere: the runtime does not need shapes.
"""

from __future__ import annotations

import inspect

import numpy as np

from .ir import Graph, Node, Value
from .ops import lookup
from .ops.shapes import UNKNOWN, TensorInfo

CONST_FOLD_LIMIT = 1 << 16  # elements: larger constant results are not kept in memory twice
PROBE_LIMIT = 1 << 22  # elements of stand-in data per probe


def infer_shapes(graph: Graph, outer: dict[str, TensorInfo] | None = None) -> Graph:
    """Fill ``graph.values`` with the dtype and shape of every tensor; returns the graph. ``outer``: what
    is known of the enclosing scopes' tensors, which a subgraph (If branch, Loop body) may read."""
    known: dict[str, TensorInfo] = dict(outer or {})
    for name, array in graph.initializers.items():
        known[name] = TensorInfo(array.dtype, tuple(array.shape), array)
    for v in graph.inputs:
        known[v.name] = TensorInfo(v.dtype, v.shape)
    for node in graph.nodes:
        infos = [known.get(name, UNKNOWN) if name else None for name in node.inputs]
        outs = _infer_node(node, infos)
        for name, info in zip(node.outputs, outs):
            if not name:
                continue
            declared = graph.values.get(name)
            dtype = info.dtype if info.dtype is not None else (declared.dtype if declared else None)
            shape = info.shape if info.shape is not None else (declared.shape if declared else None)
            known[name] = TensorInfo(dtype, shape, info.const, info.sym)
            graph.values[name] = Value(name, dtype, shape)
        for sub in node.subgraphs():
            infer_shapes(sub, known)
    for v in graph.outputs:
        if v.name in known:
            info = known[v.name]
            v.dtype = v.dtype if v.dtype is not None else info.dtype
            v.shape = v.shape if v.shape is not None else info.shape
    return graph


def _infer_node(node: Node, infos: list[TensorInfo | None]) -> list[TensorInfo]:
    opdef = lookup(node.op_type, node.domain, node.version)
    nout = len(node.outputs)
    if opdef is None:
        return [UNKNOWN] * nout
    kwargs = {k: v for k, v in node.attrs.items()}
    if "noutputs" in opdef.special:
        kwargs["noutputs"] = nout
    present = [i for i in infos if i is not None]
    if "ctx" not in opdef.special and present and all(i.const is not None for i in present) \
            and all(i.const.size <= CONST_FOLD_LIMIT for i in present):
        result = _call(opdef.kernel, [None if i is None else i.const for i in infos], kwargs)
        if result is not None:
            return [TensorInfo(a.dtype, tuple(a.shape), a if a.size <= CONST_FOLD_LIMIT else None)
                    for a in result] + [UNKNOWN] * (nout - len(result))
    if opdef.infer is not None:
        rule_kwargs = {k: v for k, v in kwargs.items() if k != "noutputs"}
        if "noutputs" in opdef.special and _accepts(opdef.infer, "noutputs"):
            rule_kwargs["noutputs"] = nout
        try:
            out = opdef.infer(*infos, **rule_kwargs)
        except Exception:  # a rule that cannot decide leaves the shape unknown
            out = None
        if out is not None:
            out = list(out) if isinstance(out, (tuple, list)) else [out]
            return out + [UNKNOWN] * (nout - len(out))
    if "ctx" not in opdef.special and _probeable(opdef, infos):
        stand_ins = [None if i is None else (i.const if i.const is not None else np.zeros(i.shape, i.dtype))
                     for i in infos]
        result = _call(opdef.kernel, stand_ins, kwargs)
        if result is not None:
            return [TensorInfo(a.dtype, tuple(a.shape)) for a in result] + [UNKNOWN] * (nout - len(result))
    return [UNKNOWN] * nout


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _probeable(opdef, infos) -> bool:
    total = 0
    for index, info in enumerate(infos):
        if info is None:
            continue
        if info.const is None:
            if index in opdef.shape_inputs or info.dtype is None or info.shape is None:
                return False
            if not all(isinstance(d, int) and d >= 0 for d in info.shape):
                return False
            total += int(np.prod(info.shape))
    return total <= PROBE_LIMIT


def _call(kernel, args, kwargs):
    try:
        with np.errstate(all="ignore"):
            out = kernel(*args, **kwargs)
    except Exception:
        return None
    out = out if isinstance(out, tuple) else (out,)
    return [np.asarray(a) for a in out]
