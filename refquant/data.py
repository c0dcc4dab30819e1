"""Calibration and evaluation data: every kind of source becomes a stream of feed dicts.

``iter_feeds(data, graph, batch_size)`` yields ``{input name: batch}`` dicts, checked against the
graph's inputs (rank, fixed dimensions other than the batch axis, dtype) and cast to their dtype.
``data`` may be:

* an iterable (list, generator) of feed dicts or, for a one-input model, of bare arrays: each item
  is one batch and is passed through as it is (not re-batched);
* a callable returning any of these (called once per ``iter_feeds``, so a pass can be repeated);
* an ``np.ndarray`` or a ``{input name: array}`` mapping holding the whole set (axis 0 = samples);
* a ``.npy`` file (batches are read from disk one at a time, see :class:`NpyRows`) or a ``.npz`` file
  (keys = input names, or a single key for a one-input model);
* a folder of ``.npy``/``.npz`` files, each one sample or one batch, read one at a time in name order;
* an image file or a folder of images (.png/.jpg/.jpeg/.bmp, name order) decoded with Pillow and
  preprocessed by a :class:`Preprocess` (defaults from the model's input shape).

Sources that hold samples (everything but iterables) are cut into batches of ``batch_size``; a model
whose batch axis is fixed gets batches of exactly that size instead.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from .errors import FeedError, RefquantError
from .ir import Graph, Value

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ARRAY_SUFFIXES = (".npy", ".npz")
LAYOUTS = ("NCHW", "NHWC", "NHW")  # NHW: grayscale without a channel axis
CHANNELS = {"RGB": 3, "BGR": 3, "GRAY": 1}

Batch = dict[str, np.ndarray]
# A chunk is a run of samples from one place: (arrays by input name, where they came from, and
# whether that label names exactly these samples, as for a one-sample file or a user's batch).
Chunk = tuple[Batch, str, bool]


# -- preprocessing ---------------------------------------------------------------------------------

@dataclass
class Preprocess:
    """How an image file becomes one sample: resize, center crop, scale, normalize, lay out.

    Steps in order: decode to ``channels`` (RGB/BGR/GRAY), resize to ``size`` (h, w) or the shorter
    side to ``resize_shorter`` (bilinear, aspect kept), center-crop to ``crop`` (h, w), then
    ``(pixel * scale - mean) / std`` per channel, and transpose to ``layout`` (without the batch axis).
    """

    size: tuple[int, int] | None = None
    resize_shorter: int | None = None
    crop: tuple[int, int] | None = None
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    channels: str = "RGB"

    def __post_init__(self):
        # normalize here so Preprocess(size=224, mean=[...]) and parsed specs end up identical
        self.size = _pair("size", self.size)
        self.crop = _pair("crop", self.crop)
        if self.resize_shorter is not None:
            self.resize_shorter = _positive_int("resize_shorter", self.resize_shorter)
        self.scale = _number("scale", self.scale)
        self.mean = _numbers("mean", self.mean)
        self.std = _numbers("std", self.std)
        self.layout = str(self.layout).upper()
        self.channels = str(self.channels).upper()
        if self.layout not in LAYOUTS:
            raise RefquantError(f"preprocess: layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.channels not in CHANNELS:
            raise RefquantError(f"preprocess: channels {self.channels!r} is not one of {', '.join(CHANNELS)}")
        if self.layout == "NHW" and self.channels != "GRAY":
            raise RefquantError("preprocess: layout NHW (no channel axis) needs channels=GRAY")
        if self.size is not None and self.resize_shorter is not None:
            raise RefquantError("preprocess: give either size or resize_shorter, not both")
        if any(s == 0 for s in self.std):
            raise RefquantError(f"preprocess: std {self.std} contains 0")
        for key in ("mean", "std"):
            _per_channel(key, getattr(self, key), CHANNELS[self.channels])  # raises on a length mismatch

    @classmethod
    def parse(cls, spec: str | dict) -> Preprocess:
        """From a dict, a JSON file path, a JSON string, or ``"size=224,224;mean=0.485,0.456,0.406;..."``."""
        return cls(**_spec_fields(spec))

    @classmethod
    def for_input(cls, graph: Graph, input_name: str) -> Preprocess:
        """Defaults that fit a model input: its layout, channel count and (if fixed) H and W.

        No dataset statistics are assumed: scale 1/255, mean 0, std 1 (pixels in [0, 1]).
        """
        value = _input_named(graph, input_name)
        shape = value.shape
        if shape is None:
            return cls()
        if len(shape) == 3:
            layout, channels, (h, w) = "NHW", 1, shape[1:]
        elif len(shape) == 4:
            # channels first unless only the last axis looks like a channel count
            nchw = shape[1] in (1, 3) or shape[3] not in (1, 3)
            layout = "NCHW" if nchw else "NHWC"
            channels, h, w = (shape[1], shape[2], shape[3]) if nchw else (shape[3], shape[1], shape[2])
        else:
            raise FeedError(f"input {value.name!r} has shape {_fmt(shape)}: an image input has rank 3 "
                            "(N,H,W) or 4 (NCHW or NHWC)")
        fixed = isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0
        gray = channels == 1
        return cls(size=(h, w) if fixed else None, layout=layout, channels="GRAY" if gray else "RGB",
                   mean=(0.0,) if gray else (0.0, 0.0, 0.0), std=(1.0,) if gray else (1.0, 1.0, 1.0))

    def apply(self, image, source: str = "image") -> np.ndarray:
        """One PIL image -> one float32 sample in ``layout`` (no batch axis)."""
        image = image.convert("L" if self.channels == "GRAY" else "RGB")
        image = self._resize(image)
        pixels = self._center_crop(np.asarray(image, dtype=np.float64), source)
        if self.channels == "BGR":
            pixels = pixels[..., ::-1]
        n = CHANNELS[self.channels]
        pixels = (pixels * self.scale - _per_channel("mean", self.mean, n)) / _per_channel("std", self.std, n)
        if self.channels == "GRAY":
            pixels = {"NCHW": pixels[None], "NHWC": pixels[..., None], "NHW": pixels}[self.layout]
        elif self.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def _resize(self, image):
        Image = _pil_image()
        width, height = image.size
        if self.size is not None:
            height, width = self.size
        elif self.resize_shorter is not None:
            # the shorter side becomes resize_shorter, the longer one keeps the aspect (as torchvision)
            s = self.resize_shorter
            if width <= height:
                width, height = s, int(s * height / width)
            else:
                width, height = int(s * width / height), s
        if (width, height) == image.size:
            return image
        return image.resize((width, height), Image.Resampling.BILINEAR)

    def _center_crop(self, pixels: np.ndarray, source: str) -> np.ndarray:
        if self.crop is None:
            return pixels
        h, w = self.crop
        height, width = pixels.shape[:2]
        if h > height or w > width:
            raise FeedError(f"{source}: image is {height}x{width} (h x w) after resizing, smaller than "
                            f"the crop {h}x{w}; resize it larger (size or resize_shorter)")
        top, left = int(round((height - h) / 2)), int(round((width - w) / 2))
        return pixels[top:top + h, left:left + w]


def load_image(path: str | os.PathLike, preprocess: Preprocess) -> np.ndarray:
    """Decode one image file with Pillow and preprocess it into one sample."""
    Image = _pil_image()
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and names itself
            return preprocess.apply(image, str(path))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise FeedError(f"{path}: cannot read as an image ({exc})") from None


def _pil_image():
    """PIL.Image, imported on first use: only image data needs Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise RefquantError("image data needs Pillow: pip install pillow") from None
    return Image


