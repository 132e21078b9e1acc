"""PNG output: image grids and training curves, written atomically with Pillow.

Images inside models are float NHWC in [-1, 1]; datasets hand out uint8. `to_uint8` maps the former onto the
latter exactly as a dataset would quantize (round half up, clip), so grids, FID and bits/dim all see the
same 0..255 values. Files are written to a temporary file in the target directory and moved into place with
`os.replace`, so a reader never sees a half-written PNG.
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gen_jax.errors import ShapeError

__all__ = ["to_uint8", "image_grid", "save_image_grid", "save_curve_png"]

_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Map float images in `value_range` to uint8 0..255 (round half up, clip); uint8 passes through."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)
            or images.dtype == np.bool_):
        raise ShapeError(f"images have dtype {images.dtype}; pass float images in value_range={value_range} "
                         "or uint8 images")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ShapeError(f"value_range={value_range} must be (low, high) with high > low, e.g. (-1, 1)")
    scaled = (images.astype(np.float64) - lo) / (hi - lo) * 255.0
    scaled = np.nan_to_num(scaled, nan=0.0)
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:  # N x H x W grayscale
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] == 0:
        raise ShapeError(f"images have shape {images.shape}; expected a non-empty batch N x H x W x C with "
                         "C in (1, 3, 4) (NHWC), or N x H x W for grayscale")
    return images


def image_grid(images: np.ndarray, *, nrow: int | None = None, padding: int = 2,
               value_range: tuple[float, float] = (-1.0, 1.0), pad_value: int = 0) -> np.ndarray:
    """Tile a batch N x H x W x C (or N x H x W) into one uint8 image of shape H' x W' x C.

    `nrow` is the number of images per row (default ceil(sqrt(N))); image i sits at row i // nrow, column
    i % nrow, with `padding` pixels of `pad_value` around and between the tiles. Float input is mapped from
    `value_range` to 0..255; uint8 input is used as is.
    """
    images_NxHxWxC = to_uint8(_as_nhwc(images), value_range)
    n, h, w, c = images_NxHxWxC.shape
    if padding < 0:
        raise ShapeError(f"padding={padding} must be >= 0")
    ncol = int(nrow) if nrow is not None else math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ShapeError(f"nrow={nrow} must be >= 1 (images per row)")
    ncol = min(ncol, n)
    nrows = math.ceil(n / ncol)
    grid = np.full((padding + nrows * (h + padding), padding + ncol * (w + padding), c), pad_value, np.uint8)
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top:top + h, left:left + w] = images_NxHxWxC[i]
    return grid


def _atomic_save(path: str, image: Image.Image) -> str:
    from gen_jax.data.assets import atomic_write
    return os.fspath(atomic_write(path, lambda tmp: image.save(tmp, format="PNG")))


def save_image_grid(path: str, images: np.ndarray, *, nrow: int | None = None, padding: int = 2,
                    value_range: tuple[float, float] = (-1.0, 1.0), pad_value: int = 0) -> str:
    """Write `image_grid(images, ...)` as a PNG at `path` (atomically); returns the path."""
    grid_HxWxC = image_grid(images, nrow=nrow, padding=padding, value_range=value_range, pad_value=pad_value)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[grid_HxWxC.shape[-1]]
    pixels = grid_HxWxC[..., 0] if mode == "L" else grid_HxWxC
    return _atomic_save(path, Image.fromarray(pixels, mode=mode))


def _nice_ticks(lo: float, hi: float, count: int = 6, min_step: float = 0.0) -> list[float]:
    """About `count` round tick values (1, 2, 5 x 10^k steps, at least `min_step`) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = max((hi - lo) / max(count, 1), min_step)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def save_curve_png(path: str, xs: Sequence[float] | Mapping[str, Sequence[float]],
                   ys_by_name: Mapping[str, Sequence[float]], title: str = "", xlabel: str = "",
                   ylabel: str = "", *, size: tuple[int, int] = (720, 450), log_y: bool = False) -> str:
    """Draw one or more curves y(x) as a line plot PNG (Pillow only; no matplotlib needed).

    `xs` is shared by all curves, or a mapping name -> xs when curves were logged at different steps.
    Non-finite points are skipped (a NaN never breaks the plot); with `log_y` non-positive ones too.
    Returns the path.
    """
    if not ys_by_name:
        raise ShapeError("ys_by_name is empty; pass at least one curve as {name: ys}")
    curves = {}
    for name, ys in ys_by_name.items():
        x = np.asarray(xs[name] if isinstance(xs, Mapping) else xs, np.float64).reshape(-1)
        y = np.asarray(ys, np.float64).reshape(-1)
        if x.shape != y.shape:
            raise ShapeError(f"curve {name!r} has {y.size} y values but {x.size} x values; they must match")
        keep = np.isfinite(x) & np.isfinite(y) & ((y > 0) if log_y else True)
        curves[name] = (x[keep], np.log10(y[keep]) if log_y else y[keep])

    width, height = size
    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, 20, 30 if title else 12, 45
    plot_w, plot_h = width - left - right, height - top - bottom
    all_x = np.concatenate([c[0] for c in curves.values()])
    all_y = np.concatenate([c[1] for c in curves.values()])
    if all_x.size:
        x_lo, x_hi, y_lo, y_hi = all_x.min(), all_x.max(), all_y.min(), all_y.max()
    else:
        x_lo, x_hi, y_lo, y_hi = 0.0, 1.0, 0.0, 1.0
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    y_pad = 0.04 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - y_pad, y_hi + y_pad

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * plot_w, top + (y_hi - y) / (y_hi - y_lo) * plot_h)

    # Axes, ticks with light grid lines, labels.
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for tx in _nice_ticks(x_lo, x_hi):
        px = to_px(tx, y_lo)[0]
        draw.line([px, top, px, top + plot_h], fill=(225, 225, 225))
        draw.line([px, top + plot_h, px, top + plot_h + 4], fill="black")
        draw.text((px, top + plot_h + 6), _fmt(tx), fill="black", font=font, anchor="ma")
    # On a log axis, whole decades once the range spans one.
    for ty in _nice_ticks(y_lo, y_hi, min_step=1.0 if log_y and y_hi - y_lo >= 2 else 0.0):
        py = to_px(x_lo, ty)[1]
        draw.line([left, py, left + plot_w, py], fill=(225, 225, 225))
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((left - 6, py), _fmt(10.0 ** ty if log_y else ty), fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    if title:
        draw.text((left + plot_w / 2, 8), title, fill="black", font=font, anchor="ma")
    if xlabel:
        draw.text((left + plot_w / 2, height - 14), xlabel, fill="black", font=font, anchor="ma")
    if ylabel or log_y:
        draw.text((4, 4 if not title else 18), ylabel + (" (log)" if log_y else ""), fill="black", font=font)

    for i, (name, (x, y)) in enumerate(curves.items()):
        color = _PALETTE[i % len(_PALETTE)]
        points = [to_px(a, b) for a, b in zip(x, y)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        elif points:
            px, py = points[0]
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        # Legend, top right inside the plot.
        ly = top + 6 + 14 * i
        lx = left + plot_w - 150
        draw.line([lx, ly + 5, lx + 20, ly + 5], fill=color, width=2)
        draw.text((lx + 26, ly), str(name), fill="black", font=font)
    return _atomic_save(path, image)
