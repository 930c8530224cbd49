"""Molecular simulation on a learned potential energy surface, with every derivative from nnderiv.

The bundled network (``nnderiv.bundled_network()``: a 3 -> 32 -> 32 -> 2 tanh MLP) was
fitted to the potential energy ``V(q)`` and dipole moment ``mu(q)`` of a bent triatomic
molecule in three dimensionless internal coordinates ``q = (q1, q2, q3)`` (two bond
stretches and the bend; see ``nnderiv/_bundled.py``). This script treats it as a
learned surface and runs, all under ``jit`` with the jitted ``nnderiv.derivs_fn``
called inside ``lax.scan``:

1. **Minimisation by Halley's method** from many random starts at once (a batch). With
   ``g = dV/dq``, ``H = d2V/dq2`` and ``T = d3V/dq3`` at the iterate, the Newton step
   solves ``H d = -g`` and Halley's correction solves ``(H + 1/2 T.d) d' = -g``
   (``(T.d)_ab = T_abc d_c``), which converges cubically instead of quadratically. Far
   from a minimum the step falls back to a shifted, length-limited Newton step (the
   Hessian plus enough of the identity to be positive definite), so every start
   descends. Newton's method runs from the same starts for comparison.
2. **Vibrational analysis** at the minimum, with unit masses (kinetic energy
   ``|dq/dt|^2 / 2``): the Hessian's eigenvalues are the squared harmonic frequencies
   ``omega_i^2`` and its eigenvectors ``L`` the normal modes ``Q = L^T (q - q_eq)``; the
   third tensor rotated to normal coordinates, ``phi_ijk = T_abc L_ai L_bj L_ck``, holds
   the cubic force constants (the leading anharmonicity); the dipole's gradient gives
   each mode's infrared intensity ``(dmu/dQ_i)^2``. The same analysis of the exact
   target function (``nnderiv.bundled_target``, by nested AD) shows how close the fit is.
3. **Dynamics** ``q'' = -grad V(q)`` from the minimum with every mode excited, by a
   sixth-order Hermite predictor-corrector (as in N-body codes). With ``a = -g``, jerk
   ``j = da/dt = -H v`` and snap ``s = dj/dt = -T.v.v - H a`` at both ends of a step of
   length ``h``, the corrector is the two-point Hermite quadrature

       v1 = v0 + h/2 (a0 + a1) - h^2/10 (j1 - j0) + h^3/120 (s0 + s1)
       q1 = q0 + h/2 (v0 + v1) - h^2/10 (a1 - a0) + h^3/120 (j0 + j1),

   exact for quintic accelerations; the rates at the new end come from one derivative
   call at a point predicted by the Taylor series of q and v (to the snap, plus a crackle
   ``ds/dt`` interpolated from the previous step). So each step uses the value (energy),
   gradient, Hessian and third tensor of V, and the dipole's value (the infrared
   spectrum). The run tracks energy conservation; repeats with the classic fourth-order
   Hermite scheme (no snap, so no third tensor: ``h^2/12`` and no ``h^3`` terms) to show
   what the third derivatives buy; reads each mode's anharmonic frequency off the
   trajectory; and times the scan with ``method="auto"`` (nnderiv's analytic kernel)
   against ``method="nested"`` (``jacfwd(jacfwd(jacrev))``): the same trajectory to
   rounding, and the cost per step (one derivative call each) compared.

Run: ``python examples/simulation.py`` (float64; about 20 s on a 2-core CPU), or cell by
cell in an editor that understands ``# %%``. It prints the minimum with the gradient
norms of Halley's and Newton's iterations, a table of the normal modes (harmonic and
trajectory frequencies, infrared intensities, network and exact), the cubic force
constants, and the dynamics: energy error with and without the third tensor, and
microseconds per step for ``auto`` and ``nested`` (the two scans take turns, ``--repeats``
rounds after a warm-up; the median counts). Smaller:
``python examples/simulation.py --steps 2000 --starts 16 --repeats 2``. ``--json``
prints a machine-readable summary on stdout (the report then goes to stderr);
``--quiet`` hides the report.
"""

