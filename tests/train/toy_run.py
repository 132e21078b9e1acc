"""A small but real training run through the shared core, used by the core's tests as a subprocess.

    python tests/train/toy_run.py WORKDIR NUM_STEPS [--devices N] [--out params.npz] [--sleep S]
        [--nan-at STEP] [--coordinator HOST:PORT --num-processes P --process-id I]

Trains a 2-layer MLP regressor on a fixed synthetic dataset with gen_jax.data.BatchIterator and
gen_jax.train.train (EMA, Adam, checkpoints every 4 steps), then writes the final params, EMA params and
the order of the examples it saw to --out (process 0 only).
"""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("num_steps", type=int)
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--out", default=None)
parser.add_argument("--sleep", type=float, default=0.0, help="seconds of host sleep per step (for kill tests)")
parser.add_argument("--nan-at", type=int, default=None)
parser.add_argument("--steps-per-call", type=int, default=1)
parser.add_argument("--coordinator", default=None)
parser.add_argument("--num-processes", type=int, default=None)
parser.add_argument("--process-id", type=int, default=None)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gen_jax import train as T  # noqa: E402
from gen_jax.data import BatchIterator  # noqa: E402

T.init_distributed(args.coordinator, args.num_processes, args.process_id)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))[:, 0]


rs = np.random.RandomState(0)
x = rs.randn(96, 6).astype(np.float32)
data = {"x": x, "y": np.sin(x @ rs.randn(6).astype(np.float32)), "index": np.arange(96, dtype=np.int32)}
graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)


def loss_fn(params, batch, rng):
    pred = nnx.merge(graphdef, params)(batch["x"])
    noise = 0.01 * jax.random.normal(rng, pred.shape)  # uses the step rng: resume must reproduce it
    loss = jnp.mean((pred + noise - batch["y"]) ** 2)
    return loss, {"first_index": batch["index"][0].astype(jnp.float32)}


mesh = T.make_mesh()
opt = T.make_optimizer(0.01, grad_clip_norm=1.0)
update = T.make_update_fn(loss_fn, opt, ema_decay=0.9)
if args.nan_at is not None:
    inner = update

    def update(state, batch):  # poison the loss from step `nan_at` on
        new, metrics = inner(state, batch)
        bad = state.step >= args.nan_at - 1
        metrics = {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"]),
                   "finite": jnp.where(bad, 0.0, metrics["finite"])}
        return jax.tree.map(lambda a, b: jnp.where(bad, b, a), new, state.replace(step=state.step + 1)), metrics

seen = []


class Recording:
    """Wraps the iterator to record which examples each step saw, and optionally slow the run down."""

    def __init__(self, it):
        self.it = it

    def __next__(self):
        if args.sleep:
            time.sleep(args.sleep)
        batch = next(self.it)
        seen.append(np.asarray(jax.experimental.multihost_utils.process_allgather(batch["index"], tiled=True)))
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)


it = BatchIterator(data, 16, seed=3, sharding=T.batch_sharded(mesh))
state = T.TrainState.create(params, opt, jax.random.PRNGKey(42))
result = T.train(workdir=args.workdir, state=state, update_fn=update, data=Recording(it),
                 num_steps=args.num_steps, mesh=mesh, log_every=2, checkpoint_every=4, keep_checkpoints=3,
                 steps_per_call=args.steps_per_call, batch_size=16, echo_metrics=False)
it.close() if hasattr(it, "close") else None
if args.out and jax.process_index() == 0:
    host = jax.device_get(result.state)
    flat = {f"params/{jax.tree_util.keystr(k)}": np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(host.params)}
    flat.update({f"ema/{jax.tree_util.keystr(k)}": np.asarray(v)
                 for k, v in jax.tree_util.tree_leaves_with_path(host.ema_params)})
    np.savez(args.out, **flat, seen=np.array(seen).reshape(-1, 16) if seen else np.zeros((0, 16)),
             start_step=result.start_step, final_step=result.final_step)
print("done", result.start_step, result.final_step, flush=True)
sys.exit(0)
