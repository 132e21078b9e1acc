"""GAN presets (GN-GAN, GraN-GAN and baselines) and hubness-sampling presets.

Each preset's docstring says how to run it, on what, how long, and what to expect.

    python -m experiments.gngan --preset mnist             # offline default, ~10 min on 2 quiet CPU cores
    python -m experiments.gngan --preset compare           # GN vs GraN vs WGAN-GP, ~3 x 10 min
    python -m experiments.gngan --preset cifar10_cnn       # the GN-GAN paper's CNN setting (tfds:cifar10)
    python -m experiments.gngan --set gan.method=wgan_gp   # any method: gn | gran | wgan_gp | sn | none
    python -m experiments.hubness --checkpoint runs/gngan_mnist   # hub latents vs random vs truncation
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from gen_jax.config import ImageDataConfig as DataConfig, TrainConfig
from gen_jax.errors import ConfigError

METHODS = ("gn", "gran", "wgan_gp", "sn", "none")
# The loss each method uses when gan.loss="auto": GN/GraN/SN with hinge (GN-GAN's ResNet setting; its CNN
# setting uses BCE), WGAN-GP with the WGAN critic loss, an unnormalized D with non-saturating BCE.
DEFAULT_LOSS = {"gn": "hinge", "gran": "hinge", "sn": "hinge", "wgan_gp": "wgan", "none": "bce"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "dcgan"  # "dcgan" (SNGAN's standard CNN) or "resnet" (SNGAN's ResNet)
    z_dim: int = 128
    g_width: int = 16  # DCGAN: channels of the last G stage (x2 per stage down to the base); ResNet: all
    d_width: int = 8  # DCGAN: first D conv (1, 2, 4, 8 x); ResNet: all blocks. D's cost (GN: double
    # backprop) grows with its width squared and dominates a CPU step: 16 costs 4x the time of 8
    g_norm: str = "group"  # "group" or "none" (no BatchNorm: see gen_jax.gan.models)


@dataclasses.dataclass(frozen=True)
class GANConfig:
    method: str = "gn"  # "gn" | "gran" | "wgan_gp" | "sn" | "none" (how D is normalized/regularized)
    loss: str = "auto"  # "hinge" | "bce" | "wgan" | "auto" (DEFAULT_LOSS of the method)
    n_dis: int = 1  # D steps per G step; one train step = n_dis D updates + 1 G update
    lr_d: float | None = None  # None: train.learning_rate (which is G's learning rate)
    beta1: float = 0.0  # Adam betas of both optimizers (GN-GAN / SNGAN: 0.0, 0.9)
    beta2: float = 0.9
    g_batch_size: int | None = None  # latents per G step; None: train.batch_size (GN-GAN ResNet: 2x)
    gp_weight: float = 10.0  # WGAN-GP lambda
    gran_eps: float = 1e-4  # GraN epsilon
    gran_k: float = 1.0  # GraN output scale K
    g_stop_norm_gradient: bool = False  # G step: treat ||grad_x f|| as a constant (no double backprop)
    ema_warmup: bool = True  # EMA decay min(decay, (1 + t) / (10 + t)): early samples are not stale

    @property
    def resolved_loss(self) -> str:
        return DEFAULT_LOSS[self.method] if self.loss == "auto" else self.loss


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    sample_every: int = 200  # grid of the EMA generator on fixed latents every this many steps (0: at end)
    grid_size: int = 64
    fid_samples: int = 5000  # EMA samples for FID/precision/recall at the end (0: skip; MNIST only)
    sample_batch: int = 500
    pr_k: int = 3  # k of improved precision/recall


@dataclasses.dataclass(frozen=True)
class GNGANConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    gan: GANConfig = GANConfig()
    # train.learning_rate is G's; train.batch_size is the real (and fake) batch of each D step.
    train: TrainConfig = TrainConfig(num_steps=1200, batch_size=32, learning_rate=2e-4, grad_clip_norm=None,
                                     ema_decay=0.999, log_every=100, checkpoint_every=300)
    eval: EvalConfig = EvalConfig()
    # Non-empty: train each listed method in <workdir>/<method> (same settings otherwise, resumable) and
    # write a comparison table and side-by-side grids. Empty: one run of gan.method.
    compare_methods: tuple[str, ...] = ()

    def validate(self) -> None:
        g, m, t = self.gan, self.model, self.train
        for method in (g.method, *self.compare_methods):
            if method not in METHODS:
                raise ConfigError(f"gan.method={method!r}: use one of {', '.join(METHODS)}")
        if g.loss not in ("auto", "hinge", "bce", "wgan"):
            raise ConfigError(f"gan.loss={g.loss!r}: use 'hinge', 'bce', 'wgan' or 'auto'")
        if m.arch not in ("dcgan", "resnet"):
            raise ConfigError(f"model.arch={m.arch!r}: use 'dcgan' or 'resnet'")
        if g.n_dis < 1:
            raise ConfigError(f"gan.n_dis={g.n_dis} must be >= 1 (D updates per G update)")
        if t.grad_accum_steps != 1:
            raise ConfigError("train.grad_accum_steps is not supported for GANs (each D and G update uses "
                              "its whole batch); raise train.batch_size instead")
        if t.compute_dtype != "float32":
            raise ConfigError(f"train.compute_dtype={t.compute_dtype!r}: GAN training here runs in float32 "
                              "(gradient normalization differentiates through input gradients)")
        if self.eval.fid_samples and self.eval.fid_samples < 2 * self.eval.pr_k:
            raise ConfigError(f"eval.fid_samples={self.eval.fid_samples} is too small; use 0 (skip) or "
                              "hundreds to thousands")


def mnist() -> GNGANConfig:
    """GN-GAN (hinge, n_dis=1, Adam(0, 0.9) 2e-4, generator EMA 0.999) on offline MNIST: SNGAN's CNN with G
    16 / D 8 channels wide, z_dim 128, 1200 steps of 32. ~10 min on 2 quiet CPU cores (0.68 CPU-s per step
    measured, plus ~1 min for compiling and FID/precision/recall on 5000 samples); see README for numbers."""
    return GNGANConfig()


def compare() -> GNGANConfig:
    """The mnist preset trained three times, GN vs GraN vs WGAN-GP at equal steps (1200 G steps, n_dis=1
    each, each method with its own loss: hinge, hinge, WGAN), in <workdir>/<method>; ~30 min on 2 quiet CPU
    cores (each method ~10 min; a finished method is skipped and an interrupted one resumes on re-run).
    Writes comparison.md/.json and comparison_grids.png (final grids side by side)."""
    return GNGANConfig(compare_methods=("gn", "gran", "wgan_gp"))


def tiny() -> GNGANConfig:
    """Seconds-long smoke run for tests (MNIST, an 8-wide DCGAN, 20 steps, FID on 200 samples)."""
    return GNGANConfig(
        model=ModelConfig(z_dim=32, g_width=8, d_width=8),
        gan=GANConfig(n_dis=2),
        train=TrainConfig(num_steps=20, batch_size=16, learning_rate=2e-4, grad_clip_norm=None, ema_decay=0.9,
                          log_every=5, checkpoint_every=10),
        eval=EvalConfig(sample_every=10, grid_size=16, fid_samples=200, sample_batch=100))


def tiny_compare() -> GNGANConfig:
    """The tiny preset for GN vs GraN vs WGAN-GP (tests of the compare mode; seconds per method)."""
    return dataclasses.replace(tiny(), compare_methods=("gn", "gran", "wgan_gp"))


def cifar10_cnn() -> GNGANConfig:
    """GN-GAN's CIFAR-10 CNN setting (official code): SNGAN standard CNN, BCE, n_dis=1, lr 2e-4 both, batch
    64, 200k steps, EMA 0.9999. One GPU: ~1 day. Needs tfds:cifar10 prepared. FID needs Inception features
    (not bundled): the launcher saves grids; score samples with your FID tool (paper: see its tables)."""
    return GNGANConfig(
        data=DataConfig(source="tfds:cifar10", image_size=32, channels=3),
        model=ModelConfig(arch="dcgan", z_dim=128, g_width=64, d_width=64),
        gan=GANConfig(method="gn", loss="bce", n_dis=1),
        train=TrainConfig(num_steps=200_000, batch_size=64, learning_rate=2e-4, grad_clip_norm=None,
                          ema_decay=0.9999, log_every=500, checkpoint_every=5000, steps_per_call=10),
        eval=EvalConfig(sample_every=10_000, fid_samples=0))


def cifar10_resnet() -> GNGANConfig:
    """GN-GAN's CIFAR-10 ResNet setting (official code): SNGAN ResNet, hinge, n_dis=5, lr_D 4e-4, lr_G 2e-4,
    batch D 64 / G 128, 200k G steps, EMA 0.9999. One GPU: a few days. Needs tfds:cifar10 prepared."""
    return GNGANConfig(
        data=DataConfig(source="tfds:cifar10", image_size=32, channels=3),
        model=ModelConfig(arch="resnet", z_dim=128, g_width=256, d_width=128),
        gan=GANConfig(method="gn", loss="hinge", n_dis=5, lr_d=4e-4, g_batch_size=128),
        train=TrainConfig(num_steps=200_000, batch_size=64, learning_rate=2e-4, grad_clip_norm=None,
                          ema_decay=0.9999, log_every=500, checkpoint_every=5000, steps_per_call=10),
        eval=EvalConfig(sample_every=10_000, fid_samples=0))


PRESETS = {"mnist": mnist, "tiny": tiny, "compare": compare, "tiny_compare": tiny_compare,
           "cifar10_cnn": cifar10_cnn, "cifar10_resnet": cifar10_resnet}


# ---------------------------------------------------------------------------------------------- hubness

@dataclasses.dataclass(frozen=True)
class HubConfig:
    k: int = 5  # neighbours of the k-occurrence
    threshold: int = 50  # keep latents with N_k >= threshold (the paper's t)
    # If set, ignore `threshold` and use the N_k value that about this fraction of a batch reaches
    # (calibrated on one batch): a threshold scaled for small latent dims or batches.
    hub_fraction: float | None = None
    strict: bool = False  # '>' (Su's code) instead of '>=' (the paper)
    batch_size: int = 10_000  # latents per k-occurrence batch (the paper: 10^4)
    include_self: bool = False  # count each latent as its own neighbour (the authors' sklearn notebook)


@dataclasses.dataclass(frozen=True)
class HubnessConfig:
    hub: HubConfig = HubConfig()
    truncation_psi: tuple[float, ...] = (0.5, 0.7, 0.9)  # z <- psi z (the trick in z space, w_avg = 0)
    num_samples: int = 5000  # samples per sampler for FID/precision/recall
    sample_batch: int = 500
    grid_size: int = 64
    pr_k: int = 3
    seed: int = 0

    def validate(self) -> None:
        h = self.hub
        if h.k < 1 or h.batch_size <= h.k:
            raise ConfigError(f"hub.k={h.k} and hub.batch_size={h.batch_size}: need 1 <= k < batch_size")
        if h.hub_fraction is not None and not 0 < h.hub_fraction < 1:
            raise ConfigError(f"hub.hub_fraction={h.hub_fraction} must be in (0, 1), e.g. 0.015")
        if any(not 0 < p <= 1 for p in self.truncation_psi):
            raise ConfigError(f"truncation_psi={self.truncation_psi}: each psi must be in (0, 1]")
        if self.num_samples < 2 * self.pr_k:
            raise ConfigError(f"num_samples={self.num_samples} is too small for precision/recall with "
                              f"k={self.pr_k}")


def hubness_mnist() -> HubnessConfig:
    """Hub latents (k=5, t=50 over batches of 10^4, '>=' and self excluded, as in the paper) vs random latents
    vs truncation psi in {0.5, 0.7, 0.9}, 5000 samples each, on a gngan checkpoint (default runs/gngan_mnist,
    z_dim 128: about 1.5% of Gaussian latents are hubs there). ~3 min on 2 quiet CPU cores."""
    return HubnessConfig()


def hubness_tiny() -> HubnessConfig:
    """Seconds-long smoke run for tests: 100 samples each, batches of 500 latents with a calibrated
    threshold (top 5% by N_k), psi in {0.5, 0.8}."""
    return HubnessConfig(hub=HubConfig(batch_size=500, hub_fraction=0.05), truncation_psi=(0.5, 0.8),
                         num_samples=100, sample_batch=50, grid_size=16)


HUBNESS_PRESETS = {"mnist": hubness_mnist, "tiny": hubness_tiny}


def config_from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """Rebuild a (nested) frozen config dataclass from `gen_jax.config.to_dict` output (e.g. config.json).

    Keys the class does not know are an error (the run was written by another version); missing keys take
    the class defaults.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no fields {unknown}; the config was written by another "
                          "version of gen_jax")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = config_from_dict(tp, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