def _spec_fields(spec: str | dict | os.PathLike) -> dict[str, Any]:
    """The fields a preprocessing spec sets (only those), from any of its accepted forms."""
    if isinstance(spec, Mapping):
        given = dict(spec)
    elif isinstance(spec, (str, os.PathLike)):
        text = str(spec).strip()
        if text.startswith("{"):
            given = _loads_json(text, "preprocess")
        elif "=" in text or not text:
            given = _parse_compact(text)
        else:  # no KEY=VALUE items: the name of a JSON file
            given = _read_json(Path(text))
    else:
        raise RefquantError(f"preprocess: expected a dict or a string, got {type(spec).__name__}")
    known = [f.name for f in fields(Preprocess)]
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        raise RefquantError(f"preprocess: unknown key(s) {', '.join(unknown)}; "
                            f"the keys are {', '.join(known)}")
    return given


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RefquantError(f"preprocess: no such file {str(path)!r} (a spec is a JSON file, a JSON object, "
                            "or KEY=VALUE items separated by ';')")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RefquantError(f"preprocess: cannot read {str(path)!r} ({exc})") from None
    return _loads_json(text, str(path))


def _loads_json(text: str, source: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RefquantError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise RefquantError(f"{source}: expected a JSON object of preprocessing keys")
    return spec


def _parse_compact(text: str) -> dict[str, str]:
    """``"size=224,224;mean=0.5"`` -> ``{"size": "224,224", "mean": "0.5"}`` (values converted later)."""
    given = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise RefquantError(f"preprocess: {item!r} is not KEY=VALUE (items are separated by ';')")
        given[key.strip().lower()] = value.strip()
    return given


def _fit_geometry(spec: Preprocess, defaults: Preprocess) -> Preprocess:
    """Fill a spec's missing resize or crop with the model's size (``defaults.size``).

    Harmless by construction: without it an image would reach a fixed-size model at the wrong size
    (an error), and an image already at the model's size is unchanged by a resize or crop to it.
    """
    if defaults.size is None or spec.crop is not None:
        return spec
    if spec.resize_shorter is not None:
        return replace(spec, crop=defaults.size)
    if spec.size is None:
        return replace(spec, size=defaults.size)
    return spec


def _merge_spec(defaults: Preprocess, given: dict[str, Any]) -> Preprocess:
    """A user's partial spec over the model's defaults.

    A shorter-side resize replaces the default exact resize and, unless a crop is given, crops to the
    model's size: the usual resize-256 / crop-224 evaluation transform.
    """
    given = dict(given)
    if given.get("resize_shorter") is not None and "size" not in given:
        given["size"] = None
        given.setdefault("crop", defaults.size)
    return replace(defaults, **given)


def _number(key: str, value) -> float:
    try:
        if isinstance(value, str) and "/" in value:
            numerator, denominator = value.split("/")  # "1/255" and "1/127.5" read as written
            return float(numerator) / float(denominator)
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise RefquantError(f"preprocess: {key} must be a number, got {value!r}") from None


def _numbers(key: str, value) -> tuple[float, ...]:
    if isinstance(value, str):
        items = value.split(",")
    else:
        items = np.atleast_1d(np.asarray(value, dtype=object)).tolist()
    numbers = tuple(_number(key, v) for v in items)
    if not numbers:
        raise RefquantError(f"preprocess: {key} is empty")
    return numbers


def _positive_int(key: str, value) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):
            number = int(value.strip())
        else:
            number = int(value)
            if number != value:  # 224.5 is not a size
                raise ValueError
        if number <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise RefquantError(f"preprocess: {key} must be a positive integer, got {value!r}") from None
    return number


