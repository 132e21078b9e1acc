"""Dense layers whose matrix products are 2-D: [..., K] x [K, N] computed as [prod(...), K] x [K, N].

The values are those of `lax.dot_general`; the difference is the gradient program XLA:CPU builds. For a
[B, T, K] input the kernel gradient of the 3-D product contracts two dimensions (B and T) and XLA:CPU lowers it
with extra transposed copies; flattened first, it is one [K, B T] x [B T, N] product. Measured on the
development CPU: the RoFormer L6 H384 encoder step (B32 T64, fwd+bwd) 2.33-2.46 -> 2.18-2.22 s.

On CPU the kernel gradient is also taken as a product whose operands XLA:CPU multiplies fastest. X^T G
contracts both operands over their major (token) axis, which XLA:CPU runs at 68-80 GFLOP/s on the RoFormer
shapes where the same FLOPs as a plain [M, K] x [K, N] product run at 83-91 (torch/MKL: 92). So the smaller of
X and G is transposed first (a copy of [B T, min(K, N)]) and the product taken in that form: (X^T) G when X is
the narrower, (G^T X)^T otherwise, where that pays (`transposed_kernel_grad_pays`). Other platforms keep XLA's
own gradient (`lax.platform_dependent`). With XLA:CPU's YNNPACK fusions off (`TrainConfig.cpu_ynn_fusions=False`,
the FLASH presets) its layout assignment chooses the operands' layouts itself and the product is XLA's again.

Where `gen_jax.nn.cpu_blas` is enabled (float32 on a single CPU device with MKL installed), the flattened
product and both of its gradients are instead BLAS calls: MKL's sgemm runs the RoFormer and FLASH dense
products 10-30% faster than XLA:CPU's kernels (benchmarks/RESULTS.md). Like the transposed kernel gradient
above (a custom VJP), that path supports reverse-mode differentiation only; `GEN_JAX_CPU_BLAS=0` restores
forward mode (`jax.jvp`) for all float32 layers.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from gen_jax.nn import cpu_blas

__all__ = ["flat_dot_general", "flat_dot", "transposed_kernel_grad_pays"]


def flat_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                     preferred_element_type=None, out_sharding=None) -> jax.Array:
    """`lax.dot_general`; a product of [..., K] with a [K, N] matrix is computed on the flattened input.
    Pass it as `nnx.Linear(..., dot_general=flat_dot_general)`."""
    (lc, rc), (lb, rb) = dimension_numbers
    if (lhs.ndim >= 2 and rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb
            and not rb and out_sharding is None):
        x = lhs.reshape(-1, lhs.shape[-1])
        if preferred_element_type in (None, jnp.float32) and cpu_blas.enabled(x, rhs):
            return cpu_blas.matmul(x, rhs).reshape(*lhs.shape[:-1], rhs.shape[-1])
        if transposed_kernel_grad_pays(*x.shape, rhs.shape[1]):
            y = _matmul(x, rhs, precision, preferred_element_type)
        else:
            y = _plain_matmul(x, rhs, precision, preferred_element_type)
        return y.reshape(*lhs.shape[:-1], rhs.shape[-1])
    kw = {} if out_sharding is None else {"out_sharding": out_sharding}
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kw)


def transposed_kernel_grad_pays(rows: int, k: int, n: int) -> bool:
    """Where the transposed kernel gradient beat XLA:CPU's own on the development CPU: the RoFormer encoder's
    products ([2048-4096 rows] x 384 -> 384 / 1536, and 1536 -> 384) make its fwd+bwd step 6-9% faster, but
    the DDPM MNIST U-Net's narrow ones (64-128 channels, or 32 rows of time embedding) 7-15% slower: the copy and
    the unfused barriers cost more than the faster product. So: at least 1024 rows and 256 columns both ways."""
    return rows >= 1024 and min(k, n) >= 256


def _plain_matmul(x, w, precision, preferred):
    return lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, precision, preferred):
    return _plain_matmul(x, w, precision, preferred)


def _matmul_fwd(x, w, precision, preferred):
    return _plain_matmul(x, w, precision, preferred), (x, w)


def _cpu_grads(x, w, g, precision):
    g = g.astype(x.dtype)
    dx = lax.dot_general(g, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
    # the barriers keep XLA from folding the transposed copy back into a product over the major axes
    mm = functools.partial(jnp.matmul, precision=precision, preferred_element_type=jnp.float32)
    if x.shape[1] <= g.shape[1]:
        dw = mm(lax.optimization_barrier(x.T), g)
    else:
        dw = lax.optimization_barrier(mm(lax.optimization_barrier(g.T), x)).T
    return dx, dw


def _xla_grads(x, w, g, precision, preferred):
    return jax.vjp(lambda x_, w_: _plain_matmul(x_, w_, precision, preferred), x, w)[1](g)


def _matmul_bwd(precision, preferred, res, g):
    x, w = res
    dx, dw = lax.platform_dependent(x, w, g, cpu=lambda *a: _cpu_grads(*a, precision),
                                    default=lambda *a: _xla_grads(*a, precision, preferred))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def flat_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] through `flat_dot_general`."""
    return flat_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
