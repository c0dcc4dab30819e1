"""BatchNormalization folding: the float model is unchanged, the BN is gone, names follow AIMET's
fold_all_batch_norms_to_weight, and on AIMET's convnet sample the folded weights are AIMET's."""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import refquant
from refquant.ptq import fold_batchnorms, fold_batchnorms_info, fold_batchnorms_pass
from refquant.ptq.bn_fold import FoldError

from .helpers import FLOAT, make_model, ort_run

SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
CONVNET = SHARED / "refs" / "aimet_samples" / "convnet"
needs_convnet = pytest.mark.skipif(not CONVNET.is_dir(), reason=f"AIMET convnet sample not found at {CONVNET}")


# ------------------------------------------------------------------------------------ helpers
def bn_params(rng, c, prefix="bn"):
    """BN parameters far from identity (scales from 0.1 to 10, non-zero means), so a wrong fold shows."""
    return {f"{prefix}.scale": rng.uniform(0.1, 3.0, c).astype(np.float32) * rng.choice([-1, 1], c),
            f"{prefix}.bias": rng.normal(0, 2, c).astype(np.float32),
            f"{prefix}.mean": rng.normal(0, 3, c).astype(np.float32),
            f"{prefix}.var": rng.uniform(0.01, 10.0, c).astype(np.float32)}


def bn_node(x, y, prefix="bn", name="bn", eps=1e-3):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")],
                            [y], name=name, epsilon=eps)


def load(nodes, inputs, outputs, inits, opset=17):
    return refquant.load(make_model(nodes, inputs, outputs, inits, opset=opset))


def run(graph, feeds):
    return refquant.Session(graph).run(feeds)


def assert_same_outputs(graph, folded, feeds, rtol=1e-5):
    """Outputs agree within ``rtol`` of each output's largest magnitude (float32 rounding of the fold)."""
    before, after = run(graph, feeds), run(folded, feeds)
    assert before.keys() == after.keys()
    for name in before:
        scale = np.max(np.abs(before[name]))
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=rtol * scale, err_msg=name)


def assert_valid_onnx(graph, feeds):
    """The folded graph is a valid ONNX model that onnxruntime runs to the same outputs."""
    model = refquant.to_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    ours = run(graph, feeds)
    theirs = ort_run(model, feeds)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-5 * np.max(np.abs(theirs[name])))


def assert_values_consistent(graph):
    """Every tensor has a Value, no Value names a removed tensor, and shapes match a fresh inference."""
    tensors = set(graph.input_names) | set(graph.initializers) | {o for n in graph.nodes for o in n.outputs if o}
    assert set(graph.values) <= tensors, set(graph.values) - tensors
    fresh = refquant.load(refquant.to_onnx(graph))
    for node in graph.nodes:
        for name in node.outputs:
            assert name in graph.values, name
            assert graph.values[name].shape == fresh.values[name].shape, name
    for name, array in graph.initializers.items():
        assert graph.values[name].shape == array.shape


def op_types(graph):
    return [n.op_type for n in graph.nodes]


# ------------------------------------------------------------------------------------ BN after a layer
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_bn_folds_into_weight_and_bias(with_bias):
    rng = np.random.default_rng(0)
    inits = {"w": rng.normal(size=(8, 3, 3, 3)).astype(np.float32), **bn_params(rng, 8)}
    if with_bias:
        inits["b"] = rng.normal(size=8).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if with_bias else []), ["conv_out"], name="conv",
                              pads=[1, 1, 1, 1], strides=[2, 1]),
             bn_node("conv_out", "bn_out"),
             helper.make_node("Relu", ["bn_out"], ["y"], name="relu")]
    graph = load(nodes, [("x", FLOAT, [2, 3, 9, 7])], [("y", FLOAT, None)], inits)
    original = {k: v.copy() for k, v in graph.initializers.items()}
    folded, names = fold_batchnorms_pass(graph)
    assert names == ["bn"]
    assert op_types(folded) == ["Conv", "Relu"]
    # AIMET's names: the conv keeps its output, the Relu reads it; a created bias is "<node name>.bias"
    assert folded.node("relu").inputs == ["conv_out"]
    assert folded.node("conv").inputs == ["x", "w", "b" if with_bias else "conv.bias"]
    assert not any(k.startswith("bn.") for k in folded.initializers)
    feeds = {"x": rng.normal(size=(2, 3, 9, 7)).astype(np.float32)}
    assert_same_outputs(graph, folded, feeds)
    # the input graph is untouched
    assert op_types(graph) == ["Conv", "BatchNormalization", "Relu"]
    assert all(np.array_equal(graph.initializers[k], v) for k, v in original.items())
    assert_values_consistent(folded)
    assert_valid_onnx(folded, feeds)