def _pair(key: str, value) -> tuple[int, int] | None:
    """``224``, ``"224"``, ``"224,200"``, ``"224x200"``, ``[224, 200]`` -> (h, w)."""
    if value is None:
        return None
    if isinstance(value, str):
        items = value.lower().replace("x", ",").split(",")
    else:
        items = np.atleast_1d(np.asarray(value, dtype=object)).tolist()
    if len(items) == 1:
        items = items * 2
    if len(items) != 2:
        raise RefquantError(f"preprocess: {key} must be H,W or one size, got {value!r}")
    return tuple(_positive_int(key, item) for item in items)


def _per_channel(key: str, values: tuple[float, ...], channels: int) -> np.ndarray:
    """Per-channel values; one value, or all equal, applies to any number of channels."""
    if len(values) == channels:
        return np.asarray(values, dtype=np.float64)
    if len(set(values)) == 1:
        return np.full(channels, values[0], dtype=np.float64)
    raise RefquantError(f"preprocess: {key} has {len(values)} values but the images have "
                        f"{channels} channel(s)")


# -- graph inputs and checks -----------------------------------------------------------------------

def graph_inputs(graph: Graph) -> list[Value]:
    """The inputs a feed must supply: graph inputs that are not initializers."""
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    if not inputs:
        raise FeedError(f"graph {graph.name!r} has no inputs to feed")
    return inputs


