"""QuantSim against AIMET's own outputs (refs/aimet_samples, aimet-onnx 2.42.0) and against onnxruntime
running the exported QDQ model, layer by layer (teacher forcing: see docs/quantsim.md for why)."""
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import refquant
from refquant.errors import RefquantError
from refquant.quant import QuantSim
from refquant.quant.agreement import teacher_forced_agreement
from refquant.quant.encoding import from_min_max
from refquant.quant.quantsim import CalibrationError

from .helpers import exact_ort_session

SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
SAMPLES = SHARED / "refs" / "aimet_samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"AIMET samples not found at {SAMPLES}")
ENTRIES = ["convnet", "mlp", "mtcnn_rnet"]
# cfg -> (QuantSim precision, scheme, config)
CONFIGS = {"w8a8_minmax": ("w8a8", "min_max", "default"), "w8a16_minmax": ("w8a16", "min_max", "default"),
           "w4a8_minmax": ("w4a8", "min_max", "default"), "w8a8_tfe": ("w8a8", "tf_enhanced", "default"),
           "w8a8_minmax_pertensor": ("w8a8", "min_max", "per_tensor")}


def sample_model(entry):
    return SAMPLES / entry / ("model_bnfolded.onnx" if entry == "convnet" else "model.onnx")


def calib_batches(entry):
    """AIMET's calibration call: 4 batches of 16 in file order."""
    calib = np.load(SAMPLES / entry / "calib.npz")["input"]
    return [{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)]


def sim_for(entry, cfg, rounding="half_even"):
    precision, scheme, config = CONFIGS[cfg]
    return QuantSim(refquant.load(sample_model(entry)), precision=precision, quant_scheme=scheme, config=config,
                    rounding=rounding)


def run_batched(sim, inputs, batch=16):
    outs = [sim.run({"input": inputs[i:i + batch]}) for i in range(0, len(inputs), batch)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def sqnr_db(ref, out):
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2))


def aimet_entries(path):
    data = json.loads(Path(path).read_text())
    return {e["name"]: e for e in data["activation_encodings"]}, {e["name"]: e for e in data["param_encodings"]}


# every configuration AIMET produced (the per-tensor one exists for convnet only)
PRODUCED = [(e, c) for e in ENTRIES for c in CONFIGS if c != "w8a8_minmax_pertensor"] + \
    [("convnet", "w8a8_minmax_pertensor")]


@needs_samples
@pytest.mark.parametrize("entry,cfg", PRODUCED)
def test_enabled_quantizers_are_aimets(entry, cfg):
    path = SAMPLES / entry / cfg / "model.encodings"
    activations, params = aimet_entries(path)
    sim = sim_for(entry, cfg)
    ours_act = [n for n, q in sim.quantizers.items() if q.kind != "param" and q.enabled]
    ours_par = [n for n, q in sim.quantizers.items() if q.kind == "param" and q.enabled]
    assert ours_act == list(activations)  # same tensors, in AIMET's (graph) order
    assert ours_par == list(params)
    for name, entry_ in params.items():
        assert (sim.quantizers[name].axis is not None) == (entry_["enc_type"] == "PER_CHANNEL")


@needs_samples
@pytest.mark.parametrize("entry,cfg", [p for p in PRODUCED if p[1] != "w8a8_tfe"])
def test_min_max_encodings_equal_aimets(entry, cfg):
    path = SAMPLES / entry / cfg / "model.encodings"
    activations, params = aimet_entries(path)
    sim = sim_for(entry, cfg)
    sim.compute_encodings(calib_batches(entry), progress=False)
    for name, ref in {**activations, **params}.items():
        enc = sim.encoding_of(name)
        assert np.array_equal(np.atleast_1d(enc.offset), ref["offset"]), name
        if name == "input" or name in params:
            # computed from the same float32 numbers (data, weights): exactly AIMET's scale
            assert np.array_equal(np.atleast_1d(enc.scale), ref["scale"]), name
        else:
            # min/max of an op output: onnxruntime and refquant sum in different orders, so the extremes
            # differ by a few float32 ulps (2^-23 relative each), and so does (max - min) / steps
            np.testing.assert_allclose(np.atleast_1d(enc.scale), ref["scale"], rtol=5e-7, err_msg=name)


