"""The shared training core: state, step builder, mesh, checkpoints, loop, metrics."""
from gen_jax.train.checkpoint import Checkpointer
from gen_jax.train.compilation_cache import enable_compilation_cache
from gen_jax.train.logging import MetricWriter, Progress
from gen_jax.train.loop import Hook, TrainResult, train
from gen_jax.train.mesh import (batch_sharded, init_distributed, is_main_process, make_mesh,
                                replicated)
from gen_jax.train.state import TrainState, ema_update, num_params
from gen_jax.train.step import (cast_floating, compile_train_step, make_optimizer, make_update_fn,
                                resolve_dtype)
from gen_jax.train.xla_options import cpu_compiler_options

__all__ = ["Checkpointer", "MetricWriter", "Progress", "Hook", "TrainResult", "train", "batch_sharded",
           "init_distributed", "is_main_process", "make_mesh", "replicated", "TrainState", "ema_update",
           "num_params", "cast_floating", "compile_train_step", "make_optimizer", "make_update_fn",
           "resolve_dtype", "cpu_compiler_options", "enable_compilation_cache"]
