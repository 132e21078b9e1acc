"""The train state: one pytree that holds everything a resumed run needs (besides the data position)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """step, params, optimizer state, EMA params and the run's RNG key.

    `params` may be any pytree (e.g. an `nnx.State` of a model's `nnx.Param`s, or `{"G": ..., "D": ...}`
    for a GAN with `opt_state` a matching dict). `ema_params` is None when EMA is off. `rng` is a raw
    uint32 key (`jax.random.PRNGKey`) so checkpoints stay plain arrays; each step folds in the step number.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation | None, rng: jax.Array, *,
               use_ema: bool = True, opt_state: Any = None) -> "TrainState":
        if opt_state is None and optimizer is not None:
            opt_state = optimizer.init(params)
        ema = jax.tree.map(jnp.array, params) if use_ema else None
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, ema_params=ema,
                   rng=jnp.asarray(rng))

    def step_rng(self) -> jax.Array:
        return jax.random.fold_in(self.rng, self.step)


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    """ema <- decay * ema + (1 - decay) * params, in float32."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def num_params(tree: Any) -> int:
    """Total number of array elements in a pytree (e.g. the parameters of a model)."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))
