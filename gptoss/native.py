"""Small C kernels (gptoss/csrc, engine/csrc) loaded with ctypes: prebuilt for the image, or compiled
with the system's C compiler on first use and cached under $GPTOSS_CACHE_DIR/kernels.

- Prebuilt (`prebuild`, run when an image is built: deploy/Dockerfile): one library per kernel and
  x86-64 level (v2 plain C, v3 AVX2 + FMA, v4 AVX-512) in $GPTOSS_KERNELS_DIR with a manifest of the
  sources they were built from; a process loads the best level its CPU runs. Ray's CPU image has no
  compiler, so without these the kernels would fall back to torch there.
- Compiled here: keyed by source, compiler, flags and CPU (-march=native code must not travel to
  another CPU through a shared cache).

A library is a file this process will execute, so the cache directory is created private (0700) and a
library is loaded only when it and its directory belong to this user (or root, for prebuilt ones) and
nobody else can write them; otherwise it is refused with a log line, and a private directory of this
process is used instead. Each library's OpenMP runtime is the libgomp.so.1 that torch already loaded,
so kernels and torch share one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from gptoss import env

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# Flag sets tried in order when compiling here: the first that compiles is used.
FLAG_SETS = (("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"),
             ("-O3", "-fPIC", "-shared", "-fopenmp"),
             ("-O3", "-fPIC", "-shared"))
# Portable builds for an image, best first: (level, what a CPU needs from /proc/cpuinfo, -march).
X86_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}, "x86-64-v4"),
    ("x86-64-v3", {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}, "x86-64-v3"),
    ("x86-64-v2", {"sse4_2", "ssse3", "popcnt"}, "x86-64-v2"),
)
MANIFEST = "manifest.json"


class UntrustedFileError(OSError):
    """A library or directory that someone else could have written: it is not loaded."""


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_signature() -> str:
    """What -march=native depends on: a cache shared by different machines must not mix builds."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def portable_levels() -> list[tuple[str, tuple[str, ...]]]:
    """(level, extra flags) of the portable builds for this architecture, best first."""
    if platform.machine() in ("x86_64", "AMD64"):
        return [(level, (f"-march={march}",)) for level, _, march in X86_LEVELS]
    return [("generic", ())]