def _input_named(graph: Graph, name: str) -> Value:
    for value in graph_inputs(graph):
        if value.name == name:
            return value
    raise FeedError(f"graph {graph.name!r} has no input {name!r}; the inputs are "
                    f"{[v.name for v in graph_inputs(graph)]}")


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_array(array, value: Value, source: str, kind: str = "batch") -> np.ndarray:
    """One input's array as a batch: rank and fixed dims (batch axis aside) checked, dtype convertible.

    ``kind``: "batch" (has the batch axis), "sample" (has not: one is added), or "either" (decided
    by the rank: a file in a folder may hold one sample or a batch).
    """
    if not isinstance(array, NpyRows):  # a file read by rows stays one: _rebatch reads only slices of it
        array = np.asanyarray(array)  # keeps a memory map a memory map, so _finish copies only slices
    got = array.shape
    shape = value.shape
    if shape is not None:
        rank = len(shape)
        if kind == "sample" or (kind == "either" and array.ndim == rank - 1):
            array = array[None]
        mismatch = array.ndim != rank or any(isinstance(want, int) and want > 0 and want != have
                                             for want, have in zip(shape[1:], array.shape[1:]))
        if mismatch:
            what = {"batch": "a batch", "sample": "one sample (no batch axis)",
                    "either": "one sample or a batch"}[kind]
            raise FeedError(f"{source}: input {value.name!r} expects shape {_fmt(shape)} (any batch size), "
                            f"got shape {list(got)} as {what}")
    elif kind == "sample":
        array = array[None]
    if value.dtype is not None and not np.can_cast(array.dtype, value.dtype, "same_kind"):
        raise FeedError(f"{source}: input {value.name!r} is {value.dtype}, got {array.dtype} data "
                        "that does not convert without losing values")
    return array


def _finish(arrays: Batch, inputs: list[Value], source: str) -> Batch:
    """Cast to each input's dtype, copy out of memory maps, and refuse NaN/Inf."""
    out = {}
    for value in inputs:
        array = arrays[value.name]
        dtype = value.dtype if value.dtype is not None else array.dtype
        if array.dtype != dtype or isinstance(array, np.memmap):
            array = np.array(array, dtype=dtype)  # a plain in-memory copy, detached from any file
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            where = np.argwhere(~np.isfinite(array))[0].tolist()
            raise FeedError(f"{source}: input {value.name!r} has NaN or Inf "
                            f"(first at index {where} of these samples)")
        out[value.name] = array
    return out


def _select(keys: Iterable[str], inputs: list[Value], source: str) -> dict[str, str]:
    """Input name -> key holding it: by name, or the only key for a one-input model."""
    keys = list(keys)
    missing = [v.name for v in inputs if v.name not in keys]
    if not missing:
        return {v.name: v.name for v in inputs}
    if len(inputs) == 1 and len(keys) == 1:
        return {inputs[0].name: keys[0]}
    wanted = ", ".join(f"{v.name!r} {_fmt(v.shape) if v.shape is not None else ''}".strip()
                       for v in inputs if v.name in missing)
    raise FeedError(f"{source}: missing input(s) {missing} (expected {wanted}); it has {keys}")


def _only_input(inputs: list[Value], source: str, what: str) -> Value:
    if len(inputs) != 1:
        raise FeedError(f"{source}: {what} feeds a one-input model, but this one has inputs "
                        f"{[v.name for v in inputs]}; give dicts or .npz files keyed by input name")
    return inputs[0]


def _length(arrays: Batch, source: str) -> int:
    """The number of samples (axis 0) the arrays share; scalars (shape unknown to the graph) aside."""
    lengths = {name: len(a) for name, a in arrays.items() if np.ndim(a)}
    if len(set(lengths.values())) > 1:
        raise FeedError(f"{source}: inputs have different numbers of samples {lengths}")
    return next(iter(lengths.values()), 0)


# -- sources ---------------------------------------------------------------------------------------

