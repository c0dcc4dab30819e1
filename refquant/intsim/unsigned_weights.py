"""Integer programs whose onnxruntime result does not depend on the CPU: int8 weights stored as uint8.

onnxruntime's u8 x s8 kernels (uint8 activations, int8 weights) on x86 CPUs with AVX2 but without VNNI
multiply with ``vpmaddubsw``, which adds each pair of adjacent products in int16 *with saturation*
(255 * 127 * 2 = 64,770 > 32,767; refs/numerics.md §2.1). There the int32 sums are not the exact ones the
ONNX operators define, and the outputs move by many codes: on the AIMET sample convnet, W8A8, every
output differs from the exact program. With AVX512-VNNI or AVX-VNNI (``vpdpbusd``) the sums are exact.

Stored as uint8, ``w_u8 = w + 128`` with zero point ``z_u8 = z + 128``, a weight dequantizes to the same
``s (w_u8 - z_u8) = s (w - z)``: the identical function, which onnxruntime runs with its u8 x u8 kernels.
Those widen to int16 before multiplying (``vpmaddwd``), which is exact on every x86 CPU. Measured on an
AMD EPYC with AVX2 and no VNNI (onnxruntime 1.32.0): the AIMET sample convnet, mlp and MTCNN R-Net
programs, W8A8, differ from refquant's in 1280/1280, 1020/1280 and 633/1200 values with int8 weights and
in none with uint8 weights, at both optimization levels.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# op -> (index of the weight input, index of its zero point)
WEIGHT_INPUTS = {"QLinearConv": (3, 5), "QLinearMatMul": (3, 5), "QGemm": (3, 5), "ConvInteger": (1, 3),
                 "MatMulInteger": (1, 3), "DequantizeLinear": (0, 2)}
VNNI_FLAGS = {"avx512_vnni", "avx_vnni"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def onnxruntime_saturates_u8s8(flags: set[str] | None = None) -> bool:
    """Whether onnxruntime's u8 x s8 integer kernels saturate pair sums to int16 on this CPU: x86 with AVX2
    and neither AVX512-VNNI nor AVX-VNNI (module docstring)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    flags = cpu_flags() if flags is None else flags
    return "avx2" in flags and not (VNNI_FLAGS & flags)


