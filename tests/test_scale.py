"""Scale-out (refquant.scale): calibration shards, sweeps and searches on a real Dask LocalCluster.

The reference for every distributed result is the same computation run serially in this process
(the default path): results must be identical (np.array_equal / ==), not close. The cluster is a
LocalCluster of 2 worker processes (nannies restart a killed worker); tests that need Dask are skipped
only when `dask.distributed` is not importable (the `refquant[dask]` extra, installed by `.[test]`).
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.analysis import analyze
from refquant.analysis.amp import mixed_precision
from refquant.data import iter_feeds
from refquant.errors import RefquantError
from refquant.quant import QuantSim
from refquant.scale import Shards, open_executor, split

from .helpers import FLOAT, make_model

try:
    import dask  # noqa: F401
    import distributed  # noqa: F401

    HAVE_DASK = True
except ImportError:  # the optional extra is absent
    HAVE_DASK = False
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="dask.distributed is not installed (pip install refquant[dask])")

SCHEMES = ["min_max", "tf_enhanced", "percentile", "mse", "entropy"]


def tiny_graph(hw: int = 12, width: int = 8):
    """Conv-Relu-Conv + residual Add, global pool, Gemm: 6 activation quantizers, 3 weighted layers."""
    rng = np.random.default_rng(0)
    c = width
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "c1"], ["a"]),
             helper.make_node("GlobalAveragePool", ["a"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1)]
    inits = {"w1": rng.normal(0, .3, (c, 3, 3, 3)), "b1": rng.normal(0, .1, c),
             "w2": rng.normal(0, .2, (c, c, 3, 3)), "b2": rng.normal(0, .1, c),
             "w3": rng.normal(0, .3, (5, c)), "b3": rng.normal(0, .1, 5)}
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    return refquant.load(make_model(nodes, [("x", FLOAT, ["N", 3, hw, hw])], [("y", FLOAT, ["N", 5])], inits))


def samples(n=96, seed=1):
    x = np.random.default_rng(seed).normal(0, 1, (n, 3, 12, 12)).astype(np.float32)
    x[n // 2 + 3] *= 4.0  # a wider batch in the second half: later shards see a different range
    return x


def encodings(sim):
    out = {}
    for name, q in sim.quantizers.items():
        e = sim.encoding_of(name)
        out[name] = None if e is None or e.kind != "int" else (np.asarray(e.scale), np.asarray(e.offset))
    return out


def assert_same_encodings(a, b):
    ea, eb = encodings(a), encodings(b)
    assert ea.keys() == eb.keys()
    differ = [n for n in ea if (ea[n] is None) != (eb[n] is None) or (
        ea[n] is not None and not (np.array_equal(ea[n][0], eb[n][0]) and np.array_equal(ea[n][1], eb[n][1])))]
    assert not differ, f"encodings differ from the one-process calibration on {differ}"


# ------------------------------------------------------------------------------ without a cluster
def test_no_scheduler_and_no_workers_means_serial():
    with open_executor() as executor:
        assert executor is None


def test_scheduler_and_workers_together_are_refused():
    with pytest.raises(RefquantError, match="either"):
        with open_executor(scheduler="tcp://127.0.0.1:1", workers=2):
            pass


def _batches_of(shards, graph, batch_size):
    return [b for s in shards for b in s.batches(graph, batch_size)]


@pytest.mark.parametrize("kind", ["npy", "npz", "array", "images"])
def test_shards_are_the_one_process_batches_in_order(tmp_path, kind):
    """Shards start on batch boundaries, so their batches, concatenated, are iter_feeds' batches."""
    graph = tiny_graph()
    x = samples(45)  # 45 = 5 full batches of 8 and a short one
    if kind == "npy":
        np.save(tmp_path / "x.npy", x)
        data = str(tmp_path / "x.npy")
    elif kind == "npz":
        np.savez(tmp_path / "x.npz", x=x)
        data = str(tmp_path / "x.npz")
    elif kind == "array":
        data = x
    else:
        from PIL import Image

        pixels = np.random.default_rng(2).integers(0, 256, (13, 12, 12, 3), dtype=np.uint8)
        for i, p in enumerate(pixels):
            Image.fromarray(p).save(tmp_path / f"im{i:03d}.png")
        data = str(tmp_path)
    whole = list(iter_feeds(data, graph, batch_size=8))
    for n in (1, 2, 3, 7):
        shards = split(data, graph, 8, None, n)
        assert len(shards) == min(n, len(whole))
        got = _batches_of(shards, graph, 8)
        assert len(got) == len(whole)
        assert all(np.array_equal(g["x"], w["x"]) for g, w in zip(got, whole))
        if kind != "array":  # a worker reads its shard itself: the shard is a name and a range
            assert all(len(pickle.dumps(s)) < 2000 for s in shards)


