"""BatchNormalization folding: an inference-mode BN next to a linear layer becomes part of its weights.

At inference a BatchNormalization is a per-channel affine map of its input (channel axis 1):

    BN(x) = gamma (x - mean) / sqrt(var + eps) + beta = k x + d,
    k = gamma / sqrt(var + eps),   d = beta - mean k

and a Conv, ConvTranspose, Gemm or MatMul with a constant weight is linear in its input, so the two
compose into one layer of the same kind.

**BN after the layer** (``y = W x + b``, then ``BN(y)``): scale each *output* channel ``o``,

    W'[o] = k_o W[o]        b'_o = k_o (b_o - mean_o) + beta_o = k_o b_o + d_o

Exact for every layer kind. The output channel axis of the weight is 0 for Conv, 1 for ConvTranspose
(its weight is ``[C_in, C_out / group, ...]``, so with groups the output channel ``o`` of group ``g`` is
column ``o - g C_out/group`` of that group's rows), 0 or 1 for Gemm (``transB`` 1 or 0) and 1 for
MatMul. A layer without a bias gets one (``b = 0``), named ``<node name>.bias`` as AIMET names it.
A MatMul has no bias input: MatMul + BN becomes ``Gemm(A, W', b')`` (AIMET's form, one node, exact),
which needs a 2-D MatMul (BN normalizes axis 1, which is the MatMul's output-feature axis only at rank 2).

**BN before the layer** (``BN(x)`` then ``y = W BN(x) + b``): scale each *input* channel ``c``,

    W'[:, c] = k_c W[:, c]      b'_o = b_o + sum_{c, taps} W[o, c, taps] d_c

Exact only where the constant ``d`` reaches every output through every tap: a Gemm (``transA = 0``), a
2-D MatMul (becomes a Gemm), ``BN -> Flatten(axis=1) -> Gemm/MatMul`` (``k``, ``d`` repeated over the
flattened spatial positions), and a Conv without padding. A padded Conv is *not* folded: its zero
padding is added after the BN, so border outputs would receive ``W d`` from taps that read padding.
ConvTranspose is not folded either (with strides, a constant input does not give a constant output).

A BN between two layers goes into the one before it (AIMET's priority: all "after" folds first).
The layer's output must be read by the BN only, and the BN's output by the layer only.

**Names** follow AIMET's ``fold_all_batch_norms_to_weight`` (checked against
``refs/aimet_samples/convnet/model.onnx`` -> ``model_bnfolded.onnx``): the folded BN's node, output
tensor and parameters disappear; the layer keeps its node name, its weight and bias names (which the
encodings files use) and its output name, and the BN's readers read the layer's output instead. When
the BN's output is a graph output, the layer's output takes that name, so graph outputs never change.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import RefquantError
from ..ir import Graph, Node, Value

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class FoldError(RefquantError):
    """A BatchNormalization or layer that cannot be folded because the model is malformed."""


@dataclass
class FoldedBatchNorm:
    """One folded BN: where it went and its parameters (high-bias absorption needs ``gamma`` and ``beta``
    of a BN that was after a layer: they describe the distribution of that layer's output)."""

    bn: str  # the BatchNormalization node's name
    layer: str  # the node it was folded into (a MatMul that became a Gemm has a "Gemm" name)
    position: str  # "after": BN(layer(x)); "before": layer(BN(x))
    gamma: np.ndarray  # float64, per channel
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float
    # "after": the layer as the fold left it (per-output-channel weight ranges, bias, float64), so that a later
    # technique can tell whether the statistics still describe the layer's output (:func:`describes`)
    ranges: np.ndarray | None = None
    bias: np.ndarray | None = None


def describes(record: FoldedBatchNorm, graph: Graph) -> bool:
    """``record`` (a BN folded after a layer) still describes that layer of ``graph``: the layer exists and its
    weight ranges and bias are the ones the fold left (within float32 rounding, 1e-6 relative)."""
    if record.position != "after" or record.ranges is None:
        return False
    try:
        layer = graph.node(record.layer)
        weight, bias = weight_of(graph, layer), bias_of(graph, layer)
    except (KeyError, RefquantError):
        return False
    if weight is None or bias is None:
        return False
    ranges = output_ranges(layer, weight)
    return (ranges.shape == record.ranges.shape and np.shape(bias) == np.shape(record.bias)
            and np.allclose(ranges, record.ranges, rtol=1e-6, atol=0)
            and np.allclose(bias, record.bias, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(record.bias), initial=0))))


