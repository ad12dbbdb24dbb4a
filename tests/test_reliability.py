"""Reliability end to end: one real training run (local Ray, 2 sampler actors, the DeepSpeed learner
actor, 2 shapes reward server processes behind a bearer token, a password-protected redis-server with
an append-only file) meets every fault in turn, then is resumed, and the ledger must balance.

Faults, in order, while ``diffrl.job.train`` runs (a thread watches metrics.jsonl for the step):
 1. reward replica A is SIGKILLed: the client moves to B, no group is masked;
 2. sampler-0's actor is killed: Ray restarts it, the driver starts its loop again, and its new
    incarnation id keeps its group ids unique;
 3. every reward replica is down: groups are published masked (counted), samplers back off
    (counted); B comes back on the same port and training goes on by itself;
 4. Redis is stopped and started again on the same port with the same data: samplers and learner
    reconnect (retries counted);
 5. the learner actor is killed: the run fails; ``train`` with ``run.resume`` continues from the
    last checkpoint, re-reads what was not acknowledged, and trains each group at most once.

Then: produced == trained + dropped_stale + masked + duplicate + invalid + malformed + lost +
pending (run_dir/ledger.json and Redis agree), trained_groups.txt has each trained group once and as
many lines as the ledger's trained, and neither the token nor the Redis password is in the run folder.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_reward_servers import ServerProc

from diffrl.config import load_config
from diffrl.embedded_redis import EmbeddedRedis, connect
from diffrl.job import train
from diffrl.proto.bus import ledger_snapshot
from diffrl.schema import TrainConfig

pytestmark = pytest.mark.slow

TOKEN = "chaos-token-3f9a"
PASSWORD = "chaos pw/7"
FATES = ("trained", "dropped_stale", "masked", "duplicate", "invalid", "malformed", "lost")


def recipe(tmp_path: Path, model: Path, redis_url: str, urls: list[str]) -> Path:
    path = tmp_path / "chaos.yaml"
    path.write_text(json.dumps({
        "run": {"name": "chaos", "output_dir": str(tmp_path), "max_steps": 10, "eval_every": 0, "progress": False},
        "model": {"path": str(model)},
        "sampler": {"num_samplers": 2, "k": 4, "groups_per_round": 1, "max_pending_groups": 2,
                    "sampling": {"num_steps": 2}, "masked_backoff_s": 0.3, "masked_backoff_max_s": 1.0},
        "rewards": [{"name": "shapes", "urls": urls, "timeout_s": 5.0, "retries": 2}],
        "learner": {"groups_per_step": 2, "checkpoint_every": 2, "max_staleness": 6, "torch_threads": 1,
                    "crd": {"num_noise_levels": 2, "num_sampling_steps": 2}},
        "redis": {"url": redis_url, "retry": {"max_elapsed_s": 60, "initial_backoff_s": 0.05, "max_backoff_s": 0.5}},
        "ray": {"temp_dir": "/tmp/diffrl-ray-reliability"},
    }))
    return path


def train_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if '"kind": "train"' in line]
    return max(steps, default=0)


def group_ids(run_dir: Path, r) -> list[str]:
    """Group ids seen: entries still in the stream (acknowledged ones are trimmed) + committed trained ones."""
    path = run_dir / "trained_groups.txt"
    trained = [ln.split("\t")[0] for ln in path.read_text().splitlines()] if path.is_file() else []
    return [f[b"group_id"].decode() for _, f in r.xrange("experience")] + trained


def scrape_sum(urls: list[str], name: str) -> float:
    total = 0.0
    for url in urls:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            continue
        total += sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE))
    return total


class Chaos:
    """The fault schedule, run in a thread next to ``train`` (same process: it can reach Ray)."""

    def __init__(self, run_dir: Path, redis: EmbeddedRedis, replicas: dict[str, ServerProc], redis_kw: dict):
        self.run_dir, self.redis, self.replicas, self.redis_kw = run_dir, redis, replicas, redis_kw
        self.notes: dict = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def wait_step(self, step: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while train_steps(self.run_dir) < step:
            if time.monotonic() > deadline:
                raise TimeoutError(f"training did not reach step {step}")
            time.sleep(0.2)

    def ledger(self) -> dict:
        return ledger_snapshot(connect(self.redis.url), "experience")

    def incarnations(self, sampler: str) -> set[str]:
        return {g.split(":")[1] for g in group_ids(self.run_dir, connect(self.redis.url)) if g.startswith(sampler + ":")}

    def _run(self) -> None:
        try:
            self._faults()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err

    def _faults(self) -> None:
        import ray

        n = self.notes
        self.wait_step(2)
        endpoints = json.loads((self.run_dir / "endpoints.json").read_text())
        n["masked_before_a"] = self.ledger()["produced_masked"]
        self.replicas["a"].kill()  # 1. one replica dies
        self.wait_step(3)
        deadline = time.monotonic() + 120
        # its incarnation must be seen before the kill: the stream is trimmed as groups are acknowledged
        # and trained_groups.txt grows at checkpoints, so right after a step it can hold none of its ids
        while not (before := self.incarnations("sampler-0")):
            assert time.monotonic() < deadline, "sampler-0 published nothing that can be seen"
            time.sleep(0.2)
        ray.kill(ray.get_actor("sampler-0", namespace="diffrl"), no_restart=False)  # 2. a sampler dies
        deadline = time.monotonic() + 180
        while not self.incarnations("sampler-0") - before:  # restarted by Ray, its loop by the driver
            assert time.monotonic() < deadline, "sampler-0 did not publish again after its restart"
            time.sleep(0.3)
        n["sampler_incarnations"] = len(self.incarnations("sampler-0"))
        self.wait_step(train_steps(self.run_dir) + 1)
        n["masked_before_outage"] = self.ledger()["produced_masked"]
        self.replicas["b"].kill()  # 3. every replica of the reward is down
        deadline = time.monotonic() + 120
        # (sampler-0's metrics port changed with its restart: sampler-1's backoffs are the ones seen)
        while (self.ledger()["produced_masked"] < n["masked_before_outage"] + 3
               or scrape_sum(endpoints["sampler_metrics"], "diffrl_sampler_masked_backoffs_total") < 1):
            assert time.monotonic() < deadline, "no masked groups and backoffs while the reward was down"
            time.sleep(0.2)
        n["step_in_outage"] = train_steps(self.run_dir)
        n["backoffs"] = scrape_sum(endpoints["sampler_metrics"], "diffrl_sampler_masked_backoffs_total")
        port = self.replicas["b"].port
        self.replicas["b"] = ServerProc("shapes", port=port, env={"DIFFRL_REWARD_TOKEN": TOKEN}).wait_ready()
        self.wait_step(n["step_in_outage"] + 3)  # training resumed by itself (needs newly scored groups)
        self.redis.stop()  # 4. Redis goes away and comes back with its data
        time.sleep(1.5)
        self.redis = EmbeddedRedis(**self.redis_kw).start()
        n["retries_before"] = scrape_sum([endpoints["learner_metrics"], *endpoints["sampler_metrics"]],
                                         "diffrl_bus_retries_total")
        self.wait_step(train_steps(self.run_dir) + 2)
        n["retries_after"] = scrape_sum([endpoints["learner_metrics"], *endpoints["sampler_metrics"]],
                                        "diffrl_bus_retries_total")
        target = train_steps(self.run_dir) + 1
        self.wait_step(target + target % 2 + 1)  # an odd step: trained groups wait for a checkpoint
        n["killed_at"] = train_steps(self.run_dir)
        ray.kill(ray.get_actor("learner-0", namespace="diffrl"))  # 5. the learner dies


def test_faults_end_to_end_with_an_exact_ledger(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRL_REWARD_TOKEN", TOKEN)
    redis_kw = {"data_dir": tmp_path / "redis-data", "password": PASSWORD, "appendfsync": "always"}
    redis = EmbeddedRedis(port=0, **redis_kw).start()
    redis_kw["port"] = redis.port
    replicas = {k: ServerProc("shapes", env={"DIFFRL_REWARD_TOKEN": TOKEN}) for k in ("a", "b")}
    chaos = None
    try:
        for p in replicas.values():
            p.wait_ready()
        assert httpx.post(f"{replicas['a'].url}/v1/score", content=b"").status_code == 401  # token required
        path = recipe(tmp_path, tiny_model, redis.url, [p.url for p in replicas.values()])
        run_dir = tmp_path / "chaos"
        chaos = Chaos(run_dir, redis, replicas, redis_kw)
        chaos.thread.start()
        with pytest.raises(Exception) as died:
            train(load_config(TrainConfig, path, ["run.max_steps=100000"]))  # ends when the learner is killed
        chaos.thread.join(30)
        if chaos.error is not None:
            raise chaos.error
        n = chaos.notes
        assert "killed_at" in n, f"the run ended before the faults were done: {died.getrepr(style='short')}; {n}"
        assert re.search("(?i)actor", type(died.value).__name__ + str(died.value)), died.value
        redis = chaos.redis

        # 2. the killed sampler came back with a new incarnation and published again
        assert n["sampler_incarnations"] == 2
        # 1. replica A died: nothing was masked until every replica was down
        assert n["masked_before_outage"] == n["masked_before_a"] == 0
        # 3. the outage masked groups, the samplers backed off
        assert n["backoffs"] >= 1
        # 4. the Redis restart was ridden out with counted retries
        assert n["retries_after"] >= 1, n

        # 5. resume from the last checkpoint, to a later step: far enough that the backlog the killed run
        # left (up to ~8 groups) cannot cover it, so the restarted samplers must publish (incarnations below)
        killed_at = n["killed_at"]
        more = 6
        resumed = train(load_config(TrainConfig, path, [f"run.resume={run_dir}", f"run.max_steps={killed_at + more}"]))
        assert resumed == run_dir
        summary = json.loads((run_dir / "summary.json").read_text())
        # killed_at was read just before the kill: a step already in flight may still have completed (and
        # checkpointed) in between, so the checkpoint is at most one step later
        assert summary["resumed"] and summary["start_step"] <= killed_at + 1 and summary["end_step"] == killed_at + more

        # the ledger: produced == every fate + pending, in ledger.json and in Redis now
        ledger = json.loads((run_dir / "ledger.json").read_text())
        live = ledger_snapshot(connect(redis.url), "experience")
        for snap in (ledger, live):
            assert snap["produced"] == sum(snap[f] for f in FATES) + snap["pending"], snap
            assert snap["balanced"]
        assert live["produced"] == ledger["produced"] and live["trained"] == ledger["trained"]
        assert ledger["masked"] + ledger["pending"] >= ledger["produced_masked"] >= 3
        assert ledger["malformed"] == ledger["lost"] == ledger["invalid"] == 0

        # each trained group once: trained_groups.txt vs the ledger and the learner's step count
        ids = [line.split("\t")[0] for line in (run_dir / "trained_groups.txt").read_text().splitlines()]
        assert len(ids) == len(set(ids)) == ledger["trained"] == ledger["trained_groups_file"]["unique"]
        assert len(ids) == 2 * summary["end_step"]  # G=2 per step; every step committed by the end

        # 2. group ids are unique across sampler incarnations (sampler-0: original, restarted, resumed)
        r = connect(redis.url)
        in_stream = [f[b"group_id"].decode() for _, f in r.xrange("experience")]
        # acknowledged entries are trimmed from Redis (those after the oldest pending one stay a while)
        assert ledger["pending"] <= len(in_stream) < ledger["produced"] // 2
        incarnations = {g.split(":")[1] for g in in_stream + ids if g.startswith("sampler-0:")}
        assert len(incarnations) >= 3, incarnations

        # secrets stay out of the run folder (config.yaml has the URL with *** for the password)
        for f in run_dir.rglob("*"):
            if f.is_file() and f.suffix in ("", ".yaml", ".json", ".jsonl", ".txt", ".log", ".prom"):
                text = f.read_text(errors="replace")
                assert TOKEN not in text and PASSWORD not in text, f
        assert ":***@" in (run_dir / "config.yaml").read_text()
    finally:
        if chaos is not None:
            redis = chaos.redis
            replicas = chaos.replicas
        for p in replicas.values():
            p.stop()
        redis.stop()
