"""The `refquant` command: output of each subcommand and one-line errors with exit code 2."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from refquant.cli import main
from refquant.examples import RNET

from .helpers import FLOAT, exact_ort_session, make_model


@pytest.fixture
def tiny_model(tmp_path):
    model = make_model([helper.make_node("Mul", ["x", "w"], ["y"])], [("x", FLOAT, ["n", 2])], [("y", FLOAT, ["n", 2])],
                       {"w": np.float32([2, -3])})
    path = tmp_path / "tiny.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_info_lists_ops_parameters_and_io(capsys):
    assert main(["info", str(RNET)]) == 0
    out = capsys.readouterr().out
    assert "input: float32 [batch, 3, 24, 24]" in out
    assert "parameters: 100,178" in out  # the R-Net's 100,178 float weights
    assert "Conv" in out and "unsupported ops: none" in out
    # 3 convs (3x3 -> 28 on 24x24, 3x3 -> 48 on 11x11 pooled, 2x2 -> 64 on 4x4 pooled) + 3 Gemms,
    # counted by hand: 22*22*28*27 + 9*9*48*252 + 3*3*64*192 + 576*128 + 128*2 + 128*4 = 1,530,768
    assert "MACs per run (symbolic dims as 1): 1,530,768" in out


def test_info_reports_unsupported_ops_without_failing(tmp_path, capsys):
    model = make_model([helper.make_node("FancyOp", ["x"], ["y"])], [("x", FLOAT, [1])], [("y", FLOAT, [1])])
    path = tmp_path / "fancy.onnx"
    path.write_bytes(model.SerializeToString())
    assert main(["info", str(path)]) == 1
    assert "unsupported ops: FancyOp" in capsys.readouterr().out


def test_run_writes_outputs(tiny_model, tmp_path, capsys):
    x = np.float32([[1, 1], [2, 2]])
    np.save(tmp_path / "x.npy", x)
    out_path = tmp_path / "out.npz"
    assert main(["run", str(tiny_model), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(out_path)]) == 0
    with np.load(out_path) as data:
        np.testing.assert_array_equal(data["y"], [[2, -3], [4, -6]])
    assert "y: float32 [2, 2]" in capsys.readouterr().out


def test_compare_reports_the_worst_error(tiny_model, capsys):
    assert main(["compare", str(tiny_model), "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "worst relative error (max|a-b| / max|b|): 0.000e+00" in out  # one exact multiply


@pytest.mark.parametrize("argv, fragment", [
    (["info", "/does/not/exist.onnx"], "/does/not/exist.onnx: no such model file"),
    (["run", "MODEL", "--input", "x=/no/such.npy"], "--input x: no such file"),
    (["run", "MODEL", "--input", "x=BADNPY"], "cannot read"),
    (["run", "MODEL", "--input", "z=GOODNPY"], "unknown feed(s) ['z']"),
])
def test_errors_are_one_line_with_exit_code_2(argv, fragment, tiny_model, tmp_path, capsys):
    (tmp_path / "bad.npy").write_text("not numpy")
    np.save(tmp_path / "good.npy", np.ones((1, 2), np.float32))
    subst = {"MODEL": str(tiny_model), "x=BADNPY": f"x={tmp_path / 'bad.npy'}",
             "z=GOODNPY": f"z={tmp_path / 'good.npy'}"}
    argv = [subst.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refquant: error:")
    assert fragment in err


def test_demo_walks_the_workflow_and_exports_every_step(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FP32: face accuracy 100.0%" in out and "(OK" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith("w")}
    assert list(rows) == ["w16a16", "w8a16", "w8a8", "w4a8"]
    prob_sqnr = [float(rows[p][2]) for p in rows]
    # fewer bits, more noise: the SQNR of the face probability falls at every step
    assert prob_sqnr == sorted(prob_sqnr, reverse=True)
    assert prob_sqnr[0] > 80 and float(rows["w8a8"][1].rstrip("%")) >= 95
    for precision in rows:
        files = sorted(p.name for p in (tmp_path / precision).iterdir())
        assert files == ["mtcnn_rnet.encodings", "mtcnn_rnet.onnx", "mtcnn_rnet_qdq.onnx"]


def test_quantize_writes_three_files_and_prints_sqnr_and_accuracy(tmp_path, capsys):
    from refquant.examples import lfw_rnet_inputs, RNET
    x, labels = lfw_rnet_inputs()
    # AIMET's calibration subset of the same crops (refs/aimet_samples/README.md): faces and non-faces
    np.save(tmp_path / "calib.npy", x[np.random.default_rng(0).choice(len(x), 64, replace=False)])
    np.save(tmp_path / "eval.npy", x)
    np.save(tmp_path / "labels.npy", labels)
    code = main(["quantize", str(RNET), "--data", str(tmp_path / "calib.npy"), "--eval-data",
                 str(tmp_path / "eval.npy"), "--labels", str(tmp_path / "labels.npy"), "--precision", "w8a16", "--primary", "prob",
                 "--encoding-version", "2.0.0", "-o", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy (prob): 100.00% (FP32 100.00%)" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "mtcnn_rnet.encodings", "mtcnn_rnet.onnx", "mtcnn_rnet_qdq.onnx"]
    import json
    assert json.loads((tmp_path / "out" / "mtcnn_rnet.encodings").read_text())["version"] == "2.0.0"
    sqnr = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
            if line.split() and line.split()[0] in ("bbox_reg", "prob")}
    assert sqnr["prob"] > 40 and sqnr["bbox_reg"] > 25  # AIMET's W8A16 on this model: 54.2 / 32.8 dB


def test_quantize_bad_labels_path_fails_before_any_work(tmp_path, capsys):
    from refquant.examples import RNET
    code = main(["quantize", str(RNET), "--data", str(tmp_path), "--labels", str(tmp_path / "nope.npy"),
                 "-o", str(tmp_path / "out")])
    assert code == 2
    assert "nope.npy" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_intsim_command_exports_a_program_onnxruntime_runs_bit_exactly(tmp_path, capsys):
    from refquant.examples import RNET, lfw_rnet_inputs
    from refquant.intsim.unsigned_weights import onnxruntime_saturates_u8s8
    x, _ = lfw_rnet_inputs()
    np.save(tmp_path / "x.npy", x[:32])
    out = tmp_path / "rnet_int.onnx"
    assert main(["intsim", str(RNET), "--data", str(tmp_path / "x.npy"), "--export", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prob" in printed
    # the note names the flag exactly where onnxruntime's uint8 x int8 kernels saturate
    assert ("export with --unsigned-weights" in printed) == onnxruntime_saturates_u8s8()
    import onnxruntime as ort

    import refquant
    from refquant.intsim import lowering  # noqa: F401  (registers the program's own ops)
    unsigned = tmp_path / "rnet_int_u8.onnx"
    assert main(["intsim", str(RNET), "--data", str(tmp_path / "x.npy"), "--export", str(unsigned),
                 "--unsigned-weights"]) == 0
    assert "note:" not in capsys.readouterr().out
    weights = [t for t in onnx.load(unsigned).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights == []  # every int8 weight (and zero point) is uint8 now
    for path, session in ((out, exact_ort_session(out)),  # the tests' oracle: exact on any CPU
                          (unsigned, ort.InferenceSession(str(unsigned), providers=["CPUExecutionProvider"]))):
        theirs = session.run(None, {"input": x[:8]})
        ours = refquant.Session(refquant.load(path)).run({"input": x[:8]})
        names = [o.name for o in session.get_outputs()]
        for name, value in zip(names, theirs):
            assert np.array_equal(ours[name], value), (path.name, name)


def test_intsim_command_reports_an_overflowing_accumulator(tmp_path, capsys):
    """W8A16 MatMul with K = 1024 and weights 1, fed ones: uint16 codes 65535 (zero point 0) times int8 codes 127
    sum to 65535 * 127 * 1024 = 8.5e9 > 2^31 - 1: the command prints the per-layer report and exits 1."""
    import onnx

    k = 1024
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="wide_matmul")], [("x", FLOAT, ["n", k])],
                       [("y", FLOAT, ["n", 1])], {"w": np.ones((k, 1), np.float32)})
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((4, k), np.float32))
    code = main(["intsim", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npy"), "--precision", "w8a16",
                 "--requant", "tflite_double"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "wide_matmul" in out and "overflow" in err
    with pytest.warns(RuntimeWarning, match="wrapped around"):  # the target wraps: the gap report runs on
        code = main(["intsim", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npy"), "--precision", "w8a16",
                     "--requant", "tflite_double", "--overflow", "wrap"])
    assert code == 0
