"""AIMET encodings files: read every version, write 1.0.0/2.0.0 exactly as aimet-onnx 2.42.0 does
(checked against the files in refs/aimet_samples), and refuse malformed files with a precise message."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import refquant
from refquant.errors import RefquantError
from refquant.quant.encoding import Encoding, EncodingError, fp16_encoding, from_min_max
from refquant.quant.encodings_io import (
    VERSIONS,
    EncodingsFileError,
    fit_to_tensor,
    read_encodings,
    write_encodings,
)

SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
SAMPLES = SHARED / "refs" / "aimet_samples"
CFGS = sorted(p.parent for p in SAMPLES.glob("*/*/model.encodings")) if SAMPLES.is_dir() else []
SAMPLE_PARAMS = [pytest.param(c, id=f"{c.parent.name}-{c.name}") for c in CFGS] or [
    pytest.param(None, marks=pytest.mark.skip(reason=f"AIMET samples not found ({SAMPLES}; set REFQUANT_SHARED)"))]


def _json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _split(file) -> tuple[dict, dict]:
    """(activations, params) of a 1.0.0 EncodingsFile, in file order."""
    acts = {n: e for n, e in file.encodings.items() if n in file.activation_names}
    params = {n: e for n, e in file.encodings.items() if n in file.param_names}
    return acts, params


def _model(cfg: Path) -> onnx.ModelProto:
    folded = cfg.parent / "model_bnfolded.onnx"  # convnet: the weights AIMET quantized are the folded ones
    return onnx.load(str(folded if folded.exists() else cfg.parent / "model.onnx"))


def _output_channel_axis(model: onnx.ModelProto, weight: str) -> int:
    """Output-channel axis of ``weight`` from the op consuming it (refs/aimet.md §7)."""
    for node in model.graph.node:
        if len(node.input) > 1 and node.input[1] == weight:
            if node.op_type == "Conv":
                return 0
            if node.op_type == "ConvTranspose":
                return 1
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                return 0 if trans_b else 1
            if node.op_type == "MatMul":
                return -1
    raise AssertionError(f"no Conv/Gemm/MatMul consumes {weight}")


def _as_aimet_text(doc: dict, producer: dict) -> str:
    """``doc`` with our producer, formatted as AIMET's save_json_yaml does."""
    return json.dumps({**doc, "producer": producer}, indent=4, sort_keys=True)


# ------------------------------------------------------------------------------------------------------
# AIMET's sample files


@pytest.mark.parametrize("cfg", SAMPLE_PARAMS)
def test_sample_files_read_with_their_sections(cfg):
    raw = _json(cfg / "model.encodings")
    file = read_encodings(cfg / "model.encodings")
    assert file.version == "1.0.0"
    assert list(file.encodings) == [e["name"] for e in raw["activation_encodings"] + raw["param_encodings"]]
    assert file.activation_names == {e["name"] for e in raw["activation_encodings"]}
    assert file.param_names == {e["name"] for e in raw["param_encodings"]}
    assert file.quantizer_args == raw["quantizer_args"]
    v2 = read_encodings(cfg / "model_v2.encodings")
    assert v2.version == "2.0.0" and v2.activation_names == set() and v2.param_names == set()
    assert list(v2.encodings) == [e["name"] for e in _json(cfg / "model_v2.encodings")["encodings"]]


@pytest.mark.parametrize("cfg", SAMPLE_PARAMS)
def test_1_0_0_and_2_0_0_files_describe_the_same_grids(cfg):
    """Same scales (AIMET writes the same float64 value in both files: exactly equal, not float32-rounded
    in 2.0.0), activations unsigned with y_zero_point = -offset, symmetric params signed with zero point 0."""
    v1 = read_encodings(cfg / "model.encodings")
    v2 = read_encodings(cfg / "model_v2.encodings")
    raw_v2 = {e["name"]: e for e in _json(cfg / "model_v2.encodings")["encodings"]}
    common = v1.encodings.keys() & v2.encodings.keys()
    assert common == set(v1.encodings), "every 1.0.0 entry is in the 2.0.0 file"
    for name in common:
        a, b, raw = v1.encodings[name], v2.encodings[name], raw_v2[name]
        assert np.array_equal(a.scale, b.scale), name
        np.testing.assert_allclose(b.scale, a.scale, rtol=1e-7, atol=0)
        assert np.array_equal(a.offset, b.offset) and a.bitwidth == b.bitwidth and a.steps == b.steps, name
        assert (a.axis, a.block_size) == (b.axis, b.block_size), name
        if name in v1.activation_names:
            assert raw["output_dtype"] == f"uint{a.bitwidth}" and not a.symmetric and not b.symmetric
            expected = int(-a.offset)
            assert raw.get("y_zero_point", 0) == expected and isinstance(raw.get("y_zero_point", 0), int)
            assert ("y_zero_point" in raw) == (expected != 0), name
        else:
            assert raw["output_dtype"] == f"int{a.bitwidth}" and a.symmetric and b.symmetric
            assert "y_zero_point" not in raw and np.all(a.offset == -(1 << (a.bitwidth - 1))), name


