"""The von Mises-Fisher distribution on the sphere S^{d-1} in R^d, in log space, with reparameterized samplers.

Density (Mardia and Jupp 2000, eq. 9.3.4; Su, post 8404):

    p(x; mu, kappa) = C_d(kappa) exp(kappa <mu, x>),
    C_d(kappa) = kappa^v / ((2 pi)^{v+1} I_v(kappa)),   v = d/2 - 1,

kappa = 0 being the uniform distribution. Derived quantities, all functions of (d, kappa) only:

    A_d(kappa) = E<mu, x> = I_{d/2}(kappa) / I_{d/2-1}(kappa)            (mean resultant length)
    H          = -log C_d(kappa) - kappa A_d(kappa)                      (entropy)
    KL(vMF || U(S^{d-1})) = kappa A_d + log C_d + log |S^{d-1}|,  |S^{d-1}| = 2 pi^{d/2} / Gamma(d/2).

Bessel functions (no arbitrary-order I_v in jax.scipy). Everything runs through

    core_v(kappa) = log(I_v(kappa) e^{-kappa} / kappa^v)

which is finite and smooth on [0, inf) (-> -v log 2 - lgamma(v+1) at kappa = 0), so log C_d, A_d, H and the
KL never form kappa^v or e^kappa. core is computed by the uniform asymptotic (Debye) expansion
(Abramowitz and Stegun 9.7.7 with u_1..u_4 of 9.3.9-9.3.10) at the shifted order N = v + `_SHIFT`, where
the expansion is accurate to ~1e-9 uniformly in kappa, followed by `_SHIFT` steps of the downward
recurrence (stable for I, the dominant solution downward) of rho_k = I_{k+1} / I_k:

    rho_{k-1} = kappa / (2k + kappa rho_k),    core_{k-1} = core_k + log(2k + kappa rho_k),

which never divides by kappa, so kappa = 0 is an ordinary point. 1 - rho_k gets its own recurrence (see
`_core_ratio_delta`) so that kappa (1 - A_d), which the entropy and KL need, keeps its relative precision at
kappa = 1e4 in float32; the starting ratio comes from a cancellation-free difference of two Debye
expansions. All of it is plain jnp arithmetic, so gradients w.r.t. kappa come from autodiff of an analytic expression.

Sampling: x = w mu + sqrt(1 - w^2) nu with w = <mu, x> having density
p(w) oc exp(kappa w) (1 - w^2)^{(d-3)/2} on [-1, 1] and nu = normalize(eps - <eps, mu> mu), eps ~ N(0, I),
uniform on the unit sphere orthogonal to mu. w is drawn by

- `sample_w_wood`: Wood's (1994) rejection sampler, eps ~ Beta((d-1)/2, (d-1)/2),
  w = (1 - (1+b) eps) / (1 - (1-b) eps), inside one compiled `lax.while_loop` over the whole batch (the
  loop runs until every entry is accepted). The acceptance test and sqrt(1 - w^2) are written in closed
  forms of (b, eps) that do not cancel near w = 1 (derivation in the function). Gradient w.r.t. kappa:
  implicit reparameterization (Figurnov, Mohamed, Mnih 2018, eq. 6): with F(w; kappa) the CDF of w,
  dw/dkappa = -(dF/dkappa) / p(w), and since d log p(t)/dkappa = t - A_d(kappa),

      dw/dkappa = int_w^1 (t - A_d) p(t) dt / p(w)
                = (1 - w) int_0^1 s^a [(1 - A_d) - (1 - w) s] e^{kappa (1 - w)(1 - s)} ((1 + t) / (1 + w))^a ds,

  t = 1 - (1 - w) s, a = (d - 3)/2: a ratio of densities, so the normalizer cancels; the s^a endpoint
  factor is integrated exactly by Gauss-Jacobi quadrature (48 nodes, SciPy's roots at trace time).
  Checked against A_d'(kappa) to 0.1% for d <= 257; at d ~ 1024 it is biased low (0.4-0.85x: the
  weights ~ s^a underflow where e^{kappa (1 - w)} is huge), so very high-d learned-kappa runs need care.
  This is the exact derivative of the sample w.r.t. kappa at a fixed CDF level (unbiased, unlike
  Davidson et al.'s g_rep term alone, which measured 0.120 vs the exact 0.174 for d/dkappa E[w] at d=3,
  kappa=2); tests check it against finite differences of SciPy's inverse CDF. Gradients w.r.t. mu are exact.
- `sample_w_table`: Su's inverse-CDF sampler: `make_inverse_cdf_table(d, kappa)` tabulates, once, in float64
  numpy, the quantiles of the angle theta = arccos w on a fine grid (p(theta) oc exp(kappa cos theta)
  sin^{d-2} theta is bounded, so plain trapezoid integration is accurate for every d >= 2); sampling
  gathers and linearly interpolates the table in JAX and returns w = cos theta, sqrt(1 - w^2) = sin theta.
  For a fixed kappa only (no kappa gradient); gradients w.r.t. mu are exact.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gen_jax.errors import ConfigError, ShapeError

__all__ = ["log_bessel_ive", "log_normalizer", "log_prob", "mean_resultant_length", "entropy", "kl_to_uniform",
           "log_sphere_area", "w_kappa_derivative", "sample_w_wood", "make_inverse_cdf_table", "sample_w_table", "tangent_direction",
           "sample", "VonMisesFisher"]

_SHIFT = 24  # Debye expansion at order >= 24: truncation error below 1e-9 for every kappa >= 0


def _check_dim(d: int) -> int:
    if not isinstance(d, (int, np.integer)) or d < 2:
        raise ConfigError(f"vMF dimension d must be a Python int >= 2 (the ambient dimension of S^(d-1)), got {d!r}")
    return int(d)


def _debye_parts(nu: Any, kappa: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """r = sqrt(nu^2 + kappa^2) and log of the Debye series 1 + sum_k u_k(t) / nu^k, t = nu / r."""
    r = jnp.sqrt(nu * nu + kappa * kappa)
    t = nu / r
    t2 = t * t
    u1 = t * (3.0 - 5.0 * t2) / 24.0
    u2 = t2 * (81.0 + t2 * (-462.0 + t2 * 385.0)) / 1152.0
    u3 = t * t2 * (30375.0 + t2 * (-369603.0 + t2 * (765765.0 - t2 * 425425.0))) / 414720.0
    u4 = t2 * t2 * (4465125.0 + t2 * (-94121676.0 + t2 * (349922430.0 + t2 * (-446185740.0
                                                                            + t2 * 185910725.0))))
    u4 = u4 / 39813120.0
    inv = 1.0 / nu
    return r, t, jnp.log1p(inv * (u1 + inv * (u2 + inv * (u3 + inv * u4))))


def _debye_core(nu: Any, kappa: jax.Array) -> jax.Array:
    """core_nu(kappa) = log(I_nu(kappa) e^-kappa / kappa^nu) by the Debye expansion (large nu, any kappa)."""
    r, _, log_series = _debye_parts(nu, kappa)
    # nu*eta - kappa - nu log kappa, with sqrt(nu^2 + kappa^2) - kappa = nu^2 / (r + kappa) (no cancellation)
    return nu * nu / (r + kappa) - nu * jnp.log(nu + r) - 0.5 * jnp.log(2.0 * math.pi * r) + log_series


def _debye_log_ratio(nu: Any, kappa: jax.Array) -> jax.Array:
    """log(I_{nu+1}(kappa) / I_nu(kappa)) from the Debye expansions of both, written as a sum of terms that
    are each O(nu / kappa) for large kappa, so the ratio's distance from 1 keeps its relative precision."""
    r0, _, ls0 = _debye_parts(nu, kappa)
    r1, _, ls1 = _debye_parts(nu + 1.0, kappa)
    dr = (2.0 * nu + 1.0) / (r1 + r0)  # r1 - r0
    n1 = nu + 1.0
    # log((n1 + r1) / kappa) = log(n1 + r1) - log kappa, as log1p for large kappa (r1 - kappa = n1^2 / (r1 + kappa))
    log_n1r1_over_k = jnp.where(kappa > n1, jnp.log1p((n1 + n1 * n1 / (r1 + kappa)) / jnp.maximum(kappa, 1.0)),
                                jnp.log(n1 + r1) - jnp.log(jnp.maximum(kappa, jnp.finfo(r1.dtype).tiny)))
    return (dr - log_n1r1_over_k - nu * jnp.log1p((1.0 + dr) / (nu + r0))
            - 0.25 * jnp.log1p((2.0 * nu + 1.0) / (r0 * r0)) + ls1 - ls0)


