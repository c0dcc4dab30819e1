"""The ONNX backend node test cases shipped in the `onnx` package, for every op refquant claims.

Each case is a one-node (or function-expanded) model with inputs and expected outputs written by
ONNX's own reference code. Tolerances are ONNX's runner's: rtol 1e-3, atol 1e-6 (case values if
larger). Dtype and shape must match exactly. Cases whose tensors have a type refquant does not
compute with must raise UnsupportedTypeError; training-mode Dropout with a random mask is left out
(its expected output depends on a random generator).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import refquant
from refquant.errors import UnsupportedTypeError

CLAIMED = set("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape
Conv ConvTranspose Cos CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater
GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity If InstanceNormalization LRN LSTM
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean Min Mish Mul Neg Not
Or PRelu Pad Pow QuantizeLinear Range Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize Round Selu Shape Sigmoid Sign Sin Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Unsqueeze Upsample Where
ConvInteger DynamicQuantizeLinear MatMulInteger QLinearConv QLinearMatMul
""".split())

RANDOM_DROPOUT = {"test_training_dropout", "test_training_dropout_default", "test_training_dropout_mask",
                  "test_training_dropout_default_mask"}
UNSUPPORTED_TYPES = {
    TensorProto.STRING, TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ, TensorProto.FLOAT4E2M1,
    *(getattr(TensorProto, n) for n in ("FLOAT8E8M0", "INT2", "UINT2") if hasattr(TensorProto, n)),
}


def _ops(graph: onnx.GraphProto) -> set[str]:
    found = set()
    for node in graph.node:
        found.add(node.op_type)
        for attr in node.attribute:
            if attr.g.node:
                found |= _ops(attr.g)
            for sub in attr.graphs:
                found |= _ops(sub)
    return found


def _type_codes(graph: onnx.GraphProto) -> set:
    """Element types and value kinds (sequence, optional, ...) appearing anywhere in a graph."""
    codes = set()
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        kind = vi.type.WhichOneof("value")
        codes.add(vi.type.tensor_type.elem_type if kind == "tensor_type" else kind)
    codes.update(t.data_type for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                codes.add(attr.t.data_type)
            if node.op_type in ("Cast", "CastLike") and attr.name == "to":
                codes.add(attr.i)
            if attr.name == "output_dtype":
                codes.add(attr.i)
            if attr.g.node:
                codes |= _type_codes(attr.g)
            for sub in attr.graphs:
                codes |= _type_codes(sub)
    return codes


def _unsupported_reason(case) -> str | None:
    codes = _type_codes(case.model.graph)
    bad = [c for c in codes if c in UNSUPPORTED_TYPES or c in ("sequence_type", "optional_type", "map_type")]
    return str(bad) if bad else None


def _selected_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    return [c for c in cases if _ops(c.model.graph) <= CLAIMED and c.name not in RANDOM_DROPOUT]


CASES = _selected_cases()


def _array(value) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, TensorProto) else np.asarray(value)


def test_the_suite_is_the_expected_size():
    # about 980 node cases use only claimed ops; a collapse of the selection must not pass silently
    assert len(CASES) >= 950


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_node_case(case):
    run_node_case(case)


def run_node_case(case) -> None:
    """One ONNX node case through refquant: outputs equal in dtype and shape, values within the runner's
    tolerance (exact for integers); cases with an unsupported type raise UnsupportedTypeError."""
    reason = _unsupported_reason(case)
    if reason is not None:
        with pytest.raises(UnsupportedTypeError):
            graph = refquant.load(case.model)
            for inputs, _ in case.data_sets:
                feeds = dict(zip([i.name for i in case.model.graph.input], map(_array, inputs)))
                refquant.Session(graph).run(feeds)
        return
    graph = refquant.load(case.model)
    session = refquant.Session(graph)
    input_names = [i.name for i in case.model.graph.input]
    output_names = [o.name for o in case.model.graph.output]
    for inputs, expected in case.data_sets:
        feeds = {name: _array(v) for name, v in zip(input_names, inputs)}
        with np.errstate(all="ignore"):
            got = session.run(feeds)
        for name, want in zip(output_names, expected):
            want = _array(want)
            out = np.asarray(got[name])
            assert out.dtype == want.dtype, f"{name}: dtype {out.dtype} != {want.dtype}"
            assert out.shape == want.shape, f"{name}: shape {out.shape} != {want.shape}"
            if want.dtype.kind in "fc":
                np.testing.assert_allclose(out, want, rtol=max(case.rtol, 1e-3), atol=max(case.atol, 1e-6),
                                           err_msg=name)
            else:
                np.testing.assert_array_equal(out, want,
                                              err_msg=name)
