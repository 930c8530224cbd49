"""A native CPU kernel for the packed forward Taylor recursion, as one ``jax.ffi`` custom call.

The XLA forward kernel (:mod:`nnderiv._taylor._layered`) compiles to about 17 ops for one
point; each op and each tiny matmul costs microseconds, which dominates single-point
calls and ``lax.scan`` steps, and narrow nets are bound by XLA's elementwise passes. This
package compiles ``mlp_taylor.cc`` (C++17, an XLA FFI handler) at first use with the
system C++ compiler and runs the whole derivative computation of an MLP as one custom
call: batch tiles that stay in cache, a register-blocked matmul micro-kernel (AVX-512 or
AVX2+FMA where the CPU has it, a baseline build otherwise, chosen at run time), the
elementwise rule in the same pass, and a persistent thread pool over the batch.

* The library is cached in ``$NNDERIV_CACHE_DIR``, else ``$XDG_CACHE_HOME/nnderiv``, else
  ``~/.cache/nnderiv`` (the calibration's directory), under a name keyed by a hash of the
  source, jaxlib's version, the compiler's version and the platform; it is built under a
  temporary name and renamed, so concurrent builds are safe.
* ``NNDERIV_NATIVE=0`` disables it; ``$CXX`` names the compiler (else ``c++`` or ``g++``).
  ``NNDERIV_NATIVE_ISA=avx2`` (or ``baseline``) runs a narrower compute copy than the CPU
  allows, to compare them on one machine.
* No compiler, a failed build or a failed load is never an error: the XLA recursions run,
  and one warning per process says why. :func:`status` reports the state.
* :func:`native_derivatives` is the hook the analytic methods call: it returns ``None``
  where the kernel does not apply (another backend, an activation outside the closed-form
  table, order 0, a dtype other than float32/float64, the kernel unavailable).

Differentiation (gradients with respect to the parameters, as PINN training needs, or to
``x``) goes through the XLA kernel: the custom call is wrapped in a ``jax.custom_jvp``
whose tangent is the JVP of the XLA forward kernel. ``vmap`` is handled by the kernel
itself (``vmap_method="expand_dims"``: extra leading dimensions are slices of the batch,
operands with one slice are shared).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from math import comb
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ENV_ENABLE = "NNDERIV_NATIVE"
ENV_DIR = "NNDERIV_CACHE_DIR"
ENV_ISA = "NNDERIV_NATIVE_ISA"
#: The compute copies of the kernel by name, as the C++ side numbers them (``nnd::Isa``).
ISAS = {"baseline": 0, "avx2+fma": 2, "avx512": 3}
_ISA_NAMES = {code: name for name, code in ISAS.items()}
TARGET = "nnderiv_mlp_taylor"
_HERE = Path(__file__).resolve().parent
SOURCES = (_HERE / "mlp_taylor.cc", _HERE / "mlp_taylor_impl.inc")

#: Activation codes of the C++ kernel, by :class:`nnderiv._activations.Activation` name.
ACTIVATION_CODES = {
    "tanh": 0,
    "sigmoid": 1,
    "softplus": 2,
    "silu": 3,
    "gelu_tanh": 4,
    "gelu_erf": 5,
    "sin": 6,
    "cos": 7,
    "exp": 8,
    "identity": 9,
    "relu": 10,
    "leaky_relu": 11,
}


@dataclasses.dataclass
class _State:
    checked: bool = False
    available: bool = False
    disabled: bool = False
    reason: str = "not loaded yet"
    path: str | None = None
    isa: str | None = None
    warned: bool = False
    lib: object = None


_state = _State()
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where built libraries live: ``$NNDERIV_CACHE_DIR``, ``$XDG_CACHE_HOME/nnderiv`` or ``~/.cache/nnderiv``."""
    explicit = os.environ.get(ENV_DIR)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nnderiv"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"`{cxx} --version` failed (exit {out.returncode})")
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else cxx


def _flags(include: str) -> list[str]:
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=fast", "-Wno-psabi", f"-I{include}"]


def library_path(cxx: str) -> Path:
    """The cache path of the library for this source, jaxlib, compiler and platform."""
    import jaxlib

    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    for part in (
        jaxlib.__version__,
        _compiler_version(cxx),
        " ".join(_flags("")),
        platform.system(),
        platform.machine(),
    ):
        digest.update(b"\0" + part.encode())
    return cache_dir() / "native" / f"mlp_taylor-{digest.hexdigest()[:20]}.so"


