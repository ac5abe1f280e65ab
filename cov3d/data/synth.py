"""Procedural chest-CT phantoms in the COV19-CT-DB layout, for demos and tests.

Each phantom is built in Hounsfield units: air around an elliptical body (soft
tissue under a ring of fat), two lungs of low density with vessels branching
from the hila, a trachea and main bronchi, a heart, and a vertebral body. COVID
findings are ground-glass opacities placed mostly at the lung periphery, with
consolidated cores in severe and critical cases; the share of lung they affect
sets the severity. Some negatives carry a confounder: a small solid nodule.
Slices are written in the lung window as numbered 8-bit JPEGs, like the data set.
"""

from __future__ import annotations

import itertools
import logging
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cov3d.atomic import check_writable, write_text
from cov3d.data.catalog import SEVERITY_FILES
from cov3d.errors import Cov3dError
from cov3d.data.readers import DEFAULT_WINDOW

log = logging.getLogger(__name__)

# Share of lung volume affected, by severity (mild, moderate, severe, critical): disjoint ranges.
LESION_FRACTION = {1: (0.03, 0.08), 2: (0.11, 0.18), 3: (0.22, 0.32), 4: (0.38, 0.50)}
AIR, LUNG, GROUND_GLASS, CONSOLIDATION, FAT, SOFT_TISSUE, BONE = -1000, -860, -560, -60, -100, 40, 700
# Seeds 0 … 2**32 - 1, the range of training's --seed (cov3d.training.config.MAX_SEED, a later stage), so that
# the demo's one seed serves both.
MAX_SEED = 2**32 - 1


@dataclass
class Phantom:
    """One synthetic scan in HU, with the masks that define its label."""

    hu: np.ndarray  # (slices, width, width) float32, head first
    lungs: np.ndarray  # bool
    lesions: np.ndarray  # bool, inside the lungs
    severity: int  # 0 for non-covid
    nodule: bool

    @property
    def lesion_fraction(self) -> float:
        return float(self.lesions.sum() / max(int(self.lungs.sum()), 1))


