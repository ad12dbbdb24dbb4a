"""Configuration of a reward server process: request limits, how scoring is executed, where it
listens. Dataclasses with attribute docstrings (``diffrl reward serve NAME --help`` lists them);
the scorer's own options live in its ``Options`` class (``scorer.*`` keys).

The bearer token is deliberately not a config field: recipes are shared and logged, so the token
comes from ``--token-file`` or the ``DIFFRL_REWARD_TOKEN`` environment variable only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffrl.config import require

TOKEN_ENV = "DIFFRL_REWARD_TOKEN"
"""Environment variable holding the optional bearer token (server and client)."""


@dataclass
class ServerLimits:
    """What one request may ask for. Anything beyond is refused with a 4xx before decoding."""

    max_request_bytes: int = 64 * 1024 * 1024
    """Largest request body in bytes (checked on Content-Length and while streaming): 413 beyond."""
    max_items: int = 256
    """Most images in one request: 413 beyond."""
    max_image_pixels: int = 4096 * 4096
    """Most pixels (width x height, read from the image header before decoding) of one image: 413
    beyond. Also set as PIL's ``Image.MAX_IMAGE_PIXELS``."""
    max_request_pixels: int = 64 * 1024 * 1024
    """Most decoded pixels summed over one request's images (bounds the memory of a request): 413
    beyond."""
    max_prompt_chars: int = 4096
    """Longest prompt, in characters: 413 beyond."""
    max_pending_items: int = 4096
    """Most images admitted but not yet scored across all requests of the process; a request that
    would exceed it gets 503 with Retry-After (clients retry on another replica)."""

    def validate(self) -> None:
        require(self.max_request_bytes > 0, "max_request_bytes", "an int > 0", self.max_request_bytes)
        require(self.max_items > 0, "max_items", "an int > 0", self.max_items)
        require(self.max_image_pixels > 0, "max_image_pixels", "an int > 0", self.max_image_pixels)
        require(self.max_request_pixels >= self.max_image_pixels, "max_request_pixels",
                "an int >= max_image_pixels", self.max_request_pixels)
        require(self.max_prompt_chars > 0, "max_prompt_chars", "an int > 0", self.max_prompt_chars)
        require(self.max_pending_items >= self.max_items, "max_pending_items", "an int >= max_items",
                self.max_pending_items)


@dataclass
class ExecutionConfig:
    """How scoring runs inside the process. The event loop only moves bytes; decoding and scoring
    run in a thread pool (the built-in scorers spend their time in OpenCV, Pillow, onnxruntime or a
    tesseract subprocess, all of which release the GIL). For a scorer that holds the GIL, use more
    processes (``workers``) rather than more threads."""

    threads: int = 2
    """Threads decoding and scoring concurrently (0 = one per CPU this process may use)."""
    microbatch: str = "auto"
    """Merge concurrent requests into one scorer call: always, never, or auto (always for scorers that
    declare they gain from batching, e.g. onnx)."""
    max_batch_items: int = 64
    """Micro-batching: most images in one scorer call."""
    max_wait_ms: float = 5.0
    """Micro-batching: longest a request waits for others to join its batch, in milliseconds."""
    latency_ms: float = 0.0
    """Simulated remote latency (benchmarks, tests): each scoring request is answered this many
    milliseconds later on average, as if the reward were a remote GPU model (e.g. 300-800). The wait
    is an asyncio sleep after scoring, so concurrent requests overlap and the scoring threads stay
    free; refused requests are not delayed. Counted in diffrl_reward_injected_latency_seconds_total.
    0 = none (the default; never set it in production)."""
    latency_jitter_ms: float = 0.0
    """Spread of the simulated latency: each request waits a uniform draw from
    [latency_ms - jitter, latency_ms + jitter] milliseconds (at most latency_ms)."""

    def validate(self) -> None:
        require(self.threads >= 0, "threads", "an int >= 0", self.threads)
        require(self.microbatch in ("auto", "always", "never"), "microbatch", "one of auto, always, never",
                self.microbatch)
        require(self.max_batch_items > 0, "max_batch_items", "an int > 0", self.max_batch_items)
        require(0 <= self.max_wait_ms <= 10_000, "max_wait_ms", "a float in [0, 10000]", self.max_wait_ms)
        require(0 <= self.latency_ms <= 600_000, "latency_ms", "milliseconds in [0, 600000]", self.latency_ms)
        require(0 <= self.latency_jitter_ms <= self.latency_ms, "latency_jitter_ms",
                "milliseconds in [0, latency_ms]", self.latency_jitter_ms)


@dataclass
class RewardServerConfig:
    """One reward server process (``diffrl reward serve NAME``)."""

    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 exposes the server to the network; set a token then)."""
    port: int = 8100
    """TCP port (0 picks a free one; the chosen port is printed)."""
    workers: int = 1
    """Server processes sharing the port (uvicorn workers); each loads its own scorer."""
    log_level: str = "warning"
    """uvicorn log level (access logs are off)."""
    limits: ServerLimits = field(default_factory=ServerLimits)
    """Request limits."""
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    """Thread pool and micro-batching."""

    def validate(self) -> None:
        require(0 <= self.port <= 65535, "port", "an int in [0, 65535]", self.port)
        require(self.workers >= 1, "workers", "an int >= 1", self.workers)
        require(self.workers == 1 or self.port != 0, "port", "a fixed port when workers > 1", self.port)
        require(self.log_level in ("critical", "error", "warning", "info", "debug", "trace"), "log_level",
                "a uvicorn log level", self.log_level)