def build(cxx: str | None = None, force: bool = False) -> Path:
    """Compile the kernel into the cache (if not already there); returns the library path.

    Raises on failure (no compiler, compile error); :func:`load` turns that into the
    fallback and a warning.
    """
    cxx = cxx or _compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    path = library_path(cxx)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(fd)
    try:
        cmd = [cxx, *_flags(jax.ffi.include_dir()), str(SOURCES[0]), "-o", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            lines = (out.stderr or out.stdout).strip().splitlines()
            tail = [ln for ln in lines if "error" in ln][:3] or lines[-3:]
            raise RuntimeError(f"`{Path(cxx).name}` failed (exit {out.returncode}): " + " | ".join(tail))
        os.replace(tmp, path)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _enabled() -> bool:
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def load() -> bool:
    """Build (if needed), load and register the kernel once per process; whether it is available."""
    if _state.checked:
        return _state.available
    with _lock:
        if _state.checked:
            return _state.available
        if not _enabled():
            _state.disabled, _state.reason = True, f"disabled by {ENV_ENABLE}={os.environ.get(ENV_ENABLE)}"
            _state.checked = True
            return False
        try:
            path = build()
            lib = ctypes.CDLL(str(path))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NnderivMlpTaylor), platform="cpu")
            _state.lib, _state.path = lib, str(path)
            _state.isa = _apply_isa_request(lib)
            _state.available, _state.reason = True, f"loaded {path} ({_state.isa})"
        except Exception as err:  # noqa: BLE001 - any failure means: use the XLA path
            _state.available = False
            _state.reason = f"{type(err).__name__}: {err}"
            if not _state.warned:
                _state.warned = True
                warnings.warn(
                    f"nnderiv: the native CPU kernel is unavailable ({_state.reason}); "
                    f"using the XLA recursions (set {ENV_ENABLE}=0 to silence this)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _state.checked = True
        return _state.available


def _isa_name(code: int) -> str:
    return _ISA_NAMES.get(code, "baseline")


def _apply_isa_request(lib) -> str:
    """The compute copy after ``$NNDERIV_NATIVE_ISA`` (a name of :data:`ISAS`; ``avx2`` also
    works) narrowed it; an unknown name warns and leaves the widest the CPU runs."""
    lib.NnderivMlpTaylorIsa.restype = ctypes.c_int
    lib.NnderivMlpTaylorSetIsa.restype = ctypes.c_int
    lib.NnderivMlpTaylorSetIsa.argtypes = [ctypes.c_int]
    want = os.environ.get(ENV_ISA, "").strip().lower()
    if not want:
        return _isa_name(lib.NnderivMlpTaylorSetIsa(-1))
    code = ISAS.get("avx2+fma" if want == "avx2" else want)
    if code is None:
        warnings.warn(
            f"nnderiv: {ENV_ISA}={want!r} is not one of {sorted(ISAS)}; using the widest this CPU runs",
            RuntimeWarning,
            stacklevel=4,
        )
        code = -1
    return _isa_name(lib.NnderivMlpTaylorSetIsa(code))


@contextlib.contextmanager
def _using_isa(name: str):
    """Within the block, new kernel calls run the compute copy ``name`` (or the widest
    below it this CPU runs); yields the name of the copy in use. For tests."""
    if not load():
        raise RuntimeError(f"the native kernel is not available: {_state.reason}")
    lib, before = _state.lib, _state.isa
    try:
        _state.isa = _isa_name(lib.NnderivMlpTaylorSetIsa(ISAS[name]))
        yield _state.isa
    finally:
        _state.isa = _isa_name(lib.NnderivMlpTaylorSetIsa(ISAS[before]))


def _program_counts() -> tuple[int, int]:
    """(built, reused): kernel programs packed from the weights, and reused as kept (all threads)."""
    if not load():
        raise RuntimeError(f"the native kernel is not available: {_state.reason}")
    out = (ctypes.c_uint64 * 2)()
    _state.lib.NnderivMlpTaylorPrograms(out)
    return int(out[0]), int(out[1])


def status() -> dict:
    """The kernel's state: ``{"state": "available" | "disabled" | "failed" | "not loaded", ...}``.

    Does not build or load anything; call :func:`load` first for a definite answer.
    """
    if not _state.checked:
        state = "not loaded"
    elif _state.available:
        state = "available"
    elif _state.disabled:
        state = "disabled"
    else:
        state = "failed"
    return {"state": state, "reason": _state.reason, "path": _state.path, "isa": _state.isa}


def _reset_for_tests() -> None:
    """Forget the load state (the registered target stays registered)."""
    global _state
    _state = _State()


# --------------------------------------------------------------------------------------
# The hook.


def _activation_code(act) -> tuple[int, float] | None:
    from .. import _activations

    name = getattr(act, "name", None)
    if not getattr(act, "closed_form", False) or not isinstance(name, str):
        return None
    if name in ACTIVATION_CODES and name != "leaky_relu":
        return (ACTIVATION_CODES[name], 0.0) if _activations.ACTIVATIONS.get(name) is act else None
    if name.startswith("leaky_relu("):
        # The slope exactly: read it back from the function (the name rounds it to 6 digits).
        with _activations.eager():
            value = np.asarray(act.taylor(np.asarray([-1.0]))[0], dtype=np.float64)
        slope = -float(value[0])
        return (ACTIVATION_CODES["leaky_relu"], slope) if np.isfinite(slope) else None
    return None


@dataclasses.dataclass
class _Encoded:
    """The stages as the kernel's attributes (see mlp_taylor.cc) and its parameter operands."""

    kinds: list[int]
    slopes: list[float]
    links: list[int]
    parts: list[int]  # (stage, first unit, code) triples
    part_slopes: list[float]
    params: list
    core: list  # the stages the kernel runs
    lead: list  # elementwise affine maps before them (applied to x), and after them
    trail: list

    def weights(self) -> list:
        """The weight matrices among the parameters (what the kernel packs)."""
        from .. import _network

        return [s.weight for s in self.core if isinstance(s, _network.RuntimeAffine)]

    @property
    def has_skip(self) -> bool:
        return _SKIP in self.kinds

    def attributes(self) -> dict:
        parts, part_slopes = (self.parts, self.part_slopes) if self.parts else ([-1, 0, 0], [0.0])
        return dict(
            kinds=np.asarray(self.kinds, np.int64),
            slopes=np.asarray(self.slopes, np.float64),
            links=np.asarray(self.links, np.int64),
            parts=np.asarray(parts, np.int64),
            part_slopes=np.asarray(part_slopes, np.float64),
        )


_SKIP = -3


def _peel(stages):
    """``(lead, core, trail)``: the elementwise affine maps before the first and after the last
    other stage (input standardisation, output de-scaling), and the stages between."""
    from .. import _activations

    def linear(s):
        return isinstance(s, _activations.LinearActivation)

    i, j = 0, len(stages)
    while i < j and linear(stages[i]):
        i += 1
    while j > i and linear(stages[j - 1]):
        j -= 1
    return list(stages[:i]), list(stages[i:j]), list(stages[j:])


def _encode(stages) -> _Encoded | None:
    """The kernel's view of ``stages``, or None if a stage is not supported.

    Not supported: an activation outside the closed-form table (elementwise affine maps
    at either end are applied around the kernel), and a skip stage whose source comes
    before the first activation (the kernel keeps the leading layers' values unstacked).
    """
    from .. import _activations, _network

    lead, core, trail = _peel(stages)
    if not core:
        return None
    shift = len(lead)  # skip sources count the stages from the model's input
    e = _Encoded([], [], [], [], [], [], core, lead, trail)
    first_act = None
    for index, stage in enumerate(core):
        link = 0
        if isinstance(stage, _network.RuntimeAffine):
            if getattr(stage.weight, "ndim", None) != 2:
                return None
            kind, slope = (-1 if stage.bias is None else -2), 0.0
            e.params.append(stage.weight)
            if stage.bias is not None:
                e.params.append(stage.bias)
        elif isinstance(stage, _network.RuntimeSkip):
            source = stage.source - shift
            if first_act is None or source <= first_act:
                return None
            kind, slope, link = _SKIP, 0.0, source
        elif isinstance(stage, _activations.ColumnActivation):
            codes = [_activation_code(act) for act, _ in stage.parts]
            if None in codes:
                return None
            start = 0
            for (code, part_slope), (_, width) in zip(codes, stage.parts):
                e.parts += [index, start, code]
                e.part_slopes.append(part_slope)
                start += width
            kind, slope = codes[0]  # the stage's own entry: its first part
        else:
            code = _activation_code(stage)
            if code is None:
                return None
            kind, slope = code
        if kind >= 0 and first_act is None:
            first_act = index
        e.kinds.append(kind)
        e.slopes.append(slope)
        e.links.append(link)
    return e


def _xla_fields(stages, x, order: int, full: bool, algorithm: str = "forward"):
    """The same fields from the XLA recursion of ``algorithm`` (the custom call's JVP, and the reference)."""
    from .._derivatives import expand_fields
    from .._taylor._layered import forward_stack, unpack
    from .._taylor._layered_fwdrev import fwdrev_kernel

    if algorithm == "fwdrev":
        result = fwdrev_kernel(stages, x, stages_outputs(stages, x.shape[-1]), order)
    else:
        result = unpack(forward_stack(stages, x, order), x.shape[-1], order)
    if full:
        result = expand_fields(result, x.shape[-1])
    return tuple(result[: order + 1])


def _rebuild(stages, params):
    from .. import _network

    it = iter(params)
    out = []
    for stage in stages:
        if isinstance(stage, _network.RuntimeAffine):
            weight = next(it)
            bias = None if stage.bias is None else next(it)
            out.append(_network.RuntimeAffine(weight, bias))
        else:
            out.append(stage)
    return out


def _compose(maps):
    def f(z):
        for g in maps:
            z = g(z)
        return z

    return f


def _rescaled(fields, a_in, a_out, m: int, full: bool):
    """The fields of ``g(a_in x + c)`` and of ``a_out f + d`` from those of ``f``, elementwise.

    ``a_in`` (B, m) and ``a_out`` (B, n), or None: an order-``k`` partial along ``(j, ..)``
    is multiplied by ``a_out[i] * a_in[j] * ...``.
    """
    from .. import _symmetric

    out = [fields[0]]
    for k, f in enumerate(fields[1:], start=1):
        scale = None
        if a_in is not None:
            if k == 1:
                scale = a_in[:, None, :]
            elif full:
                letters = "jkl"[:k]
                spec = ",".join(f"b{c}" for c in letters) + "->b" + letters
                scale = jnp.einsum(spec, *([a_in] * k))[:, None]
            else:
                idx = _symmetric.sorted_tuples(m, k)
                scale = jnp.prod(a_in[:, idx], axis=-1)[:, None, :]
        if a_out is not None:
            o = a_out.reshape(a_out.shape + (1,) * (f.ndim - 2))
            scale = o if scale is None else o * scale
        out.append(f if scale is None else f * scale)
    return out


def applies(stages, x, order: int, algorithm: str = "forward") -> bool:
    """Whether :func:`native_derivatives` would run the native kernel (loads it if needed)."""
    if _OFF.get() or order not in (1, 2, 3) or getattr(x, "ndim", None) != 2:
        return False
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        return False
    if jax.default_backend() != "cpu":
        return False
    encoded = _encode(stages)
    if encoded is None or any(jnp.dtype(p.dtype) != jnp.dtype(x.dtype) for p in encoded.params):
        return False
    if algorithm in ("fwdrev", "fwdadj") and encoded.has_skip:
        return False  # the kernel's reverse sweeps have no fan-out
    return load()


def stages_outputs(stages, m: int) -> int:
    """The number of outputs of ``stages`` on ``m`` inputs."""
    widths = [s.weight.shape[1] for s in stages if hasattr(s, "weight")]
    return widths[-1] if widths else m


#: The kernel's algorithms, as its ``algorithm`` attribute encodes them.
ALGORITHM_CODES = {"forward": 0, "fwdrev": 1, "fwdadj": 2}


def _weights_token(weights) -> int:
    """A digest of the weight matrices' values if all are concrete, else 0 (the kernel's weights_token).

    Concrete weights at trace time are constants of the compiled program (``derivs_fn``
    bakes them in), so every run of it sees these values: the kernel keeps what it packed
    from them under the token (the biases are read where they are on each call). Traced
    ones (parameters passed in, gradients, ensembles under ``vmap``) may change from call
    to call: 0, packed anew each call.
    """
    if any(isinstance(w, jax.core.Tracer) for w in weights):
        return 0
    digest = hashlib.blake2b(digest_size=8)
    for p in weights:
        a = np.ascontiguousarray(np.asarray(p))
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return (int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)) or 1


