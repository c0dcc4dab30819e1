"""Import and export: Constant folding into initializers, form normalization, bad files, round trips."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import refquant
from refquant.errors import ModelLoadError, UnsupportedOpError, UnsupportedTypeError

from .helpers import FLOAT, make_model, ort_run


def test_constant_nodes_become_initializers():
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32([1, 2, 3])))
    model = make_model([const, helper.make_node("Add", ["x", "c"], ["y"])], [("x", FLOAT, [3])], [("y", FLOAT, [3])])
    graph = refquant.load(model)
    assert [n.op_type for n in graph.nodes] == ["Add"]
    np.testing.assert_array_equal(graph.initializers["c"], [1, 2, 3])
    y = refquant.Session(graph).run({"x": np.float32([1, 1, 1])})["y"]
    np.testing.assert_array_equal(y, [2, 3, 4])


def test_initializers_listed_as_inputs_are_constants():
    model = make_model([helper.make_node("Mul", ["x", "w"], ["y"])],
                       [("x", FLOAT, [2]), ("w", FLOAT, [2])], [("y", FLOAT, [2])],
                       {"w": np.float32([3, 4])}, opset=9, ir_version=3)
    graph = refquant.load(model)
    assert graph.input_names == ["x"]
    np.testing.assert_array_equal(refquant.Session(graph).run({"x": np.float32([1, 2])})["y"], [3, 8])


def test_every_unsupported_op_is_listed_at_once():
    nodes = [helper.make_node("FooOp", ["x"], ["a"]), helper.make_node("BarOp", ["a"], ["b"]),
             helper.make_node("Baz", ["b"], ["y"], domain="com.example")]
    model = make_model(nodes, [("x", FLOAT, [1])], [("y", FLOAT, [1])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOpError) as info:
        refquant.load(model)
    assert info.value.ops == [("", "BarOp"), ("", "FooOp"), ("com.example", "Baz")]
    assert "BarOp" in str(info.value) and "com.example::Baz" in str(info.value)


def test_bad_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError, match="nope.onnx"):
        refquant.load(missing)
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model")
    with pytest.raises(ModelLoadError, match="text.onnx"):
        refquant.load(text)
    good = make_model([helper.make_node("Abs", ["x"], ["y"])], [("x", FLOAT, [4])], [("y", FLOAT, [4])],
                      {"pad": np.zeros(1000, np.float32)})
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.SerializeToString()[:-1500])
    with pytest.raises(ModelLoadError, match="truncated.onnx"):
        refquant.load(truncated)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.onnx"):
        refquant.load(empty)


def test_string_tensors_are_refused_with_the_type_named():
    model = make_model([helper.make_node("Identity", ["s"], ["t"])],
                       [("s", TensorProto.STRING, [1])], [("t", TensorProto.STRING, [1])])
    with pytest.raises(UnsupportedTypeError, match="STRING"):
        refquant.load(model)


def _clip7():
    return make_model([helper.make_node("Clip", ["x"], ["y"], name="clip", min=-0.5, max=0.25)],
                      [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])], opset=7)


def test_old_attribute_form_is_normalized_to_inputs():
    graph = refquant.load(_clip7())
    clip = graph.node("clip")
    assert clip.version == 11 and clip.attrs == {}
    assert [float(graph.initializers[name]) for name in clip.inputs[1:]] == [-0.5, 0.25]
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(refquant.Session(graph).run({"x": x})["y"], ort_run(_clip7(), {"x": x})["y"])


def test_save_restores_the_original_opset_form(tmp_path):
    path = refquant.save(refquant.load(_clip7()), tmp_path / "clip.onnx")
    saved = onnx.load(str(path))
    assert saved.opset_import[0].version == 7
    clip = saved.graph.node[0]
    assert list(clip.input) == ["x"] and {a.name for a in clip.attribute} == {"min", "max"}
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(ort_run(saved, {"x": x})["y"], ort_run(_clip7(), {"x": x})["y"])
    assert len(saved.graph.initializer) == 0  # the bounds are attributes again, not also dead initializers


def test_save_is_atomic_and_refuses_to_overwrite_when_asked(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        refquant.save(refquant.load(_clip7()), target, overwrite=False)
    assert target.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp file left behind


def test_external_data_models_load(tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [("x", FLOAT, [64, 64])],
                       [("y", FLOAT, [64, 64])], {"w": w})
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").stat().st_size >= w.nbytes
    graph = refquant.load(path)
    np.testing.assert_array_equal(graph.initializers["w"], w)
    x = np.ones((64, 64), np.float32)
    np.testing.assert_array_equal(refquant.Session(graph).run({"x": x})["y"], x + w)


def test_shapes_and_dtypes_are_inferred_without_value_info():
    nodes = [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Cast", ["s"], ["i"], to=TensorProto.INT32),
             helper.make_node("Greater", ["s", "b"], ["g"])]
    model = make_model(nodes, [("x", FLOAT, ["batch", 1, 4])], [("g", TensorProto.BOOL, None)],
                       {"b": np.zeros((3, 1), np.float32)})
    graph = refquant.load(model)
    assert graph.values["s"].shape == ("batch", 3, 4) and graph.values["s"].dtype == np.float32
    assert graph.values["i"].dtype == np.int32
    assert graph.values["g"].dtype == np.bool_ and graph.values["g"].shape == ("batch", 3, 4)


def test_shape_inference_inside_a_branch_sees_the_enclosing_scope():
    """An If branch computing from an outer tensor (no value_info anywhere): its tensors get dtype and shape
    from the outer tensor's, as the branch reads it."""
    from onnx import TensorProto, helper, numpy_helper

    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t1"]), helper.make_node("Relu", ["t1"], ["t2"])], "then", [],
        [helper.make_tensor_value_info("t2", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e1"]), helper.make_node("MatMul", ["e1", "w"], ["e2"])], "else", [],
        [helper.make_tensor_value_info("e2", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    g = refquant.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    node = g.nodes[0]
    subs = {s.name: s for s in node.subgraphs()}
    for branch, names in (("then", ("t1", "t2")), ("else", ("e1", "e2"))):
        for name in names:
            value = subs[branch].values[name]
            assert value.dtype == np.float32, (branch, name)
            assert value.shape == (("n", 3) if name != "e1" else ("n", 4)), (branch, name, value.shape)
