"""gen_jax.nn.conv_general_dilated: the same values and gradients as lax.conv_general_dilated (its kernel
gradient on CPU is a sum of shifted matrix products instead of XLA's backward-filter convolution)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from gen_jax.nn import conv_general_dilated
from gen_jax.nn.conv import shifted_kernel_grad_pays

DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 18, 16, 64), (3, 3), (1, 1), "SAME"),  # wide enough for the shifted products
    ((2, 33, 35, 64), (3, 3), (2, 2), "SAME"),  # ... with stride 2 and odd sides
    ((2, 9, 7, 3), (3, 3), (1, 1), "SAME"),
    ((2, 9, 7, 3), (3, 3), (2, 2), "SAME"),  # odd sides, stride 2: the U-Net's downsampling
    ((3, 8, 8, 4), (1, 1), (1, 1), "VALID"),  # 1x1 skip projections
    ((2, 10, 6, 2), (3, 2), (2, 1), ((2, 0), (1, 3))),  # asymmetric kernel, strides and padding
    ((1, 5, 5, 2), (5, 5), (1, 1), "VALID"),
])
def test_values_and_both_gradients_equal_lax(shape, kernel, strides, padding):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (*kernel, shape[-1], 64 if shape[-1] == 64 else 5)) / shape[-1] ** 0.5

    def ref(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)

    def ours(x, w):
        return conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)

    assert shifted_kernel_grad_pays(w.shape, (-(-shape[1] // strides[0]), -(-shape[2] // strides[1]))) == (
        shape[-1] == 64)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    y, vjp = jax.jit(lambda x, w: jax.vjp(ours, x, w))(x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, y.shape)
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_second_order_and_unsupported_layouts_fall_back_to_lax():
    x = jax.random.normal(jax.random.key(1), (1, 2, 6, 6))  # NCHW: lax's default layout
    w = jax.random.normal(jax.random.key(2), (4, 2, 3, 3))
    np.testing.assert_allclose(conv_general_dilated(x, w, (1, 1), "SAME"), lax.conv_general_dilated(x, w, (1, 1), "SAME"),
                               rtol=1e-5, atol=1e-5)
    grouped = conv_general_dilated(jnp.ones((1, 4, 4, 4)), jnp.ones((3, 3, 2, 4)), (1, 1), "SAME",
                                   dimension_numbers=DN, feature_group_count=2)
    assert grouped.shape == (1, 4, 4, 4)


def test_flax_conv_with_it_has_the_same_parameters_and_gradients():
    kw = dict(kernel_size=(3, 3), strides=(2, 2), padding="SAME")
    plain = nnx.Conv(3, 6, rngs=nnx.Rngs(0), **kw)
    fast = nnx.Conv(3, 6, conv_general_dilated=conv_general_dilated, rngs=nnx.Rngs(0), **kw)
    assert jax.tree.structure(nnx.state(plain)) == jax.tree.structure(nnx.state(fast))
    x = jax.random.normal(jax.random.key(3), (2, 7, 7, 3))

    def loss(model):
        return jnp.sum(jnp.sin(model(x)))

    g_plain = nnx.grad(loss)(plain)
    g_fast = nnx.grad(loss)(fast)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_fast)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
