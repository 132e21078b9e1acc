"""The DDPM U-Net (Ho et al. 2020, arXiv 2006.11239, sec. 4 and Appendix B), a PixelCNN++-style U-Net
(Salimans et al. 2017) with a Wide-ResNet backbone, GroupNorm, sinusoidal time embedding (Transformer
positional encoding, Vaswani et al. 2017 sec. 3.5) and single-head self-attention at chosen resolutions.

Layout (`ch`, `ch_mult`, `num_res_blocks`, `attn_resolutions`):
    conv_in 3x3 -> for each level i: num_res_blocks ResBlocks (ch * ch_mult[i] channels, + attention when
    the level's resolution is in attn_resolutions), then a stride-2 3x3 conv (except the last level)
    -> middle: ResBlock, attention, ResBlock
    -> for each level in reverse: num_res_blocks + 1 ResBlocks, each on concat(h, skip), (+ attention),
    then nearest 2x upsampling + 3x3 conv (except level 0)
    -> GroupNorm, SiLU, conv_out 3x3 (zero-initialized, so the untrained model predicts eps = 0).
ResBlock: GN, SiLU, conv3x3, + Dense(SiLU(temb)), GN, SiLU, dropout, conv3x3 (zero-init), + skip (1x1 if
the width changes). Attention: GN, q/k/v 1x1, softmax(q k^T / sqrt(C)) v, 1x1 out (zero-init), + x.
The CIFAR-10 configuration (ch=128, ch_mult=(1,2,2,2), num_res_blocks=2, attn_resolutions=(16,),
dropout=0.1) has 35,746,307 parameters, the paper's "35.7M".

Odd sizes: each downsampling is a SAME-padded stride-2 conv, so a side of n becomes ceil(n/2)
(28 -> 14 -> 7 -> 4), and each upsampling doubles then crops to the matching skip's size (4 -> 8 -> 7),
so any H, W works without padding the data. `resolution` is the input side; level i runs at
`resolution` halved (rounding up) i times, which is what attn_resolutions is matched against. For MNIST
the presets use ch_mult=(1, 2, 2) (28, 14, 7) with attention at 7.

Precision: parameters are stored in `param_dtype`; convolutions and dense layers compute in `dtype`
(e.g. bfloat16); GroupNorm statistics, the time embedding's sinusoids and the attention softmax are float32.
The output is float32.

Use at a pure boundary (the training step's recipe). The model holds only nnx.Param state; dropout takes
its key at call time, so nothing but parameters needs to be split or carried:

    model = UNet(in_channels=1, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(7,), resolution=28,
                 num_groups=8, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def loss_fn(params, x0_BxHxWxC, rng):
        model = nnx.merge(graphdef, params)
        loss_rng, dropout_rng = jax.random.split(rng)
        model_fn = lambda x_t, t: model(x_t, t, deterministic=False, rngs=dropout_rng)
        return diffusion_loss(schedule, model_fn, x0_BxHxWxC, loss_rng).mean()

    eps_fn = lambda x_t, t: nnx.merge(graphdef, ema_params)(x_t, t, deterministic=True)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.nn import cpu_blas
from gen_jax.nn.conv import conv_general_dilated
from gen_jax.nn.dense import flat_dot_general


def _Conv(*args, **kwargs) -> nnx.Conv:
    # XLA:CPU's backward-filter convolution is slow; gen_jax.nn.conv computes that gradient as shifted matmuls
    # on CPU (elsewhere XLA's own), with the same parameters and results
    return nnx.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)


def _Linear(*args, **kwargs) -> nnx.Linear:
    # [B, H, W, C] inputs (attention's qkv) as one 2-D product: no transposed copies in the kernel gradient
    return nnx.Linear(*args, dot_general=flat_dot_general, **kwargs)


_default_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_zero_init = nnx.initializers.zeros_init()


def timestep_embedding(t_B: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] of (0-based) timesteps: [sin(t w_i), cos(t w_i)],
    w_i = max_period^(-i / (dim/2 - 1)), i = 0..dim/2-1, float32 (the original DDPM code's layout)."""
    if dim % 2 or dim < 4:
        raise ConfigError(f"time embedding size {dim} must be even and >= 4; use an even `ch`")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = t_B.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class _Norm(nnx.Module):
    """GroupNorm with float32 statistics; returns the compute dtype."""

    def __init__(self, channels: int, num_groups: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        if channels % num_groups:
            raise ConfigError(f"GroupNorm: {channels} channels are not divisible into {num_groups} groups; "
                              "choose num_groups dividing ch * every ch_mult")
        self.norm = nnx.GroupNorm(channels, num_groups=num_groups, epsilon=1e-6, dtype=jnp.float32,
                                  param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array, silu: bool = False) -> jax.Array:
        """GroupNorm, then SiLU if `silu`: on one CPU device a fused custom call each way (cpu_blas.group_norm;
        XLA:CPU's GroupNorm of narrow layers makes several passes), else flax's GroupNorm."""
        x = x.astype(jnp.float32)
        scale, bias = self.norm.scale, self.norm.bias  # both present: built with use_scale, use_bias
        if scale is not None and bias is not None and x.shape[-1] % 16 == 0 and cpu_blas.enabled(x):
            y = cpu_blas.group_norm(x, scale[...], bias[...], self.norm.num_groups, self.norm.epsilon, silu=silu)
        else:
            y = self.norm(x)
            y = nnx.silu(y) if silu else y
        return y.astype(self.dtype)


class ResBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, *, dropout: float, num_groups: int,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _Norm(in_ch, num_groups, dtype, param_dtype, rngs)
        self.conv1 = _Conv(in_ch, out_ch, (3, 3), kernel_init=_default_init, **kw)
        self.temb_proj = _Linear(temb_ch, out_ch, kernel_init=_default_init, **kw)
        self.norm2 = _Norm(out_ch, num_groups, dtype, param_dtype, rngs)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = _Conv(out_ch, out_ch, (3, 3), kernel_init=_zero_init, **kw)
        self.skip = (_Conv(in_ch, out_ch, (1, 1), kernel_init=_default_init, **kw)
                     if in_ch != out_ch else None)

    def __call__(self, x: jax.Array, temb: jax.Array, deterministic: bool, rng: jax.Array | None) -> jax.Array:
        h = self.conv1(self.norm1(x, silu=True))
        h = h + self.temb_proj(nnx.silu(temb))[:, None, None, :]
        h = self.norm2(h, silu=True)
        h = self.dropout(h, deterministic=deterministic, rngs=rng)
        h = self.conv2(h)
        return (self.skip(x) if self.skip is not None else x) + h


class AttnBlock(nnx.Module):
    def __init__(self, ch: int, *, num_groups: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = _Norm(ch, num_groups, dtype, param_dtype, rngs)
        self.qkv = _Linear(ch, 3 * ch, kernel_init=_default_init, **kw)
        self.proj_out = _Linear(ch, ch, kernel_init=_zero_init, **kw)
        self.dtype = dtype

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        B, H, W, C = x_BxHxWxC.shape
        qkv = self.qkv(self.norm(x_BxHxWxC)).reshape(B, H * W, 3, C)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits_BxQxK = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * C**-0.5
        w = jax.nn.softmax(logits_BxQxK, axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", w, v).reshape(B, H, W, C)
        return x_BxHxWxC + self.proj_out(h)


class UNet(nnx.Module):
    """eps_theta(x_t, t): x [B, H, W, in_channels] in [-1, 1] scale, t int [B] -> [B, H, W, out_channels]."""

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, resolution: int = 32,
                 num_groups: int = 32, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
                 rngs: nnx.Rngs):
        if num_res_blocks < 1 or not ch_mult:
            raise ConfigError("the U-Net needs num_res_blocks >= 1 and at least one ch_mult level")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout} must be in [0, 1)")
        bad = [ch * m for m in ch_mult if (ch * m) % num_groups]
        if ch % num_groups or bad:
            raise ConfigError(f"GroupNorm: widths {[ch] + bad} are not divisible into {num_groups} groups; "
                              "choose num_groups dividing ch * every ch_mult")
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels, self.ch = in_channels, out_channels, ch
        self.resolution, self.dtype = resolution, dtype
        self.num_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        temb_ch = 4 * ch
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        blk = dict(dropout=dropout, num_groups=num_groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attn_kw = dict(num_groups=num_groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.temb_dense0 = _Linear(ch, temb_ch, kernel_init=_default_init, **kw)
        self.temb_dense1 = _Linear(temb_ch, temb_ch, kernel_init=_default_init, **kw)
        self.conv_in = _Conv(in_channels, ch, (3, 3), kernel_init=_default_init, **kw)

        # Down path; skip_chs records the width of every activation pushed on the skip stack.
        res, cur, skip_chs = resolution, ch, [ch]
        down_blocks, down_attn, downsample = [], [], []
        for level, mult in enumerate(ch_mult):
            out = ch * mult
            for _ in range(num_res_blocks):
                down_blocks.append(ResBlock(cur, out, temb_ch, **blk))
                down_attn.append(AttnBlock(out, **attn_kw) if res in attn_resolutions else None)
                cur = out
                skip_chs.append(cur)
            if level != len(ch_mult) - 1:
                downsample.append(_Conv(cur, cur, (3, 3), strides=(2, 2), padding="SAME",
                                           kernel_init=_default_init, **kw))
                skip_chs.append(cur)
                res = (res + 1) // 2
        self.down_blocks, self.down_attn, self.downsample = (nnx.List(down_blocks), nnx.List(down_attn),
                                                             nnx.List(downsample))

        self.mid_block1 = ResBlock(cur, cur, temb_ch, **blk)
        self.mid_attn = AttnBlock(cur, **attn_kw)
        self.mid_block2 = ResBlock(cur, cur, temb_ch, **blk)

        # Up path, deepest level first.
        level_res = [resolution]
        for _ in range(len(ch_mult) - 1):
            level_res.append((level_res[-1] + 1) // 2)
        up_blocks, up_attn, upsample = [], [], []
        for level in reversed(range(len(ch_mult))):
            out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                up_blocks.append(ResBlock(cur + skip_chs.pop(), out, temb_ch, **blk))
                up_attn.append(AttnBlock(out, **attn_kw) if level_res[level] in attn_resolutions else None)
                cur = out
            if level != 0:
                upsample.append(_Conv(cur, cur, (3, 3), kernel_init=_default_init, **kw))
        self.up_blocks, self.up_attn, self.upsample = nnx.List(up_blocks), nnx.List(up_attn), nnx.List(upsample)

        self.norm_out = _Norm(cur, num_groups, dtype, param_dtype, rngs)
        self.conv_out = _Conv(cur, out_channels, (3, 3), kernel_init=_zero_init, **kw)

    def __call__(self, x_BxHxWxC: jax.Array, t_B: jax.Array, *, deterministic: bool,
                 rngs: jax.Array | nnx.Rngs | None = None) -> jax.Array:
        """deterministic=False applies dropout with `rngs` (a PRNG key, or nnx.Rngs with a `dropout` stream)."""
        x = x_BxHxWxC
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ShapeError(f"UNet expects NHWC images with {self.in_channels} channels, got shape {x.shape}")
        if x.shape[1] != self.resolution or x.shape[2] != self.resolution:
            raise ShapeError(f"UNet was built for {self.resolution}x{self.resolution} inputs (attention placement "
                             f"depends on it), got {x.shape[1]}x{x.shape[2]}; set resolution to the image size")
        if t_B.shape != (x.shape[0],):
            raise ShapeError(f"timesteps must have shape [B]=[{x.shape[0]}], got {t_B.shape}")
        n_blocks = len(self.down_blocks) + len(self.up_blocks) + 2
        if deterministic:
            keys = [None] * n_blocks
        else:
            if rngs is None:
                raise ConfigError("UNet(deterministic=False) needs a dropout key: pass rngs=jax.random.key(...)")
            key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
            keys = list(jax.random.split(key, n_blocks))

        temb = timestep_embedding(t_B, self.ch).astype(self.dtype)
        temb = self.temb_dense1(nnx.silu(self.temb_dense0(temb)))

        h = self.conv_in(x.astype(self.dtype))
        hs = [h]
        i = 0
        for level in range(self.num_levels):
            for _ in range(self.num_res_blocks):
                h = self.down_blocks[i](h, temb, deterministic, keys[i])
                attn = self.down_attn[i]  # None at resolutions without self-attention
                if attn is not None:
                    h = attn(h)
                hs.append(h)
                i += 1
            if level != self.num_levels - 1:
                h = self.downsample[level](h)
                hs.append(h)

        h = self.mid_block1(h, temb, deterministic, keys[i])
        h = self.mid_attn(h)
        h = self.mid_block2(h, temb, deterministic, keys[i + 1])
        i += 2

        j = 0
        for n_up, level in enumerate(reversed(range(self.num_levels))):
            for _ in range(self.num_res_blocks + 1):
                h = self.up_blocks[j](jnp.concatenate([h, hs.pop()], axis=-1), temb, deterministic, keys[i + j])
                attn = self.up_attn[j]
                if attn is not None:
                    h = attn(h)
                j += 1
            if level != 0:
                target_h, target_w = hs[-1].shape[1:3]
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)[:, :target_h, :target_w]
                h = self.upsample[n_up](h)

        h = self.conv_out(self.norm_out(h, silu=True))
        return h.astype(jnp.float32)


def count_params(model_or_state: Any) -> int:
    """Number of parameters (works on a module, an nnx.State, or the abstract output of nnx.eval_shape)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))