def _segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance from each point (…, 3) to the segment start–end."""
    direction = end - start
    t = np.clip(((points - start) @ direction) / float(direction @ direction), 0.0, 1.0)
    closest = start + t[..., None] * direction
    return np.linalg.norm(points - closest, axis=-1)


def make_phantom(rng: np.random.Generator, severity: int = 0, *, slices: int | None = None, width: int = 128,
                 nodule: bool = False) -> Phantom:
    """A chest phantom; `severity` 0 is non-covid, 1–4 mild…critical (lesions grow with it)."""
    slices = int(slices if slices is not None else rng.integers(40, 100))
    z, y, x = np.meshgrid(np.linspace(-1, 1, slices), np.linspace(-1, 1, width), np.linspace(-1, 1, width),
                          indexing="ij")
    hu = np.full(z.shape, float(AIR), dtype=np.float32)
    # Body: an ellipse, slightly varying along the body axis, with subcutaneous fat.
    a, b = rng.uniform(0.8, 0.9), rng.uniform(0.55, 0.65)
    radius = np.sqrt((x / (a * (1 + 0.05 * z))) ** 2 + ((y - 0.05) / b) ** 2)
    hu[radius < 1.0] = FAT
    hu[radius < 0.9] = SOFT_TISSUE
    # Lungs: two ellipsoids, tapering to the apex (z = -1 is the head end).
    lung_z = (z + 0.05) / rng.uniform(0.7, 0.8)
    lungs = np.zeros(z.shape, dtype=bool)
    for side in (-1, 1):
        cx = side * rng.uniform(0.33, 0.4)
        lungs |= ((x - cx) / 0.27) ** 2 + ((y - 0.0) / 0.4) ** 2 + lung_z**2 < 1.0
    heart = ((x - 0.05) / 0.22) ** 2 + ((y + 0.05) / 0.25) ** 2 + ((z - 0.35) / 0.4) ** 2 < 1.0
    lungs &= ~heart
    hu[lungs] = LUNG + rng.normal(0, 25, int(lungs.sum()))
    # Vertebral body behind the lungs, along the whole scan.
    spine = np.sqrt((x / 0.09) ** 2 + ((y - 0.5) / 0.09) ** 2) < 1.0
    hu[spine] = BONE
    points = np.stack([x, y, z], axis=-1)
    # Trachea down to the carina, then the main bronchi into each lung (near the midline only).
    central = np.nonzero((np.abs(x) < 0.35) & (np.abs(y) < 0.2) & (radius < 0.9))
    central_points = points[central]
    carina = np.array([0.0, -0.05, -0.15])
    airway = _segment_distance(central_points, np.array([0.0, -0.1, -1.0]), carina) < 0.045
    for side in (-1, 1):
        airway |= _segment_distance(central_points, carina, np.array([side * 0.3, 0.0, 0.05])) < 0.03
    hu[tuple(axis[airway] for axis in central)] = AIR
    # Vessels: thin soft-tissue tubes from each hilum outwards, visible inside the lungs only
    # (computed on lung voxels alone: they are all that a vessel can change).
    lung_index = np.nonzero(lungs)
    lung_points = points[lung_index]
    lung_hu = hu[lung_index]
    for _ in range(int(rng.integers(14, 22))):
        side = rng.choice([-1, 1])
        start = np.array([side * 0.17, rng.uniform(-0.1, 0.1), rng.uniform(-0.2, 0.3)])
        end = start + np.array([side * rng.uniform(0.15, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(-0.6, 0.5)])
        lung_hu[_segment_distance(lung_points, start, end) < rng.uniform(0.012, 0.025)] = SOFT_TISSUE
    lesions = np.zeros(z.shape, dtype=bool)
    if severity:
        lesions = _lesions(rng, lung_points, lung_index, lungs, severity, lung_hu)
    has_nodule = False
    if nodule and not severity:
        centre = lung_points[rng.integers(len(lung_points))]
        lung_hu[np.linalg.norm(lung_points - centre, axis=-1) < rng.uniform(0.03, 0.05)] = SOFT_TISSUE
        has_nodule = True
    hu[lung_index] = lung_hu
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)  # acquisition noise
    return Phantom(hu, lungs, lesions, severity, has_nodule)


def _lesions(rng: np.random.Generator, lung_points: np.ndarray, lung_index: tuple, lungs: np.ndarray,
             severity: int, lung_hu: np.ndarray) -> np.ndarray:
    """Peripheral ground-glass blobs until the target share of lung is covered; consolidation when severe.

    Works on the lung voxels (`lung_points`, their HU `lung_hu`, changed in place);
    returns the lesion mask of the whole volume.
    """
    from scipy.ndimage import binary_erosion

    low, high = LESION_FRACTION[severity]
    target = rng.uniform(low, high) * len(lung_points)
    # Peripheral: seeds drawn from lung voxels near the lung border (subpleural, as in COVID-19).
    border = (lungs & ~binary_erosion(lungs, iterations=max(2, lungs.shape[1] // 24)))[lung_index]
    candidates = np.flatnonzero(border)
    affected = np.zeros(len(lung_points), dtype=bool)
    for _ in range(400):
        if affected.sum() >= target:
            break
        centre = lung_points[candidates[rng.integers(len(candidates))]]
        scale = rng.uniform(0.06, 0.14) * (1 + 0.3 * severity)
        affected |= np.linalg.norm((lung_points - centre) / np.array([1.0, 1.0, 1.6]), axis=-1) < scale
    lung_hu[affected] = GROUND_GLASS + rng.normal(0, 40, int(affected.sum()))
    lesions = np.zeros(lungs.shape, dtype=bool)
    lesions[lung_index] = affected
    if severity >= 3:
        # Dense cores: consolidation inside the larger opacities.
        cores = binary_erosion(lesions, iterations=2)[lung_index]
        lung_hu[cores] = CONSOLIDATION + rng.normal(0, 30, int(cores.sum()))
    return lesions


def to_slices(hu: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """HU → 8-bit grey in the lung window, as the data set's JPEG slices were exported."""
    low, high = window
    return (np.clip((hu - low) / (high - low), 0, 1) * 255 + 0.5).astype(np.uint8)


