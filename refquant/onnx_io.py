"""ONNX <-> IR.

``load`` reads a model (path, bytes or ModelProto; external data included), turns Constant nodes
into initializers, drops initializers from the graph inputs, normalizes opset-dependent forms
(:mod:`refquant.onnx_forms`), refuses unsupported ops and element types with one error that lists
them all, and infers every tensor's dtype and shape with refquant's own rules.
``save`` writes the graph back at its original opset, atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from . import dtypes
from .errors import ModelLoadError, UnsupportedOpError, UnsupportedTypeError
from .ir import Graph, Node, Value
from .onnx_forms import denormalize_node, normalize_node

MIN_OPSET = 7
_TYPE_ATTRS = {("Cast", "to"), ("CastLike", "to"), ("EyeLike", "dtype"), ("RandomNormal", "dtype"),
               ("RandomUniform", "dtype"), ("RandomNormalLike", "dtype"), ("RandomUniformLike", "dtype"),
               ("QuantizeLinear", "output_dtype"), ("DequantizeLinear", "output_dtype"),
               ("Bernoulli", "dtype"), ("Multinomial", "dtype"), ("BitCast", "to")}


# ---------------------------------------------------------------------------------- load
def load(model, *, infer_shapes: bool = True, allow_unsupported: bool = False) -> Graph:
    """Read an ONNX model into a :class:`refquant.Graph`.

    ``model`` is a path, the bytes of a model, or an ``onnx.ModelProto``. ``allow_unsupported``
    keeps a graph with unregistered ops (for inspection: ``refquant info``); it cannot run.
    Raises ModelLoadError (unreadable or malformed), UnsupportedOpError (every unsupported op at
    once) or UnsupportedTypeError (string, bfloat16, float8, ... tensors).
    """
    proto, source = _read(model)
    opset = {}
    for entry in proto.opset_import:
        domain = "" if entry.domain in ("", "ai.onnx") else entry.domain
        opset[domain] = int(entry.version)
    opset.setdefault("", MIN_OPSET if not proto.opset_import else opset.get("", MIN_OPSET))
    graph = _convert_graph(proto.graph, opset, source)
    graph.opset = opset
    graph.metadata = {p.key: p.value for p in proto.metadata_props}
    graph.model_info = {
        "ir_version": proto.ir_version,
        "producer_name": proto.producer_name,
        "producer_version": proto.producer_version,
        "domain": proto.domain,
        "model_version": proto.model_version,
        "doc_string": proto.doc_string,
        "source": source,
        "functions": list(proto.functions),
    }
    if not allow_unsupported:
        _check_ops(graph, source, {f.name for f in proto.functions})
    if infer_shapes:
        from .shape_inference import infer_shapes as _infer

        _infer(graph)
    return graph


def _read(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<ModelProto>"
    if isinstance(model, (bytes, bytearray)):
        return _parse(bytes(model), "<bytes>", None), "<bytes>"
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    data = path.read_bytes()
    proto = _parse(data, str(path), path.parent)
    return proto, str(path)


def _parse(data: bytes, source: str, base_dir) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelLoadError(f"{source}: not a readable ONNX model ({exc.__class__.__name__}: {exc})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"{source}: not an ONNX model (no graph, or a graph with no nodes and no outputs)")
    if base_dir is not None and _has_external_data(proto):
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(base_dir))
        except Exception as exc:
            raise ModelLoadError(f"{source}: cannot read external data ({exc})") from None
    return proto


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)


def _convert_graph(gp: onnx.GraphProto, opset: dict[str, int], source: str, outer=None) -> Graph:
    graph = Graph(name=gp.name or "graph", opset=opset)
    where = f"{source}: graph {gp.name!r}" if gp.name else source
    for t in gp.initializer:
        graph.initializers[t.name] = _tensor(t, f"{where}: initializer {t.name!r}")
    for st in gp.sparse_initializer:
        graph.initializers[st.values.name] = _sparse_to_dense(st, f"{where}: sparse initializer")
    for vi in gp.input:
        if vi.name in graph.initializers:
            continue  # old IR versions list weights as inputs too: they are constants here
        graph.inputs.append(_value(vi, where))
    graph.outputs = [_value(vi, where) for vi in gp.output]
    for vi in list(gp.input) + list(gp.output) + list(gp.value_info):
        if vi.name not in graph.initializers:
            graph.values[vi.name] = _value(vi, where)
    for name, array in graph.initializers.items():
        graph.values[name] = Value(name, array.dtype, tuple(array.shape))
    names = set()
    for index, np_ in enumerate(gp.node):
        domain = "" if np_.domain in ("", "ai.onnx") else np_.domain
        name = np_.name or f"{np_.op_type}_{index}"
        while name in names:
            name += "_"
        names.add(name)
        node_where = f"{where}: node {name!r} ({np_.op_type})"
        attrs = {a.name: _attribute(a, opset, node_where, np_.op_type) for a in np_.attribute if not a.ref_attr_name}
        node = Node(np_.op_type, list(np_.input), list(np_.output), attrs, name, domain, opset.get(domain, 1))
        if domain == "" and node.op_type == "Constant":
            graph.initializers[node.outputs[0]] = _constant_value(node, node_where)
            array = graph.initializers[node.outputs[0]]
            graph.values[node.outputs[0]] = Value(node.outputs[0], array.dtype, tuple(array.shape))
            continue
        data = graph.initializers.get(node.inputs[0]) if node.inputs else None
        value0 = graph.values.get(node.inputs[0]) if node.inputs else None
        data_dtype = data.dtype if data is not None else (value0.dtype if value0 else None)
        normalize_node(node, graph, data_dtype)
        graph.nodes.append(node)
    return graph


def _value(vi: onnx.ValueInfoProto, where: str) -> Value:
    kind = vi.type.WhichOneof("value")
    if kind is None:
        return Value(vi.name)
    if kind != "tensor_type":
        raise UnsupportedTypeError(f"{where}: tensor {vi.name!r} has type {kind.replace('_type', '')}; "
                                   "refquant supports tensors only (no sequence, optional or map values)")
    tt = vi.type.tensor_type
    dtype = dtypes.to_numpy(tt.elem_type, f"{where}: tensor {vi.name!r}") if tt.elem_type else None
    shape = None
    if tt.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
    return Value(vi.name, dtype, shape)


def _tensor(t: TensorProto, where: str) -> np.ndarray:
    dtypes.to_numpy(t.data_type, where)
    try:
        array = numpy_helper.to_array(t)
    except Exception as exc:
        raise ModelLoadError(f"{where}: unreadable tensor data ({exc})") from None
    return np.array(array)  # own, writable memory


def _sparse_to_dense(st, where: str) -> np.ndarray:
    values = _tensor(st.values, where)
    indices = numpy_helper.to_array(st.indices)
    dense = np.zeros(int(np.prod(st.dims)), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(indices.T, tuple(st.dims))
    dense[indices] = values
    return dense.reshape(tuple(st.dims))


def _attribute(a: AttributeProto, opset, where: str, op_type: str):
    if a.type == AttributeProto.TENSOR:
        return _tensor(a.t, f"{where} attribute {a.name!r}")
    if a.type == AttributeProto.TENSORS:
        return [_tensor(t, f"{where} attribute {a.name!r}") for t in a.tensors]
    if a.type == AttributeProto.SPARSE_TENSOR:
        return _sparse_to_dense(a.sparse_tensor, f"{where} attribute {a.name!r}")
    if a.type == AttributeProto.GRAPH:
        return _convert_graph(a.g, opset, where)
    if a.type == AttributeProto.GRAPHS:
        return [_convert_graph(g, opset, where) for g in a.graphs]
    if a.type == AttributeProto.STRING:
        return a.s.decode("utf-8", errors="replace")
    if a.type == AttributeProto.STRINGS:
        return [s.decode("utf-8", errors="replace") for s in a.strings]
    if a.type in (AttributeProto.TYPE_PROTO, AttributeProto.TYPE_PROTOS):
        raise UnsupportedTypeError(f"{where}: attribute {a.name!r} holds a type proto, which refquant does not support")
    value = helper.get_attribute_value(a)
    if (op_type, a.name) in _TYPE_ATTRS:
        dtypes.to_numpy(int(value), f"{where} attribute {a.name!r}")
    return list(value) if isinstance(value, (list, tuple)) or type(value).__name__.startswith("Repeated") else value


def _constant_value(node: Node, where: str) -> np.ndarray:
    attrs = node.attrs
    if "value" in attrs:
        return attrs["value"]
    if "sparse_value" in attrs:
        return attrs["sparse_value"]
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    if "value_string" in attrs or "value_strings" in attrs:
        raise UnsupportedTypeError(f"{where}: string constants are not supported by refquant")
    raise ModelLoadError(f"{where}: Constant node without a value")


def _check_ops(graph: Graph, source: str, functions: set[str]) -> None:
    from .ops import lookup

    missing = {(n.domain, n.op_type) for n in graph.walk() if lookup(n.op_type, n.domain, n.version) is None}
    local = {(d, t) for d, t in missing if t in functions}
    if missing - local:
        raise UnsupportedOpError(missing - local, source)
    if local:
        raise UnsupportedOpError(local, f"{source} (model-local functions are not supported)")


# ---------------------------------------------------------------------------------- save
def to_onnx(graph: Graph, opset: dict[str, int] | None = None) -> onnx.ModelProto:
    """The graph as an ``onnx.ModelProto`` at ``opset`` (default: the graph's own)."""
    opset = dict(opset or graph.opset or {"": 17})
    gp = _graph_proto(graph, opset)
    info = graph.model_info
    model = helper.make_model(
        gp,
        opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opset.items())],
        producer_name="refquant",
    )
    model.ir_version = max(int(info.get("ir_version") or 0), 4, _min_ir_version(opset.get("", 17)))
    for key in ("domain", "doc_string"):
        if info.get(key):
            setattr(model, key, info[key])
    if info.get("model_version"):
        model.model_version = info["model_version"]
    model.functions.extend(info.get("functions", []))
    for key, val in graph.metadata.items():
        model.metadata_props.add(key=key, value=val)
    return model


