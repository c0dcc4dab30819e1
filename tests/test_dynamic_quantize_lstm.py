"""com.microsoft DynamicQuantizeLSTM (refquant.ops.quantized_rnn) against onnxruntime 1.32 CPU, bit for bit.

Models are what users have: a float ONNX LSTM built with onnx.helper and passed through onnxruntime's
``quantize_dynamic`` (which turns it into DynamicQuantizeLSTM with int8 weights), loaded with
refquant.load and run with refquant.Session; every output (Y, Y_h, Y_c) must be np.array_equal to
onnxruntime's. uint8 weights (which quantize_dynamic never emits for LSTM) are covered by hand-built nodes.

onnxruntime quantizes the hidden state per group of batch rows, and the groups depend on its intra-op
thread count, so every onnxruntime session here sets intra_op_num_threads and refquant reproduces it with
``set_ort_intra_op_threads``. CPU dependence: the gate activations are MLAS's FMA3 kernels (skipped without
AVX2+FMA, where onnxruntime runs its SSE2 kernels); u8 x s8 products are exact only with VNNI, so on
CPUs without it the weights are quantized with reduce_range (7 bits), which keeps pair sums below int16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import quantize_dynamic

import refquant
from refquant.errors import OpError
from refquant.ops import quantized_rnn as QR
from refquant.ops.registry import registered_ops

from .helpers import cpu_flags

F32 = np.float32
MS = "com.microsoft"
LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)




FLAGS = cpu_flags()
VNNI = bool({"avx512_vnni", "avx_vnni"} & FLAGS)
pytestmark = pytest.mark.skipif(not {"avx2", "fma"} <= FLAGS,
                                reason="onnxruntime runs its SSE2 sigmoid/tanh kernels on this CPU (no AVX2+FMA)")


@pytest.fixture
def ort_threads():
    """refquant's reproduction of onnxruntime's intra-op thread count, set to 1 (as ``_ort``'s default
    sessions) unless the test sets it; restored afterwards."""
    previous = QR.set_ort_intra_op_threads(1)
    yield QR.set_ort_intra_op_threads
    QR.set_ort_intra_op_threads(previous)


# ----------------------------------------------------------------------------------------- harness
def _float_lstm(steps, batch, inputs, hidden, *, direction="forward", seq=False, init=False, peephole=False,
                clip=None, y=True, activations=None, alpha=None, beta=None, input_forget=0, seed=0):
    """A float ONNX LSTM (opset 17) with random weights; returns (model, feed names)."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    inits = {"W": rng.normal(0, 0.5, (dirs, 4 * hidden, inputs)), "R": rng.normal(0, 0.5, (dirs, 4 * hidden, hidden)),
             "B": rng.normal(0, 0.3, (dirs, 8 * hidden))}
    node_inputs = ["X", "W", "R", "B", "", "", "", ""]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [steps, batch, inputs])]
    if seq:
        node_inputs[4] = "L"
        graph_inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, [batch]))
    if init:
        node_inputs[5:7] = ["h0", "c0"]
        graph_inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [dirs, batch, hidden])
                         for name in ("h0", "c0")]
    if peephole:
        node_inputs[7] = "P"
        inits["P"] = rng.normal(0, 0.3, (dirs, 3 * hidden))
    while node_inputs[-1] == "":
        node_inputs.pop()
    attrs = dict(hidden_size=hidden, direction=direction)
    for name, value in (("clip", clip), ("activations", activations), ("activation_alpha", alpha),
                        ("activation_beta", beta)):
        if value is not None:
            attrs[name] = value
    if input_forget:
        attrs["input_forget"] = 1
    outputs = ["Y" if y else "", "Y_h", "Y_c"]
    graph = helper.make_graph(
        [helper.make_node("LSTM", node_inputs, outputs, **attrs)], "lstm", graph_inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs if n],
        [numpy_helper.from_array(np.asarray(a, dtype=F32), n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _quantize(model, tmp_path, name="q.onnx", op_types=("LSTM",), **options) -> Path:
    """onnxruntime's quantize_dynamic; 7-bit weights where u8 x s8 products would saturate (no VNNI)."""
    src, dst = tmp_path / f"float_{name}", tmp_path / name
    onnx.save(model, src)
    quantize_dynamic(src, dst, op_types_to_quantize=list(op_types), reduce_range=not VNNI, **options)
    return dst


def _feeds(model, seed, lens=None) -> dict:
    rng = np.random.default_rng(seed + 1000)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name == "L":
            feeds["L"] = np.asarray(lens, dtype=np.int32) if lens is not None else \
                rng.integers(1, shape[0] + 1, shape).astype(np.int32)
        else:
            feeds[value.name] = rng.normal(0, 1 if value.name == "X" else 0.5, shape).astype(F32)
    return feeds


def _ort(path_or_model, feeds, threads=1, level=LEVELS[0]) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = level
    source = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _refquant(path_or_model, feeds) -> dict:
    return refquant.Session(refquant.load(path_or_model)).run(feeds)


def _op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def _assert_same(expected: dict, got: dict):
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        diff = np.abs(got[name].astype(np.float64) - want).max() if want.size else 0.0
        assert np.array_equal(got[name], want), f"{name}: max |diff| {diff}"


# ----------------------------------------------------------------------------------------- quantize_dynamic models
CASES = {
    # name: (steps, batch, inputs, hidden, options, ort threads, sequence lengths)
    "forward": (5, 3, 6, 8, {}, 1, None),
    "forward_batch1_h32": (12, 1, 10, 32, {}, 1, None),
    "reverse_seq_lens": (7, 4, 6, 8, dict(direction="reverse", seq=True), 1, [7, 2, 5, 1]),
    "bidirectional_all_inputs": (6, 4, 5, 32, dict(direction="bidirectional", seq=True, init=True, peephole=True),
                                 1, [6, 3, 0, 4]),
    "forward_peephole_init": (6, 2, 4, 8, dict(init=True, peephole=True), 1, None),
    "clip": (6, 3, 6, 8, dict(clip=0.5), 1, None),
    "clip_bidirectional": (5, 2, 6, 32, dict(clip=1.25, direction="bidirectional"), 1, None),
    "input_forget": (5, 3, 6, 8, dict(input_forget=1), 1, None),
    "per_channel": (5, 3, 6, 8, dict(per_channel=True, direction="bidirectional"), 1, None),
    "y_omitted_seq_lens": (6, 5, 6, 8, dict(y=False, seq=True), 1, [6, 2, 3, 6, 1]),
    "y_omitted_reverse": (6, 3, 6, 8, dict(y=False, seq=True, direction="reverse"), 1, [2, 6, 4]),
    "two_threads": (5, 6, 6, 8, dict(seq=True), 2, [5, 5, 3, 2, 5, 4]),
    "three_threads_h32": (9, 7, 6, 32, dict(direction="bidirectional"), 3, None),
    "wide_hidden_two_threads": (3, 3, 4, 264, {}, 2, None),  # B <= 4 and H > 256: one row group despite 2 threads
    "activations": (5, 3, 6, 8, dict(activations=["HardSigmoid", "Softsign", "Affine"], alpha=[0.3, 0.7],
                                      beta=[0.4, 0.1]), 1, None),
    "activations_libm": (5, 2, 6, 8, dict(direction="bidirectional", activations=[
        "Sigmoid", "Elu", "Softplus", "LeakyRelu", "ScaledTanh", "Relu"], alpha=[0.9, 0.1, 0.8], beta=[1.3]), 1, None),
    "activations_thresholded": (5, 3, 6, 8, dict(activations=["Sigmoid", "ThresholdedRelu", "Tanh"],
                                                 alpha=[0.2]), 1, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantize_dynamic_lstm_matches_onnxruntime(case, tmp_path, ort_threads):
    steps, batch, inputs, hidden, options, threads, lens = CASES[case]
    options = dict(options)
    per_channel = options.pop("per_channel", False)
    model = _float_lstm(steps, batch, inputs, hidden, seed=len(case), **options)
    path = _quantize(model, tmp_path, per_channel=per_channel)
    assert _op_types(path) == ["DynamicQuantizeLSTM"]
    feeds = _feeds(model, seed=len(case), lens=lens)
    expected = _ort(path, feeds, threads=threads)
    ort_threads(threads)
    _assert_same(expected, _refquant(path, feeds))


def test_zero_sequence_lengths(tmp_path, ort_threads):
    """Every sequence empty: onnxruntime returns zeros without computing anything."""
    model = _float_lstm(4, 2, 3, 8, seq=True, init=True)
    path = _quantize(model, tmp_path)
    feeds = _feeds(model, seed=1, lens=[0, 0])
    expected = _ort(path, feeds)
    assert all(not v.any() for v in expected.values())
    _assert_same(expected, _refquant(path, feeds))


def test_thread_setting_decides_the_hidden_state_groups(tmp_path, ort_threads):
    """onnxruntime quantizes H_{t-1} per group of ceil(B / threads) rows: with 2 threads it differs from 1 thread,
    and only the matching setting reproduces it (so the setting is load-bearing, not decoration)."""
    model = _float_lstm(6, 6, 6, 8, seed=3)
    path = _quantize(model, tmp_path)
    feeds = _feeds(model, seed=3)
    two = _ort(path, feeds, threads=2)
    assert not np.array_equal(two["Y"], _ort(path, feeds, threads=1)["Y"])
    ort_threads(1)
    assert not np.array_equal(_refquant(path, feeds)["Y"], two["Y"])
    ort_threads(2)
    _assert_same(two, _refquant(path, feeds))
    assert QR.row_groups(6, 8, 2) == [slice(0, 3), slice(3, 6)]
    assert QR.row_groups(3, 300, 2) == [slice(0, 3)]  # B <= 4 with H > 256: one group whatever the threads
    assert QR.row_groups(5, 300, 2) == [slice(0, 3), slice(3, 5)]


def test_omitted_y_changes_the_result(tmp_path, ort_threads):
    """With Y omitted onnxruntime quantizes a finished sequence's stale hidden state with the others; a
    kernel that assumed zeros there would differ. Checked on the same weights and inputs both ways."""
    with_y = _float_lstm(6, 3, 6, 8, seq=True, seed=5)
    without_y = _float_lstm(6, 3, 6, 8, seq=True, y=False, seed=5)
    feeds = _feeds(with_y, seed=5, lens=[6, 2, 4])
    got = {}
    for name, model in (("with", with_y), ("without", without_y)):
        path = _quantize(model, tmp_path, name=f"{name}.onnx")
        expected = _ort(path, feeds)
        got[name] = _refquant(path, feeds)
        _assert_same(expected, got[name])
    assert not np.array_equal(got["with"]["Y_h"], got["without"]["Y_h"])


# ----------------------------------------------------------------------------------------- uint8 weights, by hand
def _uint8_node_model(dirs, steps, batch, inputs, hidden, per_column, seed):
    """DynamicQuantizeLSTM with uint8 W/R, transposed layout. Zero points: one per direction ([dirs], they may
    differ), or per column ([dirs, 4H], onnxruntime requires them all equal)."""
    rng = np.random.default_rng(seed)
    n = 4 * hidden
    if per_column:
        w_zp, r_zp = np.full((dirs, n), 121, np.uint8), np.full((dirs, n), 133, np.uint8)
    else:
        w_zp, r_zp = np.array([121, 140][:dirs], np.uint8), np.array([133, 97][:dirs], np.uint8)
    inits = {"W": rng.integers(0, 256, (dirs, inputs, n)).astype(np.uint8),
             "R": rng.integers(0, 256, (dirs, hidden, n)).astype(np.uint8),
             "B": rng.normal(0, 0.3, (dirs, 8 * hidden)).astype(F32),
             "W_scale": rng.uniform(0.002, 0.01, w_zp.shape).astype(F32), "W_zero_point": w_zp,
             "R_scale": rng.uniform(0.002, 0.01, r_zp.shape).astype(F32), "R_zero_point": r_zp}
    inputs_ = ["X", "W", "R", "B", "", "", "", "", "W_scale", "W_zero_point", "R_scale", "R_zero_point"]
    node = helper.make_node("DynamicQuantizeLSTM", inputs_, ["Y", "Y_h", "Y_c"], domain=MS, hidden_size=hidden,
                            direction="bidirectional" if dirs == 2 else "forward")
    graph = helper.make_graph(
        [node], "dqlstm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [steps, batch, inputs])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("Y", "Y_h", "Y_c")],
        [numpy_helper.from_array(a, name) for name, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dirs,per_column", [(1, False), (2, False), (2, True)])
def test_uint8_weights_match_onnxruntime(dirs, per_column, ort_threads):
    model = _uint8_node_model(dirs, 5, 3, 7, 8, per_column, seed=dirs)
    feeds = _feeds(model, seed=dirs)
    _assert_same(_ort(model, feeds), _refquant(model, feeds))


# ----------------------------------------------------------------------------------------- whole model
def test_whole_quantize_dynamic_model(tmp_path, ort_threads):
    """LSTM -> Squeeze -> MatMul -> Add quantized by quantize_dynamic (DynamicQuantizeLSTM, DynamicQuantizeLinear,
    MatMulInteger, Cast, Mul, ...), loaded with refquant.load: every output bit-exact at both optimization levels
    (ORT_ENABLE_ALL fuses the head into DynamicQuantizeMatMul)."""
    rng = np.random.default_rng(11)
    lstm = _float_lstm(6, 4, 5, 16, direction="bidirectional", seed=11)
    graph = lstm.graph
    graph.node.append(helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3]))
    graph.node.append(helper.make_node("Reshape", ["Yt", "shape"], ["flat"]))
    graph.node.append(helper.make_node("MatMul", ["flat", "head"], ["logits_mm"]))
    graph.node.append(helper.make_node("Add", ["logits_mm", "head_bias"], ["logits"]))
    graph.initializer.extend([numpy_helper.from_array(np.array([6, 4, 32], np.int64), "shape"),
                              numpy_helper.from_array(rng.normal(0, 0.3, (32, 10)).astype(F32), "head"),
                              numpy_helper.from_array(rng.normal(0, 0.1, (10,)).astype(F32), "head_bias")])
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    path = _quantize(lstm, tmp_path, op_types=("LSTM", "MatMul"))
    ops = set(_op_types(path))
    assert {"DynamicQuantizeLSTM", "DynamicQuantizeLinear", "MatMulInteger"} <= ops
    feeds = _feeds(lstm, seed=11)
    got = _refquant(path, feeds)
    for level in LEVELS:
        _assert_same(_ort(path, feeds, level=level), got)


def test_registered_and_not_reported_unsupported(tmp_path):
    assert (MS, "DynamicQuantizeLSTM") in registered_ops()
    path = _quantize(_float_lstm(3, 1, 2, 8), tmp_path)
    report = refquant.validate(path)
    assert not [f for f in report.findings if f.code == "unsupported-op"]
    refquant.load(path)  # raises UnsupportedOpError for unregistered ops


# ----------------------------------------------------------------------------------------- building blocks
def _activation_probe(name, alpha, beta, seed=0, hidden=128, batch=64):
    """Pairs (x, act(x)) from onnxruntime's float LSTM, which runs the same gate code (UniDirectionalLstm):
    f = Affine(0, 1) makes i = f = o = 1 and g = Affine(1, 0) makes c~ = the gate input, so with C_0 = 0
    Y_c = C = x and Y = h(x) exactly."""
    rng = np.random.default_rng(seed)
    inputs = 16
    w = rng.normal(0, 2.0, (1, 4 * hidden, inputs)).astype(F32)
    attrs = dict(hidden_size=hidden, activations=["Affine", "Affine", name],
                 activation_alpha=[0.0, 1.0] + ([alpha] if alpha is not None else []),
                 activation_beta=[1.0, 0.0] + ([beta] if beta is not None else []))
    graph = helper.make_graph([helper.make_node("LSTM", ["X", "W", "R"], ["Y", "Y_h", "Y_c"], **attrs)], "probe",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, batch, inputs])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")],
                              [numpy_helper.from_array(w, "W"),
                               numpy_helper.from_array(np.zeros((1, 4 * hidden, hidden), F32), "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = _ort(model, {"X": rng.normal(0, 1, (1, batch, inputs)).astype(F32)})
    return out["Y_c"].ravel(), out["Y"].ravel(), attrs


@pytest.mark.parametrize("name,alpha,beta", [
    ("Sigmoid", None, None), ("Tanh", None, None), ("Relu", None, None), ("Affine", 0.7, 0.1),
    ("LeakyRelu", 0.1, None), ("LeakyRelu", None, None), ("ThresholdedRelu", 0.2, None), ("HardSigmoid", 0.3, 0.4),
    ("HardSigmoid", None, None), ("Softsign", None, None), ("Elu", 0.9, None), ("Softplus", None, None),
    ("ScaledTanh", 0.8, 1.3)])
def test_activation_functions_match_onnxruntime(name, alpha, beta):
    """8192 gate inputs spread over [-30, 30] per activation; Elu, Softplus and ScaledTanh call the C library's
    expf/logf, whose last-bit rounding a float64 evaluation would miss (0.02-0.06 % of arguments)."""
    x, want, attrs = _activation_probe(name, alpha, beta)
    fn = QR._activations(attrs["activations"], attrs["activation_alpha"], attrs["activation_beta"], 1)[0][2]
    got = fn(x)
    assert np.abs(x).max() > 20  # the clamps (tanh +-9, logistic +-18) are exercised
    assert np.array_equal(got, want, equal_nan=True)


def test_mlas_tanh_and_logistic_match_onnxruntime_ops():
    """onnxruntime's Tanh and Sigmoid ops call MlasComputeTanh / MlasComputeLogistic, the LSTM's gate functions."""
    x = np.concatenate([np.linspace(-20, 20, 40001), np.random.default_rng(0).normal(0, 3, 20000)]).astype(F32)
    for op, fn in (("Tanh", QR.mlas_tanh), ("Sigmoid", QR.mlas_sigmoid)):
        graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], op,
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        want = _ort(model, {"x": x})["y"]
        assert np.array_equal(fn(x), want), op
    assert not np.array_equal(QR.mlas_tanh(x), np.tanh(x))  # the approximation is not libm's tanh


# ----------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_naming_the_node(ort_threads):
    model = _uint8_node_model(1, 3, 2, 4, 8, per_column=True, seed=0)
    zp = next(i for i in model.graph.initializer if i.name == "W_zero_point")
    values = numpy_helper.to_array(zp).copy()
    values[0, 5] += 1  # per-column zero points must be equal (onnxruntime: "Weight point must be constant")
    zp.CopyFrom(numpy_helper.from_array(values, "W_zero_point"))
    with pytest.raises(OpError, match="DynamicQuantizeLSTM.*W_zero_point must be the same"):
        _refquant(model, _feeds(model, seed=0))
    with pytest.raises(ValueError, match="intra-op threads"):
        QR.set_ort_intra_op_threads(0)


def test_default_setting_reproduces_a_default_onnxruntime_session(tmp_path):
    """A user comparing with ``ort.InferenceSession(path)`` (no options) gets identical outputs: refquant's
    default is onnxruntime's default thread count (one per physical core)."""
    assert QR.ORT_INTRA_OP_THREADS == QR.physical_cores() >= 1
    model = _float_lstm(5, 6, 6, 8, seed=5)  # batch 6 with H <= 256: grouped by threads whenever threads >= 2
    path = _quantize(model, tmp_path)
    feeds = _feeds(model, seed=5)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    _assert_same(dict(zip(names, session.run(names, feeds))), _refquant(path, feeds))