def iter_feeds(data, graph: Graph, batch_size: int = 16,
               preprocess: Preprocess | dict | str | None = None) -> Iterator[Batch]:
    """Feed dicts for ``graph`` from ``data``, batch by batch (see the module docstring for kinds).

    ``preprocess`` (image data only): None uses ``Preprocess.for_input`` defaults; a dict or string
    sets only the keys it names over those defaults; a :class:`Preprocess` is used as given except
    that, for a model with a fixed H and W, a missing resize becomes a resize to it and a
    ``resize_shorter`` without a crop is center-cropped to it (the resize-256 / crop-224 transform).

    Files and folders are checked when this is called (missing, empty, unsupported); their contents
    as they are read. Every error is a FeedError naming the input, the shapes and the file or item.
    """
    inputs = graph_inputs(graph)
    fixed = _fixed_batch(inputs)
    if fixed is None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                          or batch_size < 1):
        raise FeedError(f"batch size must be a positive integer, got {batch_size!r}")
    size = fixed or int(batch_size)
    stream, label = _stream(data, graph, inputs, size, fixed is not None, preprocess)
    if fixed and fixed > 1 and not isinstance(data, (list, tuple)):  # a list's items are batches as given
        total = count_samples(data, graph)
        if total is not None and total % fixed:
            raise FeedError(f"{label}: {total} samples do not fill batches of {fixed}, "
                            "the model's fixed batch size; give a multiple of it")
    return _nonempty(stream, label)


def reusable(data, graph: Graph, batch_size: int = 16):
    """``data`` itself when it can be read more than once; a one-shot iterator (a generator) is read once
    into the list of its batches, for the techniques that go through the data several times."""
    if isinstance(data, Iterator):
        return list(iter_feeds(data, graph, batch_size=batch_size))
    return data


def count_samples(data, graph: Graph) -> int | None:
    """How many samples ``data`` holds, if that is known without reading it all (else None).

    Never raises for bad data: ``iter_feeds`` reports that. Use it for a progress bar's total.
    """
    try:
        inputs = graph_inputs(graph)
    except FeedError:
        return None
    if isinstance(data, np.ndarray):
        return len(data) if data.ndim else None
    if isinstance(data, Mapping):
        first = data.get(inputs[0].name, next(iter(data.values()), None) if len(data) == 1 else None)
        return _leading(first)
    if isinstance(data, (str, os.PathLike)):
        return _count_path(Path(data), inputs)
    if isinstance(data, (list, tuple)):
        first = inputs[0].name
        counts = [_leading(item.get(first) if isinstance(item, Mapping) else item) for item in data]
        return None if None in counts else sum(counts)
    return None


def _nonempty(stream: Iterator[Batch], label: str) -> Iterator[Batch]:
    empty = True
    for batch in stream:
        empty = False
        yield batch
    if empty:
        raise FeedError(f"{label}: no data (the data set is empty)")


def _fixed_leading(value: Value) -> bool:
    return bool(value.shape) and isinstance(value.shape[0], int) and value.shape[0] > 0


def _fixed_batch(inputs: list[Value]) -> int | None:
    """The batch size the model fixes on axis 0, if any input fixes it."""
    for value in inputs:
        if value.shape and isinstance(value.shape[0], int) and value.shape[0] > 0:
            return value.shape[0]
    return None


def _stream(data, graph, inputs, batch_size, fixed, preprocess) -> tuple[Iterator[Batch], str]:
    """Dispatch on the kind of ``data``; returns the batch stream and a label for messages."""
    if callable(data) and not isinstance(data, (np.ndarray, Mapping, str, os.PathLike)):
        data = data()  # a factory: a fresh iterable for every pass over the data
    if isinstance(data, (str, os.PathLike)):
        return _path_stream(Path(data), graph, inputs, batch_size, fixed, preprocess)
    _no_preprocess(preprocess, "in-memory data")
    if isinstance(data, np.ndarray):
        value = _only_input(inputs, "data", "a bare array")
        chunk = _whole_set({value.name: data}, inputs, "data array")
        return _rebatch([chunk], inputs, batch_size, fixed), "data"
    if isinstance(data, Mapping):
        arrays = {name: data[key] for name, key in _select(data.keys(), inputs, "data dict").items()}
        return _rebatch([_whole_set(arrays, inputs, "data dict")], inputs, batch_size, fixed), "data"
    if isinstance(data, Iterable):
        return _iterable_stream(data, inputs), "data"
    raise FeedError(f"data of type {type(data).__name__} is not a data source: give arrays, feed dicts, "
                    "a .npy/.npz file, or a folder of .npy/.npz files or images")


