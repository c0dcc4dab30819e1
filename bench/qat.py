"""QAT benchmark: regular QAT and QAT with range learning against the best PTQ result.

    python bench/qat.py                          # R-Net W4A4 and W4A8, MobileNetV2 W4A8
    python bench/qat.py --models rnet            # R-Net only (a few minutes)
    python bench/qat.py --models mobilenet_v2 --mnv2-ptq-cache /tmp/ptq   # PTQ (AdaRound 1000) + 2 x 288 steps
    python bench/qat.py --timing                 # backward/forward cost only

MTCNN R-Net (/work/shared/models/mtcnn_rnet.onnx) on the 200 LFW images of /work/shared/data/lfw_subset.npy
(first 100 faces, last 100 not; 25x25 gray resized bilinearly to 24x24, replicated to RGB, (255 x - 127.5) / 128
as MTCNN does): every PTQ row is a fresh ``QuantSim(precision=...)`` calibrated on the 200 images, then the
technique on the same images and ``compute_encodings`` again (as bench/ptq.py). QAT starts from the best PTQ
row (highest face-probability SQNR) and trains on the same 200 images ("on the same data", as the issue
asks), distilling from the FP32 model (``--distill``, default: each output's MSE divided by the FP32
output's variance; no labels). Reported: SQNR of ``prob`` and ``bbox_reg`` against FP32, face accuracy
(FP32: 100 %) and mean |face probability - FP32's|.

MobileNetV2 (``--mnv2-precision``, default W4A8, per-channel weights): PTQ calibrates on bench/ptq.py's
64 calibration crops (random 224x224 crops and flips of the photos in /work/shared/data, seed 0; AIMET's
recipe); QAT trains on ``--mnv2-train`` (384) crops of the same seed-0 stream, whose first 64 are those
calibration crops, minus any crop equal to an evaluation crop; evaluation on bench/ptq.py's 128 other crops
(seed 1), held out from both. PTQ rows (``--mnv2-ptq``: nearest, AdaRound ``--mnv2-adaround`` iterations,
SeqMSE; ``--mnv2-ptq-cache DIR`` keeps them) are compared on the calibration crops only, and QAT (regular,
then with range learning) starts from the best. Reported: logits SQNR and top-1 agreement with FP32 on
the calibration and on the evaluation crops. Loss: ``--distill`` (default "mse": each output's MSE
divided by the FP32 output's variance).

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
                 range_learning=range_learning, lr_schedule="cosine", distill=args.distill,
                 progress=args.progress)
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

QUANTIZER_STATE = ("enabled", "bitwidth", "symmetric", "axis", "tied_to", "encoding", "frozen", "fixed_value")


def save_sim_state(sim, path: Path) -> None:
    """The quantizer state ``clone_sim`` copies, pickled (a bench cache: AdaRound 1,000 runs once)."""
    import pickle

    state = {name: {a: getattr(q, a) for a in QUANTIZER_STATE} for name, q in sim.quantizers.items()}
    path.write_bytes(pickle.dumps({"quantizers": state, "calibrated": sorted(sim._calibrated)}))


def load_sim_state(graph, precision: str, path: Path, scheme: str = "min_max"):
    import pickle

    from refquant.quant import QuantSim

    state = pickle.loads(path.read_bytes())
    sim = QuantSim(graph.copy(), precision=precision, quant_scheme=scheme)
    for name, attrs in state["quantizers"].items():
        for a, v in attrs.items():
            setattr(sim.quantizers[name], a, v)
    sim._calibrated = set(state["calibrated"])
    sim.invalidate()
    return sim


def bench_mobilenet(args) -> None:
    import refquant
    from bench.ptq import photo_crops

    precision = args.mnv2_precision
    graph = refquant.load(SHARED / "models" / "mobilenet_v2_imagenet.onnx")
    # seed 0 draws the same crops in the same order whatever the count: the first 64 of the training set
    # are bench/ptq.py's (AIMET recipe) calibration crops; the evaluation crops (seed 1) are bench/ptq.py's.
    train_x = photo_crops(args.mnv2_train, seed=0)
    calib_x = train_x[:args.mnv2_calib]
    eval_x = photo_crops(args.mnv2_eval, seed=1)
    # 12 photos: a few random crops repeat exactly (same photo, corner and flip); training crops equal to an
    # evaluation crop are dropped so that the evaluation set is held out (384 crops: #268 and #302 go)
    seen = {e.tobytes() for e in eval_x}
    keep = [i for i, x in enumerate(train_x) if x.tobytes() not in seen]
    if len(keep) < len(train_x):
        assert all(i in keep for i in range(len(calib_x))), "a calibration crop is an evaluation crop"
        print(f"  (dropped training crops {sorted(set(range(len(train_x))) - set(keep))}: equal to evaluation crops)")
        train_x = train_x[keep]
    session = refquant.Session(graph)
    ref_calib = run_all(session.run, calib_x, 16)["logits"]
    ref_eval = run_all(session.run, eval_x, 16)["logits"]
    steps = args.mnv2_epochs * -(-len(train_x) // args.mnv2_batch)
    print(f"\nMobileNetV2 {precision.upper()} (per-channel weights, {args.mnv2_scheme}): PTQ calibrates on the {len(calib_x)} calibration "
          f"crops (seed 0, bench/ptq.py); QAT trains on {len(train_x)} crops (seed 0, a superset of them), "
          f"{args.mnv2_epochs} epochs x batch {args.mnv2_batch} = {steps} steps, Adam lr {args.mnv2_lr:g} "
          f"(ranges {args.range_lr or args.mnv2_lr:g}), cosine, distill {args.distill}; evaluation: "
          f"{len(eval_x)} held-out crops (seed 1)", flush=True)
    print(f"  {'':<36} {'calib dB':>8} {'top1 %':>7} {'eval dB':>8} {'top1 %':>7}  seconds")

    def show(label, sim, seconds):
        ca = run_all(sim.run, calib_x, 16)["logits"]
        ev = run_all(sim.run, eval_x, 16)["logits"]
        print(f"  {label:<36} {sqnr(ref_calib, ca):8.2f} {100 * np.mean(ca.argmax(1) == ref_calib.argmax(1)):7.1f} "
              f"{sqnr(ref_eval, ev):8.2f} {100 * np.mean(ev.argmax(1) == ref_eval.argmax(1)):7.1f}  {seconds:.0f}",
              flush=True)
        return sqnr(ref_calib, ca)

    ptq = {}
    for technique in args.mnv2_ptq:
        label = f"PTQ {technique}" + (f" {args.mnv2_adaround}" if technique == "adaround" else "")
        cache = (Path(args.mnv2_ptq_cache) / f"mnv2_{precision}_{technique}"
                 f"{args.mnv2_adaround if technique == 'adaround' else ''}_{len(calib_x)}"
                 f"{'' if args.mnv2_scheme == 'min_max' else '_' + args.mnv2_scheme}.pkl"
                 if args.mnv2_ptq_cache else None)
        start = time.perf_counter()
        if cache is not None and cache.exists():
            sim, label = load_sim_state(graph, precision, cache, args.mnv2_scheme), label + " (cached)"
        else:
            sim = ptq_sim(graph, precision, technique, calib_x, 16, args.mnv2_adaround, args.mnv2_scheme)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                save_sim_state(sim, cache)
        ptq[label] = (sim, show(label, sim, time.perf_counter() - start))
    if args.mnv2_reuse_weights:
        # the weight quantizers (AdaRound's rounding and frozen encodings) of a cached sim, fresh activation
        # encodings at this precision (AdaRound leaves activations unquantized: its rounding does not depend
        # on the activation bitwidth unless quantize_activations)
        import pickle

        from refquant.quant import QuantSim

        start = time.perf_counter()
        state = pickle.loads(Path(args.mnv2_reuse_weights).read_bytes())["quantizers"]
        sim = QuantSim(graph.copy(), precision=precision, quant_scheme=args.mnv2_scheme)
        for name, q in sim.quantizers.items():
            if q.kind == "param" and q.role != "bias":
                for a, v in state[name].items():
                    setattr(q, a, v)
        sim.compute_encodings(calib_x, batch_size=16, progress=False)
        label = f"PTQ weights of {Path(args.mnv2_reuse_weights).stem}"
        ptq[label] = (sim, show(label, sim, time.perf_counter() - start))
    best = max(ptq, key=lambda k: ptq[k][1])  # chosen on the calibration crops, not on the evaluation set
    print(f"  best PTQ by calibration-set SQNR: {best}", flush=True)
    for mode in args.mnv2_modes:
        sim = clone_sim(ptq[best][0], graph, precision, args.mnv2_scheme)
        result, seconds = train(sim, train_x, args, mode == "range", args.mnv2_epochs, args.mnv2_lr, args.mnv2_batch)
        show(f"QAT{' + range learning' if mode == 'range' else ''} from best PTQ", sim, seconds)
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
    parser.add_argument("--mnv2-precision", default="w4a8")
    parser.add_argument("--mnv2-scheme", default="min_max", help="QuantSim quant_scheme of the MobileNetV2 sims")
    parser.add_argument("--mnv2-calib", type=int, default=64, help="PTQ calibration crops (the first of the training set)")
    parser.add_argument("--mnv2-train", type=int, default=384, help="QAT training crops (seed 0)")
    parser.add_argument("--mnv2-eval", type=int, default=128, help="held-out evaluation crops (seed 1)")
    parser.add_argument("--mnv2-epochs", type=int, default=6)
    parser.add_argument("--mnv2-lr", type=float, default=1e-4)
    parser.add_argument("--mnv2-batch", type=int, default=8)
    parser.add_argument("--mnv2-adaround", type=int, default=1000)
    parser.add_argument("--mnv2-ptq", nargs="+", default=["nearest", "adaround"],
                        choices=["nearest", "seq_mse", "adaround"])
    parser.add_argument("--mnv2-ptq-cache", default=None, help="folder to keep PTQ quantizer states in (pickles)")
    parser.add_argument("--mnv2-reuse-weights", default=None,
                        help="a --mnv2-ptq-cache pickle whose weight quantizers (e.g. AdaRound's) start another PTQ row")
    parser.add_argument("--distill", default="mse", help="distillation loss of qat (mse, mse_raw, sqnr, kl)")
    parser.add_argument("--mnv2-modes", nargs="*", default=["regular", "range"], choices=["regular", "range"])
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
