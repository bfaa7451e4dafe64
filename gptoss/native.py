"""Small C kernels (gptoss/csrc) compiled with the system's C compiler on first use, cached under
$GPTOSS_CACHE_DIR/kernels and loaded with ctypes.

A library is keyed by its source, compiler, flags and CPU (-march=native code must not travel to
another CPU through a shared cache). Its OpenMP runtime is the libgomp.so.1 that torch already loaded,
so kernels and torch share one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from gptoss import env

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# Flag sets tried in order: the first that compiles is used.
FLAG_SETS = (("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"),
             ("-O3", "-fPIC", "-shared", "-fopenmp"),
             ("-O3", "-fPIC", "-shared"))


def _cpu_signature() -> str:
    """What -march=native depends on: a cache shared by different machines must not mix builds."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    return compiler


def _compile(compiler: str, source: Path, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(built, target)  # atomic: concurrent builders each leave a whole library


def build(source: Path, flags: tuple[str, ...]) -> ctypes.CDLL:
    """`source` compiled with `flags` (cached by source, compiler, flags and CPU), loaded."""
    compiler = _compiler()
    key = hashlib.sha256(b"\0".join([source.read_bytes(), compiler.encode(), " ".join(flags).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = env.cache_root() / "kernels" / f"{source.stem}-{key}.so"
    if not target.exists():
        _compile(compiler, source, flags, target)
    return ctypes.CDLL(str(target))


def load(source: Path, declare: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL, tuple[str, ...]]:
    """`source` built with the first flag set that compiles, its entry points typed by `declare`;
    with the flags used. Raises RuntimeError naming every failure where none does."""
    errors = []
    for flags in FLAG_SETS:
        try:
            lib = build(source, flags)
        except (OSError, subprocess.SubprocessError) as e:
            detail = (getattr(e, "stderr", None) or str(e)).strip()
            errors.append(f"[{' '.join(flags)}] {detail.splitlines()[-1] if detail else type(e).__name__}")
            continue
        declare(lib)
        return lib, flags
    raise RuntimeError(f"could not build {source.name}: " + "; ".join(errors))


class Kernel:
    """One C source, built and loaded on first use (thread-safe); where it cannot be built, `library()`
    is None after a single warning that ends with `fallback` (what callers do instead)."""

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], None], fallback: str):
        self.source, self.declare, self.fallback = source, declare, fallback
        self.failure: str | None = None
        self._library: ctypes.CDLL | None = None
        self._lock = threading.Lock()

    def library(self) -> ctypes.CDLL | None:
        if self._library is not None or self.failure is not None:
            return self._library
        with self._lock:
            if self._library is None and self.failure is None:
                try:
                    self._library, flags = load(self.source, self.declare)
                    logger.info("%s built with %s", self.source.name, " ".join(flags))
                except RuntimeError as e:
                    self.failure = str(e)
                    logger.warning("%s; %s", self.failure, self.fallback)
        return self._library
