"""The options of a training run: :class:`TrainConfig`, and the recipes that fill in those left unset.

Neither fastai nor torch at import: the command line takes its option defaults from these fields, and
`import cov3d.cli` stays light; the modules that need torch are imported where they are used.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields

from cov3d.errors import Cov3dError
from cov3d.models.defaults import DROPOUT, PENULTIMATE
from cov3d.models.registry import SLICES, get_arch, resolve_pretrained

log = logging.getLogger(__name__)

# Seeds go to NumPy's legacy seeding (np.random.seed), which takes 0 … 2**32 - 1.
MAX_SEED = 2**32 - 1

# Options a run takes from its recipe unless given. Fine-tuning pretrained weights: the paper's values
# (§3.4-3.5). From scratch (no pretrained weights, or none exist): measured on the demo's phantoms, see
# docs/training.md. Epochs stay the paper's for both.
RECIPES: dict[str, dict[str, float | int]] = {
    "fine-tune": {"lr": 1e-4, "batch_size": 2, "dropout": DROPOUT, "epochs": 40},
    "scratch": {"lr": 1e-3, "batch_size": 8, "dropout": 0.0, "epochs": 40},
}


def _lung_window() -> tuple[float, float]:
    """The readers' default HU window; imported on use, since the readers load torch."""
    from cov3d.data.readers import DEFAULT_WINDOW

    return DEFAULT_WINDOW


