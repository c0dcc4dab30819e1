"""Calibration data cut into shards that a worker reads itself.

A :class:`Shard` is a small picklable description of a contiguous run of the calibration batches: a
file and a sample range, a list of image files, or (for in-memory data, which has no other place to be
read from) the slice itself. ``shard.batches(graph, batch_size, preprocess)`` yields on the worker
exactly the feed dicts :func:`refquant.data.iter_feeds` yields for those batches of the whole data set
in one process: shards start on batch boundaries, so batch ``k`` of a shard is batch ``first + k`` of
the whole set, bit for bit.

:func:`split` cuts a data source into ``n`` such shards (in data order). An executor that knows other
kinds of data (a Dask executor knows ``dask.array`` and ``dask.bag``) offers ``executor.shards_of(data,
graph, batch_size, n)``; :func:`split` asks it first. A :class:`Shards` list given by the caller is used
as it is (each element is any data source ``iter_feeds`` accepts, read on the worker).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import data as data_mod
from ..errors import RefquantError


class Shards(list):
    """An explicit list of shards: each element is a data source (a path, an array, a list of feed
    dicts, a picklable callable) read where the shard is calibrated. Shard ``i`` covers the samples
    after those of shards ``0..i-1``."""


@dataclass
class Shard:
    """Batches ``[first, stop)`` of a data source, read where the shard runs.

    ``kind``: "source" (the whole ``source``), "npy" (samples ``[start, stop)`` of a memory-mapped .npy
    file), "npz" (samples of every array of a .npz), "images" (``source`` = the image files, in order),
    "slice" (``source`` = in-memory arrays or a list of batches, already cut), "skip" (batches
    ``[start, stop)`` of ``iter_feeds(source)``: the reader walks past the earlier ones).
    ``first_sample``: index of the shard's first sample in the whole set (for error messages)."""

    source: Any
    kind: str = "source"
    start: int = 0
    stop: int | None = None
    first_sample: int = 0
    label: str = ""

    def batches(self, graph, batch_size: int, preprocess=None) -> Iterator[dict]:
        from ..data import iter_feeds

        kind, src = self.kind, self.source
        if kind in ("source", "slice"):
            source = src() if kind == "source" and _is_factory(src) else src
            yield from iter_feeds(source, graph, batch_size=batch_size, preprocess=preprocess)
        elif kind == "npy":
            array = np.load(src, mmap_mode="r", allow_pickle=False)[self.start:self.stop]
            yield from iter_feeds(array, graph, batch_size=batch_size)
        elif kind == "npz":
            with np.load(src, allow_pickle=False) as npz:
                arrays = {key: npz[key][self.start:self.stop] for key in npz.files}
            yield from iter_feeds(arrays, graph, batch_size=batch_size)
        elif kind == "images":
            yield from _image_batches([Path(p) for p in src], graph, batch_size, preprocess, self.label)
        elif kind == "skip":
            for index, feeds in enumerate(iter_feeds(src, graph, batch_size=batch_size, preprocess=preprocess)):
                if index >= self.stop:
                    break
                if index >= self.start:
                    yield feeds
        else:
            raise RefquantError(f"unknown shard kind {kind!r}")


def _is_factory(src) -> bool:
    return callable(src) and not isinstance(src, (np.ndarray, dict, str, os.PathLike))


def _image_batches(paths, graph, batch_size, preprocess, label) -> Iterator[dict]:
    """The batches iter_feeds makes of a folder holding exactly ``paths`` (same decoding, same
    preprocessing defaults from the model's input, same batching)."""
    inputs = data_mod.graph_inputs(graph)
    fixed = data_mod._fixed_batch(inputs)
    chunks = data_mod._image_chunks(paths, graph, inputs, preprocess, label)
    yield from data_mod._rebatch(chunks, inputs, fixed or batch_size, fixed is not None)


def batch_ranges(batches: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous runs of batches covering ``0..batches`` as evenly as possible (no empty run)."""
    n = max(1, min(n, batches))
    bounds = [round(i * batches / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def split(data, graph, batch_size: int, preprocess, n: int, executor=None) -> list[Shard]:
    """``data`` as at most ``n`` shards in data order (see the module docstring)."""
    if isinstance(data, Shards):
        return [s if isinstance(s, Shard) else Shard(s, "source", label=f"shard {i}") for i, s in enumerate(data)]
    hook = getattr(executor, "shards_of", None)
    if hook is not None:
        shards = hook(data, graph, batch_size, n)
        if shards is not None:
            return shards
    inputs = data_mod.graph_inputs(graph)
    size = data_mod._fixed_batch(inputs) or int(batch_size)
    if isinstance(data, (str, os.PathLike)):
        return _split_path(Path(data), graph, inputs, size, preprocess, n)
    if isinstance(data, np.ndarray) or isinstance(data, dict):
        arrays = data if isinstance(data, dict) else None
        total = data_mod.count_samples(data, graph)
        if not total:
            return [Shard(data, "slice")]
        shards = []
        for a, b in batch_ranges(math.ceil(total / size), n):
            lo, hi = a * size, min(total, b * size)
            part = ({k: v[lo:hi] for k, v in arrays.items()} if arrays is not None else data[lo:hi])
            shards.append(Shard(part, "slice", first_sample=lo))
        return shards
    if isinstance(data, (list, tuple)):  # a list of batches: each item is one batch
        counts = [len(next(iter(b.values()))) if isinstance(b, dict) else len(b) for b in data]
        return [Shard(list(data[a:b]), "slice", first_sample=sum(counts[:a])) for a, b in batch_ranges(len(data), n)]
    return [Shard(data, "source")]  # a generator or factory: one pass, one shard


def _split_path(path: Path, graph, inputs, size, preprocess, n) -> list[Shard]:
    label = str(path)
    if not path.exists():
        raise RefquantError(f"data: no such file or folder {label!r}")
    total = data_mod.count_samples(str(path), graph)
    if path.is_dir():
        arrays, images = data_mod._folder_files(path)
        if images and not arrays:
            return [Shard([str(p) for p in images[a * size:b * size]], "images", first_sample=a * size,
                          label=label) for a, b in batch_ranges(math.ceil(len(images) / size), n)]
        kind = "skip"
    elif path.suffix.lower() == ".npy":
        kind = "npy"
    elif path.suffix.lower() == ".npz":
        kind = "npz"
    else:
        return [Shard(str(path), "source")]
    if not total:
        return [Shard(str(path), "source")]
    batches = math.ceil(total / size)
    if kind == "skip":
        return [Shard(str(path), "skip", a, b, a * size, label) for a, b in batch_ranges(batches, n)]
    return [Shard(str(path), kind, a * size, min(total, b * size), a * size, label)
            for a, b in batch_ranges(batches, n)]