# ----------------------------------------------------------------------------------- public API
def fold_batchnorms(graph: Graph) -> Graph:
    """A copy of ``graph`` with every foldable BatchNormalization folded into its layer (module docstring).
    ``graph`` itself is not modified. Warns "no BatchNormalization to fold" when nothing folds."""
    return fold_batchnorms_pass(graph)[0]


def fold_batchnorms_pass(graph: Graph) -> tuple[Graph, list[str]]:
    """Like :func:`fold_batchnorms`, and also the names of the BatchNormalization nodes that were folded."""
    folded, records = fold_batchnorms_info(graph)
    return folded, [r.bn for r in records]


def fold_batchnorms_info(graph: Graph, warn: bool = True) -> tuple[Graph, list[FoldedBatchNorm]]:
    """Like :func:`fold_batchnorms`, with one :class:`FoldedBatchNorm` record per folded BN (in the order
    they were folded: all "after" folds in graph order, then the "before" ones)."""
    g = graph.copy()
    if _parameters_from_constant_chains(g):
        from ..passes import apply

        apply(g, "fold_weight_chains")  # a weight behind Transpose/Cast/ConstantOfShape... becomes an initializer
    records: list[FoldedBatchNorm] = []
    for bn in list(g.nodes):  # BN after a layer
        if _is_inference_bn(g, bn):
            layer = _producer(g, bn.inputs[0])
            if layer is not None and _can_fold_after(g, layer, bn):
                records.append(_fold_after(g, layer, bn))
    for bn in list(g.nodes):  # BN before a layer
        if any(bn is n for n in g.nodes) and _is_inference_bn(g, bn):
            target = _layer_after(g, bn)
            if target is not None:
                records.append(_fold_before(g, bn, *target))
    if not records and warn:
        warnings.warn(f"fold_batchnorms: graph {graph.name!r} has no BatchNormalization to fold "
                      "(none in inference mode with constant parameters next to a Conv, ConvTranspose, Gemm "
                      "or MatMul with a constant weight); returning an unchanged copy", stacklevel=3)
    return g, records


def _parameters_from_constant_chains(graph: Graph) -> bool:
    """Some layer or BN parameter is computed by nodes rather than stored (maybe from constants only)."""
    produced = {o for n in graph.nodes for o in n.outputs if o}
    return any(p in produced for n in graph.nodes if n.op_type in LAYERS + ("BatchNormalization",)
               for p in n.inputs[1:] if p)


# ----------------------------------------------------------------------------------- the BN
def bn_affine(gamma, beta, mean, var, epsilon) -> tuple[np.ndarray, np.ndarray]:
    """The BN as ``k x + d`` per channel: ``k = gamma / sqrt(var + eps)``, ``d = beta - mean k`` (float64)."""
    k = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(epsilon))
    return k, np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * k


def _is_inference_bn(graph: Graph, node: Node) -> bool:
    """A BatchNormalization computing with its stored statistics, all four parameters constant."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    if node.attrs.get("training_mode", 0) or any(node.outputs[1:]) or len(node.inputs) < 5:
        return False
    return all(name in graph.initializers for name in node.inputs[1:5])


def _bn_record(graph: Graph, bn: Node, layer: Node, position: str) -> FoldedBatchNorm:
    gamma, beta, mean, var = (np.asarray(graph.initializers[n], np.float64).reshape(-1) for n in bn.inputs[1:5])
    if not gamma.size == beta.size == mean.size == var.size:
        raise FoldError(f"BatchNormalization {bn.name!r}: scale, bias, mean and var have different sizes "
                        f"{[gamma.size, beta.size, mean.size, var.size]}")
    return FoldedBatchNorm(bn.name, layer.name, position, gamma, beta, mean, var,
                           float(bn.attrs.get("epsilon", 1e-5)))


# ----------------------------------------------------------------------------------- layer geometry
def weight_of(graph: Graph, node: Node) -> np.ndarray:
    return graph.initializers[node.inputs[1]]


def groups_view(node: Node, weight: np.ndarray) -> np.ndarray:
    """The weight as ``[G, C_out/G, C_in/G, taps]``: group, output channel, input channel, kernel tap.

    Every per-channel operation of folding and equalization is a broadcast over this view, so Conv
    (``[C_out, C_in/G, *k]``), ConvTranspose (``[C_in, C_out/G, *k]``), Gemm and MatMul share one code path.
    """
    w = np.asarray(weight)
    if node.op_type == "Conv":
        g = int(node.attrs.get("group", 1))
        return w.reshape(g, w.shape[0] // g, w.shape[1], -1)
    if node.op_type == "ConvTranspose":
        g = int(node.attrs.get("group", 1))
        return w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(0, 2, 1, 3)
    if node.op_type == "Gemm" and node.attrs.get("transB", 0):
        return w.reshape(1, w.shape[0], w.shape[1], 1)  # B is [N, K]
    return w.T.reshape(1, w.shape[1], w.shape[0], 1)  # Gemm (transB 0) and MatMul: B is [K, N]


def from_groups_view(node: Node, view: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`groups_view`: back to the op's weight layout ``shape``."""
    if node.op_type == "Conv":
        return view.reshape(shape)
    if node.op_type == "ConvTranspose":
        return view.transpose(0, 2, 1, 3).reshape(shape)
    if node.op_type == "Gemm" and node.attrs.get("transB", 0):
        return view.reshape(shape)
    return view.reshape(shape[1], shape[0]).T


