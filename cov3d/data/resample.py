"""Resampling exactly as the paper (§3.1): bicubic in-plane, then cubic along depth.

Each slice is resized to width×width with antialiased bicubic interpolation
(Pillow's, as the reference implementation used), then every pixel column is
interpolated along depth with a 1D cubic spline. The spline is linear in the
data, so it is applied as one (depth × slices) matrix product: fast, float32,
and without the float64 copies that a per-column spline solve would make.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

SIZES: dict[str, tuple[int, int]] = {
    # name: (depth, width); height equals width, depth is half the width (paper §3.1)
    "small": (64, 128),
    "medium": (128, 256),
    "large": (160, 320),
}


def resize_slice(image: Image.Image, width: int) -> np.ndarray:
    """Resize one 2D slice (Pillow mode 'L' or 'F') to width×width, bicubic with antialiasing.

    Returns float32 in the same value range as the input ('L' is scaled to [0, 1]).
    """
    if image.size != (width, width):
        image = image.resize((width, width), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32)
    if image.mode == "L":
        array = array / np.float32(255.0)
    return array


@lru_cache(maxsize=64)
def depth_matrix(slices: int, depth: int) -> torch.Tensor:
    """The (depth × slices) matrix of 1D interpolation from `slices` to `depth` samples.

    Cubic (not-a-knot) spline over evenly spaced positions, as `scipy`'s cubic
    interpolation; with fewer than 4 slices a cubic is undefined, so the
    highest order the points allow is used: quadratic (3), linear (2), or the
    single slice repeated (1). Every row sums to 1, so constants stay constant
    and linear ramps stay linear.
    """
    if slices < 1 or depth < 1:
        raise ValueError(f"need at least one slice and depth ≥ 1, got {slices} slices, depth {depth}")
    if slices == 1:
        return torch.ones((depth, 1))
    from scipy.interpolate import make_interp_spline

    order = min(3, slices - 1)
    source = np.linspace(0.0, 1.0, slices)
    target = np.linspace(0.0, 1.0, depth)
    spline = make_interp_spline(source, np.eye(slices), k=order)
    return torch.from_numpy(spline(target).astype(np.float32))


def resample_depth(volume: np.ndarray, depth: int) -> np.ndarray:
    """Interpolate a (slices, H, W) float32 volume to (depth, H, W) along axis 0."""
    slices, height, width = volume.shape
    if slices == depth:
        return volume.astype(np.float32, copy=False)
    matrix = depth_matrix(slices, depth)
    columns = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).reshape(slices, -1)
    return (matrix @ columns).reshape(depth, height, width).numpy()


def resample_volume(volume: np.ndarray, depth: int, width: int) -> np.ndarray:
    """Resize each slice of a (D, H, W) volume in [0, 1] to width×width, then depth; clip to [0, 1]."""
    resized = np.stack([resize_slice(Image.fromarray(s.astype(np.float32, copy=False)), width) for s in volume])
    return finish(resized, depth)


def finish(resized: np.ndarray, depth: int) -> np.ndarray:
    """Depth interpolation of already resized slices, then clipping to [0, 1].

    Bicubic and cubic interpolation overshoot at sharp edges; the clip keeps
    the documented value range.
    """
    out = resample_depth(resized, depth)
    np.clip(out, 0.0, 1.0, out=out)
    return out
