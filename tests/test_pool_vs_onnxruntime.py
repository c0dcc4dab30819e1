"""Pooling against onnxruntime over the padding/stride/ceil_mode/count_include_pad grid: the fast padded
kernels must reproduce onnxruntime's window and divisor rules, including ceil_mode windows that overhang."""
import itertools

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import refquant

CASES = [(k, s, p, ceil, cip) for k, s, p, ceil, cip in itertools.product([2, 3], [1, 2], [0, 1], [0, 1], [0, 1])
         if p < k]


@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
@pytest.mark.parametrize("k,s,p,ceil,cip", CASES)
def test_pool_matches_onnxruntime(op, k, s, p, ceil, cip):
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p], ceil_mode=ceil)
    if op == "AveragePool":
        attrs["count_include_pad"] = cip
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 7, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    x = np.random.default_rng(k * 100 + s * 10 + p).standard_normal((2, 3, 7, 8)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = refquant.Session(refquant.load(model)).run({"x": x})["y"]
    assert got.shape == expected.shape
    if op == "MaxPool":
        assert np.array_equal(got, expected)
    else:
        # a sum of at most 9 floats then one division: summation order differs from onnxruntime's by a few ulp
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_max_pool_with_nan_matches_onnxruntime():
    """A NaN sends MaxPool to the exact loop: the result must still be onnxruntime's, NaN where it has one."""
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 7, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    x = np.random.default_rng(5).standard_normal((2, 3, 7, 8)).astype(np.float32)
    x[1, 2, 3, 4] = np.nan
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = refquant.Session(refquant.load(model)).run({"x": x})["y"]
    assert np.array_equal(got, expected, equal_nan=True)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("size,kernel,stride,pads,ceil", [(4, 5, 2, 0, 0), (3, 4, 2, 0, 0), (2, 3, 2, 0, 0),
                                                         (4, 5, 3, 0, 0), (1, 2, 2, 0, 0), (3, 6, 2, 1, 0),
                                                         (3, 6, 2, 1, 1)])
def test_window_larger_than_the_input_gives_onnxruntimes_clipped_window(op, size, kernel, stride, pads, ceil):
    """onnxruntime computes the output size with C++ integer division (toward zero): a window larger than the
    padded input still gives one output over the clipped window, where ONNX's floor formula gives none
    (PP-OCRv5 rec on crops <= 4 px wide, madmom's key CNN on one frame)."""
    attrs = dict(kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pads] * 4, ceil_mode=ceil)
    model = helper.make_model(helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(size * kernel).normal(size=(2, 3, size, size)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = refquant.Session(refquant.load(model)).run({"x": x})["y"]
    assert got.shape == want.shape and want.size > 0
    # max: exact; average: the same window sum in another order (float32), a few ulps at most
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_window_that_cannot_fit_is_an_error_naming_the_node():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y"], name="tiny_pool", kernel_shape=[3, 3])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(refquant.RefquantError, match="tiny_pool.*output size is negative"):
        refquant.Session(refquant.load(model)).run({"x": np.ones((1, 1, 1, 1), np.float32)})