def channels(node: Node, weight: np.ndarray) -> tuple[int, int]:
    """(C_out, C_in) of a layer."""
    g, o, i, _ = groups_view(node, weight).shape
    return g * o, g * i


def scale_output_channels(node: Node, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``W'[o] = factor_o W[o]`` for every output channel ``o`` (float64)."""
    view = groups_view(node, np.asarray(weight, np.float64))
    g, o = view.shape[:2]
    return from_groups_view(node, view * np.asarray(factor, np.float64).reshape(g, o, 1, 1), weight.shape)


def scale_input_channels(node: Node, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``W'[:, c] = factor_c W[:, c]`` for every input channel ``c`` (float64)."""
    view = groups_view(node, np.asarray(weight, np.float64))
    g, _, i = view.shape[:3]
    return from_groups_view(node, view * np.asarray(factor, np.float64).reshape(g, 1, i, 1), weight.shape)


def response_to_constant_input(node: Node, weight: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``sum_{c, taps} W[o, c, taps] value_c`` per output channel ``o``: what the layer adds to its
    output when every input position of channel ``c`` holds ``value_c`` (ignoring padding)."""
    view = groups_view(node, np.asarray(weight, np.float64))
    g, _, i = view.shape[:3]
    return np.einsum("goit,gi->go", view, np.asarray(value, np.float64).reshape(g, i)).reshape(-1)


def output_ranges(node: Node, weight: np.ndarray) -> np.ndarray:
    """``max |W[o]|`` per output channel."""
    return np.abs(groups_view(node, weight)).max(axis=(2, 3)).reshape(-1).astype(np.float64)


def input_ranges(node: Node, weight: np.ndarray) -> np.ndarray:
    """``max |W[:, c]|`` per input channel (over the output channels of ``c``'s group)."""
    return np.abs(groups_view(node, weight)).max(axis=(1, 3)).reshape(-1).astype(np.float64)


# ----------------------------------------------------------------------------------- biases
def bias_of(graph: Graph, node: Node) -> np.ndarray | None:
    """The layer's effective bias in float64, per output channel on its last axis (a Gemm's ``beta C``,
    which may be any shape that broadcasts to the output), or None if it has none (MatMul never has)."""
    if node.op_type == "MatMul" or len(node.inputs) < 3 or not node.inputs[2]:
        return None
    bias = np.asarray(graph.initializers[node.inputs[2]], np.float64)
    if node.op_type == "Gemm":
        bias = float(node.attrs.get("beta", 1.0)) * bias
    return bias


def set_bias(graph: Graph, node: Node, bias: np.ndarray, dtype) -> None:
    """Write ``bias`` as the layer's bias (a Gemm's ``C`` with ``beta = 1``). A layer without a bias gets
    one named ``<node name>.bias`` (AIMET's name); a bias another node also reads is written under a
    new name, so that node keeps the old values."""
    if node.op_type == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
        node.attrs["beta"] = 1.0
    while len(node.inputs) < 3:
        node.inputs.append("")
    if not node.inputs[2]:
        node.inputs[2] = fresh_name(graph, f"{node.name}.bias")
    set_initializer(graph, node, 2, np.asarray(bias).astype(dtype))


def set_initializer(graph: Graph, node: Node, index: int, array: np.ndarray) -> None:
    """Set input ``index`` of ``node`` to the constant ``array``, in place when only this node reads it."""
    name = node.inputs[index]
    if name in graph.initializers and _readers(graph, name) > 1:
        name = fresh_name(graph, name)
        node.inputs[index] = name
    graph.initializers[name] = array
    graph.values[name] = Value(name, array.dtype, tuple(array.shape))


def set_weight(graph: Graph, node: Node, weight: np.ndarray) -> None:
    old = graph.initializers[node.inputs[1]]
    set_initializer(graph, node, 1, np.asarray(weight).astype(old.dtype))


# ----------------------------------------------------------------------------------- fold after
def _can_fold_after(graph: Graph, layer: Node, bn: Node) -> bool:
    if not is_layer(graph, layer) or layer.outputs[0] != bn.inputs[0]:
        return False
    if _readers(graph, layer.outputs[0]) != 1:  # the BN must be the only reader (graph outputs count)
        return False
    n_out, _ = channels(layer, weight_of(graph, layer))
    if graph.initializers[bn.inputs[1]].size != n_out:
        return False
    if layer.op_type == "MatMul":
        return _rank(graph, layer.outputs[0]) == 2
    return True


def _fold_after(graph: Graph, layer: Node, bn: Node) -> FoldedBatchNorm:
    """``W'[o] = k_o W[o]``, ``b'_o = k_o b_o + d_o``; the BN disappears (module docstring)."""
    record = _bn_record(graph, bn, layer, "after")
    k, d = bn_affine(record.gamma, record.beta, record.mean, record.var, record.epsilon)
    weight = weight_of(graph, layer)
    bias = bias_of(graph, layer)
    if layer.op_type == "MatMul":
        _matmul_to_gemm(graph, layer)
    set_weight(graph, layer, scale_output_channels(layer, weight, k))
    set_bias(graph, layer, (0.0 if bias is None else bias) * k + d, weight.dtype)
    record.layer = layer.name
    record.ranges, record.bias = output_ranges(layer, weight_of(graph, layer)), bias_of(graph, layer)
    _remove_after(graph, layer, bn)
    return record


def _remove_after(graph: Graph, layer: Node, bn: Node) -> None:
    """Remove the BN: its readers read the layer's output (AIMET), or, when the BN's output is a graph
    output, the layer's output takes its name."""
    old, new = layer.outputs[0], bn.outputs[0]
    if new in graph.output_names:
        layer.outputs[0] = new
        graph.values.pop(old, None)
    else:
        _rename_reads(graph, new, old)
        graph.values.pop(new, None)
    _remove_node(graph, bn)


# ----------------------------------------------------------------------------------- fold before
def _layer_after(graph: Graph, bn: Node) -> tuple[Node, Node | None] | None:
    """(layer, flatten) when the BN's output feeds exactly one layer into which it folds exactly: a Gemm
    (transA 0), a 2-D MatMul, the same behind a Flatten(axis=1), or an unpadded Conv."""
    out = bn.outputs[0]
    reader = _only_reader(graph, out)
    flatten = None
    if reader is not None and reader.op_type == "Flatten" and int(reader.attrs.get("axis", 1)) == 1:
        flatten, reader = reader, _only_reader(graph, reader.outputs[0])
        out = flatten.outputs[0]
    if reader is None or not is_layer(graph, reader) or reader.inputs[0] != out or out in reader.inputs[1:]:
        return None
    n_bn = graph.initializers[bn.inputs[1]].size
    _, n_in = channels(reader, weight_of(graph, reader))
    if reader.op_type == "Conv":
        if flatten is not None or n_in != n_bn or _padded(reader):
            return None
    elif reader.op_type == "ConvTranspose":
        return None
    else:  # Gemm / MatMul: BN on [M, K] (channel axis 1 = K), or [N, C, ...] flattened to K = C * spatial
        if reader.op_type == "Gemm" and reader.attrs.get("transA", 0):
            return None
        if (n_in != n_bn) if flatten is None else (n_in % n_bn):
            return None
        if reader.op_type == "MatMul" and _rank(graph, out) != 2:  # A [M, K]; Gemm inputs are 2-D anyway
            return None
    return reader, flatten


def _fold_before(graph: Graph, bn: Node, layer: Node, flatten: Node | None) -> FoldedBatchNorm:
    """``W'[:, c] = k_c W[:, c]``, ``b'_o = b_o + sum_{c, taps} W[o, c, taps] d_c`` (module docstring)."""
    record = _bn_record(graph, bn, layer, "before")
    k, d = bn_affine(record.gamma, record.beta, record.mean, record.var, record.epsilon)
    weight = weight_of(graph, layer)
    _, n_in = channels(layer, weight)
    if n_in != k.size:  # behind a Flatten: feature c * spatial + p belongs to channel c
        k, d = np.repeat(k, n_in // k.size), np.repeat(d, n_in // d.size)
    bias = bias_of(graph, layer)
    if layer.op_type == "Gemm":  # Y = alpha A B + beta C: the constant reaches Y through alpha
        shift = float(layer.attrs.get("alpha", 1.0)) * response_to_constant_input(layer, weight, d)
    else:
        shift = response_to_constant_input(layer, weight, d)
    if layer.op_type == "MatMul":
        _matmul_to_gemm(graph, layer)
    set_weight(graph, layer, scale_input_channels(layer, weight, k))
    set_bias(graph, layer, (0.0 if bias is None else bias) + shift, weight.dtype)
    record.layer = layer.name
    reader = flatten if flatten is not None else layer
    reader.inputs[0] = bn.inputs[0]
    graph.values.pop(bn.outputs[0], None)
    _remove_node(graph, bn)
    return record


def _padded(conv: Node) -> bool:
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return True
    return auto_pad != "VALID" and any(int(p) != 0 for p in conv.attrs.get("pads", []) or [])


def _matmul_to_gemm(graph: Graph, node: Node) -> None:
    """``MatMul(A, B)`` -> ``Gemm(A, B)`` (transB 0), renamed as AIMET does ("MatMul" -> "Gemm" in the
    node name), so the fold can give it a bias. Same output for 2-D ``A``."""
    node.op_type = "Gemm"
    new_name = node.name.replace("MatMul", "Gemm")
    if new_name != node.name and any(n.name == new_name for n in graph.nodes):
        new_name = fresh_node_name(graph, new_name)
    node.name = new_name
    node.attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    node.version = max(int(graph.opset.get("", 13)), 7)


# ----------------------------------------------------------------------------------- graph helpers
def is_layer(graph: Graph, node: Node) -> bool:
    """A Conv, ConvTranspose, Gemm or MatMul with a constant weight (2-D for Gemm and MatMul) and a
    constant bias (or none), that the folding and equalization arithmetic applies to."""
    if node.op_type not in LAYERS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight = graph.initializers.get(node.inputs[1])
    if weight is None or weight.dtype.kind != "f" or not node.outputs or not node.outputs[0]:
        return False
    if len(node.inputs) > 2 and node.inputs[2] and node.inputs[2] not in graph.initializers:
        return False
    if node.op_type in ("Gemm", "MatMul"):
        return weight.ndim == 2
    if weight.ndim < 3:
        return False
    group = int(node.attrs.get("group", 1))
    split = weight.shape[0]  # Conv: C_out rows; ConvTranspose: C_in rows, both split into groups
    if group < 1 or split % group:
        raise FoldError(f"{node.op_type} {node.name!r}: weight {list(weight.shape)} does not split into "
                        f"group={group} groups")
    return True


def _rank(graph: Graph, name: str) -> int | None:
    value = graph.values.get(name)
    return None if value is None else value.rank


def _producer(graph: Graph, name: str) -> Node | None:
    for node in graph.nodes:
        if name in node.outputs:
            return node
    return None


def _readers(graph: Graph, name: str) -> int:
    """Node reads of ``name`` (subgraph reads included) plus its appearances as a graph output."""
    return graph.use_counts()[name]


def _only_reader(graph: Graph, name: str) -> Node | None:
    """The node that reads ``name``, if exactly one node reads it once and it is not a graph output."""
    if _readers(graph, name) != 1:
        return None
    return graph.consumers().get(name, [None])[0]


def _rename_reads(graph: Graph, old: str, new: str) -> None:
    """Every read of tensor ``old`` reads ``new`` instead, in subgraphs too (unless they define ``old``)."""
    for node in graph.nodes:
        node.inputs = [new if name == old else name for name in node.inputs]
        for sub in node.subgraphs():
            if old in sub.outer_references():
                _rename_reads(sub, old, new)
    for value in graph.outputs:
        if value.name == old:
            value.name = new


def _remove_node(graph: Graph, node: Node) -> None:
    """Drop ``node`` and the initializers only it read."""
    graph.nodes = [n for n in graph.nodes if n is not node]
    counts = graph.use_counts()
    for name in node.inputs[1:]:
        if name in graph.initializers and counts[name] == 0:
            del graph.initializers[name]
            graph.values.pop(name, None)


def fresh_name(graph: Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... the first that names no tensor of ``graph``."""
    taken = set(graph.initializers) | set(graph.values) | {o for n in graph.nodes for o in n.outputs}
    taken |= {i for n in graph.nodes for i in n.inputs}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def fresh_node_name(graph: Graph, base: str) -> str:
    taken = {n.name for n in graph.nodes}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name