def cpu_levels() -> list[str]:
    """The portable levels this CPU runs, best first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["generic"]
    flags = _cpu_flags()
    return [level for level, needs, _ in X86_LEVELS if needs <= flags]


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    return compiler


def _check_trusted(path: Path, owners: tuple[int, ...]) -> None:
    """Raises UntrustedFileError unless `path` belongs to one of `owners` and only its owner may write it."""
    info = path.stat()
    if info.st_uid not in owners:
        raise UntrustedFileError(f"{path} belongs to uid {info.st_uid}, not to this user ({os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedFileError(f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o})")


_private_lock = threading.Lock()
_private_dir: Path | None = None


def kernel_cache_dir() -> Path:
    """$GPTOSS_CACHE_DIR/kernels, created 0700; when it exists but is not this user's alone, a private
    temporary directory of this process (logged once)."""
    global _private_dir
    path = env.cache_root() / "kernels"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_trusted(path, (os.getuid(),))
        return path
    except OSError as e:
        with _private_lock:
            if _private_dir is None:
                _private_dir = Path(tempfile.mkdtemp(prefix="gptoss-kernels-"))
                logger.warning("refusing the kernel cache %s (%s); building in %s", path, e, _private_dir)
        return _private_dir


def _compile(compiler: str, source: Path, flags: tuple[str, ...], target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.chmod(built, 0o755)
        os.replace(built, target)  # atomic: concurrent builders each leave a whole library


def cached_library_path(source: Path, flags: tuple[str, ...]) -> Path:
    """Where `build` keeps `source` compiled with `flags` by this compiler for this CPU."""
    key = hashlib.sha256(b"\0".join([source.read_bytes(), _compiler().encode(), " ".join(flags).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    return kernel_cache_dir() / f"{source.stem}-{key}.so"


def build(source: Path, flags: tuple[str, ...]) -> ctypes.CDLL:
    """`source` compiled with `flags` (cached by source, compiler, flags and CPU), loaded."""
    compiler = _compiler()
    target = cached_library_path(source, flags)
    if target.exists():
        try:
            _check_trusted(target, (os.getuid(),))
        except UntrustedFileError as e:
            logger.warning("refusing to load %s; building it again", e)
            target.unlink()
    if not target.exists():
        _compile(compiler, source, flags, target)
    return ctypes.CDLL(str(target))


def prebuilt(source: Path) -> tuple[ctypes.CDLL, str] | None:
    """The best prebuilt library of `source` for this CPU from $GPTOSS_KERNELS_DIR, with its level; None
    where there is none for this source (or it was built from another version of the source)."""
    folder = env.prebuilt_kernels_dir()
    if folder is None or not (folder / MANIFEST).is_file():
        return None
    owners = (0, os.getuid())
    try:
        _check_trusted(folder, owners)
        _check_trusted(folder / MANIFEST, owners)
        entry = json.loads((folder / MANIFEST).read_text()).get(source.stem)
    except (OSError, ValueError) as e:
        logger.warning("refusing the prebuilt kernels in %s: %s", folder, e)
        return None
    if not entry or entry.get("source_sha256") != hashlib.sha256(source.read_bytes()).hexdigest():
        return None
    for level in cpu_levels():
        name = entry.get("builds", {}).get(level)
        if name:
            path = folder / name
            try:
                _check_trusted(path, owners)
                return ctypes.CDLL(str(path)), level
            except OSError as e:
                logger.warning("refusing the prebuilt kernel %s: %s", path, e)
    return None


def load(source: Path, declare: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL, str]:
    """`source`'s library, its entry points typed by `declare`, and how it was had ("prebuilt x86-64-v3",
    or "compiled -O3 -march=native ..."): prebuilt when there is one, else compiled here with the
    first flag set that compiles. Raises RuntimeError naming every failure where neither works."""
    found = prebuilt(source)
    if found is not None:
        lib, level = found
        declare(lib)
        return lib, f"prebuilt {level}"
    errors = []
    for flags in FLAG_SETS:
        try:
            lib = build(source, flags)
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            detail = (getattr(e, "stderr", None) or str(e)).strip()
            errors.append(f"[{' '.join(flags)}] {detail.splitlines()[-1] if detail else type(e).__name__}")
            if isinstance(e, RuntimeError):  # no compiler at all: no other flags will help
                break
            continue
        declare(lib)
        return lib, "compiled " + " ".join(flags)
    raise RuntimeError(f"could not build {source.name}: " + "; ".join(errors))


def prebuild(sources: Sequence[Path], out: Path) -> dict:
    """Builds every source at every portable level into `out` (with MANIFEST); a level a source does not
    compile at is left out. Returns the manifest. Raises RuntimeError when a source builds at no level."""
    compiler = _compiler()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for source in sources:
        builds = {}
        for level, extra in portable_levels():
            target = out / f"{source.stem}-{level}.so"
            try:
                _compile(compiler, source, ("-O3", *extra, "-fPIC", "-shared", "-fopenmp"), target)
                builds[level] = target.name
            except subprocess.CalledProcessError as e:
                logger.warning("%s does not build for %s: %s", source.name, level, (e.stderr or "").strip()[-300:])
        if not builds:
            raise RuntimeError(f"{source.name} builds at no portable level")
        manifest[source.stem] = {"source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "builds": builds}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


class Kernel:
    """One C source, loaded on first use (thread-safe); where it can be neither found prebuilt nor
    built, `library()` is None after a single warning that ends with `fallback` (what callers do
    instead). `status` says how it runs."""

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], None], fallback: str):
        self.source, self.declare, self.fallback = source, declare, fallback
        self.failure: str | None = None
        self.origin = ""  # "prebuilt x86-64-v3", "compiled -O3 -march=native ..."
        self._library: ctypes.CDLL | None = None
        self._lock = threading.Lock()

    def library(self) -> ctypes.CDLL | None:
        if self._library is not None or self.failure is not None:
            return self._library
        with self._lock:
            if self._library is None and self.failure is None:
                try:
                    self._library, self.origin = load(self.source, self.declare)
                    logger.info("%s: %s", self.source.name, self.origin)
                except RuntimeError as e:
                    self.failure = str(e)
                    logger.warning("%s; %s", self.failure, self.fallback)
        return self._library

    @property
    def status(self) -> str:
        """How the kernel runs once loaded: its origin, or "fallback: ..." with the reason."""
        if self.library() is not None:
            return self.origin
        return f"fallback ({self.fallback}): {self.failure}"
