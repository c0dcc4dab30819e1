"""The ``refquant ptq`` and ``refquant autoquant`` commands: end to end on the AIMET convnet sample; the
per-step table agrees with its JSON and with the metric recomputed independently (onnxruntime's FP32
outputs, NumPy's SQNR) from the techniques' own functions and from the exported files; bad input exits 2
with one line."""
import importlib
import inspect
import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

import refquant
from refquant.cli import main
from refquant.ptq import equalize, fold_batchnorms
from refquant.quant import QuantSim

from .helpers import ort_run

SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
CONVNET = SHARED / "refs" / "aimet_samples" / "convnet"
pytestmark = pytest.mark.skipif(not CONVNET.is_dir(), reason=f"AIMET convnet sample not found at {CONVNET}")


def plain_sim(graph, **kwargs):
    """A QuantSim of ``graph`` as given (no preparation rewrite), as the commands build them."""
    if "prepare" in inspect.signature(QuantSim.__init__).parameters:
        kwargs["prepare"] = False
    return QuantSim(graph, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Calibration (64) and evaluation (48) files, and onnxruntime's FP32 logits on the evaluation set."""
    folder = tmp_path_factory.mktemp("data")
    calib = np.load(CONVNET / "calib.npz")["input"]
    ev = np.load(CONVNET / "eval.npz")["input"][:48]
    np.save(folder / "calib.npy", calib)
    np.save(folder / "eval.npy", ev)
    reference = ort_run(onnx.load(CONVNET / "model.onnx"), {"input": ev})["logits"]
    return {"calib": calib, "eval": ev, "reference": reference, "calib_path": str(folder / "calib.npy"),
            "eval_path": str(folder / "eval.npy")}


def sqnr_of(sim, data) -> float:
    """SQNR (dB) of the sim's logits against onnxruntime's FP32 logits of the original model."""
    ev = data["eval"]
    ours = np.concatenate([sim.run({"input": ev[i:i + 16]})["logits"] for i in range(0, len(ev), 16)])
    ref = data["reference"].astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - ours) ** 2)))