def _no_preprocess(preprocess, what: str) -> None:
    if preprocess is not None:
        raise FeedError(f"preprocessing applies to image files, not to {what}")


def _iterable_stream(items: Iterable, inputs: list[Value]) -> Iterator[Batch]:
    """Each item is one batch, checked and cast but not re-batched."""
    for index, item in enumerate(items):
        source = f"data item {index}"
        if isinstance(item, Mapping):
            arrays = {name: item[key] for name, key in _select(item.keys(), inputs, source).items()}
        elif isinstance(item, np.ndarray) or hasattr(item, "__array__"):
            arrays = {_only_input(inputs, source, "a bare array (one batch)").name: item}
        else:
            raise FeedError(f"{source} is a {type(item).__name__}: expected a dict {{input name: array}} "
                            "or an array (one batch)")
        checked = {v.name: _check_array(arrays[v.name], v, source) for v in inputs}
        # only inputs with a free leading axis share the batch: a recurrent state [layers, batch, h] or
        # a [hidden] vector fixes its axis 0 to something else
        _length({v.name: checked[v.name] for v in inputs if not _fixed_leading(v)}, source)
        yield _finish(checked, inputs, source)


def _whole_set(arrays: Mapping[str, Any], inputs: list[Value], source: str) -> Chunk:
    """A whole data set in arrays (axis 0 = samples) as one chunk to cut into batches."""
    checked = {}
    for value in inputs:
        array = arrays[value.name]
        if np.ndim(array) == 0:
            raise FeedError(f"{source}: input {value.name!r} data is a scalar; it needs a sample axis first")
        checked[value.name] = _check_array(array, value, source)
    if _length(checked, source) == 0:
        raise FeedError(f"{source}: no samples (the first axis has length 0)")
    return checked, source, False


def _path_stream(path: Path, graph, inputs, batch_size, fixed, preprocess) -> tuple[Iterator[Batch], str]:
    label = str(path)
    if not path.exists():
        raise FeedError(f"data: no such file or folder {label!r}")
    suffix = path.suffix.lower()
    if path.is_dir():
        arrays, images = _folder_files(path)
        if arrays and images:
            raise FeedError(f"{label}: folder mixes array files ({arrays[0].name}) and images "
                            f"({images[0].name}); keep one kind per folder")
        if not arrays and not images:
            raise FeedError(f"{label}: folder holds no .npy/.npz files and no images "
                            f"({'/'.join(IMAGE_SUFFIXES)}); the data set is empty")
        if arrays:
            _no_preprocess(preprocess, f"the array files in {label}")
            chunks = (_file_chunk(p, inputs) for p in arrays)
        else:
            chunks = _image_chunks(images, graph, inputs, preprocess, label)
    elif suffix in IMAGE_SUFFIXES:
        chunks = _image_chunks([path], graph, inputs, preprocess, label)
    elif suffix == ".npy":
        _no_preprocess(preprocess, label)
        value = _only_input(inputs, label, "a .npy file")
        chunks = [_whole_set({value.name: _load_npy(path)}, inputs, label)]
    elif suffix == ".npz":
        _no_preprocess(preprocess, label)
        chunks = [_whole_set(_load_npz(path, inputs), inputs, label)]
    else:
        raise FeedError(f"{label}: unsupported data file type {suffix or '(none)'!r}; expected .npy, .npz, "
                        "an image, or a folder of them")
    return _rebatch(chunks, inputs, batch_size, fixed), label


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Array files and image files in a folder, sorted by name; other files (labels, notes) are ignored."""
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: p.name)
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return arrays, images


class NpyRows:
    """A .npy file read by rows on demand: ``shape``, ``dtype``, ``ndim``, ``len()`` and ``[start:stop]``
    (a slice of axis 0, returned as a fresh in-memory array read from the file with one ``readinto``).

    Why not ``np.load(mmap_mode="r")``: the pages of a memory map that have been read count in the
    process's resident memory until the kernel reclaims them, so a calibration over a large file looks
    as if it grew with the file (0.57 MB per 224x224 RGB sample). Reading batches into ordinary arrays
    keeps the resident memory at one batch; the file's pages stay in the kernel's page cache, outside
    the process.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                self.offset = f.tell()
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError, EOFError) as exc:
            raise FeedError(f"{path}: cannot read as .npy ({exc})") from None
        if dtype.hasobject:
            raise FeedError(f"{path}: cannot read as .npy (it holds Python objects, which need pickle)")
        self.shape, self.dtype, self.fortran = tuple(shape), dtype, fortran
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize
        need = self.offset + (self.shape[0] * self.row_bytes if self.shape else dtype.itemsize)
        if size < need:
            raise FeedError(f"{path}: cannot read as .npy (the file has {size} bytes, its header "
                            f"promises {need}: truncated)")

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or not self.shape or self.fortran:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)[key]  # rare: copy what is asked
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            return self[start:stop][::step]
        rows = max(0, stop - start)
        out = np.empty((rows,) + self.shape[1:], dtype=self.dtype)
        want = rows * self.row_bytes
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            got = f.readinto(memoryview(out.reshape(-1)).cast("B")) if want else 0
        if got != want:
            raise FeedError(f"{self.path}: file ended while reading samples {start}:{stop}")
        return out