def test_weights_follow_the_fold_formula():
    """W' = W gamma / sqrt(var + eps) per output channel, b' = (b - mean) gamma / sqrt(var + eps) + beta."""
    rng = np.random.default_rng(1)
    inits = {"w": rng.normal(size=(4, 2, 1, 1)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
             **bn_params(rng, 4)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), bn_node("c", "y", eps=1e-3)]
    graph = load(nodes, [("x", FLOAT, [1, 2, 3, 3])], [("y", FLOAT, None)], inits)
    folded = fold_batchnorms(graph)
    k = inits["bn.scale"].astype(np.float64) / np.sqrt(inits["bn.var"].astype(np.float64) + 1e-3)
    expected_w = inits["w"] * k[:, None, None, None]
    expected_b = (inits["b"] - inits["bn.mean"]) * k + inits["bn.bias"]
    np.testing.assert_allclose(folded.initializers["w"], expected_w, rtol=1e-6)
    np.testing.assert_allclose(folded.initializers["b"], expected_b, rtol=1e-6, atol=1e-6)
    assert folded.initializers["w"].dtype == np.float32
    # the BN's output was a graph output: the conv's output takes its name (AIMET), outputs never change
    assert folded.output_names == ["y"] and folded.node("conv").outputs == ["y"]
    assert "c" not in folded.values


def test_depthwise_conv_bn():
    rng = np.random.default_rng(2)
    inits = {"w": rng.normal(size=(6, 1, 3, 3)).astype(np.float32), "b": rng.normal(size=6).astype(np.float32),
             **bn_params(rng, 6)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="dw", group=6, pads=[1, 1, 1, 1]),
             bn_node("c", "bn_out"), helper.make_node("Relu", ["bn_out"], ["y"])]
    graph = load(nodes, [("x", FLOAT, [2, 6, 5, 5])], [("y", FLOAT, None)], inits)
    folded, names = fold_batchnorms_pass(graph)
    assert names == ["bn"] and op_types(folded) == ["Conv", "Relu"]
    feeds = {"x": rng.normal(size=(2, 6, 5, 5)).astype(np.float32)}
    assert_same_outputs(graph, folded, feeds)
    assert_valid_onnx(folded, feeds)


