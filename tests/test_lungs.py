"""Lung segmentation without learned weights: phantoms of every severity, 8-bit slices, failures, the crop."""

from __future__ import annotations

import numpy as np
import pytest

from cov3d.data.lungs import LEFT, RIGHT, crop, dice, lung_box, lung_views, resample_labels, segment_lungs, side_box
from cov3d.data.readers import DEFAULT_WINDOW, read_scan
from cov3d.data.synth import CONSOLIDATION, make_phantom, to_slices
from conftest import SHARED_DICOM, write_slices


def windowed(hu: np.ndarray) -> np.ndarray:
    low, high = DEFAULT_WINDOW
    return np.clip((hu - low) / (high - low), 0, 1).astype(np.float32)


@pytest.mark.parametrize("severity", [0, 1, 2, 3, 4])
def test_phantom_lungs_are_found_at_every_severity(severity):
    phantom = make_phantom(np.random.default_rng(severity), severity, width=96, slices=40)
    mask = segment_lungs(windowed(phantom.hu))
    assert mask.ok
    assert dice(mask.labels > 0, phantom.lungs) >= 0.95
    # Labels by the patient's side: the right lung lies in the lower columns (the image's left).
    columns = np.arange(96)
    right = columns[(mask.labels == RIGHT).any(axis=(0, 1))].mean()
    left = columns[(mask.labels == LEFT).any(axis=(0, 1))].mean()
    assert right < 48 < left


def test_eight_bit_slices_of_unknown_window_are_segmented(tmp_path):
    phantom = make_phantom(np.random.default_rng(7), 3, width=96, slices=40)
    # Exported in a mediastinal-ish window the reader does not know: the threshold must adapt.
    folder = write_slices(tmp_path / "scan", to_slices(phantom.hu, window=(-1100.0, 300.0)))
    mask = segment_lungs(read_scan(folder).volume)
    assert mask.ok and dice(mask.labels > 0, phantom.lungs) >= 0.95


@pytest.mark.parametrize("volume", [np.full((20, 64, 64), 0.4, np.float32), np.zeros((20, 64, 64), np.float32)])
def test_a_constant_volume_has_no_lungs(volume):
    mask = segment_lungs(volume)
    assert mask.quality == "no lungs found" and not mask.labels.any()


def test_a_scan_without_lungs_is_flagged():
    phantom = make_phantom(np.random.default_rng(3), 0, width=64, slices=30)
    hu = phantom.hu.copy()
    hu[phantom.lungs] = 40.0  # lungs filled with soft tissue: a body without lungs (an abdomen, say)
    mask = segment_lungs(windowed(hu))
    assert not mask.ok
    assert mask.quality in ("no lungs found", "lungs too small for the body")


def test_one_lung_is_flagged():
    phantom = make_phantom(np.random.default_rng(4), 0, width=64, slices=30)
    hu = phantom.hu.copy()
    columns = np.arange(64)[None, None, :]
    hu[phantom.lungs & (columns > 32)] = 40.0  # the left lung gone (a pneumonectomy)
    assert segment_lungs(windowed(hu)).quality == "one lung only"


def test_a_dense_lesion_against_the_chest_wall_stays_inside_the_crop():
    rng = np.random.default_rng(5)
    phantom = make_phantom(rng, 0, width=96, slices=40)
    hu = phantom.hu.copy()
    z, y, x = np.ogrid[:40, :96, :96]
    # The right lung's most lateral voxels, consolidated right up to the pleura (no ground-glass rim).
    lateral = np.nonzero(phantom.lungs.any(axis=(0, 1)))[0].min()
    lesion = phantom.lungs & ((x - lateral) ** 2 + (y - 48) ** 2 + ((z - 20) * 1.5) ** 2 < 14 ** 2)
    hu[lesion] = CONSOLIDATION
    mask = segment_lungs(windowed(hu))
    assert mask.ok
    box = lung_box(mask)
    inside = np.zeros(hu.shape, dtype=bool)
    (z0, z1), (y0, y1), (x0, x1) = box
    inside[z0:z1, y0:y1, x0:x1] = True
    assert lesion.sum() > 100 and not (lesion & ~inside).any()
    assert y1 - y0 == x1 - x0  # square in-plane: slices keep their aspect when resized
    assert crop(hu, box).shape == (z1 - z0, y1 - y0, x1 - x0)


