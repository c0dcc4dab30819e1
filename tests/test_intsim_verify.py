"""`refquant verify`: a target's per-tensor dump against the integer program (refquant.intsim.verify).

The "targets" here are the integer program itself run under another requantization scheme, and dumps edited
by hand (one element moved by one step, wrong shapes, dtypes and names). Encodings are power-of-two scales
with odd zero points, so that exact .5 ties occur and the rounding schemes disagree (numerics.md §5: on random
scales all schemes agreed in every measurement)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.cli import main
from refquant.intsim.program import IntSim
from refquant.intsim.verify import DumpError, read_dump, tensor_filename, tensor_name_from_filename, verify, \
    write_dump
from refquant.quant import QuantSim
from refquant.quant.encoding import from_onnx

from .helpers import FLOAT, make_model

X, C1, R1, C2, FL, Y = "input:0", "/conv1/Conv_output_0", "/relu1/Relu_output_0", "/conv2/Conv_output_0", \
    "/flat/Flatten_output_0", "logits"
ORDER = [X, R1, C2, FL, Y]  # the tensors the program holds as codes, in graph order (c1 is fused into r1)


def _model():
    rng = np.random.default_rng(0)
    init = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
            "w2": rng.normal(0, 0.2, (4, 8, 3, 3)), "b2": rng.normal(0, 0.1, 4),
            "w3": rng.normal(0, 0.2, (64, 10)), "b3": rng.normal(0, 0.1, 10)}
    nodes = [helper.make_node("Conv", [X, "w1", "b1"], [C1], name="/conv1/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", [C1], [R1], name="/relu1/Relu"),
             helper.make_node("Conv", [R1, "w2", "b2"], [C2], name="/conv2/Conv", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", [C2], [FL], name="/flat/Flatten"),
             helper.make_node("Gemm", [FL, "w3", "b3"], [Y], name="/fc/Gemm")]
    return make_model(nodes, [(X, FLOAT, [1, 3, 8, 8])], [(Y, FLOAT, [1, 10])],
                      {k: v.astype(np.float32) for k, v in init.items()})


@pytest.fixture(scope="module")
def sim():
    rng = np.random.default_rng(1)
    s = QuantSim(refquant.load(_model()))
    s.compute_encodings([{X: rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)], progress=False)
    for name, (scale, zp) in {X: (2 ** -5, 127), R1: (2 ** -4, 3), C2: (2 ** -4, 131), Y: (2 ** -3, 129)}.items():
        s.set_encoding(name, from_onnx(np.float32(scale), zp, "uint8"))
    for name, axis, n in (("w1", 0, 8), ("w2", 0, 4), ("w3", 1, 10)):
        s.set_encoding(name, from_onnx(np.full(n, 2 ** -7, np.float32), np.zeros(n), "int8", axis=axis))
    return s


@pytest.fixture(scope="module")
def feeds():
    return {X: np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)}


@pytest.fixture(scope="module")
def ort_codes(sim, feeds):
    return IntSim(sim, requant="ort").tensor_codes(feeds)


@pytest.fixture(scope="module")
def tflite_codes(sim, feeds):
    return IntSim(sim, requant="tflite_double").tensor_codes(feeds)


def test_tensor_file_names_escape_slash_colon_and_percent():
    assert tensor_filename("/conv1/Conv_output_0") == "%2Fconv1%2FConv_output_0.npy"
    assert tensor_filename("input:0") == "input%3A0.npy"
    assert tensor_filename("a%b c") == "a%25b%20c.npy"
    assert tensor_filename("plain_name-1.2") == "plain_name-1.2.npy"
    for name in ("/conv1/Conv_output_0", "input:0", "a%b c", "ü/x"):
        assert tensor_name_from_filename(tensor_filename(name)) == name
        assert tensor_name_from_filename(tensor_filename(name, ".raw")) == name


def test_the_program_holds_the_expected_tensors(sim, ort_codes):
    assert list(ort_codes) == ORDER  # graph order; the fused Conv output /conv1/Conv_output_0 is not a tensor


def test_dump_under_tflite_double_is_attributed_to_it(sim, ort_codes, tflite_codes, tmp_path):
    differing = [n for n in ORDER if not np.array_equal(ort_codes[n], tflite_codes[n])]
    assert differing, "power-of-two scales must produce ties on which the schemes differ"
    write_dump(tmp_path, tflite_codes)
    assert (tmp_path / "%2Fconv2%2FConv_output_0.npy").is_file()
    report = verify(sim, tmp_path, requant="ort", progress=False)
    first = report.first_difference
    # the first differing tensor is the same under teacher forcing and chained runs: compare the two free runs
    assert first.tensor == differing[0]
    diff = tflite_codes[first.tensor].astype(np.int64) - ort_codes[first.tensor].astype(np.int64)
    assert first.differ == int(np.count_nonzero(diff))
    values, counts = np.unique(diff[diff != 0], return_counts=True)
    assert first.steps == dict(zip(values.tolist(), counts.tolist()))
    assert first.first_index == tuple(int(i) for i in np.argwhere(diff)[0])
    assert [c.tensor for c in report.checks] == ORDER
    assert all(c.exact for c in report.checks[:ORDER.index(first.tensor)])
    assert "tflite_double" in first.schemes and "ort" not in first.schemes
    assert "tflite_double" in report.explaining and "ort" not in report.explaining
    assert report.scheme_matches["tflite_double"] == len(ORDER)
    text = str(report)
    assert f"first difference: tensor {first.tensor!r}" in text
    assert re.search(r"schemes that reproduce every dumped tensor: .*tflite_double", text)
    # under its own scheme the dump matches exactly
    assert verify(sim, tmp_path, requant="tflite_double", progress=False).exact


def test_one_element_off_by_one_step_is_pinpointed(sim, ort_codes, tmp_path):
    codes = {k: v.copy() for k, v in ort_codes.items()}
    target = codes[C2]
    index = tuple(int(i) for i in np.argwhere(target < 255)[5])
    target[index] += 1
    write_dump(tmp_path, codes)
    report = verify(sim, tmp_path, requant="ort", progress=False)
    first = report.first_difference
    assert (first.tensor, first.differ, first.steps, first.first_index) == (C2, 1, {1: 1}, index)
    assert (first.dump_code, first.our_code) == (int(ort_codes[C2][index]) + 1, int(ort_codes[C2][index]))
    assert [c.exact for c in report.checks[:2]] == [True, True]
    # teacher forcing feeds the edited tensor to Flatten: the dump's own Flatten output disagrees with it
    assert not report.checks[ORDER.index(FL)].exact and report.explaining == []
    chained = verify(sim, tmp_path, requant="ort", teacher_forcing=False, progress=False)
    assert [c.tensor for c in chained.checks if not c.exact] == [C2]


def test_raw_files_with_a_manifest_and_signed_codes(sim, feeds, ort_codes, tmp_path):
    entries = []
    for i, name in enumerate(ORDER):
        array, values = ort_codes[name], "codes"
        if name == X:
            array, values = feeds[X], "dequantized"  # the float input itself
        elif name == C2:
            array = (array.astype(np.int16) - 128).astype(np.int8)  # int8 codes: the same grid, zero point - 128
        elif name == Y:
            grid = sim_grid(sim, Y)
            array, values = ((array.astype(np.int64) - grid.zero_point).astype(np.float32) * grid.scale), "dequantized"
        little_endian = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"))
        (tmp_path / f"t{i}.raw").write_bytes(little_endian.tobytes())
        entries.append({"name": name, "file": f"t{i}.raw", "dtype": array.dtype.name, "shape": list(array.shape),
                        "values": values})
    (tmp_path / "manifest.json").write_text(json.dumps({"tensors": entries}))
    dump = read_dump(tmp_path)
    assert set(dump) == set(ORDER) and dump[C2].array.dtype == np.int8
    report = verify(sim, tmp_path, progress=False)
    assert report.exact and [c.tensor for c in report.checks] == ORDER[1:] and report.fed == [X]


def sim_grid(sim, name):
    return IntSim(sim).grid(name)


def _expect_error(sim, folder, *fragments):
    with pytest.raises(DumpError) as info:
        verify(sim, folder, progress=False)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_bad_dumps_are_clear_errors_naming_the_file(sim, ort_codes, tmp_path):
    def dump(folder, **changes):
        codes = dict(ort_codes)
        codes.update(changes)
        return write_dump(tmp_path / folder, codes)

    fname = tensor_filename(C2)
    _expect_error(sim, dump("shape", **{C2: ort_codes[C2].reshape(1, 64)}), fname, "shape [1, 64]", "[1, 4, 4, 4]")
    _expect_error(sim, dump("dtype", **{C2: ort_codes[C2].astype(np.int32)}), fname, "int32", "uint8")
    folder = dump("name")
    np.save(folder / "conv2_out.npy", ort_codes[C2])
    _expect_error(sim, folder, "conv2_out.npy", "not a tensor of the model")
    folder = dump("missing_input")
    (folder / tensor_filename(X)).unlink()
    _expect_error(sim, folder, "no graph input 'input:0'", "input%3A0.npy")
    off = (ort_codes[Y].astype(np.float32) - 129) * np.float32(0.125) + np.float32(0.05)  # 0.4 step off the grid
    _expect_error(sim, dump("offgrid", **{Y: off}), tensor_filename(Y), "not on its grid")
    folder = dump("raw")
    np.asarray(ort_codes[C2]).tofile(folder / "c2.raw")
    _expect_error(sim, folder, "c2.raw", "manifest.json")
    (folder / "manifest.json").write_text(json.dumps({"tensors": [
        {"name": C2, "file": "c2.raw", "dtype": "uint8", "shape": [1, 4, 4, 5], "values": "codes"}]}))
    _expect_error(sim, folder, "c2.raw", "64 bytes", "needs 80")
    (folder / "manifest.json").write_text(json.dumps({"tensors": [
        {"name": C2, "file": "c2.raw", "dtype": "uint8", "shape": [1, 4, 4, 4], "values": "floats"}]}))
    _expect_error(sim, folder, "'values' must be")


def test_cli_verify(sim, ort_codes, tflite_codes, tmp_path, capsys):
    files = sim.export(tmp_path / "export", prefix="net")
    model, encodings = str(tmp_path / "export" / "net.onnx"), str(tmp_path / "export" / "net.encodings")
    assert files  # the exported model + AIMET encodings load back into the same integer program
    args = ["verify", model, "--encodings", encodings, "--no-progress", "--target-dump"]
    assert main(args + [str(write_dump(tmp_path / "ort", ort_codes))]) == 0
    assert "every dumped tensor matches exactly under ort" in capsys.readouterr().out
    assert main(args + [str(write_dump(tmp_path / "tfl", tflite_codes))]) == 1
    out = capsys.readouterr().out
    assert "first difference: tensor" in out and re.search(r"every dumped tensor: .*tflite_double", out)
    bad = write_dump(tmp_path / "bad", {**ort_codes, C2: ort_codes[C2].astype(np.int32)})
    assert main(args + [str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refquant: error:") and tensor_filename(C2) in err and err.count("\n") == 1
