"""Prepare a model for quantization: run graph passes, each checked to keep the FP32 outputs.

``prepare(graph, passes="default", data=None) -> (Graph, Report)`` runs the passes of
:mod:`refquant.passes` in order on a copy of ``graph``. After each pass it runs the rewritten graph on
the verification feeds and compares every output with the original model's: integer outputs must be
identical, float outputs within ``rtol`` (1e-5) relative, ``max|a - b| / max|b|``, and graph output
names unchanged. A pass that breaks this, or fails, is undone and reported as a "pass-skipped"
finding: nothing is applied silently.

**The float noise floor.** An exact rewrite still rounds differently (BN folding multiplies weights
by ``gamma / sqrt(var + eps)`` once instead of scaling every output), and a deep model amplifies one
rounding of every weight: moving each float weight of PP-OCRv4 rec by a single ulp changes its Softmax
output by 1.7e-5 relative on text-like images, above 1e-5. So ``prepare`` first measures that floor
(the outputs' change when every float parameter, i.e. every constant with a role in ``PARAM_ROLES``,
moves one ulp in a random direction) and accepts a pass whose change is within
``min(max(rtol, 4 x floor), 1e-3)`` per output. The floor and the tolerance used are in the report;
``noise_floor=False`` makes ``rtol`` the only bound.

Verification feeds: the first ``max_batches`` batches of ``data`` (anything
``refquant.data.iter_feeds`` reads) when given, else random feeds
(:func:`refquant.feeds.random_feeds`, symbolic dimensions set to ``dim``, or ``shapes`` per input).
For random feeds, integer inputs whose name contains "mask" get realistic attention masks (ones, then
zero padding, never all zero): random integers 0..3 are not a mask, and a mask pass must be checked
on masks.
"""

from __future__ import annotations

import time
from itertools import islice

import numpy as np

from .compare import difference
from .errors import RefquantError
from .ir import Graph, Value
from .validate import Finding, PassRecord, Report, make_finding

NOISE_FACTOR = 4.0  # a pass may move an output by this many times the one-ulp noise floor
MAX_TOLERANCE = 1e-3  # ... but never more than this: beyond it a model's outputs are not "equal" any more


def prepare(graph: Graph, passes="default", data=None, *, rtol: float = 1e-5, noise_floor: bool = True,
            batch_size: int = 4, max_batches: int = 2, dim: int = 8, shapes: dict[str, tuple] | None = None,
            options: dict[str, dict] | None = None, seed: int = 0) -> tuple[Graph, Report]:
    """A prepared copy of ``graph`` and a report of what each pass changed (``graph`` is not modified).

    ``passes``: "default", a comma-separated string or a list of names from :mod:`refquant.passes`.
    ``options``: per-pass keyword arguments, e.g. ``{"clamp_mask_constants": {"limit": 1e3}}``.
    ``shapes``: full shapes of random verification feeds by input name (for inputs with unknown dims).
    """
    from . import passes as registry

    names = registry.resolve(passes)
    options = options or {}
    feeds = verification_feeds(graph, data, batch_size=batch_size, max_batches=max_batches, dim=dim,
                               shapes=shapes, seed=seed)
    reference = _reference(graph, feeds, data is not None)
    floor = _noise_floor(graph, feeds, reference, seed) if noise_floor else {}
    tolerance = {key: min(max(rtol, NOISE_FACTOR * floor.get(key, 0.0)), MAX_TOLERANCE) for key in reference[0]}
    report = Report(model=graph.model_info.get("source") or graph.name, kind="prepare")
    current = graph
    for name in names:
        start = time.perf_counter()
        # a pass may offer option sets to try, boldest first (clamp_mask_constants: -100, then -1e4);
        # options given by the caller are the only ones tried
        attempts = [options[name]] if name in options else registry.candidates(name)
        record, problems = None, []
        for opts in attempts:
            candidate = current.copy()
            try:
                result = registry.get(name)(candidate, **opts)
                if result.changes:
                    registry.refresh(candidate)
            except Exception as exc:  # a pass that crashes on this model is skipped, and says why
                problems.append(f"the pass failed: {exc.__class__.__name__}: {exc}")
                record = PassRecord(name, "skipped", [], [], None, 0.0)
                continue
            if not result.changes:
                record = PassRecord(name, "unchanged", [], result.notes, None, 0.0)
                break
            problem, error = _check(candidate, graph, feeds, reference, tolerance)
            label = f"with {opts}: " if len(attempts) > 1 else ""
            if problem:
                problems.append(f"{label}{problem}")
                record = PassRecord(name, "skipped", result.changes, result.notes, error, 0.0)
                continue
            notes = [f"not applied {p}" for p in problems] + result.notes
            record = PassRecord(name, "applied", result.changes, notes, error, 0.0)
            current = candidate
            break
        record.seconds = time.perf_counter() - start
        report.passes.append(record)
        if record.status == "skipped":
            report.findings.append(_skipped(name, "; ".join(problems)))
    report.stats = {"nodes": f"{len(graph.nodes)} -> {len(current.nodes)}",
                    "initializers": f"{len(graph.initializers)} -> {len(current.initializers)}",
                    "verification": f"{len(feeds)} batch(es) of {'given data' if data is not None else 'random feeds'}",
                    "rtol": rtol,
                    "noise_floor": {k: float(f"{v:.3g}") for k, v in floor.items()} if noise_floor else "off",
                    "tolerance": {k: float(f"{v:.3g}") for k, v in tolerance.items()}}
    return (current if current is not graph else graph.copy()), report