# %%
import argparse
import functools
import json
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)  # float64: the 1e-10 comparisons need it

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import nnderiv  # noqa: E402


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


parser = argparse.ArgumentParser(description="Halley minimisation, vibrational analysis and dynamics on a learned PES")
parser.add_argument("--steps", type=positive_int, default=20000, help="integration steps (default 20000)")
parser.add_argument("--dt", type=float, default=0.04, help="time step (default 0.04; periods are about 5)")
parser.add_argument("--energy", type=float, default=0.05, help="vibrational energy above the minimum (default 0.05)")
parser.add_argument("--starts", type=positive_int, default=256, help="random starts for the minimisation (default 256)")
parser.add_argument("--iterations", type=positive_int, default=25, help="Halley / Newton iterations (default 25)")
parser.add_argument("--repeats", type=positive_int, default=5, help="timed repeats of each trajectory (default 5)")
parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
parser.add_argument("--quiet", action="store_true", help="no report, only the --json summary if asked")
parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout (report on stderr)")
args, _ = parser.parse_known_args()  # known args only: tolerate a notebook kernel's own

console = Console(stderr=args.json, quiet=args.quiet)
wall_start = time.perf_counter()
POTENTIAL, DIPOLE = 0, 1  # the network's outputs

net = nnderiv.bundled_network(jnp.float64)
derivs = nnderiv.derivs_fn(net, order=3)  # method="auto": the analytic kernel
derivs_nested = nnderiv.derivs_fn(net, order=3, method="nested")
# The function the network was trained on, for comparison (a plain function: nested AD).
exact = nnderiv.from_function(lambda _, q: nnderiv.bundled_target(q), None, input_dim=3, name="bundled_target")
derivs_exact = nnderiv.derivs_fn(exact, order=3)

# %% [markdown]
# ## 1. The minimum, by Halley's method from many starts
#
# One batched derivative call per iteration for all starts; ``lax.scan`` over the
# iterations records every start's gradient norm so the convergence can be inspected.

# %%
TRUST_RADIUS = 0.3  # longest step far from the minimum (the domain is [-1, 1]^3)
MIN_CURVATURE = 1e-2  # the shifted Hessian's smallest eigenvalue when H is not positive definite


