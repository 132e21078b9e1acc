"""A deterministic, resumable, per-process sharded batch iterator with host-side prefetch.

Order: epoch e visits the rows in `np.random.default_rng([seed, e]).permutation(N)` (or 0..N-1 without
shuffling); global batch b of the epoch is `perm[b*B:(b+1)*B]` (the last partial batch is dropped). Global
position g (batches since the start) is batch g % (N // B) of epoch g // (N // B), so the whole stream is a
pure function of (seed, g) and resuming is just restarting at g.

Multi-host: every process computes the same permutation and takes its contiguous slice of each global batch,
rows [p*B/P, (p+1)*B/P), and the global `jax.Array` is assembled with
`jax.make_array_from_process_local_data(sharding, local_rows, global_shape)`.

Prefetch: a background thread gathers rows and transfers them to the devices up to `prefetch` batches ahead,
so the accelerator does not wait on host indexing or host-to-device copies. Exceptions in that thread are
re-raised in the consumer. The position counts batches the caller has *consumed*, not what was prefetched.
"""
from __future__ import annotations

import math
import queue
import threading
from collections.abc import Mapping

import jax
import numpy as np

from gen_jax.errors import DataError, ShapeError

_POLL_S = 0.1


class _End:
    """Sentinel: the producer reached the configured number of epochs."""


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Producer:
    """Owns the background thread. Holds no reference to the BatchIterator, so the iterator can be collected."""

    def __init__(self, make_batch, start: int, stop_at: int | None, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(make_batch, start, stop_at),
                                       name="gen_jax-BatchIterator-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make_batch, position: int, stop_at: int | None) -> None:
        try:
            while not self.stop_event.is_set():
                if stop_at is not None and position >= stop_at:
                    self._put(_End())
                    return
                if not self._put(make_batch(position)):
                    return
                position += 1
        except BaseException as e:  # surfaces in the consumer's next()
            self._put(_Failure(e))

    def get(self):
        while True:
            try:
                return self.queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise DataError("the BatchIterator prefetch thread stopped without a result") from None

    def stop(self) -> None:
        self.stop_event.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10.0)


def batch_axis_size(sharding: jax.sharding.NamedSharding) -> int:
    """Number of devices the leading (batch) axis is split over."""
    spec = tuple(sharding.spec)
    if not spec or spec[0] is None:
        return 1
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return math.prod(sharding.mesh.shape[n] for n in names)


class _Plan:
    """Which rows form batch g and how they become device arrays. Separate from BatchIterator so that the
    prefetch thread holds only this, and a dropped iterator is collected (its __del__ stops the thread)."""

    def __init__(self, arrays, global_batch_size, process_index, process_count, seed, shuffle, sharding):
        self.arrays = arrays
        self.num_examples = len(next(iter(arrays.values())))
        self.B = global_batch_size
        self.local_B = global_batch_size // process_count
        self.process_index = process_index
        self.seed = seed
        self.shuffle = shuffle
        self.sharding = sharding
        self.batches_per_epoch = self.num_examples // global_batch_size
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        with self._lock:
            if self._perm_cache is None or self._perm_cache[0] != epoch:
                self._perm_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples))
            return self._perm_cache[1]

    def global_batch_indices(self, position: int) -> np.ndarray:
        epoch, b = divmod(int(position), self.batches_per_epoch)
        return self.permutation(epoch)[b * self.B:(b + 1) * self.B]

    def local_batch(self, position: int) -> dict[str, np.ndarray]:
        lo = self.process_index * self.local_B
        rows = self.global_batch_indices(position)[lo:lo + self.local_B]
        return {k: v[rows] for k, v in self.arrays.items()}

    def make_batch(self, position: int) -> dict[str, jax.Array]:
        local = self.local_batch(position)
        if self.sharding is None:
            return {k: jax.device_put(v) for k, v in local.items()}
        return {k: jax.make_array_from_process_local_data(self.sharding, v, (self.B,) + v.shape[1:])
                for k, v in local.items()}


