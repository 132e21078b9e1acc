"""The shared training core: sharding, fused steps, accumulation, checkpoints, exact resume, failures."""
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gen_jax import train as T

TOY = os.path.join(os.path.dirname(__file__), "toy_run.py")


class Regressor(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.gelu(self.l1(x)))[:, 0]


def _problem(seed=0, n=32):
    graphdef, params = nnx.split(Regressor(nnx.Rngs(seed)), nnx.Param)
    rs = np.random.RandomState(seed)
    batch = {"x": rs.randn(n, 5).astype(np.float32), "y": rs.randn(n).astype(np.float32)}

    def loss_fn(params, batch, rng):
        err = nnx.merge(graphdef, params)(batch["x"]) - batch["y"]
        return jnp.mean(err ** 2), {"max_err": jnp.max(jnp.abs(err))}

    return params, batch, loss_fn


def _run_steps(mesh, update_fn, state, batches, steps_per_call=1):
    step = T.compile_train_step(update_fn, T.replicated(mesh), T.batch_sharded(mesh), steps_per_call,
                                donate=False)
    state = jax.device_put(state, T.replicated(mesh))
    metrics = None
    for i in range(0, len(batches), steps_per_call):
        group = tuple(jax.device_put(b, T.batch_sharded(mesh)) for b in batches[i:i + steps_per_call])
        state, metrics = step(state, group)
    return jax.device_get(state), jax.device_get(metrics)


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_step_sharded_over_8_devices_equals_one_device():
    assert jax.device_count() == 8
    params, batch, loss_fn = _problem()
    opt = T.make_optimizer(1e-2, grad_clip_norm=1.0)
    update = T.make_update_fn(loss_fn, opt, ema_decay=0.9)
    state = T.TrainState.create(params, opt, jax.random.PRNGKey(0))
    batches = [batch] * 3
    sharded, m8 = _run_steps(T.make_mesh(), update, state, batches)
    single, m1 = _run_steps(T.make_mesh(jax.devices()[:1]), update, state, batches)
    _close(sharded, single)
    assert int(sharded.step) == 3
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)


def test_fused_steps_equal_sequential_steps():
    params, batch, loss_fn = _problem()
    rs = np.random.RandomState(1)
    batches = [{k: v + 0.1 * rs.randn(*v.shape).astype(np.float32) for k, v in batch.items()} for _ in range(4)]
    opt = T.make_optimizer(1e-2)
    update = T.make_update_fn(loss_fn, opt, ema_decay=0.5)
    state = T.TrainState.create(params, opt, jax.random.PRNGKey(0))
    mesh = T.make_mesh()
    fused, _ = _run_steps(mesh, update, state, batches, steps_per_call=4)
    plain, _ = _run_steps(mesh, update, state, batches, steps_per_call=1)
    _close(fused, plain)


def test_gradient_accumulation_equals_the_whole_batch():
    params, batch, loss_fn = _problem(n=64)
    opt = optax.sgd(0.1)  # linear in the gradient, so equal gradients give equal params
    state = T.TrainState.create(params, opt, jax.random.PRNGKey(0), use_ema=False)
    mesh = T.make_mesh()
    whole, _ = _run_steps(mesh, T.make_update_fn(loss_fn, opt), state, [batch])
    accum, _ = _run_steps(mesh, T.make_update_fn(loss_fn, opt, grad_accum_steps=4), state, [batch])
    _close(whole, accum)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    params, batch, loss_fn = _problem()
    opt = T.make_optimizer(1e-2)
    state = T.TrainState.create(params, opt, jax.random.PRNGKey(0))
    mesh = T.make_mesh()
    bf, m_bf = _run_steps(mesh, T.make_update_fn(loss_fn, opt, compute_dtype="bfloat16"), state, [batch])
    f32, m_32 = _run_steps(mesh, T.make_update_fn(loss_fn, opt), state, [batch])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf.params))
    np.testing.assert_allclose(m_bf["loss"], m_32["loss"], rtol=3e-2)


def test_nonfinite_step_leaves_the_state_unchanged():
    params, batch, _ = _problem()

    def nan_loss(params, batch, rng):
        return jnp.sum(jax.tree.leaves(params)[0]) * jnp.nan, {}

    opt = T.make_optimizer(1e-2)
    state = T.TrainState.create(params, opt, jax.random.PRNGKey(0))
    after, metrics = _run_steps(T.make_mesh(), T.make_update_fn(nan_loss, opt, ema_decay=0.9), state, [batch])
    assert metrics["finite"] == 0.0
    _close(after.params, jax.device_get(state.params))


