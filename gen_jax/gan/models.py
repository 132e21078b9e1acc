"""GAN generators and discriminators (NNX), NHWC images in [-1, 1], at 32x32 (CIFAR) and 28x28 (MNIST).

- DCGAN-style "standard CNN" G/D of SNGAN (Miyato et al., ICLR 2018, arXiv 1802.05957, Table 3), which
  GN-GAN (Wu et al., ICCV 2021) also uses as its CNN architecture.
- SNGAN ResNet G/D for CIFAR (Miyato et al., Table 4; blocks of Gulrajani et al. 2017, WGAN-GP).

Widths are arguments (`width`), so a tiny MNIST GAN trains on CPU. Discriminators have no batch-coupled
layers (needed by gradient normalization and WGAN-GP, whose input gradients are per example), LeakyReLU 0.1
(CNN) or ReLU (ResNet), and optional spectral normalization on every conv/linear layer
(`spectral_norm=True`; advance its power-iteration state with `spectral_norm.update_sn_state`).
Generators normalize with GroupNorm (`norm="group"`, default) or not at all (`norm="none"`) in place of
the papers' BatchNorm: GroupNorm has no running statistics and does not couple examples, so
`nnx.split(G, nnx.Param)` is the generator's whole state and sampling is identical in train and eval.

Discriminators return one logit per example, shape [B]. `as_function(graphdef, *state)` turns a split
module into the `f(params, x)` that `gradient_norm` transforms.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.gan.spectral_norm import SNConv, SNLinear

__all__ = ["DCGANGenerator", "DCGANDiscriminator", "ResNetGenerator", "ResNetDiscriminator",
           "as_function"]


def _base_and_ups(resolution: int) -> tuple[int, int]:
    """resolution = base * 2^ups with base 4 (32, 64, ...) or 7 (28, 56, ...)."""
    for base in (4, 7):
        ups = math.log2(resolution / base) if resolution % base == 0 else -1
        if ups >= 1 and ups == int(ups):
            return base, int(ups)
    raise ConfigError(f"generator resolution {resolution} is not 4*2^n or 7*2^n (n >= 1); use 32 (CIFAR) "
                      "or 28 (MNIST)")


def _groups(channels: int) -> int:
    """The largest divisor of `channels` that is <= 32 (GroupNorm needs an even split)."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


class _Identity(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def _norm(kind: str, channels: int, rngs: nnx.Rngs) -> Callable[[jax.Array], jax.Array]:
    if kind == "group":
        return nnx.GroupNorm(channels, num_groups=_groups(channels), rngs=rngs)
    if kind == "none":
        return _Identity()
    raise ConfigError(f"unknown generator norm {kind!r}; use 'group' or 'none' (BatchNorm is not offered: "
                      "it couples examples and needs running statistics carried outside the params)")


def _conv(cin: int, cout: int, k: int, stride: int, sn: bool, rngs: nnx.Rngs) -> nnx.Module:
    if sn:
        return SNConv(cin, cout, (k, k), strides=(stride, stride), padding="SAME", rngs=rngs)
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding="SAME", rngs=rngs)


def _linear(cin: int, cout: int, sn: bool, rngs: nnx.Rngs) -> nnx.Module:
    return SNLinear(cin, cout, rngs=rngs) if sn else nnx.Linear(cin, cout, rngs=rngs)


def _check_images(x: jax.Array, resolution: int, channels: int) -> None:
    if x.ndim != 4 or x.shape[1:] != (resolution, resolution, channels):
        raise ShapeError(f"discriminator expects NHWC images [B, {resolution}, {resolution}, {channels}], "
                         f"got {x.shape}")


def _check_z(z: jax.Array, z_dim: int) -> None:
    if z.ndim != 2 or z.shape[1] != z_dim:
        raise ShapeError(f"generator expects latents [B, {z_dim}], got {z.shape}")