@pytest.mark.parametrize("scheme", ["tf_enhanced", "entropy"])
def test_a_thread_pool_fits_the_calibration_seam(tmp_path, scheme):
    """Threads share objects: every shard must still fill observers of its own."""
    from concurrent.futures import ThreadPoolExecutor

    np.save(tmp_path / "x.npy", samples(48))
    serial = QuantSim(tiny_graph(), quant_scheme=scheme)
    serial.compute_encodings(str(tmp_path / "x.npy"), batch_size=8, progress=False)
    threaded = QuantSim(tiny_graph(), quant_scheme=scheme)
    with ThreadPoolExecutor(3) as pool:
        threaded.compute_encodings(str(tmp_path / "x.npy"), batch_size=8, progress=False, executor=pool, shards=3)
    assert_same_encodings(serial, threaded)


def test_a_process_pool_fits_the_calibration_seam(tmp_path):
    """No Dask: a plain ProcessPoolExecutor (spawned processes) calibrates 3 shards of a .npy file."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    np.save(tmp_path / "x.npy", samples(40))
    serial = QuantSim(tiny_graph())
    serial.compute_encodings(str(tmp_path / "x.npy"), batch_size=8, progress=False)
    pooled = QuantSim(tiny_graph())
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pooled.compute_encodings(str(tmp_path / "x.npy"), batch_size=8, progress=False, executor=pool, shards=3)
    assert_same_encodings(serial, pooled)


# ------------------------------------------------------------------------------ the cluster
@pytest.fixture(scope="module")
def executor():
    if not HAVE_DASK:
        pytest.skip("missing package dask.distributed (the test extra installs it; pip install refquant[dask])")
    import dask.config

    from refquant.scale.cluster import local_cluster

    # one death per task is retried, a second one gives up: keeps the "all workers die" test short
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        ex = local_cluster(2, threads_per_worker=1, lost_timeout=30)
    yield ex
    ex.shutdown()


@pytest.fixture
def ex(executor):
    executor.client.wait_for_workers(2, timeout=60)
    return executor


@needs_dask
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sharded_calibration_equals_one_process(ex, tmp_path, scheme):
    """2 shards read from a .npy file on 2 workers, merged == one process, for every scheme (the second
    shard holds a batch 4x wider than the first batch, so its histograms must grow)."""
    np.save(tmp_path / "x.npy", samples())
    serial = QuantSim(tiny_graph(), quant_scheme=scheme)
    serial.compute_encodings(str(tmp_path / "x.npy"), batch_size=8, progress=False)
    sharded = QuantSim(tiny_graph(), quant_scheme=scheme)
    before = len(ex.task_bytes)
    sharded.compute_encodings(str(tmp_path / "x.npy"), batch_size=8, progress=False, executor=ex)
    assert len(ex.task_bytes) - before == 3  # the first batch alone (the anchors), then one shard per worker
    assert_same_encodings(serial, sharded)


@needs_dask
def test_model_goes_once_per_worker_not_with_every_task(ex, tmp_path):
    """Tasks carry keys for the model and its quantized weights, and a file name and range for the data:
    each pickled task is far smaller than the weights, which sit in every worker's store."""
    np.save(tmp_path / "x.npy", samples(32))
    graph = tiny_graph(width=64)
    weights = sum(a.nbytes for a in graph.initializers.values())
    assert weights > 150_000
    sim = QuantSim(graph)
    before = len(ex.task_bytes)
    sim.compute_encodings(str(tmp_path / "x.npy"), batch_size=8, progress=False, executor=ex, shards=4)
    sizes = ex.task_bytes[before:]
    assert len(sizes) == 5 and max(sizes) < 20_000  # first batch + 4 shards
    from refquant.scale import cluster

    stored = ex.client.run(lambda: sum(type(v).__name__ == "Graph" for v in cluster._STORE.values()))
    assert len(stored) == 2 and all(count >= 1 for count in stored.values())


