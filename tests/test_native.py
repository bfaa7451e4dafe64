"""The kernel cache holds code this process runs: private, and nothing in it or in a prebuilt folder is
loaded unless only its owner (this user, or root for an image's prebuilt kernels) could have written it."""

from __future__ import annotations

import ctypes
import logging
import os
import stat

import pytest

from gptoss import native

SOURCE = native.CSRC / "greedy_screen.c"
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")
OTHER_UID = 54321


def declare(lib: ctypes.CDLL) -> None:
    lib.greedy_screen_prepare  # noqa: B018 - an entry point the real library has


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GPTOSS_KERNELS_DIR", raising=False)
    monkeypatch.setattr(native, "_private_dir", None)
    return tmp_path / "cache" / "kernels"


def plant(path, mode: int = 0o755, uid: int | None = None) -> None:
    """A file that is not a library at all: loading it would fail loudly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a shared library")
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, -1)


def test_the_cache_folder_is_created_private(cache):
    native.build(SOURCE, FLAGS)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    [library] = cache.glob("*.so")
    assert library.stat().st_uid == os.getuid() and not library.stat().st_mode & 0o022


@pytest.mark.parametrize("mode, uid", [(0o777, None), (0o755, OTHER_UID)], ids=["writable-by-others", "another-owner"])
def test_a_planted_library_is_refused_with_a_log_line_and_built_again(cache, caplog, mode, uid):
    if uid is not None and os.getuid() != 0:
        pytest.skip("planting a file of another owner needs root")
    target = native.cached_library_path(SOURCE, FLAGS)
    plant(target, mode, uid)
    with caplog.at_level(logging.WARNING, logger="gptoss.native"):
        lib = native.build(SOURCE, FLAGS)
    declare(lib)
    assert any("refusing to load" in r.message for r in caplog.records)
    assert target.read_bytes()[:4] == b"\x7fELF" and target.stat().st_uid == os.getuid()


def test_a_cache_folder_others_can_write_is_not_used(cache, caplog):
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    with caplog.at_level(logging.WARNING, logger="gptoss.native"):
        native.build(SOURCE, FLAGS)
    assert any("refusing the kernel cache" in r.message for r in caplog.records)
    assert not list(cache.glob("*.so"))  # built in a private folder of this process instead


def test_a_prebuilt_library_anyone_could_replace_is_not_loaded(cache, tmp_path, monkeypatch, caplog):
    prebuilt = tmp_path / "prebuilt"
    native.prebuild([SOURCE], prebuilt)
    monkeypatch.setenv("GPTOSS_KERNELS_DIR", str(prebuilt))
    lib, origin = native.load(SOURCE, declare)
    assert origin == f"prebuilt {native.cpu_levels()[0]}"
    for library in prebuilt.glob("*.so"):
        os.chmod(library, 0o777)
    with caplog.at_level(logging.WARNING, logger="gptoss.native"):
        _, origin = native.load(SOURCE, declare)
    assert origin.startswith("compiled") and any("refusing the prebuilt kernel" in r.message for r in caplog.records)


def test_prebuilt_libraries_of_another_source_version_are_ignored(cache, tmp_path, monkeypatch):
    prebuilt = tmp_path / "prebuilt"
    native.prebuild([SOURCE], prebuilt)
    manifest = (prebuilt / native.MANIFEST).read_text().replace(native.hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
                                                                "0" * 64)
    (prebuilt / native.MANIFEST).write_text(manifest)
    monkeypatch.setenv("GPTOSS_KERNELS_DIR", str(prebuilt))
    assert native.prebuilt(SOURCE) is None