def _core_ratio_delta(v: Any, kappa: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(core_v, rho_v, 1 - rho_v) for orders v >= 0 (a float or an array broadcasting with kappa), rho_v = I_{v+1}(kappa) / I_v(kappa).

    rho and 1 - rho are carried by separate recurrences so that each keeps its relative precision
    (rho ~ kappa / (2v + 2) for small kappa, 1 - rho ~ (2v + 1) / (2 kappa) for large kappa):
    rho_{k-1} = kappa / (2k + kappa rho_k),  1 - rho_{k-1} = (2k - kappa (1 - rho_k)) / (2k + kappa rho_k).
    """
    n_top = v + _SHIFT
    core = _debye_core(n_top, kappa)
    log_rho = jnp.where(kappa > 0, _debye_log_ratio(n_top, jnp.where(kappa > 0, kappa, 1.0)), -jnp.inf)
    rho = jnp.exp(log_rho)
    delta = -jnp.expm1(log_rho)

    def step(j, carry):  # downward recurrence from order v + SHIFT to v
        core, rho, delta = carry
        k = n_top - j
        den = 2.0 * k + kappa * rho
        return core + jnp.log(den), kappa / den, (2.0 * k - kappa * delta) / den

    return jax.lax.fori_loop(0, _SHIFT, step, (core, rho, delta))


def _as_kappa(kappa: Any) -> jax.Array:
    kappa = jnp.asarray(kappa)
    if not jnp.issubdtype(kappa.dtype, jnp.floating):
        kappa = kappa.astype(jnp.float32)
    return kappa


def log_bessel_ive(v: Any, kappa: jax.Array) -> jax.Array:
    """log(I_v(kappa) e^{-kappa}) (log of scipy.special.ive) for orders v >= 0 and kappa >= 0 (broadcast).

    -inf at kappa = 0 for v > 0; finite and accurate where ive itself under- or overflows.
    """
    if isinstance(v, (int, float)) and v < 0:
        raise ConfigError(f"log_bessel_ive needs an order v >= 0, got {v}")
    kappa = _as_kappa(kappa)
    v = jnp.asarray(v, kappa.dtype)
    core, _, _ = _core_ratio_delta(v, kappa)
    return core + jnp.where(v == 0, 0.0, v * jnp.log(kappa))


def log_sphere_area(d: int) -> float:
    """log |S^{d-1}| = log(2 pi^{d/2} / Gamma(d/2))."""
    d = _check_dim(d)
    return math.log(2.0) + 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d)


def log_normalizer(d: int, kappa: jax.Array) -> jax.Array:
    """log C_d(kappa) = v log kappa - (v+1) log(2 pi) - log I_v(kappa), v = d/2 - 1; = -log|S^{d-1}| at 0."""
    d = _check_dim(d)
    kappa = _as_kappa(kappa)
    v = 0.5 * d - 1.0
    core, _, _ = _core_ratio_delta(v, kappa)
    return -(v + 1.0) * math.log(2.0 * math.pi) - core - kappa


def log_prob(x: jax.Array, mu: jax.Array, kappa: jax.Array) -> jax.Array:
    """log vMF density of unit vectors x [..., d] given unit mean direction mu [..., d] and kappa [...]."""
    if x.shape[-1] != mu.shape[-1]:
        raise ShapeError(f"x has last dimension {x.shape[-1]} but mu has {mu.shape[-1]}; both must be d")
    d = x.shape[-1]
    kappa = _as_kappa(kappa)
    v = 0.5 * d - 1.0
    core, _, _ = _core_ratio_delta(v, kappa)
    cos = jnp.sum(x * mu, axis=-1)
    # log C + kappa cos = -(v+1) log 2pi - core + kappa (cos - 1): no e^kappa anywhere
    return -(v + 1.0) * math.log(2.0 * math.pi) - core + kappa * (cos - 1.0)


def mean_resultant_length(d: int, kappa: jax.Array) -> jax.Array:
    """A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa) = E<mu, x>, in [0, 1)."""
    d = _check_dim(d)
    kappa = _as_kappa(kappa)
    _, rho, _ = _core_ratio_delta(0.5 * d - 1.0, kappa)
    return rho


def entropy(d: int, kappa: jax.Array) -> jax.Array:
    """Differential entropy H = -log C_d(kappa) - kappa A_d(kappa) (nats, w.r.t. the surface measure)."""
    d = _check_dim(d)
    kappa = _as_kappa(kappa)
    v = 0.5 * d - 1.0
    core, _, one_minus_a = _core_ratio_delta(v, kappa)
    # -log C - kappa A = (v+1) log 2pi + core + kappa (1 - A)
    return (v + 1.0) * math.log(2.0 * math.pi) + core + kappa * one_minus_a


def kl_to_uniform(d: int, kappa: jax.Array) -> jax.Array:
    """KL(vMF(mu, kappa) || uniform on S^{d-1}) = log |S^{d-1}| - H; >= 0, 0 at kappa = 0."""
    return jnp.maximum(log_sphere_area(d) - entropy(d, kappa), 0.0)


# ----------------------------------------------------------------------------------------------- sampling
def _safe_sqrt(x: jax.Array) -> jax.Array:
    tiny = jnp.finfo(x.dtype).tiny
    return jnp.sqrt(jnp.maximum(x, tiny))


def _wood_w(b: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w and sqrt(1 - w^2) from Wood's proposal, in forms without cancellation near w = +-1:
    1 - w = 2 b eps / D, 1 + w = 2 (1 - eps) / D, D = 1 - (1 - b) eps."""
    den = 1.0 - (1.0 - b) * eps
    w = (1.0 - (1.0 + b) * eps) / den
    s = 2.0 * _safe_sqrt(b * eps * (1.0 - eps)) / den
    return w, s


