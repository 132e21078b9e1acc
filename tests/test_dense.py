"""gen_jax.nn.flat_dot_general: the values and gradients of lax.dot_general (only the program differs), with
the CPU kernel gradient of wide layers taken without a product over major axes."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from gen_jax.nn import flat_dot, flat_dot_general
from gen_jax.nn.dense import transposed_kernel_grad_pays


def test_flattened_product_and_its_gradients_equal_the_batched_one():
    x = jax.random.normal(jax.random.key(0), (3, 5, 7, 4))
    w = jax.random.normal(jax.random.key(1), (4, 6))
    dims = (((3,), (0,)), ((), ()))

    def loss(f, x, w):
        return jnp.sum(jnp.tanh(f(x, w, dims)))

    np.testing.assert_allclose(flat_dot_general(x, w, dims), lax.dot_general(x, w, dims), rtol=1e-6, atol=1e-6)
    got = jax.grad(lambda x, w: loss(flat_dot_general, x, w), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: loss(lax.dot_general, x, w), argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flat_dot(x, w), x @ w, rtol=1e-6, atol=1e-6)


def test_other_contractions_pass_through_and_flax_linear_accepts_it():
    a = jax.random.normal(jax.random.key(2), (2, 3, 4))
    b = jax.random.normal(jax.random.key(3), (2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_allclose(flat_dot_general(a, b, batched), lax.dot_general(a, b, batched), rtol=1e-6)
    layer = nnx.Linear(4, 3, dot_general=flat_dot_general, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer(a), a @ layer.kernel[...] + layer.bias[...], rtol=1e-5, atol=1e-6)


def _dots_of_compiled_grad(f, *args):
    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().as_text()
    return [line for line in hlo.splitlines() if " dot(" in line]


def test_kernel_gradient_of_wide_layers_is_taken_without_a_product_over_major_axes_on_cpu():
    """Where it pays (>= 1024 rows, >= 256 columns both ways) the kernel gradient X^T G is computed from a
    transposed copy of the narrower operand, so no product of the CPU program contracts its left operand's
    major axis (XLA:CPU's slow case), for either operand being the narrower; the gradients equal lax's."""
    if jax.default_backend() != "cpu":
        pytest.skip("the transposed kernel gradient is the CPU path")
    if "ynn_fusion_type=" in os.environ.get("XLA_FLAGS", ""):
        pytest.skip("with YNNPACK fusions off XLA:CPU's layout assignment picks the operand layouts (module doc)")
    for k, n in [(256, 384), (384, 256)]:
        assert transposed_kernel_grad_pays(1024, k, n)
        x = jax.random.normal(jax.random.key(4), (4, 256, k))
        w = jax.random.normal(jax.random.key(5), (k, n)) / np.sqrt(k)

        def loss(f, x, w):
            return jnp.sum(jnp.sin(f(x, w, (((2,), (0,)), ((), ())))))

        ours = lambda x, w: loss(flat_dot_general, x, w)
        dots = _dots_of_compiled_grad(ours, x, w)
        assert dots and all("lhs_contracting_dims={1}" in d for d in dots), dots
        plain = _dots_of_compiled_grad(lambda x, w: loss(lax.dot_general, x, w), x, w)
        assert any("lhs_contracting_dims={1}" not in d for d in plain)  # the check above can fail
        got = jax.grad(ours, argnums=(0, 1))(x, w)
        want = jax.grad(lambda x, w: loss(lax.dot_general, x, w), argnums=(0, 1))(x, w)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_narrow_layers_keep_xlas_own_gradient():
    assert not transposed_kernel_grad_pays(32, 512, 512)  # a time-embedding MLP: few rows
    assert not transposed_kernel_grad_pays(6272, 64, 64)  # a narrow U-Net attention projection
    assert not transposed_kernel_grad_pays(4096, 128, 1024)
    x = jax.random.normal(jax.random.key(6), (8, 128, 64))
    w = jax.random.normal(jax.random.key(7), (64, 64))
    ours = jax.jit(jax.grad(lambda x, w: jnp.sum(flat_dot(x, w) ** 2), argnums=(0, 1))).lower(x, w).as_text()
    plain = jax.jit(jax.grad(lambda x, w: jnp.sum((x.reshape(-1, 64) @ w) ** 2), argnums=(0, 1))).lower(x, w)
    assert "optimization_barrier" not in ours  # the transposed path's barriers (its CPU branch is lowered here)
    assert ours.count("stablehlo.dot_general") == plain.as_text().count("stablehlo.dot_general")
