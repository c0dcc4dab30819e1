"""Speed of refquant's MLAS kernels against the NumPy/SciPy functions the float runtime used before and
against onnxruntime's operators. Prints best-of-N milliseconds; asserts nothing.

    python bench/mlas_speed.py [--sizes 1000000,8000000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import scipy.special
from onnx import TensorProto, helper

from refquant import parallel
from refquant.kernels import mlas

BEFORE = {"Sigmoid": scipy.special.expit, "Tanh": np.tanh, "Erf": scipy.special.erf, "Exp": np.exp}
AFTER = {"Sigmoid": mlas.logistic, "Tanh": mlas.tanh, "Erf": mlas.erf, "Exp": mlas.exp}


def best_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def ort_session(op: str, threads: int = 1) -> ort.InferenceSession:
    """onnxruntime running the one float op ``op`` on a 1-D float32 tensor, with ``threads`` intra-op threads."""
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,8000000")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    for size in map(int, args.sizes.split(",")):
        x = (np.random.default_rng(0).standard_normal(size) * 3).astype(np.float32)
        out = np.empty_like(x)
        for op in AFTER:
            row = [f"{op:8s} n={size:>9d}", f"before {best_ms(lambda: BEFORE[op](x), args.repeat):7.2f} ms"]
            for threads in (1, 2):
                with parallel.thread_budget(threads):
                    row.append(f"mlas {threads}T {best_ms(lambda: AFTER[op](x, out=out), args.repeat):6.2f} ms")
                sess = ort_session(op, threads)
                row.append(f"onnxruntime {threads}T {best_ms(lambda: sess.run(None, {'x': x}), args.repeat):6.2f} ms")
            print("  ".join(row))


if __name__ == "__main__":
    main()
