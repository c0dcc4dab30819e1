"""IntSim: a calibrated QuantSim lowered to an integer program (refquant.intsim.lowering), run by refquant and,
exported as a QOperator ONNX model, by onnxruntime: the two must agree bit for bit on every output, at
ORT_DISABLE_ALL and at onnxruntime's default optimization level. Also: the fused QLinearConv kernel against the
reference kernel, the lowering's errors and float fallback, the other requantization schemes, and the
QDQ-simulation-vs-integer gap report."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import refquant
from refquant.errors import RefquantError
from refquant.intsim import requant as R
from refquant.intsim.fastops import qlinear_conv as fast_qlinear_conv
from refquant.intsim.lowering import LoweringError
from refquant.intsim.program import IntSim, qdq_gap, sqnr
from refquant.ops import qoperators as Q
from refquant.quant import QuantSim
from refquant.quant.config import load_config
from refquant.quant.encoding import from_min_max

from .helpers import exact_ort_session

SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
SAMPLES = SHARED / "refs" / "aimet_samples"
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet.onnx"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "china.jpg", "flower.jpg",
          "motorcycle_left.png", "horse.png"]
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"AIMET samples not found at {SAMPLES}")
F32 = np.float32
LEVELS = {"disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


# ----------------------------------------------------------------------------------------- harness
def ort_sessions(path):
    sessions = {}
    for name, level in LEVELS.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        sessions[name] = exact_ort_session(path, options)
    return sessions


def assert_bit_exact(isim, batches, tmp_path, name="model_int.onnx") -> int:
    """Export the program, run onnxruntime at both levels on every batch and require np.array_equal with
    refquant on every output (float values, and the codes they are dequantized from); returns the number of
    values compared."""
    path = isim.export(tmp_path / name)
    sessions = ort_sessions(path)
    compared = 0
    for feeds in batches:
        ours = isim.run(feeds)
        codes = isim.run(feeds, codes=True)
        for level, session in sessions.items():
            names = [o.name for o in session.get_outputs()]
            theirs = dict(zip(names, session.run(names, feeds)))
            assert set(theirs) == set(ours)
            for out, value in theirs.items():
                assert value.dtype == ours[out].dtype and value.shape == ours[out].shape, (level, out)
                assert np.array_equal(value, ours[out]), (
                    f"{level} {out}: {np.mean(value != ours[out]):.4%} of the values differ")
                compared += value.size
        for out, code in codes.items():  # the float outputs are the codes dequantized
            if out in isim.program.codes:
                grid = next(q for q in isim.program.tensors.values() if q.name == isim.program.codes[out])
                assert code.dtype == grid.dtype
                dequantized = ((code.astype(np.int64) - grid.zero_point).astype(F32) * grid.scale).astype(F32)
                assert np.array_equal(dequantized, ours[out])
    return compared


def sample_sim(entry, precision="w8a8"):  # noqa: D103
    model = SAMPLES / entry / ("model_bnfolded.onnx" if entry == "convnet" else "model.onnx")
    sim = QuantSim(refquant.load(model), precision=precision)
    calib = np.load(SAMPLES / entry / "calib.npz")["input"]
    sim.compute_encodings([{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)], progress=False)
    return sim


def sample_batches(entry, size=64):
    data = np.load(SAMPLES / entry / "eval.npz")["input"]
    return [{"input": data[i:i + size]} for i in range(0, len(data), size)]


def make_model(nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(
        nodes, "synthetic", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def calibrated(model, batches, precision="w8a8"):
    # prepare=False: these models are built to exercise each integer op; preparation would fuse some away
    sim = QuantSim(refquant.load(model), precision=precision, prepare=False)
    sim.compute_encodings(batches, progress=False)
    return sim


def ops_of(isim):
    return [(n.domain, n.op_type) for n in isim.graph.nodes]


# ----------------------------------------------------------------------------------------- real models
@needs_samples
@pytest.mark.parametrize("precision", ["w8a8", "w4a8"])  # 4-bit weights travel in 8-bit QLinear weights
@pytest.mark.parametrize("entry", ["convnet", "mlp", "mtcnn_rnet"])
def test_aimet_samples_bit_exact_with_onnxruntime(entry, precision, tmp_path):
    sim = sample_sim(entry, precision)
    isim = IntSim(sim)
    assert isim.fallbacks == [] and "float fallback: none" in isim.summary()
    kinds = {op for _, op in ops_of(isim)}
    assert "QGemm" in kinds and "QuantizeLinear" in kinds and "DequantizeLinear" in kinds
    assert ("QLinearConv" in kinds) == (entry != "mlp")
    assert ("QLinearSoftmax" in kinds) == (entry == "mtcnn_rnet")
    batches = sample_batches(entry)
    compared = assert_bit_exact(isim, batches, tmp_path)
    samples = sum(len(b["input"]) for b in batches)
    assert samples >= 128 and compared == 2 * samples * (6 if entry == "mtcnn_rnet" else 10)
    reference = IntSim(sim, kernels="reference")
    for feeds in batches[:1]:
        fast, slow = isim.run(feeds, codes=True), reference.run(feeds, codes=True)
        assert all(np.array_equal(fast[k], slow[k]) for k in fast)


@needs_samples
def test_aimet_convnet_lowering_and_gap():
    sim = sample_sim("convnet")
    isim = IntSim(sim)
    lowered = {e.node: e for e in isim.program.lowered}
    # Conv+Relu supergroups: the Relu is QLinearConv's output clamp (zero point 0: nothing to emit)
    assert lowered["/c1/Conv"].ops == ["QLinearConv"] and "fused Relu" in lowered["/c1/Conv"].note
    assert "/relu/Relu" not in lowered
    # the depthwise conv is not a supergroup: its Relu is tied to it and clamps codes at the zero point
    assert lowered["/relu_2/Relu"].ops == ["Clip"]
    assert lowered["/pool/GlobalAveragePool"].ops == ["QLinearGlobalAveragePool"]
    assert lowered["/Flatten"].mode == "codes"
    # int32 bias with onnxruntime's quantize_bias_static_impl formula
    x_scale = F32(sim.encoding_of("input").scale)
    w_scale = np.asarray(sim.encoding_of("c1.weight").scale, F32)
    bias = next(v for k, v in isim.graph.initializers.items() if k.startswith("c1.bias"))
    expected = np.round(sim.graph.initializers["c1.bias"].astype(np.float64) / (x_scale * w_scale).astype(np.float64))
    assert bias.dtype == np.int32 and np.array_equal(bias, expected.astype(np.int32))
    feeds = sample_batches("convnet", 32)[0]
    report = qdq_gap(sim, isim, feeds)
    layers = {g.tensor: g for g in report.layers}
    assert layers["input"].differ == 0  # same QuantizeLinear on both sides
    assert 0 < layers["logits"].size and layers["/relu/Relu_output_0"].fraction_identical > 0.99
    out = report.outputs[0]
    assert out.name == "logits" and 0.5 < out.identical < 1.0
    assert out.sqnr_int_vs_fp32 > out.sqnr_sim_vs_fp32 - 3.0 and out.sqnr_int_vs_sim > out.sqnr_sim_vs_fp32
    assert "logits" in str(report)


@pytest.fixture(scope="module")
def mobilenet_batches(tmp_path_factory):
    if not MOBILENET.is_file() or not all((SHARED / "data" / p).is_file() for p in PHOTOS):
        pytest.skip("MobileNetV2 or the photos are missing")
    from refquant.data import Preprocess, iter_feeds

    folder = tmp_path_factory.mktemp("photos")
    for photo in PHOTOS:
        (folder / photo).symlink_to(SHARED / "data" / photo)
    graph = refquant.load(MOBILENET)
    pre = Preprocess.parse("resize_shorter=256;crop=224,224;mean=0.485,0.456,0.406;std=0.229,0.224,0.225")
    return graph, list(iter_feeds(folder, graph, batch_size=4, preprocess=pre))


def test_mobilenet_v2_bit_exact_with_onnxruntime(mobilenet_batches, tmp_path):
    graph, batches = mobilenet_batches
    # unsigned_symmetric on (an AIMET config option; its default configs leave it off): MobileNetV2's all-positive
    # depthwise channels get the grid [0, 255], so those layers' weights are uint8 with per-channel zero points
    # 0 / 128 and the others int8 with zero point 0: both lowerings are checked
    config = load_config("default")
    config.unsigned_symmetric = True
    sim = QuantSim(graph, precision="w8a8", config=config)
    sim.compute_encodings(batches, progress=False)
    isim = IntSim(sim)
    assert isim.fallbacks == []
    counts = {}
    for _, op in ops_of(isim):
        counts[op] = counts.get(op, 0) + 1
    assert counts["QLinearConv"] == 52 and counts["QLinearAdd"] == 10 and counts["QGemm"] == 1
    weights = [isim.graph.initializers[n.inputs[3]] for n in isim.graph.nodes if n.op_type == "QLinearConv"]
    assert any(w.dtype == np.uint8 for w in weights) and any(w.dtype == np.int8 for w in weights)
    compared = assert_bit_exact(isim, batches, tmp_path)
    assert compared == 2 * 8 * 1000
    report = qdq_gap(sim, isim, batches[:1])
    logits = report.outputs[0]
    assert logits.sqnr_int_vs_fp32 > logits.sqnr_sim_vs_fp32 - 3.0


# ----------------------------------------------------------------------------------------- op coverage
def _conv_model(rng):
    init = {"w1": rng.normal(0, .3, (8, 4, 3, 3)), "b1": rng.normal(0, .1, 8), "wd": rng.normal(0, .3, (8, 1, 3, 3)),
            "bd": rng.normal(0, .1, 8), "wp": rng.normal(0, .3, (8, 8, 1, 1)), "bp": rng.normal(0, .1, 8),
            "wg": rng.normal(0, .3, (4, 4, 3, 3)), "bg": rng.normal(0, .1, 4), "lo": 0.0, "hi": 6.0, "mc": 0.7,
            "slope": rng.uniform(.05, .3, (4, 1, 1)), "wm": rng.normal(0, .3, (200, 6)), "addc": rng.normal(0, .5, 6)}
    init = {k: np.asarray(v, F32) for k, v in init.items()}
    init.update({"shape": np.array([0, -1], np.int64), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)})
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), n("Relu", ["c1"], ["r1"]),
             n("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             n("Conv", ["p1", "wd", "bd"], ["cd"], pads=[1, 1, 1, 1], group=8), n("Clip", ["cd", "lo", "hi"], ["cl"]),
             n("Conv", ["cl", "wp", "bp"], ["cp"]), n("Add", ["cp", "p1"], ["ad"]), n("Relu", ["ad"], ["ar"]),
             n("AveragePool", ["ar"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             n("Conv", ["ap", "wg", "bg"], ["cg"], pads=[1, 1, 1, 1], group=2),
             n("Sigmoid", ["cg"], ["sg"]), n("Mul", ["sg", "mc"], ["mu"]), n("LeakyRelu", ["cg"], ["lr"], alpha=0.1),
             n("PRelu", ["cg", "slope"], ["pr"]), n("Tanh", ["pr"], ["th"]), n("Concat", ["mu", "th"], ["cc"], axis=1),
             n("Pad", ["lr", "pads"], ["pd"]), n("GlobalMaxPool", ["pd"], ["gm"]),
             n("Transpose", ["cc"], ["tr"], perm=[0, 1, 3, 2]), n("Reshape", ["tr", "shape"], ["rs"]),
             n("MatMul", ["rs", "wm"], ["mm"]), n("Add", ["mm", "addc"], ["ma"]), n("Squeeze", ["gm"], ["sq"])]
    return make_model(nodes, [("x", [None, 4, 10, 10])], ["ma", "sq"], init)


def _gemm_model(rng):
    init = {"w1": rng.normal(0, .3, (6, 5)), "c1": rng.normal(0, .5, 5), "w2": rng.normal(0, .3, (4, 3)),
            "b2": rng.normal(0, .1, 4), "w3": rng.normal(0, .3, (4, 2)), "b3": rng.normal(0, .1, 2), "lo": 0.05,
            "scales": [1, 1, 2, 2]}
    init = {k: np.asarray(v, F32) for k, v in init.items()}
    init.update({"ax0": np.array([0], np.int64), "ax1": np.array([1], np.int64), "sizes": np.array([2, 4], np.int64),
                 "st": np.array([0], np.int64), "en": np.array([2], np.int64)})
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["m1"]), n("Add", ["m1", "c1"], ["a1"]), n("Relu", ["a1"], ["r1"]),
             n("Transpose", ["r1"], ["t1"], perm=[1, 0]), n("MatMul", ["r1", "t1"], ["m2"]),
             n("Gemm", ["m2", "w2", "b2"], ["g2"], transB=1), n("Relu", ["g2"], ["r2"]),
             n("Gemm", ["r2", "w3", "b3"], ["g3"], beta=0.5), n("Clip", ["g3", "lo"], ["cl"]),
             n("Unsqueeze", ["cl", "ax0"], ["u1"]), n("Unsqueeze", ["u1", "ax0"], ["u2"]),
             n("Resize", ["u2", "", "scales"], ["rz"], mode="nearest"),
             n("Split", ["rz", "sizes"], ["s1", "s2"], axis=2),
             n("Slice", ["s2", "st", "en", "ax1"], ["sl"]), n("Flatten", ["s1"], ["f1"])]
    return make_model(nodes, [("x", [3, 6])], ["f1", "sl", "g3"], init)


def test_conv_family_ops_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (16, 4, 10, 10)).astype(F32)
    sim = calibrated(_conv_model(rng), [{"x": x[:8]}, {"x": x[8:]}])
    isim = IntSim(sim)
    modes = {e.node: (e.op_type, e.mode, e.ops) for e in isim.program.lowered}
    ops = set(ops_of(isim))
    for op in ("QLinearConv", "QLinearMatMul", "MaxPool", "Pad", "ReduceMax", "Transpose", "Reshape", "Squeeze"):
        assert ("", op) in ops, op
    for op in ("QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu"):
        assert ("com.microsoft", op) in ops, op
    assert modes["PRelu_13"][1] == "table" and modes["Tanh_14"][1] == "table"
    assert modes["Clip_4"][1] == "table"  # after a depthwise conv: its own grid, so a table
    assert sum(1 for e in isim.program.lowered if "fused Relu" in e.note) == 2  # Conv+Relu, Add+Relu
    assert assert_bit_exact(isim, [{"x": x[:5]}, {"x": x[5:6]}], tmp_path) > 0
    # the lookup tables are the simulation's own arithmetic: the first table after identical codes agrees
    report = qdq_gap(sim, isim, {"x": x[:4]})
    assert {g.tensor: g for g in report.layers}["x"].differ == 0


def test_matmul_gemm_and_data_movement_bit_exact(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (12, 3, 6)).astype(F32)
    sim = calibrated(_gemm_model(rng), [{"x": v} for v in x])
    isim = IntSim(sim)
    ops = [op for _, op in ops_of(isim)]
    assert ops.count("QLinearMatMul") == 2 and ops.count("QGemm") == 2  # activation x activation MatMul too
    assert {"Resize", "Split", "Slice", "Flatten", "Unsqueeze", "Gather"} <= set(ops)
    assert assert_bit_exact(isim, [{"x": v} for v in x[:4]], tmp_path) > 0
    # Gemm's beta scales the int32 bias: the integer Gemm equals the simulation on the same input codes
    report = qdq_gap(sim, isim, [{"x": v} for v in x[:4]])
    layers = {g.tensor: g for g in report.layers}
    assert layers["m2"].differ == 0 and layers["g3"].differ == 0


def test_unary_tables_equal_the_simulation():
    rng = np.random.default_rng(2)
    init = {"slope": np.asarray(rng.uniform(.05, .4, (3, 1, 1)), F32), "d": np.asarray(1.7, F32)}
    n = helper.make_node
    nodes = [n("PRelu", ["x", "slope"], ["p"]), n("Tanh", ["x"], ["t"]), n("HardSwish", ["x"], ["h"]),
             n("Div", ["x", "d"], ["q"])]
    model = make_model(nodes, [("x", [None, 3, 5, 5])], ["p", "t", "h", "q"], init)
    x = rng.normal(0, 2, (8, 3, 5, 5)).astype(F32)
    sim = calibrated(model, [{"x": x}])
    sim.quantizers["d"].disable()  # a float constant: Div by it is a table, not QLinearMul
    isim = IntSim(sim)
    assert all(e.mode == "table" for e in isim.program.lowered if e.op_type != "input")
    ours, simulated = isim.run({"x": x}), sim.run({"x": x})
    for name in ("p", "t", "h", "q"):
        assert np.array_equal(ours[name], simulated[name]), name


def test_fused_relu_with_a_nonzero_zero_point_clamps_codes(tmp_path):
    if not SAMPLES.is_dir():
        pytest.skip(f"missing external resource: the AIMET samples at {SAMPLES}")
    sim = sample_sim("convnet")
    sim.set_encoding("/relu/Relu_output_0", from_min_max(-1.0, 3.0, 8, False))
    isim = IntSim(sim)
    entry = next(e for e in isim.program.lowered if e.node == "/c1/Conv")
    assert entry.ops == ["QLinearConv", "Clip"]
    feeds = sample_batches("convnet", 32)[:1]
    codes = isim.tensor_codes(feeds[0], ["/relu/Relu_output_0"])["/relu/Relu_output_0"]
    assert codes.min() == isim.grid("/relu/Relu_output_0").zero_point  # Relu: nothing below the zero point
    assert assert_bit_exact(isim, feeds, tmp_path) > 0


def test_concat_of_different_grids_is_qlinearconcat(tmp_path):
    rng = np.random.default_rng(3)
    n = helper.make_node
    init = {"w": np.asarray(rng.normal(0, .4, (2, 3, 1, 1)), F32)}
    model = make_model([n("Conv", ["x", "w"], ["c"]), n("Concat", ["x", "c"], ["y"], axis=1)],
                       [("x", [None, 3, 4, 4])], ["y"], init)
    x = rng.normal(0, 1, (4, 3, 4, 4)).astype(F32)
    sim = calibrated(model, [{"x": x}])
    # AIMET ties a Concat input to the output only when nothing else reads it (golden/aimet/parity/concat_shared.*):
    # x, also read by the Conv, keeps its own grid
    assert sim.quantizers["c"].tied_to is None and sim.quantizers["y"].tied_to == "c"
    assert sim.quantizers["x"].tied_to is None
    sim.set_encoding("c", from_min_max(-3.0, 2.0, 8, False))
    isim = IntSim(sim)
    assert ("com.microsoft", "QLinearConcat") in ops_of(isim)
    assert assert_bit_exact(isim, [{"x": x}], tmp_path) > 0


# ----------------------------------------------------------------------------------------- errors and fallback
@needs_samples
def test_disabled_quantizer_between_integer_ops(tmp_path):
    sim = sample_sim("convnet")
    sim.quantizers["/relu_1/Relu_output_0"].disable()
    with pytest.raises(LoweringError, match=r"node '/c2/Conv' \(Conv\).*float_fallback=True"):
        IntSim(sim)
    isim = IntSim(sim, float_fallback=True)
    assert isim.fallbacks == ["/c2/Conv", "/relu_1/Relu", "/dw/Conv"]
    text = isim.summary()
    assert "float fallback (3 nodes" in text and "/c2/Conv (Conv)" in text
    ops = ops_of(isim)
    assert ("", "Conv") in ops and ("", "DequantizeLinear") in ops
    # the float nodes are computed by each runtime's own float kernels: agreement is measured, then expected
    assert assert_bit_exact(isim, sample_batches("convnet", 64)[:1], tmp_path) > 0


@needs_samples
def test_16_bit_activations_need_a_fallback():
    sim = sample_sim("convnet", precision="w8a16")
    with pytest.raises(LoweringError, match=r"/c1/Conv.*uint16"):
        IntSim(sim)
    isim = IntSim(sim, float_fallback=True)
    assert "/c1/Conv" in isim.fallbacks and isim.graph.opset[""] >= 21  # uint16 Q/DQ needs opset 21
    out = isim.run(sample_batches("convnet", 8)[0])["logits"]
    assert out.dtype == np.float32 and np.isfinite(out).all()
    # a fixed-point scheme runs ConvInteger + Requantize in refquant: 16-bit activations stay integer there
    fixed = IntSim(sim, requant="tflite_single", float_fallback=True)
    assert fixed.fallbacks == ["/pool/GlobalAveragePool"]  # QLinearGlobalAveragePool is 8-bit only
    assert fixed.grid("/relu/Relu_output_0").dtype == np.uint16
    report = qdq_gap(sim, fixed, sample_batches("convnet", 16)[0])
    assert {g.tensor: g for g in report.layers}["/relu/Relu_output_0"].fraction_identical > 0.999


def test_uncalibrated_sim_and_export_overwrite(tmp_path):
    rng = np.random.default_rng(4)
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [None, 4])], ["y"], {})
    sim = QuantSim(refquant.load(model), precision="w8a8")
    with pytest.raises(RefquantError, match="compute_encodings"):
        IntSim(sim)
    sim.compute_encodings([{"x": rng.normal(0, 1, (8, 4)).astype(F32)}], progress=False)
    isim = IntSim(sim)
    path = isim.export(tmp_path / "m.onnx")
    with pytest.raises(RefquantError, match="exists"):
        isim.export(path)
    isim.export(path, overwrite=True)
    onnx.checker.check_model(onnx.load(str(path)))
    with pytest.raises(RefquantError, match="not outputs"):
        isim.run({"x": np.zeros((1, 4), F32)}, outputs=["nope"])


# ----------------------------------------------------------------------------------------- requant schemes
@needs_samples
@pytest.mark.parametrize("scheme", ["tflite_double", "tflite_single", "onnx_reference", "exact(half_away)"])
def test_other_requant_schemes(scheme, tmp_path):
    sim = sample_sim("convnet")
    base = IntSim(sim)
    isim = IntSim(sim, requant=scheme)
    assert not isim.program.runs_in_onnxruntime and "runs in refquant only" in isim.summary()
    ops = ops_of(isim)
    assert ("", "ConvInteger") in ops and ("com.refquant", "Requantize") in ops and ("", "QLinearConv") not in ops
    feeds = sample_batches("convnet", 32)[0]
    # first layer: same input codes; the Requantize node is requantize() of ConvInteger + bias
    node = next(n for n in isim.graph.nodes if n.op_type == "Requantize")
    acc_name, codes_name = node.inputs[0], node.outputs[0]
    got = isim.session.run(feeds, outputs=[acc_name, codes_name])
    init = isim.graph.initializers
    xs, ws, ys, yz = (init[i] for i in node.inputs[1:])
    scheme_obj = R.as_scheme(scheme)
    if scheme_obj.name == "exact":
        mult = R.exact_multiplier(xs, ws, ys)
    elif scheme_obj.name.startswith("tflite"):
        mult = R.tflite_multiplier(xs, ws, ys)
    else:
        mult = R.ort_multiplier(xs, ws, ys)
    expected = R.requantize(got[acc_name], mult, int(yz), 0, 255, scheme=scheme, axis=1)
    assert np.array_equal(expected, got[codes_name])
    first = base.tensor_codes(feeds, ["/relu/Relu_output_0"])["/relu/Relu_output_0"]
    assert 0.99 < np.mean(first == got[codes_name]) <= 1.0  # schemes differ only near rounding boundaries
    path = isim.export(tmp_path / "custom.onnx")
    assert any(n.domain == "com.refquant" for n in onnx.load(str(path)).graph.node)


def test_unknown_scheme():
    with pytest.raises(ValueError, match="scheme"):
        R.as_scheme("fixed_point_magic")


# ----------------------------------------------------------------------------------------- fused kernel
_CASE_KEYS = ("n", "c", "h", "w", "m", "k", "g", "s", "p", "d")
CASES = [dict(zip(_CASE_KEYS, v)) for v in [
    (2, 16, 9, 9, 8, 3, 1, 1, 1, 1), (2, 16, 9, 9, 16, 3, 16, 2, 1, 1),  # dense 3x3; depthwise stride 2
    (1, 8, 7, 10, 12, 1, 1, 1, 0, 1), (1, 8, 7, 10, 12, 1, 4, 1, 0, 1),  # pointwise; grouped pointwise
    (2, 6, 11, 8, 4, 3, 2, 2, 2, 2), (1, 4, 9, 9, 8, 3, 4, 1, 1, 1),  # grouped dilated; depthwise multiplier 2
    (1, 8, 9, 9, 8, 5, 8, 2, 2, 1), (1, 8, 9, 9, 8, 1, 1, 2, 0, 1),  # depthwise 5x5; strided 1x1
    (1, 8, 6, 6, 8, 3, 8, 1, 0, 2)]]  # dilated depthwise


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("wtype", [np.int8, np.uint8])
def test_fast_qlinearconv_equals_reference(case, wtype):
    c = CASES[case]
    rng = np.random.default_rng(100 + case)
    x = rng.integers(0, 256, (c["n"], c["c"], c["h"], c["w"])).astype(np.uint8)
    info = np.iinfo(wtype)
    w = rng.integers(info.min, info.max + 1, (c["m"], c["c"] // c["g"], c["k"], c["k"])).astype(wtype)
    wz = rng.integers(0, 256, c["m"]).astype(wtype) if wtype == np.uint8 else np.zeros(c["m"], wtype)
    bias = rng.integers(-20000, 20000, c["m"]).astype(np.int32)
    attrs = dict(group=c["g"], strides=[c["s"]] * 2, pads=[c["p"]] * 4, dilations=[c["d"]] * 2)
    # power-of-two scales with an odd zero point put many accumulators on exact .5 ties
    for xs, ws, ys, xz, yz in [(F32(0.05), rng.uniform(.001, .02, c["m"]).astype(F32), F32(0.37), 3, 5),
                               (F32(2 ** -4), np.full(c["m"], 2 ** -5, F32), F32(2 ** -3), 7, 129)]:
        args = (x, xs, np.uint8(xz), w, ws, wz, ys, np.uint8(yz), bias)
        expected = Q.qlinear_conv(*args, **attrs)
        assert np.array_equal(fast_qlinear_conv(*args, **attrs), expected)
        assert np.array_equal(fast_qlinear_conv(*args[:8], **attrs), Q.qlinear_conv(*args[:8], **attrs))


def test_fast_qlinearconv_1d_and_fallbacks():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (2, 3, 20)).astype(np.uint8)
    w = rng.integers(-128, 128, (5, 3, 3)).astype(np.int8)
    args = (x, F32(.03), np.uint8(9), w, rng.uniform(.001, .02, 5).astype(F32), np.zeros(5, np.int8), F32(.2),
            np.uint8(100), rng.integers(-500, 500, 5).astype(np.int32))
    attrs = dict(pads=[1, 1], strides=[2])
    assert np.array_equal(fast_qlinear_conv(*args, **attrs), Q.qlinear_conv(*args, **attrs))
    x3 = rng.integers(0, 256, (1, 2, 4, 4, 4)).astype(np.uint8)  # 3-D: the reference kernel runs
    w3 = rng.integers(-128, 128, (2, 2, 2, 2, 2)).astype(np.int8)
    args3 = (x3, F32(.03), np.uint8(9), w3, F32(.01), np.int8(0), F32(.2), np.uint8(100))
    assert np.array_equal(fast_qlinear_conv(*args3), Q.qlinear_conv(*args3))


@pytest.mark.parametrize("shape,axis,opset", [((50, 2), 1, 13), ((7, 10), -1, 13), ((4, 5, 6), 1, 13),
                                               ((3, 1000), 1, 13), ((4, 5, 6), 1, 11), ((2, 3, 4), 0, 13)])
def test_qlinear_softmax_matches_onnxruntime(shape, axis, opset):
    from refquant.intsim.contrib import qlinear_softmax

    rng = np.random.default_rng(len(shape) * 10 + axis + opset)
    x = rng.integers(0, 256, shape).astype(np.uint8)
    for xs, ys, yz in [(0.1, 1 / 256, 0), (0.05, 1 / 255, 0), (0.3, 1 / 250, 3), (0.9, 0.003, 1)]:
        node = helper.make_node("QLinearSoftmax", ["x", "xs", "xz", "ys", "yz"], ["y"], domain="com.microsoft",
                                axis=axis, opset=opset)
        inits = [numpy_helper.from_array(F32(xs), "xs"), numpy_helper.from_array(np.uint8(5), "xz"),
                 numpy_helper.from_array(F32(ys), "ys"), numpy_helper.from_array(np.uint8(yz), "yz")]
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = session.run(None, {"x": x})[0]
        assert np.array_equal(qlinear_softmax(x, F32(xs), np.uint8(5), F32(ys), np.uint8(yz), axis=axis,
                                              opset=opset), expected)


def test_sqnr():
    a = np.array([1.0, 2.0, 3.0])
    assert sqnr(a, a) == math.inf
    assert sqnr(a, a + 0.1) == pytest.approx(10 * math.log10(14 / 0.03))