def _wood_b(d: int, kappa: jax.Array) -> jax.Array:
    # b = (-2k + sqrt(4k^2 + (d-1)^2)) / (d-1), rationalized so large kappa does not cancel
    m1 = d - 1.0
    return m1 / (2.0 * kappa + jnp.sqrt(4.0 * kappa * kappa + m1 * m1))


_BETA_BY_NORMALS_MAX_D = 64


def _beta_symmetric(rng: jax.Array, d: int, shape: tuple[int, ...], dtype) -> jax.Array:
    """eps ~ Beta((d-1)/2, (d-1)/2).

    For d <= 64 as (1 + g_1 / |g|) / 2 with g ~ N(0, I_d) (the first coordinate of a uniform point on
    S^{d-1} has density oc (1 - u^2)^{(d-3)/2}), with 1 + g_1/|g| = |g_rest|^2 / (|g| (|g| - g_1)) when
    g_1 < 0 so eps keeps its relative precision near 0; this compiles much faster than jax.random.beta's
    gamma sampler. For larger d, jax.random.beta.
    """
    if d > _BETA_BY_NORMALS_MAX_D:
        a = 0.5 * (d - 1.0)
        return jax.random.beta(rng, a, a, shape, dtype)
    g = jax.random.normal(rng, (*shape, d), dtype)
    g1 = g[..., 0]
    rest2 = jnp.sum(g[..., 1:] ** 2, axis=-1)
    r = jnp.sqrt(g1 * g1 + rest2)
    r = jnp.maximum(r, jnp.finfo(dtype).tiny)
    return jnp.where(g1 >= 0, (r + g1) / (2.0 * r), rest2 / (2.0 * r * (r - g1)))