@needs_samples
def test_calibrating_again_on_the_same_data_gives_the_same_encodings():
    """R-Net's PRelu slopes are constant inputs that AIMET quantizes as activations: its compute_encodings runs them
    in updateStats, in float, every time. A second calibration (as after AdaRound) must see them in float too, not
    with the first calibration's encodings (which moved /prelu1's output scale by 1e-3 relative)."""
    sim = sim_for("mtcnn_rnet", "w8a8_minmax")
    sim.compute_encodings(calib_batches("mtcnn_rnet"), progress=False)
    first = {name: sim.encoding_of(name) for name in sim.quantizers}
    assert sim.encoding_of("onnx::PRelu_47") is not None  # the slope's quantizer is on and calibrated
    sim.compute_encodings(calib_batches("mtcnn_rnet"), progress=False)
    for name, enc in first.items():
        again = sim.encoding_of(name)
        assert (enc is None) == (again is None), name
        if enc is not None:
            assert np.array_equal(enc.scale, again.scale) and np.array_equal(enc.offset, again.offset), name


@needs_samples
@pytest.mark.parametrize("entry", ENTRIES)
def test_tf_enhanced_encodings_equal_aimets_within_float_rounding(entry):
    activations, params = aimet_entries(SAMPLES / entry / "w8a8_tfe" / "model.encodings")
    sim = sim_for(entry, "w8a8_tfe")
    sim.compute_encodings(calib_batches(entry), progress=False)
    for name, ref in {**activations, **params}.items():
        enc = sim.encoding_of(name)
        # the same candidate (delta, offset) is chosen everywhere: offsets are identical; scales agree to a
        # few float32 ulps (AIMET searches in float32; activation histograms also see float sums in
        # another order) -- far inside one histogram bin, which is range/512 = 2e-3 relative
        assert np.array_equal(np.atleast_1d(enc.offset), ref["offset"]), name
        np.testing.assert_allclose(np.atleast_1d(enc.scale), ref["scale"], rtol=4e-6, err_msg=name)


