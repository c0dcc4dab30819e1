"""The `refquant` command.

Every subcommand prints errors a user can cause as one line (``refquant: error: ...``) and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

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

    p = sub.add_parser("demo", help="run the example model that ships with refquant and check it")
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


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo()


def _shape(shape) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
