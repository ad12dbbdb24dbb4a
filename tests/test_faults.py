"""Faults at the remote-call sites, with real processes: a reward replica that answers slowly or
with garbage (a small fake HTTP server injects the faults; the healthy replica is a real reward server
process), and a real redis-server killed and restarted under a producer and a consumer (the bus
reconnects, nothing acknowledged is lost, and the ledger balances)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from test_reward_servers import ServerProc

from diffrl.embedded_redis import EmbeddedRedis, connect
from diffrl.proto import experience_pb2, reward_pb2
from diffrl.proto.bus import ExperienceConsumer, ExperienceProducer, RetryPolicy, ledger_snapshot
from diffrl.proto.codec import tensor_to_proto
from diffrl.reward_servers.client import Group, RewardClientConfig, RewardEndpointConfig, SyncRewardClient

IMAGES = [np.full((8, 8, 3), (20, 20, 230), np.uint8)] * 2
PROMPT = "a blue square"


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ----------------------------------------------------------------------------- a faulty reward replica
class FaultyReward:
    """A fake reward replica on 127.0.0.1 (a thread) answering /v1/score according to ``mode``:
    ok, slow (sleeps ``delay`` first), garbage (random bytes as protobuf), wrong_count, nan,
    bad_json (a JSON body that is not a ScoreResponse), error_500. /healthz always answers 200."""

    def __init__(self, mode: str = "ok", delay: float = 2.0):
        self.mode, self.delay, self.hits = mode, delay, 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/x-protobuf"):
                self.send_response(code)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, b'{"status": "ok"}', "application/json")

            def do_POST(self):
                req = reward_pb2.ScoreRequest.FromString(self.rfile.read(int(self.headers["content-length"])))
                n = len(req.items)
                owner.hits += 1
                mode = owner.mode
                if mode == "slow":
                    time.sleep(owner.delay)
                if mode in ("ok", "slow"):
                    self._send(200, reward_pb2.ScoreResponse(scores=[0.5] * n).SerializeToString())
                elif mode == "garbage":
                    self._send(200, b"\xff\xfe\x00garbage" * 7)
                elif mode == "wrong_count":
                    self._send(200, reward_pb2.ScoreResponse(scores=[0.5] * (n + 1)).SerializeToString())
                elif mode == "nan":
                    self._send(200, reward_pb2.ScoreResponse(scores=[float("nan")] * n).SerializeToString())
                elif mode == "bad_json":
                    self._send(200, b'{"scores": "many"}', "application/json")
                else:
                    self._send(500, b'{"error": "boom", "kind": "internal"}', "application/json")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def client_for(name: str, urls: list[str], **kw) -> SyncRewardClient:
    ep = RewardEndpointConfig(name=name, urls=urls, backoff_initial_s=0.01, backoff_max_s=0.05,
                              health_check_interval_s=60, **kw)
    return SyncRewardClient(RewardClientConfig(rewards=[ep]), token="")


@pytest.fixture(scope="module")
def real_replica():
    proc = ServerProc("shapes")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_slow_reward_times_out_counted_and_fails_the_group():
    name = f"slow-{uuid.uuid4().hex[:6]}"
    with FaultyReward("slow", delay=3.0) as slow, client_for(name, [slow.url], timeout_s=0.3, retries=1) as client:
        t0 = time.monotonic()
        out = client.score_groups([Group(IMAGES, PROMPT)])
        # two 0.3 s attempts, not the server's 3 s (wide slack: a loaded 2-core machine)
        assert time.monotonic() - t0 < 2.5
        assert not out[0].ok and out[0].failure.kind == "timeout" and out[0].combined == []
        assert metric("diffrl_reward_client_requests_total", reward=name, outcome="timeout") == 2
        assert metric("diffrl_reward_client_group_failures_total", reward=name, kind="timeout") == 1
        assert metric("diffrl_reward_client_retries_total", reward=name) == 1
    # the same slow replica is fine once the client's timeout allows for it
    with FaultyReward("slow", delay=0.05) as slow, client_for(name, [slow.url], timeout_s=2.0, retries=0) as client:
        assert client.score_group(IMAGES, PROMPT).scores[name] == [0.5, 0.5]


@pytest.mark.parametrize("mode", ["garbage", "wrong_count", "nan", "bad_json", "error_500"])
def test_garbage_answers_are_counted_ejected_and_retried_elsewhere(mode, real_replica):
    name = f"{mode}-{uuid.uuid4().hex[:6]}"
    outcome = "http_5xx" if mode == "error_500" else "bad_response"
    kind = "http_500" if mode == "error_500" else "bad_response"
    with FaultyReward(mode) as bad:
        # the only replica answers garbage: the group fails (never a made-up score), counted by kind
        with client_for(name, [bad.url], timeout_s=5, retries=1) as client:
            with pytest.raises(Exception) as err:
                client.score_group(IMAGES, PROMPT)
            assert getattr(err.value, "kind", None) == kind, err.value
            assert bad.hits == 2  # retried once, then given up
        assert metric("diffrl_reward_client_requests_total", reward=name, outcome=outcome) == 2
        assert metric("diffrl_reward_client_group_failures_total", reward=name, kind=kind) == 1
        # next to a healthy replica: the faulty one is ejected and every group is scored by the other
        hits0 = bad.hits
        with client_for(name, [bad.url, real_replica.url], timeout_s=5, retries=2) as client:
            results = [client.score_group(IMAGES, PROMPT) for _ in range(6)]
            assert all(r.ok and len(r.scores[name]) == 2 and all(np.isfinite(r.scores[name])) for r in results)
            assert client.replica_health()[name] == {bad.url: False, real_replica.url.rstrip("/"): True}
        assert bad.hits - hits0 == 1  # tried once, then out of rotation
        assert metric("diffrl_reward_client_ejections_total", reward=name) >= 2


# ----------------------------------------------------------------------------- Redis restarted
def group(i: int, tag: str) -> experience_pb2.Group:
    g = experience_pb2.Group(group_id=f"{tag}:{i}", prompt="a red circle", policy_version=0,
                             sampler_id="sampler-0", created_at=time.time())
    for j in range(2):
        s = g.samples.add(seed=j, latent=tensor_to_proto(torch.zeros(2, 2, 2)))
        s.rewards["shapes"] = float(j)
    return g


@pytest.mark.parametrize("kill", [False, True], ids=["shutdown", "sigkill"])
def test_bus_rides_out_a_redis_restart_and_the_ledger_balances(tmp_path, kill):
    """A producer thread and a consumer thread keep working while the server is stopped (SHUTDOWN, or
    SIGKILL with appendfsync=always) and started again on the same port with the same data: every
    published group is read exactly once and acknowledged; retries are counted; nothing is lost."""
    data = tmp_path / "redis"
    server = EmbeddedRedis(data_dir=data, port=0, password="pw", appendfsync="always").start()
    port, url = server.port, server.url
    policy = RetryPolicy(max_elapsed_s=30, initial_backoff_s=0.05, max_backoff_s=0.5)
    stream, tag = f"exp-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    producer = ExperienceProducer(connect(url), stream=stream, retry=policy)
    consumer = ExperienceConsumer(connect(url), stream=stream, consumer_name="learner-0", retry=policy)
    retries0 = metric("diffrl_bus_retries_total", op="publish") + metric("diffrl_bus_retries_total", op="read")
    n, seen, errors = 60, [], []
    stop = threading.Event()

    def produce():
        try:
            for i in range(n):
                producer.publish(group(i, tag))
                time.sleep(0.03)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    def consume():
        try:
            while not stop.is_set():
                got = consumer.read(max_groups=4, block_ms=200)
                seen.extend(g.group_id for _, g in got)
                consumer.ack([e for e, _ in got], fate="trained")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    try:
        while len(seen) < 15:
            time.sleep(0.02)
        if kill:  # no SHUTDOWN, no flush: appendfsync=always has written every acknowledged command
            os.kill(server.pid, signal.SIGKILL)
            server._proc.wait(10)
            server._proc = None
            server._cleanup()
        else:
            server.stop()
        time.sleep(1.0)  # both sides retrying meanwhile
        server = EmbeddedRedis(data_dir=data, port=port, password="pw", appendfsync="always").start()
        threads[0].join(60)
        deadline = time.monotonic() + 30
        while len(set(seen)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        threads[1].join(30)
        assert not errors, errors
        assert sorted(set(seen)) == sorted(f"{tag}:{i}" for i in range(n))
        ledger = ledger_snapshot(connect(url), stream)
        # a publish retried after a lost reply may append a copy: counted as produced, read again
        assert ledger["balanced"] and ledger["pending"] == 0, ledger
        assert ledger["produced"] == ledger["trained"] == len(seen) >= n
        retries = metric("diffrl_bus_retries_total", op="publish") + metric("diffrl_bus_retries_total", op="read")
        assert retries > retries0 and producer.retries_total + consumer.retries_total > 0
    finally:
        stop.set()
        server.stop()


def test_retries_give_up_after_max_elapsed_and_auth_errors_are_not_retried(tmp_path):
    with EmbeddedRedis(port=0, password="pw") as server:
        port = server.port
        with pytest.raises(Exception, match="(?i)auth|password"):
            ExperienceProducer(connect(f"redis://:wrong@127.0.0.1:{port}/0"),
                               retry=RetryPolicy(max_elapsed_s=30)).backlog()
    t0 = time.monotonic()
    producer = ExperienceProducer(connect(f"redis://:pw@127.0.0.1:{port}/0", socket_connect_timeout=0.2),
                                  retry=RetryPolicy(max_elapsed_s=1.0, initial_backoff_s=0.05, max_backoff_s=0.2))
    with pytest.raises(Exception, match="(?i)connect"):
        producer.publish(group(0, "x"))
    assert 1.0 <= time.monotonic() - t0 < 15 and producer.retries_total >= 2