@needs_samples
@pytest.mark.parametrize("cfg", ["w8a8_minmax", "w8a16_minmax", "w4a8_minmax", "w8a8_tfe"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_aimet_encodings_with_half_up_reproduce_aimets_simulation(entry, cfg):
    sim = sim_for(entry, cfg, rounding="half_up")
    sim.load_encodings(SAMPLES / entry / cfg / "model.encodings")
    activations, params = aimet_entries(SAMPLES / entry / cfg / "model.encodings")
    for name, ref in {**activations, **params}.items():
        assert np.array_equal(np.atleast_1d(sim.encoding_of(name).scale), ref["scale"])
    outputs = run_batched(sim, np.load(SAMPLES / entry / "eval.npz")["input"])
    expected = np.load(SAMPLES / entry / cfg / "sim_out.npz")
    for name in expected.files:
        if cfg != "w8a16_minmax":
            # 8-bit activations on shallow nets: a float32 summation-order difference (~1e-7 relative)
            # never reaches a rounding boundary, so AIMET's simulation is reproduced bit for bit
            assert np.array_equal(outputs[name], expected[name]), name
        else:
            # 16-bit steps are 256x finer: the same ulp differences now cross boundaries and cascade
            # (measured 90.6-99.5 % identical); every difference stays within a few output steps
            step = float(np.max(sim.encoding_of(name).scale))
            assert np.mean(outputs[name] == expected[name]) > 0.85, name
            assert np.max(np.abs(outputs[name] - expected[name])) <= 4 * step, name
            assert sqnr_db(expected[name], outputs[name]) > 80, name


@needs_samples
@pytest.mark.parametrize("precision", ["w8a8", "w4a8", "w8a16"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_teacher_forced_agreement_with_onnxruntime_on_exported_qdq(entry, precision):
    sim = QuantSim(refquant.load(sample_model(entry)), precision=precision)
    sim.compute_encodings(calib_batches(entry), progress=False)
    model = sim.to_onnx_qdq()
    onnx.checker.check_model(model)
    report = teacher_forced_agreement(sim, model, {"input": np.load(SAMPLES / entry / "eval.npz")["input"][:32]})
    assert report.quantizers_compared == sum(1 for q in sim.quantizers.values() if q.kind == "activation"
                                             and q.enabled)
    assert report.tensors_compared >= report.quantizers_compared
    assert report.forced_code_mismatches == {}
    assert report.float_outside_bound == {}
    assert report.weight_mismatches == []
    assert report.unexplained_flips == {}


@needs_samples
@pytest.mark.parametrize("entry", ENTRIES)
def test_exported_qdq_scales_and_zero_points_are_the_encodings(entry, tmp_path):
    sim = QuantSim(refquant.load(sample_model(entry)))
    sim.compute_encodings(calib_batches(entry), progress=False)
    paths = sim.export(tmp_path / "out", "model")
    assert sorted(os.listdir(tmp_path / "out")) == ["model.encodings", "model.onnx", "model_qdq.onnx"]
    model = onnx.load(paths["qdq"])
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        name = node.input[0] if node.input[0] in sim.quantizers else node.input[0][:-len("_float")]
        signed = None if sim.quantizers[name].kind == "param" else False  # activations are exported unsigned
        scale, zero_point, _ = sim.encoding_of(name).to_onnx(signed=signed)
        assert np.array_equal(inits[node.input[1]], scale) and inits[node.input[1]].dtype == np.float32
        assert np.array_equal(inits[node.input[2]].astype(np.int64), zero_point.astype(np.int64))
        checked += 1
    assert checked == sum(1 for q in sim.quantizers.values() if q.enabled and sim.encoding_of(q.tensor) is not None)
    # end to end the exported model and sim.run score the same against FP32
    ev = np.load(SAMPLES / entry / "eval.npz")["input"]
    fp32 = np.load(SAMPLES / entry / "fp32_out.npz")
    ours = run_batched(sim, ev)
    session = exact_ort_session(paths["qdq"])
    theirs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": ev})))
    for name in fp32.files:
        assert abs(sqnr_db(fp32[name], ours[name]) - sqnr_db(fp32[name], theirs[name])) < 0.5, name


@needs_samples
def test_the_unsigned_weights_export_is_the_same_qdq_model_with_uint8_weight_grids(tmp_path):
    """export(unsigned_weights=True): each int8 weight grid's QuantizeLinear/DequantizeLinear pair gets zero point
    + 128 as uint8, nothing else changes, and a plain onnxruntime session (any CPU) scores what the simulation
    does. (On x86 AVX2 without VNNI the int8 export, fused to uint8 x int8 kernels, scores 18.9 dB against the
    simulation's 38 dB on this convnet: those kernels saturate pair sums to int16.)"""
    import onnxruntime as ort

    sim = QuantSim(refquant.load(sample_model("convnet")))
    sim.compute_encodings(calib_batches("convnet"), progress=False)
    signed, unsigned = onnx.load(sim.export(tmp_path / "a", "m")["qdq"]), \
        onnx.load(sim.export(tmp_path / "b", "m", unsigned_weights=True)["qdq"])
    zero_points = {}
    for model in (signed, unsigned):
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        weight_codes = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits}
        zero_points[id(model)] = [inits[n.input[2]] for n in model.graph.node
                                  if (n.op_type == "QuantizeLinear" and n.output[0] in weight_codes)
                                  or (n.op_type == "DequantizeLinear" and n.input[0] in weight_codes)]
    before, after = zero_points[id(signed)], zero_points[id(unsigned)]
    assert len(before) == len(after) == 2 * 5  # the five layers' weight pairs
    for a, b in zip(before, after):
        assert a.dtype == np.int8 and b.dtype == np.uint8 and np.array_equal(a.astype(np.int16) + 128, b)
    assert [n.op_type for n in signed.graph.node] == [n.op_type for n in unsigned.graph.node]
    ev = np.load(SAMPLES / "convnet" / "eval.npz")["input"]
    session = ort.InferenceSession(unsigned.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"input": ev})[0]
    fp32 = np.load(SAMPLES / "convnet" / "fp32_out.npz")["logits"]
    assert abs(sqnr_db(fp32, run_batched(sim, ev)["logits"]) - sqnr_db(fp32, theirs)) < 0.5

@needs_samples
@pytest.mark.parametrize("entry", ENTRIES)
def test_w16a16_matches_fp32_within_the_16_bit_step(entry):
    sim = QuantSim(refquant.load(sample_model(entry)), precision="w16a16")
    sim.compute_encodings(calib_batches(entry), progress=False)
    # on the calibration data itself nothing saturates, so only rounding error remains: half a step per
    # quantizer, propagated through the layers. Measured 1.5-13.5 output steps (R-Net's bbox head sits
    # behind five quantized layers); the claim checked is "far below one 8-bit step" (= 256 16-bit steps)
    calib = np.load(SAMPLES / entry / "calib.npz")["input"]
    ours, fp32 = run_batched(sim, calib), sim.run_float({"input": calib})
    for name in fp32:
        step = float(np.max(sim.encoding_of(name).scale))
        assert np.max(np.abs(ours[name] - fp32[name])) <= 32 * step, name
        assert sqnr_db(fp32[name], ours[name]) > 65, name


@needs_samples
def test_nan_in_calibration_data_names_the_input():
    sim = QuantSim(refquant.load(sample_model("mlp")))
    data = np.load(SAMPLES / "mlp" / "calib.npz")["input"].copy()
    data[21, 3] = np.nan
    with pytest.raises(RefquantError, match=r"'input'.*NaN"):
        sim.compute_encodings([{"input": data[i:i + 16]} for i in range(0, 64, 16)], progress=False)


@needs_samples
def test_overflow_inside_the_model_names_tensor_and_sample():
    sim = QuantSim(refquant.load(sample_model("mlp")))
    data = np.load(SAMPLES / "mlp" / "calib.npz")["input"].copy()
    # a finite input whose first Gemm overflows to inf in sample 21 (batch 1); the Gemm output itself
    # is not observed (Gemm+Relu supergroup), the Relu output is
    data[21] = 3e38
    with pytest.raises(CalibrationError, match=r"tensor '/relu/Relu_output_0'.*sample 21 \(batch 1\)"):
        sim.compute_encodings([{"input": data[i:i + 16]} for i in range(0, 64, 16)], progress=False)


@needs_samples
def test_empty_calibration_set_is_an_error():
    sim = QuantSim(refquant.load(sample_model("mlp")))
    with pytest.raises(RefquantError, match="empty"):
        sim.compute_encodings([], progress=False)


@needs_samples
def test_run_before_calibration_is_an_error():
    sim = QuantSim(refquant.load(sample_model("mlp")))
    with pytest.raises(RefquantError, match="compute_encodings"):
        sim.run({"input": np.zeros((1, 64), np.float32)})


@needs_samples
def test_disabled_quantizer_passes_float_through():
    sim = QuantSim(refquant.load(sample_model("mlp")))
    sim.compute_encodings(calib_batches("mlp"), progress=False)
    x = np.load(SAMPLES / "mlp" / "eval.npz")["input"][:8]
    for q in sim.quantizers.values():
        q.disable()
    assert np.array_equal(sim.run({"input": x})["logits"], sim.run_float({"input": x})["logits"])


@needs_samples
def test_hand_set_encoding_is_used_and_kept_by_calibration():
    sim = QuantSim(refquant.load(sample_model("mlp")))
    coarse = from_min_max(-8.0, 8.0, 2, False)
    sim.set_encoding("logits", coarse)
    sim.compute_encodings(calib_batches("mlp"), progress=False)
    assert sim.encoding_of("logits") is coarse
    out = sim.run({"input": np.load(SAMPLES / "mlp" / "eval.npz")["input"][:8]})["logits"]
    # a 2-bit grid of [-8, 8] (asymmetric, scale 16/3, offset -2) has only these values
    assert set(np.unique(out)) <= {np.float32(k * np.float32(16 / 3)) for k in (-2, -1, 0, 1)}


@needs_samples
def test_bad_precision_and_rounding_are_errors():
    graph = refquant.load(sample_model("mlp"))
    with pytest.raises(RefquantError, match="precision"):
        QuantSim(graph, precision="int8")
    with pytest.raises(RefquantError, match="rounding"):
        QuantSim(graph, rounding="stochastic")
    with pytest.raises(RefquantError, match="outside"):
        QuantSim(graph, param_bw=1)


MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet.onnx"


@pytest.mark.skipif(not MOBILENET.exists(), reason=f"{MOBILENET} not found")
def test_mobilenet_v2_teacher_forced_agreement_on_real_photos(tmp_path):
    from refquant.data import Preprocess, iter_feeds

    photos = sorted((SHARED / "data").glob("*.png"))[:6]
    for photo in photos:
        (tmp_path / photo.name).write_bytes(photo.read_bytes())
    graph = refquant.load(MOBILENET)
    imagenet = Preprocess.parse("resize_shorter=256;crop=224,224;mean=0.485,0.456,0.406;std=0.229,0.224,0.225")
    batches = list(iter_feeds(tmp_path, graph, batch_size=3, preprocess=imagenet))
    sim = QuantSim(graph)
    sim.compute_encodings(batches, progress=False)
    report = teacher_forced_agreement(sim, sim.to_onnx_qdq(), batches[0])
    assert report.quantizers_compared == sum(1 for q in sim.quantizers.values() if q.kind == "activation"
                                             and q.enabled) > 60
    assert report.forced_code_mismatches == {}
    assert report.float_outside_bound == {}
    assert report.weight_mismatches == []
    assert report.unexplained_flips == {}
    # unforced, our own float sums flip only a handful of codes per million (the chaos seed)
    flips = sum(count for count, _ in report.unforced_flips.values())
    total = sum(size for _, size in report.unforced_flips.values()) or 1
    assert flips / total < 1e-3


@needs_samples
@pytest.mark.parametrize("cfg", ["w8a8_minmax", "w4a8_minmax", "w8a16_minmax"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_export_of_aimets_encodings_rewrites_aimets_files(entry, cfg, tmp_path):
    """Load AIMET's 1.0.0 file, export 1.0.0 and 2.0.0: the entries equal AIMET's own files (2.0.0 adds
    the int32 biases and the data-movement outputs AIMET derives, both computed here)."""
    sim = sim_for(entry, cfg)
    sim.load_encodings(SAMPLES / entry / cfg / "model.encodings")
    for version, name in (("1.0.0", "model.encodings"), ("2.0.0", "model_v2.encodings")):
        paths = sim.export(tmp_path / version, "model", encoding_version=version)
        ours = json.loads(Path(paths["encodings"]).read_text())
        theirs = json.loads((SAMPLES / entry / cfg / name).read_text())
        if version == "1.0.0":
            assert ours["activation_encodings"] == theirs["activation_encodings"]
            assert ours["param_encodings"] == theirs["param_encodings"]
        else:
            ours_by_name = {e["name"]: e for e in ours["encodings"]}
            theirs_by_name = {e["name"]: e for e in theirs["encodings"]}
            assert set(ours_by_name) == set(theirs_by_name)
            for key, entry_ in theirs_by_name.items():
                assert ours_by_name[key] == entry_, key


@needs_samples
@pytest.mark.parametrize("name", ["model.encodings", "model_v2.encodings"])
def test_load_encodings_of_either_version_gives_the_same_simulation(name):
    sim = sim_for("convnet", "w8a8_minmax")
    sim.load_encodings(SAMPLES / "convnet" / "w8a8_minmax" / name)
    x = np.load(SAMPLES / "convnet" / "eval.npz")["input"][:16]
    reference = sim_for("convnet", "w8a8_minmax")
    reference.load_encodings(SAMPLES / "convnet" / "w8a8_minmax" / "model.encodings")
    assert np.array_equal(sim.run({"input": x})["logits"], reference.run({"input": x})["logits"])


@needs_samples
def test_encodings_naming_an_unknown_tensor_are_an_error(tmp_path):
    data = json.loads((SAMPLES / "mlp" / "w8a8_minmax" / "model.encodings").read_text())
    data["activation_encodings"][0]["name"] = "no_such_tensor"
    path = tmp_path / "bad.encodings"
    path.write_text(json.dumps(data))
    sim = sim_for("mlp", "w8a8_minmax")
    with pytest.raises(RefquantError, match="no_such_tensor"):
        sim.load_encodings(path)


@needs_samples
def test_export_to_an_unwritable_place_is_an_error_and_writes_nothing(tmp_path):
    sim = sim_for("mlp", "w8a8_minmax")
    sim.compute_encodings(calib_batches("mlp"), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RefquantError, match="file"):
        sim.export(blocker / "out", "model")
    assert blocker.read_text() == "not a directory"


@needs_samples
def test_six_bit_grid_cannot_become_qdq_and_nothing_is_written(tmp_path):
    sim = QuantSim(refquant.load(sample_model("mlp")), precision="w6a8")
    sim.compute_encodings(calib_batches("mlp"), progress=False)
    with pytest.raises(RefquantError, match="6-bit"):
        sim.export(tmp_path / "out", "model")
    assert not (tmp_path / "out").exists()


@needs_samples
def test_set_parameter_reaches_both_the_simulation_and_the_fp32_reference():
    sim = sim_for("mlp", "w8a8_minmax")
    sim.compute_encodings(calib_batches("mlp"), progress=False)
    x = np.load(SAMPLES / "mlp" / "eval.npz")["input"][:4]
    before_fp32, before_sim = sim.run_float({"input": x})["logits"], sim.run({"input": x})["logits"]
    bias = sim.graph.initializers["l3.bias"]
    sim.set_parameter("l3.bias", bias + 1.0)
    # the last Gemm's bias is not quantized (default config): FP32 logits move by exactly +1
    np.testing.assert_allclose(sim.run_float({"input": x})["logits"], before_fp32 + 1.0, rtol=0, atol=1e-5)
    assert not np.array_equal(sim.run({"input": x})["logits"], before_sim)
    with pytest.raises(RefquantError, match="shape"):
        sim.set_parameter("l3.bias", np.zeros(3, np.float32))


@needs_samples
def test_fp16_simulation_is_a_cast_and_its_qdq_export_matches_onnxruntime(tmp_path):
    import onnxruntime as ort
    sim = QuantSim(refquant.load(sample_model("convnet")), precision="fp16")
    sim.compute_encodings(calib_batches("convnet"), progress=False)
    x = np.load(SAMPLES / "convnet" / "eval.npz")["input"][:8]
    # the graph input's quantizer is a cast: downstream sees exactly float16(x)
    first = sim.run({"input": x}, outputs=["input"])["input"]
    assert np.array_equal(first, x.astype(np.float16).astype(np.float32)) and not np.array_equal(first, x)
    out = sim.run({"input": x})["logits"]
    paths = sim.export(tmp_path, "m")
    theirs = ort.InferenceSession(paths["qdq"], providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.array_equal(out, theirs)  # casts are exact operations: no chaos, whole-model identity
    entry = json.loads(Path(paths["encodings"]).read_text())["activation_encodings"][0]
    assert entry == {"bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "name": "input"}


@needs_samples
def test_fixed_quantized_parameter_is_simulated_and_exported(tmp_path):
    """AdaRound-style: a weight rounded the other way on the grid is what the simulation and both
    exported models use, and re-quantizing it in onnxruntime gives it back exactly."""
    sim = QuantSim(refquant.load(sample_model("mlp")), precision="w4a8")
    sim.compute_encodings(calib_batches("mlp"), progress=False)
    enc = sim.encoding_of("l3.weight")
    weight = sim.graph.initializers["l3.weight"]
    scale = enc.scale[:, None].astype(np.float32)
    codes = np.clip(np.floor(weight / scale), enc.offset[:, None], enc.offset[:, None] + enc.steps).astype(np.float32)
    down = codes * scale  # float32 product, as the QDQ kernels dequantize
    with pytest.raises(RefquantError, match="grid"):
        sim.set_quantized_parameter("l3.weight", weight)  # raw float weights are not on the grid
    sim.set_quantized_parameter("l3.weight", down)
    x = np.load(SAMPLES / "mlp" / "eval.npz")["input"][:8]
    hidden = sim.run({"input": x}, outputs=["/relu_1/Relu_output_0"])["/relu_1/Relu_output_0"]
    # the last Gemm uses the fixed weight (its bias is not quantized); then the logits quantizer
    expected = quantize_dequantize_ref(hidden @ down.T + sim.graph.initializers["l3.bias"], sim.encoding_of("logits"))
    assert np.array_equal(sim.run({"input": x})["logits"], expected)
    paths = sim.export(tmp_path, "m")
    exported = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(paths["model"]).graph.initializer}
    assert np.array_equal(exported["l3.weight"], down)
    report = teacher_forced_agreement(sim, onnx.load(paths["qdq"]), {"input": x})
    assert report.weight_mismatches == [] and report.forced_code_mismatches == {}
    assert np.array_equal(sim.run_float({"input": x})["logits"], sim._float_session.run({"input": x})["logits"])


def quantize_dequantize_ref(x, enc):
    from refquant.quant.qdq import quantize_dequantize
    return quantize_dequantize(x.astype(np.float32), enc)


def test_relu_then_min_by_constant_is_one_clip_with_one_quantizer():
    """CLE's exact per-channel ReLU6 (Relu -> Min(x, c)) gets the same quantizers as Clip(0, 6) would."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bound = np.full((1, 4, 1, 1), 6.0, np.float32) / np.float32([1, 2, 3, 4]).reshape(1, 4, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Min", ["r", "bound"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bound, "bound")])
    sim = QuantSim(refquant.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    enabled = [n for n, q in sim.quantizers.items() if q.enabled and q.kind != "param"]
    assert enabled == ["x", "y"]  # Conv output: Conv+Relu supergroup; Relu output: part of the clip


@pytest.mark.parametrize("scheme", ["min_max", "tf_enhanced"])
def test_pow_exponent_is_a_setting_not_data(scheme):
    """A quantized exponent (2.0 -> 1.99...) makes x^e of negative x NaN: the exponent is left alone."""
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("Pow", ["x", "e"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.float32(2.0), "e")])
    sim = QuantSim(refquant.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])),
                   quant_scheme=scheme)
    assert "e" not in sim.quantizers
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    sim.compute_encodings([{"x": x}], progress=False)
    assert np.isfinite(sim.run({"x": x})["y"]).all()


@needs_samples
@pytest.mark.parametrize("scheme", ["percentile", "entropy", "mse"])
def test_distribution_schemes_calibrate_activations_and_take_weights_by_min_max(scheme):
    # 99th percentile: with 64 samples the default 99.99 % cuts less than one value per tensor
    options = {"percentile": 99.0} if scheme == "percentile" else {}
    sim = QuantSim(refquant.load(sample_model("mlp")), quant_scheme=scheme, scheme_options=options)
    reference = QuantSim(refquant.load(sample_model("mlp")))
    for s in (sim, reference):
        s.compute_encodings(calib_batches("mlp"), progress=False)
    assert sim.param_scheme == "min_max"
    assert np.array_equal(sim.encoding_of("l1.weight").scale, reference.encoding_of("l1.weight").scale)
    # activations do use the scheme: a clipped range inside min-max's for at least one tensor
    narrower = [n for n in ("/relu/Relu_output_0", "/relu_1/Relu_output_0", "logits")
                if sim.encoding_of(n).max < reference.encoding_of(n).max * 0.999]
    assert narrower


# ------------------------------------------------------------------------------ prepare=
def _affine_block_model():
    """Conv -> * per-channel scale -> + shift -> Relu: a learnable affine block that preparation folds."""
    from onnx import TensorProto, helper, numpy_helper
    r = np.random.default_rng(3)
    inits = {"w": r.normal(0, 0.5, (4, 3, 3, 3)), "s": r.uniform(0.05, 2, (1, 4, 1, 1)), "t": r.normal(0, 1, (1, 4, 1, 1))}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["c", "s"], ["m"], name="mul"),
         helper.make_node("Add", ["m", "t"], ["a"], name="add"),
         helper.make_node("Relu", ["a"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_quantsim_prepares_the_graph_by_default_and_exports_a_model_for_the_original_inputs(tmp_path):
    model = _affine_block_model()
    graph = refquant.load(model)
    x = np.random.default_rng(4).standard_normal((8, 3, 6, 6)).astype(np.float32)
    sim = QuantSim(graph)
    assert [n.op_type for n in sim.graph.nodes] == ["Conv", "Relu"]  # the affine block is in the Conv
    assert [n.op_type for n in graph.nodes] == ["Conv", "Mul", "Add", "Relu"]  # the given graph is untouched
    assert sim.prepare_report.pass_record("fuse_mul_add_chains").status == "applied"
    assert "c" not in sim.quantizers and "m" not in sim.quantizers  # tensors that no longer exist
    assert sim.quantizers["w"].kind == "param" and sim.quantizers["conv.bias"].role == "bias"
    assert sim.graph.input_names == graph.input_names and sim.graph.output_names == graph.output_names
    # the FP32 reference is the original model's output (within float rounding of the folded weights)
    want = refquant.Session(graph).run({"input": x})["y"]
    assert np.abs(sim.run_float({"input": x})["y"] - want).max() <= 1e-5 * np.abs(want).max()
    sim.compute_encodings([{"input": x}], progress=False)
    files = sim.export(tmp_path)
    session = exact_ort_session(files["qdq"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["y"]
    (got,) = session.run(None, {"input": x})
    # W8A8 of a 27-tap conv on N(0, 1) data: within a few output steps of FP32, far from a wrong model
    step = sim.encoding_of("y").scale
    assert np.abs(got - want).max() <= 8 * float(np.max(step))


def test_quantsim_prepare_false_simulates_the_graph_as_given(tmp_path):
    graph = refquant.load(_affine_block_model())
    sim = QuantSim(graph, prepare=False)
    assert _same_model(sim.graph, graph) and sim.prepare_report is None and not sim.graph_was_prepared
    assert {"c", "m", "a"} <= set(sim.quantizers)  # AIMET's placement on the unprepared graph
    sim.compute_encodings([{"input": np.ones((2, 3, 6, 6), np.float32)}], progress=False)
    files = sim.export(tmp_path)
    with pytest.raises(RefquantError, match=r"\['c', 's', 'm', 't'\].*build it with prepare=False"):
        QuantSim(graph).load_encodings(files["encodings"])  # names of the graph as given ('a' survives)
    QuantSim(graph, prepare=False).load_encodings(files["encodings"])
    only = QuantSim(graph, prepare=["remove_dead_code"])  # a pass list: nothing to do, the graph is kept
    assert _same_model(only.graph, graph) and [p.name for p in only.prepare_report.passes] == ["remove_dead_code"]


def _same_model(simulated, given) -> bool:
    """The sim simulates the given graph itself (same nodes, same arrays) through its own containers."""
    return (simulated is not given and simulated.initializers is not given.initializers
            and all(a is b for a, b in zip(simulated.nodes, given.nodes)) and len(simulated.nodes) == len(given.nodes)
            and all(simulated.initializers[k] is v for k, v in given.initializers.items())
            and simulated.initializers.keys() == given.initializers.keys())


def test_parameter_updates_never_reach_the_callers_graph():
    """Bias correction (sim.set_parameter) on a sim whose preparation changed nothing: the sim's FP32
    reference and simulation see the new bias, the caller's model keeps its own."""
    from refquant.ptq.bias_correction import bias_correction

    from onnx import TensorProto, helper, numpy_helper
    r = np.random.default_rng(4)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(r.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(r.normal(0, 0.5, 4).astype(np.float32), "b")]),
        opset_imports=[helper.make_opsetid("", 17)])
    graph = refquant.load(model)
    before = {k: v.copy() for k, v in graph.initializers.items()}
    rng = np.random.default_rng(0)
    data = [{"input": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)} for _ in range(2)]
    for prepare in (False, True):  # default preparation: no pass applies to this graph
        sim = QuantSim(graph, prepare=prepare, param_bw=4)
        sim.compute_encodings(data, progress=False)
        bias_correction(sim, data, progress=False)
        changed = [k for k in before if not np.array_equal(sim.graph.initializers.get(k, before[k]), before[k])]
        assert changed  # the correction did something to the sim's copy ...
        assert all(np.array_equal(graph.initializers[k], v) for k, v in before.items())  # ... and not to ours


@needs_samples
@pytest.mark.parametrize("entry", ENTRIES)
def test_default_preparation_changes_nothing_on_the_aimet_samples(entry):
    """The AIMET comparisons above build QuantSims with the default preparation: on these models no pass
    applies, so the quantizers (and so the encodings compared byte for byte) are AIMET's."""
    graph = refquant.load(sample_model(entry))
    prepared, plain = QuantSim(graph), QuantSim(graph, prepare=False)
    assert _same_model(prepared.graph, graph)
    assert not [p.name for p in prepared.prepare_report.passes if p.status == "applied"]
    assert prepared.quantizers.keys() == plain.quantizers.keys()


def test_quantsim_warns_and_simulates_the_graph_as_given_when_preparation_cannot_be_verified():
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(  # a Reshape target that fits no input of the declared shape: it never runs
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])],
        [numpy_helper.from_array(np.int64([4, 5]), "s")])
    graph = refquant.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.warns(UserWarning, match="the model was not prepared .*does not run on random feeds"):
        sim = QuantSim(graph)
    assert _same_model(sim.graph, graph) and sim.prepare_report.findings[0].code == "pass-skipped"
    with pytest.raises(RefquantError, match="unknown pass"):  # a wrong pass name is an error, not a warning
        QuantSim(graph, prepare="fold_batchnorm,no_such_pass")


