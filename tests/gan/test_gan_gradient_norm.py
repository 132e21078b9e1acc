"""GN-GAN / GraN-GAN transforms and the WGAN-GP penalty, against per-example autodiff and finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gen_jax.errors import ShapeError
from gen_jax.gan import (DCGANDiscriminator, as_function, d_hinge_loss, gradient_normalize,
                         gradient_penalty, gran_normalize)


def _mlp_params(key, sizes, dtype=jnp.float32):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (a, b), dtype) / np.sqrt(a), "b": 0.1 * jax.random.normal(k, (b,), dtype)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def _mlp(act):
    def f(params, x_BxD):
        h = x_BxD
        for layer in params[:-1]:
            h = act(h @ layer["w"] + layer["b"])
        return (h @ params[-1]["w"] + params[-1]["b"])[:, 0]
    return f


leaky = _mlp(lambda h: jax.nn.leaky_relu(h, 0.2))
smooth = _mlp(jnp.tanh)


def _per_example_formula(f, params, x, normalize):
    """The normalization computed one example at a time (vmap of a single-example gradient, no batch-sum
    trick)."""
    fb = lambda xb: f(params, xb[None])[0]
    val, g = jax.jit(jax.vmap(jax.value_and_grad(fb)))(x)
    return normalize(val, jnp.linalg.norm(g.reshape(x.shape[0], -1), axis=1))


def _input_grad_norms(fn, params, x):
    g = jax.jit(jax.grad(lambda x_: jnp.sum(fn(params, x_))))(x)
    return jnp.linalg.norm(g.reshape(x.shape[0], -1), axis=1)


def test_gn_is_bounded_with_gradient_norm_at_most_one_on_piecewise_linear_net():
    params = _mlp_params(jax.random.key(0), [6, 32, 32, 1])
    x = 3.0 * jax.random.normal(jax.random.key(1), (64, 6))
    f_hat = gradient_normalize(leaky)
    assert jnp.all(jnp.abs(jax.jit(f_hat)(params, x)) <= 1.0)
    gnorm = _input_grad_norms(f_hat, params, x)
    assert jnp.all(gnorm <= 1.0 + 1e-5), gnorm.max()
    # the raw network is not 1-Lipschitz here, so the bound is the transform's doing
    assert _input_grad_norms(leaky, params, 10 * x).max() > 1.0 or jnp.abs(leaky(params, 10 * x)).max() > 1.0


@pytest.mark.slow  # double backprop through a conv net: a minute of XLA compile on a busy CPU
def test_gn_bounds_a_cnn_discriminator():
    model = DCGANDiscriminator(resolution=28, channels=1, width=2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    f_hat = gradient_normalize(as_function(graphdef))
    x = jax.random.uniform(jax.random.key(2), (4, 28, 28, 1), minval=-1, maxval=1)

    @jax.jit
    def value_and_input_grad_norm(params, x):
        val, g = jax.value_and_grad(lambda x_: jnp.sum(f_hat(params, x_)))(x)
        return f_hat(params, x), jnp.linalg.norm(g.reshape(x.shape[0], -1), axis=1)

    out, gnorm = value_and_input_grad_norm(params, x)
    assert jnp.all(jnp.abs(out) <= 1.0)
    assert jnp.all(gnorm <= 1.0 + 1e-4)


def test_gn_equals_formula_computed_separately():
    params = _mlp_params(jax.random.key(3), [5, 16, 1])
    x = jax.random.normal(jax.random.key(4), (8, 5))
    expected = _per_example_formula(leaky, params, x, lambda v, g: v / (g + jnp.abs(v)))
    np.testing.assert_allclose(jax.jit(gradient_normalize(leaky))(params, x), expected, rtol=1e-5, atol=1e-6)


def test_gran_equals_formula_computed_separately():
    params = _mlp_params(jax.random.key(5), [5, 16, 1])
    x = jax.random.normal(jax.random.key(6), (8, 5))
    eps, K = 1e-2, 2.5
    expected = _per_example_formula(leaky, params, x, lambda v, g: K * v * g / (g ** 2 + eps))
    np.testing.assert_allclose(jax.jit(gran_normalize(leaky, eps=eps, K=K))(params, x), expected, rtol=1e-5, atol=1e-6)
    # inside a linear region GraN ~ K f / ||grad f||, so its input gradient norm is below K
    assert jnp.all(_input_grad_norms(gran_normalize(leaky, eps=eps, K=K), params, x) <= K * (1 + 1e-4))


def test_second_order_gradients_match_finite_differences():
    with jax.enable_x64(True):
        params = _mlp_params(jax.random.key(7), [3, 8, 1], jnp.float64)
        real = jax.random.normal(jax.random.key(8), (4, 3), jnp.float64)
        theta = jax.random.normal(jax.random.key(9), (3, 3), jnp.float64)
        z = jax.random.normal(jax.random.key(10), (4, 3), jnp.float64)
        f_hat = gradient_normalize(smooth)

        def d_loss(p):
            return d_hinge_loss(f_hat(p, real), f_hat(p, z @ theta))

        def g_loss(th):  # the generator's parameters reach f_hat through its input
            return -jnp.mean(f_hat(params, z @ th))

        for loss, arg, key in ((d_loss, params, 11), (g_loss, theta, 12)):
            loss = jax.jit(loss)
            grad = jax.jit(jax.grad(loss))(arg)
            assert all(jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grad))
            leaves, tree = jax.tree.flatten(arg)
            dirs = [jax.random.normal(k, l.shape, l.dtype) for k, l in
                    zip(jax.random.split(jax.random.key(key), len(leaves)), leaves)]
            direction = jax.tree.unflatten(tree, dirs)
            h = 1e-6
            shift = lambda s: jax.tree.map(lambda a, d: a + s * h * d, arg, direction)
            fd = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * h)
            analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), dirs))
            np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-9)


def test_stop_gradient_variant_holds_the_norm_constant():
    params = _mlp_params(jax.random.key(13), [4, 16, 1])
    x = jax.random.normal(jax.random.key(14), (6, 4))
    full, fast = gradient_normalize(smooth), gradient_normalize(smooth, stop_norm_gradient=True)
    np.testing.assert_allclose(jax.jit(fast)(params, x), jax.jit(full)(params, x), rtol=1e-6)
    norms = _per_example_formula(smooth, params, x, lambda v, g: g)  # computed separately, then constant
    held = lambda p, x_: smooth(p, x_) / (norms + jnp.abs(smooth(p, x_)))
    for wrt in (0, 1):  # D params and the input (G step)
        got = jax.jit(jax.grad(lambda p, x_: jnp.sum(fast(p, x_)), argnums=wrt))(params, x)
        want = jax.jit(jax.grad(lambda p, x_: jnp.sum(held(p, x_)), argnums=wrt))(params, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    exact = jax.jit(jax.grad(lambda x_: jnp.sum(full(params, x_))))(x)
    assert not np.allclose(exact, jax.jit(jax.grad(lambda x_: jnp.sum(fast(params, x_))))(x), rtol=1e-3)


def test_wgan_gp_penalty_against_direct_computation():
    # a linear critic has gradient w everywhere: the penalty is (||w|| - 1)^2 whatever the interpolates
    w = jax.random.normal(jax.random.key(15), (2, 3, 3))
    linear = lambda p, x: jnp.einsum("bijk,ijk->b", x, p)
    real = jax.random.normal(jax.random.key(16), (5, 2, 3, 3))
    fake = jax.random.normal(jax.random.key(17), (5, 2, 3, 3))
    got = jax.jit(gradient_penalty, static_argnums=0)(linear, w, real, fake, jax.random.key(18))
    np.testing.assert_allclose(got, (jnp.linalg.norm(w) - 1.0) ** 2, rtol=1e-5)
    # real == fake pins the interpolate: per-example gradient norms of a nonlinear critic
    params = _mlp_params(jax.random.key(19), [4, 16, 1])
    x = jax.random.normal(jax.random.key(20), (6, 4))
    norms = _per_example_formula(leaky, params, x, lambda v, g: g)
    penalty = jax.jit(gradient_penalty, static_argnums=0)
    np.testing.assert_allclose(penalty(leaky, params, x, x, jax.random.key(21)),
                               jnp.mean((norms - 1.0) ** 2), rtol=1e-5)
    grad = jax.jit(jax.grad(lambda p: gradient_penalty(leaky, p, x, -x, jax.random.key(0))))(params)
    assert jnp.isfinite(grad[0]["w"]).all()


def test_discriminator_must_return_one_score_per_example():
    bad = lambda p, x: jnp.stack([x[:, 0], x[:, 1]], axis=1)
    with pytest.raises(ShapeError, match="one score per example"):
        gradient_normalize(bad)(None, jnp.ones((3, 2)))
    column = lambda p, x: jnp.sum(x, axis=1, keepdims=True)  # [B, 1] is accepted
    assert gradient_normalize(column)(None, jnp.ones((3, 2))).shape == (3,)
