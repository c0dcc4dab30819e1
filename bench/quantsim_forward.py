"""QuantSim forward (sim.run) against refquant's float forward on the same graph and batch.

Target (QuantSim issue): sim.run on MobileNetV2 at batch 16 <= 2x the float forward (AIMET's simulation
is 6.6x slower than float onnxruntime on CPU). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def median_time(fn, runs: int) -> float:
    fn()  # warm-up: kernel compilation and first-touch allocations
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mobilenet_v2", "mtcnn_rnet", "light_resnet50"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    import refquant
    from refquant import zoo
    from refquant.feeds import random_feeds
    from refquant.quant import QuantSim

    print(f"{'model':<20}{'batch':>6}{'float ms':>10}{'sim ms':>10}{'ratio':>7}  precision")
    for name in args.models:
        graph = refquant.load(zoo.fetch(name))
        try:
            feeds = random_feeds(graph, batch=args.batch, seed=0)
        except refquant.RefquantError:
            feeds = random_feeds(graph, batch=1, seed=0)  # a model with a fixed batch of 1
        for precision in ("w8a8", "w8a16"):
            sim = QuantSim(graph, precision=precision, threads=2)
            sim.compute_encodings([feeds], progress=False)
            t_float = median_time(lambda: sim.run_float(feeds), args.runs)
            t_sim = median_time(lambda: sim.run(feeds), args.runs)
            batch = len(next(iter(feeds.values())))
            print(f"{name:<20}{batch:>6}{t_float * 1e3:>10.1f}{t_sim * 1e3:>10.1f}{t_sim / t_float:>7.2f}  {precision}")


if __name__ == "__main__":
    main()
