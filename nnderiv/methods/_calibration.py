"""Machine rates for the cost model, measured where the code runs and cached on disk.

The cost model (``_cost``) predicts each algorithm's time from counts (matmul flops by
contraction depth, coefficient elements touched by elementwise rules, XLA ops per call)
and a few *rates* of the machine:

* ``matmul``: flop/s of a jitted ``(rows, d) @ (d, d)`` product at contraction depths
  ``d`` = 8 ... 256 (a 32-deep contraction runs at a fraction of a 256-deep GEMM's rate);
* ``elementwise_s``: seconds per element of one fused multiply-add pass over an array of
  a few MB (the unit the elementwise rules are counted in);
* ``op_s``: the fixed cost of one more op inside a compiled program (what a single point
  or a ``lax.scan`` step pays per op).

These differ threefold between machines of the same kind (see ``shared/DESIGN.md``), so
they are measured by :func:`probe` (about half a second, once per machine) and cached in
``$NNDERIV_CACHE_DIR`` or the user's cache directory (``$XDG_CACHE_HOME/nnderiv``,
default ``~/.cache/nnderiv``), keyed by a fingerprint of the CPU, core count, backend and
JAX version. A cache that is missing, stale (another fingerprint) or unreadable is never
an error: the rates are measured again, or the defaults are used if measuring fails.

``NNDERIV_CALIBRATION`` selects the behaviour: ``auto`` (default: read the cache, or
probe once and write it), ``off`` (the built-in defaults, nothing measured or read), or
``probe`` (measure again now and rewrite the cache). ``nnderiv bench --calibrate`` runs a
fresh probe and says which rates are in use.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import _cpu

SCHEMA = "nnderiv-calibration/1"
ENV_MODE = "NNDERIV_CALIBRATION"
ENV_DIR = "NNDERIV_CACHE_DIR"
MODES = ("auto", "off", "probe")
DEPTHS = (8, 32, 128, 256)
DTYPES = ("float64", "float32")


@dataclasses.dataclass(frozen=True)
class Rates:
    """The machine rates of one dtype (see the module docstring).

    Attributes:
      matmul: ``((depth, flop/s), ...)`` for increasing contraction depths.
      elementwise_s: seconds per element of a fused multiply-add pass.
      op_s: seconds per op in a compiled program.
    """

    matmul: tuple[tuple[int, float], ...]
    elementwise_s: float
    op_s: float

    def matmul_rate(self, depth: int) -> float:
        """flop/s of a contraction of ``depth``: log-linear interpolation, clamped at the ends."""
        depths = np.log([d for d, _ in self.matmul])
        rates = np.log([r for _, r in self.matmul])
        return float(np.exp(np.interp(np.log(max(depth, 1)), depths, rates)))

    def to_json(self) -> dict:
        return {"matmul": [list(p) for p in self.matmul], "elementwise_s": self.elementwise_s, "op_s": self.op_s}

    @classmethod
    def from_json(cls, data: dict) -> Rates:
        matmul = tuple((int(d), float(r)) for d, r in data["matmul"])
        rates = cls(matmul, float(data["elementwise_s"]), float(data["op_s"]))
        if not matmul or any(not (r > 0 and np.isfinite(r)) for _, r in matmul):
            raise ValueError("matmul rates must be positive")
        if not (rates.elementwise_s > 0 and rates.op_s >= 0):
            raise ValueError("elementwise and op times must be positive")
        return rates


# Measured by ``probe()`` on the 2-core AMD EPYC (AVX2) CI machine, jax 0.10.2: the rates
# used when nothing is measured. Only their ratios between algorithms decide anything.
DEFAULT_RATES = {
    "float64": Rates(
        ((8, 3.2e9), (16, 7.4e9), (32, 15.0e9), (64, 24.0e9), (128, 30.0e9), (256, 36.0e9)), 0.45e-9, 1.5e-6
    ),
    "float32": Rates(
        ((8, 6.4e9), (16, 14.8e9), (32, 30.0e9), (64, 48.0e9), (128, 60.0e9), (256, 72.0e9)), 0.25e-9, 1.5e-6
    ),
}


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The rates of one dtype and where they came from (``"default"``, ``"cache"`` or ``"probe"``)."""

    dtype: str
    rates: Rates
    source: str
    note: str = ""
    path: Path | None = None


