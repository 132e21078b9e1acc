"""k-occurrence (ours: jitted, blocked, exact) vs scikit-learn brute force; GN / WGAN-GP D-step overheads.

    python benchmarks/hubness_knn.py                 # the issue's sizes: N in {1e4, 1e5}, D in {128, 512}
    python benchmarks/hubness_knn.py --quick         # tiny sizes, a smoke run on CPU
    python benchmarks/hubness_knn.py --out results.json

Part 1 times `gen_jax.hubness.k_occurrence` (k = 5, self excluded) against
`sklearn.neighbors.NearestNeighbors(n_neighbors=k+1, algorithm="brute", n_jobs=-1).kneighbors(X)` followed by
the same bincount, checks that both give the same counts, and prints times, the speed ratio and our memory
bound (block_size x key_block_size f32 distances per device, plus the points). sklearn is skipped where it
would need more than --sklearn-max-n points (its brute force also works in chunks, but is slow at 1e5).

Part 2 times one discriminator update (grad of the D loss + SGD) of the SNGAN CNN discriminator for a plain
hinge loss, GN-hinge (double backprop) and WGAN + gradient penalty, and prints the overhead ratios.
Times are medians over --repeats runs after one warm-up (compile) run; each run ends with
block_until_ready.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_knn(sizes, dims, k, block_size, key_block_size, repeats, sklearn_max_n, mesh):
    from sklearn.neighbors import NearestNeighbors

    from gen_jax.hubness import k_occurrence

    rows = []
    for n in sizes:
        for d in dims:
            x = np.random.RandomState(0).randn(n, d).astype(np.float32)
            x_dev = jnp.asarray(x)
            ours = _median_time(lambda: k_occurrence(x_dev, k, block_size=block_size,
                                                     key_block_size=key_block_size, mesh=mesh), repeats)
            counts = np.asarray(k_occurrence(x_dev, k, block_size=block_size, key_block_size=key_block_size,
                                             mesh=mesh))
            kb = n if key_block_size is None else min(key_block_size, n)
            mem_mb = (min(block_size, n) * kb * 4 + n * d * 4) / 2 ** 20
            row = {"N": n, "D": d, "k": k, "ours_s": ours, "block_mem_MiB": round(mem_mb, 1),
                   "sklearn_s": None, "speedup": None, "counts_equal": None}
            if n <= sklearn_max_n:
                def sk():
                    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", n_jobs=-1).fit(x)
                    _, idx = nn.kneighbors(x)
                    return np.bincount(idx[:, 1:].ravel(), minlength=n)
                sk()
                times = []
                for _ in range(max(1, repeats // 2)):
                    t0 = time.perf_counter()
                    ref = sk()
                    times.append(time.perf_counter() - t0)
                row["sklearn_s"] = float(np.median(times))
                row["speedup"] = row["sklearn_s"] / ours
                # float32 rounding may flip an exact near-tie; report the agreement rather than assert it
                row["counts_equal"] = float(np.mean(ref == counts))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_gn_step(resolution, channels, width, batch, repeats):
    from flax import nnx

    from gen_jax.gan import (DCGANDiscriminator, as_function, d_hinge_loss, d_wgan_loss, gradient_normalize,
                             gradient_penalty)

    graphdef, params = nnx.split(DCGANDiscriminator(resolution=resolution, channels=channels, width=width,
                                                    rngs=nnx.Rngs(0)), nnx.Param)
    f = as_function(graphdef)
    f_gn = gradient_normalize(f)
    real = jax.random.uniform(jax.random.key(1), (batch, resolution, resolution, channels), minval=-1)
    fake = jax.random.uniform(jax.random.key(2), (batch, resolution, resolution, channels), minval=-1)

    losses = {
        "plain_hinge": lambda p, r: d_hinge_loss(f(p, real), f(p, fake)),
        # GN is computed on the concatenated batch, as in the paper's code
        "gn_hinge": lambda p, r: d_hinge_loss(*jnp.split(f_gn(p, jnp.concatenate([real, fake])), 2)),
        "wgan_gp": lambda p, r: d_wgan_loss(f(p, real), f(p, fake)) + 10.0 * gradient_penalty(f, p, real, fake, r),
    }
    times = {}
    for name, loss in losses.items():
        @jax.jit
        def step(p, r, loss=loss):
            value, grads = jax.value_and_grad(loss)(p, r)
            return jax.tree.map(lambda a, g: a - 1e-4 * g, p, grads), value
        times[name] = _median_time(lambda: step(params, jax.random.key(3)), repeats)
    row = {"D": f"DCGAN-D width {width} at {resolution}x{resolution}x{channels}", "batch": batch,
           **{f"{k}_ms": 1e3 * v for k, v in times.items()},
           "gn_over_plain": times["gn_hinge"] / times["plain_hinge"],
           "gn_over_wgan_gp": times["gn_hinge"] / times["wgan_gp"],
           "wgan_gp_over_plain": times["wgan_gp"] / times["plain_hinge"]}
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--key-block-size", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sklearn-max-n", type=int, default=100_000)
    ap.add_argument("--shard", action="store_true", help="split queries over all devices")
    ap.add_argument("--gan-width", type=int, default=64)
    ap.add_argument("--gan-batch", type=int, default=64)
    ap.add_argument("--out", help="write all rows as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.dims, args.repeats = [2000], [32], 2
        args.gan_width, args.gan_batch = 4, 4
    mesh = None
    if args.shard:
        from gen_jax.train.mesh import make_mesh
        mesh = make_mesh()
    print(f"devices: {jax.devices()}", flush=True)
    knn = bench_knn(args.sizes, args.dims, args.k, args.block_size, args.key_block_size, args.repeats,
                    args.sklearn_max_n, mesh)
    gan = bench_gn_step(32, 3, args.gan_width, args.gan_batch, args.repeats)
    print("\n| N | D | ours (s) | sklearn brute (s) | speed-up | counts equal | block memory (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in knn:
        sk = "-" if r["sklearn_s"] is None else f"{r['sklearn_s']:.3f}"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        eq = "-" if r["counts_equal"] is None else f"{r['counts_equal']:.4f}"
        print(f"| {r['N']} | {r['D']} | {r['ours_s']:.3f} | {sk} | {sp} | {eq} | {r['block_mem_MiB']} |")
    print(f"\nD step ({gan['D']}, batch {gan['batch']}): plain {gan['plain_hinge_ms']:.1f} ms, "
          f"GN {gan['gn_hinge_ms']:.1f} ms, WGAN-GP {gan['wgan_gp_ms']:.1f} ms; GN/plain "
          f"{gan['gn_over_plain']:.2f}x, GN/WGAN-GP {gan['gn_over_wgan_gp']:.2f}x, "
          f"WGAN-GP/plain {gan['wgan_gp_over_plain']:.2f}x")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"knn": knn, "gn_step": gan, "devices": str(jax.devices())}, fh, indent=1)


if __name__ == "__main__":
    main()
