"""Simulated remote latency of a reward server (``execution.latency_ms``): a real server process over
HTTP answers each request no sooner than the latency, concurrent requests overlap (the wait is an
asyncio sleep, not a blocked scoring thread), and bad settings are refused with the field's name."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from diffrl.config import ConfigError, load_config
from diffrl.models.shapes_world import render_prompt, train_prompts
from diffrl.proto import reward_pb2
from diffrl.reward_servers.config import RewardServerConfig
from diffrl.reward_servers.images import encode_png
from diffrl.reward_servers.process import LocalRewardServer

LATENCY_MS, JITTER_MS = 400.0, 50.0
PROTO = {"content-type": "application/x-protobuf"}


def _request() -> bytes:
    prompt = train_prompts()[0]
    items = [reward_pb2.Item(png=encode_png(render_prompt(prompt, seed=i)), prompt=prompt) for i in range(4)]
    return reward_pb2.ScoreRequest(items=items).SerializeToString()


def test_latency_is_added_per_request_and_concurrent_requests_overlap(tmp_path):
    # one scoring thread: if the wait held a thread, 6 concurrent requests would take >= 6 x latency
    args = [f"execution.latency_ms={LATENCY_MS}", f"execution.latency_jitter_ms={JITTER_MS}", "execution.threads=1"]
    body = _request()
    with LocalRewardServer("shapes", args, log_path=tmp_path / "reward.log", env={"DIFFRL_REWARD_TOKEN": None}) as srv:
        assert "simulated latency 400 +- 50 ms" in srv.output()
        with httpx.Client(timeout=30) as client:
            client.post(f"{srv.url}/v1/score", content=body, headers=PROTO).raise_for_status()  # warm-up
            singles = []
            for _ in range(3):
                t0 = time.perf_counter()
                r = client.post(f"{srv.url}/v1/score", content=body, headers=PROTO)
                singles.append(time.perf_counter() - t0)
                assert r.status_code == 200
                resp = reward_pb2.ScoreResponse.FromString(r.content)
                assert len(resp.scores) == 4 and list(resp.errors) == [""] * 4
            # a refused request is not delayed
            t0 = time.perf_counter()
            assert client.post(f"{srv.url}/v1/score", content=b"\xff\x00junk", headers=PROTO).status_code == 400
            refused = time.perf_counter() - t0

        async def concurrent(n: int) -> tuple[float, list[float]]:
            async with httpx.AsyncClient(timeout=30) as ac:
                async def one() -> float:
                    t = time.perf_counter()
                    (await ac.post(f"{srv.url}/v1/score", content=body, headers=PROTO)).raise_for_status()
                    return time.perf_counter() - t

                t0 = time.perf_counter()
                each = await asyncio.gather(*(one() for _ in range(n)))
                return time.perf_counter() - t0, list(each)

        total, each = asyncio.run(concurrent(6))
        metrics = httpx.get(f"{srv.url}/metrics").text

    low = (LATENCY_MS - JITTER_MS) / 1000
    assert min(singles) >= low, singles
    assert max(singles) < (LATENCY_MS + JITTER_MS) / 1000 + 0.5, singles
    assert refused < low, refused
    assert min(each) >= low, each
    assert total < 2 * low, (total, each)  # overlapped: 6 sequential waits would take >= 6 x 0.35 s
    line = next(ln for ln in metrics.splitlines() if ln.startswith("diffrl_reward_injected_latency_seconds_total"))
    assert float(line.split()[-1]) >= 10 * low  # 1 warm-up + 3 singles + 6 concurrent requests


@pytest.mark.parametrize("overrides, field", [
    (["execution.latency_ms=-1"], "execution.latency_ms"),
    (["execution.latency_ms=.nan"], "execution.latency_ms"),
    (["execution.latency_ms=100", "execution.latency_jitter_ms=150"], "execution.latency_jitter_ms"),
])
def test_bad_latency_settings_are_refused(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(RewardServerConfig, None, overrides)
    assert err.value.field == field
    assert load_config(RewardServerConfig, None, []).execution.latency_ms == 0.0  # off by default