@needs_dask
def test_calibration_from_a_dask_array_and_a_dask_bag(ex, tmp_path):
    import dask
    import dask.array as da
    import dask.bag as db
    from PIL import Image

    x = samples(40)
    for i in range(4):  # the dask array loads its chunks from files on the workers
        np.save(tmp_path / f"part{i}.npy", x[i * 10:(i + 1) * 10])
    parts = [da.from_delayed(dask.delayed(np.load)(str(tmp_path / f"part{i}.npy")), (10, 3, 12, 12), np.float32)
             for i in range(4)]
    serial = QuantSim(tiny_graph())
    serial.compute_encodings(x, batch_size=8, progress=False)
    sharded = QuantSim(tiny_graph())
    sharded.compute_encodings(da.concatenate(parts), batch_size=8, progress=False, executor=ex)
    assert_same_encodings(serial, sharded)

    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, (20, 12, 12, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"im{i:03d}.png")
    serial = QuantSim(tiny_graph())
    serial.compute_encodings(str(folder), batch_size=4, progress=False)
    sharded = QuantSim(tiny_graph())
    files = db.from_sequence(sorted(str(p) for p in folder.iterdir()), npartitions=3)
    sharded.compute_encodings(files, batch_size=4, progress=False, executor=ex)
    assert_same_encodings(serial, sharded)


def _calibrated(n=48):
    sim = QuantSim(tiny_graph())
    sim.compute_encodings(samples(n), batch_size=8, progress=False)
    return sim


def _same_report(a, b):
    assert (a.quantized, a.weights_only, a.activations_only) == (b.quantized, b.weights_only, b.activations_only)
    assert [(l.name, l.only, l.all_but, l.weights_alone_db) for l in a.layers] == \
        [(l.name, l.only, l.all_but, l.weights_alone_db) for l in b.layers]
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert (t.sqnr_db, t.min, t.max, t.hist_counts) == (u.sqnr_db, u.min, u.max, u.hist_counts), name


@needs_dask
def test_sensitivity_sweep_on_dask_equals_serial(ex):
    sim = _calibrated()
    data = samples(48, seed=7)
    serial = analyze(sim, data, batch_size=8, progress=False)
    distributed_ = analyze(sim, data, batch_size=8, progress=False, executor=ex)
    _same_report(serial, distributed_)
    plain = ex.client.get_executor()  # Dask's own concurrent.futures executor fits the seam too
    _same_report(serial, analyze(sim, data, batch_size=8, progress=False, executor=plain))


@needs_dask
def test_mixed_precision_on_dask_equals_serial(ex):
    data = samples(32, seed=9)
    a, b = _calibrated(), _calibrated()
    serial = mixed_precision(a, data, candidates=["w4a8", "w8a8", "w8a16"], batch_size=8, progress=False)
    dist = mixed_precision(b, data, candidates=["w4a8", "w8a8", "w8a16"], batch_size=8, progress=False, executor=ex)
    assert [(p.step, p.cost, p.metric, p.group, p.candidate) for p in serial.path] == \
        [(p.step, p.cost, p.metric, p.group, p.candidate) for p in dist.path]
    assert serial.assignment == dist.assignment and serial.final_metric == dist.final_metric
    assert [g["sensitivity"] for g in serial.groups] == [g["sensitivity"] for g in dist.groups]


class KillOnce:
    """An eval_fn that kills the worker process running it the first time any process calls it
    (a marker file decides), and otherwise scores the outputs' mean; each completed evaluation appends
    one line to a log."""

    def __init__(self, folder: Path, data):
        self.marker, self.log, self.data = str(folder / "killed"), str(folder / "log"), data
        self.__name__ = "kill_once"

    def __call__(self, run):
        value = float(np.mean(run({"x": self.data})["y"]))
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(self.log, "a") as f:
                f.write(f"{value!r}\n")
            return value
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)  # mid-task: the worker dies before returning
        return value


