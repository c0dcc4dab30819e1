"""Data sources: arrays, feed dicts, .npy/.npz files, folders of arrays and images, preprocessing, labels."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant import zoo
from refquant.data import Preprocess, count_samples, iter_feeds, load_labels
from refquant.errors import FeedError, RefquantError

from .helpers import FLOAT, INT64, make_model

def one_input(shape, elem=FLOAT, name="x"):
    """A one-input Identity model whose input has ``shape``."""
    node = helper.make_node("Identity", [name], ["out"])
    model = make_model([node], [(name, elem, shape)], [("out", elem, shape)])
    return refquant.load(model)


def two_inputs():
    """out = x + y, both [batch, 3]; the constant c is an initializer, not an input to feed."""
    nodes = [helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("Add", ["s", "c"], ["out"])]
    model = make_model(nodes, [("x", FLOAT, ["batch", 3]), ("y", FLOAT, ["batch", 3])],
                       [("out", FLOAT, ["batch", 3])], {"c": np.ones(3, np.float32)})
    return refquant.load(model)


def sizes(batches, name="x"):
    return [len(b[name]) for b in batches]


def pil():
    """PIL.Image; only the image tests need Pillow (refquant imports it only for image data)."""
    return pytest.importorskip("PIL.Image")


def save_png(path, pixels):
    pil().fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def shared_data():
    folder = zoo.shared_dir() / "data"
    if not folder.is_dir():
        pytest.skip(f"shared data folder not found ({folder}; set REFQUANT_SHARED)")
    return folder


# -- in-memory sources ---------------------------------------------------------------------------------

def test_array_is_cut_into_batches_cast_to_float32_and_loses_nothing():
    source = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32).astype(np.float64)
    batches = list(iter_feeds(source, one_input(["batch", 3]), batch_size=4))
    assert sizes(batches) == [4, 4, 2]
    assert all(b["x"].dtype == np.float32 for b in batches)
    assert np.array_equal(np.concatenate([b["x"] for b in batches]), source.astype(np.float32))
    assert count_samples(source, one_input(["batch", 3])) == 10


def test_feed_dicts_are_batches_passed_through_and_extra_keys_ignored():
    graph = two_inputs()
    rng = np.random.default_rng(1)
    items = [{"x": rng.random((n, 3), np.float32), "y": rng.random((n, 3), np.float32), "label": np.zeros(n)}
             for n in (3, 5)]
    batches = list(iter_feeds(items, graph, batch_size=4))  # iterables are not re-batched
    assert sizes(batches) == [3, 5] and sorted(batches[0]) == ["x", "y"]  # "c" is a constant, "label" unused
    assert np.array_equal(batches[1]["y"], items[1]["y"])
    assert count_samples(items, graph) == 8


def test_generator_of_bare_arrays_and_a_factory_for_repeated_passes():
    graph = one_input(["batch", 2])
    arrays = [np.full((2, 2), i, np.float64) for i in range(3)]
    batches = list(iter_feeds((a for a in arrays), graph, batch_size=8))
    assert sizes(batches) == [2, 2, 2] and [b["x"][0, 0] for b in batches] == [0, 1, 2]
    assert batches[0]["x"].dtype == np.float32
    assert count_samples((a for a in arrays), graph) is None  # a generator is not counted (nor consumed)

    factory = lambda: (a for a in arrays)  # noqa: E731
    assert len(list(iter_feeds(factory, graph))) == len(list(iter_feeds(factory, graph))) == 3


def test_bare_arrays_need_a_one_input_model():
    with pytest.raises(FeedError, match=r"data item 0.*one-input model.*\['x', 'y'\]"):
        list(iter_feeds([np.zeros((1, 3), np.float32)], two_inputs()))


def test_dict_of_whole_arrays_is_cut_into_batches():
    x, y = np.arange(15, dtype=np.float32).reshape(5, 3), -np.arange(15, dtype=np.float32).reshape(5, 3)
    batches = list(iter_feeds({"x": x, "y": y}, two_inputs(), batch_size=2))
    assert sizes(batches) == [2, 2, 1]
    assert np.array_equal(np.concatenate([b["y"] for b in batches]), y)


# -- files -------------------------------------------------------------------------------------------

def test_npz_by_input_names_and_by_its_only_key(tmp_path):
    x, y = np.ones((6, 3), np.float32), np.arange(18, dtype=np.float64).reshape(6, 3)
    np.savez(tmp_path / "two.npz", x=x, y=y, labels=np.arange(6))
    batches = list(iter_feeds(tmp_path / "two.npz", two_inputs(), batch_size=4))
    assert sizes(batches) == [4, 2] and batches[1]["y"].dtype == np.float32
    assert np.array_equal(np.concatenate([b["y"] for b in batches]), y)
    assert count_samples(tmp_path / "two.npz", two_inputs()) == 6

    np.savez_compressed(tmp_path / "one.npz", whatever=y)
    batches = list(iter_feeds(str(tmp_path / "one.npz"), one_input(["batch", 3]), batch_size=5))
    assert sizes(batches) == [5, 1] and np.array_equal(batches[1]["x"], y[5:].astype(np.float32))
    assert count_samples(tmp_path / "one.npz", one_input(["batch", 3])) == 6  # from the zip member's header


def test_npy_is_read_one_batch_at_a_time(tmp_path):
    path = tmp_path / "big.npy"
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(4000, 1000))  # 16 MB
    rows[:] = np.arange(4000, dtype=np.float32)[:, None]
    rows.flush()
    del rows
    graph = one_input(["batch", 1000])
    assert count_samples(path, graph) == 4000
    tracemalloc.start()
    try:
        seen = 0
        for batch in iter_feeds(path, graph, batch_size=100):  # 400 kB per batch
            assert type(batch["x"]) is np.ndarray  # a copy, not a view into the file
            assert np.array_equal(batch["x"][:, 0], np.arange(seen, seen + 100))
            seen += len(batch["x"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == 4000
    assert peak < 4e6, f"peak {peak / 1e6:.1f} MB: the file was loaded whole"


def _rss_file_kb() -> int:
    """File-backed resident pages of this process (memory maps of files), from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise OSError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc/self/status")
