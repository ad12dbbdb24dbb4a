"""One log file per process under ``RUN/logs/`` (learner-<rank>.log, sampler-<i>.log, reward-<name>-<i>.log,
driver.log), also on a cluster where the processes run on other nodes.

A Ray actor calls :func:`redirect_process_output` first thing: the process's stdout and stderr (file
descriptors 1 and 2, so Python logging, print, DeepSpeed, tqdm, C++ warnings and a dying actor's
traceback alike) go to its file in the run folder on its node, instead of Ray's temporary session
folder. With object storage (``run.storage`` a URL) a :class:`LogMirror` thread uploads the file every
``interval_s`` and once more at exit, so ``RUN/logs/`` in the storage has every process's log.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from pathlib import Path

from diffrl import run_folder

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def process_log_path(run_dir: str | Path, process: str) -> Path:
    """``RUN/logs/<process>.log``."""
    return Path(run_dir) / run_folder.LOGS / f"{process}.log"


def redirect_process_output(run_dir: str | Path, process: str, level: int = logging.INFO) -> Path:
    """Send this process's stdout/stderr to ``RUN/logs/<process>.log`` (appending: a restarted actor
    continues the file) and log ``diffrl.*`` records at ``level`` there; the path."""
    path = process_log_path(run_dir, process)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logger = logging.getLogger("diffrl")
    if not any(getattr(h, "_diffrl_process_log", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._diffrl_process_log = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(min(level, logger.level or level))
    logging.getLogger("diffrl").info("%s (pid %d) logs to %s", process, os.getpid(), path)
    return path


class LogMirror:
    """Uploads one local log file to ``storage`` (a :class:`diffrl.storage.RunStorage`) as
    ``logs/<file name>`` every ``interval_s`` seconds while it grows, and at :meth:`close`/exit."""

    def __init__(self, storage, path: Path, interval_s: float = 30.0):
        self.storage, self.path, self.interval_s = storage, Path(path), interval_s
        self._sent_size = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"log-mirror-{self.path.name}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def upload(self) -> None:
        try:
            size = self.path.stat().st_size
            if size != self._sent_size:
                self.storage.put_file(self.path, f"{run_folder.LOGS}/{self.path.name}")
                self._sent_size = size
        except Exception as err:  # noqa: BLE001 - a log upload must never stop the process
            logging.getLogger(__name__).warning("log upload of %s failed: %s", self.path, err)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.upload()

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self.upload()


def start_process_log(run_dir: str | Path, process: str, storage=None) -> LogMirror | None:
    """:func:`redirect_process_output`, plus a :class:`LogMirror` when the run has object storage
    (returned, so that the process can upload once more when its work ends: Ray may kill an actor's
    process without running its exit handlers)."""
    path = redirect_process_output(run_dir, process)
    return LogMirror(storage, path) if storage is not None else None
