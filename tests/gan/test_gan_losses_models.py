"""GAN losses against direct formulas, spectral normalization against SVD, model shapes and contracts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.gan import (DCGANDiscriminator, DCGANGenerator, ResNetDiscriminator, ResNetGenerator, SNConv,
                         SNLinear, SNState, as_function, get_loss, gradient_normalize, update_sn,
                         update_sn_state)

REAL = np.array([2.0, 0.3, -0.5, -3.0, 1.0])
FAKE = np.array([-1.5, 0.9, 0.0, 4.0, -0.2])


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


@pytest.mark.parametrize("name,d_ref,g_ref", [
    ("hinge", np.mean(np.maximum(0, 1 - REAL)) + np.mean(np.maximum(0, 1 + FAKE)), -np.mean(FAKE)),
    ("bce", -np.mean(np.log(_sigmoid(REAL))) - np.mean(np.log(1 - _sigmoid(FAKE))),
     -np.mean(np.log(_sigmoid(FAKE)))),
    ("wgan", np.mean(FAKE) - np.mean(REAL), -np.mean(FAKE)),
])
def test_losses_match_direct_formulas(name, d_ref, g_ref):
    d_loss, g_loss = get_loss(name)
    real, fake = jnp.asarray(REAL, jnp.float32), jnp.asarray(FAKE, jnp.float32)
    np.testing.assert_allclose(d_loss(real, fake), d_ref, rtol=1e-5)
    np.testing.assert_allclose(g_loss(fake), g_ref, rtol=1e-5)
    np.testing.assert_allclose(d_loss(real[:, None], fake[:, None]), d_ref, rtol=1e-5)  # [B, 1] too
    assert d_loss(real, fake).shape == () and g_loss(fake).shape == ()


def test_loss_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown GAN loss"):
        get_loss("lsgan")
    with pytest.raises(ShapeError, match=r"\[B\] or \[B, 1\]"):
        get_loss("hinge")[0](jnp.ones((2, 3)), jnp.ones((2, 3)))


def test_spectral_norm_converges_to_the_largest_singular_value():
    layer = SNLinear(6, 4, n_steps=60, rngs=nnx.Rngs(0))  # 60 power iterations inside the forward pass
    w = np.asarray(layer.kernel[...])
    np.testing.assert_allclose(layer.sigma(), np.linalg.svd(w, compute_uv=False)[0], rtol=1e-4)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(layer.normalized_kernel()), compute_uv=False)[0],
                               1.0, rtol=1e-4)
    x = jax.random.normal(jax.random.key(1), (3, 6))
    np.testing.assert_allclose(layer(x), x @ (w / np.linalg.svd(w, compute_uv=False)[0]) + layer.bias[...],
                               rtol=1e-4, atol=1e-5)


def test_sn_conv_normalizes_the_reshaped_kernel_and_pure_update_matches_in_place():
    conv = SNConv(3, 5, (3, 3), rngs=nnx.Rngs(2))
    graphdef, params, state = nnx.split(conv, nnx.Param, SNState)
    step = jax.jit(update_sn_state)
    twin = SNConv(3, 5, (3, 3), rngs=nnx.Rngs(2))
    for _ in range(5):  # the pure update and the in-place one agree
        state = step(graphdef, params, state)
        update_sn(twin)
    np.testing.assert_allclose(twin.u[...], state["u"][...], rtol=1e-5, atol=1e-6)
    for _ in range(55):
        state = step(graphdef, params, state)
    kernel = np.asarray(params["kernel"][...]).reshape(27, 5)
    conv = nnx.merge(graphdef, params, state)
    np.testing.assert_allclose(conv.sigma(), np.linalg.svd(kernel, compute_uv=False)[0], rtol=1e-4)
    x = jax.random.normal(jax.random.key(3), (2, 6, 6, 3))
    ref = jax.lax.conv_general_dilated(x, params["kernel"][...] / conv.sigma(), (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv(x), ref, rtol=1e-4, atol=1e-5)
    # the forward pass does not mutate u
    np.testing.assert_array_equal(nnx.state(conv, SNState)["u"][...], state["u"][...])


def _abstract_call(make_model, x):
    graphdef, state = nnx.split(nnx.eval_shape(make_model))
    return jax.eval_shape(lambda st, x_: nnx.merge(graphdef, st)(x_), state, x)


@pytest.mark.parametrize("resolution,channels", [(32, 3), (28, 1)])
def test_model_shapes(resolution, channels):
    """Built and run abstractly (nnx.eval_shape / jax.eval_shape): shapes without compiling anything."""
    z = jax.ShapeDtypeStruct((2, 8), jnp.float32)
    x = jax.ShapeDtypeStruct((2, resolution, resolution, channels), jnp.float32)
    bad = jax.ShapeDtypeStruct((2, resolution, resolution, channels + 1), jnp.float32)
    for make_G in (lambda: DCGANGenerator(8, resolution=resolution, channels=channels, width=2, rngs=nnx.Rngs(0)),
                   lambda: ResNetGenerator(8, resolution=resolution, channels=channels, width=4, norm="none",
                                           rngs=nnx.Rngs(0))):
        assert _abstract_call(make_G, z).shape == (2, resolution, resolution, channels)
    for make_D in (lambda: DCGANDiscriminator(resolution=resolution, channels=channels, width=2, rngs=nnx.Rngs(0)),
                   lambda: ResNetDiscriminator(resolution=resolution, channels=channels, width=4,
                                               spectral_norm=True, rngs=nnx.Rngs(0))):
        assert _abstract_call(make_D, x).shape == (2,)
        with pytest.raises(ShapeError, match="NHWC"):
            _abstract_call(make_D, bad)


def _jitted(model, *filters):
    graphdef, *state = nnx.split(model, *filters) if filters else nnx.split(model)
    return jax.jit(lambda x: nnx.merge(graphdef, *state)(x))


def test_generator_outputs_images_in_range():
    G = DCGANGenerator(8, resolution=28, channels=1, width=2, rngs=nnx.Rngs(0))
    img = _jitted(G)(3.0 * jax.random.normal(jax.random.key(0), (4, 8)))
    assert img.shape == (4, 28, 28, 1) and jnp.all(jnp.abs(img) <= 1.0) and jnp.std(img) > 0


def test_discriminator_has_no_batch_coupling():
    """Example b's score does not depend on the other examples: what GN's batch-sum gradient relies on."""
    D = ResNetDiscriminator(resolution=28, channels=1, width=4, spectral_norm=True, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(4), (3, 28, 28, 1))
    run = _jitted(D)
    together = run(x)
    alone = jnp.concatenate([run(x[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


class _TinySND(nnx.Module):
    def __init__(self, rngs):
        self.conv = SNConv(1, 3, (3, 3), strides=(2, 2), rngs=rngs)
        self.fc = SNLinear(4 * 4 * 3, 1, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.leaky_relu(self.conv(x), 0.1)
        return self.fc(h.reshape(h.shape[0], -1))[:, 0]


def test_spectrally_normalized_discriminator_works_as_a_pure_function():
    """SN layers hold u fixed in the forward pass, so GN can differentiate them twice under jit."""
    graphdef, params, sn_state = nnx.split(_TinySND(nnx.Rngs(2)), nnx.Param, SNState)
    f_hat = gradient_normalize(as_function(graphdef, sn_state))
    x = jax.random.normal(jax.random.key(5), (3, 8, 8, 1))
    out, grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(f_hat(p, x))))(params)
    assert jnp.abs(out) <= 3
    assert all(jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads))
    assert jnp.any(jax.tree.leaves(grads)[0] != 0)


def test_model_config_errors():
    with pytest.raises(ConfigError, match="resolution"):
        DCGANGenerator(8, resolution=30, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="norm"):
        ResNetGenerator(8, resolution=32, width=4, norm="batch", rngs=nnx.Rngs(0))
