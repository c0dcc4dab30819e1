"""QAT benchmark: regular QAT and QAT with range learning against the best PTQ result.

    python bench/qat.py                          # R-Net W4A4 and W4A8, MobileNetV2 W4A8
    python bench/qat.py --models rnet            # R-Net only (a few minutes)
    python bench/qat.py --models mobilenet_v2 --mnv2-lr 1e-4 --mnv2-epochs 6 --range-lr 1e-3
    python bench/qat.py --timing                 # backward/forward cost only

MTCNN R-Net (/work/shared/models/mtcnn_rnet.onnx) on the 200 LFW images of /work/shared/data/lfw_subset.npy
(first 100 faces, last 100 not; 25x25 gray resized bilinearly to 24x24, replicated to RGB, (255 x - 127.5) / 128
as MTCNN does): every PTQ row is a fresh ``QuantSim(precision=...)`` calibrated on the 200 images, then the
technique on the same images and ``compute_encodings`` again (as bench/ptq.py). QAT starts from the best PTQ
row (highest face-probability SQNR) and trains on the same 200 images ("on the same data", as the issue
asks), distilling from the FP32 model (MSE on both outputs, no labels). Reported: SQNR of ``prob`` and
``bbox_reg`` against FP32, face accuracy (FP32: 100 %) and mean |face probability - FP32's|.

MobileNetV2 (W4A8, per-channel): calibration/training set = ``--mnv2-train`` random 224x224 crops and flips
of the photos in /work/shared/data (bench/ptq.py's recipe, seed 0), evaluation = ``--mnv2-eval`` other crops
(seed 1); AdaRound (``--mnv2-adaround`` iterations), then QAT from it. Reported: logits SQNR and top-1
agreement with FP32 on both sets.

Time per step and the backward/forward ratio come from ``QatResult`` (recorded forward vs backward pass;
loss, FP32 teacher and optimizer excluded). Asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = Path("/work/shared")


# -- data ------------------------------------------------------------------------------------------

def lfw_rnet() -> tuple[np.ndarray, np.ndarray]:
    """The 200 LFW images as R-Net inputs [200,3,24,24] and labels (1 = face)."""
    from PIL import Image

    faces = np.load(SHARED / "data" / "lfw_subset.npy")
    resized = np.stack([np.asarray(Image.fromarray(f.astype(np.float32), mode="F").resize((24, 24), Image.BILINEAR))
                        for f in faces])
    x = (np.repeat(resized[:, None], 3, axis=1) * 255 - 127.5) / 128
    labels = np.r_[np.ones(100), np.zeros(100)].astype(np.int64)
    return x.astype(np.float32), labels


def run_all(run, data: np.ndarray, batch: int = 50) -> dict[str, np.ndarray]:
    parts = [run({"input": data[i:i + batch]}) for i in range(0, len(data), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    noise = np.sum((ref64 - out.astype(np.float64)) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref64 ** 2) / noise))


# -- sims ------------------------------------------------------------------------------------------

def ptq_sim(graph, precision: str, technique: str, data: np.ndarray, batch: int, adaround_iterations: int,
            scheme: str = "min_max"):
    """A fresh calibrated sim with ``technique`` ("nearest", "seq_mse", "adaround") applied."""
    from refquant.ptq.adaround import adaround
    from refquant.ptq.seq_mse import seq_mse
    from refquant.quant import QuantSim

    sim = QuantSim(graph.copy(), precision=precision, quant_scheme=scheme)
    sim.compute_encodings(data, batch_size=batch, progress=False)
    if technique == "seq_mse":
        seq_mse(sim, data, progress=False)
    elif technique == "adaround":
        adaround(sim, data, num_iterations=adaround_iterations, progress=False)
    if technique != "nearest":
        sim.compute_encodings(data, batch_size=batch, progress=False)
    return sim


def clone_sim(sim, graph, precision: str, scheme: str = "min_max"):
    """A new sim on ``graph`` with ``sim``'s quantizer state (encodings, AdaRound values, flags), so that a
    slow PTQ result is computed once and trained several times (QuantSim does not deep-copy)."""
    from refquant.quant import QuantSim

    twin = QuantSim(graph.copy(), precision=precision, quant_scheme=scheme)
    for name, q in sim.quantizers.items():
        t = twin.quantizers[name]
        for attr in ("enabled", "bitwidth", "symmetric", "axis", "tied_to", "encoding", "frozen", "fixed_value"):
            setattr(t, attr, getattr(q, attr))
    twin._calibrated = set(sim._calibrated)
    twin.invalidate()
    return twin


def train(sim, data, args, range_learning: bool, epochs: int, lr: float, batch: int):
    from refquant.train.qat import qat

    start = time.perf_counter()
    result = qat(sim, data, epochs=epochs, lr=lr, range_lr=args.range_lr, batch_size=batch,
                 range_learning=range_learning, lr_schedule="cosine", progress=args.progress)
    seconds = time.perf_counter() - start
    return result, seconds


def step_figures(result, seconds) -> str:
    per_step = (result.forward_seconds + result.backward_seconds + result.update_seconds) / max(1, result.steps)
    return (f"{result.steps} steps, {seconds:.0f} s total, {per_step:.2f} s/step "
            f"(fwd {result.forward_seconds / max(1, result.steps):.2f} s, bwd "
            f"{result.backward_seconds / max(1, result.steps):.2f} s, bwd/fwd {result.backward_forward_ratio:.2f}x), "
            f"loss {np.mean(result.losses[:max(1, len(result.losses) // 10)]):.4g} -> "
            f"{np.mean(result.losses[-max(1, len(result.losses) // 10):]):.4g}")


# -- R-Net -----------------------------------------------------------------------------------------

def rnet_scores(sim_run, ref, labels):
    out = run_all(sim_run, ref["_x"])
    return (sqnr(ref["prob"], out["prob"]), sqnr(ref["bbox_reg"], out["bbox_reg"]),
            100 * float(np.mean(out["prob"].argmax(1) == labels)),
            float(np.mean(np.abs(out["prob"][:, 1] - ref["prob"][:, 1]))))


def bench_rnet(precision: str, args) -> None:
    import refquant

    graph = refquant.load(SHARED / "models" / "mtcnn_rnet.onnx")
    x, labels = lfw_rnet()
    ref = run_all(refquant.Session(graph).run, x)
    ref["_x"] = x
    fp32_acc = 100 * float(np.mean(ref["prob"].argmax(1) == labels))
    print(f"\nMTCNN R-Net {precision.upper()}: 200 LFW images (train = calibrate = evaluate), FP32 accuracy "
          f"{fp32_acc:.1f} %", flush=True)
    print(f"  {'':<34} {'prob dB':>8} {'bbox dB':>8} {'acc %':>6} {'|dp|':>7}  seconds")
    rows = {}
    for technique, scheme in (("nearest", "min_max"), ("nearest", "tf_enhanced"), ("seq_mse", "min_max"),
                              ("adaround", "min_max")):
        label = f"PTQ {technique} ({scheme})" if technique == "nearest" else f"PTQ {technique}"
        start = time.perf_counter()
        sim = ptq_sim(graph, precision, technique, x, 50, args.rnet_adaround, scheme)
        seconds = time.perf_counter() - start
        rows[label] = (sim, rnet_scores(sim.run, ref, labels))
        s = rows[label][1]
        print(f"  {label:<34} {s[0]:8.2f} {s[1]:8.2f} {s[2]:6.1f} {s[3]:7.4f}  {seconds:.1f}", flush=True)
    best = max(rows, key=lambda k: rows[k][1][0])
    print(f"  best PTQ by prob SQNR: {best}")
    for range_learning in (False, True):
        scheme = "tf_enhanced" if "tf_enhanced" in best else "min_max"
        sim = clone_sim(rows[best][0], graph, precision, scheme)
        result, seconds = train(sim, x, args, range_learning, args.rnet_epochs, args.rnet_lr, args.rnet_batch)
        s = rnet_scores(sim.run, ref, labels)
        label = f"QAT{' + range learning' if range_learning else ''} from best"
        print(f"  {label:<34} {s[0]:8.2f} {s[1]:8.2f} {s[2]:6.1f} {s[3]:7.4f}  {seconds:.1f}", flush=True)
        print(f"      {step_figures(result, seconds)}", flush=True)


# -- MobileNetV2 -----------------------------------------------------------------------------------

def bench_mobilenet(args) -> None:
    import refquant
    from bench.ptq import photo_crops

    graph = refquant.load(SHARED / "models" / "mobilenet_v2_imagenet.onnx")
    train_x, eval_x = photo_crops(args.mnv2_train, seed=0), photo_crops(args.mnv2_eval, seed=1)
    session = refquant.Session(graph)
    ref_train = run_all(session.run, train_x, 16)["logits"]
    ref_eval = run_all(session.run, eval_x, 16)["logits"]
    print(f"\nMobileNetV2 W4A8: train/calibration {train_x.shape[0]} crops, evaluation {eval_x.shape[0]} other crops; "
          f"AdaRound {args.mnv2_adaround} iterations", flush=True)
    print(f"  {'':<34} {'train dB':>8} {'top1 %':>7} {'eval dB':>8} {'top1 %':>7}  seconds")

    def show(label, sim, seconds):
        tr = run_all(sim.run, train_x, 16)["logits"]
        ev = run_all(sim.run, eval_x, 16)["logits"]
        print(f"  {label:<34} {sqnr(ref_train, tr):8.2f} {100 * np.mean(tr.argmax(1) == ref_train.argmax(1)):7.1f} "
              f"{sqnr(ref_eval, ev):8.2f} {100 * np.mean(ev.argmax(1) == ref_eval.argmax(1)):7.1f}  {seconds:.0f}",
              flush=True)

    for technique in ("nearest", "adaround"):
        start = time.perf_counter()
        sim = ptq_sim(graph, "w4a8", technique, train_x, 16, args.mnv2_adaround)
        show(f"PTQ {technique}", sim, time.perf_counter() - start)
    adarounded = sim
    for range_learning in args.mnv2_modes:
        sim = clone_sim(adarounded, graph, "w4a8")
        result, seconds = train(sim, train_x, args, range_learning == "range", args.mnv2_epochs, args.mnv2_lr,
                                args.mnv2_batch)
        show(f"QAT{' + range learning' if range_learning == 'range' else ''} from AdaRound", sim, seconds)
        print(f"      {step_figures(result, seconds)}", flush=True)


# -- backward / forward cost ---------------------------------------------------------------------------

def bench_timing(args) -> None:
    """Median seconds of the recorded forward and of the backward on one batch (alternating, after a warm-up),
    beside the sim's inference forward: the backward/forward ratio without the noise of a training run."""
    import refquant
    from bench.ptq import photo_crops
    from refquant.train.qat import training_setup

    cases = [("MobileNetV2 W4A8", "mobilenet_v2_imagenet.onnx", photo_crops(args.mnv2_batch, seed=0), "w4a8")]
    x, _ = lfw_rnet()
    cases.append(("R-Net W4A4", "mtcnn_rnet.onnx", x[:args.rnet_batch], "w4a4"))
    print(f"\nbackward vs forward, median of {args.timing_runs} alternating runs after a warm-up")
    for label, file, batch, precision in cases:
        graph = refquant.load(SHARED / "models" / file)
        for range_learning in (False, True):
            sim = refquant.QuantSim(graph.copy(), precision=precision)
            sim.compute_encodings(batch, batch_size=len(batch), progress=False)
            engine, params, _, _ = training_setup(sim, range_learning)
            feeds = {"input": batch}
            fwd, bwd, inf = [], [], []
            for run in range(args.timing_runs + 1):
                t0 = time.perf_counter()
                sim.run(feeds)
                t1 = time.perf_counter()
                tape = engine.forward(feeds, params)
                t2 = time.perf_counter()
                engine.backward(tape, {k: np.ones_like(v) for k, v in tape.outputs.items()})
                t3 = time.perf_counter()
                if run:
                    inf.append(t1 - t0)
                    fwd.append(t2 - t1)
                    bwd.append(t3 - t2)
            f, b, i = np.median(fwd), np.median(bwd), np.median(inf)
            print(f"  {label:<18} batch {len(batch):>2} {'range learning' if range_learning else 'regular':<14} "
                  f"sim.run {i:.3f} s, recorded forward {f:.3f} s, backward {b:.3f} s: backward/forward {b / f:.2f}x "
                  f"(vs sim.run {b / i:.2f}x)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["rnet", "mobilenet_v2"], choices=["rnet", "mobilenet_v2"])
    parser.add_argument("--rnet-precisions", nargs="+", default=["w4a4", "w4a8"])
    parser.add_argument("--rnet-epochs", type=int, default=20)
    parser.add_argument("--rnet-lr", type=float, default=1e-4)
    parser.add_argument("--rnet-batch", type=int, default=16)
    parser.add_argument("--rnet-adaround", type=int, default=1000)
    parser.add_argument("--range-lr", type=float, default=None, help="learning rate of ranges (default: --*-lr)")
    parser.add_argument("--mnv2-train", type=int, default=64)
    parser.add_argument("--mnv2-eval", type=int, default=64)
    parser.add_argument("--mnv2-epochs", type=int, default=2)
    parser.add_argument("--mnv2-lr", type=float, default=1e-5)
    parser.add_argument("--mnv2-batch", type=int, default=8)
    parser.add_argument("--mnv2-adaround", type=int, default=200)
    parser.add_argument("--mnv2-modes", nargs="+", default=["regular", "range"], choices=["regular", "range"])
    parser.add_argument("--progress", action="store_true", help="show the QAT progress bars")
    parser.add_argument("--timing", action="store_true", help="only the backward/forward cost measurement")
    parser.add_argument("--timing-runs", type=int, default=5)
    args = parser.parse_args(argv)
    if args.timing:
        bench_timing(args)
        return 0
    if "rnet" in args.models:
        for precision in args.rnet_precisions:
            bench_rnet(precision, args)
    if "mobilenet_v2" in args.models:
        bench_mobilenet(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
