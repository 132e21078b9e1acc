"""vMF sampling throughput vs SciPy, and K = 5000 importance-sampled evaluation chunked vs unchunked.

    python -m benchmarks.vmf_sampling                      # full run
    python -m benchmarks.vmf_sampling --n 20000 --eval-batch 100 --eval-k 5000 --chunk 100

Part 1: samples/s of `gen_jax.vae.vmf.sample` (Wood's rejection sampler in one compiled while_loop, and Su's
inverse-CDF table sampler) against `scipy.stats.vonmises_fisher(mu, kappa).rvs(n)` for d in (3, 10, 100),
kappa in (1, 20, 500). Timings exclude compilation (one warm-up call) and block on the result.
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

from gen_jax.vae import GaussianVAE, log_likelihood, vmf


def _time(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def bench_sampling(n: int, dims=(3, 10, 100), kappas=(1.0, 20.0, 500.0)) -> list[dict]:
    rows = []
    for d in dims:
        mu_np = np.zeros(d)
        mu_np[0] = 1.0
        mu = jnp.asarray(mu_np[None], jnp.float32)
        for kappa in kappas:
            wood = jax.jit(lambda key, k=kappa: vmf.sample(key, mu, jnp.array([k], jnp.float32), n))
            table = vmf.make_inverse_cdf_table(d, kappa)
            tab = jax.jit(lambda key, t=table: vmf.sample(key, mu, jnp.array([kappa], jnp.float32), n, table=t))
            t_wood = _time(wood, jax.random.key(0))
            t_tab = _time(tab, jax.random.key(0))
            dist = st.vonmises_fisher(mu_np, kappa)
            t = time.perf_counter()
            dist.rvs(n, random_state=0)
            t_scipy = time.perf_counter() - t
            rows.append(dict(d=d, kappa=kappa, wood=n / t_wood, table=n / t_tab, scipy=n / t_scipy))
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
    p.add_argument("--n", type=int, default=20000, help="vMF samples per (d, kappa)")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--skip-eval", action="store_true")
    args = p.parse_args(argv)
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()[0].device_kind}")
    print(f"\nvMF sampling, {args.n} samples per setting (samples/s; ratio = ours / scipy)")
    print(f"{'d':>5} {'kappa':>7} {'wood':>12} {'table':>12} {'scipy':>12} {'wood/scipy':>11} {'table/scipy':>12}")
    for r in bench_sampling(args.n):
        print(f"{r['d']:>5} {r['kappa']:>7g} {r['wood']:>12.3g} {r['table']:>12.3g} {r['scipy']:>12.3g} "
              f"{r['wood'] / r['scipy']:>11.1f} {r['table'] / r['scipy']:>12.1f}")
    if not args.skip_eval:
        r = bench_eval(args.eval_batch, args.eval_k, args.chunk)
        print(f"\nK={r['K']} evaluation of {r['batch']} images (IWAE-paper MLP), chunk={r['chunk']}")
        print(f"  chunked:   {r['chunked_s']:.2f} s  ({r['chunked_samples_per_s']:.3g} samples/s)")
        print(f"  unchunked: {r['unchunked_s']:.2f} s  ({r['unchunked_samples_per_s']:.3g} samples/s, "
              f"decoder logits alone {r['unchunked_decoder_bytes'] / 2**30:.2f} GiB)")
        print(f"  |mean difference| = {r['mean_abs_diff_nats']:.2e} nats (different sample draws)")


if __name__ == "__main__":
    main()
