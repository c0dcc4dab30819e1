"""Lowering a calibrated QuantSim to an integer program (a QOperator graph in refquant's IR).

The program is an ordinary :class:`refquant.ir.Graph` whose ops are onnxruntime's integer operators, so
running it with :class:`refquant.Session` and exporting it to ONNX give the same program by construction:

* graph inputs: ``QuantizeLinear`` to uint8/uint16 codes (the activation encoding, ``to_onnx(signed=False)``,
  as onnxruntime's ``quantize_static`` U8 activations);
* Conv (per-channel, depthwise, grouped) -> ``QLinearConv``; Gemm -> ``com.microsoft.QGemm``; MatMul (constant
  weights, or activation x activation) -> ``QLinearMatMul``; weights are int8 when their grid is signed symmetric
  (zero point 0) and uint8 with a per-channel zero point otherwise (AIMET's unsigned-symmetric channels, or
  asymmetric weights); grids narrower than 8 bits (w4) are held in the 8-bit types. Biases are int32 codes
  ``round(b / (f32(x_scale) * f32(w_scale)))`` in float64, half to even, as onnxruntime's
  ``quantize_bias_static_impl`` computes them, clipped to int32 as its quantizer does (a clipped bias is
  noted on the layer in the summary and warned about, never silent); accumulation is int32; requantization goes to the output encoding;
* ConvTranspose -> the stride-1 ``QLinearConv`` it equals: the input codes zero-stuffed with their zero point
  (``Pad`` of the channel axis, ``DepthToSpace`` DCR, a ``Slice`` where the pads exceed the kernel's reach), the
  kernel flipped with its in/out axes swapped, pads ``d (k - 1) - pad`` (+ output_padding); the accumulator is
  exactly the transposed convolution's int32 sum (onnxruntime has no integer ConvTranspose kernel; this form runs
  in it). One stride for both spatial axes of a 2-D ConvTranspose when the stride exceeds 1; no output_shape;
* Add, Mul -> ``com.microsoft.QLinearAdd`` / ``QLinearMul`` (a constant operand is quantized with its own
  constant quantizer's encoding); Concat -> ``QLinearConcat``; AveragePool / GlobalAveragePool ->
  ``QLinearAveragePool`` / ``QLinearGlobalAveragePool``; Sigmoid, LeakyRelu -> ``QLinearSigmoid`` /
  ``QLinearLeakyRelu`` (lookup tables built by onnxruntime's arithmetic); Softmax -> ``QLinearSoftmax``
  (uint8 / int8; :mod:`refquant.intsim.contrib`: onnxruntime's float32 exp table, output scale as
  floor(1 / y_scale));
* MaxPool and the grid-preserving ops (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, Gather, Pad...)
  run on the codes directly (Pad's constant becomes its code; GlobalMaxPool becomes ReduceMax);
* Relu / Clip that the simulation fuses into the previous layer (a supergroup: no quantizer between them)
  become the clamp ``[Q(min), Q(max)]`` of that layer's output codes: nothing when it is the type's full range
  (a Relu whose output zero point is 0), else a ``Clip`` on the codes;
* other element-wise ops of one quantized input and constants (an unfused Relu or Clip whose output grid differs
  from its input's, PRelu, Tanh, HardSwish, Div by a constant, an inference BatchNormalization, ...) -> a lookup
  table indexed by the input code
  (``Cast`` to int32, ``Add`` a per-channel row offset, ``Gather``): the table is the simulation's own
  arithmetic ``Q_out(op(DQ_in(code), quantized constants))``, so these nodes agree with the QDQ simulation
  exactly (given the same input codes);
* an op the integer program cannot express (LayerNormalization, ReduceMean, Sub of two tensors, ...), an
  integer op whose input or output has no active quantizer, or an encoding without an onnxruntime integer form
  (16-bit activations into QLinearConv, per-channel activations, FP16) raises :class:`LoweringError` naming the
  node; with ``float_fallback=True`` the node runs in float between DequantizeLinear and QuantizeLinear instead
  (with the simulation's quantized weights) and is listed in :attr:`Program.fallbacks` (float nodes are each
  runtime's own float arithmetic: onnxruntime may also fuse DequantizeLinear -> op -> QuantizeLinear at its
  default optimization level, so bit-exactness there is measured, not guaranteed);
* graph outputs: ``DequantizeLinear`` to float under the original output names; the codes stay available;
* 16-bit activations (W8A16) under ``requant="ort"``: onnxruntime 1.32 runs QuantizeLinear / DequantizeLinear
  (opset 21), data movement (:data:`ORT_16BIT_CODE_OPS`) and the lookup tables (Cast, Add, Gather) on uint16
  codes, and no QLinear* / *Integer op, MaxPool, Pad, Resize, Clip or ReduceMax: those raise
  :class:`LoweringError` (a 16-bit Relu/Clip clamp becomes a table); with ``float_fallback=True`` they run in
  float, and a grid-preserving op (MaxPool) is quantized back to its input's grid, which is exact. Other schemes
  run in refquant, whose kernels take 16-bit codes everywhere.

Requantization: ``scheme="ort"`` uses onnxruntime's kernels as they are. Any other scheme of
:mod:`refquant.intsim.requant` (``tflite_double``, ``tflite_single``, ``onnx_reference``, ``exact``) lowers
Conv / Gemm / MatMul to ``ConvInteger`` / ``MatMulInteger`` + the bias (``Cast`` to int64, ``Add``: an int32 Add
would wrap silently) + a refquant ``Requantize`` node (domain ``com.refquant``) that checks the sum fits int32 and
calls :func:`refquant.intsim.requant.requantize` on it; such a program runs in refquant only (onnxruntime has no
such op).

Bad encodings are errors naming the node and tensor (:class:`LoweringError`): a scale that is not a positive,
finite, normal float32 (zero, negative, NaN, or a float64 value that underflows or overflows float32); a
requantization multiplier ``x_scale * w_scale / y_scale`` the scheme cannot represent (``ort`` /
``onnx_reference``: its float32 value must be finite and normal; ``tflite_*``: ``2^-32 <= M < 2^30``, where
tflite::QuantizeMultiplier neither flushes it to zero nor needs a left shift above 30 bits; ``exact``: any);
QLinearAdd / QLinearMul float32 scale ratios that overflow or underflow; a Softmax output scale above 1
(onnxruntime multiplies by ``floor(1 / y_scale)``). An int32 accumulator that overflows at run time is reported
per layer (:mod:`refquant.intsim.overflow`), never wrapped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import RefquantError
from ..ir import Graph, Node, Value, node_reads
from ..onnx_forms import FORMS
from ..ops import lookup, register
from ..quant.encoding import Encoding
from ..quant.placement import GRID_PRESERVING
from ..quant.qdq import quantize_dequantize
from . import contrib as _contrib  # noqa: F401  (registers com.microsoft QLinearSoftmax)
from .requant import (
    INT32_MAX,
    INT32_MIN,
    as_scheme,
    exact_multiplier,
    int32_or_wrap,
    ort_multiplier,
    quantize_multiplier,
    requantize,
    tflite_multiplier,
)

F32 = np.float32
MS = "com.microsoft"
REFQUANT_DOMAIN = "com.refquant"

# ops that move codes without changing them (same grid in and out); the data input is input 0
CODE_OPS = (set(GRID_PRESERVING) - {"If", "Loop", "Compress"}) | {"Identity"}
# element-wise ops of one tensor (+ constants) that a lookup table can compute
TABLE_OPS = {
    "Relu", "Clip", "PRelu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "Gelu", "ThresholdedRelu", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs",
    "Erf", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min",
    "BatchNormalization",  # inference form: a per-channel affine map (its 1-D constants run along axis 1)
}
# code ops onnxruntime 1.32's CPU provider runs on 16-bit tensors (measured: MaxPool, Pad, Resize, ReduceMax/Min,
# TopK, Clip, DepthToSpace, SpaceToDepth have no (u)int16 kernel, nor has any QLinear* / *Integer op; Quantize- and
# DequantizeLinear do from opset 21). Under requant="ort" a 16-bit tensor into any other op is a LoweringError
# (float_fallback=True: DequantizeLinear -> op -> QuantizeLinear, which is exact for MaxPool & co., as they commute
# with the monotone quantizer); other schemes run in refquant, whose kernels take every integer type.
ORT_16BIT_CODE_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Gather",
                      "GatherElements", "GatherND", "Slice", "Split", "Tile", "Expand", "Concat"}
TABLE_LIMIT = 1 << 22  # entries of a lookup table (codes x distinct constants)
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
               "Multinomial", "Dropout"}
_FUSABLE = {"Relu", "Clip"}  # activations a supergroup folds into the previous layer's output clamp


class LoweringError(RefquantError):
    """A node the integer program cannot express (names the node and what to do); ``reason`` is the why."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


@dataclass
class QTensor:
    """A tensor held as integer codes: ``x = (codes - zero_point) * scale``."""

    name: str  # codes tensor in the program
    scale: np.float32
    zero_point: int
    dtype: np.dtype
    encoding: Encoding

    @property
    def qrange(self) -> tuple[int, int]:
        info = np.iinfo(self.dtype)
        return int(info.min), int(info.max)

    def same_grid(self, other: "QTensor") -> bool:
        return self.scale == other.scale and self.zero_point == other.zero_point and self.dtype == other.dtype


@dataclass
class FloatTensor:
    name: str  # a float tensor in the program (unquantized in the simulation)


@dataclass
class OtherTensor:
    name: str  # a non-float tensor (shapes, indices), copied as it is


@dataclass
class Lowered:
    """What one node of the simulated graph became."""

    node: str
    op_type: str
    ops: list[str]
    mode: str  # "integer", "codes" (data movement on codes), "table", "float" (fallback), "copy" (shapes)
    note: str = ""
    program_nodes: list = field(default_factory=list)  # names of the program nodes it became