def _load_npy(path: Path) -> "NpyRows | np.ndarray":
    """A .npy file for batch-by-batch reading (see NpyRows); a 0-d array is read whole."""
    rows = NpyRows(path)
    if not rows.shape or rows.fortran:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise FeedError(f"{path}: cannot read as .npy ({exc})") from None
    return rows


def _load_npz(path: Path, inputs: list[Value]) -> Batch:
    # np.load cannot memory-map inside a zip, so the arrays the model needs are read whole
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = _select(npz.files, inputs, str(path))
            return {name: npz[key] for name, key in keys.items()}
    except FeedError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FeedError(f"{path}: cannot read as .npz ({exc})") from None


def _file_chunk(path: Path, inputs: list[Value]) -> Chunk:
    """One file of a folder: one sample or one batch of every input."""
    if path.suffix.lower() == ".npy":
        array = _load_npy(path)
        if isinstance(array, NpyRows):
            array = array[0:len(array)]  # one file of a folder: one sample or one batch, read whole
        arrays = {_only_input(inputs, str(path), "a folder of .npy files").name: array}
    else:
        arrays = _load_npz(path, inputs)
    checked = {v.name: _check_array(arrays[v.name], v, str(path), kind="either") for v in inputs}
    _length(checked, str(path))
    first = inputs[0]
    single = first.shape is not None and np.ndim(arrays[first.name]) == len(first.shape) - 1
    return checked, str(path), single


def _image_chunks(paths: list[Path], graph, inputs, preprocess, label) -> Iterator[Chunk]:
    """Images decoded one at a time (never the whole folder in memory)."""
    value = _only_input(inputs, label, "image data")
    defaults = Preprocess.for_input(graph, value.name)
    if preprocess is None:
        spec = defaults
    elif isinstance(preprocess, Preprocess):
        spec = _fit_geometry(preprocess, defaults)
    else:
        spec = _merge_spec(defaults, _spec_fields(preprocess))
    return _decode_images(paths, value, spec)


def _decode_images(paths: list[Path], value: Value, spec: Preprocess) -> Iterator[Chunk]:
    for path in paths:
        sample = load_image(path, spec)
        source = f"{path} (after preprocessing)"
        yield {value.name: _check_array(sample, value, source, kind="sample")}, str(path), True


def _rebatch(chunks: Iterable[Chunk], inputs: list[Value], batch_size: int, fixed: bool) -> Iterator[Batch]:
    """Cut a stream of chunks into batches of ``batch_size`` samples (the last may be short).

    Holds at most one chunk plus the parts of one batch: a memory-mapped file is read batch by batch.
    """
    parts: list[tuple[Batch, str]] = []
    have = total = 0
    for arrays, label, exact in chunks:
        n = _length(arrays, label)
        start = 0
        while start < n:
            stop = min(n, start + batch_size - have)
            where = label if exact and (start, stop) == (0, n) else f"{label} samples {start}:{stop}"
            part = {name: array[start:stop] for name, array in arrays.items()}
            parts.append((_finish(part, inputs, where), where))
            have, total, start = have + stop - start, total + stop - start, stop
            if have == batch_size:
                yield _join(parts, inputs)
                parts, have = [], 0
    if parts:
        if fixed:
            raise FeedError(f"{parts[-1][1]}: the model's batch size is fixed at {batch_size}, but the last "
                            f"batch has {have} samples ({total} in all); give a multiple of {batch_size}")
        yield _join(parts, inputs)


