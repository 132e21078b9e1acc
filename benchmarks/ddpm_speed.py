"""DDPM speed on this machine, ours (JAX) vs the PyTorch peers, every ratio measured in one run (issue 3).

1. Train-step throughput (images/s; forward + backward + global-norm clip + Adam; median of --repeats rounds
   after --warmup rounds, each round one step of every side, so that the machine's drift hits all alike) of our U-Net (`gen_jax.ddpm.training.make_loss_fn` + `gen_jax.train.make_update_fn`,
   one jitted, state-donating call) vs diffusers' `UNet2DModel` built with the same layout
   (`DDPMScheduler.add_noise`, MSE on eps, the usual diffusers training loop) and, when it imports,
   `denoising-diffusion-pytorch`'s `Unet` at the nearest config (its layout differs: 2 res blocks per level,
   linear attention at every other level, RMSNorm; its parameter count is reported).
2. Sampling a batch at the MNIST config: 1000-step ancestral and 50-step DDIM, ours one compiled `lax.scan`
   (`make_sampler`) vs diffusers' `DDPMScheduler` / `DDIMScheduler` step loop under `torch.no_grad()`, the
   --sample-repeats runs of the two sides interleaved.
   `--sample-steps K` times only K steps of each and extrapolates (the output says so).
3. The fraction of this machine's float32 matmul roof (`benchmarks.roofline.measure_matmul_peak`, measured
   in the same run) that our train step reaches, with FLOPs from XLA's `cost_analysis()` of the compiled step.

    python -m benchmarks.ddpm_speed                                   # the issue's settings (long on 2 cores)
    python -m benchmarks.ddpm_speed --sample-steps 20 --repeats 5     # quicker, sampling extrapolated
    python -m benchmarks.ddpm_speed --configs mnist --json out.json   # one config, also write JSON
    python -m benchmarks.ddpm_speed --configs tiny --sample-config tiny --tiny   # smoke run (minutes)
    taskset -c 0 python -m benchmarks.ddpm_speed ...                  # both sides on one core (busy machine)

Ratios are ours / peer throughput (> 1: ours faster); for sampling, peer seconds / our seconds. Both
frameworks compute in float32 on all usable cores (the CPU affinity mask; torch:
`torch.set_num_threads(cores)`; XLA's CPU client sizes its pool to them by itself). On a busy machine
torch's OpenMP threads degrade far more than XLA's pool (measured on a 2-core box at load ~14: diffusers'
tiny train step 13x slower with 2 threads than with 1), and the report warns; `taskset -c 0` gives a fair
one-core comparison there. The `cifar10` preset computes in bfloat16 on TPU; here both sides use float32.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `gen_jax` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from flax import nnx

from benchmarks.roofline import measure_matmul_peak
from gen_jax.ddpm import configs as ddpm_configs
from gen_jax.ddpm import count_params
from gen_jax.ddpm.configs import DDPMConfig
from gen_jax.ddpm.training import build_unet, make_loss_fn, make_sampler, schedule_of
from gen_jax.errors import ConfigError
from gen_jax.train.mesh import make_mesh
from gen_jax.train.state import TrainState
from gen_jax.train.step import make_optimizer, make_update_fn

DEFAULT_BATCH = {"cifar10": 8, "mnist": 32, "tiny": 4}
EMA_DECAY = 0.9999


# ----------------------------------------------------------------------------------------------- configs

def bench_config(name: str) -> DDPMConfig:
    """A preset with float32 compute (the CPU comparison) and no LR warmup (a constant-rate Adam on both sides)."""
    if name not in ddpm_configs.PRESETS:
        raise ConfigError(f"unknown config {name!r}; choose from {', '.join(ddpm_configs.PRESETS)}")
    cfg = ddpm_configs.PRESETS[name]()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compute_dtype="float32", warmup_steps=0))


def level_resolutions(cfg: DDPMConfig) -> list[int]:
    res, out = cfg.data.image_size, []
    for _ in cfg.model.ch_mult:
        out.append(res)
        res = (res + 1) // 2
    return out


def diffusers_unet_kwargs(cfg: DDPMConfig) -> dict:
    """UNet2DModel arguments with our layout: google/ddpm-cifar10-32's settings (single-head attention,
    padding-0 downsampling, sin-first embedding with freq_shift 1, GroupNorm eps 1e-6) at our widths."""
    m, d = cfg.model, cfg.data
    levels = level_resolutions(cfg)
    for r in levels[:-1]:
        if r % 2:  # diffusers pads (0, 1) before a stride-2 conv; ours is SAME: equal only for even sides
            raise ConfigError(f"level resolution {r} is odd; diffusers' downsampling would not match ours")
    return dict(
        sample_size=d.image_size, in_channels=d.channels, out_channels=d.channels,
        block_out_channels=tuple(m.ch * k for k in m.ch_mult), layers_per_block=m.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if r in m.attn_resolutions else "DownBlock2D" for r in levels),
        up_block_types=tuple("AttnUpBlock2D" if r in m.attn_resolutions else "UpBlock2D"
                             for r in reversed(levels)),
        attention_head_dim=None, norm_num_groups=m.num_groups, norm_eps=1e-6, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, dropout=m.dropout, act_fn="silu", mid_block_scale_factor=1)


def lucidrains_unet_kwargs(cfg: DDPMConfig) -> dict:
    """denoising-diffusion-pytorch `Unet` nearest to our layout: same base width and multipliers (so the up
    path's widths match ours), full single-head attention where ours has attention and in the middle; its
    other levels keep their (unavoidable) linear attention; 2 res blocks per level in both paths."""
    m = cfg.model
    levels = level_resolutions(cfg)
    full = tuple(r in m.attn_resolutions for r in levels)
    dims = [m.ch] + [m.ch * k for k in m.ch_mult]  # level i of its down path runs at dims[i] channels
    heads = tuple(1 if f else 4 for f in full[:-1]) + (1,)
    dim_head = tuple(dims[i] if f else 32 for i, f in enumerate(full[:-1])) + (dims[-1],)
    return dict(dim=m.ch, dim_mults=tuple(m.ch_mult), channels=cfg.data.channels, full_attn=full,
                attn_heads=heads, attn_dim_head=dim_head, dropout=m.dropout)


# ------------------------------------------------------------------------------------------------ timing

def timed_interleaved(steps: dict[str, Callable[[], Any]], warmup: int, rounds: int) -> dict:
    """{name: median wall and process-CPU seconds per step, and the wall times} over `rounds` rounds that call
    each step once, after `warmup` such rounds: this shared machine's drifts (~10% over minutes) hit all alike."""
    wall: dict = {k: [] for k in steps}
    cpu: dict = {k: [] for k in steps}
    for r in range(warmup + rounds):
        for k, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if r >= warmup:
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: {"step_s": statistics.median(wall[k]), "step_times_s": wall[k], "cpu_s": statistics.median(cpu[k])}
            for k in steps}

