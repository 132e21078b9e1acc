"""Train steps compiled with XLA:CPU's defaults vs YNNPACK fusions off (`TrainConfig.cpu_ynn_fusions`), per model.

    GLIBC_TUNABLES=... taskset -c 0 python -m benchmarks.xla_cpu_options            # all models, 12 rounds
    taskset -c 0 python -m benchmarks.xla_cpu_options --models flash,transformer_pp --rounds 4 --json out.json

Why the presets set what they set (`gen_jax.train.xla_options`). Models: the FLASH launcher's three
(`lm_shakespeare`: d = 128, 4 layers, T = 512, B = 8; its optimizer), the DDPM `mnist` preset's U-Net step
(B = 32, EMA, float32, as `benchmarks/ddpm_speed.py`) and the RoFormer L6 H384 encoder fwd+bwd at seq 64,
B = 32 (as `benchmarks/roformer_speed.py`). Both compilations of a model run in one process, interleaved (one
step of each per round, after two warm-up rounds); medians and minima of wall time per step. One core:
run under `taskset -c 0` (XLA uses every core in the affinity mask).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `gen_jax` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.ddpm_speed import machine_info, speed_env_line  # noqa: E402
from gen_jax.train.state import TrainState  # noqa: E402
from gen_jax.train.step import make_optimizer, make_update_fn  # noqa: E402
from gen_jax.train.xla_options import cpu_compiler_options  # noqa: E402

FLASH_MODELS = ("flash", "flash_quad", "transformer_pp")
MODELS = FLASH_MODELS + ("ddpm_mnist", "roformer_seq64")


def _donating_step(update_fn, state, batch, options):
    compiled = jax.jit(update_fn, donate_argnums=0, compiler_options=options).lower(state, batch).compile()
    box = [jax.tree.map(lambda x: jnp.array(x, copy=True), state)]  # each compilation updates its own copy

    def step():
        box[0], metrics = compiled(box[0], batch)
        jax.block_until_ready((box[0], metrics))
    return step


def flash_lm_step(name: str, options, tiny: bool = False):
    """One train step of the FLASH launcher's model `name` on random characters (65-symbol vocabulary)."""
    from gen_jax.flash import build, make_loss_fn
    from gen_jax.flash.configs import lm_model_config, lm_shakespeare, lm_tiny

    cfg = lm_tiny() if tiny else lm_shakespeare()
    t = cfg.train
    ids = np.random.default_rng(0).integers(0, 65, (t.batch_size, cfg.data.seq_len + 1)).astype(np.int32)
    graphdef, params = nnx.split(build(lm_model_config(cfg, name, 65), seed=0), nnx.Param)
    optimizer = make_optimizer(t.learning_rate, warmup_steps=t.warmup_steps, grad_clip_norm=t.grad_clip_norm)
    update_fn = make_update_fn(make_loss_fn(graphdef, task="clm"), optimizer, ema_decay=None)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(0), use_ema=False)
    return _donating_step(update_fn, state, {"tokens": jnp.asarray(ids)}, options)


def ddpm_mnist_step(options, tiny: bool = False):
    from benchmarks.ddpm_speed import DEFAULT_BATCH, bench_config, ours_train_setup

    name = "tiny" if tiny else "mnist"
    return _donating_step(*ours_train_setup(bench_config(name), DEFAULT_BATCH[name], ema=True), options)


def roformer_step(options, tiny: bool = False):
    """RoFormer encoder fwd+bwd (the gradient of mean(h^2)), as benchmarks/roformer_speed.py."""
    from benchmarks.roformer_speed import encoder_loss
    from gen_jax.roformer import RoFormerConfig

    size = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=200) if tiny else \
        dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, vocab_size=12000)
    cfg = RoFormerConfig(**size, dropout_rate=0.0, attention_dropout_rate=0.0)
    loss, params = encoder_loss(cfg, *((4, 16) if tiny else (32, 64)))
    grad = jax.jit(jax.grad(loss), compiler_options=options).lower(params).compile()
    return lambda: jax.block_until_ready(grad(params))


def make_step(model: str, options, tiny: bool = False):
    if model in FLASH_MODELS:
        return flash_lm_step(model, options, tiny)
    return {"ddpm_mnist": ddpm_mnist_step, "roformer_seq64": roformer_step}[model](options, tiny)


def compare(model: str, rounds: int, tiny: bool = False) -> dict:
    off = cpu_compiler_options(ynn_fusions=False, backend="cpu")
    if off is None:
        raise SystemExit("this jaxlib rejects the YNNPACK option: nothing to compare")
    steps = {"default": make_step(model, None, tiny), "ynn_off": make_step(model, off, tiny)}
    times: dict = {k: [] for k in steps}
    for r in range(2 + rounds):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r >= 2:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model, "times_s": times, "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
            "speedup_median": med["default"] / med["ynn_off"],
            "speedup_min": min(times["default"]) / min(times["ynn_off"])}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (smoke run)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    if not models or set(models) - set(MODELS) or a.rounds < 1:
        ap.error(f"--models must name some of {', '.join(MODELS)}; --rounds >= 1")
    m = machine_info()
    print(f"Machine: {m['cpu']}, {m['usable_cores']} usable cores; jax {jax.__version__} on {m['jax_device']}")
    print(speed_env_line(m["speed_env"]))
    print("\n| model | default ms/step (median / min) | YNN off ms/step (median / min) | speed-up median | "
          "speed-up min |\n|---|---|---|---|---|")
    rows = []
    for model in models:
        r = compare(model, a.rounds, a.tiny)
        md, mn = r["median_s"], r["min_s"]
        print(f"| {model} | {1e3 * md['default']:.1f} / {1e3 * mn['default']:.1f} | {1e3 * md['ynn_off']:.1f} / "
              f"{1e3 * mn['ynn_off']:.1f} | {r['speedup_median']:.2f}x | {r['speedup_min']:.2f}x |", flush=True)
        rows.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": m, "rounds": a.rounds, "rows": rows}, f, indent=1, default=str)
    return rows


if __name__ == "__main__":
    main()
