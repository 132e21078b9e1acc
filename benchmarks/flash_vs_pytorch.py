"""FLASH train-step speed, ours (JAX, `gen_jax.flash`) vs lucidrains' FLASH-pytorch (`FLASHTransformer`) at a
matched config, one CPU core each, every ratio measured in one run.

    pip install --no-deps FLASH-pytorch rotary-embedding-torch       # the peer (needs torch and einops)
    taskset -c 0 python benchmarks/flash_vs_pytorch.py               # T = 512, 1024, 2048 at 8192 tokens/batch
    taskset -c 0 python benchmarks/flash_vs_pytorch.py --quick       # tiny sizes, seconds (smoke run)
    taskset -c 0 python benchmarks/flash_vs_pytorch.py --lengths 512,4096 --json out.json --no-compile

Step = forward + backward + Adam update of the causal-LM cross-entropy (mean over the B x T predicted
tokens), float32, on the same token ids (B = tokens / T rows of T + 1 ids). Ours: the library's training
core (`make_loss_fn` + `make_update_fn`, plain Adam), one jitted call with the state donated, compiled with
XLA:CPU's YNNPACK fusions off (`cpu_compiler_options(ynn_fusions=False)`, the FLASH launcher's setting) and,
with `--ynn-fusions both` (the default), also with XLA's defaults. Peer: eager torch (Adam fused where
available), and with `torch.compile` of model + loss unless `--no-compile`; the faster peer variant is the one
the headline ratio (ours / peer tokens/s, > 1: ours faster) uses. All variants of one length are timed
interleaved (each round calls every step once, so this shared machine's drifts hit all alike): median of
`--steps` rounds after `--warmup`; also the ratio of process CPU seconds per step (steadier on a shared core).
torch gets `--threads` (default 1) threads; XLA uses every core in the affinity mask, hence `taskset -c 0`.

Matched config (FLASHTransformer(dim=d, depth=L, group_size=C, query_key_dim=s, expansion_factor=2,
causal=True, norm_type="scalenorm", shift_tokens=False, laplace_attn_fn=False) vs FlashConfig with the same
d, L, s, C, e = 2d, ScaleNorm, untied output layer). Design differences that remain:
- attention function: both relu^2 mixed chunk attention. Peer: relu(q.k / C)^2 in a chunk and k^T v / C
  across chunks; ours "relu2_const" with norm_const = C: relu(q.k / sqrt(s))^2 / C and / C (same cost;
  our default "relu2_n" divides by the prefix length instead, `--normalizer`).
- peer extras: a T5 relative-position bias in each chunk (32 params per layer), a scaled sinusoidal absolute
  position embedding (1 param), rotary on only 32 of the s dims (ours: RoPE on all s), a LayerNorm + biased
  Linear head (ours: ScaleNorm + bias-free Linear). So the peer has 32 L + 2d + V more parameters.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `gen_jax` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.ddpm_speed import machine_info, speed_env_line, timed_interleaved  # noqa: E402
from benchmarks.flash_scaling import flash_config  # noqa: E402
from gen_jax.flash import FlashConfig, build, count_params, make_loss_fn  # noqa: E402
from gen_jax.train.state import TrainState  # noqa: E402
from gen_jax.train.step import make_optimizer, make_update_fn  # noqa: E402
from gen_jax.train.xla_options import cpu_compiler_options  # noqa: E402

LR = 1e-4
QUICK = dict(lengths=[32, 64], tokens=128, d_model=32, layers=2, key_size=16, chunk_size=16, warmup=1, steps=2)


def ours_config(args) -> FlashConfig:
    cfg = flash_config(args, "flash")  # vocab, d, L, s, C, normalizer, dtype from the CLI
    return dataclasses.replace(cfg, tie_embeddings=False,
                               norm_const=float(args.chunk_size) if args.normalizer == "relu2_const" else None)


def peer_kwargs(args) -> dict:
    return dict(num_tokens=args.vocab, dim=args.d_model, depth=args.layers, group_size=args.chunk_size,
                query_key_dim=args.key_size, expansion_factor=2, causal=True, norm_type="scalenorm",
                shift_tokens=False, laplace_attn_fn=False)


def build_peer(args):
    import torch
    from flash_pytorch import FLASHTransformer

    torch.manual_seed(0)
    return FLASHTransformer(**peer_kwargs(args))


def peer_params(model) -> int:
    # rotary-embedding-torch keeps its fixed frequencies as a requires_grad=False Parameter: not counted
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ours_prepare(args, ids: np.ndarray, compiler_options: dict | None):
    """(step, finish): one train step of ours compiled with `compiler_options`, and finish(timing) -> its
    result."""
    cfg = ours_config(args)
    graphdef, params = nnx.split(build(cfg, seed=0), nnx.Param)
    optimizer = make_optimizer(LR)  # plain Adam, no clipping, like the peer's
    update_fn = make_update_fn(make_loss_fn(graphdef, task="clm"), optimizer, ema_decay=None)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(0), use_ema=False)
    batch = {"tokens": jax.device_put(ids.astype(np.int32))}
    t0 = time.perf_counter()
    compiled = jax.jit(update_fn, donate_argnums=0, compiler_options=compiler_options).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    box, losses = [state], []

    def step():
        box[0], metrics = compiled(box[0], batch)
        jax.block_until_ready((box[0], metrics))
        losses.append(float(metrics["nats_per_token"]))

    def finish(t: dict) -> dict:
        return {"params": count_params(params), **t, "tokens_per_s": ids[:, 1:].size / t["step_s"],
                "compile_s": compile_s, "compiler_options": compiler_options, "loss_first": losses[0],
                "loss_last": losses[-1]}

    return step, finish


def peer_prepare(args, ids: np.ndarray, *, compile_model: bool):
    import torch
    import torch.nn.functional as F

    model = build_peer(args).train()
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the fastest CPU Adam this torch has
        opt, adam = torch.optim.Adam(params, lr=LR, fused=True), "fused"
    except (RuntimeError, TypeError):
        opt, adam = torch.optim.Adam(params, lr=LR, foreach=True), "foreach"
    x = torch.from_numpy(ids[:, :-1].astype(np.int64))
    y = torch.from_numpy(ids[:, 1:].astype(np.int64))

    def loss_fn(x, y):
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    with torch.no_grad():  # fill rotary-embedding-torch's frequency cache: else dynamo recompiles on step 2
        model(x[:1])
    if compile_model:
        torch._dynamo.reset()  # a fresh cache per length: dynamo's recompile limit would fall back to eager
    run = torch.compile(loss_fn, dynamic=False) if compile_model else loss_fn
    losses = []

    def step():
        loss = run(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    t0 = time.perf_counter()
    step()  # the first call (compiles under torch.compile); not timed
    first_s = time.perf_counter() - t0

    def finish(t: dict) -> dict:
        return {"params": peer_params(model), **t, "tokens_per_s": y.numel() / t["step_s"],
                "first_call_s": first_s, "adam": adam, "loss_first": losses[0], "loss_last": losses[-1]}

    return step, finish


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "FLASH-pytorch", "rotary-embedding-torch", "einops"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _f(x, fmt=".1f") -> str:
    return "-" if x is None else format(x, fmt)


def format_report(res: dict) -> str:
    m, s, p = res["machine"], res["settings"], res["params"]
    lines = [f"Machine: {m['cpu']}, {m['usable_cores']} usable cores (of {m['logical_cores']}), load avg "
             f"{m['load_avg_1_5_15']}; torch threads {m['torch_threads']}; jax {m['jax_device']}",
             speed_env_line(m["speed_env"]),
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
             f"Settings: d={s['d_model']}, {s['layers']} layers, s={s['key_size']}, C={s['chunk_size']}, e=2d, "
             f"vocab {s['vocab']}, {s['tokens']} tokens/batch, float32, Adam lr {LR}, median of {s['steps']} "
             f"interleaved rounds after {s['warmup']} warmup; ours normalizer {s['normalizer']}, YNNPACK fusions "
             f"{ {'off': 'off', 'on': 'on (XLA default)', 'both': 'off (ours) and on (ours, YNN on)'}[s['ynn_fusions']]}; "
             f"peer relu^2 (laplace_attn_fn=False), shift_tokens=False",
             f"Params: ours {p['ours']:,}, FLASH-pytorch {p['peer']:,} (peer - ours = {p['peer'] - p['ours']:+,}, "
             f"{100 * (p['peer'] - p['ours']) / p['ours']:+.3f}%)"]
    if m["usable_cores"] > 1:
        lines.append(f"NOTE: {m['usable_cores']} usable cores: XLA uses all of them, torch {m['torch_threads']}; "
                     "run under `taskset -c 0` for one core each.")
    if s["torch_compile"] and res.get("compile_error"):
        lines.append(f"torch.compile failed: {res['compile_error']}")
    comp = any("peer_compiled" in r for r in res["rows"])
    both = any("ours_ynn_on" in r for r in res["rows"])
    head = "| T | B | ours ms/step | ours tok/s |" + (" ours, YNN on ms/step |" if both else "")
    head += " peer eager ms/step | peer eager tok/s |"
    sep = "|---|---|---|---|---|---|" + ("---|" if both else "")
    if comp:
        head += " peer compiled ms/step | peer compiled tok/s |"
        sep += "---|---|"
    head += " ours/peer (best) | ours/peer eager | ours/peer by CPU time |" + (" ours, YNN on/peer |" if both else "")
    sep += "---|---|---|" + ("---|" if both else "")
    lines += ["", "### Train step (forward + backward + Adam), tokens/s = B x T / step time", "", head, sep]
    for r in res["rows"]:
        o, e, c = r["ours"], r["peer_eager"], r.get("peer_compiled")
        cells = [str(r["length"]), str(r["batch"]), _f(1e3 * o["step_s"]), _f(o["tokens_per_s"], ".0f")]
        if both:
            cells.append(_f(1e3 * r["ours_ynn_on"]["step_s"]) if "ours_ynn_on" in r else "-")
        cells += [_f(1e3 * e["step_s"]), _f(e["tokens_per_s"], ".0f")]
        if comp:
            cells += [_f(1e3 * c["step_s"]) if c else "-", _f(c["tokens_per_s"], ".0f") if c else "-"]
        cells += [f"{r['ratio']:.2f}x ({r['peer_best']})", f"{r['ratio_eager']:.2f}x",
                  f"{r['ratio_cpu']:.2f}x ({r['peer_best_cpu']})"]
        if both:
            cells.append(f"{r['ratio_ynn_on']:.2f}x" if "ratio_ynn_on" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "CPU time = the process's CPU seconds per step (less sensitive than wall time to other work "
              "on a shared core)."]
    lines += ["", "First-call seconds (ours: XLA compile; peer: first step" + (", incl. torch.compile" if comp else "")
              + "): " + ", ".join(f"T={r['length']}: ours {r['ours']['compile_s']:.1f}"
                                  + (f", compiled peer {r['peer_compiled']['first_call_s']:.1f}"
                                     if r.get("peer_compiled") else "") for r in res["rows"])]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    ap.add_argument("--lengths", type=ints, default=[512, 1024, 2048], help="comma list of sequence lengths T")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per batch (B = tokens / T, at least 1)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--key-size", type=int, default=128, help="s (the peer's query_key_dim)")
    ap.add_argument("--chunk-size", type=int, default=256, help="C (the peer's group_size)")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--normalizer", default="relu2_const", choices=["relu2_const", "relu2_n", "softmax_plus"],
                    help="ours; relu2_const (/ C) is the peer's")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--ynn-fusions", default="both", choices=["off", "on", "both"],
                    help="compile ours with XLA:CPU's YNNPACK fusions off (the FLASH launcher's setting; the "
                         "headline), on (XLA's default), or both")
    ap.add_argument("--quick", action="store_true",
                    help="tiny defaults: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args(argv)
    if args.quick:  # tiny defaults; flags given explicitly still win
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    args.dtype, args.remat = "float32", False  # read by flash_scaling.flash_config
    if args.steps < 1 or not args.lengths:
        ap.error("--steps must be >= 1 and --lengths non-empty")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    n_ours = count_params(nnx.eval_shape(lambda: build(ours_config(args))))
    n_peer = peer_params(build_peer(args))
    res = {"machine": machine_info(), "versions": versions(), "params": {"ours": n_ours, "peer": n_peer},
           "peer_kwargs": peer_kwargs(args), "ours_config": dataclasses.asdict(ours_config(args)),
           "settings": {k: v for k, v in vars(args).items() if k not in ("json", "dtype", "remat")}
           | {"torch_compile": not args.no_compile}, "rows": []}
    say = lambda *a: print(*a, file=sys.stderr, flush=True)
    compile_ok = not args.no_compile
    for T in args.lengths:
        B = max(1, args.tokens // T)
        ids = np.random.default_rng(T).integers(0, args.vocab, (B, T + 1))
        say(f"[T={T} B={B}] compiling ours, preparing the peer ...")
        prepared = {}
        if args.ynn_fusions in ("off", "both"):
            prepared["ours"] = ours_prepare(args, ids, cpu_compiler_options(ynn_fusions=False))
        if args.ynn_fusions in ("on", "both"):
            prepared["ours_ynn_on" if "ours" in prepared else "ours"] = ours_prepare(args, ids, None)
        prepared["peer_eager"] = peer_prepare(args, ids, compile_model=False)
        if compile_ok:
            try:
                prepared["peer_compiled"] = peer_prepare(args, ids, compile_model=True)
            except Exception as e:  # no working compiler toolchain etc.: report and go on eager
                res["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                compile_ok = False
        say(f"[T={T}] timing {', '.join(prepared)} interleaved ...")
        timing = timed_interleaved({k: step for k, (step, _) in prepared.items()}, args.warmup, args.steps)
        row = {"length": T, "batch": B, **{k: finish(timing[k]) for k, (_, finish) in prepared.items()}}
        peers = {k: row[k] for k in ("peer_eager", "peer_compiled") if k in row}
        best = max(peers, key=lambda k: peers[k]["tokens_per_s"])
        row["peer_best"] = best.removeprefix("peer_")
        row["ratio"] = row["ours"]["tokens_per_s"] / peers[best]["tokens_per_s"]
        row["ratio_eager"] = row["ours"]["tokens_per_s"] / row["peer_eager"]["tokens_per_s"]
        best_cpu = min(peers, key=lambda k: peers[k]["cpu_s"])
        row["peer_best_cpu"] = best_cpu.removeprefix("peer_")
        row["ratio_cpu"] = peers[best_cpu]["cpu_s"] / row["ours"]["cpu_s"]
        if "ours_ynn_on" in row:
            row["ratio_ynn_on"] = row["ours_ynn_on"]["tokens_per_s"] / peers[best]["tokens_per_s"]
        res["rows"].append(row)
        say(f"  ours {1e3 * row['ours']['step_s']:.1f} ms, peer {row['peer_best']} "
            f"{1e3 * peers[best]['step_s']:.1f} ms -> {row['ratio']:.2f}x")
    res["machine"]["load_avg_1_5_15_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
