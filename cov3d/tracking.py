"""Weights & Biases logging for a training run.

fastai's own WandbCallback crashes in `before_fit` in fastai 2.8.9–2.8.12
(fastai issue #4173), so cov3d logs through the wandb API directly: the config
at start, one row per epoch (losses, scores, learning rate), the best scores in
the run summary, and the run directory as a model artifact at the end.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import Cov3dError

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")


class WandbRun:
    """One W&B run mirroring one cov3d training run."""

    def __init__(self, config, run: Path):
        import wandb

        mode = config.wandb_mode or os.environ.get("WANDB_MODE") or "online"
        if mode not in MODES:
            raise Cov3dError(f"W&B mode '{mode}' is not one of {', '.join(MODES)}")
        self.directory = Path(run)
        self.wandb = wandb
        try:
            self.run = wandb.init(project=config.wandb_project, entity=config.wandb_entity, mode=mode,
                                  dir=str(self.directory), name=self.directory.name,
                                  config=config.to_json())
        except Exception as error:  # login, network or permission problems all mean: not logging
            raise Cov3dError(f"W&B could not start ({type(error).__name__}: {error}); "
                             "log in with `wandb login`, or use --wandb-mode offline") from None

    def log_epoch(self, row: dict) -> None:
        values = {k: v for k, v in row.items() if k not in ("epoch", "epochs") and v is not None}
        self.run.log(values, step=int(row["epoch"]))

    def finish(self, best: dict[str, float]) -> None:
        for name, score in best.items():
            self.run.summary[f"best_{name}"] = score
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"cov3d-{self.directory.resolve().name}")
        artifact = self.wandb.Artifact(name, type="model", description="cov3d run directory")
        for file in sorted(self.directory.iterdir()):
            if file.is_file() and not file.name.startswith("."):
                artifact.add_file(str(file))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()