def _reference(graph: Graph, feeds, given: bool) -> list[dict[str, np.ndarray]]:
    from .runtime import Session

    try:
        session = Session(graph)
        return [session.run(f) for f in feeds]
    except RefquantError as exc:
        shown = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds[0].items())
        source = ("the given data" if given else
                  f"random feeds {shown} (give data, or the input shapes: shapes= / --shape NAME=D0,D1,...)")
        raise RefquantError(f"prepare: the model does not run on {source}, so no pass can be verified: {exc}") from None


def _noise_floor(graph: Graph, feeds, reference, seed: int) -> dict[str, float]:
    """Per float output: the largest relative change when every float initializer moves one ulp."""
    from .runtime import Session

    from .passes.common import param_uses

    rng = np.random.default_rng(seed + 7)
    constants = {}
    for name, uses in param_uses(graph).items():
        array = graph.initializers[name]
        # parameters only: other constants may rely on exact arithmetic (1 - mask must be exactly 0)
        if array.dtype.kind == "f" and array.size and any(role for _, _, role in uses):
            away = np.where(rng.random(array.shape) < 0.5, -np.inf, np.inf).astype(array.dtype)
            constants[name] = np.nextafter(array, away)
    session = Session(graph)
    session.set_constants(constants)
    floor: dict[str, float] = {}
    for f, want in zip(feeds, reference):
        got = session.run(f)
        for key, expected in want.items():
            if expected.dtype.kind == "f" and got[key].shape == expected.shape:
                err = difference(key, got[key], expected).max_rel
                floor[key] = max(floor.get(key, 0.0), err if np.isfinite(err) else 0.0)
    return floor


def _check(candidate: Graph, original: Graph, feeds, reference, tolerance) -> tuple[str | None, float | None]:
    """(why the candidate is not acceptable or None, worst relative error over all float outputs)."""
    from .runtime import Session

    if candidate.output_names != original.output_names:
        return f"it changed the graph outputs {original.output_names} to {candidate.output_names}", None
    try:
        session = Session(candidate)
        outputs = [session.run(f) for f in feeds]
    except Exception as exc:
        return f"the rewritten graph does not run: {exc.__class__.__name__}: {exc}", None
    worst = 0.0
    for got, want in zip(outputs, reference):
        for key, expected in want.items():
            actual = got[key]
            if expected.dtype.kind != "f" or actual.dtype != expected.dtype:
                same = actual.dtype == expected.dtype and actual.shape == expected.shape
                if not (same and np.array_equal(actual, expected)):
                    return f"output {key!r} changed (dtype, shape or integer values)", None
                continue
            err = difference(key, actual, expected).max_rel
            worst = max(worst, err)
            if not err <= tolerance[key]:  # also catches NaN
                return (f"output {key!r} moved by {err:.3g} relative (max|a-b|/max|b|), above the "
                        f"{tolerance[key]:.3g} allowed"), worst
    return None, worst


def _skipped(name: str, why: str) -> Finding:
    return make_finding("pass-skipped", f"pass {name!r} was not applied: {why}", pass_name=name)