def check_seed(seed: int, option: str = "--seed") -> int:
    """`seed` if it is a whole number in 0 … 2**32 - 1 (what NumPy's seeding takes), else a Cov3dError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise Cov3dError(f"{option} {seed} is outside 0 … {MAX_SEED} (2^32 - 1); give a whole number in that range")
    return seed


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system tells it, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def cap_workers(workers: int, option: str) -> int:
    """`workers` processes, but no more than the cores (with a warning): more only add memory and switching."""
    cores = available_cores()
    if workers > cores:
        log.warning("%s %d is more than the %d CPU core(s) here; using %d", option, workers, cores, cores)
        return cores
    return workers


@dataclass
class TrainConfig:
    """Every option of a training run; the paper's defaults (§3.2–3.5, Table 3 run 1 except size)."""

    data: str
    output: str
    arch: str = "r3d_18"
    pretrained: bool | None = None  # None: the architecture's default (pretrained where weights exist)
    weights: list[str] = field(default_factory=list)  # local pretrained files, one per component of the arch
    size: str | None = "small"
    depth: int | None = None
    width: int | None = None
    lam: float = 0.1
    presence_smoothing: float = 0.1
    severity_smoothing: float = 0.0
    severity_weights: str = "inverse"  # inverse frequency per severity category; "presence": eq. 4-5's item weight
    dropout: float | None = None  # None: from the recipe (RECIPES), as are lr, batch_size and epochs
    penultimate: int = PENULTIMATE
    pool: str = "avg"  # the paper's text; the paper author's code uses "max"
    final_bias: bool = True  # the paper's text; the paper author's code has no final bias
    lr: float | None = None
    weight_decay: float = 1e-5
    batch_size: int | None = None
    epochs: int | None = None
    # precise BatchNorm: training scans measured before each validation; 0 = off. 64 scored as all the training
    # scans did on two runs, at a third or less of the cost (docs/training.md).
    bn_scans: int = 64
    flip: bool = True
    crop: float = 1.0  # seed 004's random crop: smallest kept fraction of each axis; 1 = off
    slices: int = 0  # 2D slice models: slices sampled per scan in a training step; 0 = all
    # BatchNorm statistics over the global batch (SyncBatchNorm). None: on for distributed runs on CUDA, where
    # it measured better at batch 2 per process, off otherwise (no CPU version); see docs/distributed.md.
    sync_bn: bool | None = None
    seed: int = 42
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda[:N]
    loader_workers: int | None = None
    cache: str | None = None
    window: tuple[float, float] = field(default_factory=_lung_window)  # DEFAULT_WINDOW, the lung window
    # The model sees the whole volume ("off"), the lungs' box ("crop"), or each lung on its own ("split"):
    # cov3d.data.lungs. Off until the measurement in docs/training.md says otherwise.
    lungs: str = "off"
    train_severity: str | None = None
    validation_severity: str | None = None
    wandb: bool = False
    wandb_project: str = "cov3d"
    wandb_entity: str | None = None
    wandb_mode: str | None = None
    resolved: dict = field(default_factory=dict)  # filled in by train(): sizes, weights, versions…

    def to_json(self) -> dict:
        """The config as config.json holds it: every field, the severity weight named `lambda` as the option."""
        data = asdict(self)
        data["lambda"] = data.pop("lam")
        return data

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        """A config from config.json, including those of cov3d 0.1 (`lam`, one weights path or null)."""
        data = dict(data)
        data.pop("resolved", None)
        if "lambda" in data:
            data["lam"] = data.pop("lambda")
        if "window" in data:
            data["window"] = tuple(data["window"])
        if not isinstance(data.get("weights", []), list):
            data["weights"] = [data["weights"]] if data["weights"] else []
        # A run of cov3d 0.1 goes on as it began: presence-weighted severity, fastai's BatchNorm statistics.
        data.setdefault("severity_weights", "presence")
        data.setdefault("bn_scans", 0)
        return cls(**data)

    @property
    def recipe(self) -> str:
        """'fine-tune' from pretrained weights, else 'scratch'."""
        pretrained = resolve_pretrained(self.arch, self.pretrained, len(self.weights))
        return "fine-tune" if pretrained else "scratch"

    def with_recipe(self) -> TrainConfig:
        """This config with lr, batch size, dropout and epochs taken from its recipe where not given."""
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self

    def validate(self) -> None:
        from cov3d.models.video import POOLS
        from cov3d.training.loss import SEVERITY_WEIGHTINGS
        from cov3d.training.precision import PRECISIONS
        from cov3d.data.lungs import LUNG_MODES
        from cov3d.data.readers import parse_window

        spec = get_arch(self.arch)
        missing = [name for name in RECIPES["scratch"] if getattr(self, name) is None]
        if missing:
            raise Cov3dError(f"{', '.join(missing)} not set; call TrainConfig.with_recipe() first")
        for f in fields(self):  # NaN passes every comparison below: refuse it (and inf) first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise Cov3dError(f"{_option(f.name)} {value} is not a finite number")
        if not 0.0 <= self.lam <= 1.0:
            raise Cov3dError(f"--lambda {self.lam} is outside [0, 1]; 0 trains presence only, 1 severity only")
        for name in ("presence_smoothing", "severity_smoothing", "dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise Cov3dError(f"--{name.replace('_', '-')} {value} must be within [0, 1)")
        if self.epochs < 1 or self.batch_size < 1:
            raise Cov3dError(f"--epochs {self.epochs} and --batch-size {self.batch_size} must be at least 1")
        if self.lr <= 0:
            raise Cov3dError(f"--lr {self.lr} must be positive")
        if self.weight_decay < 0:
            raise Cov3dError(f"--weight-decay {self.weight_decay} must be 0 (none) or more")
        check_seed(self.seed)
        if self.loader_workers is not None and self.loader_workers < 0:
            raise Cov3dError(f"--loader-workers {self.loader_workers} must be 0 (load in the main process) or more")
        self.window = parse_window(self.window)
        if self.lungs not in LUNG_MODES:
            raise Cov3dError(f"--lungs {self.lungs} is not one of {', '.join(LUNG_MODES)}")
        if self.precision not in PRECISIONS:
            raise Cov3dError(f"--precision {self.precision} is not one of {', '.join(PRECISIONS)}")
        if self.pool not in POOLS:
            raise Cov3dError(f"--pool {self.pool} is not one of {', '.join(POOLS)}")
        if not 0.0 < self.crop <= 1.0:
            raise Cov3dError(f"--crop {self.crop} must be within (0, 1]; 1 turns cropping off")
        if self.slices < 0:
            raise Cov3dError(f"--slices {self.slices} must be 0 (all slices) or more")
        if self.severity_weights not in SEVERITY_WEIGHTINGS:
            raise Cov3dError(f"--severity-weights {self.severity_weights} is not one of "
                             f"{', '.join(SEVERITY_WEIGHTINGS)}")
        if self.bn_scans < 0:
            raise Cov3dError(f"--bn-scans {self.bn_scans} must be 0 (off) or more")
        if self.slices and spec.input != SLICES:
            raise Cov3dError(f"--slices applies to 2D slice models only, not --arch {self.arch}; leave it out")
        resolve_pretrained(self.arch, self.pretrained, len(self.weights))
        self.check_shapes()

    def check_shapes(self) -> None:
        """Refuse, before any preprocessing, a network that cannot train on this run's input size and batch.

        One training step's forward pass on the meta device (no memory, no arithmetic): BatchNorm needs
        more than one value per channel (a batch of 1 fails where the last stage's map is one voxel), and
        every architecture must take the size.
        """
        from cov3d.data.preprocess import resolve_size
        from cov3d.models.registry import check_trainable

        size = resolve_size(self.size, self.depth, self.width)
        check_trainable(self.arch, size.depth, size.width, self.batch_size, slices=self.slices,
                        penultimate=self.penultimate, pool=self.pool, final_bias=self.final_bias)


def _option(name: str) -> str:
    """The command-line option of a TrainConfig field: `lam` is --lambda, `batch_size` --batch-size."""
    return "--lambda" if name == "lam" else "--" + name.replace("_", "-")

