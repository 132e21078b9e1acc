"""Spectral normalization (Miyato, Kataoka, Koyama and Yoshida, ICLR 2018, arXiv 1802.05957).

W_SN = W / sigma(W), sigma estimated by power iteration (Algorithm 1): with a persistent vector u,
    v <- W u / ||W u||,  u <- W^T v / ||W^T v||,  sigma = v^T W u,
with u and v treated as constants for differentiation (sigma still depends on W). A conv kernel
[kh, kw, in, out] is reshaped to the [kh*kw*in, out] matrix, as in the paper (this bounds that matrix, not
the exact operator norm of the convolution).

Why not `flax.nnx.SpectralNorm`: in flax 0.12 it overwrites the wrapped layer's Param in place with W/sigma
and writes u during the forward pass, which breaks a pure `nnx.merge` boundary once the state is split
back, and cannot run inside `jax.grad` of the input (which gradient normalization and WGAN-GP need).

Here the forward pass never mutates anything: it runs `n_steps` power iterations from the stored u and uses
the result. The persistent u (an `SNState` variable, a subclass of `nnx.BatchStat`) is advanced by a
separate call, once per D update, outside the loss:

    graphdef, params, sn_state = nnx.split(D, nnx.Param, SNState)
    sn_state = update_sn_state(graphdef, params, sn_state)   # u <- power-iterated u
    loss = loss_fn(params, ...)  # merges (graphdef, params, sn_state) and calls D(x)

which gives exactly the SNGAN update (one iteration per step, estimate warm-started across steps).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["SNState", "power_iteration", "spectral_normalize", "SNLinear", "SNConv", "update_sn",
           "update_sn_state"]


class SNState(nnx.BatchStat):
    """The persistent power-iteration vector u of a spectrally normalized layer."""


def _l2n(x: jax.Array, eps: float) -> jax.Array:
    return x / (jnp.sqrt(jnp.sum(jnp.square(x))) + eps)


def power_iteration(w_IxO: jax.Array, u_O: jax.Array, n_steps: int = 1,
                    eps: float = 1e-12) -> tuple[jax.Array, jax.Array]:
    """n_steps of power iteration on W^T W from u; returns (u, v), both stop-gradient'ed."""
    w_IxO = jax.lax.stop_gradient(w_IxO)
    v_I = _l2n(w_IxO @ u_O, eps)
    for _ in range(n_steps):
        v_I = _l2n(w_IxO @ u_O, eps)
        u_O = _l2n(w_IxO.T @ v_I, eps)
    return jax.lax.stop_gradient(u_O), jax.lax.stop_gradient(v_I)


def spectral_normalize(w: jax.Array, u_O: jax.Array, n_steps: int = 1,
                       eps: float = 1e-12) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(W / sigma, new u, sigma) for a weight of any rank whose last axis is the output axis."""
    w_IxO = w.reshape(-1, w.shape[-1])
    u_O, v_I = power_iteration(w_IxO, u_O, n_steps, eps)
    sigma = v_I @ w_IxO @ u_O
    return w / sigma, u_O, sigma


class _SNBase(nnx.Module):
    n_steps: int
    eps: float

    def _init_u(self, out: int, rngs: nnx.Rngs) -> None:
        self.u = SNState(_l2n(jax.random.normal(rngs.params(), (out,)), 1e-12))

    def normalized_kernel(self) -> jax.Array:
        w_sn, _, _ = spectral_normalize(self.kernel[...], self.u[...], self.n_steps, self.eps)
        return w_sn

    def sigma(self) -> jax.Array:
        return spectral_normalize(self.kernel[...], self.u[...], self.n_steps, self.eps)[2]

    def update_u(self) -> None:
        """Advance the stored u by n_steps power iterations (call outside any transform of the input)."""
        w = self.kernel[...]
        u_O, _ = power_iteration(w.reshape(-1, w.shape[-1]), self.u[...], self.n_steps, self.eps)
        self.u[...] = u_O


class SNLinear(_SNBase):
    """Dense layer y = x W_SN + b."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, n_steps: int = 1,
                 eps: float = 1e-12, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
        self.n_steps, self.eps = n_steps, eps
        self._init_u(out_features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.normalized_kernel()
        return y + self.bias[...] if self.bias is not None else y


class SNConv(_SNBase):
    """2-D convolution over NHWC inputs with a spectrally normalized [kh, kw, in, out] kernel."""

    def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int] = (3, 3), *,
                 strides: Sequence[int] = (1, 1), padding: str | Sequence[tuple[int, int]] = "SAME",
                 use_bias: bool = True, n_steps: int = 1, eps: float = 1e-12, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (*kernel_size, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
        self.strides = tuple(strides)
        self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        self.n_steps, self.eps = n_steps, eps
        self._init_u(out_features, rngs)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x_BxHxWxC, self.normalized_kernel(), self.strides, self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...] if self.bias is not None else y


def update_sn(model: nnx.Module) -> None:
    """Advance u of every spectrally normalized layer of `model` in place."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, _SNBase):
            module.update_u()


def update_sn_state(graphdef: Any, params: Any, sn_state: Any, *rest: Any) -> Any:
    """Pure form of `update_sn`: the new SNState of a model split as (graphdef, params, sn_state, *rest)."""
    model = nnx.merge(graphdef, params, sn_state, *rest)
    update_sn(model)
    return nnx.state(model, SNState)