@pytest.mark.parametrize("cfg", SAMPLE_PARAMS)
def test_per_channel_entries_have_one_scale_per_output_channel(cfg):
    model = _model(cfg)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    v1 = read_encodings(cfg / "model.encodings")
    raw_v2 = {e["name"]: e for e in _json(cfg / "model_v2.encodings")["encodings"]}
    per_channel = _json(cfg / "model.encodings")["quantizer_args"]["per_channel_quantization"]
    for name in v1.param_names:
        encoding, shape = v1.encodings[name], shapes[name]
        axis = _output_channel_axis(model, name)
        if not per_channel:
            assert encoding.scale.ndim == 0 and encoding.axis is None and "axis" not in raw_v2[name]
            continue
        assert encoding.scale.shape == (shape[axis],), name
        assert raw_v2[name]["axis"] == axis % len(shape) and len(raw_v2[name]["y_scale"]) == shape[axis]
        assert fit_to_tensor(encoding, shape, axis).axis == axis % len(shape)


@pytest.mark.parametrize("cfg", SAMPLE_PARAMS)
def test_int32_bias_scale_is_the_float32_product_of_input_and_weight_scales(cfg):
    """A finding about AIMET's 2.0.0 files: the int32 bias y_scale is float32(sx) * float32(sw) rounded to
    float32, not the float64 product (they differ by up to ~1e-7 relative)."""
    model = _model(cfg)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    v2 = read_encodings(cfg / "model_v2.encodings")
    biases = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    assert biases
    for node in biases:
        x, w, b = (v2.encodings[n] for n in node.input[:3])
        assert b.bitwidth == 32 and b.symmetric and np.all(b.offset == -2.0 ** 31)
        assert b.scale.size == (shapes[node.input[2]][0] if w.axis is not None else 1)
        expected = np.float32(x.scale) * np.asarray(w.scale, dtype=np.float32)
        assert np.array_equal(b.scale, expected.astype(np.float64)), node.input[2]


@pytest.mark.parametrize("cfg", SAMPLE_PARAMS)
def test_write_1_0_0_reproduces_aimet_file(cfg, tmp_path):
    aimet = _json(cfg / "model.encodings")
    file = read_encodings(cfg / "model.encodings")
    acts, params = _split(file)
    out = tmp_path / "model.encodings"
    write_encodings(out, acts, params, version="1.0.0", quantizer_args=file.quantizer_args)
    ours = _json(out)
    assert ours["activation_encodings"] == aimet["activation_encodings"]
    assert ours["param_encodings"] == aimet["param_encodings"]
    assert (ours["version"], ours["quantizer_args"]) == ("1.0.0", aimet["quantizer_args"])
    assert ours["producer"] == {"package": "refquant", "version": refquant.__version__}
    # byte for byte, -0.0 offsets included (mtcnn_rnet's /prelu4/PRelu_output_0 has one)
    assert out.read_text() == _as_aimet_text(aimet, ours["producer"])


@pytest.mark.parametrize("cfg", SAMPLE_PARAMS)
def test_write_2_0_0_reproduces_aimet_file(cfg, tmp_path):
    """Activations and params from the 1.0.0 file, int32 biases and data-movement outputs (the entries
    only the 2.0.0 file has) from the 2.0.0 file: every entry, key and float as AIMET wrote it."""
    aimet = _json(cfg / "model_v2.encodings")
    v1 = read_encodings(cfg / "model.encodings")
    v2 = read_encodings(cfg / "model_v2.encodings")
    acts, params = _split(v1)
    extra = {n: e for n, e in v2.encodings.items() if n not in v1.encodings}
    assert any(e.bitwidth == 32 for e in extra.values())  # biases; derived outputs only in convnet/mtcnn
    aimet_order = [e["name"] for e in aimet["encodings"]]

    out = tmp_path / "sub" / "model_v2.encodings"
    write_encodings(out, acts, params, version="2.0.0", extra_2_0_0=extra, order=aimet_order)
    ours = _json(out)
    assert ours["encodings"] == aimet["encodings"] and ours["version"] == "2.0.0"
    assert set(ours) == {"version", "producer", "encodings"}
    assert out.read_text() == _as_aimet_text(aimet, ours["producer"])

    # default order: params, activations, extras (AIMET puts each bias right after its weight)
    write_encodings(out, acts, params, version="2.0.0", extra_2_0_0=extra)
    ours = _json(out)["encodings"]
    assert [e["name"] for e in ours] == [*params, *acts, *extra]
    assert sorted(ours, key=lambda e: aimet_order.index(e["name"])) == aimet["encodings"]


