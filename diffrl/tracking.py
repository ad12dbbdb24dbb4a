"""Experiment tracking: the job's train stats, held-out evaluation metrics and evaluation grids, sent
to TensorBoard, Weights & Biases and/or MLflow (``tracking.backends``; docs/operations.md,
"Experiment tracking").

Prometheus and Grafana are the service view of a live job; a tracker is the experiment view (curves
of many runs side by side, image panels). What each backend writes:

- ``tensorboard``: event files in ``RUN_DIR/tensorboard/`` (a resumed run adds a file there and drops
  the earlier files' events from the step it continues at). Train stats as ``train/<stat>``, held-out
  metrics as ``eval/<metric>``, the grid as the image ``eval/grid``.
- ``wandb``: a W&B run named after the run folder, with the resolved config and ``tracking.tags``;
  files under ``RUN_DIR/wandb/`` (offline: ``wandb sync`` uploads them later). Its id is kept in
  ``RUN_DIR/wandb_run_id.txt``, so ``--resume`` continues the same run.
- ``mlflow``: a run of experiment ``tracking.project``; params = the flattened config, tags =
  ``tracking.tags``, metrics with their step, grids as artifacts under ``grids/``. By default the
  store is ``RUN_DIR/mlflow.db`` (SQLite) with artifacts in ``RUN_DIR/mlruns/``; the run id is kept in
  ``RUN_DIR/mlflow_run_id.txt`` for ``--resume``.

Only finite numbers are logged (nested dicts such as ``reward_mean_by`` are flattened with ``/``).
Tracking never ends a run: a backend that raises while opening, logging or closing is warned about
once and counted (``diffrl_tracking_errors_total``, and ``tracking_errors`` in summary.json). A
backend whose package is missing is refused at startup by :func:`check_backends`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from diffrl.config import ConfigError
from diffrl.utils import PerRegistry

if TYPE_CHECKING:
    from diffrl.schema import TrackingConfig

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
"""TensorBoard event files, in the run folder."""
WANDB_ID_FILE = "wandb_run_id.txt"
"""The W&B run id, in the run folder (``--resume`` continues that run)."""
MLFLOW_ID_FILE = "mlflow_run_id.txt"
"""The MLflow run id, in the run folder (``--resume`` continues that run)."""
MLFLOW_DB = "mlflow.db"
"""The default MLflow tracking store (SQLite), in the run folder."""
MLFLOW_ARTIFACTS = "mlruns"
"""The default MLflow artifact folder, in the run folder."""
GRID_TAG = "eval/grid"
"""Name of the evaluation grid image (TensorBoard, W&B)."""

TRACKING_ERRORS_TOTAL = "diffrl_tracking_errors_total"
"""Counter (label backend): tracker calls that raised (open, log, close) in the job driver; the run goes
on. Also written to summary.json as ``tracking_errors``."""

# backend -> (module that must be importable, pip requirement that brings it)
_REQUIRES = {
    "tensorboard": (("tensorboard",), "pip install tensorboard (a dependency of diffrl)"),
    "wandb": (("wandb",), "pip install 'diffrl[wandb]'"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "pip install 'diffrl[mlflow]'"),
}


def check_backends(cfg: TrackingConfig) -> None:
    """Raise :class:`ConfigError` (``tracking.backends``) when a chosen backend's package is not
    installed: called by the job before anything heavy starts. Finds the modules without importing them."""
    for name in cfg.active:
        modules, install = _REQUIRES[name]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError("tracking.backends", f"the {name} tracker needs the Python package(s) "
                              f"{', '.join(missing)}, which are not installed: {install} "
                              f"(or leave {name} out of tracking.backends)")


class TrackingMetrics(PerRegistry):
    """The tracker's own metrics, one set per registry."""

    def __init__(self, registry: CollectorRegistry):
        self.errors = Counter(TRACKING_ERRORS_TOTAL[: -len("_total")], "Tracker calls that raised.",
                              ["backend"], registry=registry)


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``values`` as floats, nested mappings flattened with ``/``; booleans,
    strings, lists, None, NaN and infinities are left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, prefix=f"{name}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys of a nested config dict and their values as text (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, prefix=f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


