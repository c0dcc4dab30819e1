"""Every float32 bit pattern through refquant's MLAS kernels and onnxruntime's operators; prints the counts
of differing outputs (bit patterns) and the time each side took. Prints, never asserts.

    python bench/mlas_exhaustive.py [--ops Sigmoid,Tanh,Erf,Exp] [--chunk-bits 24] [--no-progress]

All 2^32 inputs take about a minute per op on one core (NaN inputs included: their outputs are compared
as bit patterns too, so sign and payload count).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from refquant.kernels import mlas

from mlas_speed import ort_session  # bench/ is the script's directory, first on sys.path

KERNELS = {"Sigmoid": mlas.logistic, "Tanh": mlas.tanh, "Erf": mlas.erf, "Exp": mlas.exp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(KERNELS))
    parser.add_argument("--chunk-bits", type=int, default=24)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    chunk = 1 << args.chunk_bits
    for op in args.ops.split(","):
        kernel, sess = KERNELS[op], ort_session(op)
        differing, first, t_ours, t_ort = 0, None, 0.0, 0.0
        out = np.empty(chunk, dtype=np.float32)
        offsets = np.arange(chunk, dtype=np.uint32)
        for start in tqdm(range(0, 1 << 32, chunk), desc=op, disable=args.no_progress):
            x = (offsets + np.uint32(start)).view(np.float32)
            t0 = time.perf_counter()
            kernel(x, out=out)
            t1 = time.perf_counter()
            ref = sess.run(None, {"x": x})[0]
            t2 = time.perf_counter()
            t_ours, t_ort = t_ours + t1 - t0, t_ort + t2 - t1
            bad = np.nonzero(out.view(np.uint32) != ref.view(np.uint32))[0]
            if bad.size and first is None:
                first = (x[bad[0]], out[bad[0]], ref[bad[0]])
            differing += bad.size
        print(f"{op}: {differing} of 2^32 inputs differ from onnxruntime {ort.__version__}"
              + (f" (first: x={first[0]!r}: ours {first[1]!r}, onnxruntime {first[2]!r})" if first else "")
              + f"; refquant {t_ours:.1f} s, onnxruntime {t_ort:.1f} s (one thread each)")


if __name__ == "__main__":
    main()
