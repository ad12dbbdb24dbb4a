"""``diffrl bench reward NAME``: images/s of a reward over HTTP (protobuf, then JSON) against
calling the same scorer in-process on the same cores.

A server process (``python -m diffrl.reward_servers serve NAME``) is pinned to ``server_cpus`` with
``threads`` scoring threads; the load generator (this process, async httpx, ``concurrency``
requests in flight, request bodies encoded beforehand: encoding is the sampler's cost) runs on
``client_cpus``. The in-process baseline pins this process to ``server_cpus`` and runs
``scorer.score_batch`` on the decoded arrays from ``threads`` threads (the work the server must
match: it additionally receives, parses and decodes; a run "with decode" adds the PNG decoding).
Each figure is the median of ``repeats`` runs of at least ``batches`` batches of ``batch_size``
images and ``min_seconds`` seconds (after ``warmup`` batches). Besides wall-clock images/s, images
per CPU second of the scoring process are reported (server: all its threads plus finished children,
from /proc; in-process: this process), which other tenants of a shared machine disturb far less.

Workloads (synthetic, deterministic): shapes = shapes-world renders (32x32) scored against their
prompts; ocr = words rendered by Pillow at 128x64 / 256x64 (``images=text-world``: the text world's 32x32
signs); compressibility = 64x64 shapes renders
and noise; detector = 360x140 drawings of 0-3 cartoon faces; onnx = 64x64 renders (needs
``server=[scorer.path=...]``).
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from google.protobuf import json_format

from diffrl.config import require
from diffrl.proto import reward_pb2
from diffrl.reward_servers.images import decode_image, encode_png
from diffrl.reward_servers.process import LocalRewardServer

WORDS = ("hello", "diffrl", "reward", "flow", "sample", "quick", "zebra", "tensor", "ocean", "river", "policy",
         "group", "sign", "coffee", "garden", "winter", "yellow", "mountain", "pixel", "market", "stone", "light",
         "planet", "forest", "silver", "bridge", "candle", "rocket", "summer", "violet", "castle", "dragon")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


@dataclass
class RewardBenchConfig:
    name: str = "shapes"
    """Reward to benchmark (shapes, ocr, compressibility, detector, onnx)."""
    batch_size: int = 32
    """Images per request / per in-process scorer call."""
    batches: int = 8
    """Fewest timed batches per run and mode."""
    min_seconds: float = 2.0
    """Each timed run lasts at least about this long (more batches for fast rewards), so CPU-time
    figures (10 ms clock ticks) are precise."""
    warmup: int = 3
    """Untimed batches before each run."""
    repeats: int = 3
    """Runs per mode; the median is reported."""
    concurrency: int = 4
    """HTTP requests in flight (enough to keep the server's queue non-empty)."""
    threads: int = 1
    """Scoring threads, in the server (execution.threads) and in the in-process baseline."""
    server_cpus: str = "0"
    """CPUs (comma-separated ids) of the server process and of the in-process baseline; empty = all."""
    client_cpus: str = "1"
    """CPUs of the load generator; empty = all."""
    server: list[str] = field(default_factory=list)
    """Extra server overrides, e.g. [scorer.parallel=2] or [scorer.path=/m.onnx]."""
    images: str = "default"
    """The images: default (the reward's own workload, above) or text-world (32x32 signs of the
    text world's words, scored by ocr: enlarged x4 before recognition, as in training)."""
    output: str = ""
    """Also write the result as JSON to this path."""

    def validate(self) -> None:
        require(self.batch_size >= 1, "batch_size", "an int >= 1", self.batch_size)
        require(self.batches >= 1, "batches", "an int >= 1", self.batches)
        require(self.repeats >= 1, "repeats", "an int >= 1", self.repeats)
        require(self.images in ("default", "text-world"), "images", "default or text-world", self.images)
        require(self.images == "default" or self.name == "ocr", "images", "default (text-world is for ocr)",
                self.images)
        require(self.concurrency >= 1, "concurrency", "an int >= 1", self.concurrency)
        require(self.threads >= 1, "threads", "an int >= 1", self.threads)
        for key in ("server_cpus", "client_cpus"):
            value = getattr(self, key)
            require(all(p.strip().isdigit() for p in value.split(",")) if value else True, key,
                    "comma-separated CPU ids", value)


# ----------------------------------------------------------------------------- synthetic workloads
def render_word(word: str, width: int = 128, height: int = 64) -> np.ndarray:
    """``word`` in black DejaVu Sans 30 px on white, uint8 [height, width, 3] RGB."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.truetype(FONT, 30)
    except OSError:
        font = ImageFont.load_default(size=30)
    im = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(im).text((6, 14), word, fill=(0, 0, 0), font=font)
    return np.asarray(im)


def draw_faces(n: int, width: int = 360, height: int = 140) -> np.ndarray:
    """A cartoon of ``n`` (<= 3) frontal faces that OpenCV's frontal-face Haar cascade detects."""
    import cv2

    img = np.full((height, width, 3), 255, np.uint8)
    s = 80
    for k in range(n):
        cx, cy = 60 + k * 120, height // 2
        cv2.ellipse(img, (cx, cy), (int(0.42 * s), int(0.55 * s)), 0, 0, 360, (170, 170, 170), -1)
        for dx in (-1, 1):
            ex, ey = cx + int(dx * 0.18 * s), cy - int(0.12 * s)
            cv2.ellipse(img, (ex, ey), (int(0.09 * s), int(0.05 * s)), 0, 0, 360, (40, 40, 40), -1)
            cv2.line(img, (ex - 8, ey - 8), (ex + 8, ey - 8), (60, 60, 60), 2)
        cv2.line(img, (cx, cy - 4), (cx, cy + 10), (130, 130, 130), 2)
        cv2.ellipse(img, (cx, cy + int(0.27 * s)), (int(0.14 * s), int(0.04 * s)), 0, 0, 360, (60, 60, 60), -1)
    return cv2.GaussianBlur(img, (5, 5), 0)


def workload(name: str, n: int, seed: int = 0, images: str = "default"
             ) -> tuple[list[np.ndarray], list[str], list[dict[str, str]]]:
    """(images, prompts, metadata) of one benchmark batch for reward ``name`` (``images``: see
    RewardBenchConfig.images)."""
    import cv2

    from diffrl.models import text_world
    from diffrl.models.shapes_world import all_prompts, render_prompt

    rng = np.random.default_rng(seed)
    if images == "text-world":
        words = text_world.WORDS
        prompts = [text_world.format_prompt(words[int(i)]) for i in rng.integers(0, len(words), n)]
        return list(text_world.render_batch(prompts, [seed * 1000 + i for i in range(n)])), prompts, [{}] * n
    prompts_all = all_prompts()
    if name == "ocr":
        words = [WORDS[(seed + i) % len(WORDS)] for i in range(n)]
        images = [render_word(w, 128 if len(w) <= 5 else 256) for w in words]
        return images, [f'a sign that says "{w}"' for w in words], [{} for _ in words]
    if name == "detector":
        counts = [int(c) for c in rng.integers(0, 4, n)]
        return [draw_faces(c) for c in counts], [""] * n, [{"count": str(c)} for c in counts]
    prompts = [prompts_all[int(i)] for i in rng.integers(0, len(prompts_all), n)]
    images = [render_prompt(p, seed * 1000 + i) for i, p in enumerate(prompts)]
    if name in ("compressibility", "onnx"):
        images = [cv2.resize(im, (64, 64), interpolation=cv2.INTER_NEAREST) for im in images]
        if name == "compressibility":
            for im in images[::4]:
                im[...] = rng.integers(0, 256, im.shape, dtype=np.uint8)
    return images, prompts, [{} for _ in prompts]


# ----------------------------------------------------------------------------- helpers
_AVAILABLE_CPUS = frozenset(os.sched_getaffinity(0))


def _cpus(spec: str) -> set[int] | None:
    """The CPUs named by ``spec`` that this process may use (None: all, also when none of them is)."""
    cpus = {int(p) for p in spec.split(",")} & _AVAILABLE_CPUS if spec else set()
    return cpus or None


def _pin(spec: str) -> None:
    cpus = _cpus(spec)
    os.sched_setaffinity(0, cpus if cpus else _AVAILABLE_CPUS)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class _Server:
    """The benchmarked server: the shared launcher, pinned to ``server_cpus``, its log discarded."""

    def __init__(self, cfg: RewardBenchConfig):
        self.log = tempfile.NamedTemporaryFile(prefix="bench-reward-", suffix=".log", delete=False)  # noqa: SIM115
        self.server = LocalRewardServer(
            cfg.name, [f"execution.threads={cfg.threads}", "limits.max_items=1024", *cfg.server],
            log_path=self.log.name, env={"OMP_NUM_THREADS": str(cfg.threads), "DIFFRL_REWARD_TOKEN": None},
            cpus=_cpus(cfg.server_cpus)).start()
        self.port, self.url, self.pid = self.server.port, self.server.url, self.server.proc.pid
        try:
            self.server.wait_ready(timeout=90)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        self.server.stop()
        Path(self.log.name).unlink(missing_ok=True)


def _in_process(cfg: RewardBenchConfig, batches, with_decode: bool) -> tuple[float, float]:
    """(images/s, images per CPU second)."""
    from diffrl.reward_servers.scorers import get_scorer, make_options

    opts = {}
    for item in cfg.server:  # scorer.* overrides apply to the in-process scorer too
        key, _, value = item.partition("=")
        if key.startswith("scorer."):
            import yaml

            opts[key.removeprefix("scorer.")] = yaml.safe_load(value)
    scorer = get_scorer(cfg.name, make_options(cfg.name, **opts))
    pool = ThreadPoolExecutor(cfg.threads)

    def one(k: int) -> None:
        images, prompts, meta, pngs = batches[k % len(batches)]
        if with_decode:
            images = [decode_image(p, 1 << 30) for p in pngs]
        scorer.score_batch(images, prompts, meta)

    t0 = time.perf_counter()
    list(pool.map(one, range(cfg.warmup)))
    count = _timed_batches(cfg, (time.perf_counter() - t0) / max(cfg.warmup, 1))
    c0, t0 = _own_cpu_s(), time.perf_counter()
    list(pool.map(one, range(count)))
    dt, cpu = time.perf_counter() - t0, _own_cpu_s() - c0
    pool.shutdown()
    scorer.close()
    n = count * cfg.batch_size
    return n / dt, n / cpu


def _timed_batches(cfg: RewardBenchConfig, seconds_per_batch: float) -> int:
    return int(min(20_000, max(cfg.batches, math.ceil(cfg.min_seconds / max(seconds_per_batch, 1e-6)))))


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) and of its finished children
    (the OCR reward's tesseract processes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process (precise) and of its finished children (tesseract)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


async def _http(cfg: RewardBenchConfig, url: str, bodies: list[bytes], ctype: str,
                server_pid: int) -> tuple[float, float, float]:
    """(images/s, images per server CPU second, median request latency in ms)."""
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=cfg.concurrency)) as client:
        async def post(body: bytes) -> None:
            t = time.perf_counter()
            r = await client.post(f"{url}/v1/score", content=body, headers={"content-type": ctype, "accept": ctype})
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            latencies.append(time.perf_counter() - t)

        async def run(total: int) -> None:
            next_k = iter(range(total))

            async def worker() -> None:
                for k in next_k:
                    await post(bodies[k % len(bodies)])

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))

        t0 = time.perf_counter()
        await run(max(cfg.warmup, cfg.concurrency))
        count = _timed_batches(cfg, (time.perf_counter() - t0) / max(cfg.warmup, cfg.concurrency))
        latencies.clear()
        c0, t0 = _proc_cpu_s(server_pid), time.perf_counter()
        await run(count)
        dt, cpu = time.perf_counter() - t0, _proc_cpu_s(server_pid) - c0
    n = count * cfg.batch_size
    return n / dt, n / max(cpu, 1e-9), 1000 * statistics.median(latencies)