def minimisation_step(derivs, use_third, q):
    """One safeguarded Halley (or Newton) step at the points q (B, 3); also returns |grad V|."""
    d = derivs(q)
    g, H, T = d.jacobian[:, POTENTIAL], d.hessian[:, POTENTIAL], d.third[:, POTENTIAL]
    eye = jnp.eye(q.shape[-1])
    lowest = jnp.linalg.eigvalsh(H)[:, 0]
    shift = jnp.maximum(MIN_CURVATURE - lowest, 0.0)  # zero where H is positive definite enough
    newton = -jnp.linalg.solve(H + shift[:, None, None] * eye, g[..., None])[..., 0]
    step = newton
    if use_third:
        corrected = H + 0.5 * jnp.einsum("bijk,bk->bij", T, newton)
        halley = -jnp.linalg.solve(corrected, g[..., None])[..., 0]
        # Halley's correction only where the plain Newton step was taken and still descends.
        ok = (shift == 0.0) & (jnp.linalg.eigvalsh(corrected)[:, 0] > 0.0)
        step = jnp.where(ok[:, None], halley, newton)
    length = jnp.linalg.norm(step, axis=-1, keepdims=True)
    step = step * jnp.minimum(1.0, TRUST_RADIUS / jnp.maximum(length, 1e-300))
    return q + step, jnp.linalg.norm(g, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def minimise(derivs, use_third, q0, iterations):
    """Run ``iterations`` steps from the starts q0 (B, 3): final points and |grad V| per iteration (iters, B)."""
    q, grad_norms = jax.lax.scan(lambda q, _: minimisation_step(derivs, use_third, q), q0, None, length=iterations)
    final_grad = jnp.linalg.norm(derivs(q).jacobian[:, POTENTIAL], axis=-1)
    return q, jnp.concatenate([grad_norms, final_grad[None]])


def iterations_to(grad_norms, tol):
    """Per start, the first iteration whose gradient norm is below tol (len(grad_norms) if never)."""
    below = np.asarray(grad_norms) < tol
    return np.where(below.any(0), below.argmax(0), len(below))


key = jax.random.PRNGKey(args.seed)
key_starts, key_phases = jax.random.split(key)
starts = jax.random.uniform(key_starts, (args.starts, 3), minval=-1.0, maxval=1.0)
q_halley, grad_halley = minimise(derivs, True, starts, args.iterations)
q_newton, grad_newton = minimise(derivs, False, starts, args.iterations)

# The lowest converged point is the equilibrium; count the starts that reached it.
CONVERGED = 1e-10
final_v = derivs(q_halley).value[:, POTENTIAL]
converged = np.asarray(grad_halley[-1] < CONVERGED)
best = int(np.argmin(np.where(converged, np.asarray(final_v), np.inf)))
q_eq = q_halley[best]
at_eq = np.asarray(jnp.linalg.norm(q_halley - q_eq, axis=-1) < 1e-8) & converged
halley_iters = iterations_to(grad_halley, 1e-12)[at_eq]
newton_iters = iterations_to(grad_newton, 1e-12)[at_eq]

# The exact target's own minimum, from the network's: a few iterations suffice.
q_eq_exact, grad_exact = minimise(derivs_exact, True, q_eq[None], 10)
q_eq_exact = q_eq_exact[0]


def gradient_trace(grad_norms, start):
    """One start's gradient norms, iteration by iteration, until they reach rounding level."""
    trace = np.asarray(grad_norms[:, start])
    return " ".join(f"{g:.0e}" for g in trace[: iterations_to(trace[:, None], 1e-14)[0] + 1])


# The first start that reached the minimum from some distance: its convergence, both methods.
shown = int(np.argmax(at_eq & (np.asarray(grad_halley[0]) > 0.5)))
console.print(f"[bold]Minimum of the learned V[/bold] (Halley, {args.starts} random starts in [-1, 1]^3)")
console.print(f"  q_eq = {np.array2string(np.asarray(q_eq), precision=6)}, V(q_eq) = {float(final_v[best]):+.6f}")
console.print(f"  |grad V| = {float(grad_halley[-1, best]):.1e}; {int(at_eq.sum())}/{args.starts} starts reached it")
console.print(
    f"  iterations to |grad V| < 1e-12, median: Halley {np.median(halley_iters):.0f}, "
    f"Newton {np.median(newton_iters):.0f}"
)
console.print(f"  |grad V| per iteration from start {shown}:")
console.print(f"    Halley  {gradient_trace(grad_halley, shown)}")
console.print(f"    Newton  {gradient_trace(grad_newton, shown)}")
console.print(
    f"  the exact target's minimum: max |q| = {float(jnp.max(jnp.abs(q_eq_exact))):.0e},"
    f" |grad| = {float(grad_exact[-1, 0]):.0e}"
)
console.print(f"  the network's minimum is {float(jnp.linalg.norm(q_eq - q_eq_exact)):.4f} away from it")

# %% [markdown]
# ## 2. Harmonic frequencies, cubic force constants and infrared intensities


# %%
def vibrational_analysis(derivs, q):
    """Frequencies, normal modes (columns), cubic constants phi_ijk and IR intensities at the minimum q."""
    d = derivs(q)
    omega2, modes = jnp.linalg.eigh(d.hessian[POTENTIAL])
    # An eigenvector's sign is arbitrary: fix it (largest component positive) so that the
    # printed cubic constants do not depend on the eigensolver's choice.
    largest = jnp.take_along_axis(modes, jnp.argmax(jnp.abs(modes), axis=0)[None], axis=0)
    modes = modes * jnp.sign(largest)
    cubic = jnp.einsum("abc,ai,bj,ck->ijk", d.third[POTENTIAL], modes, modes, modes)
    dipole_slope = d.jacobian[DIPOLE] @ modes  # dmu/dQ_i
    return {
        "omega": jnp.sqrt(omega2),
        "modes": modes,
        "third": d.third[POTENTIAL],
        "cubic": cubic,
        "intensity": dipole_slope**2,
    }


vib = vibrational_analysis(derivs, q_eq)
vib_exact = vibrational_analysis(derivs_exact, q_eq_exact)
cubic_indices = [tuple(int(i) for i in row) for row in nnderiv.packed_indices(3, 3)]  # the 10 unique i <= j <= k

# %% [markdown]
# ## 3. Dynamics: a sixth-order Hermite integrator inside ``lax.scan``


# %%
def rates(d, v):
    """Acceleration, jerk and snap at a point from its derivatives d (one point) and velocity v."""
    g, H, T = d.jacobian[POTENTIAL], d.hessian[POTENTIAL], d.third[POTENTIAL]
    a = -g
    return a, -H @ v, -jnp.einsum("abc,b,c->a", T, v, v) - H @ a


def hermite_step(derivs, with_third, dt, state):
    """One predict-evaluate-correct step of q'' = -grad V(q); records the energy, the dipole and q."""
    q, v, a, jerk, snap, crackle = state
    if not with_third:  # the fourth-order scheme: no snap (and no crackle) anywhere
        snap = crackle = jnp.zeros_like(snap)
    q_pred = q + dt * v + dt**2 / 2 * a + dt**3 / 6 * jerk + dt**4 / 24 * snap + dt**5 / 120 * crackle
    v_pred = v + dt * a + dt**2 / 2 * jerk + dt**3 / 6 * snap + dt**4 / 24 * crackle
    d = derivs(q_pred)  # the one derivative call of the step
    a_new, jerk_new, snap_new = rates(d, v_pred)
    if not with_third:
        snap_new = jnp.zeros_like(snap_new)
    # Two-point Hermite quadrature, exact for polynomials of degree 5 (with snaps) or 3.
    c2, c3 = (1 / 10, 1 / 120) if with_third else (1 / 12, 0.0)
    v_new = v + dt / 2 * (a + a_new) - c2 * dt**2 * (jerk_new - jerk) + c3 * dt**3 * (snap + snap_new)
    q_new = q + dt / 2 * (v + v_new) - c2 * dt**2 * (a_new - a) + c3 * dt**3 * (jerk + jerk_new)
    # The corrector moves the point only by the predictor's error (O(dt^4) or smaller) from
    # where the derivatives were taken: carry the rates with the corrected velocity, and V
    # and mu at q_new by their Taylor series about q_pred (neglected: O(|delta|^3), O(|delta|^2)).
    a_new, jerk_new, snap_new = rates(d, v_new)
    # The crackle (d snap/dt, which would need 4th derivatives) for the next prediction:
    # the third derivative, at the step's end, of the quintic through a, jerk, snap at both ends.
    crackle_new = (60 * (a_new - a) - dt * (24 * jerk + 36 * jerk_new) - dt**2 * (3 * snap - 9 * snap_new)) / dt**3
    delta = q_new - q_pred
    potential = d.value[POTENTIAL] + d.jacobian[POTENTIAL] @ delta + 0.5 * delta @ d.hessian[POTENTIAL] @ delta
    dipole = d.value[DIPOLE] + d.jacobian[DIPOLE] @ delta
    energy = 0.5 * v_new @ v_new + potential
    return (q_new, v_new, a_new, jerk_new, snap_new, crackle_new), (energy, dipole, q_new)


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5))
def trajectory(derivs, with_third, q0, v0, dt, steps):
    """``steps`` Hermite steps from (q0, v0): energies, dipoles and positions after each, each (steps, ...)."""
    a0, jerk0, snap0 = rates(derivs(q0), v0)
    state = (q0, v0, a0, jerk0, snap0, jnp.zeros_like(q0))  # no crackle estimate before the first step
    _, records = jax.lax.scan(lambda s, _: hermite_step(derivs, with_third, dt, s), state, None, length=steps)
    return records