# ------------------------------------------------------------------------------------------ backends
class _Backend:
    name = ""

    def log(self, step: int, values: dict[str, float], grid: Path | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TensorBoard(_Backend):
    name = "tensorboard"

    def __init__(self, run_dir: Path, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        self._cls = SummaryWriter
        self.dir = run_dir / TENSORBOARD_DIR
        self.resumed = resumed
        self.writer = None

    def _writer(self, step: int):
        if self.writer is None:
            # resumed: the new event file starts with a purge marker at the first step it logs, so
            # TensorBoard drops what the earlier run logged from there on (steps trained again)
            self.writer = self._cls(log_dir=str(self.dir), purge_step=step if self.resumed else None,
                                    flush_secs=10)
        return self.writer

    def log(self, step: int, values: dict[str, float], grid: Path | None = None) -> None:
        writer = self._writer(step)
        for key, value in values.items():
            writer.add_scalar(key, value, global_step=step)
        if grid is not None:
            import numpy as np
            from PIL import Image

            with Image.open(grid) as im:
                writer.add_image(GRID_TAG, np.asarray(im.convert("RGB")), global_step=step, dataformats="HWC")
            writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _WandB(_Backend):
    name = "wandb"

    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, config: dict):
        import wandb

        self._wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None  # None: W&B makes one
        self.run = wandb.init(project=cfg.project, name=run_name, config=config, tags=list(cfg.tags),
                              dir=str(run_dir), id=run_id, resume="allow" if run_id else None,
                              mode=cfg.wandb_mode or None, reinit="create_new",
                              settings=wandb.Settings(console="off"))
        id_file.write_text(self.run.id + "\n")

    def log(self, step: int, values: dict[str, float], grid: Path | None = None) -> None:
        data: dict[str, Any] = dict(values)
        if grid is not None:
            data[GRID_TAG] = self._wandb.Image(str(grid), caption=f"step {step}")
        self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


_MLFLOW_KEY = re.compile(r"[^\w\-. /:]")


class _MLflow(_Backend):
    name = "mlflow"
    BATCH = 100  # params per log_batch call (the store's limit); metrics allow 1000

    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, config: dict):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        artifacts = None
        if not uri:  # the run folder's own store
            uri = f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}"
            artifacts = (run_dir / MLFLOW_ARTIFACTS).resolve().as_uri()
        self.client = client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        id_file = run_dir / MLFLOW_ID_FILE
        run = None
        if id_file.is_file():
            with contextlib.suppress(Exception):  # a store that lost the run: start a new one
                run = client.get_run(id_file.read_text().strip())
        tags = {t: "" for t in cfg.tags}
        if run is None:
            exp = client.get_experiment_by_name(cfg.project)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.project, artifact_location=artifacts)
            run = client.create_run(exp_id, run_name=run_name, tags=tags)
            id_file.write_text(run.info.run_id + "\n")
        else:
            client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        have = run.data.params  # a resumed run keeps its params (MLflow refuses to change one)
        params = [Param(k[:250], v[:6000]) for k, v in flatten_config(config).items() if k[:250] not in have]
        for i in range(0, len(params), self.BATCH):
            client.log_batch(self.run_id, params=params[i: i + self.BATCH])
        if tags:
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log(self, step: int, values: dict[str, float], grid: Path | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i: i + 1000])
        if grid is not None:
            self.client.log_artifact(self.run_id, str(grid), artifact_path="grids")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# ------------------------------------------------------------------------------------------- tracker
class Tracker:
    """Fans the job's records out to the configured backends; a backend that raises is warned about
    once, counted (``errors`` and ``diffrl_tracking_errors_total``) and called again next time."""

    def __init__(self, backends: list[_Backend] = (), registry: CollectorRegistry | None = None):
        self.backends = list(backends)
        self.errors: dict[str, int] = {}
        self._metrics = TrackingMetrics.for_registry(registry)
        self._warned: set[str] = set()

    @classmethod
    def open(cls, cfg: TrackingConfig, run_dir: str | Path, run_name: str, config: dict, resumed: bool,
             registry: CollectorRegistry | None = None) -> Tracker:
        """Open every backend of ``cfg`` for the run folder ``run_dir``; one that fails to open is warned
        about, counted and left out."""
        run_dir = Path(run_dir)
        tracker = cls(registry=registry)
        makers = {"tensorboard": lambda: _TensorBoard(run_dir, resumed),
                  "wandb": lambda: _WandB(cfg, run_dir, run_name, config),
                  "mlflow": lambda: _MLflow(cfg, run_dir, run_name, config)}
        for name in cfg.active:
            try:
                tracker.backends.append(makers[name]())
            except Exception as err:  # noqa: BLE001 - a tracker never ends a training run
                tracker._failed(name, "open", err)
        return tracker

    def _failed(self, name: str, what: str, err: Exception) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1
        self._metrics.errors.labels(backend=name).inc()
        if name not in self._warned:
            self._warned.add(name)
            log.warning("tracking: the %s tracker failed to %s (%s: %s); the run goes on (further errors "
                        "are counted in %s)", name, what, type(err).__name__, err, TRACKING_ERRORS_TOTAL)
        else:
            log.debug("tracking: %s failed to %s", name, what, exc_info=err)

    def _each(self, what: str, call) -> None:
        for backend in self.backends:
            try:
                call(backend)
            except Exception as err:  # noqa: BLE001 - a tracker never ends a training run
                self._failed(backend.name, what, err)

    def log_train(self, step: int, stats: Mapping[str, Any]) -> None:
        """One learner step's stats, as ``train/<stat>``."""
        values = scalars(stats, prefix="train/")
        self._each("log", lambda b: b.log(step, values))

    def log_eval(self, step: int, metrics: Mapping[str, Any], grid_path: str | Path | None = None) -> None:
        """One held-out evaluation's metrics, as ``eval/<metric>``, and its image grid (if it exists)."""
        values = scalars(metrics, prefix="eval/")
        grid = Path(grid_path) if grid_path is not None and Path(grid_path).is_file() else None
        self._each("log", lambda b: b.log(step, values, grid))

    def close(self) -> None:
        """Close every backend (flush event files, finish the W&B run, end the MLflow run); idempotent."""
        self._each("close", lambda b: b.close())
        self.backends = []