def test_version_list():
    assert VERSIONS == ("0.6.1", "1.0.0", "2.0.0", "2.1.0")


# ------------------------------------------------------------------------------------------------------
# hand-written files: 0.6.1, fp16, strict/unsigned symmetric, per block, LPBQ


def _write_doc(tmp_path, doc, name="model.encodings") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_read_0_6_1_file(tmp_path):
    """The 0.6.1 example of refs/aimet.md §4, plus a one-channel param and an FP16 activation."""
    doc = {
        "version": "0.6.1",
        "producer": {"package": "aimet-onnx", "version": "2.42.0"},
        "activation_encodings": {
            "/dw/Conv_output_0": [{"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "max": 19.0102,
                                   "min": -15.8646, "offset": -116.0, "scale": 0.136764}],
            "half": [{"bitwidth": 16, "dtype": "float"}],
        },
        "param_encodings": {
            "c1.weight": [
                {"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "max": 0.042274, "min": -0.042607,
                 "offset": -128.0, "scale": 0.000332863},
                {"bitwidth": 8, "dtype": "int", "is_symmetric": "True", "max": 0.1, "min": -0.1,
                 "offset": -128.0, "scale": 0.00078},
            ],
            "fc.weight": [{"bitwidth": 4, "dtype": "int", "is_symmetric": "True", "max": 0.7, "min": -0.8,
                           "offset": -8, "scale": 0.1}],
        },
        "quantizer_args": {"activation_bitwidth": 8, "param_bitwidth": 8},
    }
    file = read_encodings(_write_doc(tmp_path, doc))
    assert file.version == "0.6.1"
    assert file.activation_names == {"/dw/Conv_output_0", "half"}
    assert file.param_names == {"c1.weight", "fc.weight"}
    assert file.quantizer_args == {"activation_bitwidth": 8, "param_bitwidth": 8}
    act = file.encodings["/dw/Conv_output_0"]
    assert (act.bitwidth, act.symmetric, act.steps, act.axis) == (8, False, 255, None)
    assert act.scale == 0.136764 and act.offset == -116.0 and act.scale.shape == ()
    w = file.encodings["c1.weight"]
    assert (w.bitwidth, w.symmetric, w.steps, w.axis) == (8, True, 255, 0)
    assert w.scale.tolist() == [0.000332863, 0.00078] and w.offset.tolist() == [-128.0, -128.0]
    fc = file.encodings["fc.weight"]
    assert (fc.bitwidth, fc.symmetric, fc.axis, float(fc.scale), float(fc.offset)) == (4, True, None, 0.1, -8.0)
    assert file.encodings["half"].kind == "float"


