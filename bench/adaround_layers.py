"""AdaRound layer by layer, refquant beside aimet-onnx on the same model and calibration set: where does one
rounding beat the other?

AIMET's rounding comes from ``<row>_weights.npz`` (bench/aimet_models.py writes it for AdaRound rows: its
soft-rounded weights, snapped here to refquant's weight grid, which is AIMET's bit for bit on the models checked
with bench/aimet_probe.py). refquant's comes from a run of ``adaround`` on the same samples (W4A8, per-channel,
AIMET's rounding of ties, as bench/ptq_vs_aimet_models.py). Both roundings are put into the same refquant
simulation (activations calibrated again after, as AIMET does), so the only difference is the rounding. Prints:

* per layer: the fraction of weights each rounding moves off nearest rounding (and the fraction both move), and
  the SQNR of the layer's output against FP32 in the whole simulation with each rounding (``--eval-count``
  evaluation samples): where the two part;
* the primary output's SQNR on the whole evaluation set with each rounding, and with AIMET's rounding on the
  ``--blocks`` slices of layers (graph order) and refquant's elsewhere. A layer's rounding compensates the errors
  of the layers before it, so these mixes are not additive: a block of one method's layers inside the other's is
  often worse than both.

    /tmp/aimet-venv/bin/python bench/aimet_models.py --data /tmp/rq/nn_sets --out /tmp/rq/nn_sets_aimet \\
        --models nudenet_320n_q0 --rows --adaround 1000
    python bench/adaround_layers.py --model nudenet_320n --calib /tmp/rq/nn_sets/nudenet_320n_q0/calib.npy \\
        --aimet-weights /tmp/rq/nn_sets_aimet/nudenet_320n_q0/w4a8_adaround_1000_weights.npz --iterations 1000 \\
        --blocks 0:20 20:40 40:

Results: bench/results_ptq_vs_aimet_models.txt. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import ptq_vs_aimet_models as models  # noqa: E402


def simulation(name: str, graph, calib: dict):
    from refquant.quant import QuantSim

    sim = QuantSim(graph.copy(), precision="w4a8", config="per_channel", **models.sim_options(name))
    sim.compute_encodings(calib, batch_size=models.BATCH, progress=False)
    return sim


def with_rounding(name: str, graph, calib: dict, rounding: dict):
    """A fresh simulation with each weight of ``rounding`` fixed to its value, activations calibrated after."""
    sim = simulation(name, graph, calib)
    for weight, value in rounding.items():
        sim.set_quantized_parameter(weight, value)
    sim.compute_encodings(calib, batch_size=models.BATCH, progress=False)
    return sim


def layer_outputs(sim) -> dict:
    """weight name -> the output tensor of the node that reads it."""
    return {node.inputs[1]: node.outputs[0] for node in sim.graph.nodes
            if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.inputs) > 1}


def main(argv=None) -> int:
    from refquant import load
    from refquant.ptq.adaround import adaround
    from refquant.quant.qdq import quantize_dequantize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a bench/ptq_vs_aimet_models.py model name")
    parser.add_argument("--calib", type=Path, required=True, help="the calibration samples AIMET used (.npy)")
    parser.add_argument("--aimet-weights", type=Path, required=True, help="bench/aimet_models.py's *_weights.npz")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--adaround-options", default="{}", help="JSON keyword arguments for refquant's adaround()")
    parser.add_argument("--eval-count", type=int, default=32, help="evaluation samples for the per-layer SQNR")
    parser.add_argument("--blocks", nargs="*", default=[], help="layer slices I:J (graph order) to take from AIMET")
    args = parser.parse_args(argv)

    spec = models.model_spec(args.model)
    graph = load(spec["ours_model"])
    calib = {spec["input"]: np.load(args.calib)}
    sim = simulation(args.model, graph, calib)
    report = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adaround(sim, calib, num_iterations=args.iterations, batch_size=models.BATCH, progress=False, report=report,
                 **json.loads(args.adaround_options))
    print(f"refquant adaround: {time.perf_counter() - start:.0f} s", flush=True)
    names = [r.weight for r in report]
    ours = {n: sim.quantizers[n].fixed_value for n in names}
    saved = dict(np.load(args.aimet_weights))
    theirs = {n: quantize_dequantize(saved[n].astype(np.float32), sim.encoding_of(n), "half_even") for n in names}
    nearest = {n: quantize_dequantize(sim.graph.initializers[n], sim.encoding_of(n), "half_even") for n in names}

    outputs = layer_outputs(sim)
    feeds = {spec["input"]: spec["eval"][:args.eval_count]}
    wanted = [outputs[n] for n in names]
    reference = sim.run_float(feeds, outputs=wanted)
    sqnr = {}
    for who, rounding in (("aimet", theirs), ("refquant", ours)):
        got = with_rounding(args.model, graph, calib, rounding).run(feeds, outputs=wanted)
        sqnr[who] = [models.sqnr(reference[o], got[o]) for o in wanted]
    print(f"{'layer':<36} {'moved: AIMET':>12} {'refquant':>8} {'both':>6} | SQNR AIMET refquant   diff")
    for i, (r, n) in enumerate(zip(report, names)):
        a, o = theirs[n] != nearest[n], ours[n] != nearest[n]
        print(f"{r.layer[:36]:<36} {np.mean(a):12.3f} {np.mean(o):8.3f} {np.mean(a & o):6.3f} | "
              f"{sqnr['aimet'][i]:10.2f} {sqnr['refquant'][i]:8.2f} {sqnr['refquant'][i] - sqnr['aimet'][i]:+6.2f}")

    fp32 = models.fp32_reference(spec)
    mixes = [("AIMET everywhere", set(names)), ("refquant everywhere", set())]
    for block in args.blocks:
        first, _, last = block.partition(":")
        chosen = names[int(first or 0):int(last) if last else len(names)]
        mixes.append((f"AIMET on layers {block}", set(chosen)))
    for label, chosen in mixes:
        rounding = {n: theirs[n] if n in chosen else ours[n] for n in names}
        out = models.sim_outputs(with_rounding(args.model, graph, calib, rounding), spec)
        print(f"{label:<28} SQNR {models.metrics(args.model, spec, fp32, out)['sqnr']:6.2f} dB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