def _flops_of(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def _xla_flops_of(fn, *args) -> float | None:
    """FLOPs of `fn` as XLA counts them, compiled with gen_jax's MKL custom calls off: XLA's cost analysis does
    not see inside custom calls, so the step that uses them would be counted without its products."""
    from gen_jax.nn import cpu_blas
    old = os.environ.get(cpu_blas.ENV_SWITCH)
    os.environ[cpu_blas.ENV_SWITCH] = "0"
    try:  # a fresh lambda: traced again, not taken from the trace cache of the step above
        return _flops_of(jax.jit(lambda *a: fn(*a)).lower(*args).compile())
    finally:
        if old is None:
            os.environ.pop(cpu_blas.ENV_SWITCH)
        else:
            os.environ[cpu_blas.ENV_SWITCH] = old


# ------------------------------------------------------------------------------------------- train steps

def ours_train_setup(cfg: DDPMConfig, batch: int, *, ema: bool, seed: int = 0) -> tuple[Callable, TrainState, dict]:
    """(update_fn, state, data): our U-Net train step (float32, EMA if `ema`) and a batch of random images."""
    device = jax.devices()[0]
    graphdef, params = nnx.split(build_unet(cfg, nnx.Rngs(seed)), nnx.Param)
    loss_fn = make_loss_fn(graphdef, schedule_of(cfg), cfg)
    optimizer = make_optimizer(cfg.train.learning_rate, grad_clip_norm=cfg.train.grad_clip_norm)
    update_fn = make_update_fn(loss_fn, optimizer, ema_decay=EMA_DECAY if ema else None, compute_dtype="float32")
    state = jax.device_put(TrainState.create(params, optimizer, jax.random.PRNGKey(seed), use_ema=ema), device)
    d = cfg.data
    images = np.random.default_rng(seed).integers(0, 256, (batch, d.image_size, d.image_size, d.channels),
                                                  dtype=np.uint8)
    return update_fn, state, {"image": jax.device_put(images, device)}


def ours_train_prepare(cfg: DDPMConfig, batch: int, *, ema: bool, seed: int = 0) -> tuple[Callable, dict]:
    """(step, info): one compiled train step of ours (waited for), and its parameter count, compile seconds and
    XLA FLOP count."""
    update_fn, state, data = ours_train_setup(cfg, batch, ema=ema, seed=seed)
    t0 = time.perf_counter()
    compiled = jax.jit(update_fn, donate_argnums=0).lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    flops = _xla_flops_of(update_fn, state, data)
    info = {"params": count_params(state.params), "compile_s": compile_s, "flops_per_step": flops}
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], data)
        jax.block_until_ready((box[0], metrics))

    return step, info