class DCGANGenerator(nnx.Module):
    """z [B, z_dim] -> Linear to base x base x (width * 2^ups) -> ups x (ConvT 4x4 /2, halve width) ->
    conv 3x3 -> tanh. width=64 at 32x32 is SNGAN's CNN generator (512 channels at 4x4)."""

    def __init__(self, z_dim: int = 128, *, resolution: int = 32, channels: int = 3, width: int = 64,
                 norm: str = "group", rngs: nnx.Rngs):
        self.z_dim, self.resolution, self.channels = z_dim, resolution, channels
        self.base, ups = _base_and_ups(resolution)
        widths = [width * 2 ** (ups - i) for i in range(ups + 1)]
        self.c0 = widths[0]
        self.fc = nnx.Linear(z_dim, self.base * self.base * widths[0], rngs=rngs)
        self.norm0 = _norm(norm, widths[0], rngs)
        self.ups = nnx.List([nnx.ConvTranspose(widths[i], widths[i + 1], (4, 4), (2, 2), padding="SAME",
                                               rngs=rngs) for i in range(ups)])
        self.norms = nnx.List([_norm(norm, widths[i + 1], rngs) for i in range(ups)])
        self.out = nnx.Conv(widths[-1], channels, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, z_BxZ: jax.Array) -> jax.Array:
        _check_z(z_BxZ, self.z_dim)
        h = self.fc(z_BxZ).reshape(z_BxZ.shape[0], self.base, self.base, self.c0)
        h = jax.nn.relu(self.norm0(h))
        for up, norm in zip(self.ups, self.norms):
            h = jax.nn.relu(norm(up(h)))
        return jnp.tanh(self.out(h))


class DCGANDiscriminator(nnx.Module):
    """SNGAN's CNN discriminator: [conv3 (w), conv4/2 (w), conv3 (2w), conv4/2 (2w), conv3 (4w),
    conv4/2 (4w), conv3 (8w)] with LeakyReLU 0.1, then a linear layer to one logit. width=64 as in SNGAN."""

    def __init__(self, *, resolution: int = 32, channels: int = 3, width: int = 64,
                 spectral_norm: bool = False, rngs: nnx.Rngs):
        self.resolution, self.channels = resolution, channels
        spec = [(channels, width, 3, 1), (width, width, 4, 2), (width, 2 * width, 3, 1),
                (2 * width, 2 * width, 4, 2), (2 * width, 4 * width, 3, 1), (4 * width, 4 * width, 4, 2),
                (4 * width, 8 * width, 3, 1)]
        self.convs = nnx.List([_conv(ci, co, k, s, spectral_norm, rngs) for ci, co, k, s in spec])
        final = math.ceil(math.ceil(math.ceil(resolution / 2) / 2) / 2)  # three SAME stride-2 convs
        self.fc = _linear(final * final * 8 * width, 1, spectral_norm, rngs)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        _check_images(x_BxHxWxC, self.resolution, self.channels)
        h = x_BxHxWxC
        for conv in self.convs:
            h = jax.nn.leaky_relu(conv(h), 0.1)
        return self.fc(h.reshape(h.shape[0], -1))[:, 0]