def table_rows(text: str) -> dict[str, float]:
    """step -> metric from the printed per-step table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("step "))
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("wrote"):
            break
        fields = line.split()
        rows[fields[0]] = float(fields[1])
    return rows


# onnxruntime's FP32 logits differ from refquant's by ~1e-6 relative while the W4A8 noise is ~1e-1 relative
# (SQNR 10-30 dB): the recomputed SQNR can move by far less than this
SQNR_TOL = 0.01


def test_ptq_runs_and_its_table_agrees_with_recomputing(data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["ptq", str(CONVNET / "model.onnx"), "--data", data["calib_path"], "--eval-data", data["eval_path"],
                 "--technique", "bn_fold,cle,bias_correction,adaround,seq_mse", "--precision", "w4a8", "--per-tensor",
                 "--adaround-iterations", "20", "--no-progress", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    assert list(rows) == ["calibrated", "bn_fold", "cle", "bias_correction", "adaround", "seq_mse"]
    # the command: seq_mse after adaround, whose frozen weight encodings leave it nothing to search
    assert "seq_mse" in printed and "AdaRound froze the weight encodings" in printed
    assert rows["seq_mse"] == rows["adaround"]
    report = json.loads((out / "ptq.json").read_text())
    assert [s["step"] for s in report["steps"]] == list(rows)
    for step in report["steps"]:  # the table prints the JSON's values to 3 decimals
        assert abs(rows[step["step"]] - step["metric"]) <= 0.0005 + 1e-12, step
        assert step["seconds"] >= 0

    # the first three rows recomputed with the techniques' functions and an independent SQNR; cle after bn_fold is
    # equalize on the unfolded model: the folded BNs' statistics still feed its high-bias absorption
    graph = refquant.load(CONVNET / "model.onnx")
    for step, g in (("calibrated", graph), ("bn_fold", fold_batchnorms(graph)), ("cle", equalize(graph))):
        sim = plain_sim(g, precision="w4a8", config="per_tensor")
        sim.compute_encodings(data["calib"], progress=False)
        assert abs(sqnr_of(sim, data) - report["steps"][[s["step"] for s in report["steps"]].index(step)]["metric"]) \
            < SQNR_TOL, step

    # the last row is the exported model + encodings
    for name in ("model.onnx", "model.encodings", "model_qdq.onnx"):
        assert (out / name).is_file(), name
    sim = plain_sim(refquant.load(out / "model.onnx"), precision="w4a8", config="per_tensor")
    sim.load_encodings(out / "model.encodings")
    assert abs(sqnr_of(sim, data) - report["steps"][-1]["metric"]) < SQNR_TOL
    assert not any(n.op_type == "BatchNormalization" for n in sim.graph.nodes)  # bn_fold's graph was exported


def test_ptq_not_applicable_technique_is_reported(data, tmp_path, capsys):
    folded = tmp_path / "folded.onnx"
    refquant.save(fold_batchnorms(refquant.load(CONVNET / "model.onnx")), folded)
    code = main(["ptq", str(folded), "--data", data["calib_path"], "--eval-data", data["eval_path"], "--eval", "top1",
                 "--technique", "bn_fold", "--no-progress", "-o", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "not applicable: no BatchNormalization to fold" in printed
    rows = table_rows(printed)
    assert rows["bn_fold"] == rows["calibrated"]



@pytest.mark.parametrize("command", ["ptq", "autoquant"])
def test_unsigned_weights_reach_the_exported_qdq_model(data, tmp_path, capsys, command):
    """--unsigned-weights: the QDQ model's weight grids are uint8 (zero point + 128); without it, int8."""
    from refquant.intsim.unsigned_weights import onnxruntime_saturates_u8s8

    zero_point_types = {}
    for flag in ([], ["--unsigned-weights"]):
        out = tmp_path / ("u8" if flag else "s8")
        goal = ["--technique", "bn_fold"] if command == "ptq" else ["--target", "0", "--steps", "bn_fold"]
        main([command, str(CONVNET / "model.onnx"), "--data", data["calib_path"], "--no-progress", "-o", str(out),
              "--prefix", "m", *goal, *flag])
        printed = capsys.readouterr().out
        assert ("export with --unsigned-weights" in printed) == (onnxruntime_saturates_u8s8() and not flag)
        model = onnx.load(out / "m_qdq.onnx")
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        weight_codes = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits}
        zero_point_types[bool(flag)] = {inits[n.input[2]].dtype for n in model.graph.node
                                        if n.op_type == "DequantizeLinear" and n.input[0] in weight_codes}
    # the int8 weight grids become uint8 (constants quantized as activations were uint8 already)
    assert np.dtype(np.int8) in zero_point_types[False] and zero_point_types[True] == {np.dtype(np.uint8)}