# Start at the minimum with energy/3 in each normal mode, in random directions.
signs = jnp.where(jax.random.bernoulli(key_phases, shape=(3,)), 1.0, -1.0)
v0 = vib["modes"] @ (signs * jnp.sqrt(2.0 * args.energy / 3))
run = functools.partial(trajectory, q0=q_eq, v0=v0, dt=args.dt, steps=args.steps)


def interleaved_medians(fns, repeats):
    """Median wall time of each of fns over ``repeats`` rounds, after a warm-up (compile) call each.

    The functions take turns within each round, so a change in the machine's load hits all
    of them alike; returns the medians and each function's result.
    """
    results = [jax.block_until_ready(fn()) for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], results


seconds, records = interleaved_medians([lambda: run(derivs, True), lambda: run(derivs_nested, True)], args.repeats)
us_per_step = {"auto": 1e6 * seconds[0] / args.steps, "nested": 1e6 * seconds[1] / args.steps}
(energy, dipole, path), (_, _, path_nested) = records
energy_no_third, _, _ = run(derivs, False)

path_deviation = float(jnp.max(jnp.abs(path - path_nested)))
energy0 = float(derivs(q_eq).value[POTENTIAL]) + args.energy
energy_error = float(jnp.max(jnp.abs(energy - energy0)) / args.energy)
energy_error_no_third = float(jnp.max(jnp.abs(energy_no_third - energy0)) / args.energy)