def _upsample(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avgpool(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class _GBlock(nnx.Module):
    """norm-ReLU-up-conv3-norm-ReLU-conv3, plus up-conv1 shortcut."""

    def __init__(self, cin: int, cout: int, norm: str, rngs: nnx.Rngs):
        self.n1, self.n2 = _norm(norm, cin, rngs), _norm(norm, cout, rngs)
        self.c1 = nnx.Conv(cin, cout, (3, 3), padding="SAME", rngs=rngs)
        self.c2 = nnx.Conv(cout, cout, (3, 3), padding="SAME", rngs=rngs)
        self.sc = nnx.Conv(cin, cout, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.c1(_upsample(jax.nn.relu(self.n1(x))))
        h = self.c2(jax.nn.relu(self.n2(h)))
        return h + self.sc(_upsample(x))


class ResNetGenerator(nnx.Module):
    """SNGAN ResNet generator: z -> Linear to base x base x width -> ups up-blocks -> norm-ReLU-conv3-tanh.
    width=256 at 32x32 (three blocks) is SNGAN's CIFAR model; at 28x28 base 7 with two blocks."""

    def __init__(self, z_dim: int = 128, *, resolution: int = 32, channels: int = 3, width: int = 256,
                 norm: str = "group", rngs: nnx.Rngs):
        self.z_dim, self.width = z_dim, width
        self.base, ups = _base_and_ups(resolution)
        self.fc = nnx.Linear(z_dim, self.base * self.base * width, rngs=rngs)
        self.blocks = nnx.List([_GBlock(width, width, norm, rngs) for _ in range(ups)])
        self.norm = _norm(norm, width, rngs)
        self.out = nnx.Conv(width, channels, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, z_BxZ: jax.Array) -> jax.Array:
        _check_z(z_BxZ, self.z_dim)
        h = self.fc(z_BxZ).reshape(z_BxZ.shape[0], self.base, self.base, self.width)
        for block in self.blocks:
            h = block(h)
        return jnp.tanh(self.out(jax.nn.relu(self.norm(h))))


class _DBlock(nnx.Module):
    """(ReLU)-conv3-ReLU-conv3-(avgpool), plus conv1-(avgpool) shortcut when shapes change. The first
    block of D ("optimized") skips the leading ReLU and pools before its shortcut conv."""

    def __init__(self, cin: int, cout: int, down: bool, first: bool, sn: bool, rngs: nnx.Rngs):
        self.down, self.first = down, first
        self.c1 = _conv(cin, cout, 3, 1, sn, rngs)
        self.c2 = _conv(cout, cout, 3, 1, sn, rngs)
        self.sc = _conv(cin, cout, 1, 1, sn, rngs) if (cin != cout or down) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x if self.first else jax.nn.relu(x)
        h = self.c2(jax.nn.relu(self.c1(h)))
        if self.down:
            h = _avgpool(h)
        if self.sc is None:
            return h + x
        s = self.sc(_avgpool(x)) if (self.first and self.down) else self.sc(x)
        if self.down and not self.first:
            s = _avgpool(s)
        return h + s


class ResNetDiscriminator(nnx.Module):
    """SNGAN ResNet discriminator: optimized block (down), block (down), block, block, ReLU, sum over
    space, linear. width=128 as in SNGAN's CIFAR model; 32 -> 16 -> 8 and 28 -> 14 -> 7 work alike."""

    def __init__(self, *, resolution: int = 32, channels: int = 3, width: int = 128,
                 spectral_norm: bool = False, rngs: nnx.Rngs):
        if resolution % 4:
            raise ConfigError(f"ResNet discriminator resolution must be divisible by 4, got {resolution}")
        self.resolution, self.channels = resolution, channels
        sn = spectral_norm
        self.blocks = nnx.List([_DBlock(channels, width, True, True, sn, rngs),
                                _DBlock(width, width, True, False, sn, rngs),
                                _DBlock(width, width, False, False, sn, rngs),
                                _DBlock(width, width, False, False, sn, rngs)])
        self.fc = _linear(width, 1, sn, rngs)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        _check_images(x_BxHxWxC, self.resolution, self.channels)
        h = x_BxHxWxC
        for block in self.blocks:
            h = block(h)
        h = jnp.sum(jax.nn.relu(h), axis=(1, 2))
        return self.fc(h)[:, 0]


def as_function(graphdef: Any, *state: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """f(params, x) = nnx.merge(graphdef, params, *state)(x): a split module as a pure function.

    `state` is any non-Param state split off together with the params (e.g. spectral-norm u vectors),
    held fixed inside f (advance it outside the loss with `update_sn_state`).
    """

    def f(params: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params, *state)(x)

    return f
