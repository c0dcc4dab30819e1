"""Quantization analysis: per-layer sensitivity (QuantAnalyzer), the HTML/JSON report, and mixed precision.

* :func:`analyze` -> :class:`AnalysisReport` (``report.save(dir)`` writes ``report.html`` + ``report.json``)
* :func:`mixed_precision` -> :class:`MixedPrecisionResult` (AIMET's AMP greedy Pareto search)
* :func:`flip_to_higher_precision` (AIMET's "lite" mixed precision)
* :func:`layer_groups`: the quantizer groups ("layers") both work on

Names are imported when first used, so that ``import refquant.analysis`` stays cheap (matplotlib is
only loaded to draw a report).
"""

_EXPORTS = {
    "QuantGroup": "groups", "layer_groups": "groups",
    "analyze": "sensitivity", "AnalysisReport": "report",
    "mixed_precision": "amp", "MixedPrecisionResult": "amp", "Candidate": "amp",
    "flip_to_higher_precision": "amp",
    "cli_analyze": "cli", "add_analyze_parser": "cli",
    "cli_amp": "cli", "add_amp_parser": "cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