def test_bn_reestimation_on_a_quantsim_whose_preparation_folded_the_bns_brings_them_back_and_folds_them_again():
    """QuantSim(graph) folds the BN in its preparation: re-estimation rebuilds the sim on the model prepared without
    that pass, re-estimates and folds again, and ends where a prepare=False sim ends, bit for bit."""
    from onnx import TensorProto, helper, numpy_helper

    from refquant.ptq.bn_reestimation import reestimate_batchnorm
    r = np.random.default_rng(5)
    inits = {"w": r.normal(0, 0.5, (4, 3, 1, 1)), "g": r.uniform(0.5, 2, 4), "b": r.normal(0, 1, 4),
             "m": r.normal(0, 1, 4), "v": r.uniform(0.5, 2, 4)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    graph = refquant.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = [{"input": r.standard_normal((4, 3, 4, 4)).astype(np.float32)}]
    sim = QuantSim(graph)
    assert [n.op_type for n in sim.graph.nodes] == ["Conv"]
    sim.compute_encodings(data, progress=False)
    assert reestimate_batchnorm(sim, data, progress=False) is sim and [n.op_type for n in sim.graph.nodes] == ["Conv"]
    plain = QuantSim(graph, prepare=False)
    plain.compute_encodings(data, progress=False)
    folded = reestimate_batchnorm(plain, data, progress=False).graph
    assert [n.op_type for n in folded.nodes] == ["Conv"]
    assert all(np.array_equal(folded.initializers[k], sim.graph.initializers[k]) for k in folded.initializers)
    assert not np.array_equal(folded.initializers["w"], QuantSim(graph).graph.initializers["w"])  # new statistics
    for each in (sim, plain):  # the activations calibrated for the new statistics
        each.compute_encodings(data, progress=False)
    np.testing.assert_array_equal(sim.run(data[0])["y"], plain.run(data[0])["y"])

    interrupted = QuantSim(graph)
    interrupted.compute_encodings(data, progress=False)
    prepared_graph, out_before = interrupted.graph, interrupted.run(data[0])["y"]

    def stop():
        raise KeyboardInterrupt
        yield

    with pytest.raises(KeyboardInterrupt):
        reestimate_batchnorm(interrupted, stop, progress=False)
    assert interrupted.graph is prepared_graph  # the simulation as it was given
    np.testing.assert_array_equal(interrupted.run(data[0])["y"], out_before)