def test_float16_entries(tmp_path):
    """AIMET's FloatEncoding: 1.0.0 {dtype FLOAT, bw 16, enc_type PER_TENSOR}; not written in 2.0.0."""
    act = from_min_max(-1.0, 3.0, 8, symmetric=False)
    path = tmp_path / "fp16.encodings"
    write_encodings(path, {"x": act, "y": fp16_encoding()}, {})
    entries = _json(path)["activation_encodings"]
    assert entries[1] == {"bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "name": "y"}
    assert read_encodings(path).encodings["y"].kind == "float"
    write_encodings(path, {"x": act, "y": fp16_encoding()}, {}, version="2.0.0")
    assert [e["name"] for e in _json(path)["encodings"]] == ["x"]
    doc = {"version": "2.0.0", "encodings": [{"name": "h", "output_dtype": "float16"}]}
    assert read_encodings(_write_doc(tmp_path, doc)).encodings["h"].kind == "float"


def test_strict_symmetric_round_trips_through_both_versions(tmp_path):
    strict = from_min_max(-3.0, 1.0, 8, symmetric=True, strict_symmetric=True)
    assert float(strict.offset) == -127.0 and strict.steps == 254
    path = tmp_path / "s.encodings"
    write_encodings(path, {}, {"w": strict})
    back = read_encodings(path).encodings["w"]
    assert back.strict_symmetric and back.steps == 254 and back.scale == strict.scale
    write_encodings(path, {}, {"w": strict}, version="2.0.0")
    (entry,) = _json(path)["encodings"]
    assert entry == {"name": "w", "output_dtype": "int8", "y_scale": float(strict.scale), "y_zero_point": -1}
    back = read_encodings(path).encodings["w"]
    assert back.strict_symmetric and back.steps == 254 and float(back.offset) == -127.0


def test_unsigned_symmetric_param_is_int8_with_zero_point_minus_128(tmp_path):
    """AIMET's signed dtype follows is_sym, so an unsigned-symmetric grid (offset 0) becomes int8, zp -128."""
    enc = from_min_max(0.0, 2.0, 8, symmetric=True, unsigned_symmetric=True)
    assert float(enc.offset) == 0.0 and enc.symmetric
    path = tmp_path / "u.encodings"
    write_encodings(path, {"a": enc}, {"w": enc}, version="2.0.0")
    entries = {e["name"]: e for e in _json(path)["encodings"]}
    assert entries["w"]["output_dtype"] == "int8" and entries["w"]["y_zero_point"] == -128
    assert entries["a"]["output_dtype"] == "uint8" and "y_zero_point" not in entries["a"]
    back = read_encodings(path).encodings
    assert back["w"].symmetric and float(back["w"].offset) == 0.0 and back["w"].steps == 255
    assert not back["a"].symmetric and float(back["a"].offset) == 0.0


def test_per_block_matmul_weight_round_trips(tmp_path):
    """A MatMul weight (in=8, out=3), blocks of 4 along axis 0: 1.0.0 stores the scales transposed to
    (out, blocks) and flat; fit_to_tensor restores them. 2.0.0 keeps the nested shape and axis."""
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 0.1, size=(2, 3))
    enc = Encoding(scale, np.full((2, 3), -8.0), 4, True, 15, axis=0, block_size=4)
    path = tmp_path / "b.encodings"
    write_encodings(path, {}, {"w": enc})
    (entry,) = _json(path)["param_encodings"]
    assert entry["enc_type"] == "PER_BLOCK" and entry["block_size"] == 4
    assert entry["scale"] == scale.T.ravel().tolist() and entry["offset"] == [-8.0] * 6
    flat = read_encodings(path).encodings["w"]
    assert flat.scale.shape == (6,) and flat.axis is None and flat.block_size == 4
    placed = fit_to_tensor(flat, (8, 3), channel_axis=1, block_axis=0)
    assert np.array_equal(placed.scale, scale) and placed.axis == 0 and placed.block_size == 4

    write_encodings(path, {}, {"w": enc}, version="2.0.0")
    (entry,) = _json(path)["encodings"]
    assert entry == {"axis": 0, "block_size": 4, "name": "w", "output_dtype": "int4", "y_scale": scale.tolist()}
    back = read_encodings(path).encodings["w"]
    assert np.array_equal(back.scale, scale) and (back.axis, back.block_size, back.bitwidth) == (0, 4, 4)
    assert np.all(back.offset == -8.0) and back.symmetric

    with pytest.raises(EncodingsFileError, match="'w'.*fit_to_tensor"):
        write_encodings(path, {}, {"w": flat}, version="2.0.0")


def test_fit_to_tensor_broadcasts_aimet_conv_block_layout():
    """AIMET's conv block scales are (O, I/bs, 1, 1); refquant's layout repeats them over kh, kw."""
    scale = np.arange(1, 7, dtype=np.float64).reshape(3, 2, 1, 1) / 100
    enc = Encoding(scale, np.full(scale.shape, -8.0), 4, True, 15, axis=1, block_size=4)
    placed = fit_to_tensor(enc, (3, 8, 3, 3), channel_axis=0)
    assert placed.scale.shape == (3, 2, 3, 3) and np.all(placed.scale == scale)
    flat = Encoding(scale.ravel(), np.full(6, -8.0), 4, True, 15, axis=None, block_size=4)
    assert np.array_equal(fit_to_tensor(flat, (3, 8, 3, 3), 0, block_axis=1).scale, placed.scale)
    with pytest.raises(EncodingError, match="6 block scales"):
        fit_to_tensor(flat, (3, 16, 3, 3), 0, block_axis=1)
    per_channel = Encoding(np.ones(4), np.zeros(4), 8, False, 255, axis=0)
    with pytest.raises(EncodingError, match="4 per-channel scales"):
        fit_to_tensor(per_channel, (5, 4), channel_axis=0)
    assert fit_to_tensor(per_channel, (5, 4), channel_axis=-1).axis == 1


LPBQ_EFFECTIVE = [[0.5, 1.0, 1.5], [1.0, 1.25, 1.5]]  # per_block_int_scale * per_channel_float_scale


