"""DDPM presets. Each preset's docstring says how to run it, on what, how long, and what to expect.

    python -m experiments.ddpm --preset mnist            # offline default, ~12 min on 2 quiet CPU cores
    python -m experiments.ddpm --preset cifar10          # the paper's CIFAR-10 model (tensorflow-datasets)
    python -m experiments.ddpm --help                    # every key, change any with --set key=value
"""
from __future__ import annotations

import dataclasses

from gen_jax.config import ImageDataConfig as DataConfig, TrainConfig
from gen_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    ch: int = 16
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (7,)
    dropout: float = 0.1
    num_groups: int = 8


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "linear"  # "linear" (beta 1e-4..0.02) or "cosine" (s = 0.008)
    timesteps: int = 1000
    prediction: str = "eps"  # "eps", "v" or "x0"
    loss_reduction: str = "mean"  # "mean" over pixels (paper code) or "sum" per image (Su's code)
    sample_variance: str = "beta"  # ancestral sigma_t^2: "beta" or "posterior" (beta tilde)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    sample_every: int = 500  # DDIM grid of the EMA model every this many steps (0: only at the end)
    grid_size: int = 64
    ddim_steps: int = 50
    ddim_eta: float = 0.0
    ancestral_grid: bool = True  # a T-step ancestral grid at the end
    ancestral_grid_size: int = 64  # its images (T network calls each: the costliest grid on a CPU)
    fid_samples: int = 500  # DDIM samples for FID at the end (0: skip)
    sample_batch: int = 256
    bpd_examples: int = 200  # test images for bits/dim (0: skip)
    bpd_timesteps: int = 100  # strided subset of t for the bound (unbiased estimate); 0: all T terms


@dataclasses.dataclass(frozen=True)
class DDPMConfig:
    data: DataConfig = DataConfig()
    model: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig(num_steps=2000, batch_size=32, learning_rate=1e-3, warmup_steps=100,
                                     grad_clip_norm=1.0, ema_decay=0.995, log_every=100,
                                     checkpoint_every=500)
    eval: EvalConfig = EvalConfig()

    def validate(self) -> None:
        if self.diffusion.schedule not in ("linear", "cosine"):
            raise ConfigError(f"diffusion.schedule={self.diffusion.schedule!r}: use 'linear' or 'cosine'")
        if self.diffusion.prediction not in ("eps", "v", "x0"):
            raise ConfigError(f"diffusion.prediction={self.diffusion.prediction!r}: use 'eps', 'v' or 'x0'")
        if self.diffusion.loss_reduction not in ("mean", "sum"):
            raise ConfigError("diffusion.loss_reduction must be 'mean' or 'sum'")
        if self.diffusion.sample_variance not in ("beta", "posterior"):
            raise ConfigError("diffusion.sample_variance must be 'beta' or 'posterior'")
        if self.model.ch % self.model.num_groups:
            raise ConfigError(f"model.ch={self.model.ch} is not divisible by model.num_groups="
                              f"{self.model.num_groups}; GroupNorm needs whole groups")


def mnist() -> DDPMConfig:
    """Offline MNIST, a 280k-parameter U-Net (no dropout: under one epoch of training), 1500 steps of 32, then
    a 16-image 1000-step ancestral grid, FID of 500 DDIM-50 samples and bits/dim of 100 test digits: about
    12 min on 2 quiet CPU cores (2.9 train steps/s; README has the numbers)."""
    base = DDPMConfig()
    return dataclasses.replace(
        base, model=dataclasses.replace(base.model, dropout=0.0),
        train=dataclasses.replace(base.train, num_steps=1500),
        eval=dataclasses.replace(base.eval, ancestral_grid_size=16, bpd_examples=100))


def tiny() -> DDPMConfig:
    """Seconds-long smoke run for tests and notebooks (MNIST, a very small U-Net, few steps)."""
    return DDPMConfig(
        model=UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,), num_groups=4),
        diffusion=DiffusionConfig(timesteps=100),
        train=TrainConfig(num_steps=20, batch_size=16, learning_rate=1e-3, ema_decay=0.9, log_every=5,
                          checkpoint_every=10, grad_clip_norm=1.0),
        eval=EvalConfig(sample_every=10, grid_size=16, ddim_steps=10, fid_samples=64, sample_batch=32,
                        bpd_examples=16, bpd_timesteps=10, ancestral_grid=True, ancestral_grid_size=16))


def cifar10() -> DDPMConfig:
    """The paper's CIFAR-10 model (35.7M params, Ho et al. sec. 4): TPU v3-8 / 8 GPUs, 800k steps
    (~11 h on a v3-8 at the paper's 21 steps/s); expect FID ~3.2 with EMA weights and 50k samples.
    Needs `tfds:cifar10` prepared (or a network)."""
    return DDPMConfig(
        data=DataConfig(source="tfds:cifar10", image_size=32, channels=3),
        model=UNetConfig(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
                         num_groups=32),
        train=TrainConfig(num_steps=800_000, batch_size=128, learning_rate=2e-4, warmup_steps=5000,
                          grad_clip_norm=1.0, ema_decay=0.9999, log_every=500, checkpoint_every=10_000,
                          steps_per_call=10, compute_dtype="bfloat16"),
        eval=EvalConfig(sample_every=50_000, fid_samples=50_000, sample_batch=1000, bpd_examples=10_000,
                        bpd_timesteps=0))


def celeb_a() -> DDPMConfig:
    """CelebA at 64x64 (center-cropped, resized), a CIFAR-sized U-Net with one more level; TPU/GPU pod,
    ~500k steps. Needs `tfds:celeb_a` prepared (its manual download)."""
    return DDPMConfig(
        data=DataConfig(source="tfds:celeb_a", image_size=64, channels=3),
        model=UNetConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                         dropout=0.0, num_groups=32),
        train=TrainConfig(num_steps=500_000, batch_size=64, learning_rate=2e-5, warmup_steps=5000,
                          grad_clip_norm=1.0, ema_decay=0.9999, log_every=500, checkpoint_every=10_000,
                          steps_per_call=10, compute_dtype="bfloat16"),
        eval=EvalConfig(sample_every=50_000, fid_samples=0, sample_batch=256, bpd_examples=1000,
                        bpd_timesteps=0))


PRESETS = {"mnist": mnist, "tiny": tiny, "cifar10": cifar10, "celeb_a": celeb_a}
