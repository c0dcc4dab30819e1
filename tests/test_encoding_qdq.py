"""Encodings (AIMET's getComputedEncodings) and the QDQ kernels (onnxruntime's QuantizeLinear ->
DequantizeLinear bit for bit; AIMET's half-up simulation on ties)."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from refquant.quant.encoding import (MIN_SCALE, EncodingError, bias_encoding, check_bitwidth, from_min_max,
                                     from_onnx)
from refquant.quant.qdq import quantize, quantize_dequantize

# (min, max, bw, symmetric, strict, unsigned_symmetric) -> (scale, offset): values measured on
# aimet-onnx 2.42.0 and written in refs/aimet.md §5.1
AIMET_MEASURED = [
    ((-1, 3, 8, False, False, False), (4 / 255, -64)),
    ((-1, 3, 8, True, False, False), (3 / 127, -128)),
    ((-3, 1, 8, True, False, False), (0.0234375, -128)),
    ((-3, 1, 8, True, True, False), (3 / 127, -127)),
    ((0, 2, 8, True, False, True), (2 / 255, 0)),
    ((-1, 2, 8, True, False, True), (2 / 127, -128)),
    ((-3, 1, 4, True, False, False), (0.375, -8)),
    ((-1, 3, 4, False, False, False), (4 / 15, -4)),
    ((0, 0, 8, False, False, False), (2.0 ** -23, 0)),
    ((0, 1e-4, 8, False, False, False), (1e-4 / 255, 0)),
    ((-5, -1, 8, False, False, False), (5 / 255, -255)),
    ((0.5, 2, 8, False, False, False), (2 / 255, 0)),  # all-positive data: min forced to 0
]


@pytest.mark.parametrize("args,expected", AIMET_MEASURED)
def test_from_min_max_matches_aimet(args, expected):
    lo, hi, bw, sym, strict, unsigned = args
    enc = from_min_max(lo, hi, bw, sym, strict_symmetric=strict, unsigned_symmetric=unsigned)
    # AIMET stores symmetric scales as float32, asymmetric ones in double
    signed_grid = sym and not (unsigned and lo >= 0)
    assert enc.scale == (float(np.float32(expected[0])) if signed_grid else pytest.approx(expected[0], rel=1e-15))
    assert enc.offset == expected[1]
    assert enc.min <= 0 <= enc.max


def test_asymmetric_range_is_recomputed_from_scale_and_offset():
    enc = from_min_max(-1.0, 3.0, 8, False)
    # refs/aimet.md: asym [-1, 3] -> min -1.00392, max 2.99608
    assert enc.min == pytest.approx(-1.00392, abs=1e-5) and enc.max == pytest.approx(2.99608, abs=1e-5)


def test_per_channel_is_elementwise_and_all_zero_channel_gets_min_scale():
    enc = from_min_max(np.array([-1.0, 0.0, -3.0]), np.array([3.0, 0.0, 1.0]), 8, True, axis=0)
    assert np.array_equal(enc.scale, np.float32([3 / 127, MIN_SCALE, 3 / 128]))
    assert np.array_equal(enc.offset, [-128, -128, -128])


@pytest.mark.parametrize("bw", [1, 17, 0, 3.5])
def test_bitwidth_outside_range_is_an_error(bw):
    with pytest.raises(EncodingError, match="outside 2..16"):
        check_bitwidth(bw, where="conv.weight")


def test_onnx_conversion_round_trips():
    asym = from_min_max(-1.0, 3.0, 8, False)
    scale, zp, name = asym.to_onnx()
    assert name == "uint8" and zp == 64 and scale.dtype == np.float32
    sym = from_min_max(-1.0, 3.0, 8, True)
    scale, zp, name = sym.to_onnx()
    assert name == "int8" and zp == 0
    back = from_onnx(scale, zp, name)
    assert back.offset == -128 and back.symmetric
    scale, zp, name = asym.to_onnx(signed=True)
    assert name == "int8" and zp == 64 - 128
    assert from_onnx(scale, zp, name).offset == -64
    bias = bias_encoding(0.5, np.array([0.25, 0.125]))
    assert np.array_equal(bias.scale, [0.125, 0.0625]) and bias.to_onnx()[2] == "int32"


def _ort_qdq(x, scale, zp, type_name, axis=None, block_size=None):
    """onnxruntime's QuantizeLinear -> DequantizeLinear at opset 21."""
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(zp.dtype)) if type_name in ("int8", "uint8", "int16",
                                                                                       "uint16") else \
        {"int4": TensorProto.INT4, "uint4": TensorProto.UINT4}[type_name]
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size is not None:
        attrs["block_size"] = block_size
    zp_tensor = helper.make_tensor("zp", onnx_type, zp.shape, zp.ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
        [numpy_helper.from_array(scale, "s"), zp_tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("bw,sym", [(8, False), (8, True), (16, False), (16, True), (4, True), (4, False)])
def test_per_tensor_matches_onnxruntime_bit_for_bit(bw, sym):
    rng = np.random.default_rng(bw)
    x = (rng.standard_normal((4, 3, 17, 19)) * 2).astype(np.float32)
    x.flat[:7] = [40.0, -40.0, 0.0, 0.5, -0.5, 1e-30, -1e-30]  # saturation and near-zero
    enc = from_min_max(-2.5, 3.1, bw, sym)
    scale, zp, name = enc.to_onnx()
    expected = _ort_qdq(x, scale, zp, name)
    assert np.array_equal(quantize_dequantize(x, enc), expected)


def test_ties_half_even_is_onnxruntime_and_half_up_is_aimet():
    # refs/aimet.md §5.3: scale 0.25, offset -128
    enc = from_min_max(-32.0, 31.75, 8, True)
    assert enc.scale == 0.25 and enc.offset == -128
    x = np.array([-0.375, 0.125, 0.625, 1.125, 40.0, -40.0], dtype=np.float32)
    assert np.array_equal(quantize_dequantize(x, enc, "half_up"), [-0.25, 0.25, 0.75, 1.25, 31.75, -32.0])
    assert np.array_equal(quantize_dequantize(x, enc, "half_even"), [-0.5, 0.0, 0.5, 1.0, 31.75, -32.0])
    scale, zp, name = enc.to_onnx()
    assert np.array_equal(_ort_qdq(x, scale, zp, name), [-0.5, 0.0, 0.5, 1.0, 31.75, -32.0])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_matches_onnxruntime(axis):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 5, 3, 3)) * rng.uniform(0.1, 4, 5)[None, :, None, None]).astype(np.float32)
    channels = x.shape[axis]
    moved = np.moveaxis(x, axis, 0).reshape(channels, -1)
    enc = from_min_max(moved.min(1), moved.max(1), 8, True, axis=axis)
    scale, zp, name = enc.to_onnx()
    assert np.array_equal(quantize_dequantize(x, enc), _ort_qdq(x, scale, zp, name, axis=axis % 4))