@pytest.mark.parametrize("group,c_in,c_out", [(1, 4, 6), (2, 4, 6), (4, 4, 8), (3, 3, 3)])
def test_conv_transpose_bn_with_groups(group, c_in, c_out):
    """ConvTranspose's weight is [C_in, C_out/group, kh, kw]: output channel o of group g is column
    o - g C_out/group of that group's rows."""
    rng = np.random.default_rng(3)
    inits = {"w": rng.normal(size=(c_in, c_out // group, 3, 3)).astype(np.float32), **bn_params(rng, c_out)}
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="convt", group=group, strides=[2, 2],
                              pads=[1, 1, 0, 0], output_padding=[1, 0]),
             bn_node("c", "bn_out"), helper.make_node("Relu", ["bn_out"], ["y"])]
    graph = load(nodes, [("x", FLOAT, [2, c_in, 4, 5])], [("y", FLOAT, None)], inits)
    folded, names = fold_batchnorms_pass(graph)
    assert names == ["bn"] and op_types(folded) == ["ConvTranspose", "Relu"]
    assert folded.node("convt").inputs == ["x", "w", "convt.bias"]
    feeds = {"x": rng.normal(size=(2, c_in, 4, 5)).astype(np.float32)}
    assert_same_outputs(graph, folded, feeds)
    assert_valid_onnx(folded, feeds)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_bn(trans_b, with_c):
    rng = np.random.default_rng(4)
    k, n = 5, 7
    inits = {"B": rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32), **bn_params(rng, n)}
    inputs = ["a", "B"]
    if with_c:
        inits["C"] = rng.normal(size=(1, n)).astype(np.float32)
        inputs.append("C")
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3),
             bn_node("g", "bn_out"), helper.make_node("Relu", ["bn_out"], ["y"])]
    graph = load(nodes, [("a", FLOAT, [3, k])], [("y", FLOAT, None)], inits)
    folded, names = fold_batchnorms_pass(graph)
    assert names == ["bn"] and op_types(folded) == ["Gemm", "Relu"]
    assert folded.node("gemm").attrs["beta"] == 1.0  # the bias now holds beta C, folded
    feeds = {"a": rng.normal(size=(3, k)).astype(np.float32)}
    assert_same_outputs(graph, folded, feeds)
    assert_values_consistent(folded)
    assert_valid_onnx(folded, feeds)


def test_matmul_bn_becomes_gemm():
    """MatMul has no bias: MatMul + BN -> Gemm(A, W', b'), renamed as AIMET does."""
    rng = np.random.default_rng(5)
    inits = {"W": rng.normal(size=(5, 4)).astype(np.float32), **bn_params(rng, 4)}
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"], name="fc/MatMul"), bn_node("m", "bn_out"),
             helper.make_node("Relu", ["bn_out"], ["y"], name="relu")]
    graph = load(nodes, [("a", FLOAT, [3, 5])], [("y", FLOAT, None)], inits)
    folded, names = fold_batchnorms_pass(graph)
    assert names == ["bn"] and op_types(folded) == ["Gemm", "Relu"]
    gemm = folded.nodes[0]
    assert gemm.name == "fc/Gemm" and gemm.inputs == ["a", "W", "fc/Gemm.bias"] and gemm.outputs == ["m"]
    assert folded.node("relu").inputs == ["m"]
    feeds = {"a": rng.normal(size=(3, 5)).astype(np.float32)}
    assert_same_outputs(graph, folded, feeds)
    assert_values_consistent(folded)
    assert_valid_onnx(folded, feeds)


def test_matmul_of_rank_3_is_not_folded():
    """BN normalizes axis 1; a [B, T, N] MatMul output has its features on axis 2."""
    rng = np.random.default_rng(6)
    inits = {"W": rng.normal(size=(5, 4)).astype(np.float32), **bn_params(rng, 3)}
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"]), bn_node("m", "y")]
    graph = load(nodes, [("a", FLOAT, [2, 3, 5])], [("y", FLOAT, None)], inits)
    with pytest.warns(UserWarning, match="no BatchNormalization to fold"):
        folded, names = fold_batchnorms_pass(graph)
    assert names == [] and op_types(folded) == ["MatMul", "BatchNormalization"]


