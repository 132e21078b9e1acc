"""Presets of the two VAE launchers. Each preset's docstring says how to run it, on what, how long, and what
to expect.

    python -m experiments.vae_likelihood --preset mnist   # IWAE paper's model, VAE vs IWAE, NLL at K=1..5000
    python -m experiments.vmf_vae --preset mnist          # N-VAE vs S-VAE for latent d = 2, 5, 10, 20
    python -m experiments.vmf_vae --preset su             # Su's S-VAE: d = 8, fixed kappa = 20 (KL 4.486)

Reference numbers (papers/vae_likelihood.md, papers/vmf_vae.md) are `IWAE_PAPER_NLL` and `DAVIDSON_LL`.
"""
from __future__ import annotations

import dataclasses

from gen_jax.config import TrainConfig
from gen_jax.errors import ConfigError

# Burda et al. (2015) Table 1, one stochastic layer: test NLL (nats) evaluated with k = 5000, by
# (training objective, number of training samples k).
IWAE_PAPER_NLL: dict[tuple[str, int], float] = {
    ("vae", 1): 86.76, ("vae", 5): 86.47, ("vae", 50): 86.35,
    ("iwae", 1): 86.76, ("iwae", 5): 85.54, ("iwae", 50): 84.78,
}
IWAE_PAPER_EPOCHS = 3280

# Davidson et al. (2018) Table 1: MNIST test log-likelihood (importance-weighted, 500 samples), by latent d.
DAVIDSON_LL: dict[str, dict[int, float]] = {
    "normal": {2: -135.73, 5: -110.21, 10: -93.84, 20: -88.90, 40: -88.93},
    "spherical": {2: -132.50, 5: -108.43, 10: -93.16, 20: -89.02, 40: -90.87},
}

OBJECTIVES = ("vae", "iwae")
LATENT_FAMILIES = ("normal", "spherical")
LR_SCHEDULES = ("constant", "cosine", "iwae_stages")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "mnist"  # offline MNIST (train/valid/test = 50k/10k/10k)
    train_split: str = "train"
    test_split: str = "test"
    test_binarize_seed: int = 1234  # the test set is binarized once with this seed: every model sees the same x


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    schedule: str = "cosine"  # "constant", "cosine" (to lr * final_lr_fraction) or "iwae_stages"
    final_lr_fraction: float = 0.1
    iwae_stages: int = 8  # Burda et al.: stage i has lr 1e-3 * 10^(-i/7) for 3^i epochs (scaled to num_steps)


@dataclasses.dataclass(frozen=True)
class LikelihoodEvalConfig:
    ks: tuple[int, ...] = (1, 5, 50, 5000)  # importance samples for the test log-likelihood
    test_examples: int = 500  # first N test digits (0: the whole 10k test set)
    batch_size: int = 100
    chunk_size: int = 250  # importance samples per lax.scan chunk (memory: batch * chunk decoder outputs)
    grid_size: int = 64


@dataclasses.dataclass(frozen=True)
class GaussianModelConfig:
    hidden: tuple[int, ...] = (200, 200)
    latent_dim: int = 50
    activation: str = "tanh"


@dataclasses.dataclass(frozen=True)
class VAELikelihoodConfig:
    """The IWAE paper's one-stochastic-layer experiment: the same model trained with each objective."""

    data: DataConfig = DataConfig()
    model: GaussianModelConfig = GaussianModelConfig()
    objectives: tuple[str, ...] = OBJECTIVES  # each trains in its own sub-workdir
    vae_samples: int = 1  # k of the VAE objective (ELBO averaged over k draws)
    iwae_samples: int = 5  # k of the IWAE objective L_k
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig(num_steps=5000, batch_size=100, learning_rate=1e-3, grad_clip_norm=None,
                                     ema_decay=None, steps_per_call=10, log_every=500, checkpoint_every=2500)
    eval: LikelihoodEvalConfig = LikelihoodEvalConfig()

    def validate(self) -> None:
        _check_choices("objectives", self.objectives, OBJECTIVES)
        _check_common(self.optim, self.train)
        if self.vae_samples < 1 or self.iwae_samples < 1:
            raise ConfigError("vae_samples and iwae_samples must be >= 1")
        _check_eval(self.eval.ks, self.eval)

    def samples_of(self, objective: str) -> int:
        return self.vae_samples if objective == "vae" else self.iwae_samples