@pytest.mark.parametrize("version, entry", [
    ("2.0.0", {"name": "w", "output_dtype": "int4", "axis": 1, "block_size": 16,
               "per_channel_float_scale": [[0.5], [0.25]], "per_block_int_scale": [[1, 2, 3], [4, 5, 6]]}),
    ("2.0.0", {"name": "w", "output_dtype": "int4", "axis": 1, "block_size": 16,
               "per_channel_float_scale": [0.5, 0.25], "per_block_int_scale": [[1, 2, 3], [4, 5, 6]]}),
    ("2.1.0", {"name": "w", "output_dtype": "int4", "axis": 1, "block_size": 16,
               "y_scale": {"x": [[1, 2, 3], [4, 5, 6]], "x_scale": [0.5, 0.25], "axis": 0}}),
], ids=["2.0.0", "2.0.0-1d-channel-scale", "2.1.0"])
def test_lpbq_entries_read_as_effective_block_scales(tmp_path, version, entry):
    file = read_encodings(_write_doc(tmp_path, {"version": version, "encodings": [entry]}))
    enc = file.encodings["w"]
    assert enc.scale.tolist() == LPBQ_EFFECTIVE and (enc.axis, enc.block_size) == (1, 16)
    assert (enc.bitwidth, enc.symmetric, enc.steps) == (4, True, 15) and np.all(enc.offset == -8.0)


def test_lpbq_1_0_0_entry(tmp_path):
    entry = {"name": "w", "dtype": "INT", "enc_type": "LPBQ", "bw": 8, "compressed_bw": 4, "is_sym": True,
             "scale": [0.5, 0.25], "per_block_int_scale": [1, 2, 3, 4, 5, 6], "offset": [-128, -128],
             "block_size": 16}
    doc = {"version": "1.0.0", "activation_encodings": [], "param_encodings": [entry]}
    enc = read_encodings(_write_doc(tmp_path, doc)).encodings["w"]
    assert enc.scale.tolist() == sum(LPBQ_EFFECTIVE, []) and enc.bitwidth == 4 and np.all(enc.offset == -8.0)
    placed = fit_to_tensor(enc, (2, 48), channel_axis=0, block_axis=1)
    assert placed.scale.tolist() == LPBQ_EFFECTIVE and placed.axis == 1


# ------------------------------------------------------------------------------------------------------
# malformed files


def _v1_doc():
    return {"version": "1.0.0", "producer": {"package": "aimet-onnx", "version": "2.42.0"},
            "activation_encodings": [{"name": "act", "dtype": "INT", "bw": 8, "is_sym": False,
                                      "scale": [0.1], "offset": [-12.0], "enc_type": "PER_TENSOR"}],
            "param_encodings": [{"name": "wgt", "dtype": "INT", "bw": 8, "is_sym": True, "scale": [0.1, 0.2],
                                 "offset": [-128.0, -128.0], "enc_type": "PER_CHANNEL"}],
            "quantizer_args": {}}


def _v2_doc():
    return {"version": "2.0.0", "producer": {"package": "aimet-onnx", "version": "2.42.0"},
            "encodings": [{"name": "wgt", "output_dtype": "int8", "y_scale": [0.1, 0.2], "axis": 0},
                          {"name": "act", "output_dtype": "uint8", "y_scale": 0.1, "y_zero_point": 12}]}


def _v061_doc():
    return {"version": "0.6.1", "activation_encodings": {"act": [
        {"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "min": -1.2, "max": 24.3, "offset": -12.0,
         "scale": 0.1}]}, "param_encodings": {}}


def _act(doc):
    return doc["activation_encodings"][0]


def _mutate(make, change):
    def build():
        doc = make()
        change(doc)
        return doc
    return build


