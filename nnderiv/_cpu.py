"""What the host CPU offers the batch loops, read at run time: cores, L2 caches, identity.

The engine sizes its batch chunks from these (``_taylor.chunk_size``). Linux exposes the
cache hierarchy in sysfs: ``/sys/devices/system/cpu/cpuN/cache/indexI/{level,type,size,
shared_cpu_list}``; one L2 may be shared by several CPUs (SMT siblings, a cluster), so the
capacity is summed over the distinct caches of the CPUs this process may run on.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

#: Assumed per-core L2 capacity where the host does not say (no sysfs: macOS, Windows).
FALLBACK_L2_PER_CORE = 1 << 20

_SYSFS = Path("/sys/devices/system/cpu")

#: The vector extensions that change what the kernels (XLA's and ours) run at: a
#: calibration taken where one of these differs is stale.
VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512dq",
    "avx512vl",
    "avx512bw",
    "amx_tile",
    "asimd",
    "sve",
)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - no affinity API (macOS, Windows)
        return list(range(os.cpu_count() or 1))


def _size_bytes(text: str) -> int:
    """A sysfs cache size (``512K``, ``1M``, ``1024``) in bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def l2_bytes_from_sysfs(root: Path, cpus: list[int]) -> int | None:
    """Total capacity of the distinct L2 (unified or data) caches serving ``cpus``, or None."""
    seen: set[str] = set()
    total = 0
    for cpu in cpus:
        cache = root / f"cpu{cpu}" / "cache"
        try:
            indices = sorted(cache.glob("index*"))
        except OSError:
            return None
        for index in indices:
            try:
                if (index / "level").read_text().strip() != "2":
                    continue
                if (index / "type").read_text().strip() == "Instruction":
                    continue
                shared = (index / "shared_cpu_list").read_text().strip()
                size = _size_bytes((index / "size").read_text())
            except (OSError, ValueError):
                return None
            if shared not in seen:  # one physical cache per distinct sharing set
                seen.add(shared)
                total += size
    return total or None


@functools.cache
def l2_bytes() -> int:
    """Total L2 capacity of the cores this process may run on (sysfs, else the fallback)."""
    cpus = usable_cpus()
    found = l2_bytes_from_sysfs(_SYSFS, cpus)
    return found if found is not None else FALLBACK_L2_PER_CORE * len(cpus)


def _first_processor(text: str) -> dict[str, str]:
    """The fields of the first processor's block of ``/proc/cpuinfo`` (keys lower-cased)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def identity_from_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's family, model, stepping and vector extensions in ``/proc/cpuinfo``.

    A VM often shows every CPU generation under one model name (``AMD EPYC``); the family
    and model numbers and the flags still tell an AVX2 core from an AVX-512 one.
    """
    fields = _first_processor(text)
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    out = {k: fields[k] for k in ("cpu family", "model", "stepping", "cpu part") if k in fields}
    out["vector"] = ",".join(f for f in VECTOR_FLAGS if f in flags)
    return out


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # pragma: no cover - not Linux
        return ""


def identity() -> dict[str, str]:
    """:func:`identity_from_cpuinfo` of this host (empty fields where there is no ``/proc/cpuinfo``)."""
    return identity_from_cpuinfo(_cpuinfo())


def model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what the platform module says)."""
    return _first_processor(_cpuinfo()).get("model name") or platform.processor() or platform.machine()
