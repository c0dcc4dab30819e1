"""Scatter/Unique/bitwise/loss/random... ops: ONNX's backend node cases, onnxruntime on hand-built models, errors.

The node cases are those whose ops all lie in test_onnx_node_cases.CLAIMED | TENSOR_OPS | RANDOM_OPS and that
use at least one of those; each is checked by test_onnx_node_cases.test_node_case (same tolerances: ONNX's
runner's), except one case checked against onnxruntime instead of its stored output (ORT_NOT_REFERENCE, the
reason written beside it) and the random ones (dtype, shape, possible values). The hand-built models compare
with onnxruntime: integer and index outputs with np.array_equal; float outputs bit for bit where both sides
do the same single operations (a copy, a select, a product of small integers), otherwise with the tolerance
stated beside the assertion. Seeded random ops are compared with onnx's ReferenceEvaluator, unseeded ones
with their distribution."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper

import refquant
from refquant.errors import OpError, RefquantError, UnsupportedTypeError
from refquant.quant import QuantSim

from . import test_onnx_node_cases as node_cases
from .helpers import FLOAT, INT64, make_model, ort_run

TENSOR_OPS = set("""
ScatterElements Scatter NonZero Trilu Compress CumProd ReverseSequence Unique BitShift BitwiseAnd BitwiseOr
BitwiseXor BitwiseNot BitCast CenterCropPad Det Col2Im MaxUnpool EyeLike CastLike TensorScatter
NegativeLogLikelihoodLoss SoftmaxCrossEntropyLoss
""".split())

# onnx's reference MaxUnpool builds the unpooled tensor at the inferred shape (4x4 here) and pastes it into
# the top-left corner of output_shape (5x5), reading MaxPool's flat indices as 4x4 positions; onnxruntime
# reads them as positions in the output_shape tensor, which is where MaxPool took them from when it pooled
# a 5x5 input. refquant follows onnxruntime: this case is compared with it.
ORT_NOT_REFERENCE = {"test_maxunpool_export_with_output_shape"}
# their stored outputs are one random draw ("for informational purpose", says onnx): checked for dtype, shape
# and the values a draw can take
RANDOM_OPS = {"Bernoulli", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}


def _selected_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    allowed = node_cases.CLAIMED | TENSOR_OPS | RANDOM_OPS
    return [c for c in cases if node_cases._ops(c.model.graph) <= allowed
            and node_cases._ops(c.model.graph) & (TENSOR_OPS | RANDOM_OPS)]


CASES = _selected_cases()


def test_the_selection_is_the_expected_size():
    # 338 cases with onnx 1.23 (ScatterElements 11, Unique 8, BitShift 17, BitCast 19, CastLike 60, losses 86,
    # Bernoulli 6, ...);
    # a collapse of the selection must not pass silently
    assert len(CASES) >= 330
    covered = set().union(*(node_cases._ops(c.model.graph) for c in CASES))
    assert covered >= TENSOR_OPS | {"Bernoulli", "RandomUniformLike"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_node_case(case):
    if node_cases._ops(case.model.graph) & RANDOM_OPS:
        _check_random_case(case)
        return
    if case.name not in ORT_NOT_REFERENCE:
        node_cases.test_node_case(case)
        return
    graph = refquant.load(case.model)
    names = [i.name for i in case.model.graph.input]
    for inputs, expected in case.data_sets:
        feeds = {n: node_cases._array(v) for n, v in zip(names, inputs)}
        ours = refquant.Session(graph).run(feeds)
        theirs = ort_run(case.model, feeds)
        for name, want in zip(theirs, expected):
            assert np.array_equal(ours[name], theirs[name])  # a scatter of copied values: exact
            assert not np.array_equal(theirs[name], node_cases._array(want))  # the disagreement is still there


def _check_random_case(case):
    graph = refquant.load(case.model)
    names = [i.name for i in case.model.graph.input]
    for inputs, expected in case.data_sets:
        got = refquant.Session(graph).run({n: node_cases._array(v) for n, v in zip(names, inputs)})
        for out, want in zip(case.model.graph.output, expected):
            want = node_cases._array(want)
            value = got[out.name]
            assert value.dtype == want.dtype and value.shape == want.shape
            assert np.isin(value, [0, 1]).all()  # the Bernoulli cases: each draw is 0 or 1


# ------------------------------------------------------------------ against onnxruntime
def _both(model, feeds):
    ours = refquant.Session(refquant.load(model)).run(feeds)
    return ours, ort_run(model, feeds)


def _assert_same(ours, theirs):
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert ours[name].shape == theirs[name].shape, name
        assert np.array_equal(ours[name], theirs[name]), name


def test_causal_mask_from_trilu_matches_onnxruntime():
    # scores [2, 5, 5] -> Where(Trilu(ones, lower), scores, -inf) -> Softmax: the decoder's causal mask
    nodes = [
        helper.make_node("Shape", ["scores"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                         value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Trilu", ["ones"], ["lower"], upper=0),
        helper.make_node("Cast", ["lower"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("Where", ["keep", "scores", "neg_inf"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("Trilu", ["scores", "k"], ["upper_k1"], upper=1),
    ]
    model = make_model(nodes, [("scores", FLOAT, [2, 5, 5])], [("probs", FLOAT, None), ("masked", FLOAT, None),
                                                                ("upper_k1", FLOAT, None)],
                       {"neg_inf": np.array(-np.inf, np.float32), "k": np.array(1, np.int64)}, opset=17)
    scores = np.random.default_rng(0).standard_normal((2, 5, 5)).astype(np.float32)
    ours, theirs = _both(model, {"scores": scores})
    for name in ("masked", "upper_k1"):  # selections of copied values: exact
        assert np.array_equal(ours[name], theirs[name])
    assert np.all(ours["probs"][:, np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0)
    # exp and the row sum differ by float32 rounding between the two runtimes: a few ulps
    np.testing.assert_allclose(ours["probs"], theirs["probs"], rtol=1e-6, atol=1e-7)


def test_nonzero_feeding_gather_matches_onnxruntime():
    # the positive entries of x (a data-dependent length), and the 2-D NonZero -> Transpose -> GatherND route
    nodes = [
        helper.make_node("Greater", ["x", "zero"], ["positive"]),
        helper.make_node("NonZero", ["positive"], ["where"]),
        helper.make_node("Transpose", ["where"], ["coords"]),
        helper.make_node("GatherND", ["x", "coords"], ["picked"]),
        helper.make_node("Flatten", ["x"], ["flat"], axis=0),
        helper.make_node("Reshape", ["flat", "minus_one"], ["row"]),
        helper.make_node("NonZero", ["row"], ["flat_where"]),
        helper.make_node("Squeeze", ["flat_where", "axis0"], ["flat_index"]),
        helper.make_node("Gather", ["row", "flat_index"], ["nonzero_values"]),
    ]
    model = make_model(nodes, [("x", FLOAT, [3, 4])], [("where", INT64, None), ("picked", FLOAT, None),
                                                       ("nonzero_values", FLOAT, None)],
                       {"zero": np.array(0, np.float32), "minus_one": np.array([-1], np.int64),
                        "axis0": np.array([0], np.int64)}, opset=13)
    x = np.array([[0, 1.5, -2, 0], [3, 0, 0, -0.0], [0.25, 7, 0, -1]], np.float32)
    ours, theirs = _both(model, {"x": x})
    _assert_same(ours, theirs)
    assert ours["where"].shape == (2, 4)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_scatter_elements_duplicate_indices_match_onnxruntime(reduction, dtype):
    # duplicates in every column: each reduction folds several updates into one element, in index order
    rng = np.random.default_rng(1)
    data = rng.integers(-4, 5, (4, 3)).astype(dtype)
    updates = rng.integers(-3, 4, (6, 3)).astype(dtype)
    indices = np.array([[0, 1, 3], [0, 1, -1], [2, 1, 3], [-4, 0, 0], [2, 2, 1], [0, 1, 3]], np.int64)
    if reduction == "none":  # the spec leaves duplicates' order undefined: give each target one update
        indices = np.array([[0, 1, 3], [1, 2, 0], [3, 0, -3]], np.int64)
        updates = updates[:3]
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.INT32
    node = helper.make_node("ScatterElements", ["data", "indices", "updates"], ["out"], axis=0,
                            reduction=reduction)
    model = make_model([node], [("data", elem, [4, 3]), ("indices", INT64, list(indices.shape)),
                                ("updates", elem, list(updates.shape))], [("out", elem, None)], opset=18)
    # small integers: every sum and product is exact in float32, so the comparison is exact
    _assert_same(*_both(model, {"data": data, "indices": indices, "updates": updates}))


def test_scatter_elements_on_axis_1_and_scatter_alias_match_onnxruntime():
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    indices = np.array([[3, 0], [-1, 1], [2, -4]], np.int64)
    updates = -np.arange(6, dtype=np.float32).reshape(3, 2) - 1
    nodes = [helper.make_node("ScatterElements", ["data", "indices", "updates"], ["out"], axis=1)]
    model = make_model(nodes, [("data", FLOAT, [3, 4]), ("indices", INT64, [3, 2]), ("updates", FLOAT, [3, 2])],
                       [("out", FLOAT, None)], opset=13)
    ours, theirs = _both(model, {"data": data, "indices": indices, "updates": updates})
    _assert_same(ours, theirs)
    # Scatter (opset 9, deprecated at 11) is ScatterElements without reduction; written out by hand:
    want = data.copy()
    want[[0, 0, 1, 1, 2, 2], [3, 0, 3, 1, 2, 0]] = updates.reshape(-1)
    alias = make_model([helper.make_node("Scatter", ["data", "indices", "updates"], ["out"], axis=1)],
                       [("data", FLOAT, [3, 4]), ("indices", INT64, [3, 2]), ("updates", FLOAT, [3, 2])],
                       [("out", FLOAT, None)], opset=9)
    got = refquant.Session(refquant.load(alias)).run({"data": data, "indices": indices, "updates": updates})["out"]
    assert np.array_equal(got, want) and np.array_equal(want, theirs["out"])


@pytest.mark.parametrize("sorted_", [1, 0])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_unique_all_outputs_match_onnxruntime(sorted_, axis):
    x = np.array([[2, 1, 2, 1], [0, 3, 0, 3], [2, 1, 2, 1], [5, 5, 5, 5]], np.float32)
    attrs = {"sorted": sorted_} if axis is None else {"sorted": sorted_, "axis": axis}
    node = helper.make_node("Unique", ["x"], ["y", "indices", "inverse", "counts"], **attrs)
    model = make_model([node], [("x", FLOAT, [4, 4])], [("y", FLOAT, None), ("indices", INT64, None),
                                                        ("inverse", INT64, None), ("counts", INT64, None)], opset=11)
    _assert_same(*_both(model, {"x": x}))


def test_unique_of_integers_unsorted_matches_onnxruntime():
    x = np.array([7, -3, 7, 0, -3, 9, 0, 0], np.int64)
    node = helper.make_node("Unique", ["x"], ["y", "indices", "inverse", "counts"], sorted=0)
    model = make_model([node], [("x", INT64, [8])], [("y", INT64, None), ("indices", INT64, None),
                                                     ("inverse", INT64, None), ("counts", INT64, None)], opset=11)
    ours, theirs = _both(model, {"x": x})
    _assert_same(ours, theirs)
    assert ours["y"].tolist() == [7, -3, 0, 9] and ours["counts"].tolist() == [2, 2, 3, 1]  # by hand


@pytest.mark.parametrize("elem", [TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64])
def test_bit_shift_and_bitwise_match_onnxruntime(elem):
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    bits = np.iinfo(dtype).bits
    rng = np.random.default_rng(2)
    x = rng.integers(0, np.iinfo(dtype).max, (3, 5), dtype=dtype, endpoint=True)
    y = rng.integers(0, np.iinfo(dtype).max, (3, 5), dtype=dtype, endpoint=True)
    shift = (np.arange(5) * (bits - 1) // 4).astype(dtype)  # 0 .. bits-1, broadcast over rows
    nodes = [helper.make_node("BitShift", ["x", "shift"], ["left"], direction="LEFT"),
             helper.make_node("BitShift", ["x", "shift"], ["right"], direction="RIGHT"),
             helper.make_node("BitwiseAnd", ["x", "y"], ["and"]),
             helper.make_node("BitwiseOr", ["x", "y"], ["or"]),
             helper.make_node("BitwiseXor", ["x", "y"], ["xor"]),
             helper.make_node("BitwiseNot", ["x"], ["not"])]
    outs = [(n, elem, None) for n in ("left", "right", "and", "or", "xor", "not")]
    model = make_model(nodes, [("x", elem, [3, 5]), ("y", elem, [3, 5]), ("shift", elem, [5])], outs, opset=18)
    _assert_same(*_both(model, {"x": x, "y": y, "shift": shift}))


@pytest.mark.parametrize("elem", [TensorProto.INT8, TensorProto.INT32, TensorProto.INT64])
def test_signed_bitwise_match_onnxruntime(elem):
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    info = np.iinfo(dtype)
    x = np.array([info.min, -1, 0, 1, info.max, -77], dtype)
    y = np.array([-1, info.min, 5, -2, 3, 44], dtype)
    nodes = [helper.make_node(op, ["x", "y"], [op]) for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor")]
    nodes.append(helper.make_node("BitwiseNot", ["x"], ["BitwiseNot"]))
    outs = [(op, elem, None) for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot")]
    model = make_model(nodes, [("x", elem, [6]), ("y", elem, [6])], outs, opset=18)
    _assert_same(*_both(model, {"x": x, "y": y}))


def test_signed_bit_shift_follows_the_written_rule():
    # opset 28's signed BitShift (newer than onnxruntime 1.32): right shifts are arithmetic, a shift outside
    # [0, bits) gives 0 (-1 for a negative value shifted right), a left shift wraps the two's complement
    x = np.array([-128, -7, 7, 64, -1, 5], np.int8)
    s = np.array([1, 2, 8, 1, 100, -1], np.int8)
    model = make_model([helper.make_node("BitShift", ["x", "s"], ["r"], direction="RIGHT"),
                        helper.make_node("BitShift", ["x", "s"], ["l"], direction="LEFT")],
                       [("x", TensorProto.INT8, [6]), ("s", TensorProto.INT8, [6])],
                       [("r", TensorProto.INT8, None), ("l", TensorProto.INT8, None)], opset=28, ir_version=10)
    got = refquant.Session(refquant.load(model)).run({"x": x, "s": s})
    assert got["r"].tolist() == [-64, -2, 0, 32, -1, 0]
    assert got["l"].tolist() == [0, -28, 0, -128, 0, 0]  # 64 << 1 = 128 wraps to -128; -128 << 1 wraps to 0


@pytest.mark.parametrize("exclusive,reverse", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.INT64])
def test_cumprod_matches_onnxruntime(exclusive, reverse, elem):
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    x = np.array([[1, 2, -3, 2], [3, -1, 2, 5], [0, 4, 2, 2]], dtype)
    model = make_model([helper.make_node("CumProd", ["x", "axis"], ["y"], exclusive=exclusive, reverse=reverse)],
                       [("x", elem, [3, 4])], [("y", elem, None)], {"axis": np.array(1, np.int64)}, opset=26,
                       ir_version=10)
    _assert_same(*_both(model, {"x": x}))  # products of small integers: exact in float32 too


def test_col2im_matches_onnxruntime():
    # overlapping 3x2 blocks (stride 1x2, dilation 2x1, pads 1,0,1,1) summed back into a 6x5 image
    image, block = [6, 5], [3, 2]
    strides, dilations, pads = [1, 2], [2, 1], [1, 0, 1, 1]
    blocks = [(image[d] + pads[d] + pads[d + 2] - dilations[d] * (block[d] - 1) - 1) // strides[d] + 1
              for d in range(2)]
    x = np.random.default_rng(3).integers(-8, 9, (2, 3 * 6, blocks[0] * blocks[1])).astype(np.float32)
    node = helper.make_node("Col2Im", ["x", "image", "block"], ["y"], strides=strides, dilations=dilations,
                            pads=pads)
    model = make_model([node], [("x", FLOAT, list(x.shape))], [("y", FLOAT, None)],
                       {"image": np.array(image, np.int64), "block": np.array(block, np.int64)}, opset=18)
    ours, theirs = _both(model, {"x": x})
    assert ours["y"].shape == (2, 3, 6, 5)
    _assert_same(ours, theirs)  # sums of at most 6 small integers: exact


@pytest.mark.parametrize("size", [5, 6])
def test_max_pool_indices_into_max_unpool_match_onnxruntime(size):
    # SegNet's pattern: MaxPool's indices feed MaxUnpool with the pre-pool shape (odd 5x5: output_shape matters)
    nodes = [helper.make_node("MaxPool", ["x"], ["pooled", "argmax"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("MaxUnpool", ["pooled", "argmax", "shape"], ["restored"], kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("MaxUnpool", ["pooled", "argmax"], ["inferred"], kernel_shape=[2, 2], strides=[2, 2])]
    model = make_model(nodes, [("x", FLOAT, [2, 3, size, size])],
                       [("restored", FLOAT, None), ("inferred", FLOAT, None)], opset=11)
    x = np.random.default_rng(4).standard_normal((2, 3, size, size)).astype(np.float32)
    if size == 5:  # the inferred 4x4 output cannot hold indices from a 5x5 plane: both runtimes refuse
        with pytest.raises(OpError, match="MaxUnpool index"):
            refquant.Session(refquant.load(model)).run({"x": x})
        with pytest.raises(Exception, match="out of bounds"):
            ort_run(model, {"x": x})
        model.graph.output.pop()
        model.graph.node.pop()
    ours, theirs = _both(model, {"x": x})
    _assert_same(ours, theirs)
    assert ours["restored"].shape == (2, 3, size, size)


@pytest.mark.parametrize("mode", ["linear", "circular"])
def test_tensor_scatter_matches_onnxruntime(mode):
    past = np.random.default_rng(5).standard_normal((2, 3, 6, 4)).astype(np.float32)
    update = np.random.default_rng(6).standard_normal((2, 3, 2, 4)).astype(np.float32)
    write = np.array([4, 1] if mode == "linear" else [5, 0], np.int64)
    node = helper.make_node("TensorScatter", ["past", "update", "write"], ["present"], mode=mode, axis=2)
    model = make_model([node], [("past", FLOAT, [2, 3, 6, 4]), ("update", FLOAT, [2, 3, 2, 4]),
                                ("write", INT64, [2])], [("present", FLOAT, None)], opset=24, ir_version=10)
    ours, theirs = _both(model, {"past": past, "update": update, "write": write})
    _assert_same(ours, theirs)


def test_center_crop_pad_reverse_sequence_compress_eye_like_det_match_onnxruntime():
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("CenterCropPad", ["image", "crop"], ["cropped"], axes=[1, 2]),
             helper.make_node("ReverseSequence", ["seq", "lens"], ["reversed"], batch_axis=1, time_axis=0),
             helper.make_node("Compress", ["seq", "keep"], ["kept"], axis=2),
             helper.make_node("EyeLike", ["square"], ["eye"], k=-1, dtype=TensorProto.INT32),
             helper.make_node("Det", ["square"], ["det"]),
             helper.make_node("CastLike", ["seq", "lens"], ["as_int"])]
    inputs = [("image", FLOAT, [3, 5, 4]), ("seq", FLOAT, [4, 3, 2]), ("lens", INT64, [3]),
              ("keep", TensorProto.BOOL, [2]), ("square", FLOAT, [4, 4])]
    outs = [(n, 0, None) for n in ("cropped", "reversed", "kept", "eye", "det", "as_int")]
    model = make_model(nodes, inputs, [(n, FLOAT if n not in ("eye", "as_int") else
                                        (TensorProto.INT32 if n == "eye" else INT64), None) for n, _, _ in outs],
                       {"crop": np.array([2, 7], np.int64)}, opset=18)
    feeds = {"image": rng.standard_normal((3, 5, 4)).astype(np.float32),
             "seq": (rng.standard_normal((4, 3, 2)) * 10).astype(np.float32),
             "lens": np.array([4, 1, 3], np.int64), "keep": np.array([False, True]),
             "square": rng.standard_normal((4, 4)).astype(np.float32)}
    ours, theirs = _both(model, feeds)
    det_ours, det_theirs = ours.pop("det"), theirs.pop("det")
    _assert_same(ours, theirs)
    # Det: LU in float64 here, float32 partial pivoting in onnxruntime (Eigen): a few float32 ulps of |det|
    np.testing.assert_allclose(det_ours, det_theirs, rtol=1e-5)


def test_bit_cast_reinterprets_bits():
    # written rule: float32 1.0 is 0x3F800000, -2.0 is 0xC0000000; uint8 255 as int8 is -1
    model = make_model([helper.make_node("BitCast", ["x"], ["bits"], to=TensorProto.INT32),
                        helper.make_node("BitCast", ["bits"], ["back"], to=TensorProto.FLOAT),
                        helper.make_node("BitCast", ["u"], ["s"], to=TensorProto.INT8)],
                       [("x", FLOAT, [3]), ("u", TensorProto.UINT8, [2])],
                       [("bits", TensorProto.INT32, None), ("back", FLOAT, None), ("s", TensorProto.INT8, None)],
                       opset=26, ir_version=10)
    x = np.array([1.0, -2.0, 0.0], np.float32)
    got = refquant.Session(refquant.load(model)).run({"x": x, "u": np.array([255, 127], np.uint8)})
    assert got["bits"].tolist() == [0x3F800000, -0x40000000, 0]
    assert np.array_equal(got["back"], x) and got["s"].tolist() == [-1, 127]


# ------------------------------------------------------------------ errors name the node
def _run_one(node, inputs, feeds, initializers=(), opset=18, ir_version=None):
    model = make_model([node], inputs, [(node.output[0], 0, None)], dict(initializers), opset=opset,
                       ir_version=ir_version)
    model.graph.output[0].type.Clear()
    return refquant.Session(refquant.load(model)).run(feeds)


@pytest.mark.parametrize("bad", [3, -4])
def test_scatter_elements_index_out_of_range_names_the_node(bad):
    # -4 on an axis of 3 is out of range too (NumPy would wrap it to the last row)
    node = helper.make_node("ScatterElements", ["d", "i", "u"], ["o"], name="scatter_kv")
    with pytest.raises(OpError, match="scatter_kv"):
        _run_one(node, [("d", FLOAT, [3, 2]), ("i", INT64, [1, 2]), ("u", FLOAT, [1, 2])],
                 {"d": np.zeros((3, 2), np.float32), "i": np.array([[0, bad]], np.int64),
                  "u": np.ones((1, 2), np.float32)})


def test_bad_indices_and_shapes_name_the_node():
    cases = [
        (helper.make_node("Scatter", ["d", "i", "u"], ["o"], name="old_scatter"),
         [("d", FLOAT, [3]), ("i", INT64, [1]), ("u", FLOAT, [1])],
         {"d": np.zeros(3, np.float32), "i": np.array([-5], np.int64), "u": np.ones(1, np.float32)}, 9),
        (helper.make_node("MaxUnpool", ["x", "i"], ["o"], name="unpool", kernel_shape=[2], strides=[2]),
         [("x", FLOAT, [1, 1, 2]), ("i", INT64, [1, 1, 2])],
         {"x": np.ones((1, 1, 2), np.float32), "i": np.array([[[0, 9]]], np.int64)}, 11),
        (helper.make_node("TensorScatter", ["p", "u", "w"], ["o"], name="kv_write", axis=1),
         [("p", FLOAT, [1, 4]), ("u", FLOAT, [1, 2]), ("w", INT64, [1])],
         {"p": np.zeros((1, 4), np.float32), "u": np.ones((1, 2), np.float32), "w": np.array([3], np.int64)}, 24),
        (helper.make_node("BitCast", ["x"], ["o"], name="reinterpret", to=TensorProto.INT8),
         [("x", FLOAT, [2])], {"x": np.ones(2, np.float32)}, 26),
        (helper.make_node("Col2Im", ["x", "img", "blk"], ["o"], name="fold"),
         [("x", FLOAT, [1, 4, 5]), ("img", INT64, [2]), ("blk", INT64, [2])],
         {"x": np.ones((1, 4, 5), np.float32), "img": np.array([3, 3], np.int64),
          "blk": np.array([2, 2], np.int64)}, 18),
    ]
    for node, inputs, feeds, opset in cases:
        with pytest.raises(RefquantError, match=node.name):
            _run_one(node, inputs, feeds, opset=opset, ir_version=10 if opset > 21 else None)


def test_string_unique_is_an_unsupported_type():
    model = make_model([helper.make_node("Unique", ["s"], ["y"])], [("s", TensorProto.STRING, [3])],
                       [("y", TensorProto.STRING, None)], opset=11)
    with pytest.raises(UnsupportedTypeError):
        refquant.Session(refquant.load(model)).run({"s": np.array(["a", "b", "a"], object)})


# ------------------------------------------------------------------ QuantSim over these ops
def test_quantsim_builds_and_runs_with_index_ops():
    # float path: MatMul -> Trilu -> ScatterElements(add) -> Unique values -> ReduceSum; index path: NonZero, Unique
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Trilu", ["h"], ["lower"], upper=0),
             helper.make_node("ScatterElements", ["lower", "idx", "lower"], ["mixed"], axis=1, reduction="add"),
             helper.make_node("Greater", ["mixed", "zero"], ["positive"]),
             helper.make_node("NonZero", ["positive"], ["where"]),
             helper.make_node("Unique", ["mixed"], ["values", "first", "inverse", "counts"]),
             helper.make_node("ReduceSum", ["values"], ["total"], keepdims=0)]
    model = make_model(nodes, [("x", FLOAT, [4, 4])],
                       [("mixed", FLOAT, None), ("where", INT64, None), ("inverse", INT64, None),
                        ("total", FLOAT, None)],
                       {"w": rng.standard_normal((4, 4)).astype(np.float32), "zero": np.array(0, np.float32),
                        "idx": np.array([[1, 0, 3, 2]] * 4, np.int64)}, opset=18)
    sim = QuantSim(refquant.load(model))
    for name in ("where", "first", "inverse", "counts", "positive"):
        assert name not in sim.quantizers  # integer and bool tensors get no quantizer
    assert sim.quantizers["mixed"].enabled and sim.quantizers["lower"].enabled
    feeds = {"x": rng.standard_normal((4, 4)).astype(np.float32)}
    sim.compute_encodings([feeds], progress=False)  # calibrated on the evaluated sample: nothing clips
    got = sim.run(feeds)
    float_out = sim.run_float(feeds)
    encoding = sim.encoding_of("mixed")
    codes = got["mixed"] / encoding.scale
    # the ScatterElements output is on its 8-bit grid (to float32 rounding of the division: 1e-3 of a step)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert np.round(codes - encoding.offset).min() >= 0 and np.round(codes - encoding.offset).max() <= 255
    # the index outputs are computed from the simulated (quantized) values, written out with NumPy
    assert np.array_equal(got["where"], np.array(np.nonzero(got["mixed"] > 0)))
    assert got["inverse"].shape == (16,) and got["inverse"].dtype == np.int64
    # the exported QDQ model runs in onnxruntime: the ScatterElements output agrees to one step (a one-ulp
    # difference in the MatMul sum may flip one rounding), the index outputs exactly (no value lies at a flip)
    theirs = ort_run(sim.to_onnx_qdq(), feeds)
    assert np.all(np.abs(theirs["mixed"] - got["mixed"]) <= encoding.scale * 1.001)
    for name in ("where", "inverse"):
        assert np.array_equal(theirs[name], got[name]), name
    assert not np.array_equal(got["mixed"], float_out["mixed"])  # the simulation did quantize


def test_bit_cast_to_an_unsupported_type_names_the_node_at_load():
    model = make_model([helper.make_node("BitCast", ["x"], ["y"], name="to_bf16", to=TensorProto.BFLOAT16)],
                       [("x", TensorProto.INT16, [2])], [("y", TensorProto.INT16, None)], opset=26, ir_version=10)
    with pytest.raises(UnsupportedTypeError, match="to_bf16.*BFLOAT16"):
        refquant.load(model)


# ------------------------------------------------------------------ random generators
RANDOM_OUTPUTS = ["normal", "uniform_like", "normal_like", "uniform16", "coin"]


def _random_model(extra=()):
    nodes = [helper.make_node("RandomNormal", [], ["normal"], shape=[3, 4], seed=3.0, mean=1.5, scale=2.0),
             helper.make_node("RandomUniformLike", ["x"], ["uniform_like"], seed=7.0, low=-1.0, high=3.0,
                              dtype=TensorProto.DOUBLE),
             helper.make_node("RandomNormalLike", ["x"], ["normal_like"], seed=1.0),
             helper.make_node("RandomUniform", [], ["uniform16"], shape=[5], seed=2.0, dtype=TensorProto.FLOAT16),
             helper.make_node("Bernoulli", ["p"], ["coin"], seed=5.0, dtype=TensorProto.INT32), *extra]
    model = make_model(nodes, [("x", FLOAT, [2, 3]), ("p", FLOAT, [6]), ("logits", FLOAT, [2, 3])],
                       [(o, FLOAT, None) for o in RANDOM_OUTPUTS + [n.output[0] for n in extra]], opset=15)
    for out in model.graph.output:
        out.type.Clear()
    return model


RANDOM_FEEDS = {"x": np.zeros((2, 3), np.float32), "p": np.linspace(0, 1, 6).astype(np.float32),
                "logits": np.array([[0, 1, 2], [5, 0, 0]], np.float32)}


def test_seeded_random_ops_draw_what_onnx_reference_draws():
    # with a seed, the values are ONNX's reference evaluator's (the same RandomState stream and arithmetic)
    from onnx.reference import ReferenceEvaluator

    model = _random_model()
    ours = refquant.Session(refquant.load(model)).run(RANDOM_FEEDS)
    theirs = dict(zip(RANDOM_OUTPUTS, ReferenceEvaluator(model).run(None, RANDOM_FEEDS)))
    _assert_same(ours, theirs)
    assert ours["coin"][0] == 0 and ours["coin"][-1] == 1  # p = 0 and p = 1 are certain


def test_random_ops_are_never_folded_and_unseeded_runs_differ():
    nodes = [helper.make_node("RandomNormal", [], ["a"], shape=[64]),
             helper.make_node("RandomUniformLike", ["c"], ["b"]),
             helper.make_node("RandomUniform", [], ["s"], shape=[8], seed=4.0)]
    model = make_model(nodes, [], [("a", FLOAT, [64]), ("b", FLOAT, [64]), ("s", FLOAT, [8])],
                       {"c": np.zeros(64, np.float32)}, opset=15)
    session = refquant.Session(refquant.load(model))
    first, second = session.run({}), session.run({})
    assert not np.array_equal(first["a"], second["a"]) and not np.array_equal(first["b"], second["b"])
    assert np.array_equal(first["s"], second["s"])  # a seed repeats the draw on every run (as onnx's reference)


def test_random_draws_have_the_written_distribution():
    # n = 200_000 draws: sample means lie within 5 standard errors (sigma / sqrt(n)) of the true mean
    n = 200_000
    nodes = [helper.make_node("RandomNormal", [], ["normal"], shape=[n], mean=-2.0, scale=3.0),
             helper.make_node("RandomUniform", [], ["uniform"], shape=[n], low=1.0, high=5.0),
             helper.make_node("Bernoulli", ["p"], ["coin"]),
             helper.make_node("Multinomial", ["logits"], ["draws"], sample_size=n, dtype=TensorProto.INT64)]
    logits = np.log(np.array([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]], np.float32))
    model = make_model(nodes, [("p", FLOAT, [n]), ("logits", FLOAT, [2, 3])],
                       [("normal", FLOAT, None), ("uniform", FLOAT, None), ("coin", FLOAT, None),
                        ("draws", INT64, None)], opset=15)
    got = refquant.Session(refquant.load(model)).run({"p": np.full(n, 0.3, np.float32), "logits": logits})
    se = 5 / np.sqrt(n)
    assert abs(got["normal"].mean() + 2.0) < 3.0 * se and abs(got["normal"].std() - 3.0) < 3.0 * 2 * se
    # <= high: the reference's float64 draw in [0, 1) cast to float32 rounds to 1.0 once in 2^25 draws, and
    # low + (high - low) u rounds up to high in float32 too: measured 1e-7 per draw for [1, 5), so ~2 % of runs
    assert got["uniform"].min() >= 1.0 and got["uniform"].max() <= 5.0
    assert abs(got["uniform"].mean() - 3.0) < (4 / np.sqrt(12)) * se
    assert abs(got["coin"].mean() - 0.3) < np.sqrt(0.3 * 0.7) * se and set(np.unique(got["coin"])) == {0, 1}
    assert got["draws"].shape == (2, n) and got["draws"].dtype == np.int64
    for row, probs in zip(got["draws"], np.exp(logits)):
        freq = np.bincount(row, minlength=3) / n
        assert np.all(np.abs(freq - probs) < np.sqrt(probs * (1 - probs)) * se)


def test_random_ops_run_in_onnxruntime_with_the_same_shapes_and_types():
    # onnxruntime draws other numbers; what both must agree on is each output's dtype and shape
    model = _random_model([helper.make_node("Multinomial", ["logits"], ["pick"], sample_size=3)])
    for field in (model.graph.node, model.graph.output):  # onnxruntime has no float16 RandomUniform
        del field[[getattr(x, "name", None) == "uniform16" or list(getattr(x, "output", [])) == ["uniform16"]
                   for x in field].index(True)]
    ours = refquant.Session(refquant.load(model)).run(RANDOM_FEEDS)
    theirs = ort_run(model, RANDOM_FEEDS)
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in theirs.items()}


# ------------------------------------------------------------------ losses of exported training graphs
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [None, -100, 2, -1])
def test_losses_match_onnxruntime(reduction, weighted, ignore_index):
    # [N, C, d] = [3, 4, 5]; PyTorch exports ignore_index=-100, a value outside the classes
    rng = np.random.default_rng(9)
    scores = rng.standard_normal((3, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 4, (3, 5)).astype(np.int64)
    labels[0, :2] = ignore_index if ignore_index is not None else 1
    attrs = {"reduction": reduction} if ignore_index is None else {"reduction": reduction, "ignore_index": ignore_index}
    inputs = ["scores", "labels"] + (["weights"] if weighted else [])
    nodes = [helper.make_node("SoftmaxCrossEntropyLoss", inputs, ["sce", "log_prob"], **attrs),
             helper.make_node("NegativeLogLikelihoodLoss", ["log_prob"] + inputs[1:], ["nll"], **attrs)]
    model = make_model(nodes, [("scores", FLOAT, [3, 4, 5]), ("labels", INT64, [3, 5])],
                       [("sce", FLOAT, None), ("log_prob", FLOAT, None), ("nll", FLOAT, None)],
                       {"weights": np.array([0.5, 2.0, 1.0, 0.25], np.float32)} if weighted else {}, opset=13)
    ours, theirs = _both(model, {"scores": scores, "labels": labels})
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
        # log-softmax in float64 here, float32 in onnxruntime; sums of 15 terms: a few float32 ulps
        np.testing.assert_allclose(ours[name], theirs[name], rtol=2e-6, atol=1e-6, err_msg=name)


def test_loss_target_outside_the_classes_names_the_node():
    node = helper.make_node("NegativeLogLikelihoodLoss", ["x", "t"], ["loss"], name="nll_head")
    with pytest.raises(OpError, match="nll_head.*outside the 3 classes"):
        _run_one(node, [("x", FLOAT, [2, 3]), ("t", INT64, [2])],
                 {"x": np.zeros((2, 3), np.float32), "t": np.array([0, 3], np.int64)}, opset=13)


def test_bit_cast_between_4_bit_types():
    # written rule: the nibble of int4 -2 is 0b1110 = uint4 14; -8 is 0b1000 = 8; uint4 15 is int4 -1
    model = make_model([helper.make_node("BitCast", ["s"], ["u"], to=TensorProto.UINT4),
                        helper.make_node("BitCast", ["u"], ["back"], to=TensorProto.INT4)],
                       [("s", TensorProto.INT4, [4])], [("u", TensorProto.UINT4, None),
                                                        ("back", TensorProto.INT4, None)], opset=26, ir_version=10)
    from refquant import dtypes

    s = np.array([3, -2, -8, -1], dtypes.INT4)
    got = refquant.Session(refquant.load(model)).run({"s": s})
    assert got["u"].dtype == dtypes.UINT4 and got["u"].astype(int).tolist() == [3, 14, 8, 15]
    assert got["back"].dtype == dtypes.INT4 and np.array_equal(got["back"], s)
