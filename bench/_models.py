"""Model helpers shared by the benchmarks."""

from __future__ import annotations

from pathlib import Path


def dynamic_batch_model(path: Path, workdir: Path) -> Path:
    """The model at ``path``, with a symbolic batch dim where it declares a fixed 1 (and -1 in the batch slot
    of its constant Reshape targets); ``path`` itself when the batch is already free."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    # old-IR models also list every initializer as a graph input: the data input is the first that is not one
    initializers = {init.name for init in model.graph.initializer}
    data_input = next(i for i in model.graph.input if i.name not in initializers)
    dim = data_input.type.tensor_type.shape.dim
    if not dim or dim[0].dim_param or dim[0].dim_value != 1:
        return path
    dim[0].dim_param = "N"
    shapes = {n.input[1] for n in model.graph.node if n.op_type == "Reshape"}
    for init in model.graph.initializer:
        if init.name in shapes:
            value = numpy_helper.to_array(init).copy()
            if value.size and value[0] == 1:
                value[0] = -1
                init.CopyFrom(numpy_helper.from_array(value, init.name))
    out = Path(workdir) / f"{Path(path).stem}_dynamic.onnx"
    onnx.save(model, str(out))
    return out