def dtype_name(dtype) -> str:
    """``"float32"`` for 32-bit and narrower floats, else ``"float64"``."""
    return "float32" if np.dtype(dtype).itemsize <= 4 else "float64"


def mode() -> str:
    """The calibration mode from ``NNDERIV_CALIBRATION`` (unknown values read as ``auto``)."""
    value = os.environ.get(ENV_MODE, "auto").strip().lower()
    if value in ("0", "false", "no", "none", "default", "defaults"):
        return "off"
    return value if value in MODES else "auto"


def cache_path() -> Path:
    """Where the calibration is cached: ``$NNDERIV_CACHE_DIR`` or the user's cache directory."""
    base = os.environ.get(ENV_DIR)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = str(Path(xdg) / "nnderiv") if xdg else str(Path.home() / ".cache" / "nnderiv")
    return Path(base) / "calibration.json"


def fingerprint() -> dict[str, Any]:
    """What the rates depend on: a cache written under another fingerprint is stale."""
    import jax
    import jaxlib

    from .. import __version__

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    device = jax.devices()[0]
    return {
        "cpu": _cpu.model_name(),
        "cpu_id": _cpu.identity(),
        "cores": usable,
        "machine": platform.machine(),
        "backend": device.platform,
        "device_kind": device.device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "nnderiv": __version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _median_seconds(fn, args, target_s: float) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    deadline = time.perf_counter() + target_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    # The lower quartile: the machine's rate with as little interference as was seen.
    return float(np.percentile(times, 25))


def probe(dtype="float64", target_s: float = 0.01) -> Rates:
    """Measure the rates of ``dtype`` on this machine (a few tenths of a second, mostly compiling)."""
    import jax
    import jax.numpy as jnp

    # float64 is measured even where x64 is off (it may be switched on later).
    with jax.enable_x64(True):
        return _probe_dtype(jnp.dtype(dtype_name(dtype)), target_s)


def _probe_dtype(dtype, target_s: float) -> Rates:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    matmul = []
    for depth in DEPTHS:
        rows = max(1024, (1 << 20) // depth)  # ~8 MB of float64 left operand
        a = jnp.asarray(rng.standard_normal((rows, depth)), dtype)
        b = jnp.asarray(rng.standard_normal((depth, depth)) / depth, dtype)
        seconds = _median_seconds(jax.jit(jnp.matmul), (a, b), target_s)
        matmul.append((depth, 2.0 * rows * depth * depth / seconds))
    # One fused pass reading two arrays and writing one, 2^20 elements: the cost unit of
    # the elementwise rules, including the memory traffic of a stack that spills L2.
    size = 1 << 20
    u = jnp.asarray(rng.standard_normal(size), dtype)
    v = jnp.asarray(rng.standard_normal(size), dtype)
    fma = jax.jit(lambda u, v: u * v + 0.5 * u)
    elementwise_s = _median_seconds(fma, (u, v), target_s) / size
    # 64 dependent tiny ops against 1: the cost of one more op in a compiled program.
    small = jnp.asarray(rng.standard_normal((4, 4)), dtype)

    def chain(x, steps):
        for _ in range(steps):
            x = jnp.tanh(x @ x)  # a dot between elementwise ops cannot fuse with them
        return x

    long_s = _median_seconds(jax.jit(lambda x: chain(x, 32)), (small,), target_s)
    short_s = _median_seconds(jax.jit(lambda x: chain(x, 1)), (small,), target_s)
    op_s = (long_s - short_s) / (2 * 31)
    if not op_s > 0:
        # A burst of other work during the short chain can make the difference vanish: an
        # op that costs nothing would hide what one-op programs (the native kernel) save.
        op_s = DEFAULT_RATES[dtype_name(dtype)].op_s
    return Rates(tuple(matmul), elementwise_s, op_s)


def _read(path: Path, expected: dict, dtype: str) -> tuple[Rates | None, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"no calibration at {path}"
    except (OSError, ValueError) as err:
        return None, f"unreadable calibration at {path} ({type(err).__name__})"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None, f"calibration at {path} has another schema"
    if data.get("fingerprint") != expected:
        old = data.get("fingerprint") if isinstance(data.get("fingerprint"), dict) else {}
        changed = sorted(k for k in expected if old.get(k) != expected[k])
        return None, f"stale calibration at {path} (changed: {', '.join(changed) or 'format'})"
    entry = (data.get("rates") or {}).get(dtype)
    if entry is None:
        return None, f"no {dtype} rates in {path}"
    try:
        return Rates.from_json(entry), f"measured {entry.get('measured', '?')}"
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return None, f"unreadable calibration at {path} ({type(err).__name__}: {err})"


def _write(path: Path, dtype: str, rates: Rates, fp: dict) -> str:
    """Add ``dtype``'s rates to the cache file (kept: the other dtype's, if of this fingerprint)."""
    data = {"schema": SCHEMA, "fingerprint": fp, "rates": {}}
    try:
        old = json.loads(path.read_text())
        if isinstance(old, dict) and old.get("schema") == SCHEMA and old.get("fingerprint") == fp:
            data["rates"] = {k: v for k, v in (old.get("rates") or {}).items() if k != dtype and k in DTYPES}
    except (OSError, ValueError):
        pass
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    data["rates"][dtype] = {**rates.to_json(), "measured": when}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
        return f"written to {path}"
    except OSError as err:
        return f"not cached ({type(err).__name__}: {err})"


def calibrate(dtype="float64", force: bool = False, measure: bool = True) -> Calibration:
    """Rates of ``dtype`` for this machine: cached, freshly measured, or the defaults (never raises).

    ``force``: measure now and rewrite the cache, whatever the mode (``bench --calibrate``).
    ``measure=False``: where there is no usable cache, report the defaults instead of probing.
    """
    name = dtype_name(dtype)
    current_mode = mode()
    if current_mode == "off" and not force:
        return Calibration(name, DEFAULT_RATES[name], "default", f"{ENV_MODE}=off")
    path = cache_path()
    try:
        fp = fingerprint()
    except Exception as err:  # noqa: BLE001 - no backend: nothing to measure on
        return Calibration(name, DEFAULT_RATES[name], "default", f"no device to measure ({type(err).__name__})")
    why = "forced" if force else f"{ENV_MODE}=probe"
    if not force and current_mode != "probe":
        rates, why = _read(path, fp, name)
        if rates is not None:
            return Calibration(name, rates, "cache", why, path)
        if not measure:
            return Calibration(name, DEFAULT_RATES[name], "default", why, path)
    try:
        rates = probe(name)
    except Exception as err:  # noqa: BLE001 - measuring must never break a derivative call
        return Calibration(name, DEFAULT_RATES[name], "default", f"{why}; probe failed ({type(err).__name__}: {err})")
    written = _write(path, name, rates, fp)
    return Calibration(name, rates, "probe", f"{why}; measured now, {written}", path)


_CURRENT: dict[str, Calibration] = {}


def current(dtype) -> Calibration:
    """The calibration this process uses for ``dtype`` (read or measured at first use, then kept)."""
    name = dtype_name(dtype)
    if name not in _CURRENT:
        _CURRENT[name] = calibrate(name)
    return _CURRENT[name]


def reset() -> None:
    """Forget the calibrations in use: the next use reads the cache (or measures) again."""
    _CURRENT.clear()
