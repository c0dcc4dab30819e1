"""QuantSim parity probe: any ONNX model, any AIMET config file, the same calibration batches on both sides.

    /tmp/aimet-venv/bin/python bench/aimet_probe.py aimet MODEL DATA.npz OUTDIR --config CFG.json [--batch 4]
    python bench/aimet_probe.py compare MODEL DATA.npz OUTDIR --config CFG.json [--batch 4]

``aimet`` (the Python with aimet-onnx; the bench venv of bench/README.md) builds aimet-onnx's QuantizationSimModel
(W8A8, min_max), calibrates it on DATA.npz's first array (the model's first input) in batches of ``--batch``, and
writes OUTDIR/model.encodings (1.0.0), OUTDIR/model_v2.encodings (2.0.0) and OUTDIR/enabled.json. ``compare``
builds refquant's QuantSim with AIMET's placement settings (``rounding="half_up"``, no preparation, no residual
rule, ``constant_inputs="aimet"``) on the same batches and prints: whether the enabled quantizer sets are equal,
the parameter encodings that are not bit for bit AIMET's, and the activation encodings furthest from AIMET's
(relative scale difference, offset steps). Float sums in another order put activation scales ~1e-6 apart; more is
a finding. It found the tie order (a Resize output into a Concat) and the fused-LayerNorm int32 bias.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def batches(model_path: str, data: Path, size: int) -> list[dict]:
    import onnx

    name = onnx.load(model_path, load_external_data=False).graph.input[0].name
    stored = np.load(data)
    x = stored[stored.files[0]]
    return [{name: x[i:i + size]} for i in range(0, len(x), size)]


def run_aimet(args) -> None:
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel

    sim = QuantizationSimModel(onnx.load(args.model), param_type="int8", activation_type="int8",
                               quant_scheme="min_max", config_file=str(args.config))
    sim.compute_encodings(batches(args.model, args.data, args.batch))
    args.out.mkdir(parents=True, exist_ok=True)
    sim.export(str(args.out), "model", export_model=False, encoding_version="1.0.0")
    sim.export(str(args.out), "model_v2", export_model=False, encoding_version="2.0.0")
    q = sim.qc_quantize_op_dict
    enabled = {"act": sorted(a for a in sim.activation_names if q[a].enabled),
               "par": sorted(p for p in sim.param_names if q[p].enabled)}
    (args.out / "enabled.json").write_text(json.dumps(enabled))


def compare(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import refquant
    from refquant.quant import QuantSim

    sim = QuantSim(refquant.load(args.model), precision="w8a8", quant_scheme="min_max", config=str(args.config),
                   rounding="half_up", prepare=False, residual_rule=False, constant_inputs="aimet")
    sim.compute_encodings(batches(args.model, args.data, args.batch), batch_size=args.batch, progress=False)
    theirs = json.loads((args.out / "model.encodings").read_text())
    enabled = json.loads((args.out / "enabled.json").read_text())
    acts = {n for n, q in sim.quantizers.items() if q.kind != "param" and q.enabled}
    params = {n for n, q in sim.quantizers.items() if q.kind == "param" and q.enabled}
    print("activations enabled alike:", acts == set(enabled["act"]), sorted(acts ^ set(enabled["act"]))[:6])
    print("parameters enabled alike: ", params == set(enabled["par"]), sorted(params ^ set(enabled["par"]))[:6])
    differing = []
    for entry in theirs["param_encodings"]:
        encoding = sim.encoding_of(entry["name"])
        scale, want = np.ravel(encoding.scale), np.asarray(entry["scale"])
        if not (np.array_equal(scale, want) and np.array_equal(np.ravel(encoding.offset), entry["offset"])
                and encoding.bitwidth == entry["bw"] and bool(encoding.symmetric) == entry["is_sym"]):
            differing.append((entry["name"], float(np.max(np.abs(scale - want) / want))))
    print(f"parameters not bit for bit: {len(differing)} of {len(theirs['param_encodings'])}", differing[:4])
    rows = []
    for entry in theirs["activation_encodings"]:
        encoding = sim.encoding_of(entry["name"])
        want = np.asarray(entry["scale"])
        rows.append((float(np.max(np.abs(np.ravel(encoding.scale) - want) / want)),
                     float(np.max(np.abs(np.ravel(encoding.offset) - entry["offset"]))), entry["name"],
                     bool(encoding.symmetric) == entry["is_sym"] and encoding.bitwidth == entry["bw"]))
    rows.sort(reverse=True)
    print(f"activations: {len(rows)}; settings differ on {sum(not r[3] for r in rows)}; furthest "
          f"(relative scale difference, offset steps, tensor):")
    for row in rows[:args.show]:
        print(f"  {row[0]:.3g}  {row[1]:g}  {row[2]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["aimet", "compare"])
    parser.add_argument("model")
    parser.add_argument("data", type=Path, help=".npz whose first array feeds the model's first input")
    parser.add_argument("out", type=Path, help="folder for AIMET's files")
    parser.add_argument("--config", type=Path, required=True, help="an AIMET config file (golden/aimet/configs/)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--show", type=int, default=5)
    args = parser.parse_args(argv)
    run_aimet(args) if args.side == "aimet" else compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