@needs_dask
def test_killed_worker_mid_sweep_is_retried_and_nothing_counts_twice(ex, tmp_path):
    sim = _calibrated()
    data = samples(16, seed=11)
    reference_dir = tmp_path / "serial"
    reference_dir.mkdir()
    (reference_dir / "killed").write_text("")  # the serial run must not kill the test process
    serial = analyze(sim, data, eval_fn=KillOnce(reference_dir, data), batch_size=8, progress=False)
    folder = tmp_path / "dask"
    folder.mkdir()
    pids = set(ex.client.run(os.getpid).values())
    dist = analyze(sim, data, eval_fn=KillOnce(folder, data), batch_size=8, progress=False, executor=ex)
    assert (folder / "killed").exists()  # a worker did die mid-task...
    ex.client.wait_for_workers(2, timeout=60)
    assert set(ex.client.run(os.getpid).values()) != pids  # ...and a new one replaced it
    assert [(l.name, l.only, l.all_but) for l in serial.layers] == [(l.name, l.only, l.all_but) for l in dist.layers]
    evaluations = serial.settings["evaluations"]
    assert len((folder / "log").read_text().splitlines()) == evaluations  # each evaluation finished once
    assert len((reference_dir / "log").read_text().splitlines()) == evaluations


class _SettledFuture:
    """What a Dask future looks like to DaskExecutor's done callback: its status and what exception() (which waits
    while the task is recomputed) and result() then return."""

    key = "refquant-task"

    def __init__(self, status, error=None, value=None):
        self.status, self.error, self.value = status, error, value

    def exception(self):
        return self.error

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


@needs_dask
@pytest.mark.parametrize("status, error, value", [("finished", None, 42), ("lost", None, 42),
                                                  ("error", ValueError("bad"), None)])
def test_a_task_lost_with_its_worker_and_recomputed_gives_its_value(status, error, value):
    """The done callback also fires when a finished task's result dies with its worker ("lost"): the value
    after Dask's recomputation is the result; it used to be settled as None (seen as a None batch result in
    test_worker_killed_from_outside_mid_sweep, once in a full run)."""
    from concurrent.futures import Future as CFuture
    from types import SimpleNamespace

    from refquant.scale.cluster import DaskExecutor

    result, future = CFuture(), _SettledFuture(status, error, value)
    owner = SimpleNamespace(_lock=threading.Lock(), _pending={result: future})
    DaskExecutor._settle(owner, future, result)
    assert owner._pending == {}
    if error is None:
        assert result.result(timeout=0) == 42
    else:
        assert result.exception(timeout=0) is error


@needs_dask
def test_worker_killed_from_outside_mid_sweep(ex):
    """SIGKILL a worker while it runs a batch task of the default (SQNR) sweep: same report as serial."""
    sim = _calibrated()
    data = samples(160, seed=13)
    serial = analyze(sim, data, batch_size=8, progress=False)
    victim = {}

    def kill_when_busy():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not victim:
            busy = [w for w, keys in ex.client.processing().items() if keys]
            if busy:
                pid = ex.client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                victim["pid"] = pid
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    dist = analyze(sim, data, batch_size=8, progress=False, executor=ex)
    killer.join()
    assert victim, "no worker was busy: the sweep finished before the kill"
    _same_report(serial, dist)


class KillAlways:
    """A calibration data source that kills the worker reading it, every time."""

    def __call__(self):
        os.kill(os.getpid(), signal.SIGKILL)


@needs_dask
def test_all_workers_dying_stops_with_an_error_and_leaves_the_sim_unchanged(ex):
    sim = _calibrated()
    before = encodings(sim)
    x = samples(8)
    reference = sim.run({"x": x})["y"]
    with pytest.raises(RefquantError, match="died"):
        sim.compute_encodings(Shards([x, KillAlways()]), batch_size=8, progress=False, executor=ex)
    after = encodings(sim)
    assert all((before[n] is None and after[n] is None) or (np.array_equal(before[n][0], after[n][0]) and
               np.array_equal(before[n][1], after[n][1])) for n in before)
    assert np.array_equal(sim.run({"x": x})["y"], reference)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_dask
def test_a_scheduler_that_does_not_answer_is_a_clear_error_within_the_timeout():
    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(RefquantError, match=f"127.0.0.1:{port}.*did not answer within 2 s"):
        with open_executor(scheduler=f"tcp://127.0.0.1:{port}", timeout=2):
            pass
    assert time.monotonic() - t0 < 10  # 2 s timeout + Dask's connection retry back-off


