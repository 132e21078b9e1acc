"""The one training loop every paper uses.

    result = train(workdir=..., state=state, update_fn=update_fn, data=batch_iterator,
                   num_steps=..., hooks=[Hook(every_steps=1000, fn=write_samples)])

It owns: the mesh and shardings (state replicated, batches split over 'data'), the compiled and donated
step (several steps per call with `steps_per_call`), auto-resume from the newest good checkpoint in
`<workdir>/checkpoints` (train state + data position), periodic async checkpoints, metrics (stdout, JSONL,
TensorBoard) fetched one call late so the host never stalls the device, a progress bar with rate and ETA,
a clean stop with a `NonFiniteLossError` when the loss or gradients stop being finite (the last good
checkpoint stays intact), and a checkpoint on SIGTERM/SIGINT so a preempted run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Mapping, Protocol

import jax
import numpy as np

from gen_jax.errors import NonFiniteLossError
from gen_jax.train.checkpoint import Checkpointer
from gen_jax.train.logging import MetricWriter, Progress
from gen_jax.train.mesh import batch_sharded, is_main_process, make_mesh, replicated
from gen_jax.train.state import TrainState
from gen_jax.train.step import UpdateFn, compile_train_step


class DataIterator(Protocol):
    def __next__(self) -> Any: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: Mapping) -> None: ...


@dataclasses.dataclass
class Hook:
    """Calls `fn(step, state)` every `every_steps` steps (and at the end when `at_end`).

    Every process calls it (sampling under jit needs all of them); `fn` writes files only on process 0
    (`gen_jax.train.is_main_process()`). A returned dict of scalars is logged with the hook's name as prefix.
    """
    every_steps: int
    fn: Callable[[int, TrainState], Mapping[str, float] | None]
    name: str = ""
    at_end: bool = True


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final (device) state, the steps it started and ended at, timing of the timed
    calls (compilation excluded), the last logged metrics, and whether a signal stopped it early."""
    state: TrainState
    start_step: int
    final_step: int
    train_seconds: float
    steps_per_second: float
    last_metrics: dict
    preempted: bool = False


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop after the current call."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _due(step_before: int, step_after: int, every: int) -> bool:
    return every > 0 and step_after // every > step_before // every