class BatchIterator:
    """Iterator of dicts of global `jax.Array` batches drawn from `arrays` (all with the same leading size N).

    Args:
      arrays: name -> host array [N, ...]; every batch holds the same rows of each.
      global_batch_size: B, the batch size summed over all processes.
      seed: permutation seed; epoch e uses `np.random.default_rng([seed, e])`.
      sharding: layout of each batch (e.g. `gen_jax.train.batch_sharded(mesh)`); None gives single-device arrays
        of this process's rows.
      shuffle: permute each epoch (else rows in order).
      prefetch: batches prepared ahead in a background thread; 0 prepares each batch on demand.
      num_epochs: stop after this many epochs (None: never stop).
      process_index, process_count: override `jax.process_index()/process_count()` (tests, simulation).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], global_batch_size: int, *, seed: int,
                 sharding: jax.sharding.NamedSharding | None = None, shuffle: bool = True, prefetch: int = 2,
                 num_epochs: int | None = None, process_index: int | None = None,
                 process_count: int | None = None):
        if not arrays:
            raise ShapeError("BatchIterator needs at least one array; pass e.g. {'image': images_NxHxWxC}")
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in self._arrays.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ShapeError(f"all arrays need the same leading (example) size, got {sizes}")
        self.num_examples = int(next(iter(sizes.values())))
        B = int(global_batch_size)
        if B <= 0:
            raise ShapeError(f"global_batch_size must be positive, got {global_batch_size}")
        if B > self.num_examples:
            raise ShapeError(f"global_batch_size {B} exceeds the {self.num_examples} examples; use a smaller batch")
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if not 0 <= self.process_index < self.process_count:
            raise ShapeError(f"process_index {self.process_index} is not in [0, {self.process_count})")
        if B % self.process_count:
            raise ShapeError(f"global_batch_size {B} is not divisible by the {self.process_count} processes; "
                             f"use a multiple of {self.process_count}")
        if sharding is not None:
            n = batch_axis_size(sharding)
            if B % n:
                raise ShapeError(f"global_batch_size {B} is not divisible by the {n} devices the batch axis is "
                                 f"sharded over; use a multiple of {n}")
        if prefetch < 0:
            raise ShapeError(f"prefetch must be >= 0, got {prefetch}")
        self.global_batch_size = B
        self.local_batch_size = B // self.process_count
        self.seed = int(seed)
        self.sharding = sharding
        self.shuffle = shuffle
        self.prefetch = int(prefetch)
        self.num_epochs = num_epochs
        self._plan = _Plan(self._arrays, B, self.process_index, self.process_count, self.seed, shuffle, sharding)
        self._position = 0
        self._producer: _Producer | None = None
        self._closed = False

    # ------------------------------------------------------------------ order (pure functions of seed, position)

    @property
    def batches_per_epoch(self) -> int:
        return self._plan.batches_per_epoch

    @property
    def position(self) -> int:
        """Global batches consumed so far."""
        return self._position

    @property
    def epoch(self) -> int:
        """The epoch of the next batch to be consumed."""
        return self._position // self.batches_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """Row order of `epoch`."""
        return self._plan.permutation(epoch)

    def global_batch_indices(self, position: int) -> np.ndarray:
        """Row indices [B] of global batch number `position` (counted from the first batch of epoch 0)."""
        return self._plan.global_batch_indices(position)

    def local_batch(self, position: int) -> dict[str, np.ndarray]:
        """This process's host rows of global batch `position`: rows [p*B/P, (p+1)*B/P) of that batch."""
        return self._plan.local_batch(position)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> BatchIterator:
        return self

    def _stop_at(self) -> int | None:
        return None if self.num_epochs is None else self.num_epochs * self.batches_per_epoch

    def __next__(self) -> dict[str, jax.Array]:
        if self._closed:
            raise DataError("this BatchIterator is closed; create a new one (or set_state on a fresh one) to go on")
        stop_at = self._stop_at()
        if self.prefetch == 0:
            if stop_at is not None and self._position >= stop_at:
                raise StopIteration
            batch = self._plan.make_batch(self._position)
        else:
            if self._producer is None:
                self._producer = _Producer(self._plan.make_batch, self._position, stop_at, self.prefetch)
            item = self._producer.get()
            if isinstance(item, _End):
                self._stop_producer()
                raise StopIteration
            if isinstance(item, _Failure):
                self._stop_producer()  # the next call starts over at the same (unconsumed) position
                raise item.exc
            batch = item
        self._position += 1
        return batch

    # ------------------------------------------------------------------ state

    def get_state(self) -> dict[str, int]:
        """{"position": global batches consumed}; store it in the checkpoint."""
        return {"position": self._position}

    def set_state(self, state: Mapping) -> None:
        """Continue from a `get_state()` result: the next batch is the one an uninterrupted run would yield."""
        try:
            position = int(np.asarray(state["position"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"iterator state must be {{'position': int}}, got {state!r}") from e
        if position < 0:
            raise DataError(f"iterator position must be >= 0, got {position}")
        self._stop_producer()
        self._position = position

    # ------------------------------------------------------------------ shutdown

    def _stop_producer(self) -> None:
        if self._producer is not None:
            self._producer.stop()
            self._producer = None

    def close(self) -> None:
        """Stop the prefetch thread; idempotent."""
        self._stop_producer()
        self._closed = True

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._stop_producer()
        except Exception:
            pass
