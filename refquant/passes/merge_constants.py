"""merge_duplicate_constants: initializers with the same dtype, shape and bytes become one.

Why: exporters often write one constant per use (PP-OCRv4's hard-swish writes ``3``, ``0`` and ``6``
again for every activation). For QuantSim each of them is a separate constant quantizer with the same
encoding; one tensor is simpler to read, to export and to inspect.

Only float constants are merged: integer ones (axes, shapes, indices) are never quantized, and many
of them are attributes in the ONNX file that refquant turns into inputs at load, so ``save`` would
write them back one per node anyway. Not merged either: parameters (an input with a
weight/bias/statistics role: merging two equal weights would create a shared weight, which
:mod:`.split_shared` exists to undo) and graph outputs. The first name in graph order survives; the
others disappear.
"""

from __future__ import annotations

import hashlib

from ..ir import Graph
from .common import PassResult, param_uses, rename_reads


def run(graph: Graph) -> PassResult:
    result = PassResult()
    uses = param_uses(graph)
    outputs = set(graph.output_names)
    first: dict[tuple, str] = {}
    merged: dict[str, list[str]] = {}
    for name, array in graph.initializers.items():
        if array.dtype.kind != "f" or name in outputs or name not in uses or any(role for _, _, role in uses[name]):
            continue
        key = (array.dtype.str, array.shape, hashlib.sha1(array.tobytes()).hexdigest())
        if key not in first:
            first[key] = name
            continue
        keep = first[key]
        if graph.initializers[keep].tobytes() != array.tobytes():
            continue  # a hash collision (never seen, but cheap to rule out)
        rename_reads(graph, name, keep)
        merged.setdefault(keep, []).append(name)
    for names in merged.values():
        for name in names:
            del graph.initializers[name]
            graph.values.pop(name, None)
    for keep, names in merged.items():
        shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        result.changes.append(f"merged {len(names)} copies into {keep!r}: {shown}")
    return result