def unsigned_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` in which every int8 constant weight of QLinearConv, QLinearMatMul, QGemm, ConvInteger,
    MatMulInteger and of a DequantizeLinear of rank >= 1 (QDQ weights) is uint8: ``w + 128``, zero point
    ``z + 128`` (0 where absent). Same outputs by construction; returns the model and the number of weights
    rewritten. Weights in subgraphs are left as they are."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    rewritten: dict[tuple[str, str], tuple[str, str]] = {}  # (weight, zero point) -> their uint8 names
    taken = {t.name for t in graph.initializer} | {name for node in graph.node for name in node.output}
    for node in graph.node:
        if node.op_type not in WEIGHT_INPUTS or node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        w_index, z_index = WEIGHT_INPUTS[node.op_type]
        if len(node.input) <= w_index or node.input[w_index] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[w_index]])
        if weight.dtype != np.int8 or (node.op_type == "DequantizeLinear" and weight.ndim == 0):
            continue
        if node.op_type != "DequantizeLinear" and _activation_type(graph, node, initializers) != np.uint8:
            continue  # onnxruntime has no int8 x uint8 kernel (and no exact one for int8 activations)
        zero_name = node.input[z_index] if len(node.input) > z_index else ""
        if zero_name and zero_name not in initializers:
            continue  # a computed zero point: not a constant weight's
        key = (node.input[w_index], zero_name)
        if key not in rewritten:
            zero = numpy_helper.to_array(initializers[zero_name]) if zero_name else np.zeros((), np.int8)
            names = tuple(_unique(f"{base}_uint8", taken) for base in (key[0], key[0] + "_zero_point"))
            graph.initializer.append(numpy_helper.from_array(_shifted(weight), names[0]))
            graph.initializer.append(numpy_helper.from_array(_shifted(zero), names[1]))
            rewritten[key] = names
        while len(node.input) <= z_index:
            node.input.append("")
        node.input[w_index], node.input[z_index] = rewritten[key]
    pairs, zero_points = _unsigned_weight_pairs(graph, initializers, taken)
    originals = {name for key in rewritten for name in key if name} | set(zero_points)
    read = _names_read(graph) | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name in originals and t.name not in read]:
        graph.initializer.remove(tensor)  # the int8 originals nothing reads any more
    return model, len(rewritten) + pairs


def _unsigned_weight_pairs(graph, initializers, taken) -> tuple[int, dict[str, str]]:
    """QDQ weights kept in float: ``DequantizeLinear(QuantizeLinear(w, s, z), s, z)`` with a constant ``w`` and
    int8 ``z`` gets ``z + 128`` as uint8 on both nodes; the codes become ``clamp(round(w / s) + z + 128, 0, 255)``,
    the int8 codes plus 128, so the pair computes the same values. Returns the number of pairs rewritten and the
    zero points replaced (int8 name -> uint8 name)."""
    producers = {name: node for node in graph.node for name in node.output}
    replaced: dict[str, str] = {}
    count = 0
    for dq in graph.node:
        q = producers.get(dq.input[0]) if dq.op_type == "DequantizeLinear" and dq.input else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in initializers:
            continue
        if not all(len(node.input) > 2 and node.input[2] in initializers for node in (q, dq)):
            continue
        zeros = [numpy_helper.to_array(initializers[node.input[2]]) for node in (q, dq)]
        if any(zero.dtype != np.int8 for zero in zeros) or not np.array_equal(*zeros):
            continue
        for node in (q, dq):
            if node.input[2] not in replaced:
                replaced[node.input[2]] = _unique(f"{node.input[2]}_uint8", taken)
                graph.initializer.append(numpy_helper.from_array(_shifted(zeros[0]), replaced[node.input[2]]))
            node.input[2] = replaced[node.input[2]]
        count += 1
    return count, replaced


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of ``graph`` or of its subgraphs reads."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
                names |= _names_read(sub)
    return names


def _activation_type(graph: onnx.GraphProto, node: onnx.NodeProto, initializers: dict):
    """The element type of the node's quantized activation input (input 0), from its zero point (input 2) or the
    graph's declared types; None when neither says."""
    if len(node.input) > 2 and node.input[2] in initializers:
        return numpy_helper.to_array(initializers[node.input[2]]).dtype.type
    declared = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
    elem = declared.get(node.input[0])
    return {onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}.get(elem)


def _shifted(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.int16) + 128).astype(np.uint8)


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    taken.add(candidate)
    return candidate


# --------------------------------------------------------------------------- the commands that export a model
def add_argument(parser, what: str = "the QDQ model's int8 weights") -> None:
    """``--unsigned-weights`` for a command that exports a model."""
    parser.add_argument("--unsigned-weights", action="store_true",
                        help=f"{what} stored as uint8 (+128, zero point +128): the same model, which onnxruntime runs "
                             "exactly on x86 CPUs without VNNI too (its uint8 x int8 kernels saturate there)")


def note(unsigned: bool, sim=None) -> None:
    """Print a note when onnxruntime on this CPU would not run the exported int8 weights exactly (``sim``: only if
    it has 8-bit or narrower integer weights)."""
    narrow = sim is None or any(q.kind == "param" and q.enabled and q.data_type == "int" and q.bitwidth <= 8
                                for q in sim.quantizers.values())
    if not unsigned and narrow and onnxruntime_saturates_u8s8():
        print("note: onnxruntime on this CPU (x86 AVX2 without VNNI) adds pairs of uint8 x int8 products with int16 "
              "saturation, so it computes the exported int8 weights inexactly; export with --unsigned-weights "
              "(unsigned_weights=True in Python) for a model it runs exactly here")


__all__ = ["add_argument", "cpu_flags", "note", "onnxruntime_saturates_u8s8", "unsigned_weights"]