def write_scan(folder: Path, hu: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, plane in enumerate(to_slices(hu)):
        Image.fromarray(plane).save(folder / f"{index}.jpg", quality=92)


@dataclass(frozen=True)
class SynthScan:
    path: str  # relative to the dataset root
    split: str
    label: str  # '' in test
    severity: int  # 0 non-covid
    severity_listed: bool  # written to the split's severity CSV
    nodule: bool
    lesion_fraction: float


def phantoms(scans: int = 160, seed: int = 0, width: int = 128) -> Iterator[tuple[SynthScan, Phantom]]:
    """The phantoms of :func:`synthesize` with the same arguments, in order, each with its entry.

    The masks of each phantom (lungs, lesions) are the ground truth that
    `cov3d synth` does not write: regenerating them from the seed is how a
    saliency map of a synthetic scan is checked against where the lesions are.
    """
    if scans < 10:
        raise Cov3dError(f"--scans {scans} is too few; at least 10 give every split both classes")
    if width < 32:
        raise Cov3dError(f"--width {width} is too small for a phantom; use 32 or more")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise Cov3dError(f"--seed {seed} is outside 0 … {MAX_SEED} (2^32 - 1); give a whole number in that range")
    rng = np.random.default_rng(seed)
    n_test = max(2, scans // 10)
    n_valid = max(4, scans // 5)
    n_train = scans - n_test - n_valid
    counters: dict[str, int] = {}
    for split, count in (("train", n_train), ("validation", n_valid), ("test", n_test)):
        for index in range(count):
            covid = index % 2 == 0
            severity = (index // 2) % 4 + 1 if covid else 0
            listed = covid and (index // 2) % 3 != 2
            label = "covid" if covid else "non-covid"
            phantom = make_phantom(rng, severity, width=width, nodule=not covid and (index // 2) % 3 == 0)
            name = f"ct_scan_{counters.setdefault(split, 0)}"
            counters[split] += 1
            relative = f"{split}/{name}" if split == "test" else f"{split}/{label}/{name}"
            yield SynthScan(relative, split, "" if split == "test" else label, severity, listed and split != "test",
                            phantom.nodule, phantom.lesion_fraction), phantom


def synthesize(root: Path, scans: int = 160, seed: int = 0, width: int = 128,
               progress: Callable[[int, int], None] | None = None) -> list[SynthScan]:
    """Write a COV19-CT-DB-style data set of `scans` phantoms under `root`; deterministic for `seed`.

    70% train, 20% validation, 10% test (at least two scans of each class in
    train and validation); half the labelled scans are covid with severities
    1–4 in turn; about a third of the covid scans are left out of the severity
    CSVs; every third non-covid scan has a nodule.
    """
    root = Path(root)
    made: list[SynthScan] = []
    check_writable(root, folder=True)  # a file, or a read-only disk: one line, before any phantom is made
    generated = phantoms(scans, seed, width)
    first = next(generated)  # checks the arguments before anything is written
    if root.exists() and any(root.iterdir()):
        raise Cov3dError(f"'{root}' is not empty; choose a new folder for the synthetic data set")
    for entry, phantom in itertools.chain([first], generated):
        write_scan(root / entry.path, phantom.hu)
        made.append(entry)
        if progress:
            progress(len(made), scans)
    for split, file_name in SEVERITY_FILES.items():
        lines = ["Name;Category"] + [f"{s.path.rsplit('/', 1)[-1]};{s.severity}" for s in made
                                    if s.split == split and s.severity_listed]
        write_text(root / file_name, "\n".join(lines) + "\n")
    log.info("wrote %d synthetic scans to %s", len(made), root)
    return made