def native_derivatives(stages, x, order: int, layout: str = "packed", algorithm: str = "forward"):
    """The derivative fields of ``stages`` at ``x`` (B, m) from the native kernel, or None.

    Returns ``(value, jacobian, hessian, third)[: order + 1]`` with outputs first, in
    ``layout`` (``"packed"``: ``(B, n, C(m+1,2))``, ``(B, n, C(m+2,3))``; ``"full"``:
    ``(B, n, m, m)``, ``(B, n, m, m, m)``), or None where the kernel does not apply.
    ``algorithm``: ``"forward"`` (the packed forward recursion to ``order``) or
    ``"fwdrev"`` (forward to ``order - 1``, then one reverse sweep per output); the same
    numbers up to rounding.
    """
    if algorithm not in ALGORITHM_CODES:
        raise ValueError(f"unknown algorithm {algorithm!r}; one of {tuple(ALGORITHM_CODES)}")
    if layout not in ("packed", "full") or not applies(stages, x, order, algorithm):
        return None
    encoded = _encode(stages)
    params, core = encoded.params, encoded.core
    lead, trail = _compose(encoded.lead), _compose(encoded.trail)
    x_in = x
    x = lead(x_in) if encoded.lead else x_in
    full = layout == "full"
    batch, m = x.shape
    n = stages_outputs(core, m)
    shapes = [(batch, n), (batch, n, m)]
    shapes.append((batch, n, m, m) if full else (batch, n, comb(m + 1, 2)))
    shapes.append((batch, n, m, m, m) if full else (batch, n, comb(m + 2, 3)))
    result_types = [jax.ShapeDtypeStruct(s, x.dtype) for s in shapes[: order + 1]]
    call = jax.ffi.ffi_call(TARGET, result_types, vmap_method="expand_dims")
    attrs = dict(
        **encoded.attributes(),
        order=np.int64(order),
        full=np.int64(full),
        algorithm=np.int64(ALGORITHM_CODES[algorithm]),
        weights_token=np.int64(_weights_token(encoded.weights())),
    )

    @jax.custom_jvp
    def fields(x, *params):
        return tuple(call(x, *params, **attrs))

    @fields.defjvp
    def fields_jvp(primals, tangents):
        out = fields(*primals)
        _, tangent_out = jax.jvp(
            lambda x, *params: _xla_fields(_rebuild(core, params), x, order, full, algorithm), primals, tangents
        )
        return out, tangent_out

    result = fields(x, *params)
    if not (encoded.lead or encoded.trail):
        return result
    ones = jnp.ones_like
    a_in = jax.jvp(lead, (x_in,), (ones(x_in),))[1] if encoded.lead else None
    value, a_out = jax.jvp(trail, (result[0],), (ones(result[0]),)) if encoded.trail else (result[0], None)
    return tuple(_rescaled([value, *result[1:]], a_in, a_out, m, full))


# The layout the caller of a method will return. ``_api`` sets it around the method call,
# so the native kernel writes full tensors directly (no gather ops after the custom call);
# every other kernel returns packed fields and ``_api`` expands those.
_LAYOUT: contextvars.ContextVar[str] = contextvars.ContextVar("nnderiv_native_layout", default="packed")


@contextlib.contextmanager
def layout_request(layout: str):
    """Within the block, :func:`requested_layout` is ``layout``."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def requested_layout() -> str:
    return _LAYOUT.get()


_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("nnderiv_native_off", default=False)


@contextlib.contextmanager
def disabled():
    """Within the block, programs traced use the XLA recursions (A/B timings, tests)."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


def is_full(result) -> bool:
    """Whether the Hessian/third fields of a flat-batch result are already full tensors."""
    return any(f is not None and f.ndim >= 4 for f in tuple(result)[2:])


__all__ = ["ACTIVATION_CODES", "build", "cache_dir", "load", "native_derivatives", "applies", "status"]

if sys.platform == "win32":  # pragma: no cover - the build assumes a Unix toolchain
    _state.checked, _state.reason = True, "not supported on Windows"