_QUAD_NODES = 48


def _gauss_jacobi_01(a: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes s_i in (0, 1) and weights with sum_i w_i f(s_i) ~= int_0^1 s^a f(s) ds (a > -1)."""
    from scipy.special import roots_jacobi
    x, w = roots_jacobi(n, 0.0, a)  # weight (1 + x)^a on [-1, 1]; s = (1 + x) / 2
    return (1.0 + x) / 2.0, w / 2.0 ** (a + 1.0)


def _implicit_integral(d: int, kappa: jax.Array, one_minus_w: jax.Array, one_plus_w: jax.Array) -> jax.Array:
    """J with dw/dkappa = (1 - w) J (module doc), from 1 - w and 1 + w computed without cancellation."""
    a = 0.5 * (d - 3.0)
    s_np, wts_np = _gauss_jacobi_01(a, _QUAD_NODES)
    dtype = kappa.dtype
    s, wts = jnp.asarray(s_np, dtype), jnp.asarray(wts_np, dtype)
    _, _, one_minus_a = _core_ratio_delta(0.5 * d - 1.0, kappa)
    omw, opw = one_minus_w[..., None], one_plus_w[..., None]
    ratio = (2.0 - omw * s) / jnp.maximum(opw, jnp.finfo(dtype).tiny)  # (1 + t) / (1 + w) >= 1
    # p(t) / p(w) = s^a e^{kappa (t - w)} ((1 + t) / (1 + w))^a with t - w = (1 - w)(1 - s); the weights
    # carry s^a, and adding their log before exp keeps e^{kappa (1 - w)} from overflowing near s = 0
    log_f = jnp.log(wts) + kappa[..., None] * omw * (1.0 - s) + (a * jnp.log(ratio) if a != 0 else 0.0)
    return jnp.sum((one_minus_a[..., None] - omw * s) * jnp.exp(log_f), axis=-1)


def w_kappa_derivative(d: int, kappa: jax.Array, w: jax.Array) -> jax.Array:
    """dw/dkappa of a vMF sample's w = <mu, x> at a fixed CDF level (implicit reparameterization)."""
    d = _check_dim(d)
    kappa = jnp.broadcast_to(_as_kappa(kappa), jnp.shape(w))
    w = jnp.asarray(w, kappa.dtype)
    return (1.0 - w) * _implicit_integral(d, kappa, 1.0 - w, 1.0 + w)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _wood_w_implicit(d: int, kappa: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _wood_w(_wood_b(d, kappa), eps)


@_wood_w_implicit.defjvp
def _wood_w_implicit_jvp(d, primals, tangents):
    kappa, eps = primals
    dkappa, _ = tangents  # eps is an accepted sample held fixed: no tangent
    b = _wood_b(d, kappa)
    den = 1.0 - (1.0 - b) * eps
    one_minus_w, one_plus_w = 2.0 * b * eps / den, 2.0 * (1.0 - eps) / den
    w, s = _wood_w(b, eps)
    j = _implicit_integral(d, kappa, one_minus_w, one_plus_w)
    # ds/dkappa = -w / s dw/dkappa = -w J sqrt((1 - w) / (1 + w)), finite at w = 1
    ratio = jnp.sqrt(b * eps / jnp.maximum(1.0 - eps, jnp.finfo(eps.dtype).tiny))
    return (w, s), (dkappa * one_minus_w * j, -dkappa * w * j * ratio)


def sample_w_wood(rng: jax.Array, d: int, kappa: jax.Array, shape: tuple[int, ...],
                  max_iters: int = 1000) -> tuple[jax.Array, jax.Array]:
    """Wood's (1994) rejection sampler for w = <mu, x>: returns (w, sqrt(1 - w^2)), each of `shape`.

    `kappa` broadcasts against `shape` (e.g. kappa [B] with shape (n, B)). The rejection loop is one
    `lax.while_loop` over all entries; its expected number of rounds is below ~1.5 for every (d, kappa).
    Differentiable w.r.t. kappa by implicit reparameterization (exact dw/dkappa per sample, module doc).
    """
    d = _check_dim(d)
    kappa = jnp.broadcast_to(_as_kappa(kappa), shape)
    dtype = kappa.dtype
    b_sg = _wood_b(d, jax.lax.stop_gradient(kappa))
    k_sg = jax.lax.stop_gradient(kappa)
    tiny = jnp.finfo(dtype).tiny

    def cond(state):
        _, _, done, it = state
        return jnp.logical_and(~jnp.all(done), it < max_iters)

    def body(state):
        key, eps, done, it = state
        key, k_beta, k_u = jax.random.split(key, 3)
        e = jnp.clip(_beta_symmetric(k_beta, d, shape, dtype), 1e-30, 1.0 - jnp.finfo(dtype).eps)
        u = jax.random.uniform(k_u, shape, dtype, minval=tiny, maxval=1.0)
        den = 1.0 - (1.0 - b_sg) * e
        # log accept ratio: kappa (w - x0) + (d-1) [log(1-x0 w) - log(1-x0^2)], x0 = (1-b)/(1+b), with
        # w - x0 = 2b(1-2e) / ((1+b) den) and log(1-x0 w) - log(1-x0^2) = log(1+b) - log 2 - log den
        t = (k_sg * 2.0 * b_sg * (1.0 - 2.0 * e) / ((1.0 + b_sg) * den)
             + (d - 1.0) * (jnp.log1p(b_sg) - math.log(2.0) - jnp.log(den)))
        accept = (t >= jnp.log(u)) & ~done
        return key, jnp.where(accept, e, eps), done | accept, it + 1

    init = (rng, jnp.full(shape, 0.5, dtype), jnp.zeros(shape, bool), jnp.asarray(0))
    _, eps, _, _ = jax.lax.while_loop(cond, body, init)
    return _wood_w_implicit(d, kappa, jax.lax.stop_gradient(eps))


def make_inverse_cdf_table(d: int, kappa: float, size: int = 1 << 16, grid: int = 1 << 20) -> np.ndarray:
    """Quantiles theta_i = F^{-1}(i / size), i = 0..size, of the angle theta = arccos<mu, x> (float64 numpy).

    Integrates p(theta) oc exp(kappa (cos theta - 1)) sin^{d-2} theta by the trapezoid rule on `grid`
    uniform points of [0, pi] (bounded and smooth for d >= 2) and inverts the CDF by interpolation.
    """
    d = _check_dim(d)
    kappa = float(kappa)
    if not (kappa >= 0.0 and math.isfinite(kappa)):
        raise ConfigError(f"make_inverse_cdf_table needs a finite kappa >= 0, got {kappa}")
    theta = np.linspace(0.0, math.pi, grid + 1)
    with np.errstate(divide="ignore"):
        logp = kappa * (np.cos(theta) - 1.0) + (d - 2.0) * np.log(np.sin(theta)) if d > 2 else kappa * (
            np.cos(theta) - 1.0)
    p = np.exp(logp - logp.max())
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]))])
    cdf /= cdf[-1]
    u = np.linspace(0.0, 1.0, size + 1)
    # keep only the strictly increasing part of the CDF so interpolation is well defined
    keep = np.concatenate([[True], np.diff(cdf) > 0])
    return np.interp(u, cdf[keep], theta[keep])