def test_npy_pages_do_not_stay_resident(tmp_path):
    """Reading a 48 MB .npy batch by batch leaves the process's file-backed resident memory where it
    was: batches are read into ordinary arrays, not through a memory map whose pages would stay mapped
    (a memory-mapped read of the whole file adds its 48 MB, which the second half checks)."""
    path = tmp_path / "big.npy"
    np.save(path, np.ones((3000, 4000), dtype=np.float32))
    graph = one_input(["batch", 4000])
    before = _rss_file_kb()
    total = 0.0
    for batch in iter_feeds(path, graph, batch_size=100):
        total += float(batch["x"][:, 0].sum())
    grown_mb = (_rss_file_kb() - before) / 1024
    assert total == 3000.0
    assert grown_mb < 8, f"file-backed RSS grew {grown_mb:.0f} MB"
    mapped = np.load(path, mmap_mode="r")
    before = _rss_file_kb()
    assert float(mapped[:, 0].sum()) == 3000.0 and float(np.asarray(mapped).sum()) == 12e6
    assert (_rss_file_kb() - before) / 1024 > 40  # what a memory map would have kept


def test_npy_rows_reads_slices_and_rejects_truncated_files(tmp_path):
    from refquant.data import NpyRows

    x = np.arange(60, dtype=np.float64).reshape(10, 3, 2)
    np.save(tmp_path / "x.npy", x)
    rows = NpyRows(tmp_path / "x.npy")
    assert rows.shape == (10, 3, 2) and rows.dtype == np.float64 and len(rows) == 10 and rows.ndim == 3
    for key in (slice(0, 4), slice(7, 10), slice(8, 20), slice(3, 3), slice(None, None, 3), slice(-2, None)):
        got = rows[key]
        assert type(got) is np.ndarray and np.array_equal(got, x[key])
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-8])
    with pytest.raises(FeedError, match="cut.npy.*truncated"):
        list(iter_feeds(tmp_path / "cut.npy", one_input(["batch", 3, 2]), batch_size=4))