def bench_reward(cfg: RewardBenchConfig) -> dict:
    n_distinct = 4
    batches = []
    for k in range(n_distinct):
        images, prompts, meta = workload(cfg.name, cfg.batch_size, seed=k, images=cfg.images)
        batches.append((images, prompts, meta, [encode_png(im) for im in images]))
    proto_bodies, json_bodies = [], []
    for _, prompts, meta, pngs in batches:
        req = reward_pb2.ScoreRequest(items=[reward_pb2.Item(png=p, prompt=q, metadata=m)
                                             for p, q, m in zip(pngs, prompts, meta)])
        proto_bodies.append(req.SerializeToString())
        json_bodies.append(json_format.MessageToJson(req, indent=None).encode())
    original = os.sched_getaffinity(0)
    keys = ("in_process", "in_process_with_decode", "http_protobuf", "http_json")
    runs: dict[str, list[float]] = {k: [] for k in keys}
    per_cpu: dict[str, list[float]] = {k: [] for k in keys}
    latency: dict[str, list[float]] = {"protobuf": [], "json": []}
    server = _Server(cfg)
    try:
        for _ in range(cfg.repeats):
            _pin(cfg.server_cpus)
            for key, decode in (("in_process", False), ("in_process_with_decode", True)):
                ips, ipc = _in_process(cfg, batches, with_decode=decode)
                runs[key].append(ips)
                per_cpu[key].append(ipc)
            _pin(cfg.client_cpus)
            for enc, bodies, ctype in (("protobuf", proto_bodies, "application/x-protobuf"),
                                       ("json", json_bodies, "application/json")):
                ips, ipc, lat = asyncio.run(_http(cfg, server.url, bodies, ctype, server.pid))
                runs[f"http_{enc}"].append(ips)
                per_cpu[f"http_{enc}"].append(ipc)
                latency[enc].append(lat)
    finally:
        os.sched_setaffinity(0, original)
        server.stop()
    med = {k: statistics.median(v) for k, v in runs.items()}
    mcpu = {k: statistics.median(v) for k, v in per_cpu.items()}
    result = {
        "reward": cfg.name if cfg.images == "default" else f"{cfg.name} ({cfg.images})",
        "command": "diffrl bench reward " + cfg.name + "".join(
            f" {k}={v}" for k, v in (("batch_size", cfg.batch_size), ("concurrency", cfg.concurrency),
                                     ("threads", cfg.threads), ("server_cpus", cfg.server_cpus),
                                     ("client_cpus", cfg.client_cpus))) + "".join(f" {x}" for x in cfg.server)
                   + ("" if cfg.images == "default" else f" images={cfg.images}"),
        "machine": f"{os.cpu_count()} CPUs ({_cpu_model()}), Python {platform.python_version()}",
        "batch_size": cfg.batch_size,
        "images_per_s": {k: round(med[k], 1) for k in keys},
        "images_per_cpu_s": {k: round(mcpu[k], 1) for k in keys},
        "ratio_http_protobuf_vs_in_process": round(med["http_protobuf"] / med["in_process"], 3),
        "ratio_http_json_vs_in_process": round(med["http_json"] / med["in_process"], 3),
        "cpu_ratio_http_protobuf_vs_in_process": round(mcpu["http_protobuf"] / mcpu["in_process"], 3),
        "cpu_ratio_http_json_vs_in_process": round(mcpu["http_json"] / mcpu["in_process"], 3),
        "median_latency_ms": {k: round(statistics.median(v), 2) for k, v in latency.items()},
        "request_bytes": {"protobuf": len(proto_bodies[0]), "json": len(json_bodies[0])},
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
    }
    if cfg.output:
        import json

        Path(cfg.output).write_text(json.dumps(result, indent=2))
    return result


def format_report(r: dict) -> str:
    """One markdown table row (see docs/benchmarks.md for the columns)."""
    ips, ipc = r["images_per_s"], r["images_per_cpu_s"]
    return (f"| {r['reward']} | {ips['in_process']:.0f} | {ips['http_protobuf']:.0f} "
            f"({r['ratio_http_protobuf_vs_in_process']:.2f}) | {ips['http_json']:.0f} "
            f"({r['ratio_http_json_vs_in_process']:.2f}) | {ipc['in_process']:.0f} | {ipc['http_protobuf']:.0f} "
            f"({r['cpu_ratio_http_protobuf_vs_in_process']:.2f}) | {ipc['http_json']:.0f} "
            f"({r['cpu_ratio_http_json_vs_in_process']:.2f}) | {ips['in_process_with_decode']:.0f} | "
            f"{r['median_latency_ms']['protobuf']:.1f} / {r['median_latency_ms']['json']:.1f} | "
            f"{r['request_bytes']['protobuf']} / {r['request_bytes']['json']} |")