def sample_w_table(rng: jax.Array, table: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Su's inverse-CDF sampler: (w, sqrt(1 - w^2)) = (cos theta, sin theta) with theta interpolated from
    `table` (from `make_inverse_cdf_table`) at u ~ U[0, 1)."""
    table = jnp.asarray(table, dtype=jnp.result_type(float))
    size = table.shape[0] - 1
    pos = jax.random.uniform(rng, shape, table.dtype) * size
    idx = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, size - 1)
    frac = pos - idx
    theta = table[idx] * (1.0 - frac) + table[idx + 1] * frac
    return jnp.cos(theta), jnp.sin(theta)


def tangent_direction(rng: jax.Array, mu: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """nu = normalize(eps - <eps, mu> mu), eps ~ N(0, I): uniform on the unit sphere orthogonal to mu.
    `shape` is the batch shape of the result ([*shape, d]); mu [..., d] broadcasts against it."""
    eps = jax.random.normal(rng, (*shape, mu.shape[-1]), mu.dtype)
    nu = eps - jnp.sum(eps * mu, axis=-1, keepdims=True) * mu
    return nu / _safe_sqrt(jnp.sum(nu * nu, axis=-1, keepdims=True))


def sample(rng: jax.Array, mu_BxD: jax.Array, kappa_B: jax.Array, n: int,
           table: jax.Array | None = None) -> jax.Array:
    """n reparameterized vMF samples [n, B, d]: Wood's sampler, or Su's table sampler if `table` is given
    (a table built for this d and the model's fixed kappa; `kappa_B` is then only used by log_prob)."""
    if mu_BxD.ndim < 1:
        raise ShapeError(f"mu must be [..., d] unit vectors, got shape {mu_BxD.shape}")
    d = mu_BxD.shape[-1]
    batch = mu_BxD.shape[:-1]
    shape = (n, *batch)
    k_w, k_nu = jax.random.split(rng)
    if table is None:
        w, s = sample_w_wood(k_w, d, jnp.broadcast_to(_as_kappa(kappa_B), batch), shape)
    else:
        w, s = sample_w_table(k_w, table, shape)
        w, s = w.astype(mu_BxD.dtype), s.astype(mu_BxD.dtype)
    nu = tangent_direction(k_nu, mu_BxD, shape)
    return w[..., None] * mu_BxD + s[..., None] * nu


@struct.dataclass
class VonMisesFisher:
    """vMF posterior with mean directions mu [B, d] (unit norm) and concentrations kappa [B].

    The posterior interface of `gen_jax.vae.likelihood`: `sample(rng, n) -> [n, B, d]`,
    `log_prob(z [..., B, d]) -> [..., B]`, `kl_to_prior() -> [B]` (KL to the uniform prior).
    `table`: optional inverse-CDF table for Su's sampler (fixed kappa); Wood's sampler otherwise.
    """

    mu: jax.Array
    kappa: jax.Array
    table: jax.Array | None = None

    @property
    def dim(self) -> int:
        return self.mu.shape[-1]

    def sample(self, rng: jax.Array, n: int) -> jax.Array:
        return sample(rng, self.mu, self.kappa, n, self.table)

    def log_prob(self, z: jax.Array) -> jax.Array:
        return log_prob(z, self.mu, self.kappa)

    def entropy(self) -> jax.Array:
        return entropy(self.dim, self.kappa)

    def kl_to_prior(self) -> jax.Array:
        return kl_to_uniform(self.dim, self.kappa)

    def mean_resultant_length(self) -> jax.Array:
        return mean_resultant_length(self.dim, self.kappa)