@dataclass
class Program:
    """The integer program: a Graph (float inputs, float outputs) plus where the codes are."""

    graph: Graph
    codes: dict[str, str]  # original output name -> codes tensor in the program
    tensors: dict[str, QTensor]  # every original tensor held as codes -> its codes
    lowered: list[Lowered]
    fallbacks: list[Lowered]
    scheme: str
    runs_in_onnxruntime: bool = True
    opset: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- the Requantize op
@register("Requantize", since=1, domain=REFQUANT_DOMAIN)
def requantize_op(acc, x_scale, w_scale, y_scale, y_zero_point, *, scheme="ort", axis=-1):
    """int32 accumulator -> codes with :func:`refquant.intsim.requant.requantize` and the multiplier
    ``x_scale * w_scale / y_scale`` as ``scheme`` forms it (``axis``: the channel axis of a per-channel
    ``w_scale``, -1 to broadcast it against the accumulator's last axis)."""
    sch = as_scheme(scheme)
    acc = int32_or_wrap(acc, f"Requantize ({scheme})",  # every scheme: int32 on target
                        "the int32 accumulator (+ bias) overflows: exact range [{low}, {high}]; the target "
                        "accumulates in int32, so no bit-exact result exists (unless it wraps: overflow='wrap')")
    ws = np.asarray(w_scale, dtype=F32).reshape(-1)
    ws = ws.reshape(()) if ws.size == 1 else ws
    if sch.name in ("ort", "onnx_reference"):
        mult = ort_multiplier(x_scale, ws, y_scale)
    elif sch.name == "exact":
        mult = exact_multiplier(np.asarray(x_scale, F32), ws, np.asarray(y_scale, F32))
    else:
        mult = tflite_multiplier(np.asarray(x_scale, F32), ws, np.asarray(y_scale, F32))
    out_dtype = np.asarray(y_zero_point).dtype
    info = np.iinfo(out_dtype)
    return requantize(acc, mult, int(np.asarray(y_zero_point).reshape(())), int(info.min), int(info.max),
                      scheme=sch, axis=None if axis < 0 or np.ndim(mult) == 0 else axis, dtype=out_dtype)


# ----------------------------------------------------------------------------------------- lowering
def lower(sim, requant="ort", float_fallback: bool = False) -> Program:
    """The integer program of a calibrated QuantSim (see the module docstring)."""
    return _Lowerer(sim, requant, float_fallback).run()