def verification_feeds(graph: Graph, data=None, *, batch_size: int = 4, max_batches: int = 2, dim: int = 8,
                       shapes: dict[str, tuple] | None = None, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The feeds passes are checked on: batches of ``data``, or random feeds (module docstring)."""
    if data is not None:
        from .data import iter_feeds

        feeds = list(islice(iter_feeds(data, graph, batch_size=batch_size), max_batches))
        if not feeds:
            raise RefquantError("prepare: the verification data holds no batch")
        return feeds
    from .feeds import random_feeds

    # symbolic dims become ``dim``, except batch axes (named at axis 0), which become ``batch_size``
    batch_names = {v.shape[0] for v in graph.inputs if v.shape and isinstance(v.shape[0], str)}
    symbolic = {d for v in graph.inputs for d in (v.shape or ())[1:] if isinstance(d, str)} - batch_names
    fixed = graph
    if shapes:  # a stand-in graph whose inputs have the given shapes, for random_feeds
        unknown = [name for name in shapes if name not in graph.input_names]
        if unknown:
            raise RefquantError(f"shapes: {unknown} are not inputs of the model; the inputs are {graph.input_names}")
        fixed = Graph(inputs=[Value(v.name, v.dtype, tuple(shapes[v.name])) if v.name in shapes else v
                              for v in graph.inputs])
    feeds = []
    for k in range(max_batches):
        batch = random_feeds(fixed, batch=batch_size, seed=seed + k, dims={d: dim for d in symbolic})
        rng = np.random.default_rng(seed + 1000 + k)
        for value in graph.inputs:
            array = batch[value.name]
            if "mask" in value.name.lower() and array.dtype.kind in "iub" and array.ndim >= 1:
                batch[value.name] = _random_mask(array.shape, array.dtype, rng)
        feeds.append(batch)
    return feeds


def _random_mask(shape, dtype, rng) -> np.ndarray:
    """Ones followed by zero padding along the last axis, at least one 1 per row."""
    length = shape[-1]
    keep = rng.integers(1, length + 1, size=shape[:-1]) if length else np.zeros(shape[:-1], int)
    mask = np.arange(length) < keep[..., None]
    return mask.astype(dtype)


def prepare_for_quantsim(graph: Graph, passes="default", data=None) -> tuple[Graph, Report]:
    """What ``QuantSim(graph, prepare=...)`` simulates: ``prepare(graph, passes, data)``, verified on one
    batch (of ``data`` when given, else of random feeds), or ``graph`` itself when no pass changed it.

    Random feeds set symbolic dimensions to 8, then (if the model does not run on those, as a network
    that downsamples 32 times does not) to 64. A model that the verification cannot run at all is not
    prepared: ``graph`` is used as given and a warning says why (give ``prepare_data``, or
    ``prepare=False`` to silence it). The report says which passes were applied."""
    import warnings

    from .passes import resolve

    resolve(passes)  # an unknown pass name is the caller's error, not a model that cannot be verified
    for dim in (8, 64) if data is None else (8,):
        try:
            prepared, report = prepare(graph, passes, data, batch_size=2, max_batches=1, dim=dim)
            break
        except RefquantError as exc:
            error = exc
    else:
        warnings.warn(f"QuantSim: the model was not prepared ({error}); it is simulated as given", stacklevel=3)
        report = Report(model=graph.model_info.get("source") or graph.name, kind="prepare")
        report.findings.append(make_finding("pass-skipped", f"no pass was applied: {error}"))
        return graph, report
    if not any(p.status == "applied" for p in report.passes):
        return graph, report
    return prepared, report


def residual_activations(graph: Graph) -> dict[str, str]:
    """The residual-stream rule's tensors (``QuantSim(..., residual_rule=True)``, the default): every tensor
    from a residual branch's last linear layer to the normalization that reads the residual sum
    (:func:`refquant.validate.residual_streams`), tensor name -> why. Structural: no data is needed, and
    a graph without a normalization over a residual sum (a conv net, an MLP) has none.

    Why these and 16 bits (the validator's "residual-stream" finding): transformers' residual streams carry
    a few channels 100-1000x the median one, which the normalization divides out per token. A per-tensor
    grid of 2^b codes sized for a channel r times the median leaves the median channel ~2^b / r codes: at 8
    bits and r = 200 (paraphrase-MiniLM's first FFN output, channel 99 at [CLS]/[SEP]) that is one code, at
    16 bits 327. Which layer carries them differs between models (and is invisible without data), so every
    residual stream into a normalization is widened: a few tensors per block, the ones Bondarenko et al.
    (2021) keep at 16 bits for BERT."""
    from .validate import residual_streams

    flagged: dict[str, str] = {}
    for stream in residual_streams(graph):
        for name in stream.tensors:
            flagged.setdefault(name, f"residual-stream: on the residual stream into {stream.norm} "
                                     f"(the sum {stream.input!r})")
    return flagged


# findings on calibration data whose tensor a min-max 8-bit grid serves badly: the outlier rule widens them
WIDEN_CODES = ("huge-activation", "outlier-channel", "outlier-dominated")


def outlier_activations(graph: Graph, data) -> dict[str, str]:
    """Activations the validator flags on ``data`` (``WIDEN_CODES``): tensor name -> the findings' messages.

    This is the outlier rule's input (``QuantSim(..., prepare_data=D, outlier_bw=16)``): the tensors
    whose calibration range is set by outliers -- a channel spanning > 32x the median channel's range
    (``validate.OUTLIER_CHANNEL_RATIO``), more than half of the nonzero values within two 8-bit steps of
    zero (``validate.CRUSHED_FRACTION``), or values beyond the float16 range. Those thresholds are the
    validator's, fixed for every model. In transformers they are the FFN outputs and residual sums that
    carry a few huge channels, the activations Qualcomm's and AIMET's transformer recipes keep at 16 bits.
    """
    from .validate import validate

    report = validate(graph, data=data)
    flagged: dict[str, str] = {}
    for finding in report.findings:
        if finding.code in WIDEN_CODES:
            for name in finding.tensors:
                line = f"{finding.code}: {finding.message}"
                flagged[name] = f"{flagged[name]}; {line}" if name in flagged else line
    return flagged
