"""fuse_mul_add_chains: constant Mul/Add chains folded into the layer before them, or merged into one affine.

A chain is a run of elementwise ops, each with one float constant operand and the previous tensor as
the other, each intermediate read only by the next: ``Mul``, ``Div`` (by the constant), ``Add``,
``Sub`` (either order). Whatever its length, it computes one affine map, composed in float64:

    start s = 1, t = 0;   * c: (s c, t c)   / c: (s / c, t / c)   + c: (s, t + c)
                          - c: (s, t - c)   c - .: (-s, c - t)     chain(z) = s z + t

**Into the layer** (Conv, ConvTranspose, Gemm, MatMul with a constant weight, read only by the chain):
when ``s`` and ``t`` are scalars or vary along the layer's output channel only (axis 1 of a Conv
output, the last axis of a Gemm/MatMul output), ``s (W x + b) + t = (s W) x + (s b + t)``:

    W'[o] = s_o W[o]        b'_o = s_o b_o + t_o

This is what a learnable affine block (PP-OCRv4's LAB, ``conv -> * scale -> + bias``), a Caffe-style
Scale layer or a bias exported as a separate ``Add`` (PP-OCRv4 det's ConvTranspose) is. A MatMul has
no bias input: ``s`` goes into its weight and ``t`` stays as one ``Add`` after it (which
``fuse_matmul_add`` makes a Gemm bias at rank 2).

**Merged** (no foldable layer before the chain): a chain of three or more ops, or of two that the
affine needs only one of, becomes at most ``Mul(s)`` then ``Add(t)``.

Why: QuantSim puts an 8-bit activation quantizer on every op output, so each op of the chain is one
more rounding of the whole tensor, and on the Conv output the quantizer sits *before* the scale: a
scale of 0.1 leaves the layer's output using a tenth of its grid. Folded, the scale is in the
per-channel weight encodings and the shift in the int32 bias, as an integer target runs it.

**Names** follow :mod:`refquant.ptq.bn_fold` (AIMET's BN folding): the layer keeps its node name and
its weight and bias names (a bias is added as ``<node name>.bias`` when it had none; a weight or bias
another node also reads is copied under a new name first). The chain's last output keeps its name and
its values: the layer (or the merged op) produces it, so graph outputs and tensors that survive keep
their values; the chain's intermediate tensors disappear. A tensor with new values gets a new name: a
merged chain's constants ``<op>.scale`` / ``<op>.shift``, the product before the one ``Add``
``<tensor>.scaled``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir import Graph, Node
from .common import PassResult, fresh_name, is_float_constant, remove_nodes, set_constant

_AFFINE_OPS = ("Mul", "Div", "Add", "Sub")
_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Chain:
    """A chain of constant affine ops after tensor ``start`` (composed: ``s * start + t``)."""

    start: str
    nodes: list[Node]
    scale: np.ndarray  # float64, broadcastable
    shift: np.ndarray
    dtype: np.dtype  # the constants' (and so the tensors') dtype
    constants: list[str]  # the constants the chain reads
    sole_reader: bool  # the chain's first op is the only reader of ``start``

    @property
    def output(self) -> str:
        return self.nodes[-1].outputs[0]


def _step(graph: Graph, node: Node, var: str) -> tuple[str, np.ndarray] | None:
    """(how ``node`` transforms ``var``: "mul", "div", "add", "sub", "rsub"; its constant) or None."""
    if node.domain or node.op_type not in _AFFINE_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    a, b = node.inputs
    if a == var and b != var and is_float_constant(graph, b):
        constant, first = graph.initializers[b], True
    elif b == var and a != var and is_float_constant(graph, a):
        constant, first = graph.initializers[a], False
    else:
        return None
    if node.op_type == "Div" and not first:  # c / x is not affine in x
        return None
    kind = {"Mul": "mul", "Div": "div", "Add": "add", "Sub": "sub" if first else "rsub"}[node.op_type]
    return kind, constant


def _compose(scale, shift, kind, c):
    c = np.asarray(c, np.float64)
    if kind == "mul":
        return scale * c, shift * c
    if kind == "div":
        return scale / c, shift / c
    if kind == "add":
        return scale, shift + c
    if kind == "sub":
        return scale, shift - c
    return -scale, c - shift  # rsub


def chain_after(graph: Graph, start: str, first: Node, counts, consumers, limit: int | None = None) -> Chain | None:
    """The longest chain (of at most ``limit`` ops) of constant affine ops that begins with ``first``
    reading ``start`` (None if ``first`` is not one). Every tensor after ``start`` is read by the next op only."""
    nodes, constants, scale, shift, dtype = [], [], np.ones(()), np.zeros(()), None
    current, node = start, first
    while node is not None and (limit is None or len(nodes) < limit):
        step = _step(graph, node, current)
        if step is None or (dtype is not None and step[1].dtype != dtype):
            break
        dtype = step[1].dtype
        with np.errstate(all="ignore"):
            scale, shift = _compose(scale, shift, *step)
        nodes.append(node)
        constants += [i for i in node.inputs if i != current]
        current = node.outputs[0]
        single = counts[current] == 1 and len(consumers.get(current, [])) == 1
        node = consumers[current][0] if single else None
    if not nodes or not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return None
    return Chain(start, nodes, scale, shift, dtype, constants, counts[start] == 1)


# ------------------------------------------------------------------------------ into the layer
def _channel_vector(array: np.ndarray, axis: int, rank: int | None, channels: int) -> np.ndarray | None:
    """``array`` as one value per output channel (``[channels]``), if it broadcasts against a layer output
    of rank ``rank`` (None: unknown) without changing its shape and varies only along ``axis``
    (negative: from the end). None otherwise."""
    if array.ndim > (rank if rank is not None else (1 if axis == -1 else 0)):
        return None
    if rank is None:
        rank = max(array.ndim, 1)
    shape = (1,) * (rank - array.ndim) + array.shape
    axis %= rank
    if any(size != 1 for i, size in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,)).astype(np.float64)


def _layer(graph: Graph, name: str):
    from ..ptq.bn_fold import is_layer

    producer = next((n for n in graph.nodes if name in n.outputs), None)
    if producer is None or producer.op_type not in _LAYERS or producer.outputs[0] != name:
        return None
    return producer if is_layer(graph, producer) else None


def _fold_into_layer(graph: Graph, layer: Node, chain: Chain, result: PassResult) -> bool:
    from ..ptq.bn_fold import bias_of, channels, scale_output_channels, set_bias, set_weight

    weight = graph.initializers[layer.inputs[1]]
    if weight.dtype != chain.dtype or not chain.sole_reader:
        return False
    n_out, _ = channels(layer, weight)
    out = graph.values.get(layer.outputs[0])
    rank = out.rank if out is not None else None
    axis = 1 if layer.op_type in ("Conv", "ConvTranspose") else -1
    if layer.op_type in ("Conv", "ConvTranspose"):
        rank = weight.ndim
    elif layer.op_type == "Gemm":
        rank = 2
    scale = _channel_vector(chain.scale, axis, rank, n_out)
    shift = _channel_vector(chain.shift, axis, rank, n_out)
    if scale is None or shift is None:
        return False
    ops = " -> ".join(f"{n.op_type} {n.name!r}" for n in chain.nodes)
    last = chain.nodes[-1]
    if layer.op_type == "MatMul":
        if len(chain.nodes) == 1 and chain.nodes[0].op_type in ("Add", "Sub") and np.all(scale == 1):
            return False  # MatMul + bias: fuse_matmul_add's
        set_weight(graph, layer, scale_output_channels(layer, weight, scale))
        gone = [layer.outputs[0]] + [n.outputs[0] for n in chain.nodes[:-1]]
        if np.all(shift == 0):
            layer.outputs = [last.outputs[0]]
            remove_nodes(graph, chain.nodes)
            what = "no shift"
        else:  # the last op becomes the one Add of the shift; the MatMul output (now scaled) gets a new name
            name = fresh_name(graph, f"{last.name}.shift")
            set_constant(graph, name, shift.astype(weight.dtype))
            scaled = fresh_name(graph, f"{layer.outputs[0]}.scaled")
            layer.outputs = [scaled]
            last.op_type, last.inputs, last.attrs = "Add", [scaled, name], {}
            remove_nodes(graph, chain.nodes[:-1])
            what = f"shift kept as Add {last.name!r} by {name!r} after {scaled!r}"
        result.changes.append(f"{ops} folded into MatMul {layer.name!r}: scale into weight {layer.inputs[1]!r}, "
                              f"{what} (output {last.outputs[0]!r}; {', '.join(map(repr, gone))} gone)")
        return True
    bias = bias_of(graph, layer)
    set_weight(graph, layer, scale_output_channels(layer, weight, scale))
    if bias is not None or np.any(shift != 0):
        set_bias(graph, layer, (0.0 if bias is None else bias) * scale + shift, weight.dtype)
    gone = [layer.outputs[0]] + [n.outputs[0] for n in chain.nodes[:-1]]
    layer.outputs = [last.outputs[0]]
    remove_nodes(graph, chain.nodes)
    bias_name = layer.inputs[2] if len(layer.inputs) > 2 and layer.inputs[2] else "none"
    result.changes.append(f"{ops} folded into {layer.op_type} {layer.name!r}: weight {layer.inputs[1]!r}, bias "
                          f"{bias_name!r} (output {last.outputs[0]!r}; {', '.join(map(repr, gone))} gone)")
    return True


# ------------------------------------------------------------------------------ merged chains
def _merge(graph: Graph, chain: Chain, result: PassResult) -> bool:
    """Replace a chain by ``Mul(s)`` then ``Add(t)`` (either dropped when the identity and its shape is
    covered by the other), if that is fewer ops."""
    s, t = chain.scale, chain.shift
    both = np.broadcast_shapes(s.shape, t.shape)
    need_mul = not (np.all(s == 1) and t.shape == both)
    need_add = not (np.all(t == 0) and s.shape == both) or not need_mul
    if need_mul + need_add >= len(chain.nodes):
        return False
    mul, add = chain.nodes[-2:] if need_mul and need_add else (None, chain.nodes[-1])
    if not need_add:
        mul, add = chain.nodes[-1], None
    current = chain.start
    if mul is not None:
        name = fresh_name(graph, f"{mul.name}.scale")
        set_constant(graph, name, s.astype(chain.dtype))
        mul.op_type, mul.inputs, mul.attrs = "Mul", [current, name], {}
        if add is not None:  # an intermediate with new values: a new name
            mul.outputs = [fresh_name(graph, f"{mul.outputs[0]}.scaled")]
        current = mul.outputs[0]
    if add is not None:
        name = fresh_name(graph, f"{add.name}.shift")
        set_constant(graph, name, t.astype(chain.dtype))
        add.op_type, add.inputs, add.attrs = "Add", [current, name], {}
    kept = [n for n in (mul, add) if n is not None]
    dropped = [n for n in chain.nodes if all(n is not k for k in kept)]
    remove_nodes(graph, dropped)
    result.changes.append(f"{len(chain.nodes)} ops {' -> '.join(repr(n.name) for n in chain.nodes)} merged into "
                          + " -> ".join(f"{n.op_type} {n.name!r}" for n in kept)
                          + f" (output {chain.output!r})")
    return True


def _rewrite_once(graph: Graph, result: PassResult, read: set[str]) -> bool:
    """Find one chain that folds into its layer or merges, rewrite it, and return True (False: none)."""
    counts, consumers = graph.use_counts(), graph.consumers()
    producers = {o: n for n in graph.nodes for o in n.outputs if o}
    for node in graph.nodes:
        for start in dict.fromkeys(node.inputs):
            if not start or start in graph.initializers:
                continue
            previous = producers.get(start)
            if previous is not None and len(consumers.get(start, [])) == 1 and counts[start] == 1 \
                    and _step(graph, previous, next((i for i in previous.inputs if i not in graph.initializers), "")):
                continue  # ``node`` is inside a chain that begins earlier
            chain = chain_after(graph, start, node, counts, consumers)
            if chain is None:
                continue
            read.update(chain.constants)
            layer = _layer(graph, start) if previous is not None and previous.op_type in _LAYERS else None
            # the longest foldable head of the chain goes into the layer (the rest is merged later)
            for length in range(len(chain.nodes), 0, -1) if layer is not None else ():
                head = chain_after(graph, start, node, counts, consumers, limit=length)
                if head is not None and _fold_into_layer(graph, layer, head, result):
                    return True
            if _merge(graph, chain, result):
                return True
    return False


def run(graph: Graph) -> PassResult:
    result = PassResult()
    read: set[str] = set()
    while _rewrite_once(graph, result, read):
        pass
    counts = graph.use_counts()
    for name in sorted(read):  # constants only the rewritten chains read
        if name in graph.initializers and counts[name] == 0:
            del graph.initializers[name]
            graph.values.pop(name, None)
    return result