def test_folder_of_npy_samples_and_batches_in_name_order(tmp_path):
    # written out of order: name order, not creation order, decides
    np.save(tmp_path / "c.npy", np.full(3, 9.0))                               # one sample
    np.save(tmp_path / "a.npy", np.full(3, 1.0, np.float32))                  # one sample
    np.save(tmp_path / "b.npy", np.arange(12, dtype=np.float32).reshape(4, 3))  # a batch of 4
    (tmp_path / "labels.txt").write_text("0\n")  # other files are ignored
    graph = one_input(["batch", 3])
    batches = list(iter_feeds(tmp_path, graph, batch_size=4))
    assert sizes(batches) == [4, 2]
    expected = np.concatenate([np.full((1, 3), 1.0), np.arange(12).reshape(4, 3), np.full((1, 3), 9.0)])
    assert np.array_equal(np.concatenate([b["x"] for b in batches]), expected.astype(np.float32))
    assert count_samples(tmp_path, graph) == 6


def test_folder_is_streamed_a_bad_file_fails_only_when_reached(tmp_path):
    for i in range(2):
        np.save(tmp_path / f"{i}.npy", np.full((1, 3), i, np.float32))
    (tmp_path / "2.npy").write_bytes(b"\x93NUMPY garbage")
    feeds = iter_feeds(tmp_path, one_input(["batch", 3]), batch_size=1)
    assert next(feeds)["x"][0, 0] == 0 and next(feeds)["x"][0, 0] == 1  # read before 2.npy is opened
    with pytest.raises(FeedError, match=r"2\.npy: cannot read as \.npy"):
        next(feeds)


def test_folder_of_npz_feeds_a_two_input_model(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"s{i}.npz", x=np.full(3, i, np.float32), y=np.full(3, -i, np.float32))
    batches = list(iter_feeds(tmp_path, two_inputs(), batch_size=2))
    assert sizes(batches) == [2, 1] and batches[0]["y"][:, 0].tolist() == [0, -1]


# -- images ------------------------------------------------------------------------------------------

def gradient_image():
    """4 x 6 RGB pixels, every one different: (10i + j, 100 + 10i + j, 200 - 10i - j)."""
    i, j = np.mgrid[0:4, 0:6]
    return np.stack([10 * i + j, 100 + 10 * i + j, 200 - 10 * i - j], axis=-1)


MEAN, STD = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.5])


def test_center_crop_scale_mean_std_nchw_by_hand(tmp_path):
    pixels = gradient_image()
    save_png(tmp_path / "a.png", pixels)
    spec = Preprocess(crop=(2, 2), mean=tuple(MEAN), std=tuple(STD))
    (batch,) = iter_feeds(tmp_path, one_input(["batch", 3, 2, 2]), preprocess=spec)
    x = batch["x"]
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    # center crop of 4 x 6: rows 1..2, columns 2..3
    assert x[0, 0, 0, 0] == pytest.approx((12 / 255 - 0.5) / 0.2, rel=1e-6)
    expected = (pixels[1:3, 2:4] / 255 - MEAN) / STD
    np.testing.assert_allclose(x[0], expected.transpose(2, 0, 1), rtol=1e-6)


def test_nhwc_and_bgr(tmp_path):
    pixels = gradient_image()
    save_png(tmp_path / "a.png", pixels)
    spec = Preprocess(crop=(2, 2), mean=tuple(MEAN), std=tuple(STD), layout="NHWC", channels="BGR")
    (batch,) = iter_feeds(tmp_path, one_input(["batch", 2, 2, 3]), preprocess=spec)
    expected = (pixels[1:3, 2:4, ::-1] / 255 - MEAN) / STD  # mean/std apply in the BGR order given
    np.testing.assert_allclose(batch["x"][0], expected, rtol=1e-6)
    assert batch["x"][0, 0, 0, 0] == pytest.approx((188 / 255 - 0.5) / 0.2, rel=1e-6)  # blue first


