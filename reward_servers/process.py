"""A reward server as a local child process (``python -m diffrl.reward_servers serve NAME``, or
``serve --scorer pkg.module:Class --name NAME`` for a custom scorer): the one
launcher of the embedded stack (``diffrl train`` without reward URLs), the reward benchmark and the
tests. (The embedded Redis lives in diffrl/embedded_redis.py; the local Ray is started by the job.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import httpx

from diffrl.config import ConfigError
from diffrl.utils import free_port

_REFUSED = "diffrl: bad config: "


class LocalRewardServer:
    """``diffrl reward serve NAME`` as a child process on 127.0.0.1, its output in ``log_path``.
    ``env`` is laid over this process's environment (OMP_NUM_THREADS=1 unless it says otherwise); a
    value of None removes that variable. ``cpus``: pin the server to these CPUs (before it starts any
    thread, so they all inherit the mask). ``scorer``: a built-in scorer name or ``pkg.module:Class``
    served as reward ``name`` (empty: the built-in ``name``); a custom scorer's module must be
    importable by the child, e.g. through ``PYTHONPATH`` in this process's environment or in ``env``."""

    def __init__(self, name: str, args: Sequence[str] = (), port: int | None = None,
                 log_path: str | Path | None = None, env: dict[str, str | None] | None = None,
                 cpus: Sequence[int] = (), scorer: str = ""):
        self.name = name
        self.scorer = scorer
        self.args = list(args)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/diffrl-reward-{name}-{self.port}.log")
        self.env = env
        self.cpus = list(cpus)
        self.proc: subprocess.Popen | None = None

    def start(self) -> LocalRewardServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(self.env or {})}
        env = {k: v for k, v in env.items() if v is not None}
        what = [self.name] if self.scorer in ("", self.name) else ["--scorer", self.scorer, "--name", self.name]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "diffrl.reward_servers", "serve", *what, "--host", "127.0.0.1",
                 "--port", str(self.port), *self.args],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60.0) -> LocalRewardServer:
        """Wait for ``/healthz``. A server that refused its config (exit status 2) raises ConfigError with
        its message; one that died otherwise, RuntimeError with its output's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                refused = [line for line in self.output().splitlines() if line.startswith(_REFUSED)]
                if code == 2 and refused:  # its config (e.g. a --scorer that does not load): one line, no traceback
                    raise ConfigError("", f"reward server {self.name!r}: {refused[-1].removeprefix(_REFUSED)}")
                raise RuntimeError(f"reward server {self.name} exited ({code}):\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"reward server {self.name} not ready after {timeout} s:\n{self.output()[-3000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def __enter__(self) -> Self:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
