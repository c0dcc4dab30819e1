"""The `refquant` command.

Every subcommand prints errors a user can cause as one line (``refquant: error: ...``) and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import RefquantError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except RefquantError as exc:
        print(f"refquant: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"refquant: error: {exc.__class__.__name__}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refquant: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refquant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(title="commands")

    p = sub.add_parser("info", help="op histogram, parameters, MACs, unsupported ops, inputs and outputs")
    p.add_argument("model")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="run a model on inputs from .npy/.npz files")
    p.add_argument("model")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy",
                   help="a feed (repeat per input), or FILE.npz holding all feeds; random when omitted")
    p.add_argument("--batch", type=int, default=1, help="batch size of random feeds (default 1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-o", "--output", help="write the outputs to this .npz")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="refquant against onnxruntime, per output or per tensor")
    p.add_argument("model")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--all-tensors", action="store_true", help="compare every intermediate tensor too")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("quantize", help="calibrate a QuantSim, export model/encodings/QDQ, print SQNR and accuracy")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="calibration data: .npz, .npy, a folder of .npy or of images")
    p.add_argument("--eval-data", help="evaluation data (default: the calibration data)")
    p.add_argument("--labels", help="integer labels of the evaluation samples (.npy/.npz/.txt): prints accuracy")
    p.add_argument("--primary", help="output scored for accuracy (argmax over its last axis; default: the first)")
    p.add_argument("--config", default="default", help="built-in name (default, per_tensor) or AIMET config JSON")
    p.add_argument("--scheme", default="min_max",
                   help="min_max (tf), tf_enhanced, percentile, mse, entropy (default min_max)")
    p.add_argument("--percentile", type=float, help="the percentile scheme's value (default 99.99)")
    p.add_argument("--precision", default="w8a8", help="w8a8, w8a16, w4a8, w16a16, fp16... (default w8a8)")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weights (the per_tensor config)")
    p.add_argument("--rounding", default="half_even", choices=["half_even", "half_up"])
    p.add_argument("--preprocess", help="image preprocessing, e.g. 'size=224,224;mean=0.485,0.456,0.406;"
                                        "std=0.229,0.224,0.225' or a JSON file")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--encoding-version", default="1.0.0", choices=["1.0.0", "2.0.0"])
    from .intsim import unsigned_weights

    unsigned_weights.add_argument(p)
    p.add_argument("--prefix", default=None, help="file name prefix (default: the model's name)")
    p.add_argument("-o", "--output-dir", required=True)
    from .scale import add_arguments as add_scale_arguments

    add_scale_arguments(p, "the calibration")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("validate", help="what will go wrong when quantizing a model: one finding per problem, "
                                        "with why and the fix")
    p.add_argument("model")
    p.add_argument("--data", help="calibration data for the range checks: .npz, .npy, a folder of .npy or of images")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=8, help="calibration batches to look at (default 8)")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to this file")
    p.add_argument("--all", action="store_true", help="list every finding (default: 12 per kind)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("prepare", help="rewrite a model for quantization (folding, fusions, mask clamping...), "
                                       "each pass checked to keep the FP32 outputs")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="the prepared model (.onnx)")
    p.add_argument("--passes", default="default", help="comma-separated pass names (default: all, in order: "
                                                       "refquant.passes.DEFAULT_PASSES)")
    p.add_argument("--data", help="data the passes are verified on (default: random feeds)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="shape of an input's random verification feeds (for inputs with unknown dims)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=2, help="verification batches (default 2)")
    p.add_argument("--rtol", type=float, default=1e-5, help="largest accepted max|a-b|/max|b| per output")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to this file")
    p.add_argument("--all", action="store_true", help="list every change (default: 12 per pass)")
    p.set_defaults(func=cmd_prepare)

    from .analysis.cli import add_amp_parser, add_analyze_parser

    add_analyze_parser(sub)
    add_amp_parser(sub)
    from .train.cli import add_qat_parser

    add_qat_parser(sub)
    from .ptq.cli import add_autoquant_parser, add_ptq_parser

    add_ptq_parser(sub)
    add_autoquant_parser(sub)

    p = sub.add_parser("intsim", help="lower a calibrated QuantSim to an integer program; QDQ-vs-integer gap")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="calibration data (as for quantize)")
    p.add_argument("--eval-data", help="data for the gap report (default: the calibration data)")
    p.add_argument("--precision", default="w8a8")
    p.add_argument("--config", default="default")
    p.add_argument("--scheme", default="min_max")
    p.add_argument("--requant", default="ort", help="ort (default), onnx_reference, tflite_double, tflite_single, "
                                                    "exact(half_even|half_up|half_away)")
    p.add_argument("--float-fallback", action="store_true", help="run ops without an integer form in float")
    p.add_argument("--overflow", choices=["error", "wrap"], default="error",
                   help="an int32 accumulator that overflows: stop with the per-layer report (default), or wrap "
                        "around modulo 2^32 as onnxruntime's int32 adds do (with a warning)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preprocess", help="image preprocessing spec (as for quantize)")
    p.add_argument("--export", help="write the integer program as a QOperator ONNX model here")
    unsigned_weights.add_argument(p, "--export with int8 weights")
    p.set_defaults(func=cmd_intsim)

    from .intsim.cli import add_explain_parser, add_verify_parser

    add_verify_parser(sub)
    add_explain_parser(sub)

    p = sub.add_parser("demo", help="the quantization walkthrough on the example model that ships with refquant")
    p.add_argument("--output-dir", help="where the exported files go (default: a new temporary folder)")
    p.set_defaults(func=cmd_demo)
    return parser


# ------------------------------------------------------------------------------ commands
def cmd_info(args) -> int:
    from .model_info import describe
    from .onnx_io import load

    graph = load(args.model, allow_unsupported=True)
    info = describe(graph)
    opset = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(graph.opset.items()))
    print(f"model: {args.model}  (opset {opset}; producer {graph.model_info.get('producer_name') or '-'})")
    print(f"nodes: {sum(info.ops.values())}   parameters: {info.parameters:,} "
          f"({info.parameter_bytes / 2**20:.2f} MiB of constants)")
    note = f" ({len(info.macs_unknown)} nodes of unknown shape not counted)" if info.macs_unknown else ""
    print(f"MACs per run (symbolic dims as 1): {info.macs:,}{note}")
    print("inputs:")
    for v in graph.inputs:
        print(f"  {v.name}: {v.dtype} {_shape(v.shape)}")
    print("outputs:")
    for v in graph.outputs:
        print(f"  {v.name}: {v.dtype} {_shape(v.shape)}")
    print("ops:")
    for op, count in sorted(info.ops.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {op:<28}{count:>6}")
    if info.unsupported:
        listed = ", ".join(f"{d}::{t}" if d else t for d, t in info.unsupported)
        print(f"unsupported ops: {listed}")
        return 1
    print("unsupported ops: none")
    return 0


def cmd_run(args) -> int:
    from .feeds import parse_input_args, random_feeds
    from .onnx_io import load
    from .runtime import Session

    graph = load(args.model)
    feeds = parse_input_args(args.input) or random_feeds(graph, batch=args.batch)
    start = time.perf_counter()
    outputs = Session(graph, threads=args.threads).run(feeds)
    elapsed = time.perf_counter() - start
    for name, value in outputs.items():
        stats = ""
        if value.size and value.dtype.kind in "fiub":
            stats = f" min {value.min():.6g} max {value.max():.6g} mean {value.mean():.6g}"
        print(f"{name}: {value.dtype} {list(value.shape)}{stats}")
    print(f"time: {elapsed * 1000:.1f} ms (first run includes kernel compilation)")
    if args.output:
        from .fileio import save_npz

        save_npz(args.output, outputs)
        print(f"wrote {args.output}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_with_onnxruntime
    from .feeds import parse_input_args, random_feeds
    from .onnx_io import load

    graph = load(args.model)
    feeds = parse_input_args(args.input) or random_feeds(graph, batch=args.batch)
    rows = compare_with_onnxruntime(args.model, graph, feeds, all_tensors=args.all_tensors)
    width = max([len(r.name) for r in rows] + [6])
    print(f"{'tensor':<{width}}  {'shape':<20} {'max abs err':>12} {'max rel err':>12}")
    worst = 0.0
    for r in rows:
        print(f"{r.name:<{width}}  {str(list(r.shape)):<20} {r.max_abs:>12.3e} {r.max_rel:>12.3e}")
        worst = max(worst, r.max_rel)
    print(f"worst relative error (max|a-b| / max|b|): {worst:.3e}")
    return 0


def cmd_quantize(args) -> int:
    from .data import Preprocess, iter_feeds, load_labels
    from .onnx_io import load
    from .quant import QuantSim
    from .quant.evaluate import evaluate

    graph = load(args.model)
    config = "per_tensor" if args.per_tensor and args.config == "default" else args.config
    options = {"percentile": args.percentile} if args.percentile is not None else {}
    preprocess = Preprocess.parse(args.preprocess) if args.preprocess else None
    labels = load_labels(args.labels) if args.labels else None  # before any work: a bad path fails fast
    # the preparation's verification and the validator's outlier rule see the calibration data (its first
    # 8 batches of 8, preprocessed), as QuantSim(..., prepare_data=...) would
    from itertools import islice

    prepare_data = list(islice(iter_feeds(args.data, graph, batch_size=8, preprocess=preprocess), 8))
    sim = QuantSim(graph, precision=args.precision, quant_scheme=args.scheme, config=config,
                   rounding=args.rounding, scheme_options=options, prepare_data=prepare_data or None)
    if sim.widened:
        print(f"{len(sim.widened)} activation(s) at 16 bits (QuantSim's residual-stream and outlier rules):")
        for name, why in sim.widened.items():
            print(f"  {name}: {why.split(':')[0]}")
    start = time.perf_counter()
    from .scale import executor_from_args

    with executor_from_args(args) as executor:
        sim.compute_encodings(args.data, batch_size=args.batch_size, preprocess=preprocess, executor=executor)
    print(f"calibrated {sum(q.enabled for q in sim.quantizers.values())} quantizers on {args.data} "
          f"({args.scheme}, {args.precision}) in {time.perf_counter() - start:.1f} s")
    prefix = args.prefix or Path(args.model).stem
    paths = sim.export(args.output_dir, prefix, encoding_version=args.encoding_version,
                       unsigned_weights=args.unsigned_weights)
    from .intsim import unsigned_weights

    unsigned_weights.note(args.unsigned_weights, sim)
    eval_source = args.eval_data or args.data
    scores = evaluate(sim, iter_feeds(eval_source, graph, batch_size=args.batch_size, preprocess=preprocess),
                      labels, primary=args.primary)
    print(f"{'output':<32}{'SQNR vs FP32 (dB)':>20}")
    for name, value in scores.sqnr.items():
        print(f"{name:<32}{value:>20.2f}")
    if scores.accuracy is not None:
        print(f"top-1 accuracy ({args.primary or graph.output_names[0]}): {scores.accuracy:.2%} (FP32 {scores.fp32_accuracy:.2%})")
    for kind, path in paths.items():
        print(f"wrote {kind:<10} {path}")
    return 0


def cmd_validate(args) -> int:
    from .validate import validate

    report = validate(args.model, data=args.data, batch_size=args.batch_size, max_batches=args.max_batches)
    print(report.format(max_rows=None if args.all else 12))
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 1 if report.errors else 0


def cmd_prepare(args) -> int:
    from .onnx_io import load, save
    from .prepare import prepare

    if Path(args.output).resolve() == Path(args.model).resolve():
        raise RefquantError(f"-o {args.output}: refusing to overwrite the input model; choose another file")
    shapes = {}
    for item in args.shape:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise RefquantError(f"--shape {item!r}: expected NAME=D0,D1,... with integer dimensions") from None
    graph = load(args.model)
    prepared, report = prepare(graph, passes=args.passes, data=args.data, rtol=args.rtol, shapes=shapes or None,
                               batch_size=args.batch_size, max_batches=args.max_batches)
    print(report.format(max_rows=None if args.all else 12))
    save(prepared, args.output)
    print(f"wrote {args.output}")
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_intsim(args) -> int:
    from .data import Preprocess, iter_feeds
    from .intsim import IntSim, qdq_gap
    from .onnx_io import load
    from .quant import QuantSim

    graph = load(args.model)
    preprocess = Preprocess.parse(args.preprocess) if args.preprocess else None
    sim = QuantSim(graph, precision=args.precision, quant_scheme=args.scheme, config=args.config)
    sim.compute_encodings(args.data, batch_size=args.batch_size, preprocess=preprocess)
    isim = IntSim(sim, requant=args.requant, float_fallback=args.float_fallback, overflow=args.overflow)
    print(isim.summary())
    feeds = next(iter(iter_feeds(args.eval_data or args.data, graph, batch_size=args.batch_size,
                                 preprocess=preprocess)))
    overflow = isim.overflow_report(feeds)
    if any(layer.can_overflow for layer in overflow.layers):  # the exact int32 accumulator range of those layers
        print(overflow)
    if overflow.overflowing and args.overflow == "error":
        print(f"refquant intsim: the int32 accumulator of {len(overflow.overflowing)} layer(s) overflows on this "
              "data (see above); no bit-exact integer result exists (--overflow wrap: wrap around as "
              "onnxruntime does)", file=sys.stderr)
        return 1
    print(qdq_gap(sim, isim, feeds))
    if args.export:
        isim.export(args.export, overwrite=True, unsigned_weights=args.unsigned_weights)
        print(f"wrote {args.export}")
        from .intsim import unsigned_weights

        unsigned_weights.note(args.unsigned_weights)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.output_dir)


def _shape(shape) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