def test_checkpoint_round_trip(tmp_path):
    params, _, _ = _problem()
    opt = T.make_optimizer(1e-3)
    state = jax.device_put(T.TrainState.create(params, opt, jax.random.PRNGKey(7)),
                           T.replicated(T.make_mesh()))
    ckpt = T.Checkpointer(str(tmp_path / "ck"))
    ckpt.save(5, state, {"position": 11}, {"note": "x"})
    ckpt.wait()
    template = T.TrainState.create(_problem(seed=1)[0], opt, jax.random.PRNGKey(0))
    step, restored, data, meta = ckpt.restore_latest_good(jax.device_put(template, T.replicated(T.make_mesh())))
    ckpt.close()
    assert step == 5 and data == {"position": 11} and meta == {"note": "x"}
    _close(jax.device_get(restored), jax.device_get(state), tol=0)


def test_saving_replicated_arrays_on_cpu_compiles_nothing_and_restores_exactly(tmp_path):
    """Orbax's replica-parallel save would slice each array per replica, one XLA compile per new shape."""
    mesh = T.make_mesh()
    assert len(jax.devices()) == 8
    shapes = [(40, 3), (24, 5, 3), (56,), (3, 3, 8, 72)]  # shapes no other test saves, axes divisible by 8
    tree = {f"w{i}": jax.device_put(jnp.arange(np.prod(s), dtype=jnp.float32).reshape(s) / 7, T.replicated(mesh))
            for i, s in enumerate(shapes)}
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ckpt = T.Checkpointer(str(tmp_path / "ck"))
        ckpt.save(1, tree)
        ckpt.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    template = jax.tree.map(lambda x: jax.device_put(jnp.zeros_like(x), T.replicated(mesh)), tree)
    _, restored, _, _ = ckpt.restore_latest_good(template)
    ckpt.close()
    for key in tree:
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(tree[key]))
        assert restored[key].sharding.is_equivalent_to(T.replicated(mesh), tree[key].ndim)


# ---- whole runs in subprocesses -------------------------------------------------------------------------

def _toy(workdir, steps, *extra, out=None, check=True, timeout=240):
    cmd = [sys.executable, TOY, str(workdir), str(steps), *extra] + (["--out", str(out)] if out else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"toy run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """12 steps without interruption: the reference for every resume test."""
    d = tmp_path_factory.mktemp("straight")
    _toy(d / "wd", 12, out=d / "out.npz")
    return dict(np.load(d / "out.npz"))


def _assert_same_run(out, ref):
    for key in ref:
        if key.startswith(("params/", "ema/")):
            np.testing.assert_allclose(out[key], ref[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_stop_and_resume_gives_the_same_params_and_data_order(tmp_path, straight_run):
    _toy(tmp_path / "wd", 6, out=tmp_path / "a.npz")
    _toy(tmp_path / "wd", 12, out=tmp_path / "b.npz")
    first, second = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert int(second["start_step"]) == 6 and int(second["final_step"]) == 12
    _assert_same_run(second, straight_run)
    np.testing.assert_array_equal(np.concatenate([first["seen"], second["seen"]]), straight_run["seen"])


def test_resume_after_sigkill_at_a_random_moment(tmp_path, straight_run):
    wd = tmp_path / "wd"
    cmd = [sys.executable, TOY, str(wd), "12", "--sleep", "0.25"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (wd / "checkpoints" / "4").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))  # somewhere between checkpoints 4 and 12
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _toy(wd, 12, out=tmp_path / "r.npz")
    out = np.load(tmp_path / "r.npz")
    assert 4 <= int(out["start_step"]) <= 12, resumed.stdout
    _assert_same_run(out, straight_run)
    n = 12 - int(out["start_step"])
    np.testing.assert_array_equal(out["seen"], straight_run["seen"][12 - n:])


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, straight_run):
    wd = tmp_path / "wd"
    _toy(wd, 8)
    latest = wd / "checkpoints" / "8"
    for root, _, files in os.walk(latest):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "r+b") as fh:  # truncate every file of the newest checkpoint
                fh.truncate(max(0, os.path.getsize(path) // 3))
    proc = _toy(wd, 12, out=tmp_path / "r.npz")
    out = np.load(tmp_path / "r.npz")
    assert int(out["start_step"]) == 4, proc.stdout + proc.stderr
    assert (wd / "checkpoints" / "8.corrupt").exists()  # moved aside, not deleted
    _assert_same_run(out, straight_run)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    wd = tmp_path / "wd"
    proc = _toy(wd, 12, "--nan-at", "7", check=False)
    assert proc.returncode != 0
    assert "NonFiniteLossError" in proc.stderr and "last good checkpoint is step 4" in proc.stderr
    ckpt = T.Checkpointer(str(wd / "checkpoints"))
    assert ckpt.latest_step() == 4
    ckpt.close()


@pytest.mark.multiprocess
def test_two_processes_under_jax_distributed_match_one_process(tmp_path, straight_run):
    port = random.Random().randint(20000, 40000)
    procs = [subprocess.Popen([sys.executable, TOY, str(tmp_path / "wd"), "12", "--devices", "4",
                               "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i)] + (["--out", str(tmp_path / "mp.npz")] if i == 0 else []),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    out = np.load(tmp_path / "mp.npz")
    _assert_same_run(out, straight_run)
    np.testing.assert_array_equal(out["seen"], straight_run["seen"])
