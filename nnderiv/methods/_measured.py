"""Measured choices: time the algorithms the cost model cannot tell apart, once per machine.

The cost model (``_cost``) predicts from counts and a few machine rates; its ratios
between algorithms were measured off by up to 1.8x on a second CPU of the same kind (the
native forward kernel against XLA's forward-over-reverse, 64x3 nets with 6-8 inputs). Where
the predictions of two or more algorithms are within :data:`CLOSE` of each other and a
``derivs_fn`` is being compiled for concrete parameters, :func:`measure` runs each
candidate on points of the batch's shape and keeps the fastest, the way FFTW plans by
measuring.

* A choice is cached in memory and in ``choices.json`` next to the calibration
  (``$NNDERIV_CACHE_DIR``, or the user's cache directory), keyed by the calibration's
  machine fingerprint, a digest of the package's code, and a signature of the model's
  structure (layer sizes and activations, or the program's primitives and shapes),
  order, dtype and batch size (rounded to a power of two). Another CPU, core count, JAX
  version or version of the kernels measures again.
* ``NNDERIV_CALIBRATION=off`` turns measuring off (the cost model decides); ``probe``
  measures again and rewrites the cached choice. Nothing here raises: a failed
  measurement leaves the cost model's choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import jax
import numpy as np

from . import _calibration

SCHEMA = "nnderiv-choices/1"
#: Candidates predicted within this factor of the cheapest are timed.
CLOSE = 3.0
#: Points timed at most: per-point costs are flat beyond a few thousand points.
MAX_POINTS = 4096
#: Batches up to this size are timed as users run them, called from inside compiled code
#: (a simulation's jitted step or lax.scan): :data:`LOOP_CALLS` calls in one jitted loop.
#: Timed one call at a time, a point's 10-20 µs of dispatch hid a 15% difference between
#: kernels (m=3, 64x3 tanh: forward and fwdadj 36.2 and 36.3 µs per call, 10.2 and 8.8 µs
#: per step of a lax.scan), and auto ran the slower one in loops.
LOOP_BATCH = 16
LOOP_CALLS = 32
#: A batch beyond MAX_POINTS whose candidates all took under this per call at MAX_POINTS
#: points is timed again at its own size (up to FULL_POINTS): XLA splits a large batch over
#: the cores where it ran a small one on one (nested AD on m=1, 16x1: 0.063 us per point at
#: 4096 points, 0.046 at 8192; forward 0.094 and 0.11), and timed at 4096 auto ran forward.
SHORT_CALL_S = 0.005
FULL_POINTS = 65536

_MEMORY: dict[str, str] = {}
_LOCK = threading.Lock()
_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("nnderiv_measure_choices", default=False)


@contextlib.contextmanager
def allowed():
    """Within the block, methods may time their candidates (``derivs_fn`` compiling for reuse)."""
    token = _ALLOWED.set(True)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def requested() -> bool:
    return _ALLOWED.get()


def enabled(net) -> bool:
    """Whether to measure for ``net``: the mode allows it and the parameters are concrete."""
    if _calibration.mode() == "off":
        return False
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(net))


def cache_path():
    return _calibration.cache_path().with_name("choices.json")


def _bucket(batch: int) -> int:
    """The batch size rounded up to a power of two (choices do not change within a factor 2)."""
    return 1 << max(int(batch) - 1, 0).bit_length()


def _mlp_signature(structure) -> str:
    from .. import _network

    parts = []
    for stage in structure.stages:
        if isinstance(stage, _network.AffineStage):
            parts.append(f"A{stage.fan_in}x{stage.fan_out}{'b' if stage.biases else ''}")
        elif isinstance(stage, _network.SkipStage):
            parts.append(f"K{stage.source}")
        else:
            pieces = stage.parts if isinstance(stage, _network.ConcatStage) else (stage,)
            names = "|".join(p.activation.name if p.activation is not None else "generic" for p in pieces)
            parts.append(f"S{names}")
    return "mlp:" + ",".join(parts)


def signature(net, analysis, order: int, batch: int, candidates, setting: str = "") -> str:
    """The key of a measured choice: model structure, order, dtype, batch bucket, candidates.

    ``setting``: anything else the timings depend on (the result's layout, whether the
    native kernel may run).
    """
    if analysis.structure is not None:
        model = _mlp_signature(analysis.structure)
    else:
        from .. import _network

        program = _network.trace_program(net, analysis.m, analysis.dtype)
        text = "|".join(
            f"{e.primitive.name}:{[tuple(getattr(o, 'shape', ())) for o in e.outputs]}" for e in program.eqns
        )
        model = "program:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return (
        f"{model}|m{analysis.m}|n{analysis.n}|k{order}|{np.dtype(analysis.dtype).name}|b{_bucket(batch)}"
        f"|{','.join(candidates)}|{setting}"
    )


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of the package's source (Python and the native kernel's C++).

    Timings belong to the code that was timed: a choice measured before a kernel changed
    (an upgrade, or a development checkout between edits) is measured again.
    """
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc", ".inc")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            pass
    return digest.hexdigest()[:16]


def _fingerprint() -> dict | None:
    try:
        return {**_calibration.fingerprint(), "code": code_digest()}
    except Exception:  # noqa: BLE001 - no backend: nothing to key on
        return None


def _read_file() -> dict:
    fp = _fingerprint()
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("fingerprint") != fp:
        return {}
    choices = data.get("choices")
    return choices if isinstance(choices, dict) else {}


