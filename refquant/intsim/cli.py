"""`refquant verify` and `refquant explain`: a model plus AIMET encodings, lowered to its integer program."""

from __future__ import annotations

REQUANT_HELP = "ort (default), onnx_reference, tflite_double, tflite_single, exact(half_even|half_up|half_away)"


def _common(p) -> None:
    p.add_argument("model")
    p.add_argument("--encodings", required=True, help="AIMET encodings file (0.6.1, 1.0.0, 2.0.0)")
    p.add_argument("--config", default="default",
                   help="quantsim config the encodings were made with (placement, supergroups; default: default)")
    p.add_argument("--requant", default="ort", help=REQUANT_HELP)
    p.add_argument("--float-fallback", action="store_true", help="run ops without an integer form in float")


def add_verify_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="compare a target's per-tensor dump with the integer program, layer "
                                             "by layer, and name the requantization scheme that explains it",
                              epilog="exit code 0: every dumped tensor matches; 1: some differ; 2: an error. "
                                     "Dump format: docs/numerics.md section 9.")
    _common(p)
    p.add_argument("--target-dump", required=True,
                   help="folder of NAME.npy files (names escaped, see refquant.intsim.verify) and/or .raw files "
                        "listed in manifest.json")
    p.add_argument("--chained", action="store_true",
                   help="run the program from the dump's inputs only (default: teacher forcing, each layer on "
                        "the dump's own inputs)")
    p.add_argument("--schemes", default=None,
                   help="comma-separated schemes to try on differences (default: all)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_verify)


def add_explain_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="the integer arithmetic of one output element of one layer")
    _common(p)
    p.add_argument("--node", required=True, help="node name (or its output tensor's name)")
    p.add_argument("--index", default=None, help="flat index or comma-separated index of the output element "
                                                 "(default 0)")
    p.add_argument("--data", help="input data (as for quantize); default: a deterministic random feed")
    p.add_argument("--preprocess", help="image preprocessing spec (as for quantize)")
    p.set_defaults(func=cmd_explain)


def _sim(args):
    from ..onnx_io import load
    from ..quant import QuantSim

    # prepare=False: the encodings file names the tensors of the model as given
    sim = QuantSim(load(args.model), config=args.config, prepare=False)
    sim.load_encodings(args.encodings)
    return sim


def cmd_verify(args) -> int:
    from .verify import TRY_SCHEMES, verify

    schemes = TRY_SCHEMES if not args.schemes else tuple(s.strip() for s in args.schemes.split(",") if s.strip())
    report = verify(_sim(args), args.target_dump, requant=args.requant, schemes=schemes,
                    teacher_forcing=not args.chained, float_fallback=args.float_fallback,
                    progress=not args.no_progress)
    print(report)
    return 0 if report.exact else 1


def cmd_explain(args) -> int:
    from .explain import explain
    from .program import IntSim

    sim = _sim(args)
    isim = IntSim(sim, requant=args.requant, float_fallback=args.float_fallback)
    feeds = None
    if args.data:
        from ..data import Preprocess, iter_feeds

        preprocess = Preprocess.parse(args.preprocess) if args.preprocess else None
        batch = next(iter(iter_feeds(args.data, sim.graph, batch_size=1, preprocess=preprocess)))
        feeds = dict(batch)
    ex = explain(isim, args.node, args.index, feeds)
    if args.data:
        ex.feeds_note = f"the first sample of {args.data}"
    print(ex)
    return 0
