"""VAE models: shapes, binarization, the IWAE bound's monotonicity in K, and a few training steps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.train import TrainState, make_update_fn
from gen_jax.vae import (GaussianVAE, SphericalVAE, binarize, make_iwae_loss, make_log_likelihood_fn, make_vae_loss,
                         svae_ambient_dim, vmf)


def _images(n=8, side=4, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (n, side, side, 1)).astype(np.uint8))


def _patterns(n=16, side=4, seed=0):
    """Nearly deterministic binary images (intensities 0 or 255), so a model can learn them quickly."""
    return jnp.asarray((np.random.RandomState(seed).rand(n, side, side, 1) < 0.5).astype(np.uint8) * 255)


def test_iwae_paper_architecture_and_shapes():
    model = GaussianVAE(rngs=nnx.Rngs(0))
    sizes = [(l.in_features, l.out_features) for l in model.encoder.layers]
    assert sizes == [(784, 200), (200, 200), (200, 100)]  # mean and log-variance of a 50-d Gaussian
    assert [(l.in_features, l.out_features) for l in model.decoder.layers] == [(50, 200), (200, 200), (200, 784)]
    x = binarize(jax.random.key(0), _images(3, 28))

    @nnx.jit
    def run(model, x):
        q = model.encode(x)
        z = q.sample(jax.random.key(1), 4)
        return q.mean, q.log_var, z, model.decode_log_prob(z, x), model.prior_log_prob(z)

    mean, log_var, z, log_px_z, log_pz = run(model, x)
    assert mean.shape == log_var.shape == (3, 50)
    assert z.shape == (4, 3, 50)
    assert log_px_z.shape == (4, 3) and log_pz.shape == (4, 3)
    assert np.all(np.asarray(log_px_z) < 0)
    with pytest.raises(ShapeError, match="features"):
        model.decode_log_prob(z, x[:, :10])


def test_spherical_vae_shapes_unit_norm_and_kappa():
    m = svae_ambient_dim(4)
    assert m == 5
    learned = SphericalVAE(x_dim=16, hidden=(8,), ambient_dim=m, rngs=nnx.Rngs(0))
    fixed = SphericalVAE(x_dim=16, hidden=(8,), ambient_dim=m, kappa=20.0, rngs=nnx.Rngs(0))
    x = binarize(jax.random.key(0), _images(6))

    @nnx.jit
    def run(model, x):
        q = model.encode(x)
        z = q.sample(jax.random.key(1), 2)
        return q.mu, q.kappa, z, model.prior_log_prob(z)

    mu, kappa, z, log_pz = map(np.asarray, run(learned, x))
    np.testing.assert_allclose(np.linalg.norm(mu, axis=-1), 1.0, rtol=1e-5)
    assert z.shape == (2, 6, m)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(log_pz, -vmf.log_sphere_area(m), rtol=1e-6)  # uniform prior 1 / |S^{m-1}|
    assert np.all(kappa > 1.0)  # softplus + 1
    np.testing.assert_allclose(np.asarray(fixed.encode(x).kappa), 20.0)
    with pytest.raises(ConfigError, match="fixed kappa"):
        learned.encode(x, table=np.zeros(3))


def test_dynamic_binarization_is_bernoulli_of_intensity_with_a_fresh_draw_per_key():
    imgs = jnp.asarray(np.array([0, 64, 128, 255], np.uint8).reshape(1, 2, 2, 1).repeat(4000, 0))
    a, b = binarize(jax.random.key(0), imgs), binarize(jax.random.key(1), imgs)
    assert a.shape == (4000, 4) and set(np.unique(np.asarray(a))) <= {0.0, 1.0}
    np.testing.assert_allclose(np.asarray(a).mean(0), [0, 64 / 255, 128 / 255, 1], atol=0.03)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_iwae_bound_rises_with_K_on_average_for_a_random_model():
    model = GaussianVAE(x_dim=16, hidden=(16,), latent_dim=3, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.tile(binarize(jax.random.key(0), _images(16)), (8, 1))  # 8 independent estimates per example
    fns = [make_log_likelihood_fn(graphdef, num_samples=K, chunk_size=min(K, 16)) for K in (1, 4, 64)]
    all_bounds = jax.jit(lambda p, x: [f(p, x, jax.random.key(i)).mean() for i, f in enumerate(fns)])
    bounds = [float(b) for b in all_bounds(params, x)]
    assert bounds[0] < bounds[1] < bounds[2], bounds


def _train(model, loss_fn, images, steps=40):
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adam(1e-2)
    update = make_update_fn(loss_fn, opt)
    state = TrainState.create(params, opt, jax.random.key(0), use_ema=False)
    batch = {"images": images}

    @jax.jit
    def run(state):
        def body(s, _):
            s, m = update(s, batch)
            return s, m["loss"]
        return jax.lax.scan(body, state, None, length=steps)

    state, losses = run(state)
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    return losses


def test_a_few_iwae_steps_reduce_the_loss_on_a_tiny_batch():
    model = GaussianVAE(x_dim=16, hidden=(32,), latent_dim=4, rngs=nnx.Rngs(0))
    graphdef = nnx.split(model, nnx.Param)[0]
    losses = _train(model, make_iwae_loss(graphdef, num_samples=5), _patterns())
    assert losses[-10:].mean() < losses[:5].mean() - 0.5


@pytest.mark.slow
def test_svae_learned_and_fixed_kappa_train_with_both_samplers():
    imgs = _patterns()
    learned = SphericalVAE(x_dim=16, hidden=(32,), ambient_dim=4, rngs=nnx.Rngs(0))
    losses = _train(learned, make_iwae_loss(nnx.split(learned, nnx.Param)[0], num_samples=3), imgs)
    assert losses[-10:].mean() < losses[:5].mean() - 0.5
    fixed = SphericalVAE(x_dim=16, hidden=(32,), ambient_dim=4, kappa=10.0, rngs=nnx.Rngs(0))
    table = vmf.make_inverse_cdf_table(4, 10.0, size=1 << 10, grid=1 << 14)
    losses = _train(fixed, make_vae_loss(nnx.split(fixed, nnx.Param)[0], table=table), imgs)
    assert losses[-10:].mean() < losses[:5].mean() - 0.5
