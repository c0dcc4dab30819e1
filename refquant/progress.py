"""Progress bars for long work: a tqdm bar when enabled, a silent stand-in otherwise.

Every long-running refquant function takes ``progress=True|False`` and reports through these two
helpers, so bars look alike everywhere and tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

from typing import Iterable


class _NoBar:
    """What :func:`bar` returns when progress is off: the tqdm methods refquant calls, doing nothing."""

    def update(self, n=1):
        pass

    def set_description(self, text):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def bar(total: int | None, enabled: bool, desc: str, unit: str = "it", initial: int = 0):
    """A bar of ``total`` steps (tqdm, cleared when closed), or a silent stand-in when not ``enabled``."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False)


def iterate(items: Iterable, enabled: bool, desc: str, unit: str = "it") -> Iterable:
    """``items``, shown as a bar while iterated when ``enabled``."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)
