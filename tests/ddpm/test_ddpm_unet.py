"""The DDPM U-Net: the paper's CIFAR-10 parameter count (against diffusers' UNet2DModel in the
DDPM-CIFAR10 layout), shapes on odd sizes, bf16 compute, dropout through the split/merge boundary, the time
embedding against diffusers, and a loss that falls under Adam on a fixed tiny batch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gen_jax.ddpm import UNet, count_params, diffusion_loss, linear_schedule, timestep_embedding
from gen_jax.errors import ConfigError, ShapeError

CIFAR_PARAMS = 35_746_307


def build(**kw) -> UNet:
    """Initialize inside one compiled call with the cheap "rbg" PRNG: eager init would compile one small
    program per parameter shape, which dominates the test time on a loaded CPU."""
    return nnx.jit(lambda: UNet(**kw, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))))()


def test_cifar10_config_has_the_papers_35_7m_params():
    abstract = nnx.eval_shape(lambda: UNet(in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                           attn_resolutions=(16,), dropout=0.1, resolution=32, rngs=nnx.Rngs(0)))
    assert count_params(nnx.state(abstract, nnx.Param)) == CIFAR_PARAMS


@pytest.mark.slow
def test_param_count_matches_diffusers_ddpm_cifar10_layout():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # count without allocating
        ref = diffusers.UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=32, attention_head_dim=None)
    assert sum(p.numel() for p in ref.parameters()) == CIFAR_PARAMS


def test_time_embedding_matches_diffusers_ddpm_layout():
    torch = pytest.importorskip("torch")
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = np.array([0, 1, 17, 500, 999])
    ref = emb_mod.get_timestep_embedding(torch.from_numpy(t), 128, flip_sin_to_cos=False, downscale_freq_shift=1)
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), 128), ref.numpy(), atol=2e-4)


def _perturbed(params, seed: int = 0):
    """The output conv and every residual branch's last conv are zero-initialized (the untrained model is
    eps = 0 and each block is the identity); add noise to all parameters so every path matters. Done in
    numpy: no per-shape XLA compiles."""
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.05 * rs.randn(*p.shape).astype(np.float32)),
                        params)


@pytest.mark.slow  # two U-Net compiles (~20 s of CPU)
def test_odd_sizes_shapes_and_bf16_compute():
    kw = dict(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
              resolution=7, num_groups=4)
    graphdef, params = nnx.split(build(**kw), nnx.Param)
    graphdef16, params16 = nnx.split(nnx.eval_shape(lambda: UNet(**kw, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))),
                                     nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))  # bf16 compute, f32 params
    params = _perturbed(params)
    x = jax.random.normal(jax.random.key(1), (2, 7, 7, 1))  # 7 -> 4 (SAME stride 2) -> 8, cropped to 7
    t = jnp.array([3, 90])
    y32 = jax.jit(lambda p: nnx.merge(graphdef, p)(x, t, deterministic=True))(params)
    f16 = lambda p: nnx.merge(graphdef16, p)(x, t, deterministic=True)
    assert "bf16[2,7,7,8]" in str(jax.make_jaxpr(f16)(params))  # activations really are bfloat16
    y16 = jax.jit(f16)(params)
    assert y32.shape == y16.shape == (2, 7, 7, 1) and y32.dtype == y16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
    assert 0 < rel < 0.05  # bf16 rounding changes the result, but only a little


def test_dropout_key_through_split_merge_and_input_checks():
    model = build(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.5,
                  resolution=8, num_groups=4)
    graphdef, params = nnx.split(model, nnx.Param)  # parameters are the whole state
    assert len(jax.tree.leaves(nnx.state(model))) == len(jax.tree.leaves(params))
    params = _perturbed(params)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([0, 5])
    fwd = jax.jit(lambda p, key: nnx.merge(graphdef, p)(x, t, deterministic=False, rngs=key))
    a, b, a2 = fwd(params, jax.random.key(0)), fwd(params, jax.random.key(1)), fwd(params, jax.random.key(0))
    np.testing.assert_array_equal(a, a2)  # the key alone decides the mask
    assert float(jnp.abs(a - b).max()) > 1e-3
    with pytest.raises(ConfigError):
        model(x, t, deterministic=False)
    with pytest.raises(ShapeError):
        model(jnp.zeros((2, 16, 16, 1)), t, deterministic=True)
    with pytest.raises(ShapeError):
        model(x, jnp.zeros((3,), jnp.int32), deterministic=True)
    with pytest.raises(ConfigError):
        UNet(in_channels=1, ch=6, ch_mult=(1,), num_groups=4, resolution=8, rngs=nnx.Rngs(0))


@pytest.mark.slow  # compiles the U-Net's gradient (~30 s of CPU)
def test_loss_decreases_on_a_fixed_batch_under_adam():
    sch = linear_schedule(100)
    model = build(in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                  resolution=8, num_groups=4)
    graphdef, params = nnx.split(model, nnx.Param)
    x0 = jnp.where(jnp.arange(64).reshape(1, 8, 8, 1) % 3 == 0, 1.0, -1.0) * jnp.ones((8, 1, 1, 1))

    def loss_fn(p, rng):
        m = nnx.merge(graphdef, p)
        return diffusion_loss(sch, lambda xt, tt: m(xt, tt, deterministic=True), x0, rng).mean()

    opt = optax.adam(3e-3)
    eval_rng = jax.random.key(123)

    @jax.jit
    def train(p):
        before = loss_fn(p, eval_rng)

        def step(carry, i):
            p, s = carry
            g = jax.grad(loss_fn)(p, jax.random.fold_in(jax.random.key(0), i))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), jnp.arange(40))
        return before, loss_fn(p, eval_rng)

    before, after = train(params)
    # Zero-initialized output: the untrained model predicts eps = 0, so the loss is exactly mean(eps^2).
    noise = jax.random.normal(jax.random.split(eval_rng)[1], x0.shape)
    np.testing.assert_allclose(float(before), float(jnp.mean(noise**2)), rtol=1e-5)
    assert float(after) < 0.7 * float(before)
