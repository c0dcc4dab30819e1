"""onnxruntime's float contrib ops (com.microsoft, and its default-domain SimplifiedLayerNormalization and
pre-17 LayerNormalization) against onnxruntime, on one-node models built with onnx.helper.

The Gelu family is compared bit for bit (np.array_equal, NaN where onnxruntime gives NaN) on 2^18 normal
values and the special values; the rest with tolerances stated at each test. BiasAdd has no CPU kernel
in onnxruntime: it is checked on a hand-computed example. com.microsoft Attention and MultiHeadAttention are
compared over onnxruntime's CPU mask formats, past state, attention bias and causal masking; packed
QKV / KV inputs (which onnxruntime's CPU kernel refuses) against onnxruntime on the unpacked tensors.
QuantSim treats these ops as ordinary float ops.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import refquant
from refquant.quant import QuantSim

MS = "com.microsoft"
RNG = np.random.default_rng(11)
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30, 1e-40, -1e-40, 3.0, -3.0, 9.5, -9.5,
                    20.0, -20.0, 100.0, -100.0, 3e38, -3e38], np.float32)


def _model(op, inputs, attrs=None, domain=MS, nout=1, opset=17):
    names = [f"in{k}" if a is not None else "" for k, a in enumerate(inputs)]
    node = helper.make_node(op, names, [f"out{k}" for k in range(nout)], domain=domain, name=f"{op}_node",
                            **(attrs or {}))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
         for n, a in zip(names, inputs) if n],
        [helper.make_tensor_value_info(f"out{k}", TensorProto.FLOAT, None) for k in range(nout)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model, {n: a for n, a in zip(names, inputs) if n}


def _both(op, inputs, attrs=None, domain=MS, nout=1, opset=17):
    """(refquant's outputs, onnxruntime's outputs) of one node; onnxruntime with graph optimizations off."""
    model, feeds = _model(op, inputs, attrs, domain, nout, opset)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = refquant.Session(refquant.load(model)).run(feeds)
    return [np.asarray(got[f"out{k}"]) for k in range(nout)], want


def _values(width=1024):
    x = (RNG.standard_normal((256, width)) * 4).astype(np.float32)
    x.reshape(-1)[: SPECIAL.size] = SPECIAL
    return x


@pytest.mark.parametrize("op,with_bias,attrs", [
    ("Gelu", False, {}), ("BiasGelu", True, {}), ("FastGelu", False, {}), ("FastGelu", True, {}),
    ("QuickGelu", False, {}), ("QuickGelu", False, {"alpha": 1.0}),
])
def test_gelu_family_is_bit_exact(op, with_bias, attrs):
    x = _values()
    inputs = [x, (RNG.standard_normal(x.shape[-1]) * 2).astype(np.float32)] if with_bias else [x]
    with np.errstate(all="ignore"):
        (got,), (want,) = _both(op, inputs, attrs)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True)


def _skip_inputs(hidden=768):
    x = (RNG.standard_normal((2, 7, hidden)) * 2).astype(np.float32)
    skip = RNG.standard_normal((2, 7, hidden)).astype(np.float32)
    gamma, beta, bias = (RNG.standard_normal(hidden).astype(np.float32) for _ in range(3))
    return x, skip, gamma, beta, bias


def _close_all(got, want, rtol, atol):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.shape, w.shape)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("with_beta,with_bias", [(True, True), (False, False), (True, False)])
def test_skip_layer_normalization(with_beta, with_bias):
    x, skip, gamma, beta, bias = _skip_inputs()
    inputs = [x, skip, gamma, beta if with_beta else None, bias if with_bias else None]
    while inputs[-1] is None:
        inputs.pop()
    got, want = _both("SkipLayerNormalization", inputs, {"epsilon": 1e-5}, nout=4)
    # the sum x + skip + bias is the same float32 sequence of adds: exact
    assert np.array_equal(got[3], want[3])
    # onnxruntime sums the 768 statistics terms in float32 in its own order; refquant in float64, rounded
    # once: mean / inv_std agree to ~1e-6 relative, outputs (|y| up to ~15) to a few 1e-6
    _close_all(got[:3], want[:3], rtol=1e-5, atol=1e-5)


def test_skip_simplified_layer_normalization():
    x, skip, gamma, _, bias = _skip_inputs()
    for inputs in ([x, skip, gamma, bias], [x, skip, gamma]):
        got, want = _both("SkipSimplifiedLayerNormalization", inputs, {"epsilon": 1e-5}, nout=4)
        assert np.array_equal(got[3], want[3])
        assert not got[1].any() and not want[1].any()  # the RMS form's mean output is zeros in both
        _close_all(got[:3], want[:3], rtol=1e-5, atol=1e-5)  # statistics order, as above


@pytest.mark.parametrize("variant", ["segments_and_mask", "words_only", "position_ids"])
def test_embed_layer_normalization(variant):
    batch, seq, hidden, vocab = 2, 7, 32, 50
    ids = RNG.integers(0, vocab, (batch, seq)).astype(np.int32)
    segments = RNG.integers(0, 2, (batch, seq)).astype(np.int32)
    words, positions, segment_table = (RNG.standard_normal(shape).astype(np.float32)
                                       for shape in ((vocab, hidden), (16, hidden), (2, hidden)))
    gamma, beta = (RNG.standard_normal(hidden).astype(np.float32) for _ in range(2))
    mask = np.array([[1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
    inputs = {"segments_and_mask": [ids, segments, words, positions, segment_table, gamma, beta, mask],
              "words_only": [ids, None, words, positions, None, gamma, beta],
              "position_ids": [ids, segments, words, positions, segment_table, gamma, beta, mask,
                               RNG.integers(0, 16, (1, seq)).astype(np.int32)]}[variant]
    model, feeds = _model("EmbedLayerNormalization", inputs, {"epsilon": 1e-5}, nout=3)
    model.graph.output[1].type.tensor_type.elem_type = TensorProto.INT32
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = refquant.Session(refquant.load(model)).run(feeds)
    assert np.array_equal(got["out1"], want[1])  # mask_index: how many mask values are 1 (4 and 7 here)
    assert np.array_equal(got["out2"], want[2])  # embedding_sum: the same float32 adds
    np.testing.assert_allclose(got["out0"], want[0], rtol=1e-5, atol=1e-5)  # LayerNorm statistics order


def test_simplified_layer_normalization_default_domain():
    x = (RNG.standard_normal((2, 7, 768)) * 2).astype(np.float32)
    scale = RNG.standard_normal(768).astype(np.float32)
    got, want = _both("SimplifiedLayerNormalization", [x, scale], {"epsilon": 1e-5}, domain="", nout=2)
    _close_all(got, want, rtol=1e-5, atol=1e-5)  # mean of squares summed in a different order


def test_layer_normalization_below_opset_17():
    x = (RNG.standard_normal((2, 7, 64)) * 2).astype(np.float32)
    scale, bias = (RNG.standard_normal(64).astype(np.float32) for _ in range(2))
    got, want = _both("LayerNormalization", [x, scale, bias], {"epsilon": 1e-5}, domain="", opset=13)
    _close_all(got, want, rtol=1e-5, atol=1e-5)  # statistics summed in a different order


@pytest.mark.parametrize("trans_a,trans_b,batch_a,batch_b,shape_a,shape_b", [
    (0, 0, 0, 0, (3, 4, 5, 6), (3, 4, 6, 7)), (1, 1, 0, 0, (3, 4, 6, 5), (3, 4, 7, 6)),
    (0, 0, 1, 0, (5, 3, 4, 6), (3, 4, 6, 7)), (0, 0, 0, 1, (3, 4, 5, 6), (6, 3, 4, 7)),
    (1, 0, 1, 0, (6, 3, 4, 5), (3, 4, 6, 7)), (0, 1, 1, 1, (5, 3, 6), (7, 3, 6)), (0, 0, 0, 0, (5, 6), (6,)),
])
def test_fused_matmul(trans_a, trans_b, batch_a, batch_b, shape_a, shape_b):
    a = RNG.standard_normal(shape_a).astype(np.float32)
    b = RNG.standard_normal(shape_b).astype(np.float32)
    got, want = _both("FusedMatMul", [a, b], dict(alpha=0.5, transA=trans_a, transB=trans_b, transBatchA=batch_a,
                                                   transBatchB=batch_b))
    _close_all(got, want, rtol=1e-6, atol=1e-6)  # 6-term float32 dot products; BLAS may order them differently


@pytest.mark.parametrize("activation,params", [
    ("Relu", {}), ("Tanh", {}), ("Sigmoid", {}), ("LeakyRelu", {"activation_alpha": 0.2}),
    ("HardSigmoid", {"activation_alpha": 0.3, "activation_beta": 0.4}), ("Elu", {"activation_alpha": 0.7}),
    ("Selu", {"activation_alpha": 1.5, "activation_gamma": 1.1}), ("Softplus", {}), ("Softsign", {}),
])
def test_fused_gemm(activation, params):
    a = RNG.standard_normal((4, 8)).astype(np.float32)
    b = RNG.standard_normal((5, 8)).astype(np.float32)
    c = RNG.standard_normal(5).astype(np.float32)
    got, want = _both("FusedGemm", [a, b, c], dict(transB=1, alpha=0.7, beta=0.5, activation=activation, **params))
    _close_all(got, want, rtol=1e-6, atol=1e-6)  # 8-term dot products in another order, then the activation


@pytest.mark.parametrize("activation,params", [
    ("Relu", None), ("Tanh", None), ("Sigmoid", None), ("LeakyRelu", [0.1]), ("Clip", [-0.5, 0.7]),
    ("HardSigmoid", [0.3, 0.4]),
])
def test_fused_conv(activation, params):
    x = RNG.standard_normal((1, 3, 9, 9)).astype(np.float32)
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(4).astype(np.float32)
    z = RNG.standard_normal((1, 4, 9, 9)).astype(np.float32)
    attrs = {"activation": activation, "pads": [1, 1, 1, 1]}
    if params:
        attrs["activation_params"] = params
    got, want = _both("FusedConv", [x, w, b, z], attrs)
    _close_all(got, want, rtol=1e-5, atol=2e-6)  # 27-term conv sums in a different float32 order


BATCH, SEQ, HIDDEN, HEADS = 2, 5, 16, 4
ATTN_MASKS = {
    "none": None,
    "key_lengths": np.array([3, 5], np.int32),
    "end_and_start": np.array([5, 4, 1, 0], np.int32),  # query 0 of batch 0 sees only a padded key causally
    "raw_2d": np.array([[0, 1, 1, 0, 1], [1, 1, 0, 1, 1]], np.int32),
    "raw_3d": (RNG.uniform(size=(BATCH, SEQ, SEQ)) > 0.3).astype(np.int32),
}


@pytest.mark.parametrize("mask", list(ATTN_MASKS))
@pytest.mark.parametrize("unidirectional", [0, 1])
def test_ms_attention(mask, unidirectional):
    x = RNG.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    weights = (RNG.standard_normal((HIDDEN, 3 * HIDDEN)) * 0.3).astype(np.float32)
    bias = RNG.standard_normal(3 * HIDDEN).astype(np.float32)
    inputs = [x, weights, bias, ATTN_MASKS[mask]]
    while inputs[-1] is None:
        inputs.pop()
    got, want = _both("Attention", inputs, {"num_heads": HEADS, "unidirectional": unidirectional,
                                            "mask_filter_value": -5.0})
    _close_all(got, want, rtol=1e-5, atol=1e-5)  # 16-term projections and softmax sums in another order


def test_ms_attention_past_bias_and_uneven_sizes():
    x = RNG.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    weights = (RNG.standard_normal((HIDDEN, 3 * HIDDEN)) * 0.3).astype(np.float32)
    bias = RNG.standard_normal(3 * HIDDEN).astype(np.float32)
    past = RNG.standard_normal((2, BATCH, HEADS, 3, HIDDEN // HEADS)).astype(np.float32)
    got, want = _both("Attention", [x, weights, bias, None, past], {"num_heads": HEADS, "unidirectional": 1}, nout=2)
    _close_all(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got[1][:, :, :, :3], past)  # present starts with the past, unchanged
    attention_bias = RNG.standard_normal((BATCH, HEADS, SEQ, SEQ)).astype(np.float32)
    got, want = _both("Attention", [x, weights, bias, None, None, attention_bias], {"num_heads": HEADS})
    _close_all(got, want, rtol=1e-5, atol=1e-5)
    weights = RNG.standard_normal((HIDDEN, 2 * HIDDEN + 8)).astype(np.float32)
    bias = RNG.standard_normal(2 * HIDDEN + 8).astype(np.float32)
    got, want = _both("Attention", [x, weights, bias], {"num_heads": HEADS, "qkv_hidden_sizes": [HIDDEN, HIDDEN, 8],
                                                         "scale": 0.2})
    _close_all(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", ["none", "key_lengths", "raw_2d"])
def test_multi_head_attention(mask):
    q = RNG.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    k = RNG.standard_normal((BATCH, 6, HIDDEN)).astype(np.float32)
    v = RNG.standard_normal((BATCH, 6, HIDDEN)).astype(np.float32)
    bias = RNG.standard_normal(3 * HIDDEN).astype(np.float32)
    masks = {"none": None, "key_lengths": np.array([4, 6], np.int32),
             "raw_2d": np.array([[1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 0]], np.int32)}
    attention_bias = RNG.standard_normal((1, HEADS, SEQ, 6)).astype(np.float32)
    got, want = _both("MultiHeadAttention", [q, k, v, bias, masks[mask], attention_bias], {"num_heads": HEADS},
                      nout=4)
    _close_all(got[:3], want[:3], rtol=1e-5, atol=1e-5)
    # qk (scores before the softmax) holds mask values of -10000, where one float32 ulp is 1e-3 and the
    # additions happen in another order
    _close_all(got[3:], want[3:], rtol=1e-5, atol=2e-3)


def test_multi_head_attention_past_causal_and_per_head_inputs():
    q = RNG.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    past_key, past_value = (RNG.standard_normal((BATCH, HEADS, 3, HIDDEN // HEADS)).astype(np.float32)
                            for _ in range(2))
    got, want = _both("MultiHeadAttention", [q, q * 0.5, q * 2.0, None, None, None, past_key, past_value],
                      {"num_heads": HEADS, "unidirectional": 1}, nout=4)
    _close_all(got, want, rtol=1e-5, atol=1e-5)  # qk: causally hidden keys are the lowest float in both
    k = RNG.standard_normal((BATCH, HEADS, 6, HIDDEN // HEADS)).astype(np.float32)
    v = RNG.standard_normal((BATCH, HEADS, 6, HIDDEN // HEADS)).astype(np.float32)
    got, want = _both("MultiHeadAttention", [q, k, v], {"num_heads": HEADS, "scale": 0.3})
    _close_all(got, want, rtol=1e-5, atol=1e-5)


def test_multi_head_attention_packed_inputs_equal_onnxruntime_unpacked():
    # onnxruntime's CPU kernel refuses packed QKV / KV; their layout [B, S, N, 3|2, H] is checked against
    # onnxruntime on the same tensors unpacked to [B, S, N*H]
    q = RNG.standard_normal((BATCH, SEQ, HEADS, HIDDEN // HEADS)).astype(np.float32)
    k, v = (RNG.standard_normal((BATCH, SEQ, HEADS, HIDDEN // HEADS)).astype(np.float32) for _ in range(2))
    flat = [t.reshape(BATCH, SEQ, HIDDEN) for t in (q, k, v)]
    _, want = _both("MultiHeadAttention", flat, {"num_heads": HEADS})
    for inputs in ([np.stack([q, k, v], axis=3)], [flat[0], np.stack([k, v], axis=3)]):
        model, feeds = _model("MultiHeadAttention", inputs, {"num_heads": HEADS})
        got = refquant.Session(refquant.load(model)).run(feeds)["out0"]
        np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-5)


def test_bias_add_by_hand():
    # onnxruntime has no CPU BiasAdd kernel; y = x + bias + skip written out
    x = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)
    bias = np.array([0.5, -1.0], np.float32)
    skip = np.array([[[10.0, 20.0], [30.0, 40.0]]], np.float32)
    model, feeds = _model("BiasAdd", [x, bias, skip])
    got = refquant.Session(refquant.load(model)).run(feeds)["out0"]
    assert np.array_equal(got, np.array([[[11.5, 21.0], [33.5, 43.0]]], np.float32))


def test_an_unsupported_fused_conv_activation_names_the_node():
    x = np.zeros((1, 1, 3, 3), np.float32)
    w = np.zeros((1, 1, 1, 1), np.float32)
    model, feeds = _model("FusedConv", [x, w], {"activation": "Softsign"})
    with pytest.raises(refquant.errors.RefquantError, match="FusedConv_node"):
        refquant.Session(refquant.load(model)).run(feeds)


def _fused_by_onnxruntime(model, tmp_path):
    """The model as onnxruntime's own graph optimizer (level EXTENDED) rewrites it, with its contrib ops."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def test_models_fused_by_onnxruntime_run_as_onnxruntime(tmp_path):
    hidden, init = 32, numpy_helper.from_array
    nodes = [  # x W1 + b1 -> Gelu (erf form) -> W2 + b2 -> + x -> LayerNorm -> (LN^T LN) * 0.125
        helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Div", ["a1", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["a1", "e1"], ["g0"]),
        helper.make_node("Mul", ["g0", "half"], ["g"]), helper.make_node("MatMul", ["g", "W2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["a2"]), helper.make_node("Add", ["a2", "x"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["ln"], epsilon=1e-5),
        helper.make_node("Transpose", ["ln"], ["lt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["lt", "ln"], ["mm"]),
        helper.make_node("Mul", ["mm", "scale"], ["y"]),
        helper.make_node("Conv", ["img", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "cw2"], ["c2"]), helper.make_node("Sigmoid", ["c2"], ["z"]),
    ]
    weights = {"W1": (hidden, 4 * hidden), "b1": (4 * hidden,), "W2": (4 * hidden, hidden), "b2": (hidden,),
               "gamma": (hidden,), "beta": (hidden,), "cw": (4, 3, 3, 3), "cb": (4,), "cw2": (2, 4, 1, 1)}
    constants = {"sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5, "scale": 0.125}
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, hidden]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [init((RNG.standard_normal(shape) * 0.2).astype(np.float32), name) for name, shape in weights.items()]
        + [init(np.array(v, np.float32), name) for name, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fused = _fused_by_onnxruntime(model, tmp_path)
    contrib = {n.op_type for n in fused.graph.node if n.domain == MS}
    assert contrib >= {"Gelu", "SkipLayerNormalization", "FusedMatMul", "FusedConv"}, contrib  # onnxruntime 1.32
    feeds = {"x": RNG.standard_normal((2, 6, hidden)).astype(np.float32),
             "img": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(fused.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        ["y", "z"], feeds)
    got = refquant.Session(refquant.load(fused)).run(feeds)
    # GEMMs of 128 terms and LayerNorm statistics in a different float32 order; |y| up to ~20
    np.testing.assert_allclose(got["y"], want[0], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(got["z"], want[1], rtol=1e-5, atol=1e-6)


def test_quantsim_treats_contrib_and_new_ops_as_float_ops():
    rng = np.random.default_rng(5)  # its own data: the assertions below hold for this seed's model
    init = numpy_helper.from_array
    nodes = [
        helper.make_node("FusedConv", ["x", "W", "B"], ["c"], domain=MS, activation="Relu", pads=[1, 1, 1, 1]),
        helper.make_node("GridSample", ["c", "grid"], ["g"]),
        helper.make_node("LpPool", ["g"], ["p"], kernel_shape=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        helper.make_node("FastGelu", ["t"], ["fg"], domain=MS),
        helper.make_node("SkipLayerNormalization", ["fg", "t", "gamma", "beta"], ["sl"], domain=MS, epsilon=1e-5),
        helper.make_node("RMSNormalization", ["sl", "gamma"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 25, 8])], [
        init((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "W"),
        init((rng.standard_normal(8) * 0.1).astype(np.float32), "B"),
        init(rng.uniform(-1, 1, (1, 6, 6, 2)).astype(np.float32), "grid"),
        init(np.ones(8, np.float32), "gamma"), init(np.zeros(8, np.float32), "beta"),
        init(np.array([1, 8, 25], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    sim = QuantSim(refquant.load(model), precision="w8a8")
    data = [{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(4)]
    sim.compute_encodings(data, progress=False)
    quantizers = sim.quantizers
    assert quantizers["W"].kind == "param" and quantizers["W"].enabled
    for tensor in ("c", "g", "p", "fg", "sl", "y"):  # every float op output has its activation quantizer
        assert quantizers[tensor].enabled, tensor
    quantized, reference = sim.run(data[0])["y"], sim.run_float(data[0])["y"]
    error = np.abs(quantized - reference).max()
    # quantization is applied (the output moves) but stays within a few 8-bit steps of the float output
    assert 0 < error < 0.1 * np.abs(reference).max()
    # the exported QDQ model (contrib ops included) runs in onnxruntime as in the simulation: float32 rounding
    # may differ in order, so at most one output quantization step apart
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    exported = ort.InferenceSession(sim.to_onnx_qdq().SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(["y"], data[0])[0]
    step = sim.encoding_of("y").scale
    assert np.abs(exported - quantized).max() <= step * 1.001