class _Lowerer:
    def __init__(self, sim, requant, float_fallback):
        self.sim = sim
        self.src: Graph = sim.graph
        self.scheme = as_scheme(requant)
        self.float_fallback = bool(float_fallback)
        self.nodes: list[Node] = []
        self.inits: dict[str, np.ndarray] = {}
        self.rep: dict[str, object] = {}
        self.used_names: set[str] = set(self.src.values) | set(self.src.initializers) | set(self.src.input_names)
        for n in self.src.walk():  # subgraph tensors too: a float If/Loop keeps its subgraphs' names
            self.used_names.update(o for o in n.outputs if o)
            for sub in n.subgraphs():
                self.used_names.update(sub.input_names)
                self.used_names.update(sub.initializers)
        self.lowered: list[Lowered] = []
        self.fallbacks: list[Lowered] = []
        self.bias_clipped: dict[str, str] = {}  # layer -> what bias_codes clipped
        self.consumed: set[int] = set()
        self.consumers = self.src.consumers()
        self.producers = self.src.producers()
        self.outputs = set(self.src.output_names)
        self.dq_cache: dict[str, str] = {}
        self.const_cache: dict[tuple, str] = {}
        self.needs_21 = False
        self.constants: set[str] = set()  # outputs of constant nodes
        self.needs_18 = False  # ReduceMax with an axes input (GlobalMaxPool on codes)
        self.custom = False
        self._sim_constants = None

    # -------------------------------------------------------------------------------- names and constants
    def fresh(self, base: str) -> str:
        base = base or "t"
        name, i = base, 1
        while name in self.used_names:
            name = f"{base}_{i}"
            i += 1
        self.used_names.add(name)
        return name

    def const(self, base: str, array, dtype=None) -> str:
        array = np.asarray(array, dtype=dtype)
        key = (base, array.dtype.str, array.shape, array.tobytes())
        if key in self.const_cache:
            return self.const_cache[key]
        name = self.fresh(base)
        self.inits[name] = array
        self.const_cache[key] = name
        return name

    def emit(self, op_type, inputs, outputs, attrs=None, name="", domain="", version=0) -> Node:
        """Add a node; version 0: the program's opset (set in finish), else a copied node's own version."""
        node = Node(op_type, list(inputs), list(outputs), dict(attrs or {}), self.fresh(name or op_type), domain,
                    version)
        self.nodes.append(node)
        return node

    # -------------------------------------------------------------------------------- encodings
    def active(self, name: str) -> Encoding | None:
        """The encoding of an enabled quantizer of ``name`` (None: no quantizer, disabled, or uncalibrated)."""
        q = self.sim.quantizers.get(name)
        if q is None or not q.enabled:
            return None
        return self.sim.encoding_of(name)

    def activation_grid(self, name: str, enc: Encoding, where: str) -> tuple[np.float32, int, np.dtype]:
        """(scale, zero point, codes dtype) of an activation encoding, unsigned as onnxruntime's U8 activations."""
        if enc.kind != "int":
            raise self.error(where, f"tensor {name!r} has an FP16 quantizer, which has no integer form")
        if enc.axis is not None or np.asarray(enc.scale).size != 1:
            raise self.error(where, f"tensor {name!r} has a per-channel/per-block activation encoding; the integer "
                                    "ops take one scale per activation tensor")
        if enc.bitwidth not in (8, 16):
            raise self.error(where, f"tensor {name!r} has a {enc.bitwidth}-bit activation grid; the integer program "
                                    "holds 8- and 16-bit activations (uint8/uint16)")
        self.check_scales(where, f"tensor {name!r}", enc.scale)
        scale, zp, type_name = enc.to_onnx(signed=False)
        if enc.bitwidth == 16:
            self.needs_21 = True
        return F32(np.asarray(scale).reshape(())), int(np.asarray(zp).reshape(())), np.dtype(type_name)

    def check_scales(self, where: str, what: str, scale) -> None:
        """Every scale must be a positive, finite, normal float32 (the integer ops store scales as float32):
        zero, negative, NaN, or a float64 value that underflows or overflows float32 is an error."""
        s64 = np.asarray(scale, dtype=np.float64).reshape(-1)
        with np.errstate(all="ignore"):
            s32 = s64.astype(F32)
        bad = ~(np.isfinite(s32) & (s32 >= np.finfo(F32).tiny))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            value = float(s64[i])
            why = ("NaN" if np.isnan(value) else "zero" if value == 0 else "negative" if value < 0
                   else f"too large for float32 (max {float(np.finfo(F32).max):.4g})" if not np.isfinite(s32[i])
                   else f"too small for float32 (below {float(np.finfo(F32).tiny):.4g})")
            channel = f" (channel {i})" if s64.size > 1 else ""
            raise self.error(where, f"{what} has scale {value!r}{channel}: {why}; a scale must be a positive, "
                                    "finite, normal float32 (fix or recompute the encoding)")

    def qtensor(self, codes_name: str, src_name: str, enc: Encoding, where: str) -> QTensor:
        scale, zp, dtype = self.activation_grid(src_name, enc, where)
        return QTensor(codes_name, scale, zp, dtype, enc)

    def sim_constant(self, name: str) -> np.ndarray:
        """The value the simulation computes with for an initializer (quantized if its quantizer is active)."""
        if self._sim_constants is None:
            self._sim_constants = self.sim._quantized_constants()
        if name in self._sim_constants:
            return self._sim_constants[name]
        return self.src.initializers[name]

    # -------------------------------------------------------------------------------- errors
    def error(self, where: str, why: str) -> LoweringError:
        hint = "" if self.float_fallback else "; pass float_fallback=True to run it in float"
        return LoweringError(f"IntSim: {where}: {why}{hint}", why)

    @staticmethod
    def where(node: Node) -> str:
        return f"node {node.name!r} ({node.op_type})"

    # -------------------------------------------------------------------------------- the walk
    def run(self) -> Program:
        for value in self.src.inputs:
            self.lower_input(value)
        for node in self.src.nodes:
            if id(node) in self.consumed:
                continue
            start = len(self.nodes)
            try:
                entry = self.lower_node(node)
            except LoweringError as exc:
                if not self.float_fallback:
                    raise
                del self.nodes[start:]
                entry = self.lower_float(node, exc.reason)
                self.fallbacks.append(entry)
            entry.program_nodes = [n.name for n in self.nodes[start:]]
            if node.name in self.bias_clipped and entry.mode != "float":
                entry.note = "; ".join(filter(None, [entry.note, "bias clipped to int32"]))
            self.lowered.append(entry)
        return self.finish()

    def lower_input(self, value: Value) -> None:
        name = value.name
        if value.dtype is None or np.dtype(value.dtype).kind != "f":
            self.rep[name] = OtherTensor(name)
            return
        enc = self.active(name)
        if enc is None:
            self.rep[name] = FloatTensor(name)
            return
        where = f"graph input {name!r}"
        try:
            scale, zp, dtype = self.activation_grid(name, enc, where)
        except LoweringError as exc:
            if not self.float_fallback:
                raise
            self.rep[name] = FloatTensor(name)  # its readers run in float
            self.fallbacks.append(Lowered(name, "input", [], "float", exc.reason))
            return
        codes = self.fresh(f"{name}_quantized")
        self.emit("QuantizeLinear", [name, self.const(f"{name}_scale", scale, F32),
                                     self.const(f"{name}_zero_point", zp, dtype)], [codes], name=f"{name}_quantize")
        self.rep[name] = QTensor(codes, scale, zp, dtype, enc)
        self.lowered.append(Lowered(name, "input", ["QuantizeLinear"], "integer"))

    def finish(self) -> Program:
        graph = Graph(name=f"{self.src.name}_int")
        graph.inputs = [Value(v.name, v.dtype, v.shape) for v in self.src.inputs]
        codes_of: dict[str, str] = {}
        outputs = []
        for value in self.src.outputs:
            name = value.name
            rep = self.rep.get(name)
            if isinstance(rep, QTensor):
                codes_of[name] = rep.name
                self.emit("DequantizeLinear", [rep.name, self.const(f"{name}_scale", rep.scale, F32),
                                               self.const(f"{name}_zero_point", rep.zero_point, rep.dtype)],
                          [name], name=f"{name}_dequantize")
                outputs.append(Value(name, np.dtype(np.float32), value.shape))
            else:
                if rep is None:
                    raise LoweringError(f"IntSim: graph output {name!r} is not produced by the integer program")
                if rep.name != name:
                    self.emit("Identity", [rep.name], [name], name=f"{name}_identity")
                outputs.append(Value(name, value.dtype, value.shape))
        graph.outputs = outputs
        graph.nodes = self.nodes
        used = {i for n in self.nodes for i in node_reads(n) if i}  # subgraphs read outer constants by name
        graph.initializers = {k: v for k, v in self.inits.items() if k in used}
        for name, array in graph.initializers.items():
            graph.values[name] = Value(name, array.dtype, tuple(array.shape))
        for v in graph.inputs + graph.outputs:
            graph.values[v.name] = v
        main = max(13, self.src.opset.get("", 13))
        if self.needs_21:
            main = max(main, 21)
        if self.needs_18:
            main = max(main, 18)
        opset = {"": main, MS: 1}
        if self.custom:
            opset[REFQUANT_DOMAIN] = 1
        for node in graph.nodes:
            # nodes copied from the simulated graph keep their version; new ones follow the program's opset (IR
            # nodes are in their newest input form, refquant.onnx_forms: export moves inputs back to attributes)
            if node.domain:
                node.version = node.version or opset.get(node.domain, 1)
            elif not node.version:
                form = FORMS.get(node.op_type)
                node.version = max(main, form.since if form else 0) if form and form.since > main else main
        graph.opset = opset
        tensors = {k: v for k, v in self.rep.items() if isinstance(v, QTensor)}
        return Program(graph, codes_of, tensors, self.lowered, self.fallbacks, str(self.scheme),
                       not self.custom, opset)

    # -------------------------------------------------------------------------------- dispatch
    def lower_node(self, node: Node) -> Lowered:
        where = self.where(node)
        if node.domain not in ("", "ai.onnx"):
            raise self.error(where, f"op domain {node.domain!r} has no integer lowering")
        if any(True for _ in node.subgraphs()):
            return self.lower_control_flow(node)
        float_ins = [n for n in node.present_inputs() if self.is_float(n)]
        float_outs = [n for n in node.outputs if n and self.is_float(n)]
        if not float_ins and not float_outs:
            return self.copy_node(node)
        if self.is_constant_node(node):  # constant arithmetic (ConstantOfShape weights...): as the simulation
            entry = self.lower_float(node, "constant computation", mode="copy")
            self.constants.update(o for o in node.outputs if o)
            return entry
        op = node.op_type
        if op in CODE_OPS or op == "GlobalMaxPool" or self.is_nearest_resize(node):
            return self.lower_code_op(node)
        if op in ("Shape", "Size"):
            return self.copy_node(node)
        if op == "Conv":
            return self.lower_conv(node)
        if op == "ConvTranspose":
            return self.lower_conv_transpose(node)
        if op == "Gemm":
            return self.lower_gemm(node)
        if op == "MatMul":
            return self.lower_matmul(node)
        if op in ("Add", "Mul") and self.binary_is_integer(node):
            return self.lower_binary(node)
        if op == "Concat":
            return self.lower_concat(node)
        if op in ("AveragePool", "GlobalAveragePool"):
            return self.lower_avgpool(node)
        if op == "Softmax":
            return self.lower_softmax(node)
        if op in TABLE_OPS:
            return self.lower_table_op(node)
        raise self.error(where, "the integer program has no form for this op")

    def lower_control_flow(self, node: Node) -> Lowered:
        """If/Loop: the integer program does not lower subgraphs. Without any float tensor (inputs, outer-scope
        reads, outputs) the node is copied (shape logic); otherwise it is an op without integer form, which
        ``float_fallback`` runs in float (:meth:`lower_float` maps its outer-scope reads to float values)."""
        involved = list(dict.fromkeys(node_reads(node))) + [o for o in node.outputs if o]
        if not any(self.is_float(name) for name in involved):
            return self.lower_float(node, "", record=False, mode="copy")
        raise self.error(self.where(node), f"{node.op_type} runs subgraphs, which the integer program has no form "
                                           "for (their float tensors cannot be lowered to integer ops)")

    def float_subgraphs(self, node: Node) -> dict:
        """``node``'s attributes with copies of its subgraphs whose outer-scope reads are renamed to the
        program's float values of those tensors: DequantizeLinear of codes, the simulation's (quantized)
        constants, or the float tensor that replaced them. Names are unique across scopes (ONNX), so renaming
        a name a subgraph reads but does not define touches nothing else."""
        inner = {name for sub in node.subgraphs() for name in sub.outer_references()}
        mapping = {}
        for name in inner:
            if name in self.src.initializers:
                mapping[name] = self.const(name, self.sim_constant(name))
            else:
                rep = self.rep.get(name)
                if isinstance(rep, QTensor):
                    mapping[name] = self.dequantized(name, rep)
                elif rep is not None:
                    mapping[name] = rep.name
        mapping = {k: v for k, v in mapping.items() if k != v}

        def renamed(graph: Graph) -> Graph:
            copy = graph.copy()
            for n in copy.walk():
                n.inputs = [mapping.get(i, i) for i in n.inputs]
            for g in [copy] + [sub for n in copy.walk() for sub in n.subgraphs()]:
                g.outputs = [Value(mapping[v.name], v.dtype, v.shape) if v.name in mapping else v for v in g.outputs]
            return copy

        return node.attrs_with_subgraphs(renamed)

    def not_initializer(self, role: str, name: str) -> str:
        if name in self.constants:
            return (f"{role} {name!r} is computed by constant nodes, so the simulation has no quantizer on it; fold "
                    "the constants into initializers before building the QuantSim")
        return f"{role} {name!r} is not a constant"

    def is_constant_node(self, node: Node) -> bool:
        """Every input is a constant (an initializer or a constant node's output), as the runtime folds it."""
        if node.op_type in _NEVER_FOLD or any(True for _ in node.subgraphs()):
            return False
        return all(n in self.src.initializers or n in self.constants for n in node.present_inputs())

    def is_nearest_resize(self, node: Node) -> bool:
        """A nearest-neighbour Resize / Upsample whose output is on its input's grid (tied, as AIMET ties them)
        copies codes."""
        if node.op_type not in ("Resize", "Upsample") or node.attrs.get("mode", "nearest") != "nearest":
            return False
        rep = self.rep.get(node.inputs[0])
        enc = self.active(node.outputs[0])
        if not isinstance(rep, QTensor) or enc is None:
            return False
        try:
            return self.qtensor("", node.outputs[0], enc, self.where(node)).same_grid(rep)
        except LoweringError:
            return False

    _RANK_KEEPING = {"Pad", "MaxPool", "Identity", "Dropout", "Slice", "Tile", "DepthToSpace", "SpaceToDepth",
                     "Transpose", "Conv", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"} | TABLE_OPS

    def rank_of(self, name: str) -> int | None:
        """A tensor's rank from shape inference, or through rank-keeping producers when it is unknown."""
        for _ in range(len(self.src.nodes) + 1):
            value = self.src.values.get(name)
            if value is not None and value.rank is not None:
                return value.rank
            producer = self.producers.get(name)
            if producer is None or producer.op_type not in self._RANK_KEEPING:
                return None
            name = producer.inputs[0]
        return None

    def is_float(self, name: str) -> bool:
        if name in self.src.initializers:
            return self.src.initializers[name].dtype.kind == "f"
        rep = self.rep.get(name)
        if rep is not None:
            return not isinstance(rep, OtherTensor)
        value = self.src.values.get(name)
        return value is not None and value.dtype is not None and np.dtype(value.dtype).kind == "f"

    # -------------------------------------------------------------------------------- helpers for operands
    def input_codes(self, node: Node, index: int) -> QTensor:
        """Input ``index`` of ``node`` as codes: an activation held as codes, or a constant with an active
        encoding (quantized here, as the simulation quantizes it)."""
        name = node.inputs[index]
        where = self.where(node)
        if name in self.src.initializers:
            enc = self.active(name)
            if enc is None:
                raise self.error(where, f"constant input {name!r} has no active quantizer")
            scale, zp, dtype = self.activation_grid(name, enc, where)
            value = np.asarray(self.sim_constant(name), dtype=np.float64)
            codes = np.rint(value / np.float64(scale)) + zp
            info = np.iinfo(dtype)
            codes = np.clip(codes, info.min, info.max).astype(dtype)
            return QTensor(self.const(f"{name}_quantized", codes), scale, zp, dtype, enc)
        rep = self.rep.get(name)
        if isinstance(rep, QTensor):
            return rep
        if isinstance(rep, FloatTensor):
            raise self.error(where, f"input {name!r} is not quantized (its quantizer is disabled or absent), "
                                    "and this op needs integer inputs")
        raise self.error(where, f"input {name!r} is not a float tensor")

    def params(self, base: str, q: QTensor) -> tuple[str, str]:
        return self.const(f"{base}_scale", q.scale, F32), self.const(f"{base}_zero_point", q.zero_point, q.dtype)

    def weight(self, node: Node, name: str):
        """(codes, scale f32 [C] or (), zero point [C] or () in the codes' dtype) of a weight."""
        where = self.where(node)
        enc = self.active(name)
        if enc is None:
            raise self.error(where, f"weight {name!r} has no active quantizer")
        if enc.kind != "int" or enc.block_size is not None:
            raise self.error(where, f"weight {name!r}: {'FP16' if enc.kind != 'int' else 'per-block'} weight "
                                    "encodings have no QLinear form")
        if enc.bitwidth > 8:
            raise self.error(where, f"weight {name!r} has a {enc.bitwidth}-bit grid; onnxruntime's integer ops "
                                    "take 8-bit weights")
        self.check_scales(where, f"weight {name!r}", enc.scale)
        value = np.asarray(self.sim_constant(name), dtype=np.float32)
        scale = np.asarray(enc.scale, dtype=F32)
        offset = np.asarray(enc.offset, dtype=np.float64)
        shape = [1] * value.ndim
        if scale.ndim:
            shape[enc.axis % value.ndim] = -1
        t = np.rint(value.astype(np.float64) / scale.astype(np.float64).reshape(shape))  # q + offset, exact
        if enc.signed_symmetric:
            codes = np.clip(t, -128, 127).astype(np.int8)
            zp = np.zeros(scale.shape, dtype=np.int8)
        else:
            codes = np.clip(t - offset.reshape(shape), 0, 255).astype(np.uint8)
            zp = (-offset).astype(np.uint8).reshape(scale.shape)
        return codes, scale, zp, enc

    def bias_codes(self, node: Node, name: str, x: QTensor, w_scale: np.ndarray, beta: float = 1.0) -> np.ndarray:
        """onnxruntime's quantize_bias_static_impl: round(f64(b) / f64(f32(x_scale * w_scale))), half to even,
        clipped to int32 as onnxruntime's quantizer does; a clipped channel is never silent: it is noted on the
        layer (``isim.summary()``, ``Program.bias_clipped``) and warned about (RuntimeWarning). A NaN bias is a
        LoweringError. A Gemm's beta scales the
        bias first (f32(beta * b)): onnxruntime's quantizer folds beta into the bias scale instead, which is right
        for its QDQ form (where it then sets beta to 1) only."""
        if name not in self.src.initializers:
            raise self.error(self.where(node), self.not_initializer("bias", name))
        bias = np.asarray(self.src.initializers[name], dtype=np.float32)
        if beta != 1.0:
            bias = (F32(beta) * bias).astype(F32)
        bias_scale = (np.asarray([x.scale], dtype=F32) * np.asarray(w_scale, dtype=F32).reshape(-1)).astype(F32)
        if bias.ndim == 0 or bias.size == 1:
            bias = np.broadcast_to(bias.reshape(-1), bias_scale.shape)
        where = self.where(node)
        if not np.all(bias_scale > 0):  # x_scale * w_scale underflowed float32 (each scale is checked already)
            i = int(np.flatnonzero(~(bias_scale > 0))[0])
            raise self.error(where, f"bias {name!r}: the bias scale f32(x_scale * w_scale) = f32({float(x.scale):.6g} "
                                    f"* {float(np.asarray(w_scale, F32).reshape(-1)[i]):.6g}) underflows to 0")
        with np.errstate(all="ignore"):
            codes = np.round(bias.astype(np.float64) / bias_scale.astype(np.float64))  # along the last axis
        if np.isnan(codes).any():
            i = int(np.flatnonzero(np.isnan(codes).reshape(-1))[0])
            raise self.error(where, f"bias {name!r} is NaN in channel {i}")
        over = (codes < INT32_MIN) | (codes > INT32_MAX)
        if over.any():
            i = int(np.flatnonzero(over.reshape(-1))[0])
            flat_bias, flat_scale = bias.reshape(-1), np.broadcast_to(bias_scale, bias.shape).reshape(-1)
            message = (f"bias {name!r} overflows int32 in {int(over.sum())} of {over.size} channels, clipped to "
                       f"[{INT32_MIN}, {INT32_MAX}] as onnxruntime's quantizer does; channel {i}: round(b / "
                       f"bias_scale) = round({float(flat_bias[i]):.6g} / {float(flat_scale[i]):.6g}) = "
                       f"{float(codes.reshape(-1)[i]):.6g} (bias_scale = x_scale * w_scale is too small for this "
                       "bias: widen the weight's or the input's encoding)")
            self.bias_clipped[node.name] = message
            warnings.warn(f"IntSim: {where}: {message}", RuntimeWarning, stacklevel=2)
        return np.clip(codes, INT32_MIN, INT32_MAX).astype(np.int32)

    # -------------------------------------------------------------------------------- output grid and fusion
    def output_grid(self, node: Node):
        """(final original tensor, encoding, clamp low code or None, clamp high or None, fused node) of an
        integer op's output: its own quantizer, or the Relu/Clip after it that a supergroup folds in."""
        out = node.outputs[0]
        where = self.where(node)
        enc = self.active(out)
        if enc is not None:
            return out, enc, None, None
        users = self.consumers.get(out, [])
        if out not in self.outputs and len(users) == 1 and users[0].op_type in _FUSABLE:
            act = users[0]
            bounds = self.activation_bounds(act)
            tail_enc = self.active(act.outputs[0])
            if bounds is not None and tail_enc is not None:
                return act.outputs[0], tail_enc, bounds, act
        return out, None, None, None

    def activation_bounds(self, act: Node):
        """Float (low, high) bounds of a Relu / Clip (None where unbounded), or None when a bound is not a
        constant."""
        if act.op_type == "Relu":
            return 0.0, None
        bounds = []
        for index in (1, 2):
            name = act.inputs[index] if len(act.inputs) > index else ""
            if not name:
                bounds.append(None)
            elif name in self.src.initializers:
                bounds.append(float(np.asarray(self.src.initializers[name]).reshape(())))
            else:
                return None
        return bounds[0], bounds[1]

    def finish_output(self, node: Node, final: str, enc: Encoding, clamp, fused: Node | None, codes_name: str,
                      q: QTensor) -> list[str]:
        """Apply the fused activation's clamp to the codes and record the result under ``final``."""
        ops = []
        result = q
        if clamp is not None:
            lo_code = self.quantize_value(clamp[0], q) if clamp[0] is not None else q.qrange[0]
            hi_code = self.quantize_value(clamp[1], q) if clamp[1] is not None else q.qrange[1]
            if lo_code > q.qrange[0] or hi_code < q.qrange[1]:
                clipped = self.fresh(f"{final}_codes")
                self.emit("Clip", [codes_name, self.const(f"{final}_clip_min", lo_code, q.dtype),
                                   self.const(f"{final}_clip_max", hi_code, q.dtype)], [clipped],
                          name=f"{fused.name}_clamp")
                result = QTensor(clipped, q.scale, q.zero_point, q.dtype, q.encoding)
                ops.append("Clip")
        self.rep[final] = result
        if fused is not None:
            self.consumed.add(id(fused))
        return ops

    @staticmethod
    def quantize_value(value: float, q: QTensor) -> int:
        """QuantizeLinear of one float: clamp(rint(f32(v) / scale) + zp)."""
        lo, hi = q.qrange
        with np.errstate(all="ignore"):
            t = np.rint(np.float64(F32(F32(value) / q.scale)))
        if np.isnan(t):
            return lo
        return int(np.clip(t + q.zero_point, lo, hi))

    def check_multiplier(self, where: str, x: QTensor, w_scale, y: QTensor) -> None:
        """The requantization multiplier ``x_scale * w_scale / y_scale`` must be representable in the scheme's
        arithmetic: ``ort`` / ``onnx_reference`` form it in float32, which must stay finite and normal (not
        overflow, not underflow to 0 or a subnormal); ``tflite_*`` form ``M0 * 2^(shift - 31)`` with
        tflite::QuantizeMultiplier, which flushes ``M < 2^-32`` to 0 (shift < -31) and cannot left-shift an
        int32 accumulator by more than 30 bits (shift > 30: double rounding would overflow, single rounding
        saturates). ``exact`` takes any positive multiplier (the scales are checked already)."""
        ws = np.asarray(w_scale, dtype=F32).reshape(-1)
        name = self.scheme.name
        if name == "exact":
            return
        with np.errstate(all="ignore"):
            if name in ("ort", "onnx_reference"):
                m = ort_multiplier(x.scale, ws, y.scale).reshape(-1)
                bad = ~(np.isfinite(m) & (m >= np.finfo(F32).tiny))
                limits = f"the float32 multiplier f32(f32(x_scale * w_scale) / y_scale) must be in " \
                         f"[{float(np.finfo(F32).tiny):.4g}, {float(np.finfo(F32).max):.4g}]"
            else:
                m = tflite_multiplier(x.scale, ws, y.scale).reshape(-1)
                _, shift = quantize_multiplier(m)
                tiny = m < 2.0 ** -32  # QuantizeMultiplier's shift < -31: flushed to zero
                bad = tiny | (np.asarray(shift) > 30)
                limits = ("tflite::QuantizeMultiplier needs 2^-32 <= M < 2^30 (smaller multipliers are flushed "
                          "to 0; a shift above 30 overflows the int32 left shift, or saturates with single "
                          "rounding)")
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            mult = float(tflite_multiplier(x.scale, ws[i if ws.size > 1 else 0], y.scale))
            channel = f" (output channel {i})" if ws.size > 1 else ""
            raise self.error(where, f"requantization multiplier x_scale * w_scale / y_scale = {float(x.scale):.6g} "
                                    f"* {float(ws[i if ws.size > 1 else 0]):.6g} / {float(y.scale):.6g} = "
                                    f"{mult:.6g}{channel} cannot be represented by requant={self.scheme}: {limits}")

    def add_bias(self, node: Node, acc: str, bias: np.ndarray, ops: list) -> str:
        """acc + bias in int64 (``Cast`` then ``Add``): an int32 Add would wrap around silently; the Requantize
        node checks that the sum fits int32, as the target's int32 accumulator must."""
        wide = self.fresh(f"{node.outputs[0]}_acc64")
        self.emit("Cast", [acc], [wide], {"to": 7}, name=f"{node.name}_widen")  # INT64
        summed = self.fresh(f"{node.outputs[0]}_acc_bias")
        self.emit("Add", [wide, self.const(f"{node.inputs[2]}_quantized", bias, np.int64)], [summed],
                  name=f"{node.name}_bias")
        ops += ["Cast", "Add"]
        return summed

    def requant_node(self, node: Node, acc: str, x: QTensor, w_scale_name: str, y: QTensor, out: str,
                     axis: int | None) -> None:
        self.custom = True
        self.emit("Requantize", [acc, self.const(f"{node.inputs[0]}_scale", x.scale, F32), w_scale_name,
                                 self.const(f"{out}_scale", y.scale, F32),
                                 self.const(f"{out}_zero_point", y.zero_point, y.dtype)], [out],
                  {"scheme": str(self.scheme), "axis": -1 if axis is None else axis},
                  name=f"{node.name}_requantize", domain=REFQUANT_DOMAIN)

    # -------------------------------------------------------------------------------- Conv
    def lower_conv(self, node: Node) -> Lowered:
        where = self.where(node)
        x = self.input_codes(node, 0)
        self.require_8bit_gemm(where, x, node.inputs[0])
        if node.inputs[1] not in self.src.initializers:
            raise self.error(where, self.not_initializer("weight", node.inputs[1]))
        w, ws, wz, _ = self.weight(node, node.inputs[1])
        attrs = {k: v for k, v in node.attrs.items()
                 if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}
        return self.emit_conv(node, x, w, ws, wz, attrs)

    def emit_conv(self, node: Node, x: QTensor, w: np.ndarray, ws: np.ndarray, wz: np.ndarray, attrs: dict,
                  ops: list[str] | None = None) -> Lowered:
        """QLinearConv (or ConvInteger + bias + Requantize) of codes ``x`` with weight codes ``w`` [M, C/g, *k]
        (scale ``ws`` and zero point ``wz`` per output channel or scalar), bias ``node.inputs[2]``."""
        where = self.where(node)
        final, enc, clamp, fused = self.output_grid(node)
        if enc is None:
            raise self.error(where, f"output {node.outputs[0]!r} has no active quantizer (and no fused Relu/Clip "
                                    "after it has one)")
        y = self.qtensor("", final, enc, where)
        self.require_8bit_gemm(where, y, final)
        self.check_multiplier(where, x, ws, y)
        base = node.inputs[1]
        w_name = self.const(f"{base}_quantized", w)
        ws_name = self.const(f"{base}_scale", ws, F32)
        wz_name = self.const(f"{base}_zero_point", wz)
        xs, xz = self.params(node.inputs[0], x)
        ys, yz = self.params(final, y)
        has_bias = len(node.inputs) > 2 and bool(node.inputs[2])
        codes = self.fresh(f"{final}_codes")
        ops = list(ops or [])
        if self.scheme.name == "ort":
            inputs = [x.name, xs, xz, w_name, ws_name, wz_name, ys, yz]
            if has_bias:
                inputs.append(self.const(f"{node.inputs[2]}_quantized",
                                         self.bias_codes(node, node.inputs[2], x, ws)))
            self.emit("QLinearConv", inputs, [codes], attrs, name=node.name)
            ops.append("QLinearConv")
        else:
            acc = self.fresh(f"{node.outputs[0]}_acc")
            self.emit("ConvInteger", [x.name, w_name, xz, wz_name], [acc], attrs, name=f"{node.name}_integer")
            ops.append("ConvInteger")
            if has_bias:
                bias = self.bias_codes(node, node.inputs[2], x, ws)
                acc = self.add_bias(node, acc, bias.reshape((-1,) + (1,) * (len(w.shape) - 2)), ops)
            self.requant_node(node, acc, x, ws_name, y, codes, 1)
            ops.append("Requantize")
        y.name = codes
        ops += self.finish_output(node, final, enc, clamp, fused, codes, y)
        return Lowered(node.name, node.op_type, ops, "integer",
                       f"fused {fused.op_type} {fused.name!r}" if fused is not None else "")

    # -------------------------------------------------------------------------------- ConvTranspose
    def lower_conv_transpose(self, node: Node) -> Lowered:
        """ConvTranspose as the integer convolution it equals: the input codes zero-stuffed (``s - 1`` codes
        equal to the zero point between neighbours, so they add nothing to ``sum (x - x_zp)(w - w_zp)``), then a
        stride-1 QLinearConv with the kernel flipped and its in/out axes swapped, padded by
        ``d (k - 1) - pad`` (+ output_padding at the end). Stuffing is ``Pad`` of the channel axis with the zero
        point code, ``DepthToSpace`` (DCR) and a ``Slice`` of the extra ``s - 1`` rows/columns: ops on codes,
        so the accumulator is exactly the transposed convolution's int32 sum and the requantization is
        QLinearConv's (onnxruntime has no integer ConvTranspose kernel; this form runs in it)."""
        where = self.where(node)
        x = self.input_codes(node, 0)
        self.require_8bit_gemm(where, x, node.inputs[0])
        wname = node.inputs[1]
        if wname not in self.src.initializers:
            raise self.error(where, self.not_initializer("weight", wname))
        if node.attrs.get("output_shape") or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            raise self.error(where, "output_shape / auto_pad are not lowered; give explicit pads")
        w, ws, wz, enc_w = self.weight(node, wname)
        spatial = w.ndim - 2
        group = int(node.attrs.get("group", 1))
        cin, cout_g = w.shape[0], w.shape[1]
        if np.size(ws) > 1 and enc_w.axis % w.ndim != 1:
            raise self.error(where, f"weight {wname!r} is per-channel along axis {enc_w.axis}; the requantization "
                                    "takes one scale per output channel (axis 1 of a ConvTranspose weight)")
        kernel = list(w.shape[2:])
        strides = list(node.attrs.get("strides") or [1] * spatial)
        dilations = list(node.attrs.get("dilations") or [1] * spatial)
        pads = list(node.attrs.get("pads") or [0] * (2 * spatial))
        out_pad = list(node.attrs.get("output_padding") or [0] * spatial)
        stride = strides[0]
        if any(s != stride for s in strides) or (stride > 1 and spatial != 2):
            raise self.error(where, f"strides {strides}: the zero-stuffing (DepthToSpace) takes one stride over two "
                                    "spatial axes")
        # weight [C_in, M/g, *k] -> conv weight [M, C_in/g, *k], kernel flipped
        wc = w.reshape((group, cin // group, cout_g) + tuple(kernel)).swapaxes(1, 2)
        wc = np.ascontiguousarray(np.flip(wc.reshape((group * cout_g, cin // group) + tuple(kernel)),
                                          axis=tuple(range(2, w.ndim))))
        if np.size(ws) > 1:
            ws, wz = np.tile(ws.reshape(-1), group), np.tile(wz.reshape(-1), group)
        ops = []
        stuffed = x
        if stride > 1:
            base = node.inputs[0]
            padded = self.fresh(f"{base}_stuff_pad")
            pad_code = self.const(f"{node.name}_pad_code", x.zero_point, x.dtype)
            self.emit("Pad", [x.name, self.const(f"{node.name}_stuff_pads",
                                                 np.array([0, 0, 0, 0, 0, cin * (stride * stride - 1), 0, 0],
                                                          np.int64)), pad_code],
                      [padded], {"mode": "constant"}, name=f"{node.name}_stuff_pad")
            spread = self.fresh(f"{base}_stuffed")
            self.emit("DepthToSpace", [padded], [spread], {"blocksize": stride, "mode": "DCR"},
                      name=f"{node.name}_stuff")
            stuffed = QTensor(spread, x.scale, x.zero_point, x.dtype, x.encoding)
            ops += ["Pad", "DepthToSpace"]
        begin = [dilations[i] * (kernel[i] - 1) - pads[i] for i in range(spatial)]
        end = [dilations[i] * (kernel[i] - 1) - pads[spatial + i] + out_pad[i] - (stride - 1) for i in range(spatial)]
        if min(begin + end) < 0:  # more padding than the kernel's reach: cut the stuffed input instead
            cut = self.fresh(f"{node.inputs[0]}_cut")
            big = np.iinfo(np.int64).max
            self.emit("Slice", [stuffed.name, self.const(f"{node.name}_cut_starts", [max(0, -b) for b in begin],
                                                         np.int64),
                                self.const(f"{node.name}_cut_ends", [e if e < 0 else big for e in end], np.int64),
                                self.const(f"{node.name}_cut_axes", list(range(2, 2 + spatial)), np.int64)],
                      [cut], name=f"{node.name}_cut")
            stuffed = QTensor(cut, x.scale, x.zero_point, x.dtype, x.encoding)
            ops.append("Slice")
        attrs = {"kernel_shape": kernel, "dilations": dilations, "group": group, "strides": [1] * spatial,
                 "pads": [max(0, b) for b in begin] + [max(0, e) for e in end]}
        entry = self.emit_conv(node, stuffed, wc, ws, wz, attrs, ops)
        entry.note = ("zero-stuffed input, flipped kernel" + (f"; {entry.note}" if entry.note else ""))
        return entry

    def require_8bit_gemm(self, where, q: QTensor, name: str) -> None:
        """Conv / Gemm / MatMul operands: 8-bit for onnxruntime's QLinear ops; other requant schemes run
        ConvInteger / MatMulInteger + Requantize in refquant, which take 16-bit activations too."""
        if self.scheme.name == "ort":
            self.require_8bit(where, q, name)

    def require_8bit(self, where, q: QTensor, name: str) -> None:
        if q.dtype.itemsize != 1:
            raise self.error(where, f"tensor {name!r} is {q.dtype}; onnxruntime's QLinear ops take 8-bit tensors")

    # -------------------------------------------------------------------------------- Gemm
    def lower_gemm(self, node: Node) -> Lowered:
        where = self.where(node)
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        if alpha != 1.0:
            raise self.error(where, f"alpha={alpha}: onnxruntime's bias quantization assumes alpha 1")
        a = self.input_codes(node, 0)
        self.require_8bit_gemm(where, a, node.inputs[0])
        b_name = node.inputs[1]
        if b_name in self.src.initializers and self.sim.quantizers.get(b_name) is not None \
                and self.sim.quantizers[b_name].kind == "param":
            b, bs, bz, _ = self.weight(node, b_name)
            b_codes = self.const(f"{b_name}_quantized", b)
            bs_name, bz_name = self.const(f"{b_name}_scale", bs, F32), self.const(f"{b_name}_zero_point", bz)
        else:
            bq = self.input_codes(node, 1)
            self.require_8bit_gemm(where, bq, b_name)
            b_codes = bq.name
            bs = np.asarray(bq.scale, F32)
            bs_name, bz_name = self.params(b_name, bq)
        has_bias = len(node.inputs) > 2 and bool(node.inputs[2])
        final, enc, clamp, fused = self.output_grid(node)
        as_, az = self.params(node.inputs[0], a)
        bias_name = None
        if has_bias:
            bias = self.bias_codes(node, node.inputs[2], a, bs, beta)
            bias_name = self.const(f"{node.inputs[2]}_quantized", bias)
        attrs = {"transA": trans_a, "transB": trans_b, "alpha": 1.0}
        if enc is None:
            if self.scheme.name != "ort":
                raise self.error(where, f"output {node.outputs[0]!r} has no active quantizer")
            # QGemm with a float output: acc * (a_scale * b_scale), as onnxruntime's QGemm without y_scale
            out = self.fresh(f"{node.outputs[0]}_float")
            inputs = [a.name, as_, az, b_codes, bs_name, bz_name] + ([bias_name] if bias_name else [])
            self.emit("QGemm", inputs, [out], attrs, name=node.name, domain=MS)
            self.rep[node.outputs[0]] = FloatTensor(out)
            return Lowered(node.name, node.op_type, ["QGemm"], "integer", "float output (no output quantizer)")
        y = self.qtensor("", final, enc, where)
        self.require_8bit_gemm(where, y, final)
        self.check_multiplier(where, a, bs, y)
        ys, yz = self.params(final, y)
        codes = self.fresh(f"{final}_codes")
        ops = []
        if self.scheme.name == "ort":
            self.emit("QGemm", [a.name, as_, az, b_codes, bs_name, bz_name, bias_name or "", ys, yz], [codes],
                      attrs, name=node.name, domain=MS)
            ops.append("QGemm")
        else:
            a_in, b_in = a.name, b_codes
            if trans_a:
                a_in = self.fresh(f"{node.inputs[0]}_t")
                self.emit("Transpose", [a.name], [a_in], {"perm": [1, 0]})
            if trans_b:
                b_in = self.fresh(f"{b_name}_t")
                self.emit("Transpose", [b_codes], [b_in], {"perm": [1, 0]})
            acc = self.fresh(f"{node.outputs[0]}_acc")
            self.emit("MatMulInteger", [a_in, b_in, az, bz_name], [acc], name=f"{node.name}_integer")
            ops.append("MatMulInteger")
            if bias_name:
                acc = self.add_bias(node, acc, bias, ops)
            self.requant_node(node, acc, a, bs_name, y, codes, None)
            ops.append("Requantize")
        y.name = codes
        ops += self.finish_output(node, final, enc, clamp, fused, codes, y)
        return Lowered(node.name, node.op_type, ops, "integer",
                       f"fused {fused.op_type} {fused.name!r}" if fused is not None else "")

    # -------------------------------------------------------------------------------- MatMul
    def lower_matmul(self, node: Node) -> Lowered:
        where = self.where(node)
        a = self.input_codes(node, 0)
        self.require_8bit_gemm(where, a, node.inputs[0])
        b_name = node.inputs[1]
        q = self.sim.quantizers.get(b_name)
        if b_name in self.src.initializers and q is not None and q.kind == "param":
            b, bs, bz, enc_b = self.weight(node, b_name)
            if np.size(bs) > 1 and (enc_b.axis % b.ndim) != b.ndim - 1:
                raise self.error(where, f"weight {b_name!r} is per-channel along axis {enc_b.axis}; QLinearMatMul "
                                        "takes per-column scales only")
            b_codes = self.const(f"{b_name}_quantized", b)
            bs_name, bz_name = self.const(f"{b_name}_scale", bs, F32), self.const(f"{b_name}_zero_point", bz)
        else:
            bq = self.input_codes(node, 1)
            self.require_8bit_gemm(where, bq, b_name)
            b_codes, bs = bq.name, np.asarray(bq.scale, F32)
            bs_name, bz_name = self.params(b_name, bq)
        final, enc, clamp, fused = self.output_grid(node)
        if enc is None:
            raise self.error(where, f"output {node.outputs[0]!r} has no active quantizer")
        y = self.qtensor("", final, enc, where)
        self.require_8bit_gemm(where, y, final)
        self.check_multiplier(where, a, bs, y)
        as_, az = self.params(node.inputs[0], a)
        ys, yz = self.params(final, y)
        codes = self.fresh(f"{final}_codes")
        ops = []
        if self.scheme.name == "ort":
            self.emit("QLinearMatMul", [a.name, as_, az, b_codes, bs_name, bz_name, ys, yz], [codes],
                      name=node.name)
            ops.append("QLinearMatMul")
        else:
            acc = self.fresh(f"{node.outputs[0]}_acc")
            self.emit("MatMulInteger", [a.name, b_codes, az, bz_name], [acc], name=f"{node.name}_integer")
            self.requant_node(node, acc, a, bs_name, y, codes, None)
            ops += ["MatMulInteger", "Requantize"]
        y.name = codes
        ops += self.finish_output(node, final, enc, clamp, fused, codes, y)
        return Lowered(node.name, node.op_type, ops, "integer",
                       f"fused {fused.op_type} {fused.name!r}" if fused is not None else "")

    # -------------------------------------------------------------------------------- Add / Mul
    def binary_is_integer(self, node: Node) -> bool:
        """Add/Mul go to QLinearAdd/QLinearMul unless one operand is a constant without a quantizer (then the
        simulation adds a float constant: a lookup table reproduces it)."""
        for name in node.inputs:
            if name in self.src.initializers and self.active(name) is None:
                return False
        return True

    def lower_binary(self, node: Node) -> Lowered:
        where = self.where(node)
        a = self.input_codes(node, 0)
        b = self.input_codes(node, 1)
        for q, name in ((a, node.inputs[0]), (b, node.inputs[1])):
            self.require_8bit(where, q, name)
        if a.dtype != b.dtype:
            raise self.error(where, f"operands are {a.dtype} and {b.dtype}; QLinear{node.op_type} needs one type")
        final, enc, clamp, fused = self.output_grid(node)
        if enc is None:
            raise self.error(where, f"output {node.outputs[0]!r} has no active quantizer")
        y = self.qtensor("", final, enc, where)
        if y.dtype != a.dtype:
            raise self.error(where, f"output is {y.dtype} but the operands are {a.dtype}")
        # onnxruntime's float32 ratios (sa / sc, sb / sc; Mul: f32(sa * sb) / sc) must be finite and normal
        with np.errstate(all="ignore"):
            ratios = [F32(a.scale / y.scale), F32(b.scale / y.scale)] if node.op_type == "Add" else \
                [F32(F32(a.scale * b.scale) / y.scale)]
        if not all(np.isfinite(r) and r >= np.finfo(F32).tiny for r in ratios):
            raise self.error(where, f"scales {float(a.scale):.6g}, {float(b.scale):.6g} -> {float(y.scale):.6g}: "
                                    f"the float32 ratio{'s' if len(ratios) > 1 else ''} "
                                    f"{', '.join(f'{float(r):.6g}' for r in ratios)} of QLinear{node.op_type} "
                                    "overflow or underflow float32")
        codes = self.fresh(f"{final}_codes")
        as_, az = self.params(node.inputs[0], a)
        bs, bz = self.params(node.inputs[1], b)
        ys, yz = self.params(final, y)
        op = "QLinearAdd" if node.op_type == "Add" else "QLinearMul"
        self.emit(op, [a.name, as_, az, b.name, bs, bz, ys, yz], [codes], name=node.name, domain=MS)
        y.name = codes
        ops = [op] + self.finish_output(node, final, enc, clamp, fused, codes, y)
        return Lowered(node.name, node.op_type, ops, "integer",
                       f"fused {fused.op_type} {fused.name!r}" if fused is not None else "")

    # -------------------------------------------------------------------------------- Concat
    def lower_concat(self, node: Node) -> Lowered:
        where = self.where(node)
        parts = [self.input_codes(node, i) for i in range(len(node.inputs)) if node.inputs[i]]
        enc = self.active(node.outputs[0])
        if enc is None:
            raise self.error(where, f"output {node.outputs[0]!r} has no active quantizer")
        y = self.qtensor("", node.outputs[0], enc, where)
        if any(p.dtype != y.dtype for p in parts):
            raise self.error(where, "inputs and output must share one integer type")
        codes = self.fresh(f"{node.outputs[0]}_codes")
        if all(p.same_grid(y) for p in parts):
            self.emit("Concat", [p.name for p in parts], [codes], {"axis": node.attrs["axis"]}, name=node.name)
            op = "Concat"
        else:
            self.require_8bit(where, y, node.outputs[0])
            inputs = list(self.params(node.outputs[0], y))
            for p, name in zip(parts, [n for n in node.inputs if n]):
                inputs += [p.name, *self.params(name, p)]
            self.emit("QLinearConcat", inputs, [codes], {"axis": node.attrs["axis"]}, name=node.name, domain=MS)
            op = "QLinearConcat"
        y.name = codes
        self.rep[node.outputs[0]] = y
        return Lowered(node.name, node.op_type, [op], "integer")

    # -------------------------------------------------------------------------------- pooling
    def lower_avgpool(self, node: Node) -> Lowered:
        where = self.where(node)
        x = self.input_codes(node, 0)
        self.require_8bit(where, x, node.inputs[0])
        enc = self.active(node.outputs[0])
        if enc is None:
            raise self.error(where, f"output {node.outputs[0]!r} has no active quantizer")
        y = self.qtensor("", node.outputs[0], enc, where)
        if y.dtype != x.dtype:
            raise self.error(where, f"input is {x.dtype} and output {y.dtype}: the QLinear pools keep the type")
        codes = self.fresh(f"{node.outputs[0]}_codes")
        xs, xz = self.params(node.inputs[0], x)
        ys, yz = self.params(node.outputs[0], y)
        value = self.src.values.get(node.inputs[0])
        shape = value.shape if value is not None else None
        known = bool(shape) and all(isinstance(d, int) and d > 0 for d in shape[2:])
        # an AveragePool whose kernel covers the unpadded image runs onnxruntime's integer global average too
        covers = node.op_type == "GlobalAveragePool" or (
            known and list(node.attrs.get("kernel_shape") or []) == list(shape[2:])
            and not any(node.attrs.get("pads") or []) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))
        if covers and known:
            n = int(np.prod(shape[2:]))  # MLAS's integer global average needs 2^-32 <= x_scale / (y_scale N) < 256
            with np.errstate(all="ignore"):
                m = F32(x.scale / F32(y.scale * F32(n)))
            if not F32(2.0 ** -32) <= m < F32(256.0):
                raise self.error(where, f"the multiplier f32(x_scale / f32(y_scale * N)) = f32({float(x.scale):.6g} / "
                                        f"({float(y.scale):.6g} * {n})) = {float(m):.6g} is outside onnxruntime's "
                                        "range [2^-32, 256)")
        if node.op_type == "GlobalAveragePool":
            self.emit("QLinearGlobalAveragePool", [x.name, xs, xz, ys, yz], [codes], {"channels_last": 0},
                      name=node.name, domain=MS)
            op = "QLinearGlobalAveragePool"
        else:
            if any(d != 1 for d in node.attrs.get("dilations") or []):
                raise self.error(where, "QLinearAveragePool has no dilations")
            attrs = {k: v for k, v in node.attrs.items()
                     if k in ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")}
            self.emit("QLinearAveragePool", [x.name, xs, xz, ys, yz], [codes], attrs, name=node.name, domain=MS)
            op = "QLinearAveragePool"
        y.name = codes
        self.rep[node.outputs[0]] = y
        return Lowered(node.name, node.op_type, [op], "integer")

    def lower_softmax(self, node: Node) -> Lowered:
        where = self.where(node)
        x = self.input_codes(node, 0)
        enc = self.active(node.outputs[0])
        if enc is None:
            raise self.error(where, f"output {node.outputs[0]!r} has no active quantizer")
        y = self.qtensor("", node.outputs[0], enc, where)
        if x.dtype != y.dtype or x.dtype not in (np.uint8, np.int8):
            raise self.error(where, f"input {x.dtype} and output {y.dtype}: onnxruntime's QLinearSoftmax takes uint8 "
                                    "or int8, the same type in and out")
        if np.floor(F32(1) / y.scale) < 1:  # onnxruntime scales the probabilities by floor(1 / y_scale)
            raise self.error(where, f"output scale {float(y.scale):.6g} > 1: QLinearSoftmax multiplies by "
                                    "floor(1 / y_scale) = 0, so every output would be the zero point")
        opset = 13 if node.version >= 13 else max(node.version, 1)
        attrs = {"opset": opset, "axis": int(node.attrs.get("axis", -1 if opset >= 13 else 1))}
        codes = self.fresh(f"{node.outputs[0]}_codes")
        self.emit("QLinearSoftmax", [x.name, *self.params(node.inputs[0], x), *self.params(node.outputs[0], y)],
                  [codes], attrs, name=node.name, domain=MS)
        y.name = codes
        self.rep[node.outputs[0]] = y
        return Lowered(node.name, node.op_type, ["QLinearSoftmax"], "integer")

    # -------------------------------------------------------------------------------- ops on codes
    def lower_code_op(self, node: Node) -> Lowered:
        where = self.where(node)
        data = node.inputs[0]
        rep = self.rep.get(data)
        if data in self.src.initializers:
            return self.lower_float(node, "", record=False)
        if isinstance(rep, FloatTensor):
            return self.lower_float(node, "", record=False, mode="copy")
        if not isinstance(rep, QTensor):
            return self.copy_node(node)
        if rep.dtype.itemsize == 2 and self.scheme.name == "ort" and node.op_type not in ORT_16BIT_CODE_OPS:
            raise self.error(where, f"input {data!r} is {rep.dtype}; onnxruntime has no 16-bit {node.op_type} kernel")
        inputs = [rep.name] + [self.other_input(n) for n in node.inputs[1:]]
        attrs = dict(node.attrs)
        op = node.op_type
        if op == "Pad":
            if len(node.inputs) > 2 and node.inputs[2]:
                value = float(np.asarray(self.sim_constant(node.inputs[2])).reshape(()))
            else:
                value = 0.0
            inputs = inputs[:2] + [self.const(f"{node.name}_pad_code", self.quantize_value(value, rep), rep.dtype)] \
                + inputs[3:]
        elif op == "Dropout":
            op, inputs, attrs = "Identity", inputs[:1], {}
        elif op == "GlobalMaxPool":
            rank = self.rank_of(data)
            if rank is None:
                raise self.error(where, "GlobalMaxPool needs the input's rank")
            op, attrs = "ReduceMax", {"keepdims": 1}
            self.needs_18 = True
            inputs = [rep.name, self.const(f"{node.name}_axes", np.arange(2, rank, dtype=np.int64))]
        outs = []
        for i, out in enumerate(node.outputs[:1] if node.op_type == "Dropout" else node.outputs):
            value = self.src.values.get(out)
            known = value is not None and value.dtype is not None
            if not out:
                outs.append("")
            elif self.is_float(out) or (not known and (i == 0 or op == "Split")):
                codes = self.fresh(f"{out}_codes")
                self.rep[out] = QTensor(codes, rep.scale, rep.zero_point, rep.dtype, rep.encoding)
                outs.append(codes)
            else:
                self.rep[out] = OtherTensor(out)  # MaxPool / TopK indices keep their meaning on codes
                outs.append(out)
        self.emit(op, inputs, outs, attrs, name=node.name, version=node.version if op == node.op_type else 0)
        return Lowered(node.name, node.op_type, [op], "codes")

    def other_input(self, name: str) -> str:
        """A non-data input (shape, axes, indices) copied into the program."""
        if not name:
            return ""
        if name in self.src.initializers:
            return self.const(name, self.src.initializers[name])
        rep = self.rep.get(name)
        if isinstance(rep, (OtherTensor, FloatTensor)):
            return rep.name
        if isinstance(rep, QTensor):
            return rep.name
        return name

    def copy_node(self, node: Node) -> Lowered:
        """A node without float tensors (shape arithmetic): copied; Shape/Size of a codes tensor read the codes."""
        inputs = [self.other_input(n) for n in node.inputs]
        for out in node.outputs:
            if out:
                self.rep[out] = OtherTensor(out)
        self.emit(node.op_type, inputs, node.outputs, node.attrs, name=node.name, domain=node.domain,
                  version=node.version)
        return Lowered(node.name, node.op_type, [node.op_type], "copy")

    # -------------------------------------------------------------------------------- element-wise by table
    def lower_table_op(self, node: Node) -> Lowered:
        where = self.where(node)
        active_inputs = [i for i, n in enumerate(node.inputs) if n and n not in self.src.initializers]
        if len(active_inputs) != 1:
            raise self.error(where, "an element-wise op of two run-time tensors has no integer form here")
        index = active_inputs[0]
        x = self.input_codes(node, index)
        out = node.outputs[0]
        enc = self.active(out)
        op = node.op_type
        bounds = self.activation_bounds(node) if op in ("Relu", "Clip") else None
        if bounds is not None and enc is not None:
            # same grid in and out: clip(c, Q(lo), Q(hi)) = Q(clip(DQ(c), lo, hi)) exactly (Q monotone, Q(DQ(c)) = c)
            y = self.qtensor("", out, enc, where)
            lo, hi = bounds
            # onnxruntime has no 16-bit Clip: under "ort" a 16-bit clamp is the lookup table below
            clip_on_codes = x.dtype.itemsize == 1 or self.scheme.name != "ort"
            if y.same_grid(x):
                lo_code = self.quantize_value(lo, x) if lo is not None else x.qrange[0]
                hi_code = self.quantize_value(hi, x) if hi is not None else x.qrange[1]
                if lo_code <= x.qrange[0] and hi_code >= x.qrange[1]:
                    self.rep[out] = x
                    return Lowered(node.name, op, [], "codes", "no-op on codes")
            if y.same_grid(x) and clip_on_codes:
                codes = self.fresh(f"{out}_codes")
                self.emit("Clip", [x.name, self.const(f"{out}_clip_min", lo_code, x.dtype),
                                   self.const(f"{out}_clip_max", hi_code, x.dtype)], [codes], name=node.name)
                self.rep[out] = QTensor(codes, y.scale, y.zero_point, y.dtype, enc)
                return Lowered(node.name, op, ["Clip"], "codes")
        if op in ("Sigmoid", "LeakyRelu") and enc is not None and x.dtype.itemsize == 1:
            y = self.qtensor("", out, enc, where)
            if y.dtype == x.dtype:
                codes = self.fresh(f"{out}_codes")
                xs, xz = self.params(node.inputs[0], x)
                ys, yz = self.params(out, y)
                attrs = {"alpha": float(node.attrs.get("alpha", 0.01))} if op == "LeakyRelu" else {}
                self.emit(f"QLinear{op}", [x.name, xs, xz, ys, yz], [codes], attrs, name=node.name, domain=MS)
                y.name = codes
                self.rep[out] = y
                return Lowered(node.name, op, [f"QLinear{op}"], "integer")
        return self.lower_lookup(node, index, x, enc)

    def lower_lookup(self, node: Node, index: int, x: QTensor, enc: Encoding | None) -> Lowered:
        """Output = table[param position, code]: the simulation's own op on every code of the input grid."""
        where = self.where(node)
        out = node.outputs[0]
        rank = self.rank_of(node.inputs[index])
        if rank is None:
            raise self.error(where, f"input {node.inputs[index]!r} has an unknown rank")
        consts = {}
        param_shape = ()
        per_channel = node.op_type == "BatchNormalization"  # [C] constants of the channel axis, not broadcast
        if per_channel and (index != 0 or int(node.attrs.get("training_mode", 0)) or rank < 2):
            raise self.error(where, "only an inference-mode BatchNormalization of a [N, C, ...] tensor is a table")
        for i, name in enumerate(node.inputs):
            if i == index or not name:
                continue
            array = np.asarray(self.sim_constant(name))
            if array.ndim > rank:
                raise self.error(where, f"constant {name!r} has a higher rank than the data")
            consts[i] = array
            shape = ((1, array.size) + (1,) * (rank - 2)) if per_channel else (1,) * (rank - array.ndim) + array.shape
            param_shape = np.broadcast_shapes(param_shape, shape)
        param_shape = tuple(param_shape)
        if param_shape and param_shape[0] != 1:
            raise self.error(where, "a constant varies along the batch axis")
        inner = tuple(param_shape[1:]) if param_shape else ()
        if rank >= 1:
            inner = (1,) * (rank - 1 - len(inner)) + inner
        n_codes = 1 << (8 * x.dtype.itemsize)
        n_params = int(np.prod(inner)) if inner else 1
        if n_codes * n_params > TABLE_LIMIT:
            raise self.error(where, f"a lookup table of {n_codes} x {n_params} entries is too large")
        codes = np.arange(n_codes, dtype=np.int64).astype(x.dtype)
        dq = (F32(1) * (codes.astype(np.int64) - x.zero_point).astype(F32) * x.scale).astype(F32)
        xin = np.broadcast_to(dq.reshape((n_codes,) + (1,) * max(rank - 1, 0)), (n_codes,) + inner) if rank else dq
        xin = np.ascontiguousarray(xin, dtype=np.float32)
        args = [None] * len(node.inputs)
        args[index] = xin
        for i, array in consts.items():
            args[i] = array
        opdef = lookup(node.op_type, node.domain, node.version)
        kwargs = dict(node.attrs)
        if "noutputs" in opdef.special:
            kwargs["noutputs"] = 1
        with np.errstate(all="ignore"):
            result = opdef.kernel(*args, **kwargs)
        result = np.asarray(result[0] if isinstance(result, tuple) else result)
        if result.shape != xin.shape:
            raise self.error(where, f"the op changes the shape {xin.shape} -> {result.shape}; no table form")
        if enc is not None:
            y = self.qtensor("", out, enc, where)
            snapped = quantize_dequantize(result.astype(np.float32), enc, self.sim.rounding)
            table = np.rint(snapped.astype(np.float64) / np.float64(y.scale)) + y.zero_point
            info = np.iinfo(y.dtype)
            table = np.clip(table, info.min, info.max).astype(y.dtype)
        else:
            y = None
            table = result.astype(np.float32)
        table = np.moveaxis(table.reshape((n_codes, n_params)), 0, -1).reshape(-1)
        index32 = self.fresh(f"{node.inputs[index]}_index")
        self.emit("Cast", [x.name], [index32], {"to": 6}, name=f"{node.name}_index")  # INT32
        ops = ["Cast"]
        if n_params > 1:
            offsets = (np.arange(n_params, dtype=np.int32) * n_codes).reshape(inner)
            shifted = self.fresh(f"{node.inputs[index]}_row")
            self.emit("Add", [index32, self.const(f"{node.name}_rows", offsets)], [shifted], name=f"{node.name}_row")
            index32 = shifted
            ops.append("Add")
        result_name = self.fresh(f"{out}_codes" if y is not None else f"{out}_float")
        self.emit("Gather", [self.const(f"{node.name}_table", table), index32], [result_name], {"axis": 0},
                  name=node.name)
        ops.append("Gather")
        if y is not None:
            y.name = result_name
            self.rep[out] = y
        else:
            self.rep[out] = FloatTensor(result_name)
        return Lowered(node.name, node.op_type, ops, "table", f"{n_params} x {n_codes} table")

    # -------------------------------------------------------------------------------- float fallback
    def dequantized(self, name: str, q: QTensor) -> str:
        if name not in self.dq_cache:
            out = self.fresh(f"{name}_dequantized")
            self.emit("DequantizeLinear", [q.name, *self.params(name, q)], [out], name=f"{name}_dequantize")
            self.dq_cache[name] = out
        return self.dq_cache[name]

    def dequantized_weight(self, node: Node, name: str) -> str | None:
        """A quantized weight of a float node as DequantizeLinear of its codes (None where it is not one): the
        same float values as the simulation's constant, but in a form onnxruntime's optimizer leaves alone (at
        its default level it quantizes the float weight of a Conv fed by DequantizeLinear once more, per tensor)."""
        q = self.sim.quantizers.get(name)
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or q is None or q.kind != "param":
            return None
        try:
            codes, scale, zp, enc = self.weight(node, name)
        except LoweringError:
            return None
        axis = enc.axis % codes.ndim if scale.ndim else None
        shape = [1] * codes.ndim
        if axis is not None:
            shape[axis] = -1
        values = ((codes.astype(np.int32) - zp.astype(np.int32).reshape(shape)).astype(F32)
                  * scale.reshape(shape)).astype(F32)
        if not np.array_equal(values, np.asarray(self.sim_constant(name), dtype=F32)):
            return None
        out = self.fresh(f"{name}_dequantized")
        self.emit("DequantizeLinear", [self.const(f"{name}_quantized", codes), self.const(f"{name}_scale", scale, F32),
                                       self.const(f"{name}_zero_point", zp)], [out],
                  {"axis": axis} if axis is not None else {}, name=f"{name}_dequantize")
        return out

    def lower_float(self, node: Node, reason: str, record: bool = True, mode: str = "float") -> Lowered:
        """Run ``node`` in float: DequantizeLinear of its coded inputs, the simulation's quantized constants,
        QuantizeLinear of each output that has an active quantizer."""
        inputs = []
        for name in node.inputs:
            if not name:
                inputs.append("")
            elif name in self.src.initializers:
                inputs.append(self.dequantized_weight(node, name) or self.const(name, self.sim_constant(name)))
            else:
                rep = self.rep.get(name)
                if isinstance(rep, QTensor):
                    inputs.append(self.dequantized(name, rep))
                elif rep is None:
                    inputs.append(name)
                else:
                    inputs.append(rep.name)
        outs = []
        quantize = []
        # a grid-preserving op (MaxPool on 16-bit codes under "ort") keeps its input's grid: quantizing its float
        # output with that grid gives back exactly the codes the op would have moved
        data = self.rep.get(node.inputs[0]) if node.inputs and (node.op_type in CODE_OPS
                                                                 or node.op_type == "GlobalMaxPool") else None
        for out in node.outputs:
            if not out:
                outs.append("")
                continue
            if not self.is_float(out):
                self.rep[out] = OtherTensor(out)
                outs.append(out)
                continue
            enc = self.active(out)
            fl = self.fresh(f"{out}_float")
            outs.append(fl)
            if enc is not None:
                quantize.append((out, fl, enc))
            elif isinstance(data, QTensor):
                quantize.append((out, fl, data))
            else:
                self.rep[out] = FloatTensor(fl)
        attrs = self.float_subgraphs(node) if any(True for _ in node.subgraphs()) else node.attrs
        self.emit(node.op_type, inputs, outs, attrs, name=node.name, domain=node.domain, version=node.version)
        ops = [node.op_type]
        for out, fl, enc in quantize:
            try:
                if isinstance(enc, QTensor):
                    y = QTensor("", enc.scale, enc.zero_point, enc.dtype, enc.encoding)
                else:
                    y = self.qtensor("", out, enc, self.where(node))
            except LoweringError:
                self.rep[out] = FloatTensor(fl)
                continue
            codes = self.fresh(f"{out}_codes")
            self.emit("QuantizeLinear", [fl, *self.params(out, y)], [codes], name=f"{out}_quantize")
            y.name = codes
            self.rep[out] = y
            ops.append("QuantizeLinear")
        return Lowered(node.name, node.op_type, ops, mode, reason)
