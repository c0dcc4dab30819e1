"""Feeds for a graph: random stand-ins shaped by its inputs, and reading ``NAME=FILE.npy`` arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import FeedError
from .ir import Graph


def random_feeds(graph: Graph, batch: int = 1, seed: int = 0, dims: dict[str, int] | None = None
                 ) -> dict[str, np.ndarray]:
    """One array per graph input: N(0,1) floats, small non-negative integers, random booleans.

    Symbolic dims take ``dims[name]`` if given, ``batch`` for the first axis, 1 elsewhere.
    """
    rng = np.random.default_rng(seed)
    dims = dims or {}
    feeds = {}
    for value in graph.inputs:
        if value.shape is None:
            raise FeedError(f"input {value.name!r} has no declared shape; pass it explicitly")
        shape = []
        for axis, d in enumerate(value.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(dims[d])
            else:
                shape.append(batch if axis == 0 else 1)
        dtype = value.dtype if value.dtype is not None else np.dtype(np.float32)
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def parse_input_args(args: list[str]) -> dict[str, np.ndarray]:
    """``["x=a.npy", "mask=m.npy"]`` -> ``{"x": array, "mask": array}`` (a .npz gives all its arrays)."""
    feeds = {}
    for arg in args or []:
        if "=" not in arg:
            path = Path(arg)
            if path.suffix != ".npz":
                raise FeedError(f"--input {arg!r}: expected NAME=FILE.npy or FILE.npz")
            with np.load(path) as data:
                feeds.update({k: data[k] for k in data.files})
            continue
        name, path = arg.split("=", 1)
        if not Path(path).is_file():
            raise FeedError(f"--input {name}: no such file {path!r}")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise FeedError(f"--input {name}: cannot read {path!r} as .npy ({exc})") from None
    return feeds