def _torch_train_prepare(model: Any, forward: Callable, cfg: DDPMConfig, batch: int, *, ema: bool,
                         compile_model: bool, seed: int = 0) -> tuple[Callable, dict]:
    """(step, info): one train step of a PyTorch U-Net (noise, loss, backward, clip, Adam, EMA) and its info."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    model.train()
    scheduler = DDPMScheduler(num_train_timesteps=cfg.diffusion.timesteps, beta_schedule="linear")
    n_params = sum(p.numel() for p in model.parameters())
    try:  # the fastest CPU Adam this torch has
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.learning_rate, fused=True)
        adam = "fused"
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.learning_rate, foreach=True)
        adam = "foreach"
    ema_params = [p.detach().clone() for p in model.parameters()] if ema else None
    run = torch.compile(model) if compile_model else model
    d = cfg.data
    x0 = torch.rand(batch, d.channels, d.image_size, d.image_size) * 2 - 1

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, cfg.diffusion.timesteps, (batch,))
        loss = F.mse_loss(forward(run, scheduler.add_noise(x0, noise, t), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip_norm, foreach=True)
        opt.step()
        if ema_params is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - EMA_DECAY)

    return step, {"params": n_params, "adam": adam}


def diffusers_train_prepare(cfg: DDPMConfig, batch: int, *, ema: bool,
                            compile_model: bool = False) -> tuple[Callable, dict]:
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**diffusers_unet_kwargs(cfg))
    return _torch_train_prepare(model, lambda m, x, t: m(x, t).sample, cfg, batch, ema=ema,
                                compile_model=compile_model)


def import_lucidrains_unet() -> tuple[type | None, str]:
    """(Unet class or None, how it was imported or why not). Its package imports torchvision, accelerate and
    ema_pytorch at the top for its Trainer and data pipeline; torchvision cannot be installed beside this
    CPU torch without replacing it, so when the plain import fails on those, they are stubbed (the Unet
    itself uses only torch and einops)."""
    try:
        from denoising_diffusion_pytorch import Unet
        import denoising_diffusion_pytorch as ddp
        return Unet, f"denoising-diffusion-pytorch {getattr(ddp, '__version__', '?')} (plain import)"
    except ImportError as e:
        plain_error = f"{type(e).__name__}: {e}"
    training_only = {"torchvision": ("transforms", "utils"), "accelerate": ("Accelerator",),
                     "ema_pytorch": ("EMA",)}
    stubbed = []
    for name, attrs in training_only.items():
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            for a in attrs:
                setattr(stub, a, None)
            sys.modules[name] = stub
            stubbed.append(name)
    try:
        for key in [k for k in sys.modules if k.startswith("denoising_diffusion_pytorch")]:
            del sys.modules[key]  # drop the half-imported package from the failed attempt
        from denoising_diffusion_pytorch.denoising_diffusion_pytorch import Unet
        from denoising_diffusion_pytorch.version import __version__
        return Unet, (f"denoising-diffusion-pytorch {__version__}; plain import failed ({plain_error}); "
                      f"imported with training-only modules stubbed: {', '.join(stubbed) or 'none'}")
    except Exception as e:  # not installed, or the Unet itself needs something missing
        return None, f"not available: {plain_error}; with stubs: {type(e).__name__}: {e}"
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)


def lucidrains_train_prepare(unet_cls: type, cfg: DDPMConfig, batch: int, *, ema: bool,
                             compile_model: bool = False) -> tuple[Callable, dict]:
    import torch

    torch.manual_seed(0)
    kwargs = lucidrains_unet_kwargs(cfg)
    model = unet_cls(**kwargs)
    step, info = _torch_train_prepare(model, lambda m, x, t: m(x, t), cfg, batch, ema=ema,
                                      compile_model=compile_model)
    info["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return step, info


# ---------------------------------------------------------------------------------------------- sampling

def ours_sampling_prepare(cfg: DDPMConfig, method: str, batch: int, steps: int) -> tuple[Callable, float]:
    """(run, first_call_s): run(seed) samples `steps` steps with our compiled sampler (ancestral: a T=steps
    schedule, same per-step work), waited for; the first call (compilation included) is made here."""
    if method == "ancestral":
        run_cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, timesteps=steps))
    else:
        run_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, ddim_steps=steps))
    graphdef, params = nnx.split(build_unet(cfg, nnx.Rngs(0)), nnx.Param)
    sampler = make_sampler(graphdef, schedule_of(run_cfg), run_cfg, make_mesh(jax.devices()[:1]), n=batch,
                           method=method)
    def run(seed: int):
        return jax.block_until_ready(sampler(params, jax.random.PRNGKey(seed)))

    t0 = time.perf_counter()
    run(0)
    return run, time.perf_counter() - t0


def diffusers_sampling_prepare(cfg: DDPMConfig, method: str, batch: int, steps: int, full_steps: int) -> Callable:
    """run(seed): the first `steps` steps of diffusers' scheduler loop at `full_steps` inference steps."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**diffusers_unet_kwargs(cfg)).eval()
    T = cfg.diffusion.timesteps
    if method == "ancestral":
        variance = {"beta": "fixed_large", "posterior": "fixed_small"}[cfg.diffusion.sample_variance]
        scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type=variance,
                                  clip_sample=True)
    else:
        scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True,
                                  set_alpha_to_one=True, timestep_spacing="leading")
    scheduler.set_timesteps(full_steps)
    timesteps = scheduler.timesteps[:steps]
    d = cfg.data
    extra = {"eta": cfg.eval.ddim_eta} if method == "ddim" else {}

    def loop(seed: int, ts) -> Any:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, d.channels, d.image_size, d.image_size, generator=g)
        with torch.no_grad():
            for t in ts:
                eps = model(x, t).sample
                x = scheduler.step(eps, t, x, generator=g, **extra).prev_sample
        return x

    loop(0, timesteps[:2])  # warm up (allocator, oneDNN kernels) on two steps
    return lambda seed: loop(seed, timesteps)


