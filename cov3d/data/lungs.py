"""Classical lung segmentation, with no learned weights: find the lungs, crop to them, split them.

Works on a volume as the readers give it, float (depth, rows, columns) in [0, 1]
in cov3d's orientation (depth head to feet, columns patient right to left), from
Hounsfield units through the intensity window or from 8-bit slices whose window
is unknown. The steps, on a copy at most :data:`WORK_WIDTH` wide:

1. **Threshold** by Otsu's method, so it adapts to any window: air and lung fall
   below, soft tissue, bone, the table and dense lesions above.
2. **Outside air**: dark regions connected to the in-plane border of any slice
   (the air around the body, a circular field of view's padding) are removed;
   found after a one-pixel opening, so a one-pixel gap in a thin chest wall does
   not join a lung to them.
3. **Candidates**: of the dark regions left, the largest, and the second when it
   is at least a tenth as large (two lungs apart); bowel gas and holes in the
   table are smaller and dropped.
4. **Two lungs, no trachea**: the candidates are eroded (by their distance map)
   until they fall into two large cores, one per lung; each lung then grows back
   inside the candidates by a few voxels more than it was eroded. The trachea,
   thinner than the erosion and far from the cores, is not grown back into;
   bronchi inside each lung are.
5. **Lesions stay in**: each lung is closed and its holes filled slice by slice,
   so vessels, nodules, and consolidation or ground glass inside or at the edge
   of the lung are part of it.

A result that does not look like two lungs (none found, one lung only, lungs
too small for the body) is flagged in :attr:`LungMask.quality`; callers then
fall back to the whole volume. Labels: 0 outside, 1 the patient's right lung
(the image's left), 2 the left lung.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

RIGHT, LEFT = 1, 2
WORK_WIDTH = 128  # segmentation runs at about this in-plane size, and depth at most WORK_DEPTH; the mask is scaled back up
WORK_DEPTH = 96
MARGIN = 0.06  # crop margin, as a share of the box's extent on each side (and at least 2 voxels)
MIN_LUNG_SHARE = 0.02  # of the body's voxels: less is "lungs too small for the body"
MIN_SECOND_LUNG = 0.15  # the smaller lung's share of the larger: less is "one lung only"


@dataclass
class LungMask:
    """The lungs found in a volume (0 outside, 1 right lung, 2 left lung) and whether they are usable.

    Kept on the work grid (every `step`-th slice, `factor`×`factor` pixel blocks); :attr:`labels` gives
    them on the volume's grid, and :meth:`labels_in` on part of it, without the whole-volume copy.
    """

    small: np.ndarray  # uint8 labels on the work grid
    quality: str  # "ok", or why the mask is not used: "no lungs found", "one lung only", …
    midline: float  # column of the body's midline on the volume's grid, where the crop is centred
    shape: tuple[int, int, int]  # the volume's (depth, rows, columns)
    step: int = 1
    factor: int = 1

    @property
    def ok(self) -> bool:
        return self.quality == "ok"

    @property
    def labels(self) -> np.ndarray:
        """uint8 labels on the volume's grid (nearest work-grid voxel)."""
        return self.labels_in(((0, self.shape[0]), (0, self.shape[1]), (0, self.shape[2])))

    def labels_in(self, box: Box) -> np.ndarray:
        """uint8 labels of the part of the volume's grid that `box` names."""
        limits = (self.small.shape[0] - 1, self.small.shape[1] - 1, self.small.shape[2] - 1)
        scales = (self.step, self.factor, self.factor)
        index = [np.minimum(np.arange(a, b) // scale, limit) for (a, b), scale, limit in zip(box, scales, limits)]
        return self.small[np.ix_(*index)]

    def extent(self, side: int | None = None, axis: int = 0) -> tuple[int, int]:
        """(start, stop) on the volume's grid along `axis` of both lungs, or of one (RIGHT, LEFT)."""
        lungs = self.small > 0 if side is None else self.small == side
        start, stop = _extent(lungs, axis)
        scale = self.step if axis == 0 else self.factor
        stop = self.shape[axis] if stop == lungs.shape[axis] else stop * scale  # the last block reaches the edge
        return start * scale, min(stop, self.shape[axis])

    def volumes_ml(self, spacing: tuple[float, float, float] | None) -> tuple[float, float] | None:
        """(right, left) lung volumes in ml, when the voxel spacing (mm) is known."""
        if spacing is None:
            return None
        voxel = float(np.prod(spacing)) * self.step * self.factor ** 2 / 1000.0
        return float((self.small == RIGHT).sum()) * voxel, float((self.small == LEFT).sum()) * voxel


Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (start, stop) for depth, rows, columns


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that best separates `values` into two classes (Otsu's method)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts).astype(np.float64)
    mean = np.cumsum(counts * centres)
    total, grand = weight[-1], mean[-1]
    background, foreground = weight[:-1], total - weight[:-1]
    valid = (background > 0) & (foreground > 0)
    between = np.zeros_like(background)
    mu0 = mean[:-1][valid] / background[valid]
    mu1 = (grand - mean[:-1][valid]) / foreground[valid]
    between[valid] = background[valid] * foreground[valid] * (mu0 - mu1) ** 2
    return float(edges[1:][int(np.argmax(between))])


def _shrink(volume: np.ndarray, step: int, factor: int) -> np.ndarray:
    """Every `step`-th slice, each factor×factor block of pixels given the mean of its four central pixels.

    Four samples a block keep the noise down at a fraction of a full block mean's cost (a 512² scan's
    blocks are 4×4).
    """
    volume = volume[::step]
    if factor == 1:
        return np.asarray(volume, dtype=np.float32)
    depth, rows, columns = volume.shape
    rows, columns = rows // factor * factor, columns // factor * factor
    low, high = (factor - 1) // 2, factor // 2
    picks = [volume[:, a:rows:factor, b:columns:factor] for a in {low, high} for b in {low, high}]
    return (sum(p.astype(np.float32) for p in picks) / np.float32(len(picks))).astype(np.float32, copy=False)


def _grow(labels: np.ndarray, inside: np.ndarray, steps: int) -> np.ndarray:
    """Grow each label by one voxel a step into unlabelled voxels of `inside` (a geodesic dilation)."""
    from scipy.ndimage import grey_dilation

    cross = np.zeros((3, 3, 3), dtype=bool)
    cross[1, 1, :] = cross[1, :, 1] = cross[:, 1, 1] = True
    for _ in range(steps):
        grown = grey_dilation(labels, footprint=cross)
        new = (labels == 0) & inside & (grown > 0)
        if not new.any():
            break
        labels[new] = grown[new]
    return labels


def _fill_per_slice(mask: np.ndarray, radius: int) -> np.ndarray:
    """Close (disk of `radius`) and fill holes in every axial slice of a 3D mask."""
    from scipy.ndimage import binary_closing, binary_fill_holes

    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    disk = (x * x + y * y <= radius * radius)[None]
    # Pad in-plane so that closing does not erode at the image border.
    padded = np.pad(mask, ((0, 0), (radius, radius), (radius, radius)))
    closed = binary_closing(padded, structure=disk)[:, radius:-radius or None, radius:-radius or None]
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    return binary_fill_holes(closed | mask, structure=plane)


def segment_lungs(volume: np.ndarray) -> LungMask:
    """Segment the lungs of a (depth, rows, columns) volume in [0, 1] (any window); see the module docstring."""
    from scipy.ndimage import binary_dilation, binary_erosion, distance_transform_edt, label

    volume = np.asarray(volume)
    depth, rows, columns = volume.shape
    factor = max(1, min(rows, columns) // WORK_WIDTH)
    step = max(1, -(-depth // WORK_DEPTH))
    small = _shrink(volume, step, factor)
    nothing = np.zeros(small.shape, dtype=np.uint8)

    def failed(why: str, midline: float = (columns - 1) / 2) -> LungMask:
        return LungMask(nothing, why, midline, volume.shape, step, factor)

    if min(small.shape[1:]) < 8 or float(small.max() - small.min()) < 1e-3:
        return failed("no lungs found")
    sample = small[:, ::2, ::2].ravel()
    threshold = otsu_threshold(sample)
    dark = small < threshold
    if not dark.any():
        return failed("no lungs found")
    # Outside air: found on the dark mask opened by one pixel in-plane, so that a chest wall one pixel thin
    # (a small phantom, a thin patient at low resolution) with a gap in it does not join the lungs to it.
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    components, count = label(binary_erosion(dark, structure=plane, border_value=1))
    border = np.unique(np.concatenate([components[:, 0, :].ravel(), components[:, -1, :].ravel(),
                                       components[:, :, 0].ravel(), components[:, :, -1].ravel()]))
    outside = dark & binary_dilation(np.isin(components, border[border > 0]), structure=plane)
    body = ~outside
    midline = float(np.nonzero(body.any(axis=(0, 1)))[0].mean()) * factor + (factor - 1) / 2 \
        if body.any() else (columns - 1) / 2
    candidates = dark & ~outside
    components, count = label(candidates)
    if count == 0:
        return failed("no lungs found", midline)
    sizes = np.bincount(components.ravel())[1:]
    order = np.argsort(-sizes)
    keep = [order[0] + 1] + ([order[1] + 1] if count > 1 and sizes[order[1]] >= 0.1 * sizes[order[0]] else [])
    lungs = np.isin(components, keep)
    if lungs.sum() < MIN_LUNG_SHARE * body.sum():
        return failed("lungs too small for the body", midline)
    # The rest works on the lungs' bounding box (with room for the closing): a fraction of the volume.
    radius = max(2, round(0.03 * small.shape[2]))
    region = tuple(slice(max(0, a - radius - 1), b + radius + 1)
                   for a, b in (_extent(lungs, axis) for axis in range(3)))
    # Filled before the lungs are told apart: dense lesions (holes in the dark mask, ringed by ground glass)
    # become solid lung, which the erosion below treats like healthy lung rather than as thin shells.
    part = _fill_per_slice(lungs[region], max(1, radius // 2))
    labels = _two_lungs(part, distance_transform_edt, label)
    if labels is None:
        return failed("one lung only", midline)
    right, left = (labels == RIGHT).sum(), (labels == LEFT).sum()
    if min(right, left) < MIN_SECOND_LUNG * max(right, left):
        return failed("one lung only", midline)
    filled = np.zeros(small.shape, dtype=np.uint8)
    for side in (RIGHT, LEFT):
        side_mask = _fill_per_slice(labels == side, radius)
        target = filled[region]
        target[side_mask & (target == 0)] = side
    return LungMask(filled, "ok", midline, volume.shape, step, factor)


def _two_lungs(lungs: np.ndarray, distance_transform_edt, label) -> np.ndarray | None:
    """Right (1) and left (2) lung labels from the candidate mask, the trachea left out; None if not two."""
    distance = distance_transform_edt(lungs)
    deepest = float(distance.max())
    for depth in np.linspace(1.0, max(1.0, deepest * 0.6), 12):
        cores, count = label(distance > depth)
        if count < 2:
            continue
        sizes = np.bincount(cores.ravel())[1:]
        order = np.argsort(-sizes)
        if sizes[order[1]] < MIN_SECOND_LUNG * sizes[order[0]]:
            continue
        seeds = np.zeros(lungs.shape, dtype=np.uint8)
        first, second = order[0] + 1, order[1] + 1
        columns = np.arange(lungs.shape[2])
        centre = [float((cores == c).sum(axis=(0, 1)) @ columns) / sizes[c - 1] for c in (first, second)]
        # Columns run from the patient's right to the left: the core further along is the left lung.
        right_core, left_core = (first, second) if centre[0] < centre[1] else (second, first)
        seeds[cores == right_core] = RIGHT
        seeds[cores == left_core] = LEFT
        return _grow(seeds, lungs, int(np.ceil(depth)) + 3)
    return None


def _extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    other = tuple(a for a in range(3) if a != axis)
    present = np.nonzero(mask.any(axis=other))[0]
    return int(present[0]), int(present[-1]) + 1


def _widen(start: float, stop: float, limit: int, margin: float) -> tuple[int, int]:
    pad = max(2.0, margin * (stop - start))
    return max(0, int(np.floor(start - pad))), min(limit, int(np.ceil(stop + pad)))


def _square(rows: tuple[int, int], columns: tuple[int, int], shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Grow the shorter side of an in-plane box to make it square (slices keep their aspect), inside the image.

    In an image too narrow for the square (a tall lung box in a wide, short image) that side keeps the image's
    extent, so no lung is cut.
    """
    side = max(rows[1] - rows[0], columns[1] - columns[0])
    out = []
    for (start, stop), limit in zip((rows, columns), shape):
        length = min(side, limit)
        centre = (start + stop) / 2
        begin = min(max(0, int(round(centre - length / 2))), limit - length)
        out.append((begin, begin + length))
    return tuple(out)


def lung_box(mask: LungMask, margin: float = MARGIN) -> Box:
    """The crop around both lungs: their extent plus a margin, square in-plane, symmetric about the midline.

    Symmetric left–right because a dense lesion against the chest wall reads as
    wall, not lung: mirroring the other lung's extent keeps such a lesion inside.
    """
    depth, rows, columns = mask.shape
    z = _widen(*mask.extent(None, 0), depth, margin)
    y = _widen(*mask.extent(None, 1), rows, margin)
    x0, x1 = mask.extent(None, 2)
    half = max(mask.midline - x0, x1 - mask.midline)
    x = _widen(mask.midline - half, mask.midline + half, columns, margin)
    y, x = _square(y, x, (rows, columns))
    return z, y, x


def side_box(mask: LungMask, side: int, margin: float = MARGIN) -> Box:
    """The crop around one lung (RIGHT or LEFT): its extent plus a margin, square in-plane."""
    depth, rows, columns = mask.shape
    z = _widen(*mask.extent(side, 0), depth, margin)
    y = _widen(*mask.extent(side, 1), rows, margin)
    x = _widen(*mask.extent(side, 2), columns, margin)
    y, x = _square(y, x, (rows, columns))
    return z, y, x


def crop(volume: np.ndarray, box: Box) -> np.ndarray:
    """`volume[box]`: the (depth, rows, columns) part a box names."""
    (z0, z1), (y0, y1), (x0, x1) = box
    return volume[z0:z1, y0:y1, x0:x1]


def box_text(box: Box) -> str:
    """'z0:z1,y0:y1,x0:x1', as the manifest records a box."""
    return ",".join(f"{start}:{stop}" for start, stop in box)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


LUNG_MODES = ("off", "crop", "split")


@dataclass
class LungViews:
    """What the model sees of one scan under a --lungs mode, before resampling.

    `volumes`: one volume (off, crop) or two (split: the right lung, then the left
    lung mirrored so that it looks like a right lung). `labels`: the lung labels
    on each volume's grid (None with mode off). `fallback`: why the whole volume
    is used instead of the lungs, or None.
    """

    volumes: list[np.ndarray]
    labels: list[np.ndarray] | None
    mask: LungMask | None
    boxes: list[Box]
    fallback: str | None = None


def lung_views(volume: np.ndarray, mode: str, name: object = "scan") -> LungViews:
    """The volume(s) a model sees of `volume` under `mode` ('off', 'crop' or 'split'); see :class:`LungViews`.

    A segmentation that fails (:attr:`LungMask.quality`) is warned about, naming
    the scan, and the whole volume is used: as it is for crop, and cut at the
    body's midline into a right and a mirrored left half for split.
    """
    if mode not in LUNG_MODES:
        raise ValueError(f"lung mode {mode!r} is not one of {', '.join(LUNG_MODES)}")
    depth, rows, columns = volume.shape
    whole: Box = ((0, depth), (0, rows), (0, columns))
    if mode == "off":
        return LungViews([volume], None, None, [whole])
    mask = segment_lungs(volume)
    fallback = None if mask.ok else mask.quality
    if fallback:
        log.warning("%s: lung segmentation failed (%s); the whole volume is used", name, fallback)
    if mode == "crop":
        box = lung_box(mask) if mask.ok else whole
        return LungViews([crop(volume, box)], [mask.labels_in(box)], mask, [box], fallback)
    if mask.ok:
        boxes = [side_box(mask, RIGHT), side_box(mask, LEFT)]
    else:
        middle = int(round(mask.midline)) + 1
        middle = min(max(1, middle), columns - 1)
        boxes = [((0, depth), (0, rows), (0, middle)), ((0, depth), (0, rows), (middle, columns))]
    views = [crop(volume, boxes[0]), crop(volume, boxes[1])[:, :, ::-1]]
    labels = [mask.labels_in(boxes[0]), mask.labels_in(boxes[1])[:, :, ::-1]]
    return LungViews(views, labels, mask, boxes, fallback)


def resample_labels(labels: np.ndarray, depth: int, width: int) -> np.ndarray:
    """Nearest-neighbour labels of a (slices, rows, columns) grid on the cache's (depth, width, width) grid."""
    def ends(source: int, target: int) -> np.ndarray:
        # Depth is interpolated end slice to end slice (resample.depth_matrix).
        if target == 1 or source == 1:
            return np.zeros(target, dtype=np.intp)
        return np.rint(np.linspace(0, source - 1, target)).astype(np.intp)

    def centres(source: int, target: int) -> np.ndarray:
        # Slices are resized pixel centre to pixel centre (Pillow's resize).
        return np.clip(np.floor((np.arange(target) + 0.5) * source / target), 0, source - 1).astype(np.intp)

    slices, rows, columns = labels.shape
    return labels[np.ix_(ends(slices, depth), centres(rows, width), centres(columns, width))]