def test_resize_is_height_then_width(tmp_path):
    save_png(tmp_path / "a.png", np.broadcast_to([51, 102, 153], (8, 8, 3)))
    (batch,) = iter_feeds(tmp_path, one_input(["batch", 3, 3, 5]), preprocess="size=3,5")
    assert batch["x"].shape == (1, 3, 3, 5)
    np.testing.assert_allclose(batch["x"][0, :, 1, 4], [0.2, 0.4, 0.6], rtol=1e-6)


def test_shorter_side_resize_keeps_aspect_then_crops_to_the_model(tmp_path):
    # 20 x 40 (h x w): four vertical stripes 10 wide. Shorter side 10 -> 10 x 20, stripes 5 wide;
    # the 10 x 10 center crop keeps the 2nd and 3rd stripes. A plain 10 x 10 resize would keep all four.
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]])
    save_png(tmp_path / "a.png", np.repeat(colours, 10, axis=0)[None].repeat(20, axis=0))
    (batch,) = iter_feeds(tmp_path, one_input(["batch", 3, 10, 10]), preprocess="resize_shorter=10")
    x = batch["x"][0]
    assert x.shape == (3, 10, 10)
    np.testing.assert_allclose(x[:, 5, 1], [0, 1, 0], atol=1e-6)  # green stripe
    np.testing.assert_allclose(x[:, 5, 8], [0, 0, 1], atol=1e-6)  # blue stripe


