"""refquant's PTQ rows beside aimet-onnx's on the *same* MobileNetV2 crops.

    python bench/ptq_data.py --dump /tmp/rq/crops --recipes resize248 --photo-sets photos --seeds 0 1 2 3
    /tmp/aimet-venv/bin/python bench/aimet_run.py --crops /tmp/rq/crops --seed-pair K --out /tmp/rq/aimet
    python bench/ptq_vs_aimet.py --crops /tmp/rq/crops --aimet /tmp/rq/aimet --seeds 0 1 2 3

bench/aimet_run.py runs aimet-onnx 2.42.0 (in its own virtual environment: it needs PyTorch) and saves its
logits on the evaluation crops, its encodings and its seconds; this script runs refquant's counterpart of each
row on the same calibration and evaluation crops and prints both: logits SQNR against FP32 (onnxruntime), top-1
agreement with FP32, the technique's seconds. Rows: W8A8 per-channel, per-tensor, per-tensor after CLE (AIMET's
``equalize_model``, which swaps ReLU6 for ReLU; refquant's ``equalize`` keeps ReLU6 exact, and ``+ BC`` adds
refquant's bias correction, which AIMET-ONNX lacks), W4A8 nearest, W4A8 + SeqMSE (20 candidates), W4A8 + AdaRound
(the iteration counts AIMET was run with). Means over the seed pairs come last. Asserts nothing; last run:
bench/results_ptq_vs_aimet.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ptq import BATCH, MOBILENET, run_row, scores, w8a8_row  # noqa: E402


def fp32_reference(ev: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(MOBILENET), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": ev[i:i + BATCH]})[0] for i in range(0, len(ev), BATCH)])


def ours(row: str, graph, calib, ev, ref):
    """(SQNR, top-1 %, technique seconds) of refquant's counterpart of AIMET's ``row``."""
    from refquant.ptq.adaround import adaround
    from refquant.ptq.cle import equalize
    from refquant.ptq.seq_mse import seq_mse

    if row == "w8a8_pc":
        return w8a8_row(graph, calib, ev, "logits", ref, "per_channel")
    if row == "w8a8_pt":
        return w8a8_row(graph, calib, ev, "logits", ref, "per_tensor")
    if row in ("w8a8_pt_cle", "w8a8_pt_cle_bc"):
        start = time.perf_counter()
        equalized = equalize(graph)
        seconds = time.perf_counter() - start
        sqnr, top1, bc_seconds = w8a8_row(equalized, calib, ev, "logits", ref, "per_tensor",
                                          correct_bias=row.endswith("_bc"))
        return sqnr, top1, seconds + (bc_seconds or 0.0)
    if row == "w4a8":
        return run_row(graph, calib, ev, "logits", ref, None)
    if row == "w4a8_seq_mse":
        return run_row(graph, calib, ev, "logits", ref, lambda sim: seq_mse(sim, calib, progress=False))
    if row.startswith("w4a8_adaround_"):
        iterations = int(row.rsplit("_", 1)[1])
        return run_row(graph, calib, ev, "logits", ref,
                       lambda sim: adaround(sim, calib, num_iterations=iterations, progress=False))
    raise ValueError(row)


LABELS = {"w8a8_pc": "W8A8 per-channel", "w8a8_pt": "W8A8 per-tensor", "w8a8_pt_cle": "W8A8 per-tensor + CLE",
          "w8a8_pt_cle_bc": "W8A8 per-tensor + CLE + BC", "w4a8": "W4A8 nearest", "w4a8_seq_mse": "W4A8 + SeqMSE"}


def label(row: str) -> str:
    return LABELS.get(row) or f"W4A8 + AdaRound {row.rsplit('_', 1)[1]} its"


def main(argv=None) -> int:
    import refquant

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=Path, default=Path("/tmp/rq/crops"))
    parser.add_argument("--aimet", type=Path, default=Path("/tmp/rq/aimet"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--rows", nargs="*", help="only these AIMET rows (default: every row AIMET has)")
    args = parser.parse_args(argv)
    graph = refquant.load(MOBILENET)
    table: dict[str, list] = {}
    print(f"{'seeds':<6} {'row':<30} {'AIMET SQNR':>10} {'top-1':>6} {'s':>7}   {'ours SQNR':>9} {'top-1':>6} "
          f"{'s':>7}", flush=True)
    for k in args.seeds:
        folder = args.aimet / f"seed_pair_{k}"
        calib, ev = np.load(args.crops / f"calib_{k}.npy"), np.load(args.crops / f"eval_{k}.npy")
        ref = fp32_reference(ev)
        rows = sorted(p.stem for p in folder.glob("*.npy"))
        if args.rows:
            rows = [r for r in rows if r in args.rows]
        if "w8a8_pt_cle" in rows:
            rows.append("w8a8_pt_cle_bc")
        for row in rows:
            if row == "w8a8_pt_cle_bc":
                aimet = (float("nan"), float("nan"), float("nan"))  # AIMET-ONNX has no bias correction
            else:
                seconds = json.loads((folder / f"{row}.json").read_text())
                aimet = (*scores(ref, np.load(folder / f"{row}.npy")),
                         seconds["technique_s"] + (seconds["prepare_s"] if row.endswith("cle") else 0.0))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mine = ours(row, graph, calib, ev, ref)
            mine = (mine[0], mine[1], mine[2] if mine[2] is not None else float("nan"))
            table.setdefault(row, []).append((*aimet, *mine))
            print(f"{2 * k},{2 * k + 1:<4} {label(row):<30} {aimet[0]:10.2f} {aimet[1]:6.1f} {aimet[2]:7.1f}   "
                  f"{mine[0]:9.2f} {mine[1]:6.1f} {mine[2]:7.1f}", flush=True)
    print("\nmean over the seed pairs each row has:")
    for row, values in table.items():
        a = np.nanmean(np.array(values, dtype=np.float64), axis=0) if len(values) else None
        print(f"{len(values):>2} pairs {label(row):<30} {a[0]:10.2f} {a[1]:6.1f} {a[2]:7.1f}   {a[3]:9.2f} "
              f"{a[4]:6.1f} {a[5]:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
