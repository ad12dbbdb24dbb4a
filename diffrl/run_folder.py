"""The names of the files and folders of a run folder (``runs/<name>/``), in one place: the job
writes them, the learner its checkpoints and ledger lines, ``diffrl status``/``report``/``bench`` read
them (docs/operations.md describes each)."""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
"""The resolved recipe of the run."""
CONFIG_RESUMED = "config.resumed.yaml"
"""The resolved recipe of a resumed run (the original config.yaml stays)."""
METRICS = "metrics.jsonl"
"""One JSON line per learner step."""
EVAL = "eval.jsonl"
"""One JSON line per held-out evaluation."""
SUMMARY = "summary.json"
"""The run's summary, written at the end."""
LEDGER = "ledger.json"
"""The experience stream's ledger (groups produced, by fate, pending)."""
TRAINED_GROUPS = "trained_groups.txt"
"""Every committed trained group: ``group_id<TAB>step`` per line."""
ENDPOINTS = "endpoints.json"
"""Where the running job's services listen (metrics, reward servers)."""
GRIDS = "grids"
"""Image grids of the evaluations (``step_XXXXXX.png``)."""
LOGS = "logs"
"""Logs of the processes the job started."""
CHECKPOINTS = "checkpoints"
"""Learner checkpoints (``step_XXXXXX/`` and ``latest``)."""


def grid_path(run_dir: str | Path, step: int) -> Path:
    """The evaluation grid of ``step``."""
    return Path(run_dir) / GRIDS / f"step_{step:06d}.png"
