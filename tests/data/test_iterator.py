"""BatchIterator: the order is a pure function of (seed, position); processes slice it; prefetch is invisible."""
import gc
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gen_jax.data import BatchIterator
from gen_jax.errors import DataError, ShapeError

N = 22  # not a multiple of the batch size: the remainder is dropped


def data(n=N):
    return {"index": np.arange(n, dtype=np.int32), "x": np.arange(n * 3, dtype=np.float32).reshape(n, 3)}


def take(it, k):
    return [np.asarray(next(it)["index"]) for _ in range(k)]


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("gen_jax-BatchIterator") and t.is_alive()]


def test_order_follows_the_documented_permutation_of_seed_and_epoch():
    B = 4
    with BatchIterator(data(), B, seed=7) as it:
        got = take(it, 2 * it.batches_per_epoch + 1)
    assert it.batches_per_epoch == N // B == 5
    for g, rows in enumerate(got):
        epoch, b = divmod(g, 5)
        expected = np.random.default_rng([7, epoch]).permutation(N)[b * B:(b + 1) * B]
        np.testing.assert_array_equal(rows, expected)


def test_same_seed_same_stream_and_other_seed_other_stream():
    a, b, c = (BatchIterator(data(), 4, seed=s) for s in (1, 1, 2))
    sa, sb, sc = take(a, 6), take(b, 6), take(c, 6)
    for it in (a, b, c):
        it.close()
    np.testing.assert_array_equal(np.stack(sa), np.stack(sb))
    assert not np.array_equal(np.stack(sa), np.stack(sc))


def test_each_example_at_most_once_per_epoch_and_rows_stay_aligned():
    with BatchIterator(data(), 4, seed=0, num_epochs=2) as it:
        batches = [{k: np.asarray(v) for k, v in b.items()} for b in it]
    assert len(batches) == 10  # num_epochs ends the stream
    for epoch in range(2):
        seen = np.concatenate([b["index"] for b in batches[epoch * 5:(epoch + 1) * 5]])
        assert len(np.unique(seen)) == len(seen) == 20 and seen.min() >= 0 and seen.max() < N
    for b in batches:  # every array of a batch holds the same examples
        np.testing.assert_array_equal(b["x"], data()["x"][b["index"]])


def test_no_shuffle_visits_rows_in_order():
    with BatchIterator(data(), 4, seed=0, shuffle=False, prefetch=0) as it:
        np.testing.assert_array_equal(np.concatenate(take(it, 6)), np.r_[0:20, 0:4])


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_from_state_yields_exactly_the_uninterrupted_batches(prefetch):
    straight = BatchIterator(data(), 4, seed=3, prefetch=prefetch)
    expected = take(straight, 13)
    first = BatchIterator(data(), 4, seed=3, prefetch=prefetch)
    take(first, 7)
    time.sleep(0.05)  # let the prefetcher run ahead: the state must still count only consumed batches
    state = first.get_state()
    assert state == {"position": 7} and first.epoch == 1
    first.close()
    resumed = BatchIterator(data(), 4, seed=3, prefetch=prefetch)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(take(resumed, 6)), np.stack(expected[7:]))
    resumed.set_state({"position": np.int64(2)})  # rewinding a live iterator also works (e.g. from Orbax)
    np.testing.assert_array_equal(take(resumed, 1)[0], expected[2])
    straight.close()
    resumed.close()


def test_each_process_takes_its_contiguous_slice_of_the_global_batch():
    B, P_ = 8, 4
    whole = BatchIterator(data(), B, seed=5, prefetch=0)
    procs = [BatchIterator(data(), B, seed=5, prefetch=0, process_index=p, process_count=P_) for p in range(P_)]
    for g in range(7):
        global_rows = whole.global_batch_indices(g)
        locals_ = [np.asarray(next(it)["index"]) for it in procs]
        for p, rows in enumerate(locals_):
            np.testing.assert_array_equal(rows, global_rows[p * B // P_:(p + 1) * B // P_])
            np.testing.assert_array_equal(procs[p].local_batch(g)["index"], rows)
        np.testing.assert_array_equal(np.concatenate(locals_), np.asarray(next(whole)["index"]))


def test_sharded_batch_is_a_global_array_split_over_the_8_devices():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    with BatchIterator(data(), 16, seed=0, sharding=sharding) as it:
        batch = next(it)
        rows = it.global_batch_indices(0)
    x = batch["x"]
    assert x.shape == (16, 3) and x.sharding == sharding and len(x.addressable_shards) == 8
    for shard in x.addressable_shards:
        assert shard.data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(x), data()["x"][rows])


def test_batch_size_must_divide_over_processes_and_batch_devices():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    with pytest.raises(ShapeError, match="6 is not divisible by the 4 devices"):
        BatchIterator(data(), 6, seed=0, sharding=NamedSharding(mesh, P("data")))
    with pytest.raises(ShapeError, match="12 is not divisible by the 8 devices"):
        BatchIterator(data(), 12, seed=0, sharding=NamedSharding(mesh, P(("data", "model"))))
    BatchIterator(data(), 12, seed=0, sharding=NamedSharding(mesh, P("data"))).close()  # 12 % 4 == 0
    with pytest.raises(ShapeError, match="10 is not divisible by the 4 processes"):
        BatchIterator(data(), 10, seed=0, process_index=0, process_count=4)
    with pytest.raises(ShapeError, match="exceeds the 22 examples"):
        BatchIterator(data(), 24, seed=0)
    with pytest.raises(ShapeError, match="same leading"):
        BatchIterator({"a": np.zeros(4), "b": np.zeros(5)}, 2, seed=0)


def test_exception_in_prefetch_thread_surfaces_in_consumer():
    it = BatchIterator(data(), 4, seed=0, prefetch=2)
    make = it._plan.make_batch

    def failing(position):
        if position == 2:
            raise RuntimeError("disk went away")
        return make(position)

    it._plan.make_batch = failing
    take(it, 2)
    with pytest.raises(RuntimeError, match="disk went away"):
        next(it)
    assert it.get_state() == {"position": 2}  # the failed batch was not consumed
    it._plan.make_batch = make
    np.testing.assert_array_equal(take(it, 1)[0], it.global_batch_indices(2))  # retry resumes in place
    it.close()


def test_close_and_garbage_collection_stop_the_prefetch_thread():
    before = len(prefetch_threads())
    it = BatchIterator(data(), 4, seed=0, prefetch=2)
    next(it)
    assert len(prefetch_threads()) == before + 1
    it.close()
    assert len(prefetch_threads()) == before
    with pytest.raises(DataError, match="closed"):
        next(it)
    dropped = BatchIterator(data(), 4, seed=0, prefetch=2)
    next(dropped)
    del dropped
    gc.collect()
    deadline = time.time() + 5
    while len(prefetch_threads()) > before and time.time() < deadline:
        time.sleep(0.05)
    assert len(prefetch_threads()) == before


def test_bad_state_is_rejected():
    with BatchIterator(data(), 4, seed=0) as it:
        with pytest.raises(DataError, match="position"):
            it.set_state({"step": 3})
        with pytest.raises(DataError, match=">= 0"):
            it.set_state({"position": -1})