def lookup(key: str) -> str | None:
    """A choice measured before for ``key`` (this process, or this machine's cache), or None."""
    if _calibration.mode() in ("off", "probe"):
        return _MEMORY.get(key) if _calibration.mode() == "probe" else None
    with _LOCK:
        if key in _MEMORY:
            return _MEMORY[key]
    entry = _read_file().get(key)
    if isinstance(entry, dict) and isinstance(entry.get("algorithm"), str):
        with _LOCK:
            _MEMORY[key] = entry["algorithm"]
        return entry["algorithm"]
    return None


def _write(key: str, entry: dict) -> None:
    fp = _fingerprint()
    if fp is None:
        return
    path = cache_path()
    with _LOCK:
        choices = _read_file()
        choices[key] = entry
        data = {"schema": SCHEMA, "fingerprint": fp, "choices": choices}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
        except OSError:
            pass  # an unwritable cache only means measuring again next time


def _seconds_per_call(fn, x, target_s: float) -> float:
    """The fastest of at least 2 calls (about ``target_s`` of them), after one untimed call.

    The untimed call absorbs what the candidate timed before left behind: results of
    hundreds of MB are fresh memory, and whichever candidate follows one that freed a
    large heap pays its page faults (measured at m=16, n=8, 64x3, 1024 points: the
    forward kernel read 236 us/pt after nested AD's round, 139 without it, against 173
    for forward-over-reverse, and was not chosen).
    """
    jax.block_until_ready(fn(x))
    reps, elapsed, best = 0, 0.0, float("inf")
    start = time.perf_counter()
    while reps < 2 or (elapsed < target_s and reps < 200):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        now = time.perf_counter()
        best = min(best, now - t)
        reps += 1
        elapsed = now - start
    return best


def measure(key: str, runs: dict, analysis, batch: int, rounds: int = 3, target_s: float = 0.02) -> str | None:
    """Time ``runs`` (algorithm -> jitted ``x -> fields``) on points like the batch; the fastest.

    Rounds are interleaved and each algorithm keeps its best round, so a burst of
    another process's work does not decide. Returns None if any candidate fails.
    """
    points = max(1, min(int(batch), MAX_POINTS))
    calls = LOOP_CALLS if points <= LOOP_BATCH else 1
    if calls > 1:
        runs = {name: _in_loop(fn, calls) for name, fn in runs.items()}
    rng = np.random.default_rng(0)
    host_x = rng.uniform(-1.0, 1.0, (points, analysis.m)).astype(analysis.dtype)
    best = {name: float("inf") for name in runs}
    timed_points = points  # the points of the timings kept
    failed = []
    x64 = bool(jax.config.jax_enable_x64)  # the caller's, also when set by a thread-local context

    def timing():
        # In a thread of its own: JAX's trace state is per thread, so the candidates run
        # compiled and concrete even when the caller is tracing (a derivs_fn compiling).
        # Thread-local settings do not follow: x64 is set again, or float64 points would
        # be timed as float32.
        try:
            with jax.enable_x64(x64):
                _time_all(host_x)
        except Exception as err:  # noqa: BLE001 - measuring must never break a derivative call
            failed.append(err)

    def _time_all(host_x):
        nonlocal timed_points
        _time_at(host_x)
        full = min(int(batch), FULL_POINTS)
        if full > timed_points and max(best.values()) < SHORT_CALL_S:
            timed_points = full
            _time_at(np.resize(host_x, (full, analysis.m)))

    def _time_at(host_x):
        x = jax.device_put(host_x)
        for name, fn in runs.items():
            jax.block_until_ready(fn(x))  # compile and warm up
            best[name] = float("inf")
        for _ in range(rounds):
            for name, fn in runs.items():
                best[name] = min(best[name], _seconds_per_call(fn, x, target_s))

    worker = threading.Thread(target=timing, name="nnderiv-measure", daemon=True)
    worker.start()
    worker.join()
    if failed:
        return None
    choice = min(best, key=best.get)
    with _LOCK:
        _MEMORY[key] = choice
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    per_point = {k: v / (timed_points * calls) for k, v in best.items()}
    _write(key, {"algorithm": choice, "seconds_per_point": per_point, "measured": when})
    return choice


def _in_loop(fn, calls: int):
    """``calls`` evaluations of ``fn`` in one jitted loop, each one's input depending on the
    last one's outputs (so none is hoisted out of the loop or left out)."""
    import jax.numpy as jnp

    def body(_, carry):
        x, total = carry
        s = sum(jnp.sum(f) for f in fn(x))
        return x + jnp.zeros_like(x) * s, total + s  # XLA keeps 0 * s for floats (NaN, inf)

    compiled = jax.jit(lambda x: jax.lax.fori_loop(0, calls, body, (x, jnp.zeros((), x.dtype)))[1])

    def looped(x):
        return compiled(x)

    looped.__wrapped__ = fn  # inspect.unwrap finds the candidate
    return looped


def reset() -> None:
    """Forget the choices measured in this process (the disk cache stays)."""
    with _LOCK:
        _MEMORY.clear()


def forget() -> str:
    """Forget every measured choice, in this process and on disk; says what was done."""
    reset()
    path = cache_path()
    try:
        path.unlink()
        return f"removed {path}"
    except FileNotFoundError:
        return f"no measured choices at {path}"
    except OSError as err:
        return f"could not remove {path} ({type(err).__name__}: {err})"
