"""FLASH vs FLASH-Quad vs Transformer++: train-step time and compiled memory against sequence length at a
fixed number of tokens per batch, and FLASH's cached decoding latency per token at far positions.

    python benchmarks/flash_scaling.py                      # full sweep 512..16384, the defaults below
    python benchmarks/flash_scaling.py --lengths 64,128 --tokens 256 --d-model 64 --layers 2 \\
        --key-size 32 --chunk-size 32 --decode-positions 128,1024 --steps 2   # smoke run

Train step = forward + backward + Adam update of a causal LM, jitted (state donated), timed after
`--warmup` calls as the median of `--steps` calls. The batch holds `--tokens` tokens: B = tokens / T.
At a fixed token count a linear-time model's step time is flat in T (exponent ~0) and full attention's
grows ~T (exponent ~1); "per-sequence exponent" = step exponent + 1 is the cost of one sequence
(linear ~1, quadratic ~2), the number the FLASH paper's "linear time" refers to.
Memory: `jit(...).lower(...).compile().memory_analysis()`: the larger of the reported peak and
arguments + outputs + temporaries - aliased (XLA:CPU's "peak" counts only the arguments). Decoding: a `lax.scan` of `--decode-steps` decode steps
started at each position (the state has a fixed size, so the position only sets the counter: its cost
cannot depend on how the state was filled), time per token = median call time / steps.
Prints a markdown table and writes JSON (`--out`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from gen_jax.flash import (FlashConfig, build, count_params, decode_step, init_cache, lm_loss,  # noqa: E402
                           matched_transformer_config, sample_logits)

MODELS = ("flash", "flash_quad", "transformer_pp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    p.add_argument("--lengths", type=ints, default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens / T, at least 1)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {MODELS}")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8, help="GAU layers; Transformer++ gets ceil(layers / 2)")
    p.add_argument("--key-size", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--heads", type=int, default=None, help="Transformer++ heads (default d_model / 64)")
    p.add_argument("--normalizer", default="relu2_n")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--attention-impl", default=None, choices=[None, "xla", "cudnn"],
                   help="Transformer++ jax.nn.dot_product_attention implementation")
    p.add_argument("--remat", action="store_true", help="rematerialise layers in the backward pass")
    p.add_argument("--steps", type=int, default=5, help="timed train steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-step-seconds", type=float, default=60.0,
                   help="after a model's step takes longer than this, skip its longer lengths")
    p.add_argument("--decode-positions", type=ints, default=[1024, 8192, 65536])
    p.add_argument("--decode-steps", type=int, default=64, help="tokens per timed decode scan")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--decode-repeats", type=int, default=5)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--out", default="benchmarks/results/flash_scaling.json")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown models {bad}; choose from {MODELS}")
    return args


def flash_config(args, kind: str) -> FlashConfig:
    return FlashConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                       key_size=args.key_size, kind=kind, chunk_size=args.chunk_size,
                       normalizer=args.normalizer, compute_dtype=args.dtype, remat=args.remat)


def model_config(args, name: str):
    if name == "transformer_pp":
        return matched_transformer_config(flash_config(args, "flash"), num_heads=args.heads,
                                          attention_impl=args.attention_impl)
    return flash_config(args, name)


def memory_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    # XLA:CPU's peak_memory_in_bytes counts only the arguments, so take the larger of it and the buffer sum
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return int(max(total, getattr(m, "peak_memory_in_bytes", 0) or 0))


def time_calls(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_train(args, name: str, length: int) -> dict:
    cfg = model_config(args, name)
    model = build(cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = count_params(params)
    opt = optax.adam(1e-4)
    batch = max(1, args.tokens // length)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, length + 1), 0, args.vocab)

    def loss_fn(p, tok):
        logits = nnx.merge(graphdef, p)(tok[:, :-1])
        return lm_loss(logits, tok[:, 1:])

    def step(state, tok):
        p, o = state
        loss, grads = jax.value_and_grad(loss_fn)(p, tok)
        updates, o = opt.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), loss

    state = (params, opt.init(params))
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, tokens).compile()
    compile_s = time.perf_counter() - t0
    mem = memory_bytes(compiled)
    holder = [state]

    def call():
        holder[0], loss = compiled(holder[0], tokens)
        return loss

    for _ in range(args.warmup):
        jax.block_until_ready(call())
    step_s = time_calls(call, args.steps)
    return {"model": name, "length": length, "batch": batch, "params": n_params, "step_s": step_s,
            "tokens_per_s": batch * length / step_s, "compile_s": compile_s, "memory_bytes": mem}


def bench_decode(args, position: int) -> dict:
    cfg = flash_config(args, "flash")
    model = build(cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    n = args.decode_steps

    @jax.jit
    def run(p, cache, token_B, rng):
        m = nnx.merge(graphdef, p)

        def body(carry, key):
            cache, tok = carry
            logits, cache = decode_step(m, cache, tok)
            return (cache, sample_logits(key, logits, 1.0, 0.95)), None

        (cache, tok), _ = jax.lax.scan(body, (cache, token_B), jax.random.split(rng, n))
        return tok, cache

    cache = init_cache(cfg, args.decode_batch)
    cache = dict(cache, pos=jnp.asarray(position, jnp.int32))
    token = jnp.zeros((args.decode_batch,), jnp.int32)
    rng = jax.random.PRNGKey(0)
    jax.block_until_ready(run(params, cache, token, rng))
    call_s = time_calls(lambda: run(params, cache, token, rng), args.decode_repeats)
    state_floats = sum(int(np.prod(x.shape)) for k, x in cache.items() if k != "pos")
    return {"position": position, "ms_per_token": 1e3 * call_s / n, "batch": args.decode_batch,
            "state_floats": state_floats}


def fit_exponent(lengths, times) -> float | None:
    if len(lengths) < 2:
        return None
    slope, _ = np.polyfit(np.log(lengths), np.log(times), 1)
    return float(slope)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = jax.devices()[0]
    info = {"device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "jax": jax.__version__,
            "host": platform.node(), "args": {k: v for k, v in vars(args).items()}}
    print(f"# FLASH scaling on {info['device']} (jax {jax.__version__}), {args.tokens} tokens/batch, "
          f"d={args.d_model}, {args.layers} GAU layers, s={args.key_size}, C={args.chunk_size}, {args.dtype}")
    train_rows = []
    if not args.skip_train:
        for name in args.models:
            for length in args.lengths:
                try:
                    row = bench_train(args, name, length)
                except Exception as e:  # OOM or compile failure at a long length: record and move on
                    row = {"model": name, "length": length, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                    print(f"  {name:15s} T={length:6d}  FAILED {row['error']}", flush=True)
                    train_rows.append(row)
                    break
                train_rows.append(row)
                mem = row["memory_bytes"]
                print(f"  {name:15s} T={length:6d} B={row['batch']:4d}  {1e3 * row['step_s']:9.1f} ms/step  "
                      f"{row['tokens_per_s']:10.0f} tok/s  mem {mem / 2**20 if mem else float('nan'):8.1f} MiB",
                      flush=True)
                if row["step_s"] > args.max_step_seconds:
                    print(f"  {name}: step over {args.max_step_seconds}s, skipping longer lengths", flush=True)
                    break

    summary = {}
    for name in args.models:
        ok = [r for r in train_rows if r["model"] == name and "step_s" in r]
        if not ok:
            continue
        L = [r["length"] for r in ok]
        step_exp = fit_exponent(L, [r["step_s"] for r in ok])
        mems = [r["memory_bytes"] for r in ok if r["memory_bytes"]]
        mem_exp = fit_exponent([r["length"] for r in ok if r["memory_bytes"]], mems) if mems else None
        summary[name] = {"params": ok[0]["params"], "step_exponent": step_exp,
                         "per_sequence_exponent": None if step_exp is None else step_exp + 1,
                         "memory_exponent": mem_exp}

    decode_rows = []
    if not args.skip_decode:
        for pos in args.decode_positions:
            row = bench_decode(args, pos)
            decode_rows.append(row)
            print(f"  decode pos={pos:7d}  {row['ms_per_token']:.3f} ms/token", flush=True)

    # Markdown report
    lines = ["", "| model | params | " + " | ".join(f"T={n}" for n in args.lengths)
             + " | step exp. | per-seq exp. | mem exp. |",
             "|---|---|" + "---|" * len(args.lengths) + "---|---|---|"]
    for name in args.models:
        if name not in summary:
            continue
        cells = []
        for n in args.lengths:
            r = next((r for r in train_rows if r["model"] == name and r["length"] == n), None)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("fail")
            else:
                mem = r["memory_bytes"]
                cells.append(f"{1e3 * r['step_s']:.1f} ms / {mem / 2**20:.0f} MiB" if mem
                             else f"{1e3 * r['step_s']:.1f} ms")
        s = summary[name]
        fmt = lambda x: "-" if x is None else f"{x:.2f}"
        lines.append(f"| {name} | {s['params'] / 1e6:.2f}M | " + " | ".join(cells)
                     + f" | {fmt(s['step_exponent'])} | {fmt(s['per_sequence_exponent'])} | {fmt(s['memory_exponent'])} |")
    ratios = []
    for n in args.lengths:
        f = next((r for r in train_rows if r["model"] == "flash" and r["length"] == n and "step_s" in r), None)
        t = next((r for r in train_rows if r["model"] == "transformer_pp" and r["length"] == n and "step_s" in r),
                 None)
        if f and t:
            ratios.append({"length": n, "speedup_vs_transformer_pp": t["step_s"] / f["step_s"]})
    if ratios:
        lines += ["", "FLASH speedup over Transformer++ (step time ratio): "
                  + ", ".join(f"T={r['length']}: {r['speedup_vs_transformer_pp']:.2f}x" for r in ratios)]
    if decode_rows:
        lines += ["", "| decode position | ms / token | state floats |", "|---|---|---|"]
        lines += [f"| {r['position']} | {r['ms_per_token']:.3f} | {r['state_floats']} |" for r in decode_rows]
    print("\n".join(lines))

    result = {**info, "train": train_rows, "summary": summary, "speedups": ratios, "decode": decode_rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