def test_a_preprocess_object_gets_the_model_size_when_it_sets_none(tmp_path):
    # the CLI passes Preprocess.parse(...) objects: unset geometry still comes from the model
    save_png(tmp_path / "a.png", np.repeat([[255, 0, 0], [0, 0, 255]], 10, axis=0)[None].repeat(10, axis=0))
    graph = one_input(["batch", 3, 4, 4])
    (batch,) = iter_feeds(tmp_path, graph, preprocess=Preprocess.parse("mean=0.5;std=0.5"))
    assert batch["x"].shape == (1, 3, 4, 4)  # 10 x 20 resized to 4 x 4
    np.testing.assert_allclose(batch["x"][0, :, 2, 0], [1, -1, -1], atol=1e-6)  # red, normalized to [-1, 1]
    (batch,) = iter_feeds(tmp_path, graph, preprocess=Preprocess(resize_shorter=5))
    assert batch["x"].shape == (1, 3, 4, 4)  # 5 x 10, then center-cropped to 4 x 4 (columns 3..6)
    np.testing.assert_allclose(batch["x"][0, :, 2, 0], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(batch["x"][0, :, 2, 3], [0, 0, 1], atol=1e-6)


def test_gray_models_get_one_channel_from_the_input_shape(tmp_path):
    save_png(tmp_path / "a.png", np.broadcast_to([60, 60, 60], (2, 2, 3)))  # gray in RGB: luma is exact
    (batch,) = iter_feeds(tmp_path, one_input(["batch", 1, 2, 2]))
    np.testing.assert_allclose(batch["x"], np.full((1, 1, 2, 2), 60 / 255), rtol=1e-6)
    (batch,) = iter_feeds(tmp_path, one_input(["batch", 2, 2]), preprocess="scale=1;mean=10;std=2")
    np.testing.assert_allclose(batch["x"], np.full((1, 2, 2), 25.0))


def test_images_are_batched_in_name_order_and_counted(tmp_path):
    for name, value in (("b.png", 20), ("a.bmp", 10), ("c.jpg", 30)):
        pil().fromarray(np.full((4, 4, 3), value, np.uint8)).save(tmp_path / name)
    graph = one_input(["batch", 3, 4, 4])
    batches = list(iter_feeds(tmp_path, graph, batch_size=2, preprocess="scale=1"))
    assert sizes(batches) == [2, 1]
    # JPEG is lossy on flat colour only by rounding: allow one level
    means = [sample.mean() for b in batches for sample in b["x"]]
    np.testing.assert_allclose(means, [10, 20, 30], atol=1)
    assert count_samples(tmp_path, graph) == 3


def test_preprocess_parse_forms_agree(tmp_path):
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    expected = Preprocess(size=(224, 224), layout="NHWC", **imagenet)
    compact = "size=224,224; mean=0.485,0.456,0.406; std=0.229,0.224,0.225; layout=nhwc"
    as_dict = {"size": [224, 224], "layout": "NHWC", **{k: list(v) for k, v in imagenet.items()}}
    (tmp_path / "pre.json").write_text(json.dumps(as_dict))
    assert Preprocess.parse(compact) == expected
    assert Preprocess.parse(as_dict) == expected
    assert Preprocess.parse(json.dumps(as_dict)) == expected
    assert Preprocess.parse(str(tmp_path / "pre.json")) == expected
    assert Preprocess.parse("size=224;scale=1/127.5").size == (224, 224)
    assert Preprocess.parse("scale=1/127.5").scale == pytest.approx(1 / 127.5)
    assert Preprocess.parse("crop=48x32").crop == (48, 32)


@pytest.mark.parametrize("spec, message", [
    ("sise=224", "unknown key.*sise"),
    ("size=224;resize_shorter=256", "either size or resize_shorter"),
    ("size=0", "size must be a positive integer"),
    ("layout=CHW", "layout 'CHW'"),
    ("mean=0.1,0.2", "mean has 2 values but the images have 3"),
    ("std=0", "std .* contains 0"),
    ("size", "no such file 'size'.*KEY=VALUE"),
    ("size=224;crop", "'crop' is not KEY=VALUE"),
    ("missing.json", "no such file 'missing.json'"),
    ("{not json", "not valid JSON"),
])
def test_bad_preprocess_specs(spec, message):
    with pytest.raises(RefquantError, match=message):
        Preprocess.parse(spec)


def test_defaults_follow_the_model_input():
    nchw = Preprocess.for_input(one_input(["batch", 3, 224, 224], name="input"), "input")
    assert (nchw.size, nchw.layout, nchw.channels) == ((224, 224), "NCHW", "RGB")
    assert (nchw.scale, nchw.mean, nchw.std) == (1 / 255, (0, 0, 0), (1, 1, 1))  # no ImageNet statistics
    nhwc = Preprocess.for_input(one_input([1, 96, 128, 3]), "x")
    assert (nhwc.size, nhwc.layout) == ((96, 128), "NHWC")
    assert Preprocess.for_input(one_input(["b", 3, "h", "w"]), "x").size is None
    assert Preprocess.for_input(one_input(["b", 25, 25]), "x").layout == "NHW"
    with pytest.raises(FeedError, match="no input 'y'"):
        Preprocess.for_input(one_input(["b", 3, 4, 4]), "y")


# -- errors ------------------------------------------------------------------------------------------

def test_wrong_shape_names_input_expected_got_and_source(tmp_path):
    graph = one_input(["batch", 3, 4, 4])
    expected = r"data array: input 'x' expects shape \[batch, 3, 4, 4\].*got shape \[2, 3, 4, 5\]"
    with pytest.raises(FeedError, match=expected):
        iter_feeds(np.zeros((2, 3, 4, 5), np.float32), graph)
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((1, 2, 3, 4, 4), np.float32))
    feeds = iter_feeds(tmp_path, graph, batch_size=1)
    assert next(feeds)["x"].shape == (1, 3, 4, 4)
    expected = r"b\.npy: input 'x' expects shape \[batch, 3, 4, 4\].*\[1, 2, 3, 4, 4\]"
    with pytest.raises(FeedError, match=expected):
        next(feeds)
    with pytest.raises(FeedError, match=r"data item 1: input 'x'.*got shape \[2, 3\]"):
        list(iter_feeds([np.zeros((2, 3, 4, 4)), np.zeros((2, 3))], graph))


def test_missing_input_names_it_and_the_source(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3)), z=np.zeros((2, 3)))
    with pytest.raises(FeedError, match=r"d\.npz: missing input\(s\) \['y'\].*\['x', 'z'\]"):
        iter_feeds(tmp_path / "d.npz", two_inputs())
    with pytest.raises(FeedError, match=r"data item 0: missing input\(s\) \['y'\]"):
        list(iter_feeds([{"x": np.zeros((1, 3))}], two_inputs()))