# ------------------------------------------------------------------------------------ BN before a layer
def test_bn_before_unpadded_conv_folds():
    """W'[:, c] = k_c W[:, c], b' = b + sum_{c,taps} W[:, c] d_c: exact without padding (grouped too)."""
    rng = np.random.default_rng(7)
    for group in (1, 2):
        inits = {"w": rng.normal(size=(6, 4 // group, 3, 2)).astype(np.float32), **bn_params(rng, 4)}
        nodes = [bn_node("x", "bn_out"),
                 helper.make_node("Conv", ["bn_out", "w"], ["y"], name="conv", group=group, strides=[1, 2])]
        graph = load(nodes, [("x", FLOAT, [2, 4, 6, 7])], [("y", FLOAT, None)], inits)
        folded, names = fold_batchnorms_pass(graph)
        assert names == ["bn"] and op_types(folded) == ["Conv"]
        assert folded.nodes[0].inputs == ["x", "w", "conv.bias"]
        record = fold_batchnorms_info(graph)[1][0]
        assert record.position == "before" and record.layer == "conv"
        feeds = {"x": rng.normal(size=(2, 4, 6, 7)).astype(np.float32)}
        assert_same_outputs(graph, folded, feeds)
        assert_values_consistent(folded)


@pytest.mark.parametrize("padding", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}])
def test_bn_before_padded_conv_is_not_folded(padding):
    """Zero padding is added after the BN, so border outputs would wrongly receive W d: not folded."""
    rng = np.random.default_rng(8)
    inits = {"w": rng.normal(size=(6, 4, 3, 3)).astype(np.float32), **bn_params(rng, 4)}
    nodes = [bn_node("x", "bn_out"), helper.make_node("Conv", ["bn_out", "w"], ["y"], name="conv", **padding)]
    graph = load(nodes, [("x", FLOAT, [1, 4, 5, 5])], [("y", FLOAT, None)], inits)
    with pytest.warns(UserWarning, match="no BatchNormalization to fold"):
        folded, names = fold_batchnorms_pass(graph)
    assert names == [] and op_types(folded) == ["BatchNormalization", "Conv"]
    feeds = {"x": rng.normal(size=(1, 4, 5, 5)).astype(np.float32)}
    np.testing.assert_array_equal(run(folded, feeds)["y"], run(graph, feeds)["y"])


def test_bn_before_gemm_and_matmul_and_behind_flatten():
    rng = np.random.default_rng(9)
    # BN -> Gemm (transB 1, alpha != 1)
    inits = {"B": rng.normal(size=(3, 5)).astype(np.float32), "C": rng.normal(size=3).astype(np.float32),
             **bn_params(rng, 5)}
    nodes = [bn_node("a", "bn_out"),
             helper.make_node("Gemm", ["bn_out", "B", "C"], ["y"], name="gemm", transB=1, alpha=1.5, beta=0.5)]
    graph = load(nodes, [("a", FLOAT, [4, 5])], [("y", FLOAT, None)], inits)
    folded, names = fold_batchnorms_pass(graph)
    assert names == ["bn"] and op_types(folded) == ["Gemm"]
    assert_same_outputs(graph, folded, {"a": rng.normal(size=(4, 5)).astype(np.float32)})
    # BN -> MatMul (2-D) becomes a Gemm
    inits = {"W": rng.normal(size=(5, 3)).astype(np.float32), **bn_params(rng, 5)}
    nodes = [bn_node("a", "bn_out"), helper.make_node("MatMul", ["bn_out", "W"], ["y"], name="MatMul_0")]
    graph = load(nodes, [("a", FLOAT, [4, 5])], [("y", FLOAT, None)], inits)
    folded, names = fold_batchnorms_pass(graph)
    assert names == ["bn"] and op_types(folded) == ["Gemm"] and folded.nodes[0].name == "Gemm_0"
    feeds = {"a": rng.normal(size=(4, 5)).astype(np.float32)}
    assert_same_outputs(graph, folded, feeds)
    assert_valid_onnx(folded, feeds)
    # BN[N, C, H, W] -> Flatten -> Gemm: feature c*H*W + p belongs to channel c
    inits = {"B": rng.normal(size=(2 * 3 * 4, 6)).astype(np.float32), **bn_params(rng, 2)}
    nodes = [bn_node("x", "bn_out"), helper.make_node("Flatten", ["bn_out"], ["f"], name="flatten", axis=1),
             helper.make_node("Gemm", ["f", "B"], ["y"], name="gemm")]
    graph = load(nodes, [("x", FLOAT, [4, 2, 3, 4])], [("y", FLOAT, None)], inits)
    folded, names = fold_batchnorms_pass(graph)
    assert names == ["bn"] and op_types(folded) == ["Flatten", "Gemm"]
    assert folded.node("flatten").inputs == ["x"]
    feeds = {"x": rng.normal(size=(4, 2, 3, 4)).astype(np.float32)}
    assert_same_outputs(graph, folded, feeds)
    assert_valid_onnx(folded, feeds)


def test_bn_between_two_layers_goes_into_the_first():
    rng = np.random.default_rng(10)
    inits = {"w1": rng.normal(size=(4, 3, 1, 1)).astype(np.float32),
             "w2": rng.normal(size=(5, 4, 1, 1)).astype(np.float32), **bn_params(rng, 4)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"), bn_node("c1", "bn_out"),
             helper.make_node("Conv", ["bn_out", "w2"], ["y"], name="conv2")]
    graph = load(nodes, [("x", FLOAT, [1, 3, 4, 4])], [("y", FLOAT, None)], inits)
    folded, records = fold_batchnorms_info(graph)
    assert [(r.layer, r.position) for r in records] == [("conv1", "after")]
    assert np.array_equal(folded.initializers["w2"], inits["w2"])
    assert_same_outputs(graph, folded, {"x": rng.normal(size=(1, 3, 4, 4)).astype(np.float32)})


def test_a_weight_computed_from_constants_is_folded_too():
    """The conv's weight is Transpose(initializer) and the BN's scale a ConstantOfShape (as in the onnx package's
    light_* models): the chains become initializers first, then the BN folds; outputs unchanged."""
    rng = np.random.default_rng(9)
    inits = {"w_t": rng.normal(size=(3, 8, 3, 3)).astype(np.float32), **bn_params(rng, 8),
             "scale_shape": np.array([8], np.int64)}
    del inits["bn.scale"]
    nodes = [helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0, 2, 3]),
             helper.make_node("ConstantOfShape", ["scale_shape"], ["bn.scale"],
                              value=numpy_helper.from_array(np.array([1.5], np.float32))),
             helper.make_node("Conv", ["x", "w"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("conv_out", "y")]
    graph = load(nodes, [("x", FLOAT, [2, 3, 6, 6])], [("y", FLOAT, None)], inits)
    folded, names = fold_batchnorms_pass(graph)
    assert names == ["bn"] and op_types(folded) == ["Conv"]
    assert op_types(graph) == ["Transpose", "ConstantOfShape", "Conv", "BatchNormalization"]  # input untouched
    assert_same_outputs(graph, folded, {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)})