# %% [markdown]
# ## 4. Spectra of the trajectory
#
# Each mode's frequency in the (anharmonic) motion is the peak of its normal
# coordinate's spectrum; the dipole's spectrum is the (classical) infrared spectrum.


# %%
def power_spectrum(signal, dt):
    """Angular frequencies and power of a signal's Hann-windowed FFT, zero-padded 8x to read peaks finely."""
    signal = np.asarray(signal) - np.mean(signal)
    padded = 8 * len(signal)
    power = np.abs(np.fft.rfft(signal * np.hanning(len(signal)), padded)) ** 2
    return 2 * np.pi * np.fft.rfftfreq(padded, dt), power


band = (0.5 * float(vib["omega"].min()), 1.5 * float(vib["omega"].max()))
md_omega = []
for mode in range(3):
    omega, power = power_spectrum((path - q_eq) @ vib["modes"][:, mode], args.dt)
    inside = (omega >= band[0]) & (omega <= band[1])
    md_omega.append(float(omega[inside][np.argmax(power[inside])]))
resolution = 2 * np.pi / (args.steps * args.dt)
# The dipole's power at each mode's frequency, relative to the largest.
omega, dipole_power = power_spectrum(dipole, args.dt)
ir_power = np.array([dipole_power[np.argmin(np.abs(omega - w))] for w in md_omega])
ir_power = ir_power / ir_power.max()

# %% [markdown]
# ## Summary

# %%
modes_table = Table(title="Normal modes at the minimum (unit masses, dimensionless)")
for column in ("mode", "ω net", "ω exact", "ω MD", "IR net", "IR exact", "IR MD"):
    modes_table.add_column(column, justify="right")
for i in range(3):
    modes_table.add_row(
        str(i),
        f"{float(vib['omega'][i]):.4f}",
        f"{float(vib_exact['omega'][i]):.4f}",
        f"{md_omega[i]:.4f}",
        f"{float(vib['intensity'][i]):.2e}",
        f"{float(vib_exact['intensity'][i]):.2e}",
        f"{ir_power[i]:.2e}",
    )
