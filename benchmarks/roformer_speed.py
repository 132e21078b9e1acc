"""RoFormer speed: (1) encoder forward+backward throughput, ours (JAX) vs transformers' PyTorch RoFormer, at
the small config (L6 H384 A6) and sequence 64 and 512; (2) generating n candidates of up to 64 tokens: our
compiled KV-cached decoder vs re-running the full sequence per token (the original roformer-sim approach).

    python benchmarks/roformer_speed.py                      # small config, the issue's sizes
    python benchmarks/roformer_speed.py --tiny               # a seconds-long smoke run on CPU
    python benchmarks/roformer_speed.py --dtype bfloat16     # bf16 compute (torch: autocast) on GPU

Goals (issue 7): encoder ratio >= 1.0x, generation ratio >= 10x. All ratios come from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `gen_jax` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.ddpm_speed import speed_env, speed_env_line, timed_interleaved  # noqa: E402
from gen_jax.roformer import RoFormerConfig, RoFormer, unilm_mask  # noqa: E402
from gen_jax.roformer_sim.generate import nucleus_sample, sample_candidates  # noqa: E402


def _time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def encoder_loss(cfg: RoFormerConfig, batch: int, seq: int):
    """(loss, params): mean(h^2) of the encoder's hidden states on random ids, as a function of the params."""
    graphdef, params = nnx.split(RoFormer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    ids = jnp.asarray(np.random.RandomState(0).randint(5, cfg.vocab_size, (batch, seq)), jnp.int32)
    seg = jnp.zeros_like(ids)

    def loss(p):
        out = nnx.merge(graphdef, p)(ids, seg)
        return jnp.mean(out.hidden_BxTxD.astype(jnp.float32) ** 2)

    return loss, params


def encoder_step_jax(cfg: RoFormerConfig, batch: int, seq: int):
    """A no-argument callable: one jitted fwd+bwd of ours, waited for."""
    loss, params = encoder_loss(cfg, batch, seq)
    step = jax.jit(jax.grad(loss))
    return lambda: jax.block_until_ready(step(params))


def encoder_step_torch(cfg: RoFormerConfig, batch: int, seq: int):
    """A no-argument callable: one fwd+bwd of transformers' RoFormerModel at the same config (None without torch)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hc = transformers.RoFormerConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                     intermediate_size=cfg.intermediate_size, max_position_embeddings=max(seq, 64),
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.RoFormerModel(hc).to(dev).train()
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), device=dev)
    use_amp = cfg.compute_dtype == "bfloat16" and dev == "cuda"

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=use_amp):
            h = model(ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        (h.float() ** 2).mean().backward()
        if dev == "cuda":
            torch.cuda.synchronize()

    return step


def bench_generation(cfg: RoFormerConfig, n: int, max_new: int, prompt_len: int, warmup: int, iters: int
                     ) -> tuple[float, float]:
    """Seconds per n candidates of max_new tokens ([SEP] never ends a row: both sides do all the steps)."""
    model = RoFormer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    prompt = jnp.asarray(np.r_[2, np.random.RandomState(1).randint(5, cfg.vocab_size, prompt_len - 2), 3], jnp.int32)

    def cached():
        toks, _ = sample_candidates(graphdef, state, prompt, jax.random.key(0), n=n, max_new=max_new, top_p=0.95,
                                    sep_id=-1)
        jax.block_until_ready(toks)

    T = prompt_len + max_new
    seg = jnp.broadcast_to(jnp.arange(T) >= prompt_len, (n, T)).astype(jnp.int32)

    @jax.jit
    def full_step(state, seq_NxT, t, rng):
        m = nnx.merge(graphdef, state)
        valid = jnp.arange(T)[None] < prompt_len + t
        h = m(seq_NxT, seg, attention_mask_BxTxT=unilm_mask(seg, jnp.broadcast_to(valid, (n, T)))).hidden_BxTxD
        logits = m.mlm_logits(jax.lax.dynamic_index_in_dim(h, prompt_len + t - 1, axis=1, keepdims=False))
        tok = nucleus_sample(rng, logits, 0.95).astype(jnp.int32)
        return jax.lax.dynamic_update_index_in_dim(seq_NxT, tok, prompt_len + t, axis=1)

    def recompute():  # one full forward per new token, driven from the host like the original
        seq = jnp.zeros((n, T), jnp.int32).at[:, :prompt_len].set(prompt)
        rng = jax.random.key(0)
        for t in range(max_new):
            rng, k = jax.random.split(rng)
            seq = full_step(state, seq, t, k)
        jax.block_until_ready(seq)

    # the recompute side's warm-up is one step (its compile): a whole warm-up run would take minutes
    jax.block_until_ready(full_step(state, jnp.zeros((n, T), jnp.int32).at[:, :prompt_len].set(prompt), 0,
                                    jax.random.key(1)))
    return _time(cached, warmup, iters), _time(recompute, 0, iters)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes for a smoke run")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seqs", default="64,512")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--iters", type=int, default=5, help="timed interleaved rounds of the encoder comparison")
    ap.add_argument("--gen-iters", type=int, default=1,
                    help="timed repeats of the generation comparison (the full re-run side takes minutes each)")
    ap.add_argument("--parts", default="encoder,generation", help="comma list of: encoder, generation")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    cfg = RoFormerConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, vocab_size=12000,
                         dropout_rate=0.0, attention_dropout_rate=0.0, compute_dtype=a.dtype)
    seqs = [int(s) for s in a.seqs.split(",")]
    if a.tiny:
        cfg = RoFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=200,
                             dropout_rate=0.0, attention_dropout_rate=0.0, compute_dtype=a.dtype)
        a.batch, seqs, a.n, a.max_new, a.prompt_len, a.iters, a.gen_iters = 4, [16, 32], 8, 8, 6, 2, 1
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; config L{cfg.num_layers} H{cfg.hidden_size} "
          f"A{cfg.num_heads} V{cfg.vocab_size} dtype {a.dtype}")
    env = speed_env()
    print(speed_env_line(env))
    results = {"environment": env, "encoder": [], "generation": None}
    print(f"encoder: medians of {a.iters} interleaved rounds (one step of each side per round) after 2 warm-up rounds")
    print("| seq | batch | ours fwd+bwd (ms) | torch fwd+bwd (ms) | ours/torch throughput |")
    print("|---|---|---|---|---|")
    parts = {p.strip() for p in a.parts.split(",") if p.strip()}
    if not parts or parts - {"encoder", "generation"}:
        ap.error(f"--parts must name encoder and/or generation, got {a.parts!r}")
    for seq in (seqs if "encoder" in parts else []):
        steps = {"ours": encoder_step_jax(cfg, a.batch, seq), "torch": encoder_step_torch(cfg, a.batch, seq)}
        timing = timed_interleaved({k: f for k, f in steps.items() if f is not None}, 2, a.iters)
        ours = timing["ours"]["step_s"]
        ref = timing["torch"]["step_s"] if "torch" in timing else None
        ratio = ref / ours if ref else float("nan")
        print(f"| {seq} | {a.batch} | {1e3 * ours:.1f} | {'-' if ref is None else f'{1e3 * ref:.1f}'} | {ratio:.2f}x |")
        results["encoder"].append({"seq": seq, "batch": a.batch, "ours_s": ours, "torch_s": ref, "ratio": ratio,
                                   "ours_times_s": timing["ours"]["step_times_s"],
                                   "torch_times_s": timing["torch"]["step_times_s"] if ref else None})
    if "generation" not in parts:
        _dump(results, a.json)
        return results
    cached, full = bench_generation(cfg, a.n, a.max_new, a.prompt_len, 1, a.gen_iters)
    print(f"\ngeneration of {a.n} candidates x {a.max_new} tokens (prompt {a.prompt_len}): cached compiled "
          f"{1e3 * cached:.1f} ms, full recomputation per token {1e3 * full:.1f} ms, speed-up {full / cached:.1f}x")
    results["generation"] = {"n": a.n, "max_new": a.max_new, "cached_s": cached, "recompute_s": full,
                             "ratio": full / cached}
    _dump(results, a.json)
    return results


def _dump(results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