def test_not_folded_when_the_layer_output_has_other_readers_or_the_bn_is_training():
    rng = np.random.default_rng(11)
    inits = {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float32), **bn_params(rng, 4)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y"),
             helper.make_node("Relu", ["c"], ["z"])]
    graph = load(nodes, [("x", FLOAT, [1, 3, 4, 4])], [("y", FLOAT, None), ("z", FLOAT, None)], inits)
    with pytest.warns(UserWarning, match="no BatchNormalization to fold"):
        assert fold_batchnorms_pass(graph)[1] == []
    # a weight shared with another layer is not overwritten: the fold writes a new tensor
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y"),
             helper.make_node("Conv", ["x", "w"], ["z"], name="other")]
    graph = load(nodes, [("x", FLOAT, [1, 3, 4, 4])], [("y", FLOAT, None), ("z", FLOAT, None)], inits)
    folded, names = fold_batchnorms_pass(graph)
    assert names == ["bn"] and folded.node("other").inputs == ["x", "w"]
    assert folded.node("conv").inputs[1] != "w" and np.array_equal(folded.initializers["w"], inits["w"])
    assert_same_outputs(graph, folded, {"x": rng.normal(size=(1, 3, 4, 4)).astype(np.float32)})


def test_no_batchnorm_warns_and_returns_an_unchanged_copy():
    rng = np.random.default_rng(12)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = load(nodes, [("x", FLOAT, [1, 3, 4, 4])], [("y", FLOAT, None)],
                 {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float32)})
    with pytest.warns(UserWarning, match="no BatchNormalization to fold"):
        folded = fold_batchnorms(graph)
    assert folded is not graph and folded.nodes[0] is not graph.nodes[0]
    assert op_types(folded) == ["Conv"] and np.array_equal(folded.initializers["w"], graph.initializers["w"])


