"""The public entry points: :func:`derivatives` and :func:`derivs_fn`."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import _batching, _native, _network
from ._derivatives import Derivatives
from ._shapes import Points
from .methods import METHODS, Method, _measured
from .methods._plan import in_layout

#: The orders with a named field of :class:`Derivatives` (value, jacobian, hessian, third).
#: Any integer order >= 0 can be asked for; ``d.derivative(k)`` reads every one.
ORDERS = (0, 1, 2, 3)
LAYOUTS = ("full", "packed")
_PLAIN_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # inputs DerivsFn passes on unchanged


def _check_options(order, method, layout="full") -> None:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 0:
        raise ValueError(f"order must be an integer >= 0, got {order!r}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods are {sorted(METHODS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts are {LAYOUTS}")


def _check_network(net) -> None:
    if not isinstance(net, _network.Network):
        raise TypeError(
            f"expected an nnderiv.Network (from nnderiv.from_flax or nnderiv.from_function), got {type(net).__name__}"
        )


def _as_input(net: _network.Network, x) -> jax.Array:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        try:
            x = np.asarray(x)
        except Exception as err:  # noqa: BLE001
            raise TypeError(f"x must be an array of shape (m,) or (*batch, m), got {type(x).__name__}") from err
    if not (jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.bool_)):
        # Strings, objects (None, dicts, ragged nests): say so before JAX's own message.
        raise TypeError(
            f"x must be a numeric array of shape (m,) or (*batch, m), got dtype {x.dtype} "
            f"(from {type(x).__name__}); pass a floating-point array"
        )
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"x has complex dtype {dtype}; derivatives are defined for real inputs: pass x.real")
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.number):
        raise TypeError(f"x has dtype {dtype}; pass a floating-point array (e.g. x.astype(float))")
    if not jnp.issubdtype(dtype, jnp.floating):
        x = jnp.asarray(x, dtype=jnp.result_type(float))  # integers: the default float type
    elif jnp.finfo(dtype).bits < 32:
        # float16 / bfloat16 have eps 1e-3 / 8e-3; the third derivatives carry ~1e3 ulps of
        # rounding error (tests/test_float32.py), i.e. no correct digit. Compute in float32.
        x = jnp.asarray(x, dtype=jnp.float32)
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("x is a scalar; pass shape (m,) for one point or (*batch, m) for many (e.g. x.reshape(1))")
    m = x.shape[-1]
    if net.input_dim is not None and m != net.input_dim:
        raise ValueError(
            f"x has {m} features in its last axis but the model takes {net.input_dim}; "
            f"pass x of shape (*batch, {net.input_dim})"
        )
    if m == 0:
        raise ValueError("x has 0 features in its last axis; the model needs at least one input")
    return x


def _check_output(net: _network.Network, m: int, dtype):
    """Check the model maps one point to an array of shape (n,) or (); its output dtype."""
    try:
        out = jax.eval_shape(lambda p, u: net.spec.apply(p, u), net.params, jax.ShapeDtypeStruct((m,), dtype))
    except Exception as err:  # noqa: BLE001 - re-raised with the context a user needs
        raise ValueError(
            f"the model {net.spec.name} could not be evaluated on one point of shape ({m},): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) > 1:
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"the model must map one point (m,) to an array of shape (n,) or (); got {shape}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"the model's output has dtype {out.dtype}; derivatives need a floating-point output")
    return out.dtype


def derivatives(
    net: _network.Network, x: Points, order: int = 3, method: str = "auto", layout: str = "full"
) -> Derivatives:
    r"""Value and all input derivatives of ``net`` up to ``order`` at the points ``x``.

    For ``f: R^m -> R^n``:

    .. math::
        \mathrm{jacobian}_{ij} = \partial_j f_i,\quad
        \mathrm{hessian}_{ijk} = \partial_j \partial_k f_i,\quad
        \mathrm{third}_{ijkl} = \partial_j \partial_k \partial_l f_i .

    Traceable: works inside the caller's ``jit``, ``vmap``, ``lax.scan`` and ``grad``
    (also with respect to the network's parameters). For repeated calls prefer the
    jitted :func:`derivs_fn`.

    Points are independent: a NaN or inf in one point (row of ``x``) changes only that
    point's outputs, which follow IEEE arithmetic through the model (a NaN input to a
    tanh MLP gives NaN everywhere in its row; an infinite one saturates the units, and
    ``tanh'(+-inf) = 0``). Non-finite values raise no error, so one bad point cannot
    fail a batch; check ``jnp.isfinite`` on the result where it matters.

    Args:
      net: a :class:`Network` from :func:`from_flax` or :func:`from_function`.
      x: shape ``(m,)`` or ``(*batch, m)`` (``Real[ArrayLike, "*batch m"]``; nested
        lists are converted too); integer inputs are promoted to the default float
        type, float16 and bfloat16 to float32 (their 3 significant digits leave no
        correct digit in a third derivative); complex and boolean inputs are rejected.
      order: highest order, any integer >= 0 (``d.derivative(k)`` reads order ``k``; the
        first four also as ``value``, ``jacobian``, ``hessian``, ``third``). An order whose
        result and Taylor stacks would not fit in memory for the batch is refused before
        anything is traced, with the size needed and a ``batch_size`` that fits.
      method: ``"analytic"`` (packed Taylor arithmetic: the forward, the
        forward-over-reverse or the forward-with-adjoint algorithm, whichever is predicted
        faster; each can be asked for directly as ``"forward"``, ``"fwdrev"`` or
        ``"fwdadj"``, the last the native kernel's alone, forward elsewhere. They run on the Taylor
        engine, for any model made of supported primitives -- residual blocks,
        normalisation, Fourier features, output transforms -- and any order, and it names
        the primitive it cannot take; a layered model up to order 3 takes its fused path,
        one call of the native CPU kernel where that applies), ``"jet"``
        (``jax.experimental.jet``), ``"nested"`` (nested ``jacfwd``/``jacrev``) or
        ``"auto"`` (default: the fastest that applies).
      layout: ``"full"`` (default) or ``"packed"``: the Hessian and third tensor hold
        only their unique entries, shapes ``(*batch, n, C(m+1,2))`` and
        ``(*batch, n, C(m+2,3))``, in the order of :func:`nnderiv.packed_indices`
        (sorted index tuples, lexicographic). Memory then grows with the number of
        unique entries instead of ``m**3``.

    Returns:
      :class:`Derivatives` with fields of shapes ``(*batch, n)``, ``(*batch, n, m)``,
      ``(*batch, n, m, m)``, ``(*batch, n, m, m, m)``, ... (order ``k``:
      ``(*batch, n) + (m,) * k``); fields above ``order`` are None
      (shapes as ``jaxtyping`` annotations: :mod:`nnderiv._shapes`).

    Example:
      >>> import jax.numpy as jnp, nnderiv
      >>> net = nnderiv.from_function(lambda p, x: p * x[0] ** 3, 2.0, input_dim=1)
      >>> d = nnderiv.derivatives(net, jnp.array([1.0]))
      >>> float(d.value[0]), float(d.jacobian[0, 0]), float(d.hessian[0, 0, 0]), float(d.third[0, 0, 0, 0])
      (2.0, 6.0, 12.0, 12.0)
    """
    _check_options(order, method, layout)
    _check_network(net)
    x = _as_input(net, x)
    wider = jnp.promote_types(x.dtype, _check_output(net, x.shape[-1], x.dtype))
    # float32 points into a float64 model: the model promotes them in its first layer, so
    # its value is float64; differentiate in float64 too, or AD would return float32
    # derivatives (the dtype of x) next to a float64 value.
    x = x.astype(wider)
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((net, x))):
        # Called eagerly: run one compiled program instead of hundreds of op-by-op
        # dispatches (measured 0.5 s vs 2 s for a first call on the bundled model). The
        # cache is keyed by the network's structure, so a model wrapped anew with other
        # variables reuses the program.
        return _compiled_derivatives(net, x, int(order), method, layout)
    return _derivatives(net, x, int(order), method, layout)


def _available_bytes() -> int | None:
    """Memory the computation may use: the default device's limit, or the host's available RAM."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    except Exception:  # noqa: BLE001 - no stats on this backend
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def check_memory(net: _network.Network, batch: int, m: int, dtype, order: int, layout: str, available=None) -> None:
    """Refuse, before anything is traced, an order whose stacks would not fit for ``batch`` points.

    The estimate: the result (``n`` outputs times every unique entry of orders ``0..k``, or
    ``m**j`` entries per order ``j`` in the full layout) plus the working set of the packed
    Taylor stacks, ``C(m+k, k)`` coefficients for each of the model's widest live values.
    """
    if batch == 0 or order <= 3:
        return
    program = _network.trace_program(net, m, dtype)
    n = _network.output_dim(net, m, dtype)
    widest = max([n, m] + [math.prod(o.shape) for e in program.eqns for o in e.outputs if hasattr(o, "shape")])
    itemsize = jnp.dtype(dtype).itemsize
    unique = sum(math.comb(m + j - 1, j) for j in range(order + 1))
    stored = unique if layout == "packed" else sum(m**j for j in range(order + 1))
    out_bytes = batch * n * stored * itemsize
    work_bytes = 2 * batch * math.comb(m + order, order) * widest * itemsize
    need = out_bytes + work_bytes
    available = _available_bytes() if available is None else available
    if available is None or need <= available:
        return
    per_point = need / batch
    fits = max(1, int(available // (2 * per_point)))
    raise ValueError(
        f"order {order} for {batch} points of {m} inputs would need about {_gib(need)} "
        f"(result {_gib(out_bytes)}{' in the full layout' if layout == 'full' else ''}, "
        f"Taylor stacks {_gib(work_bytes)}), more than the {_gib(available)} available. "
        f"Pass a smaller batch_size to derivs_fn (e.g. batch_size={fits}), "
        + ("use layout='packed', " if layout == "full" else "")
        + "or a lower order."
    )


def _derivatives(net: _network.Network, x: jax.Array, order: int, method: str, layout: str) -> Derivatives:
    batch_shape, m = x.shape[:-1], x.shape[-1]
    check_memory(net, math.prod(batch_shape), m, x.dtype, order, layout)
    chosen = METHODS[method]
    with _native.layout_request(layout):  # the native kernel writes the full layout itself
        if isinstance(chosen, Method):
            plan = chosen.init(net, m, x.dtype, order, math.prod(batch_shape), measure=_measured.requested())
            result = chosen.compute(plan, net, x.reshape(-1, m))
        else:  # a plain function (net, x (B, m), order) -> Derivatives put in the table
            result = chosen(net, x.reshape(-1, m), order)
    # Every method returns packed tensors (orders >= 2 hold their unique entries), except
    # the native kernel asked for the full layout.
    result = in_layout(result, layout, m)
    return result.map(lambda f: f.reshape(*batch_shape, *f.shape[1:]))


_compiled_derivatives = jax.jit(_derivatives, static_argnums=(2, 3, 4))


class DerivsFn:
    """A jitted ``x -> Derivatives`` for one network, order, method and layout (see :func:`derivs_fn`).

    Attributes:
      trace_count: how many times the derivative program was traced (compiled). With
        ``batch_size`` it counts traces of the chunk program, which has one shape.
    """

    def __init__(
        self,
        net: _network.Network,
        order: int,
        method: str,
        layout: str = "full",
        batch_size: int | None = None,
        mesh: Mesh | None = None,
    ):
        self.net, self.order, self.method, self.layout = net, order, method, layout
        self.batch_size, self.mesh = batch_size, mesh
        self.trace_count = 0

        def compute(net, flat):  # (B, m) -> fields with leading axis B
            return derivatives(net, flat, order, method, layout)

        def impl(net, x):
            self.trace_count += 1  # runs only while tracing: counts compilations
            with _measured.allowed():  # compiled for reuse: worth timing close candidates
                return tuple(_impl(net, x))  # a tuple dispatches faster; __call__ rewraps it

        def _impl(net, x):
            if batch_size is None and mesh is None:
                return derivatives(net, x, order, method, layout)
            x = _as_input(net, x)
            batch_shape, m = x.shape[:-1], x.shape[-1]
            _check_output(net, m, x.dtype)
            flat, fn = x.reshape(-1, m), functools.partial(compute, net)
            if mesh is not None:
                out = _batching.shard_batch(fn, flat, mesh, batch_size)
            else:
                out = _batching.map_chunks(fn, flat, batch_size)
            return out.map(lambda f: f.reshape(*batch_shape, *f.shape[1:]))

        def chunk_impl(net, x):  # one (batch_size, m) chunk
            self.trace_count += 1
            with _measured.allowed():
                return compute(net, x)

        # The parameters of a derivs_fn are fixed: baking them in as constants lets XLA
        # fold everything that depends on them alone (transposes, casts, products of
        # first-layer weights), which is most of the op count of a single-point call.
        # Traced parameters (derivs_fn built inside a transformation) cannot be baked.
        leaves = jax.tree_util.tree_leaves(net)
        self._bake = not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)
        self._jitted = jax.jit(functools.partial(impl, net)) if self._bake else jax.jit(impl)
        self._runner = None
        self._input_dim = net.input_dim
        if batch_size is not None and mesh is None and self._bake:
            # Concrete inputs: a host loop over one compiled (batch_size, m) program, so a
            # new total size compiles nothing new and only one chunk's work is in memory.
            self._runner = _batching.ChunkedRunner(jax.jit(functools.partial(chunk_impl, net)), batch_size)

    def __call__(self, x: Points) -> Derivatives:
        if self._runner is not None and not isinstance(x, jax.core.Tracer):
            x = _as_input(self.net, x)
            return self._runner(np.asarray(x).reshape(-1, x.shape[-1]), x.shape[:-1])
        # Inside the caller's jit/vmap a tracer is validated while tracing. Outside, one
        # check lets the usual case through; anything else gets the clear errors and
        # promotions of _as_input before tracing (non-arrays, odd dtypes, wrong sizes).
        if not (
            isinstance(x, (jax.Array, np.ndarray))
            and x.dtype in _PLAIN_DTYPES
            and x.ndim > 0
            and x.shape[-1] == self._input_dim
        ) and not isinstance(x, jax.core.Tracer):
            x = _as_input(self.net, x)
        tensors = self._jitted(x) if self._bake else self._jitted(self.net, x)
        return Derivatives._of(tensors, self.layout, x.shape[-1])

    def lower(self, x):
        """Lower for ``x`` (for inspecting the compiled program; with ``batch_size``, one chunk's)."""
        if self._runner is not None:
            x = _as_input(self.net, x)
            return self._runner.chunk_fn.lower(jax.ShapeDtypeStruct((self.batch_size, x.shape[-1]), x.dtype))
        return self._jitted.lower(x) if self._bake else self._jitted.lower(self.net, x)

    def __repr__(self) -> str:
        extra = "" if self.batch_size is None else f", batch_size={self.batch_size}"
        extra += "" if self.mesh is None else f", mesh={dict(self.mesh.shape)}"
        return f"DerivsFn({self.net!r}, order={self.order}, method={self.method!r}, layout={self.layout!r}{extra})"


def derivs_fn(
    net: _network.Network,
    order: int = 3,
    method: str = "auto",
    layout: str = "full",
    *,
    batch_size: int | None = None,
    mesh=None,
) -> DerivsFn:
    r"""A jitted function ``x -> Derivatives`` (see :func:`derivatives` for the math).

    Compiled once per input shape and dtype; repeated calls with the same shapes do not
    retrace (``derivs.trace_count`` counts traces). Call it from inside your own jitted
    simulation code as well.

    Every point is computed independently of the others, so splitting the batch changes
    no result: row ``b`` of the output depends on row ``b`` of ``x`` only (a NaN or inf in
    one point stays in that point's row).

    Args:
      net: a :class:`Network` from :func:`from_flax` or :func:`from_function`.
      order, method, layout: as for :func:`derivatives`.
      batch_size: evaluate the batch ``batch_size`` points at a time. Peak memory is then
        the output plus one chunk's working set, ``O(batch_size * K * width)`` with
        ``K = C(m+3,3)`` Taylor coefficients per unit, instead of growing with the whole
        batch. Called on a concrete array, one program for a ``(batch_size, m)`` chunk is
        compiled once and reused for every total size (the last chunk is padded with
        zero points, whose results are dropped); each chunk's result is written in place
        into the preallocated output. Inside the caller's ``jit`` it becomes a
        ``lax.map`` over chunks. ``layout="packed"`` gives the smallest output.
      mesh: ``None`` (one device), ``"all"`` (a one-axis mesh over ``jax.devices()``) or a
        ``jax.sharding.Mesh``: the batch is split over all the mesh's devices (padded to
        a multiple of their number) and the result comes back sharded along the batch
        axis. With ``batch_size``, each device works through its block in chunks.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, nnderiv
      >>> model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(2)])
      >>> net = nnderiv.from_flax(model, model.init(jax.random.PRNGKey(0), jnp.ones(3)))
      >>> derivs = nnderiv.derivs_fn(net, order=3)
      >>> d = derivs(jnp.ones((5, 3)))
      >>> d.third.shape
      (5, 2, 3, 3, 3)

      Large batches, 4 points at a time: any size, one compilation.

      >>> chunked = nnderiv.derivs_fn(net, order=3, batch_size=4)
      >>> [chunked(jnp.ones((b, 3))).third.shape for b in (5, 11)]
      [(5, 2, 3, 3, 3), (11, 2, 3, 3, 3)]
      >>> chunked.trace_count
      1
      >>> bool(jnp.allclose(chunked(jnp.ones((5, 3))).third, d.third, rtol=1e-12, atol=0))
      True
    """
    _check_options(order, method, layout)
    _check_network(net)
    batch_size = _batching.check_batch_size(batch_size)
    return DerivsFn(net, int(order), method, layout, batch_size, _batching.resolve_mesh(mesh))


def sharded_derivs_fn(
    net: _network.Network,
    order: int = 3,
    method: str = "auto",
    layout: str = "full",
    *,
    mesh="all",
    batch_size: int | None = None,
) -> DerivsFn:
    r"""A jitted ``x -> Derivatives`` that splits the batch over devices: ``derivs_fn(..., mesh=mesh)``.

    With ``D`` devices in ``mesh`` (default: all of ``jax.devices()``), a batch of ``B``
    points is padded to ``D * ceil(B / D)`` with zero points; device ``d`` computes
    points ``d * ceil(B / D)`` to ``(d + 1) * ceil(B / D) - 1`` with the same per-point
    program as one device, and the padding is dropped. The fields come back as arrays
    sharded along their batch axis when ``B`` is a multiple of ``D`` (JAX arrays cannot be
    sharded unevenly: for other ``B`` the result is gathered, so pad the batch yourself to
    keep a large output distributed). Multi-host: after
    ``jax.distributed.initialize()``, ``jax.devices()`` lists every host's devices, so the
    default mesh is global; feed each host's points with
    ``jax.make_array_from_process_local_data(NamedSharding(mesh, P("batch")), local_x)``.

    Example:
      >>> import jax, jax.numpy as jnp, nnderiv
      >>> net = nnderiv.bundled_network()
      >>> derivs = nnderiv.sharded_derivs_fn(net, order=2)
      >>> d = derivs(jnp.zeros((6, 3)))
      >>> d.hessian.shape, len(d.hessian.sharding.device_set) == jax.device_count()
      ((6, 2, 3, 3), True)
    """
    return derivs_fn(net, order, method, layout, batch_size=batch_size, mesh=mesh)
