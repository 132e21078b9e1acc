"""This machine's matmul roof: the best FLOP/s a jitted `jnp.dot` of square matrices reaches, per dtype.

    python -m benchmarks.roofline                              # float32 + bfloat16, sizes 512..4096
    python -m benchmarks.roofline --sizes 256 512 --repeats 3  # quicker
    python -m benchmarks.roofline --json roof.json             # also write the numbers

Other benchmarks import `measure_matmul_peak` to report "fraction of the machine's roof":

    from benchmarks.roofline import measure_matmul_peak
    roof = measure_matmul_peak("float32")["best_flops_per_s"]
    print(f"{achieved / roof:.1%} of this machine's float32 matmul roof")

A square n x n matmul counts 2 n^3 FLOPs (n^3 multiplies and as many adds, the usual convention). Each size is
compiled and warmed up first; a timing sample runs the matmul enough times back to back to last at least
`min_sample_s` (so dispatch overhead does not dominate small sizes), blocks with `block_until_ready`, and the
median over `repeats` samples is reported. JAX measures one device (`jax.devices()[0]`): on GPU/TPU that is one
chip's roof; on CPU, XLA's matmul already uses the host's cores. NumPy's BLAS (usually OpenBLAS) is measured too,
as a reference for the CPU.

`precision` is passed to `jnp.dot`. The default is what model code gets (on TPU, float32 inputs then run as
one bfloat16 pass); pass "highest" for the true float32 roof on TPU/GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Callable, Sequence

import numpy as np

DEFAULT_SIZES = (512, 1024, 2048, 4096)


def _time_samples(run_once: Callable[[], object], block: Callable[[object], None], repeats: int,
                  min_sample_s: float) -> tuple[float, int]:
    """Median seconds per call over `repeats` samples, each `inner` back-to-back calls; returns (median, inner)."""
    t0 = time.perf_counter()
    block(run_once())
    single = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, math.ceil(min_sample_s / single))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [run_once() for _ in range(inner)]
        block(outs)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples), inner


def _summarize(per_size: dict[int, dict], **info) -> dict:
    best_n = max(per_size, key=lambda n: per_size[n]["flops_per_s"])
    return {**info, "sizes": per_size, "best_size": best_n, "best_flops_per_s": per_size[best_n]["flops_per_s"]}


def measure_matmul_peak(dtype: str = "float32", sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 5, *,
                        warmup: int = 2, precision: str | None = None, min_sample_s: float = 0.05,
                        seed: int = 0) -> dict:
    """Best FLOP/s of a jitted `jnp.dot` on square `dtype` matrices of each size in `sizes` (one JAX device).

    Returns {"backend": "jax", "platform", "device_kind", "num_devices", "dtype", "precision",
    "sizes": {n: {"seconds": median s per matmul, "flops_per_s", "calls_per_sample"}},
    "best_size", "best_flops_per_s"}.
    """
    import jax
    import jax.numpy as jnp

    if repeats < 1 or not sizes:
        raise ValueError(f"need repeats >= 1 and at least one size (got repeats={repeats}, sizes={sizes})")
    device = jax.devices()[0]
    jdtype = jnp.dtype(dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision))
    per_size: dict[int, dict] = {}
    for n in sizes:
        ka, kb = jax.random.split(jax.random.PRNGKey(seed + n))
        a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(jdtype), device)
        b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32).astype(jdtype), device)
        for _ in range(warmup):  # the first call compiles
            matmul(a, b).block_until_ready()
        seconds, inner = _time_samples(lambda: matmul(a, b), jax.block_until_ready, repeats, min_sample_s)
        per_size[n] = {"seconds": seconds, "flops_per_s": 2.0 * n ** 3 / seconds, "calls_per_sample": inner}
        del a, b
    return _summarize(per_size, backend="jax", platform=device.platform, device_kind=device.device_kind,
                      num_devices=jax.device_count(), dtype=str(jdtype), precision=precision or "default")


def measure_numpy_matmul_peak(dtype: str = "float32", sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 5, *,
                              warmup: int = 1, min_sample_s: float = 0.05, seed: int = 0) -> dict:
    """Best FLOP/s of `np.dot` (NumPy's BLAS, usually OpenBLAS, all threads) on square matrices."""
    if repeats < 1 or not sizes:
        raise ValueError(f"need repeats >= 1 and at least one size (got repeats={repeats}, sizes={sizes})")
    rng = np.random.default_rng(seed)
    per_size: dict[int, dict] = {}
    for n in sizes:
        a = rng.standard_normal((n, n)).astype(dtype)
        b = rng.standard_normal((n, n)).astype(dtype)
        for _ in range(warmup):
            np.dot(a, b)
        seconds, inner = _time_samples(lambda: np.dot(a, b), lambda _: None, repeats, min_sample_s)
        per_size[n] = {"seconds": seconds, "flops_per_s": 2.0 * n ** 3 / seconds, "calls_per_sample": inner}
    blas = _numpy_blas_name()
    return _summarize(per_size, backend=f"numpy ({blas})", dtype=str(np.dtype(dtype)))


def _numpy_blas_name() -> str:
    try:
        config = np.show_config(mode="dicts")
        return config["Build Dependencies"]["blas"]["name"]
    except Exception:  # older NumPy or an unusual build: the name is only a label
        return "BLAS"


def format_table(results: Sequence[dict]) -> str:
    sizes = sorted({n for r in results for n in r["sizes"]})
    head = f"{'backend':<26}{'dtype':<10}" + "".join(f"{n:>10}" for n in sizes) + f"{'best':>10}"
    lines = [head, "-" * len(head)]
    for r in results:
        cells = "".join(f"{r['sizes'][n]['flops_per_s'] / 1e9:>10.1f}" if n in r["sizes"] else f"{'-':>10}"
                        for n in sizes)
        lines.append(f"{r['backend']:<26}{r['dtype']:<10}{cells}{r['best_flops_per_s'] / 1e9:>10.1f}")
    return "\n".join(lines) + "\n(GFLOP/s of an n x n matmul; columns are n)"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--precision", default=None, choices=[None, "default", "high", "highest"])
    parser.add_argument("--no-numpy", action="store_true", help="skip the NumPy/BLAS reference")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    import jax
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}: {jax.device_count()} x {dev.platform} ({dev.device_kind}); measuring device 0; "
          f"sizes {args.sizes}, median of {args.repeats}")
    results = []
    for dtype in args.dtypes:
        results.append(measure_matmul_peak(dtype, args.sizes, args.repeats, precision=args.precision))
        print(f"  jax {dtype}: best {results[-1]['best_flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    if not args.no_numpy:
        results.append(measure_numpy_matmul_peak("float32", args.sizes, args.repeats))
        print(f"  {results[-1]['backend']} float32: best {results[-1]['best_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(format_table(results))
    for r in results:
        print(f"roof {r['backend']} {r['dtype']}: {r['best_flops_per_s'] / 1e12:.4f} TFLOP/s (n={r['best_size']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