def _join(parts: list[tuple[Batch, str]], inputs: list[Value]) -> Batch:
    if len(parts) == 1:
        return parts[0][0]
    first, first_label = parts[0]
    for arrays, label in parts[1:]:
        for value in inputs:
            want, got = first[value.name].shape[1:], arrays[value.name].shape[1:]
            if want != got:
                raise FeedError(f"{label}: input {value.name!r} sample shape {list(got)} differs from "
                                f"{list(want)} of {first_label} in the same batch; samples in a batch "
                                "must agree (resize images to one size)")
    return {v.name: np.concatenate([arrays[v.name] for arrays, _ in parts]) for v in inputs}


# -- counting without reading ----------------------------------------------------------------------

def _leading(array) -> int | None:
    shape = getattr(array, "shape", None)
    return shape[0] if shape else None


def _count_path(path: Path, inputs: list[Value]) -> int | None:
    if path.is_dir():
        arrays, images = _folder_files(path)
        if images and not arrays:
            return len(images)
        counts = [_samples_in_file(p, inputs) for p in arrays]
        return None if not counts or None in counts else sum(counts)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return 1 if path.is_file() else None
    shape = _file_shape(path, inputs)
    return shape[0] if shape else None


def _samples_in_file(path: Path, inputs: list[Value]) -> int | None:
    """One file of a folder holds one sample (rank one less than the input's) or a batch."""
    shape = _file_shape(path, inputs)
    if shape is None:
        return None
    rank = inputs[0].rank
    return 1 if rank is not None and len(shape) == rank - 1 else (shape[0] if shape else None)


def _file_shape(path: Path, inputs: list[Value]) -> tuple[int, ...] | None:
    """Shape of the first input's array in a .npy/.npz file, from its header only."""
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False).shape
        if path.suffix.lower() == ".npz":
            with zipfile.ZipFile(path) as archive:
                keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
                key = _select(keys, inputs[:1], str(path))[inputs[0].name]
                with archive.open(key + ".npy") as member:
                    version = np.lib.format.read_magic(member)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    return read(member)[0]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, FeedError):
        return None
    return None


# -- labels ----------------------------------------------------------------------------------------

def load_labels(path: str | os.PathLike) -> np.ndarray:
    """Integer class labels, one per sample, from a .npy, a .npz (one array, or key "labels"/"label")
    or a .txt file (one integer per line; blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FeedError(f"labels: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        labels = _read_label_text(path)
    elif suffix in (".npy", ".npz"):
        labels = _read_label_array(path)
    else:
        raise FeedError(f"{path}: unsupported labels file type {suffix or '(none)'!r}; "
                        "expected .npy, .npz or .txt")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise FeedError(f"{path}: labels must be one integer per sample, got shape {list(labels.shape)}")
    if labels.size == 0:
        raise FeedError(f"{path}: no labels")
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)  # integers saved as floats are still integers
    if labels.dtype.kind not in "iu":
        raise FeedError(f"{path}: labels must be integers, got {labels.dtype} values")
    return labels.astype(np.int64)


def _read_label_text(path: Path) -> np.ndarray:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FeedError(f"{path}: cannot read labels ({exc})") from None
    labels = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            labels.append(int(text))
        except ValueError:
            raise FeedError(f"{path}:{number}: expected one integer label per line, got {text!r}") from None
    return np.asarray(labels, dtype=np.int64)


def _read_label_array(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as npz:
            keys = npz.files
            key = keys[0] if len(keys) == 1 else next((k for k in ("labels", "label") if k in keys), None)
            if key is None:
                raise FeedError(f"{path}: holds {keys}; expected one array or a key 'labels'")
            return npz[key]
    except FeedError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FeedError(f"{path}: cannot read labels ({exc})") from None


__all__ = ["Preprocess", "count_samples", "graph_inputs", "iter_feeds", "load_image", "load_labels"]
