"""Export a calibrated QuantSim: the FP32 model, AIMET's encodings JSON, and a QDQ ONNX model.

In the QDQ model every active quantizer of a tensor ``t`` becomes ``QuantizeLinear -> DequantizeLinear``
with the encoding's float32 scale and zero point (:meth:`Encoding.to_onnx`), and every reader of ``t``
reads the dequantized tensor instead. Names: the float tensor keeps ``t`` and the QDQ result is
``t + QDQ_SUFFIX``, except for graph outputs, which keep their name for the QDQ result while the float
tensor becomes ``t + FLOAT_SUFFIX``. Weights stay float initializers with their own Q/DQ pair, as in
AIMET's ``to_onnx_qdq``. 4- and 16-bit grids and per-block encodings need opset 21.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import RefquantError
from ..fileio import atomic_path
from ..ir import Node
from ..onnx_io import save, to_onnx
from .encoding import Encoding, EncodingError
from .subgraphs import all_producers

QDQ_SUFFIX = "_qdq"
FLOAT_SUFFIX = "_float"
_ONNX_TYPES = {"int2": TensorProto.INT2 if hasattr(TensorProto, "INT2") else None,
               "uint2": TensorProto.UINT2 if hasattr(TensorProto, "UINT2") else None,
               "int4": TensorProto.INT4, "uint4": TensorProto.UINT4, "int8": TensorProto.INT8,
               "uint8": TensorProto.UINT8, "int16": TensorProto.INT16, "uint16": TensorProto.UINT16,
               "int32": TensorProto.INT32}


def qdq_names(sim, name: str) -> tuple[str, str]:
    """(float tensor, dequantized tensor) names of quantized tensor ``name`` in the QDQ model."""
    if name in sim.graph.output_names:
        return name + FLOAT_SUFFIX, name
    return name, name + QDQ_SUFFIX


def active_encodings(sim) -> dict[str, Encoding]:
    """Every tensor that the simulation quantizes, with its encoding, in graph order."""
    result = {}
    for name, quantizer in sim.quantizers.items():
        encoding = sim.encoding_of(name)
        if quantizer.enabled and encoding is not None:
            result[name] = encoding
    return result


def required_opset(sim) -> int:
    """The lowest default-domain opset that can hold the QDQ model."""
    opset = max(13, sim.graph.opset.get("", 13))  # per-axis QuantizeLinear needs 13
    for name, encoding in active_encodings(sim).items():
        if encoding.kind != "int":
            continue
        if encoding.bitwidth not in (4, 8, 16, 32):
            raise EncodingError(f"tensor {name!r}: a {encoding.bitwidth}-bit grid has no ONNX QuantizeLinear type "
                                f"(4, 8 and 16 bits do); its encoding can still be exported as JSON")
        if encoding.bitwidth in (4, 16) or encoding.block_size is not None:
            opset = max(opset, 21)
    return opset


def to_qdq_onnx(sim, derived: bool = False) -> onnx.ModelProto:
    """The simulated model as QuantizeLinear/DequantizeLinear pairs around float ops: one pair per active quantizer,
    so that the QDQ model is the simulation tensor for tensor. ``derived=True``: AIMET's ``to_onnx_qdq`` placement,
    a pair also on every tensor its export derives an encoding for (:func:`derived_encodings`: data-movement
    outputs, a clip's input inside a Conv -> Clip supergroup; int32 biases excepted). The final quantized values are
    the same, but a clip then reads a quantized input, so intermediate float tensors differ from the simulation's."""
    opset = required_opset(sim)  # derived pairs reuse active encodings: no other bitwidths
    graph = sim.graph_for_export()
    graph.opset = dict(graph.opset, **{"": opset})
    encodings = active_encodings(sim)
    if derived:
        encodings.update({name: encoding for name, encoding in derived_encodings(sim, encodings).items()
                          if encoding.kind != "int" or encoding.bitwidth != 32})
    zero_points: dict[str, tuple[np.ndarray, str]] = {}
    new_nodes: list[Node] = []
    outputs = set(graph.output_names)
    tag_of = _TagAllocator(graph)

    def qdq_nodes(name: str, encoding: Encoding) -> list[Node]:
        source, result = qdq_names(sim, name)
        tag = tag_of(name)
        if encoding.kind == "float":
            return [Node("Cast", [source], [f"{tag}_fp16"], {"to": TensorProto.FLOAT16}, f"{tag}_cast16", "", opset),
                    Node("Cast", [f"{tag}_fp16"], [result], {"to": TensorProto.FLOAT}, f"{tag}_cast32", "", opset)]
        quantizer = sim.quantizers.get(name)
        if quantizer is not None and quantizer.enabled and quantizer.role == "bias":
            return _bias_nodes(graph, name, result, encoding, zero_points, tag, opset)
        is_param = quantizer is not None and quantizer.enabled and quantizer.kind == "param"
        scale, zero_point, type_name = encoding.to_onnx(signed=None if is_param else False)
        graph.initializers[f"{tag}_scale"] = np.asarray(scale, dtype=np.float32)
        zero_points[f"{tag}_zero_point"] = (np.asarray(zero_point), type_name)
        attrs = {}
        if encoding.axis is not None:
            attrs["axis"] = int(encoding.axis)
        if encoding.block_size is not None:
            attrs["block_size"] = int(encoding.block_size)
        inputs = [source, f"{tag}_scale", f"{tag}_zero_point"]
        return [Node("QuantizeLinear", inputs, [f"{tag}_quantized"], attrs, f"{tag}_quantize", "", opset),
                Node("DequantizeLinear", [f"{tag}_quantized"] + inputs[1:], [result], dict(attrs),
                     f"{tag}_dequantize", "", opset)]

    for name, encoding in encodings.items():
        if name in graph.initializers or name in graph.input_names:
            new_nodes.extend(qdq_nodes(name, encoding))

    read_by_subgraphs = {name for node in graph.walk() for sub in node.subgraphs() for name in sub.outer_references()}

    def regrid(node: Node, source: str, new_nodes: list[Node]) -> None:
        """A data-movement op on a dequantized tensor whose output a subgraph reads (outer scope) gets the same
        Q/DQ pair on its output: exact (its values are on that grid already), and it keeps onnxruntime's
        QDQPropagationTransformer (1.32) from moving the pair across the op, which aborts on a tensor that is a
        subgraph's implicit input (``DQ -> Squeeze -> If reading it``: C++ assertion in onnxruntime)."""
        from .placement import GRID_PRESERVING

        out = node.outputs[0] if node.outputs else ""
        if (node.op_type not in GRID_PRESERVING or node.op_type in ("If", "Loop") or out not in read_by_subgraphs
                or out in encodings or out in outputs or source not in encodings):
            return
        encoding = encodings[source]
        tag = tag_of(source)
        if encoding.kind != "int" or encoding.axis is not None or f"{tag}_zero_point" not in zero_points:
            return
        moved = f"{out}{FLOAT_SUFFIX}"
        node.outputs = [moved] + node.outputs[1:]
        out_tag = tag_of(out)
        params = [f"{tag}_scale", f"{tag}_zero_point"]
        new_nodes.extend([Node("QuantizeLinear", [moved, *params], [f"{out_tag}_regrid_quantized"], {},
                               f"{out_tag}_regrid_quantize", "", opset),
                          Node("DequantizeLinear", [f"{out_tag}_regrid_quantized", *params], [out], {},
                               f"{out_tag}_regrid_dequantize", "", opset)])

    def rewrite(nodes: list[Node], new_nodes: list[Node]) -> None:
        """Readers of quantized tensors read the dequantized ones; each quantized node output is followed
        by its pair. Subgraphs (If/Loop) get the same treatment inside: their nodes read outer-scope
        tensors by name, and their Q/DQ constants are main-graph initializers (outer scope too)."""
        for node in nodes:
            source = node.inputs[0] if node.inputs else ""
            node.inputs = [qdq_names(sim, i)[1] if i in encodings else i for i in node.inputs]
            node.version = opset if node.domain == "" else node.version
            for sub in node.subgraphs():
                sub_nodes: list[Node] = []
                rewrite(sub.nodes, sub_nodes)
                sub.nodes = sub_nodes
                sub.outputs = [dataclasses.replace(v, name=qdq_names(sim, v.name)[1]) if v.name in encodings else v
                               for v in sub.outputs]
                sub.opset = graph.opset
            new_nodes.append(node)
            regrid(node, source, new_nodes)
            for out in node.outputs:
                if out in encodings:
                    if out in outputs:
                        node.outputs = [qdq_names(sim, out)[0] if o == out else o for o in node.outputs]
                    new_nodes.extend(qdq_nodes(out, encodings[out]))

    rewrite(graph.nodes, new_nodes)
    graph.nodes = new_nodes
    model = to_onnx(graph, graph.opset)
    for name, (zero_point, type_name) in zero_points.items():
        model.graph.initializer.append(_typed_tensor(name, zero_point, type_name))
    return model


class _TagAllocator:
    """The prefix of the names the export creates for one quantized tensor (``{tag}_scale``,
    ``{tag}_zero_point``, ``{tag}_quantized``, ...): the tensor's name with '/' made '_', numbered where a
    created name would collide with a name of the model (a tensor called ``x_scale`` next to a quantized
    ``x``) or with another tensor's tag (``a/b`` and ``a_b``)."""

    SUFFIXES = ("_scale", "_zero_point", "_quantized", "_quantize", "_dequantize", "_fp16", "_cast16", "_cast32",
                "_codes", "_regrid_quantized", "_regrid_quantize", "_regrid_dequantize")

    def __init__(self, graph):
        self.taken = set(graph.initializers) | set(graph.input_names) | set(graph.output_names)
        for node in graph.walk():
            self.taken.update(node.outputs)
            self.taken.add(node.name)
        for node in graph.walk():
            for sub in node.subgraphs():
                self.taken.update(sub.initializers)
                self.taken.update(v.name for v in sub.inputs)
        self.tags: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        if name not in self.tags:
            base = name.replace("/", "_").strip("_") or "tensor"
            tag, k = base, 1
            while any(tag + suffix in self.taken for suffix in self.SUFFIXES):
                k += 1
                tag = f"{base}_{k}"
            self.taken.update(tag + suffix for suffix in self.SUFFIXES)
            self.tags[name] = tag
        return self.tags[name]


def _bias_nodes(graph, name, result, encoding, zero_points, tag, opset) -> list[Node]:
    """An int32 bias: stored as its integer codes round(b / scale), dequantized per channel."""
    bias = np.asarray(graph.initializers[name], dtype=np.float64)
    scale = np.asarray(encoding.scale, dtype=np.float32)
    codes = np.clip(np.rint(bias / scale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
    zero_points[f"{tag}_codes"] = (codes, "int32")
    graph.initializers[f"{tag}_scale"] = scale
    attrs = {"axis": 0} if scale.ndim else {}
    return [Node("DequantizeLinear", [f"{tag}_codes", f"{tag}_scale"], [result], attrs, f"{tag}_dequantize", "",
                 opset)]


def _typed_tensor(name: str, values: np.ndarray, type_name: str) -> onnx.TensorProto:
    data_type = _ONNX_TYPES.get(type_name)
    if data_type is None:
        raise EncodingError(f"{name}: onnx {onnx.__version__} has no {type_name} type")
    return helper.make_tensor(name, data_type, list(values.shape), values.astype(np.int64).ravel().tolist())


def export(sim, directory, prefix: str = "model", encoding_version: str = "1.0.0",
           unsigned_weights: bool = False) -> dict[str, str]:
    """Write ``prefix.onnx`` (the FP32 graph the simulation wraps), ``prefix.encodings`` and
    ``prefix_qdq.onnx`` into ``directory`` (created). Everything is built before anything is written.
    ``unsigned_weights``: the QDQ model's int8 weight grids as uint8, zero point + 128 (the same values; see
    :mod:`refquant.intsim.unsigned_weights`); the encodings file is AIMET's either way."""
    from pathlib import Path

    from .encodings_io import write_encodings

    if encoding_version not in ("1.0.0", "2.0.0"):
        raise RefquantError(f"encoding_version {encoding_version!r}: refquant writes '1.0.0' and '2.0.0'")
    directory = Path(directory)
    qdq_model = to_qdq_onnx(sim)  # fails early (e.g. a 6-bit grid) before any file exists
    if unsigned_weights:
        from ..intsim.unsigned_weights import unsigned_weights as to_unsigned

        qdq_model = to_unsigned(qdq_model)[0]
    activations, params, extra = encodings_for_file(sim, encoding_version)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RefquantError(f"cannot create export directory {directory}: {exc.strerror}") from None
    paths = {"model": directory / f"{prefix}.onnx", "encodings": directory / f"{prefix}.encodings",
             "qdq": directory / f"{prefix}_qdq.onnx"}
    try:
        save(sim.graph_for_export(), paths["model"])
        write_encodings(paths["encodings"], activations, params, version=encoding_version,
                        quantizer_args=quantizer_args(sim), extra_2_0_0=extra, order=aimet_order(sim, extra))
        with atomic_path(paths["qdq"]) as tmp:
            onnx.save(qdq_model, str(tmp))
    except OSError as exc:
        raise RefquantError(f"cannot write to export directory {directory}: {exc.strerror}") from None
    return {k: str(v) for k, v in paths.items()}


def quantizer_args(sim) -> dict:
    """AIMET's ``quantizer_args`` block."""
    return {"activation_bitwidth": sim.output_bw if isinstance(sim.output_bw, int) else 16,
            "dtype": "float" if sim.output_bw == "fp16" else "int",
            "is_symmetric": bool(sim.config.defaults_params.get("is_symmetric", False)),
            "param_bitwidth": sim.param_bw if isinstance(sim.param_bw, int) else 16,
            # as AIMET: the defaults' setting, or any op type's (its per-channel configs set it per op type)
            "per_channel_quantization": bool(sim.config.per_channel) or any(
                section.get("per_channel_quantization", False) for section in sim.config.op_type.values()),
            "quant_scheme": sim.quant_scheme}


def encodings_for_file(sim, version: str):
    """(activations, params, extra 2.0.0 entries): params are the quantizers of parameters with a role
    (quantized biases too, as AIMET lists them); in 2.0.0 also the int32 biases of Conv/Gemm whose
    input and weight are quantized, and the outputs of data-movement ops, with their input's encoding."""
    activations, params, extra = {}, {}, {}
    for name, encoding in active_encodings(sim).items():
        quantizer = sim.quantizers[name]
        if quantizer.kind == "param":
            params[name] = encoding
        else:
            activations[name] = encoding
    if version == "2.0.0":
        extra.update(_derived_bias_encodings(sim, activations, params, extra))
        extra.update(derived_encodings(sim, {**activations, **params, **extra}))
    return activations, params, extra


def aimet_order(sim, extra) -> list[str]:
    """AIMET's 2.0.0 order: each parameter in graph order, a derived int32 bias right after its weight."""
    order = []
    for node in sim.graph.walk():
        for name in node.inputs:
            if name in sim.quantizers and sim.quantizers[name].kind == "param" and name not in order:
                order.append(name)
            if name in extra and name not in order:
                order.append(name)
    return order


# the smallest int32 bias scale aimet-onnx writes (its _INT32_MINIMUM_SCALE: min(float32 eps, 0.01 / (2^32 - 1)))
INT32_MINIMUM_SCALE = min(float(np.finfo(np.float32).eps), 0.01 / (2 ** 32 - 1))
_ANALYTIC_BIAS_OPS = ("Conv", "Gemm", "ConvTranspose", "MatMul")
_STATISTICAL_BIAS_OPS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization")


def _layer_bias(sim, node) -> str | None:
    """The bias of a layer: input 2, or for a MatMul the Add constant that AIMET's MatmulAdd pass made its bias."""
    if node.op_type == "MatMul":
        from .placement import matmul_bias

        found = matmul_bias(node, sim.graph, sim.graph.consumers())
        bias = found[1] if found else None
        quantizer = sim.quantizers.get(bias) if bias else None
        return bias if quantizer is not None and quantizer.role == "bias" else None
    return node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None


def _derived_bias_encodings(sim, activations, params, existing) -> dict[str, Encoding]:
    """The int32 bias encodings aimet-onnx's 2.0.0 export adds for a layer whose bias is not quantized but whose
    weight and input are (``_concretize_int32_bias_quantizers``): Conv/Gemm/ConvTranspose/MatMul(+Add) take
    ``input_scale * weight_scale`` (per channel with the weight); normalizations take ``max(|b| / 2^31, 2.3e-12)``,
    per tensor (the largest) when the weight is."""
    from .encoding import bias_encoding

    from .norm_fusion import fused_norms

    result = {}
    producers = all_producers(sim.graph)
    layers = [(node.op_type, _layer_bias(sim, node), node.inputs[0], node.inputs[1]) for node in sim.graph.walk()
              if node.op_type in _ANALYTIC_BIAS_OPS + _STATISTICAL_BIAS_OPS and len(node.inputs) >= 2]
    # a decomposed LayerNorm/RMSNorm the config's supergroup passes fuse is one normalization for AIMET
    layers += [(group.op_type, group.bias, group.input, group.scale)
               for group in fused_norms(sim.graph, sim.config.supergroup_passes) if group.scale]
    for op_type, bias, x, w in layers:
        if not bias or bias in existing or bias in params or bias not in sim.graph.initializers \
                or bias not in sim.quantizers:
            continue
        x_enc = _grid_of(x, producers, activations)
        w_enc = params.get(w)
        if x_enc is None or w_enc is None or x_enc.kind != "int" or w_enc.kind != "int":
            continue
        if op_type in _ANALYTIC_BIAS_OPS:
            result[bias] = bias_encoding(x_enc.scale, w_enc.scale, axis=0)
            continue
        scale = np.maximum(np.abs(np.asarray(sim.graph.initializers[bias], dtype=np.float64)) / 2.0 ** 31,
                           INT32_MINIMUM_SCALE)
        if w_enc.axis is None:
            scale = np.float64(scale.max())
        result[bias] = Encoding(scale, np.full(np.shape(scale), -float(1 << 31)), 32, True, (1 << 32) - 1,
                                0 if np.ndim(scale) else None)
    return result


def _grid_of(name, producers, activations):
    """The encoding that defines tensor ``name``'s grid, looking back through data-movement ops."""
    from .placement import grid_source

    source = grid_source(name, producers, activations.__contains__)
    return activations[source] if source else None


# aimet-onnx 2.42.0's export-time propagation (``_derive_data_movement_op_encodings``): its grid-preserving ops,
# the other grid-equivariant ops (Concat, Scatter*), and the clipping, padding and selector ops
DERIVING_OPS = {
    "Col2Im", "Compress", "DepthToSpace", "Dropout", "Expand", "Flatten", "Gather", "GatherElements", "GatherND",
    "Identity", "MaxPool", "MaxRoiPool", "NonZero", "Pad", "ReduceMax", "ReduceMin", "Reshape", "Slice",
    "SpaceToDepth", "Split", "SplitToSequence", "Squeeze", "Tile", "TopK", "Transpose", "Unsqueeze",
    "Concat", "Scatter", "ScatterElements", "ScatterND", "Clip", "Max", "Min", "Where",
}


def _float_slots(op_type: str, count: int, outputs: bool) -> list[bool]:
    """Which of an op's inputs (outputs) can be float by its ONNX schema (a Clip's min/max can, Reshape's shape
    cannot): the tensors the propagation considers."""
    try:
        schema = onnx.defs.get_schema(op_type)
    except onnx.defs.SchemaError:
        return [False] * count
    params = schema.outputs if outputs else schema.inputs
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    result = []
    for i in range(count):
        if not params:
            result.append(False)
            continue
        if i < len(params):
            param = params[i]
        elif params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            param = params[-1]  # Concat's, Max's inputs
        else:
            param = None
        types = allowed.get(param.type_str, [param.type_str]) if param is not None else []
        result.append(any(t in ("tensor(float)", "tensor(float16)", "tensor(bfloat16)") for t in types))
    return result


def _same_grid(a: Encoding | None, b: Encoding | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.kind == b.kind and a.bitwidth == b.bitwidth and a.symmetric == b.symmetric and a.axis == b.axis
            and np.array_equal(np.asarray(a.scale), np.asarray(b.scale))
            and np.array_equal(np.asarray(a.offset), np.asarray(b.offset)))


def derived_encodings(sim, known: dict) -> dict[str, Encoding]:
    """Encodings the export adds to ``known`` (tensor -> encoding), as AIMET's export does: through each op of
    ``DERIVING_OPS`` in graph order, then again in reverse order,

    * forward: an output without an encoding takes the first float input's per-tensor encoding when all float
      inputs share it (Pad: whenever its data input has one);
    * backward: an input without an encoding, read by this op only, takes the first output's per-tensor encoding
      when all float outputs share it (a Conv output inside a Conv -> Clip supergroup gets the Clip's).

    Exact where it adds a Q/DQ pair: a data-movement output is on its input's grid already, and quantizing a clip's
    input on the clip's output grid commutes with the clip."""
    known = dict(known)
    result: dict[str, Encoding] = {}
    nodes = [n for n in sim.graph.walk() if n.domain == "" and n.op_type in DERIVING_OPS]
    readers: dict[str, int] = {}
    for node in sim.graph.walk():
        for name in node.inputs:
            readers[name] = readers.get(name, 0) + 1

    def derive(node) -> None:
        flags = _float_slots(node.op_type, len(node.inputs), False)
        inputs = [name for name, f in zip(node.inputs, flags) if f and name]
        flags = _float_slots(node.op_type, len(node.outputs), True)
        outputs = [name for name, f in zip(node.outputs, flags) if f and name]
        if not inputs or not outputs:
            return
        forward = (node.inputs[0] in known if node.op_type == "Pad"
                   else all(_same_grid(known.get(i), known.get(inputs[0])) for i in inputs[1:]))
        backward = all(_same_grid(known.get(o), known.get(outputs[0])) for o in outputs[1:])
        for name in inputs:
            for out in outputs:
                if name in known and out in known:
                    continue
                theirs = known.get(out)
                # (not into a constant: AIMET gives every float constant input its own quantizer, so it never
                # derives one; refquant leaves Clip bounds and the like unquantized, see placement.py)
                if theirs is not None and theirs.axis is None and backward and name not in known \
                        and readers.get(name, 0) == 1 and name not in sim.graph.initializers:
                    known[name] = result[name] = theirs
        source = known.get(inputs[0])
        for out in outputs:
            if source is not None and source.axis is None and forward and out not in known:
                known[out] = result[out] = source

    for node in nodes + nodes[::-1]:
        derive(node)
    return result
