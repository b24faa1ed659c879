"""Loggers the CLI uses by default."""
from __future__ import annotations

import csv
import os
import warnings
from typing import Any

from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_only


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` that *continues* a run's ``metrics.csv`` when it logs into an existing version
    directory (``moeparadigms fit ... --ckpt_path last`` resumes into the run it resumes), where Lightning's deletes
    the file and the first run's curves with it.

    Rows of the earlier run that lie at or after the point this run starts from (logged after the checkpoint it
    resumed, so trained again now) are dropped when this run logs its first row: a row with an epoch is kept when
    its (epoch, step) comes before the first new row's; rows without an epoch (logged by hand, e.g. against
    environment steps) are kept. Everything else is Lightning's logger."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._earlier: tuple[list[str], list[dict[str, str]]] | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            path = os.path.join(self.log_dir, "metrics.csv")
            if os.path.isfile(path):
                with open(path, newline="") as f:
                    reader = csv.DictReader(f)
                    rows = list(reader)
                    self._earlier = (list(reader.fieldnames or []), rows)
            with warnings.catch_warnings():  # "... will be deleted": not here, the rows are written back
                warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
                super().experiment  # noqa: B018 (creates the writer, which removes the old file)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        writer = self.experiment
        if self._earlier is not None:
            header, rows = self._earlier
            self._earlier = None
            epoch = metrics.get("epoch")
            if epoch is not None and step is not None:
                start = (float(epoch), float(step))

                def before(row: dict[str, str]) -> bool:
                    if not row.get("epoch") or not row.get("step"):
                        return True
                    return (float(row["epoch"]), float(row["step"])) < start

                rows = [r for r in rows if before(r)]
            with open(writer.metrics_file_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows(rows)
            writer.metrics_keys = list(header)
        super().log_metrics(metrics, step)
