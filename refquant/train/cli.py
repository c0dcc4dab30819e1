"""The ``refquant qat`` subcommand (wired into refquant.cli by ``add_qat_parser(subparsers)``); the
training machinery is imported when the command runs, not when the parser is built."""

from __future__ import annotations


def add_qat_parser(subparsers) -> None:
    """``refquant qat MODEL --data D [--labels L] [--range-learning] --epochs N -o OUTDIR``."""
    from ..analysis.cli import _sim_arguments

    p = subparsers.add_parser("qat", help="quantization-aware training of the calibrated QuantSim (regular or "
                                          "with range learning); exports the trained model and encodings")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="training (and calibration) data: .npz, .npy, a folder of .npy "
                                                 "or of images")
    p.add_argument("--labels", help="integer labels, one per sample (.npy/.npz/.txt): cross-entropy on the first "
                                    "output instead of distillation from the FP32 model")
    p.add_argument("--range-learning", action="store_true", help="train the quantizer ranges too (LSQ/AIMET)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--range-lr", type=float, default=None, help="learning rate of the ranges (default --lr)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "step", "cosine"])
    p.add_argument("--distill", default="mse", choices=["mse", "mse_raw", "sqnr", "kl"],
                   help="distillation loss without labels: MSE on each output divided by the FP32 output's "
                        "variance (mse), the plain sum of MSEs (mse_raw), minus the summed SQNR in dB (sqnr), "
                        "or KL on their softmax")
    p.add_argument("--checkpoint-dir", help="checkpoints go here and a rerun resumes from them "
                                            "(default OUTDIR/checkpoint)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    _sim_arguments(p)
    p.add_argument("--prefix", default=None, help="file name prefix of the export (default: the model's name)")
    from ..intsim import unsigned_weights

    unsigned_weights.add_argument(p)
    p.add_argument("-o", "--output-dir", required=True)
    p.set_defaults(func=cli_qat)


def cli_qat(args) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from ..analysis.cli import calibrated_sim
    from ..errors import RefquantError
    from ..fileio import atomic_path
    from ..runtime import Session
    from .qat import qat

    if args.epochs < 1:
        raise RefquantError(f"--epochs must be >= 1, got {args.epochs}")
    sim, preprocess = calibrated_sim(args)
    reference = Session(sim.graph.copy())  # the FP32 model as given: training changes the sim's weights
    before = fp32_sqnr(sim, reference, args.data, args.batch_size, preprocess)
    out = Path(args.output_dir)
    result = qat(sim, args.data, loss="cross_entropy" if args.labels else "distill", epochs=args.epochs,
                 lr=args.lr, optimizer=args.optimizer, range_learning=args.range_learning,
                 batch_size=args.batch_size, preprocess=preprocess, labels=args.labels, distill=args.distill,
                 lr_schedule=args.lr_schedule, range_lr=args.range_lr,
                 checkpoint_dir=args.checkpoint_dir or out / "checkpoint", checkpoint_every=args.checkpoint_every)
    after = fp32_sqnr(sim, reference, args.data, args.batch_size, preprocess)
    paths = sim.export(out, args.prefix or Path(args.model).stem, unsigned_weights=args.unsigned_weights)
    from ..intsim import unsigned_weights

    unsigned_weights.note(args.unsigned_weights, sim)
    summary = {"steps": result.steps, "resumed_from": result.resumed_from, "losses": result.losses,
               "sqnr_db_before": before, "sqnr_db_after": after,
               "seconds_forward": result.forward_seconds, "seconds_backward": result.backward_seconds,
               "range_learning": bool(args.range_learning)}
    with atomic_path(out / "qat.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    paths["qat"] = str(out / "qat.json")
    tenth = max(1, len(result.losses) // 10)
    first, last = (float(np.mean(result.losses[:tenth])), float(np.mean(result.losses[-tenth:]))) \
        if result.losses else (float("nan"), float("nan"))
    print(f"qat: {result.steps} steps, loss (mean of the first / last tenth of the steps) {first:.5g} -> {last:.5g}")
    for name in before:
        print(f"  {name:<24} SQNR vs FP32 {before[name]:7.2f} dB -> {after[name]:7.2f} dB")
    for kind, path in paths.items():
        print(f"wrote {kind:<10} {path}")
    return 0


def fp32_sqnr(sim, reference, data, batch_size: int, preprocess=None) -> dict[str, float]:
    """SQNR (dB) of the sim's outputs against ``reference`` (a Session of the FP32 model) over ``data``."""
    import numpy as np

    from ..data import iter_feeds

    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for feeds in iter_feeds(data, sim.graph, batch_size=batch_size, preprocess=preprocess):
        ours = sim.run(feeds)
        for name, ref in reference.run(feeds).items():
            ref64 = ref.astype(np.float64)
            signal[name] = signal.get(name, 0.0) + float(np.sum(ref64 ** 2))
            noise[name] = noise.get(name, 0.0) + float(np.sum((ref64 - ours[name]) ** 2))
    return {n: float("inf") if noise[n] == 0 else float(10 * np.log10(signal[n] / noise[n])) for n in signal}