@pytest.mark.parametrize("make", ["empty folder", "empty list", "empty generator", "zero rows"])
def test_empty_data_is_an_error(tmp_path, make):
    graph = one_input(["batch", 3])
    data = {"empty folder": tmp_path, "empty list": [], "empty generator": (a for a in []),
            "zero rows": np.zeros((0, 3), np.float32)}[make]
    (tmp_path / "notes.md").write_text("not data")
    with pytest.raises(RefquantError, match="empty|no samples"):
        list(iter_feeds(data, graph))


@pytest.mark.parametrize("name, content, message", [
    ("bad.npy", b"not an array", r"bad\.npy: cannot read as \.npy"),
    ("bad.npz", b"not a zip", r"bad\.npz: cannot read as \.npz"),
    ("bad.png", b"\x89PNG\r\n\x1a\n truncated", r"bad\.png: cannot read as an image"),
    ("data.csv", b"1,2,3", r"data\.csv: unsupported data file type '\.csv'"),
])
def test_unreadable_files_are_named(tmp_path, name, content, message):
    if name.endswith(".png"):
        pil()
    (tmp_path / name).write_bytes(content)
    with pytest.raises(FeedError, match=message):
        list(iter_feeds(tmp_path / name, one_input(["batch", 3, 2, 2])))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FeedError, match="no such file or folder .*nowhere"):
        iter_feeds(tmp_path / "nowhere", one_input(["batch", 3]))
    assert count_samples(tmp_path / "nowhere", one_input(["batch", 3])) is None


def test_nan_in_data_is_refused_with_its_place():
    data = np.zeros((6, 3), np.float32)
    data[5, 1] = np.nan
    feeds = iter_feeds(data, one_input(["batch", 3]), batch_size=4)
    next(feeds)
    with pytest.raises(FeedError, match=r"samples 4:6: input 'x' has NaN or Inf \(first at index \[1, 1\]"):
        next(feeds)


def test_float_data_for_an_integer_input_is_refused():
    with pytest.raises(FeedError, match="input 'x' is int64, got float64"):
        iter_feeds(np.zeros((2, 3)), one_input(["batch", 3], elem=INT64))
    (batch,) = iter_feeds(np.arange(6, dtype=np.int32).reshape(2, 3), one_input(["batch", 3], elem=INT64))
    assert batch["x"].dtype == np.int64


def test_a_fixed_batch_axis_sets_the_batch_size():
    graph = one_input([2, 3])
    assert sizes(iter_feeds(np.zeros((4, 3), np.float32), graph, batch_size=16)) == [2, 2]
    with pytest.raises(FeedError, match="5 samples do not fill batches of 2"):
        iter_feeds(np.zeros((5, 3), np.float32), graph)


def test_image_problems_name_the_file(tmp_path):
    save_png(tmp_path / "a.png", np.zeros((8, 8, 3)))
    save_png(tmp_path / "b.png", np.zeros((8, 9, 3)))
    free = one_input(["batch", 3, "h", "w"])  # no size to resize to: images must agree in a batch
    differs = r"b\.png: input 'x' sample shape \[3, 8, 9\] differs from \[3, 8, 8\] of .*a\.png"
    with pytest.raises(FeedError, match=differs):
        list(iter_feeds(tmp_path, free, batch_size=2))
    with pytest.raises(FeedError, match=r"a\.png: image is 8x8 .* smaller than the crop 16x16"):
        list(iter_feeds(tmp_path, free, preprocess=Preprocess(crop=(16, 16))))
    expected = r"a\.png \(after preprocessing\): input 'x' expects shape \[batch, 1, 8, 8\]"
    with pytest.raises(FeedError, match=expected):
        list(iter_feeds(tmp_path, one_input(["batch", 1, 8, 8]), preprocess="channels=RGB"))
    with pytest.raises(FeedError, match="preprocessing applies to image files"):
        iter_feeds(np.zeros((1, 3, 8, 8), np.float32), free, preprocess="size=8")


# -- labels ------------------------------------------------------------------------------------------

