"""Issue 7's targets on MobileNetV2: the QuantAnalyzer on per-tensor W8A8, and mixed precision (AMP).

    python bench/analysis.py                     # all three parts (long: tens of minutes on 2 cores)
    python bench/analysis.py --part analyze      # (a) analyzer, its suggested fixes measured, sweep time
    python bench/analysis.py --part amp          # (b) AMP from W4A8 to uniform W8A8's metric
    python bench/analysis.py --part top1         # (c) AMP to 95 % top-1 agreement, cost vs uniform W8A16
    python bench/analysis.py --part analyze --profile 40   # the sweep under cProfile, top 40 functions

Data (as bench/ptq.py): MobileNetV2 from /work/shared/models, 64 calibration (seed 0) and 128
evaluation (seed 1) random 224x224 crops (and flips) of the photos in /work/shared/data, resized
(shorter side 256), ImageNet mean/std. Scores: logits SQNR against FP32 and top-1 agreement with FP32
on the 128 evaluation crops.

(a) ``QuantSim(config="per_tensor")`` W8A8 (before CLE) calibrated on the 64 crops; ``analyze`` on
the first ``--analyze-samples`` (32, issue 7's speed target) evaluation crops, serially; prints the
whole-model figures, the top 10 culprits with each one's depthwise flag, weight channel spread
(widest over median channel range) and that spread's rank among the depthwise layers; the overlap of
the top culprits with the depthwise layers of widest spread (and the rank correlation of spread and
sensitivity over the depthwise layers); then the suggested fixes measured: per-channel W8A8 and
CLE (``equalize``) + per-tensor W8A8, each a fresh sim calibrated on the 64 crops. The sweep's wall
time is printed with the load average before and after (the machine is shared).

(b) ``mixed_precision`` from a W4A8 sim (default per-channel config) with candidates
W4A8/W8A8/W8A16, ``target="w8a8"`` (uniform W8A8's SQNR, measured by the search), SQNR metric on the
128 crops, encodings on the 64: the chosen metric and bit-ops against uniform W8A8's.

(c) the same search with ``target_fn=top1_agreement(...)`` and ``target=95`` (%): the search ranks
by SQNR sensitivity and finds the cheapest path point meeting 95 % agreement (bisection along the
path); reports its cost against uniform W8A16's. Candidates W4A8/W8A8/W8A16/W16A16 by default:
uniform W8A16 itself agrees on only 85 % of the crops (2026-11-26), so without a 16-bit weight
candidate the target is out of reach (``--top1-candidates w4a8,w8a8,w8a16`` to see that).

Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ptq import MOBILENET, batched, photo_crops, scores  # noqa: E402  (the same data recipe)

BATCH = 16
OUTPUT = "logits"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def data(args):
    import refquant

    graph = refquant.load(MOBILENET)
    calib, ev = photo_crops(args.calib, seed=0), photo_crops(args.eval, seed=1)
    ref = batched(refquant.Session(graph).run, ev, OUTPUT)
    return graph, calib, ev, ref


def fresh_sim(graph, calib, **kwargs):
    from refquant.quant import QuantSim

    sim = QuantSim(graph, **kwargs)
    sim.compute_encodings(calib, batch_size=BATCH, progress=False)
    return sim


# ------------------------------------------------------------------------------ (a) analyzer
def part_analyze(args, graph, calib, ev, ref) -> None:
    from scipy.stats import spearmanr

    from refquant.analysis import analyze
    from refquant.ptq import equalize

    sim = fresh_sim(graph, calib, config="per_tensor")
    sqnr, top1 = scores(ref, batched(sim.run, ev, OUTPUT))
    sub = ev[:args.analyze_samples]
    print(f"\n(a) analyzer: MobileNetV2 per-tensor W8A8 (before CLE), calibration {calib.shape[0]}, "
          f"analysis on {sub.shape[0]} crops, serial", flush=True)
    print(f"  before: {load()}", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        report = profiler.runcall(analyze, sim, sub, batch_size=BATCH, progress=not args.no_progress)
    else:
        report = analyze(sim, sub, batch_size=BATCH, progress=not args.no_progress)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"  after:  {load()}")
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items())
    print(f"  analyze wall {wall:.1f} s, CPU {cpu:.1f} s (all threads of this process; {cpu / wall:.2f} cores "
          f"busy on average) ({timings}); {report.settings['evaluations']} evaluations, "
          f"{len(report.layers)} quantizer groups; issue target: sweep < 300 s on 2 idle cores", flush=True)
    if args.profile:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(args.profile)
        stats.sort_stats("cumulative").print_stats(args.profile)
    if args.report_dir:
        t0 = time.perf_counter()
        html = report.save(args.report_dir)["html"]
        print(f"  report: {html} (saved in {time.perf_counter() - t0:.1f} s; {load()})")
    print(report.format(top=10))

    # depthwise layers and their weight channel spread
    spread = {}
    for layer in report.layers:
        values = [report.tensors[w].channel_spread for w in layer.weights
                  if w in report.tensors and report.tensors[w].channel_spread is not None]
        spread[layer.name] = max(values) if values else None
    depthwise = [layer for layer in report.layers if layer.depthwise and spread[layer.name] is not None]
    by_spread = sorted(depthwise, key=lambda layer: -spread[layer.name])
    spread_rank = {layer.name: i + 1 for i, layer in enumerate(by_spread)}
    print(f"\n  top 10 culprits (of {len(report.layers)} groups; {len(depthwise)} depthwise):")
    print(f"  {'#':>3} {'group':<34} {'dw':>3} {'spread':>7} {'dw spread rank':>15} {'only dB':>8} "
          f"{'all-but dB':>10}  fix")
    for c in report.culprits[:10]:
        layer = next(layer for layer in report.layers if layer.name == c.group)
        s = spread[c.group]
        print(f"  {c.rank:>3} {c.group[:34]:<34} {'yes' if layer.depthwise else 'no':>3} "
              f"{'-' if s is None else f'{s:.1f}':>7} {spread_rank.get(c.group, '-'):>15} {c.only:8.2f} "
              f"{c.all_but:10.2f}  {c.fix}")
    top = [c.group for c in report.culprits[:10]]
    dw_top = [g for g in top if g in spread_rank]
    widest = {layer.name for layer in by_spread[:10]}
    print(f"  depthwise among the top 10 culprits: {len(dw_top)}; of those among the 10 depthwise layers of "
          f"widest spread: {len(widest & set(dw_top))} (their spread ranks: {[spread_rank[g] for g in dw_top]})")
    print("  the 10 depthwise layers of widest weight channel spread: " + ", ".join(
        f"{layer.name.split('/')[2]} {spread[layer.name]:.1f}x (rank {layer.rank})" for layer in by_spread[:10]))
    rho, p = spearmanr([spread[layer.name] for layer in depthwise], [-layer.only for layer in depthwise])
    print(f"  over the {len(depthwise)} depthwise layers: Spearman rank correlation of weight channel spread "
          f"with sensitivity (lower 'only' SQNR) = {rho:.2f} (p = {p:.2g})")
    fixes: dict[str, int] = {}
    for c in report.culprits[:10]:
        fixes[c.fix] = fixes.get(c.fix, 0) + 1
    print(f"  suggested fixes of the top 10: {fixes}")

    # the suggested fixes, measured
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        equalized = equalize(graph)
    rows = [("W8A8 per-tensor (analyzed)", sqnr, top1)]
    for label, g, config in (("W8A8 per-channel", graph, "default"), ("CLE + W8A8 per-tensor", equalized,
                                                                      "per_tensor")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = fresh_sim(g, calib, config=config)
        rows.append((label, *scores(ref, batched(other.run, ev, OUTPUT))))
    print(f"\n  the fixes on {ev.shape[0]} evaluation crops (logits vs FP32; AIMET: per-tensor 8.0 dB / 67 %, "
          "per-channel 11.5 dB / 73 %, CLE 9.7 dB / 79 %)")
    for label, s, t in rows:
        print(f"  {label:<28} SQNR {s:6.2f} dB   top-1 agreement {t:5.1f} %", flush=True)


# ------------------------------------------------------------------------------ (b), (c) mixed precision
CANDIDATES = ("w4a8", "w8a8", "w8a16")
TOP1_CANDIDATES = CANDIDATES + ("w16a16",)


def part_amp(args, graph, calib, ev, ref, top1_target: float | None = None, candidates=CANDIDATES) -> None:
    from refquant.analysis.amp import mixed_precision, top1_agreement

    sim = fresh_sim(graph, calib, precision="w4a8")
    kwargs = {"target": "w8a8"}
    what = "(b) AMP from W4A8, target: uniform W8A8's SQNR"
    if top1_target is not None:
        kwargs = {"target": top1_target, "target_fn": top1_agreement(graph, ev, batch_size=BATCH)}
        what = f"(c) AMP from W4A8, target: {top1_target:g} % top-1 agreement with FP32"
    print(f"\n{what}; candidates {'/'.join(candidates)}, bit-ops cost, encodings on {calib.shape[0]}, "
          f"metric on {ev.shape[0]} crops, serial", flush=True)
    print(f"  before: {load()}", flush=True)
    start, cpu = time.perf_counter(), time.process_time()
    result = mixed_precision(sim, ev, candidates=candidates, calib_data=calib, batch_size=BATCH,
                             progress=not args.no_progress, **kwargs)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"  after:  {load()}")
    print(f"  wall {wall:.1f} s, CPU {cpu:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()) + ")")
    print(result.format())
    s, t = scores(ref, batched(sim.run, ev, OUTPUT))
    print(f"  final sim, re-scored here: SQNR {s:.2f} dB, top-1 agreement {t:.1f} %")
    uniform = {}
    for cand in candidates:
        usim = fresh_sim(graph, calib, precision=cand)
        uniform[cand] = scores(ref, batched(usim.run, ev, OUTPUT))
        u = result.uniform[cand.upper()]
        print(f"  uniform {cand.upper():<6} bit-ops {u['cost']:.4g}  SQNR {uniform[cand][0]:.2f} dB  top-1 "
              f"{uniform[cand][1]:.1f} %  (search's SQNR {u['metric']:.2f} dB)", flush=True)
    w8a8, w8a16 = result.uniform["W8A8"], result.uniform["W8A16"]
    print(f"  chosen: bit-ops {result.cost:.4g} = {result.cost / w8a8['cost']:.3f} x uniform W8A8, "
          f"{result.cost / w8a16['cost']:.3f} x uniform W8A16; SQNR {s:.2f} dB vs uniform W8A8 "
          f"{uniform['w8a8'][0]:.2f} dB; top-1 {t:.1f} % vs uniform W8A8 {uniform['w8a8'][1]:.1f} %, "
          f"W8A16 {uniform['w8a16'][1]:.1f} %; target {'met' if result.target_met else 'NOT met'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["analyze", "amp", "top1"], choices=["analyze", "amp", "top1"])
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=128)
    parser.add_argument("--analyze-samples", type=int, default=32, help="crops the analyzer sweeps (default 32)")
    parser.add_argument("--top1-target", type=float, default=95.0, help="part top1: agreement in %%")
    parser.add_argument("--top1-candidates", type=lambda text: tuple(text.lower().split(",")), default=TOP1_CANDIDATES,
                        help="part top1: candidates (default w4a8,w8a8,w8a16,w16a16; must include w8a8 and w8a16)")
    parser.add_argument("--report-dir", help="save the analyzer's HTML/JSON report here")
    parser.add_argument("--profile", type=int, default=0, help="cProfile the analyzer, print this many rows")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    graph, calib, ev, ref = data(args)
    print(f"MobileNetV2: calibration {calib.shape}, evaluation {ev.shape}, data + FP32 reference "
          f"{time.perf_counter() - start:.1f} s; {load()}", flush=True)
    if "analyze" in args.part:
        part_analyze(args, graph, calib, ev, ref)
    if "amp" in args.part:
        part_amp(args, graph, calib, ev, ref)
    if "top1" in args.part:
        part_amp(args, graph, calib, ev, ref, top1_target=args.top1_target, candidates=args.top1_candidates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