@dataclasses.dataclass(frozen=True)
class VMFEvalConfig:
    importance_samples: int = 500  # Davidson et al.: 500
    test_examples: int = 1000  # first N test digits (0: all 10k)
    batch_size: int = 100
    chunk_size: int = 100
    grid_size: int = 64
    plot_examples: int = 2000  # test digits in the 2-d latent plot


@dataclasses.dataclass(frozen=True)
class VMFVAEConfig:
    """N-VAE vs S-VAE (Davidson et al. 2018) for several latent dimensions, trained alike."""

    data: DataConfig = DataConfig()
    dims: tuple[int, ...] = (2, 5, 10, 20)
    families: tuple[str, ...] = LATENT_FAMILIES  # "normal" (N-VAE) and/or "spherical" (S-VAE)
    # "davidson": the S-VAE in the column "d" lives on S^d in R^(d+1) (their table); "ambient": z in R^d
    dim_convention: str = "davidson"
    hidden: tuple[int, ...] = (256, 128)
    activation: str = "relu"
    kappa: float | None = None  # None: learned kappa = softplus + 1 (Davidson); a number: fixed (Su)
    sampler: str = "wood"  # "wood" (rejection, any kappa) or "table" (Su's inverse CDF; fixed kappa only)
    optim: OptimConfig = OptimConfig(schedule="constant")
    train: TrainConfig = TrainConfig(num_steps=7800, batch_size=64, learning_rate=1e-3, grad_clip_norm=None,
                                     ema_decay=None, steps_per_call=10, log_every=780, checkpoint_every=2600)
    eval: VMFEvalConfig = VMFEvalConfig()

    def validate(self) -> None:
        _check_choices("families", self.families, LATENT_FAMILIES)
        _check_common(self.optim, self.train)
        if self.dim_convention not in ("davidson", "ambient"):
            raise ConfigError(f"dim_convention={self.dim_convention!r}: use 'davidson' or 'ambient'")
        if not self.dims or min(self.dims) < 1:
            raise ConfigError(f"dims={self.dims}: give latent dimensions >= 1")
        if "spherical" in self.families and self.dim_convention == "ambient" and min(self.dims) < 2:
            raise ConfigError("with dim_convention='ambient' the S-VAE needs d >= 2 (z on S^(d-1))")
        if self.sampler not in ("wood", "table"):
            raise ConfigError(f"sampler={self.sampler!r}: use 'wood' or 'table'")
        if self.sampler == "table" and self.kappa is None:
            raise ConfigError("sampler='table' (Su's inverse CDF) needs a fixed kappa; --set kappa=20")
        if self.kappa is not None and not self.kappa > 0:
            raise ConfigError(f"kappa={self.kappa} must be > 0 (or None to learn it)")
        _check_eval((self.eval.importance_samples,), self.eval)

    def ambient_dim(self, d: int) -> int:
        """The S-VAE's ambient dimension for table column d."""
        return d + 1 if self.dim_convention == "davidson" else d


