"""fold_batchnorm: BatchNormalization folded into the Conv/ConvTranspose/Gemm/MatMul next to it.

The arithmetic, the foldability rules and the naming (AIMET's) are :mod:`refquant.ptq.bn_fold`'s;
this module only adapts it to the pass interface. Why it matters: an unfolded BN is quantized as a
separate op (its own activation quantizer and parameter quantizers), while folded its scale is in the
layer's per-channel weight encodings and its shift in the bias, as on an integer target.
"""

from __future__ import annotations

import warnings

from ..ir import Graph
from .common import PassResult


def run(graph: Graph) -> PassResult:
    from ..ptq.bn_fold import fold_batchnorms_info  # imported when used: ptq is a separate package

    result = PassResult()
    before = [n for n in graph.nodes if n.op_type == "BatchNormalization"]
    if not before:
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nothing to fold" is reported as notes below
        folded, records = fold_batchnorms_info(graph, warn=False)
    for record in records:
        result.changes.append(f"folded BatchNormalization {record.bn!r} into {record.layer!r} ({record.position} it)")
    names = {r.bn for r in records}
    for node in before:
        if node.name not in names:
            result.notes.append(f"BatchNormalization {node.name!r} not folded: no Conv/ConvTranspose/Gemm/MatMul "
                                "with constant weights that only it reads before it (or only it after it)")
    graph.__dict__.update(folded.__dict__)  # the pass interface rewrites the caller's graph in place
    return result