def test_autoquant_command(data, tmp_path, capsys):
    args = ["autoquant", str(CONVNET / "model.onnx"), "--data", data["calib_path"], "--eval-data", data["eval_path"],
            "--precision", "w4a8", "--per-tensor", "--no-progress"]
    # top-1 agreement: every sample agrees at the baseline, so a 5-point drop is met at once
    code = main(args + ["--eval", "top1", "--allowed-drop", "5", "-o", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "a" / "autoquant.json").read_text())
    assert report["target_met"] and report["applied"] == []
    assert [s["status"] for s in report["steps"][2:]] == ["skipped"] * 5
    assert "goal 95.000 met" in printed

    # an SQNR target out of reach: exit 1, every step tried, the best state exported
    code = main(args + ["--target", "80", "--steps", "bn_fold,quant_scheme", "--schemes",
                        "min_max/min_max,tf_enhanced/tf_enhanced", "-o", str(tmp_path / "b")])
    capsys.readouterr()
    assert code == 1
    report = json.loads((tmp_path / "b" / "autoquant.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["fp32", "baseline", "bn_fold", "quant_scheme"]
    assert not report["target_met"]
    sim = plain_sim(refquant.load(tmp_path / "b" / "model.onnx"), precision="w4a8", config="per_tensor")
    sim.load_encodings(tmp_path / "b" / "model.encodings")
    assert abs(sqnr_of(sim, data) - report["score"]) < SQNR_TOL
    assert (tmp_path / "b" / "autoquant.html").is_file()


@pytest.mark.parametrize("extra, message", [
    (["ptq", "--technique", "adaround,cle"], "must come before"),
    (["ptq", "--technique", "bn_fold,quantize"], "unknown quantize"),
    (["autoquant", "--allowed-drop", "1"], "give a target"),  # SQNR of FP32 is +inf
    (["autoquant", "--target", "30", "--schemes", "min_max"], "WEIGHTS/ACTIVATIONS"),
])
def test_bad_input_exits_2_with_one_line(data, tmp_path, capsys, extra, message):
    command, *rest = extra
    code = main([command, str(CONVNET / "model.onnx"), "--data", data["calib_path"], "--no-progress",
                 "-o", str(tmp_path / "out"), *rest])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("choice, flags, expected", [
    ("default", [], (True, None, None)), ("all", [], ("all", None, None)),
    ("none", ["--adaround-quantized-inputs"], (False, True, None)),
    ("default", ["--adaround-qdrop", "0.25"], (True, True, 0.25))])
def test_ptq_adaround_options_reach_adaround(data, tmp_path, monkeypatch, choice, flags, expected):
    import refquant.ptq.adaround as adaround_module

    seen = []
    real = adaround_module.adaround

    def spy(sim, data, **options):
        seen.append((options.get("include_activation"), options.get("quantize_activations"), options.get("qdrop")))
        return real(sim, data, **options)

    monkeypatch.setattr(adaround_module, "adaround", spy)
    code = main(["ptq", str(CONVNET / "model.onnx"), "--data", data["calib_path"], "--technique", "adaround",
                 "--precision", "w4a8", "--adaround-iterations", "2", "--adaround-activation", choice,
                 "--no-progress", "-o", str(tmp_path / "out")] + flags)
    assert code == 0 and seen == [expected]


@pytest.mark.parametrize("flag, pattern", [
    ("--adaround-choose-inputs", r"quantize_activations=choose; inputs chosen: .*held-out SQNR"),
    ("--adaround-per-layer-inputs", r"quantize_activations=per_layer; quantized inputs chosen on [0-5] of 5 layers")])
def test_ptq_adaround_input_choice_is_named_in_the_step_table(data, tmp_path, capsys, flag, pattern):
    code = main(["ptq", str(CONVNET / "model.onnx"), "--data", data["calib_path"], "--technique", "adaround",
                 "--precision", "w4a8", "--adaround-iterations", "2", flag, "--no-progress",
                 "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("adaround"))
    assert re.search(pattern, line)


def test_adaround_input_flags_exclude_each_other(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ptq", str(CONVNET / "model.onnx"), "--data", data["calib_path"], "--technique", "adaround",
              "--adaround-choose-inputs", "--adaround-quantized-inputs", "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ptq", "autoquant"])
@pytest.mark.parametrize("option, flags, expected", [
    ("shrinkage", [], "auto"), ("shrinkage", ["--adaround-shrinkage", "0"], 0.0),
    ("shrinkage", ["--adaround-shrinkage", "0.4"], 0.4),
    ("learning_rate", [], "absent"),  # absent: adaround's own default ("scaled") applies
    ("learning_rate", ["--adaround-learning-rate", "scaled"], "scaled"),
    ("learning_rate", ["--adaround-learning-rate", "0.004"], 0.004),
    ("nodes_to_include", [], "absent"),  # absent: every layer
    ("nodes_to_include", ["--adaround-nodes", "/c2/Conv, /fc/Gemm"], ["/c2/Conv", "/fc/Gemm"])])
def test_adaround_options_reach_adaround(data, tmp_path, monkeypatch, command, option, flags, expected):
    import refquant.ptq.adaround as adaround_module

    seen = []
    real = adaround_module.adaround

    def spy(sim, data, **options):
        seen.append(options.get(option, "absent"))
        return real(sim, data, **options)

    monkeypatch.setattr(adaround_module, "adaround", spy)
    extra = ["--technique", "adaround"] if command == "ptq" else ["--target", "80", "--steps", "adaround"]
    main([command, str(CONVNET / "model.onnx"), "--data", data["calib_path"], "--precision", "w4a8",
          "--adaround-iterations", "2", "--no-progress", "-o", str(tmp_path / "out")] + extra + flags)
    assert seen and all(value == expected for value in seen)


@pytest.mark.parametrize("flag, value", [("--adaround-shrinkage", v) for v in ("1.5", "-0.1", "some")] +
                         [("--adaround-learning-rate", v) for v in ("0", "-0.1", "inf", "some")])
def test_a_bad_adaround_option_value_exits_2(data, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["ptq", str(CONVNET / "model.onnx"), "--data", data["calib_path"], "--technique", "adaround",
              flag, value, "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("flag, expected", [([], [(None, None), (True, None), (True, 0.5)]),
                                           (["--adaround-quantized-inputs"], [(True, None)]),
                                           (["--adaround-qdrop", "0.3"], [(True, 0.3)]),
                                           # "choose" runs its two held-out trials through adaround itself
                                           (["--adaround-choose-inputs"], [("choose", None), (False, None),
                                                                            (True, None)]),
                                           (["--adaround-per-layer-inputs"], [("per_layer", None)])])
def test_autoquant_tries_each_adaround_input_unless_told(data, tmp_path, monkeypatch, flag, expected):
    import refquant.ptq.adaround as adaround_module

    seen = []
    real = adaround_module.adaround

    def spy(sim, data, **options):
        seen.append((options.get("quantize_activations"), options.get("qdrop")))
        return real(sim, data, **options)

    monkeypatch.setattr(adaround_module, "adaround", spy)
    main(["autoquant", str(CONVNET / "model.onnx"), "--data", data["calib_path"], "--precision", "w4a8",
          "--target", "80", "--steps", "adaround", "--adaround-iterations", "2", "--no-progress",
          "-o", str(tmp_path / "out")] + flag)
    assert seen == expected
    steps = json.loads((tmp_path / "out" / "autoquant.json").read_text())["steps"]
    trials = next(s for s in steps if s["step"] == "adaround")["trials"]
    assert [t["key"] for t in trials] == (["adaround", "adaround, quantized inputs", "adaround, qdrop"]
                                          if not flag else [])


@pytest.mark.parametrize("command, technique", [("ptq", "adaround"), ("ptq", "seq_mse"), ("ptq", "bias_correction"),
                                                ("ptq", "prepare"), ("autoquant", "adaround"),
                                                ("autoquant", "prepare")])
def test_the_techniques_read_an_image_folder_with_the_given_preprocess(tmp_path, monkeypatch, command, technique):
    """--preprocess reached the calibration and the metric but not the techniques, which read the folder with the
    default preprocessing: AdaRound fitted other inputs than the ones calibrated on."""
    from onnx import helper
    from PIL import Image

    import refquant.ptq.autoquant as autoquant_module
    from refquant.data import Preprocess, iter_feeds

    from .helpers import FLOAT, make_model

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                       [("x", FLOAT, [None, 3, 8, 8])], [("y", FLOAT, None)], {"w": weight})
    onnx.save(model, tmp_path / "conv.onnx")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    spec = "mean=0.2,0.3,0.4;std=0.1,0.2,0.3"
    graph = refquant.load(tmp_path / "conv.onnx")
    expected = np.concatenate([f["x"] for f in iter_feeds(folder, graph, batch_size=4,
                                                          preprocess=Preprocess.parse(spec))])
    default = np.concatenate([f["x"] for f in iter_feeds(folder, graph, batch_size=4)])
    assert not np.allclose(expected, default)  # the two preprocessings differ

    seen = []
    real = autoquant_module.apply_technique

    def spy(sim, name, data, *args, **kwargs):
        seen.append(np.concatenate([f["x"] for f in iter_feeds(data, sim.graph, batch_size=4)]))
        return real(sim, name, data, *args, **kwargs)

    prepare_module = importlib.import_module("refquant.prepare")  # the attribute refquant.prepare is the function
    real_prepare = prepare_module.prepare

    def prepare_spy(graph, passes="default", data=None, **kwargs):
        seen.append(np.concatenate([f["x"] for f in iter_feeds(data, graph, batch_size=4)]))
        return real_prepare(graph, passes, data, **kwargs)

    monkeypatch.setattr(autoquant_module, "apply_technique", spy)
    monkeypatch.setattr(prepare_module, "prepare", prepare_spy)
    extra = ["--technique", technique] if command == "ptq" else ["--target", "200", "--steps", technique]
    main([command, str(tmp_path / "conv.onnx"), "--data", str(folder), "--preprocess", spec, "--batch-size", "4",
          "--precision", "w4a8", "--adaround-iterations", "2", "--no-progress", "-o", str(tmp_path / "out")] + extra)
    assert seen and all(np.array_equal(x, expected) for x in seen)
