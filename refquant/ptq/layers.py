"""The layers that AdaRound and SeqMSE optimize (and AutoQuant counts): Conv, ConvTranspose, Gemm and MatMul with a
constant weight, each written as a matrix product.

Per output position ``p`` (a Gemm/MatMul row, a conv output pixel of one sample) and group ``g``:

    y[g, :, p] = W_mat[g] @ cols[g, :, p] + bias,        dL/dW_mat = dY @ cols^T

``W_mat`` is the weight gathered into ``[G, M/G, K/G]`` (a permutation of it: Gemm/MatMul transpose it to
[out, in]; ConvTranspose swaps its in/out channels and flips the kernel, being a stride-1 conv over its
zero-upsampled input) and ``cols`` the im2col columns of the layer input. A layer also records the activation
that alone reads its output (Relu, Clip, PRelu, a Softmax over the channels, or a pointwise subgraph such as
SiLU), which AdaRound's loss can include.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import RefquantError
from ..ir import Graph, Node
from ..ops.nn import _as3d, _to3, _windows, conv_geometry
from .pointwise import IN_LOSS_BY_DEFAULT, Pointwise
from .pointwise import trace as trace_activation

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
COLUMN_BUDGET = 1 << 22  # floats of im2col columns built at once while streaming
SOFTMAX = "softmax"  # LinearLayer.activation of a layer whose output only a Softmax over its channels reads


@dataclass(frozen=True, eq=False)
class PRelu:
    """LinearLayer.activation of a layer whose output only a PRelu reads: ``f(y) = y`` for ``y >= 0``,
    ``slope[m] * y`` below, with the model's own slope of each output channel ``m`` (flat, ``[M]``)."""

    slope: np.ndarray


