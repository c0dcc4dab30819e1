"""The ``refquant ptq`` and ``refquant autoquant`` subcommands (wired into refquant.cli by
``add_ptq_parser(subparsers)`` / ``add_autoquant_parser(subparsers)``). The PTQ machinery is imported
when a command runs, not when the parser is built.

Both score the model with a built-in metric (:class:`refquant.ptq.autoquant.BuiltinMetric`) on the
evaluation data against the original model's FP32 outputs: ``--eval sqnr`` (default; dB over all outputs)
or ``--eval top1`` (agreement with FP32 in %, or accuracy in % with ``--labels``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ..errors import RefquantError
from ..intsim import unsigned_weights

PTQ_TECHNIQUES = ("prepare", "bn_fold", "cle", "bias_correction", "adaround", "seq_mse")
GRAPH_TECHNIQUES = ("prepare", "bn_fold", "cle")
ACTIVATION_CHOICES = {"default": True, "all": "all", "none": False}  # --adaround-activation -> include_activation


def _common_arguments(p) -> None:
    from ..analysis.cli import _sim_arguments

    p.add_argument("model")
    p.add_argument("--data", required=True, help="calibration data (also the techniques' data): .npz, .npy, "
                                                 "a folder of .npy or of images")
    p.add_argument("--eval-data", help="data the metric is computed on (default: the calibration data)")
    p.add_argument("--eval", default="sqnr", choices=["sqnr", "top1"],
                   help="sqnr: SQNR of the outputs against FP32 in dB (default); top1: top-1 agreement with FP32 "
                        "in %%, or top-1 accuracy with --labels")
    p.add_argument("--labels", help="integer labels of the evaluation samples (.npy/.npz/.txt), for --eval top1")
    p.add_argument("--primary", help="output scored by top1 (argmax over its last axis; default: the first)")
    _sim_arguments(p)
    p.add_argument("--adaround-iterations", type=int, default=1000, help="AdaRound iterations per layer (default 1000)")
    p.add_argument("--adaround-optimizer", default="adam", choices=["adam", "lbfgs"])
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--adaround-quantized-inputs", action="store_true",
                        help="AdaRound's layer inputs with the activation quantizers on for every layer (as "
                             "aimet-onnx runs it; by default only the output layers with enough data take them: see "
                             "refquant.ptq.adaround). autoquant without it tries both")
    inputs.add_argument("--adaround-choose-inputs", action="store_true",
                        help="AdaRound's layer inputs with or without the activation quantizers, whichever scores "
                             "better on a held-out quarter of --data after fitting on the rest (about 2.5x the time; "
                             "see refquant.ptq.input_choice)")
    inputs.add_argument("--adaround-per-layer-inputs", action="store_true",
                        help="AdaRound's layer inputs chosen layer by layer: each layer fitted with the activation "
                             "quantizers off and on on three quarters of --data; the quantized inputs where their "
                             "rounding lowers the model's output error on the held-out quarter by more than two "
                             "standard errors; that kind fitted again on all of it (3-4x the time; see "
                             "refquant.ptq.input_choice)")
    inputs.add_argument("--adaround-qdrop", type=float, default=None, metavar="Q",
                        help="QDrop (Wei et al. 2022): AdaRound's layer inputs with the activation quantizers on, each "
                             "element replaced by the FP32 model's with probability Q (the paper: 0.5). autoquant "
                             "without one of these three tries the plain, quantized and QDrop (0.5) inputs")
    p.add_argument("--adaround-shrinkage", type=_shrinkage, default="auto", metavar="auto|ALPHA",
                   help="shrink AdaRound's loss toward uncorrelated layer inputs by Schaefer & Strimmer's intensity "
                        "estimated from the data per output channel (auto, the default), or by ALPHA in [0, 1] (0: "
                        "AdaRound's loss as written; see refquant.ptq.adaround)")
    p.add_argument("--adaround-learning-rate", type=_learning_rate, default=None, metavar="scaled|LR",
                   help="Adam's step size in AdaRound: a positive number, or scaled = 1e-3 x max(1, 10000 / "
                        "max(200, iterations)), the path length of 10,000 steps of 1e-3 (AIMET's) from 200 "
                        "iterations on (default: scaled; see refquant.ptq.adaround)")
    p.add_argument("--adaround-activation", default="default", choices=["default", "all", "none"],
                   help="activation after a layer in AdaRound's loss: default = Relu, Clip, PRelu, Softmax, Sigmoid, "
                        "Tanh, SiLU; all = also any other elementwise subgraph (HardSwish, GELU...); none")
    p.add_argument("--adaround-nodes", type=_node_names, default=None, metavar="NAME,NAME...",
                   help="AdaRound only these layer nodes (AIMET's nodes_to_include; default: every Conv, "
                        "ConvTranspose, Gemm and MatMul with a constant weight); the others keep nearest rounding")
    p.add_argument("--seq-mse-candidates", type=int, default=20, help="SeqMSE candidate ranges (default 20)")
    p.add_argument("--replace-relu6", action="store_true", help="CLE: replace Clip(0, 6) by Relu (AIMET; changes FP32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--prefix", default=None, help="file name prefix of the export (default: the model's name)")
    unsigned_weights.add_argument(p)
    p.add_argument("-o", "--output-dir", required=True)


# ------------------------------------------------------------------------------ ptq
def add_ptq_parser(subparsers) -> None:
    """``refquant ptq MODEL --data D --technique bn_fold,cle,bias_correction,adaround,seq_mse -o DIR``."""
    p = subparsers.add_parser("ptq", help="apply PTQ techniques in the order given (preparation, BN folding, CLE, "
                                          "bias correction, AdaRound, SeqMSE); per-step metric and time; export")
    _common_arguments(p)
    p.add_argument("--technique", "-t", required=True,
                   help=f"comma-separated, applied in the order given; from {', '.join(PTQ_TECHNIQUES)} (graph "
                        "techniques prepare, bn_fold and cle first; seq_mse before adaround, which freezes the "
                        "weight encodings)")
    p.add_argument("--analytical", action="store_true", help="bias correction from BN statistics (default: empirical)")
    p.set_defaults(func=cli_ptq)


def parse_techniques(text: str) -> list[str]:
    techniques = [t.strip() for t in text.split(",") if t.strip()]
    if not techniques:
        raise RefquantError("--technique: give at least one of " + ", ".join(PTQ_TECHNIQUES))
    unknown = [t for t in techniques if t not in PTQ_TECHNIQUES]
    if unknown:
        raise RefquantError(f"--technique: unknown {', '.join(unknown)}; choose from {', '.join(PTQ_TECHNIQUES)}")
    sim_seen = None
    for t in techniques:
        if t in GRAPH_TECHNIQUES and sim_seen:
            raise RefquantError(f"--technique: {t} rewrites the graph, so it must come before the QuantSim "
                                f"techniques (it follows {sim_seen})")
        if t not in GRAPH_TECHNIQUES:
            sim_seen = sim_seen or t
    return techniques


def run_ptq(graph, data, techniques, metric, spec, *, batch_size=16, preprocess=None, options=None,
            replace_relu6=False, progress=True):
    """Apply ``techniques`` in order and score after each: a list of
    :class:`~refquant.ptq.autoquant.StepRecord` (the first is the plain calibrated QuantSim) and the final
    (graph, quantizers). ``metric``: ``model -> float``; ``options``: technique -> keyword arguments."""
    import warnings

    from ..progress import bar as progress_bar
    from .autoquant import StepRecord, Trial, prepare_graph
    from .bn_fold import fold_batchnorms_info
    from .cle import equalize_pass

    options = options or {}
    original = graph
    common = dict(data=data, eval_fn=metric, batch_size=batch_size, preprocess=preprocess)
    bar = progress_bar(len(techniques) + 1, progress, "ptq", unit="step")
    bar.set_description("ptq: calibrating")
    result = Trial("calibrated", graph, spec, **common)()
    quantizers = result.quantizers
    records = [StepRecord("calibrated", "baseline", result.score, result.score, result.seconds,
                          f"precision {spec.precision}, {spec.scheme}")]
    bar.update(1)
    for technique in techniques:
        bar.set_description(f"ptq: {technique}")
        start = time.perf_counter()
        if technique in GRAPH_TECHNIQUES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if technique == "prepare":
                    changed, note = prepare_graph(graph, data, batch_size, preprocess)
                    note = "" if changed is None else note
                elif technique == "bn_fold":
                    changed, folds = fold_batchnorms_info(graph, warn=False)
                    note = f"folded {len(folds)} BatchNormalization(s)" if folds else ""
                else:
                    # the statistics of BNs that prepare / bn_fold folded earlier still feed high-bias absorption
                    changed, report = equalize_pass(graph, replace_relu6=replace_relu6,
                                                    batchnorms=fold_batchnorms_info(original, warn=False)[1])
                    note = (f"equalized {len(report.sets)} set(s), folded {len(report.folded_batchnorms)} BN(s), "
                            f"absorbed {len(report.absorbed)} high bias(es)") if report.sets else ""
            if not note:
                what = {"prepare": "no preparation pass changes the model", "bn_fold": "no BatchNormalization to fold",
                        "cle": "no pair of layers to equalize"}[technique]
                records.append(StepRecord(technique, "not applicable", records[-1].score, records[-1].score,
                                          time.perf_counter() - start, f"not applicable: {what}; model unchanged"))
                bar.update(1)
                continue
            graph = changed
            result = Trial(technique, graph, spec, **common)()
        elif technique == "seq_mse" and "adaround" in techniques[:techniques.index(technique)]:
            records.append(StepRecord(technique, "not applicable", records[-1].score, records[-1].score,
                                      time.perf_counter() - start, "not applicable: AdaRound froze the weight "
                                      "encodings of every layer SeqMSE searches (give seq_mse before adaround to "
                                      "combine them); model unchanged"))
            bar.update(1)
            continue
        else:
            result = Trial(technique, graph, spec, technique=technique, options=options.get(technique, {}),
                           quantizers=quantizers, progress=progress, **common)()
            graph = graph if result.graph is None else result.graph
            note = ", ".join(f"{k}={v}" for k, v in options.get(technique, {}).items())
            note += f"; {result.note}" if result.note else ""
            if technique == "bias_correction":
                note = "analytical" if options.get(technique, {}).get("analytical") else "empirical"

        quantizers = result.quantizers
        records.append(StepRecord(technique, "applied", result.score, result.score, time.perf_counter() - start, note))
        bar.update(1)
    bar.close()
    return records, graph, quantizers


def format_steps(records, metric_name: str) -> str:
    from .autoquant import _fmt

    lines = [f"{'step':<16} {metric_name:>12} {'change':>8} {'seconds':>8}  note"]
    previous = None
    for r in records:
        change = "-" if previous is None or r.score is None else f"{r.score - previous:+.3f}"
        lines.append(f"{r.step:<16} {_fmt(r.score):>12} {change:>8} {r.seconds:>8.2f}  {r.note}")
        previous = r.score
    return "\n".join(lines)


def _word_or_number(word: str, valid, what: str):
    """An argparse type: ``word`` as it is, or a number for which ``valid(number)`` holds (else ``what`` is named)."""

    def parse(text: str) -> float | str:
        if text == word:
            return text
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not valid(value):  # nan fails every comparison
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_shrinkage = _word_or_number("auto", lambda v: 0 <= v <= 1, "'auto' or a number in [0, 1]")
_learning_rate = _word_or_number("scaled", lambda v: 0 < v < math.inf, "'scaled' or a positive number")


def _node_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one node name")
    return names


def nodes_option(args) -> dict:
    """``{"nodes_to_include": [...]}`` when ``--adaround-nodes`` is given, else nothing (every layer)."""
    return {} if args.adaround_nodes is None else {"nodes_to_include": args.adaround_nodes}


def learning_rate_option(args) -> dict:
    """``{"learning_rate": ...}`` when ``--adaround-learning-rate`` is given, else nothing (adaround's default)."""
    return {} if args.adaround_learning_rate is None else {"learning_rate": args.adaround_learning_rate}


def adaround_input_options(args) -> dict:
    """AdaRound's input options from ``--adaround-quantized-inputs``, ``--adaround-choose-inputs``,
    ``--adaround-per-layer-inputs`` and ``--adaround-qdrop`` (QDrop mixes the quantized inputs with the FP32 ones);
    nothing without them (adaround's default; autoquant then tries each kind of input)."""
    if args.adaround_qdrop is not None:
        return {"quantize_activations": True, "qdrop": args.adaround_qdrop}
    if args.adaround_choose_inputs:
        return {"quantize_activations": "choose"}
    if args.adaround_per_layer_inputs:
        return {"quantize_activations": "per_layer"}
    if args.adaround_quantized_inputs:
        return {"quantize_activations": True}
    return {}


def cli_ptq(args) -> int:
    from ..analysis.report import readable
    from ..fileio import atomic_path
    from .autoquant import _num

    techniques = parse_techniques(args.technique)
    graph, metric, spec, preprocess = _setup(args)
    options = {"adaround": {"num_iterations": args.adaround_iterations, "optimizer": args.adaround_optimizer,
                            "include_activation": ACTIVATION_CHOICES[args.adaround_activation],
                            "shrinkage": args.adaround_shrinkage, **adaround_input_options(args),
                            **learning_rate_option(args), **nodes_option(args)},
               "seq_mse": {"num_candidates": args.seq_mse_candidates},
               "bias_correction": {"analytical": args.analytical} if args.analytical else {}}
    records, graph, quantizers = run_ptq(graph, args.data, techniques, metric, spec, batch_size=args.batch_size,
                                         preprocess=preprocess, options=options, replace_relu6=args.replace_relu6,
                                         progress=not args.no_progress)
    sim = _sim_of(spec, graph, quantizers)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = sim.export(out, args.prefix or Path(args.model).stem, unsigned_weights=args.unsigned_weights)
    unsigned_weights.note(args.unsigned_weights, sim)
    report = {"metric": metric.description, "techniques": techniques, "precision": spec.precision,
              "scheme": spec.scheme,
              "steps": [{"step": r.step, "status": r.status, "metric": _num(r.score), "seconds": round(r.seconds, 4),
                         "note": r.note} for r in records]}
    paths["report"] = str(out / "ptq.json")
    with atomic_path(paths["report"]) as tmp:
        tmp.write_text(json.dumps(report, indent=1, allow_nan=False))
        readable(tmp)
    print(format_steps(records, f"{args.eval} ({metric.unit})"))
    for kind, path in paths.items():
        print(f"wrote {kind:<10} {path}")
    return 0


# ------------------------------------------------------------------------------ autoquant
def add_autoquant_parser(subparsers) -> None:
    """``refquant autoquant MODEL --data D --eval top1 --allowed-drop 1 -o DIR``."""
    p = subparsers.add_parser("autoquant", help="AutoQuant: BN folding, QuantScheme selection, CLE, AdaRound, each "
                                                "kept only if it improves the metric, until the goal is met")
    _common_arguments(p)
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--allowed-drop", type=float, help="goal = FP32 metric - this (for --eval top1: points of %%)")
    goal.add_argument("--target", type=float, help="goal as an absolute metric (for --eval sqnr: dB)")
    p.add_argument("--steps", default="prepare,bn_fold,quant_scheme,cle,adaround",
                   help="steps to try (always in the order prepare, bn_fold, quant_scheme, cle, bias_correction, "
                        "seq_mse, adaround; default: prepare,bn_fold,quant_scheme,cle,adaround)")
    p.add_argument("--schemes", help="QuantScheme candidates as WEIGHTS/ACTIVATIONS pairs, e.g. "
                                     "'min_max/min_max,tf_enhanced/tf_enhanced,min_max/percentile' (default: "
                                     "min_max and tf_enhanced weights with min_max, tf_enhanced, percentile, mse, "
                                     "entropy activations)")
    from ..scale import add_arguments as add_scale_arguments

    add_scale_arguments(p, "independent trials")  # --scheduler ADDRESS / --workers N
    p.set_defaults(func=cli_autoquant)


def parse_schemes(text: str | None):
    from .autoquant import DEFAULT_SCHEMES

    if not text:
        return DEFAULT_SCHEMES
    pairs = []
    for item in text.split(","):
        weights, sep, activations = item.strip().partition("/")
        if not sep or not weights or not activations:
            raise RefquantError(f"--schemes: {item!r} is not WEIGHTS/ACTIVATIONS (e.g. min_max/tf_enhanced)")
        pairs.append((weights, activations))
    return tuple(pairs)


def cli_autoquant(args) -> int:
    from ..scale import executor_from_args
    from .autoquant import autoquant

    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    graph, metric, spec, preprocess = _setup(args)
    with executor_from_args(args) as executor:
        result = autoquant(graph, args.data, metric, args.allowed_drop, target=args.target, precision=spec.precision,
                           config=spec.config, rounding=spec.rounding, quant_scheme=spec.quant_scheme, steps=steps,
                           schemes=parse_schemes(args.schemes), adaround_iterations=args.adaround_iterations,
                           adaround_options={"optimizer": args.adaround_optimizer,
                                             "include_activation": ACTIVATION_CHOICES[args.adaround_activation],
                                             "shrinkage": args.adaround_shrinkage, **learning_rate_option(args),
                                             **nodes_option(args),
                                             **adaround_input_options(args)},
                           seq_mse_candidates=args.seq_mse_candidates, replace_relu6=args.replace_relu6,
                           batch_size=args.batch_size, preprocess=preprocess, executor=executor,
                           output_dir=args.output_dir, prefix=args.prefix or Path(args.model).stem,
                           unsigned_weights=args.unsigned_weights, progress=not args.no_progress)
    unsigned_weights.note(args.unsigned_weights, result.sim)
    print(result.format())
    for kind, path in result.paths.items():
        print(f"wrote {kind:<10} {path}")
    return 0 if result.target_met else 1


# ------------------------------------------------------------------------------ shared
def _setup(args):
    """(graph, built-in metric, SimSpec, preprocess) from the common arguments."""
    from ..data import Preprocess, load_labels
    from ..onnx_io import load
    from .autoquant import BuiltinMetric, SimSpec, _param_scheme

    graph = load(args.model)
    preprocess = Preprocess.parse(args.preprocess) if args.preprocess else None
    labels = load_labels(args.labels) if args.labels else None
    if labels is not None and args.eval != "top1":
        raise RefquantError("--labels is for --eval top1")
    config = "per_tensor" if args.per_tensor and args.config == "default" else args.config
    spec = SimSpec(args.precision, config, args.rounding, args.scheme, _param_scheme(args.scheme))
    spec.build(graph)  # bad settings fail before the FP32 reference is computed
    metric = BuiltinMetric(args.eval, graph, args.eval_data or args.data, labels, args.primary, args.batch_size,
                           preprocess)
    return graph, metric, spec, preprocess


def _sim_of(spec, graph, quantizers):
    from .autoquant import restore_quantizers

    sim = spec.build(graph)
    restore_quantizers(sim, quantizers)
    return sim
