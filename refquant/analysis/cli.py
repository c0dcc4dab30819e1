"""The ``refquant analyze`` and ``refquant amp`` subcommands (wired into refquant.cli by
``add_analyze_parser(subparsers)`` / ``add_amp_parser(subparsers)``). The analysis machinery is
imported when a command runs, not when the parser is built."""

from __future__ import annotations


# ------------------------------------------------------------------------------ analyze
def add_analyze_parser(subparsers) -> None:
    """``refquant analyze MODEL --data D -o DIR``: calibrate, analyze, write report.html/report.json."""
    p = subparsers.add_parser("analyze", help="per-layer sensitivity, SQNR along the graph, histograms and "
                                              "flags: an HTML report with the top culprits and their fixes")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="calibration data: .npz, .npy, a folder of .npy or of images")
    p.add_argument("--eval-data", help="data the analysis runs on (default: the calibration data)")
    _sim_arguments(p)
    p.add_argument("--top", type=int, default=10, help="culprits listed (default 10)")
    _scale_arguments(p, "the calibration and the sweep")
    p.add_argument("-o", "--output-dir", required=True, help="where report.html and report.json go")
    p.set_defaults(func=cli_analyze)


def _sim_arguments(p) -> None:
    p.add_argument("--config", default="default", help="built-in name (default, per_tensor) or AIMET config JSON")
    p.add_argument("--scheme", default="min_max", help="min_max (tf), tf_enhanced, percentile, mse, entropy")
    p.add_argument("--precision", default="w8a8", help="w8a8, w8a16, w4a8... (default w8a8)")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weights (the per_tensor config)")
    p.add_argument("--rounding", default="half_even", choices=["half_even", "half_up"])
    p.add_argument("--preprocess", help="image preprocessing, e.g. 'resize_shorter=256;crop=224,224;"
                                        "mean=0.485,0.456,0.406;std=0.229,0.224,0.225'")
    p.add_argument("--batch-size", type=int, default=16)


def _scale_arguments(p, what) -> None:
    from ..scale import add_arguments

    add_arguments(p, what)


def calibrated_sim(args, precision=None, executor=None):
    """Load, build and calibrate the QuantSim the CLI arguments describe; returns (sim, preprocess)."""
    from ..data import Preprocess
    from ..onnx_io import load
    from ..quant import QuantSim

    graph = load(args.model)
    config = "per_tensor" if args.per_tensor and args.config == "default" else args.config
    sim = QuantSim(graph, precision=precision or args.precision, quant_scheme=args.scheme, config=config,
                   rounding=args.rounding)
    preprocess = Preprocess.parse(args.preprocess) if args.preprocess else None
    sim.compute_encodings(args.data, batch_size=args.batch_size, preprocess=preprocess, progress=True,
                          executor=executor)
    return sim, preprocess


def cli_analyze(args) -> int:
    from ..scale import executor_from_args
    from .sensitivity import analyze

    with executor_from_args(args) as executor:
        sim, preprocess = calibrated_sim(args, executor=executor)
        report = analyze(sim, args.eval_data or args.data, batch_size=args.batch_size, progress=True,
                         executor=executor, preprocess=preprocess, top=args.top)
    paths = report.save(args.output_dir)
    print(report.format(top=args.top))
    for kind, path in paths.items():
        print(f"wrote {kind:<5} {path}")
    return 0


# ------------------------------------------------------------------------------ amp
def add_amp_parser(subparsers) -> None:
    """``refquant amp MODEL --data D --candidates w4a8,w8a8,w8a16 --target w8a8 -o DIR``."""
    p = subparsers.add_parser("amp", help="mixed precision: greedy Pareto search over per-layer precisions "
                                          "(AIMET AMP); exports the encodings with per-tensor bitwidths")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="calibration data: .npz, .npy, a folder of .npy or of images")
    p.add_argument("--eval-data", help="data the search is scored on (default: the calibration data)")
    p.add_argument("--candidates", default="w8a8,w8a16,w4a8", help="comma-separated, e.g. w4a8,w8a8,w8a16")
    p.add_argument("--target", help="metric to reach (SQNR dB vs FP32), or a candidate whose uniform metric to reach")
    p.add_argument("--target-top1", type=float, metavar="PCT",
                   help="reach this top-1 agreement with FP32 in percent on the eval data (instead of --target); "
                        "the search still ranks layers by SQNR, the agreement is bisected along its path")
    p.add_argument("--top1-output", help="output whose argmax --target-top1 compares (default: the first)")
    p.add_argument("--budget", help="largest cost, or a candidate whose uniform cost is the budget")
    p.add_argument("--cost", default="bitops", choices=["bitops", "memory"])
    _sim_arguments(p)
    _scale_arguments(p, "the candidate evaluations")
    p.add_argument("--prefix", default=None, help="file name prefix of the export (default: the model's name)")
    from ..intsim import unsigned_weights

    unsigned_weights.add_argument(p)
    p.add_argument("-o", "--output-dir", required=True)
    p.set_defaults(func=cli_amp)


def _goal_arg(text):
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def cli_amp(args) -> int:
    from pathlib import Path

    from ..data import Preprocess
    from ..errors import RefquantError
    from ..onnx_io import load
    from ..quant import QuantSim
    from ..scale import executor_from_args
    from .amp import mixed_precision, top1_agreement

    if args.target_top1 is not None and args.target is not None:
        raise RefquantError("refquant amp: give --target or --target-top1, not both")
    if args.top1_output is not None and args.target_top1 is None:
        raise RefquantError("refquant amp: --top1-output only applies with --target-top1")
    graph = load(args.model)
    config = "per_tensor" if args.per_tensor and args.config == "default" else args.config
    sim = QuantSim(graph, precision=args.precision, quant_scheme=args.scheme, config=config, rounding=args.rounding)
    preprocess = Preprocess.parse(args.preprocess) if args.preprocess else None
    candidates = [c for c in args.candidates.split(",") if c.strip()]
    eval_data = args.eval_data or args.data
    target, target_fn = _goal_arg(args.target), None
    if args.target_top1 is not None:  # FP32 argmax computed once here, on the original graph
        target = args.target_top1
        target_fn = top1_agreement(graph, eval_data, output=args.top1_output, batch_size=args.batch_size,
                                   preprocess=preprocess)
    with executor_from_args(args) as executor:
        result = mixed_precision(sim, eval_data, candidates=candidates, target=target, target_fn=target_fn,
                                 budget=_goal_arg(args.budget),
                                 batch_size=args.batch_size, progress=True, executor=executor, cost=args.cost,
                                 calib_data=args.data, preprocess=preprocess)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = sim.export(out, args.prefix or Path(args.model).stem, unsigned_weights=args.unsigned_weights)
    from ..intsim import unsigned_weights

    unsigned_weights.note(args.unsigned_weights, sim)
    paths["amp"] = result.save(out / "amp.json")
    paths["pareto"] = result.plot(out / "pareto.png")
    print(result.format())
    for kind, path in paths.items():
        print(f"wrote {kind:<10} {path}")
    return 0 if result.target_met is not False else 1