def save(graph: Graph, path, *, opset: dict[str, int] | None = None, overwrite: bool = True,
         rewrite=None) -> Path:
    """Write ``graph`` to ``path`` as ONNX (temp file + rename; external data above 2 GB); ``rewrite``: a function
    ModelProto -> ModelProto applied before writing."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    model = to_onnx(graph, opset)
    if rewrite is not None:
        model = rewrite(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        if model.ByteSize() > 2**31 - 2**24:
            data_name = path.name + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, location=data_name)
        else:
            Path(tmp).write_bytes(model.SerializeToString())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _graph_proto(graph: Graph, opset: dict[str, int]) -> onnx.GraphProto:
    nodes = []
    # the constants an older opset holds as attributes again (ReduceMean's axes before 18) are no inputs: not written
    used = set(graph.output_names)
    for node in graph.nodes:
        used.update(i for sub in node.subgraphs() for inner in sub.walk() for i in inner.inputs)
        node = denormalize_node(node, graph.initializers, opset.get(node.domain, 1))
        used.update(node.inputs)
        attrs = {k: _attr_value(v, opset) for k, v in node.attrs.items()}
        nodes.append(helper.make_node(node.op_type, node.inputs, node.outputs, name=node.name,
                                      domain=node.domain or None, **attrs))
    initializers = [numpy_helper.from_array(np.asarray(a), name) for name, a in graph.initializers.items()
                    if name in used]
    inputs = [_value_info(v, graph) for v in graph.inputs]
    outputs = [_value_info(v, graph) for v in graph.outputs]
    return helper.make_graph(nodes, graph.name, inputs, outputs, initializers)


def _value_info(v: Value, graph: Graph) -> onnx.ValueInfoProto:
    known = graph.values.get(v.name, v)
    dtype = v.dtype if v.dtype is not None else known.dtype
    shape = v.shape if v.shape is not None else known.shape
    if dtype is None:
        return helper.make_empty_tensor_value_info(v.name)
    return helper.make_tensor_value_info(v.name, dtypes.to_onnx(dtype), None if shape is None else list(shape))


def _attr_value(value, opset):
    if isinstance(value, Graph):
        return _graph_proto(value, opset)
    if isinstance(value, np.ndarray):
        return numpy_helper.from_array(value)
    if isinstance(value, list) and value and isinstance(value[0], Graph):
        return [_graph_proto(g, opset) for g in value]
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        return [numpy_helper.from_array(a) for a in value]
    return value


def _min_ir_version(opset: int) -> int:
    table = [(7, 3), (9, 4), (10, 5), (11, 6), (13, 7), (15, 8), (19, 9), (21, 10), (23, 11)]
    version = 3
    for op, ir in table:
        if opset >= op:
            version = ir
    return version
