"""The one orientation every scan is given in, and the axis flips and swaps that bring a volume to it.

cov3d's convention (the one SimpleITK's ``DICOMOrient(image, "LPI")`` gives):

* depth (axis 0) runs from the head to the feet;
* rows (axis 1) run from anterior to posterior;
* columns (axis 2) run from the patient's right to the patient's left, as a
  radiologist sees an axial slice: the patient's right on the image's left.
  Reflection (training's flip, TTA) reverses this axis, swapping left and right.

A volume's geometry is given as ITK gives it, in patient LPS coordinates (x to
the patient's left, y to posterior, z to the head): the direction cosines of
the column, row and slice index axes. :func:`to_canonical` maps each index axis
to the patient axis it lies nearest to, by flips and axis swaps only, so no
voxel is interpolated. A volume whose axes are oblique to the patient's keeps
its tilt; beyond :data:`OBLIQUE_TOLERANCE` degrees that is warned, naming the
angle.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Tilt (degrees) of an index axis from the patient axis it is mapped to, beyond which a warning names it.
# Gantry tilts of up to ~30° exist; a few degrees are common and harmless at cov3d's resolution.
OBLIQUE_TOLERANCE = 10.0

# Where each numpy axis (depth, rows, columns) must point in LPS: -z (feet), +y (posterior), +x (left).
_TARGET = ((2, -1.0), (1, 1.0), (0, 1.0))


@dataclass(frozen=True)
class Reorientation:
    """How to bring a (depth, rows, columns) array to the canonical orientation.

    `axes[i]` is the source numpy axis that becomes axis i, then axis i is
    reversed where `flips[i]` is True. `tilt` is the largest angle (degrees)
    between an index axis and the patient axis it was mapped to.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    tilt: float

    @property
    def identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    @property
    def keeps_depth(self) -> bool:
        """True when depth comes from the source's slice axis (an axial series, maybe flipped or transposed)."""
        return self.axes[0] == 0

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The (depth, rows, columns) `array` in the canonical orientation (a view where possible)."""
        out = np.transpose(array, self.axes)
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis)
        return out

    def shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The shape a (depth, rows, columns) array of `shape` has after reorientation."""
        return tuple(shape[a] for a in self.axes)  # type: ignore[return-value]

    def geometry(
        self,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        origin: tuple[float, float, float],
        direction: tuple[float, ...],
    ) -> tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, ...]]:
        """Spacing (depth, row, column mm), origin and direction of the reoriented array.

        `shape` and `spacing` are in numpy order (depth, rows, columns);
        `origin` and `direction` as ITK gives them (direction row by row, its
        columns the column, row and slice index axes).
        """
        matrix = np.asarray(direction, dtype=float).reshape(3, 3)
        # Column of the ITK matrix for each numpy axis: numpy axis 0 is ITK's index axis 2.
        vectors = [matrix[:, 2 - axis] for axis in range(3)]
        start = np.asarray(origin, dtype=float)
        new_vectors = []
        new_spacing = []
        for target, (source, flip) in enumerate(zip(self.axes, self.flips)):
            vector = vectors[source]
            if flip:
                start = start + (shape[source] - 1) * spacing[source] * vector
                vector = -vector
            new_vectors.append(vector)
            new_spacing.append(float(spacing[source]))
        new_matrix = np.stack([new_vectors[2], new_vectors[1], new_vectors[0]], axis=1)
        return (tuple(new_spacing), tuple(float(v) for v in start),  # type: ignore[return-value]
                tuple(float(v) for v in new_matrix.ravel()))


def to_canonical(direction: tuple[float, ...]) -> Reorientation:
    """The reorientation that brings an array with these ITK direction cosines to cov3d's convention.

    Each index axis is assigned the patient axis it is most nearly parallel to,
    the most parallel pairs first, so every patient axis is taken once even for
    an oblique volume.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    # vectors[a]: the LPS direction of numpy axis a (depth, rows, columns).
    vectors = np.stack([matrix[:, 2 - axis] for axis in range(3)])
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)
    patient_of: dict[int, int] = {}
    taken: set[int] = set()
    for flat in np.argsort(-np.abs(vectors), axis=None):
        axis, patient = divmod(int(flat), 3)
        if axis in patient_of or patient in taken:
            continue
        patient_of[axis] = patient
        taken.add(patient)
    axes: list[int] = []
    flips: list[bool] = []
    tilt = 0.0
    for patient, sign in _TARGET:
        source = next(a for a, p in patient_of.items() if p == patient)
        component = vectors[source, patient]
        axes.append(source)
        flips.append(bool(component * sign < 0))
        tilt = max(tilt, math.degrees(math.acos(min(1.0, abs(float(component))))))
    return Reorientation(tuple(axes), tuple(flips), tilt)  # type: ignore[arg-type]


def warn_if_oblique(name: object, reorientation: Reorientation) -> None:
    """Warn, naming the angle, when a volume's axes are tilted beyond the tolerance from the patient's."""
    if reorientation.tilt > OBLIQUE_TOLERANCE:
        log.warning("%s: its axes are tilted %.1f° from the patient's axes (more than %g°); it is read in the "
                    "nearest standard orientation, not resampled, so the tilt stays in the volume",
                    name, reorientation.tilt, OBLIQUE_TOLERANCE)
