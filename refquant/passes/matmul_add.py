"""fuse_matmul_add: ``MatMul(A, W) + b`` with constant ``W [K, N]`` and ``b`` becomes ``Gemm(A, W, b)``.

Why: QuantSim sees a bias only as a layer's third input. A separate ``Add`` quantizes the bias as an
8-bit activation-style constant, and puts one more 8-bit activation quantizer on the MatMul output,
between the product and its bias; a target runs the two as one op with an int32 bias. As a Gemm, the
bias gets the bias quantizer and the intermediate tensor is gone.

Only when ``A`` has rank 2: Gemm is a 2-D op. For a rank-3 activation (``[batch, tokens, K]`` in every
transformer) the pair stays ``MatMul + Add`` and the pass says so in its notes: rewriting it as
``Reshape -> Gemm -> Reshape`` would add two tensors and depend on run-time shapes. The ``Add``'s
output name survives as the Gemm's output; the MatMul's output name disappears.
"""

from __future__ import annotations

import numpy as np

from ..ir import Graph, Value
from .common import PassResult, fresh_name, is_float_constant, only_reader, remove_nodes, set_constant


def _bias_for(graph: Graph, add, matmul_out: str, n: int):
    """The Add's constant input as a Gemm bias ``[N]`` (None if it is not a per-column or scalar constant)."""
    other = [name for name in add.inputs if name != matmul_out]
    if len(other) != 1 or add.inputs.count(matmul_out) != 1 or not is_float_constant(graph, other[0]):
        return None, None
    bias = graph.initializers[other[0]]
    if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1) or bias.size not in (1, n):
        return None, None
    return other[0], bias


def run(graph: Graph) -> PassResult:
    result = PassResult()
    removed = []
    for matmul in list(graph.nodes):
        if matmul.op_type != "MatMul" or matmul.domain or not is_float_constant(graph, matmul.inputs[1]):
            continue
        weight = graph.initializers[matmul.inputs[1]]
        add = only_reader(graph, matmul.outputs[0])
        if weight.ndim != 2 or add is None or add.op_type != "Add" or add.domain:
            continue
        bias_name, bias = _bias_for(graph, add, matmul.outputs[0], weight.shape[1])
        if bias_name is None:
            continue
        rank = graph.values.get(matmul.inputs[0], Value("")).rank
        if rank != 2:
            why = "unknown rank" if rank is None else f"rank {rank}"
            result.notes.append(f"kept MatMul {matmul.name!r} + Add {add.name!r}: input {matmul.inputs[0]!r} has "
                                f"{why}, Gemm needs rank 2; QuantSim quantizes bias {bias_name!r} as an 8-bit "
                                "constant and the MatMul output as an extra 8-bit activation")
            continue
        if bias.shape != (weight.shape[1],):  # Gemm's bias quantizer expects one value per output column
            new = fresh_name(graph, f"{bias_name}_gemm")
            set_constant(graph, new, np.ascontiguousarray(np.broadcast_to(bias.reshape(-1), (weight.shape[1],))))
            bias_name = new
        matmul.op_type = "Gemm"
        matmul.attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
        matmul.inputs = [matmul.inputs[0], matmul.inputs[1], bias_name]
        gone = matmul.outputs[0]
        matmul.outputs = [add.outputs[0]]
        removed.append(add)
        result.changes.append(f"MatMul {matmul.name!r} + Add {add.name!r} -> Gemm {matmul.name!r} with bias "
                              f"{bias_name!r} (output {add.outputs[0]!r}; {gone!r} is gone)")
    remove_nodes(graph, removed)
    counts = graph.use_counts()
    for add in removed:  # a (1, N) bias replaced by its [N] copy is no longer read
        for name in add.inputs:
            if name in graph.initializers and counts[name] == 0:
                del graph.initializers[name]
                graph.values.pop(name, None)
    return result