def test_malformed_group_names_the_node():
    rng = np.random.default_rng(13)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="bad_conv", group=3), bn_node("c", "y")]
    model = make_model(nodes, [("x", FLOAT, [1, 4, 4, 4])], [("y", FLOAT, None)],
                       {"w": rng.normal(size=(4, 4, 1, 1)).astype(np.float32), **bn_params(rng, 4)})
    graph = refquant.load(model, infer_shapes=False)
    with pytest.raises(FoldError, match="bad_conv"):
        fold_batchnorms(graph)


# ------------------------------------------------------------------------------------ against AIMET
@needs_convnet
def test_convnet_fold_equals_aimets_folded_model():
    """AIMET's fold_all_batch_norms_to_weight on convnet/model.onnx gave model_bnfolded.onnx. Ours gives the
    same nodes, node names, tensor names and wiring, and the same weights up to float32 rounding of the
    fold formula: weights within 1e-6 relative (AIMET multiplies in float32 with a float32 1/sigma: we
    measured at most 2 ULP), biases within 1e-6 of the magnitude of the terms beta and k (mean - b) that
    are summed (AIMET's float32 difference loses low bits to cancellation: up to 8 ULP of the result)."""
    graph = refquant.load(CONVNET / "model.onnx")
    folded, names = fold_batchnorms_pass(graph)
    assert names == [f"/b{i}/BatchNormalization" for i in range(1, 5)]
    aimet = onnx.load(str(CONVNET / "model_bnfolded.onnx"))
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in aimet.graph.node] == \
        [(n.op_type, n.name, n.inputs, n.outputs) for n in folded.nodes]
    theirs = {t.name: numpy_helper.to_array(t) for t in aimet.graph.initializer}
    assert set(theirs) == set(folded.initializers)
    for conv, bn in [("c1", "b1"), ("c2", "b2"), ("dw", "b3"), ("pw", "b4")]:
        w, b = folded.initializers[f"{conv}.weight"], folded.initializers[f"{conv}.bias"]
        assert w.dtype == theirs[f"{conv}.weight"].dtype == np.float32
        np.testing.assert_allclose(w, theirs[f"{conv}.weight"], rtol=1e-6, atol=0)
        p = {k: graph.initializers[f"{bn}.{k}"].astype(np.float64) for k in ("weight", "bias", "running_mean",
                                                                               "running_var")}
        k = p["weight"] / np.sqrt(p["running_var"] + 1e-5)
        terms = np.abs(p["bias"]) + np.abs(k * (p["running_mean"] - graph.initializers[f"{conv}.bias"]))
        assert np.all(np.abs(b - theirs[f"{conv}.bias"]) <= 1e-6 * terms)
    assert np.array_equal(folded.initializers["fc.weight"], theirs["fc.weight"])


@needs_convnet
def test_convnet_folded_keeps_the_names_aimets_encodings_use():
    graph = fold_batchnorms(refquant.load(CONVNET / "model.onnx"))
    tensors = set(graph.initializers) | set(graph.input_names) | {o for n in graph.nodes for o in n.outputs}
    for cfg in sorted(p.name for p in CONVNET.iterdir() if (p / "model.encodings").exists()):
        encodings = json.loads((CONVNET / cfg / "model.encodings").read_text())
        names = [e if isinstance(e, str) else e["name"] for section in ("activation_encodings", "param_encodings")
                 for e in encodings[section]]
        assert names and set(names) <= tensors, (cfg, set(names) - tensors)


@needs_convnet
def test_convnet_fold_preserves_outputs_on_the_samples_data():
    graph = refquant.load(CONVNET / "model.onnx")
    folded = fold_batchnorms(graph)
    for split in ("calib", "eval"):
        assert_same_outputs(graph, folded, {"input": np.load(CONVNET / f"{split}.npz")["input"]})
    assert_values_consistent(folded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second fold finds nothing, and says so
        with pytest.raises(UserWarning, match="no BatchNormalization to fold"):
            fold_batchnorms(folded)
