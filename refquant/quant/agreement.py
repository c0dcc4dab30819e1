"""Layer-by-layer agreement of a QuantSim with onnxruntime running its exported QDQ model.

Deep QDQ networks are chaotic under one-ULP float differences (docs/quantsim.md), so whole-model
identity with another runtime is not a meaningful test. Teacher forcing is: every op of our simulation
is fed onnxruntime's own inputs, through the runtime's replace hook, and then

* each quantizer, given onnxruntime's float input, must produce onnxruntime's codes exactly;
* each float op's output must agree with onnxruntime's within the float32 accumulation bound
  ``|ours - ort| <= FLOAT_BOUND * max|ort|`` over the tensor;
* where our own (unforced) float value quantizes to a different code, the value must lie within that
  bound of a rounding boundary (``(k + 1/2) * scale``): such flips are counted, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from ..runtime import Session
from .export import qdq_names

# float32 sums of K terms in any order differ by at most K * 2^-24 * sum|terms| (Higham, Accuracy and
# Stability, Thm 3.1); for the reductions in these models (K <= 4608) and sum|terms| within a few times
# max|output| this stays below 1e-4 of the tensor's largest magnitude.
FLOAT_BOUND = 1e-4


@dataclass
class AgreementReport:
    tensors_compared: int = 0
    quantizers_compared: int = 0
    forced_code_mismatches: dict = field(default_factory=dict)  # tensor -> count (must be empty)
    float_outside_bound: dict = field(default_factory=dict)  # tensor -> max relative difference
    unforced_flips: dict = field(default_factory=dict)  # tensor -> (flips, elements)
    unexplained_flips: dict = field(default_factory=dict)  # tensor -> count (must be empty)
    weight_mismatches: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.forced_code_mismatches or self.float_outside_bound or self.unexplained_flips
                    or self.weight_mismatches)


def onnxruntime_all_tensors(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """Every float tensor of ``model`` as onnxruntime computes it, optimizations off."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {vi.name for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    existing = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in existing and name in floats:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                existing.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def teacher_forced_agreement(sim, qdq_model: onnx.ModelProto, feeds: dict) -> AgreementReport:
    """Compare ``sim`` with onnxruntime on ``qdq_model`` (its export) op by op, as described above."""
    theirs = onnxruntime_all_tensors(qdq_model, feeds)
    report = AgreementReport()
    quantized = {n for n, q in sim.quantizers.items() if q.kind == "activation" and q.enabled
                 and sim.encoding_of(n) is not None}
    from .qdq import quantize_dequantize

    def force(name, array, node):
        if node is None:
            return None  # graph inputs are onnxruntime's inputs already
        source = qdq_names(sim, name)[0] if name in quantized else name
        reference = theirs.get(source)
        if reference is None or array.dtype.kind != "f":
            return None
        report.tensors_compared += 1
        scale = float(np.max(np.abs(reference))) or 1.0
        diff = float(np.max(np.abs(array.astype(np.float64) - reference))) / scale if array.size else 0.0
        if diff > FLOAT_BOUND:
            report.float_outside_bound[name] = diff
        if name in quantized:
            _count_flips(sim, name, array, reference, theirs[qdq_names(sim, name)[1]], FLOAT_BOUND * scale, report)
        return reference

    def check_codes(name, array, node):
        if name not in quantized:
            return None
        report.quantizers_compared += 1
        expected = theirs[qdq_names(sim, name)[1]]
        mismatches = int(np.count_nonzero(array != expected))
        if mismatches:
            report.forced_code_mismatches[name] = mismatches
        return None

    for name, q in sim.quantizers.items():
        if q.kind in ("param", "constant") and q.enabled and sim.encoding_of(name) is not None \
                and q.role != "bias":
            ours = q.fixed_value if q.fixed_value is not None else quantize_dequantize(
                np.asarray(sim.graph.initializers[name], np.float32), sim.encoding_of(name), sim.rounding)
            dq = theirs.get(qdq_names(sim, name)[1])
            if dq is not None and not np.array_equal(ours, dq):
                report.weight_mismatches.append(name)
    session = Session(sim.graph, threads=sim.session.threads, hooks=[force, sim._qdq_hook, check_codes])
    session.set_constants(sim._quantized_constants())
    session.run(feeds)
    return report


def _count_flips(sim, name, ours_float, their_float, their_qdq, bound, report) -> None:
    """Codes our own float value gets that differ from onnxruntime's; each must sit within ``bound`` of
    a rounding boundary to be explained by float summation order."""
    from .qdq import quantize_dequantize

    encoding = sim.encoding_of(name)
    ours_qdq = quantize_dequantize(ours_float, encoding, sim.rounding)
    flipped = ours_qdq != their_qdq
    count = int(np.count_nonzero(flipped))
    if not count:
        return
    report.unforced_flips[name] = (count, int(ours_float.size))
    scale = float(np.max(encoding.scale))
    position = their_float[flipped].astype(np.float64) / scale
    distance = np.abs(position - np.floor(position) - 0.5) * scale
    unexplained = int(np.count_nonzero(distance > bound))
    if unexplained:
        report.unexplained_flips[name] = unexplained