def timed_sampling(runs: dict[str, Callable[[int], Any]], steps: int, full_steps: int, repeats: int) -> dict:
    """{name: seconds for `steps` sampling steps, per step and extrapolated to `full_steps`}: the medians of
    `repeats` rounds that run each sampler once (interleaved, so that the machine's drift hits all alike)."""
    seeds = iter(range(1, 1_000_000))
    timed = timed_interleaved({k: (lambda run=run: run(next(seeds))) for k, run in runs.items()}, 0, repeats)
    return {k: {"timed_steps": steps, "seconds": t["step_s"], "per_step_s": t["step_s"] / steps,
                "full_steps": full_steps, "full_s": t["step_s"] / steps * full_steps} for k, t in timed.items()}


# ------------------------------------------------------------------------------------------------ report

def machine_info() -> dict:
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable, "load_avg_1_5_15": load,
            "jax_device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "python": platform.python_version(), "speed_env": speed_env()}


SPEED_ENV_VARS = ("GLIBC_TUNABLES", "XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def speed_env() -> dict:
    """The environment variables that change either side's speed (malloc tunables, XLA flags, BLAS threads)."""
    return {k: os.environ[k] for k in SPEED_ENV_VARS if k in os.environ}


def speed_env_line(env: dict) -> str:
    return "Environment: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "defaults")


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "denoising-diffusion-pytorch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_report(res: dict) -> str:
    m, s = res["machine"], res["settings"]
    lines = [f"Machine: {m['cpu']}, {m['usable_cores']} usable cores (of {m['logical_cores']}), load avg "
             f"{m['load_avg_1_5_15']}; torch threads {m['torch_threads']}; jax {m['jax_device']}",
             speed_env_line(m["speed_env"]),
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
             f"Settings: float32 on both sides; train: median of {s['repeats']} interleaved rounds (one step of each "
             f"side per round) after {s['warmup']} warm-up rounds; sampling: median of {s.get('sample_repeats', 1)} "
             f"interleaved runs"
             + (f"; Adam + clip {s['grad_clip']}{' + EMA' if s['ema'] else ''}; dropout as in the preset"
                if "grad_clip" in s else " (no train steps timed)"),
             f"denoising-diffusion-pytorch: {res['lucidrains_import']}"]
    load = (m["load_avg_1_5_15"] or (0.0,))[0]
    if load > m["usable_cores"] and m["torch_threads"] > 1:
        lines.append(f"WARNING: busy machine (1-min load {load:.1f} on {m['usable_cores']} usable cores): torch's "
                     "OpenMP threads slow down many-fold when oversubscribed, so these ratios flatter ours; rerun "
                     "on a quiet machine, or pin both sides to one core with `taskset -c 0`.")
    elif load > m["usable_cores"]:
        lines.append(f"NOTE: busy machine (1-min load {load:.1f}); both sides run single-threaded on the same "
                     "core(s), so ratios are fair but absolute numbers are low and noisy.")
    lines.append("")
    if res["train"]:
        lines += ["### Train step (images/s; ratio = ours / peer)", "",
                  "| config | image | batch | params ours | params diffusers | ours img/s | diffusers img/s | "
                  "ours/diffusers | params ddpm-pytorch | ddpm-pytorch img/s | ours/ddpm-pytorch | "
                  "ours compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["train"]:
            lu = r.get("lucidrains") or {}
            lines.append(
                f"| {r['config']} | {r['image']} | {r['batch']} | {r['ours']['params']:,} | "
                f"{r['diffusers']['params']:,} | {_f(r['ours']['images_per_s'])} | "
                f"{_f(r['diffusers']['images_per_s'])} | {_f(r['ratio_diffusers'])}x | "
                f"{format(lu['params'], ',') if lu else '-'} | {_f(lu.get('images_per_s'))} | "
                f"{_f(r.get('ratio_lucidrains'))}{'x' if lu else ''} | {_f(r['ours']['compile_s'], '.1f')} |")
        lines.append("")
    if res["sampling"]:
        sc = res["sampling_settings"]
        extrap = any(r["ours"]["timed_steps"] != r["ours"]["full_steps"] for r in res["sampling"])
        lines += [f"### Sampling, {sc['config']} config, batch {sc['batch']} (ratio = diffusers s / ours s)", ""]
        if extrap:
            lines += ["Fewer steps than the full run were timed (--sample-steps); the full-run seconds are "
                      "EXTRAPOLATED as per-step time x full steps.", ""]
        lines += ["| sampler | steps timed | ours ms/step | diffusers ms/step | ours s (full) | diffusers s (full) | "
                  "ours/diffusers speed | ours first call s (incl. compile) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["sampling"]:
            o, p = r["ours"], r["diffusers"]
            name = f"{r['method']} {o['full_steps']}-step"
            lines.append(f"| {name} | {o['timed_steps']} | {_f(1e3 * o['per_step_s'], '.1f')} | "
                         f"{_f(1e3 * p['per_step_s'], '.1f')} | {_f(o['full_s'], '.1f')} | {_f(p['full_s'], '.1f')} | "
                         f"{_f(r['ratio'])}x | {_f(o['first_call_s'], '.1f')} |")
        lines.append("")
    if res["roofline"]:
        rf = res["roofline"]
        lines += [f"### Fraction of this machine's float32 matmul roof ({_f(rf['peak_flops_per_s'] / 1e9, '.1f')} "
                  f"GFLOP/s, jnp.dot n={rf['peak_size']}, measured in this run)", "",
                  "| config | batch | XLA GFLOP/step | ours GFLOP/s | ours % of roof | diffusers % of roof "
                  "(same FLOP count) |", "|---|---|---|---|---|---|"]
        for r in rf["rows"]:
            lines.append(f"| {r['config']} | {r['batch']} | {_f(r['flops_per_step'] / 1e9, '.2f')} | "
                         f"{_f(r['ours_flops_per_s'] / 1e9, '.1f')} | {_f(100 * r['ours_fraction'], '.1f')}% | "
                         f"{_f(100 * r['diffusers_fraction'], '.1f')}% |")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    lu_cls, lu_note = (None, "skipped (--no-lucidrains)") if args.no_lucidrains else import_lucidrains_unet()
    res: dict = {"machine": machine_info(), "versions": versions(), "lucidrains_import": lu_note,
                 "settings": {"warmup": args.warmup, "repeats": args.repeats, "ema": args.ema,
                              "sample_repeats": args.sample_repeats,
                              "torch_compile": args.torch_compile, "dtype": "float32"},
                 "train": [], "sampling": [], "roofline": None}
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)

    if not args.no_train:
        for name in args.configs:
            cfg = bench_config(name)
            res["settings"]["grad_clip"] = cfg.train.grad_clip_norm
            batch = args.batch.get(name, DEFAULT_BATCH.get(name, 8))
            say(f"[train] {name} batch {batch}: compiling ours, preparing the peers ...")
            prepared = {"ours": ours_train_prepare(cfg, batch, ema=args.ema),
                        "diffusers": diffusers_train_prepare(cfg, batch, ema=args.ema,
                                                             compile_model=args.torch_compile)}
            if lu_cls is not None:
                prepared["lucidrains"] = lucidrains_train_prepare(lu_cls, cfg, batch, ema=args.ema,
                                                                  compile_model=args.torch_compile)
            say(f"[train] {name}: timing {', '.join(prepared)} interleaved ...")
            timed = timed_interleaved({k: step for k, (step, _) in prepared.items()}, args.warmup, args.repeats)
            row = {"config": name, "batch": batch, "image": f"{cfg.data.image_size}x{cfg.data.image_size}x"
                   f"{cfg.data.channels}"}
            for k, (_, info) in prepared.items():
                t = timed[k]
                row[k] = {**info, "step_s": t["step_s"], "images_per_s": batch / t["step_s"],
                          "step_times_s": t["step_times_s"], "cpu_s": t["cpu_s"]}
            row["ratio_diffusers"] = row["ours"]["images_per_s"] / row["diffusers"]["images_per_s"]
            if "lucidrains" in row:
                row["ratio_lucidrains"] = row["ours"]["images_per_s"] / row["lucidrains"]["images_per_s"]
            res["train"].append(row)

    if not args.no_sampling:
        cfg = bench_config(args.sample_config)
        res["sampling_settings"] = {"config": args.sample_config, "batch": args.sample_batch,
                                    "repeats": args.sample_repeats,
                                    "ancestral_variance": cfg.diffusion.sample_variance, "ddim_eta": cfg.eval.ddim_eta}
        for method, full in (("ancestral", cfg.diffusion.timesteps), ("ddim", cfg.eval.ddim_steps)):
            steps = min(args.sample_steps or full, full)
            say(f"[sample] {method}: {steps} of {full} steps, batch {args.sample_batch}: compiling ours, "
                "warming up diffusers ...")
            ours_run, first_s = ours_sampling_prepare(cfg, method, args.sample_batch, steps)
            peer_run = diffusers_sampling_prepare(cfg, method, args.sample_batch, steps, full)
            say(f"[sample] {method}: timing both interleaved ...")
            timed = timed_sampling({"ours": ours_run, "diffusers": peer_run}, steps, full, args.sample_repeats)
            ours, peer = {**timed["ours"], "first_call_s": first_s}, timed["diffusers"]
            res["sampling"].append({"method": method, "ours": ours, "diffusers": peer,
                                    "ratio": peer["seconds"] / ours["seconds"]})

    if not args.no_roofline and res["train"]:
        say(f"[roof] jnp.dot float32 sizes {args.roof_sizes} ...")
        peak = measure_matmul_peak("float32", args.roof_sizes, args.roof_repeats)
        rows = []
        for r in res["train"]:
            flops = r["ours"]["flops_per_step"]
            if flops is None:
                continue
            achieved = flops / r["ours"]["step_s"]
            rows.append({"config": r["config"], "batch": r["batch"], "flops_per_step": flops,
                         "ours_flops_per_s": achieved, "ours_fraction": achieved / peak["best_flops_per_s"],
                         "diffusers_fraction": flops / r["diffusers"]["step_s"] / peak["best_flops_per_s"]})
        res["roofline"] = {"peak_flops_per_s": peak["best_flops_per_s"], "peak_size": peak["best_size"],
                           "peak": peak, "rows": rows}
    res["machine"]["load_avg_1_5_15_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return res


def _batch_overrides(items: Sequence[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value:
            raise argparse.ArgumentTypeError(f"--batch {item!r}: use NAME=SIZE, e.g. --batch cifar10=8")
        out[name] = int(value)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["cifar10", "mnist"],
                    help=f"train-step configs (presets of gen_jax.ddpm.configs: {', '.join(ddpm_configs.PRESETS)})")
    ap.add_argument("--batch", nargs="*", default=[], metavar="NAME=SIZE",
                    help=f"train batch per config (default {DEFAULT_BATCH})")
    ap.add_argument("--warmup", type=int, default=3, help="untimed train steps after compilation")
    ap.add_argument("--repeats", type=int, default=10, help="timed train steps (the median is reported)")
    ap.add_argument("--ema", action="store_true", help="add an EMA update to the train step on every side")
    ap.add_argument("--torch-compile", action="store_true", help="torch.compile the peers' models")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all usable cores). XLA always uses every usable core: "
                         "limit both with taskset instead")
    ap.add_argument("--no-lucidrains", action="store_true", help="skip denoising-diffusion-pytorch")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-sampling", action="store_true")
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--sample-config", default="mnist")
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=0,
                    help="time only this many steps of each sampler and extrapolate (0: the full 1000 / 50)")
    ap.add_argument("--sample-repeats", type=int, default=1, help="timed sampling runs of each side (interleaved) after the first")
    ap.add_argument("--roof-sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--roof-repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true",
                    help="smoke-run sizes: 1 warmup, 2 repeats, sampling batch 4 x 2 steps, roof n=128,256")
    ap.add_argument("--json", default=None, help="also write every number to this file")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    args.batch = _batch_overrides(args.batch)
    if args.tiny:
        args.warmup, args.repeats, args.sample_batch, args.sample_steps = 1, 2, 4, 2
        args.roof_sizes, args.roof_repeats = [128, 256], 1
    if args.repeats < 1 or args.sample_repeats < 1:
        raise SystemExit("--repeats and --sample-repeats must be >= 1")

    res = run(args)
    if args.json:  # first, so that the measurements survive any problem of the report
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(format_report(res))
    return res


if __name__ == "__main__":
    main()
