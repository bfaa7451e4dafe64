"""Free memory of a device, and out-of-memory errors told apart from broken files.

`load_model` compares its estimate (`gptoss.load.estimate_load`) with `available_bytes` before it
reads anything, and reports an allocation that still fails as `InsufficientMemoryError`.
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch

GIB = 1 << 30
# How the kernel, safetensors (Rust io::Error: "Cannot allocate memory (os error 12)") and torch's
# allocators word a failed allocation; safetensors raises a bare OSError with no errno set.
_OUT_OF_MEMORY_TEXTS = ("cannot allocate memory", "can't allocate memory", "out of memory",
                        f"os error {errno.ENOMEM})")


def available_bytes(device: torch.device) -> int | None:
    """Bytes a load onto `device` can still take; None where it cannot be told.

    CUDA: the free bytes torch.cuda.mem_get_info reports. CPU: the smaller of /proc/meminfo's
    MemAvailable and what the cgroup's memory limit leaves (a container sees the host's meminfo).
    Tests replace this function to fake the free memory.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        return cpu_available_bytes()
    return None


def cpu_available_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup"),
                        proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """min(MemAvailable, the tightest cgroup v2 limit minus usage on the path to the root, or v1's)."""
    candidates = [b for b in (_meminfo_available(meminfo), _cgroup_headroom(cgroup_root, proc_cgroup))
                  if b is not None]
    return min(candidates) if candidates else None


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(root: Path, proc_cgroup: Path) -> int | None:
    """The least `limit - usage` over this process's memory cgroups and their ancestors. Usage leaves
    out the inactive page cache, which the kernel reclaims before it kills (as `kubectl top` does)."""
    headrooms = []
    for folder in _cgroup_folders(root, proc_cgroup):
        if (folder / "memory.max").exists():  # v2
            limit, usage = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
            inactive = _stat_field(folder / "memory.stat", "inactive_file")
        else:  # v1
            limit, usage = _read_int(folder / "memory.limit_in_bytes"), _read_int(folder / "memory.usage_in_bytes")
            inactive = _stat_field(folder / "memory.stat", "total_inactive_file")
        if limit is None or usage is None or limit >= 1 << 60:  # v2's "max", v1's "no limit" (~2**63)
            continue
        headrooms.append(max(0, limit - usage + min(inactive, usage)))
    return min(headrooms) if headrooms else None


def _cgroup_folders(root: Path, proc_cgroup: Path) -> list[Path]:
    """This process's memory cgroup folders, each followed by its ancestors up to the mount: v2
    (`0::/path` under `root`) and v1 (`N:memory:/path` under `root`/memory)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return [root, root / "memory"]
    folders: list[Path] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers and "memory" not in controllers.split(","):
            continue
        mount = root if not controllers else root / "memory"
        folder = mount / path.strip().lstrip("/")
        while True:
            folders.append(folder)
            if folder == mount:
                break
            folder = folder.parent
    return folders


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # missing, or "max"
        return None


def _stat_field(path: Path, name: str) -> int:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a failed allocation (MemoryError, ENOMEM, torch's allocator) rather than a
    fault of what was being read."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    if isinstance(error, OSError) and error.errno == errno.ENOMEM:
        return True
    text = str(error).lower()
    return any(t in text for t in _OUT_OF_MEMORY_TEXTS)


def gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.1f} GiB"


def describe_free(device: torch.device) -> str:
    """Where `available_bytes(device)` comes from, for messages."""
    if device.type == "cuda":
        return f"free on {device}"
    return "available (MemAvailable, or the cgroup memory limit if lower)"