def train(*, workdir: str, state: TrainState, update_fn: UpdateFn, data: DataIterator, num_steps: int,
          mesh: jax.sharding.Mesh | None = None, steps_per_call: int = 1, log_every: int = 50,
          checkpoint_every: int = 500, keep_checkpoints: int = 3, hooks: tuple[Hook, ...] | list = (),
          batch_size: int | None = None, config: Mapping | None = None, async_checkpoint: bool = True,
          desc: str = "train", echo_metrics: bool = True, checkpoint_dir: str | None = None,
          after_checkpoint: Callable[[int], None] | None = None,
          compiler_options: dict[str, str] | None = None) -> TrainResult:
    """Train `state` with `update_fn` on batches from `data` up to `num_steps`; resume if `workdir` has a run.

    `data` yields batches already laid out on the mesh (e.g. `gen_jax.data.BatchIterator` with
    `sharding=batch_sharded(mesh)`) and reports/restores its position through `get_state`/`set_state`.
    Metrics go to the local `workdir`; checkpoints to `checkpoint_dir` (default `<workdir>/checkpoints`),
    which may be a `gs://` path (`gen_jax.train.launch.Run` stages a remote workdir this way and mirrors
    the local files there from `after_checkpoint`). `compiler_options` go to the compiled train step only
    (e.g. `gen_jax.train.xla_options.cpu_compiler_options(ynn_fusions=config.train.cpu_ynn_fusions)`).
    """
    if "://" in str(workdir):
        raise ValueError(f"train(workdir={workdir!r}): the workdir is where metrics are written locally; for a "
                         "remote run pass a local folder and checkpoint_dir=<remote>/checkpoints, e.g. "
                         "train(**run.train_kwargs(), ...) with a gen_jax.train.launch.Run")
    mesh = mesh or make_mesh()
    state_sharding, batch_sharding = replicated(mesh), batch_sharded(mesh)
    main = is_main_process()
    os.makedirs(workdir, exist_ok=True)
    if main and config is not None:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, default=str)

    checkpointer = Checkpointer(checkpoint_dir or os.path.join(workdir, "checkpoints"), keep=keep_checkpoints,
                                async_save=async_checkpoint)
    # A private copy: the compiled step donates its input, and the caller's arrays (often shared with
    # their NNX model) must survive.
    state = jax.jit(lambda s: jax.tree.map(lambda x: x.copy(), s), out_shardings=state_sharding)(state)
    restored = checkpointer.restore_latest_good(state)
    start_step = 0
    if restored is not None:
        start_step, state, data_state, _ = restored
        data.set_state(data_state)
    writer = MetricWriter(workdir, enabled=main)
    progress = Progress(num_steps, start_step, desc=desc, enabled=main)
    echo = progress.write if echo_metrics else (lambda _: None)
    if restored is not None:
        echo(f"resumed from {checkpointer.directory} at step {start_step}")

    compiled: dict[int, Callable] = {}

    def step_fn(k: int):
        if k not in compiled:
            compiled[k] = compile_train_step(update_fn, state_sharding, batch_sharding, k,
                                             compiler_options=compiler_options)
        return compiled[k]

    step = start_step
    last_saved = start_step if restored is not None else None
    pending: tuple[int, int, dict] | None = None  # (step after the call, steps in it, device metrics)
    window: dict[str, list] = {}
    last_metrics: dict = {}
    train_seconds, window_seconds, window_steps = 0.0, 0.0, 0

    def save(at_step: int) -> None:
        nonlocal last_saved
        if last_saved == at_step:
            return
        checkpointer.save(at_step, state, data.get_state(), {"step": at_step, "num_steps": num_steps})
        last_saved = at_step
        writer.flush()
        if after_checkpoint is not None:
            after_checkpoint(at_step)

    def process(item) -> None:
        """Fetch one call's metrics (a call late), stop on non-finite values, log on schedule."""
        nonlocal last_metrics, window_seconds, window_steps
        at_step, k, metrics = item
        host = {name: float(np.asarray(v)) for name, v in jax.device_get(metrics).items()}
        if host.pop("finite", 1.0) < 1.0 or not np.isfinite(host.get("loss", 0.0)):
            checkpointer.wait()
            good = checkpointer.latest_step()
            raise NonFiniteLossError(
                f"the loss or its gradients became NaN/inf in the {k} step(s) ending at step {at_step} "
                f"(metrics: {host}). The state was not updated by the bad step; the last good checkpoint "
                f"is step {good} in {checkpointer.directory}. Lower the learning rate, enable gradient "
                "clipping (train.grad_clip_norm) or train in float32, then re-run to resume from there.")
        for name, v in host.items():
            window.setdefault(name, []).append(v)
        progress.update(k, loss=host.get("loss", float("nan")))
        if _due(at_step - k, at_step, log_every) or at_step == num_steps:
            summary = {name: float(np.mean(vs)) for name, vs in window.items()}
            if window_seconds > 0:
                summary["steps_per_sec"] = window_steps / window_seconds
                if batch_size:
                    summary["examples_per_sec"] = window_steps * batch_size / window_seconds
            writer.write(at_step, summary, prefix="train/", echo=echo)
            last_metrics = summary
            window.clear()
            window_seconds, window_steps = 0.0, 0

    preempted = False
    try:
        with _StopFlag() as stop:
            while step < num_steps:
                k = min(steps_per_call, num_steps - step)
                compiling = k not in compiled  # the first call of each shape compiles: not timed
                t0 = time.perf_counter()
                batches = tuple(next(data) for _ in range(k))
                state, metrics = step_fn(k)(state, batches)
                before, step = step, step + k
                if pending is not None:
                    process(pending)
                pending = (step, k, metrics)
                if not compiling:
                    dt = time.perf_counter() - t0
                    train_seconds += dt
                    window_seconds += dt
                    window_steps += k
                ckpt_due = _due(before, step, checkpoint_every) or step == num_steps
                hooks_due = [h for h in hooks if _due(before, step, h.every_steps)
                             or (h.at_end and step == num_steps)]
                if ckpt_due or hooks_due or stop.requested:
                    process(pending)  # the checkpoint and hooks must see a verified-finite state
                    pending = None
                for hook in hooks_due:
                    out = hook.fn(step, state)
                    if out:
                        writer.write(step, out, prefix=f"{hook.name or 'eval'}/", echo=echo)
                if ckpt_due or stop.requested:
                    save(step)
                if stop.requested:
                    preempted = True
                    echo(f"stop requested: checkpointed step {step}; re-run the same command to resume")
                    break
            if pending is not None:
                process(pending)
    finally:
        checkpointer.wait()
        checkpointer.close()
        progress.close()
        writer.close()
    timed_steps = step - start_step - sum(compiled)  # one untimed call per compiled shape
    return TrainResult(state=state, start_step=start_step, final_step=step, train_seconds=train_seconds,
                       steps_per_second=timed_steps / train_seconds if train_seconds > 0 else 0.0,
                       last_metrics=last_metrics, preempted=preempted)