def test_each_side_box_holds_its_lung():
    phantom = make_phantom(np.random.default_rng(6), 2, width=96, slices=40)
    mask = segment_lungs(windowed(phantom.hu))
    for side in (RIGHT, LEFT):
        (z0, z1), (y0, y1), (x0, x1) = side_box(mask, side)
        lung = mask.labels == side
        assert lung[z0:z1, y0:y1, x0:x1].sum() == lung.sum()


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="../shared/data/chest-ct-dicom is not here")
def test_the_real_chest_ct_has_two_lungs_of_a_plausible_volume():
    scan = read_scan(SHARED_DICOM)
    mask = segment_lungs(scan.volume)
    assert mask.ok
    right, left = mask.volumes_ml(scan.meta.spacing)
    # An adult's lungs hold some 1.5–3.5 l each at CT inspiration; this series cuts the bases a little.
    assert 800 < right < 4000 and 800 < left < 4000


@pytest.mark.parametrize("mode", ["off", "crop", "split"])
def test_lung_views_by_mode(mode):
    phantom = make_phantom(np.random.default_rng(8), 2, width=96, slices=40)
    views = lung_views(windowed(phantom.hu), mode)
    assert views.fallback is None
    assert len(views.volumes) == (2 if mode == "split" else 1)
    if mode == "off":
        assert views.volumes[0].shape == (40, 96, 96) and views.labels is None
    else:
        for volume, labels in zip(views.volumes, views.labels):
            assert volume.shape == labels.shape and volume.shape[1] == volume.shape[2]
    if mode == "split":
        # The right view holds the right lung; the left view, mirrored, the left lung.
        assert (views.labels[0] == RIGHT).sum() > (views.labels[0] == LEFT).sum()
        assert (views.labels[1] == LEFT).sum() > (views.labels[1] == RIGHT).sum()
        # Mirrored: the left lung's lateral side is on the view's left, as the right lung's is.
        right_cols = np.nonzero((views.labels[0] == RIGHT).any(axis=(0, 1)))[0]
        left_cols = np.nonzero((views.labels[1] == LEFT).any(axis=(0, 1)))[0]
        assert right_cols.min() < views.volumes[0].shape[2] - right_cols.max()
        assert left_cols.min() < views.volumes[1].shape[2] - left_cols.max()


@pytest.mark.parametrize("mode", ["crop", "split"])
def test_a_failed_segmentation_falls_back_to_the_whole_volume_with_a_warning(mode, caplog):
    volume = np.full((12, 40, 40), 0.5, np.float32)
    with caplog.at_level("WARNING"):
        views = lung_views(volume, mode, name="scan-7")
    assert views.fallback == "no lungs found"
    assert sum(v.shape[2] for v in views.volumes) == 40 and all(v.shape[:2] == (12, 40) for v in views.volumes)
    assert "scan-7: lung segmentation failed (no lungs found)" in caplog.text


def test_resampled_labels_keep_their_places():
    labels = np.zeros((10, 20, 20), np.uint8)
    labels[:, :, :10] = RIGHT
    labels[:, :, 10:] = LEFT
    small = resample_labels(labels, 5, 8)
    assert small.shape == (5, 8, 8)
    assert (small[:, :, :4] == RIGHT).all() and (small[:, :, 4:] == LEFT).all()


def test_the_box_of_a_wide_image_is_square_where_it_fits_and_never_cuts_a_lung():
    phantom = make_phantom(np.random.default_rng(9), 1, width=96, slices=40)
    wide = windowed(phantom.hu)[:, 20:76, :]  # 56 rows, 96 columns: the square does not fit in the rows
    mask = segment_lungs(wide)
    assert mask.ok
    (z0, z1), (y0, y1), (x0, x1) = lung_box(mask)
    assert (y0, y1) == (0, 56) and x1 - x0 >= 56
    lungs = mask.labels > 0
    assert lungs[z0:z1, y0:y1, x0:x1].sum() == lungs.sum()
