"""Per-function XLA:CPU options: YNNPACK fusions off for one compiled train step, same numbers, safe fallback."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gen_jax import train as T
from gen_jax.config import TrainConfig
from gen_jax.train import xla_options


def _has_ynn_fusion(compiled) -> bool:
    return "ynn_fusion" in compiled.as_text()


def _dense_tanh(w, x):
    return jnp.tanh(x @ w).sum(axis=1)


def _args():
    rs = np.random.RandomState(0)
    return jnp.asarray(rs.randn(64, 96), jnp.float32), jnp.asarray(rs.randn(32, 64), jnp.float32)


def test_ynn_off_removes_the_library_fusions_and_keeps_the_numbers():
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU option")
    w, x = _args()
    default = jax.jit(_dense_tanh).lower(w, x).compile()
    if not _has_ynn_fusion(default):
        pytest.skip("this jaxlib compiles the product without YNNPACK fusions by default")
    options = T.cpu_compiler_options(ynn_fusions=False)
    assert options == {xla_options.YNN_FUSION_OPTION: ""}
    off = jax.jit(_dense_tanh, compiler_options=options).lower(w, x).compile()
    assert not _has_ynn_fusion(off)
    np.testing.assert_allclose(np.asarray(off(w, x)), np.asarray(default(w, x)), rtol=1e-5, atol=1e-5)


def test_nothing_to_change_gives_no_options():
    assert T.cpu_compiler_options(ynn_fusions=True) is None
    assert T.cpu_compiler_options(ynn_fusions=False, backend="gpu") is None
    assert T.cpu_compiler_options(ynn_fusions=False, backend="tpu") is None
    assert TrainConfig().cpu_ynn_fusions  # XLA's defaults unless a preset says otherwise


def test_an_option_this_jaxlib_rejects_falls_back_to_the_defaults_with_a_warning(monkeypatch):
    monkeypatch.setattr(xla_options, "YNN_FUSION_OPTION", "xla_cpu_no_such_option_for_this_test")
    with pytest.warns(RuntimeWarning, match="rejected compiler options"):
        assert xla_options.cpu_compiler_options(ynn_fusions=False, backend="cpu") is None


def test_compiled_train_step_takes_the_options_and_trains_the_same():
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU option")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(64, 96, rngs=rngs)
            self.l2 = nnx.Linear(96, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))[:, 0]

    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    rs = np.random.RandomState(1)
    batch = {"x": rs.randn(16, 64).astype(np.float32), "y": rs.randn(16).astype(np.float32)}

    def loss_fn(p, b, rng):
        return jnp.mean((nnx.merge(graphdef, p)(b["x"]) - b["y"]) ** 2), {}

    opt = optax.adam(1e-2)
    update_fn = T.make_update_fn(loss_fn, opt, ema_decay=None)
    mesh = T.make_mesh()
    results = {}
    for ynn in (True, False):
        step = T.compile_train_step(update_fn, T.replicated(mesh), T.batch_sharded(mesh), donate=False,
                                    compiler_options=T.cpu_compiler_options(ynn_fusions=ynn))
        state = jax.device_put(T.TrainState.create(params, opt, jax.random.PRNGKey(0), use_ema=False),
                               T.replicated(mesh))
        batches = (jax.device_put(batch, T.batch_sharded(mesh)),)
        assert _has_ynn_fusion(step.lower(state, batches).compile()) == (ynn and _has_ynn_fusion(
            jax.jit(_dense_tanh).lower(*_args()).compile()))
        for _ in range(3):
            state, metrics = step(state, batches)
        results[ynn] = jax.device_get((state.params, metrics["loss"]))
    for a, b in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