def test_per_block_matches_onnxruntime():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 70)).astype(np.float32)  # 70 = 2 blocks of 32 + a partial block of 6
    blocks = [x[:, i:i + 32] for i in range(0, 70, 32)]
    lo = np.stack([b.min(1) for b in blocks], 1)
    hi = np.stack([b.max(1) for b in blocks], 1)
    enc = from_min_max(lo, hi, 4, True, axis=1, block_size=32)
    scale, zp, name = enc.to_onnx()
    assert scale.shape == (8, 3)
    assert np.array_equal(quantize_dequantize(x, enc), _ort_qdq(x, scale, zp, name, axis=1, block_size=32))


def test_quantize_codes_stay_on_the_grid():
    enc = from_min_max(-1.0, 3.0, 4, False)
    codes = quantize(np.linspace(-5, 5, 101, dtype=np.float32), enc)
    assert codes.min() == 0 and codes.max() == 15
    # code 0 is offset -4: -4 * 4/15
    assert quantize(np.float32([0.0]), enc)[0] == 4


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_fp16_is_a_cast():
    x = np.array([1.0 + 2 ** -12, 65520.0, 1e-8], dtype=np.float32)
    from refquant.quant.encoding import fp16_encoding
    y = quantize_dequantize(x, fp16_encoding())
    assert np.array_equal(y, x.astype(np.float16).astype(np.float32))
    assert y[0] == 1.0 and np.isinf(y[1])
