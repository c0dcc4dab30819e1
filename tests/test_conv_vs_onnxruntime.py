"""Conv against onnxruntime over the paths the kernel takes (depthwise 3x3 at strides 1, 2 and 3, generic
depthwise with dilation and channel multiplier, 1-D depthwise, grouped and dense im2col, 1x1 with stride, one
large image cut into row bands, a batch-1 GEMM split by rows, blocks of small images per call) at one and
two threads: the threaded split must not change a result."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import refquant

# (x shape, weight shape, group, attributes)
CASES = {
    "dw3x3_s1": ((3, 8, 9, 11), (8, 1, 3, 3), 8, dict(pads=[1, 1, 1, 1])),
    "dw3x3_s2_asym": ((2, 6, 10, 9), (6, 1, 3, 3), 6, dict(pads=[0, 1, 1, 0], strides=[2, 2])),
    "dw3x3_s2_same_upper": ((1, 4, 7, 7), (4, 1, 3, 3), 4, dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "dw3x3_s3_crop": ((2, 5, 12, 13), (5, 1, 3, 3), 5, dict(strides=[3, 3])),
    "dw5x5_dilated": ((2, 4, 13, 12), (4, 1, 5, 5), 4, dict(pads=[4, 3, 4, 2], dilations=[2, 2])),
    "dw_multiplier2": ((2, 3, 8, 8), (6, 1, 3, 3), 3, dict(pads=[1, 1, 1, 1], strides=[1, 2])),
    "dw_1d": ((2, 6, 17), (6, 1, 5), 6, dict(pads=[2, 2])),
    "grouped3": ((2, 6, 7, 7), (9, 2, 3, 3), 3, dict(pads=[1, 1, 1, 1])),
    "grouped_1x1": ((4, 12, 5, 5), (12, 4, 1, 1), 3, {}),
    "dense_s2": ((3, 5, 11, 10), (7, 5, 3, 3), 1, dict(pads=[1, 0, 1, 2], strides=[2, 2])),
    "dense_1x1_s2": ((2, 8, 9, 9), (16, 8, 1, 1), 1, dict(strides=[2, 2])),
    "dense_big_image_bands": ((1, 16, 96, 96), (8, 16, 3, 3), 1, dict(pads=[1, 1, 1, 1])),
    # batch 1, more output channels than pixels: at two threads one GEMM split by rows of the weights
    "dense_batch1_channel_heavy": ((1, 32, 7, 7), (96, 32, 3, 3), 1, dict(pads=[1, 1, 1, 1])),
    # several small images per pointwise GEMM call and per depthwise kernel call
    "pointwise_image_blocks": ((6, 8, 4, 5), (10, 8, 1, 1), 1, {}),
    "dw3x3_image_blocks": ((5, 6, 6, 6), (6, 1, 3, 3), 6, dict(pads=[1, 1, 1, 1], strides=[2, 2])),
}


def _model(x_shape, w, b, group, attrs):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_matches_onnxruntime_at_one_and_two_threads(case):
    x_shape, w_shape, group, attrs = CASES[case]
    rng = np.random.default_rng(len(case))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    model = _model(x_shape, w, b, group, attrs)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    graph = refquant.load(model)
    one = refquant.Session(graph, threads=1).run({"x": x})["y"]
    two = refquant.Session(graph, threads=2).run({"x": x})["y"]
    assert one.shape == expected.shape
    # float32 sums of at most 144 products in another order than onnxruntime's: a few ulp of the
    # largest partial sums, i.e. ~1e-5 of the output's range
    scale = np.abs(expected).max()
    np.testing.assert_allclose(one, expected, rtol=0, atol=2e-6 * scale)
    if "dw" in case:  # the direct loops compute each element the same way whatever the split
        assert np.array_equal(one, two)
    else:  # BLAS blocks may round differently by an ulp
        np.testing.assert_allclose(two, expected, rtol=0, atol=2e-6 * scale)