def test_labels_from_txt_npy_npz(tmp_path):
    (tmp_path / "l.txt").write_text("# class ids\n3\n\n1  # a comment\n2\n")
    assert load_labels(tmp_path / "l.txt").tolist() == [3, 1, 2]
    np.save(tmp_path / "l.npy", np.array([[4.0], [5.0]]))  # integers stored as floats in a column
    labels = load_labels(tmp_path / "l.npy")
    assert labels.tolist() == [4, 5] and labels.dtype == np.int64
    np.savez(tmp_path / "l.npz", images=np.zeros((2, 3)), labels=np.array([7, 8], np.uint8))
    assert load_labels(tmp_path / "l.npz").tolist() == [7, 8]


def test_bad_labels_are_named(tmp_path):
    (tmp_path / "l.txt").write_text("1\ncat\n")
    with pytest.raises(FeedError, match=r"l\.txt:2: expected one integer label per line, got 'cat'"):
        load_labels(tmp_path / "l.txt")
    np.save(tmp_path / "f.npy", np.array([0.5, 1.0]))
    with pytest.raises(FeedError, match=r"f\.npy: labels must be integers"):
        load_labels(tmp_path / "f.npy")
    with pytest.raises(FeedError, match="no such file"):
        load_labels(tmp_path / "none.npy")


# -- real data ---------------------------------------------------------------------------------------

def test_real_photos_to_224_nchw(tmp_path):
    pil()
    data = shared_data()
    for name in ("chelsea.png", "coffee.png", "astronaut.png"):
        shutil.copy(data / name, tmp_path / name)
    graph = one_input(["batch", 3, 224, 224], name="input")
    batches = list(iter_feeds(tmp_path, graph, batch_size=2))
    assert sizes(batches, "input") == [2, 1]
    for batch in batches:
        x = batch["input"]
        assert x.shape[1:] == (3, 224, 224) and x.dtype == np.float32
        assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.1  # [0, 1] pixels of a real photo

    imagenet = "resize_shorter=256;mean=0.485,0.456,0.406;std=0.229,0.224,0.225"
    x = np.concatenate([b["input"] for b in iter_feeds(tmp_path, graph, preprocess=imagenet)])
    assert x.shape == (3, 3, 224, 224)
    assert x.min() >= (0 - 0.485) / 0.229 - 1e-5 and x.max() <= (1 - 0.406) / 0.225 + 1e-5
    assert abs(x.mean()) < 1  # roughly centred, as ImageNet statistics make photos


def test_real_photos_are_classified_by_mobilenet(tmp_path):
    # end to end: wrong channel order, layout, crop or normalization would change these classes
    model = zoo.shared_dir() / "models" / "mobilenet_v2_imagenet.onnx"
    if not model.is_file():
        pytest.skip(f"{model} not found (set REFQUANT_SHARED)")
    pil()
    data = shared_data()
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(data / name, tmp_path / name)
    graph = refquant.load(model)
    imagenet = "resize_shorter=256;mean=0.485,0.456,0.406;std=0.229,0.224,0.225"
    (batch,) = iter_feeds(tmp_path, graph, preprocess=imagenet)
    logits = refquant.Session(graph).run(batch)["logits"]
    assert logits.argmax(axis=1).tolist() == [285, 967]  # Egyptian cat, espresso


def test_lfw_faces_as_an_npy_source():
    path = shared_data() / "lfw_subset.npy"
    if not path.is_file():
        pytest.skip(f"missing external resource: {path}")
    graph = one_input(["batch", 25, 25])
    assert count_samples(path, graph) == 200
    batches = list(iter_feeds(path, graph, batch_size=64))
    assert sizes(batches) == [64, 64, 64, 8] and batches[0]["x"].dtype == np.float32
    assert np.array_equal(np.concatenate([b["x"] for b in batches]), np.load(path).astype(np.float32))
    with pytest.raises(FeedError, match=r"lfw_subset\.npy: input 'x' expects shape \[batch, 1, 25, 25\]"):
        iter_feeds(path, one_input(["batch", 1, 25, 25]))