# ------------------------------------------------------------------------------ command line
def _write_model(tmp_path):
    import onnx

    from refquant.onnx_io import to_onnx

    path = tmp_path / "tiny.onnx"
    onnx.save(to_onnx(tiny_graph()), path)
    return path


@needs_dask
def test_cli_quantize_on_a_scheduler_writes_the_serial_encodings(ex, tmp_path, capsys):
    from refquant.cli import main

    model = _write_model(tmp_path)
    np.save(tmp_path / "x.npy", samples(40))
    common = ["quantize", str(model), "--data", str(tmp_path / "x.npy"), "--batch-size", "8"]
    assert main(common + ["-o", str(tmp_path / "serial")]) == 0
    assert main(common + ["-o", str(tmp_path / "dask"), "--scheduler", ex.client.scheduler.address]) == 0
    serial = (tmp_path / "serial" / "tiny.encodings").read_text()
    assert (tmp_path / "dask" / "tiny.encodings").read_text() == serial


@needs_dask
@pytest.mark.parametrize("command", [["quantize"], ["analyze"], ["amp"], ["autoquant", "--target", "30"]])
def test_cli_with_a_dead_scheduler_fails_in_one_line(tmp_path, capsys, command):
    from refquant.cli import main

    model = _write_model(tmp_path)
    np.save(tmp_path / "x.npy", samples(8))
    port = _closed_port()
    code = main([command[0], str(model), "--data", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"),
                 *command[1:], "--scheduler", f"127.0.0.1:{port}", "--scheduler-timeout", "1"])
    err = capsys.readouterr().err
    assert code != 0 and f"127.0.0.1:{port}" in err and "did not answer" in err and len(err.strip().splitlines()) == 1


@needs_dask
def test_a_cluster_left_without_workers_stops_the_run_and_leaves_the_sim_unchanged():
    """No worker at all (all gone, none coming back): after lost_timeout the run fails, sim untouched."""
    from distributed import Client, LocalCluster

    from refquant.scale.cluster import DaskExecutor

    cluster = LocalCluster(n_workers=1, processes=False, dashboard_address=":0")
    executor = DaskExecutor(Client(cluster, set_as_default=False), cluster=cluster, lost_timeout=1.0)
    try:
        cluster.scale(0)
        deadline = time.monotonic() + 30
        while executor.client.nthreads() and time.monotonic() < deadline:
            time.sleep(0.1)
        sim = _calibrated()
        before = encodings(sim)
        t0 = time.monotonic()
        with pytest.raises(RefquantError, match="no worker"):
            sim.compute_encodings(samples(16), batch_size=8, progress=False, executor=executor, shards=2)
        assert time.monotonic() - t0 < 15  # lost_timeout 1 s + the watchdog's polling
        after = encodings(sim)
        assert all((before[n] is None and after[n] is None) or (np.array_equal(before[n][0], after[n][0]) and
                   np.array_equal(before[n][1], after[n][1])) for n in before)
    finally:
        executor.shutdown()


def test_a_non_finite_sample_is_named_by_serial_and_sharded_calibration(tmp_path):
    """48 samples in batches of 8; sample 21 is finite but so large (3e38) that the convs overflow to inf: serial
    calibration names sample 21 and batch 2 (its third batch); 3 shards of 16 put it in shard 1, batch 0 of the
    shard (samples 16-23). (A NaN in the data itself is refused earlier, by the data reader.)"""
    from concurrent.futures import ThreadPoolExecutor

    from refquant.quant.quantsim import CalibrationError

    x = samples(48)
    x[21] = 3e38
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(CalibrationError, match=r"non-finite value .* in calibration sample 21 \(batch 2\)"):
        QuantSim(tiny_graph()).compute_encodings(str(tmp_path / "x.npy"), batch_size=8, progress=False)
    with ThreadPoolExecutor(3) as pool, pytest.raises(
            CalibrationError, match=r"calibration sample 21 \(shard 1, batch 0 of the shard\)"):
        QuantSim(tiny_graph()).compute_encodings(str(tmp_path / "x.npy"), batch_size=8, progress=False,
                                                 executor=pool, shards=3)
