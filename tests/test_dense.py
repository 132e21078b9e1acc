"""gen_jax.nn.flat_dot_general: the values and gradients of lax.dot_general (only the program differs)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from gen_jax.nn import flat_dot, flat_dot_general


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