BAD_FILES = {
    # name: (document builder or raw text, expected entry in the message, expected key)
    "not-json": ("{\"version\": \"1.0.0\",", None, None),
    "top-level-list": ("[]", None, None),
    "missing-version": (_mutate(_v1_doc, lambda d: d.pop("version")), None, "version"),
    "unknown-version": (_mutate(_v1_doc, lambda d: d.update(version="3.0.0")), None, "version"),
    "missing-section": (_mutate(_v1_doc, lambda d: d.pop("param_encodings")), None, "param_encodings"),
    "section-not-list": (_mutate(_v1_doc, lambda d: d.update(param_encodings={})), None, "param_encodings"),
    "entry-not-object": (_mutate(_v1_doc, lambda d: d["param_encodings"].insert(0, 7)), "#0", "name"),
    "missing-scale": (_mutate(_v1_doc, lambda d: _act(d).pop("scale")), "act", "scale"),
    "missing-is_sym": (_mutate(_v1_doc, lambda d: _act(d).pop("is_sym")), "act", "is_sym"),
    "unknown-key": (_mutate(_v1_doc, lambda d: _act(d).update(foo=1)), "act", "foo"),
    "bw-string": (_mutate(_v1_doc, lambda d: _act(d).update(bw="8")), "act", "bw"),
    "bw-bool": (_mutate(_v1_doc, lambda d: _act(d).update(bw=True)), "act", "bw"),
    "is_sym-string": (_mutate(_v1_doc, lambda d: _act(d).update(is_sym="false")), "act", "is_sym"),
    "scale-not-list": (_mutate(_v1_doc, lambda d: _act(d).update(scale=0.1)), "act", "scale"),
    "scale-string": (_mutate(_v1_doc, lambda d: _act(d).update(scale=["0.1"])), "act", "scale"),
    "scale-empty": (_mutate(_v1_doc, lambda d: _act(d).update(scale=[], offset=[])), "act", "scale"),
    "bw-1": (_mutate(_v1_doc, lambda d: _act(d).update(bw=1)), "act", "bw"),
    "bw-17": (_mutate(_v1_doc, lambda d: _act(d).update(bw=17)), "act", "bw"),
    "bw-32-activation": (_mutate(_v1_doc, lambda d: _act(d).update(bw=32)), "act", "bw"),
    "scale-zero": (_mutate(_v1_doc, lambda d: _act(d).update(scale=[0.0])), "act", "scale"),
    "scale-negative": (_mutate(_v1_doc, lambda d: d["param_encodings"][0].update(scale=[0.1, -0.2])), "wgt",
                       "scale"),
    "scale-nan": (_mutate(_v1_doc, lambda d: _act(d).update(scale=[float("nan")])), "act", "scale"),
    "scale-inf": (_mutate(_v1_doc, lambda d: _act(d).update(scale=[float("inf")])), "act", "scale"),
    "length-mismatch": (_mutate(_v1_doc, lambda d: d["param_encodings"][0].update(offset=[-128.0])), "wgt",
                        "offset"),
    "per-tensor-two-scales": (_mutate(_v1_doc, lambda d: _act(d).update(scale=[0.1, 0.2], offset=[0.0, 0.0])),
                              "act", "scale"),
    "offset-fractional": (_mutate(_v1_doc, lambda d: _act(d).update(offset=[-1.5])), "act", "offset"),
    "offset-positive": (_mutate(_v1_doc, lambda d: _act(d).update(offset=[3.0])), "act", "offset"),
    "offset-below-grid": (_mutate(_v1_doc, lambda d: _act(d).update(offset=[-256.0])), "act", "offset"),
    "zero-point-shift": (_mutate(_v1_doc, lambda d: _act(d).update(zero_point_shift=[0.5])), "act",
                         "zero_point_shift"),
    "enc-type-unknown": (_mutate(_v1_doc, lambda d: _act(d).update(enc_type="PER_ROW")), "act", "enc_type"),
    "per-block-no-block_size": (_mutate(_v1_doc, lambda d: d["param_encodings"][0].update(enc_type="PER_BLOCK")),
                                "wgt", "block_size"),
    "float-bw-8": (_mutate(_v1_doc, lambda d: d["activation_encodings"].__setitem__(
        0, {"name": "act", "dtype": "FLOAT", "bw": 8, "enc_type": "PER_TENSOR"})), "act", "bw"),
    "duplicate-name": (_mutate(_v1_doc, lambda d: d["param_encodings"].append(copy.deepcopy(_act(d)))), "act",
                       "name"),
    "v2-dtype-int33": (_mutate(_v2_doc, lambda d: d["encodings"][1].update(output_dtype="int33")), "act",
                       "output_dtype"),
    "v2-dtype-uint32": (_mutate(_v2_doc, lambda d: d["encodings"][1].update(output_dtype="uint32")), "act",
                        "output_dtype"),
    "v2-dtype-bogus": (_mutate(_v2_doc, lambda d: d["encodings"][1].update(output_dtype="q8")), "act",
                       "output_dtype"),
    "v2-dtype-float8": (_mutate(_v2_doc, lambda d: d["encodings"].__setitem__(
        1, {"name": "act", "output_dtype": "float8e4m3fn"})), "act", "output_dtype"),
    "v2-missing-y_scale": (_mutate(_v2_doc, lambda d: d["encodings"][1].pop("y_scale")), "act", "y_scale"),
    "v2-unknown-key": (_mutate(_v2_doc, lambda d: d["encodings"][0].update(scale=[1.0])), "wgt", "scale"),
    "v2-per-channel-no-axis": (_mutate(_v2_doc, lambda d: d["encodings"][0].pop("axis")), "wgt", "axis"),
    "v2-axis-on-scalar": (_mutate(_v2_doc, lambda d: d["encodings"][1].update(axis=0)), "act", "axis"),
    "v2-zero-point-length": (_mutate(_v2_doc, lambda d: d["encodings"][0].update(y_zero_point=[1])), "wgt",
                             "y_zero_point"),
    "v2-zero-point-range": (_mutate(_v2_doc, lambda d: d["encodings"][1].update(y_zero_point=300)), "act",
                            "y_zero_point"),
    "v2-zero-point-fraction": (_mutate(_v2_doc, lambda d: d["encodings"][1].update(y_zero_point=1.5)), "act",
                               "y_zero_point"),
    "v2-scale-negative": (_mutate(_v2_doc, lambda d: d["encodings"][1].update(y_scale=-0.1)), "act", "y_scale"),
    "v2-scale-ragged": (_mutate(_v2_doc, lambda d: d["encodings"][0].update(y_scale=[[0.1], [0.2, 0.3]],
                                                                            block_size=2)), "wgt", "y_scale"),
    "v2-axis-string": (_mutate(_v2_doc, lambda d: d["encodings"][0].update(axis="0")), "wgt", "axis"),
    "v2-encodings-missing": (_mutate(_v2_doc, lambda d: d.pop("encodings")), None, "encodings"),
    "v210-lpbq-missing-x_scale": (lambda: {"version": "2.1.0", "encodings": [
        {"name": "lp", "output_dtype": "int4", "axis": 1, "block_size": 4, "y_scale": {"x": [[1, 2]], "axis": 0}}]},
        "lp", "y_scale.x_scale"),
    "v200-lpbq-shapes": (lambda: {"version": "2.0.0", "encodings": [
        {"name": "lp", "output_dtype": "int4", "axis": 1, "block_size": 4, "per_channel_float_scale": [[1.0, 2.0]],
         "per_block_int_scale": [[1, 2, 3]]}]}, "lp", "per_channel_float_scale"),
    "v061-is_symmetric-bool": (_mutate(_v061_doc, lambda d: d["activation_encodings"]["act"][0].update(
        is_symmetric=False)), "act", "is_symmetric"),
    "v061-missing-offset": (_mutate(_v061_doc, lambda d: d["activation_encodings"]["act"][0].pop("offset")),
                            "act", "offset"),
    "v061-empty-list": (_mutate(_v061_doc, lambda d: d["activation_encodings"].update(act=[])), "act", None),
    "v061-channels-disagree": (_mutate(_v061_doc, lambda d: d["activation_encodings"]["act"].append(
        {**d["activation_encodings"]["act"][0], "bitwidth": 16})), "act", "bitwidth"),
    "v061-scale-list": (_mutate(_v061_doc, lambda d: d["activation_encodings"]["act"][0].update(scale=[0.1])),
                        "act", "scale"),
    "v061-second-channel-scale": (_mutate(_v061_doc, lambda d: d["activation_encodings"]["act"].append(
        {**d["activation_encodings"]["act"][0], "scale": -1.0})), "act", "scale"),
    "v061-section-list": (_mutate(_v061_doc, lambda d: d.update(param_encodings=[])), None, "param_encodings"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_a_precise_error(tmp_path, case):
    build, entry, key = BAD_FILES[case]
    path = _write_doc(tmp_path, build if isinstance(build, str) else json.dumps(build()), f"bad-{case}.json")
    with pytest.raises(EncodingsFileError) as info:
        read_encodings(path)
    message = str(info.value)
    assert str(path) in message and info.value.path == str(path)
    if entry is not None:
        assert repr(entry) in message and info.value.entry == entry
    if key is not None:
        assert repr(key) in message and info.value.key == key
    assert isinstance(info.value, RefquantError)


def test_good_documents_behind_the_bad_cases_read(tmp_path):
    """The bad cases are one change away from these valid files."""
    for name, make in (("v1", _v1_doc), ("v2", _v2_doc), ("v061", _v061_doc)):
        file = read_encodings(_write_doc(tmp_path, make(), f"{name}.json"))
        assert float(file.encodings["act"].scale) == 0.1 and float(file.encodings["act"].offset) == -12.0


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.encodings"
    with pytest.raises(EncodingsFileError, match="nowhere.encodings.*cannot read"):
        read_encodings(path)


# ------------------------------------------------------------------------------------------------------
# writing: atomic, directories, errors


def test_write_creates_directories_and_replaces_atomically(tmp_path):
    act = from_min_max(-1.0, 3.0, 8, symmetric=False)
    path = tmp_path / "a" / "b" / "model.encodings"
    write_encodings(path, {"x": act}, {})
    assert _json(path)["activation_encodings"][0]["offset"] == [-64.0]
    write_encodings(path, {"y": act}, {}, quantizer_args={"param_bitwidth": 8},
                    extra_2_0_0={"z": act})  # extra entries do not exist in 1.0.0 files
    doc = _json(path)
    assert [e["name"] for e in doc["activation_encodings"]] == ["y"] and doc["param_encodings"] == []
    assert doc["quantizer_args"] == {"param_bitwidth": 8}
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.encodings"]  # no temp file left


def test_write_to_unwritable_place_raises_refquant_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = blocker / "model.encodings"
    with pytest.raises(EncodingsFileError, match="cannot write") as info:
        write_encodings(path, {"x": from_min_max(-1.0, 1.0, 8, False)}, {})
    assert str(path) in str(info.value) and isinstance(info.value, RefquantError)


@pytest.mark.parametrize("version", ["0.6.1", "2.1.0", "1.0"])
def test_write_refuses_other_versions(tmp_path, version):
    path = tmp_path / "x.encodings"
    with pytest.raises(EncodingsFileError, match=f"{path.name}.*cannot write version"):
        write_encodings(path, {}, {}, version=version)
    assert not path.exists()


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_write_refuses_impossible_encodings(tmp_path, version):
    good = from_min_max(-1.0, 1.0, 8, symmetric=False)
    path = tmp_path / "x.encodings"
    bad_scale = good.with_scale(0.0)
    with pytest.raises(EncodingsFileError, match=r"x.encodings: entry 'bad', key 'scale'"):
        write_encodings(path, {"good": good, "bad": bad_scale}, {}, version=version)
    bad_bits = Encoding(np.float64(0.1), np.float64(0.0), 32, False, 2 ** 32 - 1)
    with pytest.raises(EncodingsFileError, match=r"entry 'b32', key 'bw'"):
        write_encodings(path, {"b32": bad_bits}, {}, version=version)
    with pytest.raises(EncodingsFileError, match=r"entry 'twice'.*both as activation and as param"):
        write_encodings(path, {"twice": good}, {"twice": good}, version=version)
    assert not path.exists()


def test_2_0_0_signedness_rules(tmp_path):
    """Params signed iff symmetric, activations unsigned, extras unsigned except 32-bit (int32 bias)."""
    sym = from_min_max(-1.0, 1.0, 8, symmetric=True)
    asym = from_min_max(-1.0, 3.0, 8, symmetric=False)
    bias = Encoding(np.array([1e-5, 2e-5]), np.full(2, -2.0 ** 31), 32, True, 2 ** 32 - 1, axis=0)
    path = tmp_path / "s.encodings"
    write_encodings(path, {"a_sym": sym, "a_asym": asym}, {"w_sym": sym, "w_asym": asym}, version="2.0.0",
                    extra_2_0_0={"bias": bias, "flat": sym})
    entries = {e["name"]: e for e in _json(path)["encodings"]}
    dtypes = {n: (e["output_dtype"], e.get("y_zero_point")) for n, e in entries.items()}
    assert dtypes == {"w_sym": ("int8", None), "w_asym": ("uint8", 64), "a_sym": ("uint8", 128),
                      "a_asym": ("uint8", 64), "bias": ("int32", None), "flat": ("uint8", 128)}
    assert entries["bias"] == {"axis": 0, "name": "bias", "output_dtype": "int32", "y_scale": [1e-5, 2e-5]}


def test_order_applies_within_1_0_0_sections(tmp_path):
    enc = from_min_max(-1.0, 3.0, 8, symmetric=False)
    path = tmp_path / "o.encodings"
    write_encodings(path, {"a": enc, "b": enc, "c": enc}, {"w2": enc, "w1": enc}, order=["c", "w1", "a"])
    doc = _json(path)
    assert [e["name"] for e in doc["activation_encodings"]] == ["c", "a", "b"]
    assert [e["name"] for e in doc["param_encodings"]] == ["w1", "w2"]


def test_qdq_export_names_never_collide_with_the_models_own(tmp_path):
    """A tensor called ``x_scale`` beside a quantized ``x``, and tensors ``a/b`` and ``a_b``: the export's
    scale/zero-point/codes names are numbered apart; the model passes onnx.checker and onnxruntime runs
    it with the simulation's outputs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from refquant.quant import QuantSim
    from refquant.quant.export import active_encodings, to_qdq_onnx

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["x_scale"]), helper.make_node("Neg", ["x_scale"], ["a/b"]),
         helper.make_node("Abs", ["a/b"], ["a_b"]), helper.make_node("Add", ["a_b", "a/b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sim = QuantSim(refquant.load(model), prepare=False)
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    sim.compute_encodings([{"x": x}], progress=False)
    assert {"x", "x_scale", "a/b", "a_b", "y"} <= set(active_encodings(sim))
    qdq = to_qdq_onnx(sim)
    onnx.checker.check_model(qdq)
    names = [i.name for i in qdq.graph.initializer] + [o for n in qdq.graph.node for o in n.output]
    assert len(names) == len(set(names))
    got = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(got, sim.run({"x": x})["y"])
