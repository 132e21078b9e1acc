"""A drop-in `lax.conv_general_dilated` whose kernel gradient is computed as shifted matrix products on CPU.

XLA:CPU runs the kernel-gradient ("backward filter") convolution of a 3x3 conv at a third of the speed of
the forward one (measured on the development CPU, NHWC, 28x28x64 -> 64, batch 32: forward 74 GFLOP/s, input
gradient 67, kernel gradient 23). For a k_h x k_w kernel the kernel gradient is k_h k_w ordinary matrix
products, dW[i, j] = X_ij^T G with X_ij the padded input shifted by (i, j) (and strided) as a [B H' W', C]
matrix and G the output gradient [B H' W', O]; XLA runs those at 39-58 GFLOP/s where they pay (wide enough
layers: `shifted_kernel_grad_pays`; narrower ones are plain `lax.conv_general_dilated`). The forward pass and
the input gradient stay XLA's convolutions. On other platforms (GPU, TPU) the kernel gradient is XLA's own
(`lax.platform_dependent`), so the function is safe to use everywhere.

Where `gen_jax.nn.cpu_blas` is enabled (float32 on a single CPU device with MKL installed), the convolution
is stride 1 with "SAME" padding and an odd square kernel, and it pays (`blas_kernel_grad_pays`), the kernel
gradient is instead one custom call: im2col tiles of the input times the output gradient in MKL's sgemm
(32x32 128->128, batch 8, one core of an AVX-512 Xeon: XLA's backward-filter convolution 31 GFLOP/s, the call 137);
and where it pays (`blas_conv_pays`: 128 or more channels, or at most 16 inputs) the forward convolution and
the input gradient are `cpu_blas.conv2d_same` (im2col tiles times the kernel in MKL, or a direct kernel for the
narrow layers XLA:CPU runs slowest: 124-136 -> 138-152 GFLOP/s, 28x28 16->16 50 -> 91).

A 1x1 stride-1 unpadded convolution there is one `cpu_blas.matmul` of the [B H W, C] input (XLA:CPU ran its
kernel gradient at ~10 GFLOP/s, B8 32x32 384->128), and the input gradient's flipped, transposed kernel is
`cpu_blas.flipped_transposed_kernel` (XLA's transpose of 256x256 planes was slow).

Use it through flax: `nnx.Conv(..., conv_general_dilated=gen_jax.nn.conv_general_dilated)`. Cases other
than 2-D NHWC/HWIO convolutions without dilation or groups fall back to `lax.conv_general_dilated` entirely.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from gen_jax.nn import cpu_blas

__all__ = ["conv_general_dilated"]

_DN = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
    if ndim != 4:
        return False
    if dimension_numbers is None:
        return False  # lax's default is NCHW
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == tuple(lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _DN))
    return tuple(dimension_numbers) == _DN


def _plain_conv(x, w, strides, pads, precision, preferred):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN, precision=precision,
                                    preferred_element_type=preferred)


def _forward(x, w, strides, pads, precision, preferred):
    if _blas_conv_applies(x, w, strides, pads, preferred):
        return cpu_blas.conv2d_same(x, w)
    return _plain_conv(x, w, strides, pads, precision, preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, precision, preferred):
    return _forward(x, w, strides, pads, precision, preferred)


def _conv_fwd(x, w, strides, pads, precision, preferred):
    return _forward(x, w, strides, pads, precision, preferred), (x, w)


def _kernel_grad_shifted(x, g, w_shape, strides, pads):
    kh, kw, c, o = w_shape
    sh, sw = strides
    _, ho, wo, _ = g.shape
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    g_mat = g.reshape(-1, o)
    rows = []
    for i in range(kh):
        for j in range(kw):
            xs = lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                           (1, sh, sw, 1))
            rows.append(jnp.dot(xs.reshape(-1, c).T, g_mat, preferred_element_type=jnp.float32))
    return jnp.stack(rows).reshape(kh, kw, c, o)


def shifted_kernel_grad_pays(w_shape, out_spatial) -> bool:
    """Where the shifted products beat XLA:CPU's backward-filter conv on the development CPU (kernel-gradient
    GFLOP/s, XLA -> shifted, batch 32 unless noted): 28x28 64->64: 23 -> 39; 32x32 128->128 (batch 8):
    24 -> 56; 14x14 128->128: 41 -> 58; but 14x14 64->64: 41 -> 44, 28x28 32->32: 30 -> 28, 7x7 64->64:
    61 -> 47, and 1x1 kernels are a single product either way. So: kernels larger than 1x1, at least 64
    input and output channels, and at least 16x16 output positions."""
    kh, kw, c, o = w_shape
    return kh * kw > 1 and min(c, o) >= 64 and out_spatial[0] * out_spatial[1] >= 256


def blas_kernel_grad_pays(w_shape, out_spatial) -> bool:
    """Where the MKL kernel gradient (im2col tiles, `cpu_blas.conv_kernel_grad`) beat XLA:CPU's backward-filter
    conv (3x3, one core of the AVX-512 Xeon, XLA -> MKL GFLOP/s): batch 32: 28x28 32->32 37 -> 104, 14x14
    64->64 74 -> 123; batch 8: 32x32 128->128 31 -> 137, 16x16 256->256 88 -> 139, 128->256 98 -> 133, 8x8
    256->256 115 -> 132. Not at 4x4 (256->256 111 -> 106) nor for 16 channels (28x28 16->16 56 -> 52). So: at
    least 32 input and output channels and 8x8 outputs."""
    kh, kw, c, o = w_shape
    return kh * kw > 1 and min(c, o) >= 32 and out_spatial[0] * out_spatial[1] >= 64


def blas_conv_pays(w_shape) -> bool:
    """Where `cpu_blas.conv2d_same` beat XLA:CPU's convolution (3x3, one core of the AVX-512 Xeon, XLA -> ours
    GFLOP/s). Tiled im2col in MKL, batch 8: 32x32 128->128 124-129 -> 140-147, 128->256 117-129 -> 138-142;
    16x16 256->256 124-131 -> 143-149; 8x8 256->256 130-136 -> 133-152; 4x4 256->256 107 -> 140; but not below
    128 channels (batch 32: 14x14 64->64 124-131 -> 113-129, 32->32 129 -> 108). The direct kernel, batch 64:
    28x28 16->16 50 -> 91, 1->16 6 -> 43 (`cpu_blas.direct_conv_fits`); equal from 32 input channels on."""
    kh, kw, c, o = w_shape
    return kh * kw > 1 and (min(c, o) >= 128 or cpu_blas.direct_conv_fits(c, o))


def _same_odd_square(w, strides, pads) -> bool:
    kh, kw = w.shape[:2]
    return (kh == kw and kh % 2 == 1 and tuple(strides) == (1, 1)
            and tuple(pads) == ((kh // 2, kh // 2), (kh // 2, kh // 2)))


def _blas_conv_applies(x, w, strides, pads, preferred, *, input_grad: bool = False) -> bool:
    """Whether conv2d_same runs this layer's forward (or, `input_grad`, its input gradient: the conv with C and
    O swapped)."""
    kh, kw, c, o = w.shape
    return (_same_odd_square(w, strides, pads) and preferred in (None, jnp.float32)
            and blas_conv_pays((kh, kw, o, c) if input_grad else (kh, kw, c, o)) and cpu_blas.enabled(x, w))


def _blas_kernel_grad_applies(x, w, strides, pads) -> bool:
    return (_same_odd_square(w, strides, pads) and blas_kernel_grad_pays(w.shape, x.shape[1:3])
            and cpu_blas.enabled(x, w))


def _cpu_grads(x, w, g, strides, pads, precision, preferred):
    if _blas_conv_applies(x, w, strides, pads, preferred, input_grad=True):
        # dx = the SAME conv of g with the flipped kernel, C and O swapped
        dx = cpu_blas.conv2d_same(g.astype(x.dtype), cpu_blas.flipped_transposed_kernel(w))
    else:
        (dx,) = jax.vjp(lambda x_: _plain_conv(x_, w, strides, pads, precision, preferred), x)[1](g)
    if _blas_kernel_grad_applies(x, w, strides, pads):
        return dx, cpu_blas.conv_kernel_grad(x, g.astype(x.dtype), w.shape[0])
    if shifted_kernel_grad_pays(w.shape, g.shape[1:3]):
        return dx, _kernel_grad_shifted(x, g.astype(x.dtype), w.shape, strides, pads)
    # a layer routed here for its forward only (a narrow one): XLA's backward-filter convolution
    (dw,) = jax.vjp(lambda w_: _plain_conv(x, w_, strides, pads, precision, preferred), w)[1](g)
    return dx, dw


def _xla_grads(x, w, g, strides, pads, precision, preferred):
    return jax.vjp(lambda x_, w_: _plain_conv(x_, w_, strides, pads, precision, preferred), x, w)[1](g)


def _conv_bwd(strides, pads, precision, preferred, res, g):
    x, w = res
    args = (strides, pads, precision, preferred)
    dx, dw = lax.platform_dependent(x, w, g, cpu=lambda *a: _cpu_grads(*a, *args),
                                    default=lambda *a: _xla_grads(*a, *args))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1, precision=None,
                         preferred_element_type=None, out_sharding=None) -> jax.Array:
    """`lax.conv_general_dilated` with the same arguments and results; 2-D NHWC/HWIO convolutions without
    dilation or feature groups get the CPU kernel gradient described in the module docstring."""
    simple = (_is_nhwc(dimension_numbers, lhs.ndim) and feature_group_count == 1 and batch_group_count == 1
              and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
              and out_sharding is None)
    if not simple:
        kw = {} if out_sharding is None else {"out_sharding": out_sharding}
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type, **kw)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = tuple(lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    out_spatial = tuple((n + lo + hi - k) // s + 1
                        for n, (lo, hi), k, s in zip(lhs.shape[1:3], pads, rhs.shape[:2], strides))
    if (rhs.shape[:2] == (1, 1) and strides == (1, 1) and all(p == 0 for pair in pads for p in pair)
            and preferred_element_type in (None, jnp.float32) and cpu_blas.enabled(lhs, rhs)):
        # a 1x1 conv is one product; XLA:CPU ran its kernel gradient at ~10 GFLOP/s (B8 32x32 384->128)
        b, h, w_, c = lhs.shape
        y = cpu_blas.matmul(lhs.reshape(b * h * w_, c), rhs.reshape(c, rhs.shape[3]))
        return y.reshape(b, h, w_, rhs.shape[3])
    if any(p < 0 for pair in pads for p in pair) or not (
            shifted_kernel_grad_pays(rhs.shape, out_spatial) or _blas_kernel_grad_applies(lhs, rhs, strides, pads)
            or _blas_conv_applies(lhs, rhs, strides, pads, preferred_element_type)
            or _blas_conv_applies(lhs, rhs, strides, pads, preferred_element_type, input_grad=True)):
        # cropping, or a layer too narrow for the shifted products to pay: XLA's own gradient
        return lax.conv_general_dilated(lhs, rhs, strides, pads, dimension_numbers=dimension_numbers,
                                        precision=precision, preferred_element_type=preferred_element_type)
    return _conv(lhs, rhs, strides, pads, precision, preferred_element_type)