@dataclass
class LinearLayer:
    """A layer ``y[g, :, p] = W_mat[g] @ cols[g, :, p] + bias`` with a constant, quantized weight.

    ``index[g, m, k]`` is the flat position in the weight of ``W_mat[g, m, k]``; ``activation`` is
    the ``(lo, hi)`` clip of a Relu/Clip that alone reads the layer output, :data:`SOFTMAX` for a
    Softmax over the output channels (one group) that alone reads it, a :class:`PRelu`, a
    :class:`~refquant.ptq.pointwise.Pointwise` activation, or None;
    ``output_axis`` the weight axis of the output channels (what a per-channel encoding must use).
    """

    node: Node
    weight: str
    shape: tuple[int, ...]
    index: np.ndarray
    output_axis: int
    activation: tuple[float, float] | str | PRelu | Pointwise | None = None
    # include_activation="all": any elementwise subgraph (else the same as activation)
    activation_all: tuple[float, float] | str | PRelu | Pointwise | None = None

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0]

    @property
    def input(self) -> str:
        return self.node.inputs[0]

    @property
    def output(self) -> str:
        return self.node.outputs[0]

    @property
    def groups(self) -> int:
        return self.index.shape[0]

    def to_matrix(self, array: np.ndarray) -> np.ndarray:
        """A weight-shaped array in the ``[G, M/G, K/G]`` layout (a gather: a copy)."""
        return np.asarray(array).reshape(-1)[self.index]

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_matrix` (``index`` is a permutation)."""
        flat = np.empty(self.index.size, dtype=matrix.dtype)
        flat[self.index.reshape(-1)] = matrix.reshape(-1)
        return flat.reshape(self.shape)

    def columns(self, x: np.ndarray) -> "_RowColumns | _ConvColumns":
        """The im2col columns of the layer input ``x`` (one batch)."""
        op = self.node.op_type
        if op == "Conv":
            return _conv_columns(self.node, self.shape, x)
        if op == "ConvTranspose":
            return _conv_transpose_columns(self.node, self.shape, x)
        if op == "Gemm":
            rows = x.T if self.node.attrs.get("transA", 0) else x
            return _RowColumns(rows * np.float32(self.node.attrs.get("alpha", 1.0)))
        return _RowColumns(x.reshape(-1, x.shape[-1]))  # MatMul

    def output_matrix(self, y: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """The layer output ``[G, M/G, B]`` at flat positions (sample-major), all when None."""
        g, mg = self.index.shape[:2]
        if self.node.op_type in ("Conv", "ConvTranspose"):
            n, m = y.shape[:2]
            y2 = y.reshape(n, m, -1)
            if positions is None:
                rows = y2.transpose(0, 2, 1).reshape(-1, m)
            else:
                p = y2.shape[2]
                rows = y2[positions // p, :, positions % p]
        else:
            y2 = y.reshape(-1, y.shape[-1])
            rows = y2 if positions is None else y2[positions]
        return rows.T.reshape(g, mg, -1)


def find_layers(sim, op_types=LAYER_OPS) -> tuple[list[LinearLayer], list[str]]:
    """The layers to optimize, in graph order, and the names of those skipped (with why).

    A layer: an ``op_types`` node with a dynamic input 0, a constant weight (input 1) that only it
    reads and whose parameter quantizer is enabled and integer, and constant other inputs (bias)."""
    graph = sim.graph
    consumers = graph.consumers()
    outputs = set(graph.output_names)
    layers, skipped = [], []
    for node in graph.nodes:
        if node.op_type not in op_types or node.domain or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        quantizer = sim.quantizers.get(weight)
        if weight not in graph.initializers or quantizer is None or quantizer.kind != "param" or not quantizer.enabled:
            continue
        label = node.name or node.outputs[0]
        if quantizer.data_type != "int":
            skipped.append(f"{label} (weight quantizer is not an integer grid)")
        elif node.inputs[0] in graph.initializers or any(
                name and name not in graph.initializers for name in node.inputs[2:]):
            skipped.append(f"{label} (constant input or dynamic bias)")
        elif len(consumers.get(weight, [])) != 1:
            skipped.append(f"{label} (weight shared with other nodes)")
        else:
            layer = _linear_layer(node, graph.initializers[weight].shape)
            if layer is None:
                skipped.append(f"{label} (weight layout not supported)")
            else:
                layer.activation = _following_activation(graph, node, consumers, outputs, layer.groups)
                layer.activation_all = layer.activation
                if layer.activation is None or isinstance(layer.activation, Pointwise):
                    layer.activation_all = trace_activation(graph, node.outputs[0], consumers, outputs)
                layers.append(layer)
    nested = _layers_in_subgraphs(graph, op_types)
    if nested:
        skipped.append(f"{len(nested)} inside If/Loop/Scan subgraphs ({', '.join(nested[:3])}"
                       f"{', ...' if len(nested) > 3 else ''}: subgraphs are simulated as given)")
    return layers, skipped


def included_layers(sim, layers: list[LinearLayer], skipped: list[str],
                    names) -> tuple[list[LinearLayer], list[str]]:
    """``(layers, skipped)`` restricted to the node names ``names``; a name that is no layer of ``layers`` is a
    :class:`RefquantError` saying why (not in the graph, not a Conv/ConvTranspose/Gemm/MatMul, or skipped)."""
    if isinstance(names, str):
        raise RefquantError("adaround: nodes_to_include is a list of node names, not one string")
    names = list(names)
    by_name = {layer.name: layer for layer in layers}
    nodes = {node.name: node for node in sim.graph.nodes}
    for name in names:
        if name in by_name:
            continue
        why = [s for s in skipped if s.startswith(f"{name} (")]
        reason = why[0][len(name) + 1:] if why else "not in the graph" if name not in nodes else \
            f"a {nodes[name].op_type} node" if nodes[name].op_type not in LAYER_OPS else \
            "its weight is not a constant with an enabled parameter quantizer"
        raise RefquantError(f"adaround: node {name!r} in nodes_to_include cannot be AdaRounded: {reason}")
    wanted = set(names)
    return ([layer for layer in layers if layer.name in wanted],
            [s for s in skipped if any(s.startswith(f"{name} (") for name in wanted)])


def _layers_in_subgraphs(graph: Graph, op_types) -> list[str]:
    """Names of the ``op_types`` nodes inside the subgraphs of ``graph``'s nodes (not optimized)."""
    return [n.name or n.outputs[0] for node in graph.nodes for sub in node.subgraphs() for n in sub.walk()
            if n.op_type in op_types and not n.domain]


def _linear_layer(node: Node, shape: tuple[int, ...]) -> LinearLayer | None:
    """The matrix layout of ``node``'s weight, or None for layouts it does not cover."""
    flat = np.arange(int(np.prod(shape))).reshape(shape)
    op = node.op_type
    if op in ("Gemm", "MatMul"):
        if len(shape) != 2:
            return None
        trans_b = op == "Gemm" and node.attrs.get("transB", 0)
        matrix = flat if trans_b else flat.T  # [out, in]
        return LinearLayer(node, node.inputs[1], shape, np.ascontiguousarray(matrix[None]), 0 if trans_b else 1)
    if len(shape) < 3:
        return None
    group = int(node.attrs.get("group", 1))
    if op == "Conv":  # W [M, C/G, *k]: rows m of group g are g*M/G + m, columns (c, k) row-major
        return LinearLayer(node, node.inputs[1], shape, flat.reshape(group, shape[0] // group, -1), 0)
    # ConvTranspose W [C, M/G, *k] = a stride-1 conv over the upsampled input with weight
    # W'[g*M/G + m, c, k'] = W[g*C/G + c, m, flipped k']
    c, mg = shape[0], shape[1]
    grouped = flat.reshape((group, c // group, mg) + tuple(shape[2:]))
    spatial = tuple(range(3, grouped.ndim))
    conv = np.flip(grouped, axis=spatial).transpose((0, 2, 1) + spatial)
    return LinearLayer(node, node.inputs[1], shape, np.ascontiguousarray(conv).reshape(group, mg, -1), 1)


def _following_activation(graph: Graph, node: Node, consumers, outputs, groups: int = 1):
    """``(lo, hi)`` of a Relu or constant Clip that is the only reader of the layer output,
    :data:`SOFTMAX` for a Softmax over exactly the output channels, a :class:`PRelu` for a PRelu
    with a constant per-channel slope, else the Sigmoid, Tanh or SiLU subgraph that alone reads it
    (a :class:`~refquant.ptq.pointwise.Pointwise` of ``pointwise.IN_LOSS_BY_DEFAULT``), else None."""
    users = consumers.get(node.outputs[0], [])
    if node.outputs[0] in outputs:
        return None
    if len(users) == 1 and users[0].op_type in ("Relu", "Softmax", "PRelu", "Clip"):
        return _single_activation(graph, node, users[0], groups)
    return trace_activation(graph, node.outputs[0], consumers, outputs, IN_LOSS_BY_DEFAULT)


def _single_activation(graph: Graph, node: Node, act: Node, groups: int):
    """The activation of :func:`_following_activation` for its one reader ``act``: Relu, Softmax, PRelu, Clip."""
    if act.op_type == "Relu":
        return 0.0, math.inf
    if act.op_type == "Softmax":
        return SOFTMAX if groups == 1 and _softmax_over_channels(node, act) else None
    if act.op_type == "PRelu":
        return _prelu_slopes(graph, node, act)
    if "min" in act.attrs or "max" in act.attrs:  # Clip before opset 11
        return float(act.attrs.get("min", -math.inf)), float(act.attrs.get("max", math.inf))
    bounds = []
    for i, default in ((1, -math.inf), (2, math.inf)):
        name = act.inputs[i] if len(act.inputs) > i else ""
        if name and name not in graph.initializers:
            return None
        bounds.append(float(graph.initializers[name]) if name else default)
    return bounds[0], bounds[1]


def _softmax_over_channels(layer: Node, softmax: Node) -> bool:
    """Whether ``softmax`` normalizes over the output-channel axis of ``layer``'s output alone: axis 1
    of a Gemm ([N, M]) or Conv ([N, M, *spatial]) output, the last axis of a MatMul's. Before opset 13,
    Softmax flattens the axes from ``axis`` on into one: over the channels alone only for a 2-D output."""
    axis = int(softmax.attrs.get("axis", -1 if softmax.version >= 13 else 1))
    if layer.op_type == "Gemm":
        return axis in (1, -1)
    if layer.op_type == "MatMul":
        return axis == -1 and softmax.version >= 13
    return layer.op_type == "Conv" and axis == 1 and softmax.version >= 13


def _prelu_slopes(graph: Graph, layer: Node, prelu: Node) -> PRelu | None:
    """The PRelu's constant slope as one value per output channel, or None when it varies along another
    axis (or is not constant). The slope broadcasts against ``[N, M]`` (Gemm) or ``[N, M, *spatial]``
    (Conv): a per-channel slope has M entries on axis 1 of that shape; a MatMul's channels are its last axis."""
    slope = graph.initializers.get(prelu.inputs[1]) if len(prelu.inputs) > 1 else None
    if slope is None:
        return None
    slope = np.asarray(slope, dtype=np.float64)
    if slope.size == 1:
        return PRelu(slope.reshape(1))
    shape = slope.shape
    if layer.op_type == "MatMul":
        per_channel = all(d == 1 for d in shape[:-1])
    else:  # right-aligned broadcast: [M] for Gemm, [M, 1, ..., 1] for Conv (rank = weight rank)
        rank = 2 if layer.op_type == "Gemm" else len(graph.initializers[layer.inputs[1]].shape)
        axis = len(shape) - (rank - 1)  # where output axis 1 lands in the slope's shape
        per_channel = 0 <= axis < len(shape) and all(d == 1 for i, d in enumerate(shape) if i != axis)
    return PRelu(slope.reshape(-1)) if per_channel else None


# im2col: a layer's input as the columns of its matrix product
class _RowColumns:
    """Gemm/MatMul: the columns are the input rows, ``[1, K, B]``."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        self.count = rows.shape[0]
        self.height = rows.shape[1]  # G * K/G

    def take(self, positions: np.ndarray | None = None) -> np.ndarray:
        rows = self.rows if positions is None else self.rows[positions]
        return np.ascontiguousarray(rows.T, dtype=np.float32)[None]


class _ConvColumns:
    """Conv: ``cols[g, (c, kd, kh, kw), p] = xp[n, g*C/G + c, od*s0 + kd*d0, oh*s1 + kh*d1, ow*s2 + kw*d2]``
    for position ``p = (n, od, oh, ow)``, from the padded input ``xp`` [N, C, D, H, W]."""

    def __init__(self, xp, kernel3, stride3, dilation3, out3, groups):
        self.xp, self.kernel3, self.stride3, self.dilation3 = xp, kernel3, stride3, dilation3
        self.out3 = tuple(int(o) for o in out3)
        self.groups = groups
        self.per_sample = int(np.prod(self.out3))
        self.count = xp.shape[0] * self.per_sample
        self.height = xp.shape[1] * int(np.prod(kernel3))

    def take(self, positions: np.ndarray | None = None) -> np.ndarray:
        """``[G, K/G, B]`` float32 columns at sorted flat positions (all when None)."""
        if positions is None:
            positions = np.arange(self.count)
        out = np.empty((self.height, len(positions)), dtype=np.float32)
        samples = positions // self.per_sample
        bounds = np.flatnonzero(np.diff(samples)) + 1
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(positions)]):
            n = samples[start]
            view = _windows(self.xp[n], self.kernel3, self.stride3, self.dilation3, self.out3)
            local = positions[start:stop] - n * self.per_sample
            if len(local) == self.per_sample:
                out[:, start:stop] = view.reshape(self.height, -1)
            else:
                a, b, e = np.unravel_index(local, self.out3)
                out[:, start:stop] = view[:, :, :, :, a, b, e].reshape(self.height, -1)
        return out.reshape(self.groups, self.height // self.groups, -1)


def _conv_columns(node: Node, shape, x: np.ndarray) -> _ConvColumns:
    attrs = node.attrs
    kernel = list(attrs.get("kernel_shape") or shape[2:])
    n_spatial = x.ndim - 2
    begin, end, out = conv_geometry(list(x.shape[2:]), kernel, attrs.get("strides"), attrs.get("dilations"),
                                    attrs.get("pads"), attrs.get("auto_pad", "NOTSET"))
    x3 = _as3d(np.asarray(x, dtype=np.float32))
    widths = [(0, 0), (0, 0)] + [(int(b), int(e)) for b, e in zip(_to3(begin, 0), _to3(end, 0))]
    return _ConvColumns(np.pad(x3, widths), tuple(_to3(kernel, 1)), _to3(attrs.get("strides") or [1] * n_spatial, 1),
                        _to3(attrs.get("dilations") or [1] * n_spatial, 1), _to3(out, 1), int(attrs.get("group", 1)))


def _conv_transpose_columns(node: Node, shape, x: np.ndarray) -> _ConvColumns:
    """ConvTranspose as a stride-1 conv: zero-upsample the input by the strides, pad each side by
    ``dilation*(k-1) - pad`` (crop if negative; the end side sized so the output size matches)."""
    from ..ops.nn import _conv_transpose_geometry

    attrs = node.attrs
    n_spatial = x.ndim - 2
    kernel = list(attrs.get("kernel_shape") or shape[2:])
    strides = list(attrs.get("strides") or [1] * n_spatial)
    dilations = list(attrs.get("dilations") or [1] * n_spatial)
    begin, out = _conv_transpose_geometry(list(x.shape[2:]), kernel, strides, dilations, attrs.get("pads"),
                                          attrs.get("auto_pad", "NOTSET"), attrs.get("output_padding"),
                                          attrs.get("output_shape"))
    up_shape = [s * (i - 1) + 1 for s, i in zip(strides, x.shape[2:])]
    up = np.zeros(x.shape[:2] + tuple(up_shape), dtype=np.float32)
    up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    left = [e - 1 - b for e, b in zip(extent, begin)]
    right = [o + e - 1 - u - lft for o, e, u, lft in zip(out, extent, up_shape, left)]
    for axis, (lft, rgt) in enumerate(zip(left, right), start=2):  # negative padding = cropping
        up = up[(slice(None),) * axis + (slice(max(0, -lft), up.shape[axis] - max(0, -rgt)),)]
    widths = [(0, 0), (0, 0)] + [(max(0, lft), max(0, rgt)) for lft, rgt in zip(left, right)]
    xp = _as3d(np.pad(up, widths))
    return _ConvColumns(xp, tuple(_to3(kernel, 1)), _to3([1] * n_spatial, 1), _to3(dilations, 1), _to3(out, 1),
                        int(attrs.get("group", 1)))


class _PairedColumns:
    """The simulation's and the FP32 model's columns at the same positions: ``take`` stacks them per group,
    ``[G, 2 K/G, B]`` (the simulation's K/G rows, then the FP32 model's), so one reservoir samples both."""

    def __init__(self, sim_columns, fp32_columns):
        self.sim, self.fp32 = sim_columns, fp32_columns
        self.count, self.height = sim_columns.count, 2 * sim_columns.height

    def take(self, positions: np.ndarray | None = None) -> np.ndarray:
        return np.concatenate([self.sim.take(positions), self.fp32.take(positions)], axis=1)


def position_chunks(columns, budget: int = COLUMN_BUDGET):
    """Sorted position arrays covering all of ``columns``, each at most ``budget`` column floats."""
    size = max(1, budget // max(1, columns.height))
    for start in range(0, columns.count, size):
        yield np.arange(start, min(columns.count, start + size))


def grid_arrays(encoding, shape) -> tuple[np.ndarray, np.ndarray]:
    """The encoding's float32 scale and offset broadcast to a tensor of ``shape`` (per tensor,
    per channel on ``axis``, or per block)."""
    scale = np.asarray(encoding.scale, dtype=np.float32)
    offset = np.asarray(encoding.offset, dtype=np.float32)
    if encoding.axis is None:
        return np.broadcast_to(scale, shape).copy(), np.broadcast_to(offset, shape).copy()
    axis = encoding.axis % len(shape)
    if encoding.block_size is None:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return (np.broadcast_to(scale.reshape(view), shape).copy(),
                np.broadcast_to(offset.reshape(view), shape).copy())
    take = np.arange(shape[axis])
    return (np.repeat(scale, encoding.block_size, axis=axis).take(take, axis=axis),
            np.repeat(np.broadcast_to(offset, scale.shape), encoding.block_size, axis=axis).take(take, axis=axis))


__all__ = ["LAYER_OPS", "SOFTMAX", "LinearLayer", "PRelu", "find_layers", "grid_arrays", "included_layers",
           "position_chunks"]
