import numpy as np
import pytest
from PIL import Image

from cov3d.data.resample import depth_matrix, finish, resample_depth, resample_volume, resize_slice


@pytest.mark.parametrize("slices", [1, 2, 3, 4, 17, 300])
@pytest.mark.parametrize("depth", [1, 16, 64])
def test_depth_matrix_rows_sum_to_one(slices, depth):
    matrix = depth_matrix(slices, depth).numpy()
    assert matrix.shape == (depth, slices)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("slices", [1, 2, 3, 5, 40])
def test_constant_volume_stays_constant(slices):
    volume = np.full((slices, 50, 40), 0.37, dtype=np.float32)
    out = resample_volume(volume, depth=16, width=32)
    assert out.shape == (16, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.37, atol=1e-5)


@pytest.mark.parametrize("slices", [2, 3, 4, 9, 120])
def test_linear_ramp_along_depth_stays_linear(slices):
    values = np.linspace(0.1, 0.9, slices, dtype=np.float32)
    volume = np.broadcast_to(values[:, None, None], (slices, 8, 8)).copy()
    out = resample_depth(volume, 33)
    np.testing.assert_allclose(out[:, 3, 3], np.linspace(0.1, 0.9, 33), atol=1e-5)


def test_cubic_interpolation_reproduces_a_cubic():
    # A not-a-knot cubic spline is exact for cubic polynomials.
    x = np.linspace(0, 1, 10)
    cubic = (0.2 + 0.3 * x - 0.5 * x**2 + 0.4 * x**3).astype(np.float32)
    out = resample_depth(np.broadcast_to(cubic[:, None, None], (10, 2, 2)).copy(), 25)[:, 0, 0]
    t = np.linspace(0, 1, 25)
    np.testing.assert_allclose(out, 0.2 + 0.3 * t - 0.5 * t**2 + 0.4 * t**3, atol=1e-5)


def test_single_slice_is_repeated():
    volume = np.random.default_rng(0).random((1, 8, 8), dtype=np.float32)
    out = resample_depth(volume, 5)
    for plane in out:
        np.testing.assert_allclose(plane, volume[0], atol=1e-6)


def test_resample_keeps_the_original_slices_when_depth_matches():
    volume = np.random.default_rng(1).random((7, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(resample_depth(volume, 7), volume)
    # and endpoints are interpolation nodes for any depth
    out = resample_depth(volume, 30)
    np.testing.assert_allclose(out[0], volume[0], atol=1e-5)
    np.testing.assert_allclose(out[-1], volume[-1], atol=1e-5)


def test_output_is_clipped_to_unit_range():
    # A sharp edge makes bicubic and cubic overshoot; the result must stay in [0, 1].
    volume = np.zeros((6, 64, 64), dtype=np.float32)
    volume[::2, :, 32:] = 1.0
    out = resample_volume(volume, depth=20, width=16)
    assert out.min() >= 0.0 and out.max() <= 1.0
    raw = resample_depth(np.stack([resize_slice(Image.fromarray(s), 16) for s in volume]), 20)
    assert raw.min() < 0.0 or raw.max() > 1.0  # the clip is doing real work here
    np.testing.assert_allclose(finish(np.stack([resize_slice(Image.fromarray(s), 16) for s in volume]), 20), out)


def test_resize_slice_is_antialiased_bicubic():
    # A fine checkerboard averages to grey when downsampled with antialiasing.
    board = (np.indices((128, 128)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = resize_slice(Image.fromarray(board), 16)
    assert out.shape == (16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.5, atol=0.02)
