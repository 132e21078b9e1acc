"""Image grids and curve PNGs: layout, quantization, atomic PNG round trip."""
import os

import numpy as np
import pytest
from PIL import Image

from gen_jax.errors import ShapeError
from gen_jax.images import image_grid, save_curve_png, save_image_grid, to_uint8


def test_to_uint8_maps_value_range_endpoints_and_rounds_half_up():
    x = np.array([-1.0, -0.5, 0.0, 1.0, 2.0, -3.0])
    # (x + 1) / 2 * 255 = 0, 63.75, 127.5, 255 -> floor(v + 0.5), then clipped to 0..255
    np.testing.assert_array_equal(to_uint8(x), [0, 64, 128, 255, 255, 0])
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 0.5, 1.0]), (0, 1)), [0, 128, 255])
    u = np.arange(256, dtype=np.uint8)
    assert to_uint8(u) is u or np.array_equal(to_uint8(u), u)


def test_to_uint8_inverts_the_dataset_scaling_exactly():
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(u.astype(np.float32) / 127.5 - 1.0), u)


def test_grid_places_image_i_at_row_i_div_nrow_and_column_i_mod_nrow():
    rng = np.random.default_rng(0)
    imgs = rng.integers(1, 256, (7, 5, 4, 3), dtype=np.uint8)
    pad, nrow = 2, 3
    grid = image_grid(imgs, nrow=nrow, padding=pad, pad_value=0)
    assert grid.shape == (pad + 3 * (5 + pad), pad + 3 * (4 + pad), 3) and grid.dtype == np.uint8
    covered = np.zeros(grid.shape[:2], bool)
    for i in range(7):
        r, c = divmod(i, nrow)
        top, left = pad + r * (5 + pad), pad + c * (4 + pad)
        np.testing.assert_array_equal(grid[top:top + 5, left:left + 4], imgs[i])
        covered[top:top + 5, left:left + 4] = True
    assert np.all(grid[~covered] == 0)  # padding and the two empty slots of the last row


def test_grid_default_is_square_and_accepts_grayscale_without_channel_axis():
    grid = image_grid(np.zeros((16, 6, 6), np.float32), padding=1)
    assert grid.shape == (1 + 4 * 7, 1 + 4 * 7, 1)
    assert np.all(grid[1:7, 1:7] == 128)  # 0.0 in [-1, 1] is mid-grey


def test_save_image_grid_writes_a_png_that_reads_back_identical(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.uniform(-1, 1, (10, 8, 8, 1)).astype(np.float32)
    path = save_image_grid(str(tmp_path / "sub" / "grid.png"), imgs, nrow=5)
    back = np.asarray(Image.open(path))
    np.testing.assert_array_equal(back, image_grid(imgs, nrow=5)[..., 0])
    assert [f for f in os.listdir(tmp_path / "sub")] == ["grid.png"]  # no temp file left behind
    rgb = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(save_image_grid(path, rgb))), image_grid(rgb))


def test_bad_images_raise_shape_errors():
    with pytest.raises(ShapeError, match="NHWC"):
        image_grid(np.zeros((2, 3, 8, 8, 1)))
    with pytest.raises(ShapeError, match="nrow"):
        image_grid(np.zeros((2, 8, 8, 1)), nrow=0)


def test_curve_png_is_written_and_draws_each_curve_in_its_own_colour(tmp_path):
    xs = np.arange(50)
    path = save_curve_png(str(tmp_path / "curve.png"), xs, {"train": np.exp(-xs / 10), "eval": [np.nan] + list(
        np.exp(-xs[1:] / 20))}, title="loss", xlabel="step", ylabel="nats")
    img = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in img}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # the first two palette colours
    # Per-curve xs of different lengths, log axis with a non-positive value skipped.
    save_curve_png(str(tmp_path / "log.png"), {"a": [1, 2, 3], "b": [1, 5]}, {"a": [1, 10, 100], "b": [0, 3]},
                   log_y=True)
    assert Image.open(tmp_path / "log.png").size == (720, 450)
    with pytest.raises(ShapeError, match="x values"):
        save_curve_png(str(tmp_path / "bad.png"), [1, 2], {"a": [1, 2, 3]})
