"""vMF sampling throughput vs SciPy, and K = 5000 importance-sampled evaluation chunked vs unchunked.

    python -m benchmarks.vmf_sampling                      # full run
    python -m benchmarks.vmf_sampling --skip-eval --n 20000,1000000 --clock cpu
    python -m benchmarks.vmf_sampling --n 20000 --eval-batch 100 --eval-k 5000 --chunk 100

Part 1: samples/s of `gen_jax.vae.vmf.sample` (the default sampler: the exact inverse CDF for d = 3,
rejection sampling with Wood's or the gamma envelope otherwise; Su's inverse-CDF table sampler) against
`scipy.stats.vonmises_fisher(mu, kappa).rvs(n)` for d in (3, 10, 100), kappa in (1, 20, 500), at each n of
`--n` (20000, and 10^6 where per-call dispatch is amortized). Each setting is timed with the default threefry
key and, in a separate row, with a `jax.random.key(0, impl="rbg")` key (same samplers, another bit generator).
Timings exclude compilation (one warm-up call), block on the result, and are the best of `--repeats` calls
for every sampler, SciPy included (one call for SciPy when n d > 10^7: it takes tens of seconds).
`--clock cpu` times process CPU time instead of wall time, which is steadier on a shared, loaded machine
(pin the process to one core, e.g. `taskset -c 1`, so that it equals single-core time for both libraries).
Part 2: log p(x) with K importance samples on a batch of binarized 28x28 images through the IWAE paper's
784-200-200-50 Gaussian VAE (random weights: the cost does not depend on training): `log_likelihood` with
`chunk_size` (a lax.scan with a running logsumexp, memory of one chunk) vs a straightforward unchunked
implementation that materializes all K decoder outputs [K, B, 784] and takes one logsumexp.
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats as st
from flax import nnx

from benchmarks.ddpm_speed import speed_env, speed_env_line
from gen_jax.vae import GaussianVAE, log_likelihood, vmf


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _best(call, repeats: int, clock) -> float:
    best = math.inf
    for _ in range(repeats):
        t = clock()
        call()
        best = min(best, clock() - t)
    return best


def _time(fn, *args, repeats: int = 3, clock=time.perf_counter) -> float:
    jax.block_until_ready(fn(*args))  # compile
    return _best(lambda: jax.block_until_ready(fn(*args)), repeats, clock)


def bench_sampling(n: int, dims=(3, 10, 100), kappas=(1.0, 20.0, 500.0), repeats: int = 3,
                   clock: str = "wall") -> list[dict]:
    """samples/s per (d, kappa, key implementation); the scipy column repeats per key row."""
    clk = _CLOCKS[clock]
    rows = []
    for d in dims:
        mu_np = np.zeros(d)
        mu_np[0] = 1.0
        mu = jnp.asarray(mu_np[None], jnp.float32)
        for kappa in kappas:
            k_arr = jnp.array([kappa], jnp.float32)
            ours = jax.jit(lambda key, k=k_arr: vmf.sample(key, mu, k, n))
            table = vmf.make_inverse_cdf_table(d, kappa)
            tab = jax.jit(lambda key, t=table, k=k_arr: vmf.sample(key, mu, k, n, table=t))
            dist = st.vonmises_fisher(mu_np, kappa)
            t_scipy = _best(lambda: dist.rvs(n, random_state=0), 1 if n * d > 10 ** 7 else repeats, clk)
            for impl in ("threefry2x32", "rbg"):
                key = jax.random.key(0, impl=impl)
                t_ours = _time(ours, key, repeats=repeats, clock=clk)
                t_tab = _time(tab, key, repeats=repeats, clock=clk)
                rows.append(dict(n=n, d=d, kappa=kappa, key=impl, ours=n / t_ours, table=n / t_tab,
                                 scipy=n / t_scipy))
    return rows


def bench_eval(batch: int, K: int, chunk: int) -> dict:
    model = GaussianVAE(rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.bernoulli(jax.random.key(1), 0.15, (batch, 784)).astype(jnp.float32)

    @jax.jit
    def chunked(params, x, key):
        m = nnx.merge(graphdef, params)
        return log_likelihood(key, x, m.encode, m.decode_log_prob, m.prior_log_prob, num_samples=K,
                              chunk_size=chunk)

    @jax.jit
    def unchunked(params, x, key):  # the textbook version: all K samples at once
        m = nnx.merge(graphdef, params)
        q = m.encode(x)
        z = q.sample(key, K)
        log_w = m.decode_log_prob(z, x) + m.prior_log_prob(z) - q.log_prob(z)
        return jax.nn.logsumexp(log_w, axis=0) - math.log(K)

    key = jax.random.key(2)
    t_c = _time(chunked, params, x, key, repeats=1)
    t_u = _time(unchunked, params, x, key, repeats=1)
    diff = float(jnp.abs(chunked(params, x, key).mean() - unchunked(params, x, key).mean()))
    return dict(batch=batch, K=K, chunk=chunk, chunked_s=t_c, unchunked_s=t_u,
                chunked_samples_per_s=batch * K / t_c, unchunked_samples_per_s=batch * K / t_u,
                unchunked_decoder_bytes=K * batch * 784 * 4, mean_abs_diff_nats=diff)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="20000,1000000", help="comma-separated vMF sample counts per (d, kappa)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=sorted(_CLOCKS), default="wall")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--skip-eval", action="store_true")
    args = p.parse_args(argv)
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()[0].device_kind}, clock: {args.clock}, "
          f"jax {jax.__version__}, scipy {__import__('scipy').__version__}")
    print(speed_env_line(speed_env()))
    for n in (int(x) for x in args.n.split(",")):
        print(f"\nvMF sampling, n = {n} samples per setting (samples/s; ratio = ours / scipy; ours = exact inverse "
              f"CDF for d = 3, Wood's or the gamma envelope otherwise)")
        print(f"{'d':>5} {'kappa':>7} {'key':>12} {'ours':>10} {'table':>10} {'scipy':>10} {'ours/scipy':>11} "
              f"{'table/scipy':>12}", flush=True)
        for r in bench_sampling(n, repeats=args.repeats, clock=args.clock):
            print(f"{r['d']:>5} {r['kappa']:>7g} {r['key']:>12} {r['ours']:>10.3g} {r['table']:>10.3g} "
                  f"{r['scipy']:>10.3g} {r['ours'] / r['scipy']:>11.1f} {r['table'] / r['scipy']:>12.1f}", flush=True)
    if not args.skip_eval:
        r = bench_eval(args.eval_batch, args.eval_k, args.chunk)
        print(f"\nK={r['K']} evaluation of {r['batch']} images (IWAE-paper MLP), chunk={r['chunk']}")
        print(f"  chunked:   {r['chunked_s']:.2f} s  ({r['chunked_samples_per_s']:.3g} samples/s)")
        print(f"  unchunked: {r['unchunked_s']:.2f} s  ({r['unchunked_samples_per_s']:.3g} samples/s, "
              f"decoder logits alone {r['unchunked_decoder_bytes'] / 2**30:.2f} GiB)")
        print(f"  |mean difference| = {r['mean_abs_diff_nats']:.2e} nats (different sample draws)")


if __name__ == "__main__":
    main()