console.print(modes_table)
console.print("  ω: harmonic frequency; ω MD: the mode's peak in the trajectory (anharmonic)")
console.print(f"  (spectral bins {resolution:.4f}, read to ~{resolution / 8:.4f} by zero padding)")
console.print("  IR: intensity (dμ/dQ)²; IR MD: the dipole's spectral power there, relative")

# Normal modes of the two surfaces differ (the fit's Hessian error mixes the two upper
# modes differently), so the surfaces are compared in the common internal coordinates.
cubic_table = Table(title="Cubic force constants")
for column in ("ijk", "φ_ijk normal, net", "∂³V/∂q_i∂q_j∂q_k net", "exact"):
    cubic_table.add_column(column, justify="right")
for index in cubic_indices:
    cubic_table.add_row(
        "".join(map(str, index)),
        f"{float(vib['cubic'][index]):+.4f}",
        f"{float(vib['third'][index]):+.4f}",
        f"{float(vib_exact['third'][index]):+.4f}",
    )
console.print(cubic_table)

dynamics_table = Table(title=f"Dynamics: {args.steps} Hermite steps of {args.dt} from the minimum, E = {args.energy}")
dynamics_table.add_column("quantity")
dynamics_table.add_column("value", justify="right")
dynamics_table.add_row("max |E(t) - E(0)| / E, 6th-order Hermite (g, H, T)", f"{energy_error:.2e}")
dynamics_table.add_row("... 4th-order Hermite (g, H only)", f"{energy_error_no_third:.2e}")
dynamics_table.add_row("µs per step, method='auto' (nnderiv, one derivative call)", f"{us_per_step['auto']:.2f}")
dynamics_table.add_row("µs per step, method='nested'", f"{us_per_step['nested']:.2f}")
dynamics_table.add_row("speed-up of auto over nested", f"{us_per_step['nested'] / us_per_step['auto']:.2f}×")
dynamics_table.add_row("max |q_auto(t) - q_nested(t)| over the trajectory", f"{path_deviation:.1e}")
console.print(dynamics_table)
wall_seconds = time.perf_counter() - wall_start
console.print(f"total {wall_seconds:.1f} s; timings: median of {args.repeats} interleaved runs after a warm-up")

assert converged[best] and float(grad_halley[-1, best]) < CONVERGED
assert path_deviation < 1e-10, path_deviation

if args.json:
    summary = {
        "steps": args.steps,
        "dt": args.dt,
        "energy": args.energy,
        "starts": args.starts,
        "q_eq": np.asarray(q_eq).tolist(),
        "v_eq": float(final_v[best]),
        "grad_norm_eq": float(grad_halley[-1, best]),
        "starts_at_eq": int(at_eq.sum()),
        "halley_iterations_median": float(np.median(halley_iters)),
        "newton_iterations_median": float(np.median(newton_iters)),
        "q_eq_exact": np.asarray(q_eq_exact).tolist(),
        "omega": np.asarray(vib["omega"]).tolist(),
        "omega_exact": np.asarray(vib_exact["omega"]).tolist(),
        "omega_trajectory": md_omega,
        "ir_intensity": np.asarray(vib["intensity"]).tolist(),
        "ir_intensity_exact": np.asarray(vib_exact["intensity"]).tolist(),
        "cubic_normal": {"".join(map(str, index)): float(vib["cubic"][index]) for index in cubic_indices},
        "third_internal": {"".join(map(str, index)): float(vib["third"][index]) for index in cubic_indices},
        "third_internal_exact": {"".join(map(str, index)): float(vib_exact["third"][index]) for index in cubic_indices},
        "energy_error": energy_error,
        "energy_error_no_third": energy_error_no_third,
        "us_per_step": us_per_step,
        "speedup": us_per_step["nested"] / us_per_step["auto"],
        "path_deviation": path_deviation,
        "wall_seconds": wall_seconds,
    }
    print(json.dumps(summary, indent=2))