def _check_choices(name: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values or len(set(values)) != len(values):
        raise ConfigError(f"{name}={values}: give distinct values from {allowed}")


def _check_common(optim: OptimConfig, train: TrainConfig) -> None:
    if optim.schedule not in LR_SCHEDULES:
        raise ConfigError(f"optim.schedule={optim.schedule!r}: use one of {LR_SCHEDULES}")
    if not 0 < optim.final_lr_fraction <= 1:
        raise ConfigError("optim.final_lr_fraction must be in (0, 1]")
    if train.num_steps < 1 or train.batch_size < 1:
        raise ConfigError("train.num_steps and train.batch_size must be >= 1")


def _check_eval(ks: tuple[int, ...], ev) -> None:
    if not ks or min(ks) < 1:
        raise ConfigError(f"importance sample counts {ks} must be >= 1")
    if ev.batch_size < 1 or ev.chunk_size < 1 or ev.test_examples < 0:
        raise ConfigError("eval.batch_size and eval.chunk_size must be >= 1 and eval.test_examples >= 0")


# ------------------------------------------------------------------------------------------------ presets
def likelihood_mnist() -> VAELikelihoodConfig:
    """The IWAE paper's 784-200-200-50 tanh VAE trained with the VAE (k=1) and IWAE (k=5) objectives, 10 epochs
    each (batch 100, Adam 1e-3 cosine-decayed to 1e-4); test NLL at K = 1, 5, 50, 5000 on the first 500
    test digits. ~10 min on 2 quiet CPU cores (scaled from a run under ~3x load: VAE 36 steps/s, IWAE
    6.5 steps/s, K = 5000 on 1000 digits 530 s per model). Under load with 15 epochs / 1000 digits the
    VAE reached 107.3 / 105.0 / 103.8 / 103.0 nats at K = 1 / 5 / 50 / 5000 (the paper's 86.76 / 85.54
    for VAE / IWAE took 3280 epochs); expect IWAE below VAE at K = 5000 and every NLL falling with K."""
    return VAELikelihoodConfig()


def likelihood_paper() -> VAELikelihoodConfig:
    """The paper's schedule: batch 20, 3280 epochs in 8 stages (lr 1e-3 * 10^(-i/7) for 3^i epochs), full
    10k test set with K = 5000 (8.2M steps per objective: a GPU/TPU job of hours to days)."""
    return VAELikelihoodConfig(
        optim=OptimConfig(schedule="iwae_stages"),
        train=TrainConfig(num_steps=3280 * 2500, batch_size=20, learning_rate=1e-3, grad_clip_norm=None,
                          ema_decay=None, steps_per_call=50, log_every=25_000, checkpoint_every=250_000),
        eval=LikelihoodEvalConfig(test_examples=0, batch_size=200, chunk_size=500))


def likelihood_tiny() -> VAELikelihoodConfig:
    """Seconds: a small MLP, 20 steps per objective, K = 1 and 10 on 16 test digits (tests, smoke runs)."""
    return VAELikelihoodConfig(
        model=GaussianModelConfig(hidden=(32,), latent_dim=4),
        train=TrainConfig(num_steps=20, batch_size=16, learning_rate=1e-3, grad_clip_norm=None, ema_decay=None,
                          steps_per_call=5, log_every=10, checkpoint_every=10),
        eval=LikelihoodEvalConfig(ks=(1, 10), test_examples=16, batch_size=8, chunk_size=5, grid_size=16))


LIKELIHOOD_PRESETS = {"mnist": likelihood_mnist, "tiny": likelihood_tiny, "paper": likelihood_paper}


def vmf_mnist() -> VMFVAEConfig:
    """N-VAE and S-VAE (learned kappa, rejection sampler) for d = 2, 5, 10, 20: MLP 784-256-128 relu, 10 epochs
    each (batch 64, Adam 1e-3), log-likelihood with 500 importance samples on the first 1000 test digits.
    ~12-15 min on 2 quiet CPU cores (8 models x ~1 min training + compiles); ~3x on a loaded machine.
    Davidson et al. trained to convergence with early stopping, so expect lower likelihoods (by ~5-15 nats)
    with the same shape: large gains from d = 2 to 10, S-VAE ahead at small d."""
    return VMFVAEConfig()


def vmf_su() -> VMFVAEConfig:
    """Su's setting: S-VAE with z on S^7 in R^8, fixed kappa = 20 (KL constant 4.486 nats), inverse-CDF
    sampler, one hidden layer of 256, batch 100, 50 epochs as in his script (25k steps, ~3-4 min on 2 quiet
    CPU cores; --set train.num_steps=5000 for ~1 min)."""
    return VMFVAEConfig(
        dims=(8,), families=("spherical",), dim_convention="ambient", hidden=(256,), kappa=20.0,
        sampler="table",
        train=TrainConfig(num_steps=25_000, batch_size=100, learning_rate=1e-3, grad_clip_norm=None,
                          ema_decay=None, steps_per_call=10, log_every=500, checkpoint_every=5000))


def vmf_tiny() -> VMFVAEConfig:
    """Seconds: d = 2 and 3, a 32-unit MLP, 20 steps per model, 20 importance samples on 16 test digits."""
    return VMFVAEConfig(
        dims=(2, 3), hidden=(32,),
        train=TrainConfig(num_steps=20, batch_size=16, learning_rate=1e-3, grad_clip_norm=None, ema_decay=None,
                          steps_per_call=5, log_every=10, checkpoint_every=10),
        eval=VMFEvalConfig(importance_samples=20, test_examples=16, batch_size=8, chunk_size=10, grid_size=16,
                           plot_examples=64))


VMF_PRESETS = {"mnist": vmf_mnist, "tiny": vmf_tiny, "su": vmf_su}
